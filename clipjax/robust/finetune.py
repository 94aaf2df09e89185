"""Adversarial fine-tuning losses of CLIP's image tower: TeCoA, PMG-AFT, FARE and AdvFLYP.

Pure functions of arrays (embeddings or logits in, scalar loss out) for a trainer to call;
robustness.md items 2 and 13. Each is written from the official training code:

* TeCoA (`cvlab-columbia/ZSRobust4FoundationModel:finetuning.py:train`): CE of
  100 cos(f(x_adv), w_c) against the label.
* PMG-AFT (`serendipity1122/Pre-trained-Model-Guided-Fine-Tuning-for-Zero-Shot-Adversarial-Robustness:
  PMG_AFT.py:train`): CE + two `nn.KLDivLoss(reduction="sum")` terms, see `pmg_aft_loss`.
* FARE (`chs20/RobustVLM:train/adversarial_training_clip.py:compute_loss`, `l2`): the squared L2
  distance of raw embeddings, summed over dims and averaged over the batch; its inner attack
  `train/pgd_train.py:pgd` is `fare_pgd`.
* AdvFLYP (`Sxing2/AdvFLYP:code/training_epoch.py:train_epoch_laion`, `code/func.py:kl_div`):
  CLIP's contrastive loss on (adversarial image, caption) pairs plus logit- and feature-level
  regularisers, see `advflyp_loss`.

The inner attack of TeCoA, PMG-AFT and AdvFLYP is the generic L-inf PGD of robustness.md item 1
(`clipjax.robust.attacks.pgd`: uniform start clipped to the image, signed steps, no momentum):
TeCoA and PMG-AFT maximise CE of the current model's logits (`attacks.pgd_classifier`), AdvFLYP
(`code/attacks.py:attack_pgd_captions`) maximises the batch's contrastive loss, for which
`advflyp_attack_objective` gives the per-example objective that `attacks.pgd` takes.

Losses are computed in float32 (float64 when an input is float64), whatever the input dtype.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jax.tree_util import Partial

from clipjax import checks
from clipjax.losses.contrastive import clip_loss, smoothed_cross_entropy
from clipjax.robust.ttc import _non_negative_int, _python_float, check_pixels_and_noise

__all__ = ["advflyp_attack_objective", "advflyp_loss", "fare_loss", "fare_pgd", "pmg_aft_loss", "tecoa_loss"]

KL_REDUCTIONS = ("sum", "batchmean")


def _compute_dtype(*arrays) -> jnp.dtype:
    """float32, or float64 when an input is float64 (never lower than float32)."""
    return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def _scalar(name: str, value, dtype) -> jax.Array:
    """A scalar hyper-parameter or traced scalar, cast to the compute dtype."""
    checks.scalar(name, value)  # type and shape checks
    return jnp.reshape(jnp.asarray(value), ()).astype(dtype)


def _labels(labels, batch: int, num_classes: int, validate: bool) -> jax.Array:
    labels = checks.array("labels", labels, "[B]", dtype="integer")
    if labels.shape[0] != batch:
        raise ValueError(f"labels must have shape [B] with B = {batch} (one per example), got {tuple(labels.shape)}")
    checks.index_range("labels", labels, num_classes, validate=validate)
    return labels


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Batch mean of the cross entropy (torch `F.cross_entropy`, reduction 'mean')."""
    lse = jax.nn.logsumexp(logits, axis=-1)
    true = jnp.take_along_axis(logits, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
    return jnp.mean(lse - true)


def _kl_rows(target_logits: jax.Array, input_logits: jax.Array) -> jax.Array:
    """Per-row KL(softmax(target) || softmax(input)) = sum_c p (log p - log q), `[B]`.

    torch `nn.KLDivLoss()(log_softmax(input), softmax(target))` before its reduction (torch uses
    xlogy, so a target probability that underflows to 0 contributes 0; so does this).
    """
    p = jax.nn.softmax(target_logits, axis=-1)
    return jnp.sum(p * (jax.nn.log_softmax(target_logits, axis=-1) - jax.nn.log_softmax(input_logits, axis=-1)),
                   axis=-1)


def _safe_norm(x: jax.Array) -> jax.Array:
    """Row L2 norms of differences of unit vectors `[B, E]`, with gradient 0 at a zero row, as torch `norm`
    backward gives.

    A row within rounding of zero (norm <= 4 eps(dtype) sqrt(E), e.g. 2.7e-6 for fp32 and E = 32)
    also gets gradient 0: at AdvFLYP's first step f_theta = f_0, and the two embeddings, computed by
    differently compiled paths, differ only by rounding (measured ~3e-8); the gradient of the norm
    there would be a unit vector pointing in a random direction, where torch's identical kernels
    give exactly 0. The value is the norm itself either way.
    """
    sq = jnp.sum(jnp.square(x), axis=-1)
    floor = 4.0 * float(jnp.finfo(x.dtype).eps) * x.shape[-1] ** 0.5
    pos = sq > floor**2
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), jax.lax.stop_gradient(jnp.sqrt(sq)))


