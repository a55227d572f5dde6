#!/usr/bin/env python
"""SAM's two prices beyond the demo: accuracy and time per epoch of the efficient SAM variants, and
the radius finder against a full sweep, on four model/data pairs (issue 17, "Measured").

**Pairs** (:mod:`_zoo`, all offline): the demo's MLP and CNN on scikit-learn's digits, a residual
CNN with BatchNorm on synthetic 3×16×16 images, a 2-layer Transformer on a synthetic sequence task.
**Bases**: SGD with momentum 0.9 and AdamW, a learning rate per pair (see ``_zoo.PAIRS``), cosine
schedule per step. **Label noise**: 0 and 0.4 of the training labels randomised (test labels clean).

**Methods** (keys of :data:`METHODS`), all through ``opt.step(closure)`` around the same base:
``base``; ``sam``; ``looksam`` (the paper's k=5, α=0.7); ``looksam_pick`` (the library's efficient
pick, :func:`looksam_pick`); ``everyk`` (a SAM step every 5: LookSAM's cost); ``aesam``
(``total_steps`` = the run); ``msam`` (Momentum-SAM, its own ρ); ``esam`` (β=0.6, γ=0.5, ρ·0.6 as
in :func:`sharpness.demo.make_optimizer`; per-sample closure). With BatchNorm, only the first
closure call of a step (at ``w``, or at ``w̃`` for Momentum-SAM) updates the running statistics:
the later ones, at the perturbed point, run inside :func:`sharpness.frozen_running_stats`.

**Pairing and timing.** Every method of a seed starts from the same initial weights (built after
``torch.manual_seed(seed)``) and sees the same batches in the same order (a generator seeded with
``seed``). The methods of a seed run one after another in one process, in an order rotated by the
seed (interleaved: machine noise spreads over all methods rather than hitting one). Time per epoch
is training only (no evaluation), the median over the epochs of a run; the relative time of a
method is the median over seeds of its ratio to the base run of the same seed. Accuracy: mean ±
std over seeds, and the paired difference to the base (mean ± std of the per-seed differences).

**Stages.**

1. ``--sweep``: SAM over :data:`SAM_GRID` and Momentum-SAM over :data:`MSAM_GRID`, both noise
   levels, on the *sweep seeds* (1000, 1001, ...: not the main stage's, so the main stage's
   accuracies are not the ones the radius was selected on). The radius of a (pair, base) is the one
   with the best test accuracy averaged over both noise levels and the sweep seeds (one ρ per pair
   and base for the whole SAM family, one for Momentum-SAM); written to ``radii.json``. In the same
   stage, :func:`sharpness.find_rho` runs once per (pair, base, noise, method) on the first sweep
   seed's initial weights and one epoch of its batches, with a budget of 20% of one training run
   (at least what the finder needs, 8 steps per candidate); the radius it picks is then trained on
   the sweep seeds (looked up when it is on the sweep's grid). Reported: the finder's pick, the
   sweep's best ρ at that noise, the test accuracy at each, the gap, and the finder's cost in
   seconds and steps as a fraction of one training run of that method.
2. main (always, unless ``--sweep-only``): every method, both bases and noise levels, seeds 0, 1,
   2, ..., at the radii of ``--radii`` or ``OUT/radii.json`` (else the defaults in ``_zoo``).

**Output** (``--out DIR``): ``runs.csv``/``runs.json`` (every training run of both stages),
``radii.json``, ``finder.json``, ``tables.md`` (the tables printed at the end, with a header of
versions, threads and the command), ``summary.json`` (the tables' rows); the sweep also writes
``sweep.md`` and ``sweep_runs.json``, which a later main stage reading that folder's
``radii.json`` takes into its own report.

**Budget** (2-core machine, ``--jobs 2``, one torch thread per process), from timed single runs
(0.1.0, 2026-12-05; SGD base, 40% noise, the machine shared, load ≈ 3): one base run takes 1.1 s
(digits_mlp), 1.0 s (digits_cnn), 1.9 s (resnet_images), 0.7 s (transformer_seq); all eight methods
of one seed 17, 17, 21 and 10 s (SAM 1.8–2.2× the base, LookSAM and every-k 1.2–1.5×, AE-SAM 1.5–1.8×,
Momentum-SAM 1.0–1.3×, ESAM 1.4–2.5×), AdamW up to 1.7× that when the machine is busy. So:

- main stage: 4 pairs × 2 bases × 2 noise levels × 3 seeds = 48 tasks of ≈ 16 s: ≈ 850 CPU-s;
- sweep: 48 tasks of SAM × 6 radii + Momentum-SAM × 6 ≈ 18 base runs ≈ 22 s: ≈ 1,060 CPU-s;
- finder: 32 searches of ≈ 1 s, and training at the picks off the sweep's grid (about half):
  ≈ 150 CPU-s;

≈ 2,050 CPU-seconds: **about 18 minutes** with two processes on an otherwise idle 2-core machine,
25–30 minutes on one shared as it was here (each ``--seeds`` more adds ≈ 2.5 minutes)::

    python benches/bench_efficient.py --sweep --jobs 2 --out bench-efficient

Then ``--radii bench-efficient/radii.json`` (or the same ``--out`` without ``--sweep``) reruns the
main stage alone with the same radii. Time ratios are only as steady as the machine: run it quiet.

``--quick`` (CI smoke, seconds): 1 seed, 1 epoch, 2 pairs, 128 training examples, 2 radii per grid.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _zoo  # noqa: E402

import sharpness  # noqa: E402
from sharpness.batchnorm import frozen_running_stats  # noqa: E402
from sharpness.demo import _finite  # noqa: E402  (NaN/inf as None: strict JSON, as the demo writes it)

METHODS = ("base", "sam", "looksam", "looksam_pick", "everyk", "aesam", "msam", "esam")
LABELS = {
    "base": "base optimizer", "sam": "SAM", "looksam": "LookSAM (k=5, α=0.7)", "looksam_pick": "LookSAM, library pick",
    "everyk": "every-k SAM (k=5)", "aesam": "AE-SAM", "msam": "Momentum-SAM", "esam": "ESAM (β=0.6, γ=0.5)",
}
BASES = ("sgd", "adamw")
NOISES = (0.0, 0.4)
#: SAM's sweep: every other radius of the finder's default grid (10^(k/6−2)), 0.01 to 0.46, ≈2.15× apart.
SAM_GRID = (0.01, 0.02154, 0.04642, 0.1, 0.2154, 0.4642)
#: Momentum-SAM's sweep: ten times larger (the paper's runs use 0.3–3), every other radius of the finder's ×10 grid.
MSAM_GRID = (0.1, 0.2154, 0.4642, 1.0, 2.154, 4.642)
MAIN_SEEDS_FROM = 0
SWEEP_SEEDS_FROM = 1000
#: The finder's budget: this fraction of one training run's steps.
FINDER_FRACTION = 0.2
#: A run "stalls" when its final training loss stays at ≥ 90% of ln(10), the loss of a uniform guess.
STALL_LOSS = 0.9 * math.log(_zoo.NUM_CLASSES)


def looksam_pick(params: Any, base: type[torch.optim.Optimizer], rho: float, **base_kwargs: Any) -> torch.optim.Optimizer:
    """The library's efficient pick: LookSAM's relative form (the reused component at the size it
    had at the last SAM step; docs/research/looksam_stall.md), k = 5, α = 0.5, at SAM's radius."""
    return sharpness.LookSAM(params, base, k=5, alpha=0.5, variant="relative", rho=rho, **base_kwargs)


