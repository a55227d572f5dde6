"""GAM (Zhang et al., CVPR 2023, arXiv:2303.03108) on both fronts: against references written here
from the paper's algorithm as the official code runs it (per tensor for the torch front, per array
in float64 for the numpy front), its reduction to SAM, checkpoints, bad input, non-finite
gradients and exceptions, and the two fronts against each other (the same rule)."""

from __future__ import annotations

import copy
import math
import pickle

import numpy as np
import pytest
import torch
from _family import assert_equal, batches, closure_for, grads_at, make_model, round_trip_mid_run, run
from _numpy_family import AdamWRef, SGDRef, SoftmaxRegression, assert_arrays, dot, norm as np_norm, torch_closure, torch_params
from torch import nn

import sharpness
from sharpness.numpy import GAM, SAM

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
    with pytest.raises(ValueError, match="maximize"):
        sharpness.GAM(model.parameters(), torch.optim.SGD, lr=0.1, maximize=True)
    opt = sharpness.GAM(model.parameters(), torch.optim.SGD, lr=0.1)
    opt.param_groups[0]["maximize"] = True  # set after construction: refused by the step
    w0 = [p.detach().clone() for p in model.parameters()]

    def closure():
        opt.zero_grad()
        loss = model(torch.ones(1, 3)).sum()
        loss.backward()
        return loss

    with pytest.raises(ValueError, match="maximize"):
        opt.step(closure)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w0))


def test_adaptive_is_refused():
    """GAM's moves along g₁ − g₀ and g₂ have no ASAM form: refused on both fronts."""
    with pytest.raises(ValueError, match="adaptive"):
        sharpness.GAM(make_model().parameters(), torch.optim.SGD, adaptive=True, lr=0.1)
    model = make_model()
    opt = sharpness.GAM(model.parameters(), torch.optim.SGD, lr=0.1)
    opt.param_groups[0]["sam_adaptive"] = True  # set after construction: refused by the step
    w0 = [p.detach().clone() for p in model.parameters()]
    (x, y), = batches(1)
    with pytest.raises(ValueError, match="adaptive"):
        opt.step(closure_for(opt, model, x, y))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w0))


def test_torch_checkpoints_keep_the_coefficients():
    """The coefficients live in ``sam_state``: a loaded checkpoint's win, and a checkpoint
    without them (plain SAM's) is refused, changing nothing."""
    data = batches(8)
    a, _, b, _ = round_trip_mid_run(lambda params: sharpness.GAM(params, torch.optim.SGD, gamma=0.3, lr=0.1), run, data, 4)
    model = make_model()
    opt = sharpness.GAM(model.parameters(), torch.optim.SGD, gamma=0.3, lr=0.1)
    run(opt, model, data[:4])
    ckpt = opt.state_dict()
    assert ckpt["sam"]["state"]["gamma"] == 0.3
    fresh = sharpness.GAM(make_model().parameters(), torch.optim.SGD, gamma=0.9, lr=0.1)
    fresh.load_state_dict(ckpt)
    assert fresh.gamma == 0.3
    sam_ckpt = sharpness.SAM(make_model().parameters(), torch.optim.SGD, lr=0.1).state_dict()
    with pytest.raises(ValueError, match="lacks"):
        fresh.load_state_dict(sam_ckpt)
    assert fresh.gamma == 0.3


# == the numpy front (sharpness.numpy.GAM: the same rule over numpy arrays) ========================
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


def np_reference_gam(X, labels, w, rho, norm_rho, b1, b2, b3, gamma, base):
    w = [p.astype(np.float64) for p in w]
    for t in range(STEPS):
        at = lambda p, t=t: loss_and_grads(X, labels, p, batch_rows(t))[1]  # noqa: E731
        g0 = at(w)
        g1 = at([a + rho * g / (np_norm(g0) + 1e-12) for a, g in zip(w, g0)])
        d = [a - b for a, b in zip(g1, g0)]
        w2 = [a + norm_rho * x / (np_norm(d) + 1e-12) for a, x in zip(w, d)]
        g2 = at(w2)
        g3 = at([a + rho * g / (np_norm(g2) + 1e-12) for a, g in zip(w2, g2)])
        p = [a + abs(b2) * b for a, b in zip(g0, g2)]
        u = [b1 * a + b3 * b for a, b in zip(g1, g3)]
        c = dot(p, u) / (np_norm(p) * np_norm(u) + 1e-12)
        u = [ui - gamma * (pi - c * np_norm(p) * ui / (np_norm(u) + 1e-12)) for ui, pi in zip(u, p)]
        w = base.step(w, u)
    return w


