"""GAM: Gradient norm Aware Minimization, which seeks first-order flatness.

Zhang, Xu, Liu, Li, Cui, "Gradient Norm Aware Minimization Seeks First-Order Flatness and
Improves Generalization", CVPR 2023, arXiv:2303.03108 (official code: github.com/xxgege/GAM).
SAM's flatness is zeroth-order (the loss in a ball); GAM also penalises the largest gradient norm
in the ball, ``ρ'·max_{‖δ‖≤ρ'} ‖∇L(w+δ)‖``, whose gradient is approximated by an ascent on the
gradient norm. One step takes four gradients, as the official implementation does::

    g₀ = ∇L(w)                         e₀  = ρ g₀/‖g₀‖
    g₁ = ∇L(w + e₀)                    d   = g₁ − g₀ (≈ ρ·H ĝ₀, the gradient-norm ascent)
                                       e₁  = ρ' d/‖d‖
    g₂ = ∇L(w + e₁)                    e₂  = e₁ + ρ g₂/‖g₂‖
    g₃ = ∇L(w + e₂)
    p  = g₀ + |β₂| g₂                  (the "plain" direction)
    u  = β₁ g₁ + β₃ g₃                 (the SAM-like direction)
    u ← u − γ·(p − cos(p, u)·‖p‖·u/‖u‖)   (minus γ times the part of p orthogonal to u)
    w ← base_step(w, u)                from the exact saved w

``β₂ = β₃ = γ = 0`` (with ``β₁ = 1``) is SAM (its update uses only ``g₁``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from sharpness._validation import number
from sharpness.methods import NORM_EPS
from sharpness.optim._closure_only import ClosureOnlySAM, run_closure_passes
from sharpness.optim._standalone import check_positive

_G0, _G1 = "gam_g0", "gam_g1"  # g₀ (then p) and g₁, in the optimizer state


class GAM(ClosureOnlySAM):
    r"""GAM (Zhang et al., CVPR 2023, arXiv:2303.03108) around any base optimizer: four
    forward/backward passes per step, through ``step(closure)`` only.

    Algorithm (as the official code)::

        g₀ = ∇L(w);            w₁ = w + ρ g₀/‖g₀‖
        g₁ = ∇L(w₁);           d = g₁ − g₀;  w₂ = w + ρ' d/‖d‖
        g₂ = ∇L(w₂);           w₃ = w₂ + ρ g₂/‖g₂‖
        g₃ = ∇L(w₃)
        p = g₀ + |β₂| g₂;  u = β₁ g₁ + β₃ g₃;  c = p·u/(‖p‖‖u‖ + 1e-12)
        u ← u − γ (p − c ‖p‖ u/(‖u‖ + 1e-12))
        w ← base_step(w, u)    # from the exact saved w

    (norms get ``+ 1e-12``; every norm is global.) The closure runs four times, with the first
    call's random state when ``same_noise``. The first perturbation is SAM's fused kernel; the
    others are foreach ops over the engines' flat buffers; ``g₀`` and ``g₁`` are kept in the
    optimizer state (``gam_g0``, ``gam_g1``: two vectors the size of the model). ``β₂ = β₃ = γ =
    0`` reduces to SAM.

    Args:
        params, base_optimizer, backend, same_noise, seed, **base_kwargs: as for
            :class:`sharpness.SAM`.
        rho: ``ρ``, the radius of the two SAM moves (the official ``grad_rho``; 0.05 here).
        norm_rho: ``ρ'``, the radius of the move along ``d`` (``grad_norm_rho``; 0.2, as in
            every official setting). The authors' README names the two the other way round
            (``ρ_t`` = ``grad_norm_rho``, ``ρ'_t`` = ``grad_rho``).
        beta1, beta2, beta3: the weights of ``g₁``, ``g₂``, ``g₃`` (``grad_beta_1``,
            ``|grad_beta_2|``, ``grad_beta_3``; 1, 1, 1 here).
        gamma: ``γ`` of the decomposition (``grad_gamma``; 0.1 here).

    Defaults. The official class (github.com/xxgege/GAM, ``gam/gam.py``) has none for these: it
    reads ``args``. Its training script ``main_cifar.py`` has the argparse defaults
    ``grad_beta_0 = grad_beta_1 = 1``, ``grad_beta_2 = −1``, ``grad_beta_3 = 1``,
    ``grad_gamma = 0.03``, ``grad_rho = 0.02``, ``grad_norm_rho = 0.2``, then sets per task
    ``(grad_rho, grad_beta_0, grad_beta_1, grad_gamma)``: CIFAR-100 ResNet (0.02, 0.5, 0.6, 0.03),
    PyramidNet (0.04, 0.3, 0.5, 0.05); CIFAR-10 ResNet (0.03, 0.1, 0.1, 0.05), PyramidNet
    (0.03, 0.1, 0.1, 0.03), and always overwrites ``grad_beta_2 = 1 − grad_beta_0`` and
    ``grad_beta_3 = 1 − grad_beta_1`` (``grad_beta_0`` is used only there). So the script never
    runs ``β₂ = β₃ = 1``: its CIFAR-100 ResNet run is ``rho=0.02, norm_rho=0.2, beta1=0.6,
    beta2=0.5, beta3=0.4, gamma=0.03``, and with its bare argparse defaults it runs ``β₁ = 1,
    β₂ = β₃ = 0, γ = 0.03``. The defaults here (``β₁ = β₂ = β₃ = 1``, ``γ = 0.1``, ``ρ = 0.05``)
    follow neither: they weigh the four gradients equally; pass the script's values to reproduce
    a run of it.

    Example:
        >>> import torch, sharpness
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = sharpness.GAM(model.parameters(), torch.optim.SGD, rho=0.05, norm_rho=0.2, lr=0.1)
        >>> x, y = torch.randn(8, 4), torch.randn(8, 2)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> loss = opt.step(closure)  # the closure runs four times
    """

    norm_weights_supported = False  # its own norms (see SAM.norm_weights_supported)
    no_closure_message = "GAM takes four gradients per step: call step(closure)"

    def __init__(
        self,
        params: Any,
        base_optimizer: Any,
        rho: float = 0.05,
        norm_rho: float = 0.2,
        beta1: float = 1.0,
        beta2: float = 1.0,
        beta3: float = 1.0,
        gamma: float = 0.1,
        backend: str = "auto",
        same_noise: bool = True,
        seed: int | None = None,
        **base_kwargs: Any,
    ) -> None:
        self.norm_rho = check_positive("norm_rho", norm_rho)
        self.beta1, self.beta2, self.beta3 = number("beta1", beta1), number("beta2", beta2), number("beta3", beta3)
        self.gamma = number("gamma", gamma)
        super().__init__(params, base_optimizer, rho=rho, backend=backend, same_noise=same_noise, seed=seed, **base_kwargs)

    def first_step(self, zero_grad: bool = False, grad_scaler: Any = None) -> bool:  # type: ignore[override]
        return self._first_step_in_step_only(zero_grad, grad_scaler)

    def _before_perturbation(self, engines: list) -> None:
        for engine in engines:
            engine.copy("grads", _G0, self.state)

    def _norm(self, engines: list, name: str = "grads") -> float:
        return math.sqrt(sum(engine.dot(name, name, self.state) for engine in engines))

    def _move_along_difference(self) -> bool:
        """After g₁: keep it, ``d = g₁ − g₀`` (in the gradients), ``w ← w + ρ' d/‖d‖``."""
        if self._pending != "perturbed":
            return False  # non-finite g₀: no perturbation; the base step takes g₀ as it is
        engines = self._begin()
        for engine in engines:
            engine.copy("grads", _G1, self.state)
            engine.axpby(_G0, "grads", -1.0, 1.0, self.state)
        scale = self.norm_rho / (self._norm(engines) + NORM_EPS)
        for engine in engines:
            for gi, (w, b, d) in engine.group_tensors(["weights", "backup", "grads"], self.state).items():
                if self.param_groups[gi]["sam_rho"] == 0:
                    continue  # never perturbed (nor backed up on every engine)
                torch._foreach_copy_(w, b)
                if scale != 0:
                    torch._foreach_add_(w, d, alpha=scale)
        return True

    def _move_along_g2(self) -> bool:
        """After g₂: ``p = g₀ + |β₂| g₂`` (kept where g₀ was), ``w ← w + ρ g₂/‖g₂‖``."""
        engines = self._begin()
        scale = 1.0 / (self._norm(engines) + NORM_EPS)
        for engine in engines:
            engine.axpby("grads", _G0, abs(self.beta2), 1.0, self.state)
            for gi, (w, g) in engine.group_tensors(["weights", "grads"], self.state).items():
                rho = self.param_groups[gi]["sam_rho"]
                if rho != 0:
                    torch._foreach_add_(w, g, alpha=rho * scale)
        return True

    def _decompose(self) -> None:
        """After g₃: ``u = β₁g₁ + β₃g₃``, ``u ← (1 + γ c ‖p‖/‖u‖) u − γ p``."""
        engines = self._begin()
        for engine in engines:
            engine.axpby(_G1, "grads", self.beta1, self.beta3, self.state)
        u_norm, p_norm = self._norm(engines), self._norm(engines, _G0)
        inner = sum(engine.dot(_G0, "grads", self.state) for engine in engines)
        cosine = inner / (u_norm * p_norm + NORM_EPS)
        for engine in engines:
            engine.axpby(_G0, "grads", -self.gamma, 1.0 + self.gamma * cosine * p_norm / (u_norm + NORM_EPS), self.state)

    def _closure_step_body(self, closure: Callable[[], Tensor]) -> Tensor:
        if any(group.get("maximize") for group in self.param_groups):
            # Only SAM's first move knows the sign: the moves along g₁ − g₀ and g₂ would ascend
            # the wrong way. Refused rather than half-flipped.
            raise ValueError("GAM does not support maximize=True")
        moves = [lambda: self.first_step() and self._pending == "perturbed", self._move_along_difference, self._move_along_g2]
        loss = run_closure_passes(self, closure, moves)
        if self._pending == "perturbed":
            self._decompose()
        self.second_step()
        return loss

    def __repr__(self) -> str:
        return f"GAM(backend={self.backend!r}, base={self.base_optimizer!r})"
