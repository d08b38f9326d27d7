"""Each step of TagCLIP classification (SPEC §3, §7, quirks Q2-Q4, Q8) on hand-made tensors,
plus degenerate image sizes through the whole pass."""
from __future__ import annotations

import cv2
import helpers
import numpy as np
import pytest
import torch
from PIL import Image

import tagclip.method as method
from clip.preprocess import to_model_input
from tagclip.method import (
    CropJob,
    TagCLIPParams,
    attention_vote,
    box_refine,
    classify_batch,
    coarse_scores,
    crop_inputs,
    fuse,
    local_scores,
    patch_maps,
    plan_crops,
    positional_table,
    refinement_matrix,
    region_masks,
    self_only_masks,
)
from toolkit.boxes import CAM_CONTOURS, TAGCLIP_CONTOURS, box_union, scoremap2bbox

TOL = 1e-6


# ----------------------------------------------------------------------------- step 1: masks

def test_self_only_masks_only_last_block_minus_100_off_diagonal():
    masks = self_only_masks(12, 5, -100.0)
    assert len(masks) == 12
    assert all(m is None for m in masks[:11])
    last = masks[11]
    assert tuple(last.shape) == (5, 5) and last.dtype == torch.float32
    expected = torch.full((5, 5), -100.0)
    expected.fill_diagonal_(0.0)
    assert torch.equal(last, expected)


def test_region_masks_layout():
    regions = torch.tensor([[True, False, True, False],
                            [False, False, False, True]])
    masks = region_masks(regions, 3, -1000.0)
    assert len(masks) == 3
    for m in masks:
        assert tuple(m.shape) == (2, 1, 5, 5)
        assert torch.equal(m, masks[0])
    m = masks[0]
    assert torch.equal(m[:, 0, 0, 0], torch.zeros(2))           # class column of row 0
    assert torch.equal(m[:, 0, 1:, :], torch.zeros(2, 4, 5))    # every other row
    assert torch.equal(m[0, 0, 0, 1:], torch.tensor([0.0, -1000.0, 0.0, -1000.0]))
    assert torch.equal(m[1, 0, 0, 1:], torch.tensor([-1000.0, -1000.0, -1000.0, 0.0]))


# ----------------------------------------------------------------------------- steps 2-5

def test_coarse_scores_shape_rows_and_formula():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, 1 + 6, 8, generator=g) * 3
    text = torch.randn(5, 8, generator=g)
    text = text / text.norm(dim=-1, keepdim=True)
    scale = torch.tensor(2.0)
    s = coarse_scores(tokens, text, scale)
    assert tuple(s.shape) == (2, 6, 5)
    assert float((s.sum(dim=-1) - 1).abs().max()) <= TOL
    assert bool((s > 0).all())
    feats = tokens[:, 1:].double()
    feats = feats / feats.norm(dim=-1, keepdim=True)
    expected = (np.exp(2.0) * feats @ text.double().t()).softmax(dim=-1)
    assert helpers.max_abs_diff(s, expected) <= TOL
    # token norms do not matter (features are normalised); the class token is dropped
    scaled = tokens * torch.tensor([0.5, 4.0]).reshape(2, 1, 1)
    scaled[:, 0] = 100.0
    assert helpers.max_abs_diff(coarse_scores(scaled, text, scale), s) <= TOL


def test_patch_maps_drop_the_class_token():
    maps = [torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(2, 4, 4) + 100 * i for i in range(3)]
    out = patch_maps(maps)
    assert tuple(out.shape) == (3, 2, 3, 3)
    assert torch.equal(out[1, 0], maps[1][0, 1:, 1:])


def _vote_maps() -> torch.Tensor:
    """12 layers, 1 image, P = 3. Per-layer 'above mean' patterns (strict >):
    layers 0-3: (0,0) and (1,1); layers 4-6: (0,1) and (1,1); layers 7-11: constant
    (nothing is strictly above a constant map's mean)."""
    maps = torch.zeros(12, 1, 3, 3)
    for layer in range(4):
        maps[layer, 0, 0, 0] = maps[layer, 0, 1, 1] = 1.0
    for layer in range(4, 7):
        maps[layer, 0, 0, 1] = maps[layer, 0, 1, 1] = 1.0
    maps[7:] = 0.25
    return maps