def run_plain(opt, X, labels, start=0, stop=STEPS):
    for t in range(start, stop):
        opt.step(grad_fn_for(X, labels, t))


@pytest.mark.parametrize("base", sorted(NP_BASES))
@pytest.mark.parametrize("coef", [(1.0, 1.0, 1.0, 0.1), (0.7, -0.5, 0.3, 0.4)])
def test_numpy_gam_matches_the_reference(base, coef):
    X, labels, w0 = make_problem()
    kw, ref_base = NP_BASES[base]
    ref = np_reference_gam(X, labels, w0, 0.05, 0.2, *coef, ref_base())
    w = copy.deepcopy(w0)
    b1, b2, b3, gamma = coef
    opt = GAM(w, rho=0.05, norm_rho=0.2, beta1=b1, beta2=b2, beta3=b3, gamma=gamma, **kw)
    calls = []
    for t in range(STEPS):
        fn = grad_fn_for(X, labels, t)
        opt.step(lambda p: calls.append(1) or fn(p))
    assert len(calls) == 4 * STEPS
    assert_arrays(w, ref, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize(
    "kw", [dict(base="sgd", lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True), dict(base="adam", lr=1e-2, amsgrad=True)],
    ids=["sgd", "adam"],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64, "mixed"], ids=["f32", "f64", "mixed"])
def test_numpy_zero_extra_coefficients_is_sam_bit_for_bit(kw, dtype):
    X, labels, expected = make_problem(dtype)
    run_plain(SAM(expected, rho=0.1, **kw), X, labels)
    X, labels, w = make_problem(dtype)
    run_plain(GAM(w, rho=0.1, norm_rho=0.2, beta1=1.0, beta2=0.0, beta3=0.0, gamma=0.0, **kw), X, labels)
    assert_arrays(w, expected, exact=True)


@pytest.mark.parametrize("base", sorted(NP_BASES))
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_the_fronts_agree(base, dtype):
    """The same rule on both fronts, the same gradients (computed in numpy), the Rust engine on the
    torch front: the same trajectory."""
    cls, tkw = TORCH_BASES[base]
    kw = dict(rho=0.05, norm_rho=0.2, beta1=0.7, beta2=-0.5, beta3=0.3, gamma=0.4)
    X, labels, w = make_problem(dtype)
    tp = torch_params(w)
    t_opt = sharpness.GAM(tp, cls, backend="rust", **kw, **tkw)
    np_opt = GAM(w, **kw, **NP_BASES[base][0])
    for t in range(STEPS):
        t_opt.step(torch_closure(tp, grad_fn_for(X, labels, t)))
        np_opt.step(grad_fn_for(X, labels, t))
    assert_arrays(w, tp, **TOL[dtype])
    assert t_opt.stats["steps"] == np_opt.stats["steps"] == STEPS


def test_numpy_round_trip():
    def build(w, fresh=False):
        kw = dict(gamma=0.9) if fresh else dict(gamma=0.3)  # the checkpoint's coefficients win
        return GAM(w, rho=0.05, base="adam", lr=1e-2, amsgrad=True, **kw)

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
        GAM(w, adaptive=True)
    with pytest.raises(TypeError, match="unknown"):
        GAM(w, betas=(0.9, 0.99))  # an Adam argument with the SGD base
    with pytest.raises(TypeError, match="list of numpy arrays"):
        GAM(w[0])
    with pytest.raises(ValueError, match="maximize"):
        GAM(w, maximize=True)
    for name in ("norm_rho", "beta1", "beta2", "beta3", "gamma"):
        with pytest.raises(ValueError, match=name):
            GAM(w, **{name: math.nan})
    with pytest.raises(ValueError, match="norm_rho"):
        GAM(w, norm_rho=-0.1)


