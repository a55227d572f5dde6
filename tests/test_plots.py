"""The demo's figures (:mod:`sharpness.plots`) read cleanly: every drawn label distinct and clear of
the others, nothing cut off at the figure's edge, the 2-D landscape's suptitle clear of the panel
titles, round tick values on the logarithmic axes.

Each figure is drawn from synthetic data shaped like the demo's (a CNN whose losses all lie
between 1.97 and 2.32, an MLP whose 2-D landscape spans 0.035 to 17) and checked on the drawn
canvas: the boxes of the texts as they would appear in the PNG.
"""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest

pytest.importorskip("matplotlib")
np = pytest.importorskip("numpy")

from sharpness import plots  # noqa: E402

LABELS = {"sgd": "SGD", "sam": "SAM (rho=0.3)", "asam": "ASAM (rho=4, eta=0.01)"}


@pytest.fixture(autouse=True)
def as_saved(monkeypatch):
    """Records, as each figure is saved, the boxes of its texts as they are in the file: a later
    draw would lay the figure out again, and not always as the file shows it."""
    from matplotlib.figure import Figure

    saved = Figure.savefig

    def savefig(fig, *args, **kwargs):
        saved(fig, *args, **kwargs)
        fig.saved_boxes = _boxes(fig)

    monkeypatch.setattr(Figure, "savefig", savefig)


def _drawn_texts(fig) -> list:
    """Every text of ``fig`` that its last drawing showed: titles, axis labels, legend entries and
    the tick labels of the ticks inside each axis's view (colour bars included)."""
    texts = [fig._suptitle] if fig._suptitle is not None else []
    for ax in fig.axes:
        texts += [ax.title, ax.xaxis.label, ax.yaxis.label]
        legend = ax.get_legend()
        if legend is not None:
            texts += legend.get_texts()
        for axis in (ax.xaxis, ax.yaxis):
            low, high = sorted(axis.get_view_interval())
            slack = 1e-9 * max(abs(low), abs(high), 1.0)
            major, minor = axis.get_majorticklocs(), axis.get_minorticklocs()
            for locs, ticks in ((major, axis.get_major_ticks(len(major))), (minor, axis.get_minor_ticks(len(minor)))):
                for loc, tick in zip(locs, ticks):
                    if low - slack <= loc <= high + slack:
                        texts += [label for label in (tick.label1, tick.label2) if label.get_visible()]
    return [t for t in texts if t.get_visible() and t.get_text().strip()]


def _boxes(fig) -> list:
    """``(text, box in pixels)`` of every :func:`_drawn_texts` as last drawn (no new layout)."""
    renderer = fig.canvas.get_renderer()
    return [(t, t.get_window_extent(renderer)) for t in _drawn_texts(fig)]


def assert_readable(fig) -> None:
    """In the saved file, no two texts overlap (1 px of slack), and none is cut off at the edge."""
    boxes = fig.saved_boxes
    width, height = fig.bbox.width, fig.bbox.height
    for text, box in boxes:
        assert box.x0 >= -0.5 and box.y0 >= -0.5 and box.x1 <= width + 0.5 and box.y1 <= height + 0.5, (
            f"{text.get_text()!r} is cut off at the figure's edge: {box} in {width:.0f}x{height:.0f}")
    for (text_a, a), (text_b, b) in itertools.combinations(boxes, 2):
        overlap = min(a.x1, b.x1) - max(a.x0, b.x0), min(a.y1, b.y1) - max(a.y0, b.y0)
        assert min(overlap) <= 1.0, (
            f"{text_a.get_text()!r} and {text_b.get_text()!r} overlap by {overlap[0]:.1f}x{overlap[1]:.1f} px")


def _tick_texts(axis) -> list[str]:
    low, high = sorted(axis.get_view_interval())
    return [tick.label1.get_text() for loc, tick in zip(axis.get_majorticklocs(), axis.get_major_ticks())
            if low * (1 - 1e-9) <= loc <= high * (1 + 1e-9) and tick.label1.get_text()]


