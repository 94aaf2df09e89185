"""`clipjax robust eval` end to end, in-process, on a tiny random-init checkpoint and a folder of real photos.

The model: `helpers.tiny_checkpoint` (ViT, 32 px, patch 16, width 32, 1 layer, embed 16); the inputs: 10
scikit-image photos written as PNG files (so the CLI's batches of 8 on the 8 fake devices are one sharded
batch and one short, unsharded one), a classes file (4 names) and a labels file. The labels are the
oracle classifier's clean predictions for 8 photos and a wrong class for 2, so the clean accuracy is
known (0.8) and the attacks have correctly classified points to break.

Oracle, built without the CLI: the checkpoint loaded on one device; the class weights from
`clipjax.metrics.zeroshot_classifier` over `model.encode_text` with the same names and the reference templates
read from the installed clip_benchmark package (its `imagenet1k` entry, OpenAI's 80 ImageNet templates, by default;
its `cifar10` entry for `--templates cifar10` in the attack case); the [0, 1] pixels from
`clipjax.preprocess.resize_and_crop` / 255 (checked against `model.preprocess` after mean/std to 1e-6);
then `clipjax.robust.robust_accuracy` called directly on each batch of 8 with the key the CLI documents,
`fold_in(key(seed), b)`. For a protocol (tecoa: PGD-5, APGD-CE, APGD-DLR) and a single attack (PGD-CW,
3 steps, alpha 1/255), each at two eps values, the JSON's clean / robust accuracies, per-attack
accuracies and AutoAttack numbers must equal the oracle's (to 1e-12; they are counts / N), and the
attack settings must be the protocol's. Errors: bad eps, unknown protocol / attack, both or neither,
attack settings with a protocol or the wrong attack, wrong label count / range / syntax, empty folder,
bad classes file, mixed sources, bad limit, unknown templates and unknown model each exit 2 with a
one-line `clipjax robust: error: ...`.
"""

import json

import jax
import numpy as np
import pytest

from clipjax.cli import main

PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "coins", "moon", "motorcycle", "rocket", "hubble_deep_field",
          "page")
CLASSES = ["astronaut", "cat", "cup of coffee", "rocket"]
BATCH = 8  # --batch-size: a multiple of the 8 fake devices, so the CLI keeps it


@pytest.fixture(scope="module")
def pixels(model, tmp_path_factory):
    """The photo folder and the oracle's `[10, 32, 32, 3]` pixels in [0, 1] (sorted file order)."""
    from PIL import Image
    from skimage import color, data, transform

    from clipjax.preprocess import resize_and_crop

    folder = tmp_path_factory.mktemp("inputs") / "images"
    folder.mkdir()
    for name in PHOTOS:
        im = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
        if im.ndim == 2:
            im = color.gray2rgb(im)
        im = transform.resize(im[..., :3], (48, 64), anti_aliasing=True, preserve_range=True).astype(np.uint8)
        Image.fromarray(im).save(folder / f"{name}.png")
    pp, size = model.config.preprocess, model.config.vision.image_size
    images = [Image.open(folder / f"{n}.png") for n in sorted(PHOTOS)]
    x = np.stack([resize_and_crop(im, size, pp.resize_mode, pp.interpolation) for im in images]) / 255.0
    x = x.astype(np.float32)
    normalised = (x - np.asarray(pp.mean, np.float32)) / np.asarray(pp.std, np.float32)
    np.testing.assert_allclose(normalised, model.preprocess(images), atol=1e-6)
    return folder, x


def _reference_templates(dataset):
    """CLIP_benchmark's templates for `dataset` from the installed clip_benchmark package (its `imagenet1k` entry is
    OpenAI's 80 ImageNet templates; `test_metrics_zeroshot.py` checks clipjax's asset and open_clip against it)."""
    from importlib import resources

    name = "en_zeroshot_classification_templates.json"
    with resources.files("clip_benchmark").joinpath("datasets", name).open("r", encoding="utf-8") as f:
        return json.load(f)[dataset]


def _weights(model, templates):
    from clipjax.metrics import zeroshot_classifier

    return zeroshot_classifier(lambda s: model.encode_text(model.tokenize(s)), CLASSES, templates).T  # [C, E]


@pytest.fixture(scope="module")
def files(model, pixels):
    """Classes and labels files: the clean predictions (80-template classifier) for 8 photos, wrong for 2."""
    from clipjax.robust import zero_shot_logits_fn

    folder, x = pixels
    logits_fn = zero_shot_logits_fn(model.params, model.config, _weights(model, _reference_templates("imagenet1k")))
    pred = np.asarray(jax.numpy.argmax(logits_fn(x), axis=1))
    labels = pred.copy()
    labels[[2, 7]] = (pred[[2, 7]] + 1) % len(CLASSES)
    root = folder.parent
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    (root / "labels.txt").write_text("\n".join(map(str, labels)) + "\n")
    return {"--images": str(folder), "--labels": str(root / "labels.txt"), "--classes": str(root / "classes.txt"),
            "labels": labels}


