"""Which open_clip architectures clipjax converts exactly, and why the others are refused.

`python -m clipjax.convert.support` prints the README's table from the installed open_clip's
model configs (open_clip is imported only here, lazily). The verdict for each name is what
`from_open_clip_json` does with its config: a preset of the same name, or the `ConfigError`.
"""

from __future__ import annotations

from clipjax.config import ConfigError
from clipjax.convert.open_clip_config import from_open_clip_json
from clipjax.presets import PRESETS

BEGIN, END = "<!-- open_clip support table: begin -->", "<!-- open_clip support table: end -->"


def verdict(name: str, config: dict) -> tuple[str, str]:
    """(`exact` | `refused`, detail) for open_clip model `name` with model-config dict `config`."""
    try:
        cfg = from_open_clip_json(config)
    except ConfigError as e:
        reason = str(e).split(": ", 1)[-1].split("; clipjax cannot run")[0]
        key = str(e).split(":", 1)[0].replace("open_clip ", "")
        return "refused", f"`{key}`: {reason}"
    preset = PRESETS.get(name)
    if preset is None or preset.architecture().replace(preprocess=cfg.preprocess) != cfg.architecture():
        raise AssertionError(f"{name}: open_clip's config converts but does not equal clipjax's preset")
    v = cfg.vision
    tower = (f"ModifiedResNet {list(v.layers)}, {v.heads} pool heads" if v.arch == "resnet" else
             f"ViT {v.layers}x{v.width}, {v.heads} heads of {v.width // v.heads}, {v.act}, pool {v.pool}")
    if cfg.text.embed_cls:
        tower += "; CoCa's contrastive towers (the captioning decoder is not converted)"
    return "exact", f"preset `{name}`: {tower}"


def support_table(configs: dict[str, dict]) -> str:
    """Markdown table over `{open_clip name: model config}`, in the given order."""
    rows = ["| open_clip model | clipjax | detail |", "|---|---|---|"]
    for name, config in configs.items():
        status, detail = verdict(name, config)
        rows.append(f"| {name} | {status} | {detail.replace('|', '/')} |")
    return "\n".join(rows)


def open_clip_configs() -> dict[str, dict]:
    """The model configs the installed open_clip ships (its `model_configs/*.json`; not those added at run
    time with `open_clip.add_model_config`), by name, in `open_clip.list_models()` order."""
    import os

    import open_clip

    folder = os.path.join(os.path.dirname(open_clip.__file__), "model_configs")
    shipped = {f[:-5] for f in os.listdir(folder) if f.endswith(".json")}
    return {name: open_clip.get_model_config(name) for name in open_clip.list_models() if name in shipped}


if __name__ == "__main__":
    print(BEGIN)
    print(support_table(open_clip_configs()))
    print(END)
