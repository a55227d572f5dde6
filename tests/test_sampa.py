"""SAMPa against a per-tensor reference written here from the paper (Xie, Pethick, Cevher,
NeurIPS 2024, arXiv:2410.10683, eq. SAMPa-λ), its limits, and its APIs."""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch
from _family import assert_close, assert_equal, batches, grads_at, loss_of, make_model
from _numpy_family import SGDRef, assert_arrays, dot, torch_closure, torch_params

import sharpness
from sharpness import numpy as snp


def flat_dot(a, b):
    return sum(float((u.double() * v.double()).sum()) for u, v in zip(a, b))


def set_weights(params, values):
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)


def reference_sampa(model, base, data, rho, lam, data_x=None, points=None):
    """Per tensor, from the paper: x̃_t = x_t + ρ∇f(y_t)/‖∇f(y_t)‖, y_{t+1} = x_t − η∇f(y_t),
    x_{t+1} = x_t − η[(1−λ)∇f(x̃_t) + λ∇f(y_{t+1})], with ∇f(y_0) = 0; a non-SGD base optimizer
    steps x_t with that combined gradient. ``data_x[t]`` is the batch for ∇f(x̃_t) (default the
    same as for ∇f(y_{t+1}))."""
    params = list(model.parameters())
    lrs = [g["lr"] for g in base.param_groups for _ in g["params"]]
    gy = [torch.zeros_like(p) for p in params]
    for t, (x, y) in enumerate(data):
        xt = [p.detach().clone() for p in params]
        norm = math.sqrt(flat_dot(gy, gy))
        set_weights(params, [w - lr * g for w, lr, g in zip(xt, lrs, gy)])  # y_{t+1}
        if points is not None:
            points.append([p.detach().clone() for p in params])
        g_y = grads_at(model, x, y)
        set_weights(params, [w + (rho / (norm + 1e-12)) * g for w, g in zip(xt, gy)])  # x̃_t
        if points is not None:
            points.append([p.detach().clone() for p in params])
        bx, by = (x, y) if data_x is None else data_x[t]
        g_x = grads_at(model, bx, by)
        set_weights(params, xt)
        for p, a, b in zip(params, g_x, g_y):
            p.grad = (1 - lam) * a + lam * b
        base.step()
        gy = g_y


def run(opt, model, data, api):
    for x, y in data:
        if api == "closure":

            def closure():
                opt.zero_grad()
                loss = loss_of(model, x, y)
                loss.backward()
                return loss

            opt.step(closure)
        else:
            opt.begin_step()
            loss_of(model, x, y).backward()
            opt.first_step(zero_grad=True)
            loss_of(model, x, y).backward()
            opt.second_step(zero_grad=True)


@pytest.mark.parametrize("backend", ["rust", "torch"])
@pytest.mark.parametrize("api", ["closure", "three-call"])
@pytest.mark.parametrize("rho, lam", [(0.1, 0.2), (0.05, 0.0), (0.2, 1.0)])
def test_sampa_matches_the_paper_with_sgd(backend, api, rho, lam):
    data = batches(24)
    ref = make_model()
    mine = copy.deepcopy(ref)
    reference_sampa(ref, torch.optim.SGD(ref.parameters(), lr=0.05, foreach=False), data, rho, lam)
    opt = sharpness.SAMPa(mine.parameters(), torch.optim.SGD, rho=rho, lam=lam, lr=0.05, backend=backend)
    run(opt, mine, data, api)
    assert_close(ref, mine)
    assert opt.stats["steps"] == 24
    if backend == "rust":
        assert opt.stats["fused_steps"] == 24


