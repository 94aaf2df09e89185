"""Input checks shared by the metric functions.

Shape, dtype and emptiness checks use static information only, so they also
run while a metric is being traced under `jax.jit`. Value checks (NaN/inf, unit
norm, unit kernel diagonal) need concrete arrays: they run when the metric is
called eagerly with `validate=True` and are skipped silently for tracers, so a
metric stays jittable. All failures raise `ValueError`/`TypeError` naming the
argument, what was found and what was expected.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(*xs) -> bool:
    """True when none of `xs` is a jax tracer (so values can be inspected)."""
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def floating_matrix(name: str, x, *, ndim: int = 2, min_rows: int = 1) -> jax.Array:
    """Return `x` as a floating jax array of rank `ndim` with at least `min_rows` rows.

    Raises:
      TypeError: `x` is not a floating-point array.
      ValueError: wrong rank, or fewer than `min_rows` rows (for example an empty set).
    """
    x = jnp.asarray(x)
    if x.ndim != ndim:
        raise ValueError(f"{name} must have rank {ndim}, got shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    if x.shape[0] < min_rows:
        raise ValueError(f"{name} is empty: it has {x.shape[0]} rows, at least {min_rows} needed")
    if x.shape[-1] == 0:
        raise ValueError(f"{name} has embedding dimension 0, shape {tuple(x.shape)}")
    return x


def int_vector(name: str, x, length: int | None = None) -> jax.Array:
    """Return `x` as a rank-1 integer jax array, optionally of a given length."""
    x = jnp.asarray(x)
    if x.ndim != 1:
        raise ValueError(f"{name} must be a vector [N], got shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name} must hold integer indices, got dtype {x.dtype}")
    if length is not None and x.shape[0] != length:
        raise ValueError(f"{name} has length {x.shape[0]}, expected {length}")
    return x


def same_dim(names: Sequence[str], *xs) -> None:
    """All arrays share the last (embedding) dimension."""
    dims = [x.shape[-1] for x in xs]
    if len(set(dims)) != 1:
        got = ", ".join(f"{n}: {d}" for n, d in zip(names, dims))
        raise ValueError(f"embedding dimensions differ ({got}); they must match")


def same_len(names: Sequence[str], *xs) -> None:
    """All arrays share the first (row) dimension, e.g. paired images and captions."""
    lens = [x.shape[0] for x in xs]
    if len(set(lens)) != 1:
        got = ", ".join(f"{n}: {d}" for n, d in zip(names, lens))
        raise ValueError(f"paired inputs have different lengths ({got}); they must match")


def norm_tolerance(dtype) -> float:
    """How far an L2 norm may be from 1 and still count as normalised for `dtype`."""
    return max(1e-3, 10.0 * float(jnp.finfo(dtype).eps))


@jax.jit
def _row_stats(x):
    finite = jnp.all(jnp.isfinite(x))
    norms = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=-1))
    return finite, jnp.min(norms), jnp.max(norms)


def check_values(name: str, x, *, unit_norm: bool = False, nonzero: bool = False) -> None:
    """Value checks on a concrete `x`: finite; optionally L2-normalised rows or nonzero rows.

    Does nothing for tracers. Rows are the last axis.

    Raises:
      ValueError: NaN/inf present, a row with norm far from 1 (`unit_norm`), or a
        zero row (`nonzero`).
    """
    if not is_concrete(x) or x.size == 0:
        return
    finite, lo, hi = (np.asarray(v) for v in _row_stats(x))
    if not finite:
        raise ValueError(f"{name} contains NaN or inf values")
    if unit_norm:
        tol = norm_tolerance(x.dtype)
        if abs(lo - 1.0) > tol or abs(hi - 1.0) > tol:
            raise ValueError(
                f"{name} must be L2-normalised along the last axis (norms within {tol:g} of 1), "
                f"got norms in [{lo:.6g}, {hi:.6g}]; normalise first or pass normalize=True")
    if nonzero and lo == 0.0:
        raise ValueError(f"{name} has an all-zero row, which cannot be normalised")


def l2_normalize(x: jax.Array, eps: float = 0.0) -> jax.Array:
    """Rows of `x` divided by their L2 norm (as `sklearn.preprocessing.normalize`, zero rows stay 0)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
    return x / jnp.where(norm > eps, norm, 1.0)


def positive_int(name: str, value) -> int:
    """A static positive Python int (block sizes, k)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)
