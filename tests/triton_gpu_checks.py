#!/usr/bin/env python
"""GPU checks of the Triton backend, on CUDA tensors with compiled kernels (no interpreter).

Run by ``tests/test_triton.py::test_gpu_checks`` in a subprocess (pytest sets
``TRITON_INTERPRET=1`` for the CPU tests), or directly::

    python tests/triton_gpu_checks.py             # every check
    python tests/triton_gpu_checks.py --compile-only   # no GPU needed: compile for sm_90, read the PTX
    compute-sanitizer --tool memcheck python tests/triton_gpu_checks.py --one-step

Checks: every kernel on CUDA tensors against the Rust kernels on CPU copies (bit for bit, the
Adam bias corrections to within one float32 ulp: CUDA's ``pow`` is not glibc's); whole SAM
steps on CUDA against the Rust backend on CPU; zero host syncs in a warmed-up SAM step under
``torch.cuda.set_sync_debug_mode("error")``; a whole SAM step (two forward/backward passes and
both halves) captured in a CUDA graph and replayed, against the same steps run eagerly.
Exits 0 and prints SKIPPED without a CUDA device.
"""

from __future__ import annotations

import math
import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run the GPU checks without TRITON_INTERPRET")

import torch  # noqa: E402

import sharpness  # noqa: E402
from sharpness import _core  # noqa: E402
from sharpness.backends import triton_kernels as K  # noqa: E402
from sharpness.buffers import as_numpy  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DEV = torch.device("cuda")


def A(t):
    return None if t is None else as_numpy(t)


