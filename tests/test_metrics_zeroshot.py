"""Zero-shot classifier, top-k accuracy and balanced accuracy against CLIP_benchmark and scikit-learn.

Tolerances: classifier weights and logits are float32 on both sides from the same
embeddings, so they agree to 1e-5 (absolute; values are O(1) for weights, O(100)
for logits: rtol 1e-5 there). Accuracies are ratios of integer counts and must be
equal (to float32 resolution, 1e-6). The shipped templates and class names must equal
clip_benchmark's JSON files and open_clip's ImageNet lists exactly.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clipjax import metrics
from clipjax.metrics import templates as tpl


def _setup(n_classes=7, n_templates=4, d=16, n=200, seed=0):
    rng = np.random.default_rng(seed)
    class_dirs = rng.normal(size=(n_classes, d))
    text = class_dirs[:, None, :] + 0.8 * rng.normal(size=(n_classes, n_templates, d))
    labels = rng.integers(0, n_classes, n)
    img = class_dirs[labels] + 2.0 * rng.normal(size=(n, d))
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    return text.astype(np.float32), img.astype(np.float32), labels


@pytest.fixture
def zc(monkeypatch):
    """CLIP_benchmark's zeroshot_classification module, made to run on numpy >= 2.4.

    Its `accuracy` calls `float()` on a 1-element 1-D array, which numpy 2.4 rejects; a
    module-level `float` that first reshapes to a scalar keeps its algorithm unchanged.
    """
    import builtins

    from clip_benchmark.metrics import zeroshot_classification

    monkeypatch.setattr(zeroshot_classification, "float",
                        lambda v: builtins.float(np.asarray(v).reshape(())), raising=False)
    return zeroshot_classification


class _FakeModel:
    """A 'CLIP' for CLIP_benchmark whose towers look embeddings up by index."""

    def __init__(self, text_table, image_table):
        import torch

        self.text_table = torch.from_numpy(text_table)
        self.image_table = torch.from_numpy(image_table)

    def encode_text(self, idx):
        return self.text_table[idx]

    def encode_image(self, idx):
        return self.image_table[idx]


@pytest.mark.parity
def test_classifier_and_metrics_match_clip_benchmark_evaluate(zc):
    import torch

    text, img, labels = _setup()
    names = [f"class{i}" for i in range(text.shape[0])]
    temps = ["a photo of a {c}.", "a {c}.", "art of the {c}.", "a close-up {c}."]
    prompts = metrics.build_prompts(names, temps)
    flat = [p for per in prompts for p in per]
    index = {p: i for i, p in enumerate(flat)}
    model = _FakeModel(text.reshape(-1, text.shape[-1]), img)

    def tokenizer(texts):
        return torch.tensor([index[t] for t in texts])

    ref_w = zc.zero_shot_classifier(model, tokenizer, names, temps, "cpu", amp=False).numpy()  # [D, C]
    w = metrics.classifier_weights(text)
    np.testing.assert_allclose(np.asarray(w), ref_w, atol=1e-5)

    # the same classifier from an encoder function
    table = text.reshape(-1, text.shape[-1])
    w_fn = metrics.zeroshot_classifier(lambda s: table[[index[t] for t in s]], names, temps, batch_size=5)
    np.testing.assert_allclose(np.asarray(w_fn), ref_w, atol=1e-5)

    class _Loader(list):
        pass

    loader = _Loader((torch.arange(i, min(i + 64, len(labels))), torch.from_numpy(labels[i:i + 64]))
                     for i in range(0, len(labels), 64))
    loader.dataset = type("DS", (), {"classes": names})()
    ref = zc.evaluate(model, loader, tokenizer, names, temps, "cpu", amp=False)
    ours = metrics.zeroshot_metrics(img, labels, w)
    for key in ("acc1", "acc5", "mean_per_class_recall"):
        assert abs(float(ours[key]) - ref[key]) < 1e-6, key
    assert 0.2 < ref["acc1"] < 0.95  # a non-trivial operating point, so the comparison can fail


@pytest.mark.parity
def test_topk_accuracy_matches_clip_benchmark_accuracy_and_sklearn(zc):
    import torch
    from sklearn.metrics import balanced_accuracy_score, top_k_accuracy_score

    rng = np.random.default_rng(1)
    logits = rng.normal(size=(300, 12)).astype(np.float32)
    labels = rng.integers(0, 12, 300)
    labels[:5] = 3  # class 11 may be absent: sklearn leaves absent classes out
    ref = zc.accuracy(torch.from_numpy(logits), torch.from_numpy(labels), topk=(1, 3, 5))
    ours = metrics.topk_accuracy(logits, labels, (1, 3, 5))
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-6)
    for k in (1, 3, 5):
        want = top_k_accuracy_score(labels, logits, k=k, labels=np.arange(12))
        assert abs(want - float(ours[(1, 3, 5).index(k)])) < 1e-6
    bal = balanced_accuracy_score(labels, logits.argmax(1))
    assert abs(float(metrics.mean_per_class_recall(logits, labels)) - bal) < 1e-6
    assert abs(float(metrics.mean_per_class_recall(logits.argmax(1), labels, 12)) - bal) < 1e-6


def test_balanced_accuracy_skips_absent_classes():
    from sklearn.metrics import balanced_accuracy_score

    labels = np.array([0, 0, 1, 1, 1, 4])
    pred = np.array([0, 2, 1, 1, 3, 4])  # classes 2, 3 only predicted, never true
    ours = float(metrics.mean_per_class_recall(pred, labels, num_classes=6))
    with pytest.warns(UserWarning):
        ref = balanced_accuracy_score(labels, pred)
    assert abs(ours - ref) < 1e-6


def test_ties_rank_lower_class_first():
    logits = np.array([[1.0, 2.0, 2.0, 0.0], [3.0, 3.0, 3.0, 3.0]], np.float32)
    labels = np.array([2, 3])
    # stable descending order: row 0 -> [1, 2, 0, 3]; row 1 -> [0, 1, 2, 3]
    np.testing.assert_array_equal(np.asarray(metrics.true_class_rank(logits, labels)), [1, 3])
    np.testing.assert_allclose(np.asarray(metrics.topk_accuracy(logits, labels, (1, 2, 4))), [0.0, 0.5, 1.0])


def test_jit_and_mask_for_class_specific_prompts():
    text, img, labels = _setup(n_classes=3, n_templates=3)
    mask = np.array([[True, True, False], [True, False, False], [True, True, True]])
    expect = []
    for c in range(3):
        e = text[c][mask[c]]
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
        m = e.mean(0)
        expect.append(m / np.linalg.norm(m))
    w = jax.jit(metrics.classifier_weights)(text, mask)
    np.testing.assert_allclose(np.asarray(w), np.stack(expect, 1), atol=1e-6)
    logits = jax.jit(metrics.zeroshot_logits)(img, w)
    np.testing.assert_allclose(np.asarray(logits), 100 * img @ np.stack(expect, 1), rtol=1e-5, atol=1e-4)
    acc = jax.jit(lambda lg, y: metrics.topk_accuracy(lg, y, (1, 2)))(logits, labels)
    np.testing.assert_allclose(np.asarray(acc), np.asarray(metrics.topk_accuracy(logits, labels, (1, 2))))


def _clip_benchmark_json(name):
    """A data file of the installed clip_benchmark package (`clip_benchmark/datasets/<name>`)."""
    import json
    from importlib import resources

    with resources.files("clip_benchmark").joinpath("datasets", name).open("r", encoding="utf-8") as f:
        return json.load(f)


@pytest.mark.parity
def test_shipped_templates_and_classnames_equal_the_references():
    """Every data set's templates and class names equal clip_benchmark's `en_zeroshot_classification_templates.json`
    / `en_classnames.json` exactly (same keys, same lists in the same order); the ImageNet entries also equal
    open_clip's `OPENAI_IMAGENET_TEMPLATES` (callables, rendered with `t("{c}")`) and `IMAGENET_CLASSNAMES`."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    ref_templates = _clip_benchmark_json("en_zeroshot_classification_templates.json")
    ref_names = _clip_benchmark_json("en_classnames.json")
    assert metrics.template_datasets() == sorted(ref_templates)
    assert metrics.classname_datasets() == sorted(ref_names)
    for key, want in ref_templates.items():
        assert metrics.get_templates(key) == want, key
    for key, want in ref_names.items():
        assert metrics.get_classnames(key) == want, key
    openai = [t("{c}") for t in OPENAI_IMAGENET_TEMPLATES]
    assert len(openai) == 80
    assert metrics.openai_imagenet_templates() == openai == metrics.get_templates("imagenet2012")
    assert metrics.get_classnames("imagenet2012") == list(IMAGENET_CLASSNAMES)


