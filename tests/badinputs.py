"""A corpus of bad inputs, built on the fly by the tests (never committed as data).

`clean_dataset(root)` writes a tiny valid MSD task: 3 CT-like cases of 16³ voxels, labels 0
(background) and 1 (spleen). Each `BadInput` damages it the way hospital exports arrive broken, in
case_0001 unless said otherwise, and states how every command that reads data must react:

- REFUSED: exit 2, one line on stderr naming the file (`where`) and the problem (`message`), no
  traceback, nothing written;
- WARNED: the problem has an unambiguous fix or is harmless: exit 0 and a `glmae: warning:` line;
- ACCEPTED: the command never opens what is broken (pretraining and prediction do not read labels).

Running as root, file permissions do not stop reads: `permissions_enforced()` lowers the
capabilities that let root ignore them (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH) for the calling
thread while an unreadable folder is read, and restores them after.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

COMMANDS = ("info", "pretrain", "finetune", "evaluate", "predict")
REFUSED, WARNED, ACCEPTED = "refused", "warned", "accepted"
SHAPE = (16, 16, 16)
AFFINE = np.diag([1.5, 1.5, 2.0, 1.0])
LABELS = {"0": "background", "1": "spleen"}
IMAGE, LABEL = "imagesTr/case_0001.nii.gz", "labelsTr/case_0001.nii.gz"
NO_LABELS_READ = {"pretrain": ACCEPTED, "predict": ACCEPTED}  # labels are never opened


def save(root: Path, relative: str, array, affine=AFFINE) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=float)), path)
    return path


def clean_dataset(root: Path, cases: int = 3) -> Path:
    """A valid MSD task: images of noise around 0 HU with a bright block, labels where it is bright."""
    rng = np.random.default_rng(0)
    training = []
    for i in range(cases):
        image = rng.normal(0.0, 30.0, SHAPE).astype(np.float32)
        image[4:10, 5:11, 6:12] += 200.0
        save(root, f"imagesTr/case_{i:04d}.nii.gz", image)
        save(root, f"labelsTr/case_{i:04d}.nii.gz", (image > 100).astype(np.uint8))
        training.append({"image": f"./imagesTr/case_{i:04d}.nii.gz", "label": f"./labelsTr/case_{i:04d}.nii.gz"})
    meta = {"name": "tiny", "modality": {"0": "CT"}, "labels": LABELS, "numTraining": cases, "training": training}
    (root / "dataset.json").write_text(json.dumps(meta, indent=1))
    return root


def edit_json(root: Path, change: Callable[[dict], None]) -> None:
    data = json.loads((root / "dataset.json").read_text())
    change(data)
    (root / "dataset.json").write_text(json.dumps(data, indent=1))


@dataclass(frozen=True)
class BadInput:
    name: str
    damage: Callable[[Path], None]  # damages the clean data set at root
    where: str  # the file the message names, relative to root (a prefix when it may be any case)
    message: str  # what the line says about it
    outcomes: dict[str, str] = field(default_factory=dict)  # command -> outcome; others REFUSED
    locked: bool = False  # run with file permissions enforced

    def outcome(self, command: str) -> str:
        return self.outcomes.get(command, REFUSED)


def _noise(shape) -> np.ndarray:
    """Not constant, so that no 'carries no information' warning joins the line under test."""
    return np.random.default_rng(1).normal(0.0, 30.0, shape).astype(np.float32)


def _cut(root, relative, keep):
    path = root / relative
    data = path.read_bytes()
    path.write_bytes(data[: keep(len(data))])


def _image(array):
    return lambda root: save(root, IMAGE, array)


def _label(array, affine=AFFINE):
    return lambda root: save(root, LABEL, array, affine)


def _nan(root):
    image = _noise(SHAPE)
    image[1, 2, 3], image[4, 5, 6] = np.nan, np.inf
    save(root, IMAGE, image)


def _undeclared(root):
    label = np.zeros(SHAPE, np.uint8)
    label[0, 0, :3] = [1, 5, 7]  # lone voxels: resampling could drop them, the check reads the file
    save(root, LABEL, label)


def _smaller(root):
    image = np.full((8, 8, 8), -50.0, np.float32)
    image[2:5, 2:5, 2:5] = 200.0
    save(root, IMAGE, image)
    save(root, LABEL, (image > 100).astype(np.uint8))


def _wrong_extension(root):
    (root / IMAGE).rename(root / "imagesTr/case_0001.mha")
    edit_json(root, lambda d: d["training"][1].update(image="./imagesTr/case_0001.mha"))


def _misnamed(root):
    """An uncompressed NIfTI named .nii.gz."""
    save(root, "plain.nii", _noise(SHAPE))
    (root / "plain.nii").rename(root / IMAGE)


def _escape(root):
    save(root.parent, "outside.nii.gz", _noise(SHAPE))  # exists and is readable
    edit_json(root, lambda d: d["training"].append({"image": "../outside.nii.gz"}))


def _fifo(root):
    (root / IMAGE).unlink()
    os.mkfifo(root / IMAGE)  # opening it for reading would block forever


def _unreadable_folder(root):
    os.chmod(root / "imagesTr", 0)


CORPUS = [
    BadInput("empty file", lambda r: (r / IMAGE).write_bytes(b""), IMAGE, "empty file (0 bytes)"),
    BadInput("truncated .nii.gz", lambda r: _cut(r, IMAGE, lambda n: n * 3 // 4), IMAGE,
             "unreadable voxel data (truncated file?)"),
    BadInput("truncated header", lambda r: _cut(r, IMAGE, lambda n: 200), IMAGE,
             "truncated file: the gzip stream ends early"),
    BadInput("wrong extension", _wrong_extension, "imagesTr/case_0001.mha",
             "unsupported format: only NIfTI (.nii, .nii.gz) is read"),
    BadInput("uncompressed named .nii.gz", _misnamed, IMAGE, "rename it to .nii if it is an uncompressed NIfTI"),
    BadInput("2D image", _image(_noise((16, 16))), IMAGE, "is 2D (16, 16), expected a 3D volume"),
    BadInput("4D image", _image(_noise((*SHAPE, 3))), IMAGE,
             "is 4D (16, 16, 16, 3), expected a 3D volume"),
    BadInput("label shape", _label(np.zeros((16, 16, 12), np.uint8)), LABEL,
             "shape (16, 16, 12) differs from", NO_LABELS_READ),
    BadInput("label affine", _label(np.zeros(SHAPE, np.uint8), np.diag([-1.5, 1.5, 2.0, 1.0])), LABEL,
             "affine differs from", NO_LABELS_READ),
    BadInput("undeclared label values", _undeclared, LABEL, "label values 5, 7 not declared in `labels`",
             NO_LABELS_READ),
    BadInput("NaN/Inf voxels", _nan, IMAGE, "2 NaN/Inf voxels"),
    BadInput("constant volume", _image(np.zeros(SHAPE, np.float32)), IMAGE,
             "every voxel is 0: the image carries no information", dict.fromkeys(COMMANDS, WARNED)),
    BadInput("smaller than the ROI", _smaller, IMAGE,
             "8x8x8 voxels after preprocessing, smaller than method.roi 16x16x16: padded",
             {**dict.fromkeys(COMMANDS, WARNED), "info": ACCEPTED}),
    BadInput("missing image", lambda r: (r / IMAGE).unlink(), IMAGE, "file not found"),
    BadInput("missing label", lambda r: (r / LABEL).unlink(), LABEL, "file not found", NO_LABELS_READ),
    BadInput("malformed JSON", lambda r: _cut(r, "dataset.json", lambda n: n // 2), "dataset.json",
             "malformed JSON"),
    BadInput("path escaping the root", _escape, "dataset.json",
             "training[3].image: '../outside.nii.gz' points outside the data set folder"),
    BadInput("FIFO instead of a file", _fifo, IMAGE, "not a regular file"),
    BadInput("unreadable folder", _unreadable_folder, "imagesTr/case_000", "cannot access: Permission denied",
             locked=True),
]


# ----------------------------------------------------------------------------------------------
# Commands sized for the corpus: 16³ volumes on their native grid, a 2-block ViT of width 48, in
# float32 (bfloat16 autocast only pays off on larger tensors)

COMMON = ["encoder.width=48", "encoder.depth=2", "encoder.heads=2", "method.roi=[16,16,16]", "data.spacing=null",
          "data.num_workers=0", "train.log_every=1", "train.amp=off"]
PRETRAIN = COMMON + ["method.decoder_width=48", "method.decoder_depth=1", "method.decoder_heads=2"]
FINETUNE = COMMON + ["method.feature_size=8", "method.sw_batch_size=1", "encoder.drop_path=0"]


def sets(overrides: list[str]) -> list[str]:
    """["a=1", "b=2"] -> ["--set", "a=1", "--set", "b=2"]."""
    return [a for o in overrides for a in ("--set", o)]


def untrained_checkpoint(path: Path) -> Path:
    """A fine-tuning checkpoint (fresh weights) for the corpus's data, as `glmae finetune` writes them."""
    import torch

    from glmae import config as cfglib
    from glmae.config import load_config
    from glmae.engine import checkpoint
    from glmae.methods import SEGMENTATION

    labels = "{" + ", ".join(f"{k}: {v}" for k, v in LABELS.items()) + "}"
    cfg = load_config("unetr_tiny", FINETUNE + [f"method.labels={labels}", "data.intensity=ct"])
    torch.manual_seed(0)
    model = SEGMENTATION[cfg.method.name](cfg.encoder, cfg.method)
    checkpoint.save({"kind": "finetune", "config": cfglib.to_dict(cfg), "step": 1, "model": model.state_dict()}, path)
    return path


# ----------------------------------------------------------------------------------------------
# File permissions for root

_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 1, 2
_CAP_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _capabilities(change: Callable[[int], int] | None = None) -> int:
    """The calling thread's effective capabilities (low word), after applying `change` to them."""
    libc = ctypes.CDLL(None, use_errno=True)
    header, data = _CapHeader(_CAP_VERSION_3, 0), (_CapData * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    if change is not None:
        data[0].effective = change(data[0].effective)
        if libc.capset(ctypes.byref(header), data) != 0:
            raise OSError(ctypes.get_errno(), "capset")
    return data[0].effective


@contextlib.contextmanager
def permissions_enforced():
    """Inside the block, file permissions apply to this thread even as root. Yields False where that
    cannot be arranged (root on a system without capget/capset)."""
    if os.geteuid() != 0:
        yield True
        return
    bypass = (1 << _CAP_DAC_OVERRIDE) | (1 << _CAP_DAC_READ_SEARCH)
    try:
        saved = _capabilities()
        _capabilities(lambda caps: caps & ~bypass)
    except (OSError, AttributeError):
        yield False
        return
    try:
        yield True
    finally:
        _capabilities(lambda caps: saved)
