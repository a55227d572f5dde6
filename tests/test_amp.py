"""SAM under mixed precision: torch.amp.GradScaler (the two-pass recipe, skipped steps, clipping)
and bf16 autocast. Real GradScalers on the CPU (`GradScaler("cpu")`), float32 models with forced
infs for the skips, and fp16 autocast where the CPU supports it."""

from __future__ import annotations

import copy

import pytest
import registry
import torch
import torch.nn.functional as F

import sharpness

BACKENDS = ["rust", "torch"]


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _data(seed: int = 1, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randn(n, 3, generator=g)


def _opt(model, backend, base="sgd", adaptive=False, rho=0.1):
    if base == "sgd":
        return sharpness.SAM(model.parameters(), torch.optim.SGD, rho=rho, adaptive=adaptive, backend=backend,
                             lr=0.1, momentum=0.9)
    return sharpness.SAM(model.parameters(), torch.optim.Adam, rho=rho, adaptive=adaptive, backend=backend, lr=1e-2)


def _weights(model):
    return [p.detach().clone() for p in model.parameters()]


def _plain_sam_step(model, opt, x, y, clip=None):
    F.mse_loss(model(x), y).backward()
    opt.first_step(zero_grad=True)
    F.mse_loss(model(x), y).backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.second_step(zero_grad=True)


def _scaled_sam_step(model, opt, scaler, x, y, clip=None, inf_first=False, inf_second=False):
    """The documented recipe."""
    loss = F.mse_loss(model(x), y) * (float("inf") if inf_first else 1.0)
    scaler.scale(loss).backward()
    opt.first_step(zero_grad=True)
    loss2 = F.mse_loss(model(x), y) * (float("inf") if inf_second else 1.0)
    scaler.scale(loss2).backward()
    if clip is not None:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base", ["sgd", "adam"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_scaled_steps_equal_unscaled_steps(backend, base, adaptive):
    """The loss scale changes neither e nor the step: a scaler with a power-of-two scale gives the
    same trajectory as no scaler (to float rounding)."""
    x, y = _data()
    m1, m2 = _model(), _model()
    o1, o2 = _opt(m1, backend, base, adaptive), _opt(m2, backend, base, adaptive)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14, growth_interval=2)
    for _ in range(5):
        _plain_sam_step(m1, o1, x, y)
        _scaled_sam_step(m2, o2, scaler, x, y)
    assert scaler.get_scale() > 2.0**14  # it grew: the scale really changed along the way
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert o2.stats["amp_skipped_steps"] == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("adaptive", [False, True])
def test_perturbation_is_invariant_to_the_loss_scale(backend, adaptive):
    x, y = _data()
    perturbed = []
    for scale in (1.0, 2.0**16, 3.0):
        model = _model()
        opt = _opt(model, backend, adaptive=adaptive)
        (F.mse_loss(model(x), y) * scale).backward()
        opt.first_step(zero_grad=True)
        perturbed.append(_weights(model))
        opt.restore()
    for other in perturbed[1:]:
        for a, b in zip(perturbed[0], other):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base", ["sgd", "adam"])
