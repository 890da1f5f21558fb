"""Dice overlap and the summary of per-case scores that `metrics.json` holds."""

from __future__ import annotations

import numpy as np
import torch


def dice(pred: torch.Tensor, truth: torch.Tensor) -> float:
    """2|P ∩ T| / (|P| + |T|) of two boolean masks; 1 if both are empty."""
    total = int(pred.sum()) + int(truth.sum())
    if total == 0:
        return 1.0
    return 2.0 * int((pred & truth).sum()) / total


def summarise(per_case: list[tuple[str, dict[str, float]]], names: list[str]) -> dict:
    """Per-case Dice -> the metrics dict (per-class means over cases, their mean)."""
    per_class = {name: float(np.mean([d[name] for _, d in per_case])) for name in names}
    return {
        "mean_dice": float(np.mean(list(per_class.values()))),
        "per_class": per_class,
        "n_cases": len(per_case),
        "per_case": [{"case": case, "dice": d} for case, d in per_case],
    }
