"""CLIP-ES dataset registry: every fact of the CAM and evaluation stages, in one place (SPEC §5, §6, §8).

``CAM_CONFIGS[name]`` (:class:`CamConfig`) is what ``generate_cams.py --dataset name`` needs,
``EVAL_CONFIGS[name]`` (:class:`EvalConfig`) what ``eval_cam.py`` and ``eval_cam_with_crf.py``
need. Scripts take ``--dataset`` and read everything else from here; nothing is guessed from
paths (quirk Q9). The class lists themselves are the datasets' (:mod:`toolkit.vocab`); the
CAM stage's synonyms of them are CLIP-ES's and live here.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Mapping, Optional, Sequence

from toolkit.depths import scale_layers
from toolkit.vocab import (
    COCO_BACKGROUND,
    COCO_CLASSES,
    COCO_STUFF_171_TO_27,
    COCO_STUFF_182_TO_27,
    COCO_STUFF_182_TO_171,
    COCO_STUFF_CLASSES,
    COCO_STUFF_COARSE,
    VOC_BACKGROUND,
    VOC_CLASSES,
)

# SPEC §8: CAM-stage synonyms (CLIP-ES), replacing the classification name at the same index.
VOC_CAM_SYNONYMS = {
    "bird": "bird avian", "chair": "chair seat", "person": "person with clothes,people,human",
    "tvmonitor": "tvmonitor screen",
}
COCO_CAM_SYNONYMS = {
    "person": "person with clothes,people,human", "bird": "bird avian", "backpack": "backpack,bag",
    "umbrella": "umbrella,parasol", "handbag": "handbag,purse", "tie": "necktie",
    "snowboard": "sknowboard",  # sic: the reference's spelling, kept for parity
    "baseball glove": "glove", "spoon": "dessertspoon", "chair": "chair seat",
    "tvmonitor": "tvmonitor screen", "remote": "remote control", "hair drier": "hairdrier,blowdrier",
}
VOC_CAM_CLASSES = tuple(VOC_CAM_SYNONYMS.get(n, n) for n in VOC_CLASSES)
COCO_CAM_CLASSES = tuple(COCO_CAM_SYNONYMS.get(n, n) for n in COCO_CLASSES)
# SPEC §5: COCO-Stuff CAMs compete with one background word.
COCO_STUFF_CAM_BACKGROUND = ("background",)

# SPEC §5: COCO-Stuff CAM-stage names: the 171 classes with the CLIP-ES synonyms.
COCO_STUFF_CAM_SYNONYMS = {
    "person": "person with clothes,people,human", "airplane": "aeroplane", "bird": "bird avian",
    "backpack": "backpack,bag", "umbrella": "umbrella,parasol", "handbag": "handbag,purse",
    "tie": "necktie", "baseball glove": "glove", "spoon": "dessertspoon", "chair": "chair seat",
    "tv": "tvmonitor screen", "remote": "remote control", "hair drier": "hairdrier,blowdrier",
}
COCO_STUFF_CAM_CLASSES = tuple(COCO_STUFF_CAM_SYNONYMS.get(n, n) for n in COCO_STUFF_CLASSES)



@dataclass(frozen=True)
class CamConfig:
    """CLIP-ES CAM-stage facts of one dataset (SPEC §5)."""
    class_names: tuple[str, ...]        # CAM-stage names (synonyms), same indices as classification
    background: tuple[str, ...]         # background words of the CAM softmax
    affinity_layers: tuple[int, ...]    # blocks averaged into the affinity
    box_threshold: float                # scoremap2bbox threshold of the refinement boxes
    eval_num_classes: int               # classes of the evaluation (incl. background where used)
    display_names: tuple[str, ...]      # the dataset's own class names (pictures, file names)

    def for_depth(self, depth: int, affinity_layers: Optional[Sequence[int]] = None) -> "CamConfig":
        """These facts for a vision tower of ``depth`` blocks: ``affinity_layers`` given (blocks
        of that tower), else the paper's carried over by :func:`toolkit.depths.scale_layers`;
        ValueError if a block does not exist."""
        layers = tuple(affinity_layers) if affinity_layers else scale_layers(self.affinity_layers, depth)
        if not layers or not all(0 <= b < depth for b in layers):
            raise ValueError(f"affinity blocks {list(layers)} do not exist in a {depth}-block tower")
        return replace(self, affinity_layers=layers)


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
                    VOC_EVAL_CLASSES, VOC_CLASSES)
COCO_CAM = CamConfig(COCO_CAM_CLASSES, COCO_BACKGROUND, COCO_AFFINITY_LAYERS, COCO_CAM_BOX_THRESHOLD,
                     COCO_EVAL_CLASSES, COCO_CLASSES)
COCO_STUFF_CAM = CamConfig(COCO_STUFF_CAM_CLASSES, COCO_STUFF_CAM_BACKGROUND, COCO_AFFINITY_LAYERS,
                           COCO_CAM_BOX_THRESHOLD, COCO_STUFF_EVAL_CLASSES, COCO_STUFF_CLASSES)

# SPEC §5 / §8: the datasets of the CAM stage.
CAM_CONFIGS: Mapping[str, CamConfig] = MappingProxyType({
    "voc2012": VOC_CAM, "coco2017": COCO_CAM, "cocostuff": COCO_STUFF_CAM,
})


# SPEC §8 / Q7: a ground-truth split's class ids -> the CAM vocabulary's indices, where they
# differ (COCO-Stuff splits hold the 182-index ids; VOC and COCO splits hold the class indices).
GT_SPLIT_LABEL_MAPS: Mapping[str, Mapping[int, int]] = MappingProxyType({
    "cocostuff": MappingProxyType(dict(COCO_STUFF_182_TO_171)),
})


def get_cam_config(name: str) -> CamConfig:
    try:
        return CAM_CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown segmentation dataset {name!r}; choose from {', '.join(CAM_CONFIGS)}") from None


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


def _check_consistent() -> None:
    """The two tables describe the same datasets with the same class counts."""
    if set(CAM_CONFIGS) != set(EVAL_CONFIGS) or any(
            CAM_CONFIGS[n].eval_num_classes != c.num_classes for n, c in EVAL_CONFIGS.items()):
        raise RuntimeError("clip_es.registry: CAM_CONFIGS and EVAL_CONFIGS disagree")


_check_consistent()


def get_eval_config(name: str) -> EvalConfig:
    try:
        return EVAL_CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown segmentation dataset {name!r}; choose from {', '.join(EVAL_CONFIGS)}") from None
