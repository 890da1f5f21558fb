"""`glmae predict`: label masks for new images, in each input's own geometry.

Per case: the training preprocessing (RAS, target spacing, intensity, foreground crop; the
checkpoint's config), sliding-window inference (windows on the compute device, the stitched
logits on the CPU), the class map turned into the training data set's label values, then put back
on the input's grid: every input voxel takes the value of the nearest preprocessed voxel, found
through the two affines (input voxel -> world -> preprocessed voxel), which undoes reorientation,
resampling and cropping at once (voxels outside the crop are background). The mask has the
input's shape and affine and is written atomically as `OUT/<case id>.nii.gz`; `--overlay` adds
`OUT/<case id>.png` (the preprocessed image with the mask, three planes).

Every input is read, checked and preprocessed (into the cache) before the first mask is written,
so a bad file refuses the whole command and leaves no masks; a crash never leaves a half-written
one. Then cases are segmented one at a time from the cache and nothing is kept between them, so
memory does not grow over a folder.

Inputs: a NIfTI file, a folder or glob of them, or a data set (dataset.json, nnU-Net folder,
datalist; every case of it). A mask is named after its case: the image's file name without
extension, except in nnU-Net's layout. In a folder or glob where every file is named
`<case>_XXXX.nii.gz`, a multi-channel model reads the `_0000`, `_0001`, ... files of a case as its
channels, in that order, and a single-channel model the one file of each case; both
name the mask `<case>.nii.gz`. A single-channel model refuses such a folder when every case has
the same several channel files (pass one channel's files, e.g. `DIR/*_0000.nii.gz`), and takes numbered scans
of one name (`case_0000`, `case_0001`, ..., as `glmae synth` writes them) as cases of their own. A
single file keeps its name.

Nothing but an earlier mask of the same input is overwritten: before any work, `--out` is refused
when it is the input's folder or a folder inside it that holds inputs, and so is any mask (or
overlay) path where a file exists that is not a glmae mask (overlay) of that case's input files.
Masks record their input files in a NIfTI comment extension (`MASK_FORMAT`) and keep the input's
sform and qform codes and spatial units.

A classifier of radiographs (`glmae.methods.classification`) writes instead one CSV of
probabilities, a row per image (`image`, the image's path, then one column per finding), to
`OUT/predictions.csv`, or to OUT itself when it ends in `.csv`. Its inputs are radiographs (PNG,
JPEG, DICOM): a file, a folder or glob of them, or a CSV data set; every one is read and checked
before the CSV is written, atomically, and only over an earlier glmae predictions CSV of the same
findings.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections import defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np

from glmae.data.formats import Case, DataSet
from glmae.engine.checkpoint import atomic_write, check_writable
from glmae.errors import InputError
from glmae.figures import SOFTWARE as FIGURE_SOFTWARE

_CHANNEL = re.compile(r"(.+)_(\d{4})$")
MASK_FORMAT = "glmae-mask/1"
COMMENT = 6  # NIfTI extension code of a comment


def prediction_cases(source: str, n_channels: int) -> tuple[DataSet, list[Case]]:
    """(the data set of `source`, the cases to segment in it), grouping the nnU-Net channel files
    of image folders and globs (see the module docstring)."""
    from glmae.data.formats import load_dataset

    dataset = load_dataset(source)
    names = [_CHANNEL.match(c.id.rsplit("/", 1)[-1]) for c in dataset.cases]
    if dataset.format != "images" or Path(source).expanduser().is_file() or not all(names):
        return dataset, dataset.cases
    groups: dict[str, dict[int, Path]] = defaultdict(dict)
    for case in dataset.cases:
        name, channel = _CHANNEL.match(case.id).groups()
        groups[name][int(channel)] = case.images[0]
    if n_channels == 1:
        if all(len(files) == 1 for files in groups.values()):  # <case>_0000 (or one other channel) each
            return dataset, [Case(name, tuple(files.values()), None) for name, files in sorted(groups.items())]
        channel_sets = {tuple(sorted(files)) for files in groups.values()}
        if len(groups) == 1 or len(channel_sets) > 1:  # numbered scans: case_0000, case_0001, ...
            return dataset, dataset.cases
        (channels,) = channel_sets
        raise InputError(
            f"holds nnU-Net channel files {', '.join(f'_{c:04d}' for c in channels)} for each of {len(groups)} "
            f"cases, but the model takes 1 channel: pass the files of the channel it was trained on (a glob "
            f"such as '{dataset.root / '*_0000.nii.gz'}'), or list the scans in a datalist JSON",
            source,
        )
    cases = []
    for name, files in sorted(groups.items()):
        if sorted(files) != list(range(n_channels)):
            raise InputError(
                f"case {name!r} has channel files {sorted(files)} but the model takes {n_channels} "
                f"(_0000 .. _{n_channels - 1:04d})",
                source,
            )
        cases.append(Case(name, tuple(files[c] for c in range(n_channels)), None))
    return dataset, cases


def mask_inputs(path: Path) -> list[str] | None:
    """The input files recorded in a mask that `save_mask` wrote; None for any other file."""
    from glmae.data.validate import READ_ERRORS

    try:
        with gzip.open(path) if path.name.endswith(".gz") else open(path, "rb") as f:
            header = nib.Nifti1Header.from_fileobj(f, check=False)  # quietly: a foreign file is refused
    except READ_ERRORS:  # anything unreadable is not one of our masks
        return None
    for extension in header.extensions:
        if extension.get_code() == COMMENT:
            try:
                record = json.loads(extension.get_content())
            except (ValueError, UnicodeDecodeError):
                continue
            if isinstance(record, dict) and record.get("format") == MASK_FORMAT:
                return record.get("inputs")
    return None


def _is_glmae_figure(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.info.get("Software") == FIGURE_SOFTWARE
    except (OSError, ValueError):  # not a PNG, unreadable: not ours
        return False


def _inputs(case: Case) -> list[str]:
    return [str(p.resolve()) for p in case.images]


def check_outputs(root: Path, cases: list[Case], out: Path, overlay: bool) -> dict[str, Path]:
    """{case id: mask path}; InputError (before anything is done) if writing them could destroy a
    file that is not an earlier mask of the same input: `out` is the input's folder `root`, or a
    folder inside it that holds inputs, or a mask or overlay path holds another file."""
    here, top = out.resolve(), root.resolve()
    if here == top:
        raise InputError(f"--out: is the folder of --input {root}: masks would replace its scans; choose "
                         f"another folder", out)
    if here.is_relative_to(top):
        inside = sorted(p for case in cases for p in map(Path, _inputs(case)) if p.is_relative_to(here))
        if inside:
            raise InputError(f"--out: lies inside the --input folder {root} and holds {len(inside)} of its images "
                             f"({inside[0]}{', ...' if len(inside) > 1 else ''}; masks of an earlier run?): choose "
                             f"a folder outside it", out)
    check_writable(out, "--out", folder=True)
    paths = {}
    for case in cases:
        path = paths[case.id] = out / f"{case.id}.nii.gz"
        if os.path.lexists(path):
            recorded = mask_inputs(path)
            if recorded is None:
                raise InputError("exists and is not a glmae mask: refusing to overwrite it (choose another --out)",
                                 path)
            if recorded != _inputs(case):
                raise InputError(f"is the mask of {', '.join(map(str, recorded))}, not of {case.images[0]}: "
                                 f"refusing to overwrite it (choose another --out)", path)
        figure = _overlay_path(path)
        if overlay and os.path.lexists(figure) and not _is_glmae_figure(figure):
            raise InputError("exists and is not a glmae figure: refusing to overwrite it (choose another --out)",
                             figure)
    return paths


def _overlay_path(mask: Path) -> Path:
    return mask.with_name(f"{mask.name[:-len('.nii.gz')]}.png")


def to_input_grid(labels: np.ndarray, volume) -> tuple[np.ndarray, np.ndarray]:
    """(mask on the input file's grid, the input's affine): nearest-neighbour lookup of each input
    voxel in the preprocessed label map (X, Y, Z) through the affines."""
    from scipy.ndimage import affine_transform

    source = volume.source["files"][0]
    affine = np.asarray(source["affine"], dtype=np.float64)
    to_pre = np.linalg.inv(volume.affine) @ affine  # input voxel -> preprocessed voxel
    mask = affine_transform(
        labels, to_pre[:3, :3], offset=to_pre[:3, 3], output_shape=tuple(source["shape"][:3]),
        order=0, mode="constant", cval=0, prefilter=False,
    )
    return mask, affine


def save_mask(mask: np.ndarray, affine: np.ndarray, path: Path, case: Case) -> None:
    """The mask as NIfTI at `path` (atomically), with the input's sform and qform codes and spatial
    units, its input files recorded (see `mask_inputs`)."""
    from glmae.data.validate import load_nifti

    like = load_nifti(case.images[0]).header
    img = nib.Nifti1Image(mask, affine)
    img.set_sform(affine, code=int(like["sform_code"]))
    img.set_qform(affine, code=int(like["qform_code"]))
    img.header.set_xyzt_units(*like.get_xyzt_units())
    record = json.dumps({"format": MASK_FORMAT, "inputs": _inputs(case)})
    img.header.extensions.append(nib.nifti1.Nifti1Extension(COMMENT, record.encode()))
    data = gzip.compress(img.to_bytes(), compresslevel=6)
    atomic_write(path, lambda f: f.write(data))


def predict(checkpoint: Path, input: str, out: Path, overlay: bool = False) -> list[Path]:
    """Segment every case of `input`; returns the written mask paths."""
    import torch

    from glmae.data.preprocess import Preprocessor, warn_smaller_than_roi
    from glmae.engine.distributed import pick_device
    from glmae.engine.precision import amp_dtype
    from glmae.engine.run import check_data_fits, load_finetuned
    from glmae.figures import overlay_figure
    from glmae.methods.segmentation import decode_logits, infer, label_map

    cfg, model = load_finetuned(checkpoint)
    device = pick_device(cfg.train.device)
    net = model.net.to(device)
    dtype = amp_dtype(cfg.train.amp, device)
    if cfg.method.name == "classifier":
        return [_predict_findings(net, cfg, input, Path(out), device, dtype)]
    n_channels = cfg.encoder.in_channels
    pre = Preprocessor(cfg.data, ("unknown",) * n_channels)  # the intensity mode is in cfg.data
    out = Path(out)
    dataset, cases = prediction_cases(input, n_channels)
    check_data_fits(cfg, dataset, checkpoint, labels=False)  # a data set may declare its modality
    paths = check_outputs(dataset.root, cases, out, overlay)
    pre.prepare(cases, with_label=False)  # every input checked before any mask is written
    written = []
    for case in cases:
        volume = pre(case, with_label=False)  # from the cache
        warn_smaller_than_roi([volume], cfg.method.roi)
        with torch.inference_mode():
            decoded = decode_logits(infer(net, volume.image, cfg.method, device, dtype), cfg.method)
        labels = label_map(decoded.numpy(), cfg.method)
        mask, affine = to_input_grid(labels, volume)
        path = paths[case.id]
        save_mask(mask, affine, path, case)
        if overlay:
            overlay_figure(np.asarray(volume.image[0]), labels, _overlay_path(path), case.id)
        print(f"{case.id}: {path}")
        written.append(path)
    return written


def _predict_findings(net, cfg, source: str, out: Path, device, dtype) -> Path:
    """Probabilities of every radiograph of `source` as one CSV; returns its path."""
    import csv
    import io

    from glmae.data.formats import load_dataset
    from glmae.data.preprocess import RadiographPreprocessor
    from glmae.methods.classification import probabilities

    dataset = load_dataset(source)
    if dataset.dims != 2:
        raise InputError("the classifier reads radiographs (PNG, JPEG, DICOM); this input holds volumes", source)
    path = out if out.suffix.lower() == ".csv" else out / "predictions.csv"
    header = ",".join(["image", *cfg.method.findings])
    if os.path.lexists(path) and _first_line(path) != header:  # a data set's CSV, any other file
        raise InputError("exists and is not glmae predictions: refusing to overwrite it (choose another --out)", path)
    volumes = RadiographPreprocessor(cfg.data).prepare(dataset.cases)  # every input checked first
    probs = probabilities(net, volumes, cfg.method, device, dtype)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["image", *cfg.method.findings])
    for case, row in zip(dataset.cases, probs):
        writer.writerow([str(case.images[0]), *(f"{p:.6f}" for p in row)])
    atomic_write(path, lambda f: f.write(buf.getvalue().encode()))
    print(f"probabilities of {len(volumes)} image(s) for {len(cfg.method.findings)} finding(s) -> {path}")
    return path


def _first_line(path: Path) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline().rstrip("\n")
    except (OSError, UnicodeDecodeError):
        return None