# ----------------------------------------------------------------------------- TeCoA
def tecoa_loss(image_emb_adv, class_weights, labels, *, scale: float = 100.0, validate: bool = True) -> jax.Array:
    """TeCoA: mean CE of `scale * cos(image_emb_adv, class_weights)` against `labels`.

    Args:
      image_emb_adv: `[B, E]` raw (unnormalised) embeddings of the adversarial images by the
        model being trained (normalised here).
      class_weights: `[C, E]` class text embeddings, one row per class (normalised here). Note:
        `clipjax.metrics.zeroshot.zeroshot_classifier` returns `[E, C]`; pass its transpose.
      labels: `[B]` integer labels in [0, C).
      scale: the logit scale (TeCoA: the model's exp(logit_scale) clamped to 100).
      validate: for concrete inputs, check finiteness, non-zero rows and the label range.

    Returns:
      Scalar loss (nats), float32 (float64 for float64 inputs).
    """
    img = checks.array("image_emb_adv", image_emb_adv, "[B, E]")
    weights = checks.array("class_weights", class_weights, "[C, E]")
    checks.same_dim(image_emb_adv=img, class_weights=weights)
    labels = _labels(labels, img.shape[0], weights.shape[0], validate)
    checks.values("image_emb_adv", img, nonzero=True, validate=validate)
    checks.values("class_weights", weights, nonzero=True, validate=validate)
    checks.positive_scalar("scale", scale)
    dt = _compute_dtype(img, weights)
    logits = _scalar("scale", scale, dt) * (checks.l2_normalize(img.astype(dt))
                                            @ checks.l2_normalize(weights.astype(dt)).T)
    return _cross_entropy(logits, labels)


