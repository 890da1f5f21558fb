"""GMIM: adaptive, hierarchical grid masking with a Siamese target branch (seed 002).

This implements METHODS.md, section GMIM. Per sample (`sample_gmim`, in DataLoader workers, every
random draw from the sample's own rng):

1. A crop of `roi` (centre in the body's bounding box, as MAE3D) with random flips.
2. Adaptive grid masking (`glmae.models.grid_masking`): the grid g in {4, 8, 16} maximising
   g^(-0.1) std(E) / mean(E) over the cells' intensity entropies E, cell mask ratios
   0.5 · linspace(0.7, 1.3) by entropy rank, a random subset of each cell's tokens masked.
3. Hierarchical masking: the level-0 mask zeroes the tokens after the patch embedding; with
   probability 0.3 each, further masks zero the tokens after the position dropout, after stage 1
   and after stage 2 (token grids / 1, 2, 4), the ratios halved at each level. The masks of all
   levels travel in the batch (`mask0` .. `mask3`, all False for a level that did not fire).
4. The target branch's input: the same crop with an intensity augmentation (gamma with
   probability 0.7, shift 0.4, Gaussian noise 0.5; see below).

Model (`GMIM`):

- Online branch: masked crop -> encoder (masks applied by forward hooks on MONAI's
  SwinTransformer: `patch_embed`, `pos_drop`, `layers1`, `layers2`; nothing of MONAI's code is
  copied) -> last-stage features (N, 16F, X/32, Y/32, Z/32), layer-normed per token as Swin-UNETR
  sees them -> convolutional decoder (5 x [conv 3³, instance norm, LeakyReLU, x2 trilinear
  up-sampling]) -> voxels. L_rec = MSE against the crop.
- Target branch: the same encoder (same weights) on the augmented, unmasked crop, without autograd.
- Projection: Linear(16F -> 512), shared, on the last-stage tokens of both branches.
  L_rr = `redundancy_loss` (Barlow Twins per sample, across the sample's tokens).
- L = L_rec + 0.005 L_rr. Logs: `loss_rec`, `loss_rr`, `grid` (mean chosen g of the batch).

Choices where the paper and METHODS.md are silent (options in `GMIMConfig` where they are numbers):
- Entropy: 256 bins (`entropy_bins`) over a range that follows the volume's intensity mode
  (`Volume.intensity`, data.intensity resolved): [0, 1] for CT (`entropy_range`, the windowed
  range); for z-scored MRI (and `none`) each channel's own 0.5th to 99.5th percentiles in the crop
  (`entropy_percentiles`): z-scores have no fixed range, and [0, 1] would put most of a z-scored
  crop (everything below the mean or above one standard deviation) into the two end bins, so the
  entropies, the grid and the ratios would describe the clipping. Cells, ties, rounding and the
  coarser grids of deeper levels as documented in `glmae.models.grid_masking`.
- The target branch sees the same crop (same place, same flips), so that token i means the same
  place in both branches (the public code pairs two different crops).
- Augmentation, in this order: gamma ~ U(0.7, 1.5) on the crop's own [min, max] range (MONAI's
  RandAdjustContrast); an additive shift ~ U(-0.4, 0.4) of the normalised intensities (MONAI's
  RandShiftIntensity); noise N(0, 0.1²) (`noise_std`, MONAI's RandGaussianNoise default std).
- Decoder: channels halved at each of its stages, then a 1x1x1 conv to the input channels.
  `rec_masked_only`: the MSE over the voxels under tokens masked at any level (deeper levels'
  tokens cover 2³ or 4³ level-0 tokens).
- Flips: each axis with probability 0.5 (`flip_prob`), as MAE3D.
- The target branch runs in the module's mode: with `encoder.drop_path` > 0 it drops paths too (the
  packaged configs pretrain without drop-path).

ViT backbone (`encoder.arch: vit`, `gmim_vit_tiny`): the same grid masking over the ViT's tokens,
a masked token keeping only its position embedding (zero content, since the ViT adds the position
inside its patch embedding); the ViT runs on all tokens; decoder with log2(patch) stages. The ViT
has no stages, so no hierarchy: `hierarchical_prob` must be 0.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from glmae.config import EncoderConfig, MethodConfig, register_method
from glmae.data import sampling
from glmae.errors import InputError
from glmae.models import grid_masking, swin
from glmae.models.features import dense_features
from glmae.models.patches import token_grid
from glmae.models.vit import ViT, sincos_embedding


@register_method("gmim")
@dataclass
class GMIMConfig(MethodConfig):
    name: str = "gmim"
    roi: tuple[int, int, int] = (128, 128, 128)  # crop size in voxels; multiples of the encoder's stride
    flip_prob: float = 0.5  # per spatial axis
    grids: tuple[int, ...] = grid_masking.GRIDS  # candidate cells per side
    grid_alpha: float = 0.1  # criterion g^(-alpha) std(E) / mean(E)
    entropy_bins: int = 256
    entropy_range: tuple[float, float] = (0.0, 1.0)  # histogram range of CT intensities (windowed)
    entropy_percentiles: tuple[float, float] = (0.5, 99.5)  # other modes: the crop's, per channel
    mask_ratio: float = 0.5  # base ratio
    mask_scale: float = 0.3  # cell ratios base · (1 ± scale), by entropy rank
    hierarchical_prob: float = 0.3  # probability of each level after the first
    level_ratio: float = 0.5  # ratio factor per level
    gamma: tuple[float, float] = (0.7, 1.5)
    gamma_prob: float = 0.7
    shift: float = 0.4  # additive, in units of the normalised intensities
    shift_prob: float = 0.4
    noise_std: float = 0.1
    noise_prob: float = 0.5
    proj_dim: int = 512
    rr_weight: float = 0.005  # weight of the redundancy-reduction loss
    rr_off_diagonal: float = 0.005  # weight of its off-diagonal terms
    rec_masked_only: bool = False

    @property
    def input_size(self) -> tuple[int, int, int]:
        """The size of what the encoder sees (the online probe's crops)."""
        return self.roi


# ----------------------------------------------------------------------------------------------
# Samples


def intensity_params(rng: np.random.Generator, cfg: GMIMConfig) -> tuple[float, float, int | None]:
    """(gamma, shift, noise seed) of the target branch's augmentation: 1.0, 0.0, None when not drawn."""
    gamma = float(rng.uniform(*cfg.gamma)) if rng.random() < cfg.gamma_prob else 1.0
    shift = float(rng.uniform(-cfg.shift, cfg.shift)) if rng.random() < cfg.shift_prob else 0.0
    noise_seed = int(rng.integers(2**63)) if rng.random() < cfg.noise_prob else None
    return gamma, shift, noise_seed


def adjust_intensity(image: np.ndarray, gamma: float, shift: float, noise_seed: int | None,
                     noise_std: float) -> np.ndarray:
    """(C, X, Y, Z) -> float32: gamma on the crop's [min, max] range, + shift, + N(0, noise_std²)
    noise drawn from `noise_seed` (none if None)."""
    out = np.array(image, dtype=np.float32)
    if gamma != 1.0:
        lo, span = out.min(), out.max() - out.min()
        out = ((out - lo) / (span + 1e-7)) ** np.float32(gamma) * span + lo
    out += np.float32(shift)
    if noise_seed is not None:
        out += np.float32(noise_std) * np.random.default_rng(noise_seed).standard_normal(out.shape, np.float32)
    return out


def entropy_range(image: np.ndarray, intensity: str, cfg: GMIMConfig):
    """The entropy histogram's range for a (C, X, Y, Z) crop of a volume of `intensity` mode:
    `entropy_range` for CT, else (C, 2) the crop's `entropy_percentiles` per channel."""
    return cfg.entropy_range if intensity == "ct" else grid_masking.percentile_ranges(image, cfg.entropy_percentiles)


def sample_gmim(volume, rng: np.random.Generator, *, cfg: GMIMConfig, patch: int, levels: list) -> dict:
    """One sample: {"image": (C, *roi) float32, "target": (C, *roi) float32 (augmented copy),
    "grid": chosen g, "mask{k}": bool mask of level k on token grid `levels[k]`}."""
    box = sampling.crop_box(volume.image.shape[1:], cfg.roi, rng, volume.foreground_box)
    image = sampling.flip(sampling.crop(volume.image, box), sampling.flip_axes(rng, cfg.flip_prob))
    g, entropies = grid_masking.choose_grid(image, patch, cfg.grids, cfg.entropy_bins,
                                            entropy_range(image, volume.intensity, cfg), cfg.grid_alpha)
    ratios = grid_masking.cell_ratios(entropies, cfg.mask_ratio, cfg.mask_scale)
    masks = grid_masking.hierarchical_masks(levels, g, ratios, rng, cfg.hierarchical_prob, cfg.level_ratio)
    target = adjust_intensity(image, *intensity_params(rng, cfg), cfg.noise_std)
    return {"image": image, "target": target, "grid": np.int64(g), **{f"mask{k}": m for k, m in enumerate(masks)}}


# ----------------------------------------------------------------------------------------------
# Losses and parts


def redundancy_loss(online: torch.Tensor, target: torch.Tensor, off_diagonal: float = 0.005,
                    eps: float = 1e-5) -> torch.Tensor:
    """Barlow Twins per sample between two projections (N, L, D) of the same L tokens.

    Each feature is standardised over the sample's tokens, z' = (z - mean) / sqrt(var + eps)
    (biased variance: Barlow Twins' affine-free batch norm, with the tokens as the batch);
    c = z'_online^T z'_target / L is the (D, D) cross-correlation; the loss is
    sum_i (1 - c_ii)² + off_diagonal · sum_{i != j} c_ij², averaged over the N samples.

    With fewer tokens than features c has rank < L and cannot be the identity: the loss stays above
    D k / (1 + k), k = off_diagonal (D / (L - 1) - 1), about 136 for the 8 last-stage tokens of a 64³
    crop and 18 for the 64 of a 128³ crop (D = 512).
    """

    def standardise(z):
        return (z - z.mean(1, keepdim=True)) / torch.sqrt(z.var(1, correction=0, keepdim=True) + eps)

    c = torch.einsum("nli,nlj->nij", standardise(online), standardise(target)) / online.shape[1]
    diagonal = torch.diagonal(c, dim1=1, dim2=2)
    on = (1 - diagonal).pow(2).sum(1)
    off = c.pow(2).sum((1, 2)) - diagonal.pow(2).sum(1)
    return (on + off_diagonal * off).mean()


def voxel_mask(masks: list[torch.Tensor], size) -> torch.Tensor:
    """Per-level token masks (N, *grid_k) -> (N, 1, *size) bool: voxels under a masked token of any level."""
    up = [F.interpolate(m[:, None].float(), size=tuple(size), mode="nearest") for m in masks]
    return torch.stack(up).amax(0) > 0


class ConvDecoder(nn.Sequential):
    """(N, width, *grid) -> (N, out_channels, *grid · 2^stages): `stages` x [conv 3³, instance
    norm, LeakyReLU, x2 trilinear up-sampling], halving the channels at each, then a 1x1x1 conv."""

    def __init__(self, width: int, stages: int, out_channels: int):
        layers = []
        for k in range(stages):
            w_in, w_out = width // 2**k, width // 2 ** (k + 1)
            layers += [
                nn.Conv3d(w_in, w_out, 3, padding=1), nn.InstanceNorm3d(w_out, affine=True), nn.LeakyReLU(),
                nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False),
            ]
        layers.append(nn.Conv3d(width // 2**stages, out_channels, 1))
        super().__init__(*layers)


def _zero_masked(module, args, output, mask):
    """Forward hook: channels-first features (N, C, *grid) with the masked tokens set to 0."""
    return output * (~mask).unsqueeze(1).to(output.dtype)


def _position_only(module, args, output, mask):
    """Forward hook: ViT tokens (N, L, D) with the masked ones replaced by their position embedding."""
    pos = sincos_embedding(tuple(mask.shape[1:]), output.shape[-1], str(output.device), output.dtype)
    return torch.where(mask.flatten(1).unsqueeze(-1), pos, output)


@contextlib.contextmanager
def _forward_hooks(hooks):
    """Register (module, hook) pairs as forward hooks for the duration of the block."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _tokens(features: torch.Tensor) -> torch.Tensor:
    """(N, D, *grid) -> (N, L, D)."""
    return features.flatten(2).transpose(1, 2)


# ----------------------------------------------------------------------------------------------
# The method


class GMIM(nn.Module):
    def __init__(self, encoder: EncoderConfig, cfg: GMIMConfig):
        super().__init__()
        self.cfg = cfg
        self.arch = encoder.arch
        self.patch = encoder.patch_size
        if encoder.arch == "swin":
            self.encoder = swin.swin_encoder(encoder)
            width, self.stride = swin.last_width(encoder), swin.stride(encoder)
        elif encoder.arch == "vit":
            if cfg.hierarchical_prob > 0:
                raise InputError("config: method.hierarchical_prob: hierarchical masking needs a multi-scale "
                                 "encoder (swin); set it to 0 for a ViT")
            if not isinstance(encoder.patch_size, int):
                raise InputError("config: encoder.patch_size: GMIM's convolutional decoder up-samples every axis "
                                 f"alike and needs a cubic patch, got {list(encoder.patch_size)}")
            self.encoder = ViT(encoder)
            width, self.stride = encoder.width, encoder.patch_size
        else:
            raise InputError(f"config: encoder.arch: GMIM supports swin and vit, not {encoder.arch!r}")
        self._check_roi()
        self.decoder = ConvDecoder(width, self.stride.bit_length() - 1, encoder.in_channels)
        self.projector = nn.Linear(width, cfg.proj_dim)

    def _check_roi(self) -> None:
        roi, s = self.cfg.roi, self.stride
        if s & (s - 1) or any(n % s for n in roi) or math.prod(roi) // s**3 < 2:
            raise InputError(f"config: method.roi: GMIM with this encoder needs sides that are multiples of "
                             f"{s} (a power of two), at least two of them, got {list(roi)}")
        if min(token_grid(roi, self.patch)) < min(self.cfg.grids):
            raise InputError(f"config: method.grids: every grid of {list(self.cfg.grids)} is finer than the "
                             f"token grid {list(token_grid(roi, self.patch))}")

    @property
    def levels(self) -> list[tuple[int, int, int]]:
        """Token grid of each masking level: Swin after the patch embedding, the position dropout,
        stage 1 and stage 2; ViT after the patch embedding."""
        grid = token_grid(self.cfg.roi, self.patch)
        if self.arch == "vit":
            return [grid]
        return [grid, grid, tuple(n // 2 for n in grid), tuple(n // 4 for n in grid)]

    def sampler(self):
        return functools.partial(sample_gmim, cfg=self.cfg, patch=self.patch, levels=self.levels)

    @property
    def export_encoder(self) -> nn.Module:
        return self.encoder

    def _hooks(self, masks: list[torch.Tensor]) -> list:
        if self.arch == "vit":
            return [(self.encoder.patch_embedding, functools.partial(_position_only, mask=masks[0]))]
        e = self.encoder
        points = (e.patch_embed, e.pos_drop, e.layers1[0], e.layers2[0])
        return [(m, functools.partial(_zero_masked, mask=mask)) for m, mask in zip(points, masks)]

    def features(self, images: torch.Tensor, masks: list[torch.Tensor] | None = None) -> torch.Tensor:
        """images (N, C, X, Y, Z), optional per-level masks -> last-stage features (N, D, X/s, Y/s, Z/s)."""
        with _forward_hooks(self._hooks(masks) if masks is not None else []):
            return dense_features(self.encoder, images)

    def _masks(self, batch: dict) -> list[torch.Tensor]:
        return [batch[f"mask{k}"] for k in range(len(self.levels))]

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        cfg = self.cfg
        images, masks = batch["image"], self._masks(batch)
        online = self.features(images, masks)
        pred = self.decoder(online)
        with torch.no_grad():
            target = self.projector(_tokens(self.features(batch["target"])))
        projected = self.projector(_tokens(online))
        with torch.autocast(images.device.type, enabled=False):
            error = (pred.float() - images.float()).pow(2)
            if cfg.rec_masked_only:
                weight = voxel_mask(masks, images.shape[2:]).expand_as(error)
                rec = (error * weight).sum() / weight.sum().clamp_min(1)
            else:
                rec = error.mean()
            rr = redundancy_loss(projected.float(), target.float(), cfg.rr_off_diagonal)
        logs = {"loss_rec": rec.detach(), "loss_rr": rr.detach(), "grid": batch["grid"].float().mean()}
        return rec + cfg.rr_weight * rr, logs

    def figure(self, batch: dict, path) -> None:
        from glmae.figures import recon_figure

        images, masks = batch["image"][:1], [m[:1] for m in self._masks(batch)]
        recon = self.decoder(self.features(images, masks))[0, 0].float().cpu().numpy()
        original = images[0, 0].float().cpu().numpy()
        # the input's masked tokens are those of level 0 (deeper levels mask features)
        shown = np.where(voxel_mask(masks[:1], images.shape[2:])[0, 0].cpu().numpy(), np.nan, original)
        title = f"crop, grid {int(batch['grid'][0])}"
        recon_figure([(title, [("original", original), ("masked input", shown), ("reconstruction", recon)])], path)