def test_inf_in_second_gradient_skips_and_restores(backend, base):
    x, y = _data()
    model = _model()
    opt = _opt(model, backend, base)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    _scaled_sam_step(model, opt, scaler, x, y)  # some base optimizer state
    before = _weights(model)
    state = copy.deepcopy(opt.state_dict())
    steps = opt.sam_state["step"]
    _scaled_sam_step(model, opt, scaler, x, y, inf_second=True)
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)  # restored bit for bit, never left at w + e
    after = opt.state_dict()
    for k, entry in state["state"].items():
        for name, value in entry.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(after["state"][k][name])), name
    assert scaler.get_scale() == 2.0**9  # the scaler saw the inf and backed off
    assert opt._pending is None and opt.sam_state["step"] == steps
    assert opt.stats["amp_skipped_steps"] == 1
    _scaled_sam_step(model, opt, scaler, x, y)  # and training goes on
    assert opt.sam_state["step"] == steps + 1
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_inf_in_first_gradient_skips_the_perturbation(backend):
    """A non-finite first gradient applies no perturbation; the scaler then decides from g̃ alone
    (here finite: the step is the base step at w, as with ρ = 0)."""
    x, y = _data()
    m1, m2 = _model(), _model()
    o1, o2 = _opt(m1, backend), _opt(m2, backend)
    s1 = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    s2 = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    _scaled_sam_step(m1, o1, s1, x, y)
    _scaled_sam_step(m2, o2, s2, x, y)
    _scaled_sam_step(m1, o1, s1, x, y, inf_first=True)
    for group in o2.param_groups:
        group["sam_rho"] = 0.0
    _scaled_sam_step(m2, o2, s2, x, y)
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert o1.stats["nonfinite_skips"] == 1 and o1.stats["amp_skipped_steps"] == 0
    assert o1._pending is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_rho_zero_under_scaler_is_the_base_optimizer_under_scaler(backend):
    """With ρ = 0, SAM + GradScaler (including a skipped step) is torch's own AMP loop."""
    x, y = _data()
    m1, m2 = _model(), _model()
    opt = _opt(m1, backend, rho=0.0)
    ref = torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9)
    s1 = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    s2 = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    for i in range(4):
        _scaled_sam_step(m1, opt, s1, x, y, inf_second=i == 2)
        s2.scale(F.mse_loss(m2(x), y) * (float("inf") if i == 2 else 1.0)).backward()
        s2.step(ref)
        s2.update()
        ref.zero_grad()
    for a, b in zip(m1.parameters(), m2.parameters()):
        if backend == "torch":  # the base optimizer's own step: bit for bit
            assert torch.equal(a, b)
        else:  # the fused kernel: float rounding
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert s1.get_scale() == s2.get_scale()


