"""The numpy front: any method of :mod:`sharpness.methods` over lists of numpy arrays, updated in
place, with torch.optim's SGD, Adam or AdamW as the base step, and no torch.

It is :class:`sharpness.optim.SAM`'s contract without torch: parameter groups as dicts (the same
keys), ``first_step(grads)``/``second_step(grads)`` returning what torch's do, ``step(grad_fn)``
in place of a closure, ``restore()``, and ``state_dict()`` with torch's keys (``"state"``,
``"param_groups"``, ``"sam"``). Every call is all or nothing: its arguments and the optimizer's
settings are checked before anything moves, and an exception part-way leaves the weights at ``w``.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from sharpness._validation import flag, number, pair
from sharpness.backends.numpy_engine import NumpyEngine
from sharpness.methods.base import Method, Phase, restored_on_failure

__all__ = ["SAM", "BaseOptimizer", "check_params_usable"]

_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

_SGD = {"lr": 1e-3, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False, "maximize": False}
_ADAM = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False, "maximize": False}
# name -> (kernel, torch.optim's defaults for it)
_BASES: dict[str, tuple[str, dict[str, Any]]] = {
    "sgd": ("sgd", _SGD),
    "adam": ("adam", {**_ADAM, "decoupled_weight_decay": False}),
    "adamw": ("adam", {**_ADAM, "weight_decay": 1e-2, "decoupled_weight_decay": True}),
}
#: SAM's own group keys, as on the torch front (prefixed: Adadelta has a ``rho`` of its own).
SAM_KEYS = ("sam_rho", "sam_adaptive", "sam_eta", "sam_norm_weight")


class BaseOptimizer:
    """torch.optim's ``SGD``, ``Adam`` or ``AdamW`` step, taken by the engines' fused kernels with
    torch's semantics and argument names. ``state`` is per parameter index, as torch's
    ``state_dict()["state"]`` numbers them; ``param_groups`` are the front's. ``BaseOptimizer(None)``
    serves a method with an update of its own (``Method.has_own_update``): groups and state only."""

    def __init__(self, name: Any) -> None:
        if name is None:  # no base step: the method's own update (kind and name None, no settings)
            self.name: str | None = None
            self.kind: str | None = None
            self.defaults: dict[str, Any] = {}
        elif not isinstance(name, str) or name.lower() not in _BASES:
            raise ValueError(f"base must be 'sgd', 'adam' or 'adamw', got {name!r}")
        else:
            self.name = name.lower()
            self.kind, self.defaults = _BASES[self.name]
        self.state: dict[int, dict[str, Any]] = {}
        self.param_groups: list[dict[str, Any]] = []

    def check_group(self, group: dict[str, Any], method_keys: tuple[str, ...] = ()) -> None:
        """Validates and normalises a group's settings in place (SAM's keys and the base's;
        ``method_keys`` are the method's own, which it checks itself)."""
        allowed = {"params", *SAM_KEYS, *self.defaults, *method_keys}
        unknown = sorted(set(group) - allowed)
        if unknown:
            raise TypeError(
                f"unknown setting(s) {', '.join(map(repr, unknown))} in a parameter group for base={self.name!r}; "
                f"accepted: {', '.join(sorted(allowed - {'params'}))}"
            )
        group["sam_rho"] = number("sam_rho", group["sam_rho"], minimum=0)
        group["sam_adaptive"] = flag("sam_adaptive", group["sam_adaptive"])
        group["sam_eta"] = number("sam_eta", group["sam_eta"], minimum=0)
        group["sam_norm_weight"] = number("sam_norm_weight", group["sam_norm_weight"], above=0)
        if self.kind is None:
            return  # the method's own settings: its _setup_group checks them
        group["lr"] = number("lr", group["lr"], minimum=0)
        group["weight_decay"] = number("weight_decay", group["weight_decay"], minimum=0)
        group["maximize"] = flag("maximize", group["maximize"])
        if self.kind == "sgd":
            group["momentum"] = number("momentum", group["momentum"], minimum=0)
            group["dampening"] = number("dampening", group["dampening"])
            group["nesterov"] = flag("nesterov", group["nesterov"])
            if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
                raise ValueError("nesterov momentum requires momentum > 0 and dampening = 0")
        else:
            group["betas"] = pair("betas", group["betas"], minimum=0, below=1)
            group["eps"] = number("eps", group["eps"], minimum=0)
            group["amsgrad"] = flag("amsgrad", group["amsgrad"])
            group["decoupled_weight_decay"] = flag("decoupled_weight_decay", group["decoupled_weight_decay"])

    def __repr__(self) -> str:
        return f"{self.name}({', '.join(f'{k}={v!r}' for k, v in self.defaults.items())})"


