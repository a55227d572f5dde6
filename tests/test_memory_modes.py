"""SAM's memory modes: ``"exact"`` (a full backup, bit-exact) and ``"subtract"`` (``e`` kept in
bfloat16 and subtracted again: half the memory of a float32 backup, not bit-exact).

References are written here from the definition: ``o = bf16(e)``, ``w + o`` in the weight's
dtype, ``(w + o) − o`` for the restoration."""

from __future__ import annotations

import math

import numpy as np
import pytest
import registry
import torch
from torch import nn

import sharpness
from sharpness import _core

BACKENDS = ["rust", "torch"]


def make_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 4)).to(dtype)


def data(seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 6, generator=g, dtype=dtype), torch.randint(0, 4, (32,), generator=g)


def first_gradient(model, x, y):
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("adaptive", [False, True])
def test_subtract_mode_moves_the_weights_by_exactly_the_rounded_perturbation(backend, adaptive):
    model = make_model()
    x, y = data()
    opt = sharpness.SAM(model.parameters(), torch.optim.SGD, rho=0.5, adaptive=adaptive, eta=0.01, lr=0.1,
                        backend=backend, memory="subtract")
    first_gradient(model, x, y)
    w0 = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    t = [(w.abs() + 0.01) if adaptive else torch.ones_like(w) for w in w0]
    norm = math.sqrt(sum(float(((ti * g).double() ** 2).sum()) for ti, g in zip(t, grads)))
    scale = torch.tensor(0.5 / (norm + 1e-12), dtype=torch.float32)  # the kernels compute in float32
    opt.first_step()
    for p, w, g, ti in zip(model.parameters(), w0, grads, t):
        e = (ti * ti * g * scale) if adaptive else (scale * g)
        offset = e.to(torch.bfloat16)
        assert torch.equal(p.detach(), w + offset.float())
        assert not torch.equal(offset.float(), e), "e must really be rounded for this test to mean anything"
    moved = [p.detach().clone() for p in model.parameters()]
    opt.restore()
    for p, w, m in zip(model.parameters(), w0, moved):
        # fl(fl(w + o) − o) is within one ulp of the larger of |w| and |w + o|
        bound = torch.maximum(w.abs(), m.abs()) * torch.finfo(torch.float32).eps
        assert bool(((p.detach() - w).abs() <= bound).all())


def test_subtract_mode_is_the_same_on_both_backends():
    x, y = data()
    perturbed = []
    for backend in BACKENDS:
        model = make_model()
        opt = sharpness.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, backend=backend, memory="subtract")
        first_gradient(model, x, y)
        opt.first_step()
        perturbed.append([p.detach().clone() for p in model.parameters()])
        opt.restore()
        perturbed.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(perturbed[0] + perturbed[1], perturbed[2] + perturbed[3]):
        assert torch.equal(a, b)


def test_subtraction_is_not_exact_but_within_an_ulp():
    # Many weights, as in a real model: the restoration error is measured, not assumed.
    gen = torch.Generator().manual_seed(0)
    n = 1 << 18
    w0 = (torch.randn(n, generator=gen) * 0.05).numpy()
    g = torch.randn(n, generator=gen).numpy()
    scale = 0.05 / float(np.sqrt((g.astype(np.float64) ** 2).sum()))
    w = w0.copy()
    offsets = np.zeros(n, dtype=np.uint16)
    _core.perturb_offsets(w, g, offsets, scale)
    moved = w.copy()
    _core.subtract_offsets(w, offsets)
    error = np.abs(w - w0)
    bound = np.maximum(np.abs(w0), np.abs(moved)) * np.finfo(np.float32).eps
    assert (error <= bound).all()
    inexact = float((w != w0).mean())
    assert 0.0 < inexact < 0.05, inexact  # measured: 0.4% of the weights come back changed


