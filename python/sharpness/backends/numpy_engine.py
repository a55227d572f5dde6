"""The numpy engine: the engine contract over the caller's own numpy arrays, through
:mod:`sharpness._core` (one multi-tensor kernel call per group and pass), without torch.

It serves the parameters of one dtype. The weights are the caller's arrays, updated in place; the
gradients are the arrays the caller passed to the current call, read as they are and copied only
when a method writes into them (LookSAM's direction, SSAM's mask ...), so the caller's gradient
arrays are never modified. Per-parameter vectors live in the front's ``state`` (keyed by the
parameter's index), as torch's optimizers keep theirs.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from sharpness import _core
from sharpness.methods import NORM_EPS


def scale_of(group: dict[str, Any], norm: float) -> float:
    """``ρ/(‖g‖ + ε)``, negated for a group that maximizes (SAM on ``−L``)."""
    scale = group["sam_rho"] / (norm + NORM_EPS)
    return -scale if group.get("maximize", False) else scale


class NumpyEngine:
    """Serves numpy parameters of one dtype (see the module docstring)."""

    name = "numpy"

    def __init__(self, params: list[np.ndarray], keys: list[int], group_of: list[int], stats: Counter) -> None:
        self.params = params
        self.keys = keys  # each parameter's index in the front's state (torch's state_dict numbering)
        self.group_of = group_of
        self.stats = stats
        self.grads: list[np.ndarray] = []
        self._own_grads = False
        self._backups: list[np.ndarray] | None = None
        self.perturbed = False
        # (group index, first parameter, end parameter): parameters are ordered by group.
        self.group_runs: list[tuple[int, int, int]] = []
        start = 0
        for i in range(1, len(params) + 1):
            if i == len(params) or group_of[i] != group_of[start]:
                self.group_runs.append((group_of[start], start, i))
                start = i

    # -- the call's gradients ------------------------------------------------------------------------

    def take(self, grads: list[np.ndarray]) -> None:
        """The gradients of this call (checked by the front: same shapes and dtype, C-contiguous)."""
        self.grads = grads
        self._own_grads = False

    def _writable_grads(self) -> list[np.ndarray]:
        if not self._own_grads:
            self.grads = [g.copy() for g in self.grads]
            self._own_grads = True
        return self.grads

    def begin(self) -> None:
        """Nothing to take stock of: every numpy parameter is given a gradient."""

    def zero_grad(self, set_to_none: bool) -> None:
        self.grads = []
        self._own_grads = False

    def release(self) -> None:
        """Nothing to give back: the parameters never left the caller's arrays."""

    # -- SAM's passes ----------------------------------------------------------------------------------

    def backups(self) -> list[np.ndarray]:
        if self._backups is None:
            self._backups = [np.empty_like(p) for p in self.params]
        return self._backups

    def sum_of_squares(self, groups: list[dict[str, Any]]) -> float:
        total = 0.0
        for gi, lo, hi in self.group_runs:
            group = groups[gi]
            if group["sam_rho"] == 0:
                continue  # outside the perturbation: neither in the norm nor perturbed
            c = float(group.get("sam_norm_weight", 1.0))
            if group["sam_adaptive"]:
                part = _core.sum_of_squares_adaptive(self.params[lo:hi], self.grads[lo:hi], float(group["sam_eta"]))
            else:
                part = _core.sum_of_squares(self.grads[lo:hi])
            total += part if c == 1.0 else part * c * c
        return total

    def perturb(self, groups: list[dict[str, Any]], norm: float) -> None:
        w, g, b = self.params, self.grads, self.backups()
        for gi, lo, hi in self.group_runs:
            group = groups[gi]
            if group["sam_rho"] == 0:
                _core.restore(b[lo:hi], w[lo:hi])  # only the backup the fused step reads
            elif group["sam_adaptive"]:
                _core.perturb_adaptive(w[lo:hi], g[lo:hi], b[lo:hi], scale_of(group, norm), float(group["sam_eta"]))
            else:
                _core.perturb(w[lo:hi], g[lo:hi], b[lo:hi], scale_of(group, norm))
        self.perturbed = True

    def restore(self) -> None:
        if self.perturbed:
            _core.restore(self.params, self.backups())
            self.perturbed = False

    def restore_bytes(self) -> int:
        return 0 if self._backups is None else sum(b.nbytes for b in self._backups)

    def can_fuse(self, base: Any, groups: list[dict[str, Any]]) -> bool:
        return True  # the numpy front's base optimizers are the fused kernels themselves

    def restore_and_step(self, base: Any, groups: list[dict[str, Any]], synced: bool = False) -> None:
        """Restores the weights and takes ``base``'s step (``base.kind``: ``"sgd"`` or ``"adam"``,
        torch.optim's semantics; state in ``base.state[key]``, created as torch creates it)."""
        was_perturbed = self.perturbed
        for gi, lo, hi in self.group_runs:
            if base.kind == "sgd":
                self._sgd(base.state, groups[gi], lo, hi)
            else:
                self._adam(base.state, groups[gi], lo, hi)
        self.stats["fused_steps" if was_perturbed else "fused_plain_steps"] += 1
        self.perturbed = False

    def _source(self, lo: int, hi: int) -> list[np.ndarray] | None:
        return self.backups()[lo:hi] if self.perturbed else None

    def _sgd(self, state: dict, group: dict[str, Any], lo: int, hi: int) -> None:
        momentum = float(group["momentum"])
        entries = [state.setdefault(k, {}) for k in self.keys[lo:hi]]
        # Parameters with and without a momentum buffer (a checkpoint of a run that started later)
        # step in separate runs: torch starts a missing buffer as the first update direction.
        for has_buffer in (True, False):
            idx = [j for j, e in enumerate(entries) if (momentum != 0 and "momentum_buffer" in e) == has_buffer]
            if not idx:
                continue
            bufs = None
            if momentum != 0:
                for j in idx:
                    if not has_buffer:
                        entries[j]["momentum_buffer"] = np.empty_like(self.params[lo + j])
                bufs = [entries[j]["momentum_buffer"] for j in idx]
            source = self._source(lo, hi)
            _core.restore_sgd(
                [self.params[lo + j] for j in idx],
                None if source is None else [source[j] for j in idx],
                [self.grads[lo + j] for j in idx],
                bufs,
                lr=float(group["lr"]),
                momentum=momentum,
                dampening=float(group["dampening"]),
                weight_decay=float(group["weight_decay"]),
                nesterov=bool(group["nesterov"]),
                maximize=bool(group.get("maximize", False)),
                init_momentum=momentum != 0 and not has_buffer,
            )

    def _adam(self, state: dict, group: dict[str, Any], lo: int, hi: int) -> None:
        amsgrad = bool(group["amsgrad"])
        names = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if amsgrad else [])
        entries = [state.setdefault(k, {}) for k in self.keys[lo:hi]]
        for j, entry in enumerate(entries):
            if "step" not in entry:
                entry["step"] = 0.0  # torch.optim.Adam's lazy initialisation: zero moments, step 0
            for n in names:
                if n not in entry:
                    entry[n] = np.zeros_like(self.params[lo + j])
        source = self._source(lo, hi)
        beta1, beta2 = group["betas"]
        for step in sorted({float(e["step"]) for e in entries}):  # one call per run of equal steps
            idx = [j for j, e in enumerate(entries) if float(e["step"]) == step]
            for j in idx:
                entries[j]["step"] = step + 1.0
            _core.restore_adam(
                [self.params[lo + j] for j in idx],
                None if source is None else [source[j] for j in idx],
                [self.grads[lo + j] for j in idx],
                [entries[j]["exp_avg"] for j in idx],
                [entries[j]["exp_avg_sq"] for j in idx],
                [entries[j]["max_exp_avg_sq"] for j in idx] if amsgrad else None,
                step=step + 1.0,
                lr=float(group["lr"]),
                beta1=float(beta1),
                beta2=float(beta2),
                eps=float(group["eps"]),
                weight_decay=float(group["weight_decay"]),
                decoupled=bool(group.get("decoupled_weight_decay", False)),
                amsgrad=amsgrad,
                maximize=bool(group.get("maximize", False)),
            )

    # -- named vectors ---------------------------------------------------------------------------------

    def vector(self, name: str, state: dict) -> list[np.ndarray]:
        """Every parameter's ``state[key][name]`` (created at zero)."""
        out = []
        for key, p in zip(self.keys, self.params):
            entry = state.setdefault(key, {})
            if name not in entry:
                entry[name] = np.zeros_like(p)
            out.append(entry[name])
        return out

    def _array(self, name: str, state: dict, write: bool = False) -> list[np.ndarray]:
        if name == "grads":
            return self._writable_grads() if write else self.grads
        if name == "weights":
            return self.params
        if name == "backup":
            return self.backups()
        return self.vector(name, state)

    def dot(self, a: str, b: str, state: dict) -> float:
        return _core.dot(self._array(a, state), self._array(b, state))

    def axpby(self, x: str, y: str, alpha: float, beta: float, state: dict) -> None:
        if x == y:
            raise ValueError("axpby needs two different vectors")
        ys = self._array(y, state, write=True)
        _core.axpby(self._array(x, state), ys, alpha, beta)

    def copy(self, src: str, dst: str, state: dict) -> None:
        dsts = self._array(dst, state, write=True)
        _core.restore(dsts, self._array(src, state))

    def mul(self, x: str, y: str, state: dict) -> None:
        ys = self._array(y, state, write=True)
        for a, b in zip(self._array(x, state), ys):
            np.multiply(b, a, out=b)

    def add_square(self, x: str, y: str, state: dict) -> None:
        ys = self._array(y, state, write=True)
        for a, b in zip(self._array(x, state), ys):
            b += a * a

    def save_weights(self) -> None:
        _core.restore(self.backups(), self.params)
        self.perturbed = True

    def weights_from_backup(self, direction: str, scales: dict[int, float], state: dict) -> None:
        if not self.perturbed:
            raise RuntimeError("weights_from_backup needs save_weights() first")
        d, w, b = self._array(direction, state), self.params, self.backups()
        for gi, lo, hi in self.group_runs:
            _core.restore(w[lo:hi], b[lo:hi])
            scale = float(scales.get(gi, 0.0))
            if scale != 0.0:
                _core.axpby(d[lo:hi], w[lo:hi], scale, 1.0)

    def add_to_weights(self, direction: str, scales: dict[int, float], state: dict) -> None:
        d, w = self._array(direction, state), self.params
        for gi, lo, hi in self.group_runs:
            scale = float(scales.get(gi, 0.0))
            if scale != 0.0:
                _core.axpby(d[lo:hi], w[lo:hi], scale, 1.0)

    def add_noise(self, scales: dict[int, float], generator: np.random.Generator) -> None:
        """``w ← w + scales[g]·z`` per group ``g``, ``z ~ N(0, I)`` drawn from ``generator`` over
        every parameter in order (float64 draws, rounded to the weights' dtype)."""
        for gi, lo, hi in self.group_runs:
            scale = float(scales.get(gi, 0.0))
            for p in self.params[lo:hi]:
                z = generator.standard_normal(p.shape)
                if scale != 0.0:
                    p += (scale * z).astype(p.dtype)
