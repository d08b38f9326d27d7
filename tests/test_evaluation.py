"""SegEvaluator arithmetic, the prediction rules of SPEC §6 and parity with the reference's
eval_cam.py / eval_cam_cocostuff.py scores on the golden CAMs."""
from __future__ import annotations

import math
import pickle

import eval_helpers as eh
import numpy as np
import pytest

from clip_es.evaluation import (
    SegEvaluator,
    background_score,
    check_same_size,
    gt_to_eval,
    predict,
    read_cam,
    read_gt,
    select_threshold,
    threshold_candidates,
)
from clip_es.registry import CAM_CONFIGS, get_eval_config
from tagclip.registry import DATASETS
from toolkit.errors import InputError
from toolkit.vocab import COCO_STUFF_171_TO_27, COCO_STUFF_182_TO_27

VOC = get_eval_config("voc2012")
COCO = get_eval_config("coco2017")
STUFF = get_eval_config("cocostuff")


# ----------------------------------------------------------------------------- confusion matrix

def test_hand_made_confusion_matrix_and_scores():
    gt = np.array([[0, 0, 1, 1],
                   [2, 2, 255, 1]], dtype=np.uint8)
    pred = np.array([[0, 1, 1, 1],
                     [2, 0, 3, 3]], dtype=np.uint8)
    ev = SegEvaluator(4).update(pred, gt)
    # rows = GT, columns = prediction; the 255 pixel is ignored
    np.testing.assert_array_equal(ev.hist, [[1, 1, 0, 0],
                                            [0, 2, 0, 1],
                                            [1, 0, 1, 0],
                                            [0, 0, 0, 0]])
    s = ev.scores()
    assert s.pixel_accuracy == pytest.approx(4 / 7)
    assert s.mean_accuracy == pytest.approx((1 / 2 + 2 / 3 + 1 / 2) / 3)  # class 3 (no GT) is NaN, skipped
    iou = [1 / 3, 2 / 4, 1 / 2, 0.0]  # class 3: predicted once, never in GT -> 0 (not NaN)
    np.testing.assert_allclose(s.class_iou, iou)
    np.testing.assert_array_equal(s.present, [True, True, True, False])
    assert s.miou == pytest.approx(np.mean(iou[:3]))  # class 3 is not in the GT: excluded
    assert s.fw_iou == pytest.approx(2 / 7 * iou[0] + 3 / 7 * iou[1] + 2 / 7 * iou[2])
    d = s.as_dict()
    assert list(d) == ["Pixel Accuracy", "Mean Accuracy", "Frequency Weighted IoU", "Mean IoU", "Class IoU"]
    assert d["Class IoU"][3] == 0.0


def test_class_absent_from_gt_and_predictions_is_nan_and_excluded():
    ev = SegEvaluator(5).update(np.array([0, 1, 1]), np.array([0, 1, 0]))
    s = ev.scores()
    assert all(math.isnan(v) for v in s.class_iou[2:])
    assert s.miou == pytest.approx((1 / 2 + 1 / 2) / 2)
    assert not np.isnan(s.mean_accuracy)


def test_ignore_and_out_of_range_gt():
    gt = np.array([255, 7, 0, 1], dtype=np.uint8)
    pred = np.array([3, 3, 0, 1], dtype=np.uint8)  # 3 is out of range but only on ignored pixels
    ev = SegEvaluator(2).update(pred, gt)
    assert ev.hist.sum() == 2
    assert ev.unexpected_gt_pixels == 1  # the 7 (neither a class nor 255)
    with pytest.raises(ValueError, match="outside"):
        SegEvaluator(2).update(np.array([2]), np.array([1]))
    with pytest.raises(ValueError, match="shape"):
        SegEvaluator(2).update(np.zeros((2, 2), int), np.zeros((2, 3), int))


