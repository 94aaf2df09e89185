"""The jitted train step: forward both towers, contrastive loss, gradients, optax update.

One function serves one device and a mesh: with a mesh the state is placed by the logical-axis
rules (`state.state_shardings`), the batch is split over the ("data", "fsdp") axes, the loss
runs as its `shard_map` version (all-gather with gradient for softmax, ppermute ring for
sigmoid), and the step is traced under `jax.set_mesh(mesh)` so activation constraints apply.
The state is donated.

Batch contract (per step, global view): `{"image": [B, H, W, 3] uint8 or float32, "text": [B, L]
int32}`. uint8 images are normalised on the device with the model's mean/std
(`(x / 255 - mean) / std`); float32 images are taken as already preprocessed.

After each update the stored `log_logit_scale` is clamped to `[0, max_log_logit_scale]` (open_clip's
`logit_scale.clamp_(0, ln 100)`). A step whose loss or gradient norm is not finite changes
nothing (params, optimizer state, EMA, BatchNorm statistics and step all stay) and reports
`finite = False`; the loop stops on it.

Frozen inputs (the step's third argument, `frozen`, a dict or None): `params` of a reference model
(the teacher of `loss="distill"`; the frozen starting model of "pmg-aft", "fare" and "advflyp") and
`class_weights` `[C, E]` (unit-norm class text embeddings of "tecoa" and "pmg-aft"). They are inputs,
never updated, and on a mesh keep the shardings they come with.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from clipjax import losses
from clipjax.config import CLIPConfig, ConfigError
from clipjax.models import clip as F
from clipjax.preprocess import standardize
from clipjax.sharding import logical_to_spec
from clipjax.train import adversarial
from clipjax.train.config import ADVERSARIAL_LOSSES, TrainConfig
from clipjax.train.optim import learning_rate_schedule, trainable_tree
from clipjax.train.state import TrainState, mesh_context

Batch = dict[str, jax.Array]


def normalize_images(images: jax.Array, config: CLIPConfig) -> jax.Array:
    """uint8 `[B, H, W, 3]` -> `(x / 255 - mean) / std` float32; float input is returned as is."""
    if images.dtype == jnp.uint8:
        return standardize(images.astype(jnp.float32) / 255.0, config.preprocess)
    return images


def batch_axes_size(mesh: Mesh | None) -> int:
    """Devices the batch is split over: the product of the mesh's "data" and "fsdp" axes."""
    if mesh is None:
        return 1
    return int(np.prod([mesh.shape[a] for a in ("data", "fsdp") if a in mesh.shape]))


def contrastive_loss(out: dict, cfg: TrainConfig, mesh: Mesh | None, teacher: dict | None = None) -> jax.Array:
    """The loss of `cfg.loss` on `forward` outputs (`[B, E]` embeddings, scale, bias), global view."""
    img, txt, scale, bias = out["image"], out["text"], out["logit_scale"], out["logit_bias"]
    sharded = batch_axes_size(mesh) > 1
    block = cfg.loss_block_size
    if cfg.loss in ("clip", "distill"):
        if sharded:
            loss = losses.sharded_clip_loss(img, txt, scale, bias, mesh=mesh, label_smoothing=cfg.label_smoothing,
                                            block_size=block)
        elif block is not None:
            loss = losses.chunked_clip_loss(img, txt, scale, bias, label_smoothing=cfg.label_smoothing,
                                            block_size=block)
        else:
            loss = losses.clip_loss(img, txt, scale, bias, label_smoothing=cfg.label_smoothing)
        if cfg.loss == "distill":
            loss = loss + losses.distill_loss(img, txt, scale, teacher["image"], teacher["text"],
                                              teacher["logit_scale"])
        return loss
    if cfg.loss == "longclip":
        return losses.longclip_loss(img, txt, out["short_text"], scale, num_components=cfg.longclip_components,
                                    label_smoothing=cfg.label_smoothing, pca_groups=batch_axes_size(mesh))
    if cfg.loss == "siglip":
        if sharded:
            return losses.sharded_siglip_loss(img, txt, scale, bias, mesh=mesh, block_size=block)
        if block is not None:
            return losses.chunked_siglip_loss(img, txt, scale, bias, block_size=block)
        return losses.siglip_loss(img, txt, scale, bias)
    if sharded:
        return losses.sharded_cloob_loss(img, txt, scale, hopfield_beta=cfg.hopfield_beta, mesh=mesh)
    return losses.cloob_loss(img, txt, scale, hopfield_beta=cfg.hopfield_beta)


