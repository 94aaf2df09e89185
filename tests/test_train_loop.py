"""The training loop's checks and records, in-process (`clipjax.train.loop.train`, tiny CLIP).

* a workdir holding another architecture's checkpoint is refused before the first step, and
  nothing in it changes;
* a batch of the wrong shape or dtype is refused before anything is created or written, naming
  the key and what was expected;
* metrics.jsonl rows hold step, loss, lr (the schedule's value), logit scale, samples/s, MFU and
  the data-wait fraction; a line cut short by a kill is dropped on resume;
* an unreadable `train/` item of the newest checkpoint is reported, moved aside, and the previous
  checkpoint restored (the params item is covered end to end in test_train_faults.py).

The trained workdir these read is the session's reference run (`train_worker.reference_run`, a
subprocess, shared with test_train_faults.py); the refusals themselves never reach a compile.
"""

import glob
import json
import os
import shutil

import numpy as np
import pytest

import train_worker as W

STEPS = W.REFERENCE_STEPS  # checkpoints every 2 steps, keeps 3: steps 8, 10, 12


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The session's reference run (read only; tests copy it to change anything)."""
    return W.reference_run(tmp_path_factory)


def snapshot(folder) -> dict:
    """Every file and folder under `folder` with its size and mtime (ns)."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            st = os.stat(path)
            out[os.path.relpath(path, folder)] = (st.st_size if name in files else None, st.st_mtime_ns)
    return out


class Batches:
    """The same batch forever, with the iterator-state protocol."""

    def __init__(self, batch):
        self.batch, self.n = batch, 0

    def __iter__(self):
        return self

    def __next__(self):
        self.n += 1
        return self.batch

    def get_state(self):
        return {"n": self.n}

    def set_state(self, state):
        self.n = state["n"]


def good_batch():
    a = W.arrays()
    return {k: v[:W.BATCH] for k, v in a.items()}


def test_workdir_of_another_architecture_is_refused_untouched(workdir):
    import dataclasses

    from clipjax.train.checkpoints import WorkdirError
    from clipjax.train.loop import train

    other = W.tiny_config()
    other = other.replace(text=dataclasses.replace(other.text, layers=1))
    before = snapshot(workdir)
    data = Batches(good_batch())
    with pytest.raises(WorkdirError, match=r"another architecture.*'text'.*Use a new --workdir"):
        train(other, W.train_config(STEPS), workdir, data, progress=False, log=lambda m: None)
    assert data.n == 0  # not a batch read
    assert snapshot(workdir) == before


def _wrong(kind):
    b = good_batch()
    if kind == "image-shape":
        b["image"] = b["image"][:, :28, :28]
    elif kind == "image-dtype":
        b["image"] = b["image"].astype(np.float64)
    elif kind == "text-dtype":
        b["text"] = b["text"].astype(np.int64)
    elif kind == "text-length":
        b["text"] = np.zeros((W.BATCH, W.CONTEXT + 1), np.int32)
    elif kind == "batch-size":
        b = {k: v[:W.BATCH // 2] for k, v in b.items()}
    elif kind == "missing":
        del b["text"]
    return b


WRONG = {
    "image-shape": r"batch 'image' has shape \(8, 28, 28, 3\); expected \[8, 32, 32, 3\]",
    "image-dtype": r"batch 'image' has dtype float64; expected uint8 \(0..255\) or float32",
    "text-dtype": r"batch 'text' has dtype int64; expected int32",
    "text-length": r"batch 'text' has shape \(8, 9\); expected \[8, <= 8\]",
    "batch-size": r"batch 'image' has shape \(4, 32, 32, 3\); expected \[8, 32, 32, 3\]",
    "missing": r"batch is missing \['text'\]",
}


@pytest.mark.parametrize("kind", list(WRONG))
def test_wrong_batch_is_refused_before_anything_is_written(tmp_path, kind):
    from clipjax.train import checkpoints as C
    from clipjax.train.loop import train

    wd = str(tmp_path / "w")
    with pytest.raises(ValueError, match=WRONG[kind]):
        train(W.tiny_config(), W.train_config(STEPS), wd, Batches(_wrong(kind)), progress=False, log=lambda m: None)
    left = snapshot(wd) if os.path.exists(wd) else {}
    assert set(left) <= {"checkpoints"}, left  # at most Orbax's empty checkpoints/ folder
    C.check_workdir(wd, W.tiny_config())  # a corrected rerun is not refused


def test_metrics_rows(workdir):
    from clipjax.train.optim import learning_rate_schedule

    rows = W.metrics(workdir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    schedule = learning_rate_schedule(W.train_config(STEPS))
    for r in rows:
        for key in ("step", "loss", "lr", "logit_scale", "samples_per_sec", "mfu", "data_wait_frac", "grad_norm",
                    "step_seconds", "epoch"):
            assert key in r and np.isfinite(r[key]), (key, r)
        assert r["samples_per_sec"] > 0 and r["mfu"] > 0 and 0 <= r["data_wait_frac"] <= 1, r
        # lr of the update that produced step s is the schedule at s - 1 (fp32: 1e-6 of the peak lr)
        assert r["lr"] == pytest.approx(float(schedule(r["step"] - 1)), abs=1e-6 * W.LR)
        assert 1.0 <= r["logit_scale"] <= 100.0
        assert r["epoch"] == pytest.approx(r["step"] * W.BATCH / W.NUM_EXAMPLES)


def test_metrics_writer_drops_later_and_truncated_rows_on_resume(tmp_path):
    from clipjax.train.observe import MetricsWriter, read_metrics

    wd = str(tmp_path)
    with open(os.path.join(wd, "metrics.jsonl"), "w") as f:
        for s in range(1, 6):
            f.write(json.dumps({"step": s, "loss": float(s)}) + "\n")
        f.write('{"step": 6, "lo')  # killed in the middle of a write
    w = MetricsWriter(wd, resume_step=3, tensorboard=False)
    w.write(4, {"loss": 40.0})
    w.close()
    assert read_metrics(wd) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 3.0},
                                {"step": 4, "loss": 40.0}]


def test_unreadable_train_item_falls_back_to_the_previous_checkpoint(tmp_path, workdir):
    import jax

    from clipjax.models import clip as F
    from clipjax.train import checkpoints as C
    from clipjax.train.optim import make_optimizer
    from clipjax.train.state import state_factory

    wd = str(tmp_path / "w")
    shutil.copytree(workdir, wd)
    files = glob.glob(os.path.join(wd, "checkpoints", str(STEPS), "train", "ocdbt.process_0", "d", "*"))
    os.remove(max(files, key=os.path.getsize))

    mc, cfg = W.tiny_config(), W.train_config(STEPS)
    optimizer = make_optimizer(cfg, F.split_trainable(F.abstract_params(mc))[0], mc)
    abstract = jax.eval_shape(state_factory(mc, optimizer, seed=cfg.seed, ema=cfg.ema_decay is not None), None)
    ckpt, logged = C.Checkpointer(wd), []
    try:
        state, data_state = ckpt.restore(abstract, None, log=logged.append)
    finally:
        ckpt.close()
    assert int(state.step) == STEPS - 2 and data_state["next_batch"] == STEPS - 2
    assert logged[0].startswith(f"checkpoint at step {STEPS} in {os.path.join(wd, 'checkpoints')} cannot be "
                                "restored (ValueError: "), logged
    assert "/train/" in logged[0] and logged[0].endswith("; trying the previous one")
    assert logged[1].endswith(f"to {os.path.join(wd, 'checkpoints', str(STEPS))}.unreadable")
    assert W.step_folders(wd) == [STEPS - 4, STEPS - 2]
    # clipjax.load(workdir) now reads the restored step, and it is that step's params
    got, want = W.flat_params(wd), W.flat_params(workdir, step=STEPS - 2)
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    restored = {jax.tree_util.keystr(k): np.asarray(v)
                for k, v in jax.tree_util.tree_flatten_with_path(state.model_state.to_pure_dict())[0]}
    assert restored.keys() == want.keys() and all(np.array_equal(restored[k], want[k]) for k in want)


def test_export_of_a_training_workdir(workdir, tmp_path):
    """`clipjax export WORKDIR ...` takes the newest step of a training run; transformers and open_clip load
    the exports and compute the trained model's embeddings (fp32, <= 1e-5 of the embedding scale)."""
    import open_clip
    import torch
    import transformers
    from helpers import assert_close_scaled

    import clipjax
    from clipjax.cli import main as cli

    model = clipjax.load(workdir)
    pixels = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    want = np.asarray(model.encode_image(pixels, normalize=False))
    tp = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
    assert cli(["export", workdir, str(tmp_path / "hf")]) == 0
    with torch.no_grad():
        hf = transformers.CLIPModel.from_pretrained(str(tmp_path / "hf")).eval()
        got = hf.get_image_features(pixel_values=tp)
    assert_close_scaled(getattr(got, "pooler_output", got).numpy(), want, what="transformers export")
    out = tmp_path / "oc" / "model.safetensors"
    assert cli(["export", workdir, str(out), "--format", "open_clip"]) == 0
    paths = {p: os.path.join(out.parent, p) for p in os.listdir(out.parent)}
    (name,) = [p[:-5] for p in paths if p.endswith(".json") and p != "open_clip_config.json"]
    open_clip.add_model_config(paths[f"{name}.json"])
    oc = open_clip.create_model(name, pretrained=str(out)).eval()
    with torch.no_grad():
        assert_close_scaled(oc.encode_image(tp).numpy(), want, what="open_clip export")
