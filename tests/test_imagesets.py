"""The split files shipped in imageset/ (the authors' files the paper's tables were computed on)."""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from pipelines import datasets
from tagclip.registry import DATASETS
from toolkit.splits import read_split
from toolkit.vocab import COCO_STUFF_182_TO_171

REPO_ROOT = Path(__file__).resolve().parent.parent
IMAGESET = REPO_ROOT / "imageset"

# file -> (dataset whose vocabulary its class ids index, line count, SHA256), as published.
SHIPPED = {
    "voc2007/test_cls.txt": ("voc2007", 4952, "e91bda8c2265a11571b46995edcb789248d79507ea8c15d769b2d00c383f9ddf"),
    "voc2007/train_cls.txt": ("voc2007", 2501, "1cb263880453eee1df2ada3fd6e787a2cd55db9dd99ce09fac5205e1df5f873b"),
    "voc2007/val_cls.txt": ("voc2007", 2510, "7caa583c4b88b87fda54a83213f646ca2ac916c554f3b266760f0e02a28c354d"),
    "coco2014/val_cls.txt": ("coco2014", 40137, "a8877a8b90baea45e7d9cb59654532644e1f8f765c7fd0380c4507d7e78393bb"),
    "coco2014/train_cls.txt": ("coco2014", 82081, "6e2c180d260cf870c3802ddca1bf32a2b5c6f1356a7498eca04fca4c7a484320"),
    "voc2012/val.txt": ("voc2012", 1449, "604445e2049b3b9d14862fa3a6d57403755793d0ec6c831651849a969d7f0653"),
    "voc2012/train.txt": ("voc2012", 1464, "148f28b7005a440850250366b98c05196d90226fe110063b15180c3d1617e698"),
    "coco2017/val.txt": ("coco2017", 4952, "e319bffc3bd75ba8897ca74e6b7d08ce5cb42507dc24dd5f08ce5d162f8d5726"),
    "coco2017/train.txt": ("coco2017", 117266, "c775bc995069d80feefd8eb13221c8f7d24cdde99057a2f5e9ce0a24e00b7c7a"),
    "cocostuff/val.txt": ("cocostuff", 4172, "bfc2eddc0b4b7ed0820899a54f7978734aa529a1605f37bb9780d6b9093094fe"),
}

# Size of the class vocabulary each family of files indexes (after COCO-Stuff's 182 -> 171 map).
VOCABULARY_SIZE = {"voc2007": 20, "voc2012": 20, "coco2014": 80, "coco2017": 80, "cocostuff": 171}

ID_PATTERNS = {
    "voc2007": r"[0-9]{6}",
    "voc2012": r"20[0-9]{2}_[0-9]{6}",
    "coco2014/val_cls.txt": r"COCO_val2014_[0-9]{12}",
    "coco2014/train_cls.txt": r"COCO_train2014_[0-9]{12}",
    "coco2017": r"[0-9]{12}",
    "cocostuff": r"[0-9]{12}",
}

# What the registry points at: the file names of the authors' repository.
DEFAULT_SPLITS = {
    "voc2007": "imageset/voc2007/test_cls.txt",
    "voc2012": "imageset/voc2012/val.txt",
    "coco2014": "imageset/coco2014/val_cls.txt",
    "coco2017": "imageset/coco2017/val.txt",
    "cocostuff": "imageset/cocostuff/val.txt",
}


def _read_sums(path: Path) -> dict[str, str]:
    sums = {}
    for line in path.read_text(encoding="ascii").splitlines():
        digest, name = line.split("  ", 1)
        sums[name] = digest
    return sums


def test_shipped_file_list_is_complete():
    shipped = sorted(p.relative_to(IMAGESET).as_posix() for p in IMAGESET.rglob("*.txt"))
    assert shipped == sorted(SHIPPED)


