"""Bad checkpoints: each gets a clear error naming the problem; nothing is executed or left behind."""

import os
import pickle

import numpy as np
import pytest

import torch
import open_clip

from clipjax.cli import main as cli  # noqa: E402
from clipjax.convert.api import convert  # noqa: E402
from clipjax.convert.errors import ConversionError  # noqa: E402

pytestmark = pytest.mark.parity

TINY = dict(embed_dim=16, vision_cfg=dict(image_size=32, layers=1, width=32, patch_size=16, head_width=16),
            text_cfg=dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1))


@pytest.fixture(scope="module")
def state_dict():
    torch.manual_seed(0)
    return open_clip.CLIP(**TINY).eval().state_dict()


@pytest.fixture
def config_file(tmp_path):
    import json

    p = tmp_path / "tiny.json"
    p.write_text(json.dumps(TINY))
    return str(p)


def _no_output(tmp_path, out):
    assert not os.path.exists(out)
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n], "temporary folder left behind"


def _save(sd, path):
    torch.save(sd, path)
    return str(path)


def test_good_tiny_checkpoint_converts(tmp_path, state_dict, config_file):
    """Control: the unmodified state dict converts, so the failures below are caused by the damage."""
    out = str(tmp_path / "out")
    convert(_save(state_dict, tmp_path / "m.pt"), out, config=config_file)
    assert os.path.exists(os.path.join(out, "clipjax.json"))


def test_missing_key(tmp_path, state_dict, config_file):
    sd = dict(state_dict)
    del sd["visual.ln_post.weight"]
    out = str(tmp_path / "out")
    with pytest.raises(ConversionError, match=r"missing keys \(1\): \['visual.ln_post.weight'\]"):
        convert(_save(sd, tmp_path / "m.pt"), out, config=config_file)
    _no_output(tmp_path, out)


def test_extra_key(tmp_path, state_dict, config_file):
    sd = dict(state_dict, **{"visual.adapter.weight": torch.zeros(3)})
    out = str(tmp_path / "out")
    with pytest.raises(ConversionError, match=r"unexpected keys \(1\): \['visual.adapter.weight'\]"):
        convert(_save(sd, tmp_path / "m.pt"), out, config=config_file)
    _no_output(tmp_path, out)


def test_shape_mismatch(tmp_path, state_dict, config_file):
    sd = dict(state_dict)
    sd["text_projection"] = torch.zeros(32, 20)
    out = str(tmp_path / "out")
    with pytest.raises(ConversionError, match=r"text.proj: got \(32, 20\), expected \(32, 16\)"):
        convert(_save(sd, tmp_path / "m.pt"), out, config=config_file)
    _no_output(tmp_path, out)


def test_wrong_arch_name(tmp_path, state_dict, capsys):
    src = _save(state_dict, tmp_path / "m.pt")
    assert cli(["convert", src, str(tmp_path / "out"), "--arch", "ViT-Q-99"]) == 2
    assert "unknown architecture 'ViT-Q-99'" in capsys.readouterr().err


def test_arch_that_does_not_fit(tmp_path, state_dict):
    out = str(tmp_path / "out")
    with pytest.raises(ConversionError, match="does not match the architecture|do not match the architecture"):
        convert(_save(state_dict, tmp_path / "m.pt"), out, arch="ViT-B-32")
    _no_output(tmp_path, out)


def test_siglip_arch_for_clip_weights(tmp_path, state_dict):
    with pytest.raises(ConversionError, match="CLIP model .* architecture given is SigLIP"):
        convert(_save(state_dict, tmp_path / "m.pt"), str(tmp_path / "out"), arch="ViT-B-16-SigLIP")


@pytest.mark.parametrize("fmt", ["pt", "safetensors", "torchscript"])
def test_truncated_file(tmp_path, state_dict, config_file, fmt):
    path = tmp_path / f"m.{fmt}"
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    elif fmt == "torchscript":
        model = open_clip.CLIP(**TINY).eval()
        traced = torch.jit.trace_module(model, {"encode_image": torch.zeros(1, 3, 32, 32)}, check_trace=False)
        torch.jit.save(traced, str(path))
        path = tmp_path / "m.pt"
        os.replace(tmp_path / f"m.{fmt}", path)
    else:
        torch.save(state_dict, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    out = str(tmp_path / "out")
    with pytest.raises(ConversionError, match="truncated|corrupt|unreadable|not a readable"):
        convert(str(path), out, config=config_file)
    _no_output(tmp_path, out)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused(tmp_path, config_file):
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = marker
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": evil}, f)
    out = str(tmp_path / "out")
    with pytest.raises(ConversionError, match="refused to unpickle"):
        convert(str(path), out, config=config_file)
    assert not marker.exists(), "the pickle's code ran"
    _no_output(tmp_path, out)


def test_torchscript_with_foreign_global_is_refused(tmp_path):
    """A TorchScript-looking zip whose data.pkl names os.system is rejected by the restricted unpickler."""
    import zipfile

    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = marker
    path = tmp_path / "ts.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/constants.pkl", pickle.dumps(()))
        zf.writestr("archive/data.pkl", pickle.dumps(evil, protocol=2))
    with pytest.raises(ConversionError, match="refusing to load global (posix|os).system"):
        convert(str(path), str(tmp_path / "out"))
    assert not marker.exists()


def test_unrecognised_layout(tmp_path):
    path = _save({"encoder.weight": torch.zeros(2, 2)}, tmp_path / "m.pt")
    with pytest.raises(ConversionError, match="unrecognised checkpoint layout"):
        convert(path, str(tmp_path / "out"))


def test_missing_source_and_existing_output(tmp_path, state_dict, config_file):
    with pytest.raises(ConversionError, match="no such file"):
        convert(str(tmp_path / "nope.pt"), str(tmp_path / "out"))
    src = _save(state_dict, tmp_path / "m.pt")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="exists"):
        convert(src, str(out), config=config_file)
    assert (out / "keep.txt").read_text() == "user data"


def test_load_rejects_non_checkpoint(tmp_path):
    import clipjax

    with pytest.raises(ConversionError, match="neither a clipjax checkpoint"):
        clipjax.load(str(tmp_path))


def test_load_converts_pytorch_file_in_memory(tmp_path, state_dict, config_file):
    """clipjax.load on a PyTorch file gives the same model as convert + load, writing nothing."""
    import clipjax

    src = _save(state_dict, tmp_path / "m.pt")
    direct = clipjax.load(src, config=config_file)
    convert(src, str(tmp_path / "out"), config=config_file)
    saved = clipjax.load(str(tmp_path / "out"))
    pixels = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_array_equal(direct.encode_image(pixels), saved.encode_image(pixels))
    assert sorted(os.listdir(tmp_path)) == ["m.pt", "out", "tiny.json"]


def test_params_not_matching_config_on_load(tmp_path, state_dict, config_file):
    """A checkpoint whose stored params do not fit its clipjax.json fails loudly on load."""
    import json

    import clipjax

    out = tmp_path / "out"
    convert(_save(state_dict, tmp_path / "m.pt"), str(out), config=config_file)
    meta = json.loads((out / "clipjax.json").read_text())
    meta["config"]["embed_dim"] = 24
    (out / "clipjax.json").write_text(json.dumps(meta))
    with pytest.raises(ConversionError, match="do not match the stored config"):
        clipjax.load(str(out))
