"""TextSpan's direct-effect decomposition of a ViT image embedding, and mean / zero ablations of it.

Gandelsman, Efros, Steinhardt, "Interpreting CLIP's Image Representation via Text-Based Decomposition"
(ICLR 2024); reference `yossigandelsman/clip_text_span`: `prs_hook.py:PRSLogger` (the decomposition),
`compute_prs.py` (token sums), `compute_ablations.py` (ablations).

For a class-token ViT the final class-token residual is a sum of direct contributions,

    r = z0 + sum_l m_l + sum_{l, h, n} c_{l,h,n},
    c_{l,h,n} = A^{l,h}[CLS, n] (ln1(x_n) W_V^h + b_V^h) W_O^h + b_O / (N H),

z0 the `ln_pre` output at the class token, m_l the MLP output at the class token, A the attention
probabilities, N tokens, H heads; the out bias b_O is split evenly over the N H terms (`PRSLogger.
compute_attentions`). LayerScale (which `PRSLogger` does not support) multiplies m_l and c_{l,h,n} by
the block's gammas, so the sum stays exact. `ln_post` is distributed over the K = 2L + 1 layer-level
slots (z0, L MLPs, L attention layers), an attention slot shared evenly by its H heads (x N tokens):

    component(c) = [gamma * (c - share * mu) / sigma + share * beta] @ proj / ||embedding||,

share = 1/K for z0, the MLPs and whole attention layers, 1/(K H) per head, 1/(K N H) per head and
token; mu and sigma = sqrt(var + eps) are the statistics of r, `embedding` the unnormalised image
embedding. The components sum exactly to the normalised embedding at every level, and a head's
component at level `"head"` is the sum over tokens of its `"head_token"` components.

Ablations replace chosen components' direct effects by their mean over a set of images (or by zero),
and sum again. The result is not renormalised (`compute_ablations.py` scores the sums as they are).
Only ViTs with a class token read at the output (`vision.pool="tok"`) decompose this way.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from clipjax.config import CLIPConfig
from clipjax.interpret.explicit import image_forward, pure, tower_blocks
from clipjax.interpret.heads import head_mask, parse_heads

__all__ = ["LEVELS", "check_decomposable", "component_sum", "decompose_image", "mean_ablate", "mean_ablation_sweep",
           "zero_ablate"]

LEVELS = ("layer", "head", "head_token")
_POOLS = {"attn": "CoCa's attentional pooler", "map": "SigLIP's attention-pool (MAP) head",
          "avg": "average pooling of the patch tokens", "gap": "global average pooling (no class token)"}


def check_decomposable(config: CLIPConfig) -> None:
    """`ValueError` unless the image tower is a ViT read at its class token (`pool="tok"`)."""
    vision = config.vision
    if vision.arch != "vit":
        raise ValueError("the TextSpan decomposition needs a class-token ViT (vision.pool='tok'); got a ResNet "
                         f"image tower (vision.arch={vision.arch!r}) with an attention pool")
    if vision.pool != "tok":
        raise ValueError("the TextSpan decomposition needs a class-token ViT (vision.pool='tok'); got "
                         f"vision.pool={vision.pool!r}, {_POOLS.get(vision.pool, 'another pooling')}")


@functools.partial(jax.jit, static_argnames=("config", "level", "dtype"))
def decompose_image(params: Any, pixels: jax.Array, *, config: CLIPConfig, level: str = "layer",
                    dtype: str | None = None) -> dict:
    """Direct effects of every layer / head / head and token on the normalised image embedding.

    Args:
      params: the model state.
      pixels: `[B, S, S, 3]` preprocessed NHWC pixels.
      config: the model config (static); `vision.pool` must be `"tok"`.
      level: `"layer"`, `"head"` or `"head_token"` (static): the granularity of the attention components.
      dtype: compute dtype (default `config.dtype`); `"float64"` inside `jax.enable_x64(True)`.

    Returns:
      A dict of arrays, E the embedding size (the ViT width without a projection):
      - `"embed"` `[B, E]`: z0's component (`PRSLogger`'s `mlps[:, 0]`);
      - `"mlp"` `[B, L, E]`: the MLPs' components;
      - `"attn"`: `[B, L, E]` (layer), `[B, L, H, E]` (head; `compute_prs.py` sums the tokens) or
        `[B, L, N, H, E]` (head_token, `PRSLogger`'s layout, N tokens with the class token first);
      - `"embedding"` `[B, E]`: the normalised embedding, = embed + sum(mlp) + sum(attn);
      - `"norm"` `[B]`: ||unnormalised embedding||; `"mean"`, `"std"` `[B]`: mu and sigma of r.
      head_token costs B L N H E numbers (ViT-B/16: 14.5 M per image, 58 MB in float32).
    """
    check_decomposable(config)
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    cfg = config.vision
    raw, rec = image_forward(params, pixels, config=config, dtype=dtype)
    vis, blocks = pure(params["visual"]), tower_blocks(params, "image")
    dt = rec["tokens"].dtype
    n_layers, n_heads, n_tokens = cfg.layers, cfg.heads, rec["tokens"].shape[1]
    ls1 = blocks["ls1"].astype(dt) if "ls1" in blocks else jnp.ones((n_layers, cfg.width), dt)
    w_out = blocks["attn"]["out_kernel"].astype(dt)  # [L, H, Dh, D]
    b_out = blocks["attn"]["out_bias"].astype(dt)  # [L, D]

    if level == "layer":  # the attention branch at the class token, bias and LayerScale included
        attn = rec["attn_branch"][:, :, 0].swapaxes(0, 1)
    elif level == "head":
        attn = jnp.einsum("lbhk,lhkd->blhd", rec["head_outputs"][:, :, 0], w_out)
        attn = (attn + b_out[None, :, None] / n_heads) * ls1[None, :, None]
    else:
        cls_attention = rec["attention"][:, :, :, 0].astype(dt)  # [L, B, H, N]: the class token's row
        attn = jnp.einsum("lbhn,lbnhk,lhkd->blnhd", cls_attention, rec["values"], w_out)
        attn = (attn + b_out[None, :, None, None] / (n_tokens * n_heads)) * ls1[None, :, None, None]

    wide = jnp.promote_types(dt, jnp.float32)
    r = rec["tokens"][:, 0].astype(wide)
    mu = r.mean(-1)
    sigma = jnp.sqrt(jnp.square(r - mu[:, None]).mean(-1) + cfg.ln_eps)
    raw = raw.astype(wide)
    norm = jnp.linalg.norm(raw, axis=-1)
    gamma, beta = vis["ln_post"]["scale"].astype(wide), vis["ln_post"]["bias"].astype(wide)
    proj = vis["proj"].astype(wide) if "proj" in vis else None
    k = 2 * n_layers + 1

    def distribute(c, share):
        extra = (1,) * (c.ndim - 2)
        m, s, nrm = (v.reshape(v.shape + extra + (1,)) for v in (mu, sigma, norm))
        y = gamma * (c.astype(wide) - share * m) / s + share * beta
        return (y if proj is None else y @ proj) / nrm

    attn_share = {"layer": 1.0, "head": 1.0 / n_heads, "head_token": 1.0 / (n_heads * n_tokens)}[level] / k
    return {"embed": distribute(rec["inputs"][0][:, 0], 1.0 / k),
            "mlp": distribute(rec["mlp_branch"][:, :, 0].swapaxes(0, 1), 1.0 / k),
            "attn": distribute(attn, attn_share),
            "embedding": raw / norm[:, None], "norm": norm, "mean": mu, "std": sigma}


# ----------------------------------------------------------------------------- ablations
def _level(parts: Mapping) -> str:
    for key in ("embed", "mlp", "attn"):
        if key not in parts:
            raise ValueError(f"parts must be a decompose_image result with 'embed', 'mlp' and 'attn'; missing {key!r}")
    ndim = jnp.ndim(parts["attn"])
    if ndim not in (3, 4, 5) or jnp.ndim(parts["mlp"]) != 3 or jnp.ndim(parts["embed"]) != 2:
        raise ValueError("parts['attn'] must be [B, L, E], [B, L, H, E] or [B, L, N, H, E] with mlp [B, L, E] and "
                         f"embed [B, E]; got shapes {jnp.shape(parts['attn'])}, {jnp.shape(parts['mlp'])}, "
                         f"{jnp.shape(parts['embed'])}")
    return LEVELS[ndim - 3]


def _layer_list(name: str, layers: Iterable[int], n_layers: int) -> np.ndarray:
    mask = np.zeros(n_layers, bool)
    for layer in layers:
        if isinstance(layer, (bool, np.bool_)) or not isinstance(layer, (int, np.integer)):
            raise ValueError(f"{name} must hold layer indices (ints), got {layer!r}")
        if not 0 <= layer < n_layers:
            raise ValueError(f"{name}: layer {layer} outside [0, {n_layers})")
        mask[layer] = True
    return mask


def component_sum(parts: Mapping) -> jax.Array:
    """embed + sum of the MLP and attention components: `[B, E]` (the normalised embedding when nothing is ablated)."""
    _level(parts)
    attn = parts["attn"]
    return parts["embed"] + parts["mlp"].sum(1) + attn.reshape(attn.shape[:2] + (-1, attn.shape[-1])).sum((1, 2))


def _ablate(parts: Mapping, replacement: Mapping, layers, heads, mlps, embed: bool) -> jax.Array:
    level = _level(parts)
    attn = parts["attn"]
    n_layers = attn.shape[1]
    attn_mask = _layer_list("layers", layers, n_layers)
    heads = list(heads)
    if level == "layer":
        if heads:
            raise ValueError("heads needs a decomposition at level 'head' or 'head_token', got level 'layer'")
        sel = attn_mask[None, :, None]
    else:
        n_heads = attn.shape[-2]
        chosen = head_mask(parse_heads(heads, layers=n_layers, num_heads=n_heads), n_layers, n_heads)
        sel = (chosen | attn_mask[:, None])[None, :, None, :, None] if level == "head_token" else \
            (chosen | attn_mask[:, None])[None, :, :, None]
    mlp_sel = _layer_list("mlps", mlps, n_layers)[None, :, None]
    new = {"embed": jnp.where(embed, replacement["embed"], parts["embed"]),
           "mlp": jnp.where(mlp_sel, replacement["mlp"], parts["mlp"]),
           "attn": jnp.where(sel, replacement["attn"], attn)}
    return component_sum(new)


def mean_ablate(parts: Mapping, *, layers: Iterable[int] = (), heads: Iterable[Any] = (), mlps: Iterable[int] = (),
                embed: bool = False, reference: Mapping | None = None) -> jax.Array:
    """Replace chosen components by their mean over `reference`'s images and sum: `[B, E]`.

    Args:
      parts: a `decompose_image` result (any level) for B images.
      layers: attention layers ablated whole (all heads and tokens).
      heads: `(layer, head)` pairs or `"L11.H5"` names ablated (levels `"head"` / `"head_token"`; at
        head_token each (layer, head, token) component gets its own mean).
      mlps: MLP layers ablated.
      embed: ablate z0's component too.
      reference: the decomposition (same model and level) whose batch mean replaces the components;
        default `parts` itself (the reference code's mean over the evaluated set).

    Returns:
      `[B, E]` the sum of the components with the chosen ones mean-ablated (not renormalised).
    """
    ref = parts if reference is None else reference
    if _level(ref) != _level(parts) or jnp.shape(ref["attn"])[1:] != jnp.shape(parts["attn"])[1:]:
        raise ValueError(f"reference must be a decomposition of the same level and shape as parts: attn "
                         f"{jnp.shape(ref['attn'])} vs {jnp.shape(parts['attn'])}")
    means = {key: jnp.mean(ref[key], axis=0, keepdims=True) for key in ("embed", "mlp", "attn")}
    return _ablate(parts, means, layers, heads, mlps, embed)


def zero_ablate(parts: Mapping, *, layers: Iterable[int] = (), heads: Iterable[Any] = (), mlps: Iterable[int] = (),
                embed: bool = False) -> jax.Array:
    """Remove chosen components (their direct effect set to zero) and sum: `[B, E]` (see `mean_ablate`)."""
    _level(parts)
    zeros = {key: jnp.zeros((), parts[key].dtype) for key in ("embed", "mlp", "attn")}
    return _ablate(parts, zeros, layers, heads, mlps, embed)


def mean_ablation_sweep(parts: Mapping, *, reference: Mapping | None = None) -> jax.Array:
    """`compute_ablations.py`'s cumulative attention sweep: `[L + 1, B, E]`.

    Entry 0 is the plain sum (the normalised embedding); entry k has the attention layers 0 .. k-1
    (whole layers) replaced by their mean over `reference` (default `parts`), the MLPs and z0 kept.
    """
    _level(parts)
    ref = parts if reference is None else reference
    attn = parts["attn"]

    def per_layer(a):
        return a.reshape(a.shape[:2] + (-1, a.shape[-1])).sum(2)  # [B, L, E]

    layer_attn, layer_mean = per_layer(attn), per_layer(ref["attn"]).mean(0)
    n_layers = attn.shape[1]
    ablated = jnp.asarray(np.arange(n_layers)[None, :] < np.arange(n_layers + 1)[:, None])  # [L + 1, L]
    rest = parts["embed"] + parts["mlp"].sum(1)
    kept = jnp.einsum("kl,ble->kbe", (~ablated).astype(attn.dtype), layer_attn)
    means = jnp.einsum("kl,le->ke", ablated.astype(attn.dtype), layer_mean)
    return rest[None] + kept + means[:, None]
