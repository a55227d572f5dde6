"""CR-SAM: SAM with a curvature regulariser from gradients on both sides of the weights.

Wu, Luo, Wunsch, "CR-SAM: Curvature Regularized Sharpness-Aware Minimization", AAAI 2024,
arXiv:2312.13555 (official code: github.com/TrustAIoT/CR-SAM). As SAM's one-step ascent grows
less accurate with the landscape's non-linearity, CR-SAM adds a normalized-Hessian-trace
regulariser estimated by finite differences along ``ĝ = g/‖g‖``. With ``e = ρ ĝ``, three
gradients per step:

    g₀ = ∇L(w),   g₊ = ∇L(w + e),   g₋ = ∇L(w − e)
    u  = g₊ + γ·(g₊ + g₋ − 2g₀) + β·(g₊ − g₋)      (the official code's combination)
    w ← base_step(w, u)                              from the exact saved w

To leading order ``g₊ − g₋ ≈ 2ρ·Hĝ`` and ``g₊ + g₋ − 2g₀ ≈ ρ²·∇(ĝᵀHĝ)`` (how the curvature
along ``ĝ`` changes with ``w``). ``γ = β = 0`` is SAM.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from sharpness._validation import number
from sharpness.backends._common import scale_of
from sharpness.optim._closure_only import ClosureOnlySAM, run_closure_passes
from sharpness.optim._standalone import check_positive

_ACC = "crsam_acc"  # g₀, then (1+γ+β)g₊ − 2γ g₀


class CRSAM(ClosureOnlySAM):
    r"""CR-SAM (Wu et al., AAAI 2024, arXiv:2312.13555) around any base optimizer: three
    forward/backward passes per step, through ``step(closure)`` only.

    Algorithm (as the official code)::

        g₀ = ∇L(w);  e = ρ g₀/(‖g₀‖ + 1e-12)
        g₊ = ∇L(w + e)
        g₋ = ∇L(w − e)
        u  = g₊ + γ (g₊ + g₋ − 2 g₀) + β (g₊ − g₋)
        w ← base_step(w, u)       # from the exact saved w (the official code subtracts e)

    The first perturbation is SAM's fused kernel; ``w − e`` is written from the saved ``w``;
    one extra vector (``crsam_acc`` in the optimizer state) holds ``g₀``, then
    ``(1+γ+β)g₊ − 2γ g₀``. The closure runs three times, with the first call's random state
    when ``same_noise``. ``γ = β = 0`` is SAM.

    Args:
        params, base_optimizer, backend, same_noise, seed, **base_kwargs: as for
            :class:`sharpness.SAM`.
        rho: ``ρ`` (0.1: the default of the official class, ``utils/crsam.py``, and of its
            training script, ``crsam_train.py``).
        gamma: ``γ``, the weight of the second difference (0.1: likewise both).
        beta: ``β``, the weight of the first difference (0.1: the official class's default,
            followed here; the official training script runs ``--beta 0.01``).

    Example:
        >>> import torch, sharpness
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = sharpness.CRSAM(model.parameters(), torch.optim.SGD, rho=0.1, gamma=0.1, beta=0.1, lr=0.1)
        >>> x, y = torch.randn(8, 4), torch.randn(8, 2)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> loss = opt.step(closure)  # the closure runs at w, w + e and w - e
    """

    no_closure_message = "CR-SAM takes three gradients per step: call step(closure)"

    def __init__(
        self,
        params: Any,
        base_optimizer: Any,
        rho: float = 0.1,
        gamma: float = 0.1,
        beta: float = 0.1,
        backend: str = "auto",
        same_noise: bool = True,
        seed: int | None = None,
        **base_kwargs: Any,
    ) -> None:
        self.gamma, self.beta = number("gamma", gamma), number("beta", beta)
        super().__init__(
            params,
            base_optimizer,
            rho=check_positive("rho", rho),
            backend=backend,
            same_noise=same_noise,
            seed=seed,
            **base_kwargs,
        )

    def first_step(self, zero_grad: bool = False, grad_scaler: Any = None) -> bool:  # type: ignore[override]
        return self._first_step_in_step_only(zero_grad, grad_scaler)

    def _before_perturbation(self, engines: list) -> None:
        for engine in engines:
            engine.copy("grads", _ACC, self.state)

    def _to_minus(self) -> bool:
        """After g₊: ``w ← w − e`` from the saved ``w``; ``acc ← (1+γ+β)g₊ − 2γ g₀``."""
        engines = self._begin()
        norm = self.last_grad_norm
        for engine in engines:
            for gi, (w, b, g0) in engine.group_tensors(["weights", "backup", _ACC], self.state).items():
                group = self.param_groups[gi]
                if group["sam_rho"] == 0:
                    continue
                torch._foreach_copy_(w, b)
                torch._foreach_add_(w, g0, alpha=-scale_of(group, norm))
            engine.axpby("grads", _ACC, 1.0 + self.gamma + self.beta, -2.0 * self.gamma, self.state)
        return True

    def _closure_step_body(self, closure: Callable[[], Tensor]) -> Tensor:
        moves = [lambda: self.first_step() and self._pending == "perturbed", self._to_minus]
        loss = run_closure_passes(self, closure, moves)
        if self._pending == "perturbed":
            engines = self._begin()
            for engine in engines:  # u = acc + (γ−β) g₋
                engine.axpby(_ACC, "grads", 1.0, self.gamma - self.beta, self.state)
        self.second_step()
        return loss

    def __repr__(self) -> str:
        return f"CRSAM(backend={self.backend!r}, base={self.base_optimizer!r})"
