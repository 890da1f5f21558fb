import nibabel as nib
import numpy as np
import pytest
from segdata import CUBE, phantom, write_msd

from glmae.config import DataConfig, load_config
from glmae.data.formats import Case
from glmae.data.preprocess import Preprocessor
from glmae.errors import InputError
from glmae.predict import prediction_cases, to_input_grid

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
    cases = prediction_cases(str(tmp_path), 2)
    assert [c.id for c in cases] == ["a", "b"]
    assert [p.name for p in cases[0].images] == ["a_0000.nii.gz", "a_0001.nii.gz"]
    with pytest.raises(InputError, match="channel files"):
        prediction_cases(str(tmp_path), 3)


def test_numbered_single_channel_scans_are_cases_not_channels(tmp_path, write_nifti):
    for i in range(3):  # `glmae synth` names: case_0000.nii.gz, case_0001.nii.gz, ...
        write_nifti(tmp_path / f"case_{i:04d}.nii.gz", np.zeros((4, 4, 4), np.float32))
    assert [c.id for c in prediction_cases(str(tmp_path), 1)] == ["case_0000", "case_0001", "case_0002"]
    with pytest.raises(InputError, match="channel files"):  # a multichannel model reads them as channel files
        prediction_cases(str(tmp_path), 2)
