"""What the engines share: group settings and which base optimizers have fused kernels."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sharpness.methods import NORM_EPS  # noqa: F401  (the engines' name for it)


def scale_of(group: dict[str, Any], norm: float) -> float:
    """``ρ/(‖g‖ + ε)``: the factor that turns a gradient into the group's perturbation.

    A group whose base optimizer maximizes (``maximize=True``) runs SAM on ``−L``: its worst
    nearby point lies along ``−g``, so the factor changes sign.
    """
    scale = group["sam_rho"] / (norm + NORM_EPS)
    return -scale if group.get("maximize", False) else scale


def norm_weight_sq(group: dict[str, Any]) -> float:
    """``c²`` for the group's ``sam_norm_weight`` ``c``: its gradient enters SAM's global norm as
    ``c²‖g‖²`` (μP²'s layerwise denominator factors). Engines skip the product when it is 1."""
    c = float(group.get("sam_norm_weight", 1.0))
    return c * c


def fused_kernel_kind(base: torch.optim.Optimizer, groups: list[dict[str, Any]]) -> str | None:
    """``"sgd"`` or ``"adam"`` when the base optimizer's step has a fused kernel with identical
    semantics for every group, else None (the base optimizer then steps itself)."""
    kind = {torch.optim.SGD: "sgd", torch.optim.Adam: "adam", torch.optim.AdamW: "adam"}.get(type(base))
    if kind is None:
        return None
    for g in groups:
        if g.get("differentiable") or isinstance(g["lr"], Tensor):
            return None
        if kind == "adam" and (g.get("capturable") or any(isinstance(b, Tensor) for b in g["betas"])):
            return None
    return kind


def adam_step_dtype() -> torch.dtype:
    """The dtype torch.optim.Adam gives ``state["step"]``."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
