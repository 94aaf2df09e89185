"""`clipjax ood` end to end with a tiny random-init checkpoint on real photos (scikit-image).

Each score in the JSON is checked against an independent computation: the checkpoint loaded
unsharded, embeddings from `model.encode_image` / `encode_dense` / `encode_text` on one device,
the scores from float64 numpy formulas (MCM, GL-MCM, energy, max-logit, MSP, NegLabel mining
with `np.quantile` and grouping), and AUROC/FPR from scikit-learn. AdaNeg is checked for wiring
(same stream order and negatives through `clipjax.ood.adaneg_scores`; its math is tested against
the reference in test_ood_adaneg.py). Tolerances: the raw score arrays (captured from the CLI)
rtol 1e-5 / atol 1e-7 (the CLI encodes on 8 sharded devices in padded batches, the oracle on one
device); AUROC and FPR must be equal (the orderings of 4 + 4 distinct scores do not move under
1e-6 perturbations), FPR "nearest" against `test_ood_metrics.ref_nearest`.
"""

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

import clipjax
from clipjax.cli import main

ID_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
OOD_PHOTOS = ("camera", "moon", "coins", "motorcycle")
CLASSES = ["person", "cat", "cup", "rocket"]
WORDS = ["table", "river", "cloud", "engine", "garden", "violin", "pencil", "mountain", "bottle", "ladder",
         "window", "carpet", "tunnel", "feather", "anchor", "candle", "wheel", "basket", "bridge", "kettle"]
ADJS = ["red", "quiet", "ancient", "smooth", "bright", "heavy", "narrow", "golden"]


def _photo(name):
    from skimage import color, data, transform

    im = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    if im.ndim == 2:
        im = (color.gray2rgb(im)).astype(np.uint8)
    return transform.resize(im, (48, 48), anti_aliasing=True, preserve_range=True).astype(np.uint8)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("photos")
    for sub, names in (("id", ID_PHOTOS), ("ood", OOD_PHOTOS)):
        (root / sub).mkdir()
        for n in names:
            Image.fromarray(_photo(n)).save(root / sub / f"{n}.png")
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n", encoding="utf-8")
    (root / "words.txt").write_text("\n".join(WORDS + [f"{a}\tadj" for a in ADJS]) + "\n", encoding="utf-8")
    return root


def _run(capsys, argv):
    code = main(argv)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _fprs(s_in, s_out, level=0.95):
    conf = np.r_[s_in, s_out].astype(np.float64)
    is_id = np.r_[np.ones(len(s_in)), np.zeros(len(s_out))]
    fpr, tpr, _ = roc_curve(1 - is_id, -conf)
    openood = fpr[np.argmax(tpr >= level)]
    fpr, tpr, _ = roc_curve(is_id, conf)
    interpolated = float(np.interp(level, tpr, fpr))
    return openood, interpolated


