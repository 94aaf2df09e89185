"""Text tower: transformer over token ids, final LayerNorm, pooled to one vector, projected.

Pooling (`TextConfig.pool`): `argmax` takes the position of the largest id
(OpenAI's EOT rule: EOT 49407 is the largest id), `eos` the first position of
`eos_id` (transformers CLIP with a non-legacy eos id), `last` the final
position (SigLIP), `first` the first position.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from clipjax.config import TextConfig
from clipjax.layers import LayerNorm, Transformer, normal, param, zeros
from clipjax.sharding import constrain


def pool_index(ids: jax.Array, cfg: TextConfig) -> jax.Array:
    """Index `[B]` of the token that represents each sequence `ids` `[B, L]`."""
    if cfg.pool == "argmax":
        return jnp.argmax(ids, axis=-1)
    if cfg.pool == "eos":
        return jnp.argmax(ids == cfg.eos_id, axis=-1)
    if cfg.pool == "last":
        return jnp.full(ids.shape[:1], ids.shape[1] - 1)
    return jnp.zeros(ids.shape[:1], jnp.int32)


class TextTransformer(nnx.Module):
    def __init__(self, cfg: TextConfig, embed_dim: int, use_proj: bool, *, param_dtype, rngs: nnx.Rngs,
                 attention: str = "xla"):
        self.cfg = cfg
        d = cfg.width
        self.token_embed = param(rngs, normal(0.02), (cfg.vocab_size, d), ("vocab", "embed"), param_dtype)
        self.pos_embed = param(rngs, normal(0.01), (cfg.context_length, d), (None, "embed"), param_dtype)
        self.transformer = Transformer(d, cfg.heads, cfg.mlp_dim, cfg.layers, cfg.act, cfg.ln_eps,
                                       param_dtype=param_dtype, rngs=rngs, attention=attention)
        self.ln_final = LayerNorm(d, eps=cfg.ln_eps, param_dtype=param_dtype, rngs=rngs)
        self.proj = param(rngs, normal(d**-0.5), (d, embed_dim), ("embed", None), param_dtype) if use_proj else None
        self.proj_bias = param(rngs, zeros, (embed_dim,), (None,), param_dtype) if use_proj and cfg.proj_bias else None

    def embed(self, ids: jax.Array, dtype) -> jax.Array:
        """Token + position embeddings, `[B, L]` int -> `[B, L, D]`."""
        n = ids.shape[1]
        if n > self.cfg.context_length:
            raise ValueError(f"token ids have length {n} > context_length {self.cfg.context_length}")
        x = jnp.take(self.token_embed[...], ids, axis=0).astype(dtype)
        x = x + self.pos_embed[...][:n].astype(dtype)
        return constrain(x, ("batch", "act_seq", "act_embed"))

    def __call__(self, ids: jax.Array, *, dtype=jnp.float32, scan: bool = True, remat: str = "none") -> jax.Array:
        """`[B, L]` int32 -> pooled, projected `[B, E]` (not normalised)."""
        x = self.transformer(self.embed(ids, dtype), causal=self.cfg.causal, scan=scan, remat=remat)
        x = self.ln_final(x)
        x = x[jnp.arange(x.shape[0]), pool_index(ids, self.cfg)]
        if self.proj is not None:
            x = x @ self.proj[...].astype(x.dtype)
            if self.proj_bias is not None:
                x = x + self.proj_bias[...].astype(x.dtype)
        return x

    def hidden_states(self, ids: jax.Array, *, dtype=jnp.float32, scan: bool = True) -> jax.Array:
        """Output of every block, `[L, B, T, D]`."""
        _, hidden = self.transformer(self.embed(ids, dtype), causal=self.cfg.causal, scan=scan, intermediates=True)
        return hidden
