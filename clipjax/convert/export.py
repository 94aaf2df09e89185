"""clipjax model -> other libraries' formats.

* `export_hf(model, out)`: a complete transformers folder: `config.json` (`CLIPModel` /
  `SiglipModel`), `model.safetensors`, `preprocessor_config.json` (`CLIPImageProcessor` /
  `SiglipImageProcessor`) and the tokenizer files (CLIP BPE: `vocab.json`, `merges.txt`,
  `tokenizer_config.json`), so `transformers.pipeline("zero-shot-image-classification", model=out)`
  and `AutoProcessor.from_pretrained(out)` work. A single-tower model becomes transformers' single
  tower (`CLIPVisionModelWithProjection`, `CLIPTextModel`, `SiglipVisionModel`, ...) with its own files.
* `export_open_clip(model, out_file)`: an open_clip state dict (`.safetensors`) with, beside it,
  the model config `NAME.json` (for `open_clip.add_model_config`) and `open_clip_config.json`
  (`{"model_cfg", "preprocess_cfg"}`, open_clip's Hub form; `clipjax convert --config` reads it).
  LayerScale (`ls_init_value`) is written as is. CoCa's contrastive towers (attentional pooler,
  appended class token) are written as open_clip's `CustomTextCLIP` (`custom_text: true`, no
  `multimodal_cfg`): the same `encode_image` / `encode_text` as the CoCa they came from, without the
  captioning decoder, which clipjax does not hold. Single-tower models are refused (open_clip has none).

Anything the target cannot express exactly raises `ConversionError` naming the config field;
nothing approximate is written. Writes are atomic (a failed export leaves nothing behind).
Weights are written in float32 whatever the model's `param_dtype`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile

import numpy as np

from clipjax.config import CLIPConfig, ConfigError, PreprocessConfig
from clipjax.convert import rules as R
from clipjax.convert.core import rules_for
from clipjax.convert.errors import ConversionError

# PIL resampling codes, as transformers' image processors store them (`resample`)
PIL_RESAMPLE = {"bilinear": 2, "bicubic": 3}
RESIZE_MODES = ("shortest", "squash")
_PREPROCESS_FIELDS = {"mean", "std", "resize_mode", "interpolation"}  # translated; any other must be at its default
OPEN_CLIP_CONFIG_NAME = "open_clip_config.json"


# ----------------------------------------------------------------------------- shared


def _flat_params(params) -> dict[str, np.ndarray]:
    """`nnx.State` (or pure dict) -> `{dotted path: float32 array}`; ResNet stage blocks appear as `layer1.0...`."""
    out = {}

    def walk(tree, prefix):
        for k, v in tree.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = np.asarray(v, np.float32)

    walk(params if isinstance(params, dict) else params.to_pure_dict(), "")
    return out


def _invert(rules: list[R.Rule], flat: dict[str, np.ndarray], skip: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """`invert_rules`, refusing clipjax params that no rule exports (they would be dropped silently)."""
    used = {t for r in rules for t in r.targets}
    left = sorted(k for k in flat if k not in used and not k.startswith(skip))
    if left:
        raise ConversionError(f"{len(left)} clipjax param(s) have no key in the target format: {left[:8]}")
    return R.invert_rules(rules, flat)


def _load(model):
    if isinstance(model, (str, os.PathLike)):
        from clipjax.checkpoint import load

        return load(os.fspath(model))
    return model


def _refuse_existing(paths: list[str], overwrite: bool) -> None:
    if overwrite:
        return
    for p in paths:
        if os.path.exists(p):
            raise FileExistsError(f"{os.path.abspath(p)} exists; pass overwrite=True (--overwrite) to replace it")


def _check_preprocess_fields(p: PreprocessConfig, target: str) -> None:
    unknown = sorted(f.name for f in dataclasses.fields(p)
                     if f.name not in _PREPROCESS_FIELDS and getattr(p, f.name) != f.default)
    if unknown:
        raise ConversionError(f"preprocess.{unknown[0]}={getattr(p, unknown[0])!r} has no {target} equivalent")
    if p.interpolation not in PIL_RESAMPLE:
        raise ConversionError(f"preprocess.interpolation={p.interpolation!r} has no {target} equivalent "
                              f"(supported: {sorted(PIL_RESAMPLE)})")
    if p.resize_mode not in RESIZE_MODES:
        raise ConversionError(f"preprocess.resize_mode={p.resize_mode!r} has no {target} equivalent "
                              f"(supported: {RESIZE_MODES})")


# ----------------------------------------------------------------------------- transformers


def _act(name: str, field: str = "act") -> str:
    table = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}
    if name not in table:
        raise ConversionError(f"{field}={name!r} has no transformers equivalent")
    return table[name]


def _refuse(problems: list[str], what: str) -> None:
    if problems:
        raise ConversionError(f"{what}: " + "; ".join(problems))


# single-tower exports: (family, tower, projected) -> (model_type, transformers class)
_HF_SINGLE = {("clip", "image", True): ("clip_vision_model", "CLIPVisionModelWithProjection"),
              ("clip", "image", False): ("clip_vision_model", "CLIPVisionModel"),
              ("clip", "text", True): ("clip_text_model", "CLIPTextModelWithProjection"),
              ("clip", "text", False): ("clip_text_model", "CLIPTextModel"),
              ("siglip", "image", False): ("siglip_vision_model", "SiglipVisionModel"),
              ("siglip", "text", True): ("siglip_text_model", "SiglipTextModel")}
# model_type -> the transformers config class that writes it
HF_CONFIG_CLASSES = {"clip": "CLIPConfig", "siglip": "SiglipConfig", "clip_vision_model": "CLIPVisionConfig",
                     "clip_text_model": "CLIPTextConfig", "siglip_vision_model": "SiglipVisionConfig",
                     "siglip_text_model": "SiglipTextConfig"}


def hf_config_dict(config: CLIPConfig) -> dict:
    """transformers config kwargs for `config`, plus `model_type`: "clip" / "siglip" (`CLIPConfig` /
    `SiglipConfig`) for two towers; for one (`config.towers`), the single tower's config
    (`clip_vision_model`, `clip_text_model`, `siglip_vision_model`, `siglip_text_model`) with its class in
    `architectures` (`CLIPVisionModelWithProjection`, or `CLIPVisionModel` without `vision_proj`, ...).

    Raises:
      ConversionError: naming each field transformers cannot express (ModifiedResNet towers, pools, ...).
    """
    v, t = config.vision, config.text
    image, txt = config.has_image, config.has_text
    if image and v.arch != "vit":
        raise ConversionError("vision.arch='resnet': export to transformers supports ViT image towers only "
                              "(transformers has no ModifiedResNet CLIP); use --format open_clip")
    vision = dict(hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.layers,
                  num_attention_heads=v.heads, image_size=v.image_size, patch_size=v.patch_size,
                  hidden_act=_act(v.act, "vision.act"), layer_norm_eps=v.ln_eps)
    text = dict(vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=t.mlp_dim,
                num_hidden_layers=t.layers, num_attention_heads=t.heads, max_position_embeddings=t.context_length,
                hidden_act=_act(t.act, "text.act"), layer_norm_eps=t.ln_eps)
    _refuse([msg for bad, msg in [
        (image and v.layer_scale, f"vision.layer_scale_init={v.layer_scale_init!r} (transformers' CLIP/SigLIP "
                                  "blocks have no LayerScale)"),
        (txt and t.layer_scale, f"text.layer_scale_init={t.layer_scale_init!r} (transformers' CLIP/SigLIP blocks "
                                "have no LayerScale)"),
        (txt and t.embed_cls, "text.embed_cls=True (CoCa's appended class token; transformers has no CoCa)"),
        (image and v.pool == "attn", "vision.pool='attn' (CoCa's attentional pooler; transformers has no CoCa)"),
    ] if bad], "this config has no transformers equivalent")
    if config.is_siglip:
        _refuse([msg for bad, msg in [
            (image and v.pool != "map", f"vision.pool={v.pool!r} (SiglipModel pools with a MAP head)"),
            (image and v.ln_pre, "vision.ln_pre=True (SiglipModel has no pre-LayerNorm)"),
            (image and not v.patch_bias, "vision.patch_bias=False (SiglipModel's patch embedding has a bias)"),
            (txt and t.causal, "text.causal=True (SiglipModel's text tower is bidirectional)"),
            (txt and t.pool != "last", f"text.pool={t.pool!r} (SiglipModel pools the last token)"),
            (txt and not t.proj_bias, "text.proj_bias=False (SiglipModel's text head has a bias)"),
            (image and config.vision_proj, "vision_proj=True (SiglipModel has no image projection)"),
            (txt and not config.text_proj, "text_proj=False (SiglipModel always has a text head)"),
        ] if bad], "this SigLIP config has no transformers SiglipModel equivalent")
        # SiglipTextConfig's default bos/eos (49406/49407, CLIP's) are outside a SigLIP vocabulary
        text.update(projection_size=config.embed_dim, bos_token_id=None, eos_token_id=t.eos_id)
        d = {"model_type": "siglip", "text_config": text, "vision_config": vision}
    else:
        _refuse([msg for bad, msg in [
            (image and v.pool != "tok", f"vision.pool={v.pool!r} (CLIPModel pools the class token)"),
            (image and v.final_ln_after_pool, "vision.final_ln_after_pool=True (CLIPModel normalises the class "
                                              "token)"),
            (image and not v.ln_pre, "vision.ln_pre=False (CLIPModel has a pre-LayerNorm)"),
            (image and v.patch_bias, "vision.patch_bias=True (CLIPModel's patch embedding has no bias)"),
            (txt and not t.causal, "text.causal=False (CLIPModel's text tower is causal)"),
            (txt and t.pool not in ("argmax", "eos"), f"text.pool={t.pool!r} (CLIPModel pools at the EOT token)"),
            (txt and t.proj_bias and config.text_proj, "text.proj_bias=True (CLIPModel's text projection has no "
                                                       "bias)"),
            (config.has_tower("both") and not config.vision_proj, "vision_proj=False (CLIPModel always projects; "
                                                                 "an image tower alone exports as CLIPVisionModel)"),
            (config.has_tower("both") and not config.text_proj, "text_proj=False (CLIPModel always projects; a "
                                                               "text tower alone exports as CLIPTextModel)"),
        ] if bad], "this CLIP config has no transformers CLIPModel equivalent")
        text["eos_token_id"] = 2 if t.pool == "argmax" else t.eos_id
        d = {"model_type": "clip", "text_config": text, "vision_config": vision, "projection_dim": config.embed_dim,
             "logit_scale_init_value": config.init_log_logit_scale}
    if not config.has_tower("both"):
        family = "siglip" if config.is_siglip else "clip"
        projected = config.vision_proj if image else config.text_proj
        model_type, cls = _HF_SINGLE[(family, config.towers, projected)]
        d = {"model_type": model_type, "architectures": [cls], **(vision if image else d["text_config"])}
        if family == "clip" and projected:
            d["projection_dim"] = config.embed_dim
    _check_hf_reads_back(d, config)
    return d


def _check_hf_reads_back(d: dict, config: CLIPConfig) -> None:
    """Refuse what `from_hf_config` would not read back as `config`. Preprocessing is written separately;
    SiglipConfig has no logit scale / bias initial values (they are only initialisers: the trained
    values are params and are exported); single towers have neither."""
    from clipjax.convert.hf_config import from_hf_config

    try:
        back = from_hf_config(json.loads(json.dumps(d)))
    except ConfigError as e:
        raise ConversionError(f"the transformers config would not read back: {e}") from None
    want = _unused_fields_like(config.architecture().replace(preprocess=back.preprocess), back)
    if config.is_siglip or not config.has_tower("both"):  # no logit scale / bias in these configs
        want = want.replace(init_log_logit_scale=back.init_log_logit_scale, init_logit_bias=back.init_logit_bias)
    if back != want:
        raise ConversionError("transformers' config cannot express " + "; ".join(_diff(want, back)))


def hf_preprocessor_dict(config: CLIPConfig) -> dict:
    """`preprocessor_config.json` for `config.preprocess` at `config.vision.image_size`.

    `shortest`: resize the shorter side to `image_size` then centre-crop `image_size` x `image_size`
    (`size={"shortest_edge": S}`, `do_center_crop`); `squash`: resize to `S x S`, no crop
    (`size={"height": S, "width": S}`). `resample` is PIL's code (bicubic 3, bilinear 2).
    `CLIPImageProcessor` for CLIP models, `SiglipImageProcessor` for SigLIP ones; `processor_class`
    (`CLIPProcessor` / `SiglipProcessor`, which also needs the tokenizer) for two-tower models only.

    Raises:
      ConversionError: a preprocess field or value that transformers' processors cannot express.
    """
    p, s = config.preprocess, config.vision.image_size
    _check_preprocess_fields(p, "transformers image-processor")
    d = {"image_processor_type": "SiglipImageProcessor" if config.is_siglip else "CLIPImageProcessor",
         "do_convert_rgb": True, "do_resize": True, "resample": PIL_RESAMPLE[p.interpolation],
         "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
         "image_mean": [float(x) for x in p.mean], "image_std": [float(x) for x in p.std]}
    if config.has_tower("both"):  # the processor pairs it with the tokenizer; an image tower alone has none
        d["processor_class"] = "SiglipProcessor" if config.is_siglip else "CLIPProcessor"
    if p.resize_mode == "shortest":
        d.update(size={"shortest_edge": s}, do_center_crop=True, crop_size={"height": s, "width": s})
    else:
        d.update(size={"height": s, "width": s}, do_center_crop=False)
    return d


def export_hf(model, out: str, overwrite: bool = False) -> str:
    """Write `model` (a `clipjax.checkpoint.Model` or checkpoint folder) as a complete transformers folder.

    Files: `config.json`, `model.safetensors` (float32), `preprocessor_config.json` and, when the model
    has a tokenizer, its files (CLIP BPE: `vocab.json`, `merges.txt`, `tokenizer_config.json`, which
    `CLIPTokenizer` / `AutoTokenizer` load). Returns `out` as given.

    A single-tower model (`config.towers`) is written as transformers' single tower
    (`CLIPVisionModelWithProjection`, `CLIPVisionModel`, `CLIPTextModelWithProjection`, `CLIPTextModel`,
    `SiglipVisionModel`, `SiglipTextModel`: `hf_config_dict`), with its keys under `vision_model.` /
    `text_model.` (the layout transformers 4 and 5 both load); an image tower gets the
    `preprocessor_config.json`, a text tower the tokenizer files.

    Raises:
      ConversionError: the architecture or preprocessing has no exact transformers equivalent.
      FileExistsError: `out` exists and `overwrite` is False.
    """
    import transformers
    from safetensors.numpy import save_file

    from clipjax.checkpoint import atomic_folder

    _refuse_existing([out], overwrite)
    model = _load(model)
    cfg = model.config
    d = hf_config_dict(cfg)
    pre = hf_preprocessor_dict(cfg) if cfg.has_image else None
    kind = d.pop("model_type")
    family = "hf_siglip" if cfg.is_siglip else "hf_clip"
    sd = _invert(rules_for(cfg, family), _flat_params(model.params))
    hf_cfg = getattr(transformers, HF_CONFIG_CLASSES[kind])(**d)
    with atomic_folder(out, overwrite) as tmp:
        hf_cfg.save_pretrained(tmp)
        save_file(sd, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        if pre is not None:
            with open(os.path.join(tmp, "preprocessor_config.json"), "w") as f:
                json.dump(pre, f, indent=2)
        if model.tokenizer is not None and cfg.has_text:
            model.tokenizer.save(tmp)
    return out


# ----------------------------------------------------------------------------- open_clip


def _mlp_ratio(width: int, mlp_dim: int) -> float:
    """A `mlp_ratio` with open_clip's `int(width * mlp_ratio) == mlp_dim`."""
    ratio = mlp_dim / width
    return ratio if int(width * ratio) == mlp_dim else (mlp_dim + 0.5) / width


