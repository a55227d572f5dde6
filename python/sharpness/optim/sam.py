"""SAM and ASAM as a ``torch.optim.Optimizer`` wrapping any base optimizer.

Sharpness-Aware Minimization (Foret et al., ICLR 2021, arXiv:2010.01412) minimises the loss at
the worst point of a ball around the weights. Each step:

1. ``g = ∇L(w)``; ``e = ρ·g/(‖g‖ + ε)`` with one global norm over every parameter of every group;
2. ``w ← w + e`` and ``g̃ = ∇L(w + e)``;
3. ``w ←`` the saved ``w`` exactly, then the base optimizer steps with ``g̃``.

ASAM (Kwon et al., ICML 2021, arXiv:2102.11600) makes the ball scale-invariant:
``T = |w| + η`` elementwise and ``e = ρ·T²g/(‖T g‖ + ε)``; ``η = 0`` is the widely copied form.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from itertools import chain
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

from sharpness._validation import flag, number
from sharpness.backends.torch_foreach import real_view
from sharpness.buffers import LayoutChanged
from sharpness.methods.base import Method, Phase, restored_on_failure
from sharpness.methods.contract import Engine
from sharpness.optim._amp import AMP_HOW_TO_CALL, GradScalerSupport
from sharpness.optim._diagnostics import Diagnostics
from sharpness.optim._layout import BACKENDS, build_engines, check_backend
from sharpness.optim._profiling import profiled
from sharpness.optim._random_state import RandomState
from sharpness.optim._state import load_vectors, new_vectors, save_vectors

_MEMORY_MODES = ("exact", "subtract")
# SAM's own keys in the (shared) parameter groups: prefixed so that they never collide with a
# base optimizer's (Adadelta has its own `rho`).
SAM_KEYS = ("sam_rho", "sam_adaptive", "sam_eta", "sam_norm_weight")


_HOW_TO_CALL = (
    "call SAM either with a closure, `optimizer.step(closure)` where the closure zeroes the "
    "gradients, runs the forward and backward passes and returns the loss (it is called twice), or "
    "in two calls: `loss.backward(); optimizer.first_step(zero_grad=True); "
    "loss_fn(model(x), y).backward(); optimizer.second_step(zero_grad=True)`"
)


class _FrontEngine(Engine, Protocol):
    """An engine of this front (``build_engines``'): the contract, and what the base optimizer's
    own step needs."""

    def absent_grads_as_none(self) -> AbstractContextManager[None]:
        """While the base optimizer steps: parameters without a gradient show ``grad is None``."""
        ...


class _OwnUpdate(torch.optim.Optimizer):
    """The "base optimizer" of a method with an update of its own (``Method.has_own_update``): it
    holds the parameter groups (the method's settings) and the per-parameter state, so that
    ``state_dict`` keeps torch's format and LR schedulers see ``group["lr"]``; the step is the
    method's (:meth:`SAM._plain_step` calls ``_own_update``), never this object's."""

    def __init__(self, params: Any) -> None:
        super().__init__(params, {})

    def step(self, closure: Callable | None = None) -> None:  # type: ignore[override]
        raise RuntimeError("this holds the groups and state of a method with its own update: call the method's step()")


class SAM(Method, GradScalerSupport, Diagnostics, torch.optim.Optimizer):
    r"""Sharpness-Aware Minimization around any ``torch.optim`` base optimizer.

    Algorithm (Foret et al., ICLR 2021, arXiv:2010.01412; ASAM: Kwon et al., ICML 2021,
    arXiv:2102.11600)::

        g  = ∇L(w)                                 # first forward/backward, at w
        e  = ρ g / (‖g‖ + 1e-12)                   # SAM
        e  = ρ T² g / (‖T g‖ + 1e-12), T = |w|+η   # ASAM (adaptive=True)
        g̃  = ∇L(w + e)                             # second forward/backward, at w + e
        w  ← base_step(w, g̃)                       # from the exact original w

    The norm is global: one norm over every parameter of every group. ``ρ``, ``adaptive`` and
    ``η`` may differ per group (keys ``sam_rho``, ``sam_adaptive``, ``sam_eta``). A group key
    ``sam_norm_weight`` ``c > 0`` (default 1) weighs the group's share of that norm,
    ``‖g‖² = Σ_groups c²‖g_group‖²``: with per-group ``sam_rho`` this is μP²'s layerwise
    perturbation scaling (:func:`sharpness.mup2_param_groups`). The weights
    come back from a saved copy, bit for bit; with ``rho=0`` SAM is its base optimizer.

    CPU parameters are re-homed into one flat buffer per dtype (``p.data`` and ``p.grad`` become
    views of it) and every pass is a native multithreaded kernel; for ``torch.optim.SGD``,
    ``Adam`` and ``AdamW`` the restoration and the base step are one fused pass, keeping the base
    optimizer's state (``state_dict`` compatible with torch's). Other devices use ``torch._foreach``
    ops. ``stats`` counts what ran (fused steps, gradients or parameters that had to be copied
    back into the buffers after something replaced them).

    With ``torch.amp.GradScaler``: ``scaler.scale(loss).backward()``; ``if opt.first_step(zero_grad=True,
    grad_scaler=scaler): scaler.scale(loss2).backward()``; ``scaler.step(opt); scaler.update();
    opt.zero_grad()``. ``first_step`` unscales the first gradient (SAM's ``e`` does not depend on the
    scale, the variants' rules do); a step the scaler skips (inf/NaN in the gradient it checks)
    restores the weights and leaves the base optimizer's state untouched (docs/guide.md, "Mixed
    precision with GradScaler").

    Args:
        params: parameters or parameter groups, as for any torch optimizer.
        base_optimizer: a ``torch.optim.Optimizer`` class, built on the same parameter groups
            with ``base_kwargs``, or an instance already built on these parameters. A method with
            an update rule of its own (AdaSAM, BayesianSAM: ``has_own_update``) takes none.
        rho: the radius ``ρ`` (0.05 is SAM's usual value; ASAM uses 0.5–2).
        adaptive: ASAM's scale-invariant perturbation.
        eta: ASAM's ``η`` (0.01 in the paper; 0 gives the widely copied form).
        backend: ``"auto"`` (native kernels for CPU tensors, Triton kernels for CUDA tensors when
            Triton imports, foreach ops elsewhere), ``"rust"`` (native kernels; CPU tensors only),
            ``"triton"`` (Triton kernels; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``)
            or ``"torch"`` (foreach ops everywhere).
        same_noise: with ``step(closure)``, replay the random state of the first forward pass in
            the second, so dropout (and any other randomness in the model) is the same at ``w`` and
            at ``w + e``: ``e`` is then computed for, and the gradient taken on, the same
            sub-network, and ``rho=0`` reproduces the base optimizer bit for bit even with dropout.
            After the step the random state is where the first pass left it. ``False`` draws
            fresh noise for the second pass, as the usual ``sam.py`` script does.
        seed: seed of the optimizer's own ``generator`` (default: ``torch.initial_seed()``).
        memory: ``"exact"`` (default): one backup of the perturbed weights, restored bit for bit.
            ``"subtract"``: keep ``e`` rounded to bfloat16 (2 bytes per weight: half a float32
            backup, a quarter of a float64 one; no saving for 16-bit weights), move the weights by
            exactly that and subtract it again. Not bit-exact: ``fl(fl(w+e)−e)`` is within one ulp
            of ``max(|w|, |w+e|)`` of ``w``, and the errors add up over steps (docs/guide.md,
            "Memory modes", gives the measured drift). CPU and foreach engines.
        fused_step: ``True`` (default): for ``torch.optim.SGD``, ``Adam`` and ``AdamW`` the
            restoration and the base step are one fused native pass (CPU and Triton engines). It
            follows torch's for-loop step operation by operation but rounds each operation on its
            own, where torch's vectorised CPU kernels contract some into fused multiply-adds: a
            weight may differ from torch's own step by a few ulp per step (measured bound in
            docs/guide.md, "Exactness"). ``False``: restore, then the base optimizer's own
            ``step()``: bit for bit what that optimizer does (one more memory pass).
        **base_kwargs: passed to ``base_optimizer`` when it is a class (``lr``, ``momentum`` ...).

    Example:
        >>> import torch, sharpness
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = sharpness.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
        >>> x, y = torch.randn(8, 4), torch.randn(8, 2)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> loss = opt.step(closure)  # the closure runs twice: at w, then at w + e
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[torch.optim.Optimizer] | torch.optim.Optimizer | None = None,
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.01,
        backend: str = "auto",
        same_noise: bool = True,
        seed: int | None = None,
        memory: str = "exact",
        fused_step: bool = True,
        **base_kwargs: Any,
    ) -> None:
        rho = number("rho", rho, minimum=0)
        eta = number("eta", eta, minimum=0)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if memory not in _MEMORY_MODES:
            raise ValueError(f"memory must be one of {_MEMORY_MODES}, got {memory!r}")
        if memory != "exact" and self.needs_exact_backup:
            raise ValueError(f'{type(self).__name__} needs memory="exact": {self.needs_exact_backup}')
        self.memory = memory
        self.fused_step = flag("fused_step", fused_step)
        defaults = dict(sam_rho=rho, sam_adaptive=bool(adaptive), sam_eta=eta, sam_norm_weight=1.0)
        super().__init__(params, defaults)
        for group in self.param_groups:
            if len({id(p) for p in group["params"]}) != len(group["params"]):
                # torch only warns, then steps such a parameter once per listing; the flat
                # buffers hold it once. Refuse rather than silently differ.
                raise ValueError("a parameter group lists the same parameter more than once (duplicate parameters)")
        if self.has_own_update:  # the method's own update (Method.has_own_update): no base optimizer
            name = type(self).__name__
            if base_optimizer is not None:
                raise TypeError(
                    f"{name} has an update rule of its own: it takes no base optimizer (got {base_optimizer!r}); "
                    "pass its settings by keyword"
                )
            if base_kwargs:
                raise TypeError(f"unknown argument(s) for {name}: {', '.join(sorted(base_kwargs))}")
            self.base_optimizer: torch.optim.Optimizer = _OwnUpdate(self.param_groups)
        elif base_optimizer is None:
            raise TypeError(f"{type(self).__name__} needs a base_optimizer: a torch.optim.Optimizer class or instance")
        elif isinstance(base_optimizer, torch.optim.Optimizer):
            if base_kwargs:
                raise TypeError(f"base optimizer arguments {sorted(base_kwargs)} given with an optimizer instance")
            mine = {id(p) for g in self.param_groups for p in g["params"]}
            theirs = {id(p) for g in base_optimizer.param_groups for p in g["params"]}
            if mine != theirs:
                raise ValueError("the base optimizer instance must be built on the same parameters as SAM")
            for group in base_optimizer.param_groups:
                for key, value in defaults.items():
                    group.setdefault(key, value)
            self.base_optimizer = base_optimizer
        elif isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer):
            self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        else:
            raise TypeError(f"base_optimizer must be a torch.optim.Optimizer class or instance, got {base_optimizer!r}")
        for group in self.base_optimizer.param_groups:
            self._check_group(group)
        self._link_base()
        self.defaults.update(self.base_optimizer.defaults)
        self.backend = backend
        self.same_noise = bool(same_noise)
        # Randomness the optimizer itself draws (ESAM, RSAM, SSAM ...) comes from here, never from
        # torch's global generator, and is saved in state_dict(). Seeding from torch's initial
        # seed consumes nothing from the global stream.
        self.generator = torch.Generator().manual_seed(torch.initial_seed() if seed is None else seed)
        self.stats: Counter = Counter()
        self._engines: list[_FrontEngine] | None = None
        self._probed_keys: tuple[frozenset[str] | None] | None = None
        # None, "perturbed", "skipped" (a non-finite norm: no perturbation), "one_pass" (a variant's
        # one-pass step left for GradScaler.step) or "skip_step" (a step that will take no update).
        self._pending = None
        self._deferred_zero_grad = False  # first_step's zero_grad, for a step left for GradScaler.step
        self._first_step_scaled = False  # whether the pending step's first_step got grad_scaler=
        self._one_pass_on_scaled = False  # the last first_step took a one-pass step without grad_scaler=
        self._in_step = False
        self.last_grad_norm = float("nan")
        # Scalars of the method itself (step count; variants add theirs), saved in state_dict().
        self.sam_state: dict[str, Any] = {"step": 0}
        # The method's own per-parameter vectors (apart from the base optimizer's state).
        self.vectors = new_vectors()
        check_backend(self.param_groups, backend)
        # Re-home the parameters now, once, so that a model compiled after this sees its final
        # storage (rebinding later would make torch.compile guard-fail and recompile).
        self.engines()

    def _check_group(self, group: dict[str, Any]) -> None:
        # Stored back as floats: the kernels and the saved state take Python numbers.
        group["sam_rho"] = number("sam_rho", group["sam_rho"], minimum=0)
        group["sam_eta"] = number("sam_eta", group["sam_eta"], minimum=0)
        group["sam_norm_weight"] = number("sam_norm_weight", group["sam_norm_weight"], above=0)
        self._setup_group(group)

    def _link_base(self) -> None:
        # One list of groups and one state for both: an LR scheduler built on either optimizer
        # changes the learning rate the other sees.
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    # -- layout -----------------------------------------------------------------------------------

    def _build_engines(self) -> list[Any]:
        """The engines for the current groups (:func:`~sharpness.optim._layout.build_engines`),
        releasing the previous ones' flat buffers first."""
        if self._engines is not None:
            for engine in self._engines:
                engine.release()
        engines = build_engines(self.param_groups, self.backend, self.memory, self.stats)
        self.stats["layouts"] += 1
        return engines

    def _fuses(self, engines: list[_FrontEngine]) -> bool:
        """Whether the base step runs as one fused pass with the restoration (``fused_step`` and a
        kernel for the base optimizer on every engine), rather than as the base optimizer's own."""
        return self.fused_step and all(e.can_fuse(self.base_optimizer, self.param_groups) for e in engines)

    def engines(self) -> list[_FrontEngine]:
        """The engines serving the parameters (built on first use)."""
        if self._engines is None:
            self._engines = self._build_engines()
        return self._engines

    def _begin(self) -> list[_FrontEngine]:
        self._check_norm_weights()
        engines = self.engines()
        try:
            for engine in engines:
                engine.begin()
        except LayoutChanged:
            self._engines = self._build_engines()
            engines = self._engines
            for engine in engines:
                engine.begin()
        return engines

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        for key, value in self.defaults.items():
            if key in SAM_KEYS:
                param_group.setdefault(key, value)
        if hasattr(self, "base_optimizer"):
            self.base_optimizer.add_param_group(param_group)
            self._check_group(self.param_groups[-1])
            if self._engines is not None:
                self._engines = self._build_engines()
        else:  # during torch.optim.Optimizer.__init__
            super().add_param_group(param_group)

    # -- step hooks, as torch.optim.Optimizer runs them around step() -----------------------------

    def _pre_hooks(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        for hook in chain(_global_optimizer_pre_hooks.values(), self._optimizer_step_pre_hooks.values()):
            result = hook(self, args, kwargs)
            if result is not None:
                if not (isinstance(result, tuple) and len(result) == 2):
                    raise RuntimeError(f"a step pre-hook must return None or (args, kwargs), got {result!r}")
                args, kwargs = result
        return args, kwargs

    def _post_hooks(self, args: tuple, kwargs: dict) -> None:
        self._optimizer_step_code()
        for hook in chain(self._optimizer_step_post_hooks.values(), _global_optimizer_post_hooks.values()):
            hook(self, args, kwargs)

    # -- the two halves of a SAM step ---------------------------------------------------------

    @torch.no_grad()
    def begin_step(self) -> None:
        """Starts a step of a method that takes its first gradient elsewhere than at ``w``
        (:attr:`begins_before_first_gradient`; SAMPa: at ``y``): saves ``w`` and moves the
        weights there. Step pre-hooks run here. Then a backward there, :meth:`first_step`, and so
        on (``step(closure)`` calls it first itself; :meth:`restore` puts ``w`` back)."""
        if not self.begins_before_first_gradient:
            raise RuntimeError(f"{type(self).__name__} takes its first gradient at w: its step has no begin_step()")
        if self._pending is not None:
            raise RuntimeError("begin_step() while a step is pending; finish it with second_step() (or restore()) first")
        if not self._in_step:
            self._pre_hooks((), {})
        self._start_step()
        self._first_step_scaled = False
        engines = self._begin()
        with restored_on_failure(engines):
            self._begin_step(engines)
        self._pending = Phase.AT_Y

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, grad_scaler: Any = None) -> bool:
        """Moves the weights to ``w + e`` using the gradients now in ``p.grad``.

        Returns whether a second forward/backward pass and :meth:`second_step` must follow
        (always for SAM; variants that skip the second pass on some steps take their whole step
        here and return False).

        Step pre-hooks run here (a SAM step starts with it) and post-hooks at the end of the
        step, so each fires once per SAM step. A non-finite gradient norm (an overflowing loss
        scale, a NaN) applies no perturbation: the weights stay as they are,
        ``stats["nonfinite_skips"]`` counts it, and :meth:`second_step` then does exactly what
        the base optimizer does with the gradients it is given (a GradScaler then skips the step
        as usual).

        ``grad_scaler``: the ``torch.amp.GradScaler`` that scaled the loss. The first gradient is
        then unscaled in place first (as ``scaler.unscale_`` would: times the float32 reciprocal
        of the scale), so the method's rule sees the true gradient, and the step is finished by
        ``scaler.step(opt)``, which checks the gradients for inf/NaN and calls :meth:`step`. A
        variant's one-pass step (``False`` returned) is not taken here then: its update direction
        is left in ``p.grad`` at the scaler's scale, like any scaled gradient (``scaler.unscale_``
        and clipping work on it), and ``zero_grad`` waits for it; ``scaler.step(opt)`` takes it,
        or skips it on inf/NaN. Plain SAM/ASAM do not need the scaler here (``e`` does not depend
        on the scale); the variants whose rule does refuse ``scaler.step(opt)`` without it. The
        loop, for SAM and every variant that has the two-call API::

            scaler.scale(loss_fn(model(x), y)).backward()
            if opt.first_step(zero_grad=True, grad_scaler=scaler):
                scaler.scale(loss_fn(model(x), y)).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        """
        if self.steps_by_evaluations:
            raise RuntimeError(self._whole_step_only())
        begun = self._pending == Phase.AT_Y  # begin_step() started the step (pre-hooks, _start_step)
        if self._pending is not None and not begun:
            raise RuntimeError("first_step() was called twice without second_step() in between; " + _HOW_TO_CALL)
        if self.begins_before_first_gradient and not begun:
            raise RuntimeError(f"{type(self).__name__}.first_step() needs begin_step() and a backward there before it")
        if not begun:
            if not self._in_step:
                self._pre_hooks((), {"zero_grad": zero_grad})
            self._start_step()
        self._first_step_scaled = grad_scaler is not None
        self._one_pass_on_scaled = False
        with profiled("SAM.first_step"):
            engines = self._begin()
            self._first_gradient_taken(engines)
            by_count = self._second_pass_due_by_count()
            if by_count is False and not self.rewrites_one_pass_gradient:
                scale = None  # the gradient is stepped on as it is: no need to unscale it here
            else:
                scale = self._unscale_first_gradient(engines, grad_scaler)
            if by_count is False:
                self.last_grad_norm = float("nan")  # not computed: nothing needs it
                self._one_pass_step(engines, float("nan"), zero_grad, grad_scaler, scale)
                return False
            sums = [engine.sum_of_squares(self.param_groups) for engine in engines]
            if self._norm_stays_on_device(engines, sums):
                with restored_on_failure(engines):
                    self._perturb_on_device(engines, sums)
                if zero_grad:
                    self.zero_grad()
                return True
            norm = math.sqrt(sum(float(s) for s in sums))
            self.last_grad_norm = norm
            if begun and grad_scaler is not None and not math.isfinite(norm):
                # An overflow where begin_step() moved to: w back, and the step left to
                # scaler.step(opt), which finds the inf in p.grad and skips it (update() lowers the scale).
                for engine in engines:
                    engine.restore()
                self._pending = Phase.SKIP_STEP
                self._deferred_zero_grad = zero_grad
                return False
            if math.isfinite(norm) and not self._second_pass_due(norm):
                self._one_pass_step(engines, norm, zero_grad, grad_scaler, scale)
                return False
            self._pending = self._perturb_or_skip(engines, norm)
            if zero_grad:
                self.zero_grad()
        return True

    def _one_pass_step(self, engines: list, grad_norm: float, zero_grad: bool, grad_scaler: Any, scale: Tensor | None) -> None:
        """A step without a second pass: taken now, or, with a GradScaler, left for
        ``scaler.step(opt)`` (the direction back at the scaler's ``scale``, None when the scaler
        is disabled or the gradient was never unscaled)."""
        self._one_pass_gradient(engines, grad_norm)
        if grad_scaler is None:
            self._one_pass_on_scaled = True  # if a GradScaler's step follows, this one was wrong
            try:
                self._plain_step(engines, synced=True)  # from w restored, where begin_step() moved it
            except BaseException:
                self.restore()
                raise
            self._pending = None
            self._finish_step(zero_grad)
            return
        if scale is not None:
            self._multiply_grads(engines, scale, begin=False)
        self._pending = Phase.ONE_PASS
        self._deferred_zero_grad = zero_grad


    def _norm_stays_on_device(self, engines: list, sums: list) -> bool:
        """Whether this step can run without reading the norm on the host: an engine returned it
        as a device tensor (the Triton engine), all such sums are on one device, every engine
        holding gradients takes a device norm, and the method (plain SAM/ASAM, or every-k SAM on
        the steps its count makes SAM steps; not a variant that decides on the norm) needs no
        host value."""
        return (
            len({s.device for s in sums if isinstance(s, Tensor)}) == 1
            and (not self.decides_on_norm or self._second_pass_due_by_count() is True)
            and self.perturbs_like_sam
            and all(e.serves_device_norm() for e in engines)
        )

    def _perturb_on_device(self, engines: list, sums: list) -> None:
        """first_step without a host sync: the norm stays a 0-d device tensor (so does
        ``last_grad_norm``); the kernels compute ``ρ/‖g‖`` from it and, when it is not finite,
        perturb nothing, a decision taken on the device. Such steps are counted on the device and
        reach ``stats["nonfinite_skips"]`` at :meth:`sync_stats` (``state_dict`` calls it); the
        second step is the base optimizer's step with the given gradients either way."""
        device_sums = [s for s in sums if isinstance(s, Tensor)]
        total = device_sums[0]
        for s in device_sums[1:]:
            total = total + s
        norm = total.sqrt()
        self.last_grad_norm = norm
        skipped = (~torch.isfinite(norm)).to(torch.int64)
        counter = getattr(self, "_device_nonfinite_skips", None)
        if counter is None or counter.device != norm.device:
            self._device_nonfinite_skips = skipped
        else:
            counter.add_(skipped)
        for engine in engines:
            engine.perturb(self.param_groups, norm)
        self._pending = Phase.PERTURBED


    def _plain_step(self, engines: list[_FrontEngine], fused: bool = True, synced: bool = False) -> None:
        """The base step with the gradients in ``p.grad``, from ``w`` (restored first where a step
        begun elsewhere moved the weights: Momentum-SAM's one-pass step; ``synced``: the engines'
        :meth:`begin` ran since the last backward). A method with an update of its own takes that
        instead (``has_own_update``)."""
        if self.has_own_update:
            if not synced:
                for engine in engines:
                    engine.begin()  # re-attach any gradient view replaced since
            for engine in engines:
                engine.restore()  # nothing when the weights did not move
            self._own_update(engines)
            self.stats["base_steps"] += 1
        elif fused and self._fuses(engines):
            for engine in engines:
                engine.restore_and_step(self.base_optimizer, self.param_groups, synced=synced)
        else:
            for engine in engines:
                engine.begin()  # re-attach any gradient view replaced since
                engine.restore()  # nothing when the weights did not move
            with ExitStack() as stack:
                for engine in engines:
                    stack.enter_context(engine.absent_grads_as_none())
                stack.enter_context(self._variant_state_hidden())
                self.base_optimizer.step()
            self.stats["base_steps"] += 1

    @contextmanager
    def _variant_state_hidden(self) -> Iterator[None]:
        """While the base optimizer takes its own step: the entries SAM variants keep in the shared
        state (LookSAM's ``g_v``, ...) are taken out, so that an optimizer that initialises a
        parameter's state when it is empty (``len(state) == 0``: Adam, RMSprop, most of
        torch.optim) still does so on its first step. They come back after, untouched."""
        keys = self._base_state_keys()
        hidden: list[tuple[dict, dict]] = []
        if keys is not None:
            for entry in self.state.values():
                extra = {k: entry.pop(k) for k in [k for k in entry if k not in keys]}
                if extra:
                    hidden.append((entry, extra))
        try:
            yield
        finally:
            for entry, extra in hidden:
                entry.update(extra)

    def _base_state_keys(self) -> frozenset[str] | None:
        """The state keys the base optimizer itself creates, found once by stepping a copy of it on
        a one-element probe (None when that cannot run: then nothing is hidden)."""
        if self._probed_keys is None:
            try:
                probe = torch.zeros(1, requires_grad=True)
                defaults = {k: v for k, v in self.base_optimizer.defaults.items() if k not in SAM_KEYS}
                for flag in ("capturable", "fused", "differentiable"):  # CPU probe: the plain step
                    if defaults.get(flag):
                        defaults[flag] = False
                copy = type(self.base_optimizer)([probe], **defaults)
                probe.grad = torch.ones(1)
                copy.step()
                self._probed_keys = (frozenset(copy.state[probe]),)
            except Exception:  # an optimizer that needs a closure, other arguments ...
                self._probed_keys = (None,)
        return self._probed_keys[0]

    def _finish_step(self, zero_grad: bool) -> None:
        self.stats["steps"] += 1
        self.sam_state["step"] += 1
        # What an LR scheduler's wrapper of `step()` records: with the two-call API `step()`
        # may never run, and the scheduler would warn that it steps before the optimizer.
        self._opt_called = True
        self.base_optimizer._opt_called = True  # type: ignore[attr-defined]
        if zero_grad:
            self.zero_grad()
        if not self._in_step:
            self._post_hooks((), {"zero_grad": zero_grad})

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restores the weights saved by :meth:`first_step` and lets the base optimizer step with
        the gradients now in ``p.grad`` (taken at ``w + e``). After a one-pass step that
        :meth:`first_step` left for the GradScaler (``grad_scaler=``; normally ``scaler.step(opt)``
        finishes it), the base step with the direction in ``p.grad``."""
        if self.steps_by_evaluations and not self._in_step:
            raise RuntimeError(self._whole_step_only())
        if self._pending is None:
            raise RuntimeError("second_step() needs a first_step() before it; " + _HOW_TO_CALL)
        if self._pending == Phase.AT_Y:
            if self._second_pass_due_by_count() is False:  # one gradient per step (Momentum-SAM): the step's
                try:
                    self.first_step(zero_grad=zero_grad)
                except BaseException:
                    self.restore()  # never leave the weights moved behind an exception
                    raise
                return
            raise RuntimeError("second_step() after begin_step() needs first_step() (with the gradient there) before it")
        if self._pending in ("one_pass", "skip_step"):
            self._finish_deferred(zero_grad)
            return
        with profiled("SAM.second_step"):
            pending = self._pending
            engines = self.engines()
            try:
                # Validate before changing anything: a gradient that cannot be taken in (sparse,
                # say) raises here, with the weights still restorable from the backup.
                for engine in engines:
                    engine.begin()
                if pending == "perturbed":
                    self._before_base_step(engines)
                if pending == "perturbed" and self._fuses(engines):
                    for engine in engines:
                        engine.restore_and_step(self.base_optimizer, self.param_groups, synced=True)
                else:
                    for engine in engines:
                        engine.restore()
                    # After a non-finite norm, exactly the base optimizer's own step.
                    self._plain_step(engines, fused=pending == "perturbed")
            except BaseException:
                self.restore()  # never leave the weights perturbed behind an exception
                raise
            self._pending = None
            if pending == "perturbed":
                self._after_base_step(engines)
        self._finish_step(zero_grad)


    @torch.no_grad()
    def step(  # type: ignore[override]
        self, closure: Callable[[], Tensor] | None = None, *more: Callable[[], Tensor] | None
    ) -> Tensor | None:
        """A whole SAM step with a closure, or the second half after :meth:`first_step`.

        ``closure`` zeroes the gradients, runs the forward and backward passes and returns the
        loss; it is called at ``w`` and again at ``w + e`` (with the first call's random state
        when ``same_noise``). Returns the loss of the first call. Without a closure, ``step()``
        completes a pending :meth:`first_step` (what trainers that call ``optimizer.step()``
        themselves need) and raises otherwise. With a closure after :meth:`first_step`, the
        closure is the second pass: it runs once, at ``w + e``, then the step completes (what
        Lightning's manual optimization and its AMP plugin need); its loss is returned.
        ``more``: the further closures a method's step takes (``step_functions``: LETS's
        validation closure), used within the step after it (``_after_whole_step``), or for the
        first gradient (SAMPa's at ``y``: ``_first_gradient_function``).
        """
        more = self._checked_step_functions(more)
        scaled = self._under_grad_scaler()
        if self.steps_by_evaluations:  # the method takes its own gradients through the closure
            if closure is None:
                raise RuntimeError(self._whole_step_only())
            return self._hooked_step(closure, self._step_by_closure)
        if closure is None:
            if more:
                raise ValueError(f"step() got {', '.join(self.step_functions)} without the training closure before it")
            self._complete_step(scaled)
            return None
        if scaled:
            raise RuntimeError("GradScaler.step() cannot run a SAM closure; " + AMP_HOW_TO_CALL)
        if self.selects_samples:  # the closure takes sample indices and returns per-sample losses
            return self._hooked_step(closure, self._per_sample_step)
        if self._pending is not None and more:
            raise RuntimeError(
                f"step() with {', '.join(self.step_functions)} after first_step(): finish that step with second_step() first"
            )
        if more:

            def body(c: Callable[[], Tensor]) -> Tensor:
                loss = self._closure_step(c, self._first_gradient_function(c, more))
                self._after_whole_step(c, more)
                return loss

            return self._hooked_step(closure, body)
        if self._pending is not None:  # after first_step(): the closure is the second pass
            try:
                with torch.enable_grad():
                    loss = closure()
            except BaseException:
                self.restore()  # never leave the weights perturbed behind an exception
                raise
            self.second_step()
            return loss
        return self._hooked_step(closure, self._closure_step)

    def _whole_step_only(self) -> str:
        return f"{type(self).__name__} takes {self.evaluations_per_step}: call step(closure)"

    def _step_by_closure(self, closure: Callable[..., Tensor]) -> Tensor:
        """``step(closure)`` of a method that takes its own gradients
        (:meth:`Method._step_by_evaluations`), then the end of the step its phase asks for; an
        exception restores ``w``."""
        self._start_step()
        try:
            loss = self._step_by_evaluations(self._evaluator(closure))
        except BaseException:
            self.restore()  # never leave the weights moved behind an exception
            raise
        if self._pending is None:
            self._plain_step(self._begin())
            self._finish_step(zero_grad=False)
        else:
            self.second_step()
        return loss

    def _evaluator(self, closure: Callable[..., Tensor]) -> Callable[..., tuple[Tensor, list]]:
        """``evaluate(*args)`` for :meth:`Method._step_by_evaluations`: ``closure(*args)`` at the
        current weights (gradients enabled), its gradients taken into the engines. With
        ``same_noise`` each evaluation with the same ``args`` replays the random state the first
        one started from (the same dropout at every point) and leaves it where the first left it."""
        first_states: dict[tuple, tuple[RandomState, RandomState]] = {}

        def evaluate(*args: Any) -> tuple[Tensor, list]:
            replay = first_states.get(args) if self.same_noise else None
            if replay is not None:
                replay[0].restore()
            elif self.same_noise:
                before = RandomState.capture(self._devices())
            try:
                with torch.enable_grad():
                    loss = closure(*args)
            finally:
                if replay is not None:
                    replay[1].restore()
            if self.same_noise and replay is None:
                first_states[args] = (before, RandomState.capture(self._devices()))
            return loss, self._begin()

        return evaluate

    def _gradients_at(self, closure: Callable[[], Tensor]) -> tuple[Tensor, float, list]:
        """Runs ``closure`` (gradients enabled) at the current weights; its gradients go to the
        engines (see :meth:`Method._gradients_at`)."""
        with torch.enable_grad():
            loss = closure()
        # (a closure that only runs the backward pass, as SSAM's per-sample ones, returns None)
        value = math.nan if loss is None else float(loss.detach()) if isinstance(loss, Tensor) else float(loss)
        return loss, value, self._begin()

    def _engines_with_gradients(self, grads: Any = None) -> list:
        """The engines, holding the gradients in ``p.grad`` (see :meth:`Method._engines_with_gradients`)."""
        if grads is not None:
            raise TypeError("on the torch front the gradient is read from p.grad: call this without grads")
        return self._begin()

    def _host_array(self, value: Any, like: Tensor) -> Any:
        """``value`` (a tensor on any device, or anything ``torch.as_tensor`` takes) as a host numpy
        array of ``like``'s real-pair shape (see :meth:`Method._host_array`)."""
        t = real_view(torch.as_tensor(value).detach())  # a complex value: its real pairs too
        shape = real_view(like.detach()).shape
        if t.shape != shape:
            raise ValueError(f"shape {tuple(t.shape)}, but the parameter's (real pairs) is {tuple(shape)}")
        t = t.to("cpu")
        return (t.float() if t.dtype in (torch.float16, torch.bfloat16) else t).numpy().copy()

    def _front_array(self, host: Any) -> Tensor:
        return torch.from_numpy(host)

    @contextmanager
    def _withheld_gradients(self, params: list[Tensor]) -> Iterator[None]:
        """``requires_grad`` off for ``params`` during the block, so that backward computes no
        gradient for them (see :meth:`Method._withheld_gradients`); it changes no layout."""
        frozen = [p for p in params if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in frozen:
                p.requires_grad_(True)

    def _complete_step(self, scaled: bool) -> None:
        """``step()`` without a closure: the rest of the step :meth:`first_step` began, under
        ``GradScaler.step`` (``scaled``) or not."""
        if self._pending is None:
            if scaled:
                raise RuntimeError("GradScaler.step() needs a first_step() before it; " + AMP_HOW_TO_CALL)
            if self.begins_before_first_gradient:
                raise RuntimeError(
                    f"{type(self).__name__}.step() without a closure needs begin_step() before the forward pass "
                    "(it moves the weights to where the step's gradient is taken), or call step(closure)"
                )
            raise RuntimeError("step() without a closure needs a first_step() before it; " + _HOW_TO_CALL)
        if scaled:
            self._scaled_second_step()
        else:
            self.second_step()  # the pre-hooks ran in first_step, the post-hooks run here


    def _hooked_step(self, closure: Callable, body: Callable[[Callable], Tensor]) -> Tensor:
        """Runs ``body(closure)`` as one optimizer step: profiler label, pre-hooks, post-hooks."""
        with profiled(f"Optimizer.step#{type(self).__name__}.step"):
            args, kwargs = self._pre_hooks((closure,), {})
            closure = args[0] if args else kwargs.get("closure", closure)
            self._in_step = True
            try:
                loss = body(closure)
            finally:
                self._in_step = False
            self._post_hooks(args, kwargs)
        return loss

    def _closure_step(self, closure: Callable[[], Tensor], first_closure: Callable[[], Tensor] | None = None) -> Tensor:
        """A whole step: ``first_closure`` (default ``closure``) for the first gradient, ``closure``
        for the second."""
        moved = self._before_first_pass()
        noise = RandomState.capture(self._devices()) if self.same_noise else None
        try:
            with torch.enable_grad():
                loss = (closure if first_closure is None else first_closure)()
            due = self.first_step()
        except BaseException:
            if moved:
                self.restore()  # never leave the weights moved behind an exception
            raise
        if not due:
            return loss  # a one-pass step (variants of SAM): already taken
        if noise is not None:
            after_first = RandomState.capture(self._devices())
            noise.restore()
        try:
            with torch.enable_grad():
                closure()
        except BaseException:
            self.restore()  # never leave the weights perturbed behind an exception
            raise
        finally:
            if noise is not None:
                after_first.restore()
        self.second_step()
        return loss

    def _per_sample_step(self, closure: Callable[..., Tensor]) -> Tensor:
        """The whole step of a method that :attr:`selects_samples` (ESAM): ``closure(indices=None)``
        runs the forward pass only, on the samples ``indices`` (None: the whole batch), and returns
        their per-sample losses (shape ``[B]``); the optimizer zeroes the gradients and
        back-propagates their mean itself. Called at ``w`` (in the method's ``_first_pass``), at
        ``w + e`` without gradient where the method ranks the samples, and at ``w + e`` on the
        samples it picks; with ``same_noise``, every call in the first one's random state. Returns
        the mean loss at ``w``."""
        noise = RandomState.capture(self._devices()) if self.same_noise else None
        with self._first_pass():
            before = self._per_sample_backward(closure, None, first=True)
        if not self.first_step():
            return before.mean()  # a one-pass step: already taken
        after_first = RandomState.capture(self._devices()) if noise is not None else None

        def at_perturbed() -> Tensor:
            if noise is not None:
                noise.restore()
            return self._per_sample_losses(closure, None)  # under step's no_grad: ranking only

        try:
            indices = self._second_pass_samples(before, at_perturbed)
            if noise is not None:
                noise.restore()
            self._per_sample_backward(closure, indices)
        except BaseException:
            self.restore()  # never leave the weights perturbed behind an exception
            raise
        finally:
            if after_first is not None:
                after_first.restore()
        self.second_step()
        return before.mean()

    def _per_sample_losses(self, closure: Callable[..., Tensor], indices: Tensor | None) -> Tensor:
        losses = closure(indices)
        if not isinstance(losses, Tensor) or losses.dim() != 1:
            raise ValueError(
                f"the {type(self).__name__} closure must return the per-sample losses, a tensor of shape [B] "
                "(use reduction='none'), got "
                + (f"shape {tuple(losses.shape)}" if isinstance(losses, Tensor) else type(losses).__name__)
            )
        return losses

    def _per_sample_backward(self, closure: Callable[..., Tensor], indices: Tensor | None, first: bool = False) -> Tensor:
        """Gradients zeroed, then the mean of ``closure(indices)``'s per-sample losses back-propagated
        (not in a first pass whose every parameter was withheld: nothing to differentiate)."""
        self.zero_grad()
        with torch.enable_grad():
            losses = self._per_sample_losses(closure, indices)
            if not (first and not losses.requires_grad):
                losses.mean().backward()
        return losses.detach()

    # torch.optim.Optimizer wraps `step` with its hooks unless it is marked: SAM runs them itself,
    # once per SAM step whichever API is used.
    step.hooked = True  # type: ignore[attr-defined]

    @torch.no_grad()
    def restore(self) -> bool:
        """Undoes a pending :meth:`first_step`: the weights go back to ``w`` bit for bit and no
        base step is taken. For a ``KeyboardInterrupt`` or an exception between the two halves
        (``step(closure)`` does it itself). Returns whether there was something to undo."""
        pending, self._pending = self._pending, None
        self._deferred_zero_grad = False
        if pending is not None:  # a one-pass step left to the GradScaler may start from a move too
            for engine in self.engines():
                engine.restore()  # nothing where the weights did not move
        return pending is not None

    def _devices(self) -> set[torch.device]:
        return {p.device for group in self.param_groups for p in group["params"]}


    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zeroes the gradients. Gradients in flat buffers stay views of them (one memset);
        ``set_to_none`` marks them absent, exactly as torch's ``p.grad = None`` would."""
        for engine in self.engines():
            engine.zero_grad(set_to_none)

    # -- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's ``state_dict`` (its state and the shared groups, with SAM's keys)
        plus SAM's own counters under ``"sam"``. Refused between ``first_step`` and
        ``second_step``, where the weights are perturbed: checkpoint before or after a step."""
        if self._pending is not None:
            raise RuntimeError(
                "state_dict() between first_step() and second_step(): the weights are perturbed "
                "and the checkpoint would not resume exactly; take it after second_step()"
            )
        sd = self.base_optimizer.state_dict()
        self.sync_stats()
        sd["sam"] = {
            "method": self.method_name(),
            "stats": dict(self.stats),
            "generator": self.generator.get_state(),
            "state": dict(self.sam_state),
        }
        names = self._checkpointed_vectors()
        if names:
            sd["sam"]["vectors"] = save_vectors(self.vectors, self.param_groups, names)
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._pending is not None:
            raise RuntimeError("load_state_dict() between first_step() and second_step()")
        state_dict = dict(state_dict)
        sam = state_dict.pop("sam", {})
        self._check_checkpoint_method(sam)
        self.base_optimizer.load_state_dict(state_dict)
        self._link_base()
        for group in self.param_groups:
            for key in SAM_KEYS:
                group.setdefault(key, self.defaults[key])
            self._setup_group(group)
        # The same Counter object: the engines hold it. The loaded state tensors are adopted into
        # the flat buffers on the next step.
        self.stats.clear()
        self.stats.update(sam.get("stats", {}))
        if "generator" in sam:
            self.generator.set_state(sam["generator"])
        self.sam_state.update(sam.get("state", {}))
        names = self._checkpointed_vectors()
        if names:
            load_vectors(self.vectors, self.param_groups, sam.get("vectors", {name: {} for name in names}))

    def __repr__(self) -> str:
        return f"SAM(backend={self.backend!r}, base={self.base_optimizer!r})"
