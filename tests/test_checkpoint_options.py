"""Checkpoints store the architecture only (run-time options are chosen at load time); old folders load."""

import json
import os

import numpy as np

import clipjax
from clipjax.config import RUNTIME_OPTIONS
from helpers import tiny_checkpoint


def test_saved_config_has_no_runtime_options_and_load_applies_them(tmp_path):
    folder = tiny_checkpoint(str(tmp_path / "m"))
    with open(os.path.join(folder, "clipjax.json")) as f:
        saved = json.load(f)["config"]
    assert not set(RUNTIME_OPTIONS) & set(saved), saved.keys()
    fp32 = clipjax.load(folder)
    bf16 = clipjax.load(folder, options={"dtype": "bfloat16", "remat": "full", "scan_layers": False})
    assert (bf16.config.dtype, bf16.config.remat, bf16.config.scan_layers) == ("bfloat16", "full", False)
    assert bf16.config.architecture() == fp32.config
    pixels = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    a, b = np.asarray(fp32.encode_image(pixels)), np.asarray(bf16.encode_image(pixels))
    assert np.abs(a - b).max() < 5e-2  # bf16 compute against fp32, unit-norm embeddings


def test_checkpoint_written_with_runtime_options_still_loads(tmp_path):
    """Folders from before the split stored dtype etc. in the config: still read, options ignored."""
    folder = tiny_checkpoint(str(tmp_path / "m"))
    meta = os.path.join(folder, "clipjax.json")
    with open(meta) as f:
        d = json.load(f)
    d["config"].update(dtype="bfloat16", param_dtype="float32", scan_layers=False, remat="dots", attention="xla")
    with open(meta, "w") as f:
        json.dump(d, f)
    model = clipjax.load(folder)
    assert model.config.dtype == "float32" and model.config.remat == "none" and model.config.scan_layers


def test_checkpoint_from_before_the_log_logit_scale_rename_loads(tmp_path):
    """Old folders call the log-parameter `logit_scale` (param and `init_logit_scale` in the config)."""
    import orbax.checkpoint as ocp

    folder = tiny_checkpoint(str(tmp_path / "new"))
    new = clipjax.load(folder)
    old = str(tmp_path / "old")
    os.makedirs(old)
    with open(os.path.join(folder, "clipjax.json")) as f:
        d = json.load(f)
    d["config"]["init_logit_scale"] = d["config"].pop("init_log_logit_scale")
    with open(os.path.join(old, "clipjax.json"), "w") as f:
        json.dump(d, f)
    pure = {str(k): v for k, v in new.params.to_pure_dict().items()}
    pure["logit_scale"] = pure.pop("log_logit_scale")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(old, "params"), pure)
    loaded = clipjax.load(old)
    assert loaded.config == new.config
    assert loaded.logit_scale == new.logit_scale
