"""Zero-shot OOD detection with a CLIP trained here: digits 0-4 in distribution, 5-9 out.

1. Trains the digits CLIP (experiments/configs/digits.py) on the digits 0-4 only, with
   experiments/train.py's `run` (resumes if WORKDIR already holds the run).
2. Embeds the held-out 0-4 images (ID) and every 5-9 image (OOD: never seen, nor their names: the
   remapped vocabulary holds only the training captions' tokens).
3. Scores them with `clipjax.ood` against the ID label embeddings (the 5 classes' eval prompts,
   template-averaged): MCM (T = 1, the paper's), GL-MCM (MaskCLIP patch embeddings), MSP,
   max-logit and energy on the model's own logits (its learned scale, ~14; CLIP's fixed 100 would
   saturate the softmax of a model whose cosines spread over [-0.3, 0.8]).
4. Prints AUROC and FPR95 (OpenOOD's and the MCM/Hendrycks convention) and writes WORKDIR/ood.json.

  python experiments/ood_digits.py [--workdir out/ood_digits] [--steps 1000]

NegLabel / AdaNeg / CLIPN are left out: they need a word list or a "no" text tower that a model
with a 35-token vocabulary does not have.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
ID_CLASSES = (0, 1, 2, 3, 4)
OOD_CLASSES = (5, 6, 7, 8, 9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="out/ood_digits")
    ap.add_argument("--steps", type=int, default=1000)
    args = ap.parse_args()

    import jax.numpy as jnp

    import clipjax
    import clipjax.ood as ood
    import digits_data as D
    import train as T
    from configs import digits

    config = digits.get_config()
    config.total_steps = args.steps
    config.data.classes = list(ID_CLASSES)
    config.report.enabled = False
    T.run(config, args.workdir)

    model = clipjax.load(args.workdir)
    mc = model.config
    d = config.to_dict()
    src = D.build(d["data"], mc, d["batch_size"], d["seed"])
    ev = src.eval_fn  # held-out ID images, eval templates, the (remapped) tokenizer
    id_acc = ev(model.params)["zero_shot_accuracy"]
    ood_split = D.load_split(0.5, 0, OOD_CLASSES)
    ood_images = np.concatenate([ood_split.train_images, ood_split.test_images])
    ood_pixels = D.normalize(D.to_rgb(ood_images, mc.vision.image_size), mc)

    text = np.asarray(ev.classifier(model.params)).T  # [5, D] ID label embeddings
    scale = model.logit_scale

    def embed(pixels):
        return np.asarray(model.encode_image(pixels)), np.asarray(model.encode_dense(pixels))

    (id_g, id_l), (ood_g, ood_l) = embed(ev.pixels), embed(ood_pixels)

    def scores(g, loc):
        logits = scale * (g @ text.T)
        return {
            "MCM (T=1)": ood.mcm(g, text),
            "GL-MCM (T=1, lambda=0.5)": ood.gl_mcm(g, loc, text, lambda_local=0.5),
            "MSP": ood.msp(jnp.asarray(logits)),
            "max-logit": ood.max_logit(jnp.asarray(logits)),
            "energy": ood.energy(jnp.asarray(logits)),
        }

    s_id, s_ood = scores(id_g, id_l), scores(ood_g, ood_l)
    rows = {}
    for name in s_id:
        m = ood.ood_metrics(np.asarray(s_id[name]), np.asarray(s_ood[name]))
        near = ood.ood_metrics(np.asarray(s_id[name]), np.asarray(s_ood[name]), convention="nearest")
        rows[name] = {"auroc": m["auroc"], "fpr95_openood": m["fpr"], "fpr95_nearest": near["fpr"]}
    out = {"id_classes": list(ID_CLASSES), "ood_classes": list(OOD_CLASSES), "num_id": len(id_g),
           "num_ood": len(ood_g), "id_zero_shot_accuracy": id_acc, "logit_scale": scale, "scores": rows}
    with open(os.path.join(args.workdir, "ood.json"), "w") as f:
        json.dump(out, f, indent=2)
    print(f"\nID: held-out digits {ID_CLASSES} ({len(id_g)} images, zero-shot accuracy {id_acc:.3f}); "
          f"OOD: all digits {OOD_CLASSES} ({len(ood_g)} images)")
    print(f"{'score':<26}{'AUROC':>8}{'FPR95':>8}{'FPR95*':>8}")
    for name, r in rows.items():
        print(f"{name:<26}{r['auroc']:>8.3f}{r['fpr95_openood']:>8.3f}{r['fpr95_nearest']:>8.3f}")
    print("FPR95: OpenOOD convention (ID flagged OOD at 95% OOD recall); FPR95*: MCM/Hendrycks "
          f"(OOD accepted at 95% ID recall). {os.path.join(args.workdir, 'ood.json')}")


if __name__ == "__main__":
    main()
