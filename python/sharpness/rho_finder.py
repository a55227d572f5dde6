"""A radius range test: :func:`find_rho` proposes SAM's ρ for the user's own model, data and method.

SAM's radius has a cliff. On the demo (README, "Which ρ?"), test accuracy grows with ρ up to the
best radius and twice that radius collapses training to chance: the perturbation ``ρ g/‖g‖`` is then
so large that the gradient taken at ``w + e`` no longer lowers the loss at ``w``, and the network
never leaves its initial plateau. A sweep of full runs finds the best ρ at many times the cost of
the training itself; this module finds the cliff within a small budget instead.

**In the spirit of the learning-rate range test** (Smith, "Cyclical Learning Rates for Training
Neural Networks", WACV 2017, arXiv:1506.01186, Section 3.3): there, one short run lets the learning
rate grow and the bounds are read off the curve, the largest usable rate where accuracy stops
rising, becomes ragged or falls, and the rate used stays a stated factor below it (Smith's
smaller bound: a third or a quarter of it). Here the same reading is done for ρ: find where
training starts to fail, and stay a stated factor below. Two differences:

- *Short runs favour small ρ*: SAM pays off late (on noisy labels its gain comes from not
  memorising them, over tens of epochs), while in a few dozen steps a larger ρ only slows the
  descent. So the short runs cannot rank radii by their validation accuracy (the smallest would
  always win); they can tell where training *fails*, which shows early: above the cliff the loss
  does not move from its starting value. The test measures where training fails, not which
  radius generalises best.
- *Each radius restarts*: growing ρ within one run (as the LR test grows the rate) would carry the
  damage of one radius into the next; here every candidate starts from the same weights and
  buffers (a copy of the model's state taken on entry) with a fresh optimizer from
  ``make_optimizer``, sees the same batches in the same order, and runs at the optimizer's initial
  learning rate (no schedule: the first steps, at the full rate, are where the cliff is met).

**The rule.** ``L₀`` is the loss on the held-out batches at the initial weights; after a candidate's
``n`` steps, ``L(ρ)`` is the held-out loss again and ``d(ρ) = L₀ − L(ρ)`` its decrease. The
smallest radius of the grid is the reference. A candidate *trains* when

    d(ρ) ≥ keep · d(ρ_min)        (keep = :data:`KEEP` = 0.2)

and *fails* otherwise (a non-finite loss fails). Below the cliff ``d(ρ)/d(ρ_min)`` falls smoothly
with ρ (a larger ball slows the first steps); at the cliff it drops to about zero. ``keep`` sits
between the two: on the demo, at 53 steps a candidate, radii that train over a whole run keep
0.3–1 of the reference's decrease (the MLP) and those that collapse keep 0.00–0.05; a threshold of
1/2 would call the slow-but-sound radii failures, one of 0.05 would let noise decide. The
reference itself must have trained: a fall below :data:`MIN_DECREASE` (5%) of ``L₀`` is too small
to tell radii apart (too few steps), and the search stops there with the smallest radius, the safe
end (a radius that barely perturbs is the base optimizer). Assuming that order (the range test's
premise), the search bisects the sorted grid: the reference, then the largest radius, then
midpoints until the largest radius that trains, ``ρ_ok``, and the smallest that fails,
``ρ_cliff``, are neighbours of the grid. The pick is the largest radius of the grid at or below
``ρ_cliff / backoff`` (``backoff`` = :data:`BACKOFF` = 3, Smith's smaller bound, and never above
``ρ_ok``); when even the largest radius trains (no cliff in the grid) the pick is the grid's
radius at or below the largest / 3, with a note to extend the grid. The factor is that large
because short runs can also fail *later* than full ones: a radius that still lowers the loss in
the first dozens of steps may collapse over a whole run (``benches/bench_efficient.py``: on the
digits CNN with noisy labels, 10 steps a candidate put the short-run cliff at 0.68 where full
runs collapse from 0.46), while a radius that stalls for the first hundred steps may still leave
the plateau later (the demo's CNN at ρ = 0.3). A third of the short-run cliff stayed below every
full-run cliff measured; it costs accuracy where the best radius sits right at the cliff (the
demo's MLP on noisy labels). ``2 + ⌈log₂(len(grid) − 1)⌉`` runs at most instead of
``len(grid)``: the budget buys longer, more telling runs.

**The budget** counts optimizer steps (a SAM step, two gradients, is one step, as in the training
it precedes): ``budget_steps // max_runs`` steps per candidate, so the search never takes more
than ``budget_steps``. Size it as a fraction of the training run (the demo's ``--rho auto`` gives
20% of the run); held-out evaluations are extra forward passes, reported in ``seconds``.

**Radii of other scales.** The default grid is for SAM's ball (``‖e‖ = ρ``): 13 radii from 0.01
to 1 (a factor of 10^(1/6) ≈ 1.47 apart). ASAM (``adaptive=True``, its ball in units of ``|w|``)
is on a scale about ten times larger: its default grid is multiplied by 10 (0.1 to 10).
Momentum-SAM's (Becker et al. 2024: ρ of 0.3–3 in the paper's code) by 3 (0.03 to 3): its best
radii in ``benches/bench_efficient.py`` were 0.1–2.2, and its short runs meet the cliff late (a
grid up to 10 let the pick land above the full runs' cliff). The scale is found from a probe
optimizer built with ``make_optimizer`` (its ``sam_adaptive`` groups, its class); any other
method whose radius is on its own scale needs ``grid=``.
"""

