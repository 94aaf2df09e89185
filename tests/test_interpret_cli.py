"""`clipjax interpret heads` / `prune` end to end, in-process, with tiny random-init checkpoints.

The model: a class-token ViT (3 blocks, width 32, 2 heads, 32 px, patch 16, embed 16) saved with
`clipjax.checkpoint.save`; the images: 10 real photos (scikit-image) written as PNG files.

- heads: the CLI decomposes the images on 8 sharded devices in padded batches of 8 (10 images, so
  two batches, the second padded) and runs TextSpan head by head on the accumulated effects. Oracle:
  the library on all 10 images at once on one device (`textspan_heads`, vmapped over heads, itself
  parity-tested in test_interpret_decompose.py), with the checkpoint loaded unsharded and the texts
  embedded by `model.encode_text`. The chosen texts must be equal, the variance explained within
  1e-5 (absolute, fractions in [0, 1]). Diagnostics against float64 numpy on the library's outputs:
  `texts_replaced` from `textspan_heads`' `replaced`, `heads_kept` from `decompose.mean_ablate` of
  layer 0 (which `--layers 2` leaves out), cosines and relative errors within 1e-5.
- prune: the saved checkpoint loads with `clipjax.load` and its params equal (exactly) `prune_heads`
  of the original's params; the pruned query / output slices are zero where the original's are not;
  the source folder's files are byte-identical afterwards; an existing output is refused without
  `--overwrite` and replaced with it.
- errors: unknown model folder, empty or blank texts file, a head out of range, an empty image folder,
  a ResNet and a class-token-free ViT model, and other bad arguments exit with code 2 and a one-line
  `clipjax interpret: error: ...` naming the problem.
"""

import dataclasses
import hashlib
import json
import os

import numpy as np
import pytest

import clipjax
import clipjax.cli
from clipjax.cli import main

PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "coins", "moon", "motorcycle", "rocket", "hubble_deep_field",
          "page")
TEXTS = ["a photo of a cat", "an image of the moon", "a red rocket", "a person in a space suit", "",
         "black and white text", "a coin collection", "a cup of coffee", "a vintage camera", "a field of galaxies",
         "a motorbike on a street", "a blue sky"]


def _save(folder, vision, random=True):
    """A tiny checkpoint with `vision` fields (random init, or zeros: only for the error cases, which stop
    before the params are used)."""
    import jax

    from clipjax.checkpoint import save
    from clipjax.models.clip import abstract_params, init_params

    cfg = clipjax.get_config("ViT-B-32")
    cfg = cfg.replace(embed_dim=16, vision=dataclasses.replace(cfg.vision, **vision),
                      text=dataclasses.replace(cfg.text, width=32, heads=2, layers=1, mlp_dim=64))
    params = init_params(cfg, seed=0) if random else \
        jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract_params(cfg).to_pure_dict())
    save(folder, cfg, params)
    return folder


VIT = dict(image_size=32, patch_size=16, width=32, layers=3, heads=2, mlp_dim=64)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return _save(str(tmp_path_factory.mktemp("ckpt") / "vit"), VIT)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from PIL import Image
    from skimage import color, data, transform

    root = tmp_path_factory.mktemp("inputs")
    (root / "images").mkdir()
    for name in PHOTOS:
        im = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
        if im.ndim == 2:
            im = color.gray2rgb(im)
        im = transform.resize(im[..., :3], (40, 40), anti_aliasing=True, preserve_range=True).astype(np.uint8)
        Image.fromarray(im).save(root / "images" / f"{name}.png")
    (root / "texts.txt").write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    return root


def _run(capsys, argv):
    code = main(argv)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _agreement(approx, embedding):
    a, x = np.asarray(approx, np.float64), np.asarray(embedding, np.float64)
    cos = np.sum(a * x, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(x, axis=-1))
    rel = np.linalg.norm(a - x, axis=-1) / np.linalg.norm(x, axis=-1)
    return cos.mean(), rel.mean()


