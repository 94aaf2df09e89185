"""Contrastive losses under `jax.shard_map`: each device holds `[B / n, D]` rows.

Every function here equals its global-view twin in `clipjax.losses` over the
whole batch, in value and in gradients (features, scale, bias).

* Softmax (`sharded_clip_loss`): open_clip's `local_loss=True,
  gather_with_grad=True`. Each device all-gathers both feature matrices and
  computes the cross entropy of its own rows against all columns; the
  gradient flows back through the gather (its transpose is a reduce-scatter).
* Sigmoid (`sharded_siglip_loss`): open_clip's neighbour exchange. Text
  blocks travel around a ring with `ppermute`; each device only ever forms
  `[B/n, B/n]` (or, with `block_size`, `[B/n, block]`) logits. The backward
  pass is a second ring (a `custom_vjp`): the received text block travels
  again, with its gradient riding beside it back to its owner, so memory stays
  O(B/n x D) instead of storing every received block for autodiff.
* CLOOB (`sharded_cloob_loss`): gather-based Hopfield retrieval and InfoLOOB.

Two layers of API:

* `*_local(...)` functions run *inside* a `shard_map` body and take
  `axis_name` (a mesh axis name or a tuple of them); they return the global
  loss, identical on every device.
* `sharded_*` functions take global `[B, D]` arrays and a `mesh`, check that
  B divides over the batch axes, and wrap the local function in `shard_map`.

`block_size=None` forms each device's logits block at once; an int streams
it through `clipjax.losses.chunked` (O(B/n x block) logits memory).
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from clipjax.losses.chunked import vma_of, row_logsumexp, sigmoid_block_grads, sigmoid_row_sums, softmax_rows_loss
from clipjax import checks
from clipjax.losses.contrastive import _check_pair, _check_smoothing, _prepare, hopfield_retrieval, _LOOB_MASK

__all__ = [
    "clip_loss_local",
    "siglip_loss_local",
    "cloob_loss_local",
    "sharded_clip_loss",
    "sharded_siglip_loss",
    "sharded_cloob_loss",
]

AxisName = str | tuple[str, ...]


def _axes(axis_name: AxisName) -> tuple[str, ...]:
    return (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)


def _varying(x, axis_name: AxisName):
    """Mark `x` as device-varying over `axis_name` (no-op where it already is).

    Inside `shard_map`, a replicated value (scale, bias) that meets per-device
    data is implicitly broadcast; doing it explicitly before a `custom_vjp`
    makes the cotangent's psum over devices part of the transpose.
    """
    missing = tuple(a for a in _axes(axis_name) if a not in vma_of(x))
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def _rowdot(a, b):
    return jnp.sum(a * b, axis=1)


def _local_inputs(image_local, text_local, *scalars):
    """Static checks on the per-device blocks; cast everything to float32."""
    image_local, text_local = _check_pair(image_local, text_local, ("image_local", "text_local"), min_batch=1)
    return (image_local.astype(jnp.float32), text_local.astype(jnp.float32),
            *(None if v is None else jnp.asarray(v, jnp.float32) for v in scalars))


# ---------------------------------------------------------------- softmax (gather)

def clip_loss_local(image_local, text_local, logit_scale, logit_bias=None, *, axis_name: AxisName,
                    label_smoothing: float = 0.0, block_size: int | None = None,
                    lse_fn: Callable | None = None) -> jax.Array:
    """CLIP loss of the global batch, from inside `shard_map` (local loss, gather with grad).

    Args:
      image_local: `[b, D]` image rows of this device (b = B / n; cast to float32).
      text_local: `[b, D]` text rows of this device.
      logit_scale: scalar multiplier (exponentiated); logit_bias: optional scalar.
      axis_name: mesh axis (or tuple) that splits the batch.
      label_smoothing: torch-style eps over all B classes.
      block_size: stream the `[b, B]` logits in column blocks when set.
      lse_fn: replacement for `row_logsumexp`, signature `(q, k, scale, block) -> [N]`.

    Returns:
      Scalar: the global-batch CLIP loss (same on every device).
    """
    image_local, text_local, logit_scale, logit_bias = _local_inputs(image_local, text_local, logit_scale,
                                                                      logit_bias)
    n = jax.lax.axis_size(axis_name)
    b = image_local.shape[0]
    all_images = jax.lax.all_gather(image_local, axis_name, tiled=True)
    all_texts = jax.lax.all_gather(text_local, axis_name, tiled=True)
    if block_size is None:
        logits_i = logit_scale * (image_local @ all_texts.T)
        logits_t = logit_scale * (text_local @ all_images.T)
        lse_i = jax.nn.logsumexp(logits_i, axis=1)
        lse_t = jax.nn.logsumexp(logits_t, axis=1)
    else:
        lse = lse_fn or row_logsumexp
        scale_v = _varying(logit_scale, axis_name)
        lse_i = lse(image_local, all_texts, scale_v, block_size)
        lse_t = lse(text_local, all_images, scale_v, block_size)
    per_image = softmax_rows_loss(image_local, all_texts, logit_scale, logit_bias, text_local,
                                  lse_i, label_smoothing)
    per_text = softmax_rows_loss(text_local, all_images, logit_scale, logit_bias, image_local,
                                 lse_t, label_smoothing)
    return jax.lax.psum(jnp.sum(per_image) + jnp.sum(per_text), axis_name) / (2 * n * b)


# ---------------------------------------------------------------- sigmoid (ppermute ring)

def _ring_perm(n: int):
    return [(i, (i + 1) % n) for i in range(n)]


def _block_sum(q, k, scale, bias, block_size, pair_sum_fn):
    if block_size is None:
        return jnp.sum(jax.nn.softplus(scale * (q @ k.T) + bias))
    return jnp.sum((pair_sum_fn or sigmoid_row_sums)(q, k, scale, bias, block_size))


def _block_grads(q, k, scale, bias, g, block_size):
    if block_size is None:
        w = g * jax.nn.sigmoid(scale * (q @ k.T) + bias)
        return scale * (w @ k), scale * (w.T @ q), jnp.sum(w * (q @ k.T)), jnp.sum(w)
    return sigmoid_block_grads(q, k, scale, bias, jnp.full((q.shape[0],), g), block_size)


@partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _ring_negatives(image_local, text_local, scale, bias, axis_name, n, block_size, pair_sum_fn):
    """Sum over all B columns of `softplus(scale x_i.y_j + bias)` for this device's rows."""
    perm = _ring_perm(n)

    def step(carry, _):
        texts, acc = carry
        texts = jax.lax.ppermute(texts, axis_name, perm)
        return (texts, acc + _block_sum(image_local, texts, scale, bias, block_size, pair_sum_fn)), None

    first = _block_sum(image_local, text_local, scale, bias, block_size, pair_sum_fn)
    (_, total), _ = jax.lax.scan(step, (text_local, first), None, length=n - 1)
    return total