# ----------------------------------------------------------------------------- PMG-AFT
def pmg_aft_loss(logits_adv, logits_clean, logits_frozen_adv, labels, *, w_clean: float = 1.0,
                 w_frozen: float = 1.0, kl_reduction: str = "sum", validate: bool = True) -> jax.Array:
    """PMG-AFT: CE(z_adv, y) + w_clean KL(p_adv || p_clean) + w_frozen KL(p_adv || p_frozen).

    Exactly the official expression (`PMG_AFT.py:train`):

        criterion_kl = nn.KLDivLoss(reduction="sum")
        loss_advori   = criterion_kl(F.log_softmax(output_ori, dim=1),   F.softmax(output, dim=1))
        loss_advclean = criterion_kl(F.log_softmax(output_clean, dim=1), F.softmax(output, dim=1))
        loss = CrossEntropyLoss()(output, target) + loss_advclean + loss_advori

    with `output` = z_adv (trained model, adversarial images), `output_clean` = z_clean (trained
    model, clean images) and `output_ori` = z0 (frozen pretrained model, adversarial images).

    Direction: torch's `KLDivLoss(input, target)` is KL(target || exp(input)), and the *target* is
    p(z_adv), so the terms are KL(p_adv || p_clean) and KL(p_adv || p0). robustness.md item 2 and
    the brief write KL(p_clean || p_adv); the code is followed here. Nothing is detached: the
    gradient flows into z_adv (as target and through CE) and into z_clean (as input), matching the
    official code, whose clean logits come from the trained model with autograd on.

    Reduction: the KL terms are sums over the batch while CE is a batch mean, so in effect the KL
    weight is the batch size B (`kl_reduction="sum"`, the official behaviour).
    `kl_reduction="batchmean"` divides them by B instead (torch's mathematically correct KL mean).

    Logit scale: pass the logits the trainer uses. (The stored official code's `multiGPU_CLIP`
    re-normalises `logit_scale * text_features`, so its logits are plain cosines with scale 1,
    unlike TeCoA's 100 cos; this function does not scale.)

    Args:
      logits_adv: `[B, C]` z_adv.
      logits_clean: `[B, C]` z_clean.
      logits_frozen_adv: `[B, C]` z0, the frozen pretrained model's logits on the adversarial images.
      labels: `[B]` integer labels in [0, C).
      w_clean: weight of KL(p_adv || p_clean) (official 1).
      w_frozen: weight of KL(p_adv || p0) (official 1).
      kl_reduction: "sum" (official) or "batchmean".
      validate: for concrete inputs, check finiteness and the label range.

    Returns:
      Scalar loss (nats).
    """
    if kl_reduction not in KL_REDUCTIONS:
        raise ValueError(f"kl_reduction must be one of {KL_REDUCTIONS}, got {kl_reduction!r}")
    z_adv = checks.array("logits_adv", logits_adv, "[B, C]")
    z_clean = checks.array("logits_clean", logits_clean, "[B, C]")
    z_frozen = checks.array("logits_frozen_adv", logits_frozen_adv, "[B, C]")
    checks.same_shape("[B, C]", logits_adv=z_adv, logits_clean=z_clean, logits_frozen_adv=z_frozen)
    labels = _labels(labels, z_adv.shape[0], z_adv.shape[1], validate)
    for name, z in (("logits_adv", z_adv), ("logits_clean", z_clean), ("logits_frozen_adv", z_frozen)):
        checks.finite(name, z, validate=validate)
    dt = _compute_dtype(z_adv, z_clean, z_frozen)
    z_adv, z_clean, z_frozen = (z.astype(dt) for z in (z_adv, z_clean, z_frozen))
    reduce = jnp.sum if kl_reduction == "sum" else jnp.mean
    kl_clean = reduce(_kl_rows(z_adv, z_clean))
    kl_frozen = reduce(_kl_rows(z_adv, z_frozen))
    return (_cross_entropy(z_adv, labels) + _scalar("w_clean", w_clean, dt) * kl_clean
            + _scalar("w_frozen", w_frozen, dt) * kl_frozen)


# ----------------------------------------------------------------------------- FARE
def fare_loss(emb_adv, emb_frozen_clean, *, validate: bool = True) -> jax.Array:
    """FARE: mean over the batch of ||emb_adv - emb_frozen_clean||_2^2 (summed over dims).

    Official `l2(out, targets, reduction="mean")`: `mean(mse_loss(out, targets, reduction="none")
    .sum(dim=1))`, i.e. not divided by E. FARE's default `output_normalize=False` uses raw
    embeddings: pass raw ones (or normalised ones for the `output_normalize=True` variant).

    Args:
      emb_adv: `[B, E]` f_theta(x_adv), the trained tower on the adversarial images.
      emb_frozen_clean: `[B, E]` f_0(x), the frozen original tower on the clean images.
      validate: for concrete inputs, check finiteness.

    Returns:
      Scalar loss.
    """
    a = checks.array("emb_adv", emb_adv, "[B, E]")
    b = checks.array("emb_frozen_clean", emb_frozen_clean, "[B, E]")
    checks.same_shape("[B, E]", emb_adv=a, emb_frozen_clean=b)
    checks.finite("emb_adv", a, validate=validate)
    checks.finite("emb_frozen_clean", b, validate=validate)
    dt = _compute_dtype(a, b)
    return jnp.mean(jnp.sum(jnp.square(a.astype(dt) - b.astype(dt)), axis=-1))


