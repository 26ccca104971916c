"""Agreement metrics against values worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from benchmark.downstream.agreement import (
    cls_kappa,
    cls_top1_agree,
    cls_top5_agree,
    confusion,
    group_lut,
    iou_per_class,
    map_miou,
    map_pixel_acc,
    seg_miou_vs_hr,
    seg_pixel_agree,
)

# 4 images, 6 classes. HR top-1: 0, 1, 2, 5. SR top-1: 0, 2, 2, 0.
HR = np.array(
    [
        [9, 1, 0, 0, 0, 0],
        [0, 9, 1, 0, 0, 0],
        [0, 0, 9, 1, 0, 0],
        [0, 0, 0, 0, 1, 9],
    ],
    dtype=float,
)
SR = np.array(
    [
        [9, 1, 0, 0, 0, 0],
        [0, 5, 9, 0, 0, 0],  # HR's class 1 is SR's 2nd
        [0, 0, 9, 1, 0, 0],
        [9, 8, 7, 6, 5, 4],  # HR's class 5 is SR's 6th: outside the top 5
    ],
    dtype=float,
)


def test_top1_and_top5():
    assert cls_top1_agree(SR, HR) == 0.5  # images 0 and 2
    assert cls_top5_agree(SR, HR) == 0.75  # 0, 1, 2 yes; 3 no
    assert cls_top1_agree(HR, HR) == 1.0 and cls_top5_agree(HR, HR) == 1.0


def test_kappa_by_hand():
    # SR labels 0,2,2,0; HR labels 0,1,2,5. p_o = 2/4.
    # marginals: SR {0: 2, 2: 2}, HR {0: 1, 1: 1, 2: 1, 5: 1}; p_e = (2*1 + 2*1) / 16 = 1/4.
    # kappa = (1/2 - 1/4) / (3/4) = 1/3
    assert cls_kappa([0, 2, 2, 0], [0, 1, 2, 5]) == pytest.approx(1 / 3)
    assert cls_kappa([0, 1, 1], [0, 1, 1]) == 1.0
    assert cls_kappa([3, 3, 3], [3, 3, 3]) == 1.0  # p_e = 1: perfect agreement, not 0/0
    # systematic disagreement: p_o = 0, p_e = 1/2 -> -1
    assert cls_kappa([0, 1], [1, 0]) == pytest.approx(-1.0)


def test_confusion_rows_are_labels():
    c = confusion(np.array([[0, 1], [1, 1]]), np.array([[0, 0], [1, 2]]), 3)
    assert c.tolist() == [[1, 1, 0], [0, 1, 0], [0, 1, 0]]
    with pytest.raises(ValueError, match="class index"):
        confusion(np.array([3]), np.array([0]), 3)


def test_segmentation_agreement_accumulates_over_the_set():
    # image 1: HR [0 0 / 1 1], SR [0 1 / 1 1]; image 2: HR [1 1 / 1 1], SR [1 1 / 1 0]
    hr = [np.array([[0, 0], [1, 1]]), np.array([[1, 1], [1, 1]])]
    sr = [np.array([[0, 1], [1, 1]]), np.array([[1, 1], [1, 0]])]
    # summed confusion (rows HR): class 0: tp 1, fn 1 (->1), fp 1 (1->0); class 1: tp 5, fn 1, fp 1
    # IoU0 = 1 / (1+1+1) = 1/3; IoU1 = 5 / (5+1+1) = 5/7; class 2 absent: not counted
    assert seg_miou_vs_hr(sr, hr, 3) == pytest.approx((1 / 3 + 5 / 7) / 2)
    assert seg_pixel_agree(sr, hr, 3) == pytest.approx(6 / 8)
    # per-image means would give something else: image 2 alone has IoU0 = 0, IoU1 = 3/4
    assert seg_miou_vs_hr(hr, hr, 3) == 1.0 and seg_pixel_agree(hr, hr, 3) == 1.0


def test_a_class_only_predicted_counts_with_iou_zero():
    iou = iou_per_class(confusion(np.array([2, 0]), np.array([0, 0]), 3))
    assert iou[0] == 0.5 and np.isnan(iou[1]) and iou[2] == 0.0


def test_map_agreement_on_class_groups():
    lut = group_lut([[0], [1, 2]], 3)  # classes 1 and 2 form one group
    masks = [np.array([[0, 1], [2, 2]])]
    preds = [np.array([[0, 2], [1, 0]])]
    # groups: mask [0 1 / 1 1], pred [0 1 / 1 0]: group 0 IoU 1/2, group 1 IoU 2/3
    assert map_pixel_acc(preds, masks, lut) == 0.75
    assert map_miou(preds, masks, lut) == pytest.approx((1 / 2 + 2 / 3) / 2)
    with pytest.raises(ValueError, match="no group"):
        group_lut([[0]], 2)
    with pytest.raises(ValueError, match="non-zero"):
        map_miou([], [], lut)
