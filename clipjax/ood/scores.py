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

The public functions check shapes and dtypes from static information (so they
also work under `jax.jit`), and with `validate=True` (the default) they check
concrete inputs for NaN/inf and exact duplicate label rows; that check is
skipped for tracers. The `_`-less kernels are row-wise, so inputs may be sharded
over the batch axis.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "cosine_similarity",
    "energy",
    "gl_mcm",
    "l2_normalize",
    "local_mcm",
    "max_logit",
    "mcm",
    "msp",
]


# ----------------------------------------------------------------------------- validation
def is_concrete(*xs) -> bool:
    """True when no argument is a jax tracer, so its values can be inspected."""
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def check_array(name: str, x, ndim: int, *, floating: bool = True, min_rows: int = 1) -> jax.Array:
    """Return `x` as a jax array after checking its rank, dtype and that no axis is empty.

    Raises:
      TypeError: `x` is not a floating-point array (when `floating`).
      ValueError: wrong rank, or an empty axis (for example an empty label list).
    """
    if x is None:
        raise ValueError(f"{name} is None; expected an array of rank {ndim}")
    x = jnp.asarray(x)
    if x.ndim != ndim:
        raise ValueError(f"{name} must have rank {ndim}, got shape {tuple(x.shape)}")
    if floating and not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    if ndim and x.shape[0] < min_rows:
        raise ValueError(f"{name} is empty: shape {tuple(x.shape)}, at least {min_rows} row(s) needed")
    if any(d == 0 for d in x.shape):
        raise ValueError(f"{name} has an empty axis: shape {tuple(x.shape)}")
    return x


def check_same_dim(names: Sequence[str], *xs) -> None:
    """All arrays share their last (embedding) dimension."""
    dims = [x.shape[-1] for x in xs]
    if len(set(dims)) != 1:
        got = ", ".join(f"{n} {tuple(x.shape)}" for n, x in zip(names, xs))
        raise ValueError(f"embedding dimensions differ ({got}); the last axes must match")


def check_finite(name: str, x) -> None:
    """Raise if a concrete array holds NaN or inf; does nothing for tracers."""
    if not is_concrete(x):
        return
    finite = np.asarray(jnp.isfinite(x))
    if not finite.all():
        bad = np.argwhere(~finite)
        raise ValueError(
            f"{name} holds {len(bad)} NaN/inf value(s) (first at index {tuple(int(i) for i in bad[0])}); "
            "scores need finite features")


def check_unique_rows(name: str, x) -> None:
    """Raise if a concrete [K, D] label-embedding matrix has exactly repeated rows (duplicate labels)."""
    if not is_concrete(x):
        return
    rows = np.asarray(x)
    _, first, counts = np.unique(rows, axis=0, return_index=True, return_counts=True)
    if (counts > 1).any():
        dup = int(first[np.argmax(counts > 1)])
        same = np.flatnonzero((rows == rows[dup]).all(axis=1)).tolist()
        raise ValueError(f"{name} has duplicate label embeddings: rows {same[:5]} are identical; "
                         "remove duplicate class names or prompts")


def check_temperature(name: str, t) -> None:
    """A temperature must be a positive finite Python/NumPy scalar (or a traced scalar)."""
    if is_concrete(t):
        t = np.asarray(t)
        if t.ndim != 0 or not np.isfinite(t) or t <= 0:
            raise ValueError(f"{name} must be a positive finite scalar, got {t!r}")


# ----------------------------------------------------------------------------- kernels
def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """Divide by the L2 norm along `axis` (norm clamped at `eps`, like `torch.nn.functional.normalize`)."""
    x = jnp.asarray(x)
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
    return x / jnp.maximum(norm, eps)


def cosine_similarity(image_emb: jax.Array, text_emb: jax.Array) -> jax.Array:
    """Cosine similarities `[..., K]` between image embeddings `[..., D]` and label embeddings `[K, D]`.

    Both are L2-normalised here, so raw or normalised embeddings give the same result.
    """
    return jnp.einsum("...d,kd->...k", l2_normalize(image_emb), l2_normalize(text_emb))


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
    return _max_softmax(cosine_similarity(image_emb, text_emb), temperature)


@jax.jit
def _local_mcm(local_emb, text_emb, temperature):
    per_patch = _max_softmax(cosine_similarity(local_emb, text_emb), temperature)  # [B, P]
    return jnp.max(per_patch, axis=-1)


def _check_logits(logits, validate: bool) -> jax.Array:
    logits = check_array("logits", logits, 2)
    if validate:
        check_finite("logits", logits)
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
    check_temperature("temperature", temperature)
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
    check_temperature("temperature", temperature)
    return _energy(logits, temperature)


def _check_embeddings(image_name, image_emb, image_ndim, text_emb, validate):
    image_emb = check_array(image_name, image_emb, image_ndim)
    text_emb = check_array("text_emb", text_emb, 2)
    check_same_dim((image_name, "text_emb"), image_emb, text_emb)
    if validate:
        check_finite(image_name, image_emb)
        check_finite("text_emb", text_emb)
        check_unique_rows("text_emb", text_emb)
    return image_emb, text_emb


def mcm(image_emb: jax.Array, text_emb: jax.Array, temperature: float = 1.0, *,
        validate: bool = True) -> jax.Array:
    """Maximum Concept Matching: `max_k softmax_k(cos(x, t_k) / T)`.

    Args:
      image_emb: `[B, D]` image embeddings (normalised here).
      text_emb: `[K, D]` ID label embeddings, e.g. of "a photo of a {c}" (normalised here).
      temperature: T > 0 dividing the cosines; the paper uses T = 1. (pytorch-ood 0.4's `MCM`
        also divides; older releases multiplied with a default of 100.)
      validate: check concrete inputs for NaN/inf and duplicate label rows.

    Returns:
      `[B]` ID-ness scores in (1/K, 1].
    """
    image_emb, text_emb = _check_embeddings("image_emb", image_emb, 2, text_emb, validate)
    check_temperature("temperature", temperature)
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
    local_emb, text_emb = _check_embeddings("local_emb", local_emb, 3, text_emb, validate)
    check_temperature("temperature", temperature)
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
    global_emb, text_emb = _check_embeddings("global_emb", global_emb, 2, text_emb, validate)
    local_emb = check_array("local_emb", local_emb, 3)
    check_same_dim(("global_emb", "local_emb"), global_emb, local_emb)
    if local_emb.shape[0] != global_emb.shape[0]:
        raise ValueError(f"global_emb has {global_emb.shape[0]} images but local_emb has "
                         f"{local_emb.shape[0]}; they must come from the same images")
    if validate:
        check_finite("local_emb", local_emb)
    check_temperature("temperature", temperature)
    return _gl_mcm(global_emb, local_emb, text_emb, temperature, lambda_local)


@jax.jit
def _gl_mcm(global_emb, local_emb, text_emb, temperature, lambda_local):
    return _mcm(global_emb, text_emb, temperature) + lambda_local * _local_mcm(local_emb, text_emb, temperature)
