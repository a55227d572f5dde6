"""Monge SAM: SAM in the loss surface's own (Monge) metric, written once for both fronts
(:class:`sharpness.MongeSAM`, :class:`sharpness.numpy.MongeSAM`).

Jacobsen, Arvanitidis, "Monge SAM: Robust Reparameterization-Invariant Sharpness-Aware
Minimization Based on Loss Geometry", 2025 (arXiv:2502.08448). The ball SAM searches is Euclidean,
so sharpness changes under a reparametrisation. Monge SAM measures it with the metric that the
graph of the loss induces, ``G = I + ∇L ∇Lᵀ``: the worst point of ``{e : eᵀGe ≤ ρ²}`` to first
order is ``ρ G⁻¹g/√(gᵀG⁻¹g)``, and ``G⁻¹g = g/(1 + ‖g‖²)`` (Sherman-Morrison) gives the closed form

    e = ρ g / (‖g‖ √(1 + ‖g‖²)),

SAM's ``e`` shrunk by ``1/√(1 + ‖g‖²)``: SAM where the gradient is small, gradient descent where
it is large.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from sharpness.methods.base import Method
from sharpness.methods.contract import Engine

__all__ = ["MongeSAM"]


class MongeSAM(Method):
    r"""Monge SAM (Jacobsen & Arvanitidis, 2025, arXiv:2502.08448).

    Algorithm::

        g = ∇L(w)
        e = ρ g / (‖g‖·√(1 + ‖g‖²) + 1e-12)      ‖·‖ global, over the perturbed groups
        w ← base_step(w, ∇L(w + e))             from the exact saved w

    It costs what SAM costs (the same kernels with another scale). As ``‖g‖ → 0``, ``e → ρ g/‖g‖``
    (SAM); as ``‖g‖ → ∞``, ``‖e‖ → 0`` (the base optimizer). The metric is the loss's, so the
    scale of the loss matters (unlike SAM's): multiplying the loss by ``c`` is not a no-op.
    ``adaptive`` (ASAM) is not part of the method and is refused, for every parameter group.
    ``last_grad_norm`` is ``‖g‖``.

    Args:
        params, base_optimizer, rho, backend, same_noise, seed, memory, **base_kwargs: as for
            :class:`sharpness.SAM` (numpy front: as for :class:`sharpness.numpy.SAM`).

    Example:
        >>> import torch, sharpness
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = sharpness.MongeSAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
        >>> x, y = torch.randn(8, 4), torch.randn(8, 2)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> loss = opt.step(closure)

        The same rule over numpy arrays, one step in two halves:

        >>> import numpy as np, sharpness.numpy
        >>> w = np.array([3.0, 4.0])
        >>> opt = sharpness.numpy.MongeSAM([w], rho=0.5, lr=0.1)
        >>> opt.first_step([w.copy()])   # g = w: ‖g‖ = 5
        True
        >>> e = w - np.array([3.0, 4.0])
        >>> round(float(np.linalg.norm(e)), 6)  # ρ/√(1 + 25)
        0.098058
        >>> opt.second_step([np.zeros(2)])       # back to w, then the base step
        >>> w.tolist()
        [3.0, 4.0]
    """

    needs_unscaled_first_gradient = "its e = ρg/(‖g‖√(1+‖g‖²)) depends on the scale of g"

    def _setup_group(self, group: dict[str, Any]) -> None:
        if group.get("sam_adaptive", False):
            raise ValueError("MongeSAM has no adaptive (ASAM) form: its metric is the loss's own, G = I + ∇L∇Lᵀ")

    def _perturb(self, engines: Sequence[Engine], norm: float) -> None:
        # SAM's kernels divide by (norm + ε): hand them ‖g‖·√(1 + ‖g‖²).
        # Finite wherever ‖g‖² is: at the top of the float range it rounds to ‖g‖².
        monge_norm = norm * math.sqrt(1.0 + norm * norm)
        for engine in engines:
            engine.perturb(self.param_groups, monge_norm)
