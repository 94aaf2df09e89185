"""`TrainConfig`: the frozen, hashable description of a training run (not of the model).

The model's architecture is a `clipjax.config.CLIPConfig`; this holds everything else a run
needs: loss, optimizer, schedule, batch, accumulation, EMA, freezing, logging and saving.
Defaults are open_clip's (`open_clip_train/params.py`): AdamW with beta2 0.98 and eps 1e-6
(its ViT defaults), weight decay 0.2, warm-up then cosine, logit scale clamped to ln(100).
Experiments build it from an ml_collections config (`experiments/train.py`); the library never
sees a ConfigDict.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from clipjax.config import ConfigError

ADVERSARIAL_LOSSES = ("tecoa", "pmg-aft", "fare", "advflyp")
LOSSES = ("clip", "siglip", "cloob", "distill", "longclip") + ADVERSARIAL_LOSSES
SCHEDULES = ("cosine", "const", "const-cooldown")
OPTIMIZERS = ("adamw", "sgd")


@dataclass(frozen=True)
class TrainConfig:
    """A training run. Steps count optimizer updates; `batch_size` is the global batch.

    Attributes:
      loss: "clip" (softmax InfoNCE), "siglip" (pairwise sigmoid), "cloob" (InfoLOOB on Hopfield
        retrievals; the model's logit scale is CLOOB's 1/tau) or "distill" (CLIP loss plus open_clip's
        distillation term from a teacher passed to the trainer) or "longclip" (Long-CLIP fine-tuning:
        long captions against images plus short captions, batch key "short_text", against the
        images' top `longclip_components` principal components (PCA per batch device, as Long-CLIP
        per GPU); set `label_smoothing=0.1` as Long-CLIP does; text positions < 20 stay frozen).
        Adversarial fine-tuning of the image tower (`clipjax.train.adversarial`, robustness.md items 1,
        2 and 13): "tecoa" (CE on adversarial images against fixed class text embeddings; batch key
        "label"), "pmg-aft" (TeCoA plus KL(p_adv || p_clean) + KL(p_adv || p_frozen), the official code's
        direction; "label"),
        "fare" (embedding distance of adversarial images to the frozen model's clean embeddings, no
        labels), "advflyp" (the CLIP loss on adversarial image-caption pairs plus weighted logit- and
        feature-level terms to the frozen model). The frozen model is the trainer's `reference`.
      batch_size: global batch (all processes, all micro-batches).
      total_steps: optimizer updates of the run (the schedule's length).
      lr, warmup_steps, schedule: open_clip's `--lr`, `--warmup`, `--lr-scheduler`; warm-up is
        `lr * (step + 1) / warmup_steps` as in open_clip.
      cooldown_steps, cooldown_power, lr_cooldown_end: `const-cooldown`'s tail (`--epochs-cooldown`
        in steps, `--lr-cooldown-power`, `--lr-cooldown-end`).
      optimizer: "adamw" (open_clip's) or "sgd" (torch SGD with momentum `beta1` and coupled weight
        decay, as TeCoA and PMG-AFT train).
      beta1, beta2, eps, weight_decay: AdamW; decay skips gains, biases and the logit scale/bias
        (`clipjax.train.param_groups.decay_mask`, open_clip's rule).
      grad_clip_norm: global-norm clipping (None: off), as `--grad-clip-norm`.
      max_log_logit_scale: the stored `log_logit_scale` is clamped to [0, this] after each update
        (ln 100: the multiplier `logit_scale` stays <= 100).
      label_smoothing: CLIP loss label smoothing.
      loss_block_size: stream the loss in column blocks of this size (None: full logits).
      hopfield_beta: CLOOB's Hopfield inverse temperature.
      longclip_components: principal components kept for Long-CLIP's short-caption loss (32).
      micro_batches: gradient accumulation that keeps every negative (GradCache form).
      ema_decay: keep an exponential moving average of the params (None: off).
      patch_dropout: FLIP image-token drop ratio while training (ViT only).
      unmasked_steps: the last this-many steps run without patch dropout (FLIP's unmasked tuning).
      lock_image, lock_image_unlocked_groups, lock_text, lock_text_unlocked_layers: open_clip's
        `--lock-image`, `--lock-image-unlocked-groups`, `--lock-text`, `--lock-text-unlocked-layers`.
      layer_decay: layer-wise learning-rate decay factor (None: off).
      seed: param init, data order and dropout randomness.
      dtype, param_dtype, remat: compute dtype, master param dtype and remat policy of the run
        (run-time options applied to the model config at train time).
      log_every, checkpoint_every, eval_every: intervals in steps; 0 turns saving or eval off.
      keep_checkpoints, keep_every: keep the last N checkpoints, plus every K-th step (None: no).
      adv_eps, adv_alpha, adv_steps, adv_random_start: the inner L-inf attack of the adversarial
        losses, in [0, 1] pixel units (TeCoA's training attack: eps = alpha = 1/255, 2 steps, random
        start; FARE: eps 2/255 or 4/255, alpha 1/255, 10 steps).
      adv_momentum: FARE's inner attack momentum (0.9).
      adv_logit_scale: the multiplier of the TeCoA / PMG-AFT classifier (TeCoA: exp of OpenAI CLIP's
        logit scale, 100; the stored PMG-AFT code's classifier gives plain cosines, 1).
      pmg_clean_weight, pmg_frozen_weight: PMG-AFT's weights of KL(p_adv || p_clean) and
        KL(p_adv || p_frozen) (official code: 1 and 1, KL summed over the batch).
      advflyp_logit_weight, advflyp_feature_weight: AdvFLYP's logit-level and feature-level terms
        (`Sxing2/AdvFLYP` scripts/train.sh: 1 and 1; 0 turns a term off).
    """

    loss: str = "clip"
    batch_size: int = 256
    total_steps: int = 1000
    lr: float = 5e-4
    warmup_steps: int = 10000
    schedule: str = "cosine"
    cooldown_steps: int = 0
    cooldown_power: float = 1.0
    lr_cooldown_end: float = 0.0
    optimizer: str = "adamw"
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    weight_decay: float = 0.2
    grad_clip_norm: float | None = None
    max_log_logit_scale: float = math.log(100.0)
    label_smoothing: float = 0.0
    loss_block_size: int | None = None
    hopfield_beta: float = 14.3
    longclip_components: int = 32
    micro_batches: int = 1
    ema_decay: float | None = None
    patch_dropout: float = 0.0
    unmasked_steps: int = 0
    lock_image: bool = False
    lock_image_unlocked_groups: int = 0
    lock_text: bool = False
    lock_text_unlocked_layers: int = 0
    layer_decay: float | None = None
    seed: int = 0
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    log_every: int = 10
    checkpoint_every: int = 0
    eval_every: int = 0
    keep_checkpoints: int = 3
    keep_every: int | None = None
    adv_eps: float = 1.0 / 255
    adv_alpha: float = 1.0 / 255
    adv_steps: int = 2
    adv_random_start: bool = True
    adv_momentum: float = 0.9
    adv_logit_scale: float = 100.0
    pmg_clean_weight: float = 1.0
    pmg_frozen_weight: float = 1.0
    advflyp_logit_weight: float = 1.0
    advflyp_feature_weight: float = 1.0

    def __post_init__(self):
        def need(ok: bool, what: str):
            if not ok:
                raise ConfigError(f"train config: {what}")

        need(self.loss in LOSSES, f"loss={self.loss!r}; expected one of {LOSSES}")
        need(self.optimizer in OPTIMIZERS, f"optimizer={self.optimizer!r}; expected one of {OPTIMIZERS}")
        need(self.schedule in SCHEDULES, f"schedule={self.schedule!r}; expected one of {SCHEDULES}")
        need(self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1")
        need(self.total_steps >= 1, f"total_steps={self.total_steps} must be >= 1")
        need(self.warmup_steps >= 0, f"warmup_steps={self.warmup_steps} must be >= 0")
        need(self.micro_batches >= 1 and self.batch_size % self.micro_batches == 0,
             f"batch_size={self.batch_size} must divide into micro_batches={self.micro_batches}")
        need(0.0 <= self.patch_dropout < 1.0, f"patch_dropout={self.patch_dropout} must be in [0, 1)")
        need(self.ema_decay is None or 0.0 < self.ema_decay < 1.0, f"ema_decay={self.ema_decay} must be in (0, 1)")
        need(self.layer_decay is None or 0.0 < self.layer_decay <= 1.0,
             f"layer_decay={self.layer_decay} must be in (0, 1]")
        need(self.schedule != "const-cooldown" or 0 < self.cooldown_steps <= self.total_steps - self.warmup_steps,
             f"const-cooldown needs 0 < cooldown_steps={self.cooldown_steps} <= total_steps - warmup_steps")
        need(self.grad_clip_norm is None or self.grad_clip_norm > 0, "grad_clip_norm must be > 0 or None")
        need(self.loss_block_size is None or self.loss_block_size >= 1, "loss_block_size must be >= 1 or None")
        for name in ("log_every", "checkpoint_every", "eval_every"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0 (0 turns it off)")
        need(self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1")
        need(0.0 <= self.adv_eps <= 1.0 and 0.0 <= self.adv_alpha <= 1.0,
             f"adv_eps={self.adv_eps} and adv_alpha={self.adv_alpha} must be in [0, 1] (pixel units)")
        need(self.adv_steps >= 0, f"adv_steps={self.adv_steps} must be >= 0")

    def replace(self, **kw) -> "TrainConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Inverse of `to_dict`; unknown keys raise `ConfigError` naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        extra = sorted(set(d) - names)
        if extra:
            raise ConfigError(f"unknown train config keys {extra}; expected a subset of {sorted(names)}")
        return cls(**d)
