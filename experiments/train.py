"""Train (or fine-tune) a CLIP / SigLIP / CLOOB model from an ml_collections config, big_vision style.

  python experiments/train.py --config experiments/configs/digits.py --workdir out/demo
  python experiments/train.py --config experiments/configs/NAME.py[:ARG] --config.lr=1e-3 \
      --config.model.overrides.vision.width=256 --workdir DIR

The config layout is described in experiments/configs/common.py. At the boundary the config
becomes a `clipjax.train.TrainConfig` (every top-level key that is not one of this script's own:
an unknown key raises naming it) and a `clipjax.config.CLIPConfig` (`model.name` preset, or the
`init_from` checkpoint's architecture, with `model.overrides` merged over it). Everything that can
be checked before training is checked before anything is written: unknown keys, a batch that does
not divide over the mesh, a mesh that does not fit the devices, a workdir holding another model,
a data source this script cannot provide.

Data sources (`data.name`): `digits` (experiments/digits_data.py: scikit-learn's digits, with its
own held-out eval and report), `arrays` (`data.path`, an .npz), and `files`: `data.source` (tar
shards, a CSV/TSV/JSONL table or `tfds:NAME[:SPLIT]`) with `clipjax.data.DataConfig` fields as
`data.*` keys, plus

* `data.tokenizer`: a tokenizer folder (default OpenAI's BPE);
* a labelled source (`data.label_key`, `data.classnames`: a file of names or "tfds") gives the class
  weights of `loss="tecoa"` / `"pmg-aft"` (`clipjax.train.evaluate.class_text_embeddings`) from the
  prompts `data.class_templates` ("openai", a list with `{}` / `{c}`; default `[data.caption_template]`
  if set, else OpenAI's 80 ImageNet templates);
* `data.eval`: held-out sets evaluated every `eval_every` steps (`clipjax.train.evaluate.make_eval_fn`,
  re-read each time with the eval transform, one pass, multi-host safe), logged as `eval/...`:

      data.eval = {"batch_size": 256,  # global; default the training batch_size
                   "zeroshot": {"source": "val-{000..063}.tar", "label_key": "cls",
                                "classnames": "classnames.txt", "templates": "openai"},
                   "retrieval": {"source": "coco_val.csv", "img_key": "filepath", "caption_key": "title"}}

  `zeroshot` (`eval/zeroshot_top1`, `zeroshot_top5`) needs `label_key` and `classnames`; `templates` is
  "openai" (default), a data-set name of `clipjax.metrics.get_templates` or a list. `retrieval`
  (`eval/image_to_text_R@1`, ..., `text_to_image_R@10`, mean / median ranks) reads one caption per
  image. The other keys of each are DataConfig fields (not `augment`); unknown keys raise naming them.

The run is `clipjax.train.loop.train`: it resumes from `WORKDIR/checkpoints`, writes
`WORKDIR/metrics.jsonl`, TensorBoard events and `WORKDIR/clipjax.json` (so `clipjax.load(WORKDIR)`
loads the newest checkpoint). Running the same command again in a finished workdir resumes at
the last step, trains nothing and re-evaluates / re-writes the report.

Multi-host: `--coordinator_address`, `--num_processes`, `--process_id` go to
`jax.distributed.initialize`; without them it is called (with jax's auto-detection) only where the
environment names a multi-process job (`cluster_environment`), or always with `--distributed=on`.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))

# top-level config keys that belong to this script; every other one is a TrainConfig field
SCRIPT_KEYS = ("model", "init_from", "init_towers", "mesh", "data", "report", "wise_ft_alpha")
DATA_SOURCES = ("digits", "arrays", "files")


class DataSourceError(ValueError):
    """The config names a data source (or source option) this script cannot provide."""


# ----------------------------------------------------------------------------- config -> dataclasses


def _as_dict(config) -> dict:
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def train_config(config):
    """The `TrainConfig` of a config: its top-level keys minus `SCRIPT_KEYS` (unknown keys raise)."""
    from clipjax.train.config import TrainConfig

    d = {k: v for k, v in _as_dict(config).items() if k not in SCRIPT_KEYS}
    return TrainConfig.from_dict(d)


def _merge(base: dict, over: dict, where: str) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v, f"{where}.{k}")
        else:
            out[k] = v
    return out


def model_config(config):
    """The `CLIPConfig`: preset `model.name` (or `init_from`'s architecture) with `model.overrides` merged."""
    import clipjax
    from clipjax.checkpoint import read_config
    from clipjax.config import CLIPConfig, ConfigError

    d = _as_dict(config)
    m = d.get("model") or {}
    extra = sorted(set(m) - {"name", "overrides"})
    if extra:
        raise ConfigError(f"unknown model keys {extra}; expected 'name' and 'overrides'")
    if m.get("name"):
        base = clipjax.get_config(m["name"]).to_dict()
    elif d.get("init_from"):
        path = d["init_from"]
        if os.path.exists(os.path.join(path, "clipjax.json")):
            base = read_config(path).to_dict()
        else:  # a file `clipjax convert` reads: converted in memory just for its config
            base = clipjax.load(path).config.to_dict()
    else:
        raise ConfigError("set model.name (an open_clip preset) or init_from (a clipjax checkpoint)")
    return CLIPConfig.from_dict(_merge(base, m.get("overrides") or {}, "model.overrides"))


def build_mesh(mesh_cfg: dict):
    """A ("data", "fsdp", "tensor") mesh, or None for one device (all sizes 1, one process)."""
    import jax

    from clipjax.config import ConfigError
    from clipjax.sharding import make_mesh

    extra = sorted(set(mesh_cfg) - {"data", "fsdp", "tensor"})
    if extra:
        raise ConfigError(f"unknown mesh keys {extra}; expected data, fsdp, tensor")
    sizes = [int(mesh_cfg.get(a, 1)) for a in ("data", "fsdp", "tensor")]
    n = jax.device_count()
    if all(s > 0 for s in sizes):
        total = int(np.prod(sizes))
        if total == 1 and jax.process_count() == 1:
            return None
        if total > n or (total < n and jax.process_count() > 1):
            raise ConfigError(f"mesh data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]} needs {total} devices; "
                              f"{n} are available (use -1 for one axis to take the rest)")
        return make_mesh(*sizes, devices=jax.devices()[:total])
    try:
        return make_mesh(*sizes)
    except ValueError as e:
        raise ConfigError(f"mesh data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]}: {e}") from None


# ----------------------------------------------------------------------------- data sources


@dataclasses.dataclass
class Source:
    train: object  # iterator with get_state / set_state
    eval_fn: object = None
    report: object = None
    class_weights: object = None  # model state -> [C, E] class text embeddings (labelled sources)


def build_data(data_cfg: dict, model_cfg, tc, *, mesh=None) -> Source:
    """The data source named by `data.name`; an unknown or unavailable source raises naming it.

    `mesh`: the training mesh (the `files` source's held-out eval and class weights run on it)."""
    name = data_cfg.get("name")
    if name == "digits":
        sys.path.insert(0, HERE)
        import digits_data

        try:
            src = digits_data.build(data_cfg, model_cfg, tc.batch_size, tc.seed)
        except ValueError as e:
            raise DataSourceError(f"data source 'digits': {e}") from None
        return Source(train=src.train, eval_fn=src.eval_fn, report=src.report, class_weights=src.class_weights)
    if name == "arrays":
        return _arrays_source(data_cfg, model_cfg, tc)
    if name == "files":
        return _files_source(data_cfg, model_cfg, tc, mesh)
    raise DataSourceError(f"data source {name!r} (config data.name) is not provided by experiments/train.py; "
                          f"available: {', '.join(DATA_SOURCES)}")


def _arrays_source(data_cfg: dict, model_cfg, tc) -> Source:
    """`data.path`: an .npz with `image` uint8/float32 `[N, H, W, 3]` and `text` int32 `[N, L]` (token ids)
    or `caption` strings (tokenized with OpenAI's BPE)."""
    from clipjax.data import ArrayBatches

    extra = sorted(set(data_cfg) - {"name", "path"})
    if extra:
        raise DataSourceError(f"unknown data keys {extra} for data source 'arrays'; expected name, path")
    path = data_cfg.get("path")
    if not path or not os.path.exists(path):
        raise DataSourceError(f"data source 'arrays' needs data.path, an existing .npz file; got {path!r}")
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    if "image" not in arrays or not ({"text", "caption"} & set(arrays)):
        raise DataSourceError(f"{path} holds {sorted(arrays)}; expected 'image' and 'text' (or 'caption')")
    if "text" not in arrays:
        from clipjax.tokenizer import Tokenizer

        tok = Tokenizer.openai(context_length=model_cfg.text.context_length)
        arrays["text"] = tok([str(c) for c in arrays.pop("caption")])
    arrays = {"image": arrays["image"], "text": arrays["text"].astype(np.int32)}
    return Source(train=ArrayBatches(arrays, tc.batch_size, seed=tc.seed))


def _files_source(data_cfg: dict, model_cfg, tc, mesh=None) -> Source:
    """`data.source`: tar shards, a CSV/TSV/JSONL table or `tfds:NAME[:SPLIT]` through `clipjax.data.make_batches`;
    the other `data.*` keys are `clipjax.data.DataConfig` fields (`augment` a dict of `AugmentConfig` fields),
    plus `tokenizer`: a tokenizer folder (needed for SigLIP vocabularies; default OpenAI's BPE),
    `class_templates`: the prompts of the class weights of a labelled source (see `FILES_KEYS`), and `eval`:
    held-out sets (`_files_eval`)."""
    from clipjax.data import DataConfig, make_batches
    from clipjax.data.transforms import AugmentConfig
    from clipjax.tokenizer import Tokenizer

    fields = {f.name for f in dataclasses.fields(DataConfig)}
    extra = sorted(set(data_cfg) - fields - set(FILES_KEYS))
    if extra:
        raise DataSourceError(f"unknown data keys {extra} for data source 'files'; expected {', '.join(FILES_KEYS)} "
                              f"and clipjax.data.DataConfig fields {sorted(fields)}")
    kw = {k: v for k, v in data_cfg.items() if k in fields}
    if not kw.get("source"):
        raise DataSourceError("data source 'files' needs data.source (shard pattern, .csv/.tsv/.jsonl or tfds:NAME)")
    if isinstance(kw.get("augment"), dict):
        kw["augment"] = AugmentConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in kw["augment"].items()})
    L = model_cfg.text.context_length
    tok = (Tokenizer.from_folder(data_cfg["tokenizer"], context_length=L) if data_cfg.get("tokenizer")
           else Tokenizer.openai(context_length=L))
    try:
        data_config = DataConfig(**kw)
    except ValueError as e:
        raise DataSourceError(f"data: {e}") from None
    batches = make_batches(data_config, image_size=model_cfg.vision.image_size, tokenizer=tok,
                           batch_size=tc.batch_size, seed=tc.seed, resize_mode=model_cfg.preprocess.resize_mode)
    source = Source(train=batches)
    classnames = getattr(batches, "classnames", None)
    if classnames:  # a labelled source: class weights for loss=tecoa / pmg-aft
        templates = data_cfg.get("class_templates") or (
            [kw["caption_template"]] if kw.get("caption_template") else "openai")
        source.class_weights = _class_weights_fn(model_cfg, tok, list(classnames), templates, mesh)
    elif data_cfg.get("class_templates"):
        raise DataSourceError("data.class_templates needs a labelled source (data.label_key and data.classnames)")
    if data_cfg.get("eval"):
        source.eval_fn = _files_eval(data_cfg["eval"], model_cfg, tc, tok, mesh)
    return source


