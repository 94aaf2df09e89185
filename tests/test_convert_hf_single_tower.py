"""Parity: transformers single towers (`CLIPVisionModelWithProjection`, `CLIPVisionModel`,
`CLIPTextModelWithProjection`, `CLIPTextModel`, `SiglipVisionModel`, `SiglipTextModel`) -> clipjax
single-tower models, and export back.

Reference: the installed transformers' own models (tiny random configs, every LayerNorm and zero-initialised
bias drawn at random so that a mis-mapped tensor cannot hide), run on real photos (scikit-image, preprocessed
by clipjax) and real captions (OpenAI BPE) or random ids (SigLIP's vocabulary, no offline tokenizer).

Tolerances (fp32): embeddings (unnormalised `image_embeds` / `text_embeds` / `pooler_output`) within
1e-5 x the embedding scale (`assert_close_scaled`: the largest row L2 norm). The export round trip
(convert, export, convert) gives the same config and bit-identical params.
"""

import json
import os

import jax
import numpy as np
import pytest

pytestmark = pytest.mark.parity

import torch  # noqa: E402
import transformers  # noqa: E402
from helpers import assert_close_scaled, randomise_norms, randomise_zero_biases  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

import clipjax  # noqa: E402
from clipjax.checkpoint import read_config, save  # noqa: E402
from clipjax.cli import main as cli  # noqa: E402
from clipjax.config import ConfigError  # noqa: E402
from clipjax.convert.api import convert  # noqa: E402
from clipjax.convert.errors import ConversionError  # noqa: E402
from clipjax.convert.export import export_open_clip  # noqa: E402
from clipjax.convert.hf_config import from_hf_config  # noqa: E402
from clipjax.models import clip as F  # noqa: E402
from clipjax.preprocess import preprocess  # noqa: E402
from clipjax.tokenizer import Tokenizer  # noqa: E402

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=16)
TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77)
SIGLIP_TEXT = dict(TEXT, vocab_size=1000, max_position_embeddings=16)

# name -> (transformers class, config class, config kwargs, tower, key layout of the saved folder)
CASES = {
    "clip-vision-proj": ("CLIPVisionModelWithProjection", "CLIPVisionConfig",
                         dict(VISION, projection_dim=24, hidden_act="gelu"), "image", "saved"),
    "clip-vision": ("CLIPVisionModel", "CLIPVisionConfig", VISION, "image", "saved"),
    "clip-text-proj": ("CLIPTextModelWithProjection", "CLIPTextConfig", dict(TEXT, projection_dim=24), "text",
                       "saved"),
    # Stable Diffusion's text encoder: no projection, transformers 4's key layout, the legacy eos_token_id=2
    "clip-text-sd": ("CLIPTextModel", "CLIPTextConfig", dict(TEXT, eos_token_id=2, bos_token_id=0), "text",
                     "prefixed"),
    "siglip-vision": ("SiglipVisionModel", "SiglipVisionConfig", VISION, "image", "saved"),
    "siglip-text": ("SiglipTextModel", "SiglipTextConfig", SIGLIP_TEXT, "text", "saved"),
}
PREFIX = {"image": "vision_model.", "text": "text_model."}


def _reference(model, tower: str, x: np.ndarray) -> np.ndarray:
    """The single tower's embedding as transformers returns it (`*_embeds`, else `pooler_output`)."""
    with torch.no_grad():
        if tower == "image":
            out = model(pixel_values=torch.from_numpy(x).permute(0, 3, 1, 2).contiguous())
        else:
            out = model(input_ids=torch.from_numpy(x).long())
    for name in ("image_embeds", "text_embeds", "pooler_output"):
        if getattr(out, name, None) is not None:
            return getattr(out, name).numpy()
    raise AssertionError("no embedding in the transformers output")


def _inputs(cfg, tower: str, photos, captions) -> np.ndarray:
    if tower == "image":
        return preprocess(photos, cfg.preprocess, cfg.vision.image_size)
    if cfg.text.vocab_size == 49408:
        return np.asarray(Tokenizer.openai(context_length=cfg.text.context_length)(captions), np.int32)
    return np.random.default_rng(0).integers(0, cfg.text.vocab_size, (4, cfg.text.context_length)).astype(np.int32)


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory, photos, captions):
    cls_name, cfg_name, kw, tower, layout = CASES[request.param]
    torch.manual_seed(0)
    cls = getattr(transformers, cls_name)
    model = cls(getattr(transformers, cfg_name)(**kw)).eval()
    randomise_norms(model)
    randomise_zero_biases(model, 0.05)
    d = tmp_path_factory.mktemp(request.param)
    src = str(d / "hf")
    model.save_pretrained(src)
    if layout == "prefixed":  # the Hub's (transformers 4) layout of a plain tower: keys under its prefix
        sd = load_file(os.path.join(src, "model.safetensors"))
        assert not any(k.startswith(PREFIX[tower]) for k in sd)  # transformers 5 saved it without
        save_file({PREFIX[tower] + k: v for k, v in sd.items()}, os.path.join(src, "model.safetensors"),
                  metadata={"format": "pt"})
        model = cls.from_pretrained(src).eval()  # transformers reads it back the same
    out = str(d / "clipjax")
    convert(src, out)
    jm = clipjax.load(out)
    x = _inputs(jm.config, tower, photos, captions)
    return dict(name=request.param, cls=cls, model=model, tower=tower, jm=jm, x=x, ref=_reference(model, tower, x),
                src=src, out=out, dir=d)


