"""Helpers of the evaluation / CRF tests: golden CAMs, GT folders and the reference scores.

Everything is read from ``tests/fixtures/golden``: ``reference/cams_<variant>_saved_npy.npz``
(the dicts the reference np.save'd), ``reference/eval_<variant>_preds/<id>_{cam,crf}.png``
(the label maps the reference fed to ``scores()``), ``inputs/<DS>/{JPEGImages,
SegmentationClass,split.txt}`` and ``eval_scores.json`` (the manifest's ``eval`` section).
"""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

TESTS_DIR = Path(__file__).resolve().parent
GOLDEN = TESTS_DIR / "fixtures" / "golden"
REFERENCE = GOLDEN / "reference"
INPUTS = GOLDEN / "inputs"

# Parity tolerance of the brief: mIoU and every class IoU within 0.002 (NaN where NaN).
IOU_TOL = 0.002

VARIANTS = ("voc2012", "voc2012_gtlabels", "coco2017", "coco2017_gtlabels", "cocostuff", "cocostuff_gtlabels")
DATASET_OF = {"voc2012": "voc2012", "coco2017": "coco2017", "cocostuff": "cocostuff"}
FOLDER_OF = {"voc2012": "VOC", "coco2017": "COCO", "cocostuff": "COCOSTUFF"}


def dataset_of(variant: str) -> str:
    return DATASET_OF[variant.replace("_gtlabels", "")]


def folder(variant_or_dataset: str) -> Path:
    return INPUTS / FOLDER_OF[dataset_of(variant_or_dataset)]


@functools.lru_cache(maxsize=None)
def expected() -> dict:
    return json.loads((GOLDEN / "eval_scores.json").read_text(encoding="utf-8"))["variants"]


def expected_score(variant: str, kind: str) -> dict:
    """``kind``: ``eval_cam`` or ``eval_crf``."""
    return expected()[variant][kind]["score"]


def variant_ids(variant: str) -> list[str]:
    return list(expected()[variant]["ids"])


@functools.lru_cache(maxsize=None)
def golden_cams(variant: str) -> dict:
    """``{id: (keys, attn_highres)}`` of the reference CAM files."""
    with np.load(REFERENCE / f"cams_{variant}_saved_npy.npz") as z:
        ids = sorted({k.split("/")[0] for k in z.files})
        return {i: (z[f"{i}/keys"], z[f"{i}/attn_highres"]) for i in ids}


def write_cam_dir(variant: str, out_dir: Path) -> Path:
    """Write the golden CAMs of ``variant`` as ``{id}.npy`` dicts (the reference format)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for image_id, (keys, cams) in golden_cams(variant).items():
        np.save(out_dir / f"{image_id}.npy", {"keys": keys, "attn_highres": cams})
    return out_dir


def reference_pred(variant: str, image_id: str, kind: str) -> np.ndarray:
    """The reference's label map (``kind``: ``cam`` or ``crf``)."""
    with Image.open(REFERENCE / f"eval_{variant}_preds" / f"{image_id}_{kind}.png") as img:
        return np.array(img)


def as_float(v) -> float:
    if v is None:
        return math.nan
    return math.nan if isinstance(v, str) and v.lower() == "nan" else float(v)


def compare_scores(actual: dict, expected_dict: dict, num_classes: int) -> tuple[float, float]:
    """Assert the parity tolerance; return (|dmIoU|, max |dIoU|). ``actual`` is a score dict with
    ``Mean IoU`` and ``Class IoU`` keyed by int or str."""
    d_miou = abs(as_float(actual["Mean IoU"]) - as_float(expected_dict["Mean IoU"]))
    assert d_miou <= IOU_TOL, (actual["Mean IoU"], expected_dict["Mean IoU"])
    worst = 0.0
    for c in range(num_classes):
        got = as_float(actual["Class IoU"].get(c, actual["Class IoU"].get(str(c))))
        want = as_float(expected_dict["Class IoU"][str(c)])
        assert math.isnan(got) == math.isnan(want), (c, got, want)
        if not math.isnan(want):
            assert abs(got - want) <= IOU_TOL, (c, got, want)
            worst = max(worst, abs(got - want))
    return d_miou, worst
