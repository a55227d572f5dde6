"""PyTorch Lightning with SAM: automatic optimization, a BatchNorm MLP on scikit-learn's digits,
a cosine schedule, on the CPU.

    python examples/lightning_example.py           # ~15 s
    python examples/lightning_example.py --quick   # seconds; checks the steps and the statistics

``configure_optimizers`` returns a :class:`sharpness.SAM` (and a scheduler): Lightning calls
``optimizer.step(closure=...)`` and SAM runs the closure twice, at ``w`` and at ``w + e``.

- ``SAMOptimizerStep`` (sharpness.integrations.lightning), listed first among the bases, makes
  ``precision="16-mixed"`` with a GradScaler (on a GPU) work too; under ``"32-true"`` and
  ``"bf16-mixed"`` it just calls ``optimizer.step(closure=...)``.
- ``optimizer_step`` wraps Lightning's closure in ``update_stats_once``: BatchNorm's running
  statistics are updated by the first pass of each step only.
- ``training_step`` runs twice per step: this example logs the loss of the first pass itself.

Needs ``pip install 'sharpness[torch]' lightning scikit-learn``.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import sharpness
from sharpness.batchnorm import update_stats_once

try:
    import lightning as L

    from sharpness.integrations.lightning import SAMOptimizerStep
except ImportError:
    sys.exit("this example needs Lightning: pip install lightning")


def digits_loaders(batch_size: int) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        sys.exit("this example needs scikit-learn: pip install scikit-learn")
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x / 16.0, y, test_size=0.25, random_state=0)

    def dataset(x, y):
        return torch.utils.data.TensorDataset(torch.tensor(x, dtype=torch.float32), torch.tensor(y))

    train = torch.utils.data.DataLoader(dataset(x_train, y_train), batch_size=batch_size, shuffle=True, drop_last=True,
                                        generator=torch.Generator().manual_seed(0))
    test = torch.utils.data.DataLoader(dataset(x_test, y_test), batch_size=512)
    return train, test


class DigitsClassifier(SAMOptimizerStep, L.LightningModule):  # the mixin first
    def __init__(self, lr: float, rho: float, total_steps: int):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 10))
        self.first_pass_losses: list[float] = []
        self.history: list[dict[str, float]] = []
        self._first_pass = True

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        if self._first_pass:  # called at w, then at w + e: keep the loss at w
            self.first_pass_losses.append(loss.item())
        self._first_pass = not self._first_pass
        return loss

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        # Only the first of the closure's calls in this step updates BatchNorm's running statistics.
        super().optimizer_step(epoch, batch_idx, optimizer, update_stats_once(self, optimizer_closure))

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_accuracy", (logits.argmax(1) == y).float().mean())

    def on_validation_epoch_end(self):
        metrics = self.trainer.callback_metrics
        train_loss = sum(self.first_pass_losses) / max(len(self.first_pass_losses), 1)
        self.first_pass_losses.clear()
        row = {"step": self.global_step, "train_loss": train_loss, "val_loss": float(metrics["val_loss"]),
               "val_accuracy": float(metrics["val_accuracy"])}
        self.history.append(row)
        print(f"epoch {self.current_epoch:3d}  step {row['step']:5d}  train loss {train_loss:.4f}  "
              f"val loss {row['val_loss']:.4f}  val accuracy {row['val_accuracy']:.3f}", flush=True)

    def configure_optimizers(self):
        opt = sharpness.SAM(self.parameters(), torch.optim.SGD, rho=self.hparams.rho, lr=self.hparams.lr, momentum=0.9)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.hparams.total_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps, then checks")
    parser.add_argument("--epochs", type=int, default=None, help="default 30; --quick: 2")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--precision", default="32-true", help="Lightning's precision: 32-true, bf16-mixed, 16-mixed (GPU)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    args.epochs = args.epochs or (2 if args.quick else 30)
    torch.set_num_threads(args.threads)
    L.seed_everything(0, verbose=False)

    start = time.perf_counter()
    train, test = digits_loaders(args.batch_size)
    total_steps = args.epochs * len(train)
    model = DigitsClassifier(args.lr, args.rho, total_steps)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers).*")  # tiny data in memory
        trainer = L.Trainer(
            accelerator="cpu", devices=1, max_epochs=args.epochs, precision=args.precision, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        )
        trainer.fit(model, train, test)
    sam = trainer.optimizers[0]
    print(f"done in {time.perf_counter() - start:.1f} s; SAM steps {sam.stats['steps']}, Lightning steps {trainer.global_step}")
    if args.quick:
        batches_counted = int(model.net[1].num_batches_tracked)
        checks = {
            "every Lightning step is a SAM step": sam.stats["steps"] == trainer.global_step == total_steps,
            "BatchNorm counted one batch per step": batches_counted == total_steps,
            "the validation loss fell": model.history[-1]["val_loss"] < model.history[0]["val_loss"],
        }
        failed = [name for name, ok in checks.items() if not ok]
        if failed:
            print(f"FAILED: {failed} (BatchNorm counted {batches_counted}; history {model.history})")
            return 1
        print("OK: " + "; ".join(checks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
