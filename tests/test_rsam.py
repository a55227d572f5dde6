"""Random SAM on both fronts (:class:`sharpness.RandomSAM`, :class:`sharpness.numpy.RandomSAM`: one
rule, ``sharpness/methods/rsam.py``).

Torch front: against a per-tensor reference written here from the authors' official code
(RSAM-Optimizer/R-SAM, vit_jax/train.py: filter-wise relative noise δ = σ·z·‖filter‖, the first
gradient at w + δ, the direction d = λ g_δ + δ, the ascent ρ d/‖d‖ taken from w), the σ = 0 limit
(SAM bit for bit), a closed form on a quadratic, ‖e‖ = ρ, the noise's layout, checkpoints that
carry the generator and σ, and the non-finite and misuse paths.

Numpy front: (a) against a per-array reference written from the same formula, with the same z drawn
from a numpy Generator in the documented order, over 20 steps of a softmax regression (a 2-D weight
stored (out, in) and a 1-D bias), SGD and AdamW bases, float32 and float64; nothing from the package
builds the reference; (b) σ = 0 (and ρ = 0) is :class:`sharpness.numpy.SAM` bit for bit, nothing
drawn; (c) the torch front on the same noise (the numpy generator replaced by the torch front's
draws), and both fronts on one trajectory with parameter groups; (d) ‖e‖ = ρ, the noise's
filter-wise layout and draw order; (e) checkpoints resume mid-run identically; (f) bad arguments,
misuse and the non-finite paths.
"""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch
from _family import BASES, assert_close, assert_equal, batches, flat_dot, grads_at, loss_of, make_model
from _numpy_family import AdamWRef, SGDRef, SoftmaxRegression, assert_arrays, copies, torch_closure, torch_params
from torch import nn

import sharpness
from sharpness import numpy as snp


