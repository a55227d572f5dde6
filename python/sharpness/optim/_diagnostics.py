"""What a step costs and what it loses, on the torch front: the memory SAM holds, the share of the
intended perturbation the weights received (16-bit weights round small components away), and the
counts kept on the device."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from sharpness.methods import NORM_EPS
from sharpness.methods.base import Phase


class Diagnostics:
    """Mixed into :class:`sharpness.optim.SAM`."""

    # What SAM provides (declared for type checkers).
    _pending: Phase | None
    memory: str
    stats: Counter
    state: Any
    param_groups: list[dict[str, Any]]
    last_grad_norm: Any
    engines: Any

    def sync_stats(self) -> Counter:
        """Folds the counts kept on the device (non-finite norms met by the Triton path) into
        :attr:`stats` (one host sync) and returns it."""
        counter = getattr(self, "_device_nonfinite_skips", None)
        if counter is not None:
            self.stats["nonfinite_skips"] += int(counter)
            counter.zero_()
        return self.stats

    def memory_bytes(self) -> dict[str, int]:
        """Memory SAM holds beyond the model and the base optimizer: ``backup`` (what restoration
        keeps: one copy of the perturbed weights, or with ``memory="subtract"`` the bfloat16
        offsets, 2 bytes per weight) and ``flat_buffers`` (the contiguous tensors the parameters,
        gradients and state live in: they replace the parameters' own storage, so they add nothing
        once the old storage is freed). ``base_state`` is the base optimizer's state. The backup
        is allocated by the first perturbation."""
        backup = buffers = 0
        for engine in self.engines():
            if hasattr(engine, "restore_bytes"):
                backup += engine.restore_bytes()
            else:
                backup += sum(t.numel() * t.element_size() for t in getattr(engine, "backups", {}).values())
            b = getattr(engine, "buffers", None)
            if b is not None:
                buffers += sum(t.numel() * t.element_size() for t in (b.weights, b.grads, *b.state_buffers.values()))
        storages = {}
        for entry in self.state.values():
            for value in entry.values():
                if isinstance(value, Tensor):
                    storage = value.untyped_storage()
                    storages[storage.data_ptr()] = storage.nbytes()
        return {"backup": backup, "flat_buffers": buffers, "base_state": sum(storages.values())}

    @torch.no_grad()
    def perturbation_report(self) -> dict[str, float]:
        """How much of the intended perturbation ``e`` the weights actually received.

        Call it between :meth:`first_step` and :meth:`second_step`. In bfloat16 or float16 a
        component of ``e`` smaller than half an ulp of its weight rounds away: ``w + e == w``.
        Returns ``intended_norm`` (‖e‖ as computed in float64), ``realized_norm`` (‖stored(w+e) −
        w‖), ``relative_error`` (‖realized − intended‖/‖intended‖) and ``lost_fraction`` (the
        share of the non-zero components of ``e`` that left their weight unchanged). The policy
        this supports: keep float32 (master) parameters and use autocast for low precision
        compute; when the parameters themselves are 16-bit, check that ``relative_error`` is small
        for your ρ.
        """
        if self._pending != "perturbed":
            raise RuntimeError("perturbation_report() needs a pending first_step() with a perturbation")
        if self.memory != "exact":
            raise RuntimeError('perturbation_report() compares with the backup: it needs memory="exact"')
        intended_sq = realized_sq = error_sq = 0.0
        nonzero = lost = 0
        for weights, backup, grads, group in self._perturbed_tensors():
            scale = group["sam_rho"] / (self.last_grad_norm + NORM_EPS) * (-1.0 if group.get("maximize") else 1.0)
            w0 = backup.double()
            e = grads.double() * scale
            if group["sam_adaptive"]:
                e = e * (w0.abs() + group["sam_eta"]) ** 2
            realized = weights.double() - w0
            intended_sq += float((e * e).sum())
            realized_sq += float((realized * realized).sum())
            error_sq += float(((realized - e) ** 2).sum())
            mask = e != 0
            nonzero += int(mask.sum())
            lost += int((mask & (realized == 0)).sum())
        return {
            "intended_norm": math.sqrt(intended_sq),
            "realized_norm": math.sqrt(realized_sq),
            "relative_error": math.sqrt(error_sq / intended_sq) if intended_sq > 0 else 0.0,
            "lost_fraction": lost / nonzero if nonzero else 0.0,
        }

    def _perturbed_tensors(self) -> Iterable[tuple[Tensor, Tensor, Tensor, dict[str, Any]]]:
        for engine in self.engines():
            yield from engine.perturbed_tensors(self.param_groups)
