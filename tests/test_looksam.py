"""LookSAM and every-k SAM against a per-tensor reference written here from the paper
(Liu et al., CVPR 2022, Algorithm 1), and the limits that reduce them to SAM."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from _family import assert_close, assert_equal, batches, flat_dot, grads_at, loss_of, make_model

import sharpness


def reference_looksam(model, base, data, rho, k, alpha):
    """Per-tensor LookSAM: SAM with g_v kept every k steps, g + α‖g‖/‖g_v‖·g_v in between."""
    params = list(model.parameters())
    g_v = None
    for t, (x, y) in enumerate(data):
        g = grads_at(model, x, y)
        if t % k == 0:
            norm = math.sqrt(flat_dot(g, g))
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
            scale = alpha * math.sqrt(flat_dot(g, g)) / math.sqrt(flat_dot(g_v, g_v)) if alpha else 0.0
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


def test_k_one_is_sam_bit_for_bit():
    data = batches(10)
    a, b, c = make_model(), make_model(), make_model()
    run(sharpness.SAM(a.parameters(), torch.optim.SGD, rho=0.1, lr=0.05, momentum=0.9), a, data, "closure")
    run(sharpness.LookSAM(b.parameters(), torch.optim.SGD, k=1, alpha=0.7, rho=0.1, lr=0.05, momentum=0.9), b, data, "closure")
    run(sharpness.EveryKSAM(c.parameters(), torch.optim.SGD, k=1, rho=0.1, lr=0.05, momentum=0.9), c, data, "closure")
    assert_equal(a, b)
    assert_equal(a, c)


def test_alpha_zero_is_every_k_sam_bit_for_bit():
    data = batches(10)
    a, b = make_model(), make_model()
    run(sharpness.LookSAM(a.parameters(), torch.optim.SGD, k=3, alpha=0.0, rho=0.1, lr=0.05, momentum=0.9), a, data, "two-call")
    run(sharpness.EveryKSAM(b.parameters(), torch.optim.SGD, k=3, rho=0.1, lr=0.05, momentum=0.9), b, data, "two-call")
    assert_equal(a, b)


def test_state_dict_round_trip_mid_cycle():
    data = batches(14)
    a = make_model()
    opt_a = sharpness.LookSAM(a.parameters(), torch.optim.SGD, k=4, alpha=0.7, rho=0.1, lr=0.05, momentum=0.9)
    run(opt_a, a, data, "closure")

    b = make_model()
    opt_b = sharpness.LookSAM(b.parameters(), torch.optim.SGD, k=4, alpha=0.7, rho=0.1, lr=0.05, momentum=0.9)
    run(opt_b, b, data[:6], "closure")  # stop between two SAM steps: g_v must survive
    buf = io.BytesIO()
    torch.save({"model": b.state_dict(), "opt": opt_b.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    c = make_model(seed=5)
    opt_c = sharpness.LookSAM(c.parameters(), torch.optim.SGD, k=4, alpha=0.7, rho=0.1, lr=0.05, momentum=0.9)
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
