"""The numpy fronts of SSAM-F / SSAM-D (Mi et al., NeurIPS 2022, arXiv:2210.05177), GAM (Zhang et
al., CVPR 2023, arXiv:2303.03108) and CR-SAM (Wu et al., AAAI 2024, arXiv:2312.13555).

(a) against per-array float64 references written here from the formulas (nothing from sharpness
is used for them), over 20 steps of softmax regression, with an SGD-momentum and an AdamW base;
(b) the limits that reduce each method to SAM, bit for bit against ``sharpness.numpy.SAM``;
(c) against the torch front on the same gradients; (d) state_dict round trips mid-run;
(e) bad arguments, non-finite gradients and exceptions inside ``grad_fn``.
"""

from __future__ import annotations

import copy
import math
import pickle

import numpy as np
import pytest
import torch
from _numpy_family import (
    AdamWRef,
    SGDRef,
    SoftmaxRegression,
    assert_arrays as _assert_arrays,
    dot,
    norm,
    torch_closure,
    torch_params,
)

import sharpness
from sharpness.numpy import CRSAM, GAM, SAM, SSAMD, SSAMF

# -- softmax regression with hand-written gradients ------------------------------------------------

STEPS = 20
PROBLEM = SoftmaxRegression(n_rows=64, n_in=6, n_classes=4, batch=16, stride=16, cast_data=False)
make_problem, loss_and_grads = PROBLEM.make_problem, PROBLEM.loss_and_grads
batch_rows, grad_fn_for = PROBLEM.batch_rows, PROBLEM.grad_fn_for


def sample_grad_fns(X, labels, t, samples=8):
    return [grad_fn_for_rows(X, labels, [r]) for r in batch_rows(t)[:samples]]


def grad_fn_for_rows(X, labels, rows):
    return lambda params: loss_and_grads(X, labels, params, np.asarray(rows))


def assert_arrays(a, b, exact=False, rtol=1e-9, atol=1e-11):
    _assert_arrays(a, b, exact=exact, rtol=rtol, atol=atol)


# -- references: per array, float64, straight from the formulas (SGDRef, AdamWRef: _numpy_family) --


BASES = {
    "sgd": (dict(base="sgd", lr=0.1, momentum=0.9, weight_decay=1e-3), lambda: SGDRef(0.1, 0.9, 1e-3)),
    "adamw": (dict(base="adamw", lr=1e-2, weight_decay=1e-2), lambda: AdamWRef(1e-2, weight_decay=1e-2)),
}
TORCH_BASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2)),
}


def flat(arrays):
    return np.concatenate([a.reshape(-1) for a in arrays])


def unflat(v, like):
    out, o = [], 0
    for p in like:
        out.append(v[o : o + p.size].reshape(p.shape).astype(np.float64))
        o += p.size
    return out


def top_flags(scores, k):
    """The k largest float32 scores (ties: lower index first), by a full stable sort."""
    keep = np.zeros(scores.size, dtype=np.float32)
    keep[np.argsort(-scores, kind="stable")[:k]] = 1.0
    return keep


def masked_sam_step(w, g, g_at, rho, mask, base):
    e = [rho * gi * m / (norm(g) + 1e-12) for gi, m in zip(g, mask)]
    _, gs = g_at([a + b for a, b in zip(w, e)])
    return base.step(w, gs)


def reference_ssamf(X, labels, w, rho, sparsity, every, base):
    w = [p.astype(np.float64) for p in w]
    masks = []
    for t in range(STEPS):
        if t % every == 0:
            fisher = [np.zeros_like(p) for p in w]
            for r in batch_rows(t)[:8]:
                _, g = loss_and_grads(X, labels, w, np.array([r]))
                fisher = [f + gi * gi for f, gi in zip(fisher, g)]
            scores = flat(fisher).astype(np.float32)
            masks.append(unflat(top_flags(scores, int(scores.size * (1 - sparsity))), w))
        _, g = loss_and_grads(X, labels, w, batch_rows(t))
        w = masked_sam_step(w, g, lambda p, t=t: loss_and_grads(X, labels, p, batch_rows(t)), rho, masks[-1], base)
    return w, masks