# `data.*` keys of the files source that are not DataConfig fields
FILES_KEYS = ("name", "tokenizer", "class_templates", "eval")
EVAL_KEYS = ("batch_size", "zeroshot", "retrieval")


def _class_weights_fn(model_cfg, tok, classnames, templates, mesh):
    """model state -> `[C, E]` class text embeddings (`clipjax.train.evaluate.class_text_embeddings`)."""
    from clipjax.train.evaluate import resolve_templates

    try:
        templates = resolve_templates(templates)
    except ValueError as e:
        raise DataSourceError(f"data.class_templates: {e}") from None

    def class_weights(model_state):
        from clipjax.train.evaluate import class_text_embeddings

        return class_text_embeddings(model_state, model_cfg, tok, classnames, templates, mesh=mesh)

    return class_weights


def _files_eval(eval_cfg: dict, model_cfg, tc, tok, mesh):
    """`data.eval`: held-out sets read again at every evaluation (`make_batches(..., train=False, num_epochs=1)`).

      data.eval.batch_size: global eval batch (default: the training batch_size);
      data.eval.zeroshot: a labelled set: `source`, `label_key`, `classnames` (a file, or "tfds") and any other
        DataConfig fields, plus `templates` ("openai" (default), a data-set name or a list with `{}` / `{c}`);
        without `caption_key` / `caption_template` its captions are not read;
      data.eval.retrieval: image-caption pairs: `source` and DataConfig fields (`img_key`, `caption_key`, ...).

    Returns `make_eval_fn(...)` (logged as `eval/zeroshot_top1`, `eval/image_to_text_R@1`, ...).
    """
    import jax

    from clipjax.data import DataConfig, DataError, make_batches
    from clipjax.train.evaluate import ZeroShotSet, make_eval_fn

    extra = sorted(set(eval_cfg) - set(EVAL_KEYS))
    if extra:
        raise DataSourceError(f"unknown data.eval keys {extra}; expected {', '.join(EVAL_KEYS)}")
    if not (eval_cfg.get("zeroshot") or eval_cfg.get("retrieval")):
        raise DataSourceError("data.eval needs zeroshot and / or retrieval (a held-out source each)")
    batch_size = int(eval_cfg.get("batch_size") or tc.batch_size)
    if batch_size < 1 or batch_size % jax.process_count():
        raise DataSourceError(f"data.eval.batch_size={batch_size} must be a positive multiple of the "
                              f"{jax.process_count()} processes")
    fields = {f.name for f in dataclasses.fields(DataConfig)} - {"augment"}

    def config(which: str, own: tuple) -> DataConfig:
        d = dict(eval_cfg[which])
        extra = sorted(set(d) - fields - set(own))
        if extra:
            raise DataSourceError(f"unknown data.eval.{which} keys {extra}; expected {', '.join(own)} and "
                                  f"clipjax.data.DataConfig fields {sorted(fields)} (no augment: eval transform)")
        if not d.get("source"):
            raise DataSourceError(f"data.eval.{which} needs source (shard pattern, .csv/.tsv/.jsonl or tfds:NAME)")
        kw = {k: v for k, v in d.items() if k in fields}
        if which == "zeroshot":
            for key in ("label_key", "classnames"):
                if not kw.get(key):
                    raise DataSourceError(f"data.eval.zeroshot needs {key} (label_key: where each example's class "
                                          "index is; classnames: a file of names, one per line, or 'tfds')")
            if "caption_key" not in kw and "caption_template" not in kw:  # captions are not used: not read
                kw.update(caption_key=None, caption_template="{}")
        try:
            cfg = DataConfig(**kw)
            from clipjax.data.pipeline import open_source

            open_source(cfg)  # a missing file fails now, not at the first evaluation
        except (ValueError, DataError) as e:
            raise DataSourceError(f"data.eval.{which}: {e}") from None
        return cfg

    def reader(cfg: DataConfig):
        return lambda: make_batches(cfg, image_size=model_cfg.vision.image_size, tokenizer=tok, batch_size=batch_size,
                                    seed=tc.seed, train=False, num_epochs=1,
                                    resize_mode=model_cfg.preprocess.resize_mode)

    zeroshot = retrieval = None
    if eval_cfg.get("zeroshot"):
        zs = config("zeroshot", ("templates",))
        from clipjax.data.pipeline import resolve_classnames

        try:
            names = list(resolve_classnames(zs))
        except (ValueError, DataError) as e:
            raise DataSourceError(f"data.eval.zeroshot: {e}") from None
        zeroshot = ZeroShotSet(reader(zs), names, eval_cfg["zeroshot"].get("templates") or "openai")
    if eval_cfg.get("retrieval"):
        retrieval = reader(config("retrieval", ()))
    # the trainer's compute dtype: the state it passes holds params of `param_dtype`
    eval_model = model_cfg.replace(dtype=tc.dtype, param_dtype=tc.param_dtype, remat=tc.remat)
    try:
        return make_eval_fn(eval_model, zeroshot=zeroshot, retrieval=retrieval, tokenizer=tok, mesh=mesh)
    except ValueError as e:  # bad templates or class names
        raise DataSourceError(f"data.eval: {e}") from None


