"""Projected gradient descent (PGD) in pixel space, as the zero-shot robustness papers run it.

Images `x` are `[B, H, W, 3]` pixels in [0, 1] *before* CLIP normalisation; the radius `eps` and the step
`alpha` are in the same units (1/255 is one intensity level).

* L-inf: TeCoA's `attack_pgd` (`cvlab-columbia/ZSRobust4FoundationModel:finetuning.py`, also PMG-AFT's and
  TTC's `code/attacks.py`): delta0 ~ U(-eps, eps) clipped to [-x, 1 - x]; each step
  delta <- clip(delta + alpha * sign(g), -eps, eps), then clipped to [-x, 1 - x]; the final delta is
  returned (no restarts, no best iterate).
* L2: torchattacks 3.5.1 `PGDL2`: start x + delta0 with delta0 = r * eps * n / ||n|| (n Gaussian,
  r ~ U(0, 1) per image), clipped to [0, 1]; each step x_adv <- x_adv + alpha * g / (||g|| + 1e-10),
  delta = x_adv - x scaled by min(eps / ||delta||, 1), x_adv <- clip(x + delta, 0, 1).

g is the gradient of the *sum* over the batch of the per-example loss (the papers take the batch mean;
the sign, and the normalised L2 step up to the 1e-10, do not change). `loss_fn` and `logits_fn` are
plain callables or `jax.tree_util.Partial`s; a `Partial` (such as `clipjax.robust.evaluate.
zero_shot_logits_fn`) carries its arrays (the model params) as traced arguments of the jitted attack
instead of compile-time constants. The attack is one `lax.fori_loop` of pure `jnp` ops: with `x` sharded
over a mesh's batch axes it runs sharded.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from clipjax import checks

NORMS = ("linf", "l2")
PGD_LOSSES = ("ce", "cw")
CW_MARGIN = 50.0  # TeCoA's attack_CW: maximise -sum relu(z_y - max_{j != y} z_j + 50)


# ----------------------------------------------------------------------------- checks shared by clipjax.robust
def as_partial(fn: Callable) -> Partial:
    """`fn` as a `jax.tree_util.Partial` (a pytree, so it can be a traced argument of `jax.jit`)."""
    if isinstance(fn, Partial):
        return fn
    if not callable(fn):
        raise TypeError(f"expected a callable (loss_fn / logits_fn), got {type(fn).__name__}")
    return Partial(fn)


@jax.jit
def _range_stats(x):
    return jnp.min(x), jnp.max(x)


def check_images(x: Any, *, validate: bool = True, name: str = "x") -> jax.Array:
    """`x` as a `[B, H, W, 3]` floating array; when concrete, all values finite and in [0, 1]."""
    x = checks.array(name, x, "[B, H, W, C]", sizes={"C": 3})
    if validate and checks.is_concrete(x):
        checks.finite(name, x)
        with jax.ensure_compile_time_eval():
            lo, hi = (np.asarray(v) for v in _range_stats(x))
        if lo < 0 or hi > 1:
            raise ValueError(f"{name} must hold pixels in [0, 1] (before CLIP normalisation), "
                             f"got values in [{float(lo):.6g}, {float(hi):.6g}]")
    return x


def check_radius(name: str, value: Any, dtype, *, upper: float | None = 1.0) -> jax.Array:
    """A scalar radius / step size as an array of `dtype`; when concrete it must lie in [0, upper]."""
    checks.scalar(name, value)  # type and shape
    if checks.is_concrete(value):
        v = float(np.asarray(value).reshape(()))
        if not np.isfinite(v) or v < 0 or (upper is not None and v > upper):
            span = f"[0, {upper:g}]" if upper is not None else ">= 0"
            raise ValueError(f"{name} must be a finite number in {span} (pixel units, 1/255 = one level), got {v!r}")
    with jax.ensure_compile_time_eval():
        return jnp.asarray(value, dtype).reshape(())


def check_choice(name: str, value: Any, choices) -> str:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(map(repr, choices))}")
    return value


def check_labels(labels: Any, batch: int, num_classes: int, *, validate: bool = True) -> jax.Array:
    """`labels` as `[B]` integers with B = `batch`, values (when concrete) in [0, num_classes)."""
    labels = checks.array("labels", labels, "[B]", dtype="integer")
    if labels.shape[0] != batch:
        raise ValueError(f"labels has {labels.shape[0]} entries but x has batch size {batch}; "
                         "expected one label per image")
    checks.index_range("labels", labels, num_classes, validate=validate)
    return labels


def num_classes(logits_fn: Callable, x: jax.Array) -> int:
    """C of `logits_fn(x) -> [B, C]`, from an abstract evaluation (nothing is computed)."""
    out = jax.eval_shape(logits_fn, x)
    if len(out.shape) != 2 or out.shape[0] != x.shape[0]:
        raise ValueError(f"logits_fn must map [B, H, W, 3] pixels to [B, C] logits, got shape {tuple(out.shape)} "
                         f"for B = {x.shape[0]}")
    return int(out.shape[1])


def per_example_norm(v: jax.Array) -> jax.Array:
    """L2 norm of each example of `[B, ...]`, shaped `[B, 1, ..., 1]` for broadcasting."""
    return jnp.sqrt(jnp.sum(jnp.square(v), axis=tuple(range(1, v.ndim)), keepdims=True))


# ----------------------------------------------------------------------------- losses
def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example cross entropy `[B]` of `[B, C]` logits (`nn.CrossEntropyLoss(reduction='none')`)."""
    true = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
    return jax.nn.logsumexp(logits, axis=1) - true


