"""Preprocessing: geometry, intensity, foreground box, the disk cache and validation while loading."""

from __future__ import annotations

import os
import pickle

import nibabel as nib
import numpy as np
import pytest

from glmae.config import DataConfig
from glmae.data.formats import Case
from glmae.data.preprocess import FORMAT_VERSION, Preprocessor, cache_root, intensity_mode
from glmae.errors import InputError

SPACING = np.diag([1.5, 1.5, 2.0, 1.0])


@pytest.fixture
def cfg(tmp_path):
    """Native grid, no intensity change, cache inside the test's folder."""
    return DataConfig(spacing=None, intensity="none", cache_dir=str(tmp_path / "cache"))


def _case(*images, label=None):
    return Case("case", tuple(images), label)


def _with(cfg, **changes):
    return DataConfig(**{**cfg.__dict__, **changes})


def _noise(shape, offset=0.0):
    """Values in [offset, offset + 1): not constant, so no 'carries no information' warning."""
    return np.random.default_rng(0).random(shape, np.float32) + offset


# ----------------------------------------------------------------------------------------------
# Geometry


LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
PIR = np.array([[0, 0, 1, 0], [-1, 0, 0, 0], [0, -1, 0, 0], [0, 0, 0, 1]], float)  # i->P, j->I, k->R


@pytest.mark.parametrize(
    "affine, codes, out_shape, marker_out",
    [
        (LPS, "LPS", (6, 7, 8), (4, 4, 3)),  # x and y flipped: (5 - 1, 6 - 2, 3)
        (PIR, "PIR", (8, 6, 7), (3, 4, 4)),  # R from k, A from flipped i, S from flipped j
    ],
)
def test_orientation_ends_up_ras(tmp_path, write_nifti, cfg, affine, codes, out_shape, marker_out):
    affine = affine.copy()
    affine[:3, 3] = [10.0, -20.0, 30.0]
    array = np.zeros((6, 7, 8), np.float32)
    array[1, 2, 3] = 5.0
    path = write_nifti(tmp_path / "in.nii.gz", array, affine)
    assert "".join(nib.aff2axcodes(affine)) == codes
    vol = Preprocessor(cfg, ("MR",))(_case(path))
    assert vol.image.shape == (1, *out_shape)
    assert "".join(nib.aff2axcodes(vol.affine)) == "RAS"
    assert np.argwhere(vol.image[0] == 5.0).tolist() == [list(marker_out)]
    # the marker sits at the same place in the world
    np.testing.assert_allclose(vol.affine @ [*marker_out, 1], affine @ [1, 2, 3, 1])
    assert vol.source["files"][0]["orientation"] == codes


def test_resampling_to_target_spacing(tmp_path, write_nifti, cfg):
    # a ramp along x (value = x in mm) resamples exactly under linear interpolation
    image = np.broadcast_to(np.arange(33, dtype=np.float32)[:, None, None], (33, 21, 11))
    label = np.zeros((33, 21, 11), np.uint8)
    label[10:20] = 1  # x in [10, 19] mm
    affine = np.diag([1.0, 2.0, 3.0, 1.0])
    case = _case(
        write_nifti(tmp_path / "im.nii.gz", image, affine),
        label=write_nifti(tmp_path / "lb.nii.gz", label, affine),
    )
    vol = Preprocessor(_with(cfg, spacing=(2.0, 1.0, 1.5)), ("MR",))(case)
    # MONAI keeps the first and last voxel centres: n_out = (n - 1) * old / new + 1
    assert vol.image.shape == (1, 17, 41, 21)
    np.testing.assert_allclose(vol.affine, np.diag([2.0, 1.0, 1.5, 1.0]), atol=1e-6)
    np.testing.assert_allclose(vol.image[0, :, 7, 9], np.arange(0, 33, 2), atol=1e-4)
    assert vol.label.dtype == np.uint8 and vol.label.shape == (17, 41, 21)
    assert np.flatnonzero(vol.label[:, 0, 0]).tolist() == [5, 6, 7, 8, 9]  # x = 10 ... 18 mm
    assert set(np.unique(vol.label).tolist()) == {0, 1}


# ----------------------------------------------------------------------------------------------
# Intensity and foreground