def rand(n, dtype, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    x[::11] = 0.0
    x[5::13] *= 1e-4
    return x.to(dtype).to(device)


def ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units in the last place between two same-dtype tensors (NaN = NaN)."""
    a, b = a.detach().cpu(), b.detach().cpu()
    if a.numel() == 0:
        return 0
    nan = a.isnan() & b.isnan()
    ia = a.view({4: torch.int32, 2: torch.int16}[a.element_size()]).long()
    ib = b.view({4: torch.int32, 2: torch.int16}[b.element_size()]).long()
    sign = 1 << (8 * a.element_size() - 1)
    ia = torch.where(ia < 0, -(ia + sign), ia)  # sign-magnitude -> ordered integers
    ib = torch.where(ib < 0, -(ib + sign), ib)
    d = (ia - ib).abs()
    d[nan] = 0
    return int(d.max())


def check(cond: bool, what: str) -> None:
    if not cond:
        raise AssertionError(what)
    print("ok  ", what)


def split(t, cuts=(0, 1, 8, 1031, 1032, 70000)):
    bounds = sorted({min(c, t.numel()) for c in cuts} | {t.numel()})
    return [t[a:b] for a, b in zip(bounds, bounds[1:])]


def kernels() -> None:
    n = 100_003
    for dtype in DTYPES:
        name = str(dtype).replace("torch.", "")
        g, w = rand(n, dtype, 1), rand(n, dtype, 2)
        gd, wd = g.to(DEV), w.to(DEV)
        want = _core.sum_of_squares(A(g))
        for got in [K.sum_of_squares(gd), K.sum_of_squares(split(gd))]:
            check(got.device.type == "cuda" and math.isclose(float(got), want, rel_tol=1e-13), f"{name} sum of squares")
        want = _core.sum_of_squares_adaptive(A(w), A(g), 0.01)
        got = K.sum_of_squares(gd, wd, 0.01)
        check(math.isclose(float(got), want, rel_tol=1e-13), f"{name} adaptive sum of squares")
        for eta in [None, 0.01]:
            ref_w, ref_b = w.clone(), torch.empty_like(w)
            scale = 0.05 / (1.7 + 1e-12)
            if eta is None:
                _core.perturb(A(ref_w), A(g), A(ref_b), scale)
            else:
                _core.perturb_adaptive(A(ref_w), A(g), A(ref_b), scale, eta)
            for form in ["flat", "multi"]:
                w1, b1 = wd.clone(), torch.empty_like(wd)
                norm = torch.tensor(1.7, dtype=torch.float64, device=DEV)
                if form == "flat":
                    K.perturb(w1, gd, b1, norm, 0.05, 1e-12, eta)
                else:
                    K.perturb(split(w1), split(gd), split(b1), norm, 0.05, 1e-12, eta)
                check(ulps(w1, ref_w) == 0 and ulps(b1, w) == 0, f"{name} perturb {form} eta={eta}")
                K.copy(b1, w1) if form == "flat" else K.copy(split(b1), split(w1))
                check(ulps(w1, w) == 0, f"{name} restore {form}")
            w1 = wd.clone()
            K.perturb(w1, gd, torch.empty_like(wd), torch.tensor(float("nan"), dtype=torch.float64, device=DEV), 0.05, 1e-12, eta)
            check(ulps(w1, w) == 0, f"{name} non-finite norm perturbs nothing")
        for kw in [
            dict(momentum=0.9, dampening=0.1, weight_decay=1e-2, nesterov=False, maximize=False),
            dict(momentum=0.9, dampening=0.0, weight_decay=1e-2, nesterov=True, maximize=True),
        ]:
            wc, mc = w.clone(), torch.zeros(n, dtype=dtype)
            wg, mg = wc.to(DEV), mc.to(DEV)
            for step in range(3):
                gs, bs = rand(n, dtype, 10 + step), rand(n, dtype, 20 + step)
                src = None if step == 1 else bs
                _core.restore_sgd(A(wc), A(src), A(gs), A(mc), lr=0.1, init_momentum=step == 0, **kw)
                K.restore_sgd(wg, None if src is None else src.to(DEV), gs.to(DEV), mg, lr=0.1, init_momentum=step == 0, **kw)
            check(ulps(wg, wc) == 0 and ulps(mg, mc) == 0, f"{name} restore_sgd {kw}")
        for kw in [
            dict(weight_decay=0.1, decoupled=False, amsgrad=True, maximize=False),
            dict(weight_decay=0.1, decoupled=True, amsgrad=False, maximize=True),
        ]:
            kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, **kw)
            sc = [w.clone()] + [torch.zeros(n, dtype=dtype) for _ in range(3)]
            sg = [t.to(DEV) for t in sc]
            step_t = torch.zeros((), device=DEV)
            for step in range(1, 4):
                gs, bs = rand(n, dtype, 30 + step), rand(n, dtype, 40 + step)
                _core.restore_adam(A(sc[0]), A(bs), A(gs), A(sc[1]), A(sc[2]), A(sc[3]) if kw["amsgrad"] else None,
                                   step=float(step), **kw)  # fmt: skip
                step_t += 1
                K.restore_adam(sg[0], bs.to(DEV), gs.to(DEV), sg[1], sg[2], sg[3] if kw["amsgrad"] else None,
                               powers=K.adam_powers(step_t, kw["beta1"], kw["beta2"]), **kw)  # fmt: skip
            worst = max(ulps(a, b) for a, b in zip(sg, sc))
            check(worst <= 1, f"{name} restore_adam {kw} (max {worst} ulp)")


def mlp(dtype, device):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(33, 64), torch.nn.Tanh(), torch.nn.Linear(64, 17), torch.nn.Tanh(), torch.nn.Linear(17, 5)
    ).to(device=device, dtype=dtype)


def sam_steps(device, dtype, base, kw, backend, steps=4):
    model = mlp(dtype, device)
    opt = sharpness.SAM(model.parameters(), base, backend=backend, **kw)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 33, generator=g).to(device, dtype), torch.randn(64, 5, generator=g).to(device, dtype)
    for _ in range(steps):
        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x).float(), y.float())
            loss.backward()
            return loss

        opt.step(closure)
    return [p.detach().cpu() for p in model.parameters()], opt


def sam_against_rust() -> None:
    for dtype in DTYPES:
        for base, kw in [
            (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)),
            (torch.optim.AdamW, dict(lr=1e-3, weight_decay=0.1)),
        ]:
            got, opt = sam_steps(DEV, dtype, base, kw, "triton")
            want, _ = sam_steps("cpu", dtype, base, kw, "rust")
            # The forward/backward passes differ between CUDA and CPU: compare loosely.
            worst = max(float((a.float() - b.float()).abs().max()) for a, b in zip(got, want))
            check(
                worst < (1e-4 if dtype == torch.float32 else 5e-2),
                f"SAM {base.__name__} {dtype} on CUDA ~ Rust on CPU ({worst:.2e})",
            )
    model = mlp(torch.float32, DEV)
    opt = sharpness.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    check([e.name for e in opt.engines()] == ["triton"], 'backend="auto" picks Triton for CUDA tensors')


def no_syncs() -> None:
    for base, kw in [(torch.optim.SGD, dict(lr=0.05, momentum=0.9)), (torch.optim.AdamW, dict(lr=1e-3))]:
        model = mlp(torch.float32, DEV)
        opt = sharpness.SAM(model.parameters(), base, backend="triton", **kw)
        x, y = torch.randn(64, 33, device=DEV), torch.randn(64, 5, device=DEV)

        def step():
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.first_step(zero_grad=True)
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.second_step(zero_grad=True)

        step()
        step()  # warm-up: kernels compiled, state created
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        check(opt.stats["fused_steps"] == 5, f"{base.__name__}: zero host syncs in a SAM step")


def graph_capture() -> None:
    for base, kw in [(torch.optim.SGD, dict(lr=0.05, momentum=0.9)), (torch.optim.Adam, dict(lr=1e-3))]:
        models = [mlp(torch.float32, DEV) for _ in range(2)]
        opts = [sharpness.SAM(m.parameters(), base, backend="triton", **kw) for m in models]
        x, y = torch.randn(64, 33, device=DEV), torch.randn(64, 5, device=DEV)

        def step(model, opt):
            opt.zero_grad(set_to_none=False)
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.first_step(zero_grad=True)
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.second_step()

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up on a side stream, as torch.cuda.graphs asks
                for m, o in zip(models, opts):
                    step(m, o)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step(models[0], opts[0])
        # The capture ran nothing; the eager model takes the same steps as the replays.
        for _ in range(5):
            graph.replay()
            step(models[1], opts[1])
        torch.cuda.synchronize()
        worst = max(ulps(a, b) for a, b in zip(models[0].parameters(), models[1].parameters()))
        check(worst == 0, f"{base.__name__}: a captured SAM step replays as the eager step")


def one_step() -> None:
    model = mlp(torch.float32, DEV)
    opt = sharpness.SAM(model.parameters(), torch.optim.AdamW, backend="triton", lr=1e-3)
    x, y = torch.randn(64, 33, device=DEV), torch.randn(64, 5, device=DEV)
    opt.step(lambda: torch.nn.functional.mse_loss(model(x), y).backward())
    torch.cuda.synchronize()
    print("ok   one SAM step")


def compile_for_sm90() -> None:
    """Every kernel compiled for an H100 (sm_90) to PTX and a cubin, no GPU needed, with the
    properties the bit-exactness rests on read off the PTX: no contracted ``fma`` in fp32,
    IEEE ``sqrt.rn``/``div.rn`` (never ``.approx``/``.full``), and 128-bit loads and stores when
    the buffers are 16-byte aligned (what a launch on fresh flat buffers specialises on)."""
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fp64_ptrs = {"partials", "out", "norm", "powers"}
    i64_ptrs = {"shifts", "table"}

    def compile_one(fn, dtype: str, constexprs: dict):
        signature, hints = {}, {}
        for i, name in enumerate(fn.arg_names):
            if name in constexprs:
                signature[name] = "constexpr"
            elif name in fp64_ptrs:
                signature[name] = "*fp64"
            elif name in i64_ptrs:
                signature[name] = "*i64"
            elif name in ("n", "n_tensors"):
                signature[name] = "i32"
            elif name.endswith("_bits"):
                signature[name] = "i64"
            elif name in ("w", "g", "b", "src", "dst", "buf", "m1", "m2", "vmax"):
                signature[name] = f"*{dtype}"
            else:
                signature[name] = "fp32"
            if signature[name].startswith("*") or name == "n":
                hints[(i,)] = [["tt.divisibility", 16]]
        src = ASTSource(fn, signature, constexprs=constexprs, attrs=hints)
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "enable_fp_fusion": False})
        assert kernel.asm["cubin"], fn.__name__
        return kernel.asm["ptx"]

    sgd = dict(HAS_SRC=True, MOMENTUM=True, INIT=False, NESTEROV=True, MAXIMIZE=True, DECAY=True, BLOCK=1024)
    adam = dict(HAS_SRC=True, AMSGRAD=True, MAXIMIZE=False, COUPLED=False, DECOUPLED=True, LERP_LOW=True, BLOCK=1024)
    cases = [
        (K._sumsq_flat, "fp32", dict(ADAPTIVE=True, BLOCK=1024, ITERS=16)),
        (K._sumsq_multi, "bf16", dict(ADAPTIVE=False, BLOCK=1024)),
        (K._sum_in_order, "fp32", dict(BLOCK=1024)),
        (K._perturb_flat, "fp32", dict(ADAPTIVE=False, BLOCK=1024)),
        (K._perturb_flat, "bf16", dict(ADAPTIVE=True, BLOCK=1024)),
        (K._perturb_multi, "fp16", dict(ADAPTIVE=True, BLOCK=1024)),
        (K._copy_flat, "fp32", dict(BLOCK=1024)),
        (K._copy_multi, "bf16", dict(BLOCK=1024)),
        (K._sgd_flat, "fp32", sgd),
        (K._sgd_flat, "bf16", sgd),
        (K._sgd_multi, "fp32", sgd),
        (K._adam_flat, "fp32", adam),
        (K._adam_flat, "fp16", dict(adam, LERP_LOW=False, COUPLED=True, DECOUPLED=False, AMSGRAD=False)),
        (K._adam_multi, "bf16", adam),
    ]
    for fn, dtype, constexprs in cases:
        ptx = compile_one(fn, dtype, constexprs)
        what = f"{fn.__name__}[{dtype}]"
        check(not re.search(r"\bfma\.rn\.f32\b", ptx), f"{what}: no contracted fp32 fma")
        check(not re.search(r"\.approx\.|div\.full\.", ptx), f"{what}: IEEE sqrt and division only")
        if "flat" in fn.__name__ and fn is not K._sumsq_flat and dtype == "fp32":
            check("ld.global.v4" in ptx and "st.global.v4" in ptx, f"{what}: 128-bit loads and stores")
        if fn is K._adam_flat:
            check("sqrt.rn.f32" in ptx and "div.rn.f32" in ptx and "sqrt.rn.f64" in ptx, f"{what}: sqrt.rn/div.rn")


def main() -> int:
    if "--compile-only" in sys.argv:
        compile_for_sm90()
        print("all kernels compile for sm_90")
        return 0
    if not torch.cuda.is_available():
        print("SKIPPED: no CUDA device")
        return 0
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    if "--one-step" in sys.argv:
        one_step()
        return 0
    kernels()
    sam_against_rust()
    no_syncs()
    graph_capture()
    print("all GPU checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
