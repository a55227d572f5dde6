"""The numpy front where torch is not installed: ``import sharpness`` and ``sharpness.numpy``, then
three steps of every numpy method on a small least-squares problem (hand-written gradients),
checking each moved the weights and kept them finite, and that the torch front says how to install
torch instead of failing obscurely.

Run directly (``python tests/numpy_without_torch.py``): ``.ci/run`` does it in a fresh environment
holding only the built wheel and numpy, where ``import torch`` fails;
``tests/test_numpy_without_torch.py`` does it with torch's import blocked. Imports numpy and
sharpness only.
"""

from __future__ import annotations

import sys

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


def methods():
    """name -> (constructor over params, how a step is called with grad_fn)."""
    import sharpness.numpy as snp

    plain = lambda opt, g: opt.step(g)  # noqa: E731
    return {
        "SAM": (lambda p: snp.SAM(p, rho=0.05, lr=0.1, momentum=0.9), plain),
        "ASAM": (lambda p: snp.SAM(p, rho=0.5, adaptive=True, lr=0.1), plain),
        "SAM-adamw": (lambda p: snp.SAM(p, rho=0.05, base="adamw", lr=1e-2), plain),
        "AESAM": (lambda p: snp.AESAM(p, total_steps=3, rho=0.05, lr=0.1), plain),
        "EveryKSAM": (lambda p: snp.EveryKSAM(p, k=2, rho=0.05, lr=0.1), plain),
        "LookSAM": (lambda p: snp.LookSAM(p, k=2, rho=0.05, lr=0.1), plain),
        "SAMPa": (lambda p: snp.SAMPa(p, rho=0.05, lr=0.1), plain),
        "LightSAM": (lambda p: snp.LightSAM(p, lr=0.1, rho=0.05), plain),
        "MSharpnessSAM": (
            lambda p: snp.MSharpnessSAM(p, micro_batches=2, rho=0.05, lr=0.1),
            lambda opt, g: opt.step(lambda params, i: g(params, slice(16 * i, 16 * (i + 1)))),
        ),
        "GSAM": (lambda p: snp.GSAM(p, rho=0.05, alpha=0.1, lr=0.1), plain),
        "FriendlySAM": (lambda p: snp.FriendlySAM(p, rho=0.05, lr=0.1), plain),
        "WSAM": (lambda p: snp.WSAM(p, rho=0.05, lr=0.1), plain),
        "MongeSAM": (lambda p: snp.MongeSAM(p, rho=0.05, lr=0.1), plain),
        "AdaSAM": (lambda p: snp.AdaSAM(p, lr=1e-2, rho=0.05), plain),
        "BayesianSAM": (lambda p: snp.BayesianSAM(p, num_data=32, lr=0.05, rho=0.05, seed=0), plain),
        "SSAMF": (lambda p: snp.SSAMF(p, sparsity=0.5, rho=0.05, lr=0.1), plain),
        "SSAMD": (lambda p: snp.SSAMD(p, sparsity=0.5, seed=0, rho=0.05, lr=0.1), plain),
        "GAM": (lambda p: snp.GAM(p, rho=0.05, lr=0.1), plain),
        "CRSAM": (lambda p: snp.CRSAM(p, rho=0.05, lr=0.1), plain),
        "LETS": (
            lambda p: snp.LETS(p, rho=0.05, lr=0.1),
            lambda opt, g: opt.step(lambda params: g(params, slice(0, 24)), lambda params: g(params, slice(24, 32))),
        ),
        "RandomSAM": (lambda p: snp.RandomSAM(p, rho=0.05, seed=0, lr=0.1), plain),
        "ESAM": (  # grad_fn(params, indices) -> (per-sample losses, gradients of their mean)
            lambda p: snp.ESAM(p, beta=0.6, gamma=0.5, rho=0.05, seed=0, lr=0.1),
            lambda opt, g: opt.step(
                lambda params, idx: (
                    np.array([g(params, [i])[0] for i in (range(32) if idx is None else idx)]),
                    g(params, slice(None) if idx is None else idx)[1],
                )
            ),
        ),
    }


def main() -> int:
    import sharpness
    import sharpness.numpy as snp

    table = methods()
    missing = sorted(set(snp.__all__) - {name.split("-")[0] for name in table} - {"SAM"})
    assert not missing, f"numpy methods without a step here: {missing}"
    for name, (build, step) in table.items():
        grad_fn, params = problem()
        before = [p.copy() for p in params]
        opt = build(params)
        for _ in range(3):
            step(opt, grad_fn)
        assert all(np.isfinite(p).all() for p in params), name
        assert any(not np.array_equal(p, q) for p, q in zip(params, before)), f"{name} did not move the weights"
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
