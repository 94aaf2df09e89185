"""Weight-space operations on model states: WiSE-FT interpolation."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def wise_ft(theta_0, theta_1, alpha: float):
    """WiSE-FT (Wortsman et al. 2022): `(1 - alpha) * theta_0 + alpha * theta_1`, leaf by leaf.

    Args:
      theta_0: the zero-shot (initial) model state, e.g. `clipjax.load(BASE).params`.
      theta_1: the fine-tuned model state of the same architecture.
      alpha: mixing coefficient in [0, 1]; 0 gives theta_0, 1 gives theta_1 (the paper's default
        report is alpha = 0.5).

    Returns:
      A state of the same structure; each leaf in theta_1's dtype, interpolated in float32.
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    s0, s1 = jax.tree.structure(theta_0), jax.tree.structure(theta_1)
    if s0 != s1:
        raise ValueError("theta_0 and theta_1 have different structures: they are not the same architecture")
    for a, b in zip(jax.tree.leaves(theta_0), jax.tree.leaves(theta_1)):
        if a.shape != b.shape:
            raise ValueError(f"theta_0 and theta_1 differ in a leaf's shape: {a.shape} vs {b.shape}")

    def mix(a, b):
        out = (1.0 - alpha) * jnp.asarray(a, jnp.float32) + alpha * jnp.asarray(b, jnp.float32)
        return out.astype(b.dtype)

    return jax.tree.map(mix, theta_0, theta_1)
