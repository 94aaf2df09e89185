"""Learning-rate schedules (open_clip's formulas) and the optax chain of a training run.

The chain, in order (each step is a stock optax transformation except the multiplier trees):

1. zero the gradients of frozen params (`--lock-image` / `--lock-text`), so that clipping and
   Adam see only trainable params, as torch does for `requires_grad=False`;
2. global-norm clipping (`--grad-clip-norm`);
3. Adam moments (`scale_by_adam`, beta2 0.98 and eps 1e-6 by default);
4. decoupled weight decay on the `decay_mask` params (open_clip's exclusions);
5. the learning rate from the schedule;
6. per-param multipliers: layer-wise lr decay, and 0 for frozen params.

Steps 3-5 are torch's `AdamW`: `p -= lr * (m_hat / (sqrt(v_hat) + eps) + wd * p)`.

`optimizer="sgd"` (TeCoA, PMG-AFT) replaces steps 3-4 by torch's `SGD(momentum=beta1,
weight_decay=wd)`: `g += wd * p` (coupled, on the `decay_mask` params), `buf = beta1 * buf + g`,
`p -= lr * buf`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from clipjax.config import CLIPConfig
from clipjax.models.longclip import KEEP as LONGCLIP_KEEP
from clipjax.train import param_groups
from clipjax.train.config import TrainConfig


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    """The learning rate at optimizer step `step` (0-based), as open_clip's `scheduler(step)`.

    Warm-up `lr * (step + 1) / warmup_steps`, then `cosine` (to 0 at `total_steps`), `const`, or
    `const-cooldown` (constant, then `(1 - e / es) ** power` down to `lr_cooldown_end` over the last
    `cooldown_steps`). Formulas from `open_clip_train/scheduler.py`.
    """
    base, warm, total = cfg.lr, cfg.warmup_steps, cfg.total_steps

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warmup = base * (step + 1.0) / max(warm, 1)
        if cfg.schedule == "cosine":
            e = step - warm
            es = max(total - warm, 1)
            after = 0.5 * (1.0 + jnp.cos(jnp.pi * e / es)) * base
        elif cfg.schedule == "const":
            after = jnp.asarray(base, jnp.float32)
        else:
            start = total - cfg.cooldown_steps
            e = jnp.maximum(step - start, 0.0)
            decay = jnp.maximum(1.0 - e / cfg.cooldown_steps, 0.0) ** cfg.cooldown_power
            after = jnp.where(step < start, base, decay * (base - cfg.lr_cooldown_end) + cfg.lr_cooldown_end)
        return jnp.where(step < warm, warmup, after)

    return schedule


def trainable_tree(cfg: TrainConfig, params, model_config: CLIPConfig):
    """1/0 multipliers like `params` for the locked towers / layers and Long-CLIP's frozen rows; None: all train."""
    trainable = None
    if cfg.lock_image or cfg.lock_text or cfg.loss == "longclip":
        trainable = param_groups.trainable_mask(
            params, model_config, lock_image=cfg.lock_image,
            lock_image_unlocked_groups=cfg.lock_image_unlocked_groups, lock_text=cfg.lock_text,
            lock_text_unlocked_layers=cfg.lock_text_unlocked_layers)
    if cfg.loss == "longclip":  # Long-CLIP keeps the first 20 text positions frozen
        trainable = param_groups.freeze_rows(trainable, params, "text.pos_embed", LONGCLIP_KEEP)
    return trainable


def make_optimizer(cfg: TrainConfig, params, model_config: CLIPConfig) -> optax.GradientTransformation:
    """The optax chain for `params` (an `nnx.State` of trainable Params) under `cfg`."""
    trainable = trainable_tree(cfg, params, model_config)
    chain = []
    if trainable is not None:
        chain.append(param_groups.scale_by_tree(trainable))
    if cfg.grad_clip_norm is not None:
        chain.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
    decay = optax.add_decayed_weights(cfg.weight_decay, mask=param_groups.decay_mask(params))
    if cfg.optimizer == "sgd":
        chain += [decay, optax.trace(decay=cfg.beta1)]
    else:
        chain += [optax.scale_by_adam(b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps), decay]
    chain.append(optax.scale_by_learning_rate(learning_rate_schedule(cfg)))
    multipliers = None
    if cfg.layer_decay is not None:
        multipliers = param_groups.layer_decay_multipliers(params, model_config, cfg.layer_decay)
    if trainable is not None:
        multipliers = trainable if multipliers is None else jax.tree.map(jnp.multiply, multipliers, trainable)
    if multipliers is not None:
        chain.append(param_groups.scale_by_tree(multipliers))
    return optax.chain(*chain)
