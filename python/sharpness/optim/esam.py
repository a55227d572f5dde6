"""ESAM: SAM with stochastic weight perturbation and sharpness-sensitive data selection.

Du, Yan, Feng, Zhou, Zhen, Goh, Tan, "Efficient Sharpness-aware Minimization for Improved
Training of Neural Networks", ICLR 2022 (arXiv:2110.03141; official code
github.com/dydjw9/Efficient_SAM). Two savings on SAM's step:

* Stochastic weight perturbation (SWP, ``β``): each parameter *tensor* is perturbed with
  probability ``β``, its perturbation scaled by ``1/β`` (so that ``E[m/β] = 1``). A tensor
  left out needs no first gradient, since SAM uses the first gradient only to build ``e``: its
  ``requires_grad`` is off during the first forward/backward pass, and autograd skips its weight
  gradient there. That is where the official code saves (it freezes the tensors drawn at the end
  of one step for the first pass of the next, and unfreezes all before the perturbation).
* Sharpness-sensitive data selection (SDS, ``γ``): the second pass (at ``w + e``) runs on the
  fraction ``γ`` of the batch whose loss rose most, ``L_i(w + e) − L_i(w)``; the per-sample losses
  at ``w + e`` take one extra forward pass without gradient. A base optimizer with
  ``maximize=True`` runs SAM on ``−L`` (the perturbation goes along ``−g``), so the ranking is by
  the rise of ``−L``, ``L_i(w) − L_i(w + e)``: maximising ``L`` is minimising ``−L``, step for step.

Every tensor, perturbed or not, steps with the second gradient ``∇L_{B⁺}(w + e)`` (the official
code unfreezes every tensor before the second pass and lets the base optimizer step on all).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from sharpness._validation import number
from sharpness.backends.rust import RustEngine
from sharpness.optim.sam import SAM, _RandomState


def _check_fraction(name: str, value: Any) -> float:
    return number(name, value, above=0, maximum=1)


class ESAM(SAM):
    r"""ESAM (Du et al., ICLR 2022, arXiv:2110.03141): SAM whose perturbation touches a random
    subset of the parameter tensors and whose second pass uses the samples that are sharpest.

    Each step, with ``S`` the tensors drawn (each with probability ``β``, from the optimizer's own
    ``generator``)::

        g   = ∇L_B(w)                   only for the tensors in S (requires_grad off for the rest)
        e_p = ρ g_p / (β (‖g_S‖ + 1e-12))   for p in S;  e_p = 0 otherwise
        B⁺  = the ⌊γ|B|⌋ samples (at least 1) with the largest L_i(w + e) − L_i(w)
              (maximize=True: the largest L_i(w) − L_i(w + e), the rise of −L)
        w   ← base_step(w, ∇L_{B⁺}(w + e))  for every tensor

    The norm is over the tensors in ``S`` only, as in the official code (the others have no
    gradient: computing ``‖g‖`` over all of them would spend what SWP saves); the perturbation
    then has norm ``ρ/β``. ``β = γ = 1`` is SAM bit for bit. ``sam_rho = 0`` groups are, as in
    SAM, neither in the norm nor perturbed. With ``adaptive=True`` the ASAM form is used on ``S``.

    **With a closure** (the usual way), ``step(closure)`` takes a closure of an optional index
    tensor that runs the *forward pass only* and returns the per-sample losses (shape ``[B]``,
    e.g. ``reduction="none"``) of the batch, or of the samples ``x[indices]`` when ``indices`` is
    given. The optimizer zeroes the gradients and calls ``backward`` on the mean itself. The
    closure runs at ``w`` (with the unselected tensors frozen), at ``w + e`` without gradient when
    ``γ < 1`` (all samples, to rank them), then at ``w + e`` on the selected samples. Returns the
    mean loss at ``w``. With ``same_noise`` the three calls see the same random state (dropout
    masks differ on the subset all the same: it has another shape).

    **In separate calls**, wrap the first forward/backward in :meth:`first_pass` (which draws
    ``S`` and freezes the other tensors; without it :meth:`first_step` draws ``S`` itself and
    discards their gradients: the same result, without the saving), and pick the samples with
    :meth:`select`::

        with opt.first_pass():
            losses = F.cross_entropy(model(x), y, reduction="none")
            losses.mean().backward()
        opt.first_step(zero_grad=True)
        with torch.no_grad():
            after = F.cross_entropy(model(x), y, reduction="none")
        idx = opt.select(losses.detach(), after)
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.second_step(zero_grad=True)

    Toggling ``requires_grad`` changes no layout: the flat buffers (``backend="rust"``) are built
    once, and a frozen parameter simply keeps a zero gradient view that the step ignores.

    Args:
        params, base_optimizer, rho, adaptive, eta, backend, same_noise, seed, **base_kwargs:
            as for :class:`sharpness.SAM`.
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
    """

    def __init__(self, params: Any, base_optimizer: Any, beta: float = 0.6, gamma: float = 0.5, **kwargs: Any) -> None:
        self.beta = _check_fraction("beta", beta)
        self.gamma = _check_fraction("gamma", gamma)
        super().__init__(params, base_optimizer, **kwargs)
        self._selection: list[bool] | None = None  # drawn for the coming first_step
        #: The sample indices the second pass of the last ``step(closure)`` used.
        self.last_selection: Tensor | None = None

    # -- stochastic weight perturbation -------------------------------------------------------------

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _draw(self) -> list[bool]:
        """Which tensors the coming perturbation touches: each with probability ``β``, from
        :attr:`generator` (nothing is drawn when ``β = 1``)."""
        params = self._params()
        if self.beta == 1.0:
            return [True] * len(params)
        u = torch.rand(len(params), generator=self.generator, dtype=torch.float64)
        return (u < self.beta).tolist()

    @contextmanager
    def first_pass(self) -> Iterator[list[bool]]:
        """Wrap the first forward and backward pass in it: draws the tensors to perturb and turns
        ``requires_grad`` off for the others until the block ends, so that backward computes no
        gradient for them. Yields the selection (one flag per parameter, in group order)."""
        if self._pending is not None:
            raise RuntimeError("first_pass() between first_step() and second_step()")
        if self._selection is None:
            self._selection = self._draw()
        frozen = [p for p, keep in zip(self._params(), self._selection) if not keep and p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        try:
            yield list(self._selection)
        finally:
            for p in frozen:
                p.requires_grad_(True)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, grad_scaler: Any = None) -> bool:
        """As :meth:`SAM.first_step`, on the tensors drawn (by :meth:`first_pass`, or here): the
        others' first gradients are dropped (``grad = None``), so they are neither in the norm nor
        perturbed; the perturbation is scaled by ``1/β``."""
        if self._pending is None:
            selection = self._selection if self._selection is not None else self._draw()
            self._selection = None
            for p, keep in zip(self._params(), selection):
                if not keep:
                    p.grad = None
            self.stats["esam_perturbed_tensors"] += sum(selection)
        return super().first_step(zero_grad, grad_scaler)

    @torch.no_grad()
    def _before_perturbation(self, engines: list) -> None:
        if self.beta == 1.0:
            return
        inv = 1.0 / self.beta  # e = ρ/(‖g_S‖+ε) · (g/β): the norm is taken, scale the gradient
        for engine in engines:
            if isinstance(engine, RustEngine):
                engine.buffers.grads.mul_(inv)  # absent gradients are zero views: they stay zero
            else:
                grads = [p.grad for p in engine.params if p.grad is not None]
                if grads:
                    torch._foreach_mul_(grads, inv)

    def state_dict(self) -> dict[str, Any]:
        """As :meth:`SAM.state_dict` (the generator included, so the draws resume where they
        were); refused between :meth:`first_pass` and :meth:`first_step`, whose draw it would lose."""
        if self._selection is not None:
            raise RuntimeError("state_dict() between first_pass() and first_step(): take it after the step")
        return super().state_dict()

    # -- sharpness-sensitive data selection ---------------------------------------------------------

    def select(self, loss_before: Tensor, loss_after: Tensor) -> Tensor:
        """The indices (ascending) of the ``⌊γ·B⌋`` samples (at least 1) whose loss rose most from
        ``w`` to ``w + e``: ``loss_after − loss_before``, both of shape ``[B]`` (ties go to the
        earlier samples). All of them, in order, when ``γ = 1``. (The official code keeps those
        strictly above the ``k``-th largest rise, one fewer; here exactly ``k``.) When the base
        optimizer maximizes (its groups have ``maximize=True``), the objective is ``−L``: the samples whose loss fell most,
        ``loss_before − loss_after``, are kept. Groups that mix ``maximize`` have no one
        objective to rank by: ``ValueError`` (when ``γ < 1``)."""
        if loss_before.dim() != 1 or loss_before.shape != loss_after.shape:
            raise ValueError(
                f"select() needs two per-sample loss vectors of one shape [B], got "
                f"{tuple(loss_before.shape)} and {tuple(loss_after.shape)}"
            )
        n = loss_before.numel()
        k = max(1, math.floor(self.gamma * n + 1e-9))
        if k >= n:
            return torch.arange(n, device=loss_before.device)
        maximize = {bool(group.get("maximize", False)) for group in self.param_groups}
        if len(maximize) > 1:
            raise ValueError(
                "ESAM's data selection (gamma < 1) ranks the samples by the rise of one objective, "
                "but the parameter groups mix maximize=True and maximize=False"
            )
        rise = loss_after.detach() - loss_before.detach()
        if True in maximize:  # the perturbation ascends −L: rank by the rise of −L
            rise = -rise
        order = torch.sort(rise, descending=True, stable=True).indices  # ties: earlier samples first
        return order[:k].sort().values

    # -- the whole step with a closure --------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[..., Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """A whole ESAM step with a closure of the sample indices returning per-sample losses (see
        the class docstring), or the second half after :meth:`first_step` without one."""
        if closure is None:
            return super().step()
        return self._hooked_step(closure, self._esam_step)

    step.hooked = True  # type: ignore[attr-defined]

    def _losses(self, closure: Callable[..., Tensor], indices: Tensor | None) -> Tensor:
        losses = closure(indices)
        if not isinstance(losses, Tensor) or losses.dim() != 1:
            raise ValueError(
                "the ESAM closure must return the per-sample losses, a tensor of shape [B] "
                "(use reduction='none'), got "
                + (f"shape {tuple(losses.shape)}" if isinstance(losses, Tensor) else type(losses).__name__)
            )
        return losses

    def _backward(self, closure: Callable[..., Tensor], indices: Tensor | None, first: bool = False) -> Tensor:
        self.zero_grad()
        with torch.enable_grad():
            losses = self._losses(closure, indices)
            if not (first and not losses.requires_grad):  # no tensor drawn: no first gradient
                losses.mean().backward()
        return losses.detach()

    def _esam_step(self, closure: Callable[..., Tensor]) -> Tensor:
        noise = _RandomState.capture(self._devices()) if self.same_noise else None
        with self.first_pass():
            before = self._backward(closure, None, first=True)
        self.first_step()  # always True: ESAM has no one-pass steps
        after_first = _RandomState.capture(self._devices()) if noise is not None else None
        try:
            indices = None
            if self.gamma < 1.0:
                if noise is not None:
                    noise.restore()
                after = self._losses(closure, None)  # under no_grad: ranking only
                indices = self.select(before, after)
            if noise is not None:
                noise.restore()
            self._backward(closure, indices)
        except BaseException:
            self.restore()  # never leave the weights perturbed behind an exception
            raise
        finally:
            if after_first is not None:
                after_first.restore()
        self.last_selection = indices if indices is not None else torch.arange(before.numel(), device=before.device)
        self.second_step()
        return before.mean()
