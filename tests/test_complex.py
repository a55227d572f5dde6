"""Complex parameters are their real pairs, in every method of the torch front.

torch.optim treats a complex parameter as ``torch.view_as_real(p)`` (a trailing dimension of 2).
The SAM family does the same: ``‖g‖² = Σ|g|²``, inner products are real (``Re⟨x, y⟩``), and
elementwise rules (ASAM's ``|w|+η``, moments, masks, noise, per-filter norms) act on real and
imaginary parts as separate coordinates. So a model with complex parameters must follow, step for
step, the trajectory of the same model written with real pairs: each parameter a float tensor of
shape ``(*shape, 2)`` turned into the complex one by ``torch.view_as_complex`` inside the forward
pass, the loss computed by the same operations. The gradients of the two models are then the same
numbers, and so must be every step after.

The complex model runs on the foreach engine (the flat engines take real dtypes only); the
real-pair reference on the same engine (``backend="torch"``): the runs are equal bit for bit with
Adam (which steps ``view_as_real`` views) and the standalone methods, and to float rounding with
SGD (torch's SGD steps complex tensors in complex arithmetic, which rounds ``p + α·g`` otherwise
than the fused multiply-add of its real kernels; so does Adam's weight decay). A model mixing real and complex parameters (the
real ones on the Rust engine) is checked against its real-pair twin on the Rust engine, to float
rounding. References here use torch only.
"""

from __future__ import annotations

import io
import math

import pytest
import registry
import torch
from torch import nn

import sharpness

STEPS = 4
NAMES = ("w1", "b1", "w2", "b2")
SHAPES = {"w1": (6, 10), "b1": (10,), "w2": (10, 4), "b2": (4,)}


class Net(nn.Module):
    """``x ↦ Re(z) + ½ Im(z)`` (then ``@ w3`` when ``mixed``), ``z = φ(x W₁ + b₁) W₂ + b₂``,
    ``φ(h) = tanh(Re h) + i·sigmoid(Im h)``, with complex ``W₁, b₁, W₂, b₂`` held as complex
    parameters or (``pairs``) as their real pairs; ``w3`` is real in both."""

    def __init__(self, pairs: bool, mixed: bool = False) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.pairs, self.mixed = pairs, mixed
        for name in NAMES:
            z = torch.randn(*SHAPES[name], 2, generator=gen) * 0.5
            setattr(self, name, nn.Parameter(z if pairs else torch.view_as_complex(z.clone())))
        if mixed:
            self.w3 = nn.Parameter(torch.randn(4, 4, generator=gen) * 0.5)

    def complex_weights(self):
        return [torch.view_as_complex(getattr(self, n)) if self.pairs else getattr(self, n) for n in NAMES]

    def forward(self, x):
        w1, b1, w2, b2 = self.complex_weights()
        h = x.to(torch.complex64) @ w1 + b1
        h = torch.complex(torch.tanh(h.real), torch.sigmoid(h.imag))
        z = h @ w2 + b2
        logits = z.real + 0.5 * z.imag
        return logits @ self.w3 if self.mixed else logits


def batches(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 6, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(n)]


def loss_of(model, x, y, reduction="mean"):
    return nn.functional.cross_entropy(model(x), y, reduction=reduction)


def as_pairs(model):
    """Every parameter as real numbers: complex ones through ``view_as_real``."""
    return [torch.view_as_real(p.detach()) if p.is_complex() else p.detach() for p in model.parameters()]


BASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
    # No weight decay here: torch's single-tensor Adam adds it before taking the real view, in
    # complex arithmetic (its own rounding); SGD's case covers weight decay to float rounding.
    "adam": (torch.optim.Adam, dict(lr=1e-2)),
}

# The methods are the registry's entries (tests/registry.py: CASES below), each driven as it says.
#: Methods whose randomness is drawn per engine: a model split over two engines draws other numbers.
DRAWS_PER_ENGINE = set(registry.labels(lambda e: e.draws_per_engine))


def _step(opt, model, x, y, how, i, val):
    def closure():
        opt.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        return loss

    if how == "micro":  # closure(i): the i-th half of the batch
        def micro(j):
            opt.zero_grad()
            half = slice(8 * j, 8 * (j + 1))
            loss = loss_of(model, x[half], y[half])
            loss.backward()
            return loss

        return opt.step(micro)
    if how == "per_sample":
        def per_sample(indices=None):
            xs, ys = (x, y) if indices is None else (x[indices], y[indices])
            return loss_of(model, xs, ys, reduction="none")

        return opt.step(per_sample)
    if how == "validation":
        x_val, y_val = val

        def val_closure():
            opt.zero_grad()
            loss = loss_of(model, x_val, y_val)
            loss.backward()
            return loss

        return opt.step(closure, val_closure)
    if how == "fisher" and i % 2 == 0:  # the mask from per-sample Fisher scores, every other step
        opt.fisher_from([lambda k=k: loss_of(model, x[k : k + 1], y[k : k + 1]).backward() for k in range(4)])
    if how == "dynamic" and i % 2 == 1:  # drop and grow by |g|, every other step
        closure()
        opt.update_mask(progress=i / STEPS)
    return opt.step(closure)


