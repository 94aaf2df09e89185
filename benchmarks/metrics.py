"""Benchmark clipjax.metrics against the reference packages, side by side in one run.

Sections (each writes `benchmarks/results/metrics_<section>.json`; `metrics.png` plots all):
- vendi:  Vendi score q=1 at d=768. Dual form for n = 1e4 .. 1e6 against
          `vendi_score.vendi.score_dual`; kernel form for n <= --vendi-kernel-max against
          `vendi_score.vendi.score_X` (its n x n eigendecomposition is what limits it).
- cmmd:   CMMD at d=768, n = m up to --cmmd-max, against `clip_mmd.calculation.mmd_efficient`
          (float32, low_mem) where it runs in reasonable time, and the float64 value.
- recall: Recall@{1,5,10}. Text->image top-k at --recall-n queries x --recall-n items (d=512,
          the headline), and both directions at --recall-ref-n against CLIP_benchmark's `recall_at_k`
          (which materialises the full score matrix: 1e5 x 1e5 would need 40 GB).

Times are wall-clock seconds on this machine with `block_until_ready`; "first" includes
jit compilation, "run" is the best of the repeats after it (a single first call for runs
longer than --single-run-above seconds). Speed is reported, never asserted.

Usage:
  .venv/bin/python benchmarks/metrics.py                     # all sections, default sizes
  .venv/bin/python benchmarks/metrics.py --sections vendi --vendi-n 10000,100000
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from common import machine_info

from clipjax import metrics

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


PACKAGES = ("scipy", "scikit-learn", "vendi-score", "clip-mmd", "clip-benchmark")



def timed(fn, repeats: int = 3, single_above: float = 20.0) -> dict:
    """Time `fn()` (which must block): first call, then the best of `repeats` more if it was fast."""
    t0 = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t0
    runs = []
    if first < single_above:
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = fn()
            runs.append(time.perf_counter() - t0)
    return {"first_s": first, "run_s": min(runs) if runs else None, "value": out}


def block(x):
    return float(jax.block_until_ready(x))


def embeddings(key, n: int, d: int, rank: int = 64, chunk: int = 131072) -> jax.Array:
    """Float32 `[n, d]` embeddings with low-rank structure plus noise, generated in chunks."""
    chunk = min(chunk, n)
    mix = jax.random.normal(jax.random.fold_in(key, 10**6), (rank, d)) / np.sqrt(rank)

    @jax.jit
    def make(k):
        k1, k2 = jax.random.split(k)
        return jax.random.normal(k1, (chunk, rank)) @ mix + 0.5 * jax.random.normal(k2, (chunk, d))

    parts = [make(jax.random.fold_in(key, i)) for i in range(-(-n // chunk))]
    return jnp.concatenate(parts)[:n]


def unit(x):
    return x / jnp.linalg.norm(x, axis=1, keepdims=True)


def bench_vendi(args) -> list[dict]:
    from vendi_score import vendi

    rows = []
    for n in args.vendi_n:
        x = embeddings(jax.random.key(n), n, 768)
        xn = np.asarray(x)
        ours = timed(lambda: block(metrics.vendi_score(x, 1, form="dual")), args.repeats, args.single_run_above)
        ref = timed(lambda: float(vendi.score_dual(xn, q=1)), args.repeats, args.single_run_above)
        rows.append(_row("vendi_dual", n, 768, ours, ref, "vendi_score.vendi.score_dual (numpy/scipy, float32)"))
        del x, xn
        gc.collect()
    for n in args.vendi_kernel_n:
        x = embeddings(jax.random.key(n + 1), n, 768)
        xn = np.asarray(x)
        ours = timed(lambda: block(metrics.vendi_score(x, 1, form="kernel")), args.repeats, args.single_run_above)
        ref = timed(lambda: float(vendi.score_X(xn)), args.repeats, args.single_run_above)
        rows.append(_row("vendi_kernel", n, 768, ours, ref, "vendi_score.vendi.score_X (n x n eigvalsh, float32)"))
    return rows


def bench_cmmd(args) -> list[dict]:
    import torch
    from clip_mmd.calculation import mmd_efficient

    torch.set_num_threads(os.cpu_count() or 1)
    rows = []
    for n in args.cmmd_n:
        x = unit(embeddings(jax.random.key(2 * n), n, 768))
        y = unit(embeddings(jax.random.key(2 * n + 1), n, 768) + 0.05)
        ours = timed(lambda: block(metrics.cmmd(x, y)), args.repeats, args.single_run_above)
        ref = None
        if n <= args.cmmd_ref_max:
            xt, yt = torch.from_numpy(np.array(x)), torch.from_numpy(np.array(y))
            ref = timed(lambda: float(mmd_efficient(xt, yt, low_mem=True, coeff_bs=1024)), args.repeats,
                        args.single_run_above)
        row = _row("cmmd", n, 768, ours, ref, "clip_mmd.calculation.mmd_efficient (torch float32, low_mem)")
        if n <= args.cmmd_f64_max:
            with jax.enable_x64(True):
                exact = float(metrics.cmmd(np.asarray(x, np.float64), np.asarray(y, np.float64), dtype=jnp.float64))
            row["float64_value"] = exact
            row["ours_abs_err_vs_float64"] = abs(row["ours_value"] - exact)
            if ref is not None:
                row["reference_abs_err_vs_float64"] = abs(row["reference_value"] - exact)
        rows.append(row)
    return rows


def bench_recall(args) -> list[dict]:
    import torch
    from clip_benchmark.metrics.zeroshot_retrieval import batchify, recall_at_k

    torch.set_num_threads(os.cpu_count() or 1)
    rows = []
    ks = (1, 5, 10)
    # both directions at the reference's scale
    n = args.recall_ref_n
    img = unit(embeddings(jax.random.key(7), n, 512))
    txt = unit(img + 1.2 * jax.random.normal(jax.random.key(8), img.shape) / np.sqrt(512) * 4)
    t2i = np.arange(n)

    def ours_fn():
        out = metrics.recall_at_k(txt, img, t2i, ks)
        return {k: float(v) for k, v in jax.block_until_ready(out).items()}

    def ref_fn():
        scores = torch.from_numpy(np.array(txt)) @ torch.from_numpy(np.array(img)).T
        pos = torch.zeros_like(scores, dtype=torch.bool)
        pos[torch.arange(n), torch.from_numpy(t2i)] = True
        out = {}
        for k in ks:
            out[f"image_retrieval_recall@{k}"] = (batchify(recall_at_k, scores, pos, 256, "cpu", k=k) > 0).float().mean().item()
            out[f"text_retrieval_recall@{k}"] = (batchify(recall_at_k, scores.T, pos.T, 256, "cpu", k=k) > 0).float().mean().item()
        return out

    ours = timed(ours_fn, args.repeats, args.single_run_above)
    ref = timed(ref_fn, 1, args.single_run_above)
    row = _row("recall_both_directions", n, 512, ours, ref, "clip_benchmark recall_at_k via batchify (torch, full score matrix)")
    # recalls are means of 0/1 hits: equal counts give equal values up to float32 rounding of the mean
    row["max_abs_diff"] = max(abs(ours["value"][k] - ref["value"][k]) for k in ref["value"])
    rows.append(row)
    # the headline: text->image, n queries x n gallery items
    n = args.recall_n
    img = unit(embeddings(jax.random.key(9), n, 512))
    txt = unit(img + 1.2 * jax.random.normal(jax.random.key(10), img.shape) / np.sqrt(512) * 4)
    t2i_j = jnp.arange(n)

    def headline():
        _, idx = metrics.topk_retrieval(txt, img, max(ks))
        hits = idx == t2i_j[:, None]
        return {f"image_retrieval_recall@{k}": float(jnp.mean(jnp.any(hits[:, :k], axis=1))) for k in ks}

    ours = timed(headline, args.repeats, args.single_run_above)
    row = _row("recall_text_to_image", n, 512, ours, None, f"none: the reference would materialise a {n}x{n} "
               f"float32 score matrix ({n * n * 4 / 2**30:.0f} GiB)")
    rows.append(row)
    return rows


def _row(name, n, d, ours, ref, ref_name) -> dict:
    row = {"metric": name, "n": n, "d": d, "ours_first_s": ours["first_s"], "ours_run_s": ours["run_s"],
           "ours_value": ours["value"], "reference": ref_name}
    ours_t = ours["run_s"] or ours["first_s"]
    if ref is not None:
        ref_t = ref["run_s"] or ref["first_s"]
        row.update(reference_first_s=ref["first_s"], reference_run_s=ref["run_s"], reference_value=ref["value"],
                   speedup_reference_over_ours=ref_t / ours_t)
        if isinstance(ref["value"], float):
            row["rel_diff"] = abs(ours["value"] - ref["value"]) / abs(ref["value"])
    print(f"{name:24s} n={n:>8d} d={d:4d}  ours first {ours['first_s']:8.2f}s run "
          f"{(ours['run_s'] if ours['run_s'] is not None else float('nan')):8.2f}s  "
          + (f"ref {ref_t:8.2f}s  ref/ours {ref_t / ours_t:6.2f}" if ref is not None else "ref n/a"), flush=True)
    return row


def plot(all_rows: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (section, rows) in zip(axes, all_rows.items()):
        for name in sorted({r["metric"] for r in rows}):
            sel = [r for r in rows if r["metric"] == name]
            n = [r["n"] for r in sel]
            ax.plot(n, [r["ours_run_s"] or r["ours_first_s"] for r in sel], "o-", label=f"clipjax {name}")
            ref = [(r["n"], r.get("reference_run_s") or r.get("reference_first_s")) for r in sel if "reference_first_s" in r]
            if ref:
                ax.plot(*zip(*ref), "s--", label=f"reference {name}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("n (embeddings per set / queries)")
        ax.set_ylabel("seconds")
        ax.set_title(section)
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ints = lambda s: [int(float(v)) for v in s.split(",") if v]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default="vendi,cmmd,recall")
    p.add_argument("--vendi-n", type=ints, default=ints("1e4,1e5,1e6"))
    p.add_argument("--vendi-kernel-n", type=ints, default=ints("1000,2000,4000"))
    p.add_argument("--cmmd-n", type=ints, default=ints("1000,3000,10000,30000"))
    p.add_argument("--cmmd-ref-max", type=int, default=10000)
    p.add_argument("--cmmd-f64-max", type=int, default=3000)
    p.add_argument("--recall-n", type=int, default=100000)
    p.add_argument("--recall-ref-n", type=int, default=5000)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--single-run-above", type=float, default=20.0)
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    info = machine_info(PACKAGES)
    print(json.dumps(info, indent=1))
    runners = {"vendi": bench_vendi, "cmmd": bench_cmmd, "recall": bench_recall}
    all_rows = {}
    for section in args.sections.split(","):
        t0 = time.perf_counter()
        rows = runners[section](args)
        all_rows[section] = rows
        info_s = dict(info, section_wall_s=time.perf_counter() - t0, load_average_at_end=os.getloadavg())
        with open(os.path.join(args.out, f"metrics_{section}.json"), "w") as f:
            json.dump({"machine": info_s, "results": rows}, f, indent=1)
    existing = {}
    for section in runners:  # plot every section that has results on disk
        path = os.path.join(args.out, f"metrics_{section}.json")
        if os.path.exists(path):
            with open(path) as f:
                existing[section] = json.load(f)["results"]
    plot(existing, os.path.join(args.out, "metrics.png"))


if __name__ == "__main__":
    main()
