"""WSAM: sharpness as a weighted regularisation term, written once for both fronts
(:class:`sharpness.WSAM`, :class:`sharpness.numpy.WSAM`).

Yue, Jiang, Ye, Gao, Liu, Zhang, "Sharpness-Aware Minimization Revisited: Weighted Sharpness as a
Regularization Term", KDD 2023 (arXiv:2305.15817; official code: atorch's ``WeightedSAM`` in
github.com/intelligent-machine-learning/dlrover). SAM minimises ``L(w + e) = L(w) + [L(w + e) −
L(w)]``, the loss plus its sharpness with weight 1. WSAM weighs the sharpness::

    L_WSAM(w) = L(w) + γ/(1 − γ)·[L(w + e) − L(w)],   e = ρ ∇L/‖∇L‖

whose gradient is ``g + α(g̃ − g)`` with ``α = γ/(1 − γ)``, ``g = ∇L(w)``, ``g̃ = ∇L(w + e)``.
The paper's algorithm decouples the two: the base optimizer steps on ``g`` (so its moments and
its weight decay see only the loss), and the sharpness term is applied outside it as a plain
gradient step, ``w ← w − η α (g̃ − g)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sharpness._validation import flag, number
from sharpness.methods.base import Method
from sharpness.methods.contract import Engine

__all__ = ["WSAM"]

_G = "wsam_g"  # g, kept from the first pass (not checkpointed)
_S = "wsam_sharpness"  # g̃ − g, kept over the base step (not checkpointed)


class WSAM(Method):
    r"""WSAM (Yue et al., KDD 2023, arXiv:2305.15817): SAM with the sharpness weighted by
    ``α = γ/(1 − γ)``.

    Algorithm (``decouple=True``, the paper's Algorithm 1 and the official code)::

        g  = ∇L(w);  e = ρ g/(‖g‖ + 1e-12);  g̃ = ∇L(w + e)
        w  ← base_step(w, g)                  from the exact saved w: momentum, Adam's moments
                                              and weight decay see g only
        w  ← w − lr·α·(g̃ − g)                 lr: the group's current learning rate
                                              (+ for a group with maximize=True)

    With ``decouple=False`` the base optimizer steps on ``g + α(g̃ − g) = (1−α)g + αg̃``.

    Limits: ``γ = 0.5`` (``α = 1``) with ``decouple=False`` is SAM bit for bit (any base
    optimizer); with ``decouple=True`` and plain SGD (no momentum, no weight decay) it is SAM up to
    rounding (``(w − lr g) − lr(g̃ − g)`` against ``w − lr g̃``). ``γ = 0`` is the base optimizer
    (the second gradient is taken and unused). The decoupled form keeps ``g`` and ``g̃ − g`` (two
    buffers in :attr:`vectors`, not checkpointed); the coupled form keeps ``g`` only. After a
    non-finite ``‖g‖`` the step is the plain base step with ``g̃``, as for SAM.

    Args:
        params, base_optimizer, rho, adaptive, eta, backend, same_noise, seed, memory, **base_kwargs:
            as for :class:`sharpness.SAM` (numpy front: as for :class:`sharpness.numpy.SAM`).
        gamma: ``γ`` in ``[0, 1)`` (0.9: the default of the authors' merged code, atorch's
            ``WeightedSAM`` in dlrover's ``atorch/atorch/optimizers/wsam.py``, and of its README;
            0.88 was the default only on the pull request's branch before it was merged).
        decouple: apply the sharpness term outside the base optimizer (default, as the paper).

    Example:
        >>> import torch, sharpness
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = sharpness.WSAM(model.parameters(), torch.optim.SGD, rho=0.05, gamma=0.9, lr=0.1, momentum=0.9)
        >>> x, y = torch.randn(8, 4), torch.randn(8, 2)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> loss = opt.step(closure)
        >>> round(opt.alpha, 6)  # γ/(1 − γ)
        9.0

        The same rule over numpy arrays:

        >>> import numpy as np, sharpness.numpy
        >>> rng = np.random.default_rng(0)
        >>> X, t = rng.normal(size=(32, 3)), rng.normal(size=32)
        >>> w = np.zeros(3)
        >>> def grad_fn(params):
        ...     r = X @ params[0] - t
        ...     return 0.5 * np.mean(r**2), [X.T @ r / len(t)]
        >>> opt = sharpness.numpy.WSAM([w], rho=0.05, gamma=0.9, lr=0.05, momentum=0.9)
        >>> losses = [opt.step(grad_fn) for _ in range(50)]
        >>> bool(losses[-1] < losses[0])
        True
    """

    needs_unscaled_first_gradient = "its update adds g̃ − g, and the scaler unscales g̃ only"

    def __init__(self, *args: Any, gamma: float = 0.9, decouple: bool = True, **kwargs: Any) -> None:
        self.gamma = number("gamma", gamma, minimum=0, below=1)
        #: ``α = γ/(1 − γ)``, the weight of the sharpness.
        self.alpha = self.gamma / (1.0 - self.gamma)
        self.decouple = flag("decouple", decouple)
        super().__init__(*args, **kwargs)

    def _keeps_g(self) -> bool:
        return self.decouple or self.alpha != 1.0

    def _before_perturbation(self, engines: Sequence[Engine]) -> None:
        if self._keeps_g():
            for engine in engines:
                engine.copy("grads", _G, self.vectors)

    def _before_base_step(self, engines: Sequence[Engine]) -> None:
        if not self._keeps_g():
            return  # coupled with α = 1: the base step takes g̃, as SAM
        state, alpha = self.vectors, self.alpha
        if not self.decouple:
            for engine in engines:  # (1 − α) g + α g̃
                engine.axpby(_G, "grads", 1.0 - alpha, alpha, state)
            return
        for engine in engines:
            if alpha != 0.0:
                engine.copy("grads", _S, state)
                engine.axpby(_G, _S, -1.0, 1.0, state)  # s = g̃ − g
            engine.copy(_G, "grads", state)  # the base step takes g

    def _after_base_step(self, engines: Sequence[Engine]) -> None:
        if not self.decouple or self.alpha == 0.0:
            return
        scales = {}
        for gi, group in enumerate(self.param_groups):
            lr = float(group["lr"])
            scales[gi] = (1.0 if group.get("maximize", False) else -1.0) * lr * self.alpha
        for engine in engines:  # w ← w − lr·α·(g̃ − g)
            engine.add_to_weights(_S, scales, self.vectors)
