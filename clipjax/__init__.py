"""clipjax: CLIP, SigLIP and CLOOB in JAX/Flax."""

from clipjax.config import CLIPConfig, TextConfig, VisionConfig
from clipjax.presets import PRESETS, get_config

__version__ = "0.1.0"

__all__ = ["CLIPConfig", "PRESETS", "TextConfig", "VisionConfig", "get_config", "load"]


def load(path, mesh=None, *, options: dict | None = None, **convert_kw):
    """Load a model: a clipjax checkpoint folder (`clipjax convert` output), a training workdir
    (its newest checkpoint), or any source that `clipjax convert` reads (TorchScript / open_clip
    file, HF folder), converted in memory.

    `options` sets run-time options (`clipjax.config.RUNTIME_OPTIONS`), e.g.
    `{"dtype": "bfloat16", "remat": "dots"}`; checkpoints store the architecture only.
    `convert_kw` (`arch=`, `config=`) apply to in-memory conversion only.

    Multi-process (`jax.process_count() > 1`): every process calls `load` with the same `mesh` (over
    all processes' devices). A checkpoint folder is then restored straight into the mesh's shardings,
    each process reading only its own shards; the model's `encode_*` / `logits` take each process's
    own rows and return global arrays sharded over the batch axes (see `clipjax.checkpoint.Model`).
    """
    import os

    if os.path.isdir(path) and os.path.exists(os.path.join(path, "clipjax.json")):
        from clipjax.checkpoint import load as _load

        return _load(path, mesh=mesh, config_overrides=options)
    from clipjax.convert.api import load_pytorch

    model = load_pytorch(path, mesh=mesh, **convert_kw)
    if options:
        model.config = model.config.replace(**options)
    return model
