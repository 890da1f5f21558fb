"""Tiny labelled data sets for the fine-tuning, evaluation and prediction tests.

A case is CT-like: air (-1000 HU) around a box-shaped body (40 HU), a bright cube (300 HU,
label 1) and a dark sphere (-150 HU, label 2) at positions drawn per case. Arrays are (X, Y, Z)
on a grid with the given affine; the structures are placed in voxel coordinates.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

CUBE, SPHERE = 1, 2
LABELS = {"0": "background", "1": "cube", "2": "sphere"}


def phantom(shape, rng: np.random.Generator, cube_at=None, cube_side=None):
    """(image int16 HU, label uint8) of one case; `cube_at` the cube's first corner (voxels)."""
    shape = np.asarray(shape)
    image = np.full(tuple(shape), -1000.0)
    label = np.zeros(tuple(shape), np.uint8)
    margin = np.maximum(1, shape // 8)
    image[tuple(slice(m, s - m) for m, s in zip(margin, shape))] = 40.0
    side = cube_side if cube_side is not None else np.maximum(2, shape // 4)
    side = np.broadcast_to(side, 3)
    if cube_at is None:
        cube_at = [rng.integers(m, s - m - k + 1) for m, s, k in zip(margin, shape, side)]
    cube = tuple(slice(a, a + k) for a, k in zip(cube_at, side))
    grid = np.indices(tuple(shape)).astype(float)
    centre = [rng.uniform(m + 2, s - m - 2) for m, s in zip(margin, shape)]
    radius = max(1.5, shape.min() / 8)
    sphere = sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2
    image[sphere] = -150.0
    label[sphere] = SPHERE
    image[cube] = 300.0
    label[cube] = CUBE
    image += rng.normal(0, 10, image.shape)
    return image.astype(np.int16), label


def write_case(root: Path, name: str, image, label, affine) -> dict:
    for folder, array in (("imagesTr", image), ("labelsTr", label)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(array, affine), root / folder / f"{name}.nii.gz")
    return {"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"}


def write_msd(root, cases: int, shape=(24, 24, 16), spacing=(2.0, 2.0, 2.0), seed: int = 0,
              validation: int = 0) -> Path:
    """An MSD-style data set (dataset.json with `training` and, if `validation` > 0, a datalist
    `validation` list of that many more cases)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    affine = np.diag([*spacing, 1.0])
    entries = {"training": [], "validation": []}
    for i in range(cases + validation):
        image, label = phantom(shape, rng)
        split = "training" if i < cases else "validation"
        entries[split].append(write_case(root, f"case_{i:03d}", image, label, affine))
    data = {"name": "cubes", "modality": {"0": "CT"}, "labels": LABELS, "numTraining": cases,
            "training": entries["training"]}
    if validation:
        data["validation"] = entries["validation"]
    (root / "dataset.json").write_text(json.dumps(data, indent=1))
    return root
