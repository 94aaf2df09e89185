"""Param masks and multiplier trees for the optax chain: weight decay, locking, layer-wise lr decay.

Every function takes the params `nnx.State` of `clipjax.models.clip.init_params(config)` (or
`abstract_params(config)`: only shapes are read) and returns a tree with exactly the same
structure: each `nnx.Variable` is kept (same type and metadata) with its value replaced by the
mask or multiplier. So a result `jax.tree.map`s leaf-for-leaf with params and grads, is a valid
optax `mask`, and `.to_pure_dict()` gives the plain nested dict. Plain (non-Variable) leaves work
too and are replaced directly.

Stacked layers: every param under `...transformer.blocks.` has a leading `[layers, ...]` axis.
Per-layer values for such a leaf are an array `[layers, 1, ..., 1]` (broadcastable to the leaf);
all other leaves get a scalar array. BatchNorm statistics (`nnx.BatchStat`, or any `bn*.mean` / `bn*.var` leaf) and every non-`Param` Variable are never
decayed and never trained; the functions work with or without them in the tree.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from clipjax.config import CLIPConfig

__all__ = ["param_names", "decay_mask", "trainable_mask", "layer_decay_multipliers", "scale_by_tree"]

_VECTORS = ("bias", "scale", "class_embedding", "log_logit_scale", "logit_bias")  # torch 0-D/1-D tensors
_SCALARS = ("log_logit_scale", "logit_bias")
_RN_STAGES = {"conv1": 0, "bn1": 0, "conv2": 0, "bn2": 0, "conv3": 0, "bn3": 0, "layer1": 1, "layer2": 2,
              "layer3": 3, "layer4": 4, "attnpool": 5}


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def _key(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _map(fn, params):
    """`fn(dotted_name, leaf, shape)` on each leaf; Variables keep their type and metadata."""

    def one(path, leaf):
        name = ".".join(_key(k) for k in path)
        if _is_var(leaf):
            return leaf.replace(fn(name, leaf, tuple(np.shape(leaf.get_value()))))
        return fn(name, leaf, tuple(np.shape(leaf)))

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=_is_var)


def _is_stat(name: str, leaf) -> bool:
    """BatchNorm running statistics (or any non-Param state): never decayed or trained."""
    if _is_var(leaf) and not isinstance(leaf, nnx.Param):
        return True
    parts = name.split(".")
    return len(parts) >= 2 and parts[-1] in ("mean", "var") and parts[-2].startswith("bn")


def _stacked(name: str) -> bool:
    return ".transformer.blocks." in f".{name}"


def param_names(params):
    """Dotted path of each leaf, e.g. `"visual.transformer.blocks.attn.q_kernel"`.

    Args:
      params: params `nnx.State` (or any pytree of Variables / arrays).

    Returns:
      Tree like `params` with `str` values (ResNet stage blocks appear as `layer1.0.conv1.kernel`).
    """
    return _map(lambda name, leaf, shape: name, params)


def decay_mask(params):
    """True where weight decay applies: open_clip's rule, translated to clipjax names.

    open_clip (`open_clip_train/main.py`) excludes a torch parameter `n, p` from weight decay when
    `p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n`, and decays the
    rest. clipjax follows open_clip exactly, deciding from names because clipjax reshapes some
    tensors: q/k/v kernels `[D, H, Dh]` are torch matrices (decayed), q/k/v biases `[H, Dh]` are
    torch vectors (not decayed), and stacked `blocks` params are judged without the layer axis.
    Not decayed: every bias, LayerNorm/BatchNorm `scale`, `class_embedding` (1-D in torch),
    `log_logit_scale`, `logit_bias` (0-D) and BatchNorm statistics. Decayed: all kernels and conv
    weights, the projections, and - note - the token embedding, the positional embeddings
    (text, ViT, ResNet attention pool) and the SigLIP MAP probe, which are 2-D/3-D in torch so
    open_clip DOES decay them (its `no_weight_decay()` lists are only for timm optimizers and are
    not used by this rule).

    Args:
      params: params `nnx.State`.

    Returns:
      Tree like `params` with Python `bool` values.
    """

    def one(name, leaf, shape):
        last = name.rsplit(".", 1)[-1]
        if _is_stat(name, leaf) or last in _VECTORS or last.endswith("_bias"):
            return False
        return len(shape) - int(_stacked(name)) >= 2

    return _map(one, params)


def _groups(name: str, config: CLIPConfig, n_layers: int | None):
    """`(tower, lock group, layer id, tower depth L)` of a leaf; arrays over layers for stacked leaves.

    ViT / text groups (open_clip `VisionTransformer.lock`, timm `group_matcher`, `lock_text_tower`):
    0 = embeddings, 1..L-1 = blocks 0..L-2, L = last block + ln_post / ln_final, L+1 = head
    (proj / MAP head; text: projection). Layer ids: 0 embeddings, i+1 block i, L+1 after the blocks.
    CoCa: `cls_emb` is an embedding; the attentional pooler is in no lock group (group -1: frozen whenever
    the image tower is locked, as open_clip's `VisionTransformer.lock` leaves it), layer id L+1.
    ResNet: stem 0, layer1..4 = 1..4, attnpool 5 for both (L = 4).
    """
    parts = name.split(".")
    tower, rest = parts[0], parts[1:]
    if tower in _SCALARS and not rest:
        return None
    if tower not in ("visual", "text") or not rest:
        raise ValueError(f"param {name!r} is not part of a clipjax CLIP model")
    if tower == "visual" and config.vision.arch == "resnet":
        if rest[0] not in _RN_STAGES:
            raise ValueError(f"unknown ResNet param {name!r}")
        return tower, _RN_STAGES[rest[0]], _RN_STAGES[rest[0]], 4
    depth = config.vision.layers if tower == "visual" else config.text.layers
    if rest[:2] == ["transformer", "blocks"]:
        if n_layers != depth:
            raise ValueError(f"{name!r} has {n_layers} stacked layers, the config says {depth}")
        ids = np.arange(depth) + 1
        return tower, ids, ids, depth
    embed = ("patch_kernel", "patch_bias", "class_embedding", "pos_embed", "ln_pre", "token_embed", "cls_emb")
    post = ("ln_post", "ln_final")
    head = ("proj", "proj_bias", "map_head")
    if rest[0] in embed:
        return tower, 0, 0, depth
    if rest[0] in post:
        return tower, depth, depth + 1, depth
    if rest[0] in head:
        return tower, depth + 1, depth + 1, depth
    if rest[0] == "attn_pool":  # CoCa's pooler: in no open_clip lock group, so a locked tower keeps it frozen
        return tower, -1, depth + 1, depth
    raise ValueError(f"unknown {tower} param {name!r}")


def _per_layer(value, name: str, shape: tuple) -> np.ndarray:
    value = np.asarray(value, np.float32)
    if _stacked(name):
        return np.broadcast_to(value, shape[:1]).reshape(shape[:1] + (1,) * (len(shape) - 1)).copy()
    return value.reshape(())


def trainable_mask(params, config: CLIPConfig, *, lock_image: bool = False, lock_image_unlocked_groups: int = 0,
                   lock_text: bool = False, lock_text_unlocked_layers: int = 0):
    """1.0 where a param trains, 0.0 where it is frozen: open_clip's `lock_image_tower` / `lock_text_tower`.

    The groups mirror open_clip; the last `unlocked` groups of a locked tower stay trainable (more
    than the number of groups unlocks all, 0 freezes the whole tower):

    - ViT image tower (`VisionTransformer.lock`; the timm SigLIP trunk's `group_matcher` gives
      the same grouping): [patch embedding, class/positional embedding, ln_pre], each block but
      the last, [last block, ln_post], [proj or MAP head] - L + 2 groups.
    - Text tower (`transformer.lock_text_tower`): [token, positional embedding], each block but
      the last, [last block, ln_final], [projection (and its bias)] only if the tower has one.
    - ResNet image tower: [stem], layer1, ..., layer4, [attnpool]. open_clip 3.3.0's
      `ModifiedResNet.lock` asserts `unlocked_groups == 0`; partial unlocking is a clipjax
      extension with these groups.

    `log_logit_scale` / `logit_bias` always train (open_clip never locks them); BatchNorm statistics
    never do.

    Args:
      params: params `nnx.State`.
      config: the model's `CLIPConfig`.
      lock_image, lock_image_unlocked_groups: freeze the image tower but its last groups.
      lock_text, lock_text_unlocked_layers: freeze the text tower but its last groups.

    Returns:
      Tree like `params` of float32 arrays: `[layers, 1, ..., 1]` for stacked `blocks` leaves,
      scalars `()` otherwise.

    Raises:
      ValueError: a negative group count, or a param name or layer count that does not fit `config`.
    """
    if lock_image_unlocked_groups < 0 or lock_text_unlocked_layers < 0:
        raise ValueError("unlocked group/layer counts must be >= 0")
    locks = {"visual": lock_image_unlocked_groups if lock_image else None,
             "text": lock_text_unlocked_layers if lock_text else None}

    def n_groups(tower: str, depth: int) -> int:
        if tower == "visual" and config.vision.arch == "resnet":
            return 6
        return depth + 2 if tower == "visual" or config.text_proj else depth + 1

    def one(name, leaf, shape):
        if _is_stat(name, leaf):
            return _per_layer(0.0, name, shape)
        g = _groups(name, config, shape[0] if _stacked(name) else None)
        if g is None or locks[g[0]] is None:
            return _per_layer(1.0, name, shape)
        tower, group, _, depth = g
        group = np.asarray(group)  # group -1 (CoCa's pooler) is in no group: never unlocked
        return _per_layer((group >= n_groups(tower, depth) - locks[tower]) & (group >= 0), name, shape)

    return _map(one, params)


def freeze_rows(mask, params, name: str, rows: int):
    """`mask` (a `trainable_mask` tree) with the first `rows` rows of the param `name` set to 0.

    That leaf becomes a `[n, 1, ...]` array broadcastable to the param, e.g. Long-CLIP's frozen
    first 20 text positions: `freeze_rows(mask, params, "text.pos_embed", 20)`.
    """
    values = dict(zip(jax.tree.leaves(param_names(mask)), (np.asarray(v, np.float32) for v in jax.tree.leaves(mask))))
    hit = []

    def one(leaf_name, leaf, shape):
        if leaf_name != name:
            return values[leaf_name]
        hit.append(leaf_name)
        keep = (np.arange(shape[0]) >= rows).astype(np.float32).reshape((shape[0],) + (1,) * (len(shape) - 1))
        return values[leaf_name] * keep

    out = _map(one, params)
    if not hit:
        raise ValueError(f"no param named {name!r}")
    return out


def layer_decay_multipliers(params, config: CLIPConfig, decay: float):
    """Layer-wise learning-rate decay multipliers (BEiT / big_vision style), per tower.

    Layer id 0: embeddings (patch embedding, class/positional embeddings, ln_pre; text token and
    positional embeddings); i + 1: transformer block i; L + 1: everything after the blocks
    (ln_post, MAP head, projections, ln_final). Multiplier `decay ** (L + 1 - id)` with L the
    tower's layer count, so the head gets 1.0. ResNet towers: stem 0, layer1..4 = 1..4,
    attnpool 5 (L = 4). `log_logit_scale` / `logit_bias` get 1.0.

    Args:
      params: params `nnx.State`.
      config: the model's `CLIPConfig`.
      decay: per-layer factor, typically in (0, 1]; 1.0 gives all ones.

    Returns:
      Tree like `params` of float32 arrays, `[layers, 1, ..., 1]` for stacked leaves, `()` otherwise.
    """

    def one(name, leaf, shape):
        g = _groups(name, config, shape[0] if _stacked(name) else None)
        if g is None:
            return _per_layer(1.0, name, shape)
        _, _, layer_id, depth = g
        return _per_layer(float(decay) ** (depth + 1 - np.asarray(layer_id, np.float64)), name, shape)

    return _map(one, params)


def scale_by_tree(multipliers) -> optax.GradientTransformation:
    """Multiply each update leaf by the matching leaf of `multipliers` (stateless).

    optax 0.2.8 has no such transformation (`optax.scale` takes one scalar; `optax.tree.mul`
    is the bare tree product), hence this one. Multipliers broadcast against the updates
    (`[layers, 1, ..., 1]` against `[layers, ...]`) and are cast to each update's dtype; leaves
    masked out by an enclosing `optax.masked` (`optax.MaskedNode`) pass through.

    Args:
      multipliers: tree with the structure of the params (e.g. from `trainable_mask` or
        `layer_decay_multipliers`), or a prefix of it.

    Returns:
      An `optax.GradientTransformation` whose `init` returns `optax.EmptyState()`.
    """

    def update_fn(updates, state, params=None):
        del params

        def mul(m, g):
            if g is None or isinstance(g, optax.MaskedNode):
                return g
            return jax.tree.map(lambda x: x * jnp.asarray(m, x.dtype), g)

        return jax.tree.map(mul, multipliers, updates), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)
