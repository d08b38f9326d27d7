"""The ``tagclip`` command: ``tagclip {classify,tag,segment,demo,app,prepare} ...``."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from tagclip.cli import add_run_arguments, classify_main, run_classify
from tagclip.registry import DATASETS
from toolkit.cli import HelpFormatter, guarded

from . import datasets
from .app import add_app_arguments, run_app
from .demo import add_demo_arguments, run_demo
from .segment import add_segment_arguments, run_segment

# Subcommands that own their whole argument list (their own parser, their own --help).
PASS_THROUGH = {"classify": classify_main, "prepare": datasets.main}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tagclip", description="TagCLIP: open-vocabulary image tagging with CLIP",
                                formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("classify", help="classify.py: the paper's classification run", add_help=False)
    tag = sub.add_parser("tag", help="tag every image in a folder with your own class names",
                         formatter_class=HelpFormatter)
    tag.add_argument("img_root", help="image folder")
    tag.add_argument("--dataset", default="voc2007", choices=list(DATASETS),
                     help="thresholds to use (and the vocabulary when --classes is not given)")
    add_run_arguments(tag, split_file=False)
    tag.add_argument("--quiet", action="store_true", help="do not print each image's tags")
    add_segment_arguments(sub.add_parser(
        "segment", help="tags -> CAMs -> masks for every image in a folder, your class names",
        formatter_class=HelpFormatter))
    add_demo_arguments(sub.add_parser(
        "demo", help="tag the bundled sample images with the VOC and COCO vocabularies", formatter_class=HelpFormatter))
    add_app_arguments(sub.add_parser(
        "app", help="a local web page to tag and segment your own images (needs the [app] extra)",
        formatter_class=HelpFormatter))
    sub.add_parser("prepare", help="write or check a paper dataset's split file from its official release",
                   add_help=False)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in PASS_THROUGH:
        return PASS_THROUGH[argv[0]](argv[1:])
    args = parser().parse_args(argv)
    if args.command == "tag":
        args.split_file, args.save_file = None, False
        return guarded(run_classify, args)
    if args.command == "segment":
        return guarded(run_segment, args)
    if args.command == "app":
        return guarded(run_app, args)
    return guarded(run_demo, args)


if __name__ == "__main__":
    sys.exit(main())
