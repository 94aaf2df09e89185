"""Contrastive losses in global view: every function sees the whole `[B, D]` batch.

Conventions shared by every loss in `clipjax.losses`:

* Embeddings are `[B, D]`; row `i` of the image matrix is paired with row `i`
  of the text matrix. The losses do not L2-normalise: pass normalised
  features, as open_clip, big_vision and CLOOB do.
* `logit_scale` is the *multiplier* applied to the dot products, already
  exponentiated (open_clip's convention: `ClipLoss(..., logit_scale)` and
  `SigLipLoss(..., logit_scale, logit_bias)` receive `model.logit_scale.exp()`).
  A model that stores the log-parameter t' (CLIP's `log(1/0.07)`, big_vision's
  `t`, SigLIP's init `log 10`) passes `jnp.exp(t_prime)`. `logit_bias` is
  additive (SigLIP init `-10`).
* Everything is computed in float32, whatever the input dtype (bf16 inputs are
  upcast before the matmul), so the log-sum-exp and log-sigmoid stay stable.
  Gradients come back in the input dtype.
* Inputs are checked by `clipjax.checks`: shapes and dtypes always (also at
  trace time), NaN/inf only for concrete inputs with `validate=True` (skipped
  under `jit`). The losses take embeddings as given and never normalise them,
  so an all-zero row is valid input (its logits are 0). The one normalisation
  is CLOOB's Hopfield retrieval: a retrieved pattern that is exactly zero is an
  error when validating and stays a zero vector otherwise (no NaN).

Losses here build the full `[B, B]` logit matrix; `clipjax.losses.chunked` and
`clipjax.losses.sharded` compute the same numbers in O(B x block) memory and
across devices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from clipjax import checks

__all__ = [
    "clip_loss",
    "siglip_loss",
    "cloob_loss",
    "info_loob",
    "hopfield_retrieval",
    "distill_loss",
    "principal_component_reconstruction",
    "longclip_short_loss",
    "longclip_loss",
    "smoothed_cross_entropy",
]


def _check_pair(image_features, text_features, names=("image_features", "text_features"),
                min_batch: int = 2) -> tuple[jax.Array, jax.Array]:
    """Static checks of two paired `[B, D]` embedding matrices (same shape and dtype, B >= `min_batch`).

    Contrastive losses need a negative for every pair, so the default smallest batch is 2.
    """
    a = checks.array(names[0], image_features, "[B, D]", min_rows=min_batch)
    b = checks.array(names[1], text_features, "[B, D]", min_rows=min_batch)
    checks.same_shape("[B, D]", **{names[0]: a, names[1]: b})
    checks.same_dtype(**{names[0]: a, names[1]: b})
    return a, b


def _prepare(image_features, text_features, scalars: dict, validate: bool, names=None):
    """Static checks, optional finite check, float32 cast. Returns (x, y, *scalars)."""
    names = names or ("image_features", "text_features")
    a, b = _check_pair(image_features, text_features, names)
    out = {k: (None if v is None else checks.scalar(k, v)) for k, v in scalars.items()}
    for name, v in ((names[0], a), (names[1], b), *out.items()):
        checks.finite(name, v, validate=validate)
    return (a.astype(jnp.float32), b.astype(jnp.float32), *out.values())


def smoothed_cross_entropy(logits: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-row cross entropy of `[N, N]` logits with target `i` for row `i`.

    Matches `torch.nn.functional.cross_entropy(..., label_smoothing=eps,
    reduction="none")`: `(1 - eps) * nll + eps * mean_k(-log p_k)`, that is
    `lse - (1 - eps) * z_ii - eps * mean_k z_ik`.

    Args:
      logits: `[N, N]` float32 logits; the target of row `i` is column `i`.
      label_smoothing: eps in [0, 1].

    Returns:
      `[N]` per-row losses (nats).
    """
    lse = jax.nn.logsumexp(logits, axis=1)
    pos = jnp.diagonal(logits)
    loss = lse - (1.0 - label_smoothing) * pos
    if label_smoothing:
        loss = loss - label_smoothing * jnp.mean(logits, axis=1)
    return loss


def _check_smoothing(label_smoothing: float) -> float:
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    return float(label_smoothing)


