"""Every open_clip model config: converted exactly or refused by name (issue 10 section 1).

Three independent checks against open_clip itself:
1. Structure, at full size, for every name open_clip ships: the model open_clip builds (on the
   `meta` device: no memory, no weights) is read back module by module (head counts, activation
   classes, LayerNorm eps, pooling, masks, widths) into a `CLIPConfig` by an oracle written from
   open_clip's module attributes, and must equal clipjax's preset and `from_open_clip_json`;
   or clipjax refuses the config with an error naming the key.
2. Inference from a state dict (the same meta state dicts) returns the preset, or asks for
   `--arch` when several architectures share the shapes; it never guesses.
3. Numbers, fp32, on reduced copies of one config of each feature family (80/88/104-wide heads,
   non-integer MLP ratios, CLIPA's average pool, MetaCLIP 2's eos pool, 32-wide ResNet pool heads,
   SigLIP 2's tanh GELU, a text tower without projection, LayerScale, CoCa's contrastive towers):
   open_clip's embeddings on real photos, max abs diff <= 1e-5 x embedding scale, converted through
   `--config` with open_clip's JSON (CoCa with padded real captions: `tests/test_coca_layerscale.py`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os

import numpy as np
import open_clip
import pytest
import torch
from helpers import assert_close_scaled, randomise_norms

import clipjax
from clipjax.config import CLIPConfig, ConfigError, TextConfig, VisionConfig
from clipjax.convert.api import convert
from clipjax.convert.core import detect_family, match_presets
from clipjax.convert.errors import ConversionError
from clipjax.convert.open_clip_config import from_open_clip_json
from clipjax.convert.support import BEGIN, END, open_clip_configs, support_table
from clipjax.preprocess import preprocess
from clipjax.presets import PRESETS

pytestmark = pytest.mark.parity

NAMES = list(open_clip_configs())  # the configs open_clip ships
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- oracle from torch modules


def _act(module) -> str:
    name = type(module).__name__
    if name == "QuickGELU":
        return "quick_gelu"
    if name == "GELUTanh" or getattr(module, "approximate", "none") == "tanh":
        return "gelu_tanh"
    assert name == "GELU", name
    return "gelu"


def _vision_from_torch(visual) -> tuple[VisionConfig, bool]:
    """(VisionConfig, has a projection) read from open_clip's image tower modules."""
    if hasattr(visual, "trunk"):  # timm SigLIP
        t = visual.trunk
        assert t.global_pool == "map" and t.cls_token is None and isinstance(visual.head, torch.nn.Sequential)
        assert len(visual.head) == 0 and isinstance(t.head, torch.nn.Identity)
        b = t.blocks[0]
        assert _act(t.attn_pool.mlp.act) == _act(b.mlp.act) and t.attn_pool.num_heads == b.attn.num_heads
        assert isinstance(t.norm_pre, torch.nn.Identity) and isinstance(t.fc_norm, torch.nn.Identity)
        w, _, p, _ = t.patch_embed.proj.weight.shape
        return VisionConfig(image_size=t.patch_embed.img_size[0], patch_size=p, width=w, layers=len(t.blocks),
                            heads=b.attn.num_heads, mlp_dim=b.mlp.fc1.out_features, act=_act(b.mlp.act), pool="map",
                            ln_pre=False, patch_bias=t.patch_embed.proj.bias is not None, ln_eps=t.norm.eps), False
    if hasattr(visual, "attnpool"):  # ModifiedResNet
        layers = tuple(len(getattr(visual, f"layer{i}")) for i in range(1, 5))
        return VisionConfig(arch="resnet", image_size=visual.image_size, width=visual.layer1[0].conv1.in_channels,
                            layers=layers, heads=visual.attnpool.num_heads, mlp_dim=0, pool="attnpool",
                            ln_pre=False), True
    b = visual.transformer.resblocks[0]
    w, _, p, _ = visual.conv1.weight.shape
    pool, final_ln_after_pool, pooler = visual.pool_type, visual.final_ln_after_pool, {}
    if visual.attn_pool is not None:  # CoCa: ln_post on the pooled queries, the first one read ('tok')
        ap = visual.attn_pool
        assert visual.attn_pool_contrastive is None and pool == "tok" and ap.attn.kdim == ap.attn.vdim == w
        assert ap.ln_q.eps == ap.ln_k.eps == 1e-5 and visual.ln_post.normalized_shape == (ap.query.shape[1],)
        pool, final_ln_after_pool = "attn", False  # open_clip's _pool ignores final_ln_after_pool here
        pooler = dict(attn_pool_queries=ap.query.shape[0], attn_pool_heads=ap.attn.num_heads)
    return VisionConfig(image_size=visual.image_size[0], patch_size=p, width=w, layers=len(visual.transformer.resblocks),
                        heads=b.attn.num_heads, mlp_dim=b.mlp.c_fc.out_features, act=_act(b.mlp.gelu),
                        pool=pool, ln_pre=not isinstance(visual.ln_pre, torch.nn.Identity),
                        ln_eps=visual.ln_post.eps, final_ln_after_pool=final_ln_after_pool,
                        layer_scale_init=_layer_scale(visual.transformer), **pooler), True


