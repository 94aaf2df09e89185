"""ModifiedResNet (RN50 family) tower and its torch key table, against open_clip's `ModifiedResNet`.

Parity tolerance (fp32): max|clipjax - torch| <= 1e-5 * max|torch| on every compared output. Both
sides compute in float32 (jax matmul precision "highest", set in conftest); the measured error is
1e-6 to 2e-6 relative (float32 rounding through the conv/BN stack and the attention pool), so 1e-5
leaves a 5x margin while any layout/order/eps bug gives O(1) errors. The one exception is RN50's
layer4 map, checked against a float64 run of open_clip instead (see that test). BatchNorm statistics
and affine params are randomised in torch first (the default mean 0 / var 1 / scale 1 would hide BN
bugs). bf16 compute: 5e-2 (measured 2.2e-2; bf16 keeps 8 mantissa bits).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clipjax.config import VisionConfig
from clipjax.presets import PRESETS
from clipjax.convert.errors import ConversionError
from clipjax.convert.resnet_keys import key_table, resnet_from_torch, resnet_to_torch
from clipjax.models.resnet import BatchNorm, ModifiedResNet
from clipjax.sharding import batch_sharding, make_mesh, shard_params

RTOL = 1e-5  # max abs error relative to the reference output's max abs value (fp32)
TINY = VisionConfig(arch="resnet", image_size=64, width=16, layers=(1, 2, 1, 1), heads=4, mlp_dim=0,
                    pool="attnpool", ln_pre=False)
TINY_EMBED = 32
OPENAI_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
OPENAI_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def _rel_err(got, want) -> float:
    """max|got - want| / max|want| in float64."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    scale = np.abs(want).max()
    assert scale > 0
    return float(np.abs(got - want).max() / scale)


def _close(got, want, rtol=RTOL):
    err = _rel_err(got, want)
    assert err <= rtol, f"max abs err / max|want| = {err:.3e} > {rtol}"


@partial(jax.jit, static_argnames=("graphdef", "dtype"))
def _run(graphdef, state, x, dtype=jnp.float32) -> dict:
    """Every output of one jitted trunk pass (one compile per graphdef/dtype keeps the file fast).

    `features` = `model.features`; `pooled`, `dense`, `dense_pos` are what `model(x)`,
    `model.dense(x)` and `model.dense(x, add_pos_embed=True)` return (the public entry points
    themselves run jitted in `test_sharded_forward_equals_unsharded` and `test_dense_at_other_resolution`).
    """
    model = nnx.merge(graphdef, state)
    f = model.features(x, dtype=dtype)
    return dict(features=f, pooled=model.attnpool(f), dense=model.attnpool.dense(f),
                dense_pos=model.attnpool.dense(f, add_pos_embed=True))