def reference_delta(params, z, sigma):
    """δ per tensor from one standard normal vector ``z`` over ``params`` in order: for ndim > 1,
    row i (output unit i, dim 0) is σ·z[i]·‖p[i]‖; for 1-D tensors σ·z·‖p‖."""
    deltas, offset = [], 0
    for p in params:
        zi = z[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
        w = p.detach()
        if w.ndim > 1:
            norms = w.reshape(w.shape[0], -1).norm(dim=1)
            deltas.append(sigma * zi * norms.view(-1, *([1] * (w.ndim - 1))))
        else:
            deltas.append(sigma * zi * w.norm())
    return deltas


def reference_rsam(model, base, data, rho, sigmas, lam, seed):
    """Per-tensor R-SAM, one step per batch with σ = sigmas[t]."""
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(seed)
    for (x, y), sigma in zip(data, sigmas):
        saved = [p.detach().clone() for p in params]
        z = torch.randn(sum(p.numel() for p in params), generator=gen)
        deltas = reference_delta(params, z, sigma)
        with torch.no_grad():
            for p, d in zip(params, deltas):
                p.add_(d)
        g = grads_at(model, x, y)  # at w + δ
        d = [lam * gi + di for gi, di in zip(g, deltas)]
        norm = math.sqrt(flat_dot(d, d))
        with torch.no_grad():
            for p, w, di in zip(params, saved, d):
                p.copy_(w + di * (rho / (norm + 1e-12)))  # w + ρ d/‖d‖, from w
        g_s = grads_at(model, x, y)
        with torch.no_grad():
            for p, w in zip(params, saved):
                p.copy_(w)
        for p, gi in zip(params, g_s):
            p.grad = gi
        base.step()


def run(opt, model, data, api, sigmas=None):
    for t, (x, y) in enumerate(data):
        if sigmas is not None:
            opt.sigma = sigmas[t]
        if api == "closure":

            def closure():
                opt.zero_grad()
                loss = loss_of(model, x, y)
                loss.backward()
                return loss

            opt.step(closure)
        else:
            if isinstance(opt, sharpness.RandomSAM):
                opt.add_noise()
            loss_of(model, x, y).backward()
            opt.first_step(zero_grad=True)
            loss_of(model, x, y).backward()
            opt.second_step(zero_grad=True)


def cosine_sigmas(n, base=5e-3, inc=4):
    """The official schedule's shape, σ_t = base·(1 + inc·(1 − cos(π t/n))/2) (larger σ here)."""
    return [base * (1 + inc * (0.5 - 0.5 * math.cos(math.pi * t / n))) for t in range(n)]


@pytest.mark.parametrize("backend", ["rust", "torch"])
@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("api", ["closure", "three-call"])
def test_rsam_matches_the_official_code(backend, base, api):
    data = batches(20)
    sigmas = cosine_sigmas(20)
    cls, kw = BASES[base]
    ref = make_model()
    mine = copy.deepcopy(ref)
    reference_rsam(ref, cls(ref.parameters(), foreach=False, **kw), data, 0.1, sigmas, 2.0, seed=123)
    opt = sharpness.RandomSAM(mine.parameters(), cls, rho=0.1, seed=123, backend=backend, **kw)
    run(opt, mine, data, api, sigmas)
    assert_close(ref, mine)
    assert opt.stats["nonfinite_skips"] == 0
    if backend == "rust":
        assert opt.stats["fused_steps"] == 20


@pytest.mark.parametrize("backend", ["rust", "torch"])
def test_lambda_and_a_constant_sigma(backend):
    data = batches(12)
    ref = make_model()
    mine = copy.deepcopy(ref)
    reference_rsam(ref, torch.optim.SGD(ref.parameters(), lr=0.05, foreach=False), data, 0.2, [0.02] * 12, 0.5, seed=4)
    opt = sharpness.RandomSAM(
        mine.parameters(), torch.optim.SGD, rho=0.2, sigma=0.02, lam=0.5, lr=0.05, seed=4, backend=backend
    )
    run(opt, mine, data, "closure")
    assert_close(ref, mine)


def test_the_defaults_follow_the_official_code():
    opt = sharpness.RandomSAM(make_model().parameters(), torch.optim.SGD, lr=0.1)
    assert opt.lam == 2.0
    assert 5e-4 <= opt.sigma <= 2.5e-3


@pytest.mark.parametrize("backend", ["rust", "torch"])
@pytest.mark.parametrize("api", ["closure", "three-call"])
def test_sigma_zero_is_sam_bit_for_bit(backend, api):
    data = batches(20)
    a, b = make_model(), make_model()
    run(sharpness.SAM(a.parameters(), torch.optim.SGD, rho=0.1, lr=0.05, momentum=0.9, backend=backend), a, data, "closure")
    opt = sharpness.RandomSAM(b.parameters(), torch.optim.SGD, sigma=0.0, rho=0.1, lr=0.05, momentum=0.9, backend=backend, seed=3)
    state = opt.generator.get_state()
    run(opt, b, data, api)
    assert_equal(a, b)
    assert torch.equal(opt.generator.get_state(), state)  # nothing drawn


def test_one_step_on_a_quadratic_in_closed_form():
    torch.manual_seed(6)
    n = 6
    q = torch.randn(n, n, dtype=torch.float64)
    A = q @ q.T + torch.eye(n, dtype=torch.float64)
    b = torch.randn(n, dtype=torch.float64)
    w0 = torch.randn(n, dtype=torch.float64)
    rho, sigma, lam, lr = 0.2, 0.3, 1.5, 0.05
    z = torch.randn(n, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    delta = sigma * z * w0.norm()  # a 1-D tensor: relative to its whole norm
    g_delta = A @ (w0 + delta) - b
    d = lam * g_delta + delta
    e = rho * d / d.norm()
    expected = w0 - lr * (A @ (w0 + e) - b)
    for backend in ("rust", "torch"):
        w = nn.Parameter(w0.clone())
        opt = sharpness.RandomSAM([w], torch.optim.SGD, rho=rho, sigma=sigma, lam=lam, lr=lr, seed=9, backend=backend)

        def closure():
            opt.zero_grad()
            loss = 0.5 * w @ A @ w - b @ w
            loss.backward()
            return loss

        opt.step(closure)
        torch.testing.assert_close(w.detach(), expected, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("backend", ["rust", "torch"])
def test_the_perturbation_has_norm_rho_from_w(backend):
    model = make_model().double()
    frozen = nn.Linear(3, 3).double()  # a group with sam_rho = 0: no noise, no ascent
    w0 = [p.detach().clone() for p in model.parameters()]
    f0 = [p.detach().clone() for p in frozen.parameters()]
    opt = sharpness.RandomSAM(
        [{"params": model.parameters()}, {"params": frozen.parameters(), "sam_rho": 0.0}],
        torch.optim.SGD, rho=0.07, sigma=0.05, lr=0.1, seed=1, backend=backend,
    )
    x, y = batches(1)[0]
    opt.add_noise()
    assert all(torch.equal(p, f) for p, f in zip(frozen.parameters(), f0))
    (loss_of(model, x.double(), y) + frozen(torch.ones(3, dtype=torch.float64)).sum()).backward()
    opt.first_step(zero_grad=True)
    e = [p.detach() - w for p, w in zip(model.parameters(), w0)]
    assert math.isclose(math.sqrt(flat_dot(e, e)), 0.07, rel_tol=1e-12)
    assert all(torch.equal(p, f) for p, f in zip(frozen.parameters(), f0))
    assert math.isfinite(opt.last_direction_norm) and opt.last_direction_norm > 0
    assert opt.restore()
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), w0))