def check_compatible(model_config: CLIPConfig, cfg: TrainConfig, mesh: Mesh | None) -> None:
    """Refuse combinations the step cannot honour exactly, naming them."""
    model_config.require("both", "training")
    if cfg.loss == "siglip" and not model_config.is_siglip:
        raise ConfigError("loss='siglip' needs a model with a logit bias (init_logit_bias, e.g. -10)")
    resnet = model_config.vision.arch == "resnet"
    if resnet and cfg.patch_dropout:
        raise ConfigError("patch_dropout needs a ViT image tower; this model is a ResNet")
    if cfg.loss == "longclip" and cfg.micro_batches > 1:
        raise ConfigError("loss='longclip' with micro_batches > 1 is not supported (the short-caption PCA "
                          "needs the whole batch's image embeddings)")
    if resnet and cfg.micro_batches > 1:
        raise ConfigError("micro_batches > 1 with a ResNet tower: train-mode BatchNorm statistics depend on "
                          "the micro-batch, so accumulation would not equal the full-batch step")
    if cfg.loss in ADVERSARIAL_LOSSES:
        adversarial.check_compatible(model_config, cfg)
    n = batch_axes_size(mesh)
    if cfg.batch_size % (n * cfg.micro_batches):
        raise ConfigError(f"batch_size={cfg.batch_size} must be divisible by the batch devices ({n}) x "
                          f"micro_batches ({cfg.micro_batches})")


def _grads(state: TrainState, batch: Batch, model_config: CLIPConfig, cfg: TrainConfig, mesh, rng, dropout,
           teacher_out):
    """(loss, grads, new batch stats) for one step, with or without accumulation."""
    pixels = normalize_images(batch["image"], model_config)
    ids = batch["text"]
    if cfg.loss == "longclip":  # long and short captions through the text tower in one pass
        short = batch["short_text"]
        short = jnp.pad(short, ((0, 0), (0, ids.shape[1] - short.shape[1])))
        ids = jnp.concatenate([ids, short], axis=0)

    def forward(params, stats, px, tx, key):
        return F.forward(F.merge_state(params, stats), px, tx, config=model_config, train=True,
                         patch_dropout=dropout, rng=key if dropout else None)

    if cfg.micro_batches == 1:
        def loss_fn(params):
            out = forward(params, state.batch_stats, pixels, ids, rng)
            if cfg.loss == "longclip":
                b = pixels.shape[0]
                out["text"], out["short_text"] = out["text"][:b], out["text"][b:]
            return contrastive_loss(out, cfg, mesh, teacher_out), out["batch_stats"]

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return loss, grads, stats

    keys = jax.random.split(rng, pixels.shape[0])
    micro = losses.split_micro_batches({"image": pixels, "text": ids, "key": keys}, cfg.micro_batches)

    def encode(params, mb):
        out = forward(params, state.batch_stats, mb["image"], mb["text"], mb["key"][0])
        return out["image"], out["text"]

    def loss_of_features(params, feats):
        bias = params["logit_bias"][...].astype(jnp.float32) if "logit_bias" in params else None
        out = {"image": feats[0], "text": feats[1], "logit_bias": bias,
               "logit_scale": jnp.exp(params["log_logit_scale"][...].astype(jnp.float32))}
        return contrastive_loss(out, cfg, mesh, teacher_out)

    loss, grads = losses.accumulate_contrastive_grads(encode, loss_of_features, state.params, micro)
    return loss, grads, state.batch_stats


def _clamp_log_logit_scale(params, max_value: float):
    """open_clip's `logit_scale.clamp_(0, max_value)` on the stored `log_logit_scale`."""
    ls = params["log_logit_scale"]
    params["log_logit_scale"] = ls.replace(jnp.clip(ls[...], 0.0, max_value).astype(ls[...].dtype))
    return params


