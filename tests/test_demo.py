"""The demo (`python -m sharpness demo`): the command line, the label noise, the fairness of the
comparison (same data, same initial weights, same batches for every optimizer of a seed).

Configurations use ``threads=None`` (``--threads 0``) so that the demo leaves the process's
thread settings alone; the fixture ``one_thread`` runs torch on one thread meanwhile (the model
is tiny: on a busy machine more threads mostly wait on each other) and puts the count back.
"""

from __future__ import annotations

import csv
import io
import json
import math
import subprocess
import sys

import pytest
import torch

pytest.importorskip("sklearn")

from sharpness import cli, demo  # noqa: E402
from sharpness.demo import DemoConfig, load_noisy_digits, randomize_labels  # noqa: E402

EXPECTED_TOP_KEYS = {"config", "dataset", "environment", "runs", "summary", "wall_seconds"}
REPORT_FILES = ("results.json", "summary.csv", "summary.json", "accuracy.png", "landscape_1d.png",
                "landscape_2d.png")
EXPECTED_METRICS = {
    "test_accuracy", "train_loss", "train_accuracy", "train_accuracy_clean", "memorized", "seconds_per_epoch",
    "m_sharpness", "lambda_max",
}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits() -> demo.Dataset:
    return load_noisy_digits(label_noise=0.4, test_fraction=0.3, seed=0)


# -- the command line -----------------------------------------------------------------------------


