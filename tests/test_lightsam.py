"""LightSAM against a per-tensor reference written here from the paper (Cheng et al., 2025,
arXiv:2505.24399), its reducing limits, a closed-form first step, checkpoints, and the paper's
claim: it converges for any ρ and η where SAM with SGD does not."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _family import assert_equal, batches, grads_at, loss_of, make_model, round_trip_mid_run, run
from torch import nn

import sharpness
import sharpness.numpy

BACKENDS = ["rust", "torch"]
VARIANTS = ["adagrad-norm", "adagrad", "adam"]


def sq(gs):
    return sum(float((g.double() ** 2).sum()) for g in gs)


def reference_lightsam(model, data, lr, rho, variant, eps=1e-8, betas=(0.9, 0.999)):
    """Per-tensor LightSAM as written in the paper: accumulate, then use; u₀ = v₀ = ε²."""
    params = list(model.parameters())
    b1, b2 = betas
    u_norm = v_norm = eps**2
    U = [torch.full_like(p, eps**2) for p in params]
    V = [torch.full_like(p, eps**2) for p in params]
    M = [torch.zeros_like(p) for p in params]
    N = [torch.zeros_like(p) for p in params]
    for x, y in data:
        s = grads_at(model, x, y)
        theta = [p.detach().clone() for p in params]
        with torch.no_grad():
            for i, p in enumerate(params):
                if variant == "adagrad-norm":
                    if i == 0:
                        u_norm += sq(s)
                    p.add_(s[i] * (rho / math.sqrt(u_norm)))
                elif variant == "adagrad":
                    U[i] += s[i] * s[i]
                    p.add_(rho * s[i] / U[i].sqrt())
                else:
                    M[i] = b1 * M[i] + (1 - b1) * s[i]
                    U[i] = b2 * U[i] + (1 - b2) * s[i] * s[i]
                    p.add_(rho * M[i] / U[i].sqrt())
        g = grads_at(model, x, y)
        with torch.no_grad():
            if variant == "adagrad-norm":
                v_norm += sq(g)
            for i, p in enumerate(params):
                p.copy_(theta[i])
                if variant == "adagrad-norm":
                    p.sub_(g[i] * (lr / math.sqrt(v_norm)))
                elif variant == "adagrad":
                    V[i] += g[i] * g[i]
                    p.sub_(lr * g[i] / V[i].sqrt())
                else:
                    N[i] = b1 * N[i] + (1 - b1) * g[i]
                    V[i] = b2 * V[i] + (1 - b2) * g[i] * g[i]
                    p.sub_(lr * N[i] / V[i].sqrt())


def assert_close(model_a, model_b, rtol=1e-4, atol=1e-6):
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_the_paper_over_25_steps(backend, variant):
    data = batches(25)
    lr, rho = (0.05, 0.2) if variant != "adam" else (0.01, 0.05)
    ref = make_model()
    reference_lightsam(ref, data, lr, rho, variant)
    model = make_model()
    opt = sharpness.LightSAM(model.parameters(), lr=lr, rho=rho, variant=variant, backend=backend)
    run(opt, model, data)
    assert_close(model, ref)
    moved = sum(float((a - b).detach().abs().sum()) for a, b in zip(model.parameters(), make_model().parameters()))
    assert moved > 1e-2  # it did train


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_calls_equal_the_closure(backend):
    data = batches(6)
    a, b = make_model(), make_model()
    oa = sharpness.LightSAM(a.parameters(), lr=0.1, rho=0.1, variant="adagrad", backend=backend)
    ob = sharpness.LightSAM(b.parameters(), lr=0.1, rho=0.1, variant="adagrad", backend=backend)
    run(oa, a, data)
    for x, y in data:
        loss_of(b, x, y).backward()
        assert ob.first_step(zero_grad=True)
        loss_of(b, x, y).backward()
        ob.second_step(zero_grad=True)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rho_zero_adagrad_is_torch_adagrad(backend):
    """ρ = 0: the AdaGrad form is AdaGrad with the accumulator at ε² and no ε added."""
    data = batches(20)
    a, b = make_model(), make_model()
    opt = sharpness.LightSAM(a.parameters(), lr=0.1, rho=0.0, variant="adagrad", eps=1e-3, backend=backend)
    run(opt, a, data)
    ref = torch.optim.Adagrad(b.parameters(), lr=0.1, initial_accumulator_value=1e-6, eps=0.0)
    for x, y in data:
        ref.zero_grad()
        loss_of(b, x, y).backward()
        ref.step()
    assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rho_zero_adagrad_norm_is_adagrad_norm(backend):
    data = batches(20)
    a, b = make_model(), make_model()
    opt = sharpness.LightSAM(a.parameters(), lr=0.3, rho=0.0, backend=backend)
    run(opt, a, data)
    v = 1e-16
    for x, y in data:
        g = grads_at(b, x, y)
        v += sq(g)
        with torch.no_grad():
            for p, gi in zip(b.parameters(), g):
                p.sub_(gi * (0.3 / math.sqrt(v)))
    assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_step_on_a_quadratic_in_closed_form(backend):
    """L = ½‖θ‖²: s = θ₀, w̃ = θ₀(1 + ρ/√(ε²+‖θ₀‖²)), θ₁ = θ₀ − η w̃/√(ε²+‖w̃‖²)."""
    theta0 = torch.tensor([3.0, -4.0], dtype=torch.float64)  # ‖θ₀‖ = 5
    w = nn.Parameter(theta0.clone())
    rho, lr, eps = 2.0, 0.5, 1e-3
    opt = sharpness.LightSAM([w], lr=lr, rho=rho, eps=eps, backend=backend)
    opt.step(lambda: (opt.zero_grad(), (0.5 * (w * w).sum()).backward())[0])
    w_tilde = theta0 * (1 + rho / math.sqrt(eps**2 + 25.0))
    expected = theta0 - lr * w_tilde / math.sqrt(eps**2 + float((w_tilde**2).sum()))
    torch.testing.assert_close(w.detach(), expected, rtol=1e-14, atol=0)
    assert opt.sam_state["u"] == pytest.approx(eps**2 + 25.0, rel=1e-15)
    assert opt.sam_state["v"] == pytest.approx(eps**2 + float((w_tilde**2).sum()), rel=1e-15)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_state_dict_round_trip_mid_run(backend, variant):
    data = batches(16)
    a, oa, b, ob = round_trip_mid_run(
        lambda params: sharpness.LightSAM(params, lr=0.05, rho=0.1, variant=variant, backend=backend), run, data, 8
    )
    assert_equal(a, b)
    if variant == "adagrad-norm":
        assert ob.sam_state["u"] == oa.sam_state["u"] and ob.sam_state["v"] == oa.sam_state["v"]
    else:
        assert set(ob.state[next(b.parameters())]) == set(oa.state[next(a.parameters())])


def test_state_dict_refused_while_perturbed_and_weights_restored_exactly():
    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = sharpness.LightSAM(model.parameters(), lr=0.0, rho=1.0, variant="adam")
    (x, y), = batches(1)
    loss_of(model, x, y).backward()
    opt.first_step(zero_grad=True)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
    with pytest.raises(RuntimeError):
        opt.state_dict()
    assert opt.restore()
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)


def test_bad_arguments():
    params = make_model().parameters()
    with pytest.raises(ValueError):
        sharpness.LightSAM(params, variant="sgd")
    with pytest.raises(ValueError):
        sharpness.LightSAM(make_model().parameters(), eps=0.0)
    with pytest.raises(ValueError):
        sharpness.LightSAM(make_model().parameters(), rho=-1.0)
    # its ascent is its own adaptive step: no ASAM form, on either front (nor a base optimizer)
    with pytest.raises(ValueError, match="adaptive"):
        sharpness.LightSAM(make_model().parameters(), adaptive=True)
    with pytest.raises(ValueError, match="adaptive"):
        sharpness.numpy.LightSAM([np.zeros(3)], adaptive=True)
    with pytest.raises(TypeError, match="base"):
        sharpness.LightSAM(make_model().parameters(), torch.optim.SGD)


# -- the paper's claim: any ρ and η converge on a smooth convex problem ------------------------------------

GRID = [1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0]


def least_squares():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(40, 10, generator=g, dtype=torch.float64)
    b = A @ torch.randn(10, generator=g, dtype=torch.float64) + 0.3 * torch.randn(40, generator=g, dtype=torch.float64)
    sol = torch.linalg.lstsq(A, b.unsqueeze(1)).solution.squeeze(1)
    loss = lambda w: 0.5 * ((A @ w - b) ** 2).mean()  # noqa: E731  λ_max(AᵀA/40) ≈ 2.1
    return loss, float(loss(sol)), float(loss(torch.zeros(10, dtype=torch.float64)))


def excess_after(make, steps):
    """(L(w_T) − L*)/(L(w_0) − L*), inf once the iterate blows up."""
    loss, best, start = least_squares()
    w = nn.Parameter(torch.zeros(10, dtype=torch.float64))
    opt = make([w])

    def closure():
        opt.zero_grad()
        value = loss(w)
        value.backward()
        return value.detach()

    for _ in range(steps):
        if not math.isfinite(float(opt.step(closure))):
            return math.inf
    value = float(loss(w.detach()))
    return (value - best) / (start - best) if math.isfinite(value) else math.inf


@pytest.mark.parametrize("rho", GRID)
def test_lightsam_converges_for_every_rho_and_lr(rho):
    for lr in GRID:
        excess = excess_after(lambda p: sharpness.LightSAM(p, lr=lr, rho=rho), 150)
        assert math.isfinite(excess) and excess < 1.0, (rho, lr, excess)  # no blow-up, progress
        if lr >= 1.0:
            assert excess < 1e-2, (rho, lr, excess)  # near the optimum (smaller lr: slower)
    if rho not in (GRID[0], GRID[-1]):
        return
    for variant in ("adagrad", "adam"):  # the other forms, at the corners of the grid
        for lr in (GRID[0], GRID[-1]):
            excess = excess_after(lambda p: sharpness.LightSAM(p, lr=lr, rho=rho, variant=variant), 150)
            assert math.isfinite(excess), (variant, rho, lr, excess)


def test_sam_with_sgd_diverges_where_lightsam_does_not():
    """SAM + SGD: η ≥ 1 > 2/λ_max blows up for every ρ; a large ρ keeps it far from the
    optimum. LightSAM converges at those very settings (the test above)."""
    for rho in (1e-3, 1.0, 100.0):
        for lr in (1.0, 10.0, 100.0):
            excess = excess_after(lambda p: sharpness.SAM(p, torch.optim.SGD, rho=rho, lr=lr), 150)
            assert not excess < 1.0, (rho, lr, excess)
    assert excess_after(lambda p: sharpness.SAM(p, torch.optim.SGD, rho=100.0, lr=0.1), 150) > 1.0
    assert excess_after(lambda p: sharpness.SAM(p, torch.optim.SGD, rho=1e-3, lr=0.1), 150) < 1e-3  # the tuned case


# -- the numpy front ----------------------------------------------------------------------------------


def numpy_grad_fn(model, x, y):
    """grad_fn(params) for the numpy front: the model's loss and gradients at ``params``."""

    def grad_fn(params):
        with torch.no_grad():
            for p, a in zip(model.parameters(), params):
                p.copy_(torch.from_numpy(a))
        g = grads_at(model, x, y)
        return float(loss_of(model, x, y).detach()), [gi.numpy() for gi in g]

    return grad_fn


