"""SAM and ASAM over lists of numpy arrays, with an SGD, Adam or AdamW base step.

Sharpness-Aware Minimization (Foret, Kleiner, Mobahi, Neyshabur, "Sharpness-Aware Minimization
for Efficiently Improving Generalization", ICLR 2021, arXiv:2010.01412) minimises
``max_{‖e‖≤ρ} L(w + e)``. Each step takes two gradients:

1. ``g = ∇L(w)``; ascend to the (first-order) worst point of the ρ-ball,
   ``e = ρ·g / (‖g‖ + 1e-12)``, with ``‖·‖`` the L2 norm over *all* arrays;
2. ``g̃ = ∇L(w + e)``; go back to ``w`` (restored bit for bit from a saved copy, never by
   subtracting ``e``) and take one step of the base optimizer with ``g̃``.

Adaptive SAM (Kwon, Kim, Park, Choi, "ASAM: Adaptive Sharpness-Aware Minimization for
Scale-Invariant Learning of Deep Neural Networks", ICML 2021, arXiv:2102.11600) measures the ball
in the coordinates ``T_w = |w| + η``: ``e = ρ·T_w²g / (‖T_w g‖ + 1e-12)``.

All arithmetic runs in the native kernels of :mod:`sharpness._core`: one norm pass, one
perturbation pass (which also writes the backup) and one fused "restore + base step" pass, each a
single call over all arrays of one dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from sharpness import _core
from sharpness._validation import flag, number, pair
from sharpness.methods import NORM_EPS

__all__ = ["SAM"]

_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

_SGD_DEFAULTS: dict[str, Any] = {
    "lr": 1e-3,
    "momentum": 0.0,
    "dampening": 0.0,
    "weight_decay": 0.0,
    "nesterov": False,
    "maximize": False,
}
_ADAM_DEFAULTS: dict[str, Any] = {
    "lr": 1e-3,
    "betas": (0.9, 0.999),
    "eps": 1e-8,
    "weight_decay": 0.0,
    "amsgrad": False,
    "maximize": False,
}
_BASE_DEFAULTS: dict[str, dict[str, Any]] = {
    "sgd": _SGD_DEFAULTS,
    "adam": _ADAM_DEFAULTS,
    "adamw": {**_ADAM_DEFAULTS, "weight_decay": 1e-2},
}
_SAM_KEYS = ("rho", "adaptive", "eta")


def _real(name: str, value: Any) -> float:
    return number(name, value)


def _flag(name: str, value: Any) -> bool:
    return flag(name, value)


def _check_hyperparams(base: str, hp: dict[str, Any]) -> dict[str, Any]:
    """Validate and normalise a full hyper-parameter dict (SAM keys + the base optimizer's)."""
    allowed = set(_SAM_KEYS) | set(_BASE_DEFAULTS[base])
    unknown = sorted(set(hp) - allowed)
    if unknown:
        raise TypeError(
            f"unknown argument(s) for base={base!r}: {', '.join(unknown)}; "
            f"accepted: {', '.join(sorted(_BASE_DEFAULTS[base]))}"
        )
    out: dict[str, Any] = {}
    out["rho"] = number("rho", hp["rho"], minimum=0)
    out["adaptive"] = flag("adaptive", hp["adaptive"])
    out["eta"] = number("eta", hp["eta"], minimum=0)
    out["lr"] = number("lr", hp["lr"], minimum=0)
    out["weight_decay"] = number("weight_decay", hp["weight_decay"], minimum=0)
    out["maximize"] = flag("maximize", hp["maximize"])
    if base == "sgd":
        out["momentum"] = number("momentum", hp["momentum"], minimum=0)
        out["dampening"] = number("dampening", hp["dampening"])
        out["nesterov"] = _flag("nesterov", hp["nesterov"])
        if out["nesterov"] and (out["momentum"] <= 0 or out["dampening"] != 0):
            raise ValueError("nesterov momentum requires momentum > 0 and dampening = 0")
    else:
        out["betas"] = pair("betas", hp["betas"], minimum=0, below=1)
        out["eps"] = number("eps", hp["eps"], minimum=0)
        out["amsgrad"] = flag("amsgrad", hp["amsgrad"])
    return out


def _check_params(params: Any) -> list[np.ndarray]:
    if isinstance(params, np.ndarray):
        raise TypeError("params must be a list of numpy arrays, not one array: write SAM([w], ...)")
    try:
        params = list(params)
    except TypeError:
        raise TypeError(
            f"params must be a list of numpy arrays, got {type(params).__name__}"
        ) from None
    if not params:
        raise ValueError("SAM got an empty parameter list")
    spans = []
    for i, p in enumerate(params):
        if not isinstance(p, np.ndarray):
            raise TypeError(f"params[{i}] is a {type(p).__name__}, not a numpy array")
        if p.dtype not in _DTYPES:
            raise TypeError(
                f"params[{i}] has dtype {p.dtype}; SAM updates float32 or float64 arrays "
                "(native byte order)"
            )
        if not p.flags.c_contiguous:
            raise ValueError(
                f"params[{i}] is not C-contiguous; SAM updates arrays in place, so pass "
                "contiguous arrays (numpy.ascontiguousarray makes a copy you then train)"
            )
        if not p.flags.writeable:
            raise ValueError(f"params[{i}] is read-only; SAM updates its arrays in place")
        if not p.flags.aligned:
            raise ValueError(f"params[{i}] is not aligned to its dtype")
        if p.nbytes:
            start = p.__array_interface__["data"][0]
            spans.append((start, start + p.nbytes, i))
    spans.sort()
    for (_, end, i), (start, _, j) in zip(spans, spans[1:]):
        if start < end:
            raise ValueError(
                f"params[{min(i, j)}] and params[{max(i, j)}] share memory; "
                "each parameter must be its own array"
            )
    return params


def check_params_usable(params: list[np.ndarray]) -> None:
    """Before a call changes anything: every parameter is still a writable, C-contiguous, aligned
    array of its dtype. numpy lets a caller clear ``writeable`` on an array the optimizer already
    holds; found only by the kernels, that would stop a call part-way, some arrays moved and
    others not. A flag check per array, so every call is all or nothing on this account."""
    for i, p in enumerate(params):
        flags = p.flags
        if not (flags.writeable and flags.c_contiguous and flags.aligned):
            raise ValueError(
                f"params[{i}] is not a writable, C-contiguous array any more (its flags changed after the "
                "optimizer was built); the optimizer updates it in place, so nothing was changed by this call"
            )


class _Group:
    """The arrays of one dtype, kept as aligned lists for one kernel call each."""

    __slots__ = ("dtype", "index", "params", "backups")

    def __init__(self, dtype: np.dtype, index: list[int], params: list[np.ndarray]):
        self.dtype = dtype
        self.index = index
        self.params = [params[i] for i in index]
        self.backups = [np.empty_like(p) for p in self.params]


class SAM:
    r"""Sharpness-Aware Minimization (or ASAM) over a list of numpy arrays, updated in place.

    One step, with ``g = ∇L(w)`` and the norms taken over all arrays together::

        SAM  (adaptive=False): e = rho · g / (‖g‖ + 1e-12)
        ASAM (adaptive=True):  T = |w| + eta;   e = rho · T²·g / (‖T·g‖ + 1e-12)
        w ← w + e                           (first_step; w is saved first)
        g̃ = ∇L(w + e)
        w ← saved w;  w ← base_step(w, g̃)    (second_step; one fused pass)

    The base step is ``torch.optim.SGD``, ``Adam`` or ``AdamW`` with torch's exact semantics and
    argument names. ``rho = 0`` gives the plain base optimizer. With ``maximize=True`` the
    objective is ``-L``, so the perturbation points along ``-g`` as well.

    References:
        P. Foret, A. Kleiner, H. Mobahi, B. Neyshabur. Sharpness-Aware Minimization for
        Efficiently Improving Generalization. ICLR 2021. arXiv:2010.01412.

        J. Kwon, J. Kim, H. Park, I. K. Choi. ASAM: Adaptive Sharpness-Aware Minimization for
        Scale-Invariant Learning of Deep Neural Networks. ICML 2021. arXiv:2102.11600.

    Args:
        params: the weights: a list of C-contiguous, writable float32/float64 arrays, which the
            optimizer updates in place (keep training these very arrays; do not rebind them).
            float32 and float64 may be mixed: the kernels run once per dtype, the norm is global.
        rho: radius of the neighbourhood (0.05 is SAM's default; ASAM uses larger, e.g. 0.5-2).
        adaptive: use ASAM's scale-invariant neighbourhood.
        eta: ASAM's ``η`` in ``T = |w| + η`` (ignored unless ``adaptive``).
        base: ``"sgd"``, ``"adam"`` or ``"adamw"``.
        **base_kwargs: the base optimizer's arguments, as in torch.optim:
            sgd: ``lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False,
            maximize=False``; adam / adamw: ``lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
            weight_decay=0`` (adamw: ``1e-2``, decoupled), ``amsgrad=False, maximize=False``.

    Hyper-parameters live in :attr:`hyperparams` and are read at every step, so a schedule can
    change them between steps (``opt.lr = ...`` or ``opt.hyperparams["rho"] = ...``).

    A gradient whose norm is not finite (an inf or NaN anywhere) makes :meth:`first_step` skip the
    perturbation: the weights are left untouched, ``state_dict()["nonfinite_steps"]`` counts it,
    and :meth:`second_step` then takes exactly the plain base step with its gradients.

    Example:
        >>> import numpy as np
        >>> from sharpness.numpy import SAM
        >>> rng = np.random.default_rng(0)
        >>> X, y = rng.normal(size=(64, 3)), rng.normal(size=64)
        >>> w = np.zeros(3)
        >>> def grad_fn(params):
        ...     (w,) = params
        ...     r = X @ w - y
        ...     return 0.5 * np.mean(r**2), [X.T @ r / len(y)]
        >>> opt = SAM([w], rho=0.05, base="sgd", lr=0.1, momentum=0.9)
        >>> for _ in range(100):
        ...     loss = opt.step(grad_fn)        # or: opt.first_step(g); ...; opt.second_step(g2)
        >>> bool(loss < 0.5 * np.mean(y**2))
        True
    """

    def __init__(
        self,
        params: Sequence[np.ndarray],
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.01,
        base: str = "sgd",
        **base_kwargs: Any,
    ) -> None:
        if not isinstance(base, str) or base.lower() not in _BASE_DEFAULTS:
            raise ValueError(f"base must be 'sgd', 'adam' or 'adamw', got {base!r}")
        self.base: str = base.lower()
        hp = {"rho": rho, "adaptive": adaptive, "eta": eta}
        hp.update(_BASE_DEFAULTS[self.base])
        unknown = sorted(set(base_kwargs) - set(_BASE_DEFAULTS[self.base]))
        if unknown:
            raise TypeError(
                f"unknown argument(s) for base={self.base!r}: {', '.join(unknown)}; "
                f"accepted: {', '.join(sorted(_BASE_DEFAULTS[self.base]))}"
            )
        hp.update(base_kwargs)
        #: Hyper-parameters (SAM's and the base optimizer's), read at every step.
        self.hyperparams: dict[str, Any] = _check_hyperparams(self.base, hp)
        self.params: list[np.ndarray] = _check_params(params)

        groups: dict[np.dtype, list[int]] = {}
        for i, p in enumerate(self.params):
            groups.setdefault(p.dtype, []).append(i)
        self._groups = [_Group(dt, idx, self.params) for dt, idx in groups.items()]
        # Base optimizer state, per parameter, as in torch.optim (allocated at the first step).
        self.state: list[dict[str, np.ndarray | None]] = [{} for _ in self.params]
        self._step = 0  # completed base steps
        self._nonfinite = 0  # first steps whose gradient norm was not finite
        self._perturbed = False

    # ------------------------------------------------------------------ public API

    @property
    def lr(self) -> float:
        """The base optimizer's learning rate (settable, e.g. by a schedule)."""
        return self.hyperparams["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        self.hyperparams["lr"] = number("lr", value, minimum=0)

    @property
    def perturbed(self) -> bool:
        """True between :meth:`first_step` and :meth:`second_step`."""
        return self._perturbed

    def first_step(self, grads: Sequence[np.ndarray]) -> float:
        """Move the weights to ``w + e`` (saving ``w``), from the gradients at ``w``.

        Args:
            grads: ``∇L(w)``, one array per parameter, same shapes and dtypes as ``params``.

        Returns:
            The norm the perturbation was scaled by: ``‖g‖`` (SAM) or ``‖T·g‖`` (ASAM);
            ``inf`` or ``nan`` when it was not finite and no perturbation was applied.
        """
        if self._perturbed:
            raise RuntimeError(
                "first_step called twice: the weights are already perturbed; "
                "call second_step(grads) to restore them and take the base step"
            )
        by_group = self._grads_by_group(grads)
        hp = self.hyperparams
        rho, adaptive, eta = hp["rho"], hp["adaptive"], hp["eta"]
        if adaptive:
            sumsq = sum(
                _core.sum_of_squares_adaptive(grp.params, g, eta)
                for grp, g in zip(self._groups, by_group)
            )
        else:
            sumsq = sum(_core.sum_of_squares(g) for g in by_group)
        norm = math.sqrt(sumsq) if sumsq >= 0 else math.nan
        if not math.isfinite(norm):
            for grp in self._groups:  # backups <- weights: second_step is the plain base step
                _core.restore(grp.backups, grp.params)
            self._nonfinite += 1
        else:
            scale = rho / (norm + NORM_EPS)
            if hp["maximize"]:
                scale = -scale
            for grp, g in zip(self._groups, by_group):
                if adaptive:
                    _core.perturb_adaptive(grp.params, g, grp.backups, scale, eta)
                else:
                    _core.perturb(grp.params, g, grp.backups, scale)
        self._perturbed = True
        return norm

    def second_step(self, grads: Sequence[np.ndarray]) -> None:
        """Restore the saved weights and take one base-optimizer step with ``grads``.

        Args:
            grads: ``∇L(w + e)``, the gradients at the perturbed weights. They go to the base
                step as they are: a non-finite value here reaches the weights, as in torch.
        """
        if not self._perturbed:
            raise RuntimeError(
                "second_step called without first_step: call first_step(grads) at w first "
                "(or use step(grad_fn))"
            )
        self._base_step(self._grads_by_group(grads), from_backup=True)
        self._perturbed = False

    def _base_step(self, by_group: list[list[np.ndarray]], from_backup: bool) -> None:
        """One base-optimizer step with ``by_group`` (checked gradients, split by dtype): from
        the saved weights (``from_backup``, fused with the restoration) or in place."""
        hp = self.hyperparams
        self._ensure_state()
        step = self._step + 1
        if self.base == "sgd":
            momentum = hp["momentum"]
            init = momentum != 0 and self.state[0].get("momentum_buffer") is None
            for grp, g in zip(self._groups, by_group):
                bufs = None
                if momentum != 0:
                    bufs = self._buffers(grp, "momentum_buffer", allocate=init)
                _core.restore_sgd(
                    grp.params,
                    grp.backups if from_backup else None,
                    g,
                    bufs,
                    lr=hp["lr"],
                    momentum=momentum,
                    dampening=hp["dampening"],
                    weight_decay=hp["weight_decay"],
                    nesterov=hp["nesterov"],
                    maximize=hp["maximize"],
                    init_momentum=init,
                )
        else:
            beta1, beta2 = hp["betas"]
            amsgrad = hp["amsgrad"]
            for grp, g in zip(self._groups, by_group):
                _core.restore_adam(
                    grp.params,
                    grp.backups if from_backup else None,
                    g,
                    self._buffers(grp, "exp_avg"),
                    self._buffers(grp, "exp_avg_sq"),
                    self._buffers(grp, "max_exp_avg_sq") if amsgrad else None,
                    step=float(step),
                    lr=hp["lr"],
                    beta1=beta1,
                    beta2=beta2,
                    eps=hp["eps"],
                    weight_decay=hp["weight_decay"],
                    decoupled=self.base == "adamw",
                    amsgrad=amsgrad,
                    maximize=hp["maximize"],
                )
        self._step = step

    def step(self, grad_fn: Callable[[list[np.ndarray]], tuple[Any, Sequence[np.ndarray]]]) -> Any:
        """One whole SAM step.

        Args:
            grad_fn: ``grad_fn(params) -> (loss, grads)``, evaluated at the current weights. It is
                called twice: at ``w``, then at ``w + e``.

        Returns:
            The loss of the first call (at ``w``, before the update).

        If ``grad_fn`` raises during the second call, the weights are restored to ``w`` before
        the exception propagates.
        """
        loss, grads = self._call(grad_fn)
        self.first_step(grads)
        try:
            _, grads = self._call(grad_fn)
            self.second_step(grads)
        except BaseException:
            if self._perturbed:
                self._undo()
            raise
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state and hyper-parameters as plain numpy arrays and Python scalars.

        The arrays are copies: later steps do not change a saved dict. Loading it into a fresh
        ``SAM`` over the same weights continues the run bit for bit.
        """
        if self._perturbed:
            raise RuntimeError(
                "state_dict called between first_step and second_step: the weights are "
                "perturbed; save after second_step"
            )
        return {
            "base": self.base,
            "hyperparams": dict(self.hyperparams),
            "step": self._step,
            "nonfinite_steps": self._nonfinite,
            "state": [
                {k: (None if v is None else v.copy()) for k, v in s.items()} for s in self.state
            ],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a dict made by :meth:`state_dict` (its arrays are copied, not shared)."""
        if self._perturbed:
            raise RuntimeError(
                "load_state_dict called between first_step and second_step; "
                "call second_step first"
            )
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        missing = {"base", "hyperparams", "step", "nonfinite_steps", "state"} - set(state_dict)
        if missing:
            raise ValueError(f"state_dict lacks {', '.join(sorted(missing))}")
        if state_dict["base"] != self.base:
            raise ValueError(
                f"state_dict is for base={state_dict['base']!r}, this optimizer has "
                f"base={self.base!r}"
            )
        hyperparams = _check_hyperparams(self.base, dict(state_dict["hyperparams"]))
        saved = state_dict["state"]
        if len(saved) != len(self.params):
            raise ValueError(
                f"state_dict holds state for {len(saved)} parameters, this optimizer has "
                f"{len(self.params)}"
            )
        keys = {"sgd": {"momentum_buffer"}}.get(
            self.base, {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
        )
        state: list[dict[str, np.ndarray | None]] = []
        for i, (s, p) in enumerate(zip(saved, self.params)):
            extra = set(s) - keys
            if extra:
                raise ValueError(f"state_dict state[{i}] has unknown keys {sorted(extra)}")
            entry: dict[str, np.ndarray | None] = {}
            for k, v in s.items():
                if v is None:
                    entry[k] = None
                    continue
                if not isinstance(v, np.ndarray) or v.shape != p.shape or v.dtype != p.dtype:
                    raise ValueError(
                        f"state_dict state[{i}][{k!r}] must be a {p.dtype} array of shape "
                        f"{p.shape}, got {getattr(v, 'dtype', type(v).__name__)} "
                        f"{getattr(v, 'shape', '')}"
                    )
                entry[k] = np.array(v, dtype=p.dtype, order="C", copy=True)
            state.append(entry)
        if len({tuple(sorted(k for k, v in s.items() if v is not None)) for s in state}) > 1:
            raise ValueError("state_dict state entries disagree on which buffers exist")
        self.hyperparams = hyperparams
        self.state = state
        self._step = int(state_dict["step"])
        self._nonfinite = int(state_dict["nonfinite_steps"])

    def __repr__(self) -> str:
        hp = ", ".join(f"{k}={v!r}" for k, v in self.hyperparams.items())
        return f"SAM(<{len(self.params)} arrays>, base={self.base!r}, {hp})"

    # ------------------------------------------------------------------ internals

    def _call(self, grad_fn: Callable[..., Any]) -> tuple[Any, Any]:
        out = grad_fn(self.params)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError(
                "grad_fn(params) must return a pair (loss, grads) as a tuple, "
                f"got {type(out).__name__}"
                + (f" of length {len(out)}" if isinstance(out, (tuple, list)) else "")
            )
        return out[0], out[1]

    def _grads_by_group(self, grads: Sequence[np.ndarray]) -> list[list[np.ndarray]]:
        """Check ``grads`` against ``params`` (and that ``params`` are still usable) and split them
        by dtype group."""
        check_params_usable(self.params)
        if isinstance(grads, np.ndarray):
            raise TypeError(
                "grads must be a list of numpy arrays (one per parameter), not one array"
            )
        try:
            grads = list(grads)
        except TypeError:
            raise TypeError(
                f"grads must be a list of numpy arrays, got {type(grads).__name__}"
            ) from None
        if len(grads) != len(self.params):
            raise ValueError(
                f"got {len(grads)} gradient arrays for {len(self.params)} parameters"
            )
        for i, (g, p) in enumerate(zip(grads, self.params)):
            if not isinstance(g, np.ndarray):
                if not isinstance(g, np.generic):  # numpy scalars stand for 0-d arrays
                    raise TypeError(f"grads[{i}] is a {type(g).__name__}, not a numpy array")
                g = grads[i] = np.asarray(g)
            if g.dtype != p.dtype:
                raise TypeError(f"grads[{i}] has dtype {g.dtype} but params[{i}] is {p.dtype}")
            if g.shape != p.shape:
                raise ValueError(
                    f"grads[{i}] has shape {g.shape} but params[{i}] has shape {p.shape}"
                )
            if not (g.flags.c_contiguous and g.flags.aligned):
                grads[i] = np.ascontiguousarray(g)
        return [[grads[i] for i in grp.index] for grp in self._groups]

    def _ensure_state(self) -> None:
        """Allocate the base optimizer's buffers that the current hyper-parameters need."""
        hp = self.hyperparams
        if self.base == "sgd":
            if hp["momentum"] != 0:
                for s in self.state:
                    s.setdefault("momentum_buffer", None)
            return
        names = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if hp["amsgrad"] else [])
        for s, p in zip(self.state, self.params):
            for name in names:
                if s.get(name) is None:
                    s[name] = np.zeros_like(p)

    def _buffers(self, grp: _Group, name: str, allocate: bool = False) -> list[np.ndarray]:
        out = []
        for i in grp.index:
            buf = self.state[i].get(name)
            if buf is None:
                if not allocate:
                    raise RuntimeError(f"missing optimizer state {name!r} for params[{i}]")
                buf = np.empty_like(self.params[i])
                self.state[i][name] = buf
            out.append(buf)
        return out

    def _undo(self) -> None:
        """Put the saved weights back (after a failed second pass)."""
        for grp in self._groups:
            _core.restore(grp.params, grp.backups)
        self._perturbed = False
