"""Momentum-SAM (Becker, Altrock, Risse, 2024, arXiv:2401.12033) on both fronts: the paper's SGD
and AdamW forms against references written from the formulas, the weights at ``w`` between steps
(evaluation, checkpoints, ``restore()``, LR schedulers), the GradScaler loop, and refusals."""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sharpness
import sharpness.numpy

STEPS = 6
EPS = 1e-12  # the norm's epsilon, as in the paper's code


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def _batches(n: int = STEPS, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(12, 5, generator=g, dtype=torch.float64), torch.randn(12, 3, generator=g, dtype=torch.float64))
            for _ in range(n)]


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(model(x), y)


def _closure(opt, model, x, y):
    def closure():
        opt.zero_grad()
        loss = _loss(model, x, y)
        loss.backward()
        return loss

    return closure


def _grads_at(model: nn.Module, weights: list[torch.Tensor], x, y) -> list[torch.Tensor]:
    """∇L at ``weights`` (the model's weights put back after)."""
    saved = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p, w in zip(model.parameters(), weights):
            p.copy_(w)
    model.zero_grad()
    _loss(model, x, y).backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p, w in zip(model.parameters(), saved):
            p.copy_(w)
    return grads


def _perturbed(w, v, rho):
    """w̃ = w − ρ·v/(‖v‖ + ε) (w itself before any v)."""
    if v is None:
        return [t.clone() for t in w]
    norm = math.sqrt(sum(float((t * t).sum()) for t in v))
    return [a - rho / (norm + EPS) * b for a, b in zip(w, v)]


def reference_sgd(model, batches, rho, lr, momentum, weight_decay, lrs=None):
    """The paper's SGD form (its Algorithm 1) with torch's SGD step: v ← μv + (g + wd·w) (v = g + wd·w
    at the first step), w ← w − lr·v, the gradient taken at w̃ = w − ρv/‖v‖."""
    w = [p.detach().clone() for p in model.parameters()]
    v = None
    trajectory = []
    for t, (x, y) in enumerate(batches):
        step_lr = lr if lrs is None else lrs[t]
        g = _grads_at(model, _perturbed(w, v, rho), x, y)
        d = [gi + weight_decay * wi for gi, wi in zip(g, w)]
        v = [di.clone() for di in d] if v is None else [momentum * vi + di for vi, di in zip(v, d)]
        w = [wi - step_lr * vi for wi, vi in zip(w, v)]
        trajectory.append([t.clone() for t in w])
    return trajectory


def reference_adamw(model, batches, rho, lr, betas, eps, weight_decay):
    """The paper's AdamW form with torch's AdamW step: the perturbation along the first moment m."""
    b1, b2 = betas
    w = [p.detach().clone() for p in model.parameters()]
    m = s = None
    trajectory = []
    for t, (x, y) in enumerate(batches, start=1):
        g = _grads_at(model, _perturbed(w, m, rho), x, y)
        m = [(1 - b1) * gi for gi in g] if m is None else [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g)]
        s = [(1 - b2) * gi * gi for gi in g] if s is None else [b2 * si + (1 - b2) * gi * gi for si, gi in zip(s, g)]
        w = [
            wi * (1 - lr * weight_decay) - (lr / (1 - b1**t)) * mi / ((si / (1 - b2**t)).sqrt() + eps)
            for wi, mi, si in zip(w, m, s)
        ]
        trajectory.append([t_.clone() for t_ in w])
    return trajectory


def _assert_close(actual, expected, rtol=1e-12, atol=1e-14):
    for a, b in zip(actual, expected):
        torch.testing.assert_close(torch.as_tensor(a), b, rtol=rtol, atol=atol)


# -- the formula, torch front ------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["rust", "torch"])
def test_sgd_form_follows_the_formula(backend):
    model, batches = _model(), _batches()
    expected = reference_sgd(copy.deepcopy(model), batches, rho=0.3, lr=0.05, momentum=0.9, weight_decay=1e-2)
    opt = sharpness.MomentumSAM(model.parameters(), torch.optim.SGD, rho=0.3, lr=0.05, momentum=0.9,
                                weight_decay=1e-2, backend=backend)
    for (x, y), w in zip(batches, expected):
        opt.step(_closure(opt, model, x, y))
        _assert_close([p.detach() for p in model.parameters()], w)  # at w between steps, never at w̃
    assert opt.stats["nonfinite_skips"] == 0 and opt.sam_state["step"] == STEPS
    assert opt.sam_state["momentum_norm"] > 0


