"""Segmentation evaluation of CAMs (SPEC §6): prediction rules, CAM / GT readers and one
confusion-matrix evaluator.

Prediction rule (VOC, COCO; quirk ``eval_cam_bg`` of the golden manifest)
    The CAMs are the float16 ``attn_highres`` maps of the CAM file (K x H x W). A background
    score ``(1 - max_k cam) ** t`` is computed IN THE CAMS' DTYPE (float16 for every CAM file
    the toolkit writes), stacked in front of the CAMs, and the label of a pixel is the argmax
    of that stack (ties -> lowest index, so the background wins a tie): 0 for background,
    ``keys[k] + 1`` for CAM channel ``k``.
COCO-Stuff (quirk ``cocostuff_cams_eval``)
    No background channel: label = coarse class of ``keys[argmax cams]`` (fine-171 -> coarse-27);
    the GT holds fine-182 ids, mapped to coarse-27; any GT value >= 182 becomes 255 (ignored).
Background threshold search (reference ``eval_cam.py``)
    ``--cam_eval_thres`` (default 2) selects the candidates: a value >= 1 tries only ``t = 1``
    (the CAM type is ``attn_highres``); a value < 1 tries the constant background scores
    0.05, 0.10, ..., 0.60. A candidate ``t < 1`` is a CONSTANT background score ``t`` instead of
    the power rule. The candidate with the highest mIoU wins (first one on ties, and only a
    mIoU strictly above 0 counts); when no candidate scores above 0 (or all are NaN) the
    final result uses ``t = 0``, i.e. a constant-0 background, which only wins where every CAM
    is 0. See :func:`threshold_candidates` and :func:`select_threshold`.
Scores (reference ``scores()``, reproduced operation for operation in float64)
    Confusion matrix over the pixels whose GT lies in ``[0, n)`` (everything else, 255
    included, is ignored). ``acc = trace / total``; ``mean accuracy = nanmean(diag / GT
    counts)``; ``IoU = diag / (GT counts + predicted counts - diag)``: NaN for a class that is
    neither in the GT nor predicted, 0 for a class predicted but absent from the GT; ``mIoU =
    nanmean(IoU over the classes present in the GT)``; ``FW IoU = sum(freq * IoU)`` over
    classes with GT pixels.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import numpy as np

from clip_es.cam_files import load_cam
from clip_es.registry import EvalConfig
from toolkit.errors import InputError
from toolkit.files import read_bytes
from toolkit.images import read_image_file

IGNORE_LABEL = 255
# Reference CAM type: the only array of the CAM dict that is evaluated.
CAM_TYPE = "attn_highres"
# Reference eval_cam.py: cam_eval_thres default and the candidate lists.
DEFAULT_CAM_EVAL_THRES = 2.0
POWER_CANDIDATES = (1,)                  # cam_eval_thres >= 1 and an 'attn' CAM type
CONSTANT_CANDIDATES = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6)
FALLBACK_THRES = 0                       # used when no candidate gives mIoU > 0

SCORE_KEYS = ("Pixel Accuracy", "Mean Accuracy", "Frequency Weighted IoU", "Mean IoU", "Class IoU")


# ----------------------------------------------------------------------------- scores

class Scores(NamedTuple):
    """Result of :meth:`SegEvaluator.scores` (all float64; fractions, not percentages)."""

    pixel_accuracy: float
    mean_accuracy: float
    fw_iou: float
    miou: float
    class_iou: np.ndarray      # (n,) NaN where a class is neither in the GT nor predicted
    present: np.ndarray        # (n,) bool: the class has GT pixels (the classes mIoU averages)

    def as_dict(self) -> dict:
        """The reference's score dict: ``{"Pixel Accuracy": ..., "Class IoU": {0: ..., ...}}``."""
        return {
            "Pixel Accuracy": float(self.pixel_accuracy),
            "Mean Accuracy": float(self.mean_accuracy),
            "Frequency Weighted IoU": float(self.fw_iou),
            "Mean IoU": float(self.miou),
            "Class IoU": {i: float(v) for i, v in enumerate(self.class_iou)},
        }


