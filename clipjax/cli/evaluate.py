"""`clipjax eval` and `clipjax score`: evaluate a clipjax checkpoint from the command line.

    clipjax eval zeroshot  --model DIR --dataset cifar10 [--split test] [--batch-size 64]
                           [--data-dir DIR] [--templates NAME] [--limit N] [--out result.json]
    clipjax eval retrieval --model DIR --dataset coco_captions [--recall-k 1,5,10] ...
    clipjax score clipscore --model DIR --images FOLDER --captions FILE [--out JSON]
    clipjax score fclipscore --model DIR --images FOLDER --captions FILE [--mode threshold|most_negative]
                            [--threshold -5e-5] [--layers 3] [--out JSON]
    clipjax score cmmd      --model DIR --images FOLDER --reference-images FOLDER [--out JSON]
    clipjax score vendi     --model DIR [--images FOLDER] [--captions FILE] [--q 0.5,1,2,inf]

cmmd, vendi and ood take a `clipjax embed` output folder wherever they take an image folder, and
use its stored image embeddings (made with the same --model).

`eval` reads tensorflow-datasets data sets prepared under `--data-dir` (default
`$TFDS_DATA_DIR`) through `tfds.data_source` (ArrayRecord; no TensorFlow needed).
Captions files hold one caption per line (paired with the images of the folder in
sorted file-name order) or JSON lines `{"image": "a.jpg", "caption": "...",
"references": ["...", ...]}`. Batches are padded to a fixed size (one compilation)
and sharded over all available devices. Results are printed as JSON and written to
`--out`.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from clipjax.cli.inputs import (Encoder, captions_of, embedded_images, emit, examples, field, image_files,
                                image_of, open_images, pair_captions, read_captions, tfds_source)


# ----------------------------------------------------------------------------- commands


def _zeroshot_names(builder, dataset: str, label_key: str, templates_name: str | None):
    from clipjax.metrics import templates as tpl

    feature = builder.info.features[label_key]
    names = getattr(feature, "names", None)
    if not names:
        raise ValueError(f"feature {label_key!r} of {dataset!r} is not a ClassLabel with names")
    try:
        curated = tpl.get_classnames(dataset)
        names = curated if len(curated) == len(names) else names
    except KeyError:
        pass
    names = [n.replace("_", " ") for n in names]
    try:
        temps = tpl.get_templates(templates_name or dataset)
    except KeyError as e:
        if templates_name:
            raise ValueError(str(e).strip("'\"")) from None
        print(f"clipjax eval: no templates for {dataset!r}; using OpenAI's 80 ImageNet templates", file=sys.stderr)
        temps = tpl.openai_imagenet_templates()
    return names, temps


def _check_limit(args) -> None:
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be a positive number of examples, got {args.limit}")


def eval_zeroshot(args) -> int:
    from clipjax import metrics

    _check_limit(args)
    builder, source = tfds_source(args.dataset, args.split, args.data_dir)
    names, temps = _zeroshot_names(builder, args.dataset, args.label_key, args.templates)
    enc = Encoder(args.model, args.batch_size, not args.no_progress)
    weights = metrics.zeroshot_classifier(enc.texts, names, temps, batch_size=len(names) * len(temps))
    n = min(len(source), args.limit) if args.limit else len(source)
    labels = []

    def get(start, stop):
        exs = examples(source, start, stop)
        labels.extend(int(field(e, args.label_key)) for e in exs)
        return [image_of(e, args.image_key) for e in exs]

    emb = enc.images(n, get)
    result = metrics.zeroshot_metrics(emb, np.asarray(labels, np.int32), weights)
    return emit({"task": "zeroshot_classification", "model": os.path.abspath(args.model), "dataset": args.dataset,
                  "split": args.split, "num_examples": n, "num_classes": len(names), "num_templates": len(temps),
                  "metrics": {k: float(v) for k, v in result.items()}}, args.out)


def eval_retrieval(args) -> int:
    from clipjax import metrics

    _check_limit(args)
    _, source = tfds_source(args.dataset, args.split, args.data_dir)
    enc = Encoder(args.model, args.batch_size, not args.no_progress)
    n = min(len(source), args.limit) if args.limit else len(source)
    captions, t2i = [], []

    def get(start, stop):
        exs = examples(source, start, stop)
        for i, e in enumerate(exs, start):
            caps = captions_of(e, args.caption_key)
            captions.extend(caps)
            t2i.extend([i] * len(caps))
        return [image_of(e, args.image_key) for e in exs]

    img = enc.images(n, get)
    txt = enc.texts(captions)
    result = metrics.recall_at_k(txt, img, np.asarray(t2i, np.int32), tuple(args.recall_k))
    return emit({"task": "zeroshot_retrieval", "model": os.path.abspath(args.model), "dataset": args.dataset,
                  "split": args.split, "num_images": n, "num_captions": len(captions),
                  "metrics": {k: float(v) for k, v in result.items()}}, args.out)


def score_clipscore(args) -> int:
    from clipjax import metrics

    files = image_files(args.images)
    pairs = pair_captions(files, read_captions(args.captions), args.images)
    enc = Encoder(args.model, args.batch_size, not args.no_progress)
    order = [p["image"] for p in pairs]
    img = enc.images(len(order), open_images(args.images, order))
    caps = [p["caption"] for p in pairs]
    cand = enc.texts(metrics.clipscore_prompts(caps))
    per = np.asarray(metrics.clip_score(img, cand))
    result = {"model": os.path.abspath(args.model), "num_images": len(pairs), "clip_score": float(per.mean()),
              "torchmetrics_clip_score": float(metrics.torchmetrics_clip_score(img, enc.texts(caps)))}
    per_ref = None
    if any("references" in p for p in pairs):
        if not all("references" in p for p in pairs):
            raise ValueError("RefCLIPScore needs 'references' on every captions line")
        r_max = max(len(p["references"]) for p in pairs)
        flat = [r for p in pairs for r in p["references"]]
        ref_emb = enc.texts(metrics.clipscore_prompts(flat))
        padded = np.zeros((len(pairs), r_max, ref_emb.shape[1]), np.float32)
        mask = np.zeros((len(pairs), r_max), bool)
        pos = 0
        for i, p in enumerate(pairs):
            k = len(p["references"])
            padded[i, :k], mask[i, :k] = ref_emb[pos:pos + k], True
            pos += k
        padded[~mask] = 1.0  # never read; keeps validation happy
        per_ref = np.asarray(metrics.ref_clip_score(img, cand, padded, mask))
        result["ref_clip_score"] = float(per_ref.mean())
    result["per_image"] = []
    for i, (p, s) in enumerate(zip(pairs, per)):
        row = {"image": p["image"], "clip_score": float(s)}
        if per_ref is not None:
            row["ref_clip_score"] = float(per_ref[i])
        result["per_image"].append(row)
    return emit(result, args.out)


def score_fclipscore(args) -> int:
    """CLIP4DM word attributions and F-CLIPScore (`clipjax.metrics.fclipscore`), float32, one device."""
    import clipjax
    from clipjax.metrics import clipscore_prompts
    from clipjax.metrics import fclipscore as fcs

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    files = image_files(args.images)
    pairs = pair_captions(files, read_captions(args.captions), args.images)
    model = clipjax.load(args.model)
    if model.tokenizer is None or model.tokenizer.kind != "clip_bpe":
        raise ValueError("score fclipscore needs a checkpoint with a CLIP BPE tokenizer (CLIP4DM groups BPE tokens "
                         "into words)")
    order = [p["image"] for p in pairs]
    caps = [p["caption"] for p in pairs]
    get = open_images(args.images, order)
    prefix_len = fcs.prefix_length(model.tokenizer)
    batch = min(args.batch_size, len(pairs))
    rows = []
    for start in range(0, len(pairs), batch):
        stop = min(start + batch, len(pairs))
        pixels = model.preprocess(get(start, stop))
        ids = np.asarray(model.tokenize(clipscore_prompts(caps[start:stop])), np.int32)
        n = stop - start
        if n < batch:  # repeat the last row: one static batch shape, one compilation
            pixels = np.concatenate([pixels, np.repeat(pixels[-1:], batch - n, axis=0)])
            ids = np.concatenate([ids, np.repeat(ids[-1:], batch - n, axis=0)])
        rel = fcs.clip4dm_relevance(model.params, pixels, ids, config=model.config, layers=args.layers,
                                    prefix_len=prefix_len)
        words = fcs.caption_words(model.tokenizer, caps[start:stop])
        tokens = np.asarray(rel.tokens)[:n]
        scores, _ = fcs.word_scores(tokens, words.word_index, words.word_mask.shape[1])
        neg, selected = fcs.misaligned_words(scores, words.word_mask, mode=args.mode, threshold=args.threshold,
                                             punctuation=words.punctuation)
        sim = np.asarray(rel.similarity)[:n]
        fscore = np.asarray(fcs.f_clipscore(neg, sim))
        scores, neg, selected = np.asarray(scores), np.asarray(neg), np.asarray(selected)
        for i in range(n):
            ws = words.words[i]
            found = sorted(((ws[w], float(scores[i, w])) for w in np.flatnonzero(selected[i])), key=lambda e: e[1])
            rows.append({"image": order[start + i], "caption": caps[start + i],
                         "clip_score": float(2.5 * max(float(sim[i]), 0.0)), "f_clipscore": float(fscore[i]),
                         "negative_attribution": float(neg[i]), "misaligned_words": [list(e) for e in found],
                         "word_attributions": [[w, float(scores[i, j])] for j, w in enumerate(ws)]})
    result = {"model": os.path.abspath(args.model), "num_images": len(rows), "mode": args.mode,
              "threshold": args.threshold, "layers": args.layers, "precision": "float32",
              "clip_score": float(np.mean([r["clip_score"] for r in rows])),
              "f_clipscore": float(np.mean([r["f_clipscore"] for r in rows])), "per_image": rows}
    return emit(result, args.out)


def score_cmmd(args) -> int:
    from clipjax import metrics

    enc = None
    sets = []
    for folder in (args.images, args.reference_images):
        emb = embedded_images(folder, args.model)  # a `clipjax embed` folder: its stored vectors
        if emb is None:
            enc = enc or Encoder(args.model, args.batch_size, not args.no_progress)
            files = image_files(folder)
            emb = enc.images(len(files), open_images(folder, files))
        sets.append(emb)
    x, y = sets
    value = float(metrics.cmmd(x, y))
    return emit({"model": os.path.abspath(args.model), "num_images": len(x), "num_reference_images": len(y),
                  "cmmd": value}, args.out)


def _qs(text: str) -> list:
    out = []
    for v in text.split(","):
        v = v.strip().lower()
        out.append("inf" if v == "inf" else float(v))
    return out


def score_vendi(args) -> int:
    from clipjax import metrics

    if not args.images and not args.captions:
        raise ValueError("give --images FOLDER and/or --captions FILE")
    enc = Encoder(args.model, args.batch_size, not args.no_progress)
    result = {"model": os.path.abspath(args.model)}
    sets = {}
    if args.images:
        sets["images"] = embedded_images(args.images, args.model)  # a `clipjax embed` folder: its vectors
        if sets["images"] is None:
            files = image_files(args.images)
            sets["images"] = enc.images(len(files), open_images(args.images, files))
    if args.captions:
        sets["captions"] = enc.texts([c["caption"] for c in read_captions(args.captions)])
    for name, emb in sets.items():
        result[name] = {"n": int(emb.shape[0]),
                        "vendi": {f"q={q}": float(metrics.vendi_score(emb, q)) for q in args.q}}
    return emit(result, args.out)


def register(subparsers) -> None:
    """Add `eval` and `score` to the `clipjax` command's sub-parsers."""

    def common(p):
        p.add_argument("--model", required=True, help="clipjax checkpoint folder")
        p.add_argument("--batch-size", type=int, default=64, help="per step, rounded up to a multiple of the devices")
        p.add_argument("--out", help="write the JSON result here too")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")

    ev = subparsers.add_parser("eval", help="zero-shot classification / retrieval on tensorflow-datasets data")
    ev_sub = ev.add_subparsers(dest="eval_task", required=True)
    for task, fn, helptext in (("zeroshot", eval_zeroshot, "zero-shot classification (acc1, acc5, balanced acc.)"),
                               ("retrieval", eval_retrieval, "image-text retrieval Recall@K")):
        p = ev_sub.add_parser(task, help=helptext)
        common(p)
        p.add_argument("--dataset", required=True, help="tfds name, e.g. cifar10, imagenet2012, coco_captions")
        p.add_argument("--split", default="test")
        p.add_argument("--data-dir", help="tfds data folder (default: $TFDS_DATA_DIR)")
        p.add_argument("--limit", type=int, help="only the first N examples")
        p.add_argument("--image-key", default="image")
        if task == "zeroshot":
            p.add_argument("--label-key", default="label")
            p.add_argument("--templates", help="template set name (default: the data set's, else OpenAI ImageNet)")
        else:
            p.add_argument("--caption-key", default="captions", help="feature with the captions (a/b for nesting)")
            p.add_argument("--recall-k", type=lambda s: [int(v) for v in s.split(",")], default=[1, 5, 10])
        p.set_defaults(func=fn)

    sc = subparsers.add_parser("score", help="CLIPScore, F-CLIPScore, CMMD or Vendi of image folders and captions")
    sc_sub = sc.add_subparsers(dest="score_task", required=True)
    p = sc_sub.add_parser("clipscore", help="CLIPScore (Hessel), RefCLIPScore, torchmetrics' CLIPScore")
    common(p)
    p.add_argument("--images", required=True, help="folder of images")
    p.add_argument("--captions", required=True, help="one caption per line, or JSON lines with references")
    p.set_defaults(func=score_clipscore)
    p = sc_sub.add_parser("fclipscore", help="F-CLIPScore and misaligned words (CLIP4DM gradient x attention)")
    common(p)
    p.add_argument("--images", required=True, help="folder of images")
    p.add_argument("--captions", required=True, help="one caption per line, or JSON lines")
    p.add_argument("--mode", choices=("threshold", "most_negative"), default="threshold",
                   help="threshold: words with attribution < --threshold (their sum); most_negative: the lowest word")
    p.add_argument("--threshold", type=float, default=-5e-5, help="threshold mode's cut-off")
    p.add_argument("--layers", type=int, default=3, help="last text blocks averaged")
    p.set_defaults(func=score_fclipscore)
    p = sc_sub.add_parser("cmmd", help="CMMD between two image folders")
    common(p)
    p.add_argument("--images", required=True)
    p.add_argument("--reference-images", required=True)
    p.set_defaults(func=score_cmmd)
    p = sc_sub.add_parser("vendi", help="Vendi score of an image folder and/or a captions file")
    common(p)
    p.add_argument("--images")
    p.add_argument("--captions")
    p.add_argument("--q", type=_qs, default=[0.5, 1.0, 2.0, "inf"], help="comma-separated orders")
    p.set_defaults(func=score_vendi)
