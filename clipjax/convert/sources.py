"""Read PyTorch-side checkpoints into `{key: np.ndarray}` without running untrusted code.

- `.safetensors`: read directly (no torch needed).
- OpenAI TorchScript `.pt`: restricted unpickler (`convert.torchscript`), nothing executed.
- Other `.pt` / `.bin` state dicts: `torch.load(..., weights_only=True)`; torch is imported
  lazily, only here.
- A Hugging Face model folder: `config.json` plus `model.safetensors` (or sharded
  safetensors with an index, or `pytorch_model.bin`). A single tower's keys are read under its
  `vision_model.` / `text_model.` prefix, as the Hub's folders (transformers 4) store them:
  transformers 5 saves `CLIPVisionModel`, `CLIPTextModel`, `SiglipVisionModel` and `SiglipTextModel`
  without it (`TOWER_PREFIX`).
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile

import numpy as np

from clipjax.convert.errors import ConversionError
from clipjax.convert.torchscript import is_torchscript, load_torchscript_state_dict


def _to_numpy(t) -> np.ndarray:
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.numpy()


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        if "bf16" in str(e).lower() or "bfloat16" in str(e).lower():
            from safetensors.torch import load_file

            return {k: _to_numpy(v) for k, v in load_file(path).items()}
        raise ConversionError(f"{path}: unreadable safetensors file (truncated or corrupt?): {e}") from None


def read_torch_pickle(path: str) -> dict[str, np.ndarray]:
    """A torch.save'd state dict, loaded with `weights_only=True`; unwraps `state_dict` and `module.`."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConversionError(f"{path}: refused to unpickle: the file holds objects other than tensors "
                              "(weights_only=True blocked it; nothing was executed): "
                              f"{str(e).splitlines()[0]}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise ConversionError(f"{path}: could not read the checkpoint (truncated or corrupt?): "
                              f"{str(e).splitlines()[0]}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConversionError(f"{path}: expected a state dict of tensors, got {type(obj).__name__}")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return {k: _to_numpy(v) for k, v in obj.items()}


def read_state_dict(path: str) -> tuple[dict[str, np.ndarray], str]:
    """`(state_dict, kind)` with kind in {"safetensors", "torchscript", "torch", "hf"}."""
    if not os.path.exists(path):
        raise ConversionError(f"{path}: no such file or folder")
    if os.path.isdir(path):
        return read_hf_folder(path), "hf"
    if path.endswith(".safetensors"):
        return read_safetensors(path), "safetensors"
    if is_torchscript(path):
        return load_torchscript_state_dict(path), "torchscript"
    return read_torch_pickle(path), "torch"


# single-tower model_type -> the prefix of its tower's keys in a transformers 4 folder
TOWER_PREFIX = {"clip_vision_model": "vision_model.", "siglip_vision_model": "vision_model.",
                "clip_text_model": "text_model.", "siglip_text_model": "text_model."}


def with_tower_prefix(sd: dict[str, np.ndarray], config: dict) -> dict[str, np.ndarray]:
    """`sd` with every key under the single tower's prefix when none is (transformers 5's layout of the
    plain towers); unchanged otherwise (two-tower folders, prefixed keys). Wrong layouts are then refused,
    key by key, by the conversion rules."""
    prefix = TOWER_PREFIX.get(config.get("model_type"))
    if prefix is None or any(k.startswith(prefix) for k in sd):
        return sd
    return {prefix + k: v for k, v in sd.items()}


def read_hf_folder(folder: str) -> dict[str, np.ndarray]:
    return with_tower_prefix(_read_hf_weights(folder), hf_config(folder))


def _read_hf_weights(folder: str) -> dict[str, np.ndarray]:
    if not os.path.exists(os.path.join(folder, "config.json")):
        raise ConversionError(f"{folder}: neither a clipjax checkpoint (clipjax.json) nor a Hugging Face model "
                              "folder (config.json)")
    single = os.path.join(folder, "model.safetensors")
    index = os.path.join(folder, "model.safetensors.index.json")
    binary = os.path.join(folder, "pytorch_model.bin")
    if os.path.exists(single):
        return read_safetensors(single)
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        sd: dict[str, np.ndarray] = {}
        for name in files:
            sd.update(read_safetensors(os.path.join(folder, name)))
        return sd
    if os.path.exists(binary):
        return read_torch_pickle(binary)
    raise ConversionError(f"{folder}: no model.safetensors, safetensors index or pytorch_model.bin")


def hf_config(folder: str) -> dict:
    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f)
