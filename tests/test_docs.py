"""The public API is documented: every exported class and function has a docstring with a runnable
example (the doctests run in the suite: pyproject's ``--doctest-modules``), and every optimizer
names its paper."""

from __future__ import annotations

import inspect
import re

import pytest
import registry
import torch

import sharpness
import sharpness.numpy

PUBLIC = [(f"sharpness.{name}", getattr(sharpness, name)) for name in sharpness.__all__ if name != "__version__"]
PUBLIC += [(f"sharpness.numpy.{name}", getattr(sharpness.numpy, name)) for name in sharpness.numpy.__all__]


@pytest.mark.parametrize("name, obj", PUBLIC, ids=[n for n, _ in PUBLIC])
def test_public_objects_have_a_docstring_with_an_example(name, obj):
    doc = inspect.getdoc(obj)
    assert doc, f"{name} has no docstring"
    assert ">>>" in doc, f"{name}: the docstring has no runnable example"


# The methods, from the registry (tests/registry.py): each class on the torch front.
OPTIMIZERS = [(f"sharpness.{name}", getattr(sharpness, name)) for name in registry.by_class()]


def test_the_registry_holds_every_exported_optimizer():
    exported = {n for n, o in PUBLIC if inspect.isclass(o) and issubclass(o, torch.optim.Optimizer)}
    assert exported == {n for n, _ in OPTIMIZERS}


@pytest.mark.parametrize("name, obj", OPTIMIZERS, ids=[n for n, _ in OPTIMIZERS])
def test_optimizers_name_their_paper(name, obj):
    doc = inspect.getdoc(obj) + (inspect.getdoc(inspect.getmodule(obj)) or "")
    assert re.search(r"(19|20)\d\d", doc) and re.search(r"arXiv|ICLR|ICML|NeurIPS|CVPR|AAAI|KDD|ECML|\bet al\b", doc), (
        f"{name}: the docstring does not cite its paper"
    )
