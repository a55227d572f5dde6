"""SSAM-F and SSAM-D (Mi et al., NeurIPS 2022, arXiv:2210.05177), one rule on both fronts.

Torch front: against per-tensor references written here from the paper and its official code
(e = ρ (g ⊙ m)/‖g‖ with the unmasked norm; m the top 1 − s of the summed squared per-sample
gradients, or a random mask updated by drop and grow), the s = 0 limit (SAM bit for bit), and
checkpoint round trips of the mask and the generator.

Numpy front: (a) against per-array float64 references written from the formulas over 20 steps of
softmax regression, with an SGD-momentum and an AdamW base; (b) the limits that reduce each method
to SAM, bit for bit against ``sharpness.numpy.SAM``; (c) against the torch front on the same
gradients; (d) state_dict round trips mid-run; (e) bad arguments, non-finite gradients and
exceptions inside ``grad_fn``. Nothing from sharpness is used for the references.
"""

from __future__ import annotations

import copy
import io
import math
import pickle

import numpy as np
import pytest
import torch
from _family import BASES, assert_close, assert_equal, batches, flat_dot, grads_at, grads_at_offset, loss_of, make_model
from _numpy_family import AdamWRef, SGDRef, SoftmaxRegression, assert_arrays as _assert_arrays, norm, torch_closure, torch_params

import sharpness
from sharpness.numpy import SAM, SSAMD, SSAMF


def split(flat, like):
    out, offset = [], 0
    for p in like:
        out.append(flat[offset : offset + p.numel()].view_as(p).clone())
        offset += p.numel()
    return out


def top(scores, k):
    keep = torch.zeros(scores.numel())
    keep[torch.topk(scores, k).indices] = 1.0
    return keep


def fisher_mask(model, x, y, sparsity):
    """Σ_i g_i² over the samples, then the global top (1 − s)."""
    fisher = [torch.zeros_like(p) for p in model.parameters()]
    for i in range(x.shape[0]):
        for f, g in zip(fisher, grads_at(model, x[i : i + 1], y[i : i + 1])):
            f += g * g
    flat = torch.cat([f.reshape(-1) for f in fisher])
    return split(top(flat, int(flat.numel() * (1 - sparsity))), list(model.parameters()))


def sam_step_with_mask(model, base, x, y, rho, mask):
    params = list(model.parameters())
    g = grads_at(model, x, y)
    norm = math.sqrt(flat_dot(g, g))
    g_s = grads_at_offset(model, x, y, [gi * m * (rho / (norm + 1e-12)) for gi, m in zip(g, mask)])
    for p, gi in zip(params, g_s):
        p.grad = gi
    base.step()
    return g


def reference_ssamf(model, base, data, rho, sparsity, every, samples):
    masks = []
    for t, (x, y) in enumerate(data):
        if t % every == 0:
            masks.append(fisher_mask(model, x[:samples], y[:samples], sparsity))
        sam_step_with_mask(model, base, x, y, rho, masks[-1])
    return masks


def run_ssamf(opt, model, data, every, samples, api, masks=None, start=0):
    for t, (x, y) in enumerate(data, start):
        if t % every == 0:
            opt.fisher_from(
                (lambda i=i: loss_of(model, x[i : i + 1], y[i : i + 1]).backward()) for i in range(samples)
            )
            if masks is not None:
                masks.append(opt.mask())
        if api == "closure":

            def closure():
                opt.zero_grad()
                loss = loss_of(model, x, y)
                loss.backward()
                return loss

            opt.step(closure)
        else:
            loss_of(model, x, y).backward()
            opt.first_step(zero_grad=True)
            loss_of(model, x, y).backward()
            opt.second_step(zero_grad=True)


@pytest.mark.parametrize("backend", ["rust", "torch"])
@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("api", ["closure", "two-call"])
def test_ssamf_matches_the_paper(backend, base, api):
    data = batches(20)
    cls, kw = BASES[base]
    ref = make_model()
    mine = copy.deepcopy(ref)
    ref_masks = reference_ssamf(ref, cls(ref.parameters(), foreach=False, **kw), data, 0.1, 0.5, 5, 8)
    opt = sharpness.SSAMF(mine.parameters(), cls, sparsity=0.5, rho=0.1, backend=backend, **kw)
    masks = []
    run_ssamf(opt, mine, data, 5, 8, api, masks)
    assert all(m.dtype == torch.float32 for m in masks[0])
    for a, b in zip(ref_masks[0], masks[0]):  # the first mask, from identical weights: the same
        assert torch.equal(a, b)
    assert_close(ref, mine)
    assert opt.density() == pytest.approx(0.5, abs=1e-3)
    if backend == "rust":
        assert opt.stats["fused_steps"] == 20


