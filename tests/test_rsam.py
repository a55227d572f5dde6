"""Random SAM against a per-tensor reference written here from the authors' official code
(RSAM-Optimizer/R-SAM, vit_jax/train.py: filter-wise relative noise δ = σ·z·‖filter‖, the first
gradient at w + δ, the direction d = λ g_δ + δ, the ascent ρ d/‖d‖ taken from w), the σ = 0 limit
(SAM bit for bit), a closed form on a quadratic, ‖e‖ = ρ, the noise's layout, checkpoints that
carry the generator and σ, and the non-finite and misuse paths."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from _family import BASES, assert_close, assert_equal, batches, flat_dot, grads_at, loss_of, make_model
from torch import nn

import sharpness


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
        mine.parameters(), torch.optim.SGD, rho=0.2, sigma=0.02, lambda_=0.5, lr=0.05, seed=4, backend=backend
    )
    run(opt, mine, data, "closure")
    assert_close(ref, mine)


def test_the_defaults_follow_the_official_code():
    opt = sharpness.RandomSAM(make_model().parameters(), torch.optim.SGD, lr=0.1)
    assert opt.lambda_ == 2.0
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
        opt = sharpness.RandomSAM([w], torch.optim.SGD, rho=rho, sigma=sigma, lambda_=lam, lr=lr, seed=9, backend=backend)

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
        with pytest.raises(ValueError, match="lambda_"):
            sharpness.RandomSAM(model.parameters(), torch.optim.SGD, lambda_=lam, lr=0.1)
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
