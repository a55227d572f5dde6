"""The test registry (``tests/registry.py``) covers every method: each class of
:func:`sharpness.methods.every_method` (and SAM) has an entry, each entry's class exists on both
fronts and takes the entry's hyperparameters there, and the few facts the registry states rather
than derives agree with the classes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import registry
import torch

import sharpness
import sharpness.numpy
import sharpness.optim
from sharpness.methods import every_method
from sharpness.methods.base import Method


def test_every_method_has_an_entry():
    covered = {entry.name for entry in registry.ENTRIES}
    missing = sorted(set(every_method()) - covered)
    assert not missing, f"methods without a registry entry: {missing}"
    assert "SAM" in covered


def test_every_entry_names_a_class_of_both_fronts():
    for entry in registry.ENTRIES:
        assert entry.name in sharpness.optim.__all__ and entry.name in sharpness.numpy.__all__, entry
        assert issubclass(getattr(sharpness.optim, entry.name), entry.rule), entry
        assert issubclass(getattr(sharpness.numpy, entry.name), entry.rule), entry
        assert getattr(sharpness, entry.name) is getattr(sharpness.optim, entry.name)


def test_the_fronts_export_no_method_the_registry_lacks():
    covered = {entry.name for entry in registry.ENTRIES}
    assert set(sharpness.numpy.__all__) <= covered
    assert {n for n in sharpness.optim.__all__ if isinstance(getattr(sharpness.optim, n), type)
            and issubclass(getattr(sharpness.optim, n), Method)} <= covered


def test_labels_and_drives():
    assert len({e.label for e in registry.ENTRIES}) == len(registry.ENTRIES)
    for entry in registry.ENTRIES:
        assert entry.drive in registry.DRIVES, entry
        assert registry.get(entry.label) is entry
        assert entry.draws or not entry.draws_per_engine, entry
    assert registry.by_class().keys() == {e.name for e in registry.ENTRIES}


def test_stated_facts_agree_with_the_classes():
    """What the registry states (the call before a step's first pass) is what the classes need."""
    for name, rule in every_method().items():
        works_before = rule._before_first_pass is not Method._before_first_pass
        if works_before and not rule.begins_before_first_gradient:
            assert name in registry.STARTS_WITH, f"{name} does work before its first pass: name its call"
    for name, call in registry.STARTS_WITH.items():
        assert callable(getattr(getattr(sharpness.optim, name), call))


@pytest.mark.parametrize("label", registry.labels())
def test_every_entry_builds_on_both_fronts(label):
    """The entry's hyperparameters are valid on both fronts (the torch-only ones on the torch
    front), with and without a base optimizer as the method needs."""
    entry = registry.get(label)
    model = torch.nn.Linear(3, 2)
    opt = entry.torch(model.parameters(), torch.optim.SGD, base_kwargs=dict(lr=0.1))
    assert type(opt).method_name() == entry.name
    arrays = [np.zeros((3, 2)), np.zeros(2)]
    npopt = entry.numpy(arrays, "sgd", dict(lr=0.1))
    assert type(npopt).method_name() == entry.name
    assert registry.method_name(opt) == registry.method_name(npopt) == entry.name


def test_the_registry_imports_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "import registry\n"
        "print(len(registry.ENTRIES), sorted({e.drive for e in registry.ENTRIES}))\n"
        "print('torch' in sys.modules and sys.modules['torch'] is not None)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "False"
