"""ESAM: SAM with stochastic weight perturbation and sharpness-sensitive data selection, written
once for both fronts (:class:`sharpness.ESAM`, :class:`sharpness.numpy.ESAM`).

Du, Yan, Feng, Zhou, Zhen, Goh, Tan, "Efficient Sharpness-aware Minimization for Improved
Training of Neural Networks", ICLR 2022 (arXiv:2110.03141; official code
github.com/dydjw9/Efficient_SAM). Two savings on SAM's step:

* Stochastic weight perturbation (SWP, ``β``): each parameter *tensor* is perturbed with
  probability ``β``, its perturbation scaled by ``1/β`` (so that ``E[m/β] = 1``). A tensor
  left out needs no first gradient, since SAM uses the first gradient only to build ``e``: on the
  torch front its ``requires_grad`` is off during the first forward/backward pass, and autograd
  skips its weight gradient there. That is where the official code saves (it freezes the tensors
  drawn at the end of one step for the first pass of the next, and unfreezes all before the
  perturbation).
* Sharpness-sensitive data selection (SDS, ``γ``): the second pass (at ``w + e``) runs on the
  fraction ``γ`` of the batch whose loss rose most, ``L_i(w + e) − L_i(w)``; the per-sample losses
  at ``w + e`` take one extra forward pass without gradient. A base optimizer with
  ``maximize=True`` runs SAM on ``−L`` (the perturbation goes along ``−g``), so the ranking is by
  the rise of ``−L``, ``L_i(w) − L_i(w + e)``: maximising ``L`` is minimising ``−L``, step for step.

Every tensor, perturbed or not, steps with the second gradient ``∇L_{B⁺}(w + e)`` (the official
code unfreezes every tensor before the second pass and lets the base optimizer step on all).

The rule runs over the engine contract: the draw is ``engine.draw_uniform`` from the front's
``generator``, the tensors left out lose their first gradient by ``engine.drop_gradients``,
``1/β`` is ``engine.scale``. What differs between the fronts is how a whole step calls the
caller's function (a closure of the sample indices returning per-sample losses; a ``grad_fn`` of
the parameters and the sample indices) and whether a gradient can be left uncomputed: the
fronts' ``selects_samples`` steps and their ``_withheld_gradients``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from sharpness._validation import number
from sharpness.methods.base import Method
from sharpness.methods.contract import Engine

__all__ = ["ESAM"]


def _fraction(name: str, value: Any) -> float:
    return number(name, value, above=0, maximum=1)


class ESAM(Method):
    r"""ESAM (Du et al., ICLR 2022, arXiv:2110.03141): SAM whose perturbation touches a random
    subset of the parameter tensors and whose second pass uses the samples that are sharpest.

    Each step, with ``S`` the tensors drawn (each with probability ``β``: one float32 uniform draw
    per tensor, in parameter order, from the optimizer's own ``generator``, torch's or numpy's)::

        g   = ∇L_B(w)                   only for the tensors in S (torch: requires_grad off for the rest)
        e_p = ρ g_p / (β (‖g_S‖ + 1e-12))   for p in S;  e_p = 0 otherwise
        B⁺  = the ⌊γ|B|⌋ samples (at least 1) with the largest L_i(w + e) − L_i(w)
              (maximize=True: the largest L_i(w) − L_i(w + e), the rise of −L)
        w   ← base_step(w, ∇L_{B⁺}(w + e))  for every tensor

    The norm is over the tensors in ``S`` only, as in the official code (the others have no
    gradient: computing ``‖g‖`` over all of them would spend what SWP saves); the perturbation
    then has norm ``ρ/β``. ``β = γ = 1`` is SAM bit for bit. ``sam_rho = 0`` groups are, as in
    SAM, neither in the norm nor perturbed. With ``adaptive=True`` the ASAM form is used on ``S``.

    **With a closure** (torch, the usual way), ``step(closure)`` takes a closure of an optional
    index tensor that runs the *forward pass only* and returns the per-sample losses (shape
    ``[B]``, e.g. ``reduction="none"``) of the batch, or of the samples ``x[indices]`` when
    ``indices`` is given. The optimizer zeroes the gradients and calls ``backward`` on the mean
    itself. The closure runs at ``w`` (with the unselected tensors frozen), at ``w + e`` without
    gradient when ``γ < 1`` (all samples, to rank them), then at ``w + e`` on the selected samples.
    Returns the mean loss at ``w``. With ``same_noise`` the three calls see the same random state
    (dropout masks differ on the subset all the same: it has another shape). On the numpy front,
    ``step(grad_fn)`` calls ``grad_fn(params, indices)`` (``indices`` None for the whole batch, else
    an integer array) for ``(per-sample losses, gradients of their mean)``, at the same three points
    (the ranking call's gradients are not used) and returns the mean loss at ``w``.

    **In separate calls**, wrap the first forward/backward in :meth:`first_pass` (which draws
    ``S`` and, on the torch front, freezes the other tensors; without it :meth:`first_step` draws
    ``S`` itself and discards their gradients: the same result, without the saving), and pick the
    samples with :meth:`select`::

        with opt.first_pass():
            losses = F.cross_entropy(model(x), y, reduction="none")
            losses.mean().backward()
        opt.first_step(zero_grad=True)
        with torch.no_grad():
            after = F.cross_entropy(model(x), y, reduction="none")
        idx = opt.select(losses.detach(), after)
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.second_step(zero_grad=True)

    (numpy: ``opt.first_step(grads)``, ``idx = opt.select(losses, after)``,
    ``opt.second_step(grads_on_idx)``; :meth:`first_pass` yields which arrays the first gradient
    needs, the others' entries of ``grads`` are ignored.)

    Toggling ``requires_grad`` changes no layout: the flat buffers (``backend="rust"``) are built
    once, and a frozen parameter simply keeps a zero gradient view that the step ignores.

    Args:
        params, rho, adaptive, eta, and the front's own arguments: as for :class:`sharpness.SAM`
            (torch: ``base_optimizer``, ``backend``, ``same_noise``, ``seed``, ``**base_kwargs``)
            or :class:`sharpness.numpy.SAM` (``base``, ``seed``, ``**base_kwargs``).
        beta: ``β``, the probability that a tensor is perturbed (official CIFAR runs: 0.5-0.6).
        gamma: ``γ``, the fraction of the batch kept for the second pass (official: 0.5).

    Example:
        >>> import torch, sharpness
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> opt = sharpness.ESAM(model.parameters(), torch.optim.SGD, beta=0.6, gamma=0.5, rho=0.05, lr=0.1, seed=0)
        >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        >>> def closure(indices=None):
        ...     xb, yb = (x, y) if indices is None else (x[indices], y[indices])
        ...     return torch.nn.functional.cross_entropy(model(xb), yb, reduction="none")
        >>> loss = opt.step(closure)  # forward at w, ranking forward at w + e, 8 samples at w + e
        >>> opt.last_selection.numel()
        8

        The numpy front, on least squares (per-sample losses ``½ r_i²``):

        >>> import numpy as np, sharpness.numpy
        >>> rng = np.random.default_rng(0)
        >>> X, t = rng.normal(size=(16, 3)), rng.normal(size=16)
        >>> def grad_fn(params, indices=None):
        ...     Xb, tb = (X, t) if indices is None else (X[indices], t[indices])
        ...     r = Xb @ params[0] - tb
        ...     return 0.5 * r**2, [Xb.T @ r / len(tb)]
        >>> np_opt = sharpness.numpy.ESAM([np.zeros(3)], beta=1.0, gamma=0.25, rho=0.05, lr=0.1, seed=0)
        >>> loss = np_opt.step(grad_fn)
        >>> len(np_opt.last_selection)
        4
    """

    def __init__(self, *args: Any, beta: float = 0.6, gamma: float = 0.5, **kwargs: Any) -> None:
        self.beta = beta
        self.gamma = gamma
        # Per parameter (in group order), whether the coming perturbation touches it: drawn by
        # first_pass() for the first_step that follows, None otherwise.
        self._drawn: list[bool] | None = None
        #: The sample indices the second pass of the last whole step (``step(closure)``,
        #: ``step(grad_fn)``) used, as :meth:`select` returns them.
        self.last_selection: Any = None
        super().__init__(*args, **kwargs)

    @property
    def beta(self) -> float:
        """``β``, the probability that a tensor is perturbed (checked when set)."""
        return self._beta

    @beta.setter
    def beta(self, value: float) -> None:
        self._beta = _fraction("beta", value)

    @property
    def gamma(self) -> float:
        """``γ``, the fraction of the batch the second pass keeps (checked when set)."""
        return self._gamma

    @gamma.setter
    def gamma(self, value: float) -> None:
        self._gamma = _fraction("gamma", value)

    # -- stochastic weight perturbation -------------------------------------------------------------

    def _parameters(self) -> list[Any]:
        return [p for group in self.param_groups for p in group["params"]]

    def _draw(self, engines: Sequence[Engine]) -> list[bool]:
        """Per parameter, in group order, whether the coming perturbation touches it: one uniform
        draw each from :attr:`generator` below ``β`` (nothing is drawn when ``β = 1``)."""
        count = len(self._parameters())
        if self.beta == 1.0:
            return [True] * count
        return (engines[0].draw_uniform(count, self.generator) < self.beta).tolist()  # type: ignore[attr-defined]

    @contextmanager
    def first_pass(self) -> Iterator[list[bool]]:
        """Wrap the first forward and backward pass in it: draws the tensors to perturb and, on the
        torch front, turns ``requires_grad`` off for the others until the block ends, so that
        backward computes no gradient for them (the numpy front's caller may skip them itself).
        Yields the selection (one flag per parameter, in group order)."""
        if self._pending is not None:
            raise RuntimeError("first_pass() between first_step() and second_step()")
        if self._drawn is None:
            self._drawn = self._draw(self.engines())  # type: ignore[attr-defined]
        keep = self._drawn
        with self._withheld_gradients([p for p, k in zip(self._parameters(), keep) if not k]):
            yield list(keep)

    def _first_pass(self) -> Any:
        return self.first_pass()

    def _first_gradient_taken(self, engines: Sequence[Engine]) -> None:
        # The tensors drawn (by first_pass, or now) keep their gradient; the others' is dropped,
        # so that they are neither in the norm nor perturbed.
        keep = self._drawn if self._drawn is not None else self._draw(engines)
        self._drawn = None
        if not all(keep):
            kept = {id(p): k for p, k in zip(self._parameters(), keep)}
            for engine in engines:
                flags = [kept[id(p)] for p in engine.params]
                if not all(flags):
                    engine.drop_gradients(flags)
        self.stats["esam_perturbed_tensors"] += sum(keep)

    def _before_perturbation(self, engines: Sequence[Engine]) -> None:
        # e = ρ/(‖g_S‖+ε) · (g/β): the norm is taken, scale the gradient.
        if self.beta != 1.0:
            for engine in engines:
                engine.scale("grads", 1.0 / self.beta, self.vectors)

    def state_dict(self) -> dict[str, Any]:
        """The front's ``state_dict`` (the generator included, so the draws resume where they
        were); refused between :meth:`first_pass` and :meth:`first_step`, whose draw it would lose."""
        if self._drawn is not None:
            raise RuntimeError("state_dict() between first_pass() and first_step(): take it after the step")
        return super().state_dict()  # type: ignore[misc]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The front's ``load_state_dict``; refused between :meth:`first_pass` and
        :meth:`first_step` (the step would use a draw from before the checkpoint)."""
        if self._drawn is not None:
            raise RuntimeError("load_state_dict() between first_pass() and first_step(): finish the step first")
        super().load_state_dict(state_dict)  # type: ignore[misc]

    # -- sharpness-sensitive data selection ---------------------------------------------------------

    def select(self, loss_before: Any, loss_after: Any) -> Any:
        """The indices (ascending) of the ``⌊γ·B⌋`` samples (at least 1) whose loss rose most from
        ``w`` to ``w + e``: ``loss_after − loss_before``, both of shape ``[B]`` (tensors on the torch
        front, arrays on the numpy one; ties go to the earlier samples, NaN ranks first). All of
        them, in order, when ``γ = 1``. (The official code keeps those strictly above the ``k``-th
        largest rise, one fewer; here exactly ``k``.) When the base optimizer maximizes (its groups
        have ``maximize=True``), the objective is ``−L``: the samples whose loss fell most,
        ``loss_before − loss_after``, are kept. Groups that mix ``maximize`` have no one objective
        to rank by: ``ValueError`` (when ``γ < 1``). Returns the indices as an int64 CPU tensor
        (torch front; it indexes tensors on any device) or numpy array."""
        shape_before, shape_after = tuple(getattr(loss_before, "shape", ())), tuple(getattr(loss_after, "shape", ()))
        if len(shape_before) != 1 or shape_before != shape_after:
            raise ValueError(
                f"select() needs two per-sample loss vectors of one shape [B], got {shape_before} and {shape_after}"
            )
        n = shape_before[0]
        k = max(1, math.floor(self.gamma * n + 1e-9))
        if k >= n:
            return self._indices(range(n))
        maximize = {bool(group.get("maximize", False)) for group in self.param_groups}
        if len(maximize) > 1:
            raise ValueError(
                "ESAM's data selection (gamma < 1) ranks the samples by the rise of one objective, "
                "but the parameter groups mix maximize=True and maximize=False"
            )
        # The rise in the losses' own dtype; maximize: the rise of −L (the perturbation ascends −L).
        rise = (loss_before - loss_after if True in maximize else loss_after - loss_before).tolist()
        order = sorted(range(n), key=lambda i: (not math.isnan(rise[i]), -rise[i]))  # stable: ties keep their order
        return self._indices(sorted(order[:k]))

    def _second_pass_samples(self, losses: Any, losses_at_perturbed: Callable[[], Any]) -> Any:
        indices = self.select(losses, losses_at_perturbed()) if self.gamma < 1.0 else None
        self.last_selection = self._indices(range(losses.shape[0])) if indices is None else indices
        return indices

    def _indices(self, indices: Any) -> Any:
        """Sample indices as the front hands arrays out: int64, a CPU tensor or a numpy array."""
        return self._front_array(np.asarray(list(indices), dtype=np.int64))
