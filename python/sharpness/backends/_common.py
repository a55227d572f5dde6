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


def filter_noise(weights: list[Tensor], scales: list[float], generator: torch.Generator) -> list[Tensor]:
    """RandomSAM's filter-wise relative noise for ``weights`` (real tensors of one dtype and device,
    whole parameters): ``z ~ N(0, I)`` drawn from ``generator`` on the CPU as one vector over them
    in order (float64 for float64 weights, else float32; each tensor taking the next ``numel``
    numbers in its logical order), and per tensor ``δ = scale·‖w[i]‖·z[i]`` for each output unit
    ``i`` (dim 0 when it has more than one dimension; the whole tensor otherwise), in that dtype."""
    first = weights[0]
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    z = torch.randn(sum(w.numel() for w in weights), generator=generator, dtype=dtype).to(first.device)
    deltas, at = [], 0
    for w, scale in zip(weights, scales):
        zi = z[at : at + w.numel()].view(w.shape)
        at += w.numel()
        if w.ndim > 1:
            norms = torch.linalg.vector_norm(w.reshape(w.shape[0], -1), dim=1, dtype=dtype)
            factor = (norms * scale).view(-1, *([1] * (w.ndim - 1)))
        else:
            factor = torch.linalg.vector_norm(w, dtype=dtype) * scale
        deltas.append(zi * factor)
    return deltas


def host_copy(t: Tensor) -> Any:
    """A host numpy copy of the real tensor ``t`` (any device): float64 for float64, else float32
    (numpy has no bfloat16). The engines' ``read``."""
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    return t.detach().to(device="cpu", dtype=dtype, copy=True).numpy()


def write_tensors(targets: list[Tensor], values: list[Any]) -> None:
    """``targets[i] ← values[i]`` (host arrays of the target's shape, rounded to its dtype; numbers
    filled in; None skipped), every shape checked before anything is written. The engines' ``write``."""
    tensors = [None if v is None else torch.as_tensor(v) for v in values]
    for t, v in zip(targets, tensors):
        if v is not None and v.ndim and tuple(v.shape) != tuple(t.shape):
            raise ValueError(f"an array of shape {tuple(v.shape)} for a vector of shape {tuple(t.shape)}")
    with torch.no_grad():
        for t, v in zip(targets, tensors):
            if v is None:
                continue
            if v.ndim:
                t.copy_(v)
            else:
                t.fill_(float(v))


def draw_uniform(count: int, generator: torch.Generator) -> Any:
    """``count`` float32 numbers uniform in ``[0, 1)`` from ``generator`` (a CPU ``torch.Generator``),
    as a numpy array. The engines' ``draw_uniform``."""
    return torch.rand(count, generator=generator, dtype=torch.float32).numpy()
