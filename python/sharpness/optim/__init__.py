"""Torch optimizers of the SAM family: :class:`SAM` (the torch front) and, for every method of
:mod:`sharpness.methods`, a class built here from the method's rule and :class:`SAM`. Methods not
yet moved there keep a module of their own here (``_LEGACY``)."""

from importlib import import_module
from typing import Any

from sharpness.methods import every_method
from sharpness.optim.sam import SAM

# Methods whose rule still lives in a torch-front module of its own (name -> module).
_LEGACY = {
    "AdaSAM": "adasam", "AESAM": "aesam", "BayesianSAM": "bsam", "CRSAM": "crsam", "ESAM": "esam",
    "FriendlySAM": "friendly", "GAM": "gam", "LETS": "lets", "LightSAM": "lightsam", "MongeSAM": "monge",
    "MSharpnessSAM": "msam", "RandomSAM": "rsam", "SAMPa": "sampa", "SSAMD": "ssam", "SSAMF": "ssam", "WSAM": "wsam",
}


def _torch_front(rule: type) -> type:
    return type(rule.__name__, (rule, SAM), {"__doc__": rule.__doc__, "__module__": __name__, "__qualname__": rule.__name__})


_RULES = every_method()
for _name, _rule in _RULES.items():
    globals()[_name] = _torch_front(_rule)
for _name, _module in _LEGACY.items():
    if _name not in _RULES:
        globals()[_name] = getattr(import_module(f"{__name__}.{_module}"), _name)

__all__ = ["SAM", *sorted(set(_RULES) | set(_LEGACY))]


def __getattr__(name: str) -> Any:  # for type checkers: the classes above are built at import
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