def train_step(state: TrainState, batch: Batch, frozen: dict | None = None, *, model_config: CLIPConfig,
               cfg: TrainConfig, optimizer: optax.GradientTransformation, mesh: Mesh | None = None,
               reference_config: CLIPConfig | None = None) -> tuple[TrainState, dict]:
    """One optimizer update (pure; `make_train_step` jits it). Returns `(state, metrics)`.

    metrics: `loss`, `grad_norm` (of the trainable gradients, before clipping), `lr`, `logit_scale` (the multiplier),
    `logit_bias` (SigLIP), `finite` (False: the step was skipped).
    """
    step_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    dropout = cfg.patch_dropout
    if dropout and cfg.unmasked_steps:
        dropout_on = state.step < cfg.total_steps - cfg.unmasked_steps
    else:
        dropout_on = None
    teacher_out = None
    if cfg.loss == "distill":
        t = F.forward(frozen["params"], normalize_images(batch["image"], reference_config), batch["text"],
                      config=reference_config)
        teacher_out = jax.lax.stop_gradient({k: t[k] for k in ("image", "text", "logit_scale")})

    if cfg.loss in ADVERSARIAL_LOSSES:
        loss, grads = adversarial.adversarial_loss_and_grads(
            state.params, batch, frozen or {}, jax.random.fold_in(step_rng, 1), model_config=model_config, cfg=cfg,
            reference_config=reference_config)
        stats = state.batch_stats
    elif dropout_on is None:
        loss, grads, stats = _grads(state, batch, model_config, cfg, mesh, step_rng, dropout, teacher_out)
    else:  # FLIP: masked steps, then unmasked tuning; both branches are compiled, one runs
        loss, grads, stats = jax.lax.cond(
            dropout_on,
            lambda: _grads(state, batch, model_config, cfg, mesh, step_rng, dropout, teacher_out),
            lambda: _grads(state, batch, model_config, cfg, mesh, step_rng, 0.0, teacher_out))

    trainable = trainable_tree(cfg, state.params, model_config)
    # the norm of what trains (torch's clip_grad_norm_ sees no grad of a frozen param); the optimizer masks too
    grad_norm = optax.global_norm(grads if trainable is None else jax.tree.map(jnp.multiply, grads, trainable))
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    params = _clamp_log_logit_scale(params, cfg.max_log_logit_scale)
    ema = state.ema
    if ema is not None:
        d = cfg.ema_decay
        ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)
    new = state.replace(step=state.step + 1, params=params, batch_stats=stats, opt_state=opt_state, ema=ema)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state)
    metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite,
               "lr": learning_rate_schedule(cfg)(state.step),
               "logit_scale": jnp.exp(new.params["log_logit_scale"][...].astype(jnp.float32))}
    if "logit_bias" in new.params:
        metrics["logit_bias"] = new.params["logit_bias"][...].astype(jnp.float32)
    return new, metrics


def make_train_step(model_config: CLIPConfig, cfg: TrainConfig, optimizer: optax.GradientTransformation, *,
                    mesh: Mesh | None = None, state_shardings: Any = None,
                    reference_config: CLIPConfig | None = None, frozen_shardings: Any = None) -> Callable:
    """`step(state, batch[, frozen]) -> (state, metrics)`, jitted, state donated.

    With `mesh`, pass the `state_shardings` from `init_state` and the `frozen_shardings` of the frozen
    inputs (see the module docstring); the batch is sharded over ("data", "fsdp") and metrics are
    replicated scalars. `reference_config`: the architecture of `frozen["params"]`.
    """
    check_compatible(model_config, cfg, mesh)
    fn = partial(train_step, model_config=model_config, cfg=cfg, optimizer=optimizer, mesh=mesh,
                 reference_config=reference_config)
    if mesh is None:
        jitted = jax.jit(fn, donate_argnums=0)
    else:
        batch_sh = NamedSharding(mesh, logical_to_spec(("batch",), mesh=mesh))
        replicated = NamedSharding(mesh, P())
        jitted = jax.jit(fn, donate_argnums=0,
                         in_shardings=(state_shardings, batch_sh, frozen_shardings),
                         out_shardings=(state_shardings, replicated))

    def step(state, batch, frozen=None):
        with mesh_context(mesh):
            return jitted(state, batch, frozen)

    step.jitted = jitted
    return step
