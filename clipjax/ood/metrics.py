"""AUROC and FPR at a TPR level (FPR95) for OOD detection, jittable with static shapes.

Inputs are ID-ness scores (higher = more in-distribution, as every score in
`clipjax.ood` returns) for the ID set `[N_in]` and the OOD set `[N_out]`.

AUROC is the same in every convention: the probability that a random ID image
scores above a random OOD image, ties counting one half (equal to
`sklearn.metrics.roc_auc_score(is_id, scores)`).

FPR at `tpr` (0.95 by default) differs between papers. `convention` selects:

* ``"openood"`` -- OpenOOD v1.5 `auc_and_fpr_recall`, also used by AdaNeg:
  OOD is the *positive* class, `fpr, tpr = roc_curve(is_ood, -score)` (sklearn's
  default `drop_intermediate=True`), and FPR95 = `fpr[argmax(tpr >= 0.95)]`: the
  fraction of ID images flagged OOD at the first ROC point that catches 95% of
  the OOD images. No interpolation.
* ``"nearest"`` -- Hendrycks' `fpr_and_fdr_at_recall`, used by the MCM, GL-MCM and
  NegLabel repositories: ID is positive; the distinct-threshold ROC point whose
  ID recall is *nearest* to 0.95 (ties in distance go to the point listed first
  in that code's reversed order, i.e. the higher recall, then the more false
  positives); the value is the fraction of OOD images accepted there.
* ``"interpolated"`` -- CLIPN's `cal_auc_fpr`: ID is positive,
  `fpr, tpr = roc_curve(is_id, score)` and `scipy.interpolate.interp1d(tpr, fpr)(0.95)`,
  which scipy runs as `np.interp`: linear interpolation between the *last* ROC point
  with TPR <= level and the next one (that point's FPR itself when its TPR equals the
  level). (pip `ood-metrics` also uses `np.interp` but pins numpy<2.)

All three are computed on the device from integer counts. The comparisons that
pick a ROC point ("TPR >= level", "nearest to level") are decided on the host in
float64 from `(level, N)`, so the point chosen is the one the numpy references
choose, including their float64 rounding; only the final division (and CLIPN's
interpolation) is float32.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from clipjax import checks

__all__ = ["CONVENTIONS", "auroc", "fpr_at_tpr", "ood_metrics"]

CONVENTIONS = ("openood", "nearest", "interpolated")


def _check_scores(id_scores, ood_scores, validate: bool):
    id_scores = checks.array("id_scores", id_scores, "[N_in]")
    ood_scores = checks.array("ood_scores", ood_scores, "[N_out]")
    checks.finite("id_scores", id_scores, validate=validate)
    checks.finite("ood_scores", ood_scores, validate=validate)
    dtype = jnp.promote_types(id_scores.dtype, ood_scores.dtype)
    return id_scores.astype(dtype), ood_scores.astype(dtype)


def _exact_int_sum(counts, max_count: int):
    """Sum of non-negative int32 `counts` (each <= `max_count`) without int32 overflow or float rounding.

    Blocks small enough that their sums fit in int32 are summed exactly, then the
    block sums are split into 16-bit halves that are summed exactly too; only the
    final combination is rounded to float32.
    """
    n = counts.shape[0]
    block = int(max(1, min(1024, (2**31 - 1) // max(1, max_count))))
    pad = (-n) % block
    blocks = jnp.pad(counts, (0, pad)).reshape(-1, block).sum(axis=1)
    hi = jnp.sum(blocks >> 16)
    lo = jnp.sum(blocks & 0xFFFF)
    return hi.astype(jnp.float32) * 65536.0 + lo.astype(jnp.float32)


@jax.jit
def _auroc(id_scores, ood_scores):
    sorted_ood = jnp.sort(ood_scores)
    below = jnp.searchsorted(sorted_ood, id_scores, side="left")  # OOD strictly below each ID score
    below_or_tied = jnp.searchsorted(sorted_ood, id_scores, side="right")
    twice_wins = _exact_int_sum((below + below_or_tied).astype(jnp.int32), 2 * ood_scores.shape[0])
    return twice_wins / float(2 * id_scores.shape[0] * ood_scores.shape[0])


def auroc(id_scores: jax.Array, ood_scores: jax.Array, *, validate: bool = True) -> jax.Array:
    """Area under the ROC curve, ID vs OOD (ties count 1/2).

    Args:
      id_scores: `[N_in]` ID-ness scores of in-distribution images.
      ood_scores: `[N_out]` scores of out-of-distribution images.
      validate: check concrete inputs for NaN/inf.

    Returns:
      Scalar in [0, 1]; equals `sklearn.metrics.roc_auc_score`.
    """
    id_scores, ood_scores = _check_scores(id_scores, ood_scores, validate)
    return _auroc(id_scores, ood_scores)


def _roc_points(scores, positive):
    """Cumulative counts along the scores sorted in descending order.

    Returns `(tps, fps, is_end)`, each `[N]`: true/false positives after each
    position, and whether the position closes a group of tied scores (a distinct
    ROC point, sklearn's `threshold_idxs`).
    """
    order = jnp.argsort(-scores, stable=True)
    s = scores[order]
    pos = positive[order].astype(jnp.int32)
    tps = jnp.cumsum(pos)
    fps = jnp.arange(1, s.shape[0] + 1, dtype=jnp.int32) - tps
    is_end = jnp.concatenate([s[1:] != s[:-1], jnp.ones((1,), bool)])
    return tps, fps, is_end


def _kept_points(tps, fps, is_end):
    """sklearn `roc_curve(drop_intermediate=True)`: drop distinct points collinear with both neighbours."""
    n = tps.shape[0]
    idx = jnp.arange(n)
    prev_end = jax.lax.cummax(jnp.where(is_end, idx, -1))
    prev_end = jnp.concatenate([jnp.full((1,), -1, prev_end.dtype), prev_end[:-1]])  # strictly before
    next_end = jax.lax.cummin(jnp.where(is_end, idx, n), reverse=True)
    next_end = jnp.concatenate([next_end[1:], jnp.full((1,), n, next_end.dtype)])  # strictly after
    has_both = (prev_end >= 0) & (next_end < n)
    p = jnp.clip(prev_end, 0, n - 1)
    q = jnp.clip(next_end, 0, n - 1)
    corner = ((fps[q] - 2 * fps + fps[p]) != 0) | ((tps[q] - 2 * tps + tps[p]) != 0)
    num_points = jnp.sum(is_end)
    return is_end & (~has_both | corner | (num_points <= 2))


def _min_count(level: float, n: int) -> int:
    """Smallest k in [0, n] with `k / n >= level` in float64, exactly as the numpy references compare."""
    k = min(n, max(0, int(np.ceil(level * n))))
    while k > 0 and (k - 1) / n >= level:
        k -= 1
    while k < n and not k / n >= level:
        k += 1
    return k


def _max_count(level: float, n: int) -> int:
    """Largest k in [0, n] with `k / n <= level` in float64 (0 when none)."""
    k = min(n, max(0, int(np.floor(level * n))))
    while k < n and (k + 1) / n <= level:
        k += 1
    while k > 0 and not k / n <= level:
        k -= 1
    return k


def _distance_rank(level: float, n: int) -> np.ndarray:
    """`[n + 1]` int32 rank of `abs(k / n - level)` in float64 (equal distances share a rank)."""
    dist = np.abs(np.arange(n + 1, dtype=np.float64) / n - level)
    return np.unique(dist, return_inverse=True)[1].astype(np.int32)


def _fpr_openood(id_scores, ood_scores, level, k_min, dist_rank):
    scores = jnp.concatenate([-id_scores, -ood_scores])  # roc_curve(is_ood, -conf)
    is_ood = jnp.concatenate([jnp.zeros(id_scores.shape, bool), jnp.ones(ood_scores.shape, bool)])
    tps, fps, is_end = _roc_points(scores, is_ood)
    kept = _kept_points(tps, fps, is_end)
    first = jnp.argmax(kept & (tps >= k_min))  # first point with tpr >= level
    return fps[first].astype(jnp.float32) / id_scores.shape[0]


def _fpr_nearest(id_scores, ood_scores, level, k_min, dist_rank):
    scores = jnp.concatenate([id_scores, ood_scores])
    is_id = jnp.concatenate([jnp.ones(id_scores.shape, bool), jnp.zeros(ood_scores.shape, bool)])
    tps, fps, is_end = _roc_points(scores, is_id)
    n_id = id_scores.shape[0]
    idx = jnp.arange(scores.shape[0])
    last = jnp.argmax(is_end & (tps == n_id))  # first point with full recall
    candidate = is_end & (idx <= last)
    rank = jnp.where(candidate, dist_rank[tps], jnp.iinfo(jnp.int32).max)
    best = jnp.max(jnp.where(rank == jnp.min(rank), idx, -1))  # reversed order: latest position wins
    return fps[best].astype(jnp.float32) / ood_scores.shape[0]


def _fpr_interpolated(id_scores, ood_scores, level, k_min, dist_rank):
    """`np.interp(level, tpr, fpr)` on sklearn's ROC (what `interp1d(tpr, fpr)(level)` runs).

    With repeated TPR values `np.interp` uses the *last* point whose TPR is <= level, so
    here `k_min` is the largest TP count with `k / n <= level` and `dist_rank[0]` says
    whether `k_min / n == level` exactly (then that point's FPR is returned as is).
    """
    scores = jnp.concatenate([id_scores, ood_scores])
    is_id = jnp.concatenate([jnp.ones(id_scores.shape, bool), jnp.zeros(ood_scores.shape, bool)])
    tps, fps, is_end = _roc_points(scores, is_id)
    kept = _kept_points(tps, fps, is_end)
    idx = jnp.arange(scores.shape[0])
    lo = jnp.max(jnp.where(kept & (tps <= k_min), idx, -1))  # -1: the (0, 0) start of the curve
    hi = jnp.argmax(kept & (tps > k_min))
    safe = jnp.maximum(lo, 0)
    tp_lo = jnp.where(lo >= 0, tps[safe], 0)
    fp_lo = jnp.where(lo >= 0, fps[safe], 0).astype(jnp.float32)
    n_id, n_ood = id_scores.shape[0], ood_scores.shape[0]
    tpr_lo, tpr_hi = tp_lo.astype(jnp.float32) / n_id, tps[hi].astype(jnp.float32) / n_id
    fpr_lo, fpr_hi = fp_lo / n_ood, fps[hi].astype(jnp.float32) / n_ood
    slope = (fpr_hi - fpr_lo) / (tpr_hi - tpr_lo)
    exact = (dist_rank[0] == 1) & (tp_lo == k_min)
    return jnp.where(exact, fpr_lo, slope * (level - tpr_lo) + fpr_lo)


@partial(jax.jit, static_argnames=("convention",))
def _fpr_at_tpr(id_scores, ood_scores, level, k_min, dist_rank, convention):
    fn = {"openood": _fpr_openood, "nearest": _fpr_nearest, "interpolated": _fpr_interpolated}[convention]
    return fn(id_scores, ood_scores, jnp.asarray(level, jnp.float32), k_min, dist_rank)


def fpr_at_tpr(id_scores: jax.Array, ood_scores: jax.Array, tpr: float = 0.95,
               convention: str = "openood", *, validate: bool = True) -> jax.Array:
    """False-positive rate at a true-positive rate `tpr` (FPR95 by default).

    Args:
      id_scores: `[N_in]` ID-ness scores of in-distribution images.
      ood_scores: `[N_out]` scores of out-of-distribution images.
      tpr: the TPR level in (0, 1], a Python float. "TPR >= level" and the distances of
        the "nearest" convention are decided on the host in float64, exactly as the numpy
        references decide them (on the device, float32 `k / n` can round differently).
      convention: "openood" (OOD positive, first ROC point), "nearest" (ID positive,
        nearest recall point; MCM/NegLabel) or "interpolated" (ID positive, linear
        interpolation; CLIPN). See the module docstring.
      validate: check concrete inputs for NaN/inf.

    Returns:
      Scalar FPR in [0, 1] (a fraction, not a percentage).
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    if not isinstance(tpr, (int, float, np.floating, np.integer)) or not 0.0 < float(tpr) <= 1.0:
        raise ValueError(f"tpr must be a number in (0, 1], got {tpr!r}")
    tpr = float(tpr)
    id_scores, ood_scores = _check_scores(id_scores, ood_scores, validate)
    n_pos = ood_scores.shape[0] if convention == "openood" else id_scores.shape[0]
    if convention == "interpolated":
        k_min = _max_count(tpr, n_pos)
        dist_rank = np.array([int(k_min / n_pos == tpr)], np.int32)
    else:
        k_min = _min_count(tpr, n_pos)
        dist_rank = _distance_rank(tpr, n_pos) if convention == "nearest" else np.zeros((1,), np.int32)
    return _fpr_at_tpr(id_scores, ood_scores, tpr, k_min, dist_rank, convention)


def ood_metrics(id_scores, ood_scores, tpr: float = 0.95, convention: str = "openood") -> dict:
    """AUROC and FPR@`tpr` as Python floats (for reports and the command line).

    Returns:
      `{"auroc": float, "fpr": float, "tpr": tpr, "convention": convention,
      "num_id": N_in, "num_ood": N_out}`; AUROC and FPR are fractions in [0, 1].
    """
    id_scores, ood_scores = _check_scores(id_scores, ood_scores, True)
    return {
        "auroc": float(auroc(id_scores, ood_scores, validate=False)),
        "fpr": float(fpr_at_tpr(id_scores, ood_scores, tpr, convention, validate=False)),
        "tpr": float(tpr),
        "convention": convention,
        "num_id": int(id_scores.shape[0]),
        "num_ood": int(ood_scores.shape[0]),
    }