def fare_pgd(embed_fn: Callable[[jax.Array], jax.Array], x, target_emb, key, *, eps: float,
             alpha: float = 1 / 255, steps: int = 10, momentum: float = 0.9, delta0=None,
             validate: bool = True) -> jax.Array:
    """FARE's inner attack: momentum-sign L-inf PGD maximising `fare_loss(embed_fn(x + delta), target_emb)`.

    Transcribes `chs20/RobustVLM:train/pgd_train.py:pgd` (norm "linf", mode "max"), as called by
    `train_one_epoch` with `perturbation = U(-eps, eps)`:

        for i in range(steps):
            g = grad(loss)(delta); g[isnan(g)] = 0
            v = sign(momentum * v + sign(g))            # v starts at 0
            delta = clip(delta + alpha * v, -eps, eps)
            delta = clip(x + delta, 0, 1) - x
        return x + delta

    The starting noise is *not* clipped to the image (the first forward pass may see pixels just
    outside [0, 1]), as in the official code. Since |sign(g)| = 1 > momentum, the velocity equals
    sign(g) wherever g != 0: the momentum only matters where the gradient is exactly 0.

    Jittable with `embed_fn` and the hyper-parameters closed over (static).

    Args:
      embed_fn: pixels `[B, H, W, C]` in [0, 1] -> embeddings `[B, E]` of the model being trained
        (it applies resizing and the CLIP mean/std; raw embeddings for FARE's default).
      x: `[B, H, W, C]` clean images in [0, 1].
      target_emb: `[B, E]` f_0(x), the frozen original tower's embeddings of the clean images
        (no gradient flows into it).
      key: PRNG key for delta_0 ~ U(-eps, eps); unused (may be None) when `delta0` is given.
      eps: L-inf radius in [0, 1] (FARE: 2/255 or 4/255).
      alpha: step size (official `stepsize_adv` 1/255).
      steps: iterations (official `iterations_adv` 10).
      momentum: velocity decay (official 0.9).
      delta0: optional `[B, H, W, C]` starting perturbation in [-eps, eps] (replaces the draw).
      validate: check pixel ranges and finiteness of concrete inputs.

    Returns:
      `[B, H, W, C]` adversarial images x + delta, in [0, 1].
    """
    eps = _python_float("eps", eps, 0.0, 1.0, "in [0, 1] (an L-inf radius in pixel units, e.g. 4/255)")
    alpha = _python_float("alpha", alpha, 0.0, None, "a finite number >= 0")
    momentum = _python_float("momentum", momentum, 0.0, None, "a finite number >= 0")
    steps = _non_negative_int("steps", steps)
    x, delta0 = check_pixels_and_noise(x, delta0, eps, validate)
    target = checks.array("target_emb", target_emb, "[B, E]")
    if target.shape[0] != x.shape[0]:
        raise ValueError(f"target_emb must have shape [B, E] with B = {x.shape[0]} (one per image), "
                         f"got {tuple(target.shape)}")
    checks.finite("target_emb", target, validate=validate)
    target = jax.lax.stop_gradient(target)
    if delta0 is None:
        if key is None:
            raise ValueError("key is None: pass a PRNG key (jax.random.key) or an explicit delta0")
        delta0 = jax.random.uniform(key, x.shape, x.dtype, minval=-eps, maxval=eps)

    def objective(delta):
        emb = embed_fn(x + delta)
        return jnp.mean(jnp.sum(jnp.square(emb - target.astype(emb.dtype)), axis=-1))

    def step(carry, _):
        delta, velocity = carry
        grad = jax.grad(objective)(delta)
        grad = jnp.where(jnp.isnan(grad), 0.0, grad)
        velocity = jnp.sign(momentum * velocity + jnp.sign(grad))
        delta = jnp.clip(delta + alpha * velocity, -eps, eps)
        delta = jnp.clip(x + delta, 0.0, 1.0) - x
        return (delta, velocity), None

    (delta, _), _ = jax.lax.scan(step, (delta0, jnp.zeros_like(x)), None, length=steps)
    return x + delta


