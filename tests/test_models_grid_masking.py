"""GMIM's grid masking: cells, entropies, the grid criterion, cell ratios, masks and the hierarchy."""

import math
from collections import Counter

import numpy as np
import pytest

from glmae.models.grid_masking import (
    cell_entropies,
    cell_ids,
    cell_of,
    cell_ratios,
    choose_grid,
    grid_criterion,
    grid_mask,
    hierarchical_masks,
)

# 8 intensities in 8 distinct bins of 256 over [0, 1], none in the bin of the background 0.5
TILE = ((np.arange(8).reshape(2, 2, 2) * 10 + 10.5) / 256).astype(np.float32)


def crop_with_block(side: int, size: int = 32) -> np.ndarray:
    """(1, size³) crop of 0.5 with a block of `side` voxels at the origin tiled with TILE: every
    2³ sub-block holds the 8 distinct values once."""
    image = np.full((1, size, size, size), 0.5, dtype=np.float32)
    reps = side // 2
    image[0, :side, :side, :side] = np.tile(TILE, (reps, reps, reps))
    return image


def entropy_by_hand(image: np.ndarray, g: int) -> list[float]:
    """Loops: cell (i, j, k) holds voxels [i s, (i+1) s) per axis (s = side / g: g divides the
    token grid here), entropy of its 256-bin histogram in bits."""
    s = image.shape[1] // g
    out = []
    for i in range(g):
        for j in range(g):
            for k in range(g):
                values = image[0, i * s:(i + 1) * s, j * s:(j + 1) * s, k * s:(k + 1) * s].ravel()
                counts = Counter(min(int(v * 256), 255) for v in values)
                n = len(values)
                out.append(-sum(c / n * math.log2(c / n) for c in counts.values()))
    return out


def test_cells_hold_the_centre_of_each_position():
    assert cell_of(16, 4).tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    assert cell_of(10, 4).tolist() == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]  # sizes differ by one
    assert cell_of(4, 16).tolist() == [2, 6, 10, 14]  # coarser than the grid: the cell under the centre
    ids = cell_ids((4, 2, 6), 2)
    assert ids[3, 1, 5] == (1 * 2 + 1) * 2 + 1 and ids[0, 0, 0] == 0 and ids[1, 0, 3] == 1


def test_grid_choice_and_ratios_match_a_hand_computed_example():
    image = crop_with_block(4)  # 32³ voxels = 16³ tokens of 2³; the block fills cell 0 of g = 8
    # g = 8: cell 0 holds the 8 values 8 times each -> 3 bits; the other 511 cells are constant
    e8 = cell_entropies(image, 8, patch=2)
    np.testing.assert_allclose(e8, entropy_by_hand(image, 8), atol=1e-12)
    assert e8[0] == pytest.approx(3.0) and np.all(e8[1:] == 0)
    # g = 4: cell 0 holds 64 block voxels (8 values x 8) and 448 background voxels
    e4 = cell_entropies(image, 4, patch=2)
    np.testing.assert_allclose(e4, entropy_by_hand(image, 4), atol=1e-12)
    assert e4[0] == pytest.approx(8 * (8 / 512) * math.log2(512 / 8) + (448 / 512) * math.log2(512 / 448))
    # criterion g^-0.1 std/mean; one non-zero cell of G: std/mean = sqrt(G - 1)
    assert grid_criterion(e8, 8) == pytest.approx(8**-0.1 * math.sqrt(511))
    assert grid_criterion(e4, 4) == pytest.approx(4**-0.1 * math.sqrt(63))
    # g = 16: the 8 cells of the block hold the 8 values once each -> sqrt(4096 / 8 - 1)
    assert grid_criterion(cell_entropies(image, 16, 2), 16) == pytest.approx(16**-0.1 * math.sqrt(511))
    g, entropies = choose_grid(image, patch=2)
    assert g == 8 and np.array_equal(entropies, e8)
    ratios = cell_ratios(entropies)  # two distinct entropies: 0.5 x 0.7 and 0.5 x 1.3
    assert ratios[0] == pytest.approx(0.65) and np.allclose(ratios[1:], 0.35)


@pytest.mark.parametrize("side, expected", [(2, 16), (4, 8), (8, 4)])
def test_the_grid_follows_the_size_of_the_detail(side, expected):
    assert choose_grid(crop_with_block(side), patch=2)[0] == expected


