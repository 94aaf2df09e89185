"""Fault tolerance of the training loop, with real processes (`tests/train_worker.py`, tiny CLIP, CPU).

One uninterrupted 12-step run (checkpoint every 2 steps; made once per session by
`train_worker.reference_run`) is the reference. Against it, with exact float equality (same
program, same data, CPU execution is deterministic):

* kill -9 at a seeded random step, restart with the same command: every logged loss and the final
  params equal the reference's;
* SIGTERM mid-run: exit 0 after saving the step it stopped at; the resumed run continues the
  reference's loss curve and ends with its params;
* a NaN in one batch: non-zero exit with `NonFiniteError` naming the step and the first non-finite
  tensors; no checkpoint of that step, and the newest checkpoint is all finite;
* a corrupt newest checkpoint (a truncated params data file): reported, moved aside, the previous
  one is used, and the run again ends on the reference (a deleted `train/` data file is tested
  through the library in test_train_loop.py).

Workers share one persistent compilation cache, so only the first run of a program compiles it.
"""

import glob
import os
import random
import re
import shutil
import signal

import numpy as np
import pytest

import train_worker as W

STEPS, EVERY = W.REFERENCE_STEPS, W.REFERENCE_EVERY  # 12, 2


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return W.cache_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run (shared with test_train_loop.py): (workdir, {step: loss}, {name: final param})."""
    wd = W.reference_run(tmp_path_factory)
    losses = W.losses(wd)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert W.step_folders(wd) == [8, 10, 12]  # keep_checkpoints=3
    return wd, losses, W.flat_params(wd)


def assert_same_run(workdir, reference, resumed_at):
    """metrics.jsonl and the final params of `workdir` equal the reference's, exactly."""
    _, want_losses, want_params = reference
    got = W.losses(workdir)
    assert sorted(got) == list(range(1, STEPS + 1)), sorted(got)
    diff = {s: (got[s], want_losses[s]) for s in got if got[s] != want_losses[s]}
    assert not diff, f"losses differ from the uninterrupted run (resumed at step {resumed_at}): {diff}"
    params = W.flat_params(workdir)
    assert params.keys() == want_params.keys()
    bad = [k for k in params if not np.array_equal(params[k], want_params[k])]
    assert not bad, f"final params differ from the uninterrupted run: {bad[:5]}"


def resumed_step(stderr: str) -> int:
    m = re.findall(r"resumed from \S+ at step (\d+)", stderr)
    assert len(m) == 1, f"expected one 'resumed from' line:\n{stderr[-3000:]}"
    return int(m[0])


@pytest.mark.slow
def test_kill9_then_restart_continues_the_same_run(tmp_path, reference, cache):
    kill_at = random.Random(20240611).randint(4, STEPS - 3)
    wd = str(tmp_path / "w")
    cmd = W.command(wd, STEPS, "--checkpoint-every", EVERY, "--sleep-per-step", 0.25, "--cache-dir", cache)
    W.kill9_at(cmd, wd, kill_at, str(tmp_path / "killed"))
    logged = max(r["step"] for r in W.metrics(wd))  # a step is logged before it is saved
    assert logged < STEPS, "the run finished before it could be killed"

    r = W.run(cmd)  # the same command
    assert r.returncode == 0, r.stderr[-3000:]
    start = resumed_step(r.stderr)
    assert 0 < start <= logged and start % EVERY == 0, (start, logged)
    assert W.result(r.stdout)["stopped"] == "done"
    assert_same_run(wd, reference, start)


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_resumes(tmp_path, reference, cache):
    term_at = random.Random(7).randint(3, STEPS - 4)
    wd = str(tmp_path / "w")
    cmd = W.command(wd, STEPS, "--checkpoint-every", EVERY, "--cache-dir", cache)
    proc = W.start(cmd + ["--sleep-per-step", "0.25"], str(tmp_path / "terminated"))
    try:
        W.wait_for_step(wd, term_at, [proc])
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
    finally:
        W.stop(proc)
    out, err = W.logs(proc)
    assert rc == 0, err[-3000:]
    res = W.result(out)
    stopped_at = res["step"]
    assert res["stopped"] == "preempted" and term_at <= stopped_at < STEPS, res
    assert f"SIGTERM: saving step {stopped_at} and stopping" in err
    assert W.step_folders(wd)[-1] == stopped_at  # saved the step it stopped on (odd or even)
    assert max(W.losses(wd)) == stopped_at

    r = W.run(cmd)
    assert r.returncode == 0, r.stderr[-3000:]
    assert resumed_step(r.stderr) == stopped_at
    assert_same_run(wd, reference, stopped_at)


NAN_AT = 3  # global batch 3 is read by the 4th update: "step 4" (metrics and checkpoints count updates)


def test_nonfinite_loss_stops_without_saving_it(tmp_path, reference, cache):
    wd = str(tmp_path / "w")
    r = W.run(W.command(wd, STEPS, "--checkpoint-every", EVERY, "--nan-at", NAN_AT, "--cache-dir", cache))
    assert r.returncode != 0
    err = r.stderr
    assert "NonFiniteError: step 4:" in err, err[-3000:]
    msg = err[err.index("NonFiniteError: step 4:"):]
    # the first non-finite tensors of the forward pass are named, then the gradients
    assert "non-finite values: ['pixels', 'image_embeddings'" in msg, msg[:1000]
    assert "non-finite gradients" in msg
    assert W.step_folders(wd) == [2]  # no checkpoint of step 4 (nor of any later step)
    # the steps before the NaN are the reference's
    assert W.losses(wd) == {s: reference[1][s] for s in range(1, NAN_AT + 1)}
    params = W.flat_params(wd)  # clipjax.load of the newest checkpoint (step 2)
    assert params and all(np.isfinite(v).all() for v in params.values())


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, reference, cache):
    wd = str(tmp_path / "w")
    shutil.copytree(reference[0], wd)
    files = glob.glob(os.path.join(wd, "checkpoints", str(STEPS), "params", "ocdbt.process_0", "d", "*"))
    victim = max(files, key=os.path.getsize)
    os.truncate(victim, os.path.getsize(victim) // 2)  # a data file cut short (a disk that filled up)

    r = W.run(W.command(wd, STEPS, "--checkpoint-every", EVERY, "--cache-dir", cache))
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(rf"checkpoint at step {STEPS} in \S+ cannot be restored \(ValueError: \w+: Error reading",
                     r.stderr), r.stderr[-3000:]
    assert f"moved the unreadable checkpoint {os.path.join(wd, 'checkpoints', str(STEPS))}" in r.stderr
    assert resumed_step(r.stderr) == STEPS - EVERY
    assert os.path.isdir(os.path.join(wd, "checkpoints", f"{STEPS}.unreadable"))
    assert W.step_folders(wd) == [8, 10, 12]  # 12 written again by the resumed run
    assert_same_run(wd, reference, STEPS - EVERY)
