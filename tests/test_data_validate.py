"""`glmae info`: a table of the cases, every problem listed on stderr naming its file, exit code 2."""

from __future__ import annotations

import json

import numpy as np
import pytest

SPACING = np.diag([1.5, 1.5, 2.0, 1.0])


def _msd(root, write_nifti, cases=3):
    """A clean MSD task: CT-like images, labels 0/1 declared as background/spleen."""
    rng = np.random.default_rng(0)
    training = []
    for i in range(cases):
        image = rng.normal(0.0, 100.0, (16, 16, 16)).astype(np.float32)
        write_nifti(root / "imagesTr" / f"case_{i:04d}.nii.gz", image, SPACING)
        write_nifti(root / "labelsTr" / f"case_{i:04d}.nii.gz", (image > 50).astype(np.uint8), SPACING)
        training.append(
            {"image": f"./imagesTr/case_{i:04d}.nii.gz", "label": f"./labelsTr/case_{i:04d}.nii.gz"}
        )
    meta = {"name": "tiny", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "spleen"}}
    (root / "dataset.json").write_text(json.dumps({**meta, "numTraining": cases, "training": training}))
    return root


def _edit_json(root, change):
    data = json.loads((root / "dataset.json").read_text())
    change(data)
    (root / "dataset.json").write_text(json.dumps(data))


def test_info_describes_a_clean_data_set(tmp_path, write_nifti, run_cli):
    root = _msd(tmp_path, write_nifti)
    code, out, err = run_cli("info", root)
    assert (code, err) == (0, "")
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("case_")]
    assert [row[0] for row in rows] == ["case_0000", "case_0001", "case_0002"]
    assert rows[0][1:6] == ["training", "1", "16x16x16", "1.5x1.5x2", "RAS"]
    assert rows[0][-2:] == ["0,", "1"]  # label values present
    assert float(rows[0][6]) < -200 and float(rows[0][7]) > 200  # intensity min / max
    assert (
        f"msd data set 'tiny' at {root}: 3 cases (3 training), 3 labelled; channels: CT; "
        "labels: 0 background, 1 spleen" in " ".join(out.split())
    )


def test_info_multichannel_nnunet(tmp_path, write_nifti, run_cli):
    for channel in range(2):
        write_nifti(
            tmp_path / "imagesTr" / f"p1_{channel:04d}.nii.gz", np.full((8, 9, 10), channel + 1.0), SPACING
        )
    label = np.zeros((8, 9, 10), np.uint8)
    label[2:4] = 2
    write_nifti(tmp_path / "labelsTr" / "p1.nii.gz", label, SPACING)
    (tmp_path / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": {"0": "T1", "1": "T2"},
                "labels": {"background": 0, "tumour": [1, 2]},
                "numTraining": 1,
                "file_ending": ".nii.gz",
            }
        )
    )
    code, out, err = run_cli("info", tmp_path)
    assert code == 0
    assert out.split("\n")[1].split() == [
        "p1",
        "training",
        "2",
        "8x9x10",
        "1.5x1.5x2",
        "RAS",
        "1",
        "2",
        "0,",
        "2",
    ]
    assert "nnunet data set" in out and "labels: 0 background; regions: tumour [1, 2]" in " ".join(
        out.split()
    )
    # each channel file is constant: a warning, not a problem
    assert err.count("glmae: warning:") == 2 and "p1_0000.nii.gz: every voxel is 1" in err


def _remove(root, write_nifti):
    (root / "imagesTr" / "case_0001.nii.gz").unlink()
    return "imagesTr/case_0001.nii.gz: file not found"


def _cut(root, write_nifti):
    path = root / "imagesTr" / "case_0001.nii.gz"
    path.write_bytes(path.read_bytes()[:-2000])
    return "imagesTr/case_0001.nii.gz: unreadable voxel data (truncated file?): Compressed file ended"


def _cut_header(root, write_nifti):
    path = root / "imagesTr" / "case_0001.nii.gz"
    path.write_bytes(path.read_bytes()[:200])
    return "imagesTr/case_0001.nii.gz: truncated file: the gzip stream ends early"


def _cut_uncompressed(root, write_nifti):
    path = write_nifti(root / "imagesTr" / "case_0001.nii", np.ones((16, 16, 16), np.float32), SPACING)
    path.write_bytes(path.read_bytes()[:5000])
    _edit_json(root, lambda d: d["training"][1].update(image="./imagesTr/case_0001.nii"))
    return "imagesTr/case_0001.nii: truncated: 5000 bytes, the header implies 16736"


