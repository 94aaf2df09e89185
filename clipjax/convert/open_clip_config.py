"""open_clip model-config JSON -> `CLIPConfig`: every key is honoured exactly or refused by name.

The keys are those of open_clip 3.3's `CLIPVisionCfg` / `CLIPTextCfg` and `CLIP.__init__`. A key
whose value changes what the PyTorch model computes and that clipjax cannot reproduce raises
`ConfigError` naming the key as written in the file (`vision_cfg.pos_embed_type`). Keys that only
matter for training regularisation (`patch_dropout`, `timm_drop_path`), the tokenizer
(`hf_tokenizer_name`, which clipjax takes from the tokenizer folder given at conversion), precision
(`cast_dtype`, chosen at load time) or returned extras (`output_tokens`) are accepted: they do
not change the embeddings.

CoCa (`multimodal_cfg`, with `custom_text`): the config converts to CoCa's contrastive model - the
image tower with its attentional pooler (`vision_cfg.attentional_pool`) and the text tower with its
appended class token (`text_cfg.embed_cls`), exact for open_clip's `CoCa.encode_image` /
`encode_text` and the logits. `multimodal_cfg` describes the captioning text decoder, which clipjax
does not run: it is read for nothing, and conversion ignores the decoder's weights (`text_decoder.*`).
Captioning (`CoCa.generate`) is not supported.
"""

from __future__ import annotations

import json
import math
import os
import re

from clipjax.config import (OPENAI_MEAN, OPENAI_STD, CLIPConfig, ConfigError, PreprocessConfig, TextConfig,
                            VisionConfig)
from clipjax.presets import SIGLIP_PREPROCESS, mlp_width, timm_siglip_vision

TOP_KEYS = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", "init_logit_bias",
            "nonscalar_logit_scale", "custom_text", "cast_dtype", "multimodal_cfg"}
# keys of open_clip's attention-block variants; any truthy value is refused
_CUSTOM_BLOCK = ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc")
VISION_KEYS = {"layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size", "ls_init_value",
               "patch_dropout", "attentional_pool", "attn_pooler_queries", "attn_pooler_heads", "no_ln_pre",
               "pos_embed_type", "final_ln_after_pool", "pool_type", "output_tokens", "act_kwargs", "norm_kwargs",
               "block_type", *_CUSTOM_BLOCK, "timm_model_name", "timm_model_pretrained", "timm_pool", "timm_proj",
               "timm_proj_bias", "timm_drop", "timm_drop_path",
               # preprocessing, as older open_clip configs carried it
               "image_mean", "image_std", "resize_mode", "interpolation"}
TEXT_KEYS = {"context_length", "vocab_size", "hf_tokenizer_name", "tokenizer_mode", "tokenizer_kwargs", "width",
             "heads", "layers", "mlp_ratio", "ls_init_value", "embed_cls", "pad_id", "eos_id", "no_causal_mask",
             "final_ln_after_pool", "pool_type", "proj_bias", "proj_type", "output_tokens", "act_kwargs",
             "norm_kwargs", "block_type", *_CUSTOM_BLOCK, "hf_model_name", "hf_model_pretrained", "hf_proj_type",
             "hf_pooler_type"}
PREPROCESS_KEYS = {"size", "mode", "mean", "std", "interpolation", "resize_mode", "fill_color"}

# timm image towers open_clip configures that clipjax does not run, by family (for the error message)
_TIMM_FAMILIES = (("convnext", "ConvNeXt"), ("eva", "EVA"), ("fastvit", "FastViT (MobileCLIP)"),
                  ("mci", "MobileCLIP"), ("vitamin", "ViTamin"), ("swin", "Swin"), ("pe_core", "PE-Core"),
                  ("relpos", "ViT with relative positions"), ("", "timm"))


def _refuse(where: str, key: str, why: str) -> ConfigError:
    return ConfigError(f"open_clip {where}.{key}: {why}; clipjax cannot run this model exactly and refuses it "
                       "rather than convert it approximately")


def _check_keys(d: dict, allowed: set, where: str) -> None:
    extra = sorted(set(d) - allowed)
    if extra:
        raise ConfigError(f"unknown open_clip {where} keys {extra} (open_clip 3.3 keys are {sorted(allowed)})")


