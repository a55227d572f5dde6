"""Engine selection for the torch front: which engine serves each parameter (by kind, device and
dtype), and the checks of an explicit ``backend=``."""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import Tensor

from sharpness.backends.distributed import DTensorEngine, is_dtensor
from sharpness.backends.rust import RustEngine
from sharpness.backends.torch_foreach import TorchEngine
from sharpness.backends.triton import TritonEngine, why_not as triton_why_not
from sharpness.buffers import keep_in_place

BACKENDS = ("auto", "rust", "torch", "triton")
RUST_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_ENGINES: dict[str, type] = {"rust": RustEngine, "torch": TorchEngine, "dtensor": DTensorEngine, "triton": TritonEngine}


def check_backend(param_groups: list[dict[str, Any]], backend: str) -> None:
    """Refuses ``backend="rust"`` or ``"triton"`` for a parameter that engine cannot serve."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    for group in param_groups:
        for p in group["params"]:
            if backend == "rust" and (p.device.type != "cpu" or p.dtype not in RUST_DTYPES):
                raise ValueError(
                    f'backend="rust" runs on CPU tensors of {[str(d) for d in RUST_DTYPES]}; '
                    f"got a {p.dtype} parameter on {p.device} (use backend='auto' or 'torch')"
                )
            if backend == "triton":
                why = triton_why_not(p)
                if why is not None:
                    raise ValueError(f'backend="triton" cannot serve a {p.dtype} parameter on {p.device}: {why}')


def build_engines(param_groups: list[dict[str, Any]], backend: str, memory: str, stats: Counter) -> list[Any]:
    """Sorts the parameters into engines by (kind, device, dtype). The flat-buffer engines (Rust,
    Triton) re-home their parameters; a parameter whose storage must not move (a view of a bigger
    tensor, tied to another through ``.data``, in shared memory, not dense:
    :func:`~sharpness.buffers.keep_in_place`, checked once here) goes to the in-place torch engine
    instead. DTensors (FSDP owns their storage) go to the DTensor engine."""
    every = [p for group in param_groups for p in group["params"] if not is_dtensor(p)]
    kept = {id(p) for p, keep in zip(every, keep_in_place(every)) if keep}
    buckets: dict[tuple[Any, ...], tuple[list[Tensor], list[int]]] = {}
    for gi, group in enumerate(param_groups):
        for p in group["params"]:
            movable = id(p) not in kept
            native = (
                backend != "torch"
                and p.device.type == "cpu"
                and p.dtype in RUST_DTYPES
                and p.requires_grad  # frozen parameters keep torch's `grad is None` as is
                and movable
            )
            on_triton = (
                backend in ("auto", "triton")
                and p.requires_grad
                and (backend == "triton" or p.device.type == "cuda")
                and triton_why_not(p) is None
                and movable
            )
            kind = "dtensor" if is_dtensor(p) else "triton" if on_triton else "rust" if native else "torch"
            params, group_of = buckets.setdefault((kind, p.device, p.dtype), ([], []))
            params.append(p)
            group_of.append(gi)
    engines = []
    for (kind, _, _), (params, group_of) in buckets.items():
        engine = _ENGINES[kind](params, group_of, stats)
        if memory != "exact":
            if not hasattr(engine, "memory"):
                raise ValueError(f"memory={memory!r} is not available on the {kind} engine ({params[0].device})")
            engine.memory = memory
        engines.append(engine)
    return engines
