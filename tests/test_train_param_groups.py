"""Param masks and multiplier trees (clipjax.train.param_groups) against open_clip's own rules."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import clipjax
from clipjax.models.clip import abstract_params
from clipjax.train import param_groups as pg


def _is_var(x):
    return isinstance(x, nnx.Variable)


def _tiny_vit(**kw):
    cfg = clipjax.get_config("ViT-B-32")
    return cfg.replace(embed_dim=16,
                       vision=dataclasses.replace(cfg.vision, image_size=32, patch_size=16, width=32, layers=3,
                                                  heads=2, mlp_dim=64),
                       text=dataclasses.replace(cfg.text, width=32, heads=2, layers=2, mlp_dim=64, vocab_size=50,
                                                context_length=8), **kw)


def _tiny_rn():
    cfg = clipjax.get_config("RN50")
    return cfg.replace(embed_dim=16, vision=dataclasses.replace(cfg.vision, layers=(2, 1, 1, 1), width=8,
                                                                image_size=64, heads=2),
                       text=dataclasses.replace(cfg.text, width=32, heads=2, layers=2, mlp_dim=64, vocab_size=50,
                                                context_length=8))


def _flat(tree):
    """`{dotted name: value}` of a tree shaped like params."""
    return dict(zip(jax.tree.leaves(pg.param_names(tree)), jax.tree.leaves(tree)))


def _is_stat(name):
    parts = name.split(".")
    return parts[-1] in ("mean", "var") and parts[-2].startswith("bn")


def _units(params):
    """Every trainable param of clipjax as `(name, layer)`: stacked leaves expand to one unit per layer."""
    out = set()
    shapes = {n: np.shape(v.get_value()) for n, v in zip(
        jax.tree.leaves(pg.param_names(params)), jax.tree.leaves(params, is_leaf=_is_var))}
    for name, shape in shapes.items():
        if _is_stat(name):
            continue
        if ".transformer.blocks." in name:
            out.update((name, i) for i in range(shape[0]))
        else:
            out.add((name, None))
    return out


def _unit_values(tree, config):
    """`{(name, layer): value}`; a scalar on a stacked leaf (decay mask) applies to every layer."""
    n_layers = {"visual": config.vision.layers, "text": config.text.layers}
    out = {}
    for name, value in _flat(tree).items():
        a = np.asarray(value)
        if ".transformer.blocks." in name:
            layers = n_layers[name.split(".")[0]]
            if a.ndim:  # per-layer [layers, 1, ..., 1]
                assert a.shape == (layers,) + (1,) * (a.ndim - 1), (name, a.shape)
            out.update({(name, i): np.broadcast_to(a.reshape(-1), (layers,))[i].item() for i in range(layers)})
        else:
            out[(name, None)] = a.item()
    return out


# ----------------------------------------------------------------------------- open_clip models


def _open_clip():
    import torch
    import open_clip
    return torch, open_clip


def _oc_vit():
    _, open_clip = _open_clip()
    return open_clip.model.CLIP(embed_dim=32, vision_cfg=dict(layers=3, width=64, patch_size=16, image_size=32),
                                text_cfg=dict(context_length=8, vocab_size=64, width=64, heads=1, layers=3))


def _oc_siglip(monkeypatch):
    """open_clip's ViT-B-16-SigLIP construction (timm trunk, MAP pool, no proj), shrunk via timm kwargs."""
    _, open_clip = _open_clip()
    import timm
    cfg = open_clip.get_model_config("ViT-B-16-SigLIP")
    monkeypatch.setattr(timm, "create_model", functools.partial(timm.create_model, embed_dim=64, depth=3,
                                                                num_heads=1, img_size=32))
    text = dict(cfg["text_cfg"], width=64, heads=1, layers=2, vocab_size=64, context_length=8)
    model = open_clip.model.CustomTextCLIP(embed_dim=64, vision_cfg=dict(cfg["vision_cfg"], image_size=32),
                                           text_cfg=text, init_logit_bias=cfg["init_logit_bias"])
    assert type(model.visual).__name__ == "TimmModel" and len(model.visual.trunk.blocks) == 3
    return model


