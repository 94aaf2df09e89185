"""Labels through `clipjax data convert` (tfds ArrayRecord `label` feature), and tar labels held in `KEY.json`.

Data: real handwritten digits (scikit-learn `load_digits`, 8x8 scaled to 16x16 RGB) with their real digit
labels, written by `webdataset.TarWriter` as two tar-shard sets holding the same examples: one with labels as
`KEY.cls` members (ASCII integers, stray whitespace) and `KEY.txt` captions (two examples without one), one
ImageNet-style without captions whose labels sit in `KEY.json` (`{"label": 3}` or `{"label": "3"}`); plus a JSONL
table with a label column and no caption column. Bad labels are planted at the same keys in both tar sets ("x",
negative, one past the last class, a float, a boolean, none at all), and one example of the JSON set carries a
`KEY.label` member that disagrees with its JSON (the member wins).

The sets are converted with the CLI (`clipjax.cli.main(["data", "convert", ...])`) or `convert`, and read back
with `make_batches(DataConfig(source="tfds:NAME", label_key="label", classnames="tfds"))`. Expected values come
from what was written (key -> label, the planted bad kinds), never from the converter; captions made from a
template are compared with the tokenizer applied to `template.format(name)` written out here. Labels and token ids
are integers: compared exactly (no tolerance).
"""

import json
import re

import numpy as np
import pytest

from clipjax.cli import main as cli
from clipjax.data import DataConfig, DataError, make_batches
from clipjax.data.sources import image_bytes
from clipjax.data.tfds_source import convert
from clipjax.tokenizer import Tokenizer
from helpers import digit_images as digits, key_labels, read_all as _read_all

IMAGE, CONTEXT = 16, 16
NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATE = "This is a photo of a {}"
SHARDS, PER_SHARD = 2, 10
# planted bad labels (shard, index) -> (`.cls` bytes, JSON value); None: no label at all
BAD = {(0, 2): (b"x", "x"), (0, 5): (b"3.0", 3.0), (0, 7): (b"-1\n", -1), (1, 1): (b"true", True),
       (1, 4): (b"10", 10), (1, 8): (None, None)}
NO_CAPTION = {(0, 0), (1, 9)}  # `.cls` set: examples written without `.txt` (kept: labelled sets need no caption)
DISAGREE = (0, 3)  # JSON set: a `KEY.label` member beside a JSON label that differs; the member is read