def reference_ssamd(X, labels, w, rho, sparsity, drop_rate, seed, every, drop_by, grow_by, base):
    w = [p.astype(np.float64) for p in w]
    rng = np.random.default_rng(seed)
    n = sum(p.size for p in w)
    mask = top_flags(rng.random(n, dtype=np.float32), n - math.ceil(n * sparsity))

    def score(kind, g):
        if kind == "random":
            return rng.random(n, dtype=np.float32)
        return np.abs(flat(g if kind == "gradient" else w)).astype(np.float32)

    for t in range(STEPS):
        _, g = loss_and_grads(X, labels, w, batch_rows(t))
        if t % every == 0:
            live = int(mask.sum())
            r = drop_rate * (1 + math.cos(math.pi * t / STEPS)) / 2
            k = int(min(r * live, n - live))
            if k:
                drop = (score(drop_by, g) + np.float32(1e-7)) * mask
                grow = (score(grow_by, g) + np.float32(1e-7)) * (1 - mask)
                mask = top_flags(drop, live - k) + top_flags(grow, k)
        w = masked_sam_step(w, g, lambda p, t=t: loss_and_grads(X, labels, p, batch_rows(t)), rho, unflat(mask, w), base)
    return w, mask


def reference_gam(X, labels, w, rho, norm_rho, b1, b2, b3, gamma, base):
    w = [p.astype(np.float64) for p in w]
    for t in range(STEPS):
        at = lambda p, t=t: loss_and_grads(X, labels, p, batch_rows(t))[1]  # noqa: E731
        g0 = at(w)
        g1 = at([a + rho * g / (norm(g0) + 1e-12) for a, g in zip(w, g0)])
        d = [a - b for a, b in zip(g1, g0)]
        w2 = [a + norm_rho * x / (norm(d) + 1e-12) for a, x in zip(w, d)]
        g2 = at(w2)
        g3 = at([a + rho * g / (norm(g2) + 1e-12) for a, g in zip(w2, g2)])
        p = [a + abs(b2) * b for a, b in zip(g0, g2)]
        u = [b1 * a + b3 * b for a, b in zip(g1, g3)]
        c = dot(p, u) / (norm(p) * norm(u) + 1e-12)
        u = [ui - gamma * (pi - c * norm(p) * ui / (norm(u) + 1e-12)) for ui, pi in zip(u, p)]
        w = base.step(w, u)
    return w


def reference_crsam(X, labels, w, rho, gamma, beta, base):
    w = [p.astype(np.float64) for p in w]
    for t in range(STEPS):
        at = lambda p, t=t: loss_and_grads(X, labels, p, batch_rows(t))[1]  # noqa: E731
        g0 = at(w)
        e = [rho * g / (norm(g0) + 1e-12) for g in g0]
        gp = at([a + b for a, b in zip(w, e)])
        gm = at([a - b for a, b in zip(w, e)])
        u = [p + gamma * (p + m - 2 * z) + beta * (p - m) for z, p, m in zip(g0, gp, gm)]
        w = base.step(w, u)
    return w


# -- runners --------------------------------------------------------------------------------------


def run_ssamf(opt, X, labels, every=5, start=0, stop=STEPS):
    for t in range(start, stop):
        if t % every == 0:
            opt.fisher_from(sample_grad_fns(X, labels, t))
        opt.step(grad_fn_for(X, labels, t))


def run_ssamd(opt, X, labels, every=5, start=0, stop=STEPS, api="step"):
    for t in range(start, stop):
        fn = grad_fn_for(X, labels, t)
        _, g = fn(opt.params)
        if t % every == 0:
            opt.update_mask(progress=t / STEPS, grads=g)
        if api == "step":
            opt.step(fn)
        else:
            opt.first_step(g)
            opt.second_step(fn(opt.params)[1])


def run_plain(opt, X, labels, start=0, stop=STEPS):
    for t in range(start, stop):
        opt.step(grad_fn_for(X, labels, t))


# == (a) against the references ===================================================================


