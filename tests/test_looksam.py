"""LookSAM and every-k SAM against a per-tensor reference written here from the paper
(Liu et al., CVPR 2022, Algorithm 1), and the limits that reduce them to SAM."""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch
from _family import assert_close, assert_equal, batches, flat_dot, grads_at, loss_of, make_model
from _numpy_family import SGDRef, assert_arrays, dot, torch_closure, torch_params

import sharpness
from sharpness import numpy as snp


def reference_looksam(model, base, data, rho, k, alpha, variant="paper"):
    """Per-tensor LookSAM: SAM with g_v kept every k steps; in between g + α‖g‖/‖g_v‖·g_v (the
    paper's Algorithm 1) or, ``variant="relative"``, g + α‖g‖/‖g_k‖·g_v (g_k: the first gradient
    of the last SAM step)."""
    params = list(model.parameters())
    g_v = None
    for t, (x, y) in enumerate(data):
        g = grads_at(model, x, y)
        if t % k == 0:
            norm = math.sqrt(flat_dot(g, g))
            g_k_norm = norm
            saved = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p, gi in zip(params, g):
                    p.add_(gi * (rho / (norm + 1e-12)))
            g_s = grads_at(model, x, y)
            c = flat_dot(g, g_s) / flat_dot(g, g)
            g_v = [b - c * a for a, b in zip(g, g_s)]
            with torch.no_grad():
                for p, w in zip(params, saved):
                    p.copy_(w)
            direction = g_s
        else:
            denominator = math.sqrt(flat_dot(g_v, g_v)) if variant == "paper" else g_k_norm
            scale = alpha * math.sqrt(flat_dot(g, g)) / denominator if alpha else 0.0
            direction = [a + scale * v for a, v in zip(g, g_v)]
        for p, d in zip(params, direction):
            p.grad = d
        base.step()


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
            loss_of(model, x, y).backward()
            if opt.first_step(zero_grad=True):
                loss_of(model, x, y).backward()
                opt.second_step(zero_grad=True)


@pytest.mark.parametrize("backend", ["rust", "torch"])
@pytest.mark.parametrize("api", ["closure", "two-call"])
@pytest.mark.parametrize("k, alpha", [(3, 0.7), (5, 1.5), (2, 0.0)])
def test_looksam_matches_the_paper(backend, api, k, alpha):
    data = batches(20)
    ref = make_model()
    mine = copy.deepcopy(ref)
    reference_looksam(ref, torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, foreach=False), data, 0.1, k, alpha)
    opt = sharpness.LookSAM(mine.parameters(), torch.optim.SGD, k=k, alpha=alpha, rho=0.1, lr=0.05, momentum=0.9, backend=backend)
    run(opt, mine, data, api)
    assert_close(ref, mine)
    assert opt.stats["steps"] == 20
    if backend == "rust":
        assert opt.stats["fused_steps"] == len(range(0, 20, k))
        assert opt.stats["fused_plain_steps"] == 20 - len(range(0, 20, k))


def test_looksam_with_adamw():
    data = batches(12)
    ref = make_model()
    mine = copy.deepcopy(ref)
    reference_looksam(ref, torch.optim.AdamW(ref.parameters(), lr=1e-2, foreach=False), data, 0.05, 4, 0.7)
    opt = sharpness.LookSAM(mine.parameters(), torch.optim.AdamW, k=4, alpha=0.7, rho=0.05, lr=1e-2)
    run(opt, mine, data, "closure")
    assert_close(ref, mine)


@pytest.mark.parametrize("variant", ["paper", "relative"])
def test_k_one_is_sam_bit_for_bit(variant):
    data = batches(10)
    a, b, c = make_model(), make_model(), make_model()
    run(sharpness.SAM(a.parameters(), torch.optim.SGD, rho=0.1, lr=0.05, momentum=0.9), a, data, "closure")
    run(sharpness.LookSAM(b.parameters(), torch.optim.SGD, k=1, alpha=0.7, rho=0.1, lr=0.05, momentum=0.9, variant=variant),
        b, data, "closure")
    run(sharpness.EveryKSAM(c.parameters(), torch.optim.SGD, k=1, rho=0.1, lr=0.05, momentum=0.9), c, data, "closure")
    assert_equal(a, b)
    assert_equal(a, c)


