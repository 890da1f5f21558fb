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
datalist; every case of it).

A classifier of radiographs (`glmae.methods.classification`) writes instead one CSV of
probabilities, a row per image (`image`, the image's path, then one column per finding), to
`OUT/predictions.csv`, or to OUT itself when it ends in `.csv`. Its inputs are radiographs (PNG,
JPEG, DICOM): a file, a folder or glob of them, or a CSV data set; every one is read and checked
before the CSV is written, atomically. In a folder of files named `<case>_0000.nii.gz`, `<case>_0001...`
(nnU-Net's channel convention) the files of a case are its channels, in that order.
"""

from __future__ import annotations

import gzip
import re
from collections import defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np

from glmae.data.formats import Case
from glmae.engine.checkpoint import atomic_write
from glmae.errors import InputError

_CHANNEL = re.compile(r"(.+)_(\d{4})$")


def prediction_cases(source: str, n_channels: int) -> list[Case]:
    """The cases to segment in `source`, grouping nnU-Net channel files of image folders. For a
    single-channel model, names like case_0001.nii.gz that are not all _0000 number cases instead."""
    from glmae.data.formats import load_dataset

    dataset = load_dataset(source)
    if dataset.format != "images" or not all(_CHANNEL.match(c.id.rsplit("/", 1)[-1]) for c in dataset.cases):
        return dataset.cases
    groups: dict[str, dict[int, Path]] = defaultdict(dict)
    for case in dataset.cases:
        name, channel = _CHANNEL.match(case.id).groups()
        groups[name][int(channel)] = case.images[0]
    if n_channels == 1 and any(sorted(files) != [0] for files in groups.values()):
        return dataset.cases
    cases = []
    for name, files in sorted(groups.items()):
        if sorted(files) != list(range(n_channels)):
            raise InputError(
                f"case {name!r} has channel files {sorted(files)} but the model takes {n_channels} "
                f"(_0000 .. _{n_channels - 1:04d})",
                source,
            )
        cases.append(Case(name, tuple(files[c] for c in range(n_channels)), None))
    return cases


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


def save_mask(mask: np.ndarray, affine: np.ndarray, path: Path) -> None:
    data = gzip.compress(nib.Nifti1Image(mask, affine).to_bytes(), compresslevel=6)
    atomic_write(path, lambda f: f.write(data))


def predict(checkpoint: Path, input: str, out: Path, overlay: bool = False) -> list[Path]:
    """Segment every case of `input`; returns the written mask paths."""
    import torch

    from glmae.data.preprocess import Preprocessor, warn_smaller_than_roi
    from glmae.engine.distributed import pick_device
    from glmae.engine.precision import amp_dtype
    from glmae.engine.run import load_finetuned
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
    cases = prediction_cases(input, n_channels)
    pre.prepare(cases, with_label=False)  # every input checked before any mask is written
    written = []
    for case in cases:
        volume = pre(case, with_label=False)  # from the cache
        warn_smaller_than_roi([volume], cfg.method.roi)
        with torch.inference_mode():
            decoded = decode_logits(infer(net, volume.image, cfg.method, device, dtype), cfg.method)
        labels = label_map(decoded.numpy(), cfg.method)
        mask, affine = to_input_grid(labels, volume)
        path = out / f"{case.id}.nii.gz"
        save_mask(mask, affine, path)
        if overlay:
            overlay_figure(np.asarray(volume.image[0]), labels, path.with_name(f"{path.name[:-7]}.png"), case.id)
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
    volumes = RadiographPreprocessor(cfg.data).prepare(dataset.cases)  # every input checked first
    probs = probabilities(net, volumes, cfg.method, device, dtype)
    path = out if out.suffix.lower() == ".csv" else out / "predictions.csv"
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["image", *cfg.method.findings])
    for case, row in zip(dataset.cases, probs):
        writer.writerow([str(case.images[0]), *(f"{p:.6f}" for p in row)])
    atomic_write(path, lambda f: f.write(buf.getvalue().encode()))
    print(f"probabilities of {len(volumes)} image(s) for {len(cfg.method.findings)} finding(s) -> {path}")
    return path