def test_attention_vote_counts_layers_strictly_above_their_mean():
    vote = attention_vote(_vote_maps(), 4)
    expected = torch.zeros(1, 3, 3, dtype=torch.bool)
    expected[0, 0, 0] = True    # 4 layers: kept (>= 4)
    expected[0, 1, 1] = True    # 7 layers
    # (0, 1) passes in only 3 layers; with '>=' the 5 constant layers would add 5 to every pair
    assert vote.dtype == torch.bool
    assert torch.equal(vote, expected)
    assert not bool(attention_vote(_vote_maps(), 5)[0, 0, 0])
    assert bool(attention_vote(_vote_maps(), 3)[0, 0, 1])


def test_attention_vote_threshold_is_per_map_and_per_image():
    maps = _vote_maps().repeat(1, 2, 1, 1)
    maps[:, 1] *= 100.0           # image 1: same pattern, 100x larger values
    vote = attention_vote(maps, 4)
    assert torch.equal(vote[0], vote[1])
    assert bool(vote[0, 0, 0])    # a batch-wide mean (~ image 1's scale) would drop it


def test_refinement_matrix_mean_of_chosen_layers_times_vote():
    g = torch.Generator().manual_seed(1)
    maps = torch.rand(12, 2, 4, 4, generator=g)
    vote = torch.rand(2, 4, 4, generator=g) > 0.5
    for layers in [(8, 9, 10), tuple(range(11))]:
        got = refinement_matrix(maps, layers, vote)
        expected = torch.zeros(2, 4, 4, dtype=torch.float64)
        for layer in layers:
            expected += maps[layer].double()
        expected = expected / len(layers) * vote.double()
        assert helpers.max_abs_diff(got, expected) <= TOL
        assert bool((got[~vote] == 0).all())


def test_attention_refine_is_a_matmul():
    g = torch.Generator().manual_seed(2)
    r, s = torch.rand(2, 5, 5, generator=g), torch.rand(2, 5, 3, generator=g)
    assert helpers.max_abs_diff(method.attention_refine(r, s), torch.einsum("bij,bjc->bic", r, s)) <= TOL


# ----------------------------------------------------------------------------- §7 scoremap2bbox

def test_scoremap2bbox_single_blob_clipped_at_right_and_bottom():
    m = np.zeros((6, 8), dtype=np.float32)
    m[3:6, 5:8] = 1.0                      # touches the bottom and right edges
    boxes = scoremap2bbox(m, 0.5)
    assert boxes == [(5, 3, 7, 5)]         # x + w = 8 -> 7, y + h = 6 -> 5 (quirk Q2)
    grid = box_union(boxes, m.shape)
    assert grid.sum() == 2 * 2              # the last row and column are lost
    m2 = np.zeros((6, 8), dtype=np.float32)
    m2[1:3, 2:5] = 0.9
    assert scoremap2bbox(m2, 0.5) == [(2, 1, 5, 3)]   # interior: end-exclusive, no clipping


def test_scoremap2bbox_two_blobs_two_boxes():
    m = np.zeros((8, 8), dtype=np.float32)
    m[0:2, 0:3] = 1.0
    m[4:7, 5:7] = 0.8
    boxes = scoremap2bbox(m, np.float32(0.5))
    assert sorted(boxes) == [(0, 0, 3, 2), (5, 4, 7, 7)]


def test_scoremap2bbox_blob_in_last_row_gives_an_empty_slice():
    m = np.zeros((5, 6), dtype=np.float32)
    m[4, 1:4] = 1.0
    boxes = scoremap2bbox(m, 0.5)
    assert boxes == [(1, 4, 4, 4)]
    assert box_union(boxes, m.shape).sum() == 0


@pytest.mark.parametrize("kind", ["zeros", "nan"])
def test_scoremap2bbox_constant_or_nan_map(kind):
    m = np.zeros((4, 5), dtype=np.float32) if kind == "zeros" else np.full((4, 5), np.nan, np.float32)
    thr = np.float32(0.5) if kind == "zeros" else np.float32(np.nan)
    assert scoremap2bbox(m, thr) == [(0, 0, 0, 0)]
    assert box_union([(0, 0, 0, 0)], m.shape).sum() == 0


