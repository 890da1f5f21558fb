"""What every phantom generator shares: seeds, smooth random fields, atomic NIfTI writes and the
rule that an output folder holds one recipe's data set only."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
from scipy import ndimage

from glmae.errors import InputError


def case_seed(seed: int, index: int) -> int:
    """Seed of case `index` of a data set: depends on (seed, index) only, not on the case count."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


class SmoothField:
    """Random smooth displacement field in mm: each component a sum of separable cosine products.

    Wavelengths in mm; `amplitude` is the typical (RMS) displacement, `bound` its maximum.
    """

    def __init__(self, rng, amplitude: float, wavelength: tuple[float, float], terms: int = 3):
        self.k = 2 * np.pi / rng.uniform(*wavelength, size=(3, terms, 3))  # (component, term, axis)
        self.phase = rng.uniform(0, 2 * np.pi, size=(3, terms, 3))
        # a product of three random-phase cosines has RMS 2^-1.5
        self.amp = np.clip(rng.normal(0, 1, size=(3, terms)), -2, 2) * amplitude * 2**1.5 / np.sqrt(terms)
        self.bound = float(np.abs(self.amp).sum(1).max())

    def grid(self, x, y, z) -> np.ndarray:
        """Displacement (3, len(x), len(y), len(z)) on the grid spanned by 1-D axes x, y, z."""
        fx, fy, fz = (np.cos(self.k[..., i, None] * np.asarray(ax, float) + self.phase[..., i, None])
                      for i, ax in enumerate((x, y, z)))  # (3, terms, n) each
        xy = (self.amp[..., None, None] * fx[..., :, None] * fy[..., None, :]).reshape(3, len(self.amp[0]), -1)
        d = np.einsum("ctp,ctz->cpz", xy.astype(np.float32), fz.astype(np.float32))
        return d.reshape(3, len(x), len(y), len(z))

    def at(self, pts: np.ndarray) -> np.ndarray:
        """Displacement (N, 3) at points (N, 3)."""
        f = np.cos(self.k[None] * pts[:, None, None, :] + self.phase[None])  # (N, 3, terms, 3)
        return (self.amp[None] * f.prod(-1)).sum(-1)


def smooth_noise(rng, shape, sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise with unit standard deviation, (X, Y, Z) float32."""
    n = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma, truncate=3.0)
    return n / max(float(n.std()), 1e-6)


def save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write a .nii.gz with qform and sform set, under a temporary name then renamed (atomic)."""
    import nibabel as nib

    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    write_atomic(path, gzip.compress(img.to_bytes(), compresslevel=1))


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def check_out_dir(out: Path, recipe: dict, meta_name: str = "dataset.json") -> None:
    """Refuse an output folder that holds anything but a glmae synth data set of this recipe (whose
    `meta_name` JSON records it under "glmae_synth")."""
    if out.exists() and not out.is_dir():
        raise InputError("exists and is not a folder", out)
    if not out.exists() or not any(out.iterdir()):
        return
    meta_file = out / meta_name
    try:
        old = json.loads(meta_file.read_text()).get("glmae_synth") if meta_file.is_file() else None
    except (OSError, ValueError, AttributeError):
        old = None
    if old is None:
        raise InputError("folder is not empty and holds no glmae synth data set; choose a new folder", out)
    if old != recipe:
        raise InputError(f"holds a glmae synth data set made with {old}, not {recipe}; choose a new folder "
                         "or delete this one", out)


NIFTI_LAYOUT = (("imagesTr", ".nii.gz"), ("labelsTr", ".nii.gz"), ("preview", ".png"))


def remove_stale(out: Path, cases: int, layout=NIFTI_LAYOUT) -> None:
    """Delete leftovers of interrupted runs and cases numbered `cases` or more, in the (folder,
    suffix) pairs of `layout`."""
    for folder, suffix in layout:
        for f in (out / folder).glob("case_*"):
            name = f.name.removesuffix(".partial")
            if f.name.endswith(".partial") or (
                    name.endswith(suffix) and name[5:-len(suffix)].isdigit() and int(name[5:-len(suffix)]) >= cases):
                f.unlink()
