"""benches/bench_efficient.py, the efficient-methods benchmark of issue 17: its quick mode end to end,
and the pieces its tables rest on (paired differences and time ratios, the radius picked by the
sweep, BatchNorm statistics updated once per step, paired initial weights and batch order, the
synthetic tasks' labels), each checked against numbers worked out here."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import statistics
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("sklearn")

BENCH = Path(__file__).resolve().parents[1] / "benches" / "bench_efficient.py"
if not BENCH.exists():  # pragma: no cover - an installed package without the source tree
    pytest.skip("benches/bench_efficient.py is absent: not a source checkout", allow_module_level=True)


def _load():
    spec = importlib.util.spec_from_file_location("bench_efficient", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_efficient"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


bench = _load()
zoo = bench._zoo


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- the quick run, end to end --------------------------------------------------------------------------


def test_quick_run_writes_every_table_and_run(tmp_path):
    lines: list[str] = []
    results = bench.main(["--quick", "--sweep", "--bases", "sgd", "--out", str(tmp_path)], print_fn=lines.append)
    for name in ("runs.csv", "runs.json", "radii.json", "tables.md", "summary.json", "finder.json"):
        assert (tmp_path / name).exists(), name
    methods = [m for m in bench.METHODS if bench.missing(m) is None]
    pairs = bench.QUICK["pairs"]
    with open(tmp_path / "runs.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    main_rows = [r for r in rows if r["stage"] == "main"]
    assert len(main_rows) == len(pairs) * 1 * 2 * 1 * len(methods)  # pairs × bases × noise × seeds × methods
    sweep_methods = [m for m in ("sam", "msam") if m in methods]
    sweep_rows = [r for r in rows if r["stage"] == "sweep"]
    assert len(sweep_rows) == len(pairs) * 2 * 2 * len(sweep_methods)  # 2 radii per grid in quick mode

    # quick mode: one epoch over 128 examples
    assert {(r["epochs"], r["train_size"]) for r in main_rows} == {("1", "128")}

    radii = json.loads((tmp_path / "radii.json").read_text(encoding="utf-8"))
    for pair in pairs:
        assert radii["pairs"][pair]["sgd"]["rho"] in bench.QUICK["sam_grid"]
        if "msam" in methods:
            assert radii["pairs"][pair]["sgd"]["msam_rho"] in bench.QUICK["msam_grid"]
    # the main stage used the sweep's radii
    for r in main_rows:
        if r["method"] not in ("base", "msam"):
            assert float(r["rho"]) == radii["pairs"][r["pair"]]["sgd"]["rho"]

    report = (tmp_path / "tables.md").read_text(encoding="utf-8")
    assert "torch " in report and "sharpness " in report and "--quick --sweep" in report
    for pair in pairs:
        assert f"#### {pair}, sgd" in report
    for method in methods:
        assert f"| {bench.LABELS[method]} |" in report
    assert "Δ test accuracy to the base optimizer" in report
    if bench.finder_function() is not None:
        assert "Radius finder" in report
        finder = json.loads((tmp_path / "finder.json").read_text(encoding="utf-8"))
        assert len(finder["rows"]) == len(pairs) * 2 * len(sweep_methods)
        for row in finder["rows"]:
            grid = bench.QUICK["sam_grid"] if row["method"] == "sam" else bench.QUICK["msam_grid"]
            assert row["finder_rho"] in grid and row["finder_steps"] <= bench.QUICK["finder_budget"]
            assert row["finder_accuracy"] is not None  # trained at the pick (looked up or run)
    assert any(line.startswith("[main ") for line in lines) and "\r" not in "".join(lines)
    assert results["main"] and all(math.isfinite(r["time_ratio"]) for r in results["main"])


def test_methods_always_include_the_base_and_unknown_names_are_refused():
    settings = bench.settings_from(bench.parse_args(["--methods", "sam,esam"]))
    assert settings.methods == ("base", "sam", "esam")
    with pytest.raises(SystemExit):
        bench.settings_from(bench.parse_args(["--methods", "sam,nope"]))
    with pytest.raises(SystemExit):
        bench.settings_from(bench.parse_args(["--seeds", "0"]))


# -- the summaries ---------------------------------------------------------------------------------------


def _run(method, seed, accuracy, seconds, noise=0.0, rho=None):
    return {"stage": "main", "pair": "digits_mlp", "base": "sgd", "noise": noise, "seed": seed, "method": method,
            "rho": rho, "test_accuracy": accuracy, "seconds_per_epoch": seconds, "calls_per_step": 1.0,
            "stalled": False, "epochs": 3, "train_size": 100}


def test_paired_difference_and_time_ratio_are_per_seed():
    base_acc, sam_acc = [0.80, 0.70, 0.90], [0.85, 0.72, 0.86]
    base_s, sam_s = [1.0, 2.0, 1.0], [2.0, 3.0, 2.5]
    runs = [_run("base", s, a, t) for s, (a, t) in enumerate(zip(base_acc, base_s))]
    runs += [_run("sam", s, a, t, rho=0.1) for s, (a, t) in enumerate(zip(sam_acc, sam_s))]
    rows = {r["method"]: r for r in bench.summarize_main(runs)}
    differences = [0.05, 0.02, -0.04]
    assert rows["sam"]["delta"] == pytest.approx(sum(differences) / 3)
    assert rows["sam"]["delta_std"] == pytest.approx(statistics.stdev(differences))
    assert rows["sam"]["accuracy"] == pytest.approx(sum(sam_acc) / 3)
    # ratios 2, 1.5, 2.5: their median, not the ratio of medians (2.5 / 1 = 2.5)
    assert rows["sam"]["time_ratio"] == pytest.approx(2.0)
    assert rows["base"]["delta"] == 0 and rows["base"]["time_ratio"] == 1


def test_sweep_picks_the_best_radius_averaged_over_noise_levels():
    def row(rho, noise, accuracy, method="sam"):
        return {"pair": "digits_mlp", "base": "sgd", "noise": noise, "method": method, "rho": rho, "accuracy": accuracy}

    rows = [row(0.05, 0.0, 0.90), row(0.05, 0.4, 0.60), row(0.1, 0.0, 0.85), row(0.1, 0.4, 0.70),
            row(0.3, 0.0, 0.80), row(0.3, 0.4, 0.74),  # ties with 0.1 (0.775): the smaller wins
            row(1.0, 0.0, 0.5, "msam"), row(1.0, 0.4, 0.5, "msam"), row(3.0, 0.0, 0.6, "msam"), row(3.0, 0.4, 0.3, "msam")]
    picked = bench.pick_radii(rows)["pairs"]["digits_mlp"]["sgd"]
    assert picked["rho"] == 0.1 and picked["sam_accuracy"] == pytest.approx(0.775)
    assert picked["msam_rho"] == 1.0


def test_finder_picks_are_trained_off_the_grid_only_and_the_gap_is_to_the_best_radius():
    settings = bench.Settings(sweep_seeds=2)

    def run(rho, seed, accuracy, stage="sweep"):
        return {"stage": stage, "pair": "digits_mlp", "base": "sgd", "noise": 0.4, "method": "msam", "rho": rho,
                "seed": seed, "test_accuracy": accuracy, "seconds": 2.0, "steps": 100, "stalled": False}

    sweep = [run(rho, seed, acc) for rho, acc in ((0.2154, 0.6), (1.0, 0.8)) for seed, acc in ((1000, acc), (1001, acc))]
    on_grid = {"pair": "digits_mlp", "base": "sgd", "noise": 0.4, "method": "msam", "rho": 0.02154 * 10, "seconds": 0.5,
               "steps": 20, "run_steps": 100, "cliff": 4.642, "notes": []}
    off_grid = dict(on_grid, rho=0.4642 * 10)
    assert bench.finder_eval_tasks([on_grid], sweep, settings, quick=False) == []  # 0.21539999… is the sweep's 0.2154
    tasks = bench.finder_eval_tasks([off_grid], sweep, settings, quick=False)
    assert [(t.jobs[0].seed, t.jobs[0].rho, t.jobs[0].stage) for t in tasks] == [(1000, off_grid["rho"], "finder"),
                                                                               (1001, off_grid["rho"], "finder")]
    (row,) = bench.summarize_finder([on_grid], sweep, bench.summarize_sweep(sweep))
    assert row["finder_accuracy"] == pytest.approx(0.6) and row["sweep_rho"] == 1.0
    assert row["gap"] == pytest.approx(0.2)
    assert row["time_fraction"] == pytest.approx(0.25) and row["step_fraction"] == pytest.approx(0.2)


# -- one run's ingredients -------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["sam", "esam"])
def test_batchnorm_statistics_are_updated_once_per_step_at_w(method):
    import sharpness

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    x, y = torch.randn(8, 3), torch.randint(4, (8,))
    with torch.no_grad():
        expected_mean = 0.1 * model[0](x).mean(dim=0)  # BatchNorm's momentum 0.1, from zero, at w
    if method == "sam":
        opt = sharpness.SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    else:
        opt = sharpness.ESAM(model.parameters(), torch.optim.SGD, rho=0.5, beta=1.0, gamma=0.5, lr=0.1)
    closures = bench.StepClosures(model, opt, freeze_later_calls=True)
    closures.start(x, y)
    opt.step(closures.per_sample if method == "esam" else closures.mean_loss)
    assert closures.calls == (3 if method == "esam" else 2)  # the later calls ran, at w + e
    assert int(model[1].num_batches_tracked) == 1
    torch.testing.assert_close(model[1].running_mean, expected_mean)


def test_every_method_of_a_seed_gets_the_same_weights_and_batches():
    pair = zoo.PAIRS["digits_mlp"]
    first, again, other = bench.initial_state(pair, 3), bench.initial_state(pair, 3), bench.initial_state(pair, 4)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)
    order = [torch.cat(epoch).tolist() for epoch in bench.batch_order(10, 4, 2, seed=5)]
    assert order == [torch.cat(epoch).tolist() for epoch in bench.batch_order(10, 4, 2, seed=5)]
    assert all(sorted(epoch) == list(range(10)) for epoch in order) and order[0] != order[1]
    tasks = bench.main_tasks(bench.Settings(pairs=("digits_mlp",), bases=("sgd",), noises=(0.0,), seeds=2), {}, False)
    for task in tasks:  # one process runs all the methods of a seed, in an order rotated by the seed
        assert len({(j.pair, j.base, j.noise, j.seed) for j in task.jobs}) == 1
        assert sorted(j.method for j in task.jobs) == sorted(bench.METHODS)
    assert tasks[0].jobs[0].method != tasks[1].jobs[0].method


def test_a_run_with_rho_zero_is_the_base_optimizer():
    """SAM at ρ = 0 through the harness's closures: the base run's accuracy and loss (same weights,
    same batches, BatchNorm statistics updated once per step)."""
    job = bench.Job("main", "resnet_images", "sgd", 0.0, 0, "base", None, epochs=1, train_limit=64)
    base = bench.train_run(job)
    sam = bench.train_run(bench.Job("main", "resnet_images", "sgd", 0.0, 0, "sam", 0.0, epochs=1, train_limit=64))
    assert sam["calls_per_step"] == 2
    assert sam["test_accuracy"] == base["test_accuracy"]
    assert sam["test_loss"] == pytest.approx(base["test_loss"], rel=1e-5)


# -- the synthetic tasks -----------------------------------------------------------------------------------


def test_sequence_labels_are_the_mode_with_ties_to_the_first_seen():
    assert zoo.mode_labels(torch.tensor([[3, 1, 1, 3, 2]]), 5).tolist() == [3]  # 3 and 1 tie, 3 comes first
    assert zoo.mode_labels(torch.tensor([[0, 4, 4, 2, 2, 2]]), 5).tolist() == [2]
    tokens = torch.randint(10, (200, 16), generator=torch.Generator().manual_seed(1))
    expected = []
    for row in tokens.tolist():
        counts = {t: row.count(t) for t in row}
        top = max(counts.values())
        expected.append(min((t for t in counts if counts[t] == top), key=row.index))
    assert zoo.mode_labels(tokens, 10).tolist() == expected


def test_synthetic_images_are_fixed_balanced_and_labelled_by_prototype():
    x_train, y_train, x_test, y_test = zoo.synthetic_images(100, 50, seed=0)
    again = zoo.synthetic_images(100, 50, seed=0)
    assert torch.equal(x_train, again[0]) and torch.equal(y_test, again[3])
    assert x_train.shape == (100, 3, 16, 16) and x_test.shape == (50, 3, 16, 16)
    assert torch.bincount(y_train, minlength=10).tolist() == [10] * 10
    # without noise, distractor and shift, an image is its class prototype times a contrast: each
    # image then correlates best with another image of its own class
    x, y, _, _ = zoo.synthetic_images(40, 1, seed=0, modes=1, max_shift=0, distractor=0.0, noise=0.0)
    flat = x.flatten(1)
    similarity = torch.nn.functional.normalize(flat, dim=1) @ torch.nn.functional.normalize(flat, dim=1).T
    similarity.fill_diagonal_(-2)
    assert torch.equal(y[similarity.argmax(dim=1)], y)


def test_label_noise_touches_training_labels_only():
    data = zoo.PAIRS["transformer_seq"].load(0.4)
    clean = zoo.PAIRS["transformer_seq"].load(0.0)
    assert torch.equal(data.y_test, clean.y_test) and torch.equal(data.y_train_clean, clean.y_train)
    wrong = (data.y_train != data.y_train_clean).float().mean().item()
    assert 0.3 < wrong < 0.4  # 40% redrawn uniformly: about 9/10 of them wrong
