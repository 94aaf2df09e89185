"""Train a tiny CLIP on fixed synthetic arrays with `clipjax.train.loop.train` (a subprocess for the
fault-tolerance and multi-host tests; not a test module itself).

    python tests/train_worker.py --workdir W --steps N [--checkpoint-every C] [--keep-checkpoints K] [--nan-at K]
        [--sleep-per-step S] [--mesh-data D] [--cache-dir DIR]
        [--coordinator 127.0.0.1:PORT --num-processes 2 --process-id I] [--eval] [--wise-ft ALPHA]

* Data: 32 examples of float32 (already preprocessed) 32x32 images and int32 token ids from a fixed
  seed, read by `clipjax.data.ArrayBatches` (global batch 8; each process reads its own slice).
* `--nan-at K`: global batch K (the one step K reads, 0-based) gets one NaN pixel, so step K's loss
  is not finite; every other batch is unchanged, so the losses before K are the reference's.
* `--sleep-per-step S`: sleep S seconds per batch read (gives a test time to signal mid-run).
* `--mesh-data D` without a coordinator: D fake CPU devices in this process, mesh data=D; with a
  coordinator: one CPU device per process, gloo collectives, mesh data over all processes.
* `--eval`: every 2 steps, `clipjax.train.evaluate.make_eval_fn` on 13 held-out examples (uint8 images,
  captions, labels of 6 classes) split unevenly over the processes (7 and 6 with 2 processes), read in
  local batches of 4: zero-shot and retrieval numbers over all 13, whatever the process count.
* `--wise-ft ALPHA`: when `train` returns (done or preempted), every process writes
  `clipjax.train.wise_ft(theta_0, theta_1, ALPHA)` of the random init (`init_params(seed)`, sharded on
  the mesh) and the trained model state to `WORKDIR/wise_ft` with `clipjax.checkpoint.save` (collective),
  as experiments/train.py does after a fine-tuning run.
* `--cache-dir`: JAX's persistent compilation cache (runs of the same program load the compiled
  step instead of compiling it again; the executable is the same, so are the numbers).

Prints one JSON line `{"step", "stopped", "process"}` on stdout when `train` returns; exceptions
(e.g. `NonFiniteError`) propagate, so the exit status is non-zero.

CPU-only and compiled with LLVM's cheap optimisation level (`FAST_XLA_FLAGS`): that halves the
compile time of the tiny model; every run of these tests uses the same flags, so comparisons
hold. `torch` is blocked from import: tensorboardX imports it only to recognise torch tensors, and
that import costs seconds per process.
"""

import argparse
import json
import os
import sys
import time

FAST_XLA_FLAGS = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")
NUM_EXAMPLES, BATCH, IMAGE, CONTEXT, VOCAB = 32, 8, 32, 8, 100


def tiny_config():
    """ViT-B-32 shrunk: embed 16, image 32 / patch 16, width 32, 2 layers, 2 heads, mlp 64; text the same."""
    import dataclasses

    import clipjax

    cfg = clipjax.get_config("ViT-B-32")
    return cfg.replace(embed_dim=16,
                       vision=dataclasses.replace(cfg.vision, image_size=IMAGE, patch_size=16, width=32, layers=2,
                                                  heads=2, mlp_dim=64),
                       text=dataclasses.replace(cfg.text, width=32, heads=2, layers=2, mlp_dim=64,
                                                context_length=CONTEXT, vocab_size=VOCAB))


LR = 1e-3


def train_config(steps: int, checkpoint_every: int = 2, keep: int = 3, eval_every: int = 0):
    from clipjax.train.config import TrainConfig

    return TrainConfig(batch_size=BATCH, total_steps=steps, warmup_steps=2, lr=LR, log_every=1,
                       checkpoint_every=checkpoint_every, ema_decay=0.9, grad_clip_norm=1.0, keep_checkpoints=keep,
                       eval_every=eval_every)


