"""Command line of ``sharpness`` (``python -m sharpness`` or the ``sharpness`` console script).

Sub-commands:

- ``demo``: the main job, plain SGD against SAM and ASAM on scikit-learn's digits with 40% of
  the training labels randomised (see :mod:`sharpness.demo`). ``--quick`` is a smoke test of a
  few seconds; ``--out DIR`` writes ``DIR/results.json``.

This module only parses arguments; the experiment lives in :mod:`sharpness.demo`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

from sharpness.demo import OPTIMIZERS, QUICK, SCHEDULES, DemoConfig

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(DemoConfig)}


def _optimizer_list(text: str) -> tuple[str, ...]:
    names = tuple(name.strip().lower() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in OPTIMIZERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"choose a comma-separated list of {', '.join(OPTIMIZERS)}; got {text!r}")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"an optimizer is listed twice: {text!r}")
    return names


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except those that are ``None`` (decided later, or absent)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def _add_demo_parser(subparsers: argparse._SubParsersAction) -> None:
    d = _DEFAULTS
    p = subparsers.add_parser(
        "demo",
        help="SGD vs SAM vs ASAM on digits with noisy labels (the main job)",
        description=(
            "Trains the same MLP from the same initial weights with SGD (momentum 0.9) and with "
            "SAM/ASAM around that SGD, on scikit-learn's digits with a fraction of the training "
            "labels randomised (test labels stay clean); prints test accuracy (mean ± std over "
            "seeds), final training loss on the noisy labels, the fraction of wrong labels the "
            "model memorised, and time per epoch relative to SGD."
        ),
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--optimizers", type=_optimizer_list, default=",".join(d["optimizers"]),
                   help=f"comma-separated, from {', '.join(OPTIMIZERS)}")
    p.add_argument("--epochs", type=_positive_int, default=None,
                   help=f"training epochs (default {d['epochs']}; --quick: {QUICK['epochs']})")
    p.add_argument("--lr", type=float, default=d["lr"], help="learning rate of every optimizer")
    p.add_argument("--momentum", type=float, default=d["momentum"], help="SGD momentum (also SAM's base SGD)")
    p.add_argument("--weight-decay", type=float, default=d["weight_decay"], help="SGD weight decay")
    p.add_argument("--rho", type=float, default=d["rho"], help="SAM's radius")
    p.add_argument("--asam-rho", type=float, default=d["asam_rho"], help="ASAM's radius (adaptive=True)")
    p.add_argument("--asam-eta", type=float, default=d["asam_eta"], help="ASAM's eta")
    p.add_argument("--batch-size", type=_positive_int, default=d["batch_size"], help="mini-batch size")
    p.add_argument("--schedule", choices=SCHEDULES, default=d["schedule"],
                   help="LR schedule per step: cosine to 0, step (x0.1 at 50%% and 75%%) or constant")
    p.add_argument("--label-noise", type=_fraction, default=d["label_noise"],
                   help="fraction of training labels replaced by a uniformly random class")
    p.add_argument("--hidden", type=_positive_int, default=d["hidden"], help="width of the hidden layers")
    p.add_argument("--depth", type=_positive_int, default=d["depth"], help="number of hidden layers")
    p.add_argument("--seeds", type=_positive_int, default=None,
                   help=f"number of seeds (default {d['seeds']}; --quick: {QUICK['seeds']})")
    p.add_argument("--first-seed", type=int, default=d["first_seed"], help="seeds run from this one up")
    p.add_argument("--data-seed", type=int, default=d["data_seed"], help="seed of the split and of the label noise")
    p.add_argument("--device", default=d["device"], help="torch device (cpu, cuda, mps ...)")
    p.add_argument("--threads", type=int, default=d["threads"],
                   help="CPU threads for torch and the SAM kernels; 0 leaves torch's default")
    p.add_argument("--out", metavar="DIR", default=None, help="write DIR/results.json")
    p.add_argument("--quick", action="store_true", help="smoke test: 1 seed, 2 epochs (explicit --epochs/--seeds win)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    import torch

    epochs = args.epochs if args.epochs is not None else (QUICK["epochs"] if args.quick else _DEFAULTS["epochs"])
    seeds = args.seeds if args.seeds is not None else (QUICK["seeds"] if args.quick else _DEFAULTS["seeds"])
    optimizers = args.optimizers if isinstance(args.optimizers, tuple) else _optimizer_list(args.optimizers)
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        print(f"sharpness demo: error: bad --device {args.device!r}: {err}", file=sys.stderr)
        return 2
    if device.type == "cuda" and not torch.cuda.is_available():
        print("sharpness demo: error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    try:
        config = DemoConfig(
            epochs=epochs,
            lr=args.lr,
            rho=args.rho,
            asam_rho=args.asam_rho,
            asam_eta=args.asam_eta,
            momentum=args.momentum,
            weight_decay=args.weight_decay,
            batch_size=args.batch_size,
            schedule=args.schedule,
            label_noise=args.label_noise,
            hidden=args.hidden,
            depth=args.depth,
            seeds=seeds,
            first_seed=args.first_seed,
            data_seed=args.data_seed,
            optimizers=optimizers,
            device=args.device,
            threads=args.threads if args.threads and args.threads > 0 else None,
            progress=not args.no_progress,
        )
    except ValueError as err:
        print(f"sharpness demo: error: {err}", file=sys.stderr)
        return 2
    from sharpness.demo import run_demo

    run_demo(config, out_dir=args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``sharpness`` argument parser with its sub-commands."""
    parser = argparse.ArgumentParser(
        prog="sharpness",
        description="sharpness: fast, exact Sharpness-Aware Minimization (SAM) for PyTorch.",
    )
    try:
        from sharpness import __version__
    except ImportError:  # pragma: no cover - the native module is missing
        __version__ = "unknown"
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    _add_demo_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status (0 on success)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help()
        return 2
    return int(args.run(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