@pytest.mark.parametrize("base", sorted(BASES))
def test_ssamf_matches_the_reference(base):
    X, labels, w0 = make_problem()
    kw, ref_base = BASES[base]
    ref, ref_masks = reference_ssamf(X, labels, w0, 0.1, 0.5, 5, ref_base())
    w = copy.deepcopy(w0)
    opt = SSAMF(w, sparsity=0.5, rho=0.1, **kw)
    masks = []
    for t in range(STEPS):
        if t % 5 == 0:
            opt.fisher_from(sample_grad_fns(X, labels, t))
            masks.append(opt.mask())
            assert opt.fisher_samples == 0
        opt.step(grad_fn_for(X, labels, t))
    assert len(masks) == len(ref_masks) == 4
    for mine, theirs in zip(masks, ref_masks):
        assert_arrays(mine, theirs, exact=False, rtol=0, atol=0)
    assert opt.density() == 0.5
    assert_arrays(w, ref)


@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("strategies", [("gradient", "weight"), ("gradient", "random"), ("random", "random")])
@pytest.mark.parametrize("api", ["step", "two-call"])
def test_ssamd_matches_the_reference(base, strategies, api):
    X, labels, w0 = make_problem()
    kw, ref_base = BASES[base]
    ref, ref_mask = reference_ssamd(X, labels, w0, 0.1, 0.5, 0.5, 7, 5, *strategies, ref_base())
    w = copy.deepcopy(w0)
    opt = SSAMD(w, sparsity=0.5, drop_rate=0.5, drop_strategy=strategies[0], growth_strategy=strategies[1], seed=7, rho=0.1, **kw)
    run_ssamd(opt, X, labels, api=api)
    np.testing.assert_array_equal(flat(opt.mask()), ref_mask)
    assert opt.density() == 0.5
    assert_arrays(w, ref)


@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("coef", [(1.0, 1.0, 1.0, 0.1), (0.7, -0.5, 0.3, 0.4)])
def test_gam_matches_the_reference(base, coef):
    X, labels, w0 = make_problem()
    kw, ref_base = BASES[base]
    ref = reference_gam(X, labels, w0, 0.05, 0.2, *coef, ref_base())
    w = copy.deepcopy(w0)
    b1, b2, b3, gamma = coef
    opt = GAM(w, rho=0.05, norm_rho=0.2, beta1=b1, beta2=b2, beta3=b3, gamma=gamma, **kw)
    calls = []
    for t in range(STEPS):
        fn = grad_fn_for(X, labels, t)
        opt.step(lambda p: calls.append(1) or fn(p))
    assert len(calls) == 4 * STEPS
    assert_arrays(w, ref)


@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("coef", [(0.1, 0.1), (0.5, -0.3)])
def test_crsam_matches_the_reference(base, coef):
    X, labels, w0 = make_problem()
    kw, ref_base = BASES[base]
    ref = reference_crsam(X, labels, w0, 0.1, *coef, ref_base())
    w = copy.deepcopy(w0)
    opt = CRSAM(w, rho=0.1, gamma=coef[0], beta=coef[1], **kw)
    calls = []
    for t in range(STEPS):
        fn = grad_fn_for(X, labels, t)
        opt.step(lambda p: calls.append(1) or fn(p))
    assert len(calls) == 3 * STEPS
    assert_arrays(w, ref)


def test_crsam_quadratic_closed_form():
    """L = ½ wᵀHw: g₊ + g₋ − 2g₀ = 0 and g₊ − g₋ = 2He, so u = Hw + (1 + 2β)ρ H ĝ (γ drops out)."""
    H = np.diag([1.0, 3.0, 0.5])
    w0 = np.array([1.0, -2.0, 0.5])
    w = w0.copy()
    rho, gamma, beta, lr = 0.3, 0.7, 0.2, 0.1
    CRSAM([w], rho=rho, gamma=gamma, beta=beta, lr=lr).step(lambda p: (0.5 * p[0] @ H @ p[0], [H @ p[0]]))
    g = H @ w0
    np.testing.assert_allclose(w, w0 - lr * (H @ w0 + (1 + 2 * beta) * rho * H @ (g / np.linalg.norm(g))), rtol=1e-13, atol=1e-14)


