"""The numpy front's Random SAM (:class:`sharpness.numpy.RandomSAM`).

(a) against a per-array reference written here from the formula of the authors' official code
(filter-wise relative noise δ[i] = σ·z[i]·‖p[i]‖ along axis 0, g_δ = ∇L(w + δ), d = λ g_δ + δ,
e = ρ d/‖d‖ from w, the base step with ∇L(w + e)), with the same z drawn from a numpy Generator
in the documented order, over 20 steps of a softmax regression (a 2-D weight stored (out, in) and
a 1-D bias), SGD and AdamW bases, float32 and float64; nothing from the package builds the
reference; (b) σ = 0 (and ρ = 0) is :class:`sharpness.numpy.SAM` bit for bit, nothing drawn;
(c) the torch front on the same noise (the numpy generator replaced by the torch front's draws);
(d) ‖e‖ = ρ, the noise's filter-wise layout and draw order; (e) checkpoints resume mid-run
identically; (f) bad arguments, misuse and the non-finite paths.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from _numpy_family import AdamWRef, SGDRef, SoftmaxRegression, assert_arrays, copies, torch_closure, torch_params

import sharpness
from sharpness import numpy as snp

# -- a small softmax regression, weight (out, in), with hand-written gradients -----------------------

STEPS = 20
PROBLEM = SoftmaxRegression(n_rows=48, n_in=5, n_classes=4, batch=24, stride=11, out_first=True)
make_problem, loss_and_grads = PROBLEM.make_problem, PROBLEM.loss_and_grads
batch_rows, grad_fn_for = PROBLEM.batch_rows, PROBLEM.grad_fn_for


def cosine_sigmas(n, base=5e-3, inc=4):
    """The official schedule's shape, σ_t = base·(1 + inc·(1 − cos(π t/n))/2) (larger σ here)."""
    return [base * (1 + inc * (0.5 - 0.5 * math.cos(math.pi * t / n))) for t in range(n)]


def run_numpy(opt, X, labels, steps, start=0, sigmas=None, api="step"):
    for t in range(start, start + steps):
        if sigmas is not None:
            opt.sigma = sigmas[t]
        fn = grad_fn_for(X, labels, t)
        if api == "step":
            opt.step(fn)
        else:
            if isinstance(opt, snp.RandomSAM):
                opt.add_noise()
            opt.first_step(fn(opt.params)[1])
            opt.second_step(fn(opt.params)[1])


# -- the reference: per array, float64, torch.optim semantics (SGDRef, AdamWRef: _numpy_family) --------


def reference_delta(params, z, sigma):
    """δ per array from one standard normal vector ``z`` over ``params`` in order: for ndim ≥ 2,
    row i (output unit i, axis 0) is σ·z[i]·‖p[i]‖; for 1-D arrays σ·z·‖p‖ (float64)."""
    deltas, at = [], 0
    for p in params:
        p = np.asarray(p, dtype=np.float64)
        zi = np.asarray(z[at : at + p.size], dtype=np.float64).reshape(p.shape)
        at += p.size
        if p.ndim >= 2:
            norms = np.sqrt((p.reshape(p.shape[0], -1) ** 2).sum(axis=1))
            deltas.append(sigma * zi * norms.reshape((-1,) + (1,) * (p.ndim - 1)))
        else:
            deltas.append(sigma * zi * np.sqrt((p**2).sum()))
    return deltas


def reference_rsam(X, labels, w, base, steps, rho, sigmas, lam, seed, dtype):
    """Per-array R-SAM in float64; z drawn as the class documents: one
    ``standard_normal(total size, dtype)`` per step (all arrays share one dtype here)."""
    X = X.astype(np.float64)
    w = [x.astype(np.float64) for x in w]
    rng = np.random.default_rng(seed)
    for t in range(steps):
        z = rng.standard_normal(sum(x.size for x in w), dtype=dtype)
        delta = reference_delta(w, z, sigmas[t])
        _, g = loss_and_grads(X, labels, [x + dx for x, dx in zip(w, delta)], batch_rows(t))
        d = [lam * gi + di for gi, di in zip(g, delta)]
        norm = math.sqrt(sum(float(np.sum(di * di)) for di in d))
        e = [rho * di / (norm + 1e-12) for di in d]
        _, g_s = loss_and_grads(X, labels, [x + ei for x, ei in zip(w, e)], batch_rows(t))
        w = base.step(w, g_s)
    return w


