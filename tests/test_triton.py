"""The Triton backend (issue #5): kernels and whole SAM steps, on CPU under Triton's interpreter.

``TRITON_INTERPRET=1`` is read when a kernel is defined, so it is set here before the kernels are
imported (and the kernel module is reloaded if another test imported it compiled). Everything
is checked against the Rust backend (``sharpness._core``: bit for bit, the kernels share its
numerics) and against a per-tensor torch SAM written here from the paper's formula. The
interpreter is slow: sizes stay small.

The same checks on CUDA tensors, CUDA-graph capture of a whole SAM step and the zero-sync check
run in a subprocess without the interpreter (``tests/triton_gpu_checks.py``), skipped here when
no CUDA device is present; compiling every kernel for sm_90 and reading its PTX needs no GPU and
always runs.
"""

from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["TRITON_INTERPRET"] = "1"

torch = pytest.importorskip("torch")
triton = pytest.importorskip("triton")

import sharpness  # noqa: E402
from sharpness import _core  # noqa: E402
from sharpness.backends import triton_kernels as K  # noqa: E402
from sharpness.buffers import as_numpy  # noqa: E402

if not isinstance(K._copy_flat, triton.runtime.interpreter.InterpretedFunction):
    K = importlib.reload(K)  # imported compiled by an earlier module: redefine under the interpreter

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ids = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


def rand(n: int, dtype, seed: int, positive: bool = False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    x[::11] = 0.0
    x[5::13] *= 1e-4
    if positive:
        x = x.abs()
    return x.to(dtype)


def A(t):
    return None if t is None else as_numpy(t)


def split(t, cuts=(0, 1, 8, 1031, 1032)):
    """A flat tensor as a list of views of odd lengths (one empty), for the multi-tensor kernels."""
    bounds = sorted({min(c, t.numel()) for c in cuts} | {t.numel()})
    return [t[a:b] for a, b in zip(bounds, bounds[1:])] + [t[:0]]


def same(a, b) -> bool:
    """Bit for bit (any NaN equals any NaN)."""
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all()) and torch.equal(a.signbit(), b.signbit())


# == kernels against the Rust kernels ================================================================


@pytest.mark.parametrize("dtype", DTYPES, ids=ids.get)
@pytest.mark.parametrize("n", [0, 1, 2053])
def test_sum_of_squares(dtype, n):
    g, w = rand(n, dtype, 1), rand(n, dtype, 2)
    want = _core.sum_of_squares(A(g))
    want_ad = _core.sum_of_squares_adaptive(A(w), A(g), 0.01)
    for got, ref in [
        (K.sum_of_squares(g), want),
        (K.sum_of_squares(split(g)), want),
        (K.sum_of_squares(g, w, 0.01), want_ad),
        (K.sum_of_squares(split(g), split(w), 0.01), want_ad),
    ]:
        assert got.dtype == torch.float64 and got.dim() == 0 and got.device == g.device
        assert float(got) == pytest.approx(ref, rel=1e-13, abs=0.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=ids.get)
@pytest.mark.parametrize("eta", [None, 0.01])
def test_perturb_and_restore_are_exact(dtype, eta):
    n = 2053
    w0, g = rand(n, dtype, 3), rand(n, dtype, 4)
    norm, rho = 1.7, -0.05  # a negative rho: a maximizing base optimizer
    scale = rho / (norm + 1e-12)
    want_w, want_b = w0.clone(), torch.empty_like(w0)
    if eta is None:
        _core.perturb(A(want_w), A(g), A(want_b), scale)
    else:
        _core.perturb_adaptive(A(want_w), A(g), A(want_b), scale, eta)
    for form in ["flat", "multi"]:
        w, b = w0.clone(), torch.full_like(w0, float("nan"))
        norm_t = torch.tensor(norm, dtype=torch.float64)
        if form == "flat":
            K.perturb(w, g, b, norm_t, rho, 1e-12, eta)
        else:
            K.perturb(split(w), split(g), split(b), norm_t, rho, 1e-12, eta)
        assert same(w, want_w), form
        assert same(b, w0), form
        assert not same(w, w0)
        if form == "flat":
            K.copy(b, w)
        else:
            K.copy(split(b), split(w))
        assert same(w, w0), form


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf - inf
@pytest.mark.parametrize("dtype", DTYPES, ids=ids.get)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_norm_perturbs_nothing(dtype, bad):
    w0, g = rand(517, dtype, 5), rand(517, dtype, 6)
    g[3] = float("nan")
    for eta in [None, 0.01]:
        w, b = w0.clone(), torch.empty_like(w0)
        K.perturb(w, g, b, torch.tensor(bad, dtype=torch.float64), 0.05, 1e-12, eta)
        assert same(w, w0) and same(b, w0)


