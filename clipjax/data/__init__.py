"""Input pipelines that fill the trainer's batch contract: `{"image": [b, H, W, 3], "text": [b, L] int32}`.

* `make_batches(DataConfig(source=...), ...)`: grain pipelines over tar shards, CSV/TSV/JSONL tables
  and tfds (`pipeline`, `sources`, `tfds_source`), decoded and augmented as open_clip does
  (`transforms`), resumable, multi-host, skipping and counting bad examples (`errors`);
* `ArrayBatches`: in-memory arrays (tests, the digits demo);
* `curate`: MetaCLIP curation (substring matching and balancing; `curate_beam` on Apache Beam).
"""

from clipjax.data.errors import BadExample, DataError
from clipjax.data.memory import ArrayBatches
from clipjax.data.pipeline import Batches, DataConfig, make_batches

__all__ = ["ArrayBatches", "BadExample", "Batches", "DataConfig", "DataError", "make_batches"]
