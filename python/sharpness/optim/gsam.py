"""GSAM: surrogate-gap guided SAM.

Zhuang, Gong, Yuan, Cui, Adam, Dvornek, Tatikonda, Duncan, Liu, "Surrogate Gap Minimization
Improves Sharpness-Aware Training", ICLR 2022 (arXiv:2203.08065; PyTorch code by the first author:
github.com/juntang-zhuang/GSAM). SAM minimises the perturbed loss ``f_p(w) = L(w + e)``; GSAM also
lowers the surrogate gap ``h = f_p − f`` without raising ``f_p``, by an ascent step on ``f`` along
the part of its gradient orthogonal to ``∇f_p`` (Algorithm 1)::

    g   = ∇L(w),  e = ρ_t g/‖g‖,  g_p = ∇L(w + e)
    g_∥ = (⟨g, g_p⟩/‖g_p‖²)·g_p,   g_⊥ = g − g_∥
    w   ← base_step(w, g_p − α g_⊥)

``ρ_t`` follows the learning rate (the paper's ImageNet runs, and the code's
``ProportionScheduler``)::

    ρ_t = ρ_min + (ρ_max − ρ_min)·(lr_t − lr_min)/(lr_max − lr_min)     (ρ_max when lr_max = lr_min)

clamped to ``[ρ_min, ρ_max]``: a learning rate above ``lr_max`` (a warm-up, OneCycle) gives
``ρ_max``, one below ``lr_min`` gives ``ρ_min``; ``ρ_min > ρ_max`` is refused.
"""

from __future__ import annotations

from typing import Any

import torch

from sharpness._validation import number
from sharpness.methods.gsam import check_rho_ends, scheduled_rho
from sharpness.optim._state import new_vectors
from sharpness.optim.sam import SAM

_G = "gsam_g"  # g, kept from the first pass to the decomposition (not checkpointed)
_KEYS = ("gsam_rho_max", "gsam_rho_min", "gsam_lr_max", "gsam_lr_min")


def _finite(name: str, value: Any, minimum: float = 0.0) -> float:
    return number(name, value, minimum=minimum)


