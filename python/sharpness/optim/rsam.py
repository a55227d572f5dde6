"""Random SAM (R-SAM): SAM's ascent direction taken from a randomly smoothed point.

Liu, Mai, Cheng, Chen, Hsieh, You, "Random Sharpness-Aware Minimization", NeurIPS 2022. One
gradient-ascent step approximates SAM's inner maximisation poorly on a rough loss surface. R-SAM
smooths the surface with random noise on the weights, takes the first gradient at the noisy point,
and mixes that gradient with the noise to pick the ascent direction. This module follows the
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
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from sharpness._validation import number
from sharpness.backends._common import NORM_EPS
from sharpness.backends.distributed import DTensorEngine
from sharpness.backends.torch_foreach import real_view
from sharpness.methods.base import Phase
from sharpness.optim.sam import SAM

_HOW_TO_CALL = (
    "call RandomSAM either with a closure, `optimizer.step(closure)`, or in three calls: "
    "`optimizer.add_noise(); loss_fn(model(x), y).backward(); optimizer.first_step(zero_grad=True); "
    "loss_fn(model(x), y).backward(); optimizer.second_step(zero_grad=True)` (the first gradient is "
    "taken at w + δ)"
)


def _check_sigma(sigma: Any) -> float:
    return number("sigma", sigma, minimum=0)


def _group_of(engine: Any) -> list[int]:
    """The group index of each of ``engine.params`` (flat engines keep it in their buffers)."""
    group_of = getattr(engine, "group_of", None)
    return list(group_of) if group_of is not None else list(engine.buffers.group_of)


class RandomSAM(SAM):
    r"""Random SAM (Liu et al., "Random Sharpness-Aware Minimization", NeurIPS 2022): filter-wise
    relative noise on the weights before the first pass; the ascent direction mixes the noisy
    gradient with the noise, and is taken from the clean weights.

    Algorithm, as the authors' official code does it (RSAM-Optimizer/R-SAM, ``vit_jax/train.py``)::

        δ   : per tensor p; for ndim > 1, per output unit i (torch's dim 0: the rows of a Linear
              weight (out, in), the filters of a Conv weight (out, in, kh, kw))
                  δ[i] = σ · z[i] · ‖p[i]‖₂
              for 1-D tensors (biases, norms)   δ = σ · z · ‖p‖₂
              z ~ N(0, I) from the optimizer's generator   (groups with sam_rho ≠ 0)
        g_δ = ∇L(w + δ)                                   first forward/backward, at w + δ
        d   = λ g_δ + δ                                   λ = 2 in the official code
        e   = ρ d / (‖d‖ + 1e-12)                         from the saved w: ‖e‖ = ρ
        w   ← base_step(w, ∇L(w + e))                     from the exact saved w

    ``‖d‖`` is one global norm over the parameters of the groups with ``sam_rho ≠ 0`` that hold a
    gradient; ``ρ`` may differ per group (``sam_rho``), and a group's ``sam_norm_weight`` ``c``
    weighs its share of the norm (``‖d‖² = Σ c²‖d_group‖²``), as in SAM. Parameters without a
    gradient get the noise for the first pass but no ascent. (JAX kernels keep the output axis
    last; the official code's per-unit norms over the fan-in are dim 0 here.)

    The noise ``z`` is drawn on the CPU from :attr:`generator`, one standard normal vector per
    engine over its noised parameters in order (float32; float64 for float64 weights), so a resumed
    run (``state_dict`` saves the generator and ``σ``) draws the same noise. ``δ`` is kept in
    float32 (float64) and added with torch's rounding to the weights' dtype; it is held (one
    float32 copy of the weights) from :meth:`add_noise` to :meth:`first_step` only. The weights
    are saved before the noise and restored exactly. ``σ = 0`` is SAM bit for bit (nothing is
    drawn). A non-finite ``‖g_δ‖`` or ``‖d‖`` applies no perturbation: the weights are back at
    ``w`` and ``stats["nonfinite_skips"]`` counts it; the step is then the base optimizer's, with
    the gradient of the second pass (taken at ``w``).

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

    With a closure, ``step(closure)`` adds the noise itself. In separate calls, call
    :meth:`add_noise` before the first forward pass.

    With ``torch.amp.GradScaler``, give it to :meth:`first_step` (``grad_scaler=scaler``): ``d = λ g_δ
    + δ`` adds the first gradient to the noise, so ``g_δ`` must be unscaled first, which
    ``first_step`` then does; without it ``scaler.step(opt)`` refuses the step after restoring
    ``w``. The loop: ``opt.add_noise()``, then SAM's GradScaler loop (:meth:`SAM.first_step`).

    Args:
        params, base_optimizer, rho, backend, same_noise, seed, **base_kwargs: as for
            :class:`sharpness.SAM` (``memory="exact"`` only; no ``adaptive`` form). The official
            ViT run uses ``ρ`` between 1.5 and 2.5, far above SAM's usual 0.05; ``‖e‖ = ρ``
            whatever ``σ`` is.
        sigma: ``σ``, the noise's standard deviation relative to each filter's (each output
            unit's) norm. Default 1.5e-3. A plain attribute, saved by ``state_dict``.
        lambda_: ``λ``, the weight of the noisy gradient against the noise in the ascent
            direction (2.0 in the official code); > 0.

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
    """

    #: ``d = λ g_δ + δ`` adds the first gradient to the noise: it must be unscaled first.
    needs_unscaled_first_gradient = (
        "its ascent direction λ·g_δ + δ adds the first gradient to the noise δ, "
        "so the perturbation would depend on the loss scale"
    )

    def __init__(
        self, params: Any, base_optimizer: Any, sigma: float = 1.5e-3, lambda_: float = 2.0, **kwargs: Any
    ) -> None:
        sigma = _check_sigma(sigma)
        lambda_ = number("lambda_", lambda_, above=0)
        if kwargs.get("adaptive"):
            raise ValueError("RandomSAM has no adaptive (ASAM) form")
        if kwargs.get("memory", "exact") != "exact":
            raise ValueError('RandomSAM restores from a saved copy: memory="exact" only')
        self.lambda_ = float(lambda_)
        self._noised = False
        # Between add_noise() and first_step(): the engines the noise went into and, per engine,
        # δ as one flat tensor over its parameters in order (None where nothing was noised).
        self._noise: tuple[list, list[Tensor | None]] | None = None
        self._direction_skipped = False
        super().__init__(params, base_optimizer, **kwargs)
        self.sam_state["sigma"] = sigma
        self.last_direction_norm = float("nan")
        if any(isinstance(e, DTensorEngine) for e in self.engines()):
            raise ValueError("RandomSAM does not support DTensor (FSDP2) parameters: the per-filter norms need whole tensors")

    @property
    def sigma(self) -> float:
        """``σ``, relative to each filter's norm; may be changed between steps (kept in
        ``sam_state``, so ``state_dict`` saves it)."""
        return self.sam_state["sigma"]

    @sigma.setter
    def sigma(self, value: float) -> None:
        self.sam_state["sigma"] = _check_sigma(value)

    # -- the noise --------------------------------------------------------------------------------

    @torch.no_grad()
    def add_noise(self) -> None:
        """Saves the weights ``w`` and moves them to ``w + δ``, ``δ`` the filter-wise relative
        noise (groups with ``sam_rho = 0`` and frozen parameters are left alone). Call it before
        the first forward pass of a step. With ``σ = 0`` it does nothing."""
        if self._pending is not None or self._noised:
            raise RuntimeError("add_noise() between first_step() and second_step(), or twice; " + _HOW_TO_CALL)
        sigma = self.sigma
        if sigma == 0.0:
            return
        engines = self._begin()
        noised_groups = [group["sam_rho"] != 0 for group in self.param_groups]
        deltas: list[Tensor | None] = []
        try:
            for engine in engines:
                engine.save_weights()
                deltas.append(self._add_delta(engine, noised_groups, sigma))
        except BaseException:
            for engine in engines:
                engine.restore()
            raise
        self._noise = (list(engines), deltas)
        self._noised = True

    def _add_delta(self, engine: Any, noised_groups: list[bool], sigma: float) -> Tensor | None:
        """Draws ``z``, writes ``δ`` into a flat tensor over the engine's parameters (the layout
        ``group_tensors`` slices) and adds it to the weights; returns the flat ``δ``. A complex
        parameter is its real pairs (``view_as_real``, a trailing dimension of 2), as everywhere."""
        params, group_of = [real_view(p.detach()) for p in engine.params], _group_of(engine)
        chosen = [i for i, p in enumerate(engine.params) if p.requires_grad and noised_groups[group_of[i]] and p.numel() > 0]
        if not chosen:
            return None
        first = params[chosen[0]]
        dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
        z = torch.randn(sum(params[i].numel() for i in chosen), generator=self.generator, dtype=dtype).to(first.device)
        offsets = [0]
        for p in params:
            offsets.append(offsets[-1] + p.numel())
        delta = torch.zeros(offsets[-1], dtype=dtype, device=first.device)
        k = 0
        # Per-parameter torch ops: no engine op computes norms per output unit (row/filter).
        for i in chosen:
            w = params[i].detach()
            n = w.numel()
            zi = z[k : k + n].view(w.shape)
            k += n
            di = delta[offsets[i] : offsets[i] + n].view(w.shape)
            if w.ndim > 1:
                norms = torch.linalg.vector_norm(w.reshape(w.shape[0], -1), dim=1, dtype=dtype)
                scale = (norms * sigma).view(-1, *([1] * (w.ndim - 1)))
            else:
                scale = torch.linalg.vector_norm(w, dtype=dtype) * sigma
            torch.mul(zi, scale, out=di)
            w.add_(di)
        return delta

    # -- the two halves -----------------------------------------------------------------------------

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, grad_scaler: Any = None) -> bool:
        """As :meth:`SAM.first_step`, with the gradient ``g_δ`` taken at the noisy weights of
        :meth:`add_noise`: the weights go to ``w + ρ d/‖d‖``, ``d = λ g_δ + δ`` (``g_δ``
        unscaled first when ``grad_scaler`` is given)."""
        if self._pending is None and not self._noised and self.sigma != 0.0:
            raise RuntimeError("RandomSAM.first_step() needs add_noise() before the first forward pass; " + _HOW_TO_CALL)
        noised = self._noised and self._pending is None
        self._direction_skipped = False
        try:
            due = super().first_step(zero_grad, grad_scaler)
        except BaseException:
            if noised and self._pending is None:
                self._restore_engines()  # never leave the weights at w + δ behind an exception
            raise
        finally:
            if noised:
                self._noised = False
                self._noise = None  # δ is no longer needed: free it
        if noised and self._pending == "skipped":
            self._restore_engines()  # a non-finite ‖g_δ‖: back to w, no perturbation
        return due

    def _perturb_or_skip(self, engines: list, norm: float) -> Phase:
        phase = super()._perturb_or_skip(engines, norm)
        # a non-finite ‖d‖: the weights are already back at w
        return Phase.SKIPPED if self._direction_skipped else phase

    def _restore_engines(self) -> None:
        for engine in self.engines():
            engine.restore()

    @torch.no_grad()
    def _perturb(self, engines: list, norm: float) -> None:
        if self._noise is None:  # σ = 0: SAM's perturbation
            super()._perturb(engines, norm)
            return
        noised_engines, deltas = self._noise
        if len(noised_engines) != len(engines) or any(a is not b for a, b in zip(noised_engines, engines)):
            raise RuntimeError("the parameters' layout changed between add_noise() and first_step()")
        # d = λ g_δ + δ, written into δ's buffer, over the parameters that hold a gradient.
        sq = 0.0
        for engine, delta in zip(engines, deltas):
            if delta is None:
                continue
            for gi, (ds, gs) in engine.group_tensors([delta, "grads"], self.state).items():
                group = self.param_groups[gi]
                if group["sam_rho"] == 0:
                    continue
                lam = -self.lambda_ if group.get("maximize", False) else self.lambda_  # maximize: the ascent of −L
                torch._foreach_add_(ds, gs, alpha=lam)
                c2 = float(group.get("sam_norm_weight", 1.0)) ** 2  # the group's weight in the global norm, as SAM's
                sq += c2 * float(torch.stack(torch._foreach_norm(ds, dtype=torch.float64)).square().sum())
        d_norm = math.sqrt(sq)
        self.last_direction_norm = d_norm
        if not math.isfinite(d_norm):
            for engine in engines:
                engine.restore()  # w + δ → w exactly, nothing left to undo
            self.stats["nonfinite_skips"] += 1
            self._direction_skipped = True
            return
        # e = ρ d/(‖d‖ + ε) from w: the noised weights back to the saved w (still marked as moved,
        # so second_step restores them), then w ← w + e where there is a gradient.
        for engine, delta in zip(engines, deltas):
            if delta is None:
                continue
            for ws, bs in engine.group_tensors(["weights", "backup"], self.state, every=True).values():
                torch._foreach_copy_(ws, bs)
            for gi, (ws, ds) in engine.group_tensors(["weights", delta], self.state).items():
                rho = self.param_groups[gi]["sam_rho"]
                if rho != 0:
                    torch._foreach_add_(ws, ds, alpha=rho / (d_norm + NORM_EPS))

    def _closure_step(self, closure: Callable[[], Tensor]) -> Tensor:
        self.add_noise()
        try:
            return super()._closure_step(closure)
        except BaseException:
            self.restore()
            raise

    @torch.no_grad()
    def restore(self) -> bool:
        """Undoes a pending :meth:`add_noise` or :meth:`first_step` (the weights back to ``w``,
        bit for bit). Returns whether there was something to undo."""
        if self._noised:
            self._noised = False
            self._noise = None
            self._restore_engines()
            return True
        return super().restore()

    def perturbation_report(self) -> dict[str, float]:
        """Not available: R-SAM's ``e`` is built from ``δ``, which is not kept after
        :meth:`first_step`."""
        raise RuntimeError("perturbation_report() measures SAM's e = ρ g/‖g‖; RandomSAM's e = ρ d/‖d‖ is not kept")

    def state_dict(self) -> dict[str, Any]:
        if self._noised:
            raise RuntimeError("state_dict() after add_noise(): the weights are perturbed; take it after second_step()")
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._noised:
            raise RuntimeError("load_state_dict() after add_noise(): call restore() or finish the step first")
        super().load_state_dict(state_dict)
