"""HuggingFace transformers: ``SAMTrainer``, a ``Trainer`` that takes SAM steps.

``SAMTrainer(model=..., args=..., train_dataset=..., sam_rho=0.05)`` wraps the optimizer the
``Trainer`` would build (AdamW and its weight-decay groups, or the one ``args.optim`` names) in
:class:`sharpness.SAM`, or uses a SAM passed in ``optimizers=(sam, scheduler)``. Its
``training_step`` runs the first forward/backward at ``w`` on every micro-batch of the
accumulation cycle, then (on the cycle's last one) perturbs and replays the same micro-batches
at ``w + e`` with the same random state (dropout masks), so gradient accumulation gives the
large-batch SAM step. The ``Trainer`` then clips ``g̃`` (``max_grad_norm``) and calls
``optimizer.step()``, which restores ``w`` and lets the base optimizer step (through the
GradScaler under ``fp16``: a step it skips leaves the weights restored). The logged loss is the
first pass's.

Example::

    from sharpness.integrations.hf import SAMTrainer
    trainer = SAMTrainer(model=model, args=TrainingArguments(...), train_dataset=ds, sam_rho=0.05)
    trainer.train()

transformers is imported on first use of ``SAMTrainer``, not with this module.
"""

from __future__ import annotations

import contextlib
from typing import Any

from sharpness.optim._random_state import RandomState
from sharpness.optim.sam import SAM

__all__ = ["SAMTrainer"]  # noqa: F822 (built by the module's __getattr__ on first use)


def _make_trainer_class() -> type:
    import transformers

    class SAMTrainer(transformers.Trainer):
        """A ``transformers.Trainer`` taking SAM steps (see :mod:`sharpness.integrations.hf`).

        Args:
            sam_rho, sam_adaptive, sam_eta, sam_backend: SAM's ``rho``, ``adaptive`` (ASAM),
                ``eta`` and ``backend``, for the optimizer this trainer builds.
            *args, **kwargs: as for ``transformers.Trainer``.
        """

        def __init__(
            self,
            *args: Any,
            sam_rho: float = 0.05,
            sam_adaptive: bool = False,
            sam_eta: float = 0.01,
            sam_backend: str = "auto",
            **kwargs: Any,
        ) -> None:
            self.sam_kwargs: dict[str, Any] = dict(rho=sam_rho, adaptive=sam_adaptive, eta=sam_eta, backend=sam_backend)
            self._sam_replay: list[tuple[Any, Any, RandomState | None]] = []
            super().__init__(*args, **kwargs)

        def create_optimizer(self, *args: Any, **kwargs: Any):
            optimizer = super().create_optimizer(*args, **kwargs)
            if not isinstance(optimizer, SAM):
                self.optimizer = SAM(optimizer.param_groups, optimizer, **self.sam_kwargs)
            sam = self.optimizer
            assert isinstance(sam, SAM)  # wrapped just above, or passed in as one
            if type(sam)._second_pass_due is not SAM._second_pass_due:
                raise ValueError(f"SAMTrainer needs a SAM that always takes the second pass, got {type(sam).__name__}")
            return self.optimizer

        def _sam(self) -> SAM:
            optimizer: Any = self.optimizer  # a SAM, or wrappers of one (their .optimizer)
            while not isinstance(optimizer, SAM):  # accelerate wraps it in an AcceleratedOptimizer
                optimizer = optimizer.optimizer
            return optimizer

        def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None, **kwargs: Any) -> Any:
            sam = self._sam()
            noise = RandomState.capture(sam._devices()) if sam.same_noise else None
            self._sam_replay.append((inputs, num_items_in_batch, noise))
            loss = super().training_step(model, inputs, num_items_in_batch, **kwargs)  # at w
            if not self.accelerator.sync_gradients:
                return loss  # the first pass accumulates over the cycle's micro-batches
            replay, self._sam_replay = self._sam_replay, []
            # Under fp16, accelerate's GradScaler: the first gradient is unscaled for the variants' rules.
            sam.first_step(zero_grad=True, grad_scaler=getattr(self.accelerator, "scaler", None))
            after = RandomState.capture(sam._devices()) if sam.same_noise else None
            try:
                for j, (micro, n_items, state) in enumerate(replay):
                    if state is not None:
                        state.restore()
                    last = j == len(replay) - 1  # synchronise (DDP) once, on the last micro-batch
                    with contextlib.nullcontext() if last else self.accelerator.no_sync(model):
                        super().training_step(model, micro, n_items, **kwargs)  # at w + e
            except BaseException:
                sam.restore()  # never leave the weights perturbed behind an exception
                raise
            finally:
                if after is not None:
                    after.restore()
            return loss

    SAMTrainer.__module__ = __name__
    return SAMTrainer


def __getattr__(name: str) -> Any:
    if name == "SAMTrainer":
        cls = _make_trainer_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