def test_ssamf_fisher_is_the_sum_of_squared_sample_gradients():
    X, labels, w0 = make_problem()
    opt = SSAMF(copy.deepcopy(w0), sparsity=0.25, rho=0.1)
    grads = [loss_and_grads(X, labels, w0, np.array([r]))[1] for r in range(5)]
    for g in grads:
        assert opt.accumulate_fisher(g)
    fisher = opt.state_dict()["ssam"]["fisher"]
    expected = [sum(g[i] * g[i] for g in grads) for i in range(2)]
    assert_arrays(fisher, expected, rtol=1e-15, atol=0)
    n = sum(p.size for p in w0)
    scores = unflat(np.arange(n, dtype=np.float64), w0)  # explicit scores, increasing over all arrays
    opt.update_mask(scores)
    assert flat(opt.mask()).tolist() == [0.0] * (n - int(n * 0.75)) + [1.0] * int(n * 0.75)
    assert opt.fisher_samples == 5  # explicit scores leave the running sum alone


# == (b) the limits, bit for bit against sharpness.numpy.SAM ======================================

LIMIT_BASES = [
    dict(base="sgd", lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True),
    dict(base="adam", lr=1e-2, amsgrad=True),
]


def sam_run(kw, dtype):
    X, labels, w = make_problem(dtype)
    run_plain(SAM(w, rho=0.1, **kw), X, labels)
    return w


@pytest.mark.parametrize("kw", LIMIT_BASES, ids=["sgd", "adam"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, "mixed"], ids=["f32", "f64", "mixed"])
def test_limits_are_sam_bit_for_bit(kw, dtype):
    expected = sam_run(kw, dtype)

    X, labels, w = make_problem(dtype)
    opt = SSAMF(w, sparsity=0.0, rho=0.1, **kw)
    run_ssamf(opt, X, labels)  # a mask (all ones) is set and applied
    assert opt.density() == 1.0 and opt.state_dict()["ssam"]["mask"] is not None
    assert_arrays(w, expected, exact=True)

    X, labels, w = make_problem(dtype)
    opt = SSAMD(w, sparsity=0.0, rho=0.1, seed=0, **kw)
    run_ssamd(opt, X, labels)
    assert_arrays(w, expected, exact=True)

    X, labels, w = make_problem(dtype)
    run_plain(GAM(w, rho=0.1, norm_rho=0.2, beta1=1.0, beta2=0.0, beta3=0.0, gamma=0.0, **kw), X, labels)
    assert_arrays(w, expected, exact=True)

    X, labels, w = make_problem(dtype)
    run_plain(CRSAM(w, rho=0.1, gamma=0.0, beta=0.0, **kw), X, labels)
    assert_arrays(w, expected, exact=True)


def test_ssamf_before_any_mask_is_sam_bit_for_bit():
    kw = LIMIT_BASES[0]
    expected = sam_run(kw, np.float32)
    X, labels, w = make_problem(np.float32)
    run_plain(SSAMF(w, sparsity=0.9, rho=0.1, **kw), X, labels)
    assert_arrays(w, expected, exact=True)


def test_a_mask_of_ones_set_by_hand_is_sam_and_a_mask_of_zeros_is_the_base_optimizer():
    kw = LIMIT_BASES[1]
    expected = sam_run(kw, np.float64)
    X, labels, w = make_problem()
    opt = SSAMD(w, sparsity=0.5, seed=0, rho=0.1, **kw)
    opt.set_mask([np.ones_like(p) for p in w])
    run_plain(opt, X, labels)
    assert_arrays(w, expected, exact=True)

    X, labels, plain = make_problem()
    run_plain(SAM(plain, rho=0.0, **kw), X, labels)
    X, labels, w = make_problem()
    opt = SSAMF(w, rho=0.1, **kw)
    opt.update_mask([np.zeros_like(p) for p in w])  # s = 0.5 of zeros... then all zeros by hand
    opt.set_mask([np.zeros_like(p) for p in w])
    run_plain(opt, X, labels)
    assert_arrays(w, plain, exact=True)


