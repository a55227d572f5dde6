"""The numpy front and the torch front give the same trajectory on the same data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sharpness
import sharpness.numpy


def mlp_loss(weights, x, y):
    w1, b1, w2, b2 = weights
    return torch.nn.functional.cross_entropy(torch.tanh(x @ w1 + b1) @ w2 + b2, y)


def initial(dtype):
    g = np.random.default_rng(0)
    shapes = [(6, 16), (16,), (16, 4), (4,)]
    return [(g.standard_normal(s) * 0.5).astype(dtype) for s in shapes]


def data(n, dtype):
    g = np.random.default_rng(1)
    return [
        (torch.from_numpy(g.standard_normal((12, 6)).astype(dtype)), torch.from_numpy(g.integers(0, 4, 12))) for _ in range(n)
    ]


CASES = [
    ("sgd", torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True)),
    ("adamw", torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.05, amsgrad=True)),
]


@pytest.mark.parametrize("base, base_cls, kw", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_and_torch_fronts_agree(base, base_cls, kw, adaptive, dtype):
    rho = 0.5 if adaptive else 0.05
    batches = data(15, dtype)

    arrays = initial(dtype)
    np_opt = sharpness.numpy.SAM(arrays, rho=rho, adaptive=adaptive, eta=0.01, base=base, **kw)

    def grad_fn(params, x, y):
        ts = [torch.from_numpy(a).requires_grad_() for a in params]
        loss = mlp_loss(ts, x, y)
        loss.backward()
        return loss.item(), [t.grad.numpy() for t in ts]

    for x, y in batches:
        np_opt.step(lambda p: grad_fn(p, x, y))

    params = [torch.nn.Parameter(torch.from_numpy(a.copy())) for a in initial(dtype)]
    t_opt = sharpness.SAM(params, base_cls, rho=rho, adaptive=adaptive, eta=0.01, **kw)
    for x, y in batches:

        def closure():
            t_opt.zero_grad()
            loss = mlp_loss(params, x, y)
            loss.backward()
            return loss

        t_opt.step(closure)
    assert t_opt.stats["fused_steps"] == len(batches)
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    for a, p in zip(arrays, params):
        np.testing.assert_allclose(a, p.detach().numpy(), rtol=rtol, atol=rtol * 1e-1)
