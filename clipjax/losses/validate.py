"""Input checks shared by the contrastive losses.

Static checks (rank, shape, dtype, batch size, divisibility) only read shape
and dtype, so they work on tracers and run at trace time, before anything is
compiled. The finiteness check needs values: it runs only on concrete arrays
(an eager call) and is skipped silently under `jit`/`grad` tracing, where a
value check would need a device round trip inside the trace.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(x: Any) -> bool:
    """True when `x` holds values (numpy or a committed jax Array), False for tracers."""
    return not isinstance(x, jax.core.Tracer)


def check_feature_pair(a: Any, b: Any, names: tuple[str, str] = ("image_features", "text_features"),
                       min_batch: int = 2) -> tuple[int, int]:
    """Check two paired embedding matrices and return `(B, D)`.

    Args:
      a, b: `[B, D]` floating arrays, row `i` of `a` paired with row `i` of `b`.
      names: names used in error messages.
      min_batch: smallest allowed batch; contrastive losses need at least one
        negative, so 2.

    Raises:
      TypeError: non-floating dtypes or dtypes that differ.
      ValueError: wrong rank, shapes that differ, or a batch below `min_batch`.
    """
    for x, name in zip((a, b), names):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{name} must be an array of shape [B, D], got {type(x).__name__}")
        if len(x.shape) != 2:
            raise ValueError(f"{name} must have shape [B, D] (2 dims), got shape {tuple(x.shape)}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} must be a floating array (float32/bfloat16/float16), got {x.dtype}")
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"{names[0]} and {names[1]} must have the same shape [B, D], "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise TypeError(f"{names[0]} and {names[1]} must have the same dtype, got {a.dtype} and {b.dtype}")
    batch, dim = a.shape
    if batch < min_batch:
        raise ValueError(f"contrastive losses need a batch of at least {min_batch} pairs "
                         f"(every pair needs a negative), got B={batch}")
    if dim < 1:
        raise ValueError(f"embedding dimension must be at least 1, got D={dim}")
    return int(batch), int(dim)


def check_scalar(x: Any, name: str) -> jax.Array:
    """Return `x` as a float32 scalar; accept Python numbers and arrays of shape `()` or `(1,)`.

    Raises:
      ValueError: `x` has more than one element.
      TypeError: `x` is not a real number.
    """
    if isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{name} must be a real number, got a bool")
    if isinstance(x, (int, float, np.number)):
        return jnp.asarray(x, jnp.float32)
    if not hasattr(x, "shape"):
        raise TypeError(f"{name} must be a scalar number or array, got {type(x).__name__}")
    if int(np.prod(x.shape)) != 1:
        raise ValueError(f"{name} must be a scalar (shape () or (1,)), got shape {tuple(x.shape)}")
    if not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)):
        raise TypeError(f"{name} must be a real number, got dtype {x.dtype}")
    return jnp.reshape(x, ()).astype(jnp.float32)


def check_finite(**arrays: Any) -> None:
    """Raise `ValueError` naming every concrete input that holds NaN or inf.

    Tracers (inside `jit`, `grad`, `shard_map`) are skipped: call this on
    concrete arrays, or rely on the eager call of a public loss.
    """
    for name, x in arrays.items():
        if x is None or not is_concrete(x):
            continue
        with jax.ensure_compile_time_eval():  # concrete values, even when called inside a trace
            arr = jnp.asarray(x)
            bad = int(arr.size - jnp.sum(jnp.isfinite(arr)))
        if bad:
            raise ValueError(f"{name} has {bad} non-finite value(s) (NaN or inf); "
                             "contrastive losses need finite embeddings and scales")


def check_divisible(batch: int, num_shards: int, axis_names: Sequence[str]) -> None:
    """Raise `ValueError` when the global batch does not split evenly over the mesh axes."""
    if num_shards < 1:
        raise ValueError(f"mesh axes {tuple(axis_names)} have no devices")
    if batch % num_shards:
        raise ValueError(f"global batch B={batch} is not divisible by the {num_shards} devices on "
                         f"mesh axes {tuple(axis_names)}; pad or drop to a multiple of {num_shards}")


def check_block_size(block_size: Any, name: str = "block_size") -> int:
    """Return a positive int block size or raise."""
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)):
        raise TypeError(f"{name} must be a positive int, got {block_size!r}")
    if block_size < 1:
        raise ValueError(f"{name} must be a positive int, got {block_size}")
    return int(block_size)