@pytest.mark.parametrize("backend", BACKENDS)
def test_rho_zero_in_subtract_mode_is_the_exact_mode_bit_for_bit(backend):
    # Nothing is perturbed, so nothing is subtracted: the exact mode's trajectory (itself the
    # base optimizer's, bit for bit on the torch backend and to float rounding through the fused
    # kernels: tests/test_sam.py).
    x, y = data()
    trajectories = {}
    for memory in ("exact", "subtract", "base"):
        model = make_model()
        if memory == "base":
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, foreach=False)
        else:
            opt = sharpness.SAM(model.parameters(), torch.optim.SGD, rho=0.0, lr=0.1, momentum=0.9,
                                weight_decay=1e-3, backend=backend, memory=memory)
        for _ in range(5):
            first_gradient(model, x, y)
            if memory != "base":
                opt.first_step(zero_grad=True)
                first_gradient(model, x, y)  # at rho=0 the second pass is at w: the same gradient
                opt.second_step()
            else:
                opt.step()
        trajectories[memory] = [p.detach().clone() for p in model.parameters()]
    for a, b in zip(trajectories["exact"], trajectories["subtract"]):
        assert torch.equal(a, b)
    if backend == "torch":
        for a, b in zip(trajectories["base"], trajectories["subtract"]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_subtract_mode_trajectory_stays_close_to_the_exact_one(backend, base):
    x, y = data()
    weights = {}
    for memory in ("exact", "subtract"):
        model = make_model()
        kw = dict(lr=0.1, momentum=0.9) if base == "sgd" else dict(lr=1e-2, weight_decay=1e-2)
        base_cls = torch.optim.SGD if base == "sgd" else torch.optim.AdamW
        opt = sharpness.SAM(model.parameters(), base_cls, rho=0.05, backend=backend, memory=memory, **kw)

        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        for _ in range(30):
            opt.step(closure)
        weights[memory] = torch.cat([p.detach().flatten() for p in model.parameters()])
    drift = float((weights["subtract"] - weights["exact"]).abs().max() / weights["exact"].abs().max())
    # Measured (30 steps): 1e-6 to 1e-5 relative; one bfloat16 ulp would be 4e-3.
    assert 0.0 < drift < 1e-4, drift


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, backup_bytes", [(torch.float32, 4), (torch.float64, 8)])
def test_memory_bytes_reports_each_mode(backend, dtype, backup_bytes):
    x, y = data(dtype=dtype)
    n = sum(p.numel() for p in make_model().parameters())
    for memory, per_weight in (("exact", backup_bytes), ("subtract", 2)):
        model = make_model(dtype=dtype)
        opt = sharpness.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, backend=backend, memory=memory)
        assert opt.memory_bytes()["backup"] == 0  # allocated by the first perturbation
        first_gradient(model, x, y)
        opt.first_step()
        assert opt.memory_bytes()["backup"] == per_weight * n, memory
        if memory == "subtract":
            with pytest.raises(RuntimeError, match='memory="exact"'):
                opt.perturbation_report()
        opt.restore()


def test_bad_memory_mode_is_refused():
    with pytest.raises(ValueError, match="memory must be one of"):
        sharpness.SAM(make_model().parameters(), torch.optim.SGD, lr=0.1, memory="none")


def test_offsets_kernel_refuses_bad_arguments():
    w, g = np.zeros(4, np.float32), np.ones(4, np.float32)
    with pytest.raises(TypeError, match="must be bfloat16"):
        _core.perturb_offsets(w, g, np.zeros(4, np.float32), 0.1)
    with pytest.raises(ValueError, match="offsets"):
        _core.perturb_offsets(w, g, np.zeros(3, np.uint16), 0.1)
    with pytest.raises(ValueError, match="read-only"):
        o = np.zeros(4, np.uint16)
        o.flags.writeable = False
        _core.perturb_offsets(w, g, o, 0.1)
    with pytest.raises(ValueError, match="share memory"):
        buf = np.zeros(8, np.float32)
        _core.subtract_offsets(buf, buf.view(np.uint16)[:8])


# The registry's methods (tests/registry.py) besides SAM itself that restore w by subtracting e on
# a base optimizer's step, with memory="subtract" replacing the entry's memory mode. Not: a method
# that rebuilds its points from the saved w (``needs_exact_backup``: refuses the mode), one that
# moves the weights before its first gradient (it restores from a saved copy), one with an update
# of its own (LightSAM restores from a saved copy; AdaSAM's adaptive step is not held to this
# drift bound).
VARIANTS = registry.labels(
    lambda e: e.name != "SAM" and not e.rule.needs_exact_backup and not e.before_first_pass and not e.own_update
)


@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_run_in_subtract_mode(variant):
    # The variants run on the same engine calls, so the mode goes with them: close to the exact
    # mode's trajectory, and not equal to it.
    entry = registry.get(variant)
    x, y = data()
    x_val, y_val = data(seed=2)
    weights = {}
    for memory in ("exact", "subtract"):
        model = make_model()
        opt = entry.torch(model.parameters(), torch.optim.SGD, base_kwargs=dict(lr=0.1), memory=memory)

        def loss_at(rows=slice(None), xs=x, ys=y):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xs[rows]), ys[rows])
            loss.backward()
            return loss

        def per_sample(indices=None):
            rows = slice(None) if indices is None else indices
            return nn.functional.cross_entropy(model(x[rows]), y[rows], reduction="none")

        for _ in range(6):
            if entry.drive == "micro":
                opt.step(lambda i: loss_at(slice(16 * i, 16 * i + 16)))
            elif entry.drive == "validation":
                opt.step(loss_at, lambda: loss_at(xs=x_val, ys=y_val))
            elif entry.drive == "per_sample":
                opt.step(per_sample)
            else:
                opt.step(loss_at)
        assert opt.memory_bytes()["backup"] == (2 if memory == "subtract" else 4) * sum(p.numel() for p in model.parameters())
        weights[memory] = torch.cat([p.detach().flatten() for p in model.parameters()])
    drift = float((weights["subtract"] - weights["exact"]).abs().max())
    assert 0.0 < drift < 1e-4, drift
