"""Encoder options: scan vs unrolled, remat, bf16, sharding on 8 devices, intermediates, Long-CLIP, configs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import clipjax
from clipjax.config import ConfigError, TextConfig, VisionConfig
from clipjax.models import clip as F
from clipjax.models.longclip import stretch_position_embedding, to_long_clip
from clipjax.convert.hf_config import from_hf_config


def tiny(**kw):
    cfg = clipjax.CLIPConfig(
        embed_dim=16,
        vision=VisionConfig(image_size=32, patch_size=8, width=32, layers=3, heads=4, mlp_dim=64),
        text=TextConfig(context_length=12, vocab_size=64, width=32, heads=4, layers=3, mlp_dim=64, eos_id=63))
    return cfg.replace(**kw)


def tiny_siglip():
    base = clipjax.get_config("ViT-B-16-SigLIP")
    return base.replace(embed_dim=32,
                        vision=dataclasses.replace(base.vision, image_size=32, patch_size=8, width=32, layers=2,
                                                   heads=4, mlp_dim=64),
                        text=dataclasses.replace(base.text, context_length=8, vocab_size=64, width=32, layers=2,
                                                 heads=4, mlp_dim=64))


def inputs(cfg, b=8, seed=0):
    rng = np.random.default_rng(seed)
    pixels = rng.normal(size=(b, cfg.vision.image_size, cfg.vision.image_size, 3)).astype(np.float32)
    ids = rng.integers(1, cfg.text.vocab_size - 1, (b, cfg.text.context_length)).astype(np.int32)
    return jnp.asarray(pixels), jnp.asarray(ids)


@pytest.mark.parametrize("make", [tiny, tiny_siglip])
def test_scan_equals_unrolled(make):
    cfg = make()
    params = F.init_params(cfg, seed=1)
    pixels, ids = inputs(cfg)
    unrolled = cfg.replace(scan_layers=False)
    for fn, x in ((F.encode_image, pixels), (F.encode_text, ids)):
        np.testing.assert_allclose(fn(params, x, config=cfg), fn(params, x, config=unrolled), atol=1e-6)


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch"])
def test_remat_same_values_and_gradients(policy):
    cfg = tiny()
    params = F.init_params(cfg, seed=2)
    pixels, ids = inputs(cfg)

    def loss(p, c):
        return jnp.sum(F.logits(p, pixels, ids, config=c) ** 2)

    v0, g0 = jax.value_and_grad(loss)(params, cfg)
    v1, g1 = jax.value_and_grad(loss)(params, cfg.replace(remat=policy))
    np.testing.assert_allclose(v0, v1, rtol=1e-6)
    scale = max(float(np.abs(b).max()) for b in jax.tree.leaves(g0))
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * scale)  # fp32 reassociation only


def test_bf16_compute_close_to_fp32():
    cfg = tiny()
    params = F.init_params(cfg, seed=3)
    pixels, ids = inputs(cfg)
    for fn, x in ((F.encode_image, pixels), (F.encode_text, ids)):
        ref = fn(params, x, config=cfg)
        got = fn(params, x, config=cfg.replace(dtype="bfloat16"))
        assert got.dtype == jnp.float32
        assert float(jnp.abs(got - ref).max()) < 3e-2  # bf16 has 8 mantissa bits; embeddings are unit norm


def test_bf16_params():
    """bf16 params with bf16 compute, in value: both towers' unit-norm embeddings are within 2e-2 (max abs; bf16
    keeps 8 mantissa bits; measured 4e-3 image, 7e-3 text) of an fp32 run of the same params (the bf16 values
    upcast exactly to fp32). The embeddings of different inputs differ by more than 0.1, 5x the bound."""
    cfg = tiny(param_dtype="bfloat16", dtype="bfloat16")
    params = F.init_params(cfg)
    assert {v.dtype for v in jax.tree.leaves(params)} == {jnp.dtype("bfloat16")}
    fp32_params = jax.tree.map(lambda v: v.astype(jnp.float32), params)
    pixels, ids = inputs(cfg)  # the shapes of test_bf16_compute_close_to_fp32: the fp32 programs are reused
    for fn, x in ((F.encode_image, pixels), (F.encode_text, ids)):
        got = fn(params, x, config=cfg)
        want = np.asarray(fn(fp32_params, x, config=tiny()), np.float64)
        assert got.dtype == jnp.float32 and got.shape == want.shape == (8, 16)
        err = float(np.abs(np.asarray(got, np.float64) - want).max())
        assert err < 2e-2, (fn.__name__, err)
        assert np.abs(want[0] - want[1:]).max() > 0.1  # input-dependent embeddings


def test_every_param_has_logical_names():
    state = F.abstract_params(clipjax.get_config("ViT-B-32"))
    for path, v in jax.tree_util.tree_leaves_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        names = v.get_metadata().get("out_sharding")
        assert names is not None and len(names) == len(v.get_value().shape), path


def test_sharded_equals_unsharded(mesh8):
    """Params initialised sharded (fsdp x tensor) and a batch sharded over data equal the 1-device run."""
    from clipjax.sharding import batch_sharding, make_mesh

    cfg = tiny()
    params = F.init_params(cfg, seed=4)
    pixels, ids = inputs(cfg, b=8)
    ref_i, ref_t = F.encode_image(params, pixels, config=cfg), F.encode_text(params, ids, config=cfg)
    for mesh in (mesh8, make_mesh(data=2, fsdp=2, tensor=2)):
        sp = F.init_params(cfg, seed=4, mesh=mesh)
        kernel = sp["visual"]["transformer"]["blocks"]["mlp"]["fc1"]["kernel"][...]
        if mesh.shape["tensor"] == 2:
            assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
        with jax.set_mesh(mesh):
            si = F.encode_image(sp, jax.device_put(pixels, batch_sharding(mesh, 4)), config=cfg)
            st = F.encode_text(sp, jax.device_put(ids, batch_sharding(mesh, 2)), config=cfg)
        np.testing.assert_allclose(si, ref_i, atol=2e-6)
        np.testing.assert_allclose(st, ref_t, atol=2e-6)


def test_load_with_mesh_restores_sharded(tmp_path, mesh8):
    from clipjax.checkpoint import save
    from clipjax.sharding import make_mesh

    cfg = tiny()
    params = F.init_params(cfg, seed=5)
    save(str(tmp_path / "ck"), cfg, params)
    mesh = make_mesh(data=2, fsdp=4)
    m = clipjax.load(str(tmp_path / "ck"), mesh=mesh)
    tok = m.params["text"]["token_embed"][...]
    assert tok.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
    pixels, _ = inputs(cfg)
    np.testing.assert_allclose(m.encode_image(pixels), F.encode_image(params, pixels, config=cfg), atol=2e-6)


def test_hidden_states():
    cfg = tiny()
    params = F.init_params(cfg)
    pixels, ids = inputs(cfg, b=2)
    h = F.hidden_states(params, pixels, config=cfg)
    assert h.shape == (3, 2, cfg.vision.num_tokens, 32)
    ht = F.hidden_states(params, ids, config=cfg, tower="text")
    assert ht.shape == (3, 2, 12, 32)
    # the last hidden state pooled by hand gives the embedding
    model = nnx.merge(F.graphdef(cfg), params)
    np.testing.assert_allclose(F.l2_normalize(model.visual.pool(h[-1])), F.encode_image(params, pixels, config=cfg),
                               atol=1e-6)


def test_long_clip_stretch_matches_formula():
    pe = np.random.default_rng(0).normal(size=(77, 8))
    oracle = np.zeros((248, 8))
    oracle[:20] = pe[:20]
    for i in range(56):
        for j in range(4):
            oracle[20 + 4 * i + j] = ((4 - j) * pe[20 + i] + j * pe[21 + i]) / 4
    for j in range(4):
        oracle[244 + j] = pe[76] + j * (pe[76] - pe[75]) / 4
    np.testing.assert_allclose(stretch_position_embedding(jnp.asarray(pe, jnp.float32)), oracle, atol=1e-6)


def test_to_long_clip_encodes_248_tokens():
    cfg = tiny(text=TextConfig(context_length=77, vocab_size=64, width=32, heads=4, layers=1, mlp_dim=64, eos_id=63))
    params = F.init_params(cfg)
    lparams, lcfg = to_long_clip(params, cfg)
    assert lcfg.text.context_length == 248
    ids = np.zeros((2, 248), np.int32)
    ids[:, :5] = [1, 2, 3, 4, 63]
    short = F.encode_text(params, jnp.asarray(ids[:, :77]), config=cfg)
    long = F.encode_text(lparams, jnp.asarray(ids), config=lcfg)
    np.testing.assert_allclose(long, short, atol=1e-6)  # causal: the pooled EOT at 4 sees only positions < 20


def test_hf_config_round_trip():
    import transformers
    from clipjax.convert.api import hf_config_dict

    for cfg in (clipjax.get_config("ViT-B-32-quickgelu"), tiny_siglip()):
        d = hf_config_dict(cfg)
        kind = d.pop("model_type")
        hf = (transformers.SiglipConfig if kind == "siglip" else transformers.CLIPConfig)(**d)
        back = from_hf_config(hf)
        assert back.vision == dataclasses.replace(cfg.vision) and back.embed_dim == cfg.embed_dim
        assert dataclasses.replace(back.text, eos_id=cfg.text.eos_id) == cfg.text


def test_bad_inputs_have_clear_errors():
    cfg = tiny()
    params = F.init_params(cfg)
    pixels, ids = inputs(cfg, b=2)
    with pytest.raises(ValueError, match=r"NHWC \[B, H, W, 3\]"):
        F.encode_image(params, pixels.transpose(0, 3, 1, 2), config=cfg)
    with pytest.raises(TypeError, match="preprocessed floats"):
        F.encode_image(params, pixels.astype(jnp.int32), config=cfg)
    with pytest.raises(ValueError, match="S >= patch size 8"):
        F.encode_image(params, pixels[:, :6, :6], config=cfg)
    # a side that is not a multiple of the patch drops its last rows, as torch's strided conv does
    np.testing.assert_array_equal(F.encode_image(params, pixels[:, :30, :30], config=cfg),
                                  F.encode_image(params, pixels[:, :24, :24], config=cfg))
    with pytest.raises(ValueError, match="context_length 12"):
        F.encode_text(params, jnp.zeros((2, 13), jnp.int32), config=cfg)
    with pytest.raises(TypeError, match="integers"):
        F.encode_text(params, ids.astype(jnp.float32), config=cfg)
    with pytest.raises(ConfigError, match="unknown architecture 'ViT-X'"):
        clipjax.get_config("ViT-X")
    with pytest.raises(ConfigError, match="not divisible"):
        VisionConfig(width=30, heads=4)
    from clipjax.checkpoint import Model

    m = Model(cfg, params)
    with pytest.raises(ValueError, match="NaN"):
        m.encode_image(np.full((1, 32, 32, 3), np.nan, np.float32))
