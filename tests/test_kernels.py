"""The contract of the native module ``sharpness._core``, checked from Python.

References are written here with numpy from the formulas (nothing but ``sharpness._core`` is
imported from the package): every kernel, in float32, float64, float16 and bfloat16 (raw
``uint16`` storage), at lengths 0, 1, odd and beyond three chunks; lists of arrays against the
concatenated flat buffer; bit-exact restoration; determinism across thread counts; every error
case; and the fused restore + optimizer steps against a per-element transcription of torch's
``_single_tensor_sgd``/``_single_tensor_adam`` and against ``torch.optim`` itself.

Arithmetic contract (from the stubs and the kernel docs): float32 and the half types compute in
float32, float64 in float64; host scalars are rounded to the compute type; a half-type result is
rounded once, to nearest even, when stored. numpy's float32/float64 ufuncs are IEEE operations
without contraction, so a reference written in the kernel's order of operations reproduces the
kernel bit for bit. torch itself uses FMA and a non-correctly-rounded float32 ``sqrt`` on CPU, so
the comparison with ``torch.optim`` is to 1e-6 relative instead.
"""

from __future__ import annotations

import math
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from sharpness import _core

CHUNK = _core.CHUNK
LARGE = 3 * CHUNK + 5

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------
# dtypes: storage, compute type, rounding
# ---------------------------------------------------------------------------------------------


class DType:
    """A storage dtype, its compute type, and the single rounding from one to the other."""

    def __init__(self, name: str, storage: type, math_type: type) -> None:
        self.name = name
        self.storage = storage
        self.math = math_type

    def __repr__(self) -> str:
        return self.name

    def load(self, x: np.ndarray) -> np.ndarray:
        """Storage -> compute type (exact)."""
        if self.name == "bfloat16":
            return (x.astype(np.uint32) << 16).view(np.float32)
        return x.astype(self.math)

    @np.errstate(all="ignore")  # overflow to ±inf is part of the formula
    def store(self, x: np.ndarray) -> np.ndarray:
        """Compute type -> storage, rounded to nearest even."""
        x = np.asarray(x, dtype=self.math)
        if self.name == "bfloat16":
            return torch.from_numpy(np.ascontiguousarray(x)).to(torch.bfloat16).view(torch.uint16).numpy().copy()
        return x.astype(self.storage)

    def make(self, values: np.ndarray) -> np.ndarray:
        return self.store(np.asarray(values, dtype=np.float64).astype(self.math))


F32 = DType("float32", np.float32, np.float32)
F64 = DType("float64", np.float64, np.float64)
F16 = DType("float16", np.float16, np.float32)
BF16 = DType("bfloat16", np.uint16, np.float32)
DTYPES = [F32, F64, F16, BF16]
dtypes = pytest.mark.parametrize("dt", DTYPES, ids=repr)


def values(rng: np.random.Generator, n: int, scale: float) -> np.ndarray:
    """Mostly uniform in [-scale, scale]; some ±0 and some tiny values (subnormal in float16)."""
    x = rng.uniform(-scale, scale, n)
    kind = rng.integers(0, 16, n)
    x[kind == 0] = 0.0
    x[kind == 1] = -0.0
    x[kind == 2] *= 1e-6
    return x


def data(dt: DType, rng: np.random.Generator, n: int, scale: float = 1.0, nonneg: bool = False) -> np.ndarray:
    v = values(rng, n, scale)
    return dt.make(np.abs(v) if nonneg else v)


def poisoned(dt: DType, n: int) -> np.ndarray:
    """Weights the fused steps must overwrite without reading."""
    return dt.make(np.full(n, np.nan))


def assert_same(got: np.ndarray, want: np.ndarray, what: str) -> None:
    """Bit-for-bit equality of two storage arrays (all NaNs count as equal)."""
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, want.dtype, got.shape, want.shape)
    bits = {2: np.uint16, 4: np.uint32, 8: np.uint64}[got.dtype.itemsize]
    g, w = got.view(bits), want.view(bits)
    differ = g != w
    if got.dtype != np.uint16:  # NaN payloads may differ
        differ &= ~(np.isnan(got) & np.isnan(want))
    else:
        nan = lambda b: (b & 0x7F80 == 0x7F80) & (b & 0x007F != 0)  # noqa: E731
        differ &= ~(nan(g) & nan(w))
    if differ.any():
        i = int(np.flatnonzero(differ)[0])
        pytest.fail(f"{what}: {int(differ.sum())} of {got.size} elements differ; first at {i}: got {got[i]!r}, want {want[i]!r}")


def lengths() -> st.SearchStrategy[int]:
    return st.one_of(
        st.just(0),
        st.just(1),
        st.integers(1, 200).map(lambda k: 2 * k + 1),
        st.integers(0, 40).map(lambda k: 3 * CHUNK + 2 * k + 1),
    )


seeds = st.integers(0, 2**32 - 1)


# ---------------------------------------------------------------------------------------------
# references
# ---------------------------------------------------------------------------------------------


def sum_of_squares_reference(dt: DType, g: np.ndarray) -> float:
    x = dt.load(g).astype(np.float64)
    return math.fsum((x * x).tolist())


def sum_of_squares_adaptive_reference(dt: DType, w: np.ndarray, g: np.ndarray, eta: float) -> float:
    t = (np.abs(dt.load(w).astype(np.float64)) + eta) * dt.load(g).astype(np.float64)
    return math.fsum((t * t).tolist())


@np.errstate(all="ignore")
def perturb_reference(dt: DType, w: np.ndarray, g: np.ndarray, scale: float) -> np.ndarray:
    C = dt.math
    return dt.store(dt.load(w) + C(scale) * dt.load(g))


