"""MAE3D (SelfMedMAE, seed 003): masked autoencoding of random 3D crops, and of 2D images.

Per sample: a random crop of `roi` whose centre lies in the body's bounding box (found from
intensities at preprocessing time; labels are never read), random flips, and a per-sample random
mask keeping round((1 - r) L) of L tokens. With `view_scale` the crop is instead a random-resized
view: a box whose side is a fraction s ~ U(view_scale) of the image's on every axis, at a random
position, resized to `roi` (GL-MAE's view sampling; SelfMedMAE's RandomResizedCrop on chest
X-rays, whose area range (0.08, 1) is a side range of (0.28, 1), at a fixed aspect ratio). 2D
images are depth-1 volumes with `roi` (H, W, 1) and patch (p, p, 1), so `mae2d_*` configs are this
method; `flip_axes: [1]` keeps their flips horizontal. The encoder sees the visible tokens only; the decoder
predicts the masked patches; the loss is the MSE on masked patches with per-patch normalised
targets (`norm_pix`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from glmae.config import MethodConfig, register_method
from glmae.data import sampling
from glmae.models.mae import MaskedAutoencoder
from glmae.models.patches import random_masking, token_grid
from glmae.models.vit import ViTConfig


@dataclass
class MAEConfig(MethodConfig):
    """What MAE3D and GL-MAE share: the masking, the MAE decoder and random flips."""

    mask_ratio: float = 0.75
    norm_pix: bool = True  # per-patch normalised reconstruction targets
    decoder_width: int = 384
    decoder_depth: int = 8
    decoder_heads: int = 12
    flip_prob: float = 0.5  # per spatial axis (GL-MAE: per volume, shared by its views)


@register_method("mae3d")
@dataclass
class MAE3DConfig(MAEConfig):
    name: str = "mae3d"
    roi: tuple[int, int, int] = (96, 96, 96)  # crop size in voxels
    view_scale: tuple[float, float] | None = None  # random-resized views of this side fraction; None: crops
    flip_axes: tuple[int, ...] = (0, 1, 2)  # spatial axes that may be flipped (2D radiographs: [1])

    @property
    def input_size(self) -> tuple[int, int, int]:
        """The size of what the encoder sees (the online probe's crops)."""
        return self.roi


def sample_crop(volume, rng: np.random.Generator, *, cfg: MAE3DConfig, patch) -> dict:
    """One training sample: {"image": (C, *roi) float32, "keep": (K,), "masked": (L-K,) int64}."""
    if cfg.view_scale is None:
        box = sampling.crop_box(volume.image.shape[1:], cfg.roi, rng, volume.foreground_box)
        image = sampling.crop(volume.image, box)
    else:
        box = sampling.view_box(volume.image.shape[1:], cfg.view_scale, rng)
        image = sampling.resize(sampling.crop(volume.image, box), cfg.roi)
    image = sampling.flip(image, sampling.flip_axes(rng, cfg.flip_prob, cfg.flip_axes))
    keep, masked = random_masking(math.prod(token_grid(cfg.roi, patch)), cfg.mask_ratio, rng)
    return {"image": image, "keep": keep, "masked": masked}


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