def clip_loss(image_features, text_features, logit_scale, logit_bias=None, *,
              label_smoothing: float = 0.0, validate: bool = True) -> jax.Array:
    """Symmetric softmax InfoNCE (CLIP; open_clip `ClipLoss` with `world_size=1`).

    `L = (CE(S) + CE(S^T)) / 2` with `S = logit_scale * X Y^T (+ logit_bias)`,
    each CE the mean over rows of the cross entropy against the diagonal.

    Args:
      image_features: `[B, D]` image embeddings (normally L2-normalised).
      text_features: `[B, D]` text embeddings, paired row by row.
      logit_scale: scalar multiplier, already exponentiated (e.g. `exp(log(1/0.07))`).
      logit_bias: optional additive scalar (open_clip adds it when the model has one).
      label_smoothing: eps of torch-style label smoothing (Long-CLIP uses 0.1).
      validate: check finiteness when the inputs are concrete.

    Returns:
      Scalar float32 loss in nats.
    """
    label_smoothing = _check_smoothing(label_smoothing)
    x, y, scale, bias = _prepare(image_features, text_features,
                                 {"logit_scale": logit_scale, "logit_bias": logit_bias}, validate)
    logits = scale * (x @ y.T)
    if bias is not None:
        logits = logits + bias
    return 0.5 * (jnp.mean(smoothed_cross_entropy(logits, label_smoothing))
                  + jnp.mean(smoothed_cross_entropy(logits.T, label_smoothing)))


def siglip_loss(image_features, text_features, logit_scale, logit_bias, *,
                negative_only: bool = False, validate: bool = True) -> jax.Array:
    """Pairwise sigmoid loss (SigLIP), summed over all pairs and divided by B.

    `L = -(1/B) sum_ij log sigmoid(z_ij * (t x_i . y_j + b))`, `z_ij = +1` on the
    diagonal and -1 elsewhere (big_vision `siglip.py`; open_clip `SigLipLoss`).
    Written stably as `softplus(l)` for negatives and `softplus(l) - l` for positives.

    Args:
      image_features: `[B, D]` image embeddings.
      text_features: `[B, D]` text embeddings, paired row by row.
      logit_scale: scalar t, already exponentiated (init `exp(log 10) = 10`).
      logit_bias: scalar b (init -10).
      negative_only: treat every pair as a negative (open_clip `_loss(negative_only=True)`,
        used for blocks of texts from other devices).
      validate: check finiteness when the inputs are concrete.

    Returns:
      Scalar float32 loss in nats.
    """
    if logit_bias is None:
        raise ValueError("siglip_loss needs logit_bias (SigLIP initialises it to -10)")
    x, y, scale, bias = _prepare(image_features, text_features,
                                 {"logit_scale": logit_scale, "logit_bias": logit_bias}, validate)
    logits = scale * (x @ y.T) + bias
    total = jnp.sum(jax.nn.softplus(logits))
    if not negative_only:
        total = total - jnp.sum(jnp.diagonal(logits))
    return total / x.shape[0]


def hopfield_retrieval(state_patterns: jax.Array, stored_patterns: jax.Array, beta, *,
                       validate: bool = True) -> jax.Array:
    """Modern Hopfield retrieval `normalize(softmax(beta * xi P^T) P)` (CLOOB, no projections).

    Args:
      state_patterns: `[N, D]` query patterns xi.
      stored_patterns: `[M, D]` stored patterns P.
      beta: inverse temperature of the association softmax (CLOOB default 14.3).
      validate: for concrete inputs, raise if a retrieved pattern is exactly zero (stored
        patterns that cancel out), which cannot be normalised; without validation it stays
        a zero vector (`clipjax.checks.l2_normalize`).

    Returns:
      `[N, D]` retrieved patterns, each row L2-normalised (or zero, see `validate`).
    """
    return _hopfield(state_patterns, stored_patterns, beta, validate, ("state_patterns", "stored_patterns"))


def _hopfield(state, stored, beta, validate, names):
    out = jax.nn.softmax(beta * (state @ stored.T), axis=1) @ stored
    checks.nonzero_rows(f"the Hopfield retrieval of {names[0]} from {names[1]}", out, validate=validate)
    return checks.l2_normalize(out)


_LOOB_MASK = -1000.0  # CLOOB masks the positive with -1000 (not -inf) before the log-sum-exp


