"""Evaluation metrics as pure, jittable functions of embeddings.

Zero-shot classification and retrieval (CLIP_benchmark), CLIPScore / RefCLIPScore
(Hessel et al.) and torchmetrics' variant, CLIP-I, Vendi score, Schur complement
entropy and CMMD. Definitions and reference implementations are named in each
module's docstring.
"""

from clipjax.metrics.clipscore import (
    HESSEL_PREFIX,
    HESSEL_W,
    clip_i,
    clip_score,
    clipscore_prompts,
    ref_clip_score,
    torchmetrics_clip_score,
)
from clipjax.metrics.cmmd import cmmd
from clipjax.metrics.retrieval import recall_at_k, topk_retrieval
from clipjax.metrics.sce import SCEResult, rff_features, rff_omega, sce_score, schur_vendi
from clipjax.metrics.templates import (
    build_prompts,
    classname_datasets,
    get_classnames,
    get_templates,
    openai_imagenet_templates,
    template_datasets,
)
from clipjax.metrics.vendi import entropy_q, gram_dual, vendi_score, vendi_score_from_kernel
from clipjax.metrics.zeroshot import (
    classifier_weights,
    mean_per_class_recall,
    topk_accuracy,
    true_class_rank,
    zeroshot_classifier,
    zeroshot_logits,
    zeroshot_metrics,
)

__all__ = [
    "HESSEL_PREFIX",
    "HESSEL_W",
    "SCEResult",
    "build_prompts",
    "classifier_weights",
    "classname_datasets",
    "clip_i",
    "clip_score",
    "clipscore_prompts",
    "cmmd",
    "entropy_q",
    "get_classnames",
    "get_templates",
    "gram_dual",
    "mean_per_class_recall",
    "openai_imagenet_templates",
    "recall_at_k",
    "ref_clip_score",
    "rff_features",
    "rff_omega",
    "sce_score",
    "schur_vendi",
    "template_datasets",
    "topk_accuracy",
    "topk_retrieval",
    "torchmetrics_clip_score",
    "true_class_rank",
    "vendi_score",
    "vendi_score_from_kernel",
    "zeroshot_classifier",
    "zeroshot_logits",
    "zeroshot_metrics",
]
