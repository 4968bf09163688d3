"""Checking values at lorax's boundary: steps, counts, and checkpoint metadata against its schema."""

from __future__ import annotations

import math
import numbers
from typing import Any, NoReturn, TypeGuard

import jax.numpy as jnp

from lorax._src.adapter import KINDS
from lorax._src.initializers import valid_init

FORMAT = 1


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


def check_record(record: Any, where: str) -> dict:
    """Validate a checkpoint's metadata; the error names the file ``where`` and the field."""

    def bad(field: str, want: str, got: Any) -> NoReturn:
        raise ValueError(f"lorax.load: {where}: {field} must be {want}, got {got!r}; "
                         "the checkpoint metadata is damaged or not lorax's.")

    if not isinstance(record, dict):
        bad("the metadata", "a JSON object", record)
    if type(record.get("format")) is not int or record["format"] != FORMAT:
        bad("'format'", f"{FORMAT} (the format this lorax reads; a newer lorax may have written it)",
            record.get("format"))
    if not isinstance(record.get("config"), (dict, type(None))):
        bad("'config'", "an object or null", record.get("config"))
    if not isinstance(record.get("state", False), bool):
        bad("'state'", "true or false", record.get("state"))
    weights = record.get("weights")
    if not isinstance(weights, list) or not weights:
        bad("'weights'", "a non-empty list", weights)
    seen = set()
    for i, e in enumerate(weights):
        field = lambda name, i=i: f"weights[{i}].{name}"  # noqa: E731
        if not isinstance(e, dict):
            bad(f"weights[{i}]", "an object", e)
        if not isinstance(e.get("path"), str) or e["path"] in seen:
            bad(field("path"), "a string naming one leaf once", e.get("path"))
        seen.add(e["path"])
        if e.get("kind") not in ("trainable", *KINDS):
            bad(field("kind"), f"one of {sorted(('trainable', *KINDS))}", e.get("kind"))
        shape = e.get("shape")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            bad(field("shape"), "a list of ints >= 0", shape)
        for name in ("dtype", *(("factor_dtype",) if e["kind"] != "trainable" else ())):
            if not _is_dtype(e.get(name)):
                bad(field(name), "a dtype name", e.get(name))
        if e["kind"] == "trainable":
            continue
        if not valid_init(e.setdefault("init", "kaiming_uniform")):  # format 1 before inits: the default
            bad(field("init"), "an initialisation name", e.get("init"))
        if not _is_int(e.get("rank")) or e["rank"] < 1:
            bad(field("rank"), "an int >= 1", e.get("rank"))
        for name, low in (("scale", -math.inf), ("dropout", 0.0)):
            value = e.get(name)
            if not (_is_real(value) and math.isfinite(value) and low <= value and (name != "dropout" or value < 1)):
                bad(field(name), "a finite number" + (" in [0, 1)" if name == "dropout" else ""), value)
        axes: list[Any] = [e.get(k) for k in ("a_axes", "b_axes", "stack_axes")]
        if not all(isinstance(x, list) and all(_is_int(k) for k in x) for x in axes) or \
                sorted(k for x in axes for k in x) != list(range(len(shape))):
            bad(field("a_axes/b_axes/stack_axes"), f"lists of ints splitting the {len(shape)} axes of "
                f"the weight once each", axes)
    return record


def _is_int(x) -> TypeGuard[int]:
    return type(x) is int


def _is_real(x) -> TypeGuard[float]:
    return type(x) in (int, float)


def _is_dtype(x) -> bool:
    if not isinstance(x, str):
        return False
    try:
        jnp.dtype(x)
    except TypeError:
        return False
    return True
