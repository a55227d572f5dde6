"""GPU engine: Triton kernels over flat buffers, with no host synchronisation in a SAM step.

The parameters of one (device, dtype) are re-homed into :class:`~sharpness.buffers.FlatBuffers`
exactly as the CPU engine does (the class is :class:`~sharpness.backends.rust.RustEngine` with
its kernel calls replaced), so each pass is one kernel launch per parameter group over
contiguous memory: the fast form. The kernels (:mod:`sharpness.backends.triton_kernels`) also
come in a multi-tensor form over lists, for tensors that cannot be re-homed.

What keeps the host out of the step:

- :meth:`TritonEngine.sum_of_squares` returns a 0-d fp64 *device* tensor (two-stage reduction,
  fp64 accumulation, deterministic order), not a float; SAM adds the engines' sums and takes the
  square root on the device.
- :meth:`TritonEngine.perturb` takes that norm tensor: each kernel program computes
  ``ρ/(‖g‖+ε)`` from it, and a non-finite norm leaves the weights exactly as they were (the
  decision is made on the device, from the same tensor; SAM counts such steps lazily).
- Adam's step count lives on the device (``state["step"]``, one fp32 per parameter, as a view of
  a flat buffer) and the bias corrections are computed from it on the device, so a captured CUDA
  graph replays correct steps. A host mirror of the counts only decides which parameters share
  one launch.
- ``memory="subtract"`` (bfloat16 offsets instead of a backup) is refused here: the Triton
  engine always keeps the exact backup.
- The only host syncs left are repairs (a parameter that received no gradient from a backward:
  one reduction to tell a zero view from an absent gradient; adopting foreign optimizer state
  held on the device) and LookSAM's ``dot`` (its scalars are host floats).

``TRITON_INTERPRET=1`` (set before the kernels are first imported) runs the same kernels on CPU
tensors, slowly: ``backend="triton"`` accepts CPU parameters then, for tests.
"""

from __future__ import annotations

import importlib.util
import os
from collections import Counter
from typing import Any

import torch
from torch import Tensor

from sharpness.backends._common import NORM_EPS, adam_step_dtype, fused_kernel_kind, norm_weight_sq
from sharpness.backends.rust import RustEngine

#: Storage types the Triton kernels take (computed in fp32).
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def interpreting() -> bool:
    """Whether Triton's interpreter is on (``TRITON_INTERPRET``), so kernels run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_importable() -> bool:
    """Whether the ``triton`` package can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def why_not(p: Tensor) -> str | None:
    """Why the Triton engine cannot serve ``p`` (None when it can)."""
    if not triton_importable():
        return "triton is not installed (pip install triton; it ships with torch's CUDA wheels on Linux)"
    if p.dtype not in TRITON_DTYPES:
        return f"the Triton kernels take {[str(d) for d in TRITON_DTYPES]}, not {p.dtype}"
    if p.device.type == "cuda":
        return None
    if p.device.type == "cpu" and interpreting():
        return None
    return f"Triton runs on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1); got a tensor on {p.device}"


def _kernels():
    from sharpness.backends import triton_kernels

    return triton_kernels


