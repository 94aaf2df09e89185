"""Held-out evaluation (`clipjax.train.evaluate`) against float64 numpy oracles written from the definitions.

The embeddings are computed by the model in float32 (one call over all examples); the oracle then
does everything else in float64: class weights normalize(mean_t normalize(e)) (CLIP_benchmark), the
zero-shot rank of the true class in a stable descending sort of the logits, and the retrieval rank
of a query = the number of other gallery items scoring >= its true match, `R@K` = mean(rank < K),
open_clip's mean rank (mean + 1) and median rank (floor(median) + 1).

Tolerances: class weights 1e-6 absolute (float32 sums); the counts behind top-k and `R@K` compare
exactly (the data is checked to have no score gap below `MIN_GAP`, so float32 vs float64 cannot
flip a comparison), so do the median ranks; mean ranks to 1e-6 relative. Uneven batches with a
last partial batch, the 8-device mesh, extra padding and float32 (preprocessed) images all give
the same numbers as the oracle.
"""

import dataclasses

import numpy as np
import pytest

from clipjax.tokenizer import Tokenizer

CLASSNAMES = ["cat", "dog", "car", "tree", "boat", "house", "bird"]
TEMPLATES = ["a photo of a {}.", "a blurry photo of the {c}", "art of a {c}"]
BATCH_SIZES = (5, 7, 3, 8, 1)  # uneven, last partial
KS = (1, 5, 10)
MIN_GAP = 1e-5


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    n = sum(BATCH_SIZES)
    tok = Tokenizer.openai()
    words = ["red", "green", "small", "large", "old", "new", "a", "the", "with", "on"]
    captions = [" ".join(rng.choice(words, 5)) + f" {i}" for i in range(n)]
    return {"image": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
            "label": rng.integers(0, len(CLASSNAMES), n).astype(np.int32),
            "text": tok(captions), "captions": captions, "tokenizer": tok}


def batches(data, keys=("image", "label", "text"), sizes=BATCH_SIZES, image_dtype=None):
    start = 0
    for b in sizes:
        out = {k: data[k][start:start + b] for k in keys}
        if image_dtype is not None:
            out["image"] = image_dtype(out["image"])
        yield out
        start += b


