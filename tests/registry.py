"""The methods, once, for the tests that run every method (in the spirit of torch's
``OptimizerInfo`` database): one :class:`MethodInfo` per method configuration, read by every
cross-cutting test instead of a table of its own.

An entry names the class (the same name on both fronts: ``sharpness.<Name>``, i.e.
``sharpness.optim.<Name>``, and ``sharpness.numpy.<Name>``), its hyperparameters (valid on both
fronts; settings only the torch front has go to ``torch_hparams``) and the few facts the classes do
not say themselves. Everything else is derived from the rule's capability flags
(:class:`sharpness.methods.base.Method`): whether it updates the weights itself (no base
optimizer), takes one-pass steps, needs ``first_step(grad_scaler=)``, runs under a GradScaler at
all, steps only through ``step(closure)``, starts its step before the first gradient, and how a
step is driven (:attr:`MethodInfo.drive`).

Tests that need another setting of a method keep a clearly named override keyed by
:attr:`MethodInfo.label` and pass it to :meth:`MethodInfo.torch` / :meth:`MethodInfo.numpy`.

Imports no torch (``tests/numpy_without_torch.py`` reads it where torch is not installed): the
torch front is reached only when :meth:`MethodInfo.torch` is called.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from sharpness.methods import every_method
from sharpness.methods.base import Method

#: How a test drives a whole step of a method (``step(...)`` on either front):
#: ``closure``: ``step(closure)`` (numpy: ``step(grad_fn)``);
#: ``micro``: ``step(closure)`` with ``closure(i)`` the gradient of the ``i``-th micro-batch;
#: ``per_sample``: ``step(closure)`` with ``closure(indices=None)`` returning per-sample losses;
#: ``validation``: ``step(closure, val_closure)``, the second on a validation batch;
#: ``fisher``: ``closure``, the mask set now and then from per-sample Fisher scores (SSAM-F);
#: ``dynamic``: ``closure``, the mask dropped and grown now and then (SSAM-D).
#: A test that does not exercise the masks drives ``fisher`` and ``dynamic`` as ``closure``.
DRIVES = ("closure", "micro", "per_sample", "validation", "fisher", "dynamic")

_RULES: dict[str, type] = {"SAM": Method, **every_method()}

#: The public call a two-call step starts with, before the first forward pass, for a rule that
#: does work there (overrides ``_before_first_pass``) without beginning its step at another point
#: (``begins_before_first_gradient``, whose call is ``begin_step()``).
STARTS_WITH = {"RandomSAM": "add_noise"}


def _overrides(rule: type, hook: str) -> bool:
    return getattr(rule, hook) is not getattr(Method, hook)


@dataclass(frozen=True, eq=False)
class MethodInfo:
    """One configuration of one method."""

    #: Unique name of the configuration ("sam", "asam", "wsam-coupled", ...): test ids, overrides.
    label: str
    #: The class's name on both fronts.
    name: str
    #: Hyperparameters, valid on both fronts (a standalone method's ``lr`` among them).
    hparams: dict[str, Any] = field(default_factory=dict)
    #: Settings the torch front alone takes (``memory="subtract"``).
    torch_hparams: dict[str, Any] = field(default_factory=dict)
    #: How a step is driven (one of :data:`DRIVES`); derived when not given.
    drive_as: str | None = None
    #: Its steps draw random numbers (each front from its own generator: numpy's, torch's).
    draws: bool = False
    #: Its randomness is drawn per engine: a model split over two engines draws other numbers.
    draws_per_engine: bool = False
    #: Refused on DTensor (FSDP2) shards, with an error naming DTensor (it ranks or draws over
    #: whole tensors).
    refused_on_shards: bool = False
    #: Settings an SGD base must have for the method (Momentum-SAM: a momentum buffer), added where
    #: a test's base is SGD and does not set them itself.
    sgd_needs: dict[str, Any] = field(default_factory=dict)

    # -- derived from the rule's capability flags -------------------------------------------------

    @property
    def rule(self) -> type:
        """The front-independent class (:class:`~sharpness.methods.base.Method` for SAM)."""
        return _RULES[self.name]

    @property
    def own_update(self) -> bool:
        """It updates the weights itself: no base optimizer on either front."""
        return self.rule.has_own_update

    @property
    def two_call(self) -> bool:
        """It has the two-call API (``first_step`` / ``second_step``), not ``step(closure)`` only."""
        return not self.rule.steps_by_evaluations

    @property
    def one_pass(self) -> bool:
        """Some of its steps take no second pass (``first_step`` returns False)."""
        return self.rule.decides_on_norm

    @property
    def second_pass(self) -> bool:
        """Some of its steps take a second gradient after ``first_step`` (all but Momentum-SAM's)."""
        return not self.rule.one_gradient_per_step

    @property
    def one_pass_by_count(self) -> bool:
        """Its one-pass steps are fixed by the step count (LookSAM, every-k)."""
        return _overrides(self.rule, "_second_pass_due_by_count")

    @property
    def grad_scaler(self) -> bool:
        """It runs under a ``torch.amp.GradScaler``."""
        return not self.rule.grad_scaler_unsupported

    @property
    def needs_scaler_keyword(self) -> bool:
        """Under a GradScaler its ``first_step`` must be given ``grad_scaler=scaler``."""
        return bool(self.rule.needs_unscaled_first_gradient)

    @property
    def norm_weights(self) -> bool:
        """It accepts ``sam_norm_weight`` other than 1 in its groups."""
        return self.rule.norm_weights_supported

    @property
    def begins_step(self) -> bool:
        """Its step starts with ``begin_step()``, before the first gradient."""
        return self.rule.begins_before_first_gradient

    @property
    def before_first_pass(self) -> str:
        """The public method to call before the first forward pass of a two-call step ("" if none)."""
        return "begin_step" if self.begins_step else STARTS_WITH.get(self.name, "")

    @property
    def checkpointed_vectors(self) -> bool:
        """It keeps vectors of its own in checkpoints (``state_dict()["sam"]["vectors"]``)."""
        return _overrides(self.rule, "_checkpointed_vectors")

    @property
    def drive(self) -> str:
        """How a whole step is driven (:data:`DRIVES`)."""
        if self.drive_as is not None:
            return self.drive_as
        rule = self.rule
        if rule.selects_samples:
            return "per_sample"
        if "val_fn" in rule.step_functions:
            return "validation"
        if hasattr(rule, "fisher_from"):
            return "fisher"
        if hasattr(rule, "update_mask"):
            return "dynamic"
        return "closure"

    @property
    def restores_exactly(self) -> bool:
        """Restoration puts ``w`` back bit for bit (``memory="exact"``, the default)."""
        return self.torch_hparams.get("memory", "exact") == "exact"

    @property
    def torch_only(self) -> bool:
        """A configuration the numpy front cannot take (on it, another entry's duplicate)."""
        return bool(self.torch_hparams)

    # -- builders ---------------------------------------------------------------------------------

    def torch(self, params: Any, base: Any = None, backend: str = "auto", base_kwargs: dict | None = None, **overrides: Any):
        """``sharpness.<name>`` over ``params``: ``base`` (a ``torch.optim.Optimizer`` class) with
        ``base_kwargs``, both ignored for a method with its own update; ``overrides`` replace the
        entry's hyperparameters."""
        import torch

        import sharpness.optim

        cls = getattr(sharpness.optim, self.name)
        kwargs = {**self.hparams, **self.torch_hparams, **overrides}
        if self.own_update:
            return cls(params, backend=backend, **kwargs)
        needs = self.sgd_needs if base is torch.optim.SGD else {}
        return cls(params, base, backend=backend, **{**needs, **(base_kwargs or {}), **kwargs})

    def numpy(self, arrays: Any, base: str | None = None, base_kwargs: dict | None = None, **overrides: Any):
        """``sharpness.numpy.<name>`` over ``arrays``: base ``base`` ("sgd", "adam", "adamw"; None:
        the front's default) with ``base_kwargs``, both ignored for a method with its own update;
        ``overrides`` replace the entry's hyperparameters."""
        import sharpness.numpy

        cls = getattr(sharpness.numpy, self.name)
        kwargs = {**self.hparams, **overrides}
        if self.own_update:
            return cls(arrays, **kwargs)
        if base is not None:
            kwargs["base"] = base
        needs = self.sgd_needs if base in (None, "sgd") else {}
        return cls(arrays, **{**needs, **(base_kwargs or {}), **kwargs})

    def __repr__(self) -> str:
        return f"MethodInfo({self.label!r}: {self.name}{self.hparams})"


ENTRIES: tuple[MethodInfo, ...] = (
    MethodInfo("sam", "SAM", dict(rho=0.1)),
    MethodInfo("asam", "SAM", dict(rho=0.5, adaptive=True)),
    MethodInfo("sam-subtract", "SAM", dict(rho=0.1), torch_hparams=dict(memory="subtract")),
    MethodInfo("looksam", "LookSAM", dict(k=2, alpha=0.7, rho=0.1)),
    MethodInfo("looksam-relative", "LookSAM", dict(k=2, alpha=0.5, rho=0.1, variant="relative")),
    MethodInfo("everyk", "EveryKSAM", dict(k=2, rho=0.1)),
    # λ₁ = λ₂ = 1: c_t = 1 throughout, a mix of both kinds of step on the tests' batches
    MethodInfo("aesam", "AESAM", dict(total_steps=8, lam1=1.0, lam2=1.0, rho=0.1)),
    MethodInfo("msam", "MSharpnessSAM", dict(micro_batches=2, rho=0.1), drive_as="micro"),
    MethodInfo("esam", "ESAM", dict(beta=0.6, gamma=0.5, rho=0.1, seed=0), draws=True),
    MethodInfo("sampa", "SAMPa", dict(rho=0.1, lam=0.2)),
    MethodInfo("momentum-sam", "MomentumSAM", dict(rho=0.3), sgd_needs=dict(momentum=0.9)),
    MethodInfo("gsam", "GSAM", dict(rho=0.1, rho_min=0.02, alpha=0.3)),
    MethodInfo("friendly", "FriendlySAM", dict(rho=0.1, sigma=1.0, lam=0.9)),
    MethodInfo("wsam", "WSAM", dict(rho=0.1, gamma=0.9)),
    MethodInfo("wsam-coupled", "WSAM", dict(rho=0.1, gamma=0.8, decouple=False)),
    MethodInfo("rsam", "RandomSAM", dict(rho=0.1, sigma=1e-2, seed=0), draws=True, draws_per_engine=True, refused_on_shards=True),
    MethodInfo("monge", "MongeSAM", dict(rho=0.1)),
    MethodInfo("ssamf", "SSAMF", dict(rho=0.1, sparsity=0.5, seed=0), refused_on_shards=True),
    MethodInfo("ssamd", "SSAMD", dict(rho=0.1, sparsity=0.5, seed=0), draws=True, refused_on_shards=True),
    MethodInfo("gam", "GAM", dict(rho=0.1)),
    MethodInfo("crsam", "CRSAM", dict(rho=0.1)),
    MethodInfo("lets", "LETS", dict(rho=0.1, rho_lr=0.5)),
    MethodInfo("lets-asam", "LETS", dict(rho=0.3, rho_lr=0.5, adaptive=True)),
    MethodInfo("lightsam", "LightSAM", dict(lr=0.1, rho=0.1)),
    MethodInfo("lightsam-adagrad", "LightSAM", dict(lr=0.1, rho=0.1, variant="adagrad")),
    MethodInfo("lightsam-adam", "LightSAM", dict(lr=1e-2, rho=0.1, variant="adam")),
    MethodInfo("adasam", "AdaSAM", dict(lr=1e-2, rho=0.1)),
    MethodInfo(
        "bsam", "BayesianSAM", dict(num_data=64, lr=0.1, rho=0.05, seed=0), draws=True, draws_per_engine=True,
        refused_on_shards=True,
    ),
)

_BY_LABEL = {entry.label: entry for entry in ENTRIES}
assert len(_BY_LABEL) == len(ENTRIES), "labels must be unique"


def get(label: str) -> MethodInfo:
    """The entry with this label."""
    return _BY_LABEL[label]


def entries(where: Callable[[MethodInfo], bool] | None = None) -> list[MethodInfo]:
    """The entries (those ``where`` accepts), in registry order."""
    return [entry for entry in ENTRIES if where is None or where(entry)]


def labels(where: Callable[[MethodInfo], bool] | None = None) -> list[str]:
    """The labels of :func:`entries`: pytest parameters and ids."""
    return [entry.label for entry in entries(where)]


def by_class() -> dict[str, MethodInfo]:
    """Each class's first entry, by class name."""
    first: dict[str, MethodInfo] = {}
    for entry in ENTRIES:
        first.setdefault(entry.name, entry)
    return first


def method_name(opt: Any) -> str:
    """The library class an optimizer of either front is (its name)."""
    return opt.method_name()


def begin(opt: Any) -> None:
    """What a two-call step of ``opt`` starts with, before the first forward pass (RandomSAM's
    ``add_noise()``, ``begin_step()`` where the method begins its step there; nothing for the
    others)."""
    call = by_class()[method_name(opt)].before_first_pass
    if call:
        getattr(opt, call)()


def cases(
    where: Callable[[MethodInfo], bool] | None, bases: Iterable[str], own: str | None = None
) -> list[tuple[str, str | None]]:
    """``(label, base)`` pairs: each entry ``where`` accepts with each of ``bases``, a method with
    its own update once, with ``own`` as its base."""
    out: list[tuple[str, str | None]] = []
    for entry in entries(where):
        out.extend([(entry.label, own)] if entry.own_update else [(entry.label, b) for b in bases])
    return out
