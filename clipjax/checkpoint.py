"""Orbax checkpoint folders, the loaded-model object, and `convert`.

A clipjax checkpoint folder holds:
  clipjax.json   format marker, the `CLIPConfig` and where it came from
  params/        Orbax (StandardCheckpointer) tree of the params
  tokenizer/     tokenizer files when known (vocab.json + merges.txt, or tokenizer.json)

Writes are atomic: everything goes to a temporary sibling folder that is
renamed at the end, so a failed conversion leaves no partial output.

Multi-process (`jax.process_count() > 1`): every process calls `load` / `save` /
the `Model` methods together (SPMD). `load(mesh=...)` restores each param directly
with its sharding on the mesh (each process reads only the shards its devices
hold); `save` writes the arrays with Orbax's multi-host save, the metadata from
process 0 only, and commits the folder once every process has finished. Nothing
on these paths copies a non-fully-addressable array to a host.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from clipjax.config import CLIPConfig
from clipjax.convert.errors import ConversionError
from clipjax.models import clip as F

FORMAT = "clipjax"
VERSION = 1


def _flat(tree: dict, prefix: tuple = ()) -> dict[tuple, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def string_keys(tree):
    """A nested dict with every key made a string (what Orbax stores); other leaves as they are."""
    return {str(k): string_keys(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def rekey_like(tree, like):
    """Re-key `tree` (string keys) with the key types of `like`."""
    if not isinstance(like, dict):
        return tree
    return {k: rekey_like(tree[str(k)], v) for k, v in like.items()}


def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def pure_to_params(pure: dict, config: CLIPConfig) -> nnx.State:
    """Validate a pure param dict against `config` (keys and shapes) and build the `nnx.State`."""
    abstract = F.abstract_params(config)
    want = _flat(abstract.to_pure_dict())
    got = _flat(pure)
    missing = sorted(_dotted(k) for k in set(want) - set(got))
    extra = sorted(_dotted(k) for k in set(got) - set(want))
    bad = [f"{_dotted(k)}: got {tuple(np.shape(got[k]))}, expected {tuple(want[k].shape)}"
           for k in sorted(set(want) & set(got), key=_dotted) if tuple(np.shape(got[k])) != tuple(want[k].shape)]
    if missing or extra or bad:
        parts = []
        if missing:
            parts.append(f"missing params {missing[:8]}")
        if extra:
            parts.append(f"unexpected params {extra[:8]}")
        if bad:
            parts.append(f"shape mismatches {bad[:8]}")
        raise ConversionError("params do not match the architecture: " + "; ".join(parts))
    dtype = jnp.dtype(config.param_dtype)

    def cast(a):
        if isinstance(a, jax.Array):  # already on devices (possibly sharded over processes): cast there
            return a if a.dtype == dtype else a.astype(dtype)
        return jnp.asarray(np.asarray(a, np.float32), dtype)

    arrays = jax.tree.map(cast, rekey_like(string_keys(pure), abstract.to_pure_dict()))
    nnx.replace_by_pure_dict(abstract, arrays)
    return abstract


@dataclass
class Model:
    """A loaded model: `config`, `params` and the bound pure functions, tokenizer and preprocessing.

    Inputs and outputs on a mesh (params loaded with `load(folder, mesh=...)`; the mesh is read from
    the params' sharding):
      * host inputs (numpy arrays, lists, strings) are this process's rows of the batch: each process
        passes `[B_local, ...]`, and they become one global `[B, ...]` array sharded over the mesh's
        batch axes ("data", "fsdp") with `jax.make_array_from_process_local_data`. With one process
        `B_local == B`. In a multi-process run `B_local` must split evenly over the process's devices
        along those axes.
      * `jax.Array` inputs that are already global (not fully addressable) are used as they are;
        a process-local `jax.Array` in a multi-process run is taken as this process's rows, as above.
      * outputs are global arrays sharded over the batch axes like the input rows, never gathered to
        a host: each process's addressable shards hold the results of the rows it fed, in order
        (read them with `out.addressable_shards`, or `np.asarray(out)` in a single process).
    Without a mesh (params on one device) inputs and outputs stay on this process's default device.

    Input checks (`validate`): the shape/dtype checks always run (at trace time, no data moved).
    Values (NaN/inf in pixels) are checked where that is cheap:
      * `None` (default): host inputs are checked on the host before the transfer; `jax.Array`
        inputs are not value-checked, so the hot path copies nothing back from the devices. In a
        multi-process run the processes agree on the result (one int32 per process is all-gathered),
        so all of them raise the same error instead of one raising and the others waiting in a
        collective.
      * `True`: `jax.Array` inputs are checked too, by a jitted `jnp.isfinite(x).all()` reduced on
        the devices; only that one boolean is read back (from this process's own copy).
      * `False`: no value checks and no agreement step.
    """

    config: CLIPConfig
    params: nnx.State
    tokenizer: Any = None

    def encode_image(self, pixels, normalize: bool = True, *, validate: bool | None = None) -> jax.Array:
        """Preprocessed pixels `[B_local, H, W, 3]` per process -> embeddings `[B, E]` (L2-normalised by
        default), a global array sharded over the batch axes (see the class docstring)."""
        mesh = self._mesh()
        pixels = _model_input(pixels, "pixels", mesh, validate)
        return _run(_encode_image, self.params, pixels, mesh=mesh, config=self.config, normalize=normalize)

    def encode_text(self, ids, normalize: bool = True, *, validate: bool | None = None) -> jax.Array:
        """Token ids `[B_local, L]` per process (or a list of strings, tokenized first) -> embeddings
        `[B, E]`, a global array sharded over the batch axes (see the class docstring)."""
        if isinstance(ids, str) or (isinstance(ids, (list, tuple)) and ids and isinstance(ids[0], str)):
            ids = self.tokenize(ids)
        mesh = self._mesh()
        ids = _model_input(ids, "token ids", mesh, validate)
        return _run(_encode_text, self.params, ids, mesh=mesh, config=self.config, normalize=normalize)

    def encode_dense(self, pixels, normalize: bool = True, *, validate: bool | None = None) -> jax.Array:
        """MaskCLIP patch embeddings `[B, P, E]` from `[B_local, H, W, 3]` per process."""
        mesh = self._mesh()
        pixels = _model_input(pixels, "pixels", mesh, validate)
        return _run(_encode_dense, self.params, pixels, mesh=mesh, config=self.config, normalize=normalize)

    def logits(self, pixels, ids, *, validate: bool | None = None) -> jax.Array:
        """`[B_img, B_txt]` logits, scale (and SigLIP bias) applied; rows sharded like the image batch,
        every text column on every row shard. A single-tower model raises `ConfigError`."""
        self.config.require("both", "logits")
        img = self.encode_image(pixels, validate=validate)
        txt = self.encode_text(ids, validate=validate)
        if isinstance(img, jax.core.Tracer):
            return F.logits_from_embeddings(self.params, img, txt)
        with _mesh_context(self._mesh()):
            return _logits(self.params, img, txt, out=_rows_like(img))

    @property
    def logit_scale(self) -> float:
        """The multiplier `exp(log_logit_scale)` (read from this process's own copy). A single-tower model
        has none: `ConfigError`."""
        self.config.require("both", "logit_scale")
        v = self.params["log_logit_scale"][...]
        if isinstance(v, jax.Array):
            v = jax.device_get(v.addressable_data(0))
        return float(np.exp(np.asarray(v, np.float32)))

    def tokenize(self, texts) -> np.ndarray:
        """Strings -> `[B, context_length]` int32 ids."""
        self.config.require("text", "tokenize")
        if self.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer files (SigLIP tokenizers cannot be built offline); "
                             "convert with --tokenizer DIR or pass token ids")
        return self.tokenizer(texts)

    def preprocess(self, images) -> np.ndarray:
        """PIL images or uint8 `[H, W, 3]` arrays -> `[B, S, S, 3]` float32, the model's eval transform."""
        self.config.require("image", "preprocess")
        from clipjax.preprocess import preprocess

        return preprocess(images, self.config.preprocess, self.config.vision.image_size)

    def _mesh(self) -> Mesh | None:
        """The mesh the params live on (None: a single device)."""
        for leaf in jax.tree.leaves(self.params):
            s = getattr(leaf, "sharding", None)
            return s.mesh if isinstance(s, NamedSharding) and isinstance(s.mesh, Mesh) else None
        return None


# ---- the jitted calls behind `Model`: the model's pure functions plus an output sharding constraint

def _constrained(x, out):
    return x if out is None else jax.lax.with_sharding_constraint(x, out)


@functools.partial(jax.jit, static_argnames=("config", "normalize", "out"))
def _encode_image(params, pixels, *, config, normalize, out):
    return _constrained(F.encode_image(params, pixels, config=config, normalize=normalize), out)


@functools.partial(jax.jit, static_argnames=("config", "normalize", "out"))
def _encode_text(params, ids, *, config, normalize, out):
    return _constrained(F.encode_text(params, ids, config=config, normalize=normalize), out)


@functools.partial(jax.jit, static_argnames=("config", "normalize", "out"))
def _encode_dense(params, pixels, *, config, normalize, out):
    return _constrained(F.encode_dense(params, pixels, config=config, normalize=normalize), out)


@functools.partial(jax.jit, static_argnames=("out",))
def _logits(params, image_emb, text_emb, *, out):
    return _constrained(F.logits_from_embeddings(params, image_emb, text_emb), out)


@jax.jit
def _all_finite(x):
    return jnp.isfinite(x).all()


def _mesh_context(mesh):
    """`jax.set_mesh(mesh)` (the models' activation constraints see it), or nothing without one."""
    return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


def _run(fn, params, x, *, mesh, config, normalize):
    if isinstance(x, jax.core.Tracer):  # inside the caller's jit: no placement, no constraint
        return fn(params, x, config=config, normalize=normalize, out=None)
    with _mesh_context(mesh):
        return fn(params, x, config=config, normalize=normalize, out=_rows_like(x))


def _rows_like(x: jax.Array) -> NamedSharding | None:
    """A sharding for an output whose rows are `x`'s rows: `x`'s batch-dimension spec, every other
    dimension replicated (None when `x` is not on a mesh)."""
    s = getattr(x, "sharding", None)
    if not isinstance(s, NamedSharding) or not isinstance(s.mesh, Mesh) or x.ndim == 0:
        return None
    return NamedSharding(s.mesh, P(s.spec[0] if len(s.spec) else None))


def _spans_processes(mesh: Mesh | None) -> bool:
    return mesh is not None and mesh.is_multi_process


def _batch_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    """Rows over the mesh's batch axes. With one process a batch that does not split over them is
    replicated instead; across processes the rows are always split (the processes hold different rows)."""
    from clipjax.sharding import logical_to_spec

    names = ("batch",) + (None,) * (len(shape) - 1)
    local_only = not _spans_processes(mesh)
    return NamedSharding(mesh, logical_to_spec(names, mesh=mesh, shape=shape if local_only else None))


def _row_blocks(sharding: NamedSharding, ndim: int) -> tuple[int, int]:
    """(row blocks held by this process's devices, row blocks in all)."""
    axes = sharding.spec[0] if len(sharding.spec) else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    total = int(np.prod([sharding.mesh.shape[a] for a in axes])) if axes else 1
    idx = sharding.addressable_devices_indices_map((total,) + (1,) * (ndim - 1))
    return len({(sl[0].start or 0) for sl in idx.values()}), total


# `_agree` codes -> what the other processes report
_PROBLEMS = {1: "contain NaN or infinite values",
             2: "have a local batch that does not split over the process's devices"}


def _agree(code: int, name: str, mesh: Mesh | None, message: str | None) -> None:
    """Raise the same `ValueError` on every process when any process found a problem with its input
    (multi-process: one int32 per process is all-gathered; otherwise just raise `message`)."""
    if _spans_processes(mesh):
        from jax.experimental import multihost_utils

        codes = np.asarray(multihost_utils.process_allgather(np.int32(code))).reshape(-1)
        bad = np.flatnonzero(codes)
        if bad.size:
            if message is None:
                message = f"{name} {_PROBLEMS.get(int(codes[bad[0]]), 'are invalid')}"
            raise ValueError(f"{message} (on process(es) {bad.tolist()} of {codes.size})")
    elif message is not None:
        raise ValueError(message)


def _model_input(x, name: str, mesh: Mesh | None, validate: bool | None):
    """`x` as the jax.Array the model runs on: host rows -> a global batch on `mesh`, checked on the host;
    `jax.Array`s checked for shape only (unless `validate=True`). See `Model`'s docstring."""
    if isinstance(x, jax.core.Tracer):
        return x
    if isinstance(x, jax.Array):
        x = _device_input(x, mesh)
        if validate and jnp.issubdtype(x.dtype, jnp.inexact):
            if not bool(jax.device_get(_all_finite(x).addressable_data(0))):
                raise ValueError(f"{name} contain NaN or infinite values")
        return x
    a = np.asarray(x)
    if validate is not False:
        code, message = 0, None
        if a.dtype.kind in "fc" and not np.isfinite(a).all():
            code, message = 1, f"{name} contain NaN or infinite values"
        elif _spans_processes(mesh) and a.ndim:
            held, total = _row_blocks(_batch_sharding(mesh, a.shape), a.ndim)
            if a.shape[0] % held:
                code, message = 2, (f"{name}: this process passed {a.shape[0]} rows, which do not split over its "
                                    f"{held} row blocks of the batch axes ({total} in all); pass a multiple of {held}")
        _agree(code, name, mesh, message)
    if mesh is None:
        return jnp.asarray(a)
    if a.ndim == 0:
        return jax.device_put(a, NamedSharding(mesh, P()))
    return jax.make_array_from_process_local_data(_batch_sharding(mesh, a.shape), a)


def _device_input(x: jax.Array, mesh: Mesh | None) -> jax.Array:
    """A `jax.Array` input on the model's devices (device-to-device moves only, nothing to the host)."""
    if mesh is None or not x.is_fully_addressable or x.ndim == 0:
        return x  # global arrays are used as they are (jit checks the devices)
    if _spans_processes(mesh):  # a process-local array: this process's rows
        return jax.make_array_from_process_local_data(_batch_sharding(mesh, x.shape), x)
    if x.sharding.device_set == set(mesh.devices.flat):
        return x
    return jax.device_put(x, _batch_sharding(mesh, x.shape))


def default_tokenizer(config: CLIPConfig):
    """OpenAI's BPE for CLIP-vocabulary text towers; None otherwise (and for image-only models)."""
    if not config.has_text or config.text.vocab_size != 49408:
        return None
    from clipjax.tokenizer import Tokenizer

    return Tokenizer.openai(context_length=config.text.context_length)


def atomic_folder(folder: str, overwrite: bool = False, *, all_processes: bool | None = None):
    """A context manager yielding a temporary sibling folder that replaces `folder` only if the block
    succeeds; `folder` never holds a partial tree.

    `all_processes` (default: `jax.process_count() > 1`): every process of a multi-process run enters
    the block together (a collective; the temporary folder is on a file system they share) and gets
    the same temporary folder. Process 0 alone checks, creates, renames and removes; the processes
    agree at three points (small `multihost_utils` collectives, which are also the barriers):
      * before the block: a refused `folder` (it exists, `overwrite=False`) raises `FileExistsError`
        on every process;
      * after it: the rename happens only when no process raised in the block. Otherwise process 0
        removes the temporary folder, each failing process re-raises its error and the others raise
        `RuntimeError`, and nothing appears at `folder`;
      * after the rename: when the block returns on any process, `folder` is complete.
    A process that dies, or fails inside a collective of the block (e.g. Orbax's save barriers),
    leaves the others waiting there until JAX's distributed runtime times out; nothing is committed.
    """
    if all_processes is None:
        all_processes = jax.process_count() > 1
    folder = os.path.abspath(folder)
    return _atomic_all_processes(folder, overwrite) if all_processes else _atomic_one_process(folder, overwrite)


def _commit(tmp: str, folder: str) -> None:
    """Move `tmp` to `folder`, replacing an old `folder` (moved aside first, removed last)."""
    old = None
    if os.path.exists(folder):
        old = f"{tmp}.old"
        os.replace(folder, old)
    try:
        os.replace(tmp, folder)
    except BaseException:
        if old is not None:
            os.replace(old, folder)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _atomic_one_process(folder: str, overwrite: bool):
    if os.path.exists(folder) and not overwrite:
        raise FileExistsError(f"{folder} exists; pass overwrite=True (--overwrite) to replace it")
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.tmp-", dir=parent)
    try:
        yield tmp
        _commit(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def _atomic_all_processes(folder: str, overwrite: bool):
    from jax.experimental import multihost_utils as mh

    lead = jax.process_index() == 0
    parent, base = os.path.dirname(folder), os.path.basename(folder)
    status, tag, err = 0, 0, None  # status: 0 ok, 1 folder exists, 2 process 0 could not create tmp
    if lead:
        tag = secrets.randbits(31)
        if os.path.exists(folder) and not overwrite:
            status = 1
        else:
            try:
                os.makedirs(parent, exist_ok=True)
                os.makedirs(os.path.join(parent, f".{base}.tmp-{tag:08x}"))
            except OSError as e:
                status, err = 2, e
    status, tag = (int(v) for v in mh.broadcast_one_to_all(np.array([status, tag], np.int32)))
    if status == 1:
        raise FileExistsError(f"{folder} exists; pass overwrite=True (--overwrite) to replace it")
    if status == 2:
        raise OSError(f"process 0 could not create a temporary folder beside {folder}: {err or 'see process 0'}")
    tmp = os.path.join(parent, f".{base}.tmp-{tag:08x}")
    error = None
    try:
        yield tmp
    except Exception as e:  # noqa: BLE001 - reported to the other processes, then re-raised
        error = e
    except BaseException:  # KeyboardInterrupt, SystemExit: no agreement, just clean up
        if lead:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    failed = np.flatnonzero(np.asarray(mh.process_allgather(np.int32(error is not None))).reshape(-1))
    ok = 1
    if lead:
        if failed.size:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            try:
                _commit(tmp, folder)
            except OSError as e:
                ok, err = 0, e
                shutil.rmtree(tmp, ignore_errors=True)
    ok = int(mh.broadcast_one_to_all(np.int32(ok)))  # the barrier after the rename
    if error is not None:
        raise error
    if failed.size:
        raise RuntimeError(f"process(es) {failed.tolist()} failed while writing {folder}; nothing was written")
    if not ok:
        raise OSError(f"process 0 could not move the finished checkpoint to {folder}: {err or 'see process 0'}")


def _savable(a):
    """Arrays sharded over processes stay on their devices (each process writes its own shards);
    everything else becomes a host copy, written by process 0 (all processes hold the same value)."""
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
        return a
    return np.asarray(a)


def save(folder: str, config: CLIPConfig, params: nnx.State | dict, *, tokenizer_dir: str | None = None,
         source: dict | None = None, overwrite: bool = False) -> str:
    """Write a checkpoint folder atomically. `params`: an `nnx.State` or a pure dict (validated).

    Multi-process: every process calls `save` with the same arguments (its `params` may be global
    arrays sharded over all processes). The arrays go through Orbax's multi-host save (each process
    writes the shards its devices hold, one copy of each); `clipjax.json` and the tokenizer files are
    written by process 0 only; the folder appears when every process is done (`atomic_folder`).
    """
    import orbax.checkpoint as ocp

    if tokenizer_dir is not None and not config.has_text:
        raise ValueError(f"tokenizer_dir={tokenizer_dir!r}: this is an image-only model (towers='image'), which has "
                         "no text tower to tokenize for")
    state = params if isinstance(params, nnx.State) else pure_to_params(params, config)
    pure = string_keys(jax.tree.map(_savable, state.to_pure_dict()))
    with atomic_folder(folder, overwrite) as tmp:
        with ocp.StandardCheckpointer() as ckptr:  # every process: Orbax coordinates the writers
            ckptr.save(os.path.join(tmp, "params"), pure)
        if jax.process_index() == 0:
            with open(os.path.join(tmp, "clipjax.json"), "w") as f:
                json.dump({"format": FORMAT, "version": VERSION, "config": config.architecture_dict(),
                           "source": source or {}},
                          f, indent=2)
            tok_out = os.path.join(tmp, "tokenizer")
            if tokenizer_dir is not None:
                shutil.copytree(tokenizer_dir, tok_out)
            else:
                tok = default_tokenizer(config)
                if tok is not None:
                    tok.save(tok_out)
    return os.path.abspath(folder)


def _read_meta(folder: str) -> dict:
    meta = os.path.join(folder, "clipjax.json")
    if not os.path.exists(meta):
        raise ConversionError(f"{folder}: not a clipjax checkpoint (no clipjax.json); convert it first with "
                              "`clipjax convert`")
    with open(meta) as f:
        d = json.load(f)
    if d.get("format") != FORMAT:
        raise ConversionError(f"{meta}: format {d.get('format')!r} is not {FORMAT!r}")
    return d


def read_config(folder: str) -> CLIPConfig:
    return CLIPConfig.from_dict(_read_meta(folder)["config"])


# folders written before the log logit scale got its own name store it as `logit_scale`
_LEGACY_NAMES = {"log_logit_scale": "logit_scale"}


def params_dir(folder: str) -> str:
    """Where a folder's params are: `params/` of a converted checkpoint, or, in a training workdir,
    `checkpoints/STEP/params` of the newest complete step."""
    direct = os.path.join(folder, "params")
    root = os.path.join(folder, "checkpoints")
    if os.path.isdir(direct) or not os.path.isdir(root):
        return direct
    steps = [int(n) for n in os.listdir(root)
             if n.isdigit() and os.path.isdir(os.path.join(root, n, "params"))]
    if not steps:
        raise ConversionError(f"{folder}: a training workdir with no complete checkpoint in {root}")
    return os.path.join(root, str(max(steps)), "params")


def load(folder: str, mesh=None, config_overrides: dict | None = None) -> Model:
    """Load a checkpoint folder or a training workdir (its newest checkpoint); with `mesh`, params are
    restored directly sharded by the logical rules.

    Multi-process: every process calls `load`. With a `mesh` over all processes' devices, Orbax
    restores each param straight into its `NamedSharding` (each process reads only the shards its
    devices hold; nothing is gathered); without one, each process gets a full copy on its first
    local device.

    The folder stores the architecture only; run-time options (`clipjax.config.RUNTIME_OPTIONS`:
    compute dtype, param dtype, scan, remat, attention backend) come from `config_overrides`
    (defaults otherwise). Folders written before this rule kept those options; they are ignored.
    """
    import orbax.checkpoint as ocp

    from clipjax.sharding import param_shardings

    folder = os.path.abspath(folder)
    raw = _read_meta(folder)["config"]
    legacy = "init_logit_scale" in raw
    config = CLIPConfig.from_dict(raw).architecture()
    if config_overrides:
        config = config.replace(**config_overrides)
    abstract = F.abstract_params(config)
    if mesh is not None:
        shard = param_shardings(abstract, mesh)
        shard_tree = shard.to_pure_dict()
    else:
        dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # a full copy per process
        shard_tree = jax.tree.map(lambda _: dev, abstract.to_pure_dict())
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract.to_pure_dict(), shard_tree)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            stored = string_keys(target)
            if legacy:
                stored = {_LEGACY_NAMES.get(k, k): v for k, v in stored.items()}
            restored = ckptr.restore(params_dir(folder), stored)
            if legacy:
                old = {v: k for k, v in _LEGACY_NAMES.items()}
                restored = {old.get(k, k): v for k, v in restored.items()}
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise ConversionError(f"{folder}: params do not match the stored config or are damaged: {e}") from None
    nnx.replace_by_pure_dict(abstract, rekey_like(restored, abstract.to_pure_dict()))
    tok_dir = os.path.join(folder, "tokenizer")
    tokenizer = None
    if os.path.isdir(tok_dir) and config.has_text:
        from clipjax.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_folder(tok_dir, context_length=config.text.context_length)
    return Model(config=config, params=abstract, tokenizer=tokenizer)