def _run(capsys, argv):
    code = main(argv)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _oracle(model, x, labels, weights, eps, seed, **method):
    """`robust_accuracy` on each batch of BATCH with key fold_in(key(seed), b), pooled over the examples."""
    from clipjax.robust import robust_accuracy, zero_shot_logits_fn

    logits_fn = zero_shot_logits_fn(model.params, model.config, weights)
    key = jax.random.key(seed)
    clean, robust, attack, after, sizes = [], [], [], [], []
    for b, start in enumerate(range(0, len(x), BATCH)):
        xb, yb = x[start:start + BATCH], labels[start:start + BATCH]
        r = robust_accuracy(logits_fn, xb, yb, jax.random.fold_in(key, b), eps=eps, batch_size=len(xb), **method)
        clean.append(r["clean_correct"])
        robust.append(r["robust"])
        attack.append(r["attack_accuracy"])
        after.append(r["robust_after"])
        sizes.append(len(xb))

    def pooled(rows):
        return {k: sum(row[k] * m for row, m in zip(rows, sizes)) / len(x) for k in rows[0]}

    return {"clean_accuracy": np.concatenate(clean).mean(), "robust_accuracy": np.concatenate(robust).mean(),
            "attack_accuracy": pooled(attack), "robust_after": pooled(after)}


def _check_result(got, want, eps):
    assert got["eps"] == pytest.approx(eps, abs=1e-15)
    for k in ("clean_accuracy", "robust_accuracy"):
        assert got[k] == pytest.approx(float(want[k]), abs=1e-12), (eps, k)
    for k in ("attack_accuracy", "robust_after"):
        assert set(got[k]) == set(want[k]), (eps, k)
        for name in want[k]:
            assert got[k][name] == pytest.approx(want[k][name], abs=1e-12), (eps, k, name)
    after = list(want["robust_after"].values())
    assert got["autoattack_accuracy"] == (pytest.approx(after[-1], abs=1e-12) if after else None)


def test_protocol_matches_robust_accuracy(model, model_dir, pixels, files, tmp_path, capsys):
    from clipjax.robust import PROTOCOLS

    _, x = pixels
    out = tmp_path / "res" / "tecoa.json"
    code, stdout, err = _run(capsys, [
        "robust", "eval", "--model", model_dir, "--images", files["--images"], "--labels", files["--labels"],
        "--classes", files["--classes"], "--protocol", "tecoa", "--eps", "1/255, 0.0157", "--batch-size", str(BATCH),
        "--seed", "3", "--out", str(out), "--no-progress"])
    assert code == 0, err
    result = json.loads(stdout)
    assert json.loads(out.read_text()) == result
    assert result["num_examples"] == 10 and result["num_classes"] == 4 and result["num_templates"] == 80
    assert result["protocol"] == "tecoa" and result["attack"] is None
    want_attacks = [{"name": name, **settings} for name, settings in PROTOCOLS["tecoa"]["attacks"]]
    for row in want_attacks:
        row.pop("alpha", None)
    assert result["settings"]["attacks"] == want_attacks
    weights = _weights(model, _reference_templates("imagenet1k"))
    for got, eps in zip(result["results"], (1 / 255, 0.0157)):
        want = _oracle(model, x, files["labels"], weights, eps, 3, protocol="tecoa")
        _check_result(got, want, eps)
        assert got["clean_accuracy"] == pytest.approx(0.8)
        assert got["alphas"] == {"pgd": pytest.approx(1 / 255)}
        after = list(got["robust_after"].values())
        assert after == sorted(after, reverse=True) and got["robust_accuracy"] <= after[-1]
    strong = result["results"][1]
    assert strong["robust_accuracy"] < strong["clean_accuracy"]  # the attacks break some correct points


def test_attack_matches_robust_accuracy(model, model_dir, pixels, files, capsys):
    _, x = pixels
    code, stdout, err = _run(capsys, [
        "robust", "eval", "--model", model_dir, "--images", files["--images"], "--labels", files["--labels"],
        "--classes", files["--classes"], "--templates", "cifar10", "--attack", "pgd-cw", "--eps", "2/255,8/255",
        "--steps", "3", "--alpha", "1/255", "--limit", "9", "--batch-size", "5", "--no-progress"])
    assert code == 0, err
    result = json.loads(stdout)
    assert result["num_examples"] == 9 and result["attack"] == "pgd-cw" and result["protocol"] is None
    assert result["num_templates"] == len(_reference_templates("cifar10"))
    assert result["settings"]["attacks"] == [{"name": "pgd-cw", "steps": 3}]
    assert result["settings"]["batch_size"] == BATCH  # 5 rounded up to the 8 devices
    weights = _weights(model, _reference_templates("cifar10"))
    for got, eps in zip(result["results"], (2 / 255, 8 / 255)):
        want = _oracle(model, x[:9], files["labels"][:9], weights, eps, 0, attack="pgd-cw", steps=3, alpha=1 / 255)
        _check_result(got, want, eps)
        assert got["alphas"] == {"pgd-cw": pytest.approx(1 / 255)}
        assert got["robust_after"] == {} and got["autoattack_accuracy"] is None
        assert got["robust_accuracy"] <= got["attack_accuracy"]["pgd-cw"] <= 1