@pytest.mark.parametrize("backend", BACKENDS)
def test_clipping_after_the_second_backward(backend):
    """`scaler.unscale_(opt); clip_grad_norm_(...); scaler.step(opt)` clips g̃ (the one unscale_
    per update the scaler allows) and equals clipping without a scaler."""
    x, y = _data()
    m1, m2 = _model(), _model()
    o1, o2 = _opt(m1, backend), _opt(m2, backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for _ in range(3):
        _plain_sam_step(m1, o1, x, y, clip=0.05)
        _scaled_sam_step(m2, o2, scaler, x, y, clip=0.05)
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_scaler_refuses_closures():
    x, y = _data()
    model = _model()
    opt = _opt(model, "auto")
    scaler = torch.amp.GradScaler("cpu")

    def closure():
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        scaler.scale(loss).backward()
        return loss

    with pytest.raises(RuntimeError, match="Closure"):
        scaler.step(opt, closure=closure)
    closure()
    with pytest.raises(RuntimeError, match="first_step"):
        scaler.step(opt, closure)  # positional: SAM itself refuses, pointing at the recipe
    with pytest.raises(RuntimeError, match="first_step"):
        scaler.step(opt)  # no first_step: nothing to complete


def _fp16_autocast_works() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            return torch.nn.Linear(2, 2)(torch.randn(1, 2)).dtype == torch.float16
    except Exception:  # pragma: no cover - depends on the torch build
        return False


@pytest.mark.skipif(not _fp16_autocast_works(), reason="this torch build has no fp16 autocast on the CPU")
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_autocast_with_scaler_trains(backend):
    x, y = _data(n=64)
    model = _model()
    opt = _opt(model, backend, rho=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)  # overflows fp16 at first: skips happen
    losses = []
    for _ in range(30):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.mse_loss(model(x).float(), y)
        scaler.scale(loss).backward()
        opt.first_step(zero_grad=True)
        with torch.autocast("cpu", dtype=torch.float16):
            loss2 = F.mse_loss(model(x).float(), y)
        scaler.scale(loss2).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        losses.append(loss.item())
        assert opt._pending is None
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_autocast_needs_nothing_special(backend):
    """step(closure) under bf16 autocast equals SAM written out per tensor under the same autocast."""
    x, y = _data()
    m1, m2 = _model(), _model()
    opt = sharpness.SAM(m1.parameters(), torch.optim.SGD, rho=0.1, backend=backend, lr=0.1)

    def closure():
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.mse_loss(m1(x).float(), y)
        loss.backward()
        return loss

    params = list(m2.parameters())
    for _ in range(3):
        opt.step(closure)
        # Reference from the paper's formula.
        with torch.autocast("cpu", dtype=torch.bfloat16):
            grads = torch.autograd.grad(F.mse_loss(m2(x).float(), y), params)
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
        with torch.no_grad():
            saved = [p.clone() for p in params]
            for p, g in zip(params, grads):
                p.add_(g * float(0.1 / (norm + 1e-12)))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            grads2 = torch.autograd.grad(F.mse_loss(m2(x).float(), y), params)
        with torch.no_grad():
            for p, s, g in zip(params, saved, grads2):
                p.copy_(s - 0.1 * g)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_with_closure_after_first_step_is_the_second_pass(backend):
    """What Lightning's manual optimization does: first_step(), then step(closure) runs the
    closure once, at w + e, and completes the step (as second_step would)."""
    x, y = _data()
    m1, m2 = _model(), _model()
    o1, o2 = _opt(m1, backend), _opt(m2, backend)
    _plain_sam_step(m1, o1, x, y)
    F.mse_loss(m2(x), y).backward()
    o2.first_step(zero_grad=True)
    calls = []

    def second_pass():
        calls.append(1)
        loss = F.mse_loss(m2(x), y)
        loss.backward()
        return loss

    loss = o2.step(second_pass)
    assert calls == [1] and o2._pending is None and torch.isfinite(loss)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    before = _weights(m2)
    F.mse_loss(m2(x), y).backward()
    o2.first_step(zero_grad=True)
    with pytest.raises(ValueError):
        o2.step(lambda: (_ for _ in ()).throw(ValueError("boom")))
    assert o2._pending is None
    for a, b in zip(before, m2.parameters()):
        assert torch.equal(a, b)  # restored behind the exception


# -- the variants under a GradScaler: `first_step(grad_scaler=scaler)` ---------------------------

STEPS = 8
SCALE = 2.0**10  # a power of two: scaling and unscaling are exact, so the runs can agree bit for bit
BASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
    "adam": (torch.optim.Adam, dict(lr=1e-2)),
}
# The methods: every entry of the registry (tests/registry.py) with the two-call API; those with an
# update of their own take no base optimizer.
TWO_CALL = registry.labels(lambda e: e.two_call)
STANDALONE = registry.labels(lambda e: e.own_update)
ONE_PASS = tuple(registry.labels(lambda e: e.one_pass))
assert registry.get("aesam").hparams["total_steps"] == STEPS  # its schedule spans this file's runs


def _build(name, model, backend, base="sgd"):
    entry = registry.get(name)
    if entry.own_update:
        return entry.torch(model.parameters(), backend=backend)
    cls, kw = BASES[base or "sgd"]
    return entry.torch(model.parameters(), cls, backend, base_kwargs=kw)


def _batches(n=STEPS, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)) for _ in range(n)]


def _begin(opt):
    """What a step of these methods starts with, before the first forward pass."""
    registry.begin(opt)


def _loss(model, x, y, inf=False):
    return F.mse_loss(model(x), y) * (float("inf") if inf else 1.0)


def _unscaled_step(model, opt, x, y):
    _begin(opt)
    _loss(model, x, y).backward()
    if opt.first_step(zero_grad=True):
        _loss(model, x, y).backward()
        opt.second_step()
    opt.zero_grad()


