"""LiT: locked-image text tuning (Zhai et al. 2022, "LiT: Zero-Shot Transfer with Locked-image text Tuning").

Source: big_vision `configs/proj/image_text/lit_coco.py` (the released LiT recipe on COCO
captions): batch 4096, 5,000 steps, lr 1e-3, cosine with warm-up max(3% of steps, 100) = 150,
gradient clipping at norm 1.0, temperature init 10, image tower frozen (schedule None for
`img/.*`). Its `wd = 0.01` is big_vision's decoupled decay; here it is AdamW's (multiplied by
the lr), so treat 0.01 as a starting point. big_vision's Adam uses beta2 0.999 and eps 1e-8.

The image tower comes from a converted checkpoint (`clipjax convert ...`) through `init_from` and is
locked (`lock_image`). `init_towers="both"` also starts the text tower from the checkpoint (the
paper's "LU" setting); `lit.py:scratch_text` trains a fresh text tower and logit scale ("Lu").
The architecture defaults to ViT-B-32 and must match the checkpoint:

  clipjax convert ViT-B-32.pt ckpt/ViT-B-32
  python experiments/train.py --config experiments/configs/lit.py --config.init_from=ckpt/ViT-B-32 --workdir w
Not runnable here: the `coco_captions` source is not provided by experiments/train.py yet.
"""

import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def get_config(arg=None):
    if arg not in (None, "", "scratch_text"):
        raise ValueError(f"lit.py: unknown argument {arg!r}; expected nothing or 'scratch_text'")
    steps = 5000
    c = common.base_config(
        loss="clip",
        batch_size=4096,
        total_steps=steps,
        lr=1e-3,
        warmup_steps=max(int(0.03 * steps), 100),
        schedule="cosine",
        weight_decay=0.01,
        beta1=0.9,
        beta2=0.999,
        eps=1e-8,
        grad_clip_norm=1.0,
        lock_image=True,
        log_every=50,
        checkpoint_every=1000,
        eval_every=0,
    )
    c.model.name = "ViT-B-32"
    c.model.overrides = {"init_log_logit_scale": math.log(10.0)}  # used where the logit scale starts fresh
    c.init_towers = "image" if arg == "scratch_text" else "both"
    c.mesh.data = -1
    c.data = {"name": "coco_captions"}
    return c
