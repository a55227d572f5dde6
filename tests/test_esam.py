"""ESAM against a per-tensor reference written here from the paper and its official code (Du et
al., ICLR 2022, arXiv:2110.03141; github.com/dydjw9/Efficient_SAM), the β = γ = 1 limit (SAM),
seeds, checkpoints, and the first pass that computes no gradient for the tensors left out; on both
fronts (:class:`sharpness.ESAM`, :class:`sharpness.numpy.ESAM`), which run the same rule."""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch
from _family import assert_close, assert_equal, batches, make_model
from _numpy_family import AdamWRef, SGDRef, add, assert_arrays, copies, norm, torch_params
from torch import nn

import sharpness
from sharpness import numpy as snp


def per_sample(model, x, y):
    return nn.functional.cross_entropy(model(x), y, reduction="none")


def flat_dot(a, b):
    return sum(float((u.double() * v.double()).sum()) for u, v in zip(a, b))


BASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2)),
}


def reference_esam(model, base, data, rho, beta, gamma, seed):
    """ESAM per tensor. Each step: every tensor is kept with probability β (one float32 uniform
    per tensor, in parameter order, from a generator seeded with ``seed``; none drawn when β = 1);
    e = ρ·g/(‖g_S‖ + 1e-12)/β on the kept tensors S, the norm over S only; the ⌊γB⌋ samples with
    the largest L_i(w+e) − L_i(w); every tensor steps with the gradient of their mean loss at w+e."""
    gen = torch.Generator().manual_seed(seed)
    params = list(model.parameters())
    selections = []
    for x, y in data:
        if beta < 1:
            keep = (torch.rand(len(params), generator=gen, dtype=torch.float32) < beta).tolist()
        else:
            keep = [True] * len(params)
        for p in params:
            p.grad = None
        before = per_sample(model, x, y)
        before.mean().backward()
        g = [p.grad.clone() for p, k in zip(params, keep) if k]
        norm = math.sqrt(flat_dot(g, g))
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, k in zip(params, keep):
                if k:
                    p.add_(p.grad * (rho / (norm + 1e-12) / beta))
            after = per_sample(model, x, y)
        n_keep = max(1, math.floor(gamma * len(y) + 1e-9))
        rise = (after - before.detach()).tolist()
        idx = sorted(sorted(range(len(y)), key=lambda i: -rise[i])[:n_keep])
        selections.append(idx)
        for p in params:
            p.grad = None
        per_sample(model, x[idx], y[idx]).mean().backward()
        with torch.no_grad():
            for p, w in zip(params, saved):
                p.copy_(w)
        base.step()
    return selections


def closure_for(model, x, y):
    def closure(indices=None):
        xb, yb = (x, y) if indices is None else (x[indices], y[indices])
        return per_sample(model, xb, yb)

    return closure


def run(opt, model, data, api="closure"):
    """ESAM steps; returns the sample indices each second pass used."""
    used = []
    for x, y in data:
        if api == "closure":
            opt.step(closure_for(model, x, y))
            used.append(opt.last_selection.tolist())
        else:
            with opt.first_pass():
                losses = per_sample(model, x, y)
                losses.mean().backward()
            opt.first_step(zero_grad=True)
            with torch.no_grad():
                after = per_sample(model, x, y)
            idx = opt.select(losses.detach(), after)
            per_sample(model, x[idx], y[idx]).mean().backward()
            opt.second_step(zero_grad=True)
            used.append(idx.tolist())
    return used


def run_sam(opt, model, data):
    for x, y in data:

        def closure():
            opt.zero_grad()
            loss = per_sample(model, x, y).mean()
            loss.backward()
            return loss

        opt.step(closure)