# == (c) against the torch front ==================================================================


def set_grads(tparams, X, labels, rows):
    return torch_closure(tparams, lambda params: loss_and_grads(X, labels, params, rows))()


def closure_for(tparams, X, labels, t):
    return torch_closure(tparams, grad_fn_for(X, labels, t))


TOL = {np.float32: dict(rtol=2e-5, atol=1e-6), np.float64: dict(rtol=1e-11, atol=1e-13)}


@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_ssamf_agrees_with_the_torch_front(base, dtype):
    X, labels, w = make_problem(dtype)
    tp = torch_params(w)
    cls, tkw = TORCH_BASES[base]
    t_opt = sharpness.SSAMF(tp, cls, sparsity=0.5, rho=0.1, **tkw)
    np_opt = SSAMF(w, sparsity=0.5, rho=0.1, **BASES[base][0])
    for t in range(STEPS):
        if t % 5 == 0:
            rows = batch_rows(t)[:8]
            t_opt.fisher_from((lambda r=r: set_grads(tp, X, labels, np.array([r]))) for r in rows)
            np_opt.fisher_from(sample_grad_fns(X, labels, t))
            assert_arrays(np_opt.mask(), t_opt.mask(), exact=True)
        t_opt.step(closure_for(tp, X, labels, t))
        np_opt.step(grad_fn_for(X, labels, t))
    assert_arrays(w, tp, **TOL[dtype])


@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_ssamd_agrees_with_the_torch_front(base, dtype):
    """The fronts draw from different generators (torch's, numpy's), so the numpy front starts
    from the torch front's initial mask and both use the deterministic strategies."""
    X, labels, w = make_problem(dtype)
    tp = torch_params(w)
    cls, tkw = TORCH_BASES[base]
    kw = dict(sparsity=0.5, drop_rate=0.5, drop_strategy="gradient", growth_strategy="weight", rho=0.1)
    t_opt = sharpness.SSAMD(tp, cls, seed=3, **kw, **tkw)
    np_opt = SSAMD(w, seed=123, **kw, **BASES[base][0])
    np_opt.set_mask([m.numpy() for m in t_opt.mask()])
    for t in range(STEPS):
        g = loss_and_grads(X, labels, w, batch_rows(t))[1]
        set_grads(tp, X, labels, batch_rows(t))
        if t % 5 == 0:
            t_opt.update_mask(progress=t / STEPS)
            np_opt.update_mask(progress=t / STEPS, grads=g)
            assert_arrays(np_opt.mask(), t_opt.mask(), exact=True)
        t_opt.first_step(zero_grad=True)
        np_opt.first_step(g)
        set_grads(tp, X, labels, batch_rows(t))
        t_opt.second_step(zero_grad=True)
        np_opt.second_step(loss_and_grads(X, labels, w, batch_rows(t))[1])
    assert_arrays(w, tp, **TOL[dtype])


@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_gam_and_crsam_agree_with_the_torch_front(base, dtype):
    cls, tkw = TORCH_BASES[base]
    for np_cls, t_cls, kw in [
        (GAM, sharpness.GAM, dict(rho=0.05, norm_rho=0.2, beta1=0.7, beta2=-0.5, beta3=0.3, gamma=0.4)),
        (CRSAM, sharpness.CRSAM, dict(rho=0.1, gamma=0.5, beta=-0.3)),
    ]:
        X, labels, w = make_problem(dtype)
        tp = torch_params(w)
        t_opt = t_cls(tp, cls, **kw, **tkw)
        np_opt = np_cls(w, **kw, **BASES[base][0])
        for t in range(STEPS):
            t_opt.step(closure_for(tp, X, labels, t))
            np_opt.step(grad_fn_for(X, labels, t))
        assert_arrays(w, tp, **TOL[dtype])


# == (d) state_dict round trips ===================================================================