def _randomize_bn(module, seed: int, calib: np.ndarray) -> None:
    """Random BN affine params, then running stats measured on `calib` NHWC pixels (one train-mode pass).

    Data-derived statistics keep the activations of a random deep net input-dependent (with
    arbitrary stats RN50's layer4 output barely changes between photos: 0.5% of its scale) and
    are far from the default mean 0 / var 1.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    bns = [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for m in bns:
            m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one pass sets running stats = batch stats
        module.train()
        module(torch.from_numpy(np.ascontiguousarray(calib.transpose(0, 3, 1, 2))))
        module.eval()
        for m in bns:  # variance floor: pure batch variances make a random RN50 grow ~4x per stage,
            m.running_var.add_(0.1 * m.running_var.mean())  # and torch fp32 itself is then 1.4e-5 off fp64


def _state_dict(module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def _load(cfg: VisionConfig, embed_dim: int, pure: dict):
    """A clipjax model holding `pure` (no random init: shapes from eval_shape); state = Params + BatchStats."""
    abstract = nnx.eval_shape(lambda: ModifiedResNet(cfg, embed_dim, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    state.replace_by_pure_dict(jax.tree.map(jnp.asarray, pure))
    return graphdef, state


def _torch_trunk(module, x_nhwc: np.ndarray) -> np.ndarray:
    """open_clip stem + layer1..4 on NHWC pixels -> layer4 map `[B, h, w, C]` (NHWC)."""
    import torch

    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))
        feats = module.layer4(module.layer3(module.layer2(module.layer1(module.stem(x)))))
    return feats.permute(0, 2, 3, 1).numpy()


def _torch_forward(module, x_nhwc: np.ndarray):
    """open_clip outputs for NHWC pixels: pooled `[B, E]` and layer4 `[B, g, g, C]` (NHWC)."""
    import torch

    feats = _torch_trunk(module, x_nhwc)
    with torch.no_grad():
        pooled = module.attnpool(torch.from_numpy(np.ascontiguousarray(feats.transpose(0, 3, 1, 2))))
    return pooled.numpy(), feats


def _photos(size: int) -> np.ndarray:
    """Two real photos (astronaut, chelsea) centre-cropped, nearest-resized, OpenAI-normalised `[2, S, S, 3]`."""
    from skimage import data

    out = []
    for img in (data.astronaut(), data.chelsea()):
        h, w = img.shape[:2]
        s = min(h, w)
        img = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
        idx = (np.arange(size) * s / size).astype(int)
        out.append(img[idx][:, idx])
    return ((np.stack(out).astype(np.float32) / 255.0 - OPENAI_MEAN) / OPENAI_STD).astype(np.float32)


@pytest.fixture(scope="module")
def tiny():
    """(torch module, torch state dict, clipjax graphdef, clipjax state) with randomised BN."""
    import torch
    from open_clip.modified_resnet import ModifiedResNet as TorchResNet

    torch.manual_seed(0)
    ref = TorchResNet(layers=list(TINY.layers), output_dim=TINY_EMBED, heads=TINY.heads,
                      image_size=TINY.image_size, width=TINY.width).eval()
    calib = np.random.default_rng(5).normal(size=(4, TINY.image_size, TINY.image_size, 3)).astype(np.float32)
    _randomize_bn(ref, 1, calib)
    sd = _state_dict(ref)
    graphdef, state = _load(TINY, TINY_EMBED, resnet_from_torch(sd, TINY, prefix=""))
    return ref, sd, graphdef, state


@pytest.fixture(scope="module")
def fresh():
    """A randomly initialised clipjax tower (rbg keys: threefry kernels take ~0.3 s each to compile on CPU)."""
    return ModifiedResNet(TINY, TINY_EMBED, rngs=nnx.Rngs(jax.random.key(3, impl="rbg")))


@pytest.fixture(scope="module")
def pixels():
    return np.random.default_rng(0).normal(size=(2, TINY.image_size, TINY.image_size, 3)).astype(np.float32)


@pytest.mark.parity
def test_tiny_matches_open_clip(tiny, pixels):
    import torch

    ref, _, graphdef, state = tiny
    want_pooled, want_feats = _torch_forward(ref, pixels)
    with torch.no_grad():  # the module's own forward too, not only the piecewise call
        want_forward = ref(torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))).numpy()
    np.testing.assert_array_equal(want_forward, want_pooled)
    out = _run(graphdef, state, pixels)
    _close(out["features"], want_feats)
    got = out["pooled"]
    assert got.shape == (2, TINY_EMBED)
    _close(got, want_forward)


@pytest.mark.parity
@pytest.mark.parametrize("add_pos_embed", [False, True])
def test_dense_matches_maskclip_value_path(tiny, pixels, add_pos_embed):
    """Oracle: GL-MCM / MaskCLIP `x_local = c_proj(v_proj(layer4))` with torch Linear ops (+ pos[1:] if asked)."""
    import torch
    import torch.nn.functional as F

    ref, _, graphdef, state = tiny
    _, feats = _torch_forward(ref, pixels)
    pool = ref.attnpool
    with torch.no_grad():
        x = torch.from_numpy(feats).flatten(1, 2)  # [B, g*g, C], row-major positions
        if add_pos_embed:
            x = x + pool.positional_embedding[1:]
        want = F.linear(F.linear(x, pool.v_proj.weight, pool.v_proj.bias), pool.c_proj.weight, pool.c_proj.bias)
    got = _run(graphdef, state, pixels)["dense_pos" if add_pos_embed else "dense"]
    assert got.shape == (2, TINY.grid**2, TINY_EMBED)
    _close(got, want.numpy())


@pytest.mark.parity
def test_dense_at_other_resolution(tiny):
    """MaskCLIP runs RN dense features on larger inputs than the pool's size: 96x128 px -> 3x4 positions."""
    import torch
    import torch.nn.functional as F

    ref, _, graphdef, state = tiny
    x = np.random.default_rng(2).normal(size=(1, 96, 128, 3)).astype(np.float32)
    feats = _torch_trunk(ref, x)
    pool = ref.attnpool
    with torch.no_grad():
        v = F.linear(torch.from_numpy(feats).flatten(1, 2), pool.v_proj.weight, pool.v_proj.bias)
        want = F.linear(v, pool.c_proj.weight, pool.c_proj.bias).numpy()
    got = jax.jit(lambda s, x: nnx.merge(graphdef, s).dense(x))(state, x)
    assert got.shape == (1, 12, TINY_EMBED)
    _close(got, want)


