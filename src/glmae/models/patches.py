"""Patches and token masks: pure functions shared by every masked-image-modelling method.

A volume (N, C, X, Y, Z) whose sides are multiples of the patch (px, py, pz) is cut into
L = (X/px)(Y/py)(Z/pz) patches in row-major grid order, the order of `Conv3d(...).flatten(2)`.
Inside a patch the values are ordered (C, px, py, pz), the layout of a Conv3d weight, so the patch
embedding can run as a matrix product on just the visible patches.

A patch is given per axis, or as one int for a cube (`8` is `(8, 8, 8)`). Anisotropic patches
serve data whose voxels are not cubes (16x16x2 for MRI with 8 mm slices) and 2D images, which are
depth-1 volumes (N, C, H, W, 1) cut with 16x16x1 patches: one code path for 2D and 3D, so the
ViT, the masking, the position embeddings and the MAE decoder have no 2D copies.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

Patch = int | Sequence[int]  # one side for a cube, or (px, py, pz)


def patch_shape(patch: Patch) -> tuple[int, int, int]:
    """8 -> (8, 8, 8); (16, 16, 1) -> (16, 16, 1). ValueError unless 3 positive sides."""
    shape = (patch,) * 3 if isinstance(patch, int) else tuple(int(p) for p in patch)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"a patch is one positive side or three (x, y, z), got {patch!r}")
    return shape


def patch_volume(patch: Patch) -> int:
    """Voxels per patch: p³, or px·py·pz."""
    return math.prod(patch_shape(patch))


def token_grid(spatial: tuple[int, ...] | torch.Size, patch: Patch) -> tuple[int, int, int]:
    """(X, Y, Z) -> (X/px, Y/py, Z/pz); raises ValueError if a side is not a multiple of its patch side."""
    shape = patch_shape(patch)
    if len(spatial) != 3 or any(s % p for s, p in zip(spatial, shape)):
        size = "x".join(map(str, shape))
        raise ValueError(f"volume sides {tuple(spatial)} must be multiples of the patch size {size}")
    return tuple(s // p for s, p in zip(spatial, shape))


def patchify(x: torch.Tensor, patch: Patch) -> torch.Tensor:
    """(N, C, X, Y, Z) -> (N, L, C·px·py·pz)."""
    n, c = x.shape[:2]
    px, py, pz = patch_shape(patch)
    gx, gy, gz = token_grid(x.shape[2:], patch)
    x = x.reshape(n, c, gx, px, gy, py, gz, pz)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)  # (N, gx, gy, gz, C, px, py, pz)
    return x.reshape(n, gx * gy * gz, c * px * py * pz)


def unpatchify(x: torch.Tensor, patch: Patch, grid: tuple[int, int, int]) -> torch.Tensor:
    """(N, L, C·px·py·pz) -> (N, C, X, Y, Z); the inverse of `patchify`."""
    n, length, dim = x.shape
    px, py, pz = patch_shape(patch)
    gx, gy, gz = grid
    c = dim // (px * py * pz)
    if length != gx * gy * gz or c * px * py * pz != dim:
        raise ValueError(f"cannot unpatchify {tuple(x.shape)} into grid {grid} with patch {patch_shape(patch)}")
    x = x.reshape(n, gx, gy, gz, c, px, py, pz)
    x = x.permute(0, 4, 1, 5, 2, 6, 3, 7)  # (N, C, gx, px, gy, py, gz, pz)
    return x.reshape(n, c, gx * px, gy * py, gz * pz)


def random_masking(length: int, ratio: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random split of one sample's L tokens into visible and masked ones, as in MAE.

    Returns `keep` (K,) and `masked` (L - K,), sorted int64 token indices, K = round((1 - ratio) L).
    Drawn in the data pipeline from the sample's own seed, so a sample's mask does not depend on
    the batch, the rank or the number of workers.
    """
    n_keep = int(round((1 - ratio) * length))
    if not 0 < n_keep <= length:
        raise ValueError(f"mask ratio {ratio} leaves {n_keep} of {length} tokens visible")
    order = rng.permutation(length)
    return np.sort(order[:n_keep]), np.sort(order[n_keep:])


def mask_from_indices(masked: torch.Tensor, length: int) -> torch.Tensor:
    """masked (N, M) token indices -> (N, L) float mask, 1 where masked."""
    mask = torch.zeros(masked.shape[0], length, device=masked.device)
    return mask.scatter_(1, masked, 1.0)


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (N, L, D), index (N, K) -> (N, K, D)."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


CHANNEL_ADAPTATIONS = ("average", "repeat")


def adapt_in_channels(weight: torch.Tensor, channels: int, how: str = "average") -> torch.Tensor:
    """A patch embedding's (D, C_in, *kernel) weight remade for `channels` = C_out input channels,
    scaled by C_in / C_out so that an input whose C_out channels are all equal to one image gets
    the embedding the C_in-channel weight gave that image on all of its channels (an encoder
    pre-trained on 1-channel CT sees a 4-channel MRI case as it saw CT, up to intensities):

    - average: every output channel is the mean of the C_in input channels' weights, x C_in / C_out
      (exact for any C_in, C_out);
    - repeat: output channel j is input channel j mod C_in, x C_in / C_out (keeps channel-specific
      filters; exact when C_out is a multiple of C_in, the same as average when C_in = 1).
    """
    if how not in CHANNEL_ADAPTATIONS:
        raise ValueError(f"channel adaptation must be one of {CHANNEL_ADAPTATIONS}, got {how!r}")
    c_in = weight.shape[1]
    if how == "average":
        per_channel = weight.mean(1, keepdim=True).expand(-1, channels, *weight.shape[2:])
    else:
        per_channel = weight[:, torch.arange(channels) % c_in]
    return (per_channel * (c_in / channels)).contiguous()
