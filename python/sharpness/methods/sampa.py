"""SAMPa: SAM whose two gradients are independent, so that they can run in parallel.

Xie, Pethick, Cevher, "SAMPa: Sharpness-aware Minimization Parallelized", NeurIPS 2024,
arXiv:2410.10683 (official code: github.com/LIONS-EPFL/SAMPa). SAM's perturbation needs the
gradient at ``x_t`` before the gradient at ``x_t + e`` can start. SAMPa perturbs along the
gradient at an auxiliary point ``y_t`` computed one step earlier::

    x̃_t     = x_t + ρ ∇f(y_t)/‖∇f(y_t)‖
    y_{t+1} = x_t − η_t ∇f(y_t)
    x_{t+1} = x_t − η_t [(1 − λ) ∇f(x̃_t) + λ ∇f(y_{t+1})]

Both points depend only on ``x_t`` and ``∇f(y_t)`` (known at the start of the step), so
``∇f(x̃_t)`` and ``∇f(y_{t+1})`` can be computed at once; ``∇f(y_{t+1})`` is kept for the next
step's perturbation. ``λ = 0`` is plain SAMPa, ``λ > 0`` is SAMPa-λ; the paper's experiments and
the official code use ``ρ = 0.1`` (CIFAR), ``λ = 0.2``. Like the official code, ``∇f(y_0) = 0``:
the first step takes both gradients at ``x_0`` (``x̃_0 = y_1 = x_0``). A non-finite
``∇f(y_{t+1})`` is skipped: not kept (the last finite ``∇f(y)`` stays), and that step's update is
``∇f(x̃_t)`` alone.

The rule is written once here and runs on both fronts (:class:`sharpness.SAMPa` over torch
tensors, :class:`sharpness.numpy.SAMPa` over numpy arrays): its first gradient is taken at ``y``,
so its step starts with the fronts' ``begin_step()`` (:meth:`Method._begin_step`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from sharpness._validation import number
from sharpness.methods import NORM_EPS
from sharpness.methods.base import Method, Phase, restored_on_failure
from sharpness.methods.contract import Engine

__all__ = ["SAMPa"]

_GY = "sampa_grad_y"  # ∇f(y_t), one of the method's vectors (checkpointed)


def _perturbation_scale(group: dict[str, Any], norm: float) -> float:
    """``ρ/(‖∇f(y)‖ + ε)`` for the group, negated where it maximizes (SAM on ``−f``)."""
    scale = group["sam_rho"] / (norm + NORM_EPS)
    return -scale if group.get("maximize", False) else scale


def _y_scale(group: dict[str, Any]) -> float:
    """``−lr`` (``+lr`` where the group maximizes): ``y_{t+1} = x_t − lr·∇f(y_t)``."""
    lr = float(group["lr"])
    return lr if group.get("maximize", False) else -lr


class SAMPa(Method):
    r"""SAMPa (Xie, Pethick, Cevher, NeurIPS 2024, arXiv:2410.10683) around any base optimizer.

    One step, with ``gy = ∇f(y_t)`` kept from the previous step (zero before the first)::

        y_{t+1} = x_t − lr·gy                      # weights moved here; 1st forward/backward
        x̃_t     = x_t + ρ·gy/(‖gy‖ + 1e-12)        # weights moved here; 2nd forward/backward
        d       = (1 − λ)·∇f(x̃_t) + λ·∇f(y_{t+1})
        x_{t+1} = base_step(x_t, d)                # from the exact saved x_t
        gy      ← ∇f(y_{t+1})

    **Which weights the gradient function sees.** ``step(closure)`` (numpy: ``step(grad_fn)``)
    calls it twice: first with the parameters holding ``y_{t+1}``, then holding ``x̃_t`` (the
    order is free since the two gradients are independent; this one needs only two extra
    buffers, ``x_t`` and ``gy``). After the step the parameters hold ``x_{t+1}`` exactly (``x_t``
    comes back from a saved copy, never by subtracting). ``step(closure, closure_y)`` calls
    ``closure_y`` at ``y_{t+1}`` and ``closure`` at ``x̃_t`` (numpy: ``step(grad_fn, grad_fn_y)``):
    the official code takes ``∇f(x̃_t)`` on the batch that gave ``∇f(y_t)`` (the previous one)
    and ``∇f(y_{t+1})`` on the new batch, which two functions express. Returns the loss of the
    first call (at ``y_{t+1}``).

    **Three-call API**: ``begin_step()`` moves the weights to ``y_{t+1}``; after a backward,
    ``first_step()`` (numpy: ``first_step(grads_at_y)``) keeps ``∇f(y_{t+1})`` and moves them to
    ``x̃_t``; after a second backward, ``second_step()`` (numpy: ``second_step(grads_at_x̃)``)
    combines the gradients and takes the base step from ``x_t``. (torch: ``step()`` without a
    closure completes a pending ``first_step()``.) ``restore()`` puts ``x_t`` back at any point.

    **Base optimizers other than plain SGD.** The paper states SAMPa for SGD. Here the combined
    gradient ``d`` is what the base optimizer receives in ``p.grad``: its momentum, weight decay,
    Adam moments... all see ``d``, exactly as SAM's base step sees ``∇f(w + e)``. The auxiliary
    point is always the paper's plain gradient step ``y_{t+1} = x_t − lr·∇f(y_t)`` with each
    group's current ``lr`` (``+lr`` for ``maximize=True`` groups), whatever the base optimizer:
    no momentum, decay or preconditioning enters ``y``. (The official code, for SGD with
    momentum, also adds the momentum buffer and the weight decay to that step; that is not done
    here.) With SGD without momentum or decay this is the paper's algorithm exactly.

    **Perturbation.** The norm is global over the groups with ``sam_rho > 0`` (per-group
    ``rho`` as in :class:`~sharpness.SAM`; a group with ``rho = 0`` is not perturbed but still
    takes ``y``'s step and the combined gradient). ``‖∇f(y)‖`` is measured when ``∇f(y)``
    arrives (``last_grad_norm``) and kept in ``sam_state["grad_y_norm"]``. ``ρ = 0`` and
    ``λ = 0`` is the base optimizer with the gradient at ``x_t``, though each step still computes
    the (unused) gradient at ``y``.

    **Non-finite gradients.** A ``∇f(y_{t+1})`` with an inf/NaN (its norm not finite) is
    skipped, never kept: ``∇f(y_t)`` (the last finite one; zero before any) stays for the next
    step's ``y`` and ``x̃``, this step's update is ``d = ∇f(x̃_t)`` (the ``λ`` term dropped), and
    ``stats["nonfinite_skips"]`` counts it. ``x̃_t`` was built from the finite ``∇f(y_t)`` and
    stays as it is. The next finite ``∇f(y)`` is kept and the formula resumes. A non-finite
    ``∇f(x̃_t)`` is, like SAM's second gradient, handed to the base optimizer inside ``d`` as it
    is (a GradScaler skips that step; see below); ``∇f(y_{t+1})``, if finite, is kept all the
    same. So the kept ``∇f(y)`` never holds an inf/NaN.

    **Parallel gradients.** On one device the two gradients run one after the other, as here.
    Across two devices (the official code: DDP with two ranks, one point each, the gradients
    summed with weights ``1 − λ`` and ``λ`` by one all-reduce) or two CUDA streams, the two
    forward/backward passes overlap: the design would keep ``x̃_t`` and ``y_{t+1}`` in two weight
    buffers (two model replicas sharing the module structure), run each pass on its own stream,
    and join on an event before the combination ``d`` and the base step, which run on the main
    stream. This is not implemented: the single-stream order above computes the same numbers.

    **GradScaler** (torch front). ``∇f(y)`` outlives the step, so it must be kept unscaled: give
    the scaler to ``first_step`` (without it ``scaler.step(opt)`` refuses the step after restoring
    ``x_t``)::

        opt.begin_step()
        scaler.scale(loss_fn(model(x), y)).backward()          # ∇f(y_{t+1}), scaled
        if opt.first_step(zero_grad=True, grad_scaler=scaler):   # unscaled, kept; weights at x̃_t
            scaler.scale(loss_fn(model(x), y)).backward()      # ∇f(x̃_t), scaled
        scaler.step(opt)                                       # d, base step from x_t; or skip
        scaler.update()
        opt.zero_grad()

    An inf/NaN in ``∇f(x̃_t)`` skips the step (``x_t`` restored, no base step;
    ``stats["amp_skipped_steps"]``); ``∇f(y_{t+1})``, finite, is kept all the same. An inf/NaN in
    ``∇f(y_{t+1})`` is not kept: ``first_step`` puts the weights back at ``x_t``, keeps
    ``∇f(y_t)``, leaves the gradient in ``p.grad`` (``zero_grad`` waits) and returns False; the
    scaler finds the inf there, ``scaler.step(opt)`` takes no step and ``update()`` lowers the scale.

    State: ``∇f(y)`` is the method's vector ``"sampa_grad_y"`` (``opt.vectors``), saved in
    ``state_dict()["sam"]["vectors"]`` with its norm in ``["sam"]["state"]``, so a run resumes
    exactly; the saved ``x_t`` only lives during a step.

    Args:
        params, and the front's own arguments: as for :class:`sharpness.SAM` (torch:
            ``base_optimizer``, ``backend``, ``same_noise`` (the first call's random state
            replayed in the second), ``seed`` ...) or :class:`sharpness.numpy.SAM` (``base=`` ...).
            No ``adaptive`` (ASAM) form.
        rho: the radius ``ρ`` (0.1 in the paper's CIFAR experiments).
        lam: ``λ``, the weight of ``∇f(y_{t+1})`` in the update (0.2 in the paper; 0 is SAMPa
            without the optimistic term).

    Example:
        >>> import torch, sharpness
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = sharpness.SAMPa(model.parameters(), torch.optim.SGD, rho=0.1, lam=0.2, lr=0.1)
        >>> x, y = torch.randn(8, 4), torch.randn(8, 2)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> for _ in range(3):
        ...     loss = opt.step(closure)  # the closure runs at y_{t+1}, then at x̃_t

        The numpy front, the same rule::

        >>> import numpy as np, sharpness.numpy
        >>> w = np.zeros(3)
        >>> opt = sharpness.numpy.SAMPa([w], rho=0.1, lam=0.2, lr=0.1)
        >>> grad_fn = lambda p: (float(np.sum((p[0] - 1) ** 2)), [2 * (p[0] - 1)])
        >>> losses = [opt.step(grad_fn) for _ in range(50)]
        >>> bool(losses[-1] < losses[0])
        True
    """

    needs_unscaled_first_gradient = "∇f(y) is kept from one step to the next and would stay scaled"
    #: ``step(fn, fn_y)``: the gradient function at ``y`` (default ``fn``, which then gives both).
    step_functions = ("fn_y",)

    def __init__(self, *args: Any, rho: float = 0.1, lam: float = 0.2, **kwargs: Any) -> None:
        self.lam = number("lam", lam, minimum=0, maximum=1)
        rho = number("rho", rho, minimum=0)  # by its name here (the fronts check their group key sam_rho)
        super().__init__(*args, rho=rho, **kwargs)
        self.sam_state["grad_y_norm"] = 0.0
        self.sam_state["have_grad_y"] = False
        self._grad_y_kept = True  # whether this step's ∇f(y_{t+1}) was finite (and kept)

    def _setup_group(self, group: dict[str, Any]) -> None:
        if group["sam_adaptive"]:
            raise ValueError("SAMPa has no adaptive (ASAM) form here: its perturbation is ρ∇f(y)/‖∇f(y)‖")

    def _checkpointed_vectors(self) -> tuple[str, ...]:
        return (_GY,)

    def _first_gradient_function(self, fn: Any, more: tuple[Any, ...]) -> Any:
        return more[0] if more and more[0] is not None else fn

    def _begin_step(self, engines: Sequence[Engine]) -> None:
        """Saves ``x_t`` and moves the weights to ``y_{t+1} = x_t − lr·∇f(y_t)``."""
        for engine in engines:
            engine.save_weights()
        if self.sam_state["have_grad_y"] and math.isfinite(self.sam_state["grad_y_norm"]):
            scales = {gi: _y_scale(group) for gi, group in enumerate(self.param_groups)}
            for engine in engines:
                engine.weights_from_backup(_GY, scales, self.vectors)

    def _perturb(self, engines: Sequence[Engine], norm: float) -> None:
        """With ``∇f(y_{t+1})`` in ``"grads"`` (``norm`` its norm, finite or not): the weights to
        ``x̃_t = x_t + ρ∇f(y_t)/‖∇f(y_t)‖`` from the saved ``x_t``, then ``∇f(y_{t+1})`` kept in
        place of ``∇f(y_t)`` when finite."""
        old_norm = self.sam_state["grad_y_norm"]
        scales: dict[int, float] = {}
        if self.sam_state["have_grad_y"]:
            if math.isfinite(old_norm):
                scales = {gi: _perturbation_scale(group, old_norm) for gi, group in enumerate(self.param_groups)}
            else:  # only from a state saved before non-finite ∇f(y) were refused
                self.stats["nonfinite_skips"] += 1
        for engine in engines:
            engine.weights_from_backup(_GY, scales, self.vectors)
        # A non-finite ∇f(y_{t+1}) is skipped (class docstring): kept, it would send every later
        # y and x̃ to NaN. ∇f(y_t) stays for the next step; this step's d is ∇f(x̃_t) alone.
        self._grad_y_kept = math.isfinite(norm)
        if self._grad_y_kept:
            for engine in engines:
                engine.copy("grads", _GY, self.vectors)
            self.sam_state["grad_y_norm"] = norm
            self.sam_state["have_grad_y"] = True
        else:
            self.stats["nonfinite_skips"] += 1

    def _perturb_or_skip(self, engines: Sequence[Engine], norm: float) -> Phase:
        # x̃_t comes from ∇f(y_t), known before this gradient: it is taken whatever ‖∇f(y_{t+1})‖ is.
        with restored_on_failure(engines):
            self._perturb(engines, norm)
        return Phase.PERTURBED

    def _before_base_step(self, engines: Sequence[Engine]) -> None:
        if self.lam != 0.0 and self._grad_y_kept:
            for engine in engines:  # grads ← λ·∇f(y_{t+1}) + (1 − λ)·∇f(x̃_t)
                engine.axpby(_GY, "grads", self.lam, 1.0 - self.lam, self.vectors)
