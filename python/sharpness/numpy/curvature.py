"""GAM and CR-SAM over lists of numpy arrays (the numpy fronts of :mod:`sharpness.optim.gam` and
:mod:`sharpness.optim.crsam`): SAM variants that also look at how the gradient changes around
``w``, from more than two gradients per step.

* GAM (Zhang, Xu, Liu, Li, Cui, "Gradient Norm Aware Minimization Seeks First-Order Flatness and
  Improves Generalization", CVPR 2023, arXiv:2303.03108; official code github.com/xxgege/GAM):
  four gradients per step, an ascent on the gradient norm besides SAM's ascent on the loss.
* CR-SAM (Wu, Luo, Wunsch, "CR-SAM: Curvature Regularized Sharpness-Aware Minimization",
  AAAI 2024, arXiv:2312.13555; official code github.com/TrustAIoT/CR-SAM): three gradients, at
  ``w`` and ``w ± e``, for a finite-difference curvature term.

Both run through ``step(grad_fn)`` only (as on the torch front, which has no multi-call form
either): ``grad_fn(params) -> (loss, grads)`` is called several times, at the points the method
visits, and each call's gradients are read (copied where needed) before the next call, so
``grad_fn`` may return the same buffers every time. The weights go back to ``w`` bit for bit from
a saved copy; any exception in a later call restores them before it propagates. Every pass is a
:mod:`sharpness._core` kernel (``sum_of_squares``, ``dot``, ``perturb``, ``restore``, ``axpby``,
the fused ``restore_sgd`` / ``restore_adam``), one call per dtype over all arrays.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from sharpness import _core
from sharpness._validation import number
from sharpness.methods import NORM_EPS
from sharpness.numpy.sam import SAM, _real

__all__ = ["GAM", "CRSAM"]

GradFn = Callable[[list[np.ndarray]], tuple[Any, Sequence[np.ndarray]]]


class _MultiPassSAM(SAM):
    """The machinery GAM and CR-SAM share: buffers the size of the model, norms, the skip of a
    non-finite first gradient, and a ``step`` that restores ``w`` on any exception."""

    _passes = 0  # gradients per step, for the messages
    _label = ""
    _coefficients: tuple[str, ...] = ()  # the method's own hyper-parameters, in state_dict

    def __init__(self, params: Sequence[np.ndarray], **kwargs: Any) -> None:
        if kwargs.get("adaptive"):
            raise ValueError(f"{self._label} has no adaptive (ASAM) form")
        super().__init__(params, **kwargs)
        self._scratch: dict[str, list[np.ndarray]] = {}

    def _buffer(self, name: str) -> list[list[np.ndarray]]:
        """A scratch vector the size of the model (allocated once), split by dtype group."""
        arrays = self._scratch.get(name)
        if arrays is None:
            arrays = self._scratch[name] = [np.empty_like(p) for p in self.params]
        return [[arrays[i] for i in grp.index] for grp in self._groups]

    @staticmethod
    def _copy(dst: list[list[np.ndarray]], src: list[list[np.ndarray]]) -> None:
        for d, s in zip(dst, src):
            _core.restore(d, s)

    @staticmethod
    def _norm(by_group: list[list[np.ndarray]]) -> float:
        sumsq = sum(_core.sum_of_squares(g) for g in by_group)
        return math.sqrt(sumsq) if sumsq >= 0 else math.nan

    def _grads_at(self, grad_fn: GradFn) -> list[list[np.ndarray]]:
        _, grads = self._call(grad_fn)
        return self._grads_by_group(grads)

    def first_step(self, grads: Sequence[np.ndarray]) -> float:
        raise RuntimeError(f"{self._label} takes {self._passes} gradients per step: call step(grad_fn)")

    def second_step(self, grads: Sequence[np.ndarray]) -> None:
        raise RuntimeError(f"{self._label} takes {self._passes} gradients per step: call step(grad_fn)")

    def _start(self, grad_fn: GradFn) -> tuple[Any, list[list[np.ndarray]], float]:
        """The first call, at ``w``. With a non-finite ``‖g₀‖`` (returned as is) the step is over:
        no perturbation, the base step with ``g₀`` as it is (counted in ``nonfinite_steps``)."""
        if self._perturbed:
            raise RuntimeError(f"{self._label}.step() called while a step is in progress")
        loss, grads = self._call(grad_fn)
        g0 = self._grads_by_group(grads)
        norm = self._norm(g0)
        if not math.isfinite(norm):
            self._nonfinite += 1
            self._base_step(g0, from_backup=False)
        return loss, g0, norm

    def _run(self, passes: Callable[[], list[list[np.ndarray]]]) -> None:
        """Runs the later calls (``passes`` returns the update direction), then the base step from
        the saved ``w``; an exception puts ``w`` back first."""
        self._perturbed = True
        try:
            direction = passes()
        except BaseException:
            self._undo()
            raise
        self._base_step(direction, from_backup=True)
        self._perturbed = False

    def _coefficient_values(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in self._coefficients}

    def state_dict(self) -> dict[str, Any]:
        """:meth:`SAM.state_dict` plus the method's coefficients (under its own key). The scratch
        vectors live within one step only and are not saved."""
        sd = super().state_dict()
        sd[self._key] = self._coefficient_values()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a dict made by :meth:`state_dict` of the same class."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        state_dict = dict(state_dict)
        extra = state_dict.pop(self._key, None)
        if not isinstance(extra, dict) or not set(self._coefficients) <= set(extra):
            raise ValueError(f"state_dict lacks {self._label}'s coefficients ({self._key!r}: {', '.join(self._coefficients)})")
        values = self._check_coefficients({k: extra[k] for k in self._coefficients})
        super().load_state_dict(state_dict)
        for name, value in values.items():
            setattr(self, name, value)

    def _check_coefficients(self, values: dict[str, Any]) -> dict[str, float]:
        return {name: _real(name, value) for name, value in values.items()}

    @property
    def _key(self) -> str:
        return type(self).__name__.lower()

    def __repr__(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self._coefficient_values().items())
        return f"{type(self).__name__}({extra}, " + super().__repr__().split("(", 1)[1]


class GAM(_MultiPassSAM):
    r"""GAM (Zhang et al., CVPR 2023, arXiv:2303.03108) over a list of numpy arrays, updated in
    place: SAM plus an ascent on the gradient norm (first-order flatness), four gradients per step.

    Algorithm (as the official code; every norm global, each with ``+ 1e-12``)::

        g₀ = ∇L(w);            w₁ = w + ρ g₀/‖g₀‖
        g₁ = ∇L(w₁);           d = g₁ − g₀;  w₂ = w + ρ' d/‖d‖
        g₂ = ∇L(w₂);           w₃ = w₂ + ρ g₂/‖g₂‖
        g₃ = ∇L(w₃)
        p = g₀ + |β₂| g₂;  u = β₁ g₁ + β₃ g₃;  c = p·u/(‖p‖‖u‖ + 1e-12)
        u ← u − γ (p − c ‖p‖ u/(‖u‖ + 1e-12))      (minus γ times the part of p orthogonal to u)
        w ← base_step(saved w, u)

    ``step(grad_fn)`` calls ``grad_fn`` at ``w``, ``w₁``, ``w₂``, ``w₃`` and returns the loss at
    ``w``. ``β₂ = β₃ = γ = 0`` (``β₁ = 1``) is :class:`~sharpness.numpy.SAM` bit for bit. A
    non-finite ``‖g₀‖`` ends the step after one call with the plain base step on ``g₀`` (as the
    torch front); a non-finite ``‖d‖`` or ``‖g₂‖`` leaves out that move (the point stays finite;
    the update, built from those gradients, then goes to the base step as it is). ``rho = 0``
    perturbs nothing (all four gradients at ``w``), as on the torch front, where ``ρ = 0`` marks a
    group as unperturbed. Three scratch vectors the size of the model (``g₀`` then ``p``, ``g₁``,
    ``d`` then ``u``). No ``adaptive`` and no ``maximize`` form (GAM's later moves have no
    definition for them).

    Args:
        params, base, **base_kwargs: as for :class:`~sharpness.numpy.SAM`.
        rho: ``ρ``, the radius of the two SAM moves (the official ``grad_rho``; 0.05 here).
        norm_rho: ``ρ'``, the radius of the move along ``d`` (``grad_norm_rho``; 0.2, as in
            every official setting).
        beta1, beta2, beta3: the weights of ``g₁``, ``g₂``, ``g₃`` (``grad_beta_1``,
            ``|grad_beta_2|``, ``grad_beta_3``; 1, 1, 1 here).
        gamma: ``γ`` of the decomposition (``grad_gamma``; 0.1 here).

    Defaults: as :class:`sharpness.GAM`, whose docstring lists what the official script runs.
    The official class (github.com/xxgege/GAM, ``gam/gam.py``) has no defaults for these; its
    script ``main_cifar.py`` always sets ``grad_beta_2 = 1 − grad_beta_0`` and ``grad_beta_3 =
    1 − grad_beta_1``, so it never runs ``β₂ = β₃ = 1`` (CIFAR-100 ResNet: ``rho=0.02,
    norm_rho=0.2, beta1=0.6, beta2=0.5, beta3=0.4, gamma=0.03``; its argparse defaults give
    ``β₁ = 1, β₂ = β₃ = 0, γ = 0.03, ρ = 0.02``). The defaults here (equal weights, ``γ = 0.1``,
    ``ρ = 0.05``) are this library's; pass the script's values to reproduce a run of it.

    Example:
        >>> import numpy as np
        >>> from sharpness.numpy import GAM
        >>> rng = np.random.default_rng(0)
        >>> X, y = rng.normal(size=(32, 3)), rng.normal(size=32)
        >>> w = np.zeros(3)
        >>> calls = []
        >>> def grad_fn(params):
        ...     calls.append(1)
        ...     r = X @ params[0] - y
        ...     return 0.5 * np.mean(r**2), [X.T @ r / len(y)]
        >>> opt = GAM([w], rho=0.05, norm_rho=0.2, lr=0.1)
        >>> losses = [opt.step(grad_fn) for _ in range(30)]
        >>> len(calls), bool(losses[-1] < losses[0])
        (120, True)
    """

    _passes, _label = 4, "GAM"
    _coefficients = ("norm_rho", "beta1", "beta2", "beta3", "gamma")

    def __init__(
        self,
        params: Sequence[np.ndarray],
        rho: float = 0.05,
        norm_rho: float = 0.2,
        beta1: float = 1.0,
        beta2: float = 1.0,
        beta3: float = 1.0,
        gamma: float = 0.1,
        base: str = "sgd",
        **base_kwargs: Any,
    ) -> None:
        values = self._check_coefficients(
            {"norm_rho": norm_rho, "beta1": beta1, "beta2": beta2, "beta3": beta3, "gamma": gamma}
        )
        if base_kwargs.get("maximize"):
            raise ValueError("GAM has no maximize form (its moves along g₁ − g₀ and g₂ assume a minimisation)")
        super().__init__(params, rho=rho, base=base, **base_kwargs)
        self.norm_rho: float = values["norm_rho"]
        self.beta1: float = values["beta1"]
        self.beta2: float = values["beta2"]
        self.beta3: float = values["beta3"]
        self.gamma: float = values["gamma"]

    def _check_coefficients(self, values: dict[str, Any]) -> dict[str, float]:
        out = super()._check_coefficients(values)
        out["norm_rho"] = number("norm_rho", values["norm_rho"], minimum=0)
        return out

    def step(self, grad_fn: GradFn) -> Any:
        """One GAM step: ``grad_fn(params) -> (loss, grads)`` runs four times (once when
        ``‖g₀‖`` is not finite). Returns the loss at ``w``."""
        if self.hyperparams["maximize"]:
            raise ValueError("GAM has no maximize form")
        loss, g0, norm = self._start(grad_fn)
        if not math.isfinite(norm):
            return loss
        rho = self.hyperparams["rho"]
        p_buf, g1_buf, work = self._buffer("g0"), self._buffer("g1"), self._buffer("work")
        self._copy(p_buf, g0)  # g₀, later p
        scale = rho / (norm + NORM_EPS)
        for grp, g in zip(self._groups, g0):  # w₁ = w + ρ g₀/‖g₀‖ (saves w)
            _core.perturb(grp.params, g, grp.backups, scale)

        def passes() -> list[list[np.ndarray]]:
            g1 = self._grads_at(grad_fn)
            self._copy(g1_buf, g1)
            self._copy(work, g1)
            for g0_, d in zip(p_buf, work):  # d = g₁ − g₀
                _core.axpby(g0_, d, -1.0, 1.0)
            d_norm = self._norm(work)
            move = self.norm_rho / (d_norm + NORM_EPS) if math.isfinite(d_norm) else 0.0
            for grp, d in zip(self._groups, work):  # w₂ = w + ρ' d/‖d‖, from the saved w
                _core.restore(grp.params, grp.backups)
                if rho != 0 and move != 0:
                    _core.axpby(d, grp.params, move, 1.0)
            g2 = self._grads_at(grad_fn)
            g2_norm = self._norm(g2)
            inverse = 1.0 / (g2_norm + NORM_EPS) if math.isfinite(g2_norm) else 0.0
            for grp, g, p in zip(self._groups, g2, p_buf):
                _core.axpby(g, p, abs(self.beta2), 1.0)  # p = g₀ + |β₂| g₂
                if rho != 0 and inverse != 0:
                    _core.axpby(g, grp.params, rho * inverse, 1.0)  # w₃ = w₂ + ρ g₂/‖g₂‖
            g3 = self._grads_at(grad_fn)
            self._copy(work, g3)
            for g1_, u in zip(g1_buf, work):  # u = β₁ g₁ + β₃ g₃
                _core.axpby(g1_, u, self.beta1, self.beta3)
            u_norm, p_norm = self._norm(work), self._norm(p_buf)
            inner = sum(_core.dot(p, u) for p, u in zip(p_buf, work))
            cosine = inner / (u_norm * p_norm + NORM_EPS)
            keep = 1.0 + self.gamma * cosine * p_norm / (u_norm + NORM_EPS)
            for p, u in zip(p_buf, work):  # u ← (1 + γ c ‖p‖/‖u‖) u − γ p
                _core.axpby(p, u, -self.gamma, keep)
            return work

        self._run(passes)
        return loss


class CRSAM(_MultiPassSAM):
    r"""CR-SAM (Wu et al., AAAI 2024, arXiv:2312.13555) over a list of numpy arrays, updated in
    place: SAM plus a curvature regulariser from gradients on both sides of ``w``, three
    gradients per step.

    Algorithm (as the official code)::

        g₀ = ∇L(w);  e = ρ g₀/(‖g₀‖ + 1e-12)
        g₊ = ∇L(w + e)
        g₋ = ∇L(w − e)
        u  = g₊ + γ (g₊ + g₋ − 2 g₀) + β (g₊ − g₋)
        w ← base_step(saved w, u)       (the official code subtracts e; here w is restored exactly)

    To leading order ``g₊ − g₋ ≈ 2ρ H ĝ`` and ``g₊ + g₋ − 2g₀ ≈ ρ² ∇(ĝᵀHĝ)``. ``step(grad_fn)``
    calls ``grad_fn`` at ``w``, ``w + e``, ``w − e`` and returns the loss at ``w``. ``γ = β = 0``
    is :class:`~sharpness.numpy.SAM` bit for bit. A non-finite ``‖g₀‖`` ends the step after one
    call with the plain base step on ``g₀`` (as the torch front). With ``maximize=True`` the
    objective is ``−L`` and ``e`` points along ``−g₀``. Two scratch vectors the size of the model.
    No ``adaptive`` form.

    Args:
        params, base, **base_kwargs: as for :class:`~sharpness.numpy.SAM`.
        rho: ``ρ`` (0.1: the official class's default and its training script's).
        gamma: ``γ``, the weight of the second difference (0.1: likewise both).
        beta: ``β``, the weight of the first difference (0.1: the official class's default,
            followed here; the official training script runs 0.01).

    Example:
        >>> import numpy as np
        >>> from sharpness.numpy import CRSAM
        >>> rng = np.random.default_rng(0)
        >>> X, y = rng.normal(size=(32, 3)), rng.normal(size=32)
        >>> w = np.zeros(3)
        >>> def grad_fn(params):
        ...     r = X @ params[0] - y
        ...     return 0.5 * np.mean(r**2), [X.T @ r / len(y)]
        >>> opt = CRSAM([w], rho=0.1, gamma=0.1, beta=0.1, lr=0.1)
        >>> losses = [opt.step(grad_fn) for _ in range(30)]   # grad_fn at w, w + e, w - e
        >>> bool(losses[-1] < losses[0])
        True
    """

    _passes, _label = 3, "CR-SAM"
    _coefficients = ("gamma", "beta")

    def __init__(
        self,
        params: Sequence[np.ndarray],
        rho: float = 0.1,
        gamma: float = 0.1,
        beta: float = 0.1,
        base: str = "sgd",
        **base_kwargs: Any,
    ) -> None:
        values = self._check_coefficients({"gamma": gamma, "beta": beta})
        super().__init__(params, rho=rho, base=base, **base_kwargs)
        self.gamma: float = values["gamma"]
        self.beta: float = values["beta"]

    def step(self, grad_fn: GradFn) -> Any:
        """One CR-SAM step: ``grad_fn(params) -> (loss, grads)`` runs three times (once when
        ``‖g₀‖`` is not finite). Returns the loss at ``w``."""
        loss, g0, norm = self._start(grad_fn)
        if not math.isfinite(norm):
            return loss
        scale = self.hyperparams["rho"] / (norm + NORM_EPS)
        if self.hyperparams["maximize"]:
            scale = -scale
        acc, work = self._buffer("acc"), self._buffer("work")
        self._copy(acc, g0)
        for grp, g in zip(self._groups, g0):  # w + e (saves w)
            _core.perturb(grp.params, g, grp.backups, scale)

        def passes() -> list[list[np.ndarray]]:
            g_plus = self._grads_at(grad_fn)
            for grp, a, gp in zip(self._groups, acc, g_plus):
                _core.restore(grp.params, grp.backups)  # w − e, from the saved w
                if scale != 0:
                    _core.axpby(a, grp.params, -scale, 1.0)
                _core.axpby(gp, a, 1.0 + self.gamma + self.beta, -2.0 * self.gamma)  # (1+γ+β)g₊ − 2γ g₀
            g_minus = self._grads_at(grad_fn)
            self._copy(work, g_minus)
            for a, u in zip(acc, work):  # u = acc + (γ − β) g₋
                _core.axpby(a, u, 1.0, self.gamma - self.beta)
            return work

        self._run(passes)
        return loss