@pytest.mark.parametrize("backend", ["rust", "torch"])
@pytest.mark.parametrize("base_name", list(BASES))
@pytest.mark.parametrize("beta, gamma", [(0.5, 0.5), (0.6, 1.0), (1.0, 0.25)])
def test_esam_matches_the_paper(backend, base_name, beta, gamma):
    # Not bit for bit: the reference computes ρ/(‖g‖+ε)/β·g in one float32 multiply where ESAM
    # scales g by 1/β, then by ρ/(‖g‖+ε); the norms are summed in another order; on "rust" the
    # base step is the fused kernel, which rounds differently from torch's SGD/AdamW.
    base_cls, kw = BASES[base_name]
    data = batches(20)
    ref = make_model()
    mine = copy.deepcopy(ref)
    sel_ref = reference_esam(ref, base_cls(ref.parameters(), foreach=False, **kw), data, 0.1, beta, gamma, seed=7)
    opt = sharpness.ESAM(mine.parameters(), base_cls, beta=beta, gamma=gamma, rho=0.1, seed=7, backend=backend, **kw)
    assert run(opt, mine, data) == sel_ref
    assert all(len(s) == max(1, int(gamma * 16)) for s in sel_ref)
    assert_close(ref, mine)
    if beta < 1:  # some steps perturbed only part of the tensors
        assert 0 < opt.stats["esam_perturbed_tensors"] < 20 * 6
    if backend == "rust":
        assert opt.stats["fused_steps"] == 20


@pytest.mark.parametrize("backend", ["rust", "torch"])
@pytest.mark.parametrize("base_name", list(BASES))
def test_beta_gamma_one_is_sam_bit_for_bit(backend, base_name):
    base_cls, kw = BASES[base_name]
    data = batches(20)
    a, b = make_model(), make_model()
    run_sam(sharpness.SAM(a.parameters(), base_cls, rho=0.1, backend=backend, **kw), a, data)
    opt = sharpness.ESAM(b.parameters(), base_cls, beta=1.0, gamma=1.0, rho=0.1, backend=backend, **kw)
    assert run(opt, b, data) == [list(range(16))] * 20
    assert_equal(a, b)


@pytest.mark.parametrize("backend", ["rust", "torch"])
def test_two_call_api_is_the_closure_step_bit_for_bit(backend):
    data = batches(12)
    a, b = make_model(), make_model()
    kw = dict(beta=0.5, gamma=0.5, rho=0.1, lr=0.05, momentum=0.9, seed=3, backend=backend)
    used_a = run(sharpness.ESAM(a.parameters(), torch.optim.SGD, **kw), a, data, "closure")
    used_b = run(sharpness.ESAM(b.parameters(), torch.optim.SGD, **kw), b, data, "two-call")
    assert used_a == used_b
    assert_equal(a, b)


@pytest.mark.parametrize("backend", ["rust", "torch"])
def test_selection_is_reproducible_from_the_seed(backend):
    data = batches(12)
    runs = []
    for seed in (11, 11, 12):
        m = make_model()
        opt = sharpness.ESAM(m.parameters(), torch.optim.SGD, beta=0.5, gamma=1.0, rho=0.2, lr=0.05, seed=seed, backend=backend)
        run(opt, m, data)
        runs.append((m, opt.stats["esam_perturbed_tensors"]))
    assert_equal(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1]
    assert any(not torch.equal(p, q) for p, q in zip(runs[0][0].parameters(), runs[2][0].parameters()))


@pytest.mark.parametrize("backend", ["rust", "torch"])
def test_first_pass_computes_no_gradient_for_the_tensors_left_out(backend):
    model = make_model()
    opt = sharpness.ESAM(model.parameters(), torch.optim.SGD, beta=0.5, gamma=0.5, rho=0.1, lr=0.05, seed=0, backend=backend)
    x, y = batches(1)[0]
    seen = []

    def closure(indices=None):
        seen.append([p.requires_grad for p in model.parameters()])
        return per_sample(model, x if indices is None else x[indices], y if indices is None else y[indices])

    first_calls = []
    for _ in range(6):
        seen.clear()
        opt.step(closure)
        assert len(seen) == 3
        first_calls.append(seen[0])  # at w: only the drawn tensors require a gradient
        assert seen[1] == seen[2] == [True] * 6  # ranking and second pass: all of them
        assert all(p.requires_grad for p in model.parameters())
    assert any(0 < sum(s) < 6 for s in first_calls)
    assert opt.stats["esam_perturbed_tensors"] == sum(sum(s) for s in first_calls)
    # The two-call API: the first pass leaves gradients for the drawn tensors only.
    opt.zero_grad()
    while True:
        with opt.first_pass() as keep:
            per_sample(model, x, y).mean().backward()
        if 0 < sum(keep) < 6:
            break
        opt.first_step(zero_grad=True)  # an all-or-nothing draw: take the step, draw again
        per_sample(model, x, y).mean().backward()
        opt.second_step(zero_grad=True)
    for p, k in zip(model.parameters(), keep):
        if k:
            assert p.grad is not None and bool(p.grad.any())
        else:  # torch's None, or (rust) a zero view the step treats as absent
            assert p.grad is None or not bool(p.grad.any())
    opt.first_step(zero_grad=True)
    per_sample(model, x, y).mean().backward()
    opt.second_step(zero_grad=True)
    assert opt.stats["layouts"] == 1  # toggling requires_grad rebuilt nothing


