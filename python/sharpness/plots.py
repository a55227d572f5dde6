"""The demo's figures, drawn with matplotlib's Agg backend (files only, no display needed).

- :func:`plot_accuracy`: test accuracy per epoch, one line per optimizer, mean ± std over seeds;
- :func:`plot_rho_sweep`: test accuracy against the radius ρ, one line per method;
- :func:`plot_rho_search`: what :func:`sharpness.find_rho` tried: each radius's held-out loss
  decrease relative to the smallest radius's, the threshold, the cliff and the pick;
- :func:`plot_landscape_1d`: the loss along one filter-normalised random direction
  (:func:`sharpness.measure.loss_landscape_1d`) of several final models, on one axes;
- :func:`plot_landscape_2d`: the loss on a filter-normalised random plane
  (:func:`sharpness.measure.loss_landscape_2d`) of several final models side by side, with one
  colour scale (the same logarithmic levels and norm) so that the panels compare directly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

COLORS = {"sgd": "tab:blue", "sam": "tab:orange", "asam": "tab:green"}


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the report's plots need matplotlib: python -m pip install matplotlib") from err
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def log_axis_ticks(low: float, high: float, max_ticks: int = 8) -> list[float]:
    """Round tick values inside ``[low, high]`` (``0 < low < high``) for a logarithmic axis: the
    1-2-5 values of each decade when at least three fall inside (only the powers of ten when
    that makes more than ``max_ticks``), else, over a range too narrow for them, evenly spaced
    round values (1.8, 1.9, 2.0, ...). Matplotlib's own log ticks give such a range no major
    tick and label its minor ticks with repeated or crowded numbers."""
    import math

    from matplotlib.ticker import MaxNLocator

    first, last = math.floor(math.log10(low)), math.ceil(math.log10(high))
    inside = lambda values: [v for v in values if low * (1 - 1e-9) <= v <= high * (1 + 1e-9)]  # noqa: E731
    ticks = inside([m * 10.0**k for k in range(first, last + 1) for m in (1, 2, 5)])
    if len(ticks) > max_ticks:
        ticks = inside([10.0**k for k in range(first, last + 1)])
    if len(ticks) >= 3:
        return ticks
    return inside([float(v) for v in MaxNLocator(nbins=5, steps=[1, 2, 2.5, 5, 10]).tick_values(low, high)])


def tick_labels(values: Sequence[float]) -> list[str]:
    """``values`` as short labels, with the fewest significant digits (up to 6) that keep them
    distinct: ``[0.05, 0.1, 2]`` -> ``["0.05", "0.1", "2"]``, ``[1.8, 1.9]`` -> ``["1.8", "1.9"]``."""
    for digits in range(1, 7):
        labels = [_plain(v, digits) for v in values]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{v:g}" for v in values]


def _plain(value: float, digits: int) -> str:
    """``value`` to ``digits`` significant digits, without an exponent between 1e-4 and 1e6
    ("10", not "1e+01")."""
    text = f"{value:.{digits}g}"
    if "e" in text and 1e-4 <= abs(value) < 1e6:
        text = f"{float(text):.6f}".rstrip("0").rstrip(".")
    return text


def _round_log_ticks(axis: Any, low: float, high: float) -> None:
    """Labels ``axis`` (log scale) at :func:`log_axis_ticks`, minor ticks without labels."""
    from matplotlib.ticker import FixedFormatter, FixedLocator, NullFormatter

    ticks = log_axis_ticks(low, high)
    axis.set_major_locator(FixedLocator(ticks))
    axis.set_major_formatter(FixedFormatter(tick_labels(ticks)))
    axis.set_minor_formatter(NullFormatter())


def plot_accuracy(
    histories: Mapping[str, Sequence[Sequence[float]]],
    labels: Mapping[str, str],
    path: str | os.PathLike[str],
    title: str = "",
) -> Any:
    """``histories[name]``: one list of per-epoch test accuracies (fractions) per seed. Draws the
    mean over seeds in percent with a ± one standard deviation band, writes ``path``, returns the
    figure (closed)."""
    import numpy as np

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    seeds = {name: len(runs) for name, runs in histories.items()}
    same = len(set(seeds.values())) == 1  # then the count goes in the axis label, once
    for name, runs in histories.items():
        values = 100 * np.asarray(runs, dtype=float)
        epochs = np.arange(1, values.shape[1] + 1)
        mean = values.mean(axis=0)
        std = values.std(axis=0, ddof=1) if values.shape[0] > 1 else np.zeros_like(mean)
        color = COLORS.get(name)
        label = labels.get(name, name) + ("" if same else f", {_seeds(seeds[name])}")
        ax.plot(epochs, mean, color=color, label=label)
        ax.fill_between(epochs, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole epochs: no "1.2" on a 2-epoch run
    ax.set_xlabel("epoch")
    count = next(iter(seeds.values()), 1)
    if same and count == 1:
        ax.set_ylabel("test accuracy (%), 1 seed")
    else:
        ax.set_ylabel("test accuracy (%), mean ± std" + (f" over {count} seeds" if same else ""))
    ax.set_title(title or "test accuracy per epoch")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return fig


def _seeds(count: int) -> str:
    return "1 seed" if count == 1 else f"{count} seeds"


def _distinct_colors(names: Sequence[str]) -> dict[str, str]:
    """The fixed colours of :data:`COLORS`, then unused ``tab10`` colours in order for the rest."""
    palette = [f"tab:{c}" for c in ("red", "purple", "brown", "pink", "gray", "olive", "cyan")]
    free = iter([c for c in palette if c not in COLORS.values()])
    return {name: COLORS.get(name) or next(free, "black") for name in names}


def plot_rho_sweep(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    title: str = "",
) -> Any:
    """Test accuracy against the radius (:mod:`sharpness.sweep` rows): one line per method over
    ``ρ/ρ_default`` on a log axis, error bars the 95% interval of the mean over seeds; a method
    without a radius (SGD) is a horizontal line. Writes ``path``, returns the figure (closed)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    names = list(dict.fromkeys(r["optimizer"] for r in rows))
    colors = _distinct_colors(names)
    for name in names:
        mine = sorted((r for r in rows if r["optimizer"] == name), key=lambda r: r["factor"] or 0.0)
        color = colors[name]
        if mine[0]["factor"] is None:
            ax.axhline(100 * mine[0]["accuracy_mean"], color=color or "gray", linestyle="--", label=name)
            continue
        factors = [r["factor"] for r in mine]
        means = [100 * r["accuracy_mean"] for r in mine]
        errors = [100 * (r["accuracy_ci95"] or 0.0) for r in mine]
        default = mine[0]["rho"] / mine[0]["factor"]
        ax.errorbar(factors, means, yerr=errors, color=color, marker="o", capsize=3, label=f"{name} (ρ×1 = {default:g})")
    ax.set_xscale("log", base=2)
    from matplotlib.ticker import FixedFormatter, FixedLocator, NullLocator

    factors = sorted({r["factor"] for r in rows if r["factor"] is not None})
    if factors:  # the factors themselves, as fractions (1/8, 1/4 ... 8), instead of powers of 2
        ax.xaxis.set_major_locator(FixedLocator(factors))
        ax.xaxis.set_major_formatter(FixedFormatter([_factor_label(f) for f in factors]))
        ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("ρ / the method's default ρ")
    ax.set_ylabel("test accuracy (%), mean, 95% interval")
    ax.set_title(title or "test accuracy against ρ")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return fig


