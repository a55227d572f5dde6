"""SSAM-F and SSAM-D against per-tensor references written here from the paper and its official
code (Mi et al., NeurIPS 2022: e = ρ (g ⊙ m)/‖g‖ with the unmasked norm; m the top 1 − s of the
summed squared per-sample gradients, or a random mask updated by drop and grow), the s = 0 limit
(SAM bit for bit), and checkpoint round trips of the mask and the generator."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from _family import BASES, assert_close, assert_equal, batches, flat_dot, grads_at, grads_at_offset, loss_of, make_model

import sharpness


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
    with pytest.raises(ValueError, match="one score tensor"):
        opt.update_mask([torch.ones(3)])