# -- (a) against the reference --------------------------------------------------------------------------

BASES = {
    "sgd": (lambda: SGDRef(0.1, momentum=0.9, weight_decay=1e-3), dict(base="sgd", lr=0.1, momentum=0.9, weight_decay=1e-3)),
    "adamw": (lambda: AdamWRef(1e-2, weight_decay=0.05), dict(base="adamw", lr=1e-2, weight_decay=0.05)),
}
TOL = {np.float32: dict(rtol=5e-5, atol=5e-6), np.float64: dict(rtol=1e-10, atol=1e-12)}


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("api", ["step", "three-call"])
def test_matches_the_official_formula(base, dtype, api):
    X, labels, w = make_problem(dtype)
    ref, kw = BASES[base]
    sigmas = cosine_sigmas(STEPS)
    expected = reference_rsam(X, labels, w, ref(), STEPS, 0.1, sigmas, 2.0, seed=123, dtype=dtype)
    opt = snp.RandomSAM(w, rho=0.1, seed=123, **kw)
    run_numpy(opt, X, labels, STEPS, sigmas=sigmas, api=api)
    assert_arrays(w, expected, **TOL[dtype])
    assert all(x.dtype == dtype for x in w)
    assert opt.state_dict()["nonfinite_steps"] == 0 and opt.state_dict()["step"] == STEPS
    # the noise matters: SAM (σ = 0) ends elsewhere
    sam = make_problem(dtype)[2]
    run_numpy(snp.SAM(sam, rho=0.1, **kw), X, labels, STEPS)
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(w, sam)) > 1e-4


def test_lambda_and_a_constant_sigma():
    X, labels, w = make_problem()
    expected = reference_rsam(X, labels, w, SGDRef(0.05), 12, 0.2, [0.02] * 12, 0.5, seed=4, dtype=np.float64)
    opt = snp.RandomSAM(w, rho=0.2, sigma=0.02, lambda_=0.5, lr=0.05, seed=4)
    run_numpy(opt, X, labels, 12)
    assert_arrays(w, expected)


def test_defaults_follow_the_official_code_and_the_torch_front():
    opt = snp.RandomSAM([np.zeros(3)])
    t = sharpness.RandomSAM([torch.nn.Parameter(torch.zeros(3))], torch.optim.SGD, lr=0.1)
    assert opt.lambda_ == t.lambda_ == 2.0
    assert opt.sigma == t.sigma == 1.5e-3
    assert "RandomSAM(sigma=0.0015, lambda_=2.0" in repr(opt)


# -- (b) σ = 0 is SAM ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("api", ["step", "three-call"])
def test_sigma_zero_is_sam_bit_for_bit(base, api):
    X, labels, w = make_problem(np.float32)
    kw = BASES[base][1]
    a, b = copies(w), copies(w)
    run_numpy(snp.SAM(a, rho=0.1, **kw), X, labels, STEPS)
    opt = snp.RandomSAM(b, rho=0.1, sigma=0.0, seed=3, **kw)
    state = copy.deepcopy(opt.generator.bit_generator.state)
    run_numpy(opt, X, labels, STEPS, api=api)
    assert_arrays(a, b, exact=True)
    assert opt.generator.bit_generator.state == state  # nothing drawn


def test_rho_zero_is_the_base_optimizer_and_draws_nothing():
    X, labels, w = make_problem(np.float32)
    a, b = copies(w), copies(w)
    run_numpy(snp.SAM(a, rho=0.0, lr=0.1, momentum=0.9), X, labels, 6)
    opt = snp.RandomSAM(b, rho=0.0, sigma=0.1, lr=0.1, momentum=0.9, seed=3)
    state = copy.deepcopy(opt.generator.bit_generator.state)
    run_numpy(opt, X, labels, 6, api="three-call")
    assert_arrays(a, b, exact=True)
    assert opt.generator.bit_generator.state == state


# -- (c) the torch front on the same noise ------------------------------------------------------------------