def info_loob(anchors: jax.Array, partners: jax.Array, inv_tau) -> jax.Array:
    """InfoLOOB (leave-one-out bound), multiplied by tau as in CLOOB's code.

    `tau * L(A, B)`, `L = -(1/N) sum_i [a_i.b_i / tau - log sum_{j != i} exp(a_i.b_j / tau)]`.
    The positive is excluded from the log-sum-exp by the value -1000, as in
    `ml-jku/cloob:src/training/methods.py:infoLOOB_loss`.

    Args:
      anchors: `[N, D]` rows a_i.
      partners: `[N, D]` rows b_j; b_i is the positive of a_i.
      inv_tau: scalar 1/tau (already exponentiated; CLOOB clamps it to <= 100).

    Returns:
      Scalar loss.
    """
    k = inv_tau * (anchors @ partners.T)
    eye = jnp.eye(k.shape[0], dtype=bool)
    positives = jnp.diagonal(k)
    negatives = jax.nn.logsumexp(jnp.where(eye, _LOOB_MASK, k), axis=1)
    return jnp.mean(negatives - positives) / inv_tau


def cloob_loss(image_features, text_features, inv_tau, *, hopfield_beta=14.3,
               validate: bool = True) -> jax.Array:
    """CLOOB: InfoLOOB on modern-Hopfield-retrieved embeddings (methods.md section 16).

    `U_x = Hop(x; X)`, `V_x = Hop(y; X)`, `U_y = Hop(x; Y)`, `V_y = Hop(y; Y)`;
    loss `= tau L(U_x, V_x) + tau L(V_y, U_y)` (summed, not averaged).

    Args:
      image_features: `[B, D]` L2-normalised image embeddings x.
      text_features: `[B, D]` L2-normalised text embeddings y.
      inv_tau: scalar 1/tau, already exponentiated (CLOOB init 14.3, README 30).
      hopfield_beta: Hopfield inverse temperature beta (CLOOB init 14.3, README 8).
      validate: check finiteness, and that no Hopfield retrieval is zero, when the inputs are concrete.

    Returns:
      Scalar float32 loss.
    """
    x, y, inv_tau, beta = _prepare(image_features, text_features,
                                   {"inv_tau": inv_tau, "hopfield_beta": hopfield_beta}, validate)
    img, txt = "image_features", "text_features"
    u_x = _hopfield(x, x, beta, validate, (img, img))
    v_x = _hopfield(y, x, beta, validate, (txt, img))
    u_y = _hopfield(x, y, beta, validate, (img, txt))
    v_y = _hopfield(y, y, beta, validate, (txt, txt))
    return info_loob(u_x, v_x, inv_tau) + info_loob(v_y, u_y, inv_tau)


def _soft_cross_entropy(teacher_logits, student_logits):
    """`-(softmax(teacher) * log_softmax(student)).sum(1).mean()`."""
    p = jax.nn.softmax(teacher_logits, axis=1)
    return -jnp.mean(jnp.sum(p * jax.nn.log_softmax(student_logits, axis=1), axis=1))


def distill_loss(image_features, text_features, logit_scale, teacher_image_features,
                 teacher_text_features, teacher_logit_scale, *, validate: bool = True) -> jax.Array:
    """Distillation term of open_clip `DistillClipLoss`: teacher softmax -> student log-softmax.

    `(H(p_T^{i2t}, p_S^{i2t}) + H(p_T^{t2i}, p_S^{t2i})) / 2`, each H the mean over
    rows of the cross entropy between the teacher's and the student's softmax
    over the in-batch logits. open_clip returns it beside the contrastive term;
    the total training loss is `clip_loss(...) + distill_loss(...)`. Gradients
    reach the teacher inputs too; stop them (`jax.lax.stop_gradient`) or keep
    the teacher out of the differentiated params, as open_clip's trainer does.

    Args:
      image_features, text_features: student `[B, D]` embeddings.
      logit_scale: student scale (exponentiated).
      teacher_image_features, teacher_text_features: teacher `[B, D_t]` embeddings.
      teacher_logit_scale: teacher scale (exponentiated).
      validate: check finiteness when the inputs are concrete.

    Returns:
      Scalar float32 loss in nats.
    """
    x, y, scale = _prepare(image_features, text_features, {"logit_scale": logit_scale}, validate)
    tx, ty, tscale = _prepare(teacher_image_features, teacher_text_features,
                              {"teacher_logit_scale": teacher_logit_scale}, validate,
                              names=("teacher_image_features", "teacher_text_features"))
    if tx.shape[0] != x.shape[0]:
        raise ValueError(f"teacher batch {tx.shape[0]} differs from student batch {x.shape[0]}")
    s = scale * (x @ y.T)
    t = tscale * (tx @ ty.T)
    return 0.5 * (_soft_cross_entropy(t, s) + _soft_cross_entropy(t.T, s.T))


