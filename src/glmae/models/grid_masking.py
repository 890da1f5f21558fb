"""GMIM's adaptive, hierarchical grid masking (seed 002; METHODS.md, "GMIM"): pure functions.

Cells. A crop's token grid (crop / patch per axis) is cut into g cells per axis, g³ cells in
row-major order. Along an axis of n positions, position i belongs to the cell under its centre,
floor((i + 1/2) g / n): g equal cells when g divides n, sizes differing by one otherwise. The same
rule serves the coarser token grids of deeper levels: when n < g, each token falls in the cell under
its centre and some cells hold no token. A voxel belongs to the cell of its token, so the cells of
the entropy and of the masking coincide exactly.

Grid choice (`choose_grid`). For each g in `grids` (4, 8, 16) that is no finer than the token grid
(g <= its smallest side; finer grids are skipped): E = the Shannon entropy in bits of the intensity
histogram of each cell, `bins` equal bins over `value_range` (default 256 bins over [0, 1], the
range of windowed CT; values outside fall in the end bins), one range for every channel or one per
channel (`percentile_ranges`: a crop's own percentiles, for z-scored MRI, which has no fixed range);
multi-channel crops: mean of the channels' entropies. Criterion g^(-alpha) std(E) / mean(E),
alpha = 0.1, population std, 0 for mean(E) = 0 (a constant crop). The largest criterion wins; on
ties the first grid listed.

Ratios (`cell_ratios`). Cell c gets base · linspace(1 - scale, 1 + scale, K)[rank(E_c)], rank the
dense rank of its entropy among the K distinct entropies of the crop (as the public code: equal
entropies, equal ratios; higher entropy, more masking). One distinct entropy: `base` everywhere.

Masks (`grid_mask`). In each cell of n_c tokens a uniformly random subset of floor(r n_c + u)
tokens is masked, u ~ U(0, 1) drawn per cell: r n_c rounded down or up at random, r n_c on average
(stochastic rounding, so that the small ratios and few tokens per cell of deep levels still mask
their share instead of rounding to nothing).

Hierarchy (`hierarchical_masks`). Level 0 is always masked; each further level independently with
probability `prob`, with every cell's ratio times level_ratio^level (0.5: halved at each level).
Every level draws its own tokens; a level that does not fire has an all-False mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from glmae.models.patches import token_grid

GRIDS = (4, 8, 16)


def cell_of(n: int, g: int) -> np.ndarray:
    """(n,) cell index in [0, g) of each of n positions along an axis: floor((i + 1/2) g / n)."""
    return ((2 * np.arange(n) + 1) * g) // (2 * n)


def cell_ids(shape: Sequence[int], g: int) -> np.ndarray:
    """(X, Y, Z) int array: the row-major cell index in [0, g³) of every position of a grid."""
    cx, cy, cz = (cell_of(n, g) for n in shape)
    return (cx[:, None, None] * g + cy[None, :, None]) * g + cz[None, None, :]


def percentile_ranges(image: np.ndarray, percentiles: tuple[float, float]) -> np.ndarray:
    """(C, 2) histogram range per channel of a (C, X, Y, Z) crop: its (low, high) percentiles."""
    return np.stack([np.percentile(channel, percentiles) for channel in np.asarray(image)])


def cell_entropies(
    image: np.ndarray, g: int, patch: int, bins: int = 256, value_range=(0.0, 1.0)
) -> np.ndarray:
    """(g³,) Shannon entropy (bits) of the intensity histogram of each cell of a (C, X, Y, Z) crop
    whose sides are multiples of `patch`; the mean over channels. `value_range`: (low, high) for
    every channel or (C, 2) per channel; a range of zero width counts everything in one bin."""
    grid = token_grid(image.shape[1:], patch)
    cx, cy, cz = (np.repeat(cell_of(n, g), patch) for n in grid)  # voxel -> cell of its token
    cells = (cx[:, None, None] * g + cy[None, :, None]) * g + cz[None, None, :]
    ranges = np.broadcast_to(np.asarray(value_range, dtype=np.float64), (image.shape[0], 2))
    total = np.zeros(g**3)
    for channel, (lo, hi) in zip(image, ranges):
        hi = hi if hi > lo else lo + 1.0
        index = np.clip(np.floor((np.asarray(channel) - lo) * (bins / (hi - lo))), 0, bins - 1).astype(np.int64)
        counts = np.bincount((cells * bins + index).ravel(), minlength=g**3 * bins).reshape(g**3, bins)
        p = counts / counts.sum(1, keepdims=True)
        total -= (p * np.log2(p, out=np.zeros_like(p), where=p > 0)).sum(1)
    return total / image.shape[0]


def grid_criterion(entropies: np.ndarray, g: int, alpha: float = 0.1) -> float:
    """g^(-alpha) std(E) / mean(E); 0 when mean(E) = 0."""
    mean = entropies.mean()
    return 0.0 if mean <= 0 else float(g**-alpha * entropies.std() / mean)


def choose_grid(
    image: np.ndarray, patch: int, grids: Sequence[int] = GRIDS, bins: int = 256,
    value_range=(0.0, 1.0), alpha: float = 0.1,
) -> tuple[int, np.ndarray]:
    """(g, (g³,) cell entropies) of the grid maximising `grid_criterion` for a (C, X, Y, Z) crop."""
    side = min(token_grid(image.shape[1:], patch))
    candidates = [g for g in grids if g <= side]
    if not candidates:
        raise ValueError(f"every grid of {tuple(grids)} is finer than the token grid (smallest side {side})")
    best = None
    for g in candidates:
        entropies = cell_entropies(image, g, patch, bins, value_range)
        score = grid_criterion(entropies, g, alpha)
        if best is None or score > best[0]:
            best = (score, g, entropies)
    return best[1], best[2]


def cell_ratios(entropies: np.ndarray, base: float = 0.5, scale: float = 0.3) -> np.ndarray:
    """(G,) mask ratio of each cell: base · linspace(1 - scale, 1 + scale) by dense entropy rank."""
    distinct, rank = np.unique(entropies, return_inverse=True)
    if len(distinct) == 1:
        return np.full(len(entropies), float(base))
    return base * np.linspace(1 - scale, 1 + scale, len(distinct))[rank]


def grid_mask(grid: Sequence[int], g: int, ratios: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(gx, gy, gz) bool mask (True = masked) of a token grid: in cell c a random subset of
    floor(ratios[c] · n_c + u) of its n_c tokens, u ~ U(0, 1)."""
    cells = cell_ids(grid, g).ravel()
    sizes = np.bincount(cells, minlength=g**3)
    counts = np.floor(np.clip(ratios, 0, 1) * sizes + rng.random(g**3)).astype(np.int64)
    order = np.lexsort((rng.random(cells.size), cells))  # tokens grouped by cell, random within
    sorted_cells = cells[order]
    within = np.arange(cells.size) - (np.cumsum(sizes) - sizes)[sorted_cells]  # rank inside the cell
    mask = np.zeros(cells.size, dtype=bool)
    mask[order] = within < counts[sorted_cells]
    return mask.reshape(tuple(grid))


def hierarchical_masks(
    grids: Sequence[Sequence[int]], g: int, ratios: np.ndarray, rng: np.random.Generator,
    prob: float = 0.3, level_ratio: float = 0.5,
) -> list[np.ndarray]:
    """One bool mask per level (token grid `grids[k]`): level 0 always, level k >= 1 with
    probability `prob` and ratios x level_ratio^k, else all False."""
    masks = []
    for level, grid in enumerate(grids):
        if level == 0 or rng.random() < prob:
            masks.append(grid_mask(grid, g, ratios * level_ratio**level, rng))
        else:
            masks.append(np.zeros(tuple(grid), dtype=bool))
    return masks