def test_numpy_bad_state_dicts():
    X, labels, w = make_problem()
    with pytest.raises(ValueError, match="lacks"):
        GAM(w).load_state_dict(SAM(w).state_dict())
    sd = GAM(w).state_dict()
    sd["sam"]["state"]["gamma"] = math.nan
    opt = GAM(w, gamma=0.2)
    with pytest.raises(ValueError, match="gamma"):
        opt.load_state_dict(sd)
    assert opt.gamma == 0.2  # nothing was loaded


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
    opt = GAM(w, rho=0.1, lr=0.1, momentum=0.9)
    seen = []
    opt.step(lambda p: (seen.append(copy.deepcopy(p)), (0.0, partly_bad))[1])
    assert len(seen) == 1  # called at w only
    assert opt.state_dict()["sam"]["stats"]["nonfinite_skips"] == 1
    assert_arrays(w, expected, exact=True)
    assert np.isinf(w[0][1, 2]) and np.isfinite(np.delete(w[0], 6)).all()


def test_a_nonfinite_later_gradient_leaves_out_its_move_on_both_fronts():
    """‖d‖ (or ‖g₂‖) not finite: that move is left out, so every point the gradient function sees
    is finite (the update, built from those gradients, goes to the base step as it is)."""
    X, labels, w = make_problem()
    g_bad = [np.full_like(p, np.nan) for p in w]

    def fn_for(seen):
        def fn(params):
            seen.append([np.array(p, copy=True) for p in params])
            loss, g = loss_and_grads(X, labels, params, batch_rows(0))
            return loss, g_bad if len(seen) == 2 else g  # g₁ not finite: so is d

        return fn

    seen = []
    GAM(w, rho=0.1, lr=0.1).step(fn_for(seen))
    tp = torch_params(make_problem()[2])
    t_seen = []
    sharpness.GAM(tp, torch.optim.SGD, rho=0.1, lr=0.1, backend="rust").step(torch_closure(tp, fn_for(t_seen)))
    for points in (seen, t_seen):
        assert len(points) == 4
        assert all(np.isfinite(p).all() for point in points for p in point)
        assert_arrays(points[2], points[0], exact=True)  # w₂ = w: the move along d left out


def test_numpy_grad_fn_may_reuse_its_output_buffers():
    """Each call's gradients are read before the next call."""
    X, labels, w = make_problem()
    run_plain(GAM(w, rho=0.1, lr=0.1), X, labels, 0, 5)
    X, labels, w2 = make_problem()
    out = [np.empty_like(p) for p in w2]

    def reusing(t):
        def fn(params):
            loss, g = loss_and_grads(X, labels, params, batch_rows(t))
            for o, gi in zip(out, g):
                np.copyto(o, gi)
            return loss, out

        return fn

    opt = GAM(w2, rho=0.1, lr=0.1)
    for t in range(5):
        opt.step(reusing(t))
    assert_arrays(w, w2, exact=True)


@pytest.mark.parametrize("same_noise", [True, False])
def test_the_random_state_of_the_four_calls(same_noise):
    """With ``same_noise`` the four calls draw the random numbers of the first (the same dropout at
    every point) and the step leaves the random state where that call left it; without, each call
    draws on."""
    model = make_model()
    opt = sharpness.GAM(model.parameters(), torch.optim.SGD, lr=0.1, same_noise=same_noise)
    (x, y), = batches(1)
    inner, draws = closure_for(opt, model, x, y), []
    torch.manual_seed(3)
    expected = [torch.rand(2) for _ in range(4)]
    torch.manual_seed(3)
    torch.rand(2)
    after_one = torch.get_rng_state()  # where one call leaves it
    torch.manual_seed(3)
    opt.step(lambda: draws.append(torch.rand(2)) or inner())
    assert len(draws) == 4
    if same_noise:
        assert all(torch.equal(d, expected[0]) for d in draws)
        assert torch.equal(torch.get_rng_state(), after_one)
    else:
        assert all(torch.equal(d, e) for d, e in zip(draws, expected))


def test_gam_refuses_the_subtract_memory_mode_before_anything_moves():
    """It rebuilds points from the saved w; memory="subtract" keeps only bfloat16 offsets (it used
    to fail part-way with an internal TypeError)."""
    model = torch.nn.Linear(4, 2)
    with pytest.raises(ValueError, match='needs memory="exact"'):
        sharpness.GAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, memory="subtract")