def _layer_scale(transformer) -> float | None:
    """1.0 where every block has open_clip's LayerScale (its init value is not readable on meta; it is an
    initialiser and `_same_architecture` compares presence only), None where no block has it."""
    kinds = {type(m).__name__ for b in transformer.resblocks for m in (b.ls_1, b.ls_2)}
    assert kinds in ({"LayerScale"}, {"Identity"}), kinds
    return 1.0 if kinds == {"LayerScale"} else None


def config_from_torch(model) -> CLIPConfig:
    """What open_clip built, as a clipjax config (preprocess and init values left at defaults)."""
    vision, vision_proj = _vision_from_torch(model.visual)
    text = getattr(model, "text", model)  # CustomTextCLIP keeps the tower in `.text`
    pool = getattr(text, "text_pool_type", None) or text.pool_type
    eos = getattr(text, "text_eos_id", None) or getattr(text, "eos_id", None)
    b = text.transformer.resblocks[0]
    vocab, width = text.token_embedding.weight.shape
    proj = text.text_projection
    embed = (proj.out_features if isinstance(proj, torch.nn.Linear) else proj.shape[1]) if proj is not None else width
    cls = getattr(text, "cls_emb", None) is not None  # CoCa: the appended class token overrides pool_type
    if cls:
        assert not text.correct_cls_mask and not text.use_pad_mask, "clipjax runs CoCa's legacy pad mask"
        pool = "last"
    tcfg = TextConfig(context_length=text.positional_embedding.shape[0] - int(cls), vocab_size=vocab, width=width,
                      heads=b.attn.num_heads, layers=len(text.transformer.resblocks), mlp_dim=b.mlp.c_fc.out_features,
                      act=_act(b.mlp.gelu), causal=text.attn_mask is not None, pool=pool,
                      eos_id=eos if pool == "eos" else (49407 if pool == "argmax" else 1),
                      proj_bias=isinstance(proj, torch.nn.Linear) and proj.bias is not None, ln_eps=text.ln_final.eps,
                      layer_scale_init=_layer_scale(text.transformer), embed_cls=cls,
                      pad_id=text.pad_id if cls else 0)
    return CLIPConfig(embed_dim=embed, vision=vision, text=tcfg, vision_proj=vision_proj, text_proj=proj is not None,
                      init_logit_bias=-10.0 if model.logit_bias is not None else None)


def _same_architecture(a: CLIPConfig, b: CLIPConfig) -> bool:
    keep = dict(preprocess=a.preprocess, init_log_logit_scale=a.init_log_logit_scale,
                init_logit_bias=a.init_logit_bias)

    def ls_presence(c: CLIPConfig) -> CLIPConfig:  # LayerScale's init value is an initialiser, like the above
        def one(tower):
            return dataclasses.replace(tower, layer_scale_init=1.0 if tower.layer_scale_init is not None else None)

        return c.replace(vision=one(c.vision), text=one(c.text))

    return ls_presence(a.architecture()) == ls_presence(b.architecture().replace(**keep))


@pytest.fixture(scope="module")
def meta_models():
    """{name: (open_clip model on the meta device, verdict)} for every open_clip config."""
    out = {}
    for name in NAMES:
        try:
            cfg = from_open_clip_json(open_clip.get_model_config(name))
        except ConfigError as e:
            out[name] = (None, e)
            continue
        with torch.device("meta"):  # parameters are created (and initialised) on meta: no memory, fast
            out[name] = (open_clip.create_model(name, pretrained=None, device="meta"), cfg)
    return out