def test_ct_window_scaling(tmp_path, write_nifti, cfg):
    image = np.broadcast_to(np.array([-1000, -175, 37.5, 250, 1000], np.float32)[:, None, None], (5, 4, 4))
    vol = Preprocessor(_with(cfg, intensity="auto"), ("CT",))(
        _case(write_nifti(tmp_path / "ct.nii.gz", image))
    )
    np.testing.assert_allclose(vol.image[0, :, 0, 0], [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)


@pytest.mark.parametrize("layout", ["one file per channel", "one 4D file"])
def test_mri_zscore_over_nonzero_voxels_per_channel(tmp_path, write_nifti, cfg, layout):
    rng = np.random.default_rng(0)
    channels = [rng.uniform(100, 500, (10, 9, 8)), rng.uniform(2, 4, (10, 9, 8))]
    channels[0][:, :4] = 0  # background of the first channel only
    if layout == "one 4D file":
        images = [write_nifti(tmp_path / "mr.nii.gz", np.stack(channels, -1).astype(np.float32))]
    else:
        images = [
            write_nifti(tmp_path / f"mr_{c:04d}.nii.gz", a.astype(np.float32)) for c, a in enumerate(channels)
        ]
    vol = Preprocessor(_with(cfg, intensity="auto"), ("T1", "T2"))(_case(*images))
    assert vol.image.shape == (2, 10, 9, 8)
    for out, raw in zip(vol.image, channels, strict=True):
        body = raw != 0
        expected = np.where(body, (raw - raw[body].mean()) / raw[body].std(), 0.0)
        np.testing.assert_allclose(out, expected, atol=1e-4)
    assert np.all(vol.image[0, :, :4] == 0)


@pytest.mark.parametrize("crop", [False, True])
def test_foreground_box_comes_from_the_image(tmp_path, write_nifti, cfg, crop):
    image = np.full((12, 14, 9), -1000.0, np.float32)
    image[3:9, 4:12, 2:7] = 40.0  # the body
    label = np.zeros((12, 14, 9), np.uint8)
    label[0:2, 0:2, 0:2] = 1  # outside the body: must not widen the box
    label[5:7, 6:8, 3:5] = 2
    affine = SPACING.copy()
    affine[:3, 3] = [-10.0, 5.0, 7.0]
    case = _case(
        write_nifti(tmp_path / "ct.nii.gz", image, affine),
        label=write_nifti(tmp_path / "lb.nii.gz", label, affine),
    )
    vol = Preprocessor(_with(cfg, intensity="ct", crop_foreground=crop), ("CT",))(case)
    if not crop:
        assert vol.image.shape == (1, 12, 14, 9)
        assert vol.foreground_box == ((3, 9), (4, 12), (2, 7))
        np.testing.assert_allclose(vol.affine, affine)
        return
    assert vol.image.shape == (1, 6, 8, 5) and vol.label.shape == (6, 8, 5)
    assert vol.foreground_box == ((0, 6), (0, 8), (0, 5))
    assert vol.source["grid"] == {"resampled_shape": [12, 14, 9], "crop": [[3, 4, 2], [9, 12, 7]]}
    np.testing.assert_allclose(vol.affine[:3, 3], affine[:3, 3] + [3 * 1.5, 4 * 1.5, 2 * 2.0])
    np.testing.assert_allclose(vol.image, (40 + 175) / 425, atol=1e-6)
    assert np.argwhere(vol.label == 2).min(0).tolist() == [2, 2, 1] and 1 not in vol.label


# ----------------------------------------------------------------------------------------------
# Cache


@pytest.fixture
def spy(monkeypatch):
    """Counts of the (expensive) image and label computations."""
    calls = {"image": 0, "label": 0}
    for name in calls:
        original = getattr(Preprocessor, f"_{name}")

        def counted(self, *args, _original=original, _name=name):
            calls[_name] += 1
            return _original(self, *args)

        monkeypatch.setattr(Preprocessor, f"_{name}", counted)
    return calls


def test_cache_is_reused_and_invalidated(tmp_path, write_nifti, cfg, spy):
    path = write_nifti(tmp_path / "im.nii.gz", _noise((6, 6, 6)))
    case = _case(path)
    first = Preprocessor(cfg, ("CT",))(case)
    entries = sorted((tmp_path / "cache").rglob("*"))
    stamps = [p.stat().st_mtime_ns for p in entries]
    assert spy["image"] == 1 and [p.name.split(".", 1)[1] for p in entries[1:]] == ["image.npy", "json"]

    again = Preprocessor(cfg, ("CT",))(case)  # a new run: served from disk
    assert spy["image"] == 1
    assert [p.stat().st_mtime_ns for p in sorted((tmp_path / "cache").rglob("*"))] == stamps
    assert isinstance(again.image, np.memmap) and not again.image.flags.writeable
    np.testing.assert_array_equal(again.image, first.image)

    write_nifti(path, _noise((6, 6, 6), offset=2.0))  # new content
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert Preprocessor(cfg, ("CT",))(case).image.min() >= 2.0 and spy["image"] == 2

    Preprocessor(_with(cfg, ct_window=(-100.0, 100.0)), ("CT",))(case)  # a setting
    Preprocessor(_with(cfg, spacing=(2.0, 2.0, 2.0)), ("CT",))(case)
    Preprocessor(cfg, ("CT",))(case)  # back to the first settings: still cached
    assert spy["image"] == 4
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.name.endswith(".tmp")]


