"""CoCa's contrastive towers and LayerScale against open_clip 3.3, fp32, on reduced configs.

CoCa (`coca_ViT-B-32`'s config with 2 blocks per tower and small widths): the image tower's
attentional pooler (keys/values wider than the pooled queries, and the packed in_proj case where
they are the same width) and the text tower's appended class token under CoCa's legacy pad mask, on
real photos and real captions tokenized at CoCa's context length 76 (padded with id 0, one caption
truncated, one empty). The state dict is open_clip's `CoCa` one, `text_decoder.*` included: the
decoder is ignored by name. LayerScale: `ViT-M-16-alt`'s config, reduced, with LayerScale in the
text tower too and random gammas. Max abs diff <= 1e-5 x embedding scale (`assert_close_scaled`).
Full-size structure (meta device) is checked by `tests/test_open_clip_configs.py`.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_scaled, randomise_norms

from clipjax.config import CLIPConfig, ConfigError
from clipjax.convert.api import load_pytorch
from clipjax.convert.core import detect_family, match_presets
from clipjax.convert.errors import ConversionError
from clipjax.convert.export import hf_config_dict, open_clip_config_dict, open_clip_state_dict
from clipjax.convert.open_clip_config import from_open_clip_json
from clipjax.models.clip import l2_normalize, logits_from_embeddings
from clipjax.models.text import cls_pad_mask
from clipjax.preprocess import preprocess
from clipjax.presets import PRESETS
from clipjax.tokenizer import Tokenizer

pytestmark = pytest.mark.parity

CAPTIONS = ["an astronaut in a white space suit with an american flag", "a ginger cat",
            "a cup of coffee on a saucer!! wow!!", "", " ".join(["a rocket on the launch pad"] * 16)]


def _coca_reduced(embed_dim: int = 48) -> dict:
    """coca_ViT-B-32 with 2 blocks per tower, 2 heads of 64, a 64 px image; the CLIP vocabulary (real captions)."""
    d = copy.deepcopy(open_clip.get_model_config("coca_ViT-B-32"))
    d["embed_dim"] = embed_dim
    d["vision_cfg"].update(layers=2, width=128, image_size=64)
    d["text_cfg"].update(layers=2, heads=2, width=128)
    d["multimodal_cfg"].update(layers=1, heads=2, width=128)
    return d


def _layer_scale_reduced() -> dict:
    d = copy.deepcopy(open_clip.get_model_config("ViT-M-16-alt"))
    d["embed_dim"] = 48
    d["vision_cfg"].update(layers=2, width=128, image_size=64)
    d["text_cfg"].update(layers=2, heads=2, width=128, ls_init_value=1e-3)
    return d


def _build(d: dict) -> torch.nn.Module:
    """The model open_clip's factory builds for model config `d` (CoCa, CustomTextCLIP or CLIP), randomised."""
    torch.manual_seed(0)
    kw = {k: v for k, v in d.items() if k != "custom_text"}
    kind = open_clip.CoCa if "multimodal_cfg" in d else (open_clip.CustomTextCLIP if d.get("custom_text")
                                                         else open_clip.CLIP)
    model = kind(**kw).eval()
    randomise_norms(model)  # non-trivial LayerNorms and LayerScale gammas, so a swapped key shows
    return model


def _convert(model, d: dict, tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "model.json").write_text(json.dumps(d))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    return load_pytorch(str(tmp_path / "model.safetensors"), config=str(tmp_path / "model.json"))


def _compare(model, m, photos, ids, what):
    pixels = preprocess(photos[:2], m.config.preprocess, m.config.vision.image_size)
    with torch.no_grad():
        nchw = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
        want_img = model.encode_image(nchw, normalize=False).numpy()
        want_txt = model.encode_text(torch.from_numpy(ids).long(), normalize=False).numpy()
    assert_close_scaled(m.encode_image(pixels, normalize=False), want_img, what=f"{what} image")
    assert_close_scaled(m.encode_text(ids, normalize=False), want_txt, what=f"{what} text")
    return pixels


@pytest.fixture(scope="module")
def coca_ids():
    tok = Tokenizer.openai(context_length=76)
    ids = np.asarray(tok(CAPTIONS), np.int32)
    ref = open_clip.get_tokenizer("coca_ViT-B-32")(CAPTIONS).numpy()
    np.testing.assert_array_equal(ids, ref)  # CoCa's tokenizer: 76 ids, pad 0
    lengths = (ids != 0).sum(1)
    assert ids.shape == (5, 76) and len(set(lengths)) == 5 and lengths.max() == 76  # one truncated, no pad
    return ids


