"""GSAM against a per-tensor reference written here from the paper (Zhuang et al., ICLR 2022,
Algorithm 1, with ρ_t proportional to the learning rate), the α = 0 limit (SAM bit for bit), a
closed-form property of the update on a quadratic, and a checkpoint round trip."""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch
from _family import assert_close, assert_equal, batches, flat_dot, grads_at, grads_at_offset, loss_of
from _numpy_family import (
    AdamRef,
    SGDRef,
    SoftmaxRegression,
    add,
    assert_arrays,
    copies,
    dot as np_dot,
    norm as np_norm,
    torch_closure,
    torch_params,
)
from torch import nn

import sharpness
from sharpness import numpy as snp


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


# == the numpy front (sharpness.numpy.GSAM: the same rule over numpy arrays) ======================
# A small softmax regression with hand-written gradients; references per array in float64 with
# torch.optim's steps (SGDRef, AdamRef), written from Algorithm 1.

NP_PROBLEM = SoftmaxRegression(n_rows=48, n_in=5, n_classes=4, batch=24, stride=11)
np_problem, np_loss_and_grads = NP_PROBLEM.make_problem, NP_PROBLEM.loss_and_grads
np_batch_rows, np_grad_fn_for = NP_PROBLEM.batch_rows, NP_PROBLEM.grad_fn_for
NP_STEPS = 25
NP_BASES = {
    "sgd": (lambda: SGDRef(0.1, momentum=0.9, weight_decay=1e-3), dict(base="sgd", lr=0.1, momentum=0.9, weight_decay=1e-3)),
    "adam": (lambda: AdamRef(1e-2), dict(base="adam", lr=1e-2)),
    "adamw": (lambda: AdamRef(1e-2, weight_decay=0.05, decoupled=True), dict(base="adamw", lr=1e-2, weight_decay=0.05)),
}


def np_lr_at(t, lr0):
    """A decaying schedule (ρ_t follows it)."""
    return lr0 * (1.0 - 0.04 * t)


def set_lr(opt, lr):
    for group in opt.param_groups:
        group["lr"] = lr


def np_run(opt, X, labels, steps, start=0, schedule=None):
    for t in range(start, start + steps):
        if schedule is not None:
            set_lr(opt, np_lr_at(t, schedule))
        opt.step(np_grad_fn_for(X, labels, t))


def np_run_torch(opt, tparams, X, labels, steps, schedule=None):
    """The torch front on the same gradients, computed in numpy from its current weights."""
    for t in range(steps):
        if schedule is not None:
            set_lr(opt, np_lr_at(t, schedule))
        opt.step(torch_closure(tparams, np_grad_fn_for(X, labels, t)))


def sam_e(g, rho):
    return [rho * x / (np_norm(g) + 1e-12) for x in g]


def np_reference_gsam_at(X, labels, w, lrs, rho_max, rho_min, lr_max, lr_min, alpha, base):
    """Algorithm 1 with ρ_t linear in lr_t between (lr_min, ρ_min) and (lr_max, ρ_max), clamped to
    [ρ_min, ρ_max]; returns the weights and the ρ_t of each step."""
    w, rhos = copies(w), []
    for t, lr in enumerate(lrs):
        base.lr = lr
        rho = min(rho_max, max(rho_min, rho_min + (rho_max - rho_min) * (lr - lr_min) / (lr_max - lr_min)))
        rhos.append(rho)
        _, g = np_loss_and_grads(X, labels, w, np_batch_rows(t))
        _, gp = np_loss_and_grads(X, labels, add(w, sam_e(g, rho)), np_batch_rows(t))
        g_perp = add(g, gp, -np_dot(g, gp) / np_dot(gp, gp))
        w = base.step(w, add(gp, g_perp, -alpha))
    return w, rhos


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_numpy_gsam_matches_the_paper(base):
    X, labels, w = np_problem()
    ref, kw = NP_BASES[base]
    lr0 = kw["lr"]
    lrs = [np_lr_at(t, lr0) for t in range(NP_STEPS)]
    expected, _ = np_reference_gsam_at(X, labels, w, lrs, 0.2, 0.05, lr0, 0.0, 0.3, ref())
    opt = snp.GSAM(w, rho=0.2, rho_min=0.05, alpha=0.3, **kw)
    np_run(opt, X, labels, NP_STEPS, schedule=lr0)
    assert_arrays(w, expected)
    assert opt.param_groups[0]["sam_rho"] == pytest.approx(0.05 + 0.15 * np_lr_at(NP_STEPS - 1, lr0) / lr0)


