"""The numpy front: SAM-family optimizers over lists of numpy arrays, updated in place, without torch.

:class:`SAM` is the front; every method of :mod:`sharpness.methods` gets a class built here from
its rule and :class:`SAM`. The arithmetic runs in the native kernels (:mod:`sharpness._core`), one
call per dtype over all arrays.
"""

from typing import Any

from sharpness.methods import every_method
from sharpness.numpy.front import SAM


def _numpy_front(rule: type) -> type:
    return type(rule.__name__, (rule, SAM), {"__doc__": rule.__doc__, "__module__": __name__, "__qualname__": rule.__name__})


_RULES = every_method()
for _name, _rule in _RULES.items():
    globals()[_name] = _numpy_front(_rule)

__all__ = ["SAM", *sorted(_RULES)]


def __getattr__(name: str) -> Any:  # for type checkers: the classes above are built at import
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
