"""Image-text retrieval Recall@K, blocked so the full similarity matrix never exists.

Follows CLIP_benchmark (`clip_benchmark/metrics/zeroshot_retrieval.py`): with
S = T_hat I_hat^T, a query scores 1 at K when at least one of its positives is
among its K most similar gallery items, averaged over queries.

- `image_retrieval_recall@K`: text -> image (one positive image per caption);
- `text_retrieval_recall@K`: image -> text (every caption of that image is a positive;
  an image without captions counts as a miss, as in CLIP_benchmark).

The top-K search runs over query blocks (`lax.map`) and, inside each, a scan over
gallery blocks that keeps a running top-K; memory is O(query_block x
gallery_block). Query blocks are strided (block j holds queries j, j + n_blocks,
...) so a query axis sharded over devices stays sharded inside every block.
Ties: equal scores rank the lower gallery index first, as in a stable sort
(`jax.lax.top_k` semantics).
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp

from clipjax import checks
from clipjax.sharding import constrain


def topk_retrieval(queries, gallery, k: int, *, query_block: int = 1024, gallery_block: int = 4096,
                   validate: bool = True) -> tuple[jax.Array, jax.Array]:
    """The k most similar gallery items (by dot product) for every query, blocked.

    Args:
      queries: `[Nq, D]` embeddings.
      gallery: `[Ng, D]` embeddings.
      k: number of neighbours, 1 <= k <= Ng.
      query_block: queries per `lax.map` step.
      gallery_block: gallery items per scan step.
      validate: check NaN/inf when concrete.

    Returns:
      `(scores [Nq, k], indices [Nq, k] int32)`, best first; ties rank the lower index first.
    """
    q = checks.array("queries", queries, "[Nq, D]")
    g = checks.array("gallery", gallery, "[Ng, D]")
    checks.same_dim(queries=q, gallery=g)
    k = checks.positive_int("k", k)
    if k > g.shape[0]:
        raise ValueError(f"k={k} is larger than the gallery ({g.shape[0]} items)")
    checks.finite("queries", q, validate=validate)
    checks.finite("gallery", g, validate=validate)
    bq = min(checks.positive_int("query_block", query_block), q.shape[0])
    bg = min(checks.positive_int("gallery_block", gallery_block), g.shape[0])
    return _blocked_topk(q, g, k, bq, bg)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _blocked_topk(q, g, k, bq, bg):
    n_q, d = q.shape
    n_g = g.shape[0]
    nbq, nbg = math.ceil(n_q / bq), math.ceil(n_g / bg)
    dtype = jnp.promote_types(q.dtype, g.dtype)
    qp = jnp.pad(q.astype(dtype), ((0, nbq * bq - n_q), (0, 0)))
    gp = jnp.pad(g.astype(dtype), ((0, nbg * bg - n_g), (0, 0)))
    q_blocks = qp.reshape(bq, nbq, d).transpose(1, 0, 2)  # strided: block j = rows j, j+nbq, ...
    g_blocks = gp.reshape(nbg, bg, d)
    cols = jnp.arange(nbg * bg, dtype=jnp.int32).reshape(nbg, bg)

    def one_query_block(qb):
        qb = constrain(qb, ("batch", None))

        def step(carry, block):
            vals, idx = carry
            gb, col = block
            s = qb @ gb.T  # [bq, bg]
            s = jnp.where(col[None, :] < n_g, s, -jnp.inf)
            all_v = jnp.concatenate([vals, s], axis=1)
            all_i = jnp.concatenate([idx, jnp.broadcast_to(col, s.shape)], axis=1)
            top_v, pos = jax.lax.top_k(all_v, k)
            return (top_v, jnp.take_along_axis(all_i, pos, axis=1)), None

        init = (jnp.full((bq, k), -jnp.inf, dtype), jnp.full((bq, k), -1, jnp.int32))
        (vals, idx), _ = jax.lax.scan(step, init, (g_blocks, cols))
        return vals, idx

    vals, idx = jax.lax.map(one_query_block, q_blocks)  # [nbq, bq, k]
    vals = vals.transpose(1, 0, 2).reshape(nbq * bq, k)[:n_q]
    idx = idx.transpose(1, 0, 2).reshape(nbq * bq, k)[:n_q]
    return vals, idx


def recall_at_k(text_embeddings, image_embeddings, text_to_image, ks: Sequence[int] = (1, 5, 10), *,
                normalize: bool = False, query_block: int = 1024, gallery_block: int = 4096,
                validate: bool = True) -> dict[str, jax.Array]:
    """Text->image and image->text Recall@K with several captions per image.

    Args:
      text_embeddings: `[Nt, D]` caption embeddings, L2-normalised unless `normalize=True`.
      image_embeddings: `[Ni, D]` image embeddings, L2-normalised unless `normalize=True`.
      text_to_image: `[Nt]` int, the index in `image_embeddings` of each caption's image.
      ks: the K values; each must be <= Ni and <= Nt.
      normalize: L2-normalise both inputs first.
      query_block, gallery_block: block sizes of the top-K search (memory ~ their product).
      validate: check NaN/inf, unit norms (all-zero rows with `normalize=True`) and index range when
        concrete.

    Returns:
      dict with CLIP_benchmark's keys `image_retrieval_recall@K` (text->image) and
      `text_retrieval_recall@K` (image->text), float32 scalars in [0, 1].
    """
    t = checks.array("text_embeddings", text_embeddings, "[Nt, D]")
    im = checks.array("image_embeddings", image_embeddings, "[Ni, D]")
    checks.same_dim(text_embeddings=t, image_embeddings=im)
    t2i = checks.array("text_to_image", text_to_image, "[Nt]", dtype="integer")
    checks.same_len(text_embeddings=t, text_to_image=t2i)
    ks = tuple(checks.positive_int("k", k) for k in ks)
    if not ks:
        raise ValueError("ks is empty")
    if max(ks) > im.shape[0]:
        raise ValueError(f"K={max(ks)} is larger than the image gallery ({im.shape[0]} images)")
    if max(ks) > t.shape[0]:
        raise ValueError(f"K={max(ks)} is larger than the caption gallery ({t.shape[0]} captions)")
    for name, x in (("text_embeddings", t), ("image_embeddings", im)):
        checks.values(name, x, unit_norm=not normalize, nonzero=normalize, validate=validate,
                      hint=" or pass normalize=True")
    checks.index_range("text_to_image", t2i, im.shape[0], validate=validate)
    if normalize:
        t, im = checks.l2_normalize(t), checks.l2_normalize(im)
    bq = checks.positive_int("query_block", query_block)
    bg = checks.positive_int("gallery_block", gallery_block)
    kmax = max(ks)
    _, img_idx = _blocked_topk(t, im, kmax, min(bq, t.shape[0]), min(bg, im.shape[0]))
    _, txt_idx = _blocked_topk(im, t, kmax, min(bq, im.shape[0]), min(bg, t.shape[0]))
    hit_t2i = img_idx == t2i[:, None]  # [Nt, kmax]
    hit_i2t = t2i[txt_idx] == jnp.arange(im.shape[0], dtype=t2i.dtype)[:, None]  # [Ni, kmax]
    out = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = jnp.mean(jnp.any(hit_t2i[:, :k], axis=1).astype(jnp.float32))
        out[f"text_retrieval_recall@{k}"] = jnp.mean(jnp.any(hit_i2t[:, :k], axis=1).astype(jnp.float32))
    return out
