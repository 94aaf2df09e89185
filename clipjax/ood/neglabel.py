"""NegLabel (Jiang et al., ICLR 2024): negative labels mined from a word list, and the grouped score.

Mining (methods.md §9, `CLIPScalableClassifier.__init__`): for each candidate word
embedding (nouns prompted "the nice {}", adjectives "This is a {} photo"), take the
`percentile` quantile (linear interpolation, as `torch.quantile`) over the ID labels
of the cosine similarity; sort ascending and keep the lowest `fraction` of the
nouns and the lowest `fraction` of the adjectives, nouns first.

Score (`ScalableClassifier.grouping`): with logits `l = logit_scale * cos`
(`logit_scale = 100`, i.e. tau = 0.01), drop the last `M % G` negatives, permute
the rest with a seeded permutation, split into `G` groups and average over groups

    S_g(x) = sum_i e^{l_i} / (sum_i e^{l_i} + sum_{j in group g} e^{l~_j}),

computed stably as `sigmoid(logsumexp(l_ID) - logsumexp(l_neg_g))`. The reference
permutes with `torch.manual_seed(0)`; a jax permutation cannot reproduce it bit
for bit, so pass `permutation=` to use a given one (for example torch's) or
`num_groups=1` to avoid permuting.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from clipjax import checks
from clipjax.ood.scores import cosine_similarity

__all__ = [
    "NegativeLabels",
    "group_permutation",
    "grouped_id_probability",
    "mine_negative_labels",
    "neglabel_score",
    "percentile_similarity",
]


class NegativeLabels(NamedTuple):
    """Indices of the mined negative labels, each sorted by ascending percentile similarity.

    Attributes:
      noun_index: `[int(M_noun * fraction)]` int32 indices into the noun candidates.
      adjective_index: `[int(M_adj * fraction)]` int32 indices into the adjective candidates.
      noun_similarity: `[M_noun]` percentile similarity of every noun candidate to the ID labels.
      adjective_similarity: `[M_adj]` the same for the adjectives.
    """

    noun_index: jax.Array
    adjective_index: jax.Array
    noun_similarity: jax.Array
    adjective_similarity: jax.Array

    def select(self, noun_emb: jax.Array, adjective_emb: jax.Array | None = None) -> jax.Array:
        """The negative label embeddings `[M_neg, D]`: selected nouns, then selected adjectives."""
        nouns = jnp.asarray(noun_emb)[self.noun_index]
        if adjective_emb is None:
            return nouns
        return jnp.concatenate([nouns, jnp.asarray(adjective_emb)[self.adjective_index]], axis=0)


def _sortable_keys(values):
    """float32 -> uint32 keys with the same order (bit patterns, sign-corrected)."""
    bits = jax.lax.bitcast_convert_type(values, jnp.int32)
    key = jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return jax.lax.bitcast_convert_type(key, jnp.uint32) ^ jnp.uint32(0x80000000)


def _from_key(ukey):
    key = jax.lax.bitcast_convert_type(ukey ^ jnp.uint32(0x80000000), jnp.int32)
    return jax.lax.bitcast_convert_type(jnp.where(key < 0, key ^ 0x7FFFFFFF, key), jnp.float32)


def _linear_quantile(values, q: float):
    """`quantile(values, q, axis=-1, method="linear")` of float32 rows without sorting them.

    The order statistic at `floor(q (K - 1))` is found exactly by a 32-step bisection on the
    values' order-preserving integer keys (a count per step), and the next one as the smallest
    larger value. XLA's CPU sort and `top_k` are ~10x slower than this for K = 1000.
    """
    k = values.shape[-1]
    pos = q * (k - 1)
    lo = int(np.floor(pos))
    keys = _sortable_keys(values.astype(jnp.float32))

    def step(_, bounds):
        low, high = bounds
        mid = low + (high - low) // 2
        enough = jnp.sum(keys <= mid[..., None], axis=-1) >= lo + 1
        return jnp.where(enough, low, mid + 1), jnp.where(enough, mid, high)

    shape = values.shape[:-1]
    start = (jnp.zeros(shape, jnp.uint32), jnp.full(shape, 0xFFFFFFFF, jnp.uint32))
    key_lo = jax.lax.fori_loop(0, 32, step, start)[0]
    v_lo = _from_key(key_lo)
    tied = jnp.sum(keys <= key_lo[..., None], axis=-1) >= lo + 2
    above = jnp.min(jnp.where(keys > key_lo[..., None], values, jnp.inf), axis=-1)
    v_hi = jnp.where(tied | (lo + 1 >= k), v_lo, above)
    return v_lo + (pos - lo) * (v_hi - v_lo)


@partial(jax.jit, static_argnames=("percentile", "chunk"))
def _percentile_similarity(candidate_emb, id_emb, percentile, chunk):
    id_emb = checks.l2_normalize(id_emb)

    def one(rows):
        return _linear_quantile(cosine_similarity(rows, id_emb, validate=False), percentile)

    return jax.lax.map(one, candidate_emb, batch_size=chunk)


def percentile_similarity(candidate_emb: jax.Array, id_emb: jax.Array, percentile: float = 0.95, *,
                          chunk: int = 1024, validate: bool = True) -> jax.Array:
    """The `percentile` quantile over ID labels of cos(candidate, id label), per candidate.

    Args:
      candidate_emb: `[M, D]` candidate (word) embeddings.
      id_emb: `[K, D]` ID label embeddings.
      percentile: quantile in [0, 1] (NegLabel's `pencentile`, 0.95).
      chunk: candidates processed per step, bounding memory to `chunk * K` floats.
      validate: check concrete inputs for NaN/inf and all-zero rows (both are normalised).

    Returns:
      `[M]` similarities.
    """
    candidate_emb = checks.array("candidate_emb", candidate_emb, "[M, D]")
    id_emb = checks.array("id_emb", id_emb, "[K, D]")
    checks.same_dim(candidate_emb=candidate_emb, id_emb=id_emb)
    if not 0.0 <= float(percentile) <= 1.0:
        raise ValueError(f"percentile must be in [0, 1], got {percentile}")
    chunk = checks.positive_int("chunk", chunk)
    checks.nonzero_rows("candidate_emb", candidate_emb, validate=validate)
    checks.nonzero_rows("id_emb", id_emb, validate=validate)
    return _percentile_similarity(candidate_emb, id_emb, float(percentile), chunk)


def mine_negative_labels(noun_emb: jax.Array, adjective_emb: jax.Array | None, id_emb: jax.Array,
                         percentile: float = 0.95, fraction: float = 0.15, *,
                         validate: bool = True) -> NegativeLabels:
    """Select the candidates least similar to every ID label (NegLabel's mining rule).

    Args:
      noun_emb: `[M_noun, D]` embeddings of the noun prompts ("the nice {}").
      adjective_emb: `[M_adj, D]` embeddings of the adjective prompts ("This is a {} photo"), or None.
      id_emb: `[K, D]` embeddings of the ID label prompts.
      percentile: quantile over ID labels (0.95 in NegLabel).
      fraction: share of each part kept (`neg_topk` = 0.15); `int(M * fraction)` are kept.
      validate: check concrete inputs for NaN/inf, all-zero rows and duplicate ID labels.

    Returns:
      `NegativeLabels`; `.select(noun_emb, adjective_emb)` gives the `[M_neg, D]` negatives.
    """
    noun_emb = checks.array("noun_emb", noun_emb, "[M_noun, D]")
    if adjective_emb is None:
        adjective_emb = jnp.zeros((0, noun_emb.shape[1]), noun_emb.dtype)
    adjective_emb = checks.array("adjective_emb", adjective_emb, "[M_adj, D]", min_rows=0)
    id_emb = checks.array("id_emb", id_emb, "[K, D]")
    checks.same_dim(noun_emb=noun_emb, adjective_emb=adjective_emb, id_emb=id_emb)
    if not 0.0 < float(fraction) <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    for name, x in (("noun_emb", noun_emb), ("adjective_emb", adjective_emb), ("id_emb", id_emb)):
        checks.nonzero_rows(name, x, validate=validate)
    checks.unique_rows("id_emb", id_emb, validate=validate)
    noun_sim = percentile_similarity(noun_emb, id_emb, percentile, validate=False)
    n_keep = int(noun_emb.shape[0] * fraction)
    if adjective_emb.shape[0]:
        adj_sim = percentile_similarity(adjective_emb, id_emb, percentile, validate=False)
    else:
        adj_sim = jnp.zeros((0,), noun_sim.dtype)
    a_keep = int(adjective_emb.shape[0] * fraction)
    if n_keep + a_keep == 0:
        raise ValueError(f"fraction {fraction} of {noun_emb.shape[0]} nouns and {adjective_emb.shape[0]} "
                         "adjectives keeps no negative label; pass more candidates or a larger fraction")
    noun_index = jnp.argsort(noun_sim, stable=True)[:n_keep].astype(jnp.int32)
    adj_index = jnp.argsort(adj_sim, stable=True)[:a_keep].astype(jnp.int32)
    return NegativeLabels(noun_index, adj_index, noun_sim, adj_sim)


def group_permutation(num_negatives: int, num_groups: int, seed: int | jax.Array = 0) -> jax.Array:
    """A seeded permutation of the `num_negatives - num_negatives % num_groups` kept negatives.

    Args:
      num_negatives: M, the number of negative labels.
      num_groups: G.
      seed: an int seed or a `jax.random` key.

    Returns:
      `[M - M % G]` int32 permutation (a jax one; the reference uses torch's RNG).
    """
    if num_groups < 1 or num_groups > num_negatives:
        raise ValueError(f"num_groups must be in [1, {num_negatives}] (the number of negatives), got {num_groups}")
    key = jax.random.key(seed) if isinstance(seed, (int, np.integer)) else seed
    kept = num_negatives - num_negatives % num_groups
    return jax.random.permutation(key, kept).astype(jnp.int32)


def grouped_id_probability(pos_logits: jax.Array, neg_logits: jax.Array, num_groups: int,
                           permutation: jax.Array | None = None) -> jax.Array:
    """NegLabel's grouped ID probability from ID and negative logits (jittable; `num_groups` static).

    Args:
      pos_logits: `[B, K]` logits of the ID labels.
      neg_logits: `[B, M]` logits of the negative labels.
      num_groups: G; the last `M % G` negatives are dropped first, as in the reference.
      permutation: `[M - M % G]` order of the kept negatives before splitting, or None (no permutation).

    Returns:
      `[B]` mean over groups of sum_i softmax_i over [ID labels, group negatives].
    """
    m = neg_logits.shape[-1]
    kept = m - m % num_groups
    neg = neg_logits[..., :kept]
    if permutation is not None:
        neg = jnp.take(neg, permutation, axis=-1)
    neg = neg.reshape(neg.shape[:-1] + (num_groups, kept // num_groups))
    lse_pos = jax.nn.logsumexp(pos_logits, axis=-1)
    lse_neg = jax.nn.logsumexp(neg, axis=-1)  # [B, G]
    return jnp.mean(jax.nn.sigmoid(lse_pos[..., None] - lse_neg), axis=-1)


def check_negative_inputs(image_emb, id_emb, neg_emb, num_groups: int, permutation, seed, validate: bool):
    """Shared input checks of NegLabel and AdaNeg; returns the arrays and the group permutation (or None).

    Shapes: `[B, D]`, `[K, D]`, `[M, D]`; the permutation is `[M - M % G]` (drawn from `seed` when None
    and G > 1). With `validate`, concrete inputs are checked for NaN/inf, all-zero rows (all three are
    L2-normalised), duplicate ID labels and a permutation that is not one (`clipjax.checks`).
    """
    image_emb = checks.array("image_emb", image_emb, "[B, D]")
    id_emb = checks.array("id_emb", id_emb, "[K, D]")
    neg_emb = checks.array("neg_emb", neg_emb, "[M, D]")
    checks.same_dim(image_emb=image_emb, id_emb=id_emb, neg_emb=neg_emb)
    m = neg_emb.shape[0]
    if not 1 <= num_groups <= m:
        raise ValueError(f"num_groups must be in [1, {m}] (the number of negative labels), got {num_groups}")
    for name, x in (("image_emb", image_emb), ("id_emb", id_emb), ("neg_emb", neg_emb)):
        checks.nonzero_rows(name, x, validate=validate)
    checks.unique_rows("id_emb", id_emb, validate=validate)
    if permutation is None and num_groups > 1:
        permutation = group_permutation(m, num_groups, seed)
    if permutation is not None:
        kept = m - m % num_groups
        permutation = checks.array("permutation", permutation, "[M - M % G]", dtype="integer", min_rows=0,
                                   sizes={"M - M % G": kept}).astype(jnp.int32)
        if validate and checks.is_concrete(permutation):
            p = np.asarray(permutation)
            if not np.array_equal(np.sort(p), np.arange(p.shape[0])):
                raise ValueError(f"permutation is not a permutation of range(M - M % num_groups) = range({kept})")
    return image_emb, id_emb, neg_emb, permutation


@partial(jax.jit, static_argnames=("num_groups",))
def _neglabel(image_emb, id_emb, neg_emb, logit_scale, num_groups, permutation):
    x = checks.l2_normalize(image_emb)
    pos = logit_scale * cosine_similarity(x, id_emb, validate=False)
    neg = logit_scale * cosine_similarity(x, neg_emb, validate=False)
    return grouped_id_probability(pos, neg, num_groups, permutation)


def neglabel_score(image_emb: jax.Array, id_emb: jax.Array, neg_emb: jax.Array, *, logit_scale: float = 100.0,
                   num_groups: int = 100, seed: int | jax.Array = 0, permutation: jax.Array | None = None,
                   validate: bool = True) -> jax.Array:
    """NegLabel ID-ness score (higher = more ID).

    Args:
      image_emb: `[B, D]` image embeddings (normalised here).
      id_emb: `[K, D]` ID label embeddings ("the nice {c}" in NegLabel).
      neg_emb: `[M, D]` negative label embeddings, e.g. `mine_negative_labels(...).select(...)`.
      logit_scale: 1/tau; logits are `logit_scale * cos` (100, tau = 0.01).
      num_groups: G (NegLabel's `ngroup`); 1 gives the plain ID probability over all labels.
      seed: seed or key of the permutation when `permutation` is None and G > 1.
      permutation: explicit `[M - M % G]` permutation of the kept negatives.
      validate: check concrete inputs for NaN/inf, all-zero rows and duplicate ID labels.

    Returns:
      `[B]` scores in (0, 1).
    """
    image_emb, id_emb, neg_emb, permutation = check_negative_inputs(image_emb, id_emb, neg_emb, num_groups,
                                                                    permutation, seed, validate)
    return _neglabel(image_emb, id_emb, neg_emb, logit_scale, num_groups, permutation)
