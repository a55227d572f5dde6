"""Measure the sharpness of a trained model with ``sharpness.measure``: m-sharpness, the top
Hessian eigenvalue, the Hessian's trace and a 1-D loss landscape, for an MLP trained with SGD and
the same MLP trained with SAM on scikit-learn's digits.

    python examples/measure_sharpness.py                          # ~15 s
    python examples/measure_sharpness.py --plot landscape.png     # and draw the two 1-D landscapes
    python examples/measure_sharpness.py --quick                  # seconds; checks the numbers

``measure_model`` below is the part to copy for your own model: it needs the model, a loss function
``loss_fn(outputs, targets)`` and a list of ``(inputs, targets)`` batches from the training set.
Every measure leaves the model exactly as it found it (weights, buffers, train/eval mode, ``.grad``).

Needs ``pip install 'sharpness[torch]' scikit-learn`` (and matplotlib for ``--plot``).
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import sharpness


def measure_model(model: nn.Module, loss_fn, batches, rho: float = 0.05, hessian_iters: int = 20,
                  trace_samples: int = 20, landscape_steps: int = 41, seed: int = 0) -> dict:
    """Every measure of :mod:`sharpness.measure` on ``model`` over ``batches``, with the seconds
    each took. Use the same batches, radius and seed for every model you compare."""
    results: dict = {}

    def timed(name, function, *args, **kwargs):
        start = time.perf_counter()
        results[name] = function(model, loss_fn, batches, *args, generator=torch.Generator().manual_seed(seed), **kwargs)
        results[name + "_seconds"] = time.perf_counter() - start

    with torch.no_grad():
        results["loss"] = sum(float(loss_fn(model(x), y)) for x, y in batches) / len(batches)
    # worst loss increase within distance rho of the weights (mean over the batches; each batch is one "m")
    timed("m_sharpness", sharpness.measure.m_sharpness, rho=rho, steps=5)
    # the curvature of the loss along its sharpest direction
    timed("lambda_max", sharpness.measure.hessian_max_eigenvalue, iters=hessian_iters, tol=1e-3)
    # the sum of the curvatures along all directions (an unbiased estimate)
    timed("hessian_trace", sharpness.measure.hessian_trace, samples=trace_samples)
    # L(w + α·d) for α in [-1, 1], d a random direction scaled to each filter of the weights
    timed("landscape", sharpness.measure.loss_landscape_1d, steps=landscape_steps, span=1.0)
    return results


def digits(seed: int = 0):
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        sys.exit("this example needs scikit-learn: pip install scikit-learn")
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x / 16.0, y, test_size=0.25, random_state=seed)
    as_float = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return as_float(x_train), torch.tensor(y_train), as_float(x_test), torch.tensor(y_test)


def train(optimizer_name: str, x, y, epochs: int, rho: float) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    if optimizer_name == "SAM":
        opt = sharpness.SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=0.05, momentum=0.9)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=generator).split(32):

            def closure(batch=batch):
                opt.zero_grad()
                loss = F.cross_entropy(model(x[batch]), y[batch])
                loss.backward()
                return loss

            opt.step(closure)
    return model


def plot_landscapes(results: dict[str, dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("--plot needs matplotlib: pip install matplotlib")
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results.items():
        ax.plot(r["landscape"]["alphas"], r["landscape"]["losses"], label=name)
    ax.set_xlabel("α  (weights w + α·d, d filter-normalised)")
    ax.set_yscale("log")  # the bottom of the valley, where the models differ, stays visible
    ax.set_ylabel("training loss (log scale)")
    ax.set_title("1-D loss landscape around each trained model (α = 0)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short training and measures, then checks")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs per model (default 30; --quick: 2)")
    parser.add_argument("--rho", type=float, default=0.05, help="SAM's radius and the m-sharpness radius")
    parser.add_argument("--m", type=int, default=128, help="m of m-sharpness: the size of each measured batch")
    parser.add_argument("--plot", default=None, help="write the 1-D landscapes to this PNG (needs matplotlib)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    args.epochs = args.epochs or (2 if args.quick else 30)
    torch.set_num_threads(args.threads)
    x_train, y_train, x_test, y_test = digits()
    measured = x_train[:256] if args.quick else x_train[:512]  # a fixed subset of the training set
    batches = [(measured[i : i + args.m], y_train[i : i + args.m]) for i in range(0, len(measured), args.m)]
    settings = dict(hessian_iters=5, trace_samples=3, landscape_steps=9) if args.quick else {}

    results = {}
    for name in ("SGD", "SAM"):
        start = time.perf_counter()
        model = train(name, x_train, y_train, args.epochs, args.rho)
        model.eval()  # no dropout or BatchNorm here; with them, eval() measures the model you deploy
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
        print(f"{name}: trained in {time.perf_counter() - start:.1f} s, test accuracy {accuracy:.3f}", flush=True)
        before = copy.deepcopy(model.state_dict())
        results[name] = r = measure_model(model, F.cross_entropy, batches, rho=args.rho, **settings)
        r["unchanged"] = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        print(f"  training loss {r['loss']:.4f}   m-sharpness {r['m_sharpness']:.4f} ({r['m_sharpness_seconds']:.2f} s)   "
              f"λ_max {r['lambda_max']:.3f} ({r['lambda_max_seconds']:.2f} s)   "
              f"trace {r['hessian_trace']:.2f} ({r['hessian_trace_seconds']:.2f} s)   "
              f"landscape ({r['landscape_seconds']:.2f} s): loss at α = ±1: "
              f"{float(r['landscape']['losses'][0]):.3f}, {float(r['landscape']['losses'][-1]):.3f}", flush=True)
    if args.plot:
        plot_landscapes(results, args.plot)

    if args.quick:
        numbers = ("m_sharpness", "lambda_max", "hessian_trace")
        failed = [
            name for name, r in results.items()
            if not (r["unchanged"] and r["m_sharpness"] >= 0 and all(math.isfinite(r[k]) for k in numbers)
                    and bool(torch.isfinite(r["landscape"]["losses"]).all()))
        ]
        if failed:
            print(f"FAILED: {failed}")
            return 1
        print("OK: every measure finite, m-sharpness >= 0, the models left exactly as they were")
    return 0


if __name__ == "__main__":
    sys.exit(main())