def _ring_fwd(image_local, text_local, scale, bias, axis_name, n, block_size, pair_sum_fn):
    out = _ring_negatives(image_local, text_local, scale, bias, axis_name, n, block_size, pair_sum_fn)
    return out, (image_local, text_local, scale, bias)


def _ring_bwd(axis_name, n, block_size, pair_sum_fn, res, g):
    image_local, text_local, scale, bias = res
    perm = _ring_perm(n)
    dx, dy, ds, db = _block_grads(image_local, text_local, scale, bias, g, block_size)

    def step(carry, _):
        texts, d_texts, dx, ds, db = carry
        texts = jax.lax.ppermute(texts, axis_name, perm)
        d_texts = jax.lax.ppermute(d_texts, axis_name, perm)  # the gradient rides with its block
        gx, gy, gs, gb = _block_grads(image_local, texts, scale, bias, g, block_size)
        return (texts, d_texts + gy, dx + gx, ds + gs, db + gb), None

    (_, d_texts, dx, ds, db), _ = jax.lax.scan(step, (text_local, dy, dx, ds, db), None, length=n - 1)
    # after n-1 hops each gradient sits one device before its owner: one more hop home
    d_texts = jax.lax.ppermute(d_texts, axis_name, perm) if n > 1 else d_texts
    return dx, d_texts, ds, db


_ring_negatives.defvjp(_ring_fwd, _ring_bwd)


def siglip_loss_local(image_local, text_local, logit_scale, logit_bias, *, axis_name: AxisName,
                      block_size: int | None = None, pair_sum_fn: Callable | None = None) -> jax.Array:
    """SigLIP loss of the global batch, from inside `shard_map`, by a `ppermute` ring.

    Device r first scores its own block (with the positives), then receives
    the text block of device r-1, r-2, ... (n-1 hops) and scores each as
    negatives, as open_clip's `SigLipLoss(dist_impl="shift")`.

    Args:
      image_local: `[b, D]` image rows of this device (cast to float32).
      text_local: `[b, D]` text rows of this device.
      logit_scale: scalar t (exponentiated); logit_bias: scalar b.
      axis_name: mesh axis (or tuple) that splits the batch.
      block_size: stream each `[b, b]` block in column blocks when set.
      pair_sum_fn: replacement for `sigmoid_row_sums` in the forward ring,
        `(q, k, scale, bias, block) -> [N]`; the backward ring streams with
        `sigmoid_block_grads`.

    Returns:
      Scalar: the global-batch SigLIP loss (same on every device).
    """
    image_local, text_local, logit_scale, logit_bias = _local_inputs(image_local, text_local, logit_scale,
                                                                      logit_bias)
    n = jax.lax.axis_size(axis_name)
    b = image_local.shape[0]
    scale_v = _varying(logit_scale, axis_name)
    bias_v = _varying(logit_bias, axis_name)
    negatives = _ring_negatives(image_local, text_local, scale_v, bias_v, axis_name, n, block_size,
                                pair_sum_fn)
    positives = jnp.sum(scale_v * _rowdot(image_local, text_local) + bias_v)
    return jax.lax.psum(negatives - positives, axis_name) / (n * b)


