"""Training on real files through `clipjax.data` (tar shards, one grain worker) survives kill -9:
restarted with the same command, every loss and the final params equal an uninterrupted run's.

Data: real photos as JPEGs in webdataset tar shards, one corrupt image among them (skipped and
counted both times). The runs are subprocesses of `train_worker.py --source`.
"""

import random
import re

import numpy as np
import pytest

import train_worker as W

STEPS, EVERY = 10, 2


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    import webdataset as wds
    from skimage import data

    from clipjax.data.sources import image_bytes

    root = tmp_path_factory.mktemp("shards")
    pics = [data.astronaut()[::8, ::8], data.chelsea()[::6, ::6], data.coffee()[::6, ::6], data.rocket()[::6, ::6]]
    for s in range(3):
        with wds.TarWriter(str(root / f"{s:05d}.tar")) as sink:
            for i in range(12):
                jpg = image_bytes(pics[(s + i) % 4], quality=90)
                if (s, i) == (1, 4):
                    jpg = jpg[:100]  # corrupt
                sink.write({"__key__": f"{s:05d}{i:04d}", "jpg": jpg, "txt": f"photo {i % 4} in shard {s}"})
    return str(root / "{00000..00002}.tar")


def test_kill9_on_a_file_pipeline_then_restart_continues_the_same_run(tmp_path, tmp_path_factory, shards):
    cache = W.cache_dir(tmp_path_factory)
    base = ["--checkpoint-every", EVERY, "--source", shards, "--num-workers", 1, "--cache-dir", cache]
    ref = str(tmp_path / "ref")
    r = W.run(W.command(ref, STEPS, *base))
    assert r.returncode == 0, r.stderr[-3000:]

    kill_at = random.Random(5).randint(3, STEPS - 3)
    wd = str(tmp_path / "w")
    cmd = W.command(wd, STEPS, *base)
    W.kill9_at(cmd + ["--sleep-per-step", "0.4"], wd, kill_at, str(tmp_path / "killed"))
    assert max(row["step"] for row in W.metrics(wd)) < STEPS, "the run finished before it could be killed"
    r = W.run(cmd)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(re.findall(r"resumed from \S+ at step (\d+)", r.stderr)) == 1, r.stderr[-3000:]

    want, got = W.losses(ref), W.losses(wd)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == want, {s: (got[s], want[s]) for s in got if got[s] != want[s]}
    a, b = W.flat_params(ref), W.flat_params(wd)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # the corrupt JPEG was met (or not) at the same step in both runs: the bad-data counts agree
    last = {k: v for k, v in W.metrics(ref)[-1].items() if k.startswith("data/")}
    assert last and last == {k: v for k, v in W.metrics(wd)[-1].items() if k.startswith("data/")}
