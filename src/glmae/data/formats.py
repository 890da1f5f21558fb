"""Data sets as users have them -> one normalised list of cases.

`load_dataset(source)` detects the format:

- ``msd``: an MSD task folder or its ``dataset.json`` (``modality``, ``labels``, ``training``,
  ``test``). A multi-channel task (BraTS) stores each case as one 4D NIfTI, channels last.
- ``nnunet``: an nnU-Net v2 raw folder; ``dataset.json`` has ``channel_names``, ``labels`` (name ->
  value, or a list of values for region-based data sets), ``file_ending``; images are
  ``imagesTr/<case>_0000<ending>``, ``_0001``, ... per channel, labels ``labelsTr/<case><ending>``,
  optional ``imagesTs/``.
- ``datalist``: a MONAI/BTCV datalist JSON: ``training`` / ``validation`` / ``test`` lists of
  ``{"image": ..., "label": ...}`` ("image" may list one file per channel), optional ``labels`` and
  ``modality``.
- ``images``: a folder (searched recursively), a glob pattern (``data/**/*.nii.gz``) or one image
  file; unlabelled, for pretraining and prediction. NIfTI volumes, or 2D radiographs (PNG, JPEG,
  DICOM), never both in one data set.
- ``chestxray14`` / ``csv``: radiographs with findings listed in a CSV (a ChestX-ray14-style
  ``Image Index`` / ``Finding Labels`` table or a path column plus 0/1 finding columns, optional
  patient and split columns; see `glmae.data.radiographs`).

Volumes are NIfTI (``.nii``, ``.nii.gz``, in any letter case); 2D data sets (``DataSet.dims == 2``)
are radiographs. A JSON may start with a UTF-8 byte-order mark. Paths in a JSON are relative to the
JSON's folder (the data set root), separated by ``/``, and must stay inside it: ``../`` or absolute
paths elsewhere are refused, because
datalists are passed between people and every listed path gets opened. The check is on the written
path, so symbolic links inside the root (say, to another disk) work as usual. A folder that cannot
be listed (permissions) is an error, never silently skipped with its images.

Case ids are image file names without extension (and without the ``_0000`` channel suffix of
nnU-Net, or of a case listing several channel files). When two different files share a name, every
id of that data set becomes the image path relative to the root instead (``patient1/ct``). Two
cases whose image is the same file (through a symbolic or hard link) are refused like duplicate ids:
one scan would count twice, and could land in training and validation at once.

`scan_dataset` returns the entry-level problems (bad entries, escaping paths, duplicate ids) so
that ``glmae info`` can list them all; `load_dataset` raises the first as `InputError`. Neither
opens an image: missing and broken files are found by `glmae.data.validate`.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from glmae.data.radiographs import is_radiograph
from glmae.errors import InputError

SPLITS = ("training", "validation", "test")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
_SPLIT_ALIASES = {"train": "training", "val": "validation"}
_Entry = tuple[tuple[Path, ...], Path | None, str]  # (images, label, split) before ids are assigned


@dataclass(frozen=True)
class Case:
    id: str  # unique within the data set
    images: tuple[Path, ...]  # absolute paths, one file per channel (or one 4D file)
    label: Path | None  # absolute path, or None if unlabelled
    split: str = "training"  # where the data set put it: training | validation | test
    findings: frozenset[str] | None = None  # radiographs: the positive findings; None if unlabelled
    patient: str | None = None  # splits keep a patient's cases together


@dataclass
class DataSet:
    root: Path
    name: str
    modalities: tuple[str, ...]  # per channel; ("unknown",) if not declared
    labels: dict[int, str]  # {0: "background", 1: "spleen", ...}; {} if not declared
    cases: list[Case]
    format: str = "images"  # msd | nnunet | datalist | images | chestxray14 | csv
    regions: dict[str, tuple[int, ...]] = field(default_factory=dict)  # nnU-Net region-based labels
    findings: tuple[str, ...] = ()  # radiographs: the findings the data set names
    dims: int = 3  # 3: volumes; 2: radiographs, read as (1, H, W, 1) depth-1 volumes

    def split(self, name: str) -> list[Case]:
        """Cases of a split: training, validation (or val), test."""
        name = _SPLIT_ALIASES.get(name, name)
        if name not in SPLITS:
            raise InputError(f"unknown split {name!r} (known: {', '.join(SPLITS)})")
        return [c for c in self.cases if c.split == name]

    @property
    def labelled(self) -> list[Case]:
        return [c for c in self.cases if c.label is not None or c.findings is not None]

    @property
    def label_values(self) -> set[int]:
        """Every voxel value a label file may hold (declared labels and region members)."""
        return set(self.labels) | {v for values in self.regions.values() for v in values}


def load_dataset(source: str | Path) -> DataSet:
    """Read a data set; raises InputError for a malformed one (the first problem; `glmae info` lists all)."""
    dataset, problems = scan_dataset(source)
    if problems:
        more = f" (and {len(problems) - 1} more; `glmae info` lists them)" if len(problems) > 1 else ""
        raise InputError(f"{problems[0]}{more}")
    return dataset


def scan_dataset(source: str | Path) -> tuple[DataSet, list[InputError]]:
    """(data set, entry-level problems). Structural errors (no data set, malformed JSON, a folder
    that cannot be read) raise InputError."""
    try:
        return _scan(source)
    except OSError as err:
        raise InputError(f"cannot read: {err.strerror or err}", err.filename or source) from None


def _scan(source: str | Path) -> tuple[DataSet, list[InputError]]:
    text = str(source)
    path = Path(text).expanduser()
    if not path.exists() and any(c in text for c in "*?["):
        return _images(_glob_root(text), sorted(glob.glob(os.path.expanduser(text), recursive=True)), text)
    if path.is_dir():
        if (path / "dataset.json").is_file():
            return _from_json(path / "dataset.json")
        if (path / "labelsTr").is_dir():
            raise InputError(
                "has labelsTr/ but no dataset.json; to pretrain on the images alone pass imagesTr/ or a glob",
                path,
            )
        return _images(path, _files_under(path), text)
    if path.is_file() and path.suffix == ".json":
        return _from_json(path)
    if path.is_file() and path.suffix.lower() == ".csv":
        return _from_csv(path)
    if path.is_file() and (is_nifti(path) or is_radiograph(path)):
        return _images(path.parent, [str(path)], text)
    if path.is_file():
        raise InputError(
            "not a data set: expected a folder, dataset.json, datalist JSON, CSV of radiographs, NIfTI image, "
            "radiograph or glob", path
        )
    raise InputError("no such file or folder", path)


def is_nifti(path: str | Path) -> bool:
    """A NIfTI name, in any case ('.nii.gz', '.NII.GZ', '.Nii.Gz')."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def strip_suffix(name: str) -> str:
    """'ct.nii.gz' -> 'ct' (also 'CT.NII.GZ' -> 'CT')."""
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


