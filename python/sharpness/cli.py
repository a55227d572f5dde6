"""Command line of ``sharpness`` (``python -m sharpness`` or the ``sharpness`` console script).

Sub-commands:

- ``demo``: the main job, plain SGD against SAM and ASAM on scikit-learn's digits with 40% of
  the training labels randomised (see :mod:`sharpness.demo`), for an MLP and a small CNN
  (``--models``), with the sharpness of the final models (m-sharpness, top Hessian eigenvalue).
  About 2.5 minutes on a 2-core CPU at the defaults; ``--quick`` is a smoke test of seconds.
  ``--out DIR`` (default ``./sharpness-report``) is the report folder: per model (in
  ``DIR/<model>/`` when there are several) ``results.json``, ``summary.csv``, ``summary.json``,
  ``accuracy.png``, ``landscape_1d.png``, ``landscape_2d.png``, and the combined table
  ``DIR/summary.csv`` and ``DIR/summary.json`` (``--no-report``: none). ``--rho auto``: the
  radii found by :func:`sharpness.find_rho` before the runs (within ``--rho-budget``, 20% of a
  run's steps by default), its table printed and ``rho_search.png`` in each report folder.
- ``bench``: runs ``benches/bench_step.py`` of a source checkout with the arguments that follow
  (``--help`` there lists the timed methods).

The usage lines name the command as it was typed: ``python -m sharpness`` or ``sharpness``.

This module only parses arguments; the experiment lives in :mod:`sharpness.demo`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from typing import Any

try:
    from sharpness.demo import DEFAULT_MODELS, MODELS, OPTIMIZERS, QUICK, SCHEDULES, DemoConfig, MissingRequirement
except ModuleNotFoundError as error:  # the numpy-only install: say what to install, no traceback
    if error.name != "torch":
        raise
    raise SystemExit("sharpness's command line (the demo) needs PyTorch: pip install 'sharpness[demo]'") from error

_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(DemoConfig)}  # one value per field type


def _optimizer_list(text: str) -> tuple[str, ...]:
    names = tuple(name.strip().lower() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in OPTIMIZERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"choose a comma-separated list of {', '.join(OPTIMIZERS)}; got {text!r}")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"an optimizer is listed twice: {text!r}")
    return names


def _model_list(text: str) -> tuple[str, ...]:
    names = tuple(name.strip().lower() for name in text.split(",") if name.strip())
    if not names or any(name not in MODELS for name in names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"choose a comma-separated list of {', '.join(MODELS)}; got {text!r}")
    return names


def _float_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from err
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers > 0, got {text!r}")
    return values


def _rho(text: str) -> float | str:
    """``--rho``: a radius >= 0, or ``auto`` (found by sharpness.find_rho before the runs)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a number >= 0 or 'auto', got {text!r}") from err
    if not (value >= 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a number >= 0 or 'auto', got {text!r}")
    return value


def _budget(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text}")
    return value


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
            "For each network (an MLP and a small CNN by default, about 2.5 minutes on a 2-core CPU), "
            "trains the same model from the same initial weights with SGD (momentum 0.9) and with "
            "SAM/ASAM around that SGD, on scikit-learn's digits with a fraction of the training "
            "labels randomised (test labels stay clean); prints test accuracy (mean ± std over "
            "seeds), final training loss on the noisy labels, the fraction of wrong labels the "
            "model memorised, the sharpness of the final models (m-sharpness, top Hessian "
            "eigenvalue) and time per epoch relative to SGD; writes a report folder (table as CSV "
            "and JSON, accuracy curves, filter-normalised 1-D and 2-D loss landscapes as PNG)."
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
    p.add_argument("--rho", type=_rho, default=d["rho"],
                   help="SAM's radius, or 'auto': before the runs, sharpness.find_rho picks the radius of every "
                   "optimizer that takes one (ASAM's too) within --rho-budget of a run; prints its table, writes "
                   "rho_search.png")
    p.add_argument("--rho-budget", type=_budget, default=d["rho_budget"],
                   help="with --rho auto: the search's steps, as a fraction of one training run's")
    p.add_argument("--asam-rho", type=float, default=d["asam_rho"], help="ASAM's radius (adaptive=True)")
    p.add_argument("--asam-eta", type=float, default=d["asam_eta"], help="ASAM's eta")
    p.add_argument("--every-k", type=_positive_int, default=d["every_k"],
                   help="looksam and everyk: a second gradient pass every k steps")
    p.add_argument("--batch-size", type=_positive_int, default=d["batch_size"], help="mini-batch size")
    p.add_argument("--schedule", choices=SCHEDULES, default=d["schedule"],
                   help="LR schedule per step: cosine to 0, step (x0.1 at 50%% and 75%%) or constant")
    p.add_argument("--label-noise", type=_fraction, default=d["label_noise"],
                   help="fraction of training labels replaced by a uniformly random class")
    p.add_argument("--hidden", type=_positive_int, default=d["hidden"], help="width of the hidden layers")
    p.add_argument("--models", type=_model_list, default=",".join(DEFAULT_MODELS),
                   help=f"comma-separated, from {', '.join(MODELS)} (the CNN: two 3x3 convolutions on the 8x8 "
                   "images); with several, one report sub-folder each and the combined table in DIR")
    p.add_argument("--depth", type=_positive_int, default=d["depth"], help="number of hidden layers")
    p.add_argument("--seeds", type=_positive_int, default=None,
                   help=f"number of seeds (default {d['seeds']}; --quick: {QUICK['seeds']})")
    p.add_argument("--first-seed", type=int, default=d["first_seed"], help="seeds run from this one up")
    p.add_argument("--data-seed", type=int, default=d["data_seed"], help="seed of the split and of the label noise")
    p.add_argument("--device", default=d["device"], help="torch device (cpu, cuda, mps ...)")
    p.add_argument("--threads", type=int, default=d["threads"],
                   help="CPU threads for torch and the SAM kernels; 0 leaves torch's default")
    p.add_argument("--measure-size", type=int, default=None,
                   help=f"training examples the sharpness and the landscapes of the final models are measured on "
                   f"(0: no measures; default {d['measure_size']}; --quick: {QUICK['measure_size']})")
    p.add_argument("--measure-rho", type=float, default=d["measure_rho"],
                   help="radius of the m-sharpness ball, the same for every optimizer")
    p.add_argument("--measure-m", type=_positive_int, default=d["measure_m"], help="m of m-sharpness (batch size)")
    p.add_argument("--landscape-steps", type=_positive_int, default=None,
                   help=f"grid points per axis of the 2-D loss landscape (default {d['landscape_steps']}; "
                   f"--quick: {QUICK['landscape_steps']})")
    p.add_argument("--landscape-span", type=float, default=d["landscape_span"],
                   help="the landscapes cover [-span, span] along each filter-normalised direction")
    p.add_argument("--out", metavar="DIR", default="sharpness-report",
                   help="report folder: results.json, summary.csv, summary.json, accuracy.png, landscape_1d.png, "
                   "landscape_2d.png (in DIR/<model>/ with several models)")
    p.add_argument("--tune", action="store_true",
                   help="pick each optimizer's lr from --tune-lrs by accuracy on a validation split "
                   "of the noisy training set, before the runs")
    p.add_argument("--tune-lrs", type=_float_list, default=",".join(f"{v:g}" for v in d["tune_lrs"]),
                   help="comma-separated learning rates tried by --tune")
    p.add_argument("--no-report", action="store_true", help="print the table only, write nothing")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 1 seed, 2 epochs, 11×11 landscapes, measures on 128 examples (explicit options win)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--rho-sweep", metavar="FACTORS", nargs="?", const="default", default=None,
                   help="instead of the table: test accuracy against rho, each optimizer at its default radius "
                   "times each factor (comma-separated; without a value 0.125,0.25,...,8), for the first of "
                   "--models; writes DIR/sweep.csv, sweep.json, sweep.png")
    p.set_defaults(run=_run_demo)


