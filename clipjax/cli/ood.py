"""`clipjax ood`: zero-shot OOD detection with a clipjax checkpoint, from image folders or tfds splits.

    clipjax ood --model DIR --id-classes FILE|"cat,dog,..." --id-images DIR --ood-images DIR
                [--score mcm,glmcm,energy,msp,maxlogit,neglabel,adaneg,adaneg-sample]
                [--template "a photo of a {}"] [--temperature 1] [--lambda-local 0.5]
                [--wordlist FILE] [--percentile 0.95] [--neg-fraction 0.15] [--groups N] [--seed 0]
                [--tpr 0.95] [--batch-size 64] [--limit N] [--out result.json] [--no-progress]
    clipjax ood --model DIR --id-classes FILE --id-dataset NAME [--id-split test]
                --ood-dataset NAME [--ood-split test] [--data-dir DIR] [--image-key image] ...

Scores (all ID-ness, methods.md §8-10): `mcm` (prompt `--template`, temperature T),
`glmcm` (MCM + lambda * local MCM over the MaskCLIP patch embeddings, `model.encode_dense`),
`energy` (T * logsumexp(cos / T)), `maxlogit` (max cos), `msp` (max softmax of the model's
logit scale times cos), `neglabel` (negatives mined from `--wordlist`, default the lemminflect
noun/adjective list, prompts "the nice {}" / "This is a {} photo", ID prompt "the nice {}"),
`adaneg` / `adaneg-sample` (AdaNeg with task- / sample-adaptive proxies over one stream of the ID
and OOD images, shuffled with `--seed`, batch 256 as in the paper). The result is JSON: per score,
AUROC and FPR at `--tpr` in the three conventions of `clipjax.ood.metrics` (fractions in [0, 1]).
"""

from __future__ import annotations

import os

import numpy as np

from clipjax.cli.inputs import (Encoder, embedded_images, emit, examples, image_files, image_of, open_images,
                                tfds_source)

SCORES = ("mcm", "glmcm", "energy", "msp", "maxlogit", "neglabel", "adaneg", "adaneg-sample")
NEGLABEL_SCORES = ("neglabel", "adaneg", "adaneg-sample")
DEFAULT_GROUPS = {"neglabel": 100, "adaneg": 5, "adaneg-sample": 5}


