"""The numpy front's calls are all or nothing when a parameter stops being writable after the
optimizer was built (numpy lets a caller clear the flag): the call raises before anything moves,
for every method, with float32 and float64 parameters together (one kernel call per dtype, where
a half-done call used to leave the float32 arrays moved and the float64 ones not); once the flag is
back, the run continues exactly as a run that never made the call."""

from __future__ import annotations

import numpy as np
import pytest
import registry
from numpy_without_torch import OTHER_BASES, methods, mixed_problem

# Every numpy case of the registry (tests/registry.py), as numpy_without_torch.py steps them.
METHODS = methods()


def _two_call_at_w(label: str) -> bool:
    """Whether the case's first step is ``first_step(g)`` on the gradient at ``w``, perturbing:
    the two-call API, no step begun elsewhere first, no one-pass steps."""
    entry = registry.get(OTHER_BASES[label][0] if label in OTHER_BASES else label)
    return entry.two_call and not entry.before_first_pass and not entry.one_pass


# The cases whose step can be interrupted between its halves.
TWO_CALL = [label for label in METHODS if _two_call_at_w(label)]


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)
    if isinstance(a, float) and a != a:
        return isinstance(b, float) and b != b
    return a == b


@pytest.mark.parametrize("name", list(METHODS))
def test_a_step_with_a_read_only_parameter_changes_nothing(name):
    build, step = METHODS[name]
    runs = []
    for interrupted in (False, True):
        grad_fn, params = mixed_problem()
        opt = build(params)
        step(opt, grad_fn)
        if interrupted:
            before, saved = [p.copy() for p in params], opt.state_dict()
            params[1].flags.writeable = False
            with pytest.raises(ValueError, match=r"params\[1\] is not a writable"):
                step(opt, grad_fn)
            assert all(np.array_equal(p, q) for p, q in zip(params, before))
            assert _same(opt.state_dict(), saved)
            params[1].flags.writeable = True
        for _ in range(2):
            step(opt, grad_fn)
        runs.append(params)
    for p, q in zip(*runs):
        assert np.array_equal(p, q)


@pytest.mark.parametrize("name", TWO_CALL)
def test_second_step_with_a_read_only_parameter_leaves_the_step_pending(name):
    """Between the halves: ``second_step`` raises with every array still at ``w + e`` and the step
    still pending; retried with the flag back, it completes as an uninterrupted step."""
    build, _ = METHODS[name]
    runs = []
    for interrupted in (False, True):
        grad_fn, params = mixed_problem()
        opt = build(params)
        opt.first_step(grad_fn(params)[1])
        grads = grad_fn(params)[1]
        if interrupted:
            perturbed = [p.copy() for p in params]
            params[1].flags.writeable = False
            with pytest.raises(ValueError, match=r"params\[1\] is not a writable"):
                opt.second_step(grads)
            assert all(np.array_equal(p, q) for p, q in zip(params, perturbed))
            assert opt.perturbed
            params[1].flags.writeable = True
        opt.second_step(grads)
        runs.append(params)
    for p, q in zip(*runs):
        assert np.array_equal(p, q)
