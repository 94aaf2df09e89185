"""Robust zero-shot accuracy of CLIP: the attacked classifier, `robust_accuracy` and the papers' protocols.

`zero_shot_logits_fn` builds the function every attack differentiates: pixels in [0, 1] -> CLIP mean/std
-> `encode_image` -> L2-normalise -> `scale * x_hat @ W.T`. `robust_accuracy` runs a named protocol
(`PROTOCOLS`) or one attack over a dataset in fixed-size jitted batches and returns the clean and robust
accuracy with per-example flags.

How the attacks combine (a point is robust only if it survives every attack of the protocol):
* PGD attacks (`"pgd"`, `"pgd-cw"`) attack every image, as TeCoA's `validate` does; their accuracy on the
  attacked images is reported on its own (`attack_accuracy`), which is the papers' PGD number.
* APGD attacks run as AutoAttack's `run_standard_evaluation`: in order, each on the points still robust
  after the previous ones (clean-correct first), a point counting as broken when the returned image is
  misclassified. `robust_after` is AutoAttack's cumulative robust accuracy after each; the last one is
  the papers' AutoAttack number (`autoattack_accuracy`).
* `robust` = clean-correct and correct under every PGD attack and every APGD attack (the worst case).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from jax.tree_util import Partial

from clipjax import checks
from clipjax.models.clip import encode_image
from clipjax.preprocess import standardize
from clipjax.robust.apgd import check_apgd_classes, run_apgd
from clipjax.robust.attacks import (_pgd, _random_start_l2, _random_start_linf, as_partial, check_choice,
                                    check_images, check_labels, check_radius, classifier_objective, num_classes)

ATTACKS = ("pgd", "pgd-cw", "apgd-ce", "apgd-dlr", "apgd-t", "autoattack")
_APGD_LOSS = {"apgd-ce": "ce", "apgd-dlr": "dlr", "apgd-t": "dlr-targeted"}

# Each protocol: the default eps (pixel units), the attacks in order with their settings, and how many
# samples (the first ones) the paper attacks. All are L-inf.
PROTOCOLS: dict[str, dict[str, Any]] = {
    # TeCoA (Mao et al., ICLR 2023; cvlab-columbia/ZSRobust4FoundationModel:finetuning.py): `attack_pgd`
    # with the argparse test step (1/255) and 5 steps; `attack_auto` = AutoAttack 'standard' with
    # attacks_to_run replaced by [apgd-ce, apgd-dlr] (1 restart, 100 iterations). eps 1/255 is the README
    # table's; the argparse test default is 2/255 (pass eps=2/255). The paper's PGD step count is unverified.
    "tecoa": {"eps": 1 / 255, "num_samples": None,
              "attacks": (("pgd", {"alpha": 1 / 255, "steps": 5}), ("apgd-ce", {"steps": 100, "restarts": 1}),
                          ("apgd-dlr", {"steps": 100, "restarts": 1}))},
    # TTC (Xing et al., CVPR 2025; Sxing2/CLIP-Test-time-Counterattacks, TTC.sh): PGD-10, eps = alpha = 1/255;
    # AutoAttack as TeCoA's attack_auto (apgd-ce, apgd-dlr).
    "ttc": {"eps": 1 / 255, "num_samples": None,
            "attacks": (("pgd", {"alpha": 1 / 255, "steps": 10}), ("apgd-ce", {"steps": 100, "restarts": 1}),
                        ("apgd-dlr", {"steps": 100, "restarts": 1}))},
    # PMG-AFT (Wang et al., CVPR 2024): PGD-10, eps = alpha = 1/255; AutoAttack 'standard' (apgd-ce with
    # 1 restart, apgd-t with 9 targets). FAB-T and Square of the standard suite are not implemented here.
    "pmg-aft": {"eps": 1 / 255, "num_samples": None,
                "attacks": (("pgd", {"alpha": 1 / 255, "steps": 10}), ("apgd-ce", {"steps": 100, "restarts": 1}),
                            ("apgd-t", {"steps": 100, "restarts": 1, "n_target_classes": 9}))},
    # FARE (Schlarmann et al., ICML 2024; chs20/RobustVLM CLIP_benchmark run_classification): AutoAttack
    # version='custom' with (apgd-ce, apgd-t); apgd-ce keeps the constructor's 5 restarts, apgd-t 9 targets,
    # 100 iterations; the first 1000 samples per dataset; eps 2/255 or 4/255 (pass eps=4/255).
    "fare": {"eps": 2 / 255, "num_samples": 1000,
             "attacks": (("apgd-ce", {"steps": 100, "restarts": 5}),
                         ("apgd-t", {"steps": 100, "restarts": 1, "n_target_classes": 9}))},
}


# ----------------------------------------------------------------------------- the attacked classifier
@functools.lru_cache(maxsize=None)
def _zero_shot_forward(config) -> Callable:
    size = config.vision.image_size

    def forward(params, class_weights, scale, pixels01):
        if pixels01.ndim != 4 or tuple(pixels01.shape[1:]) != (size, size, 3):
            raise ValueError(f"pixels must be [B, {size}, {size}, 3] (the model's resolution; nothing is resized "
                             f"inside the attacked forward), got shape {tuple(pixels01.shape)}")
        pixels = standardize(pixels01, config.preprocess).astype(jnp.float32)
        embedding = encode_image(params, pixels, config=config, normalize=True)
        return scale * (embedding @ class_weights.T)

    return forward


def zero_shot_logits_fn(params, config, class_weights, *, scale: float = 100.0, validate: bool = True) -> Partial:
    """The zero-shot classifier an attack differentiates, as a `jax.tree_util.Partial`.

    `logits_fn(pixels01 [B, S, S, 3] in [0, 1]) -> [B, C]` = scale * normalize(encode_image(params,
    (pixels01 - mean) / std)) @ class_weights.T, with the config's CLIP mean/std. The params and weights
    are leaves of the `Partial`, so the jitted attacks take them as arguments (no recompilation per model,
    no weights baked into the program).

    The image must arrive at the model's resolution S = `config.vision.image_size`: clipjax does not
    resize inside the attacked forward, so eps is measured at S. TeCoA, PMG-AFT and TTC resize bicubically
    to 224 inside their forward (`clip_img_preprocessing`), so on CIFAR / STL their eps applies at the
    native 32 / 96 px; to reproduce that, wrap this function with a resize of your choice (torch's bicubic
    uses a = -0.75, `jax.image.resize` a = -0.5).

    Args:
      params: CLIP params (`nnx.State`), as `clipjax.models.clip.encode_image` takes them.
      config: the model's `CLIPConfig` (static).
      class_weights: `[C, E]` unit-norm class embeddings, e.g. the transpose of
        `clipjax.metrics.zeroshot.zeroshot_classifier`'s `[E, C]` over one template or an ensemble.
      scale: the logit scale (the papers use 100 = exp(ln 100)).
      validate: check that concrete weights are finite with unit-norm rows.

    Returns:
      the `Partial` `logits_fn`.
    """
    weights = checks.array("class_weights", class_weights, "[C, E]")
    embed_dim = config.embed_dim if config.embed_dim is not None else config.vision.width
    if weights.shape[1] != embed_dim:
        raise ValueError(f"class_weights must be [C, E] with E = {embed_dim} (the model's embedding size), got "
                         f"shape {tuple(weights.shape)}; zeroshot_classifier returns [E, C]: pass its transpose")
    checks.unit_norm("class_weights", weights, validate=validate,
                     hint=" (each row is a class embedding; zeroshot_classifier returns [E, C]: pass its transpose)")
    checks.positive_scalar("scale", scale)
    return Partial(_zero_shot_forward(config), params, weights.astype(jnp.float32), jnp.asarray(scale, jnp.float32))


# ----------------------------------------------------------------------------- protocols and one batch
def _attack_list(protocol, attack, n_classes, options) -> tuple[tuple[tuple[str, tuple], ...], list[float]]:
    """The attacks to run, as a hashable tuple of (name, sorted static settings), and their PGD steps alpha."""
    if protocol is not None:
        given = sorted(k for k, v in options.items() if v is not None)
        if given:
            raise ValueError(f"{', '.join(given)} cannot be set with protocol={protocol!r} (only eps and "
                             "num_samples can); pass attack=... for custom settings")
        attacks = PROTOCOLS[protocol]["attacks"]
    else:
        def given_or(name, default):
            return default if options[name] is None else options[name]

        pgd_steps, apgd_steps = given_or("steps", 10), given_or("steps", 100)
        restarts, targets = given_or("restarts", 1), given_or("n_target_classes", 9)
        if attack in ("pgd", "pgd-cw"):
            attacks = ((attack, {"alpha": options["alpha"], "steps": pgd_steps}),)
        elif attack == "autoattack":
            attacks = (("apgd-ce", {"steps": apgd_steps, "restarts": restarts}),
                       ("apgd-t", {"steps": apgd_steps, "restarts": 1, "n_target_classes": targets}))
        elif attack == "apgd-t":
            attacks = ((attack, {"steps": apgd_steps, "restarts": restarts, "n_target_classes": targets}),)
        else:
            attacks = ((attack, {"steps": apgd_steps, "restarts": restarts}),)
    out, alphas = [], []
    for name, settings in attacks:
        settings = dict(settings)
        alphas.append(settings.pop("alpha", 0.0))
        if name in _APGD_LOSS:
            checks.positive_int("steps", settings["steps"])
            checks.positive_int("restarts", settings["restarts"])
            if name == "apgd-t":
                # AutoAttack indexes the (n + 1)-th largest logit: with fewer classes, attack all wrong classes
                settings["n_target_classes"] = min(checks.positive_int("n_target_classes",
                                                                       settings["n_target_classes"]), n_classes - 1)
            check_apgd_classes(_APGD_LOSS[name], n_classes, settings.get("n_target_classes", 0))
        else:
            checks.positive_int("steps", settings["steps"])
        out.append((name, tuple(sorted(settings.items()))))
    return tuple(out), alphas


@functools.partial(jax.jit, static_argnames=("attacks", "norm"))
def _evaluate_batch(logits_fn, x, labels, valid, key, eps, alphas, *, attacks, norm):
    """`(clean_correct [B], per-attack correct [A, B])`: PGD rows are correctness on the attacked images,
    APGD rows AutoAttack's cumulative robust flags."""
    clean = (jnp.argmax(logits_fn(x), axis=1) == labels) & valid
    robust_aa, rows = clean, []
    for index, (name, settings) in enumerate(attacks):
        settings = dict(settings)
        key_i = jax.random.fold_in(key, index)
        if name in _APGD_LOSS:
            adv, _ = run_apgd(logits_fn, x, labels, key_i, None, robust_aa, eps, n_iter=settings["steps"],
                              restarts=settings["restarts"], loss=_APGD_LOSS[name], norm=norm, rho=0.75,
                              n_targets=settings.get("n_target_classes", 0))
            robust_aa = robust_aa & (jnp.argmax(logits_fn(adv), axis=1) == labels)
            rows.append(robust_aa)
        else:
            start = _random_start_linf if norm == "linf" else _random_start_l2
            objective = classifier_objective(logits_fn, labels, "cw" if name == "pgd-cw" else "ce")
            adv = _pgd(objective, x, start(key_i, x, eps), eps, alphas[index], steps=settings["steps"], norm=norm)
            rows.append((jnp.argmax(logits_fn(adv), axis=1) == labels) & valid)
    return clean, jnp.stack(rows)


