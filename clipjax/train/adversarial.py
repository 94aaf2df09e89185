"""Adversarial fine-tuning inside the train step: TeCoA, PMG-AFT, FARE, AdvFLYP (robustness.md items 1, 2, 13).

The batch's uint8 images become pixels in [0, 1]. The inner attack perturbs those within `adv_eps`
(L-inf), and the model's mean/std normalisation follows, as in the papers' code (which attacks
before `Normalize`). The attack runs on the current params with their gradient stopped; the outer
loss is then differentiated with respect to the params only.

* tecoa: PGD on CE(s * cos(f(x'), W), y); outer loss the same CE at x_adv.
* pmg-aft: the same PGD; outer CE + KL(p(z_adv) || p(z_clean)) + KL(p(z_adv) || p(z_0)).
* fare: momentum-sign PGD on ||f(x') - f_0(x)||^2; outer the same distance at x_adv.
* advflyp: PGD on the batch's CLIP loss with its captions; outer the CLIP loss at x_adv plus logit (KL)
  and feature (L2) terms to the frozen model and to the clean images.

`W` `[C, E]` are fixed, unit-norm class text embeddings (the text tower is frozen: TeCoA, PMG-AFT
and FARE fine-tune the image tower only), `s` is `adv_logit_scale`, `f_0` / `z_0` the frozen
reference model (the checkpoint fine-tuning started from). Only ViT image towers are supported:
train-mode BatchNorm would make the attacked function depend on the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from clipjax.config import CLIPConfig, ConfigError
from clipjax.models import clip as F
from clipjax.preprocess import standardize
from clipjax.robust import attacks, finetune
from clipjax.train.config import TrainConfig

NEEDS_LABELS = ("tecoa", "pmg-aft")
NEEDS_REFERENCE = ("pmg-aft", "fare", "advflyp")


def check_compatible(model_config: CLIPConfig, cfg: TrainConfig) -> None:
    """Refuse what the adversarial losses cannot honour, naming it."""
    if model_config.vision.arch != "vit":
        raise ConfigError(f"loss={cfg.loss!r} needs a ViT image tower (train-mode BatchNorm would make the attacked "
                          "function depend on the batch); this model is a ResNet")
    if cfg.loss in ("tecoa", "pmg-aft", "fare") and not cfg.lock_text:
        raise ConfigError(f"loss={cfg.loss!r} fine-tunes the image tower only: set lock_text=True (otherwise weight "
                          "decay would still move the text tower)")
    for name, off in (("micro_batches", 1), ("patch_dropout", 0.0), ("loss_block_size", None),
                      ("label_smoothing", 0.0)):
        if getattr(cfg, name) != off:
            raise ConfigError(f"loss={cfg.loss!r} with {name}={getattr(cfg, name)!r} is not supported (the "
                              f"adversarial losses run unmasked, unaccumulated and unstreamed): leave it at {off!r}")


def pixels01(images: jax.Array) -> jax.Array:
    """uint8 `[B, H, W, 3]` (0..255) -> float32 in [0, 1]."""
    return images.astype(jnp.float32) / 255.0


def _embed(params, x01, config: CLIPConfig) -> jax.Array:
    """Raw (unnormalised) image embeddings `[B, E]` float32 of pixels in [0, 1]."""
    return F.encode_image(params, standardize(x01, config.preprocess), config=config, normalize=False)


def _class_logits(emb_raw, class_weights, scale: float) -> jax.Array:
    return scale * F.l2_normalize(emb_raw) @ class_weights.T


def adversarial_loss_and_grads(params, batch: dict, frozen: dict, key: jax.Array, *, model_config: CLIPConfig,
                               cfg: TrainConfig, reference_config: CLIPConfig | None):
    """`(loss, grads)` of `cfg.loss` on one batch (global view).

    batch: `image` uint8 `[B, H, W, 3]`, `text` int32 `[B, L]`, and `label` int32 `[B]` for tecoa / pmg-aft.
    frozen: `class_weights` `[C, E]` (unit rows; tecoa / pmg-aft) and `params` of the reference model
      (pmg-aft, fare, advflyp).
    """
    x = pixels01(batch["image"])
    fixed = jax.lax.stop_gradient(params)
    eps, alpha, steps = cfg.adv_eps, cfg.adv_alpha, cfg.adv_steps
    start = dict(random_start=cfg.adv_random_start)

    if cfg.loss in NEEDS_LABELS:
        w, labels, s = frozen["class_weights"], batch["label"], cfg.adv_logit_scale
        x_adv = attacks.pgd_classifier(lambda xa: _class_logits(_embed(fixed, xa, model_config), w, s), x, labels,
                                       key, eps=eps, alpha=alpha, steps=steps, loss="ce", validate=False, **start)
        x_adv = jax.lax.stop_gradient(x_adv)
        if cfg.loss == "tecoa":
            def loss_fn(p):
                return finetune.tecoa_loss(_embed(p, x_adv, model_config), w, labels, scale=s, validate=False)
        else:
            z0 = jax.lax.stop_gradient(_class_logits(_embed(frozen["params"], x_adv, reference_config), w, s))

            def loss_fn(p):
                z_adv = _class_logits(_embed(p, x_adv, model_config), w, s)
                z_clean = _class_logits(_embed(p, x, model_config), w, s)
                return finetune.pmg_aft_loss(z_adv, z_clean, z0, labels, w_clean=cfg.pmg_clean_weight,
                                             w_frozen=cfg.pmg_frozen_weight, validate=False)
        return jax.value_and_grad(loss_fn)(params)

    if cfg.loss == "fare":
        target = jax.lax.stop_gradient(_embed(frozen["params"], x, reference_config))
        x_adv = finetune.fare_pgd(lambda xa: _embed(fixed, xa, model_config), x, target, key, eps=eps, alpha=alpha,
                                  steps=steps, momentum=cfg.adv_momentum, validate=False,
                                  delta0=None if cfg.adv_random_start else jnp.zeros_like(x))
        x_adv = jax.lax.stop_gradient(x_adv)
        return jax.value_and_grad(
            lambda p: finetune.fare_loss(_embed(p, x_adv, model_config), target, validate=False))(params)

    # advflyp: attack the contrastive loss of the batch's pairs, train on the adversarial pairs
    ids = batch["text"]

    def scale_of(p):
        return jnp.exp(p["log_logit_scale"][...].astype(jnp.float32))

    objective = finetune.advflyp_attack_objective(lambda xa: _embed(fixed, xa, model_config),
                                                  F.encode_text(fixed, ids, config=model_config), scale_of(fixed),
                                                  validate=False)
    x_adv = jax.lax.stop_gradient(attacks.pgd(objective, x, key, eps=eps, alpha=alpha, steps=steps, validate=False,
                                              **start))
    ref = frozen["params"]
    ref_img_adv = jax.lax.stop_gradient(F.l2_normalize(_embed(ref, x_adv, reference_config)))

    def loss_fn(p):
        return finetune.advflyp_loss(
            F.l2_normalize(_embed(p, x_adv, model_config)), F.encode_text(p, ids, config=model_config), scale_of(p),
            img_clean=F.l2_normalize(_embed(p, x, model_config)), img_frozen_adv=ref_img_adv,
            frozen_logit_scale=scale_of(ref), w_logit=cfg.advflyp_logit_weight, w_feature=cfg.advflyp_feature_weight,
            validate=False)

    return jax.value_and_grad(loss_fn)(params)
