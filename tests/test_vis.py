"""Pictures (``toolkit.vis`` and ``--vis_dir`` of the scripts): every file a PNG of the right
size, heat maps that follow the map, legends that list the classes present, bar charts with
NaN and 171 classes, and runs whose numbers do not change when pictures are drawn."""
from __future__ import annotations

import math
from pathlib import Path

import eval_helpers as eh
import matplotlib
import numpy as np
import pytest
from PIL import Image

from clip_es.registry import get_eval_config
from tagclip.registry import get_dataset
from toolkit import vis
from toolkit.palette import voc_colormap

GOLDEN = Path(__file__).resolve().parent / "fixtures" / "golden"
TINY = GOLDEN / "tiny_clip_fp16.npz"
VOC = GOLDEN / "inputs" / "VOC"
VOC_NAMES = get_eval_config("voc2012").class_names  # 21, background first


def _size(path) -> tuple[int, int]:
    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.size


def _rgb(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB")).astype(int)


def _no_temp_files(folder: Path):
    assert not [p.name for p in folder.rglob("*") if p.name.endswith(".tmp")]


def _split_ids() -> list[tuple[str, list[int]]]:
    out = []
    for line in (VOC / "split.txt").read_text().splitlines():
        if line.strip():
            image_id, *labels = line.split()
            out.append((image_id, [int(c) for c in labels]))
    return out


# ----------------------------------------------------------------------------- draw_tags

def test_draw_tags_size_order_and_box(tmp_path):
    base = np.full((120, 200, 3), 200, dtype=np.uint8)
    out = tmp_path / "sub" / "tags.png"
    lines = vis.draw_tags(Image.fromarray(base), [("cat", 0.2), ("dog", 0.9), ("sofa", float("nan"))], out)
    assert lines == ["dog  0.900", "cat  0.200", "sofa  n/a"]  # best first, NaN last
    assert _size(out) == (200, 120)
    px = _rgb(out)
    assert px[2, 2].sum() < base[2, 2].sum().astype(int) - 100  # the box darkens its corner
    np.testing.assert_array_equal(px[-5:, -5:], 200)            # the rest is the image
    _no_temp_files(tmp_path)


def test_draw_tags_from_a_file_and_many_tags(tmp_path):
    path = VOC / "JPEGImages" / "2007_000100.jpg"
    lines = vis.draw_tags(path, [(f"class{i}", i / 100) for i in range(30)], tmp_path / "t.png", max_lines=5)
    assert len(lines) == 5 and lines[-1] == "... +26 more"
    with Image.open(path) as img:
        w, h = _size(tmp_path / "t.png")
        assert w >= img.size[0] and h >= img.size[1]


def test_draw_tags_beside_a_small_image(tmp_path):
    """Tags that do not fit on a small image go on a black panel to its right: the image is
    kept untouched and no tag is cut off."""
    base = np.full((30, 40, 3), 200, dtype=np.uint8)
    lines = vis.draw_tags(Image.fromarray(base), [("potted plant", 0.61), ("dog", 0.93)], tmp_path / "s.png")
    assert lines == ["dog  0.930", "potted plant  0.610"]
    w, h = _size(tmp_path / "s.png")
    assert w > 40 and h >= 30
    px = _rgb(tmp_path / "s.png")
    np.testing.assert_array_equal(px[:30, :40], 200)       # the image itself, untouched
    assert (px[:, 40:] > 200).any()                        # white text on the panel


# ----------------------------------------------------------------------------- cam_overlays

def test_cam_overlays_follow_the_map(tmp_path):
    image = np.full((40, 60, 3), 128, dtype=np.uint8)
    left_high = np.zeros((40, 60), dtype=np.float32)
    left_high[:, :30] = 1.0
    small = np.zeros((10, 15), dtype=np.float32)   # another size: resized to the image
    small[:, 10:] = 1.0
    names = ["aeroplane", "potted plant"]
    files = vis.cam_overlays(image, [1, 0], np.stack([left_high, np.zeros_like(left_high)]), names,
                             tmp_path, "img1")
    assert [p.name for p in files] == ["img1_potted_plant.png", "img1_aeroplane.png"]
    px = _rgb(files[0])
    top = vis.CAPTION_H
    assert _size(files[0]) == (60, top + 40 + vis.COLOUR_BAR_H)   # caption band, picture, colour bar
    assert (px[:top] < 100).all(axis=-1).any()                     # the caption's (dark) text
    bar = px[top + 40 + vis.COLOUR_BAR_H // 2]                     # the colour bar: jet from 0 to 1
    assert bar[-1, 0] > bar[-1, 2] + 40 and bar[0, 2] > bar[0, 0] + 40
    high, low = px[top + 20, 5], px[top + 20, 55]
    assert high[0] > high[2] + 40   # jet at 1: red
    assert low[2] > low[0] + 40     # jet at 0: blue
    assert np.abs(high - low).sum() > 100
    resized = vis.cam_overlays(image, [0], small[None], names, tmp_path / "r", "img2")[0]
    px = _rgb(resized)
    assert _size(resized) == (60, top + 40 + vis.COLOUR_BAR_H)
    assert px[top + 20, 55, 0] > px[top + 20, 55, 2] and px[top + 20, 5, 2] > px[top + 20, 5, 0]
    _no_temp_files(tmp_path)


def test_cam_overlays_reject_mismatched_keys(tmp_path):
    with pytest.raises(ValueError):
        vis.cam_overlays(np.zeros((4, 4, 3), np.uint8), [0, 1], np.zeros((1, 4, 4)), ["a", "b"], tmp_path, "x")


# ----------------------------------------------------------------------------- mask_comparison

def _masks(h=60, w=80):
    pred = np.zeros((h, w), dtype=np.uint8)
    pred[10:40, 10:40] = 15     # person
    gt = np.zeros((h, w), dtype=np.uint8)
    gt[12:42, 12:42] = 15
    gt[45:55, 50:70] = 8        # cat, missed by the prediction
    gt[0, :] = 255
    return pred, gt


def test_mask_comparison_panels_legend_and_colours(tmp_path):
    pred, gt = _masks()
    image = np.full((60, 80, 3), 90, dtype=np.uint8)
    out = tmp_path / "cmp.png"
    meta = vis.mask_comparison(image, pred, gt, VOC_NAMES, out, title="x")
    assert _size(out) == meta["size"]
    assert meta["panels"] == ["image", "prediction", "ground truth"]
    palette = voc_colormap()
    assert meta["legend"] == [(0, "background", (0, 0, 0)), (8, "cat", tuple(palette[8])),
                              (15, "person", tuple(palette[15])), (255, "ignore", tuple(palette[255]))]
    px = _rgb(out).reshape(-1, 3)
    for label in (8, 15, 255):   # every legend colour is in the picture (masks and legend patches)
        assert (px == palette[label]).all(axis=1).sum() > 50, label
    assert (px == vis.OUTLINE_RGB).all(axis=1).sum() > 50   # region borders, white
    # the panels are side by side: the picture is wider than three masks and taller than one
    w, h = meta["size"]
    assert w >= 3 * 80 and h > 60
    _no_temp_files(tmp_path)


def test_mask_comparison_without_image_and_large_masks(tmp_path):
    pred, gt = _masks(900, 1200)
    meta = vis.mask_comparison(None, pred, gt, VOC_NAMES, tmp_path / "a.png")
    assert meta["panels"] == ["prediction", "ground truth"]
    assert _size(tmp_path / "a.png") == meta["size"]
    assert meta["size"][0] < 2 * 700   # panels are scaled down to at most 640 px
    meta = vis.mask_comparison(None, pred, None, VOC_NAMES, tmp_path / "b.png")
    assert meta["panels"] == ["prediction"] and [x[0] for x in meta["legend"]] == [0, 15]
    with pytest.raises(ValueError):
        vis.mask_comparison(None, pred, gt[:10], VOC_NAMES, tmp_path / "c.png")


# ----------------------------------------------------------------------------- bar_chart

def test_bar_chart_nan_and_171_classes(tmp_path):
    names = list(get_dataset("cocostuff").class_names)
    assert len(names) == 171
    values = np.linspace(0, 1, 171)
    values[[3, 100]] = np.nan
    meta = vis.bar_chart(names, values, "IoU", tmp_path / "big.png")
    assert meta["missing"] == [names[3], names[100]]
    assert _size(tmp_path / "big.png") == meta["size"]
    small = vis.bar_chart(names[:5], [0.5, math.nan, 0.1, 0.0, 1.0], "AP", tmp_path / "small.png")
    assert _size(tmp_path / "small.png") == small["size"]
    assert meta["size"][0] == small["size"][0]
    assert meta["size"][1] > 171 * 20 > small["size"][1]   # about 22 px per class
    all_nan = vis.bar_chart(["a", "b"], [math.nan, math.nan], "none", tmp_path / "nan.png")
    assert all_nan["missing"] == ["a", "b"]
    with pytest.raises(ValueError):
        vis.bar_chart(["a"], [1.0, 2.0], "bad", tmp_path / "bad.png")
    _no_temp_files(tmp_path)


def test_no_global_backend_change(tmp_path):
    before = matplotlib.rcParams["backend"]
    vis.bar_chart(["a"], [0.5], "t", tmp_path / "b.png")
    assert matplotlib.rcParams["backend"] == before


# ----------------------------------------------------------------------------- command lines

def test_classify_and_generate_cams_vis_dir(tmp_path, capsys):
    from clip_es.cli import generate_cams_main
    from tagclip.cli import classify_main

    cache = tmp_path / "cache"
    common = ["--model_path", str(TINY), "--device", "cpu", "--model_cache", str(cache)]
    assert classify_main(["--img_root", str(VOC / "JPEGImages"), "--split_file", str(VOC / "split.txt"),
                          "--output_dir", str(tmp_path / "out"), "--no_text_cache",
                          "--vis_dir", str(tmp_path / "cls"), *common]) == 0
    ids = _split_ids()
    assert sorted(p.name for p in (tmp_path / "cls").iterdir()) == \
        sorted([f"{i}.png" for i, _ in ids] + ["ap_per_class.png"])
    for image_id, _ in ids:
        with Image.open(VOC / "JPEGImages" / f"{image_id}.jpg") as img:
            w, h = _size(tmp_path / "cls" / f"{image_id}.png")
            assert w >= img.size[0] and h >= img.size[1]   # the image, its tags on it or beside it
    assert _size(tmp_path / "cls" / "ap_per_class.png")[0] == 800

    assert generate_cams_main(["--dataset", "voc2012", "--img_root", str(VOC / "JPEGImages"),
                               "--split_file", str(VOC / "split.txt"), "--cam_out_dir", str(tmp_path / "cams"),
                               "--vis_dir", str(tmp_path / "camvis"), *common]) == 0
    names = get_dataset("voc2012").class_names
    expected = sorted(f"{i}_{vis.safe_name(names[c])}.png" for i, labels in ids for c in labels)
    assert sorted(p.name for p in (tmp_path / "camvis").iterdir()) == expected
    for image_id, labels in ids:
        with Image.open(VOC / "JPEGImages" / f"{image_id}.jpg") as img:
            w, h = img.size   # the image under its caption band, above its colour bar
            assert _size(tmp_path / "camvis" / f"{image_id}_{names[labels[0]]}.png") == \
                (w, vis.CAPTION_H + h + vis.COLOUR_BAR_H)
    # a rerun keeps the CAM files and still draws the pictures
    (tmp_path / "camvis2").mkdir()
    assert generate_cams_main(["--dataset", "voc2012", "--img_root", str(VOC / "JPEGImages"),
                               "--split_file", str(VOC / "split.txt"), "--cam_out_dir", str(tmp_path / "cams"),
                               "--vis_dir", str(tmp_path / "camvis2"), *common]) == 0
    assert sorted(p.name for p in (tmp_path / "camvis2").iterdir()) == expected
    assert "resuming" in capsys.readouterr().out


@pytest.fixture(scope="module")
def voc_cams(tmp_path_factory):
    return eh.write_cam_dir("voc2012", tmp_path_factory.mktemp("vis_cams"))


def test_eval_cam_vis_dir_same_numbers(voc_cams, tmp_path, capsys):
    from clip_es.eval_cli import eval_cam_main

    argv = ["--dataset", "voc2012", "--cam_out_dir", str(voc_cams), "--gt_root", str(VOC / "SegmentationClass"),
            "--split_file", str(VOC / "split.txt")]
    assert eval_cam_main(argv + ["--save_scores", str(tmp_path / "plain.json")]) == 0
    plain = capsys.readouterr().out
    assert eval_cam_main(argv + ["--save_scores", str(tmp_path / "vis.json"), "--vis_dir", str(tmp_path / "v"),
                                 "--image_root", str(VOC / "JPEGImages")]) == 0
    drawn = capsys.readouterr().out
    *drawn_lines, drawn_summary = drawn.replace(f">>>pictures written to {tmp_path / 'v'}\n", "").splitlines()
    *plain_lines, plain_summary = plain.splitlines()
    assert drawn_lines == plain_lines   # the same numbers; the summary lines name their outputs
    assert f"pictures {tmp_path / 'v'}" in drawn_summary and "pictures" not in plain_summary
    assert (tmp_path / "plain.json").read_text() == (tmp_path / "vis.json").read_text()
    ids = eh.variant_ids("voc2012")
    assert sorted(p.name for p in (tmp_path / "v").iterdir()) == sorted([f"{i}.png" for i in ids] + ["iou_per_class.png"])
    for image_id in ids:
        with Image.open(VOC / "SegmentationClass" / f"{image_id}.png") as gt:
            w, h = _size(tmp_path / "v" / f"{image_id}.png")
            assert w > 3 * min(gt.width, 640 * gt.width // max(gt.size)) and h > min(gt.height, 640)
    assert _size(tmp_path / "v" / "iou_per_class.png")[0] == 800
    # without --image_root: prediction and GT only (narrower)
    assert eval_cam_main(argv + ["--vis_dir", str(tmp_path / "w")]) == 0
    assert _size(tmp_path / "w" / f"{ids[0]}.png")[0] < _size(tmp_path / "v" / f"{ids[0]}.png")[0]


def test_eval_crf_vis_dir(voc_cams, tmp_path, capsys):
    from clip_es.eval_cli import eval_crf_main

    argv = ["--dataset", "voc2012", "--cam_out_dir", str(voc_cams), "--gt_root", str(VOC / "SegmentationClass"),
            "--image_root", str(VOC / "JPEGImages"), "--split_file", str(VOC / "split.txt"), "--eval_only",
            "--jobs", "1"]
    assert eval_crf_main(argv + ["--save_scores", str(tmp_path / "plain.json")]) == 0
    assert eval_crf_main(argv + ["--save_scores", str(tmp_path / "vis.json"), "--vis_dir", str(tmp_path / "v")]) == 0
    assert (tmp_path / "plain.json").read_text() == (tmp_path / "vis.json").read_text()
    ids = eh.variant_ids("voc2012")
    assert sorted(p.name for p in (tmp_path / "v").iterdir()) == sorted([f"{i}.png" for i in ids] + ["iou_per_class.png"])
    for image_id in ids:
        assert _size(tmp_path / "v" / f"{image_id}.png")[1] > 100
    _no_temp_files(tmp_path)


def test_region_borders_by_hand():
    labels = np.array([[0, 0, 1],
                       [0, 2, 1],
                       [0, 2, 2]])
    # a pixel is a border when its right or lower neighbour differs
    np.testing.assert_array_equal(vis.region_borders(labels), [[False, True, False],
                                                               [True, True, True],
                                                               [True, False, False]])


def test_bar_chart_marks_classes_left_out_of_the_mean(tmp_path):
    meta = vis.bar_chart(["background", "cat", "dog"], [0.9, float("nan"), 0.0], "IoU", tmp_path / "b.png",
                         counted=[True, False, False])
    assert meta["labels"] == ["background", "cat (not in GT)", "dog (not in GT)"]
    assert meta["missing"] == ["cat"]
    colours = {tuple(c) for c in _rgb(tmp_path / "b.png").reshape(-1, 3)}
    absent = tuple(int(vis.ABSENT_COLOUR[i:i + 2], 16) for i in (1, 3, 5))
    assert absent not in colours   # dog's bar has length 0: nothing drawn in its colour
    meta = vis.bar_chart(["a", "b"], [0.5, 0.25], "IoU", tmp_path / "c.png", counted=[True, False])
    assert meta["labels"] == ["a", "b (not in GT)"]
    colours = {tuple(c) for c in _rgb(tmp_path / "c.png").reshape(-1, 3)}
    assert absent in colours


def test_mask_overlay_blends_the_labels_and_adds_their_legend(tmp_path):
    h, w = 40, 60
    image = np.full((h, w, 3), 100, dtype=np.uint8)
    labels = np.zeros((h, w), dtype=np.uint8)
    labels[10:30, 20:50] = 2          # a block of class 2
    labels[0:5, 0:5] = 255            # ignored pixels
    info = vis.mask_overlay(image, labels, ["background", "cat", "dog"], tmp_path / "o.png")
    assert [(lab, name) for lab, name, _ in info["legend"]] == [(0, "background"), (2, "dog"), (255, "ignore")]
    out = np.asarray(Image.open(tmp_path / "o.png").convert("RGB")).astype(int)
    assert out.shape[1] == w and out.shape[0] == info["size"][1] > h   # the legend below the picture
    dog = voc_colormap(256)[2].astype(int)
    # inside the block (away from its border): 0.5 image + 0.5 colour, rounded half up
    np.testing.assert_array_equal(out[20, 35], np.floor(0.5 * 100 + 0.5 * dog + 0.5).astype(int))
    np.testing.assert_array_equal(out[35, 5], [100, 100, 100])        # background: the picture itself
    np.testing.assert_array_equal(out[29, 35], list(vis.OUTLINE_RGB))  # the block's lower border


def test_mask_overlay_refuses_a_mask_of_another_size(tmp_path):
    with pytest.raises(ValueError, match="differs from the mask"):
        vis.mask_overlay(np.zeros((10, 10, 3), np.uint8), np.zeros((10, 12), np.uint8), ["bg"], tmp_path / "o.png")
