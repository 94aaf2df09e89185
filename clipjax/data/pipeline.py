"""grain input pipelines: deterministic, resumable, multi-host batches for the trainer and `clipjax embed`.

`make_batches(DataConfig(source=...), ...)` returns `Batches`, an iterator of this process's batches

    {"image": uint8 [b, S, S, 3], "text": int32 [b, L], "__key__": str [b]}

plus `"label": int32 [b]` (class indices, in [0, C) when the C class names are known) when the
config names a `label_key` (`b` = global batch / process count; `__key__` is bookkeeping the
trainer does not send to devices), with `get_state()` / `set_state()` for the trainer's
checkpoints and `classnames` (the C class names in label order, or None) for class text embeddings.

Labels. `label_key` names where each example's class index is stored: the tar member
`KEY.<label_key>` (webdataset's `cls`: an ASCII integer, surrounding whitespace allowed), the table
column / JSON key, or the tfds integer feature (a `ClassLabel`). `classnames` is a text file of
class names, one per line in label order, or `"tfds"` for the names of the tfds ClassLabel. A
classification source without captions (ImageNet) sets `caption_template` (TeCoA trains with
`"This is a photo of a {}"`): every caption is `caption_template.format(classnames[label])`.

Order. Random-access sources (tables, tfds) are read in a global order: a grain `MapDataset`
shuffle of all indices, reshuffled every epoch (`shuffle(seed).repeat()`); process `p` of `n`
reads positions `p, p + n, p + 2n, ...` of that order, so the processes read disjoint examples and
together one epoch exactly once. Streamed sources (tar shards) shuffle the shard list every epoch,
give process `p` the shards at positions `p::n`, interleave `cycle_length` shards at once and
shuffle examples in windows of `shuffle_buffer` (grain's `WindowShuffleIterDataset`). With
`num_workers` > 0, grain's `mp_prefetch` runs decode, augmentation and tokenisation in worker
processes, each on its slice of the examples (or shards), in a fixed round-robin order.

Randomness. Each example's augmentation and its caption (LaCLIP: one of several, per epoch) come
from a generator seeded by `(seed, epoch, key)` alone, so they do not depend on process or worker
counts, and a resumed run draws what the uninterrupted run drew.

State. The state of every stage (grain's own, plus the readers' positions and the bad-data
counters here) is a JSON-able dict: restored in a new process, the next batches equal the ones an
uninterrupted iterator would have given. It is per process: a run resumes with the process count
that saved it (the trainer says so when it differs).

Bad data. An example that cannot be read, decoded or captioned, or whose label is missing, not an
integer, negative or not below the number of class names (kind `label`), is skipped and counted by
kind (`clipjax.data.errors.KINDS`); the counts come with the training
metrics (`bad_counts()`). Once at least `bad_check_after` examples were seen, a skipped fraction
above `max_bad_fraction` stops the run with `DataError` naming the counts and the latest reasons.
"""

from __future__ import annotations

import re
import string
import zlib
from dataclasses import dataclass
from typing import Any, Callable

import grain
import jax
import numpy as np

from clipjax.data import sources as S
from clipjax.data.errors import KINDS, BadExample, DataError

KEY = "__key__"
_SKIPPED = "_skipped"
# the kinds counted here: the readers' and transforms' kinds, and examples whose label is unusable
_TEMPLATE_FIELDS = ("", "0", "c")  # `{}`, `{0}` or `{c}`: the class name