def test_templates_and_prompts():
    assert (metrics.build_prompts(["cat", "dog"], ["a {c}.", "the {c}"])
            == [["a cat.", "the cat"], ["a dog.", "the dog"]])
    assert metrics.build_prompts(["cat"], {"cat": ["meow"]}) == [["meow"]]
    assert tpl.canonical_name("Imagenet2012:5.1.0") == "imagenet1k"
    with pytest.raises(KeyError, match="available"):
        metrics.get_templates("no_such_dataset")
    with pytest.raises(KeyError, match="curated class names"):
        metrics.get_classnames("cifar10")
    with pytest.raises(ValueError, match="placeholder"):
        metrics.build_prompts(["cat"], ["a photo"])
    with pytest.raises(ValueError, match="missing"):
        metrics.build_prompts(["cat", "dog"], {"cat": ["x"]})
    with pytest.raises(ValueError, match="no class names"):
        metrics.build_prompts([], ["{c}"])


def test_bad_input_errors():
    text, img, labels = _setup()
    w = metrics.classifier_weights(text)
    with pytest.raises(ValueError, match="rank 3"):
        metrics.classifier_weights(text[0])
    bad = text.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        metrics.classifier_weights(bad)
    with pytest.raises(ValueError, match="L2-normalised"):
        metrics.zeroshot_logits(img * 3, w)
    np.testing.assert_allclose(np.asarray(metrics.zeroshot_logits(img * 3, w, normalize=True)),
                               np.asarray(metrics.zeroshot_logits(img, w)), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match=r"\[D, C\]"):
        metrics.zeroshot_logits(img, w.T)
    logits = metrics.zeroshot_logits(img, w)
    with pytest.raises(ValueError, match="larger than the number of classes"):
        metrics.topk_accuracy(logits, labels, (1, 8))
    with pytest.raises(ValueError, match="length"):
        metrics.topk_accuracy(logits, labels[:-1])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 7\)"):
        metrics.topk_accuracy(logits, labels + 7)
    with pytest.raises(TypeError, match="integer"):
        metrics.topk_accuracy(logits, labels.astype(np.float32))
    with pytest.raises(ValueError, match="empty"):
        metrics.zeroshot_logits(img[:0], w)
    with pytest.raises(ValueError, match="num_classes is required"):
        metrics.mean_per_class_recall(labels, labels)
    with pytest.raises(ValueError, match="mask row is all False"):
        metrics.classifier_weights(text, np.zeros(text.shape[:2], bool))
    assert np.isnan(float(metrics.zeroshot_metrics(img, labels % 3, w[:, :3])["acc5"]))  # C < 5, as CLIP_benchmark
    assert jnp.issubdtype(w.dtype, jnp.floating)