@np.errstate(all="ignore")
def perturb_adaptive_reference(dt: DType, w: np.ndarray, g: np.ndarray, scale: float, eta: float) -> np.ndarray:
    C = dt.math
    x = dt.load(w)
    t = np.abs(x) + C(eta)
    return dt.store(x + t * t * dt.load(g) * C(scale))


@np.errstate(all="ignore")
def sgd_reference(dt: DType, params: np.ndarray, grads: np.ndarray, buf: np.ndarray | None, h: dict):
    """torch's ``_single_tensor_sgd`` for one tensor, in the compute type; returns (param, buf)."""
    C = dt.math
    p = dt.load(params)
    d = -dt.load(grads) if h["maximize"] else dt.load(grads)  # grad = -grads[i] if maximize
    if h["weight_decay"] != 0:
        d = d + C(h["weight_decay"]) * p  # grad = grad.add(param, alpha=weight_decay)
    new_buf = None
    if h["momentum"] != 0:
        if h["init_momentum"]:
            new_buf = dt.store(d)  # buf = torch.clone(grad).detach()
        else:  # buf.mul_(momentum).add_(grad, alpha=1 - dampening)
            new_buf = dt.store(dt.load(buf) * C(h["momentum"]) + C(1 - h["dampening"]) * d)
        b = dt.load(new_buf)
        d = d + C(h["momentum"]) * b if h["nesterov"] else b  # grad.add(buf, alpha=momentum) | buf
    return dt.store(p + C(-h["lr"]) * d), new_buf  # param.add_(grad, alpha=-lr)


@np.errstate(all="ignore")
def adam_reference(dt: DType, params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, h: dict):
    """torch's ``_single_tensor_adam`` (capturable=False) for one tensor, in the compute type."""
    C = dt.math
    lr, beta1, beta2, eps, wd, step = h["lr"], h["beta1"], h["beta2"], h["eps"], h["weight_decay"], h["step"]
    p = dt.load(params)
    g = -dt.load(grads) if h["maximize"] else dt.load(grads)
    if wd != 0:
        if h["decoupled"]:
            p = dt.load(dt.store(p * C(1 - lr * wd)))  # param.mul_(1 - lr * weight_decay)
        else:
            g = g + C(wd) * p  # grad = grad.add(param, alpha=weight_decay)
    # exp_avg.lerp_(grad, 1 - beta1), torch's two-sided lerp
    weight = C(1 - beta1)
    start = dt.load(exp_avg)
    m = start + weight * (g - start) if abs(weight) < 0.5 else g - (g - start) * (C(1) - weight)
    m = dt.store(m)
    # exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    v = dt.store(dt.load(exp_avg_sq) * C(beta2) + C(1 - beta2) * g * g)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    # torch writes bias_correction2**0.5; the kernel takes the correctly rounded sqrt (CPython's
    # pow can be one ulp off it for a few (beta2, step) pairs).
    bias_correction2_sqrt = math.sqrt(bias_correction2)
    vmax = None
    if h["amsgrad"]:
        vmax = dt.store(np.maximum(dt.load(max_exp_avg_sq), dt.load(v)))  # torch.maximum(..., out=...)
        second = dt.load(vmax)
    else:
        second = dt.load(v)
    denom = np.sqrt(second) / C(bias_correction2_sqrt) + C(eps)
    # param.addcdiv_(exp_avg, denom, value=-step_size): param + value * exp_avg / denom
    p = dt.store(p + C(-step_size) * dt.load(m) / denom)
    return p, m, v, vmax


# ---------------------------------------------------------------------------------------------
# checks, shared by the property tests and the fixed cases
# ---------------------------------------------------------------------------------------------


def check_sums(dt: DType, n: int, seed: int, eta: float) -> None:
    rng = np.random.default_rng(seed)
    w, g = data(dt, rng, n, 4.0), data(dt, rng, n, 2.0)
    w0, g0 = w.copy(), g.copy()
    got = _core.sum_of_squares(g)
    want = sum_of_squares_reference(dt, g)
    assert isinstance(got, float)
    assert abs(got - want) <= 1e-12 * want, (got, want)
    got = _core.sum_of_squares_adaptive(w, g, eta)
    want = sum_of_squares_adaptive_reference(dt, w, g, eta)
    assert abs(got - want) <= 1e-12 * want, (got, want)
    assert_same(w, w0, "weights read by sum_of_squares_adaptive")
    assert_same(g, g0, "grads read by sum_of_squares")


def check_perturb_and_restore(dt: DType, n: int, seed: int, scale: float, eta: float) -> None:
    rng = np.random.default_rng(seed)
    w0, g = data(dt, rng, n, 4.0), data(dt, rng, n, 2.0)
    for adaptive in (False, True):
        w, backup = w0.copy(), data(dt, rng, n)
        if adaptive:
            _core.perturb_adaptive(w, g, backup, scale, eta)
            want = perturb_adaptive_reference(dt, w0, g, scale, eta)
        else:
            _core.perturb(w, g, backup, scale)
            want = perturb_reference(dt, w0, g, scale)
        assert_same(w, want, f"{dt} perturb(adaptive={adaptive})")
        assert_same(backup, w0, f"{dt} backup of perturb(adaptive={adaptive})")
        _core.copy(backup, w)
        assert_same(w, w0, f"{dt} restore after perturb(adaptive={adaptive})")