@pytest.mark.parametrize("backend", ["rust", "torch"])
def test_adamw_form_follows_the_formula(backend):
    model, batches = _model(), _batches()
    expected = reference_adamw(copy.deepcopy(model), batches, rho=0.5, lr=1e-2, betas=(0.9, 0.99), eps=1e-8,
                               weight_decay=0.05)
    opt = sharpness.MomentumSAM(model.parameters(), torch.optim.AdamW, rho=0.5, lr=1e-2, betas=(0.9, 0.99),
                                eps=1e-8, weight_decay=0.05, backend=backend)
    for (x, y), w in zip(batches, expected):
        opt.step(_closure(opt, model, x, y))
        _assert_close([p.detach() for p in model.parameters()], w)


def test_the_closure_runs_once_per_step_at_the_perturbed_point():
    model, batches = _model(), _batches(3)
    opt = sharpness.MomentumSAM(model.parameters(), torch.optim.SGD, rho=0.3, lr=0.05, momentum=0.9)
    seen = []
    for x, y in batches:
        w = [p.detach().clone() for p in model.parameters()]
        v = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()] if opt.state else None

        def closure(x=x, y=y):
            seen.append([p.detach().clone() for p in model.parameters()])
            return _closure(opt, model, x, y)()

        opt.step(closure)
        _assert_close(seen[-1], _perturbed(w, v, 0.3))
    assert len(seen) == 3
    _assert_close(seen[0], [p.detach() for p in _model().parameters()])  # no move before the first v


def test_rho_zero_is_the_base_optimizer_bit_for_bit():
    """ρ = 0 moves nothing: the base optimizer's own step (torch backend) gives its numbers exactly."""
    model, batches = _model(), _batches()
    ref = copy.deepcopy(model)
    base = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2)
    opt = sharpness.MomentumSAM(model.parameters(), torch.optim.SGD, rho=0.0, lr=0.05, momentum=0.9,
                                weight_decay=1e-2, backend="torch")
    for x, y in batches:
        base.zero_grad()
        _loss(ref, x, y).backward()
        base.step()
        opt.step(_closure(opt, model, x, y))
    for a, b in zip(ref.parameters(), model.parameters()):
        assert torch.equal(a, b)


def test_rho_zero_with_the_fused_kernel_is_the_base_optimizer_to_rounding():
    model, batches = _model(), _batches()
    ref = copy.deepcopy(model)
    base = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    opt = sharpness.MomentumSAM(model.parameters(), torch.optim.AdamW, rho=0.0, lr=1e-2, backend="rust")
    for x, y in batches:
        base.zero_grad()
        _loss(ref, x, y).backward()
        base.step()
        opt.step(_closure(opt, model, x, y))
    assert opt.stats["fused_steps"] == STEPS  # the restoration from w̃ and the step in one pass
    _assert_close([p.detach() for p in model.parameters()], [p.detach() for p in ref.parameters()])


@pytest.mark.parametrize("finish", ["step", "first_step"])
def test_the_two_call_form_is_the_closure_form(finish):
    batches = _batches()
    m1, m2 = _model(), _model()
    o1 = sharpness.MomentumSAM(m1.parameters(), torch.optim.SGD, rho=0.3, lr=0.05, momentum=0.9)
    o2 = sharpness.MomentumSAM(m2.parameters(), torch.optim.SGD, rho=0.3, lr=0.05, momentum=0.9)
    for x, y in batches:
        o1.step(_closure(o1, m1, x, y))
        o2.begin_step()
        _loss(m2, x, y).backward()
        if finish == "step":
            assert o2.step() is None
        else:
            assert o2.first_step(zero_grad=True) is False  # no second pass, the step is taken
        o2.zero_grad()
        assert o2._pending is None
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_step_without_begin_step_says_how_to_call_it():
    model, (x, y) = _model(), _batches(1)[0]
    opt = sharpness.MomentumSAM(model.parameters(), torch.optim.SGD, rho=0.3, lr=0.05, momentum=0.9)
    _loss(model, x, y).backward()
    with pytest.raises(RuntimeError, match=r"begin_step\(\) before the forward pass"):
        opt.step()
    with pytest.raises(RuntimeError, match=r"needs begin_step\(\)"):
        opt.first_step()


