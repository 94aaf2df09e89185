"""MetaCLIP curation as an Apache Beam pipeline: the same matching, counts, coins and outputs as
`clipjax.data.curate.curate_local` (definitions in that module's docstring; MetaCLIP's
`metaclip/metaclip1/substr_matching.py` and `metaclip/metaclip1/balancing.py`).

    Create(shard ids) -> Reshuffle -> ParDo(read shard, match; automaton built once per worker in `setup`)
      matched (key, entry ids) -> (entry id, 1) -> CombinePerKey(sum) = global counts
      matched -> FlatMap(keep?, counts as an AsDict side input) -> WriteToText  kept-SSSSS-of-NNNNN.txt
      counts  -> one element, all entries in metadata order -> WriteToText     counts.tsv
      per-shard stats + kept count -> one element                 -> WriteToText     summary.json

Because a coin depends only on (seed, key, entry id), the kept keys equal `curate_local`'s for any runner
and any number of workers. The pipeline uses only core transforms, so it runs unchanged on DirectRunner,
Dataflow, Flink or Spark: pass their options (`--runner=DataflowRunner --project=... --region=...
--temp_location=gs://...`) as `pipeline_options`, with `out_dir` on a file system the workers can
write (e.g. `gs://bucket/curated`). Remote workers need clipjax installed (e.g. `--setup_file`,
`--extra_package` or `--sdk_container_image`) and must be able to read the shards.

This module imports Apache Beam at import time; `pip install clipjax[beam]` provides it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence

try:
    import apache_beam as beam
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("the Beam curation runner needs Apache Beam, which is not installed: "
                      "pip install 'clipjax[beam]' (or apache-beam>=2.60)") from e

from clipjax.data import curate


class _ReadAndMatch(beam.DoFn):
    """shard id -> (key, sorted matched entry ids) per matched caption; per shard one `stats` output
    `(captions, missing_captions, matched)`."""

    STATS = "stats"

    def __init__(self, entries: Sequence[str], read_shard: Callable):
        self.entries = list(entries)
        self.read_shard = read_shard

    def setup(self):
        self.matcher = curate.build_matcher(self.entries)

    def process(self, shard):
        stats: dict = {}
        yield from curate.match_records(self.matcher, self.read_shard(shard), stats)
        yield beam.pvalue.TaggedOutput(self.STATS, (stats["captions"], stats["missing_captions"], stats["matched"]))


class _Probabilities:
    """p_e = t / max(count_e, t) looked up from the global counts (a side-input dict)."""

    def __init__(self, counts: dict, t: float):
        self.counts, self.t = counts, t

    def __getitem__(self, entry_id: int) -> float:
        return self.t / max(self.counts[entry_id], self.t)


def _entry_ones(record):
    return [(entry_id, 1) for entry_id in record[1]]


def _kept_key(record, counts: dict, t: float, seed: int):
    key, entry_ids = record
    if curate.keep(key, entry_ids, _Probabilities(counts, t), seed):
        yield key


def _sum_stats(values: Iterable[tuple]) -> tuple:
    totals = [0, 0, 0]
    for value in values:
        totals = [a + b for a, b in zip(totals, value)]
    return tuple(totals)


def _counts_tsv(_, entries: Sequence[str], counts: dict) -> str:
    """All of counts.tsv as one element, so its rows keep metadata order on every runner."""
    return "\n".join(f"{e}\t{counts.get(i, 0)}" for i, e in enumerate(entries))


def _summary_json(_, stats: tuple, kept: int, counts: dict, entries_count: int, t: float, seed: int,
                  shards: int) -> str:
    summary = curate.make_summary(dict(zip(("captions", "missing_captions", "matched"), stats)), kept,
                                  list(counts.values()), entries_count, t, seed, shards, "beam")
    return json.dumps(summary, indent=2)


def _matches_json(record) -> str:
    return json.dumps({"key": record[0], "entry_ids": record[1]}, ensure_ascii=False)


def _join(out_dir: str, name: str) -> str:
    return FileSystems.join(out_dir, name)


def _prepare_out_dir(out_dir: str, overwrite: bool) -> None:
    """`curate.prepare_out_dir` for local folders; for remote ones (gs://, s3://, ...) the same check and
    clean-up through Beam's FileSystems."""
    if "://" not in out_dir:
        return curate.prepare_out_dir(out_dir, overwrite)
    existing = [m.path for r in FileSystems.match([_join(out_dir, "*")]) for m in r.metadata_list]
    if existing and not overwrite:
        raise FileExistsError(f"output folder {out_dir!r} exists and is not empty; choose a new folder or pass "
                              "overwrite=True (--overwrite)")
    ours = [m.path for r in FileSystems.match([_join(out_dir, p) for p in curate.OUTPUT_PATTERNS])
            for m in r.metadata_list]
    if ours:
        FileSystems.delete(ours)


def curate_beam(shard_ids: Sequence, entries: Sequence[str], t: float, seed: int, out_dir: str,
                pipeline_options: PipelineOptions | Sequence[str] | None = None, read_shard: Callable | None = None,
                write_matches: bool = False, overwrite: bool = False) -> dict:
    """Run the curation pipeline and wait for it; returns the summary (as written to summary.json).

    Args:
      shard_ids: e.g. `clipjax.data.sources.caption_shards(spec)`; any picklable objects with `read_shard`.
      entries, t, seed, write_matches, overwrite: as for `curate.curate_local`.
      out_dir: output folder, local or on any Beam file system (gs://...).
      pipeline_options: a `PipelineOptions` or its command-line flags (e.g. `["--runner=DataflowRunner",
        ...]`); None: DirectRunner with default options.
      read_shard: shard id -> iterable of (key, caption or None); default
        `clipjax.data.sources.iter_captions`. Must be importable on the workers.
    """
    shard_ids = list(shard_ids)
    if not shard_ids:
        raise ValueError("no input shards: expected at least one shard of (key, caption) records")
    entries, t, seed = curate.check_entries(entries), curate.check_threshold(t), curate.check_seed(seed)
    if read_shard is None:
        from clipjax.data.sources import iter_captions as read_shard
    if pipeline_options is None or isinstance(pipeline_options, (list, tuple)):
        pipeline_options = PipelineOptions(flags=list(pipeline_options or []))
    _prepare_out_dir(out_dir, overwrite)

    with beam.Pipeline(options=pipeline_options) as p:
        read = (p | "shard ids" >> beam.Create(shard_ids)
                | "spread shards" >> beam.Reshuffle()
                | "read and match" >> beam.ParDo(_ReadAndMatch(entries, read_shard)).with_outputs(
                    _ReadAndMatch.STATS, main="matched"))
        matched, stats = read.matched, read[_ReadAndMatch.STATS]
        counts = (matched | "entry ones" >> beam.FlatMap(_entry_ones)
                  | "count entries" >> beam.CombinePerKey(sum))
        counts_side = beam.pvalue.AsDict(counts)
        kept = matched | "balance" >> beam.FlatMap(_kept_key, counts=counts_side, t=t, seed=seed)
        kept | "write kept" >> beam.io.WriteToText(_join(out_dir, "kept"), file_name_suffix=".txt")

        one = p | "one" >> beam.Create([None])
        (one | "counts tsv" >> beam.Map(_counts_tsv, entries=entries, counts=counts_side)
         | "write counts" >> beam.io.WriteToText(_join(out_dir, "counts.tsv"), num_shards=1,
                                                 shard_name_template=""))
        stats_total = stats | "sum stats" >> beam.CombineGlobally(_sum_stats)
        kept_count = kept | "count kept" >> beam.combiners.Count.Globally()
        (one | "summary" >> beam.Map(_summary_json, stats=beam.pvalue.AsSingleton(stats_total),
                                     kept=beam.pvalue.AsSingleton(kept_count), counts=counts_side,
                                     entries_count=len(entries), t=t, seed=seed, shards=len(shard_ids))
         | "write summary" >> beam.io.WriteToText(_join(out_dir, "summary.json"), num_shards=1,
                                                  shard_name_template=""))
        if write_matches:
            (matched | "matches json" >> beam.Map(_matches_json)
             | "write matches" >> beam.io.WriteToText(_join(out_dir, "matches"), file_name_suffix=".jsonl"))

    with FileSystems.open(_join(out_dir, "summary.json")) as f:
        return json.loads(f.read().decode("utf-8"))
