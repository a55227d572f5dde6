"""The demo (`python -m sharpness demo`): the command line, the label noise, the fairness of the
comparison (same data, same initial weights, same batches for every optimizer of a seed).

Configurations use ``threads=None`` (``--threads 0``) so that the demo leaves the process's
thread settings alone; the fixture ``one_thread`` runs torch on one thread meanwhile (the model
is tiny: on a busy machine more threads mostly wait on each other) and puts the count back.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("sklearn")

from sharpness import cli, demo  # noqa: E402
from sharpness.demo import DemoConfig, load_noisy_digits, randomize_labels  # noqa: E402

EXPECTED_TOP_KEYS = {"config", "dataset", "environment", "runs", "summary", "wall_seconds"}
EXPECTED_METRICS = {
    "test_accuracy", "train_loss", "train_accuracy", "train_accuracy_clean", "memorized", "seconds_per_epoch"
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
        assert set(entry["test_accuracy"]) == {"mean", "std"}
        assert entry["relative_time"] > 0
    assert results["summary"]["sgd"]["relative_time"] == pytest.approx(1.0)


def test_options_reach_the_config(tmp_path, capsys):
    argv = ["demo", "--quick", "--no-progress", "--threads", "0", "--optimizers", "sam,sgd", "--rho", "0.1",
            "--epochs", "1", "--seeds", "2", "--label-noise", "0.2", "--batch-size", "64", "--hidden", "32",
            "--schedule", "step", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    config = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))["config"]
    assert config["optimizers"] == ["sam", "sgd"]
    assert (config["rho"], config["epochs"], config["seeds"]) == (0.1, 1, 2)
    assert (config["label_noise"], config["batch_size"], config["hidden"], config["schedule"]) == (0.2, 64, 32, "step")
    assert "SAM (rho=0.1)" in capsys.readouterr().out


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
    assert "usage: sharpness demo" in done.stdout


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

    def recording(name, params, config):
        params = list(params)
        starts.append([p.detach().clone() for p in params])
        return real(name, params, config)

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