# -- settings ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """What a run of the benchmark covers (the command line, resolved)."""

    pairs: tuple[str, ...] = tuple(_zoo.PAIRS)
    bases: tuple[str, ...] = BASES
    noises: tuple[float, ...] = NOISES
    methods: tuple[str, ...] = METHODS
    seeds: int = 3
    sweep_seeds: int = 3
    sam_grid: tuple[float, ...] = SAM_GRID
    msam_grid: tuple[float, ...] = MSAM_GRID
    epochs: int | None = None  # None: each pair's own
    train_limit: int | None = None  # None: the whole training set
    finder: bool = True
    finder_grid: tuple[float, ...] | None = None  # None: the finder's default
    finder_budget: int | None = None  # steps; None: finder_fraction of a run
    finder_fraction: float = FINDER_FRACTION


#: ``--quick``: the smallest run that goes through every code path (the finder on the sweep's 2-radius grids).
QUICK = dict(pairs=("digits_mlp", "resnet_images"), seeds=1, sweep_seeds=1, epochs=1, sam_grid=(0.02154, 0.1),
             msam_grid=(0.2154, 1.0), finder_budget=16)


@dataclass(frozen=True)
class Job:
    """One training run: a method at a radius on a pair, base, noise level and seed."""

    stage: str
    pair: str
    base: str
    noise: float
    seed: int
    method: str
    rho: float | None
    epochs: int
    train_limit: int | None = None


@dataclass(frozen=True)
class Task:
    """Work for one process: the runs of one (pair, base, noise, seed), in order, or a finder search."""

    kind: str  # "runs" or "finder"
    jobs: tuple[Job, ...] = ()
    finder: dict[str, Any] = field(default_factory=dict)
    units: float = 1.0  # estimated cost, in base runs


# -- one run ------------------------------------------------------------------------------------------


def base_optimizer(base: str, pair: _zoo.Pair) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """The base optimizer's class and settings on ``pair``."""
    kwargs: dict[str, Any] = dict(lr=pair.lr[base], weight_decay=pair.weight_decay[base])
    if base == "sgd":
        return torch.optim.SGD, dict(kwargs, momentum=0.9)
    if base == "adamw":
        return torch.optim.AdamW, kwargs
    raise ValueError(f"unknown base {base!r}; choose from {BASES}")


def missing(method: str) -> str | None:
    """Why ``method`` cannot run with this version of the library (None: it can)."""
    if method == "msam" and not hasattr(sharpness, "MomentumSAM"):
        return "sharpness.MomentumSAM does not exist in this version: msam skipped"
    return None


def finder_function() -> Callable[..., Any] | None:
    """``sharpness.find_rho`` (its module's, while the package does not export it yet), or None."""
    found = getattr(sharpness, "find_rho", None)
    if found is None:
        try:
            from sharpness.rho_finder import find_rho as found
        except ImportError:
            return None
    return found


def make_optimizer(method: str, params: Any, base: str, pair: _zoo.Pair, rho: float | None,
                   total_steps: int) -> torch.optim.Optimizer:
    """``method`` around the base optimizer of ``pair`` (``rho``: the method's radius)."""
    cls, kwargs = base_optimizer(base, pair)
    if method == "base":
        return cls(params, **kwargs)
    assert rho is not None, f"{method} needs a radius"
    if method == "sam":
        return sharpness.SAM(params, cls, rho=rho, **kwargs)
    if method == "looksam":  # the paper's defaults
        return sharpness.LookSAM(params, cls, k=5, alpha=0.7, rho=rho, **kwargs)
    if method == "looksam_pick":
        return looksam_pick(params, cls, rho, **kwargs)
    if method == "everyk":  # a SAM step every 5: LookSAM's cost without its reuse of g_v
        return sharpness.EveryKSAM(params, cls, k=5, rho=rho, **kwargs)
    if method == "aesam":
        return sharpness.AESAM(params, cls, total_steps=total_steps, rho=rho, **kwargs)
    if method == "msam":
        return sharpness.MomentumSAM(params, cls, rho=rho, **kwargs)
    if method == "esam":  # ESAM scales e by 1/β: ρ·β gives its perturbation SAM's norm (as the demo)
        return sharpness.ESAM(params, cls, beta=0.6, gamma=0.5, rho=rho * 0.6, **kwargs)
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def training_data(pair: _zoo.Pair, noise: float, train_limit: int | None) -> _zoo.Data:
    data = pair.load(noise)
    if train_limit is None:
        return data
    return replace(data, x_train=data.x_train[:train_limit], y_train=data.y_train[:train_limit],
                   y_train_clean=data.y_train_clean[:train_limit])


def initial_state(pair: _zoo.Pair, seed: int) -> dict[str, Tensor]:
    """The initial weights of ``seed``: every method of a seed starts from these."""
    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in pair.build().state_dict().items()}


