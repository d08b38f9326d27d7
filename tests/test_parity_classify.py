"""Parity of TagCLIP classification with the ORIGINAL code's golden fixtures (SPEC §2-§4, §9).

The golden arrays were produced by the authors' TagCLIP code on CPU with the tiny float16
checkpoint (fixtures/golden). Every score must agree within 1e-5 absolute OR 1e-4 relative;
crop plans, region masks and label-file lines must agree exactly.
"""
from __future__ import annotations

import functools
import hashlib
import math

import helpers
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import SCORE_ATOL, SCORE_RTOL, assert_close_abs_or_rel

from clip.preprocess import load_model_input
from clip_es.trunk import cam_positional_table
from tagclip.labels import label_file_lines, labels_to_onehot
from tagclip.method import classify_batch, crop_inputs, positional_table, region_masks, self_only_masks
from tagclip.metrics import f1_overall, mean_average_precision
from tagclip.registry import get_dataset
from tagclip.tagger import Tagger, batch_by_size
from toolkit.splits import read_split

DATASETS = helpers.GOLDEN_DATASETS
IMAGE_CASES = [(ds, iid) for ds in DATASETS for iid in helpers.golden_image_ids(ds)]
IMAGE_IDS = [f"{ds}/{iid}" for ds, iid in IMAGE_CASES]
TEXT_ATOL = 1e-6
METRIC_ATOL = 1e-4

# (TagCLIPOutput field, golden npz key) for the per-image stage comparison.
STAGES = [
    ("coarse", "logits_coarse"),          # S
    ("refinement", "attn_weight"),            # R (only stored for small images)
    ("attn_refined", "logits_attn"),      # S1
    ("box_refined", "logits_refined"),    # S2
    ("local_scores", "logits_max_pre_cwr"),
    ("scores", "scores"),
]


# ----------------------------------------------------------------------------- cached runs

@functools.lru_cache(maxsize=None)
def tagger(dataset: str) -> Tagger:
    return Tagger.for_dataset(helpers.tiny_model(), dataset, use_text_cache=False)


@functools.lru_cache(maxsize=None)
def model_input(dataset: str, image_id: str) -> torch.Tensor:
    x, _ = load_model_input(helpers.golden_image_path(dataset, image_id))
    return x


@functools.lru_cache(maxsize=None)
def single_image_run(dataset: str, image_id: str):
    cfg = get_dataset(dataset)
    x = model_input(dataset, image_id)
    return classify_batch(helpers.tiny_model(), x[None], tagger(dataset).text, cfg.num_classes, cfg.params)


# ----------------------------------------------------------------------------- fixtures sanity

def test_tiny_checkpoint_is_the_golden_one(tiny_model):
    digest = hashlib.sha256(helpers.TINY_CHECKPOINT.read_bytes()).hexdigest()
    assert digest == helpers.TINY_CHECKPOINT_SHA256
    assert digest == helpers.golden_label_lines()["weights_sha256_npz"]
    assert tiny_model.checkpoint_sha256 == digest
    assert tiny_model.dtype == torch.float32


@pytest.mark.parametrize("dataset", DATASETS)
def test_golden_order_matches_split_file(dataset):
    ids = [e.id for e in read_split(helpers.golden_split_path(dataset))]
    assert ids == helpers.golden_image_ids(dataset)


# ----------------------------------------------------------------------------- text side

@pytest.mark.parametrize("dataset", DATASETS)
def test_text_rows_match_reference(dataset):
    cfg = get_dataset(dataset)
    ref = helpers.golden_npz(dataset)["text_features"].astype(np.float64)
    ref = ref / np.linalg.norm(ref, axis=1, keepdims=True)  # classify() normalises once more
    text = tagger(dataset).text
    assert text.dtype == torch.float32
    assert tuple(text.shape) == ref.shape == (cfg.num_classes + len(cfg.background), ref.shape[1])
    diff = np.abs(text.double().numpy() - ref).max()
    assert diff <= TEXT_ATOL, f"text rows differ by {diff:.3e} (> {TEXT_ATOL})"


# ----------------------------------------------------------------------------- per image stages