def _garbage(root, write_nifti):
    (root / "imagesTr" / "case_0001.nii.gz").write_bytes(b"<html>not found</html>")
    return "imagesTr/case_0001.nii.gz: unreadable NIfTI: File"


def _slice_2d(root, write_nifti):
    write_nifti(root / "imagesTr" / "case_0001.nii.gz", np.ones((16, 16), np.float32), SPACING)
    return "imagesTr/case_0001.nii.gz: is 2D (16, 16), expected a 3D volume"


def _four_d(root, write_nifti):
    write_nifti(root / "imagesTr" / "case_0001.nii.gz", np.ones((16, 16, 16, 3), np.float32), SPACING)
    return "imagesTr/case_0001.nii.gz: is 4D (16, 16, 16, 3), expected a 3D volume"


def _label_shape(root, write_nifti):
    write_nifti(root / "labelsTr" / "case_0001.nii.gz", np.zeros((16, 16, 12), np.uint8), SPACING)
    image = f"{root}/imagesTr/case_0001.nii.gz"
    return f"labelsTr/case_0001.nii.gz: shape (16, 16, 12) differs from {image} (16, 16, 16)"


def _label_affine(root, write_nifti):
    write_nifti(
        root / "labelsTr" / "case_0001.nii.gz", np.zeros((16, 16, 16), np.uint8), np.diag([-1.5, 1.5, 2, 1])
    )
    return f"labelsTr/case_0001.nii.gz: affine differs from {root}/imagesTr/case_0001.nii.gz"


def _undeclared(root, write_nifti):
    label = np.zeros((16, 16, 16), np.uint8)
    label[0, 0, :3] = [1, 5, 7]
    write_nifti(root / "labelsTr" / "case_0001.nii.gz", label, SPACING)
    return "labelsTr/case_0001.nii.gz: label values 5, 7 not declared in `labels`"


def _duplicate(root, write_nifti):
    _edit_json(root, lambda d: d.update(numTraining=4, training=d["training"] + d["training"][1:2]))
    return "imagesTr/case_0001.nii.gz: duplicate case id 'case_0001' (the same file is listed twice)"


def _nan(root, write_nifti):
    image = np.ones((16, 16, 16), np.float32)
    image[1, 2, 3], image[4, 5, 6] = np.nan, np.inf
    write_nifti(root / "imagesTr" / "case_0001.nii.gz", image, SPACING)
    return "imagesTr/case_0001.nii.gz: 2 NaN/Inf voxels"


def _escape(root, write_nifti):
    _edit_json(root, lambda d: d["training"].append({"image": "../../etc/shadow.nii.gz"}))
    return "dataset.json: training[3].image: '../../etc/shadow.nii.gz' points outside the data set folder"


def _channels(root, write_nifti):
    write_nifti(root / "imagesTr" / "case_0001.nii.gz", np.ones((16, 16, 16, 3), np.float32), SPACING)
    _edit_json(root, lambda d: d.update(modality={"0": "FLAIR", "1": "T1w", "2": "T1gd", "3": "T2w"}))
    return "imagesTr/case_0001.nii.gz: is 4D (16, 16, 16, 3), expected a 4D image with 4 channels last"


PROBLEMS = {
    "missing file": _remove,
    "truncated .nii.gz": _cut,
    "truncated .nii.gz header": _cut_header,
    "truncated .nii": _cut_uncompressed,
    "not NIfTI": _garbage,
    "2D image": _slice_2d,
    "4D image": _four_d,
    "label shape": _label_shape,
    "label affine": _label_affine,
    "undeclared label values": _undeclared,
    "duplicate case id": _duplicate,
    "NaN/Inf": _nan,
    "path escaping the root": _escape,
}


@pytest.mark.parametrize("problem", PROBLEMS)
def test_each_problem_exits_2_naming_the_file(tmp_path, write_nifti, run_cli, problem):
    root = _msd(tmp_path, write_nifti)
    message = PROBLEMS[problem](root, write_nifti)
    code, out, err = run_cli("info", root)
    assert code == 2
    assert f"glmae: error: {root}/{message}" in err
    assert err.count("glmae: error:") == 1 and "glmae: 1 problem found" in err
    assert "Traceback" not in err
    assert "case_0000" in out  # the table is still printed


