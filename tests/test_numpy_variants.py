"""The numpy front's LookSAM, every-k SAM and SAMPa: against the torch front on the same
gradients, against per-array references written here from the papers (float64), and their limits
(k = 1 is SAM, α = 0 is every-k SAM, SAMPa with λ = ρ = 0 is the base optimizer)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from _numpy_family import SGDRef, assert_arrays as _assert_arrays, dot, torch_closure, torch_params

import sharpness
from sharpness import numpy as snp

# -- a small non-convex problem with hand-written gradients: pred = tanh(X W) v ------------------


def make_problem(dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(40, 4)).astype(dtype)
    y = rng.normal(size=40).astype(dtype)
    W = (0.5 * rng.normal(size=(4, 3))).astype(dtype)
    v = (0.5 * rng.normal(size=3)).astype(dtype)
    return X, y, [W, v]


def loss_and_grads(X, y, params, rows=None):
    W, v = params
    if rows is not None:
        X, y = X[rows], y[rows]
    h = np.tanh(X @ W)
    r = h @ v - y
    n = len(y)
    dv = h.T @ r / n
    dW = X.T @ (np.outer(r, v) / n * (1 - h * h))
    return float(0.5 * np.mean(r * r)), [dW.astype(W.dtype), dv.astype(v.dtype)]


def batch_rows(t):
    return np.arange(40)[(t * 7) % 40 :][:20] if (t * 7) % 40 <= 20 else np.arange(20)


def grad_fn_for(X, y, t):
    return lambda params: loss_and_grads(X, y, params, batch_rows(t))


def run_numpy(opt, X, y, steps, start=0):
    for t in range(start, start + steps):
        opt.step(grad_fn_for(X, y, t))


def run_torch(opt, tparams, X, y, steps):
    """The torch front on the same gradients, computed in numpy from the current weights."""
    for t in range(steps):
        opt.step(torch_closure(tparams, grad_fn_for(X, y, t)))


def assert_arrays(a, b, exact=False, rtol=1e-5, atol=1e-6):
    _assert_arrays(a, b, exact=exact, rtol=rtol, atol=atol)


# -- references, per array, float64, torch.optim.SGD semantics (SGDRef: _numpy_family) -----------


def reference_looksam(X, y, w, steps, rho, k, alpha, base):
    w = [p.astype(np.float64) for p in w]
    gv = None
    for t in range(steps):
        _, g = loss_and_grads(X, y, w, batch_rows(t))
        if t % k == 0:
            s = rho / (math.sqrt(dot(g, g)) + 1e-12)
            _, gs = loss_and_grads(X, y, [a + s * b for a, b in zip(w, g)], batch_rows(t))
            c = dot(g, gs) / dot(g, g)
            gv = [b - c * a for a, b in zip(g, gs)]
            d = gs
        else:
            scale = alpha * math.sqrt(dot(g, g)) / math.sqrt(dot(gv, gv)) if alpha else 0.0
            d = [a + scale * b for a, b in zip(g, gv)]
        w = base.step(w, d)
    return w


def reference_sampa(X, y, w, steps, rho, lam, base):
    w = [p.astype(np.float64) for p in w]
    gy = [np.zeros_like(p) for p in w]
    for t in range(steps):
        norm = math.sqrt(dot(gy, gy))
        _, g_next = loss_and_grads(X, y, [a - base.lr * b for a, b in zip(w, gy)], batch_rows(t))
        _, g_x = loss_and_grads(X, y, [a + rho / (norm + 1e-12) * b for a, b in zip(w, gy)], batch_rows(t))
        w = base.step(w, [(1 - lam) * a + lam * b for a, b in zip(g_x, g_next)])
        gy = g_next
    return w


# -- against the references ----------------------------------------------------------------------


@pytest.mark.parametrize("k, alpha", [(3, 0.7), (4, 1.5), (2, 0.0)])
def test_looksam_matches_the_paper(k, alpha):
    X, y, w = make_problem(np.float64)
    expected = reference_looksam(X, y, w, 25, 0.1, k, alpha, SGDRef(0.1, 0.9))
    opt = snp.LookSAM(w, k=k, alpha=alpha, rho=0.1, lr=0.1, momentum=0.9)
    run_numpy(opt, X, y, 25)
    assert_arrays(w, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("k", [1, 3])
def test_every_k_sam_matches_the_reference(k):
    X, y, w = make_problem(np.float64)
    expected = reference_looksam(X, y, w, 25, 0.1, k, 0.0, SGDRef(0.1, 0.9))
    opt = snp.EveryKSAM(w, k=k, rho=0.1, lr=0.1, momentum=0.9)
    run_numpy(opt, X, y, 25)
    assert_arrays(w, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("rho, lam", [(0.1, 0.2), (0.3, 0.0), (0.05, 1.0)])
def test_sampa_matches_the_paper(rho, lam):
    X, y, w = make_problem(np.float64)
    expected = reference_sampa(X, y, w, 25, rho, lam, SGDRef(0.1))
    opt = snp.SAMPa(w, rho=rho, lam=lam, lr=0.1)
    run_numpy(opt, X, y, 25)
    assert_arrays(w, expected, rtol=1e-10, atol=1e-12)


def test_sampa_with_momentum_feeds_the_combined_gradient():
    X, y, w = make_problem(np.float64)
    expected = reference_sampa(X, y, w, 25, 0.1, 0.2, SGDRef(0.05, 0.9))
    opt = snp.SAMPa(w, rho=0.1, lam=0.2, lr=0.05, momentum=0.9)
    run_numpy(opt, X, y, 25)
    assert_arrays(w, expected, rtol=1e-10, atol=1e-12)


# -- against the torch front (same kernels, same gradients) --------------------------------------


@pytest.mark.parametrize(
    "np_cls, torch_cls, kw",
    [
        (snp.EveryKSAM, sharpness.EveryKSAM, dict(k=3)),
        (snp.LookSAM, sharpness.LookSAM, dict(k=3, alpha=0.7)),
        (snp.SAMPa, sharpness.SAMPa, dict(lam=0.2)),
    ],
)
@pytest.mark.parametrize(
    "np_base, torch_base, base_kw",
    [
        ("sgd", torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
        ("adamw", torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2)),
    ],
)
def test_the_numpy_front_follows_the_torch_front(np_cls, torch_cls, kw, np_base, torch_base, base_kw):
    X, y, w = make_problem(np.float32)
    tparams = torch_params(w)
    opt = np_cls(w, rho=0.1, base=np_base, **kw, **base_kw)
    run_numpy(opt, X, y, 24)
    topt = torch_cls(tparams, torch_base, rho=0.1, backend="rust", **kw, **base_kw)
    run_torch(topt, tparams, X, y, 24)
    assert_arrays(w, tparams, rtol=1e-6, atol=1e-7)


# -- limits ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("base, kw", [("sgd", dict(lr=0.05, momentum=0.9)), ("adam", dict(lr=1e-2))])
def test_k_one_is_sam_bit_for_bit(base, kw):
    X, y, w0 = make_problem(np.float32)
    runs = []
    for cls, extra in ((snp.SAM, {}), (snp.EveryKSAM, dict(k=1)), (snp.LookSAM, dict(k=1, alpha=0.7))):
        w = [p.copy() for p in w0]
        run_numpy(cls(w, rho=0.1, base=base, **extra, **kw), X, y, 15)
        runs.append(w)
    assert_arrays(runs[0], runs[1], exact=True)
    assert_arrays(runs[0], runs[2], exact=True)


def test_alpha_zero_is_every_k_sam_bit_for_bit():
    X, y, w0 = make_problem(np.float32)
    a, b = [p.copy() for p in w0], [p.copy() for p in w0]
    run_numpy(snp.LookSAM(a, k=3, alpha=0.0, rho=0.1, lr=0.05, momentum=0.9), X, y, 15)
    run_numpy(snp.EveryKSAM(b, k=3, rho=0.1, lr=0.05, momentum=0.9), X, y, 15)
    assert_arrays(a, b, exact=True)


def test_sampa_lambda_zero_rho_zero_is_the_base_optimizer_bit_for_bit():
    X, y, w0 = make_problem(np.float32)
    a, b = [p.copy() for p in w0], [p.copy() for p in w0]
    run_numpy(snp.SAMPa(a, rho=0.0, lam=0.0, lr=0.05, momentum=0.9), X, y, 15)
    run_numpy(snp.SAM(b, rho=0.0, lr=0.05, momentum=0.9), X, y, 15)  # rho = 0: the base optimizer
    assert_arrays(a, b, exact=True)


def test_every_k_counts_passes_and_leaves_the_callers_gradients_alone():
    X, y, w = make_problem(np.float32)
    opt = snp.LookSAM(w, k=3, alpha=0.7, rho=0.1, lr=0.05)
    calls, seen = [], []

    def grad_fn(params):
        calls.append(1)
        loss, grads = loss_and_grads(X, y, params)
        seen.append([g.copy() for g in grads])
        seen[-1].append(grads)
        return loss, grads

    for _ in range(6):
        opt.step(grad_fn)
    assert len(calls) == 2 + 1 + 1 + 2 + 1 + 1
    for entry in seen:
        assert_arrays(entry[:2], entry[2], exact=True)
    assert not opt.perturbed


# -- checkpoints -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls, kw",
    [(snp.LookSAM, dict(k=4, alpha=0.7)), (snp.EveryKSAM, dict(k=4)), (snp.SAMPa, dict(lam=0.2))],
)
def test_state_dict_round_trip_mid_run(cls, kw):
    X, y, w0 = make_problem(np.float32)
    a = [p.copy() for p in w0]
    run_numpy(cls(a, rho=0.1, lr=0.05, momentum=0.9, **kw), X, y, 14)
    b = [p.copy() for p in w0]
    opt_b = cls(b, rho=0.1, lr=0.05, momentum=0.9, **kw)
    run_numpy(opt_b, X, y, 6)  # between two SAM steps: g_v (or ∇f(y)) must survive
    sd = copy.deepcopy(opt_b.state_dict())
    c = [p.copy() for p in b]
    opt_c = cls(c, rho=0.1, lr=0.05, momentum=0.9, **kw)
    opt_c.load_state_dict(sd)
    run_numpy(opt_c, X, y, 8, start=6)
    assert_arrays(a, c, exact=True)


def test_sampa_three_calls_two_grad_fns_and_errors():
    X, y, w0 = make_problem(np.float32)
    a, b = [p.copy() for p in w0], [p.copy() for p in w0]
    opt_a = snp.SAMPa(a, rho=0.1, lam=0.2, lr=0.05)
    opt_b = snp.SAMPa(b, rho=0.1, lam=0.2, lr=0.05)
    for t in range(5):
        opt_a.step(grad_fn_for(X, y, t + 1), grad_fn_y=grad_fn_for(X, y, t))
        opt_b.begin_step()
        opt_b.first_step(grad_fn_for(X, y, t)(b)[1])
        opt_b.second_step(grad_fn_for(X, y, t + 1)(b)[1])
    assert_arrays(a, b, exact=True)
    before = [p.copy() for p in a]

    def failing(params):
        raise KeyError("boom")

    with pytest.raises(KeyError):
        opt_a.step(failing)
    assert_arrays(a, before, exact=True)
    with pytest.raises(RuntimeError, match="begin_step"):
        opt_a.first_step(grad_fn_for(X, y, 0)(a)[1])
    opt_a.begin_step()
    with pytest.raises(RuntimeError):
        opt_a.state_dict()
    with pytest.raises(ValueError, match="lam"):
        snp.SAMPa([np.zeros(2)], lam=2.0)
    with pytest.raises(ValueError, match="k must be"):
        snp.LookSAM([np.zeros(2)], k=0)


# -- SAMPa: a non-finite ∇f(y) ------------------------------------------------------------------


def reference_sampa_skipping(X, y, w, steps, rho, lam, base, bad):
    """``reference_sampa`` with ∇f(y_{t+1}) non-finite at the steps in ``bad``, skipped as
    documented: not kept (∇f(y_t), the last finite one or the zero start, stays) and that step's
    update is ∇f(x̃_t) alone."""
    w = [p.astype(np.float64) for p in w]
    gy = [np.zeros_like(p) for p in w]
    for t in range(steps):
        norm = math.sqrt(dot(gy, gy))
        _, g_x = loss_and_grads(X, y, [a + rho / (norm + 1e-12) * b for a, b in zip(w, gy)], batch_rows(t))
        if t in bad:
            w = base.step(w, g_x)
            continue
        _, g_next = loss_and_grads(X, y, [a - base.lr * b for a, b in zip(w, gy)], batch_rows(t))
        w = base.step(w, [(1 - lam) * a + lam * b for a, b in zip(g_x, g_next)])
        gy = g_next
    return w


@pytest.mark.parametrize("api", ["step", "three-call"])
@pytest.mark.parametrize("bad, value", [({0}, math.nan), ({4}, math.nan), ({3, 4, 9}, -math.inf)])
def test_sampa_skips_a_nonfinite_gradient_at_y_and_recovers(api, bad, value):
    X, y, w = make_problem(np.float64)
    expected = reference_sampa_skipping(X, y, w, 14, 0.1, 0.2, SGDRef(0.05, 0.9), bad)
    opt = snp.SAMPa(w, rho=0.1, lam=0.2, lr=0.05, momentum=0.9)
    for t in range(14):

        def grad_fn_y(params):
            loss, grads = grad_fn_for(X, y, t)(params)
            if t in bad:  # one non-finite entry in ∇f(y_{t+1})
                grads[0].reshape(-1)[5] = value
            return loss, grads

        if api == "step":
            opt.step(grad_fn_for(X, y, t), grad_fn_y=grad_fn_y)
        else:
            opt.begin_step()
            norm = opt.first_step(grad_fn_y(w)[1])
            assert math.isfinite(norm) == (t not in bad)
            opt.second_step(grad_fn_for(X, y, t)(w)[1])
        kept = opt.state_dict()["sampa"]
        assert all(np.isfinite(g).all() for g in kept["grad_y"]), f"a non-finite ∇f(y) was kept at step {t}"
        assert math.isfinite(kept["grad_y_norm"])
        assert all(np.isfinite(p).all() for p in w)
    assert opt.state_dict()["nonfinite_steps"] == len(bad)
    assert_arrays(w, expected, rtol=1e-10, atol=1e-12)
