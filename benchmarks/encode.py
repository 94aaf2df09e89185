"""Encoder throughput: clipjax vs open_clip (PyTorch), same architecture, batch and inputs, one run.

Interleaved rounds (clipjax, torch, clipjax, torch, ...): these machines drift by 30% within a
minute, so each round's ratio (torch time / clipjax time; > 1 means clipjax is faster) is taken
against the torch call next to it, and the table quotes the median with min and max.
`--variant MODULE:FUNCTION` also times an alternative `Attention.__call__` (e.g. an experiment in a
scratch file) compiled in the same process, interleaved with the rest, to measure a change before
making it. On CPU both libraries run fp32; with a GPU both also run bf16 (torch autocast bf16).

Usage: python benchmarks/encode.py [--arch ViT-B-32] [--batch 32] [--rounds 7] [--variant M:F] [--out FILE]
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _summary(ours: list[float], theirs: list[float]) -> dict:
    ratios = [b / a for a, b in zip(ours, theirs)]
    return {"clipjax_ms": 1e3 * float(np.median(ours)), "ratio_median": float(np.median(ratios)),
            "ratio_min": float(min(ratios)), "ratio_max": float(max(ratios))}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="ViT-B-32")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--variant", help="MODULE:FUNCTION, an alternative clipjax Attention.__call__ to time too")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import torch

    from clipjax import layers
    from clipjax.models import clip as F
    from common import open_clip_pair

    variant = None
    if args.variant:
        import importlib

        module, name = args.variant.split(":")
        variant = getattr(importlib.import_module(module), name)
    gpu = jax.default_backend() == "gpu" and torch.cuda.is_available()
    dev = "cuda" if gpu else "cpu"
    ref, cfg, params = open_clip_pair(args.arch, dev)

    rng = np.random.default_rng(0)
    s = cfg.vision.image_size
    pixels = rng.normal(size=(args.batch, s, s, 3)).astype(np.float32)
    ids = rng.integers(1, cfg.text.vocab_size - 1, (args.batch, cfg.text.context_length)).astype(np.int32)
    j_pix, j_ids = jnp.asarray(pixels), jnp.asarray(ids)
    t_pix = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous().to(dev)
    t_ids = torch.from_numpy(ids).long().to(dev)

    rows = []
    modes = [("float32", None)] + ([("bfloat16", torch.bfloat16)] if gpu else [])
    for dtype, autocast in modes:
        c = cfg.replace(dtype=dtype)
        for tower, jfn, jx, tfn, tx in (("image", F.encode_image, j_pix, ref.encode_image, t_pix),
                                        ("text", F.encode_text, j_ids, ref.encode_text, t_ids)):
            ours = jax.jit(lambda p, x, jfn=jfn: jfn(p, x, config=c))
            other = jax.jit(lambda p, x, jfn=jfn: jfn(p, x, config=c))
            if variant is not None:
                current = layers.Attention.__call__
                layers.Attention.__call__ = variant  # traced (and compiled) with the variant
                try:
                    other(params, jx).block_until_ready()
                finally:
                    layers.Attention.__call__ = current

            def run_torch():
                with torch.inference_mode(), torch.autocast(dev, dtype=autocast, enabled=autocast is not None):
                    out = tfn(tx)
                if gpu:
                    torch.cuda.synchronize()
                return out

            fns = {"clipjax": lambda: ours(params, jx).block_until_ready(), "torch": run_torch}
            if variant is not None:
                fns["variant"] = lambda: other(params, jx).block_until_ready()
            for fn in fns.values():  # warm-up
                fn()
            times = {k: [] for k in ("clipjax", "torch_a", "variant", "torch_b")}
            for _ in range(args.rounds):
                times["clipjax"].append(_timed(fns["clipjax"]))
                times["torch_a"].append(_timed(fns["torch"]))
                if variant is not None:
                    times["variant"].append(_timed(fns["variant"]))
                    times["torch_b"].append(_timed(fns["torch"]))
            row = dict(tower=tower, dtype=dtype, batch=args.batch, rounds=args.rounds,
                       torch_ms=1e3 * float(np.median(times["torch_a"] + times["torch_b"])),
                       clipjax=_summary(times["clipjax"], times["torch_a"]))
            if variant is not None:
                row["variant"] = dict(_summary(times["variant"], times["torch_b"]), name=args.variant,
                                      max_abs_diff=float(jnp.abs(other(params, jx) - ours(params, jx)).max()))
            rows.append(row)

    print(f"{args.arch}, batch {args.batch}, {'GPU ' + jax.devices()[0].device_kind if gpu else 'CPU'}, "
          f"torch threads {torch.get_num_threads()}; ratio = torch time / clipjax time, median [min, max] of "
          f"{args.rounds} interleaved rounds")
    print(f"{'tower':<7}{'dtype':<10}{'torch ms':>9}{'clipjax ms':>11}{'ratio':>22}"
          + (f"{'variant ms':>11}{'ratio':>22}" if variant is not None else ""))
    for r in rows:
        line = f"{r['tower']:<7}{r['dtype']:<10}{r['torch_ms']:9.0f}"
        for key in ("clipjax", "variant"):
            if key in r:
                x = r[key]
                line += (f"{x['clipjax_ms']:11.0f}{x['ratio_median']:10.2f} [{x['ratio_min']:.2f}, "
                         f"{x['ratio_max']:.2f}]")
        print(line)

    from common import machine_info, write_result

    result = dict(benchmark="encode", arch=args.arch, rows=rows, device=jax.devices()[0].device_kind,
                  machine=machine_info(("open_clip_torch",), argv))
    write_result(result, f"encode-{args.arch}-{'gpu' if gpu else 'cpu'}.json", args.out)
    return result


if __name__ == "__main__":
    main()
