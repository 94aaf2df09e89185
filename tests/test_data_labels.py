"""Labelled sources (`DataConfig.label_key`, `classnames`, `caption_template`): tar shards with `.cls`, tables
with a label column, tfds ClassLabel features.

Data: real handwritten digits (scikit-learn `load_digits`, 8x8 scaled to 16x16 RGB) with their real digit
labels, written as webdataset tar shards by `webdataset.TarWriter` (`.png`/`.jpg`, `.txt`, `.cls` as ASCII
integers with stray whitespace), as a CSV and a JSONL table over image files, and served as tfds `mnist` rows
through `tfds.testing.mock_data` (its real DatasetInfo: the ClassLabel names '0'..'9'). Bad labels are planted on
purpose ("x", "-1", one past the last class, a float, a boolean, a missing `.cls` / cell / key).

Expected values come from what was written (key -> label, the planted bad kinds), never from the pipeline;
captions made from a template are compared with the tokenizer applied to `template.format(name)` written out
here. Labels and token ids are integers: compared exactly (no tolerance).
"""

import json

import numpy as np
import pytest

from clipjax.data import DataConfig, DataError, make_batches, parse_label
from clipjax.data.sources import image_bytes
from clipjax.tokenizer import Tokenizer
from helpers import digit_images as digits, key_labels, read_all as _read_all

IMAGE, CONTEXT = 16, 16
NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATE = "This is a photo of a {}"
SHARDS, PER_SHARD = 2, 10
# planted bad `.cls` members (shard, index) -> bytes; None: no `.cls` member
BAD_CLS = {(0, 2): b"x", (0, 7): b"-1\n", (1, 4): b"10", (1, 8): None}