def _pick(value: int | None, name: str, quick: bool) -> int:
    """An explicit option wins, then ``--quick``'s value, then the default."""
    if value is not None:
        return value
    return QUICK[name] if quick and name in QUICK else _DEFAULTS[name]


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
            rho=_DEFAULTS["rho"] if args.rho == "auto" else args.rho,
            rho_auto=args.rho == "auto",
            rho_budget=args.rho_budget,
            asam_rho=args.asam_rho,
            asam_eta=args.asam_eta,
            every_k=args.every_k,
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
            measure_size=_pick(args.measure_size, "measure_size", args.quick),
            measure_rho=args.measure_rho,
            measure_m=args.measure_m,
            landscape_steps=_pick(args.landscape_steps, "landscape_steps", args.quick),
            landscape_span=args.landscape_span,
            tune=args.tune,
            tune_lrs=args.tune_lrs if isinstance(args.tune_lrs, tuple) else _float_list(args.tune_lrs),
        )
    except ValueError as err:
        print(f"sharpness demo: error: {err}", file=sys.stderr)
        return 2
    models = args.models if isinstance(args.models, tuple) else _model_list(args.models)
    if args.rho_sweep is not None:
        from sharpness.sweep import DEFAULT_FACTORS, run_rho_sweep

        if config.rho_auto:
            print("sharpness demo: error: --rho-sweep needs a radius to multiply: --rho auto is for training runs",
                  file=sys.stderr)
            return 2
        try:
            factors = DEFAULT_FACTORS if args.rho_sweep == "default" else _float_list(args.rho_sweep)
        except argparse.ArgumentTypeError as err:
            print(f"sharpness demo: error: --rho-sweep: {err}", file=sys.stderr)
            return 2
        config = dataclasses.replace(config, model=models[0])
        try:
            run_rho_sweep(config, factors, out_dir=None if args.no_report else args.out)
        except MissingRequirement as err:  # raised before any training
            print(f"sharpness demo: error: {err}", file=sys.stderr)
            return 2
        return 0
    from sharpness.demo import run_models

    try:
        run_models(config, models, out_dir=None if args.no_report else args.out)
    except MissingRequirement as err:  # raised before any training
        print(f"sharpness demo: error: {err}", file=sys.stderr)
        return 2
    return 0


