"""LookSAM and every-k SAM: the second gradient pass only every k steps.

LookSAM (Liu, Mai, Chen, Hsieh, You, "Towards Efficient and Scalable Sharpness-Aware
Minimization", CVPR 2022, arXiv:2203.02714) observes that the part of SAM's gradient that the
plain gradient does not already contain changes slowly. Every ``k`` steps it takes a full SAM
step and keeps that part,

    g_s = ∇L(w + e),   g_v = g_s − ‖g_s‖·cos(g, g_s)·g/‖g‖ = g_s − (g·g_s/‖g‖²)·g,

the component of ``g_s`` orthogonal to ``g``; on the steps in between it takes one gradient
``g`` and reuses it:

    g_s ≈ g + α·(‖g‖/‖g_v‖)·g_v                 (the paper's form, ``variant="paper"``)
    g_s ≈ g + α·(‖g‖/‖g_k‖)·g_v                 (``variant="relative"``, g_k the SAM step's g)

The paper's form pushes ``g_v`` with norm ``α‖g‖`` however small SAM found it; the relative form
keeps the size it had next to the gradient, so that it tends to the base optimizer as ``ρ → 0``.
Why that matters (small convolutional networks stall at chance under the paper's form) and the
measurements: ``docs/research/looksam_stall.md``.

Every-k SAM (Composer's ``interval``, optax's ``sync_period``) is the baseline: a SAM step every
``k`` steps, plain base-optimizer steps in between (LookSAM with ``α = 0``).

Both are written once here, over the engine contract (dot products, ``axpby``, the fused
steps), and run on both fronts: :class:`sharpness.LookSAM` (torch) and
:class:`sharpness.numpy.LookSAM`. ``g_v`` lives in the optimizer state (``state[p]["looksam_gv"]``;
on the numpy front ``state[i]``), so it is checkpointed with everything else, and ``‖g_v‖`` and
``‖g_k‖`` in ``state_dict()["sam"]["state"]`` (``"gv_norm"``, ``"g_norm"``).
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

#: How LookSAM scales the reused ``g_v`` on the steps between SAM steps (see :class:`LookSAM`).
VARIANTS = ("paper", "relative")


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


class LookSAM(Method):
    """LookSAM (Liu et al., CVPR 2022, arXiv:2203.02714): a SAM step every ``k`` steps that
    keeps ``g_v``, the part of the SAM gradient orthogonal to the plain gradient; in between,
    one gradient pass with ``g`` plus ``α·g_v`` rescaled.

    On a SAM step (``t mod k = 0``), with ``g_k = ∇L(w)`` and ``g_s = ∇L(w + ρ g_k/‖g_k‖)``::

        g_v = g_s − (g_k·g_s/‖g_k‖²)·g_k        (the step itself uses g_s, as SAM)

    On the ``k − 1`` steps in between, one gradient ``g`` and the update direction

    - ``variant="paper"`` (the paper's Algorithm 1, the default): ``g + α·(‖g‖/‖g_v‖)·g_v``.
      ``g_v`` is pushed with norm ``α‖g‖`` whatever its own size: ``α/(‖g_v‖/‖g_k‖)`` times
      the push SAM itself gave it, and still ``α‖g‖`` as ``ρ → 0``.
    - ``variant="relative"``: ``g + α·(‖g‖/‖g_k‖)·g_v``. ``g_v`` keeps the size it had
      relative to the gradient at the last SAM step (with ``α = 1`` exactly SAM's orthogonal
      part, rescaled as ``‖g‖`` changes), so the push shrinks with ``ρ`` and the method tends
      to the base optimizer as ``ρ → 0``.

    ``k = 1`` is SAM and ``α = 0`` every-k SAM, in both forms; ``ρ = 0`` is the base optimizer
    (``g_v = 0``).

    Which form. The paper's behaves as SAM at a radius it picks itself: over a cycle of ``k``
    steps it pushes along ``g_v`` about ``1 + (k − 1)·α/r`` times one SAM step's ``‖g_v‖``
    (``r = ‖g_v‖/‖g_k‖``), where SAM itself, whose ``g_v`` turns from step to step, pushes 2.4–3.9
    times over 5 steps (measured). ``r`` is smallest early in training, at small ``ρ`` and on
    small convolutional networks (0.05–0.37 measured there): the paper's form then pushes 2–20
    times as hard as SAM, past SAM's radius cliff. The ReLUs die, the loss stays at ``ln 10`` and,
    ``r`` falling to 0.003, the push grows further along what is now noise: the stall of
    ``docs/research/looksam_stall.md``, where SGD, SAM and every-k SAM at the same ``ρ`` learn
    (and where it stalls at ``ρ = 0.005`` too). Where a larger radius than the given one helps
    (label noise, small ``ρ``) it can beat SAM. The relative form with ``α = 0.5`` pushes
    ``1 + 4·0.5 = 3`` times over ``k = 5`` steps, SAM's own amount: it behaves as SAM at the
    user's ``ρ`` for about every-k SAM's cost, and is the library's efficient pick::

        LookSAM(params, base, rho=<SAM's ρ>, k=5, alpha=0.5, variant="relative")

    The paper's form stays the default, so that ``LookSAM(...)`` is the paper's method.

    Args:
        params, base_optimizer, rho, adaptive, eta, backend, **base_kwargs: as for
            :class:`sharpness.SAM`.
        k: a SAM step every ``k`` steps (the first step is one).
        alpha: the weight ``α`` of the reused component.
        variant: ``"paper"`` or ``"relative"``: how ``g_v`` is scaled on the steps in between.

    ``g_v`` is checkpointed in the per-parameter state (``"looksam_gv"``), ``‖g_v‖`` and
    ``‖g_k‖`` in ``state_dict()["sam"]["state"]`` (``"gv_norm"``, ``"g_norm"``).

    Example:
        >>> import torch, sharpness
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = sharpness.LookSAM(model.parameters(), torch.optim.SGD, k=5, alpha=0.7, rho=0.05, lr=0.1)
        >>> x, y = torch.randn(8, 4), torch.randn(8, 2)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> for _ in range(5):
        ...     loss = opt.step(closure)  # the closure runs twice on step 0, once on steps 1-4
        >>> pick = sharpness.LookSAM(model.parameters(), torch.optim.SGD, k=5, alpha=0.5, variant="relative",
        ...                          rho=0.05, lr=0.1, momentum=0.9)  # the library's efficient pick
    """

    norm_weights_supported = False  # its own norms (see SAM.norm_weights_supported)

    needs_unscaled_first_gradient = (
        "g_v mixes the first gradient g with g̃, which the scaler unscales, and its one-pass steps must be "
        "left to scaler.step()"
    )

    def __init__(self, *args: Any, k: int = 5, alpha: float = 0.7, variant: str = "paper", **kwargs: Any) -> None:
        self.k = _check_k(k)
        self.alpha = number("alpha", alpha, minimum=0)
        if not isinstance(variant, str) or variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        self.variant = variant
        super().__init__(*args, **kwargs)
        self.sam_state["gv_norm"] = 0.0
        self.sam_state["g_norm"] = 0.0

    def _second_pass_due(self, grad_norm: float) -> bool:
        return self.sam_state["step"] % self.k == 0

    def _second_pass_due_by_count(self) -> bool:
        return self.sam_state["step"] % self.k == 0

    def _before_perturbation(self, engines: Sequence[Engine]) -> None:
        for engine in engines:  # keep g: g_v is computed from it once g_s is known
            engine.copy("grads", _GV, self.state)

    def _before_base_step(self, engines: Sequence[Engine]) -> None:
        g_dot_g = sum(engine.dot(_GV, _GV, self.state) for engine in engines)
        g_dot_gs = sum(engine.dot("grads", _GV, self.state) for engine in engines)
        c = g_dot_gs / g_dot_g if g_dot_g > 0 else 0.0
        for engine in engines:  # g_v = g_s − c·g, in the buffer that held g
            engine.axpby("grads", _GV, 1.0, -c, self.state)
        self.sam_state["g_norm"] = math.sqrt(g_dot_g)
        self.sam_state["gv_norm"] = math.sqrt(sum(engine.dot(_GV, _GV, self.state) for engine in engines))

    def _one_pass_gradient(self, engines: Sequence[Engine], grad_norm: float) -> None:
        gv_norm = self.sam_state["gv_norm"]
        # what α‖g‖·g_v is divided by: ‖g_v‖ (the paper), or ‖g_k‖ (relative)
        denominator = gv_norm if self.variant == "paper" else self.sam_state["g_norm"]
        if self.alpha == 0 or gv_norm == 0 or denominator == 0:
            return
        g_norm = math.sqrt(sum(engine.dot("grads", "grads", self.state) for engine in engines))
        scale = self.alpha * g_norm / denominator
        for engine in engines:  # g ← g + α‖g‖/denominator·g_v
            engine.axpby(_GV, "grads", scale, 1.0, self.state)
