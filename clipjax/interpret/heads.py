"""Attention-head pruning and the CCS bookkeeping of "Pruning the Paradox" (`avinashsai/CCS-CLIP`).

- `prune_heads`: CCS's soft-pruning (`src/load_model.py:modify`). For each chosen head h of layer l it zeroes
  the head's query rows of `in_proj_weight` and `in_proj_bias` and its columns of `out_proj.weight`; the
  `out_proj` bias stays. In clipjax's layout that is `q_kernel[l, :, h, :]`, `q_bias[l, h, :]` and
  `out_kernel[l, h, :, :]`. The head's output is then zero (a zero-ablation, not a mean-ablation); the
  zeroed query only makes its (now unused) attention uniform.
- Heads are `(layer, head)` pairs or CCS's strings `"L11.H5"` (`src/association.py`; `CCS_HEADS` holds its
  hard-coded high / low lists).
- CCS(h) is the number of head h's top-5 TextSpan texts that judges mark as aligned with the head's concept
  label (`ccs_scores`); CCS@K is the fraction of heads with CCS = K (`ccs_at_k`); "high" heads have CCS = 5,
  "low" heads CCS <= 1 (`ccs_groups`). How the paper combines its three LLM judges is not in the code: the
  judgements here are whatever the user decided per text.
- `skew_metric`: the bias skew of `src/metrics.py:skew_metric`, log((n_a / k) / (N_a / N)) over the top-k
  retrieved items for each attribute a present in the top k.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from clipjax import checks
from clipjax.config import CLIPConfig

__all__ = ["CCS_HEADS", "ccs_at_k", "ccs_groups", "ccs_scores", "head_name", "parse_heads", "prune_heads",
           "skew_metric"]

# src/association.py: the hard-coded high / low CCS heads per model (property_type 'high' / 'low')
CCS_HEADS = {
    "ViT-B-32_openai": {
        "high": ("L11.H5", "L10.H8", "L9.H3", "L8.H11", "L9.H2", "L11.H1", "L11.H9", "L11.H7"),
        "low": ("L8.H5", "L11.H0", "L11.H8", "L9.H9")},
    "ViT-B-32_datacomp_m_s128m_b4k": {
        "high": ("L9.H3", "L8.H3", "L11.H10", "L9.H10", "L10.H7", "L10.H11", "L8.H1", "L8.H10", "L11.H9", "L11.H4",
                 "L11.H3"),
        "low": ("L11.H0", "L9.H5", "L11.H11", "L8.H2", "L11.H1", "L8.H4", "L9.H4", "L8.H9")},
    "ViT-B-16_openai": {
        "high": ("L11.H0", "L10.H5", "L8.H8", "L10.H7", "L11.H6", "L8.H5", "L11.H4", "L11.H3", "L11.H7", "L11.H11"),
        "low": ("L10.H6", "L11.H2", "L9.H3", "L8.H0")},
    "ViT-B-16_laion2b_s34b_b88k": {
        "high": ("L11.H0", "L9.H0", "L9.H3", "L10.H5", "L11.H6", "L11.H10", "L9.H1", "L11.H2", "L10.H10", "L8.H7",
                 "L8.H6", "L11.H8", "L11.H7"),
        "low": ("L10.H8", "L9.H2", "L8.H10", "L8.H4", "L8.H5", "L10.H6")},
    "ViT-L-14_openai": {
        "high": ("L21.H13", "L22.H1", "L22.H9", "L21.H1", "L21.H15", "L21.H0", "L20.H2", "L20.H12", "L22.H5",
                 "L23.H4", "L22.H15", "L21.H8", "L23.H10", "L23.H11", "L22.H2", "L22.H13"),
        "low": ("L23.H5", "L21.H3", "L22.H14", "L20.H15", "L20.H6", "L22.H6", "L22.H4", "L22.H0", "L21.H2",
                "L20.H4", "L20.H1")},
    "ViT-L-14_laion2b_s32b_b82k": {
        "high": ("L22.H1", "L21.H1", "L22.H5", "L21.H9", "L22.H3", "L22.H6", "L22.H12", "L22.H0", "L23.H6",
                 "L23.H8", "L21.H11", "L23.H4", "L22.H13", "L21.H0", "L22.H10", "L21.H5", "L22.H8", "L23.H5",
                 "L23.H9", "L20.H14", "L20.H4"),
        "low": ("L23.H1", "L21.H6", "L20.H13")},
}

_NAME = re.compile(r"^L(\d+)\.H(\d+)$")


def head_name(layer: int, head: int) -> str:
    """CCS's name of a head, `"L{layer}.H{head}"`."""
    return f"L{layer}.H{head}"


