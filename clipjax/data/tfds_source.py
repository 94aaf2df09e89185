"""tensorflow-datasets as a random-access source, and `clipjax data convert` into ArrayRecord.

Reading (`tfds:NAME[:SPLIT]`, e.g. `tfds:coco_captions:train`, `tfds:laion_part:train[:1%]`)
goes through `tfds.data_source` (ArrayRecord files, random access, no TensorFlow). Image features
are read undecoded (`tfds.decode.SkipDecoding`) so the pipeline's own JPEG decode runs in its
workers; a caption feature may be a string or a sequence of strings (several captions: LaCLIP
sampling draws one per epoch), nested features are written as paths (`captions/text`).
`TFDS_DATA_DIR` or `data_dir` says where prepared data lives.

Labels (`label_key`, e.g. `label` of `imagenet2012`, `mnist`, `cifar10`): an integer feature, read
as stored (records carry `label`; the pipeline range-checks it). `class_names()` gives the names of
a `ClassLabel` label feature (the data config's `classnames="tfds"`). Classification datasets have
no caption feature: `caption_key=None` reads none (the pipeline makes captions from a template).

Converting: `convert(source_spec, data_dir, name)` reads any tar-shard or table source
(`clipjax.data.sources`) and writes the tfds dataset NAME (read back as `tfds:NAME`): features `image`
(the encoded bytes, unchanged), `captions` (all captions), `key`. Bad examples are left out and
counted in the returned summary. The builder needs no TensorFlow (the image is stored as bytes,
not a `tfds.features.Image`).

Labelled sources (`convert(..., label_key="cls", classnames="names.txt")`, e.g. ImageNet-style tar
shards with `KEY.cls`, or `{"label": 3}` in `KEY.json`, or a table's label column) gain the feature
`label`: a tfds `ClassLabel` holding the class names when `classnames` is given (read back with
`DataConfig(source="tfds:NAME", label_key="label", classnames="tfds")`), an int64 scalar otherwise.
An example whose label is missing, not an integer, negative or (with class names) not below their
number is left out and counted as kind `label` (`clipjax.data.pipeline.parse_label`). In a labelled
dataset captions are optional: an example without one is kept and stored with an empty `captions`
sequence (the summary counts them as `without_caption`); `caption_key=None` reads no captions at all
(every `captions` is empty). Such examples are read back with `caption_key=None` and a
`caption_template` (captions made from the class names); read with the `captions` feature, the
pipeline counts each one as `missing_caption`.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np

from clipjax.data import sources as S
from clipjax.data.errors import DataError


def _field(row: dict, name: str):
    """`row[name]`, or a nested feature written as a path (`captions/text` in coco_captions)."""
    if name in row:
        return row[name]
    value = row
    for part in name.split("/"):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(name)
        value = value[part]
    return value


def _has_field(features: dict, name: str) -> bool:
    head = name.split("/")[0]
    return name in features or head in features


def _text(v) -> str:
    return v.decode("utf-8") if isinstance(v, (bytes, np.bytes_)) else str(v)


@dataclass(frozen=True)
class TfdsSource:
    """A prepared tfds split read by index: `record(i)` gives a raw record (`clipjax.data.sources`)."""

    name: str
    split: str
    data_dir: str | None
    image_key: str
    caption_key: str | None  # None: the dataset has no captions (none read, none required)
    key_feature: str | None
    label_key: str | None = None  # an integer feature (a ClassLabel for `class_names`)

    @classmethod
    def from_spec(cls, spec: str, image_key: str = "image", caption_key: str | None = "captions",
                  data_dir: str | None = None, label_key: str | None = None) -> "TfdsSource":
        parts = spec[len("tfds:"):].split(":", 1)
        name, split = parts[0], (parts[1] if len(parts) > 1 else "train")
        if not name:
            raise DataError(f"source {spec!r}: expected tfds:NAME[:SPLIT]")
        # open_clip's table defaults (filepath / title) mean nothing here: use tfds' feature names
        image_key = "image" if image_key == "filepath" else image_key
        caption_key = "captions" if caption_key == "title" else caption_key
        src = cls(name, split, data_dir or os.environ.get("TFDS_DATA_DIR"), image_key, caption_key, None)
        features = src._info_features()
        for k in (image_key, caption_key, label_key):
            if k and not _has_field(features, k):
                raise DataError(f"tfds dataset {name!r} has no feature {k!r}; features: {sorted(features)} "
                                "(set the image / caption / label keys of the data config)")
        key_feature = next((k for k in ("key", "__key__", "id", "image/id") if k in features), None)
        out = cls(name, split, src.data_dir, image_key, caption_key, key_feature, label_key)
        object.__setattr__(out, "_cached", src._data)  # the data source opened above, not opened again
        return out

    def _info_features(self) -> dict:
        return dict(self._data.dataset_info.features)

    def class_names(self) -> tuple[str, ...]:
        """The names of the label feature's classes, in label order; it must be a tfds `ClassLabel`."""
        import tensorflow_datasets as tfds

        if not self.label_key:
            raise ValueError("classnames='tfds' needs label_key: the tfds ClassLabel feature to read the names of")
        feature: Any = self._info_features()
        for part in ([self.label_key] if self.label_key in feature else self.label_key.split("/")):
            feature = feature[part]
        if not isinstance(feature, tfds.features.ClassLabel):
            raise DataError(f"classnames='tfds': feature {self.label_key!r} of tfds dataset {self.name!r} is a "
                            f"{type(feature).__name__}, not a ClassLabel, so it has no class names; give "
                            "classnames as a file (one name per line, in label order)")
        return tuple(str(n) for n in feature.names)

    @property
    def _data(self):
        cached = self.__dict__.get("_cached")
        if cached is None:
            import tensorflow_datasets as tfds

            try:
                cached = tfds.data_source(self.name, split=self.split, data_dir=self.data_dir, download=False,
                                          decoders={self.image_key: tfds.decode.SkipDecoding()})
            except Exception as e:  # noqa: BLE001 - tfds raises many kinds; the message says what was asked
                raise DataError(f"tfds dataset {self.name!r} split {self.split!r} cannot be read from data_dir "
                                f"{self.data_dir!r} ({type(e).__name__}: {e}); prepare it first (tfds build, "
                                "or `clipjax data convert`)") from None
            object.__setattr__(self, "_cached", cached)  # frozen dataclass: a cache, not a field
        return cached

    def __getstate__(self):  # workers re-open the files themselves
        d = dict(self.__dict__)
        d.pop("_cached", None)
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)

    def __len__(self) -> int:
        return len(self._data)

    def key(self, i: int) -> str:
        return str(i)

    def record(self, i: int) -> dict:
        row = self._data[i]
        key = _text(row[self.key_feature]) if self.key_feature else str(i)
        caps = []
        if self.caption_key is not None:
            try:
                caps = _field(row, self.caption_key)
            except KeyError:
                return S.bad_record(key, "missing_caption", f"tfds {self.name} row {i} has no {self.caption_key!r}")
            caps = [_text(caps)] if isinstance(caps, (bytes, str, np.bytes_)) else [_text(c) for c in np.ravel(caps)]
            caps = [c.strip() for c in caps if c.strip()]
        image = row.get(self.image_key)
        if isinstance(image, (bytes, np.bytes_)):
            image = bytes(image)
        if image is None or (isinstance(image, bytes) and not image):
            return S.bad_record(key, "missing_image", f"tfds {self.name} row {i} has no image")
        if self.caption_key is not None and not caps:
            return S.bad_record(key, "missing_caption", f"tfds {self.name} row {i} has no caption")
        rec = {"key": key, "image": image, "captions": caps, "bad": None, "why": ""}
        if self.label_key:
            try:
                rec["label"] = _field(row, self.label_key)
            except KeyError:
                rec["label"] = None
        return rec


