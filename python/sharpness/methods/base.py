"""What every method shares, without torch: the phases of a step, the hooks a method overrides, its
capability flags, and the two halves of a step written once over the engine contract.

A front (:class:`sharpness.optim.SAM` over torch tensors, :class:`sharpness.numpy.SAM` over numpy
arrays) supplies the parameter groups, the state, the engines and the base step; a method (a
subclass of :class:`Method`) supplies its rule through the hooks below. Both fronts run the same
hook code, so a method's rule exists once.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from enum import Enum
from typing import Any, ClassVar

from sharpness.methods.contract import Engine


class Phase(str, Enum):
    """Where a step stands between its calls. ``None`` (no step under way) is the idle phase.

    A ``str`` enum: a phase compares equal to its name (``phase == "perturbed"``)."""

    #: ``first_step`` moved the weights to ``w + e`` (saving ``w``); ``second_step`` restores them.
    PERTURBED = "perturbed"
    #: ``first_step`` met a non-finite gradient norm: nothing moved; ``second_step`` is the plain base step.
    SKIPPED = "skipped"
    #: A one-pass step left for ``GradScaler.step`` (torch front).
    ONE_PASS = "one_pass"
    #: A step that will take no update (SAMPa after a non-finite gradient at both points).
    SKIP_STEP = "skip_step"
    #: ``begin_step`` moved the weights (saving ``w``) to where the step's first gradient is taken
    #: (SAMPa: ``y``); ``first_step`` waits for that gradient.
    AT_Y = "at_y"


#: Every allowed change of phase (``None``: idle). Anything else is a bug, refused at once.
TRANSITIONS: dict[Phase | None, frozenset[Phase | None]] = {
    None: frozenset({None, Phase.PERTURBED, Phase.SKIPPED, Phase.ONE_PASS, Phase.SKIP_STEP, Phase.AT_Y}),
    Phase.PERTURBED: frozenset({None}),
    Phase.SKIPPED: frozenset({None}),
    Phase.ONE_PASS: frozenset({None}),
    Phase.SKIP_STEP: frozenset({None}),
    Phase.AT_Y: frozenset({None, Phase.PERTURBED, Phase.SKIP_STEP, Phase.ONE_PASS}),
}


class PhaseError(RuntimeError):
    """A change of phase outside :data:`TRANSITIONS` (an internal error, never a user's)."""


class Method:
    """A SAM-family rule over the engine contract (:class:`~sharpness.methods.contract.Engine`).

    The front provides ``param_groups`` (dicts with SAM's keys ``sam_rho``, ``sam_adaptive``,
    ``sam_eta``, ``sam_norm_weight`` and the base optimizer's), ``state`` (the base optimizer's per-parameter dicts, which the
    engines' vector operations can read and write), ``vectors`` (per-parameter dicts of the
    method's own vectors, kept apart from the base optimizer's state), ``sam_state`` (the method's scalars, saved in
    ``state_dict()["sam"]["state"]``), ``stats`` and ``generator``. A method overrides the hooks;
    the capability flags below say what the fronts must do for it.
    """

    param_groups: list[dict[str, Any]]
    state: Any
    vectors: Any
    sam_state: dict[str, Any]
    stats: Counter
    last_grad_norm: Any

    #: Why the method needs the true first gradient ("" where ``e`` does not depend on the loss
    #: scale): under a GradScaler its ``first_step`` must be given ``grad_scaler=scaler``.
    needs_unscaled_first_gradient: ClassVar[str] = ""
    #: Why the method needs the full backup of ``w`` ("" where it does not): it rebuilds points
    #: from the saved ``w`` between its moves (``weights_from_backup``), which ``memory="subtract"``
    #: (only bfloat16 offsets kept) cannot serve.
    needs_exact_backup: ClassVar[str] = ""
    #: The method's own keys in the parameter groups (filled in by :meth:`_setup_group`).
    group_keys: ClassVar[tuple[str, ...]] = ()
    #: Why a method cannot run under a GradScaler at all ("" where it can).
    grad_scaler_unsupported: ClassVar[str] = ""
    #: Whether the method's norms are SAM's (the engines' ``sum_of_squares``, which weigh each
    #: group by ``sam_norm_weight``); methods with norms of their own refuse weights other than 1.
    norm_weights_supported: ClassVar[bool] = True
    #: The gradient functions ``step`` takes after the front's own (a closure, or ``grad_fn``), by
    #: name, each optional: LETS's ``("val_fn",)``, the validation batch's. The fronts check them
    #: before anything moves and hand the given ones to :meth:`_after_whole_step`.
    step_functions: ClassVar[tuple[str, ...]] = ()
    #: It takes one gradient per step and never a second pass (Momentum-SAM: its perturbation comes
    #: before the gradient): its ``first_step`` always returns False.
    one_gradient_per_step: ClassVar[bool] = False
    #: For a method that takes its step through :meth:`_step_by_evaluations`: the gradients it
    #: takes, in words, for the fronts' messages ("four gradients per step").
    evaluations_per_step: ClassVar[str] = ""

    # Derived from which hooks a method overrides (``__init_subclass__``), so that no front ever
    # asks which method it has:
    #: it decides on the host value of ``‖g‖`` whether to take a second pass;
    decides_on_norm: ClassVar[bool] = False
    #: it turns ``g`` into another direction on its one-pass steps;
    rewrites_one_pass_gradient: ClassVar[bool] = False
    #: it perturbs as SAM does (no hook before or instead of ``engine.perturb``), so a norm kept
    #: on the device serves it.
    perturbs_like_sam: ClassVar[bool] = True
    #: it takes its whole step through :meth:`_step_by_evaluations` (``step(closure)`` or
    #: ``step(grad_fn)`` only; the fronts refuse ``first_step`` and ``second_step``).
    steps_by_evaluations: ClassVar[bool] = False
    #: it takes its first gradient elsewhere than at ``w``: its step starts with ``begin_step()``,
    #: which moves the weights there (:meth:`_begin_step`); ``first_step`` needs it before.
    begins_before_first_gradient: ClassVar[bool] = False
    #: it picks the samples of its second pass (:meth:`_second_pass_samples`, ESAM): its whole step
    #: hands the caller's function the sample indices and takes per-sample losses back (torch:
    #: ``closure(indices=None)`` runs the forward pass and returns them, the front back-propagates
    #: their mean; numpy: ``grad_fn(params, indices)`` returns them and the gradients of their mean).
    selects_samples: ClassVar[bool] = False
    #: it updates the weights itself (:meth:`_own_update`: AdaSAM, BayesianSAM) instead of a base
    #: optimizer's step: the fronts take no base optimizer (torch: no ``base_optimizer``; numpy: no
    #: ``base``), the parameter groups hold the method's own settings (its :attr:`group_keys`, ``lr``
    #: among them, which LR schedulers drive) and the state its vectors, and the base step is the hook.
    has_own_update: ClassVar[bool] = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Cooperative: a rule's __init__ checks its own arguments and passes the front's on.
        super().__init__(*args, **kwargs)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.decides_on_norm = cls._second_pass_due is not Method._second_pass_due
        cls.rewrites_one_pass_gradient = cls._one_pass_gradient is not Method._one_pass_gradient
        cls.perturbs_like_sam = (
            cls._before_perturbation is Method._before_perturbation and cls._perturb is Method._perturb
        )
        cls.steps_by_evaluations = cls._step_by_evaluations is not Method._step_by_evaluations
        cls.begins_before_first_gradient = cls._begin_step is not Method._begin_step
        cls.selects_samples = cls._second_pass_samples is not Method._second_pass_samples
        cls.has_own_update = cls._own_update is not Method._own_update

    def _check_norm_weights(self) -> None:
        """Refuses ``sam_norm_weight != 1`` for a method whose norms are its own (both fronts, at
        every step, before anything moves)."""
        if not self.norm_weights_supported and any(g.get("sam_norm_weight", 1.0) != 1.0 for g in self.param_groups):
            raise ValueError(f"{type(self).__name__} computes norms of its own: it does not support sam_norm_weight != 1")

    # -- checkpoints --------------------------------------------------------------------------------

    @classmethod
    def method_name(cls) -> str:
        """The method's name as checkpoints record it (the library's class, not a user's subclass)."""
        return next(c.__name__ for c in cls.__mro__ if c.__module__.startswith("sharpness."))

    def _check_checkpoint_method(self, sam: dict[str, Any]) -> None:
        """Refuses a checkpoint another method saved (its state would be read as this one's)."""
        saved = sam.get("method")
        if saved is not None and saved != self.method_name():
            raise ValueError(f"state_dict was saved by {saved}; this optimizer is {self.method_name()}")

    # -- the phase of the step ---------------------------------------------------------------------

    @property
    def _pending(self) -> Phase | None:
        return self.__dict__.get("_phase")

    @_pending.setter
    def _pending(self, phase: Phase | str | None) -> None:
        new = None if phase is None else Phase(phase)
        old = self.__dict__.get("_phase")
        if new not in TRANSITIONS[old]:
            raise PhaseError(f"a step cannot go from {old} to {new}")
        self.__dict__["_phase"] = new

    # -- what a method overrides -------------------------------------------------------------------

    def _setup_group(self, group: dict[str, Any]) -> None:
        """Fills in and checks the method's own keys of a parameter group (at construction, for an
        added group, after loading a checkpoint; the numpy front also at every call). Must be
        idempotent."""

    def _start_step(self) -> None:
        """Runs at the start of a step, before anything moves (GSAM sets ``ρ_t`` here)."""

    def _before_first_pass(self) -> bool:
        """Runs at the start of a whole step (``step(closure)``, ``step(grad_fn)``), before the
        first gradient is taken: the work a method's separate-call API asks for before the first
        forward pass (RandomSAM's ``add_noise()``; ``begin_step()`` for a method that
        :attr:`begins_before_first_gradient`). Returns whether it moved the weights: if the
        first gradient's call then raises, the front calls ``restore()``."""
        if self.begins_before_first_gradient:
            self.begin_step()
            return True
        return False

    def _begin_step(self, engines: Sequence[Engine]) -> None:
        """For a method whose first gradient is taken elsewhere than at ``w`` (SAMPa: at ``y``):
        saves ``w`` (``engine.save_weights()``) and moves the weights there. The fronts'
        ``begin_step()`` runs it at the start of a step (after the step pre-hooks and
        :meth:`_start_step`; ``w`` restored if it raises) and sets :attr:`_pending` to
        ``Phase.AT_Y``; their ``first_step`` then takes the gradient there and goes on from that
        phase (no second :meth:`_start_step`; ``restore()`` puts ``w`` back)."""

    def _first_gradient_function(self, fn: Any, more: tuple[Any, ...]) -> Any:
        """The gradient function a whole step (``step(fn, *more)``) takes its first gradient with:
        ``fn``; a method with one of its own among :attr:`step_functions` returns it when given
        (SAMPa's ``fn_y``, the batch at ``y``). ``more`` is ``()`` when none is given."""
        return fn

    def _checkpointed_vectors(self) -> tuple[str, ...]:
        """The names in :attr:`vectors` that checkpoints keep (``state_dict()["sam"]["vectors"]``);
        the others live within a step only."""
        return ()

    def _second_pass_due(self, grad_norm: float) -> bool:
        """Whether this step perturbs and takes a second gradient (SAM: always). Methods that skip
        the second pass on some steps decide here, from the step count or the norm."""
        return True

    def _second_pass_due_by_count(self) -> bool | None:
        """The same decision when it does not need the norm (every-k, LookSAM: the step count),
        or None. A one-pass step decided here skips the norm's memory pass."""
        return None

    def _first_gradient_taken(self, engines: Sequence[Engine]) -> None:
        """Runs in ``first_step`` as soon as the first gradient ``g`` is in the engines' ``"grads"``,
        before anything reads it (the norm, the decision, a GradScaler's unscaling). ESAM drops here
        the gradients of the tensors it leaves unperturbed (``engine.drop_gradients``)."""

    def _first_pass(self) -> AbstractContextManager[Any]:
        """What a front's whole step of a method that :attr:`selects_samples` runs the first forward
        and backward pass in (ESAM: :meth:`first_pass`, which draws the tensors to perturb and
        withholds the others' gradients). The torch front uses it; the numpy front, whose caller
        computes every gradient anyway, does not (the draw then happens in ``first_step``, after
        the call's checks, so that the call stays all or nothing)."""
        return nullcontext()

    def _second_pass_samples(self, losses: Any, losses_at_perturbed: Callable[[], Any]) -> Any:
        """For a method that :attr:`selects_samples`, in its whole step after ``first_step``: the
        sample indices the second pass uses (passed to the caller's function), or None for the
        whole batch. ``losses`` are the per-sample losses at ``w`` (a 1-d tensor or array, as the
        caller's function returned them); ``losses_at_perturbed()`` takes them at ``w + e``
        (without gradient; with ``same_noise``, in the first pass's random state)."""
        return None

    def _before_perturbation(self, engines: Sequence[Engine]) -> None:
        """Runs with the first gradient ``g`` in the engines' ``"grads"``, just before ``w ← w + e``."""

    def _perturb(self, engines: Sequence[Engine], norm: float) -> None:
        """Moves the weights to ``w + e`` (saving what restoration needs), ``g`` in ``"grads"`` and
        ``norm = ‖g‖`` finite. SAM: ``e = ρ g/(‖g‖ + ε)``."""
        for engine in engines:
            engine.perturb(self.param_groups, norm)

    def _before_base_step(self, engines: Sequence[Engine]) -> None:
        """Runs with the second gradient ``g̃`` in ``"grads"``, before the base step."""

    def _one_pass_gradient(self, engines: Sequence[Engine], grad_norm: float) -> None:
        """On a step without a second pass, turns ``g`` in ``"grads"`` into the update direction
        (``grad_norm`` is NaN when :meth:`_second_pass_due_by_count` decided without it)."""

    def _after_base_step(self, engines: Sequence[Engine]) -> None:
        """Runs after the base step of a perturbed step (WSAM's decoupled sharpness term)."""

    def _own_update(self, engines: Sequence[Engine]) -> None:
        """The step of a method with an update rule of its own, in place of the base optimizer's
        (overriding it sets :attr:`has_own_update`): the weights are at ``w`` (restored, bit for
        bit, after a perturbation) and ``"grads"`` holds the gradient to step with (``g̃``; on a
        step without a perturbation, the one given). The fronts call it wherever they would call
        the base optimizer."""

    def _after_whole_step(self, fn: Any, more: tuple[Any, ...]) -> None:
        """Runs at the end of ``step(fn, *more)`` when ``more`` (the functions named by
        :attr:`step_functions`, None where not given) holds any: ``fn`` is the front's gradient
        function, already used for the step. On the torch front the step's post-hooks follow."""

    def _step_by_evaluations(self, evaluate: Callable[..., tuple[Any, Sequence[Engine]]]) -> Any:
        """The whole step of a method that takes its gradients at points of its own choosing, more
        than SAM's two (GAM, CR-SAM: four, three; m-sharpness: two per micro-batch), written once
        over ``evaluate``. ``evaluate(*args)`` takes the loss and the gradient at the current
        weights, puts the gradient in the engines' ``"grads"`` and returns ``(loss, engines)``:
        the torch front runs ``closure(*args)`` (with ``same_noise``, every evaluation with the
        same ``args`` replays the random state of the first and leaves it where the first left
        it), the numpy front ``grad_fn(params, *args)``.

        The method moves the weights through the engine contract and returns the step's loss,
        leaving the update direction in ``"grads"`` and :attr:`_pending` saying how the front ends
        the step: ``Phase.PERTURBED`` (the weights moved from a saved ``w``: ``w`` is restored,
        then the base step), ``Phase.SKIPPED`` (nothing moved: the base optimizer's own step) or
        ``None`` (nothing moved: the plain base step). On an exception the front restores ``w``."""
        raise NotImplementedError

    # -- what the fronts provide -------------------------------------------------------------------

    def begin_step(self) -> None:
        """Starts a step of a method that :attr:`begins_before_first_gradient`: the step
        pre-hooks (torch front), :meth:`_start_step` and :meth:`_begin_step`. Each front
        implements it."""
        raise NotImplementedError(f"{type(self).__name__} needs a front that begins steps")

    def _gradients_at(self, fn: Any) -> tuple[Any, float, Sequence[Engine]]:
        """Calls a gradient function of the front's kind at the current weights (torch: a closure
        that zeroes the gradients, runs forward and backward and returns the loss, with gradients
        enabled; numpy: ``fn(params) -> (loss, grads)``), hands its gradients to the engines and
        returns ``(loss as fn gave it, its value as a float, engines)``. Each front implements it."""
        raise NotImplementedError(f"{type(self).__name__} needs a front that calls gradient functions")

    def _engines_with_gradients(self, grads: Any = None) -> Sequence[Engine]:
        """The engines, holding the gradient a method's own call (outside a step) works on: on the
        torch front the one in ``p.grad`` (``grads`` must be None), on the numpy front ``grads``
        (one array per parameter, checked as a step's; None raises ``ValueError``). Each front
        implements it (SSAM's Fisher sum and drop scores)."""
        raise NotImplementedError(f"{type(self).__name__} needs a front that holds gradients")

    def _host_array(self, value: Any, like: Any) -> Any:
        """``value``, an array the user gave for the parameter ``like`` (the front's kind: a tensor
        on any device, or anything numpy reads), as a host numpy array in the parameter's layout
        (real pairs for a complex one); ``ValueError`` when its shape is not that layout's. Each
        front implements it."""
        raise NotImplementedError(f"{type(self).__name__} needs a front that converts arrays")

    def _withheld_gradients(self, params: list[Any]) -> AbstractContextManager[Any]:
        """While the block runs, no gradient is computed for ``params`` (the front's own tensors or
        arrays), where the front can avoid it: the torch front turns their ``requires_grad`` off
        (backward skips them) and back on after. The numpy front cannot (its caller computes the
        gradients): nothing, this default."""
        return nullcontext()

    def _front_array(self, host: Any) -> Any:
        """A host numpy array (an engine's ``read``) as the front hands arrays to users: itself on
        the numpy front, a CPU tensor on the torch front. Each front implements it."""
        raise NotImplementedError(f"{type(self).__name__} needs a front that converts arrays")

    def _checked_step_functions(self, more: tuple[Any, ...]) -> tuple[Any, ...]:
        """The functions ``step`` was given after its own, checked against :attr:`step_functions`
        before anything moves; ``()`` when none is given (None stands for not given)."""
        name = type(self).__name__
        if len(more) > len(self.step_functions):
            most = 1 + len(self.step_functions)
            raise TypeError(f"{name}.step() takes {most} gradient function(s) at most, got {1 + len(more)}")
        for label, fn in zip(self.step_functions, more):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name}.step(): {label} must be callable, got {type(fn).__name__}")
        return more if any(fn is not None for fn in more) else ()

    def _drop_vectors(self, *names: str) -> None:
        """Forgets the method's vectors ``names`` (created at zero again on next use), so that a
        vector kept from one point of a step to a later one is neither kept nor checkpointed past it."""
        for entry in self.vectors.values():
            for name in names:
                entry.pop(name, None)

    # -- the two halves, written once --------------------------------------------------------------

    def _gradient_norm(self, engines: Sequence[Engine]) -> float:
        """``‖g‖`` over every engine (each group weighted by its ``sam_norm_weight``); NaN when a
        sum is not a number."""
        total = sum(float(engine.sum_of_squares(self.param_groups)) for engine in engines)
        return math.sqrt(total) if total >= 0 else math.nan

    def _perturb_or_skip(self, engines: Sequence[Engine], norm: float) -> Phase:
        """The perturbation of a step that takes a second pass: ``w ← w + e`` for a finite norm
        (undone if anything raises part-way), nothing for a non-finite one (counted)."""
        if not math.isfinite(norm):
            self.stats["nonfinite_skips"] += 1
            return Phase.SKIPPED
        with restored_on_failure(engines):
            self._before_perturbation(engines)
            self._perturb(engines, norm)
        return Phase.PERTURBED


@contextmanager
def restored_on_failure(engines: Sequence[Engine]) -> Iterator[None]:
    """Undoes whatever the engines moved when the block raises (an exception part-way through a
    perturbation, e.g. after the first of two engines moved its weights): the weights are ``w``
    again, bit for bit, before the exception goes on."""
    try:
        yield
    except BaseException:
        for engine in engines:
            engine.restore()
        raise
