"""Robustness and interpretability of the digits CLIP that `make demo` trains, on its 360 held-out images.

1. Clean vs robust zero-shot accuracy over epsilons: PGD-10 (alpha = eps / 4, random start) and
   APGD-CE (AutoAttack's, 100 iterations) on the model's zero-shot classifier (eval templates, the
   model's own logit scale), in [0, 1] pixel space before normalisation (`clipjax.robust`).
2. TTC (test-time counterattacks, its defaults: eps_ttc 4/255, 2 steps, tau 0.2) on the PGD images
   at the TTC paper's eps (1/255) and at 4/255, and on the clean images.
3. A CLIPMasterPrint mined in pixel space with Adam against the 10 class prompts, its fooling
   accuracy on the held-out images, and again after the embedding-shift mitigation.
4. Calibration of the clean logits: ECE (15 bins), NLL, before and after temperature scaling.
5. The TextSpan head decomposition: the mean norm of every head's direct effect on the embedding,
   and the zero-shot accuracy when each layer's attention is mean-ablated (cumulative, as
   compute_ablations.py).
6. TCA token condensation after the first block at several ratios: held-out zero-shot accuracy
   against the image forward's FLOPs (XLA cost analysis). The model has 17 tokens and 2 blocks, so
   TCA's 4 merged + 1 fused tokens only pay off from r = 0.2 (ViT-B/16's layers 3, 6, 9 do not exist).

With `--finetuned WORKDIR` (e.g. `experiments/configs/adversarial.py:tecoa,digits`'s) the robust
accuracy sweep runs for that model too, side by side. Writes OUT/report.json and
robust_accuracy.png, heads.png, master_print.png, and prints a table.

  python experiments/robustness_digits.py --model out/demo [--finetuned out/tecoa] [--out out/robustness]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
EPSILONS = (0.0, 1 / 255, 2 / 255, 4 / 255, 8 / 255)


def load_digits_model(workdir: str):
    """The trained model, the digits source (the demo's split: experiments/configs/digits.py) and the held-out
    images in [0, 1]."""
    import clipjax
    import digits_data

    model = clipjax.load(workdir)
    data_cfg = {"name": "digits", "test_fraction": 0.2, "split_seed": 0}
    src = digits_data.build(data_cfg, model.config, batch_size=64, seed=0)
    split = digits_data.load_split(data_cfg["test_fraction"], data_cfg["split_seed"])
    x01 = digits_data.to_rgb(split.test_images, model.config.vision.image_size).astype(np.float32) / 255.0
    return model, src, x01, split.test_labels.astype(np.int32)


def classifier(model, src) -> np.ndarray:
    """`[C, E]` unit class embeddings: the eval templates' mean, as the demo's zero-shot accuracy."""
    return np.asarray(src.eval_fn.classifier(model.params)).T


def robust_sweep(model, src, x01, labels, key, *, epsilons, apgd_steps: int) -> list[dict]:
    import jax

    from clipjax.robust.evaluate import robust_accuracy, zero_shot_logits_fn

    scale = float(np.exp(np.asarray(model.params["log_logit_scale"][...])))
    logits_fn = zero_shot_logits_fn(model.params, model.config, classifier(model, src), scale=scale)
    rows = []
    for i, eps in enumerate(epsilons):
        row = {"eps": eps, "eps_255": round(eps * 255, 3)}
        if eps == 0:
            r = robust_accuracy(logits_fn, x01, labels, key, attack="pgd", eps=0.0, steps=1)
            row.update(clean=r["clean_accuracy"], pgd=r["clean_accuracy"], apgd_ce=r["clean_accuracy"])
        else:
            k1, k2 = jax.random.split(jax.random.fold_in(key, i))
            pgd = robust_accuracy(logits_fn, x01, labels, k1, attack="pgd", eps=eps, alpha=eps / 4, steps=10)
            apgd = robust_accuracy(logits_fn, x01, labels, k2, attack="apgd-ce", eps=eps, steps=apgd_steps)
            row.update(clean=pgd["clean_accuracy"], pgd=pgd["robust_accuracy"], apgd_ce=apgd["robust_accuracy"])
        rows.append(row)
    return rows


def _embed_fn(model):
    from clipjax.models import clip as F
    from clipjax.preprocess import standardize

    return lambda x: F.encode_image(model.params, standardize(x, model.config.preprocess), config=model.config,
                                    normalize=False)


def ttc_recovery(model, src, x01, labels, key, *, epsilons) -> list[dict]:
    """Accuracy of PGD-10 images (alpha = eps / 4) and of the same images after TTC; TTC on clean images."""
    import jax

    from clipjax.robust.attacks import pgd_classifier
    from clipjax.robust.evaluate import zero_shot_logits_fn
    from clipjax.robust.ttc import tau_thresholded_counterattack

    scale = float(np.exp(np.asarray(model.params["log_logit_scale"][...])))
    logits_fn = zero_shot_logits_fn(model.params, model.config, classifier(model, src), scale=scale)
    embed = _embed_fn(model)
    acc = lambda x: float(np.mean(np.argmax(np.asarray(logits_fn(x)), 1) == labels))  # noqa: E731
    defend = jax.jit(lambda x, k: tau_thresholded_counterattack(embed, x, k)[0])
    rows = []
    for i, eps in enumerate(epsilons):
        k1, k2 = jax.random.split(jax.random.fold_in(key, 100 + i))
        x_adv = x01 if eps == 0 else pgd_classifier(logits_fn, x01, labels, k1, eps=eps, alpha=eps / 4, steps=10)
        rows.append({"eps": eps, "eps_255": round(eps * 255, 3), "attacked": acc(x_adv),
                     "ttc": acc(defend(x_adv, k2))})
    return rows


def master_print(model, src, x01, labels, key, *, steps: int) -> dict:
    import jax.numpy as jnp

    from clipjax.robust import fooling

    embed = _embed_fn(model)
    text = jnp.asarray(classifier(model, src))
    image, losses = fooling.mine_pixels(embed, text, key, image_size=model.config.vision.image_size, steps=steps)
    img_emb, cmp_emb = embed(jnp.asarray(x01)), embed(image[None])[0]
    rand_emb = embed(jnp.full_like(image, 0.5)[None])[0]
    unit = lambda v: v / jnp.linalg.norm(v, axis=-1, keepdims=True)  # noqa: E731
    own = jnp.sum(unit(img_emb) * text[jnp.asarray(labels)], axis=-1)  # each image's cosine to its class
    out = {"steps": steps, "final_loss": float(np.min(np.asarray(losses))),
           "print_min_class_cosine": -float(np.min(np.asarray(losses))),
           "image_own_class_cosine_mean": float(own.mean()), "image_own_class_cosine_min": float(own.min()),
           "fooling_accuracy": float(fooling.fooling_accuracy(text, cmp_emb, img_emb, labels)),
           "fooling_accuracy_grey_image": float(fooling.fooling_accuracy(text, rand_emb, img_emb, labels))}
    # the mitigation: shift both modalities by a quarter of the gap (here the raw class-embedding gap)
    from clipjax.models import clip as F

    raw_text = F.encode_text(model.params, src.eval_fn.tokenizer(src.eval_fn.classnames), config=model.config,
                             normalize=False)
    gap = fooling.embedding_gap(img_emb, raw_text)
    img_s, text_s = fooling.shift_embeddings(img_emb, text, gap)
    cmp_s, _ = fooling.shift_embeddings(cmp_emb[None], text, gap)
    out["fooling_accuracy_shifted"] = float(fooling.fooling_accuracy(text_s, cmp_s[0], img_s, labels))
    return out, np.asarray(image)


def calibration(model, src, x01, labels) -> dict:
    from clipjax.metrics import calibration_report
    from clipjax.robust.evaluate import zero_shot_logits_fn

    scale = float(np.exp(np.asarray(model.params["log_logit_scale"][...])))
    logits = zero_shot_logits_fn(model.params, model.config, classifier(model, src), scale=scale)(x01)
    return {k: float(v) for k, v in calibration_report(np.asarray(logits), labels).items()}


def head_effects(model, src, x01, labels) -> tuple[np.ndarray, list[float]]:
    """`[L, H]` mean norm of each head's direct effect; zero-shot accuracy per cumulative layer ablation."""
    import jax.numpy as jnp

    from clipjax.interpret.decompose import decompose_image, mean_ablation_sweep
    from clipjax.preprocess import standardize

    cfg = model.config
    pixels = standardize(jnp.asarray(x01), cfg.preprocess)
    parts = decompose_image(model.params, pixels, config=cfg, level="head")
    norms = np.asarray(jnp.linalg.norm(parts["attn"], axis=-1).mean(0))  # [L, H]
    w = classifier(model, src)
    sweep = np.asarray(mean_ablation_sweep(decompose_image(model.params, pixels, config=cfg, level="layer")))
    accs = [float(np.mean(np.argmax(s @ w.T, 1) == labels)) for s in sweep]
    return norms, accs


def token_condensation(model, src, x01, labels, ratios=(0.0, 0.1, 0.2, 0.25)) -> list[dict]:
    """TCA after block 0 (`clipjax.interpret.tca`): accuracy and FLOPs per ratio."""
    import jax
    import jax.numpy as jnp

    from clipjax.interpret.tca import forward_flops, tca_forward
    from clipjax.preprocess import standardize

    cfg = model.config
    pixels = standardize(jnp.asarray(x01), cfg.preprocess)
    w = classifier(model, src)
    rows = []
    for r in ratios:
        out = jax.jit(lambda p, x: tca_forward(p, x, config=cfg, layers=(0,), ratio=r))(model.params, pixels)
        emb = np.asarray(out.embedding)
        flops = forward_flops(cfg, batch=1, layers=(0,), ratio=r)
        rows.append({"ratio": r, "tokens": [int(t) for t in out.token_counts],
                     "accuracy": float(np.mean(np.argmax(emb @ w.T, 1) == labels)),
                     "flops": flops["tca"], "flops_ratio": flops["ratio"]})
    return rows


def plot(report: dict, image: np.ndarray, norms: np.ndarray, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, rows in report["robust_accuracy"].items():
        e = [r["eps_255"] for r in rows]
        ax.plot(e, [r["pgd"] for r in rows], "o-", label=f"{name}: PGD-10")
        ax.plot(e, [r["apgd_ce"] for r in rows], "s--", label=f"{name}: APGD-CE")
    ax.set_xlabel("eps (x 1/255, L-inf)")
    ax.set_ylabel("held-out zero-shot accuracy")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "robust_accuracy.png"), dpi=120)
    plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(7, 3))
    im = axes[0].imshow(norms, cmap="viridis")
    axes[0].set_xlabel("head")
    axes[0].set_ylabel("layer")
    axes[0].set_title("mean |direct effect|", fontsize=9)
    fig.colorbar(im, ax=axes[0])
    acc = report["heads"]["ablation_accuracy"]
    axes[1].plot(range(len(acc)), acc, "o-")
    axes[1].set_xlabel("attention layers mean-ablated")
    axes[1].set_ylabel("zero-shot accuracy")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "heads.png"), dpi=120)
    plt.close(fig)
    plt.imsave(os.path.join(out, "master_print.png"), np.clip(image, 0, 1))


