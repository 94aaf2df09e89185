"""`clipjax.interpret.tca` (TCA token condensation, `Jo-wang/TCA`) against numpy float64 transcriptions of the
official code.

Model: a tiny random open_clip ViT with QuickGELU (as the official OpenAI-format CLIP) and random LayerNorms and
attention biases: 4 blocks, width 32, 2 heads, 64 px, patch 8 (N = 65 tokens); condensation at blocks (1, 2, 3)
with r = 0.1 (65 -> 50 -> 41 -> 32 tokens). Inputs: real scikit-image photos. Every attention row ranked here
has distinct values (asserted), so `topk` tie order cannot matter.

References (float64 numpy, written from the official PyTorch code on the torch module's own weights, with the
k-center greedy's `torch.randint` start injected):
- one condensation block `ResidualAttentionBlock_Ours.forward` (drop_rate > 0; with and without a
  `cls_token_cache`; random starts) and, on a 2m < 4 case, `coreset_averaging`'s repeated centres / empty
  clusters and the zero fused token: abs 1e-10;
- the whole `VisionTransformer.forward` with `Transformer_drop` (embedding and per-layer CLS tokens, with and
  without anchor candidates): abs 1e-9;
- `update_reservoir_sim` (div, token_sim) + `update_cls_token` on a stream of 30 entries over 3 classes:
  identical contents and order after every update, anchors abs 1e-12;
- `compute_reservoir_logits` (float64 oracle; layer weights over L layers): abs 1e-12;
- `run_test_tca` on a stream of 8 images (forward with cache, reservoir, corrected logits): abs 1e-8.
Plain-model equality (float32): layers=() and ratio=0 give `encode_image` (max abs diff <= 1e-5 x embedding
scale). FLOPs: XLA's count with condensation is below the plain forward's; token counts for ViT-B/16 by hand.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close_scaled, open_clip_and_clipjax

import clipjax
from clipjax.interpret import explicit, tca
from clipjax.models.clip import encode_image
from clipjax.preprocess import preprocess

pytestmark = pytest.mark.parity

LAYERS = (1, 2, 3)
RATIO = 0.1
TOL = 1e-10


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = dict(embed_dim=16, quick_gelu=True,
               vision_cfg=dict(image_size=64, layers=4, width=32, patch_size=8, head_width=16),
               text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1))
    tm, model = open_clip_and_clipjax(tmp_path_factory.mktemp("tca"), cfg, randomise=True)
    assert model.config.vision.act == "quick_gelu"
    return tm, model


@pytest.fixture(scope="module")
def pixels(photos):
    return preprocess(photos, clipjax.get_config("ViT-B-16").preprocess, 64)  # [4, 64, 64, 3] float32


def _f64(tree):
    return jax.tree.map(lambda a: a.astype(jnp.float64), explicit.pure(tree))


# ----------------------------------------------------------------------------- numpy transcription (seq-first)
def _w(t):
    return t.detach().double().numpy()


def np_ln(x, ln):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + ln.eps) * _w(ln.weight) + _w(ln.bias)


def np_mha(x, attn):
    """nn.MultiheadAttention(x, x, x, need_weights=True, average_attn_weights=False) on [T, B, C]."""
    t, b, c = x.shape
    h = attn.num_heads
    qkv = x @ _w(attn.in_proj_weight).T + _w(attn.in_proj_bias)
    q, k, v = (a.reshape(t, b, h, c // h).transpose(1, 2, 0, 3) for a in np.split(qkv, 3, axis=-1))
    s = (q / math.sqrt(c // h)) @ k.transpose(0, 1, 3, 2)
    p = np.exp(s - s.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)  # [B, H, T, T]
    o = (p @ v).transpose(2, 0, 1, 3).reshape(t, b, c)
    return o @ _w(attn.out_proj.weight).T + _w(attn.out_proj.bias), p


def np_mlp(x, blk):
    h = x @ _w(blk.mlp.c_fc.weight).T + _w(blk.mlp.c_fc.bias)
    h = h / (1 + np.exp(-1.702 * h))  # QuickGELU
    return h @ _w(blk.mlp.c_proj.weight).T + _w(blk.mlp.c_proj.bias)


def np_topk(a, k):
    """torch.topk(a, k, dim=1, largest=True, sorted=True) for rows of distinct values."""
    return np.argsort(-a, axis=1, kind="stable")[:, :k]


def np_complement_idx(idx, dim):
    out = []
    for row in idx:
        out.append(sorted(set(range(dim)) - set(row.tolist())))
    return np.asarray(out, dtype=np.int64).reshape(idx.shape[0], dim - idx.shape[1])


def np_k_center_greedy(token, num_cluster, start):
    center = [start]
    min_distances = np.linalg.norm(token - token[center[0]], axis=1)
    for _ in range(num_cluster - 1):
        next_center = int(np.argmax(min_distances))
        center.append(next_center)
        min_distances = np.minimum(min_distances, np.linalg.norm(token - token[next_center], axis=1))
    return np.stack([token[i] for i in center])


def np_coreset_averaging(token, num_centers, starts):
    """`clip/utils.py:coreset_averaging` on [n, B, C]; `starts[b]` replaces `torch.randint(n, (1,))`."""
    n, batch, dim = token.shape
    weighted = np.zeros((num_centers, batch, dim))
    for b in range(batch):
        tb = token[:, b, :]
        centers = np_k_center_greedy(tb, num_centers, starts[b])
        distances = np.linalg.norm(tb[:, None] - centers[None], axis=-1)
        assignment = np.argmin(distances, axis=1)
        for i in range(num_centers):
            cluster_tokens = tb[assignment == i]
            if cluster_tokens.shape[0] == 0:
                continue
            d = np.linalg.norm(cluster_tokens - centers[i], axis=1)
            d[d == 0] = 1e-8
            weights = 1 / d
            weights[d == 1e-8] = 1.0
            weights = weights / weights.sum()
            weighted[i, b] = np.sum(cluster_tokens * weights[:, None], axis=0)
    return weighted


def np_condense(x, attn_weights, drop_rate, starts):
    """The condensation half of `ResidualAttentionBlock_Ours.forward`: x [N, B, C] after attention."""
    n, b, c = x.shape
    left_tokens = math.ceil((1 - drop_rate) * (n - 1))
    merged = n - left_tokens
    cls_attn = attn_weights[:, :, 0, 1:].mean(axis=1)  # [B, N-1]
    idx = np_topk(cls_attn, left_tokens - 2 * merged)
    idx1 = np_topk(cls_attn, left_tokens)
    cluster_idx = idx1[:, idx.shape[1]:]
    non_cls = x[1:]
    cols = np.arange(b)[None, :]
    x_others = non_cls[idx.T, cols]
    x_cluster = non_cls[cluster_idx.T, cols]
    merged_tokens = np_coreset_averaging(x_cluster, 4, starts)
    compl = np_complement_idx(idx1, n - 1)
    non_topk = non_cls[compl.T, cols]
    non_topk_attn = np.take_along_axis(cls_attn, compl, axis=1).T
    extra = np.sum(non_topk * non_topk_attn[..., None], axis=0, keepdims=True)
    return np.concatenate([x[:1], x_others, merged_tokens, extra], axis=0), cls_attn


def np_block_ours(x, blk, drop_rate, starts, cache=None):
    """`ResidualAttentionBlock_Ours.forward` with drop_rate > 0 on [N, B, C]; cache [K, C] or None."""
    if cache is not None:
        cos = np.einsum("kc,bc->kb", cache, x[0]) / (np.linalg.norm(cache, axis=-1)[:, None]
                                                     * np.linalg.norm(x[0], axis=-1)[None])
        best = np.argmax(cos, axis=0)
        tmp, w = np_mha(np_ln(np.concatenate([cache[best][None], x], axis=0), blk.ln_1), blk.attn)
        tmp, w = tmp[1:], w[:, :, 1:, 1:]
    else:
        tmp, w = np_mha(np_ln(x, blk.ln_1), blk.attn)
    x = x + tmp
    x, cls_attn = np_condense(x, w, drop_rate, starts)
    return x + np_mlp(np_ln(x, blk.ln_2), blk), cls_attn


def np_block_plain(x, blk):
    x = x + np_mha(np_ln(x, blk.ln_1), blk.attn)[0]
    return x + np_mlp(np_ln(x, blk.ln_2), blk)


def np_stem(vis, pixels):
    """conv1 (no bias), class token, position embedding, ln_pre: NHWC pixels -> [N, B, C]."""
    w = _w(vis.conv1.weight)  # [C, 3, p, p]
    p = w.shape[-1]
    x = np.asarray(pixels, np.float64).transpose(0, 3, 1, 2)
    b, _, s, _ = x.shape
    g = s // p
    patches = x.reshape(b, 3, g, p, g, p).transpose(0, 2, 4, 1, 3, 5).reshape(b, g * g, -1)
    x = patches @ w.reshape(w.shape[0], -1).T
    x = np.concatenate([np.broadcast_to(_w(vis.class_embedding), (b, 1, x.shape[-1])), x], axis=1)
    x = x + _w(vis.positional_embedding)
    return np_ln(x, vis.ln_pre).transpose(1, 0, 2)


def np_vit_forward(vis, pixels, drop_loc, drop_rate, cache=None):
    """`VisionTransformer.forward` + `Transformer_drop.forward` (`Ours`), k-center starts 0.

    Returns the embedding [B, E] and the per-layer CLS tokens [B, L, C] (the code keeps x[0, 0]; here every b).
    """
    x = np_stem(vis, pixels)
    blocks = vis.transformer.resblocks
    cls = []
    for i, blk in enumerate(blocks):
        if i in drop_loc:
            x, _ = np_block_ours(x, blk, drop_rate, np.zeros(x.shape[1], int),
                                 cache[:, i - 1, :] if cache is not None else None)
        else:
            x = np_block_plain(x, blk)
        cls.append(x[0])
    out = np_ln(x[0], vis.ln_post) @ _w(vis.proj)
    return out, np.stack(cls, axis=1)


# ----------------------------------------------------------------------------- condensation step
def test_condensation_block_matches_transcription(tiny, pixels):
    tm, model = tiny
    vis = tm.visual
    x_np = np_stem(vis, pixels)
    for i in range(LAYERS[0]):
        x_np = np_block_plain(x_np, vis.transformer.resblocks[i])
    blk = vis.transformer.resblocks[LAYERS[0]]
    starts = np.array([3, 0, 7, 13])
    rng = np.random.default_rng(0)
    cache = x_np[0][:3] + 0.3 * rng.standard_normal((3, x_np.shape[-1]))  # CLS-like anchor candidates [K, C]
    with jax.enable_x64(True):
        params = explicit.tower_blocks(_f64(model.params), "image")
        p = jax.tree.map(lambda a: a[LAYERS[0]], params)
        cfg = model.config.vision
        x = jnp.asarray(x_np.transpose(1, 0, 2))
        for anchored in (False, True):
            want, cls_attn = np_block_ours(x_np, blk, RATIO, starts, cache if anchored else None)
            assert all(len(set(row.tolist())) == row.size for row in cls_attn)  # topk order is unambiguous
            anchor = visible = None
            if anchored:
                sims = (x_np[0] / np.linalg.norm(x_np[0], axis=-1, keepdims=True)) @ (
                    cache / np.linalg.norm(cache, axis=-1, keepdims=True)).T
                assert len(set(sims.argmax(1).tolist())) > 1  # different images pick different anchors
                anchor, visible = tca._select_anchor(jnp.asarray(cache), jnp.ones(3, bool), x[:, 0])
            got = tca.tca_block(p, x, heads=cfg.heads, eps=cfg.ln_eps, act=cfg.act, ratio=RATIO,
                                anchor=anchor, anchor_visible=visible, start=jnp.asarray(starts))
            assert got.shape == (4, 50, 32) and want.shape == (50, 4, 32)
            np.testing.assert_allclose(np.asarray(got), want.transpose(1, 0, 2), rtol=0, atol=TOL)
        # a hidden anchor gives the anchor-free block (to rounding: the reductions differ in length)
        hidden = tca.tca_block(p, x, heads=cfg.heads, eps=cfg.ln_eps, act=cfg.act, ratio=RATIO, anchor=x[:, 1],
                               anchor_visible=jnp.zeros(4, bool), start=jnp.asarray(starts))
        free = tca.tca_block(p, x, heads=cfg.heads, eps=cfg.ln_eps, act=cfg.act, ratio=RATIO,
                             start=jnp.asarray(starts))
        np.testing.assert_allclose(np.asarray(hidden), np.asarray(free), rtol=0, atol=1e-14)


def test_condense_repeated_centres_and_empty_fused_token():
    """N = 5, r = 0.1: keep 4, m = 1, so 2 merge candidates feed 4 centres (two clusters stay empty) and the
    fused token sums no patch: both are zero tokens in the code."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 3, 6))
    w = rng.random((3, 2, 5, 5))
    for starts in (np.array([0, 1, 0]), np.array([1, 1, 0])):
        want, cls_attn = np_condense(x, w, RATIO, starts)
        with jax.enable_x64(True):
            got = tca.condense(jnp.asarray(x.transpose(1, 0, 2)), jnp.asarray(cls_attn), ratio=RATIO,
                               start=jnp.asarray(starts))
        assert got.shape == (3, 8, 6)
        np.testing.assert_allclose(np.asarray(got), want.transpose(1, 0, 2), rtol=0, atol=TOL)
        assert np.all(want[5:] == 0) and np.all(np.asarray(got)[:, 5:] == 0)
    with pytest.raises(ValueError, match="ratio=0.6 is too large"):
        tca.condense(jnp.zeros((1, 5, 6)), jnp.zeros((1, 4)), ratio=0.6)