@pytest.mark.parametrize("variant", VARIANTS)
def test_numpy_front_matches_the_paper(variant):
    from sharpness.numpy import LightSAM as NumpyLightSAM

    data = batches(20)
    lr, rho = (0.05, 0.2) if variant != "adam" else (0.01, 0.05)
    ref = make_model().double()
    reference_lightsam(ref, [(x.double(), y) for x, y in data], lr, rho, variant)
    model = make_model().double()
    params = [p.detach().numpy().copy() for p in model.parameters()]
    opt = NumpyLightSAM(params, lr=lr, rho=rho, variant=variant)
    for x, y in data[:10]:
        opt.step(numpy_grad_fn(model, x.double(), y))
    sd = opt.state_dict()
    saved = [a.copy() for a in params]
    for x, y in data[10:]:
        opt.step(numpy_grad_fn(model, x.double(), y))
    for a, q in zip(params, ref.parameters()):
        np_ref = q.detach().numpy()
        assert abs(a - np_ref).max() <= 1e-10 * max(1.0, abs(np_ref).max())
    # a checkpoint taken mid-run resumes exactly
    resumed = [a.copy() for a in saved]
    opt2 = NumpyLightSAM(resumed, lr=lr, rho=rho, variant=variant)
    opt2.load_state_dict(sd)
    for x, y in data[10:]:
        opt2.step(numpy_grad_fn(model, x.double(), y))
    for a, b in zip(params, resumed):
        assert (a == b).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["adagrad-norm", "adagrad"])