def main(argv=None) -> dict:
    import jax

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="out/demo", help="the digits training workdir (make demo's out/demo)")
    p.add_argument("--finetuned", help="an adversarially fine-tuned workdir to compare (adversarial.py:...,digits)")
    p.add_argument("--out", default="out/robustness")
    p.add_argument("--epsilons", default=",".join(f"{e * 255:g}" for e in EPSILONS), help="in units of 1/255")
    p.add_argument("--apgd-steps", type=int, default=100)
    p.add_argument("--print-steps", type=int, default=500, help="Adam steps of the master-print mining")
    p.add_argument("--limit", type=int, help="only the first N held-out images")
    p.add_argument("--tca-ratios", default="0,0.1,0.2,0.25", help="TCA condensation ratios after block 0")
    args = p.parse_args(argv)
    for w in filter(None, (args.model, args.finetuned)):
        if not os.path.exists(os.path.join(w, "clipjax.json")):
            raise SystemExit(f"{w} is not a training workdir (no clipjax.json): run `make demo` first")
    epsilons = [float(e) / 255 for e in args.epsilons.split(",")]
    os.makedirs(args.out, exist_ok=True)
    key = jax.random.key(0)
    t0 = time.perf_counter()
    model, src, x01, labels = load_digits_model(args.model)
    if args.limit:
        x01, labels = x01[:args.limit], labels[:args.limit]
    report = {"model": os.path.abspath(args.model), "num_images": int(len(labels)),
              "robust_accuracy": {"demo": robust_sweep(model, src, x01, labels, key, epsilons=epsilons,
                                                       apgd_steps=args.apgd_steps)}}
    if args.finetuned:
        ft, ft_src, _, _ = load_digits_model(args.finetuned)
        report["finetuned"] = os.path.abspath(args.finetuned)
        report["robust_accuracy"]["finetuned"] = robust_sweep(ft, ft_src, x01, labels, key, epsilons=epsilons,
                                                              apgd_steps=args.apgd_steps)
    report["ttc"] = ttc_recovery(model, src, x01, labels, key, epsilons=[0.0, 1 / 255, 4 / 255])
    report["master_print"], image = master_print(model, src, x01, labels, key, steps=args.print_steps)
    report["calibration"] = calibration(model, src, x01, labels)
    norms, accs = head_effects(model, src, x01, labels)
    report["heads"] = {"mean_effect_norm": norms.round(5).tolist(), "ablation_accuracy": accs}
    report["tca"] = token_condensation(model, src, x01, labels, [float(r) for r in args.tca_ratios.split(",")])
    report["seconds"] = time.perf_counter() - t0
    plot(report, image, norms, args.out)
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(summary(report))
    print(f"report: {os.path.join(args.out, 'report.json')}; plots: robust_accuracy.png, heads.png, "
          f"master_print.png in {args.out}")
    return report


