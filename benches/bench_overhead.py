#!/usr/bin/env python
"""The per-step Python cost of ``sharpness.SAM`` where the arithmetic is negligible.

A model of many tiny tensors (``--tensors`` Linear(8, 8) layers' weights and biases), SGD with
momentum on the Rust engine: ``first_step()`` + ``second_step()`` with the gradients written in
place before each half (as a backward would), timed over ``--steps`` steps per repetition; prints the
median over ``--reps`` repetitions in microseconds per step. What it shows is the fronts' and the
method layer's own work per step (hooks, phases, engine dispatch), which must stay a constant.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import sharpness


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=10, help="Linear(8, 8) layers (2 tensors each; default 10)")
    parser.add_argument("--steps", type=int, default=200, help="SAM steps per repetition (default 200)")
    parser.add_argument("--reps", type=int, default=30, help="repetitions (default 30)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(args.layers)])
    opt = sharpness.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.01, momentum=0.9, backend="rust")
    grads = [torch.randn_like(p) for p in model.parameters()]
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    opt.zero_grad(set_to_none=False)
    per_step = []
    for _ in range(args.reps):
        start = time.perf_counter()
        for _ in range(args.steps):
            for p, g in zip(model.parameters(), grads):
                p.grad.copy_(g)
            opt.first_step()
            for p, g in zip(model.parameters(), grads):
                p.grad.copy_(g)
            opt.second_step()
        per_step.append((time.perf_counter() - start) / args.steps * 1e6)
    tensors = 2 * args.layers
    print(f"{tensors} tensors: {statistics.median(per_step):.1f} µs per SAM step (median of {args.reps} x {args.steps} steps)")


if __name__ == "__main__":
    main()
