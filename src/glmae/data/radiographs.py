"""Radiographs: 2D images with findings (chest X-rays), read as depth-1 volumes.

A radiograph becomes a `Volume` whose image is (1, H, W, 1): rows, columns and a depth of one, so
the encoders, masking, sampling and the engine treat 2D data as a case of 3D data (patch
(p, p, 1), see `glmae.models.patches`). Nothing of the NIfTI pipeline (orientation, spacing) applies.

Files (`read_radiograph`), refused with one line naming them (`InputError`) when missing, empty,
truncated, undecodable or not a single 2D grey-level image:

- PNG / JPEG through Pillow: 8-bit (`L`), 16-bit (`I;16`, `I`), and colour or palette images
  converted to grey (`L`, as many JPEG exports of chest X-rays are RGB with equal channels);
- DICOM through pydicom: the modality LUT (rescale slope / intercept) applied, MONOCHROME1
  (bright air) inverted so that bone is always bright; multi-frame and colour files are refused.

Values are returned as stored (no scaling), so 8- and 16-bit files keep their levels; then
`normalise` maps each image to [0, 1] between its 0.5 and 99.5 percentiles (the 2D counterpart
of CT windowing: it makes 8-bit, 12-bit-in-16 and 16-bit files comparable, and ignores burnt-in
labels and collimation edges), and `resize` brings it (bilinear, anti-aliased) to
`data.image_size` (rows, columns; None keeps it).

Data sets with findings (`scan_csv`), paths relative to the CSV's folder (and never outside it):

- ChestX-ray14 style: columns `Image Index` (a file name, found beside the CSV or in its
  `images/` folder) and `Finding Labels` (`|`-separated findings, or `No Finding`); the findings
  are those that occur, in ChestX-ray14's order (`CXR14`), then others alphabetically;
- generic: a path column (`path`, `image`, `file` or `filename`, any case) and 0/1 columns, one
  per finding, in the CSV's order.

Either may have a patient column (`Patient ID`, `patient`, `patient_id`, `subject`): fine-tuning
then splits by patient, so no patient is on both sides of a split. An optional `split` column
(training / validation / test, or train / val) gives fixed splits; a patient in two of them is an
error.
"""

from __future__ import annotations

import csv
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from glmae.errors import InputError, warn

SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
DICOM_SUFFIXES = (".dcm", ".dicom")
# ChestX-ray14's 14 findings in the order of its paper and of most results tables
CXR14 = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
         "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")
NO_FINDING = "No Finding"
PATH_COLUMNS = ("path", "image", "file", "filename")
PATIENT_COLUMNS = ("patient id", "patient", "patient_id", "subject")
SPLIT_VALUES = {"training": "training", "train": "training", "validation": "validation", "val": "validation",
                "test": "test"}
PERCENTILES = (0.5, 99.5)


def is_radiograph(path: str | Path) -> bool:
    return str(path).lower().endswith(SUFFIXES)


# ----------------------------------------------------------------------------------------------
# Files


