"""scikit-learn's handwritten digits as image-caption pairs: data, zero-shot eval and the demo report.

The 1,797 real 8x8 digits (values 0..16) are split, stratified and seeded, into a training set and
a held-out set. Images become uint8 RGB `[S, S, 3]` (nearest-neighbour upscaling, S = `image_size`).
Each training image is paired with a caption drawn, per example and per visit, from
`TRAIN_TEMPLATES` with the digit as a word or a numeral. Evaluation uses `EVAL_TEMPLATES`, which
share no template with training:

* zero-shot accuracy on the held-out images: the classifier is the mean over eval templates of the
  normalised text embeddings of each class prompt (`clipjax.metrics.zeroshot_classifier`);
* retrieval R@1/5/10 (`clipjax.metrics.recall_at_k`) on held-out image-caption pairs, one eval
  caption per image. Every class has ~36 held-out images with near-identical captions, so R@1 of
  text->image is bounded by about 1/36 by construction: class-level retrieval is the meaningful
  number, and it is reported as `class_recall@K` (the top-K items hold one of the same digit).

Text: with the CLIP vocabulary (49,408) the captions are OpenAI BPE ids; a smaller
`text.vocab_size` remaps the BPE ids of the training captions to a small table (`SmallVocab`),
every other token (the eval templates' new words among them) to one "unknown" id.
`data.classes` keeps some digits only (labels index that list; experiments/ood_digits.py trains
on 0-4). `data.max_shift` translates training images by up to that many 8x8 pixels; with 2x2-pixel
ViT patches it hurt (55% vs 84% held-out at 400 steps in the tuning runs), so it is off.

Used by `experiments/train.py` (config `data.name = "digits"`); nothing in `clipjax/` imports it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
NUMERALS = tuple(str(i) for i in range(10))

# `{c}` is the class name (a word or a numeral), as in clipjax.metrics.templates.
TRAIN_TEMPLATES = (
    "a photo of the number {c}",
    "a handwritten {c}",
    "the digit {c}",
    "a photo of a handwritten digit {c}",
    "the number {c}, written by hand",
    "a scan of a handwritten {c}",
    "{c}",
    "a small {c}",
)
EVAL_TEMPLATES = (
    "an image of the number {c}",
    "a drawing of a {c}",
    "a picture of the digit {c}",
    "a blurry {c}",
)
assert not set(TRAIN_TEMPLATES) & set(EVAL_TEMPLATES)


@dataclass
class DigitsSplit:
    """uint8 8x8 images (0..255) and labels of the training and held-out sets.

    Labels index `classes` (the digits kept; all ten by default), so with `classes=(5, 7)` a 7 has label 1.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: tuple = tuple(range(10))

    def names(self, forms=(WORDS,)) -> list[tuple[str, ...]]:
        """Per form, the class names of `classes` (e.g. words, numerals)."""
        return [tuple(f[c] for c in self.classes) for f in forms]


