"""Vision Transformer tower: OpenAI / open_clip ViT (class token, ln_pre), SigLIP ViT (MAP head) and
CoCa's contrastive image tower (attentional pooler).

Pixels are NHWC `[B, H, W, 3]`, already normalised. Other image sizes than the
config's are handled by resizing the patch position embeddings with torch's
bicubic rule (a = -0.75, align_corners=False), as transformers'
`interpolate_pos_encoding` does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clipjax.config import VisionConfig
from clipjax.layers import MLP, Attention, LayerNorm, Transformer, normal, param, zeros
from clipjax.sharding import constrain


def _cubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """`[n_out, n_in]` matrix of torch's bicubic interpolation (A=-0.75, align_corners=False)."""
    a = -0.75

    def w(t):
        t = abs(t)
        if t <= 1:
            return ((a + 2) * t - (a + 3)) * t * t + 1
        if t < 2:
            return (((t - 5) * t + 8) * t - 4) * a
        return 0.0

    m = np.zeros((n_out, n_in), np.float64)
    scale = n_in / n_out
    for i in range(n_out):
        src = (i + 0.5) * scale - 0.5
        f = int(np.floor(src))
        t = src - f
        for k in range(-1, 3):
            m[i, min(max(f + k, 0), n_in - 1)] += w(k - t)
    return m


def resize_pos_grid(pos: jax.Array, grid_in: int, grid_out: int) -> jax.Array:
    """Resize patch position embeddings `[grid_in**2, D]` -> `[grid_out**2, D]` (torch bicubic)."""
    if grid_in == grid_out:
        return pos
    m = jnp.asarray(_cubic_matrix(grid_in, grid_out), pos.dtype)
    g = pos.reshape(grid_in, grid_in, -1)
    g = jnp.einsum("oi,ijd->ojd", m, g)
    g = jnp.einsum("pj,ojd->opd", m, g)
    return g.reshape(grid_out * grid_out, -1)


