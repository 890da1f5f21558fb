"""Volumes ready for training: MONAI transforms, validated inputs, an on-disk cache. Radiographs
(2D) go through `RadiographPreprocessor` into the same cache as (1, H, W, 1) volumes.

Per case: LoadImage (nibabel) -> channel first -> Orientation RAS -> Spacing to `cfg.spacing`
(bilinear for images, nearest for labels; None keeps the native grid) -> intensity -> crop to
the body if `cfg.crop_foreground`. Intensity modes: ``ct`` clips to `cfg.ct_window` and scales to
[0, 1]; ``mri`` z-scores each channel over its non-zero voxels; ``none``; ``auto`` is ct when every
channel is CT, else mri. The body (`Volume.foreground_box`) is where any channel of the resampled
raw image is above the window's lower end (ct) or non-zero (other modes): the image alone decides,
never the label. Before loading, `glmae.data.validate.check_headers` checks dimensions and geometry
(`prepare` checks the headers of every case before it loads any); NaN/Inf voxels are an error, a
constant image a warning. Label values must be whole numbers >= 0 and, when the Preprocessor is given
the declared `label_values`, declared: checked on the label file as written, before resampling (a
lone voxel of an undeclared value would otherwise vanish in it).

Cache: `cfg.cache_dir`, else $GLMAE_CACHE_DIR, else $XDG_CACHE_HOME/glmae (~/.cache/glmae), in a
folder per `FORMAT_VERSION`:

    <key>.image.npy    (C, X, Y, Z) float32
    <key>.json         affine, foreground box, crop, geometry of the input files
    <lkey>.label.npy   (X, Y, Z) uint8 (int16 above 255)

`key` hashes each image file's resolved path, size and mtime with the settings (spacing, intensity
mode, window, crop, modalities); `lkey` hashes `key` with the label file's and the declared label
values (a cached label passed their check). Pretraining caches images only; fine-tuning with the
same settings then adds the labels without recomputing the images (the label is put on the cached
grid from the geometry recorded in the JSON). A changed file or setting
gives a new key; old entries are never deleted (remove the folder to reclaim space). Files are
written under temporary names and renamed into place, the JSON last, so a concurrent reader (DDP
ranks, a second run) sees a complete entry or none. Two processes may compute the same entry at
once, harmlessly; under DDP let rank 0 `prepare` first, then the others (all cache hits).
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import secrets
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from glmae.config import DataConfig
from glmae.data import radiographs
from glmae.data.formats import Case
from glmae.data.validate import (
    READ_ERRORS,
    check_headers,
    label_problems,
    label_values,
    load_nifti,
    nonfinite_problem,
    unreadable,
)
from glmae.errors import InputError, warn

FORMAT_VERSION = 2  # bump when the pipeline changes what it writes (2: nibabel's affine, always)
INTENSITY_MODES = ("auto", "ct", "mri", "none")


@dataclass
class Volume:
    """A preprocessed case. Arrays from the cache are read-only memory maps: copy before writing."""

    case_id: str
    image: np.ndarray  # (C, X, Y, Z) float32, RAS, target spacing, normalised
    label: np.ndarray | None  # (X, Y, Z) uint8 / int16; None if unlabelled or not requested
    affine: np.ndarray  # (4, 4) float64 affine of the preprocessed grid
    foreground_box: tuple[tuple[int, int], ...]  # [start, stop) of the body per spatial axis
    source: dict  # "files": path, shape, affine, orientation of each input; "grid": resampled shape, crop
    intensity: str = "none"  # the resolved mode of `image`: ct ([0, 1]), mri (z-scored), none (as stored)

    def __getstate__(self) -> dict:
        # Memory maps travel as their file names, so DataLoader workers started by spawn or
        # forkserver map the cache too instead of receiving copies of the arrays.
        state = dict(self.__dict__)
        for name in ("image", "label"):
            array = state[name]
            if isinstance(array, np.memmap) and isinstance(array.base, mmap.mmap):  # a whole .npy
                state[name] = _MappedFile(array.filename)
        return state

    def __setstate__(self, state: dict) -> None:
        for name in ("image", "label"):
            if isinstance(state[name], _MappedFile):
                state[name] = np.load(state[name].path, mmap_mode="r")
        self.__dict__.update(state)


@dataclass(frozen=True)
class _MappedFile:
    path: str


def cache_root(cfg: DataConfig) -> Path:
    """`cfg.cache_dir`, else $GLMAE_CACHE_DIR, else $XDG_CACHE_HOME/glmae or ~/.cache/glmae."""
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    if os.environ.get("GLMAE_CACHE_DIR"):
        return Path(os.environ["GLMAE_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "glmae"


def intensity_mode(cfg: DataConfig, modalities: tuple[str, ...]) -> str:
    """`cfg.intensity` with auto resolved: ct if every channel is CT, else mri."""
    if cfg.intensity not in INTENSITY_MODES:
        raise InputError(
            f"config: data.intensity: expected one of {', '.join(INTENSITY_MODES)}, got {cfg.intensity!r}"
        )
    if cfg.intensity == "auto":
        return "ct" if all(m.upper() == "CT" for m in modalities) else "mri"
    return cfg.intensity


class Preprocessor:
    """Case -> Volume through the cache. `modalities` is the data set's (one name per channel);
    `label_values`, if given, the values a label file may hold (others are an error, saying they
    are not declared in `labels_from`)."""

    def __init__(self, cfg: DataConfig, modalities: tuple[str, ...], label_values: set[int] | None = None,
                 labels_from: str = "`labels`"):
        from monai.transforms import LoadImage

        if cfg.spacing is not None and min(cfg.spacing) <= 0:
            raise InputError(f"config: data.spacing: expected positive millimetres, got {list(cfg.spacing)}")
        if cfg.ct_window[0] >= cfg.ct_window[1]:
            raise InputError(f"config: data.ct_window: expected [low, high], got {list(cfg.ct_window)}")
        self.cfg = cfg
        self.modalities = tuple(modalities)
        self.mode = intensity_mode(cfg, self.modalities)
        self.label_values = None if label_values is None else set(label_values)
        self.labels_from = labels_from
        self.cache = cache_root(cfg) / f"v{FORMAT_VERSION}"
        self.settings = {
            "spacing": None if cfg.spacing is None else list(cfg.spacing),
            "intensity": self.mode,
            "ct_window": list(cfg.ct_window),
            "crop_foreground": cfg.crop_foreground,
            "modalities": list(self.modalities),
        }
        self._load_image = _quietly(LoadImage, image_only=True, ensure_channel_first=True, dtype=np.float32)
        self._reader = _nifti_reader()

    def __call__(self, case: Case, with_label: bool = True) -> Volume:
        """The case's Volume, from the cache or computed into it. `with_label=False` never opens the label."""
        with_label = with_label and case.label is not None
        meta_path, image_path, label_path = self._paths(case, with_label)
        image_cached = meta_path.is_file() and image_path.is_file()
        if not image_cached or (label_path is not None and not label_path.is_file()):
            opened, problems = check_headers(case, len(self.modalities), with_label, self.cfg.spacing)
            if problems:
                raise problems[0]
            _make_dir(self.cache)
            if not image_cached:
                image, meta = self._image(case, opened)
                _save(image_path, image)
                _save(meta_path, meta)  # last: its presence marks a complete entry
            if label_path is not None and not label_path.is_file():
                _save(label_path, self._label(case.label, json.loads(meta_path.read_text())))
        meta = json.loads(meta_path.read_text())
        return Volume(
            case_id=case.id,
            image=np.load(image_path, mmap_mode="r"),
            label=None if label_path is None else np.load(label_path, mmap_mode="r"),
            affine=np.array(meta["affine"], dtype=np.float64),
            foreground_box=tuple((int(a), int(b)) for a, b in meta["foreground_box"]),
            source=meta["source"],
            intensity=self.mode,
        )

    def _paths(self, case: Case, with_label: bool) -> tuple[Path, Path, Path | None]:
        """(JSON, image .npy, label .npy or None) of the case's cache entry."""
        key = _key(self.settings, case.images)
        label = None
        if with_label and case.label is not None:
            declared = None if self.label_values is None else sorted(self.label_values)
            label = self.cache / f"{_key({'image': key, 'declared': declared}, (case.label,))}.label.npy"
        return self.cache / f"{key}.json", self.cache / f"{key}.image.npy", label

    def cached(self, case: Case, with_label: bool = True) -> bool:
        return all(path.is_file() for path in self._paths(case, with_label) if path is not None)

    def check(self, cases: list[Case], with_label: bool = True) -> None:
        """Check the headers of every case not in the cache (fast: no voxels are read); InputError for
        the first problem, with the number of others, before any case is loaded."""
        problems = []
        for case in cases:
            if not self.cached(case, with_label):
                problems += check_headers(case, len(self.modalities), with_label, self.cfg.spacing)[1]
        if problems:
            more = f" (and {len(problems) - 1} more; `glmae info` lists them)" if len(problems) > 1 else ""
            raise InputError(f"{problems[0]}{more}")

    def prepare(self, cases: list[Case], with_label: bool = True, progress: bool = True) -> list[Volume]:
        """Check every case's headers, then preprocess every case into the cache once; Volumes
        memory-map the cached arrays, so DataLoader workers share them through the page cache
        instead of each holding copies."""
        from rich.console import Console
        from rich.progress import track

        self.check(cases, with_label)
        console = Console(stderr=True)
        # off the terminal a transient bar would still leave an empty line behind
        steps = track(cases, "preprocessing", console=console, transient=True,
                      disable=not (progress and console.is_terminal))
        return [self(case, with_label) for case in steps]

    # ------------------------------------------------------------------------------------------

    def _load(self, path: Path):
        """(C, X, Y, Z) float32 MetaTensor in the file's own orientation; its affine is world RAS."""
        try:
            x = self._load_image(path, reader=self._reader)
        except READ_ERRORS as err:
            raise unreadable(err, path) from None
        problem = nonfinite_problem(x.array, path)
        if problem:
            raise problem
        return x

    def _resample(self, x, mode: str):
        from monai.transforms import Orientation, Spacing

        x = Orientation(axcodes="RAS", labels=None)(x)
        return x if self.cfg.spacing is None else Spacing(pixdim=self.cfg.spacing, mode=mode)(x)

    def _image(self, case: Case, opened: dict[Path, nib.Nifti1Image]) -> tuple[np.ndarray, dict]:
        from monai.transforms import CropForeground, NormalizeIntensity, ScaleIntensityRange, SpatialCrop

        channels = []
        for path in case.images:
            x = self._load(path)
            if float(x.min()) == float(x.max()):  # valid, so not refused; said once, when first loaded
                warn(f"every voxel is {float(x.min()):g}: the image carries no information", path)
            channels.append(x)
        x = self._resample(torch.cat(channels) if len(channels) > 1 else channels[0], "bilinear")
        shape = list(x.shape[1:])

        low, high = self.cfg.ct_window
        body = partial(_above, low) if self.mode == "ct" else _nonzero
        start, stop = CropForeground(select_fn=body, allow_smaller=True).compute_bounding_box(x)
        start, stop = [int(v) for v in start], [int(v) for v in stop]
        if any(a >= b for a, b in zip(start, stop, strict=True)):  # no body found: keep everything
            start, stop = [0, 0, 0], shape

        if self.mode == "ct":
            x = ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)(x)
        elif self.mode == "mri":
            x = NormalizeIntensity(nonzero=True, channel_wise=True)(x)
        crop = (start, stop) if self.cfg.crop_foreground else ([0, 0, 0], shape)
        x = SpatialCrop(roi_start=crop[0], roi_end=crop[1])(x)

        files = [
            {
                "path": str(path),
                "shape": list(opened[path].shape),
                "affine": opened[path].affine.tolist(),
                "orientation": "".join(nib.aff2axcodes(opened[path].affine)),
            }
            for path in case.images
        ]
        meta = {
            "affine": x.affine.numpy().tolist(),
            "foreground_box": [[a - c, b - c] for a, b, c in zip(start, stop, crop[0], strict=True)],
            "source": {"files": files, "grid": {"resampled_shape": shape, "crop": [crop[0], crop[1]]}},
            "settings": self.settings,
        }
        return np.ascontiguousarray(x.array, dtype=np.float32), meta

    def _label(self, path: Path, meta: dict) -> np.ndarray:
        """The label on the cached image grid: its affine matched the image's (checked), so the
        image's is used, which makes both land on exactly the same voxels. Its values are checked
        as written in the file (nearest-neighbour resampling only ever drops values)."""
        from monai.transforms import SpatialCrop

        y = self._load(path)
        problems = label_problems(_distinct(y.array), self.label_values or set(), path, self.labels_from)
        if problems:
            raise problems[0]
        y.affine = torch.as_tensor(meta["source"]["files"][0]["affine"], dtype=torch.float64)
        y = self._resample(y, "nearest")
        start, stop = meta["source"]["grid"]["crop"]
        y = np.rint(SpatialCrop(roi_start=start, roi_end=stop)(y).array[0])
        high = y.max(initial=0)
        return y.astype(np.uint8 if high < 256 else np.int16 if high < 2**15 else np.int32)


