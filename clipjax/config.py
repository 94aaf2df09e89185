"""Frozen architecture configs.

Configs are hashable frozen dataclasses, so they can be static arguments of
`jax.jit`. Presets under open_clip's model names are in `clipjax.presets`; the
open_clip and transformers config readers live with the converters
(`clipjax.convert.open_clip_config`, `clipjax.convert.hf_config`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)

ACTIVATIONS = ("gelu", "quick_gelu", "gelu_tanh", "relu")
VISION_POOLS = ("tok", "avg", "gap", "map", "attnpool", "attn")
TEXT_POOLS = ("argmax", "last", "first", "eos")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
TOWERS = ("both", "image", "text")
# the CLIPConfig fields that belong to one tower: unused (and held at their defaults) when it is absent
TOWER_FIELDS = {"image": ("vision", "vision_proj", "preprocess"), "text": ("text", "text_proj")}


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

    `pool`: `tok` reads the class token; `avg` is open_clip's `pool_type="avg"` (a class token is in the
    sequence, the mean is over the patch tokens only, CLIPA); `gap` has no class token and averages all
    tokens (big_vision); `map` is SigLIP's attention-pool head; `attnpool` the ResNet's; `attn` is
    CoCa's attentional pooler (open_clip `AttentionalPooler`): `attn_pool_queries` learned queries
    `[Q, embed_dim]` attend with `attn_pool_heads` heads over the final tokens `[B, T, width]`, then
    `ln_post` (over `embed_dim`) and the projection `[embed_dim, embed_dim]`; the first query is the
    contrastive embedding (the other queries only feed CoCa's text decoder). A class token is in the
    sequence (open_clip's ViT always has one).

    `layer_scale_init`: LayerScale in every block (open_clip `ls_init_value`): the attention and MLP
    branches are multiplied by learned per-channel gammas `ls1`, `ls2`, each `[layers, width]` once
    stacked, initialised to this value; `None` (the default): no LayerScale.
    """

    arch: str = "vit"
    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    layers: int | tuple[int, ...] = 12
    heads: int = 12
    mlp_dim: int = 3072
    act: str = "gelu"
    pool: str = "tok"
    ln_pre: bool = True  # OpenAI ViT has a LayerNorm before the blocks; SigLIP has none
    patch_bias: bool = False
    ln_eps: float = 1e-5
    final_ln_after_pool: bool = False  # open_clip's option: ln_post on the pooled vector, not on the tokens
    layer_scale_init: float | None = None  # LayerScale gammas [width] per block; None: no LayerScale
    attn_pool_queries: int = 256  # pool="attn" only: learned queries of CoCa's attentional pooler
    attn_pool_heads: int = 8  # pool="attn" only: its heads, over embed_dim

    def __post_init__(self):
        _check_choice("vision.arch", self.arch, ("vit", "resnet"))
        _check_choice("vision.act", self.act, ACTIVATIONS)
        _check_choice("vision.pool", self.pool, VISION_POOLS)
        if self.arch == "resnet":
            if not isinstance(self.layers, tuple) or len(self.layers) != 4:
                raise ConfigError(f"resnet vision.layers must be a 4-tuple, got {self.layers!r}")
            if self.pool != "attnpool":
                raise ConfigError("resnet vision tower uses pool='attnpool'")
            if self.layer_scale_init is not None:
                raise ConfigError("vision.layer_scale_init applies to ViT blocks, not to a resnet tower")
        else:
            if not isinstance(self.layers, int):
                raise ConfigError(f"vit vision.layers must be an int, got {self.layers!r}")
            if self.width % self.heads:
                raise ConfigError(f"vision.width={self.width} not divisible by heads={self.heads}")
            if self.final_ln_after_pool and self.pool not in ("tok", "avg", "gap"):
                raise ConfigError(f"final_ln_after_pool applies to pool tok/avg/gap, not {self.pool!r}")
            if self.pool == "attn" and (self.attn_pool_queries < 1 or self.attn_pool_heads < 1):
                raise ConfigError(f"pool='attn' needs attn_pool_queries >= 1 and attn_pool_heads >= 1, got "
                                  f"{self.attn_pool_queries} and {self.attn_pool_heads}")

    @property
    def layer_scale(self) -> bool:
        return self.layer_scale_init is not None

    @property
    def class_token(self) -> bool:
        return self.pool in ("tok", "avg", "attn")

    @property
    def grid(self) -> int:
        """Patches per side (ViT) or final feature-map side (ResNet, stride 32)."""
        return self.image_size // (32 if self.arch == "resnet" else self.patch_size)

    @property
    def num_tokens(self) -> int:
        return self.grid**2 + int(self.class_token)