@pytest.mark.parametrize("backend", ["rust", "torch"])
def test_state_dict_round_trip_mid_run(backend):
    data = batches(14)
    kw = dict(beta=0.5, gamma=0.5, rho=0.1, lr=0.05, momentum=0.9, seed=5, backend=backend)
    a = make_model()
    used_a = run(sharpness.ESAM(a.parameters(), torch.optim.SGD, **kw), a, data)

    b = make_model()
    opt_b = sharpness.ESAM(b.parameters(), torch.optim.SGD, **kw)
    used_b = run(opt_b, b, data[:6])
    buf = io.BytesIO()
    torch.save({"model": b.state_dict(), "opt": opt_b.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    c = make_model(seed=9)
    opt_c = sharpness.ESAM(c.parameters(), torch.optim.SGD, **{**kw, "seed": 123})  # the generator comes from the checkpoint
    c.load_state_dict(ckpt["model"])
    opt_c.load_state_dict(ckpt["opt"])
    used_c = run(opt_c, c, data[6:])
    assert used_b + used_c == used_a
    assert_equal(a, c)


def test_select_keeps_the_largest_rises_in_order():
    opt = sharpness.ESAM(make_model().parameters(), torch.optim.SGD, gamma=0.5, lr=0.1)
    before = torch.zeros(6)
    after = torch.tensor([0.1, 0.9, -0.3, 0.5, 0.7, 0.0])
    assert opt.select(before, after).tolist() == [1, 3, 4]
    opt.gamma = 0.01
    assert opt.select(before, after).tolist() == [1]  # at least one sample
    opt.gamma = 1.0
    assert opt.select(before, after).tolist() == list(range(6))
    with pytest.raises(ValueError, match="per-sample"):
        opt.select(before.sum(), after.sum())


def test_closure_must_return_per_sample_losses():
    model = make_model()
    opt = sharpness.ESAM(model.parameters(), torch.optim.SGD, lr=0.1)
    x, y = batches(1)[0]
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="per-sample losses"):
        opt.step(lambda indices=None: per_sample(model, x, y).mean())
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
    assert all(p.requires_grad for p in model.parameters())


def test_bad_arguments():
    params = make_model().parameters
    opt = sharpness.ESAM(params(), torch.optim.SGD, lr=0.1)
    for bad in (0.0, 1.5, True, "0.5"):
        with pytest.raises(ValueError, match="beta"):
            sharpness.ESAM(params(), torch.optim.SGD, beta=bad, lr=0.1)
        with pytest.raises(ValueError, match="gamma"):
            sharpness.ESAM(params(), torch.optim.SGD, gamma=bad, lr=0.1)
        with pytest.raises(ValueError, match="gamma"):
            opt.gamma = bad  # checked when set, too
    assert (opt.beta, opt.gamma) == (0.6, 0.5)


# -- a maximizing base optimizer: ESAM on −L ----------------------------------------------------


def test_select_with_maximize_keeps_the_largest_rises_of_minus_the_loss():
    # maximize=True perturbs along −g (SAM on −L), so the sharpest samples are those whose −L
    # rose most: L_i(w) − L_i(w + e) largest.
    opt = sharpness.ESAM(make_model().parameters(), torch.optim.SGD, gamma=0.25, lr=0.1, maximize=True)
    gen = torch.Generator().manual_seed(3)
    before, after = torch.randn(16, generator=gen), torch.randn(16, generator=gen)
    rise_of_minus_loss = [float(b - a) for b, a in zip(before, after)]
    expected = sorted(sorted(range(16), key=lambda i: -rise_of_minus_loss[i])[:4])
    rise_of_loss_choice = sorted(sorted(range(16), key=lambda i: rise_of_minus_loss[i])[:4])
    assert expected != rise_of_loss_choice  # the data tell the two rules apart
    assert opt.select(before, after).tolist() == expected
    opt.gamma = 0.5
    assert opt.select(before, after).tolist() == sorted(sorted(range(16), key=lambda i: -rise_of_minus_loss[i])[:8])


@pytest.mark.parametrize("backend", ["rust", "torch"])
@pytest.mark.parametrize("base_name", list(BASES))
@pytest.mark.parametrize("beta, gamma", [(0.5, 0.5), (1.0, 0.25)])
def test_maximize_on_the_loss_is_minimize_on_its_negation(backend, base_name, beta, gamma):
    base_cls, kw = BASES[base_name]
    data = batches(12)
    a, b = make_model(), make_model()
    opt_a = sharpness.ESAM(
        a.parameters(), base_cls, beta=beta, gamma=gamma, rho=0.1, seed=7, backend=backend, maximize=True, **kw
    )
    opt_b = sharpness.ESAM(b.parameters(), base_cls, beta=beta, gamma=gamma, rho=0.1, seed=7, backend=backend, **kw)
    for x, y in data:
        opt_a.step(closure_for(a, x, y))
        minus = closure_for(b, x, y)
        opt_b.step(lambda indices=None: -minus(indices))
        assert opt_a.last_selection.tolist() == opt_b.last_selection.tolist()
    assert_equal(a, b)


def test_select_refuses_groups_that_mix_maximize():
    m = make_model()
    groups = [{"params": m[0].parameters(), "maximize": True}, {"params": m[2].parameters()}]
    opt = sharpness.ESAM(groups, torch.optim.SGD, gamma=0.5, lr=0.1)
    with pytest.raises(ValueError, match="maximize"):
        opt.select(torch.zeros(4), torch.ones(4))
    opt.gamma = 1.0  # nothing to rank
    assert opt.select(torch.zeros(4), torch.ones(4)).tolist() == [0, 1, 2, 3]


# == the numpy front (sharpness.numpy.ESAM: the same rule over numpy arrays) ======================
# A two-layer tanh network with hand-written per-sample cross-entropies and gradients; the
# reference is written per array in float64 from the paper, with torch.optim's steps (SGDRef,
# AdamWRef). The numpy front's generator is numpy's: its draws are `random(n, dtype=float32)`.

NP_BATCH = 16  # a power of two: 1/B and 1/k are exact, so autograd's mean hands over g bit for bit
NP_BASES = {
    "sgd": (lambda: SGDRef(0.1, momentum=0.9, weight_decay=1e-3), dict(base="sgd", lr=0.1, momentum=0.9, weight_decay=1e-3)),
    "adamw": (lambda: AdamWRef(1e-2, weight_decay=0.05), dict(base="adamw", lr=1e-2, weight_decay=0.05)),
}
TORCH_BASES = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}