def preprocess(images_uint8, cfg):
    mean, std = np.asarray(cfg.preprocess.mean, np.float32), np.asarray(cfg.preprocess.std, np.float32)
    return ((images_uint8.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)


@pytest.fixture(scope="module")
def oracle(model, data):
    """float64 numpy numbers from the model's float32 embeddings."""
    from clipjax.metrics.templates import build_prompts
    from clipjax.models import clip as F

    cfg, params = model.config, model.params
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    prompts = build_prompts(CLASSNAMES, [t.replace("{}", "{c}") for t in TEMPLATES])
    ids = data["tokenizer"]([p for per in prompts for p in per])
    emb = unit(np.asarray(F.encode_text(params, ids, config=cfg, normalize=False), np.float64))
    weights = unit(emb.reshape(len(CLASSNAMES), len(TEMPLATES), -1).mean(axis=1))

    img = unit(np.asarray(F.encode_image(params, preprocess(data["image"], cfg), config=cfg, normalize=False),
                          np.float64))
    txt = unit(np.asarray(F.encode_text(params, data["text"], config=cfg, normalize=False), np.float64))
    logits = img @ weights.T
    order = np.argsort(-logits, axis=1, kind="stable")
    rank = np.argmax(order == data["label"][:, None], axis=1)
    true = logits[np.arange(len(rank)), data["label"]]
    gaps = np.abs(logits - true[:, None])[np.arange(logits.shape[1])[None, :] != data["label"][:, None]]
    assert gaps.min() > MIN_GAP, "near-tied zero-shot logits: pick other test data"

    out = {"weights": weights, "image": img, "top1": int(np.sum(rank < 1)), "top5": int(np.sum(rank < 5)),
           "n": len(rank)}
    out.update(retrieval_oracle(txt, img))
    sim = txt @ img.T
    off = ~np.eye(len(sim), dtype=bool)
    assert np.abs(sim - np.diag(sim)[:, None])[off].min() > MIN_GAP
    assert np.abs(sim - np.diag(sim)[None, :])[off].min() > MIN_GAP
    return out


def retrieval_oracle(txt, img, ks=KS):
    """open_clip's metric names from float64 ranks (ties count against the query)."""
    sim = np.asarray(txt, np.float64) @ np.asarray(img, np.float64).T  # [caption, image]
    n = len(sim)
    off = ~np.eye(n, dtype=bool)
    ranks = {"text_to_image": np.sum((sim >= np.diag(sim)[:, None]) & off, axis=1),
             "image_to_text": np.sum((sim >= np.diag(sim)[None, :]) & off, axis=0)}
    out = {"pairs": n}
    for name, r in ranks.items():
        for k in ks:
            out[f"{name}_R@{k}"] = int(np.sum(r < k)) / n
        out[f"{name}_mean_rank"] = r.mean() + 1
        out[f"{name}_median_rank"] = np.floor(np.median(r)) + 1
    return out


def assert_retrieval_equal(got: dict, want: dict):
    keys = [k for k in want if "R@" in k or "rank" in k]
    assert set(keys) <= set(got), sorted(got)
    for k in keys:
        v = want[k]
        if k.endswith("mean_rank"):
            np.testing.assert_allclose(got[k], v, rtol=1e-6, err_msg=k)
        else:
            assert got[k] == v, (k, got[k], v)


def test_class_text_embeddings_match_the_oracle_and_templates_resolve(model, data, oracle, mesh8):
    from clipjax.metrics import openai_imagenet_templates
    from clipjax.sharding import shard_params
    from clipjax.train.evaluate import class_text_embeddings, resolve_templates

    w = class_text_embeddings(model.params, model.config, data["tokenizer"], CLASSNAMES, TEMPLATES, batch_size=4)
    assert w.shape == (len(CLASSNAMES), model.config.embed_dim)
    np.testing.assert_allclose(np.asarray(w), oracle["weights"], atol=1e-6, rtol=0)
    w8 = class_text_embeddings(shard_params(model.params, mesh8), model.config, data["tokenizer"], CLASSNAMES,
                               TEMPLATES, mesh=mesh8)
    assert w8.sharding.is_fully_replicated
    np.testing.assert_allclose(np.asarray(w8), oracle["weights"], atol=1e-6, rtol=0)

    assert resolve_templates("openai") == openai_imagenet_templates() and len(resolve_templates("openai")) == 80
    assert resolve_templates(["a {}", "the {c}"]) == ["a {c}", "the {c}"]
    with pytest.raises(ValueError, match="placeholder"):
        resolve_templates(["no placeholder"])
    with pytest.raises(ValueError, match="templates='nope'"):
        resolve_templates("nope")


def test_zeroshot_equals_the_oracle_with_uneven_batches_mesh_and_padding(model, data, oracle, mesh8):
    from clipjax.sharding import shard_params
    from clipjax.train.evaluate import zeroshot_eval

    n = oracle["n"]
    want = {"zeroshot_top1": oracle["top1"] / n, "zeroshot_top5": oracle["top5"] / n, "examples": n}
    w = oracle["weights"].astype(np.float32)
    got = zeroshot_eval(model.params, model.config, batches(data, ("image", "label")), w)
    assert got == want
    sharded = shard_params(model.params, mesh8)
    # 8 devices: local size 8 (rounded up from the first batch's 5); the batch of 8 needs no padding
    assert zeroshot_eval(sharded, model.config, batches(data), w, mesh=mesh8) == want
    # more padding, and preprocessed float32 images
    assert zeroshot_eval(sharded, model.config, batches(data, image_dtype=lambda x: preprocess(x, model.config)),
                         w, mesh=mesh8, local_batch_size=24) == want
    # a batch larger than the local size is split; fewer than 5 classes: top-5 is NaN (CLIP_benchmark)
    few = dict(data, label=data["label"] % 3)
    got = zeroshot_eval(model.params, model.config, batches(few, sizes=(3, 21)), w[:3])
    logits = oracle["image"] @ oracle["weights"][:3].T
    top2 = np.sort(logits, axis=1)[:, -2:]
    assert np.min(top2[:, 1] - top2[:, 0]) > MIN_GAP
    order = np.argsort(-logits, axis=1, kind="stable")
    assert got["zeroshot_top1"] == int(np.sum(order[:, 0] == few["label"])) / n
    assert got["examples"] == n and np.isnan(got["zeroshot_top5"])


def test_retrieval_equals_the_oracle_with_uneven_batches_mesh_and_blocks(model, data, oracle, mesh8):
    from clipjax.sharding import shard_params
    from clipjax.train.evaluate import retrieval_eval

    got = retrieval_eval(model.params, model.config, batches(data, ("image", "text")))
    assert got["pairs"] == oracle["pairs"]
    assert_retrieval_equal(got, oracle)
    sharded = shard_params(model.params, mesh8)
    # 5 steps of 8 rows (24 valid); then 2 steps of 16 in blocks of 5: padded to 40 = lcm(5, 8) rows, 8 blocks
    for kw in ({}, {"block": 5, "local_batch_size": 16}):
        assert retrieval_eval(sharded, model.config, batches(data), mesh=mesh8, **kw) == got, kw


def test_paired_metrics_ignore_padding_and_count_ties_against_the_query():
    """Crafted embeddings: every true pair has a negative score, padded rows are zero vectors (score 0, which
    would outrank every true match) and one image is duplicated (an exact tie)."""
    from clipjax.train.evaluate import paired_retrieval_metrics

    rng = np.random.default_rng(1)
    n, e = 11, 6
    img = rng.standard_normal((n, e))
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt = -img + 0.3 * rng.standard_normal((n, e))  # true pairs score negative
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    img[4] = img[7]  # a duplicate image: caption 4 ties with image 7, caption 7 with image 4
    want = retrieval_oracle(txt, img, ks=(1, 2, 5))
    assert np.diag(txt @ img.T).max() < 0
    got = paired_retrieval_metrics(txt.astype(np.float32), img.astype(np.float32), ks=(1, 2, 5))
    assert_retrieval_equal(got, want)
    # zero (padding) rows spread through the gallery, masked out: the same numbers
    pos = np.sort(rng.choice(n + 6, n, replace=False))
    pt, pi = np.zeros((n + 6, e), np.float32), np.zeros((n + 6, e), np.float32)
    pt[pos], pi[pos] = txt, img
    valid = np.zeros(n + 6, bool)
    valid[pos] = True
    for block in (3, 4, 100):
        assert paired_retrieval_metrics(pt, pi, valid, ks=(1, 2, 5), block=block) == got
    # unmasked, the zero rows outrank every true pair: R@1 drops to 0
    assert paired_retrieval_metrics(pt, pi, ks=(1,))["text_to_image_R@1"] == 0.0
    with pytest.raises(ValueError, match="all False"):
        paired_retrieval_metrics(pt, pi, np.zeros(n + 6, bool))


def test_make_eval_fn_rereads_the_data_each_call(model, data, oracle):
    from clipjax.train.evaluate import ZeroShotSet, make_eval_fn

    calls = []

    class Closing:
        def __init__(self, keys):
            calls.append(keys)
            self.it, self.closed = batches(data, keys), False

        def __iter__(self):
            return self.it

        def close(self):
            calls.append("closed")

    fn = make_eval_fn(model.config, tokenizer=data["tokenizer"],
                      zeroshot=ZeroShotSet(lambda: Closing(("image", "label")), CLASSNAMES, TEMPLATES),
                      retrieval=lambda: Closing(("image", "text")))
    for _ in range(2):
        got = fn(model.params)
        n = oracle["n"]
        assert got["zeroshot_top1"] == oracle["top1"] / n and got["zeroshot_top5"] == oracle["top5"] / n
        assert got["zeroshot_examples"] == n and got["retrieval_pairs"] == n
        assert_retrieval_equal(got, oracle)
    assert calls == [("image", "label"), "closed", ("image", "text"), "closed"] * 2


def test_bad_inputs_raise_naming_the_problem(model, data, oracle):
    from clipjax.train.evaluate import ZeroShotSet, class_text_embeddings, make_eval_fn, retrieval_eval, \
        zeroshot_eval

    cfg, params, w = model.config, model.params, oracle["weights"].astype(np.float32)
    bad_label = dict(data, label=np.where(np.arange(len(data["label"])) == 9, len(CLASSNAMES), data["label"]))
    with pytest.raises(ValueError, match=r"'label' holds values in \[\d, 7\]; expected \[0, 7\)"):
        zeroshot_eval(params, cfg, batches(bad_label), w)
    with pytest.raises(ValueError, match=r"missing \['label'\]"):
        zeroshot_eval(params, cfg, batches(data, ("image",)), w)
    with pytest.raises(ValueError, match=r"missing \['text'\]"):
        retrieval_eval(params, cfg, batches(data, ("image", "label")))
    small = dict(data, image=data["image"][:, :16, :16])
    with pytest.raises(ValueError, match=r"'image' is uint8 \(5, 16, 16, 3\); expected .* \[b, 32, 32, 3\]"):
        retrieval_eval(params, cfg, batches(small))
    with pytest.raises(ValueError, match="no examples"):
        retrieval_eval(params, cfg, iter([]))
    with pytest.raises(ValueError, match="class_weights must have shape"):
        zeroshot_eval(params, cfg, batches(data), w[:, :8])
    with pytest.raises(ValueError, match="class_weights"):
        zeroshot_eval(params, cfg, batches(data), 2 * w)  # not unit-norm
    with pytest.raises(ValueError, match="tokenizer"):
        make_eval_fn(cfg, zeroshot=ZeroShotSet(lambda: batches(data), CLASSNAMES))
    with pytest.raises(ValueError, match="zeroshot and / or retrieval"):
        make_eval_fn(cfg)
    short = dataclasses.replace(cfg.text, context_length=16)
    with pytest.raises(ValueError, match=r"<= 16\] token ids"):
        class_text_embeddings(params, cfg.replace(text=short), data["tokenizer"], CLASSNAMES, TEMPLATES)


def test_experiments_train_files_source_wires_eval_and_class_weights(model, data, oracle, tmp_path):
    """experiments/train.py, data source `files`: a labelled JSONL table of 32x32 PNGs (the eval transform
    leaves them as they are), `data.eval` with zeroshot and retrieval over it in eval batches of 5 (the last
    one 4), and the class weights of a labelled training source; all equal the oracle's numbers."""
    import importlib.util
    import json
    import os
    import sys

    from PIL import Image

    from clipjax.train.config import TrainConfig

    spec = importlib.util.spec_from_file_location(
        "experiments_train_h2", os.path.join(os.path.dirname(__file__), "..", "experiments", "train.py"))
    train_py = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = train_py
    spec.loader.exec_module(train_py)

    with open(tmp_path / "t.jsonl", "w") as f:
        for i, (img, cap, y) in enumerate(zip(data["image"], data["captions"], data["label"])):
            Image.fromarray(img).save(tmp_path / f"{i}.png")
            f.write(json.dumps({"filepath": f"{i}.png", "title": cap, "label": int(y)}) + "\n")
    (tmp_path / "names.txt").write_text("\n".join(CLASSNAMES) + "\n")
    table, names = str(tmp_path / "t.jsonl"), str(tmp_path / "names.txt")
    labelled = {"source": table, "label_key": "label", "classnames": names}
    cfg = {"name": "files", **labelled, "class_templates": TEMPLATES,
           "eval": {"batch_size": 5, "zeroshot": {**labelled, "templates": TEMPLATES},
                    "retrieval": {"source": table, "caption_key": "title"}}}
    tc = TrainConfig(batch_size=8, total_steps=1, eval_every=1)
    source = train_py.build_data(cfg, model.config, tc)
    try:
        np.testing.assert_allclose(np.asarray(source.class_weights(model.params)), oracle["weights"], atol=1e-6,
                                   rtol=0)
        got = source.eval_fn(model.params)
    finally:
        source.train.close()
    n = oracle["n"]
    assert got["zeroshot_top1"] == oracle["top1"] / n and got["zeroshot_top5"] == oracle["top5"] / n
    assert got["zeroshot_examples"] == got["retrieval_pairs"] == n
    assert_retrieval_equal(got, oracle)

    for bad, message in [({"eval": {"zeroshot": labelled, "every": 2}}, r"unknown data.eval keys \['every'\]"),
                         ({"eval": {"retrieval": {"source": table, "shuffle": 1}}},
                          r"unknown data.eval.retrieval keys \['shuffle'\]"),
                         ({"eval": {"zeroshot": {"source": table, "label_key": "label"}}}, "needs classnames"),
                         ({"eval": {"retrieval": {"source": str(tmp_path / "none.csv")}}}, "none.csv"),
                         ({"eval": {"batch_size": 5}}, "zeroshot and / or retrieval")]:
        with pytest.raises(train_py.DataSourceError, match=message):
            train_py.build_data({"name": "files", "source": table, "caption_key": "title", **bad}, model.config, tc)


def test_tecoa_fine_tunes_on_a_labelled_caption_less_files_source(model, model_dir, data, tmp_path):
    """experiments/train.py `run()` with loss="tecoa" on a labelled JSONL table without captions (TeCoA's
    prompt makes them; the class weights come from the same prompt): 2 SGD steps from `init_from` finish,
    the locked text tower and the logit scale are unchanged (bitwise), the image tower moved."""
    import importlib.util
    import json
    import os
    import sys

    import jax
    from PIL import Image

    import clipjax

    here = os.path.dirname(__file__)
    spec = importlib.util.spec_from_file_location("experiments_train_tecoa", os.path.join(here, "..", "experiments",
                                                                                          "train.py"))
    train_py = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = train_py
    spec.loader.exec_module(train_py)
    sys.path.insert(0, os.path.join(here, "..", "experiments", "configs"))
    import common

    with open(tmp_path / "t.jsonl", "w") as f:
        for i, (img, y) in enumerate(zip(data["image"][:8], data["label"][:8])):
            Image.fromarray(img).save(tmp_path / f"{i}.png")
            f.write(json.dumps({"filepath": f"{i}.png", "label": int(y)}) + "\n")
    c = common.base_config(loss="tecoa", optimizer="sgd", beta1=0.9, lock_text=True, batch_size=4, total_steps=2,
                           warmup_steps=1, lr=1e-2, adv_eps=1 / 255, adv_alpha=1 / 255, adv_steps=1,
                           checkpoint_every=2, log_every=1, eval_every=0)
    c.init_from = model_dir
    c.mesh.data = 1
    c.data = {"name": "files", "source": str(tmp_path / "t.jsonl"), "caption_key": None, "label_key": "label",
              "classnames": CLASSNAMES, "caption_template": "This is a photo of a {}", "shuffle_buffer": 1}
    result = train_py.run(c, str(tmp_path / "run"), progress=False, log=lambda *a: None)
    assert (result.step, result.stopped) == (2, "done")
    before, after = model.params.to_pure_dict(), clipjax.load(str(tmp_path / "run")).params.to_pure_dict()
    for a, b in zip(jax.tree.leaves(before["text"]), jax.tree.leaves(after["text"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(before["log_logit_scale"]), np.asarray(after["log_logit_scale"]))
    moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                for a, b in zip(jax.tree.leaves(before["visual"]), jax.tree.leaves(after["visual"])))
    assert moved > 1e-6
