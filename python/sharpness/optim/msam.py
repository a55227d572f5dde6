"""m-sharpness: one perturbation per micro-batch, the perturbed gradients averaged.

Foret et al. (ICLR 2021, Section 4.1) observe that SAM generalises better when the batch is split
into micro-batches of size ``m`` and each gets its own perturbation ``e_i = ρ g_i/‖g_i‖`` from its
own gradient; the update uses the average of the gradients taken at ``w + e_i``:

    g̃ = (1/n) Σ_i ∇L_i(w + e_i),   w ← base_step(w, g̃).

(Under data parallelism, each replica perturbing with its own gradient *is* m-sharpness with
``m`` = the per-replica batch.) Here the micro-batches run one after the other on one set of
weights: each perturbation is undone exactly from the backup before the next, so memory is one
backup and one accumulator, not ``n`` copies of the weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from sharpness._validation import number
from sharpness.optim._closure_only import ClosureOnlySAM
from sharpness.optim.sam import _RandomState

_ACC = "msam_accumulator"


class MSharpnessSAM(ClosureOnlySAM):
    """SAM with a separate perturbation per micro-batch (m-sharpness, Foret et al., ICLR 2021).

    ``step(closure)`` takes a closure of the micro-batch index, ``closure(i)`` for
    ``i in range(micro_batches)``, that zeroes the gradients, runs the forward and backward
    passes on micro-batch ``i`` and returns its loss; it is called twice per micro-batch (at ``w``
    and at ``w + e_i``). Returns the mean of the first losses. ``micro_batches=1`` is SAM.

    Example:
        >>> import torch, sharpness
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = sharpness.MSharpnessSAM(model.parameters(), torch.optim.SGD, micro_batches=4, rho=0.05, lr=0.1)
        >>> x, y = torch.randn(16, 4), torch.randn(16, 2)
        >>> def closure(i):
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(x[4 * i : 4 * i + 4]), y[4 * i : 4 * i + 4])
        ...     loss.backward()
        ...     return loss
        >>> loss = opt.step(closure)
    """

    no_closure_message = "MSharpnessSAM.step needs a closure of the micro-batch index: step(lambda i: ...)"

    def __init__(self, params: Any, base_optimizer: Any, micro_batches: int = 2, **kwargs: Any) -> None:
        self.micro_batches = number("micro_batches", micro_batches, minimum=1, integer=True)
        super().__init__(params, base_optimizer, **kwargs)

    def _closure_step_body(self, closure: Callable[[int], Tensor]) -> Tensor:
        n = self.micro_batches
        engines = self.engines()
        losses = []
        for i in range(n):
            noise = _RandomState.capture(self._devices()) if self.same_noise else None
            with torch.enable_grad():
                losses.append(closure(i).detach())
            engines = self._begin()
            norm = math.sqrt(sum(e.sum_of_squares(self.param_groups) for e in engines))
            perturbed = math.isfinite(norm)
            if perturbed:
                for e in engines:
                    e.perturb(self.param_groups, norm)
            else:
                self.stats["nonfinite_skips"] += 1
            if noise is not None:
                after_first = _RandomState.capture(self._devices())
                noise.restore()
            try:
                with torch.enable_grad():
                    closure(i)
            finally:
                for e in engines:
                    e.restore()  # exactly w again before the next micro-batch (or an exception)
                if noise is not None:
                    after_first.restore()
            engines = self._begin()
            for e in engines:  # acc ← Σ g̃_i
                if i == 0:
                    e.copy("grads", _ACC, self.state)
                else:
                    e.axpby("grads", _ACC, 1.0, 1.0, self.state)
        for e in engines:  # the update direction: the mean
            e.axpby(_ACC, "grads", 1.0 / n, 0.0, self.state)
        self._plain_step(self._begin())
        self._finish_step(zero_grad=False)
        return torch.stack(losses).mean()