def check_sgd(dt: DType, n: int, seed: int, h: dict, steps: int) -> None:
    """``steps`` steps from fresh buffers (``init_momentum`` on the first), compared every step."""
    rng = np.random.default_rng(seed)
    params = data(dt, rng, n, 4.0)
    buf = data(dt, rng, n, 1e3)  # garbage: the first step overwrites it
    ref_buf = None
    for k in range(steps):
        hk = dict(h, init_momentum=(k == 0))
        grads = data(dt, rng, n, 2.0)
        weights = poisoned(dt, n)
        backups, grads0 = params.copy(), grads.copy()
        _core.restore_sgd(
            weights,
            backups,
            grads,
            buf if h["momentum"] != 0 else None,
            lr=h["lr"],
            momentum=h["momentum"],
            dampening=h["dampening"],
            weight_decay=h["weight_decay"],
            nesterov=h["nesterov"],
            maximize=h["maximize"],
            init_momentum=hk["init_momentum"],
        )
        want_w, want_buf = sgd_reference(dt, params, grads, ref_buf, hk)
        assert_same(weights, want_w, f"{dt} SGD step {k + 1} weights {hk}")
        if want_buf is not None:
            assert_same(buf, want_buf, f"{dt} SGD step {k + 1} momentum {hk}")
            ref_buf = want_buf
        assert_same(backups, params, "backups are read-only")
        assert_same(grads, grads0, "grads are read-only")
        params = weights


def check_adam(dt: DType, n: int, seed: int, h: dict, steps: int) -> None:
    rng = np.random.default_rng(seed)
    params = data(dt, rng, n, 4.0)
    fresh = h["step"] == 1
    zeros = dt.make(np.zeros(n))
    m = zeros.copy() if fresh else data(dt, rng, n)
    v = zeros.copy() if fresh else data(dt, rng, n, nonneg=True)
    vmax = zeros.copy() if fresh else data(dt, rng, n, nonneg=True)
    for k in range(steps):
        hk = dict(h, step=h["step"] + k)
        grads = data(dt, rng, n, 2.0)
        want = adam_reference(dt, params, grads, m, v, vmax, hk)
        weights = poisoned(dt, n)
        _core.restore_adam(
            weights,
            params,
            grads,
            m,
            v,
            vmax if h["amsgrad"] else None,
            step=float(hk["step"]),
            lr=h["lr"],
            beta1=h["beta1"],
            beta2=h["beta2"],
            eps=h["eps"],
            weight_decay=h["weight_decay"],
            decoupled=h["decoupled"],
            amsgrad=h["amsgrad"],
            maximize=h["maximize"],
        )
        label = f"{dt} Adam step {hk['step']} {hk}"
        assert_same(weights, want[0], f"{label} weights")
        assert_same(m, want[1], f"{label} exp_avg")
        assert_same(v, want[2], f"{label} exp_avg_sq")
        if h["amsgrad"]:
            assert_same(vmax, want[3], f"{label} max_exp_avg_sq")
        params = weights


SGD_DEFAULTS = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False)
ADAM_DEFAULTS = dict(
    lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=False, amsgrad=False, maximize=False, step=1
)


@st.composite
def sgd_hypers(draw) -> dict:
    momentum = draw(st.sampled_from([0.0, 0.9]) | st.floats(0.0, 0.99))
    nesterov = draw(st.booleans()) and momentum > 0
    return dict(
        lr=draw(st.sampled_from([0.1]) | st.floats(1e-4, 2.0)),
        momentum=momentum,
        dampening=0.0 if nesterov else draw(st.sampled_from([0.0]) | st.floats(0.0, 1.0)),
        weight_decay=draw(st.sampled_from([0.0, 5e-4]) | st.floats(0.0, 0.5)),
        nesterov=nesterov,
        maximize=draw(st.booleans()),
    )


@st.composite
def adam_hypers(draw) -> dict:
    return dict(
        lr=draw(st.sampled_from([1e-3]) | st.floats(1e-5, 0.5)),
        beta1=draw(st.sampled_from([0.9, 0.0]) | st.floats(0.0, 0.999)),
        beta2=draw(st.sampled_from([0.999]) | st.floats(0.5, 0.99999)),
        eps=draw(st.sampled_from([1e-8]) | st.floats(1e-12, 1e-2)),
        weight_decay=draw(st.sampled_from([0.0, 1e-2]) | st.floats(0.0, 0.5)),
        decoupled=draw(st.booleans()),
        amsgrad=draw(st.booleans()),
        maximize=draw(st.booleans()),
        step=draw(st.sampled_from([1]) | st.integers(1, 1000)),
    )


# ---------------------------------------------------------------------------------------------
# property tests
# ---------------------------------------------------------------------------------------------


@dtypes
@SETTINGS
@given(n=lengths(), seed=seeds, eta=st.sampled_from([0.0, 0.01]) | st.floats(0.0, 1.0))
def test_sums_of_squares(dt, n, seed, eta):
    check_sums(dt, n, seed, eta)


@dtypes
@SETTINGS
@given(
    n=lengths(),
    seed=seeds,
    scale=st.floats(-10.0, 10.0),
    eta=st.sampled_from([0.0, 0.01]) | st.floats(0.0, 1.0),
)
def test_perturb_and_exact_restore(dt, n, seed, scale, eta):
    check_perturb_and_restore(dt, n, seed, scale, eta)


@dtypes
@SETTINGS
@given(n=lengths(), seed=seeds, h=sgd_hypers(), steps=st.integers(1, 3))
def test_restore_sgd_follows_torch_formula(dt, n, seed, h, steps):
    check_sgd(dt, n, seed, h, steps)


@dtypes
@SETTINGS
@given(n=lengths(), seed=seeds, h=adam_hypers(), steps=st.integers(1, 3))
def test_restore_adam_follows_torch_formula(dt, n, seed, h, steps):
    check_adam(dt, n, seed, h, steps)


