"""State dict -> (config, clipjax params): family detection, architecture inference, key mapping.

Families (detected from the keys):
  `openai`       OpenAI / open_clip ViT (`visual.conv1.weight`, `transformer.resblocks.*`)
  `openai_rn`    OpenAI / open_clip ModifiedResNet (`visual.layer1.*`)
  `open_clip_siglip`  open_clip SigLIP: timm ViT trunk (`visual.trunk.*`) + `text.*` tower
  `open_clip_coca`    open_clip CoCa: the `openai` image tower (with `visual.attn_pool.*`), the text
                 tower under `text.` (with `text.cls_emb`) and the captioning decoder `text_decoder.*`,
                 which clipjax does not run: its keys are ignored by name (the converted model is
                 CoCa's contrastive model: `encode_image`, `encode_text`, logits)
  `hf_clip`, `hf_siglip`  transformers `CLIPModel` / `SiglipModel`, or one tower alone
                 (`CLIPVisionModelWithProjection`, `CLIPTextModel`, `SiglipVisionModel`, ...: keys under
                 `vision_model.` or `text_model.` only; the config is then single-tower, `towers`)

Head widths and activation functions cannot be read from weights. TorchScript
(OpenAI) files are built by OpenAI's code: 64-wide heads and QuickGELU. Any
other state dict must fit exactly one preset (`match_presets`), or the user
passes `--arch` / `--config`; nothing is guessed.
"""

from __future__ import annotations

import math
import re

import numpy as np

from clipjax.config import (HALF, CLIPConfig, PreprocessConfig, TextConfig, VisionConfig)
from clipjax.convert.hf_config import PROJECTION_KEYS, from_hf_config
from clipjax.convert import rules as R
from clipjax.convert.errors import ConversionError


COCA_DECODER = "text_decoder."  # CoCa's captioning decoder: not converted


def detect_family(sd: dict) -> str:
    keys = set(sd)
    if any(k.startswith("vision_model.") for k in keys):
        return "hf_siglip" if "vision_model.head.probe" in keys else "hf_clip"
    if any(k.startswith("text_model.") for k in keys):  # a transformers text tower alone
        return "hf_siglip" if "text_model.head.weight" in keys else "hf_clip"
    if any(k.startswith("visual.trunk.") for k in keys):
        return "open_clip_siglip"
    if any(k.startswith("visual.layer1.") for k in keys):
        return "openai_rn"
    if "visual.conv1.weight" in keys:
        return "open_clip_coca" if any(k.startswith(COCA_DECODER) for k in keys) else "openai"
    sample = sorted(keys)[:5]
    raise ConversionError(f"unrecognised checkpoint layout (first keys: {sample}); expected an OpenAI/open_clip "
                          "CLIP, open_clip SigLIP, or transformers CLIPModel/SiglipModel state dict")


def _count(sd: dict, pattern: str) -> int:
    rx = re.compile(pattern)
    idx = {int(m.group(1)) for k in sd if (m := rx.match(k))}
    return max(idx) + 1 if idx else 0


def _text_prefix(sd: dict) -> str:
    return "text." if "text.token_embedding.weight" in sd else ""


