"""SSAM-F and SSAM-D over lists of numpy arrays (the numpy front of :mod:`sharpness.optim.ssam`).

Mi, Shen, Ren, Zhou, Sun, Ji, Tao, "Make Sharpness-Aware Minimization Stronger: A Sparsified
Perturbation Approach", NeurIPS 2022 (arXiv:2210.05177; official code
github.com/Mi-Peng/Sparse-Sharpness-Aware-Minimization). Only a fraction ``1 − s`` of the weights
is perturbed::

    e = ρ (g ⊙ m)/(‖g‖ + 1e-12)      m ∈ {0, 1}, a fraction s of zeros; ‖g‖ the full (unmasked) norm

* SSAM-F chooses ``m`` as the top ``1 − s`` of the empirical Fisher information ``Σ_i (∇ℓ_i)²``
  (squared per-sample gradients summed over a few samples), refreshed every few epochs.
* SSAM-D starts from a random mask and every few epochs drops the live weights with the smallest
  score (``|g|`` by default) and grows as many dead ones (at random by default), the drop rate
  decaying as ``r(t) = r₀(1 + cos(πt))/2`` (``t`` the fraction of training done).

The norm, the perturbation (which writes the backup) and the fused "restore + base step" are the
:mod:`sharpness._core` kernels, one call per dtype over all arrays, exactly as in
:class:`~sharpness.numpy.SAM`. No kernel fits the elementwise mask product ``g ⊙ m``, the Fisher
sum ``F + g²`` or the top-k selection of the scores: those are numpy operations (vectorised, one
per array). The scores are ranked in float32 with ties going to the lower flat index, so with
the same scores the numpy and torch fronts choose the same mask (the torch front's ``topk`` does
not specify an order among exact ties).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from sharpness import _core
from sharpness._validation import number
from sharpness.methods import NORM_EPS
from sharpness.numpy.sam import SAM

__all__ = ["SSAMF", "SSAMD"]

GradFn = Callable[[list[np.ndarray]], tuple[Any, Sequence[np.ndarray]]]

_SCORE_EPS = np.float32(1e-7)  # added to SSAM-D's scores so that every candidate beats a 0
_STRATEGIES = ("gradient", "weight", "random")


def _fraction(name: str, value: Any, closed_top: bool = False) -> float:
    return number(name, value, minimum=0, maximum=1) if closed_top else number(name, value, minimum=0, below=1)


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """float32 0/1 flags of the ``k`` largest of the flat float32 ``scores`` (no NaN); among
    equal scores at the boundary, the lower indices win. O(N): one partition, no full sort."""
    n = scores.size
    keep = np.zeros(n, dtype=np.float32)
    if k <= 0:
        return keep
    if k >= n:
        keep[:] = 1.0
        return keep
    kth = np.partition(scores, n - k)[n - k]  # the k-th largest value
    above = scores > kth
    keep[above] = 1.0
    ties = np.flatnonzero(scores == kth)[: k - int(np.count_nonzero(above))]
    keep[ties] = 1.0
    return keep


class _SparseSAM(SAM):
    """What both SSAMs share: the mask (one array per parameter, in its dtype) and the masked
    perturbation. Before a mask is set the perturbation is SAM's."""

    def __init__(self, params: Sequence[np.ndarray], sparsity: float = 0.5, **kwargs: Any) -> None:
        if kwargs.get("adaptive"):
            raise ValueError(f"{type(self).__name__} has no adaptive (ASAM) form")
        self.sparsity = _fraction("sparsity", sparsity)
        super().__init__(params, **kwargs)
        self._mask: list[np.ndarray] | None = None
        self._masked: list[np.ndarray] | None = None  # scratch for g ⊙ m (the caller's grads stay)

    # -- the mask ------------------------------------------------------------------------------

    @property
    def numel(self) -> int:
        """``N``, the number of weights the mask covers (all elements of all arrays)."""
        return sum(p.size for p in self.params)

    def mask(self) -> list[np.ndarray]:
        """Copies of the current mask, one array per parameter in its dtype (all ones before the
        first mask is set)."""
        if self._mask is None:
            return [np.ones_like(p) for p in self.params]
        return [m.copy() for m in self._mask]

    def density(self) -> float:
        """The fraction of perturbed weights (``1 − s`` once a mask is set)."""
        if self._mask is None:
            return 1.0
        return float(sum(int(np.count_nonzero(m)) for m in self._mask) / max(1, self.numel))

    def set_mask(self, masks: Sequence[np.ndarray]) -> None:
        """Sets the mask explicitly: one array of 0s and 1s per parameter, of its shape (e.g. a
        mask saved elsewhere, or the torch front's ``mask()`` as numpy arrays)."""
        self._refuse_mid_step("set_mask")
        if isinstance(masks, np.ndarray):
            raise TypeError("masks must be a list of numpy arrays (one per parameter), not one array")
        masks = list(masks)
        if len(masks) != len(self.params):
            raise ValueError(f"got {len(masks)} mask arrays for {len(self.params)} parameters")
        out = []
        for i, (m, p) in enumerate(zip(masks, self.params)):
            m = np.asarray(m)
            if m.shape != p.shape:
                raise ValueError(f"mask[{i}] has shape {m.shape} but params[{i}] has shape {p.shape}")
            if not np.all((m == 0) | (m == 1)):
                raise ValueError(f"mask[{i}] must hold only 0s and 1s")
            out.append(np.array(m, dtype=p.dtype, order="C", copy=True))
        self._mask = out

    def _set_flat(self, keep: np.ndarray) -> None:
        """``keep``: float32 flags over all weights, in parameter order."""
        out, offset = [], 0
        for p in self.params:
            out.append(keep[offset : offset + p.size].reshape(p.shape).astype(p.dtype, order="C"))
            offset += p.size
        self._mask = out

    def _flat_mask(self) -> np.ndarray:
        return np.concatenate([m.reshape(-1).astype(np.float32) for m in self.mask()])

    def _refuse_mid_step(self, name: str) -> None:
        if self._perturbed:
            raise RuntimeError(f"{name}() between first_step() and second_step(): the weights are perturbed")

    # -- the step ------------------------------------------------------------------------------

    def first_step(self, grads: Sequence[np.ndarray]) -> float:
        """Moves the weights to ``w + ρ(g ⊙ m)/(‖g‖ + 1e-12)`` (saving ``w``), ``‖g‖`` the unmasked
        norm. Returns ``‖g‖``; a non-finite norm perturbs nothing (as :meth:`SAM.first_step`). The
        caller's ``grads`` are not modified."""
        if self._perturbed:
            raise RuntimeError(
                "first_step called twice: the weights are already perturbed; "
                "call second_step(grads) to restore them and take the base step"
            )
        by_group = self._grads_by_group(grads)
        sumsq = sum(_core.sum_of_squares(g) for g in by_group)
        norm = math.sqrt(sumsq) if sumsq >= 0 else math.nan
        if not math.isfinite(norm):
            for grp in self._groups:  # backups <- weights: second_step is the plain base step
                _core.restore(grp.backups, grp.params)
            self._nonfinite += 1
        else:
            scale = self.hyperparams["rho"] / (norm + NORM_EPS)
            if self.hyperparams["maximize"]:
                scale = -scale
            if self._mask is not None:
                if self._masked is None:
                    self._masked = [np.empty_like(p) for p in self.params]
                masked = [[self._masked[i] for i in grp.index] for grp in self._groups]
                masks = [[self._mask[i] for i in grp.index] for grp in self._groups]
                for gs, ms, outs in zip(by_group, masks, masked):
                    for g, m, o in zip(gs, ms, outs):
                        np.multiply(g, m, out=o)  # g ⊙ m: elementwise, no kernel for it
                by_group = masked
            for grp, g in zip(self._groups, by_group):
                _core.perturb(grp.params, g, grp.backups, scale)
        self._perturbed = True
        return norm

    # -- checkpoints ---------------------------------------------------------------------------

    def _extra_state(self) -> dict[str, Any]:
        return {"sparsity": self.sparsity, "mask": None if self._mask is None else [m.copy() for m in self._mask]}

    def _load_extra(self, extra: dict[str, Any]) -> None:
        self.sparsity = _fraction("sparsity", extra["sparsity"])
        if extra["mask"] is None:
            self._mask = None
        else:
            self.set_mask(extra["mask"])

    def _check_arrays(self, name: str, arrays: Any) -> None:
        if arrays is None:
            return
        if not isinstance(arrays, (list, tuple)) or len(arrays) != len(self.params) or any(
            not isinstance(a, np.ndarray) or a.shape != p.shape or a.dtype != p.dtype for a, p in zip(arrays, self.params)
        ):
            raise ValueError(
                f"state_dict['ssam'][{name!r}] does not match the parameters (one array per parameter, its shape and dtype)"
            )

    def state_dict(self) -> dict[str, Any]:
        """:meth:`SAM.state_dict` plus ``"ssam"``: the sparsity and the mask (copies; ``None``
        before the first mask), and what the subclass adds (Fisher sum, generator state)."""
        sd = super().state_dict()
        sd["ssam"] = self._extra_state()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a dict made by :meth:`state_dict` of the same class (arrays are copied)."""
        self._refuse_mid_step("load_state_dict")
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        state_dict = dict(state_dict)
        extra = state_dict.pop("ssam", None)
        if not isinstance(extra, dict) or not set(self._extra_state()) <= set(extra):
            raise ValueError(f"state_dict lacks {type(self).__name__}'s 'ssam' entry (it was not made by one)")
        _fraction("sparsity", extra["sparsity"])
        self._check_arrays("mask", extra["mask"])
        self._check_more(extra)
        super().load_state_dict(state_dict)
        self._load_extra(extra)

    def _check_more(self, extra: dict[str, Any]) -> None:
        """Validates the subclass's entries before anything is loaded."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sparsity={self.sparsity}, " + super().__repr__().split("(", 1)[1]