def test_forward_matches_transcription_with_and_without_anchors(tiny, pixels):
    """Without anchors = with every candidate masked (one compilation for both)."""
    tm, model = tiny
    rng = np.random.default_rng(3)
    _, plain_cls = np_vit_forward(tm.visual, pixels, (), RATIO)
    cache = plain_cls[[2, 3, 0]] + 0.5 * rng.standard_normal((3, 4, 32))  # CLS-like candidates [K, L, C]
    with jax.enable_x64(True):
        params = _f64(model.params)
        px = jnp.asarray(pixels, jnp.float64)
        for anchors in (None, cache):
            want_emb, want_cls = np_vit_forward(tm.visual, pixels, LAYERS, RATIO, anchors)
            got = tca.tca_forward(params, px, config=model.config, layers=LAYERS, ratio=RATIO,
                                  anchors=jnp.asarray(cache), anchor_mask=jnp.full(3, anchors is not None),
                                  dtype="float64")
            np.testing.assert_allclose(np.asarray(got.embedding), want_emb, rtol=0, atol=1e-9)
            np.testing.assert_allclose(np.asarray(got.cls_tokens), want_cls, rtol=0, atol=1e-9)
            assert np.asarray(got.token_counts).tolist() == [65, 50, 41, 32]
        # a key draws k-center starts; a different start changes the merged tokens
        keyed = tca.tca_forward(params, px, config=model.config, layers=LAYERS, ratio=RATIO, anchors=jnp.asarray(cache),
                                anchor_mask=jnp.ones(3, bool), key=jax.random.key(0), dtype="float64")
        assert np.abs(np.asarray(keyed.embedding) - want_emb).max() > 1e-6


