"""What the `clipjax` commands share: batched, device-sharded encoding with a loaded model, and the
readers of image folders, captions files and tensorflow-datasets splits (one implementation for
`eval`, `score` and `ood`).

Captions files hold one caption per line (paired with the images of the folder in sorted file-name
order) or JSON lines `{"image": "a.jpg", "caption": "...", "references": ["...", ...]}`.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


# ----------------------------------------------------------------------------- encoding


class Encoder:
    """Batched, device-sharded image and text encoding with a loaded clipjax model."""

    def __init__(self, model_dir: str, batch_size: int = 64, progress: bool = True):
        import jax

        import clipjax
        from clipjax.sharding import make_mesh

        if batch_size < 1:
            raise ValueError(f"--batch-size must be positive, got {batch_size}")
        self.mesh = make_mesh(data=-1)
        self.model = clipjax.load(model_dir, mesh=self.mesh)
        n_dev = jax.device_count()
        self.batch_size = -(-batch_size // n_dev) * n_dev  # a multiple of the device count
        self.progress = progress

    def _run(self, encode, batch: np.ndarray) -> np.ndarray:
        import jax

        from clipjax.sharding import batch_sharding

        n = batch.shape[0]
        padded = batch
        if n < self.batch_size:  # repeat the last row: one static batch shape, one compilation
            padded = np.concatenate([batch, np.repeat(batch[-1:], self.batch_size - n, axis=0)])
        x = jax.device_put(padded, batch_sharding(self.mesh, padded.ndim))
        return np.asarray(encode(x))[:n]

    def _bar(self, total: int, unit: str):
        from tqdm import tqdm

        return tqdm(total=total, unit=unit, disable=not self.progress, file=sys.stderr)

    def images(self, count: int, get_batch) -> np.ndarray:
        """Embeddings `[count, E]` of images; `get_batch(start, stop)` returns a list of images."""
        out = []
        with self._bar(count, "img") as bar:
            for start in range(0, count, self.batch_size):
                stop = min(start + self.batch_size, count)
                pixels = self.model.preprocess(get_batch(start, stop))
                out.append(self._run(self.model.encode_image, pixels))
                bar.update(stop - start)
        return np.concatenate(out).astype(np.float32)

    def texts(self, texts: list[str]) -> np.ndarray:
        """Embeddings `[len(texts), E]` of strings."""
        out = []
        with self._bar(len(texts), "txt") as bar:
            for start in range(0, len(texts), self.batch_size):
                chunk = texts[start:start + self.batch_size]
                ids = np.asarray(self.model.tokenize(chunk), np.int32)
                out.append(self._run(self.model.encode_text, ids))
                bar.update(len(chunk))
        return np.concatenate(out).astype(np.float32)


# ----------------------------------------------------------------------------- inputs


def embedded_images(folder: str | None, model_dir: str, limit: int | None = None) -> np.ndarray | None:
    """The image embeddings `[N, E]` of a `clipjax embed` output folder (None for any other folder).

    Refuses a folder embedded with another model than `model_dir`: its vectors would not live in
    the same space as the model's text embeddings.
    """
    if not folder or not os.path.exists(os.path.join(folder, "embed.json")):
        return None
    from clipjax.cli.embed import read_embeddings

    with open(os.path.join(folder, "embed.json")) as f:
        made_with = json.load(f).get("model")
    if made_with != os.path.abspath(model_dir):
        raise ValueError(f"{folder} holds embeddings of {made_with}, not of --model {os.path.abspath(model_dir)}")
    emb = read_embeddings(folder, "image")[1]
    return emb[:limit] if limit else emb


def tfds_source(name: str, split: str, data_dir: str | None):
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise ValueError("`clipjax eval` needs tensorflow-datasets: pip install tensorflow-datasets") from None
    data_dir = data_dir or os.environ.get("TFDS_DATA_DIR")
    builder = tfds.builder(name, data_dir=data_dir)
    source = builder.as_data_source(split=split)
    if len(source) == 0:
        raise ValueError(f"split {split!r} of {name!r} is empty")
    return builder, source


def examples(source, start: int, stop: int) -> list:
    return [source[i] for i in range(start, stop)]


def field(example: dict, key: str):
    value = example
    for part in key.split("/"):
        if not isinstance(value, dict) or part not in value:
            raise ValueError(f"examples have no feature {key!r}; available: {sorted(example)}")
        value = value[part]
    return value


def image_of(example: dict, key: str):
    """The image feature `key` of a tfds example: a decoded array as it is, or encoded bytes (a set written by
    `clipjax data convert`) decoded to an RGB PIL image."""
    value = field(example, key)
    if isinstance(value, (bytes, bytearray, memoryview)):
        from clipjax.data.transforms import decode_image

        return decode_image(value, name=str(example.get("key", ""))).convert("RGB")
    return np.asarray(value)


def _text(v) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def captions_of(example: dict, key: str) -> list[str]:
    value = field(example, key)
    if isinstance(value, dict):
        if "text" not in value:
            raise ValueError(f"feature {key!r} is a dict without a 'text' entry: {sorted(value)}")
        value = value["text"]
    if isinstance(value, (str, bytes)):
        return [_text(value)]
    return [_text(v) for v in np.asarray(value, dtype=object).reshape(-1)]


def image_files(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        raise ValueError(f"image folder {folder!r} does not exist")
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder!r}")
    return files


def open_images(folder: str, files: list[str]):
    from PIL import Image

    def get(start, stop):
        out = []
        for f in files[start:stop]:
            with Image.open(os.path.join(folder, f)) as im:
                out.append(im.convert("RGB"))
        return out

    return get


def read_captions(path: str) -> list[dict]:
    """Captions file -> list of `{"caption", optional "image", optional "references"}`.

    Plain text: one caption per line. JSON lines: objects with `caption` (or `text`),
    optionally `image` (a file name in the image folder) and `references` (a list).
    """
    if not os.path.isfile(path):
        raise ValueError(f"captions file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise ValueError(f"captions file {path!r} is empty")
    jsonl = path.endswith(".jsonl") or lines[0].lstrip().startswith("{")
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            raise ValueError(f"{path}:{i}: empty line (one caption per line expected)")
        if not jsonl:
            out.append({"caption": line.strip()})
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("caption", rec.get("text")), str):
            raise ValueError(f"{path}:{i}: expected an object with a string 'caption'")
        item = {"caption": rec.get("caption", rec.get("text"))}
        if "image" in rec:
            item["image"] = str(rec["image"])
        if "references" in rec:
            refs = rec["references"]
            if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
                raise ValueError(f"{path}:{i}: 'references' must be a non-empty list of strings")
            item["references"] = refs
        out.append(item)
    return out


def pair_captions(files: list[str], captions: list[dict], folder: str) -> list[dict]:
    """Attach each caption to its image file (by `image` name, else by sorted order)."""
    named = [c for c in captions if "image" in c]
    if named and len(named) != len(captions):
        raise ValueError("either every captions line names its image or none does")
    if named:
        missing = [c["image"] for c in captions if c["image"] not in set(files)]
        if missing:
            raise ValueError(f"captions name images not found in {folder!r}: {missing[:5]}")
        return captions
    if len(captions) != len(files):
        raise ValueError(f"{len(captions)} captions for {len(files)} images in {folder!r}; "
                         "give one caption per image (sorted by file name) or name the image in JSON lines")
    return [dict(c, image=f) for c, f in zip(captions, files)]


def emit(result: dict, out: str | None) -> int:
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write(text + "\n")
    return 0
