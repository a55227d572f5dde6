"""SSAM: SAM with a sparse perturbation (SSAM-F: Fisher mask; SSAM-D: dynamic sparse mask), written
once for both fronts (:class:`sharpness.SSAMF`, :class:`sharpness.SSAMD` over torch tensors;
:class:`sharpness.numpy.SSAMF`, :class:`sharpness.numpy.SSAMD` over numpy arrays).

Mi, Shen, Ren, Zhou, Sun, Ji, Tao, "Make Sharpness-Aware Minimization Stronger: A Sparsified
Perturbation Approach", NeurIPS 2022 (arXiv:2210.05177; official code
github.com/Mi-Peng/Sparse-Sharpness-Aware-Minimization). Only a fraction ``1 − s`` of the weights
is perturbed::

    e = ρ (g ⊙ m)/(‖g‖ + 1e-12)      m ∈ {0, 1}, a fraction s of zeros; ‖g‖ the full (unmasked) norm

* SSAM-F chooses ``m`` as the top ``1 − s`` of the empirical Fisher information, the sum of
  squared per-sample gradients ``Σ_i (∇ℓ_i)²`` over a few samples, refreshed every few epochs.
* SSAM-D starts from a random mask and every few epochs drops the live weights with the smallest
  score (``|g|`` by default) and grows as many dead ones (at random by default), the drop rate
  decaying as ``r(t) = r₀(1 + cos(πt))/2`` over training (``t`` the fraction done).

The mask and the Fisher sum are vectors of the engines (``engine.mul`` applies the mask,
``engine.add_square`` adds ``g²``); the global top-k runs on the host over copies the engines give
(``engine.read``), ranked in float32 with ties going to the lower flat index (parameters in group
order, a complex one as its real pairs), and the new mask goes back through ``engine.write``. The
random draws come from the front's ``generator`` (``engine.draw_uniform``): a ``torch.Generator``
on the torch front, a numpy ``Generator`` on the numpy front, so the same seed gives different masks
on the two fronts (:meth:`SSAMF.set_mask` copies one).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from sharpness._validation import number
from sharpness.methods.base import Method
from sharpness.methods.contract import Engine

__all__ = ["SSAMF", "SSAMD"]

_MASK = "ssam_mask"  # m, in vectors (checkpointed)
_FISHER = "ssam_fisher"  # the running Σ g², in vectors (checkpointed)
_SCORE_EPS = np.float32(1e-7)  # added to SSAM-D's scores so that every candidate beats a 0
_STRATEGIES = ("gradient", "weight", "random")


def _fraction(name: str, value: Any, closed_top: bool = False) -> float:
    return number(name, value, minimum=0, maximum=1) if closed_top else number(name, value, minimum=0, below=1)


def _strategy(name: str, value: Any) -> str:
    if value not in _STRATEGIES:
        raise ValueError(f"{name} must be one of {_STRATEGIES}, got {value!r}")
    return value


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


def _flat(arrays: list[np.ndarray]) -> np.ndarray:
    """One float32 vector over ``arrays`` in order (what the mask ranks)."""
    if not arrays:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate([a.reshape(-1).astype(np.float32, copy=False) for a in arrays])


class _SparseSAM(Method):
    """What both SSAMs share: the mask in :attr:`vectors`, the masked perturbation, and the host
    copies of the mask. The mask covers the trainable parameters of the groups with ``sam_rho ≠ 0``
    (in group order); before a mask is set the perturbation is SAM's."""

    def __init__(self, *args: Any, sparsity: float = 0.5, **kwargs: Any) -> None:
        if kwargs.get("adaptive"):
            raise ValueError(f"{type(self).__name__} has no adaptive (ASAM) form")
        sparsity = _fraction("sparsity", sparsity)
        super().__init__(*args, **kwargs)
        # Settings in sam_state: checkpointed with the mask they made (a checkpoint's win).
        self.sam_state["ssam_sparsity"] = sparsity
        self.sam_state["ssam_masked"] = False  # whether a mask has been set

    @property
    def sparsity(self) -> float:
        """``s``, the fraction of weights left unperturbed."""
        return self.sam_state["ssam_sparsity"]

    def _checkpointed_vectors(self) -> tuple[str, ...]:
        return (_MASK,)

    def _check_checkpoint_method(self, sam: dict[str, Any]) -> None:
        """Also checks the mask's settings before anything is loaded (a checkpoint's win)."""
        super()._check_checkpoint_method(sam)
        state = sam.get("state") if isinstance(sam, dict) else None
        if not isinstance(state, dict) or "ssam_masked" not in state:
            raise ValueError(f"state_dict lacks {type(self).__name__}'s entries in ['sam']['state'] (it was not made by one)")
        if "ssam_sparsity" in state:
            _fraction("sparsity", state["ssam_sparsity"])

    # -- the parameters the mask covers and host copies of their vectors ---------------------------

    def _masked(self) -> list[Any]:
        """The trainable parameters of the perturbed groups, in group order (numpy arrays are all
        trained; a torch tensor says so by ``requires_grad``)."""
        return [p for g in self.param_groups if g["sam_rho"] != 0 for p in g["params"] if getattr(p, "requires_grad", True)]

    def _read(self, name: str, engines: Sequence[Engine] | None = None) -> list[np.ndarray]:
        """Host copies of the vector ``name`` for :meth:`_masked`, in its order."""
        by_id: dict[int, np.ndarray] = {}
        for engine in self.engines() if engines is None else engines:  # type: ignore[attr-defined]  # both fronts
            for p, array in zip(engine.params, engine.read(name, self.vectors)):
                by_id[id(p)] = array
        return [by_id[id(p)] for p in self._masked()]

    def _write(self, name: str, values: list[Any]) -> None:
        """The vector ``name`` of :meth:`_masked` ← ``values`` (host arrays, or numbers to fill)."""
        by_id = {id(p): v for p, v in zip(self._masked(), values)}
        for engine in self.engines():  # type: ignore[attr-defined]  # both fronts
            engine.write(name, [by_id.get(id(p)) for p in engine.params], self.vectors)

    def _set_flat(self, keep: np.ndarray, shapes: list[tuple[int, ...]]) -> None:
        """The mask ← ``keep`` (float32 flags over every masked weight, in order)."""
        arrays, offset = [], 0
        for shape in shapes:
            size = math.prod(shape)
            arrays.append(keep[offset : offset + size].reshape(shape))
            offset += size
        self._write(_MASK, arrays)
        self.sam_state["ssam_masked"] = True

    def _flat_mask(self) -> tuple[np.ndarray, list[tuple[int, ...]]]:
        """The mask as float32 flags over every masked weight, and the shapes it splits into."""
        masks = self._mask_arrays()
        return _flat(masks), [m.shape for m in masks]

    def _refuse_mid_step(self, name: str) -> None:
        if self._pending is not None:
            raise RuntimeError(f"{name}() between first_step() and second_step(): the weights are perturbed")

    def _host_arrays(self, what: str, values: Any) -> list[np.ndarray]:
        """``values`` (one array per masked parameter, of its shape; a complex parameter's as its
        real pairs) as host numpy arrays, checked."""
        if hasattr(values, "shape"):
            raise TypeError(f"{what} must be a list of arrays (one per perturbed parameter), not one array")
        values, params = list(values), self._masked()
        if len(values) != len(params):
            raise ValueError(f"got {len(values)} {what} arrays for {len(params)} perturbed parameters")
        out = []
        for i, (value, p) in enumerate(zip(values, params)):
            try:
                out.append(self._host_array(value, p))
            except ValueError as error:
                raise ValueError(f"{what}[{i}]: {error}") from None
        return out

    # -- what users see ------------------------------------------------------------------------

    def _mask_arrays(self) -> list[np.ndarray]:
        """The current mask as host numpy arrays, one per masked parameter (see :meth:`mask`)."""
        if not self.sam_state["ssam_masked"]:
            return [np.ones_like(w) for w in self._read("weights")]
        return self._read(_MASK)

    def mask(self) -> list[Any]:
        """Copies of the current mask, one per trainable parameter of the groups with ``sam_rho ≠
        0`` (all ones before the first mask is set), as the front's arrays (numpy arrays; CPU
        tensors on the torch front, float32 unless the parameter is float64); for a complex
        parameter, the mask of its real pairs (the shape of ``torch.view_as_real(p)``)."""
        return [self._front_array(m) for m in self._mask_arrays()]

    def density(self) -> float:
        """The fraction of perturbed weights (``1 − s`` once a mask is set)."""
        if not self.sam_state["ssam_masked"]:
            return 1.0
        flat = _flat(self._read(_MASK))
        return float(np.count_nonzero(flat) / max(1, flat.size))

    def set_mask(self, masks: Iterable[Any]) -> None:
        """Sets the mask explicitly: one array of 0s and 1s per masked parameter, of its shape (a
        complex parameter's of its real pairs), e.g. a mask saved elsewhere or the other front's
        :meth:`mask`."""
        self._refuse_mid_step("set_mask")
        arrays = self._host_arrays("mask", masks)
        for i, m in enumerate(arrays):
            if not np.all((m == 0) | (m == 1)):
                raise ValueError(f"mask[{i}] must hold only 0s and 1s")
        self._write(_MASK, arrays)
        self.sam_state["ssam_masked"] = True

    # -- the step ------------------------------------------------------------------------------

    def _perturb(self, engines: Sequence[Engine], norm: float) -> None:
        if self.sam_state["ssam_masked"]:
            for engine in engines:  # g ⊙ m in the gradients (they are replaced by the second pass)
                engine.mul(_MASK, "grads", self.vectors)
        for engine in engines:  # e = ρ (g ⊙ m)/‖g‖: the norm is the unmasked one, as in the paper
            engine.perturb(self.param_groups, norm)


