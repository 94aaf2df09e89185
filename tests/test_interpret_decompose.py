"""`clipjax.interpret.explicit`, `.decompose` and `.textspan` against open_clip 3.3 and float64 numpy oracles.

Model: a tiny random open_clip ViT (2 blocks, width 32, 2 heads, 32 px, patch 16: N = 5 tokens; text 2 blocks)
with random LayerNorms (`randomise_norms`), converted by clipjax; a second one with LayerScale (random gammas).

- Explicit runner (float32): embeddings equal clipjax's `encode_image` / `encode_text` (max abs diff <= 1e-6 x
  embedding scale); attention probabilities equal torch `nn.MultiheadAttention(need_weights=True,
  average_attn_weights=False)` on the captured block inputs (abs 1e-6). Gradient x attention (float64):
  d emb.w / d multiplier at ones equals (d emb.w / d A) * A from a torch float64 autograd transcription of
  the blocks whose probabilities are tensors with `retain_grad` (rel 1e-9), both towers.
- Decomposition (float64, `jax.enable_x64`): components sum to torch's float64 normalised embedding
  (abs 1e-10) at every level; every component equals a numpy float64 transcription of `PRSLogger`
  (`_normalize_attentions`, `_normalize_mlps`, `finalize`, `compute_prs.py`'s token sum) on torch's
  hooked intermediates (abs 1e-10). LayerScale (unsupported by `PRSLogger`) enters the oracle as the gammas
  times its hooked branch outputs.
- Ablations: numpy transcription of `compute_ablations.py` (cumulative attention sweep, MLP mean ablation)
  and of per-head mean ablation (abs 1e-10). Zero-ablating the last layer's attention equals the torch model
  with that layer's out_proj weight and bias zeroed, ln_post applied with the unablated mu and sigma (the
  decomposition's frozen normalisation), plus the removed slot's LayerNorm share (abs 1e-10).
- TextSpan: float64 numpy transcription of `replace_with_iterative_removal` on random data (same indices;
  reconstruction and residual to 1e-8), and `textspan_heads` against it on the oracle head effects.
"""

from __future__ import annotations

import copy
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_scaled, open_clip_and_clipjax

import clipjax
from clipjax.interpret import decompose, explicit, textspan
from clipjax.models.clip import encode_image, encode_text, init_params
from clipjax.preprocess import preprocess
from clipjax.tokenizer import Tokenizer

pytestmark = pytest.mark.parity

TOL64 = 1e-10


def _model_cfg(ls):
    vision = dict(image_size=32, layers=2, width=32, patch_size=16, head_width=16)
    if ls is not None:
        vision["ls_init_value"] = ls
    return dict(embed_dim=16, vision_cfg=vision, text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2,
                                                                 layers=2))


def _build(tmp_path_factory, ls):
    return open_clip_and_clipjax(tmp_path_factory.mktemp("interp"), _model_cfg(ls), randomise=True)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return _build(tmp_path_factory, None)


@pytest.fixture(scope="module")
def scaled(tmp_path_factory):
    tm, m = _build(tmp_path_factory, 0.5)
    assert "ls1" in m.params["visual"]["transformer"]["blocks"]
    return tm, m


@pytest.fixture(scope="module")
def pixels(photos):
    return preprocess(photos, clipjax.get_config("ViT-B-32").preprocess, 32)  # [4, 32, 32, 3] float32


def _nchw(x, dtype=torch.float32):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2))).to(dtype)


def _f64(params):
    return jax.tree.map(lambda a: a.astype(jnp.float64), params)


# ----------------------------------------------------------------------------- torch references
def _torch_attention(blocks, run, mask=None):
    """Run `run()` with hooks on each block's `attn`; return its inputs and torch's per-head probabilities."""
    inputs, handles = [], []
    for blk in blocks:
        handles.append(blk.attn.register_forward_hook(lambda mod, args, out: inputs.append(args[0].detach())))
    with torch.no_grad():
        out = run()
        probs = [blk.attn(h, h, h, need_weights=True, average_attn_weights=False, attn_mask=mask)[1]
                 for blk, h in zip(blocks, inputs)]
    for h in handles:
        h.remove()
    return out, inputs, [p.numpy() for p in probs]


