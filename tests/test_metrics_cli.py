"""`clipjax eval` / `clipjax score` end to end with a tiny random-init checkpoint.

Data: tfds mock data (`tfds.testing.mock_data`) for cifar10 (random images, and real
scikit-image photos fed through `as_data_source_fn`), a caption data set built from a
tiny tfds builder written to a temporary package, and folders of real photos.

Each command's JSON is checked against an independent computation: the same
checkpoint loaded unsharded, embeddings from `model.encode_*`, and the metric from
numpy/scikit-learn/vendi-score oracles in float64 (zero-shot prompts from the templates file
of the installed clip_benchmark package, not clipjax's copy). Tolerances: discrete metrics
(accuracies, recalls) must be equal; continuous scores agree to 1e-5 relative (the
CLI encodes on 8 sharded devices in padded batches, the oracle on one device).
"""

import json
import os
import sys
import textwrap
import warnings

import numpy as np
import pytest

from clipjax.cli import main


def _photos(size=None):
    from skimage import data, transform

    out = {}
    for name in ("astronaut", "chelsea", "coffee", "rocket", "motorcycle"):
        im = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
        if size:
            im = transform.resize(im, (size, size), anti_aliasing=True, preserve_range=True).astype(np.uint8)
        out[name] = im
    return out


def _run(capsys, argv):
    code = main(argv)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_eval_zeroshot_real_photos_matches_direct_computation(model_dir, model, capsys, tmp_path):
    import tensorflow_datasets as tfds

    photos = list(_photos(32).values())
    labels = [3, 1, 4, 1, 5, 9, 2, 6]
    examples = [{"id": str(i), "image": photos[i % len(photos)], "label": np.int64(y)} for i, y in enumerate(labels)]
    out = tmp_path / "res" / "zs.json"
    with tfds.testing.mock_data(as_data_source_fn=lambda builder, split, **kw: examples):
        names = tfds.builder("cifar10").info.features["label"].names  # '0'..'9' without metadata
        code, stdout, _ = _run(capsys, ["eval", "zeroshot", "--model", model_dir, "--dataset", "cifar10",
                                        "--batch-size", "3", "--out", str(out), "--no-progress"])
    assert code == 0
    res = json.loads(stdout)
    assert json.loads(out.read_text()) == res
    assert res["num_templates"] == len(_reference_templates("cifar10"))
    assert res["num_examples"] == 8 and res["num_classes"] == 10 and res["num_templates"] == 18
    want = _zeroshot_oracle(model, names, [ex["image"] for ex in examples], labels)
    assert set(res["metrics"]) == set(want)
    for k, v in want.items():
        assert res["metrics"][k] == pytest.approx(v, abs=1e-6), k


def _reference_templates(dataset):
    """CLIP_benchmark's templates for `dataset`, read from the installed clip_benchmark package (the source of
    clipjax's asset; `test_metrics_zeroshot.py` checks that the two files are equal)."""
    from importlib import resources

    name = "en_zeroshot_classification_templates.json"
    with resources.files("clip_benchmark").joinpath("datasets", name).open("r", encoding="utf-8") as f:
        return json.load(f)[dataset]


def _zeroshot_oracle(model, names, images, labels):
    """CLIP_benchmark's zero-shot recipe in float64 numpy on embeddings from the unsharded model: class weight =
    normalize(mean_t normalize(E_text(template_t(c)))), logits 100 x_hat @ W, top-1 / top-5 of a stable
    descending sort, scikit-learn's balanced accuracy."""
    from sklearn.metrics import balanced_accuracy_score

    temps = _reference_templates("cifar10")
    w = []
    for c in names:
        e = _unit(model.encode_text(model.tokenize([t.format(c=c) for t in temps])))
        w.append(e.mean(0) / np.linalg.norm(e.mean(0)))
    img = _unit(model.encode_image(model.preprocess(images)))
    logits = 100 * img @ np.stack(w, 1)
    order = np.argsort(-logits, axis=1, kind="stable")
    y = np.asarray(labels)
    with warnings.catch_warnings():  # predicted classes absent from y: recall is averaged over y's classes
        warnings.filterwarnings("ignore", "y_pred contains classes not in y_true", UserWarning)
        recall = balanced_accuracy_score(y, order[:, 0])
    return {"acc1": np.mean(order[:, 0] == y), "acc5": np.mean((order[:, :5] == y[:, None]).any(1)),
            "mean_per_class_recall": recall}


