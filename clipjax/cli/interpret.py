"""`clipjax interpret`: TextSpan descriptions of attention heads, and CCS head pruning, for a clipjax checkpoint.

    clipjax interpret heads --model DIR --images FOLDER --texts FILE [--layers 4] [--num-texts 5] [--rank 80]
                            [--batch-size 32] [--out result.json] [--no-progress]
    clipjax interpret prune --model DIR --heads L11.H5,L10.H8 --out-model DIR [--tower image] [--overwrite]

`heads` (Gandelsman et al., ICLR 2024; `clipjax.interpret.decompose`, `clipjax.interpret.textspan`):
the images of FOLDER, preprocessed with the model's eval transform, are decomposed in batches into the
direct effects of every attention head on the normalised image embedding (class-token ViTs only). The
effects of the last `--layers` layers' heads are kept per image; the earlier layers, which TextSpan
mean-ablates, only as their sum. Then every kept head gets TextSpan's greedy basis of `--num-texts`
texts out of FILE (one text per line; the paper's set is `text_descriptions/image_descriptions_general.txt`
of `yossigandelsman/clip_text_span`, which you supply), from the top `--rank` directions of its effects
over all the images. The JSON maps each head `"L{layer}.H{head}"` to its texts in order with the fraction
of the head's (centred) variance explained after each, and gives accuracy-free diagnostics: the mean
cosine and relative error between the true embedding and (a) the embedding with the earlier layers' heads
mean-ablated, the last layers' heads kept (`heads_kept`), (b) the same with the last layers' heads
replaced by their text reconstructions (`texts_replaced`, the reference's `mean_ablated_and_replaced`).

`prune` writes a new checkpoint with the named heads zero-ablated (CCS soft-pruning,
`clipjax.interpret.prune_heads`: the heads' query weights and bias and output-projection rows set to
zero); the source checkpoint is never modified.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import numpy as np

from clipjax.cli.inputs import Encoder, emit, image_files, open_images


def _positive(flag: str, value: int) -> int:
    if value < 1:
        raise ValueError(f"{flag} must be a positive integer, got {value}")
    return value


def read_texts(path: str) -> tuple[list[str], list[int]]:
    """The candidate texts of a file (one per line, blank lines skipped) and their 1-based line numbers."""
    if not os.path.isfile(path):
        raise ValueError(f"--texts file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        numbered = [(i, line.strip()) for i, line in enumerate(f.read().splitlines(), 1) if line.strip()]
    if not numbered:
        raise ValueError(f"--texts file {path!r} holds no text (one text per line expected)")
    return [t for _, t in numbered], [i for i, _ in numbered]


# ----------------------------------------------------------------------------- heads


@functools.lru_cache(maxsize=None)
def _effects_fn():
    import jax

    from clipjax.interpret.decompose import decompose_image

    @functools.partial(jax.jit, static_argnames=("config", "layers"))
    def effects(params, pixels, *, config, layers: int) -> dict:
        """Per image: `rest` [b, E] (z0 + MLPs), `early` [b, E] (the heads of layers < L - layers, summed),
        `last` [b, layers, H, E] (the last layers' heads), `embedding` [b, E] (normalised)."""
        parts = decompose_image(params, pixels, config=config, level="head")
        attn = parts["attn"]
        first = attn.shape[1] - layers
        return {"rest": parts["embed"] + parts["mlp"].sum(1), "early": attn[:, :first].sum((1, 2)),
                "last": attn[:, first:], "embedding": parts["embedding"]}

    return effects


def _direct_effects(enc: Encoder, count: int, get_batch, layers: int) -> dict:
    """`_effects_fn` over the images in padded, device-sharded batches, as host float32 arrays `[count, ...]`."""
    import jax

    from clipjax.sharding import batch_sharding

    model, size = enc.model, enc.batch_size
    effects = _effects_fn()
    out = {}
    with enc._bar(count, "img") as bar:
        for start in range(0, count, size):
            stop = min(start + size, count)
            pixels = model.preprocess(get_batch(start, stop))
            n = pixels.shape[0]
            if n < size:  # repeat the last image: one static batch shape, one compilation
                pixels = np.concatenate([pixels, np.repeat(pixels[-1:], size - n, axis=0)])
            x = jax.device_put(pixels, batch_sharding(enc.mesh, pixels.ndim))
            for key, value in effects(model.params, x, config=model.config, layers=layers).items():
                out.setdefault(key, []).append(np.asarray(value, np.float32)[:n])
            bar.update(stop - start)
    return {key: np.concatenate(value) for key, value in out.items()}


def _agreement(approx: np.ndarray, embedding: np.ndarray) -> dict:
    """Mean cosine and mean relative L2 error of `approx` [N, E] against `embedding` [N, E] (float64)."""
    a, x = approx.astype(np.float64), embedding.astype(np.float64)
    x_norm = np.linalg.norm(x, axis=-1)
    cos = np.sum(a * x, -1) / np.maximum(np.linalg.norm(a, axis=-1) * x_norm, 1e-300)
    rel = np.linalg.norm(a - x, axis=-1) / np.maximum(x_norm, 1e-300)
    return {"cosine": float(cos.mean()), "relative_error": float(rel.mean())}


def run_heads(args) -> int:
    from tqdm import tqdm

    from clipjax.checkpoint import read_config
    from clipjax.interpret.decompose import check_decomposable
    from clipjax.interpret.heads import head_name
    from clipjax.interpret.textspan import textspan

    for flag in ("layers", "num_texts", "rank", "batch_size"):
        _positive("--" + flag.replace("_", "-"), getattr(args, flag))
    config = read_config(args.model)
    check_decomposable(config)
    n_layers, n_heads = config.vision.layers, config.vision.heads
    if args.layers > n_layers:
        raise ValueError(f"--layers {args.layers} is more than the image tower's {n_layers} layers")
    texts, lines = read_texts(args.texts)
    if args.num_texts > len(texts):
        raise ValueError(f"--num-texts {args.num_texts} is more than the {len(texts)} texts in {args.texts}")
    files = image_files(args.images)
    if len(files) < 2:
        raise ValueError(f"TextSpan needs at least 2 images; {args.images!r} holds {len(files)}")

    enc = Encoder(args.model, args.batch_size, not args.no_progress)
    text_emb = enc.texts(texts)
    eff = _direct_effects(enc, len(files), open_images(args.images, files), args.layers)
    first = n_layers - args.layers
    base = eff["rest"].astype(np.float64) + eff["early"].astype(np.float64).mean(0)  # earlier heads mean-ablated
    recon_sum = np.zeros_like(base)
    heads, explained = {}, []
    with tqdm(total=args.layers * n_heads, unit="head", disable=args.no_progress, file=sys.stderr) as bar:
        for i, layer in enumerate(range(first, n_layers)):
            for head in range(n_heads):
                res = textspan(eff["last"][:, i, head], text_emb, num_texts=args.num_texts, rank=args.rank)
                idx, var = np.asarray(res.indices), np.asarray(res.variance_explained, np.float64)
                recon_sum += np.asarray(res.reconstruction, np.float64)
                heads[head_name(layer, head)] = [{"text": texts[j], "line": lines[j], "variance_explained": float(v)}
                                                 for j, v in zip(idx, var)]
                explained.append(float(var[-1]))
                bar.update(1)
    kept = base + eff["last"].astype(np.float64).sum((1, 2))
    diagnostics = {"mean_ablated_layers": list(range(first)),
                   "heads_kept": _agreement(kept, eff["embedding"]),
                   "texts_replaced": _agreement(base + recon_sum, eff["embedding"]),
                   "mean_variance_explained": float(np.mean(explained))}
    result = {"model": os.path.abspath(args.model), "images": os.path.abspath(args.images), "num_images": len(files),
              "texts": os.path.abspath(args.texts), "num_candidates": len(texts),
              "layers": list(range(first, n_layers)), "num_texts": args.num_texts, "rank": args.rank,
              "heads": heads, "diagnostics": diagnostics}
    return emit(result, args.out)


# ----------------------------------------------------------------------------- prune


def run_prune(args) -> int:
    from clipjax.checkpoint import load, read_config, save
    from clipjax.interpret.heads import head_name, parse_heads, prune_heads, tower_shape

    names = [h.strip() for h in args.heads.split(",") if h.strip()]
    if not names:
        raise ValueError(f"--heads must name at least one head like L11.H5 (layer 11, head 5), got {args.heads!r}")
    src, out = os.path.abspath(args.model), os.path.abspath(args.out_model)
    if src == out:
        raise ValueError("--out-model must differ from --model: the source checkpoint is never overwritten")
    if os.path.exists(out) and not args.overwrite:
        raise FileExistsError(f"{args.out_model} exists; pass --overwrite to replace it")
    config = read_config(src)
    _, n_layers, n_heads = tower_shape(config, args.tower)
    heads = parse_heads(names, layers=n_layers, num_heads=n_heads, name="--heads")
    model = load(src)
    pruned = prune_heads(model.params, model.config, heads, tower=args.tower)
    with open(os.path.join(src, "clipjax.json")) as f:
        original = json.load(f).get("source", {})
    heads_named = [head_name(*h) for h in sorted(set(heads))]
    source = {"pruned_from": src, "tower": args.tower, "heads": heads_named,
              "method": "CCS soft-pruning (query and output-projection weights zeroed)", "original": original}
    tokenizer = os.path.join(src, "tokenizer")
    save(out, model.config, pruned, tokenizer_dir=tokenizer if os.path.isdir(tokenizer) else None, source=source,
         overwrite=args.overwrite)
    print(json.dumps({"out": out, "model": src, "tower": args.tower, "heads": heads_named}))
    return 0


def register(subparsers) -> None:
    """Add `interpret` (`heads`, `prune`) to the `clipjax` command's sub-parsers."""
    it = subparsers.add_parser("interpret", help="TextSpan head descriptions (heads) and CCS head pruning (prune)",
                               description=__doc__.split("\n\n", 1)[1],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    it_sub = it.add_subparsers(dest="interpret_task", required=True)
    p = it_sub.add_parser("heads", help="TextSpan texts for every head of the last layers of a class-token ViT")
    p.add_argument("--model", required=True, help="clipjax checkpoint folder")
    p.add_argument("--images", required=True, help="folder of images (at least 2)")
    p.add_argument("--texts", required=True, help="candidate texts, one per line (e.g. image_descriptions_general.txt)")
    p.add_argument("--layers", type=int, default=4, help="last image-tower layers whose heads are described (4)")
    p.add_argument("--num-texts", type=int, default=5, help="texts chosen per head (5)")
    p.add_argument("--rank", type=int, default=80, help="top singular directions of a head's effects (80)")
    p.add_argument("--batch-size", type=int, default=32, help="per step, rounded up to a multiple of the devices")
    p.add_argument("--out", help="write the JSON result here too")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_heads)
    p = it_sub.add_parser("prune", help="write a checkpoint with attention heads zero-ablated (CCS soft-pruning)")
    p.add_argument("--model", required=True, help="clipjax checkpoint folder")
    p.add_argument("--heads", required=True, help="comma-separated heads, e.g. L11.H5,L10.H8 (0-based)")
    p.add_argument("--out-model", required=True, help="output checkpoint folder")
    p.add_argument("--tower", choices=("image", "text"), default="image")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out-model")
    p.set_defaults(func=run_prune)
