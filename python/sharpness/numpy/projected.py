"""GSAM, Friendly SAM, WSAM and Monge SAM over lists of numpy arrays (the numpy fronts of
:mod:`sharpness.optim.gsam`, :mod:`~sharpness.optim.friendly`, :mod:`~sharpness.optim.wsam` and
:mod:`~sharpness.optim.monge`).

Each is :class:`~sharpness.numpy.SAM` with another perturbation or another update direction:

* GSAM (Zhuang et al., ICLR 2022, arXiv:2203.08065): the base step takes ``g_p − α g_⊥``, with
  ``g_⊥`` the part of ``g = ∇L(w)`` orthogonal to ``g_p = ∇L(w + e)``; ``ρ`` follows the
  learning rate, clamped to ``[ρ_min, ρ_max]``.
* Friendly SAM (Li et al., CVPR 2024, arXiv:2403.12350): the perturbation follows
  ``d = g − σ m``, ``m`` an exponential moving average of the raw gradients.
* WSAM (Yue et al., KDD 2023, arXiv:2305.15817): the sharpness ``L(w + e) − L(w)`` enters with
  the weight ``γ/(1 − γ)``, by default outside the base optimizer.
* Monge SAM (Jacobsen & Arvanitidis, 2025, arXiv:2502.08448):
  ``e = ρ g/(‖g‖√(1 + ‖g‖²))``.

The norms, inner products, linear combinations, the perturbation (with its backup) and the fused
"restore + base step" are :mod:`sharpness._core` kernels, one call per dtype over all arrays, in
the same order as on the torch front (``backend="rust"``), so that with the same gradients both
fronts give the same weights. Vectors kept between the two halves of a step (``g``, ``g̃ − g``,
the direction handed to the base step) live in buffers of the optimizer: the caller's gradient
arrays are never written.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from sharpness import _core
from sharpness._validation import number
from sharpness.methods import NORM_EPS
from sharpness.numpy.sam import SAM, _flag, _real

__all__ = ["FriendlySAM", "WSAM", "MongeSAM"]



def _nonneg(name: str, value: Any) -> float:
    return number(name, value, minimum=0)


def _same_arrays(name: str, arrays: Any, params: list[np.ndarray]) -> None:
    """Raise unless ``arrays`` is a list of arrays shaped and typed as ``params``."""
    if not isinstance(arrays, (list, tuple)) or len(arrays) != len(params):
        raise ValueError(f"{name} must be a list of {len(params)} arrays, one per parameter")
    for i, (a, p) in enumerate(zip(arrays, params)):
        if not isinstance(a, np.ndarray) or a.shape != p.shape or a.dtype != p.dtype:
            raise ValueError(
                f"{name}[{i}] must be a {p.dtype} array of shape {p.shape}, got "
                f"{getattr(a, 'dtype', type(a).__name__)} {getattr(a, 'shape', '')}"
            )


class _Variant(SAM):
    """SAM plus the helpers its variants share: per-parameter buffers split by dtype group, the
    (ASAM-aware) squared norm of any vector, and the perturbation along any direction."""

    def _by_group(self, arrays: list[np.ndarray]) -> list[list[np.ndarray]]:
        return [[arrays[i] for i in grp.index] for grp in self._groups]

    def _new_buffers(self) -> list[np.ndarray]:
        return [np.empty_like(p) for p in self.params]

    def _sumsq(self, by_group: list[list[np.ndarray]]) -> float:
        """``‖v‖²`` over all arrays (ASAM: ``‖T v‖²``), accumulated in float64."""
        hp = self.hyperparams
        if hp["adaptive"]:
            return sum(
                _core.sum_of_squares_adaptive(grp.params, v, hp["eta"]) for grp, v in zip(self._groups, by_group)
            )
        return sum(_core.sum_of_squares(v) for v in by_group)

    @staticmethod
    def _root(sumsq: float) -> float:
        return math.sqrt(sumsq) if sumsq >= 0 else math.nan

    def _perturb_along(self, direction: list[list[np.ndarray]], norm: float) -> None:
        """``w ← w + ρ·direction/(norm + 1e-12)`` (ASAM: ``T²·direction``), saving ``w``; a
        non-finite ``norm`` moves nothing (the backups still get ``w``) and is counted."""
        hp = self.hyperparams
        if not math.isfinite(norm):
            for grp in self._groups:
                _core.restore(grp.backups, grp.params)
            self._nonfinite += 1
            return
        scale = hp["rho"] / (norm + NORM_EPS)
        if hp["maximize"]:
            scale = -scale
        for grp, d in zip(self._groups, direction):
            if hp["adaptive"]:
                _core.perturb_adaptive(grp.params, d, grp.backups, scale, hp["eta"])
            else:
                _core.perturb(grp.params, d, grp.backups, scale)

    def _check_first(self) -> None:
        if self._perturbed:
            raise RuntimeError(
                "first_step called twice: the weights are already perturbed; "
                "call second_step(grads) to restore them and take the base step"
            )

    def _check_second(self) -> None:
        if not self._perturbed:
            raise RuntimeError(
                "second_step called without first_step: call first_step(grads) at w first "
                "(or use step(grad_fn))"
            )

    def _split_extra(self, state_dict: Any, key: str) -> tuple[dict[str, Any], Any]:
        if self._perturbed:
            raise RuntimeError("load_state_dict called between first_step and second_step; call second_step first")
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        state_dict = dict(state_dict)
        extra = state_dict.pop(key, None)
        if extra is None:
            raise ValueError(f"state_dict lacks {key!r} (it was not made by a {type(self).__name__})")
        return state_dict, extra


# ============================================================================== GSAM


class FriendlySAM(_Variant):
    r"""Friendly SAM (Li, Zhou, He, Cheng, Huang, "Friendly Sharpness-Aware Minimization",
    CVPR 2024, arXiv:2403.12350) over a list of numpy arrays, updated in place.

    Algorithm (as the official code and :class:`sharpness.FriendlySAM`)::

        g = ∇L(w)
        first step:  m = g,  d = g
        later:       d = g − σ m;   m ← λ m + (1 − λ) g
        e = ρ d/(‖d‖ + 1e-12)            ‖·‖ over all arrays; ASAM's T²d/‖T d‖ with adaptive=True
        w ← base_step(w, ∇L(w + e))      from the exact saved w

    ``σ = 0`` is :class:`~sharpness.numpy.SAM` bit for bit (``m`` is still kept). ``d`` is
    written to a buffer of the optimizer (the caller's ``g`` is left alone), and
    ``m ← (λ + (1−λ)σ) m + (1−λ) d``, which is ``λm + (1−λ)g`` up to the rounding of ``d``, as
    on the torch front. A non-finite ``‖g‖`` leaves ``m`` and the weights alone (the step is the
    plain base step); so does a non-finite ``‖d‖`` (then ``m`` is already updated). ``m`` is in
    :meth:`state_dict` under ``"friendly"``.

    Args:
        params: as for :class:`~sharpness.numpy.SAM`.
        rho: ``ρ`` (0.05).
        sigma: ``σ``, how much of ``m`` is removed (1.0, the paper's experiments).
        lmbda: ``λ`` in ``[0, 1]``, the decay of ``m`` (0.9, the official code's default).
        adaptive, eta, base, **base_kwargs: as for :class:`~sharpness.numpy.SAM`.

    Example:
        >>> import numpy as np
        >>> from sharpness.numpy import FriendlySAM
        >>> rng = np.random.default_rng(0)
        >>> X = rng.normal(size=(32, 3))
        >>> y = X @ np.array([1.0, -2.0, 0.5]) + 0.1 * rng.normal(size=32)
        >>> w = np.zeros(3)
        >>> def grad_fn(params):
        ...     r = X @ params[0] - y
        ...     return 0.5 * np.mean(r**2), [X.T @ r / len(y)]
        >>> opt = FriendlySAM([w], rho=0.05, sigma=1.0, lmbda=0.9, lr=0.1)
        >>> losses = [opt.step(grad_fn) for _ in range(50)]
        >>> bool(losses[-1] < 0.01 * losses[0]), opt.momentum[0].shape
        (True, (3,))
    """

    def __init__(
        self,
        params: Sequence[np.ndarray],
        rho: float = 0.05,
        sigma: float = 1.0,
        lmbda: float = 0.9,
        adaptive: bool = False,
        eta: float = 0.01,
        base: str = "sgd",
        **base_kwargs: Any,
    ) -> None:
        self.sigma = _real("sigma", sigma)
        self.lmbda = number("lmbda", lmbda, minimum=0, maximum=1)
        super().__init__(params, rho=rho, adaptive=adaptive, eta=eta, base=base, **base_kwargs)
        self._m: list[np.ndarray] | None = None  # the moving average, from the first perturbed step
        self._scratch: list[np.ndarray] | None = None  # d

    @property
    def momentum(self) -> list[np.ndarray] | None:
        """``m``, one array per parameter (None before the first step); the optimizer's own
        buffers, not copies."""
        return self._m

    def first_step(self, grads: Sequence[np.ndarray]) -> float:
        """Moves the weights to ``w + ρ d/‖d‖`` (saving ``w``) and updates ``m``, from the
        gradients at ``w``. Returns ``‖d‖`` (ASAM: ``‖T d‖``), the norm the perturbation was
        scaled by; ``inf`` or ``nan`` when it was not finite (no perturbation)."""
        self._check_first()
        g = self._grads_by_group(grads)
        norm = self._root(self._sumsq(g))
        d = g
        if math.isfinite(norm):
            if self._m is None:  # m starts at the first gradient; d = g
                self._m = self._new_buffers()
                for m, a in zip(self._by_group(self._m), g):
                    _core.restore(m, a)
            else:
                lam, sigma = self.lmbda, self.sigma
                m_groups = self._by_group(self._m)
                if sigma != 0.0:  # d = g − σ m, in the scratch buffer
                    if self._scratch is None:
                        self._scratch = self._new_buffers()
                    d = self._by_group(self._scratch)
                    for dd, a, m in zip(d, g, m_groups):
                        _core.restore(dd, a)
                        _core.axpby(m, dd, -sigma, 1.0)
                for dd, m in zip(d, m_groups):  # m ← λm + (1−λ)(d + σm) = λm + (1−λ)g
                    _core.axpby(dd, m, 1.0 - lam, lam + (1.0 - lam) * sigma)
                if sigma != 0.0:
                    norm = self._root(self._sumsq(d))
        self._perturb_along(d, norm)
        self._perturbed = True
        return norm

    def state_dict(self) -> dict[str, Any]:
        """:meth:`SAM.state_dict <sharpness.numpy.SAM.state_dict>` plus ``"friendly"``: ``m``
        (copies, or None before the first step)."""
        sd = super().state_dict()
        sd["friendly"] = {"m": None if self._m is None else [a.copy() for a in self._m]}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a dict made by :meth:`state_dict` (``m`` is copied)."""
        state_dict, extra = self._split_extra(state_dict, "friendly")
        if not isinstance(extra, dict) or "m" not in extra:
            raise ValueError("state_dict['friendly'] must be a dict with the key 'm'")
        m = extra["m"]
        if m is not None:
            _same_arrays("state_dict['friendly']['m']", m, self.params)
        super().load_state_dict(state_dict)
        self._m = None if m is None else [np.array(a, order="C", copy=True) for a in m]

    def __repr__(self) -> str:
        return f"FriendlySAM(sigma={self.sigma}, lmbda={self.lmbda}, " + super().__repr__().split("(", 1)[1]


# ============================================================================== WSAM


class WSAM(_Variant):
    r"""WSAM (Yue, Jiang, Ye, Gao, Liu, Zhang, "Sharpness-Aware Minimization Revisited: Weighted
    Sharpness as a Regularization Term", KDD 2023, arXiv:2305.15817) over a list of numpy
    arrays, updated in place: SAM with the sharpness weighted by ``α = γ/(1 − γ)``.

    Algorithm (``decouple=True``: the paper's Algorithm 1, as :class:`sharpness.WSAM`)::

        g  = ∇L(w);  e = ρ g/(‖g‖ + 1e-12);  g̃ = ∇L(w + e)
        w  ← base_step(w, g)              from the exact saved w: momentum, Adam's moments and
                                          weight decay see g only
        w  ← w − lr·α·(g̃ − g)             (+ with maximize=True)

    With ``decouple=False`` the base step takes ``(1 − α) g + α g̃``.

    Limits: ``γ = 0.5`` (``α = 1``) with ``decouple=False`` is :class:`~sharpness.numpy.SAM` bit
    for bit (any base optimizer); with ``decouple=True`` and plain SGD (no momentum, no weight
    decay) it is SAM up to rounding. ``γ = 0`` is the base optimizer stepping on ``g`` (the
    second gradient is taken and unused). ``g`` and ``g̃ − g`` live in buffers of the optimizer
    during a step (nothing to checkpoint beyond SAM's state). After a non-finite ``‖g‖`` the step
    is the plain base step with ``g̃``, as for SAM.

    Args:
        params: as for :class:`~sharpness.numpy.SAM`.
        rho: ``ρ`` (0.05).
        gamma: ``γ`` in ``[0, 1)`` (0.9, the paper's experiments).
        decouple: apply the sharpness term outside the base optimizer (default, as the paper).
        adaptive, eta, base, **base_kwargs: as for :class:`~sharpness.numpy.SAM`.

    Example:
        >>> import numpy as np
        >>> from sharpness.numpy import WSAM
        >>> rng = np.random.default_rng(0)
        >>> X, y = rng.normal(size=(32, 3)), rng.normal(size=32)
        >>> w = np.zeros(3)
        >>> def grad_fn(params):
        ...     r = X @ params[0] - y
        ...     return 0.5 * np.mean(r**2), [X.T @ r / len(y)]
        >>> opt = WSAM([w], rho=0.05, gamma=0.9, lr=0.05, momentum=0.9)
        >>> losses = [opt.step(grad_fn) for _ in range(50)]
        >>> round(opt.alpha, 6), bool(losses[-1] < losses[0])
        (9.0, True)
    """

    def __init__(
        self,
        params: Sequence[np.ndarray],
        rho: float = 0.05,
        gamma: float = 0.9,
        decouple: bool = True,
        adaptive: bool = False,
        eta: float = 0.01,
        base: str = "sgd",
        **base_kwargs: Any,
    ) -> None:
        self.gamma = number("gamma", gamma, minimum=0, below=1)
        #: ``α = γ/(1 − γ)``, the weight of the sharpness.
        self.alpha: float = self.gamma / (1.0 - self.gamma)
        self.decouple: bool = _flag("decouple", decouple)
        super().__init__(params, rho=rho, adaptive=adaptive, eta=eta, base=base, **base_kwargs)
        self._g: list[np.ndarray] | None = None  # g (decoupled: the base step's gradient)
        self._scratch: list[np.ndarray] | None = None  # (1−α)g + αg̃, or g̃ − g
        self._keep = False

    def _keeps_g(self) -> bool:
        return self.decouple or self.alpha != 1.0

    def first_step(self, grads: Sequence[np.ndarray]) -> float:
        """As :meth:`SAM.first_step <sharpness.numpy.SAM.first_step>`, keeping a copy of ``g``.
        Returns ``‖g‖`` (ASAM: ``‖T g‖``)."""
        self._check_first()
        norm = super().first_step(grads)
        self._keep = self._keeps_g() and math.isfinite(norm)
        if self._keep:
            if self._g is None:
                self._g = self._new_buffers()
            for dst, g in zip(self._by_group(self._g), self._grads_by_group(grads)):
                _core.restore(dst, g)
        return norm

    def second_step(self, grads: Sequence[np.ndarray]) -> None:
        """Restores ``w``, then the base step on ``g`` and ``w ← w − lr·α(g̃ − g)``
        (``decouple=False``: the base step on ``(1 − α)g + αg̃``); ``grads`` is ``g̃``."""
        self._check_second()
        if not self._keep:
            super().second_step(grads)
            return
        assert self._g is not None
        alpha = self.alpha
        gt = self._grads_by_group(grads)
        g = self._by_group(self._g)
        if self._scratch is None:
            self._scratch = self._new_buffers()
        s = self._by_group(self._scratch)
        self._keep = False
        if not self.decouple:
            for dd, a, b in zip(s, gt, g):  # (1 − α) g + α g̃
                _core.restore(dd, a)
                _core.axpby(b, dd, 1.0 - alpha, alpha)
            self._base_step(s, from_backup=True)
            self._perturbed = False
            return
        if alpha != 0.0:
            for dd, a, b in zip(s, gt, g):  # s = g̃ − g
                _core.restore(dd, a)
                _core.axpby(b, dd, -1.0, 1.0)
        self._base_step(g, from_backup=True)  # the base step takes g
        self._perturbed = False
        if alpha != 0.0:
            hp = self.hyperparams
            scale = (1.0 if hp["maximize"] else -1.0) * hp["lr"] * alpha
            if scale != 0.0:
                for grp, dd in zip(self._groups, s):  # w ← w − lr·α·(g̃ − g)
                    _core.axpby(dd, grp.params, scale, 1.0)

    def _undo(self) -> None:
        super()._undo()
        self._keep = False

    def __repr__(self) -> str:
        return f"WSAM(gamma={self.gamma}, decouple={self.decouple}, " + super().__repr__().split("(", 1)[1]


# ============================================================================== Monge SAM


class MongeSAM(_Variant):
    r"""Monge SAM (Jacobsen & Arvanitidis, "Monge SAM: Robust Reparameterization-Invariant
    Sharpness-Aware Minimization Based on Loss Geometry", 2025, arXiv:2502.08448) over a list of
    numpy arrays, updated in place.

    Algorithm (the closed form for the metric ``G = I + ∇L∇Lᵀ``, as :class:`sharpness.MongeSAM`)::

        g = ∇L(w)
        e = ρ g / (‖g‖·√(1 + ‖g‖²) + 1e-12)      ‖·‖ over all arrays
        w ← base_step(w, ∇L(w + e))             from the exact saved w

    SAM's ``e`` shrunk by ``1/√(1 + ‖g‖²)``: as ``‖g‖ → 0`` it tends to
    :class:`~sharpness.numpy.SAM`, as ``‖g‖ → ∞`` to the base optimizer. The scale of the loss
    matters (unlike for SAM). There is no ASAM form (``adaptive=True`` is refused).

    Args:
        params, rho, base, **base_kwargs: as for :class:`~sharpness.numpy.SAM`.

    Example:
        >>> import numpy as np
        >>> from sharpness.numpy import MongeSAM
        >>> w = np.array([3.0, 4.0])
        >>> opt = MongeSAM([w], rho=0.5, lr=0.1)
        >>> norm = opt.first_step([w.copy()])   # g = w: ‖g‖ = 5
        >>> e = w - np.array([3.0, 4.0])
        >>> round(float(np.linalg.norm(e)), 6)  # ρ/√(1 + 25)
        0.098058
        >>> opt.second_step([np.zeros(2)])       # back to w, then the base step
        >>> w.tolist()
        [3.0, 4.0]
    """

    def __init__(self, params: Sequence[np.ndarray], rho: float = 0.05, base: str = "sgd", **base_kwargs: Any) -> None:
        if "adaptive" in base_kwargs and _flag("adaptive", base_kwargs.pop("adaptive")):
            raise ValueError("MongeSAM has no adaptive (ASAM) form")
        base_kwargs.pop("eta", None)
        super().__init__(params, rho=rho, base=base, **base_kwargs)

    def first_step(self, grads: Sequence[np.ndarray]) -> float:
        """Moves the weights to ``w + e`` (saving ``w``). Returns ``‖g‖`` (``inf`` or ``nan``
        when it is not finite: then nothing moves)."""
        self._check_first()
        g = self._grads_by_group(grads)
        norm = self._root(self._sumsq(g))
        # The kernels divide by (norm + ε): hand them ‖g‖·√(1 + ‖g‖²).
        monge = norm * math.sqrt(1.0 + norm * norm) if math.isfinite(norm) else norm
        if math.isfinite(norm) and not math.isfinite(monge):  # ‖g‖ > ~1e154: e underflows to 0
            for grp in self._groups:
                _core.restore(grp.backups, grp.params)
        else:
            self._perturb_along(g, monge)
        self._perturbed = True
        return norm

    def __repr__(self) -> str:
        return "MongeSAM(" + super().__repr__().split("(", 1)[1]