class GSAM(SAM):
    r"""GSAM (Zhuang et al., ICLR 2022, arXiv:2203.08065): SAM's gradient ``g_p = ∇L(w+e)`` minus
    ``α`` times the part of ``g = ∇L(w)`` orthogonal to it; ``ρ`` follows the learning rate.

    Algorithm::

        ρ_t = ρ_min + (ρ_max − ρ_min)(lr_t − lr_min)/(lr_max − lr_min)   per group, lr_t = group["lr"]
        ρ_t ← min(ρ_max, max(ρ_min, ρ_t))              never outside the schedule's ends
        g   = ∇L(w);  e = ρ_t g/(‖g‖ + 1e-12);  g_p = ∇L(w + e)
        g_⊥ = g − (⟨g, g_p⟩/‖g_p‖²) g_p                 one global inner product and norm
        w   ← base_step(w, g_p − α g_⊥)                 from the exact saved w

    The schedule is read from the group's learning rate at each :meth:`first_step`, so any LR
    scheduler drives it; the group's ``sam_rho`` holds the current ``ρ_t`` (overwritten each step)
    and the schedule's ends are group keys ``gsam_rho_max``, ``gsam_rho_min``, ``gsam_lr_max``,
    ``gsam_lr_min`` (saved with the groups in ``state_dict``; a group may set its own). The clamp
    keeps ``ρ_t`` at ``ρ_max`` while the learning rate exceeds ``lr_max`` (a warm-up, OneCycle's
    peak) and at ``ρ_min`` below ``lr_min``; ``ρ_min > ρ_max`` raises ``ValueError``. A group
    whose ``ρ_max`` is 0 is never perturbed (its ``ρ_min`` is then ignored). ``α = 0`` with ``rho_min = None`` is SAM bit for bit.
    ``g`` is kept during the step (one extra buffer, :attr:`vectors`; not checkpointed).

    Args:
        params, base_optimizer, adaptive, eta, backend, same_noise, seed, memory, **base_kwargs:
            as for :class:`sharpness.SAM`.
        rho: ``ρ_max`` (each group's ``sam_rho`` at construction, when it sets its own).
        alpha: ``α``, the weight of the orthogonal component (the paper tunes it per model in
            0.01–0.3; 0.1 here, as in the Keras port of the authors' code).
        rho_min: ``ρ_min`` (at most ``rho``); ``None`` keeps ``ρ`` constant at ``ρ_max`` (no
            schedule).
        lr_max: the learning rate at and above which ``ρ_t = ρ_max`` (default: each group's
            ``lr`` at construction, i.e. the peak of a decaying schedule; with a warm-up, give
            the peak learning rate).
        lr_min: the learning rate at and below which ``ρ_t = ρ_min`` (default 0).

    Example:
        >>> import torch, sharpness
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = sharpness.GSAM(model.parameters(), torch.optim.SGD, rho=0.1, rho_min=0.02, alpha=0.1,
        ...                      lr=0.1, momentum=0.9)
        >>> sched = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.0, total_iters=10)
        >>> x, y = torch.randn(8, 4), torch.randn(8, 2)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> for _ in range(5):
        ...     loss = opt.step(closure)
        ...     sched.step()
        >>> round(opt.param_groups[0]["sam_rho"], 4)  # ρ_t at the step taken with lr = 0.06
        0.068
    """

    norm_weights_supported = False  # its own norms (see SAM.norm_weights_supported)

    needs_unscaled_first_gradient = "its update mixes the first gradient g with g̃, which the scaler unscales"

    def __init__(
        self,
        params: Any,
        base_optimizer: Any,
        rho: float = 0.05,
        alpha: float = 0.1,
        rho_min: float | None = None,
        lr_max: float | None = None,
        lr_min: float = 0.0,
        **kwargs: Any,
    ) -> None:
        self.alpha = _finite("alpha", alpha)
        self._rho_min = None if rho_min is None else _finite("rho_min", rho_min)
        self._lr_max = None if lr_max is None else _finite("lr_max", lr_max)
        self._lr_min = _finite("lr_min", lr_min)
        super().__init__(params, base_optimizer, rho=rho, **kwargs)
        if self._rho_min is not None:
            check_rho_ends(self._rho_min, float(self.defaults["sam_rho"]))
        for group in self.param_groups:
            self._schedule_defaults(group)
        self._schedule_ready = True
        self.vectors = new_vectors()  # g between the two passes (not checkpointed)

    def _schedule_defaults(self, group: dict[str, Any]) -> None:
        rho_max = group.setdefault("gsam_rho_max", group["sam_rho"])
        group.setdefault("gsam_rho_min", rho_max if self._rho_min is None else self._rho_min)
        group.setdefault("gsam_lr_max", float(group["lr"]) if self._lr_max is None else self._lr_max)
        group.setdefault("gsam_lr_min", self._lr_min)
        for key in _KEYS:  # a group may set its own
            group[key] = _finite(key, group[key])
        if group["gsam_rho_max"] != 0.0:  # (a group with ρ_max = 0 is never perturbed)
            check_rho_ends(group["gsam_rho_min"], group["gsam_rho_max"])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if getattr(self, "_schedule_ready", False):  # after construction (__init__ adds groups too)
            self._schedule_defaults(self.param_groups[-1])

    def rho_t(self, group: dict[str, Any]) -> float:
        """``ρ_t`` for ``group`` at its current learning rate, clamped to ``[ρ_min, ρ_max]``."""
        return scheduled_rho(
            float(group["lr"]),
            float(group["gsam_lr_min"]),
            float(group["gsam_lr_max"]),
            float(group["gsam_rho_min"]),
            float(group["gsam_rho_max"]),
        )

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, grad_scaler: Any = None) -> bool:
        """As :meth:`SAM.first_step`, with each group's ``sam_rho`` set to ``ρ_t`` first."""
        if self._pending is None:
            for group in self.param_groups:
                group["sam_rho"] = self.rho_t(group)
        return super().first_step(zero_grad, grad_scaler)

    def _before_perturbation(self, engines: list) -> None:
        if self.alpha != 0:
            for engine in engines:
                engine.copy("grads", _G, self.vectors)

    @torch.no_grad()
    def _before_base_step(self, engines: list) -> None:
        if self.alpha == 0:
            return
        gp_gp = sum(engine.dot("grads", "grads", self.vectors) for engine in engines)
        g_gp = sum(engine.dot("grads", _G, self.vectors) for engine in engines)
        c = g_gp / gp_gp if gp_gp > 0 else 0.0
        # g_p − α(g − c g_p) = (1 + αc) g_p − α g, in one pass over the gradients.
        for engine in engines:
            engine.axpby(_G, "grads", -self.alpha, 1.0 + self.alpha * c, self.vectors)
