"""Looking inside CLIP: an explicit transformer runner that exposes attention, TextSpan direct-effect
decomposition of ViT image embeddings with mean/zero ablations, TextSpan text-basis search, and
CCS attention-head pruning.

- `clipjax.interpret.explicit`: both towers re-run with einsum attention, returning per-layer attention
  probabilities, per-head outputs and branch outputs, with an optional multiplier on the attention
  probabilities (gradient x attention relevance).
- `clipjax.interpret.decompose`: `decompose_image` (Gandelsman et al., ICLR 2024, `PRSLogger`),
  `mean_ablate`, `zero_ablate`, `mean_ablation_sweep`.
- `clipjax.interpret.textspan`: `textspan` (`replace_with_iterative_removal`), `textspan_heads`.
- `clipjax.interpret.heads`: `prune_heads` (CCS `modify`), `parse_heads`, `ccs_scores`, `ccs_at_k`,
  `skew_metric`.
- `clipjax.interpret.tca`: TCA token condensation (`tca_forward`, `tca_step` and its reservoir).

`clipjax.cli.interpret` is the command line (`clipjax interpret heads` / `prune`). The explicit runner's
building blocks (`image_tokens`, `layer_norm`, ...) and TCA's helpers stay in their modules, and so does the
one-head `textspan` function: exported here it would hide the `clipjax.interpret.textspan` module
(`from clipjax.interpret import textspan` is the module; call `textspan.textspan`).
"""

from clipjax.interpret.decompose import (LEVELS, check_decomposable, component_sum, decompose_image, mean_ablate,
                                         mean_ablation_sweep, zero_ablate)
from clipjax.interpret.explicit import image_forward, run_blocks, text_forward, tower_blocks
from clipjax.interpret.heads import (CCS_HEADS, ccs_at_k, ccs_groups, ccs_scores, head_name, parse_heads,
                                     prune_heads, skew_metric)
from clipjax.interpret.tca import (Reservoir, TCAOutput, reservoir_init, reservoir_logits, reservoir_update,
                                   tca_forward, tca_step)
from clipjax.interpret.textspan import TextSpanResult, textspan_heads, textspan_parts

__all__ = [
    "CCS_HEADS",
    "LEVELS",
    "Reservoir",
    "TCAOutput",
    "TextSpanResult",
    "ccs_at_k",
    "ccs_groups",
    "ccs_scores",
    "check_decomposable",
    "component_sum",
    "decompose_image",
    "head_name",
    "image_forward",
    "mean_ablate",
    "mean_ablation_sweep",
    "parse_heads",
    "prune_heads",
    "reservoir_init",
    "reservoir_logits",
    "reservoir_update",
    "run_blocks",
    "skew_metric",
    "tca_forward",
    "tca_step",
    "text_forward",
    "textspan_heads",
    "textspan_parts",
    "tower_blocks",
    "zero_ablate",
]
