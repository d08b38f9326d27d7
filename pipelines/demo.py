"""``tagclip demo``: tag the bundled sample images with the VOC and COCO vocabularies."""
from __future__ import annotations

import argparse
from pathlib import Path

from clip.loading import load_model
from clip.preprocess import load_model_input
from tagclip.tagger import Tagger
from toolkit.cli import add_model_arguments, settle_precision
from toolkit.images import iter_image_files

SAMPLES_DIR = Path(__file__).with_name("samples")
DEMO_DATASETS = ("voc2007", "coco2014")


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--images", default=str(SAMPLES_DIR), help="image folder (default: the bundled samples)")


def run_demo(args) -> int:
    settle_precision(args)
    files = iter_image_files(args.images)
    model = load_model(args.model_path, args.device, args.precision, args.model_cache, args.allow_checkpoint_code,
                       args.arch)
    patch = model.visual.patch_size
    images = [load_model_input(Path(args.images) / name, patch_size=patch)[0] for _, name in files]
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
    print(f"tagged {len(files)} image(s) from {args.images} with the {' and '.join(DEMO_DATASETS)} vocabularies "
          f"on {device}")
    return 0
