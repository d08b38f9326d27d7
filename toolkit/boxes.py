"""Score map -> boxes (SPEC §7), shared by TagCLIP (§3.6) and the CAM stage (§5).

``scoremap2bbox`` reproduces the reference exactly: the map is scaled to uint8 by
truncation, binarised with OpenCV's strict ``>`` at ``int(threshold * max)``, and every
contour's bounding rectangle becomes a box whose right/bottom ends are clipped to
``size - 1`` (quirk Q2) and then used as EXCLUSIVE slice ends.
"""
from __future__ import annotations

import cv2
import numpy as np

# SPEC §7: contour retrieval per stage.
TAGCLIP_CONTOURS = cv2.RETR_EXTERNAL   # outer contours only
CAM_CONTOURS = cv2.RETR_TREE           # the whole hierarchy (holes add boxes)
UINT8_MAX = 255
EMPTY_BOX = (0, 0, 0, 0)


def scoremap2bbox(scoremap: np.ndarray, threshold, mode: int = TAGCLIP_CONTOURS) -> list[tuple[int, int, int, int]]:
    """Boxes (x0, y0, x1, y1) of a map in [0, 1].

    ``threshold`` keeps the caller's numeric type on purpose: the reference multiplies a
    float32 value (TagCLIP) or a Python float (CAM stage) by the uint8 maximum, and the
    product is truncated with ``int`` — pass ``np.float32`` or ``float`` accordingly.
    NaN maps (a constant map after min-max normalisation) count as all zero; a NaN
    threshold as 0 — the reference crashes on them.
    """
    h, w = scoremap.shape
    u8 = (np.nan_to_num(scoremap, nan=0.0) * UINT8_MAX).astype(np.uint8)
    level = threshold * u8.max()
    level = 0 if np.isnan(level) else int(level)
    _, binary = cv2.threshold(u8, level, UINT8_MAX, cv2.THRESH_BINARY)
    contours, _ = cv2.findContours(binary, mode, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return [EMPTY_BOX]
    boxes = []
    for contour in contours:
        x, y, bw, bh = cv2.boundingRect(contour)
        boxes.append((x, y, min(x + bw, w - 1), min(y + bh, h - 1)))
    return boxes


def box_union(boxes, shape: tuple[int, int]) -> np.ndarray:
    """0/1 float32 grid with ``[y0:y1, x0:x1]`` set for every box (end-exclusive)."""
    grid = np.zeros(shape, dtype=np.float32)
    for x0, y0, x1, y1 in boxes:
        grid[y0:y1, x0:x1] = 1.0
    return grid


def box_masks(maps: np.ndarray, thresholds, mode: int) -> np.ndarray:
    """(..., gh, gw) score maps -> (..., gh, gw) float32 0/1: per map, the union of its boxes
    (:func:`scoremap2bbox` at that map's threshold, then :func:`box_union`).

    ``thresholds`` broadcasts against the maps' leading dimensions and keeps its numeric type
    (see :func:`scoremap2bbox`): a float32 array for TagCLIP's per-map means, a Python float
    for the CAM stage's fixed threshold."""
    grid = maps.shape[-2:]
    flat = maps.reshape(-1, *grid)                                         # (..., gh, gw) -> (n, gh, gw)
    levels = np.broadcast_to(np.asarray(thresholds), maps.shape[:-2]).reshape(-1)
    out = np.empty(flat.shape, dtype=np.float32)
    for i, (scores, level) in enumerate(zip(flat, levels)):
        out[i] = box_union(scoremap2bbox(scores, level, mode), grid)
    return out.reshape(maps.shape)
