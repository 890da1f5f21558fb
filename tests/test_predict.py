import nibabel as nib
import numpy as np
import pytest
from badinputs import save, untrained_checkpoint
from segdata import CUBE, phantom, write_msd

from glmae.config import DataConfig, load_config
from glmae.data.formats import Case
from glmae.data.preprocess import Preprocessor
from glmae.errors import InputError
from glmae.predict import mask_inputs, prediction_cases, to_input_grid

# A UNETR that learns the bright cube in 40 steps: 16³ crops of 2 mm data, a 2-block ViT of width 48
CUBE_MODEL = ["encoder.width=48", "encoder.depth=2", "encoder.heads=2", "encoder.drop_path=0",
              "method.roi=[16,16,16]", "method.feature_size=8", "data.spacing=[2,2,2]", "data.num_workers=0",
              "train.batch_size=4", "train.max_steps=40", "train.log_every=10", "optim.lr=3e-3",
              "optim.warmup_steps=0"]

# (affine columns) voxel axes pointing Left-Posterior-Superior, and Posterior-Inferior-Left
ORIENTATIONS = {
    "LPS": np.array([[-1.5, 0, 0, 20], [0, -1.5, 0, 15], [0, 0, 2.5, -30], [0, 0, 0, 1]]),
    "PIL": np.array([[0, 0, -2.5, 25], [-1.5, 0, 0, 10], [0, -1.5, 0, 18], [0, 0, 0, 1]]),
}


@pytest.fixture(scope="module")
def cube_checkpoint(tmp_path_factory):
    from glmae.finetune import finetune

    root = tmp_path_factory.mktemp("cube")
    data = write_msd(root / "data", 4)
    metrics = finetune(load_config("unetr_tiny", CUBE_MODEL), str(data), root / "run")
    assert metrics["per_class"]["cube"] > 0.8
    return root / "run" / "checkpoints" / "best.pt"


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_mask_has_the_input_geometry_and_finds_the_cube(cube_checkpoint, tmp_path, run_cli, orientation):
    affine = ORIENTATIONS[orientation]
    shape = (32, 30, 14)  # at 1.5 x 1.5 x 2.5 mm, not the model's 2 mm
    image, label = phantom(shape, np.random.default_rng(7), cube_at=(12, 9, 5), cube_side=(8, 8, 5))
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "scan.nii.gz")
    code, out, err = run_cli("predict", "--checkpoint", cube_checkpoint, "--input", tmp_path / "scan.nii.gz",
                             "--out", tmp_path / "pred", "--overlay")
    assert code == 0, err
    mask = nib.load(tmp_path / "pred" / "scan.nii.gz")
    assert mask.shape == shape
    np.testing.assert_allclose(mask.affine, affine)
    found, cube = np.asarray(mask.dataobj) == CUBE, label == CUBE
    assert 2 * (found & cube).sum() / (found.sum() + cube.sum()) > 0.7
    assert (tmp_path / "pred" / "scan.png").is_file()


def test_geometry_round_trip_is_exact_without_resampling(tmp_path, write_nifti):
    """Reorientation and the foreground crop are undone voxel for voxel."""
    image, label = phantom((20, 18, 12), np.random.default_rng(1))
    affine = ORIENTATIONS["PIL"]
    files = write_nifti(tmp_path / "c.nii.gz", image, affine), write_nifti(tmp_path / "l.nii.gz", label, affine)
    case = Case("c", files[:1], files[1])
    volume = Preprocessor(DataConfig(spacing=None, crop_foreground=True, cache_dir=str(tmp_path / "cache")),
                          ("CT",))(case)
    assert volume.label.shape != label.shape  # reoriented and cropped
    mask, back_affine = to_input_grid(np.asarray(volume.label), volume)
    np.testing.assert_array_equal(mask, label)
    np.testing.assert_allclose(back_affine, affine)


def test_channel_files_are_grouped_into_cases(tmp_path, write_nifti):
    for name in ("b", "a"):
        for c in range(2):
            write_nifti(tmp_path / f"{name}_{c:04d}.nii.gz", np.zeros((4, 4, 4), np.float32))
    _, cases = prediction_cases(str(tmp_path), 2)
    assert [c.id for c in cases] == ["a", "b"]
    assert [p.name for p in cases[0].images] == ["a_0000.nii.gz", "a_0001.nii.gz"]
    with pytest.raises(InputError, match="channel files"):
        prediction_cases(str(tmp_path), 3)