def test_several_problems_are_all_listed(tmp_path, write_nifti, run_cli):
    root = _msd(tmp_path, write_nifti, cases=3)
    messages = [_escape(root, write_nifti), _undeclared(root, write_nifti)]  # both in case_0001
    image = np.zeros((16, 16, 16), np.float32)
    image[0, 0, 0] = np.nan
    write_nifti(root / "imagesTr" / "case_0002.nii.gz", image, np.diag([1.0, 1.0, 1.0, 1.0]))
    messages += [
        "imagesTr/case_0002.nii.gz: 1 NaN/Inf voxels",
        f"labelsTr/case_0002.nii.gz: affine differs from {root}/imagesTr/case_0002.nii.gz",
    ]
    (root / "imagesTr" / "case_0000.nii.gz").unlink()
    messages.append("imagesTr/case_0000.nii.gz: file not found")
    code, out, err = run_cli("info", root)
    assert code == 2 and "Traceback" not in err
    for message in messages:
        assert f"glmae: error: {root}/{message}" in err
    assert err.count("glmae: error:") == 5 and "glmae: 5 problems found" in err


def test_malformed_json_exits_2_in_one_line(tmp_path, run_cli):
    (tmp_path / "dataset.json").write_text('{"training": [{"image": "a.nii.gz"}')
    code, out, err = run_cli("info", tmp_path)
    assert code == 2
    assert err.startswith(
        f"glmae: error: {tmp_path}/dataset.json: malformed JSON: Expecting ',' delimiter: line 1"
    )
    assert err.count("\n") == 1


def test_info_on_a_missing_path(tmp_path, run_cli):
    code, _, err = run_cli("info", tmp_path / "nowhere")
    assert (code, err) == (2, f"glmae: error: {tmp_path}/nowhere: no such file or folder\n")


def test_a_declared_size_beyond_the_available_memory_is_refused_before_reading(tmp_path, run_cli, monkeypatch):
    import gzip
    import io

    import nibabel as nib

    import glmae.data.validate

    header = nib.Nifti1Header()
    header.set_data_shape((1000, 1000, 300))  # 1.1 GiB of float32, under MAX_VOXELS; a few bytes present
    header.set_data_dtype(np.float32)
    buf = io.BytesIO()
    header.write_to(buf)
    (tmp_path / "big.nii.gz").write_bytes(gzip.compress(buf.getvalue() + bytes(1000)))
    assert glmae.data.validate.available_memory() > 0  # /proc/meminfo
    monkeypatch.setattr(glmae.data.validate, "available_memory", lambda: 2**30)
    code, _, err = run_cli("info", tmp_path / "big.nii.gz")
    assert code == 2 and "Traceback" not in err
    assert err.splitlines()[0] == (f"glmae: error: {tmp_path / 'big.nii.gz'}: the header declares 1000x1000x300 "
                                   "voxels, 1.1 GiB as float32, more than the available memory (1.0 GiB)")


def test_an_image_too_large_once_resampled_is_a_problem_before_any_voxel_is_read(tmp_path, monkeypatch):
    """A voxel size off by orders of magnitude (1.6 km here) turns 16³ voxels into billions at 2 mm."""
    import nibabel as nib

    import glmae.data.validate
    from glmae.data.validate import resampled_size_problem

    def image(affine):
        return nib.Nifti1Image(np.zeros((16, 16, 16), np.float32), np.asarray(affine, dtype=float))

    path = tmp_path / "x.nii.gz"
    assert resampled_size_problem(image(np.diag([1.5, 1.5, 2.0, 1.0])), path, (2.0, 2.0, 2.0)) is None
    problem = resampled_size_problem(image(np.diag([1.6e6, 1.5, 2.0, 1.0])), path, (2.0, 2.0, 2.0))
    assert str(problem) == (f"{path}: resampled to data.spacing 2x2x2 mm, its voxels of 1.6e+06x1.5x2 mm become "
                            "12800000x12x16 = 2,457,600,000 voxels, more than glmae holds in one volume "
                            "(2,147,483,648): is the header's voxel size right?")
    monkeypatch.setattr(glmae.data.validate, "available_memory", lambda: 2**29)
    permuted = [[0, 0, 2.0, 0], [6000.0, 0, 0, 0], [0, 1.5, 0, 0], [0, 0, 0, 1]]  # voxel axes (A, S, R)
    problem = resampled_size_problem(image(permuted), path, (2.0, 2.0, 2.0), channels=2)
    assert str(problem) == (f"{path}: resampled to data.spacing 2x2x2 mm, its voxels of 6000x1.5x2 mm become "
                            "16x48000x12 = 9,216,000 voxels, about 1.0 GiB to resample, more than the available "
                            "memory (0.5 GiB): is the header's voxel size right?")