@pytest.mark.parametrize("backend", ["rust", "torch"])
def test_a_groups_norm_weight_enters_the_norm_of_d(backend):
    model = make_model().double()
    w0 = [p.detach().clone() for p in model.parameters()]
    opt = sharpness.RandomSAM(
        [{"params": model.parameters(), "sam_norm_weight": 2.0}],
        torch.optim.SGD,
        rho=0.1,
        sigma=0.05,
        lr=0.1,
        seed=1,
        backend=backend,
    )
    x, y = batches(1)[0]
    opt.add_noise()
    loss_of(model, x.double(), y).backward()
    opt.first_step(zero_grad=True)
    e = [p.detach() - w for p, w in zip(model.parameters(), w0)]
    assert math.isclose(math.sqrt(flat_dot(e, e)), 0.1 / 2.0, rel_tol=1e-12)  # ‖d‖ counted twice
    opt.restore()


@pytest.mark.parametrize("backend", ["rust", "torch"])
def test_the_noise_is_filter_wise_and_relative(backend):
    """δ for a Conv2d weight (out, in, kh, kw) and a Linear weight (out, in) is σ·z·‖filter‖ per
    output unit (dim 0); scaling one output unit's weights scales its δ alone."""

    def noise(scale_row):
        torch.manual_seed(0)
        conv, lin = nn.Conv2d(3, 5, 3), nn.Linear(7, 4)
        with torch.no_grad():
            lin.weight[2] *= scale_row
            conv.weight[1] *= scale_row
        params = [conv.weight, conv.bias, lin.weight, lin.bias]
        w0 = [p.detach().clone() for p in params]
        opt = sharpness.RandomSAM(params, torch.optim.SGD, sigma=0.01, lr=0.1, seed=5, backend=backend)
        opt.add_noise()
        deltas = [p.detach() - w for p, w in zip(params, w0)]
        z = torch.randn(sum(p.numel() for p in params), generator=torch.Generator().manual_seed(5))
        expected = reference_delta(w0, z, 0.01)
        for d, ex in zip(deltas, expected):
            torch.testing.assert_close(d, ex, rtol=1e-4, atol=1e-8)  # w + δ − w: rounding of w + δ
        assert opt.restore()
        assert all(torch.equal(p, w) for p, w in zip(params, w0))
        return deltas

    plain, scaled = noise(1.0), noise(10.0)
    torch.testing.assert_close(scaled[2][2], 10 * plain[2][2], rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(scaled[0][1], 10 * plain[0][1], rtol=1e-4, atol=1e-8)
    for i in (0, 1, 3):
        torch.testing.assert_close(scaled[2][i], plain[2][i], rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(scaled[1], plain[1])  # the biases, untouched
    rows = plain[2].norm(dim=1) / (plain[2].norm() + 1e-30)
    assert rows.min() > 0  # every row noised


@pytest.mark.parametrize("backend", ["rust", "torch"])
def test_maximize_is_the_ascent_of_minus_l(backend):
    data = batches(8)
    a, b = make_model(), make_model()
    oa = sharpness.RandomSAM(
        a.parameters(), torch.optim.SGD, rho=0.1, sigma=0.02, lr=0.05, maximize=True, seed=2, backend=backend
    )
    ob = sharpness.RandomSAM(b.parameters(), torch.optim.SGD, rho=0.1, sigma=0.02, lr=0.05, seed=2, backend=backend)
    for x, y in data:
        for opt, model, sign in ((oa, a, 1.0), (ob, b, -1.0)):

            def closure(opt=opt, model=model, sign=sign):
                opt.zero_grad()
                loss = sign * loss_of(model, x, y)
                loss.backward()
                return loss

            opt.step(closure)
    assert_close(a, b)


@pytest.mark.parametrize("backend", ["rust", "torch"])
def test_state_dict_round_trip_carries_the_generator_and_sigma(backend):
    data = batches(14)
    build = lambda model, seed=7: sharpness.RandomSAM(  # noqa: E731
        model.parameters(), torch.optim.SGD, rho=0.05, sigma=0.02, lr=0.05, momentum=0.9, seed=seed, backend=backend
    )
    a = make_model()
    opt_a = build(a)
    run(opt_a, a, data[:6], "closure")
    opt_a.sigma = 0.03
    run(opt_a, a, data[6:], "closure")
    b = make_model()
    opt_b = build(b)
    run(opt_b, b, data[:6], "closure")
    opt_b.sigma = 0.03
    buf = io.BytesIO()
    torch.save({"model": b.state_dict(), "opt": opt_b.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed, fresh = make_model(seed=5), make_model(seed=5)
    for model, load_generator in ((resumed, True), (fresh, False)):
        opt = build(model, seed=99)  # another seed and σ: only the checkpoint can make them match
        model.load_state_dict(ckpt["model"])
        sd = copy.deepcopy(ckpt["opt"])
        if not load_generator:
            del sd["sam"]["generator"]
        opt.load_state_dict(sd)
        assert opt.sigma == 0.03
        run(opt, model, data[6:], "closure")
    assert_equal(a, resumed)
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), fresh.parameters()))


@pytest.mark.parametrize("backend", ["rust", "torch"])
def test_noise_is_undone_exactly_and_required(backend):
    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = sharpness.RandomSAM(model.parameters(), torch.optim.SGD, sigma=0.1, lr=0.1, backend=backend)
    opt.add_noise()
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
    with pytest.raises(RuntimeError, match="state_dict"):
        opt.state_dict()
    with pytest.raises(RuntimeError, match="add_noise"):
        opt.add_noise()
    assert opt.restore()
    assert not opt.restore()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    x, y = batches(1)[0]
    loss_of(model, x, y).backward()
    with pytest.raises(RuntimeError, match="add_noise"):
        opt.first_step()
    # undone after the first step too
    opt.zero_grad()
    opt.add_noise()
    loss_of(model, x, y).backward()
    opt.first_step(zero_grad=True)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert opt.restore()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))

    # a failing closure leaves the weights where they were
    def bad_closure():
        raise KeyError("boom")

    with pytest.raises(KeyError):
        opt.step(bad_closure)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    with pytest.raises(RuntimeError, match="perturbation_report"):
        opt.perturbation_report()


