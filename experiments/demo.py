"""End-to-end demo: PyTorch model -> clipjax checkpoint -> embeddings of real photos and captions.

1. Builds an open_clip ViT-B-32 offline (random weights: no weights can be downloaded here) and saves
   it as .safetensors, as a user's checkpoint would be.
2. Converts it with `clipjax.convert.api.convert` (the same code as `clipjax convert SRC OUT`).
3. Loads it with `clipjax.load`, embeds real photos (scikit-image) and captions, prints the
   image-text similarity table, and the max abs difference against open_clip on the same inputs.

Usage: python experiments/demo.py [--arch ViT-B-32] [--out out/demo]
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

import numpy as np

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
CAPTIONS = ("an astronaut in a space suit", "a ginger cat", "a cup of coffee", "a rocket on the launch pad")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="ViT-B-32")
    ap.add_argument("--out", default="out/demo")
    args = ap.parse_args()

    import open_clip
    import skimage.data
    import torch
    from safetensors.torch import save_file

    import clipjax
    from clipjax.convert.api import convert

    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    ref = open_clip.create_model(args.arch, pretrained=None).eval()
    src = os.path.join(args.out, f"{args.arch}.safetensors")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, src)
    print(f"[1] open_clip {args.arch} (random init) saved to {src}")

    dst = os.path.join(args.out, f"{args.arch}-clipjax")
    shutil.rmtree(dst, ignore_errors=True)
    convert(src, dst)
    print(f"[2] converted to clipjax checkpoint {dst}")

    model = clipjax.load(dst)
    photos = [getattr(skimage.data, n)() for n in PHOTOS]
    pixels = model.preprocess(photos)
    ids = model.tokenize(list(CAPTIONS))
    img = np.asarray(model.encode_image(pixels))
    txt = np.asarray(model.encode_text(ids))
    sim = img @ txt.T
    print(f"[3] loaded; embedded {len(photos)} photos {pixels.shape} and {len(CAPTIONS)} captions {ids.shape}")
    print("\ncosine similarity (rows: photos, columns: captions; random weights, so no semantics)")
    print(" " * 12 + "".join(f"{c[:14]:>16}" for c in CAPTIONS))
    for name, row in zip(PHOTOS, sim):
        print(f"{name:>12}" + "".join(f"{v:16.4f}" for v in row))

    with torch.no_grad():
        tp = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
        r_img = ref.encode_image(tp, normalize=True).numpy()
        r_txt = ref.encode_text(torch.from_numpy(ids).long(), normalize=True).numpy()
        tok_ref = open_clip.get_tokenizer(args.arch)(list(CAPTIONS)).numpy()
    d_img, d_txt = float(np.abs(img - r_img).max()), float(np.abs(txt - r_txt).max())
    print("\nparity against open_clip (fp32, same inputs):")
    print(f"  image embeddings  max |diff| = {d_img:.2e}")
    print(f"  text embeddings   max |diff| = {d_txt:.2e}")
    print(f"  token ids identical to open_clip's tokenizer: {bool((tok_ref == ids).all())}")
    print(f"\ndone in {time.perf_counter() - t0:.1f} s")
    if max(d_img, d_txt) > 1e-5 or not (tok_ref == ids).all():
        raise SystemExit("parity check failed")


if __name__ == "__main__":
    main()
