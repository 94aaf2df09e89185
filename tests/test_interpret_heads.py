"""`clipjax.interpret.heads` against CCS-CLIP (`avinashsai/CCS-CLIP`) on open_clip 3.3.

- `prune_heads` vs CCS `src/load_model.py:modify` transcribed on the torch model (the head's `in_proj_weight`
  Q rows, `in_proj_bias` Q entries and `out_proj.weight` columns zeroed, out bias kept): embeddings of real
  photos (image tower) and real captions (text tower) equal, max abs diff <= 1e-5 x embedding scale
  (`assert_close_scaled`), on a tiny random open_clip ViT (2 blocks, width 64, 4 heads) with random
  LayerNorms and attention biases. Pruning changes the embedding (not a no-op) and leaves the input params as
  they were. Bad heads raise ValueError naming them.
- `skew_metric` vs `src/metrics.py:skew_metric` transcribed (Python's stable `sort(reverse=True)` on
  (score, attribute) pairs, ties included): same skews (abs 1e-6, float32) for the attributes it reports, NaN elsewhere.
- `ccs_scores` / `ccs_at_k` / `ccs_groups` vs direct numpy counts.
"""

from __future__ import annotations

import copy

import jax
import numpy as np
import pytest
import torch
from helpers import assert_close_scaled, open_clip_and_clipjax

import clipjax
from clipjax.interpret import heads as H
from clipjax.models.clip import encode_image, encode_text
from clipjax.preprocess import preprocess
from clipjax.tokenizer import Tokenizer

pytestmark = pytest.mark.parity

CFG = dict(embed_dim=16, vision_cfg=dict(image_size=32, layers=2, width=64, patch_size=16, head_width=16),
           text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=2))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return open_clip_and_clipjax(tmp_path_factory.mktemp("heads"), CFG, randomise=True)


def _ccs_modify(tm, model_heads, resblocks):
    """CCS `modify`, with the head list given instead of looked up (`get_model_association`)."""
    tm = copy.deepcopy(tm)
    vit_model = resblocks(tm)
    for each_layer_head in model_heads:
        layer_idx = int(each_layer_head.split('.')[0][1:])
        head_idx = int(each_layer_head.split('.')[1][1:])
        attn_layer = vit_model.resblocks[layer_idx].attn
        head_dim = attn_layer.embed_dim // attn_layer.num_heads
        with torch.no_grad():
            attn_layer.in_proj_weight[head_idx * head_dim:(head_idx + 1) * head_dim, :] = 0
            attn_layer.in_proj_bias[head_idx * head_dim:(head_idx + 1) * head_dim] = 0
            attn_layer.out_proj.weight[:, head_idx * head_dim:(head_idx + 1) * head_dim] = 0
    return tm


@pytest.mark.parametrize("chosen", [["L1.H3", "L0.H0"], [(1, 2)], ["L1.H0", "L1.H1", "L1.H2", "L1.H3"]])
def test_prune_image_heads_matches_ccs_modify(chosen, model, photos):
    tm, m = model
    pixels = preprocess(photos, m.config.preprocess, 32)
    names = [c if isinstance(c, str) else H.head_name(*c) for c in chosen]
    pruned_torch = _ccs_modify(tm, names, lambda t: t.visual.transformer)
    with torch.no_grad():
        want = pruned_torch.encode_image(torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(),
                                         normalize=False).numpy()
    before = jax.tree.map(np.asarray, m.params)
    pruned = H.prune_heads(m.params, m.config, chosen)
    got = encode_image(pruned, pixels, config=m.config, normalize=False)
    assert_close_scaled(got, want, rel=1e-5, what=f"pruned {names}")
    clean = encode_image(m.params, pixels, config=m.config, normalize=False)
    scale = np.linalg.norm(np.asarray(clean), axis=-1).max()
    assert np.abs(np.asarray(got) - np.asarray(clean)).max() > 1e-2 * scale  # not a no-op
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, m.params), before)  # input untouched
    blocks = pruned["visual"]["transformer"]["blocks"]["attn"]
    np.testing.assert_array_equal(np.asarray(blocks["out_bias"][...]),
                                  np.asarray(m.params["visual"]["transformer"]["blocks"]["attn"]["out_bias"][...]))