# ----------------------------------------------------------------------------------------------
# Folders and globs of images


def _glob_root(pattern: str) -> Path:
    """The folder part of a pattern before its first wildcard: 'data/*/x*.nii' -> data."""
    parts = Path(os.path.expanduser(pattern)).parts
    fixed = []
    for part in parts[:-1]:
        if any(c in part for c in "*?["):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def _files_under(root: Path) -> list[str]:
    """Every file below `root`, hidden folders (.git, ...) skipped. A folder that cannot be listed
    raises OSError rather than silently losing its images."""

    def fail(err: OSError):
        raise err

    files = []
    for folder, subfolders, names in os.walk(root, onerror=fail):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        files += [os.path.join(folder, name) for name in names]
    return sorted(files)


def _images(root: Path, files: list[str], source: str) -> tuple[DataSet, list[InputError]]:
    root = _absolute(root)
    volumes, radiographs = [], []
    for f in files:
        path = _absolute(Path(f))
        hidden = any(part.startswith(".") for part in path.relative_to(root).parts)
        if hidden or not path.is_file():  # skips macOS '._x.nii.gz' and .git
            continue
        if is_nifti(path):
            volumes.append(path)
        elif is_radiograph(path):
            radiographs.append(path)
    if volumes and radiographs:
        raise InputError(f"holds both NIfTI volumes ({len(volumes)}) and 2D radiographs ({len(radiographs)}); "
                         "pass a folder or glob of one kind", source)
    if not volumes and not radiographs:
        raise InputError("no NIfTI images (*.nii, *.nii.gz) or radiographs (*.png, *.jpg, *.dcm) found", source)
    cases, problems = _with_ids([((p,), None, "training") for p in volumes or radiographs], root)
    if radiographs:
        return DataSet(root, root.name, ("XR",), {}, cases, format="images", dims=2), problems
    return DataSet(root, root.name, ("unknown",), {}, cases, format="images"), problems


