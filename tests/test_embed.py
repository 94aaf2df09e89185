"""`clipjax embed`: every example of a source embedded, in order, equal to the model's own encoders, resumable.

Reference: the same photos loaded with PIL and put through `Model.preprocess` (open_clip's eval
transform, `clipjax.preprocess`) and `Model.encode_image` / `encode_text` on the captions: an
independent path from the pipeline's libjpeg-turbo decode, worker batching and shard writer.
"""

import json
import os

import numpy as np
import pytest
from helpers import tiny_checkpoint

from clipjax.cli import main
from clipjax.cli.embed import embed, read_embeddings
from clipjax.data.sources import image_bytes

ROWS = 11  # + one row whose image is missing: 11 good examples


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from PIL import Image
    from skimage import data

    root = tmp_path_factory.mktemp("embed")
    model_dir = tiny_checkpoint(str(root / "model"))
    rows = []
    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    for i in range(ROWS):
        im = Image.fromarray(photos[i % 4]).resize((40 + 8 * i, 36 + 4 * i))
        (root / f"{i}.jpg").write_bytes(image_bytes(np.asarray(im), quality=92))
        rows.append({"filepath": f"{i}.jpg", "title": f"photo number {i}"})
    rows.insert(5, {"filepath": "missing.jpg", "title": "not there"})
    with open(root / "pairs.jsonl", "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    return {"root": root, "model": model_dir, "source": str(root / "pairs.jsonl"), "rows": rows}


def test_embeddings_equal_the_models_encoders_in_source_order(setup, tmp_path, capsys):
    import clipjax
    from PIL import Image

    out = str(tmp_path / "out")
    assert main(["embed", "--model", setup["model"], "--data", setup["source"], "--out", out, "--dtype", "float32",
                 "--batch-size", "4", "--shard-size", "8", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["rows"] == ROWS and summary["shards"] == 2 and summary["bad"] == {"missing_image": 1, "good": ROWS}
    keys, img = read_embeddings(out, "image")
    keys_t, txt = read_embeddings(out, "text")
    good = [i for i, r in enumerate(setup["rows"]) if r["filepath"] != "missing.jpg"]
    assert keys == keys_t == [str(i) for i in good]  # table row numbers, in order
    model = clipjax.load(setup["model"])
    images = [Image.open(setup["root"] / setup["rows"][i]["filepath"]) for i in good]
    want_img = np.asarray(model.encode_image(model.preprocess(images)))
    want_txt = np.asarray(model.encode_text([setup["rows"][i]["title"] for i in good]))
    assert img.dtype == np.float32 and img.shape == (ROWS, model.config.embed_dim)
    np.testing.assert_allclose(img, want_img, rtol=0, atol=2e-6)
    np.testing.assert_allclose(txt, want_txt, rtol=0, atol=2e-6)


def test_a_stopped_run_resumes_after_its_last_complete_shard(setup, tmp_path):
    kw = dict(modality=("image",), batch_size=8, shard_size=8, progress=False)  # 8 fake devices: batch 8
    whole = embed(setup["model"], setup["source"], str(tmp_path / "whole"), **kw)
    assert whole["finished"] and whole["shards"] == 2
    out = str(tmp_path / "parts")
    first = embed(setup["model"], setup["source"], out, max_shards=1, **kw)
    assert not first["finished"] and first["shards"] == 1 and first["rows"] == 8
    # a kill after shard 2's array was renamed into place, before the state: garbage there is redone
    np.save(os.path.join(out, "img_emb", "img_emb_000_00001.npy"), np.full((3, 16), np.nan, np.float16))
    rest = embed(setup["model"], setup["source"], out, **kw)
    assert rest["finished"] and rest["shards"] == 2 and rest["rows"] == ROWS
    k1, e1 = read_embeddings(str(tmp_path / "whole"))
    k2, e2 = read_embeddings(out)
    assert k1 == k2
    np.testing.assert_array_equal(e1, e2)
    assert e1.dtype == np.float32 and np.all(np.isfinite(e1))  # stored float16, read back as float32
    with pytest.raises(ValueError, match="other settings"):
        embed(setup["model"], setup["source"], out, modality=("image",), batch_size=8, shard_size=16, progress=False)


def test_bad_arguments_are_refused(setup, tmp_path):
    with pytest.raises(ValueError, match="--modality"):
        embed(setup["model"], setup["source"], str(tmp_path / "a"), modality=("audio",))
    with pytest.raises(ValueError, match="multiple of the batch size"):
        embed(setup["model"], setup["source"], str(tmp_path / "b"), batch_size=8, shard_size=12)
    with pytest.raises(FileNotFoundError, match="not a `clipjax embed` output"):
        read_embeddings(str(tmp_path))


def test_score_and_ood_read_embed_folders_as_image_sets(setup, tmp_path, capsys):
    """vendi / cmmd / ood on an embed folder give what they give on the image files themselves."""
    emb = str(tmp_path / "emb")
    embed(setup["model"], setup["source"], emb, modality=("image",), dtype="float32", batch_size=8, shard_size=8,
          progress=False)
    folder = str(tmp_path / "imgs")
    os.makedirs(folder)
    for r in setup["rows"]:
        if r["filepath"] != "missing.jpg":
            os.link(setup["root"] / r["filepath"], os.path.join(folder, r["filepath"]))

    def run(*argv):
        assert main(list(argv) + ["--no-progress"]) == 0
        return json.loads(capsys.readouterr().out)  # emit() prints one indented JSON object

    m = ["--model", setup["model"]]
    a, b = run("score", "vendi", *m, "--images", emb), run("score", "vendi", *m, "--images", folder)
    for q in a["images"]["vendi"]:
        assert a["images"]["vendi"][q] == pytest.approx(b["images"]["vendi"][q], rel=1e-5)
    a = run("score", "cmmd", *m, "--images", emb, "--reference-images", folder)  # the same images both sides
    assert a["num_images"] == a["num_reference_images"] == ROWS and abs(a["cmmd"]) < 1e-3
    from PIL import Image

    flipped = str(tmp_path / "flipped")  # another image set as the OOD side
    os.makedirs(flipped)
    for name in os.listdir(folder):
        Image.open(os.path.join(folder, name)).transpose(Image.Transpose.ROTATE_90).save(os.path.join(flipped, name))
    ood = ["ood", *m, "--id-classes", "cat,rocket,coffee", "--score", "mcm,energy"]
    a = run(*ood, "--id-images", emb, "--ood-images", flipped)
    b = run(*ood, "--id-images", folder, "--ood-images", flipped)
    assert a["id"]["num_images"] == ROWS and "embeddings" in a["id"]
    for s in ("mcm", "energy"):
        assert a["scores"][s]["auroc"] == pytest.approx(b["scores"][s]["auroc"], abs=1e-6)
    other = tiny_checkpoint(str(tmp_path / "other"))
    assert main(["score", "vendi", "--model", other, "--images", emb, "--no-progress"]) == 2
    assert "holds embeddings of" in capsys.readouterr().err
