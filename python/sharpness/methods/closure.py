"""What the methods that take their gradients through the whole-step call share (GAM, CR-SAM,
m-sharpness): ``step(closure)`` on the torch front, ``step(grad_fn)`` on the numpy front, several
gradient evaluations per step at points the method chooses (:meth:`Method._step_by_evaluations`).

Such a method has no ``first_step``/``second_step`` and cannot run under a GradScaler (a scaler
cannot run a closure). Its coefficients live in ``sam_state``, so checkpoints keep them (a
checkpoint's values win when it is loaded) and a checkpoint without them is refused."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

from sharpness.methods.base import Method
from sharpness.methods.contract import Engine


def coefficient(name: str, doc: str) -> property:
    """A coefficient kept in ``sam_state[name]``, read and set (checked) as an attribute."""

    def get(self: ClosureDrivenMethod) -> float:
        return self.sam_state[name]

    def set_(self: ClosureDrivenMethod, value: Any) -> None:
        self.sam_state[name] = self._check_coefficients({name: value})[name]

    return property(get, set_, doc=doc)


class ClosureDrivenMethod(Method):
    """The base of the methods that take their whole step through :meth:`_step_by_evaluations`."""

    grad_scaler_unsupported = "it takes its gradients through step(closure), which a GradScaler cannot run"
    #: The method's coefficients, kept in ``sam_state`` (checkpointed).
    coefficients: ClassVar[tuple[str, ...]] = ()
    #: Why the method has no ASAM form ("" where it has one).
    adaptive_unsupported: ClassVar[str] = ""
    #: Why the method has no ``maximize`` form ("" where it has one).
    maximize_unsupported: ClassVar[str] = ""

    @staticmethod
    def _check_coefficients(values: dict[str, Any]) -> dict[str, Any]:
        """The coefficients ``values`` checked and normalised (a method with coefficients overrides it)."""
        return values

    def _keep_coefficients(self, values: dict[str, Any]) -> None:
        """Stores the checked coefficients in ``sam_state`` (after the front's constructor made it)."""
        self.sam_state.update(values)

    def _setup_group(self, group: dict[str, Any]) -> None:
        name = type(self).__name__
        if self.adaptive_unsupported and group.get("sam_adaptive"):
            raise ValueError(f"{name} has no adaptive (ASAM) form: {self.adaptive_unsupported}")
        if self.maximize_unsupported and group.get("maximize"):
            raise ValueError(f"{name} does not support maximize=True: {self.maximize_unsupported}")

    def _check_groups(self) -> None:
        """The settings, checked again at every step before anything moves (the torch front checks
        its groups only when they are made, and a user may change them since)."""
        for group in self.param_groups:
            self._setup_group(group)
            if not self.norm_weights_supported and group.get("sam_norm_weight", 1.0) != 1.0:
                raise ValueError(f"{type(self).__name__} computes norms of its own: it does not support sam_norm_weight != 1")

    @staticmethod
    def _norm(engines: Sequence[Engine], name: str, vectors: Any) -> float:
        """``‖name‖`` over every parameter of every engine (unweighted); NaN when not a number."""
        total = sum(float(engine.dot(name, name, vectors)) for engine in engines)
        return math.sqrt(total) if total >= 0 else math.nan

    def load_state_dict(self, state_dict: Any) -> None:
        """The front's ``load_state_dict``, after checking that the checkpoint holds the method's
        coefficients (``state_dict["sam"]["state"]``): nothing is loaded when it does not."""
        checked = None
        if self.coefficients and isinstance(state_dict, dict):
            sam = state_dict.get("sam")
            saved = sam.get("state") if isinstance(sam, dict) else None
            missing = [n for n in self.coefficients if not isinstance(saved, dict) or n not in saved]
            if missing:
                raise ValueError(
                    f"state_dict lacks {type(self).__name__}'s coefficients "
                    f"(state_dict['sam']['state']: {', '.join(missing)}); it was not made by one"
                )
            assert isinstance(saved, dict)  # (missing is empty)
            checked = self._check_coefficients({n: saved[n] for n in self.coefficients})
        super().load_state_dict(state_dict)  # type: ignore[misc]
        if checked is not None:
            self.sam_state.update(checked)
