"""The numpy front where torch is not installed: ``import sharpness`` and ``sharpness.numpy``, then
three steps of every numpy method on a small least-squares problem (hand-written gradients),
checking each moved the weights and kept them finite, and that the torch front says how to install
torch instead of failing obscurely.

Run directly (``python tests/numpy_without_torch.py``): ``.ci/run`` does it in a fresh environment
holding only the built wheel and numpy, where ``import torch`` fails;
``tests/test_numpy_without_torch.py`` does it with torch's import blocked. Imports numpy,
sharpness and the test registry of the methods (``tests/registry.py``, which imports no torch)
only.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def problem(seed: int = 0):
    """Least squares ``½‖Xw + b − y‖²/n`` with ``grad_fn(params) -> (loss, grads)``."""
    rng = np.random.default_rng(seed)
    X, y = rng.normal(size=(32, 5)), rng.normal(size=32)

    def grad_fn(params, rows=slice(None)):
        w, b = params
        r = X[rows] @ w + b[0] - y[rows]
        n = len(r)
        return 0.5 * float(r @ r) / n, [X[rows].T @ r / n, np.array([r.sum() / n])]

    return grad_fn, [0.1 * rng.normal(size=5), np.zeros(1)]


def mixed_problem():
    """``problem()`` with the weights in float32 and the bias in float64."""
    grad_fn, params = problem()
    params[0] = params[0].astype(np.float32)

    def mixed(p, rows=slice(None)):
        loss, grads = grad_fn([p[0].astype(np.float64), p[1]], rows)
        return loss, [grads[0].astype(np.float32), grads[1]]

    return mixed, params


def _import_registry():
    """``tests/registry.py``, also when this file is run by path from elsewhere."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    import registry

    return registry


#: The numpy front's cases besides the registry's entries (on SGD): SAM on another base.
OTHER_BASES = {"sam-adamw": ("sam", "adamw", dict(lr=1e-2))}


def methods():
    """label -> (constructor over params, how a step is called with grad_fn): every entry of the
    registry (``tests/registry.py``) that the numpy front takes (on SGD with ``lr=0.1``), each driven
    as it says (the sparse methods' masks left as they are), and :data:`OTHER_BASES`."""
    registry = _import_registry()

    def plain(opt, g):
        return opt.step(g)

    def micro(opt, g):  # grad_fn(params, i): the i-th half of the rows
        return opt.step(lambda params, i: g(params, slice(16 * i, 16 * (i + 1))))

    def validation(opt, g):  # the last 8 rows are the validation batch
        return opt.step(lambda params: g(params, slice(0, 24)), lambda params: g(params, slice(24, 32)))

    def per_sample(opt, g):  # grad_fn(params, indices) -> (per-sample losses, gradients of their mean)
        return opt.step(
            lambda params, idx: (
                np.array([g(params, [i])[0] for i in (range(32) if idx is None else idx)]),
                g(params, slice(None) if idx is None else idx)[1],
            )
        )

    drives = {"micro": micro, "validation": validation, "per_sample": per_sample}
    table = {}
    for entry in registry.entries(lambda e: not e.torch_only):
        table[entry.label] = (lambda p, e=entry: e.numpy(p, "sgd", dict(lr=0.1)), drives.get(entry.drive, plain))
    for label, (of, base, kw) in OTHER_BASES.items():
        entry = registry.get(of)
        table[label] = (lambda p, e=entry, b=base, k=kw: e.numpy(p, b, k), drives.get(entry.drive, plain))
    return table


def main() -> int:
    import sharpness
    import sharpness.numpy as snp

    table = methods()
    stepped = set()
    for name, (build, step) in table.items():
        grad_fn, params = problem()
        before = [p.copy() for p in params]
        opt = build(params)
        stepped.add(opt.method_name())
        for _ in range(3):
            step(opt, grad_fn)
        assert all(np.isfinite(p).all() for p in params), name
        assert any(not np.array_equal(p, q) for p, q in zip(params, before)), f"{name} did not move the weights"
    missing = sorted(set(snp.__all__) - stepped)
    assert not missing, f"numpy methods without a step here: {missing}"
    torch_available = "torch" in sys.modules or _importable("torch")
    if not torch_available:
        try:
            sharpness.SAM  # noqa: B018
        except ModuleNotFoundError as error:
            assert "pip install 'sharpness[torch]'" in str(error), error
        else:
            raise AssertionError("sharpness.SAM loaded without torch")
    print(f"numpy front: {len(table)} methods stepped; torch {'present' if torch_available else 'absent'}")
    return 0


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