def _act(d: dict, where: str, quick_gelu: bool) -> str:
    """The activation: QuickGELU or GELU, with `act_kwargs` (`{"approximate": "tanh"}`) as open_clip passes them."""
    kw = d.get("act_kwargs")
    if kw is None:
        return "quick_gelu" if quick_gelu else "gelu"
    if quick_gelu and kw:
        raise _refuse(where, "act_kwargs", f"{kw} with quick_gelu (open_clip would pass them to QuickGELU)")
    extra = set(kw) - {"approximate"}
    if extra:
        raise _refuse(where, "act_kwargs", f"keys {sorted(extra)} are not supported (only 'approximate')")
    approx = kw.get("approximate", "none")
    if approx not in ("none", "tanh"):
        raise _refuse(where, "act_kwargs", f"approximate={approx!r}")
    return "quick_gelu" if quick_gelu else ("gelu_tanh" if approx == "tanh" else "gelu")


def _eps(d: dict, where: str) -> float:
    kw = d.get("norm_kwargs") or {}
    extra = set(kw) - {"eps"}
    if extra:
        raise _refuse(where, "norm_kwargs", f"keys {sorted(extra)} are not supported (only 'eps')")
    return float(kw.get("eps", 1e-5))


def _check_block(d: dict, where: str) -> float | None:
    """Refuse open_clip's custom blocks; return the LayerScale init value (`ls_init_value`) or None."""
    if d.get("block_type") not in (None, "default"):
        raise _refuse(where, "block_type", f"{d['block_type']!r} (open_clip's custom attention block)")
    for key in _CUSTOM_BLOCK:
        if d.get(key):
            raise _refuse(where, key, "open_clip's custom attention-block variant")
    ls = d.get("ls_init_value")
    return None if ls is None else float(ls)


def _image_size(v: dict) -> int:
    size = v.get("image_size", 224)
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise _refuse("vision_cfg", "image_size", f"{size} is not square")
        size = size[0]
    return int(size)


def _timm_vision(v: dict) -> VisionConfig:
    name = v["timm_model_name"]
    if "siglip" not in name:
        family = next(label for key, label in _TIMM_FAMILIES if key in name)
        raise _refuse("vision_cfg", "timm_model_name", f"{name!r} ({family} image tower) is not supported "
                      "(supported: the timm SigLIP ViTs)")
    if v.get("timm_pool", "avg") != "map" or v.get("timm_proj", "linear") != "none":
        raise _refuse("vision_cfg", "timm_pool", f"timm_pool={v.get('timm_pool')!r} with timm_proj="
                      f"{v.get('timm_proj')!r} (supported: the SigLIP head, timm_pool='map' and timm_proj='none')")
    image = _image_size(v)
    m = re.search(r"_(\d+)$", name)
    if m and int(m.group(1)) != image:
        raise _refuse("vision_cfg", "image_size", f"{image} differs from the size timm builds {name!r} with "
                      f"({m.group(1)}); open_clip does not pass image_size to timm")
    try:
        return timm_siglip_vision(name, image)
    except ConfigError as e:
        raise _refuse("vision_cfg", "timm_model_name", str(e)) from None


