"""The train step with every loss, accumulation and FLIP patch dropping (single device, fp32).

Losses are checked against the loss functions of `clipjax.losses` (themselves parity-tested
against open_clip and the CLOOB reference in test_losses.py) evaluated on `forward`'s outputs
from the same initial state: this tests the step's wiring (which loss, which scale, the teacher).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import clipjax
from clipjax import losses
from clipjax.models import clip as F
from clipjax.models.vit import drop_patches
from clipjax.train.config import TrainConfig
from clipjax.train.optim import make_optimizer
from clipjax.train.state import init_state
from clipjax.train.step import make_train_step, normalize_images

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


def _one_step(cfg, tc, model_state, batch, teacher=None):
    optimizer = make_optimizer(tc, F.split_trainable(model_state)[0], cfg)
    state, _ = init_state(cfg, optimizer, seed=0, ema=False, model_state=model_state)
    step = make_train_step(cfg, tc, optimizer, reference_config=None if teacher is None else cfg)
    return step(state, batch, None if teacher is None else {"params": teacher})


def _forward(cfg, model_state, batch):
    return F.forward(model_state, normalize_images(jnp.asarray(batch["image"]), cfg), jnp.asarray(batch["text"]),
                     config=cfg)


def test_cloob_step_uses_cloob_loss_with_the_model_scale_as_inv_tau():
    cfg, batch = _cfg(), _batch()
    ms = F.init_params(cfg, seed=0)
    _, m = _one_step(cfg, TrainConfig(loss="cloob", batch_size=B, total_steps=2, warmup_steps=1, hopfield_beta=8.0),
                     ms, batch)
    out = _forward(cfg, ms, batch)
    want = losses.cloob_loss(out["image"], out["text"], out["logit_scale"], hopfield_beta=8.0)
    np.testing.assert_allclose(float(m["loss"]), float(want), rtol=1e-5)


def test_distill_step_adds_the_teacher_term():
    cfg, batch = _cfg(), _batch()
    ms, teacher = F.init_params(cfg, seed=0), F.init_params(cfg, seed=1)
    _, m = _one_step(cfg, TrainConfig(loss="distill", batch_size=B, total_steps=2, warmup_steps=1), ms, batch,
                     teacher=teacher)
    s, t = _forward(cfg, ms, batch), _forward(cfg, teacher, batch)
    want = (losses.clip_loss(s["image"], s["text"], s["logit_scale"])
            + losses.distill_loss(s["image"], s["text"], s["logit_scale"], t["image"], t["text"], t["logit_scale"]))
    np.testing.assert_allclose(float(m["loss"]), float(want), rtol=1e-5)


def test_micro_batches_give_the_full_batch_step():
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


def test_flip_patch_dropout_then_unmasked_tuning():
    """Masked steps differ from the unmasked loss; in the last `unmasked_steps` the loss is the unmasked one."""
    cfg, batch = _cfg(), _batch()
    ms = F.init_params(cfg, seed=0)
    plain = float(losses.clip_loss(*(lambda o: (o["image"], o["text"], o["logit_scale"]))(_forward(cfg, ms, batch))))
    _, masked = _one_step(cfg, TrainConfig(batch_size=B, total_steps=2, warmup_steps=1, patch_dropout=0.5,
                                           unmasked_steps=1), ms, batch)
    _, unmasked = _one_step(cfg, TrainConfig(batch_size=B, total_steps=1, warmup_steps=1, patch_dropout=0.5,
                                             unmasked_steps=1), ms, batch)
    assert abs(float(masked["loss"]) - plain) > 1e-4
    np.testing.assert_allclose(float(unmasked["loss"]), plain, rtol=1e-5)


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


def test_longclip_step_uses_long_and_short_captions_and_freezes_the_first_positions():
    base = _cfg()
    cfg = base.replace(text=dataclasses.replace(base.text, context_length=24))
    rng = np.random.default_rng(2)
    batch = {"image": rng.integers(0, 256, (B, 32, 32, 3)).astype(np.uint8),
             "text": rng.integers(1, 100, (B, 24)).astype(np.int32),
             "short_text": rng.integers(1, 100, (B, 10)).astype(np.int32)}
    ms = F.init_params(cfg, seed=0)
    tc = TrainConfig(loss="longclip", batch_size=B, total_steps=2, warmup_steps=1, label_smoothing=0.1,
                     longclip_components=4)
    state, m = _one_step(cfg, tc, ms, batch)
    long_out = _forward(cfg, ms, batch)
    short_ids = np.pad(batch["short_text"], ((0, 0), (0, 14)))
    short = F.encode_text(ms, jnp.asarray(short_ids), config=cfg)
    want = losses.longclip_loss(long_out["image"], long_out["text"], short, long_out["logit_scale"],
                                num_components=4, label_smoothing=0.1)
    np.testing.assert_allclose(float(m["loss"]), float(want), rtol=1e-5)
    before = np.asarray(ms["text"]["pos_embed"][...])
    after = np.asarray(state.params["text"]["pos_embed"][...])
    np.testing.assert_array_equal(after[:20], before[:20])
    assert np.abs(after[20:] - before[20:]).min() > 0
