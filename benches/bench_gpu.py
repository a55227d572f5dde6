#!/usr/bin/env python
"""SAM's optimizer passes on a GPU: the Triton engine against torch SAMs and a device copy.

    python benches/bench_gpu.py                    # GPT-2-125M and ResNet-50 shapes, fp32
    python benches/bench_gpu.py --shapes gpt2 --dtype bf16 --reps 50

Synthetic parameters and gradients with the shapes of (a) GPT-2 small (148 tensors, 124.4M
parameters, ``model.parameters()`` order) and (b) ResNet-50 (161 tensors, 25.6M). What is timed
is the optimizer's part of a SAM step, with the gradients already in ``p.grad``: gradient norm,
perturbation (with its backup), restoration and the base step (SGD momentum 0.9; AdamW), CUDA
events around ``first_step`` + ``second_step``, medians over ``--reps`` steps after a warm-up.

Methods:

- ``per-tensor``: the usual ``sam.py`` (davda54/sam) hot path: ``torch.norm(torch.stack(...))``,
  a clone per tensor as backup, ``p.add_(g·scale)`` per tensor, ``p.data = backup``, then the base
  optimizer with ``foreach=False``;
- ``foreach``: ``torch._foreach_norm``, ``_foreach_copy_`` backups, ``_foreach_mul``/``_add_``
  with the scale kept on the device (no sync), ``_foreach_copy_`` back, base with ``foreach=True``;
- ``sharpness``: ``sharpness.SAM(..., backend="triton")`` (flat buffers, fused restore + step);
- ``copy``: ``dst.copy_(src)`` over as many elements: the memory floor, 2 bytes moved per byte.

Bytes a step must move per parameter (fp32): norm 4, perturb 16 (read w, g; write backup, w),
restore + SGD momentum 20 (read backup, g, buf; write w, buf) = 40; with AdamW the last pass is
28 (read backup, g, m, v; write w, m, v) = 48. Achieved bandwidth = those bytes / time, and its
fraction of the copy's bandwidth. Each Triton kernel is also timed alone on one flat buffer of
the same size (target on an H100: >= 85% of copy bandwidth for each kernel on GPT-2 shapes).
Exits with a message when no CUDA device is present.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

import torch

Shape = tuple[int, ...]
DEVICE = "cuda"  # "cpu" in --dry-run (Triton's interpreter, tiny shapes: checks the script, times nothing)


def gpt2_shapes(vocab: int = 50257, ctx: int = 1024, d: int = 768, layers: int = 12) -> list[Shape]:
    """GPT-2 small (HF ``GPT2LMHeadModel`` without the tied head): 148 tensors, 124,439,808."""
    shapes: list[Shape] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


def resnet50_shapes(num_classes: int = 1000) -> list[Shape]:
    """torchvision's ResNet-50 parameters in order: 161 tensors, 25,557,032."""
    shapes: list[Shape] = [(64, 3, 7, 7), (64,), (64,)]
    inplanes = 64
    for planes, blocks in [(64, 3), (128, 4), (256, 6), (512, 3)]:
        for b in range(blocks):
            shapes += [(planes, inplanes, 1, 1), (planes,), (planes,)]
            shapes += [(planes, planes, 3, 3), (planes,), (planes,)]
            shapes += [(planes * 4, planes, 1, 1), (planes * 4,), (planes * 4,)]
            if b == 0:
                shapes += [(planes * 4, inplanes, 1, 1), (planes * 4,), (planes * 4,)]
            inplanes = planes * 4
    return shapes + [(num_classes, 2048), (num_classes,)]


def numel(shapes: list[Shape]) -> int:
    return sum(torch.Size(s).numel() for s in shapes)


# -- timing ------------------------------------------------------------------------------------------------


def time_ms(fn, reps: int, warmup: int = 3) -> float:
    if DEVICE == "cpu":
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


# -- the SAMs compared --------------------------------------------------------------------------------------


def make_params(shapes, dtype, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, device=DEVICE, generator=g).mul_(0.02).to(dtype))
        p.grad = torch.randn(s, device=DEVICE, generator=g).mul_(1e-3).to(dtype)
        params.append(p)
    return params


def base_of(name: str, params, foreach: bool | None):
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, foreach=foreach)
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1, foreach=foreach)


class PerTensorSAM:
    """davda54/sam's hot path."""

    def __init__(self, params, base: str, rho: float = 0.05) -> None:
        self.params, self.rho = params, rho
        self.base = base_of(base, params, foreach=False)
        self.old: dict = {}

    @torch.no_grad()
    def step(self) -> None:
        norm = torch.norm(torch.stack([p.grad.norm(p=2) for p in self.params]), p=2)
        scale = self.rho / (norm + 1e-12)
        for p in self.params:
            self.old[p] = p.data.clone()
            e_w = 1.0 * p.grad * scale.to(p)
            p.add_(e_w)
        for p in self.params:  # the second gradient would be taken here
            p.data = self.old[p]
        self.base.step()


class ForeachSAM:
    """torch._foreach ops, the scale kept on the device."""

    def __init__(self, params, base: str, rho: float = 0.05) -> None:
        self.params, self.rho = params, rho
        self.grads = [p.grad for p in params]
        self.backups = [torch.empty_like(p) for p in params]
        self.base = base_of(base, params, foreach=True)

    @torch.no_grad()
    def step(self) -> None:
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(self.grads)))
        scale = self.rho / (norm + 1e-12)
        torch._foreach_copy_(self.backups, self.params)
        torch._foreach_add_(self.params, torch._foreach_mul(self.grads, scale.to(self.params[0].dtype)))
        torch._foreach_copy_(self.params, self.backups)
        self.base.step()


