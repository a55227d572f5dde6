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
- the same MLP, from the same initial weights for a given seed, seeing the same mini-batches in
  the same order; the same learning rate, momentum, epochs and LR schedule for every optimizer;
- at the end: test accuracy, training loss and accuracy on the noisy labels, and how many of the
  wrong training labels the model reproduces (memorisation), plus the median seconds per epoch
  (training only, evaluation excluded).

The pieces are separate so that the experiment can grow (more models, datasets, measures of
sharpness, plots): :func:`load_noisy_digits` builds the data, :func:`build_model` the network,
:func:`make_optimizer` the optimizer, :func:`train_run` one training run, :func:`run_demo` the
grid of runs, :func:`summarize` and :func:`format_table` the report. :mod:`sharpness.cli` only
parses arguments and calls :func:`run_demo`.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

OPTIMIZERS = ("sgd", "sam", "asam")
#: The final metrics of a run, summarised over seeds.
METRICS = ("test_accuracy", "train_loss", "train_accuracy", "train_accuracy_clean", "memorized", "seconds_per_epoch")
SCHEDULES = ("cosine", "step", "constant")
NUM_CLASSES = 10


@dataclass(frozen=True)
class DemoConfig:
    """Every setting of the demo; the defaults are the main job's (see :mod:`sharpness.cli`)."""

    epochs: int = 40
    lr: float = 0.02
    rho: float = 0.3
    asam_rho: float = 4.0
    asam_eta: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 32
    schedule: str = "cosine"
    label_noise: float = 0.4
    test_fraction: float = 0.3
    hidden: int = 256
    depth: int = 2
    seeds: int = 3
    first_seed: int = 0
    data_seed: int = 0
    optimizers: tuple[str, ...] = ("sgd", "sam", "asam")
    device: str = "cpu"
    threads: int | None = 1
    progress: bool = True

    def __post_init__(self) -> None:
        unknown = [name for name in self.optimizers if name not in OPTIMIZERS]
        if unknown or not self.optimizers:
            raise ValueError(f"optimizers must be a non-empty list of {OPTIMIZERS}, got {list(self.optimizers)}")
        if len(set(self.optimizers)) != len(self.optimizers):
            raise ValueError(f"optimizers listed twice: {list(self.optimizers)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not 0.0 <= self.label_noise <= 1.0:
            raise ValueError(f"label_noise must be in [0, 1], got {self.label_noise}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        for name in ("epochs", "batch_size", "hidden", "depth", "seeds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        for name in ("lr", "rho", "asam_rho", "asam_eta", "momentum", "weight_decay"):
            value = getattr(self, name)
            if not (value >= 0.0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")


#: ``--quick``: a smoke test that exercises every code path in seconds.
QUICK = dict(epochs=2, seeds=1)


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
        tensors = {k: v.to(device) for k, v in vars(self).items() if isinstance(v, Tensor)}
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


def build_model(in_features: int, num_classes: int, hidden: int = 256, depth: int = 2) -> nn.Module:
    """An MLP: ``depth`` hidden layers of width ``hidden`` with ReLU (64→256→256→10 by default)."""
    layers: list[nn.Module] = []
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def initial_state(config: DemoConfig, data: Dataset, seed: int) -> dict[str, Tensor]:
    """The initial weights of ``seed``: every optimizer of a seed starts from these."""
    torch.manual_seed(seed)
    model = build_model(data.x_train.shape[1], data.num_classes, config.hidden, config.depth)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def make_optimizer(name: str, params: Any, config: DemoConfig) -> torch.optim.Optimizer:
    """``sgd``: ``torch.optim.SGD``; ``sam``: :class:`sharpness.SAM` around it with ``rho``;
    ``asam``: the same with ``adaptive=True``, ``asam_rho`` and ``asam_eta``. Same base settings."""
    base = dict(lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, **base)
    from sharpness import SAM

    if name == "sam":
        return SAM(params, torch.optim.SGD, rho=config.rho, **base)
    if name == "asam":
        return SAM(params, torch.optim.SGD, rho=config.asam_rho, adaptive=True, eta=config.asam_eta, **base)
    raise ValueError(f"unknown optimizer {name!r}; choose from {OPTIMIZERS}")


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
) -> dict[str, Any]:
    """Trains one model with one optimizer and returns its final metrics and per-epoch history.

    ``init`` (from :func:`initial_state`) gives the starting weights; the mini-batch order comes
    from ``seed`` alone, so every optimizer of a seed sees the same batches.
    """
    device = torch.device(config.device)
    if init is None:
        init = initial_state(config, data, seed)
    model = build_model(data.x_train.shape[1], data.num_classes, config.hidden, config.depth)
    model.load_state_dict(init)
    model.to(device)
    optimizer = make_optimizer(optimizer_name, model.parameters(), config)
    n = data.x_train.shape[0]
    steps_per_epoch = math.ceil(n / config.batch_size)
    scheduler = make_scheduler(optimizer, config, steps_per_epoch)
    is_sam = optimizer_name != "sgd"
    order = torch.Generator().manual_seed(seed)
    x_train, y_train = data.x_train, data.y_train

    history: dict[str, list[float]] = {"train_loss": [], "test_accuracy": [], "epoch_seconds": []}
    model.train()
    for epoch in range(config.epochs):
        start = time.perf_counter()
        permutation = torch.randperm(n, generator=order).to(device)
        total_loss = torch.zeros((), device=device)
        for i in range(0, n, config.batch_size):
            index = permutation[i : i + config.batch_size]
            x, y = x_train[index], y_train[index]

            def closure(x: Tensor = x, y: Tensor = y) -> Tensor:
                optimizer.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss

            if is_sam:
                loss = optimizer.step(closure)
            else:
                loss = closure()
                optimizer.step()
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
    return {
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
        "history": history,
    }


# -- the grid and the report ----------------------------------------------------------------------


def _mean_std(values: Sequence[float | None]) -> dict[str, float | None]:
    """Mean and sample standard deviation (0 for one value) of the values that are not None."""
    present = [v for v in values if v is not None]
    if not present:
        return {"mean": None, "std": None}
    std = statistics.stdev(present) if len(present) > 1 else 0.0
    return {"mean": statistics.fmean(present), "std": std}


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
    if name == "sam":
        return f"SAM (rho={config.rho:g})"
    if name == "asam":
        return f"ASAM (rho={config.asam_rho:g}, eta={config.asam_eta:g})"
    return "SGD"


def format_table(summary: dict[str, dict[str, Any]], config: DemoConfig) -> str:
    """The printed report: one row per optimizer."""
    headers = ("optimizer", "test acc (%)", "train loss (noisy)", "memorized (%)", "time/epoch")
    rows = []
    for name, entry in summary.items():
        acc, loss, mem = entry["test_accuracy"], entry["train_loss"], entry["memorized"]
        relative = entry["relative_time"]
        rows.append(
            (
                _label(name, config),
                f"{100 * acc['mean']:.2f} ± {100 * acc['std']:.2f}",
                f"{loss['mean']:.3f} ± {loss['std']:.3f}",
                "n/a" if mem["mean"] is None else f"{100 * mem['mean']:.1f}",
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
        f"mean ± std over {seeds} seed(s); {config.epochs} epochs, lr {config.lr:g}, batch "
        f"{config.batch_size}, {config.schedule} schedule, {100 * config.label_noise:g}% of the "
        "training labels randomised\nmemorized: the wrong training labels the model reproduces; "
        f"time: median per epoch, relative to {_label(time_reference(list(summary)), config)}"
    )
    return "\n".join(out)


def run_demo(
    config: DemoConfig,
    out_dir: str | os.PathLike[str] | None = None,
    print_fn: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Runs every optimizer for every seed, prints the table, writes ``results.json`` into
    ``out_dir`` when given, and returns the results (config, dataset, runs, summary)."""
    set_threads(config.threads)
    data = load_noisy_digits(config.label_noise, config.test_fraction, config.data_seed).to(config.device)
    info = data.info
    print_fn(
        f"digits: {info['train_size']} train / {info['test_size']} test; {info['randomized']} training "
        f"labels randomised ({info['wrong_labels']} now wrong); MLP {info['features']}→"
        + "→".join([str(config.hidden)] * config.depth)
        + f"→{data.num_classes}; {config.seeds} seed(s) × {', '.join(config.optimizers)}"
    )
    progress = _progress_factory(config.progress)
    runs = []
    started = time.perf_counter()
    for seed in range(config.first_seed, config.first_seed + config.seeds):
        init = initial_state(config, data, seed)
        for name in config.optimizers:
            with progress(total=config.epochs, desc=f"{name:>4} seed {seed}", unit="ep", leave=False) as bar:

                def on_epoch(metrics: dict[str, float], bar: Any = bar) -> None:
                    bar.set_postfix(loss=f"{metrics['loss']:.3f}", test_acc=f"{metrics['test_acc']:.3f}")
                    bar.update(1)

                run = train_run(config, data, name, seed, init=init, on_epoch=on_epoch)
            runs.append(run)
            print_fn(
                f"{name:>4} seed {seed}: test acc {100 * run['test_accuracy']:.2f}%, train loss "
                f"{run['train_loss']:.3f}, {run['seconds_per_epoch'] * 1000:.0f} ms/epoch"
            )
    wall = time.perf_counter() - started
    summary = summarize(runs, config.optimizers)
    print_fn("")
    print_fn(format_table(summary, config))
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
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, "results.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(_finite(results), f, indent=2, allow_nan=False)
        print_fn(f"wrote {path}")
    return results


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


def _progress_factory(enabled: bool) -> Callable[..., Any]:
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm
        except ImportError:  # pragma: no cover - tqdm is a dependency
            pass
    return _NoProgress


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
