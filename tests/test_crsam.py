"""CR-SAM (Wu et al., AAAI 2024, arXiv:2312.13555) on both fronts: against references written here
from the official algorithm (per tensor for the torch front, per array in float64 for the numpy
front), its reduction to SAM, the closed form on a quadratic, checkpoints, bad input, non-finite
gradients and exceptions, and the two fronts against each other (the same rule)."""

from __future__ import annotations

import copy
import math
import pickle

import numpy as np
import pytest
import torch
from _family import assert_equal, batches, closure_for, grads_at, make_model, round_trip_mid_run, run
from _numpy_family import AdamWRef, SGDRef, SoftmaxRegression, assert_arrays, norm as np_norm, torch_closure, torch_params
from torch import nn

import sharpness
from sharpness.numpy import CRSAM, SAM

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


def test_adaptive_is_refused():
    """w − e mirrors SAM's plain e: CR-SAM has no ASAM form, refused on both fronts."""
    with pytest.raises(ValueError, match="adaptive"):
        sharpness.CRSAM(make_model().parameters(), torch.optim.SGD, adaptive=True, lr=0.1)
    model = make_model()
    opt = sharpness.CRSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    opt.param_groups[0]["sam_adaptive"] = True  # set after construction: refused by the step
    w0 = [p.detach().clone() for p in model.parameters()]
    (x, y), = batches(1)
    with pytest.raises(ValueError, match="adaptive"):
        opt.step(closure_for(opt, model, x, y))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w0))


def test_first_and_second_step_are_refused():
    opt = sharpness.CRSAM(make_model().parameters(), torch.optim.SGD, lr=0.1)
    for call in (opt.first_step, opt.second_step):
        with pytest.raises(RuntimeError, match="three gradients per step: call step\\(closure\\)"):
            call()


def test_torch_checkpoints_keep_the_coefficients():
    """γ and β live in ``sam_state``: a loaded checkpoint's win, and a checkpoint without them
    (plain SAM's) is refused."""
    data = batches(6)
    model = make_model()
    opt = sharpness.CRSAM(model.parameters(), torch.optim.SGD, gamma=0.3, beta=0.2, lr=0.1)
    run(opt, model, data[:3])
    ckpt = opt.state_dict()
    fresh = sharpness.CRSAM(make_model().parameters(), torch.optim.SGD, gamma=0.9, beta=0.0, lr=0.1)
    fresh.load_state_dict(ckpt)
    assert (fresh.gamma, fresh.beta) == (0.3, 0.2)
    with pytest.raises(ValueError, match="lacks"):
        fresh.load_state_dict(sharpness.SAM(make_model().parameters(), torch.optim.SGD, lr=0.1).state_dict())


# == the numpy front (sharpness.numpy.CRSAM: the same rule over numpy arrays) ======================
# Softmax regression with hand-written gradients; float64 references per array, straight from the
# formulas, with torch.optim's SGD and AdamW steps (SGDRef, AdamWRef).

STEPS = 20
PROBLEM = SoftmaxRegression(n_rows=64, n_in=6, n_classes=4, batch=16, stride=16, cast_data=False)
make_problem, loss_and_grads = PROBLEM.make_problem, PROBLEM.loss_and_grads
batch_rows, grad_fn_for = PROBLEM.batch_rows, PROBLEM.grad_fn_for
NP_BASES = {
    "sgd": (dict(base="sgd", lr=0.1, momentum=0.9, weight_decay=1e-3), lambda: SGDRef(0.1, 0.9, 1e-3)),
    "adamw": (dict(base="adamw", lr=1e-2, weight_decay=1e-2), lambda: AdamWRef(1e-2, weight_decay=1e-2)),
}
TORCH_BASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2)),
}
TOL = {np.float32: dict(rtol=2e-5, atol=1e-6), np.float64: dict(rtol=1e-11, atol=1e-13)}


def np_reference_crsam(X, labels, w, rho, gamma, beta, base):
    w = [p.astype(np.float64) for p in w]
    for t in range(STEPS):
        at = lambda p, t=t: loss_and_grads(X, labels, p, batch_rows(t))[1]  # noqa: E731
        g0 = at(w)
        e = [rho * g / (np_norm(g0) + 1e-12) for g in g0]
        gp = at([a + b for a, b in zip(w, e)])
        gm = at([a - b for a, b in zip(w, e)])
        u = [p + gamma * (p + m - 2 * z) + beta * (p - m) for z, p, m in zip(g0, gp, gm)]
        w = base.step(w, u)
    return w


