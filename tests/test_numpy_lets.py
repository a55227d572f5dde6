"""The numpy front of LETS (learned perturbation radius, Wang et al., ECML-PKDD 2024,
arXiv:2408.08222), :class:`sharpness.numpy.LETS`.

1. against a per-array reference written here from the update (nothing imported from sharpness)
   over 30 steps of softmax regression with training and validation batches: SGD (momentum,
   weight decay, Nesterov) and Adam bases, SAM and ASAM, both Hessian stand-ins, one and two
   groups;
2. with ``rho_lr = 0`` it is ``sharpness.numpy.SAM`` (and ASAM) bit for bit;
3. against the torch front ``sharpness.LETS`` on the same weights and gradients: the ρ trajectory
   and the weights, to float rounding (one and two groups, float64 and float32);
4. its hypergradient against central differences through one unrolled step on quadratics
   (float64): the chain rule with the true Hessian is the finite difference, LETS is that chain
   rule with its stand-in;
5. ``state_dict`` round trips mid-run (and between the SAM step and its ρ update) continue bit for
   bit; the explicit calls match ``step``;
6. exact restoration, non-finite values, groups, bounds and bad arguments.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

D, C = 5, 3  # features, classes
EPS = 1e-12  # added to the gradient norm, as in SAM


# -- softmax regression, gradients by hand ---------------------------------------------------------


def loss_grad(params, X, y):
    """Mean cross-entropy of softmax(X W + b) and its gradients (in the parameters' dtype)."""
    W, b = params
    z = X @ W + b
    z = z - z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=1))
    n = len(y)
    loss = float(np.mean(lse - z[np.arange(n), y]))
    d = np.exp(z - lse[:, None])
    d[np.arange(n), y] -= 1.0
    d /= n
    return loss, [(X.T @ d).astype(W.dtype), d.sum(axis=0).astype(b.dtype)]


def make_data(seed, n_batches=4, n=24, dtype=np.float64):
    """Training batches with 30% noisy labels (a real generalisation gap) and validation batches."""
    rng = np.random.default_rng(seed)
    w_true = rng.normal(size=(D, C))

    def batch():
        X = rng.normal(size=(n, D))
        y = np.argmax(X @ w_true + 0.5 * rng.normal(size=(n, C)), axis=1)
        return X.astype(dtype), y

    train, val = [], []
    for _ in range(n_batches):
        X, y = batch()
        flip = rng.random(n) < 0.3
        train.append((X, np.where(flip, rng.integers(0, C, n), y)))
        val.append(batch())
    return train, val