def _encode(jm, tower, x, normalize=False):
    return (jm.encode_image if tower == "image" else jm.encode_text)(x, normalize=normalize)


def test_embedding_matches_transformers(case):
    """The present tower's embedding equals transformers' `image_embeds` / `text_embeds` / `pooler_output`;
    the params hold that tower only (no logit scale)."""
    jm, tower = case["jm"], case["tower"]
    assert jm.config.towers == tower
    assert set(jm.params.to_pure_dict()) == {"visual" if tower == "image" else "text"}
    assert jm.config.embed_dim == case["ref"].shape[-1]
    assert_close_scaled(_encode(jm, tower, case["x"]), case["ref"], what=f"{case['name']} embedding")
    ref = case["ref"] / np.linalg.norm(case["ref"], axis=-1, keepdims=True)
    assert_close_scaled(_encode(jm, tower, case["x"], normalize=True), ref, what="normalised embedding")


def test_missing_tower_is_refused_by_name(case):
    jm, tower = case["jm"], case["tower"]
    other = "text" if tower == "image" else "image"
    pixels = np.zeros((1, 32, 32, 3), np.float32)
    ids = np.zeros((1, jm.config.text.context_length), np.int32)
    with pytest.raises(ConfigError, match=f"encode_{other}: needs the {other} tower.*no {other} tower"):
        _encode(jm, other, pixels if other == "image" else ids)
    for call, what in [(lambda: jm.logits(pixels, ids), "logits"), (lambda: jm.logit_scale, "logit_scale"),
                       (lambda: F.forward(jm.params, pixels, ids, config=jm.config), "forward"),
                       (lambda: F.logits(jm.params, pixels, ids, config=jm.config), "logits")]:
        with pytest.raises(ConfigError, match=f"{what}: needs both towers.*no {other} tower"):
            call()
    with pytest.raises(ConfigError, match="log_logit_scale"):
        F.logits_from_embeddings(jm.params, np.zeros((1, 4)), np.zeros((1, 4)))


def test_export_round_trip(case):
    """clipjax -> transformers single-tower folder: transformers' class loads it and gives the reference
    embedding; converting it again gives the same config and bit-identical params."""
    jm, tower = case["jm"], case["tower"]
    exported = str(case["dir"] / "exported")
    assert cli(["export", case["out"], exported]) == 0
    with open(os.path.join(exported, "config.json")) as f:
        assert json.load(f)["architectures"] == [case["cls"].__name__]
    files = set(os.listdir(exported))
    assert ("preprocessor_config.json" in files) == (tower == "image")
    assert ({"vocab.json", "merges.txt"} <= files) == (tower == "text" and jm.config.text.vocab_size == 49408)
    back = case["cls"].from_pretrained(exported).eval()
    assert_close_scaled(_reference(back, tower, case["x"]), case["ref"], what="exported embedding")
    again = clipjax.load(convert(exported, str(case["dir"] / "again")))
    assert again.config == jm.config
    a, b = jm.params.to_pure_dict(), again.params.to_pure_dict()
    flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b):
        assert np.array_equal(np.asarray(x), np.asarray(y)), path


