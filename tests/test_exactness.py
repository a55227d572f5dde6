"""What "exact" means, tested: ``rho=0`` against the base optimizer (bit for bit with
``fused_step=False``, within a stated per-step bound on the fused path), and the weights after an
exception between or inside the two halves of a step (back at ``w``, or put back by ``restore()``,
bit for bit), for every method that has the two-call API."""

from __future__ import annotations

import copy

import pytest
import registry
import torch
from test_amp import BASES as AMP_BASES, _begin, _build, _loss
from torch import nn

import sharpness

# -- rho = 0 against the base optimizer --------------------------------------------------------------

BASE_CASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.05)),
    "sgd-momentum-wd": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
    "sgd-nesterov-maximize": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, maximize=True)),
    "adam": (torch.optim.Adam, dict(lr=1e-3)),
    "adam-amsgrad": (torch.optim.Adam, dict(lr=1e-3, amsgrad=True)),
    "adam-l2": (torch.optim.Adam, dict(lr=1e-3, weight_decay=1e-2)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-3, weight_decay=1e-2)),
    "adamw-amsgrad-maximize": (torch.optim.AdamW, dict(lr=1e-3, amsgrad=True, maximize=True)),
}
# The fused step's stated bound (docs/guide.md, "Exactness"): one step from the same state as the
# base optimizer's own step, every weight within this many ulp of max(|w|, |w'|, |w' - w|).
# Adam's L2 (coupled) weight decay forms g + λw, which cancels where g ≈ -λw: a different rounding
# there is a large relative change of the update.
ULP_BOUND = {"adam-l2": 256}
DEFAULT_ULP_BOUND = 16


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 48), nn.Tanh(), nn.Linear(48, 5))


def _data(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(32, 12, generator=g), torch.randint(0, 5, (32,), generator=g)) for _ in range(n)]


def _backward(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()


def _ulp32(x: torch.Tensor) -> torch.Tensor:
    """The float32 ulp at each magnitude (normal range)."""
    return torch.exp2(torch.floor(torch.log2(x.clamp_min(2.0**-126))) - 23)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("case", list(BASE_CASES))
def test_rho_zero_without_fusion_is_the_base_optimizer_bit_for_bit(case, foreach):
    """``fused_step=False``: restore, then the base optimizer's own step: every weight and every
    state tensor equal to torch's own run, bit for bit, over 15 steps."""
    cls, kw = BASE_CASES[case]
    ref = _mlp()
    mine = copy.deepcopy(ref)
    base = cls(ref.parameters(), foreach=foreach, **kw)
    opt = sharpness.SAM(mine.parameters(), cls, rho=0.0, fused_step=False, foreach=foreach, **kw)
    for x, y in _data(15):
        _backward(ref, base, x, y)
        base.step()
        _backward(mine, opt, x, y)
        assert opt.first_step()
        opt.second_step()
    assert opt.stats["base_steps"] == 15 and opt.stats["fused_steps"] == 0
    for p, q in zip(ref.parameters(), mine.parameters()):
        assert torch.equal(p, q)
        for key, value in base.state[p].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(opt.state[q][key])), key


@pytest.mark.parametrize("case", list(BASE_CASES))
def test_fused_step_is_within_the_stated_bound_of_the_base_step(case):
    """The fused restore+step against torch's own step from the same state, along torch's
    trajectory (both put back on it after every step): within the stated ulp bound each step. The
    bound is not vacuous: it is far below the step itself."""
    cls, kw = BASE_CASES[case]
    ref = _mlp()
    mine = copy.deepcopy(ref)
    base = cls(ref.parameters(), **kw)
    opt = sharpness.SAM(mine.parameters(), cls, rho=0.0, **kw)
    bound = ULP_BOUND.get(case, DEFAULT_ULP_BOUND)
    worst = 0.0
    for x, y in _data(25):
        before = [p.detach().clone() for p in ref.parameters()]
        _backward(ref, base, x, y)
        _backward(mine, opt, x, y)
        base.step()
        opt.first_step()
        opt.second_step()
        with torch.no_grad():
            for w0, p, q in zip(before, ref.parameters(), mine.parameters()):
                scale = torch.maximum(torch.maximum(w0.abs(), p.abs()), (p - w0).abs())
                error = ((p.double() - q.double()).abs() / _ulp32(scale).double()).max()
                worst = max(worst, float(error))
                q.copy_(p)  # back on torch's trajectory, state too: one-step errors only
                for key, value in base.state[p].items():
                    if key != "step":
                        opt.state[q][key].copy_(value)
    assert opt.stats["fused_steps"] == 25
    assert worst <= bound, f"{case}: {worst} ulp"