SGD_CONFIGS = [
    dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False),
    dict(momentum=0.9, dampening=0.1, weight_decay=1e-2, nesterov=False, maximize=False),
    dict(momentum=0.9, dampening=0.0, weight_decay=1e-2, nesterov=True, maximize=True),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=ids.get)
@pytest.mark.parametrize("cfg", range(len(SGD_CONFIGS)))
@pytest.mark.parametrize("form", ["flat", "multi"])
def test_restore_sgd_trajectory(dtype, cfg, form):
    kw = dict(lr=0.1, **SGD_CONFIGS[cfg])
    n = 1500
    w, mom = rand(n, dtype, 7), torch.zeros(n, dtype=dtype)
    w_ref, mom_ref = w.clone(), mom.clone()
    f = (lambda t: t) if form == "flat" else split
    for step in range(3):
        g, backup = rand(n, dtype, 10 + step), rand(n, dtype, 20 + step)
        src = None if step == 1 else backup  # a plain in-place step in between
        init = step == 0
        K.restore_sgd(f(w), None if src is None else f(src), f(g), f(mom), init_momentum=init, **kw)
        _core.restore_sgd(A(w_ref), A(src), A(g), A(mom_ref), init_momentum=init, **kw)
        assert same(w, w_ref) and same(mom, mom_ref), step


ADAM_CONFIGS = [
    dict(weight_decay=0.0, decoupled=False, amsgrad=False, maximize=False),
    dict(weight_decay=0.1, decoupled=False, amsgrad=True, maximize=False),
    dict(weight_decay=0.1, decoupled=True, amsgrad=False, maximize=True),
    dict(weight_decay=0.1, decoupled=True, amsgrad=True, maximize=False),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=ids.get)
@pytest.mark.parametrize("cfg", range(len(ADAM_CONFIGS)))
@pytest.mark.parametrize("form", ["flat", "multi"])
def test_restore_adam_trajectory(dtype, cfg, form):
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, **ADAM_CONFIGS[cfg])
    n = 1500
    w = rand(n, dtype, 8)
    state = [torch.zeros(n, dtype=dtype) for _ in range(3)]
    w_ref, state_ref = w.clone(), [s.clone() for s in state]
    f = (lambda t: t) if form == "flat" else split
    step_t = torch.zeros((), dtype=torch.float32)
    for step in range(1, 4):
        g, backup = rand(n, dtype, 30 + step), rand(n, dtype, 40 + step)
        src = None if step == 2 else backup
        step_t += 1
        powers = K.adam_powers(step_t, kw["beta1"], kw["beta2"])
        vmax = state[2] if kw["amsgrad"] else None
        K.restore_adam(f(w), None if src is None else f(src), f(g), f(state[0]), f(state[1]),
                       None if vmax is None else f(vmax), powers=powers, **kw)  # fmt: skip
        _core.restore_adam(A(w_ref), A(src), A(g), A(state_ref[0]), A(state_ref[1]),
                           A(state_ref[2]) if kw["amsgrad"] else None, step=float(step), **kw)  # fmt: skip
        assert same(w, w_ref), step
        assert all(same(a, b) for a, b in zip(state, state_ref)), step