def np_problem(dtype=np.float64, seed=0):
    """Data (96 rows, 5 features, 3 classes) and the parameters ``[W1, b1, W2, b2]``."""
    rng = np.random.default_rng(seed)
    X, labels = rng.normal(size=(96, 5)), rng.integers(0, 3, 96)
    params = [0.5 * rng.normal(size=(5, 8)), 0.1 * rng.normal(size=8), 0.5 * rng.normal(size=(8, 3)), 0.1 * rng.normal(size=3)]
    return X, labels, [p.astype(dtype) for p in params]


def np_losses_and_grads(params, X, labels):
    """Per-sample cross-entropies of ``softmax(tanh(X W1 + b1) W2 + b2)`` and the gradients of
    their mean, in the parameters' dtype."""
    W1, b1, W2, b2 = params
    X = X.astype(W1.dtype)
    h = np.tanh(X @ W1 + b1)
    z = h @ W2 + b2
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    n = len(labels)
    losses = -np.log(p[np.arange(n), labels])
    dz = p.copy()
    dz[np.arange(n), labels] -= 1
    dz /= n
    dh = (dz @ W2.T) * (1 - h * h)
    return losses, [X.T @ dh, dh.sum(axis=0), h.T @ dz, dz.sum(axis=0)]


def np_batch(X, labels, t):
    rows = (np.arange(NP_BATCH) + 11 * t) % len(labels)
    return X[rows], labels[rows]


