"""Keeping BatchNorm's running statistics out of SAM's second forward pass.

The second forward pass runs at the perturbed weights ``w + e``; letting it update BatchNorm's
running mean and variance (and ``num_batches_tracked``) would count every batch twice, once at a
point the model never takes. These helpers snapshot the running statistics of every BatchNorm
layer before the second pass and copy them back after it: the pass itself normalises with batch
statistics exactly as in training, and the statistics come back bit for bit.

Nothing about the modules changes (no attribute is toggled), so a ``torch.compile``-d model sees
the same module state in both passes and is not recompiled.

- two-call API: wrap the second forward in :func:`frozen_running_stats`;
- closure API: ``opt.step(update_stats_once(model, closure))``: the closure's first call in the step
  updates the statistics, every later call (at ``w + e``, GAM's other points ...) leaves them as
  they were.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from torch import nn

_SAVED = "_sharpness_saved_running_stats"
# torch's own guard (torch >= 2.2); without it, run the backward inside the `with` block.
_preserve_version = getattr(torch.autograd.grad_mode, "_unsafe_preserve_version_counter", None) or (
    lambda tensor: contextlib.nullcontext()
)
_STAT_NAMES = ("running_mean", "running_var", "num_batches_tracked")
_Result = TypeVar("_Result")


def _batchnorms(model: nn.Module) -> Iterator[nn.modules.batchnorm._BatchNorm]:
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            yield module


@torch.no_grad()
def disable_running_stats(model: nn.Module) -> None:
    """Saves the running statistics of every BatchNorm layer of ``model``; the next
    :func:`enable_running_stats` puts them back, undoing whatever the forward passes in between
    did to them (the two-call form of :func:`frozen_running_stats`: keep SAM's second forward
    pass, at ``w + e``, out of the statistics).

    Example:
        >>> import torch, sharpness
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        >>> before = model[1].running_mean.clone()
        >>> sharpness.disable_running_stats(model)
        >>> _ = model(torch.randn(8, 3))  # the second pass would run here
        >>> sharpness.enable_running_stats(model)
        >>> torch.equal(model[1].running_mean, before)
        True
    """
    for module in _batchnorms(model):
        if not hasattr(module, _SAVED):
            saved = {n: getattr(module, n).clone() for n in _STAT_NAMES if getattr(module, n, None) is not None}
            setattr(module, _SAVED, saved)


@torch.no_grad()
def enable_running_stats(model: nn.Module) -> None:
    """Restores the statistics saved by :func:`disable_running_stats`, bit for bit.

    The values are copied back into the same tensors (whoever holds them, DDP's buffer
    broadcast for one, keeps seeing them) without bumping their autograd version: a backward
    pass that runs after the ``with`` block (the usual closure: forward inside, backward after)
    still finds the graph it saved. Training-mode BatchNorm's backward does not read the running
    statistics, so this is exact.

    Example:
        >>> import torch, sharpness
        >>> model = torch.nn.BatchNorm1d(2)
        >>> sharpness.disable_running_stats(model)
        >>> _ = model(torch.randn(4, 2) + 5.0)
        >>> sharpness.enable_running_stats(model)
        >>> model.running_mean.tolist(), int(model.num_batches_tracked)
        ([0.0, 0.0], 0)
    """
    for module in model.modules():
        saved = module.__dict__.pop(_SAVED, None)
        if saved is not None:
            for name, value in saved.items():
                target = getattr(module, name)
                with _preserve_version(target):
                    target.copy_(value)


@contextmanager
def frozen_running_stats(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager for SAM's second forward pass: BatchNorm layers normalise with batch
    statistics as in training, and their running statistics are the same afterwards.

    Example:
        >>> import torch, sharpness
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
        >>> before = model[1].running_mean.clone()
        >>> with sharpness.frozen_running_stats(model):
        ...     _ = model(torch.randn(8, 4))
        >>> bool((model[1].running_mean == before).all())
        True
    """
    disable_running_stats(model)
    try:
        yield model
    finally:
        enable_running_stats(model)


def update_stats_once(model: nn.Module, closure: Callable[..., _Result]) -> Callable[..., _Result]:
    """The closure for one ``opt.step(closure)`` call, with BatchNorm's running statistics updated
    by its first call only: every later call of the step runs under :func:`frozen_running_stats`.

    Build it anew for every step, at the call: ``opt.step(update_stats_once(model, closure))``. It
    counts the calls of one step, so a wrapper kept from an earlier step would freeze them all.

    Each step counts one batch, whatever the method calls the closure for (after the step the
    statistics are, bit for bit, those of the step's first forward pass): SAM and its variants (at
    ``w``, then at ``w + e``), LookSAM, EveryKSAM and AE-SAM (their one-pass steps call it once),
    GAM (four points) and CR-SAM (three), ESAM (``closure(indices)``: the call at ``w`` counts),
    LETS (its training closure runs again for ``ρ``'s update; its validation closure is not
    wrapped: run that forward pass under :func:`frozen_running_stats` to keep validation batches
    out of the statistics). Momentum-SAM, RandomSAM and SAMPa take their first gradient away from
    ``w`` (at ``w − ρv/‖v‖``, ``w + δ``, ``y``): that pass is the one that counts.
    :class:`sharpness.MSharpnessSAM` calls ``closure(i)`` twice per micro-batch ``i``: the first
    call for each ``i`` (at ``w``) counts, so the statistics see every micro-batch once, as in
    plain training.

    The frozen calls normalise with batch statistics exactly as in training (the model stays in
    train mode); only the running mean, variance and ``num_batches_tracked`` are put back.

    Args:
        model: the module whose BatchNorm layers the closure runs (a ``DistributedDataParallel``
            or ``torch.compile`` wrapper, or the model inside it).
        closure: the usual training closure (zero the gradients, forward, backward, return the
            loss); its arguments, if the method passes any, are passed through.

    Example:
        >>> import torch, sharpness
        >>> from sharpness.batchnorm import update_stats_once
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
        >>> opt = sharpness.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> loss = opt.step(update_stats_once(model, closure))  # two forward passes, one update
        >>> int(model[1].num_batches_tracked)
        1
    """
    seen: set[int | None] = set()

    def closure_updating_stats_once(*args: Any, **kwargs: Any) -> _Result:
        # MSharpnessSAM passes the micro-batch index (an int): each micro-batch's first call counts.
        # Other arguments (ESAM's sample indices) pick samples of the same batch: one key for all.
        key = args[0] if args and type(args[0]) is int else None
        if key in seen:
            with frozen_running_stats(model):
                return closure(*args, **kwargs)
        seen.add(key)
        return closure(*args, **kwargs)

    return closure_updating_stats_once
