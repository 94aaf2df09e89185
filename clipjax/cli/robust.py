"""`clipjax robust eval`: zero-shot accuracy of a clipjax checkpoint under L-inf attacks (`clipjax.robust`).

    clipjax robust eval --model DIR (--dataset NAME [--split test] [--data-dir D] [--label-key label]
                                     [--image-key image] | --images FOLDER --labels FILE --classes FILE)
                        [--templates NAME] (--protocol tecoa|ttc|pmg-aft|fare | --attack pgd|pgd-cw|apgd-ce|
                        apgd-dlr|apgd-t|autoattack) [--eps 1/255,4/255] [--steps N] [--alpha A] [--restarts R]
                        [--limit N] [--batch-size 64] [--seed 0] [--out result.json] [--no-progress]

The classifier is `clipjax eval zeroshot`'s: the same class names and prompt templates (the data set's,
else OpenAI's 80 ImageNet templates, also the folder form's default; `--templates NAME` picks a set,
e.g. cifar10), encoded by the model's text tower into `[C, E]` class embeddings. Images go through the
model's eval transform (resize + centre crop, as `clipjax.preprocess`) *without* the mean/std step, so
the attacks see `[B, S, S, 3]` pixels in [0, 1] at the model's resolution S and eps is measured there
(the TeCoA family attacks CIFAR / STL at their native 32 / 96 px instead; see
`clipjax.robust.evaluate.zero_shot_logits_fn`). Logits are 100 * cos.

Data: a tensorflow-datasets split (`--dataset`, read as `clipjax eval zeroshot` reads it), or a folder:
`--images FOLDER` (image files in sorted file-name order), `--labels FILE` (one integer class index per
line, in that order) and `--classes FILE` (one class name per line; line i names class i).

`--protocol` runs a paper's protocol (`clipjax.robust.PROTOCOLS`: its attacks, settings, default eps and
sample count); `--attack` one attack with `--steps`, `--alpha` (PGD step, default eps) and `--restarts`.
Every value of `--eps` (numbers or fractions, comma-separated) gives one result. The examples are attacked
in batches of `--batch-size` (rounded up to a multiple of the devices, sharded over them): batch b is
`clipjax.robust.robust_accuracy` on that batch with the key `jax.random.fold_in(jax.random.key(seed), b)`,
the same for every eps. The JSON holds, per eps, the clean accuracy, the robust accuracy (correct under
every attack), `attack_accuracy` (each PGD attack's accuracy on its adversarial images: the papers' PGD
number) and `robust_after` (AutoAttack's cumulative robust accuracy after each APGD attack; the last is
the papers' AutoAttack number, also given as `autoattack_accuracy`).
"""

from __future__ import annotations

import argparse
import os
import sys
from fractions import Fraction
from types import SimpleNamespace

import numpy as np

from clipjax.cli.evaluate import _check_limit, _zeroshot_names
from clipjax.cli.inputs import Encoder, emit, examples, field, image_files, image_of, open_images, tfds_source

PROTOCOL_NAMES = "tecoa, ttc, pmg-aft, fare"
ATTACK_NAMES = "pgd, pgd-cw, apgd-ce, apgd-dlr, apgd-t, autoattack"


# ----------------------------------------------------------------------------- argument checks
def _number(flag: str, text: str) -> float:
    """A number written as a decimal or a fraction such as 4/255."""
    try:
        value = float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"{flag}: {text.strip()!r} is not a number or a fraction like 4/255") from None
    return value


def parse_eps(text: str) -> list[tuple[str, float]]:
    """`--eps` as `[(as written, value)]`: comma-separated decimals or fractions, each in [0, 1]."""
    out = []
    for part in text.split(","):
        if not part.strip():
            raise ValueError(f"--eps: empty value in {text!r}; expected comma-separated values like 1/255,4/255")
        value = _number("--eps", part)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"--eps must lie in [0, 1] (pixel units: 4/255 is four intensity levels), "
                             f"got {part.strip()}")
        out.append((part.strip(), value))
    return out


def _eps_text(value: float) -> str:
    return f"{round(value * 255, 6):g}/255"


