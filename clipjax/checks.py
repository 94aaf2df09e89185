"""Input checks shared by `clipjax.losses`, `clipjax.metrics`, `clipjax.ood` and `clipjax.adapt`.

This is a bottom-layer module: it imports jax and numpy only, never another clipjax module.
Shapes in messages are written like `[B, D]`: one letter (or name) per axis, and a letter
shared by two arguments is the same size. Every function that takes embeddings follows
the same four rules.

1. **Shape and dtype checks always run.** `array`, `same_dim`, `same_len`, `same_shape`,
   `same_dtype`, `scalar` and `positive_int` read only static information (rank, shape,
   dtype, Python numbers). They work on tracers, so under `jax.jit` they fire at trace
   time, before anything is compiled. A wrong dtype or type raises `TypeError`; a wrong
   rank, size or emptiness raises `ValueError`. The message names the argument, gives the
   expected shape (`[B, D]`) and what was given.
2. **Value checks run on concrete arrays only.** `finite`, `unit_norm`, `nonzero_rows`
   (and `values`, which does all three in one pass), `unique_rows` and `index_range` need
   values. They run on concrete inputs: numpy arrays, committed `jax.Array`s, constants
   captured inside a trace. They do nothing for tracers (inside `jit`, `grad`, `vmap`,
   `shard_map`), where a check would need a device-to-host round trip. They also do nothing
   with `validate=False`: each public function takes that argument and passes it down, so it
   can be used inside larger jitted code. A failure raises `ValueError` naming the
   argument and the first offending row (or index): the first row holding NaN/inf, the
   first row whose L2 norm is not within `norm_tolerance(dtype)` of 1 (only where a
   function requires normalised embeddings), the first all-zero row.
3. **Zero rows.** A function that L2-normalises rows checks them with
   `values(..., nonzero=True)`. This covers an argument's rows, and also vectors built from
   the arguments and then normalised (a Hopfield retrieval, a template mean, a Tip-Adapter
   key). When validating, an all-zero row is an error naming the argument and the row; it
   never becomes a silent NaN or a silent zero vector. Without validation (`validate=False`
   or tracers) the function normalises with `l2_normalize`. That is a guarded division:
   a zero row stays a zero vector, with no NaN in values or gradients, so every cosine
   with it is 0. Functions that do not normalise (the contrastive losses, retrieval
   top-k, CMMD, SCE) accept zero rows.
4. **Hyper-parameters** are Python numbers (`positive_int`, `positive_scalar`, ranges
   checked by the caller). They are checked whenever they are concrete, whatever
   `validate` says.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "array",
    "finite",
    "index_range",
    "is_concrete",
    "l2_normalize",
    "nonzero_rows",
    "norm_tolerance",
    "positive_int",
    "positive_scalar",
    "same_dim",
    "same_dtype",
    "same_len",
    "same_shape",
    "scalar",
    "unique_rows",
    "unit_norm",
    "values",
]


def is_concrete(*xs: Any) -> bool:
    """True when none of `xs` is a jax tracer, so their values can be read."""
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


# ----------------------------------------------------------------------------- static checks
def _axes(shape: str) -> list[str]:
    inner = shape.strip()[1:-1].strip()
    return [a.strip() for a in inner.split(",")] if inner else []


def _shape(x) -> tuple[int, ...]:
    return tuple(int(d) for d in x.shape)


def array(name: str, x: Any, shape: str, *, dtype: str | None = "floating", min_rows: int = 1,
          sizes: Mapping[str, int] | None = None) -> jax.Array:
    """Return `x` as a jax array after checking its rank, dtype and sizes against `shape`.

    Args:
      name: the argument's name, used in messages.
      x: the array (numpy, jax, tracer, or anything `jnp.asarray` takes).
      shape: the expected shape, e.g. `"[B, D]"`; its number of axes is the required rank.
      dtype: `"floating"`, `"integer"`, or None for any dtype.
      min_rows: the smallest allowed size of the first axis (every other axis must be >= 1).
      sizes: fixed sizes of some named axes, e.g. `{"D": 512}`.

    Raises:
      TypeError: `x` is not an array, or not of the required dtype kind.
      ValueError: `x` is None, has the wrong rank, a wrong fixed size, too few rows or an empty axis.
    """
    axes = _axes(shape)
    if x is None:
        raise ValueError(f"{name} is None; expected an array of shape {shape}")
    try:
        with jax.ensure_compile_time_eval():  # concrete inputs stay concrete inside a trace
            x = jnp.asarray(x)
    except TypeError as e:
        raise TypeError(f"{name} must be an array of shape {shape}, got {type(x).__name__}") from e
    got = _shape(x)
    if x.ndim != len(axes):
        raise ValueError(f"{name} must have shape {shape} (rank {len(axes)}), got shape {got}")
    if dtype == "floating" and not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array of shape {shape}, got dtype {x.dtype}")
    if dtype == "integer" and not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer array of shape {shape}, got dtype {x.dtype}")
    wrong = {a: int(n) for a, n in (sizes or {}).items() if got[axes.index(a)] != n}
    if wrong:
        fixed = ", ".join(f"{a} = {n}" for a, n in (sizes or {}).items())
        raise ValueError(f"{name} must have shape {shape} with {fixed}, got shape {got}")
    if axes and got[0] < min_rows:
        what = "is empty" if got[0] == 0 else "has too few rows"
        raise ValueError(f"{name} {what}: shape {shape} needs {axes[0]} >= {min_rows}, got shape {got}")
    for a, n in list(zip(axes, got))[1:]:
        if n == 0:
            raise ValueError(f"{name} has an empty axis: shape {shape} needs {a} >= 1, got shape {got}")
    return x


def _listing(arrays: Mapping[str, Any]) -> str:
    return ", ".join(f"{n} has shape {_shape(x)}" for n, x in arrays.items())


def same_dim(**arrays: Any) -> None:
    """All arrays share their last (embedding) axis D; raise `ValueError` naming them otherwise."""
    if len({x.shape[-1] for x in arrays.values()}) > 1:
        raise ValueError(f"embedding dimensions differ: {_listing(arrays)}; each must be [..., D] with the same D")


def same_len(**arrays: Any) -> None:
    """All arrays share their first axis N (paired rows); raise `ValueError` naming them otherwise."""
    if len({x.shape[0] for x in arrays.values()}) > 1:
        raise ValueError(f"paired inputs have different lengths: {_listing(arrays)}; "
                         "each must be [N, ...] with the same N")


def same_shape(shape: str, **arrays: Any) -> None:
    """All arrays have one shape (written `shape`, e.g. `"[B, D]"`); raise `ValueError` otherwise."""
    if len({_shape(x) for x in arrays.values()}) > 1:
        raise ValueError(f"{' and '.join(arrays)} must have the same shape {shape}, "
                         f"got {' and '.join(str(_shape(x)) for x in arrays.values())}")


def same_dtype(**arrays: Any) -> None:
    """All arrays have one dtype; raise `TypeError` otherwise."""
    if len({jnp.dtype(x.dtype) for x in arrays.values()}) > 1:
        raise TypeError(f"{' and '.join(arrays)} must have the same dtype, "
                        f"got {' and '.join(str(x.dtype) for x in arrays.values())}")


def scalar(name: str, x: Any) -> jax.Array:
    """Return `x` as a float32 scalar; Python numbers and arrays of shape `()` or `(1,)` pass.

    Raises:
      TypeError: `x` is a bool, not a number, or not of a real dtype.
      ValueError: `x` has more than one element.
    """
    if isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{name} must be a real number, got a bool")
    if isinstance(x, (int, float, np.number)):
        return jnp.asarray(x, jnp.float32)
    if not hasattr(x, "shape"):
        raise TypeError(f"{name} must be a scalar number or array of shape [], got {type(x).__name__}")
    if int(np.prod(x.shape)) != 1:
        raise ValueError(f"{name} must be a scalar (shape () or (1,)), got shape {_shape(x)}")
    if not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)):
        raise TypeError(f"{name} must be a real number, got dtype {x.dtype}")
    with jax.ensure_compile_time_eval():
        return jnp.reshape(x, ()).astype(jnp.float32)


def positive_int(name: str, value: Any) -> int:
    """A positive Python int (block sizes, k). `TypeError` for other types, `ValueError` below 1."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a positive integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def positive_scalar(name: str, value: Any) -> None:
    """A positive finite scalar (temperatures); not checked when `value` is a tracer."""
    if is_concrete(value):
        v = np.asarray(value)
        if v.ndim != 0 or not np.issubdtype(v.dtype, np.number) or not np.isfinite(v) or v <= 0:
            raise ValueError(f"{name} must be a positive finite scalar, got {value!r}")


