"""Zero-shot OOD scores from CLIP embeddings or logits: MSP, max-logit, energy, MCM, GL-MCM.

Every score here is an *ID-ness* score: higher means more in-distribution. That is
the convention of the MCM, GL-MCM, NegLabel and CLIPN repositories (pytorch-ood
returns the negated value as an "outlier score"). Pass the scores of ID and OOD
images to `clipjax.ood.metrics` unchanged.

Definitions (methods.md §8):
  * MSP(l)        = max_k softmax_k(l / T)
  * max-logit(l)  = max_k l_k
  * energy(l)     = T * logsumexp_k(l / T)
  * MCM(x)        = max_k softmax_k(cos(x, t_k) / T), T = 1 in the paper
  * GL-MCM(x)     = MCM(x_global) + lambda * max_{p, k} softmax_k(cos(x_p, t_k) / T)
    with x_p the MaskCLIP patch embeddings (§19), lambda = 0.5 in the paper's
    ImageNet script (its argparse default is 1.0).

The public functions check their inputs with `clipjax.checks`: shapes and dtypes
always (also under `jax.jit`); with `validate=True` (the default) and concrete
inputs also NaN/inf, all-zero rows (every embedding is L2-normalised here, so a
zero row is an error naming the argument and row; with `validate=False` it
normalises to a zero vector, cosine 0) and exact duplicate label rows. The
`_`-less kernels are row-wise, so inputs may be sharded over the batch axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from clipjax import checks

__all__ = [
    "cosine_similarity",
    "energy",
    "gl_mcm",
    "local_mcm",
    "max_logit",
    "mcm",
    "msp",
]


# ----------------------------------------------------------------------------- kernels
def cosine_similarity(image_emb: jax.Array, text_emb: jax.Array, *, validate: bool = True) -> jax.Array:
    """Cosine similarities `[..., K]` between image embeddings `[..., D]` and label embeddings `[K, D]`.

    Both are L2-normalised here, so raw or normalised embeddings give the same result.
    `validate` checks concrete inputs for NaN/inf and all-zero rows (`clipjax.checks`).
    """
    image_emb = jnp.asarray(image_emb)
    text_emb = checks.array("text_emb", text_emb, "[K, D]")
    checks.same_dim(image_emb=image_emb, text_emb=text_emb)
    checks.nonzero_rows("image_emb", image_emb, validate=validate)
    checks.nonzero_rows("text_emb", text_emb, validate=validate)
    return jnp.einsum("...d,kd->...k", checks.l2_normalize(image_emb), checks.l2_normalize(text_emb))


def _max_softmax(logits: jax.Array, temperature) -> jax.Array:
    """max_k softmax_k(logits / T) = exp(max/T - logsumexp(logits/T)), stable for any T."""
    z = logits / temperature
    return jnp.exp(jnp.max(z, axis=-1) - jax.nn.logsumexp(z, axis=-1))


@jax.jit
def _msp(logits, temperature):
    return _max_softmax(logits, temperature)


@jax.jit
def _energy(logits, temperature):
    return temperature * jax.nn.logsumexp(logits / temperature, axis=-1)


@jax.jit
def _mcm(image_emb, text_emb, temperature):
    return _max_softmax(cosine_similarity(image_emb, text_emb, validate=False), temperature)


@jax.jit
def _local_mcm(local_emb, text_emb, temperature):
    per_patch = _max_softmax(cosine_similarity(local_emb, text_emb, validate=False), temperature)  # [B, P]
    return jnp.max(per_patch, axis=-1)


def _check_logits(logits, validate: bool) -> jax.Array:
    logits = checks.array("logits", logits, "[B, K]")
    checks.finite("logits", logits, validate=validate)
    return logits


def msp(logits: jax.Array, temperature: float = 1.0, *, validate: bool = True) -> jax.Array:
    """Maximum softmax probability `max_k softmax_k(logits / T)`.

    Args:
      logits: `[B, K]` class logits (for CLIP, `100 * cos`).
      temperature: T > 0; the logits are divided by it.
      validate: check concrete inputs for NaN/inf.

    Returns:
      `[B]` ID-ness scores in (1/K, 1].
    """
    logits = _check_logits(logits, validate)
    checks.positive_scalar("temperature", temperature)
    return _msp(logits, temperature)


def max_logit(logits: jax.Array, *, validate: bool = True) -> jax.Array:
    """Maximum logit `max_k logits_k`; `logits` is `[B, K]`, returns `[B]`."""
    logits = _check_logits(logits, validate)
    return jnp.max(logits, axis=-1)


def energy(logits: jax.Array, temperature: float = 1.0, *, validate: bool = True) -> jax.Array:
    """Negative free energy `T * logsumexp_k(logits / T)` (higher = more ID).

    Args:
      logits: `[B, K]` class logits.
      temperature: T > 0.

    Returns:
      `[B]` scores; pytorch-ood's `EnergyBased.score` returns the negation.
    """
    logits = _check_logits(logits, validate)
    checks.positive_scalar("temperature", temperature)
    return _energy(logits, temperature)


def _check_embeddings(image_name, image_emb, image_shape, text_emb, validate):
    image_emb = checks.array(image_name, image_emb, image_shape)
    text_emb = checks.array("text_emb", text_emb, "[K, D]")
    checks.same_dim(**{image_name: image_emb, "text_emb": text_emb})
    checks.nonzero_rows(image_name, image_emb, validate=validate)
    checks.nonzero_rows("text_emb", text_emb, validate=validate)
    checks.unique_rows("text_emb", text_emb, validate=validate)
    return image_emb, text_emb


def mcm(image_emb: jax.Array, text_emb: jax.Array, temperature: float = 1.0, *,
        validate: bool = True) -> jax.Array:
    """Maximum Concept Matching: `max_k softmax_k(cos(x, t_k) / T)`.

    Args:
      image_emb: `[B, D]` image embeddings (normalised here).
      text_emb: `[K, D]` ID label embeddings, e.g. of "a photo of a {c}" (normalised here).
      temperature: T > 0 dividing the cosines; the paper uses T = 1. (pytorch-ood 0.4's `MCM`
        also divides; older releases multiplied with a default of 100.)
      validate: check concrete inputs for NaN/inf, all-zero rows and duplicate label rows.

    Returns:
      `[B]` ID-ness scores in (1/K, 1].
    """
    image_emb, text_emb = _check_embeddings("image_emb", image_emb, "[B, D]", text_emb, validate)
    checks.positive_scalar("temperature", temperature)
    return _mcm(image_emb, text_emb, temperature)


def local_mcm(local_emb: jax.Array, text_emb: jax.Array, temperature: float = 1.0, *,
              validate: bool = True) -> jax.Array:
    """L-MCM: `max_{p, k} softmax_k(cos(x_p, t_k) / T)` over dense patch embeddings.

    Args:
      local_emb: `[B, P, D]` patch embeddings (MaskCLIP path, `model.encode_dense`).
      text_emb: `[K, D]` ID label embeddings.

    Returns:
      `[B]` scores.
    """
    local_emb, text_emb = _check_embeddings("local_emb", local_emb, "[B, P, D]", text_emb, validate)
    checks.positive_scalar("temperature", temperature)
    return _local_mcm(local_emb, text_emb, temperature)


def gl_mcm(global_emb: jax.Array, local_emb: jax.Array, text_emb: jax.Array, temperature: float = 1.0,
           lambda_local: float = 0.5, *, validate: bool = True) -> jax.Array:
    """GL-MCM = MCM(global) + lambda_local * L-MCM(patches) (Miyai et al.).

    Args:
      global_emb: `[B, D]` image embeddings.
      local_emb: `[B, P, D]` patch embeddings from the same images (MaskCLIP, methods.md §19).
      text_emb: `[K, D]` ID label embeddings.
      temperature: T > 0 for both softmaxes (the paper uses 1).
      lambda_local: weight of the local term (0.5 in the paper's ImageNet script).

    Returns:
      `[B]` scores in (1/K * (1 + lambda), 1 + lambda].
    """
    global_emb, text_emb = _check_embeddings("global_emb", global_emb, "[B, D]", text_emb, validate)
    local_emb = checks.array("local_emb", local_emb, "[B, P, D]")
    checks.same_dim(global_emb=global_emb, local_emb=local_emb)
    checks.same_len(global_emb=global_emb, local_emb=local_emb)  # patches of the same images
    checks.nonzero_rows("local_emb", local_emb, validate=validate)
    checks.positive_scalar("temperature", temperature)
    return _gl_mcm(global_emb, local_emb, text_emb, temperature, lambda_local)


@jax.jit
def _gl_mcm(global_emb, local_emb, text_emb, temperature, lambda_local):
    return _mcm(global_emb, text_emb, temperature) + lambda_local * _local_mcm(local_emb, text_emb, temperature)