EVAL_EXAMPLES, EVAL_LOCAL_BATCH, EVAL_EVERY = 13, 4, 2
EVAL_CLASSES, EVAL_TEMPLATES = ("zero", "one", "two", "three", "four", "five"), ("a {c}", "the {c} thing")


class WordTokenizer:
    """Toy tokenizer for the tiny vocabulary: start id VOCAB - 2, one id per word (crc32), end id VOCAB - 1
    (the largest: the text tower's argmax pooling finds it), zero padding to CONTEXT."""

    def __call__(self, texts):
        import zlib

        import numpy as np

        out = np.zeros((len(texts), CONTEXT), np.int32)
        for i, t in enumerate(texts):
            ids = [VOCAB - 2] + [1 + zlib.crc32(w.encode()) % (VOCAB - 3) for w in t.split()][:CONTEXT - 2]
            out[i, :len(ids) + 1] = ids + [VOCAB - 1]
        return out


def eval_fn(model, mesh):
    """Held-out eval over `EVAL_EXAMPLES` examples; this process reads its `np.array_split` share."""
    import jax
    import numpy as np

    from clipjax.train.evaluate import ZeroShotSet, make_eval_fn

    rng = np.random.default_rng(1)
    tok = WordTokenizer()
    labels = rng.integers(0, len(EVAL_CLASSES), EVAL_EXAMPLES).astype(np.int32)
    rows = {"image": rng.integers(0, 256, (EVAL_EXAMPLES, IMAGE, IMAGE, 3), dtype=np.uint8), "label": labels,
            "text": tok([f"{EVAL_CLASSES[y]} number {i}" for i, y in enumerate(labels)])}
    mine = np.array_split(np.arange(EVAL_EXAMPLES), jax.process_count())[jax.process_index()]

    def batches():
        for s in range(0, len(mine), EVAL_LOCAL_BATCH):
            yield {k: v[mine[s:s + EVAL_LOCAL_BATCH]] for k, v in rows.items()}

    return make_eval_fn(model, zeroshot=ZeroShotSet(batches, EVAL_CLASSES, EVAL_TEMPLATES), retrieval=batches,
                        tokenizer=tok, mesh=mesh)


def arrays():
    import numpy as np

    rng = np.random.default_rng(0)
    return {"image": rng.standard_normal((NUM_EXAMPLES, IMAGE, IMAGE, 3)).astype(np.float32),
            "text": rng.integers(1, VOCAB - 1, (NUM_EXAMPLES, CONTEXT)).astype(np.int32)}


class Hooked:
    """`ArrayBatches` plus the test hooks: a NaN pixel in global batch `nan_at`, a sleep per batch."""

    def __init__(self, inner, nan_at=None, sleep=0.0):
        self.inner, self.nan_at, self.sleep = inner, nan_at, sleep

    def __iter__(self):
        return self

    def __next__(self):
        k = self.inner.get_state()["next_batch"]
        batch = next(self.inner)
        if self.sleep:
            time.sleep(self.sleep)
        if k == self.nan_at:
            batch = dict(batch, image=batch["image"].copy())
            batch["image"][0, 0, 0, 0] = float("nan")
        return batch

    @property
    def epoch(self):
        return self.inner.epoch

    @property
    def state_is_global(self):  # ArrayBatches' state: resumable with another process count
        return self.inner.state_is_global

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)


