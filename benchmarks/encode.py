"""Encoder throughput: clipjax vs open_clip (PyTorch), same architecture, batch and inputs, one run.

Prints a table (images/s, texts/s, ratio clipjax / PyTorch) and writes JSON under
benchmarks/results/. On CPU both run fp32; with a GPU present both also run bf16
(clipjax compute dtype bf16; torch autocast bf16).

Usage: python benchmarks/encode.py [--arch ViT-B-32] [--batch 32] [--iters 10] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def _time(fn, iters: int, warmup: int = 2) -> float:
    """Median seconds per call of `fn` (which must block until its result is ready)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="ViT-B-32")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import open_clip
    import torch

    import clipjax
    from clipjax.convert.core import state_dict_to_pure
    from clipjax.checkpoint import pure_to_params
    from clipjax.models import clip as F

    gpu = jax.default_backend() == "gpu" and torch.cuda.is_available()
    dev = "cuda" if gpu else "cpu"
    torch.manual_seed(0)
    ref = open_clip.create_model(args.arch, pretrained=None).eval().to(dev)
    cfg = clipjax.get_config(args.arch)
    sd = {k: v.detach().cpu().numpy() for k, v in ref.state_dict().items()}
    family = "open_clip_siglip" if cfg.is_siglip else ("openai_rn" if cfg.vision.arch == "resnet" else "openai")
    params = pure_to_params(state_dict_to_pure(sd, cfg, family), cfg)

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
            tj = _time(lambda: jfn(params, jx, config=c).block_until_ready(), args.iters)

            def run_torch():
                with torch.inference_mode(), torch.autocast(dev, dtype=autocast, enabled=autocast is not None):
                    out = tfn(tx)
                if gpu:
                    torch.cuda.synchronize()
                return out

            tt = _time(run_torch, args.iters)
            rows.append(dict(tower=tower, dtype=dtype, batch=args.batch, clipjax_per_s=args.batch / tj,
                             torch_per_s=args.batch / tt, ratio=tt / tj, clipjax_ms=tj * 1e3, torch_ms=tt * 1e3))

    print(f"{args.arch}, batch {args.batch}, {'GPU ' + jax.devices()[0].device_kind if gpu else 'CPU'}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'tower':<7}{'dtype':<10}{'clipjax /s':>12}{'torch /s':>12}{'ratio':>8}")
    for r in rows:
        print(f"{r['tower']:<7}{r['dtype']:<10}{r['clipjax_per_s']:12.1f}{r['torch_per_s']:12.1f}{r['ratio']:8.2f}")

    from common import machine_info

    result = dict(benchmark="encode", arch=args.arch, rows=rows, device=jax.devices()[0].device_kind,
                  machine=machine_info(("open_clip_torch",), argv))
    out = args.out or os.path.join(os.path.dirname(__file__), "results",
                                   f"encode-{args.arch}-{'gpu' if gpu else 'cpu'}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
