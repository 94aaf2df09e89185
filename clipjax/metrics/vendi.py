"""Vendi score (Friedman & Dieng 2023) in kernel form and in the d x d dual form.

VS_q(K) = exp(H_q(lambda)), lambda the eigenvalues of K / n with K_ii = 1:
  H_1 = -sum lambda log lambda, H_q = log(sum lambda^q) / (1 - q), H_inf = -log max lambda,
where, as in `vendi_score.vendi.entropy_q`, eigenvalues <= 0 are dropped for finite q
(`where(lambda > 0, ...)`, a static-shape mask) but not for q = inf.

For the linear (cosine) kernel K = X_hat X_hat^T the nonzero spectrum of K / n
equals that of X_hat^T X_hat / n (d x d), so for n > d the dual form costs O(n d^2)
and O(d^2) memory; X_hat^T X_hat is accumulated over row blocks of X so no
normalised copy of X is made. `vendi_score(..., form="auto")` picks the dual when
n > d.

Reference quirk: `vendi_score.vendi.score_X` ignores its `q` (it always uses q = 1);
`score_dual` and `score_K` honour it. Here `q` is always honoured.

Precision: eigenvalues of a float32 kernel carry noise of ~1e-7 * n; in the kernel
form of a low-rank K the many near-zero eigenvalues then bias H_q for q < 1. Prefer
the dual form, or float64 inputs under `jax.enable_x64`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from clipjax import checks

FORMS = ("auto", "kernel", "dual")


def _parse_q(q) -> float:
    if isinstance(q, str):
        if q.lower() != "inf":
            raise ValueError(f"q must be a positive number or 'inf', got {q!r}")
        return math.inf
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not q > 0:
        raise ValueError(f"q must be a positive number or 'inf', got {q!r}")
    return float(q)


def entropy_q(eigenvalues: jax.Array, q=1.0) -> jax.Array:
    """Renyi entropy H_q of a spectrum with the reference's masking.

    Args:
      eigenvalues: `[n]` eigenvalues of K / n (sum ~ 1).
      q: order, a positive float or `"inf"`.

    Returns:
      scalar H_q (natural log).
    """
    q = _parse_q(q)
    lam = jnp.asarray(eigenvalues)
    pos = lam > 0
    safe = jnp.where(pos, lam, 1.0)
    if math.isinf(q):
        return -jnp.log(jnp.max(lam))
    if q == 1.0:
        return -jnp.sum(jnp.where(pos, safe * jnp.log(safe), 0.0))
    return jnp.log(jnp.sum(jnp.where(pos, safe ** q, 0.0))) / (1.0 - q)


def vendi_score_from_kernel(kernel, q=1.0, *, normalize: bool = False, validate: bool = True) -> jax.Array:
    """Vendi score of an `[n, n]` positive semi-definite similarity matrix.

    Args:
      kernel: `[n, n]` symmetric PSD kernel with unit diagonal (or any positive diagonal with
        `normalize=True`, which uses K_ij / sqrt(K_ii K_jj)).
      q: order, a positive float or `"inf"`.
      normalize: rescale to a unit diagonal first (`vendi_score.vendi.normalize_K`).
      validate: check NaN/inf, symmetry and the unit diagonal when concrete.

    Returns:
      scalar VS_q in [1, n] (up to rounding).
    """
    q = _parse_q(q)
    k = checks.array("kernel", kernel, "[n, n]")
    if k.shape[0] != k.shape[1]:
        raise ValueError(f"kernel must be square [n, n], got shape {tuple(k.shape)}")
    if validate and checks.is_concrete(k):
        checks.finite("kernel", k)
        diag = jnp.diagonal(k)
        tol = checks.norm_tolerance(k.dtype)
        if normalize and not bool(jnp.all(diag > 0)):
            i = int(jnp.argmax(diag <= 0))
            raise ValueError(f"kernel has a non-positive diagonal entry (row {i}: {float(diag[i]):.6g}), "
                             "which cannot be normalised")
        if not normalize and not bool(jnp.all(jnp.abs(diag - 1.0) <= tol)):
            raise ValueError(f"kernel must have a unit diagonal (got values in [{float(diag.min()):.6g}, "
                             f"{float(diag.max()):.6g}]); pass normalize=True to rescale it")
        scale = float(jnp.max(jnp.abs(k)))
        if float(jnp.max(jnp.abs(k - k.T))) > tol * max(scale, 1.0):
            raise ValueError("kernel must be symmetric")
    return _score_kernel(k, q, normalize)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _score_kernel(k, q, normalize):
    if normalize:  # a zero diagonal entry (a zero feature vector) keeps its row and column at 0, as in l2_normalize
        diag = jnp.diagonal(k)
        d = jnp.sqrt(jnp.where(diag > 0, diag, 1.0))
        k = k / (d[:, None] * d[None, :])
    lam = jnp.linalg.eigvalsh(k / k.shape[0])
    return jnp.exp(entropy_q(lam, q))


def gram_dual(x, *, normalize: bool = True, block_size: int = 4096, validate: bool = True) -> jax.Array:
    """`X_hat^T X_hat / n`, `[d, d]`, accumulated over row blocks of `[n, d]` (no normalised copy of X).

    With `normalize`, rows are L2-normalised on the fly; `validate` checks a concrete `x` for
    NaN/inf and (with `normalize`) all-zero rows, which otherwise contribute nothing.
    """
    x = checks.array("x", x, "[n, d]")
    checks.values("x", x, nonzero=normalize, validate=validate)
    bs = min(checks.positive_int("block_size", block_size), x.shape[0])
    return _gram_dual(x, normalize, bs)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _gram_dual(x, normalize, bs):
    n, d = x.shape
    n_blocks = math.ceil(n / bs)
    acc_dtype = jnp.promote_types(x.dtype, jnp.float32)

    def body(j, acc):
        start = j * bs
        clamped = jnp.minimum(start, n - bs)  # the last block may overlap the previous one
        blk = jax.lax.dynamic_slice_in_dim(x, clamped, bs, axis=0).astype(acc_dtype)
        weight = ((clamped + jnp.arange(bs)) >= start).astype(acc_dtype)  # 0: row already counted
        if normalize:  # one fused pass: 1/||x|| (0 for zero rows, as checks.l2_normalize) times the overlap mask
            sq = jnp.sum(blk * blk, axis=1)
            weight = weight * jnp.where(sq > 0, jax.lax.rsqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)
        blk = blk * weight[:, None]
        return acc + blk.T @ blk

    gram = jax.lax.fori_loop(0, n_blocks, body, jnp.zeros((d, d), acc_dtype))
    return gram / n


def vendi_score(x, q=1.0, *, form: str = "auto", normalize: bool = True, block_size: int = 4096,
                validate: bool = True) -> jax.Array:
    """Vendi score of `[n, d]` embeddings under the cosine (linear on X_hat) kernel.

    Args:
      x: `[n, d]` embeddings.
      q: order, a positive float (0.5, 1, 2, ...) or `"inf"`.
      form: `"dual"` (eigenvalues of the `[d, d]` X_hat^T X_hat / n), `"kernel"` (of the
        `[n, n]` X_hat X_hat^T / n) or `"auto"` (dual when n > d).
      normalize: L2-normalise rows first (the reference's default). Without it the rows must
        already have unit norm (so K has a unit diagonal).
      block_size: rows per block when accumulating the dual Gram matrix.
      validate: check NaN/inf, zero rows and unit norms when concrete.

    Returns:
      scalar VS_q.
    """
    q = _parse_q(q)
    x = checks.array("x", x, "[n, d]")
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    checks.values("x", x, unit_norm=not normalize, nonzero=normalize, validate=validate,
                  hint=" or pass normalize=True")
    n, d = x.shape
    if form == "kernel" or (form == "auto" and n <= d):
        xn = checks.l2_normalize(x) if normalize else x
        return _score_kernel(xn @ xn.T, q, False)
    bs = min(checks.positive_int("block_size", block_size), n)
    return _score_dual(x, q, normalize, bs)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _score_dual(x, q, normalize, bs):
    lam = jnp.linalg.eigvalsh(_gram_dual(x, normalize, bs))
    return jnp.exp(entropy_q(lam, q))