class TorchNoise:
    """Stands in for the numpy Generator: the torch front's draws (one randn over the noised arrays
    in order, float32 or float64 as the weights, from torch.Generator().manual_seed(seed))."""

    def __init__(self, seed):
        self.g = torch.Generator().manual_seed(seed)

    def standard_normal(self, n, dtype):
        return torch.randn(n, generator=self.g, dtype=torch.float32 if dtype == np.float32 else torch.float64).numpy()


def run_torch(opt, tparams, X, labels, steps, sigmas):
    """The torch front on the same gradients, computed in numpy from its current weights."""
    for t in range(steps):
        opt.sigma = sigmas[t]

        opt.step(torch_closure(tparams, grad_fn_for(X, labels, t)))


TORCH_BASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.05)),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("base", sorted(TORCH_BASES))
def test_follows_the_torch_front_on_the_same_noise(base, dtype):
    X, labels, w = make_problem(dtype)
    tparams = torch_params(w)
    sigmas = cosine_sigmas(STEPS)
    cls, kw = TORCH_BASES[base]
    opt = snp.RandomSAM(w, rho=0.1, base=base, **kw)
    opt.generator = TorchNoise(5)
    run_numpy(opt, X, labels, STEPS, sigmas=sigmas)
    topt = sharpness.RandomSAM(tparams, cls, rho=0.1, seed=5, backend="rust", **kw)
    run_torch(topt, tparams, X, labels, STEPS, sigmas)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-11, atol=1e-13)
    assert_arrays(w, tparams, **tol)
    assert opt.last_direction_norm == pytest.approx(topt.last_direction_norm, rel=1e-5)


def test_the_noise_is_the_torch_fronts_on_one_step():
    """δ itself (w + δ − w) against the torch front's, on the same draws."""
    _, _, w = make_problem(np.float64)
    tparams = torch_params(w)
    opt = snp.RandomSAM(w, sigma=0.05)
    opt.generator = TorchNoise(8)
    topt = sharpness.RandomSAM(tparams, torch.optim.SGD, sigma=0.05, lr=0.1, seed=8, backend="rust")
    w0 = copies(w)
    opt.add_noise()
    topt.add_noise()
    assert_arrays([a - b for a, b in zip(w, w0)], [p.detach().numpy() - b for p, b in zip(tparams, w0)], rtol=1e-12, atol=1e-15)
    assert opt.restore() and topt.restore()
    assert_arrays(w, w0, exact=True)


# -- (d) ‖e‖ = ρ, the noise's layout and draw order -----------------------------------------------------------


def test_the_perturbation_has_norm_rho_from_w():
    X, labels, w = make_problem()
    w0 = copies(w)
    opt = snp.RandomSAM(w, rho=0.07, sigma=0.05, lr=0.1, seed=1)
    opt.add_noise()
    assert opt.noised and not opt.perturbed
    grads = loss_and_grads(X, labels, w)[1]
    kept = copies(grads)
    d_norm = opt.first_step(grads)
    assert_arrays(grads, kept, exact=True)  # the caller's gradients are left alone
    assert opt.perturbed and not opt.noised
    e = [a - b for a, b in zip(w, w0)]
    assert math.isclose(math.sqrt(sum(float(np.sum(x * x)) for x in e)), 0.07, rel_tol=1e-10)  # rounding of w + e − w
    assert d_norm == opt.last_direction_norm and math.isfinite(d_norm) and d_norm > 0
    assert math.isfinite(opt.last_grad_norm)
    assert opt.restore() and not opt.restore()
    assert_arrays(w, w0, exact=True)


def _noise(params, sigma, seed):
    """δ = (w + δ) − w after add_noise, then the weights restored."""
    w0 = copies(params)
    opt = snp.RandomSAM(params, sigma=sigma, seed=seed)
    opt.add_noise()
    deltas = [p - q for p, q in zip(params, w0)]
    assert opt.restore()
    assert_arrays(params, w0, exact=True)
    return deltas


