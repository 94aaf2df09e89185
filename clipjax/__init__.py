"""clipjax: CLIP, SigLIP and CLOOB in JAX/Flax."""

from clipjax.config import CLIPConfig, PRESETS, TextConfig, VisionConfig, get_config

__version__ = "0.1.0"

__all__ = ["CLIPConfig", "PRESETS", "TextConfig", "VisionConfig", "get_config", "load"]


def load(path, mesh=None, **convert_kw):
    """Load a model: a clipjax checkpoint folder (`clipjax convert` output), or any source that
    `clipjax convert` reads (TorchScript / open_clip file, HF folder), converted in memory.

    `convert_kw` (`arch=`, `config=`) apply to in-memory conversion only.
    """
    import os

    if os.path.isdir(path) and os.path.exists(os.path.join(path, "clipjax.json")):
        from clipjax.checkpoint import load as _load

        return _load(path, mesh=mesh)
    from clipjax.convert.api import load_pytorch

    return load_pytorch(path, mesh=mesh, **convert_kw)
