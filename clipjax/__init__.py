"""clipjax: CLIP, SigLIP and CLOOB in JAX/Flax."""

from clipjax.config import CLIPConfig, PRESETS, TextConfig, VisionConfig, get_config

__version__ = "0.1.0"

__all__ = ["CLIPConfig", "PRESETS", "TextConfig", "VisionConfig", "get_config", "load"]


def load(path, mesh=None):
    """Load a converted clipjax checkpoint folder; see `clipjax.checkpoint.load`."""
    from clipjax.checkpoint import load as _load

    return _load(path, mesh=mesh)