class Slow:
    """A `clipjax.data` pipeline with a sleep per batch (so a test can kill the run mid-way)."""

    def __init__(self, inner, sleep=0.0):
        self.inner, self.sleep = inner, sleep

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.inner)
        if self.sleep:
            time.sleep(self.sleep)
        return batch

    def __getattr__(self, name):  # get_state, set_state, bad_counts, epoch, close
        return getattr(self.inner, name)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--checkpoint-every", type=int, default=2)
    p.add_argument("--keep-checkpoints", type=int, default=3)
    p.add_argument("--nan-at", type=int, default=None)
    p.add_argument("--sleep-per-step", type=float, default=0.0)
    p.add_argument("--mesh-data", type=int, default=1)
    p.add_argument("--coordinator", default=None)
    p.add_argument("--num-processes", type=int, default=1)
    p.add_argument("--process-id", type=int, default=0)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--source", default=None, help="a clipjax.data source (tar shards, table) instead of arrays")
    p.add_argument("--num-workers", type=int, default=0, help="grain decode workers for --source")
    p.add_argument("--eval", action="store_true", help="held-out eval every 2 steps (see the module docstring)")
    p.add_argument("--wise-ft", type=float, default=None, help="write WiSE-FT(init, trained, ALPHA) to WORKDIR/wise_ft")
    return p.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    devices = 1 if args.coordinator else args.mesh_data
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    flags += list(FAST_XLA_FLAGS) + [f"--xla_force_host_platform_device_count={devices}"]
    os.environ["XLA_FLAGS"] = " ".join(flags)
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.modules["torch"] = None  # see the module docstring

    import jax

    if args.cache_dir:
        jax.config.update("jax_compilation_cache_dir", args.cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    if args.coordinator:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id, initialization_timeout=120)

    from clipjax.data import ArrayBatches
    from clipjax.sharding import make_mesh
    from clipjax.train.loop import train

    mesh = make_mesh(data=args.mesh_data) if args.coordinator or args.mesh_data > 1 else None
    model = tiny_config()
    if args.source:  # real files through clipjax.data: OpenAI BPE ids need the full vocabulary
        import dataclasses

        from clipjax.data import DataConfig, make_batches
        from clipjax.tokenizer import Tokenizer

        model = model.replace(text=dataclasses.replace(model.text, vocab_size=49408))
        data = Slow(make_batches(DataConfig(source=args.source, num_workers=args.num_workers, shuffle_buffer=16),
                                 image_size=IMAGE, tokenizer=Tokenizer.openai(context_length=CONTEXT),
                                 batch_size=BATCH, seed=0), args.sleep_per_step)
    else:
        data = Hooked(ArrayBatches(arrays(), BATCH, seed=0), nan_at=args.nan_at, sleep=args.sleep_per_step)
    cfg = train_config(args.steps, args.checkpoint_every, args.keep_checkpoints, EVAL_EVERY if args.eval else 0)
    try:
        result = train(model, cfg, args.workdir, data, mesh=mesh, progress=False,
                       eval_fn=eval_fn(model, mesh) if args.eval else None)
    finally:
        if hasattr(data, "close"):
            data.close()
    if args.wise_ft is not None:
        from clipjax.checkpoint import save
        from clipjax.models.clip import init_params
        from clipjax.train import wise_ft

        theta = wise_ft(init_params(model, seed=cfg.seed, mesh=mesh), result.state.model_state, args.wise_ft)
        save(os.path.join(args.workdir, "wise_ft"), model, theta, overwrite=True)
    print(json.dumps({"step": result.step, "stopped": result.stopped, "process": jax.process_index()}), flush=True)
    if args.coordinator:
        jax.distributed.shutdown()


# ---- helpers for the tests that run this script (stdlib only at import) ----

WORKER = os.path.abspath(__file__)


def command(workdir, steps, *extra) -> list[str]:
    return [sys.executable, WORKER, "--workdir", str(workdir), "--steps", str(steps), *map(str, extra)]


def cache_dir(tmp_path_factory) -> str:
    """One persistent compilation cache for every worker of the test session."""
    path = tmp_path_factory.getbasetemp() / "xla-cache"
    path.mkdir(exist_ok=True)
    return str(path)


REFERENCE_STEPS, REFERENCE_EVERY = 12, 2