from __future__ import annotations

import itertools
import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["BACKOFF", "DEFAULT_GRID", "KEEP", "MIN_DECREASE", "MIN_STEPS", "RhoSearch", "find_rho", "max_runs", "radius_scale"]

#: SAM's default grid: 13 radii from 0.01 to 1, 10^(1/6) apart.
DEFAULT_GRID: tuple[float, ...] = tuple(float(f"{10 ** (k / 6 - 2):.4g}") for k in range(13))
#: A candidate trains when its held-out loss fell by at least this fraction of the reference's fall.
KEEP = 0.2
#: The pick: the first radius that fails, divided by this factor (then the grid's radius at or below):
#: Smith's smaller bound, a third of the largest usable value.
BACKOFF = 3.0
#: The reference radius must lower the held-out loss by at least this fraction of its initial value
#: for the search to tell radii apart; below it the search is inconclusive and picks the smallest.
MIN_DECREASE = 0.05
#: Fewest steps a candidate may take; a smaller budget per candidate is refused.
MIN_STEPS = 8
#: Without ``val_batches``: the fraction of the batches held out (at least 1, at most MAX_HELD_OUT).
HELD_OUT_FRACTION = 0.2
MAX_HELD_OUT = 16
#: Without ``budget_steps``: each candidate runs one pass over the training batches, within these bounds.
DEFAULT_STEPS_RANGE = (50, 250)
#: Methods whose radius is on a scale of its own (by class name): the factor of the default grid
#: (ASAM's, 10, comes from its groups).
_METHOD_SCALES = {"MomentumSAM": 3.0}