def _from_csv(path: Path) -> tuple[DataSet, list[InputError]]:
    """Radiographs with findings (`glmae.data.radiographs.scan_csv`)."""
    from glmae.data.radiographs import scan_csv

    fmt, findings, rows, problems = scan_csv(path)
    path = _absolute(path)
    cases, duplicates = _with_ids([((r.image,), None, r.split) for r in rows], path.parent)
    cases = [dataclasses.replace(c, findings=r.findings, patient=r.patient) for c, r in zip(cases, rows)]
    dataset = DataSet(path.parent, path.stem, ("XR",), {}, cases, fmt, findings=findings, dims=2)
    return dataset, problems + duplicates


def _absolute(path: Path) -> Path:
    """Absolute and normalised ('a/./b/../c' -> '/cwd/a/c'), without resolving symbolic links."""
    return Path(os.path.normpath(path.expanduser().absolute()))


def _with_ids(entries: list[_Entry], root: Path) -> tuple[list[Case], list[InputError]]:
    """Cases with ids from file names (relative paths if names collide); duplicate ids are problems."""
    names: dict[str, set[Path]] = {}
    for images, _, _ in entries:
        names.setdefault(_case_name(images), set()).add(images[0])
    by_path = any(len(files) > 1 for files in names.values())
    cases = []
    for images, label, split in entries:
        name = _case_name(images)
        case_id = (images[0].parent.relative_to(root) / name).as_posix() if by_path else name
        cases.append(Case(case_id, images, label, split))
    return cases, _duplicates(cases)


def _case_name(images: tuple[Path, ...]) -> str:
    name = strip_suffix(images[0].name)
    return re.sub(r"_\d{4}$", "", name) if len(images) > 1 else name


def _duplicates(cases: list[Case]) -> list[InputError]:
    """Cases sharing an id, and cases sharing an image file under other names (a symbolic or hard
    link), which would let one scan count twice and land in training and validation at once."""
    first: dict[str, Case] = {}
    files: dict[tuple[int, int], tuple[Path, Case]] = {}
    problems = []
    for case in cases:
        if case.id in first:
            other = first[case.id].images[0]
            where = "the same file is listed twice" if other == case.images[0] else f"also {other}"
            problems.append(InputError(f"duplicate case id {case.id!r} ({where})", case.images[0]))
            continue
        first[case.id] = case
        for path in case.images:
            try:
                stat = path.stat()
            except OSError:  # missing or unreachable: reported when the case is read
                continue
            key = (stat.st_dev, stat.st_ino)
            if key in files and files[key][1] is not case:
                other, owner = files[key]
                problems.append(InputError(f"is the same file as {other} (case {owner.id!r}) through a link: "
                                           f"one scan would count as two cases", path))
            files.setdefault(key, (path, case))
    return problems


# ----------------------------------------------------------------------------------------------
# JSON: MSD, datalists, nnU-Net


class _BadEntry(Exception):
    """One entry of a JSON list is unusable; reported, and the entry skipped."""


def _from_json(path: Path) -> tuple[DataSet, list[InputError]]:
    path = _absolute(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))  # a byte-order mark, as Windows editors write
    except OSError as err:
        raise InputError(f"cannot read: {err.strerror}", path) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"malformed JSON: {err}", path) from None
    if not isinstance(data, dict):
        raise InputError("malformed data set: expected a JSON object at the top level", path)
    if "channel_names" in data or "file_ending" in data:
        return _nnunet(path, data)
    if not any(key in data for key in SPLITS):
        raise InputError(
            "not a data set: no `training`, `validation` or `test` list (MSD, datalist) "
            "and no `channel_names` (nnU-Net v2)",
            path,
        )
    return _datalist(path, data)


