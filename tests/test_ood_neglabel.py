"""NegLabel mining and grouped score against float64 torch transcriptions of the reference code,
plus the word list and class-name checks.

References (methods.md §9):
  * mining: `XueJiang16/NegLabel:mmcls/models/classifiers/multi_modal.py:CLIPScalableClassifier.__init__`
    (`torch.quantile(neg @ pos.T, q=pencentile, dim=-1)`, `argsort`, keep `int(len * neg_topk)` of
    nouns then of adjectives);
  * score: `mmcls/models/ood/clip_ood.py:ScalableClassifier.grouping` with `random_permute=True`
    (drop the remainder, `torch.manual_seed(0); torch.randperm`, softmax per group, mean).
Passing torch's permutation to `neglabel_score(permutation=...)` reproduces the reference exactly.
Tolerance: rtol 2e-5 (float32 vs float64 softmax of 100 * cos logits).
"""

import numpy as np
import pytest

from clipjax.ood import (check_class_names, default_wordlist, group_permutation, load_wordlist, mine_negative_labels,
                         negative_prompts, neglabel_score, percentile_similarity)


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def emb():
    rng = np.random.default_rng(0)
    d = 32
    id_emb = _unit(rng.normal(size=(9, d))).astype(np.float32)
    nouns = _unit(rng.normal(size=(301, d))).astype(np.float32)
    adjs = _unit(rng.normal(size=(87, d))).astype(np.float32)
    images = _unit(rng.normal(size=(24, d))).astype(np.float32)
    return id_emb, nouns, adjs, images


@pytest.mark.parity
def test_mining_matches_reference(emb):
    import torch

    id_emb, nouns, adjs, _ = emb
    pos = torch.from_numpy(id_emb.astype(np.float64))
    neg = torch.from_numpy(np.concatenate([nouns, adjs]).astype(np.float64))
    sim = torch.quantile(neg @ pos.T, q=0.95, dim=-1)
    sim_noun, sim_adj = sim[: len(nouns)], sim[len(nouns):]
    ind_noun, ind_adj = torch.argsort(sim_noun), torch.argsort(sim_adj)
    keep_noun, keep_adj = ind_noun[: int(len(ind_noun) * 0.15)], ind_adj[: int(len(ind_adj) * 0.15)]

    got = mine_negative_labels(nouns, adjs, id_emb, percentile=0.95, fraction=0.15)
    np.testing.assert_allclose(got.noun_similarity, sim_noun.numpy(), rtol=0, atol=2e-6)
    np.testing.assert_allclose(got.adjective_similarity, sim_adj.numpy(), rtol=0, atol=2e-6)
    np.testing.assert_array_equal(got.noun_index, keep_noun.numpy())
    np.testing.assert_array_equal(got.adjective_index, keep_adj.numpy())
    selected = got.select(nouns, adjs)
    np.testing.assert_array_equal(selected, np.concatenate([nouns[keep_noun.numpy()], adjs[keep_adj.numpy()]]))
    # chunking does not change the result
    np.testing.assert_allclose(percentile_similarity(nouns, id_emb, 0.95, chunk=7), got.noun_similarity, atol=1e-7)


def test_percentile_matches_numpy_quantile_with_ties():
    """The sort-free quantile (bisection on float keys) equals np.quantile(method="linear"), ties included."""
    rng = np.random.default_rng(3)
    cands = rng.normal(size=(50, 8)).astype(np.float32)
    ids = rng.normal(size=(37, 8)).astype(np.float32)
    ids[5:9] = ids[4]  # repeated ID rows give tied similarities
    ids[20] = -ids[3]
    cos = _unit(cands.astype(np.float64)) @ _unit(ids.astype(np.float64)).T
    for q in (0.0, 0.25, 0.5, 0.95, 0.99, 1.0):
        want = np.quantile(cos, q, axis=-1)
        np.testing.assert_allclose(percentile_similarity(cands, ids, q), want, rtol=0, atol=2e-6)


def _torch_grouping(pos, neg, ngroup, t=1.0):
    """ScalableClassifier.grouping(random_permute=True) on CPU, float64."""
    import torch

    drop = neg.shape[1] % ngroup
    if drop > 0:
        neg = neg[:, :-drop]
    torch.manual_seed(0)
    idx = torch.randperm(neg.shape[1])
    negs = neg.T[idx].T.reshape(pos.shape[0], ngroup, -1)
    scores = []
    for i in range(ngroup):
        full_sim = torch.cat([pos, negs[:, i, :]], dim=-1) / t
        scores.append(full_sim.softmax(dim=-1)[:, : pos.shape[1]].sum(dim=-1).unsqueeze(-1))
    return torch.cat(scores, dim=-1).mean(dim=-1).numpy(), idx.numpy()


