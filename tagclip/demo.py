"""``tagclip demo``: tag the bundled sample images with the VOC and COCO vocabularies."""
from __future__ import annotations

import argparse
from pathlib import Path

from .images import iter_image_files, load_model_input
from .tagger import Tagger

SAMPLES_DIR = Path(__file__).with_name("samples")
DEMO_DATASETS = ("voc2007", "coco2014")


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    from .cli import add_checkpoint_code_argument

    p.add_argument("--model_path", default="ViT-B/16",
                   help="OpenAI model name (downloaded on first use, SHA256 checked) or a checkpoint file")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--images", default=str(SAMPLES_DIR), help="image folder (default: the bundled samples)")
    p.add_argument("--model_cache", default=None, help="checkpoint cache folder (default ~/.cache/clip)")
    add_checkpoint_code_argument(p)


def run_demo(args) -> int:
    from .cli import DEFAULT_PRECISION, load_model

    files = iter_image_files(args.images)
    images = [load_model_input(Path(args.images) / name)[0] for _, name in files]
    model = load_model(args.model_path, args.device, DEFAULT_PRECISION, args.model_cache, args.allow_checkpoint_code)
    device = next(model.parameters()).device
    for dataset in DEMO_DATASETS:
        tagger = Tagger.for_dataset(model, dataset)
        scores = tagger.scores(images)
        print(f"\n{dataset} vocabulary ({len(tagger.class_names)} classes, "
              f"{len(tagger.background)} background words) on {device}")
        for (image_id, name), row, labels in zip(files, scores, tagger.labels(scores)):
            best_first = sorted(labels, key=lambda c: -float(row[c]))
            tags = ", ".join(f"{tagger.class_names[c]} {row[c]:.3f}" for c in best_first)
            print(f"  {name:<16} {tags}")
    return 0
