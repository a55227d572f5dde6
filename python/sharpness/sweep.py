"""Which ρ? Test accuracy against the radius, on the demo's task (``sharpness demo --rho-sweep``).

SAM's radius is its one extra hyperparameter, and the right value depends on the method: about
0.05–0.3 for SAM, 0.5–4 for ASAM (its ball is measured in units of the weights). So the sweep
runs each method on its own log grid, its default radius (the demo's ``--rho``, ``--asam-rho``
...) times the same factors (default ``1/8 … 8``), and compares methods by how their accuracy
changes with the factor: a method that is insensitive to ρ has a flat curve.

For every seed, every optimizer and every factor, :func:`run_rho_sweep` trains the demo's
network (:func:`sharpness.demo.train_run`, same initial weights and batch order for every run of
a seed; sharpness measures off) and records the final test accuracy. SGD, which has no radius,
is run once per seed as the reference line. The report: ``sweep.csv`` (one row per optimizer and
factor: absolute ρ, mean, std and 95% interval of the accuracy over seeds), ``sweep.json`` (that,
every run, and per optimizer the best accuracy and the spread across the grid) and ``sweep.png``
(accuracy against ρ/ρ_default, log scale, error bars: the 95% interval).
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from typing import Any

from sharpness.demo import (
    DemoConfig,
    _mean_std,
    _progress_factory,
    check_requirements,
    initial_state,
    load_noisy_digits,
    radius_field,  # noqa: F401 - the field of each optimizer's radius, known here by that name too
    set_threads,
    train_run,
)

#: The default grid: factors of each method's default radius, 1/8 to 8 on a log scale.
DEFAULT_FACTORS = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def run_rho_sweep(
    config: DemoConfig,
    factors: Sequence[float] = DEFAULT_FACTORS,
    out_dir: str | os.PathLike[str] | None = None,
    print_fn: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Trains every optimizer of ``config`` at every radius ``default × factor`` for every seed;
    prints the table, writes the report into ``out_dir`` when given, returns the results."""
    if not factors or any(not f > 0 for f in factors):
        raise ValueError(f"factors must be numbers > 0, got {list(factors)}")
    check_requirements(config, report=out_dir is not None)  # before the runs: sweep.png needs matplotlib
    config = replace(config, measure_size=0)  # accuracy only: the sharpness measures are the demo's
    set_threads(config.threads)
    data = load_noisy_digits(config.label_noise, config.test_fraction, config.data_seed).to(config.device)
    progress = _progress_factory(config.progress)
    runs: list[dict[str, Any]] = []
    started = time.perf_counter()
    jobs = [(name, f) for name in config.optimizers for f in (factors if radius_field(name) else (1.0,))]
    with progress(total=config.seeds * len(jobs), desc="rho sweep", unit="run") as bar:
        for seed in range(config.first_seed, config.first_seed + config.seeds):
            init = initial_state(config, data, seed)
            for name, factor in jobs:
                field = radius_field(name)
                run_config = config if field is None else replace(config, **{field: getattr(config, field) * factor})
                run = train_run(run_config, data, name, seed, init=init)
                runs.append(
                    {
                        "optimizer": name,
                        "seed": seed,
                        "factor": factor if field else None,
                        "rho": getattr(run_config, field) if field else None,
                        "test_accuracy": run["test_accuracy"],
                        "seconds_per_epoch": run["seconds_per_epoch"],
                    }
                )
                bar.update(1)
    rows = summarize_sweep(runs, config.optimizers, factors)
    methods = compare_methods(rows)
    print_fn(format_sweep(rows, methods, config))
    wall = time.perf_counter() - started
    print_fn(f"total {wall:.1f} s")
    results = {"config": asdict(config), "factors": list(factors), "runs": runs, "rows": rows, "methods": methods,
               "wall_seconds": wall}
    if out_dir is not None:
        for path in write_sweep(results, out_dir):
            print_fn(f"wrote {path}")
    return results


