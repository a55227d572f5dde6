"""Train a small BatchNorm CNN on scikit-learn's digits with SAM's closure API, a cosine learning
rate schedule, a checkpoint saved halfway and a resume that continues bit for bit.

    python examples/train_closure_batchnorm.py                 # ~15 s: train, checkpoint at half
    python examples/train_closure_batchnorm.py --resume PATH   # continue from that checkpoint
    python examples/train_closure_batchnorm.py --quick         # seconds: checks the resume is exact

What it shows:

- ``opt.step(update_stats_once(model, closure))``: SAM runs the closure twice (at ``w``, then at
  ``w + e``); only the first pass updates BatchNorm's running statistics.
- the scheduler steps on the SAM optimizer after ``opt.step``, as on any torch optimizer;
- a checkpoint holds the model, ``opt.state_dict()`` (the base SGD's momentum and SAM's own
  counters and generator), the scheduler and the step; the batch order is a function of the step,
  so a resumed run sees the same batches. ``--quick`` trains N steps straight and N/2 + save +
  load + N/2, and exits with status 1 unless every weight and buffer is identical.

Needs ``pip install 'sharpness[torch]' scikit-learn``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import sharpness
from sharpness.batchnorm import update_stats_once


def load_digits_tensors(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits as 1×8×8 images in [0, 1]: 1,347 training and 450 test images."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        sys.exit("this example needs scikit-learn: pip install scikit-learn")
    images, labels = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(images / 16.0, labels, test_size=0.25, random_state=seed)

    def as_images(x):
        return torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8)

    return as_images(x_train), torch.tensor(y_train), as_images(x_test), torch.tensor(y_test)


def make_cnn() -> nn.Module:
    """Two conv-BN-ReLU blocks and a linear classifier (~6k parameters)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),  # 16×4×4
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),  # 32×2×2
        nn.Flatten(), nn.Linear(128, 10),
    )


def batch_indices(step: int, n_train: int, batch_size: int, seed: int) -> torch.Tensor:
    """The indices of the batch of global step ``step``: one shuffle per epoch, from a generator
    seeded with (seed, epoch), so any step's batch is known without replaying the run."""
    per_epoch = n_train // batch_size  # the last partial batch is dropped
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return order[position * batch_size : (position + 1) * batch_size]


class Run:
    """The model, the SAM optimizer and the scheduler of one training run, built from a seed."""

    def __init__(self, args: argparse.Namespace):
        torch.manual_seed(args.seed)
        self.model = make_cnn()
        self.opt = sharpness.SAM(
            self.model.parameters(), torch.optim.SGD, rho=args.rho, lr=args.lr, momentum=0.9, weight_decay=5e-4
        )
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=args.steps)
        self.step = 0

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),  # refused between first_step and second_step
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
        }

    def load_state_dict(self, checkpoint: dict) -> None:
        self.model.load_state_dict(checkpoint["model"])
        self.opt.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.step = checkpoint["step"]


def train(run: Run, data, args: argparse.Namespace, until: int, log_every: int) -> None:
    """Trains ``run`` from its current step to step ``until``, printing a line every ``log_every`` steps."""
    x_train, y_train, x_test, y_test = data
    model, opt = run.model, run.opt
    model.train()
    losses: list[float] = []
    while run.step < until:
        batch = batch_indices(run.step, len(x_train), args.batch_size, args.seed)
        x, y = x_train[batch], y_train[batch]

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        # SAM calls the closure at w and at w + e; the wrapper keeps the second pass out of the
        # BatchNorm statistics. Build it anew each step: it counts the calls of one step.
        loss = opt.step(update_stats_once(model, closure))
        run.scheduler.step()
        run.step += 1
        losses.append(loss.item())
        if run.step % log_every == 0 or run.step == until:
            print(
                f"step {run.step:5d}/{args.steps}  loss {sum(losses) / len(losses):.4f}  "
                f"test accuracy {accuracy(model, x_test, y_test):.3f}  lr {run.scheduler.get_last_lr()[0]:.4f}",
                flush=True,
            )
            losses.clear()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()  # the running statistics, not the batch's
    correct = (model(x).argmax(dim=1) == y).float().mean().item()
    model.train()
    return correct


def same_state(a: nn.Module, b: nn.Module) -> bool:
    """Every parameter and buffer (BatchNorm's running statistics included) identical, bit for bit."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def check_resume_is_exact(data, args: argparse.Namespace) -> int:
    """N steps straight against N/2, checkpoint, a fresh process's worth of objects, N/2 more."""
    half = args.steps // 2
    print(f"-- {args.steps} steps straight", flush=True)
    straight = Run(args)
    train(straight, data, args, until=args.steps, log_every=args.log_every)
    bn_updates = int(straight.model[1].num_batches_tracked)
    if bn_updates != args.steps:  # one update per step: the second pass left the statistics alone
        print(f"FAILED: BatchNorm counted {bn_updates} batches in {args.steps} steps")
        return 1

    print(f"-- {half} steps, checkpoint, fresh objects, resume, {args.steps - half} steps", flush=True)
    first_half = Run(args)
    train(first_half, data, args, until=half, log_every=args.log_every)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "checkpoint.pt"
        torch.save(first_half.state_dict(), path)
        args.seed += 1  # the resumed objects start from other weights: the checkpoint must restore them all
        resumed = Run(args)
        args.seed -= 1
        resumed.load_state_dict(torch.load(path))
    train(resumed, data, args, until=args.steps, log_every=args.log_every)
    if not same_state(straight.model, resumed.model):
        print("FAILED: the resumed run differs from the straight run")
        return 1
    print(f"OK: {args.steps} steps straight == {half} + checkpoint + resume + {args.steps - half}, bit for bit; "
          f"BatchNorm counted one batch per step")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few steps, then check that a resume is bit for bit")
    parser.add_argument("--steps", type=int, default=None, help="total training steps (default 1200; --quick: 24)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--rho", type=float, default=0.05, help="SAM's radius")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=None, help="steps between progress lines")
    parser.add_argument("--checkpoint", type=Path, default=Path(tempfile.gettempdir()) / "sharpness_bn_cnn.pt",
                        help="where the mid-training checkpoint goes")
    parser.add_argument("--resume", type=Path, default=None, help="continue from this checkpoint")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: results independent of the machine)")
    args = parser.parse_args(argv)
    args.steps = args.steps or (24 if args.quick else 1200)
    args.log_every = args.log_every or (6 if args.quick else 100)
    torch.set_num_threads(args.threads)
    data = load_digits_tensors()

    start = time.perf_counter()
    if args.quick:
        status = check_resume_is_exact(data, args)
        print(f"done in {time.perf_counter() - start:.1f} s")
        return status

    run = Run(args)
    if args.resume is not None:
        run.load_state_dict(torch.load(args.resume))
        print(f"resumed from {args.resume} at step {run.step}", flush=True)
    if run.step < args.steps // 2:
        train(run, data, args, until=args.steps // 2, log_every=args.log_every)
        torch.save(run.state_dict(), args.checkpoint)
        print(f"checkpoint at step {run.step}: {args.checkpoint} (continue with --resume {args.checkpoint})", flush=True)
    train(run, data, args, until=args.steps, log_every=args.log_every)
    print(f"done in {time.perf_counter() - start:.1f} s; SAM steps taken: {run.opt.stats['steps']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
