"""TagCLIP dataset registry: every fact the classification stage needs, in one place (SPEC §3, §4, §8, Q7).

``DATASETS[name]`` is a frozen :class:`DatasetConfig`. Scripts take ``--dataset`` and read
everything else from here; nothing is guessed from paths (quirk Q9). The CAM and evaluation
stages keep theirs in :mod:`clip_es.registry`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping, Optional

from toolkit.vocab import (
    COCO_BACKGROUND,
    COCO_CLASSES,
    COCO_STUFF_182_TO_171,
    COCO_STUFF_CLASSES,
    VOC_BACKGROUND,
    VOC_CLASSES,
)

from .method import TagCLIPParams
from .metrics import REL_THRESHOLD_COCOSTUFF, REL_THRESHOLD_DEFAULT

# SPEC §3.8 / §4 / Q7: one relative threshold for crop candidates, F1 and label files.
REL_THRESHOLD = REL_THRESHOLD_DEFAULT
# SPEC §3.4: blocks averaged into the refinement matrix.
REFINE_LAYERS = (8, 9, 10)
REFINE_LAYERS_COCOSTUFF = tuple(range(11))


@dataclass(frozen=True)
class DatasetConfig:
    name: str
    class_names: tuple[str, ...]            # foreground classes, split-file ids index these
    background: tuple[str, ...]             # background words appended to the text rows
    params: TagCLIPParams                   # method constants for this dataset
    label_rel_threshold: float              # §4: F1 and label-file threshold
    split_label_map: Optional[Mapping[int, int]] = field(default=None)  # raw split id -> class id
    default_split: Optional[str] = None     # bundled split file (relative to the repo root)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _voc_coco(name: str, classes, background, split: str) -> DatasetConfig:
    return DatasetConfig(name, classes, background,
                         TagCLIPParams(refine_layers=REFINE_LAYERS, crop_rel_threshold=REL_THRESHOLD),
                         REL_THRESHOLD, default_split=split)


DATASETS: Mapping[str, DatasetConfig] = MappingProxyType({
    "voc2007": _voc_coco("voc2007", VOC_CLASSES, VOC_BACKGROUND, "imageset/voc2007/test_cls.txt"),
    "voc2012": _voc_coco("voc2012", VOC_CLASSES, VOC_BACKGROUND, "imageset/voc2012/val.txt"),
    "coco2014": _voc_coco("coco2014", COCO_CLASSES, COCO_BACKGROUND, "imageset/coco2014/val_cls.txt"),
    "coco2017": _voc_coco("coco2017", COCO_CLASSES, COCO_BACKGROUND, "imageset/coco2017/val.txt"),
    "cocostuff": DatasetConfig(
        "cocostuff", COCO_STUFF_CLASSES, (),
        TagCLIPParams(refine_layers=REFINE_LAYERS_COCOSTUFF, crop_rel_threshold=REL_THRESHOLD_COCOSTUFF),
        REL_THRESHOLD_COCOSTUFF,
        split_label_map=MappingProxyType(dict(COCO_STUFF_182_TO_171)),
        default_split="imageset/cocostuff/val.txt"),
})


def get_dataset(name: str) -> DatasetConfig:
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}") from None