def test_the_noise_is_filter_wise_and_relative():
    """δ for a conv-like kernel (out, in, kh, kw), a weight (out, in) and a bias is σ·z·‖filter‖
    per output unit (axis 0), σ·z·‖b‖ for the bias; scaling one unit's weights scales its δ alone."""
    def params(scale_row):
        conv, cb = rng.normal(size=(5, 3, 3, 3)), rng.normal(size=5)
        lin, lb = rng.normal(size=(4, 7)), rng.normal(size=4)
        conv[1] *= scale_row
        lin[2] *= scale_row
        return [conv, cb, lin, lb]

    rng = np.random.default_rng(0)
    plain_params = params(1.0)
    rng = np.random.default_rng(0)
    scaled_params = params(10.0)
    plain, scaled = _noise(copies(plain_params), 0.01, 5), _noise(copies(scaled_params), 0.01, 5)
    z = np.random.default_rng(5).standard_normal(sum(p.size for p in plain_params))
    assert_arrays(plain, reference_delta(plain_params, z, 0.01), rtol=1e-6, atol=1e-14)  # rounding of w + δ
    np.testing.assert_allclose(scaled[2][2], 10 * plain[2][2], rtol=1e-6)
    np.testing.assert_allclose(scaled[0][1], 10 * plain[0][1], rtol=1e-6)
    for i in (0, 1, 3):
        np.testing.assert_allclose(scaled[2][i], plain[2][i], rtol=1e-6)
    np.testing.assert_array_equal(scaled[1], plain[1])  # biases: their own norm
    np.testing.assert_array_equal(scaled[3], plain[3])
    assert np.all(np.linalg.norm(plain[2], axis=1) > 0)  # every row noised


def test_the_draw_order_with_mixed_dtypes_and_empty_arrays():
    """One standard_normal per dtype, in the order the dtypes first appear, over that dtype's
    arrays in order (empty arrays take nothing)."""
    rng = np.random.default_rng(1)
    W32 = rng.normal(size=(3, 4)).astype(np.float32)
    b64 = rng.normal(size=3)
    E32 = np.zeros((0, 2), np.float32)
    V32 = rng.normal(size=(2, 2, 2)).astype(np.float32)
    params = [W32, b64, E32, V32]
    got = _noise(copies(params), 0.1, 9)
    gen = np.random.default_rng(9)
    z32 = gen.standard_normal(W32.size + V32.size, dtype=np.float32)
    z64 = gen.standard_normal(b64.size, dtype=np.float64)
    ref32 = reference_delta([W32, V32], z32, 0.1)
    ref64 = reference_delta([b64], z64, 0.1)
    assert got[2].shape == (0, 2)
    assert_arrays([got[0], got[3]], ref32, rtol=1e-5, atol=1e-7)
    assert_arrays([got[1]], ref64, rtol=1e-12, atol=1e-15)


def test_a_zero_filter_gets_no_noise():
    W = np.ones((3, 4))
    W[1] = 0.0
    b = np.zeros(3)
    delta = _noise([W, b], 0.5, 0)
    assert np.all(delta[0][1] == 0) and np.all(delta[0][[0, 2]] != 0)
    assert np.all(delta[1] == 0)


def test_maximize_is_the_ascent_of_minus_l():
    X, labels, w = make_problem()
    a, b = copies(w), copies(w)
    oa = snp.RandomSAM(a, rho=0.1, sigma=0.02, lr=0.05, maximize=True, seed=2)
    ob = snp.RandomSAM(b, rho=0.1, sigma=0.02, lr=0.05, seed=2)
    for t in range(8):
        oa.step(grad_fn_for(X, labels, t))
        ob.step(grad_fn_for(X, labels, t, scale=-1.0))
    assert_arrays(a, b, rtol=1e-12, atol=1e-14)


# -- (e) checkpoints ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("base", sorted(BASES))
def test_state_dict_round_trip_mid_run(base):
    kw = dict(BASES[base][1], rho=0.1, sigma=0.02)
    X, labels, w0 = make_problem(np.float32)
    sigmas = [0.02] * 6 + [0.03] * 8
    a = copies(w0)
    run_numpy(snp.RandomSAM(a, seed=3, **kw), X, labels, 14, sigmas=sigmas)
    b = copies(w0)
    opt_b = snp.RandomSAM(b, seed=3, **kw)
    run_numpy(opt_b, X, labels, 6, sigmas=sigmas)
    opt_b.sigma = 0.03
    sd = copy.deepcopy(opt_b.state_dict())
    assert sd["rsam"]["sigma"] == 0.03
    snapshot = copies(b)
    run_numpy(opt_b, X, labels, 2, start=6)  # later steps leave the saved dict alone
    results = {}
    for load_generator in (True, False):
        c = copies(snapshot)
        opt_c = snp.RandomSAM(c, **dict(kw, seed=99, sigma=0.5))  # only the checkpoint can match
        state = copy.deepcopy(sd)
        if not load_generator:
            del state["rsam"]["generator"]
        opt_c.load_state_dict(state)
        assert opt_c.sigma == 0.03
        run_numpy(opt_c, X, labels, 8, start=6)
        results[load_generator] = c
    assert_arrays(a, results[True], exact=True)
    assert any(not np.array_equal(x, y) for x, y in zip(a, results[False]))


