"""GSAM's radius schedule (Zhuang et al., ICLR 2022, arXiv:2203.08065), shared by both fronts.
The algorithm itself is stated in :class:`sharpness.optim.GSAM`."""

from __future__ import annotations


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