class SSAMF(_SparseSAM):
    r"""SSAM-F (Mi et al., NeurIPS 2022, arXiv:2210.05177): SAM perturbing only the weights with
    the largest empirical Fisher information.

    Algorithm::

        F = Σ_i (∇ℓ_i(w))²                      over a few samples (the paper: per-sample gradients)
        m = 1 on the ⌊(1 − s)·N⌋ largest F, 0 elsewhere     (one global top-k; refreshed every few epochs)
        g = ∇L(w);  e = ρ (g ⊙ m)/(‖g‖ + 1e-12);  w ← base_step(w, ∇L(w + e))

    Estimating ``F``: after each sample's gradient (or a micro-batch's: a coarser estimate), call
    :meth:`accumulate_fisher` (torch: with the gradient in ``p.grad``; numpy: given it), which adds
    ``g²`` to a running sum kept in :attr:`vectors` (one pass of the engines' ``add_square``); then
    :meth:`update_mask` takes the top-k and resets the sum. :meth:`fisher_from` does both over one
    gradient pass per sample (torch: closures running a backward pass, from zero gradients; numpy:
    ``grad_fn(params) -> (loss, grads)``). A ready score (e.g. from ``torch.func`` per-sample
    gradients) can be given to :meth:`update_mask` instead. A sample gradient that is not finite
    is left out of ``F`` (:meth:`accumulate_fisher` returns False).

    ``F`` is ``Σ_i g_i²``, the empirical Fisher the paper defines. The official code
    (``solver/sam.py``, ``SSAMF.step`` and ``update_mask``) refreshes the mask right after a SAM
    step without zeroing first: ``p.grad`` still holds that step's ``g̃ = ∇L(w + e)``, so its first
    sample adds ``(g̃ + g₁)²`` (the later ones ``g_i²``: it zeroes after each). That term is a side
    effect of the loop, in one of its ``num_samples`` (1024 by default), so it is not reproduced;
    to reproduce it, give :meth:`accumulate_fisher` the sum ``g̃ + g₁`` for the first sample. Until
    the first mask the perturbation is SAM's; the official code starts from an all-zero mask (its
    first step has no perturbation: the base step on ``g``) and sets the mask after that step.
    ``s = 0`` is SAM bit for bit. The mask covers the trainable parameters of the groups with
    ``sam_rho ≠ 0`` and is checkpointed with the running sum and ``s``
    (``state_dict()["sam"]["vectors"]`` and ``["state"]``; a checkpoint's ``s`` wins). During
    :meth:`first_step` the gradients become ``g ⊙ m``.

    Args:
        params and the front's own arguments: as for :class:`sharpness.SAM` (torch: ``base_optimizer,
            rho, backend, seed, ...``) or :class:`sharpness.numpy.SAM` (``rho, base, seed, ...``);
            no ``adaptive`` form.
        sparsity: ``s`` in ``[0, 1)``, the fraction of weights left unperturbed (0.5 in the paper's
            main runs).

    Example:
        >>> import torch, sharpness
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = sharpness.SSAMF(model.parameters(), torch.optim.SGD, sparsity=0.5, rho=0.05, lr=0.1)
        >>> x, y = torch.randn(8, 4), torch.randn(8, 2)
        >>> opt.fisher_from(lambda i=i: torch.nn.functional.mse_loss(model(x[i:i+1]), y[i:i+1]).backward() for i in range(8))
        >>> opt.density()
        0.5
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> loss = opt.step(closure)

        The numpy front, one ``grad_fn`` per sample:

        >>> import numpy as np
        >>> from sharpness.numpy import SSAMF
        >>> rng = np.random.default_rng(0)
        >>> X, t = rng.normal(size=(32, 4)), rng.normal(size=32)
        >>> w = np.zeros(4)
        >>> def grad_fn_of(rows):
        ...     def grad_fn(params):
        ...         r = X[rows] @ params[0] - t[rows]
        ...         return 0.5 * np.mean(r**2), [X[rows].T @ r / len(r)]
        ...     return grad_fn
        >>> opt = SSAMF([w], sparsity=0.5, rho=0.05, lr=0.1)
        >>> opt.fisher_from(grad_fn_of([i]) for i in range(8))
        >>> opt.density()
        0.5
        >>> losses = [opt.step(grad_fn_of(slice(None))) for _ in range(50)]
        >>> bool(losses[-1] < losses[0])
        True
    """

    def __init__(self, *args: Any, sparsity: float = 0.5, **kwargs: Any) -> None:
        super().__init__(*args, sparsity=sparsity, **kwargs)
        self.sam_state["ssam_fisher_samples"] = 0

    @property
    def fisher_samples(self) -> int:
        """The gradients summed into ``F`` since the last :meth:`update_mask`."""
        return self.sam_state["ssam_fisher_samples"]

    def _checkpointed_vectors(self) -> tuple[str, ...]:
        return (_MASK, _FISHER)

    def _check_checkpoint_method(self, sam: dict[str, Any]) -> None:
        super()._check_checkpoint_method(sam)
        if "ssam_fisher_samples" in sam["state"]:
            number("ssam_fisher_samples", sam["state"]["ssam_fisher_samples"], minimum=0, integer=True)

    def accumulate_fisher(self, grads: Any = None) -> bool:
        """``F ← F + g²`` with one sample's gradient (torch: the one in ``p.grad``; numpy:
        ``grads``, one array per parameter). Returns False, and adds nothing, when the gradient
        holds an inf or NaN."""
        self._refuse_mid_step("accumulate_fisher")
        return self._accumulate(self._engines_with_gradients(grads))

    def _accumulate(self, engines: Sequence[Engine]) -> bool:
        if not math.isfinite(self._gradient_norm(engines)):
            return False
        for engine in engines:
            engine.add_square("grads", _FISHER, self.vectors)
        self.sam_state["ssam_fisher_samples"] += 1
        return True

    def update_mask(self, scores: Iterable[Any] | None = None) -> None:
        """Sets the mask to the top ``1 − s`` of ``scores`` (one finite real array per perturbed
        parameter, of its shape; a complex parameter's of the shape of ``torch.view_as_real(p)``,
        one score per real coordinate), by default of the Fisher sum from
        :meth:`accumulate_fisher`, which is then reset (explicit scores leave it alone)."""
        self._refuse_mid_step("update_mask")
        if scores is None:
            if self.sam_state["ssam_fisher_samples"] == 0:
                raise RuntimeError("update_mask() without scores needs accumulate_fisher() first")
            arrays = self._read(_FISHER)  # a complex Fisher sum: Σ re², Σ im² per weight
        else:
            try:
                arrays = self._host_arrays("score", scores)
            except ValueError as error:
                raise ValueError(
                    "update_mask() needs one score array per perturbed parameter, of its shape (for a complex "
                    f"parameter: the shape of torch.view_as_real(p)): {error}"
                ) from None
            if any(not np.issubdtype(a.dtype, np.number) or np.iscomplexobj(a) or not np.all(np.isfinite(a)) for a in arrays):
                raise ValueError("update_mask() needs finite real scores")
        flat = _flat(arrays)
        self._set_flat(_top(flat, int(flat.size * (1.0 - self.sparsity))), [a.shape for a in arrays])
        if scores is None:
            self._write(_FISHER, [0.0] * len(arrays))
            self.sam_state["ssam_fisher_samples"] = 0

    def fisher_from(self, passes: Iterable[Any]) -> None:
        """Runs each of ``passes`` (one sample's gradient: on the torch front a callable running its
        forward and backward pass, from zero gradients, which are zeroed again after the last; on the
        numpy front a ``grad_fn(params) -> (loss, grads)``), accumulates ``g²`` and sets the mask."""
        self._refuse_mid_step("fisher_from")
        for gradient_pass in passes:
            self.zero_grad()  # type: ignore[attr-defined]  # both fronts
            _, _, engines = self._gradients_at(gradient_pass)
            self._accumulate(engines)
        self.zero_grad()  # type: ignore[attr-defined]  # both fronts
        self.update_mask()