# ----------------------------------------------------------------------------- value checks
def norm_tolerance(dtype) -> float:
    """How far an L2 norm may be from 1 and still count as normalised for `dtype`."""
    return max(1e-3, 10.0 * float(jnp.finfo(dtype).eps))


@jax.jit
def _value_stats(x, tol):
    rows = x.reshape(-1, x.shape[-1]) if x.ndim >= 2 else x.reshape(-1, 1)
    bad = jnp.sum(~jnp.isfinite(rows), axis=1, dtype=jnp.int32)
    xf = rows.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(xf * xf, axis=1))
    zero = norm == 0
    off = ~(jnp.abs(norm - 1.0) <= tol)
    first_off = jnp.argmax(off)
    return (jnp.sum(bad), jnp.argmax(bad > 0), jnp.any(zero), jnp.argmax(zero), jnp.any(off), first_off,
            norm[first_off])


def _where(shape: tuple[int, ...], flat: int) -> str:
    """Where the `flat`-th row (last axis reduced) of an array of `shape` is, in words."""
    if len(shape) <= 1:
        return f"index {flat}"
    if len(shape) == 2:
        return f"row {flat}"
    return f"row {tuple(int(i) for i in np.unravel_index(flat, shape[:-1]))}"


def values(name: str, x: Any, *, unit_norm: bool = False, nonzero: bool = False, validate: bool = True,
           hint: str = "") -> None:
    """Check a concrete `x` for NaN/inf, and optionally unit-norm or non-zero rows, in one device pass.

    Rows are taken along the last axis. Does nothing when `validate` is False, `x` is None or
    a tracer, or `x` is empty.

    Args:
      name: the argument's name (or a description of a derived array), used in messages.
      x: the array.
      unit_norm: every row must have L2 norm within `norm_tolerance(dtype)` of 1.
      nonzero: no row may be all zero (the function L2-normalises the rows).
      validate: False skips every check.
      hint: appended to the unit-norm message (e.g. "; or pass normalize=True").

    Raises:
      ValueError: naming `name` and the first offending row.
    """
    if not validate or x is None or not is_concrete(x):
        return
    with jax.ensure_compile_time_eval():
        arr = jnp.asarray(x)
        if arr.size == 0:
            return
        floating = jnp.issubdtype(arr.dtype, jnp.floating)
        tol = norm_tolerance(arr.dtype) if floating else 1e-3
        n_bad, first_bad, any_zero, first_zero, any_off, first_off, off_norm = (
            np.asarray(v) for v in _value_stats(arr, tol))
    shape = _shape(arr)
    if n_bad:
        where = f"; the first is at {_where(shape, int(first_bad))}" if arr.ndim else ""
        raise ValueError(f"{name} has {int(n_bad)} non-finite value(s) (NaN or inf){where}")
    if nonzero and any_zero:
        raise ValueError(f"{name} has an all-zero row ({_where(shape, int(first_zero))}), "
                         "which cannot be L2-normalised")
    if unit_norm and any_off:
        raise ValueError(f"{name} must be L2-normalised along the last axis (norms within {tol:g} of 1): "
                         f"{_where(shape, int(first_off))} has norm {float(off_norm):.6g}; normalise it first{hint}")