def resumed(build, run, dtype=np.float64, cut=7):
    """Runs STEPS steps straight, and again with a pickled checkpoint at ``cut`` loaded into a new
    optimizer over new arrays; returns both final weights."""
    X, labels, w = make_problem(dtype)
    run(build(w), X, labels, 0, STEPS)
    X, labels, w2 = make_problem(dtype)
    opt = build(w2)
    run(opt, X, labels, 0, cut)
    blob = pickle.dumps({"w": w2, "opt": opt.state_dict()})
    run(opt, X, labels, cut, STEPS)  # the saved dict is a copy: later steps do not change it
    ckpt = pickle.loads(blob)
    w3 = [np.zeros_like(p) for p in w2]
    for dst, src in zip(w3, ckpt["w"]):
        np.copyto(dst, src)
    fresh = build(w3, fresh=True)
    fresh.load_state_dict(ckpt["opt"])
    run(fresh, X, labels, cut, STEPS)
    return w, w2, w3


def test_ssamf_round_trip_with_a_partial_fisher_sum():
    def build(w, fresh=False):
        return SSAMF(w, sparsity=0.7 if fresh else 0.5, rho=0.1, base="adamw", lr=1e-2)

    def run(opt, X, labels, start, stop):
        for t in range(start, stop):
            # the Fisher sum is gathered over steps 2k and 2k+1 (one sample each), used at 2k+1
            for r in batch_rows(t)[:3]:
                opt.accumulate_fisher(loss_and_grads(X, labels, opt.params, np.array([r]))[1])
            if t % 2 == 1:
                opt.update_mask()
            opt.step(grad_fn_for(X, labels, t))

    a, b, c = resumed(build, run, cut=7)  # saved after step 6: a half-gathered sum
    assert_arrays(a, b, exact=True)
    assert_arrays(a, c, exact=True)


@pytest.mark.parametrize("dtype", [np.float32, "mixed"], ids=["f32", "mixed"])
def test_ssamd_round_trip_with_random_scores(dtype):
    def build(w, fresh=False):
        return SSAMD(w, sparsity=0.6, growth_strategy="random", drop_strategy="random", seed=99 if fresh else 5,
                     rho=0.1, lr=0.1, momentum=0.9)

    def run(opt, X, labels, start, stop):
        run_ssamd(opt, X, labels, every=3, start=start, stop=stop)

    a, b, c = resumed(build, run, dtype=dtype, cut=7)
    assert_arrays(a, b, exact=True)
    assert_arrays(a, c, exact=True)


@pytest.mark.parametrize("cls", [GAM, CRSAM])
def test_gam_and_crsam_round_trip(cls):
    def build(w, fresh=False):
        kw = dict(gamma=0.9) if fresh else dict(gamma=0.3)  # the checkpoint's coefficients win
        return cls(w, rho=0.05, base="adam", lr=1e-2, amsgrad=True, **kw)

    def run(opt, X, labels, start, stop):
        run_plain(opt, X, labels, start, stop)

    a, b, c = resumed(build, run, cut=6)
    assert_arrays(a, b, exact=True)
    assert_arrays(a, c, exact=True)


# == (e) bad input, non-finite gradients, exceptions ==============================================


