"""State-dict key table between open_clip/OpenAI ModifiedResNet and `clipjax.models.resnet.ModifiedResNet`.

Pure numpy; no torch import. A torch state dict (`{name: np.ndarray}`, keys such
as `visual.layer1.0.downsample.0.weight`) becomes the nested pure dict of
`nnx.state(ModifiedResNet(cfg, embed_dim)).to_pure_dict()` (Params and the BatchNorm
statistics, which are `nnx.BatchStat`s) and back.

Layout changes: conv weights OIHW -> HWIO `[kh, kw, in, out]`; Linear weights
`[out, in]` -> kernels `[in, out]`; BatchNorm `weight/bias/running_mean/running_var`
-> `scale/bias/mean/var` (`scale`/`bias` Params, `mean`/`var` BatchStats).
`num_batches_tracked` is ignored on import and written as 0 on export (torch only
uses it for momentum-free training; clipjax uses momentum 0.1).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from clipjax.config import VisionConfig
from clipjax.convert.errors import ConversionError

EXPANSION = 4
_BN = (("weight", "scale"), ("bias", "bias"), ("running_mean", "mean"), ("running_var", "var"))

# (torch key without prefix, clipjax path, torch shape, kind) where kind is "conv", "linear" or "copy"
Entry = tuple[str, tuple, tuple[int, ...], str]


def _conv(tkey: str, path: tuple, d_out: int, d_in: int, k: int) -> Iterator[Entry]:
    yield f"{tkey}.weight", path + ("kernel",), (d_out, d_in, k, k), "conv"


def _bn(tkey: str, path: tuple, dim: int) -> Iterator[Entry]:
    for tname, jname in _BN:
        yield f"{tkey}.{tname}", path + (jname,), (dim,), "copy"


def _linear(tkey: str, path: tuple, d_out: int, d_in: int) -> Iterator[Entry]:
    yield f"{tkey}.weight", path + ("kernel",), (d_out, d_in), "linear"
    yield f"{tkey}.bias", path + ("bias",), (d_out,), "copy"


def key_table(cfg: VisionConfig, embed_dim: int) -> list[Entry]:
    """Every state leaf of the tower (Params and BatchNorm statistics), torch keys without prefix.

    Entries are `(torch key, clipjax path, torch shape, kind)`.
    """
    if cfg.arch != "resnet":
        raise ConversionError(f"resnet key table needs VisionConfig(arch='resnet'), got arch={cfg.arch!r}")
    w = cfg.width
    out: list[Entry] = []
    for i, (d_in, d_out) in enumerate(((3, w // 2), (w // 2, w // 2), (w // 2, w)), start=1):
        out += _conv(f"conv{i}", (f"conv{i}",), d_out, d_in, 3)
        out += _bn(f"bn{i}", (f"bn{i}",), d_out)
    d_in = w
    for s, blocks in enumerate(cfg.layers):
        planes, stride = w * 2**s, 1 if s == 0 else 2
        for b in range(blocks):
            t, p = f"layer{s + 1}.{b}", (f"layer{s + 1}", b)
            out += _conv(f"{t}.conv1", p + ("conv1",), planes, d_in, 1)
            out += _bn(f"{t}.bn1", p + ("bn1",), planes)
            out += _conv(f"{t}.conv2", p + ("conv2",), planes, planes, 3)
            out += _bn(f"{t}.bn2", p + ("bn2",), planes)
            out += _conv(f"{t}.conv3", p + ("conv3",), planes * EXPANSION, planes, 1)
            out += _bn(f"{t}.bn3", p + ("bn3",), planes * EXPANSION)
            if b == 0 and (stride > 1 or d_in != planes * EXPANSION):
                out += _conv(f"{t}.downsample.0", p + ("downsample", "conv"), planes * EXPANSION, d_in, 1)
                out += _bn(f"{t}.downsample.1", p + ("downsample", "bn"), planes * EXPANSION)
            d_in = planes * EXPANSION
    c = w * 32
    out.append(("attnpool.positional_embedding", ("attnpool", "positional_embedding"), (cfg.grid**2 + 1, c), "copy"))
    for name in ("q_proj", "k_proj", "v_proj"):
        out += _linear(f"attnpool.{name}", ("attnpool", name), c, c)
    out += _linear("attnpool.c_proj", ("attnpool", "c_proj"), embed_dim, c)
    return out


def _to_jax(a: np.ndarray, kind: str) -> np.ndarray:
    if kind == "conv":
        return np.ascontiguousarray(a.transpose(2, 3, 1, 0))  # OIHW -> HWIO
    if kind == "linear":
        return np.ascontiguousarray(a.T)
    return np.asarray(a)


def _to_torch(a: np.ndarray, kind: str) -> np.ndarray:
    if kind == "conv":
        return np.ascontiguousarray(a.transpose(3, 2, 0, 1))  # HWIO -> OIHW
    if kind == "linear":
        return np.ascontiguousarray(a.T)
    return np.asarray(a)


def _set(tree: dict, path: tuple, value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _get(tree: dict, path: tuple):
    for p in path:
        if not isinstance(tree, dict) or p not in tree:
            raise ConversionError(f"clipjax params have no entry {'/'.join(map(str, path))}")
        tree = tree[p]
    return tree


def _leaf_paths(tree: dict, prefix: tuple = ()) -> Iterator[tuple]:
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _leaf_paths(v, prefix + (k,))
        else:
            yield prefix + (k,)


def resnet_from_torch(sd: dict[str, np.ndarray], cfg: VisionConfig, prefix: str = "visual.", *,
                      embed_dim: int | None = None) -> dict:
    """Convert an open_clip / OpenAI ModifiedResNet state dict to a clipjax pure param dict.

    Args:
      sd: `{torch key: array}` (numpy, or anything `np.asarray` takes); keys outside `prefix`
        (e.g. the text tower) are ignored, as are `*.num_batches_tracked`.
      cfg: the tower's `VisionConfig` (`arch='resnet'`).
      prefix: key prefix of the image tower (`"visual."` for a full CLIP state dict, `""` for
        the tower alone).
      embed_dim: attention-pool output width; read from `attnpool.c_proj.weight` when None.

    Returns:
      Nested dict matching `nnx.state(ModifiedResNet(cfg, embed_dim)).to_pure_dict()`
      (stage blocks keyed by int), arrays in the source dtype.

    Raises:
      ConversionError: a key is missing, a shape differs (key, got and expected shapes are named)
        or keys under `prefix` were left unconsumed.
    """
    if embed_dim is None:
        key = f"{prefix}attnpool.c_proj.weight"
        if key not in sd:
            raise ConversionError(f"missing key {key!r} (needed to read embed_dim); is prefix={prefix!r} right?")
        embed_dim = int(np.shape(sd[key])[0])
    pure: dict = {}
    consumed = set()
    for tkey, path, shape, kind in key_table(cfg, embed_dim):
        full = prefix + tkey
        if full not in sd:
            raise ConversionError(f"missing key {full!r} (expected shape {shape}) for {cfg}")
        a = np.asarray(sd[full])
        if a.shape != shape:
            raise ConversionError(f"shape mismatch for {full!r}: got {a.shape}, expected {shape}")
        _set(pure, path, _to_jax(a, kind))
        consumed.add(full)
    left = sorted(k for k in sd if k.startswith(prefix) and k not in consumed
                  and not k.endswith(".num_batches_tracked"))
    if left:
        raise ConversionError(f"{len(left)} unconsumed key(s) under prefix {prefix!r}: {left[:10]}")
    return pure


def resnet_to_torch(pure: dict, cfg: VisionConfig, prefix: str = "visual.", *,
                    num_batches_tracked: bool = True) -> dict[str, np.ndarray]:
    """Inverse of `resnet_from_torch`: clipjax pure params -> `{torch key: np.ndarray}` in torch layout.

    Args:
      pure: nested pure dict as from `nnx.state(model).to_pure_dict()` (jax or numpy
        arrays); extra leaves raise.
      cfg: the tower's `VisionConfig`.
      prefix: prepended to every torch key.
      num_batches_tracked: also write each BatchNorm's `num_batches_tracked` (int64 zero), so the
        key set equals `open_clip` `state_dict()`.

    Raises:
      ConversionError: an entry is missing, has the wrong shape, or is left over.
    """
    c_proj = np.asarray(_get(pure, ("attnpool", "c_proj", "kernel")))
    embed_dim = int(c_proj.shape[-1])
    out: dict[str, np.ndarray] = {}
    used = set()
    for tkey, path, shape, kind in key_table(cfg, embed_dim):
        a = _to_torch(np.asarray(_get(pure, path)), kind)
        if a.shape != shape:
            raise ConversionError(f"shape mismatch for clipjax {'/'.join(map(str, path))} -> {prefix + tkey!r}: "
                                  f"got torch-layout {a.shape}, expected {shape}")
        out[prefix + tkey] = a
        used.add(path)
        if num_batches_tracked and tkey.endswith(".running_var"):
            out[prefix + tkey[: -len("running_var")] + "num_batches_tracked"] = np.zeros((), np.int64)
    left = sorted("/".join(map(str, p)) for p in _leaf_paths(pure) if p not in used)
    if left:
        raise ConversionError(f"{len(left)} clipjax param(s) have no torch key: {left[:10]}")
    return out