def _bench_script() -> str | None:
    """``benches/bench_step.py`` of the source checkout this package runs from, if any."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.path.join(root, "benches", "bench_step.py")
    return path if os.path.isfile(path) else None


def _add_bench_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench",
        help="time one SAM step against torch implementations (benches/bench_step.py, source checkout only; "
        "bench --help lists its options and methods)",
        description="Runs benches/bench_step.py of the source checkout with every argument that follows "
        "(try: sharpness bench --quick, sharpness bench --help).",
        add_help=False,
    )
    p.set_defaults(run=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    import subprocess

    script = _bench_script()
    if script is None:
        print(
            "sharpness bench: error: benches/bench_step.py is not part of an installed package; "
            "run it from a source checkout (git clone, then pip install -e .)",
            file=sys.stderr,
        )
        return 2
    extra = list(args.extra)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    # the script's usage line then names the command that was typed, not bench_step.py
    env = {**os.environ, "SHARPNESS_BENCH_PROG": f"{args.prog} bench"}
    return subprocess.call([sys.executable, script, *extra], env=env)


def invoked_as() -> str:
    """The command as the user typed it, for usage lines: ``python -m sharpness`` when run as a
    module (``sys.argv[0]`` is then this package's ``__main__.py``), else ``sharpness``."""
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "__main__.py")
    as_module = bool(sys.argv) and os.path.realpath(sys.argv[0]) == os.path.realpath(here)
    return "python -m sharpness" if as_module else "sharpness"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The argument parser with its sub-commands; ``prog`` (default :func:`invoked_as`) names the
    command in usage lines."""
    parser = argparse.ArgumentParser(
        prog=prog or invoked_as(),
        description="sharpness: fast, exact Sharpness-Aware Minimization (SAM) for PyTorch.",
    )
    try:
        from sharpness import __version__
    except ImportError:  # pragma: no cover - the native module is missing
        __version__ = "unknown"
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    _add_demo_parser(subparsers)
    _add_bench_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status (0 on success)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    args.prog = parser.prog
    if getattr(args, "run", None) is None:
        parser.print_help()
        return 2
    return int(args.run(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
