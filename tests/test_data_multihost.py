"""Two real processes (jax.distributed over gloo on localhost) read one epoch of a source through
`clipjax.data`: each reads its own part by `jax.process_index()`, together every example exactly
once, and the trainer's state gathering (`checkpoints.gather_data_states`) collects both states.

Expected keys come from the table written here, not from the pipeline.
"""

import json
import os
import subprocess
import sys

import numpy as np

from clipjax.data.sources import image_bytes

WORKER = r"""
import json, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]),
                           initialization_timeout=120)
from clipjax.data import DataConfig, make_batches
from clipjax.tokenizer import Tokenizer
from clipjax.train.checkpoints import gather_data_states
it = make_batches(DataConfig(source=sys.argv[3]), image_size=16, tokenizer=Tokenizer.openai(context_length=8),
                  batch_size=4, seed=3, num_epochs=1)
next(it)
gathered = gather_data_states(it)
mine = it.get_state()
keys = [str(k) for b in it for k in b["__key__"]]
print(json.dumps({"keys": keys, "gathered": gathered, "mine": mine, "process": jax.process_index()}))
it.close()
"""


def run_two(script: str, *args: str) -> list[dict]:
    """`script COORDINATOR PROCESS_ID *args` in 2 processes; the JSON each prints last, by process."""
    import portpicker

    addr = f"127.0.0.1:{portpicker.pick_unused_port()}"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, "-c", script, addr, str(p), *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for p in range(2)]
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    return outs


def test_two_processes_read_disjoint_parts_and_gather_their_states(tmp_path):
    rows = 22
    pic = np.random.default_rng(0).integers(0, 255, (20, 24, 3), dtype=np.uint8)
    with open(tmp_path / "t.jsonl", "w") as f:
        for i in range(rows):
            (tmp_path / f"{i}.png").write_bytes(image_bytes(pic, "PNG"))
            f.write(json.dumps({"filepath": f"{i}.png", "title": f"picture {i}"}) + "\n")
    outs = run_two(WORKER, str(tmp_path / "t.jsonl"))
    assert [o["process"] for o in outs] == [0, 1]
    first_batches = 2 * 2  # each process's first batch (2 rows) was read before the loop
    a, b = (set(o["keys"]) for o in outs)
    assert not a & b and len(a | b) + first_batches == rows - rows % 4  # full batches of 4 only: 20 rows
    assert a | b <= {str(i) for i in range(rows)}
    for o in outs:
        g = o["gathered"]
        assert g["process_count"] == 2 and not g["global"]
        assert g["states"][o["process"]] == o["mine"]  # each process's own state, in process order
    assert outs[0]["gathered"] == outs[1]["gathered"]


EMBED_WORKER = r"""
import json, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]),
                           initialization_timeout=120)
from clipjax.cli.embed import embed
print(json.dumps(embed(sys.argv[3], sys.argv[4], sys.argv[5], dtype="float32", batch_size=8, shard_size=8,
                       progress=False)))
"""


def test_two_processes_embed_their_parts_of_a_source(tmp_path):
    """`clipjax embed` in 2 processes: each writes its own shards; together they equal one process's run."""
    from helpers import tiny_checkpoint

    from clipjax.cli.embed import embed, read_embeddings

    model = tiny_checkpoint(str(tmp_path / "model"))
    rng = np.random.default_rng(1)
    rows = 13
    with open(tmp_path / "t.jsonl", "w") as f:
        for i in range(rows):
            (tmp_path / f"{i}.png").write_bytes(image_bytes(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8), "PNG"))
            f.write(json.dumps({"filepath": f"{i}.png", "title": f"picture {i}"}) + "\n")
    source, out = str(tmp_path / "t.jsonl"), str(tmp_path / "two")
    summaries = run_two(EMBED_WORKER, model, source, out)
    assert sorted(s["rows"] for s in summaries) == [6, 7] and all(s["finished"] for s in summaries)
    embed(model, source, str(tmp_path / "one"), dtype="float32", batch_size=8, shard_size=8, progress=False,
          process_index=0, process_count=1)
    for modality in ("image", "text"):
        k2, e2 = read_embeddings(out, modality)
        k1, e1 = read_embeddings(str(tmp_path / "one"), modality)
        assert sorted(k2) == sorted(k1) == sorted(str(i) for i in range(rows))
        by_key = dict(zip(k1, e1))
        np.testing.assert_allclose(e2, np.stack([by_key[k] for k in k2]), rtol=0, atol=2e-6)