def _quietly(build, *args, **kwargs):
    """`build(*args, **kwargs)` without the lines MONAI prints meanwhile: building a LoadImage builds
    every reader it has, and the DICOM one reports a missing optional GPU decoder (nvImageCodec) in
    a log line and a warning on stderr, for every command."""
    logger = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")
    disabled, logger.disabled = logger.disabled, True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return build(*args, **kwargs)
    finally:
        logger.disabled = disabled


def _nifti_reader():
    """MONAI's NibabelReader reading through `glmae.data.validate.load_nifti` (mixed-case names,
    nibabel's log lines as warnings), and keeping nibabel's affine: MONAI's reader would swap in the
    qform when only it agrees with pixdim, a geometry the checks and `glmae predict` would not know."""
    from monai.data import NibabelReader

    class Reader(NibabelReader):
        def read(self, data, **kwargs):
            self.filenames = [data] if isinstance(data, (str, Path)) else list(data)  # as get_data expects
            images = [load_nifti(Path(name)) for name in self.filenames]
            return images[0] if len(images) == 1 else images

    return Reader()


def _distinct(array: np.ndarray) -> np.ndarray:
    """Distinct values of a float label array; through integers (fast) when they are whole and small."""
    if array.size and array.min() >= 0 and array.max() < 2**16 and np.array_equal(np.rint(array), array):
        return label_values(array.astype(np.uint16))
    return np.unique(array)


