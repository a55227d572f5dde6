"""Every method of the SAM family on every engine that runs here: the Triton engine (under
``TRITON_INTERPRET=1``, on CPU tensors) and the torch engine follow the Rust engine's trajectory.

The per-method tests check each method against its paper on the rust and torch engines; this file
checks that the engine-generic operations the methods are built from (dot products, axpby, masks,
noise, moving the weights from the backup, per-group tensors) behave the same on the Triton
engine, over several steps with SGD and Adam bases and two parameter groups.
"""

from __future__ import annotations

import importlib
import os

import pytest

os.environ["TRITON_INTERPRET"] = "1"

torch = pytest.importorskip("torch")
triton = pytest.importorskip("triton")

from sharpness.backends import triton_kernels as K  # noqa: E402

if not isinstance(K._copy_flat, triton.runtime.interpreter.InterpretedFunction):
    importlib.reload(K)  # imported compiled by an earlier module: redefine under the interpreter

import registry  # noqa: E402
from _family import batches, loss_of, make_model  # noqa: E402

STEPS = 6

# The methods: the registry's entries (tests/registry.py), each driven as it says; the masks of the
# sparse methods are left as they are (``fisher`` and ``dynamic`` driven as ``closure``). The Triton
# engine keeps the exact backup only (memory="subtract" is refused there).
METHODS = registry.labels(lambda e: not e.own_update and e.restores_exactly)
STANDALONE = registry.labels(lambda e: e.own_update)
BASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
    "adam": (torch.optim.Adam, dict(lr=1e-2)),
}


def two_groups(model):
    """Two parameter groups: the last layer with its own learning rate."""
    params = list(model.parameters())
    return [{"params": params[:-2]}, {"params": params[-2:], "lr_scale": True}]


def _groups_for(model, base_kwargs):
    groups = two_groups(model)
    for g in groups:
        if g.pop("lr_scale", False) and "lr" in base_kwargs:
            g["lr"] = base_kwargs["lr"] * 0.5
    return groups


def _step(opt, model, x, y, how, x_val, y_val):
    def closure():
        opt.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        return loss

    if how in ("closure", "fisher", "dynamic"):
        return opt.step(closure)
    if how == "micro":  # closure(i): the i-th half of the batch
        def micro(i):
            opt.zero_grad()
            half = slice(8 * i, 8 * (i + 1))
            loss = loss_of(model, x[half], y[half])
            loss.backward()
            return loss

        return opt.step(micro)
    if how == "per_sample":
        def per_sample(indices=None):
            xs, ys = (x, y) if indices is None else (x[indices], y[indices])
            return torch.nn.functional.cross_entropy(model(xs), ys, reduction="none")

        return opt.step(per_sample)

    def val_closure():
        opt.zero_grad()
        loss = loss_of(model, x_val, y_val)
        loss.backward()
        return loss

    return opt.step(closure, val_closure)


def trajectory(build, backend, how="closure"):
    model = make_model(0)
    opt = build(model, backend)
    data = batches(STEPS, seed=3)
    x_val, y_val = batches(1, seed=9)[0]
    for x, y in data:
        _step(opt, model, x, y, how, x_val, y_val)
    return model, opt


def assert_models_close(a, b):
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_engine_follows_the_rust_trajectory(name, base):
    entry = registry.get(name)
    cls, kw = BASES[base]
    how = entry.drive

    def build(model, backend):
        return entry.torch(_groups_for(model, kw), cls, backend, base_kwargs=kw)

    ref, ref_opt = trajectory(build, "rust", how)
    for backend in ("torch", "triton"):
        got, opt = trajectory(build, backend, how)
        assert [e.name for e in opt.engines()] == [backend]
        assert_models_close(got, ref)
        assert opt.stats["steps"] == ref_opt.stats["steps"] == STEPS


@pytest.mark.parametrize("name", sorted(STANDALONE))
def test_standalone_methods_follow_the_rust_trajectory(name):
    entry = registry.get(name)

    def build(model, backend):
        return entry.torch(two_groups_plain(model), backend=backend)

    ref, _ = trajectory(build, "rust", entry.drive)
    for backend in ("torch", "triton"):
        got, opt = trajectory(build, backend, entry.drive)
        assert [e.name for e in opt.engines()] == [backend]
        assert_models_close(got, ref)


def two_groups_plain(model):
    params = list(model.parameters())
    return [{"params": params[:-2]}, {"params": params[-2:]}]


# A sample of the registry: plain SAM and methods of each kind under a scaler (one-pass steps by
# count and by the norm, g mixed into the update, a step begun before the first gradient).
SCALER_SAMPLE = ["sam", "looksam", "aesam", "gsam", "sampa"]


@pytest.mark.parametrize("name", SCALER_SAMPLE)
def test_triton_engine_under_a_grad_scaler(name):
    """The GradScaler loop (`first_step(zero_grad=True, grad_scaler=scaler)`, `scaler.step(opt)`)
    on the Triton engine, at a constant power-of-two scale, is the run without a scaler bit for
    bit. Plain SAM keeps its host-sync-free path (the norm stays a device tensor): the first
    gradient is unscaled by the scale tensor, never read on the host."""
    entry = registry.get(name)
    cls, kw = BASES["sgd"]
    data = batches(STEPS, seed=3)
    runs = []
    for scaled in (False, True):
        model = make_model(0)
        opt = entry.torch(_groups_for(model, kw), cls, "triton", base_kwargs=kw)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=10**6)
        for x, y in data:
            registry.begin(opt)
            loss = loss_of(model, x, y)
            (scaler.scale(loss) if scaled else loss).backward()
            due = opt.first_step(zero_grad=True, grad_scaler=scaler if scaled else None)
            if name == "sam":
                assert isinstance(opt.last_grad_norm, torch.Tensor)  # the device-norm path
            if due:
                loss2 = loss_of(model, x, y)
                (scaler.scale(loss2) if scaled else loss2).backward()
                if not scaled:
                    opt.second_step()
            if scaled:
                scaler.step(opt)
                scaler.update()
            opt.zero_grad()
        assert [e.name for e in opt.engines()] == ["triton"] and opt.sam_state["step"] == STEPS
        runs.append(model)
    for p, q in zip(runs[0].parameters(), runs[1].parameters()):
        assert torch.equal(p, q)