# ----------------------------------------------------------------------------- AdvFLYP
def advflyp_loss(img_adv, txt, logit_scale, *, img_clean=None, img_frozen_adv=None, frozen_logit_scale=None,
                 w_logit: float = 1.0, w_feature: float = 1.0, validate: bool = True) -> jax.Array:
    """AdvFLYP: CLIP's contrastive loss on (adversarial image, caption) pairs plus two regularisers.

    From `Sxing2/AdvFLYP:code/training_epoch.py:train_epoch_laion` (with `code/func.py:kl_div`):

        L = clip_loss(a, t, s)
            + w_feature * (mean_b ||a_b - a0_b||_2 + mean_b ||a_b - c_b||_2)
            + w_logit * (mean_b KL(softmax(s a t^T)_b || softmax(s0 a0 t^T)_b)
                         + mean_b KL(softmax(s a t^T)_b || softmax(s c t^T)_b))

    with a = normalised f_theta(x_adv), a0 = normalised f_0(x_adv) (frozen original tower),
    c = normalised f_theta(x) (the trained tower on the clean images, *not* detached in the
    official code), t = normalised caption embeddings of the batch (softmax over the B captions),
    s = exp(logit_scale) of the trained model and s0 that of the frozen model. The feature term
    uses the L2 norm (not squared) averaged over the batch; the KL terms are batch means. Both
    regularisers compare the adversarial features/logits to the frozen model's *and* to the clean
    ones. Official weights (`scripts/train.sh`, run "AdvFLYP_full"): `--lambda_logit 1
    --lambda_feat 1 --reg_level logit feat` (argparse default `reg_level` is "logit" only).
    Attack (official): eps = 1/255, 2 steps of 1/255 on the contrastive loss; training: 1M
    smallLAION image-text pairs, bs 256, SGD lr 1e-4.

    Two numerical details differ from a literal transcription but not in value: the official
    `kl_div` takes `softmax(.).log()`, written here as `log_softmax` (no -inf where a probability
    underflows), and the feature norm has gradient 0 at a zero difference (as torch's `norm`
    backward) instead of NaN; at the first step f_theta = f_0, so ||a - a0|| is exactly 0.

    Args:
      img_adv: `[B, E]` normalised embeddings of the adversarial images by the trained tower.
      txt: `[B, E]` normalised caption embeddings, row b paired with image b (AdvFLYP averages
        the raw embeddings of an image's captions, then normalises).
      logit_scale: the multiplier s, already exponentiated (100 for OpenAI CLIP).
      img_clean: `[B, E]` normalised embeddings of the clean images by the trained tower; needed
        when a weight is non-zero.
      img_frozen_adv: `[B, E]` normalised embeddings of the adversarial images by the frozen
        original tower; needed when a weight is non-zero.
      frozen_logit_scale: s0 of the frozen model (default: `logit_scale`).
      w_logit: weight of the logit-level KL terms (official 1).
      w_feature: weight of the feature-level distance terms (official 1).
      validate: for concrete inputs, check finiteness and unit-norm rows.

    Returns:
      Scalar loss.
    """
    w_logit = _python_float("w_logit", w_logit, 0.0, None, "a finite number >= 0")
    w_feature = _python_float("w_feature", w_feature, 0.0, None, "a finite number >= 0")
    a = checks.array("img_adv", img_adv, "[B, E]", min_rows=2)
    t = checks.array("txt", txt, "[B, E]", min_rows=2)
    checks.same_shape("[B, E]", img_adv=a, txt=t)
    checks.unit_norm("img_adv", a, validate=validate)
    checks.unit_norm("txt", t, validate=validate)
    loss = clip_loss(a, t, logit_scale, validate=validate)
    if not (w_logit or w_feature):
        return loss
    missing = [n for n, v in (("img_clean", img_clean), ("img_frozen_adv", img_frozen_adv)) if v is None]
    if missing:
        raise ValueError(f"advflyp_loss needs {' and '.join(missing)} when w_logit or w_feature is non-zero "
                         f"(got w_logit={w_logit}, w_feature={w_feature}); pass them or set both weights to 0")
    c = checks.array("img_clean", img_clean, "[B, E]")
    a0 = checks.array("img_frozen_adv", img_frozen_adv, "[B, E]")
    checks.same_shape("[B, E]", img_adv=a, img_clean=c, img_frozen_adv=a0)
    checks.unit_norm("img_clean", c, validate=validate)
    checks.unit_norm("img_frozen_adv", a0, validate=validate)
    dt = _compute_dtype(a, t, c, a0)
    a, t, c, a0 = (v.astype(dt) for v in (a, t, c, a0))
    scale = _scalar("logit_scale", logit_scale, dt)
    scale0 = scale if frozen_logit_scale is None else _scalar("frozen_logit_scale", frozen_logit_scale, dt)
    loss = loss.astype(dt)
    if w_feature:
        loss = loss + w_feature * (jnp.mean(_safe_norm(a - a0)) + jnp.mean(_safe_norm(a - c)))
    if w_logit:
        z = scale * (a @ t.T)
        kl_frozen = jnp.mean(_kl_rows(z, scale0 * (a0 @ t.T)))
        kl_clean = jnp.mean(_kl_rows(z, scale * (c @ t.T)))
        loss = loss + w_logit * (kl_frozen + kl_clean)
    return loss



