"""Checks of the scalar arguments of public functions, one rule each, used before anything is
written. Each returns the value normalized (a float, an int, the option) or raises naming the
function (``op``; None: no prefix) and the argument: TypeError for a value of the wrong kind,
ValueError for one outside its range.

Ranges are intervals, written as they are checked: ``[0, 1]``, ``(0, inf)``, ``[0, 90)``.
A finite number is one in an interval that is open at infinity, so ``[0, inf)`` refuses inf,
and NaN lies in no interval. Python and NumPy numbers are accepted; bools are refused, though
Python counts them as integers.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

#: The forms of GELU: the exact x Phi(x) ("none") and the tanh approximation.
GELU_APPROXIMATIONS = ("none", "tanh")


def real(op: str | None, name: str, value, lo: float | None = None, hi: float | None = None, *,
         lo_open: bool = False, hi_open: bool = False, finite: bool = True) -> float:
    """``value`` as a float: a real number in the interval from ``lo`` to ``hi`` (None: no
    bound; ``lo_open`` / ``hi_open`` exclude the bound itself), finite unless ``finite=False``.
    With ``finite=False`` and no bound at all, every real number passes, NaN and inf too."""
    if type(value) is not float:  # a float skips the ABC check (~2 us, a small op's budget)
        if isinstance(value, bool) or not isinstance(value, Real):
            raise TypeError(f"{_prefix(op)}{name} must be a real number"
                            f"{_within(lo, hi, lo_open, hi_open, finite)}, got {value!r}")
        value = float(value)
    if lo is None and hi is None and not finite:
        return value
    if not ((lo is None or (value > lo if lo_open else value >= lo))
            and (hi is None or (value < hi if hi_open else value <= hi))
            and (not finite or math.isfinite(value))):
        raise ValueError(f"{_prefix(op)}{name} must be in "
                         f"{_interval(lo, hi, lo_open, hi_open, finite)}, got {value!r}")
    return value


def integer(op: str | None, name: str, value, lo: int | None = None,
            hi: int | None = None, *, hi_open: bool = False) -> int:
    """``value`` as an int: an integer (Python or NumPy, not a bool) in [lo, hi] (None: no
    bound; ``hi_open``: [lo, hi))."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{_prefix(op)}{name} must be an integer"
                        f"{_within(lo, hi, False, hi_open, True)}, got {value!r}")
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and (value >= hi if hi_open
                                                               else value > hi)):
        raise ValueError(f"{_prefix(op)}{name} must be in "
                         f"{_interval(lo, hi, False, hi_open, True)}, got {value!r}")
    return value


def choice(op: str | None, name: str, value, options: tuple):
    """``value`` itself if it is one of ``options``, else ValueError listing them."""
    if value not in options:
        listed = (" or ".join(map(repr, options)) if len(options) == 2
                  else f"one of {options}")
        raise ValueError(f"{_prefix(op)}{name} must be {listed}, got {value!r}")
    return value


def gelu_approximate(op: str, approximate) -> str:
    """GELU's ``approximate``: 'none' (x Phi(x)) or 'tanh'."""
    return choice(op, "approximate", approximate, GELU_APPROXIMATIONS)


def _prefix(op: str | None) -> str:
    return f"{op}: " if op else ""


def _bound(v) -> str:
    """A bound as written in a message: integers from 2^32 on as powers of two where they are
    (2^64 rather than 18446744073709551616), floats in %g."""
    if isinstance(v, int) and abs(v) >= 1 << 32 and abs(v) & (abs(v) - 1) == 0:
        return f"{'-' if v < 0 else ''}2^{abs(v).bit_length() - 1}"
    return f"{v:g}" if isinstance(v, float) else str(v)


def _interval(lo, hi, lo_open, hi_open, finite) -> str:
    """'[lo, hi)' and the like; a missing bound is -inf or inf, open where finite."""
    if lo is None:
        low = "(-inf" if finite else "[-inf"
    else:
        low = ("(" if lo_open else "[") + _bound(lo)
    if hi is None:
        high = "inf)" if finite else "inf]"
    else:
        high = _bound(hi) + (")" if hi_open else "]")
    return f"{low}, {high}"


def _within(lo, hi, lo_open, hi_open, finite) -> str:
    """' in <interval>' for a bounded argument, '' for any number."""
    if lo is None and hi is None:
        return ""
    return f" in {_interval(lo, hi, lo_open, hi_open, finite)}"