# ----------------------------------------------------------------------------- the run


def load_init(config: dict, model_cfg, mesh, seed: int):
    """The initial model state from `init_from` (all towers, or one: `init_towers`), or None."""
    path = config.get("init_from")
    if not path:
        return None
    import clipjax
    from flax import nnx

    from clipjax.config import ConfigError
    from clipjax.models import clip as F

    loaded = clipjax.load(path, mesh=mesh)
    towers = config.get("init_towers", "both")
    if towers == "both":
        if loaded.config.architecture() != model_cfg.architecture():
            raise ConfigError(f"init_from {path} holds another architecture than model.name/overrides ask for; "
                              "leave model.name unset to use the checkpoint's")
        return loaded.params
    keep = {"image": "visual", "text": "text"}.get(towers)
    if keep is None:
        raise ConfigError(f"init_towers={towers!r}; expected 'both', 'image' or 'text'")
    state = F.init_params(model_cfg, seed=seed, mesh=mesh)
    pure, src = state.to_pure_dict(), loaded.params.to_pure_dict()
    want = jax_shapes(pure[keep])
    if jax_shapes(src[keep]) != want:
        raise ConfigError(f"init_from {path}: its {keep} tower does not match the configured model's")
    pure[keep] = src[keep]
    nnx.replace_by_pure_dict(state, pure)
    return state