def read_all(config, tokenizer, batch=4, **kw):
    """`helpers.read_all` at this file's image size."""
    return _read_all(config, tokenizer, image_size=IMAGE, batch=batch, **kw)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Both tar sets, the JSONL table, a class-name file, and what was planted in them."""
    import webdataset as wds

    root = tmp_path_factory.mktemp("convert_labels")
    images, labels = digits(SHARDS * PER_SHARD + 8)
    (root / "names.txt").write_text("\n".join(NAMES) + "\n")
    good, captions = {}, {}
    for s in range(SHARDS):
        with (wds.TarWriter(str(root / f"cls{s}.tar")) as with_cls,
              wds.TarWriter(str(root / f"json{s}.tar")) as with_json):
            for i in range(PER_SHARD):
                j, key = s * PER_SHARD + i, f"d{s}{i:02d}"
                fmt = ("png", "PNG") if j % 2 else ("jpg", "JPEG")
                image = image_bytes(images[j], fmt[1])
                cls_bytes, json_value = BAD.get((s, i), ((f" {labels[j]}\n" if j % 3 else f"{labels[j]}").encode(),
                                                         int(labels[j]) if j % 2 else str(labels[j])))
                a = {"__key__": key, fmt[0]: image}
                if cls_bytes is not None:
                    a["cls"] = cls_bytes
                if (s, i) not in NO_CAPTION:
                    a["txt"] = captions[key] = f"handwritten {key}"
                b = {"__key__": key, fmt[0]: image, "json": json.dumps({"source": "digits"} if json_value is None
                                                                      else {"label": json_value, "id": j})}
                if (s, i) == DISAGREE:
                    b["label"], b["json"] = str(labels[j]).encode(), json.dumps({"label": int(labels[j] + 1) % 10})
                with_cls.write(a)
                with_json.write(b)
                if (s, i) not in BAD:
                    good[key] = int(labels[j])
    offset = SHARDS * PER_SHARD
    table_labels = {}
    with open(root / "table.jsonl", "w") as f:  # no caption column; the last two rows hold bad labels
        for r in range(8):
            (root / f"{r}.png").write_bytes(image_bytes(images[offset + r], "PNG"))
            value = int(labels[offset + r]) if r < 6 else ("nine", 12)[r - 6]
            f.write(json.dumps({"filepath": f"{r}.png", "y": value}) + "\n")
            if r < 6:
                table_labels[str(r)] = int(labels[offset + r])
    return {"root": root, "cls": str(root / "cls{0..1}.tar"), "json": str(root / "json{0..1}.tar"),
            "names": str(root / "names.txt"), "good": good, "captions": captions, "table": str(root / "table.jsonl"),
            "table_labels": table_labels}


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.openai(context_length=CONTEXT)


def run_cli(*args) -> dict:
    assert cli(["data", "convert", *args]) == 0
    return args


def test_cli_converts_cls_shards_with_class_names_and_they_read_back(corpus, tokenizer, tmp_path, capsys):
    """`--label-key cls --classnames FILE`: a tfds ClassLabel named from the file; bad labels left out and counted;
    the examples written without a caption are kept, and read back with the captions feature they count as
    `missing_caption`, with a template they are read."""
    out = str(tmp_path)
    run_cli(corpus["cls"], "--data-dir", out, "--name", "digits_cls", "--label-key", "cls", "--classnames",
            corpus["names"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["counts"] == {"label": len(BAD), "good": len(corpus["good"])}
    assert summary["label"] == {"feature": "ClassLabel", "num_classes": 10}
    assert summary["without_caption"] == len(NO_CAPTION)
    assert summary["why"] == {"label": "d002: label 'x' is not an integer (label_key='cls')"}  # the first one
    assert summary["source"] == "tfds:digits_cls:train"

    cfg = DataConfig(source="tfds:digits_cls", label_key="label", classnames="tfds", tfds_data_dir=out)
    batches, counts, classnames = read_all(cfg, tokenizer)
    captioned = {k: y for k, y in corpus["good"].items() if k in corpus["captions"]}
    assert classnames == NAMES and key_labels(batches) == captioned
    assert counts == {"missing_caption": len(NO_CAPTION), "good": len(captioned)}
    for b in batches:  # the stored captions, tokenized
        np.testing.assert_array_equal(b["text"], tokenizer([corpus["captions"][k] for k in b["__key__"]]))
        assert b["image"].shape == (len(b["__key__"]), IMAGE, IMAGE, 3)

    cfg = DataConfig(source="tfds:digits_cls", label_key="label", classnames="tfds", caption_key=None,
                     caption_template=TEMPLATE, tfds_data_dir=out)
    batches, counts, _ = read_all(cfg, tokenizer, batch=3)
    assert key_labels(batches) == corpus["good"] and counts == {"good": len(corpus["good"])}
    for b in batches:
        want = [TEMPLATE.format(NAMES[corpus["good"][k]]) for k in b["__key__"]]
        np.testing.assert_array_equal(b["text"], tokenizer(want))
    with pytest.raises(FileExistsError, match="already holds data"):
        convert(corpus["cls"], out, "digits_cls", label_key="cls")


def test_json_labels_in_caption_less_shards_equal_the_cls_labels(corpus, tokenizer, tmp_path):
    """Labels from `KEY.json` (ints and strings of ints): the same good keys and labels as the `.cls` set, the
    same bad ones refused (a JSON float and boolean too); a `KEY.label` member beside the JSON wins. Read by
    the pipeline straight from the shards, and converted (class names as a list) then read back with a template."""
    straight, counts, _ = read_all(DataConfig(source=corpus["json"], label_key="label", classnames=corpus["names"],
                                              caption_key=None, caption_template=TEMPLATE), tokenizer)
    assert key_labels(straight) == corpus["good"] and counts == {"label": len(BAD), "good": len(corpus["good"])}
    from_cls, _, _ = read_all(DataConfig(source=corpus["cls"], label_key="cls", classnames=corpus["names"],
                                         caption_key=None, caption_template=TEMPLATE), tokenizer)
    assert key_labels(straight) == key_labels(from_cls)
    # no .txt anywhere: without a template the shards have no usable caption, labelled or not
    _, counts, _ = read_all(DataConfig(source=corpus["json"], label_key="label"), tokenizer)
    assert counts == {"missing_caption": SHARDS * PER_SHARD, "good": 0}

    summary = convert(corpus["json"], str(tmp_path), "digits_json", label_key="label", classnames=list(NAMES))
    assert summary["counts"] == {"label": len(BAD), "good": len(corpus["good"])}
    assert summary["without_caption"] == len(corpus["good"])
    cfg = DataConfig(source="tfds:digits_json:train", label_key="label", classnames="tfds", caption_key=None,
                     caption_template="a blurry {c} digit", tfds_data_dir=str(tmp_path))
    batches, counts, classnames = read_all(cfg, tokenizer, batch=5)
    assert classnames == NAMES and key_labels(batches) == corpus["good"] and counts == {"good": len(corpus["good"])}
    for b in batches:
        want = [f"a blurry {NAMES[corpus['good'][k]]} digit" for k in b["__key__"]]
        np.testing.assert_array_equal(b["text"], tokenizer(want))


def test_without_class_names_the_label_is_an_integer_feature(corpus, tokenizer, tmp_path):
    """No class names: no range check (label 10 is kept), `label` is an int64 feature without names."""
    summary = convert(corpus["cls"], str(tmp_path), "digits_int", label_key="cls")
    assert summary["label"] == {"feature": "int64"}
    assert summary["counts"] == {"label": len(BAD) - 1, "good": len(corpus["good"]) + 1}
    cfg = DataConfig(source="tfds:digits_int", label_key="label", tfds_data_dir=str(tmp_path))
    batches, counts, classnames = read_all(cfg, tokenizer)
    captioned = {k: y for k, y in corpus["good"].items() if k in corpus["captions"]}
    assert classnames is None and key_labels(batches) == {**captioned, "d104": 10}
    with pytest.raises(DataError, match="feature 'label' of tfds dataset 'digits_int' is a Scalar, not a ClassLabel"):
        make_batches(DataConfig(source="tfds:digits_int", label_key="label", classnames="tfds",
                                tfds_data_dir=str(tmp_path)), image_size=IMAGE, tokenizer=tokenizer, batch_size=2)
    # an unlabelled conversion keeps its old features: no `label`, captions required
    plain = convert(corpus["cls"], str(tmp_path), "digits_plain")
    assert "label" not in plain and plain["counts"] == {"missing_caption": len(NO_CAPTION),
                                                        "good": SHARDS * PER_SHARD - len(NO_CAPTION)}
    with pytest.raises(DataError, match="has no feature 'label'"):
        make_batches(DataConfig(source="tfds:digits_plain", label_key="label", tfds_data_dir=str(tmp_path)),
                     image_size=IMAGE, tokenizer=tokenizer, batch_size=2)


def test_cli_converts_a_caption_less_table(corpus, tokenizer, tmp_path, capsys):
    """A JSONL table with a label column `y` and no caption column (`--no-captions`): "nine" and 12 are refused."""
    run_cli(corpus["table"], "--data-dir", str(tmp_path), "--name", "digits_table", "--label-key", "y",
            "--classnames", corpus["names"], "--no-captions")
    summary = json.loads(capsys.readouterr().out)
    assert summary["counts"] == {"label": 2, "good": 6} and summary["without_caption"] == 6
    cfg = DataConfig(source="tfds:digits_table", label_key="label", classnames="tfds", caption_key=None,
                     caption_template=TEMPLATE, tfds_data_dir=str(tmp_path))
    batches, counts, _ = read_all(cfg, tokenizer)
    assert key_labels(batches) == corpus["table_labels"] and counts == {"good": 6}
    for b in batches:
        want = [TEMPLATE.format(NAMES[corpus["table_labels"][k]]) for k in b["__key__"]]
        np.testing.assert_array_equal(b["text"], tokenizer(want))


def test_bad_arguments_are_refused_by_name(corpus, tmp_path, capsys):
    out = str(tmp_path)
    cases = [
        (["--classnames", corpus["names"]], r"classnames='.*names.txt' needs label_key \(--label-key\)"),
        (["--no-captions"], r"caption_key=None \(--no-captions.*needs label_key \(--label-key\)"),
        (["--label-key", "cls", "--classnames", str(tmp_path / "none.txt")], "classnames file .*none.txt' does not"),
        (["--label-key", ""], "label_key='' is empty"),
        (["--label-key", "cls", "--no-captions", "--caption-list-key", "more"], "caption_list_key='more' asks"),
    ]
    for extra, message in cases:
        assert cli(["data", "convert", corpus["cls"], "--data-dir", out, "--name", "x", *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("clipjax data: error: ") and len(re.findall(message, err)) == 1, err
    with pytest.raises(ValueError, match=r"names \['one'\] occur more than once"):
        convert(corpus["cls"], out, "x", label_key="cls", classnames=["zero", "one", "one"])
    with pytest.raises(ValueError, match="classnames: expected a file or a non-empty sequence"):
        convert(corpus["cls"], out, "x", label_key="cls", classnames=["zero", ""])
    with pytest.raises(DataError, match=r"no usable example \({'label': 20, 'good': 0}; .*d000: no label "
                                        r"\(label_key='lbl'\).*nothing was written"):
        convert(corpus["cls"], out, "x", label_key="lbl")  # no member KEY.lbl, no .json
    assert not (tmp_path / "x").exists()  # so a corrected retry may use the name


def test_clipjax_eval_zeroshot_reads_a_converted_labelled_set(corpus, tmp_path, capsys, model_dir, model):
    """`clipjax eval zeroshot` on a set written by `clipjax data convert --label-key --classnames` (its images are
    stored encoded): the metrics equal the float64 oracle of tests/test_metrics_cli.py on the images decoded by
    PIL from the stored bytes, with the converted class names and clip_benchmark's cifar10 templates (1e-6)."""
    import io

    import tensorflow_datasets as tfds
    from PIL import Image
    from test_metrics_cli import _zeroshot_oracle

    out = str(tmp_path)
    run_cli(corpus["cls"], "--data-dir", out, "--name", "digits_eval", "--label-key", "cls", "--classnames",
            corpus["names"])
    capsys.readouterr()
    assert cli(["eval", "zeroshot", "--model", model_dir, "--dataset", "digits_eval", "--data-dir", out,
                "--split", "train", "--templates", "cifar10", "--no-progress"]) == 0
    res = json.loads(capsys.readouterr().out)
    source = tfds.builder("digits_eval", data_dir=out).as_data_source(split="train")
    rows = [source[i] for i in range(len(source))]
    images = [np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB")) for r in rows]
    want = _zeroshot_oracle(model, list(NAMES), images, [int(r["label"]) for r in rows])
    assert res["num_examples"] == len(corpus["good"]) and res["num_classes"] == len(NAMES)
    for k, v in want.items():
        assert res["metrics"][k] == pytest.approx(v, abs=1e-6), k
