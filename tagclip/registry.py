"""Dataset registry: every dataset fact the scripts need, in one place (SPEC §3, §4, §8, Q7).

``DATASETS[name]`` is a frozen :class:`DatasetConfig`. Scripts take ``--dataset`` and read
everything else from here; nothing is guessed from paths (quirk Q9).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping, Optional

from .method import TagCLIPParams
from .metrics import REL_THRESHOLD_COCOSTUFF, REL_THRESHOLD_DEFAULT
from .vocab import (COCO_BACKGROUND, COCO_CAM_CLASSES, COCO_CLASSES, COCO_STUFF_171_TO_27, COCO_STUFF_182_TO_171,
                    COCO_STUFF_182_TO_27, COCO_STUFF_CAM_BACKGROUND, COCO_STUFF_CAM_CLASSES, COCO_STUFF_CLASSES,
                    COCO_STUFF_COARSE, VOC_BACKGROUND, VOC_CAM_CLASSES, VOC_CLASSES)

# SPEC §3.8 / §4 / Q7: one relative threshold for crop candidates, F1 and label files.
REL_THRESHOLD = REL_THRESHOLD_DEFAULT
# SPEC §3.4: blocks averaged into the refinement matrix.
REFINE_LAYERS = (8, 9, 10)
REFINE_LAYERS_COCOSTUFF = tuple(range(11))


@dataclass(frozen=True)
class CamConfig:
    """CLIP-ES stage facts (SPEC §5, §6)."""
    class_names: tuple[str, ...]        # CAM-stage names (synonyms), same indices as classification
    background: tuple[str, ...]         # background words of the CAM softmax
    affinity_layers: tuple[int, ...]    # blocks averaged into the affinity
    box_threshold: float                # scoremap2bbox threshold of the refinement boxes
    eval_num_classes: int               # classes of the evaluation (incl. background where used)


# SPEC §5: affinity = mean of maps [-8:-1] (VOC: blocks 4..10) or [-8:] (COCO, COCO-Stuff: 4..11).
VOC_AFFINITY_LAYERS = tuple(range(4, 11))
COCO_AFFINITY_LAYERS = tuple(range(4, 12))
# SPEC §5: box thresholds of the CAM refinement.
VOC_CAM_BOX_THRESHOLD = 0.4
COCO_CAM_BOX_THRESHOLD = 0.7
# SPEC §6: evaluated classes (VOC 20 + background, COCO 80 + background, COCO-Stuff 27 coarse).
VOC_EVAL_CLASSES = 21
COCO_EVAL_CLASSES = 81
COCO_STUFF_EVAL_CLASSES = 27

VOC_CAM = CamConfig(VOC_CAM_CLASSES, VOC_BACKGROUND, VOC_AFFINITY_LAYERS, VOC_CAM_BOX_THRESHOLD,
                    VOC_EVAL_CLASSES)
COCO_CAM = CamConfig(COCO_CAM_CLASSES, COCO_BACKGROUND, COCO_AFFINITY_LAYERS, COCO_CAM_BOX_THRESHOLD,
                     COCO_EVAL_CLASSES)
COCO_STUFF_CAM = CamConfig(COCO_STUFF_CAM_CLASSES, COCO_STUFF_CAM_BACKGROUND, COCO_AFFINITY_LAYERS,
                           COCO_CAM_BOX_THRESHOLD, COCO_STUFF_EVAL_CLASSES)


@dataclass(frozen=True)
class DatasetConfig:
    name: str
    class_names: tuple[str, ...]            # foreground classes, split-file ids index these
    background: tuple[str, ...]             # background words appended to the text rows
    params: TagCLIPParams                   # method constants for this dataset
    label_rel_threshold: float              # §4: F1 and label-file threshold
    split_label_map: Optional[Mapping[int, int]] = field(default=None)  # raw split id -> class id
    default_split: Optional[str] = None     # bundled split file (relative to the repo root)
    cam: Optional[CamConfig] = None         # CLIP-ES stage (segmentation datasets)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _voc_coco(name: str, classes, background, split: str, cam: CamConfig) -> DatasetConfig:
    return DatasetConfig(name, classes, background,
                         TagCLIPParams(refine_layers=REFINE_LAYERS, crop_rel_threshold=REL_THRESHOLD),
                         REL_THRESHOLD, default_split=split, cam=cam)


DATASETS: Mapping[str, DatasetConfig] = MappingProxyType({
    "voc2007": _voc_coco("voc2007", VOC_CLASSES, VOC_BACKGROUND, "imageset/voc2007/test_cls.txt", VOC_CAM),
    "voc2012": _voc_coco("voc2012", VOC_CLASSES, VOC_BACKGROUND, "imageset/voc2012/val.txt", VOC_CAM),
    "coco2014": _voc_coco("coco2014", COCO_CLASSES, COCO_BACKGROUND, "imageset/coco2014/val_cls.txt", COCO_CAM),
    "coco2017": _voc_coco("coco2017", COCO_CLASSES, COCO_BACKGROUND, "imageset/coco2017/val.txt", COCO_CAM),
    "cocostuff": DatasetConfig(
        "cocostuff", COCO_STUFF_CLASSES, (),
        TagCLIPParams(refine_layers=REFINE_LAYERS_COCOSTUFF, crop_rel_threshold=REL_THRESHOLD_COCOSTUFF),
        REL_THRESHOLD_COCOSTUFF,
        split_label_map=MappingProxyType(dict(COCO_STUFF_182_TO_171)),
        default_split="imageset/cocostuff/val.txt", cam=COCO_STUFF_CAM),
})


def get_dataset(name: str) -> DatasetConfig:
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}") from None


# ----------------------------------------------------------------------------- evaluation (SPEC §6)

VOC_EVAL_NAMES = ("background",) + VOC_CLASSES
COCO_EVAL_NAMES = ("background",) + COCO_CLASSES
COCO_STUFF_EVAL_NAMES = COCO_STUFF_COARSE


@dataclass(frozen=True)
class EvalConfig:
    """How CAM files and GT masks of one dataset become evaluated labels (SPEC §6).

    ``key_to_label[k]`` is the evaluated label of CAM class id ``k`` (VOC/COCO: ``k + 1``, label
    0 being the background; COCO-Stuff: the coarse class of fine-171 id ``k``). ``gt_map`` maps a
    raw GT value to the evaluated label (COCO-Stuff: fine-182 -> coarse-27; raw values beyond
    the table become the ignore label); ``None`` keeps the GT as stored.
    """
    name: str
    class_names: tuple[str, ...]            # display name of every evaluated label 0..n-1
    has_background: bool                    # a background channel competes with the CAMs
    key_to_label: tuple[int, ...]           # CAM class id -> evaluated label
    gt_map: Optional[tuple[int, ...]] = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_keys(self) -> int:
        """Size of the CAM vocabulary: keys must lie in ``[0, num_keys)``."""
        return len(self.key_to_label)


EVAL_CONFIGS: Mapping[str, EvalConfig] = MappingProxyType({
    "voc2012": EvalConfig("voc2012", VOC_EVAL_NAMES, True, tuple(range(1, len(VOC_CLASSES) + 1))),
    "coco2017": EvalConfig("coco2017", COCO_EVAL_NAMES, True, tuple(range(1, len(COCO_CLASSES) + 1))),
    "cocostuff": EvalConfig("cocostuff", COCO_STUFF_EVAL_NAMES, False, tuple(COCO_STUFF_171_TO_27),
                            gt_map=tuple(COCO_STUFF_182_TO_27)),
})
assert all(c.num_classes == DATASETS[n].cam.eval_num_classes for n, c in EVAL_CONFIGS.items())


def get_eval_config(name: str) -> EvalConfig:
    try:
        return EVAL_CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown segmentation dataset {name!r}; choose from {', '.join(EVAL_CONFIGS)}") from None
