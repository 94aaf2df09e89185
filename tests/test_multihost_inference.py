"""Inference and checkpoint writing on several processes (`jax.process_count() > 1`).

Two processes on localhost (`jax.distributed`, gloo CPU collectives, 2 fake CPU devices each; see
`inference_worker.py`) load a tiny checkpoint sharded over a `data x fsdp` mesh whose fsdp axis spans
the processes, and embed their own halves of one batch. Each process's addressable output shards
must hold the embeddings of exactly the rows it fed, equal to this (single) process's embeddings of
those rows to EMBED_ATOL (unit-norm embeddings; sharded matmuls only reorder float32 sums), and the
logits to EMBED_ATOL x logit_scale (a logit is the scale times a cosine). Their multi-host `save`
must load here equal to the original params (bitwise: the same values are written).

The single-process tests check the input contract: a NaN or a wrong shape still raises a clear error,
and `jax.Array` inputs go through without any device -> host copy.
"""

import json
import os

import jax
import numpy as np
import pytest

import clipjax
import inference_worker as W
from helpers import tiny_checkpoint

EMBED_ATOL = 1e-6
WORKER_TIMEOUT = 240


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(str(tmp_path_factory.mktemp("multihost-inference") / "ck"))


def _flat(model) -> dict:
    return {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_flatten_with_path(model.params.to_pure_dict())[0]}


def _rows_of(npz, name: str) -> list[tuple[tuple[int, int], np.ndarray]]:
    """[((start, stop), data)] of one output's shards in a worker's npz, by row."""
    keys = sorted((k for k in npz.files if k.startswith(f"{name}_") and not k.endswith("_rows")),
                  key=lambda k: int(k.rsplit("_", 1)[1]))
    return sorted(((tuple(int(v) for v in npz[f"{k}_rows"]), npz[k]) for k in keys), key=lambda r: r[0])


