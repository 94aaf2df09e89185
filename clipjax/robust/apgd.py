"""AutoAttack's APGD (Croce & Hein, ICML 2020) as fixed-shape JAX: APGD-CE, APGD-DLR and APGD-T.

A transcription of `fra31/auto-attack:autoattack/autopgd_base.py` (`APGDAttack`, `APGDAttack_targeted`;
the `pyautoattack` 0.2.0 package ships the same file) for the L-inf and L2 threat models, `eot_iter=1`:

* start: x + eps * t / (||t|| + 1e-12) clipped to [0, 1], t ~ U(-1, 1) normalised by its max (L-inf) or
  t ~ N(0, 1) normalised by its L2 norm; per example step size 2 * eps;
* step i: z = P(x_adv + step * sign(g)) (L2: g / ||g||), then x_adv <- P(x_adv + a (z - x_adv) +
  (1 - a)(x_adv - x_adv_prev)) with momentum a = 0.75 (1 at the first step), P the projection onto the
  ball and [0, 1];
* checkpoints: the first after n_iter_2 = max(int(0.22 n), 1) steps, then every k steps with k shrinking
  by max(int(0.03 n), 1) down to max(int(0.06 n), 1). At a checkpoint an example halves its step size
  and restarts from its best point (with the gradient there) when the loss rose in at most rho * k of the
  last k steps, or when it was not halved at the previous checkpoint and its best loss has not improved
  since. The oscillation count reads the loss history with AutoAttack's wrap-around index: at the first
  checkpoint the oldest comparison is against the (still zero) last row of the history;
* the best-loss point (`loss_best`, strict improvement) and, per example, the latest iterate that is
  misclassified (`x_best_adv`) are tracked;
* losses: CE; DLR -(z_y - max_{j != y} z_j) / (z_(1) - z_(3) + 1e-12); targeted DLR
  -(z_y - z_t) / (z_(1) - (z_(3) + z_(4)) / 2 + 1e-12), z_(k) the k-th largest logit;
* restarts (`perturb`): each restart only re-attacks the points still correctly classified; APGD-T runs
  `restarts` restarts for each target t = the 2nd, 3rd, ..., (n_target_classes + 1)-th largest clean
  logit.

Fixed shapes instead of AutoAttack's indexing: every run is computed on every example of the batch and
masked, so an example keeps the adversarial point of the first run that fooled it, exactly as AutoAttack,
whose runs are independent per example. A run is skipped (`lax.cond`) once no example of the batch is
left. Random starts use `jax.random.fold_in(key, run)`, so they differ from torch's stream: results agree
with AutoAttack in distribution, and exactly for an injected start `x_init`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from clipjax import checks
from clipjax.robust.attacks import (as_partial, check_choice, check_images, check_labels, check_radius,
                                    cross_entropy, num_classes, per_example_norm)

APGD_LOSSES = ("ce", "dlr")
NORMS = ("linf", "l2")
MOMENTUM = 0.75


# ----------------------------------------------------------------------------- losses
def dlr_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example DLR loss `[B]` of `[B, C]` logits (C >= 3), AutoAttack's `dlr_loss`."""
    ranked = jnp.sort(logits, axis=1)
    true = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
    # AutoAttack tests argsort()[-1] == y; on a tie with the top logit both forms give the same value
    top_is_true = true >= ranked[:, -1]
    other = jnp.where(top_is_true, ranked[:, -2], ranked[:, -1])
    return -(true - other) / (ranked[:, -1] - ranked[:, -3] + 1e-12)


