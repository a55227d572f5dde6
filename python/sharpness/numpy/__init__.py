"""The numpy front: SAM-family optimizers over lists of numpy arrays, updated in place, without torch.

:class:`SAM` is the front; every method of :mod:`sharpness.methods` gets a class built here from
its rule and :class:`SAM`. The arithmetic runs in the native kernels (:mod:`sharpness._core`), one
call per dtype over all arrays. Methods not yet moved to :mod:`sharpness.methods` keep a module of
their own here (``_LEGACY``).
"""

from importlib import import_module
from typing import Any

from sharpness.methods import every_method
from sharpness.numpy.front import SAM

# Methods whose numpy front is still a module of its own (name -> module).
_LEGACY = {
    "AdaSAM": "standalone", "AESAM": "aesam", "BayesianSAM": "standalone", "CRSAM": "curvature",
    "FriendlySAM": "projected", "GAM": "curvature", "LETS": "lets", "LightSAM": "lightsam", "MongeSAM": "projected",
    "MSharpnessSAM": "msam", "RandomSAM": "rsam", "SAMPa": "sampa", "SSAMD": "ssam", "SSAMF": "ssam", "WSAM": "projected",
}


def _numpy_front(rule: type) -> type:
    return type(rule.__name__, (rule, SAM), {"__doc__": rule.__doc__, "__module__": __name__, "__qualname__": rule.__name__})


_RULES = every_method()
for _name, _rule in _RULES.items():
    globals()[_name] = _numpy_front(_rule)
for _name, _module in _LEGACY.items():
    if _name not in _RULES:
        globals()[_name] = getattr(import_module(f"{__name__}.{_module}"), _name)

__all__ = ["SAM", *sorted(set(_RULES) | set(_LEGACY))]


def __getattr__(name: str) -> Any:  # for type checkers: the classes above are built at import
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
