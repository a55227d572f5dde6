"""Momentum-SAM: SAM's perturbation along the momentum the base optimizer already keeps.

Becker, Altrock, Risse, "Momentum-SAM: Sharpness Aware Minimization without Computational
Overhead", 2024, arXiv:2401.12033 (official code: github.com/MarlonBecker/MSAM). SAM needs a
gradient at ``w`` to know where to perturb, then a second one at ``w + e``. Momentum-SAM takes the
direction from the momentum buffer ``v`` instead, known before the step starts, so each step takes
one gradient only, at the perturbed point::

    w̃_t     = w_t − ρ·v_t/‖v_t‖          # the weights moved here before the forward pass
    g_t     = ∇L(w̃_t)                    # the step's one forward/backward
    w_{t+1} = base_step(w_t, g_t)        # from the exact saved w_t; it updates v (v_{t+1} = μv_t + g_t for SGD)

``v`` is the base optimizer's own buffer: SGD's ``momentum_buffer`` (the paper's SGD form) or
Adam's/AdamW's first moment ``exp_avg`` (the paper's AdamW form); the sign (``−v``: along the
coming update) is the paper's. Before the first base step there is no ``v``: the first step is the
base optimizer's own, as in the official code (``v_0 = 0``).

The rule is written once here and runs on both fronts (:class:`sharpness.MomentumSAM` over torch
tensors, :class:`sharpness.numpy.MomentumSAM` over numpy arrays). Not to be confused with
m-sharpness (:class:`sharpness.MSharpnessSAM`, micro-batch perturbations).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

from sharpness._validation import number
from sharpness.methods import NORM_EPS
from sharpness.methods.base import Method
from sharpness.methods.contract import Engine

__all__ = ["MomentumSAM"]

#: The base optimizers' momentum buffers, by the state name torch.optim gives them (the numpy
#: front's base optimizers use the same names): SGD's and RMSprop's, then the Adam family's.
MOMENTUM_BUFFERS = ("momentum_buffer", "exp_avg")


class MomentumSAM(Method):
    r"""Momentum-SAM (Becker, Altrock, Risse, 2024, arXiv:2401.12033): the perturbation is
    ``−ρ·v/‖v‖`` along the base optimizer's momentum buffer ``v``; one gradient per step, at the
    perturbed point: SAM at the base optimizer's price.

    One step (``v`` the buffer after the previous step; no move before the first)::

        w̃   = w − ρ·v/(‖v‖ + 1e-12)     # begin_step(): w saved, weights moved to w̃
        g   = ∇L(w̃)                     # the caller's forward/backward
        w   ← base_step(w, g)           # w restored bit for bit, then the base optimizer's step

    **Where the weights are between steps: at ``w``.** The official code leaves the weights at
    ``w̃`` between steps (its ``step()`` ends with the move to the next ``w̃``, and evaluating or
    saving the model needs ``move_back_from_momentumAscent()`` first). Here the move is the first
    act of the next step instead (``begin_step()``, which ``step(closure)`` calls itself), and
    the step ends with the base step from the saved ``w``: the same trajectory, with the model at
    ``w`` whenever no step is under way. So evaluation, ``model.state_dict()``, checkpoints
    (``opt.state_dict()``; refused during a step, as for every method), LR schedulers and
    ``restore()`` (which puts ``w`` back during a step and abandons it) need no special care, and a
    run resumed from a checkpoint continues bit for bit.

    **Calls.** ``step(closure)``: the closure runs once, at ``w̃``. Two-call form (torch)::

        opt.begin_step()                    # weights to w̃ (nothing moves before the first step)
        loss_fn(model(x), y).backward()
        opt.step()                          # w back, the base step with the gradient at w̃

    (``first_step()`` in place of ``step()`` does the same and returns False: no second pass.)
    numpy: ``begin_step()``, then ``first_step(grads_at_w̃)``; or ``step(grad_fn)``. Under a
    ``GradScaler``: ``opt.begin_step()``, ``scaler.scale(loss).backward()``,
    ``scaler.step(opt)``, ``scaler.update()``: an inf/NaN puts ``w`` back and skips the step.

    **Base optimizers.** Any whose state keeps a momentum buffer: ``torch.optim.SGD`` with
    ``momentum > 0`` (``momentum_buffer``; the paper's SGD form), ``Adam``/``AdamW`` and their kin
    (``exp_avg``; the paper's AdamW form), ``RMSprop`` with momentum; numpy: ``"sgd"`` (momentum
    > 0), ``"adam"``, ``"adamw"``. Others are refused. The base step is the base optimizer's own,
    with its weight decay at ``w`` (the official SGD code decays with the perturbed weights ``w̃``;
    its AdamW code decays after the Adam update instead of before: differences of order
    ``lr·wd·ρ`` and ``lr²·wd``).

    **Perturbation.** ``‖v‖`` is global over the groups with ``rho > 0`` (a group with ``rho = 0``
    is not moved); ``sam_state["momentum_norm"]`` keeps the last one. A non-finite ``‖v‖`` moves
    nothing (``stats["nonfinite_skips"]``). A trainable parameter without a buffer (no gradient
    yet) leaves the step unmoved (``stats["unperturbed_steps"]``; a warning after the first step:
    give such parameters ``requires_grad=False``): a buffer the base optimizer has not created is
    never created here, so the base optimizer's own first update stays its own. No adaptive (ASAM)
    form, no ``sam_norm_weight``.

    Args:
        params, and the front's own arguments: as for :class:`sharpness.SAM` (torch:
            ``base_optimizer``, ``backend``, ...) or :class:`sharpness.numpy.SAM` (``base=`` ...).
        rho: the radius ``ρ`` of the move along ``−v/‖v‖``. Its scale is not SAM's: the move goes
            along the coming update, where the loss rises slowly; the official code defaults to 0.3
            (SGD) and 1 (AdamW) and its CIFAR/ImageNet runs use 3. Tune it
            (:func:`sharpness.find_rho`).

    Example:
        >>> import torch, sharpness
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = sharpness.MomentumSAM(model.parameters(), torch.optim.SGD, rho=0.3, lr=0.1, momentum=0.9)
        >>> x, y = torch.randn(8, 4), torch.randn(8, 2)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> for _ in range(3):
        ...     loss = opt.step(closure)  # the closure runs once, at w̃
        >>> opt.stats["steps"]
        3

        The numpy front, the same rule::

        >>> import numpy as np, sharpness.numpy
        >>> w = np.zeros(3)
        >>> opt = sharpness.numpy.MomentumSAM([w], rho=0.1, lr=0.1, momentum=0.9)
        >>> grad_fn = lambda p: (float(np.sum((p[0] - 1) ** 2)), [2 * (p[0] - 1)])
        >>> losses = [opt.step(grad_fn) for _ in range(50)]
        >>> bool(losses[-1] < losses[0])
        True
    """

    norm_weights_supported = False  # its norm is ‖v‖ (see SAM.norm_weights_supported)
    one_gradient_per_step = True

    def __init__(self, *args: Any, rho: float = 0.3, **kwargs: Any) -> None:
        rho = number("rho", rho, minimum=0)  # by its name here (the fronts check their group key sam_rho)
        super().__init__(*args, rho=rho, **kwargs)
        self.sam_state["momentum_norm"] = 0.0

    def _setup_group(self, group: dict[str, Any]) -> None:
        if group["sam_adaptive"]:
            raise ValueError("MomentumSAM has no adaptive (ASAM) form: its perturbation is −ρ·v/‖v‖")
        if "momentum" in group and "betas" not in group and not group["momentum"] > 0:
            raise ValueError(
                "MomentumSAM perturbs along the base optimizer's momentum buffer: give the base optimizer momentum > 0"
            )
        if "momentum" not in group and "betas" not in group:
            raise TypeError(
                "MomentumSAM perturbs along the base optimizer's momentum buffer; this base optimizer keeps none "
                "(use SGD with momentum > 0, Adam, AdamW, or another with a 'momentum_buffer' or 'exp_avg' state)"
            )

    def _second_pass_due_by_count(self) -> bool:
        return False  # one gradient per step, at w̃

    def _begin_step(self, engines: Sequence[Engine]) -> None:
        """Saves ``w`` and moves the weights to ``w − ρ·v/‖v‖`` (nowhere before ``v`` exists)."""
        for engine in engines:
            engine.save_weights()
        for name in MOMENTUM_BUFFERS:
            sums = [engine.state_sums_of_squares(name, self.state) for engine in engines]
            if all(s is not None for s in sums):
                break
        else:
            self._unperturbed()
            return
        moved = {gi for gi, group in enumerate(self.param_groups) if group["sam_rho"] != 0}
        norm = math.sqrt(sum(value for s in sums if s is not None for gi, value in s.items() if gi in moved))
        self.sam_state["momentum_norm"] = norm
        if not math.isfinite(norm):
            self.stats["nonfinite_skips"] += 1
            return
        scales = {gi: -self.param_groups[gi]["sam_rho"] / (norm + NORM_EPS) for gi in moved}
        for engine in engines:
            engine.weights_from_backup(name, scales, self.state)

    def _unperturbed(self) -> None:
        """A step without the move: before the first base step, or with a parameter that has no
        momentum buffer yet (warned once after the first step: the method would silently be the
        base optimizer)."""
        if self.sam_state["step"] > 0:
            self.stats["unperturbed_steps"] += 1
            if self.stats["unperturbed_steps"] == 1:
                warnings.warn(
                    "MomentumSAM took a step without its perturbation: a trainable parameter has no momentum buffer "
                    "(it has had no gradient yet). Give parameters that take no gradient requires_grad=False.",
                    RuntimeWarning,
                    stacklevel=4,
                )