def test_every_open_clip_config_is_exact_or_refused_by_name(meta_models):
    exact = [n for n, (m, _) in meta_models.items() if m is not None]
    for name, (model, got) in meta_models.items():
        if model is None:
            msg = str(got)
            assert msg.startswith(("open_clip vision_cfg.", "open_clip text_cfg.", "open_clip model.")), (name, msg)
            assert name not in PRESETS, f"{name} has a preset but its open_clip config is refused: {msg}"
            continue
        oracle = config_from_torch(model)
        assert _same_architecture(oracle, got), f"{name}: from_open_clip_json\n{got}\n!= open_clip's model\n{oracle}"
        assert _same_architecture(oracle, PRESETS[name]), f"{name}: preset\n{PRESETS[name]}\n!= open_clip\n{oracle}"
    # the architectures the issue names explicitly are among the exact ones
    must = ["ViT-H-14", "ViT-H-14-quickgelu", "ViT-H-14-378-quickgelu", "ViT-g-14", "ViT-bigG-14",
            "ViT-bigG-14-quickgelu", "ViT-B-16-plus-240", "ViT-B-32-256", "RN50x4", "RN50x16", "RN50x64",
            "ViT-L-14-CLIPA", "ViT-B-16-SigLIP2", "ViT-B-16-SigLIP2-512", "ViT-L-16-SigLIP2-384",
            "ViT-SO400M-14-SigLIP2", "ViT-SO400M-16-SigLIP2-384", "ViT-gopt-16-SigLIP2-256",
            "ViT-M-16-alt", "coca_ViT-B-32", "coca_ViT-L-14", "coca_base"]
    assert not set(must) - set(exact), set(must) - set(exact)
    refused = {n for n in NAMES if n not in exact}
    for prefix in ("convnext", "EVA", "ViTamin", "MobileCLIP", "PE-Core", "swin", "xlm-roberta", "mt5", "nllb",
                   "coca_roberta"):
        assert any(n.startswith(prefix) for n in refused), prefix


def test_state_dict_inference_never_guesses(meta_models):
    for name, (model, cfg) in meta_models.items():
        if model is None:
            continue
        sd = model.state_dict()
        family = detect_family(sd)
        try:
            got = match_presets(sd, family)
        except ConversionError as e:  # several presets fit: the message lists this one and asks for --arch
            assert name in str(e) and "--arch" in str(e), (name, str(e))
            continue
        assert _same_architecture(config_from_torch(model), got), f"{name}: inferred\n{got}"


def test_ambiguous_and_unknown_shapes_are_refused(meta_models):
    sd = meta_models["ViT-B-32"][0].state_dict()
    with pytest.raises(ConversionError, match=r"differ in text\.act, vision\.act.*ViT-B-32, ViT-B-32-quickgelu"):
        match_presets(sd, "openai")
    # ViT-g-14's 88-wide heads are found from its shapes (64-wide heads would make 22)
    assert match_presets(meta_models["ViT-g-14"][0].state_dict(), "openai").vision.heads == 16
    with pytest.raises(ConversionError, match="differ in vision.image_size.*ViT-SO400M-14-SigLIP-378, "
                                              "ViT-SO400M-14-SigLIP-384"):
        match_presets(meta_models["ViT-SO400M-14-SigLIP-384"][0].state_dict(), "open_clip_siglip")
    sd = {k: v for k, v in sd.items() if ".resblocks.11." not in k or k.startswith("transformer.")}
    with pytest.raises(ConversionError, match="no open_clip architecture has these shapes.*--config"):
        match_presets(sd, "openai")


def test_refusals_name_the_key():
    base = open_clip.get_model_config("ViT-B-32")
    cases = [
        ("vision_cfg", "attentional_pool", "parallel", "vision_cfg.attentional_pool"),
        ("vision_cfg", "pos_embed_type", "sin_cos_2d", "vision_cfg.pos_embed_type"),
        ("vision_cfg", "qk_norm", True, "vision_cfg.qk_norm"),
        ("vision_cfg", "norm_kwargs", {"eps": 1e-6, "elementwise_affine": False}, "vision_cfg.norm_kwargs"),
        ("vision_cfg", "act_kwargs", {"approximate": "erf"}, "vision_cfg.act_kwargs"),
        ("text_cfg", "embed_cls", True, "text_cfg.embed_cls"),  # without custom_text open_clip drops it
        ("text_cfg", "proj_type", "mlp", "text_cfg.proj_type"),
        ("text_cfg", "final_ln_after_pool", True, "text_cfg.final_ln_after_pool"),
        ("text_cfg", "hf_model_name", "roberta-base", "text_cfg.hf_model_name"),
        ("text_cfg", "text_mask", "first", r"unknown open_clip text_cfg keys \['text_mask'\]"),
        ("vision_cfg", "head_width", 100, "vision_cfg.head_width"),
    ]
    for tower, key, value, message in cases:
        d = copy.deepcopy(base)
        d[tower][key] = value
        with pytest.raises(ConfigError, match=message):
            from_open_clip_json(d)
    rn = copy.deepcopy(open_clip.get_model_config("RN50"))
    rn["vision_cfg"]["pool_type"] = "avg"
    with pytest.raises(ConfigError, match="vision_cfg.pool_type"):
        from_open_clip_json(rn)


def test_readme_table_is_current():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    assert BEGIN in readme and END in readme, "README lacks the open_clip support table"
    table = readme.split(BEGIN)[1].split(END)[0].strip()
    want = support_table(open_clip_configs())
    assert table == want, "README's open_clip table is stale: regenerate with `python -m clipjax.convert.support`"


