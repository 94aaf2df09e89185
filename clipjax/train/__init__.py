"""Training: optimizer and param groups, train state, the jitted step, checkpoints, the loop and held-out eval.

    from clipjax.train import TrainConfig, train
    result = train(model_config, TrainConfig(loss="siglip", batch_size=1024, total_steps=10_000),
                   workdir, data_iterator, mesh=clipjax.sharding.make_mesh(data=-1))
"""

from clipjax.train.config import TrainConfig
from clipjax.train.evaluate import (
    ZeroShotSet,
    class_text_embeddings,
    make_eval_fn,
    paired_retrieval_metrics,
    retrieval_eval,
    zeroshot_eval,
)
from clipjax.train.loop import NonFiniteError, TrainResult, train
from clipjax.train.optim import learning_rate_schedule, make_optimizer
from clipjax.train.param_groups import decay_mask, layer_decay_multipliers, trainable_mask
from clipjax.train.state import TrainState, init_state
from clipjax.train.step import make_train_step
from clipjax.train.weights import wise_ft

__all__ = ["NonFiniteError", "TrainConfig", "TrainResult", "TrainState", "ZeroShotSet", "class_text_embeddings",
           "decay_mask", "init_state", "layer_decay_multipliers", "learning_rate_schedule", "make_eval_fn",
           "make_optimizer", "make_train_step", "paired_retrieval_metrics", "retrieval_eval", "train",
           "trainable_mask", "wise_ft", "zeroshot_eval"]