def test_eval_zeroshot_on_random_mock_data(model_dir, model, capsys):
    """tfds mock data (random images, deterministic per split): the CLI's metrics on the first 10 examples equal
    the oracle's on the same examples (read back from the mock source), exactly up to 1e-6."""
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=11):
        code, stdout, _ = _run(capsys, ["eval", "zeroshot", "--model", model_dir, "--dataset", "cifar10",
                                        "--batch-size", "8", "--limit", "10", "--no-progress"])
        builder = tfds.builder("cifar10")
        source = builder.as_data_source(split="test")
        examples = [source[i] for i in range(10)]
        names = builder.info.features["label"].names
    assert code == 0
    res = json.loads(stdout)
    assert res["num_examples"] == 10 and res["num_classes"] == 10
    assert res["num_templates"] == len(_reference_templates("cifar10"))
    want = _zeroshot_oracle(model, names, [np.asarray(ex["image"]) for ex in examples],
                            [int(ex["label"]) for ex in examples])
    assert set(res["metrics"]) == set(want)
    for k, v in want.items():
        assert res["metrics"][k] == pytest.approx(v, abs=1e-6), k


_BUILDER = '''
import tensorflow_datasets as tfds


class TinyCaptions(tfds.core.GeneratorBasedBuilder):
    """Images with several captions each (only its features are used; data comes from mock_data)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "captions": tfds.features.Sequence({"text": tfds.features.Text()}),
        }))

    def _split_generators(self, dl_manager):
        return {"test": self._generate_examples()}

    def _generate_examples(self):
        yield 0, {}
'''


@pytest.fixture(scope="module")
def caption_builder(tmp_path_factory):
    """A tfds builder with Image + Sequence(Text) features, in an importable package (tfds needs one)."""
    root = tmp_path_factory.mktemp("builders")
    pkg = root / "clipjax_test_builders"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent(_BUILDER))
    sys.path.insert(0, str(root))
    try:
        import clipjax_test_builders  # noqa: F401  (registers "tiny_captions")
    finally:
        sys.path.remove(str(root))
    return "tiny_captions"


def test_eval_retrieval_matches_direct_computation(model_dir, model, caption_builder, capsys):
    import tensorflow_datasets as tfds

    photos = _photos(40)
    caps = {"astronaut": ["an astronaut", "a woman in a space suit"], "chelsea": ["a cat"],
            "coffee": ["a cup of coffee", "coffee on a saucer", "a drink"], "rocket": ["a rocket", "a launch pad"],
            "motorcycle": ["a motorcycle"]}
    examples = [{"image": photos[k], "captions": {"text": np.array([c.encode() for c in v], dtype=object)}}
                for k, v in caps.items()]
    with tfds.testing.mock_data(as_data_source_fn=lambda builder, split, **kw: examples):
        code, stdout, _ = _run(capsys, ["eval", "retrieval", "--model", model_dir, "--dataset", caption_builder,
                                        "--recall-k", "1,2,4", "--batch-size", "4", "--no-progress"])
        assert code == 0
        code, _, err = _run(capsys, ["eval", "retrieval", "--model", model_dir, "--dataset", caption_builder,
                                     "--recall-k", "6", "--no-progress"])
    assert code == 2 and "larger than the image gallery" in err
    res = json.loads(stdout)
    assert res["num_images"] == 5 and res["num_captions"] == 9
    texts = [c for v in caps.values() for c in v]
    t2i = np.array([i for i, v in enumerate(caps.values()) for _ in v])
    img = _unit(model.encode_image(model.preprocess(list(photos[k] for k in caps))))
    txt = _unit(model.encode_text(model.tokenize(texts)))
    s = txt @ img.T
    for k in (1, 2, 4):
        t2i_hit = (np.argsort(-s, 1, kind="stable")[:, :k] == t2i[:, None]).any(1).mean()
        top_txt = np.argsort(-s.T, 1, kind="stable")[:, :k]
        i2t_hit = (t2i[top_txt] == np.arange(5)[:, None]).any(1).mean()
        assert res["metrics"][f"image_retrieval_recall@{k}"] == pytest.approx(t2i_hit, abs=1e-6)
        assert res["metrics"][f"text_retrieval_recall@{k}"] == pytest.approx(i2t_hit, abs=1e-6)


