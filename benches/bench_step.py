#!/usr/bin/env python
"""One whole SAM step outside forward/backward, against the memory floor and plain-torch SAMs.

What is timed: ``first_step`` (gradient norm, backup, ``w <- w + e``) plus ``second_step``
(restore ``w`` and one SGD step, momentum 0.9), fp32, ``rho=0.05, lr=0.1``. Each is wrapped in its
own ``time.perf_counter()`` pair and the two are added; nothing else is in the timed region.

What is not timed: the simulated backward. Before each half every method gets a fixed random
gradient: methods 1-3 and 4b write it in place, ``p.grad.copy_(g)`` (the tensor stays the same, as
with ``AccumulateGrad`` adding into an existing ``.grad``); method 4 runs a real
``torch.autograd.backward(params, grads)`` into the views that ``opt.zero_grad()`` zeroed, as
training does. Method 5 models the Hugging Face Trainer pattern: ``p.grad = None`` for every
parameter, then a fresh tensor assigned as ``p.grad`` (as backward creates one); the copy of those
gradients back into the flat buffer happens inside the timed steps, which is the point of
measuring it.

Methods (round-robin inside each repetition, the starting method rotating from one repetition to
the next; medians over every timed step):

1. per-tensor SAM: the ``sam.py`` most SAM code copies (davda54/sam), verbatim in its hot path:
   ``torch.norm(torch.stack(per-tensor norms))``, ``old_p = p.data.clone()``,
   ``e_w = 1.0 * p.grad * scale``, ``p.add_(e_w)``, ``p.data = old_p``, then
   ``torch.optim.SGD(foreach=False)``.
2. foreach SAM: ``torch._foreach_norm``, ``_foreach_copy_`` into preallocated backups,
   ``_foreach_add_(params, grads, alpha=scale)``, ``_foreach_copy_`` back, ``SGD(foreach=True)``.
3. flat SAM over torch's fused SGD: params and grads are views of one flat buffer; norm, backup,
   perturb and restore are single torch ops on it; ``SGD([flat], fused=True)``.
4. ``sharpness.SAM(params, torch.optim.SGD, ...)``, gradients from autograd into the views kept
   by ``opt.zero_grad()`` (the fast path; the run fails unless ``stats["regathered_grads"] == 0``).
4b. the same with ``opt.zero_grad(set_to_none=False)`` and gradients written in place.
5. ``sharpness.SAM`` with ``p.grad = None`` and fresh gradient tensors (pays a copy back into the
   flat buffer each half).
6. the floor: ``dst.copy_(src)`` over as many fp32 elements, timed in the same round-robin. Its
   bandwidth counts 8 B/element (read + write). An exact SAM+SGD-momentum step must move 40 B a
   parameter (norm reads g: 4; perturb reads w, g, writes backup, w: 16; fused restore + step
   reads backup, g, buf, writes w, buf: 20), so ``floor = 40 B · n / copy bandwidth``. A copy's
   stores also cost a read for ownership that is not counted, so kernels that read more than they
   write can come in under this floor (a ratio below 1 is not an error).

Before timing, every method takes 3 steps from the same weights on the same gradients and must agree
(perturbed weights and final weights to 1e-5, relative to the largest weight) so the benchmark
compares like with like.

Usage::

    python benches/bench_step.py                 # both shape sets, full size
    python benches/bench_step.py --quick         # CI smoke run (< 60 s; no timing claims)
    python benches/bench_step.py --threads 2 --reps 15 --json step.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shapes import Shape, numel, resnet18_shapes, transformer_shapes  # noqa: E402

RHO, LR, MOMENTUM = 0.05, 0.1, 0.9
FLOOR_BYTES_PER_PARAM = 40
COPY_BYTES_PER_ELEM = 8
TARGET_FLOOR_RATIO = 1.3  # sharpness within 1.3x of the floor on ResNet-18 shapes
TARGET_SPEEDUP = 2.0  # sharpness >= 2x faster than per-tensor SAM on the transformer shapes


#: The methods, as ``--help`` lists them (the module docstring has the details).
METHODS_HELP = """\
methods (--methods): each times SAM's first_step + second_step (SGD, momentum 0.9, fp32)
  1      per-tensor SAM as most SAM code writes it (davda54/sam's sam.py): one norm per
         tensor, cloned backups, SGD(foreach=False); the "vs 1" column compares to it
  2      foreach SAM: torch._foreach_* ops, preallocated backups, SGD(foreach=True)
  3      flat SAM: parameters and gradients are views of one buffer, one torch op per
         stage, SGD(fused=True)
  4      sharpness.SAM, gradients from autograd into the views kept by zero_grad()
         (its fast path)
  4b     sharpness.SAM with zero_grad(set_to_none=False), gradients written in place
  5      sharpness.SAM with p.grad = None and fresh gradient tensors, as the Hugging Face
         Trainer does (a copy back into the flat buffer each half)
  6      the floor, always run: dst.copy_(src) over as many fp32 elements; "x floor" is a
         method's time over the time to move, at that copy speed, the 40 bytes per
         parameter an exact step must move
"""


#: The keys ``--methods`` accepts, in the default order (the classes are bound to them in METHODS).
METHOD_KEYS = ("1", "2", "3", "4", "4b", "5")


def method_list(text: str) -> str:
    """``--methods``: a comma-separated list of distinct keys of :data:`METHOD_KEYS`, returned
    normalised (``"1, 4b"`` -> ``"1,4b"``); anything else is an argparse error naming the keys."""
    keys = [key.strip().lower() for key in text.split(",") if key.strip()]
    unknown = [key for key in keys if key not in METHOD_KEYS]
    if not keys or unknown:
        floor = " (6, the floor, always runs and is not listed)" if "6" in unknown else ""
        raise argparse.ArgumentTypeError(
            f"unknown method {', '.join(unknown) if unknown else repr(text)}{floor}: choose a comma-separated "
            f"list of {', '.join(METHOD_KEYS)} (--help says what each one times)")
    if len(set(keys)) != len(keys):
        raise argparse.ArgumentTypeError(f"a method is listed twice: {text!r}")
    return ",".join(keys)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # `python -m sharpness bench` runs this script: SHARPNESS_BENCH_PROG makes the usage line say so
    ap = argparse.ArgumentParser(prog=os.environ.get("SHARPNESS_BENCH_PROG") or None,
                                 description=__doc__.split("\n\n")[0], epilog=METHODS_HELP,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes, few repetitions (CI smoke run, < 60 s)")
    ap.add_argument("--reps", type=int, default=None, help="round-robin repetitions (default 10; quick: 2)")
    ap.add_argument("--steps", type=int, default=None,
                    help="timed SAM steps per method per repetition (default 3; quick: 2)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per method after the agreement check")
    ap.add_argument("--threads", type=int, default=None, help="torch and rayon threads (default: os.cpu_count())")
    ap.add_argument("--shapes", default="resnet18,transformer", help="comma-separated: resnet18, transformer")
    ap.add_argument("--d-model", type=int, default=None, help="transformer width (default 256; quick: 64)")
    ap.add_argument("--blocks", type=int, default=24, help="transformer blocks (default 24)")
    ap.add_argument("--methods", type=method_list, default=",".join(METHOD_KEYS),
                    help="comma-separated, which methods to time (default: all; listed below); the floor always runs")
    ap.add_argument("--json", type=Path, default=None, help="write the results to this file")
    ap.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the gradients (default 0)")
    args = ap.parse_args(argv)
    args.reps = args.reps or (2 if args.quick else 10)
    args.steps = args.steps or (2 if args.quick else 3)
    if args.quick:
        args.warmup = min(args.warmup, 1)
    args.d_model = args.d_model or (64 if args.quick else 256)
    args.threads = args.threads or os.cpu_count() or 1
    return args


# The thread count must be fixed before `sharpness._core` first runs a kernel (rayon's global pool
# reads RAYON_NUM_THREADS once), so the environment is set before anything imports sharpness.
if __name__ == "__main__":
    ARGS = parse_args()
    if "sharpness" in sys.modules:
        print("warning: sharpness was imported before the thread count was set", file=sys.stderr)
    os.environ["RAYON_NUM_THREADS"] = str(ARGS.threads)
    os.environ["OMP_NUM_THREADS"] = str(ARGS.threads)

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

# -- the methods ---------------------------------------------------------------------------------


class Method:
    """One optimizer over its own copy of the parameters. ``prepare`` and ``write_grads`` are the
    untimed simulated backward; ``first`` and ``second`` are timed."""

    key = ""
    label = ""

    def __init__(self, w0: list[Tensor]) -> None:
        self.params = [torch.nn.Parameter(w.clone()) for w in w0]

    def prepare(self) -> None:
        """What a training loop does before backward (zeroing gradients), if anything."""

    def write_grads(self, grads: list[Tensor]) -> None:
        for p, g in zip(self.params, grads):
            p.grad.copy_(g)

    def first(self) -> None:
        raise NotImplementedError

    def second(self) -> None:
        raise NotImplementedError

    def weights(self) -> Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params])


class ReferenceSAM(torch.optim.Optimizer):
    """davda54/sam's ``sam.py`` (MIT licence), the per-tensor implementation most SAM code copies,
    kept as written (including ``1.0 * p.grad * scale``, which makes two temporaries)."""

    def __init__(self, params, base_optimizer, rho=0.05, adaptive=False, **kwargs):
        defaults = dict(rho=rho, adaptive=adaptive, **kwargs)
        super().__init__(params, defaults)
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        grad_norm = self._grad_norm()
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.data.clone()
                e_w = (torch.pow(p, 2) if group["adaptive"] else 1.0) * p.grad * scale.to(p)
                p.add_(e_w)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad=False):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.data = self.state[p]["old_p"]
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def _grad_norm(self):
        shared_device = self.param_groups[0]["params"][0].device
        return torch.norm(
            torch.stack(
                [
                    ((torch.abs(p) if group["adaptive"] else 1.0) * p.grad).norm(p=2).to(shared_device)
                    for group in self.param_groups
                    for p in group["params"]
                    if p.grad is not None
                ]
            ),
            p=2,
        )


class PerTensorSAM(Method):
    key = "per_tensor"
    label = "1 per-tensor SAM (sam.py)"

    def __init__(self, w0: list[Tensor]) -> None:
        super().__init__(w0)
        for p in self.params:
            p.grad = torch.zeros_like(p)
        self.opt = ReferenceSAM(self.params, torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM, foreach=False)

    def first(self) -> None:
        self.opt.first_step()

    def second(self) -> None:
        self.opt.second_step()


class ForeachSAM(Method):
    key = "foreach"
    label = "2 foreach SAM"

    def __init__(self, w0: list[Tensor]) -> None:
        super().__init__(w0)
        for p in self.params:
            p.grad = torch.zeros_like(p)
        self.backups = [torch.empty_like(p) for p in self.params]
        self.base = torch.optim.SGD(self.params, lr=LR, momentum=MOMENTUM, foreach=True)

    @torch.no_grad()
    def first(self) -> None:
        grads = [p.grad for p in self.params]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        scale = RHO / (norm.item() + 1e-12)
        torch._foreach_copy_(self.backups, self.params)
        torch._foreach_add_(self.params, grads, alpha=scale)

    @torch.no_grad()
    def second(self) -> None:
        torch._foreach_copy_(self.params, self.backups)
        self.base.step()


class FlatFusedSAM(Method):
    key = "flat_fused"
    label = "3 flat SAM + SGD(fused=True)"

    def __init__(self, w0: list[Tensor]) -> None:
        super().__init__(w0)
        self.flat = torch.nn.Parameter(torch.cat([w.reshape(-1) for w in w0]))
        self.flat.grad = torch.zeros_like(self.flat)
        self.backup = torch.empty_like(self.flat)
        lo = 0
        for p in self.params:
            hi = lo + p.numel()
            p.data = self.flat.data[lo:hi].view(p.shape)
            p.grad = self.flat.grad[lo:hi].view(p.shape)
            lo = hi
        self.base = torch.optim.SGD([self.flat], lr=LR, momentum=MOMENTUM, fused=True)

    @torch.no_grad()
    def first(self) -> None:
        w, g = self.flat, self.flat.grad
        scale = RHO / (torch.linalg.vector_norm(g).item() + 1e-12)
        self.backup.copy_(w)
        w.add_(g, alpha=scale)

    @torch.no_grad()
    def second(self) -> None:
        self.flat.copy_(self.backup)
        self.base.step()


class SharpnessSAM(Method):
    key = "sharpness"
    label = "4 sharpness.SAM"

    def __init__(self, w0: list[Tensor]) -> None:
        import sharpness

        super().__init__(w0)
        self.opt = sharpness.SAM(self.params, torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM)
        self.opt.zero_grad()  # builds the flat buffers: every p.grad is now a view

    def prepare(self) -> None:
        self.opt.zero_grad()

    def write_grads(self, grads: list[Tensor]) -> None:
        # AccumulateGrad adds into the zeroed gradient views in place (0 + g == g exactly) and fires
        # the post-accumulate-grad hooks, as a real backward does.
        torch.autograd.backward(self.params, grads)

    def first(self) -> None:
        self.opt.first_step()

    def second(self) -> None:
        self.opt.second_step()


class SharpnessInPlaceSAM(SharpnessSAM):
    key = "sharpness_in_place"
    label = "4b sharpness.SAM, in-place write"

    def prepare(self) -> None:
        # Gradients that exist stay gradients (torch's semantics of set_to_none=False), so code
        # that writes them in place, e.g. a custom all-reduce, is served without a scan.
        self.opt.zero_grad(set_to_none=False)

    def write_grads(self, grads: list[Tensor]) -> None:
        for p, g in zip(self.params, grads):
            p.grad.copy_(g)


class SharpnessHFSAM(SharpnessSAM):
    key = "sharpness_grad_none"
    label = "5 sharpness.SAM, grad=None"

    def prepare(self) -> None:
        for p in self.params:  # model.zero_grad(): set_to_none=True
            p.grad = None

    def write_grads(self, grads: list[Tensor]) -> None:
        for p, g in zip(self.params, grads):  # backward creates a fresh gradient tensor
            p.grad = g.clone()


METHODS = {
    "1": PerTensorSAM,
    "2": ForeachSAM,
    "3": FlatFusedSAM,
    "4": SharpnessSAM,
    "4b": SharpnessInPlaceSAM,
    "5": SharpnessHFSAM,
}


class CopyFloor:
    key = "copy"
    label = "6 floor: dst.copy_(src)"

    def __init__(self, n: int) -> None:
        self.src = torch.randn(n)
        self.dst = torch.empty(n)

    def time_once(self) -> float:
        t0 = time.perf_counter()
        self.dst.copy_(self.src)
        return time.perf_counter() - t0


# -- running -------------------------------------------------------------------------------------


def sam_step(m: Method, g1: list[Tensor], g2: list[Tensor]) -> tuple[float, float]:
    """One SAM step; returns the seconds spent in (first_step, second_step)."""
    m.prepare()
    m.write_grads(g1)
    t0 = time.perf_counter()
    m.first()
    t1 = time.perf_counter()
    m.prepare()
    m.write_grads(g2)
    t2 = time.perf_counter()
    m.second()
    t3 = time.perf_counter()
    return t1 - t0, t3 - t2


def check_agreement(
    methods: list[Method], g1: list[Tensor], g2: list[Tensor], steps: int = 3
) -> dict[str, dict[str, float]]:
    """Runs ``steps`` SAM steps on every method and compares the perturbed weights (after the
    last ``first``) and the final weights with method 1's (or the first method's)."""
    perturbed: dict[str, Tensor] = {}
    final: dict[str, Tensor] = {}
    for m in methods:
        for s in range(steps):
            m.prepare()
            m.write_grads(g1)
            m.first()
            if s == steps - 1:
                perturbed[m.key] = m.weights()
            m.prepare()
            m.write_grads(g2)
            m.second()
        final[m.key] = m.weights()
    ref = methods[0].key
    report: dict[str, dict[str, float]] = {}
    bad = []
    for m in methods[1:]:
        row = {}
        for what, got in (("perturbed", perturbed), ("final", final)):
            err = float((got[m.key] - got[ref]).abs().max() / got[ref].abs().max())
            row[what] = err
            if not err <= 1e-5:
                bad.append(f"{m.label}: {what} weights differ from {methods[0].label} by {err:.2e} (relative)")
        report[m.key] = row
    if bad:
        raise SystemExit("methods disagree, the comparison would be meaningless:\n  " + "\n  ".join(bad))
    return report


def run_shape_set(name: str, shapes: list[Shape], args: argparse.Namespace) -> dict:
    n, count = numel(shapes), len(shapes)
    gen = torch.Generator().manual_seed(args.seed)
    w0 = [torch.randn(s, generator=gen) * 0.05 for s in shapes]
    g1 = [torch.randn(s, generator=gen) * 1e-2 for s in shapes]
    g2 = [torch.randn(s, generator=gen) * 1e-2 for s in shapes]
    methods = [METHODS[k](w0) for k in args.methods.split(",")]
    floor = CopyFloor(n)

    agreement = check_agreement(methods, g1, g2)
    for m in methods:
        for _ in range(args.warmup):
            sam_step(m, g1, g2)
    for _ in range(max(args.warmup, 1) * 3):
        floor.time_once()
    ours = [m for m in methods if isinstance(m, SharpnessSAM)]
    for m in ours:
        m.opt.stats.clear()

    samples: dict[str, list[tuple[float, float]]] = {m.key: [] for m in methods}
    copies: list[float] = []
    runners = [*methods, floor]
    gc.collect()
    gc.disable()
    try:
        for rep in range(args.reps):
            k = rep % len(runners)
            for r in runners[k:] + runners[:k]:
                for _ in range(args.steps):
                    if r is floor:
                        copies.append(floor.time_once())
                    else:
                        samples[r.key].append(sam_step(r, g1, g2))
            gc.collect()
    finally:
        gc.enable()

    timed_steps = args.reps * args.steps
    stats = {m.key: dict(m.opt.stats) for m in ours}
    for m in ours:
        st = m.opt.stats
        if st["fused_steps"] != timed_steps:
            raise SystemExit(f"{m.label} did not take its fused step every time: stats={dict(st)}")
        if not isinstance(m, SharpnessHFSAM) and st["regathered_grads"] != 0:
            raise SystemExit(f"{m.label} left its fast path: stats={dict(st)}")

    copy_s = statistics.median(copies)
    copy_gbs = COPY_BYTES_PER_ELEM * n / copy_s / 1e9
    floor_s = FLOOR_BYTES_PER_PARAM * n / (copy_gbs * 1e9)
    rows = {}
    for m in methods:
        tot = [a + b for a, b in samples[m.key]]
        rows[m.key] = dict(
            label=m.label,
            median_ms=statistics.median(tot) * 1e3,
            first_ms=statistics.median(a for a, _ in samples[m.key]) * 1e3,
            second_ms=statistics.median(b for _, b in samples[m.key]) * 1e3,
            min_ms=min(tot) * 1e3,
            samples_ms=[t * 1e3 for t in tot],
        )
    base = rows.get("sharpness")
    per_tensor = rows.get("per_tensor")
    for row in rows.values():
        t = row["median_ms"] / 1e3
        row["ns_per_param"] = t * 1e9 / n
        row["x_floor"] = t / floor_s
        row["x_sharpness"] = row["median_ms"] / base["median_ms"] if base else None
        row["speedup_vs_per_tensor"] = per_tensor["median_ms"] / row["median_ms"] if per_tensor else None
    return dict(
        name=name,
        tensors=count,
        params=n,
        copy=dict(median_ms=copy_s * 1e3, gb_per_s=copy_gbs, samples_ms=[c * 1e3 for c in copies]),
        floor_ms=floor_s * 1e3,
        methods=rows,
        agreement=agreement,
        stats=stats,
        timed_steps_per_method=timed_steps,
    )


def print_result(res: dict, args: argparse.Namespace) -> None:
    n = res["params"]
    print(f"\n== {res['name']}: {res['tensors']} tensors, {n:,} fp32 params; threads={args.threads}; "
          f"{args.reps} reps x {args.steps} steps per method ==")
    c = res["copy"]
    print(f"copy: {c['median_ms']:.3f} ms = {c['gb_per_s']:.1f} GB/s (8 B/elem); "
          f"floor = {FLOOR_BYTES_PER_PARAM} B x n / copy bw = {res['floor_ms']:.3f} ms "
          f"({res['floor_ms'] * 1e6 / n:.3f} ns/param)")
    head = (f"{'method':<32} {'median ms':>10} {'first':>8} {'second':>8} {'min ms':>8} {'ns/param':>9} "
            f"{'x floor':>8} {'x sharp':>8} {'vs 1':>7}")
    print(head)
    print("-" * len(head))
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for row in res["methods"].values():
        print(f"{row['label']:<32} {row['median_ms']:>10.3f} {row['first_ms']:>8.3f} {row['second_ms']:>8.3f} "
              f"{row['min_ms']:>8.3f} {row['ns_per_param']:>9.3f} {row['x_floor']:>8.2f} "
              f"{fmt(row['x_sharpness'], '8.2f')} {fmt(row['speedup_vs_per_tensor'], '6.2f')}x")
    floor_row = f"{'6 floor (40 B/param at copy bw)':<32} {res['floor_ms']:>10.3f} {'':>8} {'':>8} {'':>8} " \
                f"{res['floor_ms'] * 1e6 / n:>9.3f} {1.0:>8.2f}"
    print(floor_row)
    agree = ", ".join(f"{k}: {v['perturbed']:.1e}/{v['final']:.1e}" for k, v in res["agreement"].items())
    ref = next(iter(res["methods"].values()))["label"]
    print(f"agreement with {ref} after 3 steps (perturbed/final weights, max rel diff): {agree}")
    hf = res["stats"].get("sharpness_grad_none")
    if hf:
        per = hf.get("regathered_grads", 0) / max(hf.get("steps", 1), 1)
        print(f"method 5 regathered {per:.0f} gradients per step (2 halves x {res['tensors']} tensors)")
    rows = res["methods"]
    note = " (quick run: reduced sizes, not a measurement)" if args.quick else ""
    for key in ("sharpness", "sharpness_in_place"):
        if key not in rows:
            continue
        s, who = rows[key], rows[key]["label"]
        if res["name"].startswith("resnet18"):
            ok = "met" if s["x_floor"] <= TARGET_FLOOR_RATIO else "NOT met"
            print(f"target: {who} within {TARGET_FLOOR_RATIO}x of the floor: {s['x_floor']:.2f}x [{ok}]{note}")
        if res["name"].startswith("transformer") and s["speedup_vs_per_tensor"] is not None:
            ok = "met" if s["speedup_vs_per_tensor"] >= TARGET_SPEEDUP else "NOT met"
            print(f"target: {who} >= {TARGET_SPEEDUP}x faster than per-tensor SAM: "
                  f"{s['speedup_vs_per_tensor']:.2f}x [{ok}]{note}")


def main(args: argparse.Namespace) -> None:
    import sharpness
    from sharpness import _core

    torch.set_num_threads(args.threads)
    if _core.num_threads() != args.threads:
        print(f"warning: rayon runs {_core.num_threads()} threads, torch {args.threads}", file=sys.stderr)
    sets = []
    for name in args.shapes.split(","):
        if name == "resnet18":
            width = 16 if args.quick else 64
            sets.append((f"resnet18{'' if width == 64 else f'(width {width})'}", resnet18_shapes(width)))
        elif name == "transformer":
            name = f"transformer(d={args.d_model}, {args.blocks} blocks)"
            sets.append((name, transformer_shapes(args.d_model, args.blocks)))
        else:
            raise SystemExit(f"unknown shape set {name!r}")
    print(f"sharpness {sharpness.__version__}, torch {torch.__version__}, python {platform.python_version()}, "
          f"{os.cpu_count()} cpus ({platform.processor() or platform.machine()}); "
          f"torch threads {torch.get_num_threads()}, rayon threads {_core.num_threads()}")
    print("timed: first_step + second_step only (gradient writes and zero_grad are outside the timed region)")
    t_start = time.perf_counter()
    results = []
    for name, shapes in sets:
        res = run_shape_set(name, shapes, args)
        print_result(res, args)
        results.append(res)
        gc.collect()
    print(f"\n({time.perf_counter() - t_start:.1f} s)")
    if args.json:
        meta = dict(
            sharpness=sharpness.__version__,
            torch=torch.__version__,
            python=platform.python_version(),
            cpus=os.cpu_count(),
            machine=platform.machine(),
            torch_threads=torch.get_num_threads(),
            rayon_threads=_core.num_threads(),
            args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        )
        args.json.write_text(json.dumps(dict(meta=meta, results=results), indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main(ARGS)