@pytest.mark.parametrize("backend", ["rust", "torch"])
@pytest.mark.parametrize(
    "base, kwargs",
    [
        (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)),
        (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2)),
        (torch.optim.Adam, dict(lr=1e-2)),
        (torch.optim.RMSprop, dict(lr=1e-3, momentum=0.5)),  # no fused kernel: its own step
    ],
)
def test_sampa_with_other_base_optimizers_feeds_them_the_combined_gradient(backend, base, kwargs):
    data = batches(20)
    ref = make_model()
    mine = copy.deepcopy(ref)
    reference_sampa(ref, base(ref.parameters(), foreach=False, **kwargs), data, 0.1, 0.2)
    opt = sharpness.SAMPa(mine.parameters(), base, rho=0.1, lam=0.2, backend=backend, **kwargs)
    run(opt, mine, data, "closure")
    assert_close(ref, mine, rtol=2e-5, atol=2e-6)


def test_per_group_learning_rates_drive_y():
    data = batches(20)
    ref = make_model()
    mine = copy.deepcopy(ref)

    def groups(m):
        rest = list(m[2].parameters()) + list(m[4].parameters())
        return [{"params": m[0].parameters(), "lr": 0.08}, {"params": rest}]

    reference_sampa(ref, torch.optim.SGD(groups(ref), lr=0.03, foreach=False), data, 0.1, 0.3)
    opt = sharpness.SAMPa(groups(mine), torch.optim.SGD, rho=0.1, lam=0.3, lr=0.03)
    run(opt, mine, data, "closure")
    assert_close(ref, mine)


@pytest.mark.parametrize("backend", ["rust", "torch"])
def test_lambda_zero_rho_zero_is_gradient_descent_at_x(backend):
    # x̃_t = x_t and d = ∇f(x_t): plain SGD, whatever y does.
    data = batches(20)
    ref = make_model()
    mine = copy.deepcopy(ref)
    base = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, foreach=False)
    for x, y in data:
        base.zero_grad()
        loss_of(ref, x, y).backward()
        base.step()
    opt = sharpness.SAMPa(mine.parameters(), torch.optim.SGD, rho=0.0, lam=0.0, lr=0.05, momentum=0.9, backend=backend)
    run(opt, mine, data, "closure")
    assert_close(ref, mine)


@pytest.mark.parametrize("backend", ["rust", "torch"])
def test_lambda_one_rho_zero_steps_with_the_gradient_at_y(backend):
    # d = ∇f(y_{t+1}) with y_{t+1} = x_t − η∇f(y_t): the extragradient-like "optimistic" limit.
    data = batches(20)
    ref = make_model()
    params = list(ref.parameters())
    gy = [torch.zeros_like(p) for p in params]
    for x, y in data:
        xt = [p.detach().clone() for p in params]
        set_weights(params, [w - 0.05 * g for w, g in zip(xt, gy)])
        gy = grads_at(ref, x, y)
        set_weights(params, [w - 0.05 * g for w, g in zip(xt, gy)])
    mine = make_model()
    opt = sharpness.SAMPa(mine.parameters(), torch.optim.SGD, rho=0.0, lam=1.0, lr=0.05, backend=backend)
    run(opt, mine, data, "closure")
    assert_close(ref, mine)


@pytest.mark.parametrize("backend", ["rust", "torch"])
def test_the_closure_sees_y_then_x_tilde_and_the_weights_end_at_x_next(backend):
    data = batches(6)
    ref = make_model()
    mine = copy.deepcopy(ref)
    expected = []
    reference_sampa(ref, torch.optim.SGD(ref.parameters(), lr=0.1, foreach=False), data, 0.3, 0.2, points=expected)
    opt = sharpness.SAMPa(mine.parameters(), torch.optim.SGD, rho=0.3, lam=0.2, lr=0.1, backend=backend)
    seen = []
    for x, y in data:

        def closure():
            seen.append([p.detach().clone() for p in mine.parameters()])
            opt.zero_grad()
            loss = loss_of(mine, x, y)
            loss.backward()
            return loss

        before = [p.detach().clone() for p in mine.parameters()]
        loss = opt.step(closure)
        torch.testing.assert_close(loss, loss_of_at(mine, seen[-2], x, y))  # the loss at y_{t+1}
        assert not all(torch.equal(a, b) for a, b in zip(before, mine.parameters()))
    assert len(seen) == len(expected) == 12
    for a, b in zip(seen, expected):
        for u, v in zip(a, b):
            torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6)
    assert_close(ref, mine)


