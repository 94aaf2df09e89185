"""Calibration of classifier logits and the GREAT Score, as pure functions of logits.

Calibration (Tu, Deng & Gedeon, "A Closer Look at the Robustness of Contrastive Language-Image
Pre-Training", TPAMI 2025, calibration axis): the logit-only measures are the expected calibration
error and the negative log-likelihood, each before and after temperature scaling.

- `expected_calibration_error` is the top-label ECE with equal-width bins, computed as torchmetrics'
  `MulticlassCalibrationError(num_classes=C, n_bins=15, norm='l1')` does
  (`torchmetrics/functional/classification/calibration_error.py`: `_multiclass_calibration_error_update`,
  `_binning_bucketize`, `_ce_compute`):
    p = softmax(logits); confidence = max_k p_k, prediction = argmax_k p_k (first index on ties),
    both cast to float32; edges = torch.linspace(0, 1, n_bins + 1) in float32; a sample goes to bin
    j = #{edges <= confidence} - 1 (`torch.bucketize(..., right=True) - 1`), so a confidence of
    exactly 1.0 lands in an extra bin n_bins of its own; ECE = sum_j |acc_j - conf_j| * n_j / N.
  torchmetrics applies the softmax only when some input lies outside [0, 1]; this function always
  treats its input as logits. The float32 edges are `round_f32(0 + s * k)` for k < (n_bins + 1) // 2
  and `round_f32(1 - s * (n_bins - k))` above, with s = float32(1 / n_bins) and the product exact
  (single rounding), which is what torch's CPU linspace kernel gives on x86-64 builds (it uses a
  fused multiply-add; checked equal for n_bins <= 399 with torch 2.14).
- `negative_log_likelihood` is the mean cross-entropy, `torch.nn.functional.cross_entropy`.
- `fit_temperature` minimises NLL(logits / T) over u = log T in [log t_min, log t_max]. With
  beta = 1 / T, NLL is convex in beta (a mean of logsumexp of linear functions minus a linear one), so
  dNLL/dbeta = mean_i(E_{softmax(beta l_i)}[l_i] - l_iy) is non-decreasing in beta and NLL is unimodal
  in u. The minimiser is found by bisection on the sign of that derivative: a fixed number of halvings
  (`lax.fori_loop`, deterministic, jittable), no step sizes to tune. When the optimum lies outside the
  bracket, the nearer end is returned; when the derivative is zero everywhere (every row constant),
  `t_min` is returned.

GREAT Score (Li, Chen & Ho, NeurIPS 2024): g(x) = sqrt(pi / 2) * max(p_y - max_{k != y} p_k, 0) with
p = softmax(logits / T), a certified L2 robustness lower bound from Gaussian smoothing; GREAT = mean g.
The paper computes it on generated samples x = G(z); with CLIP the logits are 100 * cos and T is
the user's calibration (our derivation, see `robustness.md` item 9).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from clipjax import checks

__all__ = [
    "calibration_report",
    "expected_calibration_error",
    "fit_temperature",
    "great_score",
    "negative_log_likelihood",
]

N_BINS = 15
BISECTION_STEPS = 64
SQRT_HALF_PI = math.sqrt(math.pi / 2.0)


def _check(logits, labels, validate: bool):
    """Shape, dtype, range and finiteness checks shared by every function here."""
    x = checks.array("logits", logits, "[N, C]")
    y = checks.array("labels", labels, "[N]", dtype="integer")
    checks.same_len(logits=x, labels=y)
    if x.shape[1] < 2:
        raise ValueError(f"logits must have at least 2 classes (shape [N, C] with C >= 2), got shape {x.shape}")
    checks.index_range("labels", y, x.shape[1], validate=validate)
    checks.finite("logits", x, validate=validate)
    return x, y


def _float(x):
    """Logits in a float dtype of at least 32 bits (bf16/fp16 logits are promoted)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