def np_grad_fn_for(X, labels, t):
    """Step ``t``'s ``grad_fn(params, indices)`` for the numpy front."""
    xb, yb = np_batch(X, labels, t)

    def grad_fn(params, indices=None):
        return np_losses_and_grads(params, xb, yb) if indices is None else np_losses_and_grads(params, xb[indices], yb[indices])

    return grad_fn


def np_run(opt, X, labels, steps, start=0):
    """Whole steps; returns the sample indices each second pass used."""
    used = []
    for t in range(start, start + steps):
        opt.step(np_grad_fn_for(X, labels, t))
        used.append(opt.last_selection.tolist())
    return used


def torch_per_sample_closure(tparams, grad_fn):
    """The torch front's closure on the same numpy losses and gradients: the per-sample losses of
    ``grad_fn`` plus ``Σ_p ⟨p − p.detach(), g_p⟩`` (zero), whose mean back-propagates exactly ``g``
    into the parameters that require a gradient (the batch sizes are powers of two)."""

    def closure(indices=None):
        losses, grads = grad_fn([p.detach().numpy() for p in tparams], None if indices is None else indices.numpy())
        link = sum(((p - p.detach()) * torch.from_numpy(g)).sum() for p, g in zip(tparams, grads) if p.requires_grad)
        return torch.from_numpy(losses) + link

    return closure


def np_reference_esam(X, labels, w, steps, rho, beta, gamma, base, rng):
    """ESAM per array, in float64. Each step: each array is kept with probability β (one float32
    uniform per array, in order, from ``rng``; none drawn when β = 1); e = ρ·g/(‖g_S‖ + 1e-12)/β on
    the kept arrays S, the norm over S only; the ⌊γB⌋ samples with the largest L_i(w+e) − L_i(w)
    (ties: the earlier); every array steps with the gradient of their mean loss at w + e."""
    w, selections, kept = copies(w), [], 0
    for t in range(steps):
        xb, yb = np_batch(X, labels, t)
        keep = (rng.random(len(w), dtype=np.float32) < beta).tolist() if beta < 1 else [True] * len(w)
        kept += sum(keep)
        before, g = np_losses_and_grads(w, xb, yb)
        g_norm = norm([x for x, k in zip(g, keep) if k])
        e = [rho * x / (g_norm + 1e-12) / beta if k else np.zeros_like(x) for x, k in zip(g, keep)]
        after, _ = np_losses_and_grads(add(w, e), xb, yb)
        rise = (after - before).tolist()
        idx = sorted(sorted(range(NP_BATCH), key=lambda i: -rise[i])[: max(1, math.floor(gamma * NP_BATCH + 1e-9))])
        selections.append(idx)
        _, g2 = np_losses_and_grads(add(w, e), xb[idx], yb[idx])
        w = base.step(w, g2)
    return w, selections, kept


@pytest.mark.parametrize("base", list(NP_BASES))
@pytest.mark.parametrize("beta, gamma", [(0.5, 0.5), (0.6, 1.0), (1.0, 0.25)])
def test_numpy_esam_matches_the_paper(base, beta, gamma):
    X, labels, w = np_problem()
    ref, kw = NP_BASES[base]
    expected, sel_ref, kept = np_reference_esam(X, labels, w, 12, 0.1, beta, gamma, ref(), np.random.default_rng(7))
    opt = snp.ESAM(w, beta=beta, gamma=gamma, rho=0.1, seed=7, **kw)
    assert np_run(opt, X, labels, 12) == sel_ref
    assert all(len(s) == max(1, int(gamma * NP_BATCH)) for s in sel_ref)
    assert_arrays(w, expected)
    assert opt.stats["esam_perturbed_tensors"] == kept
    if beta < 1:  # some steps perturbed only part of the arrays
        assert 0 < kept < 12 * 4


