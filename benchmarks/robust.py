"""Adversarial images per second: clipjax's PGD and APGD-CE against torchattacks 3.5.1, same model and images.

The attacked classifier: the open_clip `--model` (default ViT-B-32) with random weights (built offline
with `open_clip.create_model(..., pretrained=None)`, `torch.manual_seed(0)`) and the same weights converted
in memory by clipjax; 10 class prompts ("a photo of a {c}.") embedded once by clipjax's text tower give the
`[C, E]` class weights both libraries use; logits = 100 * normalize(encode_image((x - mean) / std)) @ W.T.
Images: scikit-image photos through the model's eval transform without mean/std (`clipjax.cli.robust.
unit_pixels`: [0, 1] pixels at the model's resolution), cycled to `--batch-size`. Labels: the clean
predictions, so every example is correctly classified and both APGDs attack the whole batch (APGD only
attacks the correct ones).

Attacks, L-inf, eps `--eps` (4/255):
* PGD: `--pgd-steps` (10) steps of alpha 1/255 with a random start: `clipjax.robust.pgd_classifier` vs
  `torchattacks.PGD` (CE loss; the sum vs the batch mean: the same sign steps).
* APGD-CE: `--apgd-steps` (100) iterations, 1 restart: `clipjax.robust.apgd` vs `torchattacks.APGD(loss='ce')`.
One call = the whole attack on one batch (clipjax: `block_until_ready`; torch: on the host, or after
`cuda.synchronize`). Calls interleave clipjax, torch, clipjax, torch, ... (`--pairs` pairs; the machines
drift, so each pair's ratio is taken on its own) after one warm-up call each (compilation excluded). The
table gives adversarial images per second (batch / median call time) and the ratio torch time / clipjax
time (> 1: clipjax is faster), median [min, max] over the pairs, and each library's accuracy on its own
adversarial images (a check that both attacks work; random init, so the values mean little).
Both run float32; on CPU torch uses `torch.set_num_threads(os.cpu_count())` and XLA its default thread
pool (all cores); with a GPU both run on it.

Usage: python benchmarks/robust.py [--model ViT-B-32] [--batch-size 16] [--pairs 5] [--pgd-steps 10]
                                   [--apgd-steps 100] [--eps 4/255] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
from fractions import Fraction

import numpy as np

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "moon", "hubble_deep_field", "page")
CLASSES = ("astronaut", "cat", "cup of coffee", "rocket", "camera", "coin", "moon", "galaxy", "page of text", "dog")


def photos(count: int) -> list[np.ndarray]:
    """`count` scikit-image photos (uint8 [H, W, 3]), cycling through `PHOTOS` (mirrored on later rounds)."""
    from skimage import color, data

    base = []
    for name in PHOTOS:
        im = getattr(data, name)()
        base.append(color.gray2rgb(im) if im.ndim == 2 else im[..., :3])
    return [base[i % len(base)] if (i // len(base)) % 2 == 0 else base[i % len(base)][:, ::-1]
            for i in range(count)]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-32", help="open_clip model name (random init)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--pairs", type=int, default=5, help="interleaved clipjax / torch pairs per attack")
    ap.add_argument("--pgd-steps", type=int, default=10)
    ap.add_argument("--apgd-steps", type=int, default=100)
    ap.add_argument("--eps", default="4/255")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import torch
    import torchattacks
    from train_step import interleaved

    from clipjax.cli.robust import unit_pixels
    from clipjax.models import clip as F
    from common import open_clip_pair
    from clipjax.robust import apgd, pgd_classifier, zero_shot_logits_fn
    from clipjax.tokenizer import Tokenizer

    eps, alpha = float(Fraction(args.eps)), 1 / 255
    torch.set_num_threads(os.cpu_count())
    gpu = jax.default_backend() == "gpu" and torch.cuda.is_available()
    dev = "cuda" if gpu else "cpu"

    ref, cfg, params = open_clip_pair(args.model, dev)

    ids = Tokenizer.openai(context_length=cfg.text.context_length)([f"a photo of a {c}." for c in CLASSES])
    weights = np.array(F.encode_text(params, jnp.asarray(ids), config=cfg, normalize=True), np.float32)  # [C, E]
    logits_fn = zero_shot_logits_fn(params, cfg, weights)
    x = unit_pixels(photos(args.batch_size), cfg)  # [B, S, S, 3] in [0, 1]
    xj = jnp.asarray(x)
    labels = np.array(jnp.argmax(logits_fn(xj), axis=1), np.int32)
    yj = jnp.asarray(labels)

    class ZeroShot(torch.nn.Module):
        """open_clip's image tower as the same zero-shot classifier of [0, 1] NCHW pixels."""

        def __init__(self):
            super().__init__()
            self.model = ref
            self.register_buffer("weights", torch.from_numpy(weights))
            self.register_buffer("mean", torch.tensor(cfg.preprocess.mean, dtype=torch.float32).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(cfg.preprocess.std, dtype=torch.float32).view(1, 3, 1, 1))

        def forward(self, pixels):
            emb = self.model.encode_image((pixels - self.mean) / self.std)
            return 100.0 * torch.nn.functional.normalize(emb, dim=-1) @ self.weights.T

    victim = ZeroShot().eval().to(dev)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(dev)
    yt = torch.from_numpy(labels).long().to(dev)
    with torch.no_grad():
        torch_agree = float((victim(xt).argmax(1) == yt).float().mean())
    key = jax.random.key(0)

    def run_torch(attack):
        def run():
            out = attack(xt, yt)
            if gpu:
                torch.cuda.synchronize()
            return out
        return run

    attacks = {
        f"PGD-{args.pgd_steps}": (
            lambda: pgd_classifier(logits_fn, xj, yj, key, eps=eps, alpha=alpha, steps=args.pgd_steps),
            run_torch(torchattacks.PGD(victim, eps=eps, alpha=alpha, steps=args.pgd_steps, random_start=True))),
        f"APGD-CE-{args.apgd_steps}": (
            lambda: apgd(logits_fn, xj, yj, key, eps=eps, steps=args.apgd_steps, restarts=1, loss="ce"),
            run_torch(torchattacks.APGD(victim, norm="Linf", eps=eps, steps=args.apgd_steps, n_restarts=1,
                                        loss="ce", seed=0))),
    }
    rows = []
    for name, (ours, theirs) in attacks.items():
        r = interleaved(lambda: ours().block_until_ready(), theirs, args.pairs)
        adv_ours, adv_theirs = ours(), theirs()
        with torch.no_grad():
            torch_acc = float((victim(adv_theirs).argmax(1) == yt).float().mean())
            torch_max_perturbation = float((adv_theirs - xt).abs().max())
        r.update(attack=name, batch=args.batch_size, eps=eps,
                 clipjax_images_per_s=args.batch_size / r["clipjax_s"],
                 torch_images_per_s=args.batch_size / r["torch_s"],
                 clipjax_adversarial_accuracy=float(jnp.mean(jnp.argmax(logits_fn(adv_ours), 1) == yj)),
                 torch_adversarial_accuracy=torch_acc,
                 clipjax_max_perturbation=float(jnp.max(jnp.abs(adv_ours - xj))),
                 torch_max_perturbation=torch_max_perturbation)
        rows.append(r)
        print(f"{name}: clipjax {r['clipjax_s']:.2f} s, torch {r['torch_s']:.2f} s per call (medians)", flush=True)

    device = jax.devices()[0].device_kind if gpu else f"CPU ({os.cpu_count()} cores), torch threads " \
                                                       f"{torch.get_num_threads()}"
    print(f"{args.model} (random init), batch {args.batch_size}, eps {args.eps}, {device}; ratio = torch time / "
          f"clipjax time, median [min, max] of {args.pairs} interleaved pairs")
    print(f"{'attack':<14}{'clipjax img/s':>14}{'torch img/s':>12}{'ratio':>7}{'  [min, max]':<15}"
          f"{'adv. acc clipjax':>17}{'torch':>7}")
    for r in rows:
        print(f"{r['attack']:<14}{r['clipjax_images_per_s']:14.2f}{r['torch_images_per_s']:12.2f}"
              f"{r['ratio_median']:7.2f}  [{r['ratio_min']:.2f}, {r['ratio_max']:.2f}]  "
              f"{r['clipjax_adversarial_accuracy']:15.2f}{r['torch_adversarial_accuracy']:7.2f}")

    from common import machine_info, write_result

    result = dict(benchmark="robust", model=args.model, batch=args.batch_size, eps=eps, alpha=alpha,
                  torch_threads=torch.get_num_threads(), torch_clean_agreement=torch_agree, rows=rows,
                  device=device, machine=machine_info(("open_clip_torch", "torchattacks"), argv))
    write_result(result, f"robust-{args.model}-{'gpu' if gpu else 'cpu'}.json", args.out)
    return result


if __name__ == "__main__":
    main()