@dataclass(frozen=True)
class DataConfig:
    """Where the data comes from and how it is read (the model and run give size, batch and seed).

    Attributes:
      source: a source spec (`clipjax.data.sources`): tar shard pattern, CSV/TSV/JSONL path or `tfds:NAME[:SPLIT]`.
      img_key, caption_key: table columns / JSON keys (open_clip's `--csv-img-key`, `--csv-caption-key`);
        for tfds the feature names. `caption_key=None`: the source has no captions (needs `caption_template`).
      caption_list_key: JSON key or column holding extra captions (LaCLIP); one caption is drawn per epoch.
      label_key: where the class index is (batches gain `label` int32 [b]): the tar member extension
        (`cls`: an ASCII integer; without that member, the key `label_key` of the example's `KEY.json`),
        the table column / JSON key, or the tfds integer feature (`label`).
        A missing or unusable label (not an integer, negative, >= the number of classnames) makes the
        example bad (kind `label`). None: no labels.
      classnames: a UTF-8 text file of class names, one per line in label order (`Batches.classnames`),
        the names themselves (a tuple or list of strings, e.g. `clipjax.metrics.get_classnames("imagenet1k")`),
        or `"tfds"`: the names of the tfds ClassLabel feature `label_key`. Needs `label_key`.
      caption_template: every example's caption is `caption_template.format(classnames[label])` (`{}`,
        `{0}` or `{c}` stands for the name; TeCoA: `"This is a photo of a {}"`); the source's own
        captions are not read. Needs `label_key` and `classnames`; `caption_key` must be None or left
        at its default, `caption_list_key` None.
      image_root: folder that relative table image paths are resolved against (default: the table's folder).
      shuffle_buffer: streamed sources: examples per shuffle window (1: no example shuffle).
      cycle_length: streamed sources: shards read at once (per worker).
      num_workers: grain worker processes (0: decode in this process).
      worker_buffer: batches each worker prepares ahead.
      max_bad_fraction: stop when more than this fraction of examples was skipped as bad ...
      bad_check_after: ... once at least this many examples were seen.
      keep_keys: a `clipjax curate --out` folder; only the keys it kept are read.
      tfds_data_dir: where `tfds:` sources are prepared (default: `TFDS_DATA_DIR`, else tfds' own default).
      dct_downscale: decode large JPEGs at 1/2, 1/4 or 1/8 scale in the DCT domain when that still
        leaves the crop at least the model's size (faster; not bit-identical to a full decode).
      augment: the train-time augmentation (`clipjax.data.transforms.AugmentConfig`, open_clip's).
    """

    source: str
    img_key: str = "filepath"
    caption_key: str | None = "title"
    caption_list_key: str | None = None
    label_key: str | None = None
    classnames: str | tuple[str, ...] | None = None
    caption_template: str | None = None
    image_root: str | None = None
    shuffle_buffer: int = 2000
    cycle_length: int = 4
    num_workers: int = 0
    worker_buffer: int = 2
    max_bad_fraction: float = 0.01
    bad_check_after: int = 1000
    keep_keys: str | None = None
    tfds_data_dir: str | None = None
    dct_downscale: bool = True
    augment: Any = None

    def __post_init__(self):
        if not 0 <= self.max_bad_fraction <= 1:
            raise ValueError(f"max_bad_fraction={self.max_bad_fraction} must be in [0, 1]")
        for name in ("shuffle_buffer", "cycle_length", "worker_buffer", "bad_check_after"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.num_workers < 0:
            raise ValueError(f"num_workers={self.num_workers} must be >= 0")
        if isinstance(self.classnames, (list, tuple)):
            names = tuple(self.classnames)
            if not names or not all(isinstance(n, str) and n.strip() for n in names):
                raise ValueError(f"classnames: expected a non-empty sequence of non-empty strings (one per label), "
                                 f"got {self.classnames!r:.200}")
            object.__setattr__(self, "classnames", names)  # hashable and picklable for grain workers
        for name in ("label_key", "classnames", "caption_template"):
            if getattr(self, name) == "":
                raise ValueError(f"{name}='' is empty; give a value or None")
        if self.caption_template is not None:
            missing = [n for n in ("label_key", "classnames") if getattr(self, n) is None]
            if missing:
                raise ValueError(f"caption_template={self.caption_template!r} makes captions from class names: it "
                                 f"needs {' and '.join(missing)} (label_key: where the label is; classnames: a file "
                                 "of names, or 'tfds')")
            if self.caption_key not in (None, "title"):
                raise ValueError(f"caption_template={self.caption_template!r} replaces the source's captions, but "
                                 f"caption_key={self.caption_key!r} asks to read them; set caption_key=None")
            if self.caption_list_key is not None:
                raise ValueError(f"caption_template={self.caption_template!r} replaces the source's captions, but "
                                 f"caption_list_key={self.caption_list_key!r} asks to read extra ones; set it to None")
            check_template(self.caption_template)
        elif self.caption_key is None:
            raise ValueError("caption_key=None (the source has no captions) needs caption_template, e.g. "
                             "'This is a photo of a {}', with label_key and classnames: there is neither a caption "
                             "nor a template")
        if self.classnames is not None and self.label_key is None:
            raise ValueError(f"classnames={self.classnames!r} needs label_key (where each example's class index is)")
        if self.classnames == "tfds" and not self.source.startswith("tfds:"):
            raise ValueError(f"classnames='tfds' reads a tfds ClassLabel's names, but source={self.source!r} is not "
                             "a tfds:NAME source; give classnames as a file (one name per line, in label order)")


def check_template(template: str) -> None:
    """Refuse a caption template whose fields are not all the class name (`{}`, `{0}` or `{c}`)."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise ValueError(f"caption_template={template!r} is not a format string ({e})") from None
    if not fields or any(f not in _TEMPLATE_FIELDS for f in fields):
        raise ValueError(f"caption_template={template!r} must hold the class name as {{}}, {{0}} or {{c}} (and no "
                         f"other field); found fields {fields}")
    try:  # what parsing lets through and formatting refuses: `{}` beside `{0}`, a bad conversion or format spec
        caption_from_template(template, "name")
    except (ValueError, IndexError, KeyError) as e:
        raise ValueError(f"caption_template={template!r} cannot be filled with a class name ({e})") from None


def caption_from_template(template: str, name: str) -> str:
    """`template` with the class name put in for `{}`, `{0}` or `{c}`."""
    return template.format(name, c=name)


_INTEGER = re.compile(r"-?[0-9]+")
_LABEL_MAX = int(np.iinfo(np.int32).max)  # batches hold int32 labels


def parse_label(raw, num_classes: int | None = None) -> tuple[int | None, str]:
    """A stored label -> `(class index, "")`, or `(None, why)` when it is missing or unusable.

    `raw`: a Python/numpy integer, a 0-d integer array, or text / ASCII bytes holding a decimal
    integer with optional surrounding whitespace (webdataset's `.cls`, a CSV cell). Floats and
    booleans are not labels. The index must be >= 0, fit int32 and, when `num_classes` is known, be
    < num_classes.
    """
    if raw is None:
        return None, "no label"
    value = None
    if isinstance(raw, np.ndarray) and raw.ndim == 0:
        raw = raw[()]
    if isinstance(raw, (bytes, np.bytes_)):
        try:
            raw = bytes(raw).decode("ascii")
        except UnicodeDecodeError:
            return None, f"label {bytes(raw)[:40]!r} is not ASCII text"
    if isinstance(raw, str) and not raw.strip():
        return None, "no label (empty)"
    if isinstance(raw, (bool, np.bool_)):
        return None, f"label {raw!r} is a boolean, not a class index"
    if isinstance(raw, (int, np.integer)):
        value = int(raw)
    elif isinstance(raw, str) and _INTEGER.fullmatch(raw.strip()):
        value = int(raw.strip())
    if value is None:
        return None, f"label {str(raw)[:40]!r} is not an integer"
    if value < 0:
        return None, f"label {value} is negative"
    if num_classes is not None and value >= num_classes:
        return None, f"label {value} is not below the number of class names ({num_classes})"
    if value > _LABEL_MAX:
        return None, f"label {value} does not fit int32"
    return value, ""


def example_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    """The generator of one example's randomness in one epoch: a function of (seed, epoch, key) only."""
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch, zlib.crc32(key.encode("utf-8"))])


