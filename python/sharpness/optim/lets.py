"""LETS: the perturbation radius ρ learned by a bilevel objective.

LETS (Wang, Jiang, Fu, Zhang, "Enhancing Sharpness-Aware Minimization by Learning Perturbation
Radius", ECML-PKDD 2024, arXiv:2408.08222) treats SAM's radius as an upper-level variable:

    min_ρ  F(ρ) = ½ (L_val(θ*(ρ)) − L_tr(θ*(ρ)))²        (the squared generalisation gap)
    s.t.   θ*(ρ) = argmin_θ max_{‖ε‖≤ρ} L_tr(θ + ε)      (SAM, or any SAM variant: ASAM ...)

and alternates one lower-level step with one step on ρ. With the SAM step written as a plain
gradient step of size η,

    u      = g/‖g‖  (SAM)   or   T²g/‖Tg‖, T = |θ|+η_a  (ASAM),      g = ∇L_tr(θ_t)
    θ_t+1  = θ_t − η ∇L_tr(θ_t + ρ u)                                   (lower level)
    dθ_t+1/dρ = −η H u,   H = ∇²L_tr(θ_t + ρ u)
    dF/dρ  = (L_val − L_tr)(θ_t+1) · (∇L_val − ∇L_tr)(θ_t+1) · dθ_t+1/dρ   (chain rule)
    ρ_t+1  = clip(ρ_t − β dF/dρ, ρ_min, ρ_max)                           (upper level)

The objective, the alternating scheme, a diagonal stand-in for the Hessian and LETS-ASAM (the
ASAM step below, the same upper level) are the paper's; the diagonal used here is the squared
gradient at the perturbed point (a Gauss-Newton/Fisher-style diagonal, free of extra passes).

H is never formed: ``hessian="diag"`` replaces it by the diagonal ``diag(g̃ ⊙ g̃)`` (g̃ the gradient
already taken at θ_t + ρu), ``hessian="identity"`` by I (the first-order hypergradient). Both need
only vectors the SAM step computes anyway, plus ∇L_tr and ∇L_val at θ_t+1: two more
forward/backward passes per step (four in all).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from sharpness import _core
from sharpness._validation import number
from sharpness.backends._common import NORM_EPS
from sharpness.backends.distributed import DTensorEngine, _local
from sharpness.backends.rust import RustEngine
from sharpness.backends.torch_foreach import real_view
from sharpness.buffers import as_numpy
from sharpness.optim.sam import SAM

_HESSIANS = ("diag", "identity")


class LETS(SAM):
    r"""SAM or ASAM whose radius ``ρ`` is learned on a validation batch (LETS, Wang et al.,
    ECML-PKDD 2024, arXiv:2408.08222).

    Each step is a SAM (``adaptive=False``) or ASAM (``adaptive=True``) step, unchanged, followed
    by one gradient step on ``ρ`` that reduces the squared generalisation gap
    ``½(L_val − L_tr)²`` measured at the new weights::

        c   = L_val(θ⁺) − L_tr(θ⁺)                        # θ⁺: the weights after the SAM step
        h_k = −η_k · c · Σ_{i∈k} (∇L_val(θ⁺) − ∇L_tr(θ⁺))_i · D_i a_i g_i / (‖g‖ + 1e-12)
        ρ_k ← clip(ρ_k − β_k h_k, ρ_min, ρ_max)

    for every parameter group ``k`` with ``ρ_k > 0``: ``η_k`` is the group's ``lr``, ``g`` the
    first gradient and ``‖g‖`` SAM's global norm (ASAM: ``a = (|θ|+η_a)²`` and ``‖Tg‖``), ``D`` the
    Hessian's stand-in: ``g̃²`` (``hessian="diag"``, ``g̃`` the gradient at ``θ + e``) or 1
    (``"identity"``). ``h_k`` is the hypergradient of one SAM step taken as a plain gradient step
    (the paper's derivation); with momentum or Adam as the base optimizer it is that
    approximation. With a single group this is the paper's scalar ``ρ``; with several, the
    diagonal approximation makes each group's ``ρ`` an independent coordinate of the same
    gradient. Groups with ``ρ = 0`` stay unperturbed and are never learned; a group's key
    ``lets_rho_lr`` overrides ``rho_lr`` (0 freezes its ``ρ``).

    Memory: one vector the size of the weights (``a⊙g⊙D``), kept from the first pass to the
    ρ update.

    ``ρ`` lives in the parameter groups (``sam_rho``, so a scheduler or a checkpoint sees it);
    the last gap, losses and hypergradients are in ``sam_state`` (saved by ``state_dict``).

    Calling it: ``step(closure, val_closure)``. ``closure`` is SAM's (zero the gradients,
    forward and backward on the training batch, return the loss); it runs three times: at
    ``θ``, at ``θ + e``, and at ``θ⁺`` for ``L_tr(θ⁺)``. ``val_closure`` does the same on a
    validation batch and runs once, at ``θ⁺``. Without ``val_closure`` the step is a SAM step
    and ``ρ`` stays. With the two-call API: ``first_step``, backward, ``second_step``, then
    :meth:`update_rho` with both closures. The extra passes run with the model as the closures
    leave it (use ``model.eval()`` inside ``val_closure`` to keep BatchNorm statistics and
    dropout out, if you want that); GradScaler is not supported for the ρ update.

    Args:
        params, base_optimizer, adaptive, eta, backend, same_noise, seed, memory, **base_kwargs:
            as for :class:`sharpness.SAM` (``adaptive=True`` gives LETS-ASAM).
        rho: the initial radius ``ρ_0``.
        rho_lr: ``β``, the learning rate of ``ρ``. The hypergradient's scale depends on the loss,
            the learning rate and the Hessian stand-in (with ``"diag"`` it shrinks with the
            gradients, as ``g̃²``): tune it. 1.0 is a neutral default, not the paper's value.
        hessian: ``"diag"`` (``H ≈ diag(g̃⊙g̃)``) or ``"identity"`` (``H ≈ I``).
        rho_min, rho_max: the interval ``ρ`` is projected onto after each update (the paper's
            ``ρ ∈ (0, ∞)``: a small positive floor keeps a group inside the perturbation).

    Example:
        >>> import torch, sharpness
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = sharpness.LETS(model.parameters(), torch.optim.SGD, rho=0.05, rho_lr=10.0, lr=0.1)
        >>> x, y = torch.randn(8, 4), torch.randn(8, 2)        # a training batch
        >>> xv, yv = torch.randn(8, 4), torch.randn(8, 2)      # a validation batch
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> def val_closure():
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(xv), yv)
        ...     loss.backward()
        ...     return loss
        >>> loss = opt.step(closure, val_closure)  # SAM step, then one step on rho
        >>> rho = opt.param_groups[0]["sam_rho"]   # the learned radius
        >>> sorted(k for k in opt.sam_state if k.startswith("lets_"))[:3]
        ['lets_gap', 'lets_hypergrad', 'lets_norm']
    """

    norm_weights_supported = False  # its own norms (see SAM.norm_weights_supported)

    def __init__(
        self,
        params: Any,
        base_optimizer: Any,
        rho: float = 0.05,
        rho_lr: float = 1.0,
        hessian: str = "diag",
        rho_min: float = 1e-4,
        rho_max: float = math.inf,
        **kwargs: Any,
    ) -> None:
        self.rho_lr = number("rho_lr", rho_lr, minimum=0)
        if hessian not in _HESSIANS:
            raise ValueError(f"hessian must be one of {_HESSIANS}, got {hessian!r}")
        self.rho_min = number("rho_min", rho_min, minimum=0)
        self.rho_max = number("rho_max", rho_max, minimum=0, finite=False)  # inf: no upper clamp
        if not self.rho_min <= self.rho_max:
            raise ValueError(f"need 0 <= rho_min <= rho_max, got {rho_min}, {rho_max}")
        self.hessian = hessian
        super().__init__(params, base_optimizer, rho=rho, **kwargs)
        for group in self.param_groups:
            if group.get("maximize", False):
                raise ValueError("LETS does not support maximize=True groups")
        self.sam_state.update(
            lets_ready=False,  # a SAM step's a⊙g(⊙g̃²) is kept, awaiting update_rho
            lets_norm=float("nan"),  # that step's ‖g‖ (ASAM: ‖Tg‖)
            lets_gap=float("nan"),  # L_val(θ⁺) − L_tr(θ⁺) at the last update
            lets_train_loss=float("nan"),
            lets_val_loss=float("nan"),
            lets_hypergrad=[],  # dF/dρ per group at the last update (None: group not learned)
            lets_updates=0,
        )
        self._lets_v: dict[Tensor, Tensor] = {}  # per parameter: a⊙g (⊙g̃²), until update_rho
        self._lets_flat: dict[int, tuple[Any, Tensor]] = {}  # the flat vector behind them, per native engine's buffers

    # -- the lower level: SAM's hooks keep what the hypergradient needs ----------------------------
    #
    # v = a⊙g (⊙g̃² for the diagonal Hessian) is kept here, not in the base optimizer's state: an
    # extra key there would make torch's Adam (and others) take a fresh state for an initialised
    # one. Native engines get one flat vector each (its slices are the per-parameter views);
    # foreach engines one tensor per parameter.

    def first_step(self, zero_grad: bool = False, grad_scaler: Any = None) -> bool:
        self.sam_state["lets_ready"] = False  # a step without perturbation leaves nothing to learn from
        return super().first_step(zero_grad, grad_scaler)

    def _flat_v(self, engine: RustEngine) -> Tensor:
        """The native engine's flat ``v`` (reused from step to step; a new layout gets a new one)."""
        b = engine.buffers
        flat = self._flat_of(engine)
        if flat is None:
            live = {id(e.buffers) for e in self.engines() if isinstance(e, RustEngine)}
            self._lets_flat = {k: entry for k, entry in self._lets_flat.items() if k in live}
            flat = torch.empty_like(b.weights)
            self._lets_flat[id(b)] = (b, flat)
        return flat

    def _flat_of(self, engine: Any) -> Tensor | None:
        entry = self._lets_flat.get(id(engine.buffers)) if isinstance(engine, RustEngine) else None
        return entry[1] if entry is not None and entry[0] is engine.buffers else None

    @torch.no_grad()
    def _before_perturbation(self, engines: list) -> None:
        # grads = g, weights = θ: v ← a⊙g
        self._lets_v = {}
        for engine in engines:
            if isinstance(engine, RustEngine):
                b = engine.buffers
                v = self._flat_v(engine)
                v.copy_(b.grads)  # absent gradients are zero views
                for gi, _, _, lo, hi in engine.group_slices:
                    group = self.param_groups[gi]
                    if group["sam_adaptive"] and group["sam_rho"] > 0:
                        t = b.weights[lo:hi].abs().add_(float(group["sam_eta"]))
                        v[lo:hi].mul_(t).mul_(t)
                offsets = b.offsets
                for i, p in enumerate(b.params):
                    self._lets_v[p] = v[offsets[i] : offsets[i + 1]].view_as(p)
            else:
                for gi, indices in engine.by_group.items():
                    group = self.param_groups[gi]
                    params = [engine.params[i] for i in indices]
                    # A complex parameter as its real pairs, as the engines see it: v is real.
                    vs = [real_view(p.grad.detach()).clone(memory_format=torch.preserve_format) for p in params]
                    if group["sam_adaptive"] and group["sam_rho"] > 0:
                        t = torch._foreach_abs([real_view(p.detach()) for p in params])
                        torch._foreach_add_(t, float(group["sam_eta"]))
                        torch._foreach_mul_(vs, t)
                        torch._foreach_mul_(vs, t)
                    self._lets_v.update(zip(params, vs))

    @torch.no_grad()
    def _before_base_step(self, engines: list) -> None:
        # grads = g̃ (at θ + e): v ← v⊙g̃⊙g̃ for the diagonal Hessian
        for engine in engines:  # (second_step re-attached gradients replaced since first_step)
            if self.hessian != "diag":
                continue
            if isinstance(engine, RustEngine):
                grads = engine.buffers.grads
                self._flat_v(engine).mul_(grads).mul_(grads)  # absent gradients are zero views: v becomes 0
            else:
                for p in engine.params:
                    v = self._lets_v.get(p)
                    if v is None:
                        continue
                    if p.grad is None:
                        v.zero_()
                    else:
                        g = real_view(p.grad)
                        v.mul_(g).mul_(g)
        self.sam_state["lets_norm"] = float(self.last_grad_norm)
        self.sam_state["lets_ready"] = True

    # -- the upper level -----------------------------------------------------------------------

    def _group_dots(self, engines: list) -> dict[int, float]:
        """``Σ_{i∈k} grad_i·v_i`` per group ``k``, accumulated in float64."""
        out: dict[int, float] = {}
        for engine in engines:
            flat = self._flat_of(engine)
            if flat is not None and all(self._lets_v.get(p) is not None for p in engine.buffers.params):
                g, v = engine.buffers.np_grads, as_numpy(flat)
                for gi, _, _, lo, hi in engine.group_slices:
                    if g is not None:  # native kernels on the CPU
                        d = _core.dot(g[lo:hi], v[lo:hi])
                    else:  # flat buffers on a device (the Triton engine)
                        d = float(torch.dot(engine.buffers.grads[lo:hi].double(), flat[lo:hi].double()))
                    out[gi] = out.get(gi, 0.0) + d
                continue
            # Foreach engines, and native ones whose vector came from a checkpoint.
            group_of = engine.buffers.group_of if isinstance(engine, RustEngine) else engine.group_of
            if isinstance(engine, DTensorEngine):  # local shards, one reduction per group
                by_group: dict[int, tuple[list[int], list[Tensor]]] = {}
                for i, p in enumerate(engine.params):
                    v = self._lets_v.get(p)
                    if v is not None and p.grad is not None:
                        local = torch.dot(real_view(_local(p.grad)).reshape(-1).double(), _local(v).reshape(-1).double())
                        by_group.setdefault(group_of[i], ([], []))[0].append(i)
                        by_group[group_of[i]][1].append(local)
                for gi, (indices, values) in by_group.items():
                    partials: dict[int, Tensor] = {}
                    engine._partials(indices, values, partials)
                    out[gi] = out.get(gi, 0.0) + engine._reduce(partials)
                continue
            for i, p in enumerate(engine.params):
                v = self._lets_v.get(p)
                if v is not None and p.grad is not None:
                    gi = group_of[i]
                    out[gi] = out.get(gi, 0.0) + float(torch.dot(real_view(p.grad).reshape(-1).double(), v.reshape(-1).double()))
        return out

    @torch.no_grad()
    def update_rho(self, closure: Callable[[], Tensor], val_closure: Callable[[], Tensor]) -> Tensor | None:
        """One gradient step on ``ρ`` after a completed SAM step (the upper level).

        ``closure`` (training batch) and ``val_closure`` (validation batch) each zero the
        gradients, run forward and backward and return the loss; both run once, at the weights
        the SAM step left. Returns the validation loss, or None (and changes nothing) when the
        last step took no perturbation (a non-finite gradient norm) or ``ρ`` was already updated
        for it.
        """
        if self._pending is not None:
            raise RuntimeError("update_rho() between first_step() and second_step(): call it after second_step()")
        if not self.sam_state["lets_ready"]:
            return None
        self.sam_state["lets_ready"] = False
        with torch.enable_grad():
            train_loss = closure()
        dots_tr = self._group_dots(self._begin())
        with torch.enable_grad():
            val_loss = val_closure()
        dots_val = self._group_dots(self._begin())
        lt, lv = (float(x.detach()) if isinstance(x, Tensor) else float(x) for x in (train_loss, val_loss))
        sharded = [e for e in self.engines() if isinstance(e, DTensorEngine)]
        if sharded:  # each rank saw its part of the batches: the gap is the global batches'
            lt, lv = sharded[0].mean_over_ranks([lt, lv])
        gap = lv - lt
        inv_norm = 1.0 / (self.sam_state["lets_norm"] + NORM_EPS)
        hypergrads: list[float | None] = []
        for gi, group in enumerate(self.param_groups):
            if group["sam_rho"] <= 0:
                hypergrads.append(None)
                continue
            lr = float(group["lr"])
            h = -lr * gap * (dots_val.get(gi, 0.0) - dots_tr.get(gi, 0.0)) * inv_norm
            hypergrads.append(h)
            beta = float(group.get("lets_rho_lr", self.rho_lr))
            if beta == 0.0:
                continue
            if not math.isfinite(h):
                self.stats["lets_nonfinite_hypergrads"] += 1
                continue
            group["sam_rho"] = min(max(group["sam_rho"] - beta * h, self.rho_min), self.rho_max)
        self.sam_state.update(
            lets_gap=gap, lets_train_loss=lt, lets_val_loss=lv, lets_hypergrad=hypergrads,
            lets_updates=self.sam_state["lets_updates"] + 1,
        )
        return val_loss

    @torch.no_grad()
    def step(  # type: ignore[override]
        self, closure: Callable[[], Tensor] | None = None, val_closure: Callable[[], Tensor] | None = None
    ) -> Tensor | None:
        """A SAM step, then (with ``val_closure``) one step on ``ρ``: see the class docstring.
        Without ``val_closure`` it is exactly :meth:`sharpness.SAM.step`. Returns the training
        loss at ``θ`` (the first call of ``closure``)."""
        if val_closure is None:
            return super().step(closure)
        if closure is None:
            raise ValueError("step(val_closure=...) needs the training closure too")
        if getattr(self, "found_inf", None) is not None:
            raise RuntimeError(
                "GradScaler.step() cannot run LETS's closures: take the SAM step with the two-call API and "
                "scaler.step(opt), then call update_rho(closure, val_closure) (unscaled backward passes)"
            )
        if self._pending is not None:
            raise RuntimeError("step(closure, val_closure) after first_step(): finish with second_step(), then update_rho()")

        def body(c: Callable[[], Tensor]) -> Tensor:
            loss = self._closure_step(c)
            self.update_rho(c, val_closure)
            return loss

        return self._hooked_step(closure, body)

    step.hooked = True  # type: ignore[attr-defined]

    # -- checkpoints: v travels with a step whose ρ update is still due ---------------------------

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        if self.sam_state["lets_ready"]:
            params = [p for group in self.param_groups for p in group["params"]]
            sd["sam"]["lets_v"] = {i: self._lets_v[p].clone() for i, p in enumerate(params) if p in self._lets_v}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("sam", {}).get("lets_v")
        super().load_state_dict(state_dict)
        self._lets_v, self._lets_flat = {}, {}
        if saved is not None:
            params = [p for group in self.param_groups for p in group["params"]]
            self._lets_v = {params[i]: v.to(real_view(params[i].detach()).dtype).clone() for i, v in saved.items()}
        else:
            self.sam_state["lets_ready"] = False

    def __repr__(self) -> str:
        return f"LETS(backend={self.backend!r}, hessian={self.hessian!r}, base={self.base_optimizer!r})"
