"""transformers `CLIPConfig` / `SiglipConfig` (and single towers) -> `CLIPConfig`: every key honoured
exactly or refused by name.

Single-tower folders (`model_type` `clip_vision_model`, `clip_text_model`, `siglip_vision_model`,
`siglip_text_model`: `CLIPVisionModelWithProjection`, `CLIPTextModel`, `SiglipVisionModel`, ...) become
single-tower clipjax configs (`CLIPConfig.towers`). The embedding is what transformers' class returns:
`image_embeds` / `text_embeds` of the `*WithProjection` classes (`embed_dim = projection_dim`), the
`pooler_output` of `CLIPVisionModel` / `CLIPTextModel` (no projection: `embed_dim = hidden_size`) and of
the SigLIP towers (the MAP head; the text head). Which CLIP class a folder holds is read from
`architectures`; without it, from the weights (`projection`: whether they hold the projection).

Keys that change what the PyTorch model computes are read (`hidden_size`, `hidden_act`,
`layer_norm_eps`, `eos_token_id` for CLIP's pooling, ...) or, when clipjax cannot reproduce them
(`vision_use_head: false`, `pruned_heads`, `num_channels != 3`), refused with the key as written in
`config.json`. Keys that do not change the embeddings (dropouts, initialiser scales, generation
settings, label maps, bookkeeping) are accepted. Any other key is refused: a transformers version
that adds a modelling option is not converted silently wrong. `Siglip2Model` folders (NaFlex:
per-image aspect ratio and position-embedding resizing) are refused.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from clipjax.config import HALF, CLIPConfig, ConfigError, PreprocessConfig, TextConfig, VisionConfig

# keys that do not change inference outputs (PretrainedConfig bookkeeping and generation defaults,
# dropouts, initialisers), across transformers 4.x and 5.x
HARMLESS = {
    "_name_or_path", "_commit_hash", "_attn_implementation", "_attn_implementation_autoset", "architectures",
    "transformers_version", "model_type", "dtype", "torch_dtype", "use_bfloat16", "torchscript", "return_dict",
    "output_attentions", "output_hidden_states", "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder",
    "add_cross_attention", "cross_attention_hidden_size", "tie_encoder_decoder", "tie_word_embeddings",
    "id2label", "label2id", "problem_type", "finetuning_task", "prefix", "task_specific_params",
    "tokenizer_class", "bos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
    "attention_dropout", "dropout", "initializer_range", "initializer_factor", "tf_legacy_loss",
    "bad_words_ids", "begin_suppress_tokens", "diversity_penalty", "do_sample", "early_stopping",
    "encoder_no_repeat_ngram_size", "exponential_decay_length_penalty", "forced_bos_token_id",
    "forced_eos_token_id", "length_penalty", "max_length", "min_length", "no_repeat_ngram_size",
    "num_beam_groups", "num_beams", "num_return_sequences", "output_scores", "remove_invalid_values",
    "repetition_penalty", "return_dict_in_generate", "suppress_tokens", "temperature", "top_k", "top_p",
    "typical_p", "use_cache",
}
_VISION = {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
           "patch_size", "hidden_act", "layer_norm_eps", "num_channels", "pruned_heads"}
_TEXT = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
         "max_position_embeddings", "hidden_act", "layer_norm_eps", "eos_token_id", "pruned_heads"}
KEYS = {
    "clip": ({"projection_dim", "logit_scale_init_value", "text_config", "vision_config", "text_config_dict",
              "vision_config_dict"}, _VISION | {"projection_dim"}, _TEXT | {"projection_dim"}),
    "siglip": ({"text_config", "vision_config"}, _VISION | {"vision_use_head"}, _TEXT | {"projection_size"}),
}


def _hf_act(name: str, where: str) -> str:
    table = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
             "gelu_new": "gelu_tanh", "relu": "relu"}
    if name not in table:
        raise ConfigError(f"transformers {where}.hidden_act={name!r} is not supported; expected one of {sorted(table)}")
    return table[name]


def _check(d: dict, allowed: set, where: str) -> None:
    extra = sorted(set(d) - allowed - HARMLESS)
    if extra:
        raise ConfigError(f"transformers {where} keys {extra} are not supported: clipjax cannot tell whether they "
                          "change the model, and refuses rather than convert it approximately")
    if d.get("pruned_heads"):
        raise ConfigError(f"transformers {where}.pruned_heads={d['pruned_heads']} is not supported")
    if d.get("num_channels", 3) != 3:
        raise ConfigError(f"transformers {where}.num_channels={d['num_channels']} is not supported (RGB only)")


def _read(cfg: Any) -> dict:
    if isinstance(cfg, (str, os.PathLike)):
        path = os.path.join(cfg, "config.json") if os.path.isdir(cfg) else cfg
        with open(path) as f:
            return json.load(f)
    return cfg if isinstance(cfg, dict) else cfg.to_dict()


# single-tower folders: model_type -> (family, tower)
SINGLE_TOWER = {"clip_vision_model": ("clip", "image"), "clip_text_model": ("clip", "text"),
                "siglip_vision_model": ("siglip", "image"), "siglip_text_model": ("siglip", "text")}
# their transformers classes (`architectures`) -> whether the embedding is projected
SINGLE_TOWER_CLASSES = {
    "clip_vision_model": {"CLIPVisionModelWithProjection": True, "CLIPVisionModel": False},
    "clip_text_model": {"CLIPTextModelWithProjection": True, "CLIPTextModel": False},
    "siglip_vision_model": {"SiglipVisionModel": False},
    "siglip_text_model": {"SiglipTextModel": True},
}
# the projection weight of the CLIP single towers, outside the tower's own `vision_model.` / `text_model.`
PROJECTION_KEYS = {"clip_vision_model": "visual_projection.weight", "clip_text_model": "text_projection.weight"}
SIGLIP_PREPROCESS = PreprocessConfig(mean=HALF, std=HALF, resize_mode="squash")


def _clip_vision(v: dict, where: str = "vision_config") -> VisionConfig:
    return VisionConfig(image_size=v.get("image_size", 224), patch_size=v.get("patch_size", 32),
                        width=v.get("hidden_size", 768), layers=v.get("num_hidden_layers", 12),
                        heads=v.get("num_attention_heads", 12), mlp_dim=v.get("intermediate_size", 3072),
                        act=_hf_act(v.get("hidden_act", "quick_gelu"), where),
                        ln_eps=v.get("layer_norm_eps", 1e-5))


def _clip_text(t: dict, where: str = "text_config") -> TextConfig:
    eos = t.get("eos_token_id", 49407)  # transformers' CLIPTextConfig default
    return TextConfig(context_length=t.get("max_position_embeddings", 77), vocab_size=t.get("vocab_size", 49408),
                      width=t.get("hidden_size", 512), heads=t.get("num_attention_heads", 8),
                      layers=t.get("num_hidden_layers", 12), mlp_dim=t.get("intermediate_size", 2048),
                      act=_hf_act(t.get("hidden_act", "quick_gelu"), where),
                      # transformers' CLIPTextTransformer: eos_token_id 2 means OpenAI's argmax rule
                      pool="argmax" if eos == 2 else "eos", eos_id=eos, ln_eps=t.get("layer_norm_eps", 1e-5))


def _siglip_vision(v: dict, where: str = "vision_config") -> VisionConfig:
    if not v.get("vision_use_head", True):
        raise ConfigError(f"transformers {where}.vision_use_head=False (no attention-pool head) is not supported")
    return VisionConfig(image_size=v.get("image_size", 224), patch_size=v.get("patch_size", 16),
                        width=v.get("hidden_size", 768), layers=v.get("num_hidden_layers", 12),
                        heads=v.get("num_attention_heads", 12), mlp_dim=v.get("intermediate_size", 3072),
                        act=_hf_act(v.get("hidden_act", "gelu_pytorch_tanh"), where), pool="map",
                        ln_pre=False, patch_bias=True, ln_eps=v.get("layer_norm_eps", 1e-6))


def _siglip_text(t: dict, where: str = "text_config") -> TextConfig:
    return TextConfig(context_length=t.get("max_position_embeddings", 64), vocab_size=t.get("vocab_size", 32000),
                      width=t.get("hidden_size", 768), heads=t.get("num_attention_heads", 12),
                      layers=t.get("num_hidden_layers", 12), mlp_dim=t.get("intermediate_size", 3072),
                      act=_hf_act(t.get("hidden_act", "gelu_pytorch_tanh"), where), causal=False,
                      pool="last", eos_id=t.get("eos_token_id", 1), proj_bias=True,
                      ln_eps=t.get("layer_norm_eps", 1e-6))


def from_hf_config(cfg: Any, projection: bool | None = None) -> CLIPConfig:
    """Build a config from a transformers `CLIPConfig` / `SiglipConfig` or a single tower's config (object,
    dict or config.json path).

    `projection` (single CLIP towers only): whether the folder's weights hold the tower's projection
    (`visual_projection.weight` / `text_projection.weight`). It decides the class when `architectures`
    does not name one, and must agree with it when it does.
    """
    d = _read(cfg)
    model_type = d.get("model_type")
    if model_type == "siglip2":
        raise ConfigError("transformers model_type='siglip2' (Siglip2Model, NaFlex: per-image aspect ratios and "
                          "position-embedding resizing) is not supported; open_clip's fixed-resolution SigLIP 2 "
                          "checkpoints (ViT-*-SigLIP2*) are")
    if model_type in SINGLE_TOWER:
        return _single_tower(d, model_type, projection)
    if model_type not in KEYS:
        raise ConfigError(f"transformers model_type={model_type!r} is not supported; expected one of "
                          f"{sorted(KEYS) + sorted(SINGLE_TOWER)}")
    top, vision_keys, text_keys = KEYS[model_type]
    _check(d, top, "config")
    # old CLIP configs carry `*_config_dict`, which transformers lets override `*_config`
    v = {**(d.get("vision_config") or {}), **(d.get("vision_config_dict") or {})}
    t = {**(d.get("text_config") or {}), **(d.get("text_config_dict") or {})}
    _check(v, vision_keys, "vision_config")
    _check(t, text_keys, "text_config")
    if model_type == "clip":
        # the towers' own `projection_dim` is read only by the single-tower *WithProjection models
        return CLIPConfig(embed_dim=d.get("projection_dim", 512), vision=_clip_vision(v), text=_clip_text(t),
                          init_log_logit_scale=d.get("logit_scale_init_value", 2.6592))
    vision, text = _siglip_vision(v), _siglip_text(t)
    embed = t.get("projection_size") or text.width
    if embed != vision.width:
        raise ConfigError(f"transformers text_config.projection_size={embed} must equal vision_config.hidden_size="
                          f"{vision.width}")
    return CLIPConfig(embed_dim=embed, vision=vision, text=text, vision_proj=False,
                      init_log_logit_scale=math.log(10.0), init_logit_bias=-10.0, preprocess=SIGLIP_PREPROCESS)


def single_tower_projects(d: dict, projection: bool | None = None) -> bool:
    """Whether the single-tower folder with config `d` returns a projected embedding (its class, from
    `architectures`, or else from `projection`: whether its weights hold the projection)."""
    model_type = d["model_type"]
    classes = SINGLE_TOWER_CLASSES[model_type]
    named = d.get("architectures") or []
    unknown = [a for a in named if a not in classes]
    if unknown or len(named) > 1:
        raise ConfigError(f"transformers architectures={named} is not supported for model_type={model_type!r}; "
                          f"expected one of {sorted(classes)}")
    if len(set(classes.values())) == 1:  # the SigLIP towers: one class each
        return next(iter(classes.values()))
    key = PROJECTION_KEYS[model_type]
    if named:
        projects = classes[named[0]]
        if projection is not None and projection != projects:
            raise ConfigError(f"transformers architectures={named} {'projects' if projects else 'has no projection'}"
                              f", but the weights {'lack' if projects else 'hold'} {key!r}: refusing to guess "
                              "which output is wanted")
        return projects
    if projection is None:
        raise ConfigError(f"transformers config without `architectures` (model_type={model_type!r}): cannot tell "
                          f"{' from '.join(sorted(classes))}; convert the model folder (its weights tell whether "
                          f"{key!r} is there) or add `architectures` to the config")
    return projection


def _single_tower(d: dict, model_type: str, projection: bool | None) -> CLIPConfig:
    family, tower = SINGLE_TOWER[model_type]
    extra = {"clip": {"projection_dim"}, "siglip": {"vision_use_head" if tower == "image" else "projection_size"}}
    _check(d, (_VISION if tower == "image" else _TEXT) | extra[family], "config")
    projects = single_tower_projects(d, projection)
    if family == "clip" and tower == "image":
        vision = _clip_vision(d, "config")
        return CLIPConfig(towers="image", embed_dim=d.get("projection_dim", 512) if projects else vision.width,
                          vision=vision, vision_proj=projects)
    if family == "clip":  # CLIPTextConfig's own default eos_token_id is 49407 (first-EOS pooling)
        text = _clip_text(d, "config")
        return CLIPConfig(towers="text", embed_dim=d.get("projection_dim", 512) if projects else text.width,
                          text=text, text_proj=projects)
    siglip = dict(init_log_logit_scale=math.log(10.0), init_logit_bias=-10.0)  # (no params: the SigLIP marker)
    if tower == "image":
        vision = _siglip_vision(d, "config")
        return CLIPConfig(towers="image", embed_dim=vision.width, vision=vision, vision_proj=False,
                          preprocess=SIGLIP_PREPROCESS, **siglip)
    text = _siglip_text(d, "config")
    return CLIPConfig(towers="text", embed_dim=d.get("projection_size") or text.width, text=text, **siglip)
