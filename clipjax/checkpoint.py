"""Orbax checkpoint folders, the loaded-model object, and `convert`.

A clipjax checkpoint folder holds:
  clipjax.json   format marker, the `CLIPConfig` and where it came from
  params/        Orbax (StandardCheckpointer) tree of the params
  tokenizer/     tokenizer files when known (vocab.json + merges.txt, or tokenizer.json)

Writes are atomic: everything goes to a temporary sibling folder that is
renamed at the end, so a failed conversion leaves no partial output.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

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


def _strkeys(tree):
    return {str(k): _strkeys(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def _like(tree, like):
    """Re-key `tree` (string keys) with the key types of `like`."""
    if not isinstance(like, dict):
        return tree
    return {k: _like(tree[str(k)], v) for k, v in like.items()}


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
    arrays = jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float32), dtype), _like(_strkeys(pure), abstract.to_pure_dict()))
    nnx.replace_by_pure_dict(abstract, arrays)
    return abstract


@dataclass
class Model:
    """A loaded model: `config`, `params` and the bound pure functions, tokenizer and preprocessing."""

    config: CLIPConfig
    params: nnx.State
    tokenizer: Any = None

    def encode_image(self, pixels, normalize: bool = True) -> jax.Array:
        """Preprocessed pixels `[B, H, W, 3]` -> embeddings `[B, E]` (L2-normalised by default)."""
        pixels = _finite(pixels, "pixels")
        return F.encode_image(self.params, pixels, config=self.config, normalize=normalize)

    def encode_text(self, ids, normalize: bool = True) -> jax.Array:
        """Token ids `[B, L]` (or a list of strings, tokenized first) -> embeddings `[B, E]`."""
        if isinstance(ids, str) or (isinstance(ids, (list, tuple)) and ids and isinstance(ids[0], str)):
            ids = self.tokenize(ids)
        return F.encode_text(self.params, jnp.asarray(ids), config=self.config, normalize=normalize)

    def encode_dense(self, pixels, normalize: bool = True) -> jax.Array:
        """MaskCLIP patch embeddings `[B, P, E]`."""
        return F.encode_dense(self.params, _finite(pixels, "pixels"), config=self.config, normalize=normalize)

    def logits(self, pixels, ids) -> jax.Array:
        """`[B_img, B_txt]` logits, scale (and SigLIP bias) applied."""
        return F.logits_from_embeddings(self.params, self.encode_image(pixels), self.encode_text(ids))

    @property
    def logit_scale(self) -> float:
        """The multiplier `exp(log_logit_scale)`."""
        return float(jnp.exp(self.params["log_logit_scale"][...]))

    def tokenize(self, texts) -> np.ndarray:
        """Strings -> `[B, context_length]` int32 ids."""
        if self.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer files (SigLIP tokenizers cannot be built offline); "
                             "convert with --tokenizer DIR or pass token ids")
        return self.tokenizer(texts)

    def preprocess(self, images) -> np.ndarray:
        """PIL images or uint8 `[H, W, 3]` arrays -> `[B, S, S, 3]` float32, the model's eval transform."""
        from clipjax.preprocess import preprocess

        return preprocess(images, self.config.preprocess, self.config.vision.image_size)


def _finite(x, name: str) -> jax.Array:
    if not isinstance(x, jax.core.Tracer):
        a = np.asarray(x)
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise ValueError(f"{name} contain NaN or infinite values")
    return jnp.asarray(x)


def default_tokenizer(config: CLIPConfig):
    """OpenAI's BPE for CLIP-vocabulary text towers; None otherwise."""
    if config.text.vocab_size != 49408:
        return None
    from clipjax.tokenizer import Tokenizer

    return Tokenizer.openai(context_length=config.text.context_length)


@contextlib.contextmanager
def atomic_folder(folder: str, overwrite: bool = False):
    """Yield a temporary sibling folder that replaces `folder` only if the block succeeds."""
    folder = os.path.abspath(folder)
    if os.path.exists(folder) and not overwrite:
        raise FileExistsError(f"{folder} exists; pass overwrite=True (--overwrite) to replace it")
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.tmp-", dir=parent)
    try:
        yield tmp
        if os.path.exists(folder):
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save(folder: str, config: CLIPConfig, params: nnx.State | dict, *, tokenizer_dir: str | None = None,
         source: dict | None = None, overwrite: bool = False) -> str:
    """Write a checkpoint folder atomically. `params`: an `nnx.State` or a pure dict (validated)."""
    import orbax.checkpoint as ocp

    state = params if isinstance(params, nnx.State) else pure_to_params(params, config)
    with atomic_folder(folder, overwrite) as tmp:
        with open(os.path.join(tmp, "clipjax.json"), "w") as f:
            json.dump({"format": FORMAT, "version": VERSION, "config": config.architecture_dict(),
                       "source": source or {}},
                      f, indent=2)
        pure = _strkeys(jax.tree.map(np.asarray, state.to_pure_dict()))
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(os.path.join(tmp, "params"), pure)
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
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shard_tree = jax.tree.map(lambda _: dev, abstract.to_pure_dict())
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract.to_pure_dict(), shard_tree)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            stored = _strkeys(target)
            if legacy:
                stored = {_LEGACY_NAMES.get(k, k): v for k, v in stored.items()}
            restored = ckptr.restore(params_dir(folder), stored)
            if legacy:
                old = {v: k for k, v in _LEGACY_NAMES.items()}
                restored = {old.get(k, k): v for k, v in restored.items()}
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise ConversionError(f"{folder}: params do not match the stored config or are damaged: {e}") from None
    nnx.replace_by_pure_dict(abstract, _like(restored, abstract.to_pure_dict()))
    tok_dir = os.path.join(folder, "tokenizer")
    tokenizer = None
    if os.path.isdir(tok_dir):
        from clipjax.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_folder(tok_dir, context_length=config.text.context_length)
    return Model(config=config, params=abstract, tokenizer=tokenizer)