def test_scoremap2bbox_threshold_is_strict_on_the_truncated_uint8_level():
    m = np.zeros((4, 4), dtype=np.float32)
    m[0, 0] = 0.4                          # uint8 102 -> level int(0.5 * 102) = 51
    m[3, 3] = 0.2                          # uint8 51: not > 51
    assert scoremap2bbox(m, 0.5) == [(0, 0, 1, 1)]
    m[3, 3] = 0.201                        # uint8 51 still (truncation)
    assert scoremap2bbox(m, 0.5) == [(0, 0, 1, 1)]
    m[3, 3] = 0.21                         # uint8 53 > 51
    assert sorted(scoremap2bbox(m, 0.5)) == [(0, 0, 1, 1), (3, 3, 3, 3)]


def test_scoremap2bbox_tree_finds_nested_contours_external_does_not():
    m = np.zeros((12, 12), dtype=np.float32)
    m[1:10, 1:10] = 1.0
    m[2:9, 2:9] = 0.0                      # a ring ...
    m[4:7, 4:7] = 1.0                      # ... with a blob inside its hole
    external = scoremap2bbox(m, 0.5, TAGCLIP_CONTOURS)
    tree = scoremap2bbox(m, 0.5, CAM_CONTOURS)
    assert TAGCLIP_CONTOURS == cv2.RETR_EXTERNAL and CAM_CONTOURS == cv2.RETR_TREE
    assert external == [(1, 1, 10, 10)]
    assert len(tree) > len(external)
    assert (1, 1, 10, 10) in tree and (4, 4, 7, 7) in tree


def test_box_union_end_exclusive_and_overlapping():
    grid = box_union([(0, 0, 2, 1), (1, 0, 3, 2), (0, 0, 0, 0)], (3, 4))
    assert grid.dtype == np.float32
    expected = np.array([[1, 1, 1, 0],
                         [0, 1, 1, 0],
                         [0, 0, 0, 0]], dtype=np.float32)
    np.testing.assert_array_equal(grid, expected)
    np.testing.assert_array_equal(box_union([], (2, 2)), np.zeros((2, 2), np.float32))


# ----------------------------------------------------------------------------- step 6

def _blob_problem(seed: int, grid=(5, 6), n_classes: int = 4):
    """R local (Gaussian in patch distance, times a vote), S with one blob per class."""
    gh, gw = grid
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    pos = torch.stack([yy.flatten(), xx.flatten()], dim=-1).float()  # (P, 2)
    dist2 = ((pos[:, None] - pos[None]) ** 2).sum(-1)
    vote = torch.rand(len(pos), len(pos), generator=g) > 0.2
    vote |= torch.eye(len(pos), dtype=torch.bool)
    refine = (torch.exp(-dist2 / 2.0) * (0.5 + torch.rand(len(pos), len(pos), generator=g)) * vote)[None]
    centres = torch.rand(n_classes, 2, generator=g) * torch.tensor([gh - 1.0, gw - 1.0])
    logits = -((pos[:, None] - centres[None]) ** 2).sum(-1) / 1.5 * 3  # (P, C)
    coarse = logits.softmax(dim=-1)[None]
    return refine, coarse


def _naive_box_refine(refine: torch.Tensor, coarse: torch.Tensor, grid) -> torch.Tensor:
    """Per class: boxes of the min-max normalised S1 map at its mean (RETR_EXTERNAL), then
    S2[i, c] = sum_j R[i, j] * B_c[j] * S[j, c] (float64 loop); columns with max <= 0 keep S1."""
    b, p, c = coarse.shape
    refined = refine @ coarse
    out = torch.zeros(b, p, c, dtype=torch.float64)
    for bi in range(b):
        for ci in range(c):
            col = refined[bi, :, ci]
            if not float(col.max()) > 0:
                out[bi, :, ci] = col.double()
                continue
            norm = (col - col.min()) / (col - col.min()).max()
            boxes = scoremap2bbox(norm.reshape(grid).numpy(), np.float32(norm.mean().item()), TAGCLIP_CONTOURS)
            mask = box_union(boxes, grid).reshape(-1)
            for i in range(p):
                out[bi, i, ci] = sum(float(refine[bi, i, j]) * float(mask[j]) * float(coarse[bi, j, ci])
                                     for j in range(p))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_box_refine_equals_the_per_class_loop(seed):
    grid = (5, 6)
    refine, coarse = _blob_problem(seed, grid)
    refined = refine @ coarse
    got = box_refine(refine, coarse, refined, grid)
    expected = _naive_box_refine(refine, coarse, grid)
    assert tuple(got.shape) == tuple(coarse.shape)
    assert helpers.max_abs_diff(got, expected) <= TOL
    # the boxes really restricted something (the check is not trivially S1)
    assert helpers.max_abs_diff(got, refined) > 1e-3


