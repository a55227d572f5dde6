"""Triton kernels for SAM's memory passes on CUDA tensors, with the contract of the Rust kernels.

Each pass exists in two forms: over one flat buffer (``*_flat``: one contiguous tensor, or a
contiguous slice of one) and over a list of tensors (``*_multi``: one launch for the whole list,
each program finding its tensor in a block table, as torch's multi-tensor apply does). The launch
wrappers at the bottom (:func:`sum_of_squares`, :func:`perturb`, :func:`restore`,
:func:`restore_sgd`, :func:`restore_adam`) take a tensor (flat form) or a list (multi form).

Numerics, shared with ``rust/kernels``:

- Weights, gradients and state are fp32, bf16 or fp16; every value is loaded into fp32, computed
  on in fp32 and rounded once to nearest-even when stored (bf16 by integer rounding of the fp32
  bits, so that Triton's interpreter, whose casts to bf16 truncate, gives the GPU's results).
  Kernels are launched with ``enable_fp_fusion=False`` so ``a*b + c`` is two roundings, as on the
  CPU: the same inputs give the Rust kernels' bits.
- Sums of squares square and accumulate in fp64 (a product of two fp32 values is exact in fp64),
  in a fixed order: each program reduces a fixed chunk into one fp64 partial, and one program
  adds the partials in order (deterministic, no atomics). The result stays on the device.
- Host scalars that the Rust side rounds to f32 are passed as Python floats (fp32 arguments); the
  few that must stay fp64 (ρ, ε, η of the norm, lr of Adam's step size) are passed as the int64
  bit pattern of the double and bit-cast in the kernel, so both the compiler and the interpreter
  see the exact value. No scalar arithmetic happens inside a kernel between two host scalars.
- The perturbation reads the global norm from a 0-d fp64 device tensor: ``scale = ρ/(norm + ε)``
  is computed per program, and a non-finite norm gives no perturbation at all (``w`` is written
  back unchanged; the backup is still written), so a NaN never reaches the weights and the host
  never has to look at the norm.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

#: Elements per program (and per loop iteration of the reductions).
BLOCK = 1024
#: Loop iterations of one sum-of-squares program: each fp64 partial covers ``BLOCK * ITERS``.
SUM_ITERS = 16
_WARPS = 4

Tensors = Tensor | Sequence[Tensor]


def f64_bits(x: float) -> int:
    """The bit pattern of a double as a signed int64 (bit-cast back in the kernels)."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def f32(x: float) -> float:
    """``x`` rounded to the nearest float32 (as Rust's ``as f32`` and Triton's fp32 arguments do)."""
    return struct.unpack("<f", struct.pack("<f", float(x)))[0]


# -- element helpers -----------------------------------------------------------------------------