def test_an_interrupted_write_leaves_no_entry(tmp_path, write_nifti, cfg, spy, monkeypatch):
    case = _case(write_nifti(tmp_path / "im.nii.gz", _noise((6, 6, 6))))

    def crash(file, *args, **kwargs):
        file.write(b"\x93NUMPY half an array")
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(np, "save", crash)
        with pytest.raises(KeyboardInterrupt):
            Preprocessor(cfg, ("CT",))(case)
    assert list((tmp_path / "cache").rglob("*")) == [tmp_path / "cache" / f"v{FORMAT_VERSION}"]  # no temporary left
    vol = Preprocessor(cfg, ("CT",))(case)
    assert spy["image"] == 2 and vol.image.shape == (1, 6, 6, 6)


def test_labels_are_added_to_a_cached_image(tmp_path, write_nifti, cfg, spy):
    label = np.zeros((8, 8, 8), np.uint8)
    label[2:5] = 3
    case = _case(
        write_nifti(tmp_path / "im.nii.gz", _noise((8, 8, 8))),
        label=write_nifti(tmp_path / "lb.nii.gz", label),
    )
    cfg = _with(cfg, spacing=(2.0, 2.0, 2.0))
    pretrain = Preprocessor(cfg, ("CT",))(case, with_label=False)
    assert pretrain.label is None and spy == {"image": 1, "label": 0}
    finetune = Preprocessor(cfg, ("CT",))(case)  # image from the cache, label computed
    assert spy == {"image": 1, "label": 1}
    assert finetune.label.shape == finetune.image.shape[1:] == (4, 4, 4)
    assert np.flatnonzero(finetune.label[:, 0, 0]).tolist() == [1, 2]  # x = 2, 4 mm
    Preprocessor(cfg, ("CT",))(case)
    assert spy == {"image": 1, "label": 1}


def test_prepare_returns_memory_maps_that_pickle_as_file_names(tmp_path, write_nifti, cfg):
    cases = [
        Case(f"c{i}", (write_nifti(tmp_path / f"c{i}.nii.gz", _noise((16, 16, 16), offset=i)),), None)
        for i in range(3)
    ]
    volumes = Preprocessor(cfg, ("CT",)).prepare(cases, progress=False)
    assert [v.case_id for v in volumes] == ["c0", "c1", "c2"]
    assert all(isinstance(v.image, np.memmap) for v in volumes)
    data = pickle.dumps(volumes[2])
    assert len(data) < 4 * 16**3  # the file name travels, not the voxels
    copy = pickle.loads(data)
    assert isinstance(copy.image, np.memmap) and 2.0 <= float(copy.image.min())


