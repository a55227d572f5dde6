"""SAM on a model written in numpy, with the numpy front (``sharpness.numpy``): no torch anywhere.

    python examples/numpy_without_torch.py           # ~12 s: SAM, then LookSAM
    python examples/numpy_without_torch.py --quick   # seconds; checks that torch was never imported

A one-hidden-layer MLP with hand-written gradients classifies synthetic data (overlapping Gaussian
clusters, so the test accuracy stays below 100%). The arrays are updated in place by the
optimizer; both calling forms are shown:

- ``opt.step(grad_fn)``: ``grad_fn(params) -> (loss, grads)`` runs at ``w`` and at ``w + e``;
- ``if opt.first_step(grads): opt.second_step(grads_at_w_plus_e)``: LookSAM's one-pass steps
  return False (no second pass).

Needs ``pip install sharpness`` only (numpy; no torch, no scikit-learn).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from sharpness.numpy import SAM, LookSAM


def make_data(rng: np.random.Generator, n: int, classes: int = 10, dim: int = 16):
    """Gaussian clusters around random centres, split 3:1 into training and test sets."""
    centres = rng.normal(size=(classes, dim)) * 0.8
    labels = rng.integers(0, classes, size=n)
    x = (centres[labels] + rng.normal(size=(n, dim))).astype(np.float32)
    split = 3 * n // 4
    return x[:split], labels[:split], x[split:], labels[split:]


def init_params(rng: np.random.Generator, dim: int, hidden: int, classes: int) -> list[np.ndarray]:
    """W1, b1, W2, b2: float32, C-contiguous (the optimizer updates them in place)."""
    return [
        (rng.normal(size=(dim, hidden)) * np.sqrt(2 / dim)).astype(np.float32),
        np.zeros(hidden, np.float32),
        (rng.normal(size=(hidden, classes)) * np.sqrt(2 / hidden)).astype(np.float32),
        np.zeros(classes, np.float32),
    ]


def loss_and_grads(params: list[np.ndarray], x: np.ndarray, y: np.ndarray) -> tuple[float, list[np.ndarray]]:
    """Softmax cross-entropy of a ReLU MLP and its gradients (by hand)."""
    w1, b1, w2, b2 = params
    h = np.maximum(x @ w1 + b1, 0.0)
    logits = h @ w2 + b2
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    n = len(y)
    loss = float(-np.log(p[np.arange(n), y]).mean())
    d_logits = p
    d_logits[np.arange(n), y] -= 1.0
    d_logits /= n
    d_h = (d_logits @ w2.T) * (h > 0)
    return loss, [x.T @ d_h, d_h.sum(axis=0), h.T @ d_logits, d_logits.sum(axis=0)]


def accuracy(params: list[np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    w1, b1, w2, b2 = params
    return float(((np.maximum(x @ w1 + b1, 0.0) @ w2 + b2).argmax(axis=1) == y).mean())


def train(name: str, args: argparse.Namespace, data) -> tuple[float, float]:
    """Trains a fresh MLP with ``name``'s optimizer; returns the first and last epoch's mean loss."""
    x_train, y_train, x_test, y_test = data
    rng = np.random.default_rng(args.seed)
    params = init_params(rng, x_train.shape[1], args.hidden, int(y_train.max()) + 1)
    if name == "SAM":
        opt = SAM(params, rho=0.05, base="sgd", lr=0.05, momentum=0.9, weight_decay=1e-4)
    else:  # a SAM step every k = 3 steps; the ones between reuse the last SAM step's direction
        opt = LookSAM(params, k=3, alpha=0.7, rho=0.05, base="sgd", lr=0.05, momentum=0.9, weight_decay=1e-4)
    epoch_losses = []
    for epoch in range(1, args.epochs + 1):
        order = rng.permutation(len(y_train))
        losses = []
        for start in range(0, len(order), args.batch_size):
            batch = order[start : start + args.batch_size]
            x, y = x_train[batch], y_train[batch]
            if name == "SAM":
                # step() calls the function at w, then at the perturbed w + e
                losses.append(opt.step(lambda ps: loss_and_grads(ps, x, y)))
            else:
                loss, grads = loss_and_grads(params, x, y)  # at w
                if opt.first_step(grads):  # a SAM step: the weights are now at w + e
                    opt.second_step(loss_and_grads(params, x, y)[1])  # the gradient there; back to w, step
                losses.append(loss)
        epoch_losses.append(float(np.mean(losses)))
        if epoch % args.log_every == 0 or epoch == args.epochs:
            print(f"{name:8s} epoch {epoch:3d}/{args.epochs}  loss {epoch_losses[-1]:.4f}  "
                  f"test accuracy {accuracy(params, x_test, y_test):.3f}", flush=True)
    return epoch_losses[0], epoch_losses[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few epochs, then checks (torch never imported)")
    parser.add_argument("--epochs", type=int, default=None, help="default 60; --quick: 6")
    parser.add_argument("--samples", type=int, default=None, help="data set size (default 20000; --quick: 4000)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=None)
    args = parser.parse_args(argv)
    args.epochs = args.epochs or (6 if args.quick else 60)
    args.samples = args.samples or (4000 if args.quick else 20000)
    args.log_every = args.log_every or (2 if args.quick else 10)

    start = time.perf_counter()
    data = make_data(np.random.default_rng(args.seed + 1), args.samples)
    results = {name: train(name, args, data) for name in ("SAM", "LookSAM")}
    print(f"done in {time.perf_counter() - start:.1f} s")
    if args.quick:
        if "torch" in sys.modules:
            print("FAILED: torch was imported")
            return 1
        if not all(last < first for first, last in results.values()):
            print(f"FAILED: the loss did not fall: {results}")
            return 1
        print("OK: both methods learned, and torch was never imported")
    return 0


if __name__ == "__main__":
    sys.exit(main())