def test_empty_evaluator_scores_are_nan():
    s = SegEvaluator(3).scores()
    assert math.isnan(s.pixel_accuracy) and math.isnan(s.miou) and math.isnan(s.mean_accuracy)
    assert s.fw_iou == 0.0


def test_merge_and_add_equal_one_pass_in_any_order():
    rng = np.random.default_rng(0)
    pairs = [(rng.integers(0, 6, (7, 9)), rng.choice([0, 1, 2, 3, 4, 5, 255], (7, 9))) for _ in range(5)]
    whole = SegEvaluator(6)
    for p, g in pairs:
        whole.update(p, g)
    a, b = SegEvaluator(6), SegEvaluator(6)
    for p, g in pairs[:2]:
        a.update(p, g)
    for p, g in pairs[2:]:
        b.update(p, g)
    np.testing.assert_array_equal((a + b).hist, whole.hist)
    np.testing.assert_array_equal((b + a).hist, whole.hist)
    assert (a + b).images == 5 and a.images == 2  # + leaves its operands alone
    c = pickle.loads(pickle.dumps(b))
    c += a
    np.testing.assert_array_equal(c.hist, whole.hist)
    assert c.scores().miou == whole.scores().miou
    with pytest.raises(ValueError):
        a.merge(SegEvaluator(5))


def test_matches_reference_formula_on_random_data():
    """Independent float64 re-derivation of the reference's scores() formulas."""
    rng = np.random.default_rng(1)
    n = 7
    gt = rng.choice(list(range(5)) + [255], size=(40, 30))  # classes 5, 6 never in GT
    pred = rng.integers(0, n, size=(40, 30))
    s = SegEvaluator(n).update(pred, gt).scores()
    m = gt < n
    hist = np.zeros((n, n))
    for t, p in zip(gt[m], pred[m]):
        hist[t, p] += 1
    with np.errstate(all="ignore"):
        iou = np.diag(hist) / (hist.sum(0) + hist.sum(1) - np.diag(hist))
    assert s.miou == pytest.approx(np.mean(iou[:5]))
    np.testing.assert_allclose(s.class_iou, iou)
    assert s.pixel_accuracy == pytest.approx(np.trace(hist) / hist.sum())


# ----------------------------------------------------------------------------- prediction rules

def test_background_formula_is_float16():
    cams = np.array([[[0.3, 0.0]], [[0.1, 0.7001]]], dtype=np.float16)
    bg = background_score(cams, 1)
    assert bg.dtype == np.float16 and bg.shape == (1, 1, 2)
    np.testing.assert_array_equal(bg, np.float16(1) - cams.max(axis=0, keepdims=True))
    assert bg[0, 0, 0] == np.float16(1) - np.float16(0.3)
    bg2 = background_score(cams, 2.0)  # a float power keeps float16 too
    assert bg2.dtype == np.float16
    np.testing.assert_array_equal(bg2, (np.float16(1) - cams.max(0, keepdims=True)) ** 2)
    const = background_score(cams, 0.25)  # thres < 1: constant score
    assert const.dtype == np.float16 and (const == np.float16(0.25)).all()


def test_argmax_ties_lowest_index_background_first():
    # pixel 0: bg 0.5 ties with the class (0.5) -> background; pixel 1: two classes tie -> first
    cams = np.array([[[0.5, 0.8]], [[0.2, 0.8]]], dtype=np.float16)
    keys = np.array([4, 2])
    np.testing.assert_array_equal(predict(keys, cams, VOC)[0], [[0, 5]])
    # pixel with every CAM 0: bg = 1 wins; thres 0 (constant 0 background) ties -> background too
    zero = np.zeros((2, 1, 1), np.float16)
    assert predict(keys, zero, VOC)[0][0, 0] == 0
    assert predict(keys, zero, VOC, thres=0)[0][0, 0] == 0
    # constant 0 background loses to any positive CAM
    small = np.full((1, 1, 1), 0.01, np.float16)
    assert predict([7], small, VOC, thres=0)[0][0, 0] == 8
    assert predict([7], small, VOC, thres=1)[0][0, 0] == 0
    # no background: plain argmax over the CAMs, ties to the first
    a, b = COCO_STUFF_171_TO_27[112], COCO_STUFF_171_TO_27[162]
    assert a != b
    np.testing.assert_array_equal(predict([112, 162], cams, STUFF)[0], [[a, a]])
    np.testing.assert_array_equal(predict([112, 162], cams[::-1], STUFF)[0], [[b, a]])