# ---------------------------------------------------------------- CLOOB (gather)

def cloob_loss_local(image_local, text_local, inv_tau, hopfield_beta, *, axis_name: AxisName) -> jax.Array:
    """CLOOB loss of the global batch, from inside `shard_map` (all-gather based).

    Stored patterns are the gathered image/text matrices; each device retrieves
    for its own rows, gathers the retrieved partners and evaluates InfoLOOB on
    its rows against all B partners. Unlike CLOOB's DDP trainer, which gathers
    without gradient, gradients flow through every gather, so the result equals
    `cloob_loss` on the global batch.

    Args:
      image_local, text_local: `[b, D]` rows of this device (cast to float32).
      inv_tau: scalar 1/tau (exponentiated). hopfield_beta: scalar beta.
      axis_name: mesh axis (or tuple) that splits the batch.

    Returns:
      Scalar global loss (same on every device).
    """
    image_local, text_local, inv_tau, hopfield_beta = _local_inputs(image_local, text_local, inv_tau,
                                                                     hopfield_beta)
    n = jax.lax.axis_size(axis_name)
    b = image_local.shape[0]
    offset = jax.lax.axis_index(axis_name) * b
    all_images = jax.lax.all_gather(image_local, axis_name, tiled=True)
    all_texts = jax.lax.all_gather(text_local, axis_name, tiled=True)
    u_x = hopfield_retrieval(image_local, all_images, hopfield_beta, validate=False)
    v_x = hopfield_retrieval(text_local, all_images, hopfield_beta, validate=False)
    u_y = hopfield_retrieval(image_local, all_texts, hopfield_beta, validate=False)
    v_y = hopfield_retrieval(text_local, all_texts, hopfield_beta, validate=False)
    all_v_x = jax.lax.all_gather(v_x, axis_name, tiled=True)
    all_u_y = jax.lax.all_gather(u_y, axis_name, tiled=True)
    is_pos = (jnp.arange(b)[:, None] + offset) == jnp.arange(n * b)[None, :]

    def loob_sum(anchors, partners, positives):
        k = inv_tau * (anchors @ partners.T)
        lse = jax.nn.logsumexp(jnp.where(is_pos, _LOOB_MASK, k), axis=1)
        return jnp.sum(lse - inv_tau * _rowdot(anchors, positives)) / inv_tau

    local = loob_sum(u_x, all_v_x, v_x) + loob_sum(v_y, all_u_y, u_y)
    return jax.lax.psum(local, axis_name) / (n * b)


# ---------------------------------------------------------------- global-array wrappers

def _batch_axes(mesh: Mesh, axis_names: Sequence[str] | None) -> tuple[str, ...]:
    names = tuple(axis_names) if axis_names is not None else tuple(
        a for a in ("data", "fsdp") if a in mesh.shape)
    if not names:
        raise ValueError(f"no batch axes: pass axis_names, mesh axes are {tuple(mesh.shape)}")
    for a in names:
        if a not in mesh.shape:
            raise ValueError(f"axis {a!r} is not in the mesh axes {tuple(mesh.shape)}")
    return names


def _shard(local_fn, mesh, axes, x, y, scalars, check_vma=True):
    spec = P(axes, None)
    fn = jax.shard_map(local_fn, mesh=mesh, in_specs=(spec, spec) + (P(),) * len(scalars), out_specs=P(),
                       check_vma=check_vma)
    return fn(x, y, *scalars)


def _prepare_sharded(image_features, text_features, scalars, mesh, axis_names, validate):
    out = _prepare(image_features, text_features, scalars, validate)
    axes = _batch_axes(mesh, axis_names)
    n = 1
    for a in axes:
        n *= mesh.shape[a]
    _check_divisible(out[0].shape[0], n, axes)
    return axes, out


def _check_divisible(batch: int, num_shards: int, axis_names: Sequence[str]) -> None:
    """Raise `ValueError` when the global batch does not split evenly over the mesh axes."""
    if num_shards < 1:
        raise ValueError(f"mesh axes {tuple(axis_names)} have no devices")
    if batch % num_shards:
        raise ValueError(f"global batch B={batch} is not divisible by the {num_shards} devices on "
                         f"mesh axes {tuple(axis_names)}; pad or drop to a multiple of {num_shards}")