def _batch_shardings(arr, batch_size: int):
    """`(sharding of x batches, sharding of [B] vectors)` for an input sharded over its batch axis, else Nones."""
    sharding = getattr(arr, "sharding", None)
    if not isinstance(sharding, NamedSharding):
        return None, None
    shards = arr.shape[0] // sharding.shard_shape(arr.shape)[0]
    if batch_size % shards:
        raise ValueError(f"batch_size={batch_size} must be divisible by the {shards} shards of x's batch axis")
    return sharding, NamedSharding(sharding.mesh, PartitionSpec(sharding.spec[0] if sharding.spec else None))


def _host_or_device(name: str, arr, shape: str, dtype: str):
    """Check the rank / dtype / sizes of a dataset array without copying it to the device."""
    if not hasattr(arr, "shape") or not hasattr(arr, "dtype"):
        arr = np.asarray(arr)
    checks.array(name, arr[:1] if arr.ndim and arr.shape[0] else arr, shape, dtype=dtype)
    return arr


def _padded(arr, start: int, stop: int, size: int):
    """Rows [start, stop) of `arr`, padded to `size` rows with copies of row 0."""
    xp = jnp if isinstance(arr, jax.Array) else np
    part = arr[start:stop]
    if stop - start < size:
        fill = xp.broadcast_to(arr[:1], (size - (stop - start),) + tuple(arr.shape[1:]))
        part = xp.concatenate([part, fill])
    return part


