"""The `clipjax` console entry point, run as a real subprocess."""

import json
import os
import subprocess
import sys

import pytest

import torch
import open_clip

pytestmark = pytest.mark.parity


def _run(*args, cwd):
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "clipjax.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def test_convert_info_export_via_subprocess(tmp_path):
    cfg = dict(embed_dim=16, vision_cfg=dict(image_size=32, layers=1, width=32, patch_size=16, head_width=16),
               text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1))
    torch.manual_seed(0)
    torch.save(open_clip.CLIP(**cfg).state_dict(), tmp_path / "m.bin")
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    r = _run("convert", "m.bin", "ck", "--config", "cfg.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["embed_dim"] == 16
    r = _run("info", "ck", cwd=tmp_path)
    assert r.returncode == 0 and json.loads(r.stdout)["vision"]["width"] == 32
    r = _run("export", "ck", "hf", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt"} <= set(os.listdir(tmp_path / "hf"))
    r = _run("convert", "m.bin", "ck", "--config", "cfg.json", cwd=tmp_path)
    assert r.returncode == 2 and "exists" in r.stderr and "Traceback" not in r.stderr