def adversarial_inputs(config: dict, tc, source: Source, model_state, mesh):
    """The frozen reference model (`init_from` again) and the class weights the adversarial losses need."""
    from clipjax.config import ConfigError
    from clipjax.train.adversarial import NEEDS_LABELS, NEEDS_REFERENCE

    reference = class_weights = None
    if tc.loss in NEEDS_REFERENCE + NEEDS_LABELS and not config.get("init_from"):
        raise ConfigError(f"loss={tc.loss!r} fine-tunes a trained model: set init_from")
    if tc.loss in NEEDS_REFERENCE:
        import clipjax

        reference = clipjax.load(config["init_from"], mesh=mesh)
    if tc.loss in NEEDS_LABELS:
        if source.class_weights is None:
            raise DataSourceError(f"loss={tc.loss!r} needs labelled batches and class names: data source "
                                  f"{config['data'].get('name')!r} has none (use 'digits', or 'files' with "
                                  "data.label_key and data.classnames)")
        class_weights = source.class_weights(model_state)
    return reference, class_weights


def jax_shapes(tree):
    import jax

    return jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), tree)


def run(config, workdir: str, *, progress: bool = True, log=None):
    """Check everything, train, then the optional WiSE-FT checkpoint and report. Returns the TrainResult."""
    import jax

    from clipjax.config import ConfigError
    from clipjax.models import clip as F
    from clipjax.train import checkpoints as C
    from clipjax.train.loop import train
    from clipjax.train.step import check_compatible

    log = log or C.log_stderr
    d = _as_dict(config)
    tc = train_config(d)
    mc = model_config(d)
    mesh = build_mesh(d.get("mesh") or {})
    check_compatible(mc.replace(dtype=tc.dtype, param_dtype=tc.param_dtype, remat=tc.remat), tc, mesh)
    C.check_workdir(workdir, mc)
    report_cfg = d.get("report") or {}
    if set(report_cfg) - {"enabled", "min_accuracy"}:
        raise ConfigError(f"unknown report keys {sorted(set(report_cfg) - {'enabled', 'min_accuracy'})}; "
                          "expected enabled, min_accuracy")
    if d.get("wise_ft_alpha") is not None and not d.get("init_from"):
        raise ConfigError("wise_ft_alpha needs init_from (the zero-shot model theta_0)")
    if (tc.lock_image or tc.lock_text) and not d.get("init_from"):
        raise ConfigError("lock_image / lock_text without init_from would freeze a randomly initialised tower; "
                          "set init_from to a converted checkpoint")
    if d.get("init_towers", "both") not in ("both", "image", "text"):
        raise ConfigError(f"init_towers={d.get('init_towers')!r}; expected 'both', 'image' or 'text'")
    source = build_data(d.get("data") or {}, mc, tc, mesh=mesh)
    if source.eval_fn is not None and not tc.eval_every:
        log("note: the data source has held-out evaluation, but eval_every=0 turns it off")
    if report_cfg.get("enabled") and source.report is None:
        raise DataSourceError(f"report.enabled: data source {d['data'].get('name')!r} has no report")
    model_state = load_init(d, mc, mesh, tc.seed)
    reference, class_weights = adversarial_inputs(d, tc, source, model_state, mesh)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(F.abstract_params(mc)))
    log(f"model: {n_params / 1e6:.2f}M params; {tc.total_steps} steps of batch {tc.batch_size} ({tc.loss} loss) "
        f"in {workdir}; devices: {jax.device_count()} x {jax.devices()[0].platform}, "
        f"mesh {None if mesh is None else dict(mesh.shape)}")
    try:
        result = train(mc, tc, workdir, source.train, mesh=mesh, model_state=model_state, eval_fn=source.eval_fn,
                       reference=reference, class_weights=class_weights, progress=progress, log=log)
    finally:
        if hasattr(source.train, "close"):  # grain pipelines: stop their worker processes
            source.train.close()
    if not result.metrics:
        log(f"{workdir} already holds the finished run (step {result.step}): nothing to train")
    else:
        log(f"{result.stopped} at step {result.step}: {result.train_seconds:.1f} s, "
            f"{result.samples_per_sec:.0f} samples/s")
    if result.stopped != "done":
        return result
    if d.get("wise_ft_alpha") is not None:
        alpha = float(d["wise_ft_alpha"])
        from clipjax.checkpoint import save
        from clipjax.train import wise_ft

        theta = wise_ft(model_state, result.state.model_state, alpha)
        out = os.path.join(workdir, f"wise_ft_alpha{alpha:g}")
        # every process: `save` is collective (Orbax writes each process's shards, process 0 commits)
        save(out, mc, theta, source={"kind": "wise_ft", "alpha": alpha, "theta_0": d["init_from"]}, overwrite=True)
        if jax.process_index() == 0:
            log(f"WiSE-FT (alpha {alpha:g}) checkpoint: {out}")
    if report_cfg.get("enabled") and jax.process_index() == 0:
        source.report(result, workdir, model_config=mc, train_config=tc,
                      min_accuracy=report_cfg.get("min_accuracy"), log=print)
    return result


