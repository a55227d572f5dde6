"""Bayesian SAM against a per-tensor reference written here from the paper's Algorithm 1
(Möllenhoff & Khan, ICLR 2023, arXiv:2210.01620), with the same noise stream; its ρ = 0 limit,
the posterior sample, and checkpoints that carry the optimizer's generator."""

from __future__ import annotations

import io
import math

import pytest
import torch
from _family import batches, grads_at, loss_of, make_model, run

import sharpness

BACKENDS = ["rust", "torch"]
HYPER = dict(lr=0.05, rho=0.05, betas=(0.9, 0.999), weight_decay=1e-3, damping=0.1, s_init=1.0)
N_DATA = 200


def reference_bsam(model, data, seed, num_data, lr, rho, betas, weight_decay, damping, s_init):
    """ε ~ N(0, 1/(N s)); g = ∇L(θ+ε); e = ρ g/s; g_e = ∇L(θ+e);
    g_m ← β₁g_m + (1−β₁)(g_e + δθ); s ← β₂s + (1−β₂)(√s|g| + δ + γ); θ ← θ − α g_m/s.
    The noise: one randn over all parameters in order from a generator seeded with ``seed``."""
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(seed)
    b1, b2 = betas
    S = [torch.full_like(p, s_init) for p in params]
    GM = [torch.zeros_like(p) for p in params]
    sizes = [p.numel() for p in params]
    for x, y in data:
        theta = [p.detach().clone() for p in params]
        z = torch.randn(sum(sizes), generator=gen).split(sizes)
        with torch.no_grad():
            for p, t, zi, s in zip(params, theta, z, S):
                p.copy_(t + zi.view_as(p) / (num_data * s).sqrt())
        g = grads_at(model, x, y)
        with torch.no_grad():
            for p, t, gi, s in zip(params, theta, g, S):
                p.copy_(t + rho * gi / s)
        ge = grads_at(model, x, y)
        with torch.no_grad():
            for i, p in enumerate(params):
                p.copy_(theta[i])
                GM[i] = b1 * GM[i] + (1 - b1) * (ge[i] + weight_decay * theta[i])
                S[i] = b2 * S[i] + (1 - b2) * (S[i].sqrt() * g[i].abs() + weight_decay + damping)
                p.sub_(lr * GM[i] / S[i])


def assert_close(a, b, rtol=1e-4, atol=1e-6):
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rho", [0.05, 0.0])
def test_matches_the_paper_over_20_steps(backend, rho):
    hyper = dict(HYPER, rho=rho)
    data = batches(20)
    ref = make_model()
    reference_bsam(ref, data, seed=7, num_data=N_DATA, **hyper)
    model = make_model()
    opt = sharpness.BayesianSAM(model.parameters(), num_data=N_DATA, seed=7, backend=backend, **hyper)
    run(opt, model, data)
    assert_close(model, ref)
    s = opt.state[model[0].weight]["bsam_s"]
    assert not torch.equal(s, torch.ones_like(s))  # the scale adapted


@pytest.mark.parametrize("backend", BACKENDS)
def test_begin_step_draws_a_posterior_sample_and_restore_undoes_it(backend):
    model = make_model()
    theta = [p.detach().clone() for p in model.parameters()]
    opt = sharpness.BayesianSAM(model.parameters(), num_data=50, s_init=4.0, seed=3, backend=backend)
    opt.begin_step()
    sizes = [t.numel() for t in theta]
    z = torch.randn(sum(sizes), generator=torch.Generator().manual_seed(3)).split(sizes)
    for p, t, zi in zip(model.parameters(), theta, z):
        torch.testing.assert_close(p.detach(), t + zi.view_as(t) / math.sqrt(50 * 4.0), rtol=1e-6, atol=1e-7)
    with pytest.raises(RuntimeError):
        opt.state_dict()
    assert opt.restore()
    for p, t in zip(model.parameters(), theta):
        assert torch.equal(p, t)


@pytest.mark.parametrize("backend", BACKENDS)
def test_three_calls_equal_the_closure(backend):
    data = batches(6)
    a, b = make_model(), make_model()
    oa = sharpness.BayesianSAM(a.parameters(), num_data=N_DATA, seed=1, backend=backend, **HYPER)
    ob = sharpness.BayesianSAM(b.parameters(), num_data=N_DATA, seed=1, backend=backend, **HYPER)
    run(oa, a, data)
    for x, y in data:
        ob.begin_step()
        loss_of(b, x, y).backward()
        ob.first_step(zero_grad=True)
        loss_of(b, x, y).backward()
        ob.second_step(zero_grad=True)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(RuntimeError):  # no sample drawn first
        loss_of(b, *data[0]).backward()
        ob.first_step()


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_round_trip_carries_the_generator(backend):
    data = batches(12)
    a = make_model()
    oa = sharpness.BayesianSAM(a.parameters(), num_data=N_DATA, seed=11, backend=backend, **HYPER)
    run(oa, a, data[:6])
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": oa.state_dict()}, buf)
    run(oa, a, data[6:])
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    b = make_model(seed=5)
    b.load_state_dict(ckpt["model"])
    ob = sharpness.BayesianSAM(b.parameters(), num_data=N_DATA, seed=999, backend=backend, **HYPER)  # another seed
    ob.load_state_dict(ckpt["opt"])
    run(ob, b, data[6:])
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_exception_in_the_first_pass_restores_theta():
    model = make_model()
    theta = [p.detach().clone() for p in model.parameters()]
    opt = sharpness.BayesianSAM(model.parameters(), num_data=N_DATA, seed=0)

    def failing():
        raise ValueError("boom")

    with pytest.raises(ValueError):
        opt.step(failing)
    for p, t in zip(model.parameters(), theta):
        assert torch.equal(p, t)
    run(opt, model, batches(1))  # usable afterwards


def test_bad_arguments():
    with pytest.raises(ValueError):
        sharpness.BayesianSAM(make_model().parameters(), num_data=0)
    with pytest.raises(ValueError):
        sharpness.BayesianSAM(make_model().parameters(), num_data=10, s_init=0.0)
