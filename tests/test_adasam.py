"""AdaSAM against a per-tensor reference written here from the paper (Sun et al., 2023,
arXiv:2303.00565, Algorithm 1), its ρ = 0 limit, a closed-form first step and checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
from _family import assert_equal, batches, grads_at, loss_of, make_model, round_trip_mid_run, run
from torch import nn

import sharpness

BACKENDS = ["rust", "torch"]


def reference_adasam(model, data, lr, rho, betas=(0.9, 0.999), eps=1e-8):
    """δ = ρ s/‖s‖; g = ∇L(x+δ); m, v EMAs; v̂ = max(v̂, v) from ε²; x ← x − γ m/√v̂."""
    params = list(model.parameters())
    b1, b2 = betas
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    vhat = [torch.full_like(p, eps**2) for p in params]
    for x, y in data:
        s = grads_at(model, x, y)
        norm = math.sqrt(sum(float((si.double() ** 2).sum()) for si in s))
        theta = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, si in zip(params, s):
                p.add_(si * (rho / (norm + 1e-12)))
        g = grads_at(model, x, y)
        with torch.no_grad():
            for i, p in enumerate(params):
                p.copy_(theta[i])
                m[i] = b1 * m[i] + (1 - b1) * g[i]
                v[i] = b2 * v[i] + (1 - b2) * g[i] * g[i]
                vhat[i] = torch.maximum(vhat[i], v[i])
                p.sub_(lr * m[i] / vhat[i].sqrt())


def assert_close(a, b, rtol=1e-4, atol=1e-6):
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rho", [0.05, 0.0])
def test_matches_the_paper_over_25_steps(backend, rho):
    """ρ = 0 is the AMSGrad-style update alone (no bias correction, ε as v̂'s floor)."""
    data = batches(25)
    ref = make_model()
    reference_adasam(ref, data, lr=0.01, rho=rho)
    model = make_model()
    opt = sharpness.AdaSAM(model.parameters(), lr=0.01, rho=rho, backend=backend)
    run(opt, model, data)
    assert_close(model, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eps_floor_and_betas(backend):
    """A large ε (floor of v̂) and other betas: the floor is used while v < ε²."""
    data = batches(20)
    ref = make_model()
    reference_adasam(ref, data, lr=0.02, rho=0.1, betas=(0.5, 0.9), eps=0.05)
    model = make_model()
    opt = sharpness.AdaSAM(model.parameters(), lr=0.02, rho=0.1, betas=(0.5, 0.9), eps=0.05, backend=backend)
    run(opt, model, data)
    assert_close(model, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_step_on_a_quadratic_in_closed_form(backend):
    """L = ½‖x‖², x₀ = (3, −4): g = x₀(1 + ρ/5); m = (1−β₁)g; v = (1−β₂)g² > ε²;
    x₁ = x₀ − γ(1−β₁)/√(1−β₂)·sign(g)."""
    x0 = torch.tensor([3.0, -4.0], dtype=torch.float64)
    w = nn.Parameter(x0.clone())
    opt = sharpness.AdaSAM([w], lr=0.1, rho=0.5, betas=(0.9, 0.99), backend=backend)
    opt.step(lambda: (opt.zero_grad(), (0.5 * (w * w).sum()).backward())[0])
    expected = x0 - 0.1 * (1 - 0.9) / math.sqrt(1 - 0.99) * torch.sign(x0)
    torch.testing.assert_close(w.detach(), expected, rtol=1e-14, atol=1e-15)
    g = x0 * (1 + 0.5 / 5.0)
    torch.testing.assert_close(opt.state[w]["adasam_vmax"], (1 - 0.99) * g * g, rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_calls_equal_the_closure_and_restore_is_exact(backend):
    data = batches(6)
    a, b = make_model(), make_model()
    oa = sharpness.AdaSAM(a.parameters(), lr=0.01, rho=0.1, backend=backend)
    ob = sharpness.AdaSAM(b.parameters(), lr=0.01, rho=0.1, backend=backend)
    run(oa, a, data)
    for x, y in data:
        loss_of(b, x, y).backward()
        ob.first_step(zero_grad=True)
        loss_of(b, x, y).backward()
        ob.second_step(zero_grad=True)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    c = make_model()
    before = [p.detach().clone() for p in c.parameters()]
    oc = sharpness.AdaSAM(c.parameters(), lr=0.0, rho=0.5, backend=backend)
    run(oc, c, data)  # lr = 0: the weights come back bit for bit after each perturbation
    for p, q in zip(c.parameters(), before):
        assert torch.equal(p, q)


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_round_trip_mid_run(backend):
    data = batches(16)
    a, _, b, _ = round_trip_mid_run(lambda params: sharpness.AdaSAM(params, lr=0.01, rho=0.05, backend=backend), run, data, 8)
    assert_equal(a, b)


def test_lr_scheduler_drives_lr():
    model = make_model()
    opt = sharpness.AdaSAM(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    run(opt, model, batches(1))
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.005)
