import json

import pytest
import torch

from glmae.metrics.dice import dice, summarise


def test_dice_by_hand():
    pred = torch.tensor([1, 1, 1, 0, 0], dtype=torch.bool)
    truth = torch.tensor([0, 1, 1, 1, 0], dtype=torch.bool)
    assert dice(pred, truth) == pytest.approx(2 * 2 / (3 + 3))
    none = torch.zeros(5, dtype=torch.bool)
    assert dice(none, none) == 1.0  # absent from both: nothing to find, nothing found
    assert dice(pred, none) == 0.0 and dice(none, truth) == 0.0  # absent from one


def test_summary_means_over_cases_then_classes():
    metrics = summarise([("a", {"x": 1.0, "y": 0.5}), ("b", {"x": 0.0, "y": 0.5})], ["x", "y"])
    assert metrics["per_class"] == {"x": 0.5, "y": 0.5}
    assert metrics["mean_dice"] == 0.5 and metrics["n_cases"] == 2
    assert metrics["per_case"][1] == {"case": "b", "dice": {"x": 0.0, "y": 0.5}}
    json.dumps(metrics)  # plain types
