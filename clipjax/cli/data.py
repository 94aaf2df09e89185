"""`clipjax data convert`: tar shards or an open_clip CSV/TSV/JSONL table -> a tfds ArrayRecord dataset.

    clipjax data convert SOURCE --data-dir DIR --name NAME [--img-key filepath] [--caption-key title]
                         [--caption-list-key KEY] [--label-key KEY [--classnames FILE] [--no-captions]]

The dataset is read back by any pipeline as `tfds:NAME` with `tfds_data_dir=DIR` (random access:
global shuffles and exact resumes without re-reading shards). Bad examples are left out and
counted in the summary printed as one JSON line on stdout (tfds' progress goes to stderr;
`clipjax.data.tfds_source.convert`).

Labelled sets (ImageNet-style shards with `KEY.cls`, `{"label": 3}` in `KEY.json`, a table's label
column): `--label-key cls` stores each class index as the feature `label` (examples with a bad label
are left out, counted as `label`); `--classnames FILE` (one name per line, in label order) makes it a
tfds ClassLabel, read back with `DataConfig(source="tfds:NAME", label_key="label", classnames="tfds")`.
Captions are then optional (an example without one is stored with none); `--no-captions` reads none.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys


def _convert(args) -> int:
    from clipjax.data.tfds_source import convert

    caption_key = None if args.no_captions else args.caption_key
    with contextlib.redirect_stdout(sys.stderr):  # tfds' progress lines: stdout holds only the JSON summary
        summary = convert(args.source, args.data_dir, args.name, img_key=args.img_key, caption_key=caption_key,
                          caption_list_key=args.caption_list_key, label_key=args.label_key,
                          classnames=args.classnames)
    print(json.dumps(summary))
    return 0


def register(sub) -> None:
    p = sub.add_parser("data", help="data-set tools: convert tar shards or tables to a tfds ArrayRecord dataset")
    actions = p.add_subparsers(dest="data_command", required=True)
    c = actions.add_parser("convert", help="tar shards / CSV / TSV / JSONL -> tfds ArrayRecord dataset NAME",
                           description=__doc__.split("\n\n", 2)[2],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("source", help="shard pattern (shards/{00000..00127}.tar), or a .csv/.tsv/.jsonl table")
    c.add_argument("--data-dir", required=True, help="tfds data_dir to write into")
    c.add_argument("--name", required=True, help="dataset name (lower-case letters, digits, _)")
    c.add_argument("--img-key", default="filepath", help="table column of image paths (open_clip --csv-img-key)")
    c.add_argument("--caption-key", default="title", help="table column of captions (open_clip --csv-caption-key)")
    c.add_argument("--caption-list-key", help="JSON key / column with extra captions (LaCLIP)")
    c.add_argument("--label-key", help="where each class index is: tar member extension (cls; else that key of "
                                       "KEY.json), or table column / JSON key; adds the feature 'label'")
    c.add_argument("--classnames", metavar="FILE", help="class names, one per line in label order: 'label' becomes "
                                                        "a tfds ClassLabel (needs --label-key)")
    c.add_argument("--no-captions", action="store_true", help="the source has no captions: read none (needs "
                                                              "--label-key; captions come from a template later)")
    c.set_defaults(func=_convert)