def test_quick_demo_prints_the_table_and_writes_results(tmp_path, capsys):
    status = cli.main(["demo", "--quick", "--threads", "0", "--out", str(tmp_path)])
    assert status == 0
    out = capsys.readouterr().out
    assert "test acc (%)" in out and "train loss (noisy)" in out and "time/epoch" in out
    for label in ("SGD", "SAM (rho=", "ASAM (rho="):
        assert label in out
    assert "±" in out
    # both networks by default: one report sub-folder each, the combined table on top
    assert "== mlp ==" in out and "== cnn ==" in out and "MLP 64→" in out and "CNN 8×8" in out
    for model in ("mlp", "cnn"):
        for name in REPORT_FILES:
            assert (tmp_path / model / name).stat().st_size > 0, (model, name)
    combined = json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))
    assert [(r["model"], r["optimizer"]) for r in combined] == [
        (m, o) for m in ("mlp", "cnn") for o in ("sgd", "sam", "asam")
    ]
    csv_rows = list(csv.DictReader((tmp_path / "summary.csv").read_text(encoding="utf-8").splitlines()))
    assert [(r["model"], r["optimizer"]) for r in csv_rows] == [(r["model"], r["optimizer"]) for r in combined]
    for row, record in zip(csv_rows, combined):
        assert float(row["test_accuracy_mean"]) == pytest.approx(record["test_accuracy_mean"])
        assert float(row["lr"]) == record["lr"] == 0.02
    assert f"wrote {tmp_path / 'summary.json'}" in out
    cnn = json.loads((tmp_path / "cnn" / "results.json").read_text(encoding="utf-8"))
    assert cnn["config"]["model"] == "cnn" and set(cnn["landscapes"]["2d"]) == {"sgd", "sam", "asam"}

    tmp_path = tmp_path / "mlp"  # the MLP's report in detail
    results = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert EXPECTED_TOP_KEYS <= set(results)
    assert results["config"]["epochs"] == 2 and results["config"]["seeds"] == 1
    assert results["config"]["optimizers"] == ["sgd", "sam", "asam"]
    assert results["dataset"]["randomized"] == round(0.4 * results["dataset"]["train_size"])
    assert len(results["runs"]) == 3
    for run in results["runs"]:
        assert EXPECTED_METRICS <= set(run)
        assert len(run["history"]["test_accuracy"]) == 2
        assert 0.0 <= run["test_accuracy"] <= 1.0
    assert set(results["summary"]) == {"sgd", "sam", "asam"}
    for entry in results["summary"].values():
        assert EXPECTED_METRICS <= set(entry)
        assert set(entry["test_accuracy"]) == {"mean", "std", "ci95"}
        assert entry["relative_time"] > 0
    assert results["summary"]["sgd"]["relative_time"] == pytest.approx(1.0)
    assert "m-sharpness" in out and "λ_max" in out
    for run in results["runs"]:
        assert run["m_sharpness"] >= 0 and run["lambda_max"] > 0

    # the report folder: the table as CSV and JSON, the figures as PNG
    for name in REPORT_FILES:
        assert (tmp_path / name).stat().st_size > 0, name
        assert f"wrote {tmp_path / name}" in out
    for name in ("accuracy.png", "landscape_1d.png", "landscape_2d.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader((tmp_path / "summary.csv").read_text(encoding="utf-8").splitlines()))
    assert [row["optimizer"] for row in rows] == ["sgd", "sam", "asam"]
    for row, name in zip(rows, ("sgd", "sam", "asam")):
        summary = results["summary"][name]
        assert float(row["test_accuracy_mean"]) == pytest.approx(summary["test_accuracy"]["mean"])
        assert float(row["lambda_max_mean"]) == pytest.approx(summary["lambda_max"]["mean"])
    table = json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))
    assert [r["optimizer"] for r in table] == ["sgd", "sam", "asam"] and "model" not in table[0]
    for record, row in zip(table, rows):
        assert record["m_sharpness_mean"] == pytest.approx(float(row["m_sharpness_mean"]))
        assert record["relative_time"] == pytest.approx(float(row["relative_time"]))
    # landscapes of seed 0's models: one grid, finite, the centre is the final training loss
    scapes = results["landscapes"]
    assert set(scapes["1d"]) == set(scapes["2d"]) == {"sgd", "sam", "asam"}
    steps = results["config"]["landscape_steps"]
    for name, surface in scapes["2d"].items():
        assert surface["alphas"] == scapes["2d"]["sgd"]["alphas"]
        assert len(surface["losses"]) == steps and len(surface["losses"][0]) == steps
        curve = scapes["1d"][name]
        assert len(curve["losses"]) == 2 * steps - 1
        run = next(r for r in results["runs"] if r["optimizer"] == name)
        n = results["config"]["measure_size"]
        assert curve["losses"][steps - 1] == pytest.approx(surface["losses"][steps // 2][steps // 2], rel=1e-5)
        assert run["train_loss"] > 0 and all(math.isfinite(v) for v in curve["losses"]) and n > 0


def test_landscape_panels_share_one_colour_scale(tmp_path):
    from sharpness import plots

    grid = [-1.0, 0.0, 1.0]
    surfaces = {
        "sgd": {"alphas": grid, "betas": grid, "losses": [[3.0, 2.0, 3.0], [2.0, 0.5, 2.0], [3.0, 2.0, 3.0]]},
        "sam": {"alphas": grid, "betas": grid, "losses": [[1.2, 1.1, 1.2], [1.1, 1.0, 1.1], [1.2, 1.1, 1.2]]},
    }
    path = tmp_path / "plane.png"
    fig = plots.plot_landscape_2d(surfaces, {"sgd": "SGD", "sam": "SAM"}, path)
    assert path.read_bytes()[:4] == b"\x89PNG"
    # both panels on the same scale, spanning the lowest and the highest loss of the two
    assert fig.sharpness_clims == [(0.5, 3.0), (0.5, 3.0)]


def test_options_reach_the_config(tmp_path, capsys):
    argv = ["demo", "--quick", "--no-progress", "--threads", "0", "--optimizers", "sam,sgd", "--rho", "0.1",
            "--epochs", "1", "--seeds", "2", "--label-noise", "0.2", "--batch-size", "64", "--hidden", "32",
            "--schedule", "step", "--models", "mlp", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    config = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))["config"]
    assert config["optimizers"] == ["sam", "sgd"]
    assert (config["rho"], config["epochs"], config["seeds"]) == (0.1, 1, 2)
    assert (config["label_noise"], config["batch_size"], config["hidden"], config["schedule"]) == (0.2, 64, 32, "step")
    assert "SAM (rho=0.1)" in capsys.readouterr().out


def test_both_models_by_default_and_the_cnn():
    # the report layout of several models is checked by the quick run above
    assert cli.build_parser().parse_args(["demo"]).models == ("mlp", "cnn") == demo.DEFAULT_MODELS
    assert cli.build_parser().parse_args(["demo", "--models", "CNN"]).models == ("cnn",)
    model = demo.build_model(64, 10, hidden=16, kind="cnn")
    convs = [m for m in model if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(1, 16, (3, 3)), (16, 32, (3, 3))]
    assert model(torch.zeros(5, 64)).shape == (5, 10)
    with pytest.raises(ValueError):
        demo.build_model(63, 10, kind="cnn")  # not a square image
    for argv in (["demo", "--models", "mlp,resnet"], ["demo", "--models", "mlp,mlp"]):
        with pytest.raises(SystemExit):
            cli.main(argv)
    with pytest.raises(ValueError):
        demo.run_models(DemoConfig(), models=())


def test_tune_picks_each_learning_rate_on_a_validation_split(tmp_path, capsys, digits):
    split = demo.validation_split(digits, 0.2, seed=0)
    n = len(digits.y_train)
    assert len(split.y_train) + len(split.y_test) == n and len(split.y_test) == math.ceil(0.2 * n)
    rows = {tuple(r) for r in digits.x_train.tolist()}
    fit, val = {tuple(r) for r in split.x_train.tolist()}, {tuple(r) for r in split.x_test.tolist()}
    assert fit | val == rows and not fit & val  # a partition of the training part, test set untouched
    argv = ["demo", "--no-progress", "--threads", "0", "--optimizers", "sgd,sam", "--epochs", "1", "--seeds", "1",
            "--hidden", "16", "--measure-size", "0", "--tune", "--tune-lrs", "0.001,0.05", "--models", "mlp",
            "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    tuning = results["tuning"]
    for name in ("sgd", "sam"):
        scores = tuning["val_accuracy"][name]
        assert set(scores) == {"0.001", "0.05"}
        assert tuning["chosen"][name] == float(max(scores, key=scores.get))
        assert f"tuning {name:>4}:" in out
    assert dict(results["config"]["optimizer_lrs"]) == tuning["chosen"]
    assert "(tuned)" in out
    table = json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))
    assert {r["optimizer"]: r["lr"] for r in table} == tuning["chosen"]  # the table says which lr ran
    with pytest.raises(SystemExit):
        cli.main(["demo", "--tune-lrs", "0.1,-1"])


