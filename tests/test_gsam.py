"""GSAM against a per-tensor reference written here from the paper (Zhuang et al., ICLR 2022,
Algorithm 1, with ρ_t proportional to the learning rate), the α = 0 limit (SAM bit for bit), a
closed-form property of the update on a quadratic, and a checkpoint round trip."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from _family import assert_close, assert_equal, batches, flat_dot, grads_at, grads_at_offset, loss_of
from torch import nn

import sharpness


def make_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 4)).to(dtype)


def lr_at(t, n=20, lr0=0.05):
    return lr0 * (1.0 - t / n)  # a linear decay to 0


def reference_gsam(model, base, data, rho_max, rho_min, lr_max, lr_min, alpha, lrs):
    """Per-tensor GSAM: g, e = ρ_t ĝ, g_p at w+e, g_⊥ = g − (⟨g,g_p⟩/‖g_p‖²) g_p, step on g_p − α g_⊥."""
    params = list(model.parameters())
    for t, (x, y) in enumerate(data):
        lr = lrs[t]
        for group in base.param_groups:
            group["lr"] = lr
        rho = rho_min + (rho_max - rho_min) * (lr - lr_min) / (lr_max - lr_min)
        g = grads_at(model, x, y)
        norm = math.sqrt(flat_dot(g, g))
        gp = grads_at_offset(model, x, y, [gi * (rho / (norm + 1e-12)) for gi in g])
        c = flat_dot(g, gp) / flat_dot(gp, gp)
        g_perp = [a - c * b for a, b in zip(g, gp)]
        for p, b, v in zip(params, gp, g_perp):
            p.grad = b - alpha * v
        base.step()


def run(opt, model, data, api, lrs=None):
    for t, (x, y) in enumerate(data):
        if lrs is not None:
            for group in opt.param_groups:
                group["lr"] = lrs[t]
        if api == "closure":

            def closure():
                opt.zero_grad()
                loss = loss_of(model, x, y)
                loss.backward()
                return loss

            opt.step(closure)
        else:
            loss_of(model, x, y).backward()
            opt.first_step(zero_grad=True)
            loss_of(model, x, y).backward()
            opt.second_step(zero_grad=True)


BASES = {
    "sgd-momentum": (torch.optim.SGD, dict(momentum=0.9, weight_decay=1e-3)),
    "adamw": (torch.optim.AdamW, dict(weight_decay=1e-2)),
}


@pytest.mark.parametrize("backend", ["rust", "torch"])
@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("api", ["closure", "two-call"])
def test_gsam_matches_the_paper(backend, base, api):
    data = batches(20)
    lrs = [lr_at(t) for t in range(20)]
    cls, kw = BASES[base]
    ref = make_model()
    mine = copy.deepcopy(ref)
    reference_gsam(ref, cls(ref.parameters(), lr=lrs[0], foreach=False, **kw), data, 0.1, 0.02, 0.05, 0.0, 0.3, lrs)
    opt = sharpness.GSAM(mine.parameters(), cls, rho=0.1, rho_min=0.02, alpha=0.3, lr=0.05, backend=backend, **kw)
    run(opt, mine, data, api, lrs)
    assert_close(ref, mine)
    assert opt.stats["steps"] == 20
    assert opt.param_groups[0]["sam_rho"] == pytest.approx(0.02 + 0.08 * lrs[-1] / 0.05)
    if backend == "rust":
        assert opt.stats["fused_steps"] == 20


def test_alpha_zero_is_sam_bit_for_bit():
    data = batches(20)
    for backend in ("rust", "torch"):
        a, b = make_model(), make_model()
        run(sharpness.SAM(a.parameters(), torch.optim.SGD, rho=0.1, lr=0.05, momentum=0.9, backend=backend), a, data, "closure")
        run(
            sharpness.GSAM(b.parameters(), torch.optim.SGD, alpha=0.0, rho=0.1, lr=0.05, momentum=0.9, backend=backend),
            b,
            data,
            "closure",
        )
        assert_equal(a, b)


def test_rho_follows_a_torch_lr_scheduler():
    model = make_model()
    opt = sharpness.GSAM(model.parameters(), torch.optim.SGD, rho=0.2, rho_min=0.05, lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10, eta_min=0.01)
    seen = []
    for x, y in batches(10):
        lr = opt.param_groups[0]["lr"]
        loss_of(model, x, y).backward()
        opt.first_step(zero_grad=True)
        seen.append((lr, opt.param_groups[0]["sam_rho"]))
        loss_of(model, x, y).backward()
        opt.second_step(zero_grad=True)
        sched.step()
    for lr, rho in seen:  # lr_max = the lr at construction, lr_min = 0 by default
        assert rho == pytest.approx(0.05 + 0.15 * lr / 0.1)
    assert seen[0][1] == pytest.approx(0.2)


def test_update_keeps_the_descent_along_g_p_on_a_quadratic():
    """Plain SGD on L(w) = ½ wᵀAw − bᵀw: the GSAM direction d = g_p − α g_⊥ has ⟨d, g_p⟩ = ‖g_p‖²
    (the step along g_p is SAM's) and ‖d‖² = ‖g_p‖² + α²‖g_⊥‖², with g_p = A(w + ρĝ) − b exactly."""
    torch.manual_seed(3)
    n = 7
    q = torch.randn(n, n, dtype=torch.float64)
    A = q @ q.T + torch.eye(n, dtype=torch.float64)
    b = torch.randn(n, dtype=torch.float64)
    w0 = torch.randn(n, dtype=torch.float64)
    rho, alpha, lr = 0.3, 0.4, 0.05
    for backend in ("rust", "torch"):
        w = nn.Parameter(w0.clone())
        opt = sharpness.GSAM([w], torch.optim.SGD, rho=rho, alpha=alpha, lr=lr, backend=backend)

        def closure():
            opt.zero_grad()
            loss = 0.5 * w @ A @ w - b @ w
            loss.backward()
            return loss

        opt.step(closure)
        g = A @ w0 - b
        gp = A @ (w0 + rho * g / g.norm()) - b
        g_perp = g - (g @ gp) / (gp @ gp) * gp
        d = (w0 - w.detach()) / lr
        torch.testing.assert_close(d, gp - alpha * g_perp, rtol=1e-10, atol=1e-12)
        assert float(d @ gp) == pytest.approx(float(gp @ gp), rel=1e-10)
        assert float(d @ d) == pytest.approx(float(gp @ gp + alpha**2 * g_perp @ g_perp), rel=1e-10)
        assert abs(float(g_perp @ gp)) < 1e-10 * float(g.norm() * gp.norm())


@pytest.mark.parametrize("backend", ["rust", "torch"])
def test_state_dict_round_trip_mid_schedule(backend):
    data = batches(14)

    def build(model):
        opt = sharpness.GSAM(
            model.parameters(), torch.optim.SGD, rho=0.1, rho_min=0.01, alpha=0.2, lr=0.05, momentum=0.9, backend=backend
        )
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)

    def train(opt, sched, model, part):
        for x, y in part:
            run(opt, model, [(x, y)], "closure")
            sched.step()

    a = make_model()
    opt_a, sched_a = build(a)
    train(opt_a, sched_a, a, data)

    b = make_model()
    opt_b, sched_b = build(b)
    train(opt_b, sched_b, b, data[:6])
    buf = io.BytesIO()
    torch.save({"model": b.state_dict(), "opt": opt_b.state_dict(), "sched": sched_b.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    assert all("gsam_g" not in entry for entry in ckpt["opt"]["state"].values())  # transient: not saved
    assert ckpt["opt"]["param_groups"][0]["gsam_rho_max"] == 0.1
    c = make_model(seed=5)
    opt_c, sched_c = build(c)
    c.load_state_dict(ckpt["model"])
    opt_c.load_state_dict(ckpt["opt"])
    sched_c.load_state_dict(ckpt["sched"])
    train(opt_c, sched_c, c, data[6:])
    assert_equal(a, c)


def test_bad_arguments():
    model = make_model()
    with pytest.raises(ValueError, match="alpha"):
        sharpness.GSAM(model.parameters(), torch.optim.SGD, alpha=-0.1, lr=0.1)
    with pytest.raises(ValueError, match="rho_min"):
        sharpness.GSAM(model.parameters(), torch.optim.SGD, rho_min=float("nan"), lr=0.1)


# -- ρ_t stays within [ρ_min, ρ_max] -------------------------------------------------------------


def clamped_rho(lr, rho_max, rho_min, lr_max, lr_min):
    """The schedule, linear in lr, then clamped to its ends."""
    rho = rho_min + (rho_max - rho_min) * (lr - lr_min) / (lr_max - lr_min)
    return min(rho_max, max(rho_min, rho))


@pytest.mark.parametrize("backend", ["rust", "torch"])
def test_rho_t_is_clamped_to_rho_min_and_rho_under_a_one_cycle_schedule(backend):
    # OneCycleLR peaks at max_lr = 0.4, above lr_max = 0.1 (the lr at construction); it starts
    # and ends far below lr_min = 0.02. Unclamped, ρ_t would reach 0.02 + 0.08·0.38/0.08 = 0.4.
    model = make_model()
    params = list(model.parameters())
    opt = sharpness.GSAM(params, torch.optim.SGD, rho=0.1, rho_min=0.02, lr_min=0.02, lr=0.1, backend=backend)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.4, total_steps=12)
    seen = []
    for x, y in batches(12):
        lr = opt.param_groups[0]["lr"]
        loss_of(model, x, y).backward()
        w = [p.detach().clone() for p in params]
        opt.first_step(zero_grad=True)
        e = math.sqrt(sum(float(((p.detach() - v).double() ** 2).sum()) for p, v in zip(params, w)))
        seen.append((lr, opt.param_groups[0]["sam_rho"], e))
        loss_of(model, x, y).backward()
        opt.second_step(zero_grad=True)
        sched.step()
    assert any(lr > 0.1 for lr, _, _ in seen) and any(lr < 0.02 for lr, _, _ in seen)
    for lr, rho, e in seen:
        assert rho == pytest.approx(clamped_rho(lr, 0.1, 0.02, 0.1, 0.02), rel=1e-12)
        if lr >= 0.1:
            assert rho == 0.1  # exactly ρ_max
        if lr <= 0.02:
            assert rho == 0.02  # exactly ρ_min
        assert e == pytest.approx(rho, rel=1e-4)  # the perturbation has that radius


def test_rho_t_at_learning_rates_outside_the_schedule():
    model = make_model()
    opt = sharpness.GSAM(model.parameters(), torch.optim.SGD, rho=0.1, rho_min=0.02, lr_max=0.05, lr_min=0.01, lr=0.05)
    group = opt.param_groups[0]
    for lr, expected in [(0.185, 0.1), (0.05, 0.1), (0.03, 0.06), (0.01, 0.02), (0.004, 0.02), (0.0, 0.02)]:
        group["lr"] = lr
        assert opt.rho_t(group) == pytest.approx(expected, rel=1e-12)
    group["lr"] = 0.185
    assert opt.rho_t(group) == 0.1
    group["lr"] = 0.0
    assert opt.rho_t(group) == 0.02


def test_rho_min_above_rho_is_refused():
    model = make_model()
    with pytest.raises(ValueError, match=r"rho_min \(0\.2\).*rho \(0\.1\)"):
        sharpness.GSAM(model.parameters(), torch.optim.SGD, rho=0.1, rho_min=0.2, lr=0.1)
    with pytest.raises(ValueError, match=r"rho_min \(0\.05\).*rho \(0\.0\)"):
        sharpness.GSAM(model.parameters(), torch.optim.SGD, rho=0.0, rho_min=0.05, lr=0.1)
    with pytest.raises(ValueError, match=r"rho_min \(0\.05\).*rho \(0\.03\)"):  # a group's own ρ
        sharpness.GSAM([{"params": model[0].parameters(), "sam_rho": 0.03}, {"params": model[2].parameters()}],
                       torch.optim.SGD, rho=0.1, rho_min=0.05, lr=0.1)
    # A group with ρ = 0 is never perturbed: the global ρ_min does not apply to it.
    opt = sharpness.GSAM([{"params": model[0].parameters(), "sam_rho": 0.0}, {"params": model[2].parameters()}],
                         torch.optim.SGD, rho=0.1, rho_min=0.05, lr=0.1)
    assert opt.rho_t(opt.param_groups[0]) == 0.0
    opt.param_groups[1]["gsam_rho_min"] = 0.3  # changed after construction: refused at the next step
    with pytest.raises(ValueError, match=r"rho_min \(0\.3\).*rho \(0\.1\)"):
        opt.rho_t(opt.param_groups[1])
