"""AdaSAM: SAM's perturbation with an AMSGrad-style adaptive update and momentum.

Sun, Shen, Zhong, Ding, Chen, Sun, Li, Sun, Tao, "AdaSAM: Boosting Sharpness-Aware Minimization
with Adaptive Learning Rate and Momentum for Training Deep Neural Networks", 2023,
arXiv:2303.00565 (first as "Provable Sharpness-Aware Minimization with Adaptive Learning Rate").
The paper's algorithm, with ``s = ∇L(x)``::

    δ = ρ s/‖s‖;  g = ∇L(x + δ)
    m ← β₁m + (1−β₁)g;  v ← β₂v + (1−β₂)g²;  v̂ ← max(v̂, v)
    x ← x − γ·m/√v̂                 # m₋₁ = v₋₁ = 0, v̂₋₁ = ε²; no bias correction, no ε added

The stability constant enters only as the floor ``v̂₋₁ = ε²`` of the running maximum.
"""

from __future__ import annotations

from typing import Any

import torch

from sharpness._validation import pair
from sharpness.optim._standalone import StandaloneSAM, check_positive

_M, _V, _VMAX = "adasam_m", "adasam_v", "adasam_vmax"


class AdaSAM(StandaloneSAM):
    r"""AdaSAM (Sun et al., 2023, arXiv:2303.00565): SAM's perturbation, then an AMSGrad-style
    step with momentum on the perturbed gradient; a standalone optimizer (no base optimizer).

    Algorithm::

        s  = ∇L(x)                          # first forward/backward
        e  = ρ s/(‖s‖ + 1e-12)              # SAM's perturbation (global norm)
        g  = ∇L(x + e)                      # second forward/backward
        m ← β₁m + (1−β₁)g;  v ← β₂v + (1−β₂)g²;  v̂ ← max(v̂, v)
        x ← x − lr·m/√v̂                     # from the exact saved x; v̂ starts at ε²

    ``rho = 0`` is the update alone (AMSGrad without bias correction, with ε as the floor of
    ``v̂``). The perturbation is SAM's own fused kernel; ``m``, ``v``, ``v̂`` are per-parameter
    state (``adasam_m``, ``adasam_v``, ``adasam_vmax``; the stored maximum starts at 0 and the
    update uses ``max(v̂, ε²)``, which is the paper's ``v̂`` exactly).

    Args:
        params: parameters or parameter groups.
        lr: ``γ`` (1e-3).
        rho: ``ρ`` (0.05).
        betas: ``(β₁, β₂)`` ((0.9, 0.999)).
        eps: ``ε`` (1e-8): ``v̂₋₁ = ε²``.
        backend, same_noise, seed: as for :class:`sharpness.SAM`.

    Example:
        >>> import torch, sharpness
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = sharpness.AdaSAM(model.parameters(), lr=1e-3, rho=0.05)
        >>> x, y = torch.randn(8, 4), torch.randn(8, 2)
        >>> torch.nn.functional.mse_loss(model(x), y).backward()
        >>> _ = opt.first_step(zero_grad=True)   # x -> x + e
        >>> torch.nn.functional.mse_loss(model(x), y).backward()
        >>> opt.second_step(zero_grad=True)      # back to x, then the AdaSAM update
        >>> sorted(opt.state[model.weight])
        ['adasam_m', 'adasam_v', 'adasam_vmax']
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        rho: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        backend: str = "auto",
        same_noise: bool = True,
        seed: int | None = None,
    ) -> None:
        lr = check_positive("lr", lr)
        eps = check_positive("eps", eps, allow_zero=False)
        b1, b2 = pair("betas", betas, minimum=0, below=1)
        super().__init__(params, rho=rho, backend=backend, same_noise=same_noise, seed=seed, lr=lr, betas=(b1, b2), eps=eps)

    def _update(self, engines: list) -> None:
        for group, (w, g, m, v, vmax) in self._tensors(engines, ["weights", "grads", _M, _V, _VMAX]):
            b1, b2 = group["betas"]
            floor = group["eps"] ** 2
            torch._foreach_mul_(m, b1)
            torch._foreach_add_(m, g, alpha=1 - b1)
            torch._foreach_mul_(v, b2)
            torch._foreach_addcmul_(v, g, g, value=1 - b2)
            torch._foreach_maximum_(vmax, v)
            denom = torch._foreach_clamp_min(vmax, floor)
            torch._foreach_sqrt_(denom)
            torch._foreach_addcdiv_(w, m, denom, value=-group["lr"])
