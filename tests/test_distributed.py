"""SAM on torch.distributed: DDP and FSDP2 with the gloo backend, 2 processes on the CPU.

Each scenario runs in one spawned job (2 ranks) per fixture; the ranks compare themselves with a
single-process reference they compute locally and save the errors, the tests assert on them.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import traceback

import pytest
import registry
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import sharpness
import sharpness.distributed

WORLD = 2
STEPS = 3

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="this torch build has no torch.distributed")


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.GELU(), torch.nn.Linear(16, 3))


def _batches(n: int = 8):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(n, 5, generator=g), torch.randn(n, 3, generator=g)) for _ in range(STEPS)]


def _sam(params, backend="auto", **kw):
    return sharpness.SAM(params, torch.optim.SGD, rho=0.1, backend=backend, lr=0.1, momentum=0.9, **kw)


def _reference(backend="auto", **kw):
    """Single-process SAM on the full batch."""
    model = _model()
    opt = _sam(model.parameters(), backend, **kw)
    for x, y in _batches():

        def closure():
            opt.zero_grad()
            loss = F.mse_loss(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
    return [p.detach().clone() for p in model.parameters()]


def _msam_reference(backend="auto"):
    """Single-process m-sharpness with one micro-batch per replica."""
    model = _model()
    opt = sharpness.MSharpnessSAM(
        model.parameters(), torch.optim.SGD, micro_batches=WORLD, rho=0.1, backend=backend, lr=0.1, momentum=0.9
    )
    for x, y in _batches():

        def closure(i):
            opt.zero_grad()
            loss = F.mse_loss(model(x.chunk(WORLD)[i]), y.chunk(WORLD)[i])
            loss.backward()
            return loss

        opt.step(closure)
    return [p.detach().clone() for p in model.parameters()]


def _err(ref, params) -> float:
    return max(float((a - b.detach()).abs().max()) for a, b in zip(ref, params))


def _replicas_agree(params) -> bool:
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    gathered = [torch.empty_like(flat) for _ in range(WORLD)]
    dist.all_gather(gathered, flat)
    return all(torch.equal(gathered[0], g) for g in gathered)


def _train_ddp(rank, *, order="ddp_first", bucket_view=False, backend="auto", per_replica=None, scaler=None,
               inf_second_on=None):
    """DDP training on this rank's shard; `per_replica=None` uses opt.step(closure) directly."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    net = _model()
    if order == "ddp_first":
        model = DDP(net, gradient_as_bucket_view=bucket_view)
        opt = _sam(net.parameters(), backend)
    else:
        opt = _sam(net.parameters(), backend)
        model = DDP(net, gradient_as_bucket_view=bucket_view)
    for step, (x, y) in enumerate(_batches()):
        xs, ys = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
        calls = 0

        def closure():
            nonlocal calls
            calls += 1
            opt.zero_grad()
            loss = F.mse_loss(model(xs), ys)
            if inf_second_on == (rank, step) and calls == 2:
                loss = loss * float("inf")
            (loss if scaler is None else scaler.scale(loss)).backward()
            return loss

        if per_replica is None:
            opt.step(closure)
        else:
            sharpness.distributed.sam_step(model, opt, closure, per_replica=per_replica, scaler=scaler)
    return list(net.parameters()), opt


def _ddp_job(rank: int) -> dict:
    out = {}
    ref = _reference()
    for order in ("ddp_first", "opt_first"):
        for bucket_view in (False, True):
            params, opt = _train_ddp(rank, order=order, bucket_view=bucket_view)
            out[f"sync/{order}/bucket_view={bucket_view}"] = (_err(ref, params), opt.stats["regathered_grads"])
    params, opt = _train_ddp(rank, backend="torch")
    out["sync/torch-backend"] = (_err(_reference("torch"), params), 0)
    params, _ = _train_ddp(rank, per_replica=False)
    out["helper/sync"] = (_err(ref, params), 0)
    msam = _msam_reference()
    for backend in ("rust", "torch"):
        params, _ = _train_ddp(rank, backend=backend, per_replica=True)
        out[f"helper/per_replica/{backend}"] = (_err(msam, params), 0)
        out[f"agree/per_replica/{backend}"] = _replicas_agree(params)
    params, _ = _train_ddp(rank, per_replica=True, scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))
    out["helper/per_replica/scaler"] = (_err(msam, params), 0)
    # An overflow on one rank's second pass: the all-reduce spreads it, every rank skips the step.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    params, opt = _train_ddp(rank, per_replica=True, scaler=scaler, inf_second_on=(1, STEPS - 1))
    out["amp_skip/skipped"] = opt.stats["amp_skipped_steps"]
    out["amp_skip/scale"] = scaler.get_scale()
    out["amp_skip/agree"] = _replicas_agree(params)
    return out