class SSAMD(_SparseSAM):
    r"""SSAM-D (Mi et al., NeurIPS 2022, arXiv:2210.05177): SAM perturbing a dynamic sparse set
    of weights.

    Algorithm::

        m₀ = 1 on the N − ⌈sN⌉ weights with the largest uniform draws (from generator)
        every few epochs, at training progress t ∈ [0, 1], with the gradient g at w:
            r = r₀ (1 + cos(π t))/2;  k = ⌊min(r·live, N − live)⌋
            drop the k live weights with the smallest drop score,
            grow  the k dead weights with the largest growth score
        g = ∇L(w);  e = ρ (g ⊙ m)/(‖g‖ + 1e-12);  w ← base_step(w, ∇L(w + e))

    Scores (the official code's strategies), in float32, plus 1e-7: ``"gradient"`` ``|g|``,
    ``"weight"`` ``|w|``, ``"random"`` uniform draws from :attr:`generator` (the drop scores drawn
    before the growth scores). The official code's defaults: drop by gradient, grow at random,
    ``r₀ = 0.5``. Unlike the official code, the number grown always equals the number dropped (it
    keeps ``live``, ``N − ⌈sN⌉``, constant; the official code drops ``⌊(N − sN)·r⌋`` and grows
    ``⌊min((N − sN)·r, sN)⌋``, which loses live weights when ``s`` is small). ``s = 0`` is SAM bit
    for bit. The mask, its settings and the generator are checkpointed (a checkpoint's settings
    win).

    Call :meth:`update_mask` after a backward pass and before :meth:`first_step` (the gradient
    scores read ``p.grad`` on the torch front; the numpy front takes ``grads=``). The torch front
    draws from a ``torch.Generator``, the numpy front from a numpy ``Generator``: the same seed
    gives different masks; to reproduce a run of the other front, copy its mask with
    :meth:`set_mask` and use the deterministic strategies.

    Args:
        params and the front's own arguments: as for :class:`sharpness.SAM` (torch: ``base_optimizer,
            rho, backend, seed, ...``) or :class:`sharpness.numpy.SAM` (``rho, base, seed, ...``);
            no ``adaptive`` form. ``seed`` seeds :attr:`generator`.
        sparsity: ``s`` in ``[0, 1)`` (0.5 in the paper's main runs).
        drop_rate: ``r₀`` in ``[0, 1]``.
        drop_strategy, growth_strategy: ``"gradient"``, ``"weight"`` or ``"random"``.

    Example:
        >>> import torch, sharpness
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = sharpness.SSAMD(model.parameters(), torch.optim.SGD, sparsity=0.5, rho=0.05, lr=0.1, seed=0)
        >>> x, y = torch.randn(8, 4), torch.randn(8, 2)
        >>> for step in range(4):
        ...     torch.nn.functional.mse_loss(model(x), y).backward()
        ...     if step % 2 == 0:
        ...         _ = opt.update_mask(progress=step / 4)
        ...     _ = opt.first_step(zero_grad=True)
        ...     torch.nn.functional.mse_loss(model(x), y).backward()
        ...     opt.second_step(zero_grad=True)
        >>> opt.density()
        0.5

        The numpy front takes the gradient:

        >>> import numpy as np
        >>> from sharpness.numpy import SSAMD
        >>> rng = np.random.default_rng(0)
        >>> X, t = rng.normal(size=(32, 4)), rng.normal(size=32)
        >>> w = np.zeros(4)
        >>> def grad_fn(params):
        ...     r = X @ params[0] - t
        ...     return 0.5 * np.mean(r**2), [X.T @ r / len(t)]
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
        *args: Any,
        sparsity: float = 0.5,
        drop_rate: float = 0.5,
        drop_strategy: str = "gradient",
        growth_strategy: str = "random",
        **kwargs: Any,
    ) -> None:
        drop_rate = _fraction("drop_rate", drop_rate, closed_top=True)
        drop_strategy = _strategy("drop_strategy", drop_strategy)
        growth_strategy = _strategy("growth_strategy", growth_strategy)
        super().__init__(*args, sparsity=sparsity, **kwargs)
        self.sam_state.update(
            ssam_drop_rate=drop_rate, ssam_drop_strategy=drop_strategy, ssam_growth_strategy=growth_strategy
        )
        shapes = [m.shape for m in self._read(_MASK)]
        n = sum(math.prod(shape) for shape in shapes)
        self._set_flat(_top(self._draw(n), n - math.ceil(n * self.sparsity)), shapes)

    @property
    def drop_rate(self) -> float:
        """``r₀``."""
        return self.sam_state["ssam_drop_rate"]

    @property
    def drop_strategy(self) -> str:
        return self.sam_state["ssam_drop_strategy"]

    @property
    def growth_strategy(self) -> str:
        return self.sam_state["ssam_growth_strategy"]

    def _check_checkpoint_method(self, sam: dict[str, Any]) -> None:
        super()._check_checkpoint_method(sam)
        state = sam["state"]
        if "ssam_drop_rate" in state:
            _fraction("drop_rate", state["ssam_drop_rate"], closed_top=True)
        for name in ("drop_strategy", "growth_strategy"):
            if f"ssam_{name}" in state:
                _strategy(name, state[f"ssam_{name}"])

    def _draw(self, n: int) -> np.ndarray:
        """``n`` uniform float32 draws from the front's generator, one call over every masked
        weight (so the numbers do not depend on how the parameters are split between engines)."""
        return self.engines()[0].draw_uniform(n, self.generator)  # type: ignore[attr-defined]  # both fronts

    def drop_rate_at(self, progress: float) -> float:
        """``r₀ (1 + cos(π t))/2``."""
        return self.drop_rate * (1.0 + math.cos(math.pi * progress)) / 2.0

    def _scores(self, strategy: str, engines: Sequence[Engine], n: int) -> np.ndarray:
        if strategy == "random":
            return self._draw(n)
        return np.abs(_flat(self._read("weights" if strategy == "weight" else "grads", engines)))

    def update_mask(self, progress: float, grads: Any = None) -> bool:
        """Drops and grows ``⌊min(r(t)·live, N − live)⌋`` weights.

        Args:
            progress: ``t``, the fraction of training done (e.g. ``epoch / epochs``), in [0, 1].
            grads: numpy front: the gradient at the current weights, one array per parameter;
                needed when a strategy is ``"gradient"``. The torch front reads ``p.grad``.

        Returns:
            Whether the mask changed: False when ``k = 0``, or when the gradient holds an inf or
            NaN (then nothing is drawn and the mask stays).
        """
        self._refuse_mid_step("update_mask")
        if isinstance(progress, bool) or not isinstance(progress, (int, float, np.integer, np.floating)):
            raise TypeError(f"progress must be a real number, got {type(progress).__name__}")
        if not 0.0 <= float(progress) <= 1.0:
            raise ValueError(f"progress must be in [0, 1] (the fraction of training done), got {progress!r}")
        if "gradient" in (self.drop_strategy, self.growth_strategy) or grads is not None:
            engines = self._engines_with_gradients(grads)  # (given grads are checked even when unused)
            if "gradient" in (self.drop_strategy, self.growth_strategy) and not math.isfinite(self._gradient_norm(engines)):
                return False
        else:
            engines = self._begin()  # type: ignore[attr-defined]  # both fronts: settings checked, gradients synced
        mask, shapes = self._flat_mask()
        live = int(mask.sum())
        k = int(min(self.drop_rate_at(float(progress)) * live, mask.size - live))
        if k == 0:
            return False
        # the scores of the other side are zeroed, so the k-th largest comes from the right set
        drop = (self._scores(self.drop_strategy, engines, mask.size) + _SCORE_EPS) * mask
        kept = _top(drop, live - k)
        grow = (self._scores(self.growth_strategy, engines, mask.size) + _SCORE_EPS) * (np.float32(1.0) - mask)
        self._set_flat(kept + _top(grow, k), shapes)
        return True
