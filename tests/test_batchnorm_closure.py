"""`sharpness.batchnorm.update_stats_once`: with the closure API, BatchNorm's running statistics are
updated by the first forward pass of each step only, whatever the method calls the closure for."""

from __future__ import annotations

import copy

import pytest
import registry
import torch
import torch.nn.functional as F
from torch import nn

from sharpness.batchnorm import frozen_running_stats, update_stats_once

STEPS = 3  # LookSAM with k=2: a SAM step, a one-pass step, a SAM step


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))


def _batches(n: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 6, generator=g) * 2 + 1, torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


def _stats(model: nn.Module) -> list[torch.Tensor]:
    names = ("running_mean", "running_var", "num_batches_tracked")
    return [b.clone() for name, b in model.named_buffers() if name.rsplit(".", 1)[-1] in names]


def _stats_after_forward(model: nn.Module, *inputs: torch.Tensor) -> list[torch.Tensor]:
    """The statistics a copy of ``model`` (at its current weights, in train mode) has after one
    forward pass on each of ``inputs``."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for x in inputs:
            twin(x)
    return _stats(twin)


def _assert_bitwise_equal(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(actual) == len(expected) == 6
    for a, e in zip(actual, expected):
        assert torch.equal(a, e), (a, e)


def _closure(model, opt, x, y):
    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("label", ["sam", "looksam", "gam"])
def test_the_statistics_are_those_of_one_forward_pass_at_w(label):
    """After each step, bit for bit the statistics of one train-mode forward pass at the step's
    ``w``: SAM (two calls), LookSAM's SAM steps and one-pass steps (two calls, one call), GAM (four)."""
    model = _model()
    opt = registry.get(label).torch(model.parameters(), torch.optim.SGD, base_kwargs=dict(lr=0.1, momentum=0.9))
    calls = []
    for x, y in _batches():
        expected = _stats_after_forward(model, x)  # model at w, before the step moves it
        closure = _closure(model, opt, x, y)

        def counted(closure=closure):
            calls.append(1)
            return closure()

        opt.step(update_stats_once(model, counted))
        _assert_bitwise_equal(_stats(model), expected)
    assert {"sam": 6, "looksam": 5, "gam": 12}[label] == len(calls)  # the closure did run more than once


def test_without_the_helper_the_second_pass_counts_too():
    """What the helper prevents: plain ``opt.step(closure)`` updates the statistics twice per step."""
    model = _model()
    opt = registry.get("sam").torch(model.parameters(), torch.optim.SGD, base_kwargs=dict(lr=0.1))
    (x, y), = _batches(1)
    expected = _stats_after_forward(model, x)
    opt.step(_closure(model, opt, x, y))
    assert int(model[1].num_batches_tracked) == 2
    assert not torch.equal(model[1].running_mean, expected[0])


def test_micro_batches_each_count_once():
    """MSharpnessSAM calls ``closure(i)`` at ``w`` and at ``w + e_i`` for each micro-batch: the
    statistics are those of one forward pass per micro-batch at ``w``, in order."""
    model = _model()
    opt = registry.get("msam").torch(model.parameters(), torch.optim.SGD, base_kwargs=dict(lr=0.1))
    for x, y in _batches():
        micro = list(zip(x.chunk(2), y.chunk(2)))
        expected = _stats_after_forward(model, *(xi for xi, _ in micro))

        def closure(i):
            opt.zero_grad()
            loss = F.cross_entropy(model(micro[i][0]), micro[i][1])
            loss.backward()
            return loss

        opt.step(update_stats_once(model, closure))
        _assert_bitwise_equal(_stats(model), expected)


def _step(entry, model, opt, x, y):
    """One whole step of ``entry``'s method, driven as it is driven, its training closure wrapped."""
    if entry.drive == "micro":
        micro = list(zip(x.chunk(2), y.chunk(2)))

        def per_micro_batch(i):
            opt.zero_grad()
            loss = F.cross_entropy(model(micro[i][0]), micro[i][1])
            loss.backward()
            return loss

        return opt.step(update_stats_once(model, per_micro_batch))
    if entry.drive == "per_sample":

        def per_sample(indices=None):
            chosen = slice(None) if indices is None else indices
            return F.cross_entropy(model(x[chosen]), y[chosen], reduction="none")

        return opt.step(update_stats_once(model, per_sample))
    closure = update_stats_once(model, _closure(model, opt, x, y))
    if entry.drive == "validation":
        x_val, y_val = x.flip(0) * 0.5, y.flip(0)

        def validation():
            opt.zero_grad()
            with frozen_running_stats(model):  # validation batches stay out of the statistics
                loss = F.cross_entropy(model(x_val), y_val)
            loss.backward()
            return loss

        return opt.step(closure, validation)
    return opt.step(closure)


@pytest.mark.parametrize("label", registry.labels())
def test_every_method_updates_the_statistics_once_per_step(label):
    """Whatever a method calls the closure for (one to four times, per sample, per micro-batch,
    again for ρ's update), ``num_batches_tracked`` moves by one per step (per micro-batch for
    m-sharpness), and the statistics stay those of forward passes the step took."""
    entry = registry.get(label)
    model = _model()
    opt = entry.torch(model.parameters(), torch.optim.SGD, base_kwargs=dict(lr=0.05))
    per_step = 2 if entry.drive == "micro" else 1
    for done, (x, y) in enumerate(_batches(), start=1):
        _step(entry, model, opt, x, y)
        assert int(model[1].num_batches_tracked) == int(model[4].num_batches_tracked) == per_step * done
        assert all(torch.isfinite(s).all() for s in _stats(model))