def test_two_processes_embed_like_one_and_save_a_checkpoint_one_process_loads(checkpoint, tmp_path):
    import subprocess
    import sys

    import portpicker

    n = 2
    port = portpicker.pick_unused_port()
    procs = []
    for i in range(n):
        logs = open(tmp_path / f"process{i}.log", "w")
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(W.__file__), "--checkpoint", checkpoint,
                                       "--out", str(tmp_path), "--coordinator", f"127.0.0.1:{port}",
                                       "--num-processes", str(n), "--process-id", str(i)],
                                      stdout=logs, stderr=subprocess.STDOUT))
    try:
        # the reference, while the workers start: one process, one device, the whole batch
        ref = clipjax.load(checkpoint)
        pixels, captions = W.inputs(ref.config.vision.image_size)
        ref_img, ref_txt = np.asarray(ref.encode_image(pixels)), np.asarray(ref.encode_text(captions))
        rcs = [p.wait(timeout=WORKER_TIMEOUT) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    tails = [(tmp_path / f"process{i}.log").read_text()[-3000:] for i in range(n)]
    assert rcs == [0] * n, tails

    reports = [json.loads((tmp_path / f"process{i}.json").read_text()) for i in range(n)]
    outputs = [np.load(tmp_path / f"process{i}.npz") for i in range(n)]
    for i, r in enumerate(reports):
        # params really are split between the processes: each holds half of the embed axis
        assert r["token_embed"] == {"spec": "P(None, 'fsdp')", "fully_addressable": False,
                                    "local_shard": [49408, 16]}, r
        assert r["shapes"] == {"image": [W.BATCH, 16], "text": [W.BATCH, 16], "logits": [W.BATCH, W.BATCH]}, r
        assert r["image_spec"] == "P(('data', 'fsdp'),)", r
        # global / process-local jax.Array inputs and unchecked host inputs: the same shards, no d2h copy
        assert r["equal"] == {"image_global": True, "image_local_array": True, "image_unchecked_host": True,
                              "text_global": True}, r
        # a NaN on process 1 only: every process raises, naming the problem (and the process)
        assert r["nan_host"] == "ValueError: pixels contain NaN or infinite values (on process(es) [1] of 2)", r
        assert r["nan_device_unchecked"] is None, r  # jax.Array values are not checked by default ...
        assert r["nan_device_validate"] == "ValueError: pixels contain NaN or infinite values", r  # ... on request
        assert r["save"] == str(tmp_path / "saved"), r
        assert r["save_again"].startswith("FileExistsError: "), r
    assert reports[1]["atomic_failure"] == "RuntimeError: injected failure on process 1"
    assert reports[0]["atomic_failure"].startswith("RuntimeError: process(es) [1] failed while writing")

    # each process's shards hold its own rows' embeddings, in order; together the whole global batch
    global_rows = {}
    for i, out in enumerate(outputs):
        mine = np.arange(W.BATCH)[W.rows(i, n)]
        for name, want in (("image", ref_img), ("text", ref_txt)):
            got = _rows_of(out, name)
            np.testing.assert_allclose(np.concatenate([d for _, d in got]), want[mine], rtol=0, atol=EMBED_ATOL,
                                       err_msg=f"process {i} {name} embeddings vs one process")
        starts = [g for (a, b), _ in _rows_of(out, "image") for g in range(a, b)]
        global_rows.update(zip(starts, mine))
    assert sorted(global_rows) == list(range(W.BATCH)) and sorted(global_rows.values()) == list(range(W.BATCH))
    # logits: rows are this process's images, columns the whole global text batch (in global order)
    order = np.asarray([global_rows[g] for g in range(W.BATCH)])
    ref_logits = ref.logit_scale * ref_img[order] @ ref_txt[order].T
    for i, out in enumerate(outputs):
        for (a, b), data in _rows_of(out, "logits"):
            np.testing.assert_allclose(data, ref_logits[a:b], rtol=0, atol=EMBED_ATOL * ref.logit_scale,
                                       err_msg=f"process {i} logits rows {a}:{b}")

    # the 2-process checkpoint: complete, loads in one process, equal params; nothing partial left behind
    saved = tmp_path / "saved"
    assert sorted(os.listdir(saved)) == ["clipjax.json", "params", "tokenizer"]
    assert json.loads((saved / "clipjax.json").read_text())["source"] == {"kind": "test"}
    back, original = _flat(clipjax.load(str(saved))), _flat(ref)
    assert back.keys() == original.keys()
    for k in original:
        np.testing.assert_array_equal(back[k], original[k], err_msg=k)
    assert clipjax.load(str(saved)).tokenizer(["a cat"]).tolist() == ref.tokenizer(["a cat"]).tolist()
    assert not (tmp_path / "failed").exists()
    assert [f for f in os.listdir(tmp_path) if f.startswith(".")] == []  # no temporary folders


def test_input_checks_stay_and_device_inputs_are_not_copied_back(checkpoint):
    from clipjax.sharding import batch_sharding, make_mesh

    mesh = make_mesh(data=2, fsdp=4)
    model = clipjax.load(checkpoint, mesh=mesh)
    pixels, captions = W.inputs(model.config.vision.image_size)

    # host inputs: checked on the host before any transfer
    bad = pixels.copy()
    bad[3, 1, 2, 0] = np.inf
    with pytest.raises(ValueError, match="pixels contain NaN or infinite values"):
        model.encode_image(bad)
    with pytest.raises(ValueError, match=r"pixels must be NHWC \[B, H, W, 3\]"):
        model.encode_image(pixels.transpose(0, 3, 1, 2))
    with pytest.raises(TypeError, match="token ids must be integers"):
        model.encode_text(np.zeros((2, 77), np.float32))

    # host rows become a global batch sharded over the batch axes, and the output keeps those rows
    emb = model.encode_image(pixels)
    assert emb.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
    assert model.logits(pixels, captions).sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))

    # jax.Array inputs: nothing is copied to the host (NaN values go through unless validate=True)
    on_mesh = jax.device_put(pixels, batch_sharding(mesh, 4))
    on_one = jax.device_put(pixels, jax.devices()[0])
    ids = jax.device_put(model.tokenize(captions), batch_sharding(mesh, 2))
    model.encode_image(on_one), model.encode_text(ids)  # compile first: compilation may read constants
    with jax.transfer_guard("disallow"):
        img = model.encode_image(on_mesh)
        img_one = model.encode_image(on_one)  # moved device to device onto the mesh
        txt = model.encode_text(ids)
        nan_out = model.encode_image(jax.device_put(bad, batch_sharding(mesh, 4)))
    np.testing.assert_array_equal(img, emb)
    np.testing.assert_array_equal(img_one, emb)
    np.testing.assert_array_equal(txt, model.encode_text(captions))
    assert not np.isfinite(np.asarray(nan_out)[3]).all()
    with pytest.raises(ValueError, match="pixels contain NaN or infinite values"):
        model.encode_image(jax.device_put(bad, batch_sharding(mesh, 4)), validate=True)
    model.encode_image(jax.device_put(pixels, batch_sharding(mesh, 4)), validate=True)  # finite: passes
