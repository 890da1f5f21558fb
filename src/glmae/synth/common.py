"""What every phantom generator shares: seeds, smooth random fields, the centred RAS grid, atomic
NIfTI writes, the MSD writer of the volume phantoms and the rule that an output folder holds one
recipe's data set only."""

from __future__ import annotations

import gzip
import json
import os
import time
from collections.abc import Callable
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


def check_shape(shape, default: tuple[int, int, int]) -> tuple[int, int, int]:
    """`shape` (None: `default`) as three ints of at least 16, else InputError naming --shape."""
    shape = tuple(int(n) for n in (default if shape is None else shape))
    if len(shape) != 3 or min(shape) < 16:
        raise InputError(f"--shape: need three sizes of at least 16 voxels, got {shape}")
    return shape


def centred_affine(shape: tuple[int, int, int], fov_mm) -> np.ndarray:
    """Diagonal RAS affine (4, 4) of a field of view `fov_mm` (per axis) sampled on `shape`, its
    centre at the world origin."""
    spacing = np.asarray(fov_mm, float) / np.asarray(shape, float)
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = -(np.asarray(shape) - 1) / 2 * spacing
    return aff


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


def write_msd(out_dir: str | Path, cases: int, seed: int, shape: tuple[int, int, int], preview: bool, meta: dict,
              recipe: dict, generate: Callable, save_preview: Callable) -> Path:
    """Write `cases` phantoms in the MSD layout and return `out_dir`.

    OUT/dataset.json (`meta`, which names the data set, its modality and labels, plus the case
    lists), OUT/imagesTr/case_NNNN.nii.gz, OUT/labelsTr/case_NNNN.nii.gz and with `preview`
    OUT/preview/case_NNNN.png. Case i is `generate(case_seed(seed, i), shape)` (anything with
    `image`, `label` and `affine`), so it does not depend on `cases`; `save_preview(case, path)`.

    `out_dir` must be missing, empty, or a glmae synth data set of the same `recipe` (seed, shape,
    generator version, ...); anything else is refused with InputError, so old and new cases never
    mix. In a data set of the same recipe, cases already on disk are kept (they are identical),
    missing ones are written and cases numbered `cases` or more are deleted, so dataset.json
    (written first) always lists exactly the cases of this run. Every file is written under a
    temporary name and renamed: an interrupted run leaves only whole files and the same command
    finishes it.
    """
    from rich.console import Console
    from rich.progress import Progress

    if cases < 1:
        raise InputError(f"--cases: need at least 1, got {cases}")
    if seed < 0:
        raise InputError(f"--seed: need a non-negative integer, got {seed}")
    out = Path(out_dir)
    check_out_dir(out, recipe)
    names = [f"case_{i:04d}" for i in range(cases)]
    meta = {
        **meta,
        "numTraining": cases,
        "numTest": 0,
        "training": [{"image": f"./imagesTr/{n}.nii.gz", "label": f"./labelsTr/{n}.nii.gz"} for n in names],
        "test": [],
        "glmae_synth": recipe,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "dataset.json", (json.dumps(meta, indent=2) + "\n").encode())
    folders = [out / "imagesTr", out / "labelsTr"] + ([out / "preview"] if preview else [])
    for folder in folders:
        folder.mkdir(exist_ok=True)
    remove_stale(out, cases)
    console = Console(stderr=True)
    start = time.perf_counter()
    with Progress(console=console, disable=not console.is_terminal, transient=True) as progress:
        for i in progress.track(range(cases), description="glmae synth"):
            files = [out / "imagesTr" / f"{names[i]}.nii.gz", out / "labelsTr" / f"{names[i]}.nii.gz"]
            png = out / "preview" / f"{names[i]}.png"
            if all(f.exists() for f in files) and (png.exists() or not preview):
                continue
            case = generate(case_seed(seed, i), shape)
            for array, f in zip((case.image, case.label), files):
                if not f.exists():
                    save_nifti(array, case.affine, f)
            if preview:
                save_preview(case, png)
    console.print(f"glmae synth: {cases} cases in {out} ({time.perf_counter() - start:.1f} s)", highlight=False)
    return out
