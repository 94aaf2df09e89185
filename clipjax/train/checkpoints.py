"""Training checkpoints: an Orbax `CheckpointManager` over `WORKDIR/checkpoints/STEP/`.

Each step folder holds four items:
  params/   the full model state (Params and BatchNorm statistics) in the same layout as a
            converted checkpoint's `params/`, so `clipjax.load(WORKDIR)` reads the latest one;
  train/    step, RNG key, optimizer state (as its flattened leaves) and the EMA params;
  data/     the data iterators' states (JSON; `gather_data_states`): every process's, so each
            process resumes its own reader, and iterators whose state is global (the same on
            every process, `state_is_global = True`, e.g. `clipjax.data.ArrayBatches`) resume with
            any process count;
  meta/     the model and train configs (JSON).
`WORKDIR/clipjax.json` names the model's architecture, as in a converted checkpoint folder.

Saves are asynchronous and atomic (Orbax writes a temporary folder and renames it when the save
is complete), so a run killed mid-save leaves the previous checkpoints intact. Restore walks
from the newest step down and reports every checkpoint it cannot read.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from clipjax.checkpoint import FORMAT, VERSION, rekey_like, string_keys
from clipjax.config import CLIPConfig
from clipjax.train.state import TrainState

ITEMS = ("params", "train", "data", "meta")


class WorkdirError(ValueError):
    """The workdir holds something this run cannot continue from."""


def check_workdir(workdir: str, model_config: CLIPConfig) -> None:
    """Refuse a workdir that holds another model: compares architectures, before anything is written."""
    meta = os.path.join(workdir, "clipjax.json")
    if not os.path.exists(meta):
        # an empty checkpoints/ is what a run refused or killed before its first save leaves behind
        ours = [n for n in ("checkpoints", "params", "metrics.jsonl") if os.path.exists(os.path.join(workdir, n))
                and not (os.path.isdir(os.path.join(workdir, n)) and not os.listdir(os.path.join(workdir, n)))]
        if ours:
            raise WorkdirError(f"{workdir} holds {ours} but no clipjax.json: not a clipjax training workdir; "
                               "use a new --workdir")
        return
    with open(meta) as f:
        d = json.load(f)
    if d.get("format") != FORMAT:
        raise WorkdirError(f"{meta}: format {d.get('format')!r} is not {FORMAT!r}")
    stored = CLIPConfig.from_dict(d["config"]).architecture()
    want = model_config.architecture()
    if stored != want:
        diff = {k: (v, want.to_dict()[k]) for k, v in stored.to_dict().items() if want.to_dict()[k] != v}
        raise WorkdirError(f"{workdir} holds a checkpoint of another architecture; differing fields "
                           f"(stored, requested): {diff}. Use a new --workdir.")


def write_model_meta(workdir: str, model_config: CLIPConfig, train_config: dict) -> None:
    """`WORKDIR/clipjax.json` (process 0; atomic rename)."""
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "clipjax.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"format": FORMAT, "version": VERSION, "config": model_config.architecture_dict(),
                   "source": {"kind": "train", "train_config": train_config}}, f, indent=2)
    os.replace(tmp, path)


def gather_data_states(iterator) -> dict:
    """Every process's `iterator.get_state()` as one JSON-able dict (saved by process 0).

    grain's own Orbax handler writes one file per process and cannot restore into another
    process count; gathering the (small, host-side) states lets a global-state iterator resume
    with any count and lets a mismatch be named instead of failing on a missing file.
    """
    state = json.dumps(iterator.get_state())
    states = [state]
    if jax.process_count() > 1:
        import numpy as np
        from jax.experimental import multihost_utils

        raw = np.frombuffer(state.encode("utf-8"), np.uint8)
        sizes = multihost_utils.process_allgather(np.asarray([raw.size], np.int64)).reshape(-1)
        padded = np.zeros(int(sizes.max()), np.uint8)
        padded[:raw.size] = raw
        every = multihost_utils.process_allgather(padded).reshape(len(sizes), -1)
        states = [bytes(row[:n]).decode("utf-8") for row, n in zip(every, sizes)]
    return {"process_count": jax.process_count(), "global": bool(getattr(iterator, "state_is_global", False)),
            "states": [json.loads(s) for s in states]}


def local_data_state(saved: dict) -> dict:
    """This process's iterator state from a `gather_data_states` dict (or an older single-state checkpoint)."""
    if "states" not in saved:  # written before per-process states: ArrayBatches' global state
        return saved
    n, count = saved["process_count"], jax.process_count()
    if n == count:
        return saved["states"][jax.process_index()]
    if saved["global"]:
        return saved["states"][0]
    raise WorkdirError(f"the data iterators' states were saved by {n} processes and this run has {count}: "
                       f"a pipeline whose position is per process resumes only with {n} processes")


def _opt_leaves(opt_state) -> dict:
    """Optimizer-state leaves keyed by their path (`1.mu.visual.proj.value`): a restore into a state
    of another structure fails by name instead of filling leaves by position."""
    return {jax.tree_util.keystr(path, simple=True, separator="."): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]}


