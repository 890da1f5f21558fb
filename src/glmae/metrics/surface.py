"""Surface metrics beside Dice: the 95th-percentile Hausdorff distance (HD95) and the normalised
surface Dice (NSD), in millimetres on the voxel spacing, from MONAI's `compute_hausdorff_distance`
and `compute_surface_dice`.

Both work on the boundary voxels of each mask (the mask minus its erosion). HD95 is MONAI's
symmetric one: the larger of the two directed 95th percentiles of the distances from one mask's
boundary voxels to the other's. NSD at tolerance τ mm: the fraction of both masks' boundary voxels
that lie within τ of the other mask's boundary (1: the surfaces agree up to τ).

Empty masks, as MONAI returns them: HD95 is undefined (NaN) when the prediction or the reference is
empty; NSD is 0 when exactly one of them is empty and undefined (NaN) when both are. An undefined
value is recorded as null per case and left out of the mean over cases (as MONAI's metric
reduction skips NaN); a class mean over no defined case is null. So a missed structure lowers Dice
(0) and NSD (0) but not HD95, which only describes the cases where both masks exist: read HD95
beside Dice, and `n_defined_hd95` / `n_defined_nsd` say over how many cases each class mean is.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Millimetres per voxel along each axis of a (4, 4) affine: the lengths of its columns."""
    return tuple(float(s) for s in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))


def surface_scores(pred: torch.Tensor, truth: torch.Tensor, spacing: Sequence[float],
                   tolerance: float) -> tuple[list[float], list[float]]:
    """(HD95 in mm, NSD at `tolerance` mm) per mask of (K, X, Y, Z) boolean predictions and
    references on a grid of `spacing` mm; NaN where undefined (see the module docstring)."""
    if tolerance < 0:
        raise ValueError(f"NSD tolerance must be >= 0 mm, got {tolerance}")
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    p, t = pred[None].float(), truth[None].float()
    spacing = [float(s) for s in spacing]
    with warnings.catch_warnings():  # MONAI warns of every empty mask (the NaN it returns is the record)
        warnings.simplefilter("ignore", UserWarning)  # and of its own deprecated internal calls
        warnings.simplefilter("ignore", FutureWarning)
        hd95 = compute_hausdorff_distance(p, t, include_background=True, percentile=95, spacing=spacing)
        nsd = compute_surface_dice(p, t, [float(tolerance)] * len(pred), include_background=True, spacing=spacing)
    return [float(v) for v in hd95[0]], [float(v) for v in nsd[0]]


def defined(value: float) -> float | None:
    """A score for JSON: None for NaN (undefined)."""
    return None if math.isnan(value) else value


def summarise_surface(per_case: list[dict[str, dict[str, float | None]]], names: list[str]) -> dict:
    """Per-case {"hd95": {class: mm}, "nsd": {class: fraction}} -> per-class means over the cases
    where the value is defined, their mean over classes (both null if nothing is defined), and the
    number of cases behind each class mean."""
    out: dict = {}
    for key in ("hd95", "nsd"):
        values = {name: [d[key][name] for d in per_case if d[key][name] is not None] for name in names}
        per_class = {name: float(np.mean(v)) if v else None for name, v in values.items()}
        present = [v for v in per_class.values() if v is not None]
        out[f"mean_{key}"] = float(np.mean(present)) if present else None
        out[f"per_class_{key}"] = per_class
        out[f"n_defined_{key}"] = {name: len(v) for name, v in values.items()}
    return out
