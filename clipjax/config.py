"""Frozen architecture configs and open_clip-named presets.

Configs are hashable frozen dataclasses, so they can be static arguments of
`jax.jit`. Presets are keyed by open_clip model names (`ViT-B-32`, ...);
`from_open_clip_json` and `from_hf_config` build the same dataclasses from the
other libraries' config formats and raise on keys they do not understand.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)

ACTIVATIONS = ("gelu", "quick_gelu", "gelu_tanh", "relu")
VISION_POOLS = ("tok", "map", "gap", "attnpool")
TEXT_POOLS = ("argmax", "last", "first", "eos")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")


class ConfigError(ValueError):
    """A config names an unknown architecture, key or value."""


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not supported; expected one of {choices}")


@dataclass(frozen=True)
class VisionConfig:
    """Image tower. `arch='vit'` (OpenAI/open_clip/SigLIP ViT) or `'resnet'` (ModifiedResNet).

    For `resnet`, `layers` is the tuple of bottleneck counts per stage, `width`
    the stem width (64 for RN50) and `heads` the attention-pool heads.
    """

    arch: str = "vit"
    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    layers: int | tuple[int, ...] = 12
    heads: int = 12
    mlp_dim: int = 3072
    act: str = "gelu"
    pool: str = "tok"  # tok: class token; map: attention-pool head; gap: mean; attnpool: RN
    ln_pre: bool = True  # OpenAI ViT has a LayerNorm before the blocks; SigLIP has none
    patch_bias: bool = False
    ln_eps: float = 1e-5

    def __post_init__(self):
        _check_choice("vision.arch", self.arch, ("vit", "resnet"))
        _check_choice("vision.act", self.act, ACTIVATIONS)
        _check_choice("vision.pool", self.pool, VISION_POOLS)
        if self.arch == "resnet":
            if not isinstance(self.layers, tuple) or len(self.layers) != 4:
                raise ConfigError(f"resnet vision.layers must be a 4-tuple, got {self.layers!r}")
            if self.pool != "attnpool":
                raise ConfigError("resnet vision tower uses pool='attnpool'")
        else:
            if not isinstance(self.layers, int):
                raise ConfigError(f"vit vision.layers must be an int, got {self.layers!r}")
            if self.width % self.heads:
                raise ConfigError(f"vision.width={self.width} not divisible by heads={self.heads}")
            if self.pool == "tok" and not self.class_token:
                raise ConfigError("pool='tok' needs a class token")

    @property
    def class_token(self) -> bool:
        return self.pool == "tok"

    @property
    def grid(self) -> int:
        """Patches per side (ViT) or final feature-map side (ResNet, stride 32)."""
        return self.image_size // (32 if self.arch == "resnet" else self.patch_size)

    @property
    def num_tokens(self) -> int:
        return self.grid**2 + int(self.class_token)


@dataclass(frozen=True)
class TextConfig:
    """Text tower: a transformer over token ids `[B, context_length]`, pooled to one vector."""

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_dim: int = 2048
    act: str = "gelu"
    causal: bool = True
    pool: str = "argmax"  # argmax: OpenAI's EOT rule; last; first; eos: first `eos_id`
    eos_id: int = 49407
    proj_bias: bool = False
    ln_eps: float = 1e-5

    def __post_init__(self):
        _check_choice("text.act", self.act, ACTIVATIONS)
        _check_choice("text.pool", self.pool, TEXT_POOLS)
        if self.width % self.heads:
            raise ConfigError(f"text.width={self.width} not divisible by heads={self.heads}")


@dataclass(frozen=True)
class PreprocessConfig:
    """Eval transform: resize (`shortest` side then centre crop, or `squash`), /255, mean/std."""

    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    resize_mode: str = "shortest"
    interpolation: str = "bicubic"

    def __post_init__(self):
        _check_choice("preprocess.resize_mode", self.resize_mode, ("shortest", "squash"))
        _check_choice("preprocess.interpolation", self.interpolation, ("bicubic", "bilinear"))


# chosen at load / train time, never part of a checkpoint's architecture
RUNTIME_OPTIONS = ("dtype", "param_dtype", "scan_layers", "remat", "attention")


@dataclass(frozen=True)
class CLIPConfig:
    """Both towers, the shared embedding size and run-time options.

    `embed_dim=None` on a tower side means "no projection": the pooled width is
    the embedding (SigLIP's vision tower). `dtype` is the compute dtype, apart
    from `param_dtype`. `scan_layers` runs the blocks with `lax.scan` (False:
    unrolled); `remat` picks a `jax.checkpoint` policy for each block;
    `attention="cudnn"` selects cuDNN flash attention on GPU (bf16/fp16 only).
    """

    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    vision_proj: bool = True
    text_proj: bool = True
    init_log_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: float | None = None
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat: str = "none"
    attention: str = "xla"  # jax.nn.dot_product_attention implementation: "xla" or "cudnn" (GPU flash)

    def __post_init__(self):
        _check_choice("remat", self.remat, REMAT_POLICIES)
        _check_choice("attention", self.attention, ("xla", "cudnn"))
        _check_choice("dtype", self.dtype, ("float32", "bfloat16", "float16"))
        _check_choice("param_dtype", self.param_dtype, ("float32", "bfloat16"))
        if not self.vision_proj and self.vision.width != self.embed_dim and self.vision.arch == "vit":
            raise ConfigError(
                f"vision_proj=False needs vision.width == embed_dim, got {self.vision.width} != {self.embed_dim}")
        if not self.text_proj and self.text.width != self.embed_dim:
            raise ConfigError(
                f"text_proj=False needs text.width == embed_dim, got {self.text.width} != {self.embed_dim}")

    @property
    def is_siglip(self) -> bool:
        return self.init_logit_bias is not None

    def replace(self, **kw) -> "CLIPConfig":
        return dataclasses.replace(self, **kw)

    def architecture(self) -> "CLIPConfig":
        """This config with its run-time options (`RUNTIME_OPTIONS`) at their defaults: what a
        checkpoint stores, and what two configs must share to load each other's params."""
        return dataclasses.replace(self, **{k: f.default for k, f in self.__dataclass_fields__.items()
                                            if k in RUNTIME_OPTIONS})

    def architecture_dict(self) -> dict:
        """`to_dict()` without the run-time options (the saved form)."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_OPTIONS}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPConfig":
        """Inverse of `to_dict`; unknown keys raise `ConfigError`. Reads configs saved before the
        log-parameter was renamed (`init_logit_scale` -> `init_log_logit_scale`)."""
        d = dict(d)
        if "init_logit_scale" in d and "init_log_logit_scale" not in d:
            d["init_log_logit_scale"] = d.pop("init_logit_scale")
        sub = {"vision": VisionConfig, "text": TextConfig, "preprocess": PreprocessConfig}
        for key, kind in sub.items():
            if key in d:
                d[key] = _build(kind, d[key], key)
        return _build(cls, d, "config")


def _build(kind, d: dict, where: str):
    names = {f.name for f in dataclasses.fields(kind)}
    extra = set(d) - names
    if extra:
        raise ConfigError(f"unknown {where} keys {sorted(extra)}; expected a subset of {sorted(names)}")
    d = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
    return kind(**d)


# ----------------------------------------------------------------------------- presets


def _openai_vit(embed, image, patch, width, layers, text_width, text_layers=12, act="gelu"):
    return CLIPConfig(
        embed_dim=embed,
        vision=VisionConfig(image_size=image, patch_size=patch, width=width, layers=layers,
                            heads=width // 64, mlp_dim=width * 4, act=act),
        text=TextConfig(width=text_width, heads=text_width // 64, layers=text_layers,
                        mlp_dim=text_width * 4, act=act),
    )


def _resnet(embed, layers, width, image=224, text_width=512, act="gelu"):
    return CLIPConfig(
        embed_dim=embed,
        vision=VisionConfig(arch="resnet", image_size=image, width=width, layers=layers,
                            heads=width * 32 // 64, mlp_dim=0, pool="attnpool", ln_pre=False),
        text=TextConfig(width=text_width, heads=text_width // 64, mlp_dim=text_width * 4, act=act),
    )


def _siglip(embed, image, patch, width, layers, heads, mlp, ctx, vocab=32000, text_width=None,
            text_layers=None, text_heads=None, text_mlp=None, act="gelu"):
    return CLIPConfig(
        embed_dim=embed,
        vision=VisionConfig(image_size=image, patch_size=patch, width=width, layers=layers,
                            heads=heads, mlp_dim=mlp, act=act, pool="map", ln_pre=False,
                            patch_bias=True, ln_eps=1e-6),
        text=TextConfig(context_length=ctx, vocab_size=vocab, width=text_width or width,
                        heads=text_heads or heads, layers=text_layers or layers,
                        mlp_dim=text_mlp or mlp, act=act, causal=False, pool="last", eos_id=1,
                        proj_bias=True, ln_eps=1e-6),
        vision_proj=False,
        init_log_logit_scale=math.log(10.0),
        init_logit_bias=-10.0,
        preprocess=PreprocessConfig(mean=HALF, std=HALF, resize_mode="squash"),
    )


PRESETS: dict[str, CLIPConfig] = {
    "ViT-B-32": _openai_vit(512, 224, 32, 768, 12, 512),
    "ViT-B-32-quickgelu": _openai_vit(512, 224, 32, 768, 12, 512, act="quick_gelu"),
    "ViT-B-16": _openai_vit(512, 224, 16, 768, 12, 512),
    "ViT-B-16-quickgelu": _openai_vit(512, 224, 16, 768, 12, 512, act="quick_gelu"),
    "ViT-L-14": _openai_vit(768, 224, 14, 1024, 24, 768),
    "ViT-L-14-quickgelu": _openai_vit(768, 224, 14, 1024, 24, 768, act="quick_gelu"),
    "ViT-L-14-336": _openai_vit(768, 336, 14, 1024, 24, 768),
    "ViT-L-14-336-quickgelu": _openai_vit(768, 336, 14, 1024, 24, 768, act="quick_gelu"),
    "RN50": _resnet(1024, (3, 4, 6, 3), 64),
    "RN50-quickgelu": _resnet(1024, (3, 4, 6, 3), 64, act="quick_gelu"),
    "RN101": _resnet(512, (3, 4, 23, 3), 64),
    "ViT-B-16-SigLIP": _siglip(768, 224, 16, 768, 12, 12, 3072, 64),
    "ViT-B-16-SigLIP-256": _siglip(768, 256, 16, 768, 12, 12, 3072, 64),
    "ViT-B-16-SigLIP-384": _siglip(768, 384, 16, 768, 12, 12, 3072, 64),
    "ViT-L-16-SigLIP-256": _siglip(1024, 256, 16, 1024, 24, 16, 4096, 64),
    "ViT-SO400M-14-SigLIP": _siglip(1152, 224, 14, 1152, 27, 16, 4304, 16),
    "ViT-SO400M-14-SigLIP-384": _siglip(1152, 384, 14, 1152, 27, 16, 4304, 64),
}


def long_clip(config: CLIPConfig, context_length: int = 248) -> CLIPConfig:
    """The Long-CLIP variant of an OpenAI-style config: text context 77 -> 248."""
    return config.replace(text=dataclasses.replace(config.text, context_length=context_length))


PRESETS["LongCLIP-B-16"] = long_clip(PRESETS["ViT-B-16"])
PRESETS["LongCLIP-L-14"] = long_clip(PRESETS["ViT-L-14"])


def get_config(name: str, **overrides) -> CLIPConfig:
    """Preset by open_clip name, with optional top-level field overrides."""
    if name not in PRESETS:
        raise ConfigError(f"unknown architecture {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]


# ----------------------------------------------------------------------------- open_clip JSON

_OC_TOP = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", "init_logit_bias",
           "custom_text", "cast_dtype"}
_OC_VISION = {"layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size", "ls_init_value",
              "patch_dropout", "attentional_pool", "no_ln_pre", "final_ln_after_pool", "pool_type",
              "output_tokens", "act_kwargs", "norm_kwargs", "timm_model_name", "timm_model_pretrained",
              "timm_pool", "timm_proj", "timm_proj_bias", "timm_drop", "timm_drop_path", "image_mean",
              "image_std", "resize_mode", "interpolation", "pos_embed_type", "embed_cls", "class_token"}
_OC_TEXT = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "ls_init_value",
            "hf_tokenizer_name", "tokenizer_kwargs", "no_causal_mask", "proj_bias", "pool_type",
            "norm_kwargs", "act_kwargs", "embed_cls", "pad_id", "eos_id", "output_tokens",
            "attentional_pool", "proj_type", "hf_model_name", "hf_model_pretrained", "hf_proj_type",
            "hf_pooler_type", "final_ln_after_pool", "text_mask"}
_UNSUPPORTED = {"ls_init_value", "attentional_pool", "hf_model_name", "embed_cls"}

_TIMM_SIGLIP = re.compile(r"vit_(base|large|so400m)_patch(\d+)_siglip_(\d+)")
_TIMM_SIZES = {"base": (768, 12, 12, 3072), "large": (1024, 24, 16, 4096), "so400m": (1152, 27, 16, 4304)}


def _check_keys(d: dict, allowed: set, where: str) -> None:
    extra = set(d) - allowed
    if extra:
        raise ConfigError(f"unknown open_clip {where} keys {sorted(extra)}")
    bad = [k for k in _UNSUPPORTED & set(d) if d[k] not in (None, False, 0)]
    if bad:
        raise ConfigError(f"open_clip {where} options {sorted(bad)} are not supported by clipjax")


def from_open_clip_json(src: str | os.PathLike | dict) -> CLIPConfig:
    """Build a config from an open_clip model-config JSON (path, JSON text or dict)."""
    if isinstance(src, dict):
        d = src
    elif isinstance(src, str) and src.lstrip().startswith("{"):
        d = json.loads(src)
    else:
        with open(src) as f:
            d = json.load(f)
    d = d.get("model_cfg", d)
    _check_keys(d, _OC_TOP, "model")
    v, t = dict(d.get("vision_cfg", {})), dict(d.get("text_cfg", {}))
    _check_keys(v, _OC_VISION, "vision_cfg")
    _check_keys(t, _OC_TEXT, "text_cfg")
    act = "quick_gelu" if d.get("quick_gelu") else "gelu"
    embed = d["embed_dim"]
    pre = PreprocessConfig(
        mean=tuple(v.get("image_mean") or OPENAI_MEAN), std=tuple(v.get("image_std") or OPENAI_STD),
        resize_mode={"shortest": "shortest", "squash": "squash", None: "shortest"}[v.get("resize_mode")],
        interpolation=v.get("interpolation") or "bicubic")
    image_size = v.get("image_size", 224)
    image_size = image_size[0] if isinstance(image_size, (list, tuple)) else image_size
    vision_proj = True
    if "timm_model_name" in v:
        m = _TIMM_SIGLIP.fullmatch(v["timm_model_name"])
        if not m or v.get("timm_pool", "map") != "map" or v.get("timm_proj", "none") != "none":
            raise ConfigError(f"timm vision tower {v['timm_model_name']!r} is not supported "
                              "(supported: vit_{base,large,so400m}_patch*_siglip_* with map pool, no proj)")
        width, layers, heads, mlp = _TIMM_SIZES[m.group(1)]
        vision = VisionConfig(image_size=image_size, patch_size=int(m.group(2)), width=width, layers=layers,
                              heads=heads, mlp_dim=mlp, act="gelu", pool="map", ln_pre=False,
                              patch_bias=True, ln_eps=1e-6)
        vision_proj = False
    elif isinstance(v.get("layers"), (list, tuple)):
        width = v.get("width", 64)
        vision = VisionConfig(arch="resnet", image_size=image_size, width=width, layers=tuple(v["layers"]),
                              heads=width * 32 // 64, mlp_dim=0, pool="attnpool", ln_pre=False)
    else:
        width = v.get("width", 768)
        pool = v.get("pool_type", "tok")
        vision = VisionConfig(
            image_size=image_size, patch_size=v.get("patch_size", 16), width=width, layers=v.get("layers", 12),
            heads=width // v.get("head_width", 64), mlp_dim=int(width * v.get("mlp_ratio", 4.0)), act=act,
            pool={"tok": "tok", "avg": "gap"}.get(pool, pool), ln_pre=not v.get("no_ln_pre", False),
            ln_eps=(v.get("norm_kwargs") or {}).get("eps", 1e-5))
    t_width = t.get("width", 512)
    pool = t.get("pool_type", "argmax")
    text = TextConfig(
        context_length=t.get("context_length", 77), vocab_size=t.get("vocab_size", 49408), width=t_width,
        heads=t.get("heads", 8), layers=t.get("layers", 12), mlp_dim=int(t_width * t.get("mlp_ratio", 4.0)),
        act=act, causal=not t.get("no_causal_mask", False), pool=pool,
        eos_id=t.get("eos_id", 49407 if pool != "last" else 1), proj_bias=t.get("proj_bias", False),
        ln_eps=(t.get("norm_kwargs") or {}).get("eps", 1e-5))
    bias = d.get("init_logit_bias")
    return CLIPConfig(
        embed_dim=embed, vision=vision, text=text, vision_proj=vision_proj,
        init_log_logit_scale=d.get("init_logit_scale", math.log(10.0) if bias is not None else math.log(1 / 0.07)),
        init_logit_bias=bias, preprocess=pre)


# ----------------------------------------------------------------------------- transformers


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