@pytest.fixture(scope="module")
def rn50():
    import open_clip
    import torch

    torch.manual_seed(0)
    ref = open_clip.create_model("RN50", pretrained=None).visual.eval()
    _randomize_bn(ref, 2, _photos(224))
    return ref, _state_dict(ref)


@pytest.mark.parity
def test_rn50_real_photos_match_open_clip(rn50):
    """RN50 at 224 px, batch 2 of real photos.

    The pooled output is compared with open_clip fp32 at RTOL. The 2048-channel layer4 map is
    worse conditioned (BN subtracts data-calibrated means: cancellation), so torch fp32 itself is
    ~1e-5 off a float64 run there; it is checked against that float64 oracle to be at most 2x as
    far as torch fp32 is (measured: both 1.0e-5, pooled 2e-6 from open_clip fp32).
    """
    import copy

    ref, sd = rn50
    cfg, embed = PRESETS["RN50"].vision, PRESETS["RN50"].embed_dim
    graphdef, state = _load(cfg, embed, resnet_from_torch(sd, cfg, prefix=""))
    x = _photos(cfg.image_size)
    want_pooled, want_feats = _torch_forward(ref, x)
    _, oracle_feats = _torch_forward(copy.deepcopy(ref).double(), x.astype(np.float64))
    out = _run(graphdef, state, x)
    got, got_feats = out["pooled"], out["features"]
    assert got.shape == (2, embed) and got.dtype == jnp.float32
    _close(got, want_pooled)
    assert got_feats.shape == (2, 7, 7, 2048)
    torch_err = _rel_err(want_feats, oracle_feats)
    assert torch_err < 1e-4
    assert _rel_err(got_feats, oracle_feats) <= 2 * torch_err
    # the outputs depend on the photo far beyond the tolerance, so the comparison is not of constants
    for w in (want_feats, want_pooled):
        assert np.abs(w[0] - w[1]).max() > 0.1 * np.abs(w).max()


@pytest.mark.parity
def test_rn50_keys_round_trip(rn50):
    _, sd = rn50
    cfg = PRESETS["RN50"].vision
    full = {"visual." + k: v for k, v in sd.items()}
    full["text.ignored"] = np.zeros(3)  # keys outside the prefix are not ours
    back = resnet_to_torch(resnet_from_torch(full, cfg), cfg)
    assert set(back) == set("visual." + k for k in sd)
    for k, v in sd.items():
        assert back["visual." + k].dtype == v.dtype, k
        if not k.endswith("num_batches_tracked"):  # torch counted the calibration pass; we export 0
            np.testing.assert_array_equal(back["visual." + k], v, err_msg=k)


@pytest.mark.parametrize("cfg,embed", [(TINY, TINY_EMBED), (PRESETS["RN50"].vision, 1024)])
def test_key_table_matches_module_tree(cfg, embed):
    """The hand-written key table produces exactly the module's state tree (Params + BN stats; paths and shapes)."""
    abstract = nnx.eval_shape(lambda: ModifiedResNet(cfg, embed, rngs=nnx.Rngs(0)))
    want = nnx.state(abstract).to_pure_dict()
    got: dict = {}
    for _, path, shape, kind in key_table(cfg, embed):
        node = got
        for p in path[:-1]:
            node = node.setdefault(p, {})
        jshape = {"conv": lambda s: (s[2], s[3], s[1], s[0]), "linear": lambda s: s[::-1]}.get(kind, lambda s: s)
        node[path[-1]] = jax.ShapeDtypeStruct(jshape(shape), jnp.float32)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert a.shape == b.shape