def _factor_label(factor: float) -> str:
    """``0.125`` -> ``"1/8"``, ``2.0`` -> ``"2"``, ``0.3`` -> ``"0.3"``."""
    from fractions import Fraction

    exact = Fraction(factor).limit_denominator(64)
    if exact.numerator == 1 and exact.denominator > 1 and float(exact) == factor:
        return f"1/{exact.denominator}"
    return f"{factor:g}"


def plot_rho_search(
    searches: Mapping[str, Any],
    path: str | os.PathLike[str],
    title: str = "",
) -> Any:
    """``searches[name]``: a :class:`sharpness.rho_finder.RhoSearch` (``name`` the legend's label,
    "" for none). Per search, the held-out loss decrease of every radius run relative to the
    smallest radius's, on a log ρ axis (filled markers: trains; open: fails), a dashed line at the
    threshold, a dotted vertical line at the cliff and a star at the pick. Writes ``path``, returns
    the figure (closed)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    colors = _distinct_colors(list(searches))
    keep = None
    for name, search in searches.items():
        color = colors[name] or "tab:orange"
        ran = [r for r in search.rows if r["steps"] is not None]
        # a failed run's decrease can be -inf (a non-finite loss): drawn at the bottom of the axes
        ratios = [r["ratio"] if r["ratio"] is not None else -0.1 for r in ran]
        ax.plot([r["rho"] for r in ran], ratios, color=color, alpha=0.5, linewidth=1)
        for row, ratio in zip(ran, ratios):
            ax.plot([row["rho"]], [ratio], marker="o", color=color, markersize=6,
                    markerfacecolor=color if row["status"] != "fails" else "white")
        pick = next((r for r in ran if r["rho"] == search.rho), None)
        label = (f"{name}: " if name else "") + f"pick ρ={search.rho:.3g}"
        ax.plot([search.rho], [pick["ratio"] if pick and pick["ratio"] is not None else 1.0], marker="*",
                color=color, markersize=15, linestyle="none", label=label)
        if search.cliff is not None:
            ax.axvline(search.cliff, color=color, linestyle=":", linewidth=1)
        keep = search.keep
    if keep is not None:
        ax.axhline(keep, color="gray", linestyle="--", linewidth=1, label=f"threshold: {keep:g} × the smallest ρ's decrease")
    ax.set_xscale("log")
    ax.set_xlabel("ρ (dotted: the cliff, the first radius that fails)")
    ax.set_ylabel("held-out loss decrease / smallest ρ's")
    ax.set_title(title or "radius range test: each ρ's short run from the same weights")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return fig


def plot_landscape_1d(
    curves: Mapping[str, Mapping[str, Any]],
    labels: Mapping[str, str],
    path: str | os.PathLike[str],
    title: str = "",
) -> Any:
    """``curves[name]``: a :func:`~sharpness.measure.loss_landscape_1d` result. One axes, a
    logarithmic loss axis shared by every curve; writes ``path``, returns the figure (closed)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for name, curve in curves.items():
        ax.plot([float(a) for a in curve["alphas"]], [float(v) for v in curve["losses"]],
                color=COLORS.get(name), label=labels.get(name, name))
    ax.set_yscale("log")
    low, high = ax.get_ylim()
    _round_log_ticks(ax.yaxis, low, high)
    ax.set_ylim(low, high)
    ax.set_xlabel("α  (w + α·d, d filter-normalised, the same random numbers for every model)")
    ax.set_ylabel("training loss (noisy labels, log scale)")
    ax.set_title(title or "1-D loss landscape")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return fig


