"""The training loop: resume, step, log, evaluate, checkpoint, stop cleanly.

`train(model_config, train_config, workdir, data)` runs `train_config.total_steps` updates of
the jitted step (`clipjax.train.step`) on batches from `data` (an iterator with `get_state` /
`set_state`, each `next()` giving this process's slice of the global batch), and

* resumes from the newest readable checkpoint in `WORKDIR/checkpoints` (params, optimizer state,
  EMA, RNG, step and the iterator's position), so a killed run continues with the losses an
  uninterrupted run would have had;
* writes `WORKDIR/metrics.jsonl` and TensorBoard events every `log_every` steps: loss, lr, logit
  scale, samples/s, MFU, data-wait fraction, gradient norm, and eval metrics when they run;
* saves every `checkpoint_every` steps and at the end, and on SIGTERM saves the step it is at and
  returns `stopped="preempted"` (the signal is noted by a handler installed for the run; the loop
  checks it before each step);
* stops on a non-finite loss or gradient with `NonFiniteError` naming the step and the first
  non-finite tensors; the step that produced them changed nothing, so no NaN is ever saved.

The first batch is checked against the model (keys, shapes, dtypes) before the state is created
or anything is written, and a workdir holding another architecture is refused before that.

Multi-host: every process runs this with its own data slice; global batches are assembled with
`jax.make_array_from_process_local_data`, nothing sharded is gathered to a host, and only
process 0 writes logs and metadata (Orbax coordinates the checkpoint writes; every process calls
save). SIGTERM may reach one process only or all at different times: before each step the
processes OR their flags with a one-scalar all-gather, so all of them stop at the same step and
save it together instead of leaving the others blocked in the next step's collectives. Only the
data-iterator states of all processes are gathered into the checkpoint (`checkpoints.gather_data_states`):
each process resumes its own reader; iterators whose state is global (`clipjax.data.ArrayBatches`)
also resume with another process count.
"""

from __future__ import annotations

import contextlib
import signal
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from clipjax import checks
from clipjax.config import CLIPConfig, ConfigError
from clipjax.models import clip as F
from clipjax.sharding import logical_to_spec, make_mesh
from clipjax.train import checkpoints as C
from clipjax.train.adversarial import NEEDS_LABELS, NEEDS_REFERENCE
from clipjax.train.config import ADVERSARIAL_LOSSES, TrainConfig
from clipjax.train.observe import MetricsWriter, compiled_flops, peak_flops
from clipjax.train.optim import make_optimizer
from clipjax.train.state import TrainState, mesh_context, state_factory, state_shardings
from clipjax.train.step import check_compatible, make_train_step, normalize_images


class NonFiniteError(FloatingPointError):
    """A step produced a non-finite loss or gradient; the message names the step and tensors."""


@dataclass
class TrainResult:
    state: TrainState
    step: int
    stopped: str  # "done" or "preempted"
    train_seconds: float
    samples_per_sec: float
    metrics: dict


def check_batch(batch: dict, model_config: CLIPConfig, local_batch: int, loss: str = "clip",
                num_classes: int | None = None) -> None:
    """Refuse a batch that does not fit the model, naming the key, what came and what was expected."""
    if loss == "longclip" and "short_text" not in batch:
        raise ValueError("loss='longclip' needs batch key 'short_text' [b, <= L] int32 (the short captions)")
    missing = {"image", "text"} - set(batch)
    if missing:
        raise ValueError(f"batch is missing {sorted(missing)}; expected keys 'image' [b, H, W, 3] and 'text' [b, L]")
    img, txt = np.asarray(batch["image"]), np.asarray(batch["text"])
    s = model_config.vision.image_size
    if img.ndim != 4 or img.shape[0] != local_batch or img.shape[-1] != 3 or img.shape[1:3] != (s, s):
        raise ValueError(f"batch 'image' has shape {img.shape}; expected [{local_batch}, {s}, {s}, 3] "
                         "(per-process batch, model image size, RGB)")
    if img.dtype not in (np.uint8, np.float32):
        raise ValueError(f"batch 'image' has dtype {img.dtype}; expected uint8 (0..255) or float32 (preprocessed)")
    L = model_config.text.context_length
    if txt.ndim != 2 or txt.shape[0] != local_batch or txt.shape[1] > L:
        raise ValueError(f"batch 'text' has shape {txt.shape}; expected [{local_batch}, <= {L}] token ids")
    if txt.dtype != np.int32:
        raise ValueError(f"batch 'text' has dtype {txt.dtype}; expected int32 token ids")
    if loss in ADVERSARIAL_LOSSES and img.dtype != np.uint8:
        raise ValueError(f"loss={loss!r} attacks pixels in [0, 1]: batch 'image' must be uint8 (0..255), got "
                         f"{img.dtype} (preprocessed images cannot be attacked in pixel space)")
    if loss in NEEDS_LABELS:
        if "label" not in batch:
            raise ValueError(f"loss={loss!r} needs batch key 'label' [b] int32 (class indices)")
        lab = np.asarray(batch["label"])
        if lab.shape != (local_batch,) or lab.dtype != np.int32:
            raise ValueError(f"batch 'label' has shape {lab.shape} and dtype {lab.dtype}; expected int32 "
                             f"[{local_batch}]")
        if num_classes is not None and (lab.min() < 0 or lab.max() >= num_classes):
            raise ValueError(f"batch 'label' holds values in [{lab.min()}, {lab.max()}]; expected [0, {num_classes}) "
                             "(the rows of class_weights)")
    if loss == "longclip":
        short = np.asarray(batch["short_text"])
        if short.ndim != 2 or short.shape[0] != local_batch or short.shape[1] > txt.shape[1] or short.dtype != np.int32:
            raise ValueError(f"batch 'short_text' has shape {short.shape} and dtype {short.dtype}; expected int32 "
                             f"[{local_batch}, <= {txt.shape[1]}] token ids")