def _act_kwargs(act: str, quick_gelu: bool, field: str) -> dict | None:
    """open_clip's `act_kwargs` for a tower whose activation is `act`, under the model-wide `quick_gelu` flag."""
    if act not in ("gelu", "quick_gelu", "gelu_tanh"):
        raise ConversionError(f"{field}={act!r}: open_clip's towers use GELU (exact or tanh) or QuickGELU")
    if (act == "quick_gelu") != quick_gelu:
        raise ConversionError(f"{field}={act!r} with text.act={'quick_gelu' if quick_gelu else 'gelu'!r}: open_clip's "
                              "quick_gelu flag sets both towers' activation")
    return {"approximate": "tanh"} if act == "gelu_tanh" else None


def _timm_siglip_name(config: CLIPConfig) -> str:
    """The timm SigLIP trunk whose architecture `config.vision` is (open_clip passes no sizes to timm)."""
    from clipjax.presets import TIMM_SIGLIP, timm_siglip_vision

    v = config.vision
    for name in TIMM_SIGLIP:
        if name.endswith(f"_{v.image_size}") and timm_siglip_vision(name, v.image_size) == v:
            return name
    raise ConversionError(
        f"vision (pool='map', width={v.width}, layers={v.layers}, heads={v.heads}, mlp_dim={v.mlp_dim}, "
        f"patch_size={v.patch_size}, image_size={v.image_size}, act={v.act!r}, ln_eps={v.ln_eps}): open_clip builds "
        "MAP-pooled image towers from timm, and no timm SigLIP model has this architecture (known: "
        f"{', '.join(sorted(TIMM_SIGLIP))})")