def _openai_heads(width: int) -> int:
    """OpenAI's head count, `width // 64` (1 for widths it does not divide: shapes only)."""
    heads = max(width // 64, 1)
    return heads if width % heads == 0 else 1


# LayerScale's initial value leaves no trace in trained weights; inferred configs use open_clip's default
_LS_INIT = 1e-5


def _layer_scale(sd: dict, p: str) -> float | None:
    return _LS_INIT if f"{p}transformer.resblocks.0.ls_1.gamma" in sd else None


def _infer_text(sd: dict, act: str, p: str, causal=True, pool="argmax", eps=1e-5) -> TextConfig:
    vocab, width = sd[f"{p}token_embedding.weight"].shape
    cls = f"{p}cls_emb" in sd  # CoCa: the appended class token has the last position row
    ctx = sd[f"{p}positional_embedding"].shape[0] - int(cls)
    pool = "last" if cls else pool
    layers = _count(sd, rf"{re.escape(p)}transformer\.resblocks\.(\d+)\.")
    mlp = sd[f"{p}transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    return TextConfig(context_length=ctx, vocab_size=vocab, width=width, heads=_openai_heads(width), layers=layers,
                      mlp_dim=mlp, act=act, causal=causal, pool=pool, eos_id=49407 if pool == "argmax" else 1,
                      proj_bias=f"{p}text_projection.bias" in sd, ln_eps=eps,
                      layer_scale_init=_layer_scale(sd, p), embed_cls=cls)


def _bias_init(sd: dict) -> float | None:
    """A CLIP-tower state dict with a `logit_bias` is a SigLIP-loss model (its value is loaded; -10 is the init)."""
    return -10.0 if "logit_bias" in sd else None


def infer_config(sd: dict, family: str, act: str = "gelu") -> CLIPConfig:
    """The architecture OpenAI's own code builds for these shapes: 64-wide attention heads in both
    towers and the ResNet's attention pool, `act` everywhere. Exact for OpenAI's TorchScript files
    (QuickGELU); for any other file the head width and activation are unknown: `match_presets`."""
    try:
        if family in ("openai", "open_clip_coca"):
            width, _, patch, _ = sd["visual.conv1.weight"].shape
            grid = math.isqrt(sd["visual.positional_embedding"].shape[0] - 1)
            embed = sd["visual.proj"].shape[1]
            # CoCa's pooler: its query count is a shape, its head count is not (any divisor of embed_dim)
            queries = sd["visual.attn_pool.query"].shape[0] if "visual.attn_pool.query" in sd else 0
            vision = VisionConfig(image_size=grid * patch, patch_size=patch, width=width,
                                  layers=_count(sd, r"visual\.transformer\.resblocks\.(\d+)\."),
                                  heads=_openai_heads(width),
                                  mlp_dim=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0], act=act,
                                  ln_pre="visual.ln_pre.weight" in sd, pool="attn" if queries else "tok",
                                  layer_scale_init=_layer_scale(sd, "visual."), attn_pool_queries=queries or 256,
                                  attn_pool_heads=8 if embed % 8 == 0 else 1)
            text = _infer_text(sd, act, _text_prefix(sd))
            return CLIPConfig(embed_dim=embed, vision=vision, text=text,
                              text_proj=_has_text_proj(sd), init_logit_bias=_bias_init(sd))
        if family == "openai_rn":
            width = sd["visual.layer1.0.conv1.weight"].shape[1]
            layers = tuple(_count(sd, rf"visual\.layer{s}\.(\d+)\.") for s in range(1, 5))
            grid = math.isqrt(sd["visual.attnpool.positional_embedding"].shape[0] - 1)
            embed = sd["visual.attnpool.c_proj.weight"].shape[0]
            vision = VisionConfig(arch="resnet", image_size=grid * 32, width=width, layers=layers,
                                  heads=width * 32 // 64, mlp_dim=0, pool="attnpool", ln_pre=False)
            return CLIPConfig(embed_dim=embed, vision=vision, text=_infer_text(sd, act, _text_prefix(sd)),
                              text_proj=_has_text_proj(sd), init_logit_bias=_bias_init(sd))
        if family == "open_clip_siglip":
            t = "visual.trunk."
            width, _, patch, _ = sd[f"{t}patch_embed.proj.weight"].shape
            grid = math.isqrt(sd[f"{t}pos_embed"].shape[1])
            vision = VisionConfig(image_size=grid * patch, patch_size=patch, width=width,
                                  layers=_count(sd, rf"{re.escape(t)}blocks\.(\d+)\."), heads=_openai_heads(width),
                                  mlp_dim=sd[f"{t}blocks.0.mlp.fc1.weight"].shape[0], act=act, pool="map",
                                  ln_pre=False, patch_bias=True, ln_eps=1e-6)
            text = _infer_text(sd, act, "text.", causal=False, pool="last", eps=1e-6)
            proj = _has_text_proj(sd)
            embed = sd["text.text_projection.weight"].shape[0] if proj else text.width
            return CLIPConfig(embed_dim=embed, vision=vision, text=text, vision_proj=False, text_proj=proj,
                              init_log_logit_scale=math.log(10.0), init_logit_bias=-10.0,
                              preprocess=PreprocessConfig(mean=HALF, std=HALF, resize_mode="squash"))
    except KeyError as e:
        raise ConversionError(f"cannot infer the architecture: key {e} is missing") from None
    raise ConversionError(f"cannot infer an architecture for family {family!r}: give --arch or --config")


def _has_text_proj(sd: dict) -> bool:
    p = _text_prefix(sd)
    return f"{p}text_projection" in sd or f"{p}text_projection.weight" in sd


def shape_signature(config: CLIPConfig) -> tuple:
    """The config fields that tensor shapes determine: not head counts, activations, pooling, eps, nor
    the image size beyond its patch grid (a 384 px input to 14 px patches makes the same 27 x 27 grid
    as 378 px: the strided patch convolution drops the rest)."""
    v, t = config.vision, config.text
    vision = ((v.arch, v.grid, v.width, v.layers) if v.arch == "resnet" else
              (v.arch, v.grid, v.patch_size, v.width, v.layers, v.mlp_dim, v.ln_pre, v.patch_bias,
               v.class_token, v.pool == "map", v.layer_scale, v.pool == "attn" and v.attn_pool_queries))
    text = (t.context_length, t.vocab_size, t.width, t.layers, t.mlp_dim, t.proj_bias, t.layer_scale, t.embed_cls)
    return vision, text, config.embed_dim, config.vision_proj, config.text_proj, config.is_siglip


def _differences(configs: list[CLIPConfig]) -> list[str]:
    def flat(d, prefix=""):
        for k, x in d.items():
            if isinstance(x, dict):
                yield from flat(x, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", x

    dicts = [dict(flat(c.architecture_dict())) for c in configs]
    return sorted(k for k in dicts[0] if len({repr(d.get(k)) for d in dicts}) > 1)


def match_presets(sd: dict, family: str) -> CLIPConfig:
    """The preset whose shapes the state dict has, when exactly one architecture fits.

    Attention head width, activation (GELU / QuickGELU / tanh GELU), pooling and LayerNorm eps leave
    no trace in tensor shapes, so a state dict alone cannot tell ViT-B-32 from ViT-B-32-quickgelu,
    or 64-wide heads from 80-wide ones. This never guesses: several fitting presets that differ, or
    none, raise `ConversionError` asking for `--arch` or `--config`.
    """
    from clipjax.presets import PRESETS

    shapes = infer_config(sd, family)
    sig = shape_signature(shapes)
    fits = {name: cfg for name, cfg in PRESETS.items() if shape_signature(cfg) == sig}
    archs = {repr(cfg.architecture_dict()): cfg for cfg in fits.values()}
    if len(archs) == 1:
        return next(iter(archs.values()))
    v, t = shapes.vision, shapes.text
    what = (f"image tower {v.arch} width {v.width}, layers {v.layers}"
            + ("" if v.arch == "resnet" else f", patch {v.patch_size}") + f", image size {v.image_size}; text "
            f"width {t.width}, layers {t.layers}, vocabulary {t.vocab_size}")
    if not fits:
        raise ConversionError(
            f"no open_clip architecture has these shapes ({what}), and the attention head width and "
            "activation cannot be read from weights: pass --config with the model's open_clip JSON (or "
            "--arch with a preset name)")
    raise ConversionError(
        f"the weights fit several architectures that differ in {', '.join(_differences(list(archs.values())))}, "
        f"which tensor shapes do not show: {', '.join(sorted(fits))}. Pass --arch with the right one (or "
        "--config with the model's open_clip JSON)")


def rules_for(config: CLIPConfig, family: str, sd: dict | None = None) -> list[R.Rule]:
    if family in ("hf_clip", "hf_siglip"):  # two towers or one (`config.towers`)
        return ((R.hf_vision_rules(config) if config.has_image else [])
                + (R.hf_text_rules(config) if config.has_text else [])
                + (R.scalar_rules(config, hf=True) if config.has_tower("both") else []))
    if not config.has_tower("both"):
        raise ConversionError(f"towers={config.towers!r}: single-tower models are converted from transformers "
                              f"folders only; a {family} checkpoint holds both towers")
    if family == "openai":
        return R.openai_vision_rules(config) + R.openai_text_rules(config, _text_prefix(sd or {})) + R.scalar_rules(
            config, hf=False)
    if family == "open_clip_coca":  # also open_clip's CustomTextCLIP layout (text tower under `text.`)
        return R.openai_vision_rules(config) + R.openai_text_rules(config, "text.") + R.scalar_rules(config, hf=False)
    if family == "openai_rn":
        return R.openai_text_rules(config, _text_prefix(sd or {})) + R.scalar_rules(config, hf=False)
    if family == "open_clip_siglip":
        return R.timm_siglip_vision_rules(config) + R.openai_text_rules(config, "text.") + R.scalar_rules(config,
                                                                                                         hf=False)
    raise ConversionError(f"unknown family {family!r}")


def check_compatible(config: CLIPConfig, family: str, sd: dict | None = None) -> None:
    # open_clip CLIP towers with a SigLIP logit bias (`init_logit_bias` on any CLIP config) count as SigLIP
    siglip = family in ("open_clip_siglip", "hf_siglip") or "logit_bias" in (sd or {})
    if siglip != config.is_siglip:
        raise ConversionError(f"the checkpoint is a {'SigLIP' if siglip else 'CLIP'} model ({family}) but the "
                              f"architecture given is {'SigLIP' if config.is_siglip else 'CLIP'}")
    if family in ("hf_clip", "hf_siglip") and sd is not None:
        held = [t for t, p in (("image", "vision_model."), ("text", "text_model.")) if any(k.startswith(p) for k in sd)]
        towers = "both" if len(held) == 2 else held[0]
        if towers != config.towers:
            raise ConversionError(f"the checkpoint holds {'both towers' if towers == 'both' else f'the {towers} tower'}"
                                  f" but the architecture given has towers={config.towers!r}")
    if (family == "openai_rn") != (config.vision.arch == "resnet"):
        raise ConversionError(f"the checkpoint's image tower ({family}) does not match vision.arch="
                              f"{config.vision.arch!r}")


def _nest(flat: dict[str, np.ndarray]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        node = out
        *head, last = path.split(".")
        for k in head:
            node = node.setdefault(k, {})
        node[last] = v
    return out


def state_dict_to_pure(sd: dict, config: CLIPConfig, family: str) -> dict:
    """Convert a state dict to a nested pure dict of clipjax params (numpy arrays)."""
    check_compatible(config, family, sd)
    # ResNet towers are converted by `resnet_keys`; CoCa's captioning decoder is not converted at all
    ignore = {"openai_rn": ("visual.",), "open_clip_coca": (COCA_DECODER,)}.get(family, ())
    pure = _nest(R.apply_rules(rules_for(config, family, sd), sd, prefix_ignore=ignore))
    if family == "openai_rn":
        from clipjax.convert.resnet_keys import resnet_from_torch

        pure["visual"] = resnet_from_torch(sd, config.vision, "visual.", embed_dim=config.embed_dim)
    return pure


def config_for(sd: dict, family: str, kind: str, config: CLIPConfig | None, hf_cfg: dict | None) -> CLIPConfig:
    """The config to convert with: given, read from HF config.json, or inferred from shapes."""
    if config is not None:
        return config
    if family.startswith("hf_"):
        if hf_cfg is None:
            raise ConversionError("a transformers state dict needs its config.json (convert the model folder)")
        key = PROJECTION_KEYS.get(hf_cfg.get("model_type"))  # a single CLIP tower: its weights tell its class
        return from_hf_config(hf_cfg, projection=None if key is None else key in sd)
    if kind == "torchscript":  # OpenAI's own files: its code fixes 64-wide heads and QuickGELU
        return infer_config(sd, family, act="quick_gelu")
    return match_presets(sd, family)
