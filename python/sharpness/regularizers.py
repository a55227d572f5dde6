"""SAF and MESA: sharpness-aware training "for free", as a loss term instead of a second pass.

Du, Zhou, Feng, Tan, Zhou, "Sharpness-Aware Training for Free", NeurIPS 2022, arXiv:2205.14083
(official code: github.com/AngusDujw/SAF). SAM's sharpness term costs a second forward/backward
pass. SAF replaces it with a *trajectory loss*: a KL divergence between the model's current
outputs and the outputs it gave for the same samples some epochs ago, which penalises sudden
drops of the loss along the trajectory (what a sharp minimum produces). MESA (memory-efficient
SAF, same paper) takes the reference outputs from an exponential moving average (EMA) of the
weights instead, so it needs no per-sample memory but one more forward pass of the EMA model.

Both add, to the training loss of a batch ``B``::

    λ · τ² · (1/|B|) Σ_{x∈B} KL( softmax(z_ref(x)/τ) ‖ softmax(z(x)/τ) )

with ``z(x)`` the current logits (differentiated) and ``z_ref(x)`` the reference logits
(constant): the logits recorded ``lag`` epochs earlier (SAF, the paper's ``Ẽ``) or the EMA
model's (MESA). As in the official code, the term applies in the epochs ``e`` with
``start_epoch < e`` (and ``e < end_epoch`` when given). Defaults are the official scripts':
``τ = 5``, ``start_epoch = 5``; SAF ``λ = 0.3``, ``lag = 2``; MESA ``λ = 0.8`` with timm's EMA
decay ``0.9998``. They work with any optimizer (plain SGD included): the extra cost is the KL
term (SAF) or one forward pass without gradient (MESA).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from sharpness._validation import number

__all__ = ["SAF", "MESA", "trajectory_kl"]


def trajectory_kl(logits: Tensor, reference: Tensor, temperature: float) -> Tensor:
    """``τ² · mean_batch KL(softmax(reference/τ) ‖ softmax(logits/τ))``, differentiable in
    ``logits`` (``reference`` is detached). One row per sample, classes in the last dimension."""
    t = float(temperature)
    log_p = torch.log_softmax(logits / t, dim=-1)
    ref = reference.detach().to(device=logits.device, dtype=log_p.dtype)
    log_q = torch.log_softmax(ref / t, dim=-1)
    kl = (log_q.exp() * (log_q - log_p)).sum(-1)
    return kl.mean() * (t * t)


def _check(lam: float, temperature: float, start_epoch: int, end_epoch: int | None) -> tuple[float, float, int, int | None]:
    return (
        number("lam", lam, minimum=0),
        number("temperature", temperature, above=0),
        number("start_epoch", start_epoch, integer=True),
        None if end_epoch is None else number("end_epoch", end_epoch, integer=True),
    )


class SAF:
    """SAF's trajectory loss (Du et al., NeurIPS 2022): KL to the logits each sample got
    ``lag`` epochs ago.

    Keeps, per sample index, the logits of the last ``lag + 1`` epochs (a ring of
    ``(lag + 1) × num_samples × num_classes`` values, as the official code does) and the epoch
    each was recorded in. :meth:`loss` records the batch's logits for the current epoch and
    returns ``λτ²·KL(softmax(z_{e−lag}/τ) ‖ softmax(z/τ))`` averaged over the samples whose
    logits were recorded exactly ``lag`` epochs ago (the others, e.g. samples a ``drop_last``
    loader skipped, add nothing; a batch without any gives 0). The data loader must give each
    sample's index in the dataset.

    Args:
        num_samples: the size of the training set (indices are ``0 .. num_samples − 1``).
        num_classes: the number of outputs per sample.
        lam: the weight ``λ`` (0.3 in the official ImageNet script).
        temperature: ``τ`` (5).
        lag: ``Ẽ``, how many epochs back the reference is (2; 3 is also used).
        start_epoch: the term applies from epoch ``start_epoch + 1`` (5).
        end_epoch: the term stops at this epoch (None: never).
        device, dtype: where and how the recorded logits are kept (CPU float32 by default).

    Example:
        >>> import torch, sharpness
        >>> model = torch.nn.Linear(4, 3)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> saf = sharpness.SAF(num_samples=8, num_classes=3, lag=1, start_epoch=0)
        >>> x, y, idx = torch.randn(8, 4), torch.randint(0, 3, (8,)), torch.arange(8)
        >>> for epoch in range(3):
        ...     logits = model(x)
        ...     loss = torch.nn.functional.cross_entropy(logits, y) + saf.loss(logits, idx, epoch)
        ...     opt.zero_grad(); loss.backward(); opt.step()
        >>> float(saf.loss(model(x), idx, 2).detach()) > 0  # epoch 2 against epoch 1's logits
        True
    """

    def __init__(
        self,
        num_samples: int,
        num_classes: int,
        lam: float = 0.3,
        temperature: float = 5.0,
        lag: int = 2,
        start_epoch: int = 5,
        end_epoch: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        lam, temperature, start_epoch, end_epoch = _check(lam, temperature, start_epoch, end_epoch)
        lag = number("lag", lag, minimum=1, integer=True)
        num_samples = number("num_samples", num_samples, minimum=1, integer=True)
        num_classes = number("num_classes", num_classes, minimum=1, integer=True)
        self.lam, self.temperature, self.lag = lam, temperature, lag
        self.start_epoch, self.end_epoch = start_epoch, end_epoch
        device = torch.device("cpu") if device is None else torch.device(device)
        self.logits = torch.zeros(lag + 1, num_samples, num_classes, dtype=dtype, device=device)
        # The epoch each slot's logits were recorded in (-1: never).
        self.recorded_epoch = torch.full((lag + 1, num_samples), -1, dtype=torch.long, device=device)

    def active(self, epoch: int) -> bool:
        """Whether the term applies in ``epoch``."""
        return epoch > self.start_epoch and (self.end_epoch is None or epoch < self.end_epoch)

    @torch.no_grad()
    def record(self, logits: Tensor, indices: Tensor, epoch: int) -> None:
        """Stores ``logits`` (detached) as the outputs of samples ``indices`` in ``epoch``."""
        idx = torch.as_tensor(indices, device=self.logits.device).long().reshape(-1)
        slot = epoch % (self.lag + 1)
        self.logits[slot, idx] = logits.detach().reshape(len(idx), -1).to(self.logits)
        self.recorded_epoch[slot, idx] = epoch

    def reference(self, indices: Tensor, epoch: int) -> tuple[Tensor, Tensor]:
        """The logits of samples ``indices`` recorded in ``epoch − lag`` and a mask of those
        actually recorded then."""
        idx = torch.as_tensor(indices, device=self.logits.device).long().reshape(-1)
        slot = (epoch - self.lag) % (self.lag + 1)
        return self.logits[slot, idx], self.recorded_epoch[slot, idx] == epoch - self.lag

    def loss(self, logits: Tensor, indices: Tensor, epoch: int) -> Tensor:
        """Records the batch's logits for ``epoch`` and returns the trajectory loss to add to
        the training loss (a zero tensor when the term does not apply)."""
        ref = valid = None
        if self.active(epoch):
            ref, valid = self.reference(indices, epoch)
        self.record(logits, indices, epoch)
        if ref is None or valid is None or not bool(valid.any()) or self.lam == 0:  # (set together)
            return logits.sum() * 0.0
        valid = valid.to(logits.device)
        return self.lam * trajectory_kl(logits[valid], ref.to(logits.device)[valid], self.temperature)

    def state_dict(self) -> dict[str, Any]:
        return {
            "logits": self.logits.clone(),
            "recorded_epoch": self.recorded_epoch.clone(),
            "lam": self.lam,
            "temperature": self.temperature,
            "lag": self.lag,
            "start_epoch": self.start_epoch,
            "end_epoch": self.end_epoch,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if tuple(state_dict["logits"].shape) != tuple(self.logits.shape):
            raise ValueError(
                f"recorded logits of shape {tuple(state_dict['logits'].shape)}, expected {tuple(self.logits.shape)}"
            )
        self.logits.copy_(state_dict["logits"])
        self.recorded_epoch.copy_(state_dict["recorded_epoch"])
        self.lam, self.temperature = float(state_dict["lam"]), float(state_dict["temperature"])
        self.start_epoch, self.end_epoch = state_dict["start_epoch"], state_dict["end_epoch"]


class MESA:
    """MESA (Du et al., NeurIPS 2022): KL to the outputs of an exponential moving average of
    the weights.

    Holds ``ema``, a copy of the model in eval mode, updated by :meth:`update` after each
    optimizer step: ``θ_ema ← β·θ_ema + (1 − β)·θ`` for every floating-point parameter and
    buffer (BatchNorm statistics included), other buffers copied (as timm's ``ModelEmaV2``,
    which the official code uses). :meth:`attach` does the update from an optimizer's step
    post-hook. :meth:`loss` runs the EMA model on the batch (no gradient) and returns
    ``λτ²·KL(softmax(z_ema/τ) ‖ softmax(z/τ))``; the EMA forward is skipped in the epochs where
    the term does not apply.

    Args:
        model: the model being trained (copied once).
        decay: ``β`` (0.9998, timm's default that the official script runs with).
        lam: the weight ``λ`` (0.8 in the official ImageNet script).
        temperature: ``τ`` (5).
        start_epoch: the term applies from epoch ``start_epoch + 1`` (5).
        end_epoch: the term stops at this epoch (None: never).

    Example:
        >>> import torch, sharpness
        >>> model = torch.nn.Linear(4, 3)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> mesa = sharpness.MESA(model, decay=0.9, start_epoch=-1)
        >>> handle = mesa.attach(opt)  # the EMA follows every opt.step()
        >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        >>> for _ in range(3):
        ...     logits = model(x)
        ...     loss = torch.nn.functional.cross_entropy(logits, y) + mesa.loss(logits, x, epoch=0)
        ...     opt.zero_grad(); loss.backward(); opt.step()
        >>> mesa.updates
        3
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.9998,
        lam: float = 0.8,
        temperature: float = 5.0,
        start_epoch: int = 5,
        end_epoch: int | None = None,
    ) -> None:
        lam, temperature, start_epoch, end_epoch = _check(lam, temperature, start_epoch, end_epoch)
        decay = number("decay", decay, minimum=0, maximum=1)
        self.model = model
        self.decay, self.lam, self.temperature = decay, lam, temperature
        self.start_epoch, self.end_epoch = start_epoch, end_epoch
        self.ema = copy.deepcopy(model).eval()
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.updates = 0

    def active(self, epoch: int) -> bool:
        """Whether the term applies in ``epoch``."""
        return epoch > self.start_epoch and (self.end_epoch is None or epoch < self.end_epoch)

    @torch.no_grad()
    def update(self, model: nn.Module | None = None) -> None:
        """``θ_ema ← β·θ_ema + (1 − β)·θ`` (floating point entries; others are copied)."""
        source = (self.model if model is None else model).state_dict()
        target = self.ema.state_dict()
        lerp_to, lerp_from, copy_to, copy_from = [], [], [], []
        for name, value in target.items():
            other = source[name]
            if value.is_floating_point() or value.is_complex():
                lerp_to.append(value)
                lerp_from.append(other.detach().to(value))
            else:
                copy_to.append(value)
                copy_from.append(other.to(value.device))
        if lerp_to:
            torch._foreach_mul_(lerp_to, self.decay)
            torch._foreach_add_(lerp_to, lerp_from, alpha=1.0 - self.decay)
        for t, s in zip(copy_to, copy_from):
            t.copy_(s)
        self.updates += 1

    def attach(self, optimizer: torch.optim.Optimizer) -> Any:
        """Updates the EMA after every ``optimizer.step()`` (a step post-hook; returns its
        handle, ``handle.remove()`` detaches)."""
        return optimizer.register_step_post_hook(lambda *_: self.update())

    def loss(self, logits: Tensor, inputs: Any, epoch: int) -> Tensor:
        """The trajectory loss of the batch ``inputs`` whose current logits are ``logits`` (a
        zero tensor when the term does not apply in ``epoch``)."""
        if not self.active(epoch) or self.lam == 0:
            return logits.sum() * 0.0
        with torch.no_grad():
            reference = self.ema(inputs)
        return self.lam * trajectory_kl(logits, reference, self.temperature)

    def state_dict(self) -> dict[str, Any]:
        return {
            "ema": copy.deepcopy(self.ema.state_dict()),
            "updates": self.updates,
            "decay": self.decay,
            "lam": self.lam,
            "temperature": self.temperature,
            "start_epoch": self.start_epoch,
            "end_epoch": self.end_epoch,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.ema.load_state_dict(state_dict["ema"])
        self.updates = int(state_dict["updates"])
        self.decay, self.lam = float(state_dict["decay"]), float(state_dict["lam"])
        self.temperature = float(state_dict["temperature"])
        self.start_epoch, self.end_epoch = state_dict["start_epoch"], state_dict["end_epoch"]