@pytest.mark.parametrize("case", ["clip-vision-proj"], indirect=True)
def test_single_tower_sharded_load_and_cli(case, capsys):
    """A mesh load shards the single tower by the logical rules and gives the same embedding; `clipjax info`
    prints the present tower only; open_clip export is refused by name."""
    from clipjax.sharding import make_mesh

    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    jm = clipjax.load(case["out"], mesh=mesh)
    kernel = jm.params["visual"]["transformer"]["blocks"]["mlp"]["fc1"]["kernel"][...]
    assert not kernel.sharding.is_fully_replicated
    x = np.concatenate([case["x"]] * 2)
    assert_close_scaled(np.asarray(jm.encode_image(x, normalize=False)), np.concatenate([case["ref"]] * 2),
                        what="sharded")
    capsys.readouterr()
    assert cli(["info", case["out"]]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["towers"] == "image" and "text" not in info and "text_proj" not in info
    with pytest.raises(ConversionError, match="towers='image'.*open_clip"):
        export_open_clip(case["jm"], str(case["dir"] / "oc.safetensors"))
    with pytest.raises(ValueError, match="tokenizer_dir.*image-only"):
        save(str(case["dir"] / "tok"), case["jm"].config, case["jm"].params, tokenizer_dir=case["src"])


@pytest.mark.parametrize("case", ["clip-vision-proj"], indirect=True)
def test_architectures_and_weights_must_agree(case, tmp_path):
    """The CLIP class comes from `architectures`; without it from the weights; a disagreement is refused."""
    with open(os.path.join(case["src"], "config.json")) as f:
        d = json.load(f)
    folder = tmp_path / "hf"
    folder.mkdir()
    os.symlink(os.path.join(case["src"], "model.safetensors"), folder / "model.safetensors")
    for architectures, match in [(None, None), (["CLIPVisionModel"], "architectures=\\['CLIPVisionModel'\\].*"
                                                 "visual_projection.weight"),
                                 (["CLIPModel"], "architectures=\\['CLIPModel'\\] is not supported")]:
        (folder / "config.json").write_text(json.dumps(dict(d, architectures=architectures)))
        if match is None:
            cfg = clipjax.load(convert(str(folder), str(tmp_path / "ck"))).config
            assert cfg == case["jm"].config
        else:
            with pytest.raises(ConfigError, match=match):
                convert(str(folder), str(tmp_path / "ck2"))
    # a config alone (no weights) cannot tell CLIPVisionModel from CLIPVisionModelWithProjection
    with pytest.raises(ConfigError, match="without `architectures`"):
        from_hf_config(dict(d, architectures=None))


def test_single_tower_config_keys_are_honoured_or_refused():
    """Every key of transformers' own full single-tower `to_dict()` is read or known harmless; other keys and
    unsupported values are refused by name."""
    configs = {
        "CLIPVisionModelWithProjection": transformers.CLIPVisionConfig(**VISION, projection_dim=24).to_dict(),
        "CLIPTextModel": transformers.CLIPTextConfig(**TEXT).to_dict(),
        "SiglipVisionModel": transformers.SiglipVisionConfig(**VISION).to_dict(),
        "SiglipTextModel": transformers.SiglipTextConfig(**SIGLIP_TEXT).to_dict(),
    }
    got = {name: from_hf_config(dict(d, architectures=[name])) for name, d in configs.items()}
    assert got["CLIPVisionModelWithProjection"].embed_dim == 24 and got["CLIPVisionModelWithProjection"].vision_proj
    text = got["CLIPTextModel"]
    assert (text.towers, text.text_proj, text.embed_dim, text.text.pool, text.text.eos_id) == ("text", False, 32,
                                                                                              "eos", 49407)
    assert got["SiglipVisionModel"].is_siglip and got["SiglipVisionModel"].vision.pool == "map"
    assert got["SiglipTextModel"].text.proj_bias and not got["SiglipTextModel"].text.causal
    vision = dict(configs["CLIPVisionModelWithProjection"], architectures=["CLIPVisionModelWithProjection"])
    siglip = dict(configs["SiglipVisionModel"], architectures=["SiglipVisionModel"])
    bad = [
        (dict(vision, rope_theta=1e4), r"config keys \['rope_theta'\]"),
        (dict(vision, pruned_heads={"0": [1]}), "config.pruned_heads"),
        (dict(vision, num_channels=1), "config.num_channels=1"),
        (dict(vision, hidden_act="silu"), "config.hidden_act='silu'"),
        (dict(vision, vision_use_head=True), r"config keys \['vision_use_head'\]"),
        (dict(siglip, vision_use_head=False), "vision_use_head=False"),
        (dict(siglip, architectures=["SiglipVisionModel", "SiglipTextModel"]), "architectures="),
    ]
    for cfg, message in bad:
        with pytest.raises(ConfigError, match=message):
            from_hf_config(cfg)


def test_two_tower_checkpoints_unchanged(model_dir):
    """Two-tower checkpoints save no `towers` key (old readers read them) and load as two towers."""
    with open(os.path.join(model_dir, "clipjax.json")) as f:
        saved = json.load(f)["config"]
    assert "towers" not in saved and "text" in saved
    cfg = read_config(model_dir)
    assert cfg.towers == "both" and {"visual", "text", "log_logit_scale"} <= set(clipjax.load(model_dir).params)