def dlr_targeted_loss(logits: jax.Array, labels: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-example targeted DLR loss `[B]` (C >= 4), AutoAttack's `dlr_loss_targeted`."""
    ranked = jnp.sort(logits, axis=1)
    true = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
    target = jnp.take_along_axis(logits, targets[:, None], axis=1)[:, 0]
    return -(true - target) / (ranked[:, -1] - 0.5 * (ranked[:, -3] + ranked[:, -4]) + 1e-12)


def checkpoints(n_iter: int) -> tuple[np.ndarray, np.ndarray]:
    """AutoAttack's step-size checkpoints: `(at [n_iter] bool, k [n_iter] int)`, the iterations i where
    the condition is checked and the window k used there (0 elsewhere)."""
    n_iter_2 = max(int(0.22 * n_iter), 1)
    n_iter_min = max(int(0.06 * n_iter), 1)
    size_decr = max(int(0.03 * n_iter), 1)
    at, window = np.zeros(n_iter, bool), np.zeros(n_iter, np.int32)
    counter, k = 0, n_iter_2
    for i in range(n_iter):
        counter += 1
        if counter == k:
            at[i], window[i] = True, k
            k = max(k - size_decr, n_iter_min)
            counter = 0
    return at, window


# ----------------------------------------------------------------------------- one run
def _l2_unit(v):
    return v / (per_example_norm(v) + 1e-12)


def _project(x, z, eps, norm):
    if norm == "linf":
        return jnp.clip(jnp.clip(z, x - eps, x + eps), 0.0, 1.0)
    d = z - x
    return jnp.clip(x + _l2_unit(d) * jnp.minimum(eps, per_example_norm(d)), 0.0, 1.0)


def _random_start(key, x, eps, norm):
    if norm == "linf":
        t = 2 * jax.random.uniform(key, x.shape, x.dtype) - 1
        scale = jnp.max(jnp.abs(t), axis=tuple(range(1, x.ndim)), keepdims=True)
        return x + eps * (t / (scale + 1e-12))
    return x + eps * _l2_unit(jax.random.normal(key, x.shape, x.dtype))


def _single_run(logits_fn, x, labels, targets, x_start, eps, *, n_iter, loss, norm, rho):
    """`attack_single_run`: returns (acc [B] bool, x_best_adv [B, H, W, 3]) of one APGD run."""
    expand = (x.shape[0],) + (1,) * (x.ndim - 1)

    def objective(z):
        logits = logits_fn(z)
        if loss == "ce":
            per_example = cross_entropy(logits, labels)
        elif loss == "dlr":
            per_example = dlr_loss(logits, labels)
        else:
            per_example = dlr_targeted_loss(logits, labels, targets)
        return jnp.sum(per_example), (logits, per_example)

    gradient = jax.grad(objective, has_aux=True)

    x_adv = jnp.clip(x_start, 0.0, 1.0)
    grad, (logits, loss_now) = gradient(x_adv)
    acc = jnp.argmax(logits, axis=1) == labels
    step = jnp.full(expand, 2.0, x.dtype) * eps
    check_at, window = (jnp.asarray(a) for a in checkpoints(n_iter))
    offsets = jnp.arange(n_iter)
    history = jnp.zeros((n_iter,) + loss_now.shape, loss_now.dtype)
    state = dict(x_adv=x_adv, x_prev=x_adv, grad=grad, x_best=x_adv, grad_best=grad, loss_best=loss_now,
                 x_best_adv=x_adv, acc=acc, step=step, history=history, loss_best_last=loss_now,
                 reduced_last=jnp.ones_like(acc))

    def body(i, s):
        s = dict(s)
        momentum_step = s["x_adv"] - s["x_prev"]
        s["x_prev"] = s["x_adv"]
        a = jnp.where(i > 0, MOMENTUM, 1.0).astype(x.dtype)
        direction = jnp.sign(s["grad"]) if norm == "linf" else _l2_unit(s["grad"])
        z = _project(x, s["x_adv"] + s["step"] * direction, eps, norm)
        x_adv = _project(x, s["x_adv"] + (z - s["x_adv"]) * a + momentum_step * (1 - a), eps, norm)

        grad, (logits, loss_now) = gradient(x_adv)
        pred = jnp.argmax(logits, axis=1) == labels
        s["acc"] = s["acc"] & pred
        s["x_best_adv"] = jnp.where((~pred).reshape(expand), x_adv, s["x_best_adv"])
        s["history"] = s["history"].at[i].set(loss_now)
        better = loss_now > s["loss_best"]
        s["x_best"] = jnp.where(better.reshape(expand), x_adv, s["x_best"])
        s["grad_best"] = jnp.where(better.reshape(expand), grad, s["grad_best"])
        s["loss_best"] = jnp.where(better, loss_now, s["loss_best"])

        # checkpoint: AutoAttack's check_oscillation over the last k steps (negative indices wrap around)
        k = window[i]
        newer = s["history"][(i - offsets) % n_iter]
        older = s["history"][(i - offsets - 1) % n_iter]
        rises = jnp.sum((offsets[:, None] < k) & (newer > older), axis=0)
        halve = rises <= k * rho
        halve = halve | (~s["reduced_last"] & (s["loss_best_last"] >= s["loss_best"]))
        check = check_at[i]
        reduce = (check & halve).reshape(expand)
        s["step"] = jnp.where(reduce, s["step"] / 2.0, s["step"])
        s["x_adv"] = jnp.where(reduce, s["x_best"], x_adv)
        s["grad"] = jnp.where(reduce, s["grad_best"], grad)
        s["reduced_last"] = jnp.where(check, halve, s["reduced_last"])
        s["loss_best_last"] = jnp.where(check, s["loss_best"], s["loss_best_last"])
        return s

    state = jax.lax.fori_loop(0, n_iter, body, state)
    return state["acc"], state["x_best_adv"]


@functools.partial(jax.jit, static_argnames=("n_iter", "restarts", "loss", "norm", "rho", "n_targets"))
def run_apgd(logits_fn, x, labels, key, x_init, active, eps, *, n_iter, restarts, loss, norm, rho, n_targets=0):
    """AutoAttack's `perturb` on a batch (no checks; call `apgd` / `apgd_targeted`).

    Args:
      logits_fn: a `Partial`, `[B, H, W, 3] -> [B, C]`.
      x: `[B, H, W, 3]` in [0, 1]; labels `[B]` int; key: PRNG key (unused with `x_init`).
      x_init: None, or `[B, H, W, 3]` start of every run.
      active: `[B]` bool, the examples to attack (AutoAttack's still-robust points); the others keep x.
      eps: scalar radius. n_iter, restarts, loss ("ce", "dlr", "dlr-targeted"), norm, rho, n_targets:
        static settings.

    Returns:
      `(x_adv [B, H, W, 3], robust [B] bool)`: x_adv is the adversarial point of the first run that
      fooled the example, x otherwise; robust is "active, correct on x and never fooled".
    """
    clean_logits = logits_fn(x)
    robust = (jnp.argmax(clean_logits, axis=1) == labels) & active
    ranking = jnp.argsort(clean_logits, axis=1)  # ascending; target t is column C - t
    n_runs = restarts * (n_targets if loss == "dlr-targeted" else 1)

    def one_run(r, carry):
        def attack(carry):
            adv, robust = carry
            position = clean_logits.shape[1] - (2 + r // restarts)
            targets = jax.lax.dynamic_index_in_dim(ranking, position, axis=1, keepdims=False)
            start = x_init if x_init is not None else _random_start(jax.random.fold_in(key, r), x, eps, norm)
            acc, x_best_adv = _single_run(logits_fn, x, labels, targets, start, eps, n_iter=n_iter, loss=loss,
                                          norm=norm, rho=rho)
            fooled = robust & ~acc
            adv = jnp.where(fooled.reshape((-1,) + (1,) * (x.ndim - 1)), x_best_adv, adv)
            return adv, robust & ~fooled

        return jax.lax.cond(jnp.any(carry[1]), attack, lambda c: c, carry)

    adv, robust = jax.lax.fori_loop(0, n_runs, one_run, (x, robust))
    return jax.lax.stop_gradient(adv), robust


def _prepare(logits_fn, x, labels, key, eps, norm, steps, restarts, rho, x_init, validate):
    x = check_images(x, validate=validate)
    logits_fn = as_partial(logits_fn)
    n_classes = num_classes(logits_fn, x)
    labels = check_labels(labels, x.shape[0], n_classes, validate=validate)
    norm = check_choice("norm", norm, NORMS)
    check_radius("rho", rho, jnp.float32)
    settings = dict(n_iter=checks.positive_int("steps", steps), restarts=checks.positive_int("restarts", restarts),
                    norm=norm, rho=float(rho))
    eps = check_radius("eps", eps, x.dtype)
    if x_init is not None:
        x_init = checks.array("x_init", x_init, "[B, H, W, C]", sizes={"C": 3})
        checks.same_shape("[B, H, W, 3]", x=x, x_init=x_init)
        x_init = x_init.astype(x.dtype)
    elif key is None:
        raise ValueError("key is required for APGD's random starts (or pass x_init)")
    active = jnp.ones(x.shape[:1], bool)
    return logits_fn, x, labels, key, x_init, active, eps, n_classes, settings


def check_apgd_classes(loss: str, n_classes: int, n_target_classes: int = 0) -> None:
    """DLR needs C >= 3 logits, targeted DLR C >= 4 and at most C - 1 target classes."""
    if loss == "dlr" and n_classes < 3:
        raise ValueError(f"APGD-DLR needs at least 3 classes, the classifier has {n_classes}")
    if loss == "dlr-targeted":
        if n_classes < 4:
            raise ValueError(f"APGD-T (targeted DLR) needs at least 4 classes, the classifier has {n_classes}")
        if n_target_classes > n_classes - 1:
            raise ValueError(f"n_target_classes={n_target_classes} exceeds the {n_classes - 1} classes other "
                             f"than the true one")


def apgd(logits_fn: Callable[[jax.Array], jax.Array], x, labels, key: jax.Array | None = None, *, eps: Any,
         norm: str = "linf", steps: int = 100, restarts: int = 1, loss: str = "ce", rho: float = 0.75,
         x_init=None, validate: bool = True) -> jax.Array:
    """APGD-CE or APGD-DLR, AutoAttack's `APGDAttack(...).perturb(x, y)` (see the module docstring).

    Args:
      logits_fn: `[B, H, W, 3]` pixels in [0, 1] -> `[B, C]` logits (e.g. `zero_shot_logits_fn`).
      x: `[B, H, W, 3]` clean pixels in [0, 1].
      labels: `[B]` int true classes in [0, C).
      key: PRNG key for the random starts (unused with `x_init`).
      eps: radius in pixel units, in [0, 1] (may be traced).
      norm: `"linf"` or `"l2"`.
      steps: iterations per run (`n_iter`, AutoAttack uses 100).
      restarts: runs; each re-attacks only the examples not yet fooled (`n_restarts`).
      loss: `"ce"` or `"dlr"` (C >= 3).
      rho: the step-size condition's threshold (`rho`, 0.75).
      x_init: optional `[B, H, W, 3]` start of every run instead of the random start.
      validate: check pixel and label ranges of concrete inputs.

    Returns:
      `[B, H, W, 3]`: for each example fooled by some run, the adversarial point of the first such run;
      x itself for the others (and for examples misclassified to begin with).
    """
    logits_fn, x, labels, key, x_init, active, eps, n_classes, settings = _prepare(
        logits_fn, x, labels, key, eps, norm, steps, restarts, rho, x_init, validate)
    loss = check_choice("loss", loss, APGD_LOSSES)
    check_apgd_classes(loss, n_classes)
    adv, _ = run_apgd(logits_fn, x, labels, key, x_init, active, eps, loss=loss, **settings)
    return adv


def apgd_targeted(logits_fn: Callable[[jax.Array], jax.Array], x, labels, key: jax.Array | None = None, *,
                  eps: Any, norm: str = "linf", steps: int = 100, restarts: int = 1, n_target_classes: int = 9,
                  rho: float = 0.75, x_init=None, validate: bool = True) -> jax.Array:
    """APGD-T, AutoAttack's `APGDAttack_targeted(...).perturb(x, y)`: targeted DLR towards each of the
    `n_target_classes` highest-scoring wrong classes in turn (`restarts` runs each). C >= 4 and
    `n_target_classes` <= C - 1. Other arguments and the result as `apgd`."""
    logits_fn, x, labels, key, x_init, active, eps, n_classes, settings = _prepare(
        logits_fn, x, labels, key, eps, norm, steps, restarts, rho, x_init, validate)
    n_target_classes = checks.positive_int("n_target_classes", n_target_classes)
    check_apgd_classes("dlr-targeted", n_classes, n_target_classes)
    adv, _ = run_apgd(logits_fn, x, labels, key, x_init, active, eps, loss="dlr-targeted",
                      n_targets=n_target_classes, **settings)
    return adv
