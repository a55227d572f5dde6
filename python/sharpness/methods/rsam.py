"""Random SAM (R-SAM; Liu, Mai, Cheng, Chen, Hsieh, You, "Random Sharpness-Aware Minimization",
NeurIPS 2022): the rule, written once for both fronts (:class:`sharpness.RandomSAM`,
:class:`sharpness.numpy.RandomSAM`).

One gradient-ascent step approximates SAM's inner maximisation poorly on a rough loss surface.
R-SAM smooths the surface with random noise on the weights, takes the first gradient at the noisy
point, and mixes that gradient with the noise to pick the ascent direction. This follows the
authors' official code (github.com/RSAM-Optimizer/R-SAM, ``vit_jax/train.py``: ``random_vector``
and ``sam_gradient``)::

    δ   = σ · z · ‖filter‖                 filter-wise relative noise, z ~ N(0, I)
    g_δ = ∇L(w + δ)                        the first pass, at the noisy point
    d   = λ g_δ + δ                        λ = 2 in the official code
    e   = ρ d/‖d‖                          from w (not from w + δ): ‖e‖ = ρ
    w   ← base_step(w, ∇L(w + e))

The official run increases σ over training with a cosine, from 5e-4 to 2.5e-3. ``σ = 0`` is SAM.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from sharpness._validation import number
from sharpness.methods.base import Method, Phase
from sharpness.methods.contract import Engine

__all__ = ["RandomSAM"]

_DELTA = "rsam_delta"  # δ, from add_noise() to first_step() (a vector of the step: not checkpointed)

_HOW_TO_CALL = (
    "call RandomSAM either as one step, `opt.step(closure)` (torch) or `opt.step(grad_fn)` (numpy), "
    "or in three calls: `opt.add_noise()`, then `opt.first_step(...)` with the gradient taken at w + δ, "
    "then `opt.second_step(...)` with the gradient taken at w + e"
)


def _check_sigma(sigma: Any) -> float:
    return number("sigma", sigma, minimum=0)


class RandomSAM(Method):
    r"""Random SAM (Liu et al., "Random Sharpness-Aware Minimization", NeurIPS 2022): filter-wise
    relative noise on the weights before the first pass; the ascent direction mixes the noisy
    gradient with the noise, and is taken from the clean weights.

    Algorithm, as the authors' official code does it (RSAM-Optimizer/R-SAM, ``vit_jax/train.py``)::

        δ   : per parameter p; for ndim > 1, per output unit i (dim 0: the rows of a Linear
              weight (out, in), the filters of a Conv weight (out, in, kh, kw))
                  δ[i] = σ · z[i] · ‖p[i]‖₂
              for 1-D (and 0-d) parameters          δ = σ · z · ‖p‖₂
              z ~ N(0, I) from the optimizer's generator   (groups with sam_rho ≠ 0)
        g_δ = ∇L(w + δ)                                   first gradient, at w + δ
        d   = λ g_δ + δ                                   λ = 2 in the official code
        e   = ρ d / (‖d‖ + 1e-12)                         from the saved w: ‖e‖ = ρ
        w   ← base_step(w, ∇L(w + e))                     from the exact saved w

    ``‖d‖`` is one global norm over the parameters of the groups with ``sam_rho ≠ 0`` that hold a
    gradient; ``ρ`` may differ per group (``sam_rho``), and a group's ``sam_norm_weight`` ``c``
    weighs its share of the norm (``‖d‖² = Σ c²‖d_group‖²``), as in SAM. Parameters without a
    gradient get the noise for the first pass but no ascent. With ``maximize=True`` the objective
    is ``−L``: ``d = −λ g_δ + δ``. (JAX kernels keep the output axis last; the official code's
    per-unit norms over the fan-in are dim 0 here. On the numpy front axis 0 is the output axis
    too: store a weight used as ``x @ W.T``, shape (out, in), to follow the paper.)

    The noise ``z`` comes from :attr:`generator` (the front's: a ``torch.Generator``, or a
    ``numpy.random.Generator``), one standard normal vector per engine over its noised parameters
    in order: on the torch front drawn on the CPU in float32 (float64 for float64 weights); on
    the numpy front one ``generator.standard_normal(n, dtype=dtype)`` per dtype, the dtypes in the
    order they first appear in ``params`` (nothing drawn where ``n = 0``). A resumed run
    (``state_dict`` saves the generator and ``σ``) draws the same noise. ``δ`` is added to the
    weights from that precision (rounded once) and kept in the weights' dtype in :attr:`vectors`
    (``"rsam_delta"``: one copy of the weights; not checkpointed). The weights are saved before
    the noise and restored exactly. ``σ = 0`` is SAM bit for bit (nothing is drawn). A
    non-finite ``‖g_δ‖`` or ``‖d‖`` applies no perturbation: the weights are back at ``w`` and
    ``stats["nonfinite_skips"]`` counts it; the step is then the base optimizer's, with the
    gradient of the second pass (taken at ``w``). :attr:`last_grad_norm` is ``‖g_δ‖``,
    :attr:`last_direction_norm` is ``‖d‖`` (``‖g‖`` with ``σ = 0``; NaN where not computed).

    Where this differs from the official code: the code draws one ``z`` per tensor with the same
    random key for every tensor (tensors of one shape get the same numbers); here each tensor gets
    its own numbers. It adds ``1e-16`` to the norm of 1-D tensors (a noise of at most ``σ·1e-16``
    on an all-zero bias); here a zero tensor gets no noise. Its ``ρ`` schedule (1.5 to 2.5, tied
    to the learning rate), gradient clipping to norm 1 and the base optimizer (Adam, weight decay
    0.3, ViT-B/16 on ImageNet) are the training recipe, not the optimizer: set them yourself.

    ``σ`` schedule: the official run raises σ with a cosine over the T training steps,
    ``σ_t = 5e-4 · (1 + 4·(1 − cos(π t/T))/2)``, from 5e-4 to 2.5e-3. :attr:`sigma` may be changed
    between steps (``opt.sigma = sigma_t`` before each step); the default 1.5e-3 is that
    schedule's mean over the run. The paper's settings for other models and data sets (CIFAR) were
    not checked here.

    A whole step (``step(closure)``, ``step(grad_fn)``) adds the noise itself. In separate calls,
    call :meth:`add_noise` before the first forward pass (first gradient), then ``first_step``
    and ``second_step`` as for SAM; :meth:`restore` undoes a pending :meth:`add_noise` or
    ``first_step``. Under ``torch.amp.GradScaler``, give the scaler to ``first_step``
    (``grad_scaler=scaler``): ``d = λ g_δ + δ`` adds the first gradient to the noise, so ``g_δ``
    must be unscaled first; the loop is ``opt.add_noise()``, then SAM's GradScaler loop.

    Args:
        params, rho, and the front's own arguments: as for :class:`sharpness.SAM` (torch:
            ``base_optimizer``, ``backend``, ``seed`` ..., ``memory="exact"`` only) or
            :class:`sharpness.numpy.SAM` (``base``, ``seed`` ...). No ``adaptive`` (ASAM) form.
            The official ViT run uses ``ρ`` between 1.5 and 2.5, far above SAM's usual 0.05;
            ``‖e‖ = ρ`` whatever ``σ`` is. DTensor (FSDP2) parameters are refused (the per-filter
            norms need whole tensors).
        sigma: ``σ``, the noise's standard deviation relative to each filter's (each output
            unit's) norm. Default 1.5e-3. Kept in ``sam_state`` (saved by ``state_dict``).
        lam: ``λ``, the weight of the noisy gradient against the noise in the ascent direction
            (2.0 in the official code); > 0.

    Example:
        >>> import torch, sharpness
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = sharpness.RandomSAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, seed=0)
        >>> x, y = torch.randn(8, 4), torch.randn(8, 2)
        >>> opt.add_noise()  # w ← w + δ (the weights w are saved)
        >>> torch.nn.functional.mse_loss(model(x), y).backward()
        >>> _ = opt.first_step(zero_grad=True)  # w ← w + ρ d/‖d‖, d = λ g_δ + δ
        >>> torch.nn.functional.mse_loss(model(x), y).backward()
        >>> opt.second_step(zero_grad=True)  # w ← base step from the saved w
        >>> opt.sigma = 2.5e-3  # σ may follow a schedule, set between steps

        On the numpy front (``grad_fn(params) -> (loss, grads)``):

        >>> import numpy as np
        >>> from sharpness.numpy import RandomSAM
        >>> rng = np.random.default_rng(0)
        >>> X, Y = rng.normal(size=(64, 3)), rng.normal(size=(64, 2))
        >>> W, b = np.zeros((2, 3)), np.zeros(2)  # (out, in): rows are output units
        >>> def grad_fn(params):
        ...     r = X @ params[0].T + params[1] - Y
        ...     return 0.5 * np.mean(r**2), [r.T @ X / len(X), r.mean(axis=0)]
        >>> opt = RandomSAM([W, b], rho=0.05, sigma=1e-2, lr=0.1, momentum=0.9, seed=0)
        >>> losses = [opt.step(grad_fn) for _ in range(50)]
        >>> bool(losses[-1] < losses[0])
        True
    """

    #: ``d = λ g_δ + δ`` adds the first gradient to the noise: it must be unscaled first.
    needs_unscaled_first_gradient = (
        "its ascent direction λ·g_δ + δ adds the first gradient to the noise δ, "
        "so the perturbation would depend on the loss scale"
    )

    def __init__(self, *args: Any, sigma: float = 1.5e-3, lam: float = 2.0, **kwargs: Any) -> None:
        sigma = _check_sigma(sigma)
        self.lam = number("lam", lam, above=0)
        if kwargs.get("memory", "exact") != "exact":
            raise ValueError('RandomSAM restores from a saved copy: memory="exact" only')
        #: ``‖d‖`` of the last ``first_step`` (``‖g‖`` with ``σ = 0``; NaN where not computed).
        self.last_direction_norm = math.nan
        self._noised = False  # between add_noise() (σ ≠ 0) and first_step()
        self._noised_engines: Sequence[Engine] | None = None  # the engines the noise went into
        self._with_noise = False  # this first_step's perturbation is R-SAM's (not SAM's, σ = 0)
        self._direction_skipped = False  # this first_step met a non-finite ‖d‖
        super().__init__(*args, **kwargs)
        self.sam_state["sigma"] = sigma
        self._refuse_shards(self.engines())  # type: ignore[attr-defined]  # both fronts have engines()

    @property
    def sigma(self) -> float:
        """``σ``, relative to each filter's norm; may be changed between steps (kept in
        ``sam_state``, so ``state_dict`` saves it)."""
        return self.sam_state["sigma"]

    @sigma.setter
    def sigma(self, value: float) -> None:
        self.sam_state["sigma"] = _check_sigma(value)

    @property
    def noised(self) -> bool:
        """True between :meth:`add_noise` (with ``σ ≠ 0``) and ``first_step``."""
        return self._noised

    def _setup_group(self, group: dict[str, Any]) -> None:
        if group["sam_adaptive"]:
            raise ValueError("RandomSAM has no adaptive (ASAM) form: its ascent is ρ d/‖d‖ with d = λ g_δ + δ")

    @staticmethod
    def _refuse_shards(engines: Sequence[Engine]) -> None:
        if any(engine.shards_parameters for engine in engines):
            raise ValueError("RandomSAM does not support DTensor (FSDP2) parameters: the per-filter norms need whole tensors")

    # -- the noise, before the first pass ---------------------------------------------------------

    def add_noise(self) -> None:
        """Saves the weights ``w`` and moves them to ``w + δ``, ``δ`` the filter-wise relative
        noise (groups with ``sam_rho = 0`` and frozen parameters are left alone, and nothing is
        drawn for them). Call it before the first forward pass (the first gradient) of a step.
        With ``σ = 0`` it does nothing."""
        if self._pending is not None or self._noised:
            raise RuntimeError("add_noise() between first_step() and second_step(), or twice; " + _HOW_TO_CALL)
        sigma = self.sigma
        if sigma == 0.0:
            return
        engines = self._begin()  # type: ignore[attr-defined]  # both fronts: the engines, settings checked
        self._refuse_shards(engines)
        scales = {gi: sigma for gi, group in enumerate(self.param_groups) if group["sam_rho"] != 0}
        try:
            for engine in engines:
                engine.save_weights()
                engine.add_filter_noise(_DELTA, scales, self.generator, self.vectors)  # type: ignore[attr-defined]
        except BaseException:
            for engine in engines:
                engine.restore()  # never leave part of the noise behind
            raise
        self._noised = True
        self._noised_engines = list(engines)

    def _before_first_pass(self) -> bool:
        self.add_noise()
        return self._noised

    # -- the two halves ----------------------------------------------------------------------------

    def first_step(self, *args: Any, **kwargs: Any) -> bool:
        """The front's ``first_step`` (SAM's arguments), with the first gradient ``g_δ`` taken at
        the noisy weights of :meth:`add_noise`: the weights go to ``w + ρ d/‖d‖``, ``d = λ g_δ +
        δ``. If it raises before the perturbation, the weights are back at ``w``."""
        if self._pending is None and not self._noised and self.sigma != 0.0:
            name = type(self).__name__
            raise RuntimeError(f"{name}.first_step() needs add_noise() before the first forward pass; " + _HOW_TO_CALL)
        noised = self._noised
        try:
            return super().first_step(*args, **kwargs)  # type: ignore[misc]
        except BaseException:
            if noised and self._noised:
                self.restore()  # never leave the weights at w + δ behind an exception
            raise

    def _perturb_or_skip(self, engines: Sequence[Engine], norm: float) -> Phase:
        noised, self._noised = self._noised, False
        noised_engines, self._noised_engines = self._noised_engines, None
        self._with_noise = noised
        self._direction_skipped = False
        self.last_direction_norm = math.nan
        if not noised:  # σ = 0: SAM's step
            phase = super()._perturb_or_skip(engines, norm)
            self.last_direction_norm = norm
            return phase
        same = noised_engines is None or (
            len(noised_engines) == len(engines) and all(a is b for a, b in zip(noised_engines, engines))
        )
        if not same:
            raise RuntimeError("the parameters' layout changed between add_noise() and first_step()")
        if not math.isfinite(norm):  # a non-finite ‖g_δ‖: back to w, no perturbation
            for engine in engines:
                engine.restore()
            self.stats["nonfinite_skips"] += 1
            return Phase.SKIPPED
        phase = super()._perturb_or_skip(engines, norm)
        # a non-finite ‖d‖: the weights are already back at w
        return Phase.SKIPPED if self._direction_skipped else phase

    def _perturb(self, engines: Sequence[Engine], norm: float) -> None:
        if not self._with_noise:  # σ = 0: SAM's perturbation
            super()._perturb(engines, norm)
            return
        # d = λ g_δ + δ, written into the gradients as s·d = λ g_δ + s·δ (s = −1 where the group
        # maximizes: then d = −λ g_δ + δ), so that SAM's own operations take its norm (c²-weighted,
        # over the groups with ρ ≠ 0 and the parameters holding a gradient) and move along it.
        groups = self.param_groups
        signs = {gi: -1.0 if group.get("maximize", False) else 1.0 for gi, group in enumerate(groups) if group["sam_rho"] != 0}
        for engine in engines:
            engine.axpby_by_group(_DELTA, "grads", signs, self.lam, self.vectors)
        direction_norm = self._gradient_norm(engines)
        self.last_direction_norm = direction_norm
        for engine in engines:
            engine.restore()  # w + δ → w exactly
        if not math.isfinite(direction_norm):
            self.stats["nonfinite_skips"] += 1
            self._direction_skipped = True
            return
        for engine in engines:  # e = ρ d/(‖d‖ + ε) from w (the sign of s·d undone per group)
            engine.perturb(self.param_groups, direction_norm)

    def restore(self) -> bool:
        """Undoes a pending :meth:`add_noise` or ``first_step`` (the weights back to ``w``, bit
        for bit). Returns whether there was something to undo."""
        if self._noised:
            engines = self._noised_engines if self._noised_engines is not None else self.engines()  # type: ignore[attr-defined]
            self._noised, self._noised_engines = False, None
            for engine in engines:
                engine.restore()
            return True
        return super().restore()  # type: ignore[misc]

    # -- checkpoints and reports -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The front's ``state_dict`` (``σ`` in ``["sam"]["state"]``, the generator in
        ``["sam"]["generator"]``); refused after :meth:`add_noise`, where the weights are at ``w + δ``."""
        if self._noised:
            raise RuntimeError("state_dict() after add_noise(): the weights are at w + δ; take it after second_step()")
        return super().state_dict()  # type: ignore[misc]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The front's ``load_state_dict``, for a dict made by a RandomSAM (its ``σ`` checked)."""
        if self._noised:
            raise RuntimeError("load_state_dict() after add_noise(): call restore() or finish the step first")
        sam = state_dict.get("sam") if isinstance(state_dict, dict) else None
        sigma = None
        if isinstance(sam, dict):  # (anything else: the front's own checks say what is wrong)
            saved = sam.get("state")
            if not isinstance(saved, dict) or "sigma" not in saved:
                raise ValueError("state_dict['sam']['state'] lacks 'sigma': it was not made by a RandomSAM")
            sigma = _check_sigma(saved["sigma"])
        super().load_state_dict(state_dict)  # type: ignore[misc]
        if sigma is not None:
            self.sam_state["sigma"] = sigma

    def perturbation_report(self) -> dict[str, float]:
        """Not available: it measures SAM's ``e = ρ g/‖g‖``; R-SAM's ``e = ρ d/‖d‖`` is built from
        ``δ``, which the gradients no longer show."""
        raise RuntimeError("perturbation_report() measures SAM's e = ρ g/‖g‖; RandomSAM's e = ρ d/‖d‖ is not kept")

    def __repr__(self) -> str:
        inner = super().__repr__().split("(", 1)[1]
        return f"{type(self).__name__}(sigma={self.sigma!r}, lam={self.lam!r}, {inner}"
