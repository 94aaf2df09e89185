"""Held-out evaluation for the trainer: zero-shot accuracy and image-text retrieval, multi-host safe.

    eval_fn = make_eval_fn(model_config, tokenizer=tok, mesh=mesh,
                           zeroshot=ZeroShotSet(lambda: labelled_batches(), classnames, "openai"),
                           retrieval=lambda: paired_batches())
    train(model_config, cfg, workdir, data, mesh=mesh, eval_fn=eval_fn)  # logs eval/zeroshot_top1, ...

Inputs. `batches` is an iterable of this process's dicts `{"image": uint8 [b, S, S, 3] (0..255) or
float32 (preprocessed), "text": int32 [b, L], "label": int32 [b]}` (zero-shot needs image and label,
retrieval image and text; other keys are ignored). `b` may vary from batch to batch (a last partial
batch), and processes may hold different numbers of examples and batches (`clipjax.data.make_batches(
..., train=False, num_epochs=1)` gives each process every n-th example).

How it runs on a pod. Every local batch is cut or zero-padded to one local size (the largest first
batch of any process, rounded up to this process's share of the mesh's batch devices) with a
validity mask, and the processes' rows become one global array sharded over the batch axes
(`jax.make_array_from_process_local_data`). Before each step the processes all-gather four int32
per process (has a batch, text length, image dtype, bad input), so they run the same number of
steps (a process out of data sends a fully masked batch) and all raise the same `ValueError` when
one of them has bad input. Correct counts are reduced inside jit; retrieval keeps every embedding on
the devices (sharded) and ranks with masks. Only replicated scalars are read back: nothing sharded
is gathered to a host. Without a mesh (one process) the same code runs on the default device.
An exception inside one process's batch iterator (a file that cannot be read) is not agreed on:
the other processes then wait in the next all-gather, as they would in a training step.
Scores are float32 products at `Precision.HIGHEST` (no bf16 rounding on TPUs).

Definitions.
* Zero-shot (CLIP_benchmark): class weights are normalize(mean_t normalize(E_text(template_t(c))))
  (`class_text_embeddings`, as `clipjax.metrics.zeroshot_classifier`); an image is top-k correct
  when its true class is among the first k of a stable descending sort of `x_hat @ W^T` (equal
  logits: the lower class index first, `clipjax.metrics.true_class_rank`).
* Retrieval (open_clip's `get_clip_metrics` keys): pairs are one image per caption, row i <-> row i.
  The rank of a query is the number of other valid gallery items scoring >= its true match (ties
  count against the query, so the numbers do not depend on the order of the rows, i.e. on the
  process count or batch layout; padded rows never count). `R@K` is the fraction of queries with
  rank < K, `mean_rank` the mean of rank + 1, `median_rank` floor(median(rank)) + 1 (open_clip's).
  `image_to_text` queries are images searching the captions, `text_to_image` the reverse.
  Memory: every device holds the whole caption-image gallery `[N, E]` and a `[N / devices, block]`
  score block.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from clipjax import checks
from clipjax.config import CLIPConfig
from clipjax.metrics.templates import build_prompts, get_templates, openai_imagenet_templates
from clipjax.metrics.zeroshot import true_class_rank
from clipjax.models import clip as F
from clipjax.sharding import batch_sharding, constrain
from clipjax.train.state import mesh_context
from clipjax.train.step import batch_axes_size, normalize_images

ZEROSHOT_KS = (1, 5)
RETRIEVAL_KS = (1, 5, 10)
_HIGHEST = jax.lax.Precision.HIGHEST
_DTYPES = {1: np.uint8, 2: np.float32}  # image dtype codes agreed between processes


# ----------------------------------------------------------------------------- class text embeddings

def resolve_templates(templates: str | Sequence[str]) -> list[str]:
    """Prompt templates with a `{c}` placeholder.

    Args:
      templates: "openai" (OpenAI's 80 ImageNet templates, `clipjax.metrics.openai_imagenet_templates`),
        another data-set name of `clipjax.metrics.get_templates`, or a list of templates with `{c}`, `{}` or `{0}`.
    """
    if isinstance(templates, str):
        if templates == "openai":
            return openai_imagenet_templates()
        try:
            return get_templates(templates)
        except KeyError as e:
            raise ValueError(f"templates={templates!r}: expected 'openai', a data-set name with shipped templates "
                             f"or a list of templates; {e.args[0]}") from None
    out = [str(t).replace("{}", "{c}").replace("{0}", "{c}") for t in templates]
    bad = [t for t in out if "{c}" not in t]
    if not out or bad:
        raise ValueError(f"templates must be a non-empty list of strings with a '{{c}}' or '{{}}' placeholder; "
                         f"got {list(templates)[:3]}")
    return out


@dataclasses.dataclass(frozen=True)
class PromptTable:
    """Tokenized prompts: `ids` int32 `[P, L]`, `classes` int32 `[P]` (the class of each prompt), per-class
    prompt `counts` `[C]`."""

    ids: np.ndarray
    classes: np.ndarray
    counts: np.ndarray

    @property
    def num_classes(self) -> int:
        return len(self.counts)


def prompt_table(tokenizer: Callable, classnames: Sequence[str], templates: str | Sequence[str],
                 model_config: CLIPConfig) -> PromptTable:
    """Every template filled with every class name, tokenized (`tokenizer(list_of_str) -> int [N, L]`)."""
    if isinstance(classnames, str):
        raise ValueError("classnames must be a list of class names, got a string")
    prompts = build_prompts([str(c) for c in classnames], resolve_templates(templates))
    flat = [p for per_class in prompts for p in per_class]
    ids = np.asarray(tokenizer(flat))
    L = model_config.text.context_length
    if ids.ndim != 2 or ids.shape[0] != len(flat) or not np.issubdtype(ids.dtype, np.integer) or ids.shape[1] > L:
        raise ValueError(f"tokenizer returned {ids.dtype} {ids.shape} for {len(flat)} prompts; expected integer "
                         f"[{len(flat)}, <= {L}] token ids (the model's context_length)")
    counts = np.asarray([len(p) for p in prompts], np.int32)
    return PromptTable(ids.astype(np.int32), np.repeat(np.arange(len(prompts), dtype=np.int32), counts), counts)


def class_text_embeddings(model_state: nnx.State, model_config: CLIPConfig, tokenizer: Callable,
                          classnames: Sequence[str], templates: str | Sequence[str] = "openai", *,
                          mesh: Mesh | None = None, batch_size: int = 256) -> jax.Array:
    """Zero-shot class weights `[C, E]` float32, unit-norm rows (replicated on `mesh`).

    Row c is normalize(mean_t normalize(E_text(template_t(classnames[c])))), as
    `clipjax.metrics.zeroshot_classifier` (transposed). Also the `class_weights` of the adversarial
    losses ("tecoa", "pmg-aft").

    Args:
      model_state: the model (`clipjax.load(...).params`, a train state's `model_state`), on `mesh` if given.
      model_config: its config.
      tokenizer: `tokenizer(list_of_str) -> int [N, L]`, L <= the model's context_length.
      classnames: C class names.
      templates: see `resolve_templates`.
      mesh: the model's mesh (needed with several processes); prompts are split over its batch axes.
      batch_size: prompts per encoder call (rounded up to a multiple of the batch devices).
    """
    table = prompt_table(tokenizer, classnames, templates, model_config)
    return _class_embeddings(model_state, model_config, table, mesh, batch_size)


def _class_embeddings(model_state, model_config, table: PromptTable, mesh, batch_size: int) -> jax.Array:
    _check_mesh(mesh)
    size = _round_up(checks.positive_int("batch_size", batch_size), batch_axes_size(mesh))
    n_classes = table.num_classes
    sums = _replicated(np.zeros((n_classes, model_config.embed_dim), np.float32), mesh)
    with mesh_context(mesh):
        for start in range(0, len(table.ids), size):
            ids = np.zeros((size, table.ids.shape[1]), np.int32)
            classes = np.full(size, n_classes, np.int32)  # padded rows go to a dropped extra segment
            part = slice(start, start + size)
            ids[:len(table.ids[part])], classes[:len(table.ids[part])] = table.ids[part], table.classes[part]
            sums = _class_sums(model_state, sums, _same_everywhere(ids, mesh), _same_everywhere(classes, mesh),
                               config=model_config, num_classes=n_classes)
        weights, ok = _normalized_means(sums, _replicated(table.counts.astype(np.float32), mesh))
    if not bool(np.asarray(ok)):
        raise ValueError("a class's template embeddings average to zero (templates that cancel out)")
    return weights


@functools.partial(jax.jit, static_argnames=("config", "num_classes"))
def _class_sums(model_state, sums, ids, classes, *, config, num_classes):
    emb = F.encode_text(model_state, ids, config=config)  # [b, E], unit rows
    add = jax.ops.segment_sum(emb, classes, num_segments=num_classes + 1)[:num_classes]
    return constrain(sums + add, (None, None))


@jax.jit
def _normalized_means(sums, counts):
    mean = sums / counts[:, None]
    nonzero = jnp.all(jnp.sum(jnp.square(mean), axis=1) > 0)
    return constrain(checks.l2_normalize(mean), (None, None)), constrain(nonzero, ())


# ----------------------------------------------------------------------------- zero-shot

def zeroshot_eval(model_state: nnx.State, model_config: CLIPConfig, batches: Iterable[Mapping], class_weights, *,
                  mesh: Mesh | None = None, local_batch_size: int | None = None) -> dict:
    """Zero-shot top-1 / top-5 accuracy of this process's (and, on a pod, every process's) labelled batches.

    Args:
      model_state: the model, on `mesh` if given.
      model_config: its config.
      batches: this process's `{"image": uint8 or float32 [b, S, S, 3], "label": int [b] in [0, C)}`.
      class_weights: `[C, E]` unit-norm class embeddings (`class_text_embeddings`).
      mesh: the model's mesh (required with several processes).
      local_batch_size: rows per process per step (default: the largest first batch of any process).

    Returns:
      `{"zeroshot_top1", "zeroshot_top5"}` fractions in [0, 1] over all processes' examples
      (`zeroshot_top5` is NaN with fewer than 5 classes, as in CLIP_benchmark) and `"examples"` (int).
    """
    _check_mesh(mesh)
    w = checks.array("class_weights", class_weights, "[C, E]", sizes={"E": model_config.embed_dim})
    if isinstance(class_weights, np.ndarray) or getattr(w, "is_fully_addressable", True):
        checks.values("class_weights", w, unit_norm=True)
    n_classes = int(w.shape[0])
    w = _replicated(w if w.dtype == jnp.float32 else np.asarray(w, np.float32), mesh)
    counts = _replicated(np.zeros(len(ZEROSHOT_KS) + 1, np.int32), mesh)
    with mesh_context(mesh):
        for batch in _global_steps(batches, ("image", "label"), model_config, mesh, local_batch_size, n_classes):
            counts = _zeroshot_counts(model_state, w, counts, batch["image"], batch["label"], batch["valid"],
                                      config=model_config)
    *hits, n = (int(v) for v in np.asarray(counts))
    if n == 0:
        raise ValueError("batches gave no examples (every process's iterable was empty)")
    out = {f"zeroshot_top{k}": (h / n if k <= n_classes else float("nan")) for k, h in zip(ZEROSHOT_KS, hits)}
    return {**out, "examples": n}


@functools.partial(jax.jit, static_argnames=("config",))
def _zeroshot_counts(model_state, weights, counts, image, label, valid, *, config):
    emb = F.encode_image(model_state, normalize_images(image, config), config=config)  # [b, E], unit rows
    logits = jnp.matmul(emb, weights.T, precision=_HIGHEST)  # [b, C]
    rank = true_class_rank(logits, label)
    hits = [jnp.sum(valid & (rank < k), dtype=jnp.int32) for k in ZEROSHOT_KS]
    return constrain(counts + jnp.stack(hits + [jnp.sum(valid, dtype=jnp.int32)]), (None,))


# ----------------------------------------------------------------------------- retrieval

def retrieval_eval(model_state: nnx.State, model_config: CLIPConfig, batches: Iterable[Mapping], *,
                   mesh: Mesh | None = None, ks: Sequence[int] = RETRIEVAL_KS, local_batch_size: int | None = None,
                   block: int = 1024) -> dict:
    """Image-text retrieval over all processes' held-out pairs (row i's image <-> row i's caption).

    Args:
      model_state: the model, on `mesh` if given.
      model_config: its config.
      batches: this process's `{"image": uint8 or float32 [b, S, S, 3], "text": int [b, L]}`.
      mesh: the model's mesh (required with several processes).
      ks: the K of `R@K`.
      local_batch_size: rows per process per step (default: the largest first batch of any process).
      block: gallery items per step of the rank computation.

    Returns:
      `{"image_to_text_R@K", "text_to_image_R@K"}` in [0, 1], `"{direction}_mean_rank"`,
      `"{direction}_median_rank"` (1 = best) and `"pairs"` (int); see the module docstring.
    """
    _check_mesh(mesh)
    ks = _check_ks(ks)
    images, texts, valids = [], [], []
    with mesh_context(mesh):
        for batch in _global_steps(batches, ("image", "text"), model_config, mesh, local_batch_size):
            img, txt = _pair_embeddings(model_state, batch["image"], batch["text"], config=model_config)
            images.append(img)
            texts.append(txt)
            valids.append(batch["valid"])
        if not images:
            raise ValueError("batches gave no examples (every process's iterable was empty)")
        shards = batch_axes_size(mesh)
        out = _retrieval_counts(tuple(texts), tuple(images), tuple(valids), ks=ks,
                                block=checks.positive_int("block", block), shards=shards)
    return _retrieval_dict(jax.tree.map(np.asarray, out), ks)


def paired_retrieval_metrics(text_embeddings, image_embeddings, valid=None, *, ks: Sequence[int] = RETRIEVAL_KS,
                             block: int = 1024) -> dict:
    """Retrieval metrics of paired embeddings (row i <-> row i) on one host; `retrieval_eval`'s core.

    Args:
      text_embeddings: `[N, E]` caption embeddings (the score is the plain dot product).
      image_embeddings: `[N, E]` image embeddings.
      valid: `[N]` bool, False for rows to leave out (padding); default all True.
      ks: the K of `R@K`.
      block: gallery items per step.

    Returns:
      the dict of `retrieval_eval`.
    """
    t = checks.array("text_embeddings", text_embeddings, "[N, E]")
    v = checks.array("image_embeddings", image_embeddings, "[N, E]")
    checks.same_shape("[N, E]", text_embeddings=t, image_embeddings=v)
    checks.finite("text_embeddings", t)
    checks.finite("image_embeddings", v)
    valid = jnp.ones(t.shape[0], bool) if valid is None else checks.array("valid", valid, "[N]", dtype=None)
    checks.same_len(text_embeddings=t, valid=valid)
    if valid.dtype != jnp.bool_:
        raise TypeError(f"valid must be a bool array [N], got dtype {valid.dtype}")
    ks = _check_ks(ks)
    out = _retrieval_counts((t,), (v,), (valid,), ks=ks, block=checks.positive_int("block", block), shards=1)
    if int(out["n"]) == 0:
        raise ValueError("valid is all False: no pairs to rank")
    return _retrieval_dict(jax.tree.map(np.asarray, out), ks)


@functools.partial(jax.jit, static_argnames=("config",))
def _pair_embeddings(model_state, image, text, *, config):
    img = F.encode_image(model_state, normalize_images(image, config), config=config)
    txt = F.encode_text(model_state, text, config=config)
    return constrain(img, ("batch", None)), constrain(txt, ("batch", None))


@functools.partial(jax.jit, static_argnames=("ks", "block", "shards"))
def _retrieval_counts(texts, images, valids, *, ks, block, shards):
    """Concatenated steps -> `{"hits" [2, len(ks)] int32, "rank_sum" [2] f32, "median" [2] int32, "n"}`,
    directions (image_to_text, text_to_image); all replicated."""
    t = jnp.concatenate([x.astype(jnp.float32) for x in texts])
    v = jnp.concatenate([x.astype(jnp.float32) for x in images])
    valid = jnp.concatenate(valids)
    n_rows = t.shape[0]
    bg = min(block, n_rows)
    padded = _round_up(n_rows, math.lcm(bg, shards))
    pad = ((0, padded - n_rows), (0, 0))
    t, v, valid = jnp.pad(t, pad), jnp.pad(v, pad), jnp.pad(valid, (0, padded - n_rows))
    i2t, t2i = _paired_ranks(t, v, valid, bg)
    n = jnp.sum(valid, dtype=jnp.int32)
    out = {"hits": [], "rank_sum": [], "median": []}
    for rank in (i2t, t2i):
        out["hits"].append(jnp.stack([jnp.sum(valid & (rank < k), dtype=jnp.int32) for k in ks]))
        out["rank_sum"].append(jnp.sum(jnp.where(valid, rank, 0).astype(jnp.float32)))
        ordered = jnp.sort(jnp.where(valid, rank, jnp.iinfo(jnp.int32).max))
        lo, hi = ordered[jnp.maximum(n - 1, 0) // 2], ordered[n // 2]
        out["median"].append(lo + (hi - lo) // 2)  # floor of the mean of the middle two (numpy's median)
    out = {k: jnp.stack(v) for k, v in out.items()} | {"n": n}
    return jax.tree.map(lambda x: constrain(x, (None,) * x.ndim), out)


def _paired_ranks(t, v, valid, bg):
    """`(image_to_text, text_to_image)` ranks `[N]` int32 (N a multiple of `bg`); see the module docstring."""
    n_rows, dim = t.shape
    nb = n_rows // bg
    t = constrain(t, ("batch", None))  # queries of text_to_image stay sharded
    v_blocks = constrain(v, (None, None)).reshape(nb, bg, dim)  # the gallery, replicated
    cols = jnp.arange(n_rows, dtype=jnp.int32).reshape(nb, bg)
    rows = jnp.arange(n_rows, dtype=jnp.int32)
    valid_blocks = valid.reshape(nb, bg)

    def scores(vb):  # the same product in both passes, so the true-match score is bitwise the same
        return constrain(jnp.matmul(t, vb.T, precision=_HIGHEST), ("batch", None))  # [N, bg]

    def diagonal(d, block):
        vb, col = block
        return d + jnp.sum(jnp.where(col[None, :] == rows[:, None], scores(vb), 0.0), axis=1), None

    true, _ = jax.lax.scan(diagonal, jnp.zeros(n_rows, jnp.float32), (v_blocks, cols))  # s(t_i, v_i)

    def count(t2i, block):
        vb, col, vcol = block
        s = scores(vb)
        other = col[None, :] != rows[:, None]
        t_hit = (s >= true[:, None]) & vcol[None, :] & other  # caption i: images j scoring >= its image
        i_hit = (s >= true[col][None, :]) & valid[:, None] & other  # image j: captions i scoring >= its caption
        return t2i + jnp.sum(t_hit, axis=1, dtype=jnp.int32), jnp.sum(i_hit, axis=0, dtype=jnp.int32)

    t2i, i2t = jax.lax.scan(count, jnp.zeros(n_rows, jnp.int32), (v_blocks, cols, valid_blocks))
    return i2t.reshape(n_rows), t2i


def _retrieval_dict(out: dict, ks: tuple) -> dict:
    n = int(out["n"])
    res = {}
    for d, name in enumerate(("image_to_text", "text_to_image")):
        for k, h in zip(ks, out["hits"][d]):
            res[f"{name}_R@{k}"] = int(h) / n
        res[f"{name}_mean_rank"] = float(out["rank_sum"][d]) / n + 1.0
        res[f"{name}_median_rank"] = float(out["median"][d]) + 1.0
    return {**res, "pairs": n}


def _check_ks(ks) -> tuple:
    ks = tuple(checks.positive_int("k", k) for k in ks)
    if not ks:
        raise ValueError("ks is empty")
    return ks


# ----------------------------------------------------------------------------- the eval function

@dataclasses.dataclass(frozen=True)
class ZeroShotSet:
    """A labelled held-out set.

    Attributes:
      batches: `batches()` -> a fresh iterable of this process's `{"image", "label"}` batches (re-read at
        each evaluation; closed afterwards if it has `close()`).
      classnames: the C class names (labels index them).
      templates: see `resolve_templates`.
    """

    batches: Callable[[], Iterable[Mapping]]
    classnames: Sequence[str]
    templates: str | Sequence[str] = "openai"


def make_eval_fn(model_config: CLIPConfig, *, zeroshot: ZeroShotSet | None = None,
                 retrieval: Callable[[], Iterable[Mapping]] | None = None, tokenizer: Callable | None = None,
                 mesh: Mesh | None = None, local_batch_size: int | None = None,
                 text_batch_size: int = 256) -> Callable[[nnx.State], dict]:
    """`eval_fn(model_state) -> {name: float}` for `clipjax.train.train(..., eval_fn=...)`.

    Args:
      model_config: the trained model's config.
      zeroshot: a labelled set; the class weights are recomputed from the current text tower at each call.
      retrieval: `retrieval()` -> a fresh iterable of this process's `{"image", "text"}` pairs.
      tokenizer: `tokenizer(list_of_str) -> int [N, L]` for the class prompts (needed with `zeroshot`).
      mesh: the training mesh (required with several processes).
      local_batch_size, text_batch_size: see `zeroshot_eval` / `class_text_embeddings`.

    Returns:
      a function giving `zeroshot_top1`, `zeroshot_top5` (left out with fewer than 5 classes),
      `zeroshot_examples` and / or the `retrieval_eval` keys (`pairs` as `retrieval_pairs`).
    """
    if zeroshot is None and retrieval is None:
        raise ValueError("make_eval_fn needs zeroshot and / or retrieval")
    if retrieval is not None and not callable(retrieval):
        raise TypeError("retrieval must be a callable returning a fresh iterable of batches")
    table = None
    if zeroshot is not None:
        if not isinstance(zeroshot, ZeroShotSet) or not callable(zeroshot.batches):
            raise TypeError("zeroshot must be a ZeroShotSet whose batches is a callable returning an iterable")
        if tokenizer is None:
            raise ValueError("zeroshot needs a tokenizer (for the class prompts)")
        table = prompt_table(tokenizer, zeroshot.classnames, zeroshot.templates, model_config)
    _check_mesh(mesh)

    def eval_fn(model_state: nnx.State) -> dict:
        out = {}
        if zeroshot is not None:
            weights = _class_embeddings(model_state, model_config, table, mesh, text_batch_size)
            res = _read(zeroshot.batches, lambda b: zeroshot_eval(model_state, model_config, b, weights, mesh=mesh,
                                                                  local_batch_size=local_batch_size))
            res["zeroshot_examples"] = res.pop("examples")
            if table.num_classes < max(ZEROSHOT_KS):  # NaN by definition: not logged
                res.pop(f"zeroshot_top{max(ZEROSHOT_KS)}")
            out.update(res)
        if retrieval is not None:
            res = _read(retrieval, lambda b: retrieval_eval(model_state, model_config, b, mesh=mesh,
                                                            local_batch_size=local_batch_size))
            res["retrieval_pairs"] = res.pop("pairs")
            out.update(res)
        return out

    return eval_fn


def _read(make: Callable, use: Callable) -> dict:
    batches = make()
    try:
        return use(batches)
    finally:
        if hasattr(batches, "close"):  # grain pipelines: stop their worker processes
            batches.close()


# ----------------------------------------------------------------------------- multi-process batches

def _check_mesh(mesh: Mesh | None) -> None:
    if mesh is None:
        if jax.process_count() > 1:
            raise ValueError(f"mesh is required with {jax.process_count()} processes (the training mesh)")
        return
    if batch_axes_size(mesh) % jax.process_count():
        raise ValueError(f"the mesh's batch axes (data x fsdp = {batch_axes_size(mesh)}) must divide over the "
                         f"{jax.process_count()} processes: each process feeds its own rows")


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _gather_ints(values) -> np.ndarray:
    """`[processes, k]`: every process's `k` int32s (one tiny all-gather; no collective with one process)."""
    local = np.asarray(values, np.int32)
    if jax.process_count() == 1:
        return local[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(local)).reshape(jax.process_count(), -1)