@pytest.mark.parametrize("embed_dim", [48, 128])  # pooler keys wider than queries (separate q/k/v), or packed
def test_coca_matches_open_clip(embed_dim, coca_ids, photos, tmp_path):
    d = _coca_reduced(embed_dim)
    model = _build(d)
    sd = model.state_dict()
    assert any(k.startswith("text_decoder.") for k in sd) and detect_family(sd) == "open_clip_coca"
    assert ("visual.attn_pool.attn.in_proj_weight" in sd) == (embed_dim == 128)
    m = _convert(model, d, tmp_path)
    assert m.config.vision.pool == "attn" and m.config.text.embed_cls and m.config.text.context_length == 76
    assert m.tokenizer is not None and m.tokenizer.context_length == 76
    pixels = preprocess(photos[:2], m.config.preprocess, m.config.vision.image_size)
    ids = coca_ids.copy()
    ids[2, 3] = 0  # id 0 is also BPE's "!": CoCa's mask hides it wherever it is, not only in the padding
    with torch.no_grad():
        want_img = model.encode_image(torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), normalize=False)
        want_txt = model.encode_text(torch.from_numpy(ids).long(), normalize=False)
        want_short = model.encode_text(torch.from_numpy(coca_ids[:4, :20]).long(), normalize=False)
    img = m.encode_image(pixels, normalize=False)
    assert_close_scaled(img, want_img.numpy(), what=f"CoCa embed {embed_dim} image")
    if embed_dim != 48:  # the packed pooler is the only difference: the text tower is checked once
        return
    txt = m.encode_text(ids, normalize=False)
    assert_close_scaled(txt, want_txt.numpy(), what="CoCa text")
    # rows shorter than the context: open_clip slices its positions and mask to them
    assert_close_scaled(m.encode_text(coca_ids[:4, :20], normalize=False), want_short.numpy(), what="CoCa text, 20")
    want_logits = model.logit_scale.exp() * F.normalize(want_img, dim=-1) @ F.normalize(want_txt, dim=-1).T
    got = logits_from_embeddings(m.params, l2_normalize(img), l2_normalize(txt))
    assert_close_scaled(got, want_logits.detach().numpy(), what="CoCa logits")


def test_coca_pad_mask_is_open_clips(coca_ids):
    """`cls_pad_mask` equals open_clip's additive mask (legacy CoCa layout) where it is finite."""
    text = open_clip.CoCa(**{k: v for k, v in _coca_reduced().items() if k != "custom_text"}).text
    assert text.cls_emb is not None and not text.correct_cls_mask and text.pad_id == 0
    ids = coca_ids.copy()
    ids[2, 3] = 0  # a pad id inside the text
    add = text._build_additive_mask(torch.from_numpy(ids).long(), 77, torch.float32)[::text.heads]
    keep = np.asarray(cls_pad_mask(ids, 0))[:, 0, 0]
    np.testing.assert_array_equal(np.isfinite(add.numpy()), np.broadcast_to(keep[:, None, :], add.shape))
    assert keep[:, 0].all() and not keep[2, 4] and keep[2, 5]  # shifted by one against the ids
    assert not keep[1, -1] and keep[4, -1]  # padded rows hide the class token's own column


def test_coca_decoder_is_ignored_explicitly(tmp_path):
    d = _coca_reduced()
    model = _build(d)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    # without the decoder (CustomTextCLIP's layout) the same towers convert, as family openai with `text.`
    cfg = from_open_clip_json(d)
    from clipjax.convert.core import state_dict_to_pure

    no_dec = {k: v for k, v in sd.items() if not k.startswith("text_decoder.")}
    a, b = state_dict_to_pure(sd, cfg, "open_clip_coca"), state_dict_to_pure(no_dec, cfg, detect_family(no_dec))
    assert detect_family(no_dec) == "openai"
    np.testing.assert_array_equal(a["visual"]["attn_pool"]["query"], b["visual"]["attn_pool"]["query"])
    # a leftover key that is not the decoder's is still refused by name
    with pytest.raises(ConversionError, match=r"unexpected keys \(1\): \['text.extra'\]"):
        state_dict_to_pure(dict(sd, **{"text.extra": np.zeros(1)}), cfg, "open_clip_coca")