@pytest.mark.parity
def test_tiny_keys_round_trip_and_export_loads_in_open_clip(tiny, fresh, pixels):
    """clipjax random init -> torch state dict loads strictly into open_clip and gives the same output."""
    import torch
    from open_clip.modified_resnet import ModifiedResNet as TorchResNet

    _, sd, _, _ = tiny
    back = resnet_to_torch(resnet_from_torch(sd, TINY, prefix=""), TINY, prefix="")
    assert set(back) == set(sd)
    for k in sd:
        if not k.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(back[k], sd[k], err_msg=k)

    pure = jax.tree.map(np.array, nnx.state(fresh).to_pure_dict())
    for blocks in (pure["layer1"], pure["layer2"]):  # non-zero residual branches, non-trivial stats
        for blk in blocks.values():
            blk["bn3"]["scale"] = np.full_like(blk["bn3"]["scale"], 0.7)
            blk["bn1"]["var"] = np.full_like(blk["bn1"]["var"], 1.7)
    graphdef, state = _load(TINY, TINY_EMBED, pure)
    exported = resnet_to_torch(pure, TINY, prefix="")
    target = TorchResNet(layers=list(TINY.layers), output_dim=TINY_EMBED, heads=TINY.heads,
                         image_size=TINY.image_size, width=TINY.width).eval()
    target.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
    with torch.no_grad():
        want = target(torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())).numpy()
    _close(_run(graphdef, state, pixels)["pooled"], want)


def _tiny_sd():
    table = key_table(TINY, TINY_EMBED)
    rng = np.random.default_rng(0)
    return {"visual." + k: rng.normal(size=s).astype(np.float32) for k, _, s, _ in table}


def test_missing_key_raises():
    sd = _tiny_sd()
    del sd["visual.layer2.0.downsample.1.running_var"]
    with pytest.raises(ConversionError, match=r"missing key 'visual\.layer2\.0\.downsample\.1\.running_var'"):
        resnet_from_torch(sd, TINY)
    with pytest.raises(ConversionError, match="prefix"):
        resnet_from_torch(_tiny_sd(), TINY, prefix="model.visual.")


def test_extra_key_raises():
    sd = _tiny_sd()
    sd["visual.layer4.1.conv1.weight"] = np.zeros((128, 512, 1, 1), np.float32)
    sd["visual.layer1.0.bn1.num_batches_tracked"] = np.zeros((), np.int64)  # ignored, not "extra"
    with pytest.raises(ConversionError, match=r"unconsumed.*visual\.layer4\.1\.conv1\.weight"):
        resnet_from_torch(sd, TINY)


def test_shape_mismatch_raises():
    sd = _tiny_sd()
    sd["visual.layer1.0.conv2.weight"] = np.zeros((16, 16, 1, 1), np.float32)
    with pytest.raises(ConversionError, match=r"'visual\.layer1\.0\.conv2\.weight'.*got \(16, 16, 1, 1\), "
                                              r"expected \(16, 16, 3, 3\)"):
        resnet_from_torch(sd, TINY)
    sd = _tiny_sd()  # a checkpoint for another config (wider stem) is refused, not silently mis-mapped
    with pytest.raises(ConversionError, match="shape mismatch"):
        resnet_from_torch(sd, VisionConfig(arch="resnet", image_size=64, width=32, layers=(1, 2, 1, 1), heads=4,
                                           mlp_dim=0, pool="attnpool", ln_pre=False))


def test_to_torch_rejects_extra_and_missing_params():
    pure = resnet_from_torch(_tiny_sd(), TINY)
    pure["attnpool"]["extra"] = np.zeros(3)
    with pytest.raises(ConversionError, match="attnpool/extra"):
        resnet_to_torch(pure, TINY)
    pure = resnet_from_torch(_tiny_sd(), TINY)
    del pure["layer2"][1]
    with pytest.raises(ConversionError, match="layer2/1"):
        resnet_to_torch(pure, TINY)