def read_all(config, tokenizer, batch=3, **kw):
    """`helpers.read_all` at this file's image size."""
    return _read_all(config, tokenizer, image_size=IMAGE, batch=batch, **kw)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Tar shards, tables, a class-name file, and what was planted in them."""
    import webdataset as wds

    root = tmp_path_factory.mktemp("labelled")
    images, labels = digits(SHARDS * PER_SHARD + 12)
    (root / "names.txt").write_text("\n".join(NAMES) + "\n")
    tar_labels, tar_captions = {}, {}
    for s in range(SHARDS):
        with wds.TarWriter(str(root / f"{s:03d}.tar")) as sink:
            for i in range(PER_SHARD):
                j, key = s * PER_SHARD + i, f"d{s:02d}{i:03d}"
                fmt = ("png", "PNG") if j % 2 else ("jpg", "JPEG")
                sample = {"__key__": key, fmt[0]: image_bytes(images[j], fmt[1]), "txt": f"handwritten {key}"}
                sample["cls"] = (f" {labels[j]}\n" if j % 3 else f"{labels[j]}").encode()
                if (s, i) in BAD_CLS:
                    if BAD_CLS[s, i] is None:
                        del sample["cls"]
                    else:
                        sample["cls"] = BAD_CLS[s, i]
                else:
                    tar_labels[key] = int(labels[j])
                tar_captions[key] = f"handwritten {key}"
                sink.write(sample)
    # tables over image files: 12 good rows, then planted bad labels
    (root / "img").mkdir()
    table_labels, csv_cells, json_values = {}, [], []
    offset = SHARDS * PER_SHARD
    for r in range(12):
        (root / "img" / f"{r}.png").write_bytes(image_bytes(images[offset + r], "PNG"))
        table_labels[str(r)] = int(labels[offset + r])
        csv_cells.append(str(labels[offset + r]) if r % 2 else f" {labels[offset + r]} ")
        json_values.append(int(labels[offset + r]) if r % 4 else str(labels[offset + r]))  # "7" is a label too
    csv_cells += ["x", "-1", "10", ""]
    json_values += ["x", -1, 10, 3.0, True, "missing"]
    with open(root / "table.csv", "w") as f:
        f.write("filepath,title,label\n")
        for r, cell in enumerate(csv_cells):
            f.write(f"img/{r % 12}.png,digit row {r},{cell}\n")
    with open(root / "table.jsonl", "w") as f:  # no caption column at all: captions come from the template
        for r, value in enumerate(json_values):
            row = {"filepath": f"img/{r % 12}.png"}
            if value != "missing":
                row["cls"] = value
            f.write(json.dumps(row) + "\n")
    return {"root": root, "shards": str(root / "{000..001}.tar"), "names": str(root / "names.txt"),
            "tar_labels": tar_labels, "tar_captions": tar_captions, "table_labels": table_labels,
            "csv_bad": 4, "jsonl_bad": 6}


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.openai(context_length=CONTEXT)


def test_parse_label_accepts_integers_only():
    """Stored labels as webdataset / CSV / JSON / tfds hold them; expectations written out by hand."""
    for raw, want in [(b"3", 3), (b" 7 \n", 7), ("12", 12), (5, 5), (np.int64(9), 9), (np.array(4), 4), ("0", 0)]:
        assert parse_label(raw) == (want, ""), raw
    for raw, why in [(None, "no label"), (b"", "no label"), ("x", "not an integer"), (b"3.5", "not an integer"),
                     (3.0, "not an integer"), (True, "boolean"), (b"-1", "negative"), (-2, "negative"),
                     (b"\xff", "not ASCII"), ("1 2", "not an integer")]:
        label, message = parse_label(raw)
        assert label is None and why in message, (raw, message)
    assert parse_label(b"2147483648")[0] is None and "int32" in parse_label(b"2147483648")[1]
    assert parse_label(9, num_classes=10) == (9, "")
    assert parse_label(10, num_classes=10)[0] is None and "number of class names (10)" in parse_label(10, 10)[1]


def test_tar_labels_match_what_was_written_every_example_once_bad_labels_counted(corpus, tokenizer):
    cfg = DataConfig(source=corpus["shards"], label_key="cls", classnames=corpus["names"])
    batches, counts, classnames = read_all(cfg, tokenizer)
    assert classnames == NAMES
    assert key_labels(batches) == corpus["tar_labels"]  # eval mode: each good example exactly once
    assert counts == {"label": len(BAD_CLS), "good": len(corpus["tar_labels"])}
    assert [len(b["__key__"]) for b in batches][-1] == len(corpus["tar_labels"]) % 3  # the last partial batch
    for b in batches:  # the source's own captions (.txt), tokenized
        np.testing.assert_array_equal(b["text"], tokenizer([corpus["tar_captions"][k] for k in b["__key__"]]))
        assert b["image"].shape == (len(b["__key__"]), IMAGE, IMAGE, 3) and b["image"].dtype == np.uint8
    # two processes: disjoint halves that together hold every labelled example once
    halves = [key_labels(read_all(cfg, tokenizer, batch=4, process_index=p, process_count=2)[0]) for p in range(2)]
    assert not set(halves[0]) & set(halves[1]) and {**halves[0], **halves[1]} == corpus["tar_labels"]
    # without class names the number of classes is unknown: "10" is a label, "x", "-1" and no .cls are not
    batches, counts, classnames = read_all(DataConfig(source=corpus["shards"], label_key="cls"), tokenizer)
    assert classnames is None and counts == {"label": 3, "good": len(corpus["tar_labels"]) + 1}
    assert key_labels(batches) == {**corpus["tar_labels"], "d01004": 10}
    # no label_key: the batches are as before, without `label`
    batches, counts, _ = read_all(DataConfig(source=corpus["shards"]), tokenizer)
    assert "label" not in batches[0] and counts == {"good": SHARDS * PER_SHARD}


@pytest.mark.parametrize("template,names_as", [(TEMPLATE, "file"), ("a blurry {c} digit", "file"),
                                               (TEMPLATE, "list")])
def test_template_captions_are_the_class_names_in_the_template(corpus, tokenizer, template, names_as):
    names = corpus["names"] if names_as == "file" else list(NAMES)  # the names themselves, as a config list
    cfg = DataConfig(source=corpus["shards"], label_key="cls", classnames=names, caption_template=template)
    batches, counts, classnames = read_all(cfg, tokenizer, batch=4)
    assert classnames == tuple(NAMES)
    assert key_labels(batches) == corpus["tar_labels"] and counts["label"] == len(BAD_CLS)
    written = template.replace("{c}", "{}")
    for b in batches:  # the .txt captions are not read
        want = [written.format(NAMES[corpus["tar_labels"][k]]) for k in b["__key__"]]
        np.testing.assert_array_equal(b["text"], tokenizer(want))


@pytest.mark.parametrize("table", ["csv", "jsonl"])
def test_tables_read_the_label_column(corpus, tokenizer, table):
    path = str(corpus["root"] / f"table.{table}")
    if table == "csv":  # captions from the title column
        cfg = DataConfig(source=path, label_key="label", classnames=corpus["names"])
    else:  # no caption column: captions from the template
        cfg = DataConfig(source=path, caption_key=None, label_key="cls", classnames=corpus["names"],
                         caption_template=TEMPLATE)
    batches, counts, _ = read_all(cfg, tokenizer, batch=5)
    assert key_labels(batches) == corpus["table_labels"]
    assert counts == {"label": corpus[f"{table}_bad"], "good": len(corpus["table_labels"])}
    for b in batches:
        want = ([f"digit row {k}" for k in b["__key__"]] if table == "csv"
                else [TEMPLATE.format(NAMES[corpus["table_labels"][k]]) for k in b["__key__"]])
        np.testing.assert_array_equal(b["text"], tokenizer(want))


class _Rows:
    """A tfds data source over given rows, with the real builder's DatasetInfo."""

    def __init__(self, info, rows):
        self.dataset_info, self.rows = info, rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def test_tfds_class_label_names_labels_and_template(tokenizer):
    """tfds `mnist` under `tfds.testing.mock_data` (its real DatasetInfo, ClassLabel names '0'..'9'), serving
    real digits as undecoded PNG bytes (what ArrayRecord data gives with SkipDecoding), two planted bad labels."""
    import tensorflow_datasets as tfds

    images, labels = digits(10)
    rows = [{"image": image_bytes(im[..., 0], "PNG"), "label": np.int64(y)} for im, y in zip(images, labels)]
    rows[3]["label"], rows[6]["label"] = np.int64(-1), np.int64(10)
    want = {str(i): int(y) for i, y in enumerate(labels) if i not in (3, 6)}
    with tfds.testing.mock_data(as_data_source_fn=lambda builder, split, **kw: _Rows(builder.info, rows)):
        cfg = DataConfig(source="tfds:mnist:train", label_key="label", classnames="tfds", caption_key=None,
                         caption_template="the number {}")
        batches, counts, classnames = read_all(cfg, tokenizer, batch=4)
        assert classnames == tuple(str(d) for d in range(10))
        assert key_labels(batches) == want and counts == {"label": 2, "good": 8}
        for b in batches:
            np.testing.assert_array_equal(b["text"], tokenizer([f"the number {want[k]}" for k in b["__key__"]]))
        with pytest.raises(DataError, match="feature 'id' of tfds dataset 'cifar10' is a Text, not a ClassLabel"):
            make_batches(DataConfig(source="tfds:cifar10:test", label_key="id", classnames="tfds",
                                    caption_key=None, caption_template="{}"), image_size=IMAGE, tokenizer=tokenizer,
                         batch_size=2)
        with pytest.raises(DataError, match="has no feature 'fine_label'"):
            make_batches(DataConfig(source="tfds:mnist", label_key="fine_label", caption_key=None,
                                    classnames="tfds", caption_template="{}"), image_size=IMAGE, tokenizer=tokenizer,
                         batch_size=2)


