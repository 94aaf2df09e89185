"""transformers `CLIPConfig` / `SiglipConfig` -> `CLIPConfig`."""

from __future__ import annotations

import json
import math
import os
from typing import Any

from clipjax.config import HALF, CLIPConfig, ConfigError, PreprocessConfig, TextConfig, VisionConfig

def _hf_act(name: str) -> str:
    table = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
             "gelu_new": "gelu_tanh", "relu": "relu"}
    if name not in table:
        raise ConfigError(f"hidden_act={name!r} is not supported; expected one of {sorted(table)}")
    return table[name]


def from_hf_config(cfg: Any) -> CLIPConfig:
    """Build a config from a transformers `CLIPConfig` / `SiglipConfig` (object, dict or config.json path)."""
    if isinstance(cfg, (str, os.PathLike)):
        path = os.path.join(cfg, "config.json") if os.path.isdir(cfg) else cfg
        with open(path) as f:
            cfg = json.load(f)
    d = cfg if isinstance(cfg, dict) else cfg.to_dict()
    model_type = d.get("model_type")
    if model_type not in ("clip", "siglip"):
        raise ConfigError(f"transformers model_type={model_type!r} is not supported; expected 'clip' or 'siglip'")
    v, t = d.get("vision_config") or {}, d.get("text_config") or {}
    if model_type == "clip":
        embed = d.get("projection_dim", 512)
        vw = v.get("hidden_size", 768)
        tw = t.get("hidden_size", 512)
        eos = t.get("eos_token_id", 2)
        return CLIPConfig(
            embed_dim=embed,
            vision=VisionConfig(image_size=v.get("image_size", 224), patch_size=v.get("patch_size", 32), width=vw,
                                layers=v.get("num_hidden_layers", 12), heads=v.get("num_attention_heads", 12),
                                mlp_dim=v.get("intermediate_size", 3072), act=_hf_act(v.get("hidden_act", "quick_gelu")),
                                ln_eps=v.get("layer_norm_eps", 1e-5)),
            text=TextConfig(context_length=t.get("max_position_embeddings", 77), vocab_size=t.get("vocab_size", 49408),
                            width=tw, heads=t.get("num_attention_heads", 8), layers=t.get("num_hidden_layers", 12),
                            mlp_dim=t.get("intermediate_size", 2048), act=_hf_act(t.get("hidden_act", "quick_gelu")),
                            pool="argmax" if eos == 2 else "eos", eos_id=eos, ln_eps=t.get("layer_norm_eps", 1e-5)),
            init_log_logit_scale=d.get("logit_scale_init_value", 2.6592))
    vw = v.get("hidden_size", 768)
    tw = t.get("hidden_size", 768)
    embed = t.get("projection_size") or tw
    if embed != vw:
        raise ConfigError(f"SigLIP text projection_size={embed} must equal vision hidden_size={vw}")
    return CLIPConfig(
        embed_dim=embed,
        vision=VisionConfig(image_size=v.get("image_size", 224), patch_size=v.get("patch_size", 16), width=vw,
                            layers=v.get("num_hidden_layers", 12), heads=v.get("num_attention_heads", 12),
                            mlp_dim=v.get("intermediate_size", 3072),
                            act=_hf_act(v.get("hidden_act", "gelu_pytorch_tanh")), pool="map", ln_pre=False,
                            patch_bias=True, ln_eps=v.get("layer_norm_eps", 1e-6)),
        text=TextConfig(context_length=t.get("max_position_embeddings", 64), vocab_size=t.get("vocab_size", 32000),
                        width=tw, heads=t.get("num_attention_heads", 12), layers=t.get("num_hidden_layers", 12),
                        mlp_dim=t.get("intermediate_size", 3072), act=_hf_act(t.get("hidden_act", "gelu_pytorch_tanh")),
                        causal=False, pool="last", eos_id=t.get("eos_token_id", 1), proj_bias=True,
                        ln_eps=t.get("layer_norm_eps", 1e-6)),
        vision_proj=False, init_log_logit_scale=math.log(10.0), init_logit_bias=-10.0,
        preprocess=PreprocessConfig(mean=HALF, std=HALF, resize_mode="squash"))
