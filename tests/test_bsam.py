"""Bayesian SAM against a per-tensor reference written here from the paper's Algorithm 1
(Möllenhoff & Khan, ICLR 2023, arXiv:2210.01620), with the same noise stream; its ρ = 0 limit,
the posterior sample, and checkpoints that carry the optimizer's generator; on the numpy front too
(the same rule), against a per-array reference and against the torch front on the same noise."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from _family import batches, grads_at, loss_of, make_model, run
from _numpy_family import SoftmaxRegression, add, assert_arrays, copies, torch_closure, torch_params

import sharpness
from sharpness import numpy as snp

BACKENDS = ["rust", "torch"]
HYPER = dict(lr=0.05, rho=0.05, betas=(0.9, 0.999), weight_decay=1e-3, damping=0.1, s_init=1.0)
N_DATA = 200


def reference_bsam(model, data, seed, num_data, lr, rho, betas, weight_decay, damping, s_init):
    """ε ~ N(0, 1/(N s)); g = ∇L(θ+ε); e = ρ g/s; g_e = ∇L(θ+e);
    g_m ← β₁g_m + (1−β₁)(g_e + δθ); s ← β₂s + (1−β₂)(√s|g| + δ + γ); θ ← θ − α g_m/s.
    The noise: one randn over all parameters in order from a generator seeded with ``seed``."""
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(seed)
    b1, b2 = betas
    S = [torch.full_like(p, s_init) for p in params]
    GM = [torch.zeros_like(p) for p in params]
    sizes = [p.numel() for p in params]
    for x, y in data:
        theta = [p.detach().clone() for p in params]
        z = torch.randn(sum(sizes), generator=gen).split(sizes)
        with torch.no_grad():
            for p, t, zi, s in zip(params, theta, z, S):
                p.copy_(t + zi.view_as(p) / (num_data * s).sqrt())
        g = grads_at(model, x, y)
        with torch.no_grad():
            for p, t, gi, s in zip(params, theta, g, S):
                p.copy_(t + rho * gi / s)
        ge = grads_at(model, x, y)
        with torch.no_grad():
            for i, p in enumerate(params):
                p.copy_(theta[i])
                GM[i] = b1 * GM[i] + (1 - b1) * (ge[i] + weight_decay * theta[i])
                S[i] = b2 * S[i] + (1 - b2) * (S[i].sqrt() * g[i].abs() + weight_decay + damping)
                p.sub_(lr * GM[i] / S[i])


def assert_close(a, b, rtol=1e-4, atol=1e-6):
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rho", [0.05, 0.0])
def test_matches_the_paper_over_20_steps(backend, rho):
    hyper = dict(HYPER, rho=rho)
    data = batches(20)
    ref = make_model()
    reference_bsam(ref, data, seed=7, num_data=N_DATA, **hyper)
    model = make_model()
    opt = sharpness.BayesianSAM(model.parameters(), num_data=N_DATA, seed=7, backend=backend, **hyper)
    run(opt, model, data)
    assert_close(model, ref)
    s = opt.state[model[0].weight]["bsam_s"]
    assert not torch.equal(s, torch.ones_like(s))  # the scale adapted


@pytest.mark.parametrize("backend", BACKENDS)
def test_begin_step_draws_a_posterior_sample_and_restore_undoes_it(backend):
    model = make_model()
    theta = [p.detach().clone() for p in model.parameters()]
    opt = sharpness.BayesianSAM(model.parameters(), num_data=50, s_init=4.0, seed=3, backend=backend)
    opt.begin_step()
    sizes = [t.numel() for t in theta]
    z = torch.randn(sum(sizes), generator=torch.Generator().manual_seed(3)).split(sizes)
    for p, t, zi in zip(model.parameters(), theta, z):
        torch.testing.assert_close(p.detach(), t + zi.view_as(t) / math.sqrt(50 * 4.0), rtol=1e-6, atol=1e-7)
    with pytest.raises(RuntimeError):
        opt.state_dict()
    assert opt.restore()
    for p, t in zip(model.parameters(), theta):
        assert torch.equal(p, t)


@pytest.mark.parametrize("backend", BACKENDS)
def test_three_calls_equal_the_closure(backend):
    data = batches(6)
    a, b = make_model(), make_model()
    oa = sharpness.BayesianSAM(a.parameters(), num_data=N_DATA, seed=1, backend=backend, **HYPER)
    ob = sharpness.BayesianSAM(b.parameters(), num_data=N_DATA, seed=1, backend=backend, **HYPER)
    run(oa, a, data)
    for x, y in data:
        ob.begin_step()
        loss_of(b, x, y).backward()
        ob.first_step(zero_grad=True)
        loss_of(b, x, y).backward()
        ob.second_step(zero_grad=True)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(RuntimeError):  # no sample drawn first
        loss_of(b, *data[0]).backward()
        ob.first_step()


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_round_trip_carries_the_generator(backend):
    data = batches(12)
    a = make_model()
    oa = sharpness.BayesianSAM(a.parameters(), num_data=N_DATA, seed=11, backend=backend, **HYPER)
    run(oa, a, data[:6])
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": oa.state_dict()}, buf)
    run(oa, a, data[6:])
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    b = make_model(seed=5)
    b.load_state_dict(ckpt["model"])
    ob = sharpness.BayesianSAM(b.parameters(), num_data=N_DATA, seed=999, backend=backend, **HYPER)  # another seed
    ob.load_state_dict(ckpt["opt"])
    run(ob, b, data[6:])
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_exception_in_the_first_pass_restores_theta():
    model = make_model()
    theta = [p.detach().clone() for p in model.parameters()]
    opt = sharpness.BayesianSAM(model.parameters(), num_data=N_DATA, seed=0)

    def failing():
        raise ValueError("boom")

    with pytest.raises(ValueError):
        opt.step(failing)
    for p, t in zip(model.parameters(), theta):
        assert torch.equal(p, t)
    run(opt, model, batches(1))  # usable afterwards


def test_bad_arguments():
    with pytest.raises(ValueError):
        sharpness.BayesianSAM(make_model().parameters(), num_data=0)
    with pytest.raises(ValueError):
        sharpness.BayesianSAM(make_model().parameters(), num_data=10, s_init=0.0)


def test_adaptive_is_refused_on_both_fronts():
    with pytest.raises(ValueError, match="adaptive"):
        sharpness.BayesianSAM(make_model().parameters(), num_data=10, adaptive=True)
    with pytest.raises(ValueError, match="adaptive"):
        snp.BayesianSAM([np.zeros(3)], num_data=10, adaptive=True)


def test_a_checkpoint_without_the_generator_is_refused():
    """The resumed noise comes from the saved generator: a dict without it would resume with other noise."""
    model = make_model()
    opt = sharpness.BayesianSAM(model.parameters(), num_data=N_DATA, seed=0)
    run(opt, model, batches(1))
    sd = opt.state_dict()
    del sd["sam"]["generator"]
    with pytest.raises(ValueError, match="generator"):
        sharpness.BayesianSAM(make_model().parameters(), num_data=N_DATA).load_state_dict(sd)


# == the numpy front (sharpness.numpy.BayesianSAM: the same rule over numpy arrays) ================

PROBLEM = SoftmaxRegression(n_rows=48, n_in=5, n_classes=4, batch=24, stride=11)
make_problem, loss_and_grads = PROBLEM.make_problem, PROBLEM.loss_and_grads
batch_rows, grad_fn_for = PROBLEM.batch_rows, PROBLEM.grad_fn_for
STEPS = 25
BSAM = dict(lr=0.05, rho=0.05, betas=(0.9, 0.999), weight_decay=1e-3, damping=0.1, s_init=1.0)


def run_numpy(opt, X, labels, steps, start=0):
    for t in range(start, start + steps):
        opt.step(grad_fn_for(X, labels, t))


def run_torch(opt, tparams, X, labels, steps):
    """The torch front on the same gradients, computed in numpy from its current weights."""
    for t in range(steps):
        opt.step(torch_closure(tparams, grad_fn_for(X, labels, t)))


def reference_bsam_numpy(X, labels, w, steps, seed, num_data, lr, rho, betas, weight_decay, damping, s_init):
    """Möllenhoff & Khan 2023, Algorithm 1; the noise: one standard_normal over all (float64)
    arrays in order, per step, from numpy.random.default_rng(seed)."""
    w = copies(w)
    rng = np.random.default_rng(seed)
    b1, b2 = betas
    S = [np.full_like(x, s_init) for x in w]
    GM = [np.zeros_like(x) for x in w]
    sizes = [x.size for x in w]
    for t in range(steps):
        z = rng.standard_normal(sum(sizes))
        parts = np.split(z, np.cumsum(sizes)[:-1])
        eps = [zi.reshape(x.shape) / np.sqrt(num_data * s) for zi, x, s in zip(parts, w, S)]
        _, g = loss_and_grads(X, labels, add(w, eps), batch_rows(t))
        _, ge = loss_and_grads(X, labels, [x + rho * gi / s for x, gi, s in zip(w, g, S)], batch_rows(t))
        for i in range(len(w)):
            GM[i] = b1 * GM[i] + (1 - b1) * (ge[i] + weight_decay * w[i])
            S[i] = b2 * S[i] + (1 - b2) * (np.sqrt(S[i]) * np.abs(g[i]) + weight_decay + damping)
            w[i] = w[i] - lr * GM[i] / S[i]
    return w, S


def scales(opt, n):
    return [opt.state[i]["bsam_s"] for i in range(n)]


@pytest.mark.parametrize("rho", [0.05, 0.0])
def test_numpy_bayesian_sam_matches_algorithm_1(rho):
    X, labels, w = make_problem()
    hyper = dict(BSAM, rho=rho)
    expected, s_ref = reference_bsam_numpy(X, labels, w, STEPS, 7, 200, **hyper)
    opt = snp.BayesianSAM(w, num_data=200, seed=7, **hyper)
    run_numpy(opt, X, labels, STEPS)
    assert_arrays(w, expected)
    assert_arrays(scales(opt, 2), s_ref)
    assert not np.array_equal(scales(opt, 2)[0], np.ones_like(w[0]))  # the scale adapted
    assert_arrays(opt.posterior_std()[0], [1 / np.sqrt(200 * s) for s in s_ref])


class TorchNoise:
    """Stands in for the numpy Generator: the torch front's draws (one randn over the arrays of a
    dtype, in order, from torch.Generator().manual_seed(seed)), so both fronts use one noise."""

    def __init__(self, seed):
        self.g = torch.Generator().manual_seed(seed)

    def standard_normal(self, n, dtype):
        return torch.randn(n, generator=self.g, dtype=torch.float32 if dtype == np.float32 else torch.float64).numpy()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_bayesian_sam_follows_the_torch_front_on_the_same_noise(dtype):
    """The same rule on both fronts, the same gradients and noise (backend="rust"): the same
    trajectory, to the rounding of torch's CPU square root (numpy's is correctly rounded)."""
    X, labels, w = make_problem(dtype)
    tparams = torch_params(w)
    opt = snp.BayesianSAM(w, num_data=200, **BSAM)
    opt.generator = TorchNoise(5)
    run_numpy(opt, X, labels, 20)
    topt = sharpness.BayesianSAM(tparams, num_data=200, seed=5, backend="rust", **BSAM)
    run_torch(topt, tparams, X, labels, 20)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-11, atol=1e-13)
    assert_arrays(w, tparams, **tol)
    assert_arrays(scales(opt, 2), [topt.state[p]["bsam_s"] for p in tparams], **tol)
    assert_arrays(opt.posterior_std()[0], topt.posterior_std()[0], **tol)


def test_numpy_a_nonfinite_norm_never_reaches_the_weights():
    X, labels, w = make_problem(np.float32)
    opt = snp.BayesianSAM(w, num_data=100, seed=0, **BSAM)
    run_numpy(opt, X, labels, 3)
    before = copies(w)
    s_before = copies(scales(opt, 2))
    _, g = loss_and_grads(X, labels, w)
    bad = copies(g)
    bad[0][0, 0] = np.inf
    opt.begin_step()
    assert opt.first_step(bad)
    assert not math.isfinite(opt.last_grad_norm)
    assert_arrays(w, before, exact=True)  # nothing moved: back from the sample
    assert_arrays(scales(opt, 2), s_before, exact=True)  # s kept
    opt.second_step(g)  # the update with finite gradients
    assert all(np.isfinite(a).all() for a in w)
    assert opt.state_dict()["sam"]["stats"]["nonfinite_skips"] == 1


def test_numpy_mixed_dtypes_keep_scales_per_dtype():
    """(The run per dtype itself: tests/test_numpy_behaviour.py.) Each scale s is kept in its
    parameter's dtype."""
    X, labels, w = make_problem(np.float64)
    arrays = [w[0].copy(), w[1].astype(np.float32)]
    opt = snp.BayesianSAM(arrays, num_data=100, seed=0)
    opt.step(
        lambda p: (
            0.0,
            [x.astype(a.dtype) for x, a in zip(loss_and_grads(X, labels, [q.astype(np.float64) for q in p])[1], p)],
        )
    )
    assert [s.dtype for s in scales(opt, 2)] == [np.float64, np.float32]