def test_resume_after_k_batches_gives_the_same_remaining_labels(corpus, tokenizer):
    """Training order (shuffled shards and windows): state saved after 2 batches, restored into a fresh iterator
    (also from a state saved before the `label` kind existed, with one count fewer)."""
    cfg = DataConfig(source=corpus["shards"], label_key="cls", classnames=corpus["names"], shuffle_buffer=5,
                     caption_template=TEMPLATE)
    make = lambda: make_batches(cfg, image_size=IMAGE, tokenizer=tokenizer, batch_size=4, seed=7)  # noqa: E731
    reference = make()
    want = [next(reference) for _ in range(7)]  # past the end of the first epoch
    reference.close()
    first = make()
    for _ in range(2):
        next(first)
    state = json.loads(json.dumps(first.get_state()))
    first.close()
    for saved in (state, dict(state, bad=state["bad"][:-1])):
        resumed = make()
        resumed.set_state(saved)
        got = [next(resumed) for _ in range(5)]
        resumed.close()
        for w, g in zip(want[2:], got):
            assert list(w["__key__"]) == list(g["__key__"])
            np.testing.assert_array_equal(w["label"], g["label"])
            np.testing.assert_array_equal(g["label"], [corpus["tar_labels"][k] for k in g["__key__"]])
            np.testing.assert_array_equal(w["text"], g["text"])


