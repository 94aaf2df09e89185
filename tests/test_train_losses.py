"""The train step's gradient accumulation and FLIP's patch dropping (single device, fp32).

Micro-batch accumulation is checked against the full-batch step; `drop_patches` against open_clip's
`PatchDropout` rule. The losses (clip, siglip, cloob, distill, longclip), the optimizer and the FLIP
masked / unmasked steps are compared with torch training loops in test_train_parity.py.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import clipjax
from clipjax.models import clip as F
from clipjax.models.vit import drop_patches
from clipjax.train.config import TrainConfig
from clipjax.train.optim import make_optimizer
from clipjax.train.state import init_state
from clipjax.train.step import make_train_step

B = 8


def _cfg():
    base = clipjax.get_config("ViT-B-32")
    return base.replace(embed_dim=16,
                        vision=dataclasses.replace(base.vision, image_size=32, patch_size=8, width=32, layers=2,
                                                   heads=2, mlp_dim=64),
                        text=dataclasses.replace(base.text, width=32, heads=2, layers=1, mlp_dim=64,
                                                 context_length=8, vocab_size=100))


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    return {"image": rng.integers(0, 256, (B, 32, 32, 3)).astype(np.uint8),
            "text": rng.integers(1, 100, (B, 8)).astype(np.int32)}


def _one_step(cfg, tc, model_state, batch):
    optimizer = make_optimizer(tc, F.split_trainable(model_state)[0], cfg)
    state, _ = init_state(cfg, optimizer, seed=0, ema=False, model_state=model_state)
    return make_train_step(cfg, tc, optimizer)(state, batch)


def test_micro_batches_give_the_full_batch_step():
    """4 micro-batches vs the full batch: loss and gradient norm to 1e-5 relative, every param update to
    1e-4 of the largest update (absolute)."""
    cfg, batch = _cfg(), _batch()
    ms = F.init_params(cfg, seed=0)
    # eps = 1 makes Adam's first update ~ lr * g (no 1 / |g| amplification of near-zero gradients), so
    # comparing the updates compares the gradients
    runs = [_one_step(cfg, TrainConfig(batch_size=B, total_steps=2, warmup_steps=1, micro_batches=k, eps=1.0), ms,
                      batch) for k in (1, 4)]
    (s1, m1), (s4, m4) = runs
    np.testing.assert_allclose(float(m4["loss"]), float(m1["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(m4["grad_norm"]), float(m1["grad_norm"]), rtol=1e-5)
    p0 = jax.tree.leaves(F.split_trainable(ms)[0])
    ua = [np.asarray(a, np.float64) - np.asarray(p) for a, p in zip(jax.tree.leaves(s4.params), p0)]
    ub = [np.asarray(b, np.float64) - np.asarray(p) for b, p in zip(jax.tree.leaves(s1.params), p0)]
    scale = max(np.abs(u).max() for u in ub)  # the largest update; key biases get exactly-zero gradients
    for a, b in zip(ua, ub):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * scale)


def test_drop_patches_keeps_the_class_token_and_order():
    """open_clip's PatchDropout rule: keep max(1, int(P * (1 - ratio))) patches, class token always."""
    x = jnp.arange(2 * 17 * 3, dtype=jnp.float32).reshape(2, 17, 3)
    y = drop_patches(x, 0.5, jax.random.key(0), num_prefix=1)
    assert y.shape == (2, 1 + 8, 3)
    np.testing.assert_array_equal(np.asarray(y[:, 0]), np.asarray(x[:, 0]))
    for b in range(2):
        rows = np.asarray(y[b, 1:, 0] - x[b, 0, 0]) / 3
        assert np.all(np.diff(rows) > 0) and set(rows.astype(int)) <= set(range(1, 17))
    assert not np.array_equal(np.asarray(y[0, 1:, 0] - x[0, 0, 0]), np.asarray(y[1, 1:, 0] - x[1, 0, 0]))
    assert drop_patches(x, 0.99, jax.random.key(1), num_prefix=1).shape == (2, 2, 3)
    with pytest.raises(ValueError, match="patch_dropout must be in"):
        drop_patches(x, 1.0, jax.random.key(0), num_prefix=1)
