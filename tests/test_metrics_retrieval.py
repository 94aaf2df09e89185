"""Recall@K against CLIP_benchmark, a stable-sort numpy oracle for ties, and 8-device sharding.

Tolerances: recalls are means of 0/1 hits over the same queries, so they must be
equal up to float32 resolution (1e-6); top-k indices must be identical.
"""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from clipjax import metrics


def _data(n_img=150, per=5, d=24, noise=1.2, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(n_img, d))
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    t2i = np.repeat(np.arange(n_img), per)
    rng.shuffle(t2i)
    txt = img[t2i] + noise * rng.normal(size=(len(t2i), d)) / np.sqrt(d) * 3
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    return txt.astype(np.float32), img.astype(np.float32), t2i


def _clip_benchmark_recalls(txt, img, t2i, ks, n_img=None):
    """CLIP_benchmark's `zeroshot_retrieval.evaluate` recall computation (its `recall_at_k` through `batchify`,
    batch 64, a query counts when it finds >= 1 positive) on the same scores. An image with no caption has no
    positive: its 0/0 recall is NaN, and NaN > 0 is False, a miss."""
    import torch
    from clip_benchmark.metrics import zeroshot_retrieval as zr

    scores = torch.from_numpy(txt) @ torch.from_numpy(img).T
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(scores)), torch.from_numpy(t2i)] = True
    out = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = (zr.batchify(zr.recall_at_k, scores, positive, 64, "cpu", k=k) > 0
                                              ).float().mean().item()
        out[f"text_retrieval_recall@{k}"] = (zr.batchify(zr.recall_at_k, scores.T, positive.T, 64, "cpu", k=k) > 0
                                             ).float().mean().item()
    return out


@pytest.mark.parity
def test_recall_matches_clip_benchmark():
    txt, img, t2i = _data()
    ks = (1, 5, 10)
    out = metrics.recall_at_k(txt, img, t2i, ks, query_block=64, gallery_block=40)
    want = _clip_benchmark_recalls(txt, img, t2i, ks)
    assert set(out) == set(want)
    for key, v in want.items():
        assert abs(float(out[key]) - v) < 1e-6, key
    # a non-trivial operating point, so a wrong implementation would disagree
    assert 0.05 < float(out["image_retrieval_recall@1"]) < 0.9


def test_topk_equals_stable_sort_oracle_with_ties():
    rng = np.random.default_rng(3)
    gallery = rng.normal(size=(37, 8)).astype(np.float32)
    gallery[[5, 20, 33]] = gallery[11]  # exact duplicates -> tied scores
    gallery[[7, 30]] = gallery[2]
    queries = np.concatenate([gallery[[11, 2, 0]], rng.normal(size=(20, 8)).astype(np.float32)])
    scores = queries @ gallery.T
    oracle = np.argsort(-scores, axis=1, kind="stable")[:, :6]  # ties -> lower index first
    for qb, gb in [(23, 37), (4, 5), (7, 3)]:
        vals, idx = metrics.topk_retrieval(queries, gallery, 6, query_block=qb, gallery_block=gb)
        np.testing.assert_array_equal(np.asarray(idx), oracle)
        np.testing.assert_allclose(np.asarray(vals), np.take_along_axis(scores, oracle, 1), rtol=1e-6, atol=1e-6)


def test_recall_with_ties_follows_stable_order():
    # image 1 duplicates image 0: the caption of image 1 sees image 0 first (lower index)
    img = np.array([[1, 0], [1, 0], [0, 1]], np.float32)
    txt = np.array([[1, 0], [1, 0], [0, 1]], np.float32)
    out = metrics.recall_at_k(txt, img, np.array([0, 1, 2]), (1, 2))
    assert float(out["image_retrieval_recall@1"]) == pytest.approx(2 / 3)
    assert float(out["image_retrieval_recall@2"]) == pytest.approx(1.0)
    assert float(out["text_retrieval_recall@1"]) == pytest.approx(2 / 3)


@pytest.mark.parity
def test_image_without_captions_counts_as_miss():
    """Image 0 loses its captions: every recall equals CLIP_benchmark's on the same data (1e-6), where image 0 is
    a miss at every k (its 0/0 recall is NaN, not > 0): text recall@19 is 19/20, every other image finding one of
    its captions among its top 19 of the 38."""
    txt, img, t2i = _data(n_img=20, per=2)
    keep = t2i != 0  # image 0 loses its captions
    ks = (1, 5, 19)
    out = metrics.recall_at_k(txt[keep], img, t2i[keep], ks)
    want = _clip_benchmark_recalls(txt[keep], img, t2i[keep], ks)
    assert set(out) == set(want)
    for key, v in want.items():
        assert abs(float(out[key]) - v) < 1e-6, key
    assert want["text_retrieval_recall@19"] == pytest.approx(19 / 20)


def test_sharded_jit_equals_unsharded(mesh8):
    txt, img, t2i = _data(n_img=64, per=4)
    ref = metrics.recall_at_k(txt, img, t2i, (1, 5), query_block=32, gallery_block=48)
    rows = NamedSharding(mesh8, P("data", None))
    txt_s = jax.device_put(txt, rows)
    img_s = jax.device_put(img, rows)
    t2i_s = jax.device_put(t2i.astype(np.int32), NamedSharding(mesh8, P("data")))
    fn = jax.jit(lambda a, b, c: metrics.recall_at_k(a, b, c, (1, 5), query_block=32, gallery_block=48))
    with jax.set_mesh(mesh8):  # activates the in-loop sharding constraint
        out = fn(txt_s, img_s, t2i_s)
    for key in ref:
        assert float(out[key]) == pytest.approx(float(ref[key]), abs=1e-6)
    vals, idx = jax.jit(lambda a, b: metrics.topk_retrieval(a, b, 5, query_block=64))(txt_s, img_s)
    r_vals, r_idx = metrics.topk_retrieval(txt, img, 5, query_block=64)
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(r_idx))
    np.testing.assert_allclose(np.asarray(vals), np.asarray(r_vals), rtol=1e-6, atol=1e-6)


def test_bad_input_errors():
    txt, img, t2i = _data(n_img=10, per=2)
    with pytest.raises(ValueError, match="larger than the image gallery"):
        metrics.recall_at_k(txt, img, t2i, (11,))
    with pytest.raises(ValueError, match="larger than the gallery"):
        metrics.topk_retrieval(txt, img, 11)
    with pytest.raises(ValueError, match="length"):
        metrics.recall_at_k(txt, img, t2i[:-1])
    with pytest.raises(ValueError, match=r"text_to_image must lie in \[0, 10\)"):
        metrics.recall_at_k(txt, img, t2i + 1, (1,))
    with pytest.raises(ValueError, match="L2-normalised"):
        metrics.recall_at_k(txt * 2, img, t2i, (1,))
    bad = img.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        metrics.recall_at_k(txt, bad, t2i, (1,))
    with pytest.raises(ValueError, match="empty"):
        metrics.recall_at_k(txt[:0], img, t2i[:0], (1,))
    with pytest.raises(ValueError, match="embedding dimensions differ"):
        metrics.recall_at_k(txt[:, :5], img, t2i, (1,))
    with pytest.raises(ValueError, match="positive integer"):
        metrics.recall_at_k(txt, img, t2i, (0,))
    # normalize=True accepts raw embeddings and gives the normalised answer
    a = metrics.recall_at_k(txt * 3, img * 0.5, t2i, (1, 3), normalize=True)
    b = metrics.recall_at_k(txt, img, t2i, (1, 3))
    assert {k: float(v) for k, v in a.items()} == {k: float(v) for k, v in b.items()}