def test_heads_matches_textspan_on_the_whole_set(model_dir, files, capsys):
    from PIL import Image

    from clipjax.interpret import decompose, textspan_heads

    out = files / "res" / "heads.json"
    code, stdout, err = _run(capsys, [
        "interpret", "heads", "--model", model_dir, "--images", str(files / "images"), "--texts",
        str(files / "texts.txt"), "--layers", "2", "--num-texts", "3", "--rank", "8", "--batch-size", "3",
        "--out", str(out), "--no-progress"])
    assert code == 0, err
    result = json.loads(stdout)
    assert json.loads(out.read_text()) == result
    texts = [t for t in TEXTS if t]
    assert result["num_images"] == len(PHOTOS) and result["num_candidates"] == len(texts)
    assert result["layers"] == [1, 2] and set(result["heads"]) == {"L1.H0", "L1.H1", "L2.H0", "L2.H1"}

    model = clipjax.load(model_dir)
    names = sorted(f"{n}.png" for n in PHOTOS)
    pixels = model.preprocess([Image.open(files / "images" / n).convert("RGB") for n in names])
    text_emb = np.asarray(model.encode_text(model.tokenize(texts)))
    ref = textspan_heads(model.params, pixels, text_emb, config=model.config, layers=2, num_texts=3, rank=8)
    for i, layer in enumerate((1, 2)):
        for head in range(2):
            got = result["heads"][f"L{layer}.H{head}"]
            want = [texts[j] for j in np.asarray(ref["indices"][i, head])]
            assert [g["text"] for g in got] == want, (layer, head)
            assert [g["line"] for g in got] == [TEXTS.index(t) + 1 for t in want]
            np.testing.assert_allclose([g["variance_explained"] for g in got],
                                       np.asarray(ref["variance_explained"][i, head]), atol=1e-5)

    parts = decompose.decompose_image(model.params, pixels, config=model.config, level="head")
    embedding = np.asarray(parts["embedding"])
    diag = result["diagnostics"]
    assert diag["mean_ablated_layers"] == [0]
    for key, approx in (("texts_replaced", ref["replaced"]), ("heads_kept", decompose.mean_ablate(parts, layers=[0]))):
        cos, rel = _agreement(approx, embedding)
        assert diag[key]["cosine"] == pytest.approx(cos, abs=1e-5), key
        assert diag[key]["relative_error"] == pytest.approx(rel, abs=1e-5), key
    assert diag["heads_kept"]["relative_error"] > 1e-3  # layer 0's mean-ablation changes the embedding
    final = np.asarray(ref["variance_explained"])[..., -1]
    assert diag["mean_variance_explained"] == pytest.approx(float(final.mean()), abs=1e-5)


