"""SigLIP ViT-B/16 (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training").

Sources: the paper: sigmoid loss with learnable temperature t' (t = exp(t'), init t' = log 10) and
bias b (init -10); batch 32k; AdamW-style decoupled decay with lr 1e-3 and weight decay 1e-4;
beta2 lowered from 0.999 to 0.95 to stabilise large-batch training; the B/16 tower shapes are
`ViT-B-16-SigLIP` (map-pool head, no vision projection, 64-token text, 32k SentencePiece vocab).
big_vision's siglip configs clip gradients at global norm 1.0. Not given in the brief, assumed
here: Adam eps 1e-8 (optax's default, used by big_vision), a warm-up of 5,000 steps, a cosine
schedule and 9B examples seen (one of the lengths the paper reports for B/16; the released
checkpoints saw up to 40B): 9e9 / 32768 = 274,658 steps.

Not runnable here: the `webli` source is not provided (the SigLIP tokenizer also needs the HF hub).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

BATCH = 32768
EXAMPLES_SEEN = 9_000_000_000


def get_config(arg=None):
    c = common.base_config(
        loss="siglip",
        batch_size=BATCH,
        total_steps=EXAMPLES_SEEN // BATCH,
        lr=1e-3,
        warmup_steps=5000,
        schedule="cosine",
        weight_decay=1e-4,
        beta1=0.9,
        beta2=0.95,
        eps=1e-8,
        grad_clip_norm=1.0,
        max_log_logit_scale=100.0,  # SigLIP does not clamp t' (open_clip's ln(100) clamp would bind at t = 100)
        dtype="bfloat16",
        log_every=100,
        checkpoint_every=2000,
        eval_every=0,
    )
    c.model.name = "ViT-B-16-SigLIP"  # init_log_logit_scale = log 10, init_logit_bias = -10 (the paper's init)
    c.mesh.data = -1
    c.data = {"name": "webli"}
    return c
