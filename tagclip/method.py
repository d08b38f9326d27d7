"""TagCLIP classification, one named function per step of SPEC §3.

Every step works on a batch of B images of the same size (P patches on a gh×gw grid) and
C = N foreground + M background classes:

1. :func:`self_only_masks`    block masks of the main pass (SPEC §2)
2. :func:`coarse_scores`      S  (B, P, C)  softmax over classes of patch logits
3. :func:`attention_vote`     K  (B, P, P)  layers above their mean >= 4
4. :func:`refinement_matrix`  R  (B, P, P)  mean of chosen maps ⊙ K
5. S₁ = R @ S                 (:func:`attention_refine`)
6. :func:`box_refine`         S₂ (B, P, C)  box-masked local refinement (quirk Q4)
7. :func:`local_scores`       s  (B, N)     per-class max
8. :func:`plan_crops` + :func:`region_masks` + :func:`crop_probabilities` + :func:`fuse`:
   global crop re-classification with quirks Q2 and Q3

:class:`TagCLIPParams` names every constant; the per-dataset values live in
:mod:`tagclip.registry`. The positional table's float16 rounding (quirk Q1) is the method's
too (:func:`positional_table`), passed to the backbone as an argument.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from clip import CLIP
from clip.kernels import ALL_AT_ONCE, AttentionSchedule, steps
from clip.model import VisionTransformer, resize_positional_embedding
from toolkit.boxes import TAGCLIP_CONTOURS, box_masks
from toolkit.depths import PAPER_DEPTH, scale_layers


@dataclass(frozen=True)
class TagCLIPParams:
    """Constants of SPEC §3; defaults are the paper's VOC/COCO values."""
    self_mask_value: float = -100.0       # §2: off-diagonal scores of the final block, main pass
    region_mask_value: float = -1000.0    # §2: class-token scores outside the crop region
    vote_min_layers: int = 4              # §3.3: a pair is kept if >= 4 maps exceed their mean
    refine_layers: tuple[int, ...] = (8, 9, 10)  # §3.4 (COCO-Stuff: 0..10)
    crop_rel_threshold: float = 0.5       # §3.8: candidates above lo + 0.5·(hi − lo) (COCO-Stuff 0.1)
    crop_mask_threshold: float = 0.5      # §3.8: region = normalised map > 0.5
    crop_fusion_weight: float = 0.5       # §3.8: s ← w·s + (1 − w)·p
    layers_depth: int = PAPER_DEPTH       # the tower depth refine_layers are given for

    def for_depth(self, depth: int) -> "TagCLIPParams":
        """These constants for a vision tower of ``depth`` blocks: ``refine_layers`` carried over
        by :func:`toolkit.depths.scale_layers` (unchanged for 12 blocks); ValueError if a block
        does not exist."""
        params = self if depth == self.layers_depth else replace(
            self, refine_layers=scale_layers(self.refine_layers, depth, self.layers_depth), layers_depth=depth)
        if not params.refine_layers or not all(0 <= b < depth for b in params.refine_layers):
            raise ValueError(f"refinement blocks {list(params.refine_layers)} do not exist in a {depth}-block tower")
        return params


# ---------------------------------------------------------------- step 1: masks and positions

def positional_table(visual: VisionTransformer, grid: tuple[int, int]) -> torch.Tensor:
    """Quirk Q1 (TagCLIP): the stored table at the native grid; elsewhere resized and rounded
    through float16 (the reference wrapped the resized table in a float16 tensor) and back."""
    if grid == visual.native_grid:
        return visual.positional_embedding
    table = visual.positional_embedding
    return resize_positional_embedding(table, grid).half().to(table.dtype)


def self_only_masks(n_blocks: int, n_tokens: int, value: float, device=None,
                    dtype=torch.float32) -> list[Optional[torch.Tensor]]:
    """Main pass: blocks 0..n-2 plain; the last adds ``value`` off the diagonal."""
    last = (1 - torch.eye(n_tokens, device=device, dtype=dtype)) * value  # (L, L)
    return [None] * (n_blocks - 1) + [last]


