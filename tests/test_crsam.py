"""CR-SAM against a per-tensor reference written here from the official algorithm (Wu et al.,
AAAI 2024, arXiv:2312.13555), its reduction to SAM, the closed form on a quadratic, and
checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
from _family import assert_equal, batches, closure_for, grads_at, make_model, round_trip_mid_run, run
from torch import nn

import sharpness

BACKENDS = ["rust", "torch"]


def reference_crsam(model, data, rho, gamma, beta, lr, momentum, weight_decay):
    """g₀ at w, g₊ at w + e, g₋ at w − e (e = ρĝ₀); u = g₊ + γ(g₊ + g₋ − 2g₀) + β(g₊ − g₋)."""
    params = list(model.parameters())
    sgd = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    for x, y in data:
        w = [p.detach().clone() for p in params]
        g0 = grads_at(model, x, y)
        n0 = math.sqrt(sum(float((g.double() ** 2).sum()) for g in g0))
        e = [g * (rho / (n0 + 1e-12)) for g in g0]
        with torch.no_grad():
            for p, wi, ei in zip(params, w, e):
                p.copy_(wi + ei)
        gp = grads_at(model, x, y)
        with torch.no_grad():
            for p, wi, ei in zip(params, w, e):
                p.copy_(wi - ei)
        gm = grads_at(model, x, y)
        with torch.no_grad():
            for p, wi, a, b, c in zip(params, w, g0, gp, gm):
                p.copy_(wi)
                p.grad = b + gamma * (b + c - 2 * a) + beta * (b - c)
        sgd.step()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("coef", [(0.1, 0.1), (0.5, -0.3)])
def test_matches_the_reference_over_20_steps(backend, coef):
    gamma, beta = coef
    data = batches(20)
    ref = make_model()
    reference_crsam(ref, data, rho=0.1, gamma=gamma, beta=beta, lr=0.1, momentum=0.9, weight_decay=5e-4)
    model = make_model()
    opt = sharpness.CRSAM(
        model.parameters(), torch.optim.SGD, rho=0.1, gamma=gamma, beta=beta, backend=backend,
        lr=0.1, momentum=0.9, weight_decay=5e-4,
    )
    calls = []
    for x, y in data:
        inner = closure_for(opt, model, x, y)
        opt.step(lambda: calls.append(1) or inner())
    assert len(calls) == 3 * len(data)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_coefficients_is_sam_bit_for_bit(backend):
    data = batches(12)
    a, b = make_model(), make_model()
    cr = sharpness.CRSAM(a.parameters(), torch.optim.SGD, rho=0.1, gamma=0.0, beta=0.0, backend=backend, lr=0.1, momentum=0.9)
    sam = sharpness.SAM(b.parameters(), torch.optim.SGD, rho=0.1, backend=backend, lr=0.1, momentum=0.9)
    run(cr, a, data)
    run(sam, b, data)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("backend", BACKENDS)
def test_quadratic_closed_form(backend):
    """L = ½ wᵀHw: g₊ + g₋ − 2g₀ = 0 and g₊ − g₋ = 2He, so u = Hw + (1 + 2β)·ρ H ĝ (γ drops out)."""
    H = torch.diag(torch.tensor([1.0, 3.0, 0.5], dtype=torch.float64))
    w0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    w = nn.Parameter(w0.clone())
    rho, gamma, beta, lr = 0.3, 0.7, 0.2, 0.1
    opt = sharpness.CRSAM([w], torch.optim.SGD, rho=rho, gamma=gamma, beta=beta, backend=backend, lr=lr)
    opt.step(lambda: (opt.zero_grad(), (0.5 * w @ H @ w).backward())[0])
    g = H @ w0
    expected = w0 - lr * (H @ w0 + (1 + 2 * beta) * rho * H @ (g / g.norm()))
    torch.testing.assert_close(w.detach(), expected, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_round_trip_mid_run(backend):
    data = batches(12)
    kwargs = dict(rho=0.1, backend=backend, lr=0.1, momentum=0.9)
    a, _, b, _ = round_trip_mid_run(lambda params: sharpness.CRSAM(params, torch.optim.SGD, **kwargs), run, data, 6)
    assert_equal(a, b)


def test_needs_a_closure_and_restores_after_an_exception():
    model = make_model()
    opt = sharpness.CRSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError):
        opt.step()
    (x, y), = batches(1)
    before = [p.detach().clone() for p in model.parameters()]
    calls = []

    def failing():
        calls.append(1)
        if len(calls) == 3:  # at w − e
            raise ValueError("boom")
        return closure_for(opt, model, x, y)()

    with pytest.raises(ValueError):
        opt.step(failing)
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
