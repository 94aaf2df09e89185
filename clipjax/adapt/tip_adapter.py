"""Training-free Tip-Adapter: a key-value cache of few-shot features (Zhang et al., ECCV 2022).

Reference: `gaopengcuhk/Tip-Adapter:utils.py:build_cache_model` and
`main_imagenet.py:run_tip_adapter` (methods.md §14):

  * keys F = normalize(mean over the augmented passes of the *unnormalised* features), `[NK, D]`
  * values L = one_hot(labels), `[NK, K]`
  * logits = logit_scale * x W_c^T + alpha * exp(-beta (1 - x F^T)) L

with x the normalised test features, W_c the zero-shot text classifier and
logit_scale = 100. ImageNet starts from beta = 1, alpha = 1.17; choose both on a
validation split with `clipjax.adapt.search.select_tip_alpha_beta`, never on the
test split.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from clipjax import checks
from clipjax.adapt.gda import _check_text, check_features_labels

__all__ = ["TipAdapterParams", "fit", "predict"]


class TipAdapterParams(NamedTuple):
    """The cache model (a pytree; `predict` is jittable in it).

    Attributes:
      keys: `[NK, D]` normalised cache keys.
      values: `[NK, K]` one-hot cache values.
      text_emb: `[K, D]` normalised zero-shot classifier, or None for the cache alone.
      alpha: scalar residual ratio.
      beta: scalar sharpness.
      logit_scale: scalar (100).
    """

    keys: jax.Array
    values: jax.Array
    text_emb: jax.Array | None
    alpha: jax.Array
    beta: jax.Array
    logit_scale: jax.Array


@jax.jit
def _mean_over_passes(features):
    return features.mean(axis=0)


def fit(features: jax.Array, labels: jax.Array, num_classes: int | None = None, *, text_emb: jax.Array | None = None,
        alpha: float = 1.17, beta: float = 1.0, logit_scale: float = 100.0, validate: bool = True) -> TipAdapterParams:
    """Build the cache from few-shot features.

    Args:
      features: `[A, N, D]` unnormalised image features of A augmented passes over the same N
        shots (the reference uses A = 10), or `[N, D]` for a single pass.
      labels: `[N]` int class indices of the shots.
      num_classes: K (default `max(labels) + 1`, like `F.one_hot`).
      text_emb: optional `[K, D]` zero-shot text classifier (normalised here).
      alpha, beta: cache weight and sharpness (ImageNet initial values 1.17 and 1).
      logit_scale: 100.
      validate: check concrete inputs for NaN/inf, labels out of range, all-zero `text_emb` rows
        and all-zero keys (a shot whose mean feature is zero cannot be normalised).

    Returns:
      `TipAdapterParams`.
    """
    features = jnp.asarray(features)
    if features.ndim == 2:
        features = features[None]
    features, labels, num_classes = check_features_labels(features, labels, num_classes, feature_ndim=3,
                                                          validate=validate)
    text_emb = _check_text(text_emb, num_classes, features.shape[-1], validate)
    mean = _mean_over_passes(features)
    checks.nonzero_rows("the mean over augmented passes of features", mean, validate=validate)
    keys = checks.l2_normalize(mean)
    values = jax.nn.one_hot(labels, num_classes, dtype=keys.dtype)
    dtype = keys.dtype
    return TipAdapterParams(keys, values, text_emb, jnp.asarray(alpha, dtype), jnp.asarray(beta, dtype),
                            jnp.asarray(logit_scale, dtype))


def cache_logits(keys: jax.Array, values: jax.Array, features: jax.Array, beta) -> jax.Array:
    """The cache term `exp(-beta (1 - x F^T)) L`, `[B, K]`."""
    return jnp.exp(-beta * (1.0 - features @ keys.T)) @ values


@jax.jit
def _predict(params: TipAdapterParams, features):
    logits = params.alpha * cache_logits(params.keys, params.values, features, params.beta)
    if params.text_emb is not None:
        logits = logits + params.logit_scale * (features @ params.text_emb.T)
    return logits


def predict(params: TipAdapterParams, features: jax.Array) -> jax.Array:
    """Class logits `[B, K]` for normalised `[B, D]` test features."""
    features = checks.array("features", features, "[B, D]", sizes={"D": params.keys.shape[1]})
    return _predict(params, features)
