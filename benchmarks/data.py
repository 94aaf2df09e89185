"""Input-pipeline benchmarks, one named section each (`--sections`); results in one JSON file.

Section `decode`: images per second on one core of the per-example train work a grain worker does:
decode the JPEG, open_clip's train transform (RandomResizedCrop bicubic to `--image-size`, RGB) and
tokenise the caption (`clipjax.tokenizer.Tokenizer.openai()`, one caption per call, as a map does).
Three decoders, same crops (same Generator seed per image):
  * `pil`: `PIL.Image.open` + `load()` (what open_clip's loaders do), then `train_transform`;
  * `simplejpeg`: `decode_for_train(dct=False)` (full-size libjpeg-turbo decode, bit-identical);
  * `simplejpeg_dct`: `decode_for_train(dct=True)` (DCT-domain 1/2, 1/4, 1/8 decode chosen per crop).
Inputs: the six real photos scikit-image and scikit-learn ship (longer sides 451-640 px), resized
with PIL bicubic so that the longer side is each of `--sizes` (so 256 is a downscale, 768 and 1024
are UPSAMPLED photos: smoother than camera JPEGs of that size, so they compress smaller and decode a
little faster), re-encoded as JPEG quality 90, 4:2:0. Single process, single thread: the per-core rate.
Variants run interleaved round by round (pil, simplejpeg, simplejpeg_dct, pil, ...); the ratio is
pil time / variant time within a round (> 1: faster than PIL), quoted as the median [min, max] over
rounds, because these shared machines drift by tens of percent within a minute.

Usage: .venv/bin/python benchmarks/data.py [--sections decode] [--rounds 9] [--sizes 256 512 768 1024]
       [--image-size 224] [--out FILE]
Writes benchmarks/results/data-<YYYY-MM-DD>.json unless --out is given.

Adding a section: write `def section_NAME(args) -> dict` (print its own table, return what goes in
the JSON), register it in SECTIONS, add any flags it needs in `parser()`.
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import sys
import time

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # tokenizers' Rust thread pool: one core
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo, for clipjax

CAPTIONS = ("an astronaut in a white space suit with an american flag", "a ginger cat lying on a blanket",
            "a cup of coffee on a saucer", "a rocket on the launch pad", "a pagoda among trees in china",
            "a close-up of a yellow flower")


def real_photos() -> dict[str, np.ndarray]:
    """The six colour photos shipped with scikit-image and scikit-learn, uint8 [H, W, 3]."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    out = {n: getattr(skimage.data, n)() for n in ("astronaut", "chelsea", "coffee", "rocket")}
    out.update(zip(("china", "flower"), load_sample_images().images))
    return out


def jpeg_at(arr: np.ndarray, long_side: int, quality: int = 90) -> bytes:
    """`arr` resized (PIL bicubic, up or down) so its longer side is `long_side`, as JPEG bytes."""
    from PIL import Image

    im = Image.fromarray(arr)
    s = long_side / max(im.size)
    if s != 1:
        im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _ratio_summary(base: list[float], other: list[float]) -> dict:
    r = [b / o for b, o in zip(base, other)]
    return {"median": float(np.median(r)), "min": float(min(r)), "max": float(max(r))}


# ----------------------------------------------------------------------------- section: decode