# ----------------------------------------------------------------------------- per-example stages

@dataclass(frozen=True)
class _ReadRow:
    """(position, index) of a random-access source -> raw record with its epoch."""

    source: Any
    length: int

    def __call__(self, position: int, index: int) -> dict:
        rec = self.source.record(int(index))
        rec["epoch"] = position // self.length
        return rec


@dataclass(frozen=True)
class _ToExample:
    """Raw record -> `{"image": uint8 [S, S, 3], "caption": str, KEY: str[, "label": int]}`, a
    `("bad", kind, why)` tuple, or None when curation did not keep the key. With `label_key`, the
    record's label is parsed first (`parse_label`, in [0, len(classnames)) when names are known)."""

    image_size: int
    seed: int
    train: bool
    dct: bool
    augment: Any
    keep: frozenset | None
    resize_mode: str = "shortest"
    label_key: str | None = None
    classnames: tuple | None = None
    caption_template: str | None = None

    def __call__(self, rec: dict):
        from clipjax.data import transforms as T

        key = rec["key"]
        if self.keep is not None and key not in self.keep:
            return None
        if rec["bad"] is not None:
            return ("bad", rec["bad"], rec["why"])
        label = None
        if self.label_key is not None:
            label, why = parse_label(rec.get("label"), None if self.classnames is None else len(self.classnames))
            if label is None:
                return ("bad", "label", f"{key}: {why} (label_key={self.label_key!r})")
        rng = example_rng(self.seed, rec.get("epoch", 0), key)
        captions = rec["captions"]
        if self.caption_template is not None:
            caption = caption_from_template(self.caption_template, self.classnames[label])
        else:
            caption = captions[int(rng.integers(len(captions)))] if self.train and len(captions) > 1 else captions[0]
        image = rec["image"]
        try:
            if isinstance(image, np.ndarray):  # decoded already (tfds Image features)
                image = (T.train_transform(image, self.image_size, rng, self.augment) if self.train else
                         T.eval_transform(image, self.image_size, self.resize_mode))
            elif self.train:
                image = T.decode_for_train(image, self.image_size, rng, self.augment, dct=self.dct, name=key)
            else:
                image = T.decode_for_eval(image, self.image_size, self.resize_mode, name=key)
        except BadExample as e:
            return ("bad", e.kind, str(e))
        out = {"image": image, "caption": caption, KEY: key}
        if label is not None:
            out["label"] = np.int32(label)
        return out