def test_no_report_and_no_measures(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["demo", "--no-progress", "--threads", "0", "--optimizers", "sgd", "--epochs", "1", "--seeds", "1",
            "--hidden", "16", "--measure-size", "0", "--no-report", "--models", "cnn"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "n/a" in out and "wrote" not in out and "CNN 8×8" in out and "==" not in out
    assert list(tmp_path.iterdir()) == []  # not even the default ./sharpness-report


def test_help_and_bad_arguments(capsys):
    for argv in (["--help"], ["demo", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 0
    assert "--label-noise" in capsys.readouterr().out
    for argv in (["demo", "--optimizers", "sgd,adam"], ["demo", "--label-noise", "1.5"], ["demo", "--epochs", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2
    assert cli.main([]) == 2  # no command: the help, and a usage error


def test_python_dash_m_help():
    argv = [sys.executable, "-m", "sharpness", "demo", "--help"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "usage: python -m sharpness demo" in done.stdout  # the command as typed


def test_usage_names_the_command_as_typed(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/venv/bin/sharpness", "demo"])  # the console script
    assert cli.invoked_as() == "sharpness" and cli.build_parser().prog == "sharpness"
    main = cli.__file__.replace("cli.py", "__main__.py")
    monkeypatch.setattr(sys, "argv", [main, "demo"])  # python -m sharpness
    assert cli.invoked_as() == "python -m sharpness"
    monkeypatch.setattr(sys, "argv", ["/elsewhere/pytest/__main__.py"])  # another package's python -m
    assert cli.invoked_as() == "sharpness"


# -- what the demo needs, checked before it trains; progress in a log ----------------------------------


def _no_training(monkeypatch):
    """Makes any data loading or training fail the test: the checks must come first."""
    from sharpness import sweep

    def trained(*args, **kwargs):
        raise AssertionError("the demo loaded data or trained before checking its requirements")

    for module in (demo, sweep):
        monkeypatch.setattr(module, "load_noisy_digits", trained)
        monkeypatch.setattr(module, "train_run", trained)


def test_missing_matplotlib_fails_before_any_training(tmp_path, capsys, monkeypatch):
    _no_training(monkeypatch)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    for extra in ([], ["--rho-sweep"]):
        assert cli.main(["demo", "--quick", "--out", str(tmp_path / "report"), *extra]) == 2
        err = capsys.readouterr().err
        assert "matplotlib (the report's plots)" in err and "python -m pip install matplotlib" in err, err
        assert "--no-report" in err and "nothing was run" in err
    assert not (tmp_path / "report").exists()
    config = DemoConfig(progress=False)
    assert "matplotlib" not in demo.requirements(config, report=False)  # --no-report: no plots, no matplotlib
    demo.check_requirements(config, report=False)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # as if scikit-learn were missing too
    with pytest.raises(demo.MissingRequirement, match=r"scikit-learn \(the digits data\), matplotlib .*"
                       r"python -m pip install scikit-learn matplotlib"):
        demo.check_requirements(config, report=True)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bars_only_on_a_terminal():
    assert demo._progress_factory(False, _Terminal()) is demo._NoProgress
    tqdm = pytest.importorskip("tqdm.auto").tqdm
    assert demo._progress_factory(True, _Terminal()) is tqdm
    assert isinstance(demo._progress_factory(True, io.StringIO())(total=3), demo._LineProgress)
    # tqdm is needed (and checked for) only where it draws
    assert "tqdm" in demo.requirements(DemoConfig(progress=True), report=False, stream=_Terminal())
    assert "tqdm" not in demo.requirements(DemoConfig(progress=True), report=False, stream=io.StringIO())
    assert "tqdm" not in demo.requirements(DemoConfig(progress=False), report=False, stream=_Terminal())


def test_progress_in_a_log_is_plain_periodic_lines(capsys, monkeypatch, digits):
    """The demo's runs with progress on and stderr captured (not a terminal, as in `> log 2>&1`):
    lines, never tqdm's carriage returns."""
    monkeypatch.setattr(demo, "load_noisy_digits", lambda *args, **kwargs: digits)
    monkeypatch.setattr(demo, "PROGRESS_LINE_SECONDS", 0.0)  # a line at every tenth, however fast the run
    config = DemoConfig(epochs=4, seeds=1, optimizers=("sgd", "sam"), hidden=16, measure_size=0, threads=None,
                        progress=True)
    demo.run_demo(config, print_fn=lambda *_: None)
    err = capsys.readouterr().err
    assert "\r" not in err
    for name in ("sgd", "sam"):
        for done in range(1, 5):
            assert f"{name} seed 0: {done}/4 ep ({25 * done}%), " in err, err
    assert "loss=" in err and "test_acc=" in err and "s left" in err


def test_line_progress_prints_at_tenths_at_most_every_few_seconds():
    now = [0.0]
    out = io.StringIO()
    with demo._LineProgress(total=20, desc="rho sweep", unit="run", stream=out, clock=lambda: now[0]) as bar:
        for _ in range(20):
            now[0] += 1.0  # one second per run: a tenth every 2 s, a line every 10 s at most
            bar.update(1)
    lines = out.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == ["rho sweep: 10/20 run (50%)", "rho sweep: 20/20 run (100%)"]
    assert lines[0] == "rho sweep: 10/20 run (50%), 10 s, ~10 s left"
    short = io.StringIO()
    with demo._LineProgress(total=5, desc="fast", stream=short, clock=lambda: 0.0) as bar:
        for _ in range(5):
            bar.update(1)
    assert short.getvalue() == ""  # a bar done within the interval prints nothing: its result line says it


# -- label noise -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.4, 1.0])
def test_randomize_labels_flips_the_requested_fraction(fraction):
    n, classes = 20_000, 10
    labels = torch.randint(classes, (n,), generator=torch.Generator().manual_seed(1))
    original = labels.clone()
    noisy, mask = randomize_labels(labels, fraction, classes, torch.Generator().manual_seed(2))
    assert torch.equal(labels, original)  # the input is left alone
    assert int(mask.sum()) == round(fraction * n)  # exactly this many randomised
    assert torch.equal(noisy[~mask], labels[~mask])  # the others untouched
    # a randomised label is uniform over the classes: wrong with probability 9/10
    changed = (noisy != labels).float().mean().item()
    assert changed == pytest.approx(fraction * (1 - 1 / classes), abs=0.01)
    if fraction > 0:
        counts = torch.bincount(noisy[mask], minlength=classes).float() / mask.sum()
        assert torch.all((counts - 1 / classes).abs() < 0.02)


def test_randomize_labels_rejects_bad_fractions():
    with pytest.raises(ValueError):
        randomize_labels(torch.zeros(5, dtype=torch.long), 1.5, 10, torch.Generator())


def test_noise_touches_only_the_training_labels(digits):
    clean = load_noisy_digits(label_noise=0.0, test_fraction=0.3, seed=0)
    # the same split and scaling, whatever the noise
    assert torch.equal(digits.x_test, clean.x_test) and torch.equal(digits.y_test, clean.y_test)
    assert torch.equal(digits.x_train, clean.x_train)
    assert torch.equal(digits.y_train_clean, clean.y_train)
    assert torch.equal(clean.y_train, clean.y_train_clean) and not clean.noisy_mask.any()
    # 40% of the training labels randomised, about 9/10 of those now wrong, the rest untouched
    n = len(digits.y_train)
    assert int(digits.noisy_mask.sum()) == round(0.4 * n)
    assert torch.equal(digits.y_train[~digits.noisy_mask], digits.y_train_clean[~digits.noisy_mask])
    wrong = (digits.y_train != digits.y_train_clean).float().mean().item()
    assert 0.30 < wrong < 0.40
    # standardised on the training part
    assert digits.x_train.mean(0).abs().max() < 1e-4
    # deterministic
    again = load_noisy_digits(label_noise=0.4, test_fraction=0.3, seed=0)
    assert torch.equal(again.y_train, digits.y_train)


# -- a fair comparison -----------------------------------------------------------------------------


def test_every_optimizer_of_a_seed_starts_from_the_same_weights(monkeypatch, digits):
    starts: list[list[torch.Tensor]] = []
    real = demo.make_optimizer

    def recording(name, params, config, total_steps=None, num_data=None):
        params = list(params)
        starts.append([p.detach().clone() for p in params])
        return real(name, params, config, total_steps, num_data)

    monkeypatch.setattr(demo, "make_optimizer", recording)
    monkeypatch.setattr(demo, "load_noisy_digits", lambda *args, **kwargs: digits)
    config = DemoConfig(epochs=1, seeds=2, threads=None, progress=False, hidden=16)
    demo.run_demo(config, print_fn=lambda *_: None)
    assert len(starts) == 2 * len(config.optimizers)  # seed-major: seed 0's optimizers, then seed 1's
    per_seed = [starts[: len(config.optimizers)], starts[len(config.optimizers) :]]
    for runs in per_seed:
        for other in runs[1:]:
            assert all(torch.equal(a, b) for a, b in zip(runs[0], other))
    assert not all(torch.equal(a, b) for a, b in zip(per_seed[0][0], per_seed[1][0]))


def test_sam_with_rho_zero_retraces_sgd(digits):
    """Same weights, same batches, same schedule: SAM with ρ=0 is its base SGD, so the two runs
    end (up to rounding) at the same place; a difference in data order or start would show."""
    config = DemoConfig(epochs=2, rho=0.0, asam_rho=0.0, threads=None, progress=False, hidden=32)
    init = demo.initial_state(config, digits, seed=3)
    sgd = demo.train_run(config, digits, "sgd", 3, init=init)
    for name in ("sam", "asam"):
        other = demo.train_run(config, digits, name, 3, init=init)
        assert other["train_loss"] == pytest.approx(sgd["train_loss"], rel=1e-4)
        assert other["history"]["train_loss"] == pytest.approx(sgd["history"]["train_loss"], rel=1e-4)
        assert other["test_accuracy"] == pytest.approx(sgd["test_accuracy"], abs=2 / len(digits.y_test))


def test_initial_state_depends_on_the_seed_only(digits):
    config = DemoConfig(hidden=16)
    a, b, c = (demo.initial_state(config, digits, s) for s in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_config_validation():
    with pytest.raises(ValueError):
        DemoConfig(optimizers=("sgd", "adam"))
    with pytest.raises(ValueError):
        DemoConfig(label_noise=-0.1)
    with pytest.raises(ValueError):
        DemoConfig(schedule="linear")


# -- sharpness bench ---------------------------------------------------------------------------------


def test_bench_passes_its_arguments_through(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda argv, env=None: calls.append((argv, env)) or 0)
    monkeypatch.setattr(sys, "argv", ["/venv/bin/sharpness"])
    assert cli.main(["bench", "--quick", "--shapes", "resnet18"]) == 0
    assert cli.main(["bench", "--", "--help"]) == 0
    (first, env), (second, _) = calls
    assert first[0] == sys.executable and first[1].endswith("bench_step.py")
    assert first[2:] == ["--quick", "--shapes", "resnet18"] and second[2:] == ["--help"]
    assert env["SHARPNESS_BENCH_PROG"] == "sharpness bench"  # the script's usage line names the command
    # unknown arguments stay an error for the other commands
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--no-such-option"])
    assert exit_info.value.code == 2


def test_bench_quick_runs_from_the_checkout():
    """``sharpness bench --quick`` for real, reduced further (two small transformer blocks, one
    repetition) to keep the suite fast: the benchmark's table of ratios comes out."""
    if cli._bench_script() is None:
        pytest.skip("benches/bench_step.py is absent: not a source checkout")
    argv = [sys.executable, "-m", "sharpness", "bench", "--quick", "--shapes", "transformer", "--blocks", "2",
            "--reps", "1", "--steps", "1", "--warmup", "0", "--threads", "1"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "sharpness.SAM" in done.stdout and "x floor" in done.stdout and "vs 1" in done.stdout


def test_bench_help_names_the_command_and_explains_the_methods():
    if cli._bench_script() is None:
        pytest.skip("benches/bench_step.py is absent: not a source checkout")
    done = subprocess.run([sys.executable, "-m", "sharpness", "bench", "--help"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m sharpness bench ")  # before: "usage: bench_step.py"
    methods = done.stdout[done.stdout.index("methods (--methods)"):]
    explained = {line.split()[0]: line for line in methods.splitlines()[1:] if line[:3].strip()}
    assert set(explained) == {"1", "2", "3", "4", "4b", "5", "6"}, methods
    for key, words in (("1", "per-tensor"), ("2", "foreach"), ("3", "flat"), ("4", "autograd"), ("4b", "in place"),
                       ("5", "p.grad = None"), ("6", "floor")):
        assert words in explained[key], (key, explained[key])


def test_bench_outside_a_source_checkout(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_bench_script", lambda: None)
    assert cli.main(["bench", "--quick"]) == 2
    assert "source checkout" in capsys.readouterr().err


# -- --rho auto (sharpness.find_rho before the runs) --------------------------------------------------


def test_rho_auto_finds_each_radius_before_the_runs(tmp_path, capsys):
    argv = ["demo", "--quick", "--rho", "auto", "--models", "mlp", "--optimizers", "sgd,sam,asam", "--threads", "0",
            "--no-progress", "--hidden", "32", "--measure-size", "0", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    search = results["rho_search"]
    assert set(search) == {"sam", "asam"}  # SGD takes no radius
    found = dict(results["config"]["optimizer_rhos"])
    run_steps = 2 * math.ceil(results["dataset"]["train_size"] / 32)  # --quick: 2 epochs of batches of 32
    for name, report in search.items():
        grid = [row["rho"] for row in report["rows"]]
        assert found[name] == report["rho"] in grid
        assert report["run_steps"] == run_steps and report["budget_steps"] == math.floor(0.2 * run_steps)
        assert 0 < report["steps"] <= report["budget_steps"]  # at most 20% of the run it precedes
        assert report["steps_fraction"] == pytest.approx(report["steps"] / run_steps) and report["steps_fraction"] <= 0.2
        assert report["seconds_fraction"] == pytest.approx(report["seconds"] / report["run_seconds"])
        assert f"--rho auto, {name}: rho {report['rho']:g}; search {report['steps']} steps" in out
    # the quick run's budget (16 steps) holds two radii of 8 steps: the default grid's ends, ASAM's ×10
    assert [row["rho"] for row in search["sam"]["rows"]] == [0.01, 1.0]
    assert [row["rho"] for row in search["asam"]["rows"]] == pytest.approx([0.1, 10.0])
    assert "held-out loss" in out and "budgeted steps" in out  # the tables, printed before the runs
    assert out.index("held-out loss") < out.index("sam seed 0:")
    # the runs took the picks: the table's labels and the optimizers' radii
    assert f"SAM (rho={found['sam']:g})" in out and f"ASAM (rho={found['asam']:g}, eta=0.01)" in out
    assert (tmp_path / "rho_search.png").read_bytes()[:4] == b"\x89PNG"
    assert f"wrote {tmp_path / 'rho_search.png'}" in out


def test_found_radii_reach_the_optimizers():
    config = DemoConfig(optimizers=("sam", "asam", "looksam"), optimizer_rhos=(("sam", 0.07), ("asam", 2.5)))
    params = [torch.nn.Parameter(torch.zeros(3))]
    assert demo.make_optimizer("sam", params, config).param_groups[0]["sam_rho"] == 0.07
    assert demo.make_optimizer("asam", params, config).param_groups[0]["sam_rho"] == 2.5
    assert demo.make_optimizer("looksam", params, config).param_groups[0]["sam_rho"] == config.rho  # not searched
    assert demo.make_optimizer("esam", params, config).param_groups[0]["sam_rho"] == pytest.approx(config.rho * 0.6)


def test_search_grid_thins_to_the_budget():
    from sharpness.rho_finder import DEFAULT_GRID, MIN_STEPS, max_runs

    assert demo.search_grid(320, DEFAULT_GRID) == list(DEFAULT_GRID)  # the demo's default run: 1,600 steps
    for budget in (16, 30, 47, 100):
        grid = demo.search_grid(budget, DEFAULT_GRID)
        assert grid[0] == DEFAULT_GRID[0] and grid[-1] == DEFAULT_GRID[-1] and set(grid) <= set(DEFAULT_GRID)
        assert budget // max_runs(len(grid)) >= MIN_STEPS  # fits
        if len(grid) < len(DEFAULT_GRID):
            assert budget // max_runs(len(grid) + 1) < MIN_STEPS  # and is the largest that fits
    with pytest.raises(ValueError, match="too small"):
        demo.search_grid(15, DEFAULT_GRID)


def test_rho_auto_bad_arguments(capsys):
    for argv in (["demo", "--rho", "automatic"], ["demo", "--rho", "-0.1"], ["demo", "--rho-budget", "0"],
                 ["demo", "--rho-budget", "1.5"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2
    assert cli.main(["demo", "--rho", "auto", "--rho-sweep", "--no-report", "--quick"]) == 2
    assert "--rho auto is for training runs" in capsys.readouterr().err
    assert cli.build_parser().parse_args(["demo", "--rho", "AUTO"]).rho == "auto"
    assert cli.build_parser().parse_args(["demo", "--rho", "0.3"]).rho == 0.3
    with pytest.raises(ValueError, match="rho_budget"):
        DemoConfig(rho_budget=0.0)
