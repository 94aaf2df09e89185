"""Contrastive losses: global view, streamed (O(B x block) memory) and sharded.

All losses take `[B, D]` embeddings and scalars; `logit_scale` / `inv_tau` are
the exponentiated multipliers (open_clip's convention), computed in float32.
"""

from clipjax.losses.accumulate import accumulate_contrastive_grads, split_micro_batches
from clipjax.losses.chunked import (
    chunked_clip_loss,
    chunked_siglip_loss,
    row_col_logsumexp,
    row_logsumexp,
    sigmoid_row_sums,
)
from clipjax.losses.contrastive import (
    clip_loss,
    cloob_loss,
    distill_loss,
    hopfield_retrieval,
    info_loob,
    longclip_loss,
    longclip_short_loss,
    principal_component_reconstruction,
    siglip_loss,
    smoothed_cross_entropy,
)
from clipjax.losses.sharded import (
    clip_loss_local,
    cloob_loss_local,
    sharded_clip_loss,
    sharded_cloob_loss,
    sharded_siglip_loss,
    siglip_loss_local,
)

__all__ = [
    "accumulate_contrastive_grads",
    "chunked_clip_loss",
    "chunked_siglip_loss",
    "clip_loss",
    "clip_loss_local",
    "cloob_loss",
    "cloob_loss_local",
    "distill_loss",
    "hopfield_retrieval",
    "info_loob",
    "longclip_loss",
    "longclip_short_loss",
    "principal_component_reconstruction",
    "row_col_logsumexp",
    "row_logsumexp",
    "sharded_clip_loss",
    "sharded_cloob_loss",
    "sharded_siglip_loss",
    "sigmoid_row_sums",
    "siglip_loss",
    "siglip_loss_local",
    "smoothed_cross_entropy",
    "split_micro_batches",
]