def principal_component_reconstruction(features: jax.Array, num_components: int = 32,
                                       groups: int = 1) -> jax.Array:
    """Long-CLIP primary-component matching: keep the top-k PCA components of a batch.

    Centre the batch, take the SVD, project on the top `num_components` right
    singular vectors, map back and add the mean (`Long-CLIP model_longclip.py:CLIP.PCA`).
    The result is not renormalised.

    Args:
      features: `[B, D]` embeddings (Long-CLIP passes the L2-normalised image features).
      num_components: k, the number of principal components kept (32).
      groups: split the batch into this many equal row groups and run the PCA
        on each separately (Long-CLIP runs it on each device's batch; use the
        device count to reproduce a multi-GPU run in global view).

    Returns:
      `[B, D]` float32 reconstruction.
    """
    b, d = features.shape
    if b % groups:
        raise ValueError(f"batch B={b} is not divisible into {groups} PCA groups")
    x = features.astype(jnp.float32).reshape(groups, b // groups, d)
    mean = jnp.mean(x, axis=1, keepdims=True)
    xc = x - mean
    _, _, vt = jnp.linalg.svd(xc, full_matrices=False)
    v = jnp.swapaxes(vt[:, :num_components, :], 1, 2)  # [G, D, k]
    recon = (xc @ v) @ jnp.swapaxes(v, 1, 2) + mean
    return recon.reshape(b, d)


def longclip_short_loss(image_features, short_text_features, logit_scale, *, num_components: int = 32,
                        label_smoothing: float = 0.1, pca_groups: int = 1,
                        validate: bool = True) -> jax.Array:
    """Long-CLIP short-caption loss: CLIP loss of short texts against PCA-reduced images.

    Args:
      image_features: `[B, D]` L2-normalised image embeddings.
      short_text_features: `[B, D]` L2-normalised short-caption embeddings.
      logit_scale: scalar multiplier, exponentiated (Long-CLIP: `exp(4.6052) = 100`).
      num_components: principal components kept (32).
      label_smoothing: 0.1 in Long-CLIP.
      pca_groups: PCA per group of rows (one group per device of the original run).
      validate: check finiteness when the inputs are concrete.

    Returns:
      Scalar float32 loss in nats.
    """
    image_features, short_text_features = _check_pair(image_features, short_text_features,
                                                      ("image_features", "short_text_features"))
    checks.finite("image_features", image_features, validate=validate)
    checks.finite("short_text_features", short_text_features, validate=validate)
    if not 1 <= num_components:
        raise ValueError(f"num_components must be >= 1, got {num_components}")
    short_images = principal_component_reconstruction(image_features, num_components, pca_groups)
    return clip_loss(short_images, jnp.asarray(short_text_features).astype(jnp.float32), logit_scale,
                     label_smoothing=label_smoothing, validate=False)


def longclip_loss(image_features, long_text_features, short_text_features, logit_scale, *,
                  num_components: int = 32, label_smoothing: float = 0.1, pca_groups: int = 1,
                  validate: bool = True) -> jax.Array:
    """Long-CLIP fine-tuning loss `L_long + L_short` (methods.md section 18).

    `L_long` is the label-smoothed CLIP loss of long captions against the full
    image embeddings; `L_short` is `longclip_short_loss`.

    Args:
      image_features: `[B, D]` L2-normalised image embeddings.
      long_text_features: `[B, D]` L2-normalised long-caption embeddings.
      short_text_features: `[B, D]` L2-normalised short-caption embeddings.
      logit_scale: scalar multiplier, exponentiated.
      num_components, label_smoothing, pca_groups, validate: as in `longclip_short_loss`.

    Returns:
      Scalar float32 loss in nats.
    """
    long_loss = clip_loss(image_features, long_text_features, logit_scale,
                          label_smoothing=label_smoothing, validate=validate)
    short_loss = longclip_short_loss(image_features, short_text_features, logit_scale,
                                     num_components=num_components, label_smoothing=label_smoothing,
                                     pca_groups=pca_groups, validate=validate)
    return long_loss + short_loss
