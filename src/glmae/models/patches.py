"""Patches and token masks: pure functions shared by every masked-image-modelling method.

A volume (N, C, X, Y, Z) with sides divisible by the patch size p is cut into L = (X/p)(Y/p)(Z/p)
patches in row-major grid order, the order of `Conv3d(...).flatten(2)`. Inside a patch the values
are ordered (C, p, p, p), the layout of a Conv3d weight, so the patch embedding can run as a
matrix product on just the visible patches.
"""

from __future__ import annotations

import numpy as np
import torch


def token_grid(spatial: tuple[int, ...] | torch.Size, patch: int) -> tuple[int, int, int]:
    """(X, Y, Z) -> (X/p, Y/p, Z/p); raises ValueError if a side is not a multiple of p."""
    if any(s % patch for s in spatial):
        raise ValueError(f"volume sides {tuple(spatial)} must be multiples of the patch size {patch}")
    return tuple(s // patch for s in spatial)


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """(N, C, X, Y, Z) -> (N, L, C·p³)."""
    n, c = x.shape[:2]
    gx, gy, gz = token_grid(x.shape[2:], patch)
    x = x.reshape(n, c, gx, patch, gy, patch, gz, patch)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)  # (N, gx, gy, gz, C, p, p, p)
    return x.reshape(n, gx * gy * gz, c * patch**3)


def unpatchify(x: torch.Tensor, patch: int, grid: tuple[int, int, int]) -> torch.Tensor:
    """(N, L, C·p³) -> (N, C, X, Y, Z); the inverse of `patchify`."""
    n, length, dim = x.shape
    gx, gy, gz = grid
    c = dim // patch**3
    if length != gx * gy * gz or c * patch**3 != dim:
        raise ValueError(f"cannot unpatchify {tuple(x.shape)} into grid {grid} with patch {patch}")
    x = x.reshape(n, gx, gy, gz, c, patch, patch, patch)
    x = x.permute(0, 4, 1, 5, 2, 6, 3, 7)  # (N, C, gx, p, gy, p, gz, p)
    return x.reshape(n, c, gx * patch, gy * patch, gz * patch)


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