@pytest.mark.parametrize("dataset,image_id", IMAGE_CASES, ids=IMAGE_IDS)
def test_main_pass_image_features(dataset, image_id, tiny_model):
    """Main-pass tokens (ln_post @ proj on every token, before normalisation)."""
    x = model_input(dataset, image_id)
    n_tokens = 1 + (x.shape[1] // 16) * (x.shape[2] // 16)
    masks = self_only_masks(tiny_model.visual.transformer.layers, n_tokens, -100.0)
    grid = (x.shape[1] // 16, x.shape[2] // 16)
    with torch.no_grad():
        table = positional_table(tiny_model.visual, grid)
        tokens = tiny_model.visual(x[None], masks, positional_embedding=table).tokens[0]
    ref = helpers.golden_npz(dataset)[f"{image_id}/image_features"]
    assert_close_abs_or_rel(tokens, ref, f"{dataset}/{image_id} image_features")


@pytest.mark.parametrize("dataset,image_id", IMAGE_CASES, ids=IMAGE_IDS)
def test_stages_match_reference(dataset, image_id):
    z = helpers.golden_npz(dataset)
    info = helpers.golden_json(dataset)["images"][image_id]
    out = single_image_run(dataset, image_id)
    x = model_input(dataset, image_id)
    assert list(x.shape[1:]) == info["input_hw"]
    assert out.coarse.shape[1] == info["n_patches"]
    compared = []
    for field, key in STAGES:
        name = f"{image_id}/{key}"
        if name not in z:
            assert key == "attn_weight", f"golden array {name} missing"
            continue
        assert_close_abs_or_rel(getattr(out, field)[0], z[name], f"{dataset}/{name}")
        compared.append(key)
    assert {"logits_coarse", "logits_attn", "logits_refined", "scores"} <= set(compared)


def test_refinement_matrix_is_checked_somewhere():
    """attn_weight is only stored for small images: make sure the fixtures still hold some."""
    n = sum(f"{iid}/attn_weight" in helpers.golden_npz(ds) for ds, iid in IMAGE_CASES)
    assert n >= 5


# ----------------------------------------------------------------------------- crop plan

@pytest.mark.parametrize("dataset,image_id", IMAGE_CASES, ids=IMAGE_IDS)
def test_crop_plan_matches_reference(dataset, image_id):
    cfg = get_dataset(dataset)
    info = helpers.golden_json(dataset)["images"][image_id]
    cwr, forwards = info["cwr"], info["cwr_forwards"]
    out = single_image_run(dataset, image_id)

    # threshold over the whole S2 (background columns included), candidates foreground only
    s2 = out.box_refined[0]
    lo, hi = float(s2.min()), float(s2.max())
    thr = lo + cfg.params.crop_rel_threshold * (hi - lo)
    for got, want, what in ((hi, cwr["max"], "max"), (lo, cwr["min"], "min"), (thr, cwr["thres"], "thres")):
        assert abs(got - want) <= SCORE_ATOL or abs(got - want) <= SCORE_RTOL * abs(want), (what, got, want)
    candidates = [int(c) for c in torch.nonzero(out.local_scores[0] > thr).flatten()]
    assert candidates == cwr["candidates"]

    plan = [(job.class_index, list(job.box)) for job in out.crops]
    assert plan == [(f["ccls"], f["box_x1y1x2y2"]) for f in forwards]
    assert len(plan) == cwr["n_forwards"]
    assert all(job.image == 0 for job in out.crops)
    for job, f in zip(out.crops, forwards):
        x1, y1, x2, y2 = job.box
        assert [16 * (y2 - y1), 16 * (x2 - x1)] == f["crop_hw"]
        assert tuple(job.region.shape) == (y2 - y1, x2 - x1)

    done = [job.class_index for job in out.crops]
    if cwr["early_return"]:
        stop = cwr["early_return_at_cls"]
        assert stop in candidates and stop not in done
        # everything before the stop ran, nothing from the stop on
        assert done == candidates[:candidates.index(stop)]
        untouched = candidates[candidates.index(stop):]
        assert torch.equal(out.scores[0, untouched], out.local_scores[0, untouched])
    else:
        assert done == candidates


@pytest.mark.parametrize("dataset,image_id",
                         [c for c in IMAGE_CASES
                          if helpers.golden_json(c[0])["images"][c[1]]["cwr_forwards"]],
                         ids=lambda v: v if isinstance(v, str) else None)
def test_crop_regions_and_class_tokens_match_reference(dataset, image_id, tiny_model):
    z = helpers.golden_npz(dataset)
    forwards = helpers.golden_json(dataset)["images"][image_id]["cwr_forwards"]
    out = single_image_run(dataset, image_id)
    x = model_input(dataset, image_id)
    visual = tiny_model.visual
    crops, regions = crop_inputs(x[None], out.crops, visual.patch_size, visual.input_resolution,
                                 visual.native_grid)
    assert tuple(crops.shape) == (len(forwards), 3, 224, 224)
    assert regions.dtype == torch.bool and tuple(regions.shape) == (len(forwards), 196)
    for k, f in enumerate(forwards):
        ref = z[f"{image_id}/cwr{k}_mask"]
        np.testing.assert_array_equal(regions[k].numpy(), ref, err_msg=f"{image_id} cwr{k}_mask")
        assert int(regions[k].sum()) == f["n_keep_tokens"]
    masks = region_masks(regions, visual.transformer.layers, get_dataset(dataset).params.region_mask_value)
    with torch.no_grad():
        cls = visual(crops, masks, cls_only=True).tokens[:, 0]
    for k in range(len(forwards)):
        assert_close_abs_or_rel(cls[k], z[f"{image_id}/cwr{k}_cls_feature"], f"{image_id} cwr{k}_cls_feature")


# ----------------------------------------------------------------------------- whole dataset, API

@functools.lru_cache(maxsize=None)
def dataset_inputs(dataset: str) -> tuple[torch.Tensor, ...]:
    return tuple(model_input(dataset, iid) for iid in helpers.golden_image_ids(dataset))


@functools.lru_cache(maxsize=None)
def dataset_scores(dataset: str, batch_size: int) -> torch.Tensor:
    tg = Tagger.for_dataset(helpers.tiny_model(), dataset, use_text_cache=False, batch_size=batch_size)
    return tg.scores(list(dataset_inputs(dataset)))


@pytest.mark.parametrize("batch_size", [1, 8])
@pytest.mark.parametrize("dataset", DATASETS)
def test_tagger_scores_match_reference(dataset, batch_size):
    z = helpers.golden_npz(dataset)
    ids = helpers.golden_image_ids(dataset)
    scores = dataset_scores(dataset, batch_size)
    assert scores.dtype == torch.float32
    assert tuple(scores.shape) == z["predictions"].shape == (len(ids), get_dataset(dataset).num_classes)
    assert_close_abs_or_rel(scores, z["predictions"], f"{dataset} predictions (batch {batch_size})")
    for i, iid in enumerate(ids):
        assert_close_abs_or_rel(scores[i], z[f"{iid}/scores"], f"{dataset}/{iid} scores (batch {batch_size})")


def test_batch_of_eight_really_batches_voc():
    """VOC holds two 48x64 images: with batch_size 8 they share one main pass."""
    groups = batch_by_size([x.shape for x in dataset_inputs("voc2007")], 8)
    assert max(len(g) for g in groups) >= 2
    assert max(len(g) for g in batch_by_size([x.shape for x in dataset_inputs("voc2007")], 1)) == 1


def test_batched_duplicates_with_crops_match_reference():
    """Several equal-size images with crops in ONE batch (crops of several images in one
    forward) give each image its reference scores."""
    ds = "voc2007"
    z = helpers.golden_npz(ds)
    order = ["2007_000121", "2008_000901", "2007_000121", "2008_000986", "2008_000986", "2007_000121"]
    tg = Tagger.for_dataset(helpers.tiny_model(), ds, use_text_cache=False, batch_size=8)
    scores = tg.scores([model_input(ds, iid) for iid in order])
    for i, iid in enumerate(order):
        assert_close_abs_or_rel(scores[i], z[f"{iid}/scores"], f"{ds}/{iid} (position {i} of a mixed batch)")


@pytest.mark.parametrize("dataset", DATASETS)
def test_label_file_lines_match_reference(dataset):
    cfg = get_dataset(dataset)
    ids = helpers.golden_image_ids(dataset)
    for batch_size in (1, 8):
        lines = label_file_lines(ids, dataset_scores(dataset, batch_size), cfg.label_rel_threshold)
        assert lines == helpers.golden_label_lines()["label_file_lines"][dataset], batch_size


@pytest.mark.parametrize("dataset", DATASETS)
def test_metrics_match_reference(dataset):
    cfg = get_dataset(dataset)
    z = helpers.golden_npz(dataset)
    ref = helpers.golden_json(dataset)["metrics_full_precision"]
    entries = read_split(helpers.golden_split_path(dataset), cfg.num_classes, cfg.split_label_map)
    onehot = labels_to_onehot(entries, cfg.num_classes)
    np.testing.assert_array_equal(onehot.numpy(), z["labels_onehot"])
    scores = dataset_scores(dataset, 1)
    got = {"mAP": mean_average_precision(scores, onehot)}
    got["F1"], got["P"], got["R"] = f1_overall(scores, onehot, cfg.label_rel_threshold)
    for key in ("mAP", "F1", "P", "R"):
        want = helpers.metric_value(ref[key])
        if math.isnan(want):
            assert math.isnan(got[key]), (key, got[key])
        else:
            assert abs(got[key] - want) <= METRIC_ATOL, (key, got[key], want)


# ----------------------------------------------------------------------------- quirk Q1

def test_native_grid_uses_the_stored_positional_table(tiny_model):
    visual = tiny_model.visual
    assert visual.native_grid == (14, 14)
    assert positional_table(visual, (14, 14)) is visual.positional_embedding
    assert visual.positional_embedding_for((14, 14)) is visual.positional_embedding


@pytest.mark.parametrize("grid", [(3, 4), (24, 32), (1, 19), (14, 15)])
def test_other_grids_resize_then_round_to_fp16(tiny_model, grid):
    visual = tiny_model.visual
    table = visual.positional_embedding.detach()
    d = table.shape[1]
    patches = table[1:].t().reshape(1, d, 14, 14)
    resized = F.interpolate(patches, size=grid, mode="bilinear", align_corners=False)
    unrounded = torch.cat([table[:1], resized.reshape(d, -1).t()], dim=0)
    expected = unrounded.half().float()
    got = positional_table(visual, grid)  # TagCLIP's table (quirk Q1)
    assert got.dtype == torch.float32
    assert tuple(got.shape) == (1 + grid[0] * grid[1], d)
    assert torch.equal(got, expected)
    assert not torch.equal(got, unrounded)  # the rounding is real for these grids
    # the backbone's own table for a grid is the plain resize: the rounding is the method's
    assert torch.equal(visual.positional_embedding_for(grid), unrounded)


def test_224_image_takes_the_stored_table_path():
    """The 224x224 golden images are exactly the manifest's 'original fp32 pos-emb' path."""
    native = [(ds, iid) for ds, iid in IMAGE_CASES if list(model_input(ds, iid).shape[1:]) == [224, 224]]
    assert ("voc2007", "2007_000114") in native and ("cocostuff", "000000002000") in native


def test_224_embedding_uses_unrounded_table_only_at_native_size():
    """With float32 (not fp16-exact) weights the two paths are distinguishable: a 224x224
    input adds the stored table unrounded; CLIP-ES's table (always resized) rounds it."""
    model = helpers.random_model(seed=3, vision_width=64)
    visual = model.visual
    table = visual.positional_embedding.detach()
    assert not torch.equal(table, table.half().float())
    x = helpers.smooth_random_image(5, 224, 224)[None]
    with torch.no_grad():
        patches = visual.conv1(x).flatten(2).transpose(1, 2)
        cls = visual.class_embedding.expand(1, 1, -1)
        tokens = torch.cat([cls, patches], dim=1)
        expected = visual.ln_pre(tokens + table)
        rounded = visual.ln_pre(tokens + table.half().float())
        got = visual.embed(x, positional_table(visual, (14, 14)))
        got_resized = visual.embed(x, cam_positional_table(visual.positional_embedding, (14, 14)))
    assert torch.equal(got, expected)
    assert torch.equal(got_resized, rounded)
    assert not torch.equal(got, got_resized)
