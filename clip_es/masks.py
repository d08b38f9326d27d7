"""Pseudo-mask PNGs: label maps saved as 8-bit palette PNGs (pixel value = class, 255 = ignore).

The palette is the PASCAL VOC colour map (256 entries), so VOC masks look like the dataset's
own annotations; reading a mask with PIL (``np.array(Image.open(path))``) gives the labels
back. Files are written atomically (temporary file in the same folder, then renamed).
"""
from __future__ import annotations

import functools
import io
from typing import Optional

import numpy as np
from PIL import Image

from tagclip.images import read_image_file
from tagclip.labels import atomic_writer

IGNORE_LABEL = 255


@functools.lru_cache(maxsize=None)
def _colormap_bytes(n: int) -> bytes:
    index = np.arange(n, dtype=np.int64)
    rgb = np.zeros((n, 3), dtype=np.int64)
    # Bit b of the index, for b = 0, 1, 2, 3, ..., goes to channel b % 3 (R, G, B), at bit
    # position 7 - b // 3 of that channel: the three lowest index bits become the MSBs.
    for level in range(8):
        for channel in range(3):
            bit = (index >> (3 * level + channel)) & 1
            rgb[:, channel] |= bit << (7 - level)
    return rgb.astype(np.uint8).tobytes()


def voc_colormap(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map: ``n`` x 3 uint8 (0 black, 1 (128, 0, 0), 2 (0, 128, 0), ...)."""
    if not 0 < n <= 256:
        raise ValueError(f"a palette has 1..256 entries, got {n}")
    return np.frombuffer(_colormap_bytes(n), dtype=np.uint8).reshape(n, 3).copy()


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
    img.putpalette(_colormap_bytes(256))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_bytes_atomic(path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:func:`tagclip.labels.atomic_writer`)."""
    with atomic_writer(path) as handle:
        handle.write(data)


def write_label_png(path, labels: np.ndarray, confidence: Optional[np.ndarray] = None,
                    confidence_threshold: Optional[float] = None) -> None:
    """Save a label map as a palette PNG, atomically; optionally 255 below a confidence."""
    if confidence_threshold is not None:
        if confidence is None:
            raise ValueError("a confidence threshold needs a confidence map")
        labels = apply_confidence_threshold(labels, confidence, confidence_threshold)
    write_bytes_atomic(path, encode_label_png(labels))


def read_label_png(path) -> np.ndarray:
    """Labels of a mask written by :func:`write_label_png` (uint8 H x W)."""
    return read_image_file(path, "mask", convert=np.array)
