"""`sharpness.SAM` against a per-tensor SAM/ASAM written here from the formulas.

The reference below imports nothing from `sharpness`: it perturbs each tensor by
`e = ρ·g/(‖g‖+1e-12)` (ASAM: `ρ·T²g/(‖Tg‖+1e-12)`, `T = |w|+η`, one global norm in float64),
restores from clones and lets a separate torch.optim instance (`foreach=False`) take the step.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

import sharpness

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