@pytest.mark.parametrize("kw", [dict(base="sgd", lr=0.05, momentum=0.9, weight_decay=1e-3), dict(base="adam", lr=1e-2)])
def test_numpy_alpha_zero_is_sam_bit_for_bit(kw):
    X, labels, w0 = np_problem(np.float32)
    a, b = copies(w0), copies(w0)
    np_run(snp.GSAM(a, rho=0.1, alpha=0.0, **kw), X, labels, 15, schedule=kw["lr"])
    np_run(snp.SAM(b, rho=0.1, **kw), X, labels, 15, schedule=kw["lr"])
    assert_arrays(a, b, exact=True)


@pytest.mark.parametrize(
    "np_base, torch_base, base_kw",
    [
        ("sgd", torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
        ("adamw", torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2)),
    ],
    ids=["sgd", "adamw"],
)
def test_numpy_front_follows_the_torch_front(np_base, torch_base, base_kw):
    X, labels, w = np_problem(np.float32)
    tparams = torch_params(w)
    kw = dict(rho=0.1, rho_min=0.02, alpha=0.3)
    np_run(snp.GSAM(w, base=np_base, **kw, **base_kw), X, labels, 20, schedule=base_kw["lr"])
    topt = sharpness.GSAM(tparams, torch_base, backend="rust", **kw, **base_kw)
    np_run_torch(topt, tparams, X, labels, 20, schedule=base_kw["lr"])
    assert_arrays(w, tparams, rtol=1e-5, atol=1e-6)


def test_numpy_state_dict_round_trip_mid_run_keeps_the_schedule():
    kw = dict(rho=0.1, rho_min=0.02, alpha=0.3, lr=0.05, momentum=0.9)
    X, labels, w0 = np_problem(np.float32)
    a = copies(w0)
    np_run(snp.GSAM(a, **kw), X, labels, 14, schedule=0.05)
    b = copies(w0)
    opt_b = snp.GSAM(b, **kw)
    np_run(opt_b, X, labels, 6, schedule=0.05)
    sd = copy.deepcopy(opt_b.state_dict())
    snapshot = copies(b)
    np_run(opt_b, X, labels, 2, start=6, schedule=0.05)  # later steps leave the saved dict alone
    c = copies(snapshot)
    opt_c = snp.GSAM(c, **dict(kw, lr=0.5))  # lr_max comes from the checkpoint
    opt_c.load_state_dict(sd)
    np_run(opt_c, X, labels, 8, start=6, schedule=0.05)
    assert_arrays(a, c, exact=True)
    g = snp.GSAM(copies(w0), rho=0.2, rho_min=0.1, lr=0.1)
    g2 = snp.GSAM(copies(w0), rho=0.4, lr=1.0)
    g2.load_state_dict(g.state_dict())
    group = g2.param_groups[0]
    assert (group["gsam_rho_max"], group["gsam_rho_min"], group["gsam_lr_max"], group["gsam_lr_min"]) == (0.2, 0.1, 0.1, 0.0)
    with pytest.raises(ValueError, match="saved by SAM; this optimizer is GSAM"):
        snp.GSAM(copies(w0)).load_state_dict(snp.SAM(copies(w0)).state_dict())


def test_numpy_a_nonfinite_norm_never_reaches_the_weights():
    X, labels, w = np_problem(np.float32)
    opt = snp.GSAM(w, rho=0.1, alpha=0.3, lr=0.05, momentum=0.9)
    np_run(opt, X, labels, 3)
    before = copies(w)
    _, g = np_loss_and_grads(X, labels, w)
    bad = copies(g)
    bad[0][0, 0] = np.inf
    assert opt.first_step(bad) is True and not math.isfinite(opt.last_grad_norm)
    assert_arrays(w, before, exact=True)  # nothing moved
    opt.second_step(g)  # the plain update with finite gradients
    assert all(np.isfinite(a).all() for a in w)
    assert opt.state_dict()["sam"]["stats"]["nonfinite_skips"] == 1
    # exceptions, the caller's gradients, mixed dtypes: tests/test_numpy_behaviour.py


