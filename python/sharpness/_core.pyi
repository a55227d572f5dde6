"""Stubs of the native module `sharpness._core` (Rust, PyO3).

Every tensor argument is one C-contiguous ndarray (a flat buffer) or a sequence of them (a list of
tensors); the lists of one call are aligned: array ``i`` of every argument has the same shape.
One call takes one dtype: float32, float64, float16, or bfloat16 passed as its raw ``uint16``
storage. Arrays that are written must be writable and must not overlap any other array of the
call. Violations raise ``TypeError`` (dtype, argument type) or ``ValueError`` (shape, count,
contiguity, alignment, read-only, aliasing). The GIL is released while a kernel runs; results do
not depend on the number of threads.
"""

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

# Stub-only: private, so stubtest does not look for it in the module.
_Tensors = npt.NDArray[np.generic] | Sequence[npt.NDArray[np.generic]]

__all__ = [
    "__version__",
    "CHUNK",
    "sum_of_squares",
    "sum_of_squares_adaptive",
    "perturb",
    "perturb_adaptive",
    "copy",
    "perturb_offsets",
    "subtract_offsets",
    "restore_sgd",
    "restore_adam",
    "any_nonzero",
    "dot",
    "axpby",
    "num_threads",
]

__version__: str
CHUNK: int

def sum_of_squares(grads: _Tensors) -> float:
    """Σ g² over every element, accumulated in float64."""

def sum_of_squares_adaptive(weights: _Tensors, grads: _Tensors, eta: float) -> float:
    """Σ ((|w| + eta)·g)², the squared norm of ASAM's ``T_w g``, accumulated in float64."""

def perturb(weights: _Tensors, grads: _Tensors, backups: _Tensors, scale: float) -> None:
    """``backups ← weights; weights ← weights + scale·grads`` (SAM's ascent, ``scale = ρ/‖g‖``)."""

def perturb_adaptive(weights: _Tensors, grads: _Tensors, backups: _Tensors, scale: float, eta: float) -> None:
    """``backups ← weights; weights ← weights + scale·(|weights| + eta)²·grads`` (ASAM)."""

def copy(src: _Tensors, dst: _Tensors) -> None:
    """``dst ← src``, bit for bit (sources first, as in the engines' ``copy``)."""

def perturb_offsets(weights: _Tensors, grads: _Tensors, offsets: _Tensors, scale: float, eta: float | None = None) -> None:
    """``offsets ← bf16(e)``, ``weights ← weights + offsets``, with ``e = scale·grads`` or, given
    ``eta``, ASAM's ``e = scale·(|weights| + eta)²·grads`` (memory="subtract"). ``offsets`` are
    bfloat16 as raw ``uint16`` whatever the weights' dtype (a TypeError otherwise)."""

def subtract_offsets(weights: _Tensors, offsets: _Tensors) -> None:
    """``weights ← weights − offsets``: undoes :func:`perturb_offsets` to within one ulp of
    ``max(|w|, |w + o|)`` (not bit-exact)."""

def restore_sgd(
    weights: _Tensors,
    backups: _Tensors | None,
    grads: _Tensors,
    momentum_buffers: _Tensors | None,
    *,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    init_momentum: bool = False,
) -> None:
    """Restore ``weights`` from ``backups``, then one ``torch.optim.SGD`` step with ``grads``
    (``backups=None``: a plain step in place, for steps without a perturbation).

    ``momentum_buffers`` is required when ``momentum != 0``; ``init_momentum`` says the buffers do
    not exist yet (torch then starts them as the first update direction).
    """

def restore_adam(
    weights: _Tensors,
    backups: _Tensors | None,
    grads: _Tensors,
    exp_avgs: _Tensors,
    exp_avg_sqs: _Tensors,
    max_exp_avg_sqs: _Tensors | None = None,
    *,
    step: float,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float = 0.0,
    decoupled: bool = False,
    amsgrad: bool = False,
    maximize: bool = False,
) -> None:
    """Restore ``weights`` from ``backups``, then one ``torch.optim.Adam`` step (``AdamW`` with
    ``decoupled=True``) with ``grads`` (``backups=None``: a plain step in place). ``step`` is the
    step count after this step (from 1); ``max_exp_avg_sqs`` is given exactly when ``amsgrad`` is
    true."""

def dot(a: _Tensors, b: _Tensors) -> float:
    """Σ a·b over every element, accumulated in float64."""

def axpby(x: _Tensors, y: _Tensors, alpha: float, beta: float) -> None:
    """``y ← alpha·x + beta·y`` (computed in float32 for 16-bit types, rounded once)."""

def any_nonzero(tensors: _Tensors) -> list[bool]:
    """For each array, whether any element is non-zero (NaN counts, -0.0 does not); each scan
    stops at the first non-zero block."""

def num_threads() -> int:
    """Threads the kernels run on (rayon's pool; ``RAYON_NUM_THREADS`` sets it)."""