def open_clip_config_dict(config: CLIPConfig) -> dict:
    """open_clip model config (the `NAME.json` form: `embed_dim`, `vision_cfg`, `text_cfg`, ...) for `config`.

    ViT towers (class-token or `avg` pool) and ModifiedResNet towers become open_clip's own towers, with
    the text tower at the top level; MAP-pooled towers must be a timm SigLIP trunk (`custom_text: true`,
    text keys under `text.`). Raises `ConversionError` naming each field open_clip cannot express, or
    that clipjax would not read back identically (`from_open_clip_json`, preprocessing aside).
    """
    if not config.has_tower("both"):
        raise ConversionError(f"towers={config.towers!r}: open_clip models hold both towers; export this "
                              "single-tower model with --format hf")
    v, t = config.vision, config.text
    quick = t.act == "quick_gelu"
    d: dict = {"embed_dim": config.embed_dim}
    if v.arch == "resnet":
        if v.width * 32 % v.heads:
            raise ConversionError(f"vision.heads={v.heads} does not divide the attention-pool width {v.width * 32}")
        vision = {"image_size": v.image_size, "layers": list(v.layers), "width": v.width,
                  "head_width": v.width * 32 // v.heads}
    elif v.pool == "map":
        vision = {"image_size": v.image_size, "timm_model_name": _timm_siglip_name(config),
                  "timm_model_pretrained": False, "timm_pool": "map", "timm_proj": "none"}
        d["custom_text"] = True
    else:
        _refuse([msg for bad, msg in [
            (v.pool not in ("tok", "avg", "attn"), f"vision.pool={v.pool!r} (open_clip ViTs always have a class "
                                                   "token: pool 'tok', 'avg' or CoCa's 'attn')"),
            (v.patch_bias, "vision.patch_bias=True (open_clip's conv1 has no bias)"),
            (not config.vision_proj, "vision_proj=False (open_clip ViTs always project)"),
        ] if bad], "this ViT image tower has no open_clip equivalent")
        vision = {"image_size": v.image_size, "layers": v.layers, "width": v.width, "head_width": v.width // v.heads,
                  "mlp_ratio": _mlp_ratio(v.width, v.mlp_dim), "patch_size": v.patch_size}
        if v.pool == "attn":
            vision.update(attentional_pool=True, attn_pooler_queries=v.attn_pool_queries,
                          attn_pooler_heads=v.attn_pool_heads)
        elif v.pool != "tok":
            vision["pool_type"] = v.pool
        if v.layer_scale:
            vision["ls_init_value"] = v.layer_scale_init
        if not v.ln_pre:
            vision["no_ln_pre"] = True
        if v.final_ln_after_pool:
            vision["final_ln_after_pool"] = True
        if v.ln_eps != 1e-5:
            vision["norm_kwargs"] = {"eps": v.ln_eps}
        act_kw = _act_kwargs(v.act, quick, "vision.act")
        if act_kw:
            vision["act_kwargs"] = act_kw
    text = {"context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.width, "heads": t.heads,
            "layers": t.layers, "mlp_ratio": _mlp_ratio(t.width, t.mlp_dim), "pool_type": t.pool}
    if t.pool == "eos":
        text["eos_id"] = t.eos_id
    if not t.causal:
        text["no_causal_mask"] = True
    if not config.text_proj:
        text["proj_type"] = "none"
    elif t.proj_bias:
        text["proj_bias"] = True
    if t.ln_eps != 1e-5:
        text["norm_kwargs"] = {"eps": t.ln_eps}
    if t.layer_scale:
        text["ls_init_value"] = t.layer_scale_init
    if t.embed_cls:  # open_clip's CLIP class drops the class token: CustomTextCLIP runs the tower's forward
        text.update(embed_cls=True, pad_id=t.pad_id)
        d["custom_text"] = True
    act_kw = _act_kwargs(t.act, quick, "text.act")
    if act_kw:
        text["act_kwargs"] = act_kw
    d.update(vision_cfg=vision, text_cfg=text, init_logit_scale=config.init_log_logit_scale)
    if quick:
        d["quick_gelu"] = True
    if config.init_logit_bias is not None:
        d["init_logit_bias"] = config.init_logit_bias
    _check_reads_back(d, config)
    return d


def _unused_fields_like(want: CLIPConfig, got: CLIPConfig) -> CLIPConfig:
    """`want` with the fields its architecture does not use taken from `got`: `text.eos_id` unless pool='eos',
    `text.pad_id` without `embed_cls`, the pooler's query and head counts unless `vision.pool='attn'`."""
    if want.text.pool != "eos":
        want = want.replace(text=dataclasses.replace(want.text, eos_id=got.text.eos_id))
    if not want.text.embed_cls:
        want = want.replace(text=dataclasses.replace(want.text, pad_id=got.text.pad_id))
    if want.vision.pool != "attn" and got.vision.arch == want.vision.arch:
        want = want.replace(vision=dataclasses.replace(want.vision, attn_pool_queries=got.vision.attn_pool_queries,
                                                       attn_pool_heads=got.vision.attn_pool_heads))
    return want


def _diff(want: CLIPConfig, got: CLIPConfig) -> list[str]:
    a, b = want.architecture_dict(), got.architecture_dict()
    out = []
    for k in a:
        if isinstance(a[k], dict):
            out += [f"{k}.{kk}={a[k][kk]!r} (reads back as {b.get(k, {}).get(kk)!r})" for kk in a[k]
                    if a[k][kk] != b.get(k, {}).get(kk)]
        elif a[k] != b.get(k):
            out.append(f"{k}={a[k]!r} (reads back as {b.get(k)!r})")
    return out


def _check_reads_back(d: dict, config: CLIPConfig, preprocess_cfg: dict | None = None) -> None:
    """Refuse what `from_open_clip_json` would not read back as `config` (without `preprocess_cfg`: the
    preprocessing aside)."""
    from clipjax.convert.open_clip_config import from_open_clip_json

    src = json.loads(json.dumps(d if preprocess_cfg is None else {"model_cfg": d, "preprocess_cfg": preprocess_cfg}))
    try:
        back = from_open_clip_json(src)
    except ConfigError as e:
        raise ConversionError(f"the open_clip config would not read back: {e}") from None
    want = config.architecture()
    if preprocess_cfg is None:
        want = want.replace(preprocess=back.preprocess)
    want = _unused_fields_like(want, back)
    if back != want:
        raise ConversionError("open_clip's config cannot express " + "; ".join(_diff(want, back)))


def open_clip_preprocess_dict(config: CLIPConfig) -> dict:
    """open_clip `preprocess_cfg` (`size`, `mean`, `std`, `interpolation`, `resize_mode`) for `config`."""
    p = config.preprocess
    _check_preprocess_fields(p, "open_clip preprocess_cfg")
    return {"size": config.vision.image_size, "mean": [float(x) for x in p.mean], "std": [float(x) for x in p.std],
            "interpolation": p.interpolation, "resize_mode": p.resize_mode}


def open_clip_state_dict(model) -> dict[str, np.ndarray]:
    """open_clip `state_dict()` of `model` as `{key: float32 array}` (BatchNorm counters int64).

    ViT CLIP: `visual.conv1.weight`, `transformer.resblocks.*`, ...; ModifiedResNet: `visual.layer1.*`
    (BatchNorm running stats from the model's BatchStats); timm SigLIP: `visual.trunk.*`, `text.*`.
    Scalars (`logit_scale`, `logit_bias`) have shape `[]` as in open_clip.
    """
    from clipjax.convert.resnet_keys import resnet_to_torch

    model = _load(model)
    cfg = model.config
    open_clip_config_dict(cfg)  # refuse what open_clip cannot express before converting anything
    flat = _flat_params(model.params)
    if cfg.vision.arch == "resnet":
        sd = _invert(rules_for(cfg, "openai_rn"), flat, skip=("visual.",))
        pure = model.params if isinstance(model.params, dict) else model.params.to_pure_dict()
        sd.update({k: (v if v.dtype == np.int64 else np.asarray(v, np.float32))
                   for k, v in resnet_to_torch(pure["visual"], cfg.vision, "visual.").items()})
    else:
        # embed_cls: CustomTextCLIP's layout (text tower under `text.`), which is CoCa's without `text_decoder.*`
        family = "open_clip_siglip" if cfg.vision.pool == "map" else ("open_clip_coca" if cfg.text.embed_cls
                                                                      else "openai")
        sd = _invert(rules_for(cfg, family), flat)
    for k in ("logit_scale", "logit_bias"):
        if k in sd:
            sd[k] = sd[k].reshape(())
    return {k: np.array(v, order="C") for k, v in sd.items()}  # (np.ascontiguousarray makes 0-d arrays 1-d)


def _default_name(config: CLIPConfig, out_file: str) -> str:
    """The clipjax preset (= open_clip) name whose architecture `config` is, else the file's stem.

    Never a CoCa name (`text.embed_cls`): open_clip builds those with the captioning decoder, which
    the export does not write; the written model is a `CustomTextCLIP` under the file's stem."""
    from clipjax.presets import PRESETS

    arch = config.architecture()
    for name, preset in PRESETS.items():
        if preset == arch and not preset.text.embed_cls:
            return name
    return os.path.splitext(os.path.basename(out_file))[0]


def open_clip_paths(config: CLIPConfig, out_file: str, name: str | None = None) -> dict[str, str]:
    """Where `export_open_clip` writes: `weights` (out_file), `model_config` (`NAME.json` beside it),
    `open_clip_config` (`open_clip_config.json` beside it) and the `name`."""
    name = name or _default_name(config, out_file)
    if not name or os.sep in name or name.endswith(".json") or name == OPEN_CLIP_CONFIG_NAME[:-5]:
        raise ValueError(f"name={name!r}: give a plain model name (the model config is written as NAME.json)")
    folder = os.path.dirname(os.path.abspath(out_file))
    return {"name": name, "weights": os.path.abspath(out_file), "model_config": os.path.join(folder, f"{name}.json"),
            "open_clip_config": os.path.join(folder, OPEN_CLIP_CONFIG_NAME)}


def _write_atomic(files: dict[str, bytes | dict]) -> None:
    """Write every `{path: content}` to a temporary sibling, then rename them all into place."""
    tmps = []
    try:
        for path, content in files.items():
            fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=os.path.dirname(path))
            tmps.append((tmp, path))
            with os.fdopen(fd, "wb") as f:
                f.write(content if isinstance(content, bytes) else json.dumps(content, indent=2).encode())
        for tmp, path in tmps:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in tmps:
            if os.path.exists(tmp):
                os.remove(tmp)
        raise


