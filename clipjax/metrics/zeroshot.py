"""Zero-shot classification: template-ensembled classifiers, top-k accuracy, balanced accuracy.

Follows CLIP_benchmark (`clip_benchmark/metrics/zeroshot_classification.py`):
the weight of class c is normalize(mean_t normalize(E_text(template_t(c)))),
logits are `100 * x_hat @ W`, and the reported numbers are top-1, top-5 and
`mean_per_class_recall` (scikit-learn's `balanced_accuracy_score`).

Ties: a sample is correct at k when its true class is among the first k
classes of a *stable* descending sort of its logits (on equal logits the lower
class index ranks first), which is also how `jax.lax.top_k` breaks ties.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from clipjax import checks
from clipjax.metrics.templates import build_prompts

LOGIT_SCALE = 100.0


def classifier_weights(text_embeddings, mask=None, *, validate: bool = True) -> jax.Array:
    """Zero-shot classifier from per-class, per-template text embeddings.

    Args:
      text_embeddings: `[C, T, D]` text embeddings (need not be normalised), T templates
        per class.
      mask: optional `[C, T]` bool, True where a template embedding is present (for class-
        specific prompt lists of different lengths, padded to T). Every class needs one.
      validate: when the inputs are concrete, check for NaN/inf and all-zero rows, also a zero mean of
        a class's normalised templates (templates that cancel); see `clipjax.checks`.

    Returns:
      `[D, C]` weights: column c is normalize(mean_t normalize(text_embeddings[c, t])).
    """
    emb = checks.array("text_embeddings", text_embeddings, "[C, T, D]")
    if mask is None:
        mask = jnp.ones(emb.shape[:2], bool)
    mask = jnp.asarray(mask)
    if mask.shape != emb.shape[:2]:
        raise ValueError(f"mask must have shape [C, T] = {emb.shape[:2]}, got {tuple(mask.shape)}")
    validate = validate and checks.is_concrete(emb, mask)
    if validate:
        checks.nonzero_rows("text_embeddings", jnp.where(mask[..., None], emb, 1.0))
        if not bool(jnp.all(jnp.any(mask, axis=1))):
            raise ValueError("every class needs at least one template embedding (a mask row is all False)")
    mean = _template_mean(emb, mask)
    # rule 3 of clipjax.checks for the derived vector too: templates that cancel out give a zero mean
    checks.nonzero_rows("the template mean of text_embeddings", mean, validate=validate)
    return checks.l2_normalize(mean).T


@jax.jit
def _template_mean(emb, mask):
    """`[C, D]` mean over the present templates of the normalised template embeddings."""
    unit = checks.l2_normalize(emb)
    w = mask[..., None].astype(emb.dtype)
    return jnp.sum(unit * w, axis=1) / jnp.sum(w, axis=1)


def zeroshot_classifier(text: Callable[[list[str]], jax.Array] | jax.Array, classnames: Sequence[str] | None = None,
                        prompt_templates: Sequence[str] | Mapping[str, Sequence[str]] | None = None, *,
                        mask=None, batch_size: int = 256) -> jax.Array:
    """Zero-shot classifier weights `[D, C]` from embeddings or from a text encoder.

    Args:
      text: either `[C, T, D]` text embeddings, or a function mapping a list of B strings to
        `[B, D]` embeddings (for example `lambda s: model.encode_text(model.tokenize(s))`).
      classnames: C class names (needed with a function).
      prompt_templates: templates with `{c}` (see `clipjax.metrics.templates`) or a mapping
        class name -> prompts (needed with a function).
      mask: `[C, T]` presence mask when `text` is an array.
      batch_size: prompts per call of the text function.

    Returns:
      `[D, C]` classifier weights, unit-norm columns.
    """
    if not callable(text):
        return classifier_weights(text, mask)
    if classnames is None or prompt_templates is None:
        raise ValueError("classnames and prompt_templates are required when text is an encoder function")
    batch_size = checks.positive_int("batch_size", batch_size)
    prompts = build_prompts(classnames, prompt_templates)
    flat = [p for per_class in prompts for p in per_class]
    chunks = [np.asarray(text(flat[i:i + batch_size])) for i in range(0, len(flat), batch_size)]
    emb = np.concatenate(chunks, axis=0)
    if emb.ndim != 2 or emb.shape[0] != len(flat):
        raise ValueError(f"the text function returned shape {emb.shape} for {len(flat)} prompts, "
                         "expected [B, D] per batch")
    n_t = max(len(p) for p in prompts)
    padded = np.zeros((len(prompts), n_t, emb.shape[1]), emb.dtype)
    present = np.zeros((len(prompts), n_t), bool)
    start = 0
    for c, per_class in enumerate(prompts):
        padded[c, :len(per_class)] = emb[start:start + len(per_class)]
        present[c, :len(per_class)] = True
        start += len(per_class)
    return classifier_weights(padded, present)


def zeroshot_logits(image_embeddings, weights, *, scale: float = LOGIT_SCALE, normalize: bool = False,
                    validate: bool = True) -> jax.Array:
    """Logits `scale * x_hat @ W`.

    Args:
      image_embeddings: `[N, D]` image embeddings, L2-normalised unless `normalize=True`.
      weights: `[D, C]` from `classifier_weights` / `zeroshot_classifier` (used as given, so an
        average of several classifiers works as in CLIP_benchmark's `load_clfs`).
      scale: logit scale (CLIP_benchmark uses 100).
      normalize: L2-normalise the image embeddings first.
      validate: check NaN/inf and unit norms (all-zero rows with `normalize=True`) when concrete.

    Returns:
      `[N, C]` logits.
    """
    x = checks.array("image_embeddings", image_embeddings, "[N, D]")
    w = checks.array("weights", weights, "[D, C]", sizes={"D": x.shape[1]})
    checks.values("image_embeddings", x, unit_norm=not normalize, nonzero=normalize, validate=validate,
                  hint=" or pass normalize=True")
    checks.finite("weights", w, validate=validate)
    if normalize:
        x = checks.l2_normalize(x)
    return scale * (x @ w)


def _check_labels(logits, labels, validate):
    logits = checks.array("logits", logits, "[N, C]")
    labels = checks.array("labels", labels, "[N]", dtype="integer")
    checks.same_len(logits=logits, labels=labels)
    checks.index_range("labels", labels, logits.shape[1], validate=validate)
    checks.finite("logits", logits, validate=validate)
    return logits, labels


def true_class_rank(logits, labels) -> jax.Array:
    """Rank of the true class in a stable descending sort of each row of logits.

    Args:
      logits: `[N, C]`.
      labels: `[N]` int.

    Returns:
      `[N]` int32: number of classes with a larger logit, plus those with an equal logit and a
      lower index. A sample is top-k correct when its rank is < k.
    """
    true = jnp.take_along_axis(logits, labels[:, None], axis=1)
    idx = jnp.arange(logits.shape[1])[None, :]
    before = (logits > true) | ((logits == true) & (idx < labels[:, None]))
    return jnp.sum(before, axis=1, dtype=jnp.int32)


def topk_accuracy(logits, labels, ks: Sequence[int] = (1, 5), *, validate: bool = True) -> jax.Array:
    """Top-k accuracy for each k, as CLIP_benchmark's `accuracy`.

    Args:
      logits: `[N, C]` scores.
      labels: `[N]` int class indices in [0, C).
      ks: the k values; each must be <= C.
      validate: check label range and finiteness when concrete.

    Returns:
      `[len(ks)]` float32 accuracies in [0, 1].
    """
    logits, labels = _check_labels(logits, labels, validate)
    ks = tuple(checks.positive_int("k", k) for k in ks)
    if not ks:
        raise ValueError("ks is empty")
    if max(ks) > logits.shape[1]:
        raise ValueError(f"k={max(ks)} is larger than the number of classes {logits.shape[1]}")
    rank = true_class_rank(logits, labels)
    return jnp.stack([jnp.mean((rank < k).astype(jnp.float32)) for k in ks])


def mean_per_class_recall(logits_or_predictions, labels, num_classes: int | None = None, *,
                          validate: bool = True) -> jax.Array:
    """Balanced accuracy: the mean over classes present in `labels` of per-class recall.

    Equals scikit-learn's `balanced_accuracy_score(labels, predictions)` (classes with no
    true samples are left out of the mean).

    Args:
      logits_or_predictions: `[N, C]` logits (argmax is taken, first index on ties) or `[N]`
        int predicted classes.
      labels: `[N]` int true classes.
      num_classes: C; required with predictions, taken from the logits otherwise.
      validate: check label range when concrete.

    Returns:
      scalar float32.
    """
    pred = jnp.asarray(logits_or_predictions)
    if pred.ndim == 2:
        pred, labels = _check_labels(pred, labels, validate)
        num_classes = pred.shape[1]
        pred = jnp.argmax(pred, axis=1)
    else:
        pred = checks.array("predictions", pred, "[N]", dtype="integer")
        labels = checks.array("labels", labels, "[N]", dtype="integer")
        checks.same_len(predictions=pred, labels=labels)
        if num_classes is None:
            raise ValueError("num_classes is required when passing predicted classes instead of logits")
        num_classes = checks.positive_int("num_classes", num_classes)
        checks.index_range("predictions", pred, num_classes, validate=validate)
        checks.index_range("labels", labels, num_classes, validate=validate)
    return _balanced_accuracy(pred, labels, num_classes)


def _balanced_accuracy(pred, labels, num_classes):
    count = jnp.zeros(num_classes, jnp.float32).at[labels].add(1.0)
    hit = jnp.zeros(num_classes, jnp.float32).at[labels].add((pred == labels).astype(jnp.float32))
    present = count > 0
    recall = jnp.where(present, hit / jnp.where(present, count, 1.0), 0.0)
    return jnp.sum(recall) / jnp.sum(present)


def zeroshot_metrics(image_embeddings, labels, weights, *, scale: float = LOGIT_SCALE,
                     validate: bool = True) -> dict[str, jax.Array]:
    """CLIP_benchmark's zero-shot result dict from normalised image embeddings.

    Args:
      image_embeddings: `[N, D]` L2-normalised.
      labels: `[N]` int.
      weights: `[D, C]` classifier.

    Returns:
      `{"acc1", "acc5", "mean_per_class_recall"}` scalars; `acc5` is NaN when C < 5, as in
      CLIP_benchmark.
    """
    logits = zeroshot_logits(image_embeddings, weights, scale=scale, validate=validate)
    num_classes = logits.shape[1]
    ks = (1, 5) if num_classes >= 5 else (1,)
    acc = topk_accuracy(logits, labels, ks, validate=validate)
    return {
        "acc1": acc[0],
        "acc5": acc[1] if num_classes >= 5 else jnp.float32(jnp.nan),
        "mean_per_class_recall": mean_per_class_recall(logits, labels, validate=False),
    }
