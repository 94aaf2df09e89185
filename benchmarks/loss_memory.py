"""Compiled memory and time of contrastive loss + gradient: naive vs streamed vs Pallas kernel.

For each batch B and embedding width D, every variant is compiled ahead of
time for `value_and_grad` w.r.t. (image, text, scale) and XLA's own memory
analysis (`lower(...).compile().memory_analysis()`) gives its temporary
buffer size. Variants are executed (and timed: median of `--repeats` runs
after one warm-up, a single run for large B) only where it is safe: the naive
loss runs while its temp memory stays under `--max-run-bytes`; at B = 65,536
it is compiled but never executed (its B x B float32 logits alone are 17 GB).

The reference is open_clip's `ClipLoss` / `SigLipLoss` (torch, same machine,
forward + backward), timed side by side: `time_ratio_vs_open_clip` is
clipjax time / open_clip time.

On CPU the Pallas kernel runs only in the Pallas interpreter, which is not a
performance path: it is timed at the smallest B for completeness and marked
`interpret`. On a GPU/TPU host the compiled kernel is measured at every B.

Usage:
  .venv/bin/python benchmarks/loss_memory.py                 # full run, writes the JSON + PNG
  .venv/bin/python benchmarks/loss_memory.py --quick         # B in {1k, 4k}, D = 512
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: clipjax and kernels

from clipjax.losses import chunked_clip_loss, chunked_siglip_loss, clip_loss, siglip_loss  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MiB = 2**20


def _features(b, d, seed):
    x = jax.random.normal(jax.random.key(seed), (b, d), jnp.float32)
    return x / jnp.linalg.norm(x, axis=1, keepdims=True)


def _variants(block, on_accelerator):
    from clipjax.kernels import contrastive as K

    interpret = not on_accelerator
    lse = lambda q, k, s, blk: K.row_col_logsumexp(q, k, s, blk, interpret=interpret)  # noqa: E731
    pair = lambda q, k, s, b, blk: K.sigmoid_row_sums(q, k, s, b, blk, interpret=interpret)  # noqa: E731
    return {
        ("clip", "naive"): lambda x, y, s: clip_loss(x, y, s, validate=False),
        ("clip", "chunked"): lambda x, y, s: chunked_clip_loss(x, y, s, block_size=block, validate=False),
        ("clip", "kernel"): lambda x, y, s: chunked_clip_loss(x, y, s, block_size=128, lse_fn=lse, validate=False),
        ("siglip", "naive"): lambda x, y, s: siglip_loss(x, y, s, -10.0, validate=False),
        ("siglip", "chunked"): lambda x, y, s: chunked_siglip_loss(x, y, s, -10.0, block_size=block,
                                                                   validate=False),
        ("siglip", "kernel"): lambda x, y, s: chunked_siglip_loss(x, y, s, -10.0, block_size=128,
                                                                  pair_sum_fn=pair, validate=False),
    }


def _time(fn, args, repeats):
    """(loss value, median wall seconds) of `fn(*args)`; one untimed warm-up unless repeats == 1."""
    if repeats > 1:
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        value, _ = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return value, statistics.median(times)


def _torch_time(loss_name, b, d, repeats):
    """open_clip loss forward+backward, float32 torch on the same machine, seconds."""
    import torch
    from open_clip.loss import ClipLoss, SigLipLoss

    torch.manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(b, d), dim=1).requires_grad_(True)
    y = torch.nn.functional.normalize(torch.randn(b, d), dim=1).requires_grad_(True)
    s = torch.tensor(10.0, requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    loss_fn = ClipLoss() if loss_name == "clip" else SigLipLoss()

    def step():
        for t in (x, y, s, bias):
            t.grad = None
        out = loss_fn(x, y, s) if loss_name == "clip" else loss_fn(x, y, s, bias)
        out.backward()

    step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _machine():
    import jaxlib

    info = {"platform": platform.platform(), "python": platform.python_version(),
            "processor": platform.processor(), "cpu_count": os.cpu_count(),
            "jax_backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()[:1]],
            "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "load_average_at_start": os.getloadavg()}
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    for name in ("torch", "open_clip"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    return info


def run(sizes, dims, block, repeats, max_run_bytes, run_large, torch_max_b, kernel_max_b):
    on_acc = jax.default_backend() in ("gpu", "tpu")
    variants = _variants(block, on_acc)
    rows = []
    for d in dims:
        for b in sizes:
            x, y, s = _features(b, d, 0), _features(b, d, 1), jnp.float32(10.0)
            naive_logits = b * b * 4
            for (loss, impl), fn in variants.items():
                if impl == "kernel" and b > kernel_max_b:
                    continue
                row = {"loss": loss, "impl": impl, "B": b, "D": d, "block": 128 if impl == "kernel" else block,
                       "naive_logits_bytes": naive_logits,
                       "kernel_mode": None if impl != "kernel" else ("compiled" if on_acc else "interpret")}
                t0 = time.perf_counter()
                compiled = jax.jit(jax.value_and_grad(fn, (0, 1, 2))).lower(x, y, s).compile()
                row["compile_s"] = round(time.perf_counter() - t0, 3)
                mem = compiled.memory_analysis()
                row["temp_bytes"] = int(mem.temp_size_in_bytes)
                row["argument_bytes"] = int(mem.argument_size_in_bytes)
                row["output_bytes"] = int(mem.output_size_in_bytes)
                row["temp_fraction_of_naive_logits"] = row["temp_bytes"] / naive_logits
                executable = row["temp_bytes"] <= max_run_bytes and (b < 65536 or run_large)
                if impl == "naive" and b >= 65536:
                    executable = False  # never execute a 17 GB buffer on this machine
                row["executed"] = bool(executable)
                if executable:
                    reps = repeats if b <= 4096 else 1  # large B: one run, no warm-up (compiled AOT)
                    value, row["time_s"] = _time(compiled, (x, y, s), reps)
                    row["loss_value"] = float(value)
                    row["timed_runs"] = reps
                rows.append(row)
                print(_fmt(row), flush=True)
            if b <= torch_max_b:
                for loss in ("clip", "siglip"):
                    t = _torch_time(loss, b, d, repeats if b <= 4096 else 1)
                    rows.append({"loss": loss, "impl": "open_clip", "B": b, "D": d, "time_s": t, "executed": True})
                    print(_fmt(rows[-1]), flush=True)
    # every executed variant must give the naive loss value (when the naive one ran)
    naive = {(r["loss"], r["B"], r["D"]): r["loss_value"] for r in rows if r["impl"] == "naive" and "loss_value" in r}
    for r in rows:
        key = (r["loss"], r["B"], r["D"])
        if "loss_value" in r and key in naive:
            r["rel_diff_vs_naive"] = abs(r["loss_value"] - naive[key]) / abs(naive[key])
    # time ratios against open_clip at the same (loss, B, D)
    ref = {(r["loss"], r["B"], r["D"]): r["time_s"] for r in rows if r["impl"] == "open_clip"}
    for r in rows:
        key = (r["loss"], r["B"], r["D"])
        if r["impl"] != "open_clip" and "time_s" in r and key in ref:
            r["time_ratio_vs_open_clip"] = r["time_s"] / ref[key]
    return rows


def _fmt(r):
    mem = f"temp {r['temp_bytes'] / MiB:10.1f} MiB ({100 * r['temp_fraction_of_naive_logits']:7.3f}% of BxB)" \
        if "temp_bytes" in r else " " * 38
    t = f"{r['time_s']:9.3f} s" if "time_s" in r else "   not run"
    return f"{r['loss']:6s} {r['impl']:9s} B={r['B']:6d} D={r['D']:4d}  {mem}  {t}"


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {"naive": "o-", "chunked": "s-", "kernel": "^--", "open_clip": "x:"}
    for loss in ("clip", "siglip"):
        for impl in ("naive", "chunked", "kernel", "open_clip"):
            for d in sorted({r["D"] for r in rows}):
                sel = sorted((r for r in rows if r["loss"] == loss and r["impl"] == impl and r["D"] == d),
                             key=lambda r: r["B"])
                label = f"{loss} {impl} D={d}"
                mem = [(r["B"], r["temp_bytes"] / MiB) for r in sel if "temp_bytes" in r]
                if mem and impl != "kernel":
                    ax_mem.plot(*zip(*mem), styles[impl], label=label)
                tim = [(r["B"], r["time_s"]) for r in sel if "time_s" in r]
                if tim:
                    ax_time.plot(*zip(*tim), styles[impl], label=label)
    bs = sorted({r["B"] for r in rows})
    ax_mem.plot(bs, [b * b * 4 / MiB / 100 for b in bs], "k:", label="1% of B x B float32")
    ax_mem.set(xscale="log", yscale="log", xlabel="global batch B", ylabel="XLA temp memory (MiB)",
               title="loss + grad: compiled temp memory")
    ax_time.set(xscale="log", yscale="log", xlabel="global batch B", ylabel="seconds",
                title=f"loss + grad time ({jax.default_backend()})")
    ax_mem.legend(fontsize=6)
    ax_time.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    p.add_argument("--dims", type=int, nargs="+", default=[512, 768])
    p.add_argument("--block", type=int, default=64, help="column block of the streamed losses")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-run-bytes", type=float, default=3 * 2**30, help="execute only below this temp size")
    p.add_argument("--run-large-dims", type=int, nargs="*", default=[512],
                   help="D values for which B >= 65536 streamed variants are executed (not only compiled)")
    p.add_argument("--torch-max-b", type=int, default=16384)
    p.add_argument("--kernel-max-b", type=int, default=None, help="default: all B on GPU/TPU, 1024 on CPU")
    p.add_argument("--quick", action="store_true", help="B in {1k, 4k}, D = 512")
    p.add_argument("--tag", default="", help="suffix of the output file names")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.dims = [1024, 4096], [512]
    on_acc = jax.default_backend() in ("gpu", "tpu")
    kernel_max_b = args.kernel_max_b or (max(args.sizes) if on_acc else 1024)
    started = datetime.datetime.now(datetime.timezone.utc)
    rows = []
    for d in args.dims:
        rows += run(args.sizes, [d], args.block, args.repeats, args.max_run_bytes,
                    d in args.run_large_dims, args.torch_max_b, kernel_max_b)
    tag = f"_{args.tag}" if args.tag else ""
    out = {
        "benchmark": "loss_memory",
        "command": " ".join([".venv/bin/python", "benchmarks/loss_memory.py"] + (argv or sys.argv[1:])),
        "date_utc": started.isoformat(timespec="seconds"),
        "wall_s": round((datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(), 1),
        "machine": _machine(),
        "settings": vars(args) | {"kernel_max_b": kernel_max_b},
        "notes": ["temp_bytes: XLA memory_analysis().temp_size_in_bytes of jit(value_and_grad) w.r.t. "
                  "(image, text, scale); arguments and outputs (O(B D)) are reported separately",
                  "naive at B=65536 is compiled only, never executed",
                  "kernel on CPU runs in the Pallas interpreter: not a performance number"],
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path = RESULTS / f"loss_memory{tag}.json"
    json_path.write_text(json.dumps(out, indent=1))
    plot(rows, RESULTS / f"loss_memory{tag}.png")
    print(f"wrote {json_path} and {json_path.with_suffix('.png')} in {out['wall_s']} s")


if __name__ == "__main__":
    main()
