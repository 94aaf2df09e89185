"""Multi-host training on one machine: 2 processes (`jax.distributed` on localhost, gloo CPU
collectives, one CPU device each) against 1 process with 2 fake CPU devices (mesh data=2).

Both read the same global batches (`ArrayBatches`: each process its own half of every global batch)
and run the same SPMD step, so the per-step losses agree to LOSS_RTOL = 1e-6 relative and the
params to PARAM_ATOL = 1% of the learning rate absolute (Adam's normalisation can amplify a
last-bit difference of a tiny gradient up to ~lr; see test_train_sharding.py). On this CPU they
come out bitwise equal; the tolerances only allow for a different collective reduction order.

The 2-process run is stopped by a SIGTERM to process 0 alone: both processes must agree on the
step, save it together and exit 0 (no deadlock in the next step's collectives or in Orbax's save
barriers). Its checkpoint must then load with `clipjax.load` in this (single) process and resume
training in 1 process (2 devices), continuing the reference's loss curve. After the stop, both
processes write WiSE-FT(init, trained, 0.25) together (`--wise-ft`, a collective save of sharded
params, as experiments/train.py does); it equals the float64 mix of the random init and the
2-process checkpoint to PARAM_ATOL.

Every run also evaluates every 2 steps (`train_worker.py --eval`: `clipjax.train.evaluate.make_eval_fn`
on 13 held-out examples, 7 held by process 0 and 6 by process 1 in the 2-process run, all 13 in one
process otherwise, local batches of 4 with a last partial one). The eval numbers (counts over 13
examples, ranks) must equal the reference's exactly at every step both logged.
"""

import os
import re
import signal

import numpy as np
import pytest

import train_worker as W

STEPS = 8
LOSS_RTOL = 1e-6
WISE_ALPHA = 0.25
PARAM_ATOL = 1e-2 * W.LR


def assert_params_close(got: dict, want: dict, what: str):
    assert got.keys() == want.keys()
    worst = max(float(np.abs(got[k].astype(np.float64) - want[k]).max()) for k in got)
    assert worst <= PARAM_ATOL, f"{what}: max abs param difference {worst:.3g} > {PARAM_ATOL:g}"


@pytest.mark.slow
def test_two_processes_equal_one_and_their_checkpoint_resumes_in_one(tmp_path, tmp_path_factory):
    import portpicker

    cache = W.cache_dir(tmp_path_factory)
    ref, mp = str(tmp_path / "one_process"), str(tmp_path / "two_processes")

    # the reference: 1 process, 2 devices (every step saved so any stop step can be compared),
    # run alongside the 2 processes (its compile overlaps their single-threaded phases)
    reference = W.start(W.command(ref, STEPS, "--mesh-data", 2, "--checkpoint-every", 1, "--keep-checkpoints", 100,
                                  "--cache-dir", cache, "--eval"), str(tmp_path / "reference"))
    # 2 processes, 1 device each; SIGTERM to process 0 only, mid-run
    port = portpicker.pick_unused_port()
    procs = [W.start(W.command(mp, STEPS, "--mesh-data", 2, "--coordinator", f"127.0.0.1:{port}",
                               "--num-processes", 2, "--process-id", i, "--sleep-per-step", 0.3,
                               "--cache-dir", cache, "--eval", "--wise-ft", WISE_ALPHA),
                     str(tmp_path / f"process{i}"))
             for i in (0, 1)]
    try:
        W.wait_for_step(mp, 3, procs, timeout=450)
        procs[0].send_signal(signal.SIGTERM)
        rcs = [p.wait(timeout=180) for p in procs]
        ref_rc = reference.wait(timeout=450)
    finally:
        W.stop(reference, *procs)
    assert ref_rc == 0, W.logs(reference)[1][-3000:]
    want = W.losses(ref)
    assert sorted(want) == list(range(1, STEPS + 1))
    logs = [W.logs(p) for p in procs]
    assert rcs == [0, 0], [err[-3000:] for _, err in logs]
    results = [W.result(out) for out, _ in logs]
    stopped = results[0]["step"]
    assert results == [{"step": stopped, "stopped": "preempted", "process": i} for i in (0, 1)], results
    assert 3 <= stopped < STEPS
    assert W.step_folders(mp)[-1] == stopped

    # only process 0 logs and writes metrics (one row per step) and TensorBoard events (one file)
    assert f"SIGTERM: saving step {stopped} and stopping" in logs[0][1]
    assert "SIGTERM" not in logs[1][1]
    assert len(os.listdir(os.path.join(mp, "tb"))) == 1
    assert os.path.exists(os.path.join(mp, "clipjax.json"))

    got = W.losses(mp)
    assert sorted(got) == list(range(1, stopped + 1))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(got)], rtol=LOSS_RTOL,
                               atol=0, err_msg="2 processes vs 1 process with 2 devices")

    # held-out eval with uneven rows (7 + 6) in 2 processes equals the 1-process eval of all 13
    want_eval = W.evals(ref)
    assert sorted(want_eval) == list(range(W.EVAL_EVERY, STEPS + 1, W.EVAL_EVERY))
    assert all(e["zeroshot_examples"] == e["retrieval_pairs"] == W.EVAL_EXAMPLES for e in want_eval.values())
    assert {"zeroshot_top1", "zeroshot_top5", "image_to_text_R@10", "text_to_image_median_rank"} <= set(want_eval[2])
    got_eval = W.evals(mp)
    assert sorted(got_eval) == [s for s in sorted(want_eval) if s <= stopped]
    assert got_eval == {s: want_eval[s] for s in got_eval}

    # the 2-process checkpoint loads in this process (one device) and equals the reference's at that step
    params = W.flat_params(mp)
    assert_params_close(params, W.flat_params(ref, step=stopped), f"clipjax.load at step {stopped}")

    # both processes wrote WiSE-FT(init, step `stopped`) together (a collective save of sharded params)
    from clipjax.models.clip import init_params

    theta0 = W.flat_state(init_params(W.tiny_config(), seed=0))
    mixed = W.flat_params(os.path.join(mp, "wise_ft"))
    want_mixed = {k: (1 - WISE_ALPHA) * theta0[k].astype(np.float64) + WISE_ALPHA * params[k] for k in params}
    assert_params_close(mixed, want_mixed, f"WiSE-FT (alpha {WISE_ALPHA}) written by 2 processes")

    # and training resumes from it in 1 process (2 devices), continuing the reference's curve
    r = W.run(W.command(mp, STEPS, "--mesh-data", 2, "--cache-dir", cache, "--eval"), timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.findall(r"resumed from \S+ at step (\d+)", r.stderr) == [str(stopped)], r.stderr[-3000:]
    got = W.losses(mp)
    assert sorted(got) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in range(1, STEPS + 1)], [want[s] for s in range(1, STEPS + 1)],
                               rtol=LOSS_RTOL, atol=0, err_msg="resumed in 1 process vs the reference")
    assert_params_close(W.flat_params(mp), W.flat_params(ref), "final params")
    assert W.evals(mp) == want_eval
