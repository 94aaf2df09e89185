"""Training-free GDA: Gaussian discriminant analysis on CLIP features (Wang et al., ICLR 2024).

Reference: `mrflogs/ICLR24:main_few_shots.py:run` (methods.md §13). From few-shot
(augmented) image features x (L2-normalised CLIP features in the paper) with labels:

  * mu_k = class means; c_i = x_i - mu_{y_i}; S = cov(c) with the N - 1 denominator
    (`torch.cov`, which also subtracts the mean of c).
  * KS shrinkage estimator: Sigma^-1 = D * pinv((N - 1) S + tr(S) I_D).
  * W = Sigma^-1 mu_k (a `[D, K]` matrix), b_k = log(1/K) - mu_k^T Sigma^-1 mu_k / 2.
  * logits = logit_scale * x t_k^T + alpha * (x W + b), with the zero-shot text
    classifier t (optional here) and logit_scale = 100.

Choose alpha on a validation split with `clipjax.adapt.search.select_gda_alpha`
(the reference grid {1e-4, ..., 100}); never on the test split.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from clipjax import checks

__all__ = ["GDAParams", "check_features_labels", "fit", "predict"]


class GDAParams(NamedTuple):
    """Fitted GDA classifier (a pytree; `predict` is jittable in it).

    Attributes:
      weight: `[D, K]` W = Sigma^-1 mu.
      bias: `[K]` b.
      text_emb: `[K, D]` normalised zero-shot text classifier, or None for the GDA head alone.
      alpha: scalar weight of the GDA head.
      logit_scale: scalar multiplying the text cosines (100).
    """

    weight: jax.Array
    bias: jax.Array
    text_emb: jax.Array | None
    alpha: jax.Array
    logit_scale: jax.Array


def check_features_labels(features, labels, num_classes: int | None, *, feature_ndim: int = 2,
                          names: tuple[str, str] = ("features", "labels"), dim: int | None = None,
                          validate: bool = True):
    """Check `[N, D]` (or `[A, N, D]`) float features and `[N]` integer labels; return them and K.

    K is `num_classes` if given, else `max(labels) + 1` (labels must then be concrete). `dim`
    fixes D. Value checks (NaN/inf features, labels outside [0, K)) follow `clipjax.checks`:
    concrete inputs only, skipped with `validate=False`.

    Raises:
      TypeError: non-float features or non-integer labels.
      ValueError: wrong ranks or sizes, empty inputs, mismatched lengths, NaN/inf features,
        or labels outside [0, K).
    """
    f_name, l_name = names
    features = checks.array(f_name, features, "[N, D]" if feature_ndim == 2 else "[A, N, D]",
                            sizes=None if dim is None else {"D": dim})
    labels = checks.array(l_name, labels, "[N]", dtype="integer", sizes={"N": features.shape[-2]})
    if num_classes is None:
        if not checks.is_concrete(labels):
            raise ValueError("num_classes is required when labels are traced")
        num_classes = int(np.max(np.asarray(labels))) + 1
    num_classes = checks.positive_int("num_classes", num_classes)
    checks.index_range(l_name, labels, num_classes, validate=validate)
    checks.finite(f_name, features, validate=validate)
    return features, labels, num_classes


def _check_text(text_emb, num_classes: int, dim: int, validate: bool):
    """`[K, D]` zero-shot classifier, L2-normalised (all-zero rows are an error when validating)."""
    if text_emb is None:
        return None
    text_emb = checks.array("text_emb", text_emb, "[K, D]", sizes={"K": num_classes, "D": dim})
    checks.nonzero_rows("text_emb", text_emb, validate=validate)
    return checks.l2_normalize(text_emb)


def _fit(features, labels, num_classes):
    n, d = features.shape
    one_hot = jax.nn.one_hot(labels, num_classes, dtype=features.dtype)  # [N, K]
    counts = one_hot.sum(0)
    mus = (one_hot.T @ features) / counts[:, None]  # [K, D]
    centered = features - mus[labels]
    centered = centered - centered.mean(0)  # torch.cov subtracts the mean again
    scatter = centered.T @ centered  # (N - 1) S
    trace = jnp.trace(scatter) / (n - 1)
    eps = float(jnp.finfo(features.dtype).eps)
    cov_inv = d * jnp.linalg.pinv(scatter + trace * jnp.eye(d, dtype=features.dtype), rtol=d * eps)
    weight = cov_inv.T @ mus.T  # [D, K]
    bias = jnp.log(1.0 / num_classes) - 0.5 * jnp.einsum("kd,dc,kc->k", mus, cov_inv, mus)
    return weight, bias


_fit_jit = jax.jit(_fit, static_argnums=(2,))


def fit(features: jax.Array, labels: jax.Array, num_classes: int | None = None, *, text_emb: jax.Array | None = None,
        alpha: float = 1.0, logit_scale: float = 100.0, validate: bool = True) -> GDAParams:
    """Estimate class means and the shared precision with the KS shrinkage estimator.

    Args:
      features: `[N, D]` training features (for CLIP: L2-normalised image features, all
        augmented views stacked; the reference uses 10 augmented passes per shot).
      labels: `[N]` int class indices in [0, K).
      num_classes: K (default `max(labels) + 1`); every class needs at least one sample.
      text_emb: optional `[K, D]` zero-shot text classifier (normalised here).
      alpha: weight of the GDA head (choose it with `search.select_gda_alpha`).
      logit_scale: scale of the text cosines (100).
      validate: check concrete inputs for NaN/inf, labels out of range, classes without samples and
        all-zero `text_emb` rows (`clipjax.checks`).

    Returns:
      `GDAParams`.
    """
    features, labels, num_classes = check_features_labels(features, labels, num_classes, validate=validate)
    if features.shape[0] < 2:
        raise ValueError(f"GDA needs at least 2 samples to estimate a covariance, got {features.shape[0]}")
    if validate and checks.is_concrete(labels):
        present = np.bincount(np.asarray(labels), minlength=num_classes)
        if (present == 0).any():
            raise ValueError(f"classes {np.flatnonzero(present == 0)[:10].tolist()} have no samples; "
                             "GDA needs every class's mean")
    text_emb = _check_text(text_emb, num_classes, features.shape[1], validate)
    weight, bias = _fit_jit(features, labels, num_classes)
    return GDAParams(weight, bias, text_emb, jnp.asarray(alpha, weight.dtype), jnp.asarray(logit_scale, weight.dtype))


@jax.jit
def _predict(params: GDAParams, features):
    logits = params.alpha * (features @ params.weight + params.bias)
    if params.text_emb is not None:
        logits = logits + params.logit_scale * (features @ params.text_emb.T)
    return logits


def predict(params: GDAParams, features: jax.Array) -> jax.Array:
    """Class logits `[B, K]` for `[B, D]` features (normalised CLIP features, as in fit)."""
    features = checks.array("features", features, "[B, D]", sizes={"D": params.weight.shape[0]})
    return _predict(params, features)