def _replicated(x, mesh: Mesh | None) -> jax.Array:
    """`x` (the same value in every process) replicated over `mesh`, or on the default device."""
    if mesh is None:
        return jnp.asarray(x)
    sharding = NamedSharding(mesh, P())
    if isinstance(x, jax.Array):
        if x.sharding.is_equivalent_to(sharding, x.ndim):
            return x
        if not x.is_fully_addressable:  # a global array: reshard on the devices
            return jax.jit(lambda a: a, out_shardings=sharding)(x)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def _same_everywhere(x: np.ndarray, mesh: Mesh | None) -> jax.Array:
    """A host array every process holds in full, sharded over the mesh's batch axes."""
    if mesh is None:
        return jnp.asarray(x)
    return jax.make_array_from_callback(x.shape, batch_sharding(mesh, x.ndim), lambda idx: x[idx])


def _rows(batch) -> int:
    if isinstance(batch, Mapping) and "image" in batch:
        return int(np.shape(batch["image"])[0]) if np.ndim(batch["image"]) else 0
    return 0


def _chunks(batches: Iterable, first, size: int):
    """This process's batches cut into pieces of at most `size` rows (empty batches skipped)."""
    for batch in itertools.chain([first], batches):
        n = _rows(batch)
        if not isinstance(batch, Mapping) or "image" not in batch:
            yield batch  # reported by _check_chunk
            continue
        for start in range(0, n, size):
            yield {k: v[start:start + size] for k, v in batch.items() if k in ("image", "text", "label")}