@dataclass(frozen=True)
class _Tokenize:
    """Batch stage: `caption` [b] -> `text` int32 [b, L] (one batched tokenizer call per batch)."""

    tokenizer: Any

    def __call__(self, batch: dict) -> dict:
        batch = dict(batch)
        captions = [str(c) for c in batch.pop("caption")]
        batch["text"] = np.asarray(self.tokenizer(captions), np.int32) if captions else np.zeros((0, 0), np.int32)
        return batch


# ----------------------------------------------------------------------------- streamed tar shards

class TarShardDataset(grain.IterDataset):
    """The raw records of one tar shard (`sources.iter_tar`, with `label_key` / `read_captions`),
    tagged with their epoch; its iterator's state is the number of records read."""

    def __init__(self, path: str, epoch: int, caption_list_key: str | None, label_key: str | None = None,
                 read_captions: bool = True):
        super().__init__()
        self.path, self.epoch, self.caption_list_key = path, epoch, caption_list_key
        self.label_key, self.read_captions = label_key, read_captions

    def __iter__(self):
        return _TarShardIterator(self)

    def __str__(self):
        return f"TarShardDataset({self.path}, epoch={self.epoch})"


class _TarShardIterator(grain.DatasetIterator):
    def __init__(self, ds: TarShardDataset):
        super().__init__()
        self._ds, self._position, self._records = ds, 0, None

    def __next__(self) -> dict:
        if self._records is None:
            self._records = S.iter_tar(self._ds.path, skip=self._position, caption_list_key=self._ds.caption_list_key,
                                       label_key=self._ds.label_key, read_captions=self._ds.read_captions)
        rec = next(self._records)
        self._position += 1
        rec["epoch"] = self._ds.epoch
        return rec

    def get_state(self) -> dict:
        return {"position": self._position}

    def set_state(self, state: dict) -> None:
        self._position, self._records = int(state["position"]), None


@dataclass(frozen=True)
class _OpenShard:
    num_shards: int
    caption_list_key: str | None
    label_key: str | None = None
    read_captions: bool = True

    def __call__(self, position: int, path: str) -> TarShardDataset:
        return TarShardDataset(path, position // self.num_shards, self.caption_list_key, self.label_key,
                               self.read_captions)


# ----------------------------------------------------------------------------- bad-data stages

class _GoodBatches(grain.IterDataset):
    """Batches of good examples: drops bad ones (and those curation did not keep) and stacks
    `batch_size` good ones (`keys` of each example); `_skipped` int32 [len(KINDS)] counts the bad
    examples dropped since the previous batch, by kind. At the end of a finite read the last batch
    may be partial (or empty, to report bad examples that came after the last good one)."""

    def __init__(self, parent, batch_size: int, drop_remainder: bool, guard: int,
                 keys: tuple = ("image", "caption", KEY)):
        super().__init__(parent)
        self.batch_size, self.drop_remainder, self.guard, self.keys = batch_size, drop_remainder, guard, keys

    def __iter__(self):
        return _GoodBatchesIterator(self._parent.__iter__(), self)


