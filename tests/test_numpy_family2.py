"""The numpy front's GSAM, Friendly SAM, WSAM, Monge SAM, AdaSAM and Bayesian SAM.

Each is checked (a) against a per-array float64 reference written here from its paper's formula
(nothing from the package is used to build the references), over tens of steps of a small
softmax regression, with SGD and Adam(W) as the base optimizer where the method has one; (b) at
the limits where it reduces to :class:`sharpness.numpy.SAM`, bit for bit; (c) against the torch
front on the same gradients (``backend="rust"``, the same kernels); (d) for checkpoints that
resume a run mid-way identically; (e) for clear errors on bad input.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from _numpy_family import (
    AdamRef,
    SGDRef,
    SoftmaxRegression,
    add,
    assert_arrays,
    copies,
    dot,
    norm,
    torch_closure,
    torch_params,
)

import sharpness
from sharpness import numpy as snp

# -- a small softmax regression with hand-written gradients ----------------------------------------

PROBLEM = SoftmaxRegression(n_rows=48, n_in=5, n_classes=4, batch=24, stride=11)
make_problem, loss_and_grads = PROBLEM.make_problem, PROBLEM.loss_and_grads
batch_rows, grad_fn_for = PROBLEM.batch_rows, PROBLEM.grad_fn_for


def lr_at(t, lr0):
    """A decaying schedule (GSAM's ρ follows it)."""
    return lr0 * (1.0 - 0.04 * t)


def run_numpy(opt, X, labels, steps, start=0, schedule=None):
    for t in range(start, start + steps):
        if schedule is not None:
            opt.lr = lr_at(t, schedule)
        opt.step(grad_fn_for(X, labels, t))


def run_torch(opt, tparams, X, labels, steps, schedule=None):
    """The torch front on the same gradients, computed in numpy from its current weights."""
    for t in range(steps):
        if schedule is not None:
            for group in opt.param_groups:
                group["lr"] = lr_at(t, schedule)
        opt.step(torch_closure(tparams, grad_fn_for(X, labels, t)))


# -- references: float64, per array, torch.optim semantics (SGDRef, AdamRef: _numpy_family) ----------


def sam_e(g, rho):
    return [rho * x / (norm(g) + 1e-12) for x in g]


def reference_gsam(X, labels, w, steps, rho_max, rho_min, alpha, lr0, base):
    """Zhuang et al. 2022, Algorithm 1, ρ_t linear in lr_t between (lr_min = 0, ρ_min) and (lr0, ρ_max)."""
    w = copies(w)
    for t in range(steps):
        lr = base.lr = lr_at(t, lr0)
        rho = rho_min + (rho_max - rho_min) * lr / lr0
        _, g = loss_and_grads(X, labels, w, batch_rows(t))
        _, gp = loss_and_grads(X, labels, add(w, sam_e(g, rho)), batch_rows(t))
        g_perp = add(g, gp, -dot(g, gp) / dot(gp, gp))
        w = base.step(w, add(gp, g_perp, -alpha))
    return w


def reference_friendly(X, labels, w, steps, rho, sigma, lmbda, base):
    """Li et al. 2024 (official code): m = g on the first step, then d = g − σm, m ← λm + (1−λ)g."""
    w = copies(w)
    m = None
    for t in range(steps):
        _, g = loss_and_grads(X, labels, w, batch_rows(t))
        if m is None:
            m, d = copies(g), g
        else:
            d = add(g, m, -sigma)
            m = [lmbda * mi + (1 - lmbda) * gi for mi, gi in zip(m, g)]
        _, gs = loss_and_grads(X, labels, add(w, sam_e(d, rho)), batch_rows(t))
        w = base.step(w, gs)
    return w


def reference_wsam(X, labels, w, steps, rho, gamma, decouple, base):
    """Yue et al. 2023: α = γ/(1−γ); decoupled: base step on g, then w ← w − lr·α(g̃ − g);
    coupled: the base step on g + α(g̃ − g)."""
    w = copies(w)
    alpha = gamma / (1 - gamma)
    for t in range(steps):
        _, g = loss_and_grads(X, labels, w, batch_rows(t))
        _, gt = loss_and_grads(X, labels, add(w, sam_e(g, rho)), batch_rows(t))
        sharp = add(gt, g, -1.0)
        if decouple:
            w = add(base.step(w, g), sharp, -base.lr * alpha)
        else:
            w = base.step(w, add(g, sharp, alpha))
    return w


def reference_monge(X, labels, w, steps, rho, base, scale=1.0):
    """Jacobsen & Arvanitidis 2025: e = ρ g/(‖g‖√(1 + ‖g‖²))."""
    w = copies(w)
    for t in range(steps):
        _, g = loss_and_grads(X, labels, w, batch_rows(t), scale)
        n = norm(g)
        e = [rho * x / (n * math.sqrt(1 + n * n) + 1e-12) for x in g]
        _, gs = loss_and_grads(X, labels, add(w, e), batch_rows(t), scale)
        w = base.step(w, gs)
    return w


def reference_adasam(X, labels, w, steps, lr, rho, betas, eps):
    """Sun et al. 2023: m ← β₁m + (1−β₁)g; v ← β₂v + (1−β₂)g²; v̂ ← max(v̂, v), v̂₋₁ = ε²;
    x ← x − lr·m/√v̂ (no bias correction)."""
    w = copies(w)
    b1, b2 = betas
    m = [np.zeros_like(x) for x in w]
    v = [np.zeros_like(x) for x in w]
    vhat = [np.full_like(x, eps**2) for x in w]
    for t in range(steps):
        _, s = loss_and_grads(X, labels, w, batch_rows(t))
        _, g = loss_and_grads(X, labels, add(w, sam_e(s, rho)), batch_rows(t))
        for i in range(len(w)):
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            v[i] = b2 * v[i] + (1 - b2) * g[i] ** 2
            vhat[i] = np.maximum(vhat[i], v[i])
            w[i] = w[i] - lr * m[i] / np.sqrt(vhat[i])
    return w


def reference_bsam(X, labels, w, steps, seed, num_data, lr, rho, betas, weight_decay, damping, s_init):
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


# -- (a) against the references ----------------------------------------------------------------------

STEPS = 25
BASES = {
    "sgd": (lambda: SGDRef(0.1, momentum=0.9, weight_decay=1e-3), dict(base="sgd", lr=0.1, momentum=0.9, weight_decay=1e-3)),
    "adam": (lambda: AdamRef(1e-2), dict(base="adam", lr=1e-2)),
    "adamw": (lambda: AdamRef(1e-2, weight_decay=0.05, decoupled=True), dict(base="adamw", lr=1e-2, weight_decay=0.05)),
}


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_gsam_matches_the_paper(base):
    X, labels, w = make_problem()
    ref, kw = BASES[base]
    lr0 = kw["lr"]
    expected = reference_gsam(X, labels, w, STEPS, 0.2, 0.05, 0.3, lr0, ref())
    opt = snp.GSAM(w, rho=0.2, rho_min=0.05, alpha=0.3, **kw)
    run_numpy(opt, X, labels, STEPS, schedule=lr0)
    assert_arrays(w, expected)
    assert opt.hyperparams["rho"] == pytest.approx(0.05 + 0.15 * lr_at(STEPS - 1, lr0) / lr0)


@pytest.mark.parametrize("base", ["sgd", "adam"])
@pytest.mark.parametrize("sigma, lmbda", [(1.0, 0.9), (0.5, 0.6)])
def test_friendly_sam_matches_the_official_algorithm(base, sigma, lmbda):
    X, labels, w = make_problem()
    ref, kw = BASES[base]
    expected = reference_friendly(X, labels, w, STEPS, 0.1, sigma, lmbda, ref())
    run_numpy(snp.FriendlySAM(w, rho=0.1, sigma=sigma, lmbda=lmbda, **kw), X, labels, STEPS)
    assert_arrays(w, expected)


@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("decouple", [True, False])
def test_wsam_matches_the_paper(base, decouple):
    X, labels, w = make_problem()
    ref, kw = BASES[base]
    expected = reference_wsam(X, labels, w, STEPS, 0.1, 0.9, decouple, ref())
    opt = snp.WSAM(w, rho=0.1, gamma=0.9, decouple=decouple, **kw)
    run_numpy(opt, X, labels, STEPS)
    assert_arrays(w, expected)
    assert opt.alpha == pytest.approx(9.0)


@pytest.mark.parametrize("base", ["sgd", "adam"])
def test_monge_sam_matches_the_paper(base):
    X, labels, w = make_problem()
    ref, kw = BASES[base]
    expected = reference_monge(X, labels, w, STEPS, 0.5, ref(), scale=3.0)
    opt = snp.MongeSAM(w, rho=0.5, **kw)
    for t in range(STEPS):
        opt.step(lambda p, t=t: loss_and_grads(X, labels, p, batch_rows(t), 3.0))
    assert_arrays(w, expected)


@pytest.mark.parametrize("rho", [0.05, 0.0])
def test_adasam_matches_the_paper(rho):
    X, labels, w = make_problem()
    expected = reference_adasam(X, labels, w, STEPS, 1e-2, rho, (0.8, 0.99), 1e-3)
    opt = snp.AdaSAM(w, lr=1e-2, rho=rho, betas=(0.8, 0.99), eps=1e-3)
    run_numpy(opt, X, labels, STEPS)
    assert_arrays(w, expected)
    assert opt.steps == STEPS


BSAM = dict(lr=0.05, rho=0.05, betas=(0.9, 0.999), weight_decay=1e-3, damping=0.1, s_init=1.0)


@pytest.mark.parametrize("rho", [0.05, 0.0])
def test_bayesian_sam_matches_algorithm_1(rho):
    X, labels, w = make_problem()
    hyper = dict(BSAM, rho=rho)
    expected, s_ref = reference_bsam(X, labels, w, STEPS, 7, 200, **hyper)
    opt = snp.BayesianSAM(w, num_data=200, seed=7, **hyper)
    run_numpy(opt, X, labels, STEPS)
    assert_arrays(w, expected)
    assert_arrays(opt.state["s"], s_ref)
    assert not np.array_equal(opt.state["s"][0], np.ones_like(w[0]))  # the scale adapted
    assert_arrays(opt.posterior_std(), [1 / np.sqrt(200 * s) for s in s_ref])


# -- (b) the limits that are SAM, bit for bit --------------------------------------------------------

LIMIT_BASES = [dict(base="sgd", lr=0.05, momentum=0.9, weight_decay=1e-3), dict(base="adam", lr=1e-2)]


def same_run(make_a, make_b, dtype=np.float32, steps=15, schedule=None):
    X, labels, w0 = make_problem(dtype)
    a, b = copies(w0), copies(w0)
    run_numpy(make_a(a), X, labels, steps, schedule=schedule)
    run_numpy(make_b(b), X, labels, steps, schedule=schedule)
    return a, b


@pytest.mark.parametrize("kw", LIMIT_BASES, ids=["sgd", "adam"])
def test_gsam_alpha_zero_is_sam_bit_for_bit(kw):
    a, b = same_run(lambda p: snp.GSAM(p, rho=0.1, alpha=0.0, **kw), lambda p: snp.SAM(p, rho=0.1, **kw), schedule=kw["lr"])
    assert_arrays(a, b, exact=True)


@pytest.mark.parametrize("kw", LIMIT_BASES, ids=["sgd", "adam"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_friendly_sigma_zero_is_sam_bit_for_bit(kw, adaptive):
    rho = 0.5 if adaptive else 0.1
    a, b = same_run(
        lambda p: snp.FriendlySAM(p, rho=rho, sigma=0.0, lmbda=0.9, adaptive=adaptive, **kw),
        lambda p: snp.SAM(p, rho=rho, adaptive=adaptive, **kw),
    )
    assert_arrays(a, b, exact=True)


@pytest.mark.parametrize("kw", LIMIT_BASES, ids=["sgd", "adam"])
def test_wsam_gamma_half_coupled_is_sam_bit_for_bit(kw):
    a, b = same_run(lambda p: snp.WSAM(p, rho=0.1, gamma=0.5, decouple=False, **kw), lambda p: snp.SAM(p, rho=0.1, **kw))
    assert_arrays(a, b, exact=True)


def test_wsam_gamma_half_decoupled_with_plain_sgd_is_sam_to_rounding():
    a, b = same_run(lambda p: snp.WSAM(p, rho=0.1, gamma=0.5, lr=0.05), lambda p: snp.SAM(p, rho=0.1, lr=0.05), dtype=np.float64)
    assert_arrays(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kw", LIMIT_BASES, ids=["sgd", "adam"])
def test_wsam_gamma_zero_is_the_base_optimizer_bit_for_bit(kw):
    # SAM with ρ = 0 takes its second gradient at w itself: the base optimizer on g.
    a, b = same_run(lambda p: snp.WSAM(p, rho=0.1, gamma=0.0, **kw), lambda p: snp.SAM(p, rho=0.0, **kw))
    assert_arrays(a, b, exact=True)


def perturbation(cls, w0, grads, rho=0.1):
    w = copies(w0)
    opt = cls(w, rho=rho, lr=0.0)
    opt.first_step(grads)
    e = [a - b for a, b in zip(w, w0)]
    opt.second_step(grads)  # lr = 0: back to w0, exactly
    assert_arrays(w, w0, exact=True)
    return e


def test_monge_tends_to_sam_as_the_gradient_vanishes_and_to_descent_as_it_grows():
    X, labels, w0 = make_problem(np.float64)
    errors = []
    for scale in (1.0, 1e-1, 1e-2, 1e-3):
        _, g = loss_and_grads(X, labels, w0, scale=scale)
        e_monge, e_sam = perturbation(snp.MongeSAM, w0, g), perturbation(snp.SAM, w0, g)
        ratio = norm(e_monge) / norm(e_sam)
        assert ratio == pytest.approx(1 / math.sqrt(1 + norm(g) ** 2), rel=1e-9)  # same direction, shrunk
        assert dot(e_monge, e_sam) == pytest.approx(ratio * dot(e_sam, e_sam), rel=1e-9)
        errors.append(norm(add(e_monge, e_sam, -1.0)) / 0.1)
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-6  # → SAM's e = ρĝ
    _, g = loss_and_grads(X, labels, w0, scale=1e6)
    e_big = perturbation(snp.MongeSAM, w0, g)
    assert norm(e_big) == pytest.approx(0.1 / math.sqrt(1 + norm(g) ** 2), rel=1e-9)
    assert norm(e_big) < 1e-5  # → no perturbation: the base optimizer


@pytest.mark.parametrize("kw", LIMIT_BASES, ids=["sgd", "adam"])
def test_rho_zero_monge_is_rho_zero_sam_bit_for_bit(kw):
    a, b = same_run(lambda p: snp.MongeSAM(p, rho=0.0, **kw), lambda p: snp.SAM(p, rho=0.0, **kw))
    assert_arrays(a, b, exact=True)


# -- (c) against the torch front ---------------------------------------------------------------------

TORCH_BASES = [
    ("sgd", torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
    ("adamw", torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2)),
]


@pytest.mark.parametrize(
    "name, kw",
    [
        ("GSAM", dict(rho=0.1, rho_min=0.02, alpha=0.3)),
        ("FriendlySAM", dict(rho=0.1, sigma=1.0, lmbda=0.9)),
        ("FriendlySAM", dict(rho=0.5, sigma=0.7, lmbda=0.8, adaptive=True)),
        ("WSAM", dict(rho=0.1, gamma=0.9)),
        ("WSAM", dict(rho=0.1, gamma=0.8, decouple=False)),
        ("MongeSAM", dict(rho=0.5)),
    ],
)
@pytest.mark.parametrize("np_base, torch_base, base_kw", TORCH_BASES, ids=[b[0] for b in TORCH_BASES])
def test_the_numpy_front_follows_the_torch_front(name, kw, np_base, torch_base, base_kw):
    X, labels, w = make_problem(np.float32)
    tparams = torch_params(w)
    schedule = base_kw["lr"] if name == "GSAM" else None
    run_numpy(getattr(snp, name)(w, base=np_base, **kw, **base_kw), X, labels, 20, schedule=schedule)
    topt = getattr(sharpness, name)(tparams, torch_base, backend="rust", **kw, **base_kw)
    run_torch(topt, tparams, X, labels, 20, schedule=schedule)
    assert_arrays(w, tparams, rtol=1e-5, atol=1e-6)


def test_adasam_follows_the_torch_front():
    X, labels, w = make_problem(np.float32)
    tparams = torch_params(w)
    kw = dict(lr=1e-2, rho=0.1, betas=(0.9, 0.99), eps=1e-6)
    run_numpy(snp.AdaSAM(w, **kw), X, labels, 20)
    run_torch(sharpness.AdaSAM(tparams, backend="rust", **kw), tparams, X, labels, 20)
    assert_arrays(w, tparams, rtol=1e-5, atol=1e-6)


class TorchNoise:
    """Stands in for the numpy Generator: the torch front's draws (one randn over the arrays of a
    dtype, in order, from torch.Generator().manual_seed(seed)), so both fronts use one noise."""

    def __init__(self, seed):
        self.g = torch.Generator().manual_seed(seed)

    def standard_normal(self, n, dtype):
        return torch.randn(n, generator=self.g, dtype=torch.float32 if dtype == np.float32 else torch.float64).numpy()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bayesian_sam_follows_the_torch_front_on_the_same_noise(dtype):
    X, labels, w = make_problem(dtype)
    tparams = torch_params(w)
    opt = snp.BayesianSAM(w, num_data=200, **BSAM)
    opt.generator = TorchNoise(5)
    run_numpy(opt, X, labels, 20)
    topt = sharpness.BayesianSAM(tparams, num_data=200, seed=5, backend="rust", **BSAM)
    run_torch(topt, tparams, X, labels, 20)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-11, atol=1e-13)
    assert_arrays(w, tparams, **tol)
    assert_arrays(opt.state["s"], [topt.state[p]["bsam_s"] for p in tparams], **tol)


# -- (d) checkpoints ------------------------------------------------------------------------------------

CHECKPOINTED = [
    ("GSAM", dict(rho=0.1, rho_min=0.02, alpha=0.3, lr=0.05, momentum=0.9), dict(lr=0.5)),
    ("FriendlySAM", dict(rho=0.1, sigma=1.0, lmbda=0.9, lr=0.05, momentum=0.9), {}),
    ("WSAM", dict(rho=0.1, gamma=0.9, base="adam", lr=1e-2), {}),
    ("MongeSAM", dict(rho=0.5, lr=0.05, momentum=0.9), {}),
    ("AdaSAM", dict(lr=1e-2, rho=0.1), {}),
    ("BayesianSAM", dict(num_data=200, seed=3, **BSAM), dict(seed=99)),
]


@pytest.mark.parametrize("name, kw, other", CHECKPOINTED, ids=[c[0] for c in CHECKPOINTED])
def test_state_dict_round_trip_mid_run(name, kw, other):
    cls = getattr(snp, name)
    schedule = kw["lr"] if name == "GSAM" else None
    X, labels, w0 = make_problem(np.float32)
    a = copies(w0)
    run_numpy(cls(a, **kw), X, labels, 14, schedule=schedule)
    b = copies(w0)
    opt_b = cls(b, **kw)
    run_numpy(opt_b, X, labels, 6, schedule=schedule)
    sd = copy.deepcopy(opt_b.state_dict())
    snapshot = copies(b)
    run_numpy(opt_b, X, labels, 2, start=6, schedule=schedule)  # later steps leave the saved dict alone
    c = copies(snapshot)
    opt_c = cls(c, **dict(kw, **other))  # other settings (lr_max, seed) come from the checkpoint
    opt_c.load_state_dict(sd)
    run_numpy(opt_c, X, labels, 8, start=6, schedule=schedule)
    assert_arrays(a, c, exact=True)


def test_friendly_checkpoint_before_the_first_step_and_gsam_keeps_its_schedule():
    X, labels, w = make_problem(np.float32)
    opt = snp.FriendlySAM(copies(w), rho=0.1)
    sd = opt.state_dict()
    assert sd["friendly"]["m"] is None
    snp.FriendlySAM(copies(w), rho=0.1).load_state_dict(sd)
    g = snp.GSAM(copies(w), rho=0.2, rho_min=0.1, lr=0.1)
    g2 = snp.GSAM(copies(w), rho=0.4, lr=1.0)
    g2.load_state_dict(g.state_dict())
    assert (g2.rho_max, g2.rho_min, g2.lr_max, g2.lr_min) == (0.2, 0.1, 0.1, 0.0)


# -- behaviour: non-finite norms, exact restoration, the caller's arrays -----------------------------------

ALL = [
    ("GSAM", dict(rho=0.1, alpha=0.3, lr=0.05, momentum=0.9)),
    ("FriendlySAM", dict(rho=0.1, lr=0.05, momentum=0.9)),
    ("WSAM", dict(rho=0.1, lr=0.05, momentum=0.9)),
    ("MongeSAM", dict(rho=0.1, lr=0.05, momentum=0.9)),
    ("AdaSAM", dict(rho=0.1, lr=1e-2)),
    ("BayesianSAM", dict(num_data=100, seed=0, **BSAM)),
]


def begin(opt):
    if isinstance(opt, snp.BayesianSAM):
        opt.begin_step()


@pytest.mark.parametrize("name, kw", ALL, ids=[c[0] for c in ALL])
def test_a_nonfinite_norm_never_reaches_the_weights(name, kw):
    X, labels, w = make_problem(np.float32)
    opt = getattr(snp, name)(w, **kw)
    run_numpy(opt, X, labels, 3)  # Friendly's m exists
    before = copies(w)
    _, g = loss_and_grads(X, labels, w)
    bad = copies(g)
    bad[0][0, 0] = np.inf
    begin(opt)
    assert not math.isfinite(opt.first_step(bad))
    assert_arrays(w, before, exact=True)  # nothing moved (bSAM: back from the sample)
    opt.second_step(g)  # the plain update with finite gradients
    assert all(np.isfinite(a).all() for a in w)
    assert opt.state_dict()["nonfinite_steps"] == 1


@pytest.mark.parametrize("name, kw", ALL, ids=[c[0] for c in ALL])
def test_exceptions_restore_the_weights_and_grads_are_left_alone(name, kw):
    X, labels, w = make_problem(np.float32)
    opt = getattr(snp, name)(w, **kw)
    seen = []

    def grad_fn(params):
        loss, grads = loss_and_grads(X, labels, params)
        seen.append((copies(grads), grads))
        return loss, grads

    for _ in range(3):
        opt.step(grad_fn)
    for kept, given in seen:
        assert_arrays(kept, given, exact=True)
    before = copies(w)
    calls = []

    def failing(params):
        calls.append(1)
        if len(calls) == 2:
            raise KeyError("boom")
        return loss_and_grads(X, labels, params)

    with pytest.raises(KeyError):
        opt.step(failing)
    assert_arrays(w, before, exact=True)
    assert not opt.perturbed

    def failing_first(params):
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        opt.step(failing_first)
    assert_arrays(w, before, exact=True)
    opt.step(grad_fn)  # and the optimizer still works


def test_mixed_dtypes_run_per_dtype():
    X, labels, w = make_problem(np.float64)
    mixed = [w[0].copy(), w[1].astype(np.float32)]
    for cls, kw in [(snp.GSAM, dict(rho=0.1, lr=0.05)), (snp.FriendlySAM, dict(rho=0.1, lr=0.05)),
                    (snp.WSAM, dict(rho=0.1, lr=0.05)), (snp.MongeSAM, dict(rho=0.1, lr=0.05)),
                    (snp.AdaSAM, dict(lr=1e-2)), (snp.BayesianSAM, dict(num_data=100, seed=0))]:
        arrays = copies(mixed)
        opt = cls(arrays, **kw)
        for t in range(4):
            opt.step(
                lambda p, t=t: (
                    0.0,
                    [
                        x.astype(a.dtype)
                        for x, a in zip(loss_and_grads(X, labels, [q.astype(np.float64) for q in p], batch_rows(t))[1], p)
                    ],
                )
            )
        assert [a.dtype for a in arrays] == [np.float64, np.float32]
        assert not np.array_equal(arrays[0], mixed[0])


# -- (e) bad arguments ------------------------------------------------------------------------------------


def test_bad_arguments():
    w = [np.zeros(3)]
    with pytest.raises(ValueError, match="alpha"):
        snp.GSAM(w, alpha=-0.1)
    with pytest.raises(TypeError, match="alpha"):
        snp.GSAM(w, alpha="big")
    with pytest.raises(ValueError, match="rho_min"):
        snp.GSAM(w, rho_min=-1.0)
    with pytest.raises(ValueError, match="lr_max"):
        snp.GSAM(w, lr_max=math.inf)
    with pytest.raises(ValueError, match="rho"):
        snp.GSAM(w, rho=-1.0)
    with pytest.raises(ValueError, match="lmbda"):
        snp.FriendlySAM(w, lmbda=1.5)
    with pytest.raises(ValueError, match="sigma"):
        snp.FriendlySAM(w, sigma=math.nan)
    with pytest.raises(ValueError, match="gamma"):
        snp.WSAM(w, gamma=1.0)
    with pytest.raises(TypeError, match="decouple"):
        snp.WSAM(w, decouple="yes")
    with pytest.raises(ValueError, match="adaptive"):
        snp.MongeSAM(w, adaptive=True)
    with pytest.raises(TypeError, match="unknown argument"):
        snp.MongeSAM(w, foreach=True)
    with pytest.raises(ValueError, match="eps"):
        snp.AdaSAM(w, eps=0.0)
    with pytest.raises(ValueError, match="betas"):
        snp.AdaSAM(w, betas=(1.0, 0.9))
    with pytest.raises(TypeError, match="betas"):
        snp.AdaSAM(w, betas=0.9)
    with pytest.raises(ValueError, match="lr"):
        snp.AdaSAM(w, lr=-1.0)
    with pytest.raises(ValueError, match="num_data"):
        snp.BayesianSAM(w, num_data=0)
    with pytest.raises(ValueError, match="s_init"):
        snp.BayesianSAM(w, num_data=10, s_init=0.0)
    with pytest.raises(ValueError, match="damping"):
        snp.BayesianSAM(w, num_data=10, damping=-1.0)
    with pytest.raises(TypeError, match="seed"):
        snp.BayesianSAM(w, num_data=10, seed=1.5)
    for cls, kw in [(snp.GSAM, {}), (snp.AdaSAM, {}), (snp.BayesianSAM, dict(num_data=10))]:
        with pytest.raises(TypeError, match="dtype"):
            cls([np.zeros(3, dtype=np.int64)], **kw)
        with pytest.raises(TypeError, match="not one array"):
            cls(np.zeros(3), **kw)
        with pytest.raises(ValueError, match="empty"):
            cls([], **kw)


@pytest.mark.parametrize("name, kw", ALL, ids=[c[0] for c in ALL])
def test_protocol_and_input_errors(name, kw):
    w = [np.zeros((2, 3)), np.zeros(3)]
    opt = getattr(snp, name)(w, **kw)
    g = [np.ones((2, 3)), np.ones(3)]
    with pytest.raises(RuntimeError, match="first_step|begin_step"):
        opt.second_step(g)
    if name == "BayesianSAM":
        with pytest.raises(RuntimeError, match="begin_step"):
            opt.first_step(g)
        opt.begin_step()
        with pytest.raises(RuntimeError, match="begin_step"):
            opt.begin_step()
    with pytest.raises(ValueError, match="gradient arrays for 2 parameters"):
        opt.first_step(g[:1])
    with pytest.raises(TypeError, match=r"grads\[1\] has dtype float32"):
        opt.first_step([g[0], g[1].astype(np.float32)])
    with pytest.raises(ValueError, match=r"grads\[0\] has shape"):
        opt.first_step([np.ones(6), g[1]])
    with pytest.raises(TypeError, match="not one array"):
        opt.first_step(np.ones(3))
    if name == "BayesianSAM":  # at the posterior sample
        with pytest.raises(RuntimeError, match="state_dict"):
            opt.state_dict()
    opt.first_step(g)
    with pytest.raises(RuntimeError, match="twice|begin_step"):
        opt.first_step(g)
    with pytest.raises(RuntimeError):
        opt.state_dict()
    with pytest.raises(RuntimeError):
        opt.load_state_dict({})
    opt.second_step(g)
    sd = opt.state_dict()
    with pytest.raises(TypeError, match="dict"):
        opt.load_state_dict([sd])
    broken = copy.deepcopy(sd)
    if isinstance(broken["state"], dict):  # AdaSAM, BayesianSAM: name -> arrays
        broken["state"][next(iter(broken["state"]))] = [np.zeros(5)] * 2
    else:  # the SAM family: one entry per parameter
        broken["state"] = broken["state"][:1]
    with pytest.raises(ValueError):
        opt.load_state_dict(broken)
    opt.load_state_dict(sd)


def test_load_refuses_another_methods_state():
    w = [np.zeros(3)]
    with pytest.raises(ValueError, match="gsam"):
        snp.GSAM(w).load_state_dict(snp.SAM([np.zeros(3)]).state_dict())
    with pytest.raises(ValueError, match="friendly"):
        snp.FriendlySAM(w).load_state_dict(snp.SAM([np.zeros(3)]).state_dict())
    with pytest.raises(ValueError, match="AdaSAM"):
        snp.BayesianSAM(w, num_data=10).load_state_dict(snp.AdaSAM([np.zeros(3)]).state_dict())
    with pytest.raises(ValueError, match="generator"):
        sd = snp.BayesianSAM([np.zeros(3)], num_data=10).state_dict()
        del sd["generator"]
        snp.BayesianSAM(w, num_data=10).load_state_dict(sd)


# -- GSAM: ρ_t stays within [ρ_min, ρ_max] ----------------------------------------------------------

# A warm-up past lr_max = 0.1 (the lr at construction), then a decay below lr_min = 0.02.
GSAM_LRS = [0.02, 0.1, 0.25, 0.37, 0.3, 0.15, 0.08, 0.05, 0.02, 0.01, 0.004, 0.0]


def clamped_rho(lr, rho_max, rho_min, lr_max, lr_min):
    rho = rho_min + (rho_max - rho_min) * (lr - lr_min) / (lr_max - lr_min)
    return min(rho_max, max(rho_min, rho))


def reference_gsam_at(X, labels, w, lrs, rho_max, rho_min, lr_max, lr_min, alpha, base):
    """Algorithm 1 with ρ_t linear in lr_t between (lr_min, ρ_min) and (lr_max, ρ_max), clamped
    to [ρ_min, ρ_max]; returns the weights and the ρ_t of each step."""
    w, rhos = copies(w), []
    for t, lr in enumerate(lrs):
        base.lr = lr
        rho = clamped_rho(lr, rho_max, rho_min, lr_max, lr_min)
        rhos.append(rho)
        _, g = loss_and_grads(X, labels, w, batch_rows(t))
        _, gp = loss_and_grads(X, labels, add(w, sam_e(g, rho)), batch_rows(t))
        g_perp = add(g, gp, -dot(g, gp) / dot(gp, gp))
        w = base.step(w, add(gp, g_perp, -alpha))
    return w, rhos


def test_gsam_rho_t_is_clamped_to_its_ends_against_the_reference():
    X, labels, w = make_problem()
    expected, rhos = reference_gsam_at(X, labels, w, GSAM_LRS, 0.1, 0.02, 0.1, 0.02, 0.3, SGDRef(0.1, momentum=0.9))
    opt = snp.GSAM(w, rho=0.1, rho_min=0.02, lr_min=0.02, alpha=0.3, lr=0.1, momentum=0.9)
    seen = []
    for t, lr in enumerate(GSAM_LRS):
        opt.lr = lr
        opt.step(grad_fn_for(X, labels, t))
        seen.append(opt.hyperparams["rho"])
    assert seen == pytest.approx(rhos, rel=1e-12)
    for lr, rho in zip(GSAM_LRS, seen):
        if lr >= 0.1:
            assert rho == 0.1  # exactly ρ_max
        if lr <= 0.02:
            assert rho == 0.02  # exactly ρ_min
    assert_arrays(w, expected)


def test_gsam_both_fronts_clamp_rho_t_alike():
    X, labels, w = make_problem(np.float32)
    tparams = torch_params(w)
    kw = dict(rho=0.1, rho_min=0.02, lr_min=0.02, alpha=0.3, lr=0.1, momentum=0.9)
    opt = snp.GSAM(w, **kw)
    topt = sharpness.GSAM(tparams, torch.optim.SGD, backend="rust", **kw)
    for t, lr in enumerate(GSAM_LRS):
        opt.lr = lr
        topt.param_groups[0]["lr"] = lr
        opt.step(grad_fn_for(X, labels, t))
        topt.step(torch_closure(tparams, grad_fn_for(X, labels, t)))
        assert opt.hyperparams["rho"] == topt.param_groups[0]["sam_rho"] == opt.rho_t()
        assert opt.rho_t() == topt.rho_t(topt.param_groups[0])
    assert_arrays(w, tparams, rtol=1e-5, atol=1e-6)


def test_gsam_rho_min_above_rho_is_refused():
    w = [np.zeros(3)]
    with pytest.raises(ValueError, match=r"rho_min \(0\.2\).*rho \(0\.1\)"):
        snp.GSAM(w, rho=0.1, rho_min=0.2)
    with pytest.raises(ValueError, match=r"rho_min \(0\.05\).*rho \(0\.0\)"):
        snp.GSAM(w, rho=0.0, rho_min=0.05)
    sd = snp.GSAM(w, rho=0.1, rho_min=0.05).state_dict()
    sd["gsam"]["rho_min"] = 0.3
    with pytest.raises(ValueError, match=r"rho_min \(0\.3\).*rho \(0\.1\)"):
        snp.GSAM(w, rho=0.1).load_state_dict(sd)
    opt = snp.GSAM(w, rho=0.1, rho_min=0.05)
    opt.rho_min = 0.3  # changed after construction: refused at the next step
    with pytest.raises(ValueError, match=r"rho_min \(0\.3\).*rho \(0\.1\)"):
        opt.rho_t()
