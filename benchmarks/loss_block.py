"""The streamed losses' column block: compiled memory and time of loss + gradient over block sizes.

`clipjax.losses.chunked_clip_loss` / `chunked_siglip_loss` (and the trainer's `loss_block_size`) walk
the `[B, B]` logits in `[B, block]` slabs. A smaller block needs less memory, a larger one fewer,
bigger matmuls. This sweep measures both, to choose `clipjax.losses.chunked.DEFAULT_BLOCK`:

* memory: XLA's `memory_analysis().temp_size_in_bytes` of `jit(value_and_grad)` w.r.t. (image, text,
  scale), compiled ahead of time (never executed) for every B in `--memory-sizes`, as a fraction of
  the naive loss's `B x B` float32 logits. Deterministic: it does not depend on machine load.
* time: the same function executed at every B in `--time-sizes`, interleaved round by round (each
  round runs every block once, in a rotated order, so drift hits all blocks alike); per round the
  time relative to the round's block-1024 time (the largest block when B < 1024), median [min, max]
  over rounds, plus the median seconds. The naive loss (clipjax's `clip_loss` / `siglip_loss`, the
  full logits) runs in the same rounds.

  .venv/bin/python benchmarks/loss_block.py                       # full sweep (about 10 min on 2 cores)
  .venv/bin/python benchmarks/loss_block.py --time-sizes 1024 --rounds 2 --memory-sizes 4096   # quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_info, write_result  # noqa: E402
from clipjax.losses import chunked_clip_loss, chunked_siglip_loss, clip_loss, siglip_loss  # noqa: E402

BLOCKS = (32, 64, 128, 256, 512, 1024, 2048, 4096)
REFERENCE_BLOCK = 1024


def loss_fn(loss: str, block: int | None):
    """`(image [B, D], text [B, D], scale) -> loss`: streamed with `block` columns, or naive for None."""
    if loss == "clip":
        if block is None:
            return lambda x, y, s: clip_loss(x, y, s, validate=False)
        return lambda x, y, s: chunked_clip_loss(x, y, s, block_size=block, validate=False)
    if block is None:
        return lambda x, y, s: siglip_loss(x, y, s, -10.0, validate=False)
    return lambda x, y, s: chunked_siglip_loss(x, y, s, -10.0, block_size=block, validate=False)


def compiled(loss: str, block: int | None, b: int, d: int):
    spec = jax.ShapeDtypeStruct((b, d), jnp.float32)
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    fn = jax.jit(jax.value_and_grad(loss_fn(loss, block), argnums=(0, 1, 2)))
    return fn.lower(spec, spec, scalar).compile()


def features(b: int, d: int, seed: int) -> jax.Array:
    x = jax.random.normal(jax.random.key(seed), (b, d), jnp.float32)
    return x / jnp.linalg.norm(x, axis=1, keepdims=True)


def memory_rows(losses, sizes, d, blocks):
    rows = []
    for loss in losses:
        for b in sizes:
            logits = 4 * b * b
            for block in [None, *blocks]:
                if block is not None and block > b:
                    continue
                mem = compiled(loss, block, b, d).memory_analysis()
                rows.append({"section": "memory", "loss": loss, "B": b, "D": d, "block": block or "naive",
                             "temp_bytes": int(mem.temp_size_in_bytes),
                             "fraction_of_naive_logits": mem.temp_size_in_bytes / logits})
                print(f"memory {loss:6s} B={b:6d} block={str(block or 'naive'):>5s}: "
                      f"{mem.temp_size_in_bytes / 2**20:9.1f} MiB = {100 * mem.temp_size_in_bytes / logits:7.3f}% "
                      "of the naive logits", flush=True)
    return rows


def time_rows(losses, sizes, d, blocks, rounds):
    rows = []
    for loss in losses:
        for b in sizes:
            variants = [blk for blk in blocks if blk <= b] + [None]
            fns = {blk: compiled(loss, blk, b, d) for blk in variants}
            args = (features(b, d, 0), features(b, d, 1), jnp.float32(100.0 if loss == "clip" else 10.0))
            for fn in fns.values():
                jax.block_until_ready(fn(*args))  # warm-up
            times = {blk: [] for blk in variants}
            for r in range(rounds):
                order = variants[r % len(variants):] + variants[: r % len(variants)]
                for blk in order:
                    t0 = time.perf_counter()
                    jax.block_until_ready(fns[blk](*args))
                    times[blk].append(time.perf_counter() - t0)
            ref_block = REFERENCE_BLOCK if REFERENCE_BLOCK in times else max(v for v in variants if v)
            ref = times[ref_block]
            for blk in variants:
                ratios = [t / r for t, r in zip(times[blk], ref)]
                row = {"section": "time", "loss": loss, "B": b, "D": d, "block": blk or "naive", "rounds": rounds,
                       "median_s": statistics.median(times[blk]),
                       "reference_block": ref_block,
                       "time_vs_reference": {"median": statistics.median(ratios), "min": min(ratios),
                                             "max": max(ratios)}}
                rows.append(row)
                t = row["time_vs_reference"]
                print(f"time   {loss:6s} B={b:6d} block={str(blk or 'naive'):>5s}: {row['median_s']:8.3f} s, "
                      f"x block {ref_block}: {t['median']:.2f} [{t['min']:.2f}, {t['max']:.2f}]", flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--losses", default="clip,siglip")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--blocks", default=",".join(map(str, BLOCKS)))
    p.add_argument("--memory-sizes", default="4096,16384,65536")
    p.add_argument("--time-sizes", default="2048,8192")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/loss_block.json)")
    args = p.parse_args(argv)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    losses, blocks = args.losses.split(","), ints(args.blocks)
    t0 = time.perf_counter()
    rows = memory_rows(losses, ints(args.memory_sizes), args.dim, blocks)
    rows += time_rows(losses, ints(args.time_sizes), args.dim, blocks, args.rounds)
    result = {"benchmark": "loss_block", "machine": machine_info(("jax", "jaxlib")), "settings": vars(args),
              "wall_s": round(time.perf_counter() - t0, 1), "rows": rows,
              "notes": ["memory: XLA temp bytes of jit(value_and_grad), compiled only",
                        f"time: interleaved rounds, ratio to block {REFERENCE_BLOCK} in the same round"]}
    write_result(result, "loss_block.json", args.out)


if __name__ == "__main__":
    main()
