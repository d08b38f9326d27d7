"""Label maps' colours and their ignore label, shared by masks, evaluation and pictures.

The palette is the PASCAL VOC colour map: label 0 black, 1 (128, 0, 0), 2 (0, 128, 0), ..., and
255 (224, 224, 192), VOC's colour for the ignored "void" pixels.
"""
from __future__ import annotations

import functools

import numpy as np

# The label of pixels every evaluation and trainer ignores (VOC's "void"): in GT masks, in
# pseudo masks below a confidence threshold, and for GT values outside the evaluated classes.
IGNORE_LABEL = 255
# Entries of an 8-bit palette.
PALETTE_SIZE = 256


@functools.lru_cache(maxsize=None)
def palette_bytes(n: int = PALETTE_SIZE) -> bytes:
    """The first ``n`` colours of :func:`voc_colormap` as PIL ``putpalette`` bytes (R, G, B, ...)."""
    index = np.arange(n, dtype=np.int64)
    rgb = np.zeros((n, 3), dtype=np.int64)
    # Bit b of the index, for b = 0, 1, 2, 3, ..., goes to channel b % 3 (R, G, B), at bit
    # position 7 - b // 3 of that channel: the three lowest index bits become the MSBs.
    for level in range(8):
        for channel in range(3):
            bit = (index >> (3 * level + channel)) & 1
            rgb[:, channel] |= bit << (7 - level)
    return rgb.astype(np.uint8).tobytes()


def voc_colormap(n: int = PALETTE_SIZE) -> np.ndarray:
    """The PASCAL VOC colour map: ``n`` x 3 uint8 (0 black, 1 (128, 0, 0), 2 (0, 128, 0), ...)."""
    if not 0 < n <= PALETTE_SIZE:
        raise ValueError(f"a palette has 1..256 entries, got {n}")
    return np.frombuffer(palette_bytes(n), dtype=np.uint8).reshape(n, 3).copy()