def _datalist(path: Path, data: dict) -> tuple[DataSet, list[InputError]]:
    """MSD dataset.json and MONAI/BTCV datalists: the same lists, paths relative to the JSON."""
    root = path.parent
    problems: list[InputError] = []
    entries = []
    for split in SPLITS:
        items = data.get(split, [])
        if not isinstance(items, list):
            raise InputError(f"`{split}` must be a list, got {type(items).__name__}", path)
        for i, item in enumerate(items):
            try:
                entries.append(_entry(item, f"{split}[{i}]", root) + (split,))
            except _BadEntry as err:
                problems.append(InputError(str(err), path))
    if not entries and not problems:
        raise InputError("empty data set: no cases in `training`, `validation` or `test`", path)
    _check_count(data, "numTraining", sum(e[2] == "training" for e in entries), path, problems)
    cases, duplicates = _with_ids(entries, root)
    labels, regions = _labels(data.get("labels", {}), path)
    modalities = _indexed(data["modality"], "modality", path) if "modality" in data else None
    if not modalities:
        modalities = ("unknown",) * (len(cases[0].images) if cases else 1)
    fmt = "msd" if path.name == "dataset.json" else "datalist"
    name = str(data.get("name") or root.name)
    return DataSet(root, name, modalities, labels, cases, fmt, regions), problems + duplicates


def _entry(item, where: str, root: Path) -> tuple[tuple[Path, ...], Path | None]:
    if isinstance(item, str):
        images, label = item, None
    elif isinstance(item, dict) and "image" in item:
        images, label = item["image"], item.get("label")
    else:
        raise _BadEntry(f"{where}: expected an image path or an object with an `image` path, got {item!r}")
    images = images if isinstance(images, list) else [images]
    if not images:
        raise _BadEntry(f"{where}.image: empty list")
    paths = tuple(_inside(root, value, f"{where}.image") for value in images)
    return paths, None if label is None else _inside(root, label, f"{where}.label")


def _inside(root: Path, value, where: str) -> Path:
    """`root / value`, refusing paths that leave the root (checked on the path as written)."""
    if not isinstance(value, str) or not value:
        raise _BadEntry(f"{where}: expected a file path, got {value!r}")
    if "\\" in value and not (root / value).exists():  # written on Windows
        fixed = value.replace("\\", "/")
        raise _BadEntry(f"{where}: {value!r}: no such file; paths are separated by '/', not '\\' (write {fixed!r})")
    path = _absolute(root / value)  # an absolute value replaces root
    if not path.is_relative_to(root):
        raise _BadEntry(f"{where}: {value!r} points outside the data set folder {root}")
    return path


def _nnunet(path: Path, data: dict) -> tuple[DataSet, list[InputError]]:
    root = path.parent
    for key in ("channel_names", "labels", "file_ending"):
        if key not in data:
            raise InputError(f"nnU-Net dataset.json has no `{key}`", path)
    channels = _indexed(data["channel_names"], "channel_names", path)
    labels, regions = _labels(data["labels"], path)
    ending = data["file_ending"]
    if not isinstance(ending, str) or not ending.startswith("."):
        raise InputError(f"`file_ending` must be like '.nii.gz', got {ending!r}", path)
    if not (root / "imagesTr").is_dir():
        raise InputError("nnU-Net data set has no imagesTr/ folder", root)
    problems: list[InputError] = []
    cases = []
    for folder, split in (("imagesTr", "training"), ("imagesTs", "test")):
        found: dict[str, set[int]] = {}
        files = []
        if (root / folder).is_dir():  # iterdir, not glob: an unreadable folder raises instead of looking empty
            files = sorted(p for p in (root / folder).iterdir() if p.name.endswith(ending))
        for file in files:
            match = re.fullmatch(r"(.+)_(\d{4})", file.name[: -len(ending)])
            if match is None:
                problems.append(InputError(f"not named <case>_XXXX{ending} (XXXX: channel index)", file))
            elif int(match[2]) >= len(channels):
                problems.append(
                    InputError(f"channel {int(match[2])} but channel_names declares {len(channels)}", file)
                )
            else:
                found.setdefault(match[1], set()).add(int(match[2]))
        for name in sorted(found):  # a missing channel file is kept, to be reported as missing
            images = tuple(root / folder / f"{name}_{c:04d}{ending}" for c in range(len(channels)))
            label = root / "labelsTr" / f"{name}{ending}" if split == "training" else None
            cases.append(Case(name, images, label, split))
    if not cases and not problems:
        raise InputError(f"empty data set: no imagesTr/*_0000{ending} files", root)
    _check_count(data, "numTraining", sum(c.split == "training" for c in cases), path, problems)
    name = str(data.get("name") or root.name)
    dataset = DataSet(root, name, channels, labels, cases, "nnunet", regions)
    return dataset, problems + _duplicates(cases)