@pytest.mark.parametrize("axes", [dict(data=8), dict(data=2, fsdp=2, tensor=2)])
def test_sharded_forward_equals_unsharded(tiny, mesh8, axes):
    """jit of the public `model(x)` on 8 devices (batch sharded; params too on the 2x2x2 mesh) == unsharded."""
    _, _, graphdef, state = tiny
    mesh = mesh8 if axes == dict(data=8) else make_mesh(**axes)
    x = np.random.default_rng(1).normal(size=(8, TINY.image_size, TINY.image_size, 3)).astype(np.float32)
    want = _run(graphdef, state, x)["pooled"]
    with jax.set_mesh(mesh):
        sharded_state = shard_params(state, mesh)
        xs = jax.device_put(x, batch_sharding(mesh, 4))
        got = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(sharded_state, xs)
    assert got.sharding.num_devices == 8
    _close(got, want)  # measured ~1e-6: sharded and unsharded programs fuse differently


def test_init_follows_open_clip_init_parameters(fresh):
    """Oracle: open_clip `ModifiedResNet.init_parameters` + torch default BN/conv init."""
    model = fresh
    n_params = len(jax.tree.leaves(nnx.state(model, nnx.Param)))
    n_stats = len(jax.tree.leaves(nnx.state(model, nnx.BatchStat)))
    assert len(jax.tree.leaves(nnx.state(model))) == n_params + n_stats  # no other state (e.g. no rng keys)
    n_bn = sum(isinstance(m, BatchNorm) for _, m in nnx.iter_graph(model))
    assert n_bn > 0 and n_stats == 2 * n_bn  # each BatchNorm: running mean and var
    c = TINY.width * 32
    pool = model.attnpool
    for proj in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
        std = float(np.std(np.asarray(proj.kernel[...])))
        assert abs(std / c**-0.5 - 1) < 0.03, std  # >= 16k samples: sampling error ~0.6%
    pos_std = float(np.std(np.asarray(pool.positional_embedding[...])))
    assert abs(pos_std / c**-0.5 - 1) < 0.05
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        for blk in stage:
            np.testing.assert_array_equal(blk.bn3.scale[...], 0.0)  # zero-init last BN of every block
            np.testing.assert_array_equal(blk.bn1.scale[...], 1.0)
            np.testing.assert_array_equal(blk.bn1.var[...], 1.0)
            np.testing.assert_array_equal(blk.bn1.mean[...], 0.0)
            if blk.downsample is not None:
                np.testing.assert_array_equal(blk.downsample.bn.scale[...], 1.0)
    np.testing.assert_array_equal(model.bn3.scale[...], 1.0)  # the stem's bn3 is not zeroed
    k = np.asarray(model.layer4[0].conv2.kernel[...])  # torch kaiming_uniform(a=sqrt(5)): U(+-1/sqrt(fan_in))
    bound = (k.shape[0] * k.shape[1] * k.shape[2]) ** -0.5
    assert np.abs(k).max() <= bound and np.abs(k).max() > 0.95 * bound
    # a fresh model runs and gives finite, input-dependent outputs
    x = np.random.default_rng(0).normal(size=(2, TINY.image_size, TINY.image_size, 3)).astype(np.float32)
    y = np.asarray(_run(*nnx.split(model), x)["pooled"])
    assert np.isfinite(y).all() and np.abs(y[0] - y[1]).max() > 0


