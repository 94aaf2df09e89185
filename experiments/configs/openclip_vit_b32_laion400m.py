"""open_clip's ViT-B/32 on LAION-400M (the `laion400m_e32` weights, ImageNet zero-shot 62.96%).

Sources: open_clip docs/PRETRAINED.md ("ViT-B/32 was trained with 128 A100 (40 GB) GPUs ... per-GPU
batch size 256 for a global batch size of 32768"; 32 epochs, the `_e32` tag); the released weights
are `ViT-B-32-quickgelu` (open_clip `pretrained.py` lists laion400m_e31/e32 under that name).
lr 5e-4, weight decay 0.2, 2,000 warm-up steps, AMP: the values given for this run in the
project brief (open_clip's README recipe for LAION-400M; check against Cherti et al. 2023,
"Reproducible scaling laws", appendix, before relying on them). AdamW betas/eps are open_clip's
ViT defaults (0.9, 0.98, 1e-6), already TrainConfig's. An epoch is 407M samples (LAION-400M as
downloaded), so total_steps = 32 * (407M // 32768) = 397,440.

Data: img2dataset tar shards through `clipjax.data` (open_clip's train transform, 8 decode workers
per host); point `--config.data.source` at your shards.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

SAMPLES_PER_EPOCH = 407_000_000
EPOCHS = 32
BATCH = 32768


def get_config(arg=None):
    c = common.base_config(
        loss="clip",
        batch_size=BATCH,
        total_steps=common.steps_for_epochs(EPOCHS, SAMPLES_PER_EPOCH, BATCH),
        lr=5e-4,
        warmup_steps=2000,
        schedule="cosine",
        weight_decay=0.2,
        beta1=0.9,
        beta2=0.98,
        eps=1e-6,
        dtype="bfloat16",  # open_clip --precision amp: bf16 compute, fp32 master params
        param_dtype="float32",
        log_every=100,
        checkpoint_every=2000,
        eval_every=0,
        keep_checkpoints=3,
    )
    c.model.name = "ViT-B-32-quickgelu"
    c.mesh.data = -1
    c.data = {"name": "files", "source": "laion400m/{00000..41455}.tar", "num_workers": 8}
    return c
