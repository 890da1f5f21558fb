import numpy as np
import pytest
import torch

from glmae.methods.segmentation import SegmentationConfig
from glmae.methods.validation import case_dice

CFG = SegmentationConfig(labels={0: "background", 1: "liver", 2: "spleen", 3: "kidney"})


def test_case_dice_per_class_on_a_tiny_label_map():
    truth = torch.tensor([[[[0, 1, 1, 1], [2, 2, 0, 0]]]])  # (1, 1, 2, 4); no kidney
    pred = torch.tensor([[[[1, 1, 1, 0], [2, 0, 3, 0]]]])  # a false kidney voxel
    scores = case_dice(pred[0], truth[0], CFG)
    assert scores == pytest.approx({"liver": 2 * 2 / (3 + 3), "spleen": 2 * 1 / (1 + 2), "kidney": 0.0})
    pred[pred == 3] = 0
    assert case_dice(pred[0], truth[0], CFG)["kidney"] == 1.0


def test_case_dice_matches_monai_dicemetric():
    from monai.metrics import DiceMetric

    rng = np.random.default_rng(0)
    truth = torch.from_numpy(rng.integers(0, 3, (1, 1, 6, 6, 6)))  # kidney (3) absent from the truth
    pred = torch.from_numpy(rng.integers(0, 4, (1, 1, 6, 6, 6)))
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=False, num_classes=4)
    expected = metric(pred, truth)[0].tolist()
    assert list(case_dice(pred[0], truth[0], CFG).values()) == pytest.approx(expected)


def test_region_dice_per_channel():
    cfg = SegmentationConfig(labels={0: "background"}, regions={"WT": [1, 2], "ET": [2]})
    truth = torch.tensor([[[[1, 1, 0]]], [[[0, 0, 0]]]], dtype=torch.uint8)
    pred = torch.tensor([[[[1, 0, 0]]], [[[0, 0, 0]]]], dtype=torch.uint8)
    assert case_dice(pred, truth, cfg) == pytest.approx({"WT": 2 / 3, "ET": 1.0})