def batch_order(n: int, batch_size: int, epochs: int, seed: int) -> Iterator[list[Tensor]]:
    """Per epoch, the mini-batch indices: one permutation per epoch from a generator of ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        permutation = torch.randperm(n, generator=generator)
        yield [permutation[i : i + batch_size] for i in range(0, n, batch_size)]


class StepClosures:
    """The closures of one step, counting their calls: with BatchNorm, every call after the step's
    first runs its forward pass with the running statistics frozen (the first call is at ``w``, or
    at ``w̃`` for Momentum-SAM; the later ones at the perturbed point, or on ESAM's subset)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, freeze_later_calls: bool) -> None:
        self.model, self.optimizer, self.freeze = model, optimizer, freeze_later_calls
        self.calls = 0  # over the whole run
        self._calls_this_step = 0
        self.x = self.y = torch.empty(0)

    def start(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y, self._calls_this_step = x, y, 0

    @contextmanager
    def _forward(self) -> Iterator[None]:
        frozen = self.freeze and self._calls_this_step > 0
        self._calls_this_step += 1
        self.calls += 1
        with frozen_running_stats(self.model) if frozen else nullcontext():
            yield

    def mean_loss(self) -> Tensor:
        self.optimizer.zero_grad()
        with self._forward():
            loss = F.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        return loss

    def per_sample(self, indices: Tensor | None = None) -> Tensor:
        """ESAM's closure: per-sample losses of the batch (or of ``indices``), forward only."""
        x, y = (self.x, self.y) if indices is None else (self.x[indices], self.y[indices])
        with self._forward():
            return F.cross_entropy(self.model(x), y, reduction="none")


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch: int = 1000) -> tuple[float, float]:
    """Mean cross-entropy and accuracy in eval mode."""
    was = model.training
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(y), batch):
        logits = model(x[i : i + batch])
        loss += F.cross_entropy(logits, y[i : i + batch], reduction="sum").item()
        correct += int((logits.argmax(dim=1) == y[i : i + batch]).sum())
    model.train(was)
    return loss / len(y), correct / len(y)


def train_run(job: Job, init: dict[str, Tensor] | None = None) -> dict[str, Any]:
    """Trains one model; returns the record of the run (accuracy, losses, times, closure calls)."""
    pair = _zoo.PAIRS[job.pair]
    data = training_data(pair, job.noise, job.train_limit)
    init = initial_state(pair, job.seed) if init is None else init
    model = pair.build()
    model.load_state_dict(init)
    n = len(data.y_train)
    steps_per_epoch = math.ceil(n / pair.batch_size)
    total_steps = job.epochs * steps_per_epoch
    torch.manual_seed(job.seed)  # anything drawing from torch's global generator: the same for every method
    optimizer = make_optimizer(job.method, model.parameters(), job.base, pair, job.rho, total_steps)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    closures = StepClosures(model, optimizer, pair.has_batchnorm)
    epoch_seconds, history = [], []
    model.train()
    for epoch_batches in batch_order(n, pair.batch_size, job.epochs, job.seed):
        started = time.perf_counter()
        total = torch.zeros(())
        for index in epoch_batches:
            closures.start(data.x_train[index], data.y_train[index])
            if job.method == "base":
                loss = closures.mean_loss()
                optimizer.step()
            elif job.method == "esam":
                loss = optimizer.step(closures.per_sample)
            else:
                loss = optimizer.step(closures.mean_loss)
            scheduler.step()
            total += loss.detach() * len(index)
        epoch_seconds.append(time.perf_counter() - started)
        history.append(total.item() / n)
    train_loss, train_accuracy = evaluate(model, data.x_train, data.y_train)
    test_loss, test_accuracy = evaluate(model, data.x_test, data.y_test)
    return {
        "stage": job.stage, "pair": job.pair, "base": job.base, "noise": job.noise, "seed": job.seed,
        "method": job.method, "rho": job.rho, "lr": pair.lr[job.base], "epochs": job.epochs,
        "train_size": n, "steps": total_steps,
        "test_accuracy": test_accuracy, "test_loss": test_loss,
        "train_accuracy": train_accuracy, "train_loss": train_loss,  # on the training labels (noisy)
        "stalled": not (train_loss < STALL_LOSS),  # NaN counts as stalled
        "calls_per_step": closures.calls / total_steps,
        "seconds": sum(epoch_seconds),
        "seconds_per_epoch": statistics.median(epoch_seconds),
        "epoch_seconds": epoch_seconds, "epoch_train_loss": history,
    }


