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
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from sharpness._validation import number
from sharpness.backends._common import scale_of
from sharpness.optim.sam import SAM, _RandomState

_GY = "sampa_grad_y"  # ∇f(y_t), in the optimizer state (checkpointed)

_HOW_TO_CALL = (
    "call SAMPa either with a closure, `optimizer.step(closure)` (the closure zeroes the gradients, "
    "runs the forward and backward passes and returns the loss; it runs at y_{t+1}, then at x̃_t), "
    "or in three calls: `optimizer.begin_step(); loss_fn(model(x), y).backward(); "
    "optimizer.first_step(zero_grad=True); loss_fn(model(x), y).backward(); optimizer.second_step(zero_grad=True)`"
)


class SAMPa(SAM):
    r"""SAMPa (Xie, Pethick, Cevher, NeurIPS 2024, arXiv:2410.10683) around any base optimizer.

    One step, with ``gy = ∇f(y_t)`` kept from the previous step (zero before the first)::

        y_{t+1} = x_t − lr·gy                      # weights moved here; 1st forward/backward
        x̃_t     = x_t + ρ·gy/(‖gy‖ + 1e-12)        # weights moved here; 2nd forward/backward
        d       = (1 − λ)·∇f(x̃_t) + λ·∇f(y_{t+1})
        x_{t+1} = base_step(x_t, d)                # from the exact saved x_t
        gy      ← ∇f(y_{t+1})

    **Which weights the closure sees.** ``step(closure)`` calls the closure twice: first with
    the model's parameters holding ``y_{t+1}``, then holding ``x̃_t`` (the order is free since
    the two gradients are independent; this one needs only two extra buffers, ``x_t`` and
    ``gy``). After the step the parameters hold ``x_{t+1}`` exactly (``x_t`` comes back from a
    saved copy, never by subtracting). ``step(closure, closure_y)`` calls ``closure_y`` at
    ``y_{t+1}`` and ``closure`` at ``x̃_t``: the official code takes ``∇f(x̃_t)`` on the batch
    that gave ``∇f(y_t)`` (the previous one) and ``∇f(y_{t+1})`` on the new batch, which two
    closures express. Returns the loss of the first call (at ``y_{t+1}``).

    **Three-call API** (no closure): ``begin_step()`` moves the weights to ``y_{t+1}``; after a
    backward, ``first_step()`` keeps ``∇f(y_{t+1})`` and moves them to ``x̃_t``; after a
    second backward, ``second_step()`` combines the gradients and takes the base step from
    ``x_t``. (``step()`` without a closure completes a pending ``first_step()``.)

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
    arrives and kept in ``sam_state["grad_y_norm"]``. ``ρ = 0`` and ``λ = 0`` is the base
    optimizer with the gradient at ``x_t``, though each step still computes the (unused) gradient
    at ``y``.

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

    **GradScaler.** ``∇f(y)`` outlives the step, so it must be kept unscaled: give the scaler to
    :meth:`first_step` (without it ``scaler.step(opt)`` refuses the step after restoring ``x_t``)::

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

    State: ``state[p]["sampa_grad_y"]`` (``∇f(y_{t+1})``) is in ``state_dict()``, so a run
    resumes exactly; the saved ``x_t`` only lives during a step.

    Args:
        params, base_optimizer, backend, same_noise, seed, **base_kwargs: as for
            :class:`sharpness.SAM` (``same_noise`` replays the first call's random state in the
            second call).
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
    """

    needs_unscaled_first_gradient = "∇f(y) is kept from one step to the next and would stay scaled"

    def __init__(
        self, params: Any, base_optimizer: Any, rho: float = 0.1, lam: float = 0.2, **kwargs: Any
    ) -> None:
        lam = number("lam", lam, minimum=0, maximum=1)
        if kwargs.get("adaptive"):
            raise ValueError("SAMPa has no adaptive (ASAM) form here")
        self.lam = lam
        super().__init__(params, base_optimizer, rho=rho, **kwargs)
        self.sam_state["grad_y_norm"] = 0.0
        self.sam_state["have_grad_y"] = False
        self._grad_y_kept = True  # whether this step's ∇f(y_{t+1}) was finite (and kept)

    # -- the three phases --------------------------------------------------------------------------

    @torch.no_grad()
    def begin_step(self) -> None:
        """Saves ``x_t`` and moves the weights to ``y_{t+1} = x_t − lr·∇f(y_t)``. Step pre-hooks
        run here."""
        if self._pending is not None:
            raise RuntimeError("begin_step() while a step is pending; " + _HOW_TO_CALL)
        if not self._in_step:
            self._pre_hooks((), {})
        self._first_step_scaled = False
        engines = self._begin()
        for engine in engines:
            engine.save_weights()
        if self.sam_state["have_grad_y"] and math.isfinite(self.sam_state["grad_y_norm"]):
            scales = {gi: self._y_scale(group) for gi, group in enumerate(self.param_groups)}
            for engine in engines:
                engine.weights_from_backup(_GY, scales, self.state)
        self._pending = "at_y"

    @staticmethod
    def _y_scale(group: dict[str, Any]) -> float:
        lr = float(group["lr"])
        return lr if group.get("maximize", False) else -lr

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, grad_scaler: Any = None) -> bool:
        """With ``∇f(y_{t+1})`` in ``p.grad``: keeps it (for the next step and for ``d``) and
        moves the weights to ``x̃_t = x_t + ρ∇f(y_t)/‖∇f(y_t)‖``. Returns True: a second
        backward and :meth:`second_step` must follow. A non-finite ``∇f(y_{t+1})`` is not kept:
        ``∇f(y_t)`` stays and the step's ``d`` is ``∇f(x̃_t)`` alone (counted in
        ``stats["nonfinite_skips"]``). With ``grad_scaler`` (the GradScaler that scaled the loss),
        ``∇f(y_{t+1})`` is unscaled first; if it is not finite it is not kept, and False is
        returned: the step is left to ``scaler.step(opt)``, which skips it (see the class
        docstring)."""
        if self._pending != "at_y":
            raise RuntimeError("first_step() needs begin_step() and a backward at y before it; " + _HOW_TO_CALL)
        engines = self._begin()
        self._first_step_scaled = grad_scaler is not None
        self._unscale_first_gradient(engines, grad_scaler)
        new_norm = math.sqrt(sum(engine.sum_of_squares(self.param_groups) for engine in engines))
        if grad_scaler is not None and not math.isfinite(new_norm):
            # An overflow at y: keep ∇f(y_t), back to x_t, no update. The gradient stays in p.grad,
            # where scaler.step(opt) finds the inf (so that update() lowers the scale).
            for engine in engines:
                engine.restore()
            self.last_grad_norm = new_norm
            self._pending = "skip_step"
            self._deferred_zero_grad = zero_grad
            return False
        old_norm = self.sam_state["grad_y_norm"]
        scales: dict[int, float] = {}
        if self.sam_state["have_grad_y"]:
            if math.isfinite(old_norm):
                scales = {gi: scale_of(group, old_norm) for gi, group in enumerate(self.param_groups)}
            else:  # only from a state saved before non-finite ∇f(y) were refused
                self.stats["nonfinite_skips"] += 1
        for engine in engines:
            engine.weights_from_backup(_GY, scales, self.state)
        # A non-finite ∇f(y_{t+1}) is skipped (class docstring): kept, it would send every later
        # y and x̃ to NaN. ∇f(y_t) stays for the next step; this step's d is ∇f(x̃_t) alone.
        self._grad_y_kept = math.isfinite(new_norm)
        if self._grad_y_kept:
            for engine in engines:
                engine.copy("grads", _GY, self.state)
            self.sam_state["grad_y_norm"] = new_norm
            self.sam_state["have_grad_y"] = True
        else:
            self.stats["nonfinite_skips"] += 1
        self.last_grad_norm = new_norm
        self._pending = "perturbed"
        if zero_grad:
            self.zero_grad()
        return True

    def second_step(self, zero_grad: bool = False) -> None:
        """With ``∇f(x̃_t)`` in ``p.grad``: ``d = (1−λ)∇f(x̃_t) + λ∇f(y_{t+1})``, the weights back
        to ``x_t`` and the base step with ``d``."""
        if self._pending == "at_y":
            raise RuntimeError("second_step() needs first_step() before it; " + _HOW_TO_CALL)
        super().second_step(zero_grad)

    @torch.no_grad()
    def _before_base_step(self, engines: list) -> None:
        if self.lam != 0.0 and self._grad_y_kept:
            for engine in engines:  # grads ← λ·∇f(y_{t+1}) + (1 − λ)·∇f(x̃_t)
                engine.axpby(_GY, "grads", self.lam, 1.0 - self.lam, self.state)

    def _plain_step(self, engines: list, fused: bool = True, synced: bool = False) -> None:
        # torch.optim.Adam initialises a parameter's state when the entry is empty: an entry that
        # holds only ∇f(y) would make it skip that (KeyError 'step'). Hide ours from the base
        # optimizer's own step while it runs (bookkeeping only: the tensors are not touched).
        hidden = {}
        for group in self.param_groups:
            for p in group["params"]:
                entry = self.state.get(p)
                if entry is not None and _GY in entry and len(entry) == 1:
                    hidden[p] = entry.pop(_GY)
        try:
            super()._plain_step(engines, fused, synced)
        finally:
            for p, value in hidden.items():
                self.state[p][_GY] = value

    # -- closure API ----------------------------------------------------------------------------

    @torch.no_grad()
    def step(  # type: ignore[override]
        self, closure: Callable[[], Tensor] | None = None, closure_y: Callable[[], Tensor] | None = None
    ) -> Tensor | None:
        """A whole SAMPa step: ``closure_y`` (default: ``closure``) at ``y_{t+1}``, then
        ``closure`` at ``x̃_t``; returns the first call's loss. Without a closure, completes a
        pending :meth:`first_step`."""
        scaled = self._under_grad_scaler()
        if closure is None:
            if closure_y is not None:
                raise TypeError("closure_y is given without closure")
            if self._pending not in ("perturbed", "skip_step"):
                if scaled:
                    raise RuntimeError("GradScaler.step() needs first_step(grad_scaler=scaler) before it; " + _HOW_TO_CALL)
                raise RuntimeError("step() without a closure needs first_step() before it; " + _HOW_TO_CALL)
            self._complete_step(scaled)
            return None
        if scaled:
            raise RuntimeError("GradScaler.step() cannot run a SAMPa closure; use the three-call API (class docstring)")
        at_y = closure if closure_y is None else closure_y
        return self._hooked_step(closure, lambda at_x: self._sampa_closure_step(at_x, at_y))

    step.hooked = True  # type: ignore[attr-defined]

    def _sampa_closure_step(self, at_x: Callable[[], Tensor], at_y: Callable[[], Tensor]) -> Tensor:
        noise = _RandomState.capture(self._devices()) if self.same_noise else None
        self.begin_step()
        try:
            with torch.enable_grad():
                loss = at_y()
            self.first_step()
            if noise is not None:
                after_first = _RandomState.capture(self._devices())
                noise.restore()
            try:
                with torch.enable_grad():
                    at_x()
            finally:
                if noise is not None:
                    after_first.restore()
        except BaseException:
            self.restore()  # never leave the weights at y or x̃ behind an exception
            raise
        self.second_step()
        return loss

    @torch.no_grad()
    def restore(self) -> bool:
        """Puts ``x_t`` back after :meth:`begin_step` or :meth:`first_step` without a base step
        (after ``first_step``, ``∇f(y_{t+1})`` has already replaced ``∇f(y_t)``)."""
        pending, self._pending = self._pending, None
        if pending in ("at_y", "perturbed"):
            for engine in self.engines():
                engine.restore()
        return pending is not None

    def __repr__(self) -> str:
        return f"SAMPa(lam={self.lam}, backend={self.backend!r}, base={self.base_optimizer!r})"