def summarize_sweep(
    runs: Sequence[dict[str, Any]], optimizers: Sequence[str], factors: Sequence[float]
) -> list[dict[str, Any]]:
    """One row per optimizer and factor: ρ and the test accuracy's mean, std and 95% half-width."""
    rows = []
    for name in optimizers:
        for factor in factors if radius_field(name) else (None,):
            mine = [r for r in runs if r["optimizer"] == name and r["factor"] == factor]
            if not mine:
                continue
            stats = _mean_std([r["test_accuracy"] for r in mine])
            rows.append(
                {
                    "optimizer": name,
                    "factor": factor,
                    "rho": mine[0]["rho"],
                    "seeds": len(mine),
                    "accuracy_mean": stats["mean"],
                    "accuracy_std": stats["std"],
                    "accuracy_ci95": stats["ci95"],
                }
            )
    return rows


def compare_methods(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per optimizer with a radius: the best mean accuracy and its ρ, the worst, and the spread
    (best − worst mean accuracy across the grid: how much a wrong ρ costs)."""
    methods: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r["optimizer"] for r in rows):
        mine = [r for r in rows if r["optimizer"] == name and r["factor"] is not None]
        if not mine:
            continue
        best = max(mine, key=lambda r: r["accuracy_mean"])
        worst = min(mine, key=lambda r: r["accuracy_mean"])
        methods[name] = {
            "best_accuracy": best["accuracy_mean"],
            "best_rho": best["rho"],
            "worst_accuracy": worst["accuracy_mean"],
            "worst_rho": worst["rho"],
            "spread": best["accuracy_mean"] - worst["accuracy_mean"],
        }
    return methods


def format_sweep(rows: Sequence[dict[str, Any]], methods: dict[str, dict[str, Any]], config: DemoConfig) -> str:
    """The printed report: accuracy per method and factor, then best and spread per method."""
    factors = sorted({r["factor"] for r in rows if r["factor"] is not None})
    headers = ["optimizer", *[f"ρ×{f:g}" for f in factors], "best (ρ)", "spread"]
    lines = []
    for name in dict.fromkeys(r["optimizer"] for r in rows):
        mine = {r["factor"]: r for r in rows if r["optimizer"] == name}
        if None in mine:  # no radius: one value
            cells = [f"{100 * mine[None]['accuracy_mean']:.1f}"] * len(factors) + ["", ""]
        else:
            m = methods[name]
            cells = [f"{100 * mine[f]['accuracy_mean']:.1f}" if f in mine else "" for f in factors]
            cells += [f"{100 * m['best_accuracy']:.1f} ({m['best_rho']:g})", f"{100 * m['spread']:.1f}"]
        lines.append([name, *cells])
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *lines)]
    fmt = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [fmt(headers), fmt(["-" * w for w in widths]), *(fmt(cells) for cells in lines)]
    seeds = max(r["seeds"] for r in rows)
    out.append(
        f"test accuracy (%), mean over {seeds} seed(s); ρ×f: each method's default radius (sam/looksam/everyk "
        f"{config.rho:g}, asam {config.asam_rho:g}) times f; spread: best − worst mean across the grid; "
        f"{config.model}, {config.epochs} epochs, {100 * config.label_noise:g}% label noise"
    )
    return "\n".join(out)


def write_sweep(results: dict[str, Any], out_dir: str | os.PathLike[str]) -> list[str]:
    """``sweep.csv``, ``sweep.json`` and ``sweep.png`` into ``out_dir``; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, "sweep.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(results["rows"][0]))
        writer.writeheader()
        writer.writerows(results["rows"])
    json_path = os.path.join(out_dir, "sweep.json")
    with open(json_path, "w") as f:
        json.dump(results, f, indent=1)
    png_path = os.path.join(out_dir, "sweep.png")
    from sharpness.plots import plot_rho_sweep

    config = results["config"]
    seeds = "1 seed" if config["seeds"] == 1 else f"{config['seeds']} seeds"
    plot_rho_sweep(results["rows"], png_path, title=f"digits, {config['model'].upper()}, {100 * config['label_noise']:g}% "
                   f"label noise: test accuracy against ρ ({seeds})")
    return [csv_path, json_path, png_path]