@pytest.mark.parametrize("backend", ["rust", "torch"])
def test_full_mask_is_sam_bit_for_bit(backend):
    data = batches(20)
    a, b = make_model(), make_model()
    sam = sharpness.SAM(a.parameters(), torch.optim.SGD, rho=0.1, lr=0.05, momentum=0.9, backend=backend)
    for x, y in data:
        loss_of(a, x, y).backward()
        sam.first_step(zero_grad=True)
        loss_of(a, x, y).backward()
        sam.second_step(zero_grad=True)
    opt = sharpness.SSAMF(b.parameters(), torch.optim.SGD, sparsity=0.0, rho=0.1, lr=0.05, momentum=0.9, backend=backend)
    run_ssamf(opt, b, data, 5, 4, "two-call")  # masks are set (all ones) and applied
    assert opt.sam_state["ssam_masked"] and opt.density() == 1.0
    assert_equal(a, b)
    c = make_model()
    opt_d = sharpness.SSAMD(c.parameters(), torch.optim.SGD, sparsity=0.0, rho=0.1, lr=0.05, momentum=0.9, backend=backend)
    for t, (x, y) in enumerate(data):
        loss_of(c, x, y).backward()
        opt_d.update_mask(progress=t / 20)
        opt_d.first_step(zero_grad=True)
        loss_of(c, x, y).backward()
        opt_d.second_step(zero_grad=True)
    assert_equal(a, c)


def reference_ssamd(model, base, data, rho, sparsity, drop_rate, seed, every):
    """Per-tensor SSAM-D with drop by |g| and growth by |w| (deterministic strategies)."""
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    gen = torch.Generator().manual_seed(seed)
    mask = top(torch.rand(n, generator=gen), n - math.ceil(n * sparsity))
    for t, (x, y) in enumerate(data):
        if t % every == 0:
            g = grads_at(model, x, y)
            live = int(mask.sum())
            r = drop_rate * (1 + math.cos(math.pi * t / len(data))) / 2
            k = int(min(r * live, n - live))
            drop = (torch.cat([gi.abs().reshape(-1) for gi in g]) + 1e-7) * mask
            grow = (torch.cat([p.detach().abs().reshape(-1) for p in params]) + 1e-7) * (1 - mask)
            mask = top(drop, live - k) + top(grow, k)
        sam_step_with_mask(model, base, x, y, rho, split(mask, params))
    return mask


@pytest.mark.parametrize("backend", ["rust", "torch"])
@pytest.mark.parametrize("base", sorted(BASES))
def test_ssamd_matches_the_paper(backend, base):
    data = batches(20)
    cls, kw = BASES[base]
    ref = make_model()
    mine = copy.deepcopy(ref)
    mask = reference_ssamd(ref, cls(ref.parameters(), foreach=False, **kw), data, 0.1, 0.5, 0.5, 11, 5)
    opt = sharpness.SSAMD(
        mine.parameters(), cls, sparsity=0.5, drop_rate=0.5, drop_strategy="gradient", growth_strategy="weight",
        rho=0.1, seed=11, backend=backend, **kw,
    )
    for t, (x, y) in enumerate(data):
        loss_of(mine, x, y).backward()
        if t % 5 == 0:
            opt.update_mask(progress=t / 20)
        opt.first_step(zero_grad=True)
        loss_of(mine, x, y).backward()
        opt.second_step(zero_grad=True)
    assert_close(ref, mine)
    assert torch.equal(torch.cat([m.reshape(-1) for m in opt.mask()]), mask)
    assert opt.density() == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("backend", ["rust", "torch"])
