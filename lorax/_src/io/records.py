"""A checkpoint's metadata checked against its schema, and the fingerprint a checkpoint keeps of
the base it was trained on."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NoReturn, TypeGuard

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from lorax._src.bases.quantized import dense, format_of
from lorax._src.kinds.adapter import KINDS, Adapter
from lorax._src.kinds.initializers import valid_init

FORMAT = 1
SAMPLES = 16  # values of each base weight a fingerprint records
ACROSS_FORMATS = 0.05  # the norm's relative tolerance between a quantized and a full-precision base
NON_FINITE = ("nan", "inf", "-inf")  # how a fingerprint writes numbers JSON has no literal for


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
    arrays = record.get("shared", [])
    if not isinstance(arrays, list) or not all(
            isinstance(a, dict) and set(a) == {"shape", "dtype"} and _is_dtype(a["dtype"])
            and isinstance(a["shape"], list) and all(_is_int(d) and d >= 0 for d in a["shape"]) for a in arrays):
        bad("'shared'", "a list of {'shape', 'dtype'} objects", arrays)
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
        kind = KINDS[e["kind"]]
        least = 1 if kind.ranked else 0
        if not _is_int(e.get("rank")) or e["rank"] < least:
            bad(field("rank"), f"an int >= {least}", e.get("rank"))
        own = e.get("own", {})
        shared = {f.name for f in dataclasses.fields(Adapter)}
        names = {f.name for f in dataclasses.fields(kind) if f.metadata.get("static") and f.name not in shared}
        if not isinstance(own, dict) or not set(own) <= names:
            bad(field("own"), f"the {e['kind']!r} kind's own settings, some of {sorted(names)}", own)
        held = e.get("shared", {})
        if not isinstance(held, dict) or set(held) != set(kind.shared_fields()) or \
                not all(_is_int(i) and 0 <= i < len(arrays) for i in held.values()):
            bad(field("shared"), f"the index in 'shared' of each of {list(kind.shared_fields())}", held)
        for name, low in (("scale", -math.inf), ("dropout", 0.0)):
            value = e.get(name)
            if not (_is_real(value) and math.isfinite(value) and low <= value and (name != "dropout" or value < 1)):
                bad(field(name), "a finite number" + (" in [0, 1)" if name == "dropout" else ""), value)
        axes: list[Any] = [e.get(k) for k in ("a_axes", "b_axes", "stack_axes")]
        if not all(isinstance(x, list) and all(_is_int(k) for k in x) for x in axes) or \
                sorted(k for x in axes for k in x) != list(range(len(shape))):
            bad(field("a_axes/b_axes/stack_axes"), f"lists of ints splitting the {len(shape)} axes of "
                f"the weight once each", axes)
        if "base" in e and not is_fingerprint(e["base"], math.prod(shape)):  # absent before fingerprints
            bad(field("base"), f"a base fingerprint {{'norm', 'sample' ({min(SAMPLES, math.prod(shape))} "
                "numbers), 'format'}", e["base"])
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


def fingerprint(w: Any, fmt: str | None = None) -> dict:
    """What a checkpoint records of the frozen base weight ``w`` under an adapter, to recognise it on load.

    The weight's L2 norm and `SAMPLES` of its values at evenly spaced flat positions, computed
    in float32 where ``w`` lives (sharded and multi-process weights included; only the numbers
    come to the host) and the same on every process and device: the samples are read, not
    computed. A `QuantizedArray` is fingerprinted by its dequantized value and its format is
    recorded; ``fmt`` names the format of a weight already dequantized. Numbers JSON cannot
    hold are written as ``"nan"``, ``"inf"`` and ``"-inf"``.

    >>> import jax.numpy as jnp
    >>> fingerprint(jnp.array([[3.0, 4.0]]))
    {'norm': 5.0, 'sample': [3.0, 4.0]}
    """
    summary = _host(_summary(w))
    record: dict[str, Any] = {"norm": _number(summary[0]), "sample": [_number(v) for v in summary[1:]]}
    fmt = format_of(w) or fmt
    if fmt is not None:
        record["format"] = fmt
    return record


def base_mismatch(recorded: dict, w: Any, fmt: str | None = None) -> str | None:
    """How the base weight ``w`` differs from the one ``recorded`` (a `fingerprint`) describes; None if alike.

    Between bases of one format the norm and each sample must agree to within
    ``max(1e-4, 2·eps)`` of ``w``'s dtype (a sample relative to its magnitude plus the weight's
    RMS): a base merged with an adapter, or another seed or checkpoint, is told apart, while
    the rounding of another device's reduction is not. Between a quantized and a full-precision
    base (or two formats) the values differ by the quantization error, so only the norm is
    compared, to within `ACROSS_FORMATS`: a gross mismatch is caught there, not a small change.

    >>> import jax.numpy as jnp
    >>> base_mismatch(fingerprint(jnp.ones((2, 2))), 2 * jnp.ones((2, 2)))
    'recorded norm 2 and values [1, 1, 1, 1], found norm 4 and values [2, 2, 2, 2]'
    """
    found = fingerprint(w, fmt)
    across = recorded.get("format") != found.get("format")
    tolerance = ACROSS_FORMATS if across else max(1e-4, 2 * float(jnp.finfo(w.dtype).eps))
    norm, found_norm = float(recorded["norm"]), float(found["norm"])
    alike = _close(norm, found_norm, tolerance * abs(norm))
    if not across:
        rms = norm / math.sqrt(max(1, math.prod(w.shape)))
        alike = alike and len(recorded["sample"]) == len(found["sample"]) and all(
            _close(float(a), float(b), tolerance * (abs(float(a)) + rms))
            for a, b in zip(recorded["sample"], found["sample"]))
    return None if alike else f"recorded {_describe(recorded)}, found {_describe(found)}"


def is_fingerprint(value: Any, size: int) -> bool:
    """Whether ``value`` is a well-formed `fingerprint` of a weight of ``size`` values."""
    return isinstance(value, dict) and set(value) <= {"norm", "sample", "format"} and \
        _is_recorded(value.get("norm")) and isinstance(value.get("sample"), list) and \
        len(value["sample"]) == min(SAMPLES, size) and all(_is_recorded(v) for v in value["sample"]) and \
        isinstance(value.get("format", ""), str)


@jax.jit
def _summary(w: Any) -> jax.Array:
    """``[norm, *samples]`` of ``w`` (dequantized), in float32."""
    x = dense(w).astype(jnp.float32)
    return jnp.stack([jnp.sqrt(jnp.sum(jnp.square(x))), *(x[position] for position in _positions(x.shape))])


def _positions(shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """`SAMPLES` evenly spaced positions in a weight of ``shape`` (every one if it holds fewer)."""
    size = math.prod(shape)
    count = min(SAMPLES, size)
    flat = [(2 * i + 1) * size // (2 * count) for i in range(count)]
    return [tuple(int(k) for k in np.unravel_index(f, shape)) for f in flat]


def _host(x: jax.Array) -> np.ndarray:
    """``x`` on the host; a multi-process array is gathered from every process."""
    if not x.is_fully_addressable:
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)


def _number(x: Any) -> float | str:
    value = float(x)
    return value if math.isfinite(value) else str(value)


def _close(a: float, b: float, tolerance: float) -> bool:
    if not (math.isfinite(a) and math.isfinite(b)):
        return str(a) == str(b)
    return abs(a - b) <= tolerance


def _describe(record: dict) -> str:
    values = ", ".join(f"{float(v):.6g}" for v in record["sample"][:4])
    more = ", ..." if len(record["sample"]) > 4 else ""
    fmt = f" ({record['format']})" if "format" in record else ""
    return f"norm {float(record['norm']):.6g}{fmt} and values [{values}{more}]"


def _is_recorded(x: Any) -> bool:
    return _is_real(x) and math.isfinite(x) or x in NON_FINITE
