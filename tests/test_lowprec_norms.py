"""SAM's gradient norm over float16 and bfloat16 gradients is accumulated in float64 on every engine.

A float16 gradient whose elements are all finite can have a norm beyond float16's largest value
(65504): ‖g‖ = 70,711 must be reported as such, and the weights must move by ``ρ·g/‖g‖`` (ASAM:
``ρ·T²g/‖Tg‖``, ``T = |w| + η``), computed in float32 and rounded once to the weights' dtype, as
the Rust kernels do. The same for bfloat16, including gradients near bfloat16's (and float32's)
largest value, whose squares overflow float32. References are float64 computations from the
formulas. The Triton engine runs under ``TRITON_INTERPRET=1`` on CPU tensors; the DTensor engine
(FSDP2's parameters) in two gloo processes.
"""

from __future__ import annotations

import datetime
import importlib
import math
import os
import socket
import sys
import traceback
from collections import Counter

import pytest

os.environ["TRITON_INTERPRET"] = "1"

torch = pytest.importorskip("torch")
triton = pytest.importorskip("triton")

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

import sharpness  # noqa: E402
from sharpness.backends import triton_kernels as K  # noqa: E402
from sharpness.backends.torch_foreach import TorchEngine  # noqa: E402

if not isinstance(K._copy_flat, triton.runtime.interpreter.InterpretedFunction):
    importlib.reload(K)  # imported compiled by an earlier module: redefine under the interpreter

RHO, ETA, N = 0.5, 0.01, 64
DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16}
#: (mantissa bits, smallest normal exponent) of each dtype: its spacing at x is 2^(e(x) − bits).
SPACING = {torch.float16: (10, -14), torch.bfloat16: (7, -126)}