# ----------------------------------------------------------------------------- robust_accuracy
def robust_accuracy(logits_fn: Callable[[jax.Array], jax.Array], x, labels, key: jax.Array, *,
                    protocol: str | None = None, attack: str | None = None, eps=None, alpha=None,
                    steps: int | None = None, restarts: int | None = None, n_target_classes: int | None = None,
                    norm: str = "linf", num_samples: int | None = None, batch_size: int = 100,
                    validate: bool = True) -> dict[str, Any]:
    """Clean and robust accuracy of `logits_fn` under a named protocol or a single attack.

    Args:
      logits_fn: `[B, H, W, 3]` pixels in [0, 1] -> `[B, C]` logits (e.g. `zero_shot_logits_fn`).
      x: `[N, H, W, 3]` clean pixels in [0, 1] (numpy or jax; a jax array sharded over a mesh's batch axes
        keeps that sharding for every batch).
      labels: `[N]` int true classes in [0, C).
      key: PRNG key for the random starts.
      protocol: a name in `PROTOCOLS` ("tecoa", "ttc", "pmg-aft", "fare"); then only `eps` and
        `num_samples` may be given, and override the protocol's.
      attack: instead of a protocol, one of "pgd" (CE), "pgd-cw" (TeCoA's CW margin), "apgd-ce", "apgd-dlr",
        "apgd-t" or "autoattack" (AutoAttack 'standard' without FAB-T and Square: apgd-ce, then apgd-t).
      eps: radius in pixel units in [0, 1] (required with `attack`).
      alpha: PGD step (default eps, as TTC's eps = alpha = 1/255).
      steps: PGD steps (default 10) or APGD iterations (default 100).
      restarts: APGD-CE/DLR restarts (default 1; "autoattack" applies it to apgd-ce).
      n_target_classes: APGD-T targets (default 9; capped at C - 1).
      norm: "linf" or "l2" (the protocols are L-inf).
      num_samples: attack only the first `num_samples` examples (FARE: 1000).
      batch_size: examples per jitted batch; the last batch is padded (padding is ignored).
      validate: check pixel and label ranges of concrete inputs.

    Returns:
      a dict: `clean_accuracy`, `robust_accuracy` (worst case over all attacks) as floats;
      `clean_correct`, `robust` `[N]` bool numpy arrays; `attack_accuracy` {PGD attack: accuracy on its
      attacked images}; `robust_after` {APGD attack: AutoAttack's cumulative robust accuracy after it};
      `autoattack_accuracy` (the last of those, or None); `eps`, `num_samples`, `protocol`, `attacks`
      (name and settings, in order) and `alphas` (the PGD steps).
    """
    if protocol is not None and attack is not None:
        raise ValueError("give protocol or attack, not both")
    if protocol is None and attack is None:
        raise ValueError(f"give protocol (one of {', '.join(map(repr, PROTOCOLS))}) or attack "
                         f"(one of {', '.join(map(repr, ATTACKS))})")
    if protocol is not None:
        check_choice("protocol", protocol, tuple(PROTOCOLS))
        eps = PROTOCOLS[protocol]["eps"] if eps is None else eps
        num_samples = PROTOCOLS[protocol]["num_samples"] if num_samples is None else num_samples
    else:
        check_choice("attack", attack, ATTACKS)
        if eps is None:
            raise ValueError(f"eps is required with attack={attack!r}")
    norm = check_choice("norm", norm, ("linf", "l2"))
    batch_size = checks.positive_int("batch_size", batch_size)
    x = _host_or_device("x", x, "[N, H, W, C]", "floating")
    labels = _host_or_device("labels", labels, "[N]", "integer")
    if num_samples is not None:
        num_samples = checks.positive_int("num_samples", num_samples)
        x, labels = x[:num_samples], labels[:num_samples]
    n = x.shape[0]
    dtype = jnp.asarray(x[:1]).dtype
    check_radius("eps", eps, dtype)
    eps = float(np.asarray(eps))
    logits_fn = as_partial(logits_fn)
    n_classes = num_classes(logits_fn, jnp.asarray(x[:1]))
    check_labels(labels, n, n_classes, validate=validate)
    if protocol is not None:
        options = {"alpha": alpha, "steps": steps, "restarts": restarts, "n_target_classes": n_target_classes}
    else:
        options = {"alpha": eps if alpha is None else alpha, "steps": steps, "restarts": restarts,
                   "n_target_classes": n_target_classes}
    attacks, alphas = _attack_list(protocol, attack, n_classes, options)
    alphas = jnp.asarray([float(check_radius("alpha", a, dtype, upper=None)) for a in alphas], dtype)

    size = min(batch_size, n)
    x_sharding, row_sharding = _batch_shardings(x, size)
    clean, rows = [], []
    for b, start in enumerate(range(0, n, size)):
        stop = min(start + size, n)
        xb = check_images(_padded(x, start, stop, size), validate=validate)
        yb = jnp.asarray(_padded(labels, start, stop, size))
        valid = jnp.arange(size) < stop - start
        if x_sharding is not None:
            xb = jax.device_put(xb, x_sharding)
            yb, valid = jax.device_put(yb, row_sharding), jax.device_put(valid, row_sharding)
        c, r = _evaluate_batch(logits_fn, xb, yb, valid, jax.random.fold_in(key, b), jnp.asarray(eps, dtype),
                               alphas, attacks=attacks, norm=norm)
        clean.append(np.asarray(c)[:stop - start])
        rows.append(np.asarray(r)[:, :stop - start])
    clean_correct = np.concatenate(clean)
    correct = np.concatenate(rows, axis=1)
    robust = clean_correct & np.all(correct, axis=0)
    names = [name for name, _ in attacks]
    attack_accuracy = {nm: float(correct[i].mean()) for i, nm in enumerate(names) if nm not in _APGD_LOSS}
    robust_after = {nm: float(correct[i].mean()) for i, nm in enumerate(names) if nm in _APGD_LOSS}
    return {
        "clean_accuracy": float(clean_correct.mean()),
        "robust_accuracy": float(robust.mean()),
        "clean_correct": clean_correct,
        "robust": robust,
        "attack_accuracy": attack_accuracy,
        "robust_after": robust_after,
        "autoattack_accuracy": list(robust_after.values())[-1] if robust_after else None,
        "eps": eps,
        "num_samples": n,
        "protocol": protocol,
        "attacks": tuple((nm, dict(s)) for nm, s in attacks),
        "alphas": {nm: float(a) for (nm, _), a in zip(attacks, np.asarray(alphas)) if nm not in _APGD_LOSS},
    }