# ----------------------------------------------------------------------------- numbers on reduced copies


def _shrink(name: str, **vision_over) -> dict:
    """open_clip's config for `name` with 2 blocks per tower, 2 heads of the original head width,
    a small vocabulary and image: every structural option kept."""
    d = copy.deepcopy(open_clip.get_model_config(name))
    v, t = d["vision_cfg"], d["text_cfg"]
    if "timm_model_name" not in v:
        hw = v.get("head_width", 64)
        if isinstance(v["layers"], list):
            v.update(layers=[1, 1, 1, 1], width=16, image_size=64)
        else:
            v.update(layers=2, width=2 * hw, image_size=4 * v["patch_size"])
        d["embed_dim"] = 48
    v.update(vision_over)
    t.update(layers=2, heads=2, width=2 * (t["width"] // t["heads"]), vocab_size=min(t["vocab_size"], 1000))
    return d


REDUCED = {
    "ViT-H-14": _shrink("ViT-H-14"),  # 80-wide heads
    "ViT-bigG-14-CLIPA": _shrink("ViT-bigG-14-CLIPA"),  # 104-wide heads, mlp 4.9231, avg pool, LN after pool
    "ViT-g-14-quickgelu": dict(_shrink("ViT-g-14"), quick_gelu=True),  # 88-wide heads, mlp 4.3637
    "ViT-H-14-worldwide-quickgelu": _shrink("ViT-H-14-worldwide-quickgelu"),  # eos pool, eos_id 2
    "RN50x4-hw32": _shrink("RN50x4", head_width=32),  # 32-wide attention-pool heads
    "ViT-B-32-SigLIP2-256": _shrink("ViT-B-32-SigLIP2-256"),  # timm tanh GELU, text tanh GELU
}
# a SigLIP text tower without projection (ViT-SO400M-16-SigLIP-i18n-256's form) on the base trunk
_i18n = copy.deepcopy(open_clip.get_model_config("ViT-SO400M-16-SigLIP-i18n-256"))
_i18n.update(embed_dim=768, vision_cfg=dict(_i18n["vision_cfg"], timm_model_name="vit_base_patch16_siglip_224",
                                            image_size=224))
_i18n["text_cfg"].update(width=768, heads=12, layers=2, mlp_ratio=4.0, vocab_size=1000)
REDUCED["SigLIP-i18n-noproj"] = _i18n
REDUCED["ViT-M-16-alt"] = _shrink("ViT-M-16-alt")  # LayerScale (random gammas: `randomise_norms`)
# CoCa's contrastive towers (attentional pooler, appended class token), a small captioning decoder (ignored)
REDUCED["coca_ViT-B-32"] = dict(_shrink("coca_ViT-B-32"), multimodal_cfg=dict(
    open_clip.get_model_config("coca_ViT-B-32")["multimodal_cfg"], layers=1, width=128, heads=2))



@pytest.mark.parametrize("case", sorted(REDUCED))
def test_reduced_configs_match_open_clip(case, tmp_path, photos):
    d = REDUCED[case]
    torch.manual_seed(0)
    kind = (open_clip.CoCa if "multimodal_cfg" in d else
            open_clip.CustomTextCLIP if d.get("custom_text") else open_clip.CLIP)
    model = kind(**{k: v for k, v in d.items() if k != "custom_text"}).eval()
    randomise_norms(model)
    path = tmp_path / "open_clip.json"
    path.write_text(json.dumps(d))
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConversionError, match="no open_clip architecture has these shapes"):  # nothing guessed
        convert(str(tmp_path / "model.safetensors"), str(tmp_path / "guess"))
    out = convert(str(tmp_path / "model.safetensors"), str(tmp_path / "cj"), config=str(path))
    m = clipjax.load(out)
    cfg = m.config
    assert _same_architecture(config_from_torch(model), cfg)
    pixels = preprocess(photos[:2], cfg.preprocess, cfg.vision.image_size)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, cfg.text.vocab_size, (3, cfg.text.context_length)).astype(np.int32)
    if cfg.text.pool == "eos":
        ids[:, 5:] = 0
        ids[:, 4] = cfg.text.eos_id
    with torch.no_grad():
        want_img = model.encode_image(torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(),
                                      normalize=False).numpy()  # (CoCa normalises by default)
        want_txt = model.encode_text(torch.from_numpy(ids).long(), normalize=False).numpy()
    assert_close_scaled(m.encode_image(pixels, normalize=False), want_img, what=f"{case} image")
    assert_close_scaled(m.encode_text(ids, normalize=False), want_txt, what=f"{case} text")