def _check_array(i: int, p: Any) -> None:
    if not isinstance(p, np.ndarray):
        raise TypeError(f"params[{i}] is a {type(p).__name__}, not a numpy array")
    if p.dtype not in _DTYPES:
        raise TypeError(f"params[{i}] has dtype {p.dtype}; SAM updates float32 or float64 arrays (native byte order)")
    if not p.flags.c_contiguous:
        raise ValueError(
            f"params[{i}] is not C-contiguous; SAM updates arrays in place, so pass contiguous arrays "
            "(numpy.ascontiguousarray makes a copy you then train)"
        )
    if not p.flags.writeable:
        raise ValueError(f"params[{i}] is read-only; SAM updates its arrays in place")
    if not p.flags.aligned:
        raise ValueError(f"params[{i}] is not aligned to its dtype")


def _check_disjoint(params: list[np.ndarray]) -> None:
    starts = [p.__array_interface__["data"][0] for p in params]
    spans = sorted((start, start + p.nbytes, i) for i, (start, p) in enumerate(zip(starts, params)) if p.nbytes)
    for (_, end, i), (start, _, j) in zip(spans, spans[1:]):
        if start < end:
            raise ValueError(f"params[{min(i, j)}] and params[{max(i, j)}] share memory; each parameter must be its own array")


def check_params_usable(params: list[np.ndarray]) -> None:
    """Before a call changes anything: every parameter is still a writable, C-contiguous, aligned
    array. numpy lets a caller clear ``writeable`` on an array the optimizer already holds; found
    only by the kernels, that would stop a call part-way."""
    for i, p in enumerate(params):
        flags = p.flags
        if not (flags.writeable and flags.c_contiguous and flags.aligned):
            raise ValueError(
                f"params[{i}] is not a writable, C-contiguous array any more (its flags changed after the "
                "optimizer was built); the optimizer updates it in place, so nothing was changed by this call"
            )