def test_predict_with_configs():
    cams = np.array([[[0.9, 0.1, 0.6]], [[0.2, 0.05, 0.6]]], dtype=np.float16)
    labels, conf = predict([14, 0], cams, VOC, 1)
    np.testing.assert_array_equal(labels, [[15, 0, 15]])
    assert labels.dtype == np.uint8 and conf.dtype == np.float16
    np.testing.assert_array_equal(conf, [[cams[0, 0, 0], np.float16(1) - np.float16(0.1), cams[0, 0, 2]]])
    coco, _ = predict([79, 0], cams, COCO, 1)
    np.testing.assert_array_equal(coco, [[80, 0, 80]])
    # COCO-Stuff: no background, fine-171 -> coarse-27
    stuff, _ = predict([112, 162], cams, STUFF, 1)
    np.testing.assert_array_equal(stuff, [[COCO_STUFF_171_TO_27[112]] * 3])  # third pixel: tie -> first
    stuff2, _ = predict([112, 162], cams[::-1], STUFF, 1)
    np.testing.assert_array_equal(stuff2, [[COCO_STUFF_171_TO_27[162], COCO_STUFF_171_TO_27[162],
                                            COCO_STUFF_171_TO_27[112]]])
    assert COCO_STUFF_171_TO_27[112] != COCO_STUFF_171_TO_27[162]


def test_cocostuff_gt_mapping():
    gt = np.array([[0, 123, 173], [181, 182, 255]], dtype=np.uint8)
    out = gt_to_eval(gt, STUFF)
    np.testing.assert_array_equal(out, [[COCO_STUFF_182_TO_27[0], COCO_STUFF_182_TO_27[123],
                                         COCO_STUFF_182_TO_27[173]], [COCO_STUFF_182_TO_27[181], 255, 255]])
    assert gt_to_eval(np.array([[-1, 1000]]), STUFF).tolist() == [[255, 255]]
    np.testing.assert_array_equal(gt_to_eval(gt, VOC), gt)  # VOC / COCO: unchanged


def test_registry_eval_facts():
    for name in ("voc2012", "coco2017", "cocostuff"):
        cfg = get_eval_config(name)
        assert cfg.num_classes == CAM_CONFIGS[name].eval_num_classes
        assert cfg.num_keys == DATASETS[name].num_classes
    assert VOC.class_names[0] == "background" and VOC.class_names[15] == "person"
    assert COCO.class_names[:2] == ("background", "person") and STUFF.class_names[-1] == "water"
    with pytest.raises(ValueError):
        get_eval_config("voc2007")


def test_threshold_search_rules():
    assert threshold_candidates(2) == (1,)
    assert threshold_candidates(1) == (1,)
    assert threshold_candidates(0.5)[:2] == (0.05, 0.1) and len(threshold_candidates(0.5)) == 12
    assert select_threshold([(1, 0.3)]) == 1
    assert select_threshold([(0.05, 0.2), (0.1, 0.4), (0.15, 0.4)]) == 0.1  # first maximum
    assert select_threshold([(1, 0.0)]) == 0      # mIoU <= 0 everywhere -> thres 0
    assert select_threshold([(1, float("nan"))]) == 0


# ----------------------------------------------------------------------------- files