class SSAMF(_SparseSAM):
    r"""SSAM-F (Mi et al., NeurIPS 2022, arXiv:2210.05177) over a list of numpy arrays: SAM
    perturbing only the weights with the largest empirical Fisher information.

    Algorithm::

        F = Σ_i (∇ℓ_i(w))²                  over a few samples (per-sample gradients)
        m = 1 on the ⌊(1 − s)·N⌋ largest F, 0 elsewhere    (one global top-k over all arrays)
        g = ∇L(w);  e = ρ (g ⊙ m)/(‖g‖ + 1e-12);  w ← base_step(saved w, ∇L(w + e))

    Estimating ``F``: call :meth:`accumulate_fisher` with each sample's gradient (or a
    micro-batch's: a coarser estimate), then :meth:`update_mask`, which takes the top-k and resets
    the sum; :meth:`fisher_from` does both over one ``grad_fn`` per sample. A ready score can be
    given to :meth:`update_mask` instead. ``F`` is ``Σ_i g_i²`` over the samples given, the
    empirical Fisher the paper defines. The official code (``solver/sam.py``, ``SSAMF.step`` and
    ``update_mask``) refreshes the mask right after a SAM step without zeroing the gradients:
    they still hold that step's ``g̃ = ∇L(w + e)``, so its first sample adds ``(g̃ + g₁)²`` (the
    later ones ``g_i²``). That side effect of its loop (one of its ``num_samples``, 1024 by
    default) is not reproduced here; to reproduce it, give :meth:`accumulate_fisher` the sum
    ``g̃ + g₁`` for the first sample. Until the first mask the perturbation is SAM's (the official
    code starts from an all-zero mask: its first step is the base step on ``g``);
    ``s = 0`` is :class:`~sharpness.numpy.SAM` bit for bit. A sample gradient that is not finite is
    left out of ``F`` (:meth:`accumulate_fisher` returns False). The mask, the running sum and its
    sample count are in :meth:`state_dict` (key ``"ssam"``).

    Args:
        params, rho, base, **base_kwargs: as for :class:`~sharpness.numpy.SAM` (no ``adaptive``
            form).
        sparsity: ``s`` in ``[0, 1)``, the fraction of weights left unperturbed (0.5 in the
            paper's main runs).

    Example:
        >>> import numpy as np
        >>> from sharpness.numpy import SSAMF
        >>> rng = np.random.default_rng(0)
        >>> X, y = rng.normal(size=(32, 4)), rng.normal(size=32)
        >>> w = np.zeros(4)
        >>> def grad_fn_of(rows):
        ...     def grad_fn(params):
        ...         r = X[rows] @ params[0] - y[rows]
        ...         return 0.5 * np.mean(r**2), [X[rows].T @ r / len(r)]
        ...     return grad_fn
        >>> opt = SSAMF([w], sparsity=0.5, rho=0.05, lr=0.1)
        >>> opt.fisher_from(grad_fn_of([i]) for i in range(8))   # one grad_fn per sample
        >>> opt.density()
        0.5
        >>> losses = [opt.step(grad_fn_of(slice(None))) for _ in range(50)]
        >>> bool(losses[-1] < losses[0])
        True
    """

    def __init__(
        self, params: Sequence[np.ndarray], sparsity: float = 0.5, rho: float = 0.05, base: str = "sgd", **base_kwargs: Any
    ) -> None:
        super().__init__(params, sparsity=sparsity, rho=rho, base=base, **base_kwargs)
        self._fisher: list[np.ndarray] | None = None
        self._fisher_samples = 0

    @property
    def fisher_samples(self) -> int:
        """The gradients summed into ``F`` since the last :meth:`update_mask`."""
        return self._fisher_samples

    def accumulate_fisher(self, grads: Sequence[np.ndarray]) -> bool:
        """``F ← F + g²`` with one sample's gradient ``grads``. Returns False, and adds nothing,
        when ``grads`` holds an inf or NaN."""
        self._refuse_mid_step("accumulate_fisher")
        by_group = self._grads_by_group(grads)
        sumsq = sum(_core.sum_of_squares(g) for g in by_group)
        if not math.isfinite(sumsq):
            return False
        if self._fisher is None:
            self._fisher = [np.zeros_like(p) for p in self.params]
        for grp, gs in zip(self._groups, by_group):
            for i, g in zip(grp.index, gs):
                f = self._fisher[i]
                f += g * g  # elementwise: no kernel for it
        self._fisher_samples += 1
        return True

    def update_mask(self, scores: Sequence[np.ndarray] | None = None) -> None:
        """Sets the mask to the top ``1 − s`` of ``scores`` (one finite array per parameter, of
        its shape), by default of the Fisher sum from :meth:`accumulate_fisher`, which is then
        reset."""
        self._refuse_mid_step("update_mask")
        if scores is None:
            if self._fisher_samples == 0 or self._fisher is None:
                raise RuntimeError("update_mask() without scores needs accumulate_fisher() first")
            arrays = self._fisher
        else:
            if isinstance(scores, np.ndarray):
                raise TypeError("scores must be a list of numpy arrays (one per parameter), not one array")
            arrays = [np.asarray(s) for s in scores]
            if len(arrays) != len(self.params) or any(s.shape != p.shape for s, p in zip(arrays, self.params)):
                raise ValueError("update_mask() needs one score array per parameter, of its shape")
            if any(not np.issubdtype(s.dtype, np.number) or not np.all(np.isfinite(s)) for s in arrays):
                raise ValueError("update_mask() needs finite real scores")
        flat = np.concatenate([s.reshape(-1).astype(np.float32) for s in arrays])
        self._set_flat(_top(flat, int(flat.size * (1.0 - self.sparsity))))
        if scores is None:
            for f in self._fisher:  # type: ignore[union-attr]
                f.fill(0)
            self._fisher_samples = 0

    def fisher_from(self, grad_fns: Iterable[GradFn]) -> None:
        """Calls each ``grad_fn(params) -> (loss, grads)`` (one sample each) at the current
        weights, accumulates ``g²`` and sets the mask."""
        for grad_fn in grad_fns:
            _, grads = self._call(grad_fn)
            self.accumulate_fisher(grads)
        self.update_mask()

    def _extra_state(self) -> dict[str, Any]:
        out = super()._extra_state()
        out["fisher"] = None if self._fisher is None else [f.copy() for f in self._fisher]
        out["fisher_samples"] = self._fisher_samples
        return out

    def _check_more(self, extra: dict[str, Any]) -> None:
        self._check_arrays("fisher", extra["fisher"])

    def _load_extra(self, extra: dict[str, Any]) -> None:
        super()._load_extra(extra)
        fisher = extra["fisher"]
        self._fisher = None if fisher is None else [np.array(f, order="C", copy=True) for f in fisher]
        self._fisher_samples = int(extra["fisher_samples"])


