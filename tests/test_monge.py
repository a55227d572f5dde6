"""Monge SAM against a per-tensor reference written here from the paper's closed form (Jacobsen &
Arvanitidis, 2025: e = ρ g/(‖g‖√(1+‖g‖²))), its exact perturbation on a quadratic, and its limits:
SAM as ‖g‖ → 0, the base optimizer as ‖g‖ → ∞."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _family import BASES, assert_close, batches, flat_dot, grads_at_offset, make_model, run
from torch import nn

import sharpness


def loss_of(model, x, y, scale=1.0):
    return scale * nn.functional.cross_entropy(model(x), y)


def grads_at(model, x, y):
    for p in model.parameters():
        p.grad = None
    loss_of(model, x, y).backward()
    return [p.grad.clone() for p in model.parameters()]


def reference_monge(model, base, data, rho):
    params = list(model.parameters())
    for x, y in data:
        g = grads_at(model, x, y)
        norm = math.sqrt(flat_dot(g, g))
        g_s = grads_at_offset(model, x, y, [gi * (rho / (norm * math.sqrt(1 + norm**2) + 1e-12)) for gi in g])
        for p, gi in zip(params, g_s):
            p.grad = gi
        base.step()


@pytest.mark.parametrize("backend", ["rust", "torch"])
@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("api", ["closure", "two-call"])
def test_monge_sam_matches_the_paper(backend, base, api):
    data = batches(20)
    cls, kw = BASES[base]
    ref = make_model()
    mine = copy.deepcopy(ref)
    reference_monge(ref, cls(ref.parameters(), foreach=False, **kw), data, 0.5)
    opt = sharpness.MongeSAM(mine.parameters(), cls, rho=0.5, backend=backend, **kw)
    run(opt, mine, data, api)
    assert_close(ref, mine)


def perturbation(opt_cls, model, x, y, scale, backend, rho=0.1):
    before = [p.detach().clone() for p in model.parameters()]
    opt = opt_cls(model.parameters(), torch.optim.SGD, rho=rho, lr=0.1, backend=backend)
    opt.zero_grad()
    loss_of(model, x, y, scale).backward()
    opt.first_step()
    e = [p.detach().double() - w.double() for p, w in zip(model.parameters(), before)]
    g = [p.grad.detach().double().clone() for p in model.parameters()]
    opt.restore()
    return e, g


@pytest.mark.parametrize("backend", ["rust", "torch"])
def test_tends_to_sam_as_the_gradient_vanishes_and_to_descent_as_it_grows(backend):
    x, y = batches(1)[0]
    x = x.double()
    model = make_model().double()
    errors = []
    for scale in (1.0, 1e-1, 1e-2, 1e-3):
        e_monge, g = perturbation(sharpness.MongeSAM, model, x, y, scale, backend)
        e_sam, _ = perturbation(sharpness.SAM, model, x, y, scale, backend)
        norm = math.sqrt(flat_dot(g, g))
        # the same direction, shrunk by exactly 1/√(1 + ‖g‖²)
        ratio = math.sqrt(flat_dot(e_monge, e_monge) / flat_dot(e_sam, e_sam))
        assert ratio == pytest.approx(1 / math.sqrt(1 + norm**2), rel=1e-9)
        assert flat_dot(e_monge, e_sam) == pytest.approx(ratio * flat_dot(e_sam, e_sam), rel=1e-9)
        errors.append(math.sqrt(sum(float(((a - b) ** 2).sum()) for a, b in zip(e_monge, e_sam))) / 0.1)
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-6  # → SAM's e = ρĝ
    e_big, g = perturbation(sharpness.MongeSAM, model, x, y, 1e6, backend)
    norm = math.sqrt(flat_dot(g, g))
    assert math.sqrt(flat_dot(e_big, e_big)) == pytest.approx(0.1 / math.sqrt(1 + norm**2), rel=1e-9)
    assert math.sqrt(flat_dot(e_big, e_big)) < 1e-5  # → no perturbation: the base optimizer


def test_one_step_on_a_quadratic_in_closed_form():
    torch.manual_seed(7)
    n = 6
    q = torch.randn(n, n, dtype=torch.float64)
    A = q @ q.T + torch.eye(n, dtype=torch.float64)
    b = torch.randn(n, dtype=torch.float64)
    w0 = torch.randn(n, dtype=torch.float64)
    rho, lr = 0.4, 0.05
    g = A @ w0 - b
    e = rho * g / (g.norm() * torch.sqrt(1 + g @ g))
    expected = w0 - lr * (A @ (w0 + e) - b)
    for backend in ("rust", "torch"):
        w = nn.Parameter(w0.clone())
        opt = sharpness.MongeSAM([w], torch.optim.SGD, rho=rho, lr=lr, backend=backend)

        def closure():
            opt.zero_grad()
            loss = 0.5 * w @ A @ w - b @ w
            loss.backward()
            return loss

        opt.step(closure)
        torch.testing.assert_close(w.detach(), expected, rtol=1e-12, atol=1e-13)


def test_no_adaptive_form():
    with pytest.raises(ValueError, match="adaptive"):
        sharpness.MongeSAM(make_model().parameters(), torch.optim.SGD, adaptive=True, lr=0.1)
