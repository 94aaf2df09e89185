"""`clipjax embed`: image and/or text embeddings of every example of a data source, resumable.

    clipjax embed --model CKPT --data SOURCE --out DIR [--modality image,text] [--dtype float16]
                  [--batch-size 256] [--shard-size 10000] [--num-workers N] [--img-key K --caption-key K]

SOURCE is any `clipjax.data` source as the user writes it: a tar-shard pattern, `tfds:NAME[:SPLIT]`
(`--data-dir`), a CSV/TSV or JSONL table. Examples are read in the source's order (eval transform,
first caption; bad examples skipped and counted) and written in shards of `--shard-size` rows, the
layout clip-retrieval's `inference` writes:

    DIR/img_emb/img_emb_PPP_KKKKK.npy    [n, E] L2-normalised image embeddings (float16 or float32)
    DIR/text_emb/text_emb_PPP_KKKKK.npy  [n, E] text embeddings of the same rows
    DIR/keys/keys_PPP_KKKKK.txt          the n example keys, one per line, in row order
    DIR/state/process_P-of-N.json        shards done and the reader's state after the last one
    DIR/embed.json                       model, source and settings (a rerun must match them)

PPP is the process (each of N processes reads its own part of the source: `jax.process_index()`, or
`--process-index/--process-count` for independent jobs); KKKKK numbers its shards. Every file is
written to a temporary name and renamed, the state last, so a killed run restarts after its last
complete shard and redoes nothing before it. The model runs on this process's own devices only
(no collective across processes), so processes progress independently. `read_embeddings(DIR)`
gives the keys and embeddings back in order; `clipjax score` / `clipjax ood` read such folders.
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys

import numpy as np

MODALITIES = ("image", "text")
_DIRS = {"image": "img_emb", "text": "text_emb"}


class _NoText:
    """Tokenizer stand-in for image-only runs of a model without tokenizer files."""

    def __call__(self, texts):
        return np.zeros((len(texts), 1), np.int32)


def _atomic_write(path: str, write) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def _save_npy(path: str, array: np.ndarray) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, array)

    _atomic_write(path, write)


def _save_text(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    _atomic_write(path, write)


def _local_model(model_dir: str):
    """The model on this process's devices only (a 1-axis mesh over `jax.local_devices()`)."""
    import jax
    from jax.sharding import Mesh

    import clipjax

    return clipjax.load(model_dir, mesh=Mesh(np.asarray(jax.local_devices()), ("data",)))


