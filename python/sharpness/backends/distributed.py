"""DTensor engine: parameters sharded by FSDP2 (``fully_shard``) or laid out as any ``DTensor``.

FSDP owns its parameters' storage (the all-gather reads the local shards in place), so these
parameters are never re-homed into flat buffers. Every pass runs on each rank's local shard:

- ``sum_of_squares``: the local ``Σ g²`` of every shard, then **one** scalar all-reduce per
  (device mesh, sharded mesh dimensions) — one in all for FSDP2 — over the mesh dimensions the
  parameters are sharded on (replicated dimensions hold copies and are not summed);
- ``perturb`` / ``restore``: ``w ← w + e`` and the backup on the local shards only (the backups are
  ``DTensor`` with the parameters' placements, so they stay sharded too);
- the base optimizer then steps the ``DTensor`` parameters itself, as it does under FSDP2.

No full parameter or gradient is ever gathered for the optimizer.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeGuard

import torch
import torch.distributed as dist
from torch import Tensor

from sharpness.backends._common import norm_weight_sq
from sharpness.backends.torch_foreach import TorchEngine, real_view

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor


def is_dtensor(t: Any) -> TypeGuard[DTensor]:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (FSDP2's parameters are). Imports
    nothing: without ``torch.distributed.tensor`` loaded, no DTensor exists."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def _local(t: Tensor) -> Tensor:
    return t.to_local() if is_dtensor(t) else t


class DTensorEngine(TorchEngine):
    """Serves ``DTensor`` parameters of one (device, dtype) on their local shards, with foreach
    ops, and reduces the norm (and dot products) across the shards with one all-reduce."""

    name = "dtensor"
    shards_parameters = True  # each rank holds shards: no per-filter norms, no noise over whole parameters

    def __init__(self, params: list[Tensor], group_of: list[int], stats: Counter) -> None:
        super().__init__(params, group_of, stats)
        # For each parameter, the index of its reduction: (mesh, mesh dims it is sharded on).
        self.reductions: list[tuple[Any, tuple[int, ...]]] = []
        self.reduction_of: list[int] = []
        for p in params:
            assert is_dtensor(p)  # _layout gives this engine DTensor parameters only
            dims = []
            for d, placement in enumerate(p.placements):
                if placement.is_partial():
                    raise ValueError("SAM cannot take the norm of a Partial DTensor parameter")
                if placement.is_shard():
                    dims.append(d)
            key = (p.device_mesh, tuple(dims))
            if key not in self.reductions:
                self.reductions.append(key)
            self.reduction_of.append(self.reductions.index(key))

    def _view(self, t: Tensor) -> Tensor:
        """The local shard, as real pairs when complex."""
        return real_view(_local(t))

    def _local_factor(self, factor: Tensor, device: torch.device) -> Any:
        return float(factor)  # a plain number multiplies the local shards

    def _reduce(self, partials: dict[int, Tensor]) -> float:
        """Sums each reduction's local value over the ranks that hold its other shards."""
        total = 0.0
        for r in sorted(partials):
            value = partials[r]
            mesh, dims = self.reductions[r]
            for d in dims:
                dist.all_reduce(value, op=dist.ReduceOp.SUM, group=mesh.get_group(d))
            total += float(value)
            self.stats["dtensor_all_reduces"] += len(dims)
        return total

    def _partials(self, indices: list[int], values: Sequence[Tensor], partials: dict[int, Tensor]) -> None:
        for i, v in zip(indices, values):
            r = self.reduction_of[i]
            partials[r] = partials[r] + v if r in partials else v

    def sum_of_squares(self, groups: list[dict[str, Any]]) -> float:
        partials: dict[int, Tensor] = {}
        with torch.no_grad():
            for gi, indices in self.by_group.items():
                group = groups[gi]
                if group["sam_rho"] == 0:
                    continue  # outside the perturbation: neither in the norm nor perturbed
                weights, grads = self._lists(indices)
                # Accumulated in float64, an overflowing float32 term recomputed in float64 (a
                # local host read; the all-reduce follows anyway).
                squares = self._in_float64(group, weights, grads, self._squared_norms(group, weights, grads))
                c2 = norm_weight_sq(group)
                self._partials(indices, squares if c2 == 1.0 else [s * c2 for s in squares], partials)
        return self._reduce(partials)

    def perturb(self, groups: list[dict[str, Any]], norm: float) -> None:
        self.perturbed = []
        with torch.no_grad():
            for gi, indices in self.by_group.items():
                group = groups[gi]
                if group["sam_rho"] == 0:
                    continue
                weights, grads = self._lists(indices)
                backups = [self._view(self._backup(i)) for i in indices]
                torch._foreach_copy_(backups, weights)
                torch._foreach_add_(weights, self._perturbation(group, weights, grads, norm))
                self.perturbed.extend(indices)

    def restore(self) -> None:
        if self.perturbed:
            with torch.no_grad():
                torch._foreach_copy_(
                    [self._view(self.params[i]) for i in self.perturbed], [self._view(self.backups[i]) for i in self.perturbed]
                )
            self.perturbed = []

    def dot(self, a: str, b: str, state: dict) -> float:
        xs, ys = self._array(a, state), self._array(b, state)
        partials: dict[int, Tensor] = {}
        with torch.no_grad():
            values = [torch.dot(_local(x).reshape(-1).double(), _local(y).reshape(-1).double()) for x, y in zip(xs, ys)]
        self._partials(self._active(), values, partials)
        return self._reduce(partials)

    def group_dots(self, a: str, b: str, state: dict) -> dict[int, float]:
        """``Σ a·b`` per group: the local dots of every group as one vector per reduction, so one
        all-reduce per (reduction, sharded mesh dimension) serves all groups."""
        by_group = self._dots_by_group(a, b, state)
        groups = sorted(by_group)
        slot = {gi: k for k, gi in enumerate(groups)}
        partials: dict[int, Tensor] = {}
        with torch.no_grad():
            for gi, indices in self.by_group.items():
                for i, value in zip(indices, by_group[gi]):
                    r = self.reduction_of[i]
                    if r not in partials:
                        partials[r] = torch.zeros(len(groups), dtype=torch.float64, device=value.device)
                    partials[r][slot[gi]] += value
        totals = [0.0] * len(groups)
        for r in sorted(partials):
            mesh, dims = self.reductions[r]
            for d in dims:
                dist.all_reduce(partials[r], op=dist.ReduceOp.SUM, group=mesh.get_group(d))
            self.stats["dtensor_all_reduces"] += len(dims)
            totals = [t + v for t, v in zip(totals, partials[r].tolist())]
        return {gi: totals[slot[gi]] for gi in groups}

    # -- the vector operations of the SAM variants, on the local shards --------------------------
    # Elementwise operations need no communication: each rank applies them to its shards. Inner
    # products (``dot``, above) are reduced like the norm.

    def _array(self, name: str, state: dict) -> list[Tensor]:
        return [_local(t) for t in super()._array(name, state)]

    def group_tensors(
        self, names: list[Any], state: dict, init: dict[str, float] | None = None, every: bool = False
    ) -> dict[int, list[list[Tensor]]]:
        """As the torch engine's, as local shards. A flat tensor over whole parameters (a noise
        vector) has no shard layout here and is refused."""
        if any(isinstance(n, Tensor) for n in names):
            raise ValueError(
                "this method draws a vector over whole parameters (noise), which is not split over "
                "DTensor (FSDP2) shards: it does not support DTensor parameters"
            )
        out = super().group_tensors(names, state, init=init, every=every)
        return {gi: [[_local(t) for t in tensors] for tensors in lists] for gi, lists in out.items()}

    def save_weights(self) -> None:
        indices = [i for i, p in enumerate(self.params) if p.requires_grad]
        with torch.no_grad():
            if indices:
                torch._foreach_copy_(
                    [self._view(self._backup(i)) for i in indices], [self._view(self.params[i]) for i in indices]
                )
        self.perturbed = indices

    def weights_from_backup(self, direction: str, scales: dict[int, float], state: dict) -> None:
        by_group: dict[int, list[int]] = {}
        for i in self.perturbed:
            by_group.setdefault(self.group_of[i], []).append(i)
        with torch.no_grad():
            for gi, indices in by_group.items():
                weights = [self._view(self.params[i]) for i in indices]
                torch._foreach_copy_(weights, [self._view(self.backups[i]) for i in indices])
                scale = float(scales.get(gi, 0.0))
                if scale != 0.0:
                    vectors = [self._state_tensor(i, direction, state) for i in indices]
                    torch._foreach_add_(weights, vectors, alpha=scale)

    def add_to_weights(self, direction: str, scales: dict[int, float], state: dict) -> None:
        vectors = dict(zip(self._active(), self._array(direction, state)))
        with torch.no_grad():
            for gi, indices in self.by_group.items():
                scale = float(scales.get(gi, 0.0))
                if scale != 0.0:
                    torch._foreach_add_([self._view(self.params[i]) for i in indices], [vectors[i] for i in indices], alpha=scale)

    def mean_over_ranks(self, values: list[float]) -> list[float]:
        """Host scalars (losses of each rank's batch) averaged over the ranks of the parameters'
        device mesh: under FSDP2 (and HSDP) those are the data-parallel ranks, whose batches make
        up the global batch. One all-reduce per mesh dimension."""
        mesh = self.reductions[0][0]
        t = torch.tensor(values, dtype=torch.float64, device=_local(self.params[0]).device)
        for d in range(mesh.ndim):
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=mesh.get_group(d))
        return (t / mesh.size()).tolist()

    def add_noise(self, scales: dict[int, float], generator: torch.Generator) -> None:
        raise ValueError(
            "noise over whole parameters is not split over DTensor (FSDP2) shards: this method does "
            "not support DTensor parameters"
        )

    def add_filter_noise(self, into: str, scales: dict[int, float], generator: torch.Generator, state: dict) -> None:
        raise ValueError(
            "per-filter norms and noise over whole parameters are not split over DTensor (FSDP2) shards: "
            "this method does not support DTensor parameters"
        )