def _amp_step(model, opt, scaler, x, y, inf_first=False, inf_second=False, clip=None, keyword=True):
    """The documented GradScaler loop (docs/guide.md, SAM.first_step)."""
    _begin(opt)
    scaler.scale(_loss(model, x, y, inf_first)).backward()
    due = opt.first_step(zero_grad=True, grad_scaler=scaler) if keyword else opt.first_step(zero_grad=True)
    if due:
        scaler.scale(_loss(model, x, y, inf_second)).backward()
    if clip is not None:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    return due


def _constant_scaler(scale=SCALE, **kw):
    return torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=10**6, **kw)


def _assert_same_run(m1, o1, m2, o2):
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    s1, s2 = o1.state_dict(), o2.state_dict()
    assert s1["state"].keys() == s2["state"].keys()
    for k, entry in s1["state"].items():
        for key, value in entry.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(s2["state"][k][key])), key
    assert repr(s1["sam"]["state"]) == repr(s2["sam"]["state"])  # floats exactly, NaN included


CASES = registry.cases(lambda e: e.two_call, BASES)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,base", CASES, ids=[f"{n}-{b}" if b else n for n, b in CASES])
def test_variant_under_a_constant_scale_equals_the_unscaled_run_bit_for_bit(name, base, backend):
    """first_step(grad_scaler=) unscales the first gradient exactly as GradScaler.unscale_ does; at
    a power-of-two scale every gradient is the unscaled one times the scale exactly, so the run
    under the scaler is the run without it, bit for bit: weights, base state, the method's
    scalars. One-pass steps (LookSAM, every-k, AE-SAM) are left to scaler.step(opt)."""
    data = _batches()
    m1, m2 = _model(), _model()
    o1, o2 = _build(name, m1, backend, base), _build(name, m2, backend, base)
    scaler = _constant_scaler()
    dues = []
    for x, y in data:
        _unscaled_step(m1, o1, x, y)
        dues.append(_amp_step(m2, o2, scaler, x, y))
    _assert_same_run(m1, o1, m2, o2)
    assert o2.stats["amp_skipped_steps"] == 0 and o2.stats["nonfinite_skips"] == 0
    assert o2.sam_state["step"] == STEPS and o2._pending is None
    assert scaler.get_scale() == SCALE
    if not registry.get(name).second_pass:
        assert not any(dues)  # Momentum-SAM: one gradient per step, every step left to scaler.step(opt)
    elif name in ONE_PASS:
        # the test covers both kinds of step: some one-pass (deferred) steps and some SAM steps
        assert any(dues) and not all(dues)
    else:
        assert all(dues)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lets_learns_rho_after_the_scaled_step(backend):
    """LETS under a GradScaler: the SAM step through the loop, then update_rho with its own
    (unscaled) closures; the same ρ and weights as without the scaler, bit for bit."""
    data = _batches()
    xv, yv = _data(seed=7)
    runs = []
    for scaler in (None, _constant_scaler()):
        model = _model()
        opt = _build("lets", model, backend)
        for x, y in data:
            if scaler is None:
                _unscaled_step(model, opt, x, y)
            else:
                _amp_step(model, opt, scaler, x, y)

            def closure(xs=x, ys=y):
                opt.zero_grad()
                loss = _loss(model, xs, ys)
                loss.backward()
                return loss

            assert opt.update_rho(closure, lambda: closure(xv, yv)) is not None
            opt.zero_grad()
        runs.append((model, opt))
    (m1, o1), (m2, o2) = runs
    assert o1.param_groups[0]["sam_rho"] == o2.param_groups[0]["sam_rho"] != 0.1
    _assert_same_run(m1, o1, m2, o2)


