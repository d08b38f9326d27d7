"""Block indices the papers give for 12-block CLIPs, carried to models of other depths.

TagCLIP's refinement layers (8–10; 0–10 for COCO-Stuff) and CLIP-ES's affinity layers (4–10 for
VOC, 4–11 for COCO) are defined for ViT-B's 12 blocks; the papers give no numbers for other
depths. The toolkit's rule (:func:`scale_layers`): block ``i`` of 12 stands for the same
fraction of a deeper (or shallower) tower, blocks ``floor(i·d/12) .. floor((i+1)·d/12) − 1`` of
``d``. A 24-block ViT-L/14 thus refines with blocks 16–21 and takes its VOC affinity from
blocks 8–21. On 12 blocks the rule changes nothing. The commands' ``--refine_layers`` and
``--affinity_layers`` override it.
"""
from __future__ import annotations

from typing import Sequence

# The depth the papers' block indices are given for (ViT-B/16).
PAPER_DEPTH = 12


def scale_layers(layers: Sequence[int], depth: int, paper_depth: int = PAPER_DEPTH) -> tuple[int, ...]:
    """``layers`` (indices for ``paper_depth`` blocks) carried to ``depth`` blocks (rule above),
    ascending, without repeats."""
    if depth == paper_depth:
        return tuple(layers)
    out: set[int] = set()
    for i in layers:
        start, end = (i * depth) // paper_depth, ((i + 1) * depth) // paper_depth
        out.update(range(start, max(end, start + 1)))
    return tuple(sorted(b for b in out if b < depth))


def parse_layers(text: str) -> tuple[int, ...]:
    """``"8,9,10"`` or ``"16-21"`` (ranges inclusive) -> block indices; ValueError otherwise."""
    blocks: list[int] = []
    for part in text.split(","):
        part = part.strip()
        first, _, last = part.partition("-")
        if not first.isdigit() or (last and not last.isdigit()):
            raise ValueError(f"not a block list: {text!r} (examples: 8,9,10 or 16-21)")
        blocks.extend(range(int(first), int(last or first) + 1))
    if not blocks:
        raise ValueError(f"not a block list: {text!r}")
    return tuple(sorted(set(blocks)))
