"""Zero-shot prompt templates and class names shipped as data.

The JSON files under `clipjax/assets/` are CLIP_benchmark's English templates
and class names (see `clipjax/assets/SOURCES.md`). Templates use the `{c}`
placeholder for the class name; `get_templates("imagenet1k")` is OpenAI's list of
80 ImageNet templates.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Mapping, Sequence

_TEMPLATES_FILE = "clip_benchmark_en_zeroshot_classification_templates.json"
_CLASSNAMES_FILE = "clip_benchmark_en_classnames.json"

# Data-set name aliases (tfds / common spellings) -> CLIP_benchmark keys.
ALIASES = {
    "imagenet": "imagenet1k",
    "imagenet2012": "imagenet1k",
    "imagenet_v2": "imagenet1k",
    "imagenet2012_real": "imagenet1k",
    "oxford_iiit_pet": "pets",
    "oxford_flowers102": "flowers",
    "stanford_cars": "cars",
    "cars196": "cars",
    "caltech101": "caltech101",
    "svhn_cropped": "svhn",
    "dtd": "dtd",
    "food101": "food101",
    "sun397": "sun397",
}


@functools.cache
def _load(filename: str) -> dict:
    with resources.files("clipjax").joinpath("assets", filename).open("r", encoding="utf-8") as f:
        return json.load(f)


def canonical_name(dataset: str) -> str:
    """CLIP_benchmark's key for `dataset` (lower-cased, with tfds aliases resolved)."""
    name = dataset.lower().split(":")[0].replace("-", "_")
    return ALIASES.get(name, name)


def template_datasets() -> list[str]:
    """Data sets that have templates."""
    return sorted(_load(_TEMPLATES_FILE))


def classname_datasets() -> list[str]:
    """Data sets that have curated class names."""
    return sorted(_load(_CLASSNAMES_FILE))


def get_templates(dataset: str = "imagenet1k") -> list[str]:
    """Prompt templates (with a `{c}` placeholder) for `dataset`.

    Raises:
      KeyError: no templates ship for `dataset`; the message lists those that do.
    """
    table = _load(_TEMPLATES_FILE)
    key = canonical_name(dataset)
    if key not in table:
        raise KeyError(f"no zero-shot templates for {dataset!r}; available: {', '.join(sorted(table))}")
    return list(table[key])


def get_classnames(dataset: str) -> list[str]:
    """Curated class names for `dataset` (CLIP_benchmark's `en_classnames.json`).

    Raises:
      KeyError: none ship for `dataset` (for example cifar10, whose names come from the data set).
    """
    table = _load(_CLASSNAMES_FILE)
    key = canonical_name(dataset)
    if key not in table:
        raise KeyError(f"no curated class names for {dataset!r}; available: {', '.join(sorted(table))}")
    return list(table[key])


def openai_imagenet_templates() -> list[str]:
    """OpenAI's 80 ImageNet prompt templates."""
    return get_templates("imagenet1k")


def build_prompts(names: Sequence[str], prompt_templates: Sequence[str] | Mapping[str, Sequence[str]]
                  ) -> list[list[str]]:
    """Prompt strings per class, `[C][T_c]`, as CLIP_benchmark's `zero_shot_classifier` builds them.

    Args:
      names: class names, length C.
      prompt_templates: either a list of templates with a `{c}` placeholder (the same T
        for every class), or a mapping class name -> list of finished prompts (CuPL style,
        T may differ per class).

    Raises:
      ValueError: no classes, no templates, a template without `{c}`, or a class missing
        from the mapping.
      TypeError: `prompt_templates` is neither a sequence nor a mapping.
    """
    names = list(names)
    if not names:
        raise ValueError("no class names given")
    if isinstance(prompt_templates, Mapping):
        missing = [c for c in names if c not in prompt_templates]
        if missing:
            raise ValueError(f"class-specific prompts missing for classes {missing[:5]}")
        out = [list(prompt_templates[c]) for c in names]
        empty = [c for c, p in zip(names, out) if not p]
        if empty:
            raise ValueError(f"no prompts for classes {empty[:5]}")
        return out
    if isinstance(prompt_templates, str) or not isinstance(prompt_templates, Sequence):
        raise TypeError("prompt_templates must be a list of templates or a dict class -> prompts, "
                        f"got {type(prompt_templates).__name__}")
    prompt_templates = list(prompt_templates)
    if not prompt_templates:
        raise ValueError("no templates given")
    bad = [t for t in prompt_templates if "{c}" not in t]
    if bad:
        raise ValueError(f"templates must contain the '{{c}}' placeholder, got {bad[:3]}")
    return [[t.format(c=c) for t in prompt_templates] for c in names]