def test_bad_arguments():
    model = make_model()
    for sigma in (-1.0, float("nan"), float("inf"), True, "0.1"):
        with pytest.raises(ValueError, match="sigma"):
            sharpness.RandomSAM(model.parameters(), torch.optim.SGD, sigma=sigma, lr=0.1)
    for lam in (0.0, -2.0, float("inf"), float("nan"), False):
        with pytest.raises(ValueError, match="lam"):
            sharpness.RandomSAM(model.parameters(), torch.optim.SGD, lam=lam, lr=0.1)
    with pytest.raises(ValueError, match="adaptive"):
        sharpness.RandomSAM(model.parameters(), torch.optim.SGD, adaptive=True, lr=0.1)
    with pytest.raises(ValueError, match="exact"):
        sharpness.RandomSAM(model.parameters(), torch.optim.SGD, memory="subtract", lr=0.1)
    opt = sharpness.RandomSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="sigma"):
        opt.sigma = -0.5
    assert opt.sigma == 1.5e-3


@pytest.mark.parametrize("backend", ["rust", "torch"])
def test_a_non_finite_first_gradient_leaves_w(backend):
    data = batches(2)
    model = make_model()
    opt = sharpness.RandomSAM(model.parameters(), torch.optim.SGD, sigma=0.1, lr=0.1, backend=backend)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = data[0]
    opt.add_noise()
    (loss_of(model, x, y) * float("inf")).backward()
    opt.first_step(zero_grad=True)
    assert opt.stats["nonfinite_skips"] == 1
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # at w, not w + δ
    # the step is then the base optimizer's, with the gradient taken at w
    g = grads_at(copy.deepcopy(model), x, y)
    loss_of(model, x, y).backward()
    opt.second_step(zero_grad=True)
    for p, w, gi in zip(model.parameters(), before, g):
        torch.testing.assert_close(p.detach(), w - 0.1 * gi)
    run(opt, model, data[1:], "three-call")  # and training goes on
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("backend", ["rust", "torch"])
def test_a_non_finite_direction_leaves_w(backend):
    """‖g_δ‖ finite (summed in float64) but d = λ g_δ + δ overflows float32: no perturbation."""
    w = nn.Parameter(torch.ones(1))  # one element: ‖g_δ‖ = |g_δ| even where the norm is summed in float32
    opt = sharpness.RandomSAM([w], torch.optim.SGD, sigma=0.1, lr=1e-40, backend=backend)
    w0 = w.detach().clone()
    opt.add_noise()
    (w * 3e38).sum().backward()
    opt.first_step(zero_grad=True)
    assert math.isfinite(opt.last_grad_norm) and not math.isfinite(opt.last_direction_norm)
    assert opt.stats["nonfinite_skips"] == 1
    assert torch.equal(w.detach(), w0)
    (w * 1.0).sum().backward()
    opt.second_step(zero_grad=True)
    assert torch.isfinite(w).all()


