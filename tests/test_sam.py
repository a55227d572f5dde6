"""`sharpness.SAM` against a per-tensor SAM/ASAM written here from the formulas.

The reference below imports nothing from `sharpness`: it perturbs each tensor by
`e = ρ·g/(‖g‖+1e-12)` (ASAM: `ρ·T²g/(‖Tg‖+1e-12)`, `T = |w|+η`, one global norm in float64),
restores from clones and lets a separate torch.optim instance (`foreach=False`) take the step.
"""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch
from torch import nn

import sharpness
from sharpness.numpy import SAM as NumpySAM

# ---------------------------------------------------------------- reference written from the paper


def reference_first_step(params, groups_cfg, maximize=False):
    """Perturbs in place; returns the saved weights. groups_cfg: list of (params, rho, adaptive, eta).
    With `maximize`, SAM runs on −L: the perturbation goes along −g."""
    with torch.no_grad():
        total = torch.zeros((), dtype=torch.float64)
        for ps, _rho, adaptive, eta in groups_cfg:
            for p in ps:
                if p.grad is None:
                    continue
                t = (p.abs() + eta) * p.grad if adaptive else p.grad
                total += (t.double() ** 2).sum()
        norm = math.sqrt(float(total))
        saved = {}
        for ps, rho, adaptive, eta in groups_cfg:
            scale = rho / (norm + 1e-12) * (-1.0 if maximize else 1.0)
            for p in ps:
                if p.grad is None:
                    continue
                saved[p] = p.clone()
                if adaptive:
                    t = p.abs() + eta
                    e = t * t * p.grad * scale
                else:
                    e = p.grad * scale
                p.add_(e)
        return saved


def reference_second_step(saved, base):
    with torch.no_grad():
        for p, w in saved.items():
            p.copy_(w)
    base.step()


def set_bn_tracking(model, on):
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = on


def make_cnn(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False),  # a bias before BatchNorm only gets rounding noise
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 16),
        nn.ReLU(),
        nn.Linear(16, 10),
    )
    return model.to(dtype)


def batches(n, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 1, 8, 8, generator=g, dtype=dtype), torch.randint(0, 10, (16,), generator=g)) for _ in range(n)]


def loss_of(model, x, y):
    return nn.functional.cross_entropy(model(x).float(), y)


def run_reference(model, base, data, rho, adaptive=False, eta=0.0, freeze_bn=True):
    params = [p for p in model.parameters()]
    for x, y in data:
        base.zero_grad()
        loss_of(model, x, y).backward()
        saved = reference_first_step(params, [(params, rho, adaptive, eta)], base.param_groups[0].get("maximize", False))
        base.zero_grad()
        if freeze_bn:
            set_bn_tracking(model, False)
        loss_of(model, x, y).backward()
        if freeze_bn:
            set_bn_tracking(model, True)
        reference_second_step(saved, base)


def run_sharpness(model, opt, data, api="two-call", freeze_bn=True):
    for x, y in data:
        if api == "closure":
            calls = []

            def closure():
                opt.zero_grad()
                if calls and freeze_bn:
                    with sharpness.frozen_running_stats(model):
                        loss = loss_of(model, x, y)
                else:
                    loss = loss_of(model, x, y)
                calls.append(1)
                loss.backward()
                return loss

            opt.step(closure)
            assert len(calls) == 2
        else:
            opt.zero_grad()
            loss_of(model, x, y).backward()
            opt.first_step(zero_grad=True)
            if freeze_bn:
                with sharpness.frozen_running_stats(model):
                    loss_of(model, x, y).backward()
            else:
                loss_of(model, x, y).backward()
            opt.second_step(zero_grad=True)


def bits(t):
    """The raw bits of a tensor, so -0.0 and 0.0 (or two NaNs) are told apart."""
    return t.reshape(-1).view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_models_close(a, b, rtol=1e-5, atol=1e-6):
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


BASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
    "sgd-nesterov": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
    "sgd-dampening-maximize": (torch.optim.SGD, dict(lr=0.01, momentum=0.5, dampening=0.3, maximize=True)),
    "sgd-plain": (torch.optim.SGD, dict(lr=0.1)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    "adam-amsgrad-l2": (torch.optim.Adam, dict(lr=1e-2, weight_decay=1e-2, amsgrad=True)),
    "rmsprop": (torch.optim.RMSprop, dict(lr=1e-3, momentum=0.5)),  # no fused kernel: base step
}

# ------------------------------------------------------------------------------- trajectories


@pytest.mark.parametrize("base_name", list(BASES))
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("api", ["two-call", "closure"])
def test_trajectory_matches_reference(base_name, adaptive, api):
    base_cls, kw = BASES[base_name]
    rho, eta = (0.5, 0.01) if adaptive else (0.05, 0.0)
    data = batches(20)
    ref = make_cnn()
    mine = copy.deepcopy(ref)
    run_reference(ref, base_cls(ref.parameters(), foreach=False, **kw), data, rho, adaptive, eta)
    opt = sharpness.SAM(mine.parameters(), base_cls, rho=rho, adaptive=adaptive, eta=eta, foreach=False, **kw)
    run_sharpness(mine, opt, data, api)
    assert_models_close(ref, mine)
    fused = base_name != "rmsprop"
    assert opt.stats["fused_steps"] == (20 if fused else 0)
    assert opt.stats["base_steps"] == (0 if fused else 20)
    assert opt.stats["regathered_grads"] == 0 and opt.stats["rehomed_params"] == 0
    assert [e.name for e in opt.engines()] == ["rust"]


@pytest.mark.parametrize("base_name", ["sgd", "adamw", "rmsprop"])
def test_torch_backend_matches_reference(base_name):
    base_cls, kw = BASES[base_name]
    data = batches(10)
    ref = make_cnn()
    mine = copy.deepcopy(ref)
    run_reference(ref, base_cls(ref.parameters(), foreach=False, **kw), data, 0.1)
    opt = sharpness.SAM(mine.parameters(), base_cls, rho=0.1, backend="torch", foreach=False, **kw)
    run_sharpness(mine, opt, data)
    assert_models_close(ref, mine)
    assert [e.name for e in opt.engines()] == ["torch"]
    assert opt.stats["base_steps"] == 10


def test_mixed_dtypes_share_one_global_norm():
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    ref[2].double()
    mine = copy.deepcopy(ref)

    def loss(model, x, y):
        return nn.functional.cross_entropy(model[2](model[1](model[0](x)).double()), y)

    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(10, 6, generator=g), torch.randint(0, 3, (10,), generator=g)) for _ in range(10)]
    base = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, foreach=False)
    params = list(ref.parameters())
    for x, y in data:
        base.zero_grad()
        loss(ref, x, y).backward()
        saved = reference_first_step(params, [(params, 0.2, False, 0.0)])
        base.zero_grad()
        loss(ref, x, y).backward()
        reference_second_step(saved, base)
    opt = sharpness.SAM(mine.parameters(), torch.optim.SGD, rho=0.2, lr=0.1, momentum=0.9)
    for x, y in data:
        opt.step(lambda: (opt.zero_grad(), loss(mine, x, y).backward())[0])
    assert len(opt.engines()) == 2
    assert_models_close(ref, mine)


