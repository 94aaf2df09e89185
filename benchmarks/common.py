"""Shared by the benchmark scripts: the machine / version record written into every result JSON."""

from __future__ import annotations

import datetime
import importlib.metadata as md
import os
import platform
import sys

CORE_PACKAGES = ("jax", "jaxlib", "flax", "numpy", "torch")


def machine_info(packages=(), argv=None) -> dict:
    """Date, command, CPU, load, jax devices and package versions (None when not installed)."""
    import jax

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = {}
    for pkg in dict.fromkeys(CORE_PACKAGES + tuple(packages)):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    argv = sys.argv[1:] if argv is None else list(argv)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.relpath(sys.executable), sys.argv[0]] + argv),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "jax_devices": [str(d) for d in jax.devices()],
        "versions": versions,
    }


def write_result(result: dict, name: str, out: str | None = None) -> str:
    """Write a benchmark's result JSON to `out`, default `benchmarks/results/NAME`; print and return the path."""
    import json

    out = out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", name)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {out}")
    return out


def open_clip_pair(name: str, device: str, *, output_dict: bool = False, seed: int = 0):
    """A random-init open_clip model `name` on `device` and the same weights as clipjax params.

    Returns `(torch_model, clipjax_config, params)`; the torch model is in eval mode.
    """
    import open_clip
    import torch

    import clipjax
    from clipjax.checkpoint import pure_to_params
    from clipjax.convert.core import state_dict_to_pure

    torch.manual_seed(seed)
    kw = {"output_dict": True} if output_dict else {}
    ref = open_clip.create_model(name, pretrained=None, **kw).eval().to(device)
    cfg = clipjax.get_config(name)
    sd = {k: v.detach().cpu().numpy() for k, v in ref.state_dict().items()}
    family = "open_clip_siglip" if cfg.is_siglip else ("openai_rn" if cfg.vision.arch == "resnet" else "openai")
    return ref, cfg, pure_to_params(state_dict_to_pure(sd, cfg, family), cfg)