def _oc_coca():
    """open_clip's CoCa (attentional pooler, appended text cls token, LayerScale in the text tower), small.
    The text decoder's params have no clipjax counterpart and are left out of every comparison."""
    _, open_clip = _open_clip()
    return open_clip.CoCa(
        embed_dim=32, vision_cfg=dict(layers=3, width=64, patch_size=16, image_size=32, attentional_pool=True,
                                      attn_pooler_heads=2, output_tokens=True),
        text_cfg=dict(context_length=8, vocab_size=64, width=64, heads=1, layers=3, embed_cls=True,
                      output_tokens=True, ls_init_value=0.1),
        multimodal_cfg=dict(context_length=8, vocab_size=64, width=64, heads=1, layers=1))


@functools.lru_cache(maxsize=1)
def _oc_rn50():
    """The real RN50 (built once: ~3 s); tests reset `requires_grad` before locking it."""
    _, open_clip = _open_clip()
    return open_clip.create_model("RN50", pretrained=None)


def _clipjax_side(model):
    """`(config, params, {torch param name: [(clipjax name, layer or None)]})` for an open_clip model."""
    from clipjax.convert.core import detect_family, infer_config, rules_for
    from clipjax.convert.resnet_keys import key_table

    sd = {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in model.state_dict().items()}
    family = detect_family(sd)
    config = infer_config(sd, family)
    table = {}
    for r in rules_for(config, family, sd):
        for i in range(r.layers) if r.layers else [None]:
            table[r.source.format(i=i) if r.layers else r.source] = [(t, i) for t in r.targets]
    if family == "openai_rn":
        for tkey, path, _, _ in key_table(config.vision, config.embed_dim):
            table["visual." + tkey] = [("visual." + ".".join(map(str, path)), None)]
    return config, abstract_params(config), table


def _mapped(model, table, pred):
    """clipjax units of the torch params `n, p` with `pred(n, p)`."""
    return {u for n, p in _named(model) if pred(n, p) for u in table[n]}


def _named(model):
    return [(n, p) for n, p in model.named_parameters() if not n.startswith("text_decoder.")]


BUILDERS = {"vit": lambda mp: _oc_vit(), "siglip": _oc_siglip, "rn50": lambda mp: _oc_rn50(),
            "coca": lambda mp: _oc_coca()}


@pytest.mark.parity
@pytest.mark.parametrize("arch", list(BUILDERS))
def test_decay_mask_matches_open_clip(arch, monkeypatch):
    model = BUILDERS[arch](monkeypatch)
    config, params, table = _clipjax_side(model)
    # verbatim from open_clip_train/main.py (open_clip_torch 3.3.0)
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or 'logit_scale' in n  # noqa: E731
    include = lambda n, p: not exclude(n, p)  # noqa: E731

    units = _units(params)
    assert _mapped(model, table, lambda n, p: True) == units  # the key table covers every param both ways
    got = _unit_values(pg.decay_mask(params), config)
    assert {u for u in units if not got[u]} == _mapped(model, table, exclude)
    assert {u for u in units if got[u]} == _mapped(model, table, include)
    stats = [v for n, v in _flat(pg.decay_mask(params)).items() if _is_stat(n)]
    assert not any(stats)
    # spot checks of the open_clip rule's less obvious outcomes
    flat = _flat(pg.decay_mask(params))
    assert flat["text.pos_embed"] and flat["text.token_embed"]
    if arch == "vit":
        assert flat["visual.pos_embed"] and not flat["visual.class_embedding"]
        assert flat["visual.transformer.blocks.attn.q_kernel"] and not flat["visual.transformer.blocks.attn.q_bias"]
    if arch == "siglip":
        assert flat["visual.map_head.probe"] and not flat["logit_bias"]


def _oc_trainable(model, table):
    return {u: float(p.requires_grad) for n, p in _named(model) for u in table[n]}


def _reset(model):
    for p in model.parameters():
        p.requires_grad_(True)


