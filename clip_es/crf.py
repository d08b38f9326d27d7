"""Dense CRF post-processing of CAMs (SPEC §6, quirk Q5 / manifest quirk ``crf_uint8_wrap``).

Per image: probability map ``[background (1 - max_k cam)^1, cams...]`` in the CAMs' float16
(COCO-Stuff: the CAMs alone, no renormalisation), unary ``-log(clip(p, 1e-5, 1))`` evaluated
in float16 and then stored as float32 (what ``pydensecrf.utils.unary_from_softmax`` does to a
float16 map), the image term from :func:`crf_image`, 10 mean-field iterations of
``pydensecrf.densecrf.DenseCRF2D`` and label = argmax of Q mapped through the CAM keys.
"""
from __future__ import annotations

import numpy as np

from clip_es.registry import EvalConfig

from .evaluation import channel_labels, score_stack

# SPEC §6: dense CRF parameters of the reference (pydensecrf API names).
CRF_ITERATIONS = 10
GAUSSIAN_SXY = 1
GAUSSIAN_COMPAT = 3
BILATERAL_SXY = 67
BILATERAL_SRGB = 3
BILATERAL_COMPAT = 4
# Smallest probability before the log of the unary term (pydensecrf's default clip).
UNARY_CLIP = 1e-5
# Q5: per-channel mean subtracted from the BGR image before the uint8 conversion.
MEAN_BGR = (104.008, 116.669, 122.675)
# The CRF's background channel is always (1 - max)^1 (the reference CRF has no threshold search).
CRF_THRES = 1


def wrap_to_uint8(values) -> np.ndarray:
    """The reference's float -> ``uint8`` cast, made explicit (quirk Q5).

    Each value is truncated toward zero and then wrapped modulo 256, which is what
    ``ndarray.astype(np.uint8)`` did on the reference platform for the in-range and negative
    values that occur here: ``-122.675 -> 134``, ``-104.008 -> 152``, ``-0.5 -> 0``,
    ``0.7 -> 0``, ``150.99 -> 150``. (C leaves negative float -> unsigned conversion undefined, so
    the plain cast is not portable; this function gives the same bytes everywhere.)
    """
    truncated = np.trunc(np.asarray(values, dtype=np.float64)).astype(np.int64)
    return np.mod(truncated, 256).astype(np.uint8)


def crf_image(bgr: np.ndarray) -> np.ndarray:
    """CRF image term (quirk Q5): ``wrap_to_uint8(bgr - MEAN_BGR)``, H x W x 3 uint8, contiguous.

    ``bgr`` is the 8-bit BGR image as ``cv2.imread`` returns it. The reference subtracts the
    mean in float32 and casts the negative differences to uint8, so the bilateral kernel sees
    values wrapped modulo 256; that behaviour is kept because the published CRF numbers depend
    on it. (The mean has fractional parts .008/.669/.675, so float32 or float64 subtraction
    truncates to the same integers for every 8-bit input.)
    """
    bgr = np.asarray(bgr)
    if bgr.ndim != 3 or bgr.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 BGR image, got shape {bgr.shape}")
    diff = bgr.astype(np.float64) - np.asarray(MEAN_BGR, dtype=np.float64)
    return np.ascontiguousarray(wrap_to_uint8(diff))


def unary_from_probs(probs: np.ndarray) -> np.ndarray:
    """``-log(clip(p, 1e-5, 1))`` in ``probs``' own dtype, flattened to C x (H*W), then float32.

    Identical to ``pydensecrf.utils.unary_from_softmax(probs)`` (no scaling): for the float16
    maps of the reference the clip floor is float16(1e-5) and the log is rounded to float16.
    """
    probs = np.asarray(probs)
    clipped = np.clip(probs, UNARY_CLIP, 1.0)  # Python floats keep the array dtype (NEP 50)
    return np.ascontiguousarray((-np.log(clipped)).reshape(probs.shape[0], -1).astype(np.float32))


def dense_crf(image: np.ndarray, probs: np.ndarray, iterations: int = CRF_ITERATIONS) -> np.ndarray:
    """Mean-field inference: ``Q`` (C x H x W float32) for a C x H x W probability map.

    ``image`` is the H x W x 3 uint8 image term (:func:`crf_image`); the parameters are the
    module constants.
    """
    import pydensecrf.densecrf as dcrf

    probs = np.asarray(probs)
    c, h, w = probs.shape
    if image.shape != (h, w, 3) or image.dtype != np.uint8:
        raise ValueError(f"CRF image must be {h} x {w} x 3 uint8, got {image.dtype} {image.shape}")
    crf = dcrf.DenseCRF2D(w, h, c)
    crf.setUnaryEnergy(unary_from_probs(probs))
    crf.addPairwiseGaussian(sxy=GAUSSIAN_SXY, compat=GAUSSIAN_COMPAT)
    crf.addPairwiseBilateral(sxy=BILATERAL_SXY, srgb=BILATERAL_SRGB, rgbim=np.ascontiguousarray(image),
                             compat=BILATERAL_COMPAT)
    q = crf.inference(int(iterations))
    return np.asarray(q, dtype=np.float32).reshape(c, h, w)


def crf_predict(keys, cams: np.ndarray, bgr: np.ndarray, config: EvalConfig,
                iterations: int = CRF_ITERATIONS) -> tuple[np.ndarray, np.ndarray]:
    """CRF label map (evaluated labels, uint8 H x W) and its confidence (max of Q) for one image.

    ``bgr`` is the 8-bit BGR image (same H x W as the CAMs). The probability map is
    ``[bg, cams...]`` for datasets with a background, the CAMs alone for COCO-Stuff.
    """
    probs = score_stack(np.asarray(cams), CRF_THRES, config.has_background)
    q = dense_crf(crf_image(bgr), probs, iterations)
    idx = np.argmax(q, axis=0)
    labels = channel_labels(keys, config)[idx].astype(np.uint8)
    return labels, q.max(axis=0)

