"""Every numeric hyperparameter of every method, on both fronts, is checked by name.

Generated from one table: each method (torch front, numpy front, and SAF/MESA) with each numeric
hyperparameter set to a string, ``None``, a list, a 0-d tensor (or 0-d numpy array), ``True``
and a float where an integer is meant must raise a ``TypeError``; a number out of range must raise
a ``ValueError`` that is not a ``TypeError``. Per-group keys (``sam_rho``, ``sam_eta``,
``sam_norm_weight``, GSAM's ``gsam_*``) get the same treatment. Every message must name the
argument and say what it must be ("... must be ...").
"""

from __future__ import annotations

import math
import re
import subprocess
import sys

import numpy as np
import pytest
import registry
import torch

import sharpness

SGD = torch.optim.SGD


def _tparams():
    return torch.nn.Linear(3, 2).parameters()


def _np():
    return [np.zeros(3), np.zeros(2)]


# {name: (good, bad, kind)} by method (class name), checked on both fronts (the checks are the
# rule's, shared by the fronts); bad: out of range (None: no such value).
# kind: "real" a number, "int" an integer, "pair" a pair of numbers (betas);
# "none_ok" / "list_ok" suffixes mark the values that are valid there.
HYPERPARAMETERS = {
    "SAM": {"rho": (0.05, -1.0, "real"), "eta": (0.01, -1.0, "real")},
    "LookSAM": {"k": (5, 0, "int"), "alpha": (0.7, -1.0, "real"), "rho": (0.05, math.nan, "real")},
    "EveryKSAM": {"k": (5, 0, "int")},
    "MSharpnessSAM": {"micro_batches": (2, 0, "int")},
    "SAMPa": {"lam": (0.2, 1.5, "real"), "rho": (0.1, -1.0, "real")},
    "AESAM": {
        "total_steps": (10, 0, "int"),
        "delta": (0.9, 1.0, "real"),
        "lam1": (-1.0, math.inf, "real"),
        "lam2": (1.0, math.nan, "real"),
    },
    "ESAM": {"beta": (0.6, 0.0, "real"), "gamma": (0.5, 1.5, "real")},
    "LETS": {
        "rho": (0.05, -1.0, "real"),
        "rho_lr": (1.0, -1.0, "real"),
        "rho_min": (1e-4, -1.0, "real"),
        "rho_max": (1.0, -1.0, "real"),
    },
    "LightSAM": {
        "lr": (0.1, -1.0, "real none_ok"),
        "eps": (1e-8, 0.0, "real"),
        "betas": ((0.9, 0.999), (1.0, 0.9), "pair"),
        "rho": (0.05, -1.0, "real"),
    },
    "AdaSAM": {
        "lr": (1e-3, -1.0, "real"),
        "eps": (1e-8, 0.0, "real"),
        "betas": ((0.9, 0.999), (0.9, -0.1), "pair"),
        "rho": (0.05, -1.0, "real"),
    },
    "BayesianSAM": {
        "num_data": (100, 0, "real"),
        "lr": (0.1, -1.0, "real"),
        "weight_decay": (1e-4, -1.0, "real"),
        "damping": (0.1, -1.0, "real"),
        "s_init": (1.0, 0.0, "real"),
        "betas": ((0.9, 0.999), (0.9, 1.0), "pair"),
        "rho": (0.05, -1.0, "real"),
    },
    "GAM": {
        "rho": (0.05, -1.0, "real"),
        "norm_rho": (0.2, -1.0, "real"),
        "beta1": (1.0, math.nan, "real"),
        "beta2": (1.0, math.inf, "real"),
        "beta3": (1.0, math.nan, "real"),
        "gamma": (0.1, math.inf, "real"),
    },
    "CRSAM": {"rho": (0.1, -1.0, "real"), "gamma": (0.1, math.nan, "real"), "beta": (0.1, math.inf, "real")},
    "GSAM": {
        "alpha": (0.1, -1.0, "real"),
        "rho_min": (0.01, -1.0, "real none_ok"),
        "lr_max": (0.1, -1.0, "real none_ok"),
        "lr_min": (0.0, -1.0, "real"),
    },
    "FriendlySAM": {"sigma": (1.0, math.inf, "real"), "lam": (0.9, 1.5, "real")},
    "WSAM": {"gamma": (0.9, 1.0, "real")},
    "RandomSAM": {"sigma": (1.5e-3, -1.0, "real"), "lam": (2.0, 0.0, "real")},
    "MongeSAM": {"rho": (0.05, -1.0, "real"), "eta": (0.01, math.nan, "real")},
    "SSAMF": {"sparsity": (0.5, 1.0, "real")},
    "SSAMD": {"sparsity": (0.5, -0.1, "real"), "drop_rate": (0.5, 1.5, "real")},
    "MomentumSAM": {"rho": (0.3, -1.0, "real")},
}
# Each method is built from its first entry in the registry (tests/registry.py), the checked
# hyperparameter replacing the entry's; on an SGD base where it takes one.
METHODS = registry.by_class()


