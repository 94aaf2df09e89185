"""Where examples come from: webdataset tar shards, open_clip CSV/TSV and JSONL tables, tfds, arrays.

Every reader yields *raw records*, plain dicts that worker processes turn into training examples
(`clipjax.data.pipeline`):

    {"key": str, "image": bytes | uint8 [H, W, C] | None, "captions": [str, ...], "bad": kind | None,
     "why": str[, "label": raw label | None]}

`captions[0]` is the example's caption (`KEY.txt`, else the JSON's `caption`, or the table's caption
column); LaCLIP-style extra captions (a list under `caption_list_key` in the JSON or table row)
follow it. A reader told that the source has no captions (`caption_key=None`: the pipeline makes
them from the label) leaves `captions` empty. A reader given a `label_key` adds `label`: the value
as stored (the bytes of the tar member `KEY.<label_key>`, else the value under `label_key` in
`KEY.json`; the table cell or JSON value), None when the example has none; the pipeline parses and
range-checks it (`clipjax.data.pipeline.parse_label`).
A record that cannot be used carries `bad` (one of `clipjax.data.errors.KINDS`) and a message in
`why`, and is skipped and counted downstream; readers never raise on one bad example.

Source specs, written as on open_clip's or big_vision's command lines:

* `shards/{00000..00127}.tar`, `shards/*.tar` or `a.tar,b.tar` (local paths): tar
  shards as img2dataset writes them (`KEY.jpg|jpeg|png|webp` with `KEY.txt` and/or `KEY.json`,
  members of one example adjacent; class labels as webdataset's ImageNet shards hold them,
  `KEY.cls`, or as img2dataset-style metadata, `{"label": 3}` in `KEY.json`: the member
  `KEY.<label_key>` wins, the JSON key `label_key` is read only when that member is absent).
  Streamed: `TarShard` reads one shard front to back and its position (examples read) is its
  whole state, so a restored reader re-opens the shard and skips the examples already read, by
  seeking over their members.
* `FILE.csv`, `FILE.tsv`: open_clip's `CsvDataset` table (`--csv-img-key filepath
  --csv-caption-key title`). open_clip's separator defaults to a tab whatever the extension; here
  the header decides: a tab-separated header holding both keys means tabs, else a comma-separated
  one means commas, else the error lists the columns found. Relative image paths are resolved
  against the table's folder (open_clip: against the working directory).
* `FILE.jsonl`: one JSON object per line with the same keys (`filepath`, `title`).
* `tfds:NAME[:SPLIT]` (`clipjax.data.tfds_source`).

`caption_shards(spec)` / `iter_captions(shard)` give the (key, caption) pairs of any spec, shard by
shard, for jobs that need no images (`clipjax curate`). `read_classnames(path)` reads a class-name
file (one name per line, in label order).
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import re
import tarfile
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from clipjax.data.errors import DataError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # preferred in this order when a key has several
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's split: key up to the first dot of the name


def bad_record(key: str, kind: str, why: str) -> dict:
    return {"key": key, "image": None, "captions": [], "bad": kind, "why": why}


def expand_shards(spec: str) -> list[str]:
    """Shard paths of a spec: comma-separated parts, each brace-expanded (`{000..127}`) then globbed.

    Order is kept as written (globs sorted); a part that matches nothing is an error naming it.
    """
    from braceexpand import braceexpand

    paths: list[str] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        for path in braceexpand(part):
            if any(c in path for c in "*?["):
                found = sorted(glob.glob(path))
                if not found:
                    raise DataError(f"shard pattern {path!r} (from {spec!r}) matches no file")
                paths.extend(found)
            elif not os.path.exists(path):
                raise DataError(f"shard {path!r} (from {spec!r}) does not exist")
            else:
                paths.append(path)
    if not paths:
        raise DataError(f"source {spec!r} names no shard")
    return paths


# ----------------------------------------------------------------------------- tar shards

def _sample_record(key: str, files: dict[str, bytes], caption_list_key: str | None, label_key: str | None = None,
                   read_captions: bool = True, require_captions: bool = True) -> dict:
    """One example's members (`ext -> bytes`) as a raw record.

    `label`: the bytes of the member `KEY.<label_key>`; when there is no such member, the value of
    the key `label_key` in `KEY.json` as JSON holds it (an int, or a string of one; the pipeline
    refuses floats and booleans); None when neither holds one. `require_captions=False`: an example
    without a caption is kept, with `captions` empty (a labelled set converted for zero-shot use).
    """
    image = next((files[e] for e in IMAGE_EXTENSIONS if e in files), None)
    meta = {}
    if "json" in files:
        try:
            meta = json.loads(files["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return bad_record(key, "unreadable_file", f"{key}.json is not valid JSON ({e})")
        if not isinstance(meta, dict):
            return bad_record(key, "unreadable_file", f"{key}.json holds a {type(meta).__name__}, not an object")
    captions = []
    if not read_captions:
        pass
    elif "txt" in files:
        try:
            captions.append(files["txt"].decode("utf-8").strip())
        except UnicodeDecodeError as e:
            return bad_record(key, "unreadable_file", f"{key}.txt is not UTF-8 ({e})")
    elif isinstance(meta.get("caption"), str):
        captions.append(meta["caption"].strip())
    extra = meta.get(caption_list_key) if caption_list_key and read_captions else None
    if isinstance(extra, list):
        captions.extend(c.strip() for c in extra if isinstance(c, str))
    captions = [c for c in captions if c]
    if image is None:
        return bad_record(key, "missing_image", f"{key} has no {'|'.join(IMAGE_EXTENSIONS)} member "
                                                f"(members: {sorted(files)})")
    if read_captions and require_captions and not captions:
        return bad_record(key, "missing_caption", f"{key} has no caption (.txt, or 'caption' in .json)")
    rec = {"key": key, "image": image, "captions": captions, "bad": None, "why": ""}
    if label_key:
        rec["label"] = files[label_key] if label_key in files else meta.get(label_key)
    return rec


def iter_tar(path: str, *, skip: int = 0, caption_list_key: str | None = None, read_images: bool = True,
             label_key: str | None = None, read_captions: bool = True,
             require_captions: bool = True) -> Iterator[dict]:
    """Raw records of one tar shard, in order, after skipping the first `skip` examples.

    Members are grouped into examples by key (adjacent members sharing the name up to the first
    dot, as webdataset does). Skipped examples are passed by seeking over their members, not read.
    A shard that cannot be opened yields one `unreadable_file` record; one that ends in damage
    yields the examples before it, then one `bad_shard` record; one with no example yields one
    `empty_shard` record. Bad records count as examples for `skip`, so a restored reader resumes
    exactly where it was. `label_key`: the member extension holding the class label (`cls`), or
    the `KEY.json` key holding it when that member is absent; `read_captions=False`: the source has
    no captions (records carry none, none is required); `require_captions=False`: captions are read
    where present, and an example without one is kept with none.
    """
    name = os.path.basename(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        if skip == 0:
            yield bad_record(f"{name}", "unreadable_file", f"cannot open shard {path}: {e}")
        return
    count = 0  # examples produced (or skipped) so far
    with f:
        try:
            tar = tarfile.open(fileobj=f, mode="r:")
        except tarfile.TarError as e:
            if skip == 0:
                yield bad_record(name, "bad_shard" if os.path.getsize(path) else "empty_shard",
                                 f"shard {path} is not a readable tar file ({e})")
            return
        key, files = None, {}
        try:
            while True:
                member = tar.next()
                if member is None:
                    break
                if not member.isfile():
                    continue
                m = _KEY_EXT.match(member.name)
                if m is None:
                    continue  # a member without an extension belongs to no example
                k, ext = m.group(1), m.group(2).lower()
                if k != key:
                    if key is not None:
                        if count >= skip:
                            yield _sample_record(key, files, caption_list_key, label_key, read_captions,
                                                 require_captions)
                        count += 1
                    key, files = k, {}
                if count >= skip and (read_images or ext not in IMAGE_EXTENSIONS):
                    files[ext] = tar.extractfile(member).read()
                elif count >= skip:
                    files[ext] = b""  # present, not read
            damage = _missing_end_marker(f, tar.offset)
        except (tarfile.TarError, OSError, EOFError) as e:
            damage = f"{type(e).__name__}: {e}"
        if damage:  # the example being read when the damage came is incomplete: dropped with the rest
            if count >= skip:
                yield bad_record(f"{name}/{key}", "bad_shard", f"shard {path} is damaged after {count} "
                                                               f"examples ({damage})")
            return
        if key is not None:
            if count >= skip:
                yield _sample_record(key, files, caption_list_key, label_key, read_captions, require_captions)
            count += 1
        elif skip == 0:
            yield bad_record(name, "empty_shard", f"shard {path} holds no example")


def _missing_end_marker(f, offset: int) -> str:
    """Why the archive is cut short, or "" when its two zero end blocks follow the last member.

    `tarfile` reads a tar cut at a member boundary as a complete, shorter archive."""
    f.seek(offset)
    tail = f.read(1024)
    if len(tail) < 1024 or tail.strip(b"\0"):
        return f"no end-of-archive marker at byte {offset}: the file is cut short"
    return ""


# ----------------------------------------------------------------------------- tables

def _sniff_separator(header: str, keys: Sequence[str], path: str) -> str:
    for sep in ("\t", ","):
        cols = next(csv.reader([header], delimiter=sep))
        if all(k in cols for k in keys):
            return sep
    raise DataError(f"{path}: the header {header.strip()!r} holds no column(s) {list(keys)} when split by tab or "
                    "comma; set the image, caption and label column names (open_clip's --csv-img-key / "
                    "--csv-caption-key; the data config's label_key)")


@dataclass(frozen=True)
class Table:
    """An open_clip CSV/TSV or a JSONL file as rows `(image path, captions, raw label)`, read into memory.

    Random access: `record(i)` reads row `i`'s image file. `image_root` resolves relative paths
    (default: the table's folder). `caption_key=None`: the table has no captions (rows carry none,
    none is required). `label_key`: the column / JSON key of the class label (records gain `label`,
    as stored: a CSV string or a JSON value, None where the row has none); it must be a column of
    the header (CSV/TSV) or a key of at least one row (JSONL).
    """

    path: str
    rows: tuple  # ((image_path, (caption, ...), raw label or None), ...)
    label_key: str | None = None
    needs_captions: bool = True

    @classmethod
    def read(cls, path: str, img_key: str = "filepath", caption_key: str | None = "title",
             caption_list_key: str | None = None, image_root: str | None = None, *,
             label_key: str | None = None) -> "Table":
        root = image_root if image_root is not None else os.path.dirname(os.path.abspath(path))
        keys = [k for k in (img_key, caption_key, label_key) if k]
        if not os.path.exists(path):
            raise DataError(f"table {path!r} does not exist")
        rows = []
        with open(path, encoding="utf-8", newline="") as f:
            if path.endswith(".jsonl"):
                dicts = []
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            dicts.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise DataError(f"{path}:{n} is not valid JSON ({e})") from None
                missing = [k for k in (img_key, caption_key) if k and dicts and k not in dicts[0]]
                if missing:
                    raise DataError(f"{path}: first row has no key(s) {missing}; keys found: {sorted(dicts[0])}")
                if label_key and dicts and not any(label_key in d for d in dicts):
                    raise DataError(f"{path}: no row has the label key {label_key!r}; keys of the first row: "
                                    f"{sorted(dicts[0])}")
            else:
                header = f.readline()
                sep = _sniff_separator(header, keys, path)
                f.seek(0)
                dicts = list(csv.DictReader(f, delimiter=sep))
        for d in dicts:
            image = d.get(img_key) or ""
            caps = [d.get(caption_key)] if caption_key and isinstance(d.get(caption_key), str) else []
            extra = d.get(caption_list_key) if caption_list_key and caption_key else None
            if isinstance(extra, str) and not path.endswith(".jsonl"):
                try:
                    extra = json.loads(extra)
                except json.JSONDecodeError:
                    extra = None
            if isinstance(extra, list):
                caps.extend(c for c in extra if isinstance(c, str))
            caps = tuple(c.strip() for c in caps if c and c.strip())
            rows.append((os.path.join(root, image) if image else "", caps, d.get(label_key) if label_key else None))
        if not rows:
            raise DataError(f"table {path!r} has no rows")
        return cls(path=path, rows=tuple(rows), label_key=label_key, needs_captions=caption_key is not None)

    def __len__(self) -> int:
        return len(self.rows)

    def key(self, i: int) -> str:
        return str(i)

    def record(self, i: int, read_image: bool = True) -> dict:
        image_path, captions, label = self.rows[i]
        key = self.key(i)
        if not image_path:
            return bad_record(key, "missing_image", f"{self.path} row {i} has an empty image path")
        if self.needs_captions and not captions:
            return bad_record(key, "missing_caption", f"{self.path} row {i} ({image_path}) has no caption")
        data = b""
        if read_image:
            try:
                with open(image_path, "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                return bad_record(key, "missing_image", f"{self.path} row {i}: image {image_path} does not exist")
            except OSError as e:
                return bad_record(key, "unreadable_file", f"{self.path} row {i}: cannot read {image_path} ({e})")
        rec = {"key": key, "image": data, "captions": list(captions), "bad": None, "why": ""}
        if self.label_key:
            rec["label"] = label
        return rec


# ----------------------------------------------------------------------------- class names

def read_classnames(path: str) -> tuple[str, ...]:
    """Class names from a UTF-8 text file, one per line in label order (line n: label n - 1).

    Surrounding whitespace is stripped and a final newline ignored; an empty line (it would shift
    every later label) or an empty file is an error naming the file and line.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise DataError(f"classnames file {path!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"classnames file {path!r} cannot be read as UTF-8 text ({e})") from None
    names = [line.strip() for line in text.splitlines()]
    while names and not names[-1]:
        names.pop()
    if not names:
        raise DataError(f"classnames file {path!r} holds no class name; expected one name per line, in label order")
    empty = next((n for n, name in enumerate(names, 1) if not name), None)
    if empty is not None:
        raise DataError(f"classnames file {path!r}: line {empty} is empty; expected one class name per line, in label "
                        "order (an empty line would shift every later label)")
    return tuple(names)


# ----------------------------------------------------------------------------- captions only

_TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl")
_SHARD_SEP = "#rows="


def caption_shards(spec: str, rows_per_shard: int = 100_000) -> list[str]:
    """Shard ids of a source for caption-only jobs: tar paths, or `TABLE#rows=A:B` row ranges."""
    if spec.startswith("tfds:"):
        raise DataError("caption-only jobs read tar shards, CSV/TSV or JSONL sources; convert tfds data first")
    if spec.endswith(_TABLE_SUFFIXES):
        n = len(Table.read(spec))
        return [f"{spec}{_SHARD_SEP}{a}:{min(a + rows_per_shard, n)}" for a in range(0, n, rows_per_shard)]
    return expand_shards(spec)


def iter_captions(shard: str) -> Iterator[tuple[str, str | None]]:
    """(key, caption) pairs of one shard id from `caption_shards`; caption None when it is missing.

    Tar shards are read without their image bytes; bad shards end the iteration quietly (curation
    counts only captions).
    """
    if _SHARD_SEP in shard:
        path, rows = shard.split(_SHARD_SEP)
        a, b = (int(x) for x in rows.split(":"))
        table = Table.read(path)
        for i in range(a, b):
            caps = table.rows[i][1]
            yield table.key(i), (caps[0] if caps else None)
        return
    for rec in iter_tar(shard, read_images=False):
        if rec["bad"] in (None, "missing_image"):
            yield rec["key"], (rec["captions"][0] if rec["captions"] else None)
        elif rec["bad"] == "missing_caption":
            yield rec["key"], None


# ----------------------------------------------------------------------------- arrays

def array_record(images: np.ndarray, captions: Sequence, i: int) -> dict:
    """Row `i` of in-memory arrays: uint8 image `[H, W, 3]` and its caption(s) (str or sequence of str)."""
    cap = captions[i]
    caps = [cap] if isinstance(cap, str) else [c for c in cap]
    return {"key": str(i), "image": np.asarray(images[i]), "captions": caps, "bad": None, "why": ""}


def image_bytes(array: np.ndarray, fmt: str = "JPEG", **kwargs) -> bytes:
    """uint8 `[H, W, 3]` as encoded image bytes (tests and examples)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(array, np.uint8)).save(buf, format=fmt, **kwargs)
    return buf.getvalue()
