"""A corpus of bad inputs, built on the fly by the tests (never committed as data).

`clean_dataset(root)` writes a tiny valid MSD task: 3 CT-like cases of 16³ voxels, labels 0
(background) and 1 (spleen). Each `BadInput` damages it the way hospital exports arrive broken, in
case_0001 unless said otherwise, and states how every command that reads data must react:

- REFUSED: exit 2, one line on stderr naming the file (`where`) and the problem (`message`, in
  which `{root}` stands for the data set's folder), no traceback, nothing written;
- WARNED: the problem has an unambiguous fix or is harmless: exit 0 and a `glmae: warning:` line;
- ACCEPTED: the command never opens what is broken (pretraining and prediction do not read labels),
  or what looks odd is valid (an upper-case extension, a byte-order mark).

Running as root, file permissions do not stop reads: `permissions_enforced()` lowers the
capabilities that let root ignore them (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH) for the calling
thread while an unreadable folder is read, and restores them after.
"""

from __future__ import annotations

import contextlib
import ctypes
import gzip
import io
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


def _raw(root, edit, array=None, relative=IMAGE, payload=None):
    """case_0001's image with header fields set by `edit(header)` as written, bypassing what nibabel
    would sanitise on saving, then `payload` bytes of voxel data (default: all of them), gzipped if
    `relative` ends in .gz."""
    array = _noise(SHAPE) if array is None else array
    header = nib.Nifti1Image(array, AFFINE).header.copy()
    edit(header)
    buf = io.BytesIO()
    header.write_to(buf)
    buf.write(b"\0" * (int(header["vox_offset"]) - buf.tell()))
    data = array.tobytes(order="F")
    buf.write(data[:payload])
    (root / relative).write_bytes(gzip.compress(buf.getvalue()) if relative.endswith(".gz") else buf.getvalue())


def _fields(**values):
    def edit(header):
        for key, value in values.items():
            header[key] = value
    return edit


def _singular(header):
    header["srow_z"] = header["srow_x"]  # the third axis along the first


def _huge(header):
    header.set_data_shape((2000, 2000, 2000))  # 32 GB of float32 declared, 16 KB present


def _negative_side(root):
    """An uncompressed image whose header declares a negative side (nibabel would map a negative length)."""
    (root / IMAGE).unlink()
    _raw(root, _fields(dim=[3, 16, -16, 16, 1, 1, 1, 1]), relative="imagesTr/case_0001.nii")
    edit_json(root, lambda d: d["training"][1].update(image="./imagesTr/case_0001.nii"))


def _upper_case(suffix):
    def damage(root):
        (root / IMAGE).rename(root / f"imagesTr/case_0001{suffix}")
        edit_json(root, lambda d: d["training"][1].update(image=f"./imagesTr/case_0001{suffix}"))
    return damage


def _linked(root):
    """case_0002's image replaced by a symbolic link to case_0001's: one scan, two cases."""
    (root / "imagesTr/case_0002.nii.gz").unlink()
    (root / "imagesTr/case_0002.nii.gz").symlink_to("case_0001.nii.gz")


def _bom(root):
    (root / "dataset.json").write_bytes(b"\xef\xbb\xbf" + (root / "dataset.json").read_bytes())


def _backslash(root):
    edit_json(root, lambda d: d["training"][1].update(image="imagesTr\\case_0001.nii.gz"))


def _forms_disagree(root):
    img = nib.Nifti1Image(_noise(SHAPE), AFFINE)
    shifted = AFFINE.copy()
    shifted[0, 3] = 30.0  # 20 voxels to the right
    img.set_sform(AFFINE, code=1)
    img.set_qform(shifted, code=1)
    nib.save(img, root / IMAGE)


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
    BadInput("undeclared label values", _undeclared, LABEL, "label values 5, 7 not declared in",  # labels or checkpoint
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
    BadInput("zero affine", lambda r: _raw(r, _fields(srow_x=0, srow_y=0, srow_z=0)), IMAGE,
             "the sform affine is singular (zero or collinear axes"),
    BadInput("singular affine", lambda r: _raw(r, _singular), IMAGE, "the sform affine is singular"),
    BadInput("non-finite affine", lambda r: _raw(r, _fields(srow_y=[0, np.inf, 0, 0])), IMAGE,
             "the sform affine is not finite: [[1.5, 0.0, 0.0, 0.0], [0.0, inf, 0.0, 0.0]"),
    BadInput("huge declared shape", lambda r: _raw(r, _huge), IMAGE,
             "the header declares 2000x2000x2000 = 8,000,000,000 voxels, more than glmae reads in one file"),
    BadInput("negative side", _negative_side, "imagesTr/case_0001.nii",
             "the header declares the shape 16x-16x16: a side below 1, a corrupt header?"),
    BadInput("payload shorter than declared", lambda r: _raw(r, lambda h: None, payload=1000), IMAGE,
             "truncated file: the header implies 16384 bytes of voxel data, the file holds 1000"),
    BadInput("header cut short", lambda r: (r / IMAGE).write_bytes(gzip.compress(b"\x5c\x01" + bytes(98))), IMAGE,
             "truncated file: 100 bytes, shorter than a NIfTI header (348)"),
    BadInput("DT_BINARY", lambda r: _raw(r, _fields(datatype=1, bitpix=1), np.zeros(SHAPE, np.uint8)), IMAGE,
             "DT_BINARY, one bit per voxel, which nibabel cannot read: save the image as uint8"),
    BadInput("negative pixdim", lambda r: _raw(r, _fields(pixdim=[1, -1.5, 1.5, 2, 1, 1, 1, 1])), IMAGE,
             "pixdim[1,2,3] should be positive; setting to abs of pixdim values", dict.fromkeys(COMMANDS, WARNED)),
    BadInput("sform and qform disagree", _forms_disagree, IMAGE,
             "the sform and qform disagree by up to 30 mm (more than a voxel, 2 mm): the sform (code 1) is used",
             dict.fromkeys(COMMANDS, WARNED)),
    BadInput("upper-case extension", _upper_case(".NII.GZ"), "imagesTr/case_0001.NII.GZ", "",
             dict.fromkeys(COMMANDS, ACCEPTED)),
    BadInput("mixed-case extension", _upper_case(".Nii.Gz"), "imagesTr/case_0001.Nii.Gz", "",
             dict.fromkeys(COMMANDS, ACCEPTED)),
    BadInput("symbolic link to another case", _linked, "imagesTr/case_0002.nii.gz",
             f"is the same file as {{root}}/{IMAGE} (case 'case_0001') through a link: one scan would count as two"),
    BadInput("UTF-8 byte-order mark", _bom, "dataset.json", "", dict.fromkeys(COMMANDS, ACCEPTED)),
    BadInput("backslash paths", _backslash, "dataset.json",
             "training[1].image: 'imagesTr\\\\case_0001.nii.gz': no such file; paths are separated by '/', not '\\' "
             "(write 'imagesTr/case_0001.nii.gz')"),
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