def _narrow_curves() -> dict:
    """Like the quick demo's CNN: every loss between 1.97 and 2.32, within one decade."""
    alphas = np.linspace(-1, 1, 21)
    return {
        "sgd": {"alphas": alphas, "losses": 2.14 + 0.17 * np.tanh(1.3 * alphas)},
        "sam": {"alphas": alphas, "losses": 2.30 - 0.03 * np.exp(-3 * (alphas + 1))},
        "asam": {"alphas": alphas, "losses": 2.29 - 0.04 * np.exp(-3 * (alphas + 1))},
    }


def _wide_curves() -> dict:
    """Like the full demo's MLP: 0.21 at SGD's minimum to about 3 at the ends."""
    alphas = np.linspace(-1, 1, 41)
    return {
        "sgd": {"alphas": alphas, "losses": 0.21 * np.exp(2.6 * alphas**2)},
        "sam": {"alphas": alphas, "losses": 1.03 + 0.7 * alphas**2},
        "asam": {"alphas": alphas, "losses": 0.86 + 0.9 * alphas**2},
    }


def _surfaces(kind: str) -> dict:
    a = np.linspace(-1, 1, 21)
    x, y = np.meshgrid(a, a, indexing="ij")
    r2 = x**2 + y**2
    if kind == "wide":  # the full demo's CNN: 0.035 at SGD's centre, about 17 in its corners
        grids = {"sgd": 0.035 * np.exp(3.1 * r2), "sam": 1.35 + 0.4 * r2, "asam": 0.97 + r2}
    else:  # the quick demo's: 1.79 to 2.29
        grids = {"sgd": 1.79 + 0.15 * r2, "sam": 2.18 + 0.05 * r2, "asam": 2.07 + 0.08 * r2}
    return {name: {"alphas": a, "betas": a, "losses": grid} for name, grid in grids.items()}


# -- round ticks on a log axis ---------------------------------------------------------------------


def test_log_axis_ticks_are_round_values_inside_the_range():
    assert plots.log_axis_ticks(0.2, 3.0) == pytest.approx([0.2, 0.5, 1.0, 2.0])  # 1-2-5 per decade
    assert plots.log_axis_ticks(0.035, 17.0) == pytest.approx([0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10])
    assert plots.log_axis_ticks(1e-4, 1e3) == pytest.approx([1e-4, 1e-3, 1e-2, 0.1, 1, 10, 100, 1000])  # powers of 10
    narrow = plots.log_axis_ticks(1.97, 2.32)  # not a single 1-2-5 value but 2: round values in between
    assert len(narrow) >= 3 and all(1.97 <= v <= 2.32 for v in narrow)
    assert plots.tick_labels(narrow) == ["2", "2.1", "2.2", "2.3"]
    assert plots.tick_labels([0.05, 0.1, 2.0, 10.0]) == ["0.05", "0.1", "2", "10"]  # no "1e+01"
    assert plots.tick_labels([1.8, 1.85, 1.9]) == ["1.8", "1.85", "1.9"]  # as many digits as it takes


# -- the figures, as drawn --------------------------------------------------------------------------


@pytest.mark.parametrize("curves", [_narrow_curves, _wide_curves], ids=["narrow", "wide"])
def test_landscape_1d_labels_its_log_axis_once_per_value(tmp_path, curves):
    fig = plots.plot_landscape_1d(curves(), LABELS, tmp_path / "line.png", title="1-D loss landscape (seed 0, CNN)")
    assert_readable(fig)
    ax = fig.axes[0]
    labels = _tick_texts(ax.yaxis)
    assert len(labels) >= 3 and len(set(labels)) == len(labels), labels  # before: "2.2" three times
    assert all(not label.get_text() for label in ax.yaxis.get_minorticklabels())  # minor ticks: no labels
    assert all(math.isclose(float(text), round(float(text), 2)) for text in labels)  # round values


