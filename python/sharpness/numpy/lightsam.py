"""LightSAM over lists of numpy arrays (the numpy front of :mod:`sharpness.optim.lightsam`).

Cheng, Shen, Sun, Yin, Cao, Chen, "LightSAM: Parameter-Agnostic Sharpness-Aware Minimization",
2025, arXiv:2505.24399: SAM with adaptive ascent and descent, converging for any ρ and η.
AdaGrad-Norm form (``s`` the gradient at ``θ``, ``g̃`` at ``w̃``)::

    u ← u + ‖s‖²,  w̃ = θ + ρ s/√u;   v ← v + ‖g̃‖²,  θ ← θ − η g̃/√v;   u₀ = v₀ = ε²

``"adagrad"``: per-coordinate ``u``, ``v``; ``"adam"``: Adam moments for both steps (second
moments from ``ε²``, no bias correction). The norms, the perturbation with its backup, the
restoration and the AdaGrad-Norm update run in :mod:`sharpness._core` (one call per dtype over
all arrays); the per-coordinate forms use numpy's vectorised ops per array.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from sharpness import _core
from sharpness._validation import number, pair
from sharpness.numpy.sam import _check_params, check_params_usable

__all__ = ["LightSAM"]

VARIANTS = ("adagrad-norm", "adagrad", "adam")


class LightSAM:
    """LightSAM (arXiv:2505.24399) over a list of float32/float64 arrays, updated in place.

    Args:
        params: the arrays to train (C-contiguous, writable, not sharing memory).
        lr: ``η`` (0.1 for the AdaGrad forms, 1e-3 for the Adam form).
        rho: ``ρ`` (0.05).
        variant: ``"adagrad-norm"`` (default), ``"adagrad"`` or ``"adam"``.
        eps: ``ε``; the accumulators start at ``ε²`` (1e-8).
        betas: ``(β₁, β₂)`` of the Adam form.

    Example:
        >>> import numpy as np
        >>> from sharpness.numpy import LightSAM
        >>> w = np.zeros(3)
        >>> opt = LightSAM([w], lr=10.0, rho=1.0)  # a large lr and rho still converge
        >>> def grad_fn(params):
        ...     return float(np.sum((params[0] - 1) ** 2)), [2 * (params[0] - 1)]
        >>> for _ in range(200):
        ...     loss = opt.step(grad_fn)
        >>> bool(np.allclose(w, 1.0, atol=1e-6))
        True
    """

    def __init__(
        self,
        params: Sequence[np.ndarray],
        lr: float | None = None,
        rho: float = 0.05,
        variant: str = "adagrad-norm",
        eps: float = 1e-8,
        betas: tuple[float, float] = (0.9, 0.999),
    ) -> None:
        self.params = _check_params(params)
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if lr is None:
            lr = 1e-3 if variant == "adam" else 0.1
        lr, rho = number("lr", lr, minimum=0), number("rho", rho, minimum=0)
        eps = number("eps", eps, above=0)
        betas = pair("betas", betas, minimum=0, below=1)
        self.variant = variant
        self.hyperparams = {"lr": lr, "rho": rho, "eps": eps, "betas": betas}
        self._by_dtype: dict[np.dtype, list[int]] = {}
        for i, p in enumerate(self.params):
            self._by_dtype.setdefault(p.dtype, []).append(i)
        self._backups = [np.empty_like(p) for p in self.params]
        self._perturbed = False
        self.u = self.v = float(eps) ** 2
        self.state: dict[str, list[np.ndarray]] = {}
        if variant != "adagrad-norm":
            self.state["u"] = [np.full_like(p, eps**2) for p in self.params]
            self.state["v"] = [np.full_like(p, eps**2) for p in self.params]
        if variant == "adam":
            self.state["m"] = [np.zeros_like(p) for p in self.params]
            self.state["n"] = [np.zeros_like(p) for p in self.params]
        self.steps = 0

    @property
    def lr(self) -> float:
        return self.hyperparams["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        self.hyperparams["lr"] = number("lr", value, minimum=0)

    @property
    def perturbed(self) -> bool:
        """True between :meth:`first_step` and :meth:`second_step`."""
        return self._perturbed

    def _grads(self, grads: Sequence[np.ndarray]) -> list[np.ndarray]:
        check_params_usable(self.params)
        grads = list(grads)
        if len(grads) != len(self.params):
            raise ValueError(f"got {len(grads)} gradients for {len(self.params)} parameters")
        out = []
        for i, (p, g) in enumerate(zip(self.params, grads)):
            g = np.ascontiguousarray(g, dtype=p.dtype)
            if g.shape != p.shape:
                raise ValueError(f"grads[{i}] has shape {g.shape}, params[{i}] has {p.shape}")
            out.append(g)
        return out

    def _sumsq(self, grads: list[np.ndarray]) -> float:
        return sum(_core.sum_of_squares([grads[i] for i in idx]) for idx in self._by_dtype.values())

    def _save(self) -> None:
        for idx in self._by_dtype.values():
            _core.restore([self._backups[i] for i in idx], [self.params[i] for i in idx])

    def first_step(self, grads: Sequence[np.ndarray]) -> float:
        """Move to ``w̃`` (saving ``θ``) from the gradients at ``θ``; returns ``‖s‖`` (no move
        when it is not finite)."""
        if self._perturbed:
            raise RuntimeError("first_step called twice: call second_step(grads) first")
        s = self._grads(grads)
        sq = self._sumsq(s)
        norm = math.sqrt(sq) if sq >= 0 else math.nan
        self._perturbed = True
        if not math.isfinite(norm):
            self._save()
            return norm
        rho = self.hyperparams["rho"]
        if self.variant == "adagrad-norm":
            self.u += sq
            scale = rho / math.sqrt(self.u)
            for idx in self._by_dtype.values():
                _core.perturb([self.params[i] for i in idx], [s[i] for i in idx], [self._backups[i] for i in idx], scale)
            return norm
        self._save()
        b1, b2 = self.hyperparams["betas"]
        for i, p in enumerate(self.params):
            u = self.state["u"][i]
            if self.variant == "adagrad":
                u += s[i] * s[i]
                p += rho * s[i] / np.sqrt(u)
            else:
                m = self.state["m"][i]
                m *= b1
                m += (1 - b1) * s[i]
                u *= b2
                u += (1 - b2) * s[i] * s[i]
                p += rho * m / np.sqrt(u)
        return norm

    def second_step(self, grads: Sequence[np.ndarray]) -> None:
        """Restore ``θ`` bit for bit, then the adaptive update with the gradients at ``w̃``."""
        if not self._perturbed:
            raise RuntimeError("second_step called without first_step")
        g = self._grads(grads)
        self._undo()
        lr = self.hyperparams["lr"]
        if self.variant == "adagrad-norm":
            self.v += self._sumsq(g)
            alpha = -lr / math.sqrt(self.v)
            for idx in self._by_dtype.values():
                _core.axpby([g[i] for i in idx], [self.params[i] for i in idx], alpha, 1.0)
        else:
            b1, b2 = self.hyperparams["betas"]
            for i, p in enumerate(self.params):
                v = self.state["v"][i]
                if self.variant == "adagrad":
                    v += g[i] * g[i]
                    p -= lr * g[i] / np.sqrt(v)
                else:
                    n = self.state["n"][i]
                    n *= b1
                    n += (1 - b1) * g[i]
                    v *= b2
                    v += (1 - b2) * g[i] * g[i]
                    p -= lr * n / np.sqrt(v)
        self.steps += 1

    def _undo(self) -> None:
        for idx in self._by_dtype.values():
            _core.restore([self.params[i] for i in idx], [self._backups[i] for i in idx])
        self._perturbed = False

    def step(self, grad_fn: Callable[[list[np.ndarray]], tuple[Any, Sequence[np.ndarray]]]) -> Any:
        """One whole step: ``grad_fn(params) -> (loss, grads)`` runs at ``θ``, then at ``w̃``
        (``θ`` is restored if it raises there). Returns the first loss."""
        loss, grads = grad_fn(self.params)
        self.first_step(grads)
        try:
            _, grads = grad_fn(self.params)
            self.second_step(grads)
        except BaseException:
            if self._perturbed:
                self._undo()
            raise
        return loss

    def state_dict(self) -> dict[str, Any]:
        """Copies of everything the next steps depend on (refused between the two halves)."""
        if self._perturbed:
            raise RuntimeError("state_dict() between first_step() and second_step()")
        return {
            "variant": self.variant,
            "hyperparams": dict(self.hyperparams),
            "u": self.u,
            "v": self.v,
            "steps": self.steps,
            "state": {k: [a.copy() for a in arrays] for k, arrays in self.state.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._perturbed:
            raise RuntimeError("load_state_dict() between first_step() and second_step()")
        if state_dict["variant"] != self.variant:
            raise ValueError(f"state of a {state_dict['variant']!r} LightSAM, this one is {self.variant!r}")
        self.hyperparams = dict(state_dict["hyperparams"])
        self.u, self.v, self.steps = float(state_dict["u"]), float(state_dict["v"]), int(state_dict["steps"])
        for k, arrays in state_dict["state"].items():
            for dst, src in zip(self.state[k], arrays):
                np.copyto(dst, src)

    def __repr__(self) -> str:
        return f"LightSAM(variant={self.variant!r}, {self.hyperparams})"
