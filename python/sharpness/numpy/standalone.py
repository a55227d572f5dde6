"""AdaSAM and Bayesian SAM over lists of numpy arrays (the numpy fronts of
:mod:`sharpness.optim.adasam` and :mod:`sharpness.optim.bsam`).

Both are standalone optimizers (no base optimizer), like :class:`~sharpness.numpy.LightSAM`:

* AdaSAM (Sun et al., 2023, arXiv:2303.00565): SAM's perturbation, then an AMSGrad-style step
  with momentum and no bias correction on the perturbed gradient.
* Bayesian SAM (Möllenhoff & Khan, ICLR 2023, arXiv:2210.01620): SAM as an optimal relaxation
  of Bayes; an Adam-like scale ``s`` sets the (elementwise) perturbation and the spread of a
  Gaussian posterior, from which the first gradient's point is sampled.

The norms, the perturbation with its backup, the exact restoration and every linear
combination (moving averages, the weight update) run in :mod:`sharpness._core`, one call per
dtype over all arrays. What no kernel covers (squares, square roots, elementwise quotients and
maxima, the Gaussian draws) is numpy's vectorised ops per array, in the arrays' dtype.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from sharpness import _core
from sharpness._validation import number, pair
from sharpness.methods import NORM_EPS
from sharpness.numpy.sam import _check_params, _Group, check_params_usable

__all__ = ["AdaSAM", "BayesianSAM"]


GradFn = Callable[[list[np.ndarray]], tuple[Any, Sequence[np.ndarray]]]


def _bounded(name: str, value: Any, positive: bool = False) -> float:
    return number(name, value, above=0) if positive else number(name, value, minimum=0)


def _betas(value: Any) -> tuple[float, float]:
    return pair("betas", value, minimum=0, below=1)


class _Standalone:
    """What AdaSAM and Bayesian SAM share: the checked arrays split by dtype, the backups, the
    gradient checks, the state-dict frame and the two-call protocol's guards."""

    _STATE: tuple[str, ...] = ()  # names of the per-parameter state arrays

    def __init__(self, params: Sequence[np.ndarray], hyperparams: dict[str, Any]) -> None:
        #: Hyper-parameters, read at every step (a schedule may change them between steps).
        self.hyperparams: dict[str, Any] = self._check_hyperparams(hyperparams)
        self.params: list[np.ndarray] = _check_params(params)
        groups: dict[np.dtype, list[int]] = {}
        for i, p in enumerate(self.params):
            groups.setdefault(p.dtype, []).append(i)
        self._groups = [_Group(dt, idx, self.params) for dt, idx in groups.items()]
        #: Per-parameter state: name -> one array per parameter.
        self.state: dict[str, list[np.ndarray]] = {name: self._initial(name) for name in self._STATE}
        self._perturbed = False
        self.steps = 0  # completed steps
        self._nonfinite = 0  # first steps whose gradient norm was not finite

    # -- what a method defines ------------------------------------------------------------------

    @staticmethod
    def _check_hyperparams(hp: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def _initial(self, name: str) -> list[np.ndarray]:
        return [np.zeros_like(p) for p in self.params]

    # -- public ------------------------------------------------------------------------------------

    @property
    def lr(self) -> float:
        """The learning rate (settable, e.g. by a schedule)."""
        return self.hyperparams["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        self.hyperparams["lr"] = _bounded("lr", value)

    @property
    def perturbed(self) -> bool:
        """True between :meth:`first_step` and :meth:`second_step`."""
        return self._perturbed

    def restore(self) -> bool:
        """Puts the saved weights back, bit for bit, if a step is pending (after a failed
        forward/backward); returns whether there was one."""
        if not self._pending():
            return False
        self._undo()
        return True

    def state_dict(self) -> dict[str, Any]:
        """Copies of everything the next steps depend on (refused in the middle of a step)."""
        if self._pending():
            raise RuntimeError(
                f"state_dict called in the middle of a {type(self).__name__} step: the weights "
                "are moved; save after second_step"
            )
        return {
            "method": type(self).__name__,
            "hyperparams": dict(self.hyperparams),
            "steps": self.steps,
            "nonfinite_steps": self._nonfinite,
            "state": {k: [a.copy() for a in arrays] for k, arrays in self.state.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a dict made by :meth:`state_dict` (its arrays are copied, not shared)."""
        if self._pending():
            raise RuntimeError("load_state_dict called in the middle of a step; finish it first")
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        missing = {"method", "hyperparams", "steps", "nonfinite_steps", "state"} - set(state_dict)
        if missing:
            raise ValueError(f"state_dict lacks {', '.join(sorted(missing))}")
        if state_dict["method"] != type(self).__name__:
            raise ValueError(f"state_dict is from a {state_dict['method']}, not a {type(self).__name__}")
        hyperparams = self._check_hyperparams(dict(state_dict["hyperparams"]))
        saved = state_dict["state"]
        if not isinstance(saved, dict) or set(saved) != set(self._STATE):
            raise ValueError(f"state_dict['state'] must hold exactly {', '.join(self._STATE)}")
        for name in self._STATE:
            arrays = saved[name]
            if not isinstance(arrays, (list, tuple)) or len(arrays) != len(self.params):
                raise ValueError(f"state_dict['state'][{name!r}] must hold {len(self.params)} arrays")
            for i, (a, p) in enumerate(zip(arrays, self.params)):
                if not isinstance(a, np.ndarray) or a.shape != p.shape or a.dtype != p.dtype:
                    raise ValueError(
                        f"state_dict['state'][{name!r}][{i}] must be a {p.dtype} array of shape {p.shape}, "
                        f"got {getattr(a, 'dtype', type(a).__name__)} {getattr(a, 'shape', '')}"
                    )
        self.hyperparams = hyperparams
        self.state = {name: [np.array(a, order="C", copy=True) for a in saved[name]] for name in self._STATE}
        self.steps = int(state_dict["steps"])
        self._nonfinite = int(state_dict["nonfinite_steps"])

    def __repr__(self) -> str:
        hp = ", ".join(f"{k}={v!r}" for k, v in self.hyperparams.items())
        return f"{type(self).__name__}(<{len(self.params)} arrays>, {hp})"

    # -- internals ---------------------------------------------------------------------------------

    def _pending(self) -> bool:
        return self._perturbed

    def _by_group(self, arrays: list[np.ndarray]) -> list[list[np.ndarray]]:
        return [[arrays[i] for i in grp.index] for grp in self._groups]

    def _grads(self, grads: Sequence[np.ndarray]) -> list[np.ndarray]:
        """``grads`` checked against ``params`` (one C-contiguous array each, same shape and
        dtype; ``params`` still usable); numpy scalars stand for 0-d arrays."""
        check_params_usable(self.params)
        if isinstance(grads, np.ndarray):
            raise TypeError("grads must be a list of numpy arrays (one per parameter), not one array")
        try:
            grads = list(grads)
        except TypeError:
            raise TypeError(f"grads must be a list of numpy arrays, got {type(grads).__name__}") from None
        if len(grads) != len(self.params):
            raise ValueError(f"got {len(grads)} gradient arrays for {len(self.params)} parameters")
        for i, (g, p) in enumerate(zip(grads, self.params)):
            if not isinstance(g, np.ndarray):
                if not isinstance(g, np.generic):
                    raise TypeError(f"grads[{i}] is a {type(g).__name__}, not a numpy array")
                g = grads[i] = np.asarray(g)
            if g.dtype != p.dtype:
                raise TypeError(f"grads[{i}] has dtype {g.dtype} but params[{i}] is {p.dtype}")
            if g.shape != p.shape:
                raise ValueError(f"grads[{i}] has shape {g.shape} but params[{i}] has shape {p.shape}")
            if not (g.flags.c_contiguous and g.flags.aligned):
                grads[i] = np.ascontiguousarray(g)
        return grads

    def _norm(self, grads: list[np.ndarray]) -> float:
        sumsq = sum(_core.sum_of_squares(g) for g in self._by_group(grads))
        return math.sqrt(sumsq) if sumsq >= 0 else math.nan

    def _save(self) -> None:
        for grp in self._groups:
            _core.restore(grp.backups, grp.params)

    def _undo(self) -> None:
        for grp in self._groups:
            _core.restore(grp.params, grp.backups)
        self._perturbed = False

    @staticmethod
    def _call(grad_fn: GradFn, params: list[np.ndarray]) -> tuple[Any, Any]:
        out = grad_fn(params)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError(
                "grad_fn(params) must return a pair (loss, grads) as a tuple, "
                f"got {type(out).__name__}" + (f" of length {len(out)}" if isinstance(out, (tuple, list)) else "")
            )
        return out[0], out[1]

    def _check_first(self) -> None:
        if self._perturbed:
            raise RuntimeError("first_step called twice: call second_step(grads) first")

    def _check_second(self) -> None:
        if not self._perturbed:
            raise RuntimeError("second_step called without first_step: call first_step(grads) first (or use step(grad_fn))")


# ============================================================================== AdaSAM


class AdaSAM(_Standalone):
    r"""AdaSAM (Sun, Shen, Zhong, Ding, Chen, Sun, Li, Sun, Tao, "AdaSAM: Boosting
    Sharpness-Aware Minimization with Adaptive Learning Rate and Momentum for Training Deep
    Neural Networks", 2023, arXiv:2303.00565) over a list of float32/float64 arrays, updated in
    place: SAM's perturbation, then an AMSGrad-style step with momentum.

    Algorithm (as :class:`sharpness.AdaSAM`)::

        s  = ∇L(x)                          # first gradient
        e  = ρ s/(‖s‖ + 1e-12)              # ‖·‖ over all arrays
        g  = ∇L(x + e)                      # second gradient
        m ← β₁m + (1−β₁)g;  v ← β₂v + (1−β₂)g²;  v̂ ← max(v̂, v)
        x ← x − lr·m/√max(v̂, ε²)            # from the exact saved x; m = v = v̂ = 0 at the start

    No bias correction, and ``ε`` only as the floor ``ε²`` of ``v̂`` (the paper's ``v̂₋₁ = ε²``).
    ``rho = 0`` is the update alone. A non-finite ``‖s‖`` moves nothing (counted in
    ``state_dict()["nonfinite_steps"]``); :meth:`second_step` then updates with its gradients.
    The state (``m``, ``v``, ``vmax``) is in :attr:`state` and :meth:`state_dict`.

    Args:
        params: the arrays to train (C-contiguous, writable, float32/float64, not sharing memory).
        lr: ``γ`` (1e-3).
        rho: ``ρ`` (0.05).
        betas: ``(β₁, β₂)`` ((0.9, 0.999)).
        eps: ``ε`` (1e-8), > 0.

    Example:
        >>> import numpy as np
        >>> from sharpness.numpy import AdaSAM
        >>> rng = np.random.default_rng(0)
        >>> X, y = rng.normal(size=(32, 3)), rng.normal(size=32)
        >>> w = np.zeros(3)
        >>> def grad_fn(params):
        ...     r = X @ params[0] - y
        ...     return 0.5 * np.mean(r**2), [X.T @ r / len(y)]
        >>> opt = AdaSAM([w], lr=0.01, rho=0.05)
        >>> losses = [opt.step(grad_fn) for _ in range(100)]
        >>> bool(losses[-1] < losses[0])
        True
    """

    _STATE = ("m", "v", "vmax")

    def __init__(
        self,
        params: Sequence[np.ndarray],
        lr: float = 1e-3,
        rho: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        super().__init__(params, {"lr": lr, "rho": rho, "betas": betas, "eps": eps})

    @staticmethod
    def _check_hyperparams(hp: dict[str, Any]) -> dict[str, Any]:
        keys = {"lr", "rho", "betas", "eps"}
        if set(hp) != keys:
            raise ValueError(f"AdaSAM's hyper-parameters are {', '.join(sorted(keys))}, got {', '.join(sorted(hp))}")
        return {
            "lr": _bounded("lr", hp["lr"]),
            "rho": _bounded("rho", hp["rho"]),
            "betas": _betas(hp["betas"]),
            "eps": _bounded("eps", hp["eps"], positive=True),
        }

    def first_step(self, grads: Sequence[np.ndarray]) -> float:
        """Moves the weights to ``x + e`` (saving ``x``) from the gradients at ``x``. Returns
        ``‖s‖`` (``inf`` or ``nan`` when it is not finite: then nothing moves)."""
        self._check_first()
        s = self._grads(grads)
        norm = self._norm(s)
        if math.isfinite(norm):
            scale = self.hyperparams["rho"] / (norm + NORM_EPS)
            for grp, g in zip(self._groups, self._by_group(s)):
                _core.perturb(grp.params, g, grp.backups, scale)
        else:
            self._save()
            self._nonfinite += 1
        self._perturbed = True
        return norm

    def second_step(self, grads: Sequence[np.ndarray]) -> None:
        """Restores ``x`` bit for bit, then the AdaSAM update with ``grads`` (taken at ``x + e``)."""
        self._check_second()
        g = self._grads(grads)
        self._undo()
        hp = self.hyperparams
        b1, b2 = hp["betas"]
        floor = hp["eps"] ** 2
        m, v, vmax = self.state["m"], self.state["v"], self.state["vmax"]
        g2 = [a * a for a in g]  # elementwise: no kernel
        for gg, gg2, mm, vv in zip(self._by_group(g), self._by_group(g2), self._by_group(m), self._by_group(v)):
            _core.axpby(gg, mm, 1.0 - b1, b1)  # m ← β₁m + (1−β₁)g
            _core.axpby(gg2, vv, 1.0 - b2, b2)  # v ← β₂v + (1−β₂)g²
        step = []
        for mm, vv, vm in zip(m, v, vmax):  # elementwise: no kernel
            np.maximum(vm, vv, out=vm)
            step.append(mm / np.sqrt(np.maximum(vm, floor)))
        for grp, q in zip(self._groups, self._by_group(step)):  # x ← x − lr·m/√v̂
            _core.axpby(q, grp.params, -hp["lr"], 1.0)
        self.steps += 1

    def step(self, grad_fn: GradFn) -> Any:
        """One whole step: ``grad_fn(params) -> (loss, grads)`` runs at ``x``, then at ``x + e``
        (``x`` is restored if it raises there). Returns the first loss."""
        loss, grads = self._call(grad_fn, self.params)
        self.first_step(grads)
        try:
            _, grads = self._call(grad_fn, self.params)
            self.second_step(grads)
        except BaseException:
            if self._perturbed:
                self._undo()
            raise
        return loss


# ============================================================================== Bayesian SAM


class BayesianSAM(_Standalone):
    r"""Bayesian SAM (Möllenhoff & Khan, "SAM as an Optimal Relaxation of Bayes", ICLR 2023,
    arXiv:2210.01620) over a list of float32/float64 arrays, updated in place: a standalone
    optimizer whose Adam-like scale ``s`` sets the perturbation and the posterior's spread.

    Algorithm (the paper's Algorithm 1, as :class:`sharpness.BayesianSAM`)::

        ε ~ N(0, 1/(N s))                  # from the optimizer's numpy Generator
        g   = ∇L(θ + ε)                    # first gradient, at a posterior sample
        e   = ρ g/s                        # elementwise
        g_e = ∇L(θ + e)                    # second gradient
        g_m ← β₁ g_m + (1−β₁)(g_e + δ θ)
        s   ← β₂ s + (1−β₂)(√s |g| + δ + γ)
        θ   ← θ − lr g_m/s                 # from the exact saved θ; s₀ = s_init, g_m = 0

    The noise is drawn from :attr:`generator` (``numpy.random.default_rng(seed)``), one
    ``standard_normal(n, dtype)`` per dtype over that dtype's arrays in order, in their dtype;
    :meth:`state_dict` saves the generator's state, so a resumed run draws the same noise.
    ``step(grad_fn)`` runs both passes; in three calls: :meth:`begin_step` (to ``θ + ε``),
    :meth:`first_step` with the gradients there, :meth:`second_step` with those at ``θ + e``.
    A non-finite ``‖g‖`` leaves ``θ`` (and ``s``) alone and is counted; :meth:`second_step`
    then updates with its gradients. ``rho = 0`` is the noisy Adam-like variational method
    without the SAM step. :meth:`posterior_std` gives ``1/√(N s)``.

    Args:
        params: the arrays to train (C-contiguous, writable, float32/float64, not sharing memory).
        num_data: ``N``, the number of training examples.
        lr: ``α`` (0.1).
        rho: ``ρ`` (0.05).
        betas: ``(β₁, β₂)`` ((0.9, 0.999)).
        weight_decay: ``δ``, the prior precision (1e-4).
        damping: ``γ`` (0.1).
        s_init: ``s₀`` (1.0), > 0.
        seed: seeds the noise's ``numpy.random.Generator`` (an int, None, or a Generator, used
            as it is).

    Example:
        >>> import numpy as np
        >>> from sharpness.numpy import BayesianSAM
        >>> rng = np.random.default_rng(0)
        >>> X = rng.normal(size=(32, 3))
        >>> y = X @ np.array([1.0, -2.0, 0.5]) + 0.1 * rng.normal(size=32)
        >>> w = np.zeros(3)
        >>> def grad_fn(params):
        ...     r = X @ params[0] - y
        ...     return 0.5 * np.mean(r**2), [X.T @ r / len(y)]
        >>> opt = BayesianSAM([w], num_data=1000, lr=0.1, rho=0.01, seed=0)
        >>> for _ in range(100):
        ...     loss = opt.step(grad_fn)             # the loss at the posterior sample
        >>> bool(grad_fn([w])[0] < 0.01)             # the posterior mean fits
        True
        >>> [round(float(s), 2) for s in opt.posterior_std()[0]]   # 1/√(N s)
        [0.03, 0.03, 0.03]
    """

    _STATE = ("s", "gm")

    def __init__(
        self,
        params: Sequence[np.ndarray],
        num_data: float,
        lr: float = 0.1,
        rho: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 1e-4,
        damping: float = 0.1,
        s_init: float = 1.0,
        seed: int | np.random.Generator | None = None,
    ) -> None:
        hp = dict(num_data=num_data, lr=lr, rho=rho, betas=betas, weight_decay=weight_decay, damping=damping, s_init=s_init)
        self._noisy = False  # between begin_step and first_step: the weights hold θ + ε
        super().__init__(params, hp)
        if not (seed is None or isinstance(seed, np.random.Generator)) and (
            isinstance(seed, bool) or not isinstance(seed, (int, np.integer))
        ):
            raise TypeError(f"seed must be an int, None or a numpy Generator, got {type(seed).__name__}")
        #: The generator of the posterior samples (its state is in :meth:`state_dict`).
        self.generator: np.random.Generator = np.random.default_rng(seed)

    @staticmethod
    def _check_hyperparams(hp: dict[str, Any]) -> dict[str, Any]:
        keys = {"num_data", "lr", "rho", "betas", "weight_decay", "damping", "s_init"}
        if set(hp) != keys:
            raise ValueError(f"BayesianSAM's hyper-parameters are {', '.join(sorted(keys))}, got {', '.join(sorted(hp))}")
        return {
            "num_data": _bounded("num_data", hp["num_data"], positive=True),
            "lr": _bounded("lr", hp["lr"]),
            "rho": _bounded("rho", hp["rho"]),
            "betas": _betas(hp["betas"]),
            "weight_decay": _bounded("weight_decay", hp["weight_decay"]),
            "damping": _bounded("damping", hp["damping"]),
            "s_init": _bounded("s_init", hp["s_init"], positive=True),
        }

    def _initial(self, name: str) -> list[np.ndarray]:
        if name == "s":
            return [np.full_like(p, self.hyperparams["s_init"]) for p in self.params]
        return super()._initial(name)

    def _pending(self) -> bool:
        return self._noisy or self._perturbed

    def posterior_std(self) -> list[np.ndarray]:
        """``1/√(N s)``, one array per parameter: the posterior's standard deviation."""
        n = self.hyperparams["num_data"]
        return [1.0 / np.sqrt(n * s) for s in self.state["s"]]

    def begin_step(self) -> None:
        """Saves ``θ`` and moves the weights to a posterior sample ``θ + ε``,
        ``ε ~ N(0, 1/(N s))``; the first gradient is taken there."""
        check_params_usable(self.params)
        if self._pending():
            raise RuntimeError(
                "begin_step called again before the step completed: call first_step(grads) and "
                "second_step(grads) (or restore()) first"
            )
        self._save()
        n = self.hyperparams["num_data"]
        for grp, s in zip(self._groups, self._by_group(self.state["s"])):
            z = self.generator.standard_normal(sum(p.size for p in grp.params), dtype=grp.dtype)
            at = 0
            for p, si in zip(grp.params, s):  # elementwise: no kernel
                p += z[at : at + p.size].reshape(p.shape) / np.sqrt(si * n)
                at += p.size
        self._noisy = True

    def first_step(self, grads: Sequence[np.ndarray]) -> float:
        """With ``grads = ∇L(θ + ε)``: back to ``θ`` (bit for bit), then to ``θ + ρ g/s``, and
        ``s`` updated. Returns ``‖g‖`` (``inf`` or ``nan``: nothing moves, ``s`` is kept)."""
        if not self._noisy:
            raise RuntimeError(
                "first_step needs begin_step() before it (the first gradient is taken at a "
                "posterior sample); or use step(grad_fn)"
            )
        g = self._grads(grads)
        self._undo()  # θ, from the backup
        self._noisy = False
        self._perturbed = True
        norm = self._norm(g)
        if not math.isfinite(norm):
            self._nonfinite += 1
            return norm
        hp = self.hyperparams
        rho, b2 = hp["rho"], hp["betas"][1]
        s = self.state["s"]
        if rho != 0.0:
            q = [a / b for a, b in zip(g, s)]  # elementwise: no kernel
            for grp, qq in zip(self._groups, self._by_group(q)):  # θ + ρ g/s
                _core.axpby(qq, grp.params, rho, 1.0)
        t = [np.sqrt(b) * np.abs(a) + (hp["weight_decay"] + hp["damping"]) for a, b in zip(g, s)]
        for tt, ss in zip(self._by_group(t), self._by_group(s)):  # s ← β₂s + (1−β₂)(√s|g| + δ + γ)
            _core.axpby(tt, ss, 1.0 - b2, b2)
        self._perturbed = True
        return norm

    def second_step(self, grads: Sequence[np.ndarray]) -> None:
        """With ``grads = ∇L(θ + e)``: back to ``θ`` (bit for bit), then the bSAM update."""
        if self._noisy:
            raise RuntimeError("second_step after begin_step: call first_step(grads) with the gradients at the sample first")
        self._check_second()
        g = self._grads(grads)
        self._undo()
        hp = self.hyperparams
        b1 = hp["betas"][0]
        d = [a.copy() for a in g]
        for grp, dd, gm in zip(self._groups, self._by_group(d), self._by_group(self.state["gm"])):
            _core.axpby(grp.params, dd, hp["weight_decay"], 1.0)  # g_e + δθ
            _core.axpby(dd, gm, 1.0 - b1, b1)  # g_m ← β₁g_m + (1−β₁)(g_e + δθ)
        q = [a / b for a, b in zip(self.state["gm"], self.state["s"])]  # elementwise: no kernel
        for grp, qq in zip(self._groups, self._by_group(q)):  # θ ← θ − lr g_m/s
            _core.axpby(qq, grp.params, -hp["lr"], 1.0)
        self.steps += 1

    def step(self, grad_fn: GradFn) -> Any:
        """One whole step: ``grad_fn(params) -> (loss, grads)`` at ``θ + ε``, then at ``θ + e``;
        on an exception ``θ`` comes back bit for bit. Returns the first loss (at the sample)."""
        self.begin_step()
        try:
            loss, grads = self._call(grad_fn, self.params)
            self.first_step(grads)
            _, grads = self._call(grad_fn, self.params)
            self.second_step(grads)
        except BaseException:
            self.restore()
            raise
        return loss

    def _undo(self) -> None:
        super()._undo()
        self._noisy = False

    def state_dict(self) -> dict[str, Any]:
        """The base frame plus ``"generator"``: the noise generator's ``bit_generator.state``."""
        sd = super().state_dict()
        sd["generator"] = copy.deepcopy(self.generator.bit_generator.state)
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a dict made by :meth:`state_dict`, the generator's state included."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        state_dict = dict(state_dict)
        gen = state_dict.pop("generator", None)
        kind = type(self.generator.bit_generator).__name__
        if state_dict.get("method") == type(self).__name__ and not (isinstance(gen, dict) and gen.get("bit_generator") == kind):
            raise ValueError(
                f"state_dict['generator'] must be the state of a {kind} bit generator"
            )
        super().load_state_dict(state_dict)
        self.generator.bit_generator.state = copy.deepcopy(gen)
