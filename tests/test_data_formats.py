"""Every input format comes out as the same case list; bad JSON and escaping paths are refused."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from glmae.data.formats import Case, brats_regions, load_dataset, scan_dataset
from glmae.errors import InputError

VOLUME = np.zeros((8, 8, 8), np.float32)


def _json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def test_msd_folder_and_json(tmp_path, write_nifti):
    for name in ("a", "b"):
        write_nifti(tmp_path / "imagesTr" / f"{name}.nii.gz", VOLUME)
        write_nifti(tmp_path / "labelsTr" / f"{name}.nii.gz", VOLUME.astype(np.uint8))
    write_nifti(tmp_path / "imagesTs" / "c.nii.gz", VOLUME)
    _json(
        tmp_path / "dataset.json",
        {
            "name": "Task09_Spleen",
            "modality": {"0": "CT"},
            "labels": {"0": "background", "1": "spleen"},
            "numTraining": 2,
            "training": [
                {"image": f"./imagesTr/{n}.nii.gz", "label": f"./labelsTr/{n}.nii.gz"} for n in ("a", "b")
            ],
            "test": ["./imagesTs/c.nii.gz"],
        },
    )
    for source in (tmp_path, tmp_path / "dataset.json", str(tmp_path)):
        ds = load_dataset(source)
        assert (ds.format, ds.name, ds.root) == ("msd", "Task09_Spleen", tmp_path)
        assert ds.modalities == ("CT",)
        assert ds.labels == {0: "background", 1: "spleen"}
        assert ds.cases == [
            Case("a", (tmp_path / "imagesTr/a.nii.gz",), tmp_path / "labelsTr/a.nii.gz"),
            Case("b", (tmp_path / "imagesTr/b.nii.gz",), tmp_path / "labelsTr/b.nii.gz"),
            Case("c", (tmp_path / "imagesTs/c.nii.gz",), None, "test"),
        ]
    assert [c.id for c in ds.labelled] == ["a", "b"]
    assert [c.id for c in ds.split("test")] == ["c"]


def test_msd_multichannel_declares_channels(tmp_path):
    _json(
        tmp_path / "dataset.json",
        {
            "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
            "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
            "training": [{"image": "./imagesTr/BRATS_001.nii.gz", "label": "./labelsTr/BRATS_001.nii.gz"}],
        },
    )
    ds = load_dataset(tmp_path)
    assert ds.modalities == ("FLAIR", "T1w", "t1gd", "T2w")
    assert ds.cases[0].images == (tmp_path / "imagesTr/BRATS_001.nii.gz",)  # one 4D file
    assert ds.label_values == {0, 1, 2, 3}


MSD_TASK01 = {0: "background", 1: "edema", 2: "non-enhancing tumor", 3: "enhancing tumour"}


@pytest.mark.parametrize("labels,expected", [
    (MSD_TASK01, ("MSD Task01", {"WT": [1, 2, 3], "TC": [2, 3], "ET": [3]})),
    ({1: "Oedema", 2: "necrosis", 3: "Enhancing"}, ("MSD Task01", {"WT": [1, 2, 3], "TC": [2, 3], "ET": [3]})),
    ({0: "background", 1: "NCR", 2: "ED", 4: "ET"}, ("BraTS 2021", {"WT": [1, 2, 4], "TC": [1, 4], "ET": [4]})),
    ({0: "background", 1: "necrotic tumor core", 2: "peritumoral edematous/invaded tissue", 4: "GD-enhancing tumor"},
     ("BraTS 2021", {"WT": [1, 2, 4], "TC": [1, 4], "ET": [4]})),
    ({0: "background", 1: "NCR/NET", 2: "edema", 4: "enhancing tumor"},
     ("BraTS 2021", {"WT": [1, 2, 4], "TC": [1, 4], "ET": [4]})),
])
def test_brats_labels_map_to_whole_tumour_tumour_core_and_enhancing_tumour(labels, expected):
    assert brats_regions(labels) == expected


@pytest.mark.parametrize("labels", [
    {0: "background", 1: "spleen"},
    {0: "background", 1: "edema", 2: "enhancing tumour", 3: "non-enhancing tumor"},  # Task01's names, other values
    {0: "background", 1: "NCR", 2: "ED", 3: "ET"},  # BraTS 2021's names on MSD's values
    {0: "background", 1: "edema", 2: "non-enhancing tumor"},  # no enhancing tumour
    {0: "background", 1: "edema", 2: "non-enhancing tumor", 3: "enhancing tumour", 4: "cyst"},
])
def test_other_labels_have_no_brats_regions(labels):
    assert brats_regions(labels) is None


def test_nnunet_multichannel(tmp_path, write_nifti):
    for case in ("BraTS_001", "BraTS_002"):
        for channel in range(2):
            write_nifti(tmp_path / "imagesTr" / f"{case}_{channel:04d}.nii.gz", VOLUME)
        write_nifti(tmp_path / "labelsTr" / f"{case}.nii.gz", VOLUME.astype(np.uint8))
    write_nifti(tmp_path / "imagesTs" / "BraTS_100_0000.nii.gz", VOLUME)
    write_nifti(tmp_path / "imagesTs" / "BraTS_100_0001.nii.gz", VOLUME)
    _json(
        tmp_path / "dataset.json",
        {
            "channel_names": {"0": "T1", "1": "FLAIR"},
            "labels": {"background": 0, "whole_tumor": [1, 2, 3], "tumor_core": [2, 3], "enhancing": 3},
            "numTraining": 2,
            "file_ending": ".nii.gz",
        },
    )
    ds = load_dataset(tmp_path)
    assert (ds.format, ds.modalities) == ("nnunet", ("T1", "FLAIR"))
    assert ds.labels == {0: "background", 3: "enhancing"}
    assert ds.regions == {"whole_tumor": (1, 2, 3), "tumor_core": (2, 3)}
    assert ds.label_values == {0, 1, 2, 3}
    tr = tmp_path / "imagesTr"
    assert ds.cases[0] == Case(
        "BraTS_001",
        (tr / "BraTS_001_0000.nii.gz", tr / "BraTS_001_0001.nii.gz"),
        tmp_path / "labelsTr/BraTS_001.nii.gz",
    )
    assert [(c.id, c.split, c.label is None) for c in ds.cases] == [
        ("BraTS_001", "training", False),
        ("BraTS_002", "training", False),
        ("BraTS_100", "test", True),
    ]


def test_nnunet_problems(tmp_path, write_nifti):
    write_nifti(tmp_path / "imagesTr" / "a_0000.nii.gz", VOLUME)
    write_nifti(tmp_path / "imagesTr" / "a_0003.nii.gz", VOLUME)  # channel 3 of 1
    write_nifti(tmp_path / "imagesTr" / "b.nii.gz", VOLUME)  # no channel suffix
    _json(
        tmp_path / "dataset.json",
        {
            "channel_names": {"0": "CT"},
            "labels": {"background": 0},
            "numTraining": 1,
            "file_ending": ".nii.gz",
        },
    )
    ds, problems = scan_dataset(tmp_path)
    assert [c.id for c in ds.cases] == ["a"]
    assert [str(p).split("imagesTr/")[1] for p in problems] == [
        "a_0003.nii.gz: channel 3 but channel_names declares 1",
        "b.nii.gz: not named <case>_XXXX.nii.gz (XXXX: channel index)",
    ]
    with pytest.raises(InputError, match="a_0003.nii.gz: channel 3 but channel_names declares 1 .and 1 more"):
        load_dataset(tmp_path)
    _json(tmp_path / "dataset.json", {"channel_names": {"0": "CT"}, "labels": {"background": 0}})
    with pytest.raises(InputError, match="dataset.json: nnU-Net dataset.json has no `file_ending`"):
        load_dataset(tmp_path)


def test_datalist_relative_paths_and_validation(tmp_path, write_nifti):
    data = tmp_path / "btcv"
    for name in ("img0001", "img0002", "img0035"):
        write_nifti(data / "imagesTr" / f"{name}.nii.gz", VOLUME)
        write_nifti(data / "labelsTr" / f"{name.replace('img', 'label')}.nii.gz", VOLUME.astype(np.uint8))
    datalist = _json(
        data / "lists" / "dataset_0.json",
        {
            "labels": {"0": "background", "1": "spleen"},
            "training": [
                {"image": f"../imagesTr/{n}.nii.gz", "label": f"../labelsTr/label{n[3:]}.nii.gz"}
                for n in ("img0001", "img0002")
            ],
            "validation": [{"image": "../imagesTr/img0035.nii.gz", "label": "../labelsTr/label0035.nii.gz"}],
        },
    )
    # paths are relative to the JSON's folder, which must contain them: from lists/, ../ escapes
    with pytest.raises(
        InputError,
        match=r"dataset_0.json: training\[0\].image: '../imagesTr/img0001.nii.gz' "
        "points outside",
    ):
        load_dataset(datalist)
    text = datalist.read_text().replace("../", "./")
    datalist = data / "dataset_0.json"
    datalist.write_text(text)
    ds = load_dataset(datalist)
    assert (ds.format, ds.root, ds.modalities, ds.labels) == (
        "datalist",
        data,
        ("unknown",),
        {0: "background", 1: "spleen"},
    )
    assert [(c.id, c.split) for c in ds.cases] == [
        ("img0001", "training"),
        ("img0002", "training"),
        ("img0035", "validation"),
    ]
    assert ds.cases[2].label == data / "labelsTr" / "label0035.nii.gz"
    assert [c.id for c in ds.split("val")] == ["img0035"]
    with pytest.raises(InputError, match="unknown split 'dev'"):
        ds.split("dev")


def test_datalist_channel_lists_and_colliding_names(tmp_path):
    datalist = _json(
        tmp_path / "list.json",
        {
            "modality": {"0": "T1", "1": "T2"},
            "training": [
                {"image": ["p1/mr_0000.nii.gz", "p1/mr_0001.nii.gz"], "label": "p1/seg.nii.gz"},
                {"image": ["p2/mr_0000.nii.gz", "p2/mr_0001.nii.gz"]},
            ],
        },
    )
    ds = load_dataset(datalist)
    # both cases are called 'mr': ids fall back to paths relative to the root
    assert [c.id for c in ds.cases] == ["p1/mr", "p2/mr"]
    assert ds.cases[0].images == (tmp_path / "p1/mr_0000.nii.gz", tmp_path / "p1/mr_0001.nii.gz")
    assert ds.cases[1].label is None


def test_folder_and_glob(tmp_path, write_nifti, monkeypatch):
    write_nifti(tmp_path / "scans" / "a.nii.gz", VOLUME)
    write_nifti(tmp_path / "scans" / "sub" / "b.nii", VOLUME)
    write_nifti(tmp_path / "scans" / "._a.nii.gz", VOLUME)  # macOS resource fork: skipped
    (tmp_path / "scans" / "notes.txt").write_text("not an image")
    ds = load_dataset(tmp_path / "scans")
    assert (ds.format, ds.modalities, ds.labels) == ("images", ("unknown",), {})
    assert ds.cases == [
        Case("a", (tmp_path / "scans/a.nii.gz",), None),
        Case("b", (tmp_path / "scans/sub/b.nii",), None),
    ]
    monkeypatch.chdir(tmp_path)
    ds = load_dataset("scans/**/*.nii*")
    assert ds.root == tmp_path / "scans"
    assert [c.id for c in ds.cases] == ["a", "b"]
    assert [c.id for c in load_dataset("scans/sub/*.nii").cases] == ["b"]
    assert [c.id for c in load_dataset(tmp_path / "scans/a.nii.gz").cases] == ["a"]
    write_nifti(tmp_path / "scans" / "sub" / "a.nii.gz", VOLUME)  # name taken twice: relative ids
    assert [c.id for c in load_dataset("scans").cases] == ["a", "sub/a", "sub/b"]
    with pytest.raises(InputError, match=r"scans/\*.mha: no NIfTI images"):
        load_dataset("scans/*.mha")


@pytest.mark.parametrize(
    "entry",
    [
        {"image": "../../etc/passwd.nii.gz"},
        {"image": "./imagesTr/../../outside.nii.gz"},
        {"image": "/etc/hostname.nii.gz"},
        {"image": "./imagesTr/a.nii.gz", "label": "../labels/a.nii.gz"},
    ],
)
def test_paths_escaping_the_root_are_refused(tmp_path, entry):
    datalist = _json(tmp_path / "data" / "dataset.json", {"modality": {"0": "CT"}, "training": [entry]})
    key = "label" if "label" in entry else "image"
    with pytest.raises(InputError, match=rf"data/dataset.json: training\[0\].{key}: .* points outside"):
        load_dataset(datalist)


def test_absolute_path_inside_the_root_is_accepted(tmp_path):
    inside = tmp_path / "imagesTr" / "a.nii.gz"
    ds = load_dataset(_json(tmp_path / "list.json", {"training": [{"image": str(inside)}]}))
    assert ds.cases[0].images == (inside,)


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"training": [', "malformed JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"description": "nothing"}', "not a data set: no `training`"),
        ('{"training": []}', "empty data set"),
        ('{"training": {"image": "a.nii"}}', "`training` must be a list"),
        ('{"training": [{"image": "a.nii"}], "labels": {"0": 1.5}}', "`labels`: cannot read entry '0'"),
        (
            '{"training": [{"image": "a.nii"}], "modality": {"1": "CT"}}',
            "`modality` must map channel indices",
        ),
    ],
)
def test_malformed_json_names_the_file(tmp_path, text, message):
    path = tmp_path / "dataset.json"
    path.write_text(text)
    with pytest.raises(InputError, match=message) as err:
        load_dataset(path)
    assert str(err.value).startswith(f"{path}: ")
    assert "\n" not in str(err.value)


def test_bad_entries_and_duplicates_are_listed(tmp_path):
    path = _json(
        tmp_path / "list.json",
        {
            "training": [{"image": "a.nii.gz"}, {"label": "x.nii.gz"}, 7, {"image": []}],
            "validation": [{"image": "a.nii.gz"}],
        },
    )
    ds, problems = scan_dataset(path)
    assert [c.id for c in ds.cases] == ["a", "a"]
    messages = [str(p) for p in problems]
    assert messages[0].endswith(
        "training[1]: expected an image path or an object with an `image` path, got {'label': 'x.nii.gz'}"
    )
    assert "training[2]: expected an image path" in messages[1]
    assert "training[3].image: empty list" in messages[2]
    assert "duplicate case id 'a' (the same file is listed twice)" in messages[3]
    with pytest.raises(InputError, match=r"training\[1\]: .* \(and 3 more; `glmae info` lists them\)"):
        load_dataset(path)


def test_not_a_data_set(tmp_path, write_nifti):
    with pytest.raises(InputError, match="no such file or folder"):
        load_dataset(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(InputError, match="notes.txt: not a data set"):
        load_dataset(tmp_path / "notes.txt")
    write_nifti(tmp_path / "task" / "imagesTr" / "a.nii.gz", VOLUME)
    os.makedirs(tmp_path / "task" / "labelsTr")
    with pytest.raises(InputError, match="task: has labelsTr/ but no dataset.json"):
        load_dataset(tmp_path / "task")


def test_upper_and_mixed_case_extensions_are_images(tmp_path, write_nifti):
    for name in ("A.NII.GZ", "b.Nii.Gz", "c.NII", "d.nii.gz"):  # nibabel itself saves mixed case elsewhere
        lower = write_nifti(tmp_path / "scans" / name.lower(), np.zeros((4, 4, 4), np.float32))
        lower.rename(tmp_path / "scans" / name)
    assert [c.id for c in load_dataset(str(tmp_path / "scans")).cases] == ["A", "b", "c", "d"]  # none skipped
    single = load_dataset(str(tmp_path / "scans" / "b.Nii.Gz"))
    assert [c.id for c in single.cases] == ["b"] and single.cases[0].images[0].name == "b.Nii.Gz"


def test_a_hard_link_between_cases_is_a_duplicate(tmp_path, write_nifti):
    write_nifti(tmp_path / "scans" / "a.nii.gz", np.zeros((4, 4, 4), np.float32))
    os.link(tmp_path / "scans" / "a.nii.gz", tmp_path / "scans" / "copy.nii.gz")
    _, problems = scan_dataset(str(tmp_path / "scans"))
    assert [str(p) for p in problems] == [f"{tmp_path / 'scans' / 'copy.nii.gz'}: is the same file as "
                                          f"{tmp_path / 'scans' / 'a.nii.gz'} (case 'a') through a link: one scan "
                                          "would count as two cases"]