@pytest.mark.parametrize("name", registry.labels(lambda e: e.one_pass_by_count))
@pytest.mark.parametrize("backend", BACKENDS)
def test_inf_in_a_one_pass_step_skips_it(name, backend):
    """An inf in the gradient of a one-pass step: scaler.step(opt) finds it and the step is not
    taken (weights, base state and the step count untouched), update() halves the scale, and
    the run goes on as one that never saw that batch."""
    data = _batches()
    m1, m2 = _model(), _model()
    o1, o2 = _build(name, m1, backend), _build(name, m2, backend)
    scaler = _constant_scaler()
    bad = 1  # step 1 is a one-pass step (k = 2, 3)
    for i, (x, y) in enumerate(data):
        if i == bad:
            before, state, step = _weights(m2), copy.deepcopy(o2.state_dict()), o2.sam_state["step"]
            assert not _amp_step(m2, o2, scaler, x, y, inf_first=True)
            assert o2.stats["amp_skipped_steps"] == 1 and o2.sam_state["step"] == step and o2._pending is None
            assert scaler.get_scale() == SCALE / 2
            for a, b in zip(before, m2.parameters()):
                assert torch.equal(a, b)
            after = o2.state_dict()
            for k, entry in state["state"].items():
                for key, value in entry.items():
                    assert torch.equal(torch.as_tensor(value), torch.as_tensor(after["state"][k][key])), key
            assert all(p.grad is None or not p.grad.any() for p in m2.parameters())  # zero_grad=True, honoured
            continue  # the reference never sees this batch
        _unscaled_step(m1, o1, x, y)
        _amp_step(m2, o2, scaler, x, y)
    _assert_same_run(m1, o1, m2, o2)
    assert o2.stats["amp_skipped_steps"] == 1


# The step whose second gradient overflows, by label (step 1 where not named): a step with a second
# pass; after a first step where the method keeps something from one step to the next.
SECOND_INF_STEP = {"sam": 0, "gsam": 0, "wsam": 0, "monge": 0, "looksam": 2, "looksam-relative": 2, "everyk": 2, "aesam": 0}
SECOND_INF = [
    (name, SECOND_INF_STEP.get(name, 1))
    for name in registry.labels(lambda e: e.two_call and e.restores_exactly and e.second_pass)
]  # Momentum-SAM's one gradient: tests/test_momentum_sam.py


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,bad", SECOND_INF, ids=[n for n, _ in SECOND_INF])
def test_inf_in_the_second_gradient_skips_the_step(name, bad, backend):
    """An inf in g̃: the weights are restored and no update is taken (base state, step count
    untouched), update() halves the scale, and the run goes on as a run without a scaler that
    abandoned that step after its first half (first_step, then restore()): what the method kept
    from the finite first gradient (F-SAM's average, SAMPa's ∇f(y), AE-SAM's statistics, the
    accumulators of LightSAM and bSAM, the noise drawn) stays, as restore() leaves it."""
    data = _batches()
    base = "adam" if name not in STANDALONE else None
    m1, m2 = _model(), _model()
    o1, o2 = _build(name, m1, backend, base), _build(name, m2, backend, base)
    scaler = _constant_scaler()
    for i, (x, y) in enumerate(data):
        if i == bad:
            _begin(o1)
            _loss(m1, x, y).backward()
            assert o1.first_step(zero_grad=True)
            assert o1.restore()
            o1.zero_grad()
            before, state, step = _weights(m2), copy.deepcopy(o2.state_dict()), o2.sam_state["step"]
            assert _amp_step(m2, o2, scaler, x, y, inf_second=True)
            assert o2.stats["amp_skipped_steps"] == 1 and o2.sam_state["step"] == step and o2._pending is None
            assert scaler.get_scale() == SCALE / 2
            for a, b in zip(before, m2.parameters()):
                assert torch.equal(a, b)
            after = o2.state_dict()
            for k, entry in state["state"].items():
                for key, value in entry.items():
                    if key.startswith(("lightsam_", "bsam_s", "sampa_", "looksam_gv")):
                        # first-pass state, kept (checked by the continuation below); LookSAM's g_v
                        # buffer holds g from the first pass, rewritten by the retried SAM step
                        # (the step count did not move) before any one-pass step reads it
                        continue
                    assert torch.equal(torch.as_tensor(value), torch.as_tensor(after["state"][k][key])), key
            continue
        _unscaled_step(m1, o1, x, y)
        _amp_step(m2, o2, scaler, x, y)
    _assert_same_run(m1, o1, m2, o2)
    assert o2.stats["amp_skipped_steps"] == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_sampa_inf_in_the_gradient_at_y_is_not_kept(backend):
    """SAMPa keeps ∇f(y) for the next step: an overflowing one is not kept. first_step puts the
    weights back at x_t and returns False; scaler.step(opt) finds the inf and takes no step;
    update() halves the scale, and the run goes on as one that never saw that batch."""
    data = _batches()
    m1, m2 = _model(), _model()
    o1, o2 = _build("sampa", m1, backend), _build("sampa", m2, backend)
    scaler = _constant_scaler()
    for i, (x, y) in enumerate(data):
        if i == 2:
            before = _weights(m2)
            assert not _amp_step(m2, o2, scaler, x, y, inf_first=True)
            assert o2.stats["amp_skipped_steps"] == 1 and o2._pending is None
            assert scaler.get_scale() == SCALE / 2
            for a, b in zip(before, m2.parameters()):
                assert torch.equal(a, b)
            continue
        _unscaled_step(m1, o1, x, y)
        _amp_step(m2, o2, scaler, x, y)
    _assert_same_run(m1, o1, m2, o2)