class SSAMD(_SparseSAM):
    r"""SSAM-D (Mi et al., NeurIPS 2022, arXiv:2210.05177) over a list of numpy arrays: SAM
    perturbing a dynamic sparse set of weights.

    Algorithm::

        m₀ = 1 on the N − ⌈sN⌉ weights with the largest uniform draws (from generator)
        every few epochs, at training progress t ∈ [0, 1], with the gradient g at w:
            r = r₀ (1 + cos(π t))/2;  k = ⌊min(r·live, N − live)⌋
            drop the k live weights with the smallest drop score,
            grow  the k dead weights with the largest growth score
        g = ∇L(w);  e = ρ (g ⊙ m)/(‖g‖ + 1e-12);  w ← base_step(saved w, ∇L(w + e))

    Scores (the official code's strategies), in float32, plus 1e-7: ``"gradient"`` ``|g|``,
    ``"weight"`` ``|w|``, ``"random"`` uniform draws from :attr:`generator`. The official
    defaults: drop by gradient, grow at random, ``r₀ = 0.5``. As on the torch front the number
    grown equals the number dropped, so ``live`` stays ``N − ⌈sN⌉``. ``s = 0`` is
    :class:`~sharpness.numpy.SAM` bit for bit. The mask and the generator's state are in
    :meth:`state_dict`.

    The random draws come from a numpy ``Generator`` (``numpy.random.default_rng(seed)``), the
    torch front's from a ``torch.Generator``: the same seed gives different masks on the two
    fronts. To reproduce a torch run, copy its mask with :meth:`set_mask` and use the
    deterministic strategies (``"gradient"``, ``"weight"``).

    Args:
        params, rho, base, **base_kwargs: as for :class:`~sharpness.numpy.SAM` (no ``adaptive``
            form).
        sparsity: ``s`` in ``[0, 1)`` (0.5 in the paper's main runs).
        drop_rate: ``r₀`` in ``[0, 1]``.
        drop_strategy, growth_strategy: ``"gradient"``, ``"weight"`` or ``"random"``.
        seed: seeds :attr:`generator` (``None``: fresh entropy).

    Example:
        >>> import numpy as np
        >>> from sharpness.numpy import SSAMD
        >>> rng = np.random.default_rng(0)
        >>> X, y = rng.normal(size=(32, 4)), rng.normal(size=32)
        >>> w = np.zeros(4)
        >>> def grad_fn(params):
        ...     r = X @ params[0] - y
        ...     return 0.5 * np.mean(r**2), [X.T @ r / len(y)]
        >>> opt = SSAMD([w], sparsity=0.5, rho=0.05, lr=0.1, seed=0)
        >>> for step in range(20):
        ...     if step % 5 == 0:
        ...         _ = opt.update_mask(progress=step / 20, grads=grad_fn([w])[1])
        ...     loss = opt.step(grad_fn)
        >>> opt.density()
        0.5
    """

    def __init__(
        self,
        params: Sequence[np.ndarray],
        sparsity: float = 0.5,
        drop_rate: float = 0.5,
        drop_strategy: str = "gradient",
        growth_strategy: str = "random",
        seed: int | None = None,
        rho: float = 0.05,
        base: str = "sgd",
        **base_kwargs: Any,
    ) -> None:
        self.drop_rate = _fraction("drop_rate", drop_rate, closed_top=True)
        for name, value in (("drop_strategy", drop_strategy), ("growth_strategy", growth_strategy)):
            if value not in _STRATEGIES:
                raise ValueError(f"{name} must be one of {_STRATEGIES}, got {value!r}")
        self.drop_strategy, self.growth_strategy = drop_strategy, growth_strategy
        if seed is not None:
            seed = number("seed", seed, minimum=0, integer=True)
        super().__init__(params, sparsity=sparsity, rho=rho, base=base, **base_kwargs)
        #: The random source of the initial mask and of the ``"random"`` scores.
        self.generator: np.random.Generator = np.random.default_rng(seed)
        n = self.numel
        live = n - math.ceil(n * self.sparsity)
        self._set_flat(_top(self.generator.random(n, dtype=np.float32), live))

    def drop_rate_at(self, progress: float) -> float:
        """``r₀ (1 + cos(π t))/2``."""
        return self.drop_rate * (1.0 + math.cos(math.pi * progress)) / 2.0

    def _scores(self, strategy: str, grads: list[np.ndarray] | None) -> np.ndarray:
        if strategy == "random":
            return self.generator.random(self.numel, dtype=np.float32)
        arrays = self.params if strategy == "weight" else grads
        assert arrays is not None
        return np.concatenate([np.abs(a).reshape(-1).astype(np.float32) for a in arrays])

    def update_mask(self, progress: float, grads: Sequence[np.ndarray] | None = None) -> bool:
        """Drops and grows ``⌊min(r(t)·live, N − live)⌋`` weights.

        Args:
            progress: ``t``, the fraction of training done (e.g. ``epoch / epochs``), in [0, 1].
            grads: the gradient at the current weights, one array per parameter; needed when a
                strategy is ``"gradient"``.

        Returns:
            Whether the mask changed: False when ``k = 0``, or when ``grads`` holds an inf or
            NaN (then nothing is drawn and the mask stays).
        """
        self._refuse_mid_step("update_mask")
        if isinstance(progress, bool) or not isinstance(progress, (int, float, np.integer, np.floating)):
            raise TypeError(f"progress must be a real number, got {type(progress).__name__}")
        if not 0.0 <= float(progress) <= 1.0:
            raise ValueError(f"progress must be in [0, 1] (the fraction of training done), got {progress!r}")
        checked: list[np.ndarray] | None = None
        if "gradient" in (self.drop_strategy, self.growth_strategy):
            if grads is None:
                raise ValueError("update_mask() needs grads (the gradient at the current weights) for the 'gradient' strategy")
            by_group = self._grads_by_group(grads)
            if not math.isfinite(sum(_core.sum_of_squares(g) for g in by_group)):
                return False
            checked = [np.empty(0)] * len(self.params)
            for grp, gs in zip(self._groups, by_group):
                for i, g in zip(grp.index, gs):
                    checked[i] = g
        elif grads is not None:
            self._grads_by_group(grads)  # checked all the same, then unused
        mask = self._flat_mask()
        live = int(mask.sum())
        k = int(min(self.drop_rate_at(float(progress)) * live, mask.size - live))
        if k == 0:
            return False
        # the scores of the other side are zeroed, so the k-th largest comes from the right set
        drop = (self._scores(self.drop_strategy, checked) + _SCORE_EPS) * mask
        kept = _top(drop, live - k)
        grow = (self._scores(self.growth_strategy, checked) + _SCORE_EPS) * (np.float32(1.0) - mask)
        self._set_flat(kept + _top(grow, k))
        return True

    def _extra_state(self) -> dict[str, Any]:
        out = super()._extra_state()
        out.update(
            drop_rate=self.drop_rate,
            drop_strategy=self.drop_strategy,
            growth_strategy=self.growth_strategy,
            generator=copy.deepcopy(self.generator.bit_generator.state),
        )
        return out

    def _check_more(self, extra: dict[str, Any]) -> None:
        if extra["mask"] is None:
            raise ValueError("state_dict['ssam']['mask'] is None: SSAMD always has a mask")
        for name in ("drop_strategy", "growth_strategy"):
            if extra[name] not in _STRATEGIES:
                raise ValueError(f"state_dict['ssam'][{name!r}] must be one of {_STRATEGIES}, got {extra[name]!r}")
        _fraction("drop_rate", extra["drop_rate"], closed_top=True)
        state = extra["generator"]
        kind = type(self.generator.bit_generator)
        try:
            if not isinstance(state, dict) or state.get("bit_generator") != kind.__name__:
                raise ValueError
            kind().state = copy.deepcopy(state)  # a trial load: a bad state fails before any change
        except (ValueError, TypeError, KeyError):
            raise ValueError(f"state_dict['ssam']['generator'] is not the state of a {kind.__name__} bit generator") from None

    def _load_extra(self, extra: dict[str, Any]) -> None:
        super()._load_extra(extra)
        self.drop_rate = _fraction("drop_rate", extra["drop_rate"], closed_top=True)
        self.drop_strategy, self.growth_strategy = extra["drop_strategy"], extra["growth_strategy"]
        self.generator.bit_generator.state = copy.deepcopy(extra["generator"])
