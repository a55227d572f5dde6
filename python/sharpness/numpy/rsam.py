"""Random SAM (R-SAM) over lists of numpy arrays (the numpy front of :mod:`sharpness.optim.rsam`).

Liu, Mai, Cheng, Chen, Hsieh, You, "Random Sharpness-Aware Minimization", NeurIPS 2022. SAM's
single gradient-ascent step approximates the inner maximisation poorly on a rough loss surface;
R-SAM smooths the surface with random noise on the weights, takes the first gradient at the noisy
point, and mixes that gradient with the noise to pick the ascent direction. As the authors'
official code (RSAM-Optimizer/R-SAM, ``vit_jax/train.py``) and the torch front do it::

    δ   = σ · z · ‖filter‖                 filter-wise relative noise, z ~ N(0, I)
    g_δ = ∇L(w + δ)                        the first pass, at the noisy point
    d   = λ g_δ + δ                        λ = 2 in the official code
    e   = ρ d/(‖d‖ + 1e-12)                from w (not from w + δ): ‖e‖ = ρ
    w   ← base_step(w, ∇L(w + e))          from the exact saved w

The linear algebra (the global norms, ``w + δ``, ``d = λ g_δ + δ``, ``w + e``, the saved copy and
its exact restoration, the fused restore + base step) runs in :mod:`sharpness._core`, one call
per dtype over all arrays. The Gaussian draws and the per-row (per output unit) norms that scale
them have no kernel: they are numpy's, per array.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from sharpness import _core
from sharpness._validation import number
from sharpness.methods import NORM_EPS
from sharpness.numpy.sam import SAM, check_params_usable

__all__ = ["RandomSAM"]


GradFn = Callable[[list[np.ndarray]], tuple[Any, Sequence[np.ndarray]]]

_HOW_TO_CALL = (
    "call RandomSAM either as `opt.step(grad_fn)` or in three calls: `opt.add_noise()`; "
    "`opt.first_step(grads at w + δ)`; `opt.second_step(grads at w + e)`"
)


def _check_sigma(sigma: Any) -> float:
    return number("sigma", sigma, minimum=0)


def _check_lambda(lambda_: Any) -> float:
    return number("lambda_", lambda_, above=0)


class RandomSAM(SAM):
    r"""Random SAM (Liu, Mai, Cheng, Chen, Hsieh, You, "Random Sharpness-Aware Minimization",
    NeurIPS 2022) over a list of numpy arrays, updated in place: filter-wise relative noise on
    the weights before the first pass; the ascent direction mixes the noisy gradient with the
    noise and is taken from the clean weights. The numpy front of :class:`sharpness.RandomSAM`.

    Algorithm, as the authors' official code (RSAM-Optimizer/R-SAM, ``vit_jax/train.py``) and
    the torch front do it::

        δ   : per array p; for ndim ≥ 2, per output unit i along axis 0 (the rows of a weight
              stored (out, in) as torch does, the filters of a (out, in, kh, kw) kernel)
                  δ[i] = σ · z[i] · ‖p[i]‖₂
              for 1-D (and 0-d) arrays                δ = σ · z · ‖p‖₂
        g_δ = ∇L(w + δ)                               first call of grad_fn, at w + δ
        d   = λ g_δ + δ                               λ = 2 in the official code
        e   = ρ d / (‖d‖ + 1e-12)                     from the saved w: ‖e‖ = ρ
        w   ← base_step(w, ∇L(w + e))                 from the exact saved w

    ``‖d‖`` is one global norm over all arrays. Axis 0 is the output axis: a weight used as
    ``x @ W`` (shape (in, out)) gets its noise scaled per *input* row; store it (out, in) and
    use ``x @ W.T`` to follow the paper's per-filter scaling.

    The noise ``z`` comes from :attr:`generator` (``numpy.random.default_rng(seed)``). Draw
    order, per step: for each dtype, in the order the dtypes first appear in ``params``, one
    ``generator.standard_normal(n, dtype=dtype)`` over that dtype's arrays in their order in
    ``params`` (``n`` their total size; nothing is drawn where ``n = 0``); array ``i`` of the
    dtype takes the next ``p.size`` numbers, reshaped to ``p.shape`` (C order). ``δ`` is computed
    in the arrays' dtype: each row norm is summed in float64, ``σ·‖row‖`` is rounded to the
    dtype, and ``δ = z·(σ‖row‖)`` (one rounding). :meth:`state_dict` saves the generator's state
    and ``σ``, so a resumed run draws the same noise.

    The weights are saved before the noise and restored bit for bit (never by subtraction).
    ``σ = 0`` is :class:`~sharpness.numpy.SAM` bit for bit (nothing is drawn), and so is a step
    begun with ``rho = 0`` (the base optimizer alone). A non-finite ``‖g_δ‖`` or ``‖d‖`` applies
    no perturbation: the weights are back at ``w`` exactly, ``state_dict()["nonfinite_steps"]``
    counts it, and :meth:`second_step` takes the base step with its gradients (taken at ``w``).
    With ``maximize=True`` the objective is ``−L``: ``d = −λ g_δ + δ``.

    ``σ`` schedule: the official run raises σ with a cosine over the T training steps,
    ``σ_t = 5e-4 · (1 + 4·(1 − cos(π t/T))/2)``, from 5e-4 to 2.5e-3; set :attr:`sigma` between
    steps to follow it. The default 1.5e-3 is its mean. The official run's ``ρ`` (1.5 to 2.5),
    gradient clipping and base optimizer are the training recipe, not the optimizer.

    ``step(grad_fn)`` calls ``grad_fn(params)`` at ``w + δ``, then at ``w + e``, and returns the
    first loss (at ``w + δ``). In three calls: :meth:`add_noise`; :meth:`first_step` with the
    gradients at ``w + δ``; :meth:`second_step` with those at ``w + e``. :meth:`restore` undoes a
    pending step.

    Args:
        params: as for :class:`~sharpness.numpy.SAM` (float32 and float64 may be mixed).
        rho: ``ρ``, the radius (``‖e‖ = ρ`` whatever ``σ`` is). The official ViT run uses 1.5 to
            2.5, far above SAM's usual 0.05.
        sigma: ``σ``, the noise's standard deviation relative to each filter's norm (1.5e-3).
        lambda_: ``λ``, the weight of the noisy gradient against the noise in ``d`` (2.0); > 0.
        seed: seeds the noise's ``numpy.random.Generator`` (an int, None, or a Generator, used
            as it is).
        base, **base_kwargs: the base optimizer (``"sgd"``, ``"adam"`` or ``"adamw"``) and its
            arguments, as for :class:`~sharpness.numpy.SAM` (no ``adaptive`` form).

    Example:
        >>> import numpy as np
        >>> from sharpness.numpy import RandomSAM
        >>> rng = np.random.default_rng(0)
        >>> X, y = rng.normal(size=(64, 3)), rng.normal(size=(64, 2))
        >>> W, b = np.zeros((2, 3)), np.zeros(2)          # (out, in): rows are output units
        >>> def grad_fn(params):
        ...     W, b = params
        ...     r = X @ W.T + b - y
        ...     return 0.5 * np.mean(r**2), [r.T @ X / len(X), r.mean(axis=0)]
        >>> opt = RandomSAM([W, b], rho=0.05, sigma=1e-2, lr=0.1, momentum=0.9, seed=0)
        >>> losses = [opt.step(grad_fn) for _ in range(50)]
        >>> bool(losses[-1] < losses[0])
        True
        >>> opt.add_noise()                           # or in three calls: w ← w + δ
        >>> norm_d = opt.first_step(grad_fn([W, b])[1])   # w ← w + ρ d/‖d‖
        >>> opt.second_step(grad_fn([W, b])[1])           # base step from the saved w
        >>> opt.sigma = 2.5e-3                        # σ may follow a schedule
    """

    def __init__(
        self,
        params: Sequence[np.ndarray],
        rho: float = 0.05,
        sigma: float = 1.5e-3,
        lambda_: float = 2.0,
        seed: int | np.random.Generator | None = None,
        base: str = "sgd",
        **base_kwargs: Any,
    ) -> None:
        sigma = _check_sigma(sigma)
        lambda_ = _check_lambda(lambda_)
        if base_kwargs.get("adaptive"):
            raise ValueError("RandomSAM has no adaptive (ASAM) form")
        base_kwargs.pop("adaptive", None)
        base_kwargs.pop("eta", None)
        if not (seed is None or isinstance(seed, np.random.Generator)) and (
            isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer))
        ):
            raise TypeError(f"seed must be an int, None or a numpy Generator, got {type(seed).__name__}")
        super().__init__(params, rho=rho, base=base, **base_kwargs)
        #: ``λ`` in ``d = λ g_δ + δ``.
        self.lambda_: float = lambda_
        self._sigma = sigma
        #: The generator of the noise ``z`` (its state is in :meth:`state_dict`).
        self.generator: np.random.Generator = np.random.default_rng(seed)
        #: ``‖g_δ‖`` and ``‖d‖`` of the last :meth:`first_step` (``nan`` where not computed).
        self.last_grad_norm = math.nan
        self.last_direction_norm = math.nan
        self._noised = False  # between add_noise() and first_step() (σ ≠ 0)
        # δ per dtype group, aligned with each group's arrays (None: nothing was noised).
        self._delta: list[list[np.ndarray]] | None = None

    # ------------------------------------------------------------------ public API

    @property
    def sigma(self) -> float:
        """``σ``, relative to each filter's norm; may be changed between steps (saved by
        :meth:`state_dict`)."""
        return self._sigma

    @sigma.setter
    def sigma(self, value: float) -> None:
        self._sigma = _check_sigma(value)

    @property
    def noised(self) -> bool:
        """True between :meth:`add_noise` and :meth:`first_step` (with ``σ ≠ 0``)."""
        return self._noised

    def add_noise(self) -> None:
        """Saves the weights ``w`` and moves them to ``w + δ``, ``δ`` the filter-wise relative
        noise. Call it before the first gradient of a step. With ``σ = 0`` it does nothing (and
        draws nothing); with ``rho = 0`` it draws nothing and moves nothing."""
        check_params_usable(self.params)
        if self._perturbed or self._noised:
            raise RuntimeError("add_noise() called between first_step() and second_step(), or twice; " + _HOW_TO_CALL)
        sigma = self._sigma
        if sigma == 0.0:
            return
        if self.hyperparams["rho"] == 0.0:  # no ascent: no noise either (as the torch front)
            self._delta = None
            self._noised = True
            return
        for grp in self._groups:  # save w
            _core.restore(grp.backups, grp.params)
        deltas: list[list[np.ndarray]] = []
        try:
            for grp in self._groups:
                deltas.append(self._draw_delta(grp.params, grp.dtype, sigma))
            for grp, delta in zip(self._groups, deltas):
                _core.axpby(delta, grp.params, 1.0, 1.0)  # w ← w + δ
        except BaseException:
            for grp in self._groups:
                _core.restore(grp.params, grp.backups)
            raise
        self._delta = deltas
        self._noised = True

    def first_step(self, grads: Sequence[np.ndarray]) -> float:
        """With ``grads = ∇L(w + δ)``: back to the saved ``w``, then to ``w + ρ d/(‖d‖ + 1e-12)``,
        ``d = λ g_δ + δ``. (With ``σ = 0``: :meth:`SAM.first_step`, ``grads`` taken at ``w``.)

        Returns:
            ``‖d‖``, the norm ``e`` is scaled by (``‖g‖`` with ``σ = 0``, as SAM); ``‖g_δ‖`` when
            that is not finite. A non-finite norm leaves the weights at ``w`` exactly.
        """
        if self._perturbed:
            raise RuntimeError(
                "first_step called twice: the weights are already perturbed; call second_step(grads) first"
            )
        if not self._noised:
            if self._sigma != 0.0:
                raise RuntimeError("RandomSAM.first_step() needs add_noise() before the first gradient; " + _HOW_TO_CALL)
            norm = super().first_step(grads)
            self.last_grad_norm = self.last_direction_norm = norm
            return norm
        delta = self._delta
        try:
            by_group = self._grads_by_group(grads)
        except BaseException:
            self.restore()  # never leave the weights at w + δ behind an exception
            raise
        self._noised = False
        self._delta = None
        if delta is None:  # rho was 0 at add_noise(): SAM's step (a plain base step)
            norm = super().first_step(grads)
            self.last_grad_norm = self.last_direction_norm = norm
            return norm
        sumsq = sum(_core.sum_of_squares(g) for g in by_group)
        g_norm = math.sqrt(sumsq) if sumsq >= 0 else math.nan
        self.last_grad_norm = g_norm
        self.last_direction_norm = math.nan
        self._perturbed = True
        if not math.isfinite(g_norm):
            self._undo_noise()  # w + δ → w; second_step is the plain base step
            self._nonfinite += 1
            return g_norm
        hp = self.hyperparams
        lam = -self.lambda_ if hp["maximize"] else self.lambda_  # maximize: the ascent of −L
        for d, g in zip(delta, by_group):
            _core.axpby(g, d, lam, 1.0)  # d = λ g_δ + δ, in δ's buffer
        sumsq = sum(_core.sum_of_squares(d) for d in delta)
        d_norm = math.sqrt(sumsq) if sumsq >= 0 else math.nan
        self.last_direction_norm = d_norm
        self._undo_noise()  # back to w exactly
        if not math.isfinite(d_norm):
            self._nonfinite += 1
            return d_norm
        scale = hp["rho"] / (d_norm + NORM_EPS)
        for grp, d in zip(self._groups, delta):
            _core.axpby(d, grp.params, scale, 1.0)  # w ← w + ρ d/(‖d‖ + ε)
        return d_norm

    def second_step(self, grads: Sequence[np.ndarray]) -> None:
        """With ``grads = ∇L(w + e)``: back to the saved ``w`` (bit for bit), then one base step."""
        if self._noised:
            raise RuntimeError("second_step() after add_noise(): call first_step(grads at w + δ) first; " + _HOW_TO_CALL)
        super().second_step(grads)

    def step(self, grad_fn: GradFn) -> Any:
        """One whole R-SAM step: ``grad_fn(params) -> (loss, grads)`` is called at ``w + δ``,
        then at ``w + e``. Returns the first loss (at ``w + δ``). If ``grad_fn`` raises, the
        weights go back to ``w`` bit for bit before the exception propagates."""
        self.add_noise()
        try:
            loss, grads = self._call(grad_fn)
            self.first_step(grads)
            _, grads = self._call(grad_fn)
            self.second_step(grads)
        except BaseException:
            self.restore()
            raise
        return loss

    def restore(self) -> bool:
        """Undoes a pending :meth:`add_noise` or :meth:`first_step` (the weights back to ``w``,
        bit for bit). Returns whether there was something to undo."""
        if self._noised:
            if self._delta is not None:
                self._undo_noise()
            self._noised = False
            self._delta = None
            return True
        if self._perturbed:
            self._undo()
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        """:meth:`SAM.state_dict` plus ``"rsam"``: ``σ`` and the noise generator's
        ``bit_generator.state``."""
        if self._noised:
            raise RuntimeError("state_dict() after add_noise(): the weights are perturbed; take it after second_step()")
        sd = super().state_dict()
        extra: dict[str, Any] = {"sigma": self._sigma}
        bit_generator = getattr(self.generator, "bit_generator", None)
        if bit_generator is not None:
            extra["generator"] = copy.deepcopy(bit_generator.state)
        sd["rsam"] = extra
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a dict made by :meth:`state_dict`: ``σ`` and the generator's state (where the
        dict holds one) included."""
        if self._noised:
            raise RuntimeError("load_state_dict() after add_noise(): call restore() or finish the step first")
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        state_dict = dict(state_dict)
        extra = state_dict.pop("rsam", None)
        if not isinstance(extra, dict) or "sigma" not in extra:
            raise ValueError("state_dict lacks 'rsam' with 'sigma' (it was not made by a RandomSAM)")
        sigma = _check_sigma(extra["sigma"])
        gen = extra.get("generator")
        if gen is not None:
            bit_generator = getattr(self.generator, "bit_generator", None)
            kind = type(bit_generator).__name__
            if bit_generator is None or not (isinstance(gen, dict) and gen.get("bit_generator") == kind):
                raise ValueError(f"state_dict['rsam']['generator'] must be the state of a {kind} bit generator")
        super().load_state_dict(state_dict)
        self._sigma = sigma
        if gen is not None:
            self.generator.bit_generator.state = copy.deepcopy(gen)

    def __repr__(self) -> str:
        return f"RandomSAM(sigma={self._sigma!r}, lambda_={self.lambda_!r}, " + super().__repr__().split("(", 1)[1]

    # ------------------------------------------------------------------ internals

    def _draw_delta(self, params: list[np.ndarray], dtype: np.dtype, sigma: float) -> list[np.ndarray]:
        """One draw over ``params`` (one dtype) and ``δ`` written into it, per array, in place.

        The draws and the per-row norms are numpy's (no kernel computes norms per output unit)."""
        n = sum(p.size for p in params)
        if n == 0:
            return [np.empty(p.shape, dtype=dtype) for p in params]
        z = self.generator.standard_normal(n, dtype=dtype)
        if not (isinstance(z, np.ndarray) and z.shape == (n,)):
            raise TypeError(f"generator.standard_normal({n}) must return an array of shape ({n},)")
        z = np.ascontiguousarray(z, dtype=dtype)
        out, at = [], 0
        for p in params:
            zi = z[at : at + p.size].reshape(p.shape)
            at += p.size
            if p.size:
                if p.ndim >= 2:
                    rows = p.reshape(p.shape[0], -1)
                    norms = np.sqrt(np.einsum("ij,ij->i", rows, rows, dtype=np.float64))
                    scale = (norms * sigma).astype(dtype).reshape((-1,) + (1,) * (p.ndim - 1))
                else:
                    scale = np.asarray(math.sqrt(_core.sum_of_squares(p)) * sigma, dtype=dtype)
                np.multiply(zi, scale, out=zi)
            out.append(zi)
        return out

    def _undo_noise(self) -> None:
        for grp in self._groups:
            _core.restore(grp.params, grp.backups)