def cw_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """TeCoA's `attack_CW` objective per example: -relu(z_y - max_{j != y} z_j + 50), to be maximised.

    The wrong-class maximum is written as in TeCoA, max((1 - onehot) * z - 1e4 * onehot).
    """
    onehot = jax.nn.one_hot(labels, logits.shape[1], dtype=logits.dtype)
    correct = jnp.sum(onehot * logits, axis=1)
    wrong = jnp.max((1 - onehot) * logits - 1e4 * onehot, axis=1)
    return -jax.nn.relu(correct - wrong + CW_MARGIN)


def _classifier_loss(logits_fn, labels, x, *, kind):
    logits = logits_fn(x)
    return cross_entropy(logits, labels) if kind == "ce" else cw_loss(logits, labels)


def _ce_objective(logits_fn, labels, x):
    return _classifier_loss(logits_fn, labels, x, kind="ce")


def _cw_objective(logits_fn, labels, x):
    return _classifier_loss(logits_fn, labels, x, kind="cw")


# ----------------------------------------------------------------------------- PGD
@jax.jit
def _random_start_linf(key, x, eps):
    return jax.random.uniform(key, x.shape, x.dtype, -eps, eps)


@jax.jit
def _random_start_l2(key, x, eps):
    k_dir, k_radius = jax.random.split(key)
    n = jax.random.normal(k_dir, x.shape, x.dtype)
    r = jax.random.uniform(k_radius, (x.shape[0],) + (1,) * (x.ndim - 1), x.dtype)
    return n * (r / per_example_norm(n) * eps)


def _pgd_step_linf(x, delta, g, eps, alpha):
    delta = jnp.clip(delta + alpha * jnp.sign(g), -eps, eps)
    return jnp.clip(delta, -x, 1 - x)


def _pgd_step_l2(x, x_adv, g, eps, alpha):
    x_adv = x_adv + alpha * (g / (per_example_norm(g) + 1e-10))
    delta = x_adv - x
    norm = per_example_norm(delta)
    # min(eps / |delta|, 1) without dividing by a zero norm
    delta = delta * jnp.where(norm > eps, eps / jnp.where(norm > 0, norm, 1), 1)
    return jnp.clip(x + delta, 0, 1)


def _sum_loss(loss_fn, batch):
    def total(z):
        loss = loss_fn(z)
        if loss.shape != (batch,):
            raise ValueError(f"loss_fn must return one loss per example, shape [B] = ({batch},), "
                             f"got shape {tuple(loss.shape)}")
        return jnp.sum(loss)

    return jax.grad(total)


@functools.partial(jax.jit, static_argnames=("steps", "norm"))
def _pgd(loss_fn, x, delta0, eps, alpha, *, steps, norm):
    grad = _sum_loss(loss_fn, x.shape[0])
    if norm == "linf":
        def body(_, delta):
            return _pgd_step_linf(x, delta, grad(x + delta), eps, alpha)

        delta = jax.lax.fori_loop(0, steps, body, jnp.clip(delta0, -x, 1 - x))
        return x + jax.lax.stop_gradient(delta)

    def body_l2(_, x_adv):
        return _pgd_step_l2(x, x_adv, grad(x_adv), eps, alpha)

    x_adv = jax.lax.fori_loop(0, steps, body_l2, jnp.clip(x + delta0, 0, 1))
    return jnp.clip(x + jax.lax.stop_gradient(x_adv - x), 0, 1)


