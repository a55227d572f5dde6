"""The engine contract: every operation a method may call on an engine.

An engine serves the parameters of one kind of array (numpy arrays, CPU tensors in flat buffers,
tensors on any device through ``torch._foreach``, CUDA tensors through Triton, DTensor shards).
Vectors are named: ``"grads"`` (the gradients the engine holds), ``"weights"``, or a name in the
per-parameter ``state`` the front passes (created at zero on first use). Methods call only what
is listed here and never ask which engine they have.
"""

from __future__ import annotations

from typing import Any, Protocol


class Engine(Protocol):
    """What an engine offers (structural: engines do not inherit from it)."""

    #: True between a perturbation (or :meth:`save_weights`) and the restoration.
    perturbed: bool

    def begin(self) -> None:
        """Takes stock of the gradients (which parameters hold one) before anything moves."""

    def zero_grad(self, set_to_none: bool) -> None: ...

    def release(self) -> None:
        """Gives the parameters back their own storage (when the engine is rebuilt)."""

    def sum_of_squares(self, groups: list[dict[str, Any]]) -> Any:
        """``Σ c²‖g‖²`` over the groups with ``ρ ≠ 0`` (``Σ c²‖(|w|+η)g‖²`` for adaptive ones;
        ``c`` the group's ``sam_norm_weight``): a float, or a 0-d device tensor."""

    def perturb(self, groups: list[dict[str, Any]], norm: Any) -> None:
        """Saves what exact restoration needs, then ``w ← w + ρ·g/(norm+ε)`` per group
        (``ρ·T²g/(norm+ε)`` for adaptive groups; the sign flips where the group maximizes)."""

    def restore(self) -> None:
        """``w ←`` the saved weights, bit for bit (nothing when not perturbed)."""

    def can_fuse(self, base: Any, groups: list[dict[str, Any]]) -> bool:
        """Whether :meth:`restore_and_step` has a kernel for this base optimizer."""

    def restore_and_step(self, base: Any, groups: list[dict[str, Any]], synced: bool = False) -> None:
        """The restoration and the base optimizer's step with ``"grads"`` in one pass (in place
        when nothing is perturbed)."""

    def dot(self, a: str, b: str, state: Any) -> float:
        """``Σ a·b`` over every parameter."""

    def axpby(self, x: str, y: str, alpha: float, beta: float, state: Any) -> None:
        """``y ← alpha·x + beta·y`` (``x`` and ``y`` distinct)."""

    def copy(self, src: str, dst: str, state: Any) -> None:
        """``dst ← src``."""

    def mul(self, x: str, y: str, state: Any) -> None:
        """``y ← x ⊙ y`` elementwise."""

    def add_square(self, x: str, y: str, state: Any) -> None:
        """``y ← y + x ⊙ x`` elementwise (``y`` a state name)."""

    def save_weights(self) -> None:
        """``backup ← weights``, marking the weights as moved (:meth:`restore` brings them back)."""

    def weights_from_backup(self, direction: str, scales: dict[int, float], state: Any) -> None:
        """``weights ← backup + scales[g]·direction`` per group ``g`` (the backup where a group has
        no scale). Needs :meth:`save_weights` first."""

    def add_to_weights(self, direction: str, scales: dict[int, float], state: Any) -> None:
        """``w ← w + scales[g]·direction`` per group ``g``."""
