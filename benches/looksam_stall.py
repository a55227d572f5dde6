#!/usr/bin/env python
"""Why LookSAM stalls small convolutional networks, and whether ``variant="relative"`` is safe.

LookSAM (Liu et al., CVPR 2022) takes a SAM step every ``k`` steps and keeps ``g_v``, the part of
SAM's gradient orthogonal to the plain one; in between it steps along ``g + α·(‖g‖/‖g_v‖)·g_v``
(the paper's form) or, with ``variant="relative"``, ``g + α·(‖g‖/‖g_k‖)·g_v`` (``g_k`` the plain
gradient of the last SAM step: ``g_v`` kept at its size relative to the gradient).

Two commands, both on scikit-learn's digits (:func:`sharpness.demo.load_noisy_digits`, clean or
with 40% of the training labels randomised), SGD with momentum 0.9 as the base (``--base adamw``:
AdamW, lr 3e-3, weight decay 0.01), batch 32, a cosine learning-rate schedule:

- ``table``: test accuracy (mean ± std over seeds, and each seed's) of the base optimizer, SAM,
  every-k SAM (k=5), LookSAM in the paper's form (k=5, α=0.7) and in the relative form (k=5,
  α = 0.5, the library's pick, 0.7 and 1) on four models: ``conv1d`` (three Conv1d(k=3)+ReLU
  layers 1→8→16→16 on the 64 features as a signal, max pooling by 4, Linear(224, 10): 3,466
  weights), ``conv1d-gap`` (1→16→32→32, global average pooling, Linear(32, 10): 5,066 weights; a
  slow learner, trained at lr 0.05 for 30 epochs), and the demo's ``mlp`` and ``cnn``
  (:func:`sharpness.demo.build_model`), at the radii of ``RHOS`` (``--rhos`` to choose).
- ``diagnose``: one model and radius, epoch by epoch: test accuracy, the training loss on SAM
  steps and on one-pass steps, the true relative size ``r = ‖g_v‖/‖g_k‖`` at SAM steps (median;
  the paper's form pushes with ``α`` instead, the relative form with ``α·r``), the cosine of
  ``g_v`` with the previous SAM step's, SAM's ``‖Σ g_v‖`` over 5 consecutive steps in units of
  one ``‖g_v‖`` (SAM runs: what LookSAM's reuse stands in for), the cosine of the momentum buffer
  and of the fresh gradient with the reused ``g_v`` (one-pass steps), and the fraction of dead
  ReLU units per layer (zero on all of 512 training examples).

Usage::

    python benches/looksam_stall.py table                      # every model, 3 seeds (~17 min, 1 thread)
    python benches/looksam_stall.py table --models conv1d,mlp  # some of them
    python benches/looksam_stall.py table --base adamw --models conv1d --methods sgd,sam,paper,relative-0.5
    python benches/looksam_stall.py diagnose --model conv1d --rho 0.1
    python benches/looksam_stall.py table --quick              # smoke run: seconds
    python benches/looksam_stall.py diagnose --quick

Findings and figures: ``docs/research/looksam_stall.md``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import sharpness
from sharpness.demo import build_model, load_noisy_digits


@dataclass(frozen=True)
class Setup:
    """A model and how it is trained."""

    build: Callable[[], nn.Module]
    lr: float = 0.02
    epochs: int = 20


def conv1d() -> nn.Module:
    """Three Conv1d(k=3)+ReLU layers 1→8→16→16 on the 64 features as a signal, max pooling by 4:
    3,466 weights."""
    return nn.Sequential(
        nn.Unflatten(1, (1, 64)),
        nn.Conv1d(1, 8, 3), nn.ReLU(), nn.Conv1d(8, 16, 3), nn.ReLU(), nn.Conv1d(16, 16, 3), nn.ReLU(),
        nn.MaxPool1d(4), nn.Flatten(), nn.Linear(16 * 14, 10),
    )


def conv1d_gap() -> nn.Module:
    """Three Conv1d(k=3)+ReLU layers 1→16→32→32, global average pooling: 5,066 weights."""
    return nn.Sequential(
        nn.Unflatten(1, (1, 64)),
        nn.Conv1d(1, 16, 3), nn.ReLU(), nn.Conv1d(16, 32, 3), nn.ReLU(), nn.Conv1d(32, 32, 3), nn.ReLU(),
        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(32, 10),
    )


MODELS: dict[str, Setup] = {
    "conv1d": Setup(conv1d),
    "conv1d-gap": Setup(conv1d_gap, lr=0.05, epochs=30),
    "mlp": Setup(lambda: build_model(64, 10, kind="mlp")),
    "cnn": Setup(lambda: build_model(64, 10, kind="cnn")),
}
#: The radii each model is measured at: the issue's (conv1d 0.05 and 0.1), the demo's 0.3.
RHOS: dict[str, tuple[float, ...]] = {"conv1d": (0.05, 0.1), "conv1d-gap": (0.05,), "mlp": (0.05, 0.3), "cnn": (0.05, 0.3)}
#: name -> (label, constructor keywords); "sgd" is the base optimizer alone.
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "sgd": ("SGD", {}),
    "sam": ("SAM", {}),
    "everyk": ("every-k SAM (k=5)", dict(k=5)),
    "paper": ("LookSAM paper (k=5, α=0.7)", dict(k=5, alpha=0.7)),
    "relative-0.5": ("LookSAM relative (k=5, α=0.5)", dict(k=5, alpha=0.5, variant="relative")),
    "relative-0.7": ("LookSAM relative (k=5, α=0.7)", dict(k=5, alpha=0.7, variant="relative")),
    "relative-1": ("LookSAM relative (k=5, α=1)", dict(k=5, alpha=1.0, variant="relative")),
}
#: The base optimizers: class and keywords (``--base``; the learning rate is the model's for SGD,
#: ``ADAMW_LR`` for AdamW).
BASES: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "sgd": (torch.optim.SGD, dict(momentum=0.9)),
    "adamw": (torch.optim.AdamW, dict(weight_decay=0.01)),
}
ADAMW_LR = 3e-3
#: SAM's g_v summed over this many consecutive steps (LookSAM's k): how far SAM itself pushes along
#: its orthogonal parts in one LookSAM cycle, in units of one ‖g_v‖ (the relative form: 1 + α(k − 1)).
WINDOW = 5


def make_optimizer(method: str, params: Any, rho: float, lr: float, base: str = "sgd") -> torch.optim.Optimizer:
    kwargs = METHODS[method][1]
    cls, base_kwargs = BASES[base]
    if base == "adamw":
        lr = ADAMW_LR
    if method == "sgd":  # the base optimizer alone
        return cls(params, lr=lr, **base_kwargs)
    if method == "sam":
        return sharpness.SAM(params, cls, rho=rho, lr=lr, **base_kwargs)
    if method == "everyk":
        return sharpness.EveryKSAM(params, cls, rho=rho, lr=lr, **base_kwargs, **kwargs)
    return sharpness.LookSAM(params, cls, rho=rho, lr=lr, **base_kwargs, **kwargs)


def flat(tensors: Any) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def cosine(a: Tensor, b: Tensor) -> float:
    denominator = float(a.norm() * b.norm())
    return float(a @ b) / denominator if denominator > 0 else math.nan


class Probe:
    """The diagnostics of one run, gathered step by step (see the module's docstring)."""

    def __init__(self, model: nn.Module, x_probe: Tensor) -> None:
        self.model, self.x_probe = model, x_probe
        self.last_gv: Tensor | None = None
        self.activations: dict[int, Tensor] = {}
        relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
        for i, relu in enumerate(relus):
            relu.register_forward_hook(lambda module, inputs, out, i=i: self.activations.__setitem__(i, out.detach()))
        self.reset()

    def reset(self) -> None:
        self.ratio: list[float] = []  # ‖g_v‖/‖g_k‖ at SAM steps
        self.turnover: list[float] = []  # cos(g_v, the previous SAM step's g_v)
        self.window: list[Tensor] = []  # SAM's g_v of the last steps (k = 1 runs only)
        self.coherent: list[float] = []  # ‖Σ g_v‖/mean ‖g_v‖ over windows of WINDOW consecutive SAM steps
        self.buffer_along_gv: list[float] = []  # cos(momentum buffer, reused g_v) after one-pass steps
        self.gradient_along_gv: list[float] = []  # cos(g, reused g_v) on one-pass steps
        self.loss_sam: list[float] = []
        self.loss_one_pass: list[float] = []

    def dead_fractions(self) -> list[float]:
        """Per ReLU layer, the fraction of units (channel × position) zero on every probe example."""
        with torch.no_grad():
            self.model(self.x_probe)
        return [float((a.reshape(a.shape[0], -1) > 0).sum(0).eq(0).float().mean()) for _, a in sorted(self.activations.items())]


def train(model_name: str, method: str, rho: float, seed: int, label_noise: float, epochs: int | None = None,
          train_limit: int | None = None, on_epoch: Callable[[int, float, Probe], None] | None = None,
          base: str = "sgd") -> float:
    """Trains one model from seed ``seed``; returns its test accuracy. With ``on_epoch``, gathers
    the diagnostics (a :class:`Probe`) and hands them over after each epoch."""
    setup = MODELS[model_name]
    epochs = setup.epochs if epochs is None else epochs
    data = load_noisy_digits(label_noise=label_noise)
    x_train, y_train = data.x_train[:train_limit], data.y_train[:train_limit]
    torch.manual_seed(seed)
    model = setup.build()
    params = list(model.parameters())
    opt = make_optimizer(method, params, rho, setup.lr, base)
    n, batch = len(y_train), 32
    total_steps = epochs * math.ceil(n / batch)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / total_steps)))
    order = torch.Generator().manual_seed(seed)
    probe = Probe(model, x_train[:512]) if on_epoch else None
    if on_epoch and probe:
        on_epoch(-1, math.nan, probe)
    for epoch in range(epochs):
        permutation = torch.randperm(n, generator=order)
        for start in range(0, n, batch):
            index = permutation[start:start + batch]
            x, y = x_train[index], y_train[index]
            gradients: list[tuple[float, Tensor]] = []

            def closure(x: Tensor = x, y: Tensor = y, gradients: list[tuple[float, Tensor]] = gradients) -> Tensor:
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                if probe:
                    gradients.append((float(loss.detach()), flat(p.grad for p in params).clone()))
                return loss

            reused = None
            if probe and isinstance(opt, sharpness.LookSAM) and "looksam_gv" in opt.state[params[0]]:
                reused = flat(opt.state[p]["looksam_gv"] for p in params).clone()
            if method == "sgd":
                closure()
                opt.step()
            else:
                opt.step(closure)
            schedule.step()
            if probe:
                loss, g = gradients[0]
                if len(gradients) == 2:  # a SAM step: g_v from g_k and g_s, as LookSAM computes it
                    g_s = gradients[1][1]
                    g_v = g_s - float(g @ g_s) / float(g @ g) * g
                    probe.ratio.append(float(g_v.norm() / g.norm()))
                    if probe.last_gv is not None:
                        probe.turnover.append(cosine(g_v, probe.last_gv))
                    probe.last_gv = g_v
                    if method == "sam":
                        probe.window.append(g_v)
                        if len(probe.window) == WINDOW:
                            total = torch.stack(probe.window).sum(0).norm()
                            probe.coherent.append(float(total) / statistics.mean(float(v.norm()) for v in probe.window))
                            probe.window = []
                    probe.loss_sam.append(loss)
                else:
                    probe.loss_one_pass.append(loss)
                    if reused is not None and float(reused.norm()) > 0:
                        buffer = "momentum_buffer" if base == "sgd" else "exp_avg"
                        probe.buffer_along_gv.append(cosine(flat(opt.state[p][buffer] for p in params), reused))
                        probe.gradient_along_gv.append(cosine(g, reused))
        if on_epoch and probe:
            on_epoch(epoch, accuracy(model, data.x_test, data.y_test), probe)
            probe.reset()
    return accuracy(model, data.x_test, data.y_test)


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def table(args: argparse.Namespace) -> None:
    models = args.models.split(",")
    methods = args.methods.split(",")
    seeds = range(args.seeds)
    base = "SGD momentum 0.9" if args.base == "sgd" else f"AdamW lr {ADAMW_LR} weight decay 0.01"
    print(f"test accuracy %, mean ± std over seeds {list(seeds)}; {base}, batch 32, cosine schedule")
    labels = [("AdamW" if args.base == "adamw" and m == "sgd" else METHODS[m][0]) for m in methods]
    print("| model | labels | ρ | " + " | ".join(labels) + " |")
    print("|---|---|---|" + "---|" * len(methods))
    for model_name in models:
        for noise in args.noise:
            base_cell: str | None = None
            rhos = args.rhos or RHOS[model_name]
            for rho in rhos[: 1 if args.quick else None]:
                started = time.perf_counter()
                cells = []
                for method in methods:
                    if method == "sgd" and base_cell is not None:
                        cells.append(base_cell)  # the base optimizer does not depend on ρ
                        continue
                    runs = [train(model_name, method, rho, seed, noise, args.epochs, args.train_limit, base=args.base)
                            for seed in seeds]
                    cells.append(mean_std(runs) + " (" + " ".join(f"{100 * r:.0f}" for r in runs) + ")")
                    if method == "sgd":
                        base_cell = cells[-1]
                labels = "clean" if noise == 0 else f"{noise:.0%} noise"
                row = f"| {model_name} | {labels} | {rho} | " + " | ".join(cells) + " |"
                print(row + f"  <!-- {time.perf_counter() - started:.0f} s -->", flush=True)


