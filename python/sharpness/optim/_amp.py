"""The torch front under ``torch.amp.GradScaler``: unscaling the first gradient for the rules
that need it, the step ``GradScaler.step(opt)`` hands over (``_step_supports_amp_scaling``), and
the refusals that keep the weights at ``w`` when a step cannot be taken (docs/guide.md, "Mixed
precision with GradScaler")."""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import Tensor

from sharpness.methods.base import Phase
from sharpness.optim._profiling import profiled

AMP_HOW_TO_CALL = (
    "with a GradScaler call `scaler.scale(loss).backward(); "
    "if optimizer.first_step(zero_grad=True, grad_scaler=scaler): "
    "scaler.scale(loss_fn(model(x), y)).backward(); scaler.step(optimizer); scaler.update(); optimizer.zero_grad()`"
)


class GradScalerSupport:
    """Mixed into :class:`sharpness.optim.SAM`: everything it does for a GradScaler."""

    # What SAM provides (declared for type checkers).
    _pending: Phase | None
    _deferred_zero_grad: bool
    _first_step_scaled: bool
    _one_pass_on_scaled: bool
    _in_step: bool
    stats: Counter
    grad_scaler_unsupported: str
    needs_unscaled_first_gradient: str
    found_inf: Tensor
    engines: Any
    restore: Any
    second_step: Any
    zero_grad: Any
    _plain_step: Any
    _finish_step: Any
    _post_hooks: Any

    # GradScaler.step(opt) hands the step to an optimizer with this flag instead of unscaling and
    # skipping it itself: it sets `found_inf` (and `grad_scale`, None after `scaler.unscale_(opt)`)
    # and calls `opt.step()`. SAM then restores the weights whatever happens, so a skipped step
    # never leaves them perturbed.
    _step_supports_amp_scaling = True

    @staticmethod
    def _scaler_scale(grad_scaler: Any) -> Tensor | None:
        """The scaler's current scale as a float32 tensor (on its device: no host sync where
        torch exposes it), or None for no scaler or a disabled one."""
        if grad_scaler is None or not getattr(grad_scaler, "is_enabled", lambda: True)():
            return None
        get_async = getattr(grad_scaler, "_get_scale_async", None)
        scale = get_async() if get_async is not None else None
        if not isinstance(scale, Tensor):
            scale = torch.tensor(float(grad_scaler.get_scale()), dtype=torch.float32)
        return scale.float()

    def _unscale_first_gradient(self, engines: list, grad_scaler: Any) -> Tensor | None:
        """Divides the gradients in ``p.grad`` by ``grad_scaler``'s scale, exactly as
        ``GradScaler.unscale_`` does (times the float32 reciprocal); returns the scale (None when
        there is nothing to unscale)."""
        scale = self._scaler_scale(grad_scaler)
        if scale is not None:
            self._multiply_grads(engines, scale.double().reciprocal().float(), begin=False)
        return scale

    def _multiply_grads(self, engines: list, factor: Tensor, begin: bool = True) -> None:
        """``p.grad ← factor·p.grad`` for every gradient (``factor`` a 0-d float32 tensor)."""
        for engine in engines:
            if begin:
                engine.begin()  # re-attach any gradient view replaced since
            engine.multiply_grads(factor)

    def _finish_deferred(self, zero_grad: bool) -> None:
        """Completes a step that first_step left for ``GradScaler.step``: the one-pass base step
        with the (unscaled) direction in ``p.grad``, or no update at all for ``"skip_step"``."""
        pending, self._pending = self._pending, None
        zero_grad = zero_grad or self._deferred_zero_grad
        self._deferred_zero_grad = False
        if pending == "skip_step":
            self._skipped_by_amp(zero_grad)
            return
        with profiled(f"{type(self).__name__}.second_step"):
            self._plain_step(self.engines())
        self._finish_step(zero_grad)

    def _skipped_by_amp(self, zero_grad: bool) -> None:
        """A step that takes no update (the GradScaler found inf/NaN): the weights are already
        back at ``w``; the step count, the base optimizer's state and the method's step-end
        state stay as they are."""
        self.stats["amp_skipped_steps"] += 1
        if zero_grad:
            self.zero_grad()
        if not self._in_step:
            self._post_hooks((), {})  # the pre-hooks ran in first_step

    def _under_grad_scaler(self) -> bool:
        """Whether ``GradScaler.step()`` is calling :meth:`step` (it sets ``found_inf``). A method
        that cannot run under a scaler, or a step whose first gradient the rule needed unscaled but
        that :meth:`first_step` took without ``grad_scaler=``, is refused here, after restoring
        ``w``."""
        if getattr(self, "found_inf", None) is None:
            return False
        name = type(self).__name__
        if self.grad_scaler_unsupported:
            self._refuse_grad_scaler(
                f"{name} does not support torch.amp.GradScaler: {self.grad_scaler_unsupported}; "
                "use bfloat16 autocast (no scaler)"
            )
        if self._pending is not None and not self._first_step_scaled and self.needs_unscaled_first_gradient:
            self._refuse_grad_scaler(
                f"{name} under torch.amp.GradScaler needs the scaler in first_step(): "
                f"{self.needs_unscaled_first_gradient}. Pass it: `opt.first_step(zero_grad=True, grad_scaler=scaler)` "
                "(this step was not taken; the weights are restored)"
            )
        if self._pending is None and self._one_pass_on_scaled:
            self._one_pass_on_scaled = False
            self._refuse_grad_scaler(
                f"{name}.first_step() took a one-pass step on the gradients the GradScaler had scaled "
                "(it was not given the scaler); pass it: `opt.first_step(zero_grad=True, grad_scaler=scaler)` "
                "leaves that step to scaler.step(opt)"
            )
        return True

    def _refuse_grad_scaler(self, message: str) -> None:
        """Raises ``message`` after restoring ``w`` and taking off what ``GradScaler.step`` set on
        the optimizer (it only does so itself after a step that returns)."""
        self.restore()  # never leave the weights perturbed behind the error
        for attr in ("found_inf", "grad_scale"):
            if attr in self.__dict__:
                delattr(self, attr)
        raise RuntimeError(message)

    @torch.no_grad()
    def _scaled_second_step(self) -> None:
        """:meth:`second_step` under ``GradScaler.step``: when the scaler found inf/NaN in the
        gradients (``g̃``, or a one-pass step's direction), ``w`` is restored and no base step is
        taken (the base optimizer's state is untouched); else they are unscaled and the step runs.
        The decision is the scaler's alone (a non-finite first gradient of a SAM step only skipped
        the perturbation), so data-parallel replicas, which see the same reduced ``g̃``, always
        agree on it."""
        if bool(self.found_inf.item()):
            pending = self._pending
            zero_grad = pending in ("one_pass", "skip_step") and self._deferred_zero_grad
            self._deferred_zero_grad = False
            self.restore()
            self._skipped_by_amp(zero_grad)
            return
        grad_scale = getattr(self, "grad_scale", None)
        if grad_scale is not None and self._pending != "skip_step":
            # else `scaler.unscale_(opt)` already unscaled the gradients
            self._multiply_grads(self.engines(), grad_scale.double().reciprocal().float())  # as the scaler's unscale_
        self.second_step()
