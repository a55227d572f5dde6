"""The numpy front without torch: `import sharpness` loads no torch, and with torch's import
blocked (as if it were not installed) every numpy method steps and the torch front names the
install command (`numpy_without_torch.py`, which `.ci/run` also runs in a torch-free environment
built from the wheel)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("numpy_without_torch.py")
# Makes `import torch` fail as it does where torch is not installed.
BLOCK_TORCH = """
import importlib.abc, sys
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoTorch())
"""


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_import_sharpness_loads_no_torch():
    done = _run("import sys, sharpness, sharpness.numpy; print('torch' in sys.modules)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_every_numpy_method_steps_without_torch():
    code = BLOCK_TORCH + f"\nsys.argv = [{str(SCRIPT)!r}]\nimport runpy\nrunpy.run_path({str(SCRIPT)!r}, run_name='__main__')"
    done = _run(code)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "torch absent" in done.stdout


@pytest.mark.parametrize("name", ["SAM", "LookSAM", "param_groups", "measure", "frozen_running_stats"])
def test_the_torch_front_without_torch_says_how_to_install_it(name):
    done = _run(BLOCK_TORCH + f"\nimport sharpness\ntry:\n    sharpness.{name}\nexcept ModuleNotFoundError as e:\n    print(e)\n")
    assert done.returncode == 0, done.stderr
    assert f"sharpness.{name} is part of the torch front" in done.stdout
    assert "pip install 'sharpness[torch]'" in done.stdout


def test_the_torch_front_loads_on_first_use():
    import sharpness

    assert sharpness.SAM.__module__ == "sharpness.optim.sam"
    assert sharpness.measure.__name__ == "sharpness.measure"
    assert set(sharpness.__all__) <= set(dir(sharpness))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        sharpness.nope  # noqa: B018


def test_the_command_line_without_torch_says_what_to_install():
    done = _run(BLOCK_TORCH + "\nimport runpy\nrunpy.run_module('sharpness', run_name='__main__')")
    assert done.returncode == 1
    assert "needs PyTorch: pip install 'sharpness[demo]'" in done.stderr
    assert "Traceback" not in done.stderr