# -- the weights at w between steps: evaluation, checkpoints, restore(), schedulers ----------------


def test_restore_during_a_step_puts_w_back_and_abandons_the_step():
    """restore() after begin_step(): w bit for bit, no base step; the run then goes on as one that
    never saw that batch."""
    batches = _batches()
    m1, m2 = _model(), _model()
    o1 = sharpness.MomentumSAM(m1.parameters(), torch.optim.SGD, rho=0.3, lr=0.05, momentum=0.9)
    o2 = sharpness.MomentumSAM(m2.parameters(), torch.optim.SGD, rho=0.3, lr=0.05, momentum=0.9)
    for i, (x, y) in enumerate(batches):
        if i == 3:
            w = [p.detach().clone() for p in m2.parameters()]
            o2.begin_step()
            assert any(not torch.equal(a, p) for a, p in zip(w, m2.parameters()))  # moved to w̃
            with pytest.raises(RuntimeError, match="state_dict"):
                o2.state_dict()  # mid-step: refused, as for every method
            _loss(m2, x, y).backward()
            assert o2.restore()
            o2.zero_grad()
            for a, p in zip(w, m2.parameters()):
                assert torch.equal(a, p)
            continue
        o1.step(_closure(o1, m1, x, y))
        o2.step(_closure(o2, m2, x, y))
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_an_exception_in_the_closure_leaves_the_weights_at_w():
    model, batches = _model(), _batches(3)
    opt = sharpness.MomentumSAM(model.parameters(), torch.optim.SGD, rho=0.3, lr=0.05, momentum=0.9)
    for x, y in batches[:2]:
        opt.step(_closure(opt, model, x, y))
    w = [p.detach().clone() for p in model.parameters()]

    def failing():
        raise KeyError("data")

    with pytest.raises(KeyError):
        opt.step(failing)
    assert opt._pending is None
    for a, p in zip(w, model.parameters()):
        assert torch.equal(a, p)
    opt.step(_closure(opt, model, *batches[2]))  # and the run goes on


