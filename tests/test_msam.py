"""m-sharpness against a per-tensor reference written here from Foret et al. (2021, Section 4.1),
and its limit: one micro-batch is SAM."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _family import grads_at, loss_of
from torch import nn

import sharpness


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 24), nn.Tanh(), nn.Linear(24, 4))


def batches(n, size=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 6, generator=g), torch.randint(0, 4, (size,), generator=g)) for _ in range(n)]


def reference_msam(model, base, data, rho, n):
    """Each micro-batch perturbs with its own normalised gradient; the perturbed gradients are
    averaged; the base optimizer steps from the original weights with that mean."""
    params = list(model.parameters())
    for x, y in data:
        m = len(x) // n
        total = [torch.zeros_like(p) for p in params]
        for i in range(n):
            xi, yi = x[i * m : (i + 1) * m], y[i * m : (i + 1) * m]
            g = grads_at(model, xi, yi)
            norm = math.sqrt(sum(float((t.double() ** 2).sum()) for t in g))
            saved = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p, gi in zip(params, g):
                    p.add_(gi * (rho / (norm + 1e-12)))
            g_tilde = grads_at(model, xi, yi)
            with torch.no_grad():
                for p, w in zip(params, saved):
                    p.copy_(w)
            total = [a + b for a, b in zip(total, g_tilde)]
        for p, t in zip(params, total):
            p.grad = t / n
        base.step()


def run(opt, model, data, n):
    for x, y in data:
        m = len(x) // n

        def closure(i):
            opt.zero_grad()
            loss = loss_of(model, x[i * m : (i + 1) * m], y[i * m : (i + 1) * m])
            loss.backward()
            return loss

        opt.step(closure)


@pytest.mark.parametrize("backend", ["rust", "torch"])
@pytest.mark.parametrize("n", [2, 4])
def test_matches_the_reference(backend, n):
    data = batches(10)
    ref = make_model()
    mine = copy.deepcopy(ref)
    reference_msam(ref, torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, foreach=False), data, 0.1, n)
    opt = sharpness.MSharpnessSAM(
        mine.parameters(), torch.optim.SGD, micro_batches=n, rho=0.1, lr=0.05, momentum=0.9, backend=backend
    )
    run(opt, mine, data, n)
    for p, q in zip(ref.parameters(), mine.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert opt.stats["steps"] == 10


def test_one_micro_batch_is_sam():
    data = batches(8)
    a, b = make_model(), make_model()
    opt_a = sharpness.SAM(a.parameters(), torch.optim.SGD, rho=0.1, lr=0.05, momentum=0.9)
    for x, y in data:

        def closure():
            opt_a.zero_grad()
            loss = loss_of(a, x, y)
            loss.backward()
            return loss

        opt_a.step(closure)
    run(sharpness.MSharpnessSAM(b.parameters(), torch.optim.SGD, micro_batches=1, rho=0.1, lr=0.05, momentum=0.9), b, data, 1)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_exception_in_a_micro_batch_leaves_the_weights_unperturbed():
    model = make_model()
    opt = sharpness.MSharpnessSAM(model.parameters(), torch.optim.SGD, micro_batches=2, rho=0.5, lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    (x, y), *_ = batches(1)
    calls = []

    def closure(i):
        calls.append(i)
        opt.zero_grad()
        loss = loss_of(model, x[:8], y[:8])
        loss.backward()
        if len(calls) == 2:
            raise KeyboardInterrupt
        return loss

    with pytest.raises(KeyboardInterrupt):
        opt.step(closure)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    with pytest.raises(ValueError):
        sharpness.MSharpnessSAM(model.parameters(), torch.optim.SGD, micro_batches=0, lr=0.1)
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()