@dataclass(frozen=True)
class TextConfig:
    """Text tower: a transformer over token ids `[B, context_length]`, pooled to one vector.

    `embed_cls` (CoCa, open_clip `embed_cls`): a learned class token `cls_emb` `[width]` is appended
    after the ids, the position embedding has `context_length + 1` rows, and the tower is read at
    that token (`pool` must be `last`), with `ln_final` after pooling. Its attention adds open_clip's
    pad mask built from `pad_id` in CoCa's legacy layout (`correct_cls_mask=False`): key column 0 is
    always visible and key column `j >= 1` is visible iff `ids[:, j - 1] != pad_id` (the mask is
    shifted by one against the tokens, as CoCa's released weights were trained). `pad_id` is unused
    without `embed_cls`.

    `layer_scale_init`: LayerScale gammas `ls1`, `ls2` (`[layers, width]` stacked) in every block,
    initialised to this value (open_clip `ls_init_value`); `None`: none.
    """

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
    layer_scale_init: float | None = None  # LayerScale gammas [width] per block; None: no LayerScale
    embed_cls: bool = False  # CoCa: a class token appended after the ids, read with pool="last"
    pad_id: int = 0  # embed_cls only: the id masked out of attention (CoCa's legacy pad mask)

    def __post_init__(self):
        _check_choice("text.act", self.act, ACTIVATIONS)
        _check_choice("text.pool", self.pool, TEXT_POOLS)
        if self.width % self.heads:
            raise ConfigError(f"text.width={self.width} not divisible by heads={self.heads}")
        if self.embed_cls and self.pool != "last":
            raise ConfigError(f"text.embed_cls reads the appended class token: pool must be 'last', got {self.pool!r}")

    @property
    def layer_scale(self) -> bool:
        return self.layer_scale_init is not None

    @property
    def num_positions(self) -> int:
        """Rows of the position embedding: `context_length`, plus one for the class token (`embed_cls`)."""
        return self.context_length + int(self.embed_cls)


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
    """Both towers (or one), the shared embedding size and run-time options.

    `vision_proj=False` / `text_proj=False` mean "no projection" on that side: the pooled width is
    the embedding (SigLIP's vision tower). `dtype` is the compute dtype, apart
    from `param_dtype`. `scan_layers` runs the blocks with `lax.scan` (False:
    unrolled); `remat` picks a `jax.checkpoint` policy for each block;
    `attention="cudnn"` selects cuDNN flash attention on GPU (bf16/fp16 only).

    `towers`: `"both"` (a contrastive model), `"image"` or `"text"` (one encoder, e.g. transformers'
    `CLIPVisionModelWithProjection` / `CLIPTextModel`). A single-tower model holds no params of the
    absent tower and none of the pair: no `log_logit_scale`, no `logit_bias` (transformers' single
    towers have none, and clipjax makes none up). Its `encode_*` of the present tower is the tower's
    embedding; the absent tower's encoder, `logits` and `forward` raise `ConfigError` naming the
    missing tower. The absent tower's fields (`TOWER_FIELDS`: its sub-config, projection flag and, for
    the image tower, `preprocess`) are unused and held at their defaults (set there by the
    constructor, left out of `architecture_dict`). `init_log_logit_scale` is then unused too;
    `init_logit_bias is not None` still marks a SigLIP tower (`is_siglip`: its export format and image
    processor).
    """

    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    vision_proj: bool = True
    text_proj: bool = True
    init_log_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: float | None = None
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    towers: str = "both"  # "both", "image" or "text"
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat: str = "none"
    attention: str = "xla"  # jax.nn.dot_product_attention implementation: "xla" or "cudnn" (GPU flash)

    def __post_init__(self):
        _check_choice("towers", self.towers, TOWERS)
        _check_choice("remat", self.remat, REMAT_POLICIES)
        _check_choice("attention", self.attention, ("xla", "cudnn"))
        _check_choice("dtype", self.dtype, ("float32", "bfloat16", "float16"))
        _check_choice("param_dtype", self.param_dtype, ("float32", "bfloat16"))
        for tower, names in TOWER_FIELDS.items():  # the absent tower's fields: at their defaults
            if not self.has_tower(tower):
                for name in names:
                    f = self.__dataclass_fields__[name]
                    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                    object.__setattr__(self, name, default)  # frozen: the constructor's own normalisation
        if (self.has_image and not self.vision_proj and self.vision.width != self.embed_dim
                and self.vision.arch == "vit"):
            raise ConfigError(
                f"vision_proj=False needs vision.width == embed_dim, got {self.vision.width} != {self.embed_dim}")
        if self.has_text and not self.text_proj and self.text.width != self.embed_dim:
            raise ConfigError(
                f"text_proj=False needs text.width == embed_dim, got {self.text.width} != {self.embed_dim}")
        if self.has_image and self.vision.pool == "attn":
            if not self.vision_proj:
                raise ConfigError("vision.pool='attn' (CoCa's pooler) is followed by a projection: vision_proj=True")
            if self.embed_dim % self.vision.attn_pool_heads:
                raise ConfigError(f"vision.attn_pool_heads={self.vision.attn_pool_heads} does not divide "
                                  f"embed_dim={self.embed_dim} (the pooler's width)")

    @property
    def is_siglip(self) -> bool:
        return self.init_logit_bias is not None

    @property
    def has_image(self) -> bool:
        """The model holds an image tower (`towers` is "both" or "image")."""
        return self.towers in ("both", "image")

    @property
    def has_text(self) -> bool:
        """The model holds a text tower (`towers` is "both" or "text")."""
        return self.towers in ("both", "text")

    def has_tower(self, tower: str) -> bool:
        """`tower`: "image", "text" or "both" (both towers present)."""
        _check_choice("tower", tower, TOWERS)
        return self.towers == "both" or tower == self.towers

    def require(self, tower: str, what: str) -> None:
        """Raise `ConfigError` naming the missing tower when `what` (e.g. "encode_text") needs `tower`
        ("image", "text" or "both") and this model does not hold it."""
        if self.has_tower(tower):
            return
        missing = {"image": "text", "text": "image"}[self.towers] if tower == "both" else tower
        raise ConfigError(f"{what}: needs {'both towers' if tower == 'both' else f'the {tower} tower'}, but this "
                          f"model has no {missing} tower (towers={self.towers!r}: a single-tower model)")

    def replace(self, **kw) -> "CLIPConfig":
        return dataclasses.replace(self, **kw)

    def architecture(self) -> "CLIPConfig":
        """This config with its run-time options (`RUNTIME_OPTIONS`) at their defaults: what a
        checkpoint stores, and what two configs must share to load each other's params."""
        return dataclasses.replace(self, **{k: f.default for k, f in self.__dataclass_fields__.items()
                                            if k in RUNTIME_OPTIONS})

    def architecture_dict(self) -> dict:
        """`to_dict()` without the run-time options nor an absent tower's fields (the saved form;
        `from_dict` gives the same config back). `towers` is written for single-tower models only, so a
        two-tower model saves exactly what it did before `towers` existed."""
        absent = {name for tower, names in TOWER_FIELDS.items() if not self.has_tower(tower) for name in names}
        if self.towers == "both":
            absent.add("towers")
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_OPTIONS and k not in absent}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPConfig":
        """Inverse of `to_dict` (and of `architecture_dict`); unknown keys raise `ConfigError`. Reads configs
        saved before the log-parameter was renamed (`init_logit_scale` -> `init_log_logit_scale`) and before
        `towers` existed (two-tower models)."""
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
