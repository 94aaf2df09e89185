"""Gradient accumulation that keeps every negative (open_clip `accum_freq` semantics).

A contrastive loss over a batch of B pairs couples all B embeddings, so the
naive "average the gradients of K independent micro-batches" trick changes the
loss: each micro-batch would only see its own B/K negatives. open_clip's
`accum_freq` (`open_clip_train/train.py`) instead

1. encodes every micro-batch without gradients and caches the features,
2. for each micro-batch, re-encodes it with gradients, splices those features
   into the cache, evaluates the loss over the *whole* batch and backpropagates.

The sum of those K backward passes is exactly the full-batch gradient. Here
the same gradient is computed in the GradCache form, which evaluates the loss
once instead of K times:

1. `features = encode(params, mb_k)` for every micro-batch (forward only);
2. `dL/dfeatures` and `dL/dparams` (e.g. the logit scale) of the loss over the
   concatenated features;
3. for each micro-batch, the VJP of `encode` at `(params, mb_k)` with the
   cotangent `dL/dfeatures_k`, summed into the gradient.

Only one micro-batch's activations are alive at a time (`lax.scan` over the
micro-batches), and the result equals `jax.grad` of the full-batch loss.
Randomness inside `encode` (dropout) must be a function of the micro-batch
(pass a key in it), so that the re-encoding in step 3 repeats step 1.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from clipjax.sharding import constrain

__all__ = ["accumulate_contrastive_grads", "split_micro_batches"]

PyTree = Any


def split_micro_batches(batch: PyTree, num_micro_batches: int) -> PyTree:
    """Split every leaf `[B, ...]` of `batch` into K strided micro-batches `[K, B / K, ...]`.

    Micro-batch `k` holds rows `k, k + K, k + 2K, ...`. On a mesh the batch is split over devices in
    contiguous blocks of `B / n` rows, so with `B / n` divisible by K every micro-batch still has
    `B / (n K)` rows on every device: all devices work on every micro-batch (a contiguous split
    would put each micro-batch on a subset of the devices). The micro-batch axis is constrained
    replicated and the rows over the batch axes (`clipjax.sharding`), so XLA keeps that layout.

    Raises:
      ValueError: B is not divisible by `num_micro_batches` or leaves disagree on B.
    """
    leaves = jax.tree.leaves(batch)
    if not leaves:
        raise ValueError("batch has no arrays")
    sizes = {leaf.shape[0] for leaf in leaves}
    if len(sizes) != 1:
        raise ValueError(f"all batch leaves must share the leading size B, got {sorted(sizes)}")
    (b,) = sizes
    if num_micro_batches < 1 or b % num_micro_batches:
        raise ValueError(f"batch B={b} is not divisible into {num_micro_batches} micro-batches")
    k = num_micro_batches

    def split(x):
        y = jnp.swapaxes(x.reshape((b // k, k) + x.shape[1:]), 0, 1)
        return constrain(y, (None, "batch") + (None,) * (x.ndim - 1))

    return jax.tree.map(split, batch)


def _merge_micro(tree: PyTree) -> PyTree:
    """Inverse of `split_micro_batches`: `[K, b, ...]` -> `[K * b, ...]` in the original row order."""
    def merge(x):
        y = jnp.swapaxes(x, 0, 1)
        return constrain(y.reshape((x.shape[0] * x.shape[1],) + x.shape[2:]), ("batch",) + (None,) * (x.ndim - 2))

    return jax.tree.map(merge, tree)


def accumulate_contrastive_grads(encode_fn: Callable[[PyTree, PyTree], PyTree],
                                 loss_fn: Callable[[PyTree, PyTree], jax.Array],
                                 params: PyTree, micro_batches: PyTree) -> tuple[jax.Array, PyTree]:
    """Loss and gradient of a contrastive loss over all micro-batches, encoding one at a time.

    Args:
      encode_fn: `encode_fn(params, micro_batch) -> features`, a pytree of
        `[b, ...]` arrays (e.g. `(image_emb [b, D], text_emb [b, D])`).
      loss_fn: `loss_fn(params, features) -> scalar`, where `features` has
        the same structure with leaves `[K * b, ...]` (the whole batch,
        rows in their original order). `params` is passed so the loss can use
        learned scalars (logit scale, bias).
      params: the parameter pytree to differentiate.
      micro_batches: pytree of `[K, b, ...]` leaves (see `split_micro_batches`).

    Returns:
      `(loss, grads)`: the full-batch loss and `d loss / d params`, equal to
      `jax.value_and_grad(lambda p: loss_fn(p, encode_fn(p, full_batch)))(params)`
      for an `encode_fn` that treats rows independently.
    """
    # 1. cache features of every micro-batch, no gradients kept
    cached = jax.lax.map(lambda mb: encode_fn(params, mb), micro_batches)
    cached = jax.lax.stop_gradient(cached)

    # 2. loss over the whole batch; gradients w.r.t. params and every feature
    loss, (grad_direct, grad_features) = jax.value_and_grad(loss_fn, argnums=(0, 1))(
        params, _merge_micro(cached))
    k = jax.tree.leaves(micro_batches)[0].shape[0]
    grad_features = split_micro_batches(grad_features, k)

    # 3. re-encode each micro-batch with gradients and pull its feature cotangent back
    def step(acc, inputs):
        mb, cotangent = inputs
        _, vjp = jax.vjp(lambda p: encode_fn(p, mb), params)
        (g,) = vjp(cotangent)
        return jax.tree.map(jnp.add, acc, g), None

    grads, _ = jax.lax.scan(step, grad_direct, (micro_batches, grad_features))
    return loss, grads