class SegEvaluator:
    """Confusion-matrix evaluator (rows = GT class, columns = predicted class).

    ``update(pred, gt)`` counts the pixels whose GT is in ``[0, num_classes)``; GT values
    outside that range (``ignore_index`` and anything else) are skipped, as in the reference.
    GT values that are neither valid nor ``ignore_index`` are counted in
    :attr:`unexpected_gt_pixels` so that a caller can warn about a wrong ``--dataset``.
    Evaluators of disjoint image sets combine with :meth:`merge` or ``+``; the counts are
    integers, so the result does not depend on the order.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_LABEL):
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.hist = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        self.unexpected_gt_pixels = 0
        self.images = 0

    def update(self, pred, gt) -> "SegEvaluator":
        """Add one image (``pred`` and ``gt``: integer label maps of the same shape)."""
        pred = np.asarray(pred)
        gt = np.asarray(gt)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction shape {pred.shape} differs from GT shape {gt.shape}")
        for name, arr in (("prediction", pred), ("GT", gt)):
            if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
                raise ValueError(f"{name} must be an integer label map, got dtype {arr.dtype}")
        n = self.num_classes
        g = gt.ravel()
        valid = (g >= 0) & (g < n)
        self.unexpected_gt_pixels += int(np.count_nonzero(~valid & (g != self.ignore_index)))
        g = g[valid].astype(np.int64)
        p = pred.ravel()[valid].astype(np.int64)
        if p.size and (p.min() < 0 or p.max() >= n):
            bad = p[(p < 0) | (p >= n)][0]
            raise ValueError(f"predicted label {bad} outside [0, {n}) on a pixel with a valid GT")
        self.hist += np.bincount(n * g + p, minlength=n * n).reshape(n, n)
        self.images += 1
        return self

    def add_hist(self, hist, images: int = 1, unexpected_gt_pixels: int = 0) -> "SegEvaluator":
        """Add a confusion matrix computed elsewhere (e.g. by a worker process)."""
        hist = np.asarray(hist)
        if hist.shape != self.hist.shape:
            raise ValueError(f"confusion matrix shape {hist.shape} differs from {self.hist.shape}")
        self.hist += hist.astype(np.int64)
        self.images += int(images)
        self.unexpected_gt_pixels += int(unexpected_gt_pixels)
        return self

    def merge(self, other: "SegEvaluator") -> "SegEvaluator":
        """Add the counts of ``other`` (same number of classes) into this evaluator."""
        if not isinstance(other, SegEvaluator):
            raise TypeError(f"cannot merge {type(other).__name__} into SegEvaluator")
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes} classes into {self.num_classes}")
        return self.add_hist(other.hist, other.images, other.unexpected_gt_pixels)

    def copy(self) -> "SegEvaluator":
        out = SegEvaluator(self.num_classes, self.ignore_index)
        return out.merge(self)

    def __add__(self, other: "SegEvaluator") -> "SegEvaluator":
        return self.copy().merge(other)

    def __iadd__(self, other: "SegEvaluator") -> "SegEvaluator":
        return self.merge(other)

    def scores(self) -> Scores:
        """The reference's ``scores()`` arithmetic on the accumulated matrix (float64)."""
        hist = self.hist.astype(np.float64)
        diag = np.diag(hist)
        gt_count = hist.sum(axis=1)
        pred_count = hist.sum(axis=0)
        total = hist.sum()
        with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of an all-NaN slice
            acc = diag.sum() / total
            mean_acc = np.nanmean(diag / gt_count)
            iou = diag / (gt_count + pred_count - diag)
            present = gt_count > 0
            miou = np.nanmean(iou[present])
            freq = gt_count / total
            fw_iou = (freq[freq > 0] * iou[freq > 0]).sum()
        return Scores(float(acc), float(mean_acc), float(fw_iou), float(miou), iou, present)


# ----------------------------------------------------------------------------- prediction

def threshold_candidates(cam_eval_thres: float = DEFAULT_CAM_EVAL_THRES) -> tuple:
    """Background thresholds the reference tries for ``attn_highres`` CAMs."""
    return CONSTANT_CANDIDATES if cam_eval_thres < 1 else POWER_CANDIDATES