def test_a_checkpoint_of_another_method_is_refused():
    """A RandomSAM loads only a RandomSAM's checkpoint (its σ): a plain SAM's is refused, and
    nothing changes."""
    model = make_model()
    opt = sharpness.RandomSAM(model.parameters(), torch.optim.SGD, sigma=0.02, lr=0.1)
    sam_dict = sharpness.SAM(make_model().parameters(), torch.optim.SGD, lr=0.1).state_dict()
    with pytest.raises(ValueError, match="RandomSAM"):
        opt.load_state_dict(sam_dict)
    assert opt.sigma == 0.02
    bad = opt.state_dict()
    bad["sam"]["state"]["sigma"] = -1.0
    with pytest.raises(ValueError, match="sigma"):
        opt.load_state_dict(bad)
    assert opt.sigma == 0.02


@pytest.mark.parametrize("front", ["torch", "numpy"])
def test_a_group_asking_for_asam_is_refused(front):
    """No adaptive (ASAM) form, whether asked for by the argument or by a group's key (a group's
    ``sam_adaptive`` would otherwise turn the ascent into ASAM's)."""
    if front == "torch":
        build = lambda groups: sharpness.RandomSAM(groups, torch.optim.SGD, lr=0.1)  # noqa: E731
        groups = [{"params": [nn.Parameter(torch.ones(2))]}, {"params": [nn.Parameter(torch.ones(2))], "sam_adaptive": True}]
    else:
        build = lambda groups: snp.RandomSAM(groups, lr=0.1)  # noqa: E731
        groups = [{"params": [np.ones(2)]}, {"params": [np.ones(2)], "sam_adaptive": True}]
    with pytest.raises(ValueError, match="adaptive"):
        build(groups)


# ================================ the numpy front ==================================================

STEPS = 20
PROBLEM = SoftmaxRegression(n_rows=48, n_in=5, n_classes=4, batch=24, stride=11, out_first=True)
make_problem, loss_and_grads = PROBLEM.make_problem, PROBLEM.loss_and_grads
batch_rows, grad_fn_for = PROBLEM.batch_rows, PROBLEM.grad_fn_for


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


def reference_delta_np(params, z, sigma):
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


def reference_rsam_np(X, labels, w, base, steps, rho, sigmas, lam, seed, dtype):
    """Per-array R-SAM in float64; z drawn as the class documents: one
    ``standard_normal(total size, dtype)`` per step (all arrays share one dtype here)."""
    X = X.astype(np.float64)
    w = [x.astype(np.float64) for x in w]
    rng = np.random.default_rng(seed)
    for t in range(steps):
        z = rng.standard_normal(sum(x.size for x in w), dtype=dtype)
        delta = reference_delta_np(w, z, sigmas[t])
        _, g = loss_and_grads(X, labels, [x + dx for x, dx in zip(w, delta)], batch_rows(t))
        d = [lam * gi + di for gi, di in zip(g, delta)]
        norm = math.sqrt(sum(float(np.sum(di * di)) for di in d))
        e = [rho * di / (norm + 1e-12) for di in d]
        _, g_s = loss_and_grads(X, labels, [x + ei for x, ei in zip(w, e)], batch_rows(t))
        w = base.step(w, g_s)
    return w


def nonfinite_skips(opt):
    return opt.state_dict()["sam"]["stats"].get("nonfinite_skips", 0)


# -- (a) against the reference --------------------------------------------------------------------------

NP_BASES = {
    "sgd": (lambda: SGDRef(0.1, momentum=0.9, weight_decay=1e-3), dict(base="sgd", lr=0.1, momentum=0.9, weight_decay=1e-3)),
    "adamw": (lambda: AdamWRef(1e-2, weight_decay=0.05), dict(base="adamw", lr=1e-2, weight_decay=0.05)),
}
TOL = {np.float32: dict(rtol=5e-5, atol=5e-6), np.float64: dict(rtol=1e-10, atol=1e-12)}


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("base", sorted(NP_BASES))
@pytest.mark.parametrize("api", ["step", "three-call"])
def test_numpy_matches_the_official_formula(base, dtype, api):
    X, labels, w = make_problem(dtype)
    ref, kw = NP_BASES[base]
    sigmas = cosine_sigmas(STEPS)
    expected = reference_rsam_np(X, labels, w, ref(), STEPS, 0.1, sigmas, 2.0, seed=123, dtype=dtype)
    opt = snp.RandomSAM(w, rho=0.1, seed=123, **kw)
    run_numpy(opt, X, labels, STEPS, sigmas=sigmas, api=api)
    assert_arrays(w, expected, **TOL[dtype])
    assert all(x.dtype == dtype for x in w)
    assert nonfinite_skips(opt) == 0 and opt.state_dict()["sam"]["state"]["step"] == STEPS
    # the noise matters: SAM (σ = 0) ends elsewhere
    sam = make_problem(dtype)[2]
    run_numpy(snp.SAM(sam, rho=0.1, **kw), X, labels, STEPS)
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(w, sam)) > 1e-4


