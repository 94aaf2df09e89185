"""TCA: token condensation as training-free test-time adaptation (Wang et al., ICCV 2025; `Jo-wang/TCA`,
`clip/model.py:ResidualAttentionBlock_Ours`, `Transformer_drop`, `VisionTransformer`, `clip/utils.py:
coreset_averaging`, `utils.py:cls_feature_similarity`, `runner.py`).

At a few ViT blocks (layers 3, 6, 9 of ViT-B/16, 0-based block indices) the block condenses its tokens after
attention, before the MLP. With N tokens (CLS included) and ratio r:

- keep = ceil((1 - r)(N - 1)), m = N - keep (Python's `math.ceil` on the same float expression);
- patches are ranked by the head-averaged CLS attention (CLS query, patch keys);
- the top keep - 2m patches are kept; the next 2m are merged into 4 tokens by coreset averaging (k-center
  greedy centres, nearest-centre clusters, inverse-distance weights with weight 1 for the centre itself); the
  other m - 1 patches are fused into one token sum_n a_n x_n with their raw (unnormalised) mean attention a_n;
- the block continues with the MLP on [CLS, kept, 4 merged, fused]: N' = keep - 2m + 6 tokens. Every count is a
  static function of N and r (`token_counts`), so shapes are static.

Anchors: the reservoir holds, per predicted class, up to `reservoir_size` entries (image feature, prediction
entropy, per-layer CLS tokens after each block). Their per-class means are the anchor candidates; at
condensation block i the candidate (from layer i - 1) most cosine-similar to the current CLS is prepended to
the block's tokens for attention, so it is an extra key/value of every token, then dropped. The code only
sets the candidates once every class holds two entries (`update_reservoir_sim`, `all(len > 1)`).

Logit correction (`compute_reservoir_logits`): final = clip_logits + lambda * sum over reservoir entries r of
exp(-beta (1 - sum_l w_l cos(cls_l(x), cls_l(r)))) * onehot(class(r)), w = exp(linspace(0, 1, L) / scale)
normalised. ImageNet settings (`IMAGENET`): reservoir_size 3, scale 0.1, lambda 3, beta 5.

Paper vs code; clipjax follows the code throughout:
- Ranking: the paper describes a cross-head rank consensus; the code computes the average per-head ranking
  positions but never uses them and ranks by the head-mean CLS attention (`cls_attn.mean(dim=1)`).
- The anchor is an extra key/value of the block's attention, so it also changes the residual update (the code
  keeps `tmp[1:]`), not only the ranking; the attention rows are sliced (`[:, :, 1:, 1:]`), not renormalised.
- The code's k-center greedy starts at a random token (`torch.randint`); clipjax starts at the first merge
  candidate (the best-ranked of the 2m), or at a random one per image and layer when `key` is given.
- The code runs in float16 (`.half()` merged tokens, float16 attention); clipjax in the compute dtype.
- `cls_token_list` keeps only batch element 0 (the code runs batch 1); clipjax returns one list per image.
- With r = 0 and an anchor cache, the code's drop_rate == 0 branch reads an unbound `max_token_cls` and fails;
  clipjax's r = 0 is the plain forward and ignores anchors.
- The current image enters the reservoir before its logits are corrected, so (unless evicted at once) it adds
  lambda * exp(0) = lambda to its own predicted class.
- argparse's r is 0.1, the README's 0.035. When 2m < 4 the greedy repeats centres and the code gives zero tokens
  for the empty clusters; when m = 1 the fused token is zero; clipjax reproduces both (and rejects keep < 2m).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from clipjax import checks
from clipjax.config import CLIPConfig
from clipjax.interpret import explicit
from clipjax.layers import activation

__all__ = ["DEFAULT_LAYERS", "IMAGENET", "Reservoir", "TCAOutput", "condense", "condensed_counts",
           "coreset_average", "forward_flops", "layer_weights", "reservoir_anchors", "reservoir_init",
           "reservoir_logits", "reservoir_update", "softmax_entropy", "tca_block", "tca_forward", "tca_step",
           "token_counts"]

DEFAULT_LAYERS = (3, 6, 9)
NUM_CENTERS = 4
IMAGENET = {"reservoir_size": 3, "scale": 0.1, "lambd": 3.0, "beta": 5.0}


# ----------------------------------------------------------------------------- counts
def condensed_counts(n_tokens: int, ratio: float) -> tuple[int, int]:
    """`(keep, m)` for N = `n_tokens` (CLS included): keep = ceil((1 - r)(N - 1)), m = N - keep."""
    keep = math.ceil((1 - ratio) * (n_tokens - 1))
    merged = n_tokens - keep
    if keep < 2 * merged or keep < 1:
        raise ValueError(f"ratio={ratio} is too large for {n_tokens} tokens: keep = {keep} < 2m = {2 * merged}, "
                         "so the top keep - 2m patches would be negative")
    return keep, merged


def _check_ratio(ratio) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise ValueError(f"ratio must be a number in [0, 1), got {ratio!r}")
    return float(ratio)


def _check_layers(layers, n_layers: int) -> tuple[int, ...]:
    layers = tuple(layers)
    if any(isinstance(i, bool) or not isinstance(i, int) for i in layers) or list(layers) != sorted(set(layers)) \
            or any(not 0 <= i < n_layers for i in layers):
        raise ValueError(f"layers must be increasing block indices in [0, {n_layers}), got {layers!r}")
    return layers


def token_counts(n_tokens: int, n_layers: int, layers=DEFAULT_LAYERS, ratio: float = 0.1,
                 num_centers: int = NUM_CENTERS) -> tuple[int, ...]:
    """Tokens (CLS included) leaving each of the `n_layers` blocks when `layers` condense at `ratio`."""
    layers = _check_layers(layers, n_layers) if _check_ratio(ratio) > 0 else ()
    out, n = [], n_tokens
    for i in range(n_layers):
        if i in layers:
            keep, m = condensed_counts(n, ratio)
            n = 1 + keep - 2 * m + num_centers + 1
        out.append(n)
    return tuple(out)


# ----------------------------------------------------------------------------- condensation
def _distance(a, b):
    """Euclidean distance over the last axis, broadcast."""
    return jnp.sqrt(jnp.sum(jnp.square(a - b), axis=-1))


@functools.partial(jax.jit, static_argnames=("num_centers",))
def coreset_average(tokens: jax.Array, num_centers: int = NUM_CENTERS, start: jax.Array | None = None) -> jax.Array:
    """TCA's `coreset_averaging`: k-center greedy centres, nearest-centre clusters, inverse-distance averages.

    Args:
      tokens: `[B, n, D]` the tokens to merge.
      num_centers: K, the number of merged tokens (4).
      start: optional `[B]` int, the greedy's first centre (default 0; the code draws it at random).

    Returns:
      `[B, K, D]`: per cluster sum_j w_j x_j / sum_j w_j with w_j = 1 / |x_j - c| (1 for tokens at the centre);
      a cluster left empty (repeated centres when n < K) is zero.
    """
    tokens = checks.array("tokens", tokens, "[B, n, D]")
    num_centers = checks.positive_int("num_centers", num_centers)
    b = tokens.shape[0]
    start = jnp.zeros((b,), jnp.int32) if start is None else jnp.asarray(start, jnp.int32)
    rows = jnp.arange(b)
    centers = [start]
    min_dist = _distance(tokens, tokens[rows, start][:, None])
    for _ in range(num_centers - 1):
        nxt = jnp.argmax(min_dist, axis=-1)  # first maximum, as torch.argmax
        centers.append(nxt)
        min_dist = jnp.minimum(min_dist, _distance(tokens, tokens[rows, nxt][:, None]))
    center_tokens = tokens[rows[:, None], jnp.stack(centers, axis=1)]  # [B, K, D]
    dist = _distance(tokens[:, :, None], center_tokens[:, None])  # [B, n, K]
    assign = jnp.argmin(dist, axis=-1)  # first minimum: a repeated centre keeps no tokens
    member = assign[:, :, None] == jnp.arange(num_centers)[None, None]
    weight = jnp.where(dist == 0, 1.0, 1.0 / jnp.where(dist == 0, 1.0, dist))
    weight = jnp.where(member, weight, 0.0)
    weight = weight / jnp.where(weight.sum(axis=1, keepdims=True) > 0, weight.sum(axis=1, keepdims=True), 1.0)
    return jnp.einsum("bnk,bnd->bkd", weight.astype(tokens.dtype), tokens)


@functools.partial(jax.jit, static_argnames=("ratio", "num_centers"))
def condense(x: jax.Array, cls_attention: jax.Array, *, ratio: float, num_centers: int = NUM_CENTERS,
             start: jax.Array | None = None) -> jax.Array:
    """One TCA condensation (`ResidualAttentionBlock_Ours`, after attention, before the MLP).

    Args:
      x: `[B, N, D]` tokens (CLS first) after the attention residual.
      cls_attention: `[B, N - 1]` head-mean attention of the CLS query to each patch.
      ratio: r in (0, 1).
      num_centers: merged tokens (4).
      start: optional `[B]` int, the k-center greedy's first centre among the 2m merge candidates.

    Returns:
      `[B, keep - 2m + 6, D]`: CLS, the top keep - 2m patches in descending attention, the merged tokens and
      the fused token.
    """
    x = checks.array("x", x, "[B, N, D]")
    attn = checks.array("cls_attention", cls_attention, "[B, P]", sizes={"P": x.shape[1] - 1})
    keep, m = condensed_counts(x.shape[1], _check_ratio(ratio))
    order = jax.lax.top_k(attn, attn.shape[1])[1]  # descending; the code's topk, ties to the lower index
    patches = x[:, 1:]

    def take(idx):
        return jnp.take_along_axis(patches, idx[:, :, None], axis=1)

    kept = take(order[:, :keep - 2 * m])
    merged = coreset_average(take(order[:, keep - 2 * m:keep]), num_centers, start)
    rest = order[:, keep:]
    fused = jnp.sum(take(rest) * jnp.take_along_axis(attn, rest, axis=1)[:, :, None].astype(x.dtype), axis=1,
                    keepdims=True)
    return jnp.concatenate([x[:, :1], kept, merged.astype(x.dtype), fused], axis=1)


def _attention(p: dict, y: jax.Array, heads: int, visible: jax.Array | None):
    """Multi-head attention of one block on normed tokens `y` `[B, T, D]`: `(branch [B, T, D], probs [B, H, T, T])`."""
    dtype, wide = y.dtype, jnp.promote_types(y.dtype, jnp.float32)
    a = p["attn"]

    def proj(name):
        return jnp.einsum("btd,dhk->bthk", y, a[f"{name}_kernel"].astype(dtype)) + a[f"{name}_bias"].astype(dtype)

    q, k, v = proj("q"), proj("k"), proj("v")
    logits = jnp.einsum("bthk,bshk->bhts", q, k, preferred_element_type=wide) * jnp.asarray(
        (y.shape[-1] // heads) ** -0.5, wide)
    if visible is not None:
        logits = jnp.where(visible, logits, jnp.asarray(-0.7 * jnp.finfo(wide).max, wide))
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhts,bshk->bthk", probs.astype(dtype), v)
    out = jnp.einsum("bthk,hkd->btd", out, a["out_kernel"].astype(dtype)) + a["out_bias"].astype(dtype)
    if "ls1" in p:
        out = out * p["ls1"].astype(dtype)
    return out, probs


@functools.partial(jax.jit, static_argnames=("heads", "eps", "act", "ratio", "num_centers"))
def tca_block(p: dict, x: jax.Array, *, heads: int, eps: float, act: str, ratio: float,
              num_centers: int = NUM_CENTERS, anchor: jax.Array | None = None, anchor_visible: jax.Array | None = None,
              start: jax.Array | None = None) -> jax.Array:
    """One `ResidualAttentionBlock_Ours` with condensation: attention (anchor prepended), condense, MLP.

    Args:
      p: one block's params (`explicit.tower_blocks` sliced at a layer: no layers axis).
      x: `[B, N, D]` tokens entering the block.
      heads, eps, act: the tower's heads, LayerNorm epsilon and MLP activation.
      ratio: r in (0, 1).
      num_centers: merged tokens (4).
      anchor: optional `[B, D]` residual-stream token prepended for attention only.
      anchor_visible: optional `[B]` bool; False hides the anchor key (the anchor-free attention: its weight
        is exactly 0).
      start: optional `[B]` int, the k-center greedy's first centre.

    Returns:
      `[B, N', D]` tokens leaving the block (`token_counts`).
    """
    x = checks.array("x", x, "[B, N, D]")
    visible = None
    seq = x
    if anchor is not None:
        anchor = checks.array("anchor", anchor, "[B, D]", sizes={"B": x.shape[0], "D": x.shape[2]})
        seq = jnp.concatenate([anchor[:, None].astype(x.dtype), x], axis=1)
        if anchor_visible is not None:
            key_ok = jnp.ones((x.shape[0], seq.shape[1]), bool).at[:, 0].set(jnp.asarray(anchor_visible, bool))
            visible = key_ok[:, None, None, :]
    y = explicit.layer_norm(seq, p["ln1"]["scale"], p["ln1"]["bias"], eps)
    branch, probs = _attention(p, y, heads, visible)
    if anchor is not None:
        branch, probs = branch[:, 1:], probs[:, :, 1:, 1:]
    mid = x + branch
    cls_attention = probs[:, :, 0, 1:].mean(axis=1)
    z = condense(mid, cls_attention, ratio=ratio, num_centers=num_centers, start=start)
    f = p["mlp"]
    h = explicit.layer_norm(z, p["ln2"]["scale"], p["ln2"]["bias"], eps)
    h = activation(act)(h @ f["fc1"]["kernel"].astype(z.dtype) + f["fc1"]["bias"].astype(z.dtype))
    h = h @ f["fc2"]["kernel"].astype(z.dtype) + f["fc2"]["bias"].astype(z.dtype)
    if "ls2" in p:
        h = h * p["ls2"].astype(z.dtype)
    return z + h


# ----------------------------------------------------------------------------- forward
class TCAOutput(NamedTuple):
    """`tca_forward`'s result: `embedding` `[B, E]` (unnormalised, as `encode_image(normalize=False)`),
    `cls_tokens` `[B, L, D]` (the CLS token leaving each block, pre-LN residual stream) and `token_counts`
    `[L]` int32 (tokens leaving each block, CLS included)."""

    embedding: jax.Array
    cls_tokens: jax.Array
    token_counts: jax.Array


def _select_anchor(candidates, mask, cls):
    """The candidate `[K, D]` most cosine-similar to each CLS `[B, D]` (first on ties): `[B, D]`, visible `[B]`."""
    sims = checks.l2_normalize(cls) @ checks.l2_normalize(candidates.astype(cls.dtype)).T  # [B, K]
    best = jnp.argmax(jnp.where(mask[None], sims, -jnp.inf), axis=-1)
    return candidates[best].astype(cls.dtype), jnp.broadcast_to(jnp.any(mask), best.shape)


@functools.partial(jax.jit, static_argnames=("config", "layers", "ratio", "num_centers", "dtype", "unroll"))
def tca_forward(params: Any, pixels: jax.Array, *, config: CLIPConfig, layers=DEFAULT_LAYERS, ratio: float = 0.1,
                anchors: jax.Array | None = None, anchor_mask: jax.Array | None = None, key: jax.Array | None = None,
                num_centers: int = NUM_CENTERS, dtype: str | None = None, unroll: bool = False) -> TCAOutput:
    """The ViT image tower with TCA token condensation at `layers`.

    Args:
      params: the model state.
      pixels: `[B, S, S, 3]` preprocessed NHWC pixels.
      config: the model config (static); a ViT with a class token and `pool="tok"`.
      layers: 0-based block indices that condense (static; (3, 6, 9) for ViT-B/16); () or `ratio=0` gives the
        plain forward.
      ratio: r in [0, 1) (static).
      anchors: optional `[K, L, D]` anchor candidates (`reservoir_anchors`): per class, the mean CLS token
        leaving each block; block i uses layer i - 1 (i = 0: the last layer, as the code's index -1).
      anchor_mask: optional `[K]` bool, the candidates that exist (default all); none: no anchor.
      key: optional PRNG key for random k-center starts (the code's `torch.randint`); default start 0.
      num_centers: merged tokens per condensation (4).
      dtype: compute dtype (default `config.dtype`).
      unroll: run the plain blocks one by one instead of `lax.scan` over each run of them (static; XLA's cost
        analysis counts a scan body once, so `forward_flops` unrolls).

    Returns:
      `TCAOutput(embedding [B, E], cls_tokens [B, L, D], token_counts [L])`.
    """
    cfg = config.vision
    n_layers = cfg.layers
    layers = _check_layers(layers, n_layers) if _check_ratio(ratio) > 0 else ()
    if layers and (cfg.pool != "tok" or not cfg.class_token):
        raise ValueError(f"TCA needs a class-token ViT with pool='tok', got pool={cfg.pool!r}, "
                         f"class_token={cfg.class_token}")
    x = explicit.image_tokens(params, pixels, config=config, dtype=dtype)
    if anchors is not None:
        anchors = checks.array("anchors", anchors, "[K, L, D]", sizes={"L": n_layers, "D": x.shape[-1]})
        anchor_mask = (jnp.ones(anchors.shape[:1], bool) if anchor_mask is None
                       else jnp.asarray(anchor_mask, bool).reshape(anchors.shape[:1]))
    blocks = explicit.tower_blocks(params, "image")
    counts = token_counts(x.shape[1], n_layers, layers, ratio, num_centers)
    cls, begin = [], 0
    for stop in layers + (n_layers,):
        for lo, hi in ([(i, i + 1) for i in range(begin, stop)] if unroll else [(begin, stop)] * (begin < stop)):
            seg = jax.tree.map(lambda a, lo=lo, hi=hi: a[lo:hi], blocks)
            x, rec = explicit.run_blocks(seg, x, heads=cfg.heads, eps=cfg.ln_eps, act=cfg.act)
            cls.append((rec["inputs"] + rec["attn_branch"] + rec["mlp_branch"])[:, :, 0])  # [l, B, D]
        if stop == n_layers:
            break
        anchor = visible = start = None
        if anchors is not None:
            anchor, visible = _select_anchor(anchors[:, stop - 1], anchor_mask, x[:, 0])
        if key is not None:
            m = condensed_counts(x.shape[1], ratio)[1]
            start = jax.random.randint(jax.random.fold_in(key, stop), (x.shape[0],), 0, 2 * m)
        x = tca_block(jax.tree.map(lambda a, i=stop: a[i], blocks), x, heads=cfg.heads, eps=cfg.ln_eps, act=cfg.act,
                      ratio=ratio, num_centers=num_centers, anchor=anchor, anchor_visible=visible, start=start)
        cls.append(x[None, :, 0])
        begin = stop + 1
    cls_tokens = jnp.concatenate(cls, axis=0).transpose(1, 0, 2)
    return TCAOutput(explicit.image_pool(params, x, config=config), cls_tokens, jnp.asarray(counts, jnp.int32))


# ----------------------------------------------------------------------------- reservoir
class Reservoir(NamedTuple):
    """Per-class reservoir (`runner.py:update_reservoir_sim`); slots `[:count]` hold entries sorted by entropy.

    Attributes:
      features: `[C, S, E]` normalised image features.
      entropy: `[C, S]` prediction entropies (nats).
      cls_tokens: `[C, S, L, D]` per-layer CLS tokens.
      count: `[C]` int32 entries per class (<= S).
    """

    features: jax.Array
    entropy: jax.Array
    cls_tokens: jax.Array
    count: jax.Array


def reservoir_init(num_classes: int, size: int, embed_dim: int, n_layers: int, width: int,
                   dtype: str = "float32") -> Reservoir:
    """An empty reservoir of `size` entries per class."""
    c, s = checks.positive_int("num_classes", num_classes), checks.positive_int("size", size)
    return Reservoir(jnp.zeros((c, s, checks.positive_int("embed_dim", embed_dim)), dtype), jnp.zeros((c, s), dtype),
                     jnp.zeros((c, s, checks.positive_int("n_layers", n_layers), checks.positive_int("width", width)),
                               dtype), jnp.zeros((c,), jnp.int32))


@jax.jit
def reservoir_update(state: Reservoir, feature: jax.Array, entropy: jax.Array, cls_tokens: jax.Array,
                     pred: jax.Array) -> Reservoir:
    """Add one entry to class `pred` (`update_reservoir_sim` with `div=True`, `token_sim=True`).

    The entry is appended; if the class then holds S + 1, the one with the largest entropy + similarity is
    dropped (similarity: mean cosine of its layer-mean CLS token to the others'; first on ties); the entries
    are then sorted by entropy (stable).

    Args:
      state: the reservoir.
      feature: `[E]` normalised image feature.
      entropy: scalar prediction entropy.
      cls_tokens: `[L, D]` CLS tokens leaving each block.
      pred: scalar int in [0, C), the predicted class (not checked: jitted).

    Returns:
      The updated reservoir.
    """
    size = state.entropy.shape[1]
    pred = jnp.asarray(pred, jnp.int32)
    count = state.count[pred]
    ent = jnp.concatenate([state.entropy[pred], jnp.zeros((1,), state.entropy.dtype)]).at[count].set(entropy)
    feats = jnp.concatenate([state.features[pred], state.features[pred][:1]]).at[count].set(feature)
    toks = jnp.concatenate([state.cls_tokens[pred], state.cls_tokens[pred][:1]]).at[count].set(cls_tokens)
    valid = jnp.arange(size + 1) <= count
    summary = checks.l2_normalize(toks.mean(axis=1))  # [S + 1, D]
    sims = summary @ summary.T
    sim = (sims.sum(axis=1) - jnp.diagonal(sims)) / size  # full only when count == S: then S + 1 - 1 = S others
    drop = jnp.where(count == size, jnp.argmax(ent + sim), size + 1)
    alive = valid & (jnp.arange(size + 1) != drop)
    order = jnp.argsort(jnp.where(alive, ent, jnp.inf), stable=True)[:size]
    return Reservoir(state.features.at[pred].set(feats[order]), state.entropy.at[pred].set(ent[order]),
                     state.cls_tokens.at[pred].set(toks[order]), state.count.at[pred].set(jnp.minimum(count + 1, size)))


@jax.jit
def reservoir_anchors(state: Reservoir) -> tuple[jax.Array, jax.Array]:
    """Anchor candidates (`CLIP.update_cls_token`): per class the mean of its entries' CLS tokens.

    Returns:
      `(anchors [C, L, D], mask [C] bool)`; the mask is all False until every class holds two entries (the
      code's `all(len(reservoir[key]) > 1)`), then True for the non-empty classes.
    """
    valid = jnp.arange(state.entropy.shape[1])[None, :] < state.count[:, None]
    total = jnp.einsum("cs,csld->cld", valid.astype(state.cls_tokens.dtype), state.cls_tokens)
    means = total / jnp.maximum(state.count, 1)[:, None, None].astype(total.dtype)
    return means, (state.count > 0) & jnp.all(state.count > 1)


def layer_weights(n_layers: int, scale: float = IMAGENET["scale"]) -> jax.Array:
    """`[L]` w = exp(linspace(0, 1, L) / scale), normalised to sum 1."""
    w = jnp.exp(jnp.linspace(0.0, 1.0, checks.positive_int("n_layers", n_layers)) / scale)
    return w / w.sum()


@functools.partial(jax.jit, static_argnames=("scale", "lambd", "beta"))
def reservoir_logits(cls_tokens: jax.Array, state: Reservoir, *, scale: float = IMAGENET["scale"],
                     lambd: float = IMAGENET["lambd"], beta: float = IMAGENET["beta"]) -> jax.Array:
    """TCA's logit correction `[B, C]`: lambda * sum_r exp(-beta (1 - sum_l w_l cos(cls_l(x), cls_l(r)))) onehot.

    Args:
      cls_tokens: `[B, L, D]` the images' per-layer CLS tokens.
      state: the reservoir (every valid entry of every class contributes).
      scale, lambd, beta: the layer-weight scale, lambda and beta (ImageNet: 0.1, 3, 5).

    Returns:
      `[B, C]`, added to the CLIP logits.
    """
    cls_tokens = checks.array("cls_tokens", cls_tokens, "[B, L, D]", sizes={"L": state.cls_tokens.shape[2]})
    w = layer_weights(cls_tokens.shape[1], scale).astype(cls_tokens.dtype)
    cos = jnp.einsum("bld,csld->bcsl", checks.l2_normalize(cls_tokens), checks.l2_normalize(state.cls_tokens))
    affinity = jnp.einsum("bcsl,l->bcs", cos, w)
    valid = jnp.arange(state.entropy.shape[1])[None, :] < state.count[:, None]
    return lambd * jnp.sum(jnp.where(valid[None], jnp.exp(-beta * (1.0 - affinity)), 0.0), axis=-1)


@jax.jit
def softmax_entropy(logits: jax.Array) -> jax.Array:
    """`[B]` entropy (nats) of softmax(logits `[B, C]`) (`utils.py:softmax_entropy`)."""
    return -jnp.sum(jax.nn.softmax(logits, -1) * jax.nn.log_softmax(logits, -1), axis=-1)


@functools.partial(jax.jit, static_argnames=("config", "layers", "ratio", "scale", "lambd", "beta", "dtype"))
def tca_step(params: Any, pixels: jax.Array, classifier: jax.Array, state: Reservoir, *, config: CLIPConfig,
             layers=DEFAULT_LAYERS, ratio: float = 0.1, scale: float = IMAGENET["scale"],
             lambd: float = IMAGENET["lambd"], beta: float = IMAGENET["beta"],
             dtype: str | None = None) -> tuple[jax.Array, Reservoir]:
    """One online TCA step on one image (`runner.py:run_test_tca`, batch 1).

    Forward with the current anchors (`reservoir_anchors`), CLIP logits 100 * cos, reservoir update with
    (feature, entropy, CLS tokens) under the predicted class, then the corrected logits (the reservoir
    already holds this image).

    Args:
      params: the model state.
      pixels: `[1, S, S, 3]` one preprocessed image.
      classifier: `[C, E]` normalised class text embeddings.
      state: the reservoir (`reservoir_init(C, 3, E, L, D)`; its dtype is the one stored).
      config, layers, ratio, dtype: as `tca_forward`; scale, lambd, beta: as `reservoir_logits`.

    Returns:
      `(final_logits [1, C], new_state)`.
    """
    pixels = checks.array("pixels", pixels, "[B, H, W, C]", sizes={"B": 1})
    classifier = checks.array("classifier", classifier, "[C, E]", sizes={"C": state.count.shape[0]})
    anchors, mask = reservoir_anchors(state)
    out = tca_forward(params, pixels, config=config, layers=layers, ratio=ratio, anchors=anchors, anchor_mask=mask,
                      dtype=dtype)
    wide = jnp.promote_types(out.embedding.dtype, jnp.float32)
    feature = checks.l2_normalize(out.embedding.astype(wide))
    logits = 100.0 * feature @ classifier.astype(wide).T
    cls_tokens = out.cls_tokens.astype(wide)
    state = reservoir_update(state, feature[0], softmax_entropy(logits)[0], cls_tokens[0], jnp.argmax(logits[0]))
    return logits + reservoir_logits(cls_tokens, state, scale=scale, lambd=lambd, beta=beta), state


# ----------------------------------------------------------------------------- cost
def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def forward_flops(config: CLIPConfig, *, batch: int = 1, layers=DEFAULT_LAYERS, ratio: float = 0.1,
                  with_anchors: bool = False, num_classes: int = 1000) -> dict:
    """XLA cost-analysis FLOPs of the jitted image forward with and without TCA, on abstract shapes.

    Args:
      config: the model config (nothing is allocated: `abstract_params`).
      batch: images per call.
      layers, ratio: the TCA settings.
      with_anchors: count the anchor token too (`num_classes` candidates).

    Returns:
      `{"model": encode_image, "plain": tca_forward without condensation (same einsum attention),
      "tca": with condensation, "ratio": tca / plain}`; FLOPs per call as XLA counts them (compiled for the
      default backend). Every block is unrolled (`scan_layers=False`, `unroll=True`): XLA's cost analysis
      counts a `lax.scan` body once, whatever the trip count.
    """
    from clipjax.models.clip import abstract_params, encode_image

    params = abstract_params(config)
    size = config.vision.image_size
    pixels = jax.ShapeDtypeStruct((checks.positive_int("batch", batch), size, size, 3), jnp.float32)
    cand = None
    if with_anchors:
        cand = jax.ShapeDtypeStruct((num_classes, config.vision.layers, config.vision.width), jnp.float32)

    def run(tca_layers):
        fn = jax.jit(lambda p, x, a: tca_forward(p, x, config=config, layers=tca_layers, ratio=ratio,
                                                 anchors=a, unroll=True).embedding)
        return _flops(fn.lower(params, pixels, cand).compile())

    unrolled = config.replace(scan_layers=False)
    model = jax.jit(lambda p, x: encode_image(p, x, config=unrolled, normalize=False))
    out = {"model": _flops(model.lower(params, pixels).compile()), "plain": run(()), "tca": run(tuple(layers))}
    out["ratio"] = out["tca"] / out["plain"]
    return out