def test_numpy_bad_arguments():
    w = [np.zeros(3)]
    with pytest.raises(ValueError, match="num_data"):
        snp.BayesianSAM(w, num_data=0)
    with pytest.raises(ValueError, match="s_init"):
        snp.BayesianSAM(w, num_data=10, s_init=0.0)
    with pytest.raises(ValueError, match="damping"):
        snp.BayesianSAM(w, num_data=10, damping=-1.0)
    with pytest.raises(TypeError, match="seed"):
        snp.BayesianSAM(w, num_data=10, seed=1.5)
    with pytest.raises(TypeError, match="dtype"):
        snp.BayesianSAM([np.zeros(3, dtype=np.int64)], num_data=10)
    with pytest.raises(TypeError, match="not one array"):
        snp.BayesianSAM(np.zeros(3), num_data=10)
    with pytest.raises(ValueError, match="empty"):
        snp.BayesianSAM([], num_data=10)
    with pytest.raises(TypeError, match="takes no base"):  # its own update: no base optimizer
        snp.BayesianSAM(w, num_data=10, base="adam")


def test_numpy_load_refuses_another_methods_state():
    w = [np.zeros(3)]
    with pytest.raises(ValueError, match="AdaSAM"):
        snp.BayesianSAM(w, num_data=10).load_state_dict(snp.AdaSAM([np.zeros(3)]).state_dict())
    with pytest.raises(ValueError, match="generator"):
        sd = snp.BayesianSAM([np.zeros(3)], num_data=10).state_dict()
        del sd["sam"]["generator"]
        snp.BayesianSAM(w, num_data=10).load_state_dict(sd)


def test_the_noise_is_drawn_from_the_fronts_generator_only():
    """The engines' elementwise "noise" never falls back on a global generator."""
    engines = sharpness.BayesianSAM(make_model().parameters(), num_data=10, backend="rust").engines()
    engines += sharpness.BayesianSAM(make_model().parameters(), num_data=10, backend="torch").engines()
    engines += snp.BayesianSAM([np.zeros(3)], num_data=10).engines()
    for engine in engines:
        with pytest.raises(ValueError, match="generator"):
            engine.elementwise(lambda xp, gi, w, z: None, ["weights", "noise"], {}, every=True)
