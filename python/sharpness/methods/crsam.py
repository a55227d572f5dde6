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
along ``ĝ`` changes with ``w``). ``γ = β = 0`` is SAM. The rule is written once here for both
fronts (:class:`sharpness.CRSAM`, :class:`sharpness.numpy.CRSAM`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sharpness._validation import number
from sharpness.methods import NORM_EPS
from sharpness.methods.base import Phase
from sharpness.methods.closure import ClosureDrivenMethod, coefficient
from sharpness.methods.contract import Engine

__all__ = ["CRSAM"]

_ACC = "crsam_acc"  # g₀, then (1+γ+β)g₊ − 2γ g₀ (within a step only: in `vectors`, not checkpointed)


class CRSAM(ClosureDrivenMethod):
    r"""CR-SAM (Wu et al., AAAI 2024, arXiv:2312.13555) around any base optimizer: three gradients
    per step, through ``step(closure)`` (torch) or ``step(grad_fn)`` (numpy) only.

    Algorithm (as the official code)::

        g₀ = ∇L(w);  e = ρ g₀/(‖g₀‖ + 1e-12)
        g₊ = ∇L(w + e)
        g₋ = ∇L(w − e)
        u  = g₊ + γ (g₊ + g₋ − 2 g₀) + β (g₊ − g₋)
        w ← base_step(w, u)       # from the exact saved w (the official code subtracts e)

    The first move is SAM's perturbation; ``w − e`` is written from the saved ``w``; one extra
    vector (``crsam_acc`` in :attr:`vectors`, within the step) holds ``g₀``, then
    ``(1+γ+β)g₊ − 2γ g₀``. The closure (``grad_fn``) runs three times, on the torch front with the
    first call's random state when ``same_noise``. A non-finite ``‖g₀‖`` ends the step after one
    call with the base optimizer's own step on ``g₀`` (counted in ``stats["nonfinite_skips"]``).
    With ``maximize=True`` the objective is ``−L`` and ``e`` points along ``−g₀``. ``γ`` and ``β``
    are kept in ``sam_state`` (checkpointed: a loaded checkpoint's values win). ``γ = β = 0`` is
    SAM bit for bit. No ``adaptive`` (ASAM) form.

    Args:
        params, base_optimizer, backend, same_noise, seed, **base_kwargs: as for
            :class:`sharpness.SAM` (numpy front: ``params, base, **base_kwargs`` as for
            :class:`sharpness.numpy.SAM`).
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

        The numpy front, ``grad_fn(params) -> (loss, grads)`` in place of the closure:

        >>> import numpy as np
        >>> from sharpness.numpy import CRSAM
        >>> X, t = np.random.default_rng(0).normal(size=(32, 3)), np.ones(32)
        >>> w = np.zeros(3)
        >>> def grad_fn(params):
        ...     r = X @ params[0] - t
        ...     return 0.5 * np.mean(r**2), [X.T @ r / len(t)]
        >>> opt = CRSAM([w], rho=0.1, gamma=0.1, beta=0.1, lr=0.1)
        >>> losses = [opt.step(grad_fn) for _ in range(30)]  # grad_fn at w, w + e, w - e
        >>> bool(losses[-1] < losses[0])
        True
    """

    needs_exact_backup = "it rebuilds its points from the saved w between its moves"

    evaluations_per_step = "three gradients per step"
    coefficients = ("gamma", "beta")
    adaptive_unsupported = "its point w − e mirrors SAM's plain e"

    gamma = coefficient("gamma", "``γ``, the weight of the second difference ``g₊ + g₋ − 2g₀``.")
    beta = coefficient("beta", "``β``, the weight of the first difference ``g₊ − g₋``.")

    def __init__(self, *args: Any, rho: float = 0.1, gamma: float = 0.1, beta: float = 0.1, **kwargs: Any) -> None:
        values = self._check_coefficients(dict(gamma=gamma, beta=beta))
        super().__init__(*args, rho=number("rho", rho, minimum=0), **kwargs)
        self._keep_coefficients(values)

    @staticmethod
    def _check_coefficients(values: dict[str, Any]) -> dict[str, Any]:
        return {name: number(name, value) for name, value in values.items()}

    def _step_by_evaluations(self, evaluate: Callable[..., tuple[Any, Sequence[Engine]]]) -> Any:
        self._check_groups()
        vectors = self.vectors
        loss, engines = evaluate()  # g₀ at w
        norm = self._gradient_norm(engines)
        self.last_grad_norm = norm
        self._pending = self._perturb_or_skip(engines, norm)  # w + e, w saved
        if self._pending is not Phase.PERTURBED:
            return loss  # a non-finite ‖g₀‖: nothing moved; the base step takes g₀ as it is
        for engine in engines:
            engine.copy("grads", _ACC, vectors)

        _, engines = evaluate()  # g₊ at w + e
        minus_e = {}  # −e's scale per perturbed group (e points along −g₀ where the group maximizes)
        for i, group in enumerate(self.param_groups):
            if group["sam_rho"] != 0:
                scale = group["sam_rho"] / (norm + NORM_EPS)
                minus_e[i] = scale if group.get("maximize") else -scale
        for engine in engines:
            engine.weights_from_backup(_ACC, minus_e, vectors)  # w − e, from the saved w
            engine.axpby("grads", _ACC, 1.0 + self.gamma + self.beta, -2.0 * self.gamma, vectors)

        _, engines = evaluate()  # g₋ at w − e
        for engine in engines:  # u = acc + (γ − β) g₋
            engine.axpby(_ACC, "grads", 1.0, self.gamma - self.beta, vectors)
        return loss
