"""Friendly SAM (F-SAM): perturb along the gradient minus its running mean, written once for both
fronts (:class:`sharpness.FriendlySAM`, :class:`sharpness.numpy.FriendlySAM`).

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
from collections.abc import Sequence
from typing import Any

from sharpness._validation import number
from sharpness.methods.base import Method
from sharpness.methods.contract import Engine

__all__ = ["FriendlySAM"]

_M = "fsam_momentum"  # m, in self.vectors (checkpointed)
_STARTED = "fsam_started"  # whether m holds a gradient yet, in self.sam_state (checkpointed)


class FriendlySAM(Method):
    r"""Friendly SAM (Li et al., CVPR 2024, arXiv:2403.12350): SAM perturbed along ``g − σm``,
    ``m`` an exponential moving average of the raw gradients.

    Algorithm (as the official code)::

        g = ∇L(w)
        first step:  m = g,  d = g
        later:       d = g − σ m;   m ← λ m + (1 − λ) g
        e = ρ d/(‖d‖ + 1e-12)            ‖·‖ global; ASAM's T²d/‖T d‖ with adaptive=True
        w ← base_step(w, ∇L(w + e))      from the exact saved w

    ``σ = 0`` is SAM bit for bit (``m`` is still kept). ``m`` is one buffer per parameter,
    ``vectors[p]["fsam_momentum"]`` (numpy front: ``vectors[i]["fsam_momentum"]``), saved by
    ``state_dict`` under ``"sam"``. Both updates are two passes of the engines' ``axpby``: the
    gradients become ``d`` (after :meth:`first_step` they hold ``d``, not ``g``; the numpy front
    writes a copy, never the caller's arrays), then ``m ← (λ + (1−λ)σ) m + (1−λ) d``, which is
    ``λm + (1−λ)g`` up to the rounding of ``d`` (one ulp of ``max(|g|, σ|m|)``, times ``1 − λ``).
    ``last_grad_norm`` is ``‖d‖``, the norm the perturbation is scaled by. A non-finite ``‖g‖``
    leaves ``m`` and the weights alone (the step is the plain base step); so does a non-finite
    ``‖d‖`` (``m`` is then already updated); both are counted in ``stats["nonfinite_skips"]``.

    Args:
        params, base_optimizer, rho, adaptive, eta, backend, same_noise, seed, memory, **base_kwargs:
            as for :class:`sharpness.SAM` (numpy front: as for :class:`sharpness.numpy.SAM`).
        sigma: ``σ``, how much of ``m`` is removed (1 in the paper's experiments).
        lam: ``λ`` in ``[0, 1]``, the decay of the moving average (0.9 by default in the official
            code; the paper tunes 0.6–0.95).

    Example:
        >>> import torch, sharpness
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = sharpness.FriendlySAM(model.parameters(), torch.optim.SGD, rho=0.05, sigma=1.0, lam=0.9, lr=0.1)
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

        The same rule over numpy arrays:

        >>> import numpy as np, sharpness.numpy
        >>> rng = np.random.default_rng(0)
        >>> X = rng.normal(size=(32, 3))
        >>> t = X @ np.array([1.0, -2.0, 0.5]) + 0.1 * rng.normal(size=32)
        >>> w = np.zeros(3)
        >>> def grad_fn(params):
        ...     r = X @ params[0] - t
        ...     return 0.5 * np.mean(r**2), [X.T @ r / len(t)]
        >>> opt = sharpness.numpy.FriendlySAM([w], rho=0.05, sigma=1.0, lam=0.9, lr=0.1)
        >>> losses = [opt.step(grad_fn) for _ in range(50)]
        >>> bool(losses[-1] < 0.01 * losses[0]), opt.vectors[0]["fsam_momentum"].shape
        (True, (3,))
    """

    needs_unscaled_first_gradient = "its moving average of the first gradient would hold scaled gradients"

    def __init__(self, *args: Any, sigma: float = 1.0, lam: float = 0.9, **kwargs: Any) -> None:
        self.sigma = number("sigma", sigma)
        self.lam = number("lam", lam, minimum=0, maximum=1)
        super().__init__(*args, **kwargs)
        self.sam_state[_STARTED] = False

    def _checkpointed_vectors(self) -> tuple[str, ...]:
        return (_M,)

    def _perturb(self, engines: Sequence[Engine], norm: float) -> None:
        state = self.vectors
        if not self.sam_state[_STARTED]:
            for engine in engines:  # m starts at the first gradient; d = g
                engine.copy("grads", _M, state)
            self.sam_state[_STARTED] = True
        else:
            lam, sigma = self.lam, self.sigma
            if sigma != 0.0:
                for engine in engines:  # d = g − σ m, in the gradients
                    engine.axpby(_M, "grads", -sigma, 1.0, state)
            for engine in engines:  # m ← λm + (1−λ)(d + σm) = λm + (1−λ)g
                engine.axpby("grads", _M, 1.0 - lam, lam + (1.0 - lam) * sigma, state)
            if sigma != 0.0:
                norm = self._gradient_norm(engines)  # ‖d‖: the norm e is scaled by
                self.last_grad_norm = norm
        if not math.isfinite(norm):
            # ‖g‖ was finite but ‖d‖ is not (d overflowed): no perturbation, as for a non-finite ‖g‖;
            # the weights are saved as they are, so the second half is the base step at w.
            self.stats["nonfinite_skips"] += 1
            for engine in engines:
                engine.save_weights()
            return
        for engine in engines:
            engine.perturb(self.param_groups, norm)