def test_numpy_lambda_and_a_constant_sigma():
    X, labels, w = make_problem()
    expected = reference_rsam_np(X, labels, w, SGDRef(0.05), 12, 0.2, [0.02] * 12, 0.5, seed=4, dtype=np.float64)
    opt = snp.RandomSAM(w, rho=0.2, sigma=0.02, lam=0.5, lr=0.05, seed=4)
    run_numpy(opt, X, labels, 12)
    assert_arrays(w, expected)


def test_numpy_defaults_follow_the_official_code_and_the_torch_front():
    opt = snp.RandomSAM([np.zeros(3)])
    t = sharpness.RandomSAM([torch.nn.Parameter(torch.zeros(3))], torch.optim.SGD, lr=0.1)
    assert opt.lam == t.lam == 2.0
    assert opt.sigma == t.sigma == 1.5e-3
    assert "RandomSAM(sigma=0.0015, lam=2.0" in repr(opt)
    assert "RandomSAM(sigma=0.0015, lam=2.0" in repr(t)


# -- (b) σ = 0 is SAM ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("base", sorted(NP_BASES))
@pytest.mark.parametrize("api", ["step", "three-call"])
def test_numpy_sigma_zero_is_sam_bit_for_bit(base, api):
    X, labels, w = make_problem(np.float32)
    kw = NP_BASES[base][1]
    a, b = copies(w), copies(w)
    run_numpy(snp.SAM(a, rho=0.1, **kw), X, labels, STEPS)
    opt = snp.RandomSAM(b, rho=0.1, sigma=0.0, seed=3, **kw)
    state = copy.deepcopy(opt.generator.bit_generator.state)
    run_numpy(opt, X, labels, STEPS, api=api)
    assert_arrays(a, b, exact=True)
    assert opt.generator.bit_generator.state == state  # nothing drawn


def test_numpy_rho_zero_is_the_base_optimizer_and_draws_nothing():
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
def test_numpy_follows_the_torch_front_on_the_same_noise(base, dtype):
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


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("api", ["step", "three-call"])
def test_both_fronts_agree_on_a_trajectory_with_groups(dtype, api):
    """The same rule on both fronts (torch: backend="rust"), on the same gradients and the same
    draws, with two groups that differ in ρ, sam_norm_weight and maximize: the same weights, norms
    and counts after each step."""
    X, labels, w = make_problem(dtype)
    tparams = torch_params(w)
    np_groups = [
        {"params": [w[0]], "sam_norm_weight": 2.0},
        {"params": [w[1]], "sam_rho": 0.03, "maximize": True},
    ]
    t_groups = [
        {"params": [tparams[0]], "sam_norm_weight": 2.0},
        {"params": [tparams[1]], "sam_rho": 0.03, "maximize": True},
    ]
    opt = snp.RandomSAM(np_groups, rho=0.1, sigma=0.02, lam=1.5, lr=0.1, momentum=0.9)
    opt.generator = TorchNoise(3)
    topt = sharpness.RandomSAM(
        t_groups, torch.optim.SGD, rho=0.1, sigma=0.02, lam=1.5, lr=0.1, momentum=0.9, seed=3, backend="rust"
    )
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-11, atol=1e-13)
    for t in range(6):
        fn = grad_fn_for(X, labels, t)
        if api == "step":
            opt.step(fn)
            topt.step(torch_closure(tparams, fn))
        else:
            opt.add_noise()
            topt.add_noise()
            assert_arrays(w, tparams, **tol)  # the same w + δ
            closure = torch_closure(tparams, fn)
            assert opt.first_step(fn(opt.params)[1])
            closure()
            assert topt.first_step()
            assert_arrays(w, tparams, **tol)  # the same w + e
            opt.second_step(fn(opt.params)[1])
            closure()
            topt.second_step()
        assert_arrays(w, tparams, **tol)
        assert opt.last_grad_norm == pytest.approx(topt.last_grad_norm, rel=1e-5)
        assert opt.last_direction_norm == pytest.approx(topt.last_direction_norm, rel=1e-5)
    assert opt.stats["steps"] == topt.stats["steps"]


# -- (d) ‖e‖ = ρ, the noise's layout and draw order -----------------------------------------------------------


