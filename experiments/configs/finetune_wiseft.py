"""Contrastive fine-tuning of a converted CLIP, then WiSE-FT weight interpolation.

Sources: WiSE-FT (Wortsman et al. 2022, "Robust fine-tuning of zero-shot models"): end-to-end
fine-tuning of CLIP on ImageNet with AdamW, lr 3e-5, weight decay 0.1, batch 512, 10 epochs,
500 warm-up steps, cosine schedule; the robust model is theta = (1 - alpha) theta_0 + alpha theta_1
with alpha = 0.5 as the default mixing. The loss here is contrastive on (image, class-prompt
caption) pairs as in FLYP (Goyal et al. 2023, "Finetune like you pretrain"), which WiSE-FT's
interpolation applies to unchanged. 10 * (1,281,167 // 512) = 25,020 steps.

After training, `experiments/train.py` saves `WORKDIR/wise_ft_alpha0.5` (a clipjax checkpoint,
`clipjax.load`-able) from `init_from` (theta_0) and the fine-tuned params (theta_1).

  python experiments/train.py --config experiments/configs/finetune_wiseft.py \
      --config.init_from=ckpt/ViT-B-16 --workdir w
Not runnable here: the `imagenet_captions` source is not provided by experiments/train.py yet.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

IMAGENET_TRAIN = 1_281_167
BATCH = 512


def get_config(arg=None):
    c = common.base_config(
        loss="clip",
        batch_size=BATCH,
        total_steps=common.steps_for_epochs(10, IMAGENET_TRAIN, BATCH),
        lr=3e-5,
        warmup_steps=500,
        schedule="cosine",
        weight_decay=0.1,
        log_every=100,
        checkpoint_every=2500,
        eval_every=0,
    )
    c.model.name = arg or "ViT-B-16"  # must be the architecture of init_from
    c.init_towers = "both"
    c.wise_ft_alpha = 0.5
    c.mesh.data = -1
    c.data = {"name": "imagenet_captions"}
    return c
