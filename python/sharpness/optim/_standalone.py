"""What the methods with an update rule of their own share (LightSAM, AdaSAM, Bayesian SAM).

They keep all of :class:`~sharpness.optim.sam.SAM`'s machinery (parameters re-homed into flat
buffers, the engines' kernels, the weights restored from a saved copy, bit for bit, the two-call
and closure APIs, step hooks, GradScaler, ``state_dict``) and replace the base optimizer by
:class:`OwnUpdate`, an internal ``torch.optim.Optimizer`` that holds the parameter groups and the
per-parameter state (so ``state_dict`` is torch's format and LR schedulers see ``group["lr"]``)
and whose ``step`` hands the update back to the method, run as ``torch._foreach_*`` ops over the
engines' :meth:`group_tensors` (flat-buffer slices on the Rust engine, per-parameter tensors on
the torch engine).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from sharpness._validation import number
from sharpness.optim.sam import SAM, profiled


class OwnUpdate(torch.optim.Optimizer):
    """The "base optimizer" of a method with its own update: groups and state only; its
    :meth:`step` asks the method (``owner``) to update the weights with the gradients in
    ``p.grad`` (taken at the perturbed point; the weights are already restored)."""

    def __init__(self, params: Any, **defaults: Any) -> None:
        super().__init__(params, defaults)
        self._owner: weakref.ref | None = None

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> None:  # type: ignore[override]
        owner = self._owner() if self._owner is not None else None
        if owner is None:
            raise RuntimeError("this optimizer only serves the method that built it; call the method's step()")
        owner._update(owner.engines())


class StandaloneSAM(SAM):
    """SAM's machinery around a method's own update rule (no base optimizer).

    Subclasses implement :meth:`_update` (the step from ``θ`` with the gradient at the perturbed
    point) and, for a perturbation other than SAM's ``ρ g/‖g‖``, :meth:`_ascend`.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        rho: float,
        backend: str = "auto",
        same_noise: bool = True,
        seed: int | None = None,
        **hyper: Any,
    ) -> None:
        super().__init__(params, OwnUpdate, rho=rho, backend=backend, same_noise=same_noise, seed=seed, **hyper)
        self.base_optimizer._owner = weakref.ref(self)  # type: ignore[attr-defined]

    # -- what a method implements ------------------------------------------------------------------

    def _update(self, engines: list) -> None:
        raise NotImplementedError

    def _ascend(self, engines: list) -> bool:
        """Moves the weights to the perturbed point from the gradient in ``p.grad`` (after
        :meth:`save_weights`); returns False (and moves nothing) when the gradient is not finite."""
        raise NotImplementedError

    # -- first half --------------------------------------------------------------------------------

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, grad_scaler: Any = None) -> bool:
        """Moves the weights to the perturbed point using the gradients now in ``p.grad``. A
        non-finite gradient perturbs nothing (``stats["nonfinite_skips"]``); :meth:`second_step`
        then updates with the gradient it is given, as SAM does. ``grad_scaler``: as for
        :meth:`SAM.first_step` (the gradient is unscaled first)."""
        if type(self)._ascend is StandaloneSAM._ascend:
            return super().first_step(zero_grad, grad_scaler)  # SAM's own perturbation ρ·g/‖g‖
        if self._pending is not None:
            raise RuntimeError("first_step() was called twice without second_step() in between")
        if not self._in_step:
            self._pre_hooks((), {"zero_grad": zero_grad})
        self._first_step_scaled = grad_scaler is not None
        self._one_pass_on_scaled = False
        with profiled(f"{type(self).__name__}.first_step"):
            engines = self._begin()
            self._unscale_first_gradient(engines, grad_scaler)
            with self._restored_on_failure(engines):
                ascended = self._ascend(engines)
            if ascended:
                self._pending = "perturbed"
            else:
                self.stats["nonfinite_skips"] += 1
                self._pending = "skipped"
            if zero_grad:
                self.zero_grad()
        return True

    # -- helpers over every engine -----------------------------------------------------------------

    def _sq(self, engines: list, name: str = "grads") -> float:
        """``Σ x²`` of ``"grads"`` or a state vector over every parameter (float64)."""
        return float(sum(engine.dot(name, name, self.state) for engine in engines))

    def _tensors(self, engines: list, names: list[Any], init: dict[str, float] | None = None, every: bool = False):
        """Yields ``(group, lists)``: for each engine and group, one aligned list of tensors per
        name (see the engines' ``group_tensors``)."""
        for engine in engines:
            for gi, lists in engine.group_tensors(names, self.state, init=init, every=every).items():
                yield self.param_groups[gi], lists

    @staticmethod
    def _save(engines: list) -> None:
        for engine in engines:
            engine.save_weights()

    def __repr__(self) -> str:
        defaults = {k: v for k, v in self.defaults.items() if not k.startswith("sam_")}
        return f"{type(self).__name__}(backend={self.backend!r}, defaults={defaults})"


def check_positive(name: str, value: float, allow_zero: bool = True) -> float:
    return number(name, value, minimum=0) if allow_zero else number(name, value, above=0)
