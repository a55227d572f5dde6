"""The main job: plain SGD against SAM (and ASAM) on scikit-learn's digits with noisy labels.

Label noise is where SAM's advantage is clearest and cheapest to show: a network trained long
enough with plain SGD memorises the randomised training labels and its test accuracy falls,
while SAM, which minimises the loss over a ball of radius ``ρ`` around the weights, resists
memorising them (Foret et al., ICLR 2021, Section 3.3).

The experiment, for every seed and every optimizer:

- one dataset for the whole run: ``sklearn.datasets.load_digits`` (1797 8×8 images, shipped with
  scikit-learn, no download), a stratified train/test split and a feature standardisation fitted
  on the training part, both with ``data_seed``; then a fraction ``label_noise`` of the *training*
  labels replaced by a label drawn uniformly from the 10 classes (so about 1/10 of them stay
  right). Test labels stay clean;
- the same network (an MLP, or a small CNN on the 8×8 images; ``--models`` runs both), from
  the same initial weights for a given seed, seeing the same mini-batches in the same order;
  the same learning rate, momentum, epochs and LR schedule for every optimizer;
- at the end: test accuracy, training loss and accuracy on the noisy labels, and how many of the
  wrong training labels the model reproduces (memorisation), plus the median seconds per epoch
  (training only, evaluation excluded).

- the sharpness of every final model (:mod:`sharpness.measure`), on a fixed training subset
  (the first ``measure_size`` examples, noisy labels): m-sharpness with one radius for every
  optimizer, and the top eigenvalue of the Hessian;
- with a report folder: filter-normalised 1-D and 2-D loss landscapes (Li et al., NeurIPS 2018)
  of the first seed's final models, same directions seed and same grid, plotted on one scale.

The pieces are separate so that the experiment can grow (more models, datasets, measures of
sharpness, plots): :func:`load_noisy_digits` builds the data, :func:`build_model` the network
(``mlp`` or ``cnn``), :func:`make_optimizer` the optimizer, :func:`train_run` one training run,
:func:`measure_model` its sharpness, :func:`tune_learning_rates` the optional choice of learning
rates on a validation split, :func:`run_demo` the grid of runs, :func:`summarize`,
:func:`format_table`, :func:`landscapes_of` and :func:`write_report` (CSV, JSON, PNG through
:mod:`sharpness.plots`) the report. :mod:`sharpness.cli` only parses arguments and calls
:func:`run_demo`.
"""

from __future__ import annotations

import functools
import importlib
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, TextIO

import torch
import torch.nn.functional as F
from torch import Tensor, nn

OPTIMIZERS = (
    "sgd", "sam", "asam", "looksam", "everyk", "aesam", "esam", "sampa", "saf", "mesa",
    "gsam", "friendly", "wsam", "rsam", "monge", "ssamd", "gam", "crsam", "lightsam", "adasam", "bsam", "lets",
)
#: Plain SGD with a loss term of the SAM family instead of a second gradient pass.
REGULARIZED = ("saf", "mesa")
#: The final metrics of a run, summarised over seeds.
METRICS = (
    "test_accuracy", "train_loss", "train_accuracy", "train_accuracy_clean", "memorized", "seconds_per_epoch",
    "m_sharpness", "lambda_max",
)
SCHEDULES = ("cosine", "step", "constant")
MODELS = ("mlp", "cnn")
#: ``sharpness demo`` runs both networks unless ``--models`` says otherwise: about 2.5 minutes on a
#: 2-core CPU at the defaults (3 seeds × 3 optimizers × 40 epochs each, measures and landscapes
#: included), well inside the 5-minute budget of the main job.
DEFAULT_MODELS = MODELS
NUM_CLASSES = 10


