"""Synthetic brain MRI phantoms (`glmae synth --kind brain`): MSD Task01 files and labels, the
contrast of each tissue and tumour region in each sequence, labels, determinism, variation."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from glmae.data.formats import brats_regions, load_dataset
from glmae.errors import InputError
from glmae.synth import KINDS, case_seed
from glmae.synth.brain import LABELS, MODALITIES, TISSUES, T, generate_case, write_dataset

FLAIR, T1, T1CE, T2 = range(4)
TWO_MM = (64, 64, 48)


@pytest.fixture(scope="module")
def cases():
    """Two default-shape (1 mm) cases."""
    return [generate_case(0), generate_case(3)]


def contrast(case) -> dict[str, np.ndarray]:
    """Median signal (4,) of each tissue and of labels 1-3, each channel divided by white matter's,
    over the region's interior (eroded by a voxel, so partial volume with neighbours is left out,
    unless too little is left)."""
    regions = {name: case.tissue == T[name] for name in TISSUES} | {f"label {v}": case.label == v for v in LABELS}
    out = {}
    for name, mask in regions.items():
        inner = ndimage.binary_erosion(mask)
        out[name] = np.median(case.image[inner if inner.sum() >= 20 else mask], 0).astype(float)
    white = out["white matter"]
    return {name: value / white for name, value in out.items()}


def test_contrast_of_every_tissue_and_tumour_region_per_sequence(cases):
    for case in cases:
        c = contrast(case)
        gm, csf, oedema, core, rim = c["grey matter"], c["CSF"], c["label 1"], c["label 2"], c["label 3"]
        normal = [c[t] for t in ("grey matter", "white matter", "deep grey matter")]
        # white matter brighter than grey matter in T1, darker in T2 and FLAIR
        assert gm[T1] < 0.85 and gm[T2] > 1.2 and gm[FLAIR] > 1.05
        # CSF dark in T1 and FLAIR (suppressed fluid), the brightest normal tissue in T2
        assert csf[T1] < 0.5 and csf[FLAIR] < 0.5 and csf[T2] > 1.2 * max(t[T2] for t in normal)
        # oedema (label 1) bright in T2 and FLAIR, dark in T1
        assert oedema[FLAIR] > 1.3 * max(t[FLAIR] for t in normal) and oedema[T2] > 1.15 * max(t[T2] for t in normal)
        assert oedema[T1] < 0.7 and oedema[T1] < min(t[T1] for t in normal)
        # enhancement only in T1ce: the rim (label 3) and the choroid plexus brighten from T1 to T1ce,
        # nothing else does (up to the sequences' own bias fields)
        assert rim[T1CE] / rim[T1] > 2.0 and rim[T1CE] > 1.3 * max(t[T1CE] for t in normal)
        assert c["choroid plexus"][T1CE] / c["choroid plexus"][T1] > 1.3
        for name in ("CSF", "grey matter", "deep grey matter", "white matter lesion", "oedema", "necrosis", "scalp"):
            assert abs(c[name][T1CE] / c[name][T1] - 1) < 0.15, name
        # the necrotic core (label 2) is dark in T1 and T1ce, bright in T2
        assert core[T1] < 0.5 and core[T1CE] < 0.6 * rim[T1CE] and core[T2] > 1.3
        # white matter lesions are FLAIR-bright like oedema, but not labelled
        assert c["white matter lesion"][FLAIR] > 1.3 and not case.label[case.tissue == T["white matter lesion"]].any()


def test_labels_are_msd_task01s_and_nested_as_a_tumour(cases):
    for case in cases:
        assert set(np.unique(case.label)) == {0, 1, 2, 3}
        assert case.label.dtype == np.uint8
        labelled = {TISSUES[t] for t in np.unique(case.tissue[case.label > 0])}
        assert labelled == {"oedema", "necrosis", "enhancing tumour"}
        # the necrotic core lies inside the enhancing rim, which lies inside the oedema (or the brain)
        core, rim = case.label == 2, case.label == 3
        shell = ndimage.binary_dilation(core) & ~core
        assert rim[shell].mean() > 0.8
        outside = ndimage.binary_dilation(core | rim) & ~(core | rim)
        assert (case.label[outside] == 1).mean() > 0.3 and (case.tissue[outside] >= T["CSF"]).all()


def test_geometry_and_channels(cases):
    case = cases[0]
    assert case.image.shape == (128, 128, 96, 4) and case.image.dtype == np.int16
    np.testing.assert_allclose(np.diag(case.affine)[:3], [1.0, 1.0, 1.0])  # 1 mm isotropic by default
    assert nib.aff2axcodes(case.affine) == ("R", "A", "S")
    air = case.image[case.tissue == T["air"]]
    assert 0 < np.median(air) < 0.1 * np.median(case.image[case.tissue == T["white matter"]])  # a noise floor


def test_same_seed_same_arrays_other_seed_differs():
    a, b, c = generate_case(7, TWO_MM), generate_case(7, TWO_MM), generate_case(8, TWO_MM)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
    assert not np.array_equal(a.label, c.label)


def centroid_mm(case, mask):
    return case.affine[:3, :3] @ np.argwhere(mask).mean(0) + case.affine[:3, 3]


def test_a_seed_has_the_same_anatomy_at_every_shape(cases):
    small = generate_case(0, TWO_MM)
    full = cases[0]
    assert np.linalg.norm(centroid_mm(small, small.label > 0) - centroid_mm(full, full.label > 0)) < 2.0
    ratio = (small.label > 0).sum() * 8 / (full.label > 0).sum()  # 2 mm voxels are 8 mm³
    assert 0.85 < ratio < 1.15


def test_tumours_vary_in_size_position_and_side():
    sample = [generate_case(seed, TWO_MM) for seed in range(8)]
    centres = np.array([centroid_mm(c, c.label > 0) for c in sample])
    volumes = np.array([(c.label > 0).sum() for c in sample])
    assert (centres[:, 0] > 5).any() and (centres[:, 0] < -5).any()  # both hemispheres
    assert centres[:, 0].std() > 8 and centres.std(0).min() > 2 and volumes.max() > 2.5 * volumes.min()
    assert all(set(np.unique(c.label)) == {0, 1, 2, 3} for c in sample)  # every region at 2 mm
    brains = [(c.tissue >= T["CSF"]).sum() for c in sample]
    assert max(brains) > 1.1 * min(brains)  # head sizes differ too


def test_write_dataset_in_msd_task01_layout(tmp_path, run_cli):
    out = tmp_path / "brain"
    code, _, err = run_cli("synth", out, "--kind", "brain", "--cases", 2, "--shape", 32, 32, 24, "--seed", 4,
                           "--preview")
    assert code == 0, err
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["modality"] == {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
    assert meta["labels"] == {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}
    for i, item in enumerate(meta["training"]):
        case = generate_case(case_seed(4, i), (32, 32, 24))
        img, lab = nib.load(out / item["image"]), nib.load(out / item["label"])
        assert img.shape == (32, 32, 24, 4) and img.get_data_dtype() == np.int16
        assert np.array_equal(np.asarray(img.dataobj), case.image)
        assert np.array_equal(np.asarray(lab.dataobj), case.label)
        png = (out / "preview" / f"case_000{i}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    dataset = load_dataset(out)
    assert dataset.modalities == MODALITIES and dataset.labels == {0: "background", **LABELS}
    assert brats_regions(dataset.labels) == ("MSD Task01", {"WT": [1, 2, 3], "TC": [2, 3], "ET": [3]})
    assert KINDS["brain"] is write_dataset
    # an abdominal data set of the same seed and shape is not this recipe
    abdomen = tmp_path / "abdomen"
    assert run_cli("synth", abdomen, "--cases", 1, "--shape", 32, 32, 24)[0] == 0
    with pytest.raises(InputError, match="glmae synth data set made with"):
        write_dataset(abdomen, cases=1, seed=0, shape=(32, 32, 24))
