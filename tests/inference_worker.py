"""One process of a multi-process inference run (a subprocess of test_multihost_inference.py; not a
test module itself).

    python tests/inference_worker.py --checkpoint CK --out DIR --coordinator 127.0.0.1:PORT
        --num-processes 2 --process-id I [--local-devices 2]

Every process runs the same program (SPMD) with `--local-devices` fake CPU devices, gloo CPU
collectives and `jax.distributed` on localhost:

* mesh `data x fsdp` with `fsdp` ACROSS processes and `data` within each one, so every param that
  has an `embed` axis is split between the processes, and the batch rows of one process are not
  contiguous in the global batch (process p holds row blocks p, p + P, ...);
* `clipjax.load(CK, mesh=mesh)`, then `encode_image` / `encode_text` / `logits` of this process's
  rows of `inputs()` (`rows(p)`), fed as host numpy (and strings), as a global `jax.Array`, as a
  process-local `jax.Array`, and with `validate=False`; every `jax.Array` path runs under
  `jax.transfer_guard_device_to_host("disallow")`;
* bad inputs on process 1 only (NaN pixels on the host, NaN in a global array with `validate=True`):
  every process must raise, none may hang;
* `clipjax.checkpoint.save(DIR/saved, ...)` of the loaded (process-sharded) params, a refused second
  save (the folder exists), and an `atomic_folder` block that fails on process 1 only (`DIR/failed`
  must never appear).

Writes `DIR/process{I}.npz` (this process's addressable output shards: `{name}_{k}` data and
`{name}_{k}_rows` = [start, stop) global rows) and `DIR/process{I}.json` (checks and error messages).
"""

import argparse
import json
import os
import sys

BATCH, LOCAL_DEVICES = 8, 2  # global batch; fake CPU devices per process
CAPTIONS = ("a photo of a cat", "a dog on a sofa", "an astronaut", "a cup of coffee", "a red rocket",
            "two birds", "a city at night", "")


def inputs(image_size: int = 32):
    """The global batch: float32 pixels `[BATCH, S, S, 3]` and `BATCH` captions."""
    import numpy as np

    pixels = np.random.default_rng(0).standard_normal((BATCH, image_size, image_size, 3)).astype(np.float32)
    return pixels, list(CAPTIONS)


def rows(process: int, num_processes: int) -> slice:
    """The rows of `inputs()` that process `process` feeds."""
    n = BATCH // num_processes
    return slice(process * n, (process + 1) * n)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--coordinator", required=True)
    p.add_argument("--num-processes", type=int, default=2)
    p.add_argument("--process-id", type=int, required=True)
    p.add_argument("--local-devices", type=int, default=LOCAL_DEVICES)
    return p.parse_args(argv)


def shards(out: dict, name: str, x) -> None:
    """This process's distinct addressable shards of `x` (rows [start, stop) and data)."""
    import numpy as np

    seen = set()
    for s in sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0):
        r = s.index[0].indices(x.shape[0])[:2]
        if r in seen:
            continue
        seen.add(r)
        k = len(seen) - 1
        out[f"{name}_{k}"] = np.asarray(s.data)  # one device's own shard: a local copy
        out[f"{name}_{k}_rows"] = np.asarray(r)


def raises(fn) -> str | None:
    """`Type: message` of what `fn()` raises, None if it returns."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - reported to the test
        return f"{type(e).__name__}: {e}"
    return None


def main(argv=None):
    args = parse(argv)
    from train_worker import FAST_XLA_FLAGS  # the same compile flags as the training workers

    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join(flags + list(FAST_XLA_FLAGS)
                                       + [f"--xla_force_host_platform_device_count={args.local_devices}"])
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.modules["torch"] = None  # nothing here needs it; its import costs seconds

    import jax

    jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                               process_id=args.process_id, initialization_timeout=120)

    import numpy as np

    import clipjax
    from clipjax.checkpoint import atomic_folder, save
    from clipjax.sharding import batch_sharding, make_mesh

    me, n = jax.process_index(), jax.process_count()
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    grid = np.asarray(devices, dtype=object).reshape(n, args.local_devices).T  # [data (local), fsdp (processes)]
    mesh = make_mesh(data=args.local_devices, fsdp=n, devices=list(grid.reshape(-1)))
    report, out = {"process": me}, {}

    model = clipjax.load(args.checkpoint, mesh=mesh)
    tok = model.params["text"]["token_embed"][...]
    report["token_embed"] = {"spec": str(tok.sharding.spec), "fully_addressable": tok.is_fully_addressable,
                             "local_shard": list(tok.addressable_shards[0].data.shape)}

    pixels, captions = inputs(model.config.vision.image_size)
    mine = rows(me, n)
    px, caps = pixels[mine], captions[mine]

    # host inputs (default checks: on the host, agreed over processes)
    img = model.encode_image(px)
    txt = model.encode_text(caps)
    logits = model.logits(px, caps)
    report["shapes"] = {"image": list(img.shape), "text": list(txt.shape), "logits": list(logits.shape)}
    report["image_spec"] = str(img.sharding.spec)
    shards(out, "image", img)
    shards(out, "text", txt)
    shards(out, "logits", logits)

    # the same rows as device arrays: no device -> host copy on the hot path
    global_px = jax.make_array_from_process_local_data(batch_sharding(mesh, 4), px)
    local_px = jax.device_put(px, jax.local_devices()[0])
    ids = model.tokenize(caps)
    global_ids = jax.make_array_from_process_local_data(batch_sharding(mesh, 2), ids)
    with jax.transfer_guard_device_to_host("disallow"):
        same = {"image_global": model.encode_image(global_px), "image_local_array": model.encode_image(local_px),
                "image_unchecked_host": model.encode_image(px, validate=False),
                "text_global": model.encode_text(global_ids)}
    want = {"image_global": img, "image_local_array": img, "image_unchecked_host": img, "text_global": txt}
    report["equal"] = {k: all(np.array_equal(a.data, b.data) and a.index == b.index
                              for a, b in zip(v.addressable_shards, want[k].addressable_shards))
                       for k, v in same.items()}

    # bad input on process 1 only: every process raises (the processes agree), nobody hangs
    bad = px.copy()
    if me == 1:
        bad[0, 0, 0, 0] = np.nan
    report["nan_host"] = raises(lambda: model.encode_image(bad))
    bad_global = jax.make_array_from_process_local_data(batch_sharding(mesh, 4), bad)
    report["nan_device_unchecked"] = raises(lambda: model.encode_image(bad_global).block_until_ready())
    report["nan_device_validate"] = raises(lambda: model.encode_image(bad_global, validate=True))

    # multi-host save of the process-sharded params; refusal to overwrite; a failure on one process
    saved = os.path.join(args.out, "saved")
    report["save"] = save(saved, model.config, model.params, source={"kind": "test"})
    report["save_again"] = raises(lambda: save(saved, model.config, model.params))

    def fail_on_process_1():
        with atomic_folder(os.path.join(args.out, "failed")) as tmp:
            with open(os.path.join(tmp, f"from-process-{me}"), "w") as f:
                f.write("partial")
            if me == 1:
                raise RuntimeError("injected failure on process 1")

    report["atomic_failure"] = raises(fail_on_process_1)

    np.savez(os.path.join(args.out, f"process{me}.npz"), **out)
    with open(os.path.join(args.out, f"process{me}.json"), "w") as f:
        json.dump(report, f, indent=1)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