@pytest.mark.parametrize("n", [0, 1, 7, LARGE])
@dtypes
def test_every_kernel_at_edge_lengths(dt, n):
    check_sums(dt, n, 1, 0.01)
    check_perturb_and_restore(dt, n, 2, 0.05, 0.01)
    check_sgd(dt, n, 3, dict(SGD_DEFAULTS, weight_decay=1e-2, dampening=0.1), 3)
    check_sgd(dt, n, 4, dict(SGD_DEFAULTS, nesterov=True, maximize=True), 2)
    check_sgd(dt, n, 5, dict(SGD_DEFAULTS, momentum=0.0), 2)
    check_adam(dt, n, 6, dict(ADAM_DEFAULTS, weight_decay=1e-2), 3)
    check_adam(dt, n, 7, dict(ADAM_DEFAULTS, weight_decay=1e-1, decoupled=True, amsgrad=True, beta1=0.3), 3)
    check_adam(dt, n, 8, dict(ADAM_DEFAULTS, amsgrad=True, maximize=True, step=100), 2)


# ---------------------------------------------------------------------------------------------
# lists of arrays against the flat buffer
# ---------------------------------------------------------------------------------------------


def pieces(n: int, cuts: list[int], shapes: bool) -> list[tuple[int, int, tuple]]:
    """Cuts ``range(n)`` at ``cuts`` (repeated cuts make empty tensors); even-sized pieces become
    2-D when ``shapes`` (the kernels count elements, whatever the shape)."""
    points = sorted([0, n, *(c % (n + 1) for c in cuts)])
    out = []
    for a, b in zip(points, points[1:]):
        size = b - a
        out.append((a, b, (2, size // 2) if shapes and size and size % 2 == 0 else (size,)))
    return out


def split(x: np.ndarray, parts, copy: bool) -> list[np.ndarray]:
    arrays = [x[a:b].reshape(shape) for a, b, shape in parts]
    return [a.copy() for a in arrays] if copy else arrays


def flat(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([a.reshape(-1) for a in arrays])


@dtypes
@SETTINGS
@given(
    n=lengths(),
    seed=seeds,
    cuts=st.lists(st.integers(0, 2**31), max_size=7),
    shapes=st.booleans(),
    copy=st.booleans(),
)
def test_list_of_arrays_equals_flat_buffer(dt, n, seed, cuts, shapes, copy):
    rng = np.random.default_rng(seed)
    parts = pieces(n, cuts, shapes)
    w, g, b0, buf0 = data(dt, rng, n, 4.0), data(dt, rng, n, 2.0), data(dt, rng, n), data(dt, rng, n)
    m0, v0, x0 = data(dt, rng, n), data(dt, rng, n, nonneg=True), data(dt, rng, n, nonneg=True)
    L = lambda x: split(x, parts, copy)  # noqa: E731

    assert _core.sum_of_squares(L(g)) == pytest.approx(_core.sum_of_squares(g), rel=1e-12, abs=0)
    assert _core.sum_of_squares_adaptive(L(w), L(g), 0.01) == pytest.approx(
        _core.sum_of_squares_adaptive(w, g, 0.01), rel=1e-12, abs=0
    )
    # A tuple is a sequence too.
    assert _core.sum_of_squares(tuple(L(g))) == _core.sum_of_squares(L(g))

    for kernel, args in [(_core.perturb, (0.3,)), (_core.perturb_adaptive, (0.3, 0.01))]:
        wf, bf = w.copy(), b0.copy()
        kernel(wf, g, bf, *args)
        wl, bl = L(w), L(b0)
        kernel(wl, L(g), bl, *args)
        assert_same(flat(wl), wf, f"list {kernel.__name__} weights")
        assert_same(flat(bl), bf, f"list {kernel.__name__} backups")
        _core.copy(bl, wl)
        assert_same(flat(wl), w, "list restore")

    sgd = dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-2, maximize=True)
    wf, bf = poisoned(dt, n), buf0.copy()
    _core.restore_sgd(wf, b0, g, bf, **sgd)
    wl, bl = L(poisoned(dt, n)), L(buf0)
    _core.restore_sgd(wl, L(b0), L(g), bl, **sgd)
    assert_same(flat(wl), wf, "list SGD weights")
    assert_same(flat(bl), bf, "list SGD momentum")

    adam = dict(step=5.0, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decoupled=True, amsgrad=True)
    wf, mf, vf, xf = poisoned(dt, n), m0.copy(), v0.copy(), x0.copy()
    _core.restore_adam(wf, b0, g, mf, vf, xf, **adam)
    wl, ml, vl, xl = L(poisoned(dt, n)), L(m0), L(v0), L(x0)
    _core.restore_adam(wl, L(b0), L(g), ml, vl, xl, **adam)
    for got, want, what in [(wl, wf, "weights"), (ml, mf, "exp_avg"), (vl, vf, "exp_avg_sq"), (xl, xf, "max")]:
        assert_same(flat(got), want, f"list Adam {what}")


def test_empty_lists():
    assert _core.sum_of_squares([]) == 0.0
    assert _core.sum_of_squares(np.zeros(0, np.float32)) == 0.0
    _core.copy([], [])
    _core.perturb([], [], [], 1.0)
    _core.restore_sgd([], [], [], [], lr=0.1, momentum=0.9)
    _core.restore_adam([], [], [], [], [], step=1.0, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)


def test_sum_of_squares_is_accurate_on_a_large_buffer():
    g = ((np.arange(2_000_003) % 97) - 48.0).astype(np.float32) * np.float32(1e-3)
    want = math.fsum((g.astype(np.float64) ** 2).tolist())
    assert abs(_core.sum_of_squares(g) - want) <= 1e-12 * want
    assert abs(_core.sum_of_squares([g[:12345], g[12345:]]) - want) <= 1e-12 * want
    assert _core.sum_of_squares(g).hex() == _core.sum_of_squares(g).hex()


# ---------------------------------------------------------------------------------------------
# special values
# ---------------------------------------------------------------------------------------------


@dtypes
def test_non_finite_values_follow_the_formulas(dt):
    specials = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0, -1.0, 3.0])
    p = dt.make(np.array([1.0, 1.0, 1.0, 1.0, -0.0, 0.0, np.nan, 2.0]))
    g = dt.make(specials)
    with np.errstate(all="ignore"):
        w = p.copy()
        b = np.empty_like(p)
        _core.perturb(w, g, b, 0.5)
        assert_same(w, perturb_reference(dt, p, g, 0.5), "perturb with non-finite values")
        _core.copy(b, w)
        assert w.tobytes() == p.tobytes()  # NaN payloads included
        h = dict(ADAM_DEFAULTS, amsgrad=True, step=3, weight_decay=0.1)
        m = dt.make(np.zeros(8))
        v = dt.make(np.array([0.0, 0.0, 0.0, 0.0, 0.0, np.nan, 0.0, 1.0]))
        x = dt.make(np.array([0.0, 0.0, 0.0, np.nan, 0.0, 0.0, 0.0, 0.0]))
        want = adam_reference(dt, p, g, m, v, x, h)
        w = poisoned(dt, 8)
        _core.restore_adam(w, p, g, m, v, x, step=3.0, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, amsgrad=True)
        for got, ref, what in zip((w, m, v, x), want, ("weights", "exp_avg", "exp_avg_sq", "max")):
            assert_same(got, ref, f"Adam with non-finite values: {what}")
        # torch.maximum propagates NaN from the old maximum and from the new moment.
        assert np.isnan(dt.load(x)[[0, 3, 5]]).all()
        assert math.isnan(_core.sum_of_squares(g))
        assert _core.sum_of_squares(dt.make(np.array([np.inf, 1.0]))) == math.inf


# ---------------------------------------------------------------------------------------------
# determinism across thread counts
# ---------------------------------------------------------------------------------------------

DETERMINISM_SCRIPT = textwrap.dedent(
    """
    import hashlib
    import numpy as np
    from sharpness import _core

    n = 5 * _core.CHUNK + 3
    out = hashlib.sha256()
    for dtype in ("float32", "float64", "float16", "bfloat16"):
        rng = np.random.default_rng(0)
        def mk(nonneg=False):
            x = rng.standard_normal(n)
            x = np.abs(x) if nonneg else x
            if dtype == "bfloat16":  # raw storage: the top half of a float32
                return (x.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
            return x.astype(dtype)
        w, g, b = mk(), mk(), mk()
        out.update(float(_core.sum_of_squares(g)).hex().encode())
        out.update(float(_core.sum_of_squares([g[:777], g[777:]])).hex().encode())
        out.update(float(_core.sum_of_squares_adaptive(w, g, 0.01)).hex().encode())
        _core.perturb_adaptive(w, g, b, 0.05, 0.01)
        out.update(w.tobytes()); out.update(b.tobytes())
        buf = mk()
        _core.restore_sgd(w, b, g, buf, lr=0.1, momentum=0.9, weight_decay=1e-2)
        out.update(w.tobytes()); out.update(buf.tobytes())
        m, v, x = mk(), mk(nonneg=True), mk(nonneg=True)
        _core.restore_adam(w, b, g, m, v, x, step=3.0, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, amsgrad=True)
        for a in (w, m, v, x):
            out.update(a.tobytes())
    print(_core.num_threads(), out.hexdigest())
    """
)


def test_results_do_not_depend_on_the_thread_count():
    import sharpness

    root = str(pathlib.Path(sharpness.__file__).resolve().parent.parent)
    results = {}
    for threads in ("1", "2"):
        env = dict(os.environ, RAYON_NUM_THREADS=threads, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
        run = subprocess.run([sys.executable, "-c", DETERMINISM_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        reported, digest = run.stdout.split()
        assert reported == threads
        results[threads] = digest
    assert results["1"] == results["2"]


# ---------------------------------------------------------------------------------------------
# errors: the right exception, a clear message, and nothing written
# ---------------------------------------------------------------------------------------------


def f32(n=8, fill=1.0):
    return np.full(n, fill, np.float32)


def untouched(*arrays):
    """Snapshot arrays; calling the result asserts they were not modified."""
    saved = [a.copy() for a in arrays]

    def check():
        for a, s in zip(arrays, saved):
            assert a.tobytes() == s.tobytes()

    return check


def sgd_args(**over):
    args = dict(weights=f32(), backups=f32(), grads=f32(), momentum_buffers=f32())
    args.update(over)
    return args


def adam_args(**over):
    args = dict(weights=f32(), backups=f32(), grads=f32(), exp_avgs=f32(), exp_avg_sqs=f32())
    args.update(over)
    return args


ADAM_KW = dict(step=1.0, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)


ARGUMENTS = ("weights", "grads", "backups", "momentum_buffers", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs")


def every_kernel(**arrays):
    """(argument names, call) for every kernel with valid float32 arrays of 8 elements, some
    replaced by ``arrays`` (by argument name)."""

    def a(name):
        return arrays.get(name, f32())

    return [
        (("grads",), lambda: _core.sum_of_squares(a("grads"))),
        (("weights", "grads"), lambda: _core.sum_of_squares_adaptive(a("weights"), a("grads"), 0.01)),
        (("weights", "grads", "backups"), lambda: _core.perturb(a("weights"), a("grads"), a("backups"), 1.0)),
        (
            ("weights", "grads", "backups"),
            lambda: _core.perturb_adaptive(a("weights"), a("grads"), a("backups"), 1.0, 0.01),
        ),
        (("src", "dst"), lambda: _core.copy(a("src"), a("dst"))),
        (
            ("weights", "backups", "grads", "momentum_buffers"),
            lambda: _core.restore_sgd(a("weights"), a("backups"), a("grads"), a("momentum_buffers"), lr=0.1, momentum=0.9),
        ),
        (
            ("weights", "backups", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"),
            lambda: _core.restore_adam(
                a("weights"),
                a("backups"),
                a("grads"),
                a("exp_avgs"),
                a("exp_avg_sqs"),
                a("max_exp_avg_sqs"),
                amsgrad=True,
                **ADAM_KW,
            ),
        ),
    ]


@pytest.mark.parametrize("name", ARGUMENTS)
@pytest.mark.parametrize(
    "bad,error,message",
    [
        (lambda: np.ones(8, np.float64), TypeError, "is float64 but the call's first array is float32"),
        (lambda: np.ones(8, np.int32), TypeError, "has dtype int32"),
        (lambda: f32(7), ValueError, "has shape"),
        (lambda: [f32(), f32()], ValueError, "holds 2 arrays"),
        (lambda: f32(16)[::2], ValueError, "is not C-contiguous"),
    ],
    ids=["float64", "int32", "shape", "count", "strided"],
)
def test_every_kernel_checks_every_argument(name, bad, error, message):
    bad = bad()
    for uses, call in every_kernel(**{name: bad}):
        if name not in uses:
            continue
        if uses[0] == name and message.startswith(("is float64", "has shape", "holds")):
            continue  # the first argument sets the dtype and shapes the others must match
        with pytest.raises(error, match=f"`{name}`.*{message}|{message}.*`{name}`"):
            call()


def test_mismatched_dtypes_raise_type_error():
    w, g64, b = f32(), np.ones(8, np.float64), f32()
    check = untouched(w, g64, b)
    with pytest.raises(
        TypeError, match=r"array 0 of `grads` is float64 but the call's first array is float32: one call takes one dtype"
    ):
        _core.perturb(w, g64, b, 1.0)
    # Within one list, too.
    with pytest.raises(TypeError, match="one call takes one dtype"):
        _core.sum_of_squares([f32(), np.ones(3, np.float16)])
    with pytest.raises(TypeError, match="float16"):
        _core.copy(np.ones(8, np.uint16), np.ones(8, np.float16))  # float16 vs bfloat16 storage
    check()


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8, np.complex64, np.bool_, ">f4", np.longdouble])
def test_unsupported_dtypes_raise_type_error(dtype):
    bad = np.ones(8, dtype)
    w = f32()
    check = untouched(bad, w)
    with pytest.raises(TypeError, match=r"has dtype .*the kernels take float32, float64, float16 or bfloat16 as raw uint16"):
        _core.sum_of_squares(bad)
    with pytest.raises(TypeError, match=r"array 0 of `src` has dtype"):
        _core.copy(bad, w)
    check()


def test_non_arrays_raise_type_error():
    with pytest.raises(TypeError, match=r"`grads` must be an ndarray or a sequence of ndarrays, got a str"):
        _core.sum_of_squares("abc")
    with pytest.raises(TypeError, match=r"`grads` must be an ndarray or a sequence of ndarrays, got int"):
        _core.sum_of_squares(3)
    with pytest.raises(TypeError, match=r"item 1 of `grads` is a list, not an ndarray"):
        _core.sum_of_squares([f32(), [1.0, 2.0]])
    with pytest.raises(TypeError, match=r"not an ndarray"):
        _core.sum_of_squares([torch.ones(3)])


def test_mismatched_shapes_raise_value_error():
    w, b = f32(8), f32(7)
    check = untouched(w, b)
    with pytest.raises(ValueError, match=r"array 0 of `src` has shape \[7\] but array 0 of `dst` has shape \[8\]"):
        _core.copy(b, w)
    # Same size, different shape.
    with pytest.raises(ValueError, match=r"has shape \[2, 4\]"):
        _core.copy(np.ones((2, 4), np.float32), w)
    # Second array of a list.
    w2 = [f32(3), f32(5)]
    with pytest.raises(ValueError, match=r"array 1 of `grads` has shape \[4\] but array 1 of `weights` has shape \[5\]"):
        _core.perturb(w2, [f32(3), f32(4)], [f32(3), f32(5)], 1.0)
    check()


def test_mismatched_list_lengths_raise_value_error():
    w = [f32(3), f32(4)]
    check = untouched(*w)
    with pytest.raises(ValueError, match=r"`src` holds 1 arrays but `dst` holds 2"):
        _core.copy([f32(3)], w)
    with pytest.raises(ValueError, match=r"`grads` holds 3 arrays but `weights` holds 2"):
        _core.perturb(w, [f32(3), f32(4), f32(1)], [f32(3), f32(4)], 1.0)
    with pytest.raises(ValueError, match=r"`momentum_buffers` holds 1 arrays"):
        _core.restore_sgd(w, [f32(3), f32(4)], [f32(3), f32(4)], [f32(3)], lr=0.1, momentum=0.9)
    # A single array where a list is expected counts as a list of one.
    with pytest.raises(ValueError, match=r"holds 1 arrays but `dst` holds 2"):
        _core.copy(f32(3), w)
    check()


def test_non_contiguous_arrays_raise_value_error():
    base = f32(16)
    strided = base[::2]
    fortran = np.asfortranarray(np.ones((4, 2), np.float32))
    w, b = f32(), f32()
    check = untouched(base, w, b, fortran)
    with pytest.raises(ValueError, match=r"array 0 of `grads` is not C-contiguous.*ascontiguousarray"):
        _core.sum_of_squares(strided)
    with pytest.raises(ValueError, match="not C-contiguous"):
        _core.perturb(w, strided, b, 1.0)
    with pytest.raises(ValueError, match=r"array 0 of `dst` is not C-contiguous"):
        _core.copy(np.ones((4, 2), np.float32), fortran)
    check()


def test_misaligned_arrays_raise_value_error():
    raw = bytearray(8 * 4 + 1)
    odd = np.frombuffer(raw, dtype=np.float32, count=8, offset=1)
    assert not odd.flags.aligned
    w = f32()
    with pytest.raises(ValueError, match=r"array 0 of `src` is not aligned to its dtype"):
        _core.copy(odd, w)
    assert (w == 1).all()


def test_read_only_outputs_raise_value_error():
    frozen = f32(fill=5.0)
    frozen.setflags(write=False)
    w, g, b = f32(), f32(fill=2.0), f32()
    check = untouched(frozen, w, g, b)
    with pytest.raises(ValueError, match=r"array 0 of `weights` is read-only but the kernel writes it"):
        _core.perturb(frozen, g, b, 1.0)
    with pytest.raises(ValueError, match=r"array 0 of `backups` is read-only"):
        _core.perturb(w, g, frozen, 1.0)
    with pytest.raises(ValueError, match=r"`momentum_buffers` is read-only"):
        _core.restore_sgd(w, b, g, frozen, lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"`exp_avg_sqs` is read-only"):
        _core.restore_adam(w, b, g, f32(), frozen, **ADAM_KW)
    with pytest.raises(ValueError, match=r"`max_exp_avg_sqs` is read-only"):
        _core.restore_adam(w, b, g, f32(), f32(), frozen, amsgrad=True, **ADAM_KW)
    check()
    # Arguments that are only read may be read-only.
    _core.perturb(w, frozen, b, 1.0)
    assert (w == 6.0).all() and (b == 1.0).all()
    _core.copy(frozen, w)
    assert (w == 5.0).all()


def test_aliased_outputs_raise_value_error():
    a, g = f32(16), f32(16, 2.0)
    check = untouched(a, g)
    with pytest.raises(ValueError, match=r"`weights` and `backups` share memory"):
        _core.perturb(a, g, a, 1.0)
    with pytest.raises(ValueError, match="share memory"):
        _core.copy(a, a)
    with pytest.raises(ValueError, match=r"`weights` and `grads` share memory|`grads` and `weights` share memory"):
        _core.perturb(a, a, f32(16), 1.0)
    # Overlapping views of one base array.
    with pytest.raises(ValueError, match="share memory"):
        _core.copy(a[4:12], a[0:8])
    # The same array twice in one written list.
    with pytest.raises(ValueError, match=r"`dst` and `dst` share memory"):
        _core.copy([g, g], [a, a])
    with pytest.raises(ValueError, match="share memory"):
        _core.restore_sgd(a, f32(16), g, a, lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="share memory"):
        _core.restore_adam(f32(16), f32(16), g, a, a, **ADAM_KW)
    with pytest.raises(ValueError, match="share memory"):
        _core.restore_adam(f32(16), f32(16), g, f32(16), a, a[::1], amsgrad=True, **ADAM_KW)
    check()
    # Disjoint views of one base are fine, and arrays that are only read may overlap each other.
    _core.copy(a[8:16], a[0:8])
    assert _core.sum_of_squares_adaptive(g, g, 0.0) == pytest.approx(16 * 16.0)
    _core.perturb(a, g, f32(16), 1.0)


def test_arrays_over_one_torch_storage_raise_value_error():
    t = torch.arange(32, dtype=torch.float32)
    first, second = t.numpy(), t.numpy()  # two ndarrays with different bases, one memory
    assert first is not second and first.base is not second.base
    head, middle = t[:16].numpy(), t[8:24].numpy()
    g = f32(16)
    check = untouched(first, g)
    with pytest.raises(ValueError, match=r"`dst` and `src` share memory|`src` and `dst` share memory"):
        _core.copy(second, first)
    with pytest.raises(ValueError, match="share memory"):
        _core.perturb(head, g, middle, 1.0)
    bf = torch.zeros(16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="share memory"):
        _core.copy(bf.view(torch.uint16).numpy(), bf.view(torch.uint16).numpy())
    check()
    # Disjoint slices of one storage are fine.
    _core.copy(t[16:].numpy(), t[:16].numpy())
    assert (t[:16] == t[16:]).all()


def test_missing_state_raises_value_error():
    w, b, g = f32(), f32(), f32()
    check = untouched(w, b, g)
    with pytest.raises(ValueError, match=r"momentum != 0 needs momentum_buffers"):
        _core.restore_sgd(w, b, g, None, lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"amsgrad needs max_exp_avg_sqs"):
        _core.restore_adam(w, b, g, f32(), f32(), amsgrad=True, **ADAM_KW)
    with pytest.raises(ValueError, match=r"max_exp_avg_sqs given without amsgrad"):
        _core.restore_adam(w, b, g, f32(), f32(), f32(), **ADAM_KW)
    with pytest.raises(ValueError, match=r"nesterov momentum requires a momentum and zero dampening"):
        _core.restore_sgd(w, b, g, f32(), lr=0.1, momentum=0.0, nesterov=True)
    with pytest.raises(ValueError, match=r"nesterov momentum requires"):
        _core.restore_sgd(w, b, g, f32(), lr=0.1, momentum=0.9, dampening=0.1, nesterov=True)
    with pytest.raises(ValueError, match=r"step counts from 1"):
        _core.restore_adam(w, b, g, f32(), f32(), **dict(ADAM_KW, step=0.0))
    with pytest.raises(ValueError, match=r"step counts from 1"):
        _core.restore_adam(w, b, g, f32(), f32(), **dict(ADAM_KW, step=math.nan))
    with pytest.raises(TypeError):
        _core.restore_sgd(w, b, g, None)  # lr is required
    check()
    # Without momentum the buffers are not needed (and not touched when given).
    buf = f32(fill=7.0)
    _core.restore_sgd(w, b, g, None, lr=0.5)
    _core.restore_sgd(w, b, g, buf, lr=0.5)
    assert (w == 0.5).all() and (buf == 7.0).all()


def test_error_checks_run_before_any_write():
    # The last argument is wrong; the earlier, valid ones must not have been written.
    w, b, g, buf = f32(fill=3.0), f32(fill=1.0), f32(fill=2.0), f32(fill=4.0)
    check = untouched(w, b, g, buf)
    for bad in (f32(7), np.ones(8, np.float64), f32(16)[::2]):
        with pytest.raises((TypeError, ValueError)):
            _core.restore_sgd(w, b, g, bad, lr=0.1, momentum=0.9)
        with pytest.raises((TypeError, ValueError)):
            _core.restore_adam(w, b, g, buf, f32(), bad, amsgrad=True, **ADAM_KW)
    check()


# ---------------------------------------------------------------------------------------------
# against torch.optim itself: a 20-step float32 trajectory
# ---------------------------------------------------------------------------------------------

SHAPES = [(7, 5), (5,), (3, 4, 2), (1,)]
STEPS = 20


def gradient(rng: np.random.Generator, p: np.ndarray) -> np.ndarray:
    """A gradient that depends on the point (so the trajectories matter) plus noise."""
    return (np.float32(0.3) * p + rng.standard_normal(p.shape).astype(np.float32)).astype(np.float32)


def assert_close(got: list[np.ndarray], want: list[torch.Tensor], what: str) -> None:
    """Equal to 1e-6 relative to each element or to the largest magnitude of the whole state (a
    moment that is a difference of cancelling terms cannot be held to its own magnitude)."""
    got_flat = np.concatenate([g.reshape(-1) for g in got])
    want_flat = np.concatenate([w.detach().numpy().reshape(-1) for w in want])
    scale = float(np.abs(want_flat).max())
    np.testing.assert_allclose(got_flat, want_flat, rtol=1e-6, atol=1e-6 * scale, err_msg=what)


@pytest.mark.parametrize(
    "kw",
    [
        dict(lr=0.1),
        dict(lr=0.05, momentum=0.9),
        dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2, maximize=True),
        dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=5e-4),
    ],
    ids=["plain", "momentum", "dampening-decay-maximize", "nesterov"],
)
def test_restore_sgd_tracks_torch_sgd(kw):
    rng = np.random.default_rng(0)
    init = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    params = [torch.nn.Parameter(torch.from_numpy(x.copy())) for x in init]
    opt = torch.optim.SGD(params, foreach=False, **kw)
    ours = [x.copy() for x in init]
    bufs = [np.zeros_like(x) for x in init]
    momentum = kw.get("momentum", 0.0)
    rng_t, rng_o = np.random.default_rng(1), np.random.default_rng(1)
    for step in range(STEPS):
        for p in params:
            p.grad = torch.from_numpy(gradient(rng_t, p.detach().numpy()))
        opt.step()
        grads = [gradient(rng_o, x) for x in ours]
        weights = [x + np.float32(1.0) for x in ours]  # the perturbed point, overwritten
        _core.restore_sgd(
            weights,
            ours,
            grads,
            bufs if momentum else None,
            lr=kw["lr"],
            momentum=momentum,
            dampening=kw.get("dampening", 0.0),
            weight_decay=kw.get("weight_decay", 0.0),
            nesterov=kw.get("nesterov", False),
            maximize=kw.get("maximize", False),
            init_momentum=step == 0,
        )
        ours = weights
        assert_close(ours, params, f"SGD step {step + 1} params")
        if momentum:
            assert_close(bufs, [opt.state[p]["momentum_buffer"] for p in params], f"SGD step {step + 1} buffers")


@pytest.mark.parametrize(
    "cls,kw",
    [
        (torch.optim.Adam, dict(lr=1e-2)),
        (torch.optim.Adam, dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=1e-2, amsgrad=True)),
        (torch.optim.Adam, dict(lr=1e-2, eps=1e-6, maximize=True)),
        (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
        (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1, amsgrad=True, betas=(0.3, 0.9))),
    ],
    ids=["adam", "adam-decay-amsgrad", "adam-maximize", "adamw", "adamw-amsgrad-low-beta1"],
)
def test_restore_adam_tracks_torch_adam(cls, kw):
    rng = np.random.default_rng(0)
    init = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    params = [torch.nn.Parameter(torch.from_numpy(x.copy())) for x in init]
    opt = cls(params, foreach=False, **kw)
    defaults = opt.defaults
    beta1, beta2 = defaults["betas"]
    amsgrad = defaults["amsgrad"]
    ours = [x.copy() for x in init]
    m = [np.zeros_like(x) for x in init]
    v = [np.zeros_like(x) for x in init]
    vmax = [np.zeros_like(x) for x in init] if amsgrad else None
    rng_t, rng_o = np.random.default_rng(1), np.random.default_rng(1)
    for step in range(1, STEPS + 1):
        for p in params:
            p.grad = torch.from_numpy(gradient(rng_t, p.detach().numpy()))
        opt.step()
        grads = [gradient(rng_o, x) for x in ours]
        weights = [x - np.float32(1.0) for x in ours]
        _core.restore_adam(
            weights,
            ours,
            grads,
            m,
            v,
            vmax,
            step=float(step),
            lr=defaults["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=defaults["eps"],
            weight_decay=defaults["weight_decay"],
            decoupled=cls is torch.optim.AdamW,
            amsgrad=amsgrad,
            maximize=defaults["maximize"],
        )
        ours = weights
        states = [opt.state[p] for p in params]
        assert all(float(s["step"]) == step for s in states)
        name = f"{cls.__name__} step {step}"
        assert_close(ours, params, f"{name} params")
        assert_close(m, [s["exp_avg"] for s in states], f"{name} exp_avg")
        assert_close(v, [s["exp_avg_sq"] for s in states], f"{name} exp_avg_sq")
        if amsgrad:
            assert_close(vmax, [s["max_exp_avg_sq"] for s in states], f"{name} max_exp_avg_sq")


def test_module_metadata():
    assert isinstance(_core.__version__, str) and _core.__version__
    assert CHUNK == 1 << 14
    assert _core.num_threads() >= 1
