"""Evaluation metrics as pure, jittable functions of embeddings.

Zero-shot classification and retrieval (CLIP_benchmark), CLIPScore / RefCLIPScore
(Hessel et al.) and torchmetrics' variant, CLIP4DM token attribution and F-CLIPScore, CLIP-I,
Vendi score, Schur complement entropy, CMMD, calibration (ECE, NLL, temperature scaling) and GREAT Score, and the
modality gap. Definitions and reference implementations are named in each
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
from clipjax.metrics.calibration import (
    calibration_report,
    expected_calibration_error,
    fit_temperature,
    great_score,
    negative_log_likelihood,
)
from clipjax.metrics.cmmd import cmmd
from clipjax.metrics.fclipscore import clip4dm_relevance, f_clipscore, misaligned_words
from clipjax.metrics.modality_gap import DEFAULT_LAMBDAS, gap_sweep, modality_gap, shift_modalities
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
    "DEFAULT_LAMBDAS",
    "HESSEL_PREFIX",
    "HESSEL_W",
    "SCEResult",
    "build_prompts",
    "calibration_report",
    "classifier_weights",
    "classname_datasets",
    "clip_i",
    "clip4dm_relevance",
    "clip_score",
    "clipscore_prompts",
    "cmmd",
    "entropy_q",
    "expected_calibration_error",
    "f_clipscore",
    "fit_temperature",
    "gap_sweep",
    "get_classnames",
    "get_templates",
    "gram_dual",
    "great_score",
    "modality_gap",
    "negative_log_likelihood",
    "mean_per_class_recall",
    "misaligned_words",
    "openai_imagenet_templates",
    "recall_at_k",
    "ref_clip_score",
    "rff_features",
    "rff_omega",
    "sce_score",
    "schur_vendi",
    "shift_modalities",
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
