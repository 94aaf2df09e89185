"""Observability: metrics as JSONL and TensorBoard events, peak FLOP/s and MFU.

MFU = FLOPs of the compiled step (XLA's cost analysis of the whole program, all devices)
/ step time / peak FLOP/s of the devices. Peaks are the vendors' dense bf16 numbers per chip;
on a CPU the peak is measured (a jitted fp32 matmul on the host), since no table fits.
"""

from __future__ import annotations

import functools
import json
import os
import time

import jax
import jax.numpy as jnp

# dense bf16 peak FLOP/s per chip, matched against `device.device_kind` (lower-case substring)
PEAK_FLOPS = (
    ("tpu v6", 918e12),  # v6e (Trillium)
    ("tpu v5p", 459e12),
    ("tpu v5 lite", 197e12),  # v5e
    ("tpu v5e", 197e12),
    ("tpu v5", 459e12),
    ("tpu v4", 275e12),
    ("h200", 989e12),
    ("h100", 989e12),
    ("a100", 312e12),
)


@functools.lru_cache(maxsize=1)
def measured_cpu_peak(n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of a jitted `[n, n] @ [n, n]` fp32 matmul on the host (best of `repeats`)."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best


def peak_flops(devices=None) -> tuple[float, str]:
    """`(peak FLOP/s of all `devices` together, how it was found)`."""
    devices = list(jax.devices() if devices is None else devices)
    kind = devices[0].device_kind.lower()
    if devices[0].platform == "cpu":  # fake CPU devices share the host's cores: one host peak
        return measured_cpu_peak(), "measured fp32 matmul on this host"
    for name, flops in PEAK_FLOPS:
        if name in kind:
            return flops * len(devices), f"table: {name} x {len(devices)}"
    raise ValueError(f"no peak FLOP/s known for device kind {devices[0].device_kind!r}; "
                     f"known: {[n for n, _ in PEAK_FLOPS]}")


def compiled_flops(compiled) -> float | None:
    """FLOPs of one call of a compiled XLA executable (None when XLA does not report them)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


class MetricsWriter:
    """`WORKDIR/metrics.jsonl` (one object per logged step) and TensorBoard events under `WORKDIR/tb`.

    Only process 0 writes. On resume, lines for steps after the restored step are dropped first,
    so the file holds one line per step as an uninterrupted run would; so is a line cut short by a
    kill in the middle of a write.
    """

    def __init__(self, workdir: str, resume_step: int = 0, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        if os.path.exists(self.path):
            with open(self.path) as f:
                keep = [line if line.endswith("\n") else line + "\n" for line in f
                        if (row := _parse(line)) is not None and row.get("step", 0) <= resume_step]
            with open(self.path + ".tmp", "w") as f:
                f.writelines(keep)
            os.replace(self.path + ".tmp", self.path)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=resume_step + 1)

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _parse(line: str) -> dict | None:
    """A metrics line as a dict; None for a blank or truncated (unparseable) line."""
    if not line.strip():
        return None
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) else None


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    return v


def read_metrics(workdir: str) -> list[dict]:
    """The rows of `WORKDIR/metrics.jsonl`."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]
