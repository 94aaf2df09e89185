"""`convert` (PyTorch file or HF folder -> clipjax checkpoint); exports live in `clipjax.convert.export`."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

from clipjax.config import CLIPConfig
from clipjax.convert.hf_config import from_hf_config
from clipjax.convert.open_clip_config import from_open_clip_json
from clipjax.presets import get_config
from clipjax.convert.core import config_for, detect_family, state_dict_to_pure
from clipjax.convert.errors import ConversionError
from clipjax.convert.export import export_hf, hf_config_dict  # noqa: F401  (moved there; old imports work)
from clipjax.convert.sources import hf_config, read_state_dict

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "spiece.model")


def config_from_file(path: str) -> CLIPConfig:
    """An architecture from a JSON file: clipjax (`clipjax.json` or a config dict), open_clip (a model config
    `NAME.json`, or the Hub's `open_clip_config.json` with its `preprocess_cfg`) or transformers."""
    with open(path) as f:
        d = json.load(f)
    if d.get("format") == "clipjax":
        return CLIPConfig.from_dict(d["config"])
    if "model_type" in d:
        return from_hf_config(d)
    if "vision_cfg" in d or "model_cfg" in d:
        return from_open_clip_json(d)
    if "vision" in d and "text" in d:
        return CLIPConfig.from_dict(d)
    raise ConversionError(f"{path}: not a clipjax, open_clip or transformers config")


def convert(src: str, out: str, *, arch: str | None = None, config: str | CLIPConfig | None = None,
            tokenizer_dir: str | None = None, overwrite: bool = False) -> str:
    """Convert `src` (TorchScript `.pt`, open_clip `.pt`/`.bin`/`.safetensors`, or HF model folder) to `out`.

    The architecture comes from `arch` (a preset name), `config` (a file or `CLIPConfig`), the HF
    folder's config.json, or is inferred from the tensor shapes. Returns the output folder.
    A transformers single-tower folder (`CLIPVisionModelWithProjection`, `CLIPTextModel`,
    `SiglipVisionModel`, ...) gives a single-tower model (`CLIPConfig.towers`; see `hf_config`).
    """
    from clipjax.checkpoint import save

    if arch is not None and config is not None:
        raise ValueError("give --arch or --config, not both")
    cfg = get_config(arch) if arch else (config_from_file(config) if isinstance(config, str) else config)
    sd, kind = read_state_dict(src)
    family = detect_family(sd)
    cfg = config_for(sd, family, kind, cfg, hf_config(src) if kind == "hf" else None)
    pure = state_dict_to_pure(sd, cfg, family)
    tmp_tok = None
    if tokenizer_dir is None and kind == "hf" and cfg.has_text:
        found = [n for n in TOKENIZER_FILES if os.path.exists(os.path.join(src, n))]
        if found:
            tmp_tok = tempfile.mkdtemp(prefix="clipjax-tok-")
            for n in found:
                shutil.copy(os.path.join(src, n), tmp_tok)
            tokenizer_dir = tmp_tok
    try:
        return save(out, cfg, pure, tokenizer_dir=tokenizer_dir, overwrite=overwrite,
                    source={"path": os.path.abspath(src), "kind": kind, "family": family})
    finally:
        if tmp_tok:
            shutil.rmtree(tmp_tok, ignore_errors=True)


def load_pytorch(src: str, *, arch: str | None = None, config: str | CLIPConfig | None = None, mesh=None):
    """Convert `src` in memory (nothing written) and return a `clipjax.checkpoint.Model`."""
    from clipjax.checkpoint import Model, default_tokenizer, pure_to_params
    from clipjax.sharding import shard_params

    cfg = get_config(arch) if arch else (config_from_file(config) if isinstance(config, str) else config)
    sd, kind = read_state_dict(src)
    family = detect_family(sd)
    cfg = config_for(sd, family, kind, cfg, hf_config(src) if kind == "hf" else None)
    params = pure_to_params(state_dict_to_pure(sd, cfg, family), cfg)
    if mesh is not None:
        params = shard_params(params, mesh)
    tokenizer = default_tokenizer(cfg)
    if kind == "hf" and cfg.has_text and any(os.path.exists(os.path.join(src, n)) for n in TOKENIZER_FILES):
        from clipjax.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_folder(src, context_length=cfg.text.context_length)
    return Model(config=cfg, params=params, tokenizer=tokenizer)
