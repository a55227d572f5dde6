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

The rule is written once here, over the engine contract, and runs on both fronts
(:class:`sharpness.LightSAM` over torch tensors, :class:`sharpness.numpy.LightSAM` over numpy
arrays); it has an update of its own (:meth:`Method._own_update`): no base optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from sharpness._validation import number, pair
from sharpness.methods.base import Method, Phase
from sharpness.methods.contract import Engine

__all__ = ["LightSAM"]

VARIANTS = ("adagrad-norm", "adagrad", "adam")
# Per-parameter state (checkpointed with the optimizer's state): the ascent's accumulators u
# (and first moment m), the update's v (and n).
_U, _V, _M, _N = "lightsam_u", "lightsam_v", "lightsam_m", "lightsam_n"


def _check_lr(value: Any) -> float:
    return number("lr", value, minimum=0)


def _check_betas(value: Any) -> tuple[float, float]:
    return pair("betas", value, minimum=0, below=1)


class LightSAM(Method):
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
    group, and so may ``betas``; the AdaGrad-Norm accumulators are global (``sam_state["u"]``,
    ``["v"]``; ``‖s‖²`` and ``‖g̃‖²`` over every parameter, a group with ``ρ = 0`` included), the
    others are per-parameter state (``lightsam_u``, ``lightsam_v``, ``lightsam_m``,
    ``lightsam_n``), all in ``state_dict``. A parameter without a gradient is left alone (its
    accumulators too). The weights are restored from a saved copy, never by subtracting. A
    non-finite ``s`` (over every parameter) moves nothing and accumulates nothing
    (``stats["nonfinite_skips"]``); the update is then taken with the second gradient.

    Args:
        params, and the front's own arguments: as for :class:`sharpness.SAM` (``backend``,
            ``same_noise``, ``seed`` ...; no ``base_optimizer``) or :class:`sharpness.numpy.SAM`
            (no ``base``). No ``adaptive`` (ASAM) form.
        lr: ``η``. Any positive value converges on smooth problems (the paper's claim); the
            defaults are 0.1 for the AdaGrad forms and 1e-3 for the Adam form.
        rho: ``ρ`` (0.05 by default; ``ρ = 0`` is AdaGrad-Norm / AdaGrad / this Adam form).
        variant: ``"adagrad-norm"`` (default), ``"adagrad"`` or ``"adam"``.
        eps: ``ε``: the accumulators start at ``ε²`` (1e-8).
        betas: ``(β₁, β₂)`` of the Adam form ((0.9, 0.999)).

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

        The numpy front, the same rule (``grad_fn(params) -> (loss, grads)``)::

        >>> import numpy as np
        >>> from sharpness.numpy import LightSAM
        >>> w = np.zeros(3)
        >>> opt = LightSAM([w], lr=10.0, rho=1.0)  # a large lr and rho still converge
        >>> def grad_fn(params):
        ...     return float(np.sum((params[0] - 1) ** 2)), [2 * (params[0] - 1)]
        >>> for _ in range(200):
        ...     loss = opt.step(grad_fn)
        >>> bool(np.allclose(w, 1.0, atol=1e-6))
        True
    """

    norm_weights_supported = False  # its own norms (see Method.norm_weights_supported)
    needs_unscaled_first_gradient = "its accumulators of the first gradient would hold scaled values"
    group_keys = ("lr", "betas")

    def __init__(
        self,
        *args: Any,
        lr: float | None = None,
        rho: float = 0.05,
        variant: str = "adagrad-norm",
        eps: float = 1e-8,
        betas: tuple[float, float] = (0.9, 0.999),
        **kwargs: Any,
    ) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        self.variant = variant
        self._lr = _check_lr((1e-3 if variant == "adam" else 0.1) if lr is None else lr)
        self._betas = _check_betas(betas)
        #: ``ε``: every accumulator starts at ``ε²``.
        self.eps = number("eps", eps, above=0)
        rho = number("rho", rho, minimum=0)  # by its name here (the fronts check their group key sam_rho)
        super().__init__(*args, rho=rho, **kwargs)
        if variant == "adagrad-norm":
            self.sam_state.update(u=self.eps**2, v=self.eps**2)
        self._s_squared = math.nan  # ‖s‖² of the step under way (AdaGrad-Norm's increment of u)

    def _setup_group(self, group: dict[str, Any]) -> None:
        if group["sam_adaptive"]:
            raise ValueError("LightSAM has no adaptive (ASAM) form: its ascent is its own adaptive step")
        # a group may set its own; the others take the constructor's
        group["lr"] = _check_lr(group.setdefault("lr", self._lr))
        group["betas"] = _check_betas(group.setdefault("betas", self._betas))

    # -- perturbation: w̃ = θ + ρ·(adaptive direction) --------------------------------------------------

    def _perturb_or_skip(self, engines: Sequence[Engine], norm: float) -> Phase:
        # ‖s‖² over every parameter (u's increment, a group with ρ = 0 included) decides whether s
        # is finite: a non-finite one moves nothing and leaves the accumulators as they are.
        squares = sum(engine.dot("grads", "grads", self.state) for engine in engines)
        self._s_squared = squares
        return super()._perturb_or_skip(engines, math.sqrt(squares) if squares >= 0 else math.nan)

    def _perturb(self, engines: Sequence[Engine], norm: float) -> None:
        for engine in engines:
            engine.save_weights()
        if self.variant == "adagrad-norm":
            self.sam_state["u"] += self._s_squared
            inv = 1.0 / math.sqrt(self.sam_state["u"])
            scales = {gi: group["sam_rho"] * inv for gi, group in enumerate(self.param_groups)}
            for engine in engines:
                engine.add_to_weights("grads", scales, self.state)
        elif self.variant == "adagrad":
            for engine in engines:
                engine.elementwise(self._adagrad_ascent, ["weights", "grads", _U], self.state, init={_U: self.eps**2})
        else:
            for engine in engines:
                engine.elementwise(self._adam_ascent, ["weights", "grads", _M, _U], self.state, init={_U: self.eps**2})

    def _adagrad_ascent(self, xp: Any, gi: int, w: Any, s: Any, u: Any) -> None:
        u += s * s
        rho = self.param_groups[gi]["sam_rho"]
        if rho != 0:
            w += rho * s / xp.sqrt(u)

    def _adam_ascent(self, xp: Any, gi: int, w: Any, s: Any, m: Any, u: Any) -> None:
        group = self.param_groups[gi]
        beta1, beta2 = group["betas"]
        m *= beta1
        m += (1 - beta1) * s
        u *= beta2
        u += (1 - beta2) * (s * s)
        if group["sam_rho"] != 0:
            w += group["sam_rho"] * m / xp.sqrt(u)

    # -- update: θ ← θ − η·(adaptive direction) ---------------------------------------------------------

    def _own_update(self, engines: Sequence[Engine]) -> None:
        if self.variant == "adagrad-norm":
            self.sam_state["v"] += sum(engine.dot("grads", "grads", self.state) for engine in engines)
            inv = 1.0 / math.sqrt(self.sam_state["v"])
            scales = {gi: -group["lr"] * inv for gi, group in enumerate(self.param_groups)}
            for engine in engines:
                engine.add_to_weights("grads", scales, self.state)
        elif self.variant == "adagrad":
            for engine in engines:
                engine.elementwise(self._adagrad_update, ["weights", "grads", _V], self.state, init={_V: self.eps**2})
        else:
            for engine in engines:
                engine.elementwise(self._adam_update, ["weights", "grads", _N, _V], self.state, init={_V: self.eps**2})

    def _adagrad_update(self, xp: Any, gi: int, w: Any, g: Any, v: Any) -> None:
        v += g * g
        w -= self.param_groups[gi]["lr"] * g / xp.sqrt(v)  # (lr·g)/√v, as torch.optim.Adagrad rounds it

    def _adam_update(self, xp: Any, gi: int, w: Any, g: Any, n: Any, v: Any) -> None:
        group = self.param_groups[gi]
        beta1, beta2 = group["betas"]
        n *= beta1
        n += (1 - beta1) * g
        v *= beta2
        v += (1 - beta2) * (g * g)
        w -= group["lr"] * n / xp.sqrt(v)
