"""Friendly SAM (F-SAM): perturb along the gradient minus its running mean.

Li, Zhou, He, Cheng, Huang, "Friendly Sharpness-Aware Minimization", CVPR 2024
(arXiv:2403.12350; official code github.com/nblt/F-SAM). The full-batch part of the mini-batch
gradient does not help SAM generalise; its stochastic part does. F-SAM estimates the full-batch
gradient by an exponential moving average ``m`` of the raw gradients and perturbs along the rest::

    d = g − σ·m_{t−1}          (the official code: d = g on the first step, where m starts at g)
    e = ρ d/‖d‖
    m_t = λ m_{t−1} + (1 − λ) g     (the raw g, not d)

The update is SAM's: the base optimizer steps with ``∇L(w + e)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from sharpness._validation import number
from sharpness.optim._state import load_vectors, new_vectors, save_vectors
from sharpness.optim.sam import SAM

_M = "fsam_momentum"  # m, in self.vectors (checkpointed)


class FriendlySAM(SAM):
    r"""Friendly SAM (Li et al., CVPR 2024, arXiv:2403.12350): SAM perturbed along ``g − σm``,
    ``m`` an exponential moving average of the raw gradients.

    Algorithm (as the official code)::

        g = ∇L(w)
        first step:  m = g,  d = g
        later:       d = g − σ m;   m ← λ m + (1 − λ) g
        e = ρ d/(‖d‖ + 1e-12)            ‖·‖ global; ASAM's ‖T d‖ with adaptive=True
        w ← base_step(w, ∇L(w + e))      from the exact saved w

    ``σ = 0`` is SAM bit for bit (``m`` is still kept). ``m`` is one buffer,
    ``vectors[p]["fsam_momentum"]``, saved by ``state_dict`` under ``"sam"``. Both updates are two passes of the
    engines' ``axpby``: ``p.grad`` becomes ``d`` (after :meth:`first_step` the gradients hold
    ``d``, not ``g``), then ``m ← (λ + (1−λ)σ) m + (1−λ) d``, which is ``λm + (1−λ)g`` up to the
    rounding of ``d`` (one ulp of ``max(|g|, σ|m|)``, times ``1 − λ``).

    Args:
        params, base_optimizer, rho, adaptive, eta, backend, same_noise, seed, memory, **base_kwargs:
            as for :class:`sharpness.SAM`.
        sigma: ``σ``, how much of ``m`` is removed (1 in the paper's experiments).
        lmbda: ``λ``, the decay of the moving average (0.9 by default in the official code; the
            paper tunes 0.6–0.95).

    Example:
        >>> import torch, sharpness
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = sharpness.FriendlySAM(model.parameters(), torch.optim.SGD, rho=0.05, sigma=1.0, lmbda=0.9, lr=0.1)
        >>> x, y = torch.randn(8, 4), torch.randn(8, 2)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> for _ in range(3):
        ...     loss = opt.step(closure)
        >>> opt.vectors[model.weight]["fsam_momentum"].shape
        torch.Size([2, 4])
    """

    needs_unscaled_first_gradient = "its moving average of the first gradient would hold scaled gradients"

    def __init__(self, params: Any, base_optimizer: Any, sigma: float = 1.0, lmbda: float = 0.9, **kwargs: Any) -> None:
        self.sigma = number("sigma", sigma)
        self.lmbda = number("lmbda", lmbda, minimum=0, maximum=1)
        super().__init__(params, base_optimizer, **kwargs)
        self.sam_state["fsam_started"] = False
        self.vectors = new_vectors()

    @torch.no_grad()
    def _perturb(self, engines: list, norm: float) -> None:
        state = self.vectors
        if not self.sam_state["fsam_started"]:
            for engine in engines:  # m starts at the first gradient; d = g
                engine.copy("grads", _M, state)
            self.sam_state["fsam_started"] = True
        else:
            lam, sigma = self.lmbda, self.sigma
            if sigma != 0.0:
                for engine in engines:  # d = g − σ m, in the gradients
                    engine.axpby(_M, "grads", -sigma, 1.0, state)
            for engine in engines:  # m ← λm + (1−λ)(d + σm) = λm + (1−λ)g
                engine.axpby("grads", _M, 1.0 - lam, lam + (1.0 - lam) * sigma, state)
            if sigma != 0.0:
                norm = math.sqrt(sum(float(engine.sum_of_squares(self.param_groups)) for engine in engines))
        for engine in engines:
            engine.perturb(self.param_groups, norm)

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["sam"]["vectors"] = save_vectors(self.vectors, self.param_groups, (_M,))
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        load_vectors(self.vectors, self.param_groups, state_dict.get("sam", {}).get("vectors", {_M: {}}))
