"""CLOOB on ResNet-50 (Fürst et al. 2022, "CLOOB: Modern Hopfield Networks with InfoLOOB Outperform CLIP").

Source: ml-jku/cloob README's Conceptual Captions command (RN50, 4 GPUs x 128 = batch 512,
lr 1e-3, wd 0.1, warm-up 20,000, 70 epochs, --init-inv-tau=30, --scale-hopfield=8) and
/work/shared/reference/methods.md §16 (params.py defaults 1/tau 14.3 and beta 14.3; the learnable
log 1/tau is clamped at ln 100). Differences: the README uses "cosine-restarts" with 10 cycles;
clipjax has cosine / const / const-cooldown, so this is plain cosine. CC has 2.89M training pairs
(fewer once downloaded): total_steps = 70 * (2.89M // 512) = 395,080.

`python experiments/train.py --config experiments/configs/cloob_rn50.py:paper_defaults` uses
params.py's 1/tau = 14.3 and beta = 14.3 instead of the README's 30 and 8.
Not runnable here: the `cc3m` data source is not provided by experiments/train.py yet.
"""

import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

BATCH = 512
SAMPLES_PER_EPOCH = 2_890_000
EPOCHS = 70


def get_config(arg=None):
    inv_tau, beta = (14.3, 14.3) if arg == "paper_defaults" else (30.0, 8.0)
    if arg not in (None, "", "paper_defaults"):
        raise ValueError(f"cloob_rn50.py: unknown argument {arg!r}; expected nothing or 'paper_defaults'")
    c = common.base_config(
        loss="cloob",
        batch_size=BATCH,
        total_steps=common.steps_for_epochs(EPOCHS, SAMPLES_PER_EPOCH, BATCH),
        lr=1e-3,
        warmup_steps=20000,
        schedule="cosine",
        weight_decay=0.1,
        hopfield_beta=beta,
        max_log_logit_scale=math.log(100.0),
        dtype="bfloat16",
        log_every=100,
        checkpoint_every=5000,
        eval_every=0,
    )
    c.model.name = "RN50"
    c.model.overrides = {"init_log_logit_scale": math.log(inv_tau)}
    c.mesh.data = -1
    c.data = {"name": "cc3m"}
    return c