@pytest.fixture(scope="module")
def photo_dirs(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("photos")
    a, b = root / "generated", root / "real"
    a.mkdir()
    b.mkdir()
    photos = _photos()
    for i, (name, im) in enumerate(photos.items()):
        Image.fromarray(im).save(a / f"{i}_{name}.png")
        Image.fromarray(im[::-1, ::2]).save(b / f"{name}.jpg")  # flipped, squeezed: another set
    return str(a), str(b), sorted(os.listdir(a))


def _folder_embeddings(model, folder, files):
    from PIL import Image

    images = [Image.open(os.path.join(folder, f)).convert("RGB") for f in files]
    return _unit(model.encode_image(model.preprocess(images)))


def test_score_clipscore_plain_and_jsonl(model_dir, model, photo_dirs, capsys, tmp_path):
    gen, _, files = photo_dirs
    caps = ["an astronaut", "a cat", "a cup of coffee", "a rocket", "a motorcycle"]
    plain = tmp_path / "caps.txt"
    plain.write_text("\n".join(caps) + "\n")
    code, stdout, _ = _run(capsys, ["score", "clipscore", "--model", model_dir, "--images", gen,
                                    "--captions", str(plain), "--no-progress"])
    assert code == 0
    res = json.loads(stdout)
    img = _folder_embeddings(model, gen, files)
    cand = _unit(model.encode_text(model.tokenize(["A photo depicts " + c for c in caps])))
    per = 2.5 * np.clip(np.sum(img * cand, 1), 0, None)  # Hessel's get_clip_score
    assert [r["image"] for r in res["per_image"]] == files
    np.testing.assert_allclose([r["clip_score"] for r in res["per_image"]], per, rtol=1e-5, atol=1e-6)
    assert res["clip_score"] == pytest.approx(per.mean(), rel=1e-5, abs=1e-6)
    raw = _unit(model.encode_text(model.tokenize(caps)))
    assert res["torchmetrics_clip_score"] == pytest.approx(max(100 * np.sum(img * raw, 1).mean(), 0), abs=1e-4)
    # JSON lines naming images in another order, with references -> RefCLIPScore
    refs = [["astronaut portrait", "a person"], ["a kitten"], ["coffee"], ["a launch"], ["a bike", "a vehicle"]]
    lines = [json.dumps({"image": f, "caption": c, "references": r}) for f, c, r in zip(files, caps, refs)][::-1]
    jl = tmp_path / "caps.jsonl"
    jl.write_text("\n".join(lines))
    code, stdout, _ = _run(capsys, ["score", "clipscore", "--model", model_dir, "--images", gen,
                                    "--captions", str(jl), "--no-progress"])
    assert code == 0
    res = json.loads(stdout)
    by_image = {r["image"]: r for r in res["per_image"]}
    for i, f in enumerate(files):
        r = _unit(model.encode_text(model.tokenize(["A photo depicts " + x for x in refs[i]])))
        b = np.max(cand[i] @ r.T)
        want = 2 * per[i] * b / (per[i] + b)
        assert by_image[f]["clip_score"] == pytest.approx(per[i], rel=1e-5, abs=1e-6)
        assert by_image[f]["ref_clip_score"] == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_score_cmmd_and_vendi(model_dir, model, photo_dirs, capsys, tmp_path):
    from vendi_score import vendi

    gen, real, files = photo_dirs
    out = tmp_path / "cmmd.json"
    code, stdout, _ = _run(capsys, ["score", "cmmd", "--model", model_dir, "--images", gen,
                                    "--reference-images", real, "--out", str(out), "--no-progress"])
    assert code == 0
    res = json.loads(out.read_text())
    x = _folder_embeddings(model, gen, files)
    y = _folder_embeddings(model, real, sorted(os.listdir(real)))
    k = lambda a, b: np.exp(-np.sum((a[:, None] - b[None]) ** 2, -1) / 200.0)  # noqa: E731  (sigma 10)
    want = 1000 * (k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean())
    assert res["cmmd"] == pytest.approx(want, rel=1e-4, abs=1e-6)
    caps = tmp_path / "c.txt"
    caps.write_text("a cat\na dog\na cat sitting\nthe moon\n")
    code, stdout, _ = _run(capsys, ["score", "vendi", "--model", model_dir, "--images", gen, "--captions", str(caps),
                                    "--q", "1,inf", "--no-progress"])
    assert code == 0
    res = json.loads(stdout)
    t = _unit(model.encode_text(model.tokenize(["a cat", "a dog", "a cat sitting", "the moon"])))
    for name, emb in (("images", x), ("captions", t)):
        for q in (1, "inf"):
            assert res[name]["vendi"][f"q={float(q) if q != 'inf' else q}"] == pytest.approx(
                vendi.score_dual(emb, q=q), rel=1e-5)


def test_cli_bad_input(model_dir, photo_dirs, capsys, tmp_path):
    gen, _, _ = photo_dirs
    caps = tmp_path / "caps.txt"
    caps.write_text("one\ntwo\n")
    code, _, err = _run(capsys, ["score", "clipscore", "--model", model_dir, "--images", gen, "--captions", str(caps)])
    assert code == 2 and "2 captions for 5 images" in err
    code, _, err = _run(capsys, ["score", "cmmd", "--model", model_dir, "--images", gen,
                                 "--reference-images", str(tmp_path / "missing")])
    assert code == 2 and "does not exist" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"caption": "x"}\n{oops\n')
    code, _, err = _run(capsys, ["score", "vendi", "--model", model_dir, "--captions", str(bad)])
    assert code == 2 and "bad.jsonl:2: not valid JSON" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    code, _, err = _run(capsys, ["score", "vendi", "--model", model_dir, "--captions", str(empty)])
    assert code == 2 and "is empty" in err
    code, _, err = _run(capsys, ["score", "vendi", "--model", model_dir])
    assert code == 2 and "--images FOLDER and/or --captions FILE" in err