def _check_chunk(chunk, keys: tuple, config: CLIPConfig, num_classes: int | None):
    """`(arrays, None)` for a good chunk, `(None, message)` for a bad one."""
    if not isinstance(chunk, Mapping):
        return None, f"batches must yield dicts, got {type(chunk).__name__}"
    missing = [k for k in keys if k not in chunk]
    if missing:
        return None, f"a batch is missing {missing}; expected keys {list(keys)} (has {sorted(map(str, chunk))})"
    s, ctx = config.vision.image_size, config.text.context_length
    img = np.asarray(chunk["image"])
    n = img.shape[0] if img.ndim else 0
    if img.ndim != 4 or img.shape[1:] != (s, s, 3) or img.dtype not in (np.uint8, np.float32):
        return None, (f"batch 'image' is {img.dtype} {img.shape}; expected uint8 (0..255) or float32 "
                      f"(preprocessed) [b, {s}, {s}, 3]")
    out = {"image": img}
    if "text" in keys:
        txt = np.asarray(chunk["text"])
        if txt.ndim != 2 or txt.shape[0] != n or not np.issubdtype(txt.dtype, np.integer) or txt.shape[1] > ctx:
            return None, f"batch 'text' is {txt.dtype} {txt.shape}; expected integer token ids [{n}, <= {ctx}]"
        out["text"] = txt.astype(np.int32)
    if "label" in keys:
        lab = np.asarray(chunk["label"])
        if lab.shape != (n,) or not np.issubdtype(lab.dtype, np.integer):
            return None, f"batch 'label' is {lab.dtype} {lab.shape}; expected integer class indices [{n}]"
        if n and (lab.min() < 0 or lab.max() >= num_classes):
            return None, (f"batch 'label' holds values in [{lab.min()}, {lab.max()}]; expected [0, {num_classes}) "
                          "(the rows of class_weights)")
        out["label"] = lab.astype(np.int32)
    return out, None