def parse_heads(heads: Iterable[Any], *, layers: int, num_heads: int,
                name: str = "heads") -> tuple[tuple[int, int], ...]:
    """Validated `((layer, head), ...)` from `(layer, head)` pairs and/or `"L11.H5"` strings.

    Raises:
      ValueError: naming the entry when it is malformed or its layer is outside `[0, layers)` or its head
        outside `[0, num_heads)`.
    """
    if isinstance(heads, str) or (isinstance(heads, tuple) and len(heads) == 2
                                  and all(isinstance(v, (int, np.integer)) for v in heads)):
        heads = [heads]  # one head given on its own
    out = []
    for item in heads:
        if isinstance(item, str):
            match = _NAME.match(item.strip())
            if not match:
                raise ValueError(f"{name}: {item!r} is not a head name like 'L11.H5' (layer 11, head 5)")
            layer, head = int(match.group(1)), int(match.group(2))
        else:
            try:
                layer, head = item
            except (TypeError, ValueError):
                raise ValueError(f"{name}: {item!r} is neither a (layer, head) pair nor a name like 'L11.H5'") from None
            if any(isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) for v in (layer, head)):
                raise ValueError(f"{name}: {item!r} must hold two ints (layer, head)")
            layer, head = int(layer), int(head)
        if not 0 <= layer < layers:
            raise ValueError(f"{name}: {item!r} has layer {layer} outside [0, {layers})")
        if not 0 <= head < num_heads:
            raise ValueError(f"{name}: {item!r} has head {head} outside [0, {num_heads})")
        out.append((layer, head))
    return tuple(out)


def head_mask(heads: Sequence[tuple[int, int]], layers: int, num_heads: int) -> np.ndarray:
    """Boolean `[layers, num_heads]`, True at the given (already parsed) heads."""
    mask = np.zeros((layers, num_heads), bool)
    for layer, head in heads:
        mask[layer, head] = True
    return mask


def tower_shape(config: CLIPConfig, tower: str) -> tuple[str, int, int]:
    """`(params key, layers, heads)` of a transformer tower; `ValueError` for a ResNet image tower."""
    if tower == "image":
        if config.vision.arch != "vit":
            raise ValueError(f"tower='image' needs a ViT image tower, got vision.arch={config.vision.arch!r}")
        return "visual", config.vision.layers, config.vision.heads
    if tower == "text":
        return "text", config.text.layers, config.text.heads
    raise ValueError(f"tower must be 'image' or 'text', got {tower!r}")


_PRUNED = {"q_kernel": (slice(None), None, slice(None), None),  # [L, D, H, Dh]
           "q_bias": (slice(None), slice(None), None),  # [L, H, Dh]
           "out_kernel": (slice(None), slice(None), None, None)}  # [L, H, Dh, D]


def prune_heads(params: Any, config: CLIPConfig, heads: Iterable[Any], tower: str = "image") -> Any:
    """CCS soft-pruning: zero the chosen heads' query kernel and bias and their output-projection rows.

    Args:
      params: the model state (`nnx.State` or the same tree as plain dicts); not modified.
      config: the model config.
      heads: `[(layer, head), ...]` and/or CCS names `["L11.H5", ...]`; duplicates are harmless.
      tower: `"image"` (CCS's choice; ViT only) or `"text"`.

    Returns:
      New params of the same structure, with `q_kernel[l, :, h, :]`, `q_bias[l, h, :]` and
      `out_kernel[l, h, :, :]` zero for every chosen (l, h); every other leaf (the out bias included)
      is the input's.

    Raises:
      ValueError: a malformed head, or a layer / head out of range for the tower (naming it).
    """
    key, layers, num_heads = tower_shape(config, tower)
    keep = jnp.asarray(~head_mask(parse_heads(heads, layers=layers, num_heads=num_heads), layers, num_heads))
    prefix = [key, "transformer", "blocks", "attn"]

    def prune(path, leaf):
        names = [getattr(k, "key", None) for k in path]
        if names[:4] == prefix and len(names) > 4 and names[4] in _PRUNED:
            return jnp.where(keep[_PRUNED[names[4]]], leaf, jnp.zeros((), leaf.dtype))
        return leaf

    return jax.tree_util.tree_map_with_path(prune, params)


