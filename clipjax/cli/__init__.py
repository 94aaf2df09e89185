"""`clipjax` command line (this package): convert, export, info here; eval / score in `evaluate`, ood in
`ood`, curate (MetaCLIP) in `curate`, data convert in `data`, embed in `embed`, interpret (TextSpan heads,
CCS pruning) in `interpret`, robust eval in `robust`; `inputs` holds the
encoder and the image / caption / tfds readers they share.

    clipjax convert SRC OUT [--arch NAME | --config FILE] [--tokenizer DIR] [--overwrite]
    clipjax export MODEL_DIR OUT [--format hf|open_clip] [--name NAME] [--overwrite]
    clipjax info MODEL_DIR
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from clipjax.convert.errors import ConversionError
from clipjax.config import ConfigError
from clipjax.data.errors import DataError

# sub-command modules that add themselves with `register(subparsers)`
COMMANDS = ("clipjax.cli.evaluate", "clipjax.cli.ood", "clipjax.cli.curate", "clipjax.cli.data", "clipjax.cli.embed",
            "clipjax.cli.interpret", "clipjax.cli.robust")


def _convert(args) -> int:
    from clipjax.convert.api import convert

    out = convert(args.src, args.out, arch=args.arch, config=args.config, tokenizer_dir=args.tokenizer,
                  overwrite=args.overwrite)
    from clipjax.checkpoint import read_config

    cfg = read_config(out)
    print(json.dumps({"out": out, "embed_dim": cfg.embed_dim, "towers": cfg.towers,
                      "vision": cfg.vision.arch if cfg.has_image else None,
                      "image_size": cfg.vision.image_size if cfg.has_image else None, "siglip": cfg.is_siglip}))
    return 0


def _export(args) -> int:
    from clipjax.convert import export

    if args.format == "hf":
        if args.name is not None:
            raise ValueError("--name applies to --format open_clip only")
        print(export.export_hf(args.model, args.out, overwrite=args.overwrite))
        return 0
    from clipjax.checkpoint import load

    model = load(args.model)
    paths = export.open_clip_paths(model.config, args.out, args.name)
    export.export_open_clip(model, args.out, name=paths["name"], overwrite=args.overwrite)
    print(json.dumps(paths))
    return 0


def _info(args) -> int:
    from clipjax.checkpoint import read_config
    from clipjax.config import TOWER_FIELDS

    cfg = read_config(args.model)
    absent = {name for tower, names in TOWER_FIELDS.items() if not cfg.has_tower(tower) for name in names}
    print(json.dumps({k: v for k, v in cfg.to_dict().items() if k not in absent}, indent=2))  # a single tower: its own
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipjax", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("convert", help="PyTorch / Hugging Face checkpoint -> clipjax Orbax checkpoint folder")
    p.add_argument("src", help="OpenAI TorchScript .pt, open_clip .pt/.bin/.safetensors, or a HF model folder")
    p.add_argument("out", help="output checkpoint folder")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--arch", help="preset name, e.g. ViT-B-32 (see clipjax.PRESETS); default: inferred")
    g.add_argument("--config", help="open_clip model-config JSON, transformers config.json or clipjax.json")
    p.add_argument("--tokenizer", help="folder with tokenizer files to store with the checkpoint")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_convert)
    p = sub.add_parser("export", help="clipjax checkpoint -> transformers model folder (CLIPModel/SiglipModel, "
                                      "processor, tokenizer) or open_clip .safetensors + model config")
    p.add_argument("model", help="clipjax checkpoint folder")
    p.add_argument("out", help="hf: output folder; open_clip: output .safetensors file (NAME.json and "
                               "open_clip_config.json are written beside it)")
    p.add_argument("--format", choices=("hf", "open_clip"), default="hf")
    p.add_argument("--name", help="open_clip model name for NAME.json (default: the matching preset name, "
                                  "else the file's stem)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_export)
    p = sub.add_parser("info", help="print a checkpoint's config")
    p.add_argument("model")
    p.set_defaults(func=_info)
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConversionError, ConfigError, DataError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"clipjax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
