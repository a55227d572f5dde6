"""The numpy front: SAM-family optimizers over lists of numpy arrays, updated in place.

The arithmetic runs in the native kernels (:mod:`sharpness._core`), one call per dtype over all
arrays; see :class:`SAM`.
"""

from sharpness.numpy.sam import SAM

__all__ = ["SAM"]
