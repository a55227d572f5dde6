#!/usr/bin/env python
"""Soak test: many SAM steps in one process, watching memory.

``sharpness.SAM`` around ``torch.optim.SGD`` (momentum 0.9) trains a small MLP on random data with
the closure API for ``--steps`` steps (default 10,000). The resident set size (RSS: psutil if it is
installed, else ``/proc/self/statm``) and the number of objects the garbage collector tracks are
sampled every ``--every`` steps (default 100). Reported:

- RSS after the warm-up (the first 10% of the steps, at least 200) against RSS at the end, and the
  least-squares slope of RSS over the samples after the warm-up (KiB per 1,000 steps): a leak of
  even a few bytes a step shows there. The run fails (exit status 1) when RSS grows by more than
  ``--max-growth-mib`` (default 4 MiB) after the warm-up, or the tracked objects grow by more than
  ``--max-object-growth`` (default 1,000), or a weight is not finite at the end.
- The optimizer's persistent memory against one copy of the parameters, two ways:

  * tensor bytes, from ``SAM.memory_bytes()``: the backup (SAM's own extra copy, for exact
    restoration), the base optimizer's state (SGD's momentum), and the flat buffers (weights,
    gradients, state as contiguous tensors; they replace the parameters' own storage);
  * RSS, in a fresh subprocess per optimizer with a larger MLP (``--probe-width``, 16 MiB of
    float32 parameters by default): RSS after building the model and one backward (weights +
    gradients), then after 3 steps, for ``sharpness.SAM(SGD)`` and for plain ``torch.optim.SGD``
    (its momentum only). The difference of the two deltas is SAM's own cost.

Usage::

    python benches/soak.py                  # 10,000 steps and the memory probes
    python benches/soak.py --quick          # 1,000 steps, smaller probes (CI smoke run, < 30 s)
    python benches/soak.py --steps 50000 --every 500 --json soak.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

import torch
from torch import nn

import sharpness

MIB = 1024 * 1024


def rss_bytes() -> int:
    """Resident set size of this process."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_source() -> str:
    try:
        import psutil  # noqa: F401

        return "psutil"
    except ImportError:
        return "/proc/self/statm"


