"""Long-CLIP: stretch the text position embedding 77 -> 248 (methods.md §18).

Long-CLIP keeps the first 20 positions, interpolates positions 20..75 four-fold
and extrapolates the tail linearly:

    new[i]           = pe[i]                                        i < 20
    new[20 + 4i + j] = ((4 - j) pe[20 + i] + j pe[21 + i]) / 4      i = 0..55, j = 0..3
    new[244 + j]     = pe[76] + j (pe[76] - pe[75]) / 4             j = 0..3

In Long-CLIP training, positions < 20 stay frozen (`KEEP`); `trainable_mask`
gives that mask for an optimizer (e.g. `optax.masked`).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from clipjax.config import CLIPConfig

KEEP = 20
LONG_CONTEXT = 248


def stretch_position_embedding(pe: jnp.ndarray, keep: int = KEEP) -> jnp.ndarray:
    """`[77, D]` -> `[248, D]` exactly as Long-CLIP's `load` does."""
    n, _ = pe.shape
    if n != 77:
        raise ValueError(f"Long-CLIP stretches a 77-position embedding, got {n} positions")
    head = pe[:keep]
    a, b = pe[keep:n - 1], pe[keep + 1:n]  # pairs (pe[20+i], pe[21+i]), i = 0..55
    j = jnp.arange(4, dtype=pe.dtype)[None, :, None]
    mid = ((4 - j) * a[:, None] + j * b[:, None]) / 4  # [56, 4, D]
    tail = pe[n - 1] + jnp.arange(4, dtype=pe.dtype)[:, None] * (pe[n - 1] - pe[n - 2]) / 4
    return jnp.concatenate([head, mid.reshape(-1, pe.shape[1]), tail], axis=0)


def to_long_clip(params: nnx.State, config: CLIPConfig) -> tuple[nnx.State, CLIPConfig]:
    """Params and config of the Long-CLIP model (text context 248) made from a 77-token CLIP."""
    from clipjax.models.clip import abstract_params

    new_cfg = config.replace(text=dataclasses.replace(config.text, context_length=LONG_CONTEXT))
    pure = params.to_pure_dict()
    pure["text"]["pos_embed"] = stretch_position_embedding(jnp.asarray(pure["text"]["pos_embed"]))
    state = abstract_params(new_cfg)
    nnx.replace_by_pure_dict(state, pure)
    return state, new_cfg


def trainable_mask(params: nnx.State) -> dict:
    """Pure-dict mask, True everywhere except that the text position embedding is a `[248]` row mask
    with the first 20 positions False (apply it to the gradient rows)."""
    import jax

    pure = jax.tree.map(lambda _: True, params.to_pure_dict())
    pure["text"]["pos_embed"] = (jnp.arange(LONG_CONTEXT) >= KEEP)[:, None]
    return pure