def test_bad_arguments():
    X, labels, w = make_problem()
    for bad in (1.0, -0.1, 2):
        with pytest.raises(ValueError, match="sparsity"):
            SSAMF(w, sparsity=bad)
    with pytest.raises(TypeError, match="sparsity"):
        SSAMD(w, sparsity="half")
    with pytest.raises(ValueError, match="drop_rate"):
        SSAMD(w, drop_rate=1.5)
    with pytest.raises(ValueError, match="growth_strategy"):
        SSAMD(w, growth_strategy="magic")
    with pytest.raises(ValueError, match="seed"):
        SSAMD(w, seed=-1)
    for cls in (SSAMF, SSAMD, GAM, CRSAM):
        with pytest.raises(ValueError, match="adaptive"):
            cls(w, adaptive=True)
        with pytest.raises(TypeError, match="unknown"):
            cls(w, betas=(0.9, 0.99))  # an Adam argument with the SGD base
        with pytest.raises(TypeError, match="list of numpy arrays"):
            cls(w[0])
    with pytest.raises(ValueError, match="maximize"):
        GAM(w, maximize=True)
    for name in ("norm_rho", "beta1", "beta2", "beta3", "gamma"):
        with pytest.raises(ValueError, match=name):
            GAM(w, **{name: math.nan})
    with pytest.raises(ValueError, match="norm_rho"):
        GAM(w, norm_rho=-0.1)
    for name in ("gamma", "beta"):
        with pytest.raises(ValueError, match=name):
            CRSAM(w, **{name: math.inf})
    with pytest.raises(ValueError, match="rho"):
        CRSAM(w, rho=-1.0)

    opt = SSAMF(w)
    with pytest.raises(RuntimeError, match="accumulate_fisher"):
        opt.update_mask()
    with pytest.raises(ValueError, match="one score array"):
        opt.update_mask([np.ones(3)])
    with pytest.raises(ValueError, match="finite"):
        opt.update_mask([np.full_like(p, np.nan) for p in w])
    with pytest.raises(ValueError, match="shape"):
        opt.accumulate_fisher([np.ones(3), np.ones(2)])
    with pytest.raises(TypeError, match="dtype"):
        opt.accumulate_fisher([p.astype(np.float32) for p in w])
    with pytest.raises(ValueError, match="0s and 1s"):
        opt.set_mask([np.full_like(p, 0.5) for p in w])
    with pytest.raises(ValueError, match="mask arrays"):
        opt.set_mask([np.ones_like(w[0])])

    opt = SSAMD(w, seed=0)
    g = loss_and_grads(X, labels, w, batch_rows(0))[1]
    with pytest.raises(ValueError, match="grads"):
        opt.update_mask(0.0)
    with pytest.raises(ValueError, match="progress"):
        opt.update_mask(1.5, grads=g)
    with pytest.raises(TypeError, match="progress"):
        opt.update_mask(None, grads=g)
    opt.first_step(g)
    for call in (lambda: opt.update_mask(0.0, grads=g), lambda: opt.set_mask(opt.mask()), opt.state_dict):
        with pytest.raises(RuntimeError):
            call()
    opt.second_step(g)

    for cls in (GAM, CRSAM):
        opt = cls(w)
        with pytest.raises(RuntimeError, match="step\\(grad_fn\\)"):
            opt.first_step(g)
        with pytest.raises(RuntimeError, match="step\\(grad_fn\\)"):
            opt.second_step(g)
        with pytest.raises(TypeError, match="pair"):
            opt.step(lambda p: g)


def test_bad_state_dicts():
    X, labels, w = make_problem()
    sam_sd = SAM(w).state_dict()
    for cls in (SSAMF, SSAMD, GAM, CRSAM):
        with pytest.raises(ValueError, match="lacks"):
            cls(w).load_state_dict(sam_sd)
    sd = SSAMD(w, seed=0).state_dict()
    bad = copy.deepcopy(sd)
    bad["ssam"]["generator"] = {"bit_generator": "MT19937", "state": {}}
    before = SSAMD(w, seed=1)
    before_state = before.generator.bit_generator.state
    with pytest.raises(ValueError, match="generator"):
        before.load_state_dict(bad)
    assert before.generator.bit_generator.state == before_state  # nothing was loaded
    bad = copy.deepcopy(sd)
    bad["ssam"]["mask"] = [np.ones(3)] * 2
    with pytest.raises(ValueError, match="mask"):
        SSAMD(w).load_state_dict(bad)
    bad = copy.deepcopy(sd)
    bad["ssam"]["sparsity"] = 1.0
    with pytest.raises(ValueError, match="sparsity"):
        SSAMD(w).load_state_dict(bad)
    sd = GAM(w).state_dict()
    sd["gam"]["gamma"] = math.nan
    with pytest.raises(ValueError, match="gamma"):
        GAM(w).load_state_dict(sd)