def _torch_builder(entry):
    return lambda **kw: entry.torch(_tparams(), SGD, base_kwargs=dict(lr=0.1), **kw)


def _numpy_builder(entry, base=None):
    return lambda **kw: entry.numpy(_np(), base, **kw)


# (label, builder(**kw) -> object, {name: (good, bad, kind)})
TORCH = [(name, _torch_builder(METHODS[name]), HYPERPARAMETERS[name]) for name in METHODS] + [
    (
        "SAF",
        lambda **kw: sharpness.SAF(**{"num_samples": 8, "num_classes": 3, **kw}),
        {
            "num_samples": (8, 0, "int"),
            "num_classes": (3, 0, "int"),
            "lam": (0.3, -1.0, "real"),
            "temperature": (5.0, 0.0, "real"),
            "lag": (2, 0, "int"),
            "start_epoch": (5, None, "int"),
            "end_epoch": (10, None, "int none_ok"),
        },
    ),
    (
        "MESA",
        lambda **kw: sharpness.MESA(torch.nn.Linear(3, 2), **kw),
        {
            "decay": (0.9998, 1.5, "real"),
            "lam": (0.8, -1.0, "real"),
            "temperature": (5.0, 0.0, "real"),
            "start_epoch": (5, None, "int"),
            "end_epoch": (10, None, "int none_ok"),
        },
    ),
]

# The numpy front checks its base optimizers' settings itself (torch.optim checks the torch front's).
NUMPY_BASES = {
    "sgd": {
        "lr": (0.01, -1.0, "real"),
        "momentum": (0.9, -1.0, "real"),
        "dampening": (0.0, math.nan, "real"),
        "weight_decay": (0.0, -1.0, "real"),
    },
    "adam": {"betas": ((0.9, 0.999), (0.9, 1.0), "pair"), "eps": (1e-8, -1.0, "real")},
}
NUMPY = [(name, _numpy_builder(METHODS[name]), HYPERPARAMETERS[name]) for name in METHODS] + [
    (f"SAM-{base}", _numpy_builder(METHODS["SAM"], base), params) for base, params in NUMPY_BASES.items()
]


def _wrong_types(good, kind, front):
    """The wrong-typed stand-ins for ``good``."""
    if kind.startswith("pair"):
        return {
            "str": "0.9,0.999",
            "None": None,
            "scalar": 0.9,
            "triple": (0.9, 0.99, 0.999),
            "str-item": ("0.9", 0.999),
            "None-item": (0.9, None),
            "bool-item": (True, 0.999),
        }
    out = {"str": str(good), "None": None, "bool": True}
    if "list_ok" not in kind:
        out["list"] = [good]
    if "none_ok" in kind:
        del out["None"]
    out["tensor0d"] = torch.tensor(good) if front == "torch" else np.array(good)
    if kind.startswith("int"):
        out["float"] = float(good)
    return out


def _cases(table, front):
    for label, build, params in table:
        for name, (good, bad, kind) in params.items():
            for what, value in _wrong_types(good, kind, front).items():
                yield pytest.param(build, name, value, TypeError, id=f"{front}-{label}-{name}-{what}")
            if bad is not None:  # None: every number of the kind is valid (e.g. SAF's start_epoch)
                yield pytest.param(build, name, bad, ValueError, id=f"{front}-{label}-{name}-out_of_range")


def _names(name, message):
    return re.search(r"(?<![\w.])" + re.escape(name) + r"(?!\w)", message) is not None


CASES = list(_cases(TORCH, "torch")) + list(_cases(NUMPY, "numpy"))


@pytest.mark.parametrize("build, name, value, error", CASES)
def test_a_wrong_hyperparameter_is_refused_by_name(build, name, value, error):
    with pytest.raises((TypeError, ValueError)) as info:
        build(**{name: value})
    message = str(info.value)
    assert isinstance(info.value, error), f"{type(info.value).__name__}: {message}"
    if error is ValueError:
        assert not isinstance(info.value, TypeError), f"a value out of range raised a TypeError: {message}"
    assert _names(name, message) and "must be" in message, message


@pytest.mark.parametrize("table, front", [(TORCH, "torch"), (NUMPY, "numpy")], ids=["torch", "numpy"])
def test_the_good_values_of_the_table_are_accepted(table, front):
    """The table's good values (and the ones it marks valid) build: the refusals above are the
    checks', not a builder that fails whatever it is given."""
    for _label, build, params in table:
        build(**{name: good for name, (good, _, _) in params.items()})
        for name, (good, _, kind) in params.items():
            if "none_ok" in kind:
                build(**{name: None})
            if "list_ok" in kind:
                build(**{name: [good]})
            if not kind.startswith("pair"):
                build(**{name: np.float32(good) if kind.startswith("real") else np.int64(good)})  # numpy scalars are numbers