def test_groups_with_their_own_lr_and_rho_and_a_parameter_without_gradient(backend, variant):
    """Per-group ρ and η; a parameter that gets no gradient is left alone, state included."""
    data = batches(12)
    ref, model = make_model(), make_model()
    unused_ref, unused = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    lrs, rhos = (0.05, 0.2), (0.3, 0.0)
    # the reference: the paper's step with per-group η, ρ (global accumulators for AdaGrad-Norm)
    params = list(ref.parameters())
    split = 2  # the first Linear is group 0, the rest group 1
    eps2 = 1e-16
    u = v = eps2
    U = [torch.full_like(p, eps2) for p in params]
    V = [torch.full_like(p, eps2) for p in params]
    for x, y in data:
        s = grads_at(ref, x, y)
        theta = [p.detach().clone() for p in params]
        with torch.no_grad():
            u += sq(s)
            for i, p in enumerate(params):
                rho = rhos[0 if i < split else 1]
                if variant == "adagrad-norm":
                    p.add_(s[i] * (rho / math.sqrt(u)))
                else:
                    U[i] += s[i] * s[i]
                    p.add_(rho * s[i] / U[i].sqrt())
        g = grads_at(ref, x, y)
        with torch.no_grad():
            v += sq(g)
            for i, p in enumerate(params):
                lr = lrs[0 if i < split else 1]
                p.copy_(theta[i])
                if variant == "adagrad-norm":
                    p.sub_(g[i] * (lr / math.sqrt(v)))
                else:
                    V[i] += g[i] * g[i]
                    p.sub_(lr * g[i] / V[i].sqrt())
    groups = [
        {"params": list(model[0].parameters()), "lr": lrs[0], "sam_rho": rhos[0]},
        {"params": list(model[2].parameters()) + list(model[4].parameters()) + [unused], "lr": lrs[1], "sam_rho": rhos[1]},
    ]
    opt = sharpness.LightSAM(groups, variant=variant, backend=backend)
    run(opt, model, data)
    assert_close(model, ref)
    assert torch.equal(unused, unused_ref)
    if variant == "adagrad":
        assert "lightsam_v" not in opt.state[unused] or torch.equal(opt.state[unused]["lightsam_v"], torch.full((3,), 1e-16))