def section_decode(args) -> dict:
    import simplejpeg
    from PIL import Image

    from clipjax.data import transforms as T
    from clipjax.tokenizer import Tokenizer

    tok = Tokenizer.openai()
    aug = T.AugmentConfig()
    S = args.image_size
    photos = real_photos()
    captions = dict(zip(photos, CAPTIONS))

    def pil(data, rng, caption):
        with Image.open(io.BytesIO(data)) as im:
            im.load()
        return T.train_transform(im, S, rng, aug), tok(caption)

    def sj(data, rng, caption):
        return T.decode_for_train(data, S, rng, aug, dct=False), tok(caption)

    def sj_dct(data, rng, caption):
        return T.decode_for_train(data, S, rng, aug, dct=True), tok(caption)

    variants = {"pil": pil, "simplejpeg": sj, "simplejpeg_dct": sj_dct}
    rows = []
    for long_side in args.sizes:
        items = [(jpeg_at(a, long_side), captions[n]) for n, a in photos.items()]

        def one_pass(fn, reps):
            t = time.perf_counter()
            for r in range(reps):
                for i, (data, caption) in enumerate(items):
                    fn(data, np.random.default_rng(1000 * r + i), caption)
            return (time.perf_counter() - t) / (reps * len(items))

        # same crops for every variant: the Generator seeds are the same; outputs checked once
        for i, (data, caption) in enumerate(items):
            outs = [fn(data, np.random.default_rng(i), caption)[0] for fn in variants.values()]
            assert np.array_equal(outs[0], outs[1]), "simplejpeg full decode must equal the PIL path"
        per_image = max(one_pass(fn, 1) for fn in variants.values())  # also the warm-up
        reps = max(1, round(args.seconds_per_round / (per_image * len(items))))
        times = {k: [] for k in variants}
        for _ in range(args.rounds):
            for k, fn in variants.items():
                times[k].append(one_pass(fn, reps))
        factors = {}
        for i, (data, _) in enumerate(items):
            h, w = simplejpeg.decode_jpeg_header(data)[:2]
            for seed in range(20):
                _, _, ch, cw = T.random_resized_crop_params(np.random.default_rng(seed), h, w, aug.scale, aug.ratio)
                f = max((f for f in (2, 4, 8) if min(ch, cw) >= f * S), default=1)
                factors[f] = factors.get(f, 0) + 1
        row = {"long_side": long_side, "images": len(items), "reps_per_round": reps,
               "jpeg_kib_mean": float(np.mean([len(d) for d, _ in items]) / 1024),
               "dct_factor_counts": {str(k): v for k, v in sorted(factors.items())}, "variants": {}}
        for k in variants:
            ms = 1e3 * float(np.median(times[k]))
            row["variants"][k] = {"ms_per_image": ms, "images_per_s_per_core": 1e3 / ms,
                                  "speedup_vs_pil": _ratio_summary(times["pil"], times[k])}
        rows.append(row)

    t = time.perf_counter()
    for _ in range(200):
        for c in CAPTIONS:
            tok(c)
    tok_us = 1e6 * (time.perf_counter() - t) / (200 * len(CAPTIONS))

    print(f"\n[decode] decode + train transform ({S}x{S}) + tokenise, one core; images/s per core, "
          f"speedup = pil time / variant time, median [min, max] of {args.rounds} interleaved rounds "
          f"(tokenising alone: {tok_us:.0f} us/caption)")
    print(f"{'long side':>9} {'KiB':>5} {'DCT factors (of 120 crops)':>27}" + "".join(f"{k:>30}" for k in variants))
    for r in rows:
        line = f"{r['long_side']:>9} {r['jpeg_kib_mean']:5.0f} {str(r['dct_factor_counts']):>27}"
        for k, v in r["variants"].items():
            s = v["speedup_vs_pil"]
            line += f"{v['images_per_s_per_core']:9.0f}/s {s['median']:5.2f}x [{s['min']:.2f}, {s['max']:.2f}]"
        print(line)
    return {"image_size": S, "rounds": args.rounds, "aug": {"scale": aug.scale, "ratio": aug.ratio},
            "inputs": "skimage astronaut/chelsea/coffee/rocket + sklearn china/flower, PIL-bicubic resized to the "
                      "longer side (upsampled where larger than native 451-640 px), JPEG q90 4:2:0",
            "tokenize_us_per_caption": tok_us, "rows": rows}


# ----------------------------------------------------------------------------- section: pipeline


