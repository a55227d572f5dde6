"""Friendly SAM on both fronts (one rule, :mod:`sharpness.methods.friendly`).

Torch front: against a per-tensor reference written here from the paper and its official code
(Li et al., CVPR 2024: d = g − σm with the previous m, m starting at the first gradient, m an EMA
of the raw gradients), the σ = 0 limit (SAM bit for bit), a closed form on a quadratic, and a
checkpoint round trip. Numpy front: against a per-array float64 reference of the same algorithm,
its limits, the torch front on the same gradients, checkpoints, non-finite norms and bad input.
"""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch
from _family import BASES, assert_close, assert_equal, batches, flat_dot, grads_at, grads_at_offset, make_model, run
from _numpy_family import AdamRef, SGDRef, SoftmaxRegression, add, assert_arrays, copies, norm, torch_closure, torch_params
from torch import nn

import sharpness
from sharpness import numpy as snp


def reference_fsam(model, base, data, rho, sigma, lam):
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
            m = [mi * lam + gi * (1 - lam) for gi, mi in zip(g, m)]
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
    opt = sharpness.FriendlySAM(mine.parameters(), cls, rho=0.1, sigma=1.0, lam=0.9, backend=backend, **kw)
    run(opt, mine, data, api)
    assert_close(ref, mine)
    # m is the moving average of the raw gradients (not of d)
    for p, mr in zip(mine.parameters(), m_ref):
        torch.testing.assert_close(opt.vectors[p]["fsam_momentum"], mr, rtol=1e-5, atol=1e-7)
    if backend == "rust":
        assert opt.stats["fused_steps"] == 20


