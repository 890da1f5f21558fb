"""glmae synth --kind cxr: deterministic radiographs, ChestX-ray14 labels, findings a classifier sees."""

import csv

import numpy as np
import pytest
from PIL import Image

from glmae.synth import KINDS
from glmae.synth.cxr import FINDINGS


def rows(root):
    with open(root / "labels.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_files_labels_and_determinism(tmp_path, run_cli):
    code, _, err = run_cli("synth", tmp_path / "a", "--kind", "cxr", "--cases", "6", "--shape", "48", "40", "1",
                           "--seed", "3", "--preview")
    assert code == 0, err
    a = rows(tmp_path / "a")
    assert list(a[0]) == ["Image Index", "Finding Labels", "Patient ID"] and len(a) == 6
    for r in a:
        names = r["Finding Labels"].split("|")
        assert names == ["No Finding"] or set(names) <= set(FINDINGS)
        image = np.asarray(Image.open(tmp_path / "a" / "images" / r["Image Index"]))
        assert image.shape == (48, 40) and image.dtype == np.uint8 and image.std() > 10
        assert (tmp_path / "a" / "preview" / r["Image Index"]).is_file()
    KINDS["cxr"](tmp_path / "b", cases=4, seed=3, shape=(48, 40, 1))  # fewer cases: the same first four
    for r in rows(tmp_path / "b"):
        assert (tmp_path / "a" / "images" / r["Image Index"]).read_bytes() == \
            (tmp_path / "b" / "images" / r["Image Index"]).read_bytes()
    assert rows(tmp_path / "b") == a[:4]
    KINDS["cxr"](tmp_path / "c", cases=4, seed=4, shape=(48, 40, 1))
    assert rows(tmp_path / "c") != a[:4] or any(
        (tmp_path / "c" / "images" / r["Image Index"]).read_bytes() !=
        (tmp_path / "a" / "images" / r["Image Index"]).read_bytes() for r in rows(tmp_path / "c"))


def test_shape_must_be_a_depth_1_image_and_folders_of_another_recipe_are_refused(tmp_path, run_cli):
    code, _, err = run_cli("synth", tmp_path / "a", "--kind", "cxr", "--shape", "64", "64", "8")
    assert code == 2 and "depth-1" in err
    KINDS["cxr"](tmp_path / "b", cases=2, seed=0, shape=(32, 32, 1))
    code, _, err = run_cli("synth", tmp_path / "b", "--kind", "cxr", "--cases", "2", "--shape", "32", "32", "1",
                           "--seed", "1")
    assert code == 2 and "made with" in err


def test_prevalences_and_patients(tmp_path):
    """Each finding is drawn at 5-30% and a quarter of images are follow-ups of a patient."""
    KINDS["cxr"](tmp_path / "d", cases=400, seed=0, shape=(32, 32, 1))
    table = rows(tmp_path / "d")
    labels = np.array([[f in r["Finding Labels"].split("|") for f in FINDINGS] for r in table])
    assert np.all((labels.mean(0) > 0.03) & (labels.mean(0) < 0.35)), labels.mean(0)
    patients = [r["Patient ID"] for r in table]
    assert 0.65 < len(set(patients)) / len(patients) < 0.85


@pytest.mark.parametrize("name", list(FINDINGS))
def test_every_finding_is_visible_where_it_is_drawn(name):
    """The same radiograph rendered with and without a finding (same patient, same draws) differs
    inside the finding's region by far more than the noise that differs elsewhere, on 64x64 images."""
    from glmae.synth.cxr import draw_anatomy, generate_case

    for seed in range(5):
        anatomy = draw_anatomy(np.random.default_rng(seed))
        with_it = generate_case(anatomy, np.random.default_rng([seed, 1]), (64, 64, 1), findings=(name,))
        without = generate_case(anatomy, np.random.default_rng([seed, 1]), (64, 64, 1), findings=())
        assert with_it.findings == (name,) and without.findings == ()
        mask = with_it.masks[name]
        diff = np.abs(with_it.image.astype(float) - without.image.astype(float))
        assert mask.sum() >= 6  # at least a few pixels of a 64x64 image
        assert diff[mask].mean() > 12 and diff[mask].mean() > 3 * diff[~mask].mean(), (seed, diff[mask].mean())


@pytest.mark.parametrize("name", list(FINDINGS))
def test_prevalences_are_those_of_the_brief(name):
    assert 0.05 <= FINDINGS[name] <= 0.30