def test_prune_text_heads_and_jit(model, captions):
    tm, m = model
    ids = np.asarray(Tokenizer.openai()(captions), np.int32)
    pruned_torch = _ccs_modify(tm, ["L0.H1"], lambda t: t.transformer)
    with torch.no_grad():
        want = pruned_torch.encode_text(torch.from_numpy(ids).long(), normalize=False).numpy()
    pruned = jax.jit(lambda p: H.prune_heads(p, m.config, ("L0.H1",), tower="text"))(m.params)
    assert_close_scaled(encode_text(pruned, ids, config=m.config, normalize=False), want, rel=1e-5,
                        what="pruned text head")
    image_side = pruned["visual"]["transformer"]["blocks"]["attn"]["q_kernel"][...]
    np.testing.assert_array_equal(np.asarray(image_side),
                                  np.asarray(m.params["visual"]["transformer"]["blocks"]["attn"]["q_kernel"][...]))


def test_bad_heads_raise(model):
    _, m = model
    for bad, match in [(["L2.H0"], "'L2.H0' has layer 2 outside"), ([(0, 4)], r"\(0, 4\) has head 4 outside"),
                       (["layer1.head2"], "'layer1.head2' is not a head name"), ([(0,)], "neither"),
                       ([(0.0, 1)], "two ints"), (["L-1.H0"], "not a head name")]:
        with pytest.raises(ValueError, match=match):
            H.prune_heads(m.params, m.config, bad)
    with pytest.raises(ValueError, match="L0.H2"):
        H.prune_heads(m.params, m.config, ["L0.H2"], tower="text")  # the text tower has 2 heads
    with pytest.raises(ValueError, match="tower"):
        H.prune_heads(m.params, m.config, ["L0.H0"], tower="audio")
    with pytest.raises(ValueError, match="ViT"):
        H.prune_heads(None, clipjax.get_config("RN50"), ["L0.H0"])
    assert H.parse_heads("L11.H5", layers=12, num_heads=12) == ((11, 5),)
    for name, lists in H.CCS_HEADS.items():  # association.py's lists parse for their models
        layers, n_heads = (24, 16) if "L-14" in name else (12, 12)
        for group in lists.values():
            assert len(H.parse_heads(group, layers=layers, num_heads=n_heads)) == len(group)


def _skew_reference(predictions, counts, total_cnt, topk):
    """src/metrics.py:skew_metric."""
    results = [0] * len(counts)
    for ii in range(topk):
        results[int(predictions[ii][1])] += 1
    skewness = []
    for ii in range(len(results)):
        if results[ii]:
            skewness.append(np.log((results[ii] / topk) / (counts[ii] / total_cnt)))
    return skewness


@pytest.mark.parametrize("k", [1, 7, 30])
def test_skew_metric_matches_reference(k):
    rng = np.random.RandomState(k)
    scores = np.round(rng.rand(30), 1)  # many ties: the stable order decides the top k
    attributes = rng.randint(0, 4, 30)
    attributes[:3] = [0, 1, 2]  # attribute 3 may be absent from the top k
    counts = [int((attributes == a).sum()) for a in range(4)]
    predictions = sorted(zip(scores.tolist(), attributes.tolist()), key=lambda x: x[0], reverse=True)
    want = _skew_reference(predictions, counts, 30, k)
    got = np.asarray(H.skew_metric(scores, attributes, k=k, num_attributes=4))
    present = ~np.isnan(got)
    np.testing.assert_allclose(got[present], want, rtol=0, atol=1e-6)
    in_top = np.zeros(4, bool)
    in_top[[a for _, a in predictions[:k]]] = True
    np.testing.assert_array_equal(present, in_top)
    with pytest.raises(ValueError, match="attributes"):
        H.skew_metric(scores, attributes + 4, k=k, num_attributes=4)
    with pytest.raises(ValueError, match="k=31"):
        H.skew_metric(scores, attributes, k=31, num_attributes=4)


def test_ccs_bookkeeping():
    rng = np.random.RandomState(0)
    judgements = rng.rand(40, 5) < 0.6
    scores = H.ccs_scores(judgements)
    np.testing.assert_array_equal(np.asarray(scores), judgements.sum(1))
    np.testing.assert_array_equal(np.asarray(H.ccs_scores(judgements.astype(np.int32))), judgements.sum(1))
    for k in range(6):
        assert float(H.ccs_at_k(scores, k)) == pytest.approx(np.mean(judgements.sum(1) == k))
    high, low = H.ccs_groups(scores)
    np.testing.assert_array_equal(np.asarray(high), judgements.sum(1) == 5)
    np.testing.assert_array_equal(np.asarray(low), judgements.sum(1) <= 1)
    with pytest.raises(ValueError, match="judgements"):
        H.ccs_scores(np.full((3, 5), 2))