def test_numpy_bad_arguments():
    w = [np.zeros(3)]
    with pytest.raises(ValueError, match="alpha"):
        snp.GSAM(w, alpha=-0.1)
    with pytest.raises(TypeError, match="alpha"):
        snp.GSAM(w, alpha="big")
    with pytest.raises(ValueError, match="rho_min"):
        snp.GSAM(w, rho_min=-1.0)
    with pytest.raises(ValueError, match="lr_max"):
        snp.GSAM(w, lr_max=math.inf)
    with pytest.raises(ValueError, match="rho"):
        snp.GSAM(w, rho=-1.0)
    with pytest.raises(TypeError, match="dtype"):
        snp.GSAM([np.zeros(3, dtype=np.int64)])
    with pytest.raises(TypeError, match="not one array"):
        snp.GSAM(np.zeros(3))
    with pytest.raises(ValueError, match="empty"):
        snp.GSAM([])
    # the protocol and input errors: tests/test_numpy_behaviour.py


# A warm-up past lr_max = 0.1 (the lr at construction), then a decay below lr_min = 0.02.
GSAM_LRS = [0.02, 0.1, 0.25, 0.37, 0.3, 0.15, 0.08, 0.05, 0.02, 0.01, 0.004, 0.0]


def test_numpy_rho_t_is_clamped_to_its_ends_against_the_reference():
    X, labels, w = np_problem()
    expected, rhos = np_reference_gsam_at(X, labels, w, GSAM_LRS, 0.1, 0.02, 0.1, 0.02, 0.3, SGDRef(0.1, momentum=0.9))
    opt = snp.GSAM(w, rho=0.1, rho_min=0.02, lr_min=0.02, alpha=0.3, lr=0.1, momentum=0.9)
    seen = []
    for t, lr in enumerate(GSAM_LRS):
        set_lr(opt, lr)
        opt.step(np_grad_fn_for(X, labels, t))
        seen.append(opt.param_groups[0]["sam_rho"])
    assert seen == pytest.approx(rhos, rel=1e-12)
    for lr, rho in zip(GSAM_LRS, seen):
        if lr >= 0.1:
            assert rho == 0.1  # exactly ρ_max
        if lr <= 0.02:
            assert rho == 0.02  # exactly ρ_min
    assert_arrays(w, expected)


def test_numpy_and_torch_fronts_clamp_rho_t_alike():
    X, labels, w = np_problem(np.float32)
    tparams = torch_params(w)
    kw = dict(rho=0.1, rho_min=0.02, lr_min=0.02, alpha=0.3, lr=0.1, momentum=0.9)
    opt = snp.GSAM(w, **kw)
    topt = sharpness.GSAM(tparams, torch.optim.SGD, backend="rust", **kw)
    for t, lr in enumerate(GSAM_LRS):
        set_lr(opt, lr)
        set_lr(topt, lr)
        opt.step(np_grad_fn_for(X, labels, t))
        topt.step(torch_closure(tparams, np_grad_fn_for(X, labels, t)))
        group = opt.param_groups[0]
        assert group["sam_rho"] == topt.param_groups[0]["sam_rho"] == opt.rho_t(group)
        assert opt.rho_t(group) == topt.rho_t(topt.param_groups[0])
    assert_arrays(w, tparams, rtol=1e-5, atol=1e-6)


def test_numpy_rho_min_above_rho_is_refused():
    w = [np.zeros(3)]
    with pytest.raises(ValueError, match=r"rho_min \(0\.2\).*rho \(0\.1\)"):
        snp.GSAM(w, rho=0.1, rho_min=0.2)
    with pytest.raises(ValueError, match=r"rho_min \(0\.05\).*rho \(0\.0\)"):
        snp.GSAM(w, rho=0.0, rho_min=0.05)
    sd = snp.GSAM(w, rho=0.1, rho_min=0.05).state_dict()
    sd["param_groups"][0]["gsam_rho_min"] = 0.3
    with pytest.raises(ValueError, match=r"rho_min \(0\.3\).*rho \(0\.1\)"):
        snp.GSAM(w, rho=0.1).load_state_dict(sd)
    opt = snp.GSAM(w, rho=0.1, rho_min=0.05)
    opt.param_groups[0]["gsam_rho_min"] = 0.3  # changed after construction: refused at the next step
    with pytest.raises(ValueError, match=r"rho_min \(0\.3\).*rho \(0\.1\)"):
        opt.rho_t(opt.param_groups[0])
    with pytest.raises(ValueError, match=r"rho_min \(0\.3\).*rho \(0\.1\)"):
        opt.step(lambda params: (0.0, [np.ones(3)]))
    assert w[0].tobytes() == np.zeros(3).tobytes()