@pytest.mark.parity
@pytest.mark.filterwarnings("ignore:Importing from timm.models.helpers:FutureWarning")
@pytest.mark.parametrize("arch", list(BUILDERS))
def test_trainable_mask_matches_open_clip(arch, monkeypatch):
    model = BUILDERS[arch](monkeypatch)
    config, params, table = _clipjax_side(model)
    n_img = 6 if arch == "rn50" else config.vision.layers + 2
    n_txt = config.text.layers + 2
    image_opts = [0] if arch == "rn50" else [0, 1, 2, n_img - 1, n_img, n_img + 3]
    combos = ([dict(lock_image=True, lock_image_unlocked_groups=g) for g in image_opts]
              + [dict(lock_text=True, lock_text_unlocked_layers=k) for k in (0, 1, 2, n_txt - 1, n_txt, n_txt + 4)]
              + [dict(lock_image=True, lock_image_unlocked_groups=0 if arch == "rn50" else 2,
                      lock_text=True, lock_text_unlocked_layers=2), {}])
    for kw in combos:
        _reset(model)
        # (CoCa has no model-level lock methods: its towers' own `lock`, which those methods call)
        if kw.get("lock_image"):
            getattr(model, "lock_image_tower", model.visual.lock)(unlocked_groups=kw["lock_image_unlocked_groups"])
        if kw.get("lock_text"):
            text_lock = model.text.lock if arch == "coca" else model.lock_text_tower
            text_lock(unlocked_layers=kw["lock_text_unlocked_layers"])
        mask = pg.trainable_mask(params, config, **kw)
        got = _unit_values(mask, config)
        want = _oc_trainable(model, table)
        diff = sorted((u, got[u], w) for u, w in want.items() if got[u] != w)
        assert not diff, f"{arch} {kw}: {diff[:6]}"
        if kw.get("lock_text_unlocked_layers") == 2:  # a partial unlock: both values occur
            assert {got[u] for u in want if u[0].startswith("text.")} == {0.0, 1.0}
        assert set(got) - set(want) == {u for u in got if _is_stat(u[0])}
        stats = [v for n, v in _flat(mask).items() if _is_stat(n)]
        assert all(np.all(np.asarray(v) == 0) for v in stats)
    if arch == "rn50":  # open_clip 3.3.0 has no partial ResNet locking; clipjax's groups are an extension
        _reset(model)
        with pytest.raises(AssertionError):
            model.lock_image_tower(unlocked_groups=1)


@pytest.fixture(scope="module")
def vit_params():
    """Random params of the tiny ViT, materialised on the host (no init compile)."""
    cfg = _tiny_vit()
    rng = np.random.default_rng(0)
    return cfg, jax.tree.map(lambda v: v.replace(rng.standard_normal(v.shape).astype(np.float32)),
                             abstract_params(cfg), is_leaf=_is_var)


def test_param_names_and_structure(vit_params):
    cfg, params = vit_params
    names = pg.param_names(params)
    assert jax.tree.structure(names) == jax.tree.structure(params)
    flat = jax.tree.leaves(names)
    assert "visual.transformer.blocks.attn.q_kernel" in flat and "text.token_embed" in flat
    assert "log_logit_scale" in flat
    for tree in (pg.decay_mask(params), pg.trainable_mask(params, cfg, lock_image=True),
                 pg.layer_decay_multipliers(params, cfg, 0.5)):
        assert jax.tree.structure(tree) == jax.tree.structure(params)
        jax.tree.map(lambda p, m: np.broadcast_shapes(np.shape(p), np.shape(m)), params, tree)
    # shape convention: [layers, 1, ..., 1] for stacked leaves, scalars otherwise
    mult = _flat(pg.layer_decay_multipliers(params, cfg, 0.5))
    assert mult["visual.transformer.blocks.attn.q_kernel"].shape == (3, 1, 1, 1)
    assert mult["text.transformer.blocks.mlp.fc1.bias"].shape == (2, 1)
    assert mult["visual.proj"].shape == () and mult["visual.proj"].dtype == np.float32
    # abstract params give the same trees
    abstract = _flat(pg.layer_decay_multipliers(abstract_params(cfg), cfg, 0.5))
    assert abstract.keys() == mult.keys() and all(np.array_equal(abstract[n], mult[n]) for n in mult)