def section_pipeline(args) -> dict:
    """Examples/s of the whole `clipjax.data` pipeline (tar shards -> decode + train transform +
    tokenise -> batches) against grain worker count, and whether a train step would wait on it.

    Shards: `--pipeline-shards` tar files of 64 real photos each at `--pipeline-side` px (JPEG q90).
    Per round and worker count: a fresh pipeline, one warm-up batch (worker start-up excluded),
    then `--pipeline-batches` timed batches; worker counts interleaved round by round. The step
    comparison reads clipjax's full-step samples/s from benchmarks/results/train_step-*.json.
    """
    import glob
    import tarfile
    import tempfile

    from clipjax.data import DataConfig, make_batches
    from clipjax.tokenizer import Tokenizer

    photos = list(real_photos().values())
    tmp = tempfile.mkdtemp(prefix="clipjax-bench-data-")
    for s in range(args.pipeline_shards):
        with tarfile.open(os.path.join(tmp, f"{s:05d}.tar"), "w") as tar:
            for i in range(64):
                key = f"{s:05d}{i:04d}"
                for ext, data in (("jpg", jpeg_at(photos[(s + i) % len(photos)], args.pipeline_side)),
                                  ("txt", CAPTIONS[(s + i) % len(CAPTIONS)].encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    tok = Tokenizer.openai()
    workers = args.pipeline_workers
    times = {w: [] for w in workers}
    batch = 32
    for _ in range(args.pipeline_rounds):
        for w in workers:
            it = make_batches(DataConfig(source=os.path.join(tmp, "*.tar"), num_workers=w, shuffle_buffer=256),
                              image_size=args.image_size, tokenizer=tok, batch_size=batch, seed=0)
            next(it)
            t = time.perf_counter()
            for _ in range(args.pipeline_batches):
                next(it)
            times[w].append(time.perf_counter() - t)
            it.close()
    rate = {w: args.pipeline_batches * batch / float(np.median(ts)) for w, ts in times.items()}
    step = {}
    for path in sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                              "train_step-*.json"))):
        import json

        with open(path) as f:
            for r in json.load(f)["rows"]:
                if r.get("phase", "").startswith("full"):
                    name = f"{os.path.basename(path)}:{r['arch']}:{r['dtype']}:b{r['batch']}"
                    step[name] = r["clipjax_samples_per_s"]
    print(f"\npipeline: {args.pipeline_shards} shards x 64 JPEGs at {args.pipeline_side} px -> {args.image_size} px, "
          f"batch {batch}, {os.cpu_count()} cores")
    print(f"{'workers':>8} {'examples/s':>11} {'vs 0 workers':>22}")
    out_rows = []
    for w in workers:
        s = _ratio_summary(times[workers[0]], times[w])
        print(f"{w:>8} {rate[w]:11.0f} {s['median']:9.2f}x [{s['min']:.2f}, {s['max']:.2f}]")
        out_rows.append({"workers": w, "examples_per_s": rate[w], "speedup_vs_first": s})
    best = max(rate.values())
    waits = {k: {"step_samples_per_s": v, "would_wait": v > best} for k, v in step.items()}
    for k, v in waits.items():
        print(f"train step {k}: {v['step_samples_per_s']:.1f} samples/s -> "
              f"{'waits on data' if v['would_wait'] else 'data keeps up'} (pipeline best {best:.0f}/s)")
    return {"shards": args.pipeline_shards, "side": args.pipeline_side, "batch": batch, "rows": out_rows,
            "rounds": args.pipeline_rounds, "train_step_comparison": waits}


SECTIONS = {"decode": section_decode, "pipeline": section_pipeline}


# ----------------------------------------------------------------------------- driver


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 768, 1024], help="JPEG longer sides, px")
    ap.add_argument("--image-size", type=int, default=224, help="train crop output side, px")
    ap.add_argument("--seconds-per-round", type=float, default=0.4, help="time per variant per round (decode)")
    ap.add_argument("--pipeline-workers", type=int, nargs="+", default=[0, 1, 2], help="grain worker counts")
    ap.add_argument("--pipeline-shards", type=int, default=4)
    ap.add_argument("--pipeline-side", type=int, default=512, help="JPEG longer side of the pipeline's shards, px")
    ap.add_argument("--pipeline-batches", type=int, default=6, help="timed batches of 32 per round")
    ap.add_argument("--pipeline-rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    return ap


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    from common import machine_info, write_result

    info = machine_info(("pillow", "simplejpeg", "tokenizers", "grain"), argv)
    result = {"benchmark": "data", "machine_info": info, "sections": {}}
    for name in args.sections:
        t = time.perf_counter()
        result["sections"][name] = SECTIONS[name](args)
        result["sections"][name]["wall_s"] = time.perf_counter() - t
    write_result(result, f"data-{datetime.date.today().isoformat()}.json", args.out)
    return result


if __name__ == "__main__":
    main()