def pgd(loss_fn: Callable[[jax.Array], jax.Array], x, key: jax.Array | None = None, *, eps, alpha, steps: int,
        norm: str = "linf", random_start: bool = True, delta0=None, validate: bool = True) -> jax.Array:
    """Maximise `loss_fn` over the L-inf or L2 ball of radius `eps` around `x` (TeCoA / torchattacks PGD).

    Args:
      loss_fn: `x_adv [B, H, W, 3] -> [B]` per-example loss to maximise (the gradient is that of the sum).
      x: `[B, H, W, 3]` clean pixels in [0, 1].
      key: PRNG key for the random start (unused when `delta0` is given or `random_start=False`).
      eps: radius in pixel units, a scalar in [0, 1] (may be traced).
      alpha: step size (L-inf: per pixel; L2: the length of the normalised gradient step), >= 0.
      steps: number of gradient steps (static).
      norm: `"linf"` or `"l2"`.
      random_start: draw the start as described in the module docstring; False starts at delta0 = 0.
      delta0: `[B, H, W, 3]` injected start perturbation (for parity tests); used as given, then clipped
        so that x + delta0 lies in [0, 1].
      validate: check the pixel range of concrete `x` (shapes and scalars are always checked).

    Returns:
      `[B, H, W, 3]` adversarial images x + delta in [0, 1], |delta| <= eps in the chosen norm (for
      an injected delta0 inside the ball). delta is a constant for autodiff (as TeCoA detaches it): a
      training loss on the result differentiates through x + delta only, never back through the attack.
    """
    x = check_images(x, validate=validate)
    norm = check_choice("norm", norm, NORMS)
    steps = checks.positive_int("steps", steps)
    eps = check_radius("eps", eps, x.dtype)
    alpha = check_radius("alpha", alpha, x.dtype, upper=None)
    if delta0 is not None:
        delta0 = checks.array("delta0", delta0, "[B, H, W, C]", sizes={"C": 3})
        checks.same_shape("[B, H, W, 3]", x=x, delta0=delta0)
        delta0 = delta0.astype(x.dtype)
    elif not random_start:
        delta0 = jnp.zeros_like(x)
    else:
        if key is None:
            raise ValueError("key is required for the random start (or pass random_start=False or delta0)")
        start = _random_start_linf if norm == "linf" else _random_start_l2
        delta0 = start(key, x, eps)
    return _pgd(as_partial(loss_fn), x, delta0, eps, alpha, steps=steps, norm=norm)


def classifier_objective(logits_fn: Callable, labels: jax.Array, loss: str = "ce") -> Partial:
    """The per-example attack objective `x -> [B]` of a classifier: `"ce"` cross entropy or TeCoA's `"cw"`."""
    loss = check_choice("loss", loss, PGD_LOSSES)
    return Partial(_ce_objective if loss == "ce" else _cw_objective, as_partial(logits_fn), labels)


def pgd_classifier(logits_fn: Callable[[jax.Array], jax.Array], x, labels, key: jax.Array | None = None, *, eps,
                   alpha, steps: int, loss: str = "ce", norm: str = "linf", random_start: bool = True,
                   delta0=None, validate: bool = True) -> jax.Array:
    """Untargeted PGD against a classifier `logits_fn(x) -> [B, C]` (see `pgd` for the other arguments).

    Args:
      logits_fn: `[B, H, W, 3]` pixels in [0, 1] -> `[B, C]` logits (e.g. `zero_shot_logits_fn`).
      labels: `[B]` int true classes in [0, C).
      loss: `"ce"` (TeCoA's `attack_pgd`) or `"cw"` (TeCoA's `attack_CW`: maximise
        -sum relu(z_y - max_{j != y} z_j + 50)).

    Returns:
      `[B, H, W, 3]` adversarial images in [0, 1].
    """
    x = check_images(x, validate=validate)
    logits_fn = as_partial(logits_fn)
    labels = check_labels(labels, x.shape[0], num_classes(logits_fn, x), validate=validate)
    objective = classifier_objective(logits_fn, labels, loss)
    return pgd(objective, x, key, eps=eps, alpha=alpha, steps=steps, norm=norm, random_start=random_start,
               delta0=delta0, validate=False)
