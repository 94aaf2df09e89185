"""Train-step throughput: clipjax vs open_clip (torch AdamW, same loss), same model, batch and inputs.

A full step = forward of both towers, CLIP loss, backward, AdamW update (open_clip's param
groups, grad clipping, logit-scale clamp). Timings are interleaved, clipjax then torch, pair after
pair (these machines drift by 30% within a minute), and the table quotes the median of the
per-pair ratios (torch time / clipjax time: > 1 means clipjax is faster) with min and max.
Phases (forward + loss; forward + loss + backward; full step) are timed the same way, to show
where a step gains or loses time. MFU: XLA's FLOP count of the compiled step / step time / peak
(`clipjax.train.observe.peak_flops`: vendor bf16 tables; on CPU a measured fp32 matmul peak).
On a GPU, bf16 is timed too (clipjax compute dtype bf16 with fp32 params; torch autocast bf16).

Usage: python benchmarks/train_step.py [--arch ViT-B-32,ViT-B-16] [--batch 16] [--pairs 7] [--out FILE]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def interleaved(fa, fb, pairs: int, warmup: int = 1) -> dict:
    """Run a, b, a, b, ...; per-pair ratio t_b / t_a; median, min, max and median times."""
    for _ in range(warmup):
        fa()
        fb()
    ta, tb = [], []
    for _ in range(pairs):
        ta.append(_timed(fa))
        tb.append(_timed(fb))
    ratios = [b / a for a, b in zip(ta, tb)]
    return {"clipjax_s": float(np.median(ta)), "torch_s": float(np.median(tb)), "ratio_median": float(np.median(ratios)),
            "ratio_min": float(min(ratios)), "ratio_max": float(max(ratios)), "pairs": pairs}


def bench_arch(arch: str, batch: int, pairs: int, dtype: str, gpu: bool) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import torch
    from open_clip.loss import ClipLoss

    from clipjax import losses
    from clipjax.models import clip as F
    from common import open_clip_pair
    from clipjax.train import TrainConfig, init_state, make_optimizer, make_train_step
    from clipjax.train.observe import compiled_flops, peak_flops
    from clipjax.train.step import normalize_images

    dev = "cuda" if gpu else "cpu"
    ref, cfg, model_state = open_clip_pair(arch, dev, output_dict=True)
    ref.train()
    cfg = cfg.replace(dtype=dtype)

    tc = TrainConfig(loss="clip", batch_size=batch, total_steps=10_000, warmup_steps=10, lr=5e-4,
                     grad_clip_norm=1.0, dtype=dtype)
    optimizer = make_optimizer(tc, F.split_trainable(model_state)[0], cfg)
    state, _ = init_state(cfg, optimizer, seed=0, ema=False, model_state=model_state)
    step = make_train_step(cfg, tc, optimizer)

    rng = np.random.default_rng(0)
    s = cfg.vision.image_size
    images = rng.integers(0, 256, (batch, s, s, 3)).astype(np.uint8)
    ids = rng.integers(1, cfg.text.vocab_size - 1, (batch, cfg.text.context_length)).astype(np.int32)
    jbatch = {"image": jnp.asarray(images), "text": jnp.asarray(ids)}
    compiled = step.jitted.lower(state, jbatch, None).compile()
    flops = compiled_flops(compiled)
    mem = compiled.memory_analysis()
    holder = {"state": state}

    def jax_step():
        holder["state"], m = compiled(holder["state"], jbatch, None)
        m["loss"].block_until_ready()

    def jax_forward(with_grad: bool):
        def loss_fn(params, stats):
            px = normalize_images(jbatch["image"], cfg)
            out = F.forward(F.merge_state(params, stats), px, jbatch["text"], config=cfg, train=True)
            return losses.clip_loss(out["image"], out["text"], out["logit_scale"])

        fn = jax.jit(jax.value_and_grad(loss_fn) if with_grad else loss_fn)
        return lambda: jax.block_until_ready(fn(holder["state"].params, holder["state"].batch_stats))

    mean = np.asarray(cfg.preprocess.mean, np.float32)
    std = np.asarray(cfg.preprocess.std, np.float32)
    t_pix = torch.from_numpy(((images.astype(np.float32) / 255 - mean) / std).transpose(0, 3, 1, 2).copy()).to(dev)
    t_ids = torch.from_numpy(ids).long().to(dev)
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = list(ref.named_parameters())
    opt = torch.optim.AdamW([{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
                             {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": 0.2}],
                            lr=5e-4, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = ClipLoss()
    autocast = torch.bfloat16 if dtype == "bfloat16" else None

    def torch_loss():
        with torch.autocast(dev, dtype=autocast, enabled=autocast is not None):
            out = ref(t_pix, t_ids)
            return loss_fn(out["image_features"], out["text_features"], out["logit_scale"])

    def sync():
        if gpu:
            torch.cuda.synchronize()

    def torch_forward(with_grad: bool):
        def run():
            if with_grad:
                opt.zero_grad(set_to_none=True)
                torch_loss().backward()
            else:
                with torch.no_grad():
                    torch_loss()
            sync()
        return run

    def torch_step():
        opt.zero_grad(set_to_none=True)
        torch_loss().backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            ref.logit_scale.clamp_(0, math.log(100))
        sync()

    if gpu:
        torch.cuda.reset_peak_memory_stats()
    peak, peak_how = peak_flops()
    rows = []
    for phase, fa, fb in (("forward+loss", jax_forward(False), torch_forward(False)),
                          ("forward+loss+backward", jax_forward(True), torch_forward(True)),
                          ("full step (AdamW)", jax_step, torch_step)):
        r = interleaved(fa, fb, pairs)
        r.update(arch=arch, dtype=dtype, batch=batch, phase=phase,
                 clipjax_samples_per_s=batch / r["clipjax_s"], torch_samples_per_s=batch / r["torch_s"])
        if phase.startswith("full"):
            r["clipjax_step_flops"] = flops
            r["clipjax_mfu"] = flops / r["clipjax_s"] / peak if flops else None
            r["peak_flops"], r["peak_flops_source"] = peak, peak_how
            r["clipjax_temp_bytes"] = mem.temp_size_in_bytes
            r["clipjax_argument_bytes"] = mem.argument_size_in_bytes
            r["torch_peak_bytes"] = torch.cuda.max_memory_allocated() if gpu else None
        rows.append(r)
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="ViT-B-32,ViT-B-16")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--pairs", type=int, default=7)
    ap.add_argument("--dtypes", default=None, help="compute dtypes to time (default: float32, and bfloat16 on a GPU)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import jax
    import torch

    gpu = jax.default_backend() == "gpu" and torch.cuda.is_available()
    rows = []
    for arch in args.arch.split(","):
        for dtype in args.dtypes.split(",") if args.dtypes else ["float32"] + (["bfloat16"] if gpu else []):
            rows += bench_arch(arch, args.batch, args.pairs, dtype, gpu)

    device = jax.devices()[0].device_kind if gpu else f"CPU, torch threads {torch.get_num_threads()}"
    print(f"train step, batch {args.batch}, {device}; ratio = torch time / clipjax time (median [min, max] of "
          f"{args.pairs} interleaved pairs)")
    print(f"{'arch':<10}{'dtype':<10}{'phase':<24}{'clipjax ms':>11}{'torch ms':>10}{'ratio':>7}{'  [min, max]':<15}"
          f"{'clipjax /s':>11}{'MFU':>7}")
    for r in rows:
        mfu = f"{r['clipjax_mfu']:.1%}" if r.get("clipjax_mfu") else ""
        print(f"{r['arch']:<10}{r['dtype']:<10}{r['phase']:<24}{r['clipjax_s'] * 1e3:11.0f}{r['torch_s'] * 1e3:10.0f}"
              f"{r['ratio_median']:7.2f}  [{r['ratio_min']:.2f}, {r['ratio_max']:.2f}]   "
              f"{r['clipjax_samples_per_s']:9.1f}{mfu:>8}")

    from common import machine_info, write_result

    result = dict(benchmark="train_step", rows=rows, device=device,
                  machine=machine_info(("open_clip_torch", "optax"), argv))
    write_result(result, f"train_step-{'gpu' if gpu else 'cpu'}.json", args.out)
    return result


if __name__ == "__main__":
    main()