def test_numpy_the_perturbation_has_norm_rho_from_w():
    X, labels, w = make_problem()
    w0 = copies(w)
    opt = snp.RandomSAM(w, rho=0.07, sigma=0.05, lr=0.1, seed=1)
    opt.add_noise()
    assert opt.noised and not opt.perturbed
    grads = loss_and_grads(X, labels, w)[1]
    kept = copies(grads)
    assert opt.first_step(grads) is True
    assert_arrays(grads, kept, exact=True)  # the caller's gradients are left alone
    assert opt.perturbed and not opt.noised
    e = [a - b for a, b in zip(w, w0)]
    assert math.isclose(math.sqrt(sum(float(np.sum(x * x)) for x in e)), 0.07, rel_tol=1e-10)  # rounding of w + e − w
    d_norm = opt.last_direction_norm
    assert math.isfinite(d_norm) and d_norm > 0
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


def test_numpy_the_noise_is_filter_wise_and_relative():
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
    assert_arrays(plain, reference_delta_np(plain_params, z, 0.01), rtol=1e-6, atol=1e-14)  # rounding of w + δ
    np.testing.assert_allclose(scaled[2][2], 10 * plain[2][2], rtol=1e-6)
    np.testing.assert_allclose(scaled[0][1], 10 * plain[0][1], rtol=1e-6)
    for i in (0, 1, 3):
        np.testing.assert_allclose(scaled[2][i], plain[2][i], rtol=1e-6)
    np.testing.assert_array_equal(scaled[1], plain[1])  # biases: their own norm
    np.testing.assert_array_equal(scaled[3], plain[3])
    assert np.all(np.linalg.norm(plain[2], axis=1) > 0)  # every row noised


def test_numpy_the_draw_order_with_mixed_dtypes_and_empty_arrays():
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
    ref32 = reference_delta_np([W32, V32], z32, 0.1)
    ref64 = reference_delta_np([b64], z64, 0.1)
    assert got[2].shape == (0, 2)
    assert_arrays([got[0], got[3]], ref32, rtol=1e-5, atol=1e-7)
    assert_arrays([got[1]], ref64, rtol=1e-12, atol=1e-15)


def test_numpy_a_zero_filter_gets_no_noise():
    W = np.ones((3, 4))
    W[1] = 0.0
    b = np.zeros(3)
    delta = _noise([W, b], 0.5, 0)
    assert np.all(delta[0][1] == 0) and np.all(delta[0][[0, 2]] != 0)
    assert np.all(delta[1] == 0)


def test_numpy_maximize_is_the_ascent_of_minus_l():
    X, labels, w = make_problem()
    a, b = copies(w), copies(w)
    oa = snp.RandomSAM(a, rho=0.1, sigma=0.02, lr=0.05, maximize=True, seed=2)
    ob = snp.RandomSAM(b, rho=0.1, sigma=0.02, lr=0.05, seed=2)
    for t in range(8):
        oa.step(grad_fn_for(X, labels, t))
        ob.step(grad_fn_for(X, labels, t, scale=-1.0))
    assert_arrays(a, b, rtol=1e-12, atol=1e-14)


# -- (e) checkpoints ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("base", sorted(NP_BASES))
def test_numpy_state_dict_round_trip_mid_run(base):
    kw = dict(NP_BASES[base][1], rho=0.1, sigma=0.02)
    X, labels, w0 = make_problem(np.float32)
    sigmas = [0.02] * 6 + [0.03] * 8
    a = copies(w0)
    run_numpy(snp.RandomSAM(a, seed=3, **kw), X, labels, 14, sigmas=sigmas)
    b = copies(w0)
    opt_b = snp.RandomSAM(b, seed=3, **kw)
    run_numpy(opt_b, X, labels, 6, sigmas=sigmas)
    opt_b.sigma = 0.03
    sd = copy.deepcopy(opt_b.state_dict())
    assert sd["sam"]["state"]["sigma"] == 0.03
    snapshot = copies(b)
    run_numpy(opt_b, X, labels, 2, start=6)  # later steps leave the saved dict alone
    results = {}
    for load_generator in (True, False):
        c = copies(snapshot)
        opt_c = snp.RandomSAM(c, **dict(kw, seed=99, sigma=0.5))  # only the checkpoint can match
        state = copy.deepcopy(sd)
        if not load_generator:
            del state["sam"]["generator"]  # then the generator is left as it is
        opt_c.load_state_dict(state)
        assert opt_c.sigma == 0.03
        run_numpy(opt_c, X, labels, 8, start=6)
        results[load_generator] = c
    assert_arrays(a, results[True], exact=True)
    assert any(not np.array_equal(x, y) for x, y in zip(a, results[False]))