def read_radiograph(path: Path) -> np.ndarray:
    """(H, W) float32 of the values as stored (DICOM: after the modality LUT, MONOCHROME1
    inverted). InputError naming the file for anything that is not one readable 2D image."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise InputError("file not found", path) from None
    except OSError as err:
        raise InputError(f"cannot access: {err.strerror}", path) from None
    if not stat.S_ISREG(mode):
        raise InputError("not a regular file", path)
    if path.stat().st_size == 0:
        raise InputError("empty file (0 bytes)", path)
    if not is_radiograph(path):
        raise InputError(f"unsupported format: radiographs are read from {', '.join(SUFFIXES)}", path)
    array = _read_dicom(path) if path.name.lower().endswith(DICOM_SUFFIXES) else _read_pillow(path)
    if array.ndim != 2 or min(array.shape) < 1:
        raise InputError(f"is {array.ndim}D {array.shape}, expected one 2D image", path)
    if not np.all(np.isfinite(array)):
        raise InputError(f"{int(np.size(array) - np.isfinite(array).sum())} NaN/Inf pixels", path)
    return array.astype(np.float32)


def _reason(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _read_pillow(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            frames = getattr(img, "n_frames", 1)
            img.load()
            array = np.asarray(img if img.mode in ("I;16", "I;16B", "I;16L", "I", "F", "L") else img.convert("L"))
    except UnidentifiedImageError:
        raise InputError("unreadable image: not a PNG or JPEG file Pillow can decode", path) from None
    except (OSError, SyntaxError, ValueError) as err:  # truncated or corrupt data
        raise InputError(f"unreadable image (truncated file?): {_reason(err)}", path) from None
    if frames > 1:
        raise InputError(f"has {frames} frames, expected one 2D image", path)
    return array


def _read_dicom(path: Path) -> np.ndarray:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut

    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError) as err:
        raise InputError(f"unreadable DICOM: {_reason(err)}", path) from None
    if "PixelData" not in ds:
        raise InputError("DICOM without pixel data", path)
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise InputError(f"DICOM with {ds.NumberOfFrames} frames, expected one 2D image", path)
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise InputError(f"DICOM with {ds.SamplesPerPixel} samples per pixel, expected a grey-level image", path)
    try:
        array = np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float64)
    except Exception as err:  # pydicom raises many types for truncated or undecodable pixel data
        raise InputError(f"cannot decode the DICOM pixel data (truncated or unsupported compression?): "
                         f"{_reason(err)}", path) from None
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        array = array.max() + array.min() - array
    return array


def normalise(image: np.ndarray, path: Path | None = None) -> np.ndarray:
    """(H, W) -> float32 in [0, 1]: clipped to its 0.5 and 99.5 percentiles and scaled. A constant
    image becomes zeros, with a warning (valid data that carries no information)."""
    low, high = np.percentile(image, PERCENTILES)
    if high <= low:
        low, high = float(image.min()), float(image.max())
    if high <= low:
        warn(f"every pixel is {low:g}: the image carries no information", path)
        return np.zeros(image.shape, np.float32)
    return np.clip((image - low) / (high - low), 0.0, 1.0).astype(np.float32)


def resize(image: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """(H, W) -> `size` (rows, columns), bilinear with anti-aliasing; None keeps the size."""
    import torch
    import torch.nn.functional as F

    if size is None or tuple(image.shape) == tuple(size):
        return image
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    return F.interpolate(x, size=tuple(size), mode="bilinear", antialias=True, align_corners=False)[0, 0].numpy()


# ----------------------------------------------------------------------------------------------
# CSV data sets


@dataclass
class Row:
    image: Path
    findings: frozenset[str]
    patient: str | None
    split: str


def _column(fields: list[str], names: tuple[str, ...]) -> str | None:
    lower = {f.strip().lower(): f for f in fields}
    return next((lower[n] for n in names if n in lower), None)


def _absolute(path: Path) -> Path:
    """Absolute and normalised, without resolving symbolic links (as `glmae.data.formats`)."""
    return Path(os.path.normpath(path.expanduser().absolute()))


def _resolve(root: Path, value: str, where: str, beside_images: bool) -> Path:
    if not value:
        raise ValueError(f"{where}: empty image path")
    path = _absolute(root / value)
    if not path.is_relative_to(root):
        raise ValueError(f"{where}: {value!r} points outside the data set folder {root}")
    if beside_images and not path.exists() and (root / "images").is_dir():
        path = _absolute(root / "images" / value)
    return path


def scan_csv(path: Path):
    """(format, findings, rows, problems) of a ChestX-ray14-style or generic CSV; structural
    problems (unreadable, no such columns, no rows) raise InputError."""
    path = _absolute(Path(path))
    root = path.parent
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = [c for c in (reader.fieldnames or [])]
            records = list(reader)
    except OSError as err:
        raise InputError(f"cannot read: {err.strerror}", path) from None
    except (UnicodeDecodeError, csv.Error) as err:
        raise InputError(f"malformed CSV: {_reason(err)}", path) from None
    if not fields:
        raise InputError("empty CSV: no header row", path)
    if not records:
        raise InputError("empty data set: the CSV has a header but no rows", path)
    patient_col = _column(fields, PATIENT_COLUMNS)
    split_col = _column(fields, ("split",))
    cxr14 = "Image Index" in fields and "Finding Labels" in fields
    path_col = "Image Index" if cxr14 else _column(fields, PATH_COLUMNS)
    if path_col is None:
        raise InputError(f"CSV without an image column: expected `Image Index` and `Finding Labels` "
                         f"(ChestX-ray14) or one of {', '.join(PATH_COLUMNS)} (found {', '.join(fields)})", path)
    if cxr14:
        columns = []
    else:
        columns = [c for c in fields if c not in (path_col, patient_col, split_col)]
        if not columns:
            raise InputError("CSV without finding columns: expected 0/1 columns beside the image path", path)
    rows, problems, seen = [], [], set()
    for line, record in enumerate(records, start=2):
        where = f"line {line}"
        try:
            image = _resolve(root, (record.get(path_col) or "").strip(), where, beside_images=cxr14)
            if cxr14:
                names = [n.strip() for n in (record.get("Finding Labels") or "").split("|") if n.strip()]
                if not names:
                    raise ValueError(f"{where}: empty `Finding Labels` (write {NO_FINDING!r} for none)")
                if NO_FINDING in names and len(names) > 1:
                    raise ValueError(f"{where}: {NO_FINDING!r} together with findings {names}")
                found = frozenset(n for n in names if n != NO_FINDING)
            else:
                found = set()
                for c in columns:
                    value = (record.get(c) or "").strip()
                    if value not in ("0", "1", "0.0", "1.0"):
                        raise ValueError(f"{where}: column {c!r}: expected 0 or 1, got {value!r}")
                    if float(value) == 1:
                        found.add(c)
                found = frozenset(found)
            split = "training"
            if split_col is not None:
                raw = (record.get(split_col) or "").strip().lower()
                if raw not in SPLIT_VALUES:
                    raise ValueError(f"{where}: split {raw!r}: expected training, validation or test")
                split = SPLIT_VALUES[raw]
        except ValueError as err:
            problems.append(InputError(str(err), path))
            continue
        patient = (record.get(patient_col) or "").strip() or None if patient_col else None
        rows.append(Row(image, found, patient, split))
        seen |= found
    if cxr14:
        findings = tuple(f for f in CXR14 if f in seen) + tuple(sorted(seen - set(CXR14)))
    else:
        findings = tuple(columns)
    problems += _patients_across_splits(rows, path)
    return ("chestxray14" if cxr14 else "csv"), findings, rows, problems


def _patients_across_splits(rows: list[Row], path: Path) -> list[InputError]:
    splits: dict[str, set[str]] = {}
    for row in rows:
        if row.patient is not None:
            splits.setdefault(row.patient, set()).add(row.split)
    leaking = sorted(p for p, s in splits.items() if len(s) > 1)
    if not leaking:
        return []
    return [InputError(f"patient {leaking[0]!r} is in the {' and '.join(sorted(splits[leaking[0]]))} splits"
                       + (f" ({len(leaking) - 1} more patients too)" if len(leaking) > 1 else "")
                       + ": held-out images must come from other patients", path)]
