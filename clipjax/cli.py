"""`clipjax` command line: convert, export, info (and eval / score / ood from their packages).

    clipjax convert SRC OUT [--arch NAME | --config FILE] [--tokenizer DIR] [--overwrite]
    clipjax export MODEL_DIR OUT_HF [--overwrite]
    clipjax info MODEL_DIR
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from clipjax.convert.errors import ConversionError
from clipjax.config import ConfigError

# sub-command packages that add themselves with `register(subparsers)`
PLUGINS = ("clipjax.metrics.cli", "clipjax.ood.cli")


def _convert(args) -> int:
    from clipjax.convert.api import convert

    out = convert(args.src, args.out, arch=args.arch, config=args.config, tokenizer_dir=args.tokenizer,
                  overwrite=args.overwrite)
    from clipjax.checkpoint import read_config

    cfg = read_config(out)
    print(json.dumps({"out": out, "embed_dim": cfg.embed_dim, "vision": cfg.vision.arch,
                      "image_size": cfg.vision.image_size, "siglip": cfg.is_siglip}))
    return 0


def _export(args) -> int:
    from clipjax.convert.api import export_hf

    print(export_hf(args.model, args.out, overwrite=args.overwrite))
    return 0


def _info(args) -> int:
    from clipjax.checkpoint import read_config

    print(json.dumps(read_config(args.model).to_dict(), indent=2))
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
    p = sub.add_parser("export", help="clipjax checkpoint -> transformers model folder (CLIPModel/SiglipModel)")
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_export)
    p = sub.add_parser("info", help="print a checkpoint's config")
    p.add_argument("model")
    p.set_defaults(func=_info)
    for name in PLUGINS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConversionError, ConfigError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"clipjax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
