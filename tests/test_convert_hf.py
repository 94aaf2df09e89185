"""Parity: transformers CLIPModel / SiglipModel (tiny and B/32 configs) -> clipjax, and export back.

Tolerance (fp32): max |clipjax - torch| <= 1e-5 x embedding scale.
"""

import numpy as np
import pytest

pytestmark = pytest.mark.parity

import torch
import transformers

from helpers import assert_close_scaled, randomise_norms, randomise_zero_biases  # noqa: E402

import clipjax  # noqa: E402
from clipjax.cli import main as cli  # noqa: E402
from clipjax.preprocess import preprocess  # noqa: E402

TINY_TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=77)
TINY_VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=64,
                   patch_size=16)
B32_TEXT = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8)
B32_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  image_size=224, patch_size=32)


def _clip(text, vision, **kw):
    return transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, **kw))


def _siglip(text, vision):
    return transformers.SiglipModel(transformers.SiglipConfig(text_config=text, vision_config=vision))


CASES = {
    "clip-tiny": lambda: _clip(TINY_TEXT, TINY_VISION, projection_dim=24),
    "clip-tiny-eos": lambda: _clip(dict(TINY_TEXT, eos_token_id=49407, hidden_act="gelu"),
                                   dict(TINY_VISION, hidden_act="gelu"), projection_dim=24),
    "clip-b32": lambda: _clip(B32_TEXT, B32_VISION, projection_dim=512),
    "siglip-tiny": lambda: _siglip(dict(TINY_TEXT, vocab_size=1000, hidden_size=48, max_position_embeddings=16),
                                   TINY_VISION),
    "siglip-b32": lambda: _siglip(dict(B32_TEXT, vocab_size=32000, hidden_size=768, num_attention_heads=12,
                                       intermediate_size=3072, max_position_embeddings=64), B32_VISION),
}


def _features(out):
    return (out.pooler_output if hasattr(out, "pooler_output") else out).detach()


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory, photos):
    torch.manual_seed(0)
    model = CASES[request.param]().eval()
    randomise_norms(model)
    randomise_zero_biases(model, 0.02)
    d = tmp_path_factory.mktemp(request.param)
    src = d / "hf"
    model.save_pretrained(src, safe_serialization=request.param != "clip-tiny")  # .bin once, safetensors else
    out = str(d / "clipjax")
    assert cli(["convert", str(src), out]) == 0
    jm = clipjax.load(out)
    cfg = jm.config
    pixels = preprocess(photos[:2], cfg.preprocess, cfg.vision.image_size)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, min(cfg.text.vocab_size, 49406), (3, cfg.text.context_length)).astype(np.int32)
    if not cfg.is_siglip:  # an EOT somewhere in each row, pad after it
        for r, n in enumerate((5, 9, cfg.text.context_length)):
            ids[r, n - 1], ids[r, n:] = 49407, 0
    tp, ti = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(ids).long()
    with torch.no_grad():
        img = _features(model.get_image_features(pixel_values=tp))
        txt = _features(model.get_text_features(input_ids=ti))
        out_t = model(input_ids=ti, pixel_values=tp)
    return dict(name=request.param, model=model, jm=jm, pixels=pixels, ids=ids, tp=tp, ti=ti,
                img=torch.nn.functional.normalize(img, dim=-1).numpy(),
                txt=torch.nn.functional.normalize(txt, dim=-1).numpy(),
                logits=out_t.logits_per_image.numpy(), dir=d)


def test_embeddings_and_logits(case):
    jm = case["jm"]
    assert_close_scaled(jm.encode_image(case["pixels"]), case["img"], what="image")
    assert_close_scaled(jm.encode_text(case["ids"]), case["txt"], what="text")
    assert_close_scaled(jm.logits(case["pixels"], case["ids"]), case["logits"], what="logits")


