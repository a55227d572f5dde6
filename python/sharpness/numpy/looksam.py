"""LookSAM and every-k SAM over lists of numpy arrays (the numpy front of
:mod:`sharpness.optim.looksam`).

Every-k SAM takes a SAM step every ``k`` steps and plain base-optimizer steps in between.
LookSAM (Liu, Mai, Chen, Hsieh, You, "Towards Efficient and Scalable Sharpness-Aware
Minimization", CVPR 2022, arXiv:2203.02714) keeps, on its SAM steps, the part of the SAM
gradient ``g_s = ∇L(w + e)`` orthogonal to the plain gradient ``g``,
``g_v = g_s − (g·g_s/‖g‖²)·g``, and on the steps in between steps with
``g + α·(‖g‖/‖g_v‖)·g_v`` from one gradient. All passes are :mod:`sharpness._core` kernels, one
call per dtype over all arrays.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from sharpness import _core
from sharpness._validation import number
from sharpness.numpy.sam import SAM

__all__ = ["EveryKSAM", "LookSAM"]


def _check_k(k: Any) -> int:
    return number("k", k, minimum=1, integer=True)


class EveryKSAM(SAM):
    """SAM every ``k`` steps (steps ``0, k, 2k, ...``), plain base steps in between; ``k = 1``
    is :class:`~sharpness.numpy.SAM`.

    :meth:`first_step` returns ``‖g‖`` as for SAM; on a step without a second pass it also
    takes the whole (plain) step, and :attr:`perturbed` is False: call :meth:`second_step` only
    when :attr:`perturbed` is True. ``step(grad_fn)`` does this itself.

    Example:
        >>> import numpy as np
        >>> from sharpness.numpy import EveryKSAM
        >>> w = np.zeros(3)
        >>> opt = EveryKSAM([w], k=2, rho=0.05, lr=0.1)
        >>> calls = []
        >>> def grad_fn(params):
        ...     calls.append(1)
        ...     return float(np.sum((params[0] - 1) ** 2)), [2 * (params[0] - 1)]
        >>> for _ in range(4):
        ...     loss = opt.step(grad_fn)
        >>> len(calls)  # 2 + 1 + 2 + 1
        6
    """

    def __init__(self, params: Sequence[np.ndarray], k: int = 2, **kwargs: Any) -> None:
        self.k = _check_k(k)
        super().__init__(params, **kwargs)

    def _second_pass_due(self) -> bool:
        return self._step % self.k == 0

    def _norm(self, by_group: list[list[np.ndarray]]) -> float:
        hp = self.hyperparams
        if hp["adaptive"]:
            sumsq = sum(
                _core.sum_of_squares_adaptive(grp.params, g, hp["eta"]) for grp, g in zip(self._groups, by_group)
            )
        else:
            sumsq = sum(_core.sum_of_squares(g) for g in by_group)
        return math.sqrt(sumsq) if sumsq >= 0 else math.nan

    def first_step(self, grads: Sequence[np.ndarray]) -> float:
        """On a SAM step, as :meth:`SAM.first_step`; otherwise the whole plain step with
        ``grads`` (:attr:`perturbed` stays False). A non-finite norm always goes the SAM way (no
        perturbation, and :meth:`second_step` takes the base step), as the torch front does."""
        if self._perturbed or self._second_pass_due():
            return super().first_step(grads)
        by_group = self._grads_by_group(grads)
        norm = self._norm(by_group)
        if not math.isfinite(norm):
            return super().first_step(grads)
        self._one_pass_step(by_group)
        return norm

    def _one_pass_step(self, by_group: list[list[np.ndarray]]) -> None:
        self._base_step(by_group, from_backup=False)

    def step(self, grad_fn: Callable[[list[np.ndarray]], tuple[Any, Sequence[np.ndarray]]]) -> Any:
        """One step: ``grad_fn(params) -> (loss, grads)`` is called twice on SAM steps, once on
        the others. Returns the first call's loss."""
        loss, grads = self._call(grad_fn)
        self.first_step(grads)
        if not self._perturbed:
            return loss
        try:
            _, grads = self._call(grad_fn)
            self.second_step(grads)
        except BaseException:
            if self._perturbed:
                self._undo()
            raise
        return loss

    def __repr__(self) -> str:
        return f"{type(self).__name__}(k={self.k}, " + super().__repr__().split("(", 1)[1]