def reference_run(tmp_path_factory) -> str:
    """The workdir of one uninterrupted run (12 steps, checkpoint every 2), made once per test session
    and shared by test modules: callers only read it (copy it to change anything)."""
    root = tmp_path_factory.getbasetemp() / "reference-run"
    wd, done = root / "w", root / "done"
    if not done.exists():
        import shutil

        shutil.rmtree(root, ignore_errors=True)
        root.mkdir()
        r = run(command(wd, REFERENCE_STEPS, "--checkpoint-every", REFERENCE_EVERY, "--cache-dir",
                        cache_dir(tmp_path_factory)))
        assert r.returncode == 0, r.stderr[-3000:]
        assert result(r.stdout) == {"step": REFERENCE_STEPS, "stopped": "done", "process": 0}
        done.write_text(r.stderr)
    return str(wd)


def run(cmd, timeout=300):
    """Run to completion; stdout/stderr captured as text."""
    import subprocess

    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def start(cmd, log_prefix):
    """Start in the background, stdout/stderr to `log_prefix.out` / `.err` (no pipe to fill up)."""
    import subprocess

    out, err = open(f"{log_prefix}.out", "w"), open(f"{log_prefix}.err", "w")
    proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
    proc.logs = (f"{log_prefix}.out", f"{log_prefix}.err")
    return proc


def logs(proc) -> tuple[str, str]:
    return tuple(open(p).read() for p in proc.logs)


def metrics(workdir) -> list[dict]:
    """Complete rows of `workdir/metrics.jsonl` ([] while there is none)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written
                pass
    return rows


def losses(workdir) -> dict[int, float]:
    """step -> loss; asserts one row per step (eval rows are separate lines)."""
    rows = [r for r in metrics(workdir) if "loss" in r]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"{workdir}/metrics.jsonl repeats steps: {steps}"
    return {r["step"]: r["loss"] for r in rows}


def evals(workdir) -> dict[int, dict]:
    """step -> {eval metric: value}; asserts one eval row per step."""
    rows = [r for r in metrics(workdir) if any(k.startswith("eval/") for k in r)]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"{workdir}/metrics.jsonl repeats eval steps: {steps}"
    return {r["step"]: {k[5:]: v for k, v in r.items() if k.startswith("eval/")} for r in rows}


def wait_for_step(workdir, step, procs, timeout=300) -> int:
    """Block until metrics.jsonl logs a step >= `step` (returns it); fail if a process exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = metrics(workdir)
        if rows and rows[-1]["step"] >= step:
            return rows[-1]["step"]
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"worker exited with {p.returncode} before step {step}:\n{logs(p)[1][-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"no step >= {step} in {workdir}/metrics.jsonl after {timeout} s")


def kill9_at(cmd, workdir, step, log_prefix) -> None:
    """Start `cmd`, SIGKILL it once `workdir` has logged `step`, and wait until it is gone."""
    import signal

    proc = start(cmd, log_prefix)
    try:
        wait_for_step(workdir, step, [proc])
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        stop(proc)


def stop(*procs) -> None:
    """Kill workers still running (test clean-up)."""
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def result(stdout: str) -> dict:
    """The worker's closing JSON line."""
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert lines, f"no result line in the worker's stdout:\n{stdout[-2000:]}"
    return json.loads(lines[-1])


def step_folders(workdir) -> list[int]:
    root = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(root) if n.isdigit()) if os.path.isdir(root) else []


def flat_params(workdir, step=None) -> dict:
    """`clipjax.load(workdir)` params (the newest checkpoint, or `step`'s) as {path: numpy array}."""
    import shutil
    import tempfile

    import clipjax

    if step is not None:  # a workdir that holds only that step
        with tempfile.TemporaryDirectory() as view:
            shutil.copy(os.path.join(workdir, "clipjax.json"), view)
            name = os.path.join("checkpoints", str(step))
            shutil.copytree(os.path.join(workdir, name), os.path.join(view, name))
            return flat_params(view)
    return flat_state(clipjax.load(workdir).params)


def flat_state(state) -> dict:
    """A model state (`nnx.State`) as {path: numpy array}, the keys of `flat_params`."""
    import jax
    import numpy as np

    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in
            jax.tree_util.tree_flatten_with_path(state.to_pure_dict())[0]}


if __name__ == "__main__":
    main()