def init_params(seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return [(0.3 * rng.normal(size=(D, C))).astype(dtype), (0.1 * rng.normal(size=C)).astype(dtype)]


def fns(train, val, t):
    (X, y), (Xv, yv) = train[t % len(train)], val[t % len(val)]
    return (lambda ps: loss_grad(ps, X, y)), (lambda ps: loss_grad(ps, Xv, yv))


def run(opt, train, val, steps, start=0, record=None):
    for t in range(start, start + steps):
        opt.step(*fns(train, val, t))
        if record is not None:
            record.append(list(opt.rho))


# -- 1. a per-array reference written from the update ---------------------------------------------


def sgd_step(ps, grads, bufs, *, lr, momentum=0.0, weight_decay=0.0, nesterov=False):
    """torch.optim.SGD (dampening 0), one array at a time."""
    new = []
    for i, (p, g) in enumerate(zip(ps, grads)):
        d = g + weight_decay * p
        if momentum:
            bufs[i] = d.copy() if bufs[i] is None else momentum * bufs[i] + d
            d = d + momentum * bufs[i] if nesterov else bufs[i]
        new.append(p - lr * d)
    return new


def adam_step(ps, grads, state, *, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
    """torch.optim.Adam (L2 weight decay, no amsgrad), one array at a time."""
    b1, b2 = betas
    state["t"] = t = state.get("t", 0) + 1
    m, v = state.setdefault("m", [np.zeros_like(p) for p in ps]), state.setdefault("v", [np.zeros_like(p) for p in ps])
    new = []
    for i, (p, g) in enumerate(zip(ps, grads)):
        g = g + weight_decay * p
        m[i] = b1 * m[i] + (1 - b1) * g
        v[i] = b2 * v[i] + (1 - b2) * g * g
        denom = np.sqrt(v[i]) / math.sqrt(1 - b2**t) + eps
        new.append(p - lr / (1 - b1**t) * m[i] / denom)
    return new


def reference_lets(ps, train, val, steps, *, base, kw, rhos, betas, groups, adaptive, eta, hessian, rho_min):
    """LETS-SAM / LETS-ASAM per array: the SAM (ASAM) step of group k perturbing by ρ_k·u, then
    ρ_k ← max(ρ_k − β_k·h_k, ρ_min), h_k = −η(L_val − L_tr)(θ⁺)·Σ_{i∈k}(∇L_val − ∇L_tr)(θ⁺)_i·(H u)_i
    with H ≈ diag(g̃²) or I, u = a g/(‖g‖ + 1e-12), a = 1 or (|θ|+η_a)²."""
    ps = [p.copy() for p in ps]
    rhos = list(rhos)
    group_of = {i: k for k, idx in enumerate(groups) for i in idx}
    bufs, adam_state, trajectory = [None] * len(ps), {}, []
    lr = kw["lr"]
    for t in range(steps):
        (X, y), (Xv, yv) = train[t % len(train)], val[t % len(val)]
        _, g = loss_grad(ps, X, y)
        if adaptive:
            a = [(np.abs(p) + eta) ** 2 for p in ps]
            norm = math.sqrt(sum(float((((np.abs(p) + eta) * gi) ** 2).sum()) for p, gi in zip(ps, g)))
        else:
            a = [np.ones_like(p) for p in ps]
            norm = math.sqrt(sum(float((gi**2).sum()) for gi in g))
        u = [ai * gi / (norm + EPS) for ai, gi in zip(a, g)]
        _, gt = loss_grad([p + rhos[group_of[i]] * ui for i, (p, ui) in enumerate(zip(ps, u))], X, y)
        if base == "sgd":
            ps = sgd_step(ps, gt, bufs, **kw)
        else:
            ps = adam_step(ps, gt, adam_state, **kw)
        hu = [gti * gti * ui if hessian == "diag" else ui for gti, ui in zip(gt, u)]
        lt, g_tr = loss_grad(ps, X, y)
        lv, g_val = loss_grad(ps, Xv, yv)
        for k, idx in enumerate(groups):
            h = -lr * (lv - lt) * sum(float(((g_val[i] - g_tr[i]) * hu[i]).sum()) for i in idx)
            rhos[k] = max(rhos[k] - betas[k] * h, rho_min)
        trajectory.append(list(rhos))
    return ps, trajectory


BASES = [
    ("sgd", dict(lr=0.3, momentum=0.9, weight_decay=5e-4, nesterov=True)),
    ("adam", dict(lr=0.03, weight_decay=1e-3)),
]
# (adaptive, hessian, ρ_0, β per base): β chosen so that ρ travels to about 2-4 ρ_0 in 30 steps
# (on this problem the gap keeps its sign and ρ grows).
CASES = [
    (False, "diag", 0.05, {"sgd": 10.0, "adam": 100.0}),
    (True, "diag", 0.5, {"sgd": 300.0, "adam": 3000.0}),
    (False, "identity", 0.05, {"sgd": 0.3, "adam": 3.0}),
    (True, "identity", 0.5, {"sgd": 3.0, "adam": 100.0}),
]


@pytest.mark.parametrize("base, kw", BASES, ids=[b for b, _ in BASES])
@pytest.mark.parametrize("adaptive, hessian, rho, beta", CASES, ids=[f"{'ASAM' if c[0] else 'SAM'}-{c[1]}" for c in CASES])
@pytest.mark.parametrize("grouped", [False, True], ids=["one-group", "two-groups"])
def test_matches_the_per_array_reference(base, kw, adaptive, hessian, rho, beta, grouped):
    from sharpness.numpy import LETS

    steps = 30
    beta = beta[base]
    train, val = make_data(1)
    groups = [[0], [1]] if grouped else [[0, 1]]
    rhos = [rho, 2 * rho] if grouped else [rho]
    betas = [beta, 0.5 * beta] if grouped else [beta]
    ref_ps, ref_traj = reference_lets(
        init_params(), train, val, steps, base=base, kw=kw, rhos=rhos, betas=betas, groups=groups,
        adaptive=adaptive, eta=0.01, hessian=hessian, rho_min=1e-4,
    )
    params = init_params()
    opt = LETS(params, rho=rhos, rho_lr=betas, hessian=hessian, groups=groups if grouped else None,
               adaptive=adaptive, eta=0.01, base=base, **kw)
    traj: list[list[float]] = []
    run(opt, train, val, steps, record=traj)
    # ρ really moves (a LETS that never updates it fails here).
    assert ref_traj[-1][0] > 1.5 * rho, ref_traj[-1]
    np.testing.assert_allclose(np.array(traj), np.array(ref_traj), rtol=1e-9, atol=1e-12)
    for p, q in zip(params, ref_ps):
        np.testing.assert_allclose(p, q, rtol=1e-9, atol=1e-12)
    assert opt.lets_state["updates"] == steps
    assert all(h is not None and math.isfinite(h) for h in opt.lets_state["hypergrad"])


# -- 2. rho_lr = 0 is sharpness.numpy.SAM bit for bit ----------------------------------------------


@pytest.mark.parametrize("adaptive", [False, True], ids=["SAM", "ASAM"])
@pytest.mark.parametrize("base, kw", [("sgd", dict(lr=0.1, momentum=0.9, weight_decay=5e-4)), ("adamw", dict(lr=1e-2))],
                         ids=["sgd", "adamw"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_zero_rho_lr_is_sam_bit_for_bit(adaptive, base, kw, dtype):
    from sharpness.numpy import LETS, SAM

    train, val = make_data(2, dtype=dtype)
    rho = 0.5 if adaptive else 0.05
    ps = [init_params(3, dtype) for _ in range(3)]
    sam = SAM(ps[0], rho=rho, adaptive=adaptive, base=base, **kw)
    frozen = LETS(ps[1], rho=rho, rho_lr=0.0, adaptive=adaptive, base=base, **kw)
    learning = LETS(ps[2], rho=rho, rho_lr=300.0, adaptive=adaptive, base=base, **kw)
    for t in range(12):
        grad_fn, val_fn = fns(train, val, t)
        sam.step(grad_fn)
        frozen.step(grad_fn, val_fn)
        learning.step(grad_fn, val_fn)
    for p, q in zip(ps[0], ps[1]):
        np.testing.assert_array_equal(p, q)
    s_sd, f_sd = sam.state_dict(), frozen.state_dict()
    for a, b in zip(s_sd["state"], f_sd["state"]):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert frozen.rho == [rho]
    assert all(h is not None and math.isfinite(h) for h in frozen.lets_state["hypergrad"])  # computed, not applied
    # ... and a learning ρ does change the trajectory (the comparison above can fail).
    assert learning.rho != [rho]
    assert not all(np.array_equal(p, q) for p, q in zip(ps[0], ps[2]))
    # Without val_grad_fn a step is SAM's.
    grad_fn, _ = fns(train, val, 0)
    sam.step(grad_fn)
    learning_rho = list(learning.rho)
    frozen.step(grad_fn)
    learning.step(grad_fn)
    assert learning.rho == learning_rho
    for p, q in zip(ps[0], ps[1]):
        np.testing.assert_array_equal(p, q)


# -- 3. the torch front on the same weights and gradients -----------------------------------------


def run_torch(opt, tparams, train, val, steps):
    """``sharpness.LETS`` with the gradients of ``loss_grad`` at its current weights."""
    traj = []
    for t in range(steps):
        grad_fn, val_fn = fns(train, val, t)

        def closure_of(f):
            def closure():
                loss, grads = f([p.detach().numpy() for p in tparams])
                for p, g in zip(tparams, grads):
                    p.grad = torch.from_numpy(g.copy())
                return torch.tensor(loss, dtype=torch.float64)

            return closure

        opt.step(closure_of(grad_fn), closure_of(val_fn))
        traj.append([g["sam_rho"] for g in opt.param_groups])
    return traj


@pytest.mark.parametrize("base, base_cls, kw", [
    ("sgd", torch.optim.SGD, dict(lr=0.3, momentum=0.9, weight_decay=5e-4)),
    ("adam", torch.optim.Adam, dict(lr=0.03)),
], ids=["sgd", "adam"])
@pytest.mark.parametrize(
    "adaptive, hessian, rho, beta", [CASES[0], CASES[1], CASES[3]], ids=["SAM-diag", "ASAM-diag", "ASAM-identity"]
)
@pytest.mark.parametrize("grouped", [False, True], ids=["one-group", "two-groups"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_agrees_with_the_torch_front(base, base_cls, kw, adaptive, hessian, rho, beta, grouped, dtype):
    import sharpness
    from sharpness.numpy import LETS

    steps = 25
    beta = beta[base]
    train, val = make_data(4, dtype=dtype)
    params = init_params(5, dtype)
    tparams = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in params]
    if grouped:  # the weights learn their radius, the biases stay at a frozen one
        opt = LETS(params, rho=[rho, 2 * rho], rho_lr=[beta, 0.0], groups=[[0], [1]], hessian=hessian,
                   adaptive=adaptive, eta=0.01, base=base, **kw)
        t_groups = [{"params": [tparams[0]]}, {"params": [tparams[1]], "sam_rho": 2 * rho, "lets_rho_lr": 0.0}]
    else:
        opt = LETS(params, rho=rho, rho_lr=beta, hessian=hessian, adaptive=adaptive, eta=0.01, base=base, **kw)
        t_groups = tparams
    t_opt = sharpness.LETS(t_groups, base_cls, rho=rho, rho_lr=beta, hessian=hessian, adaptive=adaptive, eta=0.01,
                           backend="rust", **kw)
    traj: list[list[float]] = []
    run(opt, train, val, steps, record=traj)
    t_traj = run_torch(t_opt, tparams, train, val, steps)
    rtol = 1e-9 if dtype == np.float64 else 1e-4
    assert t_traj[-1][0] > 1.1 * rho, t_traj[-1]
    np.testing.assert_allclose(np.array(traj), np.array(t_traj), rtol=rtol, atol=rtol * 1e-3)
    for p, q in zip(params, tparams):
        np.testing.assert_allclose(p, q.detach().numpy(), rtol=rtol, atol=rtol * 1e-2)
    assert opt.lets_state["updates"] == t_opt.sam_state["lets_updates"] == steps
    np.testing.assert_allclose(opt.lets_state["gap"], t_opt.sam_state["lets_gap"], rtol=rtol * 100)
    if grouped:
        assert opt.rho[1] == 2 * rho


# -- 4. the hypergradient against central differences through one unrolled step ------------------


def quadratic(seed, dim=7):
    rng = np.random.default_rng(seed)
    m = rng.normal(size=(dim, dim))
    a_mat = m @ m.T / dim + 0.5 * np.eye(dim)  # SPD, not diagonal
    m = rng.normal(size=(dim, dim))
    b_mat = m @ m.T / dim + 0.3 * np.eye(dim)
    a, b, theta0 = rng.normal(size=dim), rng.normal(size=dim), rng.normal(size=dim)

    def f_tr(t):
        return 0.5 * (t - a) @ a_mat @ (t - a), a_mat @ (t - a)

    def f_val(t):
        return 0.5 * (t - b) @ b_mat @ (t - b) + 0.1, b_mat @ (t - b)

    return theta0, a_mat, f_tr, f_val


def unrolled(theta0, rho0, f_tr, f_val, lr, adaptive, eta, delta=1e-5):
    """dF/dρ by central differences through θ⁺(ρ) = θ − η∇L_tr(θ + ρu),
    F = ½(L_val(θ⁺) − L_tr(θ⁺))², and the chain rule for any stand-in ``hu`` of H u."""
    g = f_tr(theta0)[1]
    a = (np.abs(theta0) + eta) ** 2 if adaptive else np.ones_like(theta0)
    norm = float(np.linalg.norm((np.abs(theta0) + eta) * g)) if adaptive else float(np.linalg.norm(g))
    u = a * g / (norm + EPS)

    def theta1(rho):
        return theta0 - lr * f_tr(theta0 + rho * u)[1]

    def F(rho):
        t = theta1(rho)
        return 0.5 * (f_val(t)[0] - f_tr(t)[0]) ** 2

    fd = (F(rho0 + delta) - F(rho0 - delta)) / (2 * delta)
    t1 = theta1(rho0)
    (lv, gv), (lt, gt) = f_val(t1), f_tr(t1)

    def chain(hu):
        return float(-lr * (lv - lt) * ((gv - gt) @ hu))

    return fd, chain, u, f_tr(theta0 + rho0 * u)[1]


def lets_one_step(theta0, f_tr, f_val, *, lr, rho, adaptive, eta, hessian, beta=2.0):
    from sharpness.numpy import LETS

    theta = theta0.copy()
    opt = LETS([theta], rho=rho, rho_lr=beta, hessian=hessian, adaptive=adaptive, eta=eta, lr=lr)

    def wrap(f):
        return lambda ps: (lambda loss, g: (loss, [g]))(*f(ps[0]))

    opt.step(wrap(f_tr), wrap(f_val))
    return opt.lets_state["hypergrad"][0], opt.rho[0]


@pytest.mark.parametrize("adaptive", [False, True], ids=["SAM", "ASAM"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hypergradient_against_central_differences(adaptive, seed):
    theta0, a_mat, f_tr, f_val = quadratic(seed)
    lr, rho, eta = 0.1, 0.3 if adaptive else 0.05, 0.01
    exact, chain, u, g_tilde = unrolled(theta0, rho, f_tr, f_val, lr, adaptive, eta)
    # The chain rule with the true Hessian (constant on a quadratic) is the finite difference.
    assert chain(a_mat @ u) == pytest.approx(exact, rel=1e-7, abs=1e-12)
    # LETS is that chain rule with its stand-in for H, to float rounding.
    for hessian, hu in (("identity", u), ("diag", g_tilde * g_tilde * u)):
        h, new_rho = lets_one_step(theta0, f_tr, f_val, lr=lr, rho=rho, adaptive=adaptive, eta=eta, hessian=hessian)
        assert h == pytest.approx(chain(hu), rel=1e-10, abs=1e-15)
        assert new_rho == pytest.approx(max(rho - 2.0 * h, 1e-4), rel=1e-12)
        # How close the stand-in is, is not asserted: on these quadratics (seeds 0-5, measured)
        # h/exact ranged over 0.03-8.4 with H ≈ I and 1.2-60 with H ≈ diag(g̃²), and the sign was
        # wrong for 2 of 12 (I) and 5 of 12 (diag) cases: an approximation, not a bound.
    # With an isotropic Hessian H = sI the first-order hypergradient is exact up to the factor s.
    s = 1.7

    def iso_tr(t):
        return 0.5 * s * (t - 0.3) @ (t - 0.3), s * (t - 0.3)

    exact_iso, _, _, _ = unrolled(theta0, rho, iso_tr, f_val, lr, adaptive, eta)
    h_iso, _ = lets_one_step(theta0, iso_tr, f_val, lr=lr, rho=rho, adaptive=adaptive, eta=eta, hessian="identity")
    assert s * h_iso == pytest.approx(exact_iso, rel=1e-7)


# -- 5. checkpoints and the explicit calls ---------------------------------------------------------


@pytest.mark.parametrize("adaptive, base, kw", [(False, "sgd", dict(lr=0.3, momentum=0.9)), (True, "adam", dict(lr=0.03))],
                         ids=["SAM-sgd", "ASAM-adam"])
def test_state_dict_round_trip_mid_run(adaptive, base, kw):
    from sharpness.numpy import LETS

    train, val = make_data(6)
    rho, beta = (0.5, 3000.0) if adaptive else (0.05, 10.0)

    def make(ps, r=rho):
        return LETS(ps, rho=[r, r], rho_lr=[beta, beta / 2], groups=[[1], [0]], adaptive=adaptive, base=base, **kw)

    params = init_params(7)
    opt = make(params)
    run(opt, train, val, 10)
    saved, saved_params = copy.deepcopy(opt.state_dict()), [p.copy() for p in params]
    learned = list(opt.rho)
    assert learned != [rho, rho] and saved["lets"]["rho"] == learned and saved["lets"]["state"]["updates"] == 10
    run(opt, train, val, 10, start=10)

    resumed_params = init_params(8)  # other weights and radii: everything comes from the checkpoint
    for p, q in zip(resumed_params, saved_params):
        p[...] = q
    resumed = make(resumed_params, r=0.2)
    resumed.load_state_dict(saved)
    assert resumed.rho == learned
    run(resumed, train, val, 10, start=10)
    for p, q in zip(params, resumed_params):
        np.testing.assert_array_equal(p, q)
    assert resumed.rho == opt.rho
    assert resumed.lets_state == opt.lets_state
    # The saved dict is a copy: later steps did not change it.
    assert saved["lets"]["rho"] == learned


def test_explicit_calls_match_step_and_checkpoint_between_second_step_and_update_rho():
    from sharpness.numpy import LETS

    train, val = make_data(9)
    ps = [init_params(10) for _ in range(2)]
    opts = [LETS(p, rho=0.05, rho_lr=10.0, lr=0.3, momentum=0.9) for p in ps]
    for t in range(8):
        grad_fn, val_fn = fns(train, val, t)
        opts[0].step(grad_fn, val_fn)
        opt = opts[1]
        opt.first_step(grad_fn(ps[1])[1])
        with pytest.raises(RuntimeError, match="after second_step"):
            opt.update_rho(grad_fn, val_fn)
        with pytest.raises(RuntimeError, match="first_step called twice"):
            opt.first_step(grad_fn(ps[1])[1])
        opt.second_step(grad_fn(ps[1])[1])
        if t == 4:  # a checkpoint between the SAM step and its ρ update resumes it
            sd = copy.deepcopy(opt.state_dict())
            assert sd["lets"]["v"] is not None
            opts[1] = opt = LETS(ps[1], rho=0.05, rho_lr=10.0, lr=0.3, momentum=0.9)
            opt.load_state_dict(sd)
        calls = []
        counted = lambda f: lambda p: (calls.append(1), f(p))[1]  # noqa: E731
        assert opt.update_rho(counted(grad_fn), counted(val_fn)) is not None
        assert opt.update_rho(counted(grad_fn), counted(val_fn)) is None  # once per step, no calls
        assert len(calls) == 2
    for p, q in zip(*ps):
        np.testing.assert_array_equal(p, q)
    assert opts[0].rho == opts[1].rho != [0.05]


# -- 6. restoration, non-finite values, groups, bounds, bad arguments ------------------------------


def test_exact_restoration_and_a_failing_second_pass():
    from sharpness.numpy import LETS

    train, val = make_data(11)
    params = init_params(12)
    before = [p.copy() for p in params]
    opt = LETS(params, rho=0.5, rho_lr=10.0, adaptive=True, lr=0.0)  # lr 0: the step must give θ back
    run(opt, train, val, 3)
    for p, q in zip(params, before):
        np.testing.assert_array_equal(p, q)
    grad_fn, val_fn = fns(train, val, 0)
    calls = []

    def failing(ps):
        calls.append(1)
        if len(calls) == 2:
            assert not np.array_equal(ps[0], before[0])  # called at the perturbed weights
            raise KeyError("boom")
        return grad_fn(ps)

    with pytest.raises(KeyError):
        opt.step(failing, val_fn)
    for p, q in zip(params, before):
        np.testing.assert_array_equal(p, q)
    assert not opt.perturbed and opt.update_rho(grad_fn, val_fn) is None
    opt.step(grad_fn, val_fn)  # usable afterwards


def test_nonfinite_values_never_reach_the_weights_or_rho():
    from sharpness.numpy import LETS

    train, val = make_data(13)
    params = init_params(14)
    opt = LETS(params, rho=0.05, rho_lr=30.0, lr=0.1)
    run(opt, train, val, 3)
    rho, grad_fn, val_fn = list(opt.rho), *fns(train, val, 3)
    # A NaN in the first gradient: no perturbation, ρ not updated (and no extra calls).
    calls = []

    def nan_first(ps):
        calls.append(1)
        loss, g = grad_fn(ps)
        if len(calls) == 1:
            g[0] = g[0].copy()
            g[0][0, 0] = np.nan
        return loss, g

    expected = [p.copy() for p in params]
    sgd = [p - 0.1 * g for p, g in zip(expected, grad_fn(expected)[1])]  # the plain step at θ
    opt.step(nan_first, val_fn)
    assert len(calls) == 2 and opt.state_dict()["nonfinite_steps"] == 1
    for p, q in zip(params, sgd):
        np.testing.assert_allclose(p, q, rtol=1e-12)
    assert opt.rho == rho and opt.lets_state["updates"] == 3
    # An infinite validation loss: a non-finite hypergradient, counted, not applied.
    opt.step(grad_fn, lambda ps: (math.inf, val_fn(ps)[1]))
    assert opt.rho == rho and opt.lets_state["nonfinite_hypergrads"] == 1
    assert not math.isfinite(opt.lets_state["hypergrad"][0])
    # A finite hypergradient whose step on ρ overflows: not applied either.
    opt.rho_lr[0] = 1e308
    opt.step(grad_fn, lambda ps: (1e300, val_fn(ps)[1]))
    assert math.isfinite(opt.lets_state["hypergrad"][0])
    assert opt.rho == rho and opt.lets_state["nonfinite_hypergrads"] == 2
    assert all(np.isfinite(p).all() for p in params)
    opt.rho_lr[0] = 30.0
    run(opt, train, val, 2)  # and it goes on learning
    assert opt.rho != rho


def test_groups_rho_bounds_and_mixed_dtypes():
    from sharpness.numpy import LETS

    train, val = make_data(15)
    W, b = init_params(16)
    extra = np.zeros(2, dtype=np.float32)  # a float32 array in the first group

    def with_extra(f):
        return lambda ps: (lambda loss, g: (loss, g + [np.ones(2, np.float32)]))(*f(ps[:2]))

    params = [W, b, extra]
    opt = LETS(params, rho=[0.05, 0.0], rho_lr=1e6, rho_max=0.08, groups=[[0, 2], [1]], lr=0.3)
    b0 = b.copy()
    for t in range(6):
        grad_fn, val_fn = fns(train, val, t)
        opt.step(with_extra(grad_fn), with_extra(val_fn))
        assert opt.lets_state["hypergrad"][1] is None  # ρ = 0: never learned
        assert 1e-4 <= opt.rho[0] <= 0.08
    assert opt.rho[1] == 0.0 and opt.rho[0] != 0.05
    assert not np.array_equal(b, b0) and extra.dtype == np.float32 and np.all(extra < 0)
    # A schedule may set ρ between steps; a bad value is refused at the next step.
    opt.rho[0] = 0.02
    grad_fn, val_fn = fns(train, val, 0)
    opt.step(with_extra(grad_fn), with_extra(val_fn))
    opt.rho[0] = -1.0
    with pytest.raises(ValueError, match=r"rho\[0\]"):
        opt.step(with_extra(grad_fn), with_extra(val_fn))
    opt.rho[0] = 0.02
    # Every ρ zero: plain base steps, nothing to learn from.
    opt.rho = [0.0, 0.0]
    updates, before = opt.lets_state["updates"], [p.copy() for p in params]
    opt.step(with_extra(grad_fn), with_extra(val_fn))
    assert opt.rho == [0.0, 0.0] and opt.lets_state["updates"] == updates
    assert not np.array_equal(params[0], before[0])  # the base step was taken


def test_bad_arguments():
    from sharpness.numpy import LETS, SAM

    w = np.zeros(3)
    grad_fn = lambda ps: (0.0, [ps[0] - 1.0])  # noqa: E731
    with pytest.raises(ValueError, match="hessian"):
        LETS([w], hessian="full")
    with pytest.raises(ValueError, match="rho_lr"):
        LETS([w], rho_lr=-1.0)
    with pytest.raises(ValueError, match="rho_lr"):
        LETS([w], rho_lr=math.nan)
    with pytest.raises(TypeError, match="rho_lr"):
        LETS([w], rho_lr="1")
    with pytest.raises(ValueError, match="rho must be >= 0"):
        LETS([w], rho=-0.1)
    with pytest.raises(ValueError, match="rho has 2 entries"):
        LETS([w], rho=[0.1, 0.2])
    with pytest.raises(ValueError, match="rho_min"):
        LETS([w], rho_min=0.5, rho_max=0.1)
    with pytest.raises(ValueError, match="rho_min"):
        LETS([w], rho_min=-1.0)
    with pytest.raises(TypeError, match="rho_min"):
        LETS([w], rho_min=None)
    with pytest.raises(ValueError, match="maximize"):
        LETS([w], maximize=True)
    with pytest.raises(TypeError, match="unknown argument"):
        LETS([w], rho_lr=1.0, betas=(0.9, 0.99))
    with pytest.raises(TypeError, match="list of numpy arrays"):
        LETS(w)
    v = np.zeros(2)
    with pytest.raises(ValueError, match="missing"):
        LETS([w, v], groups=[[0]])
    with pytest.raises(ValueError, match="more than one group"):
        LETS([w, v], groups=[[0, 1], [1]])
    with pytest.raises(ValueError, match="outside"):
        LETS([w, v], groups=[[0, 2]])
    with pytest.raises(ValueError, match="empty"):
        LETS([w, v], groups=[[0, 1], []])
    with pytest.raises(TypeError, match="parameter index"):
        LETS([w, v], groups=[[0, "1"]])
    with pytest.raises(TypeError, match="groups"):
        LETS([w, v], groups=3)
    opt = LETS([w], lr=0.1)
    with pytest.raises(TypeError, match="callable"):
        opt.step(grad_fn, val_grad_fn=3)
    with pytest.raises(TypeError, match="callable"):
        opt.step(None)
    with pytest.raises(TypeError, match="pair"):
        opt.step(grad_fn, lambda ps: 1.0)
    with pytest.raises(ValueError, match="shape"):
        opt.step(grad_fn, lambda ps: (0.0, [np.zeros(4)]))
    with pytest.raises(RuntimeError, match="without first_step"):
        opt.second_step([np.zeros(3)])
    with pytest.raises(ValueError, match="lacks 'lets'"):
        opt.load_state_dict(SAM([np.zeros(3)], lr=0.1).state_dict())
    two = LETS([w, v], groups=[[0], [1]])
    with pytest.raises(ValueError, match="groups"):
        two.load_state_dict(LETS([np.zeros(3), np.zeros(2)]).state_dict())
    assert "LETS(" in repr(two) and "hessian='diag'" in repr(two)