def _attack_options(args) -> dict:
    """The method (`protocol` or `attack`) and its settings, checked, as keyword arguments of `robust_accuracy`."""
    from clipjax.robust.evaluate import ATTACKS, PROTOCOLS

    if args.protocol is not None and args.attack is not None:
        raise ValueError("give --protocol or --attack, not both")
    if args.protocol is None and args.attack is None:
        raise ValueError(f"give --protocol ({PROTOCOL_NAMES}) or --attack ({ATTACK_NAMES})")
    if args.protocol is not None:
        if args.protocol not in PROTOCOLS:
            raise ValueError(f"unknown --protocol {args.protocol!r}; expected one of {', '.join(PROTOCOLS)}")
        given = [flag for flag in ("steps", "alpha", "restarts") if getattr(args, flag) is not None]
        if given:
            raise ValueError(f"--{given[0]} cannot be used with --protocol {args.protocol} (the protocol fixes "
                             "its attacks' settings); use --attack for custom settings")
        return {"protocol": args.protocol}
    if args.attack not in ATTACKS:
        raise ValueError(f"unknown --attack {args.attack!r}; expected one of {', '.join(ATTACKS)}")
    if args.eps is None:
        raise ValueError(f"--eps is required with --attack {args.attack}")
    for flag in ("steps", "restarts"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be a positive integer, got {getattr(args, flag)}")
    pgd = args.attack in ("pgd", "pgd-cw")
    if args.alpha is not None and not pgd:
        raise ValueError(f"--alpha applies to --attack pgd / pgd-cw only (APGD sets its own step sizes), "
                         f"not to {args.attack}")
    if args.restarts is not None and pgd:
        raise ValueError(f"--restarts applies to the APGD attacks only (PGD has no restarts), not to {args.attack}")
    alpha = None
    if args.alpha is not None:
        alpha = _number("--alpha", args.alpha)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"--alpha must lie in [0, 1] (pixel units, e.g. 1/255), got {args.alpha}")
    return {"attack": args.attack, "steps": args.steps, "alpha": alpha, "restarts": args.restarts}


def _check_source(args) -> None:
    folder = [args.images, args.labels, args.classes]
    if args.dataset is not None and any(v is not None for v in folder):
        raise ValueError("give --dataset or --images/--labels/--classes, not both")
    if args.dataset is None and not all(v is not None for v in folder):
        if any(v is not None for v in folder):
            raise ValueError("--images, --labels and --classes go together (the folder form needs all three)")
        raise ValueError("give --dataset NAME (tensorflow-datasets) or --images FOLDER --labels FILE --classes FILE")