def _contrastive_rows(embed_fn, txt, logit_scale, x):
    img = checks.l2_normalize(embed_fn(x))
    dt = _compute_dtype(img, txt)
    logits = logit_scale.astype(dt) * (img.astype(dt) @ txt.astype(dt).T)
    return 0.5 * (smoothed_cross_entropy(logits) + smoothed_cross_entropy(logits.T))


def advflyp_attack_objective(embed_fn: Callable[[jax.Array], jax.Array], txt, logit_scale, *,
                             validate: bool = True) -> Partial:
    """AdvFLYP's attack objective (`code/attacks.py:attack_pgd_captions`) as a per-example loss `x -> [B]`.

    Entry b is (CE of image row b + CE of caption column b) / 2 of the logits
    `logit_scale * normalize(embed_fn(x)) @ txt^T`, so the entries sum to B times the symmetric
    contrastive loss the official attack maximises (`clip_loss`); the sign of the gradient, which
    is all L-inf PGD uses, is the same. The examples are coupled through the in-batch negatives.
    Use it with `clipjax.robust.attacks.pgd(objective, x, key, eps=1/255, alpha=1/255, steps=2)`
    (AdvFLYP's training attack, `scripts/train.sh`).

    Args:
      embed_fn: pixels `[B, H, W, C]` in [0, 1] -> image embeddings `[B, E]` of the model being
        trained (normalised here, as `image_text_cossim` does); a `jax.tree_util.Partial` keeps
        its arrays traced under `jax.jit`.
      txt: `[B, E]` normalised caption embeddings, row b paired with image b.
      logit_scale: the multiplier, already exponentiated (100 for OpenAI CLIP).
      validate: check that a concrete `txt` is finite with unit-norm rows.

    Returns:
      A `jax.tree_util.Partial` mapping `[B, H, W, C]` pixels to `[B]` losses.
    """
    t = checks.array("txt", txt, "[B, E]", min_rows=2)
    checks.unit_norm("txt", t, validate=validate)
    checks.scalar("logit_scale", logit_scale)
    fn = embed_fn if isinstance(embed_fn, Partial) else Partial(embed_fn)
    return Partial(_contrastive_rows, fn, t, jnp.reshape(jnp.asarray(logit_scale), ()))