# batch keys the step reads; others (e.g. `__key__`) stay on the host
MODEL_KEYS = ("image", "text", "short_text", "label")


def global_batch(local: dict, mesh: Mesh | None) -> dict:
    """This process's rows -> global arrays sharded over the batch axes (no host gather)."""
    local = {k: v for k, v in local.items() if k in MODEL_KEYS}
    if mesh is None:
        return {k: jnp.asarray(v) for k, v in local.items()}
    out = {}
    for k, v in local.items():
        spec = logical_to_spec(("batch",) + (None,) * (np.ndim(v) - 1), mesh=mesh)
        out[k] = jax.make_array_from_process_local_data(NamedSharding(mesh, spec), np.asarray(v))
    return out


def nonfinite_report(state: TrainState, batch: dict, model_config: CLIPConfig, cfg: TrainConfig, mesh) -> str:
    """Which tensors of a failing step are not finite: embeddings, scale, loss, then gradients by name."""
    from clipjax.train.step import contrastive_loss

    # distill and the adversarial losses need frozen inputs: the probe's loss is the CLIP loss of the clean batch
    probe_cfg = cfg if cfg.loss in ("clip", "siglip", "cloob", "longclip") else cfg.replace(loss="clip")

    def probe(params, stats, b):
        def loss_fn(p):
            out = F.forward(F.merge_state(p, stats), normalize_images(b["image"], model_config), b["text"],
                            config=model_config, train=True)
            return contrastive_loss(out, probe_cfg, mesh), out

        (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        fin = lambda x: jnp.all(jnp.isfinite(x))  # noqa: E731
        return ({"pixels": fin(normalize_images(b["image"], model_config)), "image_embeddings": fin(out["image"]),
                 "text_embeddings": fin(out["text"]), "logit_scale": fin(out["logit_scale"]), "loss": fin(loss)},
                jax.tree.map(fin, grads))

    with mesh_context(mesh):
        acts, grads = jax.jit(probe)(state.params, state.batch_stats, batch)
    order = ("pixels", "image_embeddings", "text_embeddings", "logit_scale", "loss")  # data-flow order
    bad = [k for k in order if not bool(acts[k])]
    names = [".".join(str(getattr(p, "key", getattr(p, "name", p))) for p in path if not hasattr(p, "name"))
             for path, v in jax.tree_util.tree_flatten_with_path(grads)[0] if not bool(v)]
    return (f"non-finite values: {bad or 'none in the forward pass'}; non-finite gradients "
            f"({len(names)}): {names[:10]}")


def train(model_config: CLIPConfig, cfg: TrainConfig, workdir: str, data: Iterator[dict], *,
          mesh: Mesh | None = None, model_state: nnx.State | None = None,
          eval_fn: Callable[[nnx.State], dict] | None = None, reference: Any = None, class_weights: Any = None,
          progress: bool = True, log: Callable[[str], None] = C.log_stderr) -> TrainResult:
    """Train (or resume) a model in `workdir`; see the module docstring.

    Args:
      model_config: the architecture; `cfg.dtype`, `cfg.param_dtype` and `cfg.remat` are applied to it.
      cfg: the run.
      workdir: where checkpoints, `metrics.jsonl`, TensorBoard events and `clipjax.json` go.
      data: iterator of per-process batch dicts, with `get_state()` / `set_state(dict)`.
      mesh: device mesh (None: one device; multi-process runs always need one).
      model_state: initial model state (fine-tuning; from `clipjax.load(...).params`), else random init.
      eval_fn: `eval_fn(model_state) -> {name: float}`, run every `cfg.eval_every` steps and at the end.
      reference: a loaded `clipjax` model (`Model`), frozen: the teacher of `loss="distill"`, the
        starting model of "pmg-aft", "fare" and "advflyp" (`clipjax.train.adversarial`).
      class_weights: `[C, E]` unit-norm class text embeddings for "tecoa" and "pmg-aft" (batches then
        carry `label` `[b]` int32 in [0, C)).
    """
    preempted: list[bool] = []  # SIGTERM noted from the start: a signal during restore or compile stops too
    previous = signal.signal(signal.SIGTERM, lambda *_: preempted.append(True)) if _main_thread() else None
    try:
        return _train(model_config, cfg, workdir, data, mesh=mesh, model_state=model_state, eval_fn=eval_fn,
                      reference=reference, class_weights=class_weights, progress=progress, log=log,
                      preempted=preempted)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _train(model_config, cfg, workdir, data, *, mesh, model_state, eval_fn, reference, class_weights, progress,
           log, preempted: list) -> TrainResult:
    model_config = model_config.replace(dtype=cfg.dtype, param_dtype=cfg.param_dtype, remat=cfg.remat)
    if jax.process_count() > 1 and mesh is None:
        mesh = make_mesh(data=-1)
    check_compatible(model_config, cfg, mesh)
    if cfg.loss in ("distill",) + NEEDS_REFERENCE and reference is None:
        raise ConfigError(f"loss={cfg.loss!r} needs a reference model (clipjax.load(PATH)): the teacher of 'distill', "
                          "the frozen starting model of the adversarial losses")
    if cfg.loss in NEEDS_LABELS and class_weights is None:
        raise ConfigError(f"loss={cfg.loss!r} needs class_weights [C, E] (class text embeddings) and labelled batches")
    frozen = {}
    if reference is not None:
        frozen["params"] = reference.params
    if class_weights is not None:
        class_weights = checks.array("class_weights", class_weights, "[C, E]")
        if class_weights.shape[1] != model_config.embed_dim:
            raise ValueError(f"class_weights has shape {class_weights.shape}; expected [C, {model_config.embed_dim}] "
                             "(the model's embed_dim)")
        frozen["class_weights"] = jnp.asarray(class_weights, jnp.float32)
    C.check_workdir(workdir, model_config)
    local_batch = cfg.batch_size // jax.process_count()

    abstract_params = F.split_trainable(F.abstract_params(model_config))[0]
    optimizer = make_optimizer(cfg, abstract_params, model_config)
    make = state_factory(model_config, optimizer, seed=cfg.seed, ema=cfg.ema_decay is not None)
    abstract = jax.eval_shape(make, model_state)
    shardings = state_shardings(abstract, mesh) if mesh is not None else None
    with contextlib.ExitStack() as cleanup:  # closed in reverse order, on success and on any error
        ckpt = C.Checkpointer(workdir, keep=cfg.keep_checkpoints, keep_every=cfg.keep_every)
        cleanup.callback(ckpt.close)  # waits for the last asynchronous save
        restored = ckpt.restore(abstract, shardings, log=log)
        if restored is not None:
            state, data_state = restored
            data.set_state(data_state)
            log(f"resumed from {ckpt.directory} at step {int(state.step)}")
        start = int(jax.device_get(state.step)) if restored is not None else 0
        # the first batch is checked before the state is created or anything is written
        first = next(data) if start < cfg.total_steps else None
        if first is not None:
            check_batch(first, model_config, local_batch, cfg.loss,
                        None if class_weights is None else class_weights.shape[0])
        if restored is None:
            with mesh_context(mesh):
                state = jax.jit(make, out_shardings=shardings)(model_state)
        C.write_model_meta(workdir, model_config, cfg.to_dict())
        writer = MetricsWriter(workdir, resume_step=start)
        cleanup.callback(writer.close)

        if mesh is not None and "class_weights" in frozen:
            frozen["class_weights"] = jax.device_put(frozen["class_weights"], NamedSharding(mesh, P()))
        frozen = frozen or None
        step_fn = make_train_step(model_config, cfg, optimizer, mesh=mesh, state_shardings=shardings,
                                  reference_config=None if reference is None else reference.config,
                                  frozen_shardings=None if mesh is None or frozen is None else
                                  jax.tree.map(lambda a: a.sharding, frozen))
        meta = {"model_config": model_config.to_dict(), "train_config": cfg.to_dict()}

        bar = None
        if progress and jax.process_index() == 0 and start < cfg.total_steps:
            from tqdm.auto import tqdm

            bar = cleanup.enter_context(tqdm(total=cfg.total_steps, initial=start, unit="step", dynamic_ncols=True))

        compiled = flops = None
        peak, _ = peak_flops(mesh.devices.flat if mesh is not None else None)
        metrics: dict = {}
        window_start, window_wait, window_steps = time.perf_counter(), 0.0, 0
        run_start, run_steps = time.perf_counter(), 0
        step = last_saved = start
        stopped = "done"
        while step < cfg.total_steps:
            if _stop_requested(bool(preempted)):
                stopped = "preempted"
                log(f"SIGTERM: saving step {step} and stopping")
                break
            t0 = time.perf_counter()
            local, first = (first, None) if first is not None else (next(data), None)
            batch = global_batch(local, mesh)
            window_wait += time.perf_counter() - t0
            if compiled is None:
                with mesh_context(mesh):
                    compiled = step_fn.jitted.lower(state, batch, frozen).compile()
                flops = compiled_flops(compiled)
                window_start, window_wait = time.perf_counter(), 0.0
            with mesh_context(mesh):
                new_state, metrics = compiled(state, batch, frozen)
            if not bool(metrics["finite"]):
                report = nonfinite_report(new_state, batch, model_config, cfg, mesh)
                raise NonFiniteError(f"step {step + 1}: loss {float(metrics['loss'])}, gradient norm "
                                     f"{float(metrics['grad_norm'])}; {report}. The update from step {step} "
                                     f"was not applied and nothing was saved from it (newest save: step "
                                     f"{last_saved or 'none'}).")
            state = new_state
            step += 1
            window_steps += 1
            run_steps += 1
            if bar is not None:
                bar.update(1)
            last = step == cfg.total_steps
            if cfg.log_every and (step % cfg.log_every == 0 or last):
                elapsed = time.perf_counter() - window_start
                row = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "finite"}
                row["samples_per_sec"] = window_steps * cfg.batch_size / elapsed
                row["step_seconds"] = elapsed / window_steps
                row["data_wait_frac"] = window_wait / elapsed
                row["mfu"] = flops / row["step_seconds"] / peak if flops else float("nan")
                row["epoch"] = getattr(data, "epoch", float("nan"))
                if hasattr(data, "bad_counts"):  # examples skipped as bad (this process's), by kind
                    row.update({f"data/{k}": float(v) for k, v in data.bad_counts().items()})
                writer.write(step, row)
                if bar is not None:
                    bar.set_postfix(loss=f"{row['loss']:.4f}", sps=f"{row['samples_per_sec']:.0f}",
                                    mfu=f"{row['mfu']:.1%}")
                window_start, window_wait, window_steps = time.perf_counter(), 0.0, 0
            if eval_fn is not None and cfg.eval_every and (step % cfg.eval_every == 0 or last):
                writer.write(step, {f"eval/{k}": v for k, v in eval_fn(state.model_state).items()})
            if cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or last):
                ckpt.save(state, C.gather_data_states(data), meta)
                last_saved = step
        train_seconds = time.perf_counter() - run_start
        if stopped == "preempted" and cfg.checkpoint_every and step != last_saved:
            ckpt.save(state, C.gather_data_states(data), meta)
    return TrainResult(state=state, step=step, stopped=stopped, train_seconds=train_seconds,
                       samples_per_sec=run_steps * cfg.batch_size / max(train_seconds, 1e-9),
                       metrics={k: float(v) for k, v in jax.device_get(metrics).items()} if metrics else {})


def _stop_requested(local: bool) -> bool:
    """Whether any process got SIGTERM: every process stops at the same step.

    Preemption may signal one host, or all hosts at different moments. A process that stopped
    alone would leave the others blocked in the next step's collectives (and in Orbax's save
    barriers), so with several processes the local flags are OR-ed over all processes once per
    step (one tiny all-gather; the loop already waits for every step's `finite` flag). All
    processes then leave the loop at the same step and save that step together.
    """
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(local, np.int32))))


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