@triton.jit
def _f64(bits):
    """A double passed as its int64 bit pattern."""
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def _ld(ptr, offs, mask):
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _rne(x, DTYPE: tl.constexpr):
    """fp32 -> DTYPE, round to nearest even (bf16 through the bits, as the `half` crate does)."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        up = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        up = tl.where(x != x, (bits >> 16) | 0x40, up)  # NaN stays NaN, quiet
        return up.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def _st(ptr, offs, x, mask):
    tl.store(ptr + offs, _rne(x, ptr.dtype.element_ty), mask=mask)


@triton.jit
def _max_nan(a, b):
    r = tl.where(b > a, b, a)
    r = tl.where(b != b, b, r)
    return tl.where(a != a, a, r)


@triton.jit
def _flat_offsets(n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < n


@triton.jit
def _multi_locate(table, BLOCK: tl.constexpr):
    """(tensor index, element offsets, mask) of this program in a multi-tensor launch.
    ``table`` rows: (tensor index, first element, tensor length) per block."""
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(table + 3 * pid)
    start = tl.load(table + 3 * pid + 1)
    n = tl.load(table + 3 * pid + 2)
    offs = start + tl.arange(0, BLOCK)
    return t, offs, offs < n


@triton.jit
def _arg(base, shifts, k, t, n_tensors):
    """Pointer to tensor ``t`` of list argument ``k``: its base plus a precomputed element shift."""
    return base + tl.load(shifts + k * n_tensors + t)


# -- sum of squares (two stages) -------------------------------------------------------------------


@triton.jit
def _sumsq_body(g, w, offs, mask, eta_bits, ADAPTIVE: tl.constexpr):
    x = tl.load(g + offs, mask=mask, other=0.0).to(tl.float64)
    if ADAPTIVE:
        t = tl.abs(tl.load(w + offs, mask=mask, other=0.0).to(tl.float64)) + _f64(eta_bits)
        x = t * x
    return x * x


@triton.jit
def _sumsq_flat(g, w, partials, n, eta_bits, ADAPTIVE: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for k in tl.static_range(ITERS):
        offs = (pid * ITERS + k) * BLOCK + tl.arange(0, BLOCK)
        acc += _sumsq_body(g, w, offs, offs < n, eta_bits, ADAPTIVE)
    tl.store(partials + pid, tl.sum(acc, axis=0))


@triton.jit
def _sumsq_multi(g, w, shifts, n_tensors, table, partials, eta_bits, ADAPTIVE: tl.constexpr, BLOCK: tl.constexpr):
    t, offs, mask = _multi_locate(table, BLOCK)
    x = _sumsq_body(_arg(g, shifts, 0, t, n_tensors), _arg(w, shifts, 1, t, n_tensors), offs, mask, eta_bits, ADAPTIVE)
    tl.store(partials + tl.program_id(0), tl.sum(x, axis=0))


@triton.jit
def _sum_in_order(partials, out, n, BLOCK: tl.constexpr):
    """out[0] = Σ partials, one program, fixed order."""
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(partials + offs, mask=offs < n, other=0.0)
    tl.store(out, tl.sum(acc, axis=0))


# -- perturbation and restoration --------------------------------------------------------------------


@triton.jit
def _perturb_body(w, g, b, offs, mask, norm, rho_bits, eps_bits, eta, ADAPTIVE: tl.constexpr):
    nrm = tl.load(norm).to(tl.float64)
    finite = (nrm - nrm) == 0.0  # false for inf and NaN
    scale = tl.where(finite, _f64(rho_bits) / (nrm + _f64(eps_bits)), 0.0).to(tl.float32)
    raw = tl.load(w + offs, mask=mask, other=0.0)
    tl.store(b + offs, raw, mask=mask)
    x = raw.to(tl.float32)
    grad = _ld(g, offs, mask)
    if ADAPTIVE:
        t = tl.abs(x) + eta
        y = x + t * t * grad * scale
    else:
        y = x + scale * grad
    tl.store(w + offs, tl.where(finite, _rne(y, w.dtype.element_ty), raw), mask=mask)


@triton.jit
def _perturb_flat(w, g, b, n, norm, rho_bits, eps_bits, eta, ADAPTIVE: tl.constexpr, BLOCK: tl.constexpr):
    offs, mask = _flat_offsets(n, BLOCK)
    _perturb_body(w, g, b, offs, mask, norm, rho_bits, eps_bits, eta, ADAPTIVE)


@triton.jit
def _perturb_multi(
    w, g, b, shifts, n_tensors, table, norm, rho_bits, eps_bits, eta, ADAPTIVE: tl.constexpr, BLOCK: tl.constexpr
):
    t, offs, mask = _multi_locate(table, BLOCK)
    _perturb_body(
        _arg(w, shifts, 0, t, n_tensors),
        _arg(g, shifts, 1, t, n_tensors),
        _arg(b, shifts, 2, t, n_tensors),
        offs,
        mask,
        norm,
        rho_bits,
        eps_bits,
        eta,
        ADAPTIVE,
    )


@triton.jit
def _copy_flat(dst, src, n, BLOCK: tl.constexpr):
    offs, mask = _flat_offsets(n, BLOCK)
    tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)


@triton.jit
def _copy_multi(dst, src, shifts, n_tensors, table, BLOCK: tl.constexpr):
    t, offs, mask = _multi_locate(table, BLOCK)
    d = _arg(dst, shifts, 0, t, n_tensors)
    tl.store(d + offs, tl.load(_arg(src, shifts, 1, t, n_tensors) + offs, mask=mask), mask=mask)


# -- restoration fused with torch.optim.SGD ------------------------------------------------------------


@triton.jit
def _sgd_body(
    w, src, g, buf, offs, mask, neg_lr, momentum, one_minus_dampening, weight_decay,
    HAS_SRC: tl.constexpr, MOMENTUM: tl.constexpr, INIT: tl.constexpr, NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr, DECAY: tl.constexpr,
):  # fmt: skip
    if HAS_SRC:
        p = _ld(src, offs, mask)
    else:
        p = _ld(w, offs, mask)
    d = _ld(g, offs, mask)
    if MAXIMIZE:
        d = -d
    if DECAY:
        d = d + weight_decay * p
    if MOMENTUM:
        if INIT:
            m = d
        else:
            m = _ld(buf, offs, mask) * momentum + one_minus_dampening * d
        m_stored = _rne(m, buf.dtype.element_ty)
        tl.store(buf + offs, m_stored, mask=mask)
        m = m_stored.to(tl.float32)  # torch reads the buffer back in the parameter's dtype
        if NESTEROV:
            d = d + momentum * m
        else:
            d = m
    _st(w, offs, p + neg_lr * d, mask)


@triton.jit
def _sgd_flat(
    w, src, g, buf, n, neg_lr, momentum, one_minus_dampening, weight_decay,
    HAS_SRC: tl.constexpr, MOMENTUM: tl.constexpr, INIT: tl.constexpr, NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr, DECAY: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    offs, mask = _flat_offsets(n, BLOCK)
    _sgd_body(
        w, src, g, buf, offs, mask, neg_lr, momentum, one_minus_dampening, weight_decay,
        HAS_SRC, MOMENTUM, INIT, NESTEROV, MAXIMIZE, DECAY,
    )  # fmt: skip


@triton.jit
def _sgd_multi(
    w, src, g, buf, shifts, n_tensors, table, neg_lr, momentum, one_minus_dampening, weight_decay,
    HAS_SRC: tl.constexpr, MOMENTUM: tl.constexpr, INIT: tl.constexpr, NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr, DECAY: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    t, offs, mask = _multi_locate(table, BLOCK)
    _sgd_body(
        _arg(w, shifts, 0, t, n_tensors), _arg(src, shifts, 1, t, n_tensors), _arg(g, shifts, 2, t, n_tensors),
        _arg(buf, shifts, 3, t, n_tensors), offs, mask, neg_lr, momentum, one_minus_dampening, weight_decay,
        HAS_SRC, MOMENTUM, INIT, NESTEROV, MAXIMIZE, DECAY,
    )  # fmt: skip


# -- restoration fused with torch.optim.Adam / AdamW -------------------------------------------------------


@triton.jit
def _adam_body(
    w, src, g, m1, m2, vmax, offs, mask, powers, lr_bits, decay_factor, weight_decay, one_minus_beta1,
    lerp_one_minus_weight, beta2, one_minus_beta2, eps,
    HAS_SRC: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, COUPLED: tl.constexpr,
    DECOUPLED: tl.constexpr, LERP_LOW: tl.constexpr,
):  # fmt: skip
    # Bias corrections from the device step: powers = (beta1^step, beta2^step) in fp64.
    bias_correction1 = 1.0 - tl.load(powers).to(tl.float64)
    bias_correction2 = 1.0 - tl.load(powers + 1).to(tl.float64)
    neg_step_size = (-(_f64(lr_bits) / bias_correction1)).to(tl.float32)
    bias_correction2_sqrt = tl.sqrt(bias_correction2).to(tl.float32)
    if HAS_SRC:
        p = _ld(src, offs, mask)
    else:
        p = _ld(w, offs, mask)
    grad = _ld(g, offs, mask)
    if MAXIMIZE:
        grad = -grad
    if DECOUPLED:
        p = _rne(p * decay_factor, w.dtype.element_ty).to(tl.float32)
    if COUPLED:
        grad = grad + weight_decay * p
    m = _ld(m1, offs, mask)
    if LERP_LOW:  # torch's lerp: two formulas, chosen by the weight
        m = m + one_minus_beta1 * (grad - m)
    else:
        m = grad - (grad - m) * lerp_one_minus_weight
    m_stored = _rne(m, m1.dtype.element_ty)
    tl.store(m1 + offs, m_stored, mask=mask)
    v = _ld(m2, offs, mask) * beta2 + one_minus_beta2 * grad * grad
    v_stored = _rne(v, m2.dtype.element_ty)
    tl.store(m2 + offs, v_stored, mask=mask)
    second = v_stored.to(tl.float32)
    if AMSGRAD:
        vm_stored = _rne(_max_nan(_ld(vmax, offs, mask), second), vmax.dtype.element_ty)
        tl.store(vmax + offs, vm_stored, mask=mask)
        second = vm_stored.to(tl.float32)
    denom = tl.div_rn(tl.sqrt_rn(second), bias_correction2_sqrt) + eps
    _st(w, offs, p + tl.div_rn(neg_step_size * m_stored.to(tl.float32), denom), mask)


@triton.jit
def _adam_flat(
    w, src, g, m1, m2, vmax, n, powers, lr_bits, decay_factor, weight_decay, one_minus_beta1,
    lerp_one_minus_weight, beta2, one_minus_beta2, eps,
    HAS_SRC: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, COUPLED: tl.constexpr,
    DECOUPLED: tl.constexpr, LERP_LOW: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    offs, mask = _flat_offsets(n, BLOCK)
    _adam_body(
        w, src, g, m1, m2, vmax, offs, mask, powers, lr_bits, decay_factor, weight_decay, one_minus_beta1,
        lerp_one_minus_weight, beta2, one_minus_beta2, eps, HAS_SRC, AMSGRAD, MAXIMIZE, COUPLED, DECOUPLED, LERP_LOW,
    )  # fmt: skip


@triton.jit
def _adam_multi(
    w, src, g, m1, m2, vmax, shifts, n_tensors, table, powers, lr_bits, decay_factor, weight_decay, one_minus_beta1,
    lerp_one_minus_weight, beta2, one_minus_beta2, eps,
    HAS_SRC: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, COUPLED: tl.constexpr,
    DECOUPLED: tl.constexpr, LERP_LOW: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    t, offs, mask = _multi_locate(table, BLOCK)
    _adam_body(
        _arg(w, shifts, 0, t, n_tensors), _arg(src, shifts, 1, t, n_tensors), _arg(g, shifts, 2, t, n_tensors),
        _arg(m1, shifts, 3, t, n_tensors), _arg(m2, shifts, 4, t, n_tensors), _arg(vmax, shifts, 5, t, n_tensors),
        offs, mask, powers, lr_bits, decay_factor, weight_decay, one_minus_beta1, lerp_one_minus_weight, beta2,
        one_minus_beta2, eps, HAS_SRC, AMSGRAD, MAXIMIZE, COUPLED, DECOUPLED, LERP_LOW,
    )  # fmt: skip


# == launch wrappers ===============================================================================

_LAUNCH = dict(num_warps=_WARPS, enable_fp_fusion=False)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _flat_check(first: Tensor, *others: Tensor | None) -> int:
    for t in (first, *others):
        if t is None:
            continue
        if t.dim() != 1 or not t.is_contiguous():
            raise ValueError("flat buffers must be 1-d contiguous tensors")
        if t.numel() != first.numel() or t.dtype != first.dtype or t.device != first.device:
            raise ValueError("flat buffers of one call must share length, dtype and device")
    if first.dtype not in _DTYPES:
        raise TypeError(f"Triton kernels take {[str(d) for d in _DTYPES]}, got {first.dtype}")
    return first.numel()


class _Plan:
    """Block table and pointer shifts of one multi-tensor launch (cached: the lists of a training
    loop are the same tensors every step, and rebuilding the tables would copy host -> device)."""

    def __init__(self, lists: list[list[Tensor] | None]) -> None:
        first = lists[0]
        assert first is not None  # the wrappers' first list is a required argument
        sizes = [t.numel() for t in first]
        for lst in lists:
            if lst is None:
                continue
            if len(lst) != len(first):
                raise ValueError("the lists of one call must have the same number of tensors")
            for a, b in zip(lst, first):
                if a.numel() != b.numel() or a.dtype != b.dtype or a.device != b.device or not a.is_contiguous():
                    raise ValueError("aligned tensors must share size, dtype and device, and be contiguous")
        if first and first[0].dtype not in _DTYPES:
            raise TypeError(f"Triton kernels take {[str(d) for d in _DTYPES]}, got {first[0].dtype}")
        device = first[0].device if first else torch.device("cpu")
        rows = [(t, start, n) for t, n in enumerate(sizes) for start in range(0, n, BLOCK)]
        self.blocks = len(rows)
        self.table = torch.tensor(rows or [(0, 0, 0)], dtype=torch.int64).reshape(-1).to(device)
        self.bases: list[Tensor | None] = []
        shifts = []
        for lst in lists:
            if lst is None or not lst:
                self.bases.append(first[0] if first else None)  # never dereferenced
                shifts.append([0] * len(first))
                continue
            base, size = lst[0], lst[0].element_size()
            row = []
            for t in lst:
                delta = t.data_ptr() - base.data_ptr()
                if delta % size:
                    raise ValueError("tensors of one list must be aligned to their element size")
                row.append(delta // size)
            self.bases.append(base)
            shifts.append(row)
        self.shifts = torch.tensor(shifts, dtype=torch.int64).reshape(-1).to(device)
        self.n_tensors = len(first)
        # Nothing here holds the tensors: a plan depends only on their addresses and sizes (its
        # cache key), so it stays right for whatever tensors occupy them later.


_PLANS: dict[tuple, _Plan] = {}


def _plan(lists: list[Sequence[Tensor] | None]) -> _Plan:
    key = tuple(None if lst is None else tuple((t.data_ptr(), t.numel(), t.dtype) for t in lst) for lst in lists)
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) > 64:
            _PLANS.clear()
        plan = _PLANS[key] = _Plan([None if lst is None else list(lst) for lst in lists])
    return plan


def _pieces(first: Tensor, n: int) -> list[tuple[int, int]]:
    """(start, length) of up to three launches over a flat range: a head up to the first 16-byte
    boundary, a body whose length is a multiple of 16, and the tail. Triton specialises a launch
    on pointers being 16-byte aligned and on ``n`` being a multiple of 16, and only then emits
    128-bit loads and stores; a group's slice of a flat buffer is neither in general."""
    e = first.element_size()
    head = min((-(first.data_ptr() // e)) % (16 // e) if first.data_ptr() % e == 0 else 0, n)
    body = (n - head) // 16 * 16
    return [(a, k) for a, k in [(0, head), (head, body), (head + body, n - head - body)] if k]


def _launch_flat(kernel, tensors: list[Tensor], n: int, *scalars, **meta) -> None:
    """``kernel(*tensors, n, *scalars)`` over the pieces of the range (see :func:`_pieces`)."""
    for a, k in _pieces(tensors[0], n):
        kernel[(triton.cdiv(k, BLOCK),)](*[t[a : a + k] for t in tensors], k, *scalars, BLOCK=BLOCK, **meta, **_LAUNCH)


def _is_list(x: Tensors) -> bool:
    return not isinstance(x, Tensor)


def _flat(x: Tensors) -> Tensor:
    """``x`` in the flat form: every tensor argument of a call comes in the form of its first
    one, and the wrappers ask this only once a list form has returned."""
    assert isinstance(x, Tensor), "the tensor arguments of one call are all tensors or all lists"
    return x


def _flat_or_none(x: Tensors | None) -> Tensor | None:
    """An optional argument in the flat form (see :func:`_flat`)."""
    return None if x is None else _flat(x)


def _listed(x: Tensors | None) -> list[Tensor] | None:
    """An optional argument in the list form, as :func:`_plan` takes it."""
    return None if x is None else list(x)


def sum_of_squares_partials(grads: Tensors, weights: Tensors | None = None, eta: float | None = None) -> Tensor:
    """Stage 1: fp64 partial sums of ``g²`` (``((|w|+eta)·g)²`` when ``eta`` is given) as a device
    tensor; :func:`sum_partials` adds them in order."""
    assert eta is None or weights is not None, "eta needs the weights"
    adaptive = eta is not None
    eta_bits = f64_bits(0.0 if eta is None else eta)
    if _is_list(grads):
        plan = _plan([list(grads), _listed(weights) if adaptive else None])
        device = plan.table.device
        partials = torch.zeros(plan.blocks, dtype=torch.float64, device=device)
        if plan.blocks and plan.n_tensors:
            _sumsq_multi[(plan.blocks,)](
                plan.bases[0], plan.bases[1], plan.shifts, plan.n_tensors, plan.table, partials, eta_bits,
                ADAPTIVE=adaptive, BLOCK=BLOCK, **_LAUNCH,
            )  # fmt: skip
        return partials
    grads, weights = _flat(grads), _flat_or_none(weights)
    n = _flat_check(grads, weights if adaptive else None)
    pieces = _pieces(grads, n)
    counts = [triton.cdiv(k, BLOCK * SUM_ITERS) for _, k in pieces]
    partials = torch.empty(max(sum(counts), 1), dtype=torch.float64, device=grads.device)
    if not pieces:
        partials.zero_()
        return partials
    w = weights if adaptive and weights is not None else grads  # (weights is not None when adaptive)
    first = 0
    for (a, k), programs in zip(pieces, counts):
        _sumsq_flat[(programs,)](
            grads[a : a + k], w[a : a + k], partials[first:], k, eta_bits,
            ADAPTIVE=adaptive, BLOCK=BLOCK, ITERS=SUM_ITERS, **_LAUNCH,
        )  # fmt: skip
        first += programs
    return partials


def sum_partials(partials: Tensor, out: Tensor | None = None) -> Tensor:
    """Stage 2: ``Σ partials`` into a 0-d fp64 device tensor, in order (one program)."""
    if out is None:
        out = torch.empty((), dtype=torch.float64, device=partials.device)
    _sum_in_order[(1,)](partials, out, partials.numel(), BLOCK=BLOCK, **_LAUNCH)
    return out


def sum_of_squares(grads: Tensors, weights: Tensors | None = None, eta: float | None = None) -> Tensor:
    """``Σ g²`` (or ASAM's ``Σ ((|w|+eta)·g)²``) as a 0-d fp64 device tensor: no host sync."""
    return sum_partials(sum_of_squares_partials(grads, weights, eta))


def perturb(
    weights: Tensors, grads: Tensors, backups: Tensors, norm: Tensor, rho: float, eps: float, eta: float | None = None
) -> None:
    """``backups ← w; w ← w + s·g`` (``w + s·(|w|+eta)²·g`` when ``eta`` is given) with
    ``s = rho/(norm + eps)`` computed on the device from the 0-d tensor ``norm``; when ``norm`` is
    not finite the weights are left exactly as they are. A negative ``rho`` perturbs along ``−g``
    (a maximizing base optimizer)."""
    adaptive = eta is not None
    args = (norm, f64_bits(rho), f64_bits(eps), float(0.0 if eta is None else eta))
    if _is_list(weights):
        plan = _plan([list(weights), list(grads), list(backups)])
        if plan.blocks and plan.n_tensors:
            _perturb_multi[(plan.blocks,)](
                *plan.bases, plan.shifts, plan.n_tensors, plan.table, *args, ADAPTIVE=adaptive, BLOCK=BLOCK, **_LAUNCH
            )
        return
    weights, grads, backups = _flat(weights), _flat(grads), _flat(backups)
    n = _flat_check(weights, grads, backups)
    if n:
        _launch_flat(_perturb_flat, [weights, grads, backups], n, *args, ADAPTIVE=adaptive)


def copy(src: Tensors, dst: Tensors) -> None:
    """``dst ← src``, bit for bit (sources first, as ``_core.copy`` and the engines' ``copy``)."""
    if _is_list(dst):
        plan = _plan([list(dst), list(src)])
        if plan.blocks and plan.n_tensors:
            _copy_multi[(plan.blocks,)](*plan.bases, plan.shifts, plan.n_tensors, plan.table, BLOCK=BLOCK, **_LAUNCH)
        return
    dst, src = _flat(dst), _flat(src)
    n = _flat_check(dst, src)
    if n:
        _launch_flat(_copy_flat, [dst, src], n)


def restore_sgd(
    weights: Tensors,
    backups: Tensors | None,
    grads: Tensors,
    momentum_buffers: Tensors | None,
    *,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    init_momentum: bool = False,
) -> None:
    """Restore ``weights`` from ``backups`` (None: a plain step in place), then one
    ``torch.optim.SGD`` step with ``grads``; as ``sharpness._core.restore_sgd``."""
    use_momentum = momentum != 0.0
    if use_momentum and momentum_buffers is None:
        raise ValueError("momentum_buffers are required when momentum != 0")
    scalars = (float(-lr), float(momentum), float(1.0 - dampening), float(weight_decay))
    flags = dict(
        HAS_SRC=backups is not None, MOMENTUM=use_momentum, INIT=bool(init_momentum), NESTEROV=bool(nesterov),
        MAXIMIZE=bool(maximize), DECAY=weight_decay != 0.0,
    )  # fmt: skip
    if _is_list(weights):
        plan = _plan([list(weights), _listed(backups), list(grads), _listed(momentum_buffers) if use_momentum else None])
        if plan.blocks and plan.n_tensors:
            _sgd_multi[(plan.blocks,)](
                *plan.bases, plan.shifts, plan.n_tensors, plan.table, *scalars, **flags, BLOCK=BLOCK, **_LAUNCH
            )
        return
    weights, backups, grads = _flat(weights), _flat_or_none(backups), _flat(grads)
    bufs = _flat_or_none(momentum_buffers) if use_momentum else None
    n = _flat_check(weights, backups, grads, bufs)
    if n:
        tensors = [weights, weights if backups is None else backups, grads, weights if bufs is None else bufs]
        _launch_flat(_sgd_flat, tensors, n, *scalars, **flags)


_BETAS: dict[tuple, Tensor] = {}


def adam_powers(step: Tensor, beta1: float, beta2: float) -> Tensor:
    """``(beta1^step, beta2^step)`` in fp64 on the step's device (what the Adam kernels read), by
    one device op: no host sync, and a CUDA graph replays it with the current step. The betas
    are copied to the device once per (betas, device)."""
    key = (float(beta1), float(beta2), step.device)
    betas = _BETAS.get(key)
    if betas is None:
        betas = _BETAS[key] = torch.tensor([beta1, beta2], dtype=torch.float64).to(step.device)
    return torch.pow(betas, step.to(torch.float64))


def restore_adam(
    weights: Tensors,
    backups: Tensors | None,
    grads: Tensors,
    exp_avgs: Tensors,
    exp_avg_sqs: Tensors,
    max_exp_avg_sqs: Tensors | None = None,
    *,
    powers: Tensor,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float = 0.0,
    decoupled: bool = False,
    amsgrad: bool = False,
    maximize: bool = False,
) -> None:
    """Restore ``weights`` from ``backups`` (None: in place), then one ``torch.optim.Adam`` step
    (``AdamW`` with ``decoupled``); as ``sharpness._core.restore_adam`` except that the step count
    enters through ``powers`` = ``(beta1^step, beta2^step)``, an fp64 device tensor (see
    :func:`adam_powers`), so that it can change on the device."""
    if amsgrad and max_exp_avg_sqs is None:
        raise ValueError("max_exp_avg_sqs is required with amsgrad")
    one_minus_beta1 = f32(1.0 - beta1)
    # What the Rust kernel computes in f32 from that f32 (exact in f64, then rounded once).
    lerp_one_minus_weight = f32(1.0 - one_minus_beta1)
    scalars = (
        powers, f64_bits(lr), float(1.0 - lr * weight_decay), float(weight_decay), one_minus_beta1,
        lerp_one_minus_weight, float(beta2), float(1.0 - beta2), float(eps),
    )  # fmt: skip
    flags = dict(
        HAS_SRC=backups is not None, AMSGRAD=bool(amsgrad), MAXIMIZE=bool(maximize),
        COUPLED=weight_decay != 0.0 and not decoupled, DECOUPLED=weight_decay != 0.0 and bool(decoupled),
        LERP_LOW=abs(one_minus_beta1) < 0.5,
    )  # fmt: skip
    if _is_list(weights):
        plan = _plan([
            list(weights), _listed(backups), list(grads), list(exp_avgs), list(exp_avg_sqs),
            _listed(max_exp_avg_sqs) if amsgrad else None,
        ])  # fmt: skip
        if plan.blocks and plan.n_tensors:
            _adam_multi[(plan.blocks,)](
                *plan.bases, plan.shifts, plan.n_tensors, plan.table, *scalars, **flags, BLOCK=BLOCK, **_LAUNCH
            )
        return
    weights, backups, grads = _flat(weights), _flat_or_none(backups), _flat(grads)
    exp_avgs, exp_avg_sqs = _flat(exp_avgs), _flat(exp_avg_sqs)
    vmax = _flat_or_none(max_exp_avg_sqs) if amsgrad else None
    n = _flat_check(weights, backups, grads, exp_avgs, exp_avg_sqs, vmax)
    if n:
        tensors = [weights, weights if backups is None else backups, grads, exp_avgs, exp_avg_sqs,
                   exp_avg_sqs if vmax is None else vmax]  # fmt: skip
        _launch_flat(_adam_flat, tensors, n, *scalars, **flags)