def _native_vision(v: dict, quick_gelu: bool, embed_dim: int) -> VisionConfig:
    where = "vision_cfg"
    ls = _check_block(v, where)
    attn_pool = v.get("attentional_pool", False)
    if isinstance(attn_pool, str):
        raise _refuse(where, "attentional_pool", f"{attn_pool!r} (open_clip's pooler variants 'parallel'/'cascade', "
                      "marked untested there: ln_post is sized for the pooled width but applied to the tokens, and "
                      "the pooled embedding keeps a query axis; supported: true, CoCa's pooler)")
    if v.get("pos_embed_type", "learnable") != "learnable":
        raise _refuse(where, "pos_embed_type", f"{v['pos_embed_type']!r} (only 'learnable')")
    width, head_width = v.get("width", 768), v.get("head_width", 64)
    if isinstance(v.get("layers"), (list, tuple)):  # ModifiedResNet
        for key in ("act_kwargs", "norm_kwargs", "no_ln_pre", "final_ln_after_pool", "pool_type", "ls_init_value",
                    "attentional_pool"):
            if v.get(key) not in (None, False, {}, "tok"):
                raise _refuse(where, key, "has no meaning for a ModifiedResNet image tower")
        if width * 32 % head_width:
            raise _refuse(where, "head_width", f"{head_width} does not divide the attention-pool width {width * 32}")
        return VisionConfig(arch="resnet", image_size=_image_size(v), width=width, layers=tuple(v["layers"]),
                            heads=width * 32 // head_width, mlp_dim=0, pool="attnpool", ln_pre=False)
    if width % head_width:
        raise _refuse(where, "head_width", f"{head_width} does not divide width {width}")
    pool = v.get("pool_type", "tok")
    if pool not in ("tok", "avg"):
        raise _refuse(where, "pool_type", f"{pool!r} (supported: 'tok', 'avg')")
    final_ln_after_pool = bool(v.get("final_ln_after_pool", False))
    queries, heads = 256, 8  # VisionConfig's defaults: unused without the pooler
    if attn_pool:
        if pool != "tok":
            raise _refuse(where, "pool_type", f"{pool!r} with attentional_pool (supported: 'tok', the first pooled "
                          "query, which is CoCa's contrastive embedding)")
        queries, heads = int(v.get("attn_pooler_queries", 256)), int(v.get("attn_pooler_heads", 8))
        if embed_dim % heads:
            raise _refuse(where, "attn_pooler_heads", f"{heads} does not divide embed_dim {embed_dim}, the pooler's "
                          "width")
        pool, final_ln_after_pool = "attn", False  # open_clip ignores final_ln_after_pool with the pooler
    return VisionConfig(
        image_size=_image_size(v), patch_size=v.get("patch_size", 16), width=width, layers=v.get("layers", 12),
        heads=width // head_width, mlp_dim=mlp_width(width, v.get("mlp_ratio", 4.0)), act=_act(v, where, quick_gelu),
        pool=pool, ln_pre=not v.get("no_ln_pre", False), ln_eps=_eps(v, where),
        final_ln_after_pool=final_ln_after_pool, layer_scale_init=ls, attn_pool_queries=queries,
        attn_pool_heads=heads)


def _text(t: dict, quick_gelu: bool, custom_text: bool) -> tuple[TextConfig, bool]:
    """(TextConfig, has a projection). `custom_text`: open_clip runs the tower's own forward (CustomTextCLIP,
    CoCa); its CLIP class re-implements it without the class token of `embed_cls`."""
    where = "text_cfg"
    if t.get("hf_model_name"):
        raise _refuse(where, "hf_model_name", f"the Hugging Face text tower {t['hf_model_name']!r} is not supported")
    ls = _check_block(t, where)
    embed_cls = bool(t.get("embed_cls", False))
    if embed_cls and not custom_text:
        raise _refuse(where, "embed_cls", "without custom_text, open_clip's CLIP class drops the class token (its "
                      "encode_text adds the context_length + 1 position rows to context_length tokens)")
    if t.get("final_ln_after_pool"):
        raise _refuse(where, "final_ln_after_pool", "open_clip 3.3's text tower ignores this key, earlier versions "
                      "did not: which one produced the weights cannot be known")
    pool = t.get("pool_type", "argmax")
    if pool not in ("argmax", "eos", "first", "last"):
        raise _refuse(where, "pool_type", f"{pool!r}")
    proj_type = t.get("proj_type", "linear")
    if proj_type not in ("linear", "none"):
        raise _refuse(where, "proj_type", f"{proj_type!r} (open_clip's TextTransformer builds a linear projection "
                      "for it; supported: 'linear', 'none')")
    width = t.get("width", 512)
    if embed_cls:  # open_clip reads the appended class token whatever pool_type says
        pool = "last"
    eos = t.get("eos_id", 2) if pool == "eos" else (49407 if pool == "argmax" else 1)
    text = TextConfig(context_length=t.get("context_length", 77), vocab_size=t.get("vocab_size", 49408), width=width,
                      heads=t.get("heads", 8), layers=t.get("layers", 12),
                      mlp_dim=mlp_width(width, t.get("mlp_ratio", 4.0)), act=_act(t, where, quick_gelu),
                      causal=not t.get("no_causal_mask", False), pool=pool, eos_id=eos,
                      proj_bias=bool(t.get("proj_bias", False)) and proj_type != "none", ln_eps=_eps(t, where),
                      layer_scale_init=ls, embed_cls=embed_cls, pad_id=int(t.get("pad_id", 0)) if embed_cls else 0)
    return text, proj_type != "none"


def _preprocess(v: dict, pre: dict | None, siglip: bool) -> PreprocessConfig:
    default = SIGLIP_PREPROCESS if siglip else PreprocessConfig(mean=OPENAI_MEAN, std=OPENAI_STD)
    pre = dict(pre or {})
    _check_keys(pre, PREPROCESS_KEYS, "preprocess_cfg")
    if pre.get("fill_color") not in (None, 0):
        raise _refuse("preprocess_cfg", "fill_color", "padding resize is not supported")
    mean = pre.get("mean", v.get("image_mean")) or default.mean
    std = pre.get("std", v.get("image_std")) or default.std
    mode = pre.get("resize_mode", v.get("resize_mode")) or default.resize_mode
    if mode not in ("shortest", "squash"):
        raise _refuse("preprocess_cfg", "resize_mode", f"{mode!r} (supported: 'shortest', 'squash')")
    interp = pre.get("interpolation", v.get("interpolation")) or default.interpolation
    if interp not in ("bicubic", "bilinear"):
        raise _refuse("preprocess_cfg", "interpolation", f"{interp!r} (supported: 'bicubic', 'bilinear')")
    if "size" in pre and pre["size"] not in (None, _image_size(v), [_image_size(v)] * 2):
        raise _refuse("preprocess_cfg", "size", f"{pre['size']} differs from vision_cfg.image_size")
    return PreprocessConfig(mean=tuple(mean), std=tuple(std), resize_mode=mode, interpolation=interp)


def _check_coca(v: dict, t: dict, custom_text: bool, timm: bool) -> None:
    """What open_clip's `CoCa` needs for its `encode_image` / `encode_text` to be the towers' pooled outputs."""
    if not custom_text:
        raise _refuse("model", "multimodal_cfg", "without custom_text open_clip builds its CLIP class, which takes "
                      "no multimodal_cfg")
    if timm:
        raise _refuse("model", "multimodal_cfg", "CoCa with a timm image tower (open_clip's CoCa unpacks "
                      "(pooled, tokens) from the image tower, which timm towers do not return)")
    for where, cfg in (("vision_cfg", v), ("text_cfg", t)):
        if not cfg.get("output_tokens") and not cfg.get("hf_model_name"):
            raise _refuse(where, "output_tokens", "must be true in a CoCa config (open_clip's CoCa unpacks "
                          "(pooled, tokens) from each tower)")


def read_json(src) -> dict:
    if isinstance(src, dict):
        return src
    if isinstance(src, str) and src.lstrip().startswith("{"):
        return json.loads(src)
    with open(os.fspath(src)) as f:
        return json.load(f)


def from_open_clip_json(src: str | os.PathLike | dict) -> CLIPConfig:
    """A `CLIPConfig` from an open_clip model config (path, JSON text or dict), or the Hub's
    `open_clip_config.json` (`{"model_cfg": ..., "preprocess_cfg": ...}`). Raises `ConfigError`
    naming the first key clipjax cannot honour exactly."""
    d = read_json(src)
    pre = d.get("preprocess_cfg")
    d = d.get("model_cfg", d)
    _check_keys(d, TOP_KEYS, "model")
    if d.get("nonscalar_logit_scale"):
        raise _refuse("model", "nonscalar_logit_scale", "a [1]-shaped logit scale is not supported")
    v, t = dict(d.get("vision_cfg", {})), dict(d.get("text_cfg", {}))
    _check_keys(v, VISION_KEYS, "vision_cfg")
    _check_keys(t, TEXT_KEYS, "text_cfg")
    custom_text = bool(d.get("custom_text", False))
    timm = bool(v.get("timm_model_name"))
    if "multimodal_cfg" in d:  # CoCa: only its contrastive towers are converted (module docstring)
        _check_coca(v, t, custom_text, timm)
    quick = bool(d.get("quick_gelu", False))
    # timm towers ignore quick_gelu, as in open_clip
    vision = _timm_vision(v) if timm else _native_vision(v, quick, d["embed_dim"])
    text, text_proj = _text(t, quick, custom_text)
    bias = d.get("init_logit_bias")
    siglip = bias is not None
    scale = d.get("init_logit_scale", math.log(10.0) if siglip else math.log(1 / 0.07))
    return CLIPConfig(embed_dim=d["embed_dim"], vision=vision, text=text, vision_proj=not timm, text_proj=text_proj,
                      init_log_logit_scale=float(scale), init_logit_bias=None if bias is None else float(bias),
                      preprocess=_preprocess(v, pre, siglip and timm))
