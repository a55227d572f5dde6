"""The numpy front and the torch front give the same trajectory on the same data: every method of
the registry (tests/registry.py) that draws no random numbers (the fronts draw theirs from
generators of their own), each driven as it says, on two bases and in two dtypes."""

from __future__ import annotations

import numpy as np
import pytest
import registry
import torch


def mlp_loss(weights, x, y, reduction="mean"):
    w1, b1, w2, b2 = weights
    return torch.nn.functional.cross_entropy(torch.tanh(x @ w1 + b1) @ w2 + b2, y, reduction=reduction)


def initial(dtype):
    g = np.random.default_rng(0)
    shapes = [(6, 16), (16,), (16, 4), (4,)]
    return [(g.standard_normal(s) * 0.5).astype(dtype) for s in shapes]


def data(n, dtype):
    g = np.random.default_rng(1)
    return [
        (torch.from_numpy(g.standard_normal((12, 6)).astype(dtype)), torch.from_numpy(g.integers(0, 4, 12))) for _ in range(n)
    ]


BASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.05, amsgrad=True)),
}
# Methods on both fronts (no torch-only settings) that draw nothing random; a method with its own
# update once (no base).
CASES = registry.cases(lambda e: not e.torch_only and not e.draws, BASES, own="own")
STEPS = 15
HALF = slice(0, 6), slice(6, 12)  # the micro-batches of m-sharpness


def _numpy_run(entry, base, dtype, batches, val):
    arrays = initial(dtype)
    np_opt = entry.numpy(arrays, base, BASES[base][1]) if not entry.own_update else entry.numpy(arrays)

    def grad_fn(params, x, y):
        ts = [torch.from_numpy(a).requires_grad_() for a in params]
        loss = mlp_loss(ts, x, y)
        loss.backward()
        return loss.item(), [t.grad.numpy() for t in ts]

    def per_sample(params, x, y, indices):
        ts = [torch.from_numpy(a).requires_grad_() for a in params]
        xs, ys = (x, y) if indices is None else (x[indices], y[indices])
        losses = mlp_loss(ts, xs, ys, reduction="none")
        losses.mean().backward()
        return losses.detach().numpy(), [t.grad.numpy() for t in ts]

    for x, y in batches:
        if entry.drive == "micro":
            np_opt.step(lambda p, i: grad_fn(p, x[HALF[i]], y[HALF[i]]))
        elif entry.drive == "validation":
            np_opt.step(lambda p: grad_fn(p, x, y), lambda p: grad_fn(p, *val))
        elif entry.drive == "per_sample":
            np_opt.step(lambda p, indices: per_sample(p, x, y, indices))
        else:
            np_opt.step(lambda p: grad_fn(p, x, y))
    return arrays


def _torch_run(entry, base, dtype, batches, val):
    params = [torch.nn.Parameter(torch.from_numpy(a.copy())) for a in initial(dtype)]
    base_cls, kw = BASES.get(base, (None, None))
    t_opt = entry.torch(params, base_cls, base_kwargs=kw)
    for x, y in batches:

        def closure(xs=x, ys=y):
            t_opt.zero_grad()
            loss = mlp_loss(params, xs, ys)
            loss.backward()
            return loss

        def per_sample(indices=None):
            xs, ys = (x, y) if indices is None else (x[indices], y[indices])
            return mlp_loss(params, xs, ys, reduction="none")

        if entry.drive == "micro":
            t_opt.step(lambda i: closure(x[HALF[i]], y[HALF[i]]))
        elif entry.drive == "validation":
            t_opt.step(closure, lambda: closure(*val))
        elif entry.drive == "per_sample":
            t_opt.step(per_sample)
        else:
            t_opt.step(closure)
    return params, t_opt


@pytest.mark.parametrize("name, base", CASES, ids=[f"{n}-{b}" for n, b in CASES])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_and_torch_fronts_agree(name, base, dtype):
    entry = registry.get(name)
    batches = data(STEPS, dtype)
    val = data(STEPS + 1, dtype)[-1]
    arrays = _numpy_run(entry, base, dtype, batches, val)
    params, t_opt = _torch_run(entry, base, dtype, batches, val)
    if entry.name == "SAM":  # SAM and ASAM: the fused restore-and-step on every step
        assert t_opt.stats["fused_steps"] == len(batches)
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    for a, p in zip(arrays, params):
        np.testing.assert_allclose(a, p.detach().numpy(), rtol=rtol, atol=rtol * 1e-1)
