"""Input pipelines that fill the trainer's batch contract: `{"image": [b, H, W, 3], "text": [b, L] int32}`."""

from clipjax.data.memory import ArrayBatches

__all__ = ["ArrayBatches"]
