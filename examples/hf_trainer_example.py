"""The HuggingFace Trainer with SAM (``SAMTrainer``): a tiny GPT-2 built from a config (nothing is
downloaded) learns synthetic token sequences on the CPU.

    python examples/hf_trainer_example.py           # ~30 s
    python examples/hf_trainer_example.py --quick   # seconds; checks the steps and the loss

``SAMTrainer`` (sharpness.integrations.hf) wraps the optimizer the Trainer builds (AdamW here) in
:class:`sharpness.SAM` with ``sam_rho``; each training step runs the first pass at ``w``, perturbs,
replays the same batch at ``w + e`` and lets the Trainer clip and step. Gradient accumulation
(``gradient_accumulation_steps``) gives the large-batch SAM step. The logged loss is the first
pass's. The sequences are arithmetic progressions modulo the vocabulary (start and stride drawn at
random): after two tokens the rest is predictable, so the loss falls well below ln(vocabulary).

Needs ``pip install 'sharpness[torch]' transformers accelerate``.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
import warnings

import torch

import sharpness

try:
    from transformers import GPT2Config, GPT2LMHeadModel, PrinterCallback, TrainerCallback, TrainingArguments

    from sharpness.integrations.hf import SAMTrainer
except ImportError:
    sys.exit("this example needs transformers and accelerate: pip install transformers accelerate")

VOCAB = 64


class ProgressionDataset(torch.utils.data.Dataset):
    """``n`` sequences ``(s + i·d) mod VOCAB``, ``i < length``, ``s`` and ``d ∈ {1, 2, 3}`` random."""

    def __init__(self, n: int, length: int = 16, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, VOCAB, (n, 1), generator=g)
        strides = torch.randint(1, 4, (n, 1), generator=g)
        self.ids = (starts + strides * torch.arange(length)) % VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}  # the model shifts the labels itself


class PrintLosses(TrainerCallback):
    """One line per logging step (the Trainer's own printer writes dicts; this keeps the losses)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))
            print(f"step {state.global_step:5d}/{state.max_steps}  loss {logs['loss']:.4f}  "
                  f"lr {logs.get('learning_rate', float('nan')):.2e}", flush=True)


def the_sam(optimizer) -> sharpness.SAM:
    """The SAM inside the optimizer accelerate wraps."""
    while not isinstance(optimizer, sharpness.SAM):
        optimizer = optimizer.optimizer
    return optimizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps, then checks")
    parser.add_argument("--steps", type=int, default=None, help="default 400; --quick: 40")
    parser.add_argument("--rho", type=float, default=0.05, help="SAM's radius (sam_rho)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    args.steps = args.steps or (40 if args.quick else 400)
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    # ~0.1M parameters; special tokens inside the small vocabulary
    config = GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=64, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    printer = PrintLosses()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as output_dir:
        training_args = TrainingArguments(
            output_dir=output_dir, max_steps=args.steps, per_device_train_batch_size=32, gradient_accumulation_steps=1,
            learning_rate=3e-3, lr_scheduler_type="cosine", warmup_steps=args.steps // 10, max_grad_norm=1.0,
            logging_strategy="steps", logging_steps=max(args.steps // 10, 1), save_strategy="no", report_to="none",
            disable_tqdm=True, use_cpu=True, seed=0, dataloader_num_workers=0,
        )
        trainer = SAMTrainer(model=model, args=training_args, train_dataset=ProgressionDataset(4096), sam_rho=args.rho,
                             callbacks=[printer])
        trainer.remove_callback(PrinterCallback)  # it prints the logs as dicts: ours prints lines
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the Trainer's notes on the CPU and on unused arguments
            trainer.train()
    sam = the_sam(trainer.optimizer)
    print(f"done in {time.perf_counter() - start:.1f} s; SAM steps {sam.stats['steps']}; "
          f"final loss {printer.losses[-1]:.3f} (ln {VOCAB} = {math.log(VOCAB):.3f})")
    if args.quick:
        checks = {
            "every Trainer step is a SAM step": sam.stats["steps"] == trainer.state.global_step == args.steps,
            "the loss fell": printer.losses[-1] < printer.losses[0],
        }
        failed = [name for name, ok in checks.items() if not ok]
        if failed:
            print(f"FAILED: {failed}; losses {printer.losses}")
            return 1
        print("OK: " + "; ".join(checks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