def test_read_cam_validation(tmp_path):
    good = {"keys": np.array([3, 5]), "attn_highres": np.zeros((2, 4, 6), np.float16)}
    np.save(tmp_path / "a.npy", good)
    keys, cams = read_cam(tmp_path / "a.npy", VOC)
    assert keys.dtype == np.int64 and cams.dtype == np.float16 and cams.shape == (2, 4, 6)

    def bad(obj, match, config=VOC, name="b.npy"):
        path = tmp_path / name
        if obj is not None:
            np.save(path, obj)
        with pytest.raises(InputError, match=match) as info:
            read_cam(path, config)
        assert info.value.path == str(path)

    bad(None, "not found", name="missing.npy")
    (tmp_path / "junk.npy").write_bytes(b"not a numpy file")
    bad(None, "not a readable CAM file", name="junk.npy")
    bad(np.zeros(3), "plain array")
    bad({"keys": np.array([1])}, "attn_highres")
    bad({**good, "keys": np.array([3, 20])}, "class id 20 is outside the 20-class voc2012")
    bad({**good, "keys": np.array([3, -1])}, "class id -1")
    bad({**good, "keys": np.array([170, 171])}, "171 is outside the 171-class cocostuff", STUFF)
    bad({**good, "keys": np.array([1, 2, 3])}, "does not match 3 keys")
    bad({**good, "attn_highres": np.zeros((2, 4), np.float16)}, "does not match")
    bad({**good, "attn_highres": np.zeros((2, 4, 6), np.uint8)}, "float")
    empty = {"keys": np.zeros(0, np.int64), "attn_highres": np.zeros((0, 4, 6), np.float16)}
    bad(empty, "no classes", STUFF)  # COCO-Stuff has no background to predict
    np.save(tmp_path / "empty.npy", empty)  # an image without labels: background everywhere
    keys, cams = read_cam(tmp_path / "empty.npy", VOC)
    assert keys.size == 0 and np.array_equal(predict(keys, cams, VOC)[0], np.zeros((4, 6), np.uint8))
    nan = good["attn_highres"].copy()
    nan[0, 0, 0] = np.nan
    bad({**good, "attn_highres": nan}, "NaN")


def test_read_gt(tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((3, 4, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(InputError, match="single-channel"):
        read_gt(tmp_path / "rgb.png", VOC)
    with pytest.raises(InputError, match="not found"):
        read_gt(tmp_path / "none.png", VOC)
    (tmp_path / "junk.png").write_bytes(b"junk")
    with pytest.raises(InputError, match="cannot read GT mask"):
        read_gt(tmp_path / "junk.png", VOC)
    with pytest.raises(InputError, match=r"size 4x3 \(WxH\) differs from the CAM's 5x3"):
        check_same_size("gt.png", (3, 4), (3, 5), "GT mask")


# ----------------------------------------------------------------------------- parity

@pytest.mark.parametrize("variant", eh.VARIANTS)
def test_parity_with_reference_eval_cam(variant, tmp_path):
    """Our eval on the golden CAM files (written as .npy dicts) and GT reproduces the reference:
    identical label maps and scores (tolerance of the brief: 0.002 on mIoU / every class IoU)."""
    config = get_eval_config(eh.dataset_of(variant))
    cam_dir = eh.write_cam_dir(variant, tmp_path / f"{variant}_cams")
    ev = SegEvaluator(config.num_classes)
    for image_id in eh.variant_ids(variant):
        keys, cams = read_cam(cam_dir / f"{image_id}.npy", config)
        gt = read_gt(eh.folder(variant) / "SegmentationClass" / f"{image_id}.png", config)
        labels, _ = predict(keys, cams, config, threshold_candidates()[0])
        np.testing.assert_array_equal(labels, eh.reference_pred(variant, image_id, "cam"), err_msg=image_id)
        ev.update(labels, gt)
    got = ev.scores().as_dict()
    want = eh.expected_score(variant, "eval_cam")
    eh.compare_scores(got, want, config.num_classes)
    for key in ("Pixel Accuracy", "Mean Accuracy", "Frequency Weighted IoU"):
        assert got[key] == pytest.approx(want[key], abs=1e-12)