# ----------------------------------------------------------------------------------------------
# Radiographs


class RadiographPreprocessor:
    """Radiograph case -> Volume (1, H, W, 1) through the cache, with the interface of `Preprocessor`
    (`__call__`, `prepare`): read and checked (`glmae.data.radiographs.read_radiograph`), normalised
    to [0, 1], resized to `data.image_size`; cached as `<key>.image.npy` and `<key>.json`, keyed by
    the file and these settings."""

    def __init__(self, cfg):
        if cfg.image_size is not None and min(cfg.image_size) < 1:
            raise InputError(f"config: data.image_size: expected [rows, columns] > 0, got {list(cfg.image_size)}")
        self.size = None if cfg.image_size is None else tuple(cfg.image_size)
        self.cache = cache_root(cfg) / f"v{FORMAT_VERSION}"
        self.settings = {"kind": "radiograph", "image_size": None if self.size is None else list(self.size),
                         "percentiles": list(radiographs.PERCENTILES)}

    def _paths(self, case) -> tuple[Path, Path]:
        key = _key(self.settings, case.images)
        return self.cache / f"{key}.json", self.cache / f"{key}.image.npy"

    def __call__(self, case, with_label: bool = False):
        if len(case.images) != 1:
            raise InputError(f"case {case.id!r} has {len(case.images)} files; a radiograph is one", case.images[0])
        meta_path, image_path = self._paths(case)
        if not (meta_path.is_file() and image_path.is_file()):
            raw = radiographs.read_radiograph(case.images[0])
            image = radiographs.resize(radiographs.normalise(raw, case.images[0]), self.size)[None, :, :, None]
            _make_dir(self.cache)
            _save(image_path, np.ascontiguousarray(image, dtype=np.float32))
            shape = list(image.shape[1:])
            _save(meta_path, {"source": {"files": [{"path": str(case.images[0]), "shape": list(raw.shape)}]},
                              "foreground_box": [[0, n] for n in shape], "settings": self.settings})
        meta = json.loads(meta_path.read_text())
        return Volume(case_id=case.id, image=np.load(image_path, mmap_mode="r"), label=None, affine=np.eye(4),
                      foreground_box=tuple((int(a), int(b)) for a, b in meta["foreground_box"]),
                      source=meta["source"])

    def prepare(self, cases: list, with_label: bool = False, progress: bool = True) -> list:
        """Every case read and checked (InputError for the first bad file, with the number of others)
        before a Volume is returned."""
        volumes, problems = [], []
        for case in cases:
            try:
                volumes.append(self(case))
            except InputError as err:
                problems.append(err)
        if problems:
            more = f" (and {len(problems) - 1} more; `glmae info` lists them)" if len(problems) > 1 else ""
            raise InputError(f"{problems[0]}{more}")
        return volumes


