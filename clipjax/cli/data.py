"""`clipjax data convert`: tar shards or an open_clip CSV/TSV/JSONL table -> a tfds ArrayRecord dataset.

    clipjax data convert SOURCE --data-dir DIR --name NAME [--img-key filepath] [--caption-key title]
                         [--caption-list-key KEY]

The dataset is read back by any pipeline as `tfds:NAME` with `tfds_data_dir=DIR` (random access:
global shuffles and exact resumes without re-reading shards). Bad examples are left out and
counted in the printed summary (`clipjax.data.tfds_source.convert`).
"""

from __future__ import annotations

import json


def _convert(args) -> int:
    from clipjax.data.tfds_source import convert

    print(json.dumps(convert(args.source, args.data_dir, args.name, img_key=args.img_key,
                             caption_key=args.caption_key, caption_list_key=args.caption_list_key)))
    return 0


def register(sub) -> None:
    p = sub.add_parser("data", help="data-set tools: convert tar shards or tables to a tfds ArrayRecord dataset")
    actions = p.add_subparsers(dest="data_command", required=True)
    c = actions.add_parser("convert", help="tar shards / CSV / TSV / JSONL -> tfds ArrayRecord dataset NAME")
    c.add_argument("source", help="shard pattern (shards/{00000..00127}.tar), or a .csv/.tsv/.jsonl table")
    c.add_argument("--data-dir", required=True, help="tfds data_dir to write into")
    c.add_argument("--name", required=True, help="dataset name (lower-case letters, digits, _)")
    c.add_argument("--img-key", default="filepath", help="table column of image paths (open_clip --csv-img-key)")
    c.add_argument("--caption-key", default="title", help="table column of captions (open_clip --csv-caption-key)")
    c.add_argument("--caption-list-key", help="JSON key / column with extra captions (LaCLIP)")
    c.set_defaults(func=_convert)