# ----------------------------------------------------------------------------- multi-host


def cluster_environment() -> str | None:
    """The multi-process job this process is part of, from the environment (None: single process).

    jax's auto-detection (`jax._src.clusters`) covers SLURM, Open MPI, Cloud TPU (GCE metadata /
    GKE worker lists), Kubernetes and mpi4py, but several of those are also "present" for a
    single process (a one-task SLURM job, any TPU VM), so only environments that name more than
    one process count here; pass `--distributed=on` for the others (e.g. a GCE TPU pod).
    """
    e = os.environ

    def count(name):
        try:
            return int(e.get(name, "1"))
        except ValueError:
            return 1

    if count("SLURM_NTASKS") > 1 and "SLURM_STEP_NODELIST" in e:
        return "SLURM"
    if count("OMPI_COMM_WORLD_SIZE") > 1 and "OMPI_MCA_orte_hnp_uri" in e:
        return "Open MPI"
    hosts = e.get("TPU_PROCESS_ADDRESSES") or e.get("TPU_WORKER_HOSTNAMES") or ""
    if len([h for h in hosts.split(",") if h.strip()]) > 1:
        return "Cloud TPU pod"
    if e.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "Cloud TPU multislice"
    if e.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    return None


def init_distributed(mode: str = "auto", coordinator_address=None, num_processes=None, process_id=None) -> bool:
    """Call `jax.distributed.initialize` when asked or when `cluster_environment()` finds a job."""
    import jax

    explicit = coordinator_address or num_processes is not None or process_id is not None
    if mode == "off":
        if explicit:
            raise ValueError("--distributed=off contradicts --coordinator_address/--num_processes/--process_id")
        return False
    if explicit or mode == "on" or cluster_environment():
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
        return True
    return False


