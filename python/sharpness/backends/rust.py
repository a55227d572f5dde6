"""CPU engine: the native Rust kernels over flat buffers (one kernel call per group and pass)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import Tensor

from sharpness import _core
from sharpness.backends._common import adam_step_dtype, fused_kernel_kind, scale_of
from sharpness.buffers import FlatBuffers


class RustEngine:
    """Serves CPU parameters of one dtype through :mod:`sharpness._core`.

    The parameters are re-homed into :class:`~sharpness.buffers.FlatBuffers`; since they are
    ordered by group, each group is one slice of the flat buffer, and each pass is one kernel call
    per group (more only where parameters without a gradient, or with different optimizer state,
    interrupt a group).
    """

    name = "rust"

    def __init__(self, params: list[Tensor], group_of: list[int], stats: Counter) -> None:
        self.buffers = FlatBuffers(params, group_of, stats)
        self.stats = stats
        offsets = self.buffers.offsets
        # (group index, first param, end param, first element, end element) per group.
        self.group_slices: list[tuple[int, int, int, int, int]] = []
        start = 0
        for i in range(1, len(params) + 1):
            if i == len(params) or group_of[i] != group_of[start]:
                self.group_slices.append((group_of[start], start, i, offsets[start], offsets[i]))
                start = i
        self.active: list[bool] = []
        self.perturbed = False

    @property
    def params(self) -> list[Tensor]:
        return self.buffers.params

    def release(self) -> None:
        self.buffers.release()

    def begin(self) -> None:
        self.active = self.buffers.sync()

    def zero_grad(self, set_to_none: bool) -> None:
        self.buffers.zero_grad(set_to_none)

    def sum_of_squares(self, groups: list[dict[str, Any]]) -> float:
        w, g = self.buffers.np_weights, self.buffers.np_grads
        total = 0.0
        for gi, _, _, lo, hi in self.group_slices:
            group = groups[gi]
            if group["sam_rho"] == 0:
                continue  # outside the perturbation: neither in the norm nor perturbed
            if group["sam_adaptive"]:
                total += _core.sum_of_squares_adaptive(w[lo:hi], g[lo:hi], float(group["sam_eta"]))
            else:
                total += _core.sum_of_squares(g[lo:hi])
        return total

    def perturb(self, groups: list[dict[str, Any]], norm: float) -> None:
        # Parameters without a gradient hold a zero gradient view, so `w + s·0` leaves them as
        # they are (bar the sign of a zero) and the backup restores them exactly all the same.
        w, g, b = self.buffers.np_weights, self.buffers.np_grads, self.buffers.backups()
        for gi, _, _, lo, hi in self.group_slices:
            group = groups[gi]
            if group["sam_rho"] == 0:
                _core.restore(b[lo:hi], w[lo:hi])  # only the backup the fused step reads
                continue
            scale = scale_of(group, norm)
            if group["sam_adaptive"]:
                _core.perturb_adaptive(w[lo:hi], g[lo:hi], b[lo:hi], scale, float(group["sam_eta"]))
            else:
                _core.perturb(w[lo:hi], g[lo:hi], b[lo:hi], scale)
        self.perturbed = True

    def restore(self) -> None:
        if self.perturbed:
            _core.restore(self.buffers.np_weights, self.buffers.np_backup)
            self.perturbed = False

    def can_fuse(self, base: torch.optim.Optimizer, groups: list[dict[str, Any]]) -> bool:
        return fused_kernel_kind(base, groups) is not None

    # -- restoration fused with the base step ---------------------------------------------------------

    def restore_and_step(self, base: torch.optim.Optimizer, groups: list[dict[str, Any]]) -> None:
        """Restores the weights and applies the base optimizer's step in one pass per run of
        parameters that share a group and a state (parameters without a gradient are only
        restored, as torch skips them)."""
        kind = fused_kernel_kind(base, groups)
        if kind is None or not self.perturbed:
            raise RuntimeError("restore_and_step needs a perturbation and a base optimizer with a kernel")
        self.active = self.buffers.sync()
        for gi, p_lo, p_hi, _, _ in self.group_slices:
            group = groups[gi]
            if kind == "sgd":
                self._sgd_group(base.state, group, p_lo, p_hi)
            else:
                self._adam_group(base.state, group, p_lo, p_hi)
        self.perturbed = False
        self.stats["fused_steps"] += 1

    def _runs(self, p_lo: int, p_hi: int, key_of) -> list[tuple[Any, int, int]]:
        """Maximal runs ``(key, first, end)`` of consecutive parameters with equal keys."""
        runs: list[tuple[Any, int, int]] = []
        for i in range(p_lo, p_hi):
            key = key_of(i)
            if runs and runs[-1][0] == key:
                runs[-1] = (key, runs[-1][1], i + 1)
            else:
                runs.append((key, i, i + 1))
        return runs

    def _restore_only(self, lo: int, hi: int) -> None:
        _core.restore(self.buffers.np_weights[lo:hi], self.buffers.np_backup[lo:hi])

    def _sgd_group(self, state: dict, group: dict[str, Any], p_lo: int, p_hi: int) -> None:
        buf, active = self.buffers, self.active
        momentum = group["momentum"]
        mom = buf.state_flat("momentum_buffer") if momentum != 0 else None
        if all(active[p_lo:p_hi]) and (mom is None or self._state_is_ours(state, ["momentum_buffer"], p_lo, p_hi)):
            runs = [((True, True), p_lo, p_hi)]  # the steady state: one kernel call for the group
        elif mom is None:
            runs = self._runs(p_lo, p_hi, lambda i: (active[i], True))
        else:
            runs = self._runs(
                p_lo, p_hi, lambda i: (active[i], active[i] and buf.adopt_state(state, "momentum_buffer", i))
            )
        w, g, src, offs = buf.np_weights, buf.np_grads, buf.np_backup, buf.offsets
        for (is_active, has_buffer), i0, i1 in runs:
            lo, hi = offs[i0], offs[i1]
            if not is_active:
                self._restore_only(lo, hi)
                continue
            _core.restore_sgd(
                w[lo:hi],
                src[lo:hi],
                g[lo:hi],
                None if mom is None else mom[lo:hi],
                lr=float(group["lr"]),
                momentum=float(momentum),
                dampening=float(group["dampening"]),
                weight_decay=float(group["weight_decay"]),
                nesterov=bool(group["nesterov"]),
                maximize=bool(group.get("maximize", False)),
                init_momentum=not has_buffer,
            )
            if mom is not None and not has_buffer:
                for i in range(i0, i1):
                    state[buf.params[i]]["momentum_buffer"] = buf.state_views["momentum_buffer"][i]

    def _state_is_ours(self, state: dict, names: list[str], p_lo: int, p_hi: int) -> bool:
        """Whether every parameter's state entries ``names`` already are our views."""
        params, views = self.buffers.params, [self.buffers.state_views[n] for n in names]
        for i in range(p_lo, p_hi):
            entry = state[params[i]]
            for name, v in zip(names, views):
                if entry.get(name) is not v[i]:
                    return False
        return True

    def _adam_group(self, state: dict, group: dict[str, Any], p_lo: int, p_hi: int) -> None:
        buf, active = self.buffers, self.active
        amsgrad = bool(group["amsgrad"])
        names = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if amsgrad else [])
        arrays = {n: buf.state_flat(n) for n in names}
        steps = buf.state_flat("step", dtype=adam_step_dtype(), per_param=True)

        def key_of(i: int):
            if not active[i]:
                return (False, None)
            if not buf.adopt_state(state, "step", i):
                # torch.optim.Adam's lazy initialisation: zero moments, step 0.
                entry = state[buf.params[i]]
                for n in ["step", *names]:
                    buf.state_views[n][i].zero_()
                    entry[n] = buf.state_views[n][i]
            else:
                for n in names:
                    if not buf.adopt_state(state, n, i):
                        buf.state_views[n][i].zero_()
                        state[buf.params[i]][n] = buf.state_views[n][i]
            return (True, float(steps[i]))

        group_steps = steps[p_lo:p_hi]
        if (
            all(active[p_lo:p_hi])
            and self._state_is_ours(state, ["step", *names], p_lo, p_hi)
            and group_steps.min() == group_steps.max()
        ):
            runs = [((True, float(group_steps[0])), p_lo, p_hi)]  # the steady state
        else:
            runs = self._runs(p_lo, p_hi, key_of)
        w, g, src, offs = buf.np_weights, buf.np_grads, buf.np_backup, buf.offsets
        beta1, beta2 = group["betas"]
        for (is_active, _), i0, i1 in runs:
            lo, hi = offs[i0], offs[i1]
            if not is_active:
                self._restore_only(lo, hi)
                continue
            steps[i0:i1] += 1
            _core.restore_adam(
                w[lo:hi],
                src[lo:hi],
                g[lo:hi],
                arrays["exp_avg"][lo:hi],
                arrays["exp_avg_sq"][lo:hi],
                arrays["max_exp_avg_sq"][lo:hi] if amsgrad else None,
                step=float(steps[i0]),
                lr=float(group["lr"]),
                beta1=float(beta1),
                beta2=float(beta2),
                eps=float(group["eps"]),
                weight_decay=float(group["weight_decay"]),
                decoupled=bool(group.get("decoupled_weight_decay", False)),
                amsgrad=amsgrad,
                maximize=bool(group.get("maximize", False)),
            )