def test_a_grain_worker_gives_the_same_labels(corpus, tokenizer):
    path = str(corpus["root"] / "table.csv")
    inline = read_all(DataConfig(source=path, label_key="label", classnames=corpus["names"]), tokenizer, batch=5)
    worker = read_all(DataConfig(source=path, label_key="label", classnames=corpus["names"], num_workers=1),
                      tokenizer, batch=5)
    assert key_labels(worker[0]) == corpus["table_labels"] and worker[1] == inline[1]
    for a, b in zip(inline[0], worker[0], strict=True):
        assert list(a["__key__"]) == list(b["__key__"])
        np.testing.assert_array_equal(a["label"], b["label"])
        np.testing.assert_array_equal(a["text"], b["text"])


def test_too_many_bad_labels_stop_the_run(corpus, tokenizer):
    cfg = DataConfig(source=corpus["shards"], label_key="cls", classnames=corpus["names"], max_bad_fraction=0.0,
                     bad_check_after=4)
    it = make_batches(cfg, image_size=IMAGE, tokenizer=tokenizer, batch_size=4, train=False)
    with pytest.raises(DataError, match=r"were bad \({'label': \d+, 'good': \d+}\), more than max_bad_fraction=0.0"):
        for _ in range(10):
            next(it)
    it.close()


def test_bad_configs_are_refused_by_name(corpus, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="caption_template=.* needs label_key and classnames"):
        DataConfig(source="x.tar", caption_template=TEMPLATE)
    with pytest.raises(ValueError, match="needs classnames"):
        DataConfig(source="x.tar", label_key="cls", caption_template=TEMPLATE)
    with pytest.raises(ValueError, match="caption_key=None .*neither a caption nor a template"):
        DataConfig(source="x.csv", caption_key=None, label_key="label")
    with pytest.raises(ValueError, match="caption_key='caption' asks to read them"):
        DataConfig(source="x.csv", caption_key="caption", label_key="y", classnames="n.txt", caption_template="{}")
    with pytest.raises(ValueError, match="caption_list_key='captions'"):
        DataConfig(source="x.tar", caption_list_key="captions", label_key="cls", classnames="n", caption_template="{}")
    with pytest.raises(ValueError, match=r"must hold the class name as \{\}, \{0\} or \{c\}.*\['name'\]"):
        DataConfig(source="x.tar", label_key="cls", classnames="n.txt", caption_template="a {name}")
    with pytest.raises(ValueError, match="cannot be filled with a class name"):
        DataConfig(source="x.tar", label_key="cls", classnames="n.txt", caption_template="{} and {0}")
    with pytest.raises(ValueError, match="found fields \\[\\]"):
        DataConfig(source="x.tar", label_key="cls", classnames="n.txt", caption_template="a photo")
    with pytest.raises(ValueError, match="classnames='names.txt' needs label_key"):
        DataConfig(source="x.tar", classnames="names.txt")
    with pytest.raises(ValueError, match="classnames='tfds' .* source='x.tar' is not a tfds:NAME source"):
        DataConfig(source="x.tar", label_key="cls", classnames="tfds")
    with pytest.raises(ValueError, match="label_key='' is empty"):
        DataConfig(source="x.tar", label_key="")
    for bad in ([], ["zero", ""], ("zero", 1)):
        with pytest.raises(ValueError, match="classnames: expected a non-empty sequence of non-empty strings"):
            DataConfig(source="x.tar", label_key="cls", classnames=bad)
    read = lambda **kw: make_batches(DataConfig(**kw), image_size=IMAGE, tokenizer=tokenizer, batch_size=2)  # noqa
    (tmp_path / "gap.txt").write_text("zero\n\ntwo\n")
    with pytest.raises(DataError, match="gap.txt': line 2 is empty"):
        read(source=corpus["shards"], label_key="cls", classnames=str(tmp_path / "gap.txt"))
    with pytest.raises(DataError, match="classnames file .*nothing.txt' does not exist"):
        read(source=corpus["shards"], label_key="cls", classnames=str(tmp_path / "nothing.txt"))
    with pytest.raises(DataError, match=r"no column\(s\) \['filepath', 'title', 'class'\]"):
        read(source=str(corpus["root"] / "table.csv"), label_key="class")
    with pytest.raises(DataError, match="no row has the label key 'label'"):
        read(source=str(corpus["root"] / "table.jsonl"), caption_key=None, label_key="label",
             classnames=corpus["names"], caption_template=TEMPLATE)