def test_ood_folders_every_score(model_dir, folders, capsys, monkeypatch):
    """The raw [ID; OOD] score arrays the CLI computes (captured from `clipjax.cli.ood._scores`) equal the float64
    oracle's at rtol 1e-5 (atol 1e-7: the CLI embeds on 8 sharded devices in padded batches); the JSON's AUROC
    and FPR@95 under the three conventions equal scikit-learn's / OpenOOD's / CLIPN's and, for "nearest",
    `test_ood_metrics.ref_nearest` (Hendrycks' `fpr_and_fdr_at_recall`), computed from the oracle scores."""
    from PIL import Image
    from test_ood_metrics import ref_nearest

    import clipjax.cli.ood as ood_cli
    import clipjax.ood as ood

    captured = {}
    cli_scores = ood_cli._scores

    def recording_scores(name, args, ctx):
        s, params = cli_scores(name, args, ctx)
        captured[name] = np.array(s, np.float64)
        return s, params

    monkeypatch.setattr(ood_cli, "_scores", recording_scores)
    out = folders / "res.json"
    code, stdout, err = _run(capsys, [
        "ood", "--model", model_dir, "--id-classes", str(folders / "classes.txt"),
        "--id-images", str(folders / "id"), "--ood-images", str(folders / "ood"),
        "--score", "mcm,glmcm,energy,maxlogit,msp,neglabel,adaneg", "--wordlist", str(folders / "words.txt"),
        "--neg-fraction", "0.5", "--groups", "2", "--batch-size", "3", "--out", str(out), "--no-progress"])
    assert code == 0, err
    result = json.loads(stdout)
    assert json.loads(out.read_text()) == result
    assert result["id"]["num_images"] == 4 and result["ood"]["num_images"] == 4 and result["num_classes"] == 4
    assert result["negative_labels"]["candidates"] == len(WORDS) + len(ADJS)
    assert result["negative_labels"]["negatives"] == int(len(WORDS) * 0.5) + int(len(ADJS) * 0.5)

    model = clipjax.load(model_dir)

    def images(names, sub):
        return model.preprocess([Image.open(folders / sub / f"{n}.png").convert("RGB") for n in sorted(names)])

    pix = np.concatenate([images(ID_PHOTOS, "id"), images(OOD_PHOTOS, "ood")])
    x = _unit(model.encode_image(pix))
    local = _unit(model.encode_dense(pix))
    text = _unit(model.encode_text(model.tokenize([f"a photo of a {c}" for c in CLASSES])))
    cos = x @ text.T
    nice = _unit(model.encode_text(model.tokenize([f"the nice {c}" for c in CLASSES])))
    nouns = _unit(model.encode_text(model.tokenize([f"the nice {w}" for w in WORDS])))
    adjs = _unit(model.encode_text(model.tokenize([f"This is a {a} photo" for a in ADJS])))
    sim_n = np.quantile(nouns @ nice.T, 0.95, axis=-1)
    sim_a = np.quantile(adjs @ nice.T, 0.95, axis=-1)
    neg = np.concatenate([nouns[np.argsort(sim_n, kind="stable")[:10]], adjs[np.argsort(sim_a, kind="stable")[:4]]])
    perm = np.asarray(ood.group_permutation(len(neg), 2, 0))
    pos_l, neg_l = 100 * x @ nice.T, (100 * x @ neg.T)[:, perm].reshape(len(x), 2, -1)
    neglabel = np.mean([_softmax(np.concatenate([pos_l, neg_l[:, g]], -1))[:, :4].sum(-1) for g in range(2)], 0)
    order = np.random.default_rng(0).permutation(len(x))
    ada = np.empty(len(x))
    ada[order] = np.asarray(ood.adaneg_scores(x[order].astype(np.float32), nice.astype(np.float32),
                                              neg.astype(np.float32), num_groups=2, seed=0).score)
    want = {
        "mcm": _softmax(cos).max(-1),
        "glmcm": _softmax(cos).max(-1) + 0.5 * _softmax(local @ text.T).max(-1).max(-1),
        "energy": np.log(np.exp(cos).sum(-1)),
        "maxlogit": cos.max(-1),
        "msp": _softmax(model.logit_scale * cos).max(-1),
        "neglabel": neglabel,
        "adaneg": ada,
    }
    assert set(captured) == set(want)
    for name, s in want.items():
        np.testing.assert_allclose(captured[name], s, rtol=1e-5, atol=1e-7, err_msg=name)
        got = result["scores"][name]
        auc = roc_auc_score(np.r_[np.ones(4), np.zeros(4)], s)
        assert got["auroc"] == pytest.approx(auc, abs=1e-6), name
        openood, interpolated = _fprs(s[:4], s[4:])
        assert got["fpr"]["openood"] == pytest.approx(openood, abs=1e-6), name
        assert got["fpr"]["interpolated"] == pytest.approx(interpolated, abs=1e-6), name
        assert got["fpr"]["nearest"] == pytest.approx(ref_nearest(s[:4], s[4:], 0.95), abs=1e-6), name
        assert set(got["fpr"]) == {"openood", "nearest", "interpolated"}


def test_ood_tfds_splits_match_folders(model_dir, folders, capsys):
    import tensorflow_datasets as tfds

    photos = {"test": [_photo(n) for n in sorted(ID_PHOTOS)], "train": [_photo(n) for n in sorted(OOD_PHOTOS)]}

    def source(builder, split, **kw):
        return [{"image": im, "label": np.int64(0)} for im in photos[split]]

    with tfds.testing.mock_data(as_data_source_fn=source):
        code, stdout, err = _run(capsys, [
            "ood", "--model", model_dir, "--id-classes", ",".join(CLASSES), "--id-dataset", "cifar10",
            "--id-split", "test", "--ood-dataset", "cifar10", "--ood-split", "train", "--score", "mcm,energy",
            "--no-progress"])
    assert code == 0, err
    tf_result = json.loads(stdout)
    code, stdout, err = _run(capsys, [
        "ood", "--model", model_dir, "--id-classes", ",".join(CLASSES), "--id-images", str(folders / "id"),
        "--ood-images", str(folders / "ood"), "--score", "mcm,energy", "--no-progress"])
    assert code == 0, err
    folder_result = json.loads(stdout)
    # PNG round trip is lossless, so both inputs give the same images and metrics
    assert tf_result["scores"] == folder_result["scores"]
    assert tf_result["id"] == {"dataset": "cifar10", "split": "test", "num_images": 4}


@pytest.mark.parametrize("extra,message", [
    (["--id-classes", "cat,dog,Cat"], "duplicate ID class names"),
    (["--id-classes", " , "], "blank"),
    (["--id-classes", "missing/classes.txt"], "does not exist"),
    (["--score", "mcm,odin"], "unknown --score"),
    (["--template", "a photo"], "--template must contain"),
    (["--ood-images", "/nonexistent/folder"], "does not exist"),
    (["--ood-images", None], "exactly one of --ood-images"),
    (["--tpr", "1.5"], "--tpr"),
])
def test_ood_cli_bad_input(model_dir, folders, capsys, extra, message):
    argv = {"--model": model_dir, "--id-classes": "cat,dog", "--id-images": str(folders / "id"),
            "--ood-images": str(folders / "ood"), "--score": "mcm"}
    for flag, value in zip(extra[::2], extra[1::2]):
        argv[flag] = value
    args = ["ood", "--no-progress"] + [t for k, v in argv.items() if v is not None for t in (k, v)]
    code, _, err = _run(capsys, args)
    assert code == 2 and message in err, err
