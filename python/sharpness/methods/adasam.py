"""AdaSAM (Sun et al., 2023, arXiv:2303.00565): the rule, written once for both fronts
(:class:`sharpness.AdaSAM`, :class:`sharpness.numpy.AdaSAM`).

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

from collections.abc import Sequence
from typing import Any

from sharpness._validation import number, pair
from sharpness.methods.base import Method
from sharpness.methods.contract import Engine

__all__ = ["AdaSAM"]

_M, _V, _VMAX = "adasam_m", "adasam_v", "adasam_vmax"  # per-parameter state (checkpointed)


def _check_lr(value: Any) -> float:
    return number("lr", value, minimum=0)


def _check_betas(value: Any) -> tuple[float, float]:
    return pair("betas", value, minimum=0, below=1)


def _check_eps(value: Any) -> float:
    return number("eps", value, above=0)


class AdaSAM(Method):
    r"""AdaSAM (Sun et al., 2023, arXiv:2303.00565): SAM's perturbation, then an AMSGrad-style
    step with momentum on the perturbed gradient; a standalone optimizer (no base optimizer).

    Algorithm::

        s  = ∇L(x)                          # first forward/backward (first_step)
        e  = ρ s/(‖s‖ + 1e-12)              # SAM's perturbation (global norm)
        g  = ∇L(x + e)                      # second forward/backward (second_step)
        m ← β₁m + (1−β₁)g;  v ← β₂v + (1−β₂)g²;  v̂ ← max(v̂, v)
        x ← x − lr·m/√max(v̂, ε²)            # from the exact saved x; m = v = v̂ = 0 at the start

    ``rho = 0`` is the update alone (AMSGrad without bias correction, with ε as the floor of
    ``v̂``). The perturbation is SAM's own (its fused kernels, ASAM's with ``adaptive=True``);
    ``m``, ``v``, ``v̂`` are per-parameter state (``adasam_m``, ``adasam_v``, ``adasam_vmax``;
    the stored maximum starts at 0 and the update uses ``max(v̂, ε²)``, which is the paper's
    ``v̂`` exactly), in ``state_dict``. ``lr``, ``betas`` and ``eps`` are group keys (an LR
    scheduler drives ``lr``; a group may set its own). A parameter without a gradient is left
    alone. A non-finite ``‖s‖`` moves nothing (``stats["nonfinite_skips"]``); the update is then
    taken with the second gradient. On the numpy front the same rule runs over numpy arrays
    (:class:`sharpness.numpy.AdaSAM`, ``step(grad_fn)``).

    Args:
        params, rho, and the front's own arguments: as for :class:`sharpness.SAM` (``backend``,
            ``seed`` ...; no ``base_optimizer``) or :class:`sharpness.numpy.SAM` (no ``base``).
        lr: ``γ`` (1e-3).
        betas: ``(β₁, β₂)`` ((0.9, 0.999)), each in [0, 1).
        eps: ``ε`` (1e-8), > 0: ``v̂₋₁ = ε²``.

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

        On the numpy front (``grad_fn(params) -> (loss, grads)``):

        >>> import numpy as np
        >>> from sharpness.numpy import AdaSAM
        >>> rng = np.random.default_rng(0)
        >>> X, y = rng.normal(size=(32, 3)), rng.normal(size=32)
        >>> w = np.zeros(3)
        >>> def grad_fn(params):
        ...     r = X @ params[0] - y
        ...     return 0.5 * np.mean(r**2), [X.T @ r / len(y)]
        >>> opt = AdaSAM([w], lr=0.01, rho=0.05)
        >>> losses = [opt.step(grad_fn) for _ in range(100)]
        >>> bool(losses[-1] < losses[0])
        True
    """

    group_keys = ("lr", "betas", "eps")

    def __init__(
        self,
        *args: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        **kwargs: Any,
    ) -> None:
        self._lr = _check_lr(lr)
        self._betas = _check_betas(betas)
        self._eps = _check_eps(eps)
        super().__init__(*args, **kwargs)

    def _setup_group(self, group: dict[str, Any]) -> None:
        # a group may set its own; the others take the constructor's
        group["lr"] = _check_lr(group.setdefault("lr", self._lr))
        group["betas"] = _check_betas(group.setdefault("betas", self._betas))
        group["eps"] = _check_eps(group.setdefault("eps", self._eps))

    def _own_update(self, engines: Sequence[Engine]) -> None:
        for engine in engines:
            engine.elementwise(self._update, ["weights", "grads", _M, _V, _VMAX], self.state)

    def _update(self, xp: Any, gi: int, w: Any, g: Any, m: Any, v: Any, vmax: Any) -> None:
        """The AdaSAM update over one run of parameters (``xp``: numpy or torch)."""
        group = self.param_groups[gi]
        beta1, beta2 = group["betas"]
        m *= beta1
        m += (1 - beta1) * g
        v *= beta2
        v += (1 - beta2) * (g * g)
        xp.maximum(vmax, v, out=vmax)
        w -= group["lr"] * m / xp.sqrt(xp.clip(vmax, group["eps"] ** 2, None))