def test_grids_finer_than_the_token_grid_are_skipped():
    image = crop_with_block(2, size=16)  # 8³ tokens: g = 16 would win (previous test) but does not fit
    assert choose_grid(image, patch=2)[0] == 8
    with pytest.raises(ValueError, match="finer than the token grid"):
        choose_grid(image, patch=2, grids=(16,))


def test_a_constant_crop_scores_zero_and_gets_the_base_ratio():
    image = np.full((1, 32, 32, 32), 0.2, dtype=np.float32)
    g, entropies = choose_grid(image, patch=2)
    assert g == 4 and np.all(entropies == 0)  # every criterion is 0: the first grid
    assert np.all(cell_ratios(entropies, base=0.5) == 0.5)


def test_ratios_follow_the_dense_entropy_rank():
    ratios = cell_ratios(np.array([2.0, 0.5, 2.0, 1.0, 3.0]), base=0.5, scale=0.3)
    np.testing.assert_allclose(ratios, 0.5 * np.array([1.1, 0.7, 1.1, 0.9, 1.3]))


def test_each_cell_masks_its_ratio_of_tokens_up_to_rounding():
    """Per cell the count is floor(r n) or ceil(r n) (exactly r n when that is an integer); on
    average over seeds it is r n (stochastic rounding, 1000 draws, tolerance 4 standard errors of
    a rounding draw, at most 0.5 / sqrt(1000) each)."""
    grid, g = (16, 12, 10), 4  # uneven cells: 4 x 3 x (2 or 3) tokens
    rng = np.random.default_rng(0)
    ratios = rng.uniform(0.35, 0.65, g**3)
    ratios[0] = 0.5  # cell 0 holds 4 x 3 x 2 = 24 tokens: exactly 12
    cells = cell_ids(grid, g)
    sizes = np.bincount(cells.ravel(), minlength=g**3)
    total = np.zeros(g**3)
    draws = 1000
    for seed in range(draws):
        mask = grid_mask(grid, g, ratios, np.random.default_rng(seed))
        counts = np.bincount(cells[mask], minlength=g**3)
        assert np.all((counts == np.floor(ratios * sizes)) | (counts == np.ceil(ratios * sizes)))
        assert counts[0] == 12
        total += counts
    assert np.all(np.abs(total / draws - ratios * sizes) < 4 * 0.5 / math.sqrt(draws))


def test_masks_replay_from_their_seed_and_differ_between_seeds():
    ratios = np.full(64, 0.5)
    a = grid_mask((8, 8, 8), 4, ratios, np.random.default_rng(1))
    assert np.array_equal(a, grid_mask((8, 8, 8), 4, ratios, np.random.default_rng(1)))
    assert not np.array_equal(a, grid_mask((8, 8, 8), 4, ratios, np.random.default_rng(2)))


def test_deeper_levels_fire_with_the_configured_probability():
    """2000 draws: |frequency - 0.3| < 4 sigma, sigma = sqrt(0.3 x 0.7 / 2000) ~ 0.010, per level.
    With level_ratio 1 every cell (8 tokens, ratio 0.5) masks 4 tokens, so fired == mask.any()."""
    grids = [(8, 8, 8)] * 4
    ratios = np.full(64, 0.5)
    fired = np.array([
        [m.any() for m in hierarchical_masks(grids, 4, ratios, np.random.default_rng(seed), prob=0.3, level_ratio=1.0)]
        for seed in range(2000)
    ])
    assert fired[:, 0].all()
    sigma = math.sqrt(0.3 * 0.7 / 2000)
    assert np.all(np.abs(fired[:, 1:].mean(0) - 0.3) < 4 * sigma), fired.mean(0)


def test_the_ratio_halves_at_each_level_on_the_coarser_grids():
    grids = [(64, 64, 64), (64, 64, 64), (32, 32, 32), (16, 16, 16)]  # Swin on 128³: embedding, pos drop, stages 1, 2
    masks = hierarchical_masks(grids, 4, np.full(64, 0.5), np.random.default_rng(0), prob=1.0)
    assert [m.shape for m in masks] == grids
    for level, mask in enumerate(masks):  # r n per cell is an integer here: exact fractions
        assert mask.mean() == 0.5 * 0.5**level
    assert (masks[1] & ~masks[0]).any()  # each level draws its own tokens