def main(argv):
    from absl import flags, logging

    from clipjax.config import ConfigError
    from clipjax.convert.errors import ConversionError
    from clipjax.data import DataError
    from clipjax.train.checkpoints import WorkdirError

    if len(argv) > 1:
        raise flags.Error(f"unexpected positional arguments {argv[1:]}")
    FLAGS = flags.FLAGS
    if not FLAGS["verbosity"].present:  # Orbax logs every save and restore at INFO
        logging.set_verbosity(logging.WARNING)
    if FLAGS.config is None:
        raise flags.Error("--config is required (a file under experiments/configs/)")
    init_distributed(FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    try:
        run(FLAGS.config, FLAGS.workdir, progress=FLAGS.progress)
    except (ConfigError, WorkdirError, DataSourceError, DataError, ConversionError) as e:
        print(f"train.py: error: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(2)


def define_flags():
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "config file (experiments/configs/NAME.py[:ARG])",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "checkpoints, metrics, TensorBoard events, report", required=True)
    flags.DEFINE_bool("progress", True, "show a progress bar")
    flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                      "jax.distributed.initialize: auto (when the environment names a multi-process job), on, off")
    flags.DEFINE_string("coordinator_address", None, "jax.distributed coordinator host:port (process 0)")
    flags.DEFINE_integer("num_processes", None, "jax.distributed number of processes")
    flags.DEFINE_integer("process_id", None, "jax.distributed id of this process")


def parse_flags(argv):
    """absl flag parsing with a one-line error for unknown `--config.KEY` overrides and bad values."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"train.py: error: {e}", file=sys.stderr)
    except (AttributeError, KeyError) as e:  # ml_collections: a --config.PATH override names no existing key
        key = str(e).strip("\"'")
        given = [a.split("=")[0].lstrip("-") for a in argv[1:] if a.startswith(("--config.", "-config."))]
        which = [g for g in given if key in g.split(".")[1:]] or given
        print(f"train.py: error: unknown config key {key!r} in {', '.join('--' + w for w in which)}: the config file "
              "does not define it (a model field missing from model.overrides can be set with the whole dict, "
              "e.g. --config.model.overrides=\"{'vision': {'pool': 'gap'}}\")", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main, flags_parser=parse_flags)
