"""Architecture presets under open_clip's model names, written as tables.

CoCa presets (`coca_*`) are CoCa's contrastive model (image tower with the attentional pooler, text
tower with the appended class token); the captioning decoder of open_clip's CoCa is not part of them.

Every open_clip config whose towers clipjax runs exactly has a preset here with the same name
(`tests/test_open_clip_configs.py` checks each against open_clip's own JSON and model). The
preprocessing is that of the name's published weights (open_clip `pretrained.py`): OpenAI's
mean/std for CLIP, 0.5/0.5 squash for SigLIP, ImageNet mean/std bilinear squash for CLIPA.
"""

from __future__ import annotations

import dataclasses
import math

from clipjax.config import (HALF, CLIPConfig, ConfigError, PreprocessConfig, TextConfig, VisionConfig)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def mlp_width(width: int, ratio: float) -> int:
    """open_clip / timm MLP hidden width: `int(width * mlp_ratio)` (4.9231 x 1664 -> 8192)."""
    return int(width * ratio)


# ----------------------------------------------------------------------------- OpenAI-style ViT

# name: embed, image, patch, width, layers, head_width, mlp_ratio, text width, text heads, text layers
_VIT = {
    "ViT-S-32":          (384, 224, 32, 384, 12, 64, 4.0, 384, 6, 12),
    "ViT-S-32-alt":      (256, 224, 32, 384, 12, 64, 4.0, 256, 4, 10),
    "ViT-S-16":          (384, 224, 16, 384, 12, 64, 4.0, 384, 6, 12),
    "ViT-S-16-alt":      (256, 224, 16, 384, 12, 64, 4.0, 256, 4, 10),
    "ViT-M-32":          (512, 224, 32, 512, 12, 64, 4.0, 512, 8, 12),
    "ViT-M-32-alt":      (384, 224, 32, 512, 12, 64, 4.0, 384, 6, 12),
    "ViT-M-16":          (512, 224, 16, 512, 12, 64, 4.0, 512, 8, 12),
    "ViT-B-32":          (512, 224, 32, 768, 12, 64, 4.0, 512, 8, 12),
    "ViT-B-32-256":      (512, 256, 32, 768, 12, 64, 4.0, 512, 8, 12),
    "ViT-B-32-plus-256": (640, 256, 32, 896, 12, 64, 4.0, 640, 10, 12),
    "ViT-B-16":          (512, 224, 16, 768, 12, 64, 4.0, 512, 8, 12),
    "ViT-B-16-plus":     (640, 224, 16, 896, 12, 64, 4.0, 640, 10, 12),
    "ViT-B-16-plus-240": (640, 240, 16, 896, 12, 64, 4.0, 640, 10, 12),
    "ViT-L-14":          (768, 224, 14, 1024, 24, 64, 4.0, 768, 12, 12),
    "ViT-L-14-280":      (768, 280, 14, 1024, 24, 64, 4.0, 768, 12, 12),
    "ViT-L-14-336":      (768, 336, 14, 1024, 24, 64, 4.0, 768, 12, 12),
    "ViT-L-16":          (768, 224, 16, 1024, 24, 64, 4.0, 768, 12, 12),
    "ViT-L-16-320":      (768, 320, 16, 1024, 24, 64, 4.0, 768, 12, 12),
    "ViT-H-14":          (1024, 224, 14, 1280, 32, 80, 4.0, 1024, 16, 24),
    "ViT-H-14-378":      (1024, 378, 14, 1280, 32, 80, 4.0, 1024, 16, 24),
    "ViT-H-16":          (1024, 224, 16, 1280, 32, 80, 4.0, 1024, 16, 24),
    "ViT-g-14":          (1024, 224, 14, 1408, 40, 88, 4.3637, 1024, 16, 24),
    "ViT-bigG-14":       (1280, 224, 14, 1664, 48, 104, 4.9231, 1280, 20, 32),
    "ViT-e-14":          (1280, 224, 14, 1792, 56, 112, 8.5715, 1280, 20, 36),
}
# the same towers with OpenAI's QuickGELU (OpenAI, MetaCLIP and DFN weights)
_QUICKGELU = ("ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "ViT-H-14", "ViT-H-14-378", "ViT-bigG-14")

# LayerScale (open_clip `ls_init_value`) in the image tower: name: base row, init value
_LAYER_SCALE = {"ViT-M-16-alt": ((384, 224, 16, 512, 12, 64, 4.0, 384, 6, 12), 1e-4)}

# CLIPA: no ln_pre, mean of the patch tokens then LayerNorm; bidirectional text read at the last token
_CLIPA = {"ViT-L-14-CLIPA": "ViT-L-14", "ViT-L-14-CLIPA-336": "ViT-L-14-336", "ViT-H-14-CLIPA": "ViT-H-14",
          "ViT-H-14-CLIPA-336": ("ViT-H-14", 336), "ViT-bigG-14-CLIPA": "ViT-bigG-14",
          "ViT-bigG-14-CLIPA-336": ("ViT-bigG-14", 336)}

# MetaCLIP 2 worldwide: multilingual vocabulary, pooled at the first `eos_id`
# name: base tower, image size, vocab, eos id, quick_gelu
_WORLDWIDE = {
    "ViT-L-14-worldwide":           ("ViT-L-14", 224, 250100, 1, False),
    "ViT-L-14-worldwide-quickgelu": ("ViT-L-14", 224, 250100, 1, True),
    "ViT-H-14-worldwide":           ("ViT-H-14", 224, 901629, 2, False),
    "ViT-H-14-worldwide-quickgelu": ("ViT-H-14", 224, 901629, 2, True),
    "ViT-H-14-worldwide-378":       ("ViT-H-14", 378, 901629, 2, False),
    "ViT-bigG-14-worldwide":        ("ViT-bigG-14", 224, 901629, 2, False),
    "ViT-bigG-14-worldwide-378":    ("ViT-bigG-14", 378, 901629, 2, False),
}


def _vit(row, act="gelu") -> CLIPConfig:
    embed, image, patch, width, layers, head_width, ratio, tw, th, tl = row
    return CLIPConfig(
        embed_dim=embed,
        vision=VisionConfig(image_size=image, patch_size=patch, width=width, layers=layers,
                            heads=width // head_width, mlp_dim=mlp_width(width, ratio), act=act),
        text=TextConfig(width=tw, heads=th, layers=tl, mlp_dim=tw * 4, act=act))


def _clipa(base: CLIPConfig, image: int | None) -> CLIPConfig:
    v = dataclasses.replace(base.vision, image_size=image or base.vision.image_size, ln_pre=False, pool="avg",
                            final_ln_after_pool=True)
    t = dataclasses.replace(base.text, context_length=32, vocab_size=32000, causal=False, pool="last", eos_id=1)
    return base.replace(vision=v, text=t, preprocess=PreprocessConfig(
        mean=IMAGENET_MEAN, std=IMAGENET_STD, resize_mode="squash", interpolation="bilinear"))


# ----------------------------------------------------------------------------- CoCa (contrastive towers)

# name: embed, image, patch, width, layers, text width, text heads, text layers, vocab, pooler heads (None: no
# attentional pooler, class token); 64-wide image heads, MLP ratio 4, text context 76 (+ the class token), pad id 0
_COCA = {
    "coca_ViT-B-32": (512, 224, 32, 768, 12, 512, 8, 12, 49408, 8),
    "coca_ViT-L-14": (768, 224, 14, 1024, 24, 768, 12, 12, 49408, 8),
    "coca_base":     (512, 288, 18, 768, 12, 768, 12, 12, 64000, None),
}


def _coca(row) -> CLIPConfig:
    embed, image, patch, width, layers, tw, th, tl, vocab, pool_heads = row
    vision = VisionConfig(image_size=image, patch_size=patch, width=width, layers=layers, heads=width // 64,
                          mlp_dim=width * 4)
    if pool_heads:
        vision = dataclasses.replace(vision, pool="attn", attn_pool_heads=pool_heads, attn_pool_queries=256)
    text = TextConfig(context_length=76, vocab_size=vocab, width=tw, heads=th, layers=tl, mlp_dim=tw * 4,
                      pool="last", eos_id=1, embed_cls=True, pad_id=0)
    return CLIPConfig(embed_dim=embed, vision=vision, text=text)


# ----------------------------------------------------------------------------- ModifiedResNet

# name: embed, image, stage depths, stem width, text width, text heads
_RESNET = {
    "RN50":    (1024, 224, (3, 4, 6, 3), 64, 512, 8),
    "RN101":   (512, 224, (3, 4, 23, 3), 64, 512, 8),
    "RN50x4":  (640, 288, (4, 6, 10, 6), 80, 640, 10),
    "RN50x16": (768, 384, (6, 8, 18, 8), 96, 768, 12),
    "RN50x64": (1024, 448, (3, 15, 36, 10), 128, 1024, 16),
}


def _resnet(row, act="gelu", head_width=64) -> CLIPConfig:
    embed, image, depths, width, tw, th = row
    return CLIPConfig(
        embed_dim=embed,
        vision=VisionConfig(arch="resnet", image_size=image, width=width, layers=depths,
                            heads=width * 32 // head_width, mlp_dim=0, pool="attnpool", ln_pre=False),
        text=TextConfig(width=tw, heads=th, mlp_dim=tw * 4, act=act))


# ----------------------------------------------------------------------------- SigLIP (timm trunks)

# timm model: patch, width, depth, heads, mlp_ratio, act  (timm's `vision_transformer.py` definitions;
# note which of them use the tanh GELU)
TIMM_SIGLIP = {
    "vit_base_patch16_siglip_224": (16, 768, 12, 12, 4.0, "gelu"),
    "vit_base_patch16_siglip_256": (16, 768, 12, 12, 4.0, "gelu"),
    "vit_base_patch16_siglip_384": (16, 768, 12, 12, 4.0, "gelu"),
    "vit_base_patch16_siglip_512": (16, 768, 12, 12, 4.0, "gelu"),
    "vit_base_patch32_siglip_256": (32, 768, 12, 12, 4.0, "gelu_tanh"),
    "vit_large_patch16_siglip_256": (16, 1024, 24, 16, 4.0, "gelu"),
    "vit_large_patch16_siglip_384": (16, 1024, 24, 16, 4.0, "gelu"),
    "vit_large_patch16_siglip_512": (16, 1024, 24, 16, 4.0, "gelu_tanh"),
    "vit_so400m_patch14_siglip_224": (14, 1152, 27, 16, 3.7362, "gelu"),
    "vit_so400m_patch14_siglip_378": (14, 1152, 27, 16, 3.7362, "gelu"),
    "vit_so400m_patch14_siglip_384": (14, 1152, 27, 16, 3.7362, "gelu"),
    "vit_so400m_patch16_siglip_256": (16, 1152, 27, 16, 3.7362, "gelu_tanh"),
    "vit_so400m_patch16_siglip_384": (16, 1152, 27, 16, 3.7362, "gelu_tanh"),
    "vit_so400m_patch16_siglip_512": (16, 1152, 27, 16, 3.7362, "gelu_tanh"),
    "vit_giantopt_patch16_siglip_256": (16, 1536, 40, 16, 4.0, "gelu_tanh"),
    "vit_giantopt_patch16_siglip_384": (16, 1536, 40, 16, 4.0, "gelu_tanh"),
}

# text towers: width, heads, layers, mlp_ratio
_SIGLIP_TEXT = {"B": (768, 12, 12, 4.0), "L": (1024, 16, 24, 4.0), "SO400M": (1152, 16, 27, 3.7362)}

# name: timm trunk, image, embed, text size, context, vocab, SigLIP 2 (tanh-GELU text), text projection
_SIGLIP = {
    "ViT-B-16-SigLIP":               ("vit_base_patch16_siglip_224", 224, 768, "B", 64, 32000, False, True),
    "ViT-B-16-SigLIP-256":           ("vit_base_patch16_siglip_256", 256, 768, "B", 64, 32000, False, True),
    "ViT-B-16-SigLIP-384":           ("vit_base_patch16_siglip_384", 384, 768, "B", 64, 32000, False, True),
    "ViT-B-16-SigLIP-512":           ("vit_base_patch16_siglip_512", 512, 768, "B", 64, 32000, False, True),
    "ViT-B-16-SigLIP-i18n-256":      ("vit_base_patch16_siglip_256", 256, 768, "B", 64, 250000, False, True),
    "ViT-L-16-SigLIP-256":           ("vit_large_patch16_siglip_256", 256, 1024, "L", 64, 32000, False, True),
    "ViT-L-16-SigLIP-384":           ("vit_large_patch16_siglip_384", 384, 1024, "L", 64, 32000, False, True),
    "ViT-SO400M-14-SigLIP":          ("vit_so400m_patch14_siglip_224", 224, 1152, "SO400M", 16, 32000, False, True),
    "ViT-SO400M-14-SigLIP-378":      ("vit_so400m_patch14_siglip_378", 378, 1152, "SO400M", 64, 32000, False, True),
    "ViT-SO400M-14-SigLIP-384":      ("vit_so400m_patch14_siglip_384", 384, 1152, "SO400M", 64, 32000, False, True),
    "ViT-SO400M-16-SigLIP-i18n-256": ("vit_so400m_patch16_siglip_256", 256, 1152, "SO400M", 64, 250000, False,
                                      False),
    "ViT-B-32-SigLIP2-256":          ("vit_base_patch32_siglip_256", 256, 768, "B", 64, 256000, True, True),
    "ViT-B-16-SigLIP2":              ("vit_base_patch16_siglip_224", 224, 768, "B", 64, 256000, True, True),
    "ViT-B-16-SigLIP2-256":          ("vit_base_patch16_siglip_256", 256, 768, "B", 64, 256000, True, True),
    "ViT-B-16-SigLIP2-384":          ("vit_base_patch16_siglip_384", 384, 768, "B", 64, 256000, True, True),
    "ViT-B-16-SigLIP2-512":          ("vit_base_patch16_siglip_512", 512, 768, "B", 64, 256000, True, True),
    "ViT-L-16-SigLIP2-256":          ("vit_large_patch16_siglip_256", 256, 1024, "L", 64, 256000, True, True),
    "ViT-L-16-SigLIP2-384":          ("vit_large_patch16_siglip_384", 384, 1024, "L", 64, 256000, True, True),
    "ViT-L-16-SigLIP2-512":          ("vit_large_patch16_siglip_512", 512, 1024, "L", 64, 256000, True, True),
    "ViT-SO400M-14-SigLIP2":         ("vit_so400m_patch14_siglip_224", 224, 1152, "SO400M", 64, 256000, True, True),
    "ViT-SO400M-14-SigLIP2-378":     ("vit_so400m_patch14_siglip_378", 378, 1152, "SO400M", 64, 256000, True, True),
    "ViT-SO400M-16-SigLIP2-256":     ("vit_so400m_patch16_siglip_256", 256, 1152, "SO400M", 64, 256000, True, True),
    "ViT-SO400M-16-SigLIP2-384":     ("vit_so400m_patch16_siglip_384", 384, 1152, "SO400M", 64, 256000, True, True),
    "ViT-SO400M-16-SigLIP2-512":     ("vit_so400m_patch16_siglip_512", 512, 1152, "SO400M", 64, 256000, True, True),
    "ViT-gopt-16-SigLIP2-256":       ("vit_giantopt_patch16_siglip_256", 256, 1536, "SO400M", 64, 256000, True,
                                      True),
    "ViT-gopt-16-SigLIP2-384":       ("vit_giantopt_patch16_siglip_384", 384, 1536, "SO400M", 64, 256000, True,
                                      True),
}


def timm_siglip_vision(name: str, image_size: int) -> VisionConfig:
    """The image tower of timm model `name` (a SigLIP ViT: no class token, MAP head, patch bias)."""
    if name not in TIMM_SIGLIP:
        raise ConfigError(f"timm image tower {name!r} is not supported; supported timm towers: "
                          f"{', '.join(sorted(TIMM_SIGLIP))}")
    patch, width, depth, heads, ratio, act = TIMM_SIGLIP[name]
    return VisionConfig(image_size=image_size, patch_size=patch, width=width, layers=depth, heads=heads,
                        mlp_dim=mlp_width(width, ratio), act=act, pool="map", ln_pre=False, patch_bias=True,
                        ln_eps=1e-6)


def siglip_text(width: int, heads: int, layers: int, mlp_ratio: float, context: int, vocab: int,
                act: str = "gelu", proj: bool = True) -> TextConfig:
    """open_clip's SigLIP text tower: bidirectional, read at the last position, LayerNorm eps 1e-6."""
    return TextConfig(context_length=context, vocab_size=vocab, width=width, heads=heads, layers=layers,
                      mlp_dim=mlp_width(width, mlp_ratio), act=act, causal=False, pool="last", eos_id=1,
                      proj_bias=proj, ln_eps=1e-6)


SIGLIP_PREPROCESS = PreprocessConfig(mean=HALF, std=HALF, resize_mode="squash")


def _siglip(row) -> CLIPConfig:
    trunk, image, embed, size, context, vocab, v2, proj = row
    tw, th, tl, ratio = _SIGLIP_TEXT[size]
    return CLIPConfig(
        embed_dim=embed, vision=timm_siglip_vision(trunk, image),
        text=siglip_text(tw, th, tl, ratio, context, vocab, act="gelu_tanh" if v2 else "gelu", proj=proj),
        vision_proj=False, text_proj=proj, init_log_logit_scale=math.log(10.0), init_logit_bias=-10.0,
        preprocess=SIGLIP_PREPROCESS)


# ----------------------------------------------------------------------------- the table


def _build() -> dict[str, CLIPConfig]:
    out: dict[str, CLIPConfig] = {}
    for name, row in _VIT.items():
        out[name] = _vit(row)
    for name in _QUICKGELU:
        out[f"{name}-quickgelu"] = _vit(_VIT[name], act="quick_gelu")
    for name, (row, init) in _LAYER_SCALE.items():
        cfg = _vit(row)
        out[name] = cfg.replace(vision=dataclasses.replace(cfg.vision, layer_scale_init=init))
    for name, row in _COCA.items():
        out[name] = _coca(row)
    for name, base in _CLIPA.items():
        base, image = (base, None) if isinstance(base, str) else base
        out[name] = _clipa(out[base], image)
    for name, (base, image, vocab, eos, quick) in _WORLDWIDE.items():
        cfg = out[f"{base}-quickgelu" if quick else base]
        out[name] = cfg.replace(vision=dataclasses.replace(cfg.vision, image_size=image),
                                text=dataclasses.replace(cfg.text, vocab_size=vocab, pool="eos", eos_id=eos))
    for name, row in _RESNET.items():
        out[name] = _resnet(row)
        out[f"{name}-quickgelu"] = _resnet(row, act="quick_gelu")
    for name, row in _SIGLIP.items():
        out[name] = _siglip(row)
    return out


PRESETS: dict[str, CLIPConfig] = _build()


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