def test_layer_scale_matches_open_clip(photos, tmp_path):
    d = _layer_scale_reduced()
    assert from_open_clip_json(d).vision.layer_scale_init == 1e-4  # the value is kept (initialiser)
    model = _build(d)
    m = _convert(model, d, tmp_path)
    assert m.config.vision.layer_scale and m.config.text.layer_scale_init == 1e-3
    assert m.params["visual"]["transformer"]["blocks"]["ls1"][...].shape == (2, 128)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 49406, (3, 77)).astype(np.int32)
    ids[:, -1] = 49407
    _compare(model, m, photos, ids, "LayerScale")


@pytest.mark.parametrize("kind", ["coca", "layer_scale"])
def test_open_clip_export_round_trip(kind, tmp_path):
    """Export: open_clip builds the written config and loads the written state dict strictly; the same numbers."""
    d = _coca_reduced() if kind == "coca" else _layer_scale_reduced()
    model = _build(d)
    m = _convert(model, d, tmp_path)
    out = open_clip_config_dict(m.config)
    assert "multimodal_cfg" not in out and out.get("custom_text", False) == (kind == "coca")
    back = _build(out)
    back.load_state_dict({k: torch.from_numpy(v) for k, v in open_clip_state_dict(m).items()}, strict=True)
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    ids = torch.from_numpy(np.asarray(Tokenizer.openai(context_length=m.config.text.context_length)(CAPTIONS[:3])))
    with torch.no_grad():
        for encode in (lambda mm: mm.encode_image(pixels, normalize=False),
                       lambda mm: mm.encode_text(ids.long(), normalize=False)):
            torch.testing.assert_close(encode(back), encode(model), rtol=0, atol=1e-6)
    if kind == "coca":
        from clipjax.convert.export import open_clip_paths

        assert open_clip_paths(m.config, str(tmp_path / "w.safetensors"))["name"] == "w"  # never a CoCa name


def test_refusals_and_old_configs():
    base = open_clip.get_model_config("coca_ViT-B-32")
    cases = [
        ("vision_cfg", "attentional_pool", "parallel", r"vision_cfg.attentional_pool: 'parallel'"),
        ("vision_cfg", "attentional_pool", "cascade", r"vision_cfg.attentional_pool: 'cascade'"),
        ("vision_cfg", "pool_type", "avg", r"vision_cfg.pool_type: 'avg' with attentional_pool"),
        ("vision_cfg", "attn_pooler_heads", 7, "vision_cfg.attn_pooler_heads"),
        ("vision_cfg", "output_tokens", False, "vision_cfg.output_tokens"),
        ("text_cfg", "output_tokens", False, "text_cfg.output_tokens"),
    ]
    for tower, key, value, message in cases:
        d = copy.deepcopy(base)
        d[tower][key] = value
        with pytest.raises(ConfigError, match=message):
            from_open_clip_json(d)
    with pytest.raises(ConfigError, match="model.multimodal_cfg: without custom_text"):
        from_open_clip_json({k: v for k, v in base.items() if k != "custom_text"})
    with pytest.raises(ConfigError, match="text_cfg.hf_model_name"):
        from_open_clip_json(open_clip.get_model_config("coca_roberta-ViT-B-32"))
    rn = copy.deepcopy(open_clip.get_model_config("RN50"))
    rn["vision_cfg"]["ls_init_value"] = 1e-5
    with pytest.raises(ConfigError, match="vision_cfg.ls_init_value"):
        from_open_clip_json(rn)
    for name in ("coca_ViT-B-32", "ViT-M-16-alt"):  # transformers has neither
        with pytest.raises(ConversionError, match="no transformers equivalent"):
            hf_config_dict(PRESETS[name])
    # configs saved before these fields existed load unchanged
    old = PRESETS["ViT-B-32"].architecture_dict()
    for tower, keys in (("vision", ("layer_scale_init", "attn_pool_queries", "attn_pool_heads")),
                        ("text", ("layer_scale_init", "embed_cls", "pad_id"))):
        old[tower] = {k: v for k, v in old[tower].items() if k not in keys}
    assert CLIPConfig.from_dict(old) == PRESETS["ViT-B-32"].architecture()


def test_full_size_state_dicts_find_their_preset():
    """coca_ViT-B-32 and ViT-M-16-alt at full size (meta device): family and preset from the shapes alone."""
    for name, family in (("coca_ViT-B-32", "open_clip_coca"), ("ViT-M-16-alt", "openai")):
        with torch.device("meta"):
            sd = open_clip.create_model(name, pretrained=None, device="meta").state_dict()
        assert detect_family(sd) == family
        assert match_presets(sd, family).architecture() == PRESETS[name].architecture()
