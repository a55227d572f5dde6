"""The scripts of examples/ run: each with ``--quick`` in a fresh interpreter, exit status 0 and
the line that reports its own checks (a resume bit for bit, replicas that agree, no torch in the
numpy example ...). CI runs them the same way (``.ci/run``)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# script -> (the modules it needs beyond torch, what its last lines must say)
EXPECTED = {
    "train_closure_batchnorm.py": (["sklearn"], "OK: 24 steps straight == 12 + checkpoint + resume + 12, bit for bit"),
    "two_call_amp.py": (["sklearn"], "OK: the overflowing steps were skipped, then every run learned"),
    "numpy_without_torch.py": ([], "OK: both methods learned, and torch was never imported"),
    "lightning_example.py": (["lightning", "sklearn"], "OK: every Lightning step is a SAM step; BatchNorm counted one batch"),
    "hf_trainer_example.py": (["transformers", "accelerate"], "OK: every Trainer step is a SAM step; the loss fell"),
    "ddp_two_processes.py": (["sklearn"], "OK: the 2 replicas end with identical weights, bit for bit"),
    "measure_sharpness.py": (["sklearn", "matplotlib"], "OK: every measure finite, m-sharpness >= 0, the models left exactly"),
}

# Makes `import torch` fail as it does where torch is not installed.
BLOCK_TORCH = """
import importlib.abc, runpy, sys
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoTorch())
"""


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=EXAMPLES)


def test_every_example_is_run_here():
    assert {p.name for p in EXAMPLES.glob("*.py")} == set(EXPECTED)
    readme = (EXAMPLES / "README.md").read_text()
    assert all(f"`{script}`" in readme for script in EXPECTED), "examples/README.md lists every script"


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_example_runs_in_quick_mode(script, tmp_path):
    needs, says = EXPECTED[script]
    for module in needs:
        pytest.importorskip(module)
    extra = ["--plot", str(tmp_path / "landscape.png")] if script == "measure_sharpness.py" else []
    done = _run(str(EXAMPLES / script), "--quick", *extra)
    assert done.returncode == 0, done.stdout + done.stderr
    assert says in done.stdout, done.stdout + done.stderr
    if extra:
        assert (tmp_path / "landscape.png").stat().st_size > 0


def test_the_numpy_example_runs_where_torch_cannot_be_imported():
    script = str(EXAMPLES / "numpy_without_torch.py")
    code = BLOCK_TORCH + f"sys.argv = [{script!r}, '--quick']\nrunpy.run_path({script!r}, run_name='__main__')"
    done = _run("-c", code)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "torch was never imported" in done.stdout


def _load(script: str):
    spec = importlib.util.spec_from_file_location(script.removesuffix(".py"), EXAMPLES / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_resume_check_fails_when_the_checkpoint_misses_the_optimizer(monkeypatch, capsys):
    """The quick mode's comparison is not vacuous: a resume that drops SAM's state (momentum,
    counters) is caught and reported with a non-zero status."""
    pytest.importorskip("sklearn")
    example = _load("train_closure_batchnorm.py")

    def without_optimizer(self, checkpoint):
        self.model.load_state_dict(checkpoint["model"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.step = checkpoint["step"]

    monkeypatch.setattr(example.Run, "load_state_dict", without_optimizer)
    assert example.main(["--quick", "--log-every", "100"]) == 1
    assert "FAILED: the resumed run differs" in capsys.readouterr().out


def test_measure_is_reachable_after_import_sharpness():
    """``sharpness.measure`` after a plain ``import sharpness``, in a fresh interpreter (nothing
    imported it before), as the measuring example uses it."""
    done = _run("-c", "import sharpness; print(sharpness.measure.m_sharpness.__module__); print('measure' in dir(sharpness))")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["sharpness.measure", "True"]


def test_the_guides_measuring_snippet_runs():
    """docs/guide.md "Measuring sharpness": its snippet, on a small BatchNorm model of the reader's."""
    import re

    import torch

    guide = (EXAMPLES.parent / "docs" / "guide.md").read_text()
    section = guide[guide.index("## Measuring sharpness") :]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = {"model": model, "x_train": torch.randn(512, 4), "y_train": torch.randint(0, 3, (512,))}
    exec(snippet, names)
    assert names["sharp"] >= 0 and names["top"] > 0 and names["trace"] > 0
    assert names["line"]["losses"].shape == (41,)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