class _GoodBatchesIterator(grain.DatasetIterator):
    def __init__(self, parent, ds: _GoodBatches):
        super().__init__(parent)
        self._ds = ds
        self._done = False

    def __next__(self) -> dict:
        if self._done:
            raise StopIteration
        rows, skipped, run, last = [], [0] * len(KINDS), 0, ""
        while len(rows) < self._ds.batch_size:
            try:
                x = next(self._parent)
            except StopIteration:
                self._done = True
                if (rows and not self._ds.drop_remainder) or any(skipped):
                    break
                raise
            if x is None:
                continue
            if isinstance(x, tuple):
                skipped[KINDS.index(x[1])] += 1
                run, last = run + 1, x[2]
                if run >= self._ds.guard:
                    raise DataError(f"{run} examples in a row were bad (by kind: "
                                    f"{ {k: n for k, n in zip(KINDS, skipped) if n} }); latest: {last}")
                continue
            run = 0
            rows.append(x)
        if self._done and self._ds.drop_remainder:
            rows = []
        batch = {k: np.stack([r[k] for r in rows]) if rows else np.zeros((0,), np.int32 if k == "label" else None)
                 for k in self._ds.keys}
        batch[_SKIPPED] = np.asarray(skipped, np.int32)
        return batch

    def get_state(self) -> dict:
        return {"parent": self._parent.get_state(), "done": self._done}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._done = bool(state["done"])


class Batches:
    """This process's batches, with resumable state and bad-data counts (see the module docstring).

    `classnames`: the class names in label order (tuple of C str; batch labels are in [0, C)), or
    None when the config names no `classnames`: what the trainer and evaluators build class text
    embeddings from (`caption_from_template` / templates over these names).
    """

    def __init__(self, dataset: grain.IterDataset, *, batch_size: int, num_examples: int | None,
                 max_bad_fraction: float, bad_check_after: int, classnames: tuple[str, ...] | None = None):
        self._iter = iter(dataset)
        self.batch_size = batch_size  # global
        self.num_examples = num_examples
        self.classnames = classnames
        self.max_bad_fraction, self.bad_check_after = max_bad_fraction, bad_check_after
        self._good, self._bad = 0, [0] * len(KINDS)  # this process's totals
        self._batches = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        while True:
            batch = next(self._iter)
            skipped = batch.pop(_SKIPPED)
            self._bad = [a + int(b) for a, b in zip(self._bad, skipped)]
            if len(batch[KEY]):
                break
        # own copies: arrays from grain's workers live in shared memory that closing the iterator frees
        batch = {k: np.array(v) for k, v in batch.items()}
        self._good += len(batch[KEY])
        self._batches += 1
        seen = self._good + sum(self._bad)
        if seen >= self.bad_check_after and sum(self._bad) > self.max_bad_fraction * seen:
            raise DataError(f"{sum(self._bad)} of {seen} examples read by this process were bad "
                            f"({self.bad_counts()}), more than max_bad_fraction={self.max_bad_fraction}")
        return batch

    def bad_counts(self) -> dict:
        """This process's skipped examples so far, by kind (only kinds seen), and the examples used."""
        out = {k: n for k, n in zip(KINDS, self._bad) if n}
        out["good"] = self._good
        return out

    @property
    def epoch(self) -> float:
        """Epochs read so far (global, counting used examples), or NaN for streamed sources."""
        if not self.num_examples:
            return float("nan")
        return self._batches * self.batch_size / self.num_examples

    def get_state(self) -> dict:
        return {"grain": self._iter.get_state(), "good": self._good, "bad": list(self._bad),
                "batches": self._batches}

    def set_state(self, state: dict) -> None:
        self._iter.set_state(state["grain"])
        bad = [int(v) for v in state["bad"]]  # states saved before a kind was added hold fewer counts
        self._good, self._bad = int(state["good"]), bad + [0] * (len(KINDS) - len(bad))
        self._batches = int(state["batches"])

    def close(self) -> None:
        close = getattr(self._iter, "close", None)
        if close is not None:
            close()


# ----------------------------------------------------------------------------- the pipeline

