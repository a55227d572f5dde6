"""WSAM on both fronts (one rule, :mod:`sharpness.methods.wsam`).

Torch front: against a per-tensor reference written here from the paper's Algorithm 1 and the
official code (Yue et al., KDD 2023: the base optimizer steps on g, then w ← w − lr·α(g̃ − g),
α = γ/(1−γ); or, coupled, the base step on g + α(g̃ − g)), the limits γ = 0.5 (SAM) and γ = 0 (the
base optimizer), a closed form on a quadratic, and a checkpoint round trip. Numpy front: against a
per-array float64 reference of the same algorithm, the same limits, the torch front on the same
gradients, checkpoints, non-finite norms and bad input.
"""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch
from _family import BASES, assert_close, assert_equal, batches, flat_dot, grads_at, grads_at_offset, loss_of, make_model, run
from _numpy_family import AdamRef, SGDRef, SoftmaxRegression, add, assert_arrays, copies, norm, torch_closure, torch_params
from torch import nn

import sharpness
from sharpness import numpy as snp


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
    with pytest.raises(TypeError, match="decouple"):  # a flag, checked as on the numpy front
        sharpness.WSAM(model.parameters(), torch.optim.SGD, decouple="yes", lr=0.1)


# == the numpy front (sharpness.numpy.WSAM: the same rule over numpy arrays) =======================
# A small softmax regression with hand-written gradients and a per-array float64 reference of the
# paper's algorithm with torch.optim's step (SGDRef, AdamRef: _numpy_family).

PROBLEM = SoftmaxRegression(n_rows=48, n_in=5, n_classes=4, batch=24, stride=11)
make_problem, loss_and_grads = PROBLEM.make_problem, PROBLEM.loss_and_grads
batch_rows, grad_fn_for = PROBLEM.batch_rows, PROBLEM.grad_fn_for
STEPS = 25
NP_BASES = {
    "sgd": (lambda: SGDRef(0.1, momentum=0.9, weight_decay=1e-3), dict(base="sgd", lr=0.1, momentum=0.9, weight_decay=1e-3)),
    "adamw": (lambda: AdamRef(1e-2, weight_decay=0.05, decoupled=True), dict(base="adamw", lr=1e-2, weight_decay=0.05)),
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


def reference_wsam_numpy(X, labels, w, steps, rho, gamma, decouple, base):
    """Yue et al. 2023: α = γ/(1−γ); decoupled: base step on g, then w ← w − lr·α(g̃ − g);
    coupled: the base step on g + α(g̃ − g)."""
    w = copies(w)
    alpha = gamma / (1 - gamma)
    for t in range(steps):
        _, g = loss_and_grads(X, labels, w, batch_rows(t))
        _, gt = loss_and_grads(X, labels, add(w, [rho * x / (norm(g) + 1e-12) for x in g]), batch_rows(t))
        sharp = add(gt, g, -1.0)
        if decouple:
            w = add(base.step(w, g), sharp, -base.lr * alpha)
        else:
            w = base.step(w, add(g, sharp, alpha))
    return w


@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("decouple", [True, False])
def test_numpy_wsam_matches_the_paper(base, decouple):
    X, labels, w = make_problem()
    ref, kw = NP_BASES[base]
    expected = reference_wsam_numpy(X, labels, w, STEPS, 0.1, 0.9, decouple, ref())
    opt = snp.WSAM(w, rho=0.1, gamma=0.9, decouple=decouple, **kw)
    run_numpy(opt, X, labels, STEPS)
    assert_arrays(w, expected)
    assert opt.alpha == pytest.approx(9.0)


def same_run(make_a, make_b, dtype=np.float32, steps=15):
    X, labels, w0 = make_problem(dtype)
    a, b = copies(w0), copies(w0)
    run_numpy(make_a(a), X, labels, steps)
    run_numpy(make_b(b), X, labels, steps)
    return a, b


@pytest.mark.parametrize("kw", LIMIT_BASES, ids=["sgd", "adam"])
def test_numpy_gamma_half_coupled_is_sam_bit_for_bit(kw):
    a, b = same_run(lambda p: snp.WSAM(p, rho=0.1, gamma=0.5, decouple=False, **kw), lambda p: snp.SAM(p, rho=0.1, **kw))
    assert_arrays(a, b, exact=True)


def test_numpy_gamma_half_decoupled_with_plain_sgd_is_sam_to_rounding():
    a, b = same_run(lambda p: snp.WSAM(p, rho=0.1, gamma=0.5, lr=0.05), lambda p: snp.SAM(p, rho=0.1, lr=0.05), dtype=np.float64)
    assert_arrays(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kw", LIMIT_BASES, ids=["sgd", "adam"])
def test_numpy_gamma_zero_is_the_base_optimizer_bit_for_bit(kw):
    # SAM with ρ = 0 takes its second gradient at w itself: the base optimizer on g.
    a, b = same_run(lambda p: snp.WSAM(p, rho=0.1, gamma=0.0, **kw), lambda p: snp.SAM(p, rho=0.0, **kw))
    assert_arrays(a, b, exact=True)


@pytest.mark.parametrize("kw", [dict(rho=0.1, gamma=0.9), dict(rho=0.1, gamma=0.8, decouple=False)], ids=["decoupled", "coupled"])
@pytest.mark.parametrize(
    "np_base, torch_base, base_kw",
    TORCH_BASES,
    ids=["sgd", "adamw"],
)
def test_both_fronts_agree_on_the_same_gradients(kw, np_base, torch_base, base_kw):
    X, labels, w = make_problem(np.float32)
    tparams = torch_params(w)
    run_numpy(snp.WSAM(w, base=np_base, **kw, **base_kw), X, labels, 20)
    topt = sharpness.WSAM(tparams, torch_base, backend="rust", **kw, **base_kw)
    run_torch(topt, tparams, X, labels, 20)
    assert_arrays(w, tparams, rtol=1e-5, atol=1e-6)
    assert_arrays(w, tparams, exact=True)  # the same rule on the same kernels


def test_numpy_checkpoints_keep_no_gradient_buffers():
    """g and g̃ − g are not saved (the round trip itself: tests/test_numpy_behaviour.py)."""
    X, labels, w = make_problem(np.float32)
    opt = snp.WSAM(w, rho=0.1, gamma=0.9, base="adam", lr=1e-2)
    run_numpy(opt, X, labels, 6)
    assert all(set(entry) == {"step", "exp_avg", "exp_avg_sq"} for entry in opt.state_dict()["state"].values())


def test_numpy_a_nonfinite_norm_never_reaches_the_weights():
    X, labels, w = make_problem(np.float32)
    opt = snp.WSAM(w, rho=0.1, lr=0.05, momentum=0.9)
    run_numpy(opt, X, labels, 3)
    before = copies(w)
    _, g = loss_and_grads(X, labels, w)
    bad = copies(g)
    bad[0][0, 0] = np.inf
    assert opt.first_step(bad)  # the second half follows: the plain base step
    assert not math.isfinite(opt.last_grad_norm)
    assert_arrays(w, before, exact=True)  # nothing moved
    opt.second_step(g)  # the plain update with finite gradients
    assert all(np.isfinite(a).all() for a in w)
    assert opt.stats["nonfinite_skips"] == 1 and opt.state_dict()["sam"]["stats"]["nonfinite_skips"] == 1


def test_numpy_bad_arguments():
    w = [np.zeros(3)]
    with pytest.raises(ValueError, match="gamma"):
        snp.WSAM(w, gamma=1.0)
    with pytest.raises(TypeError, match="decouple"):
        snp.WSAM(w, decouple="yes")