def test_box_refine_keeps_s1_for_classes_without_a_positive_maximum():
    grid = (4, 4)
    refine, coarse = _blob_problem(4, grid, n_classes=3)
    coarse = coarse.clone()
    coarse[..., 1] = -coarse[..., 1]          # a column whose S1 is negative everywhere
    refined = refine @ coarse
    got = box_refine(refine, coarse, refined, grid)
    assert torch.equal(got[..., 1], refined[..., 1])
    assert helpers.max_abs_diff(got, _naive_box_refine(refine, coarse, grid)) <= TOL


def test_box_refine_batch_matches_single_images():
    grid = (5, 6)
    parts = [_blob_problem(s, grid) for s in (5, 6)]
    refine = torch.cat([r for r, _ in parts])
    coarse = torch.cat([c for _, c in parts])
    got = box_refine(refine, coarse, refine @ coarse, grid)
    for i, (r, c) in enumerate(parts):
        assert helpers.max_abs_diff(got[i:i + 1], box_refine(r, c, r @ c, grid)) <= TOL


def test_local_scores_foreground_max():
    local = torch.tensor([[[0.1, 0.9, 0.3], [0.4, 0.2, 0.95]]])  # (1, P=2, C=3)
    assert torch.equal(local_scores(local, 2), torch.tensor([[0.4, 0.9]]))


# ----------------------------------------------------------------------------- step 8: plan

GH, GW = 4, 5


def _grid(cells: dict, fill: float = 0.0) -> torch.Tensor:
    m = torch.full((GH, GW), fill)
    for (y, x), v in cells.items():
        m[y, x] = v
    return m


def _block(y0, y1, x0, x1, v):
    return {(y, x): v for y in range(y0, y1) for x in range(x0, x1)}


# exact binary fractions so every comparison is exact
CLS0 = _grid({(0, 0): 0.5})                                   # s = 0.5: not > thr 0.5
CLS1 = _grid({**_block(1, 3, 1, 3, 0.75), (0, 4): 0.375})     # (0,4) normalises to exactly 0.5
CLS2 = _grid(_block(2, 4, 3, 5, 0.875))                       # touches bottom and right
CLS3 = _grid(_block(0, 2, 0, 4, 0.625))
LAST_ROW = _grid(_block(3, 4, 0, 3, 0.8))
LAST_COL = _grid(_block(0, 2, 4, 5, 0.8))
CONSTANT = _grid({}, fill=0.8)                                # min-max gives NaN: empty mask
BACKGROUND = _grid({(3, 0): 1.0})                             # hi = 1.0, lo = 0.0 -> thr 0.5

BOX1, BOX2, BOX3 = (1, 1, 3, 3), (3, 2, 4, 3), (0, 0, 4, 2)


def _local(*fg_maps) -> torch.Tensor:
    cols = [m.reshape(-1) for m in (*fg_maps, BACKGROUND)]
    return torch.stack(cols, dim=-1)[None]  # (1, P, C)


def _plan(local: torch.Tensor, n_fg: int, rel=0.5, mask=0.5):
    return plan_crops(local, local_scores(local, n_fg), (GH, GW), rel, mask)


def test_plan_crops_candidates_order_boxes_and_regions():
    local = _local(CLS0, CLS1, CLS2, CLS3)
    jobs = _plan(local, 4)
    # ascending class order although the scores rank 2 (0.875) > 1 (0.75) > 3 (0.625)
    assert [j.class_index for j in jobs] == [1, 2, 3]
    assert [j.box for j in jobs] == [BOX1, BOX2, BOX3]
    assert all(j.image == 0 for j in jobs)
    assert torch.equal(jobs[0].region, torch.ones(2, 2, dtype=torch.bool))   # (0,4) == 0.5 excluded
    assert torch.equal(jobs[1].region, torch.ones(1, 1, dtype=torch.bool))   # Q2: last row/col lost
    assert torch.equal(jobs[2].region, torch.ones(2, 4, dtype=torch.bool))


def test_plan_crops_threshold_uses_the_whole_matrix_including_background():
    local = _local(CLS0, CLS1, CLS2, CLS3)
    no_bg = local[..., :4]                      # hi 0.875 -> thr 0.4375: class 0 (0.5) joins
    assert [j.class_index for j in _plan(no_bg, 4)] == [0, 1, 2, 3]
    assert [j.class_index for j in _plan(local, 4, rel=0.7)] == [1, 2]   # thr 0.7
    assert [j.class_index for j in _plan(local, 4, rel=0.1)] == [0, 1, 2, 3]