# ----------------------------------------------------------------------------- CCS bookkeeping
def ccs_scores(judgements: Any) -> jax.Array:
    """CCS per head: how many of its texts were judged aligned with its concept label.

    Args:
      judgements: `[N, T]` bool or 0/1 array, row n the judgements of head n's top-T TextSpan texts
        (T = 5 in the paper), True = aligned.

    Returns:
      `[N]` int32 counts in `[0, T]`.
    """
    j = checks.array("judgements", judgements, "[N, T]", dtype=None)
    if j.dtype != jnp.bool_:
        if checks.is_concrete(j) and not np.isin(np.asarray(j), (0, 1)).all():
            raise ValueError("judgements must be booleans or 0/1 values")
        j = j != 0
    return jnp.sum(j, axis=1, dtype=jnp.int32)


def ccs_at_k(scores: Any, k: int) -> jax.Array:
    """CCS@K: the fraction of heads whose CCS equals `k` (float32 scalar in [0, 1])."""
    s = checks.array("scores", scores, "[N]", dtype="integer")
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or k < 0:
        raise ValueError(f"k must be a non-negative integer, got {k!r}")
    return jnp.mean((s == k).astype(jnp.float32))


def ccs_groups(scores: Any, *, texts: int = 5) -> tuple[jax.Array, jax.Array]:
    """`(high [N], low [N])` boolean masks: CCS = `texts` (all aligned) and CCS <= 1."""
    s = checks.array("scores", scores, "[N]", dtype="integer")
    checks.positive_int("texts", texts)
    return s == texts, s <= 1


@functools.partial(jax.jit, static_argnames=("k", "num_attributes"))
def _skew(scores, attributes, k: int, num_attributes: int):
    order = jnp.argsort(-scores, stable=True)
    top = jnp.bincount(attributes[order[:k]], length=num_attributes)
    total = jnp.bincount(attributes, length=num_attributes)
    ratio = (top / k) / jnp.where(total > 0, total / scores.shape[0], 1.0)
    return jnp.where(top > 0, jnp.log(jnp.where(top > 0, ratio, 1.0)), jnp.nan)


def skew_metric(scores: Any, attributes: Any, *, k: int, num_attributes: int) -> jax.Array:
    """Bias skew of the top-k retrieved items per attribute (`src/metrics.py:skew_metric`).

    Items are ranked by `scores` (descending; ties keep the input order, as Python's stable
    `sort(reverse=True)`), and for every attribute a present among the top `k`:
    skew_a = log((n_a / k) / (N_a / N)), with n_a its count in the top k, N_a its count among all N items.

    Args:
      scores: `[N]` similarities (e.g. cos(text query, image)).
      attributes: `[N]` int attribute of each item (e.g. a gender or race group) in `[0, num_attributes)`.
      k: how many top items (static, 1 <= k <= N).
      num_attributes: A (static).

    Returns:
      `[A]` skews; NaN for attributes absent from the top k (the reference leaves them out), so the
      reference's max / min skew are `nanmax` / `nanmin`.
    """
    s = checks.array("scores", scores, "[N]")
    a = checks.array("attributes", attributes, "[N]", dtype="integer")
    checks.same_len(scores=s, attributes=a)
    checks.positive_int("k", k)
    checks.positive_int("num_attributes", num_attributes)
    if k > s.shape[0]:
        raise ValueError(f"k={k} is larger than the number of items N={s.shape[0]}")
    checks.index_range("attributes", a, num_attributes)
    checks.finite("scores", s)
    return _skew(s, a, k, num_attributes)
