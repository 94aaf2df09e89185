"""`clipjax curate`: MetaCLIP curation (substring matching + balancing) of a caption source.

    clipjax curate --metadata ENTRIES.txt --data SOURCE --t T --out DIR [--seed 0] [--workers N]
                   [--runner local|beam] [--write-matches] [--overwrite] [-- BEAM_PIPELINE_OPTIONS...]

`--metadata`: one entry per line, UTF-8 (or MetaCLIP's `metadata.json` list). `--data`: tar shards
(`shards/{00000..00099}.tar`, a glob, comma-separated), an open_clip CSV/TSV or a JSONL table
(`clipjax.data.sources.caption_shards`). `--t`: the balancing threshold (MetaCLIP: 20000 for 400M,
170000 for 2.5B). Definitions and outputs (kept-*.txt, counts.tsv, summary.json) are in
`clipjax.data.curate`; the summary is printed as JSON.

`--runner local` uses `--workers` processes on this machine. `--runner beam` builds the Apache Beam
pipeline of `clipjax.data.curate_beam` (`pip install clipjax[beam]`); everything after `--` is passed
to Beam as pipeline options, e.g. `-- --runner=DataflowRunner --project=P --region=R
--temp_location=gs://B/tmp --setup_file=./setup.py` (without them: DirectRunner).
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def curate_command(args) -> int:
    from clipjax.data import curate
    from clipjax.data.errors import DataError

    if args.pipeline_args and args.runner != "beam":
        raise ValueError(f"Beam pipeline options after `--` ({' '.join(args.pipeline_args)}) need --runner beam")
    entries = curate.load_entries(args.metadata)
    t, seed = curate.check_threshold(args.t), curate.check_seed(args.seed)
    try:
        from clipjax.data.sources import caption_shards, iter_captions

        shards = caption_shards(args.data)
    except DataError as e:
        raise ValueError(f"--data {args.data!r}: {e}") from None
    if args.runner == "local":
        summary = curate.curate_local(shards, iter_captions, entries, t, seed, args.out, workers=args.workers,
                                      write_matches=args.write_matches, overwrite=args.overwrite)
    else:
        try:
            from clipjax.data.curate_beam import curate_beam
        except ImportError as e:
            print(f"clipjax curate: error: {e}", file=sys.stderr)
            return 2
        summary = curate_beam(shards, entries, t, seed, args.out, pipeline_options=args.pipeline_args,
                              read_shard=iter_captions, write_matches=args.write_matches, overwrite=args.overwrite)
    summary = {"metadata": os.path.abspath(args.metadata), "data": args.data, "out": args.out, **summary}
    print(json.dumps(summary, indent=2))
    return 0


def register(subparsers) -> None:
    """Add `curate` to the `clipjax` command's sub-parsers."""
    p = subparsers.add_parser("curate", help="MetaCLIP curation: match captions to metadata entries, balance",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--metadata", required=True, help="entries file: one entry per line, UTF-8 (or a JSON list)")
    p.add_argument("--data", required=True, help="tar shards pattern, CSV/TSV or JSONL table")
    p.add_argument("--t", type=float, required=True, help="balancing threshold t > 0: p_e = min(1, t / count_e)")
    p.add_argument("--out", required=True, help="output folder (refused if not empty, unless --overwrite)")
    p.add_argument("--seed", type=int, default=0, help="seed of the hashed coins, in [0, 2**64) (default 0)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="local processes (default: CPUs)")
    p.add_argument("--runner", choices=("local", "beam"), default="local")
    p.add_argument("--write-matches", action="store_true", help="also write matches-*.jsonl (key, entry ids)")
    p.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier run in --out")
    p.add_argument("pipeline_args", nargs="*", metavar="-- BEAM_OPTION",
                   help="after `--`: Apache Beam pipeline options (--runner beam)")
    p.set_defaults(func=curate_command)