def run_finder(spec: dict[str, Any]) -> dict[str, Any]:
    """:func:`sharpness.find_rho` for one (pair, base, noise, method) on the first sweep seed."""
    pair = _zoo.PAIRS[spec["pair"]]
    data = training_data(pair, spec["noise"], spec["train_limit"])
    model = pair.build()
    model.load_state_dict(initial_state(pair, spec["seed"]))
    n = len(data.y_train)
    total_steps = spec["epochs"] * math.ceil(n / pair.batch_size)
    (first_epoch,) = batch_order(n, pair.batch_size, 1, spec["seed"])
    batches = [(data.x_train[i], data.y_train[i]) for i in first_epoch]

    def make(params: Any, rho: float) -> torch.optim.Optimizer:
        return make_optimizer(spec["method"], params, spec["base"], pair, rho, total_steps)

    def loss_fn(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        return F.cross_entropy(model(batch[0]), batch[1], reduction="none")

    grid = spec["grid"]
    from sharpness import rho_finder

    runs = rho_finder.max_runs(len(grid) if grid else len(rho_finder.DEFAULT_GRID))
    budget = spec["budget"] or max(round(spec["fraction"] * total_steps), rho_finder.MIN_STEPS * runs)
    find_rho = finder_function()
    assert find_rho is not None, "checked before the finder tasks are planned"
    with warnings.catch_warnings():  # its notes (a cliff above the grid, ...) are kept in the record instead
        warnings.simplefilter("ignore", RuntimeWarning)
        search = find_rho(model, make, loss_fn, batches, grid=grid, budget_steps=budget, seed=spec["seed"])
    return {**{k: spec[k] for k in ("pair", "base", "noise", "method", "seed")}, "rho": search.rho,
            "steps": search.steps, "seconds": search.seconds, "budget_steps": budget, "run_steps": total_steps,
            "rows": search.rows, "cliff": search.cliff, "notes": list(search.notes)}


def run_task(task: Task) -> list[dict[str, Any]]:
    """Runs a task (in a worker process, one torch thread): the records it produced."""
    torch.set_num_threads(1)
    if task.kind == "finder":
        return [{"kind": "finder", **run_finder(task.finder)}]
    inits: dict[tuple[str, int], dict[str, Tensor]] = {}
    records = []
    for job in task.jobs:
        key = (job.pair, job.seed)
        if key not in inits:
            inits[key] = initial_state(_zoo.PAIRS[job.pair], job.seed)
        records.append({"kind": "run", **train_run(job, inits[key])})
    return records


# -- planning ----------------------------------------------------------------------------------------

#: Cost of one run in base runs (forward/backward passes per step, measured overheads).
COST = {"base": 1.0, "sam": 2.0, "looksam": 1.3, "looksam_pick": 1.3, "everyk": 1.2, "aesam": 1.5, "msam": 1.05,
        "esam": 1.7}


def epochs_of(pair: str, settings: Settings) -> int:
    return settings.epochs or _zoo.PAIRS[pair].epochs


def train_limit_of(pair: str, settings: Settings, quick: bool) -> int | None:
    return _zoo.PAIRS[pair].quick_train if quick else settings.train_limit


def rotated(items: Sequence[Any], by: int) -> list[Any]:
    """``items`` starting at ``by`` (mod their number): the run order of a seed's methods."""
    by %= max(1, len(items))
    return list(items[by:]) + list(items[:by])


def sweep_tasks(settings: Settings, quick: bool) -> list[Task]:
    """SAM and Momentum-SAM over their grids, per (pair, base, noise, sweep seed)."""
    tasks = []
    methods = [m for m in ("sam", "msam") if missing(m) is None]
    for pair in settings.pairs:
        for base in settings.bases:
            for noise in settings.noises:
                for seed in range(SWEEP_SEEDS_FROM, SWEEP_SEEDS_FROM + settings.sweep_seeds):
                    jobs = [Job("sweep", pair, base, noise, seed, m, rho, epochs_of(pair, settings),
                                train_limit_of(pair, settings, quick))
                            for m in methods for rho in (settings.sam_grid if m == "sam" else settings.msam_grid)]
                    jobs = rotated(jobs, seed)
                    tasks.append(Task("runs", tuple(jobs), units=sum(COST[j.method] for j in jobs)))
    return tasks


def _radius_key(rho: float) -> float:
    """``rho`` to 10 significant digits: the finder's ×10 grid (0.02154 × 10 = 0.21539999...) meets the sweep's 0.2154."""
    return float(f"{rho:.10g}")


def finder_tasks(settings: Settings, quick: bool) -> list[Task]:
    tasks = []
    for pair in settings.pairs:
        for base in settings.bases:
            for noise in settings.noises:
                for method in ("sam", "msam"):
                    if missing(method) is not None:
                        continue
                    grid = settings.finder_grid
                    if grid is None and quick:
                        grid = settings.sam_grid if method == "sam" else settings.msam_grid
                    spec = dict(pair=pair, base=base, noise=noise, method=method, seed=SWEEP_SEEDS_FROM,
                                epochs=epochs_of(pair, settings), train_limit=train_limit_of(pair, settings, quick),
                                grid=list(grid) if grid else None, budget=settings.finder_budget,
                                fraction=settings.finder_fraction)
                    tasks.append(Task("finder", finder=spec, units=0.5 * COST[method]))
    return tasks


def finder_eval_tasks(finds: Sequence[dict[str, Any]], sweep_runs: Sequence[dict[str, Any]], settings: Settings,
                      quick: bool) -> list[Task]:
    """Training runs at each finder pick the sweep did not already train (sweep seeds)."""
    done = {(r["pair"], r["base"], r["noise"], r["method"], _radius_key(r["rho"]), r["seed"]) for r in sweep_runs}
    tasks = []
    for f in finds:
        for seed in range(SWEEP_SEEDS_FROM, SWEEP_SEEDS_FROM + settings.sweep_seeds):
            if (f["pair"], f["base"], f["noise"], f["method"], _radius_key(f["rho"]), seed) in done:
                continue
            job = Job("finder", f["pair"], f["base"], f["noise"], seed, f["method"], f["rho"],
                      epochs_of(f["pair"], settings), train_limit_of(f["pair"], settings, quick))
            tasks.append(Task("runs", (job,), units=COST[f["method"]]))
    return tasks


def main_tasks(settings: Settings, radii: dict[str, Any], quick: bool) -> list[Task]:
    """Every method per (pair, base, noise, seed), in an order rotated by the seed."""
    tasks = []
    for pair in settings.pairs:
        for base in settings.bases:
            rho, msam_rho = radius(radii, pair, base, "sam"), radius(radii, pair, base, "msam")
            for noise in settings.noises:
                for seed in range(MAIN_SEEDS_FROM, MAIN_SEEDS_FROM + settings.seeds):
                    jobs = [Job("main", pair, base, noise, seed, m, None if m == "base" else (msam_rho if m == "msam" else rho),
                                epochs_of(pair, settings), train_limit_of(pair, settings, quick))
                            for m in rotated(settings.methods, seed)]
                    tasks.append(Task("runs", tuple(jobs), units=sum(COST[j.method] for j in jobs)))
    return tasks


def radius(radii: dict[str, Any], pair: str, base: str, method: str) -> float:
    """The radius of ``method`` ("sam": the SAM family's, "msam") on (pair, base): the sweep's, or the default."""
    chosen = radii.get("pairs", {}).get(pair, {}).get(base, {})
    key = "msam_rho" if method == "msam" else "rho"
    if key in chosen:
        return float(chosen[key])
    p = _zoo.PAIRS[pair]
    return (p.msam_rho if method == "msam" else p.rho)[base]


# -- execution ---------------------------------------------------------------------------------------


def _worker_init() -> None:
    torch.set_num_threads(1)


def execute(tasks: Sequence[Task], jobs: int, label: str, print_fn: Callable[[str], None]) -> list[dict[str, Any]]:
    """Runs ``tasks`` (``jobs`` processes, or in this one), a progress line per finished task."""
    if not tasks:
        return []
    total_units = sum(t.units for t in tasks)
    done_units = 0.0
    started = time.perf_counter()
    out: list[dict[str, Any]] = []

    def report(i: int, task: Task, records: list[dict[str, Any]]) -> None:
        nonlocal done_units
        done_units += task.units
        elapsed = time.perf_counter() - started
        eta = elapsed * (total_units - done_units) / max(done_units, 1e-9)
        first = records[0]
        what = f"{first['pair']} {first['base']} noise {first['noise']:g}"
        if first["kind"] == "finder":
            what += f" finder({first['method']}) -> rho {first['rho']:.4g} in {first['seconds']:.1f} s"
        else:
            at = lambda r: "" if r["rho"] is None or first["stage"] == "main" else f"@{r['rho']:g}"  # noqa: E731
            what += f" seed {first['seed']}: " + ", ".join(
                f"{r['method']}{at(r)} {100 * r['test_accuracy']:.1f}%" for r in records)
        print_fn(f"[{label} {i}/{len(tasks)}, {elapsed:.0f} s, ~{eta:.0f} s left] {what}")

    if jobs <= 1:
        for i, task in enumerate(tasks, 1):
            records = run_task(task)
            out += records
            report(i, task, records)
        return out
    import multiprocessing

    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_init) as pool:
        # largest first: the last task to finish is then a short one
        order = sorted(range(len(tasks)), key=lambda i: -tasks[i].units)
        futures = {pool.submit(run_task, tasks[i]): i for i in order}
        for i, future in enumerate(as_completed(futures), 1):
            records = future.result()
            out += records
            report(i, tasks[futures[future]], records)
    return sorted(out, key=_record_order)  # as if run in order: the tables' rows do not depend on --jobs


