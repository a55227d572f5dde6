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
from collections.abc import Iterator
from contextlib import contextmanager
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
    #: SAMPa: the weights are at ``y``, waiting for ``∇f(y)``.
    AT_Y = "at_y"


#: Every allowed change of phase (``None``: idle). Anything else is a bug, refused at once.
TRANSITIONS: dict[Phase | None, frozenset[Phase | None]] = {
    None: frozenset({None, Phase.PERTURBED, Phase.SKIPPED, Phase.ONE_PASS, Phase.SKIP_STEP, Phase.AT_Y}),
    Phase.PERTURBED: frozenset({None}),
    Phase.SKIPPED: frozenset({None}),
    Phase.ONE_PASS: frozenset({None}),
    Phase.SKIP_STEP: frozenset({None}),
    Phase.AT_Y: frozenset({None, Phase.PERTURBED, Phase.SKIP_STEP}),
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
    #: The method's own keys in the parameter groups (filled in by :meth:`_setup_group`).
    group_keys: ClassVar[tuple[str, ...]] = ()
    #: Why a method cannot run under a GradScaler at all ("" where it can).
    grad_scaler_unsupported: ClassVar[str] = ""
    #: Whether the method's norms are SAM's (the engines' ``sum_of_squares``, which weigh each
    #: group by ``sam_norm_weight``); methods with norms of their own refuse weights other than 1.
    norm_weights_supported: ClassVar[bool] = True

    # Derived from which hooks a method overrides (``__init_subclass__``), so that no front ever
    # asks which method it has:
    #: it decides on the host value of ``‖g‖`` whether to take a second pass;
    decides_on_norm: ClassVar[bool] = False
    #: it turns ``g`` into another direction on its one-pass steps;
    rewrites_one_pass_gradient: ClassVar[bool] = False
    #: it perturbs as SAM does (no hook before or instead of ``engine.perturb``), so a norm kept
    #: on the device serves it.
    perturbs_like_sam: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.decides_on_norm = cls._second_pass_due is not Method._second_pass_due
        cls.rewrites_one_pass_gradient = cls._one_pass_gradient is not Method._one_pass_gradient
        cls.perturbs_like_sam = (
            cls._before_perturbation is Method._before_perturbation and cls._perturb is Method._perturb
        )

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

    def _before_perturbation(self, engines: list[Engine]) -> None:
        """Runs with the first gradient ``g`` in the engines' ``"grads"``, just before ``w ← w + e``."""

    def _perturb(self, engines: list[Engine], norm: float) -> None:
        """Moves the weights to ``w + e`` (saving what restoration needs), ``g`` in ``"grads"`` and
        ``norm = ‖g‖`` finite. SAM: ``e = ρ g/(‖g‖ + ε)``."""
        for engine in engines:
            engine.perturb(self.param_groups, norm)

    def _before_base_step(self, engines: list[Engine]) -> None:
        """Runs with the second gradient ``g̃`` in ``"grads"``, before the base step."""

    def _one_pass_gradient(self, engines: list[Engine], grad_norm: float) -> None:
        """On a step without a second pass, turns ``g`` in ``"grads"`` into the update direction
        (``grad_norm`` is NaN when :meth:`_second_pass_due_by_count` decided without it)."""

    def _after_base_step(self, engines: list[Engine]) -> None:
        """Runs after the base step of a perturbed step (WSAM's decoupled sharpness term)."""

    # -- the two halves, written once --------------------------------------------------------------

    def _gradient_norm(self, engines: list[Engine]) -> float:
        """``‖g‖`` over every engine (each group weighted by its ``sam_norm_weight``); NaN when a
        sum is not a number."""
        total = sum(float(engine.sum_of_squares(self.param_groups)) for engine in engines)
        return math.sqrt(total) if total >= 0 else math.nan

    def _perturb_or_skip(self, engines: list[Engine], norm: float) -> Phase:
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
def restored_on_failure(engines: list[Engine]) -> Iterator[None]:
    """Undoes whatever the engines moved when the block raises (an exception part-way through a
    perturbation, e.g. after the first of two engines moved its weights): the weights are ``w``
    again, bit for bit, before the exception goes on."""
    try:
        yield
    except BaseException:
        for engine in engines:
            engine.restore()
        raise
