"""Torch optimizers of the SAM family: :class:`SAM` (the torch front) and, for every method of
:mod:`sharpness.methods`, a class built here from the method's rule and :class:`SAM`."""

from typing import Any

from sharpness.methods import every_method
from sharpness.optim.sam import SAM


def _torch_front(rule: type) -> type:
    return type(rule.__name__, (rule, SAM), {"__doc__": rule.__doc__, "__module__": __name__, "__qualname__": rule.__name__})


_RULES = every_method()
for _name, _rule in _RULES.items():
    globals()[_name] = _torch_front(_rule)

__all__ = ["SAM", *sorted(_RULES)]


def __getattr__(name: str) -> Any:  # for type checkers: the classes above are built at import
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
