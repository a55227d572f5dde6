"""AdaSAM against a per-tensor reference written here from the paper (Sun et al., 2023,
arXiv:2303.00565, Algorithm 1), its ρ = 0 limit, a closed-form first step, per-group settings and
checkpoints; on the numpy front too (the same rule), against a per-array reference and against the
torch front on the same gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _family import assert_equal, batches, grads_at, loss_of, make_model, round_trip_mid_run, run
from _numpy_family import SoftmaxRegression, add, assert_arrays, copies, norm, torch_closure, torch_params
from torch import nn

import sharpness
from sharpness import numpy as snp

BACKENDS = ["rust", "torch"]


def reference_adasam(model, data, lr, rho, betas=(0.9, 0.999), eps=1e-8, per_param=None):
    """δ = ρ s/‖s‖; g = ∇L(x+δ); m, v EMAs; v̂ = max(v̂, v) from ε²; x ← x − γ m/√v̂.
    ``per_param``: one ``(lr, betas)`` per parameter instead (parameter groups of their own)."""
    params = list(model.parameters())
    per_param = per_param or [(lr, betas)] * len(params)
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    vhat = [torch.full_like(p, eps**2) for p in params]
    for x, y in data:
        s = grads_at(model, x, y)
        norm = math.sqrt(sum(float((si.double() ** 2).sum()) for si in s))
        theta = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, si in zip(params, s):
                p.add_(si * (rho / (norm + 1e-12)))
        g = grads_at(model, x, y)
        with torch.no_grad():
            for i, p in enumerate(params):
                step_size, (b1, b2) = per_param[i]
                p.copy_(theta[i])
                m[i] = b1 * m[i] + (1 - b1) * g[i]
                v[i] = b2 * v[i] + (1 - b2) * g[i] * g[i]
                vhat[i] = torch.maximum(vhat[i], v[i])
                p.sub_(step_size * m[i] / vhat[i].sqrt())


def assert_close(a, b, rtol=1e-4, atol=1e-6):
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rho", [0.05, 0.0])
def test_matches_the_paper_over_25_steps(backend, rho):
    """ρ = 0 is the AMSGrad-style update alone (no bias correction, ε as v̂'s floor)."""
    data = batches(25)
    ref = make_model()
    reference_adasam(ref, data, lr=0.01, rho=rho)
    model = make_model()
    opt = sharpness.AdaSAM(model.parameters(), lr=0.01, rho=rho, backend=backend)
    run(opt, model, data)
    assert_close(model, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eps_floor_and_betas(backend):
    """A large ε (floor of v̂) and other betas: the floor is used while v < ε²."""
    data = batches(20)
    ref = make_model()
    reference_adasam(ref, data, lr=0.02, rho=0.1, betas=(0.5, 0.9), eps=0.05)
    model = make_model()
    opt = sharpness.AdaSAM(model.parameters(), lr=0.02, rho=0.1, betas=(0.5, 0.9), eps=0.05, backend=backend)
    run(opt, model, data)
    assert_close(model, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_step_on_a_quadratic_in_closed_form(backend):
    """L = ½‖x‖², x₀ = (3, −4): g = x₀(1 + ρ/5); m = (1−β₁)g; v = (1−β₂)g² > ε²;
    x₁ = x₀ − γ(1−β₁)/√(1−β₂)·sign(g)."""
    x0 = torch.tensor([3.0, -4.0], dtype=torch.float64)
    w = nn.Parameter(x0.clone())
    opt = sharpness.AdaSAM([w], lr=0.1, rho=0.5, betas=(0.9, 0.99), backend=backend)
    opt.step(lambda: (opt.zero_grad(), (0.5 * (w * w).sum()).backward())[0])
    expected = x0 - 0.1 * (1 - 0.9) / math.sqrt(1 - 0.99) * torch.sign(x0)
    torch.testing.assert_close(w.detach(), expected, rtol=1e-14, atol=1e-15)
    g = x0 * (1 + 0.5 / 5.0)
    torch.testing.assert_close(opt.state[w]["adasam_vmax"], (1 - 0.99) * g * g, rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_calls_equal_the_closure_and_restore_is_exact(backend):
    data = batches(6)
    a, b = make_model(), make_model()
    oa = sharpness.AdaSAM(a.parameters(), lr=0.01, rho=0.1, backend=backend)
    ob = sharpness.AdaSAM(b.parameters(), lr=0.01, rho=0.1, backend=backend)
    run(oa, a, data)
    for x, y in data:
        loss_of(b, x, y).backward()
        ob.first_step(zero_grad=True)
        loss_of(b, x, y).backward()
        ob.second_step(zero_grad=True)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    c = make_model()
    before = [p.detach().clone() for p in c.parameters()]
    oc = sharpness.AdaSAM(c.parameters(), lr=0.0, rho=0.5, backend=backend)
    run(oc, c, data)  # lr = 0: the weights come back bit for bit after each perturbation
    for p, q in zip(c.parameters(), before):
        assert torch.equal(p, q)


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_round_trip_mid_run(backend):
    data = batches(16)
    a, _, b, _ = round_trip_mid_run(lambda params: sharpness.AdaSAM(params, lr=0.01, rho=0.05, backend=backend), run, data, 8)
    assert_equal(a, b)


def test_lr_scheduler_drives_lr():
    model = make_model()
    opt = sharpness.AdaSAM(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    run(opt, model, batches(1))
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.005)


# -- no base optimizer: the fronts' generic capability (Method.has_own_update) ------------------------


def test_the_torch_front_takes_no_base_optimizer_and_refuses_unknown_arguments():
    model = make_model()
    with pytest.raises(TypeError, match="takes no base optimizer"):
        sharpness.AdaSAM(model.parameters(), torch.optim.SGD, lr=0.01)
    with pytest.raises(TypeError, match="unknown argument.*momentum"):
        sharpness.AdaSAM(model.parameters(), lr=0.01, momentum=0.9)
    with pytest.raises(TypeError, match="needs a base_optimizer"):
        sharpness.SAM(model.parameters(), lr=0.01)  # a method without an update of its own needs one
    opt = sharpness.AdaSAM(model.parameters(), lr=0.01)
    with pytest.raises(RuntimeError, match="its own update"):
        opt.base_optimizer.step()  # it holds the groups and the state only


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_group_steps_with_its_own_lr_and_betas(backend):
    data = batches(12)
    first, second = (0.01, (0.9, 0.999)), (0.03, (0.5, 0.9))
    ref = make_model()
    n_first = 4  # the first two layers
    reference_adasam(ref, data, lr=None, rho=0.1, per_param=[first] * n_first + [second] * 2)
    model = make_model()
    params = list(model.parameters())
    groups = [{"params": params[:n_first]}, {"params": params[n_first:], "lr": second[0], "betas": second[1]}]
    opt = sharpness.AdaSAM(groups, lr=first[0], betas=first[1], rho=0.1, backend=backend)
    run(opt, model, data)
    assert [(g["lr"], g["betas"], g["eps"]) for g in opt.param_groups] == [(*first, 1e-8), (*second, 1e-8)]
    assert_close(model, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_adaptive_perturbs_as_asam(backend):
    """AdaSAM's perturbation is SAM's own, ASAM's with ``adaptive=True``: the same w + e, bit for bit."""
    (x, y), = batches(1)
    moved = []
    for build in (
        lambda ps: sharpness.AdaSAM(ps, rho=0.5, adaptive=True, eta=0.01, backend=backend),
        lambda ps: sharpness.SAM(ps, torch.optim.SGD, rho=0.5, adaptive=True, eta=0.01, lr=0.1, backend=backend),
    ):
        model = make_model()
        opt = build(model.parameters())
        loss_of(model, x, y).backward()
        opt.first_step(zero_grad=True)
        moved.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(p, q) for p, q in zip(*moved))
    assert not torch.equal(moved[0][0], make_model()[0].weight)


# == the numpy front (sharpness.numpy.AdaSAM: the same rule over numpy arrays) =====================

PROBLEM = SoftmaxRegression(n_rows=48, n_in=5, n_classes=4, batch=24, stride=11)
make_problem, loss_and_grads = PROBLEM.make_problem, PROBLEM.loss_and_grads
batch_rows, grad_fn_for = PROBLEM.batch_rows, PROBLEM.grad_fn_for
STEPS = 25


def run_numpy(opt, X, labels, steps, start=0):
    for t in range(start, start + steps):
        opt.step(grad_fn_for(X, labels, t))


def run_torch(opt, tparams, X, labels, steps):
    """The torch front on the same gradients, computed in numpy from its current weights."""
    for t in range(steps):
        opt.step(torch_closure(tparams, grad_fn_for(X, labels, t)))


def reference_adasam_numpy(X, labels, w, steps, lr, rho, betas, eps):
    """Sun et al. 2023: m ← β₁m + (1−β₁)g; v ← β₂v + (1−β₂)g²; v̂ ← max(v̂, v), v̂₋₁ = ε²;
    x ← x − lr·m/√v̂ (no bias correction), g taken at x + ρ s/‖s‖."""
    w = copies(w)
    b1, b2 = betas
    m = [np.zeros_like(x) for x in w]
    v = [np.zeros_like(x) for x in w]
    vhat = [np.full_like(x, eps**2) for x in w]
    for t in range(steps):
        _, s = loss_and_grads(X, labels, w, batch_rows(t))
        e = [rho * x / (norm(s) + 1e-12) for x in s]
        _, g = loss_and_grads(X, labels, add(w, e), batch_rows(t))
        for i in range(len(w)):
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            v[i] = b2 * v[i] + (1 - b2) * g[i] ** 2
            vhat[i] = np.maximum(vhat[i], v[i])
            w[i] = w[i] - lr * m[i] / np.sqrt(vhat[i])
    return w


@pytest.mark.parametrize("rho", [0.05, 0.0])
def test_numpy_adasam_matches_the_paper(rho):
    X, labels, w = make_problem()
    expected = reference_adasam_numpy(X, labels, w, STEPS, 1e-2, rho, (0.8, 0.99), 1e-3)
    opt = snp.AdaSAM(w, lr=1e-2, rho=rho, betas=(0.8, 0.99), eps=1e-3)
    run_numpy(opt, X, labels, STEPS)
    assert_arrays(w, expected)
    assert opt.sam_state["step"] == STEPS


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_adasam_follows_the_torch_front(dtype):
    """The same rule on both fronts, the same gradients (backend="rust"): the same trajectory, to
    the rounding of torch's CPU square root (numpy's is correctly rounded)."""
    X, labels, w = make_problem(dtype)
    tparams = torch_params(w)
    kw = dict(lr=1e-2, rho=0.1, betas=(0.9, 0.99), eps=1e-6)
    opt = snp.AdaSAM(w, **kw)
    run_numpy(opt, X, labels, 20)
    topt = sharpness.AdaSAM(tparams, backend="rust", **kw)
    run_torch(topt, tparams, X, labels, 20)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-11, atol=1e-13)
    assert_arrays(w, tparams, **tol)
    for i, p in enumerate(tparams):
        assert_arrays([opt.state[i][k] for k in ("adasam_m", "adasam_v", "adasam_vmax")],
                      [topt.state[p][k] for k in ("adasam_m", "adasam_v", "adasam_vmax")], **tol)
    assert opt.sam_state["step"] == topt.sam_state["step"] == 20


def test_numpy_a_nonfinite_norm_never_reaches_the_weights():
    X, labels, w = make_problem(np.float32)
    opt = snp.AdaSAM(w, rho=0.1, lr=1e-2)
    run_numpy(opt, X, labels, 3)
    before = copies(w)
    _, g = loss_and_grads(X, labels, w)
    bad = copies(g)
    bad[0][0, 0] = np.inf
    assert opt.first_step(bad)
    assert not math.isfinite(opt.last_grad_norm)
    assert_arrays(w, before, exact=True)  # nothing moved
    opt.second_step(g)  # the update with finite gradients
    assert all(np.isfinite(a).all() for a in w)
    assert opt.state_dict()["sam"]["stats"]["nonfinite_skips"] == 1


def test_numpy_bad_arguments():
    w = [np.zeros(3)]
    with pytest.raises(ValueError, match="eps"):
        snp.AdaSAM(w, eps=0.0)
    with pytest.raises(ValueError, match="betas"):
        snp.AdaSAM(w, betas=(1.0, 0.9))
    with pytest.raises(TypeError, match="betas"):
        snp.AdaSAM(w, betas=0.9)
    with pytest.raises(ValueError, match="lr"):
        snp.AdaSAM(w, lr=-1.0)
    with pytest.raises(TypeError, match="dtype"):
        snp.AdaSAM([np.zeros(3, dtype=np.int64)])
    with pytest.raises(TypeError, match="not one array"):
        snp.AdaSAM(np.zeros(3))
    with pytest.raises(ValueError, match="empty"):
        snp.AdaSAM([])
    with pytest.raises(TypeError, match="takes no base"):  # its own update: no base optimizer
        snp.AdaSAM(w, base="sgd")
    with pytest.raises(TypeError, match="unknown argument.*momentum"):
        snp.AdaSAM(w, momentum=0.9)
    with pytest.raises(ValueError, match="eps"):  # a group's own setting, checked at the next call
        opt = snp.AdaSAM(w)
        opt.param_groups[0]["eps"] = 0.0
        opt.step(lambda p: (0.0, [np.ones(3)]))