# ----------------------------------------------------------------------------- inputs
def _lines(flag: str, path: str, what: str) -> list[str]:
    """The lines of a text file, trailing blank lines dropped; a blank line elsewhere is an error."""
    if not os.path.isfile(path):
        raise ValueError(f"{flag} file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f.read().splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise ValueError(f"{flag} file {path!r} is empty; expected {what}")
    for i, line in enumerate(lines, 1):
        if not line:
            raise ValueError(f"{path}:{i}: empty line; expected {what}")
    return lines


def read_classes(path: str) -> list[str]:
    """`--classes`: one class name per line (line i names class i)."""
    return _lines("--classes", path, "one class name per line")


def read_labels(path: str, num_images: int, num_classes: int, folder: str) -> np.ndarray:
    """`--labels`: `[num_images]` int32, one integer in [0, num_classes) per line, in sorted file order."""
    lines = _lines("--labels", path, "one integer class index per line")
    labels = []
    for i, line in enumerate(lines, 1):
        try:
            labels.append(int(line))
        except ValueError:
            raise ValueError(f"{path}:{i}: {line!r} is not an integer class index") from None
    if len(labels) != num_images:
        raise ValueError(f"--labels has {len(labels)} labels for the {num_images} images in {folder!r}; expected "
                         "one label per image, in sorted file-name order")
    for i, label in enumerate(labels, 1):
        if not 0 <= label < num_classes:
            raise ValueError(f"{path}:{i}: label {label} is outside [0, {num_classes}) (the {num_classes} classes "
                             "of --classes)")
    return np.asarray(labels, np.int32)


def unit_pixels(images, config) -> np.ndarray:
    """The model's eval transform without the mean/std step: `[B, S, S, 3]` float32 in [0, 1].

    `clipjax.preprocess.preprocess` up to its normalisation: the same PIL resize + centre crop
    (`resize_and_crop`) and the same uint8 / 255 in float32, so (result - mean) / std equals
    `model.preprocess(images)`.
    """
    from clipjax.preprocess import resize_and_crop, to_pil

    pp, size = config.preprocess, config.vision.image_size
    crops = [resize_and_crop(to_pil(im, i), size, pp.resize_mode, pp.interpolation) for i, im in enumerate(images)]
    return np.stack(crops).astype(np.float32) / np.float32(255)


class _FolderLabels:
    """The part of a tfds builder `_zeroshot_names` reads, for the class names of `--classes`."""

    def __init__(self, names: list[str]):
        self.info = SimpleNamespace(features={"label": SimpleNamespace(names=names)})


def _inputs(args):
    """`(dataset name, count, names, templates, get(start, stop) -> (images, labels [n]))`."""
    if args.images is not None:
        classes = read_classes(args.classes)
        files = image_files(args.images)
        labels = read_labels(args.labels, len(files), len(classes), args.images)
        folder = os.path.abspath(args.images)
        # no data set name: OpenAI's 80 ImageNet templates (eval zeroshot's fallback) unless --templates
        names, temps = _zeroshot_names(_FolderLabels(classes), folder, "label", args.templates or "imagenet1k")
        read = open_images(args.images, files)
        return folder, len(files), names, temps, lambda start, stop: (read(start, stop), labels[start:stop])

    builder, source = tfds_source(args.dataset, args.split, args.data_dir)
    names, temps = _zeroshot_names(builder, args.dataset, args.label_key, args.templates)

    def get(start, stop):
        exs = examples(source, start, stop)
        labels = np.asarray([int(field(e, args.label_key)) for e in exs], np.int32)
        return [image_of(e, args.image_key) for e in exs], labels

    return args.dataset, len(source), names, temps, get


# ----------------------------------------------------------------------------- the command
def run_eval(args) -> int:
    import jax
    from tqdm import tqdm

    from clipjax import metrics
    from clipjax.robust.evaluate import PROTOCOLS, robust_accuracy, zero_shot_logits_fn
    from clipjax.sharding import batch_sharding

    _check_limit(args)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    if args.seed < 0:
        raise ValueError(f"--seed must be a non-negative integer, got {args.seed}")
    method = _attack_options(args)
    protocol = method.get("protocol")
    eps_list = (parse_eps(args.eps) if args.eps is not None
                else [(_eps_text(PROTOCOLS[protocol]["eps"]), PROTOCOLS[protocol]["eps"])])
    _check_source(args)
    dataset, count, names, temps, get = _inputs(args)
    num_samples = PROTOCOLS[protocol]["num_samples"] if protocol else None
    n = min([count] + [v for v in (args.limit, num_samples) if v])

    enc = Encoder(args.model, args.batch_size, not args.no_progress)
    model, size, n_dev = enc.model, enc.batch_size, jax.device_count()
    weights = metrics.zeroshot_classifier(enc.texts, names, temps, batch_size=len(names) * len(temps))
    logits_fn = zero_shot_logits_fn(model.params, model.config, weights.T)  # [C, E] rows
    key = jax.random.key(args.seed)

    counts = [{"clean": 0, "robust": 0, "attack": {}, "after": {}} for _ in eps_list]
    first = [None] * len(eps_list)  # each eps's first batch result: its attack list and PGD steps
    with tqdm(total=-(-n // size), unit="batch", disable=args.no_progress, file=sys.stderr) as bar:
        for b, start in enumerate(range(0, n, size)):
            stop = min(start + size, n)
            images, labels = get(start, stop)
            x = unit_pixels(images, model.config)
            if n_dev > 1 and (stop - start) % n_dev == 0:  # else on one device (the last, short batch)
                x = jax.device_put(x, batch_sharding(enc.mesh, x.ndim))
            for e, (_, eps) in enumerate(eps_list):
                r = robust_accuracy(logits_fn, x, labels, jax.random.fold_in(key, b), eps=eps,
                                    num_samples=stop - start, batch_size=stop - start, **method)
                m, c = stop - start, counts[e]
                c["clean"] += int(r["clean_correct"].sum())
                c["robust"] += int(r["robust"].sum())
                for out, got in (("attack", r["attack_accuracy"]), ("after", r["robust_after"])):
                    for name, acc in got.items():  # acc = (correct count) / m, exactly
                        c[out][name] = c[out].get(name, 0) + int(round(acc * m))
                if first[e] is None:
                    first[e] = r
            bar.update(1)

    results = []
    for (text, eps), c, r in zip(eps_list, counts, first):
        after = {name: k / n for name, k in c["after"].items()}
        results.append({"eps": eps, "eps_text": text, "clean_accuracy": c["clean"] / n,
                        "robust_accuracy": c["robust"] / n,
                        "attack_accuracy": {name: k / n for name, k in c["attack"].items()},
                        "robust_after": after, "autoattack_accuracy": list(after.values())[-1] if after else None,
                        "alphas": r["alphas"]})
    result = {"task": "robust_zeroshot_classification", "model": os.path.abspath(args.model), "dataset": dataset,
              "split": args.split if args.dataset is not None else None, "num_examples": n,
              "num_classes": len(names), "num_templates": len(temps), "protocol": protocol,
              "attack": method.get("attack"),
              "settings": {"norm": "linf", "attacks": [{"name": name, **s} for name, s in first[0]["attacks"]],
                           "protocol_num_samples": num_samples, "limit": args.limit, "batch_size": size,
                           "seed": args.seed, "logit_scale": 100.0, "image_size": model.config.vision.image_size},
              "results": results}
    return emit(result, args.out)


def register(subparsers) -> None:
    """Add `robust` (`eval`) to the `clipjax` command's sub-parsers."""
    rb = subparsers.add_parser("robust", help="zero-shot robust accuracy under L-inf attacks (TeCoA, TTC, "
                                              "PMG-AFT and FARE protocols, PGD, APGD, AutoAttack)",
                               description=__doc__.split("\n\n", 1)[1],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    rb_sub = rb.add_subparsers(dest="robust_task", required=True)
    p = rb_sub.add_parser("eval", help="clean and robust zero-shot accuracy of a checkpoint")
    p.add_argument("--model", required=True, help="clipjax checkpoint folder")
    p.add_argument("--dataset", help="tfds name, e.g. cifar10 (or give --images, --labels, --classes)")
    p.add_argument("--split", default="test")
    p.add_argument("--data-dir", help="tfds data folder (default: $TFDS_DATA_DIR)")
    p.add_argument("--label-key", default="label")
    p.add_argument("--image-key", default="image")
    p.add_argument("--images", help="folder of images (sorted by file name)")
    p.add_argument("--labels", help="one integer class index per line, one line per image of --images")
    p.add_argument("--classes", help="one class name per line (line i names class i)")
    p.add_argument("--templates", help="template set name (default: the data set's, else OpenAI ImageNet)")
    p.add_argument("--protocol", help=f"a paper's protocol: {PROTOCOL_NAMES}")
    p.add_argument("--attack", help=f"one attack: {ATTACK_NAMES}")
    p.add_argument("--eps", help="L-inf radii in pixel units, comma-separated, e.g. 1/255,4/255 (default: the "
                                 "protocol's; required with --attack)")
    p.add_argument("--steps", type=int, help="--attack: PGD steps (10) or APGD iterations (100)")
    p.add_argument("--alpha", help="--attack pgd/pgd-cw: step size, e.g. 1/255 (default: eps)")
    p.add_argument("--restarts", type=int, help="--attack: APGD restarts (1)")
    p.add_argument("--limit", type=int, help="only the first N examples")
    p.add_argument("--batch-size", type=int, default=64, help="per step, rounded up to a multiple of the devices")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed of the random starts")
    p.add_argument("--out", help="write the JSON result here too")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_eval)
