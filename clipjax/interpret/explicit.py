"""An explicit transformer runner over clipjax's stacked block params, exposing what the fused model hides.

The towers (`clipjax.models.vit`, `clipjax.models.text`) run attention through
`jax.nn.dot_product_attention`, which returns neither the attention probabilities nor the per-head
outputs. `run_blocks` re-runs the same pre-LN blocks with einsum attention, `lax.scan` over the
leading layers axis of the stacked params, and returns per layer:

- `inputs` `[L, B, T, D]`: the residual stream entering the block;
- `attention` `[L, B, H, T, T]`: softmax probabilities A (queries x keys), before `attn_multiplier`;
- `values` `[L, B, T, H, Dh]`: v = ln1(x) W_V + b_V per head;
- `head_outputs` `[L, B, T, H, Dh]`: (A * multiplier) v per head, before the output projection;
- `attn_branch` / `mlp_branch` `[L, B, T, D]`: what each branch adds to the residual stream (output
  bias and LayerScale included), so `x_{l+1} = x_l + attn_branch_l + mlp_branch_l`.

`attn_multiplier` (`[L, B, H, T, T]` or anything broadcastable to it, ones = the normal forward)
multiplies the probabilities after the softmax. Hence `d out / d multiplier` at ones is
`(d out / d A) * A` elementwise: the gradient x attention relevance of CLIP4DM (text tower) and the
attention scores TCA ranks patches by (image tower).

`image_forward` / `text_forward` run a whole tower: embeddings, `run_blocks`, pooling and projection,
equal to `clipjax.models.clip.encode_image` / `encode_text` (unnormalised). LayerNorm and softmax run
in float32 or wider, so with `jax.enable_x64(True)` and `dtype="float64"` the whole pass is float64
(the towers' own LayerNorms compute in float32). Only ViT image towers; the `map` (SigLIP) and
`attn` (CoCa) pooling heads are the model's own modules (float32 LayerNorms), the blocks still explicit.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clipjax import checks
from clipjax.config import CLIPConfig
from clipjax.layers import activation
from clipjax.models.clip import graphdef
from clipjax.models.text import cls_pad_mask, pool_index
from clipjax.models.vit import resize_pos_grid

__all__ = ["compute_dtype", "image_forward", "image_pool", "image_tokens", "layer_norm", "pure", "run_blocks",
           "text_forward", "text_tokens", "tower_blocks"]

TOWERS = {"image": "visual", "text": "text"}


def pure(tree: Any) -> Any:
    """Plain nested dict of arrays from an `nnx.State` (other pytrees are returned as they are)."""
    return nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree


def tower_blocks(params: Any, tower: str = "image") -> dict:
    """The stacked block params of a tower as a plain dict (`attn`, `ln1`, `ln2`, `mlp`, optional `ls1`, `ls2`),
    every leaf with a leading layers axis `L`."""
    if tower not in TOWERS:
        raise ValueError(f"tower must be 'image' or 'text', got {tower!r}")
    return pure(params[TOWERS[tower]]["transformer"]["blocks"])


def compute_dtype(config: CLIPConfig, dtype: str | None) -> jnp.dtype:
    """`dtype` (default: `config.dtype`); float64 needs `jax.enable_x64`."""
    dt = jnp.dtype(dtype or config.dtype)
    if dt == jnp.float64 and not jax.config.jax_enable_x64:
        raise ValueError("dtype='float64' needs 64-bit jax: run inside `with jax.enable_x64(True):`")
    return dt


def _wide(dtype) -> jnp.dtype:
    """The statistics dtype: float32, or float64 for float64 inputs."""
    return jnp.promote_types(dtype, jnp.float32)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis of `x` `[..., D]` with `scale`, `bias` `[D]`; statistics in float32 or wider.

    (x - mean) / sqrt(var + eps) * scale + bias, var the biased variance (torch `nn.LayerNorm`).
    Returned in `x`'s dtype.
    """
    xw = x.astype(_wide(x.dtype))
    mean = xw.mean(-1, keepdims=True)
    var = jnp.square(xw - mean).mean(-1, keepdims=True)
    y = (xw - mean) * jax.lax.rsqrt(var + eps)
    return (y * scale.astype(xw.dtype) + bias.astype(xw.dtype)).astype(x.dtype)


