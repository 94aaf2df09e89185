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
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

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
                     caption_key: str = "title", **kwargs: Any):
            self._source, self._caption_list_key = source, caption_list_key
            self._img_key, self._caption_key = img_key, caption_key
            self.summary: dict = {}
            super().__init__(**kwargs)

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, description=f"converted by clipjax from {self._source}",
                                         features=tfds.features.FeaturesDict({
                                             "image": tfds.features.Tensor(shape=(), dtype=np.object_),
                                             "captions": tfds.features.Sequence(tfds.features.Text()),
                                             "key": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            from clipjax.data.errors import KINDS

            counts = dict.fromkeys(KINDS, 0)
            counts["good"] = 0
            self.summary = counts
            for rec in _raw_records(self._source, self._img_key, self._caption_key, self._caption_list_key):
                if rec["bad"] is not None:
                    counts[rec["bad"]] += 1
                    continue
                counts["good"] += 1
                image = rec["image"]
                if not isinstance(image, bytes):
                    image = S.image_bytes(image, "PNG")
                yield rec["key"], {"image": image, "captions": rec["captions"], "key": rec["key"]}

    return ClipjaxImageText


def _raw_records(spec: str, img_key: str, caption_key: str, caption_list_key: str | None):
    if spec.endswith((".csv", ".tsv", ".jsonl")):
        table = S.Table.read(spec, img_key, caption_key, caption_list_key)
        for i in range(len(table)):
            yield table.record(i)
        return
    for path in S.expand_shards(spec):
        yield from S.iter_tar(path, caption_list_key=caption_list_key)


def convert(source: str, data_dir: str, name: str, *, img_key: str = "filepath", caption_key: str = "title",
            caption_list_key: str | None = None) -> dict:
    """Write `source` (tar shards or a table) as the tfds dataset `name` under `data_dir/name`.

    Returns a summary: the `tfds:` spec to read it with, its data_dir, and the examples kept and
    left out by kind. Refuses a data_dir/name that already holds a dataset.
    """
    import tensorflow_datasets as tfds

    if not name or not name.replace("_", "").isalnum() or not name[0].isalpha() or name != name.lower():
        raise ValueError(f"dataset name {name!r}: expected lower-case letters, digits and '_', starting with a letter")
    target = os.path.join(data_dir, name)
    if os.path.exists(target) and os.listdir(target):
        raise FileExistsError(f"{target} already holds data; choose another --name or --data-dir")
    builder = _builder_class(name)(source=source, caption_list_key=caption_list_key, img_key=img_key,
                                   caption_key=caption_key, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(verify_ssl=False))
    summary = {k: v for k, v in builder.summary.items() if v or k == "good"}
    if not summary.get("good"):
        raise DataError(f"{source}: no usable example ({summary})")
    return {"source": f"tfds:{name}:train", "data_dir": data_dir, "counts": summary}