def sharded_clip_loss(image_features, text_features, logit_scale, logit_bias=None, *, mesh: Mesh,
                      axis_names: Sequence[str] | None = None, label_smoothing: float = 0.0,
                      block_size: int | None = None, lse_fn: Callable | None = None,
                      validate: bool = True, check_vma: bool = True) -> jax.Array:
    """`clip_loss` over a batch split across `mesh` (open_clip local loss + gather with grad).

    Args:
      image_features, text_features: global `[B, D]` arrays; B divisible by the devices
        on `axis_names`.
      logit_scale: scalar multiplier (exponentiated); logit_bias: optional scalar.
      mesh: the device mesh.
      axis_names: mesh axes that split the batch (default: "data" and "fsdp" present in the mesh).
      label_smoothing: torch-style eps.
      block_size: stream per-device logits in column blocks of this size.
      lse_fn: replacement row log-sum-exp (e.g. the Pallas kernel).
      validate: check finiteness when the inputs are concrete.
      check_vma: forwarded to `jax.shard_map`. Leave True; pass False only to
        run a Pallas kernel in `interpret=True` mode inside the loss (the Pallas
        interpreter does not track device variance). Values and gradients are
        the same either way.

    Returns:
      Scalar float32 loss.
    """
    label_smoothing = _check_smoothing(label_smoothing)
    if block_size is not None:
        block_size = checks.positive_int("block_size", block_size)
    axes, (x, y, scale, bias) = _prepare_sharded(
        image_features, text_features, {"logit_scale": logit_scale, "logit_bias": logit_bias},
        mesh, axis_names, validate)
    scalars = (scale,) if bias is None else (scale, bias)

    def local(xl, yl, s, *maybe_b):
        return clip_loss_local(xl, yl, s, maybe_b[0] if maybe_b else None, axis_name=axes,
                               label_smoothing=label_smoothing, block_size=block_size, lse_fn=lse_fn)

    return _shard(local, mesh, axes, x, y, scalars, check_vma)


def sharded_siglip_loss(image_features, text_features, logit_scale, logit_bias, *, mesh: Mesh,
                        axis_names: Sequence[str] | None = None, block_size: int | None = None,
                        pair_sum_fn: Callable | None = None, validate: bool = True,
                        check_vma: bool = True) -> jax.Array:
    """`siglip_loss` over a batch split across `mesh`, by a `ppermute` ring of text blocks.

    Args:
      image_features, text_features: global `[B, D]` arrays.
      logit_scale: scalar t (exponentiated); logit_bias: scalar b.
      mesh, axis_names: as in `sharded_clip_loss`.
      block_size: stream each per-device `[b, b]` block in column blocks of this size.
      pair_sum_fn: replacement for `sigmoid_row_sums` (e.g. the Pallas kernel).
      validate: check finiteness when the inputs are concrete.
      check_vma: as in `sharded_clip_loss`.

    Returns:
      Scalar float32 loss.
    """
    if logit_bias is None:
        raise ValueError("sharded_siglip_loss needs logit_bias (SigLIP initialises it to -10)")
    if block_size is not None:
        block_size = checks.positive_int("block_size", block_size)
    axes, (x, y, scale, bias) = _prepare_sharded(
        image_features, text_features, {"logit_scale": logit_scale, "logit_bias": logit_bias},
        mesh, axis_names, validate)

    def local(xl, yl, s, b):
        return siglip_loss_local(xl, yl, s, b, axis_name=axes, block_size=block_size,
                                 pair_sum_fn=pair_sum_fn)

    return _shard(local, mesh, axes, x, y, (scale, bias), check_vma)


def sharded_cloob_loss(image_features, text_features, inv_tau, *, hopfield_beta=14.3, mesh: Mesh,
                       axis_names: Sequence[str] | None = None, validate: bool = True) -> jax.Array:
    """`cloob_loss` over a batch split across `mesh` (gather-based).

    Args:
      image_features, text_features: global `[B, D]` L2-normalised arrays.
      inv_tau: scalar 1/tau (exponentiated); hopfield_beta: Hopfield beta.
      mesh, axis_names: as in `sharded_clip_loss`.
      validate: check finiteness when the inputs are concrete. The Hopfield retrievals run
        inside `shard_map`, on tracers, so unlike `cloob_loss` a zero retrieval is not
        reported: it stays a zero vector (`clipjax.checks`, rule 3).

    Returns:
      Scalar float32 loss.
    """
    axes, (x, y, inv_tau, beta) = _prepare_sharded(
        image_features, text_features, {"inv_tau": inv_tau, "hopfield_beta": hopfield_beta},
        mesh, axis_names, validate)

    def local(xl, yl, t, bt):
        return cloob_loss_local(xl, yl, t, bt, axis_name=axes)

    return _shard(local, mesh, axes, x, y, (inv_tau, beta))
