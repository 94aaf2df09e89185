"""Input pipelines (`clipjax.data`): sources, order, resume in a new process, processes, bad data, trainer.

Data: real photos (scikit-image) re-encoded as small JPEGs, written as webdataset tar shards by
`webdataset.TarWriter` (the writer img2dataset uses), as an open_clip TSV / CSV and a JSONL table
over image files, and converted to a tfds ArrayRecord dataset. Bad examples are planted on
purpose: a corrupt JPEG, an example without caption, one without image, a shard cut in half and
an empty shard; each kind must be counted, never crash the read.

Expected values come from what was written (the keys, captions and kinds planted), not from the
pipeline; resumed reads are compared with an uninterrupted read in another process.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from clipjax.data import DataConfig, make_batches
from clipjax.data.errors import DataError
from clipjax.data.sources import image_bytes
from clipjax.tokenizer import Tokenizer
from helpers import read_all as _read_all

SHARDS, PER_SHARD, IMAGE, CONTEXT = 4, 10, 32, 12


def photos() -> list[np.ndarray]:
    from PIL import Image
    from skimage import data

    out = []
    for f in (data.astronaut, data.chelsea, data.coffee, data.rocket):
        im = Image.fromarray(f())
        for side in (48, 64, 80):
            out.append(np.asarray(im.resize((side, side * im.height // im.width))))
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Tar shards, tables and what was planted in them."""
    import webdataset as wds

    root = tmp_path_factory.mktemp("corpus")
    pics = photos()
    good, captions, extra = [], {}, {}
    for s in range(SHARDS):
        with wds.TarWriter(str(root / f"{s:05d}.tar")) as sink:
            for i in range(PER_SHARD):
                key = f"{s:05d}{i:04d}"
                sample = {"__key__": key, "jpg": image_bytes(pics[(s * PER_SHARD + i) % len(pics)], quality=90)}
                if (s, i) == (1, 3):
                    sample["jpg"] = sample["jpg"][: len(sample["jpg"]) // 3]  # truncated JPEG
                if (s, i) != (2, 5):  # (2, 5) has no caption
                    sample["txt"] = f"photo {s} {i}"
                    captions[key] = f"photo {s} {i}"
                if i % 3 == 0:  # LaCLIP-style rewritten captions in the JSON
                    sample["json"] = json.dumps({"captions": [f"rewrite a {s} {i}", f"rewrite b {s} {i}"]})
                    extra[key] = [f"rewrite a {s} {i}", f"rewrite b {s} {i}"]
                if (s, i) == (3, 7):
                    del sample["jpg"]  # no image
                sink.write(sample)
                if (s, i) not in ((1, 3), (2, 5), (3, 7)):
                    good.append(key)
    # a shard cut mid-way (damaged after its first examples) and an empty one
    full = (root / "00000.tar").read_bytes()
    (root / "damaged.tar").write_bytes(full[: len(full) // 2 + 100])
    (root / "empty.tar").write_bytes(b"")
    # tables over image files (relative paths), one row pointing at a missing file
    (root / "img").mkdir()
    rows = []
    for i, pic in enumerate(pics):
        (root / "img" / f"{i}.jpg").write_bytes(image_bytes(pic, quality=90))
        rows.append((f"img/{i}.jpg", f"table photo {i}"))
    rows.append(("img/missing.jpg", "a photo that is not there"))
    with open(root / "table.tsv", "w") as f:
        f.write("filepath\ttitle\n" + "".join(f"{p}\t{c}\n" for p, c in rows))
    with open(root / "table.csv", "w") as f:
        f.write("title,filepath\n" + "".join(f"{c},{p}\n" for p, c in rows))
    with open(root / "table.jsonl", "w") as f:
        f.write("".join(json.dumps({"filepath": p, "title": c}) + "\n" for p, c in rows))
    return {"root": str(root), "shards": str(root / "{00000..00003}.tar"), "good": good, "captions": captions,
            "extra": extra, "table_rows": len(rows)}


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.openai(context_length=CONTEXT)


def read_all(config, tokenizer, batch=4, **kw):
    return _read_all(config, tokenizer, image_size=IMAGE, batch=batch, **kw)


def test_tar_shards_read_every_good_example_once_and_count_the_bad(corpus, tokenizer):
    spec = corpus["shards"] + "," + os.path.join(corpus["root"], "damaged.tar") + "," + \
        os.path.join(corpus["root"], "empty.tar")
    batches, counts, _ = read_all(DataConfig(source=spec), tokenizer)
    keys = [k for b in batches for k in b["__key__"]]
    # damaged.tar is shard 00000 cut in half: its first examples are read again, then the damage
    damaged = {k for k in keys if keys.count(k) == 2}
    assert sorted(set(keys)) == sorted(corpus["good"]) and 0 < len(damaged) < PER_SHARD
    assert counts == {"corrupt_image": 1, "missing_image": 1, "missing_caption": 1, "bad_shard": 1,
                      "empty_shard": 1, "good": len(keys)}
    b = batches[0]
    assert b["image"].dtype == np.uint8 and b["image"].shape == (4, IMAGE, IMAGE, 3)
    assert b["text"].dtype == np.int32 and b["text"].shape == (4, CONTEXT)
    # eval mode: the example's own caption, tokenized in the batch
    want = tokenizer([corpus["captions"][k] for k in b["__key__"]])
    np.testing.assert_array_equal(b["text"], want)


@pytest.mark.parametrize("table", ["table.tsv", "table.csv", "table.jsonl"])
def test_tables_resolve_paths_sniff_separators_and_count_missing_files(corpus, tokenizer, table):
    batches, counts, _ = read_all(DataConfig(source=os.path.join(corpus["root"], table)), tokenizer, batch=5)
    keys = [int(k) for b in batches for k in b["__key__"]]
    assert keys == list(range(corpus["table_rows"] - 1))  # eval order: the table's order
    assert counts == {"missing_image": 1, "good": corpus["table_rows"] - 1}


def test_table_errors_name_the_problem(corpus, tokenizer):
    with pytest.raises(DataError, match=r"no column\(s\) \['path', 'title'\]"):
        make_batches(DataConfig(source=os.path.join(corpus["root"], "table.tsv"), img_key="path"),
                     image_size=IMAGE, tokenizer=tokenizer, batch_size=2)
    with pytest.raises(DataError, match="matches no file"):
        make_batches(DataConfig(source=os.path.join(corpus["root"], "nothing-*.tar")), image_size=IMAGE,
                     tokenizer=tokenizer, batch_size=2)
    with pytest.raises(ValueError, match="not divisible by 3 processes"):
        make_batches(DataConfig(source=corpus["shards"]), image_size=IMAGE, tokenizer=tokenizer, batch_size=4,
                     process_index=0, process_count=3)


@pytest.mark.parametrize("kind", ["shards", "table"])
def test_two_processes_read_one_epoch_exactly_once(corpus, tokenizer, kind):
    spec = corpus["shards"] if kind == "shards" else os.path.join(corpus["root"], "table.tsv")
    per_process = []
    for p in range(2):
        it = make_batches(DataConfig(source=spec, shuffle_buffer=8), image_size=IMAGE, tokenizer=tokenizer,
                          batch_size=4, seed=3, train=True, num_epochs=1, process_index=p, process_count=2)
        keys = []
        try:
            for b in it:
                keys.extend(b["__key__"])
        except StopIteration:
            pass
        it.close()
        per_process.append(keys)
    assert not set(per_process[0]) & set(per_process[1])
    everything = per_process[0] + per_process[1]
    want = corpus["good"] if kind == "shards" else [str(i) for i in range(corpus["table_rows"] - 1)]
    # full batches only in training: at most one partial batch (< 2 examples per process) is left out
    assert len(everything) == len(set(everything)) and set(everything) <= set(want)
    assert len(want) - len(everything) < 2 * 2


def test_train_order_is_shuffled_and_laclip_captions_are_drawn_per_epoch(corpus, tokenizer):
    it = make_batches(DataConfig(source=corpus["shards"], caption_list_key="captions", shuffle_buffer=8),
                      image_size=IMAGE, tokenizer=tokenizer, batch_size=4, seed=0)
    drawn = {}
    for _ in range(3 * len(corpus["good"]) // 4):  # about three epochs
        b = next(it)
        for key, ids in zip(b["__key__"], b["text"]):
            drawn.setdefault(key, set()).add(tokenizer.decode(ids).strip())
    it.close()
    multi = [k for k in corpus["extra"] if k in drawn]
    assert multi and all(drawn[k] <= {corpus["captions"][k], *corpus["extra"][k]} for k in multi)
    assert any(len(drawn[k]) > 1 for k in multi)  # a different caption in another epoch
    assert all(drawn[k] == {corpus["captions"][k]} for k in drawn if k not in corpus["extra"])


def test_too_many_bad_examples_stop_with_the_counts(corpus, tokenizer):
    cfg = DataConfig(source=corpus["shards"], max_bad_fraction=0.0, bad_check_after=8)
    it = make_batches(cfg, image_size=IMAGE, tokenizer=tokenizer, batch_size=4)
    with pytest.raises(DataError, match=r"examples read by this process were bad \(.*max_bad_fraction=0.0"):
        for _ in range(20):
            next(it)
    it.close()
    # a source where every example is bad stops instead of looping for ever
    bad = os.path.join(corpus["root"], "allbad.jsonl")
    with open(bad, "w") as f:
        f.write("".join(json.dumps({"filepath": f"no{i}.jpg", "title": "x"}) + "\n" for i in range(5)))
    it = make_batches(DataConfig(source=bad, bad_check_after=20), image_size=IMAGE, tokenizer=tokenizer, batch_size=2)
    with pytest.raises(DataError, match="in a row were bad.*missing_image"):
        next(it)
    it.close()


RESUME_SCRIPT = r"""
import json, sys
from clipjax.data import DataConfig, make_batches
from clipjax.tokenizer import Tokenizer
args = json.loads(sys.argv[1])
tok = Tokenizer.openai(context_length=args["context"])
it = make_batches(DataConfig(**args["config"]), image_size=args["image"], tokenizer=tok, batch_size=4, seed=5)
it.set_state(args["state"])
out = [{k: v.tolist() for k, v in next(it).items()} for _ in range(args["n"])]
print(json.dumps({"batches": out, "counts": it.bad_counts()}))
it.close()
"""


@pytest.mark.parametrize("config", [
    {"source": "SHARDS", "caption_list_key": "captions", "shuffle_buffer": 6, "cycle_length": 2},
    {"source": "TABLE", "num_workers": 2},
], ids=["shards", "table-2-workers"])
def test_a_restored_iterator_in_a_new_process_continues_exactly(corpus, tokenizer, config):
    config = dict(config, source=corpus["shards"] if config["source"] == "SHARDS"
                  else os.path.join(corpus["root"], "table.tsv"))
    it = make_batches(DataConfig(**config), image_size=IMAGE, tokenizer=tokenizer, batch_size=4, seed=5)
    for _ in range(7):  # past the first window / epoch boundary of the table (12 examples)
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    counts = it.bad_counts()
    want = [next(it) for _ in range(4)]
    it.close()
    arg = json.dumps({"config": config, "state": state, "n": 4, "image": IMAGE, "context": CONTEXT})
    proc = subprocess.run([sys.executable, "-c", RESUME_SCRIPT, arg], capture_output=True, text=True, timeout=240,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for w, g in zip(want, got["batches"]):
        assert list(w["__key__"]) == g["__key__"]
        np.testing.assert_array_equal(w["image"], np.asarray(g["image"], np.uint8))  # same random crops
        np.testing.assert_array_equal(w["text"], np.asarray(g["text"], np.int32))
    assert got["counts"]["good"] == counts["good"] + 16


def test_tfds_convert_and_read_back(corpus, tokenizer, tmp_path):
    from clipjax.data.tfds_source import convert

    summary = convert(corpus["shards"], str(tmp_path), "photos")
    assert summary["counts"] == {"missing_image": 1, "missing_caption": 1, "good": len(corpus["good"]) + 1}
    # the truncated JPEG is stored (conversion does not decode); the pipeline counts it when reading
    batches, counts, _ = read_all(DataConfig(source=summary["source"], tfds_data_dir=str(tmp_path)), tokenizer)
    keys = sorted(k for b in batches for k in b["__key__"])
    assert keys == sorted(corpus["good"]) and counts == {"corrupt_image": 1, "good": len(corpus["good"])}
    with pytest.raises(FileExistsError, match="already holds data"):
        convert(corpus["shards"], str(tmp_path), "photos")
    table = convert(os.path.join(corpus["root"], "table.tsv"), str(tmp_path), "table_photos")  # open_clip TSV
    assert table["counts"] == {"missing_image": 1, "good": corpus["table_rows"] - 1}
    batches, counts, _ = read_all(DataConfig(source="tfds:table_photos", tfds_data_dir=str(tmp_path)), tokenizer)
    assert sorted(int(k) for b in batches for k in b["__key__"]) == list(range(corpus["table_rows"] - 1))


def test_trainer_runs_on_the_pipeline_saves_its_state_and_reports_bad_data(corpus, tokenizer, tmp_path):
    """4 steps of the tiny CLIP on the tar shards: bad-data counts reach metrics.jsonl, and the data
    state in the step-4 checkpoint restores a fresh pipeline to the batches an uninterrupted one reads next."""
    import dataclasses

    import train_worker as W

    from clipjax.train import checkpoints as C
    from clipjax.train.loop import train

    model = W.tiny_config()
    model = model.replace(text=dataclasses.replace(model.text, vocab_size=49408, context_length=CONTEXT))
    cfg = W.train_config(4, checkpoint_every=2)
    make = lambda: make_batches(DataConfig(source=corpus["shards"], shuffle_buffer=8), image_size=IMAGE,  # noqa: E731
                                tokenizer=tokenizer, batch_size=cfg.batch_size, seed=cfg.seed)
    data = make()
    result = train(model, cfg, str(tmp_path), data, progress=False, log=lambda m: None)
    data.close()
    assert result.step == 4
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert rows[-1]["data/good"] == 4 * cfg.batch_size and rows[-1]["step"] == 4
    # the shuffled order met some of the planted bad examples by then, or none: counts are consistent either way
    reference = make()
    for _ in range(4):
        next(reference)
    assert sum(v for k, v in rows[-1].items() if k.startswith("data/") and k != "data/good") == \
        sum(v for k, v in reference.bad_counts().items() if k != "good")
    saved = json.load(open(tmp_path / "checkpoints" / "4" / "data" / "metadata"))
    assert saved["process_count"] == 1 and saved["global"] is False
    restored = make()
    restored.set_state(C.local_data_state(saved))
    want, got = next(reference), next(restored)
    reference.close(), restored.close()
    assert list(want["__key__"]) == list(got["__key__"])
    np.testing.assert_array_equal(want["image"], got["image"])


def test_a_per_process_data_state_refuses_another_process_count():
    from clipjax.train import checkpoints as C

    saved = {"process_count": 2, "global": False, "states": [{"a": 0}, {"a": 1}]}
    with pytest.raises(C.WorkdirError, match="saved by 2 processes and this run has 1"):
        C.local_data_state(saved)
    assert C.local_data_state(dict(saved, **{"global": True})) == {"a": 0}
    assert C.local_data_state({"process_count": 1, "global": False, "states": [{"a": 5}]}) == {"a": 5}


def test_keep_keys_reads_only_what_curation_kept(corpus, tokenizer, tmp_path):
    kept = sorted(corpus["good"])[::3] + ["not-a-key"]
    (tmp_path / "kept-00000-of-00002.txt").write_text("\n".join(kept[:4]) + "\n")
    (tmp_path / "kept-00001-of-00002.txt").write_text("\n".join(kept[4:]) + "\n")
    batches, counts, _ = read_all(DataConfig(source=corpus["shards"], keep_keys=str(tmp_path)), tokenizer)
    keys = sorted(k for b in batches for k in b["__key__"])
    assert keys == sorted(corpus["good"])[::3] and counts["good"] == len(keys)


def test_tfds_rows_laid_out_as_coco_captions(corpus, tokenizer):
    """A prepared tfds image-text builder's rows (coco_captions' layout: undecoded `image` bytes,
    nested `captions/text`, `image/id`), through `TfdsSource.record` and the pipeline's workers.
    (Building such a dataset here needs TensorFlow, so the rows are given as the data source returns them.)"""
    from clipjax.data.pipeline import _ToExample
    from clipjax.data.tfds_source import TfdsSource

    jpeg = image_bytes(photos()[0], quality=90)
    rows = [{"image": jpeg, "image/id": 7, "captions": {"id": np.array([1, 2]),
                                                         "text": np.array([b"a man in a suit", b"an astronaut"])}},
            {"image": jpeg, "image/id": 8, "captions": {"id": np.array([], np.int64), "text": np.array([], object)}},
            {"image": b"", "image/id": 9, "captions": {"id": np.array([3]), "text": np.array([b"x"])}}]
    src = TfdsSource("coco_captions", "train", None, "image", "captions/text", "image/id")
    object.__setattr__(src, "_cached", rows)
    good, no_caption, no_image = (src.record(i) for i in range(3))
    assert good["key"] == "7" and good["captions"] == ["a man in a suit", "an astronaut"] and good["image"] == jpeg
    assert no_caption["bad"] == "missing_caption" and no_image["bad"] == "missing_image"
    example = _ToExample(IMAGE, 0, False, False, None, None)(good)
    assert example["caption"] == "a man in a suit" and example["image"].shape == (IMAGE, IMAGE, 3)