def test_flat_launches_split_at_alignment():
    """A slice of a flat buffer is launched as head / 16-byte-aligned body of 16·k elements / tail,
    so that the body gets the aligned (vectorised) specialisation."""
    base = torch.zeros(4096)
    for lo in [0, 1, 3, 4, 5]:
        for n in [0, 1, 15, 16, 17, 1000]:
            t = base[lo : lo + n]
            pieces = K._pieces(t, n)
            assert sum(k for _, k in pieces) == n and [a for a, _ in pieces] == sorted(a for a, _ in pieces)
            for a, k in pieces:
                if k >= 16 and (t.data_ptr() + 4 * a) % 16 == 0:
                    assert k % 16 == 0
            assert any((t.data_ptr() + 4 * a) % 16 == 0 and k % 16 == 0 for a, k in pieces) or n < 16 + 3


def test_kernels_refuse_bad_arguments():
    w = torch.zeros(4)
    with pytest.raises(ValueError, match="share"):
        K.copy(torch.zeros(5), w)
    with pytest.raises(TypeError, match="Triton kernels take"):
        K.copy(torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="same number"):
        K.copy([w, w], [w])
    with pytest.raises(ValueError, match="momentum_buffers"):
        K.restore_sgd(w, None, w.clone(), None, lr=0.1, momentum=0.9)


# == whole SAM steps =====================================================================================

SHAPES = [(7,), (3, 5), (1,), (13, 3), (2, 2, 3), (1031,), (4,)]


def make_params(dtype, n_extra: int = 0):
    g = torch.Generator().manual_seed(0)
    shapes = SHAPES + [(1 + (i * 7) % 5,) for i in range(n_extra)]
    return [torch.nn.Parameter((torch.randn(s, generator=g) * 0.5).to(dtype)) for s in shapes]


def loss_fn(params, step: int):
    """A smooth loss whose gradient depends on the weights (so the second gradient differs)."""
    total = 0.0
    for i, p in enumerate(params):
        x = p.float()
        c = math.sin(1.3 * i + 0.7 * step) + 1.5
        total = total + (torch.sin(x * c) * (i + 1)).sum() + 0.05 * (x * x).sum()
    return total


def sam_trajectory(backend, dtype, base, base_kw, steps=3, n_extra=0, **sam_kw):
    params = make_params(dtype, n_extra)
    opt = sharpness.SAM(params, base, backend=backend, **sam_kw, **base_kw)
    for step in range(steps):
        def closure(step=step):
            opt.zero_grad()
            loss = loss_fn(params, step)
            loss.backward()
            return loss

        opt.step(closure)
    return [p.detach().clone() for p in params], opt


def reference_trajectory(dtype, base, base_kw, steps=3, rho=0.05, adaptive=False, eta=0.01):
    """Per-tensor SAM from the formula: one global norm in float64, e = ρg/(‖g‖+1e-12)
    (ASAM: ρT²g/(‖Tg‖+1e-12), T = |w|+η), the weights restored from a copy, then torch's own
    for-loop optimizer."""
    params = make_params(dtype)
    opt = base(params, foreach=False, **base_kw)
    for step in range(steps):
        for p in params:
            p.grad = None
        loss_fn(params, step).backward()
        with torch.no_grad():
            t = [p.double().abs() + eta for p in params] if adaptive else [1.0] * len(params)
            norm = math.sqrt(sum(float(((ti * p.grad.double()) ** 2).sum()) for ti, p in zip(t, params)))
            scale = rho / (norm + 1e-12)
            saved = [p.clone() for p in params]
            for p in params:
                e = p.grad.float() * scale
                if adaptive:
                    e = (p.float().abs() + eta) ** 2 * e
                p.copy_(p.float() + e)
        for p in params:
            p.grad = None
        loss_fn(params, step).backward()
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        opt.step()
    return [p.detach().clone() for p in params]


BASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
    "nesterov": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, maximize=True)),
    "adam": (torch.optim.Adam, dict(lr=1e-2, amsgrad=True)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=ids.get)
@pytest.mark.parametrize("base", list(BASES))
def test_sam_matches_rust_backend_bit_for_bit(dtype, base):
    cls, kw = BASES[base]
    got, opt = sam_trajectory("triton", dtype, cls, kw)
    want, _ = sam_trajectory("rust", dtype, cls, kw)
    assert [e.name for e in opt.engines()] == ["triton"]
    assert opt.stats["fused_steps"] == 3
    # Same arithmetic element by element; the norms are summed in another order (both in float64),
    # which could move the float32 scale by one bit on some inputs, but not on these.
    for a, b in zip(got, want):
        assert same(a, b)


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_sam_matches_per_tensor_reference(base, adaptive):
    cls, kw = BASES[base]
    rho = 0.5 if adaptive else 0.05
    got, _ = sam_trajectory("triton", torch.float32, cls, kw, rho=rho, adaptive=adaptive, eta=0.01)
    want = reference_trajectory(torch.float32, cls, kw, rho=rho, adaptive=adaptive, eta=0.01)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=ids.get)
def test_sam_half_types_against_reference(dtype):
    """torch's own optimizers round every intermediate to the half type; the kernels round each
    stored value once: close, not equal."""
    cls, kw = BASES["sgd"]
    got, _ = sam_trajectory("triton", dtype, cls, kw)
    want = reference_trajectory(dtype, cls, kw)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def test_many_tensors_and_groups():
    """Forty tensors in two groups (different ρ, one adaptive, one outside the perturbation)."""
    params = make_params(torch.float32, n_extra=33)
    trajectories = []
    for backend in ["triton", "rust"]:
        ps = [torch.nn.Parameter(p.detach().clone()) for p in params]
        groups = [
            {"params": ps[:20]},
            {"params": ps[20:35], "sam_adaptive": True, "sam_rho": 0.5, "weight_decay": 0.01},
            {"params": ps[35:], "sam_rho": 0.0},
        ]
        opt = sharpness.SAM(groups, torch.optim.SGD, backend=backend, lr=0.05, momentum=0.9)
        for step in range(2):
            def closure(step=step):
                opt.zero_grad()
                loss = loss_fn(ps, step)
                loss.backward()
                return loss

            opt.step(closure)
        trajectories.append(ps)
    for a, b in zip(*trajectories):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_norm_weights_per_group():
    """``sam_norm_weight`` c (μP²'s denominators): the norm is sqrt(Σ c²‖g‖²) over the perturbed
    groups, on the device, as on the Rust engine; weights of 1 leave the steps bit for bit alone."""
    params = make_params(torch.float32, n_extra=5)
    weights = [3.0, 0.25, 7.0]  # the last group has sam_rho = 0: outside the norm whatever its weight
    results = []
    for backend, ws in [("triton", weights), ("rust", weights), ("triton", [1.0] * 3), ("triton", None)]:
        ps = [torch.nn.Parameter(p.detach().clone()) for p in params]
        slices = [ps[:4], ps[4:9], ps[9:]]
        groups = [{"params": s} for s in slices]
        groups[1].update(sam_adaptive=True, sam_rho=0.5)
        groups[2].update(sam_rho=0.0)
        if ws is not None:
            for g, w in zip(groups, ws):
                g["sam_norm_weight"] = w
        opt = sharpness.SAM(groups, torch.optim.SGD, backend=backend, lr=0.05, momentum=0.9)
        opt.zero_grad()
        loss_fn(ps, 0).backward()
        grads = [p.grad.double() for p in ps]
        t = [torch.ones_like(g) for g in grads[:4]] + [p.detach().double().abs() + 0.01 for p in ps[4:9]]
        opt.first_step()
        if ws is weights:
            c = [3.0] * 4 + [0.25] * 5  # the perturbed groups' weights, per tensor
            want = math.sqrt(sum(ci**2 * float((ti * gi).pow(2).sum()) for ci, ti, gi in zip(c, t, grads)))
            assert float(opt.last_grad_norm) == pytest.approx(want, rel=1e-9)
        opt.zero_grad()
        loss_fn(ps, 1).backward()
        opt.second_step()
        results.append([p.detach().clone() for p in ps])
    for a, b in zip(results[0], results[1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(results[2], results[3]):
        assert same(a, b)


def test_nonfinite_norm_skips_perturbation_on_device():
    """A NaN in the first gradient: no perturbation (decided on the device), the second step is
    the base optimizer's with the gradients given, and the count reaches stats lazily."""
    results = []
    for backend in ["triton", "rust"]:
        params = make_params(torch.float32)
        opt = sharpness.SAM(params, torch.optim.SGD, backend=backend, lr=0.1, momentum=0.9)
        w0 = [p.detach().clone() for p in params]
        loss_fn(params, 0).backward()
        params[2].grad[0] = float("nan")
        opt.first_step(zero_grad=True)
        assert all(same(p.detach(), w) for p, w in zip(params, w0))
        loss_fn(params, 1).backward()
        opt.second_step(zero_grad=True)
        results.append([p.detach().clone() for p in params])
        if backend == "triton":
            assert isinstance(opt.last_grad_norm, torch.Tensor) and opt.last_grad_norm.isnan()
            assert opt.stats["nonfinite_skips"] == 0  # not read yet: no sync
            assert opt.sync_stats()["nonfinite_skips"] == 1
            assert opt.state_dict()["sam"]["stats"]["nonfinite_skips"] == 1
        else:
            assert opt.stats["nonfinite_skips"] == 1
    # The Rust path lets torch.optim.SGD step after a skip (its host saw the norm); the device
    # path cannot know, and takes its fused step: the same step up to torch's own rounding (FMA).
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_asam_leaves_parameters_without_gradient_alone():
    """ASAM's (|w|+η)²·0 is NaN for an infinite weight: a parameter without a gradient is
    neither in the norm nor perturbed (as torch would skip it)."""
    results = []
    for backend in ["triton", "rust"]:
        params = make_params(torch.float32)
        with torch.no_grad():
            params[1][0, 0] = float("inf")
        opt = sharpness.SAM(params, torch.optim.SGD, backend=backend, adaptive=True, rho=0.5, lr=0.1)
        others = [p for i, p in enumerate(params) if i != 1]
        loss_fn(others, 0).backward()
        opt.first_step(zero_grad=True)
        assert math.isfinite(float(opt.last_grad_norm))
        loss_fn(others, 1).backward()
        opt.second_step(zero_grad=True)
        assert params[1][0, 0] == float("inf") and torch.isfinite(params[1].flatten()[1:]).all()
        results.append([p.detach().clone() for p in params])
    for a, b in zip(*results):
        assert same(a, b)


def test_step_reads_nothing_on_the_host(monkeypatch):
    """The CPU stand-in for `torch.cuda.set_sync_debug_mode("error")`: after a warm-up step,
    a whole SAM step (both halves, fused SGD and Adam) converts no tensor to a Python value."""
    for cls, kw in [BASES["sgd"], BASES["adamw"]]:
        params = make_params(torch.float32)
        opt = sharpness.SAM(params, cls, backend="triton", **kw)

        def one_step():
            opt.zero_grad()
            loss_fn(params, 0).backward()
            opt.first_step(zero_grad=True)
            loss_fn(params, 1).backward()
            opt.second_step(zero_grad=True)

        one_step()  # warm-up: state created, buffers adopted

        def refuse(*args, **kwargs):
            raise AssertionError("a host read of a tensor during a SAM step")

        with monkeypatch.context() as m:
            for name in ["item", "tolist", "__float__", "__int__", "__bool__", "__index__"]:
                m.setattr(torch.Tensor, name, refuse)
            one_step()
        assert opt.stats["fused_steps"] == 2


def test_every_k_sam_reads_nothing_on_the_host(monkeypatch):
    """Every-k SAM decides by the step count: its SAM steps keep the norm on the device and its
    one-pass steps are a fused base step, so no step reads a tensor on the host."""
    params = make_params(torch.float32)
    opt = sharpness.EveryKSAM(params, torch.optim.SGD, k=2, rho=0.05, backend="triton", lr=0.05, momentum=0.9)

    def one_step(i):
        opt.zero_grad()
        loss_fn(params, i).backward()
        if opt.first_step(zero_grad=True):
            loss_fn(params, i).backward()
            opt.second_step(zero_grad=True)

    one_step(0)  # warm-up: state created, buffers adopted
    one_step(1)

    def refuse(*args, **kwargs):
        raise AssertionError("a host read of a tensor during a step")

    with monkeypatch.context() as m:
        for name in ["item", "tolist", "__float__", "__int__", "__bool__", "__index__"]:
            m.setattr(torch.Tensor, name, refuse)
        one_step(2)  # a SAM step
        one_step(3)  # a one-pass step
    assert opt.stats["fused_steps"] == 2 and opt.stats["fused_plain_steps"] == 2


def test_looksam_runs_on_the_triton_engine():
    trajectories = []
    for backend in ["triton", "rust"]:
        params = make_params(torch.float32)
        opt = sharpness.LookSAM(params, torch.optim.SGD, k=2, alpha=0.7, backend=backend, lr=0.05)
        for step in range(4):
            def closure(step=step):
                opt.zero_grad()
                loss = loss_fn(params, step)
                loss.backward()
                return loss

            opt.step(closure)
        trajectories.append(params)
    for a, b in zip(*trajectories):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_backend_selection_and_errors(monkeypatch):
    p = torch.nn.Parameter(torch.randn(3))
    assert [e.name for e in sharpness.SAM([p], torch.optim.SGD, lr=0.1).engines()] == ["rust"]  # auto on CPU
    p = torch.nn.Parameter(torch.randn(3))
    assert [e.name for e in sharpness.SAM([p], torch.optim.SGD, backend="triton", lr=0.1).engines()] == ["triton"]
    with pytest.raises(ValueError, match=r"backend=\"triton\".*float64"):
        sharpness.SAM([torch.nn.Parameter(torch.randn(3, dtype=torch.float64))], torch.optim.SGD, backend="triton", lr=0.1)
    with pytest.raises(ValueError, match="Triton engine: it keeps the exact backup"):
        sharpness.SAM([torch.nn.Parameter(torch.randn(3))], torch.optim.SGD, backend="triton", memory="subtract", lr=0.1)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA tensors"):
        sharpness.SAM([torch.nn.Parameter(torch.randn(3))], torch.optim.SGD, backend="triton", lr=0.1)
    monkeypatch.setattr("sharpness.backends.triton.triton_importable", lambda: False)
    with pytest.raises(ValueError, match="triton is not installed"):
        sharpness.SAM([torch.nn.Parameter(torch.randn(3))], torch.optim.SGD, backend="triton", lr=0.1)


# == the GPU checks, in a subprocess without the interpreter ==============================================


def _without_interpreter(*args: str, cache: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if cache is not None:
        env["TRITON_CACHE_DIR"] = str(cache)
    script = Path(__file__).with_name("triton_gpu_checks.py")
    return subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True, timeout=1200)


def test_kernels_compile_for_h100(tmp_path):
    """No GPU needed: every kernel compiles for sm_90 (PTX and cubin), and the PTX shows what the
    GPU results rest on: no contracted fp32 fma, IEEE sqrt/div, 128-bit accesses when aligned."""
    result = _without_interpreter("--compile-only", cache=tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "all kernels compile for sm_90" in result.stdout


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: the Triton kernels were checked under TRITON_INTERPRET=1 only"
)
def test_gpu_checks():
    result = _without_interpreter()
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
