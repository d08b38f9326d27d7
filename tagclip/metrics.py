"""Classification metrics: per-class AP, mAP and the "overall" F1 with a relative threshold.

Everything here follows SPEC section 4 and reproduces the reference numbers bit for bit, so
the arithmetic is done with float32 torch operations in the same order as the reference:

* AP ranks images with ``torch.sort(descending=True)`` on the score column; when two scores
  are exactly equal the AP depends on the order torch.sort puts them in (manifest quirk
  ``ap_sort_ties``), so the sort call is kept exactly as the reference makes it.
* mAP is the float32 mean over ALL classes; a class without positives counts as AP 0
  (SPEC quirk Q6).
* F1/precision/recall come from global TP/FP/FN counts over all image x class pairs with a
  per-image relative threshold; F1 is NaN when precision and recall are both 0 and is
  reported as NaN (the reference prints ``F1: nan``).
"""

from __future__ import annotations

import torch

# SPEC §4: P = TP / (TP + FP + eps) and R = TP / (TP + FN + eps) with this eps (reference value).
F1_EPS = 1e-9
# SPEC §4 / Q7: relative threshold thr_i = min_i + rel * (max_i - min_i); 0.5 for VOC and COCO,
# 0.1 for COCO-Stuff.
REL_THRESHOLD_DEFAULT = 0.5
REL_THRESHOLD_COCOSTUFF = 0.1
# SPEC §4: width of the '=' rules around the printed metrics block.
_RULE = "=" * 48


def _check_scores(scores) -> torch.Tensor:
    scores = torch.as_tensor(scores)
    if scores.dim() != 2:
        raise ValueError(f"scores must be a 2-D [images, classes] tensor, got shape {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise ValueError(f"scores must be a floating-point tensor, got {scores.dtype}")
    # The reference scores are float32; all metric arithmetic is float32.
    return scores.to(torch.float32)


def _positives(labels, shape) -> torch.Tensor:
    """Boolean mask of positive (image, class) pairs: ``label == 1`` (bool or 0/1 labels)."""
    labels = torch.as_tensor(labels)
    if tuple(labels.shape) != tuple(shape):
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match scores shape {tuple(shape)}")
    if labels.dtype == torch.bool:
        return labels
    return labels == 1


def average_precision(scores, labels) -> torch.Tensor:
    """Per-class average precision, float32 tensor ``[n_classes]``.

    For class c the images are ranked by ``scores[:, c].sort(descending=True)``;
    precision@k = tp_k / (tp_k + fp_k) from float32 cumulative sums, and
    AP = sum of precision at the positive ranks / number of positives (no interpolation).
    A class with no positive image keeps AP 0 (quirk Q6).
    """
    scores = _check_scores(scores)
    pos = _positives(labels, scores.shape)
    n_cls = scores.shape[1]
    ap = torch.zeros(n_cls, dtype=torch.float32)
    has_pos = pos.any(dim=0).tolist()
    for c in range(n_cls):
        if not has_pos[c]:
            continue
        # Same call as the reference: tie order comes from torch.sort on the 1-D column.
        _, order = scores[:, c].sort(descending=True)
        ranked_pos = pos[:, c][order]
        hit = ranked_pos.to(torch.float32)
        tp = hit.cumsum(0)
        fp = (~ranked_pos).to(torch.float32).cumsum(0)
        precision = tp / (tp + fp)
        ap[c] = (precision * hit).sum() / hit.sum()
    return ap


def mean_average_precision(scores, labels) -> float:
    """float32 mean of :func:`average_precision` over all classes (empty classes count as 0)."""
    return float(torch.mean(average_precision(scores, labels)))


def relative_thresholds(scores, rel: float) -> torch.Tensor:
    """Per-image threshold ``min_i + rel * (max_i - min_i)`` as a float32 tensor ``[n_images]``."""
    scores = _check_scores(scores)
    ma = scores.max(dim=1)[0]
    mi = scores.min(dim=1)[0]
    return mi + rel * (ma - mi)


def f1_overall(scores, labels, rel: float) -> tuple[float, float, float]:
    """Overall F1, precision and recall with a per-image relative threshold.

    An (image, class) pair is predicted positive iff its score is strictly greater than the
    image's threshold. TP/FP/FN are integer counts over all pairs; P and R use
    :data:`F1_EPS` in the denominators and everything is float32. F1 = 2PR/(P+R) is NaN
    when P = R = 0 and is returned as NaN, like the reference.
    """
    scores = _check_scores(scores)
    pos = _positives(labels, scores.shape)
    thr = relative_thresholds(scores, rel)
    pred = scores > thr[:, None]
    tp = (pred & pos).sum()
    fp = (pred & ~pos).sum()
    fn = (~pred & pos).sum()
    tp_f = tp.to(torch.float32)
    precision = tp_f / ((tp + fp).to(torch.float32) + F1_EPS)
    recall = tp_f / ((tp + fn).to(torch.float32) + F1_EPS)
    f1 = 2 * precision * recall / (precision + recall)
    return float(f1), float(precision), float(recall)


def format_metrics(map_: float, f1: float, p: float, r: float) -> str:
    """The reference's printed metrics block, ending with an empty line (print with end='')."""
    return (
        f"{_RULE}\n"
        + "mAP: %.6f\n" % map_
        + "F1: %.6f, Precision: %.6f, Recall: %.6f\n" % (f1, p, r)
        + f"{_RULE}\n\n"
    )
