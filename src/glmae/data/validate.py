"""Checks on the files of a data set, and `glmae info`.

`check_headers` reads NIfTI headers only (fast) and is run before every case is preprocessed;
`info` adds the checks that need the voxels (NaN/Inf, label values) and lists every problem.

Geometry: the channel files and the label of a case must have the same spatial shape and affine.
Affines agree when every entry differs by at most 1e-3 x (|entry| + largest voxel size), so float32
rounding and tools that rewrite headers pass, while a shift of a voxel or a flipped axis does not.
Each file's own affine must place its voxels in space (finite, not singular); when its sform and
qform both apply and disagree by more than a voxel, the sform is used (nibabel's choice) with a
warning. Before any voxel is read, the declared size must stay within `MAX_VOXELS` and the
available memory (as float32), so a corrupt header cannot make reading allocate tens of GB; so must
the size the images will have resampled to `data.spacing` (a voxel size off by 1000x would).
nibabel's own log lines (headers it repairs while reading) become warnings naming the file.

A constant image (every voxel equal) is a warning, not a problem: it is valid data that carries no
information, and one such case should not stop a run over thousands.
"""

from __future__ import annotations

import contextlib
import gzip
import itertools
import logging
import re
import stat
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from glmae.data.formats import NIFTI_SUFFIXES, Case, DataSet, is_nifti, scan_dataset
from glmae.errors import InputError, warn

AFFINE_TOLERANCE = 1e-3
READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, ImageFileError, HeaderDataError)
MAX_VOXELS = 2**31  # per file: 8 GiB as float32, beyond any CT or MRI volume (a 1024 x 1024 x 2048 CT is 2**31)
HEADER_BYTES = 348  # a NIfTI-1 header
RESAMPLE_BYTES = 56  # peak per output voxel and channel of MONAI's Spacing on the CPU (57 measured, MONAI 1.6)
_said: set[tuple[str, str]] = set()  # (file, warning) already said by this process


def load_nifti(path: Path) -> nib.Nifti1Image:
    """`nib.load`, also for names in mixed case ('.Nii.Gz'), for which nibabel looks for a file
    of another name. Header fixes nibabel makes and logs become warnings (see `nibabel_warnings`)."""
    with nibabel_warnings(path):
        if str(path).endswith(NIFTI_SUFFIXES) or str(path).endswith(tuple(s.upper() for s in NIFTI_SUFFIXES)):
            return nib.load(path)
        return nib.Nifti1Image.from_file_map({"image": nib.FileHolder(filename=str(path))})


@contextlib.contextmanager
def nibabel_warnings(path: Path):
    """nibabel's own log lines while reading `path` (it fixes some headers as it reads them: "pixdim[1,2,3]
    should be positive; setting to abs of pixdim values", ...) as `glmae: warning: <path>: ...` lines,
    each once per file, instead of bare lines on stderr; none when reading fails (its error says enough)."""
    logger = logging.getLogger("nibabel.global")
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    saved = logger.handlers, logger.propagate
    logger.handlers, logger.propagate = [handler], False
    try:
        yield
    finally:
        logger.handlers, logger.propagate = saved
    for message in records:
        warn_once(message, path)


def warn_once(message: str, path: Path) -> None:
    """`glmae.errors.warn`, once per file and message in this process (headers are read more than once)."""
    if (str(path), message) not in _said:
        _said.add((str(path), message))
        warn(message, path)