def trajectory(build, pairs, backend, how="closure", mixed=False):
    model = Net(pairs, mixed)
    opt = build(model.parameters(), backend)
    val = batches(1, seed=9)[0]
    losses = []
    for i, (x, y) in enumerate(batches(STEPS, seed=3)):
        losses.append(float(torch.as_tensor(_step(opt, model, x, y, how, i, val)).detach().double().mean()))
    return model, opt, losses


def _builder(name, base):
    entry = registry.get(name)
    if entry.own_update:
        return (lambda params, backend: entry.torch(params, backend=backend)), entry.drive
    cls, kw = BASES[base]
    return (lambda params, backend: entry.torch(params, cls, backend, base_kwargs=kw)), entry.drive


CASES = registry.cases(None, BASES, own="own")


@pytest.mark.parametrize("name,base", CASES, ids=[f"{m}-{b}" for m, b in CASES])
def test_complex_parameters_follow_their_real_pairs(name, base):
    """The complex model's trajectory is its real-pair twin's on the same engine: bit for bit,
    except for torch's SGD's own complex rounding (see the module docstring)."""
    build, how = _builder(name, base)
    ref, ref_opt, ref_losses = trajectory(build, pairs=True, backend="torch", how=how)
    got, opt, losses = trajectory(build, pairs=False, backend="auto", how=how)
    assert [e.name for e in opt.engines()] == ["torch"]  # complex: the foreach engine
    if base == "sgd":
        assert losses == pytest.approx(ref_losses, rel=1e-5)
        for p, q in zip(as_pairs(got), as_pairs(ref)):
            torch.testing.assert_close(p, q, rtol=2e-5, atol=2e-6)
    else:
        assert losses == ref_losses
        for p, q in zip(as_pairs(got), as_pairs(ref)):
            assert torch.equal(p, q)
    assert opt.stats["nonfinite_skips"] == ref_opt.stats["nonfinite_skips"] == 0
    entry = registry.get(name)
    if entry.drive in ("fisher", "dynamic"):  # the sparse methods: their masks
        masks, ref_masks = opt.mask(), ref_opt.mask()
        assert [m.shape for m in masks] == [m.shape for m in ref_masks]
        assert opt.density() == ref_opt.density() == 1 - entry.hparams["sparsity"] == 0.5
        if base != "sgd":
            assert all(torch.equal(a, b) for a, b in zip(masks, ref_masks))
    if entry.name == "BayesianSAM":
        for a, b in zip(opt.posterior_std(), ref_opt.posterior_std()):
            assert all(torch.equal(s, t) for s, t in zip(a, b))
    if entry.drive == "validation":  # LETS: ρ learned on the validation batch
        rhos, ref_rhos = [g["sam_rho"] for g in opt.param_groups], [g["sam_rho"] for g in ref_opt.param_groups]
        assert rhos == (pytest.approx(ref_rhos, rel=1e-4) if base == "sgd" else ref_rhos)
        assert rhos != [entry.hparams["rho"]]  # ρ was learned


MIXED = [(m, b) for (m, b) in CASES if m not in DRAWS_PER_ENGINE and b != "adam"]