def load_split(test_fraction: float = 0.2, seed: int = 0, classes=None) -> DigitsSplit:
    """Stratified, seeded split of the digits; `classes` keeps only those digits (both sides)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    labels = d.target.astype(np.int32)
    classes = tuple(range(10)) if classes is None else tuple(int(c) for c in classes)
    if not classes or len(set(classes)) != len(classes) or not set(classes) <= set(range(10)):
        raise ValueError(f"classes={classes} must be distinct digits 0..9")
    keep = np.isin(labels, classes)
    lookup = np.full(10, -1, np.int32)
    lookup[list(classes)] = np.arange(len(classes), dtype=np.int32)
    images, labels = images[keep], lookup[labels[keep]]
    x_tr, x_te, y_tr, y_te = train_test_split(images, labels, test_size=test_fraction, stratify=labels,
                                              random_state=seed)
    return DigitsSplit(x_tr, y_tr, x_te, y_te, classes)


def to_rgb(images: np.ndarray, image_size: int) -> np.ndarray:
    """uint8 `[N, 8, 8]` -> uint8 `[N, S, S, 3]` by nearest-neighbour upscaling (S a multiple of 8)."""
    if image_size % images.shape[-1]:
        raise ValueError(f"image_size={image_size} must be a multiple of {images.shape[-1]}")
    f = image_size // images.shape[-1]
    up = np.repeat(np.repeat(images, f, axis=1), f, axis=2)
    return np.repeat(up[..., None], 3, axis=-1)


def shift(images: np.ndarray, rng: np.random.Generator, max_shift: int) -> np.ndarray:
    """Translate each `[8, 8]` image by up to `max_shift` pixels per axis, zero fill."""
    if not max_shift:
        return images
    out = np.zeros_like(images)
    n, h, w = images.shape
    dy, dx = rng.integers(-max_shift, max_shift + 1, size=(2, n))
    for i in range(n):
        ys, yd = (slice(0, h - dy[i]), slice(dy[i], h)) if dy[i] >= 0 else (slice(-dy[i], h), slice(0, h + dy[i]))
        xs, xd = (slice(0, w - dx[i]), slice(dx[i], w)) if dx[i] >= 0 else (slice(-dx[i], w), slice(0, w + dx[i]))
        out[i, yd, xd] = images[i, ys, xs]
    return out


class SmallVocab:
    """OpenAI BPE (clipjax's tokenizer), remapped to the few tokens the training captions use.

    New ids: 0 pad, 1 unknown (every BPE token not in the training captions, e.g. the words of the
    eval templates), 2 start-of-text, 3.. the caption tokens, `vocab_size - 1` end-of-text (the
    largest id, so the text tower's argmax pooling still finds it). A 64-row embedding instead of
    49,408 rows makes the digits demo's step several times cheaper on a CPU.
    """

    PAD, UNK, SOT = 0, 1, 2

    def __init__(self, tokenizer, texts, vocab_size: int):
        self.tokenizer = tokenizer
        sot, eot = tokenizer.sot_id, tokenizer.eot_id
        used = sorted(set(np.unique(tokenizer(list(texts)))) - {0, sot, eot})
        if len(used) + 4 > vocab_size:
            raise ValueError(f"the training captions use {len(used)} BPE tokens; text.vocab_size={vocab_size} "
                             f"must be >= {len(used) + 4}")
        self.vocab_size = vocab_size
        self.table = np.full(max(tokenizer.vocab_size, eot + 1), self.UNK, np.int32)
        self.table[0], self.table[sot], self.table[eot] = self.PAD, self.SOT, vocab_size - 1
        self.table[used] = np.arange(3, 3 + len(used), dtype=np.int32)
        self.tokens = [tokenizer.decode([i]) for i in used]

    def __call__(self, texts) -> np.ndarray:
        return self.table[self.tokenizer(texts)]


def captions(templates, forms) -> list[list[str]]:
    """`[C][T * len(forms)]` strings: every template with every form (list of C names) of every class."""
    return [[t.format(c=names[c]) for names in forms for t in templates] for c in range(len(forms[0]))]


def caption_table(tokenizer, templates, forms) -> np.ndarray:
    """Token ids `[C, T * len(forms), L]` of `captions(templates, forms)`."""
    return np.stack([tokenizer(r) for r in captions(templates, forms)]).astype(np.int32)


class CaptionedDigits:
    """Endless, resumable batches `{"image": uint8 [b, S, S, 3], "text": int32 [b, L]}`.

    The order is `clipjax.data.ArrayBatches` over example indices (grain's seeded shuffle,
    reshuffled each epoch); the caption of each row (and its random shift, if any) is drawn from
    a generator seeded by `(seed, global batch index, process)`, so the state is the order's state
    and a restored iterator gives the batches an uninterrupted one would have.
    """

    def __init__(self, images, labels, captions, batch_size: int, *, image_size: int, seed: int = 0,
                 max_shift: int = 0):
        from clipjax.data import ArrayBatches

        self.images, self.labels, self.captions = images, labels, captions
        self.image_size, self.seed, self.max_shift = image_size, seed, max_shift
        self.order = ArrayBatches({"index": np.arange(len(images))}, batch_size, seed=seed)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        k = self.order.get_state()["next_batch"]
        idx = next(self.order)["index"]
        rng = np.random.default_rng([self.seed, k, self.order.process_index])
        pick = rng.integers(self.captions.shape[1], size=len(idx))
        text = self.captions[self.labels[idx], pick]
        images = shift(self.images[idx], rng, self.max_shift)
        return {"image": to_rgb(images, self.image_size), "text": text, "label": self.labels[idx].astype(np.int32)}

    state_is_global = True  # the order's global batch index: resumes with any process count

    @property
    def epoch(self) -> float:
        return self.order.epoch

    def get_state(self) -> dict:
        return self.order.get_state()

    def set_state(self, state: dict) -> None:
        self.order.set_state(state)


def normalize(images_uint8: np.ndarray, model_config) -> np.ndarray:
    """uint8 `[N, S, S, 3]` -> float32 `(x / 255 - mean) / std`, as the train step does."""
    mean = np.asarray(model_config.preprocess.mean, np.float32)
    std = np.asarray(model_config.preprocess.std, np.float32)
    return ((images_uint8.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)


class DigitsEval:
    """Zero-shot accuracy and retrieval on the held-out digits, as a function of the model state."""

    def __init__(self, split: DigitsSplit, model_config, tokenizer, *, image_size: int, seed: int = 0,
                 templates=EVAL_TEMPLATES, batch_size: int = 512):
        self.config, self.tokenizer = model_config, tokenizer
        self.classnames, self.numerals = (list(n) for n in split.names((WORDS, NUMERALS)))
        self.templates = list(templates)
        self.labels = split.test_labels
        self.pixels = normalize(to_rgb(split.test_images, image_size), model_config)
        rng = np.random.default_rng(seed)
        names = [(self.classnames, self.numerals)[rng.integers(2)][y] for y in self.labels]
        self.captions = [self.templates[rng.integers(len(self.templates))].format(c=n) for n in names]
        self.caption_ids = tokenizer(self.captions)
        self.batch_size = batch_size

    def embed_images(self, model_state) -> np.ndarray:
        from clipjax.models import clip as F

        out = [np.asarray(F.encode_image(model_state, self.pixels[i:i + self.batch_size], config=self.config))
               for i in range(0, len(self.pixels), self.batch_size)]
        return np.concatenate(out)

    def embed_text(self, model_state, texts) -> np.ndarray:
        from clipjax.models import clip as F

        return np.asarray(F.encode_text(model_state, self.tokenizer(list(texts)), config=self.config))

    def classifier(self, model_state, classnames=None) -> np.ndarray:
        from clipjax import metrics

        return np.asarray(metrics.zeroshot_classifier(lambda s: self.embed_text(model_state, s),
                                                      classnames or self.classnames, self.templates))

    def __call__(self, model_state) -> dict:
        """`{zero_shot_accuracy, zero_shot_accuracy_numerals, mean_per_class_recall, retrieval numbers}`."""
        from clipjax import metrics
        from clipjax.models import clip as F

        img = self.embed_images(model_state)
        zs = metrics.zeroshot_metrics(img, self.labels, self.classifier(model_state))
        zs_num = metrics.zeroshot_metrics(img, self.labels, self.classifier(model_state, self.numerals))
        txt = np.asarray(F.encode_text(model_state, self.caption_ids, config=self.config))
        n = len(img)
        rec = metrics.recall_at_k(txt, img, np.arange(n), ks=(1, 5, 10))
        out = {"zero_shot_accuracy": float(zs["acc1"]), "zero_shot_top5": float(zs["acc5"]),
               "mean_per_class_recall": float(zs["mean_per_class_recall"]),
               "zero_shot_accuracy_numerals": float(zs_num["acc1"])}
        for k, v in rec.items():
            out[k.replace("image_retrieval_recall@", "t2i_R@").replace("text_retrieval_recall@", "i2t_R@")] = float(v)
        # class-level retrieval: is one of the top-K images (captions) of the query's digit?
        sim = txt @ img.T
        same = self.labels[:, None] == self.labels[None, :]
        for k in (1, 5, 10):
            t2i = np.argsort(-sim, axis=1, kind="stable")[:, :k]
            i2t = np.argsort(-sim.T, axis=1, kind="stable")[:, :k]
            out[f"t2i_class_R@{k}"] = float(np.mean(np.take_along_axis(same, t2i, 1).any(1)))
            out[f"i2t_class_R@{k}"] = float(np.mean(np.take_along_axis(same, i2t, 1).any(1)))
        return out


@dataclass
class DigitsSource:
    """What `experiments/train.py` needs from a data source."""

    train: CaptionedDigits
    eval_fn: Callable
    report: Callable
    info: dict
    class_weights: Callable  # model state -> [10, E]: one training template per class (TeCoA's classifier)


def build(data_cfg: dict, model_config, batch_size: int, seed: int) -> DigitsSource:
    """The digits source from the config's `data` block (see experiments/configs/digits.py)."""
    from clipjax.tokenizer import Tokenizer

    known = {"name", "test_fraction", "split_seed", "max_shift", "forms", "classes"}
    extra = sorted(set(data_cfg) - known)
    if extra:
        raise ValueError(f"unknown digits data keys {extra}; expected a subset of {sorted(known)}")
    size = model_config.vision.image_size
    split = load_split(data_cfg.get("test_fraction", 0.2), data_cfg.get("split_seed", 0), data_cfg.get("classes"))
    tok = Tokenizer.openai(context_length=model_config.text.context_length)
    forms = split.names({"words": (WORDS,), "numerals": (NUMERALS,), "both": (WORDS, NUMERALS)}[
        data_cfg.get("forms", "both")])
    vocab = model_config.text.vocab_size
    if vocab != tok.vocab_size:  # a small text tower: remap the BPE ids of the training captions
        tok = SmallVocab(tok, [t for row in captions(TRAIN_TEMPLATES, forms) for t in row], vocab)
        if model_config.text.pool not in ("argmax", "eos") or (model_config.text.pool == "eos" and
                                                                 model_config.text.eos_id != vocab - 1):
            raise ValueError(f"a remapped vocabulary ends texts with id {vocab - 1}: use text.pool 'argmax' "
                             f"(or 'eos' with eos_id {vocab - 1})")
    table = caption_table(tok, TRAIN_TEMPLATES, forms)
    train = CaptionedDigits(split.train_images, split.train_labels, table, batch_size, image_size=size,
                            seed=seed, max_shift=data_cfg.get("max_shift", 0))
    evaluator = DigitsEval(split, model_config, tok, image_size=size, seed=data_cfg.get("split_seed", 0))
    info = {"classes": list(split.classes), "train_examples": int(len(split.train_labels)),
            "heldout_examples": int(len(split.test_labels)),
            "train_templates": list(TRAIN_TEMPLATES), "eval_templates": list(EVAL_TEMPLATES),
            "vocabulary": getattr(tok, "tokens", "OpenAI BPE (49408)")}

    def class_weights(model_state):
        from clipjax import metrics

        w = metrics.zeroshot_classifier(lambda s: evaluator.embed_text(model_state, s), evaluator.classnames,
                                        TRAIN_TEMPLATES[:1])
        return np.asarray(w).T  # [10, E]: one row per class

    return DigitsSource(train=train, eval_fn=evaluator, report=lambda *a, **k: write_report(evaluator, info, *a, **k),
                        info=info, class_weights=class_weights)


# ----------------------------------------------------------------------------- report


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_loss(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval/zero_shot_accuracy" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    lines = ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("contrastive loss")
    ax.set_yscale("log")
    if evals:
        ax2 = ax.twinx()
        lines += ax2.plot([r["step"] for r in evals], [r["eval/zero_shot_accuracy"] for r in evals], "o-",
                          color="C1", label="held-out zero-shot accuracy")
        ax2.set_ylabel("zero-shot accuracy")
        ax2.set_ylim(0, 1)
    ax.legend(lines, [ln.get_label() for ln in lines], loc="center right")
    ax.set_title("digits CLIP: training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_similarity(evaluator: DigitsEval, model_state, path: str, per_class: int = 3) -> None:
    """Cosine similarity of the 10 class classifiers (eval prompts) with `per_class` held-out images each,
    plus the class-mean matrix."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = evaluator.embed_images(model_state)
    w = evaluator.classifier(model_state)  # [D, 10]
    labels = evaluator.labels
    n = len(evaluator.classnames)
    pick = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(n)])
    sim = w.T @ img[pick].T  # [C, C * per_class]
    means = np.stack([img[labels == c].mean(0) for c in range(n)])
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [3, 1.2]})
    im = axes[0].imshow(sim, cmap="viridis", aspect="auto")
    axes[0].set_yticks(range(n), [f'"{c}"' for c in evaluator.classnames])
    axes[0].set_xticks(range(len(pick)), [evaluator.numerals[labels[i]] for i in pick], fontsize=7)
    axes[0].set_xlabel(f"held-out images ({per_class} per digit, true label)")
    axes[0].set_title("cosine(class prompt, image)")
    fig.colorbar(im, ax=axes[0])
    im2 = axes[1].imshow(w.T @ means.T, cmap="viridis")
    axes[1].set_xticks(range(n), evaluator.numerals)
    axes[1].set_yticks(range(n), evaluator.numerals)
    axes[1].set_xlabel("mean held-out image of digit")
    axes[1].set_ylabel("class prompt")
    axes[1].set_title("class means")
    fig.colorbar(im2, ax=axes[1])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(evaluator: DigitsEval, info: dict, result, workdir: str, *, model_config, train_config,
                 min_accuracy: float | None = None, log=print) -> dict:
    """Evaluate, reload the checkpoint with `clipjax.load` (same numbers, asserted), write
    `WORKDIR/report.json`, `loss.png` and `similarity.png`, and return the report."""
    import clipjax
    from clipjax.checkpoint import params_dir

    final = evaluator(result.state.model_state)
    path = os.path.join(workdir, "report.json")
    previous = {}
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
    trained_now = result.metrics != {}
    ckpt = None
    if train_config.checkpoint_every:
        loaded = clipjax.load(workdir)
        reloaded = evaluator(loaded.params)
        if reloaded != final:
            raise AssertionError(f"the reloaded checkpoint evaluates differently: {reloaded} != {final}")
        ckpt = params_dir(os.path.abspath(workdir))
    report = {
        **final,
        "steps": result.step,
        "train_seconds": result.train_seconds if trained_now else previous.get("train_seconds"),
        "samples_per_sec": result.samples_per_sec if trained_now else previous.get("samples_per_sec"),
        "trained_in_this_run": trained_now,
        "checkpoint": ckpt,
        "reload_equal": ckpt is not None,
        "workdir": os.path.abspath(workdir),
        "logit_scale": float(np.exp(np.asarray(result.state.model_state["log_logit_scale"][...]))),
        **info,
        "model_config": model_config.to_dict(),
        "train_config": train_config.to_dict(),
    }
    rows = read_metrics(workdir)
    plot_loss(rows, os.path.join(workdir, "loss.png"))
    plot_similarity(evaluator, result.state.model_state, os.path.join(workdir, "similarity.png"))
    report["plots"] = [os.path.join(os.path.abspath(workdir), n) for n in ("loss.png", "similarity.png")]
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=2)
    os.replace(path + ".tmp", path)
    ts = report["train_seconds"]
    log(f"\nheld-out zero-shot accuracy {final['zero_shot_accuracy']:.4f} (eval templates unseen in training; "
        f"numerals {final['zero_shot_accuracy_numerals']:.4f}); retrieval t2i R@1/5/10 "
        f"{final['t2i_R@1']:.3f}/{final['t2i_R@5']:.3f}/{final['t2i_R@10']:.3f}, class-level t2i R@1 "
        f"{final['t2i_class_R@1']:.3f}")
    log(f"{result.step} steps, train_seconds {ts if ts is None else round(ts, 1)}"
        f"{'' if trained_now else ' (from the earlier run: this run resumed a finished one)'}")
    log(f"checkpoint {ckpt} (reloaded with clipjax.load: same accuracy)" if ckpt else "no checkpoint saved")
    log(f"report {path}\nplots {report['plots'][0]}, {report['plots'][1]}\n"
        f"metrics {os.path.join(workdir, 'metrics.jsonl')}")
    if min_accuracy is not None and final["zero_shot_accuracy"] < min_accuracy:
        raise SystemExit(f"zero-shot accuracy {final['zero_shot_accuracy']:.4f} < required {min_accuracy}")
    return report