class TritonEngine(RustEngine):
    """Serves CUDA parameters of one dtype (fp32, bf16, fp16) with Triton kernels.

    Same contract as the other engines, except that :meth:`sum_of_squares` returns a 0-d fp64
    device tensor and :meth:`perturb` accepts the norm as one (``takes_device_norm``).
    """

    name = "triton"
    takes_device_norm = True

    def __init__(self, params: list[Tensor], group_of: list[int], stats: Counter) -> None:
        self.K = self.kernels = _kernels()  # the inherited fused SGD step runs these
        super().__init__(params, group_of, stats)
        # Host mirror of Adam's per-parameter step counts (None: not known without reading the
        # device); only used to group parameters with equal counts into one launch.
        self.step_mirror: list[float | None] = [None] * len(params)

    @property
    def device(self) -> torch.device:
        return self.buffers.device

    @property
    def memory(self) -> str:
        """Always ``"exact"``: restoration is from a full backup."""
        return "exact"

    @memory.setter
    def memory(self, value: str) -> None:
        if value != "exact":
            raise ValueError(f"memory={value!r} is not available on the Triton engine: it keeps the exact backup")

    # -- the SAM passes ------------------------------------------------------------------------------

    def sum_of_squares(self, groups: list[dict[str, Any]]) -> Tensor:  # type: ignore[override]
        """``Σ g²`` (``Σ ((|w|+η)g)²`` for adaptive groups) over the perturbed groups, each group's
        partial sums times ``sam_norm_weight²``, as a 0-d fp64 device tensor."""
        K, w, g = self.K, self.buffers.weights, self.buffers.grads
        parts: list[Tensor] = []
        for gi, p_lo, p_hi, lo, hi in self.group_slices:
            group = groups[gi]
            if group["sam_rho"] == 0:
                continue  # outside the perturbation: neither in the norm nor perturbed
            c2 = norm_weight_sq(group)
            mine = parts if c2 == 1.0 else []
            if group["sam_adaptive"]:
                # Only over parameters that hold a gradient: (|w|+η)·0 is NaN for a non-finite
                # weight that torch would skip (grad None).
                eta = float(group["sam_eta"])
                for is_active, a, z in self._element_runs(p_lo, p_hi):
                    if is_active:
                        mine.append(K.sum_of_squares_partials(g[a:z], w[a:z], eta))
            else:
                mine.append(K.sum_of_squares_partials(g[lo:hi]))
            if mine is not parts:
                parts.extend(p * c2 for p in mine)
        if not parts:
            return torch.zeros((), dtype=torch.float64, device=self.device)
        return K.sum_partials(parts[0] if len(parts) == 1 else torch.cat(parts))

    def perturb(self, groups: list[dict[str, Any]], norm: float | Tensor) -> None:
        """``w ← w + e`` with ``e = ±ρ·g/(norm+ε)`` (ASAM: ``·T²g``), saving ``w`` in the backup.
        ``norm`` is a float or a 0-d device tensor; a non-finite norm perturbs nothing."""
        K, buf = self.K, self.buffers
        if not isinstance(norm, Tensor):
            norm = torch.full((), float(norm), dtype=torch.float64, device=self.device)
        buf.backups()
        w, g, b = buf.weights, buf.grads, buf.backup_tensor
        for gi, p_lo, p_hi, lo, hi in self.group_slices:
            group = groups[gi]
            if group["sam_rho"] == 0:
                K.copy(w[lo:hi], b[lo:hi])  # only the backup the fused step reads
                continue
            rho = float(-group["sam_rho"] if group.get("maximize", False) else group["sam_rho"])
            if group["sam_adaptive"]:
                # (|w|+η)²·0 is NaN for a non-finite weight without gradient: leave those alone.
                eta = float(group["sam_eta"])
                for is_active, a, z in self._element_runs(p_lo, p_hi):
                    if is_active:
                        K.perturb(w[a:z], g[a:z], b[a:z], norm, rho, NORM_EPS, eta)
                    else:
                        K.copy(w[a:z], b[a:z])
            else:
                K.perturb(w[lo:hi], g[lo:hi], b[lo:hi], norm, rho, NORM_EPS, None)
        self.perturbed = True

    def _element_runs(self, p_lo: int, p_hi: int) -> list[tuple[bool, int, int]]:
        """(holds a gradient, first element, end element) per run of parameters ``p_lo:p_hi``."""
        offsets = self.buffers.offsets
        return [
            (bool(key[0]), offsets[i0], offsets[i1])
            for key, i0, i1 in self._runs(p_lo, p_hi, lambda i: (self.active[i], None))
        ]

    def restore(self) -> None:
        if self.perturbed:
            self.K.copy(self.buffers.backup, self.buffers.weights)
            self.perturbed = False

    # -- the fused steps -------------------------------------------------------------------------------

    def _arrays(self) -> tuple[Tensor, Tensor, Tensor | None]:
        return self.buffers.weights, self.buffers.grads, self.buffers.backup

    def _flat_state(self, name: str, **kwargs: Any) -> Tensor:
        self.buffers.state_flat(name, **kwargs)
        return self.buffers.state_buffers[name]

    def _adam_group(self, state: dict, group: dict[str, Any], p_lo: int, p_hi: int) -> None:
        buf, active, mirror = self.buffers, self.active, self.step_mirror
        amsgrad = bool(group["amsgrad"])
        names = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if amsgrad else [])
        arrays = {n: self._flat_state(n) for n in names}
        steps = self._flat_state("step", dtype=adam_step_dtype(), per_param=True)

        def key_of(i: int):
            if not active[i]:
                return (False, None)
            entry = state[buf.params[i]]
            current = entry.get("step")
            if current is not None and current is not buf.state_views["step"][i]:
                mirror[i] = float(current)  # foreign state: a CPU tensor or a number (a device one syncs)
            if not buf.adopt_state(state, "step", i):
                # torch.optim.Adam's lazy initialisation: zero moments, step 0.
                for n in ["step", *names]:
                    buf.state_views[n][i].zero_()
                    entry[n] = buf.state_views[n][i]
                mirror[i] = 0.0
            else:
                for n in names:
                    if not buf.adopt_state(state, n, i):
                        buf.state_views[n][i].zero_()
                        state[buf.params[i]][n] = buf.state_views[n][i]
            if mirror[i] is None:
                mirror[i] = float(buf.state_views["step"][i])  # one sync, once
            return (True, mirror[i])

        if (
            all(active[p_lo:p_hi])
            and self._state_is_ours(state, ["step", *names], p_lo, p_hi)
            and None not in mirror[p_lo:p_hi]
            and len(set(mirror[p_lo:p_hi])) == 1
        ):
            runs = [((True, mirror[p_lo]), p_lo, p_hi)]  # the steady state: one launch
        else:
            runs = self._runs(p_lo, p_hi, key_of)
        w, g, offs = buf.weights, buf.grads, buf.offsets
        beta1, beta2 = group["betas"]
        for (is_active, _), i0, i1 in runs:
            lo, hi = offs[i0], offs[i1]
            if not is_active:
                self._restore_only(lo, hi)
                continue
            steps[i0:i1] += 1
            for i in range(i0, i1):
                mirror[i] = mirror[i] + 1  # type: ignore[operator]
            powers = self.K.adam_powers(steps[i0], float(beta1), float(beta2))
            self.K.restore_adam(
                w[lo:hi],
                self._source(lo, hi),
                g[lo:hi],
                arrays["exp_avg"][lo:hi],
                arrays["exp_avg_sq"][lo:hi],
                arrays["max_exp_avg_sq"][lo:hi] if amsgrad else None,
                powers=powers,
                lr=float(group["lr"]),
                beta1=float(beta1),
                beta2=float(beta2),
                eps=float(group["eps"]),
                weight_decay=float(group["weight_decay"]),
                decoupled=bool(group.get("decoupled_weight_decay", False)),
                amsgrad=amsgrad,
                maximize=bool(group.get("maximize", False)),
            )

    def can_fuse(self, base: torch.optim.Optimizer, groups: list[dict[str, Any]]) -> bool:
        return fused_kernel_kind(base, groups) is not None

    # -- vectors over all parameters (the variants): ``vector``/``_array`` are inherited, on tensors

    def dot(self, a: str, b: str, state: dict) -> float:
        """``Σ a·b`` in fp64 (a host float: one sync)."""
        x, y = self._array(a, state), self._array(b, state)
        return float(torch.dot(x.double(), y.double()))

    def axpby(self, x: str, y: str, alpha: float, beta: float, state: dict) -> None:
        """``y ← alpha·x + beta·y`` computed in fp32, rounded once."""
        if x == y:
            raise ValueError("axpby needs two different vectors")
        xs, ys = self._array(x, state), self._array(y, state)
        for lo, hi in self._active_ranges() if y == "grads" else [(0, ys.numel())]:
            ys[lo:hi] = xs[lo:hi].float() * alpha + ys[lo:hi].float() * beta

    def copy(self, src: str, dst: str, state: dict) -> None:
        self._array(dst, state).copy_(self._array(src, state))

    def _axpby_slice(self, xs: Tensor, ys: Tensor, lo: int, hi: int, alpha: float, beta: float) -> None:
        """``axpby_by_group``'s slices, computed in fp32 and rounded once (as :meth:`axpby`)."""
        ys[lo:hi] = xs[lo:hi].float() * alpha + ys[lo:hi].float() * beta

    # -- weights moved from a saved copy (SAMPa) -----------------------------------------------------------

    def save_weights(self) -> None:
        """``backup ← weights``, marking the weights as moved (restored bit for bit later)."""
        self.buffers.backups()
        self.K.copy(self.buffers.weights, self.buffers.backup)
        self.perturbed = True

    def weights_from_backup(self, direction: str, scales: dict[int, float], state: dict) -> None:
        """``weights ← backup + scales[g]·direction`` per group (computed in fp32, rounded once);
        a group without a scale, or with 0, gets the backup exactly."""
        if not self.perturbed:
            raise RuntimeError("weights_from_backup needs save_weights() first")
        w, b = self.buffers.weights, self.buffers.backup_tensor  # save_weights() made the backup
        d = self.vector(direction, state)
        for gi, _, _, lo, hi in self.group_slices:
            self.K.copy(b[lo:hi], w[lo:hi])
            scale = float(scales.get(gi, 0.0))
            if scale != 0.0:
                w[lo:hi] = d[lo:hi].float() * scale + w[lo:hi].float()