class LookSAM(EveryKSAM):
    """LookSAM (Liu et al., CVPR 2022) over numpy arrays: a SAM step every ``k`` steps that
    keeps ``g_v``, and ``g + α‖g‖/‖g_v‖·g_v`` as the base optimizer's gradient in between.
    ``k = 1`` is SAM; ``α = 0`` is every-k SAM. Paper defaults ``k = 5``, ``α = 0.7``.

    ``g_v`` and ``‖g_v‖`` are in :meth:`state_dict` (key ``"looksam"``). The direction of the
    one-gradient steps is written to a scratch buffer: the caller's gradient arrays are never
    modified.

    Example:
        >>> import numpy as np
        >>> from sharpness.numpy import LookSAM
        >>> rng = np.random.default_rng(0)
        >>> X, y = rng.normal(size=(32, 3)), rng.normal(size=32)
        >>> w = np.zeros(3)
        >>> def grad_fn(params):
        ...     r = X @ params[0] - y
        ...     return 0.5 * np.mean(r**2), [X.T @ r / len(y)]
        >>> opt = LookSAM([w], k=5, alpha=0.7, rho=0.05, lr=0.1)
        >>> losses = [opt.step(grad_fn) for _ in range(50)]
        >>> bool(losses[-1] < losses[0])
        True
    """

    def __init__(self, params: Sequence[np.ndarray], k: int = 5, alpha: float = 0.7, **kwargs: Any) -> None:
        self.alpha = number("alpha", alpha, minimum=0)
        super().__init__(params, k=k, **kwargs)
        self._gv: list[np.ndarray] | None = None  # per parameter, allocated on the first SAM step
        self._gv_norm = 0.0
        self._scratch: list[np.ndarray] | None = None
        self._keep_gv = False

    def _by_group(self, arrays: list[np.ndarray]) -> list[list[np.ndarray]]:
        return [[arrays[i] for i in grp.index] for grp in self._groups]

    def first_step(self, grads: Sequence[np.ndarray]) -> float:
        was_due = not self._perturbed and self._second_pass_due()
        norm = super().first_step(grads)
        self._keep_gv = was_due and self._perturbed and math.isfinite(norm)
        if self._keep_gv:  # keep g: g_v is computed from it once g_s is known
            if self._gv is None:
                self._gv = [np.empty_like(p) for p in self.params]
            for gv, g in zip(self._by_group(self._gv), self._grads_by_group(grads)):
                _core.restore(gv, g)
        return norm

    def second_step(self, grads: Sequence[np.ndarray]) -> None:
        if self._perturbed and self._keep_gv:
            assert self._gv is not None
            gs_groups = self._grads_by_group(grads)
            gv_groups = self._by_group(self._gv)
            g_dot_g = sum(_core.dot(gv, gv) for gv in gv_groups)
            g_dot_gs = sum(_core.dot(gs, gv) for gs, gv in zip(gs_groups, gv_groups))
            c = g_dot_gs / g_dot_g if g_dot_g > 0 else 0.0
            for gs, gv in zip(gs_groups, gv_groups):  # g_v = g_s − c·g, in the buffer that held g
                _core.axpby(gs, gv, 1.0, -c)
            self._gv_norm = math.sqrt(sum(_core.dot(gv, gv) for gv in gv_groups))
        self._keep_gv = False
        super().second_step(grads)

    def _one_pass_step(self, by_group: list[list[np.ndarray]]) -> None:
        if self.alpha == 0 or self._gv_norm == 0 or self._gv is None:
            self._base_step(by_group, from_backup=False)
            return
        g_norm = math.sqrt(sum(_core.dot(g, g) for g in by_group))
        scale = self.alpha * g_norm / self._gv_norm
        if self._scratch is None:
            self._scratch = [np.empty_like(p) for p in self.params]
        direction = self._by_group(self._scratch)
        for d, g, gv in zip(direction, by_group, self._by_group(self._gv)):  # d = g + scale·g_v
            _core.restore(d, g)
            _core.axpby(gv, d, scale, 1.0)
        self._base_step(direction, from_backup=False)

    def state_dict(self) -> dict[str, Any]:
        """:meth:`SAM.state_dict` plus ``"looksam"``: ``g_v`` (copies, or None before the first
        SAM step) and ``‖g_v‖``."""
        sd = super().state_dict()
        sd["looksam"] = {
            "gv": None if self._gv is None else [v.copy() for v in self._gv],
            "gv_norm": self._gv_norm,
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("looksam", None)
        if extra is None:
            raise ValueError("state_dict lacks 'looksam' (it was not made by a LookSAM)")
        gv = extra["gv"]
        if gv is not None and (
            len(gv) != len(self.params)
            or any(
                not isinstance(v, np.ndarray) or v.shape != p.shape or v.dtype != p.dtype
                for v, p in zip(gv, self.params)
            )
        ):
            raise ValueError("state_dict['looksam']['gv'] does not match the parameters")
        super().load_state_dict(state_dict)
        self._gv = None if gv is None else [np.array(v, order="C", copy=True) for v in gv]
        self._gv_norm = float(extra["gv_norm"])
