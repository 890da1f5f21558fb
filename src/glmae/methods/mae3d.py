"""MAE3D (SelfMedMAE, seed 003): masked autoencoding of random 3D crops.

Per sample: a random crop of `roi` whose centre lies in the body's bounding box (found from
intensities at preprocessing time; labels are never read), random flips, and a per-sample random
mask keeping round((1 - r) L) of L tokens. The encoder sees the visible tokens only; the decoder
predicts the masked patches; the loss is the MSE on masked patches with per-patch normalised
targets (`norm_pix`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from glmae.config import MethodConfig, ViTConfig, register_method
from glmae.data import sampling
from glmae.models.mae import MAEDecoder, reconstruction_loss
from glmae.models.patches import gather_tokens, patchify, random_masking, token_grid, unpatchify
from glmae.models.vit import ViT


@register_method("mae3d")
@dataclass
class MAE3DConfig(MethodConfig):
    name: str = "mae3d"
    roi: tuple[int, int, int] = (96, 96, 96)  # crop size in voxels
    mask_ratio: float = 0.75
    norm_pix: bool = True  # per-patch normalised reconstruction targets
    decoder_width: int = 384
    decoder_depth: int = 8
    decoder_heads: int = 12
    flip_prob: float = 0.5  # per spatial axis


def sample_crop(volume, rng: np.random.Generator, *, cfg: MAE3DConfig, patch: int) -> dict:
    """One training sample: {"image": (C, *roi) float32, "keep": (K,), "masked": (L-K,) int64}."""
    box = sampling.crop_box(volume.image.shape[1:], cfg.roi, rng, volume.foreground_box)
    image = sampling.flip(sampling.crop(volume.image, box), sampling.flip_axes(rng, cfg.flip_prob))
    keep, masked = random_masking(math.prod(token_grid(cfg.roi, patch)), cfg.mask_ratio, rng)
    return {"image": image, "keep": keep, "masked": masked}


class MaskedAutoencoder(nn.Module):
    """ViT encoder + MAE decoder; the reconstruction core of MAE3D and GL-MAE."""

    def __init__(self, encoder: ViTConfig, decoder_width: int, decoder_depth: int, decoder_heads: int,
                 norm_pix: bool = True):
        super().__init__()
        self.patch = encoder.patch_size
        self.norm_pix = norm_pix
        self.encoder = ViT(encoder)
        self.decoder = MAEDecoder(
            encoder.width, decoder_width, decoder_depth, decoder_heads, encoder.patch_size, encoder.in_channels
        )

    @property
    def export_encoder(self) -> nn.Module:
        """The encoder written to encoder.safetensors."""
        return self.encoder

    def reconstruct(self, images: torch.Tensor, keep: torch.Tensor, masked: torch.Tensor):
        """images (N, C, X, Y, Z), keep (N, K), masked (N, M) -> (loss, predictions (N, M, C·p³),
        visible-token features (N, K, D))."""
        latent, _ = self.encoder(images, keep)
        pred = self.decoder(latent, keep, masked, token_grid(images.shape[2:], self.patch))
        return reconstruction_loss(pred, images, masked, self.patch, self.norm_pix), pred, latent

    def reconstruction_volumes(self, images, keep, masked, pred) -> tuple[np.ndarray, np.ndarray]:
        """First sample's masked input (masked patches NaN) and reconstruction as (X, Y, Z) arrays
        of channel 0, the predicted patches mapped back with the true patches' mean and std."""
        grid = token_grid(images.shape[2:], self.patch)
        patches = patchify(images[:1].float(), self.patch)
        pred = pred[:1].float()
        if self.norm_pix:
            target = gather_tokens(patches, masked[:1])
            pred = pred * (target.var(-1, keepdim=True) + 1e-6).sqrt() + target.mean(-1, keepdim=True)
        index = masked[:1].unsqueeze(-1).expand(-1, -1, patches.shape[-1])
        shown = patches.scatter(1, index, torch.full_like(pred, float("nan")))
        recon = patches.scatter(1, index, pred)
        to_np = lambda p: unpatchify(p, self.patch, grid)[0, 0].detach().cpu().numpy()  # noqa: E731
        return to_np(shown), to_np(recon)


class MAE3D(MaskedAutoencoder):
    def __init__(self, encoder: ViTConfig, cfg: MAE3DConfig):
        super().__init__(encoder, cfg.decoder_width, cfg.decoder_depth, cfg.decoder_heads, cfg.norm_pix)
        self.cfg = cfg

    def sampler(self):
        return functools.partial(sample_crop, cfg=self.cfg, patch=self.patch)

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        loss, _, _ = self.reconstruct(batch["image"], batch["keep"], batch["masked"])
        return loss, {}

    def figure(self, batch: dict, path) -> None:
        from glmae.figures import recon_figure

        images, keep, masked = batch["image"][:1], batch["keep"][:1], batch["masked"][:1]
        _, pred, _ = self.reconstruct(images, keep, masked)
        shown, recon = self.reconstruction_volumes(images, keep, masked, pred)
        original = images[0, 0].float().cpu().numpy()
        recon_figure([("crop", [("original", original), ("masked input", shown), ("reconstruction", recon)])], path)
