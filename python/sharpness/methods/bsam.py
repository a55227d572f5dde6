"""Bayesian SAM (bSAM; Möllenhoff & Khan, ICLR 2023, arXiv:2210.01620): the rule, written once for
both fronts (:class:`sharpness.BayesianSAM`, :class:`sharpness.numpy.BayesianSAM`).

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

from collections.abc import Sequence
from typing import Any

import numpy as np

from sharpness._validation import number, pair
from sharpness.methods.base import Method, Phase
from sharpness.methods.contract import Engine

__all__ = ["BayesianSAM"]

_S, _GM = "bsam_s", "bsam_gm"  # per-parameter state (checkpointed)


def _check_positive(name: str, value: Any) -> float:
    return number(name, value, above=0)


def _check_nonnegative(name: str, value: Any) -> float:
    return number(name, value, minimum=0)


def _check_betas(value: Any) -> tuple[float, float]:
    return pair("betas", value, minimum=0, below=1)


class BayesianSAM(Method):
    r"""Bayesian SAM (Möllenhoff & Khan, ICLR 2023, arXiv:2210.01620): a standalone optimizer
    whose Adam-like scale ``s`` sets both the perturbation and the posterior's spread.

    Algorithm (the paper's Algorithm 1)::

        ε ~ N(0, 1/(N s))                  # begin_step(), from the optimizer's own generator
        g   = ∇L(θ + ε)                    # first forward/backward (first_step)
        e   = ρ g/s                        # elementwise
        g_e = ∇L(θ + e)                    # second forward/backward (second_step)
        g_m ← β₁ g_m + (1−β₁)(g_e + δ θ)
        s   ← β₂ s + (1−β₂)(√s |g| + δ + γ)
        θ   ← θ − lr g_m/s                 # from the exact saved θ

    A step starts at a posterior sample: ``step(closure)`` (torch) and ``step(grad_fn)`` (numpy)
    draw it themselves; in separate calls, :meth:`begin_step` (to ``θ + ε``), the first gradient
    there and ``first_step``, then the second gradient and ``second_step``; ``restore()`` undoes a
    pending step (``θ`` back, bit for bit). The noise is drawn from :attr:`generator` (saved in
    ``state_dict``, so a resumed run draws the same noise), one vector per engine over its
    trainable parameters in order: on the torch front one ``torch.randn(n)`` on the CPU (float64
    for float64 weights, else float32); on the numpy front one ``standard_normal(n, dtype)`` per
    dtype, in the arrays' dtype. ``s`` and ``g_m`` are per-parameter state (``bsam_s``, every
    parameter's starting at ``s_init``, and ``bsam_gm``); ``lr``, ``betas``, ``weight_decay``,
    ``damping`` and ``num_data`` are group keys (an LR scheduler drives ``lr``). Every trainable
    parameter is sampled; parameters without a gradient are not updated. A non-finite ``‖g‖``
    leaves ``θ`` and ``s`` alone (``stats["nonfinite_skips"]``) and the update is taken with the
    second gradient. ``rho = 0`` is the noisy Adam-like variational method without the SAM step
    (the update only, at a posterior sample). :meth:`posterior_std` gives ``1/√(N s)``.

    Args:
        params, rho, and the front's own arguments: as for :class:`sharpness.SAM` (``backend``,
            ``seed`` ...; no ``base_optimizer``) or :class:`sharpness.numpy.SAM` (no ``base``).
            No adaptive (ASAM) form; no DTensor (FSDP2) parameters (the noise is drawn over
            whole tensors).
        num_data: ``N``, the number of training examples (sets the noise, ``1/√(N s)``).
        lr: ``α`` (0.1).
        betas: ``(β₁, β₂)`` ((0.9, 0.999)).
        weight_decay: ``δ``, the prior precision (1e-4).
        damping: ``γ`` (0.1).
        s_init: ``s₀`` (1.0), > 0.

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

        On the numpy front (``grad_fn(params) -> (loss, grads)``):

        >>> import numpy as np
        >>> from sharpness.numpy import BayesianSAM
        >>> rng = np.random.default_rng(0)
        >>> X = rng.normal(size=(32, 3))
        >>> y = X @ np.array([1.0, -2.0, 0.5]) + 0.1 * rng.normal(size=32)
        >>> w = np.zeros(3)
        >>> def grad_fn(params):
        ...     r = X @ params[0] - y
        ...     return 0.5 * np.mean(r**2), [X.T @ r / len(y)]
        >>> opt = BayesianSAM([w], num_data=1000, lr=0.1, rho=0.01, seed=0)
        >>> for _ in range(100):
        ...     loss = opt.step(grad_fn)             # the loss at the posterior sample
        >>> bool(grad_fn([w])[0] < 0.01)             # the posterior mean fits
        True
        >>> [round(float(s), 2) for s in opt.posterior_std()[0][0]]   # 1/√(N s)
        [0.03, 0.03, 0.03]
    """

    norm_weights_supported = False  # its own norms (see Method.norm_weights_supported)
    needs_unscaled_first_gradient = "its scale s accumulates |g| of the first gradient, which would be scaled"
    group_keys = ("lr", "betas", "weight_decay", "damping", "num_data")

    def __init__(
        self,
        *args: Any,
        num_data: float,
        lr: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 1e-4,
        damping: float = 0.1,
        s_init: float = 1.0,
        **kwargs: Any,
    ) -> None:
        self._settings = {
            "lr": _check_nonnegative("lr", lr),
            "betas": _check_betas(betas),
            "weight_decay": _check_nonnegative("weight_decay", weight_decay),
            "damping": _check_nonnegative("damping", damping),
            "num_data": _check_positive("num_data", num_data),
        }
        self._init = {_S: _check_positive("s_init", s_init)}  # s where a parameter has none yet
        super().__init__(*args, **kwargs)
        engines = self.engines()  # type: ignore[attr-defined]
        if any(engine.shards_parameters for engine in engines):
            raise ValueError("BayesianSAM does not support DTensor (FSDP2) parameters: its noise is drawn over whole tensors")
        for engine in engines:  # s₀ for every parameter, so that s exists wherever it is read
            engine.write(_S, [self._init[_S]] * len(engine.params), self.state)

    def _setup_group(self, group: dict[str, Any]) -> None:
        if group["sam_adaptive"]:
            raise ValueError("BayesianSAM has no adaptive (ASAM) form: its perturbation is ρ g/s")
        for key, value in self._settings.items():  # a group may set its own
            group.setdefault(key, value)
        group["lr"] = _check_nonnegative("lr", group["lr"])
        group["betas"] = _check_betas(group["betas"])
        group["weight_decay"] = _check_nonnegative("weight_decay", group["weight_decay"])
        group["damping"] = _check_nonnegative("damping", group["damping"])
        group["num_data"] = _check_positive("num_data", group["num_data"])

    # -- the three parts of a step ------------------------------------------------------------------

    def _begin_step(self, engines: Sequence[Engine]) -> None:
        # θ saved, then θ + ε with ε = z/√(N s) on every trainable parameter
        for engine in engines:
            engine.save_weights()
            engine.elementwise(
                self._sample, ["weights", _S, "noise"], self.state, every=True, init=self._init, generator=self.generator  # type: ignore[attr-defined]
            )

    def _sample(self, xp: Any, gi: int, w: Any, s: Any, z: Any) -> None:
        w += z / xp.sqrt(s * self.param_groups[gi]["num_data"])

    def _perturb_or_skip(self, engines: Sequence[Engine], norm: float) -> Phase:
        # The first gradient (at the sample) is in: θ comes back, bit for bit, and the step goes
        # on from θ as one begun there.
        for engine in engines:
            engine.restore()
        self._pending = None
        return super()._perturb_or_skip(engines, norm)

    def _perturb(self, engines: Sequence[Engine], norm: float) -> None:
        for engine in engines:
            engine.save_weights()
            engine.elementwise(self._ascend, ["weights", "grads", _S], self.state, init=self._init)

    def _ascend(self, xp: Any, gi: int, w: Any, g: Any, s: Any) -> None:
        """``θ + ρ g/s`` (with the old ``s``), then ``s ← β₂ s + (1−β₂)(√s |g| + δ + γ)``."""
        group = self.param_groups[gi]
        if group["sam_rho"] != 0:
            w += group["sam_rho"] * g / s
        beta2 = group["betas"][1]
        t = xp.sqrt(s) * xp.abs(g)
        t += group["weight_decay"] + group["damping"]
        s *= beta2
        s += (1 - beta2) * t

    def _own_update(self, engines: Sequence[Engine]) -> None:
        for engine in engines:
            engine.elementwise(self._descend, ["weights", "grads", _S, _GM], self.state, init=self._init)

    def _descend(self, xp: Any, gi: int, w: Any, g: Any, s: Any, gm: Any) -> None:
        """``g_m ← β₁ g_m + (1−β₁)(g_e + δ θ)``, ``θ ← θ − lr g_m/s``."""
        group = self.param_groups[gi]
        beta1 = group["betas"][0]
        d = g + group["weight_decay"] * w
        gm *= beta1
        gm += (1 - beta1) * d
        w -= group["lr"] * gm / s

    # -- checkpoints and the posterior -------------------------------------------------------------

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The front's ``load_state_dict``, refusing a dict without the generator's state: the
        noise of the resumed run would not be the noise of the run that saved it."""
        sam = state_dict.get("sam") if isinstance(state_dict, dict) else None
        if isinstance(sam, dict) and "generator" not in sam:  # (anything else: the front's checks)
            raise ValueError("state_dict['sam'] lacks 'generator': BayesianSAM's noise resumes from the generator's state")
        super().load_state_dict(state_dict)  # type: ignore[misc]

    def posterior_std(self) -> list[list[Any]]:
        """``1/√(N s)`` per group, one array per parameter (the posterior's standard deviation,
        for sampling predictions), as the front's arrays (numpy arrays; CPU tensors on the torch
        front, float32 unless the parameter is float64); for a complex parameter, one per real
        coordinate (the shape of ``torch.view_as_real(p)``)."""
        engines = self.engines()  # type: ignore[attr-defined]
        by_id: dict[int, Any] = {}
        for engine in engines:
            engine.elementwise(_nothing, [_S], self.state, every=True, init=self._init)  # s₀ where still missing
            for p, s in zip(engine.params, engine.read(_S, self.state)):
                by_id[id(p)] = s
        return [
            [self._front_array(1.0 / np.sqrt(group["num_data"] * by_id[id(p)])) for p in group["params"]]
            for group in self.param_groups
        ]


def _nothing(xp: Any, gi: int, *arrays: Any) -> None:
    """Touches nothing (the call creates the vectors it names where missing)."""
