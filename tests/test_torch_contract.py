"""`sharpness.SAM` behaves like a torch optimizer around it: hooks, profiler, compile, schedulers,
random state, parameter groups, low precision and memory."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

import sharpness


def mlp(seed=0, dropout=0.0, bn=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 16)]
    if bn:
        layers.append(nn.BatchNorm1d(16))
    layers += [nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 3)]
    return nn.Sequential(*layers)


def data(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(12, 6, generator=g), torch.randint(0, 3, (12,), generator=g)) for _ in range(n)]


def ce(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


def two_call(model, opt, x, y):
    ce(model, x, y).backward()
    opt.first_step(zero_grad=True)
    with sharpness.frozen_running_stats(model):
        ce(model, x, y).backward()
    opt.second_step(zero_grad=True)


def closure_step(model, opt, x, y):
    def closure():
        opt.zero_grad()
        loss = ce(model, x, y)
        loss.backward()
        return loss

    return opt.step(closure)


# ------------------------------------------------------------------------ hooks and profiler


def test_step_hooks_fire_once_per_sam_step_with_every_api():
    model = mlp()
    opt = sharpness.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    (x, y), *_ = data(1)
    two_call(model, opt, x, y)
    assert calls == ["pre", "post"]
    calls.clear()
    closure_step(model, opt, x, y)
    assert calls == ["pre", "post"]
    calls.clear()
    ce(model, x, y).backward()
    opt.first_step(zero_grad=True)
    ce(model, x, y).backward()
    opt.step()  # a trainer's optimizer.step() completing the SAM step
    assert calls == ["pre", "post"]


def test_profiler_shows_both_halves():
    model = mlp()
    opt = sharpness.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    (x, y), *_ = data(1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        closure_step(model, opt, x, y)
    names = {e.name for e in prof.events()}
    assert {"SAM.first_step", "SAM.second_step", "Optimizer.step#SAM.step"} <= names


def test_no_scheduler_warning_with_either_api(recwarn):
    model = mlp()
    opt = sharpness.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)
    for i, (x, y) in enumerate(data(4)):
        (two_call if i % 2 else closure_step)(model, opt, x, y)
        sched.step()
    assert not [w for w in recwarn if "lr_scheduler" in str(w.message)]


# --------------------------------------------------------------------------------- compile


def test_compiled_model_trains_without_recompiles():
    torch._dynamo.reset()
    model = mlp(bn=True)
    ref = copy.deepcopy(model)
    opt = sharpness.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)  # re-homes now
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    steps = data(4)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for x, y in steps:
            two_call(compiled, opt, x, y)
    ref_opt = sharpness.SAM(ref.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    for x, y in steps:
        two_call(ref, ref_opt, x, y)
    for a, b in zip(model.state_dict().values(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert opt.stats["fused_steps"] == len(steps) and opt.stats["regathered_grads"] == 0


def test_tensor_learning_rate_runs_the_base_step():
    model = mlp()
    ref = copy.deepcopy(model)
    lr = torch.tensor(0.01)
    opt = sharpness.SAM(model.parameters(), torch.optim.Adam, rho=0.05, lr=lr)
    ref_opt = sharpness.SAM(ref.parameters(), torch.optim.Adam, rho=0.05, lr=0.01)
    for x, y in data(3):
        closure_step(model, opt, x, y)
        closure_step(ref, ref_opt, x, y)
    assert opt.stats["base_steps"] == 3
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------- randomness


def dropout_masks(same_noise):
    model = mlp(dropout=0.5)
    opt = sharpness.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, same_noise=same_noise)
    masks = []
    model[2].register_forward_hook(lambda m, i, o: masks.append(o.detach() != 0))
    (x, y), *_ = data(1)
    closure_step(model, opt, x, y)
    return masks


def test_same_noise_replays_dropout_in_the_second_pass():
    first, second = dropout_masks(same_noise=True)
    assert torch.equal(first, second)
    first, second = dropout_masks(same_noise=False)
    assert not torch.equal(first, second)


def test_rho_zero_with_dropout_is_the_base_optimizer_bit_for_bit():
    model = mlp(dropout=0.3)
    ref = copy.deepcopy(model)
    torch.manual_seed(7)
    opt = sharpness.SAM(model.parameters(), torch.optim.SGD, rho=0.0, lr=0.1, backend="torch")
    for x, y in data(5):
        closure_step(model, opt, x, y)
    torch.manual_seed(7)
    base = torch.optim.SGD(ref.parameters(), lr=0.1)
    for x, y in data(5):
        base.zero_grad()
        ce(ref, x, y).backward()
        base.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)


def test_optimizer_generator_round_trips_through_state_dict():
    model = mlp()
    opt = sharpness.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, seed=3)
    torch.rand(5, generator=opt.generator)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    expected = torch.rand(5, generator=opt.generator)
    buf.seek(0)
    other = sharpness.SAM(mlp().parameters(), torch.optim.SGD, rho=0.05, lr=0.1, seed=99)
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(torch.rand(5, generator=other.generator), expected)
    # Seeding from torch's initial seed consumes nothing from the global stream.
    state = torch.get_rng_state()
    sharpness.SAM(mlp().parameters(), torch.optim.SGD, lr=0.1)
    assert torch.equal(torch.get_rng_state(), state)


# ------------------------------------------------------------------------------- groups


def test_param_groups_sorts_parameters_by_category():
    model = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 8), nn.LayerNorm(8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    groups = sharpness.param_groups(
        model, no_perturbation=("embedding",), no_adaptivity=("bias", "norm"), no_weight_decay=("bias", "norm", "embedding")
    )
    by_id = {id(p): {k: v for k, v in g.items() if k != "params"} for g in groups for p in g["params"]}
    assert by_id[id(model[0].weight)] == {"sam_rho": 0.0, "weight_decay": 0.0}
    assert by_id[id(model[1].weight)] == {}
    assert by_id[id(model[1].bias)] == {"sam_adaptive": False, "weight_decay": 0.0}
    assert by_id[id(model[2].weight)] == {"sam_adaptive": False, "weight_decay": 0.0}
    assert by_id[id(model[3].bias)] == {"sam_adaptive": False, "weight_decay": 0.0}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    groups = sharpness.param_groups(model, overrides={"4.*": {"lr": 0.01}, "*": {"lr": 0.1}})
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert lr_of[id(model[4].weight)] == 0.01 and lr_of[id(model[1].weight)] == 0.1
    with pytest.raises(ValueError, match="unknown categories"):
        sharpness.param_groups(model, no_perturbation=("biases",))


def test_unperturbed_groups_stay_out_of_the_norm_and_the_perturbation():
    for backend in ["rust", "torch"]:
        model = mlp()
        groups = sharpness.param_groups(model, no_perturbation=("bias",))
        opt = sharpness.SAM(groups, torch.optim.SGD, rho=0.5, lr=0.1, backend=backend)
        (x, y), *_ = data(1)
        ce(model, x, y).backward()
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.first_step()
        norm = math.sqrt(sum(float((g.double() ** 2).sum()) for n, g in grads.items() if not n.endswith("bias")))
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                assert torch.equal(p, weights[n])
            else:
                torch.testing.assert_close(p, weights[n] + grads[n] * (0.5 / norm), rtol=1e-6, atol=1e-7)
        opt.second_step()


# ------------------------------------------------------------------- precision and memory


def test_perturbation_report_measures_what_bf16_loses():
    torch.manual_seed(0)
    reports = {}
    for dtype in [torch.float32, torch.bfloat16]:
        model = nn.Linear(512, 512).to(dtype)
        opt = sharpness.SAM(model.parameters(), torch.optim.SGD, rho=0.01, lr=0.1)
        x = torch.randn(32, 512, dtype=dtype)
        model(x).float().square().mean().backward()
        opt.first_step()
        reports[dtype] = opt.perturbation_report()
        opt.second_step()
    assert reports[torch.float32]["relative_error"] < 1e-3  # float32 rounding of w + e
    assert reports[torch.float32]["lost_fraction"] < 1e-3  # only components of tiny gradients
    # ρ = 0.01 over 262k weights of ~0.02: most components are far below half a bf16 ulp.
    assert reports[torch.bfloat16]["lost_fraction"] > 0.5
    assert reports[torch.bfloat16]["relative_error"] > 0.5
    with pytest.raises(RuntimeError, match="pending"):
        opt.perturbation_report()


def test_memory_bytes_reports_one_backup():
    model = mlp()
    opt = sharpness.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    closure_step(model, opt, *data(1)[0])
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    mem = opt.memory_bytes()
    assert mem["backup"] == n_bytes
    assert mem["base_state"] == n_bytes  # the momentum buffers


# ------------------------------------------------------------------------ interruptions


def test_restore_undoes_an_interrupted_step():
    model = mlp()
    opt = sharpness.SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    (x, y), *_ = data(1)
    ce(model, x, y).backward()
    opt.first_step()
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    assert opt.restore() is True  # e.g. in an `except KeyboardInterrupt:` handler
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    assert opt.restore() is False

    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = ce(model, x, y)
        loss.backward()
        if len(calls) == 2:
            raise KeyboardInterrupt
        return loss

    with pytest.raises(KeyboardInterrupt):
        opt.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    closure_step(model, opt, x, y)  # and training goes on