def _record_order(r: dict[str, Any]) -> tuple[Any, ...]:
    return (list(_zoo.PAIRS).index(r["pair"]), BASES.index(r["base"]), r["noise"], r["seed"],
            METHODS.index(r["method"]), r.get("rho") or 0.0)


# -- summaries ---------------------------------------------------------------------------------------


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize_main(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (pair, base, noise, method): accuracy mean ± std over seeds, the paired
    difference to the base (per-seed differences, mean ± std), the median over seeds of the
    per-seed ratio of seconds per epoch to the base's, closure calls per step, stalled runs."""
    main = [r for r in runs if r["stage"] == "main"]
    by_seed = {(r["pair"], r["base"], r["noise"], r["seed"], r["method"]): r for r in main}
    rows = []
    cells = list(dict.fromkeys((r["pair"], r["base"], r["noise"]) for r in main))
    methods = list(dict.fromkeys(m for m in METHODS if any(r["method"] == m for r in main)))
    for pair, base, noise in cells:
        for method in methods:
            mine = [r for r in main if (r["pair"], r["base"], r["noise"], r["method"]) == (pair, base, noise, method)]
            if not mine:
                continue
            deltas, ratios = [], []
            for r in mine:
                reference = by_seed.get((pair, base, noise, r["seed"], "base"))
                if reference is not None:
                    deltas.append(r["test_accuracy"] - reference["test_accuracy"])
                    ratios.append(r["seconds_per_epoch"] / reference["seconds_per_epoch"])
            accuracy, accuracy_std = mean_std([r["test_accuracy"] for r in mine])
            delta, delta_std = mean_std(deltas)
            rows.append({
                "pair": pair, "base": base, "noise": noise, "method": method, "rho": mine[0]["rho"], "seeds": len(mine),
                "accuracy": accuracy, "accuracy_std": accuracy_std, "delta": delta, "delta_std": delta_std,
                "time_ratio": statistics.median(ratios) if ratios else math.nan,
                "seconds_per_epoch": statistics.median(r["seconds_per_epoch"] for r in mine),
                "calls_per_step": statistics.fmean(r["calls_per_step"] for r in mine),
                "epochs": mine[0]["epochs"], "train_size": mine[0]["train_size"],
                "stalled": sum(bool(r["stalled"]) for r in mine),
            })
    return rows


def summarize_sweep(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (pair, base, noise, method, ρ) of the sweep: accuracy mean ± std over the sweep seeds."""
    sweep = [r for r in runs if r["stage"] == "sweep"]
    keys = sorted({(r["pair"], r["base"], r["noise"], r["method"], r["rho"]) for r in sweep},
                  key=lambda k: (METHODS.index(k[3]), list(_zoo.PAIRS).index(k[0]), BASES.index(k[1]), k[2], k[4]))
    rows = []
    for key in keys:
        mine = [r for r in sweep if (r["pair"], r["base"], r["noise"], r["method"], r["rho"]) == key]
        accuracy, std = mean_std([r["test_accuracy"] for r in mine])
        rows.append(dict(zip(("pair", "base", "noise", "method", "rho"), key), accuracy=accuracy, accuracy_std=std,
                         seeds=len(mine), seconds=statistics.median(r["seconds"] for r in mine),
                         steps=mine[0]["steps"], stalled=sum(bool(r["stalled"]) for r in mine)))
    return rows


def pick_radii(sweep_rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per (pair, base): SAM's and Momentum-SAM's radius with the best sweep accuracy averaged over
    the noise levels (ties: the smaller radius)."""
    picked: dict[str, Any] = {}
    for pair, base, method in dict.fromkeys((r["pair"], r["base"], r["method"]) for r in sweep_rows):
        mine = [r for r in sweep_rows if (r["pair"], r["base"], r["method"]) == (pair, base, method)]
        scores: dict[float, list[float]] = {}
        for r in mine:
            scores.setdefault(r["rho"], []).append(r["accuracy"])
        best = max(sorted(scores), key=lambda rho: statistics.fmean(scores[rho]))
        entry = picked.setdefault(pair, {}).setdefault(base, {})
        entry["msam_rho" if method == "msam" else "rho"] = best
        entry[("msam" if method == "msam" else "sam") + "_accuracy"] = statistics.fmean(scores[best])
    return {"pairs": picked}


def summarize_finder(finds: Sequence[dict[str, Any]], runs: Sequence[dict[str, Any]],
                     sweep_rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per finder search: its pick, the sweep's best radius at that noise level, the accuracy at
    each (sweep seeds) and the gap, the finder's seconds and steps over one training run's."""
    rows = []
    for f in finds:
        key = (f["pair"], f["base"], f["noise"], f["method"])
        grid = [r for r in sweep_rows if (r["pair"], r["base"], r["noise"], r["method"]) == key]
        at_pick = [r["test_accuracy"] for r in runs if r["stage"] in ("sweep", "finder")
                   and (r["pair"], r["base"], r["noise"], r["method"]) == key and _radius_key(r["rho"]) == _radius_key(f["rho"])]
        run_seconds = [r["seconds"] for r in runs if r["stage"] in ("sweep", "finder")
                       and (r["pair"], r["base"], r["noise"], r["method"]) == key]
        best = max(grid, key=lambda r: r["accuracy"]) if grid else None
        accuracy, _ = mean_std(at_pick)
        one_run = statistics.median(run_seconds) if run_seconds else math.nan
        rows.append({
            "pair": f["pair"], "base": f["base"], "noise": f["noise"], "method": f["method"],
            "finder_rho": f["rho"], "finder_accuracy": accuracy,
            "sweep_rho": best["rho"] if best else None, "sweep_accuracy": best["accuracy"] if best else math.nan,
            "gap": (best["accuracy"] - accuracy) if best else math.nan,
            "finder_seconds": f["seconds"], "run_seconds": one_run, "time_fraction": f["seconds"] / one_run,
            "finder_steps": f["steps"], "run_steps": f["run_steps"], "step_fraction": f["steps"] / f["run_steps"],
            "cliff": f["cliff"], "notes": f["notes"],
        })
    return rows


# -- tables -------------------------------------------------------------------------------------------


def _pct(value: float, std: float | None = None, signed: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    text = f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"
    return text if std is None or not math.isfinite(std) else f"{text} ± {100 * std:.1f}"


def _noise(noise: float) -> str:
    return "clean" if noise == 0 else f"{100 * noise:g}% noise"


def _cell(pair: str, base: str, noise: float) -> str:
    return f"{pair} {base} {_noise(noise)}"


def _markdown(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main_tables(rows: Sequence[dict[str, Any]]) -> str:
    """Per (pair, base): a row per method; per noise level: accuracy, paired Δ to the base, time
    per epoch relative to the base, stalled runs."""
    out = []
    for pair, base in dict.fromkeys((r["pair"], r["base"]) for r in rows):
        mine = [r for r in rows if (r["pair"], r["base"]) == (pair, base)]
        noises = list(dict.fromkeys(r["noise"] for r in mine))
        headers = ["method", "ρ", "closure calls/step"]
        for noise in noises:
            headers += [f"{_noise(noise)}: test acc %", "Δ vs base (pp)", "time/epoch ×", "stalls"]
        table = []
        for method in dict.fromkeys(r["method"] for r in mine):
            cells = {r["noise"]: r for r in mine if r["method"] == method}
            first = next(iter(cells.values()))
            row = [LABELS[method], "" if first["rho"] is None else f"{first['rho']:.3g}", f"{first['calls_per_step']:.2f}"]
            for noise in noises:
                r = cells.get(noise)
                if r is None:
                    row += ["—"] * 4
                    continue
                row += [_pct(r["accuracy"], r["accuracy_std"]),
                        "" if method == "base" else _pct(r["delta"], r["delta_std"], signed=True),
                        f"{r['time_ratio']:.2f}", f"{r['stalled']}/{r['seeds']}"]
            table.append(row)
        seeds = max(r["seeds"] for r in mine)
        base_time = ", ".join(f"{1000 * r['seconds_per_epoch']:.0f} ms" for r in mine if r["method"] == "base")
        what = _zoo.describe(_zoo.PAIRS[pair], mine[0]["epochs"], mine[0]["train_size"])
        out.append(f"#### {pair}, {base}: {what}; {seeds} seeds; base epoch {base_time} (clean, noisy)\n\n"
                   + _markdown(headers, table))
    return "\n\n".join(out)


def delta_matrix(rows: Sequence[dict[str, Any]]) -> str:
    """Every (pair, base, noise) against every method: the paired Δ to the base (pp), stalls
    marked; a last row with the median relative time per epoch."""
    methods = [m for m in METHODS if m != "base" and any(r["method"] == m for r in rows)]
    table = []
    for pair, base, noise in dict.fromkeys((r["pair"], r["base"], r["noise"]) for r in rows):
        cells = {r["method"]: r for r in rows if (r["pair"], r["base"], r["noise"]) == (pair, base, noise)}
        line = [_cell(pair, base, noise),
                _pct(cells["base"]["accuracy"]) if "base" in cells else "—"]
        for m in methods:
            r = cells.get(m)
            stalls = f" ({r['stalled']} stalled)" if r is not None and r["stalled"] else ""
            line.append("—" if r is None else _pct(r["delta"], signed=True) + stalls)
        table.append(line)
    times = ["median time/epoch ×", ""] + [
        f"{statistics.median(r['time_ratio'] for r in rows if r['method'] == m and math.isfinite(r['time_ratio'])):.2f}"
        if any(r["method"] == m and math.isfinite(r["time_ratio"]) for r in rows) else "—" for m in methods]
    table.append(times)
    return _markdown(["pair base noise", "base acc %", *[f"{LABELS[m]} Δ" for m in methods]], table)


def sweep_table(rows: Sequence[dict[str, Any]], radii: dict[str, Any]) -> str:
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        grid = sorted({r["rho"] for r in mine})
        table = []
        for pair, base, noise in dict.fromkeys((r["pair"], r["base"], r["noise"]) for r in mine):
            cells = {r["rho"]: r for r in mine if (r["pair"], r["base"], r["noise"]) == (pair, base, noise)}
            best = max(cells.values(), key=lambda r: r["accuracy"])["rho"]
            picked = radius(radii, pair, base, method)
            table.append([_cell(pair, base, noise)] + [
                ("**" + _pct(cells[rho]["accuracy"]) + "**" if rho == best else _pct(cells[rho]["accuracy"]))
                + (" ←" if rho == picked else "") if rho in cells else "—" for rho in grid])
        seeds = max(r["seeds"] for r in mine)
        out.append(f"{LABELS[method]}: test accuracy % against ρ ({seeds} sweep seeds; bold: best at that noise; "
                   "←: the radius used, best averaged over noise)\n\n"
                   + _markdown(["pair base noise", *[f"ρ={rho:g}" for rho in grid]], table))
    return "\n\n".join(out)


def finder_table(rows: Sequence[dict[str, Any]]) -> str:
    """The finder's pick against the sweep's best, one row per search, then the finder's notes."""
    table = [[_cell(r["pair"], r["base"], r["noise"]), LABELS[r["method"]],
              f"{r['finder_rho']:.3g}", _pct(r["finder_accuracy"]),
              "—" if r["sweep_rho"] is None else f"{r['sweep_rho']:.3g}", _pct(r["sweep_accuracy"]),
              _pct(r["gap"], signed=False), f"{r['finder_seconds']:.1f} s ({r['time_fraction']:.2f}×)",
              f"{r['finder_steps']} ({r['step_fraction']:.2f}×)",
              "above the grid" if r["cliff"] is None else f"{r['cliff']:.3g}"] for r in rows]
    headers = ["pair base noise", "method", "finder ρ", "acc at finder ρ", "sweep best ρ", "acc at best ρ", "gap (pp)",
               "finder time (× one run)", "finder steps (× one run)", "cliff (first failing ρ)"]
    notes = [f"- {_cell(r['pair'], r['base'], r['noise'])}, {LABELS[r['method']]}: {note}" for r in rows for note in r["notes"]]
    return "\n".join([_markdown(headers, table), *(["", "Finder notes:", *notes] if notes else [])])


def header(settings: Settings, jobs: int, argv: Sequence[str]) -> str:
    import numpy

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return "\n".join([
        f"- command: `python benches/bench_efficient.py {' '.join(argv)}`",
        f"- torch {torch.__version__}, numpy {numpy.__version__}, sharpness {sharpness.__version__}, "
        f"python {platform.python_version()}",
        f"- CPU: {cpu}, {os.cpu_count()} cores; {jobs} process(es), 1 torch thread each",
        f"- seeds: main {MAIN_SEEDS_FROM}–{MAIN_SEEDS_FROM + settings.seeds - 1}, sweep {SWEEP_SEEDS_FROM}–"
        f"{SWEEP_SEEDS_FROM + settings.sweep_seeds - 1}; label noise {', '.join(f'{n:g}' for n in settings.noises)}; "
        f"bases {', '.join(settings.bases)}",
    ])


# -- output --------------------------------------------------------------------------------------------



RUN_COLUMNS = ("stage", "pair", "base", "noise", "seed", "method", "rho", "lr", "epochs", "train_size", "steps",
               "test_accuracy", "test_loss", "train_accuracy", "train_loss", "stalled", "calls_per_step", "seconds",
               "seconds_per_epoch")


def write_json(path: str, value: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(_finite(value), f, indent=1, allow_nan=False)


def write_runs(runs: Sequence[dict[str, Any]], out_dir: str) -> list[str]:
    csv_path = os.path.join(out_dir, "runs.csv")
    with open(csv_path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(RUN_COLUMNS), extrasaction="ignore")
        writer.writeheader()
        for r in runs:
            writer.writerow({k: "" if r.get(k) is None else r[k] for k in RUN_COLUMNS})
    json_path = os.path.join(out_dir, "runs.json")
    write_json(json_path, list(runs))
    return [csv_path, json_path]


# -- command line -------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="folder for runs.csv/json, radii.json, finder.json, tables.md")
    parser.add_argument("--sweep", action="store_true", help="run the radius sweep and the finder first")
    parser.add_argument("--sweep-only", action="store_true", help="the sweep and the finder only")
    parser.add_argument("--finder-only", action="store_true",
                        help="the finder again against the sweep already in OUT (its runs reused; radii.json kept)")
    parser.add_argument("--radii", help="radii.json of an earlier sweep (default: OUT/radii.json when present)")
    parser.add_argument("--quick", action="store_true", help="CI smoke: 1 seed, 1 epoch, 2 pairs, 128 examples")
    parser.add_argument("--pairs", help=f"comma-separated, from {','.join(_zoo.PAIRS)}")
    parser.add_argument("--bases", help=f"comma-separated, from {','.join(BASES)}")
    parser.add_argument("--noise", help="comma-separated label-noise levels (default 0,0.4)")
    parser.add_argument("--methods", help=f"comma-separated, from {','.join(METHODS)} (base is always run)")
    parser.add_argument("--seeds", type=int, help="main-stage seeds (default 3)")
    parser.add_argument("--sweep-seeds", type=int, help="sweep seeds (default 3)")
    parser.add_argument("--epochs", type=int, help="override every pair's epochs")
    parser.add_argument("--no-finder", action="store_true", help="skip sharpness.find_rho in the sweep stage")
    parser.add_argument("--finder-fraction", type=float,
                        help=f"the finder's budget, a fraction of one run's steps (default {FINDER_FRACTION:g}; "
                        "at least 8 steps per candidate)")
    parser.add_argument("--jobs", type=int, default=1, help="processes in parallel, one torch thread each (default 1)")
    return parser.parse_args(argv)


def _choices(text: str | None, allowed: Sequence[str], what: str) -> tuple[str, ...] | None:
    if text is None:
        return None
    chosen = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [c for c in chosen if c not in allowed]
    if unknown or not chosen:
        raise SystemExit(f"unknown {what}: {unknown or text!r}; choose from {', '.join(allowed)}")
    return chosen


def settings_from(args: argparse.Namespace) -> Settings:
    settings = Settings(**QUICK) if args.quick else Settings()  # type: ignore[arg-type]
    changes: dict[str, Any] = {}
    for name, allowed in (("pairs", tuple(_zoo.PAIRS)), ("bases", BASES), ("methods", METHODS)):
        chosen = _choices(getattr(args, name), allowed, name)
        if chosen is not None:
            changes[name] = chosen
    if "methods" in changes and "base" not in changes["methods"]:
        changes["methods"] = ("base", *changes["methods"])  # the reference of every Δ and time ratio
    if args.noise is not None:
        changes["noises"] = tuple(float(v) for v in args.noise.split(","))
    for name in ("seeds", "sweep_seeds", "epochs"):
        value = getattr(args, name)
        if value is not None:
            if value < 1:
                raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
            changes[name] = value
    if args.no_finder:
        changes["finder"] = False
    if args.finder_fraction is not None:
        if not args.finder_fraction > 0:
            raise SystemExit("--finder-fraction must be > 0")
        changes["finder_fraction"] = args.finder_fraction
    return replace(settings, **changes)


def main(argv: Sequence[str] | None = None, print_fn: Callable[[str], None] = print) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    settings = settings_from(args)
    os.environ.setdefault("RAYON_NUM_THREADS", "1")  # the native kernels' pool, inherited by the workers
    torch.set_num_threads(1)
    say = lambda text: print_fn(text) if print_fn is not print else print(text, flush=True)  # noqa: E731
    skipped = [reason for m in settings.methods if (reason := missing(m))]
    for reason in skipped:
        say(f"note: {reason}")
    methods = tuple(m for m in settings.methods if missing(m) is None)
    settings = replace(settings, methods=methods)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    started = time.perf_counter()
    results: dict[str, Any] = {"settings": _finite(asdict(settings)), "notes": skipped}
    runs: list[dict[str, Any]] = []
    sections = [f"## Efficient SAM methods: accuracy and time per epoch\n\n{header(settings, args.jobs, argv)}"]

    radii: dict[str, Any] = {}
    radii_path = args.radii or (os.path.join(args.out, "radii.json") if args.out else None)
    if args.finder_only:
        if not args.out or not os.path.exists(os.path.join(args.out, "sweep_runs.json")):
            raise SystemExit("--finder-only needs --out with the sweep_runs.json of an earlier --sweep")
        with open(os.path.join(args.out, "sweep_runs.json"), encoding="utf-8") as f:
            runs = json.load(f)
        finds = execute(finder_tasks(settings, args.quick), args.jobs, "finder", say)
        runs += execute(finder_eval_tasks(finds, runs, settings, args.quick), args.jobs, "finder runs", say)
        sweep_rows = summarize_sweep(runs)
        with open(os.path.join(args.out, "radii.json"), encoding="utf-8") as f:
            radii = json.load(f)
        finder_rows = summarize_finder(finds, runs, sweep_rows)
        sections.append("### Radius sweep\n\n" + sweep_table(sweep_rows, radii))
        sections.append(
            "### Radius finder (`sharpness.find_rho`) against the sweep\n\nThe finder runs once on the first sweep "
            f"seed (budget: {100 * settings.finder_fraction:g}% of one run's steps, at least 8 steps per candidate); "
            "accuracies are means over the sweep seeds; time and steps relative to one training run of the same "
            "method.\n\n" + finder_table(finder_rows))
        write_json(os.path.join(args.out, "finder.json"), {"rows": finder_rows, "searches": finds})
        write_json(os.path.join(args.out, "sweep_runs.json"), runs)
        with open(os.path.join(args.out, "sweep.md"), "w", encoding="utf-8") as f:
            f.write("\n\n".join(sections[1:]) + "\n")
        say(f"wrote {args.out}/sweep.md, finder.json ({time.perf_counter() - started:.0f} s)")
        return results
    if args.sweep or args.sweep_only:
        tasks = sweep_tasks(settings, args.quick)
        finder_ok = settings.finder and finder_function() is not None
        if settings.finder and not finder_ok:
            note = "sharpness.find_rho does not exist in this version: the finder table is skipped"
            say(f"note: {note}")
            skipped.append(note)
        if finder_ok:
            tasks += finder_tasks(settings, args.quick)
        records = execute(tasks, args.jobs, "sweep", say)
        sweep_runs = [r for r in records if r["kind"] == "run"]
        finds = [r for r in records if r["kind"] == "finder"]
        runs += sweep_runs
        runs += execute(finder_eval_tasks(finds, sweep_runs, settings, args.quick), args.jobs, "finder runs", say)
        sweep_rows = summarize_sweep(runs)
        radii = pick_radii(sweep_rows)
        radii["grids"] = {"sam": list(settings.sam_grid), "msam": list(settings.msam_grid)}
        radii["sweep_seeds"] = settings.sweep_seeds
        finder_rows = summarize_finder(finds, runs, sweep_rows)
        results.update(sweep=sweep_rows, radii=radii, finder=finder_rows, finder_searches=finds)
        sections.append("### Radius sweep\n\n" + sweep_table(sweep_rows, radii))
        if finder_rows:
            sections.append(
                "### Radius finder (`sharpness.find_rho`) against the sweep\n\nThe finder runs once on the first sweep "
                f"seed (budget: {100 * settings.finder_fraction:g}% of one run's steps, at least 8 steps per candidate); "
                "accuracies are means over the sweep seeds; time and steps relative to one training run of the same "
                "method.\n\n" + finder_table(finder_rows))
        if args.out:
            write_json(os.path.join(args.out, "radii.json"), radii)
            write_json(os.path.join(args.out, "finder.json"), {"rows": finder_rows, "searches": finds})
            write_json(os.path.join(args.out, "sweep_runs.json"), runs)
            with open(os.path.join(args.out, "sweep.md"), "w", encoding="utf-8") as f:
                f.write("\n\n".join(sections[1:]) + "\n")
    elif radii_path and os.path.exists(radii_path):
        with open(radii_path, encoding="utf-8") as f:
            radii = json.load(f)
        say(f"radii from {radii_path}")
        # the sweep that chose them, when it ran into the same folder: its tables and runs join this report
        folder = os.path.dirname(os.path.abspath(radii_path))
        if os.path.exists(os.path.join(folder, "sweep.md")) and os.path.exists(os.path.join(folder, "sweep_runs.json")):
            with open(os.path.join(folder, "sweep.md"), encoding="utf-8") as f:
                sections.append(f.read().strip())
            with open(os.path.join(folder, "sweep_runs.json"), encoding="utf-8") as f:
                runs += json.load(f)
    else:
        say("radii: no sweep and no radii.json: each pair's default radius (_zoo.PAIRS)")

    if not args.sweep_only:
        runs += execute(main_tasks(settings, radii, args.quick), args.jobs, "main", say)
        main_rows = summarize_main(runs)
        results["main"] = main_rows
        radii_note = "sweep" if radii.get("pairs") else "defaults of _zoo.PAIRS"
        sections.append(f"### Per pair and base (radii: {radii_note})\n\n" + main_tables(main_rows))
        sections.append("### Δ test accuracy to the base optimizer (pp, paired over seeds), every pair\n\n"
                        + delta_matrix(main_rows))
    wall = time.perf_counter() - started
    sections.append(f"Total {wall / 60:.1f} min.")
    report = "\n\n".join(sections) + "\n"
    say("")
    say(report)
    results.update(runs=runs, wall_seconds=wall, report=report)
    if args.out:
        written = write_runs(runs, args.out)
        path = os.path.join(args.out, "tables.md")
        with open(path, "w", encoding="utf-8") as f:
            f.write(report)
        written.append(path)
        write_json(os.path.join(args.out, "summary.json"), {k: v for k, v in results.items() if k != "runs"})
        say("wrote " + ", ".join(written))
    return results


if __name__ == "__main__":
    main()
