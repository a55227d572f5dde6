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

``β₂ = β₃ = γ = 0`` (with ``β₁ = 1``) is SAM (its update uses only ``g₁``). The rule is written
once here for both fronts (:class:`sharpness.GAM`, :class:`sharpness.numpy.GAM`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from sharpness._validation import number
from sharpness.methods import NORM_EPS
from sharpness.methods.base import Phase
from sharpness.methods.closure import ClosureDrivenMethod, coefficient
from sharpness.methods.contract import Engine

__all__ = ["GAM"]

# Within a step only (in `vectors`, not checkpointed): g₀ (then p), g₁, and d = g₁ − g₀.
_G0, _G1, _D = "gam_g0", "gam_g1", "gam_d"


class GAM(ClosureDrivenMethod):
    r"""GAM (Zhang et al., CVPR 2023, arXiv:2303.03108) around any base optimizer: four gradients
    per step, through ``step(closure)`` (torch) or ``step(grad_fn)`` (numpy) only.

    Algorithm (as the official code)::

        g₀ = ∇L(w);            w₁ = w + ρ g₀/‖g₀‖
        g₁ = ∇L(w₁);           d = g₁ − g₀;  w₂ = w + ρ' d/‖d‖
        g₂ = ∇L(w₂);           w₃ = w₂ + ρ g₂/‖g₂‖
        g₃ = ∇L(w₃)
        p = g₀ + |β₂| g₂;  u = β₁ g₁ + β₃ g₃;  c = p·u/(‖p‖‖u‖ + 1e-12)
        u ← u − γ (p − c ‖p‖ u/(‖u‖ + 1e-12))
        w ← base_step(w, u)    # from the exact saved w

    (norms get ``+ 1e-12``; every norm is global.) The closure (``grad_fn``) runs four times, on
    the torch front with the first call's random state when ``same_noise``. The first move is
    SAM's perturbation; a group with ``sam_rho = 0`` is never moved. A non-finite ``‖g₀‖`` ends the
    step after one call with the base optimizer's own step on ``g₀`` (counted in
    ``stats["nonfinite_skips"]``); a non-finite ``‖d‖`` or ``‖g₂‖`` leaves out that move (the
    point stays finite; the update, built from those gradients, goes to the base step as it is).
    ``g₀`` (then ``p``), ``g₁`` and ``d`` are kept during the step (three vectors the size of the
    model, :attr:`vectors`). The coefficients are kept in ``sam_state`` (checkpointed: a loaded
    checkpoint's values win). ``β₂ = β₃ = γ = 0`` reduces to SAM bit for bit. No ``adaptive``
    (ASAM) and no ``maximize`` form, and norm weights other than 1 are refused (its norms are its
    own).

    Args:
        params, base_optimizer, backend, same_noise, seed, **base_kwargs: as for
            :class:`sharpness.SAM` (numpy front: ``params, base, **base_kwargs`` as for
            :class:`sharpness.numpy.SAM`).
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

        The numpy front, ``grad_fn(params) -> (loss, grads)`` in place of the closure:

        >>> import numpy as np
        >>> from sharpness.numpy import GAM
        >>> X, t = np.random.default_rng(0).normal(size=(32, 3)), np.ones(32)
        >>> w = np.zeros(3)
        >>> def grad_fn(params):
        ...     r = X @ params[0] - t
        ...     return 0.5 * np.mean(r**2), [X.T @ r / len(t)]
        >>> opt = GAM([w], rho=0.05, norm_rho=0.2, lr=0.1)
        >>> losses = [opt.step(grad_fn) for _ in range(30)]  # grad_fn runs four times a step
        >>> bool(losses[-1] < losses[0])
        True
    """

    needs_exact_backup = "it rebuilds its points from the saved w between its moves"

    norm_weights_supported = False  # its own norms (see Method.norm_weights_supported)
    evaluations_per_step = "four gradients per step"
    coefficients = ("norm_rho", "beta1", "beta2", "beta3", "gamma")
    adaptive_unsupported = "its moves along g₁ − g₀ and g₂ are not scaled by |w| + η"
    maximize_unsupported = "only SAM's first move knows the sign; the moves along g₁ − g₀ and g₂ assume a minimisation"

    norm_rho = coefficient("norm_rho", "``ρ'``, the radius of the move along ``d = g₁ − g₀``.")
    beta1 = coefficient("beta1", "``β₁``, the weight of ``g₁``.")
    beta2 = coefficient("beta2", "``β₂``, whose absolute value weighs ``g₂``.")
    beta3 = coefficient("beta3", "``β₃``, the weight of ``g₃``.")
    gamma = coefficient("gamma", "``γ`` of the decomposition.")

    def __init__(
        self,
        *args: Any,
        rho: float = 0.05,
        norm_rho: float = 0.2,
        beta1: float = 1.0,
        beta2: float = 1.0,
        beta3: float = 1.0,
        gamma: float = 0.1,
        **kwargs: Any,
    ) -> None:
        values = self._check_coefficients(dict(norm_rho=norm_rho, beta1=beta1, beta2=beta2, beta3=beta3, gamma=gamma))
        super().__init__(*args, rho=rho, **kwargs)
        self._keep_coefficients(values)

    @staticmethod
    def _check_coefficients(values: dict[str, Any]) -> dict[str, Any]:
        return {name: number(name, value, minimum=0 if name == "norm_rho" else None) for name, value in values.items()}

    def _step_by_evaluations(self, evaluate: Callable[..., tuple[Any, Sequence[Engine]]]) -> Any:
        self._check_groups()
        vectors, groups = self.vectors, self.param_groups
        loss, engines = evaluate()  # g₀ at w
        norm = self._gradient_norm(engines)
        self.last_grad_norm = norm
        if math.isfinite(norm):
            for engine in engines:
                engine.copy("grads", _G0, vectors)
        self._pending = self._perturb_or_skip(engines, norm)  # w₁ = w + ρ g₀/‖g₀‖, w saved
        if self._pending is not Phase.PERTURBED:
            return loss  # a non-finite ‖g₀‖: nothing moved; the base step takes g₀ as it is

        _, engines = evaluate()  # g₁ at w₁
        for engine in engines:
            engine.copy("grads", _G1, vectors)
            engine.copy("grads", _D, vectors)
            engine.axpby(_G0, _D, -1.0, 1.0, vectors)  # d = g₁ − g₀
        d_norm = self._norm(engines, _D, vectors)
        along_d = self.norm_rho / (d_norm + NORM_EPS) if math.isfinite(d_norm) else 0.0
        for engine in engines:  # w₂ = w + ρ' d/‖d‖, from the saved w
            engine.weights_from_backup(_D, {i: along_d for i, g in enumerate(groups) if g["sam_rho"] != 0}, vectors)

        _, engines = evaluate()  # g₂ at w₂
        g2_norm = self._norm(engines, "grads", vectors)
        inverse = 1.0 / (g2_norm + NORM_EPS) if math.isfinite(g2_norm) else 0.0
        for engine in engines:
            engine.axpby("grads", _G0, abs(self.beta2), 1.0, vectors)  # p = g₀ + |β₂| g₂
            engine.add_to_weights("grads", {i: g["sam_rho"] * inverse for i, g in enumerate(groups)}, vectors)  # w₃

        _, engines = evaluate()  # g₃ at w₃
        for engine in engines:
            engine.axpby(_G1, "grads", self.beta1, self.beta3, vectors)  # u = β₁ g₁ + β₃ g₃
        u_norm, p_norm = self._norm(engines, "grads", vectors), self._norm(engines, _G0, vectors)
        cosine = sum(float(engine.dot(_G0, "grads", vectors)) for engine in engines) / (u_norm * p_norm + NORM_EPS)
        keep = 1.0 + self.gamma * cosine * p_norm / (u_norm + NORM_EPS)
        for engine in engines:  # u ← (1 + γ c ‖p‖/‖u‖) u − γ p
            engine.axpby(_G0, "grads", -self.gamma, keep, vectors)
        return loss