def plot_landscape_2d(
    surfaces: Mapping[str, Mapping[str, Any]],
    labels: Mapping[str, str],
    path: str | os.PathLike[str],
    title: str = "",
    levels: int = 25,
) -> Any:
    """``surfaces[name]``: a :func:`~sharpness.measure.loss_landscape_2d` result (the same grid
    for all). Filled contours side by side with the same logarithmic levels and colour norm over
    all panels, one colour bar; writes ``path``, returns the figure (closed), whose
    ``sharpness_clims`` lists each panel's ``(vmin, vmax)`` (all equal)."""
    import numpy as np
    from matplotlib.colors import LogNorm
    from matplotlib.ticker import FixedLocator, FuncFormatter

    plt = _pyplot()
    grids = {name: np.asarray(s["losses"], dtype=float) for name, s in surfaces.items()}
    finite = np.concatenate([g[np.isfinite(g)].ravel() for g in grids.values()])
    low = max(float(finite.min()), 1e-6)
    high = max(float(finite.max()), low * 1.0001)
    bounds = np.geomspace(low, high, levels)
    norm = LogNorm(vmin=low, vmax=high)
    n = len(grids)
    # "compressed": constrained layout that packs square panels without the gaps it leaves around them
    fig, axes = plt.subplots(1, n, figsize=(3.4 * n + 1.2, 4.1), dpi=110, squeeze=False, sharey=True,
                             layout="compressed")
    # room between the panels for their outer tick labels ("1" | "−1"), and under the suptitle
    fig.get_layout_engine().set(w_pad=0.06, h_pad=0.08, wspace=0.06)
    axis_format = FuncFormatter(lambda value, _: f"{value:g}".replace("-", "\u2212"))
    sets = []
    for ax, (name, grid) in zip(axes[0], grids.items()):
        s = surfaces[name]
        a, b = np.asarray(s["alphas"], dtype=float), np.asarray(s["betas"], dtype=float)
        clipped = np.clip(np.nan_to_num(grid, nan=high, posinf=high), low, high)
        cs = ax.contourf(a, b, clipped.T, levels=bounds, norm=norm, cmap="viridis", extend="neither")
        ax.contour(a, b, clipped.T, levels=bounds[::3], colors="white", linewidths=0.4, alpha=0.6)
        ax.plot([0], [0], marker="+", color="red", markersize=10)
        ax.set_title(f"{labels.get(name, name)}\ncentre {grid[len(a) // 2, len(b) // 2]:.3f}, "
                     f"max {grid.max():.2f}", fontsize=9)
        # five round ticks per axis: the ends, the halves and 0
        ax.xaxis.set_major_locator(FixedLocator([a[0], a[0] / 2, 0.0, a[-1] / 2, a[-1]]))
        ax.yaxis.set_major_locator(FixedLocator([b[0], b[0] / 2, 0.0, b[-1] / 2, b[-1]]))
        ax.xaxis.set_major_formatter(axis_format)
        ax.yaxis.set_major_formatter(axis_format)
        ax.set_xlabel("α (direction 1)")
        ax.set_aspect("equal")
        sets.append(cs)
    axes[0][0].set_ylabel("β (direction 2)")
    bar = fig.colorbar(sets[0], ax=list(axes[0]))
    ticks = log_axis_ticks(low, high)
    bar.set_ticks(ticks, labels=tick_labels(ticks))
    bar.minorticks_off()
    bar.set_label("training loss (log scale, shared)")
    fig.suptitle(title or "2-D loss landscape, filter-normalised directions", fontsize=10)
    fig.sharpness_clims = [tuple(float(v) for v in cs.get_clim()) for cs in sets]
    fig.savefig(path)
    plt.close(fig)
    return fig