def test_numpy_load_state_dict_checks_its_input():
    w = [np.zeros((2, 3)), np.zeros(2)]
    opt = snp.RandomSAM(w, seed=0)
    sd = opt.state_dict()
    with pytest.raises(ValueError, match="RandomSAM"):
        opt.load_state_dict(snp.SAM([np.zeros((2, 3)), np.zeros(2)]).state_dict())
    bad = copy.deepcopy(sd)
    bad["sam"]["state"]["sigma"] = -1.0
    with pytest.raises(ValueError, match="sigma"):
        opt.load_state_dict(bad)
    bad = copy.deepcopy(sd)
    bad["sam"]["generator"] = {"bit_generator": "MT19937", "state": {}}
    with pytest.raises(ValueError, match="PCG64"):
        opt.load_state_dict(bad)
    with pytest.raises(TypeError, match="dict"):
        opt.load_state_dict([sd])
    opt.load_state_dict(sd)


def test_numpy_a_generator_given_as_seed_round_trips():
    """A Generator given as ``seed`` is used as it is, whatever its bit generator, and its state
    goes through a checkpoint (checked against its own kind, not numpy's default PCG64)."""
    X, labels, w0 = make_problem()
    a = copies(w0)
    opt_a = snp.RandomSAM(a, sigma=0.05, lr=0.1, momentum=0.9, seed=np.random.Generator(np.random.MT19937(4)))
    run_numpy(opt_a, X, labels, 3)
    sd = copy.deepcopy(opt_a.state_dict())
    b = copies(a)
    run_numpy(opt_a, X, labels, 3, start=3)
    opt_b = snp.RandomSAM(b, sigma=0.05, lr=0.1, momentum=0.9, seed=np.random.Generator(np.random.MT19937(0)))
    opt_b.load_state_dict(sd)
    run_numpy(opt_b, X, labels, 3, start=3)
    assert_arrays(a, b, exact=True)


# -- (f) bad arguments, misuse, non-finite values -------------------------------------------------------------


def test_numpy_bad_arguments():
    w = [np.zeros(3)]
    for sigma in (-1.0, float("nan"), float("inf"), True, "0.1", None):
        with pytest.raises(ValueError, match="sigma"):
            snp.RandomSAM(w, sigma=sigma)
    for lam in (0.0, -2.0, float("inf"), float("nan"), False, "2"):
        with pytest.raises(ValueError, match="lam"):
            snp.RandomSAM(w, lam=lam)
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


def test_numpy_protocol_errors_and_exact_undo():
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
    assert opt.state_dict()["sam"]["state"]["step"] == 0
    opt.step(grad_fn_for(X, labels, 0))  # and it still trains
    assert opt.state_dict()["sam"]["state"]["step"] == 1


def test_numpy_a_non_finite_first_gradient_leaves_w():
    X, labels, w = make_problem()
    opt = snp.RandomSAM(w, sigma=0.1, lr=0.1, seed=0)
    w0 = copies(w)
    opt.add_noise()
    grads = loss_and_grads(X, labels, w)[1]
    grads[0][0, 0] = np.inf
    assert opt.first_step(grads) is True  # second_step still follows (the base step)
    assert not math.isfinite(opt.last_grad_norm) and not math.isfinite(opt.last_direction_norm)
    assert_arrays(w, w0, exact=True)  # at w, not w + δ
    # the step is then the base optimizer's, with the gradient taken at w
    g = loss_and_grads(X, labels, w)[1]
    opt.second_step(g)
    assert_arrays(w, [a - 0.1 * b for a, b in zip(w0, g)])
    assert nonfinite_skips(opt) == 1
    run_numpy(opt, X, labels, 2)  # and training goes on
    assert all(np.isfinite(x).all() for x in w)


def test_numpy_a_nan_first_gradient_leaves_w_in_step():
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
    assert nonfinite_skips(opt) == 1


def test_numpy_a_non_finite_direction_leaves_w():
    """‖g_δ‖ is finite (summed in float64) but d = λ g_δ + δ overflows float32: no perturbation."""
    w = np.ones(1, np.float32)
    opt = snp.RandomSAM([w], sigma=0.1, lr=1e-40, seed=0)
    w0 = w.copy()
    opt.add_noise()
    opt.first_step([np.full(1, 3e38, np.float32)])
    assert math.isfinite(opt.last_grad_norm) and not math.isfinite(opt.last_direction_norm)
    np.testing.assert_array_equal(w, w0)
    opt.second_step([np.ones(1, np.float32)])
    assert np.isfinite(w).all()
    assert nonfinite_skips(opt) == 1
