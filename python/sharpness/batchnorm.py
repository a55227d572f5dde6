"""Keeping BatchNorm's running statistics out of SAM's second forward pass.

The second forward pass runs at the perturbed weights ``w + e``; letting it update BatchNorm's
running mean and variance (and ``num_batches_tracked``) would count every batch twice, once at a
point the model never takes. In training mode these helpers make BatchNorm layers normalise with
the batch statistics, exactly as in training, without touching their buffers (they stop tracking
running statistics for the duration, which is what ``F.batch_norm`` is told when it gets no
running buffers). Layers in eval mode are left alone: they do not update their buffers anyway.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

_SAVED = "_sharpness_track_running_stats"


def disable_running_stats(model: nn.Module) -> None:
    """Stops every BatchNorm layer of ``model`` in training mode from updating its running
    statistics (until :func:`enable_running_stats`)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training and not hasattr(module, _SAVED):
            setattr(module, _SAVED, module.track_running_stats)
            module.track_running_stats = False


def enable_running_stats(model: nn.Module) -> None:
    """Undoes :func:`disable_running_stats`."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and hasattr(module, _SAVED):
            module.track_running_stats = getattr(module, _SAVED)
            delattr(module, _SAVED)


@contextmanager
def frozen_running_stats(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager for SAM's second forward pass: BatchNorm layers normalise with batch
    statistics but leave their running statistics untouched.

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