@pytest.mark.parametrize("sigma, lam", [(0.5, 0.6), (2.0, 0.95)])
def test_other_sigma_and_lambda(sigma, lam):
    data = batches(20)
    ref = make_model()
    mine = copy.deepcopy(ref)
    reference_fsam(ref, torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, foreach=False), data, 0.05, sigma, lam)
    opt = sharpness.FriendlySAM(mine.parameters(), torch.optim.SGD, rho=0.05, sigma=sigma, lam=lam, lr=0.05, momentum=0.9)
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
    rho, sigma, lam, lr = 0.2, 0.8, 0.9, 0.05
    grad = lambda v: A @ v - b  # noqa: E731
    g0 = grad(w0)
    w1 = w0 - lr * grad(w0 + rho * g0 / g0.norm())
    d1 = grad(w1) - sigma * g0
    w2 = w1 - lr * grad(w1 + rho * d1 / d1.norm())
    for backend in ("rust", "torch"):
        w = nn.Parameter(w0.clone())
        opt = sharpness.FriendlySAM([w], torch.optim.SGD, rho=rho, sigma=sigma, lam=lam, lr=lr, backend=backend)

        def closure():
            opt.zero_grad()
            loss = 0.5 * w @ A @ w - b @ w
            loss.backward()
            return loss

        opt.step(closure)
        torch.testing.assert_close(w.detach(), w1, rtol=1e-12, atol=1e-13)
        opt.step(closure)
        torch.testing.assert_close(w.detach(), w2, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(opt.vectors[w]["fsam_momentum"], lam * g0 + (1 - lam) * grad(w1), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("backend", ["rust", "torch"])
def test_state_dict_round_trip(backend):
    data = batches(14)
    build = lambda model: sharpness.FriendlySAM(  # noqa: E731
        model.parameters(), torch.optim.SGD, rho=0.1, sigma=1.0, lam=0.9, lr=0.05, momentum=0.9, backend=backend
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
    with pytest.raises(ValueError, match="lam"):
        sharpness.FriendlySAM(model.parameters(), torch.optim.SGD, lam=1.5, lr=0.1)
    with pytest.raises(ValueError, match="sigma"):
        sharpness.FriendlySAM(model.parameters(), torch.optim.SGD, sigma=float("inf"), lr=0.1)


def test_a_checkpoint_of_another_method_is_refused():
    sd = sharpness.SAM(make_model().parameters(), torch.optim.SGD, lr=0.1).state_dict()
    with pytest.raises(ValueError, match="FriendlySAM"):
        sharpness.FriendlySAM(make_model().parameters(), torch.optim.SGD, lr=0.1).load_state_dict(sd)


@pytest.mark.parametrize("backend", ["rust", "torch"])
def test_last_grad_norm_is_the_norm_of_d_and_the_perturbation_report_measures_e(backend):
    """``e = ρd/‖d‖``: ``last_grad_norm`` is ``‖d‖`` (not ``‖g‖``), so ``perturbation_report``,
    which rebuilds ``e`` from it and the gradients (``d`` after ``first_step``), finds ``‖e‖ = ρ``."""
    model = make_model().double()
    data = [(x.double(), y) for x, y in batches(3)]
    opt = sharpness.FriendlySAM(model.parameters(), torch.optim.SGD, rho=0.1, sigma=1.0, lam=0.9, lr=0.05, backend=backend)
    run(opt, model, data[:2], "two-call")
    m = [opt.vectors[p]["fsam_momentum"].clone() for p in model.parameters()]
    g = grads_at(model, *data[2])  # left in p.grad
    d = [gi - mi for gi, mi in zip(g, m)]
    opt.first_step()
    assert opt.last_grad_norm == pytest.approx(math.sqrt(flat_dot(d, d)), rel=1e-9)
    assert abs(opt.last_grad_norm - math.sqrt(flat_dot(g, g))) > 1e-3 * opt.last_grad_norm  # ‖d‖ is not ‖g‖ here
    report = opt.perturbation_report()
    assert report["intended_norm"] == pytest.approx(0.1, rel=1e-9)
    assert report["relative_error"] < 1e-9
    opt.restore()


# == the numpy front (sharpness.numpy.FriendlySAM: the same rule over numpy arrays) ================
# A small softmax regression with hand-written gradients and a per-array float64 reference of the
# official algorithm with torch.optim's step (SGDRef, AdamRef: _numpy_family).

PROBLEM = SoftmaxRegression(n_rows=48, n_in=5, n_classes=4, batch=24, stride=11)
make_problem, loss_and_grads = PROBLEM.make_problem, PROBLEM.loss_and_grads
batch_rows, grad_fn_for = PROBLEM.batch_rows, PROBLEM.grad_fn_for
STEPS = 25
NP_BASES = {
    "sgd": (lambda: SGDRef(0.1, momentum=0.9, weight_decay=1e-3), dict(base="sgd", lr=0.1, momentum=0.9, weight_decay=1e-3)),
    "adam": (lambda: AdamRef(1e-2), dict(base="adam", lr=1e-2)),
}
LIMIT_BASES = [dict(base="sgd", lr=0.05, momentum=0.9, weight_decay=1e-3), dict(base="adam", lr=1e-2)]
TORCH_BASES = [
    ("sgd", torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
    ("adamw", torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2)),
]


def run_numpy(opt, X, labels, steps, start=0):
    for t in range(start, start + steps):
        opt.step(grad_fn_for(X, labels, t))


def run_torch(opt, tparams, X, labels, steps):
    """The torch front on the same gradients, computed in numpy from its current weights."""
    for t in range(steps):
        opt.step(torch_closure(tparams, grad_fn_for(X, labels, t)))


def reference_friendly(X, labels, w, steps, rho, sigma, lam, base):
    """Li et al. 2024 (official code): m = g on the first step, then d = g − σm, m ← λm + (1−λ)g.
    Returns the weights, m and the last ‖d‖."""
    w = copies(w)
    m = None
    for t in range(steps):
        _, g = loss_and_grads(X, labels, w, batch_rows(t))
        if m is None:
            m, d = copies(g), g
        else:
            d = add(g, m, -sigma)
            m = [lam * mi + (1 - lam) * gi for mi, gi in zip(m, g)]
        _, gs = loss_and_grads(X, labels, add(w, [rho * x / (norm(d) + 1e-12) for x in d]), batch_rows(t))
        w = base.step(w, gs)
    return w, m, norm(d)


@pytest.mark.parametrize("base", ["sgd", "adam"])
@pytest.mark.parametrize("sigma, lam", [(1.0, 0.9), (0.5, 0.6)])
def test_numpy_friendly_sam_matches_the_official_algorithm(base, sigma, lam):
    X, labels, w = make_problem()
    ref, kw = NP_BASES[base]
    expected, m, d_norm = reference_friendly(X, labels, w, STEPS, 0.1, sigma, lam, ref())
    opt = snp.FriendlySAM(w, rho=0.1, sigma=sigma, lam=lam, **kw)
    run_numpy(opt, X, labels, STEPS)
    assert_arrays(w, expected)
    assert_arrays([opt.vectors[i]["fsam_momentum"] for i in range(len(w))], m)  # the EMA of the raw g
    assert opt.last_grad_norm == pytest.approx(d_norm, rel=1e-10)  # the norm e was scaled by: ‖d‖


@pytest.mark.parametrize("kw", LIMIT_BASES, ids=["sgd", "adam"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_numpy_sigma_zero_is_sam_bit_for_bit(kw, adaptive):
    rho = 0.5 if adaptive else 0.1
    X, labels, w0 = make_problem(np.float32)
    a, b = copies(w0), copies(w0)
    run_numpy(snp.FriendlySAM(a, rho=rho, sigma=0.0, lam=0.9, adaptive=adaptive, **kw), X, labels, 15)
    run_numpy(snp.SAM(b, rho=rho, adaptive=adaptive, **kw), X, labels, 15)
    assert_arrays(a, b, exact=True)


@pytest.mark.parametrize("kw", [dict(rho=0.1, sigma=1.0, lam=0.9), dict(rho=0.5, sigma=0.7, lam=0.8, adaptive=True)])
@pytest.mark.parametrize(
    "np_base, torch_base, base_kw",
    TORCH_BASES,
    ids=["sgd", "adamw"],
)
def test_both_fronts_agree_on_the_same_gradients(kw, np_base, torch_base, base_kw):
    X, labels, w = make_problem(np.float32)
    tparams = torch_params(w)
    opt = snp.FriendlySAM(w, base=np_base, **kw, **base_kw)
    run_numpy(opt, X, labels, 20)
    topt = sharpness.FriendlySAM(tparams, torch_base, backend="rust", **kw, **base_kw)
    run_torch(topt, tparams, X, labels, 20)
    assert_arrays(w, tparams, rtol=1e-5, atol=1e-6)
    assert_arrays(w, tparams, exact=True)  # the same rule on the same kernels
    m_numpy = [opt.vectors[i]["fsam_momentum"] for i in range(2)]
    assert_arrays(m_numpy, [topt.vectors[p]["fsam_momentum"] for p in tparams], exact=True)
    assert opt.last_grad_norm == pytest.approx(topt.last_grad_norm, rel=1e-12)  # sums in another order (ASAM)


def test_numpy_checkpoints_keep_the_momentum_of_d():
    """(The round trip itself: tests/test_numpy_behaviour.py.)"""
    X, labels, w = make_problem(np.float32)
    opt = snp.FriendlySAM(w, rho=0.1, sigma=1.0, lam=0.9, lr=0.05, momentum=0.9)
    run_numpy(opt, X, labels, 6)
    sd = opt.state_dict()
    assert sd["sam"]["state"]["fsam_started"] and set(sd["sam"]["vectors"]["fsam_momentum"]) == {0, 1}


def test_numpy_checkpoint_before_the_first_step():
    X, labels, w = make_problem(np.float32)
    sd = snp.FriendlySAM(copies(w), rho=0.1).state_dict()
    assert sd["sam"]["state"]["fsam_started"] is False and sd["sam"]["vectors"]["fsam_momentum"] == {}  # no m yet
    opt = snp.FriendlySAM(copies(w), rho=0.1)
    opt.load_state_dict(sd)
    assert opt.sam_state["fsam_started"] is False


def test_numpy_a_nonfinite_norm_never_reaches_the_weights():
    X, labels, w = make_problem(np.float32)
    opt = snp.FriendlySAM(w, rho=0.1, lr=0.05, momentum=0.9)
    run_numpy(opt, X, labels, 3)  # m exists
    before, m_before = copies(w), [opt.vectors[i]["fsam_momentum"].copy() for i in range(2)]
    _, g = loss_and_grads(X, labels, w)
    bad = copies(g)
    bad[0][0, 0] = np.inf
    assert opt.first_step(bad)  # the second half follows: the plain base step
    assert not math.isfinite(opt.last_grad_norm)
    assert_arrays(w, before, exact=True)  # nothing moved
    assert_arrays([opt.vectors[i]["fsam_momentum"] for i in range(2)], m_before, exact=True)  # m left alone
    opt.second_step(g)  # the plain update with finite gradients
    assert all(np.isfinite(a).all() for a in w)
    assert opt.stats["nonfinite_skips"] == 1 and opt.state_dict()["sam"]["stats"]["nonfinite_skips"] == 1


def quadratic_grads(p):
    """The gradient of ½‖w‖² (``w`` itself), as each front takes it."""
    if isinstance(p, torch.Tensor):
        p.grad = None
        (0.5 * (p * p).sum()).backward()
        return None
    return 0.5 * float(p[0] @ p[0]), [p[0].copy()]


@pytest.mark.parametrize("front", ["numpy", "rust", "torch"])
def test_a_nonfinite_norm_of_d_never_reaches_the_weights(front):
    """‖g‖ is finite but d = g − σm overflows float32 (m huge): no perturbation, counted, and the
    second half is the base step at w, on either front."""
    w0 = np.array([0.5, -1.0, 2.0], dtype=np.float32)
    kw = dict(rho=0.1, sigma=2.0, lam=0.9, lr=0.1)
    if front == "numpy":
        w = w0.copy()
        opt = snp.FriendlySAM([w], **kw)
        opt.step(quadratic_grads)  # m = g
        opt.vectors[0]["fsam_momentum"][...] = -3e38
        assert opt.first_step(quadratic_grads([w])[1])
        weights = lambda: w.copy()  # noqa: E731
        second = lambda: opt.second_step(quadratic_grads([w])[1])  # noqa: E731
    else:
        p = nn.Parameter(torch.from_numpy(w0.copy()))
        opt = sharpness.FriendlySAM([p], torch.optim.SGD, backend=front, **kw)
        quadratic_grads(p)
        opt.first_step()
        quadratic_grads(p)
        opt.second_step()
        with torch.no_grad():
            opt.vectors[p]["fsam_momentum"].fill_(-3e38)
        quadratic_grads(p)
        assert opt.first_step()
        weights = lambda: p.detach().numpy().copy()  # noqa: E731

        def second():
            quadratic_grads(p)
            opt.second_step()

    before = weights()
    w_at_start = before.copy()
    assert math.isinf(opt.last_grad_norm)
    assert opt.stats["nonfinite_skips"] == 1
    second()
    after = weights()
    assert np.isfinite(after).all()
    np.testing.assert_allclose(after, w_at_start - np.float32(0.1) * w_at_start, rtol=1e-6)  # SGD on g̃ = ∇L(w)


def test_numpy_bad_arguments():
    w = [np.zeros(3)]
    with pytest.raises(ValueError, match="lam"):
        snp.FriendlySAM(w, lam=1.5)
    with pytest.raises(ValueError, match="sigma"):
        snp.FriendlySAM(w, sigma=math.nan)


def test_numpy_load_refuses_another_methods_state():
    with pytest.raises(ValueError, match="FriendlySAM"):
        snp.FriendlySAM([np.zeros(3)]).load_state_dict(snp.SAM([np.zeros(3)]).state_dict())