def test_load_state_dict_checks_its_input():
    w = [np.zeros((2, 3)), np.zeros(2)]
    opt = snp.RandomSAM(w, seed=0)
    sd = opt.state_dict()
    with pytest.raises(ValueError, match="rsam"):
        opt.load_state_dict(snp.SAM([np.zeros((2, 3)), np.zeros(2)]).state_dict())
    bad = copy.deepcopy(sd)
    bad["rsam"]["sigma"] = -1.0
    with pytest.raises(ValueError, match="sigma"):
        opt.load_state_dict(bad)
    bad = copy.deepcopy(sd)
    bad["rsam"]["generator"] = {"bit_generator": "MT19937", "state": {}}
    with pytest.raises(ValueError, match="PCG64"):
        opt.load_state_dict(bad)
    with pytest.raises(TypeError, match="dict"):
        opt.load_state_dict([sd])
    opt.load_state_dict(sd)


# -- (f) bad arguments, misuse, non-finite values -------------------------------------------------------------


def test_bad_arguments():
    w = [np.zeros(3)]
    for sigma in (-1.0, float("nan"), float("inf"), True, "0.1", None):
        with pytest.raises(ValueError, match="sigma"):
            snp.RandomSAM(w, sigma=sigma)
    for lam in (0.0, -2.0, float("inf"), float("nan"), False, "2"):
        with pytest.raises(ValueError, match="lambda_"):
            snp.RandomSAM(w, lambda_=lam)
    with pytest.raises(ValueError, match="adaptive"):
        snp.RandomSAM(w, adaptive=True)
    with pytest.raises(TypeError, match="seed"):
        snp.RandomSAM(w, seed=1.5)
    with pytest.raises(TypeError, match="seed"):
        snp.RandomSAM(w, seed=True)
    with pytest.raises(ValueError, match="rho"):
        snp.RandomSAM(w, rho=-0.1)
    with pytest.raises(TypeError, match="unknown"):
        snp.RandomSAM(w, momentum=0.9, base="adam")
    with pytest.raises(TypeError, match="list of numpy arrays"):
        snp.RandomSAM(np.zeros(3))
    with pytest.raises(TypeError, match="dtype"):
        snp.RandomSAM([np.zeros(3, np.int64)])
    opt = snp.RandomSAM(w, sigma=np.float32(0.25), seed=np.int64(3))
    assert opt.sigma == 0.25 and isinstance(opt.sigma, float)
    with pytest.raises(ValueError, match="sigma"):
        opt.sigma = -0.5
    assert opt.sigma == 0.25
    gen = np.random.default_rng(4)
    assert snp.RandomSAM(w, seed=gen).generator is gen