def embed(model_dir: str, source: str, out: str, *, modality=MODALITIES, dtype: str = "float16",
          batch_size: int = 256, shard_size: int = 10_000, data_options: dict | None = None,
          process_index: int | None = None, process_count: int | None = None, max_shards: int | None = None,
          progress: bool = True) -> dict:
    """Embed every example of `source` into `out` (see the module docstring); returns a summary.

    `max_shards`: stop after writing that many shards in this run (a later run continues).
    """
    import jax

    from clipjax.data import DataConfig, make_batches
    from clipjax.preprocess import normalize

    modality = tuple(modality)
    if not modality or set(modality) - set(MODALITIES):
        raise ValueError(f"--modality {','.join(modality)}: expected one or both of {', '.join(MODALITIES)}")
    if dtype not in ("float16", "float32"):
        raise ValueError(f"--dtype {dtype!r}: expected float16 or float32")
    p = jax.process_index() if process_index is None else process_index
    n = jax.process_count() if process_count is None else process_count
    n_dev = jax.local_device_count()
    batch_size = -(-batch_size // n_dev) * n_dev  # per process, a multiple of its devices
    if shard_size < batch_size or shard_size % batch_size:
        raise ValueError(f"--shard-size {shard_size} must be a positive multiple of the batch size {batch_size}")
    settings = {"model": os.path.abspath(model_dir), "source": source, "modality": list(modality), "dtype": dtype,
                "batch_size": batch_size, "shard_size": shard_size, "process_count": n,
                "data_options": data_options or {}}
    os.makedirs(os.path.join(out, "state"), exist_ok=True)
    meta_path = os.path.join(out, "embed.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            before = json.load(f)
        diff = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
        if diff:
            raise ValueError(f"{out} holds embeddings made with other settings (before, now): {diff}; "
                             "use another --out")
    elif p == 0:
        _save_text(meta_path, json.dumps(settings, indent=2))
    for m in modality:
        os.makedirs(os.path.join(out, _DIRS[m]), exist_ok=True)
    os.makedirs(os.path.join(out, "keys"), exist_ok=True)

    model = _local_model(model_dir)
    cfg = model.config
    if "text" in modality and model.tokenizer is None:
        raise ValueError(f"{model_dir} has no tokenizer files: embed --modality image only, or convert with "
                         "--tokenizer DIR")
    data = make_batches(DataConfig(source=source, **(data_options or {})), image_size=cfg.vision.image_size,
                        tokenizer=model.tokenizer or _NoText(), batch_size=batch_size * n, train=False,
                        num_epochs=1, resize_mode=cfg.preprocess.resize_mode, process_index=p, process_count=n)
    state_path = os.path.join(out, "state", f"process_{p}-of-{n}.json")
    done, rows = 0, 0
    if os.path.exists(state_path):
        with open(state_path) as f:
            saved = json.load(f)
        data.set_state(saved["iterator"])
        done, rows = saved["shards_done"], saved["rows"]

    def encode(fn, x: np.ndarray) -> np.ndarray:
        k = x.shape[0]
        if k < batch_size:  # one static shape: repeat the last row, drop the copies after
            x = np.concatenate([x, np.repeat(x[-1:], batch_size - k, axis=0)])
        return np.asarray(fn(x, validate=False))[:k].astype(dtype)  # fully addressable: this process's devices

    def flush(parts: dict, keys: list) -> None:
        nonlocal done, rows
        name = f"{p:03d}_{done:05d}"
        for m in modality:
            _save_npy(os.path.join(out, _DIRS[m], f"{_DIRS[m]}_{name}.npy"), np.concatenate(parts[m]))
        _save_text(os.path.join(out, "keys", f"keys_{name}.txt"), "".join(f"{k}\n" for k in keys))
        done, rows = done + 1, rows + len(keys)
        _save_text(state_path, json.dumps({"shards_done": done, "rows": rows, "iterator": data.get_state(),
                                           "bad": data.bad_counts()}))

    from tqdm import tqdm

    first, finished = done, False
    bar = tqdm(initial=rows, unit="ex", disable=not progress or p != 0, file=sys.stderr)
    parts, keys = {m: [] for m in modality}, []
    try:
        for batch in data:
            if "image" in modality:
                pixels = normalize(batch["image"], cfg.preprocess.mean, cfg.preprocess.std)
                parts["image"].append(encode(model.encode_image, pixels))
            if "text" in modality:
                parts["text"].append(encode(model.encode_text, batch["text"]))
            keys.extend(str(k) for k in batch["__key__"])
            bar.update(len(batch["__key__"]))
            if len(keys) == shard_size:
                flush(parts, keys)
                parts, keys = {m: [] for m in modality}, []
                if max_shards is not None and done - first >= max_shards:
                    break
        else:
            finished = True
            if keys:
                flush(parts, keys)
    finally:
        bar.close()
        data.close()
    return {"out": out, "process": p, "processes": n, "shards": done, "rows": rows, "bad": data.bad_counts(),
            "finished": finished}


_SHARD = re.compile(r"_(\d{3})_(\d{5})\.(npy|txt)$")


def read_embeddings(folder: str, modality: str = "image") -> tuple[list[str], np.ndarray]:
    """All keys and `[N, E]` float32 embeddings of an `embed` folder, in order (process, then shard)."""
    if modality not in MODALITIES:
        raise ValueError(f"modality {modality!r}: expected one of {MODALITIES}")
    paths = sorted(glob.glob(os.path.join(glob.escape(folder), _DIRS[modality], f"{_DIRS[modality]}_*.npy")))
    if not paths:
        raise FileNotFoundError(f"{folder} holds no {_DIRS[modality]}/*.npy: not a `clipjax embed` output with "
                                f"{modality} embeddings")
    keys, arrays = [], []
    for path in paths:
        m = _SHARD.search(path)
        key_path = os.path.join(folder, "keys", f"keys_{m.group(1)}_{m.group(2)}.txt")
        with open(key_path, encoding="utf-8") as f:
            shard_keys = f.read().splitlines()
        arr = np.load(path, allow_pickle=False)
        if len(shard_keys) != len(arr):
            raise ValueError(f"{path} has {len(arr)} rows but {key_path} {len(shard_keys)} keys")
        keys.extend(shard_keys)
        arrays.append(arr.astype(np.float32))
    return keys, np.concatenate(arrays)


def _run(args) -> int:
    data_options = {k: v for k, v in {"img_key": args.img_key, "caption_key": args.caption_key,
                                      "caption_list_key": args.caption_list_key, "num_workers": args.num_workers,
                                      "tfds_data_dir": args.data_dir}.items() if v is not None}
    summary = embed(args.model, args.data, args.out, modality=args.modality.split(","), dtype=args.dtype,
                    batch_size=args.batch_size, shard_size=args.shard_size, data_options=data_options,
                    process_index=args.process_index, process_count=args.process_count,
                    max_shards=args.max_shards, progress=not args.no_progress)
    print(json.dumps(summary))
    return 0


def register(sub) -> None:
    p = sub.add_parser("embed", help="image / text embeddings of a whole data source, sharded .npy, resumable")
    p.add_argument("--model", required=True, help="clipjax checkpoint folder or training workdir")
    p.add_argument("--data", required=True, help="shard pattern, tfds:NAME[:SPLIT], or a .csv/.tsv/.jsonl table")
    p.add_argument("--out", required=True, help="output folder (a rerun with the same settings resumes)")
    p.add_argument("--modality", default="image,text", help="image, text or image,text")
    p.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    p.add_argument("--batch-size", type=int, default=256, help="per process, rounded up to a multiple of its devices")
    p.add_argument("--shard-size", type=int, default=10_240, help="rows per output file (a multiple of the batch)")
    p.add_argument("--num-workers", type=int, help="decode worker processes")
    p.add_argument("--img-key", help="table column of image paths (default filepath; tfds: image)")
    p.add_argument("--caption-key", help="table column of captions (default title; tfds: captions)")
    p.add_argument("--caption-list-key", help="JSON key / column with extra captions")
    p.add_argument("--data-dir", help="tfds data_dir for tfds: sources")
    p.add_argument("--process-index", type=int, help="this job's part (default: jax.process_index())")
    p.add_argument("--process-count", type=int, help="number of parts (default: jax.process_count())")
    p.add_argument("--max-shards", type=int, help="stop after this many shards (rerun to continue)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run)
