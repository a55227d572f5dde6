"""Property-based fuzzing of the public API (hypothesis).

``sharpness._core``: random kernels, shapes (0-d to 3-d, empty, beyond one chunk), dtypes (the
four supported ones and unsupported ones: integers, complex, bool, big-endian), tensor counts
(empty lists included), NaN/inf/-0/subnormal values, and random defects: non-contiguous views,
misaligned buffers, read-only outputs, aliasing between arguments, mismatched shapes or counts,
mixed dtypes, non-array items. Every call either returns the right result or raises
``TypeError``/``ValueError`` with nothing written; it never crashes.

``sharpness.SAM``: random small models (float32/float64 mixed, frozen parameters, parameters
without gradient, NaN/inf/zero gradients, two groups with their own rho/adaptivity), two SAM steps
with SGD (or Adam/AdamW) bases; the weights after each ``second_step`` must equal a per-tensor
reference written here (restore, then ``torch.optim.<base>(foreach=False)`` on the same second
gradients) to float rounding, and a non-finite gradient norm leaves the weights unperturbed.

Also: empty parameter groups (alone or among others) change nothing, bit for bit; a parameter in
two groups is refused with a clear error; the bugs it found stay as regression tests.

Profiles: by default small and derandomized (CI: 150 + 40 + 20 examples); ``SHARPNESS_FUZZ=full``
draws fresh random examples, 1,500 + 600 + 300 = 2,400.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import sharpness
from sharpness import _core

FULL = os.environ.get("SHARPNESS_FUZZ", "") == "full"
CORE_CASES = 1500 if FULL else 150
SAM_CASES = 600 if FULL else 40
COMMON = dict(
    deadline=None,
    derandomize=not FULL,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

# ------------------------------------------------------------------------------------------ _core

SUPPORTED = {"float32": np.float32, "float64": np.float64, "float16": np.float16, "bfloat16": np.uint16}
UNSUPPORTED = [np.int32, np.int64, np.complex64, np.bool_, np.dtype(">f4"), np.uint8]
SPECIALS = [0.0, -0.0, math.nan, math.inf, -math.inf, 1e-40, -3e-39, 1e-310]


def to_f64(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return torch.from_numpy(a.astype(np.uint16).reshape(-1).copy()).view(torch.bfloat16).double().numpy().reshape(a.shape)
    return a.astype(np.float64)


def from_f64(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(torch.bfloat16).view(torch.uint16).numpy().copy()
    return x.astype(SUPPORTED[dtype])


def tiny(dtype: str) -> float:
    """The smallest subnormal: the absolute rounding error of a result in the subnormal range."""
    return {"float32": 2.0**-149, "float64": 5e-324, "float16": 2.0**-24, "bfloat16": 2.0**-133}[dtype]


def big(dtype: str) -> float:
    """Magnitudes below this stay finite in the dtype whatever the order of operations."""
    return {"float32": 1e37, "float64": 1e300, "float16": 3e4, "bfloat16": 1e37}[dtype]


def eps(dtype: str) -> float:
    return {"float32": 2.0**-23, "float64": 2.0**-52, "float16": 2.0**-10, "bfloat16": 2.0**-7}[dtype]


# name -> (argument kinds in order: "r" read, "w" written, "v" written and non-negative), scalars
KERNELS = {
    "sum_of_squares": ("r", {}),
    "sum_of_squares_adaptive": ("rr", {"eta": 0.01}),
    "perturb": ("wrw", {"scale": 0.3}),
    "perturb_adaptive": ("wrw", {"scale": 0.3, "eta": 0.01}),
    "copy": ("rw", {}),
    "dot": ("rr", {}),
    "axpby": ("rw", {"alpha": 0.5, "beta": -1.25}),
    "any_nonzero": ("r", {}),
    "restore_sgd": ("wrrw", {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}),
    "restore_adam": ("wrrwv", {"step": 2.0, "lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8}),
}


@st.composite
def core_case(draw):
    name = draw(st.sampled_from(sorted(KERNELS)))
    kinds, scalars = KERNELS[name]
    dtype = draw(st.sampled_from(sorted(SUPPORTED)))
    count = draw(st.integers(0, 4))
    dims = st.integers(0, 4) | st.sampled_from([7, 33])
    shapes = [tuple(draw(st.lists(dims, min_size=0, max_size=3))) for _ in range(count)]
    if count and draw(st.integers(0, 9)) == 0:  # beyond one chunk: the parallel path
        shapes[0] = (draw(st.integers(_core.CHUNK + 1, 3 * _core.CHUNK)),)
    seed = draw(st.integers(0, 2**32 - 1))
    special_rate = draw(st.sampled_from([0.0, 0.02, 0.3]))
    defect = draw(
        st.sampled_from(
            [None] * 6
            + ["noncontiguous", "misaligned", "readonly", "alias", "shape", "count", "mixed", "unsupported", "item", "str"]
        )
    )
    where = draw(st.integers(0, len(kinds) - 1))
    as_single = count == 1 and draw(st.booleans())  # a bare ndarray instead of a list of one
    return name, dtype, shapes, seed, special_rate, defect, where, as_single


def random_array(rng, shape, dtype, special_rate, nonneg=False):
    x = rng.standard_normal(shape) * rng.choice([1e-3, 1.0, 50.0])
    if special_rate:
        mask = rng.random(shape) < special_rate
        x = np.where(mask, rng.choice(SPECIALS, size=shape), x)
    if nonneg:
        x = np.abs(x)
    return np.ascontiguousarray(from_f64(np.asarray(x, dtype=np.float64), dtype))


def misaligned(a: np.ndarray) -> np.ndarray:
    raw = bytearray(a.nbytes + 1)
    out = np.frombuffer(raw, dtype=a.dtype, count=a.size, offset=1).reshape(a.shape)
    out[...] = a
    return out


def noncontiguous(a: np.ndarray) -> np.ndarray:
    base = np.empty(a.shape[:-1] + (2 * a.shape[-1],), a.dtype) if a.ndim else np.empty(2, a.dtype)
    view = base[..., ::2] if a.ndim else base[::2]
    if a.ndim:
        view[...] = a
    return view


def expected_violation(args, kinds):
    """Whether the call must be refused, judged from the arrays themselves."""
    lists = [a if isinstance(a, (list, tuple)) else [a] for a in args]
    if any(not isinstance(x, np.ndarray) for lst in lists for x in lst) or any(isinstance(a, str) for a in args):
        return True
    if len({len(lst) for lst in lists}) > 1:
        return True
    flat = [(x, k) for lst, k in zip(lists, kinds) for x in lst]
    dtypes = {x.dtype for x, _ in flat}
    if any(d not in [np.dtype(t) for t in SUPPORTED.values()] or not d.isnative for d in dtypes) or len(dtypes) > 1:
        return True
    for i in range(len(lists[0])):
        if len({lst[i].shape for lst in lists}) > 1:
            return True
    for x, k in flat:
        if not x.flags.c_contiguous or not x.flags.aligned or (k in "wv" and not x.flags.writeable):
            return True
    for i, (x, k) in enumerate(flat):
        for j, (y, k2) in enumerate(flat):
            if i < j and (k in "wv" or k2 in "wv") and x.size and y.size and np.may_share_memory(x, y):
                return True
    return False


def call_kernel(name, args, scalars):
    fn = getattr(_core, name)
    if name == "restore_adam":
        return fn(*args, None, **scalars)
    if name == "restore_sgd":
        return fn(*args, **scalars)
    return fn(*args, *scalars.values())


def check_result(name, dtype, before, args, result):
    """`before`: float64 copies of the (valid) inputs as lists of arrays; `args`: after the call."""
    lists = [a if isinstance(a, (list, tuple)) else [a] for a in args]
    after = [[to_f64(x, dtype) for x in lst] for lst in lists]
    tol = eps(dtype)
    if name == "sum_of_squares":
        ref = sum(float(np.sum(x * x)) for x in before[0])
        np.testing.assert_allclose(result, ref, rtol=1e-9, atol=0)
    elif name == "dot":
        terms = [x * y for x, y in zip(before[0], before[1])]
        ref = sum(float(np.sum(t)) for t in terms)
        if math.isfinite(ref):
            scale = sum(float(np.sum(np.abs(t))) for t in terms)
            assert abs(result - ref) <= 1e-9 * scale
        else:
            assert math.isnan(ref) and math.isnan(result) or result == ref
    elif name == "sum_of_squares_adaptive":
        ref = sum(float(np.sum(((np.abs(w) + 0.01) * g) ** 2)) for w, g in zip(before[0], before[1]))
        np.testing.assert_allclose(result, ref, rtol=1e-5 if dtype != "float64" else 1e-9)
    elif name == "any_nonzero":
        assert result == [bool(np.any((x != 0) | np.isnan(x))) for x in before[0]]
    elif name == "copy":
        for got, ref in zip(after[1], before[0]):  # dst: src bit for bit
            np.testing.assert_array_equal(got, ref)
    elif name in ("perturb", "perturb_adaptive"):
        for b, w0 in zip(after[2], before[0]):  # backups: bit for bit
            np.testing.assert_array_equal(b, w0)
        if name == "perturb":
            refs = [w + 0.3 * g for w, g in zip(before[0], before[1])]
            mags = [np.abs(w) + np.abs(0.3 * g) for w, g in zip(before[0], before[1])]
        else:
            refs = [w + 0.3 * (np.abs(w) + 0.01) ** 2 * g for w, g in zip(before[0], before[1])]
            mags = [np.abs(w) + np.abs(0.3 * (np.abs(w) + 0.01) ** 2 * g) for w, g in zip(before[0], before[1])]
        for i, (got, ref) in enumerate(zip(after[0], refs)):
            finite = np.isfinite(ref) & np.isfinite(mags[i]) & (mags[i] < big(dtype))
            assert not np.isfinite(got[~np.isfinite(ref)]).any()
            assert np.all(np.abs(got - ref)[finite] <= 4 * tol * mags[i][finite] + tiny(dtype))
    elif name == "axpby":
        for got, x, y in zip(after[1], before[0], before[1]):
            ref = 0.5 * x - 1.25 * y
            mag = np.abs(0.5 * x) + np.abs(1.25 * y)
            finite = np.isfinite(ref) & np.isfinite(mag) & (mag < big(dtype))
            assert not np.isfinite(got[~np.isfinite(ref)]).any()
            assert np.all(np.abs(got - ref)[finite] <= 4 * tol * mag[finite] + tiny(dtype))
    # restore_sgd / restore_adam: values checked against torch in the SAM fuzz and test_kernels.


@settings(max_examples=CORE_CASES, **COMMON)
@given(core_case())
def test_core_kernels_never_crash(case):
    name, dtype, shapes, seed, special_rate, defect, where, as_single = case
    kinds, scalars = KERNELS[name]
    rng = np.random.default_rng(seed)
    args = [[random_array(rng, s, dtype, special_rate, nonneg=(k == "v")) for s in shapes] for k in kinds]
    if defect == "count":
        args[where] = (
            args[where] + [random_array(rng, (2,), dtype, 0)]
            if args[where] and where % 2
            else args[where][:-1] or [random_array(rng, (3,), dtype, 0)]
        )
    elif defect == "str":
        args[where] = "weights"
    elif shapes and defect is not None:
        i = int(rng.integers(len(shapes)))
        x = args[where][i]
        if defect == "noncontiguous":
            args[where][i] = noncontiguous(x)
        elif defect == "misaligned":
            args[where][i] = misaligned(x)
        elif defect == "readonly":
            x.setflags(write=False)
        elif defect == "alias":
            other = (where + 1 + int(rng.integers(max(len(kinds) - 1, 1)))) % len(kinds)
            args[where][i] = args[other][i]
        elif defect == "shape":
            args[where][i] = random_array(rng, x.shape + (2,), dtype, 0)
        elif defect == "mixed":
            other = "float64" if dtype != "float64" else "float32"
            args[where][i] = random_array(rng, x.shape, other, 0)
        elif defect == "unsupported":
            args[where][i] = np.zeros(x.shape, UNSUPPORTED[int(rng.integers(len(UNSUPPORTED)))])
        elif defect == "item":
            # (a lone None as `backups` of restore_sgd/restore_adam is valid: the in-place step)
            optional = as_single and where == 1 and name in ("restore_sgd", "restore_adam")
            args[where][i] = [0.0] * max(x.size, 1) if rng.random() < 0.5 or optional else None
    if as_single:
        args = [a[0] if isinstance(a, list) and len(a) == 1 else a for a in args]
    must_fail = expected_violation(args, kinds)
    arrays = [x for a in args if isinstance(a, (list, tuple)) for x in a if isinstance(x, np.ndarray)]
    arrays += [a for a in args if isinstance(a, np.ndarray)]
    if not must_fail and defect == "mixed" and arrays:
        # The only array of the call was replaced: its dtype is the call's dtype.
        dtype = {np.dtype(v): k for k, v in SUPPORTED.items()}[arrays[0].dtype]
    snapshot = [x.copy() for x in arrays]
    before = None
    if not must_fail:
        before = [[to_f64(x, dtype) for x in (a if isinstance(a, list) else [a])] for a in args]
    try:
        result = call_kernel(name, args, scalars)
    except (TypeError, ValueError) as e:
        # An empty array at an odd address: numpy calls it aligned, the binding refuses it (either
        # is fine: it holds nothing to misread).
        empty_odd = [x for x in arrays if x.size == 0 and x.ctypes.data % x.itemsize]
        assert must_fail or (empty_odd and "not aligned" in str(e)), f"{name} refused a valid call: {e}"
        for x, s in zip(arrays, snapshot):  # nothing written
            assert np.ascontiguousarray(x).tobytes() == s.tobytes(), f"{name} wrote before refusing: {e}"
        return
    assert not must_fail, f"{name} accepted an invalid call (defect {defect})"
    with np.errstate(all="ignore"):
        check_result(name, dtype, before, args, result)


def test_core_empty_lists():
    for name, (kinds, scalars) in KERNELS.items():
        result = call_kernel(name, [[] for _ in kinds], scalars)
        if name in ("sum_of_squares", "sum_of_squares_adaptive", "dot"):
            assert result == 0.0
        elif name == "any_nonzero":
            assert result == []


# ------------------------------------------------------------------------------------------- SAM


@st.composite
def sam_case(draw):
    n = draw(st.integers(1, 6))
    tensors = []
    for _ in range(n):
        shape = tuple(draw(st.lists(st.integers(1, 5), min_size=0, max_size=3)))
        tensors.append(
            dict(
                shape=shape,
                dtype=draw(st.sampled_from([torch.float32, torch.float32, torch.float64])),
                frozen=draw(st.integers(0, 7)) == 0,
                group=draw(st.integers(0, 1)),
                # per step: "normal", "none" (no gradient), "zero", "nan", "inf", "tiny"
                grads=[draw(st.sampled_from(["normal"] * 6 + ["none", "zero", "nan", "inf", "tiny"])) for _ in range(4)],
            )
        )
    base = draw(st.sampled_from(["sgd", "sgd", "adam", "adamw"]))
    if base == "sgd":
        momentum = draw(st.sampled_from([0.0, 0.9]))
        kw = dict(
            lr=draw(st.sampled_from([0.1, 0.01])),
            momentum=momentum,
            weight_decay=draw(st.sampled_from([0.0, 0.01])),
            dampening=draw(st.sampled_from([0.0, 0.1])) if momentum else 0.0,
            nesterov=False,
            maximize=draw(st.booleans()),
        )
        if momentum and not kw["dampening"]:
            kw["nesterov"] = draw(st.booleans())  # torch: Nesterov needs momentum and no dampening
    else:
        kw = dict(lr=1e-2, weight_decay=draw(st.sampled_from([0.0, 0.01])), amsgrad=draw(st.booleans()))
    rhos = [draw(st.sampled_from([0.05, 0.5, 0.0])) for _ in range(2)]
    adaptive = [draw(st.booleans()) for _ in range(2)]
    assign = draw(st.sampled_from(["copy", "assign"]))  # write into the views, or replace them
    seed = draw(st.integers(0, 2**31 - 1))
    return tensors, base, kw, rhos, adaptive, assign, seed


BASES = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def make_grad(kind, shape, dtype, gen):
    g = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    if kind == "zero":
        return torch.zeros(shape, dtype=dtype)
    if kind == "tiny":
        return g * 1e-30
    if kind in ("nan", "inf"):
        g.view(-1)[0] = math.nan if kind == "nan" else -math.inf
    return g


@settings(max_examples=SAM_CASES, **COMMON)
@given(sam_case())
def test_sam_matches_per_tensor_reference(case):
    tensors, base, kw, rhos, adaptive, assign, seed = case
    gen = torch.Generator().manual_seed(seed)
    mine = [torch.randn(t["shape"], generator=gen, dtype=torch.float64).to(t["dtype"]) for t in tensors]
    ref = [p.clone() for p in mine]
    for p, q, t in zip(mine, ref, tensors):
        p.requires_grad_(not t["frozen"])
        q.requires_grad_(not t["frozen"])
    groups_mine = [
        {"params": [p for p, t in zip(mine, tensors) if t["group"] == g], "sam_rho": rhos[g], "sam_adaptive": adaptive[g]}
        for g in range(2)
    ]
    groups_mine = [g for g in groups_mine if g["params"]]
    groups_ref = [{"params": [q for q, t in zip(ref, tensors) if t["group"] == g]} for g in range(2)]
    groups_ref = [g for g in groups_ref if g["params"]]
    opt = sharpness.SAM(groups_mine, BASES[base], rho=0.05, eta=0.01, foreach=False, **kw)
    ref_opt = BASES[base](groups_ref, foreach=False, **kw)
    sign = -1.0 if kw.get("maximize") else 1.0

    for step in range(2):
        g1 = [
            None
            if t["frozen"] or t["grads"][2 * step] == "none"
            else make_grad(t["grads"][2 * step], t["shape"], t["dtype"], gen)
            for t in tensors
        ]
        g2 = [
            None
            if t["frozen"] or t["grads"][2 * step + 1] == "none"
            else make_grad(t["grads"][2 * step + 1], t["shape"], t["dtype"], gen)
            for t in tensors
        ]
        # sharpness: gradients written into its views or assigned as fresh tensors
        opt.zero_grad()
        for p, g in zip(mine, g1):
            if g is not None:
                if assign == "copy" and p.grad is not None:
                    p.grad.copy_(g)
                else:
                    p.grad = g.clone()
        w0 = [p.detach().clone() for p in mine]
        assert opt.first_step() is True
        # reference perturbation: global float64 norm over the tensors with a gradient
        # A zero written into a zero gradient view is indistinguishable from no gradient (it
        # counts as none); an assigned tensor is a gradient, zero or not (torch's view): with
        # ASAM its (|w|+η)·0 is NaN for a NaN weight, and the whole perturbation is skipped.
        live1 = [g is not None and (assign == "assign" or bool((g != 0).any())) for g in g1]
        total = 0.0
        for q, g, t, live in zip(ref, g1, tensors, live1):
            if live and rhos[t["group"]] != 0:  # groups with rho = 0 are outside the norm (docs/guide.md)
                a = adaptive[t["group"]]
                v = ((q.detach().abs() + 0.01) * g) if a else g
                total += float((v.double() ** 2).sum())
        norm = math.sqrt(total)
        with torch.no_grad():
            for p, q, g, t, live in zip(mine, w0, g1, tensors, live1):
                if not math.isfinite(norm) or not live or rhos[t["group"]] == 0:
                    # a non-finite norm / no gradient / rho=0 leaves the weights as they are
                    torch.testing.assert_close(p, q, rtol=0, atol=0, equal_nan=True)
                    continue
                e = g.double() * (sign * rhos[t["group"]] / (norm + 1e-12))
                if adaptive[t["group"]]:
                    e = e * (q.double().abs() + 0.01) ** 2
                expect = (q.double() + e).to(t["dtype"])
                # ‖g‖ is global: float32 terms of the norm limit every tensor's e to ~1e-7
                tol = 1e-5 if t["dtype"] == torch.float32 else 1e-12
                torch.testing.assert_close(p, expect, rtol=tol, atol=1e-6 * float(e.abs().max()) + 1e-30, equal_nan=True)
        # second gradients, after zero_grad() as in a training loop (absent: left as zero views)
        opt.zero_grad()
        for p, g in zip(mine, g2):
            if g is None:
                continue
            if assign == "copy" and p.grad is not None:
                p.grad.copy_(g)
            else:
                p.grad = g.clone()
        opt.second_step()
        # reference: the weights were restored (ref never moved), then the base step per tensor
        ref_opt.zero_grad()
        for q, g in zip(ref, g2):
            # Written into the view, an all-zero gradient is no gradient (nothing told the view from
            # a zeroed one); assigned as a tensor it is a gradient, as for torch (weight decay, state).
            absent = g is None or (assign == "copy" and not bool((g != 0).any()))
            q.grad = None if absent else g.clone()
        ref_opt.step()
        for i, (p, q, t) in enumerate(zip(mine, ref, tensors)):
            tol = 1e-6 if t["dtype"] == torch.float32 else 1e-14
            torch.testing.assert_close(
                p.detach(), q.detach(), rtol=tol, atol=tol, equal_nan=True, msg=lambda m: f"tensor {i} step {step}: {m}"
            )


def test_zero_view_with_a_frozen_parameter_gets_no_weight_decay():
    p = torch.nn.Parameter(torch.tensor(1.5))
    frozen = torch.nn.Parameter(torch.tensor(2.0), requires_grad=False)
    opt = sharpness.SAM([p, frozen], torch.optim.SGD, rho=0.05, lr=0.1, weight_decay=0.01)
    opt.zero_grad()
    p.grad.copy_(torch.tensor(0.7))
    opt.first_step(zero_grad=True)
    opt.second_step()  # no second gradient: torch's SGD would skip p, leaving 1.5
    assert p.item() == 1.5, p.item()  # got 1.4985 = 1.5 * (1 - 0.1 * 0.01)


def test_zero_view_after_a_nonfinite_norm_gets_no_weight_decay():
    a = torch.nn.Parameter(torch.tensor(1.0))
    b = torch.nn.Parameter(torch.tensor(1.0))
    opt = sharpness.SAM([a, b], torch.optim.SGD, rho=0.05, lr=0.1, weight_decay=0.01)
    opt.zero_grad()
    a.grad.copy_(torch.tensor(math.nan))  # non-finite norm: no perturbation
    opt.first_step(zero_grad=True)
    a.grad.copy_(torch.tensor(0.5))  # b gets no second gradient
    opt.second_step()
    assert b.item() == 1.0, b.item()  # got 0.999 = 1 * (1 - 0.1 * 0.01)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_asam_norm_ignores_nonfinite_weights_without_gradient(bad):
    a = torch.nn.Parameter(torch.tensor([bad]))
    b = torch.nn.Parameter(torch.tensor([1.0]))
    opt = sharpness.SAM([a, b], torch.optim.SGD, rho=0.05, adaptive=True, eta=0.01, lr=0.1)
    opt.zero_grad()
    b.grad = torch.tensor([0.5])  # `a` gets no gradient
    opt.first_step()
    assert opt.last_grad_norm == pytest.approx(1.01 * 0.5), opt.last_grad_norm  # got nan
    assert b.item() == pytest.approx(1.0 + 0.05 * 1.01), b.item()  # got 1.0: not perturbed


# ------------------------------------------------------------------ duplicate and empty groups


def test_duplicate_params_across_groups_error_is_clear():
    p, q = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2))
    with pytest.raises(ValueError, match="more than one parameter group"):
        sharpness.SAM([{"params": [p]}, {"params": [q, p]}], torch.optim.SGD, lr=0.1)


def test_duplicate_param_in_one_group_is_refused_or_matches_torch():
    p = torch.nn.Parameter(torch.tensor([1.0]))
    r = torch.nn.Parameter(torch.tensor([1.0]))
    with pytest.warns(UserWarning, match="duplicate parameters"):
        ref = torch.optim.SGD([r, r], lr=0.1, foreach=False)
    r.grad = torch.tensor([1.0])
    ref.step()  # torch steps the parameter once per listing: 1 - 2·0.1·1 = 0.8
    try:
        with pytest.warns(UserWarning, match="duplicate parameters"):
            opt = sharpness.SAM([p, p], torch.optim.SGD, rho=0.0, lr=0.1)
    except ValueError as e:
        assert "duplicate" in str(e) or "more than once" in str(e), e
        return
    opt.zero_grad()
    p.grad = torch.tensor([1.0])
    opt.first_step(zero_grad=True)
    p.grad = torch.tensor([1.0])
    opt.second_step()
    assert p.item() == r.item(), (p.item(), r.item(), dict(opt.stats))  # got 0.9 vs 0.8


@st.composite
def groups_with_empty_ones(draw):
    sizes = draw(st.lists(st.lists(st.integers(1, 6), min_size=0, max_size=3), min_size=1, max_size=4))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    rhos = [draw(st.sampled_from([0.0, 0.05, 0.5])) for _ in sizes]
    adaptive = [draw(st.booleans()) for _ in sizes]
    momentum = draw(st.sampled_from([0.0, 0.9]))
    return sizes, dtype, rhos, adaptive, momentum, draw(st.integers(0, 2**31 - 1))


@settings(max_examples=max(SAM_CASES // 2, 20), **COMMON)
@given(groups_with_empty_ones())
def test_empty_param_groups_change_nothing(case):
    """Empty groups (alone, or between non-empty ones) are accepted and change no result: SAM with
    them equals SAM on the same non-empty groups, bit for bit; all groups empty: steps are no-ops."""
    sizes, dtype, rhos, adaptive, momentum, seed = case
    gen = torch.Generator().manual_seed(seed)
    init = [[torch.randn(n, generator=gen, dtype=torch.float64).to(dtype) for n in group] for group in sizes]
    grads = [[[torch.randn(n, generator=gen, dtype=torch.float64).to(dtype) for n in group] for group in sizes] for _ in range(4)]

    def run(keep_empty):
        params = [[torch.nn.Parameter(t.clone()) for t in group] for group in init]
        groups = [
            {"params": ps, "sam_rho": rho, "sam_adaptive": a}
            for ps, rho, a in zip(params, rhos, adaptive)
            if ps or keep_empty
        ]
        if not groups:
            return params, None
        opt = sharpness.SAM(groups, torch.optim.SGD, lr=0.1, momentum=momentum)
        for step in range(2):
            for half in range(2):
                opt.zero_grad()
                for ps, gs in zip(params, grads[2 * step + half]):
                    for p, g in zip(ps, gs):
                        p.grad = g.clone()
                opt.first_step() if half == 0 else opt.second_step()
        return params, opt

    with_empty, opt = run(True)
    without, _ = run(False)
    for ps, qs, _ts in zip(with_empty, without, init):
        for p, q in zip(ps, qs):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=0)
    if opt is not None and not any(sizes):
        assert opt.stats["steps"] == 2
