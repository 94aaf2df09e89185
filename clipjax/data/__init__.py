"""Input pipelines that fill the trainer's batch contract: `{"image": [b, H, W, 3], "text": [b, L] int32}`
(plus `"label": [b] int32` class indices for labelled sources).

* `make_batches(DataConfig(source=...), ...)`: grain pipelines over tar shards, CSV/TSV/JSONL tables
  and tfds (`pipeline`, `sources`, `tfds_source`), decoded and augmented as open_clip does
  (`transforms`), resumable, multi-host, skipping and counting bad examples (`errors`); labelled
  sources (`DataConfig.label_key`, `classnames`, `caption_template`) give `Batches.classnames`;
* `ArrayBatches`: in-memory arrays (tests, the digits demo);
* `curate`: MetaCLIP curation (substring matching and balancing; `curate_beam` on Apache Beam).
"""

from clipjax.data.errors import BadExample, DataError
from clipjax.data.memory import ArrayBatches
from clipjax.data.pipeline import Batches, DataConfig, make_batches, parse_label
from clipjax.data.sources import read_classnames

__all__ = ["ArrayBatches", "BadExample", "Batches", "DataConfig", "DataError", "make_batches", "parse_label",
           "read_classnames"]