def test_protocol_errors_and_exact_undo():
    X, labels, w = make_problem(np.float32)
    w0 = copies(w)
    opt = snp.RandomSAM(w, sigma=0.1, lr=0.1, seed=0)
    grads = loss_and_grads(X, labels, w)[1]
    with pytest.raises(RuntimeError, match="add_noise"):
        opt.first_step(grads)
    with pytest.raises(RuntimeError, match="first_step"):
        opt.second_step(grads)
    opt.add_noise()
    assert any(not np.array_equal(a, b) for a, b in zip(w, w0))
    with pytest.raises(RuntimeError, match="add_noise"):
        opt.add_noise()
    with pytest.raises(RuntimeError, match="state_dict"):
        opt.state_dict()
    with pytest.raises(RuntimeError, match="load_state_dict"):
        opt.load_state_dict({})
    with pytest.raises(RuntimeError, match="first_step"):
        opt.second_step(grads)
    # bad gradients after the noise: a clear error, and the weights back at w
    with pytest.raises(ValueError, match="shape"):
        opt.first_step([grads[0].T, grads[1]])
    assert not opt.noised
    assert_arrays(w, w0, exact=True)
    opt.add_noise()
    with pytest.raises(TypeError, match="dtype"):
        opt.first_step([g.astype(np.float64) for g in grads])
    assert_arrays(w, w0, exact=True)
    opt.add_noise()
    with pytest.raises(ValueError, match="gradient arrays"):
        opt.first_step(grads[:1])
    assert_arrays(w, w0, exact=True)
    # after the first step
    opt.add_noise()
    opt.first_step(loss_and_grads(X, labels, w)[1])
    with pytest.raises(RuntimeError, match="add_noise"):
        opt.add_noise()
    with pytest.raises(RuntimeError, match="twice"):
        opt.first_step(grads)
    with pytest.raises(RuntimeError, match="state_dict"):
        opt.state_dict()
    assert opt.restore()
    assert_arrays(w, w0, exact=True)

    # a grad_fn that fails at either call leaves the weights at w
    for fail_at in (1, 2):
        calls = []

        def grad_fn(params, fail_at=fail_at, calls=calls):
            calls.append(1)
            if len(calls) == fail_at:
                raise KeyError("boom")
            return loss_and_grads(X, labels, params)

        with pytest.raises(KeyError):
            opt.step(grad_fn)
        assert_arrays(w, w0, exact=True)
        assert not opt.noised and not opt.perturbed
    with pytest.raises(TypeError, match="pair"):
        opt.step(lambda params: loss_and_grads(X, labels, params)[1])
    assert_arrays(w, w0, exact=True)
    assert opt.state_dict()["step"] == 0
    opt.step(grad_fn_for(X, labels, 0))  # and it still trains
    assert opt.state_dict()["step"] == 1


def test_a_non_finite_first_gradient_leaves_w():
    X, labels, w = make_problem()
    opt = snp.RandomSAM(w, sigma=0.1, lr=0.1, seed=0)
    w0 = copies(w)
    opt.add_noise()
    grads = loss_and_grads(X, labels, w)[1]
    grads[0][0, 0] = np.inf
    norm = opt.first_step(grads)
    assert not math.isfinite(norm) and not math.isfinite(opt.last_grad_norm)
    assert_arrays(w, w0, exact=True)  # at w, not w + δ
    # the step is then the base optimizer's, with the gradient taken at w
    g = loss_and_grads(X, labels, w)[1]
    opt.second_step(g)
    assert_arrays(w, [a - 0.1 * b for a, b in zip(w0, g)])
    assert opt.state_dict()["nonfinite_steps"] == 1
    run_numpy(opt, X, labels, 2)  # and training goes on
    assert all(np.isfinite(x).all() for x in w)


def test_a_nan_first_gradient_leaves_w_in_step():
    X, labels, w = make_problem(np.float32)
    opt = snp.RandomSAM(w, sigma=0.1, lr=0.1, seed=0)
    w0 = copies(w)
    calls = []

    def grad_fn(params):
        calls.append(1)
        loss, g = loss_and_grads(X, labels, params)
        if len(calls) == 1:
            g[1][0] = np.nan
        else:
            assert_arrays(params, w0, exact=True)  # the second pass runs at w exactly
        return loss, g

    opt.step(grad_fn)
    assert opt.state_dict()["nonfinite_steps"] == 1


def test_a_non_finite_direction_leaves_w():
    """‖g_δ‖ is finite (summed in float64) but d = λ g_δ + δ overflows float32: no perturbation."""
    w = np.ones(1, np.float32)
    opt = snp.RandomSAM([w], sigma=0.1, lr=1e-40, seed=0)
    w0 = w.copy()
    opt.add_noise()
    norm = opt.first_step([np.full(1, 3e38, np.float32)])
    assert math.isfinite(opt.last_grad_norm) and not math.isfinite(opt.last_direction_norm)
    assert not math.isfinite(norm)
    np.testing.assert_array_equal(w, w0)
    opt.second_step([np.ones(1, np.float32)])
    assert np.isfinite(w).all()
    assert opt.state_dict()["nonfinite_steps"] == 1