@pytest.mark.parity
@pytest.mark.parametrize("ngroup", [1, 4, 7])
def test_grouped_score_matches_reference(emb, ngroup):
    import torch

    id_emb, nouns, _, images = emb
    neg_emb = nouns[:100]
    x = torch.from_numpy(images.astype(np.float64))
    pos = 100.0 * x @ torch.from_numpy(id_emb.astype(np.float64)).T
    neg = 100.0 * x @ torch.from_numpy(neg_emb.astype(np.float64)).T
    want, torch_perm = _torch_grouping(pos, neg, ngroup)
    got = neglabel_score(images, id_emb, neg_emb, num_groups=ngroup, permutation=torch_perm)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)
    if ngroup == 1:  # one group: no permutation, the plain ID probability over all labels
        np.testing.assert_allclose(neglabel_score(images, id_emb, neg_emb, num_groups=1), want, rtol=2e-5)


def test_jax_permutation_is_seeded_and_valid(emb):
    id_emb, nouns, _, images = emb
    p0, p0b, p1 = group_permutation(100, 7, 0), group_permutation(100, 7, 0), group_permutation(100, 7, 1)
    np.testing.assert_array_equal(p0, p0b)
    assert not np.array_equal(p0, p1)
    np.testing.assert_array_equal(np.sort(np.asarray(p0)), np.arange(98))  # 100 - 100 % 7
    a = neglabel_score(images, id_emb, nouns[:100], num_groups=7, seed=0)
    b = neglabel_score(images, id_emb, nouns[:100], num_groups=7, permutation=p0)
    np.testing.assert_array_equal(a, b)


def test_neglabel_bad_input(emb):
    id_emb, nouns, adjs, images = emb
    with pytest.raises(ValueError, match="num_groups"):
        neglabel_score(images, id_emb, nouns[:5], num_groups=6)
    with pytest.raises(ValueError, match="permutation must have shape"):
        neglabel_score(images, id_emb, nouns[:10], num_groups=3, permutation=np.arange(10))
    with pytest.raises(ValueError, match="not a permutation"):
        neglabel_score(images, id_emb, nouns[:10], num_groups=2, permutation=np.zeros(10, np.int32))
    with pytest.raises(ValueError, match="empty"):
        neglabel_score(images, id_emb, nouns[:0])
    with pytest.raises(ValueError, match="duplicate"):
        neglabel_score(images, np.concatenate([id_emb, id_emb[:1]]), nouns[:10], num_groups=2)
    with pytest.raises(ValueError, match="dimensions differ"):
        mine_negative_labels(nouns[:, :16], adjs, id_emb)
    with pytest.raises(ValueError, match="keeps no negative"):
        mine_negative_labels(nouns[:3], None, id_emb, fraction=0.1)
    with pytest.raises(ValueError, match="fraction"):
        mine_negative_labels(nouns, adjs, id_emb, fraction=0.0)
    bad = nouns.copy()
    bad[5, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        mine_negative_labels(bad, adjs, id_emb)


def test_default_wordlist_from_lemminflect():
    nouns, adjs = default_wordlist()
    assert len(nouns) == 19130 and len(adjs) == 6089  # lemminflect 0.2.3's lexicon, filtered
    assert {"dog", "aardvark", "electron"} <= set(nouns) and {"happy", "abject", "beautiful"} <= set(adjs)
    assert not set(nouns) & set(adjs) and len(set(nouns)) == len(nouns)
    assert all(w == w.lower() and " " not in w for w in nouns + adjs)
    noun_prompts, adj_prompts = negative_prompts(nouns[:3], adjs[:2])
    assert noun_prompts == [f"the nice {w}" for w in nouns[:3]]
    assert adj_prompts == [f"This is a {w} photo" for w in adjs[:2]]


def test_user_wordlist_and_prompts(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("# my words\ncat\nred\tadj\ncat\n\nice cream\tnoun\nfast\tadjective\n", encoding="utf-8")
    nouns, adjs = load_wordlist(path)
    assert nouns == ["cat", "ice cream"] and adjs == ["red", "fast"]
    noun_p, adj_p = negative_prompts(nouns + ["Dog"], adjs + ["cat"], exclude=["DOG"])
    assert noun_p == ["the nice cat", "the nice ice cream"] and adj_p == ["This is a red photo", "This is a fast photo"]
    (tmp_path / "bad.txt").write_text("cat\tverb\n", encoding="utf-8")
    with pytest.raises(ValueError, match="part of speech"):
        load_wordlist(tmp_path / "bad.txt")
    (tmp_path / "empty.txt").write_text("# nothing\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no word"):
        load_wordlist(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="no candidate"):
        negative_prompts(["cat"], exclude=["cat"])


def test_class_name_checks():
    assert check_class_names([" cat", "dog "]) == ["cat", "dog"]
    with pytest.raises(ValueError, match="empty"):
        check_class_names([])
    with pytest.raises(ValueError, match="duplicate ID class names: \\['Cat', 'cat'\\]"):
        check_class_names(["cat", "dog", "Cat"])
    with pytest.raises(ValueError, match="blank"):
        check_class_names(["cat", "  "])
    with pytest.raises(TypeError, match="single string"):
        check_class_names("cat,dog")
    with pytest.raises(TypeError, match="expected str"):
        check_class_names(["cat", 3])