def test_plain_forward_equals_model(tiny, pixels):
    _, model = tiny
    want = np.asarray(encode_image(model.params, pixels, config=model.config, normalize=False))
    for kw in (dict(layers=()), dict(ratio=0.0), dict(ratio=0.0, anchors=jnp.ones((2, 4, 32)))):
        out = tca.tca_forward(model.params, pixels, config=model.config, **kw)
        assert_close_scaled(out.embedding, want, rel=1e-5, what=str(kw))
        assert np.asarray(out.token_counts).tolist() == [65] * 4
    with pytest.raises(ValueError, match="layers must be increasing block indices in \\[0, 4\\)"):
        tca.tca_forward(model.params, pixels, config=model.config, layers=(3, 9))
    with pytest.raises(ValueError, match="ratio must be a number in \\[0, 1\\)"):
        tca.tca_forward(model.params, pixels, config=model.config, ratio=1.0)


def test_token_counts_and_flops(tiny):
    _, model = tiny
    # ViT-B/16: 197 -> ceil(.9 * 196) = 177 kept, m = 20: 137 + 4 + 1 + CLS = 143; then 104, then 77
    assert tca.token_counts(197, 12) == (197,) * 3 + (143,) * 3 + (104,) * 3 + (77,) * 3
    assert tca.token_counts(197, 12, ratio=0.0) == (197,) * 12
    flops = tca.forward_flops(model.config, layers=LAYERS, ratio=RATIO)
    assert flops["tca"] < 0.9 * flops["plain"]
    assert flops["plain"] == pytest.approx(flops["model"], rel=0.02)  # the einsum runner counts like the model