@pytest.mark.parametrize("case,message", [
    ("eps above 1", "--eps must lie in [0, 1]"),
    ("negative eps", "--eps must lie in [0, 1]"),
    ("eps not a number", "--eps: 'abc' is not a number or a fraction like 4/255"),
    ("unknown protocol", "unknown --protocol 'madry'; expected one of"),
    ("unknown attack", "unknown --attack 'fgsm'; expected one of"),
    ("protocol and attack", "give --protocol or --attack, not both"),
    ("no method", "give --protocol (tecoa, ttc, pmg-aft, fare) or --attack"),
    ("steps with protocol", "--steps cannot be used with --protocol tecoa"),
    ("attack without eps", "--eps is required with --attack pgd"),
    ("zero steps", "--steps must be a positive integer"),
    ("alpha with apgd", "--alpha applies to --attack pgd / pgd-cw only"),
    ("restarts with pgd", "--restarts applies to the APGD attacks only"),
    ("too few labels", "--labels has 9 labels for the 10 images"),
    ("label out of range", "labels.txt:4: label 4 is outside [0, 4)"),
    ("label not an integer", "labels.txt:2: 'cat' is not an integer class index"),
    ("empty folder", "no images"),
    ("empty classes", "--classes file"),
    ("dataset and folder", "give --dataset or --images/--labels/--classes, not both"),
    ("folder without labels", "--images, --labels and --classes go together"),
    ("zero limit", "--limit must be a positive number"),
    ("unknown templates", "no zero-shot templates for 'nope'"),
    ("unknown model", "nowhere: no such file or folder"),
])
def test_errors(model_dir, files, tmp_path, capsys, case, message):
    labels = [str(v) for v in files["labels"]]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty.txt").write_text("\n")
    args = {"--model": model_dir, "--images": files["--images"], "--labels": files["--labels"],
            "--classes": files["--classes"], "--attack": "pgd", "--eps": "1/255"}
    edits = {
        "eps above 1": {"--eps": "1/255,1.5"}, "negative eps": {"--eps": "-0.01"}, "eps not a number": {"--eps": "abc"},
        "unknown protocol": {"--attack": None, "--protocol": "madry"}, "unknown attack": {"--attack": "fgsm"},
        "protocol and attack": {"--protocol": "tecoa"}, "no method": {"--attack": None},
        "steps with protocol": {"--attack": None, "--protocol": "tecoa", "--steps": "3"},
        "attack without eps": {"--eps": None}, "zero steps": {"--steps": "0"},
        "alpha with apgd": {"--attack": "apgd-ce", "--alpha": "1/255"}, "restarts with pgd": {"--restarts": "2"},
        "empty folder": {"--images": str(tmp_path / "empty")},
        "empty classes": {"--classes": str(tmp_path / "empty.txt")},
        "dataset and folder": {"--dataset": "cifar10"}, "folder without labels": {"--labels": None},
        "zero limit": {"--limit": "0"}, "unknown templates": {"--templates": "nope"},
        "unknown model": {"--model": str(tmp_path / "nowhere")},
    }
    lines = {"too few labels": labels[:9], "label out of range": labels[:3] + ["4"] + labels[4:],
             "label not an integer": labels[:1] + ["cat"] + labels[2:]}
    if case in lines:
        (tmp_path / "labels.txt").write_text("\n".join(lines[case]) + "\n")
        args["--labels"] = str(tmp_path / "labels.txt")
    for flag, value in edits.get(case, {}).items():
        if value is None:
            args.pop(flag)
        else:
            args[flag] = value
    code, stdout, err = _run(capsys, ["robust", "eval", "--no-progress"] + [t for kv in args.items() for t in kv])
    assert code == 2 and stdout == ""
    assert err.startswith("clipjax robust: error:") and err.count("\n") == 1 and message in err, err


def test_tfds_dataset_form_on_mock_data(model_dir, capsys):
    """The `--dataset` form reads a tfds split (tensorflow-datasets' mock data: random images and labels), with
    cifar10's class names and templates as `clipjax eval zeroshot` uses them."""
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=11):
        code, stdout, err = _run(capsys, ["robust", "eval", "--model", model_dir, "--dataset", "cifar10",
                                          "--attack", "pgd", "--eps", "0,8/255", "--steps", "2", "--limit", "10",
                                          "--batch-size", "8", "--no-progress"])
    assert code == 0, err
    res = json.loads(stdout)
    assert res["num_examples"] == 10 and res["num_classes"] == 10 and res["dataset"] == "cifar10"
    zero, eight = res["results"]
    assert zero["robust_accuracy"] == zero["clean_accuracy"]  # eps 0 changes no pixel
    assert eight["robust_accuracy"] <= eight["clean_accuracy"] == zero["clean_accuracy"]
