"""Checks of hyperparameters, shared by the torch and the numpy fronts.

Each check names the argument and what it must be, and returns the value normalised (a Python
``float``, ``int`` or ``bool``). A value of the wrong kind (a string, ``None``, a list, a tensor, a
bool where a number is meant, a float where an integer is meant) raises
:class:`HyperparameterTypeError`; a number out of range (negative, NaN, inf, past a bound) raises
:class:`ValueError`:

    >>> from sharpness._validation import flag, number, pair
    >>> number("rho", 0.05, minimum=0), number("k", 5, minimum=1, integer=True)
    (0.05, 5)
    >>> number("rho", "0.05", minimum=0)
    Traceback (most recent call last):
    sharpness._validation.HyperparameterTypeError: rho must be a finite number >= 0, got '0.05' (str)
    >>> number("gamma", 1, minimum=0, below=1)
    Traceback (most recent call last):
    ValueError: gamma must be a number in [0, 1), got 1
    >>> pair("betas", (0.9, 0.999), minimum=0, below=1), flag("decouple", True)
    ((0.9, 0.999), True)

Numbers are what :mod:`numbers` calls real (``int``, ``float``, numpy's scalars, ``Fraction``),
bools excepted (``True`` is a flag, not a radius). Torch tensors are refused, 0-d ones too: the
methods keep their hyperparameters as Python numbers (the kernels take them as such, and a tensor
would make every comparison a device synchronisation). This module imports neither torch nor numpy
(the numpy front uses it).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

__all__ = ["HyperparameterTypeError", "describe", "flag", "number", "pair"]


class HyperparameterTypeError(TypeError, ValueError):
    """A hyperparameter of the wrong type. A :class:`TypeError`, as Python's own argument checks
    raise; also a :class:`ValueError`, which several methods raised for a wrong type before
    their checks came here (``k=1.5``, ``lam="2"``), so code that catches ValueError still
    catches it."""


def _bound(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def describe(
    *,
    minimum: float | None = None,
    above: float | None = None,
    maximum: float | None = None,
    below: float | None = None,
    integer: bool = False,
    finite: bool = True,
) -> str:
    """What :func:`number` with these bounds accepts, in words: ``"a finite number >= 0"``,
    ``"a number in [0, 1)"``, ``"an integer >= 1"``."""
    low = f"[{_bound(minimum)}" if minimum is not None else f"({_bound(above)}" if above is not None else None
    high = f"{_bound(maximum)}]" if maximum is not None else f"{_bound(below)})" if below is not None else None
    kind = "an integer" if integer else "a finite number" if finite else "a number"
    if low is not None and high is not None:
        return f"{'an integer' if integer else 'a number'} in {low}, {high}"
    if low is not None:
        return f"{kind} {'>=' if minimum is not None else '>'} {low[1:]}"
    if high is not None:
        return f"{kind} {'<=' if maximum is not None else '<'} {high[:-1]}"
    return kind


def number(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    above: float | None = None,
    maximum: float | None = None,
    below: float | None = None,
    integer: bool = False,
    finite: bool = True,
) -> Any:
    """``value`` as a ``float`` (``int`` with ``integer=True``), checked.

    Args:
        name: the argument's name, as the caller spells it (``"rho"``, ``"sam_rho"``, ``"betas[0]"``).
        value: what was given.
        minimum, above: ``value >= minimum``, ``value > above`` (give at most one).
        maximum, below: ``value <= maximum``, ``value < below`` (give at most one).
        integer: an integral number (``int``, numpy's integers; not ``2.0``).
        finite: refuse ``±inf`` (NaN is always refused).

    Raises:
        HyperparameterTypeError: ``value`` is not a real number (bools included), or not an
            integer where ``integer=True``.
        ValueError: ``value`` is NaN, infinite (with ``finite=True``) or outside the bounds.
    """
    what = describe(minimum=minimum, above=above, maximum=maximum, below=below, integer=integer, finite=finite)
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        raise HyperparameterTypeError(f"{name} must be {what}, got {value!r} ({type(value).__name__})")
    try:
        # `integer` means `value` passed the Integral check above; the isinstance only narrows it for mypy
        out = int(value) if integer and isinstance(value, numbers.Integral) else float(value)
    except OverflowError:  # a huge int or Fraction: past any float, so not finite
        out = math.inf
    ok = not math.isnan(out) and not (finite and math.isinf(out))
    ok = ok and (minimum is None or out >= minimum) and (above is None or out > above)
    ok = ok and (maximum is None or out <= maximum) and (below is None or out < below)
    if not ok:
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return out


def pair(name: str, value: Any, **bounds: Any) -> tuple[Any, Any]:
    """``value`` as a pair of numbers (a tuple or list of two), each checked by :func:`number`
    with ``bounds`` (e.g. Adam's ``betas``)."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise HyperparameterTypeError(
            f"{name} must be a pair of numbers, each {describe(**bounds)}, got {value!r} ({type(value).__name__})"
        )
    return (number(f"{name}[0]", value[0], **bounds), number(f"{name}[1]", value[1], **bounds))


def flag(name: str, value: Any) -> bool:
    """``value`` as a ``bool``: ``True`` or ``False`` (numpy's bools too), nothing else."""
    if not (isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"))):
        raise HyperparameterTypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return bool(value)