def np_problem(seed=0):
    """A small non-convex problem with hand-written gradients (pred = tanh(X W) v), float32."""
    rng = np.random.default_rng(seed)
    X, y = rng.normal(size=(40, 4)).astype(np.float32), rng.normal(size=40).astype(np.float32)
    W, v = (0.5 * rng.normal(size=(4, 3))).astype(np.float32), (0.5 * rng.normal(size=3)).astype(np.float32)

    def grad_fn_for(t):
        rows = np.arange(40)[(t * 7) % 40 :][:20] if (t * 7) % 40 <= 20 else np.arange(20)

        def grad_fn(params):
            W, v = params
            h = np.tanh(X[rows] @ W)
            r = h @ v - y[rows]
            dW = X[rows].T @ (np.outer(r, v) / len(r) * (1 - h * h))
            return float(0.5 * np.mean(r * r)), [dW.astype(np.float32), (h.T @ r / len(r)).astype(np.float32)]

        return grad_fn

    return grad_fn_for, [W, v]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("api", ["step", "two-call"])
def test_both_fronts_run_the_same_rule_on_the_same_gradients(variant, api):
    """The numpy front and the torch front (``backend="rust"``) given the same gradients take the
    same steps, per-group ρ, η and β included (the same rule, written once)."""
    from sharpness.numpy import LightSAM as NumpyLightSAM

    grad_fn_for, w = np_problem()
    tparams = [nn.Parameter(torch.from_numpy(a.copy())) for a in w]
    settings = dict(variant=variant, eps=1e-4)
    groups = [{"lr": 0.05, "sam_rho": 0.2}, {"lr": 0.02, "sam_rho": 0.0, "betas": (0.8, 0.99)}]
    opt = NumpyLightSAM([{"params": [a], **g} for a, g in zip(w, groups)], **settings)
    topt = sharpness.LightSAM([{"params": [p], **g} for p, g in zip(tparams, groups)], backend="rust", **settings)
    for t in range(20):
        fn = grad_fn_for(t)

        def closure(fn=fn):
            loss, grads = fn([p.detach().numpy() for p in tparams])
            for p, g in zip(tparams, grads):
                p.grad = torch.from_numpy(g.copy())
            return torch.tensor(loss)

        if api == "step":
            opt.step(fn)
            topt.step(closure)
        else:
            assert opt.first_step(fn(w)[1])
            opt.second_step(fn(w)[1])
            closure()
            assert topt.first_step()
            closure()
            topt.second_step()
    # Not bit for bit: torch's CPU sqrt (vectorised) is not correctly rounded (1 ulp off numpy's on
    # about one float32 in six), and the per-coordinate forms divide by √u, √v.
    for a, p in zip(w, tparams):
        np.testing.assert_allclose(a, p.detach().numpy(), rtol=1e-4, atol=1e-6)
    assert opt.sam_state.keys() == topt.sam_state.keys()
    for key, value in opt.sam_state.items():
        assert value == pytest.approx(topt.sam_state[key], rel=1e-6)
