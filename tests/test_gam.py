"""GAM against a per-tensor reference written here from the paper's algorithm as the official
code runs it (Zhang et al., CVPR 2023, arXiv:2303.03108), its reduction to SAM, and
checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
from _family import assert_equal, batches, closure_for, grads_at, make_model, round_trip_mid_run, run
from torch import nn

import sharpness

BACKENDS = ["rust", "torch"]


def norm(gs):
    return math.sqrt(sum(float((g.double() ** 2).sum()) for g in gs))


def reference_gam(model, data, rho, norm_rho, b1, b2, b3, gamma, lr, momentum):
    """Four gradients: g₀ at w, g₁ at w + ρĝ₀, g₂ at w + ρ'·(g₁−g₀)/‖g₁−g₀‖, g₃ at that point
    + ρĝ₂; u = b1·g₁ + b3·g₃ minus γ times the part of p = g₀ + |b2|·g₂ orthogonal to u."""
    params = list(model.parameters())
    sgd = torch.optim.SGD(params, lr=lr, momentum=momentum)
    for x, y in data:
        w = [p.detach().clone() for p in params]
        g0 = grads_at(model, x, y)
        n0 = norm(g0)
        with torch.no_grad():
            for p, wi, gi in zip(params, w, g0):
                p.copy_(wi + gi * (rho / (n0 + 1e-12)))
        g1 = grads_at(model, x, y)
        d = [a - b for a, b in zip(g1, g0)]
        nd = norm(d)
        with torch.no_grad():
            for p, wi, di in zip(params, w, d):
                p.copy_(wi + di * (norm_rho / (nd + 1e-12)))
        g2 = grads_at(model, x, y)
        n2 = norm(g2)
        with torch.no_grad():
            for p, gi in zip(params, g2):
                p.add_(gi * (rho / (n2 + 1e-12)))
        g3 = grads_at(model, x, y)
        pro = [a + abs(b2) * b for a, b in zip(g0, g2)]
        u = [b1 * a + b3 * b for a, b in zip(g1, g3)]
        inner = sum(float((a.double() * b.double()).sum()) for a, b in zip(pro, u))
        nu, npro = norm(u), norm(pro)
        cos = inner / (nu * npro + 1e-12)
        with torch.no_grad():
            for p, wi, ui, pi in zip(params, w, u, pro):
                vertical = pi - cos * npro * ui / (nu + 1e-12)
                p.copy_(wi)
                p.grad = ui - gamma * vertical
        sgd.step()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("coef", [(1.0, 1.0, 1.0, 0.1), (0.7, -0.5, 0.3, 0.4)])
def test_matches_the_reference_over_20_steps(backend, coef):
    b1, b2, b3, gamma = coef
    data = batches(20)
    ref = make_model()
    reference_gam(ref, data, rho=0.05, norm_rho=0.2, b1=b1, b2=b2, b3=b3, gamma=gamma, lr=0.1, momentum=0.9)
    model = make_model()
    opt = sharpness.GAM(
        model.parameters(), torch.optim.SGD, rho=0.05, norm_rho=0.2, beta1=b1, beta2=b2, beta3=b3, gamma=gamma,
        backend=backend, lr=0.1, momentum=0.9,
    )
    calls = []
    for x, y in data:
        inner = closure_for(opt, model, x, y)
        opt.step(lambda: calls.append(1) or inner())
    assert len(calls) == 4 * len(data)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_extra_coefficients_is_sam_bit_for_bit(backend):
    """β₂ = β₃ = γ = 0 (β₁ = 1): the update is g₁ = ∇L(w + ρĝ), SAM's."""
    data = batches(12)
    a, b = make_model(), make_model()
    gam = sharpness.GAM(
        a.parameters(), torch.optim.SGD, rho=0.1, beta2=0.0, beta3=0.0, gamma=0.0, backend=backend, lr=0.1, momentum=0.9
    )
    sam = sharpness.SAM(b.parameters(), torch.optim.SGD, rho=0.1, backend=backend, lr=0.1, momentum=0.9)
    run(gam, a, data)
    run(sam, b, data)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_round_trip_mid_run(backend):
    data = batches(12)
    kwargs = dict(rho=0.05, norm_rho=0.2, backend=backend, lr=0.1, momentum=0.9)
    a, _, b, _ = round_trip_mid_run(lambda params: sharpness.GAM(params, torch.optim.SGD, **kwargs), run, data, 6)
    assert_equal(a, b)


def test_needs_a_closure_and_restores_after_an_exception():
    model = make_model()
    opt = sharpness.GAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError):
        opt.step()
    with pytest.raises(RuntimeError):
        opt.first_step()
    (x, y), = batches(1)
    before = [p.detach().clone() for p in model.parameters()]
    calls = []

    def failing():
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return closure_for(opt, model, x, y)()

    with pytest.raises(KeyboardInterrupt):
        opt.step(failing)
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
    run(opt, model, [(x, y)])  # usable afterwards


def test_maximize_is_refused():
    model = nn.Linear(3, 2)
    opt = sharpness.GAM(model.parameters(), torch.optim.SGD, lr=0.1, maximize=True)
    w0 = [p.detach().clone() for p in model.parameters()]

    def closure():
        opt.zero_grad()
        loss = model(torch.ones(1, 3)).sum()
        loss.backward()
        return loss

    with pytest.raises(ValueError, match="maximize"):
        opt.step(closure)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w0))
