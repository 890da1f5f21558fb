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


def test_case_surface_per_class_and_per_region_in_mm():
    from glmae.methods.validation import case_surface

    truth = torch.zeros(1, 12, 12, 12, dtype=torch.uint8)
    truth[0, 3:7, 3:7, 3:7] = 1  # liver; no spleen, no kidney
    pred = torch.roll(truth, 2, dims=1)  # the liver 2 voxels off along x
    pred[0, 9:11, 9:11, 9:11] = 2  # a false spleen
    scores = case_surface(pred, truth, (1.5, 1.0, 1.0), CFG)
    assert scores["hd95"] == {"liver": pytest.approx(3.0), "spleen": None, "kidney": None}
    assert scores["nsd"]["spleen"] == 0.0 and scores["nsd"]["kidney"] is None
    cfg = SegmentationConfig(labels={0: "background"}, regions={"WT": [1, 2], "ET": [2]}, nsd_tolerance=3.0)
    regions = torch.cat([truth, torch.zeros_like(truth)])
    shifted = torch.cat([pred.clamp(max=1) * (pred == 1), torch.zeros_like(truth)])
    scores = case_surface(shifted, regions, (1.5, 1.0, 1.0), cfg)
    assert scores == {"hd95": {"WT": pytest.approx(3.0), "ET": None}, "nsd": {"WT": 1.0, "ET": None}}