def read_class_names(spec: str) -> list[str]:
    """`--id-classes`: a file with one class name per line, or a comma-separated list."""
    from clipjax.ood.wordlist import check_class_names

    if os.path.isfile(spec):
        with open(spec, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
        if not names:
            raise ValueError(f"class-name file {spec!r} holds no class name")
    elif os.path.sep in spec or spec.endswith(".txt"):
        raise ValueError(f"class-name file {spec!r} does not exist")
    else:
        names = [n for n in spec.split(",")]
    return check_class_names(names)


def parse_scores(spec: str) -> list[str]:
    scores = [s.strip().lower() for s in spec.split(",") if s.strip()]
    unknown = [s for s in scores if s not in SCORES]
    if not scores or unknown:
        raise ValueError(f"unknown --score {unknown or spec!r}; choose from {', '.join(SCORES)}")
    if len(set(scores)) != len(scores):
        raise ValueError(f"--score lists a score twice: {spec!r}")
    return scores


class _OODEncoder:
    """Image (global and dense) and text embeddings, batched and sharded like `clipjax eval`."""

    def __init__(self, model_dir: str, batch_size: int, progress: bool):
        self.base = Encoder(model_dir, batch_size, progress)
        self.model = self.base.model

    def texts(self, texts: list[str]) -> np.ndarray:
        return self.base.texts(texts)

    def images(self, count: int, get_batch, dense: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """`[count, E]` image embeddings and, with `dense`, `[count, P, E]` patch embeddings."""
        glob, local = [], []
        with self.base._bar(count, "img") as bar:
            for start in range(0, count, self.base.batch_size):
                stop = min(start + self.base.batch_size, count)
                pixels = self.model.preprocess(get_batch(start, stop))
                glob.append(self.base._run(self.model.encode_image, pixels))
                if dense:
                    local.append(self.base._run(self.model.encode_dense, pixels))
                bar.update(stop - start)
        return (np.concatenate(glob).astype(np.float32),
                np.concatenate(local).astype(np.float32) if dense else None)


def _folder_source(folder: str, limit: int | None):
    files = image_files(folder)
    files = files[:limit] if limit else files
    return len(files), open_images(folder, files), {"folder": os.path.abspath(folder)}


def _tfds_source(name: str, split: str, data_dir: str | None, image_key: str, limit: int | None):
    _, source = tfds_source(name, split, data_dir)
    n = min(len(source), limit) if limit else len(source)

    def get(start, stop):
        return [image_of(e, image_key) for e in examples(source, start, stop)]

    return n, get, {"dataset": name, "split": split}


def _source(args, which: str):
    folder, dataset = getattr(args, f"{which}_images"), getattr(args, f"{which}_dataset")
    if bool(folder) == bool(dataset):
        raise ValueError(f"give exactly one of --{which}-images DIR or --{which}-dataset NAME")
    if folder:
        return _folder_source(folder, args.limit)
    return _tfds_source(dataset, getattr(args, f"{which}_split"), args.data_dir, args.image_key, args.limit)


def _embedded(enc: _OODEncoder, args, which: str, dense: bool):
    """(count, [N, E] embeddings, [N, P, E] patch embeddings or None, info) of the ID or OOD images."""
    folder = getattr(args, f"{which}_images")
    stored = embedded_images(folder, args.model, args.limit)  # a `clipjax embed` folder
    if stored is not None:
        if dense:
            raise ValueError(f"--{which}-images {folder} holds global embeddings only; glmcm needs patch "
                             "embeddings: give the image folder itself")
        return len(stored), stored, None, {"embeddings": os.path.abspath(folder)}
    n, get, info = _source(args, which)
    return (n, *enc.images(n, get, dense), info)


def _negatives(enc: _OODEncoder, args, id_names: list[str]) -> tuple[np.ndarray, np.ndarray, dict]:
    """ID embeddings with NegLabel's prompt and the mined negative label embeddings."""
    from clipjax import ood

    nouns, adjectives = ood.load_wordlist(args.wordlist) if args.wordlist else ood.default_wordlist()
    noun_prompts, adj_prompts = ood.negative_prompts(nouns, adjectives, exclude=id_names)
    id_emb = enc.texts([ood.NOUN_TEMPLATE.format(c) for c in id_names])
    noun_emb = enc.texts(noun_prompts) if noun_prompts else np.zeros((0, id_emb.shape[1]), np.float32)
    adj_emb = enc.texts(adj_prompts) if adj_prompts else None
    if not noun_prompts:  # only adjectives: mine them as the single part
        noun_emb, adj_emb = adj_emb, None
    mined = ood.mine_negative_labels(noun_emb, adj_emb, id_emb, args.percentile, args.neg_fraction)
    negatives = np.asarray(mined.select(noun_emb, adj_emb))
    info = {"wordlist": os.path.abspath(args.wordlist) if args.wordlist else "lemminflect (default)",
            "candidates": len(noun_prompts) + len(adj_prompts), "negatives": int(negatives.shape[0])}
    return id_emb, negatives, info


def _scores(name: str, args, ctx: dict) -> tuple[np.ndarray, dict]:
    """Scores of the concatenated [ID; OOD] images for one score name."""
    from clipjax import ood

    x, t = ctx["images"], ctx["text"]
    temp = args.temperature
    if name == "mcm":
        return np.asarray(ood.mcm(x, t, temp)), {"temperature": temp}
    if name == "glmcm":
        return (np.asarray(ood.gl_mcm(x, ctx["local"], t, temp, args.lambda_local)),
                {"temperature": temp, "lambda_local": args.lambda_local, "patches": int(ctx["local"].shape[1])})
    cos = np.asarray(ood.cosine_similarity(x, t))
    if name == "energy":
        return np.asarray(ood.energy(cos, temp)), {"temperature": temp, "logits": "cos"}
    if name == "maxlogit":
        return np.asarray(ood.max_logit(cos)), {"logits": "cos"}
    if name == "msp":
        scale = ctx["logit_scale"]
        return np.asarray(ood.msp(scale * cos, temp)), {"temperature": temp, "logit_scale": scale}
    groups = args.groups or DEFAULT_GROUPS[name]
    id_emb, neg = ctx["neg_id"], ctx["negatives"]
    groups = min(groups, neg.shape[0])
    if name == "neglabel":
        s = ood.neglabel_score(x, id_emb, neg, num_groups=groups, seed=args.seed)
        return np.asarray(s), {"groups": groups, "logit_scale": 100.0, "seed": args.seed}
    order = np.random.default_rng(args.seed).permutation(x.shape[0])  # one shuffled ID+OOD stream
    out = ood.adaneg_scores(x[order], id_emb, neg, num_groups=groups, seed=args.seed,
                            sample_adaptive=name == "adaneg-sample")
    s = np.empty(x.shape[0], np.float32)
    s[order] = np.asarray(out.score)
    return s, {"groups": groups, "batch_size": 256, "memory_length": 10, "stream": f"shuffled (seed {args.seed})"}


def run_ood(args) -> int:
    from clipjax import ood

    scores = parse_scores(args.score)
    names = read_class_names(args.id_classes)
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be a positive number of images, got {args.limit}")
    if not 0.0 < args.tpr <= 1.0:
        raise ValueError(f"--tpr must be in (0, 1], got {args.tpr}")
    if "{}" not in args.template:
        raise ValueError(f"--template must contain '{{}}' for the class name, got {args.template!r}")
    enc = _OODEncoder(args.model, args.batch_size, not args.no_progress)
    dense = "glmcm" in scores
    (id_n, id_x, id_local, id_info), (ood_n, ood_x, ood_local, ood_info) = (
        _embedded(enc, args, which, dense) for which in ("id", "ood"))
    ctx = {"images": np.concatenate([id_x, ood_x]), "text": enc.texts([args.template.format(c) for c in names]),
           "logit_scale": enc.model.logit_scale}
    if dense:
        ctx["local"] = np.concatenate([id_local, ood_local])
    result = {"model": os.path.abspath(args.model), "id": dict(id_info, num_images=id_n),
              "ood": dict(ood_info, num_images=ood_n), "num_classes": len(names), "template": args.template,
              "tpr": args.tpr, "scores": {}}
    if any(s in NEGLABEL_SCORES for s in scores):
        ctx["neg_id"], ctx["negatives"], result["negative_labels"] = _negatives(enc, args, names)
    for name in scores:
        s, params = _scores(name, args, ctx)
        s_in, s_out = s[:id_n], s[id_n:]
        entry = {"auroc": float(ood.auroc(s_in, s_out)),
                 "fpr": {c: float(ood.fpr_at_tpr(s_in, s_out, args.tpr, c)) for c in ood.CONVENTIONS},
                 "params": params}
        result["scores"][name] = entry
    return emit(result, args.out)


def register(subparsers) -> None:
    """Add `ood` to the `clipjax` command's sub-parsers."""
    p = subparsers.add_parser("ood", help="zero-shot OOD detection (MCM, GL-MCM, NegLabel, AdaNeg, ...): AUROC/FPR95",
                              description=__doc__.split("\n\n", 1)[1] if "\n\n" in __doc__ else None)
    p.add_argument("--model", required=True, help="clipjax checkpoint folder")
    p.add_argument("--id-classes", required=True, help="file with one ID class name per line, or 'cat,dog,...'")
    p.add_argument("--id-images", help="folder of in-distribution images")
    p.add_argument("--ood-images", help="folder of out-of-distribution images")
    p.add_argument("--id-dataset", help="tfds name of the ID data")
    p.add_argument("--id-split", default="test")
    p.add_argument("--ood-dataset", help="tfds name of the OOD data")
    p.add_argument("--ood-split", default="test")
    p.add_argument("--data-dir", help="tfds data folder (default: $TFDS_DATA_DIR)")
    p.add_argument("--image-key", default="image")
    p.add_argument("--limit", type=int, help="at most N images from each of the ID and OOD sets")
    p.add_argument("--score", default="mcm", help=f"comma list of: {', '.join(SCORES)} (default mcm)")
    p.add_argument("--template", default="a photo of a {}", help="ID prompt for the MCM-family scores")
    p.add_argument("--temperature", type=float, default=1.0, help="T of MCM / GL-MCM / energy / MSP (1)")
    p.add_argument("--lambda-local", type=float, default=0.5, help="GL-MCM local weight (0.5)")
    p.add_argument("--wordlist", help="NegLabel word file (word per line, optional '<TAB>adj'); "
                                      "default: the lemminflect English nouns/adjectives")
    p.add_argument("--percentile", type=float, default=0.95, help="NegLabel mining percentile (0.95)")
    p.add_argument("--neg-fraction", type=float, default=0.15, help="share of candidates kept (0.15)")
    p.add_argument("--groups", type=int, help="NegLabel/AdaNeg groups (default 100 / 5)")
    p.add_argument("--seed", type=int, default=0, help="negative-label permutation and AdaNeg stream order")
    p.add_argument("--tpr", type=float, default=0.95, help="TPR level of the reported FPR (0.95)")
    p.add_argument("--batch-size", type=int, default=64, help="per step, rounded up to a multiple of the devices")
    p.add_argument("--out", help="write the JSON result here too")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_ood)