def _multiplier(attn_multiplier, shape: tuple[int, ...], dtype) -> jax.Array:
    """`attn_multiplier` as `[L, b, h, t, s]` (each of b, h, t, s either full or 1), layers axis made full."""
    if attn_multiplier is None:
        return jnp.ones((shape[0], 1, 1, 1, 1), dtype)
    m = jnp.asarray(attn_multiplier)
    if m.ndim > 5:
        raise ValueError(f"attn_multiplier must be broadcastable to [L, B, H, T, T] = {shape}, got shape {m.shape}")
    m = m.reshape((1,) * (5 - m.ndim) + m.shape)
    try:
        np.broadcast_shapes(m.shape, shape)
    except ValueError:
        raise ValueError(f"attn_multiplier must be broadcastable to [L, B, H, T, T] = {shape}, "
                         f"got shape {tuple(m.shape)}") from None
    return jnp.broadcast_to(m, shape[:1] + m.shape[1:]).astype(_wide(dtype))


def _visibility(causal: bool, mask, t: int):
    """Boolean `[b, 1, T, T]` (True = a query may attend to the key), or None when nothing is masked."""
    visible = jnp.tril(jnp.ones((t, t), bool))[None, None] if causal else None
    if mask is not None:
        mask = jnp.asarray(mask, bool)
        visible = mask if visible is None else visible & mask
    return visible


