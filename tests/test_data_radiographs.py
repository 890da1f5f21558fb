"""2D data: radiographs as PNG (8- and 16-bit), JPEG and DICOM files written here, CSV data sets
(ChestX-ray14 style and generic), patient-wise splits, and bad files refused in one line."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from glmae.data.formats import load_dataset
from glmae.data.radiographs import normalise, read_radiograph
from glmae.errors import InputError


def write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def write_dicom(path, array, photometric="MONOCHROME2", slope=1.0, intercept=0.0, frames=1):
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = array.shape[-2:]
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = np.ascontiguousarray(array, dtype=np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def gradient(dtype, high):
    return (np.arange(12 * 10).reshape(12, 10) * (high // 119)).astype(dtype)


def noise():
    return np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)  # incompressible


def test_8_and_16_bit_png_keep_their_values(tmp_path):
    eight, sixteen = gradient(np.uint8, 255), gradient(np.uint16, 65535)
    assert sixteen.max() > 255  # values only a 16-bit file holds
    np.testing.assert_array_equal(read_radiograph(write_png(tmp_path / "a.png", eight)), eight)
    np.testing.assert_array_equal(read_radiograph(write_png(tmp_path / "b.png", sixteen)), sixteen)
    rgb = np.stack([eight] * 3, axis=-1)
    np.testing.assert_array_equal(read_radiograph(write_png(tmp_path / "c.png", rgb)), eight)


def test_jpeg_is_read_as_grey(tmp_path):
    image = np.full((16, 16), 100, np.uint8)
    image[4:12, 4:12] = 200
    Image.fromarray(image).save(tmp_path / "x.jpg", quality=95)
    got = read_radiograph(tmp_path / "x.jpg")
    assert got.shape == (16, 16) and abs(got[8, 8] - 200) < 6 and abs(got[0, 0] - 100) < 6


def test_dicom_modality_lut_and_monochrome1(tmp_path):
    stored = gradient(np.uint16, 4095)
    got = read_radiograph(write_dicom(tmp_path / "a.dcm", stored, slope=2.0, intercept=-10.0))
    np.testing.assert_allclose(got, stored * 2.0 - 10.0)
    inverted = read_radiograph(write_dicom(tmp_path / "b.dcm", stored, photometric="MONOCHROME1"))
    np.testing.assert_allclose(inverted, stored.max() + stored.min() - stored.astype(float))  # bone bright


def test_normalise_maps_percentiles_to_0_1_whatever_the_bit_depth():
    eight = gradient(np.uint8, 255).astype(np.float32)
    sixteen = eight * 257  # the same image stored in 16 bits
    a, b = normalise(eight), normalise(sixteen)
    assert a.min() == 0 and a.max() == 1
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("make,message", [
    (lambda p: p.write_bytes(b""), "empty file"),
    (lambda p: p.write_bytes(b"not an image at all"), "unreadable image"),
    (lambda p: p.write_bytes(write_png(p, noise()).read_bytes()[:2000]), "truncated"),
])
def test_bad_png_files_are_one_line(tmp_path, make, message):
    path = tmp_path / "bad.png"
    make(path)
    with pytest.raises(InputError, match=message) as err:
        read_radiograph(path)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_bad_dicom_files_are_one_line(tmp_path):
    (tmp_path / "junk.dcm").write_bytes(b"\0" * 200)
    with pytest.raises(InputError, match="unreadable DICOM|without pixel data"):
        read_radiograph(tmp_path / "junk.dcm")
    good = write_dicom(tmp_path / "cut.dcm", gradient(np.uint16, 4095)).read_bytes()
    (tmp_path / "cut.dcm").write_bytes(good[:-100])
    with pytest.raises(InputError, match="cannot decode the DICOM pixel data|unreadable DICOM"):
        read_radiograph(tmp_path / "cut.dcm")
    with pytest.raises(InputError, match="2 frames"):
        read_radiograph(write_dicom(tmp_path / "multi.dcm", np.zeros((2, 8, 8)), frames=2))


def chestxray14(root, rows):
    root.mkdir(parents=True, exist_ok=True)
    for name, *_ in rows:
        write_png(root / "images" / name, gradient(np.uint8, 255))
    lines = ["Image Index,Finding Labels,Patient ID"] + [",".join(r) for r in rows]
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root / "labels.csv"


def test_chestxray14_csv(tmp_path):
    csv = chestxray14(tmp_path / "d", [("a.png", "Effusion|Cardiomegaly", "1"), ("b.png", "No Finding", "1"),
                                       ("c.png", "Mass", "2"), ("d.png", "Cardiomegaly", "3")])
    ds = load_dataset(csv)
    assert (ds.format, ds.dims, ds.modalities) == ("chestxray14", 2, ("XR",))
    assert ds.findings == ("Cardiomegaly", "Effusion", "Mass")  # ChestX-ray14's order
    by_id = {c.id: c for c in ds.cases}
    assert by_id["a"].findings == {"Effusion", "Cardiomegaly"} and by_id["b"].findings == frozenset()
    assert by_id["a"].patient == "1" and by_id["a"].images[0] == tmp_path / "d" / "images" / "a.png"
    assert len(ds.labelled) == 4


def test_generic_csv(tmp_path):
    root = tmp_path / "g"
    for name in ("x.png", "y.dcm"):
        (write_png if name.endswith("png") else write_dicom)(root / "scans" / name, gradient(np.uint16, 4095))
    (root / "list.csv").write_text("path,nodule,edema,subject\nscans/x.png,1,0,p1\nscans/y.dcm,0,1,p2\n")
    ds = load_dataset(root / "list.csv")
    assert ds.format == "csv" and ds.findings == ("nodule", "edema")
    assert [(c.id, set(c.findings), c.patient) for c in ds.cases] == [("x", {"nodule"}, "p1"), ("y", {"edema"}, "p2")]


@pytest.mark.parametrize("text,message", [
    ("path,nodule\nscans/x.png,2\n", "line 2: column 'nodule': expected 0 or 1, got '2'"),
    ("path,nodule\n../x.png,1\n", "points outside the data set folder"),
    ("file_name_column,nodule\nx.png,1\n", "CSV without an image column"),
    ("path\nx.png\n", "CSV without finding columns"),
    ("path,nodule,split\nx.png,1,train\ny.png,0,holdout\n", "line 3: split 'holdout'"),
])
def test_bad_csv_rows_are_one_line_naming_the_csv(tmp_path, run_cli, text, message):
    (tmp_path / "list.csv").write_text(text)
    code, _, err = run_cli("info", tmp_path / "list.csv")
    assert code == 2 and message in err and str(tmp_path / "list.csv") in err and "Traceback" not in err


def test_no_finding_with_findings_and_a_patient_in_two_splits_are_refused(tmp_path):
    csv = chestxray14(tmp_path / "a", [("a.png", "No Finding|Mass", "1")])
    with pytest.raises(InputError, match="'No Finding' together with findings"):
        load_dataset(csv)
    chestxray14(tmp_path / "b", [("a.png", "Mass", "1"), ("b.png", "No Finding", "1")])
    (tmp_path / "b" / "labels.csv").write_text("Image Index,Finding Labels,Patient ID,split\n"
                                               "a.png,Mass,1,training\nb.png,No Finding,1,test\n")
    with pytest.raises(InputError, match="patient '1' is in the test and training splits"):
        load_dataset(tmp_path / "b" / "labels.csv")


def test_splits_keep_a_patients_images_together(tmp_path):
    from glmae.finetune import make_splits

    rows = [(f"i{k}.png", "Mass" if k % 3 else "No Finding", f"p{k // 3}") for k in range(30)]  # 10 patients
    ds = load_dataset(chestxray14(tmp_path / "d", rows))
    patient = {c.id: c.patient for c in ds.cases}
    for seed in range(3):
        for fraction in (0.25, 1.0):
            s = make_splits(ds, fraction, seed)
            train, val = {patient[i] for i in s["train"]}, {patient[i] for i in s["val"]}
            assert not train & val and len(val) == 2  # 20% of the 10 patients
            assert len(s["train"]) == 3 * len(train)  # whole patients
        small, full = make_splits(ds, 0.25, seed)["train"], make_splits(ds, 1.0, seed)["train"]
        assert len({patient[i] for i in small}) == 2 and full[:len(small)] == small  # nested


def test_pretraining_on_a_folder_with_a_bad_radiograph_exits_2_naming_it(tmp_path, run_cli):
    write_png(tmp_path / "imgs" / "ok.png", gradient(np.uint8, 255))
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    code, _, err = run_cli("pretrain", "--config", "mae2d_tiny", "--data", tmp_path / "imgs", "--out", tmp_path / "run",
                           "--max-steps", "1")
    lines = err.strip().splitlines()
    assert code == 2 and lines[-1].startswith(f"glmae: error: {tmp_path / 'imgs' / 'broken.png'}: unreadable image")
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_info_lists_radiographs(tmp_path, run_cli):
    csv = chestxray14(tmp_path / "d", [("a.png", "Effusion", "1"), ("b.png", "No Finding", "2")])
    code, out, err = run_cli("info", csv)
    assert code == 0, err
    assert "12x10" in out and "Effusion" in out and "chestxray14 data set" in out
