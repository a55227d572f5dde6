"""Bayesian SAM (bSAM): SAM as an optimal relaxation of Bayes.

Möllenhoff, Khan, "SAM as an Optimal Relaxation of Bayes", ICLR 2023, arXiv:2210.01620
(official code: github.com/team-approx-bayes/bayesian-sam). The Bayes objective over a Gaussian
posterior ``N(θ, diag(1/(N s)))`` relaxed by Fenchel biconjugates gives SAM's min-max with an
adaptive, Adam-like scale ``s`` that also sets the posterior's spread. One step (Algorithm 1)::

    ε ~ N(0, 1/(N s))                      # noise with the posterior's variance
    g   = ∇L(θ + ε)                        # first forward/backward, at a posterior sample
    e   = ρ g/s                            # elementwise
    g_e = ∇L(θ + e)                        # second forward/backward
    g_m ← β₁ g_m + (1−β₁)(g_e + δ θ)
    s   ← β₂ s + (1−β₂)(√s·|g| + δ + γ)
    θ   ← θ − α g_m/s

``N`` is the number of training examples, ``δ`` the prior precision (weight decay) and ``γ`` a
damping; ``s`` starts at ``s₀``. The posterior mean ``θ`` is what one evaluates; its spread
``1/√(N s)`` is what one samples for predictive uncertainty (:meth:`BayesianSAM.posterior_std`).

Two departures of the official code from Algorithm 1, kept out on purpose (Algorithm 1 is the
reference here): the code steps ``θ`` with the old ``s`` and updates ``s`` after, and it splits
every batch into 8 sub-batches, each with its own noise and perturbation, averaging ``g_e`` and
``√s·|g|`` over them (m-sharpness, which drives ``s`` up faster than the whole-batch ``√s·|g|``).
Its ``δ`` is the prior precision divided by ``N``, with ``N`` the dataset size times the
augmentation factor (4 on CIFAR), ≈ 5e-5 there; its CIFAR runs use ``α = 0.5``, ``ρ = 0.01``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from sharpness._validation import pair
from sharpness.backends.torch_foreach import real_view
from sharpness.optim._standalone import StandaloneSAM, check_positive

_S, _GM = "bsam_s", "bsam_gm"

_HOW_TO_CALL = (
    "call BayesianSAM with a closure, `optimizer.step(closure)` (it runs at θ + noise, then at "
    "θ + e), or in three calls: `optimizer.begin_step(); loss_fn(model(x), y).backward(); "
    "optimizer.first_step(zero_grad=True); loss_fn(model(x), y).backward(); optimizer.second_step(zero_grad=True)`"
)


class BayesianSAM(StandaloneSAM):
    r"""Bayesian SAM (Möllenhoff & Khan, ICLR 2023, arXiv:2210.01620): a standalone optimizer
    whose Adam-like scale ``s`` sets both the perturbation and the posterior's spread.

    Algorithm (the paper's Algorithm 1)::

        ε ~ N(0, 1/(N s))                  # from the optimizer's own generator
        g   = ∇L(θ + ε)                    # first forward/backward
        e   = ρ g/s                        # elementwise
        g_e = ∇L(θ + e)                    # second forward/backward
        g_m ← β₁ g_m + (1−β₁)(g_e + δ θ)
        s   ← β₂ s + (1−β₂)(√s |g| + δ + γ)
        θ   ← θ − lr g_m/s                 # from the exact saved θ

    The noise is drawn from :attr:`generator` (saved in ``state_dict``): one
    ``torch.randn(n)`` per engine over its parameters in order, in their dtype, so a run
    resumed from a checkpoint draws the same noise. ``s`` and ``g_m`` are per-parameter state
    (``bsam_s``, starting at ``s_init``, and ``bsam_gm``). Every trainable parameter is sampled;
    parameters without a gradient are not updated. ``rho = 0`` is the noisy Adam-like
    variational method without the SAM step (the update only, at a posterior sample).

    Args:
        params: parameters or parameter groups.
        num_data: ``N``, the number of training examples (sets the noise, ``1/√(N s)``).
        lr: ``α`` (0.1).
        rho: ``ρ`` (0.05).
        betas: ``(β₁, β₂)`` ((0.9, 0.999)).
        weight_decay: ``δ``, the prior precision (1e-4).
        damping: ``γ`` (0.1).
        s_init: ``s₀`` (1.0).
        backend, same_noise, seed: as for :class:`sharpness.SAM`.

    Example:
        >>> import torch, sharpness
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = sharpness.BayesianSAM(model.parameters(), num_data=8, lr=0.1, rho=0.05, seed=0)
        >>> x, y = torch.randn(8, 4), torch.randn(8, 2)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> loss = opt.step(closure)  # at θ + noise, then at θ + ρ g/s
        >>> opt.posterior_std()[0][0].shape == model.weight.shape
        True
    """

    norm_weights_supported = False  # its own norms (see SAM.norm_weights_supported)
    needs_unscaled_first_gradient = "its scale s accumulates |g| of the first gradient, which would be scaled"

    def __init__(
        self,
        params: Any,
        num_data: int,
        lr: float = 0.1,
        rho: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 1e-4,
        damping: float = 0.1,
        s_init: float = 1.0,
        backend: str = "auto",
        same_noise: bool = True,
        seed: int | None = None,
    ) -> None:
        num_data = check_positive("num_data", num_data, allow_zero=False)
        lr = check_positive("lr", lr)
        weight_decay = check_positive("weight_decay", weight_decay)
        damping = check_positive("damping", damping)
        s_init = check_positive("s_init", s_init, allow_zero=False)
        b1, b2 = pair("betas", betas, minimum=0, below=1)
        self._noisy = False
        super().__init__(
            params, rho=rho, backend=backend, same_noise=same_noise, seed=seed, lr=lr, betas=(b1, b2),
            weight_decay=weight_decay, damping=damping, num_data=float(num_data), s_init=float(s_init),
        )

    def _s_init(self) -> dict[str, float]:
        return {_S: self.defaults["s_init"]}

    # -- the three phases ------------------------------------------------------------------------------

    @torch.no_grad()
    def begin_step(self) -> None:
        """Saves ``θ`` and moves every trainable parameter to a posterior sample ``θ + ε``,
        ``ε ~ N(0, 1/(N s))``; the first forward/backward follows."""
        if self._noisy or self._pending is not None:
            raise RuntimeError("begin_step() called again before the step completed; " + _HOW_TO_CALL)
        engines = self._begin()
        for engine in engines:
            engine.save_weights()
            p0 = real_view(engine.params[0])  # complex parameters: their real pairs, as everywhere
            n = sum(real_view(p).numel() for p in engine.params)
            noise = torch.randn(n, generator=self.generator, dtype=p0.dtype).to(p0.device)
            for gi, (w, s, z) in engine.group_tensors(
                ["weights", _S, noise], self.state, init=self._s_init(), every=True
            ).items():
                std = torch._foreach_mul(s, self.param_groups[gi]["num_data"])
                torch._foreach_sqrt_(std)
                torch._foreach_addcdiv_(w, z, std)
        self._noisy = True

    def _ascend(self, engines: list) -> bool:
        if not self._noisy:
            raise RuntimeError("first_step() needs begin_step() before the first backward; " + _HOW_TO_CALL)
        self._noisy = False
        for engine in engines:  # back to θ (the backup), every sampled parameter
            for _, (w, b) in engine.group_tensors(["weights", "backup"], self.state, every=True).items():
                torch._foreach_copy_(w, b)
        if not math.isfinite(self._sq(engines)):
            return False  # weights at θ, marked moved: second_step restores (a no-op) and updates
        for group, (w, g, s) in self._tensors(engines, ["weights", "grads", _S], init=self._s_init()):
            if group["sam_rho"] != 0:
                torch._foreach_addcdiv_(w, g, s, value=group["sam_rho"])  # θ + ρ g/s
            b2 = group["betas"][1]
            t = torch._foreach_sqrt(s)  # s ← β₂ s + (1−β₂)(√s |g| + δ + γ)
            torch._foreach_mul_(t, torch._foreach_abs(g))
            torch._foreach_add_(t, group["weight_decay"] + group["damping"])
            torch._foreach_mul_(s, b2)
            torch._foreach_add_(s, t, alpha=1 - b2)
        return True

    def _update(self, engines: list) -> None:
        for group, (w, g, s, gm) in self._tensors(engines, ["weights", "grads", _S, _GM], init=self._s_init()):
            b1 = group["betas"][0]
            d = torch._foreach_add(g, w, alpha=group["weight_decay"])  # g_e + δθ
            torch._foreach_mul_(gm, b1)
            torch._foreach_add_(gm, d, alpha=1 - b1)
            torch._foreach_addcdiv_(w, gm, s, value=-group["lr"])

    # -- the closure step, and never leaving a sample behind --------------------------------------------

    def _closure_step(self, closure: Callable[[], Tensor]) -> Tensor:
        self.begin_step()
        try:
            return super()._closure_step(closure)
        except BaseException:
            self.restore()
            raise

    @torch.no_grad()
    def restore(self) -> bool:
        """Undoes a pending :meth:`begin_step` or :meth:`first_step`: ``θ`` back bit for bit."""
        if self._noisy:
            self._noisy = False
            for engine in self.engines():
                engine.restore()
            return True
        return super().restore()

    def posterior_std(self) -> list[list[Tensor]]:
        """``1/√(N s)`` per group, one tensor per parameter that has ``s`` (the posterior's
        standard deviation, for sampling predictions). For a complex parameter, one per real
        coordinate: the tensor has the shape of ``torch.view_as_real(p)``."""
        out = []
        for group in self.param_groups:
            out.append(
                [
                    (1.0 / (group["num_data"] * real_view(self.state[p][_S])).sqrt())
                    for p in group["params"]
                    if _S in self.state[p]
                ]
            )
        return out

    def state_dict(self) -> dict[str, Any]:
        if self._noisy:
            raise RuntimeError("state_dict() after begin_step(): the weights hold a posterior sample; take it after the step")
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._noisy:
            raise RuntimeError("load_state_dict() after begin_step()")
        super().load_state_dict(state_dict)