def test_sha256sums_file_lists_the_published_sums():
    assert _read_sums(IMAGESET / "SHA256SUMS") == {name: digest for name, (_, _, digest) in SHIPPED.items()}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_file_hash_and_line_count(name):
    data = (IMAGESET / name).read_bytes()
    _, lines, digest = SHIPPED[name]
    assert hashlib.sha256(data).hexdigest() == digest
    assert hashlib.sha256(data).hexdigest() == _read_sums(IMAGESET / "SHA256SUMS")[name]
    assert data.count(b"\n") == lines
    assert data.endswith(b"\n")


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_files_parse_with_the_registry_vocabulary(name):
    dataset, lines, _ = SHIPPED[name]
    config = DATASETS[dataset]
    assert config.num_classes == VOCABULARY_SIZE[dataset]
    entries = read_split(IMAGESET / name, num_classes=config.num_classes, label_map=config.split_label_map)
    assert len(entries) == lines
    labels = {label for entry in entries for label in entry.labels}
    # every class of the vocabulary occurs, and nothing outside it (read_split rejects that too)
    assert labels == set(range(VOCABULARY_SIZE[dataset]))
    assert all(entry.labels for entry in entries)
    assert all(len(set(entry.labels)) == len(entry.labels) for entry in entries)
    ids = [entry.id for entry in entries]
    assert ids == sorted(ids)
    pattern = ID_PATTERNS[name] if name in ID_PATTERNS else ID_PATTERNS[dataset]
    assert all(re.fullmatch(pattern, image_id) for image_id in ids)


def test_cocostuff_ids_are_the_182_index_space():
    entries = read_split(IMAGESET / "cocostuff" / "val.txt")  # raw ids, no map
    raw = {label for entry in entries for label in entry.labels}
    assert max(raw) == 181 and min(raw) == 0
    # the 11 unused COCO-Stuff ids never occur; every raw id maps into the 171 classes
    assert raw.isdisjoint({11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90})
    assert {COCO_STUFF_182_TO_171[r] for r in raw} == set(range(171))
    assert dict(DATASETS["cocostuff"].split_label_map) == dict(COCO_STUFF_182_TO_171)
    # the first line, mapped: 5 unused ids lie below 61 and all 11 below 91 (171 -> 160)
    assert entries[0].id == "000000000139"
    assert entries[0].labels[:3] == (0, 61, 63) and entries[0].labels[-3:] == (164, 171, 180)
    mapped = read_split(IMAGESET / "cocostuff" / "val.txt", num_classes=171,
                        label_map=DATASETS["cocostuff"].split_label_map)
    assert mapped[0].labels[:3] == (0, 56, 58) and mapped[0].labels[-3:] == (153, 160, 169)


def test_registry_default_splits_are_the_shipped_files():
    assert {name: config.default_split for name, config in DATASETS.items()} == DEFAULT_SPLITS
    for name, path in DEFAULT_SPLITS.items():
        assert (REPO_ROOT / path).is_file(), path
        assert datasets.shipped_split(name) == REPO_ROOT / path


def test_prepare_locates_the_shipped_folder_from_the_package():
    assert datasets.IMAGESET_DIR == IMAGESET
    assert datasets.EXPECTED_SIZES["cocostuff"] == SHIPPED["cocostuff/val.txt"][1]
    for dataset, path in DEFAULT_SPLITS.items():
        _, lines, _ = SHIPPED[path[len("imageset/"):]]
        assert datasets.EXPECTED_SIZES[dataset] == lines
    assert datasets.EXPECTED_SIZES_ALL_IMAGES == {"cocostuff": 5000}


def test_licence_and_readme_are_shipped():
    licence = (IMAGESET / "LICENSE.authors").read_text()
    assert licence.startswith("MIT License") and "linyq2117" in licence
    readme = (IMAGESET / "README.md").read_text()
    assert "LICENSE.authors" in readme
    for name, (_, lines, _) in SHIPPED.items():
        row = next((ln for ln in readme.splitlines() if ln.startswith(f"| `{name}`")), None)
        assert row is not None, name
        assert f"| {lines} |" in row, row
    assert "SPEC" not in readme and "shared/" not in readme