def _builder_class(dataset_name: str):
    import tensorflow_datasets as tfds

    class ClipjaxImageText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """Image-text pairs converted by `clipjax data convert` (read back by name, from its files)."""

        VERSION = tfds.core.Version("1.0.0")
        name = dataset_name
        code_path = None  # tfds' lookup of the builder's source file fails for editable installs; not needed

        def __init__(self, *, source: str = "", caption_list_key: str | None = None, img_key: str = "filepath",
                     caption_key: str | None = "title", label_key: str | None = None,
                     classnames: tuple[str, ...] | None = None, **kwargs: Any):
            self._source, self._caption_list_key = source, caption_list_key
            self._img_key, self._caption_key = img_key, caption_key
            self._label_key, self._classnames = label_key, classnames
            self.summary: dict = {}
            super().__init__(**kwargs)

        def _info(self):
            features = {"image": tfds.features.Tensor(shape=(), dtype=np.object_),
                        "captions": tfds.features.Sequence(tfds.features.Text()),
                        "key": tfds.features.Text()}
            if self._label_key:
                features["label"] = (tfds.features.ClassLabel(names=self._classnames) if self._classnames
                                     else tfds.features.Scalar(dtype=np.int64))
            about = f" (label from {self._label_key!r})" if self._label_key else ""
            return tfds.core.DatasetInfo(builder=self, description=f"converted by clipjax from {self._source}{about}",
                                         features=tfds.features.FeaturesDict(features))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            from clipjax.data.errors import KINDS
            from clipjax.data.pipeline import parse_label

            counts = dict.fromkeys(KINDS, 0)
            counts["good"] = 0
            self.summary = {"counts": counts, "without_caption": 0, "why": {}}
            num_classes = len(self._classnames) if self._classnames else None
            for rec in _raw_records(self._source, self._img_key, self._caption_key, self._caption_list_key,
                                    self._label_key):
                bad, why = rec["bad"], rec["why"]
                if bad is None and self._label_key:
                    label, why = parse_label(rec.get("label"), num_classes)
                    bad = None if label is not None else "label"
                    why = f"{rec['key']}: {why} (label_key={self._label_key!r})" if bad else why
                if bad is not None:
                    counts[bad] += 1
                    self.summary["why"].setdefault(bad, why)  # the first reason of each kind
                    continue
                counts["good"] += 1
                image = rec["image"]
                if not isinstance(image, bytes):
                    image = S.image_bytes(image, "PNG")
                example = {"image": image, "captions": rec["captions"], "key": rec["key"]}
                if self._label_key:
                    example["label"] = label
                    self.summary["without_caption"] += not rec["captions"]
                yield rec["key"], example

    return ClipjaxImageText


