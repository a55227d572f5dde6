"""m-sharpness: one perturbation per micro-batch, the perturbed gradients averaged.

Foret et al. (ICLR 2021, arXiv:2010.01412, Section 4.1) observe that SAM generalises better when
the batch is split into micro-batches of size ``m`` and each gets its own perturbation
``e_i = ρ g_i/‖g_i‖`` from its own gradient; the update uses the average of the gradients taken
at ``w + e_i``:

    g̃ = (1/n) Σ_i ∇L_i(w + e_i),   w ← base_step(w, g̃).

(Under data parallelism, each replica perturbing with its own gradient *is* m-sharpness with
``m`` = the per-replica batch.) Here the micro-batches run one after the other on one set of
weights: each perturbation is undone exactly from the backup before the next, so memory is one
backup and one accumulator, not ``n`` copies of the weights. The rule is written once here for
both fronts (:class:`sharpness.MSharpnessSAM`, :class:`sharpness.numpy.MSharpnessSAM`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sharpness._validation import number
from sharpness.methods.closure import ClosureDrivenMethod
from sharpness.methods.contract import Engine

__all__ = ["MSharpnessSAM"]

_ACC = "msam_accumulator"  # Σ g̃_i (within a step only: in `vectors`, not checkpointed)


class MSharpnessSAM(ClosureDrivenMethod):
    r"""SAM with a separate perturbation per micro-batch (m-sharpness, Foret et al., ICLR 2021,
    arXiv:2010.01412, §4.1).

    Algorithm, the batch split into ``n`` micro-batches::

        for i in 0..n-1:   g_i = ∇L_i(w);  e_i = ρ g_i/(‖g_i‖ + 1e-12)  (ASAM: ρ T²g_i/‖T g_i‖)
                           g̃_i = ∇L_i(w + e_i);  w restored bit for bit
        w ← base_step(w, (1/n) Σ_i g̃_i)

    ``step`` takes a function of the micro-batch index: on the torch front ``step(closure)`` with
    ``closure(i)``, for ``i in range(micro_batches)``, that zeroes the gradients, runs the forward
    and backward passes on micro-batch ``i`` and returns its loss (with the random state of its
    first call replayed in its second when ``same_noise``); on the numpy front ``step(grad_fn)``
    with ``grad_fn(params, i) -> (loss, grads)``. Each runs twice per micro-batch (at ``w`` and at
    ``w + e_i``); ``step`` returns the mean of the first losses. A micro-batch whose gradient norm
    is not finite is not perturbed (counted in ``stats["nonfinite_skips"]``). One backup and one
    accumulator (``msam_accumulator`` in :attr:`vectors`), not ``n`` copies of the weights.
    ``micro_batches=1`` is SAM bit for bit.

    Args:
        params, base_optimizer, rho, adaptive, eta, backend, same_noise, seed, **base_kwargs: as
            for :class:`sharpness.SAM` (numpy front: as for :class:`sharpness.numpy.SAM`).
        micro_batches: ``n``.

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

        The numpy front, ``grad_fn(params, i) -> (loss, grads)`` for micro-batch ``i``:

        >>> import numpy as np
        >>> from sharpness.numpy import MSharpnessSAM
        >>> w = np.ones(3)
        >>> targets = [np.array([0.0, 1.0, 2.0]), np.array([2.0, 1.0, 0.0])]
        >>> opt = MSharpnessSAM([w], micro_batches=2, rho=0.05, lr=0.1)
        >>> def grad_fn(params, i):  # micro-batch i: loss ½‖w − t_i‖²
        ...     r = params[0] - targets[i]
        ...     return 0.5 * float(r @ r), [r.copy()]
        >>> loss = opt.step(grad_fn)  # grad_fn runs twice per micro-batch
        >>> bool(np.allclose(w, 1.0))  # the two micro-batches pull in opposite directions
        True
    """

    evaluations_per_step = (
        "two gradients per micro-batch from a function of the micro-batch index "
        "(torch: closure(i); numpy: grad_fn(params, i))"
    )

    def __init__(self, *args: Any, micro_batches: int = 2, **kwargs: Any) -> None:
        self.micro_batches = number("micro_batches", micro_batches, minimum=1, integer=True)
        super().__init__(*args, **kwargs)

    def _step_by_evaluations(self, evaluate: Callable[..., tuple[Any, Sequence[Engine]]]) -> Any:
        self._check_groups()
        n, vectors = self.micro_batches, self.vectors
        losses = []
        for i in range(n):
            loss, engines = evaluate(i)  # g_i at w
            losses.append(loss)
            norm = self._gradient_norm(engines)
            self.last_grad_norm = norm
            self._pending = self._perturb_or_skip(engines, norm)  # w + e_i, w saved
            moved = engines
            _, engines = evaluate(i)  # g̃_i at w + e_i
            for engine in moved:
                engine.restore()  # exactly w again before the next micro-batch
            self._pending = None
            for engine in engines:  # acc ← Σ g̃_i
                if i == 0:
                    engine.copy("grads", _ACC, vectors)
                else:
                    engine.axpby("grads", _ACC, 1.0, 1.0, vectors)
        for engine in engines:  # the update direction: the mean
            engine.axpby(_ACC, "grads", 1.0 / n, 0.0, vectors)
        return sum(losses[1:], losses[0]) / n