def _fsdp_job(rank: int) -> dict:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.debug import CommDebugMode

    from sharpness.backends.distributed import DTensorEngine

    out = {}
    for adaptive in (False, True):
        ref = _reference(adaptive=adaptive)
        model = _model()
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        opt = _sam(model.parameters(), adaptive=adaptive)
        local_ptrs = [p.to_local().data_ptr() for p in model.parameters()]
        comms = []
        for x, y in _batches():
            xs, ys = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
            opt.zero_grad()
            F.mse_loss(model(xs), ys).backward()
            with CommDebugMode() as first:
                opt.first_step(zero_grad=True)
            F.mse_loss(model(xs), ys).backward()
            with CommDebugMode() as second:
                opt.second_step(zero_grad=True)
            comms.append(({str(k): v for k, v in first.get_comm_counts().items()},
                          {str(k): v for k, v in second.get_comm_counts().items()}))
        full = [p.full_tensor() for p in model.parameters()]  # for the comparison only
        out[f"fsdp/adaptive={adaptive}"] = _err(ref, full)
        out[f"fsdp/comms/adaptive={adaptive}"] = comms
        out[f"fsdp/engines/adaptive={adaptive}"] = [type(e).__name__ for e in opt.engines()]
        out[f"fsdp/still_dtensor/adaptive={adaptive}"] = all(isinstance(p, DTensor) for p in model.parameters())
        ptrs_after = [p.to_local().data_ptr() for p in model.parameters()]
        out[f"fsdp/same_storage/adaptive={adaptive}"] = local_ptrs == ptrs_after
        assert all(isinstance(e, DTensorEngine) for e in opt.engines())
    return out


# The family on FSDP2 shards: the entries of the registry (tests/registry.py), on an SGD base with
# momentum, each driven as it says; each must follow the single-process run of the same entry on the
# full batch, or (``refused_on_shards``) be refused with an error naming DTensor. Left out: a method
# that selects samples (ESAM: each rank ranks its own samples, not the full batch's) and
# memory="subtract" (not exact: its bfloat16 e turns the all-reduced norm's rounding into ulps of bf16).
FAMILY = registry.labels(lambda e: e.drive != "per_sample" and e.restores_exactly)
FAMILY_BASE = (torch.optim.SGD, dict(lr=0.1, momentum=0.9))


def _family_run(name: str, model: torch.nn.Module, shard: tuple[int, int] | None) -> tuple:
    """``STEPS`` steps of the registry's entry ``name`` on ``model``; ``shard=(rank, world)`` takes
    this rank's half of each batch (FSDP averages the gradients back to the full batch's). The
    micro-batches of m-sharpness are each rank's halves of its shard (on the full batch: the
    union over the ranks of the same halves, so that the averaged gradients agree)."""
    entry = registry.get(name)
    cls, kw = FAMILY_BASE
    opt = entry.torch(list(model.parameters()), cls, base_kwargs=kw)
    x_val, y_val = _batches(4)[0]
    for step, (x, y) in enumerate(_batches()):
        if shard is not None:
            x, y = x.chunk(shard[1])[shard[0]], y.chunk(shard[1])[shard[0]]
            xv, yv = x_val.chunk(shard[1])[shard[0]], y_val.chunk(shard[1])[shard[0]]
            micro_x, micro_y = [x.chunk(2)], [y.chunk(2)]
        else:
            xv, yv = x_val, y_val
            micro_x, micro_y = [s.chunk(2) for s in x.chunk(WORLD)], [s.chunk(2) for s in y.chunk(WORLD)]

        def closure():
            opt.zero_grad()
            loss = F.mse_loss(model(x), y)
            loss.backward()
            return loss

        def val_closure():
            opt.zero_grad()
            loss = F.mse_loss(model(xv), yv)
            loss.backward()
            return loss

        def micro(i):
            opt.zero_grad()
            xs, ys = torch.cat([c[i] for c in micro_x]), torch.cat([c[i] for c in micro_y])
            loss = F.mse_loss(model(xs), ys)
            loss.backward()
            return loss

        def per_sample(indices=None):
            xs, ys = (x, y) if indices is None else (x[indices], y[indices])
            return F.mse_loss(model(xs), ys, reduction="none").mean(dim=1)

        how = entry.drive
        if how == "validation":
            opt.step(closure, val_closure)
        elif how == "micro":
            opt.step(micro)
        elif how == "per_sample":
            opt.step(per_sample)
        elif how == "fisher" and step == 0:
            closure()
            opt.accumulate_fisher()
            opt.update_mask()
            opt.step(closure)
        elif how == "dynamic" and step == 1:
            closure()
            opt.update_mask(progress=step / STEPS)
            opt.step(closure)
        else:
            opt.step(closure)
    return opt


def _fsdp_family_job(rank: int) -> dict:
    from torch.distributed.fsdp import fully_shard

    out = {}
    for name in FAMILY:
        try:
            ref_model = _model()
            _family_run(name, ref_model, None)
            ref = [p.detach().clone() for p in ref_model.parameters()]
            model = _model()
            for layer in model:
                if isinstance(layer, torch.nn.Linear):
                    fully_shard(layer)
            fully_shard(model)
            opt = _family_run(name, model, (rank, WORLD))
            out[name] = {"err": _err(ref, [p.full_tensor() for p in model.parameters()]),
                         "engines": [type(e).__name__ for e in opt.engines()]}
        except Exception as exc:  # noqa: BLE001 - reported per method
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


