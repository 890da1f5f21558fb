"""GMIM: samples, intensity augmentation, token masking hooks, the Siamese losses, and the CLI from
pre-training on phantoms to fine-tuning in MONAI's Swin-UNETR."""

import json
import math
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import SwinUNETR as MonaiSwinUNETR

from glmae.config import load_config
from glmae.engine import checkpoint
from glmae.engine.logger import read_log
from glmae.errors import InputError
from glmae.finetune import load_init
from glmae.methods.gmim import GMIM, GMIMConfig, adjust_intensity, intensity_params, redundancy_loss, sample_gmim
from glmae.methods.segmentation import Segmenter
from glmae.models.swin import SwinConfig
from glmae.models.vit import ViTConfig

ENCODER = SwinConfig(feature_size=12, window=4)
ROI = (64, 32, 32)  # the smallest Swin crop: 2 last-stage tokens
LEVELS = [(32, 16, 16), (32, 16, 16), (16, 8, 8), (8, 4, 4)]


def volume(shape=(70, 40, 36), seed=0):
    """Smooth blobs plus a noisy corner, so the cells' entropies differ."""
    rng = np.random.default_rng(seed)
    image = F.avg_pool3d(torch.from_numpy(rng.random((1, 1, *shape), dtype=np.float32)), 5, 1, 2)[0].numpy()
    image[:, :20, :20, :20] = rng.random((1, 20, 20, 20))
    return types.SimpleNamespace(image=image, foreground_box=tuple((0, s) for s in shape), intensity="ct")


def batch_of(model, n=2, seed=10):
    sample = model.sampler()
    items = [sample(volume(seed=i), np.random.default_rng(seed + i)) for i in range(n)]
    return {k: torch.as_tensor(np.stack([it[k] for it in items])) for k in items[0]}


def swin_model(**kw):
    torch.manual_seed(0)
    return GMIM(ENCODER, GMIMConfig(roi=ROI, **kw))