@dataclass
class RhoSearch:
    """What :func:`find_rho` tried and picked.

    ``rows``: one dict per candidate radius, ascending: ``rho``, ``status`` (``"reference"``,
    ``"trains"``, ``"fails"`` or ``"not run"``), ``val_loss`` (held-out loss after the run),
    ``decrease`` (``L₀ − val_loss``), ``ratio`` (``decrease`` over the reference's), ``train_loss``
    (mean loss of the run's last quarter of steps), ``steps``, ``seconds`` (None where not run).
    """

    rho: float
    rows: list[dict[str, Any]]
    steps: int
    seconds: float
    budget_steps: int
    steps_per_candidate: int
    initial_loss: float
    cliff: float | None  # the smallest radius that failed (None: none failed)
    keep: float = KEEP
    backoff: float = BACKOFF
    notes: list[str] = field(default_factory=list)

    def table(self) -> str:
        """The candidates as a text table, then the rule and the pick."""
        headers = ["rho", "status", "held-out loss", "decrease", "ratio", "train loss", "steps", "seconds"]
        lines = []
        for row in self.rows:
            ran = row["steps"] is not None
            lines.append([
                f"{row['rho']:.4g}" + (" *" if row["rho"] == self.rho else ""),
                row["status"],
                f"{row['val_loss']:.4f}" if ran else "",
                f"{row['decrease']:+.4f}" if ran else "",
                f"{row['ratio']:.2f}" if ran and row["ratio"] is not None else "",
                f"{row['train_loss']:.4f}" if ran else "",
                str(row["steps"]) if ran else "",
                f"{row['seconds']:.2f}" if ran else "",
            ])
        widths = [max(len(c) for c in column) for column in zip(headers, *lines)]
        fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
        out = [fmt(headers), fmt(["-" * w for w in widths]), *(fmt(cells) for cells in lines)]
        if self.cliff is None and len(self.rows) > 1 and self.rho == self.rows[0]["rho"]:
            pick = "the smallest radius did not train enough to tell radii apart (note): pick * = it"
        elif self.cliff is None:
            pick = f"no cliff: pick * = the grid's radius at or below the largest/{self.backoff:.3g}"
        else:
            pick = (f"cliff (first failing radius): {self.cliff:.4g}; pick * = the grid's radius at or below "
                    f"cliff/{self.backoff:.3g}")
        out.append(
            f"initial held-out loss {self.initial_loss:.4f}; a radius trains when its decrease is >= {self.keep:g} × "
            f"the smallest radius's; {pick} -> rho {self.rho:.4g}; {self.steps} of {self.budget_steps} budgeted steps "
            f"({self.steps_per_candidate} per candidate), {self.seconds:.1f} s"
        )
        out += [f"note: {note}" for note in self.notes]
        return "\n".join(out)

    def plot(self, path: str | Any, title: str = "") -> Any:
        """The decrease ratio against ρ (log axis), the threshold, the cliff and the pick; writes
        ``path`` (matplotlib, imported here: an optional dependency) and returns the figure."""
        from sharpness.plots import plot_rho_search

        return plot_rho_search({"": self}, path, title=title)