# ----------------------------------------------------------------------------- reservoir and logits
def np_cls_feature_similarity(cls_cache):
    feats = np.stack([item[2].mean(axis=0) for item in cls_cache])
    feats = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    sim = feats @ feats.T
    n = feats.shape[0]
    return [(sim[i].sum() - sim[i, i]) / (n - 1) for i in range(n)]


def np_update_reservoir(reservoir, pred, item, size):
    """`update_reservoir_sim` (div=True, token_sim=True); returns the cache `update_cls_token` would set, or None."""
    reservoir[pred].append(item)
    if len(reservoir[pred]) > size:
        score = np.add([it[1] for it in reservoir[pred]], np_cls_feature_similarity(reservoir[pred])).tolist()
        reservoir[pred].pop(int(np.argmax(score)))
    reservoir[pred] = sorted(reservoir[pred], key=lambda it: it[1])
    if all(len(reservoir[k]) > 1 for k in reservoir):
        return np.stack([np.mean(np.stack([it[2] for it in reservoir[k]]), axis=0) for k in reservoir if reservoir[k]])
    return None


def np_reservoir_logits(cls_list, reservoir, scale, lambd, beta, num_classes):
    w = np.exp(np.linspace(0, 1, cls_list.shape[0]) / scale)
    w = w / w.sum()
    out = np.zeros(num_classes)
    for c in sorted(reservoir):
        for it in reservoir[c]:
            cos = np.sum(cls_list * it[2], -1) / (np.linalg.norm(cls_list, axis=-1) * np.linalg.norm(it[2], axis=-1))
            out[c] += np.exp(-(beta - beta * np.sum(cos * w)))
    return lambd * out


