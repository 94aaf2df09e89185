"""Bad-data kinds: what the input pipelines skip and count instead of crashing on one example.

A reader or transform raises `BadExample(kind, message)` for an example it cannot use; the
pipeline skips that example, counts it under `kind`, and stops with `DataError` once the
skipped fraction passes the configured limit (`clipjax.data.pipeline`).
"""

from __future__ import annotations

# every kind a reader or transform may report, in the order they are logged
KINDS = (
    "corrupt_image",    # bytes that do not decode as an image (truncated, garbage, unsupported format)
    "missing_image",    # an example without image bytes (no KEY.jpg|png|webp, empty column, missing file)
    "missing_caption",  # an example without a caption (no KEY.txt / JSON caption, empty CSV cell)
    "unreadable_file",  # an image or metadata file that cannot be read (I/O error, permission, bad JSON)
    "bad_shard",        # a tar shard that is truncated or corrupt: examples after the damage are lost
    "empty_shard",      # a shard with no complete example
    "label",            # a missing, non-integer, negative or out-of-range class label (`DataConfig.label_key`)
)


class BadExample(Exception):
    """One example (or shard) the pipeline cannot use; `kind` is one of `KINDS`."""

    def __init__(self, kind: str, message: str):
        if kind not in KINDS:
            raise ValueError(f"unknown bad-data kind {kind!r}; expected one of {KINDS}")
        super().__init__(f"{kind}: {message}")
        self.kind = kind


class DataError(RuntimeError):
    """The input is unusable as a whole: too many bad examples, no shards matched, and the like."""
