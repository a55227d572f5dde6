"""Friendly SAM against a per-tensor reference written here from the paper and its official code
(Li et al., CVPR 2024: d = g − σm with the previous m, m starting at the first gradient, m an EMA
of the raw gradients), the σ = 0 limit (SAM bit for bit), a closed form on a quadratic, and a
checkpoint round trip."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from _family import BASES, assert_close, assert_equal, batches, flat_dot, grads_at, grads_at_offset, make_model, run
from torch import nn

import sharpness


def reference_fsam(model, base, data, rho, sigma, lmbda):
    """Per-tensor F-SAM as the official code: returns the final m."""
    params = list(model.parameters())
    m = None
    for x, y in data:
        g = grads_at(model, x, y)
        if m is None:
            m = [gi.clone() for gi in g]
            d = g
        else:
            d = [gi - sigma * mi for gi, mi in zip(g, m)]
            m = [mi * lmbda + gi * (1 - lmbda) for gi, mi in zip(g, m)]
        norm = math.sqrt(flat_dot(d, d))
        g_s = grads_at_offset(model, x, y, [di * (rho / (norm + 1e-12)) for di in d])
        for p, gi in zip(params, g_s):
            p.grad = gi
        base.step()
    return m


@pytest.mark.parametrize("backend", ["rust", "torch"])
@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("api", ["closure", "two-call"])
def test_friendly_sam_matches_the_official_algorithm(backend, base, api):
    data = batches(20)
    cls, kw = BASES[base]
    ref = make_model()
    mine = copy.deepcopy(ref)
    m_ref = reference_fsam(ref, cls(ref.parameters(), foreach=False, **kw), data, 0.1, 1.0, 0.9)
    opt = sharpness.FriendlySAM(mine.parameters(), cls, rho=0.1, sigma=1.0, lmbda=0.9, backend=backend, **kw)
    run(opt, mine, data, api)
    assert_close(ref, mine)
    # m is the moving average of the raw gradients (not of d)
    for p, mr in zip(mine.parameters(), m_ref):
        torch.testing.assert_close(opt.vectors[p]["fsam_momentum"], mr, rtol=1e-5, atol=1e-7)
    if backend == "rust":
        assert opt.stats["fused_steps"] == 20


@pytest.mark.parametrize("sigma, lmbda", [(0.5, 0.6), (2.0, 0.95)])
def test_other_sigma_and_lambda(sigma, lmbda):
    data = batches(20)
    ref = make_model()
    mine = copy.deepcopy(ref)
    reference_fsam(ref, torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, foreach=False), data, 0.05, sigma, lmbda)
    opt = sharpness.FriendlySAM(mine.parameters(), torch.optim.SGD, rho=0.05, sigma=sigma, lmbda=lmbda, lr=0.05, momentum=0.9)
    run(opt, mine, data, "closure")
    assert_close(ref, mine)


@pytest.mark.parametrize("backend", ["rust", "torch"])
def test_sigma_zero_is_sam_bit_for_bit(backend):
    data = batches(20)
    a, b = make_model(), make_model()
    run(sharpness.SAM(a.parameters(), torch.optim.SGD, rho=0.1, lr=0.05, momentum=0.9, backend=backend), a, data, "two-call")
    run(
        sharpness.FriendlySAM(b.parameters(), torch.optim.SGD, sigma=0.0, rho=0.1, lr=0.05, momentum=0.9, backend=backend),
        b,
        data,
        "two-call",
    )
    assert_equal(a, b)


def test_two_steps_on_a_quadratic_in_closed_form():
    """L(w) = ½ wᵀAw − bᵀw, plain SGD, float64: step 0 is SAM's; step 1 perturbs along
    g(w₁) − σ g(w₀) (m = g(w₀) after the first step)."""
    torch.manual_seed(4)
    n = 6
    q = torch.randn(n, n, dtype=torch.float64)
    A = q @ q.T + torch.eye(n, dtype=torch.float64)
    b = torch.randn(n, dtype=torch.float64)
    w0 = torch.randn(n, dtype=torch.float64)
    rho, sigma, lmbda, lr = 0.2, 0.8, 0.9, 0.05
    grad = lambda v: A @ v - b  # noqa: E731
    g0 = grad(w0)
    w1 = w0 - lr * grad(w0 + rho * g0 / g0.norm())
    d1 = grad(w1) - sigma * g0
    w2 = w1 - lr * grad(w1 + rho * d1 / d1.norm())
    for backend in ("rust", "torch"):
        w = nn.Parameter(w0.clone())
        opt = sharpness.FriendlySAM([w], torch.optim.SGD, rho=rho, sigma=sigma, lmbda=lmbda, lr=lr, backend=backend)

        def closure():
            opt.zero_grad()
            loss = 0.5 * w @ A @ w - b @ w
            loss.backward()
            return loss

        opt.step(closure)
        torch.testing.assert_close(w.detach(), w1, rtol=1e-12, atol=1e-13)
        opt.step(closure)
        torch.testing.assert_close(w.detach(), w2, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(opt.vectors[w]["fsam_momentum"], lmbda * g0 + (1 - lmbda) * grad(w1), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("backend", ["rust", "torch"])
def test_state_dict_round_trip(backend):
    data = batches(14)
    build = lambda model: sharpness.FriendlySAM(  # noqa: E731
        model.parameters(), torch.optim.SGD, rho=0.1, sigma=1.0, lmbda=0.9, lr=0.05, momentum=0.9, backend=backend
    )
    a = make_model()
    run(build(a), a, data, "closure")
    b = make_model()
    opt_b = build(b)
    run(opt_b, b, data[:6], "closure")
    buf = io.BytesIO()
    torch.save({"model": b.state_dict(), "opt": opt_b.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    c = make_model(seed=5)
    opt_c = build(c)
    c.load_state_dict(ckpt["model"])
    opt_c.load_state_dict(ckpt["opt"])
    assert opt_c.sam_state["fsam_started"]
    run(opt_c, c, data[6:], "closure")
    assert_equal(a, c)


def test_bad_arguments():
    model = make_model()
    with pytest.raises(ValueError, match="lmbda"):
        sharpness.FriendlySAM(model.parameters(), torch.optim.SGD, lmbda=1.5, lr=0.1)
    with pytest.raises(ValueError, match="sigma"):
        sharpness.FriendlySAM(model.parameters(), torch.optim.SGD, sigma=float("inf"), lr=0.1)