def test_plan_crops_mask_threshold_is_strict():
    local = _local(CLS0, CLS1, CLS2, CLS3)
    jobs = _plan(local, 4, mask=0.49)           # now (0,4) of class 1 (exactly 0.5) is inside
    assert jobs[0].class_index == 1 and jobs[0].box == (1, 0, 4, 3)


@pytest.mark.parametrize("empty", ["last_row", "last_col", "constant"])
def test_plan_crops_stops_at_the_first_empty_box(empty):
    bad = {"last_row": LAST_ROW, "last_col": LAST_COL, "constant": CONSTANT}[empty]
    local = _local(CLS0, CLS1, bad, CLS2, CLS3)
    scores = local_scores(local, 5)
    assert bool(scores[0, 2] > 0.5)            # the empty-box class is a candidate
    jobs = _plan(local, 5)
    assert [(j.class_index, j.box) for j in jobs] == [(1, BOX1)]   # earlier kept, later dropped (Q3)


def test_plan_crops_stop_is_per_image():
    stopped = _local(CLS0, CLS1, LAST_ROW, CLS2, CLS3)
    full = _local(CLS0, CLS1, CLS0, CLS2, CLS3)
    local = torch.cat([stopped, full])
    jobs = plan_crops(local, local_scores(local, 5), (GH, GW), 0.5, 0.5)
    assert [(j.image, j.class_index, j.box) for j in jobs] == [
        (0, 1, BOX1), (1, 1, BOX1), (1, 3, BOX2), (1, 4, BOX3)]