def run_blocks(blocks: Mapping, x: jax.Array, *, heads: int, eps: float, act: str, causal: bool = False,
               mask: jax.Array | None = None, attn_multiplier: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """Run the stacked pre-LN blocks on `x` `[B, T, D]` with explicit attention.

    Args:
      blocks: stacked block params (`tower_blocks`): `attn` with `q/k/v_kernel` `[L, D, H, Dh]`,
        `q/k/v_bias` `[L, H, Dh]`, `out_kernel` `[L, H, Dh, D]`, `out_bias` `[L, D]`; `ln1`, `ln2`
        (`scale`, `bias` `[L, D]`); `mlp` (`fc1`, `fc2`: `kernel`, `bias`); optional LayerScale `ls1`, `ls2` `[L, D]`.
      x: `[B, T, D]` tokens in the compute dtype (params are cast to it).
      heads: H; eps: LayerNorm epsilon; act: the MLP activation name (`clipjax.layers.activation`).
      causal: mask keys after each query (text towers).
      mask: optional boolean key mask broadcastable to `[B, 1, T, T]`, True = visible (as
        `clipjax.layers.Attention`); combined with `causal`. Every query must keep one key.
      attn_multiplier: optional `[L, B, H, T, T]` or broadcastable; multiplies the probabilities after
        the softmax (ones = the normal forward).

    Returns:
      `(x_out [B, T, D], record)`, `record` the per-layer dict described in the module docstring.
    """
    x = checks.array("x", x, "[B, T, D]")
    n_layers = blocks["ln1"]["scale"].shape[0]
    b, t, d = x.shape
    if d % heads:
        raise ValueError(f"heads={heads} does not divide the width D={d} of x")
    dtype, wide = x.dtype, _wide(x.dtype)
    mult = _multiplier(attn_multiplier, (n_layers, b, heads, t, t), dtype)
    visible = _visibility(causal, mask, t)
    act_fn = activation(act)
    scale = (d // heads) ** -0.5

    def cast(a):
        return a.astype(dtype)

    def body(h, inputs):
        p, m = inputs
        a = p["attn"]
        y = layer_norm(h, p["ln1"]["scale"], p["ln1"]["bias"], eps)
        q = jnp.einsum("btd,dhk->bthk", y, cast(a["q_kernel"])) + cast(a["q_bias"])
        k = jnp.einsum("btd,dhk->bthk", y, cast(a["k_kernel"])) + cast(a["k_bias"])
        v = jnp.einsum("btd,dhk->bthk", y, cast(a["v_kernel"])) + cast(a["v_bias"])
        logits = jnp.einsum("bthk,bshk->bhts", q, k, preferred_element_type=wide) * jnp.asarray(scale, wide)
        if visible is not None:
            logits = jnp.where(visible, logits, jnp.asarray(-0.7 * jnp.finfo(wide).max, wide))
        probs = jax.nn.softmax(logits, axis=-1)
        per_head = jnp.einsum("bhts,bshk->bthk", (probs * m).astype(dtype), v)
        attn = jnp.einsum("bthk,hkd->btd", per_head, cast(a["out_kernel"])) + cast(a["out_bias"])
        if "ls1" in p:
            attn = attn * cast(p["ls1"])
        mid = h + attn
        f = p["mlp"]
        z = layer_norm(mid, p["ln2"]["scale"], p["ln2"]["bias"], eps)
        z = act_fn(z @ cast(f["fc1"]["kernel"]) + cast(f["fc1"]["bias"]))
        mlp = z @ cast(f["fc2"]["kernel"]) + cast(f["fc2"]["bias"])
        if "ls2" in p:
            mlp = mlp * cast(p["ls2"])
        record = {"inputs": h, "attention": probs, "values": v, "head_outputs": per_head, "attn_branch": attn,
                  "mlp_branch": mlp}
        return mid + mlp, record

    return jax.lax.scan(body, x, (dict(blocks), mult))


# ----------------------------------------------------------------------------- image tower
def _vit(config: CLIPConfig) -> None:
    if config.vision.arch != "vit":
        raise ValueError(f"the explicit runner needs a ViT image tower, got vision.arch={config.vision.arch!r}")


def image_tokens(params: Any, pixels: jax.Array, *, config: CLIPConfig, dtype: str | None = None) -> jax.Array:
    """Patchify, class token, position embedding and ln_pre: `[B, S, S, 3]` -> `[B, T, D]` (the model's `embed`,
    with LayerNorm statistics in float32 or wider)."""
    _vit(config)
    cfg = config.vision
    dt = compute_dtype(config, dtype)
    vis = pure(params["visual"])
    x = checks.array("pixels", pixels, "[B, H, W, C]")
    b, h, w, c = x.shape
    p = cfg.patch_size
    if h != w or h < p or c != 3:
        raise ValueError(f"pixels must be NHWC [B, S, S, 3] with S >= patch size {p}, got shape {tuple(x.shape)}")
    g = h // p
    x = x[:, :g * p, :g * p].astype(dt)
    x = x.reshape(b, g, p, g, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, g * g, p * p * c)
    x = x @ vis["patch_kernel"].reshape(p * p * c, -1).astype(dt)
    if "patch_bias" in vis:
        x = x + vis["patch_bias"].astype(dt)
    pos = vis["pos_embed"]
    if "class_embedding" in vis:
        cls = jnp.broadcast_to(vis["class_embedding"].astype(dt), (b, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1)
        pos = jnp.concatenate([pos[:1], resize_pos_grid(pos[1:], cfg.grid, g)], axis=0)
    else:
        pos = resize_pos_grid(pos, cfg.grid, g)
    x = x + pos.astype(dt)
    if "ln_pre" in vis:
        x = layer_norm(x, vis["ln_pre"]["scale"], vis["ln_pre"]["bias"], cfg.ln_eps)
    return x


def image_pool(params: Any, tokens: jax.Array, *, config: CLIPConfig) -> jax.Array:
    """ln_post, pooling and projection of the final tokens `[B, T, D]` -> `[B, E]` (the model's `pool`)."""
    cfg = config.vision
    if cfg.pool in ("map", "attn"):  # the model's own heads (float32 LayerNorms)
        return nnx.merge(graphdef(config), params).visual.pool(tokens)
    vis = pure(params["visual"])

    def ln(y):
        return layer_norm(y, vis["ln_post"]["scale"], vis["ln_post"]["bias"], cfg.ln_eps)

    if cfg.pool == "tok":  # LayerNorm is per token: final_ln_after_pool does not matter
        y = ln(tokens[:, 0])
    else:
        rest = tokens[:, int(cfg.class_token):]
        y = ln(rest.mean(axis=1)) if cfg.final_ln_after_pool else ln(rest).mean(axis=1)
    return y @ vis["proj"].astype(y.dtype) if "proj" in vis else y


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def image_forward(params: Any, pixels: jax.Array, *, config: CLIPConfig, attn_multiplier: jax.Array | None = None,
                  dtype: str | None = None) -> tuple[jax.Array, dict]:
    """The ViT image tower with explicit attention.

    Args:
      params: the model state (`clipjax.models.clip.init_params`, a converted checkpoint's `params`).
      pixels: `[B, S, S, 3]` preprocessed (CLIP-normalised) NHWC pixels.
      config: the model config (static).
      attn_multiplier: optional `[L, B, H, T, T]` (or broadcastable) multiplier of the probabilities.
      dtype: compute dtype (default `config.dtype`); `"float64"` inside `jax.enable_x64(True)`.

    Returns:
      `(embedding [B, E], record)`: the unnormalised embedding (`encode_image(..., normalize=False)`)
      and the per-layer record of `run_blocks`, plus `record["tokens"]` `[B, T, D]`, the final tokens
      before ln_post.
    """
    cfg = config.vision
    x = image_tokens(params, pixels, config=config, dtype=dtype)
    x, record = run_blocks(tower_blocks(params, "image"), x, heads=cfg.heads, eps=cfg.ln_eps, act=cfg.act,
                           attn_multiplier=attn_multiplier)
    record["tokens"] = x
    return image_pool(params, x, config=config), record


# ----------------------------------------------------------------------------- text tower
def text_tokens(params: Any, ids: jax.Array, *, config: CLIPConfig, dtype: str | None = None) -> jax.Array:
    """Token + position embeddings `[B, L]` -> `[B, L, D]` (`[B, L + 1, D]` with CoCa's appended class token)."""
    cfg = config.text
    dt = compute_dtype(config, dtype)
    ids = checks.array("ids", ids, "[B, L]", dtype="integer")
    if ids.shape[1] > cfg.context_length:
        raise ValueError(f"ids has length {ids.shape[1]} > context_length {cfg.context_length}")
    txt = pure(params["text"])
    x = jnp.take(txt["token_embed"], ids, axis=0).astype(dt)
    if "cls_emb" in txt:
        x = jnp.concatenate([x, jnp.broadcast_to(txt["cls_emb"].astype(dt), (x.shape[0], 1, x.shape[-1]))], axis=1)
    return x + txt["pos_embed"][:x.shape[1]].astype(dt)


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def text_forward(params: Any, ids: jax.Array, *, config: CLIPConfig, attn_multiplier: jax.Array | None = None,
                 dtype: str | None = None) -> tuple[jax.Array, dict]:
    """The text tower with explicit (causal, and CoCa pad-masked) attention.

    Args:
      params: the model state.
      ids: `[B, L]` int token ids (`clipjax.tokenizer`).
      config: the model config (static).
      attn_multiplier: optional `[L, B, H, T, T]` (or broadcastable) multiplier of the probabilities, `T` the
        sequence length (`L + 1` with CoCa's class token).
      dtype: compute dtype (default `config.dtype`).

    Returns:
      `(embedding [B, E], record)`: the unnormalised embedding (`encode_text(..., normalize=False)`) and the
      per-layer record of `run_blocks`, plus `record["tokens"]` `[B, T, D]` (before ln_final) and
      `record["pool_index"]` `[B]`, the position the embedding is read from.
    """
    cfg = config.text
    x = text_tokens(params, ids, config=config, dtype=dtype)
    mask = cls_pad_mask(ids, cfg.pad_id) if cfg.embed_cls else None
    x, record = run_blocks(tower_blocks(params, "text"), x, heads=cfg.heads, eps=cfg.ln_eps, act=cfg.act,
                           causal=cfg.causal, mask=mask, attn_multiplier=attn_multiplier)
    txt = pure(params["text"])
    idx = jnp.full(ids.shape[:1], x.shape[1] - 1) if cfg.embed_cls else pool_index(ids, cfg)
    y = layer_norm(x[jnp.arange(x.shape[0]), idx], txt["ln_final"]["scale"], txt["ln_final"]["bias"], cfg.ln_eps)
    if "proj" in txt:
        y = y @ txt["proj"].astype(y.dtype)
        if "proj_bias" in txt:
            y = y + txt["proj_bias"].astype(y.dtype)
    record["tokens"] = x
    record["pool_index"] = idx
    return y, record