def test_param_metadata_and_frozen_stats(tiny):
    _, _, graphdef, state = tiny
    model = nnx.merge(graphdef, state)
    assert model.layer3[0].conv2.kernel.get_metadata()["out_sharding"] == (None, None, "embed", "mlp")
    assert model.conv1.kernel.get_metadata()["out_sharding"] == (None, None, None, "mlp")
    assert model.attnpool.c_proj.kernel.get_metadata()["out_sharding"] == ("embed", "mlp")
    # running statistics are BatchStats, never Params: an optimiser over nnx.Param cannot see them
    assert isinstance(model.bn1.mean, nnx.BatchStat) and not isinstance(model.bn1.mean, nnx.Param)
    assert isinstance(model.bn1.scale, nnx.Param)
    assert model.bn1.var.get_metadata()["out_sharding"] == (None,)
    params = nnx.state(model, nnx.Param).to_pure_dict()
    assert set(params["layer1"][0]["bn1"]) == {"scale", "bias"}
    assert set(nnx.state(model, nnx.BatchStat).to_pure_dict()["layer1"][0]["bn1"]) == {"mean", "var"}

    bn = model.layer2[0].bn2  # gradients through one BN layer (cheap to compile), eval mode
    bn_def, bn_state = nnx.split(bn)  # differentiate w.r.t. the full state, statistics included
    h = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 4, bn.scale.shape[0])), jnp.float32)
    grads = jax.jit(jax.grad(lambda st: jnp.sum(nnx.merge(bn_def, st)(h) ** 2)))(bn_state).to_pure_dict()
    assert np.abs(np.asarray(grads["scale"])).min() > 0  # trainable
    assert np.abs(np.asarray(grads["bias"])).min() > 0
    np.testing.assert_array_equal(grads["mean"], 0.0)  # running stats are buffers: no gradient
    np.testing.assert_array_equal(grads["var"], 0.0)


def test_bfloat16_compute_and_params(tiny, pixels):
    """bf16 compute from fp32 params, and bf16 params (Params and BatchStats stored in bf16) run in bf16, both
    compared in value with fp32 runs: `pooled` within 5e-2 x max|fp32| (bf16 keeps 8 mantissa bits; measured
    2.2e-2 and 1.1e-2). The bf16-param reference is the fp32 run of the same bf16-rounded values (upcast exactly)."""
    _, _, graphdef, state = tiny
    want = _run(graphdef, state, pixels)["pooled"]
    got = _run(graphdef, state, pixels, dtype=jnp.bfloat16)["pooled"]
    assert got.dtype == jnp.bfloat16
    _close(got, want, rtol=5e-2)
    rounded = jax.tree.map(lambda v: np.asarray(jnp.asarray(v, jnp.bfloat16)), state.to_pure_dict())
    abstract = nnx.eval_shape(lambda: ModifiedResNet(TINY, TINY_EMBED, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    bf16_graphdef, bf16_state = nnx.split(abstract)
    bf16_state.replace_by_pure_dict(jax.tree.map(jnp.asarray, rounded))
    dtypes = {v.dtype for v in jax.tree.leaves(bf16_state)}  # Params and BatchStats
    assert dtypes == {jnp.dtype(jnp.bfloat16)}
    got = _run(bf16_graphdef, bf16_state, pixels, dtype=jnp.bfloat16)["pooled"]
    _, state32 = _load(TINY, TINY_EMBED, jax.tree.map(lambda v: v.astype(np.float32), rounded))
    want = _run(graphdef, state32, pixels)["pooled"]
    assert got.dtype == jnp.bfloat16
    print(f"bf16 params rel err {_rel_err(got, want):.2e}")
    _close(got, want, rtol=5e-2)


def test_bad_inputs_raise(tiny):
    _, _, graphdef, state = tiny
    model = nnx.merge(graphdef, state)
    s = TINY.image_size
    with pytest.raises(ValueError, match=r"NHWC \[B, H, W, 3\]"):
        model(jnp.zeros((2, 3, s, s)))  # NCHW by mistake
    with pytest.raises(ValueError, match="image_size=64"):
        model(jnp.zeros((2, 96, 96, 3)))
    with pytest.raises(ValueError, match="image_size=64"):
        model.dense(jnp.zeros((2, 96, 96, 3)), add_pos_embed=True)
    with pytest.raises(ValueError, match="multiples of 32"):
        model.features(jnp.zeros((2, 80, 64, 3)))
    with pytest.raises(ValueError, match="empty"):
        model(jnp.zeros((0, s, s, 3)))
    with pytest.raises(TypeError, match="float"):
        model(jnp.zeros((1, s, s, 3), jnp.uint8))
    with pytest.raises(ValueError, match="arch='resnet'"):
        ModifiedResNet(PRESETS["ViT-B-32"].vision, 512, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="multiple of 32"):
        ModifiedResNet(VisionConfig(arch="resnet", image_size=48, width=16, layers=(1, 1, 1, 1), heads=4,
                                    pool="attnpool"), 32, rngs=nnx.Rngs(0))