def _raw_records(spec: str, img_key: str, caption_key: str | None, caption_list_key: str | None,
                 label_key: str | None = None):
    """Raw records of a tar-shard or table source; with `label_key`, captions are optional."""
    if spec.endswith((".csv", ".tsv", ".jsonl")):
        table = S.Table.read(spec, img_key, caption_key, caption_list_key, label_key=label_key)
        if label_key:
            table = replace(table, needs_captions=False)
        for i in range(len(table)):
            yield table.record(i)
        return
    for path in S.expand_shards(spec):
        yield from S.iter_tar(path, caption_list_key=caption_list_key, label_key=label_key,
                              read_captions=caption_key is not None, require_captions=not label_key)


def _check_convert_args(name: str, caption_key: str | None, caption_list_key: str | None, label_key: str | None,
                        classnames) -> tuple[str, ...] | None:
    """Refuse bad `convert` arguments by name; the class names (read from their file), or None."""
    if not name or not name.replace("_", "").isalnum() or not name[0].isalpha() or name != name.lower():
        raise ValueError(f"dataset name {name!r}: expected lower-case letters, digits and '_', starting with a letter")
    if label_key == "":
        raise ValueError("label_key='' is empty; give the tar member extension / JSON key / column of the label, "
                         "or None")
    if classnames is not None and not label_key:
        raise ValueError(f"classnames={classnames!r:.200} needs label_key (--label-key): where each example's class "
                         "index is (the tar member extension such as cls, a JSON key or a table column)")
    if caption_key is None and not label_key:
        raise ValueError("caption_key=None (--no-captions: the source has no captions) needs label_key (--label-key): "
                         "an example with neither a caption nor a label is of no use")
    if caption_key is None and caption_list_key is not None:
        raise ValueError(f"caption_key=None reads no captions, but caption_list_key={caption_list_key!r} asks for "
                         "extra ones; set one of them")
    if classnames is None:
        return None
    names = S.read_classnames(classnames) if isinstance(classnames, (str, os.PathLike)) else tuple(classnames)
    if not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise ValueError(f"classnames: expected a file or a non-empty sequence of non-empty strings (one per "
                         f"label), got {classnames!r:.200}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"classnames {classnames!r:.200}: names {repeated[:5]} occur more than once; a tfds "
                         "ClassLabel needs each class name once")
    return names


