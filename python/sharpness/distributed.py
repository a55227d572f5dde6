"""SAM under data parallelism (``torch.distributed``): DDP and FSDP2.

**Synchronised (the default).** Under ``DistributedDataParallel`` both backward passes all-reduce
the gradients, so every replica computes the same global norm and the same ``e``: the ordinary
``optimizer.step(closure)`` (or the two-call API) *is* SAM on the global batch, nothing to add.
Under FSDP2 (``fully_shard``) the parameters and gradients are ``DTensor`` shards: SAM keeps them
where FSDP put them (they are never re-homed into flat buffers) and the global norm is one scalar
all-reduce of the local sums of squares; the perturbation, the backup and the restoration stay on
the local shards.

**Per replica (m-sharpness across devices, opt-in).** The first forward/backward runs inside
``model.no_sync()``: each replica perturbs with its *own* gradient ``e_r = ρ g_r/‖g_r‖``, then the
second backward is synchronised, so the update uses ``(1/R) Σ_r ∇L_r(w + e_r)`` — m-sharpness with
``m`` = the per-replica batch (:class:`sharpness.MSharpnessSAM` with one micro-batch per replica
computes the same on one process). :func:`sam_step` makes either pattern one call.

Construction order: wrap the model in DDP and build SAM in either order (SAM re-homes CPU
parameters into flat buffers in place, which DDP follows); keep DDP's default
``gradient_as_bucket_view=False``: with ``True`` DDP rebinds ``p.grad`` to its buckets and SAM copies
them back into its buffers every pass (correct, counted in ``optimizer.stats["regathered_grads"]``,
but a copy per pass). Under FSDP2, call ``fully_shard`` first, then build SAM on
``model.parameters()`` (the ``DTensor`` parameters).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from sharpness.methods.msam import MSharpnessSAM  # the rule: both fronts' classes derive from it
from sharpness.optim.sam import SAM

__all__ = ["sam_step"]


def sam_step(
    model: torch.nn.Module,
    optimizer: SAM,
    closure: Callable[[], Tensor],
    *,
    per_replica: bool = False,
    scaler: torch.amp.GradScaler | None = None,
) -> Tensor:
    """One SAM step of a data-parallel ``model``; returns the loss of the first pass.

    Args:
        model: the ``DistributedDataParallel`` module (any module with ``no_sync()`` for
            ``per_replica``; FSDP2 and plain modules for the synchronised mode).
        optimizer: a :class:`~sharpness.SAM` or a variant taking a plain closure (with
            ``per_replica``: one that always takes the second pass).
        closure: zeroes the gradients, runs the forward pass and the backward pass (of
            ``scaler.scale(loss)`` when a ``scaler`` is given) and returns the loss. It runs twice:
            at ``w`` and at ``w + e``.
        per_replica: perturb each replica with its own gradient (the first backward inside
            ``model.no_sync()``; the second is synchronised). ``False``: SAM on the global batch.
        scaler: a ``torch.amp.GradScaler``: it is given to ``first_step`` (``grad_scaler=``) and
            the step ends with ``scaler.step(optimizer)`` and ``scaler.update()`` (a step the
            scaler skips leaves the weights restored; a variant's one-pass step runs the closure
            once).

    Example (in each process of a DDP job)::

        model = DDP(net)
        opt = sharpness.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
        def closure():
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss
        loss = sharpness.distributed.sam_step(model, opt, closure, per_replica=True)
    """
    if not isinstance(optimizer, SAM) or isinstance(optimizer, MSharpnessSAM):
        raise TypeError(
            f"sam_step needs a sharpness.SAM optimizer taking a plain closure, got {type(optimizer).__name__}"
        )
    if per_replica and type(optimizer)._second_pass_due is not SAM._second_pass_due:
        # A variant's one-pass step would use an unsynchronised gradient.
        raise ValueError(f"{type(optimizer).__name__} skips the second pass on some steps: use it without per_replica")
    if per_replica and not hasattr(model, "no_sync"):
        raise TypeError(
            f"per_replica needs a model with no_sync() (DistributedDataParallel), got {type(model).__name__}"
        )
    first_pass: Callable[[], Any] = model.no_sync if per_replica else contextlib.nullcontext  # type: ignore[assignment]

    if scaler is None:
        calls = 0

        def wrapped() -> Tensor:
            nonlocal calls
            calls += 1
            with first_pass() if calls == 1 else contextlib.nullcontext():
                return closure()

        return optimizer.step(wrapped)  # type: ignore[return-value]

    with torch.enable_grad(), first_pass():
        loss = closure()
    if optimizer.first_step(zero_grad=True, grad_scaler=scaler):
        try:
            with torch.enable_grad():
                closure()
        except BaseException:
            optimizer.restore()  # never leave the weights perturbed behind an exception
            raise
    scaler.step(optimizer)
    scaler.update()
    return loss
