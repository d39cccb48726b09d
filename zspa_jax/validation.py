"""Argument checks for the public surface: each failure names the argument and what it accepts.

Every check runs on the host before anything is traced or compiled. Value checks
(finite pixels, token ids in range, 0/1 masks) need concrete arrays; on traced inputs
(inside a caller's `jax.jit`) only shapes and dtypes are checked. Their cost is one
pass over the array on the host: ~0.1 ms for a 336 x 336 image, ~10 us for 600 ids.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from numbers import Integral, Real
from typing import Any

import jax
import numpy as np


def is_traced(*arrays: Any) -> bool:
    """True if any argument is a JAX tracer (its values are unknown until run time)."""
    return any(isinstance(a, jax.core.Tracer) for a in arrays if a is not None)


def type_name(value: Any) -> str:
    return type(value).__name__


# --------------------------------------------------------------------------- scalars


def check_int(
    name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None
) -> int:
    """A Python/NumPy integer (not bool) within [minimum, maximum]; returns it as int."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {type_name(value)} {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_real(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    open_minimum: bool = False,
) -> float:
    """A finite real number (not bool) within the bounds; returns it as float."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type_name(value)} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None and (value <= minimum if open_minimum else value < minimum):
        raise ValueError(f"{name} must be {'>' if open_minimum else '>='} {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_bool(name: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, (bool, np.bool_)):
        accepted = "True, False or None" if allow_none else "True or False"
        raise TypeError(f"{name} must be {accepted}, got {type_name(value)} {value!r}")


def check_token_ids(name: str, value: Any, vocab_size: int) -> tuple[int, ...]:
    """An int or a sequence of ints (empty: none), each in [0, vocab_size); returns a tuple."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    return tuple(check_int(name, v, minimum=0, maximum=vocab_size - 1) for v in values)


def check_path(name: str, value: Any) -> None:
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(
            f"{name} must be a path (str or os.PathLike), got {type_name(value)} {value!r}"
        )


def check_rng(name: str, value: Any) -> None:
    """A JAX PRNG key: a typed key array (jax.random.key) or raw uint32 key data (PRNGKey)."""
    dtype = getattr(value, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return
    if dtype is not None and np.dtype(dtype) == np.uint32 and getattr(value, "ndim", 0) >= 1:
        return
    raise TypeError(
        f"{name} must be a JAX PRNG key (jax.random.key(seed)), got {type_name(value)} {value!r}"[
            :200
        ]
    )


# --------------------------------------------------------------------------- arrays


def as_array(name: str, value: Any, kind: str, ndim: int, layout: str) -> Any:
    """`value` as an array of `kind` ("integer" or "floating") with `ndim` dims.

    Returns a NumPy array for host values and the value itself for JAX arrays and
    tracers (no device -> host copy). `layout` completes "{name} must be ...", e.g.
    "an int array [batch, length]".
    """
    if isinstance(value, (str, bytes)) or value is None:
        raise TypeError(f"{name} must be {layout}, got {type_name(value)}")
    if not hasattr(value, "dtype"):
        try:
            value = np.asarray(value)
        except (ValueError, TypeError) as e:
            raise TypeError(f"{name} must be {layout}, got {type_name(value)} ({e})") from None
    dtype = (
        np.dtype(value.dtype)
        if not jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key)
        else None
    )
    ok = dtype is not None and (
        (kind == "integer" and np.issubdtype(dtype, np.integer))
        or (kind == "floating" and np.issubdtype(dtype, np.floating))
    )
    if not ok:
        raise TypeError(f"{name} must be {layout}, got dtype {value.dtype}")
    if len(value.shape) != ndim:
        raise ValueError(f"{name} must be {layout}, got shape {tuple(value.shape)}")
    if any(d == 0 for d in value.shape):
        raise ValueError(f"{name} must not be empty, got shape {tuple(value.shape)}")
    return value


def check_finite(name: str, value: Any, what: str = "row") -> None:
    """Raise naming the first row (first axis) that holds NaN or +-Inf; no-op when traced."""
    if is_traced(value):
        return
    host = np.asarray(value)
    finite = np.isfinite(host.reshape(host.shape[0], -1)).all(axis=1)
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        raise ValueError(f"{name} {what} {bad} holds NaN or Inf values; every value must be finite")


def check_ids_in_range(name: str, ids: Any, vocab_size: int, allowed: Sequence[int] = ()) -> None:
    """Raise naming the first row holding an id outside [0, vocab_size) (ids in `allowed`
    are fine: an image placeholder may lie beyond the vocabulary); no-op when traced."""
    if is_traced(ids):
        return
    host = np.asarray(ids)
    bad = (host < 0) | (host >= vocab_size)
    for ok in allowed:
        bad &= host != ok
    if bad.any():
        row, col = (int(i[0]) for i in np.nonzero(bad))
        raise ValueError(
            f"{name} row {row} holds token id {int(host[row, col])} at position {col}, outside the "
            f"vocabulary [0, {vocab_size})"
        )


def check_binary_mask(name: str, mask: Any) -> None:
    """Raise unless every entry is 0 or 1; no-op when traced."""
    if is_traced(mask):
        return
    host = np.asarray(mask)
    bad = (host != 0) & (host != 1)
    if bad.any():
        row = int(np.nonzero(bad)[0][0])
        raise ValueError(f"{name} row {row} holds values other than 0 and 1")