def run_plain(opt, X, labels, start=0, stop=STEPS):
    for t in range(start, stop):
        opt.step(grad_fn_for(X, labels, t))


@pytest.mark.parametrize("base", sorted(NP_BASES))
@pytest.mark.parametrize("coef", [(0.1, 0.1), (0.5, -0.3)])
def test_numpy_crsam_matches_the_reference(base, coef):
    X, labels, w0 = make_problem()
    kw, ref_base = NP_BASES[base]
    ref = np_reference_crsam(X, labels, w0, 0.1, *coef, ref_base())
    w = copy.deepcopy(w0)
    opt = CRSAM(w, rho=0.1, gamma=coef[0], beta=coef[1], **kw)
    calls = []
    for t in range(STEPS):
        fn = grad_fn_for(X, labels, t)
        opt.step(lambda p: calls.append(1) or fn(p))
    assert len(calls) == 3 * STEPS
    assert_arrays(w, ref, rtol=1e-9, atol=1e-11)


def test_numpy_quadratic_closed_form():
    """L = ½ wᵀHw: g₊ + g₋ − 2g₀ = 0 and g₊ − g₋ = 2He, so u = Hw + (1 + 2β)ρ H ĝ (γ drops out)."""
    H = np.diag([1.0, 3.0, 0.5])
    w0 = np.array([1.0, -2.0, 0.5])
    w = w0.copy()
    rho, gamma, beta, lr = 0.3, 0.7, 0.2, 0.1
    CRSAM([w], rho=rho, gamma=gamma, beta=beta, lr=lr).step(lambda p: (0.5 * p[0] @ H @ p[0], [H @ p[0]]))
    g = H @ w0
    np.testing.assert_allclose(w, w0 - lr * (H @ w0 + (1 + 2 * beta) * rho * H @ (g / np.linalg.norm(g))), rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize(
    "kw", [dict(base="sgd", lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True), dict(base="adam", lr=1e-2, amsgrad=True)],
    ids=["sgd", "adam"],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64, "mixed"], ids=["f32", "f64", "mixed"])
def test_numpy_zero_coefficients_is_sam_bit_for_bit(kw, dtype):
    X, labels, expected = make_problem(dtype)
    run_plain(SAM(expected, rho=0.1, **kw), X, labels)
    X, labels, w = make_problem(dtype)
    run_plain(CRSAM(w, rho=0.1, gamma=0.0, beta=0.0, **kw), X, labels)
    assert_arrays(w, expected, exact=True)


@pytest.mark.parametrize("base", sorted(NP_BASES))
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("maximize", [False, True])
def test_the_fronts_agree(base, dtype, maximize):
    """The same rule on both fronts, the same gradients (computed in numpy), the Rust engine on the
    torch front: the same trajectory."""
    cls, tkw = TORCH_BASES[base]
    kw = dict(rho=0.1, gamma=0.5, beta=-0.3, maximize=maximize)
    X, labels, w = make_problem(dtype)
    tp = torch_params(w)
    t_opt = sharpness.CRSAM(tp, cls, backend="rust", **kw, **tkw)
    np_opt = CRSAM(w, **kw, **NP_BASES[base][0])
    for t in range(STEPS):
        t_opt.step(torch_closure(tp, grad_fn_for(X, labels, t)))
        np_opt.step(grad_fn_for(X, labels, t))
    assert_arrays(w, tp, **TOL[dtype])
    assert t_opt.stats["steps"] == np_opt.stats["steps"] == STEPS


def test_numpy_round_trip():
    def build(w, fresh=False):
        kw = dict(gamma=0.9) if fresh else dict(gamma=0.3)  # the checkpoint's coefficients win
        return CRSAM(w, rho=0.05, base="adam", lr=1e-2, amsgrad=True, **kw)

    cut = 6
    X, labels, a = make_problem()
    run_plain(build(a), X, labels)
    X, labels, b = make_problem()
    opt = build(b)
    run_plain(opt, X, labels, 0, cut)
    blob = pickle.dumps({"w": b, "opt": opt.state_dict()})
    run_plain(opt, X, labels, cut, STEPS)  # the saved dict is a copy: later steps do not change it
    ckpt = pickle.loads(blob)
    c = [np.zeros_like(p) for p in b]
    for dst, src in zip(c, ckpt["w"]):
        np.copyto(dst, src)
    fresh = build(c, fresh=True)
    fresh.load_state_dict(ckpt["opt"])
    run_plain(fresh, X, labels, cut, STEPS)
    assert_arrays(a, b, exact=True)
    assert_arrays(a, c, exact=True)


