"""AdaNeg (Zhang & Zhang, NeurIPS 2024): test-time adaptive negative proxies with a memory bank.

Reference: `YBZh/OpenOOD-VLM:openood/postprocessors/ttaprompt_postprocessor.py:
TTAPromptPostprocessor_noadagap.postprocess` (methods.md §10). The score is online
and order-dependent: the memory is the carry of a `lax.scan` over batches of
`batch_size` images, and each batch is scored with the memory *after* that
batch's writes, exactly like the reference's per-batch loop (OpenOOD runs it with
batch size 256). Per batch:

1. Vanilla logits `l = logit_scale * cos(x, [ID labels; negative labels])` and the
   NegLabel grouped ID probability `S_van` (G = `num_groups` groups after a
   seeded permutation, the remainder dropped).
2. Writes, sample by sample in batch order: if `S_van > thres + gap * (1 - thres)`
   the image feature goes to the slot of its argmax ID label with entropy
   `H(softmax(l_ID))`; if `S_van < thres - gap * thres`, to the slot of its argmax
   negative label with entropy `H(softmax(l_neg))` (H uses `log(p + 1e-8)`). A slot
   holds the label's text feature plus up to `memory_length - 1` image features
   (the reference's `memleng` counts the text slot and never fills its last slot).
   When full, the entry with the highest entropy (first one on ties) is replaced
   if some stored entropy exceeds the new one.
3. Proxies: task-adaptive `normalize(sum of the slot)` (the reference's
   normalised mean), or sample-adaptive `normalize(sum_m exp(-beta (1 - x.m)) m)`
   (`beta = int(5.5) = 5` in the reference).
4. `S_ada` = grouped ID probability of `logit_scale * cos(x, proxies)`; the score is
   `S_ada + lambda * S_van` (`in_score=combine`).

ID and negative writes go to disjoint slots, so processing each batch's samples
once in order gives the same memory as the reference's ID loop then OOD loop. The
write decisions depend only on each slot's entropies and fill count, so the
sequential scan over images carries only those (`[C, L]`, `[C]`); the features are
then written in one scatter per batch (the last write to an entry wins). For the
sample-adaptive proxies the norm of `sum_m w_m m` comes from a Gram matrix per slot,
updated for the written slots, so no `[B, C, D]` tensor is formed.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from clipjax import checks
from clipjax.ood.neglabel import check_negative_inputs, grouped_id_probability

__all__ = ["AdaNegOutput", "AdaNegState", "adaneg_scores", "adaneg_update", "init_memory"]


class AdaNegState(NamedTuple):
    """The memory bank, carried through the scan. C = K ID labels + M negative labels, L = memory_length.

    Attributes:
      memory: `[C, L, D]` slot contents; `memory[:, 0]` are the label text features.
      entropy: `[C, L]` entropy of each stored feature (0 for the text and empty entries).
      count: `[C]` int32 number of filled entries per slot (starts at 1: the text feature).
      slot_sum: `[C, D]` sum of each slot's entries (the task-adaptive proxy before normalising).
      gram: `[C, L, L]` inner products of each slot's entries.
    """

    memory: jax.Array
    entropy: jax.Array
    count: jax.Array
    slot_sum: jax.Array
    gram: jax.Array


class AdaNegOutput(NamedTuple):
    """Per-image outputs, each `[N]`.

    Attributes:
      score: `S_ada + lambda * S_van` (ID-ness, higher = more ID).
      vanilla: `S_van`, the NegLabel grouped score with the fixed text labels.
      adaptive: `S_ada`, the grouped score with the adaptive proxies.
      prediction: int32 ID class from `argmax(softmax(l) + lambda * softmax(l_ada))` over ID labels.
    """

    score: jax.Array
    vanilla: jax.Array
    adaptive: jax.Array
    prediction: jax.Array


def init_memory(id_emb: jax.Array, neg_emb: jax.Array, memory_length: int = 10, *,
                validate: bool = True) -> AdaNegState:
    """An empty memory bank holding only the (normalised) label text features.

    Args:
      id_emb: `[K, D]` ID label embeddings.
      neg_emb: `[M, D]` negative label embeddings.
      memory_length: L, entries per slot including the text feature (`memleng`, 10).
      validate: check concrete inputs for NaN/inf and all-zero rows (`clipjax.checks`).
    """
    memory_length = checks.positive_int("memory_length", memory_length)
    id_emb = checks.array("id_emb", id_emb, "[K, D]")
    neg_emb = checks.array("neg_emb", neg_emb, "[M, D]")
    checks.same_dim(id_emb=id_emb, neg_emb=neg_emb)
    checks.nonzero_rows("id_emb", id_emb, validate=validate)
    checks.nonzero_rows("neg_emb", neg_emb, validate=validate)
    text = checks.l2_normalize(jnp.concatenate([id_emb, neg_emb], axis=0)).astype(jnp.float32)
    c, d = text.shape
    memory = jnp.zeros((c, memory_length, d), text.dtype).at[:, 0].set(text)
    gram = jnp.zeros((c, memory_length, memory_length), text.dtype).at[:, 0, 0].set(jnp.sum(text * text, -1))
    return AdaNegState(memory=memory, entropy=jnp.zeros((c, memory_length), text.dtype),
                       count=jnp.ones((c,), jnp.int32), slot_sum=text, gram=gram)


def _entropy(logits):
    p = jax.nn.softmax(logits, axis=-1)
    return -jnp.sum(p * jnp.log(p + 1e-8), axis=-1)


def _id_prediction(logits, ada_logits, num_id, lambda_):
    """argmax over ID labels of softmax(logits) + lambda * softmax(ada_logits), both softmaxes over all labels.

    Computed in log space shifted by the largest ID term so that images far from every ID
    label (whose ID probabilities underflow float32) still get the reference's argmax.
    """
    log_p = logits[:, :num_id] - jax.nn.logsumexp(logits, -1, keepdims=True)
    log_q = ada_logits[:, :num_id] - jax.nn.logsumexp(ada_logits, -1, keepdims=True)
    shift = jnp.maximum(log_p.max(-1, keepdims=True), log_q.max(-1, keepdims=True))
    mixed = jnp.exp(log_p - shift) + lambda_ * jnp.exp(log_q - shift)
    return jnp.argmax(mixed, -1).astype(jnp.int32)


def _decide_one(carry, item):
    """The reference's write rule for one image on the small per-slot state (entropies, counts).

    Which entry an image overwrites depends only on the slot's entropies and fill count, not on
    the stored features, so the sequential part of the scan carries just `[C, L]` + `[C]`.
    Returns whether the image is written and at which entry.
    """
    entropy_all, count_all = carry
    slot, ent, active = item
    take = partial(jax.lax.dynamic_index_in_dim, index=slot, axis=0, keepdims=False)
    put = partial(jax.lax.dynamic_update_index_in_dim, index=slot, axis=0)
    entropy, count = jax.lax.optimization_barrier((take(entropy_all), take(count_all)))
    full = count >= entropy.shape[0]
    target = jnp.where(full, jnp.argmax(entropy), count).astype(jnp.int32)
    write = active & (~full | jnp.any(ent < entropy))
    old = jax.lax.dynamic_index_in_dim(entropy, target, 0, keepdims=False)
    entropy = jax.lax.dynamic_update_index_in_dim(entropy, jnp.where(write, ent, old), target, 0)
    count = count + (active & ~full).astype(jnp.int32)
    return (put(entropy_all, entropy), put(count_all, count)), (write, target)


def _apply_writes(state: AdaNegState, slot, target, write, x):
    """Write a batch's images into the memory at once: the last write to an entry wins.

    Args:
      slot, target, write: `[B]` slot, entry and write flag of each image, in batch order.
      x: `[B, D]` normalised image features.
    """
    b = slot.shape[0]
    later = jnp.arange(b)[None, :] > jnp.arange(b)[:, None]
    overwritten = jnp.any(later & write[None, :] & (slot[None, :] == slot[:, None])
                          & (target[None, :] == target[:, None]), axis=1)
    last = write & ~overwritten  # unique (slot, entry) pairs
    drop = jnp.where(last, slot, state.memory.shape[0])  # out of range: ignored by mode="drop"
    memory = state.memory.at[drop, target].set(x, mode="drop")
    # The written slots' sums and Gram matrices are recomputed from their new contents (images
    # sharing a slot compute identical values, so the scatter order does not matter). Reading the
    # old entries instead would make XLA copy the whole memory to keep them alive.
    slots = memory[slot]  # [B, L, D]
    slot_sum = state.slot_sum.at[drop].set(slots.sum(axis=1), mode="drop")
    gram = state.gram.at[drop].set(jnp.einsum("bld,bmd->blm", slots, slots), mode="drop")
    return memory, slot_sum, gram


def adaneg_update(state: AdaNegState, image_emb: jax.Array, valid: jax.Array, *, num_id: int,
                  permutation: jax.Array | None, num_groups: int = 5, logit_scale: float = 100.0,
                  threshold: float = 0.5, gap: float = 0.5, lambda_: float = 0.1,
                  sample_adaptive: bool = False, beta: float = 5.0,
                  text: jax.Array | None = None) -> tuple[AdaNegState, AdaNegOutput]:
    """One reference `postprocess` call: write a batch into the memory, then score it.

    Args:
      state: the memory bank (`init_memory`).
      image_emb: `[B, D]` image embeddings (normalised here).
      valid: `[B]` bool; padded rows (False) never write.
      num_id: K, the number of ID labels (the first K slots).
      permutation: `[M - M % G]` order of the kept negatives, or None.
      num_groups: G.
      logit_scale: 100 (logits = 100 cos).
      threshold, gap: write thresholds `thres + gap (1 - thres)` and `thres - gap thres`.
      lambda_: weight of the vanilla score in the final score.
      sample_adaptive: sample-adaptive proxies instead of task-adaptive ones.
      beta: sharpness of the sample-adaptive weights.
      text: `[C, D]` the label text features `state.memory[:, 0]`, if already at hand (inside a
        scan, passing them keeps XLA from copying the memory to read its first column).

    Returns:
      The updated state and the batch's `AdaNegOutput` (each field `[B]`).
    """
    x = checks.l2_normalize(image_emb.astype(jnp.float32))
    text = state.memory[:, 0] if text is None else text
    logits = logit_scale * (x @ text.T)  # [B, C]
    vanilla = grouped_id_probability(logits[:, :num_id], logits[:, num_id:], num_groups, permutation)

    id_logits, neg_logits = logits[:, :num_id], logits[:, num_id:]
    to_id = valid & (vanilla > threshold + gap * (1.0 - threshold))
    to_neg = valid & (vanilla < threshold - gap * threshold)
    slot = jnp.where(to_id, jnp.argmax(id_logits, -1), num_id + jnp.argmax(neg_logits, -1)).astype(jnp.int32)
    ent = jnp.where(to_id, _entropy(id_logits), _entropy(neg_logits))
    (entropy, count), (write, target) = jax.lax.scan(_decide_one, (state.entropy, state.count),
                                                     (slot, ent, to_id | to_neg))
    memory, slot_sum, gram = _apply_writes(state, slot, target, write, x)
    state = AdaNegState(memory, entropy, count, slot_sum, gram)

    if sample_adaptive:
        sim = jnp.einsum("bd,cld->bcl", x, state.memory)  # [B, C, L]
        w = jnp.exp(-beta * (1.0 - sim))
        numer = jnp.sum(w * sim, axis=-1)
        norm_sq = jnp.einsum("bcl,clm,bcm->bc", w, state.gram, w)
        ada_logits = logit_scale * numer / jnp.sqrt(jnp.maximum(norm_sq, 1e-24))
    else:
        ada_logits = logit_scale * (x @ checks.l2_normalize(state.slot_sum).T)
    adaptive = grouped_id_probability(ada_logits[:, :num_id], ada_logits[:, num_id:], num_groups, permutation)
    prediction = _id_prediction(logits, ada_logits, num_id, lambda_)
    return state, AdaNegOutput(adaptive + lambda_ * vanilla, vanilla, adaptive, prediction)


@partial(jax.jit, static_argnames=("batch_size", "num_id", "num_groups", "sample_adaptive"))
def _adaneg_scan(state, image_emb, permutation, *, batch_size, num_id, num_groups, logit_scale, threshold, gap,
                 lambda_, sample_adaptive, beta):
    n, d = image_emb.shape
    pad = (-n) % batch_size
    feats = jnp.pad(image_emb, ((0, pad), (0, 0))).reshape(-1, batch_size, d)
    valid = (jnp.arange(n + pad) < n).reshape(-1, batch_size)
    step = partial(adaneg_update, num_id=num_id, permutation=permutation, num_groups=num_groups,
                   logit_scale=logit_scale, threshold=threshold, gap=gap, lambda_=lambda_,
                   sample_adaptive=sample_adaptive, beta=beta, text=state.memory[:, 0])
    state, out = jax.lax.scan(lambda s, xs: step(s, *xs), state, (feats, valid))
    return state, jax.tree.map(lambda a: a.reshape(-1)[:n], out)


def adaneg_scores(image_emb: jax.Array, id_emb: jax.Array, neg_emb: jax.Array, *, batch_size: int = 256,
                  memory_length: int = 10, num_groups: int = 5, seed: int | jax.Array = 0,
                  permutation: jax.Array | None = None, logit_scale: float = 100.0, threshold: float = 0.5,
                  gap: float = 0.5, lambda_: float = 0.1, sample_adaptive: bool = False, beta: float = 5.0,
                  state: AdaNegState | None = None, return_state: bool = False, validate: bool = True):
    """AdaNeg scores of a stream of images, in the given order.

    Args:
      image_emb: `[N, D]` test image embeddings, in stream order (the score depends on it).
      id_emb: `[K, D]` ID label embeddings.
      neg_emb: `[M, D]` negative label embeddings (NegLabel-mined, 10k in the paper).
      batch_size: images per reference `postprocess` call (256 in the paper's script); each batch
        is scored after its own writes. `N` need not be a multiple (the last batch is padded).
      memory_length: `memleng` (10): entries per slot including the text feature.
      num_groups: `group_num` (5).
      seed, permutation: as in `neglabel_score` (the reference uses `torch.manual_seed(0)`).
      logit_scale: 100.
      threshold, gap: `thres` (0.5) and `gap` (0.5).
      lambda_: `lambdaval` (0.1).
      sample_adaptive: `samada` (False in the paper's main setting).
      beta: 5 (the reference truncates 5.5 to int).
      state: continue from an earlier memory instead of a fresh one (the stream goes on).
      return_state: also return the final `AdaNegState`.
      validate: check concrete inputs for NaN/inf, all-zero rows and duplicate ID labels.

    Returns:
      `AdaNegOutput` with `[N]` fields, or `(AdaNegOutput, AdaNegState)` with `return_state`.
    """
    image_emb, id_emb, neg_emb, permutation = check_negative_inputs(image_emb, id_emb, neg_emb, num_groups,
                                                                    permutation, seed, validate)
    m = neg_emb.shape[0]
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if state is None:
        state = init_memory(id_emb, neg_emb, memory_length, validate=False)
    elif state.memory.shape[0] != id_emb.shape[0] + m or state.memory.shape[2] != image_emb.shape[1]:
        raise ValueError(f"state holds {state.memory.shape[0]} slots of dimension {state.memory.shape[2]}; "
                         f"expected {id_emb.shape[0] + m} (K + M) of dimension {image_emb.shape[1]}")
    final, out = _adaneg_scan(state, image_emb, permutation, batch_size=batch_size, num_id=id_emb.shape[0],
                              num_groups=num_groups, logit_scale=logit_scale, threshold=threshold, gap=gap,
                              lambda_=lambda_, sample_adaptive=sample_adaptive, beta=beta)
    return (out, final) if return_state else out