def test_an_exception_in_the_base_step_leaves_the_weights_at_w():
    model, batches = _model(), _batches(3)
    opt = sharpness.MomentumSAM(model.parameters(), torch.optim.SGD, rho=0.3, lr=0.05, momentum=0.9, backend="torch")
    for x, y in batches[:2]:
        opt.step(_closure(opt, model, x, y))
    w = [p.detach().clone() for p in model.parameters()]
    opt.begin_step()
    _loss(model, *batches[2]).backward()
    first = next(model.parameters())
    first.grad = first.grad.to_sparse()  # the base step refuses it
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert opt._pending is None
    for a, p in zip(w, model.parameters()):
        assert torch.equal(a, p)


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_a_checkpoint_between_steps_resumes_bit_for_bit(base):
    """Between steps the model is at w and the perturbation is rebuilt from the base optimizer's
    buffer: model.state_dict() + opt.state_dict() resume the run exactly."""
    cls, kw = (torch.optim.SGD, dict(lr=0.05, momentum=0.9)) if base == "sgd" else (torch.optim.AdamW, dict(lr=1e-2))
    batches = _batches(8)
    model = _model()
    opt = sharpness.MomentumSAM(model.parameters(), cls, rho=0.3, **kw)
    for x, y in batches[:4]:
        opt.step(_closure(opt, model, x, y))
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    for x, y in batches[4:]:
        opt.step(_closure(opt, model, x, y))
    resumed = _model(seed=9)
    resumed.load_state_dict(saved_model)
    opt2 = sharpness.MomentumSAM(resumed.parameters(), cls, rho=0.3, **kw)
    opt2.load_state_dict(saved_opt)
    for x, y in batches[4:]:
        opt2.step(_closure(opt2, resumed, x, y))
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_an_lr_scheduler_drives_the_base_step():
    model, batches = _model(), _batches()
    lrs = [0.05 * 0.5**t for t in range(STEPS)]
    expected = reference_sgd(copy.deepcopy(model), batches, rho=0.3, lr=0.05, momentum=0.9, weight_decay=0.0, lrs=lrs)
    opt = sharpness.MomentumSAM(model.parameters(), torch.optim.SGD, rho=0.3, lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "scheduler stepped before the optimizer"
        for (x, y), w in zip(batches, expected):
            opt.step(_closure(opt, model, x, y))
            sched.step()
            _assert_close([p.detach() for p in model.parameters()], w)


# -- momentum buffers: absent, non-finite, refusals -----------------------------------------------


def test_a_parameter_without_a_buffer_leaves_the_step_unmoved_and_says_so():
    model = _model()
    unused = nn.Parameter(torch.ones(3, dtype=torch.float64))  # never receives a gradient
    opt = sharpness.MomentumSAM([*model.parameters(), unused], torch.optim.SGD, rho=0.3, lr=0.05, momentum=0.9)
    batches = _batches(3)
    opt.step(_closure(opt, model, *batches[0]))  # the first step moves nothing anyway
    assert opt.stats["unperturbed_steps"] == 0
    w = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(RuntimeWarning, match="no momentum buffer"):
        opt.begin_step()
    for a, p in zip(w, model.parameters()):
        assert torch.equal(a, p)
    assert "momentum_buffer" not in opt.state[unused]  # never created in the base optimizer's place
    opt.restore()
    assert opt.stats["unperturbed_steps"] == 1
    frozen = _model()
    frozen[0].bias.requires_grad_(False)  # a frozen parameter is not in the way
    opt = sharpness.MomentumSAM(frozen.parameters(), torch.optim.SGD, rho=0.3, lr=0.05, momentum=0.9)
    for x, y in batches:
        opt.step(_closure(opt, frozen, x, y))
    assert opt.stats["unperturbed_steps"] == 0


def test_adam_state_starts_its_own_way():
    """Before Adam's first step its state is empty; Momentum-SAM must not create exp_avg there
    (Adam would then skip its initialisation)."""
    model, batches = _model(), _batches(2)
    opt = sharpness.MomentumSAM(model.parameters(), torch.optim.Adam, rho=0.3, lr=1e-2, backend="torch")
    opt.begin_step()
    assert all(len(opt.state[p]) == 0 for p in model.parameters())
    opt.restore()
    for x, y in batches:
        opt.step(_closure(opt, model, x, y))
    assert all(int(opt.state[p]["step"]) == 2 for p in model.parameters())


def test_a_non_finite_momentum_moves_nothing():
    model, batches = _model(), _batches(2)
    opt = sharpness.MomentumSAM(model.parameters(), torch.optim.SGD, rho=0.3, lr=0.05, momentum=0.9, backend="torch")
    opt.step(_closure(opt, model, *batches[0]))
    opt.state[next(model.parameters())]["momentum_buffer"][0, 0] = float("inf")
    w = [p.detach().clone() for p in model.parameters()]
    opt.begin_step()
    for a, p in zip(w, model.parameters()):
        assert torch.equal(a, p)
    assert opt.stats["nonfinite_skips"] == 1 and not math.isfinite(opt.sam_state["momentum_norm"])
    opt.restore()


def test_base_optimizers_without_momentum_are_refused():
    params = list(_model().parameters())
    with pytest.raises(ValueError, match="momentum > 0"):
        sharpness.MomentumSAM(params, torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match="keeps none"):
        sharpness.MomentumSAM(params, torch.optim.Adagrad, lr=0.1)
    with pytest.raises(ValueError, match="adaptive"):
        sharpness.MomentumSAM(params, torch.optim.SGD, lr=0.1, momentum=0.9, adaptive=True)
    with pytest.raises(ValueError, match="rho"):
        sharpness.MomentumSAM(params, torch.optim.SGD, lr=0.1, momentum=0.9, rho=-1.0)
    with pytest.raises(ValueError, match="momentum > 0"):
        sharpness.numpy.MomentumSAM([np.zeros(3)], lr=0.1)
    sharpness.MomentumSAM(params, torch.optim.RMSprop, lr=0.1, momentum=0.9)  # keeps a momentum_buffer


# -- GradScaler -----------------------------------------------------------------------------------


def _amp_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def test_grad_scaler_loop_equals_the_unscaled_run_bit_for_bit():
    """begin_step, scaled backward, scaler.step(opt), update: at a power-of-two scale the unscaled
    gradient exactly, so the run is the run without the scaler."""
    batches = [(x.float(), y.float()) for x, y in _batches()]
    m1, m2 = _amp_model(), _amp_model()
    o1 = sharpness.MomentumSAM(m1.parameters(), torch.optim.SGD, rho=0.3, lr=0.05, momentum=0.9)
    o2 = sharpness.MomentumSAM(m2.parameters(), torch.optim.SGD, rho=0.3, lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=10**6)
    for x, y in batches:
        o1.step(_closure(o1, m1, x, y))
        o2.begin_step()
        scaler.scale(_loss(m2, x, y)).backward()
        scaler.step(o2)
        scaler.update()
        o2.zero_grad()
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    assert o2.stats["amp_skipped_steps"] == 0 and o2._pending is None


def test_an_inf_under_the_scaler_puts_w_back_and_skips_the_step():
    batches = [(x.float(), y.float()) for x, y in _batches(4)]
    model = _amp_model()
    opt = sharpness.MomentumSAM(model.parameters(), torch.optim.SGD, rho=0.3, lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=10**6)
    for i, (x, y) in enumerate(batches):
        w = [p.detach().clone() for p in model.parameters()]
        buffers = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()] if i else None
        opt.begin_step()
        scaler.scale(_loss(model, x, y) * (float("inf") if i == 2 else 1.0)).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        if i == 2:
            assert opt.stats["amp_skipped_steps"] == 1 and scaler.get_scale() == 2.0**9
            for a, p in zip(w, model.parameters()):
                assert torch.equal(a, p)
            for b, p in zip(buffers, model.parameters()):
                assert torch.equal(b, opt.state[p]["momentum_buffer"])
    assert opt.sam_state["step"] == 3


