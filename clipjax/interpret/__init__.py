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
"""