def warn_smaller_than_roi(volumes: list[Volume], roi: tuple[int, ...]) -> None:
    """A warning line for each volume smaller than `roi` on some axis: training crops and sliding
    windows pad it (image 0, label background), which is the unambiguous fix."""
    for volume in volumes:
        shape = tuple(volume.image.shape[1:])
        if any(n < r for n, r in zip(shape, roi)):
            warn(
                f"{'x'.join(map(str, shape))} voxels after preprocessing, smaller than method.roi "
                f"{'x'.join(map(str, roi))}: padded",
                volume.source["files"][0]["path"],
            )


def _above(low: float, x):  # the body, as CropForeground's select_fn
    return x > low


def _nonzero(x):
    return x != 0


def _key(payload: dict, files: tuple[Path, ...]) -> str:
    fingerprint = []
    for path in files:
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise InputError("file not found", path) from None
        except OSError as err:
            raise InputError(f"cannot access: {err.strerror}", path) from None
        fingerprint.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    text = json.dumps([FORMAT_VERSION, payload, fingerprint], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _make_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"cannot create the preprocessing cache folder: {err.strerror}", path) from None


def _save(path: Path, data) -> None:
    """Write a .npy array or a JSON object atomically: a temporary name, then rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as f:
            if isinstance(data, np.ndarray):
                np.save(f, data)
            else:
                f.write(json.dumps(data).encode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