def test_ssamd_state_dict_round_trip_with_random_growth(backend):
    data = batches(14)
    build = lambda model: sharpness.SSAMD(  # noqa: E731
        model.parameters(), torch.optim.SGD, sparsity=0.7, rho=0.1, lr=0.05, momentum=0.9, seed=3, backend=backend
    )

    def train(opt, model, part, start):
        for t, (x, y) in enumerate(part, start):
            loss_of(model, x, y).backward()
            if t % 3 == 0:
                opt.update_mask(progress=t / 14)
            opt.first_step(zero_grad=True)
            loss_of(model, x, y).backward()
            opt.second_step(zero_grad=True)

    a = make_model()
    train(build(a), a, data, 0)
    b = make_model()
    opt_b = build(b)
    train(opt_b, b, data[:7], 0)
    buf = io.BytesIO()
    torch.save({"model": b.state_dict(), "opt": opt_b.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    c = make_model(seed=5)
    opt_c = sharpness.SSAMD(
        c.parameters(), torch.optim.SGD, sparsity=0.7, rho=0.1, lr=0.05, momentum=0.9, seed=99, backend=backend
    )
    c.load_state_dict(ckpt["model"])
    opt_c.load_state_dict(ckpt["opt"])
    train(opt_c, c, data[7:], 7)
    assert_equal(a, c)


@pytest.mark.parametrize("backend", ["rust", "torch"])
def test_ssamf_state_dict_round_trip(backend):
    data = batches(12)
    build = lambda model: sharpness.SSAMF(model.parameters(), torch.optim.AdamW, sparsity=0.5, rho=0.1, lr=1e-2, backend=backend)  # noqa: E731
    a = make_model()
    run_ssamf(build(a), a, data, 4, 4, "closure")
    b = make_model()
    opt_b = build(b)
    run_ssamf(opt_b, b, data[:6], 4, 4, "closure")
    buf = io.BytesIO()
    torch.save({"model": b.state_dict(), "opt": opt_b.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    c = make_model(seed=5)
    opt_c = build(c)
    c.load_state_dict(ckpt["model"])
    opt_c.load_state_dict(ckpt["opt"])
    run_ssamf(opt_c, c, data[6:], 4, 4, "closure", start=6)  # steps 6, 7 use the checkpointed mask
    assert_equal(a, c)


def test_bad_arguments():
    model = make_model()
    with pytest.raises(ValueError, match="sparsity"):
        sharpness.SSAMF(model.parameters(), torch.optim.SGD, sparsity=1.0, lr=0.1)
    with pytest.raises(ValueError, match="growth_strategy"):
        sharpness.SSAMD(model.parameters(), torch.optim.SGD, growth_strategy="magic", lr=0.1)
    opt = sharpness.SSAMF(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="accumulate_fisher"):
        opt.update_mask()
    with pytest.raises(ValueError, match="one score array"):
        opt.update_mask([torch.ones(3)])


def test_torch_mask_calls_refuse_bad_input_and_skip_nonfinite_gradients():
    model = make_model()
    x, y = batches(1)[0]
    opt = sharpness.SSAMF(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    loss_of(model, x, y).backward()
    assert opt.accumulate_fisher() is True and opt.fisher_samples == 1
    next(model.parameters()).grad[0, 0] = math.nan
    assert opt.accumulate_fisher() is False and opt.fisher_samples == 1  # left out of F
    opt.update_mask()
    assert opt.fisher_samples == 0
    with pytest.raises(ValueError, match="finite"):
        opt.update_mask([torch.full_like(p, math.nan) for p in model.parameters()])
    with pytest.raises(ValueError, match="0s and 1s"):
        opt.set_mask([torch.full_like(p, 0.5) for p in model.parameters()])
    with pytest.raises(TypeError, match="without grads"):
        opt.accumulate_fisher([p.grad for p in model.parameters()])  # the torch front reads p.grad

    opt_d = sharpness.SSAMD(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, seed=0)
    mask = opt_d.mask()
    opt_d.zero_grad()
    loss_of(model, x, y).backward()
    next(model.parameters()).grad[0, 0] = math.inf
    assert opt_d.update_mask(progress=0.0) is False  # nothing drawn, the mask stays
    assert all(torch.equal(a, b) for a, b in zip(opt_d.mask(), mask))
    with pytest.raises(ValueError, match="progress"):
        opt_d.update_mask(progress=1.5)
    with pytest.raises(TypeError, match="progress"):
        opt_d.update_mask(progress=None)
    opt_d.zero_grad()
    loss_of(model, x, y).backward()
    assert opt_d.update_mask(progress=0.0) is True
    assert opt_d.update_mask(progress=1.0) is False  # r(1) = 0: nothing to drop
    opt_d.first_step(zero_grad=True)
    for call in (lambda: opt_d.update_mask(progress=0.5), lambda: opt_d.set_mask(opt_d.mask())):
        with pytest.raises(RuntimeError, match="between first_step"):
            call()
    loss_of(model, x, y).backward()
    opt_d.second_step(zero_grad=True)


@pytest.mark.parametrize("backend", ["rust", "torch"])
def test_torch_set_mask_of_ones_is_sam_and_equal_scores_keep_the_lower_indices(backend):
    data = batches(6)
    a, b = make_model(), make_model()
    sam = sharpness.SAM(a.parameters(), torch.optim.SGD, rho=0.1, lr=0.05, momentum=0.9, backend=backend)
    opt = sharpness.SSAMD(b.parameters(), torch.optim.SGD, rho=0.1, lr=0.05, momentum=0.9, seed=0, backend=backend)
    opt.set_mask([torch.ones_like(p) for p in b.parameters()])
    for model, o in ((a, sam), (b, opt)):
        for x, y in data:
            loss_of(model, x, y).backward()
            o.first_step(zero_grad=True)
            loss_of(model, x, y).backward()
            o.second_step(zero_grad=True)
    assert_equal(a, b)
    assert opt.density() == 1.0
    opt_f = sharpness.SSAMF(b.parameters(), torch.optim.SGD, sparsity=0.25, lr=0.1, backend=backend)
    opt_f.update_mask([torch.zeros_like(p) for p in b.parameters()])  # all tied: a stable order
    n = sum(p.numel() for p in b.parameters())
    kept = int(n * 0.75)
    assert torch.cat([m.reshape(-1) for m in opt_f.mask()]).tolist() == [1.0] * kept + [0.0] * (n - kept)


def test_torch_masks_are_the_same_on_every_engine_and_cover_the_perturbed_groups_only():
    """The draws come from one call over every masked weight and the host ranking is the same:
    the rust and torch engines give the same masks; a group with ρ = 0 is outside the mask."""
    data = batches(6)
    masks, models = [], []
    for backend in ("rust", "torch"):
        model = make_model()
        params = list(model.parameters())
        groups = [{"params": params[:-2]}, {"params": params[-2:], "sam_rho": 0.0}]
        opt = sharpness.SSAMD(
            groups, torch.optim.SGD, sparsity=0.6, drop_strategy="random", growth_strategy="random", rho=0.1, lr=0.05,
            seed=4, backend=backend,
        )
        assert [e.name for e in opt.engines()] == [backend]
        n = sum(p.numel() for p in params[:-2])
        assert [m.shape for m in opt.mask()] == [p.shape for p in params[:-2]]
        assert int(sum(m.sum() for m in opt.mask())) == n - math.ceil(0.6 * n)
        for t, (x, y) in enumerate(data):
            loss_of(model, x, y).backward()
            if t % 2 == 0:
                assert opt.update_mask(progress=t / len(data))
            opt.first_step(zero_grad=True)
            loss_of(model, x, y).backward()
            opt.second_step(zero_grad=True)
        masks.append(opt.mask())
        models.append(model)
    assert all(torch.equal(a, b) for a, b in zip(*masks))
    assert_close(*models)


@pytest.mark.parametrize("backend", ["rust", "torch"])
def test_torch_checkpoint_settings_win_and_bad_ones_load_nothing(backend):
    model = make_model()
    opt = sharpness.SSAMD(
        model.parameters(), torch.optim.SGD, sparsity=0.3, drop_rate=0.2, drop_strategy="weight", lr=0.1, seed=1, backend=backend
    )
    sd = opt.state_dict()
    other = sharpness.SSAMD(model.parameters(), torch.optim.SGD, sparsity=0.8, lr=0.1, seed=2, backend=backend)
    other.load_state_dict(sd)
    assert (other.sparsity, other.drop_rate, other.drop_strategy, other.growth_strategy) == (0.3, 0.2, "weight", "random")
    assert all(torch.equal(a, b) for a, b in zip(other.mask(), opt.mask()))
    assert other.density() == opt.density()
    for key, value, name in (("ssam_sparsity", 1.0, "sparsity"), ("ssam_drop_strategy", "magic", "drop_strategy")):
        bad = copy.deepcopy(sd)
        bad["sam"]["state"][key] = value
        fresh = sharpness.SSAMD(model.parameters(), torch.optim.SGD, sparsity=0.8, lr=0.1, seed=2, backend=backend)
        before = fresh.mask()
        with pytest.raises(ValueError, match=name):
            fresh.load_state_dict(bad)
        assert fresh.sparsity == 0.8 and all(torch.equal(a, b) for a, b in zip(fresh.mask(), before))
    with pytest.raises(ValueError, match="saved by SSAMD"):
        sharpness.SSAMF(model.parameters(), torch.optim.SGD, lr=0.1, backend=backend).load_state_dict(sd)


def test_torch_mask_of_float64_parameters_is_float64():
    model = make_model().double()
    opt = sharpness.SSAMD(model.parameters(), torch.optim.SGD, lr=0.1, seed=0)
    assert all(m.dtype == torch.float64 for m in opt.mask())
    opt_f = sharpness.SSAMF(model.parameters(), torch.optim.SGD, lr=0.1)
    assert all(m.dtype == torch.float64 and bool((m == 1).all()) for m in opt_f.mask())  # before any mask: ones


# == the numpy front ==============================================================================
# -- softmax regression with hand-written gradients ------------------------------------------------

STEPS = 20
PROBLEM = SoftmaxRegression(n_rows=64, n_in=6, n_classes=4, batch=16, stride=16, cast_data=False)
make_problem, loss_and_grads = PROBLEM.make_problem, PROBLEM.loss_and_grads
batch_rows, grad_fn_for = PROBLEM.batch_rows, PROBLEM.grad_fn_for


def sample_grad_fns(X, labels, t, samples=8):
    return [grad_fn_for_rows(X, labels, [r]) for r in batch_rows(t)[:samples]]


def grad_fn_for_rows(X, labels, rows):
    return lambda params: loss_and_grads(X, labels, params, np.asarray(rows))


def assert_arrays(a, b, exact=False, rtol=1e-9, atol=1e-11):
    _assert_arrays(a, b, exact=exact, rtol=rtol, atol=atol)


NP_BASES = {
    "sgd": (dict(base="sgd", lr=0.1, momentum=0.9, weight_decay=1e-3), lambda: SGDRef(0.1, 0.9, 1e-3)),
    "adamw": (dict(base="adamw", lr=1e-2, weight_decay=1e-2), lambda: AdamWRef(1e-2, weight_decay=1e-2)),
}
TORCH_BASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2)),
}


def flat(arrays):
    return np.concatenate([np.asarray(a).reshape(-1) for a in arrays])


def unflat(v, like):
    out, o = [], 0
    for p in like:
        out.append(v[o : o + p.size].reshape(p.shape).astype(np.float64))
        o += p.size
    return out


def top_flags(scores, k):
    """The k largest float32 scores (ties: lower index first), by a full stable sort."""
    keep = np.zeros(scores.size, dtype=np.float32)
    keep[np.argsort(-scores, kind="stable")[:k]] = 1.0
    return keep


def masked_sam_step(w, g, g_at, rho, mask, base):
    e = [rho * gi * m / (norm(g) + 1e-12) for gi, m in zip(g, mask)]
    _, gs = g_at([a + b for a, b in zip(w, e)])
    return base.step(w, gs)


def reference_np_ssamf(X, labels, w, rho, sparsity, every, base):
    w = [p.astype(np.float64) for p in w]
    masks = []
    for t in range(STEPS):
        if t % every == 0:
            fisher = [np.zeros_like(p) for p in w]
            for r in batch_rows(t)[:8]:
                _, g = loss_and_grads(X, labels, w, np.array([r]))
                fisher = [f + gi * gi for f, gi in zip(fisher, g)]
            scores = flat(fisher).astype(np.float32)
            masks.append(unflat(top_flags(scores, int(scores.size * (1 - sparsity))), w))
        _, g = loss_and_grads(X, labels, w, batch_rows(t))
        w = masked_sam_step(w, g, lambda p, t=t: loss_and_grads(X, labels, p, batch_rows(t)), rho, masks[-1], base)
    return w, masks


def reference_np_ssamd(X, labels, w, rho, sparsity, drop_rate, seed, every, drop_by, grow_by, base):
    w = [p.astype(np.float64) for p in w]
    rng = np.random.default_rng(seed)
    n = sum(p.size for p in w)
    mask = top_flags(rng.random(n, dtype=np.float32), n - math.ceil(n * sparsity))

    def score(kind, g):
        if kind == "random":
            return rng.random(n, dtype=np.float32)
        return np.abs(flat(g if kind == "gradient" else w)).astype(np.float32)

    for t in range(STEPS):
        _, g = loss_and_grads(X, labels, w, batch_rows(t))
        if t % every == 0:
            live = int(mask.sum())
            r = drop_rate * (1 + math.cos(math.pi * t / STEPS)) / 2
            k = int(min(r * live, n - live))
            if k:
                drop = (score(drop_by, g) + np.float32(1e-7)) * mask
                grow = (score(grow_by, g) + np.float32(1e-7)) * (1 - mask)
                mask = top_flags(drop, live - k) + top_flags(grow, k)
        w = masked_sam_step(w, g, lambda p, t=t: loss_and_grads(X, labels, p, batch_rows(t)), rho, unflat(mask, w), base)
    return w, mask


def run_np_ssamf(opt, X, labels, every=5, start=0, stop=STEPS):
    for t in range(start, stop):
        if t % every == 0:
            opt.fisher_from(sample_grad_fns(X, labels, t))
        opt.step(grad_fn_for(X, labels, t))


def run_np_ssamd(opt, X, labels, every=5, start=0, stop=STEPS, api="step"):
    for t in range(start, stop):
        fn = grad_fn_for(X, labels, t)
        _, g = fn(opt.params)
        if t % every == 0:
            opt.update_mask(progress=t / STEPS, grads=g)
        if api == "step":
            opt.step(fn)
        else:
            opt.first_step(g)
            opt.second_step(fn(opt.params)[1])


def run_plain(opt, X, labels, start=0, stop=STEPS):
    for t in range(start, stop):
        opt.step(grad_fn_for(X, labels, t))


def saved_vector(opt, name):
    """A checkpointed vector of the numpy front, as one array per parameter."""
    by_index = opt.state_dict()["sam"]["vectors"][name]
    return [by_index[i] for i in range(len(opt.params))]


# -- (a) against the references --------------------------------------------------------------------


@pytest.mark.parametrize("base", sorted(NP_BASES))
def test_numpy_ssamf_matches_the_reference(base):
    X, labels, w0 = make_problem()
    kw, ref_base = NP_BASES[base]
    ref, ref_masks = reference_np_ssamf(X, labels, w0, 0.1, 0.5, 5, ref_base())
    w = copy.deepcopy(w0)
    opt = SSAMF(w, sparsity=0.5, rho=0.1, **kw)
    masks = []
    for t in range(STEPS):
        if t % 5 == 0:
            opt.fisher_from(sample_grad_fns(X, labels, t))
            masks.append(opt.mask())
            assert opt.fisher_samples == 0
        opt.step(grad_fn_for(X, labels, t))
    assert len(masks) == len(ref_masks) == 4
    for mine, theirs in zip(masks, ref_masks):
        assert_arrays(mine, theirs, exact=False, rtol=0, atol=0)
    assert opt.density() == 0.5
    assert_arrays(w, ref)


@pytest.mark.parametrize("base", sorted(NP_BASES))
@pytest.mark.parametrize("strategies", [("gradient", "weight"), ("gradient", "random"), ("random", "random")])
@pytest.mark.parametrize("api", ["step", "two-call"])
def test_numpy_ssamd_matches_the_reference(base, strategies, api):
    X, labels, w0 = make_problem()
    kw, ref_base = NP_BASES[base]
    ref, ref_mask = reference_np_ssamd(X, labels, w0, 0.1, 0.5, 0.5, 7, 5, *strategies, ref_base())
    w = copy.deepcopy(w0)
    opt = SSAMD(w, sparsity=0.5, drop_rate=0.5, drop_strategy=strategies[0], growth_strategy=strategies[1], seed=7, rho=0.1, **kw)
    run_np_ssamd(opt, X, labels, api=api)
    np.testing.assert_array_equal(flat(opt.mask()), ref_mask)
    assert opt.density() == 0.5
    assert_arrays(w, ref)


def test_numpy_ssamf_fisher_is_the_sum_of_squared_sample_gradients():
    X, labels, w0 = make_problem()
    opt = SSAMF(copy.deepcopy(w0), sparsity=0.25, rho=0.1)
    grads = [loss_and_grads(X, labels, w0, np.array([r]))[1] for r in range(5)]
    for g in grads:
        assert opt.accumulate_fisher(g)
    fisher = saved_vector(opt, "ssam_fisher")
    expected = [sum(g[i] * g[i] for g in grads) for i in range(2)]
    assert_arrays(fisher, expected, rtol=1e-15, atol=0)
    n = sum(p.size for p in w0)
    scores = unflat(np.arange(n, dtype=np.float64), w0)  # explicit scores, increasing over all arrays
    opt.update_mask(scores)
    assert flat(opt.mask()).tolist() == [0.0] * (n - int(n * 0.75)) + [1.0] * int(n * 0.75)
    assert opt.fisher_samples == 5  # explicit scores leave the running sum alone


# -- (b) the limits, bit for bit against sharpness.numpy.SAM ---------------------------------------

LIMIT_BASES = [
    dict(base="sgd", lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True),
    dict(base="adam", lr=1e-2, amsgrad=True),
]


def sam_run(kw, dtype):
    X, labels, w = make_problem(dtype)
    run_plain(SAM(w, rho=0.1, **kw), X, labels)
    return w


@pytest.mark.parametrize("kw", LIMIT_BASES, ids=["sgd", "adam"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, "mixed"], ids=["f32", "f64", "mixed"])
def test_numpy_limits_are_sam_bit_for_bit(kw, dtype):
    expected = sam_run(kw, dtype)

    X, labels, w = make_problem(dtype)
    opt = SSAMF(w, sparsity=0.0, rho=0.1, **kw)
    run_np_ssamf(opt, X, labels)  # a mask (all ones) is set and applied
    assert opt.density() == 1.0 and opt.sam_state["ssam_masked"]
    assert all(np.all(m == 1) for m in saved_vector(opt, "ssam_mask"))
    assert_arrays(w, expected, exact=True)

    X, labels, w = make_problem(dtype)
    opt = SSAMD(w, sparsity=0.0, rho=0.1, seed=0, **kw)
    run_np_ssamd(opt, X, labels)
    assert_arrays(w, expected, exact=True)


def test_numpy_ssamf_before_any_mask_is_sam_bit_for_bit():
    kw = LIMIT_BASES[0]
    expected = sam_run(kw, np.float32)
    X, labels, w = make_problem(np.float32)
    run_plain(SSAMF(w, sparsity=0.9, rho=0.1, **kw), X, labels)
    assert_arrays(w, expected, exact=True)


def test_numpy_a_mask_of_ones_set_by_hand_is_sam_and_a_mask_of_zeros_is_the_base_optimizer():
    kw = LIMIT_BASES[1]
    expected = sam_run(kw, np.float64)
    X, labels, w = make_problem()
    opt = SSAMD(w, sparsity=0.5, seed=0, rho=0.1, **kw)
    opt.set_mask([np.ones_like(p) for p in w])
    run_plain(opt, X, labels)
    assert_arrays(w, expected, exact=True)

    X, labels, plain = make_problem()
    run_plain(SAM(plain, rho=0.0, **kw), X, labels)
    X, labels, w = make_problem()
    opt = SSAMF(w, rho=0.1, **kw)
    opt.update_mask([np.zeros_like(p) for p in w])  # s = 0.5 of zeros... then all zeros by hand
    opt.set_mask([np.zeros_like(p) for p in w])
    run_plain(opt, X, labels)
    assert_arrays(w, plain, exact=True)


# -- (c) against the torch front: the same rule on the same gradients -------------------------------


def set_grads(tparams, X, labels, rows):
    return torch_closure(tparams, lambda params: loss_and_grads(X, labels, params, rows))()


def closure_for(tparams, X, labels, t):
    return torch_closure(tparams, grad_fn_for(X, labels, t))


TOL = {np.float32: dict(rtol=2e-5, atol=1e-6), np.float64: dict(rtol=1e-11, atol=1e-13)}


@pytest.mark.parametrize("base", sorted(NP_BASES))
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_ssamf_fronts_agree(base, dtype):
    X, labels, w = make_problem(dtype)
    tp = torch_params(w)
    cls, tkw = TORCH_BASES[base]
    t_opt = sharpness.SSAMF(tp, cls, sparsity=0.5, rho=0.1, backend="rust", **tkw)
    np_opt = SSAMF(w, sparsity=0.5, rho=0.1, **NP_BASES[base][0])
    for t in range(STEPS):
        if t % 5 == 0:
            rows = batch_rows(t)[:8]
            t_opt.fisher_from((lambda r=r: set_grads(tp, X, labels, np.array([r]))) for r in rows)
            np_opt.fisher_from(sample_grad_fns(X, labels, t))
            assert_arrays(np_opt.mask(), t_opt.mask(), exact=True)
        t_opt.step(closure_for(tp, X, labels, t))
        np_opt.step(grad_fn_for(X, labels, t))
    assert_arrays(w, tp, **TOL[dtype])


@pytest.mark.parametrize("base", sorted(NP_BASES))
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_ssamd_fronts_agree(base, dtype):
    """The fronts draw from different generators (torch's, numpy's), so the numpy front starts
    from the torch front's initial mask and both use the deterministic strategies."""
    X, labels, w = make_problem(dtype)
    tp = torch_params(w)
    cls, tkw = TORCH_BASES[base]
    kw = dict(sparsity=0.5, drop_rate=0.5, drop_strategy="gradient", growth_strategy="weight", rho=0.1)
    t_opt = sharpness.SSAMD(tp, cls, seed=3, backend="rust", **kw, **tkw)
    np_opt = SSAMD(w, seed=123, **kw, **NP_BASES[base][0])
    np_opt.set_mask(t_opt.mask())  # the torch front's tensors are taken as they are
    for t in range(STEPS):
        g = loss_and_grads(X, labels, w, batch_rows(t))[1]
        set_grads(tp, X, labels, batch_rows(t))
        if t % 5 == 0:
            t_opt.update_mask(progress=t / STEPS)
            np_opt.update_mask(progress=t / STEPS, grads=g)
            assert_arrays(np_opt.mask(), t_opt.mask(), exact=True)
        t_opt.first_step(zero_grad=True)
        np_opt.first_step(g)
        set_grads(tp, X, labels, batch_rows(t))
        t_opt.second_step(zero_grad=True)
        np_opt.second_step(loss_and_grads(X, labels, w, batch_rows(t))[1])
    assert_arrays(w, tp, **TOL[dtype])


# -- (d) state_dict round trips --------------------------------------------------------------------


def resumed(build, run, dtype=np.float64, cut=7):
    """Runs STEPS steps straight, and again with a pickled checkpoint at ``cut`` loaded into a new
    optimizer over new arrays; returns both final weights."""
    X, labels, w = make_problem(dtype)
    run(build(w), X, labels, 0, STEPS)
    X, labels, w2 = make_problem(dtype)
    opt = build(w2)
    run(opt, X, labels, 0, cut)
    blob = pickle.dumps({"w": w2, "opt": opt.state_dict()})
    run(opt, X, labels, cut, STEPS)  # the saved dict is a copy: later steps do not change it
    ckpt = pickle.loads(blob)
    w3 = [np.zeros_like(p) for p in w2]
    for dst, src in zip(w3, ckpt["w"]):
        np.copyto(dst, src)
    fresh = build(w3, fresh=True)
    fresh.load_state_dict(ckpt["opt"])
    run(fresh, X, labels, cut, STEPS)
    return w, w2, w3


def test_numpy_ssamf_round_trip_with_a_partial_fisher_sum():
    def build(w, fresh=False):
        return SSAMF(w, sparsity=0.7 if fresh else 0.5, rho=0.1, base="adamw", lr=1e-2)

    def run(opt, X, labels, start, stop):
        for t in range(start, stop):
            # the Fisher sum is gathered over steps 2k and 2k+1 (one sample each), used at 2k+1
            for r in batch_rows(t)[:3]:
                opt.accumulate_fisher(loss_and_grads(X, labels, opt.params, np.array([r]))[1])
            if t % 2 == 1:
                opt.update_mask()
            opt.step(grad_fn_for(X, labels, t))

    a, b, c = resumed(build, run, cut=7)  # saved after step 6: a half-gathered sum
    assert_arrays(a, b, exact=True)
    assert_arrays(a, c, exact=True)


@pytest.mark.parametrize("dtype", [np.float32, "mixed"], ids=["f32", "mixed"])
def test_numpy_ssamd_round_trip_with_random_scores(dtype):
    def build(w, fresh=False):
        return SSAMD(w, sparsity=0.6, growth_strategy="random", drop_strategy="random", seed=99 if fresh else 5,
                     rho=0.1, lr=0.1, momentum=0.9)

    def run(opt, X, labels, start, stop):
        run_np_ssamd(opt, X, labels, every=3, start=start, stop=stop)

    a, b, c = resumed(build, run, dtype=dtype, cut=7)
    assert_arrays(a, b, exact=True)
    assert_arrays(a, c, exact=True)


# -- (e) bad input, non-finite gradients, exceptions -----------------------------------------------


def test_numpy_bad_arguments():
    X, labels, w = make_problem()
    for bad in (1.0, -0.1, 2):
        with pytest.raises(ValueError, match="sparsity"):
            SSAMF(w, sparsity=bad)
    with pytest.raises(TypeError, match="sparsity"):
        SSAMD(w, sparsity="half")
    with pytest.raises(ValueError, match="drop_rate"):
        SSAMD(w, drop_rate=1.5)
    with pytest.raises(ValueError, match="growth_strategy"):
        SSAMD(w, growth_strategy="magic")
    with pytest.raises(ValueError, match="seed"):
        SSAMD(w, seed=-1)
    for cls in (SSAMF, SSAMD):
        with pytest.raises(ValueError, match="adaptive"):
            cls(w, adaptive=True)
        with pytest.raises(TypeError, match="unknown"):
            cls(w, betas=(0.9, 0.99))  # an Adam argument with the SGD base
        with pytest.raises(TypeError, match="list of numpy arrays"):
            cls(w[0])

    opt = SSAMF(w)
    with pytest.raises(RuntimeError, match="accumulate_fisher"):
        opt.update_mask()
    with pytest.raises(ValueError, match="one score array"):
        opt.update_mask([np.ones(3)])
    with pytest.raises(ValueError, match="finite"):
        opt.update_mask([np.full_like(p, np.nan) for p in w])
    with pytest.raises(ValueError, match="shape"):
        opt.accumulate_fisher([np.ones(3), np.ones(2)])
    with pytest.raises(TypeError, match="dtype"):
        opt.accumulate_fisher([p.astype(np.float32) for p in w])
    with pytest.raises(ValueError, match="0s and 1s"):
        opt.set_mask([np.full_like(p, 0.5) for p in w])
    with pytest.raises(ValueError, match="mask arrays"):
        opt.set_mask([np.ones_like(w[0])])

    opt = SSAMD(w, seed=0)
    g = loss_and_grads(X, labels, w, batch_rows(0))[1]
    with pytest.raises(ValueError, match="grads"):
        opt.update_mask(0.0)
    with pytest.raises(ValueError, match="progress"):
        opt.update_mask(1.5, grads=g)
    with pytest.raises(TypeError, match="progress"):
        opt.update_mask(None, grads=g)
    opt.first_step(g)
    for call in (lambda: opt.update_mask(0.0, grads=g), lambda: opt.set_mask(opt.mask()), opt.state_dict):
        with pytest.raises(RuntimeError):
            call()
    opt.second_step(g)


def test_numpy_bad_state_dicts():
    X, labels, w = make_problem()
    sam_sd = SAM(w).state_dict()
    for cls in (SSAMF, SSAMD):
        with pytest.raises(ValueError, match="saved by SAM"):
            cls(w).load_state_dict(sam_sd)
        unnamed = copy.deepcopy(sam_sd)
        del unnamed["sam"]["method"]  # a dict that does not say which method saved it
        with pytest.raises(ValueError, match="lacks"):
            cls(w).load_state_dict(unnamed)
    sd = SSAMD(w, seed=0).state_dict()
    bad = copy.deepcopy(sd)
    bad["sam"]["generator"] = {"bit_generator": "MT19937", "state": {}}
    before = SSAMD(w, seed=1)
    before_state = before.generator.bit_generator.state
    with pytest.raises(ValueError, match="generator"):
        before.load_state_dict(bad)
    assert before.generator.bit_generator.state == before_state  # nothing was loaded
    bad = copy.deepcopy(sd)
    bad["sam"]["vectors"]["ssam_mask"] = {0: np.ones(3), 1: np.ones(3)}
    with pytest.raises(ValueError, match="mask"):
        SSAMD(w).load_state_dict(bad)
    bad = copy.deepcopy(sd)
    bad["sam"]["state"]["ssam_sparsity"] = 1.0
    with pytest.raises(ValueError, match="sparsity"):
        SSAMD(w).load_state_dict(bad)


def test_numpy_nonfinite_gradients_never_reach_the_weights_through_a_perturbation():
    X, labels, w = make_problem()
    saved = copy.deepcopy(w)
    bad = [np.full_like(p, np.nan) for p in w]
    good = loss_and_grads(X, labels, w, batch_rows(0))[1]

    opt = SSAMF(w, rho=0.1, lr=0.0)
    assert opt.accumulate_fisher(bad) is False and opt.fisher_samples == 0
    opt.update_mask([np.abs(g) for g in good])
    assert opt.first_step(bad) is True and math.isnan(opt.last_grad_norm)
    assert_arrays(w, saved, exact=True)  # not moved
    opt.second_step(good)  # lr = 0: the base step leaves w as it is
    assert_arrays(w, saved, exact=True)
    assert opt.state_dict()["sam"]["stats"]["nonfinite_skips"] == 1

    opt = SSAMD(w, seed=0)
    mask = opt.mask()
    assert opt.update_mask(0.0, grads=bad) is False
    assert_arrays(opt.mask(), mask, exact=True)


def test_numpy_an_exception_in_grad_fn_restores_the_weights():
    X, labels, w = make_problem()
    saved = copy.deepcopy(w)
    opt = SSAMF(w, rho=0.5, lr=0.1, momentum=0.9)
    calls = []

    def failing(params):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return loss_and_grads(X, labels, params, batch_rows(0))

    with pytest.raises(KeyboardInterrupt):
        opt.step(failing)
    assert_arrays(w, saved, exact=True)
    assert not opt.perturbed
    opt.step(grad_fn_for(X, labels, 0))  # usable afterwards
    assert not np.array_equal(w[0], saved[0])


def test_numpy_caller_gradients_are_not_modified():
    X, labels, w = make_problem()
    opt = SSAMF(w, rho=0.1)
    opt.update_mask([np.abs(p) for p in w])
    g = loss_and_grads(X, labels, w, batch_rows(0))[1]
    g_copy = copy.deepcopy(g)
    opt.first_step(g)
    opt.second_step(g)
    assert_arrays(g, g_copy, exact=True)