@pytest.mark.parametrize("kind", ["wide", "narrow"])
def test_landscape_2d_panels_titles_and_colour_bar_stay_apart(tmp_path, kind):
    title = ("2-D loss landscape of the final models (seed 0, CNN, 40% label noise), filter-normalised "
             "directions, one colour scale")
    fig = plots.plot_landscape_2d(_surfaces(kind), LABELS, tmp_path / "plane.png", title=title)
    assert_readable(fig)  # before: "1.0" and "−1.0" ran into each other where two panels meet
    box = dict(fig.saved_boxes)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert len(panels) == 3
    gap = box[fig._suptitle].y0 - max(box[ax.title].y1 for ax in panels)
    assert gap >= 6, f"the suptitle sits {gap:.1f} px above the panel titles"  # before: 0.4 to 3.6 px
    # between two panels, the first one's last x tick label and the next one's first stand apart (more
    # than two digits' width): before, 9 px between "1.0" and "−1.0", which read as one "1.0−1.0"
    for left, right in zip(panels, panels[1:]):
        last = max((t for t in left.get_xticklabels() if t in box), key=lambda t: box[t].x1)
        first = min((t for t in right.get_xticklabels() if t in box), key=lambda t: box[t].x0)
        space = box[first].x0 - box[last].x1
        assert space >= 16, f"{last.get_text()!r} and {first.get_text()!r} are {space:.1f} px apart"
    colour_bar = next(ax for ax in fig.axes if not ax.get_title() and ax.get_ylabel())
    values = _tick_texts(colour_bar.yaxis)
    assert len(values) >= 3 and len(set(values)) == len(values)
    assert all(math.isclose(float(v), round(float(v), 2)) for v in values), values  # before: 0.0975, 5.98 ...


def test_accuracy_plot_counts_seeds_once_and_whole_epochs(tmp_path):
    rng = np.random.default_rng(0)
    histories = {name: (0.9 + 0.01 * rng.standard_normal((3, 2))).tolist() for name in LABELS}
    fig = plots.plot_accuracy(histories, LABELS, tmp_path / "accuracy.png", title="digits, MLP: test accuracy per epoch")
    assert_readable(fig)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(LABELS.values())  # not "(rho=0.3) (3 seeds)"
    assert "over 3 seeds" in ax.get_ylabel()
    assert _tick_texts(ax.xaxis) == ["1", "2"]  # a 2-epoch run: no "1.2" epochs
    uneven = {"sgd": histories["sgd"], "sam": histories["sam"][:1]}
    fig = plots.plot_accuracy(uneven, LABELS, tmp_path / "uneven.png")
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["SGD, 3 seeds", "SAM (rho=0.3), 1 seed"]


def test_rho_sweep_labels_the_factors_as_fractions(tmp_path):
    factors = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
    rows = [{"optimizer": "sgd", "factor": None, "rho": None, "accuracy_mean": 0.8, "accuracy_ci95": None}]
    for name, default in (("sam", 0.3), ("asam", 4.0)):
        rows += [{"optimizer": name, "factor": f, "rho": default * f, "accuracy_mean": 0.9 - 0.05 * abs(math.log2(f)),
                  "accuracy_ci95": 0.01} for f in factors]
    fig = plots.plot_rho_sweep(rows, tmp_path / "sweep.png", title="digits, MLP: test accuracy against ρ (3 seeds)")
    assert_readable(fig)
    assert _tick_texts(fig.axes[0].xaxis) == ["1/8", "1/4", "1/2", "1", "2", "4", "8"]  # before: 2⁻³ ... 2³


def test_rho_search_plot_is_readable(tmp_path):
    rows = [{"rho": rho, "ratio": ratio, "steps": 8, "status": status}
            for rho, ratio, status in ((0.01, 1.0, "reference"), (0.03, 0.9, "trains"), (0.1, 0.7, "trains"),
                                       (0.3, 0.1, "fails"), (1.0, None, "fails"))]
    search = SimpleNamespace(rows=rows, rho=0.1, cliff=0.3, keep=0.2)
    fig = plots.plot_rho_search({"sam": search}, tmp_path / "rho.png", title="--rho auto on digits: each radius's short run")
    assert_readable(fig)