def _ld_oracle(name, cfg, decay, n_layers=None):
    """float64 layer-decay oracle written from the definition."""
    if name in ("log_logit_scale", "logit_bias"):
        return np.float64(1.0)
    tower, first = name.split(".")[:2]
    if tower == "visual" and cfg.vision.arch == "resnet":
        stage = {"layer1": 1, "layer2": 2, "layer3": 3, "layer4": 4, "attnpool": 5}.get(first, 0)
        return np.float64(decay) ** (5 - stage)
    depth = cfg.vision.layers if tower == "visual" else cfg.text.layers
    if first == "transformer":
        ids = np.arange(n_layers, dtype=np.float64) + 1
    elif first in ("patch_kernel", "patch_bias", "class_embedding", "pos_embed", "ln_pre", "token_embed"):
        ids = 0.0
    else:
        ids = depth + 1.0
    return np.float64(decay) ** (depth + 1 - ids)


@pytest.mark.parametrize("make", [_tiny_vit, _tiny_rn, lambda: clipjax.get_config("ViT-B-16-SigLIP")])
def test_layer_decay_multipliers(make):
    cfg = make()
    params = abstract_params(cfg)
    shapes = dict(zip(jax.tree.leaves(pg.param_names(params)),
                      (np.shape(v.get_value()) for v in jax.tree.leaves(params, is_leaf=_is_var))))
    for decay in (0.65, 1.0):
        got = _flat(pg.layer_decay_multipliers(params, cfg, decay))
        for name, value in got.items():
            want = _ld_oracle(name, cfg, decay, shapes[name][0] if ".transformer.blocks." in name else None)
            assert value.dtype == np.float32
            np.testing.assert_allclose(np.asarray(value).reshape(-1), np.reshape(want, -1), rtol=1e-6,
                                       err_msg=name)
            if decay == 1.0:
                assert np.all(value == 1.0)
    got = _flat(pg.layer_decay_multipliers(params, cfg, 0.5))
    if cfg.vision.arch == "vit":
        L = cfg.vision.layers
        assert got["visual.pos_embed"] == np.float32(0.5 ** (L + 1)) and got["visual.ln_post.scale"] == 1.0


def test_bn_stats_present_or_absent():
    cfg = _tiny_rn()
    full = nnx.state(nnx.eval_shape(lambda: clipjax.models.clip.CLIP(cfg, rngs=nnx.Rngs(0))))
    no_stats = nnx.filter_state(full, lambda path, v: not _is_stat(".".join(map(str, path))))
    n_stats = sum(_is_stat(n) for n in jax.tree.leaves(pg.param_names(full)))
    assert n_stats > 0 and not any(_is_stat(n) for n in jax.tree.leaves(pg.param_names(no_stats)))
    for params in (full, no_stats):
        decay = _flat(pg.decay_mask(params))
        train = _flat(pg.trainable_mask(params, cfg))
        assert all(not decay[n] and train[n] == 0 for n in decay if _is_stat(n))
        assert decay["visual.layer1.0.conv1.kernel"] and not decay["visual.layer1.0.bn1.scale"]
        assert train["visual.attnpool.c_proj.kernel"] == 1.0 and train["visual.bn1.scale"] == 1.0
    # a BatchStat-typed leaf is never trained, whatever its name
    stat = nnx.BatchStat(jnp.zeros(3))
    state = nnx.State({"visual": {"layer1": {"running": stat}}})
    assert not jax.tree.leaves(pg.decay_mask(state))[0]