def _torch_manual_blocks(blocks, x, mask=None):
    """The blocks transcribed with explicit torch ops; the probabilities are returned with `retain_grad`."""
    probs = []
    for blk in blocks:
        attn = blk.attn
        h = blk.ln_1(x)
        q, k, v = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        b, t, d = q.shape
        nh = attn.num_heads
        q, k, v = (z.reshape(b, t, nh, d // nh).transpose(1, 2) for z in (q, k, v))
        logits = q @ k.transpose(-1, -2) / (d // nh) ** 0.5
        if mask is not None:
            logits = logits + mask
        a = logits.softmax(-1)
        a.retain_grad()
        probs.append(a)
        o = (a @ v).transpose(1, 2).reshape(b, t, d)
        x = x + blk.ls_1(attn.out_proj(o))
        x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
    return x, probs


def _prs_oracle(tm, nchw):
    """numpy float64 transcription of PRSLogger (+ compute_prs.py) on the torch model's hooked intermediates.

    Returns `attentions [b, l, n, h, d]`, `mlps [b, l + 1, d]` (finalised: ln_post distributed, projected,
    divided by ||representation||) and the raw per-token attention terms before ln_post."""
    vis = tm.visual
    cap = {"attn_in": [], "mlp": []}
    hooks = [vis.ln_pre.register_forward_hook(lambda m, a, o: cap.__setitem__("z", o.detach())),
             vis.ln_post.register_forward_pre_hook(lambda m, a: cap.__setitem__("r", a[0].detach()))]
    for blk in vis.transformer.resblocks:
        hooks.append(blk.attn.register_forward_hook(lambda m, a, o: cap["attn_in"].append(a[0].detach())))
        hooks.append(blk.mlp.register_forward_hook(lambda m, a, o: cap["mlp"].append(o.detach())))
    with torch.no_grad():
        representation = tm.encode_image(nchw, normalize=False).numpy()
        probs = [blk.attn(h, h, h, need_weights=True, average_attn_weights=False)[1].numpy()
                 for blk, h in zip(vis.transformer.resblocks, cap["attn_in"])]
    for h in hooks:
        h.remove()

    def gamma(mod, d):
        return mod.gamma.detach().numpy() if hasattr(mod, "gamma") else np.ones(d)

    attentions, mlps = [], [cap["z"].numpy()[:, 0]]
    for blk, h, a, m in zip(vis.transformer.resblocks, cap["attn_in"], probs, cap["mlp"]):
        h = h.numpy()
        d = h.shape[-1]
        nh = blk.attn.num_heads
        dh = d // nh
        w_in, b_in = blk.attn.in_proj_weight.detach().numpy(), blk.attn.in_proj_bias.detach().numpy()
        v = (h @ w_in[2 * d:].T + b_in[2 * d:]).reshape(h.shape[0], h.shape[1], nh, dh)  # [b, n, h, dh]
        w_o = blk.attn.out_proj.weight.detach().numpy().reshape(d, nh, dh)
        # forward_per_head's "out.post" at the class-token query: [b, n, h, d]
        ret = np.einsum("bhm,bmhc,dhc->bmhd", a[:, :, 0], v, w_o)
        ret = ret + blk.attn.out_proj.bias.detach().numpy() / (ret.shape[1] * ret.shape[2])
        attentions.append(ret * gamma(blk.ls_1, d))
        mlps.append(m.numpy()[:, 0] * gamma(blk.ls_2, d))
    attentions, mlps = np.stack(attentions, 1), np.stack(mlps, 1)  # [b, l, n, h, d], [b, l + 1, d]
    r = cap["r"].numpy()
    r = r[:, 0] if r.ndim == 3 else r
    mean = r.mean(-1, keepdims=True)  # LayerNorm's hooks: mean [b, 1], sqrt(E[x^2] - mean^2 + eps) [b, 1]
    sqrt_var = np.sqrt((r ** 2).mean(-1, keepdims=True) - mean ** 2 + vis.ln_post.eps)
    w, b = vis.ln_post.weight.detach().numpy(), vis.ln_post.bias.detach().numpy()
    proj = vis.proj.detach().numpy()
    k = attentions.shape[1] + mlps.shape[1]
    nh_n = attentions.shape[2] * attentions.shape[3]
    post = (w * (attentions - mean[:, :, None, None, None] / (k * nh_n)) / sqrt_var[:, :, None, None, None]
            + b / (k * nh_n)) @ proj
    post_mlp = (w * (mlps - mean[:, :, None] / k) / sqrt_var[:, :, None] + b / k) @ proj
    norm = np.linalg.norm(representation, axis=-1)
    return post / norm[:, None, None, None, None], post_mlp / norm[:, None, None], representation


# ----------------------------------------------------------------------------- explicit runner
def test_explicit_forward_matches_model_and_torch_attention(plain, pixels, captions):
    tm, m = plain
    emb, rec = explicit.image_forward(m.params, pixels, config=m.config)
    assert_close_scaled(emb, encode_image(m.params, pixels, config=m.config, normalize=False), rel=1e-6,
                        what="explicit image embedding")
    _, _, want = _torch_attention(tm.visual.transformer.resblocks, lambda: tm.encode_image(_nchw(pixels)))
    assert rec["attention"].shape == (2, 4, 2, 5, 5)
    np.testing.assert_allclose(np.asarray(rec["attention"]), np.stack(want), rtol=0, atol=1e-6)

    ids = np.asarray(Tokenizer.openai()(captions), np.int32)
    emb, rec = explicit.text_forward(m.params, ids, config=m.config)
    assert_close_scaled(emb, encode_text(m.params, ids, config=m.config, normalize=False), rel=1e-6,
                        what="explicit text embedding")
    _, _, want = _torch_attention(tm.transformer.resblocks, lambda: tm.encode_text(torch.from_numpy(ids).long()),
                                  mask=tm.attn_mask)
    np.testing.assert_allclose(np.asarray(rec["attention"]), np.stack(want), rtol=0, atol=1e-6)
    assert np.all(np.asarray(rec["attention"])[..., 0, 1:] == 0)  # causal: the first token sees itself only
    with pytest.raises(ValueError, match="attn_multiplier"):
        explicit.text_forward(m.params, ids, config=m.config, attn_multiplier=jnp.ones((2, 3, 1, 1, 1)))


def test_explicit_forward_other_poolings():
    """CoCa (attentional pooler, the model's own module; text with the appended class token and pad mask): the
    explicit forward equals clipjax's encode_image / encode_text (1e-6 x scale)."""
    base = clipjax.get_config("ViT-B-32")
    ids = np.random.RandomState(0).randint(1, 1000, (3, 20)).astype(np.int32)
    ids[:, 15:] = 0  # pads, hidden by CoCa's mask
    pixels = np.asarray(jax.random.normal(jax.random.key(1), (2, 32, 32, 3)))
    for pool in ("attn",):
        vision = dataclasses.replace(base.vision, image_size=32, patch_size=16, width=32, layers=2, heads=2,
                                     mlp_dim=64, pool=pool, attn_pool_heads=2, attn_pool_queries=4)
        text = dataclasses.replace(base.text, width=32, heads=2, layers=1, mlp_dim=64, embed_cls=pool == "attn",
                                   pool="last" if pool == "attn" else "argmax", vocab_size=1000)
        cfg = base.replace(embed_dim=32, vision=vision, text=text)
        params = init_params(cfg, seed=0)
        emb, _ = explicit.image_forward(params, pixels, config=cfg)
        assert_close_scaled(emb, encode_image(params, pixels, config=cfg, normalize=False), rel=1e-6, what=pool)
        emb, rec = explicit.text_forward(params, ids, config=cfg)
        assert_close_scaled(emb, encode_text(params, ids, config=cfg, normalize=False), rel=1e-6, what=f"{pool} text")
        assert rec["attention"].shape[-1] == 20 + (pool == "attn")


@pytest.mark.parametrize("tower", ["image", "text"])
def test_multiplier_gradient_is_gradient_times_attention(tower, scaled, pixels, captions):
    tm, m = scaled
    tm = copy.deepcopy(tm).double()
    w = np.random.RandomState(0).randn(16)
    ids = np.asarray(Tokenizer.openai()(captions[:3]), np.int32)
    if tower == "image":
        vis = tm.visual
        x0 = vis.ln_pre(torch.cat([vis.class_embedding.expand(4, 1, -1),
                                   vis.conv1(_nchw(pixels, torch.float64)).flatten(2).transpose(1, 2)], 1)
                        + vis.positional_embedding)
        x, probs = _torch_manual_blocks(vis.transformer.resblocks, x0)
        emb = vis.ln_post(x[:, 0]) @ vis.proj
        with torch.no_grad():
            np.testing.assert_allclose(emb.detach().numpy(), tm.encode_image(_nchw(pixels, torch.float64)).numpy(),
                                       rtol=0, atol=1e-12)  # the transcription is the model

        def run(mult):
            return explicit.image_forward(_f64(m.params), jnp.asarray(pixels, jnp.float64), config=m.config,
                                          attn_multiplier=mult, dtype="float64")[0]
    else:
        tid = torch.from_numpy(ids).long()
        x, probs = _torch_manual_blocks(tm.transformer.resblocks, tm.token_embedding(tid) + tm.positional_embedding,
                                        mask=tm.attn_mask.double())
        emb = tm.ln_final(x)[torch.arange(3), tid.argmax(-1)] @ tm.text_projection
        with torch.no_grad():
            np.testing.assert_allclose(emb.detach().numpy(), tm.encode_text(tid).numpy(), rtol=0, atol=1e-12)

        def run(mult):
            return explicit.text_forward(_f64(m.params), ids, config=m.config, attn_multiplier=mult, dtype="float64")[0]
    (emb @ torch.from_numpy(w)).sum().backward()
    want = np.stack([(p.grad * p).detach().numpy() for p in probs])
    with jax.enable_x64(True):
        ones = jnp.ones(want.shape, jnp.float64)
        got = jax.grad(lambda mult: jnp.sum(run(mult) @ jnp.asarray(w)))(ones)
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-9 * np.abs(want).max())
    assert np.abs(want).max() > 1e-3


# ----------------------------------------------------------------------------- decomposition
@pytest.mark.parametrize("which", ["plain", "scaled"])
def test_components_match_prs_logger_and_sum_to_embedding(which, request, pixels):
    tm, m = request.getfixturevalue(which)
    tm = copy.deepcopy(tm).double()
    nchw = _nchw(pixels, torch.float64)
    attentions, mlps, _ = _prs_oracle(tm, nchw)
    with torch.no_grad():
        want = F.normalize(tm.encode_image(nchw), dim=-1).numpy()
    oracle = {"head_token": attentions, "head": attentions.sum(2), "layer": attentions.sum((2, 3))}
    with jax.enable_x64(True):
        for level in decompose.LEVELS:
            parts = decompose.decompose_image(_f64(m.params), jnp.asarray(pixels, jnp.float64), config=m.config,
                                              level=level, dtype="float64")
            assert parts["attn"].dtype == jnp.float64 and parts["attn"].shape == oracle[level].shape
            np.testing.assert_allclose(np.asarray(parts["attn"]), oracle[level], rtol=0, atol=TOL64)
            np.testing.assert_allclose(np.asarray(parts["mlp"]), mlps[:, 1:], rtol=0, atol=TOL64)
            np.testing.assert_allclose(np.asarray(parts["embed"]), mlps[:, 0], rtol=0, atol=TOL64)
            np.testing.assert_allclose(np.asarray(decompose.component_sum(parts)), want, rtol=0, atol=TOL64)
            np.testing.assert_allclose(np.asarray(parts["embedding"]), want, rtol=0, atol=TOL64)
    assert np.abs(attentions).max() > 1e-2 and np.abs(mlps).max() > 1e-2


def _direct_effect_run(tm, nchw, layer, head):
    """Torch: head `head` of `layer` removed (its out_proj columns zeroed, CCS style) with every later branch
    (the same block's MLP, all later blocks' attention and MLP) patched to its clean output: the final class-token
    residual then differs from the clean one by the head's direct path only. Returns that residual `[b, d]`."""
    blocks = tm.visual.transformer.resblocks
    later = [blocks[layer].mlp] + [mod for blk in blocks[layer + 1:] for mod in (blk.attn, blk.mlp)]
    clean, cap = {}, {}
    hooks = [mod.register_forward_hook(lambda mod, a, out: clean.__setitem__(mod, out)) for mod in later]
    with torch.no_grad():
        tm.encode_image(nchw)
    for h in hooks:
        h.remove()
    hooks = [mod.register_forward_hook(lambda mod, a, out: clean[mod]) for mod in later]
    hooks.append(tm.visual.ln_post.register_forward_pre_hook(lambda mod, a: cap.__setitem__("r", a[0][:, 0].numpy())))
    out_proj = blocks[layer].attn.out_proj
    saved = out_proj.weight.detach().clone()
    dh = out_proj.weight.shape[0] // blocks[layer].attn.num_heads
    with torch.no_grad():
        out_proj.weight[:, head * dh:(head + 1) * dh] = 0
        tm.encode_image(nchw)
        out_proj.weight.copy_(saved)
    for h in hooks:
        h.remove()
    return cap["r"]


def test_ablations_match_compute_ablations(plain, pixels):
    tm, m = plain
    tm = copy.deepcopy(tm).double()
    nchw = _nchw(pixels, torch.float64)
    flipped = np.ascontiguousarray(pixels[:, :, ::-1])
    attentions, mlps, representation = _prs_oracle(tm, nchw)
    ref_attentions, _, _ = _prs_oracle(tm, _nchw(flipped, torch.float64))
    attns = attentions.sum(2)  # compute_prs.py: [b, l, h, d]
    # compute_ablations.py: baseline, "+ MLPs ablation", "Attention ablations" (cumulative)
    baseline = attns.sum(axis=(1, 2)) + mlps.sum(axis=1)
    mlps_ablation = attns.sum(axis=(1, 2)) + np.repeat(mlps.mean(0, keepdims=True), 4, 0).sum(axis=1)
    no_heads = attns.sum(axis=2)
    sweep = [baseline]
    for layer in range(no_heads.shape[1]):
        current = (np.sum(np.mean(no_heads[:, :layer], axis=0, keepdims=True), axis=1)
                   + np.mean(no_heads[:, layer], axis=0, keepdims=True) + np.sum(no_heads[:, layer + 1:], axis=1))
        sweep.append(mlps.sum(axis=1) + current)
    # heads L1.H0 and L0.H1 mean-ablated: over the flipped images (head level), over the same images per token
    chosen = [(1, 0), (0, 1)]
    by_head, by_token = attns.copy(), attentions.copy()
    for layer, head in chosen:
        by_head[:, layer, head] = ref_attentions.sum(2)[:, layer, head].mean(0)
        by_token[:, layer, :, head] = attentions[:, layer, :, head].mean(0)
    with jax.enable_x64(True):
        p64, px = _f64(m.params), jnp.asarray(pixels, jnp.float64)

        def parts(level, images=px):
            return decompose.decompose_image(p64, images, config=m.config, level=level, dtype="float64")

        heads, tokens, layers = parts("head"), parts("head_token"), parts("layer")
        for p in (heads, tokens, layers):
            np.testing.assert_allclose(np.asarray(decompose.mean_ablation_sweep(p)), np.stack(sweep), atol=TOL64)
        got = decompose.mean_ablate(heads, mlps=[0, 1], embed=True)
        np.testing.assert_allclose(np.asarray(got), mlps_ablation, rtol=0, atol=TOL64)
        got = decompose.mean_ablate(heads, heads=["L1.H0", (0, 1)], reference=parts("head", jnp.asarray(flipped)))
        np.testing.assert_allclose(np.asarray(got), by_head.sum((1, 2)) + mlps.sum(1), rtol=0, atol=TOL64)
        got = decompose.mean_ablate(tokens, heads=["L1.H0", (0, 1)])
        np.testing.assert_allclose(np.asarray(got), by_token.sum((1, 2, 3)) + mlps.sum(1), rtol=0, atol=TOL64)
        np.testing.assert_allclose(np.asarray(decompose.zero_ablate(layers, layers=[1])),
                                   np.asarray(decompose.zero_ablate(tokens, heads=["L1.H0", "L1.H1"])), atol=TOL64)
        with pytest.raises(ValueError, match="level 'head'"):
            decompose.zero_ablate(layers, heads=[(0, 0)])
        with pytest.raises(ValueError, match="L2.H0"):
            decompose.zero_ablate(heads, heads=["L2.H0"])
        with pytest.raises(ValueError, match="mlps"):
            decompose.zero_ablate(heads, mlps=[5])
        with pytest.raises(ValueError, match="reference"):
            decompose.mean_ablate(heads, layers=[0], reference=tokens)
        got = np.asarray(decompose.zero_ablate(heads, heads=["L0.H1"]))
        mu, sigma, norm = (np.asarray(layers[k]) for k in ("mean", "std", "norm"))
    # the direct effect is what removing the head changes with everything downstream frozen: torch with the
    # head's out_proj columns zeroed, later branches patched, ln_post with the clean mu and sigma
    r = _direct_effect_run(tm, nchw, 0, 1)
    vis = tm.visual
    w, b, proj = (t.detach().numpy() for t in (vis.ln_post.weight, vis.ln_post.bias, vis.proj))
    frozen = (w * (r - mu[:, None]) / sigma[:, None] + b) @ proj / norm[:, None]
    # the component also held the head's out-bias share b_O / H and its ln_post slot share 1 / (K H), K = 5
    share = 1 / (5 * 2)
    bias = vis.transformer.resblocks[0].attn.out_proj.bias.detach().numpy() / 2
    frozen = frozen - (w * (bias - share * mu[:, None]) / sigma[:, None] + share * b) @ proj / norm[:, None]
    np.testing.assert_allclose(got, frozen, rtol=0, atol=TOL64)
    assert np.abs(got - representation / np.linalg.norm(representation, axis=-1, keepdims=True)).max() > 1e-3


def test_refuses_other_poolings():
    base = clipjax.get_config("ViT-B-32")
    pixels = jnp.zeros((1, 224, 224, 3))
    for pool, what in [("avg", "average pooling"), ("map", "MAP"), ("attn", "attentional pooler")]:
        cfg = base.replace(vision=dataclasses.replace(base.vision, pool=pool))
        with pytest.raises(ValueError, match=f"pool={pool!r}.*{what}"):
            decompose.decompose_image(None, pixels, config=cfg)
    with pytest.raises(ValueError, match="ResNet"):
        decompose.decompose_image(None, pixels, config=clipjax.get_config("RN50"))
    with pytest.raises(ValueError, match="level"):
        decompose.decompose_image(None, pixels, config=base, level="token")


# ----------------------------------------------------------------------------- TextSpan
def _iterative_removal(data, text_features, iters, rank):
    """`replace_with_iterative_removal`, numpy float64 (torch's std is the unbiased one)."""
    u, s, vh = np.linalg.svd(data, full_matrices=False)
    vh = vh[:rank]
    text_features = vh.T.dot(np.linalg.inv(vh.dot(vh.T)).dot(vh)).dot(text_features.T).T
    mean_data = data.mean(axis=0, keepdims=True)
    data = data - mean_data
    reconstruct = np.repeat(mean_data, data.shape[0], axis=0)
    results = []
    for _ in range(iters):
        projection = data @ text_features.T
        top_n = int(np.argmax(projection.std(axis=0, ddof=1)))
        results.append(top_n)
        text_norm = text_features[top_n] @ text_features[top_n].T
        part = (data @ text_features[top_n] / text_norm)[:, None] * text_features[top_n][None, :]
        reconstruct = reconstruct + part
        data = data - part
        text_features = (text_features - (text_features @ text_features[top_n] / text_norm)[:, None]
                         * text_features[top_n][None, :])
    return reconstruct, results, data


@pytest.mark.parametrize("rank", [6, 80])
def test_textspan_matches_iterative_removal(rank):
    rng = np.random.RandomState(rank)
    data = rng.randn(12, 24) @ rng.randn(24, 24) + rng.randn(24)
    texts = rng.randn(40, 24)
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    iters = min(8, rank - 1)  # beyond `rank` texts every projected text is ~0 and the choice is rounding noise
    recon, idx, residual = _iterative_removal(data, texts, iters, rank)
    with jax.enable_x64(True):
        got = textspan.textspan(data, texts, num_texts=iters, rank=rank)
        np.testing.assert_array_equal(np.asarray(got.indices), idx)
        np.testing.assert_allclose(np.asarray(got.reconstruction), recon, rtol=0, atol=1e-8)
        np.testing.assert_allclose(np.asarray(got.residual), residual, rtol=0, atol=1e-8)
        centred = data - data.mean(0)
        np.testing.assert_allclose(np.asarray(got.variance_explained)[-1],
                                   1 - np.sum(residual ** 2) / np.sum(centred ** 2), rtol=1e-10)
        assert np.all(np.diff(np.asarray(got.variance_explained)) >= -1e-12)
    with pytest.raises(ValueError, match="head_effects"):
        textspan.textspan(data[:1], texts)
    with pytest.raises(ValueError, match="embedding dimensions"):
        textspan.textspan(data, texts[:, :5])


def test_textspan_heads_matches_oracle(plain, pixels):
    tm, m = plain
    tm = copy.deepcopy(tm).double()
    attentions, mlps, _ = _prs_oracle(tm, _nchw(pixels, torch.float64))
    attns = attentions.sum(2)  # [b, l, h, d]
    texts = np.random.RandomState(1).randn(30, 16)
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    # compute_complete_text_set.py main with --num_of_last_layers 1: layer 0 mean-ablated, layer 1 replaced
    replaced = attns.copy()
    replaced[:, 0] = attns[:, 0].mean(0, keepdims=True)
    want_idx = []
    for head in range(2):
        recon, idx, _ = _iterative_removal(attns[:, 1, head], texts, 3, 80)
        replaced[:, 1, head] = recon
        want_idx.append(idx)
    with jax.enable_x64(True):
        got = textspan.textspan_heads(_f64(m.params), jnp.asarray(pixels, jnp.float64), texts, config=m.config,
                                      layers=1, num_texts=3, dtype="float64")
        np.testing.assert_array_equal(np.asarray(got["indices"]), [want_idx])
        np.testing.assert_array_equal(np.asarray(got["layers"]), [1])
        np.testing.assert_allclose(np.asarray(got["replaced"]), mlps.sum(1) + replaced.sum((1, 2)), rtol=0, atol=1e-8)
        with pytest.raises(ValueError, match="layers=3"):
            textspan.textspan_heads(_f64(m.params), jnp.asarray(pixels, jnp.float64), texts, config=m.config, layers=3,
                                    dtype="float64")
