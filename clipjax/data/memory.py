"""In-memory arrays as a resumable, multi-host batch iterator (tests, the digits demo).

Order: a grain `MapDataset` global shuffle, reshuffled each epoch (`shuffle(seed).repeat()`),
read by random access. Global batch `k` is elements `[k * B, (k + 1) * B)` of that endless
order; process `p` of `n` takes its contiguous `B / n` slice, so processes read disjoint rows
and together exactly the global batch. The iterator's whole state is the next batch index,
so a restored iterator continues with the very batches an uninterrupted one would read.
"""

from __future__ import annotations

import grain
import jax
import numpy as np


class ArrayBatches:
    """Endless per-process batches `{key: [B / process_count, ...]}` from equal-length arrays.

    Its state (the next global batch) is the same on every process, so a run resumes with any
    process count (`state_is_global`).

    Args:
      arrays: name -> array with a common leading size N (e.g. `image` uint8 `[N, H, W, 3]`,
        `text` int32 `[N, L]`).
      batch_size: the global batch B (all processes).
      seed: shuffle seed (None: no shuffle, the arrays' own order, epoch after epoch).
      process_index, process_count: this process's slice (default: `jax.process_index()` /
        `jax.process_count()`).
    """

    def __init__(self, arrays: dict, batch_size: int, *, seed: int | None = 0, process_index: int | None = None,
                 process_count: int | None = None):
        sizes = {k: len(v) for k, v in arrays.items()}
        if not sizes or len(set(sizes.values())) != 1:
            raise ValueError(f"arrays must be non-empty and share their leading size, got {sizes}")
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        self.num_examples = next(iter(sizes.values()))
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        if batch_size % self.process_count:
            raise ValueError(f"global batch_size={batch_size} is not divisible by {self.process_count} processes")
        self.batch_size = batch_size
        self.local_batch_size = batch_size // self.process_count
        order = grain.MapDataset.range(self.num_examples)
        if seed is not None:
            order = order.shuffle(seed=seed)
        self._order = order.repeat(None)
        self._next = 0

    state_is_global = True

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        start = self._next * self.batch_size + self.process_index * self.local_batch_size
        idx = np.fromiter((self._order[i] for i in range(start, start + self.local_batch_size)), np.int64,
                          self.local_batch_size)
        self._next += 1
        return {k: v[idx] for k, v in self.arrays.items()}

    @property
    def epoch(self) -> float:
        """Epochs read so far (global)."""
        return self._next * self.batch_size / self.num_examples

    def get_state(self) -> dict:
        """JSON-able state: the index of the next global batch."""
        return {"next_batch": self._next, "batch_size": self.batch_size, "num_examples": self.num_examples}

    def set_state(self, state: dict) -> None:
        if state.get("num_examples") != self.num_examples or state.get("batch_size") != self.batch_size:
            raise ValueError(f"iterator state {state} was saved for other data (num_examples={self.num_examples}, "
                             f"batch_size={self.batch_size} now)")
        self._next = int(state["next_batch"])