@functools.lru_cache(maxsize=64)
def bin_edges(n_bins: int) -> np.ndarray:
    """float32 `[n_bins + 1]` edges equal to torch's CPU `torch.linspace(0, 1, n_bins + 1)` (see module doc)."""
    step = np.float64(np.float32(1.0) / np.float32(n_bins))
    k = np.arange(n_bins + 1, dtype=np.float64)
    low = step * k  # exact in float64: a float32 times a small integer
    high = 1.0 - step * (n_bins - k)
    return np.where(k < (n_bins + 1) // 2, low, high).astype(np.float32)


@functools.partial(jax.jit, static_argnames=("n_bins",))
def _ece(logits, labels, n_bins):
    probs = jax.nn.softmax(_float(logits), axis=-1)
    confidence = jnp.max(probs, axis=-1).astype(jnp.float32)
    correct = (jnp.argmax(probs, axis=-1) == labels).astype(jnp.float32)
    edges = jnp.asarray(bin_edges(n_bins))
    index = jnp.searchsorted(edges, confidence, side="right") - 1  # torch.bucketize(right=True) - 1
    count = jax.ops.segment_sum(jnp.ones_like(confidence), index, num_segments=n_bins + 1)
    conf_sum = jax.ops.segment_sum(confidence, index, num_segments=n_bins + 1)
    acc_sum = jax.ops.segment_sum(correct, index, num_segments=n_bins + 1)
    safe = jnp.where(count > 0, count, 1.0)
    gap = jnp.abs(acc_sum / safe - conf_sum / safe)
    return jnp.sum(gap * count) / confidence.shape[0]


def expected_calibration_error(logits, labels, n_bins: int = N_BINS, *, validate: bool = True) -> jax.Array:
    """Top-label expected calibration error (L1, equal-width bins), as torchmetrics computes it.

    Args:
      logits: `[N, C]` unnormalised class scores (softmax is always applied).
      labels: `[N]` integer true classes in `[0, C)`.
      n_bins: number of equal-width confidence bins on [0, 1] (plus torchmetrics' extra bin for a
        confidence of exactly 1.0).
      validate: check label range and finiteness when concrete.

    Returns:
      float32 scalar in [0, 1].
    """
    n_bins = checks.positive_int("n_bins", n_bins)
    x, y = _check(logits, labels, validate)
    return _ece(x, y, n_bins)


@jax.jit
def _nll(logits, labels):
    logp = jax.nn.log_softmax(_float(logits), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1))


def negative_log_likelihood(logits, labels, *, validate: bool = True) -> jax.Array:
    """Mean cross-entropy -mean_i log softmax(logits_i)[y_i] (nats), like `F.cross_entropy`.

    Args:
      logits: `[N, C]` unnormalised class scores.
      labels: `[N]` integer true classes in `[0, C)`.
      validate: check label range and finiteness when concrete.

    Returns:
      scalar (float32, or float64 for float64 logits).
    """
    x, y = _check(logits, labels, validate)
    return _nll(x, y)


