"""Torch optimizers of the SAM family (one module per method family)."""

from sharpness.optim.looksam import EveryKSAM, LookSAM
from sharpness.optim.msam import MSharpnessSAM
from sharpness.optim.sam import SAM

__all__ = ["SAM", "EveryKSAM", "LookSAM", "MSharpnessSAM"]