def _check_count(data: dict, key: str, found: int, path: Path, problems: list) -> None:
    declared = data.get(key)
    if isinstance(declared, int) and declared != found:
        problems.append(InputError(f"`{key}` is {declared} but {found} training cases were found", path))


def _indexed(raw, key: str, path: Path) -> tuple[str, ...]:
    """{"0": "FLAIR", "1": "T1w"} -> ("FLAIR", "T1w"); a plain string is one channel."""
    if isinstance(raw, str):
        return (raw,)
    if isinstance(raw, dict) and set(raw) == {str(i) for i in range(len(raw))}:
        return tuple(str(raw[str(i)]) for i in range(len(raw)))
    raise InputError(f"`{key}` must map channel indices 0, 1, ... to names, got {raw!r}", path)


# BraTS label conventions: label value -> sub-region (oedema; the tumour core's necrotic or
# non-enhancing part; enhancing tumour). MSD Task01 (and nnU-Net's BraTS conversions) number them
# 1 edema, 2 non-enhancing tumor, 3 enhancing tumour; BraTS 2017-2021 1 necrotic tumour core (NCR,
# NCR/NET), 2 peritumoral edema (ED), 4 GD-enhancing tumour (ET).
BRATS_CONVENTIONS = {
    "MSD Task01": {1: "oedema", 2: "core", 3: "enhancing"},
    "BraTS 2021": {1: "core", 2: "oedema", 4: "enhancing"},
}


def _sub_region(name: str) -> str | None:
    """The BraTS sub-region a label name means ('oedema', 'core', 'enhancing'), or None."""
    n = re.sub(r"[^a-z]", "", name.lower())
    if n in ("ncr", "net", "ncrnet") or "necro" in n or "nonenhancing" in n:
        return "core"
    if n == "ed" or "edema" in n:  # also oedema, edematous
        return "oedema"
    if n == "et" or "enhancing" in n:
        return "enhancing"
    return None


def brats_regions(labels: dict[int, str]) -> tuple[str, dict[str, list[int]]] | None:
    """(convention, {"WT": values, "TC": values, "ET": values}) when the labels (value -> name,
    background aside) are one of `BRATS_CONVENTIONS`, recognised by their values and names
    (`edema`, `non-enhancing tumor`, `enhancing tumour`; `NCR`, `ED`, `ET`; ...); else None.
    Whole tumour = every sub-region, tumour core = core + enhancing, enhancing tumour = enhancing:
    MSD Task01 WT [1, 2, 3], TC [2, 3], ET [3]; BraTS 2021 WT [1, 2, 4], TC [1, 4], ET [4]."""
    named = {value: _sub_region(name) for value, name in labels.items() if value != 0}
    for convention, parts in BRATS_CONVENTIONS.items():
        if named == parts:
            return convention, {"WT": sorted(parts), "TC": sorted(v for v, p in parts.items() if p != "oedema"),
                                "ET": [v for v, p in parts.items() if p == "enhancing"]}
    return None


def _labels(raw, path: Path) -> tuple[dict[int, str], dict[str, tuple[int, ...]]]:
    """MSD {"0": "background"} or nnU-Net {"background": 0, "tumour": [1, 2]} -> (labels, regions)."""
    if not isinstance(raw, dict):
        raise InputError(f"`labels` must be an object, got {raw!r}", path)
    labels: dict[int, str] = {}
    regions: dict[str, tuple[int, ...]] = {}
    for key, value in raw.items():
        if isinstance(key, str) and key.isdigit() and isinstance(value, str):  # MSD: value -> name
            labels[int(key)] = value
        elif isinstance(value, int) and not isinstance(value, bool) and value >= 0:  # nnU-Net: name -> value
            labels[value] = str(key)
        elif isinstance(value, list) and value and all(isinstance(v, int) and v >= 0 for v in value):
            regions[str(key)] = tuple(value)  # nnU-Net region: a union of label values
        else:
            raise InputError(f"`labels`: cannot read entry {key!r}: {value!r}", path)
    return labels, regions