class SAM(Method):
    r"""Sharpness-Aware Minimization (or ASAM) over numpy arrays, updated in place; the base of
    every method's numpy front.

    Algorithm (Foret et al., ICLR 2021, arXiv:2010.01412; ASAM: Kwon et al., ICML 2021,
    arXiv:2102.11600), the norm global over every array::

        g  = ∇L(w)                                 # first_step(grads)
        e  = ρ g / (‖g‖ + 1e-12)                   # SAM
        e  = ρ T² g / (‖T g‖ + 1e-12), T = |w|+η   # ASAM (adaptive=True)
        g̃  = ∇L(w + e)                             # second_step(grads)
        w  ← base_step(w, g̃)                       # from the exact original w, one fused pass

    Args:
        params: a list of C-contiguous, writable float32/float64 arrays (updated in place: keep
            training these very arrays), or a list of parameter groups (dicts with ``"params"``
            and any per-group setting, keyed as on the torch front: ``sam_rho``, ``lr`` ...).
        rho, adaptive, eta: SAM's radius, ASAM's switch and ASAM's ``η`` (group keys ``sam_rho``,
            ``sam_adaptive``, ``sam_eta``).
        base: ``"sgd"`` (the default), ``"adam"`` or ``"adamw"`` (torch.optim's semantics and argument
            names). A method with an update rule of its own (AdaSAM, BayesianSAM) takes none.
        seed: seed of :attr:`generator`, the optimizer's own random numbers (saved in checkpoints):
            an int, None, or a ``numpy.random.Generator`` (used as it is).
        **base_kwargs: the base optimizer's arguments: sgd ``lr=1e-3, momentum=0, dampening=0,
            weight_decay=0, nesterov=False, maximize=False``; adam/adamw ``lr=1e-3, betas=(0.9,
            0.999), eps=1e-8, weight_decay=0`` (adamw ``1e-2``, decoupled), ``amsgrad=False,
            maximize=False``.

    Settings live in :attr:`param_groups` and are read (and checked) at every call, so a schedule
    changes them between steps: ``opt.param_groups[0]["lr"] = 0.01``. Setting an attribute the
    optimizer does not have (``opt.rho = ...``) is refused. :meth:`first_step` returns whether a
    second pass and :meth:`second_step` must follow; ``last_grad_norm`` is the norm it used. A
    non-finite norm applies no perturbation (``stats["nonfinite_skips"]``), and
    :meth:`second_step` is then the plain base step.

    Example:
        >>> import numpy as np
        >>> from sharpness.numpy import SAM
        >>> rng = np.random.default_rng(0)
        >>> X, y = rng.normal(size=(64, 3)), rng.normal(size=64)
        >>> w = np.zeros(3)
        >>> def grad_fn(params):
        ...     r = X @ params[0] - y
        ...     return 0.5 * np.mean(r**2), [X.T @ r / len(y)]
        >>> opt = SAM([w], rho=0.05, base="sgd", lr=0.1, momentum=0.9)
        >>> for _ in range(100):
        ...     loss = opt.step(grad_fn)        # or: if opt.first_step(g): opt.second_step(g2)
        >>> bool(loss < 0.5 * np.mean(y**2))
        True
    """

    def __init__(
        self,
        params: Iterable[np.ndarray] | Iterable[dict[str, Any]],
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.01,
        base: str | None = None,
        seed: int | np.random.Generator | None = None,
        **base_kwargs: Any,
    ) -> None:
        if not (seed is None or isinstance(seed, np.random.Generator)) and (
            isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer))
        ):
            raise TypeError(f"seed must be an int, None or a numpy Generator (used as it is), got {type(seed).__name__}")
        if isinstance(seed, (int, np.integer)) and seed < 0:  # numpy's own message does not name it
            raise ValueError(f"seed must be an integer >= 0, got {seed}")
        rho = number("rho", rho, minimum=0)  # named as given (the groups' check names sam_rho)
        eta = number("eta", eta, minimum=0)
        if self.has_own_update:  # the method's own update (Method.has_own_update): no base step
            if base is not None:
                raise TypeError(f"{type(self).__name__} has an update rule of its own: it takes no base (got base={base!r})")
            if base_kwargs:
                raise TypeError(f"unknown argument(s) for {type(self).__name__}: {', '.join(sorted(base_kwargs))}")
        base_optimizer = BaseOptimizer(None if self.has_own_update else "sgd" if base is None else base)
        unknown = sorted(set(base_kwargs) - set(base_optimizer.defaults))
        if unknown:
            raise TypeError(
                f"unknown argument(s) for base={base_optimizer.name!r}: {', '.join(unknown)}; "
                f"accepted: {', '.join(sorted(base_optimizer.defaults))}"
            )
        defaults = {
            **base_optimizer.defaults,
            **base_kwargs,
            "sam_rho": rho,
            "sam_adaptive": adaptive,
            "sam_eta": eta,
            "sam_norm_weight": 1.0,
        }
        groups = self._groups_of(params)
        for group in groups:
            for key, value in defaults.items():
                group.setdefault(key, value)
            base_optimizer.check_group(group, self.group_keys)
            self._setup_group(group)
        every = [p for group in groups for p in group["params"]]
        for i, p in enumerate(every):
            _check_array(i, p)
        _check_disjoint(every)
        base_optimizer.param_groups = groups
        self.defaults = defaults
        self.base_optimizer = base_optimizer
        self.param_groups = groups
        self.state = base_optimizer.state
        #: The parameters, in group order (the numbering of ``state`` and of checkpoints).
        self.params: list[np.ndarray] = every
        self.sam_state = {"step": 0}
        self.vectors: dict[int, dict[str, np.ndarray]] = {}  # the method's own, per parameter index
        self.stats = Counter()
        self.generator = np.random.default_rng(seed)
        self.last_grad_norm = math.nan
        self._pending = None
        self._engines = self._build_engines()
        self.__dict__["_frozen"] = True

    @staticmethod
    def _groups_of(params: Any) -> list[dict[str, Any]]:
        if isinstance(params, np.ndarray):
            raise TypeError("params must be a list of numpy arrays, not one array: write SAM([w], ...)")
        try:
            items = list(params)
        except TypeError:
            raise TypeError(f"params must be a list of numpy arrays, got {type(params).__name__}") from None
        if not items:
            raise ValueError("SAM got an empty parameter list")
        if all(isinstance(item, dict) for item in items):
            groups = [dict(item) for item in items]
            for group in groups:
                if "params" not in group:
                    raise ValueError("a parameter group needs a 'params' key")
                arrays = group["params"]
                group["params"] = [arrays] if isinstance(arrays, np.ndarray) else list(arrays)
                if not group["params"]:
                    raise ValueError("a parameter group has no parameters")
            return groups
        if any(isinstance(item, dict) for item in items):
            raise TypeError("params mixes arrays and parameter groups")
        return [{"params": items}]

    def _build_engines(self) -> list[NumpyEngine]:
        by_dtype: dict[np.dtype, tuple[list[np.ndarray], list[int], list[int]]] = {}
        index = 0
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                params, keys, group_of = by_dtype.setdefault(p.dtype, ([], [], []))
                params.append(p)
                keys.append(index)
                group_of.append(gi)
                index += 1
        return [NumpyEngine(*lists, self.stats) for lists in by_dtype.values()]

    def engines(self) -> list[NumpyEngine]:
        """The engines serving the parameters (one per dtype)."""
        return self._engines

    def __setattr__(self, name: str, value: Any) -> None:
        if self.__dict__.get("_frozen") and not name.startswith("_") and not hasattr(self, name):
            raise AttributeError(
                f"{type(self).__name__} has no setting {name!r}: per-group settings live in "
                f"opt.param_groups[i] (keys: {', '.join(sorted(k for k in self.param_groups[0] if k != 'params'))})"
            )
        object.__setattr__(self, name, value)

    # -- the call's gradients ----------------------------------------------------------------------

    def _begin(self) -> list[NumpyEngine]:
        """The engines, after checking the parameters and every group's settings (as the torch
        front's ``_begin``: what a method's work before the first gradient, e.g. RandomSAM's
        ``add_noise()``, starts with). Nothing has changed when this raises."""
        check_params_usable(self.params)
        for group in self.param_groups:
            self.base_optimizer.check_group(group, self.group_keys)
            self._setup_group(group)
        self._check_norm_weights()
        return self._engines

    def _take(self, grads: Sequence[np.ndarray]) -> list[NumpyEngine]:
        """Checks ``grads``, the parameters and every group's settings, then hands the gradients
        to the engines. Nothing has changed when this raises."""
        self._begin()
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
                if not isinstance(g, np.generic):  # numpy scalars stand for 0-d arrays
                    raise TypeError(f"grads[{i}] is a {type(g).__name__}, not a numpy array")
                g = grads[i] = np.asarray(g)
            if g.dtype != p.dtype:
                raise TypeError(f"grads[{i}] has dtype {g.dtype} but params[{i}] is {p.dtype}")
            if g.shape != p.shape:
                raise ValueError(f"grads[{i}] has shape {g.shape} but params[{i}] has shape {p.shape}")
            if not (g.flags.c_contiguous and g.flags.aligned):
                grads[i] = np.ascontiguousarray(g)
        for engine in self._engines:
            engine.take([grads[k] for k in engine.keys])
        return self._engines

    # -- the two halves of a step ------------------------------------------------------------------

    @property
    def perturbed(self) -> bool:
        """True between a :meth:`first_step` that asked for a second pass and :meth:`second_step`."""
        return self._pending is not None

    def begin_step(self) -> None:
        """Starts a step of a method that takes its first gradient elsewhere than at ``w``
        (:attr:`begins_before_first_gradient`; SAMPa: at ``y``): saves ``w`` and moves the
        weights there. Then :meth:`first_step` with the gradients there, and so on
        (``step(grad_fn)`` calls it first itself; :meth:`restore` puts ``w`` back)."""
        if not self.begins_before_first_gradient:
            raise RuntimeError(f"{type(self).__name__} takes its first gradient at w: its step has no begin_step()")
        if self._pending is not None:
            raise RuntimeError("begin_step() while a step is pending; finish it with second_step(grads) (or restore()) first")
        engines = self._begin()
        self._start_step()
        with restored_on_failure(engines):
            self._begin_step(engines)
        self._pending = Phase.AT_Y

    def first_step(self, grads: Sequence[np.ndarray]) -> bool:
        """Moves the weights to ``w + e`` from ``grads`` = ``∇L(w)`` (one array per parameter).

        Returns whether a second pass and :meth:`second_step` must follow (always for SAM; methods
        that skip the second pass on some steps take their whole step here and return False).
        ``last_grad_norm`` is the norm the perturbation was scaled by (NaN when not computed)."""
        if self.steps_by_evaluations:
            raise RuntimeError(self._whole_step_only())
        begun = self._pending == Phase.AT_Y  # begin_step() started the step
        if self._pending is not None and not begun:
            raise RuntimeError(
                "first_step() was called twice without second_step() in between; "
                "call second_step(grads) (or restore()) first"
            )
        if self.begins_before_first_gradient and not begun:
            raise RuntimeError(f"{type(self).__name__}.first_step() needs begin_step() before it (or use step(grad_fn))")
        engines = self._take(grads)
        if not begun:
            self._start_step()
        self._first_gradient_taken(engines)
        by_count = self._second_pass_due_by_count()
        if by_count is False:
            self.last_grad_norm = math.nan  # not computed: nothing needs it
            self._one_pass_step(engines, math.nan)
            return False
        norm = self._gradient_norm(engines)
        self.last_grad_norm = norm
        if math.isfinite(norm) and not self._second_pass_due(norm):
            self._one_pass_step(engines, norm)
            return False
        self._pending = self._perturb_or_skip(engines, norm)
        return True

    def _one_pass_step(self, engines: list[NumpyEngine], grad_norm: float) -> None:
        self._one_pass_gradient(engines, grad_norm)
        try:
            self._plain_step(engines)  # from w restored, where begin_step() moved it (Momentum-SAM)
        except BaseException:
            self.restore()
            raise
        self._pending = None
        self._finish_step()

    def _plain_step(self, engines: list[NumpyEngine]) -> None:
        """The base step with ``"grads"`` from ``w`` (restored first where a step begun elsewhere
        moved the weights)."""
        self._restore_and_step(engines)

    def _restore_and_step(self, engines: list[NumpyEngine]) -> None:
        """``w`` restored where it moved, then the base step with ``"grads"``: the base optimizer's
        fused kernel, or the method's own update (``has_own_update``)."""
        if self.has_own_update:
            for engine in engines:
                engine.restore()
            self._own_update(engines)
            return
        for engine in engines:
            engine.restore_and_step(self.base_optimizer, self.param_groups)

    def second_step(self, grads: Sequence[np.ndarray]) -> None:
        """Restores ``w`` and takes the base step with ``grads`` = ``∇L(w + e)``. An error in
        ``grads`` changes nothing (the step is still pending); an error after that restores ``w``."""
        if self.steps_by_evaluations:
            raise RuntimeError(self._whole_step_only())
        if self._pending is None:
            raise RuntimeError("second_step() needs a first_step() before it (or use step(grad_fn))")
        if self._pending == Phase.AT_Y:
            raise RuntimeError("second_step() after begin_step() needs first_step(grads) (the gradients there) before it")
        engines = self._take(grads)
        pending = self._pending
        try:
            if pending == Phase.PERTURBED:
                self._before_base_step(engines)
                self._restore_and_step(engines)
            else:
                for engine in engines:
                    engine.restore()
                self._plain_step(engines)
        except BaseException:
            self.restore()
            raise
        self._pending = None
        if pending == Phase.PERTURBED:
            self._after_base_step(engines)
        self._finish_step()

    def _finish_step(self) -> None:
        self.stats["steps"] += 1
        self.sam_state["step"] += 1

    def step(self, grad_fn: Callable[[list[np.ndarray]], tuple[Any, Sequence[np.ndarray]]], *more: Any) -> Any:
        """One whole step: ``grad_fn(params) -> (loss, grads)`` at ``w``, and again at ``w + e``
        when a second pass is due. Returns the first call's loss. If the second call raises, the
        weights are restored to ``w`` before the exception goes on. ``more``: the further
        gradient functions a method's step takes (``step_functions``: LETS's validation one),
        used after the step (``_after_whole_step``), or for the first gradient (SAMPa's at ``y``:
        ``_first_gradient_function``)."""
        more = self._checked_step_functions(more)
        if self.steps_by_evaluations:  # the method takes its own gradients through grad_fn
            return self._step_by_grad_fn(grad_fn)
        if self.selects_samples:  # grad_fn takes sample indices and returns per-sample losses
            return self._per_sample_step(grad_fn)
        moved = self._before_first_pass()
        try:
            loss, grads = self._call(self._first_gradient_function(grad_fn, more))
            due = self.first_step(grads)
        except BaseException:
            if moved:
                self.restore()  # never leave the weights moved behind an exception
            raise
        if due:
            try:
                _, grads = self._call(grad_fn)
            except BaseException:
                self.restore()
                raise
            self.second_step(grads)
        if more:
            self._after_whole_step(grad_fn, more)
        return loss

    def _per_sample_step(self, grad_fn: Callable[..., tuple[Any, Sequence[np.ndarray]]]) -> Any:
        """The whole step of a method that :attr:`selects_samples` (ESAM): ``grad_fn(params,
        indices)`` returns the per-sample losses of the samples ``indices`` (None: the whole batch;
        else an int64 array), a 1-d array, and the gradients of their mean. Called at ``w``, at
        ``w + e`` where the method ranks the samples (its gradients unused), and at ``w + e`` on the
        samples it picks. Returns the mean loss at ``w``. The method's first-pass context is not
        entered: ``grad_fn`` computes every gradient anyway, and a draw it makes waits for
        ``first_step``, after the call's checks (the call stays all or nothing)."""
        before, grads = self._per_sample_call(grad_fn, None)
        if not self.first_step(grads):
            return before.mean()  # a one-pass step: already taken
        try:
            indices = self._second_pass_samples(before, lambda: self._per_sample_call(grad_fn, None)[0])
            _, grads = self._per_sample_call(grad_fn, indices)
        except BaseException:
            self.restore()
            raise
        self.second_step(grads)
        return before.mean()

    def _per_sample_call(self, grad_fn: Callable[..., Any], indices: Any) -> tuple[np.ndarray, Any]:
        losses, grads = self._call(lambda params: grad_fn(params, indices))
        losses = np.asarray(losses)
        if losses.ndim != 1:
            raise ValueError(
                f"{type(self).__name__}'s grad_fn(params, indices) must return the per-sample losses, a 1-d array, "
                f"and the gradients of their mean; got losses of shape {losses.shape}"
            )
        return losses, grads

    def _whole_step_only(self) -> str:
        return f"{type(self).__name__} takes {self.evaluations_per_step}: call step(grad_fn)"

    def _step_by_grad_fn(self, grad_fn: Callable[..., Any]) -> Any:
        """``step(grad_fn)`` of a method that takes its own gradients
        (:meth:`Method._step_by_evaluations`): ``evaluate(*args)`` calls ``grad_fn(params, *args)``
        and hands its gradients to the engines (the method reads them before its next call, so
        ``grad_fn`` may reuse its output arrays); then the base step, from the saved ``w`` where
        the weights moved. An exception anywhere restores ``w``."""

        def evaluate(*args: Any) -> tuple[Any, list[NumpyEngine]]:
            loss, grads = self._call(lambda params: grad_fn(params, *args))
            return loss, self._take(grads)

        self._start_step()
        try:
            loss = self._step_by_evaluations(evaluate)
            pending = self._pending
            if pending == Phase.PERTURBED:
                self._before_base_step(self._engines)
            self._restore_and_step(self._engines)  # restores w first where it moved
        except BaseException:
            self.restore()
            raise
        self._pending = None
        if pending == Phase.PERTURBED:
            self._after_base_step(self._engines)
        self._finish_step()
        return loss

    def _gradients_at(self, grad_fn: Callable[..., Any]) -> tuple[Any, float, list[Any]]:
        """``grad_fn(params) -> (loss, grads)`` at the current weights, its gradients handed to the
        engines (see :meth:`Method._gradients_at`)."""
        loss, grads = self._call(grad_fn)
        return loss, float(loss), self._take(grads)

    def _engines_with_gradients(self, grads: Any = None) -> list:
        """``grads`` handed to the engines, checked (see :meth:`Method._engines_with_gradients`)."""
        if grads is None:
            raise ValueError("this call needs grads: the gradient at the current weights, one array per parameter")
        return self._take(grads)

    def _host_array(self, value: Any, like: np.ndarray) -> np.ndarray:
        """``value`` as a numpy array of ``like``'s shape (see :meth:`Method._host_array`)."""
        array = np.asarray(value)
        if array.shape != like.shape:
            raise ValueError(f"shape {array.shape}, but the parameter has shape {like.shape}")
        return array

    def _front_array(self, host: np.ndarray) -> np.ndarray:
        return host

    def _call(self, grad_fn: Callable[..., Any]) -> tuple[Any, Any]:
        out = grad_fn(self.params)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError(
                "grad_fn(params) must return a pair (loss, grads) as a tuple, got "
                + type(out).__name__
                + (f" of length {len(out)}" if isinstance(out, (tuple, list)) else "")
            )
        return out[0], out[1]

    def restore(self) -> bool:
        """Undoes a pending :meth:`first_step`: the weights go back to ``w`` bit for bit and no
        base step is taken. Returns whether there was something to undo."""
        pending, self._pending = self._pending, None
        for engine in self._engines:
            engine.restore()
        return pending is not None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drops the gradients the engines hold (they come with each call on this front)."""
        for engine in self._engines:
            engine.zero_grad(set_to_none)

    # -- checkpoints -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """torch's layout: ``"state"`` (per parameter index; arrays copied), ``"param_groups"``
        (settings, ``"params"`` as indices) and ``"sam"`` (``base``, ``stats``, the generator's
        state, the method's scalars, and the vectors the method checkpoints). Refused between the two halves of a step."""
        if self._pending is not None:
            raise RuntimeError(
                "state_dict() between first_step() and second_step(): the weights are perturbed "
                "and the checkpoint would not resume exactly; take it after second_step()"
            )
        groups, start = [], 0
        for group in self.param_groups:
            n = len(group["params"])
            settings = {k: copy.deepcopy(v) for k, v in group.items() if k != "params"}
            groups.append({**settings, "params": list(range(start, start + n))})
            start += n
        sam = {
            "method": self.method_name(),
            "base": self.base_optimizer.name,
            "stats": dict(self.stats),
            "generator": copy.deepcopy(self.generator.bit_generator.state),
            "state": copy.deepcopy(self.sam_state),
        }
        names = self._checkpointed_vectors()
        if names:
            sam["vectors"] = {
                name: {i: entry[name].copy() for i, entry in self.vectors.items() if name in entry} for name in names
            }
        return {"state": {i: copy.deepcopy(entry) for i, entry in self.state.items()}, "param_groups": groups, "sam": sam}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a dict made by :meth:`state_dict` (arrays copied). Everything is checked first: a
        dict that does not fit changes nothing."""
        if self._pending is not None:
            raise RuntimeError("load_state_dict() between first_step() and second_step()")
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        missing = {"state", "param_groups", "sam"} - set(state_dict)
        if missing:
            raise ValueError(f"state_dict lacks {', '.join(sorted(missing))}")
        self._check_checkpoint_method(state_dict["sam"])
        saved_base = state_dict["sam"].get("base", self.base_optimizer.name)
        if saved_base != self.base_optimizer.name:
            raise ValueError(f"state_dict is for base={saved_base!r}, this optimizer has base={self.base_optimizer.name!r}")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
            len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, self.param_groups)
        ):
            raise ValueError(
                "state_dict's parameter groups do not match this optimizer's parameters (number of groups or of parameters)"
            )
        groups = []
        for saved, group in zip(saved_groups, self.param_groups):
            new = {**copy.deepcopy({k: v for k, v in saved.items() if k != "params"}), "params": group["params"]}
            self.base_optimizer.check_group(new, self.group_keys)
            self._setup_group(new)
            groups.append(new)
        state: dict[int, dict[str, Any]] = {}
        for key, entry in state_dict["state"].items():
            i = int(key)
            if not 0 <= i < len(self.params):
                raise ValueError(f"state_dict holds state for parameter {key!r}; this optimizer has {len(self.params)}")
            p = self.params[i]
            loaded = {}
            for name, value in entry.items():
                if isinstance(value, np.ndarray):
                    if value.shape != p.shape or value.dtype != p.dtype:
                        raise ValueError(
                            f"state_dict state[{i}][{name!r}] must be a {p.dtype} array of shape {p.shape}, "
                            f"got {value.dtype} {value.shape}"
                        )
                    value = np.array(value, order="C", copy=True)
                loaded[name] = copy.deepcopy(value)
            state[i] = loaded
        sam = state_dict["sam"]
        vectors: dict[int, dict[str, np.ndarray]] = {}
        for name in self._checkpointed_vectors():
            for key, value in sam.get("vectors", {}).get(name, {}).items():
                i = int(key)
                if not 0 <= i < len(self.params) or not isinstance(value, np.ndarray) or value.shape != self.params[i].shape:
                    raise ValueError(f"state_dict['sam']['vectors'][{name!r}][{key!r}] does not match the parameters")
                vectors.setdefault(i, {})[name] = np.array(value, dtype=self.params[i].dtype, order="C", copy=True)
        generator = None  # a dict without the generator's state leaves the generator as it is (as torch's front)
        if "generator" in sam:  # checked on a generator of this one's kind (a Generator given as seed may differ)
            generator = np.random.Generator(type(self.generator.bit_generator)())
            try:
                generator.bit_generator.state = sam["generator"]
            except (ValueError, TypeError, KeyError) as error:
                kind = type(generator.bit_generator).__name__
                raise ValueError(f"state_dict['sam']['generator'] is not the state of a {kind} generator: {error}") from None
        for group, new in zip(self.param_groups, groups):
            group.clear()
            group.update(new)
        self.state.clear()
        self.state.update(state)
        self.stats.clear()
        self.stats.update(sam.get("stats", {}))
        if generator is not None:
            self.generator.bit_generator.state = generator.bit_generator.state
        self.sam_state.update(copy.deepcopy(sam.get("state", {})))
        names = self._checkpointed_vectors()
        for entry in self.vectors.values():
            for name in names:
                entry.pop(name, None)
        for i, entry in vectors.items():
            self.vectors.setdefault(i, {}).update(entry)

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self.param_groups[0].items() if k != "params")
        return f"{type(self).__name__}(<{len(self.params)} arrays>, base={self.base_optimizer.name!r}, {settings})"