def test_resnet_groups_extension_and_no_text_proj():
    cfg = _tiny_rn()
    params = abstract_params(cfg)
    for k in range(8):
        got = _flat(pg.trainable_mask(params, cfg, lock_image=True, lock_image_unlocked_groups=k))
        for name, v in got.items():
            if name.startswith("visual.") and not _is_stat(name):
                stage = {"layer1": 1, "layer2": 2, "layer3": 3, "layer4": 4, "attnpool": 5}.get(name.split(".")[1], 0)
                assert v == float(stage >= 6 - k), (k, name)
            elif not _is_stat(name):
                assert np.all(np.asarray(v) == 1.0)
    # text tower without projection: the last group is [last block, ln_final] (open_clip skips proj)
    vcfg = _tiny_vit()
    vcfg = vcfg.replace(embed_dim=32, text_proj=False, vision_proj=False)
    params = abstract_params(vcfg)
    got = _flat(pg.trainable_mask(params, vcfg, lock_text=True, lock_text_unlocked_layers=1))
    assert got["text.ln_final.scale"] == 1.0 and got["text.token_embed"] == 0.0
    assert np.asarray(got["text.transformer.blocks.ln1.scale"]).reshape(-1).tolist() == [0.0, 1.0]
    img = _flat(pg.trainable_mask(params, vcfg, lock_image=True, lock_image_unlocked_groups=1))
    assert np.all(np.asarray(img["visual.ln_post.scale"]) == 0.0)  # group 1 is the (absent) proj
    with pytest.raises(ValueError, match=">= 0"):
        pg.trainable_mask(params, vcfg, lock_text=True, lock_text_unlocked_layers=-1)
    with pytest.raises(ValueError, match="stacked layers"):
        pg.layer_decay_multipliers(params, vcfg.replace(text=dataclasses.replace(vcfg.text, layers=5)), 0.9)


def test_scale_by_tree_and_optax_masks(vit_params):
    cfg, params = vit_params
    mult = pg.layer_decay_multipliers(params, cfg, 0.5)
    decay = pg.decay_mask(params)
    train = pg.trainable_mask(params, cfg, lock_image=True, lock_image_unlocked_groups=1)
    tx = pg.scale_by_tree(mult)
    masked = optax.masked(pg.scale_by_tree(mult), decay)
    wd = optax.add_decayed_weights(0.1, mask=decay)
    chain = optax.chain(pg.scale_by_tree(train), optax.adamw(1e-3, mask=decay), pg.scale_by_tree(train))
    assert tx.init(params) == optax.EmptyState()

    @jax.jit  # one compile for all the transformations
    def run(params):
        grads = jax.tree.map(jnp.ones_like, params)
        bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), grads)
        return (tx.update(grads, tx.init(params)), tx.update(bf16, optax.EmptyState())[0],
                masked.update(grads, masked.init(params), params)[0],
                wd.update(jax.tree.map(jnp.zeros_like, params), wd.init(params), params)[0],
                chain.update(grads, chain.init(params), params)[0])

    (scaled, state), scaled_bf16, upd_masked, upd_wd, upd_chain = run(params)
    assert state == optax.EmptyState()
    for g, m in zip(jax.tree.leaves(scaled), jax.tree.leaves(mult)):
        np.testing.assert_array_equal(g, np.broadcast_to(m, g.shape))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(scaled_bf16))
    # inside optax.masked, masked-out leaves pass through
    flat_u = _flat(upd_masked)
    assert np.all(flat_u["visual.ln_post.scale"] == 1.0)
    np.testing.assert_array_equal(flat_u["visual.patch_kernel"], np.full((16, 16, 3, 32), 0.5**4, np.float32))
    # the decay mask drives optax weight decay leaf for leaf (zero grads: update = wd * p where decayed)
    for (name, u), p, d in zip(_flat(upd_wd).items(), jax.tree.leaves(params), jax.tree.leaves(decay)):
        np.testing.assert_allclose(u, 0.1 * p if d else np.zeros_like(p), err_msg=name)
    # frozen params get zero updates when the trainable mask scales the chain
    flat_u = _flat(upd_chain)
    assert np.all(flat_u["visual.transformer.blocks.attn.q_kernel"] == 0)
    assert np.all(flat_u["visual.proj"] != 0) and np.all(flat_u["text.token_embed"] != 0)
