"""Adversarial robustness of CLIP: attacks, robust evaluation, defences, adversarial fine-tuning, fooling images.

* `clipjax.robust.attacks`: projected gradient descent (TeCoA's L-inf `attack_pgd`, torchattacks' L2 PGD,
  the CE and CW-margin losses).
* `clipjax.robust.apgd`: AutoAttack's APGD-CE, APGD-DLR and APGD-T transcribed to fixed-shape JAX.
* `clipjax.robust.evaluate`: the attacked zero-shot classifier (`zero_shot_logits_fn`), `robust_accuracy`
  and the named protocols of TeCoA, TTC, PMG-AFT and FARE (`PROTOCOLS`).
* `clipjax.robust.ttc`: TTC's tau-thresholded weighted test-time counterattacks.
* `clipjax.robust.finetune`: the TeCoA, PMG-AFT, FARE and AdvFLYP fine-tuning losses and FARE's inner
  attack (the trainer runs them: `clipjax.train.adversarial`).
* `clipjax.robust.fooling`: CLIPMasterPrints mining (Adam in pixel space, CMA-ES with evosax), fooling
  accuracy and the modality-gap shift mitigation.

Images are `[B, H, W, 3]` pixels in [0, 1] before CLIP normalisation, at the model's resolution; class
weights are `[C, E]` (one row per class: the transpose of `clipjax.metrics.zeroshot_classifier`'s
`[E, C]`). Every function is a pure, jittable function of arrays that runs sharded when its inputs are.
"""

from clipjax.robust.apgd import apgd, apgd_targeted
from clipjax.robust.attacks import pgd, pgd_classifier
from clipjax.robust.evaluate import PROTOCOLS, robust_accuracy, zero_shot_logits_fn
from clipjax.robust.finetune import advflyp_loss, fare_loss, fare_pgd, pmg_aft_loss, tecoa_loss
from clipjax.robust.fooling import (embedding_gap, fooling_accuracy, master_print_loss, mine_cmaes, mine_pixels,
                                    shift_embeddings)
from clipjax.robust.ttc import tau_thresholded_counterattack

__all__ = ["PROTOCOLS", "advflyp_loss", "apgd", "apgd_targeted", "embedding_gap", "fare_loss", "fare_pgd",
           "fooling_accuracy", "master_print_loss", "mine_cmaes", "mine_pixels", "pgd", "pgd_classifier",
           "pmg_aft_loss", "robust_accuracy", "shift_embeddings", "tau_thresholded_counterattack", "tecoa_loss",
           "zero_shot_logits_fn"]