def loss_of_at(model, weights, x, y):
    m = copy.deepcopy(model)
    set_weights(list(m.parameters()), weights)
    with torch.no_grad():
        return loss_of(m, x, y)


def test_two_closures_give_the_official_batch_pairing():
    # The official code takes ∇f(x̃_t) on the previous batch (the one ∇f(y_t) came from).
    data = batches(20)
    data_x = [data[0]] + data[:-1]
    ref = make_model()
    mine = copy.deepcopy(ref)
    base = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, foreach=False)
    reference_sampa(ref, base, data, 0.1, 0.2, data_x=data_x)
    opt = sharpness.SAMPa(mine.parameters(), torch.optim.SGD, rho=0.1, lam=0.2, lr=0.05, momentum=0.9)
    for (x, y), (px, py) in zip(data, data_x):

        def make(bx, by):
            def closure():
                opt.zero_grad()
                loss = loss_of(mine, bx, by)
                loss.backward()
                return loss

            return closure

        opt.step(make(px, py), make(x, y))  # the second closure gives ∇f(y_{t+1})
    assert_close(ref, mine)


@pytest.mark.parametrize("backend", ["rust", "torch"])
def test_three_call_api_equals_the_closure_api_bit_for_bit(backend):
    data = batches(12)
    a, b = make_model(), make_model()
    kw = dict(rho=0.1, lam=0.2, lr=0.05, momentum=0.9, backend=backend)
    run(sharpness.SAMPa(a.parameters(), torch.optim.SGD, **kw), a, data, "closure")
    run(sharpness.SAMPa(b.parameters(), torch.optim.SGD, **kw), b, data, "three-call")
    assert_equal(a, b)