def _case(dtype, grad_norm, seed=0, big_weights=False):
    """Weights and a gradient of ``N`` finite elements whose float64 norm is about ``grad_norm``."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(N, generator=gen, dtype=torch.float64)
    g = (g * (grad_norm / float(g.norm()))).to(dtype)
    w = torch.randn(N, generator=gen, dtype=torch.float64)
    if big_weights:
        w[:4] = 20.0  # T² g beyond float16 for these: e must not be formed in float16
    w = w.to(dtype)
    assert torch.isfinite(g).all() and torch.isfinite(w).all()
    return w, g


def _reference(w, g, adaptive):
    """``(‖g‖, w + ρ g/‖g‖)`` (ASAM: ``(‖Tg‖, w + ρ T²g/‖Tg‖)``) in float64."""
    w64, g64 = w.double(), g.double()
    t = w64.abs() + ETA if adaptive else torch.ones_like(w64)
    norm = math.sqrt(float(((t * g64) ** 2).sum()))
    return norm, w64 + RHO * t * t * g64 / (norm + 1e-12)


def _within_one_ulp(got, expected, dtype):
    bits, emin = SPACING[dtype]
    exponent = torch.floor(torch.log2(expected.abs().clamp_min(1e-300))).clamp_min(emin)
    ulp = torch.pow(2.0, exponent - bits)
    return bool(((got.double() - expected).abs() <= ulp).all())


def _first_step(w0, g, backend, adaptive):
    w = torch.nn.Parameter(w0.clone())
    opt = sharpness.SAM([w], torch.optim.SGD, rho=RHO, adaptive=adaptive, eta=ETA, backend=backend, lr=0.1)
    assert [e.name for e in opt.engines()] == [backend]
    (w * g).sum().backward()  # ∂/∂w = g exactly
    opt.first_step()
    return w, opt


BACKENDS = ["torch", "rust", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
@pytest.mark.parametrize("dtype", sorted(DTYPES), ids=str)
def test_a_norm_beyond_float16_perturbs_by_rho_g_over_norm(dtype, adaptive, backend):
    """‖g‖ (ASAM: ‖Tg‖) ≈ 70,711 > 65504 from finite 16-bit gradients: the reported norm is the
    float64 one, the step is perturbed, and w moves by ρ g/‖g‖ (ρ T²g/‖Tg‖) to one ulp."""
    dtype = DTYPES[dtype]
    w0, g = _case(dtype, 70_711.0, big_weights=adaptive)
    norm, expected = _reference(w0, g, adaptive)
    assert norm > 65504.0
    w, opt = _first_step(w0, g, backend, adaptive)
    assert opt.sync_stats()["nonfinite_skips"] == 0
    # ASAM's products (|w|+η)·g are formed in float32 on the foreach engine (then accumulated in
    # float64): a relative error of float32's rounding, far below the weights' 16-bit one.
    assert math.isclose(float(opt.last_grad_norm), norm, rel_tol=1e-6 if adaptive else 1e-9)
    assert _within_one_ulp(w.detach(), expected, dtype)
    assert not torch.equal(w.detach(), w0)
    opt.second_step()  # restores w exactly, then the base step
    torch.testing.assert_close(w.detach().double(), w0.double() - 0.1 * g.double(), rtol=2**-7, atol=0.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad_norm", [1e20, 5e38], ids=["squares-beyond-f32", "norm-beyond-f32"])
def test_bfloat16_gradients_near_overflow(grad_norm, backend):
    """bfloat16 gradients whose squares (or whose norm) exceed float32's range, every element
    finite: the norm is the float64 one and w moves by ρ g/‖g‖ to one bfloat16 ulp."""
    w0, g = _case(torch.bfloat16, grad_norm, seed=1)
    norm, expected = _reference(w0, g, adaptive=False)
    w, opt = _first_step(w0, g, backend, adaptive=False)
    assert opt.sync_stats()["nonfinite_skips"] == 0
    assert math.isclose(float(opt.last_grad_norm), norm, rel_tol=1e-9)
    assert _within_one_ulp(w.detach(), expected, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_torch_engine_adaptive_sum_of_squares_beyond_float32(dtype):
    """The engine contract ``Σ ((|w|+η)g)²`` in float64 when the products ``(|w|+η)g`` themselves
    exceed float32 (the terms are then recomputed in float64)."""
    w = torch.nn.Parameter(torch.tensor([4.0, -3.0, 0.5, 0.0], dtype=dtype))
    w.grad = torch.tensor([2e38, -1.5e38, 3e37, 1e30], dtype=dtype)
    engine = TorchEngine([w], [0], Counter())
    engine.begin()
    group = {"sam_rho": 0.1, "sam_adaptive": True, "sam_eta": ETA, "sam_norm_weight": 1.0}
    got = engine.sum_of_squares([group])
    t = w.detach().double().abs() + ETA
    expected = float(((t * w.grad.double()) ** 2).sum())
    assert math.isfinite(expected) and math.isclose(got, expected, rel_tol=1e-12)


# -- the DTensor engine (FSDP2's parameters), two gloo processes -------------------------------------

WORLD = 2


def _dtensor_job(rank):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    out = {}
    for name, dtype in DTYPES.items():
        for adaptive in (False, True):
            w0, g = _case(dtype, 70_711.0, big_weights=adaptive)
            norm, expected = _reference(w0, g, adaptive)
            w = torch.nn.Parameter(distribute_tensor(w0.clone(), mesh, [Shard(0)]))
            gd = distribute_tensor(g.clone(), mesh, [Shard(0)])
            opt = sharpness.SAM([w], torch.optim.SGD, rho=RHO, adaptive=adaptive, eta=ETA, lr=0.1)
            w.grad = gd
            opt.first_step()
            out[(name, adaptive)] = {
                "engines": [e.name for e in opt.engines()],
                "norm": (float(opt.last_grad_norm), norm),
                "skips": opt.stats["nonfinite_skips"],
                "close": _within_one_ulp(w.detach().full_tensor(), expected, dtype),
            }
    # A complex parameter (its real pairs): ‖g‖² = Σ|g|² over both shards, e = ρ g/‖g‖.
    gen = torch.Generator().manual_seed(2)
    w0 = torch.randn(8, 3, dtype=torch.complex128, generator=gen)
    g = torch.randn(8, 3, dtype=torch.complex128, generator=gen)
    norm = math.sqrt(float((g.abs() ** 2).sum()))
    w = torch.nn.Parameter(distribute_tensor(w0.clone(), mesh, [Shard(0)]))
    opt = sharpness.SAM([w], torch.optim.SGD, rho=RHO, lr=0.1)
    w.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
    opt.first_step()
    out[("complex", False)] = {
        "engines": [e.name for e in opt.engines()],
        "norm": (float(opt.last_grad_norm), norm),
        "skips": opt.stats["nonfinite_skips"],
        "close": bool(torch.allclose(w.detach().full_tensor(), w0 + RHO * g / (norm + 1e-12), rtol=1e-12, atol=1e-14)),
    }
    return out


def _worker(rank, port, outdir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    try:
        try:
            result = {"ok": _dtensor_job(rank)}
        except Exception:  # the test reports it
            result = {"error": traceback.format_exc()}
        torch.save(result, os.path.join(outdir, f"lowprec-{rank}.pt"))
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as tests/test_distributed.py: no teardown race with gloo's threads


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="this torch build has no torch.distributed")
def test_dtensor_engine_norm_beyond_float16(tmp_path):
    """The DTensor engine (sharded over two ranks): the float16/bfloat16 cases above with SAM and
    ASAM, and a complex parameter as its real pairs."""
    outdir = str(tmp_path)
    try:
        mp.spawn(_worker, args=(_free_port(), outdir), nprocs=WORLD, join=True)
    except mp.ProcessExitedException:
        if not all(os.path.exists(os.path.join(outdir, f"lowprec-{r}.pt")) for r in range(WORLD)):
            raise
    for r in range(WORLD):
        result = torch.load(os.path.join(outdir, f"lowprec-{r}.pt"), weights_only=False)
        if "error" in result:
            pytest.fail(result["error"], pytrace=False)
        for key, case in result["ok"].items():
            assert case["engines"] == ["dtensor"], key
            assert case["skips"] == 0, key
            got, norm = case["norm"]
            assert math.isclose(got, norm, rel_tol=1e-6 if key[1] else 1e-9), (key, got, norm)
            assert case["close"], key
