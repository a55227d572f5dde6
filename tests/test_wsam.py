"""WSAM against a per-tensor reference written here from the paper's Algorithm 1 and the official
code (Yue et al., KDD 2023: the base optimizer steps on g, then w ← w − lr·α(g̃ − g), α = γ/(1−γ);
or, coupled, the base step on g + α(g̃ − g)), the limits γ = 0.5 (SAM) and γ = 0 (the base
optimizer), a closed form on a quadratic, and a checkpoint round trip."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from _family import BASES, assert_close, assert_equal, batches, flat_dot, grads_at, grads_at_offset, loss_of, make_model, run
from torch import nn

import sharpness


def reference_wsam(model, base, data, rho, gamma, decouple):
    params = list(model.parameters())
    alpha = gamma / (1 - gamma)
    for x, y in data:
        g = grads_at(model, x, y)
        norm = math.sqrt(flat_dot(g, g))
        gt = grads_at_offset(model, x, y, [gi * (rho / (norm + 1e-12)) for gi in g])
        if decouple:
            sharp = [b - a for a, b in zip(g, gt)]
            for p, gi in zip(params, g):
                p.grad = gi
            base.step()
            with torch.no_grad():
                for p, s in zip(params, sharp):
                    p.add_(s, alpha=-base.param_groups[0]["lr"] * alpha)
        else:
            for p, a, b in zip(params, g, gt):
                p.grad = b * alpha + a * (1 - alpha)
            base.step()


@pytest.mark.parametrize("backend", ["rust", "torch"])
@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("api", ["closure", "two-call"])
def test_decoupled_wsam_matches_the_paper(backend, base, api):
    data = batches(20)
    cls, kw = BASES[base]
    ref = make_model()
    mine = copy.deepcopy(ref)
    reference_wsam(ref, cls(ref.parameters(), foreach=False, **kw), data, 0.05, 0.9, True)
    opt = sharpness.WSAM(mine.parameters(), cls, rho=0.05, gamma=0.9, backend=backend, **kw)
    run(opt, mine, data, api)
    assert_close(ref, mine)
    if backend == "rust":
        assert opt.stats["fused_steps"] == 20


@pytest.mark.parametrize("backend", ["rust", "torch"])
@pytest.mark.parametrize("base", sorted(BASES))
def test_coupled_wsam_matches_the_official_code(backend, base):
    data = batches(20)
    cls, kw = BASES[base]
    ref = make_model()
    mine = copy.deepcopy(ref)
    reference_wsam(ref, cls(ref.parameters(), foreach=False, **kw), data, 0.05, 0.8, False)
    opt = sharpness.WSAM(mine.parameters(), cls, rho=0.05, gamma=0.8, decouple=False, backend=backend, **kw)
    run(opt, mine, data, "closure")
    assert_close(ref, mine)


@pytest.mark.parametrize("backend", ["rust", "torch"])
def test_gamma_half_coupled_is_sam_bit_for_bit(backend):
    data = batches(20)
    a, b = make_model(), make_model()
    run(sharpness.SAM(a.parameters(), torch.optim.SGD, rho=0.1, lr=0.05, momentum=0.9, backend=backend), a, data, "closure")
    run(
        sharpness.WSAM(
            b.parameters(), torch.optim.SGD, gamma=0.5, decouple=False, rho=0.1, lr=0.05, momentum=0.9, backend=backend
        ),
        b,
        data,
        "closure",
    )
    assert_equal(a, b)


@pytest.mark.parametrize("backend", ["rust", "torch"])
def test_gamma_half_decoupled_with_plain_sgd_is_sam_to_rounding(backend):
    """(w − lr g) − lr(g̃ − g) against w − lr g̃: equal in exact arithmetic, a few float32 roundings
    apart per step, so the trajectories agree to ~1e-6 relative after 20 steps."""
    data = batches(20)
    a, b = make_model(), make_model()
    run(sharpness.SAM(a.parameters(), torch.optim.SGD, rho=0.1, lr=0.05, backend=backend), a, data, "closure")
    run(sharpness.WSAM(b.parameters(), torch.optim.SGD, gamma=0.5, rho=0.1, lr=0.05, backend=backend), b, data, "closure")
    assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))  # not the same code path


@pytest.mark.parametrize("backend", ["rust", "torch"])
def test_gamma_zero_is_the_base_optimizer(backend):
    data = batches(20)
    a, b = make_model(), make_model()
    base = torch.optim.SGD(a.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3, foreach=False)
    for x, y in data:
        base.zero_grad()
        loss_of(a, x, y).backward()
        base.step()
    run(
        sharpness.WSAM(
            b.parameters(), torch.optim.SGD, gamma=0.0, rho=0.1, lr=0.05, momentum=0.9, weight_decay=1e-3, backend=backend
        ),
        b,
        data,
        "two-call",
    )
    if backend == "torch":  # torch's own SGD step on g: bit for bit
        assert_equal(a, b)
    else:  # the fused SGD kernel is torch's SGD to float rounding (as for SAM with ρ = 0)
        assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_one_step_on_a_quadratic_in_closed_form():
    torch.manual_seed(5)
    n = 6
    q = torch.randn(n, n, dtype=torch.float64)
    A = q @ q.T + torch.eye(n, dtype=torch.float64)
    b = torch.randn(n, dtype=torch.float64)
    w0 = torch.randn(n, dtype=torch.float64)
    rho, gamma, lr = 0.2, 0.9, 0.05
    g = A @ w0 - b
    gt = A @ (w0 + rho * g / g.norm()) - b
    expected = w0 - lr * g - lr * 9.0 * (gt - g)  # α = 0.9/0.1 = 9
    for backend in ("rust", "torch"):
        w = nn.Parameter(w0.clone())
        opt = sharpness.WSAM([w], torch.optim.SGD, rho=rho, gamma=gamma, lr=lr, backend=backend)

        def closure():
            opt.zero_grad()
            loss = 0.5 * w @ A @ w - b @ w
            loss.backward()
            return loss

        opt.step(closure)
        torch.testing.assert_close(w.detach(), expected, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("backend", ["rust", "torch"])
def test_state_dict_round_trip(backend):
    data = batches(14)
    build = lambda model: sharpness.WSAM(model.parameters(), torch.optim.AdamW, rho=0.05, gamma=0.9, lr=1e-2, backend=backend)  # noqa: E731
    a = make_model()
    run(build(a), a, data, "closure")
    b = make_model()
    opt_b = build(b)
    run(opt_b, b, data[:6], "closure")
    buf = io.BytesIO()
    torch.save({"model": b.state_dict(), "opt": opt_b.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    assert all(set(entry) == {"step", "exp_avg", "exp_avg_sq"} for entry in ckpt["opt"]["state"].values())
    c = make_model(seed=5)
    opt_c = build(c)
    c.load_state_dict(ckpt["model"])
    opt_c.load_state_dict(ckpt["opt"])
    run(opt_c, c, data[6:], "closure")
    assert_equal(a, c)


def test_bad_arguments():
    model = make_model()
    with pytest.raises(ValueError, match="gamma"):
        sharpness.WSAM(model.parameters(), torch.optim.SGD, gamma=1.0, lr=0.1)