def test_first_step_with_the_scaler_defers_the_step_to_it():
    batches = [(x.float(), y.float()) for x, y in _batches()]
    m1, m2 = _amp_model(), _amp_model()
    o1 = sharpness.MomentumSAM(m1.parameters(), torch.optim.SGD, rho=0.3, lr=0.05, momentum=0.9)
    o2 = sharpness.MomentumSAM(m2.parameters(), torch.optim.SGD, rho=0.3, lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=10**6)
    for x, y in batches:
        o1.step(_closure(o1, m1, x, y))
        o2.begin_step()
        scaler.scale(_loss(m2, x, y)).backward()
        assert o2.first_step(zero_grad=True, grad_scaler=scaler) is False
        scaler.step(o2)
        scaler.update()
        o2.zero_grad()
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


# -- the numpy front --------------------------------------------------------------------------------


def _np_problem(seed=3):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((20, 6))
    b = rng.standard_normal(20)

    def grad_fn(params):
        r = a @ params[0] + params[1][0] - b
        return float(r @ r / len(b)), [2 * a.T @ r / len(b), np.array([2 * r.sum() / len(b)])]

    return [rng.standard_normal(6), np.zeros(1)], grad_fn


def _np_reference(params, grad_fn, rho, lr, momentum, adam=None, steps=STEPS):
    """The formula, in numpy: the same as :func:`reference_sgd` / :func:`reference_adamw`."""
    w = [p.copy() for p in params]
    v = m = s = None
    out = []
    for t in range(1, steps + 1):
        direction = m if adam else v
        if direction is None:
            at = w
        else:
            norm = math.sqrt(sum(float(d @ d) for d in direction))
            at = [wi - rho / (norm + EPS) * di for wi, di in zip(w, direction)]
        _, g = grad_fn([a.copy() for a in at])
        if adam:
            b1, b2, eps, wd = adam
            m = [(1 - b1) * gi for gi in g] if m is None else [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g)]
            s = [(1 - b2) * gi * gi for gi in g] if s is None else [b2 * si + (1 - b2) * gi * gi for si, gi in zip(s, g)]
            w = [wi * (1 - lr * wd) - (lr / (1 - b1**t)) * mi / (np.sqrt(si / (1 - b2**t)) + eps)
                 for wi, mi, si in zip(w, m, s)]
        else:
            v = [gi.copy() for gi in g] if v is None else [momentum * vi + gi for vi, gi in zip(v, g)]
            w = [wi - lr * vi for wi, vi in zip(w, v)]
        out.append([x.copy() for x in w])
    return out


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_numpy_front_follows_the_formula(base):
    params, grad_fn = _np_problem()
    if base == "sgd":
        expected = _np_reference(params, grad_fn, rho=0.2, lr=0.05, momentum=0.9)
        opt = sharpness.numpy.MomentumSAM(params, rho=0.2, lr=0.05, momentum=0.9)
    else:
        expected = _np_reference(params, grad_fn, rho=0.2, lr=0.01, momentum=None, adam=(0.9, 0.99, 1e-8, 0.05))
        opt = sharpness.numpy.MomentumSAM(params, base="adamw", rho=0.2, lr=0.01, betas=(0.9, 0.99), weight_decay=0.05)
    for w in expected:
        opt.step(grad_fn)
        for a, b in zip(params, w):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_numpy_two_call_form_and_restore():
    params, grad_fn = _np_problem()
    twin, _ = _np_problem()
    o1 = sharpness.numpy.MomentumSAM(params, rho=0.2, lr=0.05, momentum=0.9)
    o2 = sharpness.numpy.MomentumSAM(twin, rho=0.2, lr=0.05, momentum=0.9)
    for i in range(STEPS):
        if i == 3:  # an abandoned step: w back bit for bit, nothing else changed
            before = [p.copy() for p in twin]
            o2.begin_step()
            assert o2.restore()
            for a, b in zip(before, twin):
                assert np.array_equal(a, b)
        o1.step(grad_fn)
        o2.begin_step()
        _, grads = grad_fn(twin)
        assert o2.first_step(grads) is False
        assert not o2.perturbed
    for a, b in zip(params, twin):
        assert np.array_equal(a, b)
    with pytest.raises(RuntimeError, match="begin_step"):
        o2.first_step(grad_fn(twin)[1])