def summary(report: dict) -> str:
    lines = ["| model | eps (/255) | clean | PGD-10 | APGD-CE |", "|---|---|---|---|---|"]
    for name, rows in report["robust_accuracy"].items():
        for r in rows:
            lines.append(f"| {name} | {r['eps_255']:g} | {r['clean']:.3f} | {r['pgd']:.3f} | {r['apgd_ce']:.3f} |")
    lines += ["", "| TTC, eps (/255) | PGD-10 accuracy | after TTC |", "|---|---|---|"]
    lines += [f"| {r['eps_255']:g} | {r['attacked']:.3f} | {r['ttc']:.3f} |" for r in report["ttc"]]
    m = report["master_print"]
    c = report["calibration"]
    lines += ["", f"master print: its lowest cosine to a class prompt {m['print_min_class_cosine']:.3f}; held-out "
              f"images to their own class: mean {m['image_own_class_cosine_mean']:.3f}, min "
              f"{m['image_own_class_cosine_min']:.3f}",
              f"master print: fooling accuracy {m['fooling_accuracy']:.3f} (grey image "
              f"{m['fooling_accuracy_grey_image']:.3f}; after the gap shift {m['fooling_accuracy_shifted']:.3f})",
              f"calibration: ECE {c['ece']:.3f} -> {c['ece_scaled']:.3f}, NLL {c['nll']:.3f} -> {c['nll_scaled']:.3f} "
              f"(temperature {c['temperature']:.3f})",
              f"mean-ablating attention layers 0..k: accuracy {report['heads']['ablation_accuracy']}", "",
              "| TCA ratio (after block 0) | tokens per block | accuracy | FLOPs vs plain |", "|---|---|---|---|"]
    lines += [f"| {r['ratio']:g} | {r['tokens']} | {r['accuracy']:.3f} | {r['flops_ratio']:.3f} |"
              for r in report["tca"]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