NEED_KEYWORD = registry.labels(lambda e: e.two_call and e.needs_scaler_keyword)


@pytest.mark.parametrize("name", NEED_KEYWORD)
def test_without_the_keyword_the_variants_refuse_the_scaler_and_restore(name):
    """A rule that needs the true first gradient, run under a GradScaler whose first_step was
    not given the scaler: scaler.step() raises, pointing at grad_scaler=, with the weights back at
    w bit for bit; the optimizer stays usable."""
    model = _model()
    opt = _build(name, model, "auto")
    scaler = _constant_scaler()
    x, y = _data()
    w0 = _weights(model)
    _begin(opt)
    scaler.scale(_loss(model, x, y)).backward()
    assert opt.first_step(zero_grad=True)  # step 0 is a SAM step for every one of them
    if name != "sampa":  # (SAMPa's first x̃ is x: ∇f(y_0) = 0)
        assert any(not torch.equal(p, w) for p, w in zip(model.parameters(), w0))  # perturbed
    scaler.scale(_loss(model, x, y)).backward()
    with pytest.raises(RuntimeError, match=r"grad_scaler=scaler"):
        scaler.step(opt)
    for p, w in zip(model.parameters(), w0):
        assert torch.equal(p, w)
    assert opt._pending is None and not hasattr(opt, "found_inf")
    opt.zero_grad()
    _unscaled_step(model, opt, x, y)  # still usable


def test_a_one_pass_step_taken_without_the_keyword_is_reported():
    """EveryKSAM's one-pass step, given no scaler, is taken inside first_step (on the scaled
    gradient: it cannot be undone); the scaler.step(opt) that follows says what to do."""
    model = _model()
    opt = _build("everyk", model, "auto")
    scaler = _constant_scaler()
    x, y = _data()
    _amp_step(model, opt, scaler, x, y)  # step 0: a SAM step, with the keyword
    scaler.scale(_loss(model, x, y)).backward()
    assert not opt.first_step(zero_grad=True)
    with pytest.raises(RuntimeError, match=r"one-pass step.*grad_scaler=scaler"):
        scaler.step(opt)


