import types

import numpy as np
import pytest
import torch

from glmae.methods.mae3d import MAE3D, MAE3DConfig, sample_crop
from glmae.models.mae import reconstruction_loss
from glmae.models.vit import ViTConfig


def reference_loss(pred, images, masked, p, norm_pix):
    """MSE over masked patches, written with explicit loops over patches and voxels; p an int or
    one side per axis."""
    px, py, pz = (p, p, p) if isinstance(p, int) else p
    total, count = 0.0, 0
    _, _, X, Y, Z = images.shape
    gy, gz = Y // py, Z // pz
    for n in range(images.shape[0]):
        for m, t in enumerate(masked[n].tolist()):
            i, j, k = t // (gy * gz), (t // gz) % gy, t % gz
            patch = images[n, :, i * px:(i + 1) * px, j * py:(j + 1) * py, k * pz:(k + 1) * pz].flatten()
            if norm_pix:
                patch = (patch - patch.mean()) / (patch.var() + 1e-6).sqrt()
            total += ((pred[n, m] - patch) ** 2).sum().item()
            count += patch.numel()
    return total / count


@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("patch,shape", [(2, (4, 4, 6)), ((2, 2, 3), (4, 4, 9)), ((2, 3, 1), (4, 6, 3))])
def test_loss_matches_hand_computed_reference(norm_pix, patch, shape):
    torch.manual_seed(0)
    images = torch.randn(2, 1, *shape)  # 12 tokens each
    masked = torch.tensor([[0, 3, 7], [2, 5, 11]])
    volume = 8 if isinstance(patch, int) else patch[0] * patch[1] * patch[2]
    pred = torch.randn(2, 3, volume)
    got = reconstruction_loss(pred, images, masked, patch, norm_pix)
    assert got.item() == pytest.approx(reference_loss(pred, images, masked, patch, norm_pix), rel=1e-5)


def test_2d_masked_autoencoder_trains_on_depth_1_images():
    """MAE on 2D images (patch 4x4x1): the decoder predicts 16-pixel patches, every parameter learns."""
    torch.manual_seed(0)
    model = MAE3D(ViTConfig(patch_size=(4, 4, 1), width=24, depth=2, heads=2),
                  MAE3DConfig(roi=(16, 16, 1), decoder_width=12, decoder_depth=1, decoder_heads=2))
    assert model.decoder.pred.out_features == 16
    sample = model.sampler()(fake_volume((20, 20, 1)), np.random.default_rng(0))
    assert sample["image"].shape == (1, 16, 16, 1) and len(sample["keep"]) == 4 and len(sample["masked"]) == 12
    batch = {k: torch.as_tensor(v)[None] for k, v in sample.items()}
    loss, _ = model(batch)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    shown, recon = model.reconstruction_volumes(batch["image"], batch["keep"], batch["masked"],
                                                model.reconstruct(batch["image"], batch["keep"], batch["masked"])[1])
    assert shown.shape == recon.shape == (16, 16, 1) and np.isnan(shown).sum() == 12 * 16


def test_loss_ignores_visible_patches():
    torch.manual_seed(0)
    images = torch.randn(1, 1, 4, 4, 4)  # 8 tokens
    masked = torch.tensor([[1, 2, 7]])
    pred = torch.randn(1, 3, 8)
    before = reconstruction_loss(pred, images, masked, 2)
    changed = images.clone()
    changed[0, 0, :2, :2, :2] += 5.0  # token 0 is visible
    assert reconstruction_loss(pred, changed, masked, 2) == before
    changed[0, 0, 2:, 2:, 2:] += torch.randn(2, 2, 2)  # token 7 is masked
    assert reconstruction_loss(pred, changed, masked, 2) != before


def tiny_mae():
    enc = ViTConfig(patch_size=4, width=24, depth=2, heads=2)
    cfg = MAE3DConfig(roi=(16, 16, 8), decoder_width=12, decoder_depth=1, decoder_heads=2)
    return MAE3D(enc, cfg)


def fake_volume(shape=(20, 24, 12)):
    image = np.random.default_rng(0).random((1, *shape), dtype=np.float32)
    return types.SimpleNamespace(image=image, foreground_box=((2, 18), (2, 22), (1, 11)))


def test_sample_crop_is_replayable_and_masks_three_quarters():
    model = tiny_mae()
    sample = model.sampler()
    a = sample(fake_volume(), np.random.default_rng(3))
    b = sample(fake_volume(), np.random.default_rng(3))
    assert a["image"].shape == (1, 16, 16, 8)
    assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["keep"], b["keep"])
    assert len(a["keep"]) == 8 and len(a["masked"]) == 24  # 32 tokens, ratio 0.75


def test_sample_crop_pads_a_volume_smaller_than_the_roi():
    out = sample_crop(fake_volume((10, 24, 12)), np.random.default_rng(0), cfg=tiny_mae().cfg, patch=4)
    assert out["image"].shape == (1, 16, 16, 8)
    assert (out["image"][0, :3] == 0).all()  # centred: 3 voxels of padding on each side of axis 0


def test_every_parameter_receives_a_gradient():
    torch.manual_seed(0)
    model = tiny_mae()
    sample = model.sampler()
    items = [sample(fake_volume(), np.random.default_rng(i)) for i in range(2)]
    batch = {k: torch.as_tensor(np.stack([it[k] for it in items])) for k in items[0]}
    loss, _ = model(batch)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_reconstruction_volumes_put_predictions_in_masked_patches(tmp_path):
    model = tiny_mae().eval()
    images = torch.rand(1, 1, 16, 16, 8)
    keep, masked = torch.arange(0, 32, 4)[None], torch.tensor([[i for i in range(32) if i % 4]])
    with torch.no_grad():
        _, pred, _ = model.reconstruct(images, keep, masked)
        shown, recon = model.reconstruction_volumes(images, keep, masked, pred)
    assert np.isnan(shown).mean() == pytest.approx(0.75)
    visible = ~np.isnan(shown)
    np.testing.assert_allclose(recon[visible], images[0, 0].numpy()[visible], rtol=1e-6)
    model.figure({"image": images, "keep": keep, "masked": masked}, tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 1000