@dataclass(frozen=True)
class DemoConfig:
    """Every setting of the demo; the defaults are the main job's (see :mod:`sharpness.cli`)."""

    epochs: int = 40
    lr: float = 0.02
    rho: float = 0.3
    asam_rho: float = 4.0
    asam_eta: float = 0.01
    every_k: int = 5  # LookSAM's k (the paper's) and every-k SAM's: a second pass every k steps
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 32
    schedule: str = "cosine"
    label_noise: float = 0.4
    test_fraction: float = 0.3
    hidden: int = 256
    depth: int = 2
    model: str = "mlp"  # or "cnn": two 3×3 convolutions on the 8×8 images (see build_model)
    seeds: int = 3
    first_seed: int = 0
    data_seed: int = 0
    optimizers: tuple[str, ...] = ("sgd", "sam", "asam")
    device: str = "cpu"
    threads: int | None = 1
    progress: bool = True
    # sharpness of the final models (sharpness.measure), on the first measure_size training
    # examples (noisy labels, the objective that was minimised); 0 switches the measures off
    measure_size: int = 512
    measure_m: int = 128  # m of m-sharpness: the batch size of each ascent
    measure_rho: float = 0.1  # the same radius for every optimizer, SAM's ball (not ASAM's)
    measure_steps: int = 5  # projected gradient-ascent steps of m-sharpness
    hessian_iters: int = 20  # power iterations for the top Hessian eigenvalue
    # filter-normalised loss landscapes of the first seed's final models (with --out)
    landscape_span: float = 1.0
    landscape_steps: int = 21  # grid points per axis (the 1-D curve has 2·steps − 1)
    landscape_seed: int = 0  # the random directions: the same numbers for every model
    # --tune: each optimizer's learning rate picked from tune_lrs by accuracy on a validation split
    # of the (noisy) training set; optimizer_lrs then holds the choices and overrides lr
    tune: bool = False
    tune_lrs: tuple[float, ...] = (0.005, 0.01, 0.02, 0.05, 0.1)
    val_fraction: float = 0.2
    optimizer_lrs: tuple[tuple[str, float], ...] = ()
    # --rho auto: each radius-taking optimizer's radius found by sharpness.find_rho before the runs,
    # within rho_budget × one training run's steps; optimizer_rhos then holds the picks and
    # overrides rho (asam: asam_rho)
    rho_auto: bool = False
    rho_budget: float = 0.2
    optimizer_rhos: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        unknown = [name for name in self.optimizers if name not in OPTIMIZERS]
        if unknown or not self.optimizers:
            raise ValueError(f"optimizers must be a non-empty list of {OPTIMIZERS}, got {list(self.optimizers)}")
        if len(set(self.optimizers)) != len(self.optimizers):
            raise ValueError(f"optimizers listed twice: {list(self.optimizers)}")
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not 0.0 <= self.label_noise <= 1.0:
            raise ValueError(f"label_noise must be in [0, 1], got {self.label_noise}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        for name in ("epochs", "batch_size", "hidden", "depth", "seeds", "every_k", "measure_m", "measure_steps",
                     "hessian_iters", "landscape_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if not self.tune_lrs or any(not (lr > 0 and math.isfinite(lr)) for lr in self.tune_lrs):
            raise ValueError(f"tune_lrs must be finite numbers > 0, got {list(self.tune_lrs)}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if not 0.0 < self.rho_budget <= 1.0:
            raise ValueError(f"rho_budget must be in (0, 1], got {self.rho_budget}")
        if self.measure_size < 0:
            raise ValueError(f"measure_size must be >= 0, got {self.measure_size}")
        for name in ("lr", "rho", "asam_rho", "asam_eta", "momentum", "weight_decay", "measure_rho",
                     "landscape_span"):
            value = getattr(self, name)
            if not (value >= 0.0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")


#: ``--quick``: a smoke test that exercises every code path in seconds.
QUICK = dict(epochs=2, seeds=1, landscape_steps=11, measure_size=128)


# -- data -----------------------------------------------------------------------------------------


@dataclass
class Dataset:
    """Standardised features and labels; ``y_train`` is noisy, ``y_train_clean`` the truth."""

    x_train: Tensor
    y_train: Tensor
    y_train_clean: Tensor
    noisy_mask: Tensor  # the training examples whose label was randomised
    x_test: Tensor
    y_test: Tensor
    num_classes: int = NUM_CLASSES
    info: dict[str, Any] = field(default_factory=dict)

    def to(self, device: str | torch.device) -> Dataset:
        tensors: dict[str, Any] = {k: v.to(device) for k, v in vars(self).items() if isinstance(v, Tensor)}
        return replace(self, **tensors)


def randomize_labels(
    labels: Tensor, fraction: float, num_classes: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Replaces the labels of ``round(fraction·n)`` examples, chosen at random, by labels drawn
    uniformly from ``num_classes`` classes (the symmetric noise of Zhang et al. 2017 and of the
    SAM paper: a randomised label is right again with probability ``1/num_classes``).

    Returns ``(noisy_labels, mask)``, ``mask`` marking the randomised examples; ``labels`` is not
    modified.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    n = labels.numel()
    count = round(fraction * n)
    chosen = torch.randperm(n, generator=generator)[:count]
    noisy = labels.clone()
    noisy[chosen] = torch.randint(num_classes, (count,), generator=generator, dtype=labels.dtype)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[chosen] = True
    return noisy, mask


def load_noisy_digits(label_noise: float = 0.4, test_fraction: float = 0.3, seed: int = 0) -> Dataset:
    """scikit-learn's digits, split (stratified) and standardised on the training part, with a
    fraction ``label_noise`` of the training labels randomised; all of it determined by ``seed``."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
        from sklearn.preprocessing import StandardScaler
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the demo needs scikit-learn: python -m pip install 'sharpness[demo]'"
        ) from err
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    scaler = StandardScaler().fit(x_train)
    x_train, x_test = scaler.transform(x_train), scaler.transform(x_test)
    y_train_clean = torch.as_tensor(y_train, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    y_noisy, mask = randomize_labels(y_train_clean, label_noise, NUM_CLASSES, generator)
    info = {
        "name": "sklearn digits",
        "train_size": len(y_train),
        "test_size": len(y_test),
        "features": x.shape[1],
        "label_noise": label_noise,
        "randomized": int(mask.sum()),
        "wrong_labels": int((y_noisy != y_train_clean).sum()),
    }
    return Dataset(
        x_train=torch.as_tensor(x_train, dtype=torch.float32),
        y_train=y_noisy,
        y_train_clean=y_train_clean,
        noisy_mask=mask,
        x_test=torch.as_tensor(x_test, dtype=torch.float32),
        y_test=torch.as_tensor(y_test, dtype=torch.long),
        info=info,
    )


# -- model and optimizers -------------------------------------------------------------------------


def build_model(
    in_features: int, num_classes: int, hidden: int = 256, depth: int = 2, kind: str = "mlp"
) -> nn.Module:
    """``kind="mlp"``: ``depth`` hidden layers of width ``hidden`` with ReLU (64→256→256→10 by
    default). ``kind="cnn"``: the features as a one-channel square image (8×8 for digits),
    3×3 convolutions to 16 then 32 channels with ReLU, 2×2 max pooling, then one hidden layer of
    width ``hidden`` (``depth`` is not used)."""
    if kind == "cnn":
        side = math.isqrt(in_features)
        if side * side != in_features or side % 2:
            raise ValueError(f"the cnn needs square images of even side, got {in_features} features")
        return nn.Sequential(
            nn.Unflatten(1, (1, side, side)),
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(32 * (side // 2) ** 2, hidden), nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )
    if kind != "mlp":
        raise ValueError(f"unknown model {kind!r}; choose from {MODELS}")
    layers: list[nn.Module] = []
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def describe_model(config: DemoConfig, features: int = 64, num_classes: int = NUM_CLASSES) -> str:
    """One line: the network's shape."""
    if config.model == "cnn":
        side = math.isqrt(features)
        return f"CNN {side}×{side}→conv16→conv32→pool→{config.hidden}→{num_classes}"
    return f"MLP {features}→" + "→".join([str(config.hidden)] * config.depth) + f"→{num_classes}"


def initial_state(config: DemoConfig, data: Dataset, seed: int) -> dict[str, Tensor]:
    """The initial weights of ``seed``: every optimizer of a seed starts from these."""
    torch.manual_seed(seed)
    model = build_model(data.x_train.shape[1], data.num_classes, config.hidden, config.depth, config.model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def learning_rate(name: str, config: DemoConfig) -> float:
    """``name``'s learning rate: the tuned one (``optimizer_lrs``) if any, else ``lr``."""
    return dict(config.optimizer_lrs).get(name, config.lr)


def radius_field(name: str) -> str | None:
    """The :class:`DemoConfig` field holding ``name``'s radius (None: no radius)."""
    if name in ("sgd", "saf", "mesa", "bsam"):  # no radius (SGD, a loss term) or its own defaults
        return None
    return "asam_rho" if name == "asam" else "rho"


def with_radius(name: str, config: DemoConfig) -> DemoConfig:
    """``config`` with ``name``'s found radius (``optimizer_rhos``, from ``--rho auto``) in its
    radius field; ``config`` itself when there is none."""
    found = dict(config.optimizer_rhos).get(name)
    field_name = radius_field(name)
    if found is None or field_name is None:
        return config
    changes: dict[str, Any] = {field_name: found}
    return replace(config, **changes)


def validation_split(data: Dataset, fraction: float, seed: int) -> Dataset:
    """The training part split again (stratified on the noisy labels, ``seed``): a Dataset whose
    ``x_train``/``y_train`` are the rest and whose ``x_test``/``y_test`` are the validation
    examples with their *noisy* labels, as a practitioner, who never sees the clean labels,
    would have them."""
    from sklearn.model_selection import train_test_split

    index = torch.arange(len(data.y_train))
    fit, val = train_test_split(
        index.numpy(), test_size=fraction, random_state=seed, stratify=data.y_train.cpu().numpy()
    )
    fit, val = torch.as_tensor(fit), torch.as_tensor(val)
    return replace(
        data,
        x_train=data.x_train[fit], y_train=data.y_train[fit], y_train_clean=data.y_train_clean[fit],
        noisy_mask=data.noisy_mask[fit], x_test=data.x_train[val], y_test=data.y_train[val],
        info={**data.info, "train_size": len(fit), "test_size": len(val)},
    )


def tune_learning_rates(
    config: DemoConfig, data: Dataset, print_fn: Callable[[str], None] = print, progress: Any = None
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """For every optimizer, trains on the rest of a validation split (:func:`validation_split`,
    ``val_fraction``, first seed, no sharpness measures) with every learning rate of
    ``tune_lrs``, and picks the one with the best final validation accuracy (noisy labels; ties
    go to the smaller rate). Returns ``(chosen, scores)``, ``scores[name][str(lr)]`` the accuracies."""
    split = validation_split(data, config.val_fraction, config.data_seed)
    trial = replace(config, measure_size=0, optimizer_lrs=(), tune=False)
    init = initial_state(trial, split, config.first_seed)
    progress = progress or _progress_factory(False)
    chosen: dict[str, float] = {}
    scores: dict[str, dict[str, float]] = {}
    total = len(config.optimizers) * len(config.tune_lrs)
    with progress(total=total, desc="tuning lr", unit="run", leave=False) as bar:
        for name in config.optimizers:
            scores[name] = {}
            for lr in sorted(config.tune_lrs):
                run = train_run(replace(trial, lr=lr), split, name, config.first_seed, init=init)
                score = run["test_accuracy"]
                scores[name][repr(lr)] = score if math.isfinite(score) else 0.0
                bar.update(1)
            chosen[name] = float(max(scores[name], key=lambda k: (scores[name][k], -float(k))))
            print_fn(
                f"tuning {name:>4}: validation accuracy (noisy labels) "
                + ", ".join(f"lr {float(k):g}: {100 * v:.1f}%" for k, v in scores[name].items())
                + f" -> lr {chosen[name]:g}"
            )
    return chosen, scores


def search_grid(budget_steps: int, grid: Sequence[float]) -> list[float]:
    """The largest evenly thinned sub-grid of ``grid`` (its two ends kept) whose search fits
    ``budget_steps`` with :data:`sharpness.rho_finder.MIN_STEPS` steps per candidate: the whole
    grid at the demo's defaults, two radii in ``--quick`` mode. Raises ValueError when not even two fit."""
    from sharpness.rho_finder import MIN_STEPS, max_runs

    for n in range(len(grid), 1, -1):
        if budget_steps // max_runs(n) >= MIN_STEPS:
            return [grid[round(i * (len(grid) - 1) / (n - 1))] for i in range(n)]
    raise ValueError(
        f"--rho auto: a budget of {budget_steps} steps is too small for a search (at least {2 * MIN_STEPS}: two radii "
        f"of {MIN_STEPS} steps); raise --rho-budget or --epochs"
    )


def find_radii(
    config: DemoConfig, data: Dataset, print_fn: Callable[[str], None] = print
) -> tuple[dict[str, float], dict[str, dict[str, Any]], dict[str, Any]]:
    """``--rho auto``: :func:`sharpness.find_rho` for every optimizer of ``config`` that takes a
    radius (:func:`radius_field`), before the runs: from the first seed's initial weights, on a
    validation split of the training set (:func:`validation_split`, ``val_fraction``, noisy labels
    as a practitioner has them; the rest in batches of ``batch_size``, shuffled with the first
    seed), with the optimizer the run will use (its learning rate, ``total_steps``)
    and at most ``rho_budget`` × one run's steps (``epochs × batches per epoch``). find_rho's default
    grid (0.01–1, ×10 for ASAM, ×3 for Momentum-SAM), thinned by :func:`search_grid` when the budget is small. Prints each
    table; returns ``(picks, reports, searches)``: the radius per optimizer, the JSON-ready report
    per optimizer (the rows, steps, seconds and the fraction of the run's steps) and the
    :class:`~sharpness.rho_finder.RhoSearch` objects (for the plot)."""
    from sharpness.rho_finder import DEFAULT_GRID, find_rho, radius_scale

    seed = config.first_seed
    device = torch.device(config.device)
    model = build_model(data.x_train.shape[1], data.num_classes, config.hidden, config.depth, config.model)
    model.load_state_dict(initial_state(config, data, seed))
    model.to(device)
    n = data.x_train.shape[0]
    run_steps = config.epochs * math.ceil(n / config.batch_size)
    budget = math.floor(config.rho_budget * run_steps)
    split = validation_split(data, config.val_fraction, config.data_seed)
    order = torch.randperm(len(split.y_train), generator=torch.Generator().manual_seed(seed)).to(device)
    size = config.batch_size
    batches = [(split.x_train[order[i : i + size]], split.y_train[order[i : i + size]])
               for i in range(0, len(order), size)]
    val_batches = [(split.x_test[i : i + 256], split.y_test[i : i + 256]) for i in range(0, len(split.y_test), 256)]

    def loss_fn(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        return F.cross_entropy(model(batch[0]), batch[1], reduction="none")  # per sample: ESAM selects among them

    picks: dict[str, float] = {}
    reports: dict[str, dict[str, Any]] = {}
    searches: dict[str, Any] = {}
    trial = replace(config, optimizer_rhos=())
    for name in config.optimizers:
        field_name = radius_field(name)
        if field_name is None:
            continue

        def make(params: Any, rho: float, name: str = name, field_name: str = field_name) -> torch.optim.Optimizer:
            changes: dict[str, Any] = {field_name: rho}
            return make_optimizer(name, params, replace(trial, **changes), run_steps, n)

        scale = radius_scale(make(model.parameters(), DEFAULT_GRID[0]))  # ×10 for ASAM (×3 Momentum-SAM): find_rho's default grid
        grid = [rho * scale for rho in DEFAULT_GRID]
        with warnings.catch_warnings():  # its notes are in the table printed below
            warnings.simplefilter("ignore", RuntimeWarning)
            search = find_rho(model, make, loss_fn, batches, val_batches=val_batches, grid=search_grid(budget, grid),
                              budget_steps=budget, seed=seed)
        picks[name] = search.rho
        searches[name] = search
        reports[name] = {
            "rho": search.rho, "cliff": search.cliff, "rows": search.rows, "steps": search.steps,
            "budget_steps": search.budget_steps, "run_steps": run_steps, "steps_fraction": search.steps / run_steps,
            "seconds": search.seconds, "notes": search.notes,
        }
        thinned = len(search.rows) < len(grid)
        print_fn(f"--rho auto, {name}: find_rho within {budget} steps ({100 * config.rho_budget:g}% of a run's "
                 f"{run_steps}); {field_name} -> {search.rho:g}"
                 + (f" (the budget holds {len(search.rows)} of the grid's {len(grid)} radii, "
                    f"{search.steps_per_candidate} steps each: a rough pick; longer runs give the search more)"
                    if thinned else ""))
        print_fn(search.table())
    return picks, reports, searches


def make_optimizer(
    name: str, params: Any, config: DemoConfig, total_steps: int | None = None, num_data: int | None = None
) -> torch.optim.Optimizer:
    """``sgd``: ``torch.optim.SGD``; ``sam``: :class:`sharpness.SAM` around it with ``rho``;
    ``asam``: the same with ``adaptive=True``, ``asam_rho`` and ``asam_eta``; ``looksam`` and
    ``everyk``: :class:`sharpness.LookSAM` (``every_k``, α=0.7) and :class:`sharpness.EveryKSAM`
    (``every_k``: the same number of second passes, the baseline at LookSAM's cost) with ``rho``;
    ``aesam``: :class:`sharpness.AESAM` (the paper's δ, λ₁, λ₂ over ``total_steps``); ``esam``:
    :class:`sharpness.ESAM` (β=0.6, γ=0.5, the official defaults; ρ·β, so that its perturbation,
    scaled by 1/β, has SAM's norm);
    ``sampa``: :class:`sharpness.SAMPa` (λ=0.2); ``saf`` and ``mesa``: ``torch.optim.SGD``, their
    loss term comes from :func:`make_regularizer`; ``gsam`` (ρ from ``rho`` down to ``rho/10``
    with the learning rate, α=0.1), ``friendly`` (σ=1, λ=0.9), ``wsam`` (γ=0.9), ``rsam``
    (the official code's σ=1.5e-3 relative to each filter's norm, λ=2), ``monge``, ``ssamd``
    (sparsity 0.5, mask updated every epoch), ``gam``, ``crsam`` and ``lets`` (ρ learned on a
    held-out 10% of the training set) around the same SGD;
    ``lightsam`` (AdaGrad-Norm form, η=0.1), ``adasam`` (lr 1e-3) and ``bsam`` (its defaults,
    ``num_data``): standalone optimizers with their own update. Same base settings; one ``rho``
    for SAM's relatives (ASAM has its own); a radius found by ``--rho auto`` (``optimizer_rhos``)
    replaces it."""
    config = with_radius(name, config)
    base: dict[str, Any] = dict(lr=learning_rate(name, config), momentum=config.momentum, weight_decay=config.weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, **base)
    from sharpness import SAM

    if name == "sam":
        return SAM(params, torch.optim.SGD, rho=config.rho, **base)
    if name == "asam":
        return SAM(params, torch.optim.SGD, rho=config.asam_rho, adaptive=True, eta=config.asam_eta, **base)
    if name == "looksam":  # the paper's defaults: a SAM step every 5, alpha 0.7
        from sharpness import LookSAM

        return LookSAM(params, torch.optim.SGD, k=config.every_k, alpha=0.7, rho=config.rho, **base)
    if name == "everyk":  # the baseline of the efficient variants, at LookSAM's cost
        from sharpness import EveryKSAM

        return EveryKSAM(params, torch.optim.SGD, k=config.every_k, rho=config.rho, **base)
    if name == "aesam":
        from sharpness import AESAM

        if total_steps is None:
            raise ValueError("aesam needs total_steps (its threshold schedule runs over the whole training)")
        return AESAM(params, torch.optim.SGD, total_steps=total_steps, rho=config.rho, **base)
    if name == "esam":
        from sharpness import ESAM

        # ESAM scales e by 1/β; ρ·β gives its perturbation SAM's norm, the radius tuned here
        return ESAM(params, torch.optim.SGD, beta=0.6, gamma=0.5, rho=config.rho * 0.6, **base)
    if name == "sampa":
        from sharpness import SAMPa

        return SAMPa(params, torch.optim.SGD, rho=config.rho, lam=0.2, **base)
    if name in REGULARIZED:
        return torch.optim.SGD(params, **base)
    import sharpness

    # The SAM family's "better perturbation" methods around the same SGD, at SAM's radius, with
    # their papers' other defaults.
    wrapped = {
        "gsam": lambda: sharpness.GSAM(params, torch.optim.SGD, rho=config.rho, rho_min=config.rho / 10, alpha=0.1, **base),
        "friendly": lambda: sharpness.FriendlySAM(params, torch.optim.SGD, rho=config.rho, sigma=1.0, lam=0.9, **base),
        "wsam": lambda: sharpness.WSAM(params, torch.optim.SGD, rho=config.rho, gamma=0.9, **base),
        "rsam": lambda: sharpness.RandomSAM(params, torch.optim.SGD, rho=config.rho, **base),
        "monge": lambda: sharpness.MongeSAM(params, torch.optim.SGD, rho=config.rho, **base),
        "ssamd": lambda: sharpness.SSAMD(params, torch.optim.SGD, rho=config.rho, sparsity=0.5, **base),
        "gam": lambda: sharpness.GAM(params, torch.optim.SGD, rho=config.rho, **base),
        "crsam": lambda: sharpness.CRSAM(params, torch.optim.SGD, rho=config.rho, **base),
        "lets": lambda: sharpness.LETS(params, torch.optim.SGD, rho=config.rho, **base),
        # standalone optimizers, with their own update rule and learning rate
        "lightsam": lambda: sharpness.LightSAM(params, lr=0.1, rho=config.rho),
        "adasam": lambda: sharpness.AdaSAM(params, lr=1e-3, rho=config.rho),
        "bsam": lambda: sharpness.BayesianSAM(params, num_data=num_data or 1),
    }
    if name in wrapped:
        return wrapped[name]()
    raise ValueError(f"unknown optimizer {name!r}; choose from {OPTIMIZERS}")


def make_regularizer(name: str, model: nn.Module, num_samples: int, num_classes: int) -> Any:
    """The loss term of ``saf`` (:class:`sharpness.SAF`: KL to the logits recorded 2 epochs
    earlier) or ``mesa`` (:class:`sharpness.MESA`: KL to an EMA of the model), else None. The
    official λ and τ; the term starts after epoch 5 (SAF) or 3 (MESA); MESA's EMA decay is 0.99
    per step (the official 0.9998 is for 200-epoch ImageNet runs: over this demo's ~1,600 steps its
    EMA would hardly leave the initial weights)."""
    from sharpness import MESA, SAF

    if name == "saf":
        return SAF(num_samples, num_classes, lam=0.3, temperature=5.0, lag=2, start_epoch=5,
                   device=next(model.parameters()).device)
    if name == "mesa":
        return MESA(model, decay=0.99, lam=0.8, temperature=5.0, start_epoch=3)
    return None


def _held_out(data: Dataset, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Indices of the training examples split in two, stratified on the noisy labels."""
    from sklearn.model_selection import train_test_split

    fit, val = train_test_split(torch.arange(len(data.y_train)).numpy(), test_size=fraction, random_state=seed,
                                stratify=data.y_train.cpu().numpy())
    return torch.as_tensor(fit), torch.as_tensor(val)


def make_scheduler(optimizer: torch.optim.Optimizer, config: DemoConfig, steps_per_epoch: int) -> Any:
    """The LR schedule, stepped once per mini-batch: cosine to 0, or ×0.1 at 50% and 75%."""
    total = config.epochs * steps_per_epoch
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    if config.schedule == "step":
        milestones = [total // 2, (3 * total) // 4]
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


# -- one run ----------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)``, in eval mode."""
    was_training = model.training
    model.eval()
    logits = model(x)
    loss = F.cross_entropy(logits, y).item()
    accuracy = (logits.argmax(dim=1) == y).float().mean().item()
    model.train(was_training)
    return loss, accuracy


def train_run(
    config: DemoConfig,
    data: Dataset,
    optimizer_name: str,
    seed: int,
    init: dict[str, Tensor] | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    keep_model: bool = False,
) -> dict[str, Any]:
    """Trains one model with one optimizer and returns its final metrics and per-epoch history.

    ``init`` (from :func:`initial_state`) gives the starting weights; the mini-batch order comes
    from ``seed`` alone, so every optimizer of a seed sees the same batches. The final model's
    sharpness is measured by :func:`measure_model` (not counted in the time per epoch);
    ``keep_model=True`` adds the trained model under ``"model"``.
    """
    from sharpness import SAM
    from sharpness.methods.ssam import SSAMD

    device = torch.device(config.device)
    if init is None:
        init = initial_state(config, data, seed)
    model = build_model(data.x_train.shape[1], data.num_classes, config.hidden, config.depth, config.model)
    model.load_state_dict(init)
    model.to(device)
    pool = torch.arange(data.x_train.shape[0])  # the training examples the optimizer sees
    if optimizer_name == "lets":  # LETS learns rho on held-out data: 10% of the training set
        pool, validation = _held_out(data, 0.1, seed)
        val_order = torch.Generator().manual_seed(seed + 1)
    n = len(pool)
    steps_per_epoch = math.ceil(n / config.batch_size)
    optimizer = make_optimizer(optimizer_name, model.parameters(), config, config.epochs * steps_per_epoch, n)
    scheduler = make_scheduler(optimizer, config, steps_per_epoch)
    is_sam = optimizer_name != "sgd" and optimizer_name not in REGULARIZED
    regularizer = make_regularizer(optimizer_name, model, data.x_train.shape[0], data.num_classes)
    if optimizer_name == "mesa":
        regularizer.attach(optimizer)  # the EMA follows every step
    order = torch.Generator().manual_seed(seed)
    x_train, y_train = data.x_train, data.y_train

    history: dict[str, list[float]] = {"train_loss": [], "test_accuracy": [], "epoch_seconds": []}
    model.train()
    for epoch in range(config.epochs):
        start = time.perf_counter()
        permutation = pool[torch.randperm(n, generator=order)].to(device)
        if optimizer_name == "ssamd":  # SSAM-D: drop and regrow its mask once per epoch
            assert isinstance(optimizer, SSAMD)  # what make_optimizer builds for "ssamd"
            optimizer.update_mask(epoch / config.epochs)
        total_loss = torch.zeros((), device=device)
        for i in range(0, n, config.batch_size):
            index = permutation[i : i + config.batch_size]
            x, y = x_train[index], y_train[index]

            def closure(x: Tensor = x, y: Tensor = y, index: Tensor = index, epoch: int = epoch) -> Tensor:
                optimizer.zero_grad()
                logits = model(x)
                loss = F.cross_entropy(logits, y)
                if optimizer_name == "saf":
                    (loss + regularizer.loss(logits, index, epoch)).backward()
                elif optimizer_name == "mesa":
                    (loss + regularizer.loss(logits, x, epoch)).backward()
                else:
                    loss.backward()
                return loss

            def per_sample(indices: Tensor | None = None, x: Tensor = x, y: Tensor = y) -> Tensor:
                if indices is not None:
                    x, y = x[indices], y[indices]
                return F.cross_entropy(model(x), y, reduction="none")

            if optimizer_name == "esam":  # its data selection ranks samples by their losses
                assert isinstance(optimizer, SAM)  # make_optimizer's SAM family (is_sam)
                loss = optimizer.step(per_sample)
            elif optimizer_name == "lets":
                v = validation[torch.randint(len(validation), (config.batch_size,), generator=val_order)].to(device)

                def val_closure(v: Tensor = v) -> Tensor:
                    optimizer.zero_grad()
                    loss = F.cross_entropy(model(x_train[v]), y_train[v])
                    loss.backward()
                    return loss

                assert isinstance(optimizer, SAM)
                loss = optimizer.step(closure, val_closure)
            elif is_sam:
                assert isinstance(optimizer, SAM)
                loss = optimizer.step(closure)
            else:
                loss = closure()
                optimizer.step()
            assert loss is not None  # step(closure) returns the closure's loss
            scheduler.step()
            total_loss += loss.detach() * len(index)
        mean_loss = total_loss.item() / n  # the one synchronisation of the epoch
        seconds = time.perf_counter() - start
        _, test_accuracy = evaluate(model, data.x_test, data.y_test)
        history["train_loss"].append(mean_loss)  # running mean over the epoch, noisy labels
        history["test_accuracy"].append(test_accuracy)
        history["epoch_seconds"].append(seconds)
        if on_epoch is not None:
            on_epoch({"epoch": epoch + 1, "loss": mean_loss, "test_acc": test_accuracy})

    train_loss, train_accuracy = evaluate(model, x_train, y_train)
    test_loss, test_accuracy = evaluate(model, data.x_test, data.y_test)
    with torch.no_grad():
        model.eval()
        predicted = model(x_train).argmax(dim=1)
    wrong = data.noisy_mask.to(device) & (y_train != data.y_train_clean.to(device))
    memorized = (predicted[wrong] == y_train[wrong]).float().mean().item() if wrong.any() else None
    clean_accuracy = (predicted == data.y_train_clean.to(device)).float().mean().item()
    model.train()
    sharp = measure_model(model, data, config)
    result = {
        "optimizer": optimizer_name,
        "seed": seed,
        "test_accuracy": test_accuracy,
        "test_loss": test_loss,
        "train_loss": train_loss,  # final, full pass, on the noisy labels
        "train_accuracy": train_accuracy,  # on the noisy labels
        "train_accuracy_clean": clean_accuracy,  # on the true labels
        "memorized": memorized,  # fraction of the wrong labels the model reproduces (None: none)
        # the median: robust to the first epoch's warm-up and to other work on a shared machine
        "seconds_per_epoch": statistics.median(history["epoch_seconds"]),
        **sharp,
        "history": history,
    }
    if keep_model:
        result["model"] = model
    return result


def measurement_batches(data: Dataset, config: DemoConfig) -> list[tuple[Tensor, Tensor]]:
    """The fixed training subset the sharpness is measured on: the first ``measure_size``
    training examples with their (noisy) labels, in batches of ``measure_m``."""
    n = min(config.measure_size, data.x_train.shape[0])
    x, y = data.x_train[:n], data.y_train[:n]
    return [(x[i : i + config.measure_m], y[i : i + config.measure_m]) for i in range(0, n, config.measure_m)]


def measure_model(model: nn.Module, data: Dataset, config: DemoConfig) -> dict[str, float | None]:
    """m-sharpness (radius ``measure_rho``, batches of ``measure_m``, ``measure_steps`` ascent
    steps) and the top Hessian eigenvalue (``hessian_iters`` power iterations, tolerance 1e-3,
    directions seeded) of ``model`` on :func:`measurement_batches`; None when switched off."""
    if config.measure_size == 0:
        return {"m_sharpness": None, "lambda_max": None}
    from sharpness import measure

    batches = measurement_batches(data, config)
    generator = torch.Generator().manual_seed(config.landscape_seed)
    return {
        "m_sharpness": measure.m_sharpness(
            model, F.cross_entropy, batches, rho=config.measure_rho, steps=config.measure_steps, generator=generator
        ),
        "lambda_max": measure.hessian_max_eigenvalue(
            model, F.cross_entropy, batches, iters=config.hessian_iters, tol=1e-3, generator=generator
        ),
    }


# -- the grid and the report ----------------------------------------------------------------------


def _mean_std(values: Sequence[float | None]) -> dict[str, float | None]:
    """Mean, sample standard deviation (0 for one value) and the half-width of the 95% confidence
    interval of the mean (Student's t; None for one value) of the values that are not None."""
    present = [v for v in values if v is not None]
    if not present:
        return {"mean": None, "std": None, "ci95": None}
    std = statistics.stdev(present) if len(present) > 1 else 0.0
    return {"mean": statistics.fmean(present), "std": std, "ci95": _ci95(std, len(present))}


def _ci95(std: float, n: int) -> float | None:
    """Half-width of the 95% confidence interval of a mean of ``n`` values: t(0.975, n−1)·s/√n."""
    if n < 2:
        return None
    from scipy.stats import t  # scikit-learn's dependency: there whenever the demo runs

    return float(t.ppf(0.975, n - 1)) * std / math.sqrt(n)


def summarize(runs: Sequence[dict[str, Any]], optimizers: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per optimizer: mean and standard deviation over seeds of the final metrics, and seconds per
    epoch relative to SGD's (to the first optimizer's when SGD did not run)."""
    summary: dict[str, dict[str, Any]] = {}
    for name in optimizers:
        mine = [r for r in runs if r["optimizer"] == name]
        entry: dict[str, Any] = {"seeds": len(mine)}
        for key in METRICS:
            entry[key] = _mean_std([r[key] for r in mine])
        summary[name] = entry
    reference = time_reference(optimizers)
    base = summary[reference]["seconds_per_epoch"]["mean"]
    for entry in summary.values():
        entry["relative_time"] = entry["seconds_per_epoch"]["mean"] / base if base > 0 else None
    return summary


def time_reference(optimizers: Sequence[str]) -> str:
    """The optimizer whose time per epoch the others are compared to: SGD, or the first one."""
    return "sgd" if "sgd" in optimizers else optimizers[0]


def _label(name: str, config: DemoConfig) -> str:
    config = with_radius(name, config)
    if name == "sam":
        return f"SAM (rho={config.rho:g})"
    if name == "asam":
        return f"ASAM (rho={config.asam_rho:g}, eta={config.asam_eta:g})"
    if name == "looksam":
        return f"LookSAM (rho={config.rho:g}, k={config.every_k}, alpha=0.7)"
    if name == "everyk":
        return f"SAM every {config.every_k} steps (rho={config.rho:g})"
    if name == "aesam":
        return f"AE-SAM (rho={config.rho:g})"
    if name == "esam":
        return f"ESAM (rho={config.rho:g}·beta, beta=0.6, gamma=0.5)"
    if name == "sampa":
        return f"SAMPa (rho={config.rho:g}, lambda=0.2)"
    if name == "saf":
        return "SAF (SGD + KL to 2-epoch-old logits)"
    if name == "mesa":
        return "MESA (SGD + KL to an EMA model)"
    labels = {
        "gsam": f"GSAM (rho={config.rho:g}→{config.rho / 10:g}, alpha=0.1)",
        "friendly": f"Friendly SAM (rho={config.rho:g}, sigma=1, lambda=0.9)",
        "wsam": f"WSAM (rho={config.rho:g}, gamma=0.9)",
        "rsam": f"Random SAM (rho={config.rho:g}, sigma=1.5e-3, lambda=2)",
        "monge": f"Monge SAM (rho={config.rho:g})",
        "ssamd": f"SSAM-D (rho={config.rho:g}, sparsity 0.5)",
        "gam": f"GAM (rho={config.rho:g})",
        "crsam": f"CR-SAM (rho={config.rho:g})",
        "lets": f"LETS (rho₀={config.rho:g}, 90% of the data)",
        "lightsam": f"LightSAM (AdaGrad-Norm, rho={config.rho:g}, lr 0.1)",
        "adasam": f"AdaSAM (rho={config.rho:g}, lr 1e-3)",
        "bsam": "Bayesian SAM (defaults)",
    }
    if name in labels:
        return labels[name]
    return "SGD"


def format_table(summary: dict[str, dict[str, Any]], config: DemoConfig) -> str:
    """The printed report: one row per optimizer."""
    headers = ("optimizer", "test acc (%)", "train loss (noisy)", "memorized (%)", "m-sharpness",
               "λ_max", "time/epoch")
    rows = []
    for name, entry in summary.items():
        acc, loss, mem = entry["test_accuracy"], entry["train_loss"], entry["memorized"]
        sharp, top = entry["m_sharpness"], entry["lambda_max"]
        relative = entry["relative_time"]
        rows.append(
            (
                _label(name, config),
                f"{100 * acc['mean']:.2f} ± {100 * acc['std']:.2f}"
                + ("" if acc["ci95"] is None else f" [±{100 * acc['ci95']:.2f}]"),
                f"{loss['mean']:.3f} ± {loss['std']:.3f}",
                "n/a" if mem["mean"] is None else f"{100 * mem['mean']:.1f}",
                "n/a" if sharp["mean"] is None else f"{sharp['mean']:.4f} ± {sharp['std']:.4f}",
                "n/a" if top["mean"] is None else f"{top['mean']:.3f} ± {top['std']:.3f}",
                ("n/a" if relative is None else f"{relative:.2f}x")
                + f" ({1000 * entry['seconds_per_epoch']['mean']:.0f} ms)",
            )
        )
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(row) for row in rows]
    seeds = next(iter(summary.values()))["seeds"]
    out.append(
        f"mean ± std over {seeds} seed(s) [test acc: ± half-width of the 95% interval of the mean]; "
        f"{config.epochs} epochs, "
        + (
            "lr " + ", ".join(f"{n} {learning_rate(n, config):g}" for n in summary) + " (tuned)"
            if config.optimizer_lrs
            else f"lr {config.lr:g}"
        )
        + f", batch "
        f"{config.batch_size}, {config.schedule} schedule, {100 * config.label_noise:g}% of the "
        "training labels randomised\nmemorized: the wrong training labels the model reproduces; "
        f"time: median per epoch, relative to {_label(time_reference(list(summary)), config)}"
        + (
            f"\nsharpness of the final models on {config.measure_size} training examples (noisy labels): "
            f"m-sharpness with rho={config.measure_rho:g}, m={config.measure_m}, {config.measure_steps} "
            f"ascent steps; λ_max: top Hessian eigenvalue, {config.hessian_iters} power iterations"
            if config.measure_size
            else ""
        )
    )
    return "\n".join(out)


def run_demo(
    config: DemoConfig,
    out_dir: str | os.PathLike[str] | None = None,
    print_fn: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Runs every optimizer for every seed, prints the table, writes ``results.json`` into
    ``out_dir`` when given, and returns the results (config, dataset, runs, summary).

    Raises :class:`MissingRequirement` before any training when a package it will need is not
    installed (:func:`check_requirements`)."""
    check_requirements(config, report=out_dir is not None)
    set_threads(config.threads)
    data = load_noisy_digits(config.label_noise, config.test_fraction, config.data_seed).to(config.device)
    info = data.info
    tuning = None
    if config.tune:
        chosen, scores = tune_learning_rates(config, data, print_fn, _progress_factory(config.progress))
        config = replace(config, optimizer_lrs=tuple(chosen.items()))
        tuning = {"lrs": list(config.tune_lrs), "val_fraction": config.val_fraction, "chosen": chosen,
                  "val_accuracy": scores}
    rho_search: dict[str, dict[str, Any]] | None = None
    searches: dict[str, Any] = {}
    if config.rho_auto:
        picks, rho_search, searches = find_radii(config, data, print_fn)
        config = replace(config, optimizer_rhos=tuple(picks.items()))
    print_fn(
        f"digits: {info['train_size']} train / {info['test_size']} test; {info['randomized']} training "
        f"labels randomised ({info['wrong_labels']} now wrong); {describe_model(config, info['features'])}; "
        f"{config.seeds} seed(s) × {', '.join(config.optimizers)}"
    )
    progress = _progress_factory(config.progress)
    runs = []
    final_models: dict[str, nn.Module] = {}
    started = time.perf_counter()
    for seed in range(config.first_seed, config.first_seed + config.seeds):
        init = initial_state(config, data, seed)
        for name in config.optimizers:
            with progress(total=config.epochs, desc=f"{name:>4} seed {seed}", unit="ep", leave=False) as bar:

                def on_epoch(metrics: dict[str, float], bar: Any = bar) -> None:
                    bar.set_postfix(loss=f"{metrics['loss']:.3f}", test_acc=f"{metrics['test_acc']:.3f}")
                    bar.update(1)

                run = train_run(config, data, name, seed, init=init, on_epoch=on_epoch,
                                keep_model=out_dir is not None and seed == config.first_seed
                                and config.measure_size > 0)
            if "model" in run:
                final_models[name] = run.pop("model")
            runs.append(run)
            if rho_search is not None and name in rho_search and seed == config.first_seed:
                report = rho_search[name]  # the search's cost against the run it preceded
                report["run_seconds"] = sum(run["history"]["epoch_seconds"])
                report["seconds_fraction"] = report["seconds"] / report["run_seconds"]
            print_fn(
                f"{name:>4} seed {seed}: test acc {100 * run['test_accuracy']:.2f}%, train loss "
                f"{run['train_loss']:.3f}, {run['seconds_per_epoch'] * 1000:.0f} ms/epoch"
            )
    landscapes = landscapes_of(final_models, data, config, progress) if final_models else None
    wall = time.perf_counter() - started
    summary = summarize(runs, config.optimizers)
    print_fn("")
    print_fn(format_table(summary, config))
    if rho_search is not None:
        print_fn(format_rho_search(rho_search))
    print_fn(f"total {wall:.1f} s")
    results = {
        "config": asdict(config),
        "dataset": info,
        "environment": {
            "torch": torch.__version__,
            "sharpness": _version(),
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
        },
        "runs": runs,
        "summary": summary,
        "wall_seconds": wall,
    }
    if tuning is not None:
        results["tuning"] = tuning
    if rho_search is not None:
        results["rho_search"] = rho_search
    if landscapes is not None:
        results["landscapes"] = landscapes
    if out_dir is not None:
        write_report(results, config, out_dir, print_fn, searches=searches)
    return results


def format_rho_search(reports: dict[str, dict[str, Any]]) -> str:
    """One line per searched optimizer: the pick and what the search cost against the run it preceded."""
    lines = []
    for name, report in reports.items():
        seconds = report.get("seconds_fraction")
        lines.append(
            f"--rho auto, {name}: rho {report['rho']:g}; search {report['steps']} steps = "
            f"{100 * report['steps_fraction']:.1f}% of the run's {report['run_steps']}, {report['seconds']:.1f} s"
            + ("" if seconds is None else f" = {100 * seconds:.1f}% of the first run's training time")
        )
    return "\n".join(lines)


def run_models(
    config: DemoConfig,
    models: Sequence[str] = DEFAULT_MODELS,
    out_dir: str | os.PathLike[str] | None = None,
    print_fn: Callable[[str], None] = print,
) -> dict[str, dict[str, Any]]:
    """:func:`run_demo` for every network of ``models`` (``config.model`` replaced), in order.

    The report: with one model, ``out_dir`` holds its files; with several, ``out_dir/<model>/``
    holds each one's and ``out_dir`` itself ``summary.csv`` and ``summary.json`` with the rows of
    every model (a ``model`` column first). Returns ``{model: results}``."""
    if not models:
        raise ValueError("models is empty")
    unknown = [m for m in models if m not in MODELS]
    if unknown or len(set(models)) != len(models):
        raise ValueError(f"models must be distinct names from {MODELS}, got {list(models)}")
    check_requirements(config, report=out_dir is not None)
    several = len(models) > 1
    results: dict[str, dict[str, Any]] = {}
    for model in models:
        if several:
            print_fn(f"== {model} ==")
        sub = None if out_dir is None else (os.path.join(out_dir, model) if several else out_dir)
        results[model] = run_demo(replace(config, model=model), out_dir=sub, print_fn=print_fn)
    if several and out_dir is not None:
        rows = []
        for model, r in results.items():
            tuned = tuple((name, float(lr)) for name, lr in r["config"]["optimizer_lrs"])
            found = tuple((name, float(rho)) for name, rho in r["config"]["optimizer_rhos"])
            rows += table_rows(r["summary"], replace(config, model=model, optimizer_lrs=tuned, optimizer_rhos=found),
                               model=model)
        for path in write_table(rows, out_dir):
            print_fn(f"wrote {path}")
    return results


def landscapes_of(
    models: dict[str, nn.Module], data: Dataset, config: DemoConfig, progress: Callable[..., Any] | None = None
) -> dict[str, Any]:
    """1-D and 2-D filter-normalised loss landscapes (:mod:`sharpness.measure`) of the given final
    models on :func:`measurement_batches` (all of it as one batch): the same grid for every
    model, directions drawn from the same seed (``landscape_seed``), each normalised to its own
    model's filters. Returns JSON-ready lists."""
    from sharpness import measure

    x = data.x_train[: config.measure_size]
    y = data.y_train[: config.measure_size]
    batches = [(x, y)]
    out: dict[str, Any] = {"span": config.landscape_span, "seed": config.landscape_seed, "1d": {}, "2d": {}}
    progress = progress or _progress_factory(False)
    with progress(total=len(models), desc="landscapes", unit="model", leave=False) as bar:
        for name, model in models.items():
            model.eval()
            line = measure.loss_landscape_1d(
                model, F.cross_entropy, batches, steps=2 * config.landscape_steps - 1, span=config.landscape_span,
                generator=torch.Generator().manual_seed(config.landscape_seed),
            )
            plane = measure.loss_landscape_2d(
                model, F.cross_entropy, batches, steps=config.landscape_steps, span=config.landscape_span,
                generator=torch.Generator().manual_seed(config.landscape_seed + 1),
            )
            out["1d"][name] = {"alphas": line["alphas"].tolist(), "losses": line["losses"].tolist()}
            out["2d"][name] = {
                "alphas": plane["alphas"].tolist(), "betas": plane["betas"].tolist(),
                "losses": plane["losses"].tolist(),
            }
            bar.update(1)
    return out


#: The columns of ``summary.csv``: one row per optimizer, the mean and std over seeds of each.
CSV_METRICS = METRICS


def table_rows(
    summary: dict[str, dict[str, Any]], config: DemoConfig, model: str | None = None
) -> list[dict[str, Any]]:
    """The table as flat records, one per optimizer (the rows of ``summary.csv`` and
    ``summary.json``): ``model`` (when given), ``optimizer``, ``label``, ``lr``, ``seeds``, then
    ``<metric>_mean`` and ``<metric>_std`` for every metric of :data:`CSV_METRICS` (None where
    not measured) and ``relative_time`` (seconds per epoch over SGD's)."""
    rows = []
    for name, entry in summary.items():
        row: dict[str, Any] = {} if model is None else {"model": model}
        row.update(optimizer=name, label=_label(name, config), lr=learning_rate(name, config), seeds=entry["seeds"])
        for metric in CSV_METRICS:
            for stat in ("mean", "std"):
                row[f"{metric}_{stat}"] = entry[metric][stat]
        row["relative_time"] = entry["relative_time"]
        rows.append(row)
    return rows


def write_table(rows: Sequence[dict[str, Any]], out_dir: str | os.PathLike[str]) -> list[str]:
    """Writes ``rows`` (from :func:`table_rows`) as ``summary.csv`` and ``summary.json`` into
    ``out_dir``; returns the two paths."""
    import csv

    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, "summary.csv")
    with open(csv_path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else (repr(v) if isinstance(v, float) else v) for k, v in row.items()})
    json_path = os.path.join(out_dir, "summary.json")
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(_finite(list(rows)), f, indent=2, allow_nan=False)
    return [csv_path, json_path]


def write_report(
    results: dict[str, Any], config: DemoConfig, out_dir: str | os.PathLike[str],
    print_fn: Callable[[str], None] = print, searches: dict[str, Any] | None = None,
) -> list[str]:
    """Writes into ``out_dir``: ``results.json`` (everything), ``summary.csv`` and
    ``summary.json`` (the table, one row per optimizer, :func:`table_rows`), ``accuracy.png``
    (test accuracy per epoch, mean ± std over seeds), when the results hold landscapes,
    ``landscape_1d.png`` and ``landscape_2d.png`` (one colour scale), and with ``searches``
    (``--rho auto``'s :class:`~sharpness.rho_finder.RhoSearch` per optimizer) ``rho_search.png``.
    Returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    path = os.path.join(out_dir, "results.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(_finite(results), f, indent=2, allow_nan=False)
    written.append(path)
    written += write_table(table_rows(results["summary"], config), out_dir)
    try:
        from sharpness import plots
    except ImportError as err:  # pragma: no cover - matplotlib missing
        print_fn(f"no plots: {err}")
    else:
        labels = {name: _label(name, config) for name in config.optimizers}
        histories = {
            name: [r["history"]["test_accuracy"] for r in results["runs"] if r["optimizer"] == name]
            for name in config.optimizers
        }
        noise = f"{config.model.upper()}, {100 * config.label_noise:g}% label noise"
        path = os.path.join(out_dir, "accuracy.png")
        plots.plot_accuracy(histories, labels, path, title=f"digits, {noise}: test accuracy per epoch")
        written.append(path)
        landscapes = results.get("landscapes")
        if landscapes:
            seed = config.first_seed
            path = os.path.join(out_dir, "landscape_1d.png")
            plots.plot_landscape_1d(landscapes["1d"], labels, path,
                                    title=f"1-D loss landscape of the final models (seed {seed}, {noise})")
            written.append(path)
            path = os.path.join(out_dir, "landscape_2d.png")
            plots.plot_landscape_2d(landscapes["2d"], labels, path,
                                    title=f"2-D loss landscape of the final models (seed {seed}, {noise}), "
                                    "filter-normalised directions, one colour scale")
            written.append(path)
        if searches:
            path = os.path.join(out_dir, "rho_search.png")
            plots.plot_rho_search(searches, path, title=f"--rho auto on digits, {noise}: each radius's short run")
            written.append(path)
    for path in written:
        print_fn(f"wrote {path}")
    return written


def _finite(value: Any) -> Any:
    """``value`` with every NaN or infinity (a diverged run) replaced by None: strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def set_threads(threads: int | None) -> None:
    """Runs torch's CPU ops on ``threads`` threads, and the native SAM kernels too when their
    thread pool has not started yet (``RAYON_NUM_THREADS``, unless already set). ``None`` leaves
    both as they are. The demo's model is tiny: one thread is the fastest and the steadiest on a
    shared machine, where more threads wait on each other."""
    if threads is None:
        return
    torch.set_num_threads(threads)
    os.environ.setdefault("RAYON_NUM_THREADS", str(threads))


def _version() -> str:
    try:
        from sharpness import __version__

        return __version__
    except ImportError:  # pragma: no cover
        return "unknown"


#: What the demo imports beyond torch, why, and the pip package that provides it.
REQUIREMENTS = {
    "sklearn.datasets": ("scikit-learn", "the digits data"),
    "matplotlib": ("matplotlib", "the report's plots"),
    "tqdm": ("tqdm", "the progress bars"),
}


class MissingRequirement(ImportError):
    """A package the demo will need is not installed; the message names it and the pip command."""


def requirements(config: DemoConfig, report: bool, stream: TextIO | None = None) -> list[str]:
    """The modules of :data:`REQUIREMENTS` that a run with ``config`` imports: scikit-learn
    always, matplotlib when it writes a report (``report``), tqdm when it draws progress bars
    (``config.progress`` and ``stream``, default ``sys.stderr``, a terminal: elsewhere the
    progress is plain lines, see :func:`_progress_factory`)."""
    needed = ["sklearn.datasets"]
    if report:
        needed.append("matplotlib")
    if config.progress and _is_terminal(stream):
        needed.append("tqdm")
    return needed


def check_requirements(config: DemoConfig, report: bool, stream: TextIO | None = None) -> None:
    """Imports every module of :func:`requirements` and raises :class:`MissingRequirement`,
    naming each missing package and the pip command that installs them, when one fails. The
    demo calls it before any training, so that a missing plotting library costs seconds, not
    the minutes of the runs before the report."""
    missing = []
    for module in requirements(config, report, stream):
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if not missing:
        return
    packages = [REQUIREMENTS[module][0] for module in missing]
    needs = ", ".join(f"{REQUIREMENTS[module][0]} ({REQUIREMENTS[module][1]})" for module in missing)
    without = []
    if "matplotlib" in missing:
        without.append("--no-report (no plots)")
    if "tqdm" in missing:
        without.append("--no-progress (no bars)")
    raise MissingRequirement(
        f"the demo needs {needs}, {'which is' if len(missing) == 1 else 'which are'} not installed; nothing was run. "
        f"Install: python -m pip install {' '.join(packages)} (everything the demo uses: python -m pip install "
        "'sharpness[demo]')" + "".join(f", or run with {option}" for option in without)
    )


#: Without a terminal (output to a log file or a pipe) progress is plain lines: one each time
#: another tenth of the work is done, at most one per this many seconds per bar.
PROGRESS_LINE_SECONDS = 10.0


def _is_terminal(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default ``sys.stderr``, where progress goes) is a terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def _progress_factory(enabled: bool, stream: TextIO | None = None) -> Callable[..., Any]:
    """The progress bar class the demo uses, called with tqdm's arguments: tqdm's bar when
    ``enabled`` and ``stream`` (default ``sys.stderr``) is a terminal; :class:`_LineProgress`
    (plain periodic lines) when it is a file or a pipe, where tqdm's carriage returns would pile
    up in one endless line; :class:`_NoProgress` when not ``enabled``."""
    if not enabled:
        return _NoProgress
    if _is_terminal(stream):
        try:
            from tqdm.auto import tqdm

            return tqdm
        except ImportError:  # check_requirements has said so before the runs: lines will do
            pass
    return functools.partial(_LineProgress, stream=stream)


class _NoProgress:
    """Stands in for a tqdm bar when progress is off."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __enter__(self) -> _NoProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass


class _LineProgress(_NoProgress):
    """A progress bar for logs, with tqdm's interface as the demo uses it: a plain line (no
    carriage return) each time another tenth of ``total`` is done, at most one per
    :data:`PROGRESS_LINE_SECONDS`, and a last one at the end when an earlier one was printed, e.g.
    ``sam seed 0: 20/40 ep (50%), 12 s, ~12 s left, loss=0.512, test_acc=0.913``."""

    def __init__(self, total: int | None = None, desc: str = "", unit: str = "it", stream: TextIO | None = None,
                 clock: Callable[[], float] = time.perf_counter, **_tqdm_options: Any) -> None:
        self.total, self.desc, self.unit, self.stream, self.clock = total, desc.strip(), unit, stream, clock
        self.count = 0
        self.postfix = ""
        self.started = self.last_line = clock()
        self.next_tenth = 1
        self.lines = 0

    def set_postfix(self, *args: Any, **values: Any) -> None:
        self.postfix = ", ".join(f"{key}={value}" for key, value in values.items())

    def update(self, n: int = 1) -> None:
        self.count += n
        if not self.total or 10 * self.count < self.next_tenth * self.total:
            return
        self.next_tenth = 10 * self.count // self.total + 1
        now = self.clock()
        finished = self.count >= self.total
        if now - self.last_line >= PROGRESS_LINE_SECONDS or (finished and self.lines):
            self._print_line(now)

    def _print_line(self, now: float) -> None:
        assert self.total  # update prints only with a total
        elapsed = now - self.started
        text = f"{self.desc}: {self.count}/{self.total} {self.unit} ({100 * self.count // self.total}%), {elapsed:.0f} s"
        if 0 < self.count < self.total:
            text += f", ~{elapsed * (self.total - self.count) / self.count:.0f} s left"
        if self.postfix:
            text += f", {self.postfix}"
        print(text, file=sys.stderr if self.stream is None else self.stream, flush=True)
        self.last_line = now
        self.lines += 1
