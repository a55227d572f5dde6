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
from collections.abc import Callable
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
    shards_parameters = False  # every parameter is a whole array

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
                _core.copy(w[lo:hi], b[lo:hi])  # only the backup the fused step reads
            elif group["sam_adaptive"]:
                _core.perturb_adaptive(w[lo:hi], g[lo:hi], b[lo:hi], scale_of(group, norm), float(group["sam_eta"]))
            else:
                _core.perturb(w[lo:hi], g[lo:hi], b[lo:hi], scale_of(group, norm))
        self.perturbed = True

    def restore(self) -> None:
        if self.perturbed:
            _core.copy(self.backups(), self.params)
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

    def vector(self, name: str, state: dict, fill: float | None = None) -> list[np.ndarray]:
        """Every parameter's ``state[key][name]`` (created at zero, or at ``fill``)."""
        out = []
        for key, p in zip(self.keys, self.params):
            entry = state.setdefault(key, {})
            if name not in entry:
                entry[name] = np.zeros_like(p) if fill is None else np.full_like(p, fill)
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

    def group_dots(self, a: str, b: str, state: dict) -> dict[int, float]:
        xs, ys = self._array(a, state), self._array(b, state)
        out: dict[int, float] = {}
        for gi, lo, hi in self.group_runs:
            out[gi] = out.get(gi, 0.0) + _core.dot(xs[lo:hi], ys[lo:hi])
        return out

    def state_sums_of_squares(self, name: str, state: dict) -> dict[int, float] | None:
        if any(state.get(key, {}).get(name) is None for key in self.keys):
            return None  # a base optimizer's buffer not created yet: never created here
        return self.group_dots(name, name, state)

    def scale_adaptive(self, x: str, groups: list[dict[str, Any]], state: dict) -> None:
        xs = self._array(x, state, write=True)
        for gi, lo, hi in self.group_runs:
            group = groups[gi]
            if group["sam_adaptive"] and group["sam_rho"] != 0:
                for v, w in zip(xs[lo:hi], self.params[lo:hi]):  # numpy elementwise: no kernel forms T²⊙x
                    t = np.abs(w)
                    t += float(group["sam_eta"])
                    v *= t
                    v *= t

    def mean_over_ranks(self, values: list[float]) -> None:
        """One process holds every array: nothing to average."""
        return None

    def axpby(self, x: str, y: str, alpha: float, beta: float, state: dict) -> None:
        if x == y:
            raise ValueError("axpby needs two different vectors")
        ys = self._array(y, state, write=True)
        _core.axpby(self._array(x, state), ys, alpha, beta)

    def copy(self, src: str, dst: str, state: dict) -> None:
        dsts = self._array(dst, state, write=True)
        _core.copy(self._array(src, state), dsts)

    def mul(self, x: str, y: str, state: dict) -> None:
        ys = self._array(y, state, write=True)
        for a, b in zip(self._array(x, state), ys):
            np.multiply(b, a, out=b)

    def add_square(self, x: str, y: str, state: dict) -> None:
        ys = self._array(y, state, write=True)
        for a, b in zip(self._array(x, state), ys):
            b += a * a

    def save_weights(self) -> None:
        _core.copy(self.params, self.backups())
        self.perturbed = True

    def weights_from_backup(self, direction: str, scales: dict[int, float], state: dict) -> None:
        if not self.perturbed:
            raise RuntimeError("weights_from_backup needs save_weights() first")
        d, w, b = self._array(direction, state), self.params, self.backups()
        for gi, lo, hi in self.group_runs:
            _core.copy(b[lo:hi], w[lo:hi])
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

    def elementwise(
        self,
        fn: Callable[..., None],
        names: list[str],
        state: dict,
        every: bool = False,
        init: dict[str, float] | None = None,
        generator: np.random.Generator | None = None,
    ) -> None:
        """The contract's :meth:`elementwise`: ``fn(numpy, group, *arrays)`` once per array (every
        numpy parameter holds a gradient, so ``every`` changes nothing). ``"grads"`` are read-only
        views of the caller's arrays (never written); ``"noise"`` is one
        ``generator.standard_normal(n, dtype=dtype)`` over this engine's arrays, in order."""
        columns = []
        for name in names:
            if name == "noise":
                if generator is None:  # never the global generator
                    raise ValueError('elementwise(): "noise" needs the front\'s generator')
                z = generator.standard_normal(sum(p.size for p in self.params), dtype=self.params[0].dtype)
                offsets = np.cumsum([0] + [p.size for p in self.params])
                columns.append([z[a:b].reshape(p.shape) for a, b, p in zip(offsets, offsets[1:], self.params)])
            elif name == "grads":
                views = [g.view() for g in self.grads]
                for v in views:
                    v.flags.writeable = False
                columns.append(views)
            elif name in ("weights", "backup"):
                columns.append(self._array(name, state))
            else:
                columns.append(self.vector(name, state, (init or {}).get(name)))
        for gi, lo, hi in self.group_runs:
            for j in range(lo, hi):
                fn(np, gi, *[column[j] for column in columns])

    def axpby_by_group(self, x: str, y: str, alphas: dict[int, float], beta: float, state: dict) -> None:
        """``y ← alphas[g]·x + beta·y`` over the parameters of each group ``g`` in ``alphas``."""
        if x == y:
            raise ValueError("axpby needs two different vectors")
        ys = self._array(y, state, write=True)
        xs = self._array(x, state)
        for gi, lo, hi in self.group_runs:
            if gi in alphas:
                _core.axpby(xs[lo:hi], ys[lo:hi], float(alphas[gi]), float(beta))

    def add_filter_noise(self, into: str, scales: dict[int, float], generator: Any, state: dict) -> None:
        """Filter-wise relative noise (the contract's :meth:`add_filter_noise`): one
        ``generator.standard_normal(n, dtype=dtype)`` in this engine's dtype over the noised arrays
        in order (``n`` their total size; nothing drawn where it is 0), array ``i`` taking the next
        ``p.size`` numbers in C order; the per-row norms in float64, times the scale, rounded to
        the dtype; ``δ = z·scale`` in the dtype, then ``w ← w + δ``."""
        targets = self.vector(into, state)
        noised = [i for gi, lo, hi in self.group_runs if float(scales.get(gi, 0.0)) != 0.0 for i in range(lo, hi)]
        n = sum(self.params[i].size for i in noised)
        for t in targets:
            t.fill(0)
        if n == 0:
            return
        dtype = self.params[0].dtype
        z = generator.standard_normal(n, dtype=dtype)
        if not (isinstance(z, np.ndarray) and z.shape == (n,)):
            raise TypeError(f"generator.standard_normal({n}) must return an array of shape ({n},)")
        z = np.ascontiguousarray(z, dtype=dtype)
        at = 0
        for i in noised:
            p, delta = self.params[i], targets[i]
            if p.size == 0:
                continue
            zi = z[at : at + p.size].reshape(p.shape)
            at += p.size
            sigma = float(scales[self.group_of[i]])
            if p.ndim >= 2:
                rows = p.reshape(p.shape[0], -1)
                norms = np.sqrt(np.einsum("ij,ij->i", rows, rows, dtype=np.float64))
                scale = (norms * sigma).astype(dtype).reshape((-1,) + (1,) * (p.ndim - 1))
            else:
                scale = np.asarray(np.sqrt(_core.sum_of_squares([p])) * sigma, dtype=dtype)
            np.multiply(zi, scale, out=delta)
        _core.axpby([targets[i] for i in noised], [self.params[i] for i in noised], 1.0, 1.0)  # w ← w + δ

    # -- host copies and draws (SSAM's masks, ranked on the host) ----------------------------------

    def read(self, name: str, state: dict) -> list[np.ndarray]:
        """Copies of ``name`` (``"grads"``, ``"weights"`` or a state name), one per parameter, in
        its dtype (float32 or float64)."""
        if name == "grads" and len(self.grads) != len(self.params):  # none given to this call
            return [np.zeros_like(p) for p in self.params]
        return [a.copy() for a in self._array(name, state)]

    def write(self, name: str, values: list, state: dict) -> None:
        """``state[key][name] ← values[i]`` per parameter (arrays of its shape, numbers, or None)."""
        if name in ("grads", "weights", "backup"):
            raise ValueError(f"write() sets a state vector, not {name!r}")
        checked = [None if v is None else np.asarray(v) for v in values]
        for p, v in zip(self.params, checked):
            if v is not None and v.ndim and v.shape != p.shape:
                raise ValueError(f"an array of shape {v.shape} for a parameter of shape {p.shape}")
        for target, v in zip(self.vector(name, state), checked):
            if v is not None:
                target[...] = v

    def draw_uniform(self, count: int, generator: np.random.Generator) -> np.ndarray:
        """``generator.random(count, dtype=float32)``."""
        return generator.random(count, dtype=np.float32)

    def drop_gradients(self, keep: list[bool]) -> None:
        """Zeros in place of the dropped gradients (the caller's arrays are left as they are)."""
        self.grads = [g if k else np.zeros_like(g) for g, k in zip(self.grads, keep)]

    def scale(self, x: str, factor: float, state: dict) -> None:
        """``x ← factor·x``, the factor rounded to the dtype first (as torch's ``mul_``)."""
        for v in self._array(x, state, write=True):
            np.multiply(v, v.dtype.type(factor), out=v)
