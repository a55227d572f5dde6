"""AE-SAM over lists of numpy arrays: SAM only on the steps whose gradient looks sharp.

Jiang, Yang, Zhang, Kwok, "An Adaptive Policy to Employ Sharpness-Aware Minimization", ICLR 2023
(arXiv:2304.14647); the same rule as :class:`sharpness.AESAM` (see :mod:`sharpness.optim.aesam`),
on top of the numpy :class:`~sharpness.numpy.SAM`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from sharpness import _core
from sharpness.methods.aesam import VAR_INIT, check_aesam_args, threshold_coefficient
from sharpness.numpy.sam import SAM

__all__ = ["AESAM"]


class AESAM(SAM):
    r"""AE-SAM (Jiang et al., ICLR 2023) over a list of numpy arrays, updated in place.

    Each step, with ``x = ‖g‖²`` the squared norm SAM perturbs with (``‖T g‖²`` for ASAM)::

        μ  ← δ μ + (1−δ) x;   σ² ← δ σ² + (1−δ)(x − μ)²      (μ₀ = 0, σ²₀ = 1e−10, every step)
        c  = (t/T) λ₁ + (1 − t/T) λ₂                           (t/T held at 1 after T steps)
        x ≥ μ + c σ ?  a SAM step  :  the plain base step with g (one gradient)

    Args:
        params, rho, adaptive, eta, base, **base_kwargs: as for :class:`sharpness.numpy.SAM`.
        total_steps: ``T``, the steps the schedule of ``c_t`` spans.
        delta: the rate ``δ`` of the moving averages (paper: 0.9).
        lambda1: ``c_T``, the coefficient at the end of the run (paper: −1).
        lambda2: ``c_0``, the coefficient at the start (paper: 1).

    :meth:`first_step` returns whether a second gradient is due: ``False`` means it has already
    taken the whole plain step; ``True`` means the weights are at ``w + e`` and
    :meth:`second_step` must follow. ``step(grad_fn)`` handles both. ``μ``, ``σ²`` and the
    number of SAM steps are in :meth:`state_dict` (under ``"aesam"``).

    Example:
        >>> import numpy as np
        >>> from sharpness.numpy import AESAM
        >>> rng = np.random.default_rng(0)
        >>> X, y = rng.normal(size=(64, 3)), rng.normal(size=64)
        >>> w = np.zeros(3)
        >>> def grad_fn(params):
        ...     (w,) = params
        ...     r = X @ w - y
        ...     return 0.5 * np.mean(r**2), [X.T @ r / len(y)]
        >>> opt = AESAM([w], total_steps=100, rho=0.05, base="sgd", lr=0.1, momentum=0.9)
        >>> for _ in range(100):
        ...     loss = opt.step(grad_fn)   # grad_fn runs twice on SAM steps, once otherwise
        >>> 0 < opt.sam_steps < 100
        True
    """

    def __init__(
        self,
        params: Sequence[np.ndarray],
        total_steps: int,
        delta: float = 0.9,
        lambda1: float = -1.0,
        lambda2: float = 1.0,
        **kwargs: Any,
    ) -> None:
        total_steps, delta, lambda1, lambda2 = check_aesam_args(total_steps, delta, lambda1, lambda2)
        super().__init__(params, **kwargs)
        self.total_steps = total_steps
        self.delta = delta
        self.lambda1 = lambda1
        self.lambda2 = lambda2
        self.mu = 0.0
        self.var = VAR_INIT
        #: Steps that took the SAM update.
        self.sam_steps = 0

    def _norm(self, grads: Sequence[np.ndarray]) -> float:
        by_group = self._grads_by_group(grads)
        hp = self.hyperparams
        if hp["adaptive"]:
            sumsq = sum(
                _core.sum_of_squares_adaptive(grp.params, g, hp["eta"]) for grp, g in zip(self._groups, by_group)
            )
        else:
            sumsq = sum(_core.sum_of_squares(g) for g in by_group)
        return math.sqrt(sumsq) if sumsq >= 0 else math.nan

    def _due(self, norm: float) -> bool:
        d, x = self.delta, norm * norm
        self.mu = d * self.mu + (1.0 - d) * x
        self.var = d * self.var + (1.0 - d) * (x - self.mu) ** 2
        c = threshold_coefficient(self._step, self.total_steps, self.lambda1, self.lambda2)
        return x >= self.mu + c * math.sqrt(self.var)

    def first_step(self, grads: Sequence[np.ndarray]) -> bool:  # type: ignore[override]
        """Decide from ``g = grads``: either move to ``w + e`` (returns True; call
        :meth:`second_step` with the gradients there) or take the plain base step (returns False)."""
        if self._perturbed:
            raise RuntimeError(
                "first_step called twice: the weights are already perturbed; "
                "call second_step(grads) to restore them and take the base step"
            )
        norm = self._norm(grads)
        if math.isfinite(norm) and not self._due(norm):
            for grp in self._groups:  # backups <- weights: second_step is then the plain step
                _core.restore(grp.backups, grp.params)
            self._perturbed = True
            self.second_step(grads)
            return False
        if math.isfinite(norm):
            self.sam_steps += 1
        super().first_step(grads)  # non-finite: no perturbation, second_step is the base step
        return True

    def step(self, grad_fn: Callable[[list[np.ndarray]], tuple[Any, Sequence[np.ndarray]]]) -> Any:
        """One step: ``grad_fn(params) -> (loss, grads)`` runs at ``w``, and again at ``w + e``
        on SAM steps. Returns the loss at ``w``."""
        loss, grads = self._call(grad_fn)
        if not self.first_step(grads):
            return loss
        try:
            _, grads = self._call(grad_fn)
            self.second_step(grads)
        except BaseException:
            if self._perturbed:
                self._undo()
            raise
        return loss

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["aesam"] = {"mu": self.mu, "var": self.var, "sam_steps": self.sam_steps}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        aesam = state_dict.pop("aesam", None)
        if not isinstance(aesam, dict) or not {"mu", "var", "sam_steps"} <= set(aesam):
            raise ValueError("state_dict lacks AE-SAM's statistics ('aesam': mu, var, sam_steps)")
        super().load_state_dict(state_dict)
        self.mu = float(aesam["mu"])
        self.var = float(aesam["var"])
        self.sam_steps = int(aesam["sam_steps"])

    def __repr__(self) -> str:
        return "AE" + super().__repr__() + f"[T={self.total_steps}, delta={self.delta}, lambda=({self.lambda1}, {self.lambda2})]"
