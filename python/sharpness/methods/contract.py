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
    #: Whether the engine holds only shards of its parameters (DTensor): the operations that need
    #: whole parameters (:meth:`add_filter_noise`'s per-filter norms) are not available there.
    shards_parameters: bool
    #: The parameters the engine serves, in its order (the front's own arrays or tensors, as in
    #: its ``param_groups``): what :meth:`read` and :meth:`write` list one entry for.
    params: list[Any]

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

    def group_dots(self, a: str, b: str, state: Any) -> dict[int, float]:
        """``Σ a·b`` per parameter group, by group index (the groups this engine serves; summed
        across ranks where the parameters are sharded), over the parameters :meth:`dot` covers."""

    def state_sums_of_squares(self, name: str, state: Any) -> dict[int, float] | None:
        """``Σ‖state[p][name]‖²`` per group, by group index, over every trainable parameter the engine
        serves, gradient or not (summed across ranks where the parameters are sharded): a vector the
        base optimizer keeps (Momentum-SAM's momentum buffer). None when a trainable parameter does
        not hold it (yet): it is never created here, so the base optimizer still starts it its own way."""

    def scale_adaptive(self, x: str, groups: list[dict[str, Any]], state: Any) -> None:
        """``x ← T²⊙x``, ``T = |w|+η``, on the adaptive groups with ``ρ ≠ 0`` (ASAM's direction
        ``T²g`` from ``g``); the other groups' entries unchanged."""

    def mean_over_ranks(self, values: list[float]) -> list[float] | None:
        """Host scalars (each rank's loss) averaged over the ranks the parameters are sharded
        across; None where one process holds them whole (nothing to average)."""

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

    def axpby_by_group(self, x: str, y: str, alphas: dict[int, float], beta: float, state: Any) -> None:
        """``y ← alphas[g]·x + beta·y`` over the parameters of each group ``g`` in ``alphas`` (the
        other groups untouched; ``x`` and ``y`` distinct; into ``"grads"``, only parameters that
        hold a gradient)."""

    def add_filter_noise(self, into: str, scales: dict[int, float], generator: Any, state: Any) -> None:
        """Filter-wise relative noise, added to the weights. Over the trainable parameters of the
        groups ``g`` with ``scales[g] ≠ 0``, in order, ``z ~ N(0, I)`` is drawn from ``generator``
        (the front's: ``torch.Generator`` or ``numpy.random.Generator``) as one vector per engine;
        then per parameter ``into ← scales[g]·‖w[i]‖·z[i]`` for each output unit ``i`` (the slices
        along dim 0 of a parameter with more than one dimension; the whole parameter otherwise) and
        ``w ← w + into``. ``into`` is 0 elsewhere. Refused where :attr:`shards_parameters`."""

    def read(self, name: str, state: Any) -> list[Any]:
        """Host copies of ``name`` (``"grads"``, ``"weights"`` or a state name, created at zero),
        one numpy array per parameter of :attr:`params`: float64 for float64 parameters, else
        float32; a complex parameter as its real pairs; zeros for a gradient a parameter lacks.
        Not available where :attr:`shards_parameters`."""

    def write(self, name: str, values: list[Any], state: Any) -> None:
        """``name ← values`` (a state name, created at zero), one entry per parameter
        of :attr:`params`: a host numpy array of the shape :meth:`read` gives (rounded to the
        vector's dtype), a number (filled in), or None (left as it is). Every shape is checked
        (``ValueError``) before anything is written. Not available where :attr:`shards_parameters`."""

    def elementwise(
        self,
        fn: Any,
        names: list[str],
        state: Any,
        every: bool = False,
        init: dict[str, float] | None = None,
        generator: Any = None,
    ) -> None:
        """A method's own elementwise arithmetic (AdaSAM's moments, BayesianSAM's scale and noise):
        ``fn(xp, group, *arrays)`` over the parameters that hold a gradient (``every``: every
        trainable parameter), called once per run of them within a group (per parameter, or per
        run of a flat buffer: ``fn`` acts elementwise, so the runs do not matter). ``xp`` is the
        engine's array namespace, ``numpy`` or ``torch`` (``xp.sqrt``, ``xp.abs``, ``xp.clip``,
        ``xp.maximum(a, b, out=a)`` mean the same in both), ``group`` the group's index, and
        ``arrays`` the named vectors over the run, of one dtype (a complex parameter as its real
        pairs), which ``fn`` updates in place (``a *= c``, ``a += b``). A name is ``"weights"``,
        ``"grads"`` (read only), ``"backup"`` (what :meth:`save_weights` keeps), ``"noise"`` (a
        fresh ``z ~ N(0, I)`` from ``generator``, the front's, over the covered parameters in
        order: one ``torch.randn`` on the CPU, float64 for float64 parameters, else float32; on the
        numpy engine one ``standard_normal(n, dtype)`` in the arrays' dtype; refused where
        :attr:`shards_parameters`) or a state name (created at zero, or at ``init[name]``). Written
        with single operations (``*``, ``/``, ``+``, ``xp.sqrt``), ``fn`` gives the numpy engine's
        numbers on the flat one to the last bit but for torch's vectorised CPU ``sqrt``, which can be
        an ulp off the correctly rounded root numpy takes."""

    def draw_uniform(self, count: int, generator: Any) -> Any:
        """``count`` numbers uniform in ``[0, 1)``, float32, on the host (a numpy array), drawn from
        ``generator`` (the front's: ``torch.rand`` from a ``torch.Generator``,
        ``Generator.random`` from a numpy one)."""

    def drop_gradients(self, keep: list[bool]) -> None:
        """Drops the gradient of each parameter of :attr:`params` whose flag in ``keep`` is False
        (one flag per parameter, after :meth:`begin`): it holds none until the next gradient comes
        in (torch's ``grad is None``; zeros on the numpy engine), so that neither the norm nor the
        perturbation touches it (ESAM's tensors left unperturbed)."""

    def scale(self, x: str, factor: float, state: Any) -> None:
        """``x ← factor·x`` (``"grads"``: the gradients parameters hold; or a state name), rounded
        to ``x``'s dtype as torch's ``mul_`` by a Python float does."""