@pytest.mark.parametrize("variant", ["paper", "relative"])
def test_alpha_zero_is_every_k_sam_bit_for_bit(variant):
    data = batches(10)
    a, b = make_model(), make_model()
    run(sharpness.LookSAM(a.parameters(), torch.optim.SGD, k=3, alpha=0.0, rho=0.1, lr=0.05, momentum=0.9, variant=variant),
        a, data, "two-call")
    run(sharpness.EveryKSAM(b.parameters(), torch.optim.SGD, k=3, rho=0.1, lr=0.05, momentum=0.9), b, data, "two-call")
    assert_equal(a, b)


@pytest.mark.parametrize("variant", ["paper", "relative"])
def test_state_dict_round_trip_mid_cycle(variant):
    """Stopped between two SAM steps, g_v (and, for the relative form, ‖g_k‖) must survive."""
    data = batches(14)
    kw = dict(k=4, alpha=0.7, rho=0.1, lr=0.05, momentum=0.9, variant=variant)
    a = make_model()
    opt_a = sharpness.LookSAM(a.parameters(), torch.optim.SGD, **kw)
    run(opt_a, a, data, "closure")

    b = make_model()
    opt_b = sharpness.LookSAM(b.parameters(), torch.optim.SGD, **kw)
    run(opt_b, b, data[:6], "closure")  # stop between two SAM steps: g_v must survive
    buf = io.BytesIO()
    torch.save({"model": b.state_dict(), "opt": opt_b.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    assert ckpt["opt"]["sam"]["state"]["g_norm"] > 0
    c = make_model(seed=5)
    opt_c = sharpness.LookSAM(c.parameters(), torch.optim.SGD, **kw)
    c.load_state_dict(ckpt["model"])
    opt_c.load_state_dict(ckpt["opt"])
    run(opt_c, c, data[6:], "closure")
    assert_equal(a, c)


def test_one_pass_steps_fire_the_hooks_once():
    model = make_model()
    opt = sharpness.LookSAM(model.parameters(), torch.optim.SGD, k=2, rho=0.1, lr=0.05)
    calls = []
    opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    opt.register_step_post_hook(lambda *a: calls.append("post"))
    run(opt, model, batches(2), "two-call")
    run(opt, model, batches(2), "closure")
    assert calls == ["pre", "post"] * 4


def test_bad_arguments():
    model = make_model()
    with pytest.raises(ValueError, match="k must be"):
        sharpness.LookSAM(model.parameters(), torch.optim.SGD, k=0, lr=0.1)
    with pytest.raises(ValueError, match="alpha"):
        sharpness.LookSAM(model.parameters(), torch.optim.SGD, alpha=-1.0, lr=0.1)
    with pytest.raises(ValueError, match="k must be"):
        sharpness.EveryKSAM(model.parameters(), torch.optim.SGD, k=1.5, lr=0.1)


# == variant="relative": g_v kept at its size relative to the gradient (docs/research/looksam_stall.md) ==


def final_weights(model):
    return [p.detach().clone() for p in model.parameters()]


def distance(a, b):
    return math.sqrt(sum(float((p - q).double().pow(2).sum()) for p, q in zip(a, b)))


@pytest.mark.parametrize("backend", ["rust", "torch"])
@pytest.mark.parametrize("api", ["closure", "two-call"])
@pytest.mark.parametrize("k, alpha", [(3, 0.5), (4, 1.5)])
def test_relative_variant_matches_its_formula(backend, api, k, alpha):
    """g + α‖g‖/‖g_k‖·g_v between SAM steps, over 20 steps (five cycles and more); the paper's
    form ends elsewhere on the same data, so the comparison tells the two apart."""
    data = batches(20)
    ref, paper = make_model(), make_model()
    mine = copy.deepcopy(ref)
    sgd = dict(lr=0.05, momentum=0.9, foreach=False)
    reference_looksam(ref, torch.optim.SGD(ref.parameters(), **sgd), data, 0.1, k, alpha, variant="relative")
    reference_looksam(paper, torch.optim.SGD(paper.parameters(), **sgd), data, 0.1, k, alpha, variant="paper")
    opt = sharpness.LookSAM(mine.parameters(), torch.optim.SGD, k=k, alpha=alpha, rho=0.1, lr=0.05, momentum=0.9,
                            backend=backend, variant="relative")
    run(opt, mine, data, api)
    assert_close(ref, mine)
    assert distance(final_weights(paper), final_weights(mine)) > 1e-2
    assert opt.variant == "relative"


def test_relative_variant_with_adamw():
    data = batches(12)
    ref = make_model()
    mine = copy.deepcopy(ref)
    reference_looksam(ref, torch.optim.AdamW(ref.parameters(), lr=1e-2, foreach=False), data, 0.05, 4, 0.5, variant="relative")
    opt = sharpness.LookSAM(mine.parameters(), torch.optim.AdamW, k=4, alpha=0.5, rho=0.05, lr=1e-2, variant="relative")
    run(opt, mine, data, "closure")
    assert_close(ref, mine)


@pytest.mark.parametrize("variant", ["paper", "relative"])
def test_rho_zero_is_the_base_optimizer_bit_for_bit(variant):
    """ρ = 0: e = 0, so g_s = g and g_v = 0 exactly; every step is the base optimizer's own
    (``backend="torch"``), weights and momentum equal to torch's run bit for bit."""
    data = batches(12)
    ref = make_model()
    base = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    for x, y in data:
        base.zero_grad()
        loss_of(ref, x, y).backward()
        base.step()
    mine = make_model()
    opt = sharpness.LookSAM(mine.parameters(), torch.optim.SGD, k=3, alpha=0.7, rho=0.0, lr=0.05, momentum=0.9,
                            backend="torch", variant=variant)
    run(opt, mine, data, "closure")
    assert_equal(ref, mine)
    for p, q in zip(ref.parameters(), mine.parameters()):
        assert torch.equal(base.state[p]["momentum_buffer"], opt.state[q]["momentum_buffer"])
    assert opt.sam_state["gv_norm"] == 0.0 and opt.sam_state["g_norm"] > 0


def test_relative_variant_tends_to_the_base_optimizer_as_rho_vanishes():
    """The relative form's distance to the base optimizer's trajectory shrinks in proportion to ρ;
    the paper's form pushes a direction of size O(ρ) with norm α‖g‖ whatever ρ, and stays about as
    far from it as the base optimizer moves in all."""
    data = batches(12)
    start = final_weights(make_model())
    ref = make_model()
    base = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    for x, y in data:
        base.zero_grad()
        loss_of(ref, x, y).backward()
        base.step()
    plain = final_weights(ref)
    moved = distance(start, plain)

    def distance_to_plain(variant, rho):
        model = make_model()
        opt = sharpness.LookSAM(model.parameters(), torch.optim.SGD, k=3, alpha=0.7, rho=rho, lr=0.05, momentum=0.9,
                                backend="torch", variant=variant)
        run(opt, model, data, "closure")
        return distance(final_weights(model), plain)

    relative = {rho: distance_to_plain("relative", rho) for rho in (1e-3, 1e-5)}
    assert relative[1e-5] < 1e-4 * moved
    assert 30 < relative[1e-3] / relative[1e-5] < 300  # linear in ρ
    assert distance_to_plain("paper", 1e-5) > 0.5 * moved


def test_bad_variant_is_refused_on_both_fronts():
    model = make_model()
    with pytest.raises(ValueError, match="variant must be one of"):
        sharpness.LookSAM(model.parameters(), torch.optim.SGD, variant="normalized", lr=0.1)
    with pytest.raises(ValueError, match="variant must be one of"):
        snp.LookSAM([np.zeros(3)], variant=None, lr=0.1)


@pytest.mark.parametrize("base_cls", [torch.optim.Adam, torch.optim.RMSprop, torch.optim.NAdam])
def test_variant_state_does_not_hide_the_base_optimizers_first_step(base_cls):
    """torch optimizers initialise a parameter's state when it is empty; g_v, created in the same
    dict before the first base step, must not make Adam & co. skip that (KeyError 'step'):
    the torch backend (the base optimizer's own step) follows the fused rust one."""
    data = batches(6)
    final = {}
    for backend in ("torch", "rust"):
        model = make_model()
        opt = sharpness.LookSAM(model.parameters(), base_cls, k=2, alpha=0.7, rho=0.05, lr=1e-2, backend=backend)
        for x, y in data:

            def closure(x=x, y=y):
                opt.zero_grad()
                loss = loss_of(model, x, y)
                loss.backward()
                return loss

            opt.step(closure)
        assert "looksam_gv" in opt.state[next(model.parameters())]
        final[backend] = [p.detach().clone() for p in model.parameters()]
    for a, b in zip(final["torch"], final["rust"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# == the numpy front (sharpness.numpy.LookSAM / EveryKSAM: the same rule, numpy arrays) ==========
# A small non-convex problem with hand-written gradients, pred = tanh(X W) v, and a per-array
# float64 reference of the paper's algorithm with torch.optim.SGD's step (SGDRef).

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


def run_torch(opt, tparams, X, y, steps):
    """The torch front on the same gradients, computed in numpy from the current weights."""
    for t in range(steps):
        opt.step(torch_closure(tparams, grad_fn_for(X, y, t)))




def np_reference_looksam(X, y, w, steps, rho, k, alpha, base, variant="paper"):
    w = [p.astype(np.float64) for p in w]
    gv = None
    for t in range(steps):
        _, g = np_loss_and_grads(X, y, w, batch_rows(t))
        if t % k == 0:
            g_k_norm = math.sqrt(dot(g, g))
            s = rho / (g_k_norm + 1e-12)
            _, gs = np_loss_and_grads(X, y, [a + s * b for a, b in zip(w, g)], batch_rows(t))
            c = dot(g, gs) / dot(g, g)
            gv = [b - c * a for a, b in zip(g, gs)]
            d = gs
        else:
            denominator = math.sqrt(dot(gv, gv)) if variant == "paper" else g_k_norm
            scale = alpha * math.sqrt(dot(g, g)) / denominator if alpha else 0.0
            d = [a + scale * b for a, b in zip(g, gv)]
        w = base.step(w, d)
    return w



@pytest.mark.parametrize("k, alpha", [(3, 0.7), (4, 1.5), (2, 0.0)])
def test_numpy_looksam_matches_the_paper(k, alpha):
    X, y, w = np_problem(np.float64)
    expected = np_reference_looksam(X, y, w, 25, 0.1, k, alpha, SGDRef(0.1, 0.9))
    opt = snp.LookSAM(w, k=k, alpha=alpha, rho=0.1, lr=0.1, momentum=0.9)
    run_numpy(opt, X, y, 25)
    assert_arrays(w, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("k, alpha", [(3, 0.5), (4, 1.5)])
def test_numpy_relative_variant_matches_its_formula(k, alpha):
    X, y, w = np_problem(np.float64)
    expected = np_reference_looksam(X, y, w, 25, 0.1, k, alpha, SGDRef(0.1, 0.9), variant="relative")
    paper = np_reference_looksam(X, y, w, 25, 0.1, k, alpha, SGDRef(0.1, 0.9), variant="paper")
    opt = snp.LookSAM(w, k=k, alpha=alpha, rho=0.1, lr=0.1, momentum=0.9, variant="relative")
    run_numpy(opt, X, y, 25)
    assert_arrays(w, expected, rtol=1e-10, atol=1e-12)
    assert math.sqrt(dot([a - b for a, b in zip(w, paper)], [a - b for a, b in zip(w, paper)])) > 1e-3


@pytest.mark.parametrize("variant", ["paper", "relative"])
def test_numpy_rho_zero_is_the_base_step_bit_for_bit(variant):
    """ρ = 0: g_v = 0 exactly, every step the plain base step: SAM with ρ = 0 bit for bit, and
    SGD's formula (float64) to rounding."""
    X, y, w0 = np_problem(np.float64)
    a, b = [p.copy() for p in w0], [p.copy() for p in w0]
    run_numpy(snp.LookSAM(a, k=3, alpha=0.7, rho=0.0, lr=0.05, momentum=0.9, variant=variant), X, y, 15)
    run_numpy(snp.SAM(b, rho=0.0, lr=0.05, momentum=0.9), X, y, 15)
    assert_arrays(a, b, exact=True)
    base, expected = SGDRef(0.05, 0.9), [p.copy() for p in w0]
    for t in range(15):
        expected = base.step(expected, np_loss_and_grads(X, y, expected, batch_rows(t))[1])
    assert_arrays(a, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("k", [1, 3])
def test_numpy_every_k_sam_matches_the_reference(k):
    X, y, w = np_problem(np.float64)
    expected = np_reference_looksam(X, y, w, 25, 0.1, k, 0.0, SGDRef(0.1, 0.9))
    opt = snp.EveryKSAM(w, k=k, rho=0.1, lr=0.1, momentum=0.9)
    run_numpy(opt, X, y, 25)
    assert_arrays(w, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "np_cls, torch_cls, kw",
    [
        (snp.EveryKSAM, sharpness.EveryKSAM, dict(k=3)),
        (snp.LookSAM, sharpness.LookSAM, dict(k=3, alpha=0.7)),
        (snp.LookSAM, sharpness.LookSAM, dict(k=3, alpha=0.5, variant="relative")),
    ],
)
@pytest.mark.parametrize(
    "np_base, torch_base, base_kw",
    [
        ("sgd", torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
        ("adamw", torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2)),
    ],
)
def test_the_numpy_front_follows_the_torch_front(np_cls, torch_cls, kw, np_base, torch_base, base_kw):
    X, y, w = np_problem(np.float32)
    tparams = torch_params(w)
    opt = np_cls(w, rho=0.1, base=np_base, **kw, **base_kw)
    run_numpy(opt, X, y, 24)
    topt = torch_cls(tparams, torch_base, rho=0.1, backend="rust", **kw, **base_kw)
    run_torch(topt, tparams, X, y, 24)
    assert_arrays(w, tparams, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("base, kw", [("sgd", dict(lr=0.05, momentum=0.9)), ("adam", dict(lr=1e-2))])
def test_numpy_k_one_is_sam_bit_for_bit(base, kw):
    X, y, w0 = np_problem(np.float32)
    runs = []
    for cls, extra in (
        (snp.SAM, {}),
        (snp.EveryKSAM, dict(k=1)),
        (snp.LookSAM, dict(k=1, alpha=0.7)),
        (snp.LookSAM, dict(k=1, alpha=0.7, variant="relative")),
    ):
        w = [p.copy() for p in w0]
        run_numpy(cls(w, rho=0.1, base=base, **extra, **kw), X, y, 15)
        runs.append(w)
    for other in runs[1:]:
        assert_arrays(runs[0], other, exact=True)


@pytest.mark.parametrize("variant", ["paper", "relative"])
def test_numpy_alpha_zero_is_every_k_sam_bit_for_bit(variant):
    X, y, w0 = np_problem(np.float32)
    a, b = [p.copy() for p in w0], [p.copy() for p in w0]
    run_numpy(snp.LookSAM(a, k=3, alpha=0.0, rho=0.1, lr=0.05, momentum=0.9, variant=variant), X, y, 15)
    run_numpy(snp.EveryKSAM(b, k=3, rho=0.1, lr=0.05, momentum=0.9), X, y, 15)
    assert_arrays(a, b, exact=True)


def test_every_k_counts_passes_and_leaves_the_callers_gradients_alone():
    X, y, w = np_problem(np.float32)
    opt = snp.LookSAM(w, k=3, alpha=0.7, rho=0.1, lr=0.05)
    calls, seen = [], []

    def grad_fn(params):
        calls.append(1)
        loss, grads = np_loss_and_grads(X, y, params)
        seen.append([g.copy() for g in grads])
        seen[-1].append(grads)
        return loss, grads

    for _ in range(6):
        opt.step(grad_fn)
    assert len(calls) == 2 + 1 + 1 + 2 + 1 + 1
    for entry in seen:
        assert_arrays(entry[:2], entry[2], exact=True)
    assert not opt.perturbed


@pytest.mark.parametrize(
    "cls, kw",
    [(snp.LookSAM, dict(k=4, alpha=0.7)), (snp.LookSAM, dict(k=4, alpha=0.7, variant="relative")), (snp.EveryKSAM, dict(k=4))],
)
def test_numpy_state_dict_round_trip_mid_run(cls, kw):
    X, y, w0 = np_problem(np.float32)
    a = [p.copy() for p in w0]
    run_numpy(cls(a, rho=0.1, lr=0.05, momentum=0.9, **kw), X, y, 14)
    b = [p.copy() for p in w0]
    opt_b = cls(b, rho=0.1, lr=0.05, momentum=0.9, **kw)
    run_numpy(opt_b, X, y, 6)  # between two SAM steps: g_v must survive
    sd = copy.deepcopy(opt_b.state_dict())
    c = [p.copy() for p in b]
    opt_c = cls(c, rho=0.1, lr=0.05, momentum=0.9, **kw)
    opt_c.load_state_dict(sd)
    run_numpy(opt_c, X, y, 8, start=6)
    assert_arrays(a, c, exact=True)


def test_numpy_looksam_keeps_g_v_under_the_torch_front_key():
    """g_v lives in the per-parameter state on both fronts (checkpoint key "looksam_gv"), ‖g_v‖ and
    ‖g_k‖ in the method's scalars (state_dict()["sam"]["state"]["gv_norm"], ["g_norm"])."""
    X, y, w = np_problem(np.float64)
    _, g_k = np_loss_and_grads(X, y, w, batch_rows(0))
    opt = snp.LookSAM(w, k=3, alpha=0.7, rho=0.1, lr=0.05, variant="relative")
    run_numpy(opt, X, y, 2)
    sd = opt.state_dict()
    gv = [sd["state"][i]["looksam_gv"] for i in range(len(w))]
    assert sd["sam"]["state"]["gv_norm"] == pytest.approx(math.sqrt(dot(gv, gv)), rel=1e-12) and sd["sam"]["state"]["gv_norm"] > 0
    assert sd["sam"]["state"]["g_norm"] == pytest.approx(math.sqrt(dot(g_k, g_k)), rel=1e-12)


@pytest.mark.parametrize("front", ["torch", "numpy"])
def test_norm_weights_are_refused_on_both_fronts_before_anything_moves(front):
    """LookSAM's norms are its own: a group weight sam_norm_weight != 1 is refused at the step (the
    numpy front used to ignore it silently)."""
    X, y, w = np_problem(np.float64)
    if front == "numpy":
        opt = snp.LookSAM([{"params": w, "sam_norm_weight": 2.0}], k=2, rho=0.1, lr=0.05)
        before = [a.copy() for a in w]
        with pytest.raises(ValueError, match="sam_norm_weight"):
            opt.step(grad_fn_for(X, y, 0))
        assert_arrays(w, before, exact=True)
    else:
        params = torch_params(w)
        opt = sharpness.LookSAM([{"params": params, "sam_norm_weight": 2.0}], torch.optim.SGD, k=2, rho=0.1, lr=0.05)
        before = [p.detach().clone() for p in params]
        with pytest.raises(ValueError, match="sam_norm_weight"):
            opt.step(torch_closure(params, grad_fn_for(X, y, 0)))
        assert all(torch.equal(a, b) for a, b in zip(before, params))

