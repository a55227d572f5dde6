"""m-sharpness over numpy arrays: one perturbation per micro-batch, the perturbed gradients
averaged (Foret et al., ICLR 2021, arXiv:2010.01412, §4.1 "m-sharpness")."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from sharpness import _core
from sharpness._validation import number
from sharpness.numpy.sam import SAM

__all__ = ["MSharpnessSAM"]


class MSharpnessSAM(SAM):
    r"""SAM with a separate perturbation per micro-batch (m-sharpness), over numpy arrays.

    The batch is split into ``n`` micro-batches; each gets its own ascent from its own gradient
    and the base optimizer steps with the mean of the perturbed gradients::

        for i in 0..n-1:   g_i = ∇L_i(w);  e_i = ρ g_i/(‖g_i‖ + 1e-12)  (ASAM: ρ T²g_i/‖T g_i‖)
                           g̃_i = ∇L_i(w + e_i);  w restored bit for bit
        w ← base_step(w, (1/n) Σ_i g̃_i)

    One backup and one accumulator, not ``n`` copies of the weights; every pass is a native
    kernel call per dtype. ``micro_batches=1`` is :class:`sharpness.numpy.SAM` bit for bit.

    Args:
        params, rho, adaptive, eta, base, **base_kwargs: as for :class:`sharpness.numpy.SAM`.
        micro_batches: ``n``.

    Example:
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

    def __init__(self, params: Sequence[np.ndarray], micro_batches: int = 2, **kwargs: Any) -> None:
        micro_batches = number("micro_batches", micro_batches, minimum=1, integer=True)
        super().__init__(params, **kwargs)
        self.micro_batches = micro_batches

    def step(self, grad_fn: Callable[..., tuple[Any, Sequence[np.ndarray]]]) -> Any:  # type: ignore[override]
        """One m-sharpness step. ``grad_fn(params, i) -> (loss, grads)`` evaluates micro-batch
        ``i`` at the current weights; it runs at ``w`` and at ``w + e_i`` for every ``i``.
        Returns the mean of the first losses. An exception leaves the weights at ``w``."""
        n = self.micro_batches
        accumulators = [[np.zeros_like(self.params[j]) for j in grp.index] for grp in self._groups]
        losses = []
        for i in range(n):
            loss, grads = self._call(lambda params, i=i: grad_fn(params, i))
            losses.append(loss)
            self.first_step(grads)
            try:
                _, grads = self._call(lambda params, i=i: grad_fn(params, i))
                by_group = self._grads_by_group(grads)
            except BaseException:
                self._undo()
                raise
            self._undo()  # w back from the backup, bit for bit, before the next micro-batch
            for acc, g in zip(accumulators, by_group):
                _core.axpby(g, acc, 1.0, 1.0)
        means = [[np.zeros_like(a) for a in acc] for acc in accumulators]
        for acc, mean in zip(accumulators, means):  # the mean, as the torch front takes it
            _core.axpby(acc, mean, 1.0 / n, 0.0)
        self._base_step(means, from_backup=False)
        return sum(losses) / n

    def __repr__(self) -> str:
        return super().__repr__().replace("SAM(", f"MSharpnessSAM(micro_batches={self.micro_batches}, ", 1)