def test_cache_location(monkeypatch, tmp_path):
    assert cache_root(DataConfig(cache_dir=str(tmp_path / "here"))) == tmp_path / "here"
    monkeypatch.setenv("GLMAE_CACHE_DIR", str(tmp_path / "env"))
    assert cache_root(DataConfig()) == tmp_path / "env"
    monkeypatch.delenv("GLMAE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root(DataConfig()) == tmp_path / "xdg" / "glmae"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root(DataConfig()) == tmp_path / "home" / ".cache" / "glmae"


def test_intensity_mode():
    assert intensity_mode(DataConfig(), ("CT",)) == "ct"
    assert intensity_mode(DataConfig(), ("CT", "PET")) == "mri"
    assert intensity_mode(DataConfig(), ("unknown",)) == "mri"
    assert intensity_mode(DataConfig(intensity="none"), ("CT",)) == "none"
    with pytest.raises(InputError, match="data.intensity: expected one of auto, ct, mri, none, got 'hu'"):
        intensity_mode(DataConfig(intensity="hu"), ("CT",))


# ----------------------------------------------------------------------------------------------
# Labels are never read for pretraining; inputs are validated while loading


@pytest.mark.parametrize("label", ["missing.nii.gz", "garbage.nii.gz"])
def test_without_labels_the_label_file_is_never_opened(tmp_path, write_nifti, cfg, label):
    (tmp_path / "garbage.nii.gz").write_bytes(b"not a NIfTI file at all")
    case = _case(write_nifti(tmp_path / "im.nii.gz", _noise((6, 6, 6))), label=tmp_path / label)
    vol = Preprocessor(cfg, ("CT",))(case, with_label=False)
    assert vol.label is None and vol.image.shape == (1, 6, 6, 6)
    with pytest.raises(InputError, match=label):
        Preprocessor(cfg, ("CT",))(case)


def _cut(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 3 // 4])
    return path


@pytest.mark.parametrize(
    "problem, message",
    [
        ("2D image", r"im.nii.gz: is 2D \(16, 16\), expected a 3D volume"),
        ("4D image", r"im.nii.gz: is 4D \(16, 16, 16, 2\), expected a 3D volume"),
        ("NaN", "im.nii.gz: 1 NaN/Inf voxels"),
        ("truncated", r"im.nii.gz: unreadable voxel data \(truncated file\?\): Compressed file ended"),
        ("not NIfTI", "im.nii.gz: unreadable NIfTI: File .* is not a gzip file"),
        ("label shape", r"lb.nii.gz: shape \(16, 16, 15\) differs from .*im.nii.gz \(16, 16, 16\)"),
        ("label affine", "lb.nii.gz: affine differs from .*im.nii.gz"),
        ("label values", "lb.nii.gz: label values must be whole numbers >= 0, found 0, 0.5"),
    ],
)
def test_bad_inputs_raise_naming_the_file(tmp_path, write_nifti, cfg, problem, message):
    image = _noise((16, 16, 16))
    label = np.zeros((16, 16, 16), np.float32)
    label_affine = SPACING.copy()
    if problem == "2D image":
        image = image[:, :, 0]
    elif problem == "4D image":
        image = np.stack([image, image], -1)
    elif problem == "NaN":
        image[1, 2, 3] = np.nan
    elif problem == "label shape":
        label = label[:, :, :15]
    elif problem == "label affine":
        label_affine[0, 3] += 0.75  # half a voxel
    elif problem == "label values":
        label[0, 0, 0] = 0.5
    path = write_nifti(tmp_path / "im.nii.gz", image, SPACING)
    if problem == "truncated":
        _cut(path)
    elif problem == "not NIfTI":
        path.write_bytes(b"\x00" * 400)
    case = _case(path, label=write_nifti(tmp_path / "lb.nii.gz", label, label_affine))
    with pytest.raises(InputError, match=message) as err:
        Preprocessor(cfg, ("CT",))(case)
    assert "\n" not in str(err.value)
    cached = [p.name.split(".", 1)[1] for p in (tmp_path / "cache").rglob("*.npy")]
    assert cached == (["image.npy"] if problem == "label values" else [])  # header problems stop early


def test_affine_tolerance(tmp_path, write_nifti, cfg):
    label_affine = SPACING.copy()
    label_affine[:3, 3] += 1e-4  # float32 rounding, header rewriting: accepted
    case = _case(
        write_nifti(tmp_path / "im.nii.gz", _noise((6, 6, 6)), SPACING),
        label=write_nifti(tmp_path / "lb.nii.gz", np.ones((6, 6, 6), np.uint8), label_affine),
    )
    assert Preprocessor(cfg, ("CT",))(case).label.sum() == 6**3


def test_constant_volume_warns(tmp_path, write_nifti, cfg, capsys):
    path = write_nifti(tmp_path / "blank.nii.gz", np.zeros((6, 6, 6), np.float32))
    vol = Preprocessor(_with(cfg, intensity="mri"), ("MR",))(_case(path))
    assert capsys.readouterr().err == f"glmae: warning: {path}: every voxel is 0: the image carries no information\n"
    assert vol.image.shape == (1, 6, 6, 6) and not vol.image.any()
    assert vol.foreground_box == ((0, 6), (0, 6), (0, 6))  # no body found: the whole volume