def region_masks(regions: torch.Tensor, n_blocks: int, value: float) -> list[torch.Tensor]:
    """Crop pass: row 0 (class-token query) gets ``value`` at patches outside the region.

    regions: (K, P) bool -> the same (K, 1, 1 + P, 1 + P) additive mask for every block.
    """
    k, p = regions.shape
    mask = torch.zeros(k, 1, p + 1, p + 1, dtype=torch.float32, device=regions.device)
    mask[:, 0, 0, 1:] = (~regions).float() * value
    return [mask] * n_blocks


# ---------------------------------------------------------------- steps 2-5

def coarse_scores(tokens: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """(B, 1 + P, E) projected tokens -> S (B, P, C): softmax over classes per patch."""
    feats = tokens / tokens.norm(dim=-1, keepdim=True)
    logits = logit_scale.exp() * feats @ text.t()  # (B, 1 + P, C)
    return logits[:, 1:].softmax(dim=-1)


def patch_maps(attentions: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-block (B, 1 + P, 1 + P) maps -> (n_blocks, B, P, P), class token dropped."""
    return torch.stack([a[:, 1:, 1:] for a in attentions], dim=0)


def attention_vote(maps: torch.Tensor, min_layers: int) -> torch.Tensor:
    """K (B, P, P): True where at least ``min_layers`` maps exceed their own P×P mean."""
    n, b = maps.shape[:2]
    thr = maps.reshape(n, b, -1).mean(dim=-1)[..., None, None]  # (n, B, 1, 1)
    return (maps > thr).float().sum(dim=0) >= min_layers


def refinement_matrix(maps: torch.Tensor, layers: Sequence[int], vote: torch.Tensor) -> torch.Tensor:
    """R (B, P, P) = mean of the chosen blocks' maps, zeroed where the vote failed."""
    return maps[list(layers)].mean(dim=0) * vote.float()


def attention_refine(refinement: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
    """S₁ = R @ S: (B, P, P) @ (B, P, C) -> (B, P, C)."""
    return refinement @ coarse


# ---------------------------------------------------------------- step 6

def minmax_columns(scores: torch.Tensor) -> torch.Tensor:
    """(B, P, C) -> per (image, class) (x − min) / max(x − min) over patches, as the reference."""
    shifted = scores - scores.min(dim=1, keepdim=True)[0]
    return shifted / shifted.max(dim=1, keepdim=True)[0]


def class_box_masks(attn_refined: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, P, C) S₁ -> (B, P, C) 0/1 union of the boxes of every class map (SPEC §3.6, §7).

    Threshold per map = mean of its normalised values (float32, like the reference's tensor).
    """
    gh, gw = grid
    norm = minmax_columns(attn_refined)
    # (B, P, C) -> (B, C, P): contiguous rows so each class mean reduces like the reference's 1-D mean.
    norm_t = norm.transpose(1, 2).contiguous()
    means = norm_t.mean(dim=-1).cpu().numpy()  # (B, C) float32
    maps = norm_t.cpu().numpy().reshape(*means.shape, gh, gw)  # (B, C, P) -> (B, C, gh, gw)
    mask = torch.from_numpy(box_masks(maps, means, TAGCLIP_CONTOURS)).to(attn_refined.device)
    return mask.reshape(*means.shape, gh * gw).transpose(1, 2)  # (B, C, gh, gw) -> (B, P, C)


def box_refine(refinement: torch.Tensor, coarse: torch.Tensor, attn_refined: torch.Tensor,
               grid: tuple[int, int]) -> torch.Tensor:
    """S₂: for each class with a positive maximum (quirk Q4: in practice all of them),
    (R with source columns outside the class's boxes zeroed) @ S[:, c]; others keep S₁.

    (R ⊙ B_c as a row mask) @ S[:, c] equals R @ (B_c ⊙ S[:, c]), so all classes take one
    batched matmul.
    """
    mask = class_box_masks(attn_refined, grid)
    local = refinement @ (mask * coarse)  # (B, P, C)
    keep = (attn_refined.max(dim=1, keepdim=True)[0] > 0)  # (B, 1, C)
    return torch.where(keep, local, attn_refined)


# ---------------------------------------------------------------- steps 7-8

def local_scores(local: torch.Tensor, n_foreground: int) -> torch.Tensor:
    """s (B, N): max over patches of S₂, foreground classes only."""
    return local.max(dim=1)[0][:, :n_foreground]


class CropJob(NamedTuple):
    image: int                    # index in the batch
    class_index: int              # foreground class index
    box: tuple[int, int, int, int]  # x1, y1, x2, y2 in patches, end-exclusive
    region: torch.Tensor          # (gh_box, gw_box) bool region inside the box


def _first_last(any_: torch.Tensor):
    """(…, n) bool -> first and last True index (0, -1 if none) and whether any exist."""
    n = any_.shape[-1]
    first = any_.float().argmax(dim=-1)
    last = n - 1 - any_.flip(-1).float().argmax(dim=-1)
    return first, last, any_.any(dim=-1)


def plan_crops(local: torch.Tensor, scores: torch.Tensor, grid: tuple[int, int],
               rel_threshold: float, mask_threshold: float) -> list[CropJob]:
    """Candidates and boxes of the crop re-classification (SPEC §3.8, quirks Q2, Q3).

    Candidates of image b: foreground c with s_c > lo + rel·(hi − lo), lo/hi over the whole
    S₂ of b, ascending c. Box of c: rows/columns of the normalised map holding any value >
    ``mask_threshold``, ends +1 then clipped to grid − 1 (Q2). At the first empty box the
    image's remaining candidates are dropped (Q3). Boxes do not depend on earlier crops, so
    the whole plan is fixed before any crop runs.
    """
    gh, gw = grid
    b, n = scores.shape
    flat = local.reshape(local.shape[0], -1)
    lo, hi = flat.min(dim=1)[0], flat.max(dim=1)[0]
    thr = lo + rel_threshold * (hi - lo)  # (B,)
    candidate = scores > thr[:, None]  # (B, N)
    region = minmax_columns(local[:, :, :n]) > mask_threshold  # (B, P, N)
    region = region.transpose(1, 2).reshape(b, n, gh, gw)  # (B, P, N) -> (B, N, gh, gw)
    x1, x2, has = _first_last(region.any(dim=2))  # columns
    y1, y2, _ = _first_last(region.any(dim=3))    # rows
    x1, y1 = torch.where(has, x1, 0), torch.where(has, y1, 0)
    x2 = torch.where(has, torch.clamp(x2 + 1, max=gw - 1), 0)
    y2 = torch.where(has, torch.clamp(y2 + 1, max=gh - 1), 0)
    boxes = torch.stack([x1, y1, x2, y2], dim=-1).cpu().numpy()  # (B, N, 4)
    candidate = candidate.cpu().numpy()
    jobs = []
    for i in range(b):
        for c in np.flatnonzero(candidate[i]):
            bx1, by1, bx2, by2 = (int(v) for v in boxes[i, c])
            if bx1 == bx2 or by1 == by2:
                break  # quirk Q3: stop this image's loop at the first empty box
            jobs.append(CropJob(i, int(c), (bx1, by1, bx2, by2), region[i, c, by1:by2, bx1:bx2]))
    return jobs


def crop_inputs(images: torch.Tensor, jobs: Sequence[CropJob], patch: int, size: int,
                native_grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Crops resized to size×size (bilinear, align_corners=False) and their regions resized
    to the native grid (legacy nearest), flattened: ((K, 3, size, size), (K, P0) bool)."""
    crops, regions = [], []
    for job in jobs:
        x1, y1, x2, y2 = job.box
        crop = images[job.image:job.image + 1, :, patch * y1:patch * y2, patch * x1:patch * x2]
        crops.append(F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False))
        region = F.interpolate(job.region[None, None].float(), size=native_grid, mode="nearest")
        regions.append(region.reshape(-1).bool())  # (1, 1, gh0, gw0) -> (P0,)
    return torch.cat(crops), torch.stack(regions)


def crop_probabilities(model: CLIP, crops: torch.Tensor, regions: torch.Tensor,
                       text: torch.Tensor, params: TagCLIPParams) -> torch.Tensor:
    """(K, 3, S, S) crops -> (K, C) softmax over all classes of the region-restricted class token."""
    visual = model.visual
    masks = region_masks(regions, visual.transformer.layers, params.region_mask_value)
    token = visual(crops, masks, cls_only=True).tokens[:, 0].float()  # class token (K, E), float32 from here on
    token = token / token.norm(dim=-1, keepdim=True)
    return (model.logit_scale.float().exp() * token @ text.float().t()).softmax(dim=-1)


def fuse(scores: torch.Tensor, jobs: Sequence[CropJob], probs: torch.Tensor, weight: float) -> torch.Tensor:
    """s_c ← w·s_c + (1 − w)·p_c for every crop job (a copy; ``scores`` is untouched)."""
    out = scores.clone()
    if jobs:
        rows = torch.tensor([j.image for j in jobs], device=scores.device)
        cols = torch.tensor([j.class_index for j in jobs], device=scores.device)
        p = probs[torch.arange(len(jobs), device=probs.device), cols]
        out[rows, cols] = weight * out[rows, cols] + (1 - weight) * p
    return out


# ---------------------------------------------------------------- the whole pass

class TagCLIPOutput(NamedTuple):
    scores: torch.Tensor        # (B, N) final scores
    local_scores: torch.Tensor  # (B, N) before crop re-classification
    coarse: torch.Tensor        # S  (B, P, C)
    refinement: torch.Tensor    # R  (B, P, P)
    attn_refined: torch.Tensor  # S₁ (B, P, C)
    box_refined: torch.Tensor   # S₂ (B, P, C)
    crops: list[CropJob]


@torch.no_grad()
def local_pass(model: CLIP, images: torch.Tensor, text: torch.Tensor, params: TagCLIPParams,
               attention: AttentionSchedule = ALL_AT_ONCE) -> tuple[torch.Tensor, ...]:
    """Steps 1-6 on (B, 3, H, W) images of one size: (S, R, S₁, S₂).

    The vision tower runs in the model's dtype (its map-returning attention cut into steps
    by ``attention``); its tokens and maps are cast to float32 here, so steps 2-6 always run
    in float32.
    """
    visual = model.visual
    patch = visual.patch_size
    grid = (images.shape[-2] // patch, images.shape[-1] // patch)
    masks = self_only_masks(visual.transformer.layers, 1 + grid[0] * grid[1], params.self_mask_value,
                            device=images.device, dtype=images.dtype)
    out = visual(images, masks, need_weights=True, positional_embedding=positional_table(visual, grid),
                 schedule=attention)
    coarse = coarse_scores(out.tokens.float(), text.float(), model.logit_scale.float())
    maps = patch_maps([a.float() for a in out.attentions])
    refinement = refinement_matrix(maps, params.refine_layers, attention_vote(maps, params.vote_min_layers))
    del maps, out
    attn_refined = attention_refine(refinement, coarse)
    return coarse, refinement, attn_refined, box_refine(refinement, coarse, attn_refined, grid)


@torch.no_grad()
def classify_batch(model: CLIP, images: torch.Tensor, text: torch.Tensor, n_foreground: int,
                   params: TagCLIPParams = TagCLIPParams(), main_chunk: Optional[int] = None,
                   crop_chunk: Optional[int] = None,
                   attention: AttentionSchedule = ALL_AT_ONCE) -> TagCLIPOutput:
    """Run SPEC §3 on (B, 3, H, W) normalised images of one size; text is T (C, E).

    The main pass runs ``main_chunk`` images at a time and the crops of the whole batch
    ``crop_chunk`` at a time (None: all at once); ``attention`` cuts the main pass's
    map-returning attention. Results do not depend on these schedules beyond float
    rounding (:class:`tagclip.tagger.Schedule` picks them per device). Every step after the
    forwards runs in float32 whatever the model's dtype (``--precision``).
    """
    images, text = images.float(), text.float()
    visual = model.visual
    patch = visual.patch_size
    grid = (images.shape[-2] // patch, images.shape[-1] // patch)
    parts = [local_pass(model, images[s], text, params, attention) for s in steps(len(images), main_chunk)]
    coarse, refinement, attn_refined, local = (torch.cat(t) if len(parts) > 1 else t[0] for t in zip(*parts))
    scores = local_scores(local, n_foreground)
    jobs = plan_crops(local, scores, grid, params.crop_rel_threshold, params.crop_mask_threshold)
    final = scores
    if jobs:
        crops, regions = crop_inputs(images, jobs, patch, visual.input_resolution, visual.native_grid)
        probs = torch.cat([crop_probabilities(model, crops[s], regions[s], text, params)
                           for s in steps(len(jobs), crop_chunk)])
        final = fuse(scores, jobs, probs, params.crop_fusion_weight)
    return TagCLIPOutput(final, scores, coarse, refinement, attn_refined, local, jobs)
