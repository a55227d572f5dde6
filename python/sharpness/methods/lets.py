"""LETS: the perturbation radius ρ learned by a bilevel objective, written once for both fronts
(:class:`sharpness.LETS`, :class:`sharpness.numpy.LETS`).

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

H is never formed: ``hessian="diag"`` replaces it by ``diag(g̃ ⊙ g̃)`` (g̃ the gradient already
taken at θ_t + ρu, a Gauss-Newton/Fisher-style diagonal), ``hessian="identity"`` by I (the
first-order hypergradient). Both need only vectors the SAM step computes anyway, plus ∇L_tr and
∇L_val at θ_t+1: two more gradient evaluations per step (four in all).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from sharpness._validation import number
from sharpness.methods import NORM_EPS
from sharpness.methods.base import Method
from sharpness.methods.contract import Engine

__all__ = ["LETS"]

_HESSIANS = ("diag", "identity")
_V = "lets_v"  # v = a⊙g (⊙g̃²), kept from the first gradient to the ρ update


class LETS(Method):
    r"""SAM or ASAM whose radius ``ρ`` is learned on a validation batch (LETS, Wang et al.,
    ECML-PKDD 2024, arXiv:2408.08222).

    Algorithm: each step is a SAM (``adaptive=False``) or ASAM (``adaptive=True``) step,
    unchanged, followed by one gradient step on ``ρ`` that reduces the squared generalisation gap
    ``½(L_val − L_tr)²`` measured at the new weights::

        c   = L_val(θ⁺) − L_tr(θ⁺)                        # θ⁺: the weights after the SAM step
        h_k = −η_k · c · Σ_{i∈k} (∇L_val(θ⁺) − ∇L_tr(θ⁺))_i · D_i a_i g_i / (‖g‖ + 1e-12)
        ρ_k ← clip(ρ_k − β_k h_k, ρ_min, ρ_max)

    for every parameter group ``k`` with ``ρ_k > 0``: ``η_k`` is the group's ``lr``, ``g`` the
    first gradient and ``‖g‖`` SAM's global norm (ASAM: ``a = (|θ|+η_a)²`` and ``‖Tg‖``; SAM:
    ``a = 1``), ``D`` the Hessian's stand-in: ``g̃²`` (``hessian="diag"``, ``g̃`` the gradient at
    ``θ + e``) or 1 (``"identity"``). ``h_k`` is the hypergradient of one SAM step taken as a
    plain gradient step (the paper's derivation); with momentum or Adam as the base optimizer it
    is that approximation. With a single group this is the paper's scalar ``ρ``; with several,
    the diagonal approximation makes each group's ``ρ`` an independent coordinate of the same
    gradient. Groups with ``ρ = 0`` stay unperturbed and are never learned; a group's key
    ``lets_rho_lr`` (``β_k``, default ``rho_lr``) of 0 freezes its ``ρ``. A non-finite
    hypergradient, or a step on ``ρ`` that overflows, is not applied
    (``stats["lets_nonfinite_hypergrads"]`` counts it); a non-finite gradient norm applies no
    perturbation (as in SAM) and leaves ``ρ`` alone.

    What is the paper's and what is reconstructed: the objective, the alternation of one SAM step
    with one step on ``ρ``, a diagonal stand-in for the Hessian and LETS-ASAM are the paper's;
    the hypergradient through one step unrolled as a plain gradient step, which diagonal, per-group
    ``ρ``, the projection onto ``[ρ_min, ρ_max]`` with the floor ``1e-4`` and the default
    ``β = 1`` are this library's reconstruction.

    Memory: one vector the size of the weights (``v = a⊙g⊙D``), kept from the first gradient to
    the ρ update (in :attr:`vectors`; a checkpoint taken between them carries it).

    ``ρ`` lives in the parameter groups (``sam_rho``, so a scheduler or a checkpoint sees it);
    the last gap, losses and hypergradients (``None`` for a group not learned) are in
    ``sam_state`` (``lets_*``, saved by ``state_dict``).

    Calling it: ``step(fn, val_fn)``, ``fn`` the front's gradient function (torch: the closure,
    which zeroes the gradients, runs forward and backward on the training batch and returns the
    loss; numpy: ``grad_fn(params) -> (loss, grads)``). It runs three times: at ``θ``, at
    ``θ + e``, and at ``θ⁺`` for ``L_tr(θ⁺)``; ``val_fn`` does the same on a validation batch and
    runs once, at ``θ⁺``. Without ``val_fn`` the step is SAM's and ``ρ`` stays. With the two-call
    API: ``first_step``, ``second_step``, then :meth:`update_rho` ``(fn, val_fn)``. The extra
    passes run with the model as the closures leave it (use ``model.eval()`` inside ``val_fn`` to
    keep BatchNorm statistics and dropout out, if you want that); under a GradScaler take the SAM
    step through the scaler's loop, then call :meth:`update_rho` with unscaled closures.

    Args:
        params, base_optimizer, adaptive, eta, and the front's own arguments: as for
            :class:`sharpness.SAM` (torch) or :class:`sharpness.numpy.SAM` (``adaptive=True``
            gives LETS-ASAM). ``maximize=True`` is refused.
        rho: the initial radius ``ρ_0`` (each group's ``sam_rho``; a group may set its own).
        rho_lr: ``β``, the learning rate of ``ρ`` (each group's ``lets_rho_lr`` unless it sets its
            own). The hypergradient's scale depends on the loss, the learning rate and the Hessian
            stand-in (with ``"diag"`` it shrinks with the gradients, as ``g̃²``): tune it. 1.0 is a
            neutral default, not the paper's value.
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

        On the numpy front, ``grad_fn(params) -> (loss, grads)`` in place of the closures:

        >>> import numpy as np
        >>> import sharpness.numpy as snp
        >>> rng = np.random.default_rng(0)
        >>> X, Y, Xv, Yv = rng.normal(size=(32, 3)), rng.normal(size=32), rng.normal(size=(32, 3)), rng.normal(size=32)
        >>> def mse(X, Y):
        ...     def grad_fn(params):
        ...         r = X @ params[0] - Y
        ...         return 0.5 * np.mean(r**2), [X.T @ r / len(Y)]
        ...     return grad_fn
        >>> w = np.zeros(3)
        >>> opt = snp.LETS([w], rho=0.05, rho_lr=10.0, lr=0.1)
        >>> losses = [opt.step(mse(X, Y), mse(Xv, Yv)) for _ in range(20)]
        >>> bool(losses[-1] < losses[0]), opt.param_groups[0]["sam_rho"] != 0.05, opt.sam_state["lets_updates"]
        (True, True, 20)
    """

    norm_weights_supported = False  # its own norms (see Method.norm_weights_supported)
    group_keys = ("lets_rho_lr",)
    step_functions = ("val_fn",)

    def __init__(
        self,
        *args: Any,
        rho: float = 0.05,
        rho_lr: float = 1.0,
        hessian: str = "diag",
        rho_min: float = 1e-4,
        rho_max: float = math.inf,
        **kwargs: Any,
    ) -> None:
        if not isinstance(hessian, str) or hessian not in _HESSIANS:
            raise ValueError(f"hessian must be one of {_HESSIANS}, got {hessian!r}")
        self.hessian = hessian
        rho = number("rho", rho, minimum=0)  # ρ_0, checked by name here on both fronts
        self.rho_lr = number("rho_lr", rho_lr, minimum=0)
        self.rho_min = number("rho_min", rho_min, minimum=0)
        self.rho_max = number("rho_max", rho_max, minimum=0, finite=False)  # inf: no upper clamp
        if not self.rho_min <= self.rho_max:
            raise ValueError(f"need rho_min <= rho_max, got rho_min={rho_min}, rho_max={rho_max}")
        kwargs["rho"] = rho  # the front's ρ (each group's sam_rho)
        super().__init__(*args, **kwargs)
        self.sam_state.update(
            lets_ready=False,  # a SAM step's v is kept, awaiting update_rho
            lets_norm=math.nan,  # that step's ‖g‖ (ASAM: ‖Tg‖)
            lets_gap=math.nan,  # L_val(θ⁺) − L_tr(θ⁺) at the last update
            lets_train_loss=math.nan,
            lets_val_loss=math.nan,
            lets_hypergrad=[],  # dF/dρ per group at the last update (None: group not learned)
            lets_updates=0,
        )

    def _setup_group(self, group: dict[str, Any]) -> None:
        if group.get("maximize", False):
            raise ValueError("LETS does not support maximize=True groups")
        group["lets_rho_lr"] = number("lets_rho_lr", group.setdefault("lets_rho_lr", self.rho_lr), minimum=0)

    def _checkpointed_vectors(self) -> tuple[str, ...]:
        return (_V,)  # present only while a ρ update is due

    # -- the lower level: SAM's step, keeping v = a⊙g(⊙g̃²) ----------------------------------------

    def _start_step(self) -> None:
        self.sam_state["lets_ready"] = False  # a step without perturbation leaves nothing to learn from
        self._drop_vectors(_V)

    def _before_perturbation(self, engines: Sequence[Engine]) -> None:
        for engine in engines:  # grads = g, weights = θ: v ← a⊙g
            engine.copy("grads", _V, self.vectors)
            engine.scale_adaptive(_V, self.param_groups, self.vectors)

    def _before_base_step(self, engines: Sequence[Engine]) -> None:
        if self.hessian == "diag":
            for engine in engines:  # grads = g̃ (at θ + e): v ← v⊙g̃⊙g̃
                engine.mul("grads", _V, self.vectors)
                engine.mul("grads", _V, self.vectors)
        self.sam_state["lets_norm"] = float(self.last_grad_norm)
        self.sam_state["lets_ready"] = any(group["sam_rho"] > 0 for group in self.param_groups)

    def _after_whole_step(self, fn: Any, more: tuple[Any, ...]) -> None:
        (val_fn,) = more
        if val_fn is not None:
            self.update_rho(fn, val_fn)

    # -- the upper level -----------------------------------------------------------------------------

    def _group_dots(self, fn: Any) -> tuple[Any, float, dict[int, float], Sequence[Engine]]:
        """``fn``'s loss (as given, and as a float) at the current weights, ``Σ_{i∈k} ∇L_i·v_i``
        per group ``k``, and the engines."""
        loss, value, engines = self._gradients_at(fn)
        dots: dict[int, float] = {}
        for engine in engines:
            for gi, d in engine.group_dots("grads", _V, self.vectors).items():
                dots[gi] = dots.get(gi, 0.0) + d
        return loss, value, dots, engines

    def update_rho(self, fn: Any, val_fn: Any) -> Any:
        """One gradient step on ``ρ`` after a completed SAM step (the upper level).

        ``fn`` (training batch) and ``val_fn`` (validation batch) are gradient functions of the
        front's kind (torch: closures; numpy: ``grad_fn(params) -> (loss, grads)``, which must
        not modify the weights); each runs once, at the weights the SAM step left. Returns the
        validation loss, or None (changing nothing, calling neither) when the last step took no
        perturbation (a non-finite gradient norm, or every ``ρ`` zero) or ``ρ`` was already
        updated for it.
        """
        if self._pending is not None:
            raise RuntimeError("update_rho() between first_step() and second_step(): call it after second_step()")
        for label, f in (("fn", fn), ("val_fn", val_fn)):
            if not callable(f):
                raise TypeError(f"update_rho(): {label} must be callable, got {type(f).__name__}")
        if not self.sam_state["lets_ready"]:
            return None
        self.sam_state["lets_ready"] = False
        try:
            _, lt, dots_tr, _ = self._group_dots(fn)
            val_loss, lv, dots_val, engines = self._group_dots(val_fn)
        finally:
            self._drop_vectors(_V)
        for engine in engines:  # each rank saw its part of the batches: the gap is the global batches'
            averaged = engine.mean_over_ranks([lt, lv])
            if averaged is not None:
                lt, lv = averaged
                break
        gap = lv - lt
        inv_norm = 1.0 / (self.sam_state["lets_norm"] + NORM_EPS)
        hypergrads: list[float | None] = []
        for gi, group in enumerate(self.param_groups):
            if group["sam_rho"] <= 0:
                hypergrads.append(None)
                continue
            h = -float(group["lr"]) * gap * (dots_val.get(gi, 0.0) - dots_tr.get(gi, 0.0)) * inv_norm
            hypergrads.append(h)
            beta = group["lets_rho_lr"]
            if beta == 0.0:
                continue
            new = group["sam_rho"] - beta * h
            if not math.isfinite(new):  # a non-finite h (or an overflowing step) is not applied
                self.stats["lets_nonfinite_hypergrads"] += 1
                continue
            group["sam_rho"] = min(max(new, self.rho_min), self.rho_max)
        self.sam_state.update(
            lets_gap=gap,
            lets_train_loss=lt,
            lets_val_loss=lv,
            lets_hypergrad=hypergrads,
            lets_updates=self.sam_state["lets_updates"] + 1,
        )
        return val_loss

    def __repr__(self) -> str:
        _, _, rest = super().__repr__().partition("(")
        return f"{type(self).__name__}(hessian={self.hessian!r}, {rest}"
