"""Train a one-hidden-layer MLP on scikit-learn's digits with SAM, in plain numpy.

Run: python docs/numpy_example.py   (needs scikit-learn)
"""

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from sharpness.numpy import SAM

X, y = load_digits(return_X_y=True)
X = (X / 16.0).astype(np.float32)
X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=0)

rng = np.random.default_rng(0)
params = [  # W1, b1, W2, b2: float32 arrays that SAM updates in place
    (rng.normal(size=(64, 64)) * np.sqrt(2 / 64)).astype(np.float32),
    np.zeros(64, np.float32),
    (rng.normal(size=(64, 10)) * np.sqrt(2 / 64)).astype(np.float32),
    np.zeros(10, np.float32),
]


def loss_and_grads(params, X, y):
    """Softmax cross-entropy of a ReLU MLP, with its gradients by hand."""
    W1, b1, W2, b2 = params
    h = np.maximum(X @ W1 + b1, 0.0)
    logits = h @ W2 + b2
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    n = len(y)
    loss = -np.log(p[np.arange(n), y]).mean()
    d_logits = p
    d_logits[np.arange(n), y] -= 1.0
    d_logits /= n
    d_h = (d_logits @ W2.T) * (h > 0)
    return loss, [X.T @ d_h, d_h.sum(axis=0), h.T @ d_logits, d_logits.sum(axis=0)]


opt = SAM(params, rho=0.05, base="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4)
for epoch in range(10):
    order = rng.permutation(len(y_train))
    losses = []
    for i in range(0, len(order), 32):
        batch = order[i : i + 32]
        # step() calls the function twice: at w, then at the perturbed w + e
        losses.append(opt.step(lambda ps: loss_and_grads(ps, X_train[batch], y_train[batch])))
    print(f"epoch {epoch + 1}: mean training loss {np.mean(losses):.4f}")

W1, b1, W2, b2 = params
accuracy = np.mean((np.maximum(X_test @ W1 + b1, 0.0) @ W2 + b2).argmax(axis=1) == y_test)
print(f"test accuracy: {accuracy:.3f}")