@pytest.mark.parametrize("backend", ["rust", "torch"])
@pytest.mark.parametrize(
    "base, kwargs", [(torch.optim.SGD, dict(lr=0.05, momentum=0.9)), (torch.optim.AdamW, dict(lr=1e-2))]
)
def test_state_dict_round_trip_mid_run(backend, base, kwargs):
    data = batches(16)
    a = make_model()
    opt_a = sharpness.SAMPa(a.parameters(), base, rho=0.1, lam=0.2, backend=backend, **kwargs)
    run(opt_a, a, data, "closure")

    b = make_model()
    opt_b = sharpness.SAMPa(b.parameters(), base, rho=0.1, lam=0.2, backend=backend, **kwargs)
    run(opt_b, b, data[:7], "closure")  # ∇f(y_7) and its norm must survive
    buf = io.BytesIO()
    torch.save({"model": b.state_dict(), "opt": opt_b.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    saved_gy = ckpt["opt"]["sam"]["vectors"]["sampa_grad_y"]  # ∇f(y_7), for every parameter
    assert len(saved_gy) == len(list(b.parameters())) and all(bool(v.abs().sum() > 0) for v in saved_gy.values())
    c = make_model(seed=5)
    opt_c = sharpness.SAMPa(c.parameters(), base, rho=0.1, lam=0.2, backend=backend, **kwargs)
    c.load_state_dict(ckpt["model"])
    opt_c.load_state_dict(ckpt["opt"])
    run(opt_c, c, data[7:], "closure")
    assert_equal(a, c)


@pytest.mark.parametrize("backend", ["rust", "torch"])
def test_an_exception_in_the_closure_leaves_x_t(backend):
    model = make_model()
    opt = sharpness.SAMPa(model.parameters(), torch.optim.SGD, rho=0.1, lam=0.2, lr=0.05, backend=backend)
    run(opt, model, batches(3), "closure")
    before = [p.detach().clone() for p in model.parameters()]
    x, y = batches(1, seed=9)[0]
    for fail_at in (1, 2):
        calls = []

        def closure():
            calls.append(1)
            if len(calls) == fail_at:
                raise KeyError("boom")
            opt.zero_grad()
            loss = loss_of(model, x, y)
            loss.backward()
            return loss

        with pytest.raises(KeyError):
            opt.step(closure)
        for p, q in zip(model.parameters(), before):
            assert torch.equal(p, q)
    opt.step(lambda: loss_of(model, x, y).backward())  # usable afterwards


@pytest.mark.parametrize("backend", ["rust", "torch"])
def test_a_gradient_first_step_cannot_take_leaves_x_t(backend):
    """step(closure): a gradient at y that first_step refuses (sparse) raises with the weights back
    at x_t and nothing pending (begin_step had moved them to y)."""
    model = make_model()
    opt = sharpness.SAMPa(model.parameters(), torch.optim.SGD, rho=0.1, lam=0.2, lr=0.05, backend=backend)
    run(opt, model, batches(3), "closure")  # ∇f(y) ≠ 0: y differs from x_t
    before = [p.detach().clone() for p in model.parameters()]
    x, y = batches(1, seed=9)[0]

    def closure():
        opt.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        first = next(model.parameters())
        first.grad = first.grad.detach().to_sparse()
        return loss

    with pytest.raises(RuntimeError, match="sparse"):
        opt.step(closure)
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
    assert not opt.restore()  # nothing left pending


def test_hooks_fire_once_per_step_and_misuse_is_refused():
    model = make_model()
    opt = sharpness.SAMPa(model.parameters(), torch.optim.SGD, lr=0.05)
    calls = []
    opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    opt.register_step_post_hook(lambda *a: calls.append("post"))
    run(opt, model, batches(2), "three-call")
    run(opt, model, batches(2), "closure")
    assert calls == ["pre", "post"] * 4
    with pytest.raises(RuntimeError, match="begin_step"):
        opt.first_step()
    opt.begin_step()
    with pytest.raises(RuntimeError, match="first_step"):
        opt.second_step()
    with pytest.raises(RuntimeError):
        opt.state_dict()
    assert opt.restore()
    opt.found_inf, opt.grad_scale = torch.tensor(0.0), torch.tensor(1.0)  # what GradScaler.step sets
    with pytest.raises(RuntimeError, match="GradScaler"):
        opt.step()
    del opt.found_inf, opt.grad_scale
    with pytest.raises(ValueError, match="lam"):
        sharpness.SAMPa(model.parameters(), torch.optim.SGD, lam=1.5, lr=0.1)
    with pytest.raises(ValueError, match="adaptive"):
        sharpness.SAMPa(model.parameters(), torch.optim.SGD, adaptive=True, lr=0.1)
    # begin_step() belongs to the steps that take their first gradient elsewhere than at w
    with pytest.raises(RuntimeError, match="begin_step"):
        sharpness.SAM(model.parameters(), torch.optim.SGD, lr=0.1).begin_step()
    with pytest.raises(RuntimeError, match="begin_step"):
        snp.SAM([np.zeros(2)], lr=0.1).begin_step()


# -- non-finite ∇f(y) -----------------------------------------------------------------------------


def reference_sampa_skipping(model, base, data, rho, lam, bad):
    """As ``reference_sampa``, with ∇f(y_{t+1}) non-finite at the steps in ``bad``, skipped as
    documented: not kept (∇f(y_t), the last finite one or the zero start, stays), and that step's
    update is ∇f(x̃_t) alone; x̃_t is built from ∇f(y_t) as usual."""
    params = list(model.parameters())
    lr = base.param_groups[0]["lr"]
    gy = [torch.zeros_like(p) for p in params]
    for t, (x, y) in enumerate(data):
        xt = [p.detach().clone() for p in params]
        norm = math.sqrt(flat_dot(gy, gy))
        set_weights(params, [w - lr * g for w, g in zip(xt, gy)])  # y_{t+1}
        g_y = grads_at(model, x, y)
        set_weights(params, [w + (rho / (norm + 1e-12)) * g for w, g in zip(xt, gy)])  # x̃_t
        g_x = grads_at(model, x, y)
        set_weights(params, xt)
        if t in bad:
            d = g_x
        else:
            d = [(1 - lam) * a + lam * b for a, b in zip(g_x, g_y)]
            gy = g_y
        for p, v in zip(params, d):
            p.grad = v
        base.step()


@pytest.mark.parametrize("backend", ["rust", "torch"])
@pytest.mark.parametrize("api", ["closure", "three-call"])
@pytest.mark.parametrize("bad, value", [({0}, math.nan), ({4}, math.nan), ({3, 4, 9}, math.inf)])
def test_a_nonfinite_gradient_at_y_is_skipped_and_the_run_recovers(backend, api, bad, value):
    data = batches(14)
    ref = make_model()
    mine = copy.deepcopy(ref)
    reference_sampa_skipping(ref, torch.optim.SGD(ref.parameters(), lr=0.05, foreach=False), data, 0.1, 0.2, bad)
    opt = sharpness.SAMPa(mine.parameters(), torch.optim.SGD, rho=0.1, lam=0.2, lr=0.05, backend=backend)
    params = list(mine.parameters())
    for t, (x, y) in enumerate(data):

        def poison():  # one non-finite entry in ∇f(y_{t+1})
            if t in bad:
                with torch.no_grad():
                    params[2].grad.view(-1)[5] = value

        if api == "closure":

            def closure():
                opt.zero_grad()
                loss = loss_of(mine, x, y)
                loss.backward()
                return loss

            def closure_y():
                loss = closure()
                poison()
                return loss

            opt.step(closure, closure_y)
        else:
            opt.begin_step()
            loss_of(mine, x, y).backward()
            poison()
            opt.first_step(zero_grad=True)
            loss_of(mine, x, y).backward()
            opt.second_step(zero_grad=True)
        kept = [opt.vectors[p]["sampa_grad_y"] for p in params if "sampa_grad_y" in opt.vectors[p]]
        assert all(bool(torch.isfinite(g).all()) for g in kept), f"a non-finite ∇f(y) was kept at step {t}"
        assert math.isfinite(opt.sam_state["grad_y_norm"])
        assert all(bool(torch.isfinite(p).all()) for p in params)
    assert opt.stats["nonfinite_skips"] == len(bad)
    assert opt.stats["steps"] == len(data)
    assert_close(ref, mine)


# == the numpy front (sharpness.numpy.SAMPa: the same rule, numpy arrays) ===========================
# A small non-convex problem with hand-written gradients: pred = tanh(X W) v.


def np_problem(dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(40, 4)).astype(dtype)
    y = rng.normal(size=40).astype(dtype)
    W = (0.5 * rng.normal(size=(4, 3))).astype(dtype)
    v = (0.5 * rng.normal(size=3)).astype(dtype)
    return X, y, [W, v]


def np_loss_and_grads(X, y, params, rows=None):
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
    return lambda params: np_loss_and_grads(X, y, params, batch_rows(t))


def run_numpy(opt, X, y, steps, start=0):
    for t in range(start, start + steps):
        opt.step(grad_fn_for(X, y, t))


def np_reference_sampa(X, y, w, steps, rho, lam, base):
    """Per array, float64, from the paper (∇f(y_0) = 0); ``base`` steps with the combined gradient."""
    w = [p.astype(np.float64) for p in w]
    gy = [np.zeros_like(p) for p in w]
    for t in range(steps):
        norm = math.sqrt(dot(gy, gy))
        _, g_next = np_loss_and_grads(X, y, [a - base.lr * b for a, b in zip(w, gy)], batch_rows(t))
        _, g_x = np_loss_and_grads(X, y, [a + rho / (norm + 1e-12) * b for a, b in zip(w, gy)], batch_rows(t))
        w = base.step(w, [(1 - lam) * a + lam * b for a, b in zip(g_x, g_next)])
        gy = g_next
    return w


@pytest.mark.parametrize("rho, lam", [(0.1, 0.2), (0.3, 0.0), (0.05, 1.0)])
def test_numpy_sampa_matches_the_paper(rho, lam):
    X, y, w = np_problem(np.float64)
    expected = np_reference_sampa(X, y, w, 25, rho, lam, SGDRef(0.1))
    opt = snp.SAMPa(w, rho=rho, lam=lam, lr=0.1)
    run_numpy(opt, X, y, 25)
    assert_arrays(w, expected, rtol=1e-10, atol=1e-12)


def test_numpy_sampa_with_momentum_feeds_the_combined_gradient():
    X, y, w = np_problem(np.float64)
    expected = np_reference_sampa(X, y, w, 25, 0.1, 0.2, SGDRef(0.05, 0.9))
    opt = snp.SAMPa(w, rho=0.1, lam=0.2, lr=0.05, momentum=0.9)
    run_numpy(opt, X, y, 25)
    assert_arrays(w, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "np_base, torch_base, base_kw",
    [
        ("sgd", torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
        ("adamw", torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2)),
    ],
)
@pytest.mark.parametrize("api", ["step", "three-call"])
def test_the_numpy_front_follows_the_torch_front(np_base, torch_base, base_kw, api):
    """The same rule on the same gradients (``backend="rust"``: the same kernels), bit for bit."""
    X, y, w = np_problem(np.float32)
    tparams = torch_params(w)
    opt = snp.SAMPa(w, rho=0.1, lam=0.2, base=np_base, **base_kw)
    topt = sharpness.SAMPa(tparams, torch_base, rho=0.1, lam=0.2, backend="rust", **base_kw)
    for t in range(24):
        fn = grad_fn_for(X, y, t)
        if api == "step":
            opt.step(fn)
            topt.step(torch_closure(tparams, fn))
        else:
            opt.begin_step()
            assert opt.first_step(fn(w)[1])
            opt.second_step(fn(w)[1])
            closure = torch_closure(tparams, fn)
            topt.begin_step()
            closure()
            assert topt.first_step()
            closure()
            topt.second_step()
    assert_arrays(w, tparams, exact=True)
    assert opt.sam_state == topt.sam_state


def test_numpy_sampa_lambda_zero_rho_zero_is_the_base_optimizer_bit_for_bit():
    X, y, w0 = np_problem(np.float32)
    a, b = [p.copy() for p in w0], [p.copy() for p in w0]
    run_numpy(snp.SAMPa(a, rho=0.0, lam=0.0, lr=0.05, momentum=0.9), X, y, 15)
    run_numpy(snp.SAM(b, rho=0.0, lr=0.05, momentum=0.9), X, y, 15)  # rho = 0: the base optimizer
    assert_arrays(a, b, exact=True)


def test_numpy_state_dict_round_trip_mid_run():
    X, y, w0 = np_problem(np.float32)
    kw = dict(rho=0.1, lam=0.2, lr=0.05, momentum=0.9)
    a = [p.copy() for p in w0]
    run_numpy(snp.SAMPa(a, **kw), X, y, 14)
    b = [p.copy() for p in w0]
    opt_b = snp.SAMPa(b, **kw)
    run_numpy(opt_b, X, y, 6)  # ∇f(y) must survive
    sd = copy.deepcopy(opt_b.state_dict())
    c = [p.copy() for p in b]
    opt_c = snp.SAMPa(c, **kw)
    opt_c.load_state_dict(sd)
    run_numpy(opt_c, X, y, 8, start=6)
    assert_arrays(a, c, exact=True)


def test_numpy_sampa_three_calls_two_grad_fns_and_errors():
    X, y, w0 = np_problem(np.float32)
    a, b = [p.copy() for p in w0], [p.copy() for p in w0]
    opt_a = snp.SAMPa(a, rho=0.1, lam=0.2, lr=0.05)
    opt_b = snp.SAMPa(b, rho=0.1, lam=0.2, lr=0.05)
    for t in range(5):
        opt_a.step(grad_fn_for(X, y, t + 1), grad_fn_for(X, y, t))  # the second: the gradient at y
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
    with pytest.raises(RuntimeError, match="first_step"):
        opt_a.second_step(grad_fn_for(X, y, 0)(a)[1])
    with pytest.raises(RuntimeError):
        opt_a.state_dict()
    assert opt_a.restore()
    assert_arrays(a, before, exact=True)
    with pytest.raises(ValueError, match="lam"):
        snp.SAMPa([np.zeros(2)], lam=2.0)
    with pytest.raises(ValueError, match="adaptive"):
        snp.SAMPa([np.zeros(2)], adaptive=True)
    # gradients at y that first_step refuses (a wrong shape): back at x_t, nothing pending
    opt_a.step(grad_fn_for(X, y, 0))  # ∇f(y) ≠ 0: y differs from x_t
    before = [p.copy() for p in a]
    with pytest.raises(ValueError, match="shape"):
        opt_a.step(grad_fn_for(X, y, 1), lambda params: (0.0, [np.zeros((2, 2), np.float32), params[1]]))
    assert_arrays(a, before, exact=True)
    assert not opt_a.restore()


def np_reference_sampa_skipping(X, y, w, steps, rho, lam, base, bad):
    """``np_reference_sampa`` with ∇f(y_{t+1}) non-finite at the steps in ``bad``, skipped as
    documented: not kept (∇f(y_t), the last finite one or the zero start, stays) and that step's
    update is ∇f(x̃_t) alone."""
    w = [p.astype(np.float64) for p in w]
    gy = [np.zeros_like(p) for p in w]
    for t in range(steps):
        norm = math.sqrt(dot(gy, gy))
        _, g_x = np_loss_and_grads(X, y, [a + rho / (norm + 1e-12) * b for a, b in zip(w, gy)], batch_rows(t))
        if t in bad:
            w = base.step(w, g_x)
            continue
        _, g_next = np_loss_and_grads(X, y, [a - base.lr * b for a, b in zip(w, gy)], batch_rows(t))
        w = base.step(w, [(1 - lam) * a + lam * b for a, b in zip(g_x, g_next)])
        gy = g_next
    return w


@pytest.mark.parametrize("api", ["step", "three-call"])
@pytest.mark.parametrize("bad, value", [({0}, math.nan), ({4}, math.nan), ({3, 4, 9}, -math.inf)])
def test_numpy_sampa_skips_a_nonfinite_gradient_at_y_and_recovers(api, bad, value):
    X, y, w = np_problem(np.float64)
    expected = np_reference_sampa_skipping(X, y, w, 14, 0.1, 0.2, SGDRef(0.05, 0.9), bad)
    opt = snp.SAMPa(w, rho=0.1, lam=0.2, lr=0.05, momentum=0.9)
    for t in range(14):

        def grad_fn_y(params):
            loss, grads = grad_fn_for(X, y, t)(params)
            if t in bad:  # one non-finite entry in ∇f(y_{t+1})
                grads[0].reshape(-1)[5] = value
            return loss, grads

        if api == "step":
            opt.step(grad_fn_for(X, y, t), grad_fn_y)
        else:
            opt.begin_step()
            assert opt.first_step(grad_fn_y(w)[1])
            assert math.isfinite(opt.last_grad_norm) == (t not in bad)
            opt.second_step(grad_fn_for(X, y, t)(w)[1])
        sam = opt.state_dict()["sam"]
        kept = sam["vectors"]["sampa_grad_y"].values()
        assert all(np.isfinite(g).all() for g in kept), f"a non-finite ∇f(y) was kept at step {t}"
        assert math.isfinite(sam["state"]["grad_y_norm"])
        assert all(np.isfinite(p).all() for p in w)
    assert opt.state_dict()["sam"]["stats"]["nonfinite_skips"] == len(bad)
    assert_arrays(w, expected, rtol=1e-10, atol=1e-12)
