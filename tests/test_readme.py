"""The README's "Reproducing the paper" commands are the authors', and they run against the
split files shipped in imageset/: each parses with its script's parser, and every split file
it names exists and reads with the dataset's vocabulary."""
from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from clip_es.cli import generate_cams_parser
from clip_es.eval_cli import eval_cam_parser, eval_crf_parser
from tagclip.cli import classify_parser
from tagclip.registry import get_dataset
from toolkit.splits import read_split

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
SECTION = README[README.index("## Reproducing the paper"):README.index("Beyond the paper's flags:")]

# The authors' classification commands (TagCLIP README, "Usage"), character for character.
AUTHORS_COMMANDS = [
    "python classify.py --img_root /local_root/datasets/VOC2007/JPEGImages/ --split_file ./imageset/voc2007/test_cls.txt --model_path /local_root/pretrained_models/clip/ViT-B-16.pt --dataset voc2007",
    "python classify.py --img_root /local_root/datasets/COCO2014/val2014/ --split_file ./imageset/coco2014/val_cls.txt --model_path /local_root/pretrained_models/clip/ViT-B-16.pt --dataset coco2014",
    "python classify.py --img_root /local_root/datasets/VOC2012/JPEGImages/ --split_file ./imageset/voc2012/val.txt --model_path /local_root/pretrained_models/clip/ViT-B-16.pt --dataset voc2012 --save_file",
    "python classify.py --img_root /local_root/datasets/COCO2017/val2017/ --split_file ./imageset/coco2017/val.txt --model_path /local_root/pretrained_models/clip/ViT-B-16.pt --dataset coco2017 --save_file",
    "python classify.py --img_root /local_root/datasets/COCO2017/val2017/ --split_file ./imageset/cocostuff/val.txt --model_path /local_root/pretrained_models/clip/ViT-B-16.pt --dataset cocostuff --save_file",
]
PARSERS = {"classify.py": classify_parser, "generate_cams.py": generate_cams_parser,
           "eval_cam.py": eval_cam_parser, "eval_cam_with_crf.py": eval_crf_parser}


def commands() -> list[list[str]]:
    return [shlex.split(line) for line in SECTION.splitlines() if line.startswith("python ")]


def test_the_authors_classification_commands_are_in_the_readme_verbatim():
    lines = SECTION.splitlines()
    for command in AUTHORS_COMMANDS:
        assert command in lines, command


def test_every_segmentation_table_has_its_three_commands():
    scripts = [argv[1] for argv in commands()]
    assert scripts.count("classify.py") == 5
    for script in ("generate_cams.py", "eval_cam.py", "eval_cam_with_crf.py"):
        assert scripts.count(script) == 3, script


@pytest.mark.parametrize("argv", commands(), ids=lambda a: f"{a[1]}:{a[a.index('--dataset') + 1]}")
def test_readme_commands_parse_and_their_split_files_are_shipped(argv):
    args = PARSERS[argv[1]]().parse_args(argv[2:])
    cfg = get_dataset(args.dataset)
    split = args.split_file
    if "_val_tagclip.txt" in split:  # made by the classify.py command of the same dataset
        assert split == f"./output/{args.dataset}_val_tagclip.txt"
        return
    path = REPO / split
    assert path.is_file(), split
    entries = read_split(path, num_classes=cfg.num_classes, label_map=cfg.split_label_map)
    assert entries and all(e.labels for e in entries)