def _global_steps(batches: Iterable[Mapping], keys: tuple, config: CLIPConfig, mesh: Mesh | None,
                  local_batch_size: int | None, num_classes: int | None = None):
    """Global `{key: [G, ...], "valid": [G] bool}` steps, the same number in every process (see module docstring)."""
    it = iter(batches)
    first = next(it, None)
    shards = batch_axes_size(mesh) // jax.process_count()
    if local_batch_size is None:
        size = max(int(_gather_ints([_rows(first)]).max()), 1)
    else:
        size = checks.positive_int("local_batch_size", local_batch_size)
    size = _round_up(size, shards)
    chunks = _chunks(it, first, size) if first is not None else iter(())
    where = f"process {jax.process_index()}: " if jax.process_count() > 1 else ""
    s = config.vision.image_size
    while True:
        chunk = next(chunks, None)
        arrays, error = (None, None) if chunk is None else _check_chunk(chunk, keys, config, num_classes)
        dtype = 0 if arrays is None else {np.dtype(np.uint8): 1, np.dtype(np.float32): 2}[arrays["image"].dtype]
        length = arrays["text"].shape[1] if arrays is not None and "text" in arrays else 0
        info = _gather_ints([arrays is not None, length, dtype, error is not None])
        if info[:, 3].any():
            bad = np.flatnonzero(info[:, 3]).tolist()
            raise ValueError(f"batches: {where}{error}" if error else
                             f"batches: the held-out batches of processes {bad} are invalid (see their error)")
        present = info[info[:, 0] == 1]
        if not len(present):
            return
        if len(set(present[:, 2])) > 1 or len(set(present[:, 1])) > 1:
            raise ValueError("batches: the processes' batches disagree on the image dtype (uint8 / float32) or the "
                             f"text length at the same step: {info[:, 1:3].tolist()}")
        n = 0 if arrays is None else len(arrays["image"])
        local = {"image": np.zeros((size, s, s, 3), _DTYPES[int(present[0, 2])]),
                 "valid": np.arange(size) < n}
        if "text" in keys:
            local["text"] = np.zeros((size, int(present[0, 1])), np.int32)
        if "label" in keys:
            local["label"] = np.zeros(size, np.int32)
        for k in local:
            if arrays is not None and k in arrays:
                local[k][:n] = arrays[k]
        yield _to_global(local, mesh)


def _to_global(local: dict, mesh: Mesh | None) -> dict:
    if mesh is None:
        return {k: jnp.asarray(v) for k, v in local.items()}
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v) for k, v in local.items()}


__all__ = ["PromptTable", "ZeroShotSet", "class_text_embeddings", "make_eval_fn", "paired_retrieval_metrics",
           "prompt_table", "resolve_templates", "retrieval_eval", "zeroshot_eval"]
