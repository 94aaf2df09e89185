"""TextSpan: a text basis for each attention head's output space (Gandelsman et al., ICLR 2024).

Reference: `yossigandelsman/clip_text_span:compute_complete_text_set.py:replace_with_iterative_removal`.
For one head, C `[n, d]` holds its direct effects on n images (summed over tokens) and T `[m, d]` the
candidate texts' embeddings (the repo's 3,498 `image_descriptions_general` lines, normalised):

1. take the top `rank` right singular vectors V `[rank, d]` of C (uncentred) and project the texts onto
   their span, T <- T V^T (V V^T)^-1 V;
2. centre C (the reconstruction starts from the mean row);
3. repeat `num_texts` times: j* = argmax_j std_i (C T^T)_{ij} (unbiased std over the images); record j*;
   project t_{j*} out of C and out of every text (the projected part of C goes to the reconstruction).

`textspan_heads` runs it for every head of the last `layers` layers (the code's default 8) on the
head-level decomposition of a batch (`clipjax.interpret.decompose`), and, as the script does, scores
the images by the embedding with the earlier layers' heads mean-ablated and the last layers' heads
replaced by their reconstructions.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from clipjax import checks
from clipjax.config import CLIPConfig
from clipjax.interpret.decompose import decompose_image

__all__ = ["TextSpanResult", "textspan", "textspan_heads", "textspan_parts"]


class TextSpanResult(NamedTuple):
    """`indices` `[num_texts]` int32: the chosen texts in order; `reconstruction` `[n, d]`: mean row plus the
    projections on the chosen texts (the reference's `reconstruct`); `residual` `[n, d]`: the centred data
    after the last removal (= data - reconstruction); `variance_explained` `[num_texts]`: after each text, the
    fraction of the centred data's total variance (squared Frobenius norm) removed so far, in [0, 1]."""

    indices: jax.Array
    reconstruction: jax.Array
    residual: jax.Array
    variance_explained: jax.Array


@functools.partial(jax.jit, static_argnames=("num_texts", "rank"))
def _textspan(data, texts, num_texts: int, rank: int) -> TextSpanResult:
    _, _, vh = jnp.linalg.svd(data, full_matrices=False)
    vh = vh[:rank]
    texts = (vh.T @ jnp.linalg.solve(vh @ vh.T, vh) @ texts.T).T  # onto the span of the head's top directions
    mean = data.mean(axis=0, keepdims=True)
    data = data - mean
    total = jnp.sum(jnp.square(data))

    def step(carry, _):
        data, texts, recon = carry
        spread = jnp.std(data @ texts.T, axis=0, ddof=1)
        j = jnp.argmax(spread)
        t = texts[j]
        t_norm = t @ t
        t_norm = jnp.where(t_norm > 0, t_norm, 1.0)  # a removed (zero) text chosen again removes nothing
        coef = data @ t / t_norm
        recon = recon + coef[:, None] * t[None]
        data = data - coef[:, None] * t[None]
        texts = texts - (texts @ t / t_norm)[:, None] * t[None]
        return (data, texts, recon), (j.astype(jnp.int32), jnp.sum(jnp.square(data)))

    recon = jnp.broadcast_to(mean, data.shape)
    (data, _, recon), (idx, left) = jax.lax.scan(step, (data, texts, recon), None, length=num_texts)
    explained = jnp.where(total > 0, 1.0 - left / jnp.where(total > 0, total, 1.0), 0.0)
    return TextSpanResult(idx, recon, data, explained)


def textspan(head_effects: Any, text_embeddings: Any, *, num_texts: int = 10, rank: int = 80) -> TextSpanResult:
    """Greedy text basis of one head (`replace_with_iterative_removal`).

    Args:
      head_effects: `[n, d]` the head's direct effects on n >= 2 images (summed over tokens), e.g.
        `decompose_image(..., level="head")["attn"][:, layer, head]`.
      text_embeddings: `[m, d]` candidate text embeddings (normalised, as the reference's).
      num_texts: texts to choose (the code's `--texts_per_head`, default 10).
      rank: right singular vectors of the effects that span the text projection (`--w_ov_rank`, 80);
        at most min(n, d) exist. Once `num_texts` reaches the span's dimension every projected text is
        ~0 and further choices are rounding noise (as in the reference); a text that is exactly zero
        removes nothing instead of dividing by zero.

    Returns:
      `TextSpanResult` (indices into `text_embeddings`). Computed in float32 or the inputs' wider dtype.
    """
    c = checks.array("head_effects", head_effects, "[N, D]", min_rows=2)
    t = checks.array("text_embeddings", text_embeddings, "[M, D]")
    checks.same_dim(head_effects=c, text_embeddings=t)
    checks.positive_int("num_texts", num_texts)
    checks.positive_int("rank", rank)
    checks.finite("head_effects", c)
    checks.finite("text_embeddings", t)
    dtype = jnp.promote_types(jnp.result_type(c.dtype, t.dtype), jnp.float32)
    return _textspan(c.astype(dtype), t.astype(dtype), num_texts, rank)


def textspan_parts(parts: Mapping, text_embeddings: Any, *, layers: int = 8, num_texts: int = 10,
                   rank: int = 80) -> dict:
    """`textspan` for every head of the last `layers` layers of a head-level decomposition.

    Args:
      parts: `decompose_image(..., level="head")` of B >= 2 images (`attn` `[B, L, H, E]`).
      text_embeddings: `[m, E]` candidate text embeddings.
      layers: how many last layers (the code's `--num_of_last_layers`, 8); at most L.

    Returns:
      - `"layers"` `[layers]`: the absolute layer indices, L - layers .. L - 1;
      - `"indices"` `[layers, H, num_texts]` int32 chosen texts; `"variance_explained"` `[layers, H, num_texts]`;
      - `"reconstruction"` `[B, layers, H, E]`: each head's effects rebuilt from its texts;
      - `"replaced"` `[B, E]`: z0 + MLPs + earlier layers' heads mean-ablated (over the B images) + the
        reconstructions (the script's `mean_ablated_and_replaced`, not renormalised).
    """
    attn = parts["attn"]
    if jnp.ndim(attn) != 4:
        raise ValueError(f"parts must be a decompose_image result at level 'head' (attn [B, L, H, E]), "
                         f"got attn of shape {jnp.shape(attn)}")
    b, n_layers, n_heads, e = attn.shape
    checks.positive_int("layers", layers)
    if layers > n_layers:
        raise ValueError(f"layers={layers} is more than the model's {n_layers} layers")
    first = n_layers - layers
    effects = attn[:, first:].transpose(1, 2, 0, 3).reshape(layers * n_heads, b, e)
    texts = checks.array("text_embeddings", text_embeddings, "[M, E]", sizes={"E": e})
    res = jax.vmap(lambda c: textspan(c, texts, num_texts=num_texts, rank=rank))(effects)
    recon = res.reconstruction.reshape(layers, n_heads, b, e).transpose(2, 0, 1, 3)
    early = jnp.mean(attn[:, :first], axis=0).sum((0, 1))
    replaced = parts["embed"] + parts["mlp"].sum(1) + early + recon.sum((1, 2)).astype(attn.dtype)
    return {"layers": jnp.arange(first, n_layers), "indices": res.indices.reshape(layers, n_heads, num_texts),
            "variance_explained": res.variance_explained.reshape(layers, n_heads, num_texts),
            "reconstruction": recon, "replaced": replaced}


def textspan_heads(params: Any, pixels: jax.Array, text_embeddings: Any, *, config: CLIPConfig, layers: int = 8,
                   num_texts: int = 10, rank: int = 80, dtype: str | None = None) -> dict:
    """Decompose a batch of images at head level (`decompose_image`) and run `textspan_parts` on it.

    Args:
      params, pixels `[B, S, S, 3]`, config, dtype: as `decompose_image` (B >= 2 images).
      text_embeddings: `[m, E]` candidate text embeddings (e.g. `encode_text` of the description lines).
      layers, num_texts, rank: as `textspan_parts` / `textspan`.

    Returns:
      `textspan_parts`' dict.
    """
    parts = decompose_image(params, pixels, config=config, level="head", dtype=dtype)
    return textspan_parts(parts, text_embeddings, layers=layers, num_texts=num_texts, rank=rank)
