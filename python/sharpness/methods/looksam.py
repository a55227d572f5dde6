"""LookSAM and every-k SAM: the second gradient pass only every k steps.

LookSAM (Liu, Mai, Chen, Hsieh, You, "Towards Efficient and Scalable Sharpness-Aware
Minimization", CVPR 2022, arXiv:2203.02714) observes that the part of SAM's gradient that the
plain gradient does not already contain changes slowly. Every ``k`` steps it takes a full SAM
step and keeps that part,

    g_s = ∇L(w + e),   g_v = g_s − ‖g_s‖·cos(g, g_s)·g/‖g‖ = g_s − (g·g_s/‖g‖²)·g,

the component of ``g_s`` orthogonal to ``g``; on the steps in between it takes one gradient
``g`` and reuses it:

    g_s ≈ g + α·(‖g‖/‖g_v‖)·g_v.

Every-k SAM (Composer's ``interval``, optax's ``sync_period``) is the baseline: a SAM step every
``k`` steps, plain base-optimizer steps in between (LookSAM with ``α = 0``).

Both are written once here, over the engine contract (dot products, ``axpby``, the fused
steps), and run on both fronts: :class:`sharpness.LookSAM` (torch) and
:class:`sharpness.numpy.LookSAM`. ``g_v`` lives in the optimizer state (``state[p]["looksam_gv"]``;
on the numpy front ``state[i]``), so it is checkpointed with everything else, and ``‖g_v‖`` in
``state_dict()["sam"]["state"]["gv_norm"]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from sharpness._validation import number
from sharpness.methods.base import Method
from sharpness.methods.contract import Engine

__all__ = ["EveryKSAM", "LookSAM"]

_GV = "looksam_gv"


def _check_k(k: int) -> int:
    return number("k", k, minimum=1, integer=True)


class EveryKSAM(Method):
    """SAM every ``k`` steps, plain base-optimizer steps in between (the baseline of the
    efficient SAM variants, e.g. of LookSAM: Liu et al., CVPR 2022, arXiv:2203.02714; Composer's
    ``interval``, optax's ``sync_period``; ``k = 1`` is SAM).

    :meth:`first_step` returns whether a second pass must follow; on the other steps it takes
    the whole (plain) step itself (given ``grad_scaler=``, it leaves that step to
    ``scaler.step(opt)``: see :meth:`SAM.first_step`). ``step(closure)`` handles both.

    Example:
        >>> import torch, sharpness
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = sharpness.EveryKSAM(model.parameters(), torch.optim.SGD, k=2, rho=0.05, lr=0.1)
        >>> x, y = torch.randn(8, 4), torch.randn(8, 2)
        >>> for _ in range(4):
        ...     torch.nn.functional.mse_loss(model(x), y).backward()
        ...     if opt.first_step(zero_grad=True):  # True on steps 0 and 2
        ...         torch.nn.functional.mse_loss(model(x), y).backward()
        ...         opt.second_step(zero_grad=True)
        >>> opt.stats["fused_steps"], opt.stats["fused_plain_steps"]
        (2, 2)
    """

    needs_unscaled_first_gradient = "its one-pass steps must be left to scaler.step(), which unscales them"

    def __init__(self, *args: Any, k: int = 2, **kwargs: Any) -> None:
        self.k = _check_k(k)
        super().__init__(*args, **kwargs)

    def _second_pass_due(self, grad_norm: float) -> bool:
        return self.sam_state["step"] % self.k == 0

    def _second_pass_due_by_count(self) -> bool:
        return self.sam_state["step"] % self.k == 0