@pytest.mark.parametrize("name,base", MIXED, ids=[f"{m}-{b}" for m, b in MIXED])
def test_real_and_complex_parameters_together(name, base):
    """Real parameters on the Rust engine, complex ones on the foreach engine: the real-pair twin
    (all on the Rust engine) to float rounding."""
    build, how = _builder(name, base)
    ref, _, _ = trajectory(build, pairs=True, backend="auto", how=how, mixed=True)
    got, opt, _ = trajectory(build, pairs=False, backend="auto", how=how, mixed=True)
    assert sorted(e.name for e in opt.engines()) == ["rust", "torch"]
    for p, q in zip(as_pairs(got), as_pairs(ref)):
        torch.testing.assert_close(p, q, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_sam_perturbation_of_a_complex_parameter(adaptive):
    """From the formulas, in complex128: ‖g‖² = Σ|g|² (ASAM: Σ (|Re w|+η)²Re g² + (|Im w|+η)²Im g²),
    e = ρ g/‖g‖ (ASAM: ρ T²g/‖Tg‖ with T acting on real and imaginary parts)."""
    rho, eta = 0.2, 0.01
    gen = torch.Generator().manual_seed(5)
    w0 = torch.randn(7, 3, dtype=torch.complex128, generator=gen)
    g = torch.randn(7, 3, dtype=torch.complex128, generator=gen)
    w = nn.Parameter(w0.clone())
    opt = sharpness.SAM([w], torch.optim.SGD, rho=rho, adaptive=adaptive, eta=eta, lr=0.1)
    w.grad = g.clone()
    opt.first_step()
    if adaptive:
        t = torch.complex(w0.real.abs() + eta, w0.imag.abs() + eta)  # T per real coordinate
        tg = torch.complex(t.real * g.real, t.imag * g.imag)
        norm = math.sqrt(float((tg.abs() ** 2).sum()))
        e = rho * torch.complex(t.real**2 * g.real, t.imag**2 * g.imag) / (norm + 1e-12)
    else:
        norm = math.sqrt(float((g.abs() ** 2).sum()))
        e = rho * g / (norm + 1e-12)
    assert math.isclose(opt.last_grad_norm, norm, rel_tol=1e-12)
    torch.testing.assert_close(w.detach(), w0 + e, rtol=1e-12, atol=1e-14)
    opt.second_step()
    torch.testing.assert_close(w.detach(), w0 - 0.1 * g, rtol=1e-12, atol=1e-14)  # restored, then SGD


@pytest.mark.parametrize("name", registry.labels())
def test_complex_state_survives_a_checkpoint(name):
    """A complex run resumed from ``state_dict`` (through ``torch.save``) midway ends where the
    uninterrupted one does, bit for bit; the saved state keeps the parameters' complex dtype."""
    build, how = _builder(name, "adam")
    val = batches(1, seed=9)[0]
    data = batches(STEPS, seed=3)
    model = Net(pairs=False)
    opt = build(model.parameters(), "auto")
    for i, (x, y) in enumerate(data[:2]):
        _step(opt, model, x, y, how, i, val)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    for i, (x, y) in enumerate(data[2:], start=2):
        _step(opt, model, x, y, how, i, val)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    for entry in ckpt["opt"]["state"].values():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and key != "step":
                assert value.is_complex(), key
    resumed = Net(pairs=False)
    resumed.load_state_dict(ckpt["model"])
    opt2 = build(resumed.parameters(), "auto")
    opt2.load_state_dict(ckpt["opt"])
    for i, (x, y) in enumerate(data[2:], start=2):
        _step(opt2, resumed, x, y, how, i, val)
    for p, q in zip(as_pairs(model), as_pairs(resumed)):
        assert torch.equal(p, q)


@pytest.mark.filterwarnings("error")  # no complex-to-real cast (torch warns where it drops Im)
def test_lets_checkpoint_between_its_step_and_the_rho_update():
    """LETS's pending ``a⊙g⊙g̃²`` of a complex parameter (real pairs) travels in ``state_dict``
    between ``second_step`` and ``update_rho``: the resumed ρ update is the uninterrupted one."""
    (x, y), (x_val, y_val) = batches(1, seed=3)[0], batches(1, seed=9)[0]
    rhos = []
    for resume in (False, True):
        model = Net(pairs=False)
        opt = sharpness.LETS(model.parameters(), torch.optim.SGD, rho=0.1, rho_lr=0.5, lr=0.05)

        def closures(opt):
            def closure():
                opt.zero_grad()
                loss = loss_of(model, x, y)
                loss.backward()
                return loss

            def val_closure():
                opt.zero_grad()
                loss = loss_of(model, x_val, y_val)
                loss.backward()
                return loss

            return closure, val_closure

        closure, _ = closures(opt)
        closure()
        opt.first_step(zero_grad=True)
        closure()
        opt.second_step(zero_grad=True)
        if resume:
            buf = io.BytesIO()
            torch.save(opt.state_dict(), buf)
            buf.seek(0)
            opt = sharpness.LETS(model.parameters(), torch.optim.SGD, rho=0.1, rho_lr=0.5, lr=0.05)
            opt.load_state_dict(torch.load(buf, weights_only=False))
        assert opt.update_rho(*closures(opt)) is not None
        rhos.append(opt.param_groups[0]["sam_rho"])
    assert rhos[0] == rhos[1] != 0.1


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_perturbation_report_counts_both_parts_of_a_complex_weight(backend):
    """``perturbation_report`` measures ``e`` over real pairs: ‖e‖ = ρ with the imaginary parts
    in, as the perturbation itself (``.double()`` of a complex tensor would drop them)."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(5, dtype=torch.complex128))
    v = nn.Parameter(torch.randn(3, dtype=torch.float64))
    opt = sharpness.SAM([w, v], torch.optim.SGD, rho=0.25, lr=0.1, backend=backend)
    (w.abs().square().sum() + (w.real * v.sum()).sum() + v.square().sum()).backward()
    opt.first_step()
    report = opt.perturbation_report()
    assert report["intended_norm"] == pytest.approx(0.25, rel=1e-12)
    assert report["realized_norm"] == pytest.approx(0.25, rel=1e-9)
    assert report["relative_error"] < 1e-9
    opt.second_step()


@pytest.mark.filterwarnings("ignore:Complex modules are a new feature")
def test_mesa_averages_complex_weights():
    """MESA's moving average runs over complex parameters too (``θ_ema ← βθ_ema + (1−β)θ``),
    rather than copying them as it copies integer buffers."""
    model = nn.Linear(2, 2).to(torch.complex64)
    mesa = sharpness.MESA(model, decay=0.75, start_epoch=-1)
    before = mesa.ema.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1 + 2j)
    mesa.update()
    expected = 0.75 * before + 0.25 * model.weight.detach()
    torch.testing.assert_close(mesa.ema.weight, expected)
    assert not torch.equal(mesa.ema.weight, model.weight)
