"""Test-time counterattacks (TTC; Xing et al., CVPR 2025): a training-free defence of CLIP's image tower.

Reference: `Sxing2/CLIP-Test-time-Counterattacks:code/test_time_counterattack.py`
(`tau_thres_weighted_counterattacks`, `compute_tau`); robustness.md item 3. For an image x in
[0, 1] (possibly adversarial) and the raw (unnormalised) image embedding f:

1. Noise: delta_0 ~ U(-eps, eps), clipped to [-x, 1 - x].
2. False stability: tau = ||f(x + delta_0) - f(x)|| / ||f(x)|| per example. A small tau means the
   image is "falsely stable" (adversarial images are), so it is counterattacked.
3. Counterattack, k = 1..N: delta_k = clip(clip(delta_{k-1} + alpha sign(grad), -eps, eps), -x, 1 - x),
   with the gradient of ||f(x + delta) - f(x)||^2. It pushes the embedding away from the embedding
   of the input itself (not of a clean image).
4. Output: x + sum_{k=0..N} softmax(beta k)_k delta_k where tau < tau_thres, else x + delta_0 (the
   noise is kept: the defended image is never x itself).

Defaults are the official ones (`TTC.sh`, argparse): eps = 4/255, alpha = 1/255, N = 2, beta = 2,
tau_thres = 0.2, giving step weights [0.0159, 0.1173, 0.8668]. The decision is per example with
`jnp.where` (no Python branch on values): every example is counterattacked and the mask picks the
result, as the official code does.

Victims other than the original CLIP (adversarially fine-tuned towers): the official code
counterattacks the victim's tower but computes tau with the *original* CLIP tower
(`compute_tau(clip_visual, ...)`). Pass the victim as `embed_fn` and the original tower as
`tau_embed_fn`; with `tau_embed_fn=None` tau comes from `embed_fn` itself (the official
behaviour for the original CLIP, which reuses the first counterattack forward pass).

Preprocessing belongs to `embed_fn`: it receives pixels in [0, 1] and must resize (the official
code resizes bicubically to 224 px) and apply the CLIP mean/std itself, so eps is measured at the
input resolution, as in the reference.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from clipjax import checks
from clipjax.robust.attacks import check_images

__all__ = ["counterattack_weights", "tau_thresholded_counterattack"]

EmbedFn = Callable[[jax.Array], jax.Array]


def counterattack_weights(steps: int = 2, beta: float = 2.0) -> np.ndarray:
    """The weights softmax(beta * k), k = 0..steps, of the stored perturbations (float64 numpy).

    The official code writes them as `exp(beta * k) / sum_j exp(beta * j)`; with the defaults
    (2 steps, beta = 2) they are [0.0159, 0.1173, 0.8668].
    """
    steps = _non_negative_int("steps", steps)
    z = float(beta) * np.arange(steps + 1, dtype=np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def _non_negative_int(name: str, value) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a non-negative integer, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _python_float(name: str, value, lo: float | None = None, hi: float | None = None,
                  what: str = "a finite number") -> float:
    """A hyper-parameter given as a Python/numpy number (static under jit), in [lo, hi]."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a Python number (a static hyper-parameter), got {type(value).__name__}")
    v = float(value)
    if not np.isfinite(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return v


def check_pixels_and_noise(x, delta0, eps: float, validate: bool, names=("x", "delta0")):
    """Shared input checks of the pixel-space attacks: `x` `[B, H, W, C]` in [0, 1], and an injected
    `delta0` of the same shape with |delta0| <= eps. Returns `(x, delta0)` as arrays (delta0 may be None)."""
    x = check_images(x, validate=validate, name=names[0])
    if delta0 is None:
        return x, None
    delta0 = checks.array(names[1], delta0, "[B, H, W, C]")
    checks.same_shape("[B, H, W, C]", **{names[0]: x, names[1]: delta0})
    if validate and checks.is_concrete(delta0):
        checks.finite(names[1], delta0)
        with jax.ensure_compile_time_eval():
            worst = float(jnp.max(jnp.abs(delta0)))
        if worst > eps * (1 + 1e-6) + 1e-12:
            raise ValueError(f"{names[1]} must lie in [-eps, eps] = [-{eps:.6g}, {eps:.6g}], "
                             f"got max |{names[1]}| = {worst:.6g}")
    return x, delta0.astype(x.dtype)


def _check_embedding(name: str, emb, batch: int) -> jax.Array:
    emb = checks.array(name, emb, "[B, E]")
    if emb.shape[0] != batch:
        raise ValueError(f"{name} must return one embedding per image, [B, E] with B = {batch}, "
                         f"got shape {tuple(emb.shape)}")
    return emb


def tau_thresholded_counterattack(embed_fn: EmbedFn, x, key, *, eps: float = 4 / 255, alpha: float = 1 / 255,
                                  steps: int = 2, beta: float = 2.0, tau_thres: float = 0.2, delta0=None,
                                  tau_embed_fn: EmbedFn | None = None,
                                  validate: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Defend images with tau-thresholded, step-weighted counterattacks (TTC).

    Jittable: close over `embed_fn` and the hyper-parameters (Python numbers, static), e.g.
    `jax.jit(functools.partial(tau_thresholded_counterattack, embed_fn, eps=4/255))(x, key)`.

    Args:
      embed_fn: pixels `[B, H, W, C]` in [0, 1] -> raw (unnormalised) image embeddings `[B, E]` of
        the tower to counterattack (the original CLIP tower in the paper's main setting). It must
        treat examples independently (no batch statistics), as every CLIP tower in eval mode does.
      x: `[B, H, W, C]` images to defend, pixels in [0, 1] (clean or adversarial).
      key: PRNG key for delta_0 ~ U(-eps, eps); unused (may be None) when `delta0` is given.
      eps: L-inf radius of the counterattack, in [0, 1] (official 4/255).
      alpha: step size, >= 0 (official 1/255).
      steps: number N of counterattack steps, >= 0 (official 2; 0 gives the noise-only defence).
      beta: sharpness of the step weights softmax(beta * k) (official 2).
      tau_thres: counterattack the examples with tau < tau_thres (official 0.2).
      delta0: optional `[B, H, W, C]` initial noise in [-eps, eps] (replaces the random draw; it is
        still clipped to [-x, 1 - x], as the drawn noise is).
      tau_embed_fn: optional tower used for tau only (the original CLIP tower when `embed_fn` is a
        fine-tuned victim); None uses `embed_fn`.
      validate: check pixel ranges and finiteness of concrete inputs.

    Returns:
      `(x_defended, info)`: `x_defended` `[B, H, W, C]` = x + delta, in [0, 1]; `info` holds
      `tau` `[B]` (the false-stability ratio), `counterattack` `[B]` bool (tau < tau_thres) and
      `delta` `[B, H, W, C]` (the applied perturbation).

    Raises:
      ValueError / TypeError: bad shapes, pixels outside [0, 1], eps outside [0, 1], negative
        alpha or steps, a non-finite beta / tau_thres, or no `key` and no `delta0`.
    """
    eps = _python_float("eps", eps, 0.0, 1.0, "in [0, 1] (an L-inf radius in pixel units, e.g. 4/255)")
    alpha = _python_float("alpha", alpha, 0.0, None, "a finite number >= 0")
    beta = _python_float("beta", beta)
    tau_thres = _python_float("tau_thres", tau_thres)
    steps = _non_negative_int("steps", steps)
    x, delta0 = check_pixels_and_noise(x, delta0, eps, validate)
    if delta0 is None:
        if key is None:
            raise ValueError("key is None: pass a PRNG key (jax.random.key) or an explicit delta0")
        delta0 = jax.random.uniform(key, x.shape, x.dtype, minval=-eps, maxval=eps)
    delta0 = jnp.clip(delta0, -x, 1.0 - x)  # official: clamp(delta, lower_limit - X, upper_limit - X)

    anchor = jax.lax.stop_gradient(_check_embedding("embed_fn(x)", embed_fn(x), x.shape[0]))

    def objective(delta):
        emb = embed_fn(x + delta)
        return jnp.sum(jnp.square(emb - anchor)), emb  # official l2_loss: sum over batch and dims

    def step(delta, _):
        grad, emb = jax.grad(objective, has_aux=True)(delta)
        new = jnp.clip(delta + alpha * jnp.sign(grad), -eps, eps)
        new = jnp.clip(new, -x, 1.0 - x)
        return new, (new, emb)

    if steps:
        _, (deltas, embs) = jax.lax.scan(step, delta0, None, length=steps)
        noisy = embs[0]  # f(x + delta_0), the first counterattack forward pass
    else:
        deltas = jnp.zeros((0, *x.shape), x.dtype)
        noisy = embed_fn(x + delta0)
    if tau_embed_fn is None:
        ref, noisy_ref = anchor, noisy
    else:
        ref = _check_embedding("tau_embed_fn(x)", tau_embed_fn(x), x.shape[0])
        noisy_ref = tau_embed_fn(x + delta0)
    tau = jax.lax.stop_gradient(jnp.linalg.norm(noisy_ref - ref, axis=-1) / jnp.linalg.norm(ref, axis=-1))

    weights = jnp.asarray(counterattack_weights(steps, beta), x.dtype)
    stored = jnp.concatenate([delta0[None], deltas], axis=0)  # [N + 1, B, H, W, C]
    weighted = jnp.tensordot(weights, stored, axes=1)
    counter = tau < tau_thres  # NaN tau (a zero embedding) -> False, as sign(NaN) > 0 is False in torch
    delta = jnp.where(counter[:, None, None, None], weighted, delta0)
    return x + delta, {"tau": tau, "counterattack": counter, "delta": delta}