@pytest.mark.parametrize("kw", [NP_BASES["sgd"][1], NP_BASES["adamw"][1]], ids=list(NP_BASES))
def test_numpy_beta_gamma_one_is_sam_bit_for_bit(kw):
    X, labels, w0 = np_problem(np.float32)
    a, b = copies(w0), copies(w0)
    sam = snp.SAM(a, rho=0.1, **kw)
    for t in range(12):
        grad_fn = np_grad_fn_for(X, labels, t)
        sam.step(lambda params: (None, grad_fn(params)[1]))
    assert np_run(snp.ESAM(b, beta=1.0, gamma=1.0, rho=0.1, **kw), X, labels, 12) == [list(range(NP_BATCH))] * 12
    assert_arrays(a, b, exact=True)


class TorchDraws:
    """Stands in for the numpy front's generator with a torch.Generator's numbers: the numpy
    engine draws with ``generator.random(n, dtype=float32)``, the torch engines with
    ``torch.rand(n, generator=...)``; so both fronts draw the same tensors to perturb."""

    def __init__(self, seed):
        self.torch_generator = torch.Generator().manual_seed(seed)

    def random(self, size, dtype=np.float64):
        return torch.rand(size, generator=self.torch_generator, dtype=torch.float32).numpy().astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("base", list(NP_BASES))
@pytest.mark.parametrize("beta, gamma", [(0.5, 0.5), (1.0, 0.25)])
def test_numpy_front_follows_the_torch_front_on_the_same_gradients_and_draws(dtype, base, beta, gamma):
    """The same rule on both fronts: the same losses and gradients (computed once, in numpy), the
    same draws (the numpy front given the torch generator's numbers): the same selections, the
    same weights up to the rounding of the norm's sums (summed per array on the numpy engine, over
    the flat buffer on the Rust one)."""
    X, labels, w = np_problem(dtype)
    tparams = torch_params(w)
    kw = NP_BASES[base][1]
    np_opt = snp.ESAM(w, beta=beta, gamma=gamma, rho=0.1, **kw)
    np_opt.generator = TorchDraws(5)
    base_kw = {k: v for k, v in kw.items() if k != "base"}
    t_opt = sharpness.ESAM(tparams, TORCH_BASES[base], beta=beta, gamma=gamma, rho=0.1, seed=5, backend="rust", **base_kw)
    for t in range(12):
        grad_fn = np_grad_fn_for(X, labels, t)
        np_opt.step(grad_fn)
        t_opt.step(torch_per_sample_closure(tparams, grad_fn))
        assert np_opt.last_selection.tolist() == t_opt.last_selection.tolist()
        assert np_opt.last_grad_norm == pytest.approx(t_opt.last_grad_norm, rel=1e-5 if dtype == np.float32 else 1e-12)
    assert np_opt.stats["esam_perturbed_tensors"] == t_opt.stats["esam_perturbed_tensors"]
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    assert_arrays(w, tparams, rtol=rtol, atol=rtol * 0.1)


def test_each_front_draws_from_its_own_generator_with_probability_beta():
    """Each front draws from its own generator (torch.Generator, numpy's default_rng: other
    numbers for the same seed), so the fronts agree in distribution only: each tensor perturbed
    with probability β, independently."""
    X, labels, w = np_problem()
    np_opt = snp.ESAM(w, beta=0.3, gamma=1.0, rho=0.01, lr=0.01, seed=3)
    tparams = torch_params(np_problem()[2])
    t_opt = sharpness.ESAM(tparams, torch.optim.SGD, beta=0.3, gamma=1.0, rho=0.01, lr=0.01, seed=3)
    steps, draws = 150, {}
    for name, opt, run_step in (
        ("numpy", np_opt, lambda t: np_opt.step(np_grad_fn_for(X, labels, t))),
        ("torch", t_opt, lambda t: t_opt.step(torch_per_sample_closure(tparams, np_grad_fn_for(X, labels, t)))),
    ):
        per_step = []
        for t in range(steps):
            before = opt.stats["esam_perturbed_tensors"]
            run_step(t)
            per_step.append(opt.stats["esam_perturbed_tensors"] - before)
        fraction = sum(per_step) / (4 * steps)
        assert abs(fraction - 0.3) < 4 * math.sqrt(0.3 * 0.7 / (4 * steps)), (name, fraction)
        draws[name] = per_step
    assert draws["numpy"] != draws["torch"]  # two generators, two streams


