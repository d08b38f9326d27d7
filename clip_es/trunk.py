"""Blocks 0 .. n−2 of the vision tower for the CAM stage (SPEC §5, step 1; quirk Q1).

The positional table is always resized to the image's grid and rounded through float16
(:func:`cam_positional_table`), as CLIP-ES did, even at the native grid. The affinity maps
are summed as the blocks run, so no block's full map is kept.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from clip import CLIP
from clip.kernels import ALL_AT_ONCE, AttentionSchedule
from clip.model import resize_positional_embedding


def cam_positional_table(table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Quirk Q1 (CLIP-ES): the table resized to ``grid`` whatever the grid, then rounded
    through float16 (the reference wrapped it in a float16 tensor) and back."""
    return resize_positional_embedding(table, grid).half().to(table.dtype)


class Trunk(NamedTuple):
    tokens: torch.Tensor            # (1, 1 + P, width): output of blocks 0 .. n−2
    affinity_sum: torch.Tensor      # (P, P) float32: sum of the maps of the affinity blocks among them
    grid: tuple[int, int]           # (h/16, w/16)


@torch.no_grad()
def encode_trunk(model: CLIP, image: torch.Tensor, affinity_layers: Sequence[int],
                 attention: AttentionSchedule = ALL_AT_ONCE) -> Trunk:
    """Blocks 0 .. n−2 (plain attention, no gradients) on one (3, h, w) input.

    Maps are computed only for the blocks in ``affinity_layers`` (their attention cut into
    steps by ``attention``); the others run the fused attention (same outputs up to float
    rounding).
    """
    visual = model.visual
    x = image[None].to(device=visual.conv1.weight.device)
    grid = visual.grid_of(x)
    tokens = visual.embed(x, cam_positional_table(visual.positional_embedding, grid))
    n_patches = grid[0] * grid[1]
    affinity = torch.zeros(n_patches, n_patches, dtype=torch.float32, device=tokens.device)
    wanted = set(affinity_layers)
    for i, block in enumerate(visual.transformer.resblocks[:-1]):
        tokens, weights = block(tokens, None, need_weights=i in wanted, schedule=attention)
        if weights is not None:
            affinity += weights[0, 1:, 1:].float()
    return Trunk(tokens, affinity, grid)