class SharpnessSAM:
    def __init__(self, params, base: str, rho: float = 0.05) -> None:
        import sharpness

        cls = torch.optim.SGD if base == "sgd" else torch.optim.AdamW
        kw = dict(lr=0.1, momentum=0.9) if base == "sgd" else dict(lr=1e-3, weight_decay=0.1)
        self.opt = sharpness.SAM(params, cls, rho=rho, backend="triton", **kw)
        if [e.name for e in self.opt.engines()] != ["triton"]:
            raise SystemExit(f"expected the Triton engine, got {[e.name for e in self.opt.engines()]}")

    def step(self) -> None:
        self.opt.first_step()
        self.opt.second_step()


def check_no_syncs(sam: SharpnessSAM) -> bool:
    if DEVICE == "cpu":
        return True
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sam.step()
        ok = True
    except RuntimeError as e:
        print("   host sync detected:", e)
        ok = False
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return ok


# -- the kernels alone ----------------------------------------------------------------------------------------


def kernel_table(n: int, dtype, reps: int, copy_gbs: float) -> None:
    from sharpness.backends import triton_kernels as K

    e = torch.tensor([], dtype=dtype).element_size()
    w, g, b, m, v = (torch.randn(n, device=DEVICE).mul_(0.01).to(dtype) for _ in range(5))
    v.abs_()
    norm = torch.tensor(1.0, dtype=torch.float64, device=DEVICE)
    step = torch.ones((), device=DEVICE)
    powers = K.adam_powers(step, 0.9, 0.999)
    cases = [
        ("sum of squares", 1, lambda: K.sum_of_squares(g)),
        ("perturb (+backup)", 4, lambda: K.perturb(w, g, b, norm, 0.05, 1e-12)),
        ("copy", 2, lambda: K.copy(b, w)),
        ("restore+SGD momentum", 5, lambda: K.restore_sgd(w, b, g, m, lr=0.1, momentum=0.9)),
        ("restore+AdamW", 7, lambda: K.restore_adam(w, b, g, m, v, powers=powers, lr=1e-3, beta1=0.9, beta2=0.999,
                                                    eps=1e-8, weight_decay=0.1, decoupled=True)),  # fmt: skip
    ]
    print(f"  {'kernel (flat, one buffer)':<28}{'ms':>9}{'GB/s':>9}{'of copy':>9}")
    for name, passes, fn in cases:
        ms = time_ms(fn, reps)
        gbs = passes * n * e / ms / 1e6
        print(f"  {name:<28}{ms:>9.3f}{gbs:>9.0f}{gbs / copy_gbs:>9.0%}")


def bench(label: str, shapes, dtype, reps: int) -> None:
    n = numel(shapes)
    e = torch.tensor([], dtype=dtype).element_size()
    print(f"\n== {label}: {len(shapes)} tensors, {n:,} parameters, {dtype}")
    src, dst = torch.randn(n, device=DEVICE).to(dtype), torch.empty(n, device=DEVICE, dtype=dtype)
    copy_ms = time_ms(functools.partial(dst.copy_, src), reps)
    copy_gbs = 2 * n * e / copy_ms / 1e6
    del src, dst
    print(f"  copy (floor): {copy_ms:.3f} ms, {copy_gbs:.0f} GB/s")
    kernel_table(n, dtype, reps, copy_gbs)
    for base, passes in [("sgd", 10), ("adamw", 12)]:  # passes of e bytes: 40 and 48 B/param in fp32
        results = {}
        for name, cls in [("per-tensor", PerTensorSAM), ("foreach", ForeachSAM), ("sharpness", SharpnessSAM)]:
            params = make_params(shapes, dtype)
            sam = cls(params, base)
            results[name] = time_ms(sam.step, reps)
            if name == "sharpness":
                syncs_ok = check_no_syncs(sam)
            del sam, params
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
        floor = passes * n * e / copy_gbs / 1e6
        print(f"  full step, {base}: floor {floor:.3f} ms ({passes * e} B/param at copy bandwidth)")
        print(f"  {'method':<14}{'ms':>9}{'GB/s':>9}{'of copy':>9}{'speed-up':>10}")
        for name, ms in results.items():  # speed-up: how much faster sharpness is than the method
            gbs = passes * n * e / ms / 1e6
            print(f"  {name:<14}{ms:>9.3f}{gbs:>9.0f}{gbs / copy_gbs:>9.0%}{ms / results['sharpness']:>9.2f}x")
        print(
            f"  sharpness vs foreach: {results['foreach'] / results['sharpness']:.2f}x faster; "
            f"vs per-tensor: {results['per-tensor'] / results['sharpness']:.2f}x; "
            f"zero host syncs: {'yes' if syncs_ok else 'NO'}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", choices=["gpt2", "resnet50", "all"], default="all")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--dry-run", action="store_true", help="run the script on CPU under TRITON_INTERPRET=1, tiny shapes")
    args = parser.parse_args()
    if args.dry_run:
        global DEVICE
        DEVICE = "cpu"
        os.environ["TRITON_INTERPRET"] = "1"
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
        bench("dry run (GPT-2 layout, d=16)", gpt2_shapes(vocab=50, ctx=8, d=16, layers=2), dtype, 1)
        bench("dry run (ResNet-50 layout)", resnet50_shapes(num_classes=3)[:20], dtype, 1)
        return
    if not torch.cuda.is_available():
        sys.exit("bench_gpu: no CUDA device here; the Triton engine's GPU figures need one (nothing was measured)")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    if args.shapes in ("gpt2", "all"):
        bench("GPT-2 small", gpt2_shapes(), dtype, args.reps)
    if args.shapes in ("resnet50", "all"):
        bench("ResNet-50", resnet50_shapes(), dtype, args.reps)


if __name__ == "__main__":
    main()
