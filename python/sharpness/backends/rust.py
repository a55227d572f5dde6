"""CPU engine: the native Rust kernels over flat buffers (one kernel call per group and pass)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from sharpness import _core
from sharpness.backends._common import (
    adam_step_dtype,
    draw_uniform,
    filter_noise,
    fused_kernel_kind,
    host_copy,
    norm_weight_sq,
    scale_of,
    write_tensors,
)
from sharpness.buffers import FlatBuffers, host_view


class RustEngine:
    """Serves CPU parameters of one dtype through :mod:`sharpness._core`.

    The parameters are re-homed into :class:`~sharpness.buffers.FlatBuffers`; since they are
    ordered by group, each group is one slice of the flat buffer, and each pass is one kernel call
    per group (more only where parameters without a gradient, or with different optimizer state,
    interrupt a group).
    """

    name = "rust"
    shards_parameters = False  # the flat buffers hold whole parameters

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
        # "exact": restore from a full backup; "subtract": keep the bfloat16 offsets and subtract
        # them (2 bytes per weight, not bit-exact). Set by the optimizer.
        self.memory = "exact"
        self._offsets: Tensor | None = None
        self._offset_ranges: list[tuple[int, int]] | None = None  # set while perturbed by offsets

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
        w, g = host_view(self.buffers.np_weights), host_view(self.buffers.np_grads)
        total = 0.0
        for gi, p_lo, p_hi, lo, hi in self.group_slices:
            group = groups[gi]
            if group["sam_rho"] == 0:
                continue  # outside the perturbation: neither in the norm nor perturbed
            c2 = norm_weight_sq(group)
            part = total if c2 == 1.0 else 0.0  # weight 1: the same sums in the same order as without
            if group["sam_adaptive"]:
                # Only over parameters that hold a gradient: ASAM's (|w|+η)·0 is NaN for a
                # non-finite weight that torch would skip (grad None).
                eta = float(group["sam_eta"])
                for is_active, a, b in self._activity_runs(p_lo, p_hi):
                    if is_active:
                        part += _core.sum_of_squares_adaptive(w[a:b], g[a:b], eta)
            else:
                part += _core.sum_of_squares(g[lo:hi])  # absent gradients are zero views
            total = part if c2 == 1.0 else total + part * c2
        return total

    def perturb(self, groups: list[dict[str, Any]], norm: float) -> None:
        if self.memory == "subtract":
            self._perturb_with_offsets(groups, norm)
            return
        # Parameters without a gradient hold a zero gradient view, so `w + s·0` leaves them as
        # they are (bar the sign of a zero) and the backup restores them exactly all the same.
        w, g, b = host_view(self.buffers.np_weights), host_view(self.buffers.np_grads), host_view(self.buffers.backups())
        for gi, p_lo, p_hi, lo, hi in self.group_slices:
            group = groups[gi]
            if group["sam_rho"] == 0:
                _core.copy(w[lo:hi], b[lo:hi])  # only the backup the fused step reads
                continue
            scale = scale_of(group, norm)
            if group["sam_adaptive"]:
                # (|w|+η)²·0 is NaN for a non-finite weight without gradient: leave those alone.
                eta = float(group["sam_eta"])
                for is_active, a, z in self._activity_runs(p_lo, p_hi):
                    if is_active:
                        _core.perturb_adaptive(w[a:z], g[a:z], b[a:z], scale, eta)
                    else:
                        _core.copy(w[a:z], b[a:z])
            else:
                _core.perturb(w[lo:hi], g[lo:hi], b[lo:hi], scale)
        self.perturbed = True

    @contextmanager
    def absent_grads_as_none(self) -> Iterator[None]:
        """While the base optimizer takes its own (unfused) step: parameters that received no
        gradient show ``p.grad is None``, as torch would, so that the optimizer skips them (no
        weight decay, no momentum) instead of stepping on a zero view. The views come back after."""
        hidden = [p for p, active in zip(self.buffers.params, self.active) if not active]
        for p in hidden:
            p.grad = None
        try:
            yield
        finally:
            for i, p in enumerate(self.buffers.params):
                if p.grad is None:
                    p.grad = self.buffers.grad_views[i]

    def _perturb_with_offsets(self, groups: list[dict[str, Any]], norm: float) -> None:
        """``memory="subtract"``: ``o = bf16(e)`` kept, ``w ← w + o``; groups with ``ρ = 0``
        and (ASAM) parameters without a gradient are left untouched."""
        if self._offsets is None:
            self._offsets = torch.empty(self.buffers.numel, dtype=torch.bfloat16)
        w, g = host_view(self.buffers.np_weights), host_view(self.buffers.np_grads)
        o = self._offsets.view(torch.uint16).numpy()
        ranges: list[tuple[int, int, int, float | None]] = []  # (group, first, end, ASAM's η)
        for gi, p_lo, p_hi, lo, hi in self.group_slices:
            group = groups[gi]
            if group["sam_rho"] == 0:
                continue
            if group["sam_adaptive"]:
                eta = float(group["sam_eta"])
                ranges += [(gi, a, z, eta) for active, a, z in self._activity_runs(p_lo, p_hi) if active]
            else:
                ranges.append((gi, lo, hi, None))
        for gi, lo, hi, run_eta in ranges:
            _core.perturb_offsets(w[lo:hi], g[lo:hi], o[lo:hi], scale_of(groups[gi], norm), run_eta)
        self._offset_ranges = [(lo, hi) for _, lo, hi, _ in ranges]
        self.perturbed = True

    def restore(self) -> None:
        if self.perturbed and self._offset_ranges is not None:
            assert self._offsets is not None  # allocated before the offsets' ranges are set
            w, o = host_view(self.buffers.np_weights), self._offsets.view(torch.uint16).numpy()
            for lo, hi in self._offset_ranges:
                _core.subtract_offsets(w[lo:hi], o[lo:hi])
            self._offset_ranges = None
            self.perturbed = False
        elif self.perturbed:
            _core.copy(host_view(self.buffers.np_backup), host_view(self.buffers.np_weights))
            self.perturbed = False

    def restore_bytes(self) -> int:
        """What restoration keeps: the full backup, or the subtract mode's bfloat16 offsets."""
        return sum(t.numel() * t.element_size() for t in (self.buffers.backup, self._offsets) if t is not None)

    #: Whether a norm kept on the device (a 0-d tensor) serves :meth:`perturb` without a host read.
    takes_device_norm = False

    def serves_device_norm(self) -> bool:
        """Whether this engine's step can run on a norm kept on the device (the Triton engine)."""
        return self.takes_device_norm

    def multiply_grads(self, factor: Tensor) -> None:
        """``g ← factor·g`` for every gradient, one pass over the flat buffer (absent gradients are
        zero views: they stay zero); ``factor`` a 0-d float32 tensor (GradScaler's unscaling)."""
        grads = self.buffers.grads
        grads.mul_(factor.to(grads.device))

    def perturbed_tensors(self, groups: list[dict[str, Any]]) -> Iterator[tuple[Tensor, Tensor, Tensor, dict[str, Any]]]:
        """(weights, backup, gradients, group) per perturbed group slice, for diagnostics."""
        b = self.buffers
        for gi, _, _, lo, hi in self.group_slices:
            if groups[gi]["sam_rho"] != 0:
                yield b.weights[lo:hi], b.backup_tensor[lo:hi], b.grads[lo:hi], groups[gi]  # perturb() made the backup

    def can_fuse(self, base: torch.optim.Optimizer, groups: list[dict[str, Any]]) -> bool:
        return fused_kernel_kind(base, groups) is not None

    # -- restoration fused with the base step ---------------------------------------------------------

    def restore_and_step(self, base: torch.optim.Optimizer, groups: list[dict[str, Any]], synced: bool = False) -> None:
        """Restores the weights and applies the base optimizer's step in one pass per run of
        parameters that share a group and a state (parameters without a gradient are only
        restored, as torch skips them). Without a pending perturbation (the plain steps of SAM
        variants that skip the second pass) the step is taken in place. ``synced``: the caller
        ran :meth:`begin` since the last backward (no user code in between), so the gradient
        views need no second look."""
        kind = fused_kernel_kind(base, groups)
        if kind is None:
            raise RuntimeError("restore_and_step needs a base optimizer with a kernel")
        was_perturbed = self.perturbed
        if self._offset_ranges is not None:
            self.restore()  # nothing to fuse: subtract the offsets, then step in place
        if not synced:
            self.active = self.buffers.sync()
        for gi, p_lo, p_hi, _, _ in self.group_slices:
            group = groups[gi]
            if kind == "sgd":
                self._sgd_group(base.state, group, p_lo, p_hi)
            else:
                self._adam_group(base.state, group, p_lo, p_hi)
        self.stats["fused_steps" if was_perturbed else "fused_plain_steps"] += 1
        self.perturbed = False

    # -- vectors over all parameters, for the variants that mix gradients ------------------------

    def vector(self, name: str, state: dict) -> Any:
        """The flat array behind every parameter's ``state[p][name]`` (created at zero), as the
        kernels take it (``_flat_state``: numpy here, a tensor on the Triton engine)."""
        buf = self.buffers
        flat = self._flat_state(name)
        for i in range(len(buf.params)):
            if not buf.adopt_state(state, name, i):
                state[buf.params[i]][name] = buf.state_views[name][i]
        return flat

    def _array(self, name: str, state: dict) -> Any:
        return self._arrays()[1] if name == "grads" else self.vector(name, state)

    def dot(self, a: str, b: str, state: dict) -> float:
        """``Σ a·b`` over every parameter (``"grads"`` or a state name)."""
        return _core.dot(self._array(a, state), self._array(b, state))

    def group_dots(self, a: str, b: str, state: dict) -> dict[int, float]:
        """``Σ a·b`` per group (one kernel call per group; fp64 torch dots where the buffers are not
        host memory: the Triton subclass)."""
        native = self.kernels is _core and self.buffers.np_weights is not None
        x: Any  # numpy for the native kernels, else the flat tensors
        y: Any
        x, y = (self._array(a, state), self._array(b, state)) if native else (self.flat(a, state), self.flat(b, state))
        out: dict[int, float] = {}
        for gi, _, _, lo, hi in self.group_slices:
            if native:
                d = _core.dot(x[lo:hi], y[lo:hi])
            else:
                d = float(torch.dot(x[lo:hi].double(), y[lo:hi].double()))
            out[gi] = out.get(gi, 0.0) + d
        return out

    def state_sums_of_squares(self, name: str, state: dict) -> dict[int, float] | None:
        """Per group over every parameter of the flat buffers (None when one lacks ``name``: a base
        optimizer's buffer is never created here)."""
        if any(state.get(p, {}).get(name) is None for p in self.buffers.params):
            return None
        return self.group_dots(name, name, state)

    def scale_adaptive(self, x: str, groups: list[dict[str, Any]], state: dict) -> None:
        """``x ← T²⊙x``, ``T = |w|+η`` (in the weights' dtype), on the adaptive groups with ``ρ ≠ 0``;
        into the gradients only where a parameter holds one. Torch ops on the flat tensors (any
        device: the Triton subclass inherits it)."""
        xs, w = self.flat(x, state), self.buffers.weights
        with torch.no_grad():
            for gi, p_lo, p_hi, lo, hi in self.group_slices:
                group = groups[gi]
                if not (group["sam_adaptive"] and group["sam_rho"] != 0):
                    continue
                ranges = [(a, z) for active, a, z in self._activity_runs(p_lo, p_hi) if active] if x == "grads" else [(lo, hi)]
                for a, z in ranges:
                    t = w[a:z].abs().add_(float(group["sam_eta"]))
                    xs[a:z].mul_(t).mul_(t)

    def mean_over_ranks(self, values: list[float]) -> None:
        """CPU/flat-buffer parameters are held whole by this process: nothing to average."""
        return None

    def axpby(self, x: str, y: str, alpha: float, beta: float, state: dict) -> None:
        """``y ← alpha·x + beta·y`` (``"grads"`` or state names, distinct). Into the gradients,
        only parameters that hold one are written: the others keep torch's ``grad is None``."""
        if x == y:
            raise ValueError("axpby needs two different vectors")
        xs, ys = self._array(x, state), self._array(y, state)
        for lo, hi in self._active_ranges() if y == "grads" else [(0, len(ys))]:
            _core.axpby(xs[lo:hi], ys[lo:hi], alpha, beta)

    def copy(self, src: str, dst: str, state: dict) -> None:
        """``dst ← src`` (``"grads"`` or state names)."""
        _core.copy(self._array(src, state), self._array(dst, state))

    def group_tensors(
        self, names: list[Any], state: dict, init: dict[str, float] | None = None, every: bool = False
    ) -> dict[int, list[list[Tensor]]]:
        """Per group index: for each of ``names``, the tensors of the group's parameters that hold
        a gradient (``every``: all of them), as aligned lists, for methods written once as
        ``torch._foreach_*`` ops over every engine. Here each list holds flat-buffer slices, one per
        run of such parameters (one per group in the steady state). A name is ``"weights"``,
        ``"grads"``, ``"backup"`` (the copy :meth:`save_weights` keeps), a state name (a flat state
        buffer; a parameter without the entry gets it at zero, or at ``init[name]``), or a flat
        tensor over all this engine's parameters in order (e.g. noise), sliced the same way."""
        buf = self.buffers
        flats = []
        for name in names:
            if isinstance(name, Tensor):
                flats.append(name)
            elif name == "weights":
                flats.append(buf.weights)
            elif name == "grads":
                flats.append(buf.grads)
            elif name == "backup":
                buf.backups()
                flats.append(buf.backup_tensor)
            else:
                fill = (init or {}).get(name)
                fresh = [i for i, p in enumerate(buf.params) if name not in state[p]] if fill is not None else []
                self.vector(name, state)
                for i in fresh:
                    assert fill is not None  # fresh is empty otherwise
                    buf.state_views[name][i].fill_(fill)
                flats.append(buf.state_buffers[name])
        out: dict[int, list[list[Tensor]]] = {}
        for gi, p_lo, p_hi, lo, hi in self.group_slices:
            if every:
                ranges = [(lo, hi)]
            else:
                ranges = [(a, z) for active, a, z in self._activity_runs(p_lo, p_hi) if active]
            ranges = [(a, z) for a, z in ranges if z > a]
            if ranges:
                out[gi] = [[flat[a:z] for a, z in ranges] for flat in flats]
        return out

    def _activity_runs(self, p_lo: int, p_hi: int) -> list[tuple[bool, int, int]]:
        """(holds a gradient, first element, end element) per run of parameters ``p_lo:p_hi``."""
        offsets = self.buffers.offsets
        return [
            (is_active, offsets[i0], offsets[i1])
            for (is_active, _), i0, i1 in self._runs(p_lo, p_hi, lambda i: (self.active[i], None))
        ]

    def _active_ranges(self) -> list[tuple[int, int]]:
        """Element ranges of the runs of consecutive parameters that hold a gradient."""
        return [(lo, hi) for is_active, lo, hi in self._activity_runs(0, len(self.active)) if is_active]

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

    # What the fused steps run on: this engine's kernels over numpy views of the flat buffers.
    # The Triton engine overrides these four and inherits the steps.
    kernels: Any = _core

    def _arrays(self) -> tuple[Any, Any, Any]:
        """(weights, gradients, backup) as the kernels take them."""
        return self.buffers.np_weights, self.buffers.np_grads, self.buffers.np_backup

    def _flat_state(self, name: str, **kwargs: Any) -> Any:
        """A flat state buffer (``FlatBuffers.state_flat``) as the kernels take it."""
        return self.buffers.state_flat(name, **kwargs)

    def _restore_only(self, lo: int, hi: int) -> None:
        if self.perturbed:
            w, _, b = self._arrays()
            self.kernels.copy(b[lo:hi], w[lo:hi])

    def _source(self, lo: int, hi: int) -> Any:
        """Where a step reads the weights: the backup after a perturbation, else in place."""
        return self._arrays()[2][lo:hi] if self.perturbed else None

    def _sgd_group(self, state: dict, group: dict[str, Any], p_lo: int, p_hi: int) -> None:
        buf, active = self.buffers, self.active
        momentum = group["momentum"]
        mom = self._flat_state("momentum_buffer") if momentum != 0 else None
        if all(active[p_lo:p_hi]) and (mom is None or self._state_is_ours(state, ["momentum_buffer"], p_lo, p_hi)):
            runs = [((True, True), p_lo, p_hi)]  # the steady state: one kernel call for the group
        elif mom is None:
            runs = self._runs(p_lo, p_hi, lambda i: (active[i], True))
        else:
            runs = self._runs(
                p_lo, p_hi, lambda i: (active[i], active[i] and buf.adopt_state(state, "momentum_buffer", i))
            )
        (w, g, _), offs = self._arrays(), buf.offsets
        for (is_active, has_buffer), i0, i1 in runs:
            lo, hi = offs[i0], offs[i1]
            if not is_active:
                self._restore_only(lo, hi)
                continue
            self.kernels.restore_sgd(
                w[lo:hi],
                self._source(lo, hi),
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
        arrays = {n: host_view(buf.state_flat(n)) for n in names}
        steps = host_view(buf.state_flat("step", dtype=adam_step_dtype(), per_param=True))

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
        w, g, offs = host_view(buf.np_weights), host_view(buf.np_grads), buf.offsets
        beta1, beta2 = group["betas"]
        for (is_active, _), i0, i1 in runs:
            lo, hi = offs[i0], offs[i1]
            if not is_active:
                self._restore_only(lo, hi)
                continue
            steps[i0:i1] += 1
            _core.restore_adam(
                w[lo:hi],
                self._source(lo, hi),
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

    # -- moving the weights along a state vector (SAMPa's two points) ------------------------------

    def save_weights(self) -> None:
        """``backup ← weights`` over every parameter, marking the weights as moved: :meth:`restore`
        (or a fused :meth:`restore_and_step`) then brings them back bit for bit."""
        _core.copy(host_view(self.buffers.np_weights), host_view(self.buffers.backups()))
        self.perturbed = True

    def weights_from_backup(self, direction: str, scales: dict[int, float], state: dict) -> None:
        """``weights ← backup + scales[g]·direction`` for each group ``g`` (``direction`` is a
        state name, every parameter's, gradient or not); a group without a scale, or with 0, gets
        the backup exactly. One or two kernel calls per group. Needs :meth:`save_weights` first."""
        if not self.perturbed:
            raise RuntimeError("weights_from_backup needs save_weights() first")
        w, b = host_view(self.buffers.np_weights), host_view(self.buffers.np_backup)  # save_weights() made the backup
        d = self.vector(direction, state)
        for gi, _, _, lo, hi in self.group_slices:
            _core.copy(b[lo:hi], w[lo:hi])
            scale = float(scales.get(gi, 0.0))
            if scale != 0.0:
                _core.axpby(d[lo:hi], w[lo:hi], scale, 1.0)

    # -- more vector ops (GSAM, Friendly SAM, WSAM, RSAM, SSAM) ------------------------------------

    def flat(self, name: str, state: dict) -> Tensor:
        """The flat torch tensor behind ``"grads"`` or a state vector (created at zero)."""
        if name == "grads":
            return self.buffers.grads
        self.vector(name, state)
        return self.buffers.state_buffers[name]

    def mul(self, x: str, y: str, state: dict) -> None:
        """``y ← x ⊙ y`` elementwise (a mask applied to a vector). Into the gradients, only
        parameters that hold one are written."""
        xs, ys = self.flat(x, state), self.flat(y, state)
        with torch.no_grad():
            for lo, hi in self._active_ranges() if y == "grads" else [(0, ys.numel())]:
                ys[lo:hi].mul_(xs[lo:hi])

    def add_square(self, x: str, y: str, state: dict) -> None:
        """``y ← y + x ⊙ x`` elementwise (e.g. Fisher scores from gradients); ``y`` a state name."""
        xs, ys = self.flat(x, state), self.flat(y, state)
        with torch.no_grad():
            ys.addcmul_(xs, xs)

    def add_to_weights(self, direction: str, scales: dict[int, float], state: dict) -> None:
        """``w ← w + scales[g]·direction`` for each group ``g`` (``direction``: ``"grads"`` or a
        state name); a group without a scale, or with 0, is left as it is. One kernel call per
        group. Parameters without a gradient hold a zero gradient view, which adds nothing. (Torch
        ops on the flat tensors where the buffers are not host memory: the Triton subclass.)"""
        native = self.kernels is _core and self.buffers.np_weights is not None
        w: Any  # numpy for the native kernels, else the flat tensors
        d: Any
        w = self.buffers.np_weights if native else self.buffers.weights
        d = self._array(direction, state) if native else self.flat(direction, state)
        for gi, _, _, lo, hi in self.group_slices:
            scale = float(scales.get(gi, 0.0))
            if scale != 0.0:
                if native:
                    _core.axpby(d[lo:hi], w[lo:hi], scale, 1.0)
                else:
                    with torch.no_grad():
                        w[lo:hi].add_(d[lo:hi], alpha=scale)

    def add_noise(self, scales: dict[int, float], generator: torch.Generator) -> None:
        """``w ← w + scales[g]·z`` per group ``g``, ``z ~ N(0, I)`` drawn from ``generator`` as one
        vector over every parameter of this engine, in order (float64 for float64 weights, else
        float32, added with torch's rounding to the weights' dtype)."""
        dtype = torch.float64 if self.buffers.dtype == torch.float64 else torch.float32
        z = torch.randn(self.buffers.numel, generator=generator, dtype=dtype).to(self.buffers.device)
        w = self.buffers.weights
        with torch.no_grad():
            for gi, _, _, lo, hi in self.group_slices:
                scale = float(scales.get(gi, 0.0))
                if scale != 0.0:
                    w[lo:hi].add_(z[lo:hi], alpha=scale)

    def elementwise(
        self,
        fn: Callable[..., None],
        names: list[str],
        state: dict,
        every: bool = False,
        init: dict[str, float] | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        """The contract's :meth:`elementwise`: ``fn(torch, group, *slices)`` once per run of the
        covered parameters within a group (one per group in the steady state), on slices of the flat
        buffers (torch ops: the same code serves the Triton subclass's device buffers). ``"noise"``:
        one ``torch.randn`` (float64 for float64 weights, else float32) over the covered elements in
        order, drawn on the CPU from ``generator``."""
        buf = self.buffers
        runs: list[tuple[int, int, int]] = []  # (group, first element, end element)
        for gi, p_lo, p_hi, lo, hi in self.group_slices:
            spans = [(lo, hi)] if every else [(a, z) for active, a, z in self._activity_runs(p_lo, p_hi) if active]
            runs += [(gi, a, z) for a, z in spans if z > a]
        columns = []
        for name in names:
            if name == "noise":
                if generator is None:  # never the global generator
                    raise ValueError('elementwise(): "noise" needs the front\'s generator')
                dtype = torch.float64 if buf.dtype == torch.float64 else torch.float32
                z = torch.randn(sum(b - a for _, a, b in runs), generator=generator, dtype=dtype).to(buf.device)
                starts = [0]
                for _, a, b in runs:
                    starts.append(starts[-1] + b - a)
                columns.append([z[u:v] for u, v in zip(starts, starts[1:])])
                continue
            if name == "weights":
                flat = buf.weights
            elif name == "grads":
                flat = buf.grads
            elif name == "backup":
                buf.backups()
                flat = buf.backup_tensor
            else:
                fill = (init or {}).get(name)
                fresh = [i for i, p in enumerate(buf.params) if name not in state[p]] if fill is not None else []
                self.vector(name, state)
                for i in fresh:
                    assert fill is not None  # fresh is empty otherwise
                    buf.state_views[name][i].fill_(fill)
                flat = buf.state_buffers[name]
            columns.append([flat[a:b] for _, a, b in runs])
        with torch.no_grad():
            for k, (gi, _, _) in enumerate(runs):
                fn(torch, gi, *[column[k] for column in columns])

    def axpby_by_group(self, x: str, y: str, alphas: dict[int, float], beta: float, state: dict) -> None:
        """``y ← alphas[g]·x + beta·y`` over each group ``g`` in ``alphas`` (``"grads"`` or state
        names, distinct): one kernel call per group, or per run of parameters that hold a gradient
        when writing into the gradients (the others keep torch's ``grad is None``)."""
        if x == y:
            raise ValueError("axpby needs two different vectors")
        xs, ys = self._array(x, state), self._array(y, state)
        for gi, p_lo, p_hi, lo, hi in self.group_slices:
            if gi not in alphas:
                continue
            ranges = [(a, z) for active, a, z in self._activity_runs(p_lo, p_hi) if active] if y == "grads" else [(lo, hi)]
            for a, z in ranges:
                if z > a:
                    self._axpby_slice(xs, ys, a, z, float(alphas[gi]), float(beta))

    def _axpby_slice(self, xs: Any, ys: Any, lo: int, hi: int, alpha: float, beta: float) -> None:
        """``ys[lo:hi] ← alpha·xs[lo:hi] + beta·ys[lo:hi]`` (the Triton engine: torch ops)."""
        _core.axpby(xs[lo:hi], ys[lo:hi], alpha, beta)

    def add_filter_noise(self, into: str, scales: dict[int, float], generator: torch.Generator, state: dict) -> None:
        """Filter-wise relative noise (the contract's :meth:`add_filter_noise`), with torch ops on
        the flat buffers (any device: the Triton engine inherits it): ``z`` one ``torch.randn``
        on the CPU over the noised parameters in order, float64 for float64 weights, else
        float32 (:func:`~sharpness.backends._common.filter_noise`); ``δ`` is added to the weights
        from that precision (rounded once) and kept in ``into`` in the weights' dtype."""
        buf = self.buffers
        target = self.flat(into, state)
        views = buf.state_views[into]
        noised = [i for i, gi in enumerate(buf.group_of) if float(scales.get(gi, 0.0)) != 0.0 and buf.params[i].numel() > 0]
        with torch.no_grad():
            target.zero_()
            if not noised:
                return
            weights = [buf.weight_views[i] for i in noised]
            deltas = filter_noise(weights, [float(scales[buf.group_of[i]]) for i in noised], generator)
            for i, w, delta in zip(noised, weights, deltas):
                views[i].copy_(delta)
                w.add_(delta)

    # -- host copies and draws (SSAM's masks, ranked on the host); torch ops: Triton inherits them --

    def _views(self, name: str, state: dict) -> list[Tensor]:
        """Per parameter, its slice of ``"weights"``, ``"grads"`` (zero views where absent, after
        :meth:`begin`) or a state vector (created at zero)."""
        if name == "weights":
            return self.buffers.weight_views
        if name == "grads":
            return self.buffers.grad_views
        self.vector(name, state)
        return self.buffers.state_views[name]

    def read(self, name: str, state: dict) -> list[Any]:
        return [host_copy(v) for v in self._views(name, state)]

    def write(self, name: str, values: list[Any], state: dict) -> None:
        if name in ("grads", "weights", "backup"):
            raise ValueError(f"write() sets a state vector, not {name!r}")
        write_tensors(self._views(name, state), values)

    def draw_uniform(self, count: int, generator: torch.Generator) -> Any:
        return draw_uniform(count, generator)

    def drop_gradients(self, keep: list[bool]) -> None:
        """Each dropped gradient's view zeroed and marked absent, as :meth:`begin` finds a ``None``
        gradient, until a backward writes it again (torch ops: the Triton subclass inherits it)."""
        buf = self.buffers
        with torch.no_grad():
            for i, k in enumerate(keep):
                if not k:
                    buf.grad_views[i].zero_()
                    buf.received[i] = False
                    self.active[i] = False

    def scale(self, x: str, factor: float, state: dict) -> None:
        """``x ← factor·x`` over the flat tensor in one ``mul_`` (absent gradients are zero views:
        they stay zero)."""
        with torch.no_grad():
            self.flat(x, state).mul_(factor)