@pytest.mark.parametrize(
    "name", registry.labels(lambda e: e.two_call and e.grad_scaler and not e.needs_scaler_keyword and e.second_pass)
)  # Momentum-SAM's loop without the keyword (begin_step, backward, scaler.step): tests/test_momentum_sam.py
def test_scale_invariant_methods_need_no_keyword(name):
    """SAM, ASAM and AdaSAM (SAM's perturbation, its own update on g̃) do not depend on the scale
    of the first gradient: without grad_scaler= they follow the unscaled run (to float rounding:
    ρg/(‖g‖+ε) is not exactly scale invariant)."""
    data = _batches()
    m1, m2 = _model(), _model()
    o1, o2 = _build(name, m1, "auto"), _build(name, m2, "auto")
    scaler = _constant_scaler()
    for x, y in data:
        _unscaled_step(m1, o1, x, y)
        assert _amp_step(m2, o2, scaler, x, y, keyword=False)
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_clipping_a_one_pass_step(backend):
    """A one-pass step's direction is left in p.grad at the scaler's scale, like any scaled
    gradient: `scaler.unscale_(opt); clip_grad_norm_(...)` clips it (and g̃ on SAM steps). The
    reference: the same loop with a disabled scaler (it defers the one-pass step the same way)."""
    data = _batches()
    m1, m2 = _model(), _model()
    o1, o2 = _build("looksam", m1, backend), _build("looksam", m2, backend)
    off = torch.amp.GradScaler("cpu", enabled=False)
    scaler = _constant_scaler()
    for x, y in data:
        _amp_step(m1, o1, off, x, y, clip=0.05)
        _amp_step(m2, o2, scaler, x, y, clip=0.05)
    _assert_same_run(m1, o1, m2, o2)


@pytest.mark.parametrize("name", TWO_CALL)
def test_a_disabled_scaler_is_no_scaler(name):
    """GradScaler(enabled=False) scales nothing and scaler.step(opt) just calls opt.step(): the
    loop with it is the run without a scaler, bit for bit (one-pass steps wait for opt.step())."""
    data = _batches()
    m1, m2 = _model(), _model()
    o1, o2 = _build(name, m1, "auto"), _build(name, m2, "auto")
    off = torch.amp.GradScaler("cpu", enabled=False)
    for x, y in data:
        _unscaled_step(m1, o1, x, y)
        _amp_step(m2, o2, off, x, y)
    _assert_same_run(m1, o1, m2, o2)


def test_the_distributed_helper_passes_the_scaler_to_first_step():
    """sharpness.distributed.sam_step(..., scaler=) runs the loop above (a plain module: the
    synchronised mode), one-pass steps included."""
    import sharpness.distributed

    data = _batches()
    m1, m2 = _model(), _model()
    o1, o2 = _build("looksam", m1, "auto"), _build("looksam", m2, "auto")
    s1, s2 = _constant_scaler(), _constant_scaler()
    for x, y in data:
        _amp_step(m1, o1, s1, x, y)

        def closure(m=m2, o=o2, s=s2, x=x, y=y):
            o.zero_grad()
            loss = _loss(m, x, y)
            s.scale(loss).backward()
            return loss

        sharpness.distributed.sam_step(m2, o2, closure, scaler=s2)
    _assert_same_run(m1, o1, m2, o2)


@pytest.mark.parametrize("name", registry.labels(lambda e: not e.grad_scaler))
def test_closure_only_methods_refuse_the_scaler(name):
    """GAM, CR-SAM and m-sharpness take their gradients through step(closure), which a
    GradScaler cannot run: scaler.step() raises, with or without a closure, and the weights stay."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = registry.get(name).torch(model.parameters(), torch.optim.SGD, base_kwargs=dict(lr=0.1))
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    w0 = [p.detach().clone() for p in model.parameters()]

    def closure(*_):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        scaler.scale(loss).backward()
        return loss

    for call in (lambda: scaler.step(opt), lambda: scaler.step(opt, closure)):
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        closure()
        with pytest.raises(RuntimeError, match="does not support torch.amp.GradScaler.*step\\(closure\\)"):
            call()
        for p, w in zip(model.parameters(), w0):
            assert torch.equal(p, w)