def test_export_round_trip(case):
    """clipjax -> transformers folder -> transformers loads it and gives the same embeddings."""
    out = str(case["dir"] / "exported")
    assert cli(["export", str(case["dir"] / "clipjax"), out]) == 0
    cls = transformers.SiglipModel if case["jm"].config.is_siglip else transformers.CLIPModel
    back = cls.from_pretrained(out).eval()
    with torch.no_grad():
        img = _features(back.get_image_features(pixel_values=case["tp"]))
        txt = _features(back.get_text_features(input_ids=case["ti"]))
    assert_close_scaled(torch.nn.functional.normalize(img, dim=-1).numpy(), case["img"], what="exported image")
    assert_close_scaled(torch.nn.functional.normalize(txt, dim=-1).numpy(), case["txt"], what="exported text")


@pytest.mark.parametrize("case", ["clip-tiny"], indirect=True)  # the tiny CLIP only (CI time)
def test_other_image_size_interpolates_position_embedding(case):
    """Non-native resolution: torch-bicubic resize of the patch grid, as transformers does."""
    rng = np.random.default_rng(1)
    pixels = rng.normal(size=(2, 96, 96, 3)).astype(np.float32)
    tp = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        ref = _features(case["model"].get_image_features(pixel_values=tp, interpolate_pos_encoding=True))
    ref = torch.nn.functional.normalize(ref, dim=-1).numpy()
    assert_close_scaled(case["jm"].encode_image(pixels), ref, what="interpolated image")


@pytest.mark.parametrize("case", ["clip-tiny", "siglip-tiny"], indirect=True)
def test_hidden_states_match_transformers(case):
    """Every block's output equals transformers' `output_hidden_states` (which also holds the blocks' input)."""
    from clipjax.models import clip as F

    jm, model = case["jm"], case["model"]
    with torch.no_grad():
        hv = model.vision_model(pixel_values=case["tp"], output_hidden_states=True).hidden_states[1:]
        ht = model.text_model(input_ids=case["ti"], output_hidden_states=True).hidden_states[1:]
    got_v = F.hidden_states(jm.params, case["pixels"], config=jm.config)
    got_t = F.hidden_states(jm.params, case["ids"], config=jm.config, tower="text")
    assert got_v.shape[0] == len(hv) and got_t.shape[0] == len(ht)
    for i in range(len(hv)):
        assert_close_scaled(got_v[i], hv[i].numpy(), what=f"image block {i}")
    for i in range(len(ht)):
        assert_close_scaled(got_t[i], ht[i].numpy(), what=f"text block {i}")


def test_hf_config_keys_are_honoured_or_refused():
    """Every key of transformers' own full `to_dict()` is read or known harmless; others are refused by name."""
    from clipjax.config import ConfigError
    from clipjax.convert.hf_config import from_hf_config

    clip = transformers.CLIPConfig(text_config=TINY_TEXT, vision_config=TINY_VISION, projection_dim=24).to_dict()
    siglip = transformers.SiglipConfig(text_config=dict(TINY_TEXT, vocab_size=1000, hidden_size=48),
                                       vision_config=TINY_VISION).to_dict()
    assert from_hf_config(clip).vision.width == 48 and from_hf_config(siglip).is_siglip
    # old configs' `text_config_dict` overrides `text_config`, as transformers reads it
    old = dict(clip, text_config_dict=dict(clip["text_config"], num_hidden_layers=3))
    assert from_hf_config(old).text.layers == 3
    bad = [
        (dict(clip, vision_config=dict(clip["vision_config"], rope_theta=10000.0)), r"vision_config keys \['rope_theta'\]"),
        (dict(clip, text_config=dict(clip["text_config"], pruned_heads={"0": [1]})), "text_config.pruned_heads"),
        (dict(clip, vision_config=dict(clip["vision_config"], num_channels=1)), "vision_config.num_channels=1"),
        (dict(siglip, vision_config=dict(siglip["vision_config"], vision_use_head=False)), "vision_use_head=False"),
        (dict(siglip, model_type="siglip2"), "siglip2"),
        (dict(clip, text_config=dict(clip["text_config"], hidden_act="silu")), "text_config.hidden_act='silu'"),
    ]
    for cfg, message in bad:
        with pytest.raises(ConfigError, match=message):
            from_hf_config(cfg)