def test_numpy_two_call_api_is_the_whole_step_bit_for_bit():
    X, labels, w0 = np_problem(np.float32)
    kw = dict(beta=0.5, gamma=0.5, rho=0.1, lr=0.05, momentum=0.9, seed=3)
    a, b = copies(w0), copies(w0)
    used_a = np_run(snp.ESAM(a, **kw), X, labels, 10)
    opt = snp.ESAM(b, **kw)
    used_b, partial = [], 0
    for t in range(10):
        grad_fn = np_grad_fn_for(X, labels, t)
        with opt.first_pass() as keep:
            losses, grads = grad_fn(b)
        partial += 0 < sum(keep) < 4
        # the arrays left out: their entries of grads are ignored (a NaN there changes nothing)
        grads = [g if k else np.full_like(g, np.nan) for g, k in zip(grads, keep)]
        assert opt.first_step(grads)
        idx = opt.select(losses, grad_fn(b)[0])
        opt.second_step(grad_fn(b, idx)[1])
        used_b.append(idx.tolist())
    assert partial  # some steps perturbed part of the arrays
    assert used_a == used_b
    assert_arrays(a, b, exact=True)


def test_numpy_first_step_without_first_pass_draws_itself():
    X, labels, w0 = np_problem(np.float32)
    kw = dict(beta=0.5, gamma=1.0, rho=0.1, lr=0.05, seed=4)
    a, b = copies(w0), copies(w0)
    np_run(snp.ESAM(a, **kw), X, labels, 8)
    opt = snp.ESAM(b, **kw)
    for t in range(8):
        grad_fn = np_grad_fn_for(X, labels, t)
        opt.first_step(grad_fn(b)[1])
        opt.second_step(grad_fn(b)[1])
    assert_arrays(a, b, exact=True)


def test_numpy_state_dict_round_trip_mid_run():
    X, labels, w0 = np_problem(np.float32)
    kw = dict(beta=0.5, gamma=0.5, rho=0.1, lr=0.05, momentum=0.9, seed=5)
    a = copies(w0)
    opt_a = snp.ESAM(a, **kw)
    used_a = np_run(opt_a, X, labels, 14)
    b = copies(w0)
    opt_b = snp.ESAM(b, **kw)
    used_b = np_run(opt_b, X, labels, 6)
    sd = copy.deepcopy(opt_b.state_dict())
    c = copies(b)
    np_run(opt_b, X, labels, 2, start=6)  # later steps leave the saved dict alone
    opt_c = snp.ESAM(c, **{**kw, "seed": 123})  # the generator comes from the checkpoint
    opt_c.load_state_dict(sd)
    used_c = np_run(opt_c, X, labels, 8, start=6)
    assert used_b + used_c == used_a
    assert_arrays(a, c, exact=True)
    assert opt_c.stats["esam_perturbed_tensors"] == opt_a.stats["esam_perturbed_tensors"]  # the stats resume too


@pytest.mark.parametrize("beta, gamma", [(0.5, 0.5), (1.0, 0.25)])
def test_numpy_maximize_on_the_loss_is_minimize_on_its_negation(beta, gamma):
    X, labels, w0 = np_problem()
    a, b = copies(w0), copies(w0)
    kw = dict(beta=beta, gamma=gamma, rho=0.1, seed=7, lr=0.05, momentum=0.9)
    opt_a, opt_b = snp.ESAM(a, maximize=True, **kw), snp.ESAM(b, **kw)
    for t in range(10):
        grad_fn = np_grad_fn_for(X, labels, t)

        def minus(params, indices=None, grad_fn=grad_fn):
            losses, grads = grad_fn(params, indices)
            return -losses, [-g for g in grads]

        opt_a.step(grad_fn)
        opt_b.step(minus)
        assert opt_a.last_selection.tolist() == opt_b.last_selection.tolist()
    assert_arrays(a, b, exact=True)