class Checkpointer:
    """Save and restore `TrainState`s plus data-iterator state under `WORKDIR/checkpoints`."""

    def __init__(self, workdir: str, *, keep: int = 3, keep_every: int | None = None, async_save: bool = True):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, keep_period=keep_every,
                                               enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def save(self, state: TrainState, data_state: dict, meta: dict) -> None:
        """`data_state`: `gather_data_states(iterator)` (called on every process at the same step)."""
        step = int(jax.device_get(state.step))
        model_state = nnx.merge_state(state.params, state.batch_stats)
        train = {"step": state.step, "rng": state.rng, "opt": _opt_leaves(state.opt_state)}
        if state.ema is not None:
            train["ema"] = string_keys(state.ema.to_pure_dict())
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(string_keys(model_state.to_pure_dict())),
            train=ocp.args.StandardSave(train),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta)), force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore(self, abstract: TrainState, shardings: Any = None, log=print) -> tuple[TrainState, dict] | None:
        """The newest readable checkpoint as `(state, data_state)`, or None when there is none.

        `abstract` is the `jax.eval_shape` of the state (and `shardings` its placement on a mesh).
        A checkpoint that cannot be read is reported through `log` and the previous one is tried.
        Once one is restored, the unreadable newer ones are moved aside to `STEP.unreadable` (kept
        for inspection, never deleted): the resumed run saves those steps again, and
        `clipjax.load(WORKDIR)` reads the newest step folder.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        bad = []
        for step in steps:
            try:
                got = self._restore_step(step, abstract, shardings)
            except WorkdirError:  # readable, but not resumable by this run (another process count): say so
                raise
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back to the previous one
                bad.append(step)
                log(f"checkpoint at step {step} in {self.directory} cannot be restored "
                    f"({_root_cause(e)}); trying the previous one")
                continue
            if bad:
                self._move_aside(bad, log)
            return got
        if steps:
            raise WorkdirError(f"no checkpoint in {self.directory} could be restored (steps {steps})")
        return None

    def _move_aside(self, steps: list[int], log) -> None:
        """Rename unreadable step folders to `STEP.unreadable[-N]` (process 0), then re-list the steps."""
        if jax.process_index() == 0:
            for step in steps:
                src = os.path.join(self.directory, str(step))
                dst, n = f"{src}.unreadable", 1
                while os.path.exists(dst):
                    dst, n = f"{src}.unreadable-{n}", n + 1
                os.replace(src, dst)
                log(f"moved the unreadable checkpoint {src} to {dst}")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("clipjax.train.checkpoints.move_aside")
        self.manager.reload()

    def _restore_step(self, step: int, abstract: TrainState, shardings: Any) -> tuple[TrainState, dict]:
        def target(tree, sh):
            if sh is None:
                dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
                return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev), tree)
            return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, sh)

        def pure(tree):
            return tree.to_pure_dict() if isinstance(tree, nnx.State) else tree

        sh = shardings
        model_abs = nnx.merge_state(abstract.params, abstract.batch_stats)
        model_sh = None if sh is None else nnx.merge_state(sh.params, sh.batch_stats)
        params_t = target(pure(model_abs), None if sh is None else pure(model_sh))
        opt_abs = _opt_leaves(abstract.opt_state)
        train_t = {"step": abstract.step, "rng": abstract.rng,
                   "opt": opt_abs}
        train_sh = None
        if sh is not None:
            train_sh = {"step": sh.step, "rng": sh.rng, "opt": _opt_leaves(sh.opt_state)}
        if abstract.ema is not None:
            train_t["ema"] = pure(abstract.ema)
            if sh is not None:
                train_sh["ema"] = pure(sh.ema)
        train_t = target(train_t, train_sh)
        got = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(string_keys(params_t)),
            train=ocp.args.StandardRestore(string_keys(train_t)),
            data=ocp.args.JsonRestore()))
        model_state = jax.tree.map(lambda a: a, model_abs)
        nnx.replace_by_pure_dict(model_state, rekey_like(got["params"], pure(model_abs)))
        params, stats = nnx.split_state(model_state, nnx.Param, nnx.BatchStat)
        tr = got["train"]
        opt_state = jax.tree.unflatten(jax.tree.structure(abstract.opt_state),
                                       [tr["opt"][name] for name in opt_abs])
        ema = None
        if abstract.ema is not None:
            ema = jax.tree.map(lambda a: a, abstract.ema)
            nnx.replace_by_pure_dict(ema, rekey_like(tr["ema"], pure(abstract.ema)))
        state = TrainState(step=tr["step"], params=params, batch_stats=stats, opt_state=opt_state, ema=ema,
                           rng=tr["rng"])
        return state, local_data_state(got["data"])


def _root_cause(e: BaseException, limit: int = 400) -> str:
    """`Type: message` of the innermost cause (Orbax wraps TensorStore's precise error in a long one)."""
    seen = {id(e)}
    while e.__cause__ is not None and id(e.__cause__) not in seen:
        e = e.__cause__
        seen.add(id(e))
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:limit]}{'...' if len(msg) > limit else ''}"


def log_stderr(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, file=sys.stderr, flush=True)
