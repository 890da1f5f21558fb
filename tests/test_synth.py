"""Synthetic abdominal CT phantoms: determinism, anatomy, intensities, files, CLI."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from glmae.errors import InputError
from glmae.synth import ID, LABELS, case_seed, generate_case, write_dataset

SMALL = (48, 48, 32)
MANDATORY = ["spleen", "right kidney", "left kidney", "gallbladder", "liver", "stomach", "aorta",
             "inferior vena cava", "pancreas"]


@pytest.fixture(scope="module")
def full_cases():
    """The first two default-shape cases (1.5 x 1.5 x 2.0 mm) that have a gallbladder."""
    cases = []
    for seed in range(4):
        case = generate_case(seed)
        if (case.label == ID["gallbladder"]).any():
            cases.append(case)
        if len(cases) == 2:
            return cases
    raise AssertionError("fewer than 2 of 4 cases have a gallbladder")


def centroid_mm(case, name):
    """World (x, y, z) in mm of the centre of a label."""
    idx = np.argwhere(case.label == ID[name]).mean(0)
    return case.affine[:3, :3] @ idx + case.affine[:3, 3]


def test_same_seed_same_arrays_other_seed_differs():
    a, b, c = generate_case(7, SMALL), generate_case(7, SMALL), generate_case(8, SMALL)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
    assert np.array_equal(a.affine, b.affine)
    assert not np.array_equal(a.image, c.image) and not np.array_equal(a.label, c.label)


def test_types_shape_and_affine():
    case = generate_case(0, SMALL)
    assert case.image.dtype == np.int16 and case.label.dtype == np.uint8
    assert case.image.shape == case.label.shape == SMALL
    assert nib.aff2axcodes(case.affine) == ("R", "A", "S")
    np.testing.assert_allclose(np.diag(case.affine)[:3], [4.0, 4.0, 6.0])  # 192 mm field of view
    centre = case.affine @ np.r_[(np.array(SMALL) - 1) / 2, 1.0]
    np.testing.assert_allclose(centre[:3], 0.0, atol=1e-9)
    assert case.image.min() == -1024 and (case.image[0, 0, :] < -900).all()  # air outside the body


def test_default_geometry(full_cases):
    case = full_cases[0]
    assert case.image.shape == (128, 128, 96)
    np.testing.assert_allclose(np.diag(case.affine)[:3], [1.5, 1.5, 2.0])


def test_all_labels_present_at_default_shape(full_cases):
    for case in full_cases:
        assert set(np.unique(case.label)) == {0, *LABELS}


def test_mandatory_organs_at_small_shape_and_gallbladder_sometimes_absent():
    absent = 0
    for seed in range(16):
        present = set(np.unique(generate_case(seed, SMALL).label))
        assert present <= {0, *LABELS}
        assert {ID[n] for n in MANDATORY if n != "gallbladder"} <= present, seed
        absent += ID["gallbladder"] not in present
    assert 1 <= absent <= 6  # ~15 % cholecystectomy


def test_anatomy_sides(full_cases):
    for case in full_cases:
        c = {n: centroid_mm(case, n) for n in LABELS.values()}
        x, y, z = 0, 1, 2
        assert c["liver"][x] > 10 > -10 > c["spleen"][x]  # liver on the patient's right
        assert c["right kidney"][x] > 20 and c["left kidney"][x] < -20
        assert c["right kidney"][z] < c["left kidney"][z]  # the liver pushes the right kidney down
        assert c["inferior vena cava"][x] > c["aorta"][x]
        assert c["pancreas"][y] > c["aorta"][y] > c["right kidney"][y]  # pancreas anterior, kidneys posterior
        assert c["spleen"][y] < c["stomach"][y]
        assert c["liver"][z] > c["right kidney"][z] and c["gallbladder"][x] > 0
        assert c["right adrenal gland"][z] > c["right kidney"][z] and c["right adrenal gland"][x] > 0
        assert c["left adrenal gland"][x] < 0 and c["esophagus"][z] > c["stomach"][z]
        # vertebral bodies: bright bone near the midline, behind the aorta
        bone = np.argwhere(case.image > 300) * np.diag(case.affine)[:3] + case.affine[:3, 3]
        spine = bone[np.abs(bone[:, 0]) < 10]
        assert len(spine) > 1000 and np.median(spine[:, 1]) < c["aorta"][y] - 10


HU_RANGES = {  # median HU of each label: portal-venous phase
    "spleen": (90, 135), "right kidney": (110, 190), "left kidney": (110, 190), "gallbladder": (-10, 40),
    "liver": (85, 130), "aorta": (120, 200), "inferior vena cava": (90, 170),
    "portal vein and splenic vein": (100, 200), "pancreas": (70, 125), "esophagus": (20, 90),
}


def test_hu_ranges(full_cases):
    for case in full_cases:
        for name, (lo, hi) in HU_RANGES.items():
            assert lo <= np.median(case.image[case.label == ID[name]]) <= hi, name
        stomach = case.label == ID["stomach"]
        gas, fluid = stomach & (case.image < -700), stomach & (case.image > -10) & (case.image < 40)
        assert gas.sum() > 50 and fluid.sum() > 50
        assert np.argwhere(gas)[:, 1].mean() > np.argwhere(fluid)[:, 1].mean()  # gas anterior (supine)
        assert 400 < case.image.max() < 1500  # cortical bone
        body = case.image[case.label == 0]
        fat = body[(body > -150) & (body < -50)]
        assert len(fat) > 0.05 * body.size and -120 < np.median(fat) < -75


def test_liver_spleen_pancreas_not_separable_by_intensity(full_cases):
    organs = [ID["liver"], ID["spleen"], ID["pancreas"]]
    pooled = [np.concatenate([c.image[c.label == o] for c in full_cases]) for o in organs]
    q1, q3 = zip(*(np.percentile(v, [25, 75]) for v in pooled))
    assert max(q1) < min(q3)  # the three inter-quartile ranges intersect
    # nearest class median, medians taken from the very case: still far from perfect
    recalls = []
    for case in full_cases:
        values = [case.image[case.label == o].astype(float) for o in organs]
        medians = np.array([np.median(v) for v in values])
        recalls += [(np.argmin(np.abs(v[:, None] - medians), 1) == i).mean() for i, v in enumerate(values)]
    assert np.mean(recalls) < 0.65


def test_case_does_not_depend_on_case_count(tmp_path):
    one = write_dataset(tmp_path / "one", cases=1, seed=5, shape=SMALL)
    two = write_dataset(tmp_path / "two", cases=2, seed=5, shape=SMALL)
    for sub in ("imagesTr", "labelsTr"):
        a = np.asarray(nib.load(one / sub / "case_0000.nii.gz").dataobj)
        b = np.asarray(nib.load(two / sub / "case_0000.nii.gz").dataobj)
        assert np.array_equal(a, b)
    assert np.array_equal(np.asarray(nib.load(two / "imagesTr/case_0001.nii.gz").dataobj),
                          generate_case(case_seed(5, 1), SMALL).image)


def test_cli_synth_writes_msd_dataset(tmp_path, run_cli):
    out = tmp_path / "synth"
    code, _, err = run_cli("synth", out, "--cases", 2, "--shape", 48, 48, 32, "--preview")
    assert code == 0, err
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["modality"] == {"0": "CT"} and meta["numTraining"] == 2 and meta["test"] == []
    assert meta["labels"] == {"0": "background", **{str(i): n for i, n in LABELS.items()}}
    assert meta["labels"]["1"] == "spleen" and meta["labels"]["11"] == "pancreas"
    assert meta["training"] == [{"image": f"./imagesTr/case_000{i}.nii.gz", "label": f"./labelsTr/case_000{i}.nii.gz"}
                                for i in range(2)]
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == ["case_0000.nii.gz", "case_0001.nii.gz"]
    for i, item in enumerate(meta["training"]):
        case = generate_case(case_seed(0, i), SMALL)
        img, lab = nib.load(out / item["image"]), nib.load(out / item["label"])
        assert img.get_data_dtype() == np.int16 and lab.get_data_dtype() == np.uint8
        assert np.array_equal(np.asarray(img.dataobj), case.image)
        assert np.array_equal(np.asarray(lab.dataobj), case.label)
        for nii in (img, lab):
            np.testing.assert_allclose(nii.affine, case.affine)
            assert int(nii.header["qform_code"]) == 1 and int(nii.header["sform_code"]) == 1
        png = (out / "preview" / f"case_000{i}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert not list(out.rglob("*.partial"))


def test_rerun_same_recipe_resumes_and_trims(tmp_path, run_cli):
    out = tmp_path / "synth"
    assert run_cli("synth", out, "--cases", 3, "--shape", 32, 32, 24)[0] == 0
    first = (out / "imagesTr/case_0001.nii.gz").stat().st_mtime_ns
    assert run_cli("synth", out, "--cases", 2, "--shape", 32, 32, 24)[0] == 0
    assert (out / "imagesTr/case_0001.nii.gz").stat().st_mtime_ns == first  # kept, not rewritten
    assert not (out / "imagesTr/case_0002.nii.gz").exists() and not (out / "labelsTr/case_0002.nii.gz").exists()
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == 2


def test_refuses_foreign_or_different_folder(tmp_path, run_cli):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    code, _, err = run_cli("synth", foreign, "--cases", 1, "--shape", 32, 32, 24)
    assert code == 2 and "no glmae synth data set" in err and "Traceback" not in err
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    out = tmp_path / "synth"
    assert run_cli("synth", out, "--cases", 1, "--shape", 32, 32, 24)[0] == 0
    code, _, err = run_cli("synth", out, "--cases", 1, "--shape", 32, 32, 24, "--seed", 1)
    assert code == 2 and str(out) in err
    code, _, err = run_cli("synth", tmp_path / "tiny", "--cases", 1, "--shape", 8, 32, 32)
    assert code == 2 and "--shape" in err
    with pytest.raises(InputError, match="--seed"):
        write_dataset(tmp_path / "neg", cases=1, seed=-1, shape=(32, 32, 24))


def test_a_study_has_four_disjoint_sets(tmp_path):
    from glmae.synth.study import write_study

    pool, finetune = write_study(tmp_path, pool=2, train=2, val=1, test=2, shape=(16, 16, 16))
    listing = json.loads(finetune.read_text())
    sets = [{c["image"] for c in entries} for entries in
            (json.loads(pool.read_text())["training"], listing["training"], listing["validation"], listing["test"])]
    assert [len(s) for s in sets] == [2, 2, 1, 2]
    assert len(set.union(*sets)) == 7  # no case in two sets
    with pytest.raises(ValueError):
        write_study(tmp_path / "none", pool=2, train=2, val=0, test=2, shape=(16, 16, 16))
