"""3 train steps on 8 fake CPU devices equal the single-device steps (loss and params).

Meshes (data=8), (data=4, fsdp=2) and (data=2, fsdp=2, tensor=2): params, Adam moments and EMA
are placed by the logical-axis rules, the batch is split over ("data", "fsdp"), the loss runs as
its shard_map version. Tolerances (fp32, `highest` matmul precision): loss 1e-5 relative; params
1% of the learning rate absolute (see test_train_parity.py for why Adam needs an lr-scaled bound).
"""

import dataclasses

import jax
import numpy as np
import pytest

import clipjax
from clipjax.models.clip import abstract_params, split_trainable
from clipjax.sharding import make_mesh
from clipjax.train.config import TrainConfig
from clipjax.train.optim import make_optimizer
from clipjax.train.state import init_state
from clipjax.train.step import make_train_step

LR = 1e-3
STEPS = 3


def _config(siglip: bool):
    base = clipjax.get_config("ViT-B-16-SigLIP" if siglip else "ViT-B-32")
    cfg = base.replace(
        embed_dim=32 if siglip else 16,
        vision=dataclasses.replace(base.vision, image_size=32, patch_size=16, width=32, layers=2, heads=2, mlp_dim=64),
        text=dataclasses.replace(base.text, width=32, heads=2, layers=2, mlp_dim=64, context_length=8, vocab_size=100))
    tc = TrainConfig(loss="siglip" if siglip else "clip", batch_size=16, total_steps=STEPS, warmup_steps=1, lr=LR,
                     grad_clip_norm=1.0, ema_decay=0.9)
    return cfg, tc


def _batches():
    rng = np.random.default_rng(0)
    return [{"image": rng.integers(0, 256, (16, 32, 32, 3)).astype(np.uint8),
             "text": rng.integers(1, 100, (16, 8)).astype(np.int32)} for _ in range(STEPS)]


def _run(cfg, tc, mesh):
    optimizer = make_optimizer(tc, split_trainable(abstract_params(cfg))[0], cfg)
    state, shardings = init_state(cfg, optimizer, seed=0, ema=True, mesh=mesh)
    step = make_train_step(cfg, tc, optimizer, mesh=mesh, state_shardings=shardings)
    losses = []
    for b in _batches():
        state, metrics = step(state, b)
        losses.append(float(metrics["loss"]))
    return losses, state


_REFERENCE: dict = {}


def _reference(loss: str):
    """Single-device run, computed once per loss for the module."""
    if loss not in _REFERENCE:
        cfg, tc = _config(loss == "siglip")
        _REFERENCE[loss] = cfg, tc, _run(cfg, tc, None)
    return _REFERENCE[loss]


# every mesh for the CLIP loss (all-gather); the SigLIP ring on one mesh, to keep the suite short
CASES = [("clip", dict(data=8)), ("clip", dict(data=4, fsdp=2)), ("clip", dict(data=2, fsdp=2, tensor=2)),
         ("siglip", dict(data=4, fsdp=2))]


@pytest.mark.parametrize("loss,axes", CASES, ids=[f"{l}-" + "-".join(f"{k}{v}" for k, v in a.items()) for l, a in CASES])
def test_sharded_steps_equal_single_device(loss, axes):
    cfg, tc, (want_losses, want) = _reference(loss)
    mesh = make_mesh(**axes)
    losses, state = _run(cfg, tc, mesh)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    if axes.get("fsdp", 1) > 1:  # FSDP really shards: some param and its Adam moment are split
        specs = {str(leaf.sharding.spec) for leaf in jax.tree.leaves(state.params)}
        assert any("fsdp" in s for s in specs), specs
    for name, got_tree, want_tree in (("params", state.params, want.params), ("ema", state.ema, want.ema)):
        for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got_tree)[0], jax.tree.leaves(want_tree)):
            err = float(np.abs(np.asarray(g) - np.asarray(w)).max())
            assert err <= 1e-2 * LR, f"{name}{jax.tree_util.keystr(path)} differs by {err:.3g}"
    assert int(state.step) == STEPS
