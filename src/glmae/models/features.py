"""Dense features of any encoder glmae builds, for heads that read them on the voxel grid."""

from __future__ import annotations

import torch
from torch import nn

from glmae.models.patches import token_grid
from glmae.models.vit import ViT


def dense_features(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """images (N, C, X, Y, Z) -> (N, D, X/s, Y/s, Z/s): a ViT's tokens after its final norm on the
    token grid (s the patch), or the last stage of a Swin encoder (s its stride)."""
    if isinstance(encoder, ViT):
        tokens, _ = encoder(images)
        grid = token_grid(images.shape[2:], encoder.cfg.patch_size)
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)
    return encoder(images)[-1]