def finite(name: str, x: Any, *, validate: bool = True) -> None:
    """Raise `ValueError` if a concrete `x` holds NaN or inf (names the count and the first row)."""
    values(name, x, validate=validate)


def unit_norm(name: str, x: Any, *, validate: bool = True, hint: str = "") -> None:
    """Raise `ValueError` if a concrete `x` is non-finite or has a row whose L2 norm is not ~1."""
    values(name, x, unit_norm=True, validate=validate, hint=hint)


def nonzero_rows(name: str, x: Any, *, validate: bool = True) -> None:
    """Raise `ValueError` if a concrete `x` is non-finite or has an all-zero row."""
    values(name, x, nonzero=True, validate=validate)


def unique_rows(name: str, x: Any, *, validate: bool = True) -> None:
    """Raise `ValueError` if a concrete `[K, D]` matrix has exactly repeated rows (e.g. duplicate labels)."""
    if not validate or not is_concrete(x):
        return
    rows = np.asarray(x)
    _, first, counts = np.unique(rows, axis=0, return_index=True, return_counts=True)
    if (counts > 1).any():
        dup = int(np.min(first[counts > 1]))
        same = np.flatnonzero((rows == rows[dup]).all(axis=1)).tolist()
        raise ValueError(f"{name} has duplicate rows: rows {same[:5]} are identical")


@jax.jit
def _range_stats(x, upper):
    bad = (x < 0) | (x >= upper)
    return jnp.min(x), jnp.max(x), jnp.any(bad), jnp.argmax(bad)


def index_range(name: str, x: Any, upper: int, *, validate: bool = True) -> None:
    """Raise `ValueError` if a concrete integer array has a value outside `[0, upper)`."""
    if not validate or not is_concrete(x):
        return
    with jax.ensure_compile_time_eval():
        arr = jnp.asarray(x)
        if arr.size == 0:
            return
        lo, hi, any_bad, first = (np.asarray(v) for v in _range_stats(arr.reshape(-1), upper))
    if any_bad:
        where = np.unravel_index(int(first), arr.shape)
        where = int(where[0]) if arr.ndim == 1 else tuple(int(i) for i in where)
        raise ValueError(f"{name} must lie in [0, {upper}), got values in [{int(lo)}, {int(hi)}]; "
                         f"the first out of range is at index {where}")


# ----------------------------------------------------------------------------- normalisation
def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
    """Rows of `x` divided by their L2 norm; an all-zero row stays zero (no NaN, finite gradients).

    The norm is replaced by 1 where it is 0, so this is exact for every non-zero row (the same
    numbers as `x / norm`) and needs no eps, which would underflow in float16.
    """
    x = jnp.asarray(x)
    sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    return x / jnp.sqrt(jnp.where(sq > 0, sq, jnp.ones_like(sq)))