def mlp(width: int, depth: int, d_in: int = 64, classes: int = 10, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    d = d_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    layers.append(nn.Linear(d, classes))
    return nn.Sequential(*layers)


def param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def slope_per_1000(xs: list[int], ys: list[int]) -> float:
    """Least-squares slope of ys over xs, per 1,000 units of x."""
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    return 1000.0 * sxy / sxx if sxx else 0.0


# ------------------------------------------------------------------------------------------ soak


def soak(args: argparse.Namespace) -> dict:
    model = mlp(args.width, args.depth)
    gen = torch.Generator().manual_seed(1)
    # A fixed pool of batches, cycled: the data allocates nothing after the start.
    batches = [
        (torch.randn(args.batch, 64, generator=gen), torch.randint(0, 10, (args.batch,), generator=gen)) for _ in range(16)
    ]
    opt = sharpness.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def closure_for(x, y):
        def closure():
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss

        return closure

    warmup = max(200, args.steps // 10)
    warmup -= warmup % args.every
    samples: list[tuple[int, int, int]] = []  # (step, rss, gc-tracked objects)
    start = time.perf_counter()
    first_loss = last_loss = float("nan")
    for step in range(1, args.steps + 1):
        x, y = batches[step % len(batches)]
        loss = opt.step(closure_for(x, y))
        if step == 1:
            first_loss = float(loss.detach())
        if step % args.every == 0:
            last_loss = float(loss.detach())
            samples.append((step, rss_bytes(), len(gc.get_objects())))
    elapsed = time.perf_counter() - start

    after = [s for s in samples if s[0] >= warmup]
    if not after:
        raise SystemExit("--steps too small for the warm-up: no sample after it")
    rss_warm, rss_end = after[0][1], after[-1][1]
    objects_warm, objects_end = after[0][2], after[-1][2]
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    mem = opt.memory_bytes()
    pbytes = param_bytes(model)
    return {
        "steps": args.steps,
        "every": args.every,
        "warmup_steps": warmup,
        "params": sum(p.numel() for p in model.parameters()),
        "param_bytes": pbytes,
        "seconds": elapsed,
        "steps_per_second": args.steps / elapsed,
        "loss_first": first_loss,
        "loss_last": last_loss,
        "weights_finite": finite,
        "rss_source": rss_source(),
        "rss_after_warmup": rss_warm,
        "rss_end": rss_end,
        "rss_growth": rss_end - rss_warm,
        "rss_max_after_warmup": max(s[1] for s in after),
        "rss_slope_bytes_per_1000_steps": slope_per_1000([s[0] for s in after], [s[1] for s in after]),
        "gc_objects_after_warmup": objects_warm,
        "gc_objects_end": objects_end,
        # Less the sample tuples this loop itself appended after the warm-up sample.
        "gc_objects_growth": objects_end - objects_warm - (len(after) - 1),
        "memory_bytes": mem,
        "stats": {k: int(v) for k, v in opt.stats.items()},
        "samples": samples,
    }


# ---------------------------------------------------------------------------------- memory probe


def probe(kind: str, width: int, depth: int) -> dict:
    """Runs in a fresh process: RSS with the model's weights and gradients, then after 3 steps."""
    torch.set_num_threads(1)
    model = mlp(width, depth, d_in=width)
    x, y = torch.randn(8, width), torch.randint(0, 10, (8,))
    loss_fn = nn.CrossEntropyLoss()
    # Two passes first: torch's lazy initialisation (kernels, thread pools, allocator caches) is
    # then paid before the first measurement, and gradients exist as before any optimizer's step.
    for _ in range(2):
        model.zero_grad(set_to_none=False)
        loss_fn(model(x), y).backward()
    # Both optimizers step once on a scalar first: what their first step imports (torch.optim
    # pulls in torch._dynamo, ~150 MiB) is code, not state, and is not counted.
    for make in (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
                 lambda ps: sharpness.SAM(ps, torch.optim.SGD, lr=0.1, momentum=0.9)):
        scalar = torch.zeros(1, requires_grad=True)
        scratch = make([scalar])
        scalar.grad = torch.ones(1)
        if isinstance(scratch, sharpness.SAM):
            scratch.first_step()
            scalar.grad = torch.ones(1)
            scratch.second_step()
        else:
            scratch.step()
        del scratch, scalar
    gc.collect()
    before = rss_bytes()
    if kind == "sam":
        opt = sharpness.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.01, momentum=0.9)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        if kind == "sam":
            opt.step(closure)
        else:
            closure()
            opt.step()
    del closure
    gc.collect()
    after = rss_bytes()
    out = {"kind": kind, "param_bytes": param_bytes(model), "rss_before": before, "rss_after": after}
    if kind == "sam":
        out["memory_bytes"] = opt.memory_bytes()
    return out


def run_probe(kind: str, width: int, depth: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--probe", kind, "--probe-width", str(width), "--probe-depth", str(depth)]
    # Every allocation above 64 KiB gets its own mmap and goes back to the OS when freed (glibc
    # otherwise raises that threshold as big blocks are freed and keeps them on its heap), so RSS
    # follows what is held rather than what the allocator cached.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"memory probe {kind} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=None, help="SAM steps (default 10,000; 1,000 with --quick)")
    ap.add_argument("--quick", action="store_true", help="1,000 steps and smaller memory probes (CI smoke run)")
    ap.add_argument("--every", type=int, default=100, help="sample memory every this many steps (default 100)")
    ap.add_argument("--width", type=int, default=256, help="hidden width of the soak MLP (default 256)")
    ap.add_argument("--depth", type=int, default=2, help="hidden layers of the soak MLP (default 2)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch threads (default: min(2, CPUs))")
    ap.add_argument("--max-growth-mib", type=float, default=4.0, help="RSS growth after the warm-up that fails the run")
    ap.add_argument("--max-object-growth", type=int, default=1000, help="growth of gc-tracked objects that fails the run")
    ap.add_argument(
        "--probe-width", type=int, default=None, help="width of the memory probes' MLP (default 1024; 512 with --quick)"
    )
    ap.add_argument("--probe-depth", type=int, default=4, help="hidden layers of the memory probes' MLP")
    ap.add_argument("--no-probe", action="store_true", help="skip the RSS probes of the optimizer's memory")
    ap.add_argument("--json", help="write the results there")
    ap.add_argument("--probe", choices=["sam", "sgd"], help=argparse.SUPPRESS)  # internal: one probe, in a subprocess
    args = ap.parse_args(argv)
    probe_width = args.probe_width or (512 if args.quick else 1024)
    if args.probe:
        print(json.dumps(probe(args.probe, probe_width, args.probe_depth)))
        return 0
    if args.steps is None:
        args.steps = 1000 if args.quick else 10_000
    if args.steps < 1 or args.every < 1:
        ap.error("--steps and --every must be positive")
    torch.set_num_threads(args.threads)

    print(f"soak: {args.steps} SAM steps (SGD momentum 0.9, closure API), MLP 64-{args.width}x{args.depth}-10, "
          f"batch {args.batch}, {args.threads} torch threads, {sharpness._core.num_threads()} kernel threads; "
          f"RSS from {rss_source()} every {args.every} steps")
    r = soak(args)
    growth_mib = r["rss_growth"] / MIB
    objects_growth = r["gc_objects_growth"]
    print(f"  {r['params']:,} parameters ({r['param_bytes'] / 1024:.1f} KiB), {r['seconds']:.1f} s, "
          f"{r['steps_per_second']:.0f} steps/s, loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}")
    print(f"  RSS after warm-up (step {r['warmup_steps']}): {r['rss_after_warmup'] / MIB:.2f} MiB; "
          f"at the end (step {r['steps']}): {r['rss_end'] / MIB:.2f} MiB; growth {growth_mib:+.3f} MiB; "
          f"max after warm-up {r['rss_max_after_warmup'] / MIB:.2f} MiB; "
          f"slope {r['rss_slope_bytes_per_1000_steps'] / 1024:+.2f} KiB/1000 steps")
    print(f"  gc-tracked objects: {r['gc_objects_after_warmup']:,} after warm-up, {r['gc_objects_end']:,} at the end "
          f"(net of the sample records this loop appends: {objects_growth:+,})")
    m, pb = r["memory_bytes"], r["param_bytes"]
    print(f"  optimizer tensors (SAM.memory_bytes): backup {m['backup'] / 1024:.1f} KiB = {m['backup'] / pb:.2f}x params, "
          f"base state (momentum) {m['base_state'] / 1024:.1f} KiB = {m['base_state'] / pb:.2f}x, "
          f"persistent extra (backup + state) {(m['backup'] + m['base_state']) / pb:.2f}x; "
          f"flat buffers {m['flat_buffers'] / 1024:.1f} KiB = {m['flat_buffers'] / pb:.2f}x "
          f"(weights + grads + state, replacing the parameters' own storage)")
    print(f"  stats: {r['stats']}")

    if not args.no_probe:
        sam, sgd = run_probe("sam", probe_width, args.probe_depth), run_probe("sgd", probe_width, args.probe_depth)
        pb = sam["param_bytes"]
        d_sam, d_sgd = sam["rss_after"] - sam["rss_before"], sgd["rss_after"] - sgd["rss_before"]
        pm = sam["memory_bytes"]
        print(f"  RSS probe (fresh processes, MLP {probe_width}x{args.probe_depth}, params {pb / MIB:.1f} MiB, "
              f"RSS {sam['rss_before'] / MIB:.1f} MiB with weights + grads): after 3 steps "
              f"SAM(SGD) {d_sam / MIB:+.1f} MiB = {d_sam / pb:.2f}x params, plain SGD {d_sgd / MIB:+.1f} MiB = "
              f"{d_sgd / pb:.2f}x; SAM's own extra {(d_sam - d_sgd) / MIB:+.1f} MiB = {(d_sam - d_sgd) / pb:.2f}x "
              f"(tensor bytes: backup {pm['backup'] / pb:.2f}x, momentum {pm['base_state'] / pb:.2f}x)")
        r["probe"] = {"sam": sam, "sgd": sgd, "sam_extra_over_sgd_bytes": d_sam - d_sgd}

    failures = []
    if growth_mib > args.max_growth_mib:
        failures.append(f"RSS grew by {growth_mib:.2f} MiB after the warm-up (limit {args.max_growth_mib} MiB)")
    if objects_growth > args.max_object_growth:
        failures.append(f"gc-tracked objects grew by {objects_growth} (limit {args.max_object_growth})")
    if not r["weights_finite"]:
        failures.append("non-finite weights at the end")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)
    for f in failures:
        print("FAIL:", f)
    print("soak: OK" if not failures else "soak: FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
