"""AE-SAM's decision rule (Jiang et al., ICLR 2023, arXiv:2304.14647, Algorithm 1), shared by
both fronts: the checked arguments, the initial variance and the threshold coefficient ``c_t``.
The algorithm itself is stated in :class:`sharpness.optim.AESAM`."""

from __future__ import annotations

from typing import Any

from sharpness._validation import number

#: σ²_{−1}: a tiny positive variance, so the first threshold is finite and well defined.
VAR_INIT = 1e-10


def threshold_coefficient(t: int, total_steps: int, lambda1: float, lambda2: float) -> float:
    """``c_t = (t/T)·λ₁ + (1 − t/T)·λ₂`` with ``t/T`` clipped to ``[0, 1]``."""
    frac = min(max(t / total_steps, 0.0), 1.0)
    return frac * lambda1 + (1.0 - frac) * lambda2


def check_aesam_args(total_steps: Any, delta: Any, lambda1: Any, lambda2: Any) -> tuple[int, float, float, float]:
    """The four checked and normalised (both fronts share this)."""
    return (
        number("total_steps", total_steps, minimum=1, integer=True),
        number("delta", delta, minimum=0, below=1),
        number("lambda1", lambda1),
        number("lambda2", lambda2),
    )
