"""SSAM: SAM with a sparse perturbation (SSAM-F: Fisher mask; SSAM-D: dynamic sparse mask).

Mi, Shen, Ren, Zhou, Sun, Ji, Tao, "Make Sharpness-Aware Minimization Stronger: A Sparsified
Perturbation Approach", NeurIPS 2022 (arXiv:2210.05177; official code
github.com/Mi-Peng/Sparse-Sharpness-Aware-Minimization). Only a fraction ``1 − s`` of the weights
is perturbed::

    e = ρ (g ⊙ m)/‖g‖          m ∈ {0, 1}, a fraction s of zeros; ‖g‖ the full (unmasked) norm

* SSAM-F chooses ``m`` as the top ``1 − s`` of the empirical Fisher information, the sum of
  squared per-sample gradients ``Σ_i (∇ℓ_i)²`` over a few samples, refreshed every few epochs.
* SSAM-D starts from a random mask and every few epochs drops the live weights with the smallest
  score (``|g|`` by default) and grows as many dead ones (at random by default), the drop rate
  decaying as ``r(t) = r₀(1 + cos(πt))/2`` over training (``t`` the fraction done).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from sharpness._validation import number
from sharpness.backends.distributed import is_dtensor
from sharpness.backends.torch_foreach import real_view
from sharpness.optim._state import load_vectors, new_vectors, save_vectors
from sharpness.optim.sam import SAM

_MASK = "ssam_mask"  # m, in self.vectors (checkpointed)
_FISHER = "ssam_fisher"  # the running Σ g², in self.vectors (checkpointed)


def _fraction(name: str, value: Any, closed_top: bool = False) -> float:
    return number(name, value, minimum=0, maximum=1) if closed_top else number(name, value, minimum=0, below=1)


class _SparseSAM(SAM):
    """What both SSAMs share: the mask in :attr:`vectors` and the masked perturbation."""

    def __init__(self, params: Any, base_optimizer: Any, sparsity: float = 0.5, **kwargs: Any) -> None:
        if kwargs.get("adaptive"):
            raise ValueError(f"{type(self).__name__} has no adaptive (ASAM) form")
        self.sparsity = _fraction("sparsity", sparsity)
        super().__init__(params, base_optimizer, **kwargs)
        self.vectors = new_vectors()
        self.sam_state["ssam_masked"] = False  # whether a mask has been set

    def _masked_params(self) -> list[Tensor]:
        """The weights a mask covers: trainable parameters of the groups that are perturbed."""
        return [p for g in self.param_groups if g["sam_rho"] != 0 for p in g["params"] if p.requires_grad]

    def _refuse_shards(self) -> None:
        if any(is_dtensor(p) for p in self._masked_params()):
            # The top-k (and SSAM-D's draws) rank every weight of the model at once.
            raise ValueError(f"{type(self).__name__}'s mask ranks whole tensors: DTensor (FSDP2) parameters are not supported")

    def _set_mask(self, keep: Tensor) -> None:
        """``keep``: one flag per weight of :meth:`_masked_params`, in order (a complex weight is
        two, its real and imaginary parts: the mask of ``torch.view_as_real(p)``)."""
        self._refuse_shards()
        offset = 0
        for p in self._masked_params():
            rp = real_view(p.detach())
            n = rp.numel()
            new = keep[offset : offset + n].view_as(rp)
            current = self.vectors[p].get(_MASK)
            if current is not None and current.shape == p.shape and current.dtype == p.dtype and current.device == p.device:
                real_view(current).copy_(new)  # in place: on the flat engine it is a view of the flat mask
            elif p.is_complex():  # kept in the parameter's dtype, as the engines' state vectors
                self.vectors[p][_MASK] = torch.view_as_complex(new.to(device=p.device, dtype=rp.dtype).clone())
            else:
                self.vectors[p][_MASK] = new.to(device=p.device, dtype=p.dtype)
            offset += n
        self.sam_state["ssam_masked"] = True

    def mask(self) -> list[Tensor]:
        """The current mask, one tensor per parameter of :meth:`_masked_params` (all ones before
        the first mask is set); for a complex parameter, the mask of its real pairs (the shape of
        ``torch.view_as_real(p)``)."""
        return [
            real_view(self.vectors[p][_MASK]).detach().clone()
            if _MASK in self.vectors[p]
            else torch.ones_like(real_view(p.detach()))
            for p in self._masked_params()
        ]

    def density(self) -> float:
        """The fraction of perturbed weights (``1 − s`` once a mask is set)."""
        masks = self.mask()
        return float(sum(float(m.sum()) for m in masks) / max(1, sum(m.numel() for m in masks)))

    @torch.no_grad()
    def _perturb(self, engines: list, norm: float) -> None:
        if self.sam_state["ssam_masked"]:
            for engine in engines:  # g ⊙ m in the gradients (they are replaced by the second pass)
                engine.mul(_MASK, "grads", self.vectors)
        for engine in engines:  # e = ρ (g ⊙ m)/‖g‖: the norm is the unmasked one, as in the paper
            engine.perturb(self.param_groups, norm)

    def _vector_names(self) -> tuple[str, ...]:
        return (_MASK,)

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["sam"]["vectors"] = save_vectors(self.vectors, self.param_groups, self._vector_names())
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        load_vectors(
            self.vectors, self.param_groups, state_dict.get("sam", {}).get("vectors", {n: {} for n in self._vector_names()})
        )


def _top(scores: Tensor, k: int) -> Tensor:
    """0/1 flags of the ``k`` largest ``scores`` (float32 flags)."""
    keep = torch.zeros(scores.numel(), dtype=torch.float32)
    if k > 0:
        keep[torch.topk(scores, k).indices] = 1.0
    return keep


class SSAMF(_SparseSAM):
    r"""SSAM-F (Mi et al., NeurIPS 2022): SAM perturbing only the weights with the largest
    empirical Fisher information.

    Algorithm::

        F = Σ_i (∇ℓ_i(w))²                      over a few samples (the paper: per-sample gradients)
        m = 1 on the ⌊(1 − s)·N⌋ largest F, 0 elsewhere     (one global top-k; refreshed every few epochs)
        g = ∇L(w);  e = ρ (g ⊙ m)/(‖g‖ + 1e-12);  w ← base_step(w, ∇L(w + e))

    Estimating ``F``: after each backward pass of one sample (or of a micro-batch: the sum of its
    squared gradient is then a coarser estimate), call :meth:`accumulate_fisher`, which adds
    ``p.grad²`` to a running sum kept in :attr:`vectors` (one pass of the engines' ``add_square``);
    then :meth:`update_mask` takes the top-k and resets the sum. :meth:`fisher_from` does both over
    closures of one sample each. A ready score (e.g. from ``torch.func`` per-sample gradients) can be
    given to :meth:`update_mask` instead.

    :meth:`fisher_from` zeroes the gradients before each sample, so ``F`` is ``Σ_i g_i²``, the
    empirical Fisher the paper defines. The official code (``solver/sam.py``, ``SSAMF.step`` and
    ``update_mask``) refreshes the mask right after a SAM step without zeroing first: ``p.grad``
    still holds that step's ``g̃ = ∇L(w + e)``, so its first sample adds ``(g̃ + g₁)²`` (the later
    ones ``g_i²``: it zeroes after each). That term is a side effect of the loop, in one of its
    ``num_samples`` (1024 by default), so it is not reproduced; to reproduce it, run the first
    sample's backward on top of the step's gradients and call :meth:`accumulate_fisher`
    yourself. Until the first mask,
    the perturbation is SAM's; the official code starts from an all-zero mask (its first step
    has no perturbation: the base step on ``g``) and sets the mask after that step. ``s = 0`` is SAM
    bit for bit. The mask covers the trainable parameters of the groups with ``sam_rho ≠ 0`` and is
    checkpointed (``state_dict()["sam"]["vectors"]``, with the running sum). During
    :meth:`first_step` the gradients become ``g ⊙ m``.

    Args:
        params, base_optimizer, rho, backend, same_noise, seed, memory, **base_kwargs: as for
            :class:`sharpness.SAM` (no ``adaptive`` form).
        sparsity: ``s``, the fraction of weights left unperturbed (0.5 in the paper's main runs).

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
    """

    def __init__(self, params: Any, base_optimizer: Any, sparsity: float = 0.5, **kwargs: Any) -> None:
        super().__init__(params, base_optimizer, sparsity=sparsity, **kwargs)
        self.sam_state["ssam_fisher_samples"] = 0

    def _vector_names(self) -> tuple[str, ...]:
        return (_MASK, _FISHER)

    @torch.no_grad()
    def accumulate_fisher(self) -> None:
        """``F ← F + g²`` with the gradients now in ``p.grad`` (one sample's, ideally)."""
        if self._pending is not None:
            raise RuntimeError("accumulate_fisher() between first_step() and second_step()")
        for engine in self._begin():
            engine.add_square("grads", _FISHER, self.vectors)
        self.sam_state["ssam_fisher_samples"] += 1

    @torch.no_grad()
    def update_mask(self, scores: Iterable[Tensor] | None = None) -> None:
        """Sets the mask to the top ``1 − s`` of ``scores`` (one tensor per parameter of the
        perturbed groups, in order; a complex parameter's of the shape of ``torch.view_as_real(p)``,
        one score per real coordinate), by default of the Fisher sum from
        :meth:`accumulate_fisher`, which is then reset."""
        self._refuse_shards()
        params = self._masked_params()
        if scores is None:
            if self.sam_state["ssam_fisher_samples"] == 0:
                raise RuntimeError("update_mask() without scores needs accumulate_fisher() first")
            scores = [self.vectors[p][_FISHER] if _FISHER in self.vectors[p] else torch.zeros_like(p) for p in params]
            reset = True
        else:
            scores = list(scores)
            reset = False
        scores = [real_view(s) for s in scores]  # a complex Fisher sum: Σ re², Σ im² per weight
        if len(scores) != len(params) or any(s.shape != real_view(p.detach()).shape for s, p in zip(scores, params)):
            raise ValueError(
                "update_mask() needs one score tensor per perturbed parameter, of its shape "
                "(for a complex parameter: the shape of torch.view_as_real(p))"
            )
        flat = torch.cat([s.detach().reshape(-1).to(device="cpu", dtype=torch.float32) for s in scores])
        self._set_mask(_top(flat, int(flat.numel() * (1.0 - self.sparsity))))
        if reset:
            for p in params:
                if _FISHER in self.vectors[p]:
                    self.vectors[p][_FISHER].zero_()
            self.sam_state["ssam_fisher_samples"] = 0

    def fisher_from(self, backward_passes: Iterable[Callable[[], Any]]) -> None:
        """Runs each callable (one sample's forward and backward pass) from zero gradients,
        accumulates ``g²`` and sets the mask. The gradients are zeroed after."""
        for backward in backward_passes:
            self.zero_grad()
            with torch.enable_grad():
                backward()
            self.accumulate_fisher()
        self.zero_grad()
        self.update_mask()


class SSAMD(_SparseSAM):
    r"""SSAM-D (Mi et al., NeurIPS 2022): SAM perturbing a dynamic sparse set of weights.

    Algorithm::

        m₀ = 1 on ``N − ⌈sN⌉`` weights drawn at random (from :attr:`generator`)
        every few epochs, at training progress t ∈ [0, 1], with the gradient in p.grad:
            r = r₀ (1 + cos(π t))/2;  k = ⌊min(r·live, N − live)⌋
            drop the k live weights with the smallest drop score,
            grow  the k dead weights with the largest growth score
        g = ∇L(w);  e = ρ (g ⊙ m)/(‖g‖ + 1e-12);  w ← base_step(w, ∇L(w + e))

    Scores (the official code's strategies): ``"gradient"`` ``|g|``, ``"weight"`` ``|w|``,
    ``"random"`` uniform from :attr:`generator`. The official code's defaults: drop by gradient,
    grow at random, ``r₀ = 0.5``. Unlike the official code, the number grown always equals the
    number dropped (it keeps ``live``, ``N − ⌈sN⌉``, constant; the official code drops
    ``⌊(N − sN)·r⌋`` and grows ``⌊min((N − sN)·r, sN)⌋``, which loses live weights when ``s`` is
    small). ``s = 0`` is SAM bit for bit. The mask is checkpointed with the generator.

    Call :meth:`update_mask` after a backward pass and before :meth:`first_step` (the gradient
    scores read ``p.grad``).

    Args:
        params, base_optimizer, rho, backend, same_noise, seed, memory, **base_kwargs: as for
            :class:`sharpness.SAM` (no ``adaptive`` form).
        sparsity: ``s`` (0.5 in the paper's main runs).
        drop_rate: ``r₀``.
        drop_strategy, growth_strategy: ``"gradient"``, ``"weight"`` or ``"random"``.

    Example:
        >>> import torch, sharpness
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = sharpness.SSAMD(model.parameters(), torch.optim.SGD, sparsity=0.5, rho=0.05, lr=0.1, seed=0)
        >>> x, y = torch.randn(8, 4), torch.randn(8, 2)
        >>> for step in range(4):
        ...     torch.nn.functional.mse_loss(model(x), y).backward()
        ...     if step % 2 == 0:
        ...         opt.update_mask(progress=step / 4)
        ...     _ = opt.first_step(zero_grad=True)
        ...     torch.nn.functional.mse_loss(model(x), y).backward()
        ...     opt.second_step(zero_grad=True)
        >>> opt.density()
        0.5
    """

    _STRATEGIES = ("gradient", "weight", "random")

    def __init__(
        self,
        params: Any,
        base_optimizer: Any,
        sparsity: float = 0.5,
        drop_rate: float = 0.5,
        drop_strategy: str = "gradient",
        growth_strategy: str = "random",
        **kwargs: Any,
    ) -> None:
        self.drop_rate = _fraction("drop_rate", drop_rate, closed_top=True)
        for name, value in (("drop_strategy", drop_strategy), ("growth_strategy", growth_strategy)):
            if value not in self._STRATEGIES:
                raise ValueError(f"{name} must be one of {self._STRATEGIES}, got {value!r}")
        self.drop_strategy, self.growth_strategy = drop_strategy, growth_strategy
        super().__init__(params, base_optimizer, sparsity=sparsity, **kwargs)
        n = sum(real_view(p.detach()).numel() for p in self._masked_params())
        live = n - math.ceil(n * self.sparsity)
        self._set_mask(_top(torch.rand(n, generator=self.generator), live))

    def _scores(self, strategy: str, params: list[Tensor]) -> Tensor:
        if strategy == "random":
            return torch.rand(sum(real_view(p.detach()).numel() for p in params), generator=self.generator)
        parts = []
        for p in params:
            t = p.detach() if strategy == "weight" else (p.grad if p.grad is not None else torch.zeros_like(p))
            parts.append(real_view(t).abs().reshape(-1).to(device="cpu", dtype=torch.float32))
        return torch.cat(parts)

    def drop_rate_at(self, progress: float) -> float:
        """``r₀ (1 + cos(π t))/2``."""
        return self.drop_rate * (1.0 + math.cos(math.pi * progress)) / 2.0

    @torch.no_grad()
    def update_mask(self, progress: float) -> None:
        """Drops and grows ``⌊min(r(t)·live, N − live)⌋`` weights; ``progress`` is the fraction of
        training done (e.g. ``epoch / epochs``)."""
        if self._pending is not None:
            raise RuntimeError("update_mask() between first_step() and second_step()")
        self._refuse_shards()
        params = self._masked_params()
        mask = torch.cat([m.reshape(-1).to(device="cpu", dtype=torch.float32) for m in self.mask()])
        live = int(mask.sum())
        k = int(min(self.drop_rate_at(float(progress)) * live, mask.numel() - live))
        if k == 0:
            return
        drop = (self._scores(self.drop_strategy, params) + 1e-7) * mask  # dead weights score 0
        kept = _top(drop, live - k)
        grow = (self._scores(self.growth_strategy, params) + 1e-7) * (1.0 - mask)  # live score 0
        grown = _top(grow, k)
        self._set_mask(kept + grown)
