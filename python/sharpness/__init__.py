"""sharpness: fast, exact Sharpness-Aware Minimization (SAM) and its family.

- :class:`sharpness.SAM`: SAM/ASAM around any ``torch.optim`` optimizer, native fused kernels
  for CPU tensors, foreach ops elsewhere.
- :class:`sharpness.LookSAM`, :class:`sharpness.EveryKSAM`: the second pass every k steps.
- :class:`sharpness.MSharpnessSAM`: one perturbation per micro-batch (m-sharpness).
- :class:`sharpness.SAMPa`: SAM with two independent (parallelisable) gradients.
- :class:`sharpness.SAF`, :class:`sharpness.MESA`: sharpness-aware loss terms for any optimizer.
- :class:`sharpness.AESAM`: SAM only where the gradient norm says the surface is sharp.
- :class:`sharpness.ESAM`: a random part of the weights perturbed, the sharpest samples reused.
- :class:`sharpness.LETS`: SAM/ASAM with the radius ρ learned on a validation batch.
- :class:`sharpness.LightSAM`, :class:`sharpness.AdaSAM`, :class:`sharpness.BayesianSAM`: standalone
  optimizers with adaptive perturbation and update; :class:`sharpness.GAM`, :class:`sharpness.CRSAM`:
  four- and three-gradient variants (first-order flatness, curvature).
- :class:`sharpness.GSAM`, :class:`sharpness.FriendlySAM`, :class:`sharpness.WSAM`,
  :class:`sharpness.RandomSAM`, :class:`sharpness.MongeSAM`, :class:`sharpness.SSAMF`,
  :class:`sharpness.SSAMD`: other perturbations and updates.
- :mod:`sharpness.numpy`: the same methods over lists of numpy arrays.
- :func:`sharpness.frozen_running_stats`: keep BatchNorm statistics out of the second pass.
- :func:`sharpness.param_groups`: groups without perturbation, adaptivity or decay for biases,
  normalisation layers and embeddings, and per-name settings.
- :func:`sharpness.mup2_param_groups`: μP²'s layerwise radii and learning rates for SAM under μP.
- :mod:`sharpness.measure`: sharpness measures of a trained model (m-sharpness, Hessian λ_max).

``import sharpness`` needs numpy only: the torch front (every name above but :mod:`sharpness.numpy`)
loads on first use, and says how to install PyTorch where it is missing (``pip install
'sharpness[torch]'``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from sharpness._core import __version__
from sharpness.methods import every_method

# The torch front, loaded on first use (PEP 562): name -> the module that defines it. Every method
# of sharpness.methods (torch-free, found by name) has its torch class in sharpness.optim.
_METHODS = ["SAM", *every_method()]
_TORCH_FRONT = {
    **dict.fromkeys(
        ["disable_running_stats", "enable_running_stats", "frozen_running_stats", "update_stats_once"], "sharpness.batchnorm"
    ),
    "param_groups": "sharpness.groups",
    "mup2_param_groups": "sharpness.mup2",
    "SAF": "sharpness.regularizers",
    "MESA": "sharpness.regularizers",
    "find_rho": "sharpness.rho_finder",
    **dict.fromkeys(_METHODS, "sharpness.optim"),
}
_TORCH_MODULES = ("measure",)  # submodules reachable as attributes after `import sharpness`


def __getattr__(name: str) -> Any:
    if name in _TORCH_FRONT or name in _TORCH_MODULES:
        target = _TORCH_FRONT.get(name, f"sharpness.{name}")
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as error:
            if error.name != "torch" and not (error.name or "").startswith("torch."):
                raise
            raise ModuleNotFoundError(
                f"sharpness.{name} is part of the torch front and needs PyTorch, which is not installed: "
                "pip install 'sharpness[torch]' (the numpy front, sharpness.numpy, works without it)",
                name="torch",
            ) from error
        value = module if name in _TORCH_MODULES else getattr(module, name)
        globals()[name] = value  # once loaded, an ordinary attribute
        return value
    raise AttributeError(f"module 'sharpness' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_TORCH_MODULES))


if TYPE_CHECKING:  # what type checkers and IDEs see: the names as plain imports
    from sharpness import measure as measure
    from sharpness.batchnorm import disable_running_stats, enable_running_stats, frozen_running_stats, update_stats_once
    from sharpness.groups import param_groups
    from sharpness.mup2 import mup2_param_groups
    from sharpness.optim import SAM as SAM
    from sharpness.regularizers import MESA, SAF
    from sharpness.rho_finder import find_rho

__all__ = [
    *_METHODS,
    "SAF",
    "MESA",
    "__version__",
    "disable_running_stats",
    "enable_running_stats",
    "frozen_running_stats",
    "update_stats_once",
    "param_groups",
    "mup2_param_groups",
    "find_rho",
]