def test_nonfinite_gradients_never_reach_the_weights_through_a_perturbation():
    X, labels, w = make_problem()
    saved = copy.deepcopy(w)
    bad = [np.full_like(p, np.nan) for p in w]
    good = loss_and_grads(X, labels, w, batch_rows(0))[1]

    opt = SSAMF(w, rho=0.1, lr=0.0)
    assert opt.accumulate_fisher(bad) is False and opt.fisher_samples == 0
    opt.update_mask([np.abs(g) for g in good])
    assert math.isnan(opt.first_step(bad))
    assert_arrays(w, saved, exact=True)  # not moved
    opt.second_step(good)  # lr = 0: the base step leaves w as it is
    assert_arrays(w, saved, exact=True)
    assert opt.state_dict()["nonfinite_steps"] == 1

    opt = SSAMD(w, seed=0)
    mask = opt.mask()
    assert opt.update_mask(0.0, grads=bad) is False
    assert_arrays(opt.mask(), mask, exact=True)

    # GAM, CR-SAM: no perturbation at all; the step ends after g₀ with the base step on g₀ as it
    # is (as the torch front, and as SAM's second step: an inf there reaches the weights)
    partly_bad = copy.deepcopy(good)
    partly_bad[0][1, 2] = np.inf
    X, labels, expected = make_problem()
    sam = SAM(expected, rho=0.1, lr=0.1, momentum=0.9)
    sam.first_step(partly_bad)
    sam.second_step(partly_bad)
    for cls in (GAM, CRSAM):
        X, labels, w = make_problem()
        opt = cls(w, rho=0.1, lr=0.1, momentum=0.9)
        seen = []
        opt.step(lambda p: (seen.append(copy.deepcopy(p)), (0.0, partly_bad))[1])
        assert len(seen) == 1  # called at w only
        assert opt.state_dict()["nonfinite_steps"] == 1
        assert_arrays(w, expected, exact=True)
        assert np.isinf(w[0][1, 2]) and np.isfinite(np.delete(w[0], 6)).all()


@pytest.mark.parametrize("cls, fail_at", [(GAM, 2), (GAM, 3), (GAM, 4), (CRSAM, 2), (CRSAM, 3), (SSAMF, 2)])
def test_an_exception_in_grad_fn_restores_the_weights(cls, fail_at):
    X, labels, w = make_problem()
    saved = copy.deepcopy(w)
    opt = cls(w, rho=0.5, lr=0.1, momentum=0.9)
    calls = []

    def failing(params):
        calls.append(1)
        if len(calls) == fail_at:
            raise KeyboardInterrupt
        return loss_and_grads(X, labels, params, batch_rows(0))

    with pytest.raises(KeyboardInterrupt):
        opt.step(failing)
    assert_arrays(w, saved, exact=True)
    assert not opt.perturbed
    opt.step(grad_fn_for(X, labels, 0))  # usable afterwards
    assert not np.array_equal(w[0], saved[0])


@pytest.mark.parametrize("cls", [GAM, CRSAM])
def test_grad_fn_may_reuse_its_output_buffers(cls):
    """Each call's gradients are read before the next call."""
    X, labels, w = make_problem()
    run_plain(cls(w, rho=0.1, lr=0.1), X, labels, 0, 5)
    X, labels, w2 = make_problem()
    out = [np.empty_like(p) for p in w2]

    def reusing(t):
        def fn(params):
            loss, g = loss_and_grads(X, labels, params, batch_rows(t))
            for o, gi in zip(out, g):
                np.copyto(o, gi)
            return loss, out

        return fn

    opt = cls(w2, rho=0.1, lr=0.1)
    for t in range(5):
        opt.step(reusing(t))
    assert_arrays(w, w2, exact=True)


def test_caller_gradients_are_not_modified():
    X, labels, w = make_problem()
    opt = SSAMF(w, rho=0.1)
    opt.update_mask([np.abs(p) for p in w])
    g = loss_and_grads(X, labels, w, batch_rows(0))[1]
    g_copy = copy.deepcopy(g)
    opt.first_step(g)
    opt.second_step(g)
    assert_arrays(g, g_copy, exact=True)


def test_crsam_maximize_is_crsam_on_minus_the_loss():
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
