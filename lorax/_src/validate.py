"""Values at lorax's boundary, checked the same way everywhere: steps, counts, ranks and scales,
and the names that become folder names."""

from __future__ import annotations

import math
import numbers
import re
from typing import Any


def index(value: Any, what: str, *, minimum: int = 0) -> int:
    """``value`` as a plain int >= ``minimum`` (0 or 1); NumPy ints pass, bools and floats do not.

    >>> import numpy as np
    >>> index(np.int64(3), "step")
    3
    >>> index(1.5, "step")
    Traceback (most recent call last):
    TypeError: step must be a non-negative int, got 1.5 (float).
    """
    want = "a positive int" if minimum == 1 else "a non-negative int"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} must be {want}, got {value!r} ({type(value).__name__}).")
    if value < minimum:
        raise ValueError(f"{what} must be {want}, got {int(value)}.")
    return int(value)


def real(value: Any, what: str, *, positive: bool = False) -> float:
    """``value`` as a finite float (``> 0`` if ``positive``); NumPy floats pass, bools and strings do not.

    >>> import numpy as np
    >>> real(np.float32(16), "alpha", positive=True)
    16.0
    >>> real(float("inf"), "alpha")
    Traceback (most recent call last):
    ValueError: alpha must be a finite number, got inf.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a number, got {value!r} ({type(value).__name__}).")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{what} must be a finite number, got {number!r}.")
    if positive and not number > 0:
        raise ValueError(f"{what} must be > 0, got {number!r}.")
    return number


PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def check_plain_name(name: object, what: str) -> str:
    """``name`` if it is one plain folder name (letters, digits, ``_``, ``.``, ``-``, not
    starting with ``.``): never a path, never ``..``; else a ValueError naming ``what``.

    >>> check_plain_name("math-v2", "demo: adapter name")
    'math-v2'
    """
    if not isinstance(name, str) or not PLAIN_NAME.fullmatch(name):
        raise ValueError(f"{what} {name!r} must be a non-empty string of letters, digits, '_', '.' and '-' not "
                         "starting with '.' (it names a folder on save).")
    return name