GROUP_KEYS = {"sam_rho": -1.0, "sam_eta": -1.0, "sam_norm_weight": 0.0}
GSAM_KEYS = {"gsam_rho_max": -1.0, "gsam_rho_min": -1.0, "gsam_lr_max": -1.0, "gsam_lr_min": -1.0}
GROUP_METHODS = list(METHODS)


def _group_cases():
    for label in GROUP_METHODS:
        for key, bad in GROUP_KEYS.items():
            for what, value in {"str": "x", "None": None, "list": [0.05], "tensor0d": torch.tensor(0.05), "bool": True}.items():
                yield pytest.param(label, key, value, TypeError, id=f"{label}-{key}-{what}")
            yield pytest.param(label, key, bad, ValueError, id=f"{label}-{key}-out_of_range")
    for key, bad in GSAM_KEYS.items():
        for what, value in {"str": "x", "None": None, "tensor0d": torch.tensor(0.05)}.items():
            yield pytest.param("GSAM", key, value, TypeError, id=f"GSAM-{key}-{what}")
        yield pytest.param("GSAM", key, bad, ValueError, id=f"GSAM-{key}-out_of_range")


def test_every_method_has_hyperparameter_cases():
    """The table covers the registry's methods, and names no other."""
    assert sorted(HYPERPARAMETERS) == sorted(METHODS) == sorted(GROUP_METHODS)


@pytest.mark.parametrize("label, key, value, error", list(_group_cases()))
def test_a_wrong_group_setting_is_refused_by_name(label, key, value, error):
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(2, 1)
    groups = [{"params": a.parameters()}, {"params": b.parameters(), key: value}]
    with pytest.raises((TypeError, ValueError)) as info:
        METHODS[label].torch(groups, SGD, base_kwargs=dict(lr=0.1))
    message = str(info.value)
    assert isinstance(info.value, error), f"{type(info.value).__name__}: {message}"
    if error is ValueError:
        assert not isinstance(info.value, TypeError), message
    assert _names(key, message) and "must be" in message, message


def test_a_group_added_later_is_checked_too():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(2, 1)
    opt = sharpness.SAM(a.parameters(), SGD, lr=0.1)
    with pytest.raises(TypeError, match="sam_rho must be a finite number >= 0, got 'x'"):
        opt.add_param_group({"params": b.parameters(), "sam_rho": "x"})
    opt = sharpness.GSAM(a.parameters(), SGD, lr=0.1)
    with pytest.raises(TypeError, match="gsam_rho_min"):
        opt.add_param_group({"params": b.parameters(), "gsam_rho_min": "x"})


def test_group_numbers_are_stored_as_floats():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(2, 1)
    opt = sharpness.SAM(
        [{"params": a.parameters(), "sam_rho": np.float32(0.5)}, {"params": b.parameters(), "sam_eta": 1}], SGD, lr=0.1
    )
    assert [type(g["sam_rho"]) for g in opt.param_groups] == [float, float]
    assert type(opt.param_groups[1]["sam_eta"]) is float and opt.param_groups[0]["sam_rho"] == 0.5


def test_the_validation_module_imports_without_torch_or_numpy():
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['numpy'] = None\n"
        "import importlib.util as u\n"
        f"spec = u.spec_from_file_location('v', {sharpness.__path__[0] + '/_validation.py'!r})\n"
        "m = u.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "print(m.number('rho', 1, minimum=0))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1.0"


@pytest.mark.parametrize(
    "bounds, inside, outside, words",
    [
        (dict(minimum=0), [0, 0.5, 1e300], [-1e-300, math.inf, math.nan], "a finite number >= 0"),
        (dict(above=0), [1e-300, 2], [0, -1, math.inf], "a finite number > 0"),
        (dict(minimum=0, below=1), [0, 0.999], [1, -0.1, math.nan], "a number in [0, 1)"),
        (dict(above=0, maximum=1), [1, 0.5], [0, 1.0001], "a number in (0, 1]"),
        (dict(minimum=0, finite=False), [0, math.inf], [-1, math.nan], "a number >= 0"),
        (dict(minimum=1, integer=True), [1, 7, np.int64(3)], [0, -4], "an integer >= 1"),
        (dict(), [-1e300, 0, 3], [math.inf, -math.inf, math.nan, 10**400], "a finite number"),
    ],
)
def test_number_bounds_and_words(bounds, inside, outside, words):
    from sharpness._validation import number

    for x in inside:
        out = number("x", x, **bounds)
        assert out == x and type(out) is (int if bounds.get("integer") else float)
    for x in outside:
        with pytest.raises(ValueError, match=re.escape(f"x must be {words}, got")) as info:
            number("x", x, **bounds)
        assert not isinstance(info.value, TypeError)
