"""The two-tower model and its pure functional API.

`CLIP` is an NNX module holding only `nnx.Param`. The functional API splits it
once per config (`graphdef(config)`) and exposes pure, jitted functions of
`(params, arrays)`:

    params = init_params(config, seed=0)             # nnx.State of Params
    img = encode_image(params, pixels, config=cfg)    # [B, H, W, 3] -> [B, E], L2-normalised
    txt = encode_text(params, ids, config=cfg)        # [B, L] int32 -> [B, E]
    lg = logits(params, pixels, ids, config=cfg)      # [B_img, B_txt]

`config` is a static (hashable) argument: compute dtype, scan/unroll and the
remat policy are read from it.

A single-tower config (`config.towers` "image" or "text") builds only that tower, with no logit
scale or bias: the other tower's functions, `logits` and `forward` raise `ConfigError` naming the
missing tower (at trace time).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from clipjax.config import CLIPConfig, ConfigError
from clipjax.models.text import TextTransformer
from clipjax.models.vit import VisionTransformer
from clipjax.sharding import param_shardings


class CLIP(nnx.Module):
    """Image tower (`visual`), text tower (`text`), `log_logit_scale` and optional `logit_bias`.

    A single-tower config (`config.towers`) holds its tower only: `visual` or `text`, no scalars.

    Naming, everywhere in clipjax: `log_logit_scale` is the stored log-parameter (open_clip's
    `logit_scale` param, big_vision's `t`); `logit_scale` is always the multiplier
    `exp(log_logit_scale)` that the losses take (open_clip's `logit_scale.exp()`).
    """

    def __init__(self, config: CLIPConfig, *, rngs: nnx.Rngs):
        pd = jnp.dtype(config.param_dtype)
        if config.has_image and config.vision.arch == "resnet":
            from clipjax.models.resnet import ModifiedResNet

            self.visual = ModifiedResNet(config.vision, config.embed_dim, param_dtype=pd, rngs=rngs)
        elif config.has_image:
            self.visual = VisionTransformer(config.vision, config.embed_dim, config.vision_proj, param_dtype=pd,
                                            rngs=rngs, attention=config.attention)
        if config.has_text:
            self.text = TextTransformer(config.text, config.embed_dim, config.text_proj, param_dtype=pd, rngs=rngs,
                                        attention=config.attention)
        if not config.has_tower("both"):  # one encoder: no logit scale or bias (none is made up)
            return
        self.log_logit_scale = nnx.Param(jnp.asarray(config.init_log_logit_scale, pd), out_sharding=(),
                                         eager_sharding=False)
        self.logit_bias = (nnx.Param(jnp.asarray(config.init_logit_bias, pd), out_sharding=(), eager_sharding=False)
                           if config.init_logit_bias is not None else None)


def _abstract_model(config: CLIPConfig) -> CLIP:
    """`CLIP(config)` with shape-only leaves, built outside any mesh context: under `jax.set_mesh`,
    NNX would read the logical axis names (`embed`, ...) as mesh axes and fail."""
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
        return nnx.eval_shape(lambda: CLIP(config, rngs=nnx.Rngs(0)))


@functools.lru_cache(maxsize=64)
def graphdef(config: CLIPConfig) -> nnx.GraphDef:
    """The static structure of `CLIP(config)` (computed abstractly, no params allocated)."""
    return nnx.split(_abstract_model(config))[0]


def abstract_params(config: CLIPConfig) -> nnx.State:
    """Shape/dtype structure of the model state (`jax.ShapeDtypeStruct` leaves), with their metadata.

    The state holds every `nnx.Param` and, for ResNet towers, the BatchNorm running statistics
    (`nnx.BatchStat`); `split_trainable` separates the two for training.
    """
    return nnx.split(_abstract_model(config))[1]


def init_params(config: CLIPConfig, seed: int = 0, mesh=None) -> nnx.State:
    """Randomly initialised model state; created directly sharded on `mesh` when given."""

    def init():
        return nnx.split(CLIP(config, rngs=nnx.Rngs(seed)))[1]

    if mesh is None:
        return jax.jit(init)()
    shardings = param_shardings(abstract_params(config), mesh)
    return jax.jit(init, out_shardings=shardings)()


def _merge(params, config) -> CLIP:
    return nnx.merge(graphdef(config), params)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """`x / max(||x||, eps)` over the last axis, in float32 (torch `F.normalize`)."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def _check_pixels(pixels, config: CLIPConfig):
    if pixels.ndim != 4 or pixels.shape[-1] != 3:
        raise ValueError(f"pixels must be NHWC [B, H, W, 3], got shape {tuple(pixels.shape)}")
    if not jnp.issubdtype(pixels.dtype, jnp.floating):
        raise TypeError(f"pixels must be preprocessed floats (see clipjax.preprocess), got dtype {pixels.dtype}")


def _check_ids(ids, config: CLIPConfig):
    if ids.ndim != 2:
        raise ValueError(f"token ids must be [B, L], got shape {tuple(ids.shape)}")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(f"token ids must be integers, got dtype {ids.dtype}")
    if ids.shape[1] > config.text.context_length:
        raise ValueError(f"token ids have length {ids.shape[1]} > context_length {config.text.context_length}")


def _image_features(model: CLIP, pixels, config: CLIPConfig, *, train: bool = False, patch_dropout: float = 0.0,
                    rng=None):
    config.require("image", "encode_image")
    _check_pixels(pixels, config)
    x = pixels.astype(config.dtype)
    if config.vision.arch == "resnet":
        if patch_dropout:
            raise ValueError("patch_dropout needs a ViT image tower")
        if train:
            return model.visual(x, dtype=jnp.dtype(config.dtype), train=True)
        return model.visual(x, dtype=jnp.dtype(config.dtype))
    return model.visual(x, scan=config.scan_layers, remat=config.remat, patch_dropout=patch_dropout, rng=rng)


def split_trainable(state: nnx.State) -> tuple[nnx.State, nnx.State]:
    """`(params, batch_stats)`: the trainable `nnx.Param`s and the BatchNorm statistics (empty for ViTs).

    `merge_state(params, batch_stats)` gives the full model state back.
    """
    return nnx.split_state(state, nnx.Param, nnx.BatchStat)


def merge_state(params: nnx.State, batch_stats: nnx.State) -> nnx.State:
    """Inverse of `split_trainable`."""
    return nnx.merge_state(params, batch_stats)


def forward(params: nnx.State, pixels: jax.Array, ids: jax.Array, *, config: CLIPConfig, train: bool = False,
            patch_dropout: float = 0.0, rng: jax.Array | None = None) -> dict:
    """Both towers in one pass, for a contrastive loss (call inside `jax.jit`).

    Args:
      params: the full model state (Params and, for ResNet towers, BatchNorm statistics).
      pixels: `[B, H, W, 3]` preprocessed float pixels.
      ids: `[B, L]` int token ids.
      train: ResNet BatchNorm uses batch statistics and updates its running averages.
      patch_dropout: FLIP image-token drop ratio in [0, 1) (ViT only); needs `rng`.

    Returns:
      `{"image": [B, E], "text": [B, E]}` L2-normalised float32 embeddings, `"logit_scale"`: the
      multiplier `exp(params.log_logit_scale)` (float32 scalar), `"logit_bias"`: SigLIP's bias or None,
      `"batch_stats"`: the BatchNorm statistics after the pass (updated in train mode; empty State
      for ViTs).

    Raises:
      ConfigError: a single-tower config (no pair, no logit scale).
    """
    config.require("both", "forward")
    _check_ids(ids, config)
    # a copy: train-mode BatchNorm writes its new statistics into the module, never into `params`
    model = nnx.merge(graphdef(config), params, copy=True)
    img = _image_features(model, pixels, config, train=train, patch_dropout=patch_dropout, rng=rng)
    txt = model.text(ids, dtype=jnp.dtype(config.dtype), scan=config.scan_layers, remat=config.remat)
    bias = model.logit_bias[...].astype(jnp.float32) if model.logit_bias is not None else None
    return {"image": l2_normalize(img), "text": l2_normalize(txt),
            "logit_scale": jnp.exp(model.log_logit_scale[...].astype(jnp.float32)), "logit_bias": bias,
            "batch_stats": nnx.state(model, nnx.BatchStat)}


@functools.partial(jax.jit, static_argnames=("config", "normalize"))
def encode_image(params: nnx.State, pixels: jax.Array, *, config: CLIPConfig, normalize: bool = True) -> jax.Array:
    """Image embeddings `[B, E]` float32 from preprocessed pixels `[B, H, W, 3]`."""
    x = _image_features(_merge(params, config), pixels, config)
    return l2_normalize(x) if normalize else x.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("config", "normalize"))
def encode_text(params: nnx.State, ids: jax.Array, *, config: CLIPConfig, normalize: bool = True) -> jax.Array:
    """Text embeddings `[B, E]` float32 from token ids `[B, L]`."""
    config.require("text", "encode_text")
    _check_ids(ids, config)
    model = _merge(params, config)
    x = model.text(ids, dtype=jnp.dtype(config.dtype), scan=config.scan_layers, remat=config.remat)
    return l2_normalize(x) if normalize else x.astype(jnp.float32)


def logits_from_embeddings(params: nnx.State, image_emb: jax.Array, text_emb: jax.Array) -> jax.Array:
    """`exp(log_logit_scale) * img @ txt.T (+ logit_bias)`, `[B_img, B_txt]` from normalised embeddings.

    Raises:
      ConfigError: `params` has no `log_logit_scale` (a single-tower model's).
    """
    if "log_logit_scale" not in params:
        raise ConfigError("logits need a two-tower model's log_logit_scale; these params have none (a single-tower "
                          "model: no logit scale was converted, and none is made up)")
    out = jnp.exp(params["log_logit_scale"][...].astype(jnp.float32)) * image_emb @ text_emb.T
    if "logit_bias" in params:
        out = out + params["logit_bias"][...].astype(jnp.float32)
    return out


@functools.partial(jax.jit, static_argnames=("config",))
def logits(params: nnx.State, pixels: jax.Array, ids: jax.Array, *, config: CLIPConfig) -> jax.Array:
    """Image-text logits `[B_img, B_txt]`: CLIP's scaled cosine, plus SigLIP's bias when present."""
    config.require("both", "logits")
    img = encode_image(params, pixels, config=config)
    txt = encode_text(params, ids, config=config)
    return logits_from_embeddings(params, img, txt)


@functools.partial(jax.jit, static_argnames=("config", "normalize"))
def encode_dense(params: nnx.State, pixels: jax.Array, *, config: CLIPConfig, normalize: bool = True) -> jax.Array:
    """MaskCLIP dense patch embeddings `[B, P, E]` (methods.md §19), P = grid * grid."""
    config.require("image", "encode_dense")
    _check_pixels(pixels, config)
    model = _merge(params, config)
    x = pixels.astype(config.dtype)
    if config.vision.arch == "resnet":
        out = model.visual.dense(x, dtype=jnp.dtype(config.dtype))
    else:
        out = model.visual.dense(x, scan=config.scan_layers)
    return l2_normalize(out) if normalize else out.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("config", "tower"))
def hidden_states(params: nnx.State, inputs: jax.Array, *, config: CLIPConfig, tower: str = "image") -> jax.Array:
    """Every block's output `[L, B, T, D]` of the ViT image tower (`tower="image"`) or the text tower."""
    if tower not in ("image", "text"):
        raise ValueError(f"tower={tower!r}: expected 'image' or 'text'")
    config.require(tower, "hidden_states")
    model = _merge(params, config)
    if tower == "text":
        _check_ids(inputs, config)
        return model.text.hidden_states(inputs, dtype=jnp.dtype(config.dtype), scan=config.scan_layers)
    _check_pixels(inputs, config)
    if config.vision.arch != "vit":
        raise ValueError("hidden_states of the image tower needs a ViT")
    return model.visual.hidden_states(inputs.astype(config.dtype), scan=config.scan_layers)
