"""HD95 and normalised surface Dice against hand-computed cases: shifted shapes in mm on isotropic and
anisotropic grids, the boundary-voxel count of NSD, MONAI's empty-mask conventions, and the summary."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from glmae.metrics.surface import summarise_surface, surface_scores, voxel_spacing


def ball(centre_x: int, radius: int = 6, n: int = 24) -> torch.Tensor:
    x, y, z = np.mgrid[:n, :n, :n]
    return torch.from_numpy((x - centre_x) ** 2 + (y - n // 2) ** 2 + (z - n // 2) ** 2 <= radius**2)


def box(start_x: int, n: int = 16) -> torch.Tensor:
    """A 6³-voxel cube at x in [start_x, start_x + 6), y and z in [4, 10)."""
    mask = torch.zeros(n, n, n, dtype=torch.bool)
    mask[start_x:start_x + 6, 4:10, 4:10] = True
    return mask


@pytest.mark.parametrize("k", [1, 2, 3])
def test_a_sphere_shifted_by_k_voxels_has_hd95_k_times_the_spacing(k):
    hd95, _ = surface_scores(ball(10)[None], ball(10 + k)[None], (1.0, 1.0, 1.0), 1.0)
    assert hd95 == pytest.approx([k])
    # the shift along the finest axis of an anisotropic grid: k voxels of 0.8 mm
    hd95, _ = surface_scores(ball(10)[None], ball(10 + k)[None], (0.8, 2.0, 3.0), 1.0)
    assert hd95 == pytest.approx([0.8 * k])


def test_a_cube_shifted_along_a_coarse_axis_has_hd95_in_that_axis_mm():
    # a third of each cube's boundary voxels (its two faces across the shift) lie exactly 2 voxels off
    hd95, _ = surface_scores(box(3)[None], box(5)[None], (1.5, 0.7, 2.0), 1.0)
    assert hd95 == pytest.approx([3.0])


def test_nsd_counts_the_boundary_voxels_within_the_tolerance():
    # each cube has 6³ - 4³ = 152 boundary voxels; shifted by 2, the 4 shared slices' rings of 20 voxels
    # are boundary of both (distance 0), every other one is at least a voxel away
    _, nsd = surface_scores(box(3)[None], box(5)[None], (1.0, 1.0, 1.0), 0.5)
    assert nsd == pytest.approx([2 * 80 / (2 * 152)])
    _, nsd = surface_scores(box(3)[None], box(5)[None], (1.0, 1.0, 1.0), 2.0)  # every voxel within 2 mm
    assert nsd == pytest.approx([1.0])
    _, nsd = surface_scores(box(3)[None], box(5)[None], (0.2, 1.0, 1.0), 0.5)  # the shift is 0.4 mm
    assert nsd == pytest.approx([1.0])


def test_empty_masks_follow_monais_conventions():
    empty, shape = torch.zeros(16, 16, 16, dtype=torch.bool), box(3)
    pred = torch.stack([empty, shape, empty, shape])
    truth = torch.stack([empty, empty, shape, shape])
    hd95, nsd = surface_scores(pred, truth, (1.0, 1.0, 1.0), 1.0)
    assert [math.isnan(v) for v in hd95] == [True, True, True, False] and hd95[3] == 0.0
    assert math.isnan(nsd[0]) and nsd[1:] == [0.0, 0.0, 1.0]


def test_a_negative_tolerance_is_refused():
    with pytest.raises(ValueError, match="tolerance"):
        surface_scores(box(3)[None], box(3)[None], (1.0, 1.0, 1.0), -1.0)


def test_the_summary_leaves_undefined_cases_out_of_the_mean():
    per_case = [{"hd95": {"a": 2.0, "b": None}, "nsd": {"a": 0.5, "b": 0.0}},
                {"hd95": {"a": 4.0, "b": None}, "nsd": {"a": 1.0, "b": None}}]
    out = summarise_surface(per_case, ["a", "b"])
    assert out["per_class_hd95"] == {"a": 3.0, "b": None} and out["mean_hd95"] == 3.0
    assert out["n_defined_hd95"] == {"a": 2, "b": 0} and out["n_defined_nsd"] == {"a": 2, "b": 1}
    assert out["per_class_nsd"] == {"a": 0.75, "b": 0.0} and out["mean_nsd"] == pytest.approx(0.375)


def test_voxel_spacing_reads_the_affines_column_lengths():
    affine = np.diag([-1.5, 0.7, 2.0, 1.0])
    affine[:3, :3] = affine[:3, :3] @ np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]])  # axes swapped
    assert voxel_spacing(affine) == pytest.approx((0.7, 1.5, 2.0))
