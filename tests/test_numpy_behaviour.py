"""Behaviour every method of the numpy front shares, written once over the registry
(``tests/registry.py``) instead of once per method file: an exception at any gradient call of a step
restores the weights and the caller's gradients are never written to; float32 and float64 parameters
together run per dtype; the protocol and input errors of the two-call API (or of ``step(grad_fn)``
alone, for the methods driven only that way)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import registry
from numpy_without_torch import methods, mixed_problem, problem

# Every numpy case of the registry, as numpy_without_torch.py builds and steps them.
METHODS = methods()
NUMPY = registry.entries(lambda e: not e.torch_only)
TWO_CALL = [e.label for e in NUMPY if e.two_call]
# The validation closure (LETS) is called after the update, to adapt ρ: not rolled back.
TRAINING_CALLS_ONLY = [label for label in METHODS if registry.get(label.replace("sam-adamw", "sam")).drive != "validation"]
STEP_ONLY = [e.label for e in NUMPY if not e.two_call and e.drive == "closure"]


def _copies(arrays):
    return [np.array(a, copy=True) for a in arrays]


def _equal(a, b) -> bool:
    return all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def _started(label: str, fail_at: int | None, error: type[BaseException] = KeyError):
    """The case after three steps, with the gradient function its fourth step is called with:
    it raises ``error`` at its ``fail_at``-th call (never when None) and counts its calls."""
    build, step = METHODS[label]
    grad_fn, params = problem()
    opt = build(params)
    seen = []

    def recording(p, rows=slice(None)):
        loss, grads = grad_fn(p, rows)
        seen.append((_copies(grads), grads))
        return loss, grads

    for _ in range(3):
        step(opt, recording)
    calls = []

    def failing(p, rows=slice(None)):
        calls.append(1)
        if len(calls) == fail_at:
            raise error("boom")
        return grad_fn(p, rows)

    return opt, step, params, seen, recording, failing, calls


@pytest.mark.parametrize("error", [KeyError, KeyboardInterrupt])
@pytest.mark.parametrize("label", TRAINING_CALLS_ONLY)
def test_an_exception_in_any_call_restores_the_weights_and_grads_are_left_alone(label, error):
    opt, step, _, _, _, counting, calls = _started(label, None)
    step(opt, counting)
    assert calls, "a step calls its gradient function"
    for fail_at in range(1, len(calls) + 1):
        opt, step, params, seen, recording, failing, _ = _started(label, fail_at, error)
        for kept, given in seen:
            assert _equal(kept, given)  # the optimizer wrote to buffers of its own
        before = _copies(params)
        with pytest.raises(error, match="boom"):
            step(opt, failing)
        assert _equal(params, before), f"moved after an exception at call {fail_at}"
        assert not opt.perturbed
        step(opt, recording)  # and the optimizer still works
        assert not _equal(params, before)


@pytest.mark.parametrize("label", list(METHODS))
def test_mixed_dtypes_run_per_dtype(label):
    build, step = METHODS[label]
    grad_fn, params = mixed_problem()
    start = _copies(params)
    opt = build(params)
    for _ in range(4):
        step(opt, grad_fn)
    assert [a.dtype for a in params] == [np.float32, np.float64]
    assert all(not np.array_equal(a, b) for a, b in zip(params, start))


def _two_call(label: str):
    entry = registry.get(label)
    w = [np.zeros((2, 3)), np.zeros(3)]
    return entry, w, entry.numpy(w, "sgd", dict(lr=0.05, momentum=0.9)), [np.ones((2, 3)), np.ones(3)]


@pytest.mark.parametrize("label", TWO_CALL)
def test_protocol_and_input_errors(label):
    entry, w, opt, g = _two_call(label)
    with pytest.raises(RuntimeError, match="first_step|begin_step"):
        opt.second_step(g)
    if entry.begins_step:
        with pytest.raises(RuntimeError, match="begin_step"):
            opt.first_step(g)
        opt.begin_step()
        with pytest.raises(RuntimeError, match="begin_step"):
            opt.begin_step()
        with pytest.raises(RuntimeError, match="state_dict"):  # a step begun
            opt.state_dict()

    def first_step(grads):  # after RandomSAM's add_noise(): a refused call takes the noise back
        if entry.before_first_pass == "add_noise":
            opt.add_noise()
        return opt.first_step(grads)

    with pytest.raises(ValueError, match="gradient arrays for 2 parameters"):
        first_step(g[:1])
    with pytest.raises(TypeError, match=r"grads\[1\] has dtype float32"):
        first_step([g[0], g[1].astype(np.float32)])
    with pytest.raises(ValueError, match=r"grads\[0\] has shape"):
        first_step([np.ones(6), g[1]])
    with pytest.raises(TypeError, match="not one array"):
        first_step(np.ones(3))
    if first_step(g) is False:  # a one-pass step: over already
        return
    with pytest.raises(RuntimeError, match=f"twice|{entry.before_first_pass or 'first_step'}"):
        opt.first_step(g)
    with pytest.raises(RuntimeError):
        opt.state_dict()
    with pytest.raises(RuntimeError):
        opt.load_state_dict({})
    opt.second_step(g)
    sd = opt.state_dict()
    with pytest.raises(TypeError, match="dict"):
        opt.load_state_dict([sd])
    broken = copy.deepcopy(sd)
    broken["param_groups"][0]["params"] = [0]  # one parameter where there are two
    with pytest.raises(ValueError):
        opt.load_state_dict(broken)
    arrays = [key for key, value in sd["state"].get(0, {}).items() if isinstance(value, np.ndarray) and value.ndim]
    assert arrays or entry.own_update, "momentum SGD keeps a buffer per parameter"
    for key in arrays:  # each state array of the wrong shape
        broken = copy.deepcopy(sd)
        broken["state"][0][key] = np.zeros(5)
        with pytest.raises(ValueError, match="shape"):
            opt.load_state_dict(broken)
    opt.load_state_dict(sd)


@pytest.mark.parametrize("label", STEP_ONLY)
def test_methods_driven_by_step_refuse_the_two_call_api(label):
    entry = registry.get(label)
    grad_fn, w = problem()
    opt = entry.numpy(w, "sgd", dict(lr=0.1))
    g = grad_fn(w)[1]
    with pytest.raises(RuntimeError, match=r"step\(grad_fn\)"):
        opt.first_step(g)
    with pytest.raises(RuntimeError, match=r"step\(grad_fn\)"):
        opt.second_step(g)
    with pytest.raises(TypeError, match="pair"):
        opt.step(lambda p: g)


ROUND_TRIP_BASES = {"sgd": dict(lr=0.05, momentum=0.9), "adam": dict(lr=1e-2)}


@pytest.mark.parametrize("label, base", registry.cases(lambda e: not e.torch_only, ROUND_TRIP_BASES))
def test_state_dict_round_trip_mid_run(label, base):
    """A run saved after 6 steps and resumed by a fresh optimizer (another seed: the generator comes
    from the checkpoint) ends where the uninterrupted run does; later steps leave the saved dict
    alone."""
    entry, step = registry.get(label), METHODS[label][1]
    grad_fn, w0 = mixed_problem()

    def build(params, **overrides):
        return entry.numpy(params, base, ROUND_TRIP_BASES.get(base), **overrides)

    def run(opt, steps):
        for _ in range(steps):
            step(opt, grad_fn)

    a = _copies(w0)
    run(build(a), 14)
    b = _copies(w0)
    opt_b = build(b)
    run(opt_b, 6)
    sd = copy.deepcopy(opt_b.state_dict())
    snapshot = _copies(b)
    run(opt_b, 2)
    c = _copies(snapshot)
    opt_c = build(c, **({"seed": entry.hparams["seed"] + 99} if "seed" in entry.hparams else {}))
    opt_c.load_state_dict(sd)
    run(opt_c, 8)
    assert _equal(a, c)
