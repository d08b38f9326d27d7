"""Pseudo-mask PNGs: label maps saved as 8-bit palette PNGs (pixel value = class, 255 = ignore).

The palette is the PASCAL VOC colour map (:mod:`toolkit.palette`), so VOC masks look like the
dataset's own annotations; reading a mask with PIL (``np.array(Image.open(path))``) gives the labels
back. Files are written atomically (temporary file in the same folder, then renamed).
"""
from __future__ import annotations

import io
from typing import Optional

import numpy as np
from PIL import Image

from toolkit.files import write_bytes_atomic
from toolkit.palette import IGNORE_LABEL, palette_bytes


def apply_confidence_threshold(labels: np.ndarray, confidence: np.ndarray,
                               threshold: Optional[float] = None) -> np.ndarray:
    """``labels`` with every pixel whose ``confidence`` is below ``threshold`` set to 255.

    ``threshold=None`` (the default everywhere) returns ``labels`` unchanged.
    """
    if threshold is None:
        return labels
    if np.shape(confidence) != np.shape(labels):
        raise ValueError(f"confidence shape {np.shape(confidence)} differs from labels {np.shape(labels)}")
    out = np.array(labels, copy=True)
    out[np.asarray(confidence) < threshold] = IGNORE_LABEL
    return out


def encode_label_png(labels: np.ndarray) -> bytes:
    """PNG bytes of a 2-D label map (values 0..255) in palette mode with the VOC colour map."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"a label map is 2-D, got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError("label values must lie in 0..255")
    height, width = labels.shape
    img = Image.frombytes("P", (width, height), np.ascontiguousarray(labels, dtype=np.uint8).tobytes())
    img.putpalette(palette_bytes())
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_label_png(path, labels: np.ndarray, confidence: Optional[np.ndarray] = None,
                    confidence_threshold: Optional[float] = None) -> None:
    """Save a label map as a palette PNG, atomically; optionally 255 below a confidence."""
    if confidence_threshold is not None:
        if confidence is None:
            raise ValueError("a confidence threshold needs a confidence map")
        labels = apply_confidence_threshold(labels, confidence, confidence_threshold)
    write_bytes_atomic(path, encode_label_png(labels))