def test_numpy_select_keeps_the_largest_rises_in_order():
    opt = snp.ESAM(np_problem()[2], gamma=0.5, lr=0.1)
    before = np.zeros(6)
    after = np.array([0.1, 0.9, -0.3, 0.5, 0.7, 0.0])
    assert opt.select(before, after).tolist() == [1, 3, 4]
    assert opt.select(before, after).dtype == np.int64
    after[0] = np.nan  # ranked first, as torch.sort ranks NaN
    assert opt.select(before, after).tolist() == [0, 1, 4]
    opt.gamma = 0.01
    assert opt.select(before, after).tolist() == [0]  # at least one sample
    opt.gamma = 1.0
    assert opt.select(before, after).tolist() == list(range(6))
    with pytest.raises(ValueError, match="per-sample"):
        opt.select(before.sum(), after.sum())
    with pytest.raises(ValueError, match="per-sample"):
        opt.select(before, after[:5])
    groups = [{"params": np_problem()[2][:2], "maximize": True}, {"params": np_problem()[2][2:]}]
    mixed = snp.ESAM(groups, gamma=0.5, lr=0.1)
    with pytest.raises(ValueError, match="maximize"):
        mixed.select(np.zeros(4), np.ones(4))
    mixed.gamma = 1.0  # nothing to rank
    assert mixed.select(np.zeros(4), np.ones(4)).tolist() == [0, 1, 2, 3]


def test_numpy_errors_change_nothing():
    X, labels, w = np_problem()
    opt = snp.ESAM(w, beta=0.5, gamma=0.5, rho=0.1, lr=0.1, seed=0)
    np_run(opt, X, labels, 2)
    before, saved = copies(w), copy.deepcopy(opt.state_dict())
    grad_fn = np_grad_fn_for(X, labels, 2)
    with pytest.raises(ValueError, match="per-sample losses"):
        opt.step(lambda params, indices=None: (float(grad_fn(params)[0].mean()), grad_fn(params)[1]))
    with pytest.raises(TypeError, match="pair"):
        opt.step(lambda params, indices=None: grad_fn(params)[1])
    assert_arrays(w, before, exact=True)
    np.testing.assert_equal(opt.state_dict(), saved)  # nothing drawn either

    def fails_at_the_ranking(params, indices=None, calls=[]):  # noqa: B006 (counts the calls)
        calls.append(indices)
        if len(calls) == 2:
            raise RuntimeError("ranking failed")
        return grad_fn(params, indices)

    with pytest.raises(RuntimeError, match="ranking failed"):
        opt.step(fails_at_the_ranking)
    assert not opt.perturbed
    assert_arrays(w, before, exact=True)  # restored from w + e
    for bad in (0.0, 1.5, True, "0.5"):
        with pytest.raises(ValueError, match="beta"):
            snp.ESAM(copies(w), beta=bad)
        with pytest.raises(ValueError, match="gamma"):
            snp.ESAM(copies(w), gamma=bad)
        with pytest.raises(ValueError, match="beta"):
            opt.beta = bad  # checked when set, too
    assert opt.beta == 0.5


@pytest.mark.parametrize("front", ["torch", "numpy"])
def test_checkpoints_and_first_pass_between_the_halves_are_refused(front):
    if front == "torch":
        model = make_model()
        opt = sharpness.ESAM(model.parameters(), torch.optim.SGD, beta=0.5, lr=0.1, seed=0)
        x, y = batches(1)[0]

        def first_gradient():
            per_sample(model, x, y).mean().backward()

        def first_step():
            return opt.first_step(zero_grad=True)

    else:
        X, labels, w = np_problem()
        opt = snp.ESAM(w, beta=0.5, lr=0.1, seed=0)
        grads = np_grad_fn_for(X, labels, 0)(w)[1]

        def first_gradient():
            pass

        def first_step():
            return opt.first_step(grads)

    sd = opt.state_dict()
    with opt.first_pass():
        first_gradient()
    with pytest.raises(RuntimeError, match="between first_pass"):
        opt.state_dict()  # the draw for the coming first_step would be lost
    with pytest.raises(RuntimeError, match="between first_pass"):
        opt.load_state_dict(sd)  # the coming first_step would use a draw from before the checkpoint
    assert first_step()
    with pytest.raises(RuntimeError, match="first_pass"), opt.first_pass():
        pass
    opt.restore()
    opt.load_state_dict(sd)  # after the step: fine
