"""sharpness: fast, exact Sharpness-Aware Minimization (SAM) and its family.

- :class:`sharpness.SAM`: SAM/ASAM around any ``torch.optim`` optimizer, native fused kernels
  for CPU tensors, foreach ops elsewhere.
- :class:`sharpness.LookSAM`, :class:`sharpness.EveryKSAM`: the second pass every k steps.
- :class:`sharpness.MSharpnessSAM`: one perturbation per micro-batch (m-sharpness).
- :mod:`sharpness.numpy`: the same methods over lists of numpy arrays.
- :func:`sharpness.frozen_running_stats`: keep BatchNorm statistics out of the second pass.
- :func:`sharpness.param_groups`: groups without perturbation, adaptivity or decay for biases,
  normalisation layers and embeddings, and per-name settings.
"""

from sharpness._core import __version__
from sharpness.batchnorm import disable_running_stats, enable_running_stats, frozen_running_stats
from sharpness.groups import param_groups
from sharpness.optim import SAM, EveryKSAM, LookSAM, MSharpnessSAM

__all__ = [
    "SAM",
    "EveryKSAM",
    "LookSAM",
    "MSharpnessSAM",
    "__version__",
    "disable_running_stats",
    "enable_running_stats",
    "frozen_running_stats",
    "param_groups",
]