def test_fused_and_unfused_sam_steps_agree_to_rounding():
    """With ``rho > 0`` both settings run the same SAM step; only the base step's rounding
    differs."""
    data = _data(10)
    runs = []
    for fused in (True, False):
        model = _mlp()
        opt = sharpness.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.05, momentum=0.9, fused_step=fused)
        for x, y in data:
            _backward(model, opt, x, y)
            opt.first_step(zero_grad=True)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.second_step()
        runs.append((model, opt))
    (a, oa), (b, ob) = runs
    assert oa.stats["fused_steps"] == 10 and ob.stats["base_steps"] == 10
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("value", [1, 0, None, "no"])
def test_fused_step_takes_a_bool(value):
    with pytest.raises(TypeError, match="fused_step"):
        sharpness.SAM(_mlp().parameters(), torch.optim.SGD, lr=0.1, fused_step=value)


# -- exceptions between and inside the halves ------------------------------------------------------

# Every method with the two-call API (the registry's entries whose restoration is exact), on both
# CPU engines and both bases (the AMP tests').
METHOD_CASES = registry.cases(lambda e: e.two_call and e.restores_exactly, AMP_BASES)
# the cases with a second pass to interrupt (Momentum-SAM's one pass: tests/test_momentum_sam.py)
PERTURBED_CASES = [case for case in METHOD_CASES if registry.get(case[0]).second_pass]


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _batches(n: int, seed: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)) for _ in range(n)]


def _sparse_like(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().to_sparse()


def _to_a_perturbed_step(model, opt, batches):
    """Steps until ``first_step`` asks for a second pass; returns the weights it started from
    and the batch (the second backward is left to the caller)."""
    for x, y in batches:
        w = [p.detach().clone() for p in model.parameters()]
        _begin(opt)
        _loss(model, x, y).backward()
        if opt.first_step(zero_grad=True):
            return w, (x, y)
        opt.zero_grad()
    raise AssertionError("no step asked for a second pass")


@pytest.mark.parametrize("backend", ["rust", "torch"])
@pytest.mark.parametrize("name,base", PERTURBED_CASES)
def test_an_exception_inside_second_step_leaves_the_weights_restorable(name, base, backend):
    """A gradient second_step cannot take (here a sparse one, assigned after the second backward)
    raises a clear error; the weights are then ``w`` again, or ``restore()`` puts them back, bit
    for bit, and the optimizer takes further steps as usual."""
    model = _model()
    opt = _build(name, model, backend, base) if base else _build(name, model, backend)
    batches = _batches(8)
    w, (x, y) = _to_a_perturbed_step(model, opt, batches)
    _loss(model, x, y).backward()
    first = next(model.parameters())
    first.grad = _sparse_like(first.grad)
    with pytest.raises(RuntimeError, match="sparse"):
        opt.second_step()
    opt.restore()
    for p, w0 in zip(model.parameters(), w):
        assert torch.equal(p, w0)
    opt.zero_grad()
    for x, y in batches[:3]:  # usable again: no step pending, no state left half-way
        _begin(opt)
        _loss(model, x, y).backward()
        if opt.first_step(zero_grad=True):
            _loss(model, x, y).backward()
            opt.second_step()
        opt.zero_grad()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("backend", ["rust", "torch"])
def test_an_exception_inside_the_perturbation_leaves_the_weights_at_w(backend, monkeypatch):
    """An exception raised while the weights are being moved (here after the first engine of two
    moved its parameters: float32 and float64 groups) leaves every weight at ``w``."""
    torch.manual_seed(0)
    a, b = nn.Linear(4, 3), nn.Linear(4, 3).double()
    params = list(a.parameters()) + list(b.parameters())
    opt = sharpness.SAM(params, torch.optim.SGD, rho=0.1, lr=0.1, backend=backend)
    assert len(opt.engines()) == 2
    x = torch.randn(8, 4)
    (a(x).square().sum() + b(x.double()).square().sum()).backward()
    w = [p.detach().clone() for p in params]
    calls = []
    second = opt.engines()[1]
    original = type(second).perturb

    def failing(self, groups, norm):
        if self is second:
            calls.append(1)
            raise KeyboardInterrupt
        return original(self, groups, norm)

    monkeypatch.setattr(type(second), "perturb", failing)
    with pytest.raises(KeyboardInterrupt):
        opt.first_step()
    assert calls
    for p, w0 in zip(params, w):
        assert torch.equal(p, w0)
    assert not opt.restore()  # nothing pending: the step never began
