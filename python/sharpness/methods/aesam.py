"""AE-SAM: a SAM step only where the loss surface looks sharp, a plain step elsewhere.

Jiang, Yang, Zhang, Kwok, "An Adaptive Policy to Employ Sharpness-Aware Minimization",
ICLR 2023 (arXiv:2304.14647), Algorithm 1. The squared norm of the stochastic gradient is the
sharpness signal; its running mean and variance are exponential moving averages with rate ``δ``:

    x_t  = ‖g_t‖²
    μ_t  = δ·μ_{t−1} + (1 − δ)·x_t                      (μ_{−1} = 0)
    σ²_t = δ·σ²_{t−1} + (1 − δ)·(x_t − μ_t)²            (σ²_{−1} = 1e−10; uses the new μ_t)
    c_t  = (t/T)·λ₁ + (1 − t/T)·λ₂                      (t = 0 … T; t/T held at 1 after T)
    SAM step      if x_t ≥ μ_t + c_t·σ_t,
    plain step    otherwise (the base optimizer with g_t: one gradient pass).

The statistics are updated on every step, SAM or not, before the decision. With the paper's
``λ₁ = −1 < λ₂ = 1``, ``c_t`` falls from ``λ₂`` to ``λ₁``: early in training SAM fires only on
unusually large gradients (about 16% of steps if ``x_t`` were normal), late in training on all
but unusually small ones (about 84%), about half of all steps over a run.

The rule is written once here and runs on both fronts (:class:`sharpness.AESAM` over torch
tensors, :class:`sharpness.numpy.AESAM` over numpy arrays).
"""

from __future__ import annotations

import math
from typing import Any

from sharpness._validation import number
from sharpness.methods.base import Method

__all__ = ["AESAM"]

#: σ²_{−1}: a tiny positive variance, so the first threshold is finite and well defined.
VAR_INIT = 1e-10


def threshold_coefficient(t: int, total_steps: int, lam1: float, lam2: float) -> float:
    """``c_t = (t/T)·λ₁ + (1 − t/T)·λ₂`` with ``t/T`` clipped to ``[0, 1]``."""
    frac = min(max(t / total_steps, 0.0), 1.0)
    return frac * lam1 + (1.0 - frac) * lam2


class AESAM(Method):
    r"""AE-SAM (Jiang et al., ICLR 2023, arXiv:2304.14647): SAM only on the steps whose squared
    gradient norm is high relative to its running statistics, a plain base step otherwise.

    Each step::

        x  = ‖g‖²                         # g: the first gradient, the norm SAM computes anyway
        μ  ← δ μ + (1−δ) x;   σ² ← δ σ² + (1−δ)(x − μ)²
        c  = (t/T) λ₁ + (1 − t/T) λ₂
        x ≥ μ + c σ ?  SAM step (second pass at w + e)  :  base step with g (one pass)

    ``μ`` starts at 0 and ``σ²`` at 1e−10; both are updated on every step before the decision.
    A larger ``c`` means fewer SAM steps: ``λ₁ = λ₂ ≪ 0`` (say −1e9) is SAM, ``≫ 0`` the base
    optimizer.

    :meth:`first_step` returns whether a second pass must follow; on the other steps it has
    taken the whole (plain) step itself (torch front: given ``grad_scaler=``, it leaves that step
    to ``scaler.step(opt)``, and ``x`` is the unscaled ``‖g‖²``). ``step(closure)`` (numpy:
    ``step(grad_fn)``) handles both.

    Notes:
        * ``x`` is the square of the norm SAM perturbs with: over the groups with ``sam_rho > 0``
          only (a group with ``sam_rho = 0`` is in neither the norm nor the decision), and the
          ASAM norm ``‖T g‖`` when ``adaptive=True``.
        * The decision is taken on the host: on a GPU the norm is brought to the CPU once per step
          (one synchronisation; SAM's ``first_step`` already makes it).
        * A non-finite norm takes SAM's non-finite path (no perturbation, the base step with the
          gradients of the second pass) and leaves ``μ``, ``σ²`` untouched.
        * ``μ``, ``σ²``, the step count ``t`` and the number of SAM steps live in
          ``sam_state`` (``"mu"``, ``"var"``, ``"step"``, ``"sam_steps"``) and are checkpointed
          by ``state_dict()`` (under ``"sam"``, on both fronts).

    Args:
        params, adaptive, eta, and the front's own arguments: as for :class:`sharpness.SAM`
            (torch: ``base_optimizer``, ``backend`` ...) or :class:`sharpness.numpy.SAM`
            (``base=``, ...).
        total_steps: ``T``, the number of steps the schedule of ``c_t`` spans (the whole run);
            after ``T`` steps ``c_t`` stays at ``λ₁``.
        delta: the rate ``δ`` of the moving averages (paper: 0.9).
        lam1: ``λ₁ = c_T``, the coefficient at the end of the run (paper: −1).
        lam2: ``λ₂ = c_0``, the coefficient at the start of the run (paper: 1).

    Example:
        >>> import torch, sharpness
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = sharpness.AESAM(model.parameters(), torch.optim.SGD, total_steps=20, rho=0.05, lr=0.1)
        >>> x, y = torch.randn(8, 4), torch.randn(8, 2)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> for _ in range(20):
        ...     loss = opt.step(closure)  # the closure runs twice on SAM steps, once otherwise
        >>> 0 < opt.sam_state["sam_steps"] < 20
        True

        The numpy front, the same rule::

        >>> import numpy as np, sharpness.numpy
        >>> w = np.zeros(3)
        >>> opt = sharpness.numpy.AESAM([w], total_steps=20, rho=0.05, lr=0.1)
        >>> for t in range(20):
        ...     loss = opt.step(lambda p: (float(np.sum((p[0] - 1) ** 2)), [2 * (p[0] - 1) * (1 + t % 3)]))
        >>> opt.sam_state["step"]
        20
    """

    needs_unscaled_first_gradient = (
        "its threshold compares ‖g‖² with statistics of earlier steps (taken at other loss scales), and "
        "its one-pass steps must be left to scaler.step()"
    )

    def __init__(
        self, *args: Any, total_steps: int, delta: float = 0.9, lam1: float = -1.0, lam2: float = 1.0, **kwargs: Any
    ) -> None:
        self.total_steps = number("total_steps", total_steps, minimum=1, integer=True)
        self.delta = number("delta", delta, minimum=0, below=1)
        self.lam1 = number("lam1", lam1)
        self.lam2 = number("lam2", lam2)
        super().__init__(*args, **kwargs)
        self.sam_state.update(mu=0.0, var=VAR_INIT, sam_steps=0)

    def threshold_coefficient(self, t: int | None = None) -> float:
        """``c_t`` at step ``t`` (default: the coming step)."""
        t = self.sam_state["step"] if t is None else t
        return threshold_coefficient(t, self.total_steps, self.lam1, self.lam2)

    def _second_pass_due(self, grad_norm: float) -> bool:
        state, d = self.sam_state, self.delta
        x = grad_norm * grad_norm
        mu = d * state["mu"] + (1.0 - d) * x
        var = d * state["var"] + (1.0 - d) * (x - mu) ** 2
        state["mu"], state["var"] = mu, var
        due = x >= mu + self.threshold_coefficient() * math.sqrt(var)
        if due:
            state["sam_steps"] += 1
        return due
