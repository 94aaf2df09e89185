"""Schur complement entropy (SCE, "Dissecting CLIP" / Scendi) with random Fourier features.

Reference: `aziksh-ospanov/scendi-score:scendi/metric/algorithm_utils.py`
(`rff_schur_complement`, `cov_rff2`, `schur_vendi_from_eigs`, `rff_sce_from_feats`);
CLIP-DISSECTION's `SCE/metric/algorithm_utils.py` has the same math.

With paired raw (unnormalised) embeddings x = text, y = image, one shared
omega `[d, D]` ~ N(0, I / sigma^2) and phi(v) = [cos(v omega), sin(v omega)] / sqrt(D)
(`[2D]`, unit norm), C_ab = Phi_a^T Phi_b / n and P = pinv(C_xx + 1e-12 I):
  text part   Lambda_txt = C_xy^T P C_xy,
  image part  Lambda_img = C_yy - Lambda_txt  (the Schur complement; the SCE score).
Each is scored as f(L) = exp(-sum_i l_i log(l_i / sum_j l_j)) over its 2D eigenvalues
clamped to >= 1e-10. This is deliberately the reference's formula: the weights are
not renormalised, so f = exp(a H(l / a)) with a = trace, not a plain Vendi score.

The pinv cutoff decides the result when the prompts nearly span the feature space,
and library defaults differ (torch: eps * max(m, n) of the dtype; jnp: 10x that;
numpy: 1e-15), so it is an explicit argument: singular values <= pinv_rtol * max
are dropped. The default, `float32 eps * 2D`, is torch's default for the
reference's float32 run.

Two equivalent algorithms: "primal" builds the `[2D, 2D]` covariances (blocked over
n); "dual" works with the `[n, n]` Gram matrices K_a = Phi_a Phi_a^T / n, writing
Lambda_txt ~ W^1/2 U^T K_y U W^1/2 and Lambda_img ~ M^1/2 K_y M^1/2 with
K_x = U S U^T, w = s / (s + 1e-12) on kept s and M = I - U W U^T; the 2D - n
structurally zero eigenvalues of the primal form are added back as clamped 1e-10
terms, so both give the reference's number. "auto" picks dual when n < 2D.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from clipjax import checks

SIGMA = 3.5
NUM_FEATURES = 2500
PINV_EPS = 1e-12
EIG_CLAMP = 1e-10
FORMS = ("auto", "primal", "dual")


class SCEResult(NamedTuple):
    """`image`: Schur complement score (image diversity not explained by the prompts, the SCE);
    `text`: score of the prompt-explained part (text prompt diversity)."""

    image: jax.Array
    text: jax.Array


def rff_omega(key: jax.Array, dim: int, num_features: int = NUM_FEATURES, sigma: float = SIGMA,
              dtype=jnp.float32) -> jax.Array:
    """Random Fourier frequencies `[dim, num_features]` ~ N(0, 1 / sigma^2) for a Gaussian kernel."""
    dim = checks.positive_int("dim", dim)
    num_features = checks.positive_int("num_features", num_features)
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    return jax.random.normal(key, (dim, num_features), dtype) / sigma


def rff_features(x: jax.Array, omega: jax.Array) -> jax.Array:
    """phi(x) = [cos(x omega), sin(x omega)] / sqrt(D): `[n, d] x [d, D] -> [n, 2D]`."""
    proj = x @ omega
    return jnp.concatenate([jnp.cos(proj), jnp.sin(proj)], axis=-1) / np.sqrt(omega.shape[1])


def schur_vendi(eigenvalues: jax.Array, extra_zeros: int = 0) -> jax.Array:
    """The reference's `schur_vendi_from_eigs`: exp(-sum l log(l / sum l)) with l clamped to 1e-10.

    Args:
      eigenvalues: `[m]` eigenvalues.
      extra_zeros: further eigenvalues known to be zero (each clamped to 1e-10), so a dual-form
        spectrum of size m scores like the primal spectrum of size m + extra_zeros.
    """
    lam = jnp.maximum(eigenvalues, EIG_CLAMP)
    total = jnp.sum(lam) + extra_zeros * EIG_CLAMP
    ent = -jnp.sum(lam * jnp.log(lam / total)) - extra_zeros * EIG_CLAMP * jnp.log(EIG_CLAMP / total)
    return jnp.exp(ent)


def _pinv_weights(eigs, rtol):
    """Eigenvalues s of C_xx (or K_x / n) -> s / (s + eps) where pinv keeps s + eps, else 0."""
    mu = eigs + PINV_EPS
    keep = jnp.abs(mu) > rtol * jnp.max(jnp.abs(mu))
    return keep, jnp.where(keep, 1.0 / jnp.where(keep, mu, 1.0), 0.0)


@functools.partial(jax.jit, static_argnums=(4,))
def _sce_primal(x, y, omega, rtol, bs):
    n, feat = x.shape[0], 2 * omega.shape[1]
    n_blocks = -(-n // bs)

    def body(j, acc):
        start = j * bs
        clamped = jnp.minimum(start, n - bs)
        keep = ((clamped + jnp.arange(bs)) >= start)[:, None]
        px = jnp.where(keep, rff_features(jax.lax.dynamic_slice_in_dim(x, clamped, bs), omega), 0.0)
        py = jnp.where(keep, rff_features(jax.lax.dynamic_slice_in_dim(y, clamped, bs), omega), 0.0)
        cxx, cxy, cyy = acc
        return cxx + px.T @ px, cxy + px.T @ py, cyy + py.T @ py

    zeros = jnp.zeros((feat, feat), x.dtype)
    cxx, cxy, cyy = (c / n for c in jax.lax.fori_loop(0, n_blocks, body, (zeros, zeros, zeros)))
    eigs, vecs = jnp.linalg.eigh(cxx)
    _, inv = _pinv_weights(eigs, rtol)
    proj = cxy.T @ vecs  # [2D, 2D]
    text = (proj * inv[None, :]) @ proj.T
    image = cyy - text
    return (schur_vendi(jnp.linalg.eigvalsh(image)), schur_vendi(jnp.linalg.eigvalsh(text)))


@jax.jit
def _sce_dual(x, y, omega, rtol):
    n, feat = x.shape[0], 2 * omega.shape[1]
    px, py = rff_features(x, omega), rff_features(y, omega)
    kx, ky = px @ px.T / n, py @ py.T / n
    s, u = jnp.linalg.eigh(kx)
    keep, inv = _pinv_weights(s, rtol)
    w = jnp.where(keep, s * inv, 0.0)
    kyu = u.T @ ky @ u  # K_y in the eigenbasis of K_x
    sw = jnp.sqrt(jnp.clip(w, 0.0, None))
    sm = jnp.sqrt(jnp.clip(1.0 - w, 0.0, None))
    text = sw[:, None] * kyu * sw[None, :]
    image = sm[:, None] * kyu * sm[None, :]
    extra = feat - n
    return (schur_vendi(jnp.linalg.eigvalsh(image), extra), schur_vendi(jnp.linalg.eigvalsh(text), extra))


def sce_score(text_embeddings, image_embeddings, omega, *, pinv_rtol: float | None = None, form: str = "auto",
              block_size: int = 4096, validate: bool = True) -> SCEResult:
    """Schur complement entropy scores of paired text and image embeddings.

    Args:
      text_embeddings: `[n, d]` raw (unnormalised) text embeddings x, one per image (prompts
        repeat across images).
      image_embeddings: `[n, d]` raw image embeddings y, paired with the texts.
      omega: `[d, D]` random Fourier frequencies (`rff_omega`; the reference uses D = 2500,
        sigma = 3.5), shared by both modalities.
      pinv_rtol: relative singular-value cutoff of pinv(C_xx + 1e-12 I); None means
        `finfo(float32).eps * 2D`, torch's default for the reference's float32 run.
      form: "primal" (`[2D, 2D]` covariances), "dual" (`[n, n]` Gram matrices) or "auto"
        (dual when n < 2D).
      block_size: rows per block when accumulating the primal covariances.
      validate: check NaN/inf when concrete.

    Returns:
      `SCEResult(image, text)`: `image` is the SCE (Scendi) score, `text` the prompt part.
    """
    x = checks.array("text_embeddings", text_embeddings, "[n, d]")
    y = checks.array("image_embeddings", image_embeddings, "[n, d]")
    checks.same_shape("[n, d]", text_embeddings=x, image_embeddings=y)
    w = checks.array("omega", omega, "[d, D]", sizes={"d": x.shape[1]})
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    feat = 2 * w.shape[1]
    rtol = float(np.finfo(np.float32).eps * feat) if pinv_rtol is None else float(pinv_rtol)
    if not 0 <= rtol < 1:
        raise ValueError(f"pinv_rtol must be in [0, 1), got {pinv_rtol}")
    for name, v in (("text_embeddings", x), ("image_embeddings", y), ("omega", w)):
        checks.finite(name, v, validate=validate)
    dtype = jnp.result_type(x.dtype, y.dtype, w.dtype)
    x, y, w = x.astype(dtype), y.astype(dtype), w.astype(dtype)
    rtol = jnp.asarray(rtol, dtype)
    if form == "dual" or (form == "auto" and x.shape[0] < feat):
        return SCEResult(*_sce_dual(x, y, w, rtol))
    bs = min(checks.positive_int("block_size", block_size), x.shape[0])
    return SCEResult(*_sce_primal(x, y, w, rtol, bs))