def convert(source: str, data_dir: str, name: str, *, img_key: str = "filepath", caption_key: str | None = "title",
            caption_list_key: str | None = None, label_key: str | None = None,
            classnames: str | Sequence[str] | None = None) -> dict:
    """Write `source` (tar shards or a table) as the tfds dataset `name` under `data_dir/name`.

    Args:
      source: tar shard pattern or CSV/TSV/JSONL table (`clipjax.data.sources`).
      data_dir, name: the tfds data_dir to write into and the dataset name (read back as `tfds:NAME`).
      img_key, caption_key, caption_list_key: table columns / JSON keys, as in `DataConfig`;
        `caption_key=None`: the source has no captions (needs `label_key`; every `captions` is empty).
      label_key: where each example's class index is (tar member `KEY.<label_key>`, else that key of
        `KEY.json`; the table column / JSON key): the dataset gains the feature `label`, and captions
        become optional (see the module docstring). None: no labels.
      classnames: a class-name file (one name per line, in label order) or the names themselves:
        `label` becomes a tfds `ClassLabel` with these names and labels must be below their number.
        Needs `label_key`.

    Returns a summary: the `tfds:` spec to read it with, its data_dir, the examples kept and left
    out by kind (`counts`), the first reason of each kind left out (`why`) and, for a labelled
    source, `label` (`{"feature": "ClassLabel", "num_classes": C}` or `{"feature": "int64"}`) and
    `without_caption` (kept examples stored with no caption). Refuses a data_dir/name that already holds a dataset.
    """
    import tensorflow_datasets as tfds

    names = _check_convert_args(name, caption_key, caption_list_key, label_key, classnames)
    target = os.path.join(data_dir, name)
    if os.path.exists(target) and os.listdir(target):
        raise FileExistsError(f"{target} already holds data; choose another --name or --data-dir")
    builder = _builder_class(name)(source=source, caption_list_key=caption_list_key, img_key=img_key,
                                   caption_key=caption_key, label_key=label_key, classnames=names,
                                   data_dir=data_dir, file_format="array_record")
    try:
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(verify_ssl=False))
    except AssertionError:  # tfds refuses a split without examples ("No examples were yielded"): said below
        if builder.summary.get("counts", {}).get("good"):
            raise
    counts = {k: v for k, v in builder.summary["counts"].items() if v or k == "good"}
    if not counts.get("good"):
        shutil.rmtree(target, ignore_errors=True)  # empty before this call: an empty dataset would block a retry
        raise DataError(f"{source}: no usable example ({counts}; first reasons: {builder.summary['why']}); nothing "
                        f"was written to {target}")
    out = {"source": f"tfds:{name}:train", "data_dir": data_dir, "counts": counts, "why": builder.summary["why"]}
    if label_key:
        out["label"] = {"feature": "ClassLabel", "num_classes": len(names)} if names else {"feature": "int64"}
        out["without_caption"] = builder.summary["without_caption"]
    return out
