"""Text tower: transformer over token ids, final LayerNorm, pooled to one vector, projected.

Pooling (`TextConfig.pool`): `argmax` takes the position of the largest id
(OpenAI's EOT rule: EOT 49407 is the largest id), `eos` the first position of
`eos_id` (transformers CLIP with a non-legacy eos id), `last` the final
position (SigLIP), `first` the first position.

CoCa (`TextConfig.embed_cls`): a learned class token is appended after the ids and the tower is
read there, `ln_final` after pooling (open_clip `TextTransformer` with `embed_cls`), under an
attention mask that adds CoCa's legacy pad mask to the causal one (`cls_pad_mask`).
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


def cls_pad_mask(ids: jax.Array, pad_id: int) -> jax.Array:
    """CoCa's key mask `[B, 1, 1, L + 1]` (True = visible) for ids `[B, L]` with the class token appended.

    open_clip's `_build_additive_mask` with `correct_cls_mask=False` (CoCa's released weights): the
    always-visible column for the class token is put FIRST, so key `0` is always visible and key
    `j >= 1` is visible iff `ids[:, j - 1] != pad_id` - one position off from the tokens (and the
    appended class token itself is hidden when the last id is a pad). Computed from the ids inside
    jit; every query keeps key 0, so no row is fully masked.
    """
    valid = ids != pad_id
    valid = jnp.concatenate([jnp.ones_like(valid[:, :1]), valid], axis=1)
    return valid[:, None, None, :]


class TextTransformer(nnx.Module):
    def __init__(self, cfg: TextConfig, embed_dim: int, use_proj: bool, *, param_dtype, rngs: nnx.Rngs,
                 attention: str = "xla"):
        self.cfg = cfg
        d = cfg.width
        self.token_embed = param(rngs, normal(0.02), (cfg.vocab_size, d), ("vocab", "embed"), param_dtype)
        self.pos_embed = param(rngs, normal(0.01), (cfg.num_positions, d), (None, "embed"), param_dtype)
        self.transformer = Transformer(d, cfg.heads, cfg.mlp_dim, cfg.layers, cfg.act, cfg.ln_eps,
                                       param_dtype=param_dtype, rngs=rngs, attention=attention,
                                       layer_scale_init=cfg.layer_scale_init)
        self.ln_final = LayerNorm(d, eps=cfg.ln_eps, param_dtype=param_dtype, rngs=rngs)
        self.proj = param(rngs, normal(d**-0.5), (d, embed_dim), ("embed", None), param_dtype) if use_proj else None
        self.proj_bias = param(rngs, zeros, (embed_dim,), (None,), param_dtype) if use_proj and cfg.proj_bias else None
        self.cls_emb = param(rngs, normal(0.01), (d,), ("embed",), param_dtype) if cfg.embed_cls else None

    def embed(self, ids: jax.Array, dtype) -> jax.Array:
        """Token + position embeddings, `[B, L]` int -> `[B, L, D]` (`[B, L + 1, D]` with the appended
        class token of `embed_cls`, at position `L`)."""
        b, n = ids.shape
        if n > self.cfg.context_length:
            raise ValueError(f"token ids have length {n} > context_length {self.cfg.context_length}")
        x = jnp.take(self.token_embed[...], ids, axis=0).astype(dtype)
        if self.cls_emb is not None:
            cls = jnp.broadcast_to(self.cls_emb[...].astype(dtype), (b, 1, x.shape[-1]))
            x = jnp.concatenate([x, cls], axis=1)
        x = x + self.pos_embed[...][:x.shape[1]].astype(dtype)
        return constrain(x, ("batch", "act_seq", "act_embed"))

    def attention_mask(self, ids: jax.Array) -> jax.Array | None:
        """The key mask beyond the causal one: CoCa's `cls_pad_mask` with `embed_cls`, else None."""
        return cls_pad_mask(ids, self.cfg.pad_id) if self.cfg.embed_cls else None

    def __call__(self, ids: jax.Array, *, dtype=jnp.float32, scan: bool = True, remat: str = "none") -> jax.Array:
        """`[B, L]` int32 -> pooled, projected `[B, E]` (not normalised)."""
        x = self.transformer(self.embed(ids, dtype), causal=self.cfg.causal, scan=scan, remat=remat,
                             mask=self.attention_mask(ids))
        if self.cfg.embed_cls:  # the appended class token, LayerNorm after pooling (open_clip's order)
            x = self.ln_final(x[:, -1])
        else:
            x = self.ln_final(x)
            x = x[jnp.arange(x.shape[0]), pool_index(ids, self.cfg)]
        if self.proj is not None:
            x = x @ self.proj[...].astype(x.dtype)
            if self.proj_bias is not None:
                x = x + self.proj_bias[...].astype(x.dtype)
        return x

    def hidden_states(self, ids: jax.Array, *, dtype=jnp.float32, scan: bool = True) -> jax.Array:
        """Output of every block, `[L, B, T, D]` (`T` counts the appended class token of `embed_cls`)."""
        _, hidden = self.transformer(self.embed(ids, dtype), causal=self.cfg.causal, scan=scan, intermediates=True,
                                     mask=self.attention_mask(ids))
        return hidden
