"""Tests for tagclip.metrics: hand-computed AP/F1 cases and parity with the reference run."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tagclip.metrics import (
    F1_EPS,
    average_precision,
    f1_overall,
    format_metrics,
    mean_average_precision,
    relative_thresholds,
)

GOLDEN = Path(__file__).parent / "fixtures" / "golden" / "reference"


def f32(values):
    return torch.tensor(values, dtype=torch.float32)


# --------------------------------------------------------------------------- AP / mAP


def test_average_precision_hand_computed():
    scores = f32([[0.9, 0.1], [0.8, 0.7], [0.1, 0.2]])
    labels = torch.tensor([[1, 0], [0, 1], [1, 0]])
    ap = average_precision(scores, labels)
    assert ap.dtype == torch.float32 and ap.shape == (2,)
    # class 0: ranking 0.9(+) 0.8(-) 0.1(+) -> precision at positives 1/1, 2/3 -> (1 + 2/3) / 2
    assert ap[0].item() == pytest.approx(5 / 6, abs=1e-7)
    # class 1: ranking 0.7(+) 0.2(-) 0.1(-) -> precision 1/1 at the only positive
    assert ap[1].item() == 1.0
    # mAP = (5/6 + 1) / 2 = 11/12
    assert mean_average_precision(scores, labels) == pytest.approx(11 / 12, abs=1e-7)


def test_bool_and_float_labels_agree():
    scores = f32([[0.9, 0.1], [0.8, 0.7], [0.1, 0.2]])
    labels = [[1, 0], [0, 1], [1, 0]]
    a = average_precision(scores, torch.tensor(labels, dtype=torch.bool))
    b = average_precision(scores, torch.tensor(labels, dtype=torch.float64))
    assert torch.equal(a, b)


def test_class_without_positives_counts_as_zero_in_mean():
    # Q6: the third class has no positive image -> AP 0, and it still counts in the mean.
    scores = f32([[0.9, 0.1, 0.5], [0.8, 0.7, 0.4], [0.1, 0.2, 0.3]])
    labels = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 0, 0]])
    ap = average_precision(scores, labels)
    assert ap[2].item() == 0.0
    # (5/6 + 1 + 0) / 3 = 11/18
    assert mean_average_precision(scores, labels) == pytest.approx(11 / 18, abs=1e-7)


def test_mean_is_a_float32_mean():
    # class 0: its positive (image 0) ranks 1st -> AP 1
    # classes 1, 2: their positive (image 2) ranks 3rd of 3 -> precision 1/3 -> AP 1/3, which
    #   float32 holds as 0.3333333432674407958984375 (np.float32(1) / np.float32(3))
    scores = f32([[0.9, 0.9, 0.9], [0.5, 0.5, 0.5], [0.1, 0.1, 0.1]])
    labels = torch.tensor([[1, 0, 0], [0, 0, 0], [0, 1, 1]])
    assert average_precision(scores, labels).tolist() == [1.0, 0.3333333432674407958984375,
                                                          0.3333333432674407958984375]
    # float32 mean, step by step (np.float32 arithmetic; both summation orders agree):
    #   1 + 0.33333334326744079590           = 1.33333334326744079590 -> f32 1.33333337306976318359
    #   1.33333337306976318359 + 0.33333334326744079590 = 1.66666671633720397949
    #                                                                   -> f32 1.66666674613952636719
    #   1.66666674613952636719 / 3 = 0.55555558204650878906             -> f32 (exact) 0.5555555820465087890625
    # The float64 mean of the same three float32 APs is 0.5555555621782938 and 5/9 is
    # 0.5555555555555556: both differ from the float32 result.
    result = mean_average_precision(scores, labels)
    assert isinstance(result, float)
    assert result == 0.5555555820465087890625
    assert result != (1.0 + 2 * 0.3333333432674407958984375) / 3


def test_ties_follow_torch_sort_order():
    # Column: 0.9 (neg), then a tie at 0.5 between image 0 (neg) and image 1 (pos).
    column = f32([0.5, 0.5, 0.9])
    scores = column[:, None]
    labels = torch.tensor([[0], [1], [0]])
    ap = average_precision(scores, labels)[0].item()
    # Expected from the order torch.sort gives the tie (the reference's ranking).
    _, order = scores[:, 0].sort(descending=True)
    rank_of_positive = order.tolist().index(1) + 1
    assert ap == pytest.approx(1 / rank_of_positive, abs=1e-7)
    # By hand: the positive is ranked 2nd (AP 1/2) or 3rd (AP 1/3), depending on the tie order.
    assert ap in (pytest.approx(1 / 2, abs=1e-7), pytest.approx(1 / 3, abs=1e-7))


def test_all_positive_class_is_one_and_shape_errors():
    scores = f32([[0.3], [0.2]])
    assert average_precision(scores, torch.ones(2, 1)).tolist() == [1.0]
    with pytest.raises(ValueError):
        average_precision(scores, torch.ones(3, 1))
    with pytest.raises(ValueError):
        average_precision(f32([0.1, 0.2]), torch.ones(2))


# --------------------------------------------------------------------------- thresholds / F1


def test_relative_thresholds_hand_computed():
    # [0.0, 0.5, 1.0]: 0 + 0.5 * (1 - 0) = 0.5 and 0 + 0.1 * 1 = 0.1 (float32 0.1)
    # [0.2, 0.4, 0.3]: 0.2 + 0.5 * (0.4 - 0.2) = 0.3 (float32 arithmetic, see below)
    # [0.2, 0.9, 0.5]: 0.2 + 0.5 * (0.9 - 0.2) = 0.2 + 0.35 = 0.55
    scores = f32([[0.0, 0.5, 1.0], [0.2, 0.4, 0.3], [0.2, 0.9, 0.5]])
    thr = relative_thresholds(scores, 0.5)
    assert thr.dtype == torch.float32 and thr.shape == (3,)
    assert thr[0].item() == 0.5
    assert thr[1].item() == pytest.approx(0.3, abs=1e-7)
    assert thr[2].item() == pytest.approx(0.55, abs=1e-7)
    assert relative_thresholds(scores, 0.1)[0].item() == np.float32(0.1)
    # rows are independent: one image's threshold ignores the others
    assert relative_thresholds(scores[2:], 0.5)[0].item() == thr[2].item()


def test_relative_threshold_is_float32_arithmetic():
    # Row [0.2, 0.9, 0.5] at rel 0.5, every step rounded to float32 as the reference does:
    #   f32(0.9) = 0.89999997615814208984, f32(0.2) = 0.20000000298023223877
    #   max - min = 0.69999997317790985107 -> f32 0.69999998807907104492 (neighbour below
    #               0.69999992847442626953 is 4.5e-8 away, this one 1.5e-8)
    #   0.5 * that = 0.34999999403953552246 (exact)
    #   min + that = 0.54999999701976776123 -> f32 0.55000001192092895508 (the float32 below,
    #               0.54999995231628417969, is 4.5e-8 away; this one 1.5e-8)
    # The same formula in float64 on the float32 inputs gives 0.5499999895691872.
    thr = relative_thresholds(f32([[0.2, 0.9, 0.5]]), 0.5)
    assert thr.item() == 0.550000011920928955078125
    assert thr.item() != 0.5499999895691872


def test_score_equal_to_the_float32_threshold_is_not_predicted():
    # Row [0.2, 0.9, 0.55]: its float32 threshold is f32(0.55) = 0.55000001192092895508 (see
    # above), exactly the third score -> not predicted (strict '>'). In float64 the threshold
    # would be 0.5499999895691872 < 0.55000001192 and class 2 would count as predicted.
    scores = f32([[0.2, 0.9, 0.55]])
    labels = torch.tensor([[0, 1, 1]])
    f1, p, r = f1_overall(scores, labels, 0.5)
    # predicted {1}: TP = 1 (class 1), FP = 0, FN = 1 (class 2)
    # P = 1 / (1 + 1e-9) -> f32 1.0 (1e-9 is below half a float32 ulp of 1, 6e-8)
    # R = 1 / (2 + 1e-9) -> f32 0.5
    # F1 = 2 * 1 * 0.5 / 1.5 = 2/3 -> f32 0.66666668653488159180
    assert p == 1.0
    assert r == 0.5
    assert f1 == 0.666666686534881591796875


def test_f1_hand_computed():
    # image 0: thr = 0 + 0.5 * (0.9 - 0)   = 0.45 -> predicted {0, 1}
    # image 1: thr = 0.1 + 0.5 * (0.8 - 0.1) = 0.45 -> predicted {2, 3}
    scores = f32([[0.9, 0.6, 0.2, 0.0], [0.1, 0.3, 0.8, 0.5]])
    labels = torch.tensor([[1, 0, 1, 0], [0, 0, 1, 0]])
    # TP = (0,0) (1,2) = 2; FP = (0,1) (1,3) = 2; FN = (0,2) = 1
    # P = 2/4 = 0.5, R = 2/3, F1 = 2 * 0.5 * 2/3 / (0.5 + 2/3) = 4/7
    f1, p, r = f1_overall(scores, labels, 0.5)
    assert p == pytest.approx(0.5, abs=1e-7)
    assert r == pytest.approx(2 / 3, abs=1e-7)
    assert f1 == pytest.approx(4 / 7, abs=1e-7)
    # float32 semantics, step by step (eps = 1e-9 is below half a float32 ulp of 3 and 4):
    #   P = 2 / f32(4 + 1e-9) = 2 / 4 = 0.5
    #   R = 2 / f32(3 + 1e-9) = 2 / 3 -> f32 0.666666686534881591796875
    #   2 * P * R = 0.666666686534881591796875 (exact)
    #   P + R = 1.166666686534881591796875 -> f32 1.1666667461395263671875 (a tie between two
    #           float32 neighbours, rounded to the even one)
    #   F1 = 0.666666686534881591796875 / 1.1666667461395263671875 = 0.571428536... -> f32
    #        0.5714285373687744140625 (4/7 = 0.571428571428...: 3.4e-8 away)
    assert F1_EPS == 1e-9
    assert (f1, p, r) == (0.5714285373687744140625, 0.5, 0.666666686534881591796875)


def test_score_equal_to_threshold_is_negative():
    # thr = 0 + 0.5 * (1 - 0) = 0.5 exactly; class 1 scores exactly 0.5 -> NOT positive.
    scores = f32([[0.0, 0.5, 1.0]])
    labels = torch.tensor([[0, 1, 1]])
    f1, p, r = f1_overall(scores, labels, 0.5)
    # TP = 1 (class 2), FP = 0, FN = 1 (class 1)
    assert p == pytest.approx(1.0, abs=1e-7)
    assert r == pytest.approx(0.5, abs=1e-7)
    assert f1 == pytest.approx(2 / 3, abs=1e-7)


def test_f1_is_nan_when_no_true_positive():
    # each image predicts exactly its one negative class: TP = 0, FP = 2, FN = 2
    scores = f32([[1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([[0, 1], [1, 0]])
    f1, p, r = f1_overall(scores, labels, 0.5)
    assert p == 0.0 and r == 0.0
    assert math.isnan(f1)
    # all scores equal: nothing is predicted (strict '>'), P = 0 / (0 + eps) = 0 -> F1 NaN
    f1, p, r = f1_overall(torch.zeros(2, 3), torch.ones(2, 3), 0.5)
    assert (p, r) == (0.0, 0.0) and math.isnan(f1)


# --------------------------------------------------------------------------- printing


def test_format_metrics_block():
    expected = (
        "================================================\n"
        "mAP: 0.178393\n"
        "F1: nan, Precision: 0.000000, Recall: 0.000000\n"
        "================================================\n"
        "\n"
    )
    assert format_metrics(0.17839287221431732, float("nan"), 0.0, 0.0) == expected


# --------------------------------------------------------------------------- reference parity

PARITY_CASES = [("voc2007", 0.5), ("coco2014", 0.5), ("cocostuff", 0.1)]


def load_golden(name):
    arrays = np.load(GOLDEN / f"classify_{name}.npz")
    record = json.loads((GOLDEN / f"classify_{name}.json").read_text())
    return arrays, record


def as_float(value):
    return float("nan") if value == "nan" else float(value)


@pytest.mark.parametrize("name,rel", PARITY_CASES)
def test_reference_parity(name, rel):
    arrays, record = load_golden(name)
    scores = torch.from_numpy(arrays["predictions"])
    labels = torch.from_numpy(arrays["labels_onehot"])
    assert scores.dtype == torch.float32
    ref = record["metrics_full_precision"]
    assert ref["k_val"] == rel

    ap = average_precision(scores, labels).double().numpy()
    np.testing.assert_allclose(ap, arrays["ap_per_class"], rtol=0, atol=1e-7)

    got_map = mean_average_precision(scores, labels)
    assert got_map == pytest.approx(ref["mAP"], abs=1e-6)

    f1, p, r = f1_overall(scores, labels, rel)
    for got, key in ((f1, "F1"), (p, "P"), (r, "R")):
        want = as_float(ref[key])
        if math.isnan(want):
            assert math.isnan(got), key
        else:
            assert got == pytest.approx(want, abs=1e-6), key

    # The printed block is part of the reference stdout, character for character.
    assert format_metrics(got_map, f1, p, r) in record["stdout"]


def test_reference_tie_case_coco2014():
    # coco2014 class 45: the positive (image 3) ties at 0.0 with a negative (image 4);
    # the reference ranked the positive 4th -> AP 1/4 (the other order would give 1/5).
    arrays, _ = load_golden("coco2014")
    scores = torch.from_numpy(arrays["predictions"])
    labels = torch.from_numpy(arrays["labels_onehot"])
    assert arrays["ap_per_class"][45] == 0.25
    assert average_precision(scores, labels)[45].item() == 0.25
