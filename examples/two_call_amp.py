"""SAM's two-call API (``first_step`` / ``second_step``) under mixed precision: ``torch.autocast``
and a ``torch.amp.GradScaler``, the loop of docs/guide.md "Mixed precision with GradScaler".

    python examples/two_call_amp.py                    # ~40 s, SAM, float16 autocast
    python examples/two_call_amp.py --method looksam   # a variant with one-pass steps, same loop
    python examples/two_call_amp.py --quick            # seconds: SAM and LookSAM, checks the run

Runs on a GPU when there is one (float16) and on the CPU otherwise (float16 autocast works there
too, and ``GradScaler("cpu")``; ``--dtype bfloat16`` for bf16, which needs no scaler but takes
the same loop). When a scaled gradient overflows, SAM restores the weights, takes no step and
counts it in ``stats["amp_skipped_steps"]`` while the scaler backs off; the line printed every
few steps shows both. This small model does not overflow at the default initial scale (2¹⁶):
``--init-scale 1e9`` (what ``--quick`` uses) makes the first steps overflow.

Needs ``pip install 'sharpness[torch]' scikit-learn``.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import sharpness

METHODS = {
    "sam": lambda params, lr: sharpness.SAM(params, torch.optim.SGD, rho=0.05, lr=lr, momentum=0.9),
    # a SAM step every k=4 steps, one-pass steps in between: first_step returns False on those
    "looksam": lambda params, lr: sharpness.LookSAM(params, torch.optim.SGD, k=4, rho=0.05, lr=lr, momentum=0.9),
}


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        sys.exit("this example needs scikit-learn: pip install scikit-learn")
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x / 16.0, y, test_size=0.25, random_state=0)
    as_float = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return as_float(x_train), torch.tensor(y_train), as_float(x_test), torch.tensor(y_test)


def train(method: str, args: argparse.Namespace, data, device: str) -> dict[str, float]:
    """Trains an MLP with ``method`` under autocast and a GradScaler; returns the first and last
    logged losses, the test accuracy and the optimizer's counters."""
    x_train, y_train, x_test, y_test = (t.to(device) for t in data)
    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)).to(device)
    opt = METHODS[method](model.parameters(), args.lr)  # float32 (master) weights: the recommended policy
    dtype = getattr(torch, args.dtype)
    scaler = torch.amp.GradScaler(device, init_scale=args.init_scale)
    generator = torch.Generator().manual_seed(args.seed)
    logged: list[float] = []
    window: list[float] = []
    for step in range(1, args.steps + 1):
        batch = torch.randint(0, len(x_train), (args.batch_size,), generator=generator).to(device)
        x, y = x_train[batch], y_train[batch]

        with torch.autocast(device, dtype=dtype):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()  # g, scaled
        if opt.first_step(zero_grad=True, grad_scaler=scaler):  # g unscaled here; the weights at w + e
            with torch.autocast(device, dtype=dtype):
                loss_at_perturbed = F.cross_entropy(model(x), y)
            scaler.scale(loss_at_perturbed).backward()  # g̃, scaled
        # (False: a one-pass step of LookSAM; the update direction waits in p.grad, scaled)
        scaler.unscale_(opt)  # optional: clipping needs the true gradient (after the backward)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)  # restores w; the base step, or none on inf/NaN
        scaler.update()
        opt.zero_grad()  # scaler.step leaves g̃ in p.grad

        window.append(loss.item())
        if step % args.log_every == 0 or step == args.steps:
            logged.append(sum(window) / len(window))
            window.clear()
            print(
                f"{method:8s} step {step:4d}/{args.steps}  loss {logged[-1]:.4f}  scale {scaler.get_scale():g}  "
                f"skipped {opt.stats['amp_skipped_steps']}",
                flush=True,
            )
    with torch.no_grad(), torch.autocast(device, dtype=dtype):
        test_accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    finite = all(p.dtype == torch.float32 and bool(torch.isfinite(p).all()) for p in model.parameters())
    print(f"{method:8s} test accuracy {test_accuracy:.3f}", flush=True)
    return {"first": logged[0], "last": logged[-1], "accuracy": test_accuracy, "finite": finite,
            "skipped": opt.stats["amp_skipped_steps"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps of SAM and of LookSAM, then checks")
    parser.add_argument("--method", choices=sorted(METHODS), default="sam")
    parser.add_argument("--steps", type=int, default=None, help="default 1500; --quick: 60")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16", help="autocast's dtype")
    parser.add_argument("--init-scale", type=float, default=None, help="the scaler's initial scale (default 2**16; --quick: 1e9)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    args.steps = args.steps or (60 if args.quick else 1500)
    args.log_every = args.log_every or (20 if args.quick else 100)
    args.init_scale = args.init_scale or (1e9 if args.quick else 2.0**16)
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device {device}, autocast {args.dtype}, GradScaler({device!r})", flush=True)
    data = load_digits_tensors()

    start = time.perf_counter()
    results = {m: train(m, args, data, device) for m in (sorted(METHODS) if args.quick else [args.method])}
    print(f"done in {time.perf_counter() - start:.1f} s")
    if args.quick:
        ok = {m: r["finite"] and r["last"] < r["first"] and 0 < r["skipped"] < args.steps // 2 for m, r in results.items()}
        failed = [m for m, passed in ok.items() if not passed]
        if failed:
            print(f"FAILED: {failed}: {results}")
            return 1
        print("OK: the overflowing steps were skipped, then every run learned (loss fell); float32 weights, finite")
    return 0


if __name__ == "__main__":
    sys.exit(main())