def _worker(rank: int, job: str, port: int, outdir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    try:
        try:
            result = {"ok": {"ddp": _ddp_job, "fsdp": _fsdp_job, "fsdp_family": _fsdp_family_job}[job](rank)}
        except Exception:  # the test reports it
            result = {"error": traceback.format_exc()}
        torch.save(result, os.path.join(outdir, f"{job}-{rank}.pt"))
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's teardown: on a loaded machine a background C++ thread of
    # the process group can still be winding down there ("terminate called without an active
    # exception", SIGABRT) after the results are safely written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(job: str, tmp_path_factory) -> list[dict]:
    outdir = str(tmp_path_factory.mktemp(job))
    try:
        mp.spawn(_worker, args=(job, _free_port(), outdir), nprocs=WORLD, join=True)
    except mp.ProcessExitedException:
        # A worker killed after it wrote its results (a teardown race) loses nothing; one killed
        # before that is a failure.
        if not all(os.path.exists(os.path.join(outdir, f"{job}-{r}.pt")) for r in range(WORLD)):
            raise
    results = [torch.load(os.path.join(outdir, f"{job}-{r}.pt"), weights_only=False) for r in range(WORLD)]
    for r in results:
        if "error" in r:
            pytest.fail(r["error"], pytrace=False)
    return [r["ok"] for r in results]


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    return _run("ddp", tmp_path_factory)


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory):
    return _run("fsdp", tmp_path_factory)


TOL = 1e-6


@pytest.mark.parametrize("order", ["ddp_first", "opt_first"])
@pytest.mark.parametrize("bucket_view", [False, True])
def test_ddp_synchronised_equals_full_batch_sam(ddp, order, bucket_view):
    """DDP (built before or after SAM re-homes the parameters) gives SAM on the global batch."""
    for rank in ddp:
        err, regathered = rank[f"sync/{order}/bucket_view={bucket_view}"]
        assert err < TOL
        # With gradient_as_bucket_view DDP rebinds p.grad to its buckets: still right, one copy a pass.
        assert (regathered > 0) == bucket_view


def test_ddp_with_torch_backend(ddp):
    assert all(rank["sync/torch-backend"][0] < TOL for rank in ddp)


def test_helper_synchronised(ddp):
    assert all(rank["helper/sync"][0] < TOL for rank in ddp)


@pytest.mark.parametrize("backend", ["rust", "torch"])
def test_per_replica_equals_single_process_m_sharpness(ddp, backend):
    for rank in ddp:
        assert rank[f"helper/per_replica/{backend}"][0] < TOL
        assert rank[f"agree/per_replica/{backend}"]


def test_per_replica_with_grad_scaler(ddp):
    assert all(rank["helper/per_replica/scaler"][0] < TOL for rank in ddp)


def test_an_overflow_on_one_rank_skips_the_step_on_every_rank(ddp):
    for rank in ddp:
        assert rank["amp_skip/skipped"] == 1
        assert rank["amp_skip/scale"] == 2.0**9
        assert rank["amp_skip/agree"]


@pytest.mark.parametrize("adaptive", [False, True])
def test_fsdp2_equals_single_process_sam(fsdp, adaptive):
    for rank in fsdp:
        assert rank[f"fsdp/adaptive={adaptive}"] < TOL
        assert rank[f"fsdp/still_dtensor/adaptive={adaptive}"]
        assert rank[f"fsdp/same_storage/adaptive={adaptive}"]  # never re-homed into flat buffers
        assert set(rank[f"fsdp/engines/adaptive={adaptive}"]) == {"DTensorEngine"}


@pytest.mark.parametrize("adaptive", [False, True])
def test_fsdp2_optimizer_communicates_one_scalar_all_reduce(fsdp, adaptive):
    """The norm is one all-reduce of the local sums of squares; no all-gather, nothing else; the
    restoration and the base step communicate nothing."""
    for rank in fsdp:
        for first, second in rank[f"fsdp/comms/adaptive={adaptive}"]:
            assert list(first.values()) == [1] and "allreduce" in next(iter(first)), first
            assert second == {}, second


@pytest.fixture(scope="module")
def fsdp_family(tmp_path_factory):
    return _run("fsdp_family", tmp_path_factory)


# Methods that rank or draw over whole tensors: refused on shards with a clear error.
REFUSED_ON_SHARDS = set(registry.labels(lambda e: e.refused_on_shards))


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_the_family_on_fsdp2_equals_single_process(fsdp_family, name):
    for rank in fsdp_family:
        result = rank[name]
        if name in REFUSED_ON_SHARDS:
            assert result.get("error", "").startswith("ValueError") and "DTensor" in result["error"], result
            continue
        assert "error" not in result, result.get("error")
        assert set(result["engines"]) == {"DTensorEngine"}
        assert result["err"] < TOL, result["err"]