def diagnose(args: argparse.Namespace) -> None:
    methods = args.methods.split(",")
    for method in methods:
        rho = args.rho
        print(f"\n== {args.model}, {METHODS[method][0]}, ρ={rho}, {args.label_noise:.0%} label noise, seed {args.seed}")
        print("epoch  test%  loss@SAM loss@1pass  ‖g_v‖/‖g_k‖  cos(g_v,prev)  ‖Σ5 g_v‖  "
              "cos(buf,g_v) cos(g,g_v)  dead ReLUs per layer")

        def report(epoch: int, acc: float, probe: Probe) -> None:
            dead = " ".join(f"{d:.2f}" for d in probe.dead_fractions())
            if epoch < 0:
                print(f"init   {'':>5}  {'':>8} {'':>9}  {'':>11}  {'':>13}  {'':>8}  {'':>12} {'':>10}  {dead}")
                return

            def avg(v: list[float]) -> float:
                return statistics.mean(v) if v else math.nan

            ratio = statistics.median(probe.ratio) if probe.ratio else math.nan
            print(f"{epoch:5d}  {100 * acc:5.1f}  {avg(probe.loss_sam):8.3f} {avg(probe.loss_one_pass):9.3f}  {ratio:11.3f}  "
                  f"{avg(probe.turnover):13.2f}  {avg(probe.coherent):8.2f}  "
                  f"{avg(probe.buffer_along_gv):12.2f} {avg(probe.gradient_along_gv):+10.2f}  {dead}", flush=True)

        train(args.model, method, rho, args.seed, args.label_noise, args.epochs, args.train_limit, on_epoch=report,
              base=args.base)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("table", help="accuracy of every method on every model")
    t.add_argument("--models", default=",".join(MODELS))
    t.add_argument("--methods", default=",".join(METHODS))
    t.add_argument("--seeds", type=int, default=3)
    t.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.4], help="label-noise fractions (default 0 0.4)")
    t.add_argument("--rhos", type=float, nargs="+", default=None, help="radii (default: each model's, RHOS)")
    d = sub.add_parser("diagnose", help="the stall, epoch by epoch")
    d.add_argument("--model", default="conv1d", choices=list(MODELS))
    d.add_argument("--rho", type=float, default=0.1)
    d.add_argument("--methods", default="paper,relative-1,everyk,sam")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--label-noise", type=float, default=0.0)
    for p in (t, d):
        p.add_argument("--epochs", type=int, default=None, help="default: the model's (20; 30 for conv1d-gap)")
        p.add_argument("--train-limit", type=int, default=None, help="train on the first N examples only")
        p.add_argument("--base", default="sgd", choices=list(BASES), help="the base optimizer (default sgd)")
        p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 1 epoch, 256 examples, one model")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        args.epochs, args.train_limit = 1, 256
        if args.command == "table":
            args.seeds, args.noise, args.models = 1, [0.0], "conv1d"
    (table if args.command == "table" else diagnose)(args)


if __name__ == "__main__":
    main()
