"""Where a CPU train step loses to torch: the GEMMs of its backward pass, XLA:CPU against torch.

A train step's backward pass is dominated by three GEMMs per dense layer: the forward product
`X @ W`, the input gradient `dY @ W.T`, and the weight gradient `X.T @ dY` (its contraction runs
over the token axis, so the left operand is transposed). This times each of them for the dense
layers of a ViT-B/32 train step (image MLP and attention projections, text MLP) in jitted JAX and in
torch, interleaved pair by pair, and quotes the median of per-pair ratios (torch time / JAX time,
> 1: JAX faster) with min and max; fp32, torch with as many threads as JAX's CPU client uses.

  .venv/bin/python benchmarks/cpu_gemm.py [--batch 16] [--pairs 25]
  XLA_FLAGS=--xla_cpu_use_onednn=true .venv/bin/python benchmarks/cpu_gemm.py   # try an XLA:CPU option

Writes benchmarks/results/cpu_gemm.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_info, write_result  # noqa: E402


def shapes(batch: int) -> list[tuple[str, int, int, int]]:
    """(layer, tokens M, in K, out N) of ViT-B/32's dense layers in a batch of `batch` pairs."""
    img, txt = batch * 50, batch * 77
    return [("image mlp fc", img, 768, 3072), ("image attn proj", img, 768, 768),
            ("text mlp fc", txt, 512, 2048), ("text attn proj", txt, 512, 512)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--pairs", type=int, default=25)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    products = {"forward X @ W": (lambda x, w, dy: (x, w), lambda a, b: a @ b),
                "input grad dY @ W.T": (lambda x, w, dy: (dy, w), lambda a, b: a @ b.T),
                "weight grad X.T @ dY": (lambda x, w, dy: (x, dy), lambda a, b: a.T @ b)}
    rng = np.random.default_rng(0)
    rows = []
    for layer, m, k, n in shapes(args.batch):
        x, w, dy = (rng.standard_normal(s).astype(np.float32) for s in ((m, k), (k, n), (m, n)))
        for name, (pick, fn) in products.items():
            a, b = pick(x, w, dy)
            ja, jb, ta, tb = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
            jf = jax.jit(fn)
            jf(ja, jb).block_until_ready()
            fn(ta, tb)
            tj, tt = [], []
            for _ in range(args.pairs):
                t0 = time.perf_counter()
                jf(ja, jb).block_until_ready()
                tj.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                fn(ta, tb)
                tt.append(time.perf_counter() - t0)
            ratios = [b / a for a, b in zip(tj, tt)]
            flops = 2.0 * m * k * n
            row = {"layer": layer, "product": name, "M": m, "K": k, "N": n, "pairs": args.pairs,
                   "jax_ms": 1e3 * statistics.median(tj), "torch_ms": 1e3 * statistics.median(tt),
                   "jax_gflops": flops / statistics.median(tj) / 1e9,
                   "torch_gflops": flops / statistics.median(tt) / 1e9,
                   "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}
            rows.append(row)
            print(f"{layer:16s} {name:22s} [{m}x{k}]x[{k}x{n}]  jax {row['jax_gflops']:6.1f} GFLOP/s  torch "
                  f"{row['torch_gflops']:6.1f}  torch/jax {row['ratio_median']:.2f} [{row['ratio_min']:.2f}, "
                  f"{row['ratio_max']:.2f}]", flush=True)
    result = {"benchmark": "cpu_gemm", "machine": machine_info(("jax", "jaxlib", "torch")),
              "xla_flags": os.environ.get("XLA_FLAGS", ""), "torch_threads": torch.get_num_threads(),
              "settings": vars(args), "rows": rows}
    write_result(result, "cpu_gemm.json", args.out)


if __name__ == "__main__":
    main()
