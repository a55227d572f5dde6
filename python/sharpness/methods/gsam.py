"""GSAM (Zhuang et al., ICLR 2022, arXiv:2203.08065): the rule, its radius schedule and its
checks, written once for both fronts (:class:`sharpness.GSAM`, :class:`sharpness.numpy.GSAM`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sharpness._validation import number
from sharpness.methods.base import Method
from sharpness.methods.contract import Engine

__all__ = ["GSAM"]

_G = "gsam_g"  # g, kept from the first pass to the decomposition (not checkpointed)
_KEYS = ("gsam_rho_max", "gsam_rho_min", "gsam_lr_max", "gsam_lr_min")


def check_rho_ends(rho_min: float, rho_max: float) -> None:
    """Refuses a schedule whose lower end lies above its upper one."""
    if rho_min > rho_max:
        raise ValueError(f"rho_min ({rho_min}) must not exceed rho ({rho_max}): GSAM's ρ_t is clamped to [rho_min, rho]")


def scheduled_rho(lr: float, lr_min: float, lr_max: float, rho_min: float, rho_max: float) -> float:
    """``ρ_t = ρ_min + (ρ_max − ρ_min)(lr − lr_min)/(lr_max − lr_min)``, clamped to
    ``[ρ_min, ρ_max]``: a learning rate outside ``[lr_min, lr_max]`` (a warm-up, OneCycle's peak
    above the learning rate at construction) would carry ``ρ_t`` past the ends of the schedule.
    ``ρ_max = 0`` (a group never perturbed) gives 0 whatever ``ρ_min``."""
    if rho_max == 0.0:
        return 0.0
    check_rho_ends(rho_min, rho_max)  # the ends may have been changed since construction
    if rho_min == rho_max or lr_max == lr_min:
        return rho_max
    rho = rho_min + (rho_max - rho_min) * (lr - lr_min) / (lr_max - lr_min)
    return min(rho_max, max(rho_min, rho))


class GSAM(Method):
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
    ``g`` is kept during the step (one extra buffer, :attr:`vectors`; not checkpointed). On the
    numpy front (:class:`sharpness.numpy.GSAM`) the schedule reads ``param_groups[i]["lr"]`` the
    same way.

    Args:
        params, adaptive, eta, and the front's own arguments: as for :class:`sharpness.SAM`
            (torch) or :class:`sharpness.numpy.SAM`.
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

    norm_weights_supported = False  # its own norms (see Method.norm_weights_supported)
    needs_unscaled_first_gradient = "its update mixes the first gradient g with g̃, which the scaler unscales"
    group_keys = _KEYS

    def __init__(
        self,
        *args: Any,
        rho: float = 0.05,
        alpha: float = 0.1,
        rho_min: float | None = None,
        lr_max: float | None = None,
        lr_min: float = 0.0,
        **kwargs: Any,
    ) -> None:
        self.alpha = number("alpha", alpha, minimum=0)
        self._rho_min = None if rho_min is None else number("rho_min", rho_min, minimum=0)
        self._lr_max = None if lr_max is None else number("lr_max", lr_max, minimum=0)
        self._lr_min = number("lr_min", lr_min, minimum=0)
        if self._rho_min is not None:
            check_rho_ends(self._rho_min, number("rho", rho, minimum=0))
        super().__init__(*args, rho=rho, **kwargs)

    def _setup_group(self, group: dict[str, Any]) -> None:
        rho_max = group.setdefault("gsam_rho_max", group["sam_rho"])
        group.setdefault("gsam_rho_min", rho_max if self._rho_min is None else self._rho_min)
        group.setdefault("gsam_lr_max", float(group["lr"]) if self._lr_max is None else self._lr_max)
        group.setdefault("gsam_lr_min", self._lr_min)
        for key in _KEYS:  # a group may set its own
            group[key] = number(key, group[key], minimum=0)
        if group["gsam_rho_max"] != 0.0:  # (a group with ρ_max = 0 is never perturbed)
            check_rho_ends(group["gsam_rho_min"], group["gsam_rho_max"])

    def rho_t(self, group: dict[str, Any]) -> float:
        """``ρ_t`` for ``group`` at its current learning rate, clamped to ``[ρ_min, ρ_max]``."""
        return scheduled_rho(
            float(group["lr"]),
            float(group["gsam_lr_min"]),
            float(group["gsam_lr_max"]),
            float(group["gsam_rho_min"]),
            float(group["gsam_rho_max"]),
        )

    def _start_step(self) -> None:
        for group in self.param_groups:
            group["sam_rho"] = self.rho_t(group)

    def _before_perturbation(self, engines: Sequence[Engine]) -> None:
        if self.alpha != 0:
            for engine in engines:
                engine.copy("grads", _G, self.vectors)

    def _before_base_step(self, engines: Sequence[Engine]) -> None:
        if self.alpha == 0:
            return
        gp_gp = sum(engine.dot("grads", "grads", self.vectors) for engine in engines)
        g_gp = sum(engine.dot("grads", _G, self.vectors) for engine in engines)
        c = g_gp / gp_gp if gp_gp > 0 else 0.0
        # g_p − α(g − c g_p) = (1 + αc) g_p − α g, in one pass over the gradients.
        for engine in engines:
            engine.axpby(_G, "grads", -self.alpha, 1.0 + self.alpha * c, self.vectors)