def _digest(folder):
    out = {}
    for root, _, names in os.walk(folder):
        for n in names:
            p = os.path.join(root, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def test_prune_writes_the_pruned_checkpoint(model_dir, tmp_path, capsys):
    import jax

    from clipjax.interpret import prune_heads

    before = _digest(model_dir)
    target = str(tmp_path / "pruned")
    code, stdout, err = _run(capsys, ["interpret", "prune", "--model", model_dir, "--heads", "L2.H1, L0.H0",
                                      "--out-model", target])
    assert code == 0, err
    assert json.loads(stdout)["heads"] == ["L0.H0", "L2.H1"]
    original, pruned = clipjax.load(model_dir), clipjax.load(target)
    want = prune_heads(original.params, original.config, ["L2.H1", "L0.H0"])
    got_leaves, want_leaves = jax.tree.leaves_with_path(pruned.params), jax.tree.leaves_with_path(want)
    assert [p for p, _ in got_leaves] == [p for p, _ in want_leaves]
    for (path, a), (_, b) in zip(got_leaves, want_leaves):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
    q = np.asarray(pruned.params["visual"]["transformer"]["blocks"]["attn"]["q_kernel"][...])
    q0 = np.asarray(original.params["visual"]["transformer"]["blocks"]["attn"]["q_kernel"][...])
    assert not q[2, :, 1].any() and not q[0, :, 0].any() and q0[2, :, 1].any() and q0[0, :, 0].any()
    assert np.array_equal(pruned.tokenize(["a cat"]), original.tokenize(["a cat"]))
    assert _digest(model_dir) == before

    code, _, err = _run(capsys, ["interpret", "prune", "--model", model_dir, "--heads", "L1.H0", "--out-model", target])
    assert code == 2 and "exists" in err and "--overwrite" in err
    code, _, err = _run(capsys, ["interpret", "prune", "--model", model_dir, "--heads", "L0.H1", "--tower", "text",
                                 "--out-model", target, "--overwrite"])
    assert code == 0, err
    text_q = np.asarray(clipjax.load(target).params["text"]["transformer"]["blocks"]["attn"]["q_kernel"][...])
    assert not text_q[0, :, 1].any() and text_q[0, :, 0].any()
    assert _digest(model_dir) == before


@pytest.fixture(scope="module")
def other_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("others")
    resnet = dict(arch="resnet", image_size=32, width=8, layers=(1, 1, 1, 1), heads=2, mlp_dim=0, pool="attnpool",
                  ln_pre=False, patch_bias=False)
    return {"resnet": _save(str(root / "rn"), resnet, random=False),
            "gap": _save(str(root / "gap"), dict(VIT, pool="gap"), random=False)}


@pytest.mark.parametrize("case,message", [
    ("unknown model", "not a clipjax checkpoint"),
    ("empty texts", "holds no text"),
    ("blank texts", "holds no text"),
    ("missing texts", "does not exist"),
    ("empty images", "no images"),
    ("one image", "at least 2 images"),
    ("resnet", "needs a class-token ViT"),
    ("no class token", "vision.pool='gap'"),
    ("too many layers", "--layers 4 is more than"),
    ("too many texts", "--num-texts 20 is more than"),
    ("zero rank", "--rank must be a positive integer"),
])
def test_heads_errors(model_dir, files, other_models, tmp_path, capsys, case, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "a.png").write_bytes((files / "images" / "moon.png").read_bytes())
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    args = {"--model": model_dir, "--images": str(files / "images"), "--texts": str(files / "texts.txt"),
            "--layers": "2"}
    extra = []
    if case == "unknown model":
        args["--model"] = str(tmp_path / "nowhere")
    elif case in ("empty texts", "blank texts", "missing texts"):
        args["--texts"] = str(tmp_path / {"empty texts": "empty.txt", "blank texts": "blank.txt"}.get(case, "no.txt"))
    elif case == "empty images":
        args["--images"] = str(tmp_path / "empty")
    elif case == "one image":
        args["--images"] = str(tmp_path / "one")
    elif case == "resnet":
        args["--model"] = other_models["resnet"]
    elif case == "no class token":
        args["--model"] = other_models["gap"]
    else:
        extra = {"too many layers": ["--layers", "4"], "too many texts": ["--num-texts", "20"],
                 "zero rank": ["--rank", "0"]}[case]
    argv = ["interpret", "heads", "--no-progress"] + [t for kv in args.items() for t in kv] + extra
    code, stdout, err = _run(capsys, argv)
    assert code == 2 and stdout == ""
    assert err.startswith("clipjax interpret: error:") and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("heads,extra,message", [
    ("L3.H0", [], "--heads: 'L3.H0' has layer 3 outside [0, 3)"),
    ("L1.H2", [], "has head 2 outside [0, 2)"),
    ("L1.H0", ["--tower", "text"], "has layer 1 outside [0, 1)"),
    ("head5", [], "is not a head name like 'L11.H5'"),
    (" , ", [], "--heads must name at least one head"),
    ("L0.H0", ["--model", "nowhere"], "not a clipjax checkpoint"),
    ("L0.H0", ["--model", "resnet"], "needs a ViT image tower"),
    ("L0.H0", ["--out-model", "same"], "--out-model must differ from --model"),
])
def test_prune_errors(model_dir, other_models, tmp_path, capsys, heads, extra, message):
    args = {"--model": model_dir, "--heads": heads, "--out-model": str(tmp_path / "out")}
    named = {"nowhere": str(tmp_path / "nowhere"), "resnet": other_models["resnet"], "same": model_dir}
    for flag, value in zip(extra[::2], extra[1::2]):
        args[flag] = named.get(value, value)
    code, stdout, err = _run(capsys, ["interpret", "prune"] + [t for kv in args.items() for t in kv])
    assert code == 2 and stdout == ""
    assert err.startswith("clipjax interpret: error:") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()