def drop_patches(x: jax.Array, ratio: float, rng: jax.Array, num_prefix: int) -> jax.Array:
    """Keep a random subset of `max(1, int(P * (1 - ratio)))` patch tokens per example (FLIP).

    `x` `[B, num_prefix + P, D]`; the first `num_prefix` tokens (class token) are always kept.
    Kept tokens stay in their original order. Same rule as open_clip's `PatchDropout`
    (the top-k of Gaussian noise per row), with JAX random numbers.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"patch_dropout must be in [0, 1), got {ratio}")
    b, t, _ = x.shape
    p = t - num_prefix
    keep = max(1, int(p * (1.0 - ratio)))
    noise = jax.random.normal(rng, (b, p))
    idx = jnp.sort(jax.lax.top_k(noise, keep)[1], axis=-1)
    patches = jnp.take_along_axis(x[:, num_prefix:], idx[..., None], axis=1)
    return jnp.concatenate([x[:, :num_prefix], patches], axis=1)


class MAPHead(nnx.Module):
    """Multihead attention pooling: a learned probe attends over the tokens, then an MLP residual."""

    def __init__(self, cfg: VisionConfig, *, param_dtype, rngs: nnx.Rngs, attention: str = "xla"):
        self.probe = param(rngs, normal(0.02), (1, cfg.width), (None, "embed"), param_dtype)
        self.attn = Attention(cfg.width, cfg.heads, param_dtype=param_dtype, rngs=rngs, implementation=attention)
        self.ln = LayerNorm(cfg.width, eps=cfg.ln_eps, param_dtype=param_dtype, rngs=rngs)
        self.mlp = MLP(cfg.width, cfg.mlp_dim, cfg.act, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """`[B, T, D]` -> `[B, D]`."""
        probe = jnp.broadcast_to(self.probe[...].astype(x.dtype)[None], (x.shape[0], 1, x.shape[-1]))
        h = self.attn(probe, x)
        h = h + self.mlp(self.ln(h))
        return h[:, 0]


class AttentionalPooler(nnx.Module):
    """CoCa's attentional pooler (open_clip `AttentionalPooler`): learned queries `[Q, E]` attend over the tokens.

    `out = MHA(ln_q(query), ln_k(x), ln_k(x))` with `attn_pool_heads` heads over `E = embed_dim`, keys
    and values of width `W = width` (torch `nn.MultiheadAttention(E, heads, kdim=W, vdim=W)`). ln_q and
    ln_k use eps 1e-5 whatever the tower's `ln_eps` (open_clip builds them with its default LayerNorm).
    """

    def __init__(self, cfg: VisionConfig, embed_dim: int, *, param_dtype, rngs: nnx.Rngs, attention: str = "xla"):
        self.query = param(rngs, normal(1.0), (cfg.attn_pool_queries, embed_dim), (None, "embed"), param_dtype)
        self.ln_q = LayerNorm(embed_dim, eps=1e-5, param_dtype=param_dtype, rngs=rngs)
        self.ln_k = LayerNorm(cfg.width, eps=1e-5, param_dtype=param_dtype, rngs=rngs)
        self.attn = Attention(embed_dim, cfg.attn_pool_heads, param_dtype=param_dtype, rngs=rngs,
                              implementation=attention, kv_dim=cfg.width)

    def __call__(self, x: jax.Array, queries: int | None = None) -> jax.Array:
        """Tokens `[B, T, W]` -> pooled queries `[B, n, E]`, the first `n = queries` (default: all).

        Queries do not interact (each attends to the tokens alone), so the first `n` outputs are
        those of the full pooler."""
        q = self.query[...][:queries]
        q = self.ln_q(q.astype(x.dtype))
        q = jnp.broadcast_to(q[None], (x.shape[0],) + q.shape)
        return self.attn(q, self.ln_k(x))


class VisionTransformer(nnx.Module):
    def __init__(self, cfg: VisionConfig, embed_dim: int, use_proj: bool, *, param_dtype, rngs: nnx.Rngs,
                 attention: str = "xla"):
        self.cfg = cfg
        p, d = cfg.patch_size, cfg.width
        scale = d**-0.5
        self.patch_kernel = param(rngs, normal((3 * p * p) ** -0.5), (p, p, 3, d), (None, None, None, "embed"),
                                  param_dtype)
        self.patch_bias = param(rngs, zeros, (d,), ("embed",), param_dtype) if cfg.patch_bias else None
        self.class_embedding = param(rngs, normal(scale), (d,), ("embed",), param_dtype) if cfg.class_token else None
        self.pos_embed = param(rngs, normal(scale), (cfg.num_tokens, d), (None, "embed"), param_dtype)
        self.ln_pre = LayerNorm(d, eps=cfg.ln_eps, param_dtype=param_dtype, rngs=rngs) if cfg.ln_pre else None
        self.transformer = Transformer(d, cfg.heads, cfg.mlp_dim, cfg.layers, cfg.act, cfg.ln_eps,
                                       param_dtype=param_dtype, rngs=rngs, attention=attention,
                                       layer_scale_init=cfg.layer_scale_init)
        # CoCa's pooler outputs embed_dim-wide queries: ln_post and the projection act on those
        pool_dim = embed_dim if cfg.pool == "attn" else d
        self.attn_pool = (AttentionalPooler(cfg, embed_dim, param_dtype=param_dtype, rngs=rngs, attention=attention)
                          if cfg.pool == "attn" else None)
        self.ln_post = LayerNorm(pool_dim, eps=cfg.ln_eps, param_dtype=param_dtype, rngs=rngs)
        self.map_head = MAPHead(cfg, param_dtype=param_dtype, rngs=rngs, attention=attention) if cfg.pool == "map" else None
        self.proj = (param(rngs, normal(scale), (pool_dim, embed_dim), ("embed", None), param_dtype) if use_proj
                     else None)

    # -- pieces
    def embed(self, pixels: jax.Array) -> jax.Array:
        """Patchify, add class token and position embedding, ln_pre: `[B, H, W, 3]` -> `[B, T, D]`."""
        b, h, w, c = pixels.shape
        p = self.cfg.patch_size
        if h != w or h < p or c != 3:
            raise ValueError(f"pixels must be [B, S, S, 3] with S >= patch size {p}, got {pixels.shape}")
        g = h // p
        if g * p != h:  # as the strided patch convolution of open_clip / timm: the last h % p rows drop out
            pixels = pixels[:, :g * p, :g * p]
        x = pixels.reshape(b, g, p, g, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, g * g, p * p * c)
        kernel = self.patch_kernel[...].reshape(p * p * c, -1).astype(x.dtype)
        x = x @ kernel
        if self.patch_bias is not None:
            x = x + self.patch_bias[...].astype(x.dtype)
        pos = self.pos_embed[...]
        if self.class_embedding is not None:
            cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (b, 1, x.shape[-1]))
            x = jnp.concatenate([cls, x], axis=1)
            pos = jnp.concatenate([pos[:1], resize_pos_grid(pos[1:], self.cfg.grid, g)], axis=0)
        else:
            pos = resize_pos_grid(pos, self.cfg.grid, g)
        x = x + pos.astype(x.dtype)
        if self.ln_pre is not None:
            x = self.ln_pre(x)
        return constrain(x, ("batch", "act_seq", "act_embed"))

    def pool(self, x: jax.Array) -> jax.Array:
        """ln_post, pool and project the final tokens `[B, T, D]` -> `[B, E]`.

        `final_ln_after_pool` (open_clip's option, CLIPA) applies ln_post to the pooled vector instead.
        `attn` (CoCa): the attentional pooler, ln_post on its first query (open_clip's `_global_pool`
        with pool_type 'tok' on the pooled queries), then the projection; only that query is computed.
        """
        cfg = self.cfg
        if cfg.pool == "attn":
            return self._project(self.ln_post(self.attn_pool(x, queries=1)[:, 0]))
        if not cfg.final_ln_after_pool:
            x = self.ln_post(x)
        if cfg.pool == "tok":
            x = x[:, 0]
        elif cfg.pool == "map":
            x = self.map_head(x)
        else:  # avg: patch tokens after the class token; gap: all tokens (no class token)
            x = x[:, int(cfg.class_token):].mean(axis=1)
        if cfg.final_ln_after_pool:
            x = self.ln_post(x)
        return self._project(x)

    def _project(self, x):
        return x if self.proj is None else x @ self.proj[...].astype(x.dtype)

    # -- entry points
    def __call__(self, pixels: jax.Array, *, scan: bool = True, remat: str = "none", patch_dropout: float = 0.0,
                 rng: jax.Array | None = None) -> jax.Array:
        """`[B, H, W, 3]` -> pooled, projected `[B, E]` (not normalised).

        `patch_dropout` > 0 (training only, needs `rng`) keeps a random `1 - patch_dropout` of the patch
        tokens of each image (FLIP; open_clip's `PatchDropout`), class token always kept.
        """
        x = self.embed(pixels)
        if patch_dropout > 0:
            if rng is None:
                raise ValueError("patch_dropout > 0 needs an rng key")
            x = drop_patches(x, patch_dropout, rng, int(self.cfg.class_token))
        x = self.transformer(x, causal=False, scan=scan, remat=remat)
        return self.pool(x)

    def hidden_states(self, pixels: jax.Array, *, scan: bool = True) -> jax.Array:
        """Output of every block, `[L, B, T, D]` (before ln_post)."""
        _, hidden = self.transformer(self.embed(pixels), causal=False, scan=scan, intermediates=True)
        return hidden

    def dense(self, pixels: jax.Array, *, scan: bool = True) -> jax.Array:
        """MaskCLIP patch embeddings `[B, P, E]` (methods.md §19): the last block without q.k mixing."""
        if self.cfg.pool != "tok":
            raise ValueError(f"dense (MaskCLIP) features need a class-token ViT, got pool={self.cfg.pool!r}")
        n = self.cfg.layers
        x = self.transformer(self.embed(pixels), causal=False, scan=scan, upto=n - 1)
        v = self.transformer.block(n - 1).maskclip(x)
        return self._project(self.ln_post(v[:, 1:]))
