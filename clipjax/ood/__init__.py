"""Zero-shot OOD detection from CLIP embeddings: scores, negative labels, AdaNeg, CLIPN and metrics.

Every score is an ID-ness score (higher = more in-distribution); pass ID and OOD
scores to `auroc` / `fpr_at_tpr` / `ood_metrics`. Functions take arrays, never
models; `clipjax.cli.ood` is the command line over a model folder.
"""

from clipjax.ood.adaneg import AdaNegOutput, AdaNegState, adaneg_scores, adaneg_update, init_memory
from clipjax.ood.clipn import CLIPNScores, clipn_scores
from clipjax.ood.metrics import CONVENTIONS, auroc, fpr_at_tpr, ood_metrics
from clipjax.ood.neglabel import (NegativeLabels, group_permutation, grouped_id_probability, mine_negative_labels,
                                  neglabel_score, percentile_similarity)
from clipjax.ood.scores import cosine_similarity, energy, gl_mcm, local_mcm, max_logit, mcm, msp
from clipjax.ood.wordlist import (ADJECTIVE_TEMPLATE, NOUN_TEMPLATE, check_class_names, default_wordlist,
                                  load_wordlist, negative_prompts)

__all__ = [
    "ADJECTIVE_TEMPLATE",
    "AdaNegOutput",
    "AdaNegState",
    "CLIPNScores",
    "CONVENTIONS",
    "NOUN_TEMPLATE",
    "NegativeLabels",
    "adaneg_scores",
    "adaneg_update",
    "auroc",
    "check_class_names",
    "clipn_scores",
    "cosine_similarity",
    "default_wordlist",
    "energy",
    "fpr_at_tpr",
    "gl_mcm",
    "group_permutation",
    "grouped_id_probability",
    "init_memory",
    "load_wordlist",
    "local_mcm",
    "max_logit",
    "mcm",
    "mine_negative_labels",
    "msp",
    "negative_prompts",
    "neglabel_score",
    "ood_metrics",
    "percentile_similarity",
]