def select_threshold(mious: Sequence[tuple]) -> float:
    """The reference's choice among ``(thres, mIoU)`` pairs in trial order.

    Highest mIoU strictly above 0, first on ties; :data:`FALLBACK_THRES` (0) when none is above 0.
    """
    best, best_thres = 0.0, FALLBACK_THRES
    for thres, miou in mious:
        if miou > best:  # NaN never compares greater
            best, best_thres = miou, thres
    return best_thres


def background_score(cams: np.ndarray, thres=1) -> np.ndarray:
    """Background channel (1 x H x W) in the CAMs' dtype.

    ``thres >= 1``: ``(1 - max_k cams) ** thres`` (float16 arithmetic on float16 CAMs);
    ``thres < 1``: the constant ``thres`` (reference ``np.pad(..., constant_values=thres)``).
    """
    if thres < 1:
        return np.full((1,) + cams.shape[1:], thres, dtype=cams.dtype)
    if cams.shape[0] == 0:  # no classes: background everywhere
        return np.ones((1,) + cams.shape[1:], dtype=cams.dtype)
    # Python scalars keep the CAMs' dtype (NEP 50): 1 - fp16 and fp16 ** int stay float16.
    thres = int(thres) if float(thres).is_integer() else float(thres)
    return np.power(1 - np.max(cams, axis=0, keepdims=True), thres)


def score_stack(cams: np.ndarray, thres=1, has_background: bool = True) -> np.ndarray:
    """``[background, cams...]`` (or the CAMs alone without background), in the CAMs' dtype."""
    if not has_background:
        return cams
    return np.concatenate((background_score(cams, thres), cams), axis=0)


def key_lut(config: EvalConfig) -> np.ndarray:
    """Lookup table: evaluated label of every CAM class id (``config.key_to_label``)."""
    return np.asarray(config.key_to_label, dtype=np.int64)


def predict(keys, cams, config: EvalConfig, thres=1) -> tuple[np.ndarray, np.ndarray]:
    """Evaluated label map (uint8) and its confidence (winning score, CAM dtype) for one image."""
    stack = score_stack(cams, thres, config.has_background)
    idx = np.argmax(stack, axis=0)
    labels = channel_labels(keys, config)[idx]
    confidence = np.take_along_axis(stack, idx[None], axis=0)[0]
    return labels.astype(np.uint8), confidence


def channel_labels(keys, config: EvalConfig) -> np.ndarray:
    """Evaluated label of every channel of the score stack (background channel first if any)."""
    mapped = key_lut(config)[np.asarray(keys, dtype=np.int64)]
    if config.has_background:
        mapped = np.concatenate(([0], mapped))
    return mapped


def gt_to_eval(gt, config: EvalConfig) -> np.ndarray:
    """GT mask as evaluated labels (COCO-Stuff: fine-182 -> coarse-27, other values -> 255)."""
    gt = np.asarray(gt)
    if config.gt_map is None:
        return gt
    lut = np.full(max(256, int(gt.max(initial=0)) + 1), IGNORE_LABEL, dtype=np.uint8)
    lut[:len(config.gt_map)] = config.gt_map
    idx = gt.astype(np.int64)
    return np.where(idx < 0, IGNORE_LABEL, lut[np.maximum(idx, 0)]).astype(np.uint8)


# ----------------------------------------------------------------------------- files

def read_cam(path, config: EvalConfig, cam_type: str = CAM_TYPE,
             expected_hw: Optional[tuple[int, int]] = None) -> tuple[np.ndarray, np.ndarray]:
    """Load and validate ``{id}.npy`` for ``config``: ``(keys int64 (K,), cams (K, H, W))``.

    Parsing is :func:`clip_es.cams.load_cam` (arrays only, no arbitrary pickled objects, sizes
    bounded before anything is allocated: by ``expected_hw``, the image's (H, W), when the
    caller knows it, else by the toolkit's limits); here
    the keys are checked against the dataset's vocabulary. A file without classes (an image
    with no labels) predicts background everywhere where the dataset has a background;
    COCO-Stuff has none, so such a file is an error there. Every problem is an
    :class:`InputError` naming the file.
    """
    if cam_type != CAM_TYPE:
        raise ValueError(f"unsupported cam_type {cam_type!r} (only {CAM_TYPE!r})")
    path = Path(path)
    keys, cams = load_cam(path, expected_hw)
    if cams.shape[1] == 0 or cams.shape[2] == 0:
        raise InputError(path, f"empty CAMs of shape {cams.shape}")
    if keys.size == 0 and not config.has_background:
        raise InputError(path, f"CAM file has no classes ({config.name} has no background to predict)")
    bad = keys[(keys < 0) | (keys >= config.num_keys)]
    if bad.size:
        raise InputError(path, f"class id {int(bad[0])} is outside the {config.num_keys}-class "
                               f"{config.name} vocabulary")
    if not np.isfinite(cams).all():
        raise InputError(path, "CAMs contain NaN or infinite values")
    return keys, cams


