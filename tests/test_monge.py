"""Monge SAM on both fronts (one rule, :mod:`sharpness.methods.monge`).

Torch front: against a per-tensor reference written here from the paper's closed form (Jacobsen &
Arvanitidis, 2025: e = ρ g/(‖g‖√(1+‖g‖²))), its exact perturbation on a quadratic, and its limits:
SAM as ‖g‖ → 0, the base optimizer as ‖g‖ → ∞. Numpy front: against a per-array float64 reference
of the closed form, the same limits, the torch front on the same gradients, checkpoints,
non-finite norms and bad input.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from _family import BASES, assert_close, batches, flat_dot, grads_at_offset, make_model, run
from _numpy_family import AdamRef, SGDRef, SoftmaxRegression, add, assert_arrays, copies, dot, norm, torch_closure, torch_params
from torch import nn

import sharpness
from sharpness import numpy as snp


def loss_of(model, x, y, scale=1.0):
    return scale * nn.functional.cross_entropy(model(x), y)


def grads_at(model, x, y):
    for p in model.parameters():
        p.grad = None
    loss_of(model, x, y).backward()
    return [p.grad.clone() for p in model.parameters()]


def reference_monge(model, base, data, rho):
    params = list(model.parameters())
    for x, y in data:
        g = grads_at(model, x, y)
        norm = math.sqrt(flat_dot(g, g))
        g_s = grads_at_offset(model, x, y, [gi * (rho / (norm * math.sqrt(1 + norm**2) + 1e-12)) for gi in g])
        for p, gi in zip(params, g_s):
            p.grad = gi
        base.step()


@pytest.mark.parametrize("backend", ["rust", "torch"])
@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("api", ["closure", "two-call"])
def test_monge_sam_matches_the_paper(backend, base, api):
    data = batches(20)
    cls, kw = BASES[base]
    ref = make_model()
    mine = copy.deepcopy(ref)
    reference_monge(ref, cls(ref.parameters(), foreach=False, **kw), data, 0.5)
    opt = sharpness.MongeSAM(mine.parameters(), cls, rho=0.5, backend=backend, **kw)
    run(opt, mine, data, api)
    assert_close(ref, mine)


def perturbation(opt_cls, model, x, y, scale, backend, rho=0.1):
    before = [p.detach().clone() for p in model.parameters()]
    opt = opt_cls(model.parameters(), torch.optim.SGD, rho=rho, lr=0.1, backend=backend)
    opt.zero_grad()
    loss_of(model, x, y, scale).backward()
    opt.first_step()
    e = [p.detach().double() - w.double() for p, w in zip(model.parameters(), before)]
    g = [p.grad.detach().double().clone() for p in model.parameters()]
    opt.restore()
    return e, g


@pytest.mark.parametrize("backend", ["rust", "torch"])
def test_tends_to_sam_as_the_gradient_vanishes_and_to_descent_as_it_grows(backend):
    x, y = batches(1)[0]
    x = x.double()
    model = make_model().double()
    errors = []
    for scale in (1.0, 1e-1, 1e-2, 1e-3):
        e_monge, g = perturbation(sharpness.MongeSAM, model, x, y, scale, backend)
        e_sam, _ = perturbation(sharpness.SAM, model, x, y, scale, backend)
        norm = math.sqrt(flat_dot(g, g))
        # the same direction, shrunk by exactly 1/√(1 + ‖g‖²)
        ratio = math.sqrt(flat_dot(e_monge, e_monge) / flat_dot(e_sam, e_sam))
        assert ratio == pytest.approx(1 / math.sqrt(1 + norm**2), rel=1e-9)
        assert flat_dot(e_monge, e_sam) == pytest.approx(ratio * flat_dot(e_sam, e_sam), rel=1e-9)
        errors.append(math.sqrt(sum(float(((a - b) ** 2).sum()) for a, b in zip(e_monge, e_sam))) / 0.1)
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-6  # → SAM's e = ρĝ
    e_big, g = perturbation(sharpness.MongeSAM, model, x, y, 1e6, backend)
    norm = math.sqrt(flat_dot(g, g))
    assert math.sqrt(flat_dot(e_big, e_big)) == pytest.approx(0.1 / math.sqrt(1 + norm**2), rel=1e-9)
    assert math.sqrt(flat_dot(e_big, e_big)) < 1e-5  # → no perturbation: the base optimizer


def test_one_step_on_a_quadratic_in_closed_form():
    torch.manual_seed(7)
    n = 6
    q = torch.randn(n, n, dtype=torch.float64)
    A = q @ q.T + torch.eye(n, dtype=torch.float64)
    b = torch.randn(n, dtype=torch.float64)
    w0 = torch.randn(n, dtype=torch.float64)
    rho, lr = 0.4, 0.05
    g = A @ w0 - b
    e = rho * g / (g.norm() * torch.sqrt(1 + g @ g))
    expected = w0 - lr * (A @ (w0 + e) - b)
    for backend in ("rust", "torch"):
        w = nn.Parameter(w0.clone())
        opt = sharpness.MongeSAM([w], torch.optim.SGD, rho=rho, lr=lr, backend=backend)

        def closure():
            opt.zero_grad()
            loss = 0.5 * w @ A @ w - b @ w
            loss.backward()
            return loss

        opt.step(closure)
        torch.testing.assert_close(w.detach(), expected, rtol=1e-12, atol=1e-13)


def test_no_adaptive_form():
    with pytest.raises(ValueError, match="adaptive"):
        sharpness.MongeSAM(make_model().parameters(), torch.optim.SGD, adaptive=True, lr=0.1)


def test_no_adaptive_form_in_any_group():
    model = make_model()
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "sam_adaptive": True}]
    with pytest.raises(ValueError, match="adaptive"):
        sharpness.MongeSAM(groups, torch.optim.SGD, lr=0.1)
    opt = sharpness.MongeSAM(model[0].parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="adaptive"):
        opt.add_param_group({"params": model[2].parameters(), "sam_adaptive": True})


# == the numpy front (sharpness.numpy.MongeSAM: the same rule over numpy arrays) ===================
# A small softmax regression with hand-written gradients and a per-array float64 reference of the
# closed form with torch.optim's step (SGDRef, AdamRef: _numpy_family).

PROBLEM = SoftmaxRegression(n_rows=48, n_in=5, n_classes=4, batch=24, stride=11)
make_problem, np_loss_and_grads = PROBLEM.make_problem, PROBLEM.loss_and_grads
batch_rows, grad_fn_for = PROBLEM.batch_rows, PROBLEM.grad_fn_for
STEPS = 25
NP_BASES = {
    "sgd": (lambda: SGDRef(0.1, momentum=0.9, weight_decay=1e-3), dict(base="sgd", lr=0.1, momentum=0.9, weight_decay=1e-3)),
    "adam": (lambda: AdamRef(1e-2), dict(base="adam", lr=1e-2)),
}
LIMIT_BASES = [dict(base="sgd", lr=0.05, momentum=0.9, weight_decay=1e-3), dict(base="adam", lr=1e-2)]
TORCH_BASES = [
    ("sgd", torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
    ("adamw", torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2)),
]


def run_numpy(opt, X, labels, steps, start=0):
    for t in range(start, start + steps):
        opt.step(grad_fn_for(X, labels, t))


def run_torch(opt, tparams, X, labels, steps):
    """The torch front on the same gradients, computed in numpy from its current weights."""
    for t in range(steps):
        opt.step(torch_closure(tparams, grad_fn_for(X, labels, t)))


def reference_monge_numpy(X, labels, w, steps, rho, base, scale=1.0):
    """Jacobsen & Arvanitidis 2025: e = ρ g/(‖g‖√(1 + ‖g‖²))."""
    w = copies(w)
    for t in range(steps):
        _, g = np_loss_and_grads(X, labels, w, batch_rows(t), scale)
        n = norm(g)
        e = [rho * x / (n * math.sqrt(1 + n * n) + 1e-12) for x in g]
        _, gs = np_loss_and_grads(X, labels, add(w, e), batch_rows(t), scale)
        w = base.step(w, gs)
    return w


@pytest.mark.parametrize("base", ["sgd", "adam"])
def test_numpy_monge_sam_matches_the_paper(base):
    X, labels, w = make_problem()
    ref, kw = NP_BASES[base]
    expected = reference_monge_numpy(X, labels, w, STEPS, 0.5, ref(), scale=3.0)
    opt = snp.MongeSAM(w, rho=0.5, **kw)
    for t in range(STEPS):
        opt.step(lambda p, t=t: np_loss_and_grads(X, labels, p, batch_rows(t), 3.0))
    assert_arrays(w, expected)


def numpy_perturbation(cls, w0, grads, rho=0.1):
    w = copies(w0)
    opt = cls(w, rho=rho, lr=0.0)
    opt.first_step(grads)
    e = [a - b for a, b in zip(w, w0)]
    opt.second_step(grads)  # lr = 0: back to w0, exactly
    assert_arrays(w, w0, exact=True)
    return e


def test_numpy_tends_to_sam_as_the_gradient_vanishes_and_to_descent_as_it_grows():
    X, labels, w0 = make_problem(np.float64)
    errors = []
    for scale in (1.0, 1e-1, 1e-2, 1e-3):
        _, g = np_loss_and_grads(X, labels, w0, scale=scale)
        e_monge, e_sam = numpy_perturbation(snp.MongeSAM, w0, g), numpy_perturbation(snp.SAM, w0, g)
        ratio = norm(e_monge) / norm(e_sam)
        assert ratio == pytest.approx(1 / math.sqrt(1 + norm(g) ** 2), rel=1e-9)  # same direction, shrunk
        assert dot(e_monge, e_sam) == pytest.approx(ratio * dot(e_sam, e_sam), rel=1e-9)
        errors.append(norm(add(e_monge, e_sam, -1.0)) / 0.1)
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-6  # → SAM's e = ρĝ
    _, g = np_loss_and_grads(X, labels, w0, scale=1e6)
    e_big = numpy_perturbation(snp.MongeSAM, w0, g)
    assert norm(e_big) == pytest.approx(0.1 / math.sqrt(1 + norm(g) ** 2), rel=1e-9)
    assert norm(e_big) < 1e-5  # → no perturbation: the base optimizer


@pytest.mark.parametrize("kw", LIMIT_BASES, ids=["sgd", "adam"])
def test_numpy_rho_zero_is_rho_zero_sam_bit_for_bit(kw):
    X, labels, w0 = make_problem(np.float32)
    a, b = copies(w0), copies(w0)
    run_numpy(snp.MongeSAM(a, rho=0.0, **kw), X, labels, 15)
    run_numpy(snp.SAM(b, rho=0.0, **kw), X, labels, 15)
    assert_arrays(a, b, exact=True)


@pytest.mark.parametrize(
    "np_base, torch_base, base_kw",
    TORCH_BASES,
    ids=["sgd", "adamw"],
)
def test_both_fronts_agree_on_the_same_gradients(np_base, torch_base, base_kw):
    X, labels, w = make_problem(np.float32)
    tparams = torch_params(w)
    opt = snp.MongeSAM(w, rho=0.5, base=np_base, **base_kw)
    run_numpy(opt, X, labels, 20)
    topt = sharpness.MongeSAM(tparams, torch_base, rho=0.5, backend="rust", **base_kw)
    run_torch(topt, tparams, X, labels, 20)
    assert_arrays(w, tparams, rtol=1e-5, atol=1e-6)
    assert_arrays(w, tparams, exact=True)  # the same rule on the same kernels
    assert opt.last_grad_norm == topt.last_grad_norm  # ‖g‖ on both


def test_numpy_a_nonfinite_norm_never_reaches_the_weights():
    X, labels, w = make_problem(np.float32)
    opt = snp.MongeSAM(w, rho=0.1, lr=0.05, momentum=0.9)
    run_numpy(opt, X, labels, 3)
    before = copies(w)
    _, g = np_loss_and_grads(X, labels, w)
    bad = copies(g)
    bad[0][0, 0] = np.inf
    assert opt.first_step(bad)  # the second half follows: the plain base step
    assert not math.isfinite(opt.last_grad_norm)
    assert_arrays(w, before, exact=True)  # nothing moved
    opt.second_step(g)  # the plain update with finite gradients
    assert all(np.isfinite(a).all() for a in w)
    assert opt.stats["nonfinite_skips"] == 1 and opt.state_dict()["sam"]["stats"]["nonfinite_skips"] == 1


def test_numpy_bad_arguments():
    w = [np.zeros(3)]
    with pytest.raises(ValueError, match="adaptive"):
        snp.MongeSAM(w, adaptive=True)
    with pytest.raises(TypeError, match="unknown argument"):
        snp.MongeSAM(w, foreach=True)


def test_numpy_no_adaptive_form_in_any_group_nor_later():
    with pytest.raises(ValueError, match="adaptive"):
        snp.MongeSAM([{"params": [np.zeros(3)]}, {"params": [np.zeros(2)], "sam_adaptive": True}])
    w = [np.ones(3)]
    opt = snp.MongeSAM(w, lr=0.1)
    opt.param_groups[0]["sam_adaptive"] = True  # settings are checked at every call
    with pytest.raises(ValueError, match="adaptive"):
        opt.first_step([np.ones(3)])
    assert_arrays(w, [np.ones(3)], exact=True)
    assert not opt.perturbed