def test_numpy_checkpoint_resumes_bit_for_bit():
    params, grad_fn = _np_problem()
    opt = sharpness.numpy.MomentumSAM(params, base="adam", rho=0.2, lr=0.01)
    for _ in range(3):
        opt.step(grad_fn)
    saved_w, saved = [p.copy() for p in params], copy.deepcopy(opt.state_dict())
    for _ in range(3):
        opt.step(grad_fn)
    other = [p.copy() for p in saved_w]
    opt2 = sharpness.numpy.MomentumSAM(other, base="adam", rho=0.2, lr=0.01)
    opt2.load_state_dict(saved)
    for _ in range(3):
        opt2.step(grad_fn)
    for a, b in zip(params, other):
        assert np.array_equal(a, b)


def test_fronts_agree_bit_for_bit():
    """The same rule on both fronts: float64, the rust engine's kernels and the numpy engine's."""
    params, grad_fn = _np_problem()
    tensors = [torch.tensor(p) for p in params]
    for t in tensors:
        t.requires_grad_(True)
    opt_np = sharpness.numpy.MomentumSAM(params, rho=0.2, lr=0.05, momentum=0.9)
    opt_t = sharpness.MomentumSAM(tensors, torch.optim.SGD, rho=0.2, lr=0.05, momentum=0.9, backend="rust")
    for _ in range(STEPS):
        opt_np.step(grad_fn)
        opt_t.begin_step()
        _, grads = grad_fn([t.detach().numpy().copy() for t in tensors])
        for t, g in zip(tensors, grads):
            t.grad = torch.tensor(g)
        opt_t.step()
    for a, t in zip(params, tensors):
        assert np.array_equal(a, t.detach().numpy())