def test_numpy_bad_arguments():
    w = make_problem()[2]
    with pytest.raises(ValueError, match="adaptive"):
        CRSAM(w, adaptive=True)
    with pytest.raises(TypeError, match="unknown"):
        CRSAM(w, betas=(0.9, 0.99))  # an Adam argument with the SGD base
    with pytest.raises(TypeError, match="list of numpy arrays"):
        CRSAM(w[0])
    for name in ("gamma", "beta"):
        with pytest.raises(ValueError, match=name):
            CRSAM(w, **{name: math.inf})
    with pytest.raises(ValueError, match="rho"):
        CRSAM(w, rho=-1.0)


def test_numpy_bad_state_dicts():
    X, labels, w = make_problem()
    with pytest.raises(ValueError, match="lacks"):
        CRSAM(w).load_state_dict(SAM(w).state_dict())
    sd = CRSAM(w).state_dict()
    sd["sam"]["state"]["beta"] = math.inf
    opt = CRSAM(w, beta=0.2)
    with pytest.raises(ValueError, match="beta"):
        opt.load_state_dict(sd)
    assert opt.beta == 0.2  # nothing was loaded


def test_numpy_nonfinite_first_gradient_takes_the_plain_step():
    """No perturbation at all; the step ends after g₀ with the base step on g₀ as it is (as the
    torch front, and as SAM's second step: an inf there reaches the weights)."""
    X, labels, w = make_problem()
    partly_bad = copy.deepcopy(loss_and_grads(X, labels, w, batch_rows(0))[1])
    partly_bad[0][1, 2] = np.inf
    X, labels, expected = make_problem()
    sam = SAM(expected, rho=0.1, lr=0.1, momentum=0.9)
    sam.first_step(partly_bad)
    sam.second_step(partly_bad)
    X, labels, w = make_problem()
    opt = CRSAM(w, rho=0.1, lr=0.1, momentum=0.9)
    seen = []
    opt.step(lambda p: (seen.append(copy.deepcopy(p)), (0.0, partly_bad))[1])
    assert len(seen) == 1  # called at w only
    assert opt.state_dict()["sam"]["stats"]["nonfinite_skips"] == 1
    assert_arrays(w, expected, exact=True)
    assert np.isinf(w[0][1, 2]) and np.isfinite(np.delete(w[0], 6)).all()


def test_numpy_grad_fn_may_reuse_its_output_buffers():
    """Each call's gradients are read before the next call."""
    X, labels, w = make_problem()
    run_plain(CRSAM(w, rho=0.1, lr=0.1), X, labels, 0, 5)
    X, labels, w2 = make_problem()
    out = [np.empty_like(p) for p in w2]

    def reusing(t):
        def fn(params):
            loss, g = loss_and_grads(X, labels, params, batch_rows(t))
            for o, gi in zip(out, g):
                np.copyto(o, gi)
            return loss, out

        return fn

    opt = CRSAM(w2, rho=0.1, lr=0.1)
    for t in range(5):
        opt.step(reusing(t))
    assert_arrays(w, w2, exact=True)


def test_numpy_maximize_is_crsam_on_minus_the_loss():
    X, labels, w = make_problem()
    run_plain(CRSAM(w, rho=0.1, lr=0.1, maximize=True), X, labels, 0, 5)

    def neg(t):
        fn = grad_fn_for(X, labels, t)
        return lambda p: (lambda lg: (-lg[0], [-g for g in lg[1]]))(fn(p))

    X, labels, w2 = make_problem()
    opt = CRSAM(w2, rho=0.1, lr=0.1)
    for t in range(5):
        opt.step(neg(t))
    assert_arrays(w, w2, exact=True)


def test_crsam_refuses_the_subtract_memory_mode_before_anything_moves():
    """It rebuilds points from the saved w; memory="subtract" keeps only bfloat16 offsets (it used
    to fail part-way with an internal TypeError)."""
    model = torch.nn.Linear(4, 2)
    with pytest.raises(ValueError, match='needs memory="exact"'):
        sharpness.CRSAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, memory="subtract")

