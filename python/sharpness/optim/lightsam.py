"""LightSAM: SAM whose radius and learning rate adapt, so that any ρ and η converge.

Cheng, Shen, Sun, Yin, Cao, Chen, "LightSAM: Parameter-Agnostic Sharpness-Aware Minimization",
2025, arXiv:2505.24399. SAM's convergence needs ρ and η below problem-dependent bounds; LightSAM
replaces both SGD steps (the ascent and the descent) by adaptive ones, so that they scale
themselves. With ``s`` the gradient at ``θ`` and ``g̃`` the gradient at the perturbed point ``w̃``
(both on the same mini-batch), the AdaGrad-Norm form is::

    u ← u + ‖s‖²,   w̃ = θ + ρ·s/√u          # accumulate, then use: ‖ρ s/√u‖ ≤ ρ
    v ← v + ‖g̃‖²,   θ ← θ − η·g̃/√v
    u₀ = v₀ = ε²

The AdaGrad form keeps the same two accumulators per coordinate (``u ← u + s²``, ``s/√u``
elementwise); the Adam form keeps Adam moments for both steps (``m ← β₁m + (1−β₁)s``,
``u ← β₂u + (1−β₂)s²``, ``w̃ = θ + ρ·m/√u``; the same with ``g̃`` for the update, ``θ ← θ −
η·n/√v``), the second moments starting at ``ε²`` as well, without bias correction.

Provenance: the AdaGrad-Norm and AdaGrad forms follow the paper's equations as transcribed by a
secondary source and agree with its abstract; the paper's Adam algorithm (first moment or raw
gradient in the ascent, bias correction, an AMSGrad-style max) could not be read here, so the Adam
form above is this library's construction in the paper's pattern, not a transcription.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from sharpness._validation import pair
from sharpness.optim._standalone import StandaloneSAM, check_positive

VARIANTS = ("adagrad-norm", "adagrad", "adam")
_U, _V, _M, _N = "lightsam_u", "lightsam_v", "lightsam_m", "lightsam_n"


class LightSAM(StandaloneSAM):
    r"""LightSAM (Cheng et al., 2025, arXiv:2505.24399): parameter-agnostic SAM, a standalone
    optimizer (no base optimizer) with adaptive perturbation and update.

    Algorithm, ``variant="adagrad-norm"`` (one global ``u``, ``v``; ``‖·‖`` over every parameter)::

        s  = ∇L(θ)                       # first forward/backward
        u ← u + ‖s‖²;  w̃ = θ + ρ s/√u   # u₀ = ε²
        g̃  = ∇L(w̃)                      # second forward/backward
        v ← v + ‖g̃‖²;  θ ← θ − η g̃/√v   # v₀ = ε², from the exact saved θ

    ``variant="adagrad"``: the same with per-coordinate ``u``, ``v`` (``s²``, ``g̃²`` and the
    divisions elementwise). ``variant="adam"``: ``m ← β₁m + (1−β₁)s``, ``u ← β₂u + (1−β₂)s²``,
    ``w̃ = θ + ρ m/√u``; ``n ← β₁n + (1−β₁)g̃``, ``v ← β₂v + (1−β₂)g̃²``, ``θ ← θ − η n/√v``
    (``u₀ = v₀ = ε²``, ``m₀ = n₀ = 0``, no bias correction; this Adam form is the library's
    construction: the paper's Adam algorithm was not available to check it against).

    ``ρ`` (``sam_rho`` in a group) and ``η`` (``lr``, which LR schedulers drive) may differ per
    group; the AdaGrad-Norm accumulators are global (``sam_state["u"]``, ``["v"]``), the others
    are per-parameter state (``lightsam_u``, ``lightsam_v``, ``lightsam_m``, ``lightsam_n``),
    all in ``state_dict``. A parameter without a gradient is left alone (its accumulators too).
    The weights are restored from a saved copy, never by subtracting.

    Args:
        params: parameters or parameter groups.
        lr: ``η``. Any positive value converges on smooth problems (the paper's claim); the
            defaults are 0.1 for the AdaGrad forms and 1e-3 for the Adam form.
        rho: ``ρ`` (0.05 by default; ``ρ = 0`` is AdaGrad-Norm / AdaGrad / this Adam form).
        variant: ``"adagrad-norm"`` (default), ``"adagrad"`` or ``"adam"``.
        eps: ``ε``: the accumulators start at ``ε²`` (1e-8).
        betas: ``(β₁, β₂)`` of the Adam form ((0.9, 0.999)).
        backend, same_noise, seed: as for :class:`sharpness.SAM`.

    Example:
        >>> import torch, sharpness
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = sharpness.LightSAM(model.parameters(), lr=1.0, rho=0.1)  # any lr, rho
        >>> x, y = torch.randn(8, 4), torch.randn(8, 2)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> loss = opt.step(closure)  # the closure runs twice: at θ, then at θ + ρ s/√u
        >>> opt.sam_state["u"] > 0 and opt.sam_state["v"] > 0
        True
    """

    norm_weights_supported = False  # its own norms (see SAM.norm_weights_supported)
    needs_unscaled_first_gradient = "its accumulators of the first gradient would hold scaled values"

    def __init__(
        self,
        params: Any,
        lr: float | None = None,
        rho: float = 0.05,
        variant: str = "adagrad-norm",
        eps: float = 1e-8,
        betas: tuple[float, float] = (0.9, 0.999),
        backend: str = "auto",
        same_noise: bool = True,
        seed: int | None = None,
    ) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if lr is None:
            lr = 1e-3 if variant == "adam" else 0.1
        lr = check_positive("lr", lr)
        eps = check_positive("eps", eps, allow_zero=False)
        b1, b2 = pair("betas", betas, minimum=0, below=1)
        self.variant = variant
        super().__init__(params, rho=rho, backend=backend, same_noise=same_noise, seed=seed, lr=lr, eps=eps, betas=(b1, b2))
        if variant == "adagrad-norm":
            self.sam_state.update(u=eps * eps, v=eps * eps)

    # -- perturbation: w̃ = θ + ρ·(adaptive direction) --------------------------------------------------

    def _ascend(self, engines: list) -> bool:
        if self.variant == "adagrad-norm":
            sq = self._sq(engines)
            self.last_grad_norm = math.sqrt(sq)
            if not math.isfinite(sq):
                return False
            self.sam_state["u"] += sq
            inv = 1.0 / math.sqrt(self.sam_state["u"])
            self._save(engines)
            for group, (w, s) in self._tensors(engines, ["weights", "grads"]):
                if group["sam_rho"] != 0:
                    torch._foreach_add_(w, s, alpha=group["sam_rho"] * inv)
            return True
        if not math.isfinite(self._sq(engines)):
            return False
        self._save(engines)
        if self.variant == "adagrad":
            for group, (w, s, u) in self._tensors(engines, ["weights", "grads", _U], init=self._init(_U)):
                torch._foreach_addcmul_(u, s, s)
                if group["sam_rho"] != 0:
                    torch._foreach_addcdiv_(w, s, torch._foreach_sqrt(u), value=group["sam_rho"])
        else:
            for group, (w, s, m, u) in self._tensors(engines, ["weights", "grads", _M, _U], init=self._init(_U)):
                b1, b2 = group["betas"]
                torch._foreach_mul_(m, b1)
                torch._foreach_add_(m, s, alpha=1 - b1)
                torch._foreach_mul_(u, b2)
                torch._foreach_addcmul_(u, s, s, value=1 - b2)
                if group["sam_rho"] != 0:
                    torch._foreach_addcdiv_(w, m, torch._foreach_sqrt(u), value=group["sam_rho"])
        return True

    def _init(self, name: str) -> dict[str, float]:
        eps = self.defaults["eps"]
        return {name: eps * eps}

    # -- update: θ ← θ − η·(adaptive direction) ---------------------------------------------------------

    def _update(self, engines: list) -> None:
        if self.variant == "adagrad-norm":
            sq = self._sq(engines)
            self.sam_state["v"] += sq
            inv = 1.0 / math.sqrt(self.sam_state["v"])
            for group, (w, g) in self._tensors(engines, ["weights", "grads"]):
                torch._foreach_add_(w, g, alpha=-group["lr"] * inv)
        elif self.variant == "adagrad":
            for group, (w, g, v) in self._tensors(engines, ["weights", "grads", _V], init=self._init(_V)):
                torch._foreach_addcmul_(v, g, g)
                torch._foreach_addcdiv_(w, g, torch._foreach_sqrt(v), value=-group["lr"])
        else:
            for group, (w, g, n, v) in self._tensors(engines, ["weights", "grads", _N, _V], init=self._init(_V)):
                b1, b2 = group["betas"]
                torch._foreach_mul_(n, b1)
                torch._foreach_add_(n, g, alpha=1 - b1)
                torch._foreach_mul_(v, b2)
                torch._foreach_addcmul_(v, g, g, value=1 - b2)
                torch._foreach_addcdiv_(w, n, torch._foreach_sqrt(v), value=-group["lr"])