def test_numbered_single_channel_scans_are_cases_not_channels(tmp_path, write_nifti):
    for i in range(3):  # `glmae synth` names: case_0000.nii.gz, case_0001.nii.gz, ...
        write_nifti(tmp_path / f"case_{i:04d}.nii.gz", np.zeros((4, 4, 4), np.float32))
    assert [c.id for c in prediction_cases(str(tmp_path), 1)[1]] == ["case_0000", "case_0001", "case_0002"]
    with pytest.raises(InputError, match="channel files"):  # a multichannel model reads them as channel files
        prediction_cases(str(tmp_path), 2)


# --- what predict must never do: destroy scans, or one mask another ---------------------------


@pytest.fixture(scope="module")
def model_checkpoint(tmp_path_factory):
    return untrained_checkpoint(tmp_path_factory.mktemp("model") / "best.pt")


def scans(folder, names, shape=(16, 16, 16)):
    """Noise volumes named `names` in `folder` (CT-like, so the corpus's model takes them)."""
    rng = np.random.default_rng(0)
    for name in names:
        save(folder, name, rng.normal(0.0, 30.0, shape).astype(np.float32))
    return folder


def contents(folder):
    """Every file below `folder` with its bytes."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(run_cli, *args, named):
    """Runs the command; asserts exit 2 and one line naming `named`, without a traceback; returns it."""
    code, _, err = run_cli("predict", *args)
    assert code == 2 and "Traceback" not in err, err
    assert len(err.splitlines()) == 1 and err.startswith(f"glmae: error: {named}: "), err
    return err


@pytest.mark.parametrize("out", ["scans", "scans/.", "scans/sub/..", "link"])
def test_out_resolving_to_the_input_folder_is_refused_and_the_scans_stay_byte_identical(
        out, model_checkpoint, tmp_path, run_cli):
    folder = scans(tmp_path / "scans", ["a.nii.gz", "b.nii.gz"])
    (folder / "sub").mkdir()
    (tmp_path / "link").symlink_to(folder)
    before = contents(tmp_path)
    err = refused(run_cli, "--checkpoint", model_checkpoint, "--input", folder, "--out", tmp_path / out,
                  named=tmp_path / out)
    assert "is the folder of --input" in err
    assert contents(tmp_path) == before


def test_out_inside_the_input_folder_is_refused_once_it_holds_inputs(model_checkpoint, tmp_path, run_cli):
    folder = scans(tmp_path / "scans", ["a.nii.gz", "b.nii.gz"])
    args = ["--checkpoint", model_checkpoint, "--input", folder, "--out", folder / "masks"]
    code, _, err = run_cli("predict", *args)  # the first run: masks/ holds no inputs yet
    assert code == 0, err
    assert sorted(p.name for p in (folder / "masks").iterdir()) == ["a.nii.gz", "b.nii.gz"]
    before = contents(tmp_path)
    err = refused(run_cli, *args, named=folder / "masks")  # masks/ now holds files the folder lists
    assert "lies inside the --input folder" in err and "holds 2 of its images" in err
    assert contents(tmp_path) == before  # no masks/masks/


def test_a_scan_is_never_overwritten_by_its_mask(model_checkpoint, tmp_path, run_cli):
    scan = scans(tmp_path / "scans", ["a.nii.gz"]) / "a.nii.gz"
    before = contents(tmp_path)
    err = refused(run_cli, "--checkpoint", model_checkpoint, "--input", scan, "--out", tmp_path / "scans",
                  named=tmp_path / "scans")
    assert "is the folder of --input" in err
    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / "a.nii.gz").write_bytes(scan.read_bytes())  # a copy of a scan where a mask goes
    before = contents(tmp_path)
    err = refused(run_cli, "--checkpoint", model_checkpoint, "--input", scan, "--out", tmp_path / "masks",
                  named=tmp_path / "masks" / "a.nii.gz")
    assert "exists and is not a glmae mask" in err
    assert contents(tmp_path) == before


def test_masks_of_an_earlier_run_are_overwritten_masks_of_other_inputs_are_not(model_checkpoint, tmp_path,
                                                                               run_cli):
    one, two = scans(tmp_path / "one", ["case.nii.gz"]), scans(tmp_path / "two", ["case.nii.gz"], (16, 16, 12))
    args = ["--checkpoint", model_checkpoint, "--out", tmp_path / "masks"]
    for _ in range(2):  # the same command twice: the second run replaces its own masks
        code, _, err = run_cli("predict", *args, "--input", one, "--overlay")
        assert code == 0 and err == "", err
    mask = nib.load(tmp_path / "masks" / "case.nii.gz")
    assert mask_inputs(tmp_path / "masks" / "case.nii.gz") == [str(one / "case.nii.gz")]
    before = contents(tmp_path)
    err = refused(run_cli, *args, "--input", two, named=tmp_path / "masks" / "case.nii.gz")
    assert f"is the mask of {one / 'case.nii.gz'}, not of {two / 'case.nii.gz'}" in err
    assert contents(tmp_path) == before and mask.shape == (16, 16, 16)


def test_an_overlay_is_never_written_over_another_file(model_checkpoint, tmp_path, run_cli):
    folder = scans(tmp_path / "scans", ["a.nii.gz"])
    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / "a.png").write_bytes(b"a photograph")
    before = contents(tmp_path)
    refused(run_cli, "--checkpoint", model_checkpoint, "--input", folder, "--out", tmp_path / "masks", "--overlay",
            named=tmp_path / "masks" / "a.png")
    assert contents(tmp_path) == before


def test_mask_names_drop_the_channel_suffix_only_for_nnunet_folders(model_checkpoint, tmp_path, run_cli):
    folder = scans(tmp_path / "imagesTs", ["a_0000.nii.gz", "b_0000.nii.gz"])
    code, out, err = run_cli("predict", "--checkpoint", model_checkpoint, "--input", folder, "--out",
                             tmp_path / "folder")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "folder").iterdir()) == ["a.nii.gz", "b.nii.gz"]
    code, out, err = run_cli("predict", "--checkpoint", model_checkpoint, "--input", folder / "a_0000.nii.gz",
                             "--out", tmp_path / "file")
    assert code == 0, err
    assert [p.name for p in (tmp_path / "file").iterdir()] == ["a_0000.nii.gz"]  # a single file keeps its name


def test_upper_and_mixed_case_names_get_their_masks_in_a_folder_and_as_a_single_file(model_checkpoint, tmp_path,
                                                                                       run_cli):
    folder = scans(tmp_path / "scans", ["a.nii.gz", "b.nii.gz", "c.nii.gz"])
    for old, new in [("a.nii.gz", "A.NII.GZ"), ("b.nii.gz", "b.Nii.Gz")]:
        (folder / old).rename(folder / new)
    code, _, err = run_cli("predict", "--checkpoint", model_checkpoint, "--input", folder, "--out", tmp_path / "masks")
    assert code == 0 and err == "", err
    masks = sorted(p.name for p in (tmp_path / "masks").iterdir())
    assert masks == ["A.nii.gz", "b.nii.gz", "c.nii.gz"]  # none skipped
    code, _, err = run_cli("predict", "--checkpoint", model_checkpoint, "--input", folder / "b.Nii.Gz",
                           "--out", tmp_path / "one")
    assert code == 0 and err == "", err
    assert [p.name for p in (tmp_path / "one").iterdir()] == ["b.nii.gz"]


def test_a_multichannel_nnunet_folder_is_refused_by_a_single_channel_model(model_checkpoint, tmp_path, run_cli):
    folder = scans(tmp_path / "imagesTs", [f"{c}_{k:04d}.nii.gz" for c in "abc" for k in range(2)])
    before = contents(tmp_path)
    err = refused(run_cli, "--checkpoint", model_checkpoint, "--input", folder, "--out", tmp_path / "masks",
                  named=folder)
    assert "nnU-Net channel files _0000, _0001 for each of 3 cases, but the model takes 1 channel" in err
    assert contents(tmp_path) == before and not (tmp_path / "masks").exists()
    code, _, err = run_cli("predict", "--checkpoint", model_checkpoint, "--input", f"{folder}/*_0000.nii.gz",
                           "--out", tmp_path / "masks")  # the way out the line names
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == ["a.nii.gz", "b.nii.gz", "c.nii.gz"]


def test_a_mask_keeps_the_input_header_codes_and_units(model_checkpoint, tmp_path, run_cli):
    affine = ORIENTATIONS["LPS"]
    img = nib.Nifti1Image(np.random.default_rng(0).normal(0, 30, (16, 16, 16)).astype(np.float32), affine)
    img.set_sform(affine, code=1)  # scanner
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    (tmp_path / "scans").mkdir()
    nib.save(img, tmp_path / "scans" / "a.nii.gz")
    code, _, err = run_cli("predict", "--checkpoint", model_checkpoint, "--input", tmp_path / "scans", "--out",
                           tmp_path / "masks")
    assert code == 0, err
    mask = nib.load(tmp_path / "masks" / "a.nii.gz")
    assert (int(mask.header["sform_code"]), int(mask.header["qform_code"])) == (1, 1)
    assert mask.header.get_xyzt_units() == ("mm", "sec")
    np.testing.assert_allclose(mask.affine, affine)
    np.testing.assert_allclose(mask.get_qform(), affine, atol=1e-5)
