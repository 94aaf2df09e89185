"""CLIPScore, RefCLIPScore (Hessel et al. 2021), torchmetrics' CLIPScore, and CLIP-I.

- Hessel CLIP-S (`jmhessel/clipscore:clipscore.py:get_clip_score`): per instance
  w * max(cos(image, caption), 0) with w = 2.5; captions are encoded with the
  prefix "A photo depicts " (`clipscore_prompts`). The corpus score is the mean.
- RefCLIP-S (same file, `get_refonlyclipscore` + `main`): per instance the harmonic
  mean 2ab / (a + b) of a = CLIP-S and b = max_r cos(caption, reference_r). As in the
  code (not the paper) b is not clipped at 0 unless `clip_reference=True`, and an
  instance with a + b = 0 gives NaN.
- torchmetrics `CLIPScore`: 100 * cos per pair, no prefix; the returned score is
  max(mean, 0) (the mean is clamped, not each pair). Also used there for image-image.
- CLIP-I (DreamBooth): mean over all (generated, real) pairs of cos(g, r), computed
  as mean(g_hat) . mean(r_hat) in O(n + m).

Inputs are raw or normalised embeddings; every function here L2-normalises them
first, as the references do. So with `validate=True` an all-zero row is an error
naming the argument and row; with `validate=False` it normalises to a zero vector
(cosine 0), following `clipjax.checks`.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from clipjax import checks

HESSEL_W = 2.5
HESSEL_PREFIX = "A photo depicts "
TORCHMETRICS_SCALE = 100.0


def clipscore_prompts(captions: Sequence[str], prefix: str = HESSEL_PREFIX) -> list[str]:
    """Captions with Hessel's prompt prefix (a space is added to the prefix if missing)."""
    if isinstance(captions, str):
        raise TypeError("captions must be a list of strings, got a single string")
    if prefix and not prefix.endswith(" "):
        prefix = prefix + " "
    return [prefix + c for c in captions]


def _pair(name_a, a, name_b, b, validate):
    a = checks.array(name_a, a, "[N, D]")
    b = checks.array(name_b, b, "[N, D]")
    checks.same_dim(**{name_a: a, name_b: b})
    checks.same_len(**{name_a: a, name_b: b})
    checks.nonzero_rows(name_a, a, validate=validate)
    checks.nonzero_rows(name_b, b, validate=validate)
    return a, b


def _cos(a, b):
    return jnp.sum(checks.l2_normalize(a) * checks.l2_normalize(b), axis=-1)


def clip_score(image_embeddings, caption_embeddings, *, w: float = HESSEL_W, validate: bool = True) -> jax.Array:
    """Hessel's per-instance CLIP-S = w * max(cos(image, caption), 0).

    Args:
      image_embeddings: `[N, D]` image embeddings.
      caption_embeddings: `[N, D]` embeddings of the prefixed captions (see `clipscore_prompts`).
      w: rescaling weight (2.5 in the paper).
      validate: check NaN/inf and zero rows when concrete.

    Returns:
      `[N]` scores; the corpus CLIP-S is their mean.
    """
    img, cap = _pair("image_embeddings", image_embeddings, "caption_embeddings", caption_embeddings, validate)
    return w * jnp.maximum(_cos(img, cap), 0.0)


def ref_clip_score(image_embeddings, caption_embeddings, reference_embeddings, reference_mask=None, *,
                   w: float = HESSEL_W, clip_reference: bool = False, validate: bool = True) -> jax.Array:
    """Hessel's per-instance RefCLIP-S: harmonic mean of CLIP-S and the best reference cosine.

    Args:
      image_embeddings: `[N, D]`.
      caption_embeddings: `[N, D]` candidate captions (prefixed, as for `clip_score`).
      reference_embeddings: `[N, R, D]` reference captions (prefixed), padded to R.
      reference_mask: optional `[N, R]` bool, True for real references; every row needs one.
      w: CLIP-S weight.
      clip_reference: clip the reference term at 0 as the paper writes it (the code does not).
      validate: check NaN/inf, zero rows and the mask when concrete.

    Returns:
      `[N]` scores 2ab / (a + b) with a = CLIP-S, b = max_r cos(caption, ref_r); NaN where
      a + b = 0, as in the reference code. The corpus RefCLIP-S is their mean.
    """
    img, cap = _pair("image_embeddings", image_embeddings, "caption_embeddings", caption_embeddings, validate)
    refs = checks.array("reference_embeddings", reference_embeddings, "[N, R, D]",
                        sizes={"N": cap.shape[0], "D": cap.shape[1]})
    mask = jnp.ones(refs.shape[:2], bool) if reference_mask is None else jnp.asarray(reference_mask)
    if mask.shape != refs.shape[:2] or mask.dtype != jnp.bool_:
        raise ValueError(f"reference_mask must be a bool array of shape [N, R] = {refs.shape[:2]}, "
                         f"got {mask.dtype}{tuple(mask.shape)}")
    if validate and checks.is_concrete(refs, mask):
        if not bool(jnp.all(jnp.any(mask, axis=1))):
            raise ValueError("every candidate needs at least one reference (a reference_mask row is all False)")
        checks.nonzero_rows("reference_embeddings", jnp.where(mask[..., None], refs, 1.0))
    a = w * jnp.maximum(_cos(img, cap), 0.0)
    sims = jnp.einsum("nd,nrd->nr", checks.l2_normalize(cap), checks.l2_normalize(refs))
    b = jnp.max(jnp.where(mask, sims, -jnp.inf), axis=1)
    if clip_reference:
        b = jnp.maximum(b, 0.0)
    return 2.0 * a * b / (a + b)


def torchmetrics_clip_score(source_embeddings, target_embeddings, *, validate: bool = True) -> jax.Array:
    """torchmetrics' `CLIPScore` from embeddings: max(mean_i 100 * cos(source_i, target_i), 0).

    Works for image-text, image-image and text-text pairs (the same formula).

    Args:
      source_embeddings: `[N, D]`.
      target_embeddings: `[N, D]`, paired with the source.
      validate: check NaN/inf and zero rows when concrete.

    Returns:
      scalar in [0, 100].
    """
    src, tgt = _pair("source_embeddings", source_embeddings, "target_embeddings", target_embeddings, validate)
    return jnp.maximum(jnp.mean(TORCHMETRICS_SCALE * _cos(src, tgt)), 0.0)


def clip_i(generated_embeddings, real_embeddings, *, validate: bool = True) -> jax.Array:
    """CLIP-I: mean over all (generated, real) pairs of the cosine similarity.

    Args:
      generated_embeddings: `[N, D]` image embeddings.
      real_embeddings: `[M, D]` image embeddings (M may differ from N).
      validate: check NaN/inf and zero rows when concrete.

    Returns:
      scalar in [-1, 1], equal to mean_ij cos(g_i, r_j) = mean(g_hat) . mean(r_hat).
    """
    g = checks.array("generated_embeddings", generated_embeddings, "[N, D]")
    r = checks.array("real_embeddings", real_embeddings, "[M, D]")
    checks.same_dim(generated_embeddings=g, real_embeddings=r)
    checks.nonzero_rows("generated_embeddings", g, validate=validate)
    checks.nonzero_rows("real_embeddings", r, validate=validate)
    return jnp.dot(jnp.mean(checks.l2_normalize(g), axis=0), jnp.mean(checks.l2_normalize(r), axis=0))
