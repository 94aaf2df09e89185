"""`convert` (PyTorch file or HF folder -> clipjax checkpoint) and `export_hf` (clipjax -> HF folder)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np

from clipjax.config import CLIPConfig, from_hf_config, from_open_clip_json, get_config
from clipjax.convert import rules as R
from clipjax.convert.core import config_for, detect_family, rules_for, state_dict_to_pure
from clipjax.convert.errors import ConversionError
from clipjax.convert.sources import hf_config, read_state_dict

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "spiece.model")


def config_from_file(path: str) -> CLIPConfig:
    """An architecture from a JSON file: clipjax (`clipjax.json` or a config dict), open_clip or transformers."""
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
    if tokenizer_dir is None and kind == "hf":
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
    if kind == "hf" and any(os.path.exists(os.path.join(src, n)) for n in TOKENIZER_FILES):
        from clipjax.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_folder(src, context_length=cfg.text.context_length)
    return Model(config=cfg, params=params, tokenizer=tokenizer)


def _flat_params(params) -> dict[str, np.ndarray]:
    out = {}

    def walk(tree, prefix):
        for k, v in tree.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = np.asarray(v, np.float32)

    walk(params.to_pure_dict(), "")
    return out


def _act(name: str) -> str:
    return {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}[name]


def hf_config_dict(config: CLIPConfig) -> dict:
    """transformers `CLIPConfig` / `SiglipConfig` as a dict for `config`."""
    v, t = config.vision, config.text
    if v.arch != "vit":
        raise ConversionError("export to transformers supports ViT image towers only (transformers has no "
                              "ModifiedResNet CLIP)")
    vision = dict(hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.layers,
                  num_attention_heads=v.heads, image_size=v.image_size, patch_size=v.patch_size,
                  hidden_act=_act(v.act), layer_norm_eps=v.ln_eps)
    text = dict(vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=t.mlp_dim,
                num_hidden_layers=t.layers, num_attention_heads=t.heads, max_position_embeddings=t.context_length,
                hidden_act=_act(t.act), layer_norm_eps=t.ln_eps)
    if config.is_siglip:
        if v.pool != "map" or v.ln_pre or v.class_token or t.causal or t.pool != "last" or config.vision_proj:
            raise ConversionError("this SigLIP-style config has no transformers SiglipModel equivalent")
        text["projection_size"] = config.embed_dim
        return {"model_type": "siglip", "text_config": text, "vision_config": vision}
    if v.pool != "tok" or not v.ln_pre or not t.causal or t.pool not in ("argmax", "eos") or t.proj_bias:
        raise ConversionError("this CLIP-style config has no transformers CLIPModel equivalent")
    text["eos_token_id"] = 2 if t.pool == "argmax" else t.eos_id
    return {"model_type": "clip", "text_config": text, "vision_config": vision, "projection_dim": config.embed_dim,
            "logit_scale_init_value": config.init_log_logit_scale}


def export_hf(model, out: str, overwrite: bool = False) -> str:
    """Write `model` (a `clipjax.checkpoint.Model` or checkpoint folder) as a transformers model folder."""
    import transformers
    from safetensors.numpy import save_file

    from clipjax.checkpoint import atomic_folder, load

    if isinstance(model, str):
        model = load(model)
    cfg = model.config
    d = hf_config_dict(cfg)
    kind = d.pop("model_type")
    family = "hf_siglip" if kind == "siglip" else "hf_clip"
    sd = R.invert_rules(rules_for(cfg, family), _flat_params(model.params))
    hf_cfg = (transformers.SiglipConfig if kind == "siglip" else transformers.CLIPConfig)(**d)
    with atomic_folder(out, overwrite) as tmp:
        hf_cfg.save_pretrained(tmp)
        save_file(sd, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        if model.tokenizer is not None:
            model.tokenizer.save(tmp)
    return out