def test_per_group_rho_and_adaptivity():
    ref = make_cnn()
    mine = copy.deepcopy(ref)
    data = batches(10)
    body = lambda m: [p for n, p in m.named_parameters() if not n.startswith("7.")]  # noqa: E731
    head = lambda m: list(m[7].parameters())  # noqa: E731
    base = torch.optim.SGD([{"params": body(ref)}, {"params": head(ref), "lr": 0.01}], lr=0.05, momentum=0.9)
    cfg = [(body(ref), 0.05, False, 0.0), (head(ref), 1.0, True, 0.01)]
    for x, y in data:
        base.zero_grad()
        loss_of(ref, x, y).backward()
        saved = reference_first_step(None, cfg)
        base.zero_grad()
        set_bn_tracking(ref, False)
        loss_of(ref, x, y).backward()
        set_bn_tracking(ref, True)
        reference_second_step(saved, base)
    opt = sharpness.SAM(
        [{"params": body(mine)}, {"params": head(mine), "lr": 0.01, "sam_rho": 1.0, "sam_adaptive": True}],
        torch.optim.SGD,
        rho=0.05,
        eta=0.01,
        lr=0.05,
        momentum=0.9,
    )
    run_sharpness(mine, opt, data)
    assert_models_close(ref, mine)


# ---------------------------------------------------------------------------- exactness and limits


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["rust", "torch"])
@pytest.mark.parametrize("base_name", ["sgd", "adamw"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_lr_zero_gives_back_the_weights_bit_for_bit(dtype, backend, base_name, adaptive):
    model = make_cnn(dtype=dtype)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    base_cls, kw = BASES[base_name]
    kw = {**kw, "lr": 0.0}
    if base_name == "adamw" and dtype == torch.float16:
        kw["eps"] = 1e-4  # torch's own fp16 Adam turns eps=1e-8 into 0 and 0/0 into NaN
    opt = sharpness.SAM(model.parameters(), base_cls, rho=0.5, adaptive=adaptive, backend=backend, **kw)
    run_sharpness(model, opt, batches(5, dtype=dtype))
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(bits(v), bits(after[k])), k


@pytest.mark.parametrize("base_name", list(BASES))
def test_rho_zero_is_the_base_optimizer(base_name):
    base_cls, kw = BASES[base_name]
    data = batches(20)
    ref = make_cnn()
    mine = copy.deepcopy(ref)
    base = base_cls(ref.parameters(), foreach=False, **kw)
    for x, y in data:
        base.zero_grad()
        loss_of(ref, x, y).backward()
        base.step()
    opt = sharpness.SAM(mine.parameters(), base_cls, rho=0.0, foreach=False, **kw)
    run_sharpness(mine, opt, data)  # the second pass leaves BatchNorm statistics alone
    if base_name == "rmsprop":  # the base optimizer's own step ran: bit for bit
        assert opt.stats["base_steps"] == 20
        for x, y in zip(ref.state_dict().values(), mine.state_dict().values()):
            assert torch.equal(x, y)
    else:  # fused kernel: float rounding over 20 steps
        assert opt.stats["fused_steps"] == 20
        assert_models_close(ref, mine, rtol=1e-6, atol=1e-7)


def test_rho_zero_with_torch_backend_is_bit_exact():
    data = batches(20)
    ref = make_cnn()
    mine = copy.deepcopy(ref)
    base = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    for x, y in data:
        base.zero_grad()
        loss_of(ref, x, y).backward()
        base.step()
    opt = sharpness.SAM(mine.parameters(), torch.optim.SGD, rho=0.0, backend="torch", lr=0.05, momentum=0.9, weight_decay=1e-3)
    run_sharpness(mine, opt, data)
    for x, y in zip(ref.state_dict().values(), mine.state_dict().values()):
        assert torch.equal(x, y)


def test_parameter_without_gradient_is_left_alone():
    """Like torch with `p.grad is None`: no perturbation, no weight decay, no momentum state."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"used": nn.Linear(5, 3), "unused": nn.Linear(5, 3), "tail": nn.Linear(3, 2)})
    ref = copy.deepcopy(model)
    x, y = torch.randn(8, 5), torch.randn(8, 2)
    loss = lambda m: nn.functional.mse_loss(m["tail"](m["used"](x)), y)  # noqa: E731
    for base_cls, kw in [(torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.1)), (torch.optim.AdamW, dict(lr=0.1))]:
        mine = copy.deepcopy(model)
        r = copy.deepcopy(ref)
        base = base_cls(r.parameters(), foreach=False, **kw)
        params = list(r.parameters())
        opt = sharpness.SAM(mine.parameters(), base_cls, rho=0.1, foreach=False, **kw)
        for _ in range(5):
            base.zero_grad()
            loss(r).backward()
            saved = reference_first_step(params, [(params, 0.1, False, 0.0)])
            base.zero_grad()
            loss(r).backward()
            reference_second_step(saved, base)
            opt.step(lambda: (opt.zero_grad(), loss(mine).backward())[0])
        assert_models_close(r, mine)
        for p in mine["unused"].parameters():
            assert p.grad is not None and not p.grad.any()  # a zero view, which counts as None
            assert len(opt.state[p]) == 0
        assert torch.equal(mine["unused"].weight, model["unused"].weight)
        assert opt.stats["fused_steps"] == 5


def test_model_zero_grad_between_steps_stays_correct_and_is_counted():
    """The HF Trainer calls model.zero_grad() (set_to_none) every step: the gradient views are
    replaced by fresh tensors, which SAM copies back (counted) rather than missing."""
    data = batches(8)
    ref = make_cnn()
    mine = copy.deepcopy(ref)
    run_reference(ref, torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9), data, 0.05)
    opt = sharpness.SAM(mine.parameters(), torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9)
    n_params = len(list(mine.parameters()))
    for x, y in data:
        mine.zero_grad()
        loss_of(mine, x, y).backward()
        opt.first_step()
        mine.zero_grad()
        with sharpness.frozen_running_stats(mine):
            loss_of(mine, x, y).backward()
        opt.second_step()
    assert_models_close(ref, mine)
    # Every backward's fresh gradients are copied back into the flat buffer.
    assert opt.stats["regathered_grads"] == 2 * n_params * len(data)
    assert opt.stats["fused_steps"] == len(data)


def test_rebinding_parameter_data_is_repaired():
    data = batches(6)
    ref = make_cnn()
    mine = copy.deepcopy(ref)
    run_reference(ref, torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9), data, 0.05)
    opt = sharpness.SAM(mine.parameters(), torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9)
    run_sharpness(mine, opt, data[:3])
    mine[0].weight.data = mine[0].weight.data.clone()  # e.g. a user loading weights by rebinding
    run_sharpness(mine, opt, data[3:])
    assert opt.stats["rehomed_params"] == 1
    assert_models_close(ref, mine)


def test_add_param_group_rebuilds_the_layout():
    ref = make_cnn()
    mine = copy.deepcopy(ref)
    data = batches(8)
    first = lambda m: list(m[0].parameters()) + list(m[1].parameters())  # noqa: E731
    rest = lambda m: list(m[5].parameters()) + list(m[7].parameters())  # noqa: E731
    base = torch.optim.SGD(first(ref), lr=0.05, momentum=0.9)
    opt = sharpness.SAM(first(mine), torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9)
    for step, (x, y) in enumerate(data):
        if step == 4:
            base.add_param_group({"params": rest(ref), "lr": 0.02})
            opt.add_param_group({"params": rest(mine), "lr": 0.02})
        params = [p for g in base.param_groups for p in g["params"]]
        base.zero_grad()
        for p in ref.parameters():
            p.grad = None
        loss_of(ref, x, y).backward()
        for p in ref.parameters():
            if all(p is not q for q in params):
                p.grad = None
        saved = reference_first_step(params, [(params, 0.05, False, 0.0)])
        for p in ref.parameters():
            p.grad = None
        set_bn_tracking(ref, False)
        loss_of(ref, x, y).backward()
        set_bn_tracking(ref, True)
        reference_second_step(saved, base)
        for p in mine.parameters():
            if all(p is not q for g in opt.param_groups for q in g["params"]):
                p.grad = None
        run_sharpness(mine, opt, [(x, y)])
        for p in mine.parameters():
            if all(p is not q for g in opt.param_groups for q in g["params"]):
                p.grad = None
    assert opt.stats["layouts"] == 2
    assert_models_close(ref, mine)


def test_nonfinite_gradient_applies_no_perturbation():
    model = make_cnn()
    ref = copy.deepcopy(model)
    opt = sharpness.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    x, y = batches(1)[0]
    loss_of(model, x, y).backward()
    model[7].weight.grad[0, 0] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    opt.first_step()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    assert opt.stats["nonfinite_skips"] == 1
    # The second step is the plain base step with the gradients it is given.
    base = torch.optim.SGD(ref.parameters(), lr=0.1)
    for p, q in zip(model.parameters(), ref.parameters()):
        q.grad = p.grad.clone()
    base.step()
    opt.second_step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, equal_nan=True, rtol=0, atol=0)


def test_sparse_gradients_are_refused():
    emb = nn.Embedding(10, 4, sparse=True)
    for backend in ["rust", "torch"]:
        opt = sharpness.SAM(emb.parameters(), torch.optim.SGD, lr=0.1, backend=backend)
        opt.engines()
        emb.weight.grad = None
        emb(torch.tensor([1, 2])).sum().backward()
        if emb.weight.grad is not None and not emb.weight.grad.is_sparse:
            emb.weight.grad = emb.weight.grad.to_sparse()
        with pytest.raises(RuntimeError, match="sparse"):
            opt.first_step()


def test_calling_errors_show_both_ways():
    model = make_cnn()
    opt = sharpness.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="closure.*first_step"):
        opt.step()
    with pytest.raises(RuntimeError, match="first_step"):
        opt.second_step()
    x, y = batches(1)[0]
    loss_of(model, x, y).backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="twice"):
        opt.first_step()
    with pytest.raises(RuntimeError, match="perturbed"):
        opt.state_dict()
    assert opt.step() is None  # completes the pending step
    with pytest.raises(ValueError):
        sharpness.SAM(model.parameters(), torch.optim.SGD, rho=-1.0, lr=0.1)
    with pytest.raises(ValueError):
        sharpness.SAM(model.parameters(), torch.optim.SGD, backend="cuda", lr=0.1)
    with pytest.raises(TypeError):
        sharpness.SAM(model.parameters(), "sgd", lr=0.1)
    meta = nn.Linear(2, 2, device="meta")
    with pytest.raises(ValueError, match="rust"):
        sharpness.SAM(meta.parameters(), torch.optim.SGD, backend="rust", lr=0.1)


def test_state_dict_round_trip_resumes_bit_for_bit():
    data = batches(16)
    for base_cls, kw in [BASES["sgd"], BASES["adam-amsgrad-l2"]]:
        a = make_cnn()
        opt_a = sharpness.SAM(a.parameters(), base_cls, rho=0.05, **kw)
        run_sharpness(a, opt_a, data)

        b = make_cnn()
        opt_b = sharpness.SAM(b.parameters(), base_cls, rho=0.05, **kw)
        run_sharpness(b, opt_b, data[:8])
        buf = io.BytesIO()
        torch.save({"model": b.state_dict(), "opt": opt_b.state_dict()}, buf)
        buf.seek(0)
        ckpt = torch.load(buf, weights_only=True)
        c = make_cnn(seed=123)
        opt_c = sharpness.SAM(c.parameters(), base_cls, rho=0.05, **kw)
        c.load_state_dict(ckpt["model"])
        opt_c.load_state_dict(ckpt["opt"])
        run_sharpness(c, opt_c, data[8:])
        for x, y in zip(a.state_dict().values(), c.state_dict().values()):
            assert torch.equal(x, y)
        sa, sc = opt_a.state_dict(), opt_c.state_dict()
        for k in sa["state"]:
            for name in sa["state"][k]:
                assert torch.equal(sa["state"][k][name], sc["state"][k][name]), name
        assert opt_c.stats["rehomed_state"] > 0  # the loaded state was adopted into the buffers


def test_state_dict_is_loadable_by_the_plain_base_optimizer():
    model = make_cnn()
    opt = sharpness.SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-3)
    run_sharpness(model, opt, batches(3))
    sd = opt.state_dict()
    plain = torch.optim.AdamW(model.parameters(), lr=1e-3)
    plain.load_state_dict({k: v for k, v in sd.items() if k != "sam"})
    assert float(plain.state_dict()["state"][0]["step"]) == 3.0


def test_base_optimizer_with_its_own_rho_and_an_instance():
    model = make_cnn()
    opt = sharpness.SAM(model.parameters(), torch.optim.Adadelta, rho=0.1, lr=1.0)
    assert opt.param_groups[0]["rho"] == 0.9 and opt.param_groups[0]["sam_rho"] == 0.1
    run_sharpness(model, opt, batches(2))
    model2 = make_cnn()
    base = torch.optim.SGD(model2.parameters(), lr=0.1)
    opt2 = sharpness.SAM(model2.parameters(), base, rho=0.1)
    assert opt2.base_optimizer is base and opt2.param_groups is base.param_groups
    run_sharpness(model2, opt2, batches(2))
    with pytest.raises(ValueError, match="same parameters"):
        sharpness.SAM(list(model2.parameters())[:2], base)


def test_lr_scheduler_drives_the_base_step():
    model = make_cnn()
    opt = sharpness.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for x, y in batches(3):
        run_sharpness(model, opt, [(x, y)], api="closure")
        sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)


def test_frozen_parameters_use_the_torch_engine_and_can_be_unfrozen():
    model = make_cnn()
    for p in model[0].parameters():
        p.requires_grad_(False)
    opt = sharpness.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    frozen = [p.detach().clone() for p in model[0].parameters()]
    run_sharpness(model, opt, batches(3))
    for p, q in zip(model[0].parameters(), frozen):
        assert torch.equal(p, q)
    assert sorted(e.name for e in opt.engines()) == ["rust", "torch"]
    for p in model[0].parameters():
        p.requires_grad_(True)
    run_sharpness(model, opt, batches(2))
    assert not torch.equal(model[0].weight, frozen[0])


def test_running_statistics_untouched_by_the_second_pass():
    model = make_cnn()
    opt = sharpness.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    x, y = batches(1)[0]
    loss_of(model, x, y).backward()
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    opt.first_step(zero_grad=True)
    with sharpness.frozen_running_stats(model):
        loss_of(model, x, y).backward()
    opt.second_step()
    for k, v in stats.items():
        assert torch.equal(v, model.state_dict()[k]), k
    assert not hasattr(model[1], "_sharpness_saved_running_stats")


def test_bf16_trajectory_close_to_float32_math():
    """bf16 weights: the fused kernels compute in float32 and round once, so a bf16 run tracks the
    float32 reference to bf16 precision."""
    data = batches(5)
    ref = make_cnn()
    mine = copy.deepcopy(ref).to(torch.bfloat16)
    run_reference(ref, torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9), data, 0.05)
    opt = sharpness.SAM(mine.parameters(), torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9)
    run_sharpness(mine, opt, [(x.bfloat16(), y) for x, y in data])
    for (name, x), y in zip(ref.state_dict().items(), mine.state_dict().values()):
        if "num_batches" in name:
            continue
        torch.testing.assert_close(y.float(), x, rtol=0.05, atol=0.02, msg=lambda m: f"{name}: {m}")


def test_gradients_written_in_place_count_as_gradients():
    """Code that writes gradients into the existing `.grad` (custom all-reduce, synthetic grads)
    is not ignored although no backward ran."""
    ref = make_cnn()
    mine = copy.deepcopy(ref)
    g = torch.Generator().manual_seed(5)
    grads = [[torch.randn(p.shape, generator=g) for p in ref.parameters()] for _ in range(2)]
    base = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    params = list(ref.parameters())
    for p, gr in zip(params, grads[0]):
        p.grad = gr.clone()
    saved = reference_first_step(params, [(params, 0.05, False, 0.0)])
    for p, gr in zip(params, grads[1]):
        p.grad = gr.clone()
    reference_second_step(saved, base)

    opt = sharpness.SAM(mine.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, weight_decay=0.01)
    opt.zero_grad()  # builds the buffers; every .grad is now a (zero) view
    for p, gr in zip(mine.parameters(), grads[0]):
        p.grad.copy_(gr)
    opt.first_step()
    for p, gr in zip(mine.parameters(), grads[1]):
        p.grad.copy_(gr)
    opt.second_step()
    assert_models_close(ref, mine)
    assert opt.stats["fused_steps"] == 1


def test_two_call_api_raises_no_scheduler_warning():
    import warnings

    model = make_cnn()
    opt = sharpness.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for x, y in batches(2):
            run_sharpness(model, opt, [(x, y)], api="two-call")
            sched.step()


# ================================================================ the numpy front
# Tests of the numpy front, ``sharpness.numpy.SAM``.
#
# The references below are written from the formulas (SAM: Foret et al. 2021, arXiv:2010.01412;
# ASAM: Kwon et al. 2021, arXiv:2102.11600; the base steps as torch.optim.SGD / Adam / AdamW
# document them) in plain per-array numpy, in float64; nothing but the class under test is imported
# from the package, so the library is never checked against itself.

# --------------------------------------------------------------------------- reference

SGD_DEFAULTS = dict(lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                    maximize=False)
ADAM_DEFAULTS = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
                     maximize=False)


class RefSAM:
    """SAM / ASAM + a torch.optim base step, per array, in float64, straight from the formulas."""

    def __init__(self, params, rho=0.05, adaptive=False, eta=0.01, base="sgd", **kw):
        self.w = [np.array(p, dtype=np.float64) for p in params]
        self.rho, self.adaptive, self.eta, self.base = rho, adaptive, eta, base
        defaults = dict(SGD_DEFAULTS) if base == "sgd" else dict(ADAM_DEFAULTS)
        if base == "adamw":
            defaults["weight_decay"] = 1e-2
        defaults.update(kw)
        self.hp = defaults
        self.t = 0
        self.buf = [None] * len(self.w)
        self.m = [np.zeros_like(w) for w in self.w]
        self.v = [np.zeros_like(w) for w in self.w]
        self.vmax = [np.zeros_like(w) for w in self.w]

    def first_step(self, grads):
        g = [np.asarray(x, dtype=np.float64) for x in grads]
        if self.adaptive:
            T = [np.abs(w) + self.eta for w in self.w]
            norm = math.sqrt(sum(float(np.sum((t * gi) ** 2)) for t, gi in zip(T, g)))
            e = [self.rho * t * t * gi / (norm + 1e-12) for t, gi in zip(T, g)]
        else:
            norm = math.sqrt(sum(float(np.sum(gi**2)) for gi in g))
            e = [self.rho * gi / (norm + 1e-12) for gi in g]
        if self.hp["maximize"]:  # SAM of -L
            e = [-x for x in e]
        self.backup = [w.copy() for w in self.w]
        if math.isfinite(norm):
            self.w = [w + x for w, x in zip(self.w, e)]
        return norm

    def second_step(self, grads):
        self.w = self.backup
        self.base_step(grads)

    def base_step(self, grads):
        g = [np.asarray(x, dtype=np.float64) for x in grads]
        (self._sgd if self.base == "sgd" else self._adam)(g)

    def _sgd(self, grads):  # torch.optim.SGD, single-tensor path
        hp = self.hp
        for i, g in enumerate(grads):
            if hp["maximize"]:
                g = -g
            if hp["weight_decay"]:
                g = g + hp["weight_decay"] * self.w[i]
            if hp["momentum"]:
                if self.buf[i] is None:
                    self.buf[i] = g.copy()
                else:
                    self.buf[i] = hp["momentum"] * self.buf[i] + (1 - hp["dampening"]) * g
                g = g + hp["momentum"] * self.buf[i] if hp["nesterov"] else self.buf[i]
            self.w[i] = self.w[i] - hp["lr"] * g

    def _adam(self, grads):  # torch.optim.Adam / AdamW, single-tensor path
        hp = self.hp
        b1, b2 = hp["betas"]
        self.t += 1
        for i, g in enumerate(grads):
            if hp["maximize"]:
                g = -g
            if hp["weight_decay"]:
                if self.base == "adamw":
                    self.w[i] = self.w[i] * (1 - hp["lr"] * hp["weight_decay"])
                else:
                    g = g + hp["weight_decay"] * self.w[i]
            self.m[i] = b1 * self.m[i] + (1 - b1) * g
            self.v[i] = b2 * self.v[i] + (1 - b2) * g * g
            bc1, bc2 = 1 - b1**self.t, 1 - b2**self.t
            v = self.v[i]
            if hp["amsgrad"]:
                self.vmax[i] = np.maximum(self.vmax[i], self.v[i])
                v = self.vmax[i]
            denom = np.sqrt(v) / math.sqrt(bc2) + hp["eps"]
            self.w[i] = self.w[i] - hp["lr"] / bc1 * self.m[i] / denom


# --------------------------------------------------------------------------- problem

SHAPES = [(7,), (3, 5), (2, 3, 4), (), (0,), (1,)]


def make_problem(seed, dtypes):
    """Initial weights and a smooth, non-quadratic loss with gradient a(w-c) + 0.1(w-c)³."""
    rng = np.random.default_rng(seed)
    w0, a, c = [], [], []
    for shape, dt in zip(SHAPES, dtypes):
        w = rng.normal(size=shape)
        w0.append(w.astype(dt))
        a.append(rng.uniform(0.5, 2.0, size=shape))
        off = rng.uniform(0.5, 1.5, size=shape) * rng.choice([-1.0, 1.0], size=shape)
        c.append(w + off)

    def grads_at(ws, out_dtypes):
        out = []
        for w, ai, ci, dt in zip(ws, a, c, out_dtypes):
            d = np.asarray(w, dtype=np.float64) - ci
            out.append(np.asarray(ai * d + 0.1 * d**3, dtype=dt))
        return out

    return w0, grads_at


CONFIGS = [
    ("sgd", dict(lr=0.05)),
    ("sgd", dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2)),
    ("sgd", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    ("sgd", dict(lr=0.01, momentum=0.5, maximize=True)),
    ("adam", dict(lr=0.02)),
    ("adam", dict(lr=0.02, betas=(0.8, 0.99), weight_decay=1e-2, amsgrad=True)),
    ("adamw", dict(lr=0.02, weight_decay=0.1)),
    ("adamw", dict(lr=0.02, amsgrad=True, maximize=True)),
]
CONFIG_IDS = [f"{b}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for b, kw in CONFIGS]
TOL = {np.float32: dict(rtol=1e-5, atol=1e-6), np.float64: dict(rtol=1e-11, atol=1e-13)}


def tolerance(dtypes):
    """float32 anywhere reaches every array through the global norm."""
    return TOL[np.float32] if np.float32 in dtypes else TOL[np.float64]


def run_pair(dtypes, base, kw, rho, adaptive, steps=20, seed=0, check_each_step=True):
    w0, grads_at = make_problem(seed, dtypes)
    params = [w.copy() for w in w0]
    opt = NumpySAM(params, rho=rho, adaptive=adaptive, eta=0.01, base=base, **kw)
    ref = RefSAM(w0, rho=rho, adaptive=adaptive, eta=0.01, base=base, **kw)
    f64 = [np.float64] * len(dtypes)
    for _ in range(steps):
        assert opt.first_step(grads_at(params, dtypes)) is True  # a second pass follows
        n = opt.last_grad_norm
        n_ref = ref.first_step(grads_at(ref.w, f64))
        assert n == pytest.approx(n_ref, rel=1e-5)
        opt.second_step(grads_at(params, dtypes))
        ref.second_step(grads_at(ref.w, f64))
        if check_each_step:
            for p, r in zip(params, ref.w):
                np.testing.assert_allclose(p, r, **tolerance(dtypes))
    return params, ref


# --------------------------------------------------------------------------- trajectories


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("adaptive", [False, True], ids=["SAM", "ASAM"])
@pytest.mark.parametrize(("base", "kw"), CONFIGS, ids=CONFIG_IDS)
def test_numpy_trajectory_matches_reference(base, kw, adaptive, dtype):
    rho = 0.5 if adaptive else 0.05
    params, ref = run_pair([dtype] * len(SHAPES), base, kw, rho, adaptive)
    assert all(p.dtype == dtype for p in params)
    # the perturbation mattered: the trajectory is not the base optimizer's
    base_only = RefSAM(make_problem(0, [np.float64] * 6)[0], rho=0.0, base=base, **kw)
    _, grads_at = make_problem(0, [np.float64] * 6)
    for _ in range(20):
        base_only.first_step(grads_at(base_only.w, [np.float64] * 6))
        base_only.second_step(grads_at(base_only.w, [np.float64] * 6))
    diff = max(float(np.max(np.abs(a - b), initial=0.0)) for a, b in zip(ref.w, base_only.w))
    assert diff > 1e-5


@pytest.mark.parametrize("adaptive", [False, True], ids=["SAM", "ASAM"])
@pytest.mark.parametrize(("base", "kw"), [CONFIGS[2], CONFIGS[5]], ids=["sgd", "adam"])
def test_numpy_mixed_dtypes_share_one_global_norm(base, kw, adaptive):
    dtypes = [np.float32, np.float64, np.float64, np.float32, np.float32, np.float64]
    params, ref = run_pair(dtypes, base, kw, 0.5 if adaptive else 0.05, adaptive)
    for p, dt in zip(params, dtypes):
        assert p.dtype == dt


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("adaptive", [False, True], ids=["SAM", "ASAM"])
@pytest.mark.parametrize(("base", "kw"), [CONFIGS[2], CONFIGS[7]], ids=["sgd", "adamw"])
def test_large_arrays_match_reference(base, kw, adaptive, dtype):
    """Arrays spanning many kernel chunks (and threads), odd lengths included."""
    rng = np.random.default_rng(7)
    shapes = [(301, 257), (40_001,), (3,)]
    w0 = [rng.normal(size=s) for s in shapes]
    c = [w + rng.choice([-1.0, 1.0], size=w.shape) for w in w0]
    params = [w.astype(dtype) for w in w0]
    opt = NumpySAM(params, rho=0.5 if adaptive else 0.05, adaptive=adaptive, base=base, **kw)
    ref = RefSAM(w0, rho=0.5 if adaptive else 0.05, adaptive=adaptive, base=base, **kw)

    def grads(ws, dt):
        return [np.asarray(np.float64(w) - ci + 0.1 * (np.float64(w) - ci) ** 3, dt)
                for w, ci in zip(ws, c)]

    for _ in range(5):
        opt.first_step(grads(params, dtype))
        ref.first_step(grads(ref.w, np.float64))
        opt.second_step(grads(params, dtype))
        ref.second_step(grads(ref.w, np.float64))
    for p, r in zip(params, ref.w):
        np.testing.assert_allclose(p, r, **TOL[dtype])


@pytest.mark.parametrize("adaptive", [False, True], ids=["SAM", "ASAM"])
@pytest.mark.parametrize(("base", "kw"), CONFIGS, ids=CONFIG_IDS)
def test_numpy_rho_zero_is_the_base_optimizer(base, kw, adaptive):
    w0, grads_at = make_problem(1, [np.float64] * 6)
    params = [w.copy() for w in w0]
    opt = NumpySAM(params, rho=0.0, adaptive=adaptive, base=base, **kw)
    ref = RefSAM(w0, rho=0.0, base=base, **kw)
    f64 = [np.float64] * 6
    for _ in range(20):
        g = grads_at(params, f64)
        opt.first_step(g)
        opt.second_step(g)
        ref.base_step(grads_at(ref.w, f64))
    for p, r in zip(params, ref.w):
        np.testing.assert_allclose(p, r, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("adaptive", [False, True], ids=["SAM", "ASAM"])
@pytest.mark.parametrize(
    ("base", "kw"),
    [
        ("sgd", dict(lr=0.0, momentum=0.9, nesterov=True, weight_decay=0.1)),
        ("adam", dict(lr=0.0, weight_decay=0.1, amsgrad=True)),
        ("adamw", dict(lr=0.0, weight_decay=0.1)),
    ],
    ids=["sgd", "adam", "adamw"],
)
def test_restoration_is_exact(base, kw, adaptive, dtype):
    """With lr=0 every step must give back the weights bit for bit (no w+e-e drift)."""
    rng = np.random.default_rng(2)
    params = [np.array(rng.normal(size=s) * 10.0 ** rng.integers(-3, 3), dtype) for s in SHAPES]
    saved = [p.copy() for p in params]
    opt = NumpySAM(params, rho=2.0 if adaptive else 0.5, adaptive=adaptive, base=base, **kw)
    for _ in range(50):
        opt.first_step([np.array(rng.normal(size=s), dtype) for s in SHAPES])
        assert any(not np.array_equal(p, s) for p, s in zip(params, saved))
        opt.second_step([np.array(rng.normal(size=s), dtype) for s in SHAPES])
        for p, s in zip(params, saved):
            assert p.tobytes() == s.tobytes()


# --------------------------------------------------------------------------- non-finite


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("adaptive", [False, True], ids=["SAM", "ASAM"])
@pytest.mark.parametrize(
    ("base", "kw"), [CONFIGS[1], CONFIGS[5]], ids=["sgd-momentum", "adam-amsgrad"]
)
def test_nonfinite_gradient_skips_the_perturbation(base, kw, adaptive, bad):
    dtypes = [np.float32, np.float64] * 3
    w0, grads_at = make_problem(3, dtypes)
    a = [w.copy() for w in w0]
    b = [w.copy() for w in w0]
    opt_a = NumpySAM(a, rho=0.5, adaptive=adaptive, base=base, **kw)
    # twin optimizer; at the bad steps it gets zero gradients, whose perturbation is exactly 0,
    # so its second_step is the plain base step from the same optimizer state
    opt_b = NumpySAM(b, rho=0.5, adaptive=adaptive, base=base, **kw)
    for step in range(6):
        if step in (2, 3):
            g_bad = grads_at(a, dtypes)
            g_bad[3].flat[0] = bad
            before = [p.copy() for p in a]
            assert opt_a.first_step(g_bad) is True  # second_step takes the plain base step
            assert not math.isfinite(opt_a.last_grad_norm)
            for p, q in zip(a, before):  # weights untouched by the perturbation
                assert p.tobytes() == q.tobytes()
            opt_b.first_step([np.zeros_like(p) for p in b])
            for p, q in zip(b, before):
                assert p.tobytes() == q.tobytes()
            g2 = grads_at(a, dtypes)
            opt_a.second_step(g2)
            opt_b.second_step(g2)
        else:
            opt_a.step(lambda ps: (0.0, grads_at(ps, dtypes)))
            opt_b.step(lambda ps: (0.0, grads_at(ps, dtypes)))
        for p, q in zip(a, b):  # bit for bit
            assert p.tobytes() == q.tobytes()
    sd = opt_a.state_dict()
    assert sd["sam"]["stats"]["nonfinite_skips"] == 2 and "nonfinite_skips" not in opt_b.state_dict()["sam"]["stats"]
    assert sd["sam"]["state"]["step"] == 6
    assert all(np.all(np.isfinite(p)) for p in a)


def test_nonfinite_step_matches_reference_base_step():
    w0, grads_at = make_problem(4, [np.float64] * 6)
    params = [w.copy() for w in w0]
    opt = NumpySAM(params, rho=0.05, base="sgd", lr=0.1, momentum=0.9)
    ref = RefSAM(w0, rho=0.0, base="sgd", lr=0.1, momentum=0.9)
    g = grads_at(params, [np.float64] * 6)
    g[0][0] = np.nan
    opt.first_step(g)
    g2 = grads_at(params, [np.float64] * 6)
    opt.second_step(g2)
    ref.base_step(g2)
    for p, r in zip(params, ref.w):
        np.testing.assert_allclose(p, r, rtol=1e-13, atol=1e-15)


# --------------------------------------------------------------------------- step()


def test_step_calls_grad_fn_twice_and_returns_first_loss():
    w0, grads_at = make_problem(5, [np.float64] * 6)
    params = [w.copy() for w in w0]
    opt = NumpySAM(params, rho=0.1, base="sgd", lr=0.1)
    ref = RefSAM(w0, rho=0.1, base="sgd", lr=0.1)
    seen = []

    def grad_fn(ps):
        assert ps is opt.params or all(p is q for p, q in zip(ps, params))
        seen.append([p.copy() for p in ps])
        return len(seen), grads_at(ps, [np.float64] * 6)

    assert opt.step(grad_fn) == 1
    assert len(seen) == 2
    f64 = [np.float64] * 6
    ref.first_step(grads_at(ref.w, f64))
    for s, r in zip(seen[1], ref.w):  # the second call sees w + e
        np.testing.assert_allclose(s, r, rtol=1e-13, atol=1e-15)
    ref.second_step(grads_at(ref.w, f64))
    for p, r in zip(params, ref.w):
        np.testing.assert_allclose(p, r, rtol=1e-13, atol=1e-15)
    assert opt.step(grad_fn) == 3


def test_step_restores_weights_when_second_call_fails():
    params = [np.arange(5, dtype=np.float32), np.ones((2, 2))]
    saved = [p.copy() for p in params]
    opt = NumpySAM(params, rho=0.5, base="adam", lr=0.1)
    calls = []

    def grad_fn(ps):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return 0.0, [np.ones_like(p) for p in ps]

    with pytest.raises(KeyboardInterrupt):
        opt.step(grad_fn)
    for p, s in zip(params, saved):
        assert p.tobytes() == s.tobytes()
    assert not opt.perturbed
    opt.step(lambda ps: (0.0, [np.ones_like(p) for p in ps]))  # usable again


# --------------------------------------------------------------------------- state_dict


def _plain(obj):
    if isinstance(obj, dict):
        return all(isinstance(k, (str, int)) and _plain(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return all(_plain(v) for v in obj)
    return obj is None or type(obj) in (bool, int, float, str) or type(obj) is np.ndarray


@pytest.mark.parametrize("adaptive", [False, True], ids=["SAM", "ASAM"])
@pytest.mark.parametrize(
    ("base", "kw"), [CONFIGS[2], CONFIGS[5], CONFIGS[7]], ids=["sgd", "adam", "adamw"]
)
def test_state_dict_round_trip_continues_bit_for_bit(base, kw, adaptive):
    dtypes = [np.float32, np.float64, np.float32, np.float32, np.float64, np.float64]
    w0, grads_at = make_problem(6, dtypes)
    params = [w.copy() for w in w0]
    opt = NumpySAM(params, rho=0.3, adaptive=adaptive, base=base, **kw)
    fn = lambda ps: (0.0, grads_at(ps, dtypes))  # noqa: E731
    for _ in range(7):
        opt.step(fn)
    sd = opt.state_dict()
    assert _plain(sd)
    snapshot = copy.deepcopy(sd)
    resume = [p.copy() for p in params]
    for _ in range(8):
        opt.step(fn)
    # later steps did not change the saved dict
    assert sd["sam"]["state"]["step"] == snapshot["sam"]["state"]["step"] == 7
    assert sorted(sd["state"]) == list(range(len(params)))  # torch's layout: per parameter index
    for i, s in sd["state"].items():
        t = snapshot["state"][i]
        for k in s:
            assert np.asarray(s[k]).tobytes() == np.asarray(t[k]).tobytes()
    for i, s in sd["state"].items():
        for v in s.values():
            assert not isinstance(v, np.ndarray) or (v.dtype == params[i].dtype and v.shape == params[i].shape)

    opt2 = NumpySAM(resume, rho=123.0, adaptive=not adaptive, base=base, lr=0.5)  # overwritten
    opt2.load_state_dict(sd)
    for s in sd["state"].values():  # the loaded arrays are copies
        for v in s.values():
            if isinstance(v, np.ndarray):
                v[...] = 1e30
    for _ in range(8):
        opt2.step(fn)
    for p, q in zip(params, resume):
        assert p.tobytes() == q.tobytes()
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"] and a["sam"]["state"]["step"] == b["sam"]["state"]["step"] == 15
    assert a["state"].keys() == b["state"].keys()
    for i, s in a["state"].items():
        t = b["state"][i]
        assert s.keys() == t.keys()
        for k in s:
            assert np.asarray(s[k]).tobytes() == np.asarray(t[k]).tobytes()


def test_state_dict_errors():
    params = [np.zeros(3), np.zeros(2, np.float32)]
    opt = NumpySAM(params, base="sgd", lr=0.1, momentum=0.9)
    opt.step(lambda ps: (0.0, [np.ones_like(p) for p in ps]))
    sd = opt.state_dict()
    with pytest.raises(ValueError, match="base"):
        NumpySAM([np.zeros(3), np.zeros(2, np.float32)], base="adam").load_state_dict(sd)
    with pytest.raises(ValueError, match="parameters"):
        NumpySAM([np.zeros(3)], base="sgd").load_state_dict(sd)
    with pytest.raises(ValueError, match="shape"):
        NumpySAM([np.zeros(4), np.zeros(2, np.float32)], base="sgd").load_state_dict(sd)
    with pytest.raises(ValueError, match="float64"):
        NumpySAM([np.zeros(3, np.float32), np.zeros(2, np.float32)], base="sgd").load_state_dict(sd)
    opt.first_step([np.ones(3), np.ones(2, np.float32)])
    with pytest.raises(RuntimeError, match="second_step"):
        opt.state_dict()
    with pytest.raises(RuntimeError, match="second_step"):
        opt.load_state_dict(sd)


# --------------------------------------------------------------------------- errors


def test_invalid_params():
    f32 = np.zeros(4, np.float32)
    with pytest.raises(TypeError, match="list"):
        NumpySAM(f32)
    with pytest.raises(TypeError, match="list"):
        NumpySAM(3.0)
    with pytest.raises(ValueError, match="empty"):
        NumpySAM([])
    with pytest.raises(TypeError, match="numpy array"):
        NumpySAM([f32, [1.0, 2.0]])
    for dt in (np.float16, np.int32, np.complex64, np.dtype(">f4")):
        with pytest.raises(TypeError, match="dtype"):
            NumpySAM([np.zeros(3, dt)])
    with pytest.raises(ValueError, match="contiguous"):
        NumpySAM([np.zeros((4, 4)).T])
    with pytest.raises(ValueError, match="contiguous"):
        NumpySAM([np.zeros(8)[::2]])
    ro = np.zeros(3)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        NumpySAM([ro])
    with pytest.raises(ValueError, match="share memory"):
        NumpySAM([f32, f32])
    big = np.zeros(10)
    with pytest.raises(ValueError, match="share memory"):
        NumpySAM([big[:6], big[4:]])
    NumpySAM([big[:5], big[5:]])  # adjacent views do not overlap


def test_invalid_hyperparams():
    p = [np.zeros(3)]
    with pytest.raises(ValueError, match="base"):
        NumpySAM(p, base="rmsprop")
    with pytest.raises(TypeError, match="momentum"):
        NumpySAM(p, base="adam", momentum=0.9)
    with pytest.raises(TypeError, match="foreach"):
        NumpySAM(p, base="sgd", foreach=True)
    with pytest.raises(ValueError, match="rho"):
        NumpySAM(p, rho=-0.1)
    with pytest.raises(ValueError, match="rho"):
        NumpySAM(p, rho=float("nan"))
    with pytest.raises(ValueError, match="eta"):
        NumpySAM(p, eta=-1.0)
    with pytest.raises(ValueError, match="lr"):
        NumpySAM(p, lr=-1.0)
    with pytest.raises(ValueError, match="nesterov"):
        NumpySAM(p, nesterov=True)
    with pytest.raises(ValueError, match="nesterov"):
        NumpySAM(p, nesterov=True, momentum=0.9, dampening=0.1)
    with pytest.raises(ValueError, match="betas"):
        NumpySAM(p, base="adam", betas=(0.9, 1.0))
    with pytest.raises(TypeError, match="betas"):
        NumpySAM(p, base="adamw", betas=0.9)
    with pytest.raises(ValueError, match="eps"):
        NumpySAM(p, base="adamw", eps=-1e-8)
    with pytest.raises(TypeError, match="adaptive"):
        NumpySAM(p, adaptive="yes")
    opt = NumpySAM(p, base="adamw")
    group = opt.param_groups[0]
    assert group["weight_decay"] == 1e-2 and group["lr"] == 1e-3 and group["decoupled_weight_decay"] is True
    # settings are per group and checked at every call: a bad one changes nothing
    w0 = p[0].copy()
    group["lr"] = -0.5
    with pytest.raises(ValueError, match="lr"):
        opt.step(lambda ps: (0.0, [np.ones(3)]))
    assert p[0].tobytes() == w0.tobytes() and not opt.perturbed
    group["lr"] = 1e-3
    group["sam_rho"] = "0.1"
    with pytest.raises(TypeError, match="sam_rho"):
        opt.first_step([np.ones(3)])
    group["sam_rho"] = 0.1
    group["sam_rhoo"] = 0.1  # a misspelt setting
    with pytest.raises(TypeError, match="sam_rhoo"):
        opt.first_step([np.ones(3)])
    del group["sam_rhoo"]
    # an attribute that is not a setting is refused, not silently ignored
    for name in ("rho", "lr", "momentum", "sam_rho"):
        with pytest.raises(AttributeError, match="param_groups"):
            setattr(opt, name, 0.1)
    opt.step(lambda ps: (0.0, [np.ones(3)]))


def test_invalid_grads_and_call_order():
    params = [np.zeros(3, np.float32), np.zeros((2, 2))]
    opt = NumpySAM(params, base="sgd", lr=0.1)
    good = [np.ones(3, np.float32), np.ones((2, 2))]
    with pytest.raises(RuntimeError, match="needs a first_step"):
        opt.second_step(good)
    with pytest.raises(ValueError, match="1 gradient arrays for 2 parameters"):
        opt.first_step(good[:1])
    with pytest.raises(TypeError, match=r"grads\[0\] has dtype float64"):
        opt.first_step([np.ones(3), np.ones((2, 2))])
    with pytest.raises(ValueError, match=r"grads\[1\] has shape \(4,\)"):
        opt.first_step([good[0], np.ones(4)])
    with pytest.raises(TypeError, match="not one array"):
        opt.first_step(np.ones(3, np.float32))
    with pytest.raises(TypeError, match="numpy array"):
        opt.first_step([[1.0, 1.0, 1.0], good[1]])
    assert not opt.perturbed
    # non-contiguous gradients are accepted (they are only read)
    opt.first_step([np.ones(6, np.float32)[::2], np.ones((2, 2)).T])
    with pytest.raises(RuntimeError, match="twice"):
        opt.first_step(good)
    with pytest.raises(ValueError, match="gradient arrays"):
        opt.second_step(good[:1])
    assert opt.perturbed  # a rejected second_step leaves the step pending
    opt.second_step(good)
    with pytest.raises(TypeError, match="pair"):
        opt.step(lambda ps: good)  # grads alone, not (loss, grads)
    assert not opt.perturbed
    # numpy scalars are accepted for 0-d parameters
    opt0 = NumpySAM([np.zeros((), np.float32), np.zeros(2, np.float32)], lr=0.1)
    opt0.step(lambda ps: (0.0, [np.float32(1.0), np.ones(2, np.float32)]))
    assert opt0.params[0] == np.float32(-0.1)


# --------------------------------------------------------------------------- torch semantics


def _torch_case(dtype_name, base, adaptive):
    torch = pytest.importorskip("torch")
    tdt = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(20, 16, 8, generator=g, dtype=tdt)
    Y = torch.randint(0, 3, (20, 16), generator=g)
    init = [
        torch.randn(8, 12, generator=g, dtype=tdt) * 0.4,
        torch.randn(12, generator=g, dtype=tdt) * 0.1,
        torch.randn(12, 3, generator=g, dtype=tdt) * 0.4,
        torch.randn(3, generator=g, dtype=tdt) * 0.1,
    ]

    def loss_of(ps, x, y):
        h = torch.tanh(x @ ps[0] + ps[1])
        return torch.nn.functional.cross_entropy(h @ ps[2] + ps[3], y)

    return torch, X, Y, init, loss_of


@pytest.mark.parametrize("dtype_name", ["float64", "float32"])
@pytest.mark.parametrize("adaptive", [False, True], ids=["SAM", "ASAM"])
@pytest.mark.parametrize(
    ("base", "kw"),
    [
        ("sgd", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-3)),
        ("sgd", dict(lr=0.1, momentum=0.8, dampening=0.2)),
        ("adam", dict(lr=0.01, weight_decay=1e-3, amsgrad=True)),
        ("adamw", dict(lr=0.01, weight_decay=0.1)),
    ],
    ids=["sgd-nesterov", "sgd-dampening", "adam", "adamw"],
)
def test_matches_torch_optim(dtype_name, base, kw, adaptive):
    """The numpy front against torch.optim (foreach=False) with a per-tensor SAM in torch."""
    torch, X, Y, init, loss_of = _torch_case(dtype_name, base, adaptive)
    rho, eta = (0.5, 0.01) if adaptive else (0.05, 0.0)
    tparams = [p.clone().requires_grad_(True) for p in init]
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[base]
    topt = cls(tparams, foreach=False, **kw)
    nparams = [p.numpy().copy() for p in init]
    nopt = NumpySAM(nparams, rho=rho, adaptive=adaptive, eta=eta, base=base, **kw)

    for x, y in zip(X, Y):
        # torch: per-tensor SAM / ASAM, then the torch optimizer's own step
        grads = torch.autograd.grad(loss_of(tparams, x, y), tparams)
        with torch.no_grad():
            if adaptive:
                ts = [p.abs() + eta for p in tparams]
                norm = torch.sqrt(sum(((t * gr) ** 2).sum() for t, gr in zip(ts, grads)))
                es = [rho * t * t * gr / (norm + 1e-12) for t, gr in zip(ts, grads)]
            else:
                norm = torch.sqrt(sum((gr**2).sum() for gr in grads))
                es = [rho * gr / (norm + 1e-12) for gr in grads]
            backups = [p.clone() for p in tparams]
            for p, e in zip(tparams, es):
                p.add_(e)
        grads2 = torch.autograd.grad(loss_of(tparams, x, y), tparams)
        with torch.no_grad():
            for p, b, gr in zip(tparams, backups, grads2):
                p.copy_(b)
                p.grad = gr.clone()
        topt.step()

        # numpy front
        def grad_fn(ps):
            leaves = [torch.from_numpy(p).requires_grad_(True) for p in ps]
            loss = loss_of(leaves, x, y)
            grads = torch.autograd.grad(loss, leaves)
            return loss.item(), [gr.numpy().copy() for gr in grads]

        nopt.step(grad_fn)

    tol = dict(rtol=1e-10, atol=1e-12) if dtype_name == "float64" else dict(rtol=2e-5, atol=2e-6)
    for p, t in zip(nparams, tparams):
        np.testing.assert_allclose(p, t.detach().numpy(), **tol)


# --------------------------------------------------------------------------- a real training run


def _digits():
    datasets = pytest.importorskip("sklearn.datasets")
    X, y = datasets.load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    X, y = X[order], y[order]
    return X[:1400], y[:1400], X[1400:], y[1400:]


def _mlp_loss_and_grads(params, X, y):
    W1, b1, W2, b2 = params
    h = np.maximum(X @ W1 + b1, 0.0)
    z = h @ W2 + b2
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    n = len(y)
    loss = float(-np.log(p[np.arange(n), y]).mean())
    dz = p
    dz[np.arange(n), y] -= 1.0
    dz /= n
    dh = (dz @ W2.T) * (h > 0)
    return loss, [X.T @ dh, dh.sum(axis=0), h.T @ dz, dz.sum(axis=0)]


def test_digits_mlp_trains():
    Xtr, ytr, Xte, yte = _digits()
    rng = np.random.default_rng(0)
    hidden = 64
    params = [
        (rng.normal(size=(64, hidden)) * np.sqrt(2 / 64)).astype(np.float32),
        np.zeros(hidden, np.float32),
        (rng.normal(size=(hidden, 10)) * np.sqrt(2 / hidden)).astype(np.float32),
        np.zeros(10, np.float32),
    ]
    opt = NumpySAM(params, rho=0.05, base="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4)
    epoch_loss = []
    for _epoch in range(8):
        order = rng.permutation(len(ytr))
        losses = []
        for i in range(0, len(order), 32):
            idx = order[i : i + 32]
            losses.append(opt.step(lambda ps: _mlp_loss_and_grads(ps, Xtr[idx], ytr[idx])))
        epoch_loss.append(np.mean(losses))
    assert all(p.dtype == np.float32 and np.all(np.isfinite(p)) for p in params)
    h = np.maximum(Xte @ params[0] + params[1], 0.0)
    acc = float(np.mean((h @ params[2] + params[3]).argmax(axis=1) == yte))
    assert epoch_loss[-1] < 0.5 * epoch_loss[0], epoch_loss
    assert acc > 0.85, acc