def _nll_slope(logits, labels, beta):
    """dNLL(beta * logits)/dbeta = mean_i (E_p[l_i] - l_iy), p = softmax(beta l_i); non-decreasing in beta."""
    probs = jax.nn.softmax(beta * logits, axis=-1)
    expected = jnp.sum(probs * logits, axis=-1)
    true = jnp.take_along_axis(logits, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
    return jnp.mean(expected - true)


@functools.partial(jax.jit, static_argnames=("steps",))
def _fit_temperature(logits, labels, log_t_min, log_t_max, steps):
    logits = _float(logits)
    dtype = logits.dtype

    def halve(_, bracket):
        lo, hi = bracket
        mid = 0.5 * (lo + hi)
        # slope > 0: beta = exp(-mid) is past the optimum, so T must grow (u = log T moves up)
        up = _nll_slope(logits, labels, jnp.exp(-mid)) > 0
        return jnp.where(up, mid, lo), jnp.where(up, hi, mid)

    lo, hi = jax.lax.fori_loop(0, steps, halve, (jnp.asarray(log_t_min, dtype), jnp.asarray(log_t_max, dtype)))
    return jnp.exp(0.5 * (lo + hi))


def fit_temperature(logits, labels, *, t_min: float = 1e-3, t_max: float = 1e3, steps: int = BISECTION_STEPS,
                    validate: bool = True) -> jax.Array:
    """The temperature T minimising NLL(logits / T) (temperature scaling, Guo et al. 2017).

    Bisection on the sign of dNLL/dlogT over [log t_min, log t_max] (see the module docstring): the
    bracket halves `steps` times, far below the dtype's resolution for the default 64.

    Args:
      logits: `[N, C]` unnormalised class scores of a held-out set.
      labels: `[N]` integer true classes in `[0, C)`.
      t_min: smallest temperature searched (> 0).
      t_max: largest temperature searched (> t_min).
      steps: bisection halvings.
      validate: check label range and finiteness when concrete.

    Returns:
      scalar T > 0 (float32, or float64 for float64 logits); divide logits by it.
    """
    x, y = _check(logits, labels, validate)
    checks.positive_scalar("t_min", t_min)
    checks.positive_scalar("t_max", t_max)
    if not t_max > t_min:
        raise ValueError(f"t_max must be larger than t_min, got t_min={t_min!r}, t_max={t_max!r}")
    steps = checks.positive_int("steps", steps)
    return _fit_temperature(x, y, math.log(t_min), math.log(t_max), steps)


def calibration_report(logits, labels, n_bins: int = N_BINS, *, validate: bool = True, **fit_kwargs
                       ) -> dict[str, jax.Array]:
    """ECE and NLL before and after temperature scaling, plus top-1 accuracy (unchanged by T).

    The temperature is fitted on the same logits (`fit_temperature(logits, labels, **fit_kwargs)`);
    to fit on a held-out split, call `fit_temperature` there and pass `logits / T` to the metrics.

    Args:
      logits: `[N, C]` unnormalised class scores.
      labels: `[N]` integer true classes in `[0, C)`.
      n_bins: ECE bins.
      validate: check label range and finiteness when concrete.
      **fit_kwargs: `t_min`, `t_max`, `steps` of `fit_temperature`.

    Returns:
      dict with scalars "accuracy", "ece", "nll", "temperature", "ece_scaled", "nll_scaled".
    """
    x, y = _check(logits, labels, validate)
    temperature = fit_temperature(x, y, validate=False, **fit_kwargs)
    scaled = _float(x) / temperature
    return {
        "accuracy": jnp.mean((jnp.argmax(x, axis=-1) == y).astype(jnp.float32)),
        "ece": expected_calibration_error(x, y, n_bins, validate=False),
        "nll": _nll(x, y),
        "temperature": temperature,
        "ece_scaled": expected_calibration_error(scaled, y, n_bins, validate=False),
        "nll_scaled": _nll(scaled, y),
    }


@jax.jit
def _great(logits, labels, temperature):
    probs = jax.nn.softmax(_float(logits) / temperature, axis=-1)
    onehot = jax.nn.one_hot(labels, logits.shape[1], dtype=bool)
    p_true = jnp.sum(jnp.where(onehot, probs, 0.0), axis=-1)
    p_other = jnp.max(jnp.where(onehot, -jnp.inf, probs), axis=-1)
    g = SQRT_HALF_PI * jnp.maximum(p_true - p_other, 0.0)
    return jnp.mean(g), g


def great_score(logits, labels, *, temperature=1.0, validate: bool = True) -> tuple[jax.Array, jax.Array]:
    """GREAT Score: the mean of g = sqrt(pi/2) * max(p_y - max_{k != y} p_k, 0), p = softmax(logits / T).

    Args:
      logits: `[N, C]` class scores (for CLIP, 100 * cos) of (generated) samples, C >= 2.
      labels: `[N]` integer true classes in `[0, C)`.
      temperature: T > 0, a Python number or a scalar array (may be traced).
      validate: check label range and finiteness when concrete.

    Returns:
      `(mean, g)`: the GREAT Score (scalar) and the per-sample certified L2 lower bounds `[N]`, each in
      [0, sqrt(pi / 2)]; misclassified samples score 0.
    """
    x, y = _check(logits, labels, validate)
    checks.positive_scalar("temperature", temperature)
    checks.scalar("temperature", temperature)  # type and size checks
    t = jnp.reshape(jnp.asarray(temperature), ()).astype(_float(x).dtype)
    return _great(x, y, t)