def _check_state(state, reservoir):
    count = np.asarray(state.count)
    for c, items in reservoir.items():
        assert count[c] == len(items)
        for s, it in enumerate(items):
            np.testing.assert_array_equal(np.asarray(state.features)[c, s], it[0])
            assert np.asarray(state.entropy)[c, s] == it[1]
            np.testing.assert_array_equal(np.asarray(state.cls_tokens)[c, s], it[2])


def test_reservoir_update_anchors_and_logits_match_transcription():
    rng = np.random.default_rng(4)
    classes, size, layers, width, dim = 3, 3, 4, 8, 5
    reservoir = {c: [] for c in range(classes)}
    cache = None
    with jax.enable_x64(True):
        state = tca.reservoir_init(classes, size, dim, layers, width, dtype="float64")
        for step in range(30):
            item = [rng.standard_normal(dim), float(rng.random() * 3), rng.standard_normal((layers, width))]
            pred = int(rng.integers(classes)) if step > 3 else 0
            cache = np_update_reservoir(reservoir, pred, item, size)
            state = tca.reservoir_update(state, jnp.asarray(item[0]), jnp.asarray(item[1]), jnp.asarray(item[2]),
                                         jnp.asarray(pred))
            _check_state(state, reservoir)
            anchors, mask = tca.reservoir_anchors(state)
            if cache is None:
                assert not np.asarray(mask).any()
            else:
                assert np.asarray(mask).all()
                np.testing.assert_allclose(np.asarray(anchors), cache, rtol=0, atol=1e-12)
            x = rng.standard_normal((2, layers, width))
            got = tca.reservoir_logits(jnp.asarray(x), state, scale=0.1, lambd=3.0, beta=5.0)
            want = [np_reservoir_logits(x[b], reservoir, 0.1, 3.0, 5.0, classes) for b in range(2)]
            np.testing.assert_allclose(np.asarray(got), np.stack(want), rtol=0, atol=1e-12)
        assert np.asarray(state.count).tolist() == [size] * classes  # evictions happened


def test_online_steps_match_transcription(tiny, pixels):
    """`run_test_tca` with batch 1: forward with the cache, logits, reservoir update, corrected logits."""
    tm, model = tiny
    rng = np.random.default_rng(5)
    stream = [pixels[i % 2] + 0.05 * rng.standard_normal(pixels.shape[1:]) for i in range(8)]
    with jax.enable_x64(True):
        params = _f64(model.params)
        plain = np.asarray(tca.tca_forward(params, jnp.asarray(pixels[:2], jnp.float64), config=model.config,
                                           layers=(), dtype="float64").embedding)
        weights = plain / np.linalg.norm(plain, axis=1, keepdims=True)  # class c = photo c
        state = tca.reservoir_init(2, 2, 16, 4, 32, dtype="float64")
        reservoir, cache, used_cache = {0: [], 1: []}, None, False
        for img in stream:
            emb, cls_list = np_vit_forward(tm.visual, img[None], LAYERS, RATIO, cache)
            used_cache |= cache is not None
            feat = emb / np.linalg.norm(emb, axis=1, keepdims=True)
            logits = 100.0 * feat @ weights.T
            p = np.exp(logits - logits.max())
            p /= p.sum()
            loss = float(-(p * np.log(p)).sum())
            pred = int(np.argmax(logits[0]))
            new_cache = np_update_reservoir(reservoir, pred, [feat[0], loss, cls_list[0]], 2)
            cache = new_cache if new_cache is not None else cache
            want = logits + np_reservoir_logits(cls_list[0], reservoir, 0.1, 3.0, 5.0, 2)
            got, state = tca.tca_step(params, jnp.asarray(img[None], jnp.float64), jnp.asarray(weights), state,
                                      config=model.config, layers=LAYERS, ratio=RATIO, dtype="float64")
            np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-8)
        assert used_cache  # the anchor path ran