def read_header(path: Path) -> nib.Nifti1Image:
    """The image with its header read and voxels not. InputError if missing, unreadable, empty, not
    NIfTI, misnamed, truncated, without a valid geometry or too large to read; a warning when its
    sform and qform disagree."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise InputError("file not found", path) from None
    except OSError as err:  # a folder on the way that cannot be entered, a file where a folder should be
        raise InputError(f"cannot access: {err.strerror}", path) from None
    if not stat.S_ISREG(mode):  # a folder, or a FIFO or device that would block or never end
        raise InputError("not a regular file", path)
    if not is_nifti(path):
        raise InputError("unsupported format: only NIfTI (.nii, .nii.gz) is read", path)
    if path.stat().st_size == 0:
        raise InputError("empty file (0 bytes)", path)
    try:
        img = load_nifti(path)
    except READ_ERRORS as err:
        if _gzip_ends_early(path):  # nibabel only says it cannot work out the file type
            raise InputError("truncated file: the gzip stream ends early", path) from None
        size = _header_size(path)
        if size is not None and size < HEADER_BYTES:
            raise InputError(f"truncated file: {size} bytes, shorter than a NIfTI header ({HEADER_BYTES})",
                             path) from None
        raise InputError(f"unreadable NIfTI: {_reason(err)}{_hint(err)}{_misnamed(path)}", path) from None
    _check_size(img, path)
    if _compressed(path) is False:  # uncompressed: a cut file is visible from its size
        expected = img.dataobj.offset + int(np.prod(img.shape)) * img.get_data_dtype().itemsize
        if path.stat().st_size < expected:
            raise InputError(f"truncated: {path.stat().st_size} bytes, the header implies {expected}", path)
    _check_geometry(img, path)
    return img


def _compressed(path: Path) -> bool | None:
    """True for a .nii.gz name, False for .nii (any letter case)."""
    name = path.name.lower()
    return True if name.endswith(".nii.gz") else False if name.endswith(".nii") else None


def _header_size(path: Path) -> int | None:
    """How many bytes of the NIfTI header (up to its 348) the file holds once uncompressed."""
    try:
        with (gzip.open(path) if _compressed(path) else open(path, "rb")) as f:
            return len(f.read(HEADER_BYTES))
    except (OSError, EOFError, zlib.error):
        return None


def _hint(err: Exception) -> str:
    if "data code 1 not supported" in str(err):  # DT_BINARY
        return " (DT_BINARY, one bit per voxel, which nibabel cannot read: save the image as uint8)"
    return ""


def _check_size(img: nib.Nifti1Image, path: Path) -> None:
    """Refuse a declared size that cannot be read: a corrupt or truncated header can declare 2000³
    voxels, which reading would try to allocate (32 GB as float32) before finding the data short, or
    a negative side."""
    voxels = int(np.prod(img.shape, dtype=object))
    shape = "x".join(map(str, img.shape))
    if min(img.shape, default=0) < 1:  # reading would map a negative length (or nothing at all)
        raise InputError(f"the header declares the shape {shape or '()'}: a side below 1, a corrupt header?", path)
    if voxels > MAX_VOXELS:
        raise InputError(f"the header declares {shape} = {voxels:,} voxels, more than glmae reads in one file "
                         f"({MAX_VOXELS:,}): a corrupt header?", path)
    available = available_memory()
    if available is not None and 4 * voxels > available:
        raise InputError(f"the header declares {shape} voxels, {_gib(4 * voxels)} as float32, more than the "
                         f"available memory ({_gib(available)})", path)


def available_memory() -> int | None:
    """Bytes this process may still allocate: MemAvailable, or less under a cgroup (v2) memory limit;
    None where unknown."""
    try:
        text = Path("/proc/meminfo").read_text()
        available = int(re.search(r"MemAvailable:\s+(\d+) kB", text)[1]) * 1024
    except (OSError, TypeError):
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def _check_geometry(img: nib.Nifti1Image, path: Path) -> None:
    """InputError for an affine that maps voxels to no valid world geometry (zero, singular or not
    finite); a warning when the sform and qform both apply and disagree by more than a voxel."""
    header = img.header
    used = "sform" if header["sform_code"] > 0 else "qform" if header["qform_code"] > 0 else "pixdim"
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)):
        raise InputError(f"the {used} affine is not finite: {_affine_text(affine)}", path)
    singular = np.linalg.svd(affine[:3, :3], compute_uv=False)
    if singular[0] == 0 or singular[-1] <= 1e-6 * singular[0]:
        raise InputError(f"the {used} affine is singular (zero or collinear axes: {_affine_text(affine)}), so the "
                         f"voxels have no position in space: fix the header's {used}", path)
    if used == "sform" and header["qform_code"] > 0:
        corners = np.array([[*c, 1.0] for c in itertools.product(*[(0, n - 1) for n in img.shape[:3]])])
        gap = np.linalg.norm(corners @ (affine - header.get_qform()).T, axis=1).max()
        voxel = max(header.get_zooms()[:3])
        if gap > voxel:
            warn_once(f"the sform and qform disagree by up to {gap:.3g} mm (more than a voxel, {voxel:.3g} mm): "
                      f"the sform (code {int(header['sform_code'])}) is used, as nibabel does", path)


def read_voxels(img: nib.Nifti1Image, path: Path) -> np.ndarray:
    """All voxels (scaled as the header says). InputError for a truncated or corrupt file."""
    try:
        return np.asanyarray(img.dataobj)
    except READ_ERRORS as err:
        raise unreadable(err, path) from None


def unreadable(err: Exception, path: Path) -> InputError:
    short = re.match(r"Expected (\d+) bytes, got (\d+) bytes", str(err))  # nibabel, on a payload cut short
    if short:
        return InputError(f"truncated file: the header implies {short[1]} bytes of voxel data, the file holds "
                          f"{short[2]}", path)
    return InputError(f"unreadable voxel data (truncated file?): {_reason(err)}", path)


def _gzip_ends_early(path: Path) -> bool:
    if not _compressed(path):
        return False
    try:
        with gzip.open(path) as f:
            while f.read(1 << 24):
                pass
    except EOFError:
        return True
    except (OSError, zlib.error):
        return False
    return False


def _misnamed(path: Path) -> str:
    """A hint when the content does not match the suffix (gzip data in .nii, plain data in .nii.gz)."""
    try:
        with open(path, "rb") as f:
            gzipped = f.read(2) == b"\x1f\x8b"
    except OSError:
        return ""
    if gzipped and _compressed(path) is False:
        return " (it is gzip-compressed: rename it to .nii.gz)"
    if not gzipped and _compressed(path):
        return " (rename it to .nii if it is an uncompressed NIfTI)"
    return ""


def _reason(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def affines_match(a: np.ndarray, b: np.ndarray) -> bool:
    voxel = np.linalg.norm(np.asarray(b)[:3, :3], axis=0).max()
    return bool(np.all(np.abs(a - b) <= AFFINE_TOLERANCE * (np.abs(b) + voxel)))


def check_headers(
    case: Case, n_channels: int, with_label: bool = True, spacing: tuple[float, ...] | None = None
) -> tuple[dict[Path, nib.Nifti1Image], list[InputError]]:
    """Open the case's files (headers only) and check dimensions and geometry.

    Returns the images that could be opened and the problems found. A case holds one 3D file per
    channel, or one 4D file with the `n_channels` channels on its last axis. With
    `with_label=False` the label file is not touched. With `spacing` (mm), the images resampled to
    it must fit (`resampled_size_problem`).
    """
    problems = []
    if len(case.images) not in (1, n_channels):
        problems.append(
            InputError(
                f"case {case.id!r} has {len(case.images)} image files for {n_channels} declared channels",
                case.images[0],
            )
        )
    per_file = n_channels if len(case.images) == 1 else 1
    opened: dict[Path, nib.Nifti1Image] = {}
    shaped = []  # opened files of the right dimensions
    for path in case.images:
        try:
            opened[path] = img = read_header(path)
        except InputError as err:
            problems.append(err)
            continue
        if _has_channels(img.shape, per_file):
            shaped.append((path, img))
        else:
            expected = f"a 4D image with {per_file} channels last" if per_file > 1 else "a 3D volume"
            problems.append(InputError(f"is {len(img.shape)}D {img.shape}, expected {expected}", path))
    if with_label and case.label is not None:
        try:
            opened[case.label] = label = read_header(case.label)
            if _has_channels(label.shape, 1):
                shaped.append((case.label, label))
            else:
                problems.append(
                    InputError(
                        f"label is {len(label.shape)}D {label.shape}, expected a 3D volume", case.label
                    )
                )
        except InputError as err:
            problems.append(err)
    if spacing is not None:
        problems += [p for path, img in shaped if path != case.label
                     if (p := resampled_size_problem(img, path, spacing, n_channels)) is not None]
    if shaped:  # geometry: against the first well-shaped image file
        ref_path, ref = shaped[0]
        for path, img in shaped[1:]:
            if img.shape[:3] != ref.shape[:3]:
                problems.append(
                    InputError(f"shape {img.shape[:3]} differs from {ref_path} {ref.shape[:3]}", path)
                )
            elif not affines_match(img.affine, ref.affine):
                problems.append(
                    InputError(
                        f"affine differs from {ref_path}: {_affine_text(img.affine)} vs "
                        f"{_affine_text(ref.affine)}",
                        path,
                    )
                )
    return opened, problems


def resampled_size_problem(img: nib.Nifti1Image, path: Path, spacing: tuple[float, ...],
                           channels: int = 1) -> InputError | None:
    """A problem when the image resampled to `spacing` (mm) would be too large to hold: a voxel size
    off by orders of magnitude (micrometres written as millimetres, a damaged sform) turns a few
    voxels into billions, which resampling would try to allocate."""
    zooms = np.linalg.norm(img.affine[:3, :3], axis=0)
    sides = [1, 1, 1]  # in RAS order, as resampling follows reorientation
    for j, (axis, _) in enumerate(nib.io_orientation(img.affine)):
        sides[int(axis)] = max(1, round(img.shape[j] * zooms[j] / spacing[int(axis)]))
    voxels = int(np.prod(sides, dtype=object))
    what = (f"resampled to data.spacing {'x'.join(f'{s:g}' for s in spacing)} mm, its voxels of "
            f"{'x'.join(f'{z:.4g}' for z in zooms)} mm become {'x'.join(map(str, sides))} = {voxels:,} voxels")
    if voxels > MAX_VOXELS:
        return InputError(f"{what}, more than glmae holds in one volume ({MAX_VOXELS:,}): is the header's voxel "
                          "size right?", path)
    need, available = RESAMPLE_BYTES * voxels * channels, available_memory()
    if available is not None and need > available:
        return InputError(f"{what}, about {_gib(need)} to resample, more than the available memory "
                          f"({_gib(available)}): is the header's voxel size right?", path)
    return None


def _has_channels(shape: tuple[int, ...], n: int) -> bool:
    if n == 1:
        return len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)
    return len(shape) == 4 and shape[3] == n


def _affine_text(affine: np.ndarray) -> str:
    return str(np.round(np.asarray(affine)[:3], 3).tolist())


def nonfinite_problem(array: np.ndarray, path: Path) -> InputError | None:
    if array.dtype.kind != "f":
        return None
    bad = array.size - int(np.count_nonzero(np.isfinite(array)))
    return InputError(f"{bad} NaN/Inf voxels", path) if bad else None


def label_values(array: np.ndarray) -> np.ndarray:
    """Distinct values of a label volume (bincount for integers: much faster than np.unique)."""
    if array.dtype.kind in "ui" and array.size and array.min() >= 0 and array.max() < 2**16:
        return np.flatnonzero(np.bincount(array.ravel()))
    return np.unique(array)


def label_problems(values: np.ndarray, declared: set[int], path: Path, where: str = "`labels`") -> list[InputError]:
    """Problems of a label file's distinct values: not whole numbers >= 0, or not in `declared`
    (values the data set's `labels` declare, or those of `where`)."""
    problems = []
    if not np.all(np.isfinite(values)) or np.any(values != np.round(values)) or np.any(values < 0):
        problems.append(InputError(f"label values must be whole numbers >= 0, found {_few(values)}", path))
    elif declared:
        undeclared = sorted(set(values.astype(int).tolist()) - declared)
        if undeclared:
            problems.append(
                InputError(f"label values {_few(np.array(undeclared))} not declared in {where}", path)
            )
    return problems


def _few(values: np.ndarray, n: int = 8) -> str:
    shown = ", ".join(f"{v:g}" for v in values[:n].tolist())
    return shown + (f", ... ({len(values)} values)" if len(values) > n else "")


# ----------------------------------------------------------------------------------------------
# glmae info


def info(source: str) -> int:
    """Print a table of the cases and a summary; list every problem on stderr; return their number."""
    from rich.console import Console
    from rich.progress import track

    dataset, problems = scan_dataset(source)
    out, err = Console(highlight=False), Console(stderr=True, highlight=False)
    if not out.is_terminal:  # a pipe or file: wide rows rather than wrapped cells
        out.width = max(out.width, 160)
    rows, warnings = [], []
    progress = track(dataset.cases, "reading", console=err, transient=True,
                     disable=len(dataset.cases) < 20 or not err.is_terminal)  # off a terminal: no empty line
    for case in progress:
        row, case_problems, case_warnings = _inspect(case, dataset)
        rows.append(row)
        problems += case_problems
        warnings += case_warnings
    out.print(_table(rows))
    out.print(_summary(dataset), markup=False, soft_wrap=True)
    for warning in warnings:
        err.print(f"glmae: warning: {warning}", markup=False, soft_wrap=True)
    for problem in problems:
        err.print(f"glmae: error: {problem}", markup=False, soft_wrap=True)
    if problems:
        err.print(f"glmae: {len(problems)} problem{'s' * (len(problems) > 1)} found", markup=False)
    return len(problems)


def _inspect_radiograph(case: Case) -> tuple[list[str], list[InputError], list[str]]:
    """Table row, problems and warnings of one radiograph (`glmae.data.radiographs`)."""
    from glmae.data.radiographs import read_radiograph

    findings = "-" if case.findings is None else (", ".join(sorted(case.findings)) or "No Finding")
    row = [case.id, case.split, "1", "?", "-", "-", "?", "?", findings]
    try:
        array = read_radiograph(case.images[0])
    except InputError as err:
        return row, [err], []
    row[3], row[6], row[7] = "x".join(map(str, array.shape)), f"{array.min():.4g}", f"{array.max():.4g}"
    constant = [f"{case.images[0]}: every pixel is {array.min():g}: the image carries no information"]
    return row, [], constant if array.min() == array.max() else []


def _inspect(case: Case, dataset: DataSet) -> tuple[list[str], list[InputError], list[str]]:
    """Table row, problems and warnings of one case; reads every voxel."""
    if dataset.dims == 2:
        return _inspect_radiograph(case)
    opened, problems = check_headers(case, len(dataset.modalities))
    row = [case.id, case.split, "?", "?", "?", "?", "?", "?", "-" if case.label is None else "?"]
    warnings = []
    images = [(p, opened[p]) for p in case.images if p in opened]
    if images:
        first = images[0][1]
        channels = first.shape[3] if len(first.shape) == 4 and len(case.images) == 1 else len(case.images)
        row[2:6] = [
            str(channels),
            "x".join(map(str, first.shape[:3])),
            "x".join(f"{z:.3g}" for z in first.header.get_zooms()[:3]),
            "".join(nib.aff2axcodes(first.affine)),
        ]
    lows, highs = [], []
    for path, img in images:
        try:
            array = read_voxels(img, path)
        except InputError as e:
            problems.append(e)
            continue
        problem = nonfinite_problem(array, path)
        if problem:
            problems.append(problem)
            array = array[np.isfinite(array)]
        if array.size:
            lows.append(float(array.min()))
            highs.append(float(array.max()))
            if lows[-1] == highs[-1]:
                warnings.append(f"{path}: every voxel is {lows[-1]:g}: the image carries no information")
    if lows:
        row[6:8] = [f"{min(lows):.4g}", f"{max(highs):.4g}"]
    if case.label in opened:
        try:
            values = label_values(read_voxels(opened[case.label], case.label))
            problems += label_problems(values, dataset.label_values, case.label)
            row[8] = _few(values)
        except InputError as e:
            problems.append(e)
    return row, problems, warnings


def _table(rows: list[list[str]]):
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, header_style="bold")
    for name in ("case", "split", "ch", "shape", "spacing (mm)", "orient", "min", "max", "labels"):
        table.add_column(
            name, no_wrap=name != "labels", justify="right" if name in ("min", "max") else "left"
        )
    for row in rows:
        table.add_row(*(Text(cell) for cell in row))
    return table


def _summary(dataset: DataSet) -> str:
    splits = ", ".join(
        f"{len(dataset.split(s))} {s}" for s in ("training", "validation", "test") if dataset.split(s)
    )
    channels = ", ".join(dataset.modalities)
    if set(dataset.modalities) == {"unknown"}:
        channels += " (data.intensity=auto normalises them as MRI; set data.intensity=ct for CT)"
    labels = ", ".join(f"{k} {v}" for k, v in sorted(dataset.labels.items())) or "none declared"
    if dataset.dims == 2:
        labels = f"findings {', '.join(dataset.findings) or 'none'}"
    if dataset.regions:
        labels += "; regions: " + ", ".join(f"{k} {list(v)}" for k, v in dataset.regions.items())
    return (
        f"{dataset.format} data set {dataset.name!r} at {dataset.root}: "
        f"{len(dataset.cases)} cases ({splits}), {len(dataset.labelled)} labelled; "
        f"channels: {channels}; labels: {labels}"
    )