def test_crop_inputs_slices_patches_and_resizes_regions_legacy_nearest():
    images = torch.arange(2 * 3 * 64 * 80, dtype=torch.float32).reshape(2, 3, 64, 80)
    region = torch.tensor([[True, False, True], [False, True, True]])
    jobs = [CropJob(1, 0, (1, 1, 4, 3), region)]
    crops, regions = crop_inputs(images, jobs, 16, 32, (14, 14))
    assert tuple(crops.shape) == (1, 3, 32, 32) and tuple(regions.shape) == (1, 196)
    src = images[1:2, :, 16:48, 16:64]
    expected = torch.nn.functional.interpolate(src, size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.equal(crops, expected)
    rows = [int(np.floor(i * 2 / 14)) for i in range(14)]
    cols = [int(np.floor(j * 3 / 14)) for j in range(14)]
    manual = region[rows][:, cols].reshape(-1)
    assert torch.equal(regions[0], manual)


def test_fuse_formula_and_copy():
    scores = torch.tensor([[0.2, 0.4, 0.6], [0.1, 0.3, 0.5]])
    jobs = [CropJob(0, 1, (0, 0, 1, 1), torch.ones(1, 1, dtype=torch.bool)),
            CropJob(1, 2, (0, 0, 1, 1), torch.ones(1, 1, dtype=torch.bool))]
    probs = torch.tensor([[0.5, 0.8, 0.1, 0.0], [0.2, 0.2, 0.9, 0.3]])  # (K, C) incl. background
    before = scores.clone()
    out = fuse(scores, jobs, probs, 0.5)
    expected = before.clone()
    expected[0, 1] = 0.5 * 0.4 + 0.5 * 0.8
    expected[1, 2] = 0.5 * 0.5 + 0.5 * 0.9
    assert helpers.max_abs_diff(out, expected) <= TOL
    assert torch.equal(scores, before)
    w = fuse(scores, jobs, probs, 0.25)
    assert abs(float(w[0, 1]) - (0.25 * 0.4 + 0.75 * 0.8)) <= TOL
    assert torch.equal(fuse(scores, [], probs[:0], 0.5), scores)


# ----------------------------------------------------------------------------- whole pass, odd sizes

N_FG, N_ALL = 6, 8


def _text(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(21)
    t = torch.randn(N_ALL, model.text_projection.shape[1], generator=g)
    return t / t.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("hw", [(16, 304), (304, 16)], ids=["1-row", "1-column"])
def test_one_patch_row_or_column_gives_all_zero_scores(tiny_model, hw):
    x = helpers.smooth_random_image(31, *hw)[None]
    out = classify_batch(tiny_model, x, _text(tiny_model), N_FG)
    assert tuple(out.scores.shape) == (1, N_FG)
    assert torch.equal(out.scores, torch.zeros(1, N_FG))
    assert torch.equal(out.box_refined, torch.zeros_like(out.box_refined))
    assert out.crops == []
    assert float(out.attn_refined.max()) > 0      # only the box step zeroes it (reference)


def test_76_patch_image_is_masked_by_argument(tiny_model, monkeypatch):
    """304x64 -> 19x4 = 76 patches, 77 tokens: the reference took it for text (quirk Q8)."""
    x = helpers.smooth_random_image(41, 304, 64)[None]
    text = _text(tiny_model)
    real = method.self_only_masks
    calls = []

    def spy(n_blocks, n_tokens, value, **kw):
        masks = real(n_blocks, n_tokens, value, **kw)
        calls.append((n_tokens, masks))
        return masks

    monkeypatch.setattr(method, "self_only_masks", spy)
    masked = classify_batch(tiny_model, x, text, N_FG)
    assert len(calls) == 1 and calls[0][0] == 77
    last = calls[0][1][-1]
    assert last is not None and tuple(last.shape) == (77, 77) and float(last[0, 1]) == -100.0

    monkeypatch.setattr(method, "self_only_masks", lambda n_blocks, n_tokens, value, **kw: [None] * n_blocks)
    unmasked = classify_batch(tiny_model, x, text, N_FG)
    assert tuple(masked.coarse.shape) == (1, 76, N_ALL)
    assert helpers.max_abs_diff(masked.coarse, unmasked.coarse) > 1e-3
    assert helpers.max_abs_diff(masked.scores, unmasked.scores) > 1e-6
    # masks are an argument, not state: running again gives the masked result again
    monkeypatch.setattr(method, "self_only_masks", real)
    again = classify_batch(tiny_model, x, text, N_FG)
    assert torch.equal(again.scores, masked.scores)


def test_76_patch_image_after_another_size_runs_normally(tiny_model):
    """The reference crashed on a 76-patch image that was not the first one; ours does not."""
    text = _text(tiny_model)
    classify_batch(tiny_model, helpers.smooth_random_image(1, 48, 64)[None], text, N_FG)
    out = classify_batch(tiny_model, helpers.smooth_random_image(41, 304, 64)[None], text, N_FG)
    first = classify_batch(tiny_model, helpers.smooth_random_image(41, 304, 64)[None], text, N_FG)
    assert torch.equal(out.scores, first.scores)
    assert bool(torch.isfinite(out.scores).all())


def test_image_under_16_pixels(tiny_model):
    rng = np.random.default_rng(3)
    img = Image.fromarray(rng.integers(0, 256, size=(7, 10, 3), dtype=np.uint8), mode="RGB")  # 10x7
    x = to_model_input(img)
    assert tuple(x.shape) == (3, 16, 16)
    out = classify_batch(tiny_model, x[None], _text(tiny_model), N_FG)
    assert tuple(out.scores.shape) == (1, N_FG)
    assert tuple(out.coarse.shape) == (1, 1, N_ALL)
    assert bool(torch.isfinite(out.scores).all())
    assert torch.equal(out.scores, torch.zeros(1, N_FG))   # a 1x1 grid is a 1-row grid


def test_classify_batch_uses_params_constants(tiny_model):
    """The dataclass values reach the pass: a zero self mask equals no mask at all."""
    x = helpers.smooth_random_image(8, 64, 96)[None]
    text = _text(tiny_model)
    default = classify_batch(tiny_model, x, text, N_FG, TagCLIPParams())
    no_self = classify_batch(tiny_model, x, text, N_FG, TagCLIPParams(self_mask_value=0.0))
    with torch.no_grad():
        table = positional_table(tiny_model.visual, tiny_model.visual.grid_of(x))
        plain = tiny_model.visual(x, need_weights=True, positional_embedding=table).tokens  # same explicit path
    assert helpers.max_abs_diff(no_self.coarse, coarse_scores(plain, text, tiny_model.logit_scale)) <= 1e-6
    assert helpers.max_abs_diff(default.coarse, no_self.coarse) > 1e-3
    other_layers = classify_batch(tiny_model, x, text, N_FG, TagCLIPParams(refine_layers=tuple(range(11))))
    assert helpers.max_abs_diff(other_layers.refinement, default.refinement) > 0
