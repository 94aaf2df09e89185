"""ModifiedResNet in train mode (batch-statistics BatchNorm) against open_clip's `ModifiedResNet.train()`.

What is compared, on a tiny tower (layers (1, 1, 1, 1), width 16, 64 px):
- the train-mode output, the running statistics of every BatchNorm after two consecutive train-mode
  calls on different batches (torch momentum 0.1, unbiased variance in the running average), and
  the gradients of a scalar loss w.r.t. every Param (through the batch statistics, as in torch);
- a jitted train-mode forward with the batch sharded over 8 fake CPU devices against the unsharded
  one: the statistics are global-batch statistics (synchronised BatchNorm);
- `clipjax.models.clip.forward(..., train=True)` on a tiny open_clip RN CLIP (converted) against open_clip's
  `.train()` `encode_image` / `encode_text` and the running statistics of every BatchNorm afterwards;
  `split_trainable`; and an Orbax checkpoint round trip of the full state (Params and BatchStats).

Tolerances (fp32, jax matmul precision "highest" from conftest), all as max|got - want| / max|want|
per tensor: outputs and running statistics 1e-5 (measured 3e-6 and 2e-7); gradients 1e-4 (the
backward pass through the batch statistics subtracts nearly equal terms; measured worst 8e-6, the
stem conv1 kernel), except the attention pool's key bias whose exact gradient is zero (softmax shift
invariance): |grad| <= 1e-6 x the largest gradient; sharded vs unsharded 1e-5.
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clipjax.config import CLIPConfig, TextConfig, VisionConfig
from clipjax.convert.resnet_keys import resnet_from_torch
from clipjax.models import clip as F
from clipjax.models.resnet import BatchNorm, ModifiedResNet
from clipjax.sharding import batch_sharding, shard_params

CFG = VisionConfig(arch="resnet", layers=(1, 1, 1, 1), width=16, heads=2, image_size=64, pool="attnpool",
                   ln_pre=False, mlp_dim=0)
EMBED = 32
RTOL = 1e-5  # outputs, running statistics, sharded vs unsharded
GRAD_RTOL = 1e-4  # gradients
OPENAI_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
OPENAI_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def _rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    scale = np.abs(want).max()
    assert scale > 0
    return float(np.abs(got - want).max() / scale)


def _close(got, want, rtol=RTOL, what=""):
    err = _rel_err(got, want)
    assert err <= rtol, f"{what}: max abs err / max|want| = {err:.3e} > {rtol}"


def _flat(tree: dict, prefix: tuple = ()) -> dict[tuple, object]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _photos(photos, size: int) -> np.ndarray:
    """Real photos centre-cropped, nearest-resized to `size`, OpenAI-normalised: `[N, S, S, 3]` float32."""
    out = []
    for img in photos:
        h, w = img.shape[:2]
        s = min(h, w)
        img = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
        idx = (np.arange(size) * s / size).astype(int)
        out.append(img[idx][:, idx])
    return ((np.stack(out).astype(np.float32) / 255.0 - OPENAI_MEAN) / OPENAI_STD).astype(np.float32)


def _nchw(x):
    import torch

    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _load(pure: dict):
    """(graphdef, full state) of a clipjax tower holding `pure` (shapes from eval_shape)."""
    abstract = nnx.eval_shape(lambda: ModifiedResNet(CFG, EMBED, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    state.replace_by_pure_dict(jax.tree.map(jnp.asarray, pure))
    return graphdef, state


def _random_pure(abstract: nnx.State, seed: int) -> dict:
    """numpy random values for every leaf (no jax random init: threefry kernels take long to compile on CPU).

    BN variances in [0.5, 1.5), BN scales in [0.5, 1.5) (non-zero residual branches), the rest N(0, 0.1^2).
    """
    rng = np.random.default_rng(seed)

    def one(path, a):
        name = str(path[-1].key)
        if name == "var" or (name == "scale" and a.ndim == 1 and "bn" in str(path[-2].key)):
            return (rng.random(a.shape) + 0.5).astype(a.dtype)
        if name == "log_logit_scale":
            return np.asarray(np.log(1 / 0.07), a.dtype)
        return (0.1 * rng.normal(size=a.shape)).astype(a.dtype)

    return jax.tree_util.tree_map_with_path(one, abstract.to_pure_dict())


def _random_tower(seed: int):
    """(graphdef, full state) of a tiny tower with random weights and statistics."""
    abstract = nnx.eval_shape(lambda: ModifiedResNet(CFG, EMBED, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    state.replace_by_pure_dict(jax.tree.map(jnp.asarray, _random_pure(state, seed)))
    return graphdef, state


def _train_step(graphdef):
    """jitted `(params, stats, x, w) -> (out, new_stats, grads, eval_out)`.

    `out`, `new_stats`, `grads`: train mode, loss `sum(model(x, train=True) * w)`; `eval_out`:
    `model(x)` in eval mode with the input `stats` (one compiled program serves every check).
    """

    def loss(params, stats, x, w):
        model = nnx.merge(graphdef, params, stats)
        y = model(x, train=True)
        return jnp.sum(y * w), (y, nnx.state(model, nnx.BatchStat))

    @jax.jit
    def step(params, stats, x, w):
        (_, (y, new_stats)), grads = jax.value_and_grad(loss, has_aux=True)(params, stats, x, w)
        return y, new_stats, grads, nnx.merge(graphdef, params, stats)(x)

    return step


@pytest.fixture(scope="module")
def torch_tower():
    """A torch ModifiedResNet with random BN affine params and running statistics, and its numpy state dict."""
    import torch
    import open_clip  # noqa: F401
    from open_clip.modified_resnet import ModifiedResNet as TorchResNet

    torch.manual_seed(0)
    ref = TorchResNet(layers=list(CFG.layers), output_dim=EMBED, heads=CFG.heads, image_size=CFG.image_size,
                      width=CFG.width)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # bn3 starts at zero in open_clip: that would zero most conv gradients
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    sd = {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}
    return ref, sd


@pytest.mark.parity
def test_train_mode_matches_torch(torch_tower, photos):
    """Two train-mode steps: outputs, gradients of every Param, running statistics of every BN."""
    import torch

    ref, sd = torch_tower
    ref = copy.deepcopy(ref).train()  # the fixture module stays untouched
    x1 = _photos(photos, CFG.image_size)  # 4 real photos
    x2 = np.random.default_rng(0).normal(size=(4, CFG.image_size, CFG.image_size, 3)).astype(np.float32)
    w = np.random.default_rng(1).normal(size=(4, EMBED)).astype(np.float32)

    # torch: step 1 with gradients, step 2 forward only (both update the running statistics)
    y1_t = ref(_nchw(x1))
    (y1_t * torch.from_numpy(w)).sum().backward()
    named = dict(ref.named_parameters())
    grads_sd = {k: (named[k].grad.numpy() if k in named else np.zeros_like(v)) for k, v in sd.items()}
    with torch.no_grad():
        y2_t = ref(_nchw(x2)).numpy()
    stats_t = {k: v.detach().numpy() for k, v in ref.state_dict().items()}

    graphdef, state = _load(resnet_from_torch(sd, CFG, prefix=""))
    params, stats = nnx.split_state(state, nnx.Param, nnx.BatchStat)
    step = _train_step(graphdef)
    y1, stats1, grads, _ = step(params, stats, x1, w)
    y2, stats2, _, _ = step(params, stats1, x2, w)

    _close(y1, y1_t.detach().numpy(), what="output 1")
    _close(y2, y2_t, what="output 2")
    print(f"output rel err {_rel_err(y1, y1_t.detach().numpy()):.2e} {_rel_err(y2, y2_t):.2e}")
    # every Param has a torch gradient; mapped to clipjax layout by the same key table as the weights
    want_grads = _flat(resnet_from_torch(grads_sd, CFG, prefix=""))
    got_grads = _flat(grads.to_pure_dict())
    assert set(got_grads) == {k for k in want_grads if k[-1] not in ("mean", "var")}
    # softmax ignores a shift shared by all logits, so the key bias has an exactly-zero gradient
    # (torch and clipjax both give float32 rounding noise): checked against the overall gradient scale
    zero = ("attnpool", "k_proj", "bias")
    scale = max(np.abs(v).max() for v in want_grads.values())
    assert np.abs(np.asarray(got_grads.pop(zero))).max() <= 1e-6 * scale
    errs = {}
    for k, g in got_grads.items():
        assert np.abs(want_grads[k]).max() > 1e-6 * scale, k  # every other gradient is non-trivial
        errs[k] = _rel_err(g, want_grads[k])
    worst = max(errs, key=errs.get)
    assert errs[worst] <= GRAD_RTOL, f"grad {'/'.join(map(str, worst))}: rel err {errs[worst]:.3e} > {GRAD_RTOL}"
    print(f"worst grad rel err {errs[worst]:.2e} ({'/'.join(map(str, worst))})")
    # running statistics after the two steps, every BN
    want_stats = _flat(resnet_from_torch(stats_t, CFG, prefix=""))
    got_stats = _flat(stats2.to_pure_dict())
    n_bn = sum(isinstance(m, BatchNorm) for _, m in nnx.iter_graph(nnx.merge(graphdef, state)))
    assert len(got_stats) == 2 * n_bn == 2 * sum(k.endswith("running_var") for k in sd)
    init_stats = _flat(stats.to_pure_dict())
    print(f"worst stat rel err {max(_rel_err(v, want_stats[k]) for k, v in got_stats.items()):.2e}")
    for k, v in got_stats.items():
        _close(v, want_stats[k], what="stat " + "/".join(map(str, k)))
        assert np.abs(np.asarray(v) - np.asarray(init_stats[k])).max() > 1e-3, k  # the stats did move
    # the trained statistics then drive eval mode exactly like torch .eval()
    ref.eval()
    with torch.no_grad():
        want_eval = ref(_nchw(x2)).numpy()
    got_eval = step(params, stats2, x2, w)[3]
    _close(got_eval, want_eval, what="eval after training")


def test_eval_mode_unchanged_and_does_not_touch_stats():
    """`train=False` (default) uses the running statistics and leaves them as they are."""
    bn = BatchNorm(8, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    bn.scale[...] = jnp.linspace(0.5, 1.5, 8)
    bn.bias[...] = jnp.linspace(-0.3, 0.3, 8)
    bn.mean[...] = jnp.linspace(-1, 1, bn.mean.shape[0])
    bn.var[...] = jnp.linspace(0.5, 2, bn.var.shape[0])
    h = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 4, bn.mean.shape[0])), jnp.float32)
    before = jax.tree.map(np.array, nnx.state(bn, nnx.BatchStat).to_pure_dict())
    want = (h - before["mean"]) / np.sqrt(before["var"] + 1e-5) * bn.scale[...] + bn.bias[...]
    _close(bn(h), want, 1e-6)
    _close(bn(h, train=False), want, 1e-6)
    after = nnx.state(bn, nnx.BatchStat).to_pure_dict()
    for k in before:
        np.testing.assert_array_equal(after[k], before[k])
    # statistics passed to jax.grad but not differentiated (their Variables belong to the outer trace):
    # the train-mode update still comes out, and equals the one with the statistics differentiated too
    g, p, st = nnx.split(bn, nnx.Param, nnx.BatchStat)

    def loss(p, st):
        m = nnx.merge(g, p, st)
        return jnp.sum(m(h, train=True) ** 2), nnx.state(m, nnx.BatchStat)

    gp, new = jax.jit(jax.grad(loss, has_aux=True))(p, st)
    (gp2, _), new2 = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(p, st)
    hm = np.asarray(h, np.float64).reshape(-1, 8)
    want_mean = 0.9 * before["mean"] + 0.1 * hm.mean(0)
    want_var = 0.9 * before["var"] + 0.1 * hm.var(0, ddof=1)
    for stats_out in (new, new2):
        assert isinstance(stats_out["mean"], nnx.BatchStat)
        assert stats_out["var"].get_metadata()["out_sharding"] == (None,)
        _close(stats_out["mean"][...], want_mean, 1e-6)
        _close(stats_out["var"][...], want_var, 1e-6)
    for k in ("scale", "bias"):
        np.testing.assert_allclose(gp[k][...], gp2[k][...], rtol=1e-6)
    np.testing.assert_array_equal(st["mean"][...], before["mean"])  # the caller's statistics are untouched
    # train mode on a single value per channel is undefined (torch raises too)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn(h[:1, :1, :1], train=True)


def test_sharded_train_forward_is_global_batch_norm(mesh8):
    """Batch sharded over 8 devices (1 image each): same outputs and stats as unsharded (SyncBatchNorm)."""
    graphdef, state = _random_tower(4)
    x = np.random.default_rng(2).normal(size=(8, CFG.image_size, CFG.image_size, 3)).astype(np.float32)

    def fwd(s, x):
        m = nnx.merge(graphdef, s)
        y = m(x, train=True)
        return y, nnx.state(m, nnx.BatchStat)

    want_y, want_stats = jax.jit(fwd)(state, x)
    with jax.set_mesh(mesh8):
        sstate = shard_params(state, mesh8)
        xs = jax.device_put(x, batch_sharding(mesh8, 4))
        compiled = jax.jit(fwd).lower(sstate, xs).compile()
        got_y, got_stats = compiled(sstate, xs)
    assert got_y.sharding.num_devices == 8
    assert "all-reduce" in compiled.as_text()  # statistics reduced across the devices
    _close(got_y, want_y)
    got, want = _flat(got_stats.to_pure_dict()), _flat(want_stats.to_pure_dict())
    assert set(got) == set(want) and len(got) > 0
    for k in want:
        _close(got[k], want[k], what="/".join(map(str, k)))


TINY_CLIP = CLIPConfig(embed_dim=EMBED, vision=CFG,
                       text=TextConfig(context_length=8, vocab_size=64, width=32, heads=2, layers=1, mlp_dim=64,
                                       eos_id=63))


# a tiny open_clip CLIP with a ModifiedResNet image tower (heads = width * 32 / head_width = 2)
OPEN_CLIP_RN = dict(embed_dim=EMBED,
                    vision_cfg=dict(layers=list(CFG.layers), width=CFG.width, image_size=CFG.image_size,
                                    head_width=CFG.width * 32 // CFG.heads),
                    text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1))


@pytest.mark.parity
def test_clip_forward_train_matches_open_clip(tmp_path, photos):
    """`clip.forward(..., train=True)` on a converted open_clip RN CLIP against open_clip's `.train()` forward.

    Reference: `open_clip.CLIP(**OPEN_CLIP_RN)` with random BN affine params / running statistics and attention
    biases (`helpers.open_clip_and_clipjax(randomise=True)`), converted with `load_pytorch`. After one train-mode
    pass on 4 real photos: image and text embeddings (`encode_image` / `encode_text`, normalised) and every
    BatchNorm's running mean and variance (torch momentum 0.1, unbiased variance) agree to 1e-5 x max|torch|;
    the statistics moved (> 1e-3) from their starting values. Also: `split_trainable` puts every BN statistic in
    the BatchStat part and every other leaf in the Param part.
    """
    import open_clip
    import torch
    from helpers import open_clip_and_clipjax

    tm, model = open_clip_and_clipjax(tmp_path, OPEN_CLIP_RN, randomise=True)
    cfg = model.config
    assert cfg.vision.layers == CFG.layers and cfg.vision.heads == CFG.heads and cfg.vision.arch == "resnet"
    state = model.params
    params, stats = F.split_trainable(state)
    flat_p = _flat(params.to_pure_dict())
    flat_s = _flat(stats.to_pure_dict())
    assert not any(k[-1] in ("mean", "var") and k[0] == "visual" for k in flat_p)  # no BN statistic is trainable
    is_var = lambda v: isinstance(v, nnx.Variable)  # noqa: E731
    assert all(isinstance(v, nnx.Param) for v in jax.tree.leaves(params, is_leaf=is_var))
    assert all(isinstance(v, nnx.BatchStat) for v in jax.tree.leaves(stats, is_leaf=is_var))
    assert flat_s and all(k[0] == "visual" and k[-1] in ("mean", "var") for k in flat_s)
    assert len(flat_p) + len(flat_s) == len(_flat(state.to_pure_dict()))

    pixels = _photos(photos, cfg.vision.image_size)  # 4 real photos, [4, 64, 64, 3]
    captions = ["an astronaut", "a ginger cat on a blanket", "a cup of coffee", "a rocket on the launch pad"]
    ids = open_clip.tokenize(captions)
    tm.train()
    with torch.no_grad():
        want_img = tm.encode_image(_nchw(pixels), normalize=True).numpy()
        want_txt = tm.encode_text(ids, normalize=True).numpy()
    want_stats = _flat(resnet_from_torch({k: v.detach().numpy() for k, v in tm.state_dict().items()}, cfg.vision))

    @jax.jit
    def run(params, stats, pixels, ids):
        return F.forward(F.merge_state(params, stats), pixels, ids, config=cfg, train=True)

    out = run(params, stats, pixels, ids.numpy().astype(np.int32))
    _close(out["image"], want_img, what="image embeddings")
    _close(out["text"], want_txt, what="text embeddings")
    new = _flat(out["batch_stats"].to_pure_dict())
    assert set(new) == set(flat_s)
    assert len(new) == 2 * sum(isinstance(m, torch.nn.BatchNorm2d) for m in tm.visual.modules())
    for k, v in new.items():
        _close(v, want_stats[k[1:]], what="stat " + "/".join(map(str, k)))
        assert np.abs(np.asarray(v) - np.asarray(flat_s[k])).max() > 1e-3, k  # the statistics did move
    assert all(isinstance(v, nnx.BatchStat) for v in jax.tree.leaves(out["batch_stats"], is_leaf=is_var))


def test_rn_checkpoint_round_trip(tmp_path):
    """Save (pure dict, the converter's path) -> load: BN statistics come back as BatchStats, same values."""
    from clipjax import checkpoint

    cfg = TINY_CLIP
    pure = _random_pure(F.abstract_params(cfg), 1)  # non-default statistics, so a lost value would show
    assert pure["visual"]["bn1"].keys() >= {"mean", "var", "scale", "bias"}  # the stored layout is unchanged
    checkpoint.save(str(tmp_path / "pure"), cfg, pure)
    checkpoint.save(str(tmp_path / "state"), cfg, checkpoint.pure_to_params(pure, cfg))
    for name in ("pure", "state"):
        model = checkpoint.load(str(tmp_path / name))
        loaded = model.params
        got = _flat(jax.tree.map(np.asarray, loaded.to_pure_dict()))
        want = _flat(pure)
        assert set(got) == set(want)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=str(k))
        assert isinstance(loaded["visual"]["bn1"]["mean"], nnx.BatchStat)
        assert isinstance(loaded["visual"]["bn1"]["scale"], nnx.Param)
