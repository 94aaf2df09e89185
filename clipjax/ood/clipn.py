"""CLIPN's ATD and CTW scores from "yes" and "no" text classifiers (Wang et al., ICCV 2023).

Reference: `xmed-lab/CLIPN:src/zero_shot_infer.py:cal_all_metric` (methods.md §11). With
`l_i = logit_scale * cos(x, w_yes_i)` and `l~_i = logit_scale * cos(x, w_no_i)`:

  * p_yes_i = softmax([l_i, l~_i])_0 = sigmoid(l_i - l~_i)
  * CTW(x)  = p_yes at argmax_i l_i   ("competing-to-win")
  * ATD(x)  = sum_i softmax(l)_i * p_yes_i   ("agreeing-to-differ", as the code computes it)

Both are ID-ness scores (higher = more ID), as the reference feeds them to its
metrics with ID as the positive class. The "no" classifier needs CLIPN's trained
"no" text encoder; these functions only take the resulting weights.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from clipjax import checks
from clipjax.ood.scores import cosine_similarity

__all__ = ["CLIPNScores", "clipn_scores"]


class CLIPNScores(NamedTuple):
    """ATD and CTW scores, each `[B]` in [0, 1]."""

    atd: jax.Array
    ctw: jax.Array


@jax.jit
def _clipn(image_emb, yes_emb, no_emb, logit_scale):
    logits = logit_scale * cosine_similarity(image_emb, yes_emb, validate=False)
    logits_no = logit_scale * cosine_similarity(image_emb, no_emb, validate=False)
    p_yes = jax.nn.sigmoid(logits - logits_no)  # [B, K]
    best = jnp.argmax(logits, axis=-1)
    ctw = jnp.take_along_axis(p_yes, best[:, None], axis=-1)[:, 0]
    atd = jnp.sum(jax.nn.softmax(logits, axis=-1) * p_yes, axis=-1)
    return CLIPNScores(atd=atd, ctw=ctw)


def clipn_scores(image_emb: jax.Array, yes_emb: jax.Array, no_emb: jax.Array, *, logit_scale: float = 100.0,
                 validate: bool = True) -> CLIPNScores:
    """ATD and CTW from image embeddings and the "yes"/"no" classifier weights.

    Args:
      image_emb: `[B, D]` image embeddings (normalised here).
      yes_emb: `[K, D]` "yes" classifier weights (prompt-ensembled text embeddings of the ID classes).
      no_emb: `[K, D]` "no" classifier weights from CLIPN's "no" text encoder, same class order.
      logit_scale: 100 (logits = 100 cos).
      validate: check concrete inputs for NaN/inf, all-zero rows and duplicate class rows.

    Returns:
      `CLIPNScores(atd [B], ctw [B])`.
    """
    image_emb = checks.array("image_emb", image_emb, "[B, D]")
    yes_emb = checks.array("yes_emb", yes_emb, "[K, D]")
    no_emb = checks.array("no_emb", no_emb, "[K, D]")
    checks.same_dim(image_emb=image_emb, yes_emb=yes_emb, no_emb=no_emb)
    checks.same_len(yes_emb=yes_emb, no_emb=no_emb)  # the same classes in the same order
    for name, x in (("image_emb", image_emb), ("yes_emb", yes_emb), ("no_emb", no_emb)):
        checks.nonzero_rows(name, x, validate=validate)
    checks.unique_rows("yes_emb", yes_emb, validate=validate)
    return _clipn(image_emb, yes_emb, no_emb, logit_scale)
