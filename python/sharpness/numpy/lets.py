"""LETS over lists of numpy arrays (the numpy front of :mod:`sharpness.optim.lets`).

LETS (Wang, Jiang, Fu, Zhang, "Enhancing Sharpness-Aware Minimization by Learning Perturbation
Radius", ECML-PKDD 2024, arXiv:2408.08222) treats SAM's radius as an upper-level variable:

    min_ρ  F(ρ) = ½ (L_val(θ*(ρ)) − L_tr(θ*(ρ)))²        (the squared generalisation gap)
    s.t.   θ*(ρ) = argmin_θ max_{‖ε‖≤ρ} L_tr(θ + ε)      (SAM, or ASAM)

and alternates one lower-level step with one step on ρ. With the SAM step written as a plain
gradient step of size η,

    u      = g/‖g‖  (SAM)   or   T²g/‖Tg‖, T = |θ|+η_a  (ASAM),      g = ∇L_tr(θ_t)
    θ_t+1  = θ_t − η ∇L_tr(θ_t + ρ u)                                   (lower level)
    dθ_t+1/dρ = −η H u,   H = ∇²L_tr(θ_t + ρ u)
    dF/dρ  = (L_val − L_tr)(θ_t+1) · (∇L_val − ∇L_tr)(θ_t+1) · dθ_t+1/dρ   (chain rule)
    ρ_t+1  = clip(ρ_t − β dF/dρ, ρ_min, ρ_max)                           (upper level)

Same rules, defaults and state as the torch front :class:`sharpness.LETS`; the lower level is
:class:`sharpness.numpy.SAM` (or its ASAM, ``adaptive=True``) unchanged, so with ``rho_lr = 0`` it
is that optimizer bit for bit, and with the same gradients both fronts give the same weights and
the same ρ up to float rounding (the reductions run in another order).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from sharpness import _core
from sharpness._validation import number
from sharpness.methods import NORM_EPS
from sharpness.numpy.sam import SAM, _real

__all__ = ["LETS"]

GradFn = Callable[[list[np.ndarray]], tuple[Any, Sequence[np.ndarray]]]

_HESSIANS = ("diag", "identity")


def _per_group(name: str, value: Any, n: int) -> list[float]:
    """A real number (the same for every group) or one per group, as floats."""
    if isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.ndim > 0):
        values = list(value)
        if len(values) != n:
            raise ValueError(f"{name} has {len(values)} entries for {n} group(s)")
        return [_real(f"{name}[{k}]", v) for k, v in enumerate(values)]
    return [_real(name, value)] * n


def _check_groups(groups: Any, n: int) -> list[list[int]]:
    """``None`` (one group) or a partition of ``range(n)`` into non-empty lists of indices."""
    if groups is None:
        return [list(range(n))]
    if isinstance(groups, (str, bytes, np.ndarray)) or not isinstance(groups, Sequence):
        raise TypeError(f"groups must be a list of lists of parameter indices, got {type(groups).__name__}")
    out: list[list[int]] = []
    seen: set[int] = set()
    for k, group in enumerate(groups):
        if isinstance(group, (str, bytes)) or not isinstance(group, (Sequence, np.ndarray)):
            raise TypeError(f"groups[{k}] must be a list of parameter indices, got {type(group).__name__}")
        if len(group) == 0:
            raise ValueError(f"groups[{k}] is empty")
        idx = []
        for i in group:
            if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
                raise TypeError(f"groups[{k}] holds {i!r}, not a parameter index")
            i = int(i)
            if not 0 <= i < n:
                raise ValueError(f"groups[{k}] holds index {i}, outside 0..{n - 1}")
            if i in seen:
                raise ValueError(f"parameter {i} is in more than one group")
            seen.add(i)
            idx.append(i)
        out.append(idx)
    if not out:
        raise ValueError("groups is empty")
    missing = sorted(set(range(n)) - seen)
    if missing:
        raise ValueError(f"groups must cover every parameter; missing {missing}")
    return out


class LETS(SAM):
    r"""SAM or ASAM over numpy arrays whose radius ``ρ`` is learned on a validation batch (LETS,
    Wang et al., ECML-PKDD 2024, arXiv:2408.08222).

    Each step is a :class:`~sharpness.numpy.SAM` step (``adaptive=True``: ASAM), unchanged,
    followed by one gradient step on ``ρ`` that reduces the squared generalisation gap
    ``½(L_val − L_tr)²`` measured at the new weights::

        c   = L_val(θ⁺) − L_tr(θ⁺)                        # θ⁺: the weights after the SAM step
        h_k = −η · c · Σ_{i∈k} (∇L_val(θ⁺) − ∇L_tr(θ⁺))_i · D_i a_i g_i / (‖g‖ + 1e-12)
        ρ_k ← clip(ρ_k − β_k h_k, ρ_min, ρ_max)

    for every group ``k`` with ``ρ_k > 0``: ``η`` is the base optimizer's ``lr``, ``g`` the first
    gradient and ``‖g‖`` SAM's norm over the arrays of all groups with ``ρ > 0`` (ASAM:
    ``a = (|θ|+η_a)²`` and ``‖Tg‖``; SAM: ``a = 1``), ``D`` the Hessian's stand-in: ``g̃²``
    (``hessian="diag"``, ``g̃`` the gradient at ``θ + e``) or 1 (``"identity"``). ``h_k`` is
    the hypergradient of one SAM step taken as a plain gradient step; with momentum or Adam as
    the base it is that approximation. Group ``k`` is perturbed by ``e = ρ_k a g/‖g‖``: with one
    group (the default) this is the paper's scalar ``ρ``; with several, the diagonal
    approximation makes each group's ``ρ`` an independent coordinate of the same gradient.
    Groups with ``ρ = 0`` are neither in the norm nor perturbed, and never learned.

    What is the paper's and what is reconstructed: the objective, the alternation of one SAM
    step with one step on ``ρ``, a diagonal stand-in for the Hessian and LETS-ASAM are the
    paper's (its abstract and introduction). Its method section could not be retrieved when the
    torch front was written, so the rest is this library's reconstruction, shared by both
    fronts: the hypergradient through one step unrolled as a plain gradient step (also under
    momentum or Adam), which diagonal (the squared gradient at the perturbed point, a
    Gauss-Newton/Fisher-style diagonal that needs no extra pass), per-group ``ρ``, the projection
    onto ``[ρ_min, ρ_max]`` with the floor ``1e-4``, and the default ``β = 1``.

    The arithmetic: norms, perturbation, restoration and base step are SAM's
    :mod:`sharpness._core` kernels; the group dots ``Σ (∇L)_i v_i`` are ``_core.dot`` (float64
    accumulation); the product ``v = a⊙g(⊙g̃²)``, kept from the first gradient to the ρ update
    (one array the size of the weights), is numpy elementwise multiplication (no kernel forms
    an elementwise product).

    Calling it: ``step(grad_fn, val_grad_fn)``, each ``f(params) -> (loss, grads)``.
    ``grad_fn`` (training batch) runs three times: at ``θ``, at ``θ + e``, and at ``θ⁺`` for
    ``L_tr(θ⁺)``; ``val_grad_fn`` (validation batch) once, at ``θ⁺``. Without ``val_grad_fn`` the
    step is SAM's and ``ρ`` stays. Explicitly: ``first_step(g)``, ``second_step(g̃)``, then
    :meth:`update_rho` ``(grad_fn, val_grad_fn)``. A non-finite gradient norm applies no
    perturbation (as in SAM) and leaves ``ρ`` alone; a non-finite hypergradient is not applied
    (``lets_state["nonfinite_hypergrads"]`` counts it), so neither reaches the weights.

    Args:
        params, adaptive, eta, base, **base_kwargs: as for :class:`~sharpness.numpy.SAM`
            (``adaptive=True`` gives LETS-ASAM). ``maximize=True`` is refused.
        rho: the initial radius ``ρ_0``: one number, or one per group.
        rho_lr: ``β``, the learning rate of ``ρ``: one number, or one per group (0 freezes a
            group's ``ρ``). The hypergradient's scale depends on the loss, the learning rate and
            the Hessian stand-in (with ``"diag"`` it shrinks with the gradients, as ``g̃²``): tune
            it. 1.0 is a neutral default, not the paper's value.
        hessian: ``"diag"`` (``H ≈ diag(g̃⊙g̃)``) or ``"identity"`` (``H ≈ I``).
        rho_min, rho_max: the interval ``ρ`` is projected onto after each update (the paper's
            ``ρ ∈ (0, ∞)``: a small positive floor keeps a group inside the perturbation).
        groups: ``None`` (one group) or a partition of the parameter indices, e.g.
            ``[[0, 2], [1, 3]]`` (weights, biases): each group has its own ``ρ``.

    State: :attr:`rho` (the radii, one per group; a schedule may set them between steps) and
    :attr:`rho_lr`; :attr:`lets_state` holds the last gap, losses, hypergradients (``None`` for a
    group not learned) and counters. All are in :meth:`state_dict` (key ``"lets"``), with ``v``
    when a SAM step awaits its ρ update. ``hyperparams["rho"]`` keeps the initial radius of group
    0 (like torch's ``defaults``) and is not read: the radii are :attr:`rho`.

    Example:
        >>> import numpy as np
        >>> from sharpness.numpy import LETS
        >>> rng = np.random.default_rng(0)
        >>> X, y = rng.normal(size=(32, 3)), rng.normal(size=32)      # a training batch
        >>> Xv, yv = rng.normal(size=(32, 3)), rng.normal(size=32)    # a validation batch
        >>> w = np.zeros(3)
        >>> def mse(X, y):
        ...     def grad_fn(params):
        ...         r = X @ params[0] - y
        ...         return 0.5 * np.mean(r**2), [X.T @ r / len(y)]
        ...     return grad_fn
        >>> opt = LETS([w], rho=0.05, rho_lr=10.0, lr=0.1)
        >>> losses = [opt.step(mse(X, y), mse(Xv, yv)) for _ in range(20)]  # SAM step, then rho
        >>> bool(losses[-1] < losses[0]), opt.rho[0] != 0.05, opt.lets_state["updates"]
        (True, True, 20)
    """

    def __init__(
        self,
        params: Sequence[np.ndarray],
        rho: float | Sequence[float] = 0.05,
        rho_lr: float | Sequence[float] = 1.0,
        hessian: str = "diag",
        rho_min: float = 1e-4,
        rho_max: float = math.inf,
        groups: Sequence[Sequence[int]] | None = None,
        adaptive: bool = False,
        eta: float = 0.01,
        base: str = "sgd",
        **base_kwargs: Any,
    ) -> None:
        if not isinstance(hessian, str) or hessian not in _HESSIANS:
            raise ValueError(f"hessian must be one of {_HESSIANS}, got {hessian!r}")
        rho_min = number("rho_min", rho_min, minimum=0)
        rho_max = number("rho_max", rho_max, minimum=0, finite=False)  # inf: no upper clamp
        if not rho_min <= rho_max:
            raise ValueError(f"need 0 <= rho_min <= rho_max (rho_min finite), got {rho_min}, {rho_max}")
        if base_kwargs.get("maximize", False):
            raise ValueError("LETS does not support maximize=True")
        super().__init__(params, rho=0.0, adaptive=adaptive, eta=eta, base=base, **base_kwargs)
        self._lets_groups = _check_groups(groups, len(self.params))
        n = len(self._lets_groups)
        rhos = _per_group("rho", rho, n)
        if any(r < 0 for r in rhos):
            raise ValueError(f"rho must be >= 0, got {rho}")
        rho_lrs = _per_group("rho_lr", rho_lr, n)
        if any(b < 0 for b in rho_lrs):
            raise ValueError(f"rho_lr must be a finite number >= 0, got {rho_lr}")
        self.hyperparams["rho"] = rhos[0]  # the initial radius, not read (see the docstring)
        #: The radius of each group, learned (a schedule may set them between steps).
        self.rho: list[float] = rhos
        #: ``β`` of each group (0 freezes that group's ``ρ``).
        self.rho_lr: list[float] = rho_lrs
        self.hessian: str = hessian
        self.rho_min = float(rho_min)
        self.rho_max = float(rho_max)
        group_of = [0] * len(self.params)
        for k, idx in enumerate(self._lets_groups):
            for i in idx:
                group_of[i] = k
        self._group_of = group_of
        # Kernel calls per (dtype, group): the parameters of dtype group j in LETS group k,
        # in dtype-group order (with one group: SAM's calls exactly).
        self._subsets: list[tuple[int, int, list[int]]] = []  # (dtype group j, group k, indices)
        for j, grp in enumerate(self._groups):
            for k in range(n):
                idx = [i for i in grp.index if group_of[i] == k]
                if idx:
                    self._subsets.append((j, k, idx))
        self._backups = [None] * len(self.params)  # per parameter: its dtype group's backup array
        for grp in self._groups:
            for i, b in zip(grp.index, grp.backups):
                self._backups[i] = b
        self._v: list[np.ndarray] | None = None  # a⊙g (⊙g̃²), per parameter, until update_rho
        self._active: list[bool] = [False] * n  # groups perturbed by the pending step
        #: The last ρ update and counters (saved by :meth:`state_dict`).
        self.lets_state: dict[str, Any] = {
            "ready": False,  # a SAM step's v is kept, awaiting update_rho
            "norm": math.nan,  # that step's ‖g‖ (ASAM: ‖Tg‖)
            "gap": math.nan,  # L_val(θ⁺) − L_tr(θ⁺) at the last update
            "train_loss": math.nan,
            "val_loss": math.nan,
            "hypergrad": [],  # dF/dρ per group at the last update (None: group not learned)
            "updates": 0,
            "nonfinite_hypergrads": 0,
        }

    # ------------------------------------------------------------------ the lower level

    def _check_rho(self) -> None:
        if not isinstance(self.rho, list) or len(self.rho) != len(self._lets_groups):
            raise ValueError(f"rho must be a list of {len(self._lets_groups)} radii (one per group)")
        for k, r in enumerate(self.rho):
            r = _real(f"rho[{k}]", r)
            if r < 0:
                raise ValueError(f"rho[{k}] must be >= 0, got {r}")
            self.rho[k] = r

    def _per_param(self, grads: Sequence[np.ndarray]) -> list[np.ndarray]:
        """``grads`` checked against the parameters (SAM's checks), one array per parameter."""
        out: list[Any] = [None] * len(self.params)
        for grp, gs in zip(self._groups, self._grads_by_group(grads)):
            for i, g in zip(grp.index, gs):
                out[i] = g
        return out

    def first_step(self, grads: Sequence[np.ndarray]) -> float:
        """Move the weights to ``θ + e`` (group ``k``: ``e = ρ_k a g/‖g‖``), saving ``θ`` and
        keeping ``a⊙g`` for the ρ update.

        Returns:
            ``‖g‖`` (ASAM: ``‖T g‖``) over the groups with ``ρ > 0``; when it is not finite no
            perturbation is applied, :meth:`second_step` takes the plain base step and ``ρ`` is
            not updated for this step.
        """
        if self._perturbed:
            raise RuntimeError(
                "first_step called twice: the weights are already perturbed; "
                "call second_step(grads) to restore them and take the base step"
            )
        self._check_rho()
        g = self._per_param(grads)
        self.lets_state["ready"] = False
        hp = self.hyperparams
        adaptive, eta = hp["adaptive"], hp["eta"]
        active = [r > 0 for r in self.rho]
        sumsq = 0.0
        for _, k, idx in self._subsets:
            if active[k]:
                gs = [g[i] for i in idx]
                if adaptive:
                    sumsq += _core.sum_of_squares_adaptive([self.params[i] for i in idx], gs, eta)
                else:
                    sumsq += _core.sum_of_squares(gs)
        norm = math.sqrt(sumsq) if sumsq >= 0 else math.nan
        if not math.isfinite(norm):
            for grp in self._groups:  # backups <- weights: second_step is the plain base step
                _core.restore(grp.backups, grp.params)
            self._nonfinite += 1
            self._active = [False] * len(active)
            self._perturbed = True
            return norm
        if self._v is None:
            self._v = [np.empty_like(p) for p in self.params]
        for _, k, idx in self._subsets:
            ws, gs, bs = [self.params[i] for i in idx], [g[i] for i in idx], [self._backups[i] for i in idx]
            if not active[k]:
                _core.restore(bs, ws)  # unperturbed: the backup is the weights
                continue
            vs = [self._v[i] for i in idx]
            _core.restore(vs, gs)  # v <- g
            if adaptive:
                for v, w in zip(vs, ws):  # v <- v·T·T, T = |θ|+η (numpy: no kernel for products)
                    t = np.abs(w)
                    t += eta
                    v *= t
                    v *= t
            scale = self.rho[k] / (norm + NORM_EPS)
            if adaptive:
                _core.perturb_adaptive(ws, gs, bs, scale, eta)
            else:
                _core.perturb(ws, gs, bs, scale)
        self._active = active
        self.lets_state["norm"] = norm
        self._perturbed = True
        return norm

    def second_step(self, grads: Sequence[np.ndarray]) -> None:
        """Restore the saved weights and take one base-optimizer step with ``grads`` (``g̃``,
        at ``θ + e``), as :meth:`SAM.second_step`; with ``hessian="diag"`` also
        ``v ← v⊙g̃⊙g̃``. Afterwards :meth:`update_rho` may run once."""
        if not self._perturbed:
            raise RuntimeError(
                "second_step called without first_step: call first_step(grads) at w first "
                "(or use step(grad_fn, val_grad_fn))"
            )
        by_group = self._grads_by_group(grads)
        learned = any(self._active)
        if learned and self.hessian == "diag":
            assert self._v is not None
            for grp, gs in zip(self._groups, by_group):
                for i, gt in zip(grp.index, gs):
                    if self._active[self._group_of[i]]:
                        v = self._v[i]  # numpy elementwise: no kernel forms a product
                        v *= gt
                        v *= gt
        self._base_step(by_group, from_backup=True)
        self._perturbed = False
        self.lets_state["ready"] = learned

    # ------------------------------------------------------------------ the upper level

    def _group_dots(self, grads: list[np.ndarray]) -> list[float]:
        """``Σ_{i∈k} grads_i·v_i`` per group ``k`` (``_core.dot``, float64 accumulation)."""
        assert self._v is not None
        out = [0.0] * len(self._lets_groups)
        for _, k, idx in self._subsets:
            if self._active[k]:
                out[k] += _core.dot([grads[i] for i in idx], [self._v[i] for i in idx])
        return out

    def update_rho(self, grad_fn: GradFn, val_grad_fn: GradFn) -> Any:
        """One gradient step on ``ρ`` after a completed SAM step (the upper level).

        ``grad_fn`` (training batch) and ``val_grad_fn`` (validation batch) each return
        ``(loss, grads)`` at the weights they are given; both run once, at the weights the SAM
        step left (which they must not modify). Returns the validation loss, or None (and
        changes nothing, calling neither) when the last step took no perturbation (a non-finite
        gradient norm, or every ``ρ`` zero) or ``ρ`` was already updated for it.
        """
        if self._perturbed:
            raise RuntimeError(
                "update_rho called between first_step and second_step: call it after second_step"
            )
        for name, f in (("grad_fn", grad_fn), ("val_grad_fn", val_grad_fn)):
            if not callable(f):
                raise TypeError(f"{name} must be callable, got {type(f).__name__}")
        if not self.lets_state["ready"]:
            return None
        train_loss, g_tr = self._call(grad_fn)
        dots_tr = self._group_dots(self._per_param(g_tr))
        val_loss, g_val = self._call(val_grad_fn)
        dots_val = self._group_dots(self._per_param(g_val))
        lt, lv = float(train_loss), float(val_loss)
        self.lets_state["ready"] = False
        gap = lv - lt
        inv_norm = 1.0 / (self.lets_state["norm"] + NORM_EPS)
        lr = self.hyperparams["lr"]
        self._check_rho()
        hypergrads: list[float | None] = []
        for k, r in enumerate(self.rho):
            if not self._active[k] or r <= 0:
                hypergrads.append(None)
                continue
            h = -lr * gap * (dots_val[k] - dots_tr[k]) * inv_norm
            hypergrads.append(h)
            beta = self.rho_lr[k]
            if beta == 0.0:
                continue
            new = r - beta * h
            if not math.isfinite(new):  # a non-finite h (or an overflowing step) is not applied
                self.lets_state["nonfinite_hypergrads"] += 1
                continue
            self.rho[k] = min(max(new, self.rho_min), self.rho_max)
        self.lets_state.update(
            gap=gap, train_loss=lt, val_loss=lv, hypergrad=hypergrads, updates=self.lets_state["updates"] + 1
        )
        return val_loss

    def step(self, grad_fn: GradFn, val_grad_fn: GradFn | None = None) -> Any:  # type: ignore[override]
        """One SAM step with ``grad_fn`` (twice), then, given ``val_grad_fn``, one step on ``ρ``
        (:meth:`update_rho`: ``grad_fn`` and ``val_grad_fn`` once each, at the new weights).
        Without ``val_grad_fn`` it is :meth:`SAM.step`. Returns the training loss at ``θ``.
        If ``grad_fn`` raises during the second call, the weights are restored to ``θ``."""
        if not callable(grad_fn):
            raise TypeError(f"grad_fn must be callable, got {type(grad_fn).__name__}")
        if val_grad_fn is not None and not callable(val_grad_fn):
            raise TypeError(f"val_grad_fn must be callable, got {type(val_grad_fn).__name__}")
        loss = super().step(grad_fn)
        if val_grad_fn is not None:
            self.update_rho(grad_fn, val_grad_fn)
        return loss

    def _undo(self) -> None:
        super()._undo()
        self.lets_state["ready"] = False

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """:meth:`SAM.state_dict` plus ``"lets"``: the radii, their learning rates and bounds,
        the groups, :attr:`lets_state`, and (copies) ``v`` and the groups it was kept for when a
        step awaits its ρ update."""
        sd = super().state_dict()
        ready = bool(self.lets_state["ready"])
        sd["lets"] = {
            "rho": list(self.rho),
            "rho_lr": list(self.rho_lr),
            "hessian": self.hessian,
            "rho_min": self.rho_min,
            "rho_max": self.rho_max,
            "groups": [list(idx) for idx in self._lets_groups],
            "state": {**self.lets_state, "hypergrad": list(self.lets_state["hypergrad"])},
            "active": list(self._active) if ready else None,
            "v": [v.copy() for v in self._v] if ready and self._v is not None else None,
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a dict made by :meth:`state_dict` of a LETS over the same arrays and groups."""
        if self._perturbed:
            raise RuntimeError(
                "load_state_dict called between first_step and second_step; call second_step first"
            )
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        state_dict = dict(state_dict)
        extra = state_dict.pop("lets", None)
        if not isinstance(extra, dict):
            raise ValueError("state_dict lacks 'lets' (it was not made by a LETS)")
        missing = {"rho", "rho_lr", "hessian", "rho_min", "rho_max", "groups", "state", "active", "v"} - set(extra)
        if missing:
            raise ValueError(f"state_dict['lets'] lacks {', '.join(sorted(missing))}")
        if [list(map(int, g)) for g in extra["groups"]] != self._lets_groups:
            raise ValueError(
                f"state_dict was saved with groups {extra['groups']}, this optimizer has {self._lets_groups}"
            )
        n = len(self._lets_groups)
        rho = _per_group("rho", list(extra["rho"]), n)
        rho_lr = _per_group("rho_lr", list(extra["rho_lr"]), n)
        if any(r < 0 for r in rho) or any(b < 0 for b in rho_lr):
            raise ValueError("state_dict['lets'] holds a negative rho or rho_lr")
        hessian = extra["hessian"]
        if hessian not in _HESSIANS:
            raise ValueError(f"state_dict['lets']['hessian'] must be one of {_HESSIANS}, got {hessian!r}")
        rho_min, rho_max = float(extra["rho_min"]), float(extra["rho_max"])
        if not 0 <= rho_min <= rho_max:
            raise ValueError(f"state_dict['lets'] has rho_min={rho_min}, rho_max={rho_max}")
        state = dict(extra["state"])
        keys = set(self.lets_state)
        if set(state) != keys:
            raise ValueError(f"state_dict['lets']['state'] must have the keys {sorted(keys)}")
        v = extra["v"]
        active = extra["active"]
        if state["ready"]:
            if v is None or active is None:
                raise ValueError("state_dict['lets'] awaits a rho update but holds no 'v'")
            if len(v) != len(self.params) or any(
                not isinstance(a, np.ndarray) or a.shape != p.shape or a.dtype != p.dtype
                for a, p in zip(v, self.params)
            ):
                raise ValueError("state_dict['lets']['v'] does not match the parameters")
            if len(active) != n:
                raise ValueError("state_dict['lets']['active'] does not match the groups")
        super().load_state_dict(state_dict)
        self.rho, self.rho_lr, self.hessian = rho, rho_lr, hessian
        self.rho_min, self.rho_max = rho_min, rho_max
        state["hypergrad"] = list(state["hypergrad"])
        self.lets_state = state
        if state["ready"]:
            self._v = [np.array(a, order="C", copy=True) for a in v]
            self._active = [bool(a) for a in active]
        else:
            self._active = [False] * n

    def __repr__(self) -> str:
        return (
            f"LETS(rho={self.rho}, rho_lr={self.rho_lr}, hessian={self.hessian!r}, "
            + super().__repr__().split("(", 1)[1]
        )