def export_open_clip(model, out_file: str, name: str | None = None, overwrite: bool = False) -> str:
    """Write `model` (a `Model` or checkpoint folder) as an open_clip checkpoint. Returns `out_file` (absolute).

    Writes `out_file` (`.safetensors`, float32), `NAME.json` beside it (the model config; `name` defaults
    to the matching clipjax/open_clip preset name, else the file's stem) and `open_clip_config.json`
    (`{"model_cfg", "preprocess_cfg"}`). Load with::

        open_clip.add_model_config("DIR/NAME.json")   # not needed for a stock open_clip NAME
        model = open_clip.create_model("NAME", pretrained=out_file)

    or, when `out_file` is the folder's only weights file, `open_clip.create_model("local-dir:DIR")`
    (which also applies the preprocessing). `clipjax convert out_file OUT --config DIR/open_clip_config.json`
    converts back to the same params and config.

    Raises:
      ConversionError: open_clip cannot express the architecture or preprocessing.
      FileExistsError: one of the three files exists and `overwrite` is False.
      ValueError: `out_file` does not end in `.safetensors`, or a bad `name`.
    """
    from safetensors.numpy import save

    if not str(out_file).endswith(".safetensors"):
        raise ValueError(f"{out_file}: the open_clip export is a .safetensors file")
    model = _load(model)
    paths = open_clip_paths(model.config, out_file, name)
    _refuse_existing([paths["weights"], paths["model_config"], paths["open_clip_config"]], overwrite)
    model_cfg = open_clip_config_dict(model.config)
    pre = open_clip_preprocess_dict(model.config)
    _check_reads_back(model_cfg, model.config, pre)
    weights = save(open_clip_state_dict(model), metadata={"format": "pt"})
    os.makedirs(os.path.dirname(paths["weights"]), exist_ok=True)
    _write_atomic({paths["model_config"]: model_cfg,
                   paths["open_clip_config"]: {"model_cfg": model_cfg, "preprocess_cfg": pre},
                   paths["weights"]: weights})
    return paths["weights"]
