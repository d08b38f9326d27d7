"""Dense CRF (SPEC §6): the Q5 image conversion, the float16 unary, a tiny-image CRF and parity
with the reference's eval_cam_with_crf.py on the golden CAMs."""
from __future__ import annotations

import eval_helpers as eh
import numpy as np
import pydensecrf.densecrf as pydensecrf  # pydensecrf2 is a hard requirement (requirements.txt)
import pytest

from clip_es import crf
from clip_es.crf import crf_image, crf_predict, dense_crf, unary_from_probs, wrap_to_uint8
from clip_es.evaluation import SegEvaluator, read_bgr, read_cam, read_gt
from clip_es.masks import apply_confidence_threshold
from clip_es.registry import get_eval_config

VOC = get_eval_config("voc2012")
STUFF = get_eval_config("cocostuff")


def test_wrap_to_uint8_manifest_example():
    got = wrap_to_uint8([-122.675, -104.008, -0.5, 0.7, 150.99])
    assert got.dtype == np.uint8
    assert got.tolist() == [134, 152, 0, 0, 150]
    assert wrap_to_uint8([255.9, -255.5, -256.0, 256.2]).tolist() == [255, 1, 0, 0]


def test_crf_image_subtracts_mean_and_wraps():
    bgr = np.array([[[0, 0, 0], [104, 117, 123], [255, 255, 255]]], dtype=np.uint8)
    out = crf_image(bgr)
    assert out.dtype == np.uint8 and out.shape == (1, 3, 3) and out.flags.c_contiguous
    # 0 - 104.008 -> -104 -> 152; 0 - 116.669 -> -116 -> 140; 0 - 122.675 -> -122 -> 134
    assert out[0, 0].tolist() == [152, 140, 134]
    # 104 - 104.008 -> -0.008 -> 0; 117 - 116.669 -> 0.331 -> 0; 123 - 122.675 -> 0.325 -> 0
    assert out[0, 1].tolist() == [0, 0, 0]
    assert out[0, 2].tolist() == [150, 138, 132]
    # the same bytes as a float32 subtraction followed by trunc + wrap
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    f32 = img.astype(np.float32) - np.array(crf.MEAN_BGR, np.float32)
    np.testing.assert_array_equal(crf_image(img), (np.trunc(f32).astype(np.int64) % 256).astype(np.uint8))
    with pytest.raises(ValueError):
        crf_image(np.zeros((2, 2), np.uint8))


def test_unary_matches_pydensecrf_on_float16_and_float32():
    from pydensecrf.utils import unary_from_softmax

    rng = np.random.default_rng(0)
    p16 = rng.random((3, 5, 4)).astype(np.float16)
    p16[0, 0, 0] = 0
    p16[1, 0, 0] = 1
    p16[2, 0, 1] = np.float16(3e-6)
    ours, theirs = unary_from_probs(p16), unary_from_softmax(p16)
    assert ours.dtype == np.float32 and ours.shape == (3, 20)
    np.testing.assert_array_equal(ours, theirs)
    # the float16 log differs from a float32 one: the rounding is part of the behaviour
    assert not np.array_equal(ours, (-np.log(np.clip(p16.astype(np.float32), 1e-5, 1))).reshape(3, -1))
    p32 = p16.astype(np.float32)
    np.testing.assert_array_equal(unary_from_probs(p32), unary_from_softmax(p32))


def test_named_constants():
    assert (crf.CRF_ITERATIONS, crf.GAUSSIAN_SXY, crf.GAUSSIAN_COMPAT) == (10, 1, 3)
    assert (crf.BILATERAL_SXY, crf.BILATERAL_SRGB, crf.BILATERAL_COMPAT) == (67, 3, 4)
    assert crf.MEAN_BGR == (104.008, 116.669, 122.675)


def _tiny_case():
    h, w = 6, 8
    bgr = np.zeros((h, w, 3), np.uint8)
    bgr[:, 4:] = 200                       # left half dark, right half bright
    cams = np.zeros((1, h, w), np.float16)
    cams[0, :, 4:] = 0.8                   # the object is the right half ...
    cams[0, 2, 1] = 0.6                    # ... plus one noisy pixel in the dark half
    return bgr, cams


def test_tiny_image_crf():
    bgr, cams = _tiny_case()
    probs = np.concatenate((np.float16(1) - cams.max(0, keepdims=True), cams))
    q = dense_crf(crf_image(bgr), probs)
    assert q.shape == (2, 6, 8) and q.dtype == np.float32
    np.testing.assert_allclose(q.sum(0), 1, atol=1e-5)
    # same as calling pydensecrf directly with the reference parameters
    d = pydensecrf.DenseCRF2D(8, 6, 2)
    from pydensecrf.utils import unary_from_softmax

    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    d.addPairwiseGaussian(sxy=1, compat=3)
    d.addPairwiseBilateral(sxy=67, srgb=3, rgbim=crf_image(bgr), compat=4)
    np.testing.assert_array_equal(q, np.array(d.inference(10), np.float32).reshape(2, 6, 8))
    labels, confidence = crf_predict([14], cams, bgr, VOC)
    assert labels.dtype == np.uint8
    assert (labels[:, 4:] == 15).all() and (labels[:, :4] == 0).all()  # the noisy pixel is smoothed away
    np.testing.assert_array_equal(confidence, q.max(0))
    # deterministic
    np.testing.assert_array_equal(crf_predict([14], cams, bgr, VOC)[0], labels)
    # confidence threshold -> 255 below
    cut = apply_confidence_threshold(labels, confidence, float(np.median(confidence)))
    assert (cut == 255).any() and ((cut == 255) | (cut == labels)).all()
    np.testing.assert_array_equal(apply_confidence_threshold(labels, confidence, None), labels)


def test_tiny_image_crf_cocostuff_single_channel():
    bgr, cams = _tiny_case()
    labels, confidence = crf_predict([112], cams, bgr, STUFF)
    from toolkit.vocab import COCO_STUFF_171_TO_27

    assert (labels == COCO_STUFF_171_TO_27[112]).all()
    np.testing.assert_allclose(confidence, 1, atol=1e-6)


def test_crf_size_mismatch():
    bgr, cams = _tiny_case()
    with pytest.raises(ValueError, match="CRF image"):
        dense_crf(crf_image(bgr[:, :5]), cams)


@pytest.mark.parametrize("variant", eh.VARIANTS)
def test_parity_with_reference_crf(variant, tmp_path):
    """CRF labels equal the reference's pixel for pixel; scores within the brief's 0.002."""
    config = get_eval_config(eh.dataset_of(variant))
    cam_dir = eh.write_cam_dir(variant, tmp_path / f"{variant}_cams")
    ev = SegEvaluator(config.num_classes)
    for image_id in eh.variant_ids(variant):
        keys, cams = read_cam(cam_dir / f"{image_id}.npy", config)
        bgr = read_bgr(eh.folder(variant) / "JPEGImages" / f"{image_id}.jpg")
        gt = read_gt(eh.folder(variant) / "SegmentationClass" / f"{image_id}.png", config)
        labels, _ = crf_predict(keys, cams, bgr, config)
        np.testing.assert_array_equal(labels, eh.reference_pred(variant, image_id, "crf"), err_msg=image_id)
        ev.update(labels, gt)
    got = ev.scores().as_dict()
    want = eh.expected_score(variant, "eval_crf")
    eh.compare_scores(got, want, config.num_classes)
    for key in ("Pixel Accuracy", "Mean Accuracy", "Frequency Weighted IoU"):
        assert got[key] == pytest.approx(want[key], abs=1e-12)
