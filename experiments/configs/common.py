"""Shared layout of every config in this folder (not a recipe itself).

A config is an `ml_collections.ConfigDict` with

* every `clipjax.train.TrainConfig` field at the top level (`total_steps`, `batch_size` (global),
  `lr`, `warmup_steps`, `loss`, `seed`, `log_every`, `checkpoint_every`, `eval_every`, ...), at
  TrainConfig's defaults (open_clip's) unless the recipe sets them; optional fields are typed
  placeholders, so `--config.grad_clip_norm=1.0` works on the command line;
* `model.name`: an open_clip preset name (`clipjax.get_config`), or None to take the architecture of
  `init_from`; `model.overrides`: a nested dict of `CLIPConfig` fields merged over the preset
  (`{"embed_dim": 64, "vision": {"width": 128}}`); unknown fields raise naming them. The config is
  locked, so the command line can only set keys the file defines
  (`--config.model.overrides.vision.width=96`); for others pass the whole dict:
  `--config.model.overrides="{'vision': {'pool': 'gap'}}"`;
* `init_from`: a clipjax checkpoint folder, training workdir or convertible file to start from
  (`clipjax.load`);
* `mesh.data`, `mesh.fsdp`, `mesh.tensor`: device mesh sizes (-1: the remaining devices; all 1: one
  device, no mesh);
* `data`: `data.name` picks the source (`digits`, `arrays`: an .npz of `image` + `text`/`caption`);
  the other keys belong to that source; a name the script cannot provide fails naming it;
* `init_towers`: with `init_from`, which towers to take from it: "both", "image" (LiT: a fresh
  text tower and logit scale) or "text";
* `report.enabled`: write the source's report (digits: `WORKDIR/report.json` and plots) after
  training; `report.min_accuracy`: exit non-zero below this held-out zero-shot accuracy;
* `wise_ft_alpha`: after training, also save the WiSE-FT interpolation with `init_from`.

`experiments/train.py` converts it at the boundary (`train.train_config`, `train.model_config`).
"""

from __future__ import annotations

import dataclasses

import ml_collections
from ml_collections import config_dict

from clipjax.train.config import TrainConfig

_OPTIONAL = {"float | None": float, "int | None": int, "str | None": str}


def base_config(**train_overrides) -> ml_collections.ConfigDict:
    """All keys with their defaults; `train_overrides` set TrainConfig fields."""
    c = ml_collections.ConfigDict()
    for f in dataclasses.fields(TrainConfig):
        if f.default is None:
            c[f.name] = config_dict.placeholder(_OPTIONAL[f.type])
        else:
            c[f.name] = f.default
    for k, v in train_overrides.items():
        if k not in c:
            raise KeyError(f"{k!r} is not a TrainConfig field")
        c[k] = v
    c.model = ml_collections.ConfigDict({"name": config_dict.placeholder(str), "overrides": {}})
    c.init_from = config_dict.placeholder(str)
    c.init_towers = "both"
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.data = ml_collections.ConfigDict({"name": config_dict.placeholder(str)})
    c.report = ml_collections.ConfigDict({"enabled": False, "min_accuracy": config_dict.placeholder(float)})
    c.wise_ft_alpha = config_dict.placeholder(float)
    return c


def steps_for_epochs(epochs: float, samples_per_epoch: int, batch_size: int) -> int:
    """open_clip's schedule length: `epochs * (samples_per_epoch // batch_size)` updates."""
    return int(epochs * (samples_per_epoch // batch_size))