def find_rho(
    model: nn.Module,
    make_optimizer: Callable[[Any, float], torch.optim.Optimizer],
    loss_fn: Callable[[nn.Module, Any], Tensor],
    batches: Iterable[Any],
    *,
    val_batches: Iterable[Any] | None = None,
    grid: Sequence[float] | None = None,
    budget_steps: int | None = None,
    seed: int = 0,
) -> RhoSearch:
    """Proposes a radius ρ for ``make_optimizer`` on ``model`` and ``batches`` (the rule: module docstring).

    Args:
        model: the network to train; its parameters, buffers, gradients, ``requires_grad`` flags and
            train/eval modes are exactly as before when this returns or raises.
        make_optimizer: ``(params, rho) -> optimizer``, e.g. ``lambda p, rho: sharpness.SAM(p,
            torch.optim.SGD, rho=rho, lr=0.05, momentum=0.9)``; called once per candidate (and once
            for a probe of the radius's scale when ``grid`` is None). Any optimizer whose
            ``step(closure)`` runs the closure (the SAM family, torch's own) will do.
        loss_fn: ``(model, batch) -> loss``: a scalar, or per-sample losses whose mean is minimised
            (a method that selects samples, ESAM, needs per-sample losses: it gets them per sample).
        batches: the training batches, re-iterable (a list, a DataLoader). One pass is read: the
            batches a candidate uses are kept (on the device they come on), so that every candidate
            sees the same ones in the same order, and cycled if the run is longer than them.
        val_batches: held-out batches for the loss ``L(ρ)``. Without them, the first
            ``⌈20%⌉`` of ``batches`` (at least 1, at most 16) are held out and the rest train.
        grid: candidate radii (any order, distinct, > 0); default :data:`DEFAULT_GRID` (0.01–1),
            ×10 for ASAM, ×3 for Momentum-SAM (module docstring).
        budget_steps: optimizer steps for the whole search; each candidate runs
            ``budget_steps // max_runs`` of them (``max_runs = 2 + ⌈log₂(len(grid) − 1)⌉``, 1 for one
            radius), at least :data:`MIN_STEPS`. Default: one pass over the training batches per
            candidate, within 50–250 steps, times ``max_runs``.
        seed: torch's random state at the start of every candidate (dropout, ESAM's draws), the
            caller's own random state put back afterwards.

    Returns:
        A :class:`RhoSearch`: ``.rho`` (one of the grid), ``.rows``, ``.steps``, ``.seconds``,
        ``.table()``, ``.plot(path)``.

    Raises:
        ValueError: an empty grid, a radius that is not a finite number > 0, a radius listed twice,
            a budget below ``MIN_STEPS`` per candidate, fewer than two batches without
            ``val_batches``, or no batches.

    Example:
        >>> import torch, sharpness
        >>> from sharpness.rho_finder import find_rho  # also sharpness.find_rho
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
        >>> x = torch.randn(640, 8)
        >>> y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
        >>> batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 640, 32)]
        >>> def loss_fn(model, batch):
        ...     return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])
        >>> def make(params, rho):
        ...     return sharpness.SAM(params, torch.optim.SGD, rho=rho, lr=0.05, momentum=0.9)
        >>> search = find_rho(model, make, loss_fn, batches, grid=[0.01, 0.03, 0.1, 0.3, 1, 3, 10], budget_steps=150)
        >>> search.rho in [0.01, 0.03, 0.1, 0.3, 1, 3, 10], search.steps <= 150
        (True, True)
        >>> print(search.table())  # doctest: +SKIP
        rho      status     held-out loss  decrease  ratio  train loss  steps  seconds
        ...
    """
    started = time.perf_counter()
    radii = _checked_grid(grid) if grid is not None else None
    if budget_steps is not None and (isinstance(budget_steps, bool) or not isinstance(budget_steps, int)):
        raise TypeError(f"budget_steps must be an integer, got {budget_steps!r}")
    if radii is not None:
        _check_budget(budget_steps, len(radii))
    snapshot = _Snapshot(model)
    devices = sorted({t.device.index or 0 for t in snapshot.tensors if t.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices):
            if radii is None:
                radii = _default_grid(model, make_optimizer, snapshot)
                _check_budget(budget_steps, len(radii))
            runs = max_runs(len(radii))
            train, held_out = _split(batches, val_batches, budget_steps, runs)
            if budget_steps is None:
                per_candidate = min(max(len(train), DEFAULT_STEPS_RANGE[0]), DEFAULT_STEPS_RANGE[1])
                budget_steps = per_candidate * runs
            else:
                per_candidate = budget_steps // runs
            initial = _held_out_loss(model, loss_fn, held_out)
            search = _Search(model, make_optimizer, loss_fn, train, held_out, per_candidate, seed, snapshot, initial)
            result = search.run(radii)
    finally:
        snapshot.restore()
    result.budget_steps = budget_steps
    result.seconds = time.perf_counter() - started
    for note in result.notes:
        warnings.warn(f"find_rho: {note}", RuntimeWarning, stacklevel=2)
    return result


# -- the search -------------------------------------------------------------------------------------


class _Search:
    """Runs candidates from the snapshot and bisects the grid for the cliff."""

    def __init__(self, model: nn.Module, make_optimizer: Callable[[Any, float], torch.optim.Optimizer],
                 loss_fn: Callable[[nn.Module, Any], Tensor], train: list[Any], held_out: list[Any], steps: int,
                 seed: int, snapshot: _Snapshot, initial: float) -> None:
        self.model, self.make_optimizer, self.loss_fn = model, make_optimizer, loss_fn
        self.train, self.held_out, self.steps, self.seed = train, held_out, steps, seed
        self.snapshot, self.initial = snapshot, initial
        self.reference_decrease = math.nan
        self.steps_taken = 0

    def run(self, radii: list[float]) -> RhoSearch:
        rows = [{"rho": rho, "status": "not run", "val_loss": None, "decrease": None, "ratio": None,
                 "train_loss": None, "steps": None, "seconds": None} for rho in radii]
        notes: list[str] = []
        reference = self.candidate(rows[0])
        reference["status"] = "reference"
        self.reference_decrease = reference["decrease"]
        reference["ratio"] = 1.0 if self.reference_decrease > 0 else None
        if not self.reference_decrease >= MIN_DECREASE * abs(self.initial):
            notes.append(
                f"the smallest radius ({radii[0]:g}) lowered the held-out loss by less than {MIN_DECREASE:g} of its "
                f"initial value in {self.steps} steps, too little to tell radii apart: the pick is that radius (the "
                "safe end); give more budget_steps, check the learning rate, or start the grid lower"
            )
            return self.result(rows, radii[0], None, notes)
        if len(rows) == 1:
            return self.result(rows, radii[0], None, notes)
        lo, hi = 0, len(rows) - 1
        if self.trains(self.candidate(rows[hi])):
            # No cliff seen: it lies above the grid, or the runs were too short to meet it (a radius
            # that stalls late). Stay the same factor below the largest radius as below a cliff.
            notes.append(f"every radius tried trains, up to {radii[hi]:g}: the cliff lies above the grid, extend it upwards")
            return self.result(rows, self.at_or_below(radii, radii[hi] / BACKOFF), None, notes)
        while hi - lo > 1:  # rows[lo] trains, rows[hi] fails
            mid = (lo + hi) // 2
            if self.trains(self.candidate(rows[mid])):
                lo = mid
            else:
                hi = mid
        cliff = radii[hi]
        if radii[0] > cliff / BACKOFF * (1 + 1e-9):
            notes.append(f"no radius of the grid lies at or below cliff/{BACKOFF:g} = {cliff / BACKOFF:.3g}: the pick is "
                         "the smallest; start the grid lower")
        return self.result(rows, self.at_or_below(radii[: lo + 1], cliff / BACKOFF), cliff, notes)

    @staticmethod
    def at_or_below(radii: list[float], bound: float) -> float:
        """The largest of ``radii`` at or below ``bound`` (the smallest when none is)."""
        below = [rho for rho in radii if rho <= bound * (1 + 1e-9)]
        return below[-1] if below else radii[0]

    def trains(self, row: dict[str, Any]) -> bool:
        ratio = row["decrease"] / self.reference_decrease if math.isfinite(row["decrease"]) else -math.inf
        row["ratio"] = ratio if math.isfinite(ratio) else None
        row["status"] = "trains" if ratio >= KEEP else "fails"
        return row["status"] == "trains"

    def candidate(self, row: dict[str, Any]) -> dict[str, Any]:
        """Trains from the snapshot with radius ``row["rho"]`` for ``self.steps`` steps; fills ``row``."""
        started = time.perf_counter()
        self.snapshot.restore()
        torch.manual_seed(self.seed)
        model = self.model
        model.train()
        optimizer = self.make_optimizer(model.parameters(), row["rho"])
        per_sample = bool(getattr(optimizer, "selects_samples", False))
        step_with: Callable[..., Any] = optimizer.step  # torch's stub types the closure's loss as a float
        losses: list[Tensor] = []
        try:
            for step in range(self.steps):
                batch = self.train[step % len(self.train)]
                if per_sample:
                    loss = step_with(_per_sample_closure(model, self.loss_fn, batch))
                else:
                    loss = step_with(_closure(model, self.loss_fn, batch, optimizer))
                self.steps_taken += 1
                if loss is not None:
                    losses.append(loss.detach().to(torch.float64).mean())
        finally:
            restore = getattr(optimizer, "restore", None)
            if callable(restore):  # never evaluate (or leave) weights mid-step
                restore()
        quarter = losses[-max(1, len(losses) // 4):]
        row["train_loss"] = torch.stack(quarter).mean().item() if quarter else math.nan
        row["val_loss"] = _held_out_loss(model, self.loss_fn, self.held_out)
        row["decrease"] = self.initial - row["val_loss"] if math.isfinite(row["val_loss"]) else -math.inf
        row["steps"] = self.steps
        row["seconds"] = time.perf_counter() - started
        return row

    def result(self, rows: list[dict[str, Any]], pick: float, cliff: float | None, notes: list[str]) -> RhoSearch:
        return RhoSearch(rho=pick, rows=rows, steps=self.steps_taken, seconds=0.0, budget_steps=0,
                         steps_per_candidate=self.steps, initial_loss=self.initial, cliff=cliff, notes=notes)


def _closure(model: nn.Module, loss_fn: Callable[[nn.Module, Any], Tensor], batch: Any,
             optimizer: torch.optim.Optimizer) -> Callable[[], Tensor]:
    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = loss_fn(model, batch)
        loss = loss.mean() if loss.dim() else loss
        loss.backward()
        return loss

    return closure


def _per_sample_closure(model: nn.Module, loss_fn: Callable[[nn.Module, Any], Tensor], batch: Any) -> Callable[..., Tensor]:
    """ESAM's closure: the per-sample losses of the batch, or of the samples ``indices`` (computed
    on the whole batch and indexed: the batch's structure is the caller's)."""

    def closure(indices: Tensor | None = None) -> Tensor:
        losses = loss_fn(model, batch)
        if losses.dim() != 1:
            raise ValueError(
                "this optimizer selects samples (ESAM): loss_fn must return per-sample losses, a tensor of shape [B] "
                f"(e.g. reduction='none'), got shape {tuple(losses.shape)}"
            )
        return losses if indices is None else losses[indices]

    return closure


@torch.no_grad()
def _held_out_loss(model: nn.Module, loss_fn: Callable[[nn.Module, Any], Tensor], batches: list[Any]) -> float:
    """The mean loss over the held-out batches in eval mode (per-sample losses weighted by count)."""
    was_training = model.training
    model.eval()
    try:
        total = torch.zeros((), dtype=torch.float64)
        count = 0
        for batch in batches:
            loss = loss_fn(model, batch).detach().double().cpu()
            total += loss.sum()
            count += loss.numel()
    finally:
        model.train(was_training)
    return (total / count).item()


# -- arguments ----------------------------------------------------------------------------------------


def _checked_grid(grid: Sequence[float]) -> list[float]:
    radii = list(grid)
    if not radii:
        raise ValueError("grid is empty: give at least one candidate radius")
    for rho in radii:
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not (math.isfinite(rho) and rho > 0):
            raise ValueError(f"every radius of the grid must be a finite number > 0, got {rho!r} in {radii}")
    if len(set(radii)) != len(radii):
        raise ValueError(f"a radius is listed twice in the grid: {radii}")
    return sorted(float(rho) for rho in radii)


def _default_grid(model: nn.Module, make_optimizer: Callable[[Any, float], torch.optim.Optimizer],
                  snapshot: _Snapshot) -> list[float]:
    """:data:`DEFAULT_GRID` times :func:`radius_scale` of a probe optimizer (no step taken)."""
    probe = make_optimizer(model.parameters(), DEFAULT_GRID[0])
    snapshot.restore()  # in case building it touched the weights (it should not)
    return [rho * radius_scale(probe) for rho in DEFAULT_GRID]


def radius_scale(optimizer: torch.optim.Optimizer) -> float:
    """The factor of the default grid: 10 for ASAM (a group with ``sam_adaptive``), 3 for
    Momentum-SAM, else 1 (module docstring)."""
    if any(group.get("sam_adaptive", False) for group in optimizer.param_groups):
        return 10.0
    return next((scale for cls in type(optimizer).__mro__ for name, scale in _METHOD_SCALES.items() if cls.__name__ == name), 1.0)


def _check_budget(budget_steps: int | None, n: int) -> None:
    if budget_steps is not None and budget_steps // max_runs(n) < MIN_STEPS:
        raise ValueError(
            f"budget_steps={budget_steps} is too small for a grid of {n} radii: the search runs up to {max_runs(n)} "
            f"candidates of at least {MIN_STEPS} steps each, so it needs budget_steps >= {max_runs(n) * MIN_STEPS} "
            "(or a shorter grid)"
        )


def max_runs(n: int) -> int:
    """Candidates the bisection runs at most: the reference, the largest, then ⌈log₂(n − 1)⌉ midpoints."""
    return 1 if n == 1 else 2 + math.ceil(math.log2(n - 1))


def _split(batches: Iterable[Any], val_batches: Iterable[Any] | None, budget_steps: int | None,
           max_runs: int) -> tuple[list[Any], list[Any]]:
    """(training batches, held-out batches): one pass of ``batches`` read, as far as the search needs.

    Without ``val_batches`` the first ``⌈20%⌉`` of the pass (at least 1, at most 16; of the batches
    read when ``batches`` has no length) are held out; the training batches follow them."""
    try:
        available: int | None = len(batches)  # type: ignore[arg-type]
    except TypeError:
        available = None
    wanted = DEFAULT_STEPS_RANGE[1] if budget_steps is None else max(1, budget_steps // max_runs)
    if val_batches is not None:
        held_out, train = list(val_batches), list(itertools.islice(iter(batches), wanted))
        if not held_out:
            raise ValueError("val_batches is empty: give held-out batches, or leave it None to hold out part of batches")
    else:
        if available is not None and available < 2:
            raise ValueError(f"batches has {available} batch(es): give at least 2 (one is held out) or val_batches")
        skip = _held_out_count(available) if available is not None else MAX_HELD_OUT
        first_pass = list(itertools.islice(iter(batches), skip + wanted))
        if available is None:
            if len(first_pass) < 2:
                raise ValueError("batches yields fewer than 2 batches: give at least 2 (one is held out) or val_batches")
            skip = _held_out_count(len(first_pass))
        held_out, train = first_pass[:skip], first_pass[skip:]
    if not train:
        raise ValueError("batches is empty: give the training batches")
    return train, held_out


def _held_out_count(n: int) -> int:
    return max(1, min(MAX_HELD_OUT, math.ceil(HELD_OUT_FRACTION * n), n - 1))


# -- the model's state --------------------------------------------------------------------------------


class _Snapshot:
    """Every parameter and buffer (persistent or not), each gradient, ``requires_grad`` flag and
    module mode of a model, restored in place (the tensors keep their identity: an optimizer or a
    caller holding them sees the old values again, bit for bit)."""

    def __init__(self, model: nn.Module) -> None:
        self.params = list(model.parameters())
        self.buffers = list(model.buffers())
        self.tensors = self.params + self.buffers
        self.values = [t.detach().clone() for t in self.tensors]
        self.grads = [None if p.grad is None else p.grad.detach().clone() for p in self.params]
        self.requires_grad = [p.requires_grad for p in self.params]
        self.modes = [(module, module.training) for module in model.modules()]

    @torch.no_grad()
    def restore(self) -> None:
        for tensor, value in zip(self.tensors, self.values):
            tensor.copy_(value)
        for param, grad, flag in zip(self.params, self.grads, self.requires_grad):
            param.grad = None if grad is None else grad.clone()
            param.requires_grad_(flag)
        for module, mode in self.modes:
            module.training = mode