def _label_pixels(img) -> tuple[str, np.ndarray]:
    return img.mode, np.array(img)


def read_gt(path, config: EvalConfig) -> np.ndarray:
    """Load a GT mask (palette or grey PNG: the stored value is the class) as evaluated labels.

    Opened by :func:`toolkit.images.read_image_file`: a mask over the pixel limit is an
    InputError before it is decoded."""
    path = Path(path)
    mode, arr = read_image_file(path, "GT mask", _label_pixels)
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer) and arr.dtype != np.bool_:
        raise InputError(path, f"GT mask must be a single-channel label image (palette or grey), "
                               f"got PIL mode {mode}")
    return gt_to_eval(arr, config)


def _header_size(img) -> tuple[int, int]:
    return img.size


def read_bgr(path) -> np.ndarray:
    """Read an image as 8-bit BGR (H x W x 3), as ``cv2.imread(path, IMREAD_COLOR)`` does,
    except that the EXIF orientation is ignored so that the image matches its CAM (the CAM
    stage reads the stored pixel layout).

    PIL reads the header first (:func:`toolkit.images.read_image_file`: the pixel limit, a
    file PIL cannot identify is an InputError); the pixels are OpenCV's, as in the reference's
    CRF (PIL's JPEG decoder is a different libjpeg build, and PIL converts CMYK JPEGs and
    16-bit PNGs otherwise)."""
    import cv2

    path = Path(path)
    raw = read_bytes(path, "image")
    width, height = read_image_file(path, "image", _header_size, data=raw)
    image = cv2.imdecode(np.frombuffer(raw, dtype=np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if image is None:
        raise InputError(path, "cannot decode image")
    if image.shape[:2] != (height, width):
        raise InputError(path, f"decoded image is {image.shape[1]}x{image.shape[0]} (WxH), its header says "
                               f"{width}x{height}")
    return image


def check_same_size(path, shape_hw, cam_shape_hw, what: str) -> None:
    if tuple(shape_hw) != tuple(cam_shape_hw):
        raise InputError(path, f"{what} size {shape_hw[1]}x{shape_hw[0]} (WxH) differs from the CAM's "
                               f"{cam_shape_hw[1]}x{cam_shape_hw[0]}")


def gt_path(gt_root, image_id: str) -> Path:
    return Path(gt_root) / f"{image_id}.png"


def check_dir(path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise InputError(path, f"{what} not found")
    if not path.is_dir():
        raise InputError(path, f"{what} is not a directory")
    if not os.access(path, os.R_OK | os.X_OK):
        raise InputError(path, f"{what} is not readable")
    return path


def format_scores(scores: Scores, class_names: Sequence[str], thres: Optional[float] = None) -> str:
    """Human-readable report: the four summary scores, then every class IoU with its name."""
    lines = []
    if thres is not None:
        lines.append(f"background threshold: {thres:g}")
    lines += [
        f"Pixel Accuracy        : {scores.pixel_accuracy:.6f}",
        f"Mean Accuracy         : {scores.mean_accuracy:.6f}",
        f"Frequency Weighted IoU: {scores.fw_iou:.6f}",
        f"Mean IoU              : {scores.miou:.6f}  "
        f"(over the {int(scores.present.sum())} classes present in the GT)",
        "Class IoU:",
    ]
    width = max(len(n) for n in class_names)
    for i, (name, iou, present) in enumerate(zip(class_names, scores.class_iou, scores.present)):
        note = "" if present else "  (not in GT; not in mIoU)"
        value = "nan" if np.isnan(iou) else f"{iou:.6f}"
        lines.append(f"  {i:3d} {name:<{width}}  {value}{note}")
    return "\n".join(lines) + "\n"