def open_source(config: DataConfig):
    """A random-access source object (`len`, `record(i)`, `key(i)`), or the shard paths of a streamed one."""
    spec = config.source
    caption_key = None if config.caption_template is not None else config.caption_key  # None: no captions read
    if spec.startswith("tfds:"):
        from clipjax.data.tfds_source import TfdsSource

        return TfdsSource.from_spec(spec, image_key=config.img_key, caption_key=caption_key,
                                    data_dir=config.tfds_data_dir, label_key=config.label_key)
    if spec.endswith((".csv", ".tsv", ".jsonl")):
        return S.Table.read(spec, config.img_key, caption_key, config.caption_list_key, config.image_root,
                            label_key=config.label_key)
    return S.expand_shards(spec)


def resolve_classnames(config: DataConfig, source=None) -> tuple[str, ...] | None:
    """The config's class names: read from its file, from the tfds ClassLabel (`"tfds"`, `source` an
    opened `TfdsSource`), or None."""
    if config.classnames is None:
        return None
    if isinstance(config.classnames, tuple):
        return config.classnames
    if config.classnames == "tfds":
        return (source if source is not None else open_source(config)).class_names()
    return S.read_classnames(config.classnames)


def make_batches(config: DataConfig, *, image_size: int, tokenizer: Callable, batch_size: int, seed: int = 0,
                 train: bool = True, num_epochs: int | None = None, resize_mode: str = "shortest",
                 process_index: int | None = None, process_count: int | None = None) -> Batches:
    """This process's batches of `config.source` (see the module docstring).

    Args:
      image_size: the model's input side S.
      tokenizer: `tokenizer(list_of_str) -> int [b, L]` (`clipjax.tokenizer.Tokenizer`; picklable for workers).
      batch_size: the global batch (all processes); must divide by the process count.
      seed: shuffle, augmentation and caption-choice seed.
      train: random crops, shuffling and caption sampling, full batches only; False: the eval
        transform, the source's order, the first caption, and a last partial batch.
      num_epochs: None: endless (training); else that many passes.
      resize_mode: the eval transform's resize (`shortest`, or `squash` for SigLIP: the model config's
        `preprocess.resize_mode`).
    """
    p = jax.process_index() if process_index is None else process_index
    n = jax.process_count() if process_count is None else process_count
    if batch_size % n:
        raise ValueError(f"global batch_size={batch_size} is not divisible by {n} processes")
    augment = config.augment
    if train and augment is None:
        from clipjax.data.transforms import AugmentConfig

        augment = AugmentConfig()
    keep = None
    if config.keep_keys:
        from clipjax.data.curate import read_kept_keys

        keep = frozenset(read_kept_keys(config.keep_keys))
    src = open_source(config)
    classnames = resolve_classnames(config, src)
    to_example = _ToExample(image_size, seed, train, config.dct_downscale, augment, keep, resize_mode,
                            config.label_key, classnames, config.caption_template)
    if isinstance(src, list):  # streamed tar shards
        shards = grain.MapDataset.source(src)
        if train:
            shards = shards.shuffle(seed)
        open_shard = _OpenShard(len(src), config.caption_list_key, config.label_key,
                                read_captions=config.caption_template is None)
        shards = shards.repeat(num_epochs).map_with_index(open_shard)[p::n]
        ds = grain.experimental.InterleaveIterDataset(shards, cycle_length=config.cycle_length)
        if train and config.shuffle_buffer > 1:
            ds = grain.experimental.WindowShuffleIterDataset(ds, window_size=config.shuffle_buffer, seed=seed)
        ds = ds.map(to_example)
        num_examples = None
    else:
        order = grain.MapDataset.range(len(src))
        if train:
            order = order.shuffle(seed)
        order = order.repeat(num_epochs).map_with_index(_ReadRow(src, len(src)))[p::n]
        ds = order.map(to_example).to_iter_dataset()
        num_examples = len(src)
    keys = ("image", "caption", KEY) + (("label",) if config.label_key is not None else ())
    ds = _GoodBatches(ds, batch_size // n, drop_remainder=train, guard=config.bad_check_after, keys=keys)
    ds = ds.map(_Tokenize(tokenizer))
    if config.num_workers:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; a non-absl program never parsed them
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.num_workers,
                                                         per_worker_buffer_size=config.worker_buffer))
    return Batches(ds, batch_size=batch_size, num_examples=num_examples, max_bad_fraction=config.max_bad_fraction,
                   bad_check_after=config.bad_check_after, classnames=classnames)