def upsampled(mask: torch.Tensor, size) -> torch.Tensor:
    """(N, *grid) token mask -> (N, 1, *size) voxel mask by repeating each token's value."""
    for axis, (n, s) in enumerate(zip(mask.shape[1:], size), 1):
        mask = mask.repeat_interleave(s // n, dim=axis)
    return mask[:, None]


# --- samples ----------------------------------------------------------------------------------


def z_scored_crop(seed=0):
    """(1, 32, 32, 32) z-scored crop: cells of 8³ voxels alternately of sd 0.5 and 2, the whole
    crop then z-scored as MRI is."""
    rng = np.random.default_rng(seed)
    x, y, z = np.indices((32, 32, 32)) // 8
    wide = (x + y + z) % 2 == 1
    image = rng.normal(0, np.where(wide, 2.0, 0.5))
    return ((image - image.mean()) / image.std())[None].astype(np.float32), wide


def test_gmims_entropy_on_z_scored_mri_uses_the_crops_percentiles_not_the_ct_range():
    from glmae.methods.gmim import entropy_range
    from glmae.models.grid_masking import cell_entropies

    image, wide = z_scored_crop()
    cfg = GMIMConfig()
    ranges = entropy_range(image, "mri", cfg)
    assert ranges.shape == (1, 2) and ranges[0].tolist() == pytest.approx(np.percentile(image, [0.5, 99.5]))
    assert entropy_range(image, "ct", cfg) == (0.0, 1.0)
    in_end_bins = lambda lo, hi: np.mean((image <= lo + (hi - lo) / 256) | (image >= hi - (hi - lo) / 256))  # noqa
    assert in_end_bins(*ranges[0]) < 0.02 and in_end_bins(0.0, 1.0) > 0.6  # [0, 1] clips most voxels
    wide_cell = wide[::8, ::8, ::8].ravel()  # patch 2, grid 4: a cell is 8³ voxels
    mri, ct = cell_entropies(image, 4, 2, 256, ranges), cell_entropies(image, 4, 2, 256, (0.0, 1.0))
    assert mri[wide_cell].min() > mri[~wide_cell].max()  # the spread-out cells hold more information
    assert ct[wide_cell].max() < ct[~wide_cell].min()  # clipped into the end bins, they seemed to hold less


def test_a_sample_of_an_mri_volume_picks_its_grid_on_the_percentile_range(monkeypatch):
    from glmae.models import grid_masking

    image, _ = z_scored_crop(1)
    mri = types.SimpleNamespace(image=image, foreground_box=((0, 32),) * 3, intensity="mri")
    seen = []
    choose = grid_masking.choose_grid
    monkeypatch.setattr(grid_masking, "choose_grid", lambda *a: seen.append(np.asarray(a[4])) or choose(*a))
    cfg = GMIMConfig(roi=(32, 32, 32), flip_prob=0.0)
    sample_gmim(mri, np.random.default_rng(0), cfg=cfg, patch=2, levels=[(16, 16, 16)])
    sample_gmim(types.SimpleNamespace(**{**vars(mri), "intensity": "ct"}), np.random.default_rng(0), cfg=cfg,
                patch=2, levels=[(16, 16, 16)])
    assert seen[0].shape == (1, 2) and seen[0][0].tolist() == pytest.approx(np.percentile(image, [0.5, 99.5]))
    assert seen[1].tolist() == [0.0, 1.0]


def test_samples_carry_a_mask_per_level_and_replay_from_their_seed():
    cfg = GMIMConfig(roi=ROI, hierarchical_prob=1.0)
    a = sample_gmim(volume(), np.random.default_rng(3), cfg=cfg, patch=2, levels=LEVELS)
    b = sample_gmim(volume(), np.random.default_rng(3), cfg=cfg, patch=2, levels=LEVELS)
    assert a["image"].shape == a["target"].shape == (1, *ROI) and a["image"].dtype == np.float32
    assert [a[f"mask{k}"].shape for k in range(4)] == LEVELS and int(a["grid"]) in (4, 8, 16)
    assert all(a[f"mask{k}"].any() for k in range(4))  # every level fired (probability 1)
    assert abs(a["mask1"].mean() - a["mask0"].mean() / 2) < 0.01  # the ratio halves, up to rounding
    for key in a:
        assert np.array_equal(a[key], b[key]), key
    c = sample_gmim(volume(), np.random.default_rng(4), cfg=cfg, patch=2, levels=LEVELS)
    assert not np.array_equal(a["mask0"], c["mask0"])


def test_the_target_is_the_same_crop_with_only_its_intensities_changed():
    off = GMIMConfig(roi=ROI, gamma_prob=0.0, shift_prob=0.0, noise_prob=0.0)
    out = sample_gmim(volume(), np.random.default_rng(5), cfg=off, patch=2, levels=LEVELS)
    assert np.array_equal(out["image"], out["target"])
    on = GMIMConfig(roi=ROI, gamma_prob=1.0, shift_prob=1.0, noise_prob=1.0)
    out = sample_gmim(volume(), np.random.default_rng(5), cfg=on, patch=2, levels=LEVELS)
    assert not np.array_equal(out["image"], out["target"])


def test_intensity_augmentation_by_hand():
    image = np.linspace(0, 1, 64, dtype=np.float32).reshape(1, 4, 4, 4)  # min 0, max 1
    np.testing.assert_allclose(adjust_intensity(image, 2.0, 0.0, None, 0.1), image**2, atol=1e-6)
    np.testing.assert_allclose(adjust_intensity(image * 0.5 + 0.2, 2.0, 0.0, None, 0.1),
                               (image**2) * 0.5 + 0.2, atol=1e-6)  # gamma on the crop's own range
    np.testing.assert_allclose(adjust_intensity(image, 1.0, -0.3, None, 0.1), image - 0.3, atol=1e-7)
    big = np.zeros((1, 32, 32, 32), dtype=np.float32)
    noisy = adjust_intensity(big, 1.0, 0.0, 7, 0.1)
    assert np.array_equal(noisy, adjust_intensity(big, 1.0, 0.0, 7, 0.1))
    assert abs(noisy.std() - 0.1) < 0.002 and abs(noisy.mean()) < 0.002


def test_augmentations_are_drawn_with_their_probabilities_and_ranges():
    """4000 draws: each frequency within 4 sigma = 4 sqrt(p (1 - p) / 4000) (<= 0.032) of p."""
    cfg = GMIMConfig()
    draws = [intensity_params(np.random.default_rng(s), cfg) for s in range(4000)]
    gammas = np.array([d[0] for d in draws])
    shifts = np.array([d[1] for d in draws])
    noise = np.array([d[2] is not None for d in draws])
    for fired, p in ((gammas != 1.0, 0.7), (shifts != 0.0, 0.4), (noise, 0.5)):
        assert abs(fired.mean() - p) < 4 * math.sqrt(p * (1 - p) / 4000)
    assert gammas[gammas != 1].min() >= 0.7 and gammas.max() <= 1.5
    assert np.abs(shifts).max() <= 0.4


# --- losses -----------------------------------------------------------------------------------


def reference_redundancy(a, b, off_diagonal, eps=1e-5):
    """Loops: per sample, standardise each feature over the tokens, c_ij = mean_l a_li b_lj."""
    n, length, dim = a.shape
    total = 0.0
    for s in range(n):
        za, zb = [], []
        for z, out in ((a[s], za), (b[s], zb)):
            for i in range(dim):
                column = [float(z[l, i]) for l in range(length)]
                mean = sum(column) / length
                var = sum((v - mean) ** 2 for v in column) / length
                out.append([(v - mean) / math.sqrt(var + eps) for v in column])
        loss = 0.0
        for i in range(dim):
            for j in range(dim):
                c = sum(za[i][l] * zb[j][l] for l in range(length)) / length
                loss += (1 - c) ** 2 if i == j else off_diagonal * c**2
        total += loss
    return total / n


def test_redundancy_loss_matches_hand_written_reference():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    b = a + 0.5 * torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    for weight in (0.005, 1.0):
        got = redundancy_loss(a, b, weight).item()
        assert got == pytest.approx(reference_redundancy(a.numpy(), b.numpy(), weight), rel=1e-10)
    # identical, decorrelated features: c = identity, loss 0
    eye = torch.tensor([[[1.0, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]]], dtype=torch.float64)
    assert redundancy_loss(eye, eye, 0.005, eps=0.0).item() == pytest.approx(0.0, abs=1e-12)


def test_target_branch_gets_no_gradient_and_every_parameter_does():
    model = swin_model()
    batch = batch_of(model)
    batch["image"].requires_grad_(True)
    batch["target"].requires_grad_(True)
    loss, logs = model(batch)
    loss.backward()
    assert batch["target"].grad is None
    assert batch["image"].grad is not None and batch["image"].grad.abs().sum() > 0
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing
    assert set(logs) == {"loss_rec", "loss_rr", "grid"}
    assert loss.item() == pytest.approx(logs["loss_rec"].item() + 0.005 * logs["loss_rr"].item(), rel=1e-6)


# --- masking inside the encoder ---------------------------------------------------------------


@pytest.mark.parametrize("arch", ["swin", "vit"])
def test_level0_zeroes_the_embedded_tokens(arch):
    """With the patch embedding's bias at 0, zeroing an embedded token = zeroing its voxels (for the
    ViT: a masked token keeps its position embedding, as does a patch of zeros)."""
    torch.manual_seed(0)
    if arch == "swin":
        model = swin_model()
        model.encoder.patch_embed.proj.bias.data.zero_()
    else:
        model = GMIM(ViTConfig(patch_size=8, width=24, depth=2, heads=2), GMIMConfig(roi=ROI, hierarchical_prob=0))
        model.encoder.patch_embedding.patch_embeddings.bias.data.zero_()
    model.eval()
    batch = batch_of(model, n=1)
    masks = [batch[f"mask{k}"] for k in range(len(model.levels))]
    masks[1:] = [torch.zeros_like(m) for m in masks[1:]]
    images = batch["image"]
    with torch.no_grad():
        masked = model.features(images, masks)
        by_voxels = model.features(images * ~upsampled(masks[0], ROI))
        unmasked = model.features(images)
    torch.testing.assert_close(masked, by_voxels, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(masked, unmasked, atol=1e-3)


def test_deeper_levels_act_and_silent_levels_change_nothing():
    model = swin_model().eval()
    images = batch_of(model, n=1)["image"]
    silent = [torch.zeros(1, *grid, dtype=torch.bool) for grid in LEVELS]
    with torch.no_grad():
        plain = model.features(images)
        torch.testing.assert_close(model.features(images, silent), plain, rtol=0, atol=0)
        for level in (1, 2, 3):
            masks = list(silent)
            masks[level] = torch.rand(1, *LEVELS[level]) < 0.3
            assert not torch.allclose(model.features(images, masks), plain, atol=1e-4), level


def test_masked_only_reconstruction_counts_the_voxels_under_any_masked_token():
    model = swin_model(rec_masked_only=True, hierarchical_prob=1.0).eval()
    batch = batch_of(model)
    masks = [batch[f"mask{k}"] for k in range(4)]
    with torch.no_grad():
        _, logs = model(batch)
        pred = model.decoder(model.features(batch["image"], masks))
    voxels = torch.stack([upsampled(m, ROI) for m in masks]).any(0)
    expected = ((pred - batch["image"]) ** 2)[voxels].mean()
    assert logs["loss_rec"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert 0.3 < voxels.float().mean() < 0.9


def test_configurations_that_cannot_work_are_refused():
    with pytest.raises(InputError, match="multiples of 32"):
        GMIM(ENCODER, GMIMConfig(roi=(64, 64, 48)))
    with pytest.raises(InputError, match="at least two"):
        GMIM(ENCODER, GMIMConfig(roi=(32, 32, 32)))
    with pytest.raises(InputError, match="hierarchical"):
        GMIM(ViTConfig(patch_size=8, width=24, depth=2, heads=2), GMIMConfig(roi=ROI))


def test_figure_shows_the_crop(tmp_path):
    model = swin_model().eval()
    with torch.no_grad():
        model.figure(batch_of(model, n=1), tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 1000


def test_the_vit_variant_initialises_unetr_tiny(tmp_path):
    cfg = load_config("gmim_vit_tiny")
    model = GMIM(cfg.encoder, cfg.method)
    assert model.levels == [(8, 8, 8)] and len(model.decoder) == 3 * 4 + 1  # patch 8: three up-samplings
    weights = model.export_encoder.state_dict()
    path = tmp_path / "encoder.safetensors"
    checkpoint.save_encoder(weights, {"encoder": cfg.encoder.__dict__, "method": "gmim"}, path)
    ft = load_config("unetr_tiny")
    segmenter = Segmenter(ft.encoder, ft.method.__class__(labels={0: "bg", 1: "x"}))
    report = load_init(segmenter.net.encoder, str(path), ft)
    assert f"loaded {len(weights)} tensors, missing 0, unexpected 0" in report


# --- the command line -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    from glmae.synth import write_dataset

    return write_dataset(tmp_path_factory.mktemp("ph") / "data", cases=3, seed=1, shape=(64, 64, 48))


# gmim_tiny / swin_unetr_tiny at feature size 12: ~1 s per step on 2 idle cores
SMALL = ["encoder.feature_size=12", "data.num_workers=0", "train.log_every=1"]


def sets(overrides):
    return [a for o in overrides for a in ("--set", o)]


@pytest.mark.slow
def test_pretrain_lowers_the_loss_and_the_encoder_fine_tunes_in_swin_unetr(phantoms, tmp_path, run_cli):
    pre = tmp_path / "pre"
    code, _, err = run_cli("pretrain", "--config", "gmim_tiny", "--data", phantoms, "--out", pre, "--max-steps", 30,
                           *sets(SMALL + ["train.batch_size=1", "optim.warmup_steps=5"]))
    assert code == 0, err
    records = read_log(pre / "log.jsonl")
    assert all(np.isfinite(r[k]) for r in records for k in ("loss", "loss_rec", "loss_rr", "grid", "lr"))
    for key in ("loss", "loss_rec"):
        values = [r[key] for r in records]
        assert np.mean(values[-5:]) < 0.9 * np.mean(values[:5]), (key, values)
    assert (pre / "figures" / "recon_000030.png").is_file()

    weights, meta = checkpoint.load_encoder(pre / "encoder.safetensors")
    assert meta["method"] == "gmim" and meta["encoder"]["arch"] == "swin"
    monai = MonaiSwinUNETR(in_channels=1, out_channels=14, feature_size=12, window_size=4)
    monai.swinViT.load_state_dict(weights, strict=True)

    ft = tmp_path / "ft"
    code, _, err = run_cli("finetune", "--config", "swin_unetr_tiny", "--data", phantoms, "--out", ft,
                           "--init", pre / "encoder.safetensors", "--max-steps", 3,
                           *sets(SMALL + ["method.sw_batch_size=1", "train.val_every=3"]))
    assert code == 0, err
    assert f"loaded {len(weights)} tensors, missing 0, unexpected 0" in err
    metrics = json.loads((ft / "metrics.json").read_text())
    assert 0 <= metrics["mean_dice"] <= 1 and len(metrics["per_class"]) == 13
    state = checkpoint.load(ft / "checkpoints" / "last.pt")
    assert state["config"]["method"]["name"] == "swin_unetr"
    assert "net.swinViT.layers1.0.blocks.0.attn.qkv.weight" in state["model"]


def test_a_swin_encoder_of_another_architecture_or_roi_is_refused(phantoms, tmp_path, run_cli):
    torch.manual_seed(0)
    model = GMIM(ENCODER, GMIMConfig(roi=ROI))
    path = tmp_path / "encoder.safetensors"
    checkpoint.save_encoder(model.encoder.state_dict(), {"encoder": ENCODER.__dict__, "method": "gmim"}, path)
    code, _, err = run_cli("finetune", "--config", "swin_unetr_tiny", "--data", phantoms, "--out", tmp_path / "ft",
                           "--init", path, *sets(["encoder.feature_size=24", "data.num_workers=0"]))
    assert code == 2 and "feature_size 12 != 24" in err and "Traceback" not in err
    code, _, err = run_cli("finetune", "--config", "swin_unetr_tiny", "--data", phantoms, "--out", tmp_path / "ft",
                           *sets(["method.roi=[64,64,48]"]))
    assert code == 2 and "multiples of 32" in err
    code, _, err = run_cli("export", "--checkpoint", path, "--format", "monai-vit", "--out", tmp_path / "vit.pt")
    assert code == 2 and "use --format safetensors" in err
    code, _, err = run_cli("export", "--checkpoint", path, "--format", "safetensors", "--out", tmp_path / "e.st")
    assert code == 0, err


def test_the_paper_scale_config_has_the_papers_numbers():
    cfg = load_config("gmim_swin")
    model = GMIM(cfg.encoder, cfg.method)
    assert (model.projector.in_features, model.projector.out_features) == (768, 512)
    assert sum(isinstance(m, torch.nn.Upsample) for m in model.decoder) == 5
    assert model.levels == [(64, 64, 64), (64, 64, 64), (32, 32, 32), (16, 16, 16)]
    assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.data.ct_window) == (4e-4, 500, (-1000.0, 1000.0))
    assert load_config("swin_unetr").encoder == cfg.encoder  # pretrained and fine-tuned Swin agree
