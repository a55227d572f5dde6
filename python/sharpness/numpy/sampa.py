"""SAMPa over lists of numpy arrays (the numpy front of :mod:`sharpness.optim.sampa`).

Xie, Pethick, Cevher, "SAMPa: Sharpness-aware Minimization Parallelized", NeurIPS 2024,
arXiv:2410.10683::

    x̃_t     = x_t + ρ ∇f(y_t)/‖∇f(y_t)‖
    y_{t+1} = x_t − η ∇f(y_t)
    x_{t+1} = x_t − η [(1 − λ) ∇f(x̃_t) + λ ∇f(y_{t+1})]

with ``∇f(y_0) = 0`` (the official code's start). Same rules as the torch front: the combined
gradient feeds the base optimizer (SGD, Adam or AdamW), ``y`` is always the plain step
``x_t − lr·∇f(y_t)``; a non-finite ``∇f(y_{t+1})`` is skipped (not kept; that step's update is
``∇f(x̃_t)`` alone); the same kernels, so with the same gradients both fronts give the same
weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from sharpness import _core
from sharpness._validation import number
from sharpness.methods import NORM_EPS
from sharpness.numpy.sam import SAM, check_params_usable

__all__ = ["SAMPa"]

GradFn = Callable[[list[np.ndarray]], tuple[Any, Sequence[np.ndarray]]]


class SAMPa(SAM):
    """SAMPa (Xie et al., NeurIPS 2024) over a list of numpy arrays, updated in place.

    ``step(grad_fn)`` calls ``grad_fn(params)`` twice: with the arrays holding ``y_{t+1}``,
    then ``x̃_t`` (``step(grad_fn, grad_fn_y)`` uses ``grad_fn_y`` at ``y_{t+1}``); afterwards
    they hold ``x_{t+1}``, from the exact saved ``x_t``. Returns the first call's loss. Three
    calls instead: ``begin_step()``; ``first_step(grads_at_y)``; ``second_step(grads_at_x̃)``.

    Non-finite gradients, as on the torch front: a ``∇f(y_{t+1})`` with an inf/NaN is skipped,
    never kept: ``∇f(y_t)`` (the last finite one; zero before any) stays for the next step's ``y``
    and ``x̃``, this step's update is ``d = ∇f(x̃_t)`` (the ``λ`` term dropped), and
    ``state_dict()["nonfinite_steps"]`` counts it; the next finite ``∇f(y)`` is kept and the
    formula resumes. A non-finite ``∇f(x̃_t)`` goes to the base step inside ``d`` as it is (as
    SAM's second gradient does).

    Args:
        params: as for :class:`~sharpness.numpy.SAM`.
        rho: ``ρ`` (0.1 in the paper).
        lam: ``λ`` in ``[0, 1]`` (0.2 in the paper).
        base, **base_kwargs: the base optimizer, as for :class:`~sharpness.numpy.SAM`.

    Example:
        >>> import numpy as np
        >>> from sharpness.numpy import SAMPa
        >>> rng = np.random.default_rng(0)
        >>> X, y = rng.normal(size=(32, 3)), rng.normal(size=32)
        >>> w = np.zeros(3)
        >>> def grad_fn(params):
        ...     r = X @ params[0] - y
        ...     return 0.5 * np.mean(r**2), [X.T @ r / len(y)]
        >>> opt = SAMPa([w], rho=0.1, lam=0.2, lr=0.1)
        >>> losses = [opt.step(grad_fn) for _ in range(50)]
        >>> bool(losses[-1] < losses[0])
        True
    """

    def __init__(
        self, params: Sequence[np.ndarray], rho: float = 0.1, lam: float = 0.2, base: str = "sgd", **base_kwargs: Any
    ) -> None:
        lam = number("lam", lam, minimum=0, maximum=1)
        if base_kwargs.get("adaptive"):
            raise ValueError("SAMPa has no adaptive (ASAM) form here")
        self.lam = lam
        super().__init__(params, rho=rho, base=base, **base_kwargs)
        self._gy = [np.zeros_like(p) for p in self.params]  # ∇f(y_t)
        self._gy_norm = 0.0
        self._have_gy = False
        self._gy_kept = True  # whether this step's ∇f(y_{t+1}) was finite (and kept)
        self._phase: str | None = None  # None, "at_y" or "at_x"
        self._scratch: list[np.ndarray] | None = None

    def _by_group(self, arrays: list[np.ndarray]) -> list[list[np.ndarray]]:
        return [[arrays[i] for i in grp.index] for grp in self._groups]

    def begin_step(self) -> None:
        """Saves ``x_t`` and moves the arrays to ``y_{t+1} = x_t − lr·∇f(y_t)``."""
        check_params_usable(self.params)
        if self._phase is not None or self._perturbed:
            raise RuntimeError("begin_step called while a step is pending")
        for grp in self._groups:
            _core.restore(grp.backups, grp.params)
        self._perturbed = True
        self._phase = "at_y"
        if self._have_gy and math.isfinite(self._gy_norm):
            lr = self.hyperparams["lr"]
            scale = lr if self.hyperparams["maximize"] else -lr
            if scale != 0.0:
                for grp, gy in zip(self._groups, self._by_group(self._gy)):
                    _core.axpby(gy, grp.params, scale, 1.0)

    def first_step(self, grads: Sequence[np.ndarray]) -> float:
        """With ``grads = ∇f(y_{t+1})``: keeps them and moves the arrays to ``x̃_t``. Returns
        ``‖∇f(y_{t+1})‖``, the norm the next step's perturbation is scaled by; when it is not
        finite (inf or nan) the gradients are not kept (class docstring)."""
        if self._phase != "at_y":
            raise RuntimeError("first_step needs begin_step() (and the gradients at y) before it; or use step(grad_fn)")
        by_group = self._grads_by_group(grads)
        sumsq = sum(_core.sum_of_squares(g) for g in by_group)
        new_norm = math.sqrt(sumsq) if sumsq >= 0 else math.nan
        scale = 0.0
        if self._have_gy:
            if math.isfinite(self._gy_norm):
                scale = self.hyperparams["rho"] / (self._gy_norm + NORM_EPS)
                if self.hyperparams["maximize"]:
                    scale = -scale
            else:  # only from a state saved before non-finite ∇f(y) were refused
                self._nonfinite += 1
        # A non-finite ∇f(y_{t+1}) is skipped (class docstring): kept, it would send every later
        # y and x̃ to NaN. ∇f(y_t) stays for the next step; this step's d is ∇f(x̃_t) alone.
        self._gy_kept = math.isfinite(new_norm)
        gy_groups = self._by_group(self._gy)
        for grp, gy, g in zip(self._groups, gy_groups, by_group):
            _core.restore(grp.params, grp.backups)
            if scale != 0.0:
                _core.axpby(gy, grp.params, scale, 1.0)
            if self._gy_kept:
                _core.restore(gy, g)
        if self._gy_kept:
            self._gy_norm = new_norm
            self._have_gy = True
        else:
            self._nonfinite += 1
        self._phase = "at_x"
        return new_norm

    def second_step(self, grads: Sequence[np.ndarray]) -> None:
        """With ``grads = ∇f(x̃_t)``: the base step from ``x_t`` with
        ``(1 − λ)∇f(x̃_t) + λ∇f(y_{t+1})`` (written to a scratch buffer, not into ``grads``)."""
        if self._phase != "at_x":
            raise RuntimeError("second_step needs first_step(grads_at_y) before it; or use step(grad_fn)")
        by_group = self._grads_by_group(grads)
        if self.lam != 0.0 and self._gy_kept:
            if self._scratch is None:
                self._scratch = [np.empty_like(p) for p in self.params]
            direction = self._by_group(self._scratch)
            for d, g, gy in zip(direction, by_group, self._by_group(self._gy)):
                _core.restore(d, g)
                _core.axpby(gy, d, self.lam, 1.0 - self.lam)
            by_group = direction
        self._base_step(by_group, from_backup=True)
        self._perturbed = False
        self._phase = None

    def step(self, grad_fn: GradFn, grad_fn_y: GradFn | None = None) -> Any:  # type: ignore[override]
        """One SAMPa step; ``grad_fn_y`` (default ``grad_fn``) at ``y_{t+1}``, then ``grad_fn``
        at ``x̃_t``. On an exception the arrays go back to ``x_t``."""
        self.begin_step()
        try:
            loss, grads_y = self._call(grad_fn if grad_fn_y is None else grad_fn_y)
            self.first_step(grads_y)
            _, grads_x = self._call(grad_fn)
        except BaseException:
            self._undo()
            raise
        self.second_step(grads_x)
        return loss

    def _undo(self) -> None:
        super()._undo()
        self._phase = None

    def state_dict(self) -> dict[str, Any]:
        """:meth:`SAM.state_dict` plus ``"sampa"``: ``∇f(y)`` (copies), its norm and whether it
        exists yet."""
        sd = super().state_dict()
        sd["sampa"] = {
            "grad_y": [g.copy() for g in self._gy],
            "grad_y_norm": self._gy_norm,
            "have_grad_y": self._have_gy,
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._phase is not None:
            raise RuntimeError("load_state_dict called in the middle of a step")
        state_dict = dict(state_dict)
        extra = state_dict.pop("sampa", None)
        if extra is None:
            raise ValueError("state_dict lacks 'sampa' (it was not made by a SAMPa)")
        gy = extra["grad_y"]
        if len(gy) != len(self.params) or any(
            not isinstance(v, np.ndarray) or v.shape != p.shape or v.dtype != p.dtype for v, p in zip(gy, self.params)
        ):
            raise ValueError("state_dict['sampa']['grad_y'] does not match the parameters")
        super().load_state_dict(state_dict)
        for dst, src in zip(self._gy, gy):
            np.copyto(dst, src)
        self._gy_norm = float(extra["grad_y_norm"])
        self._have_gy = bool(extra["have_grad_y"])

    def __repr__(self) -> str:
        return f"SAMPa(lam={self.lam}, " + super().__repr__().split("(", 1)[1]
