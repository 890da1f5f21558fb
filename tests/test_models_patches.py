import numpy as np
import pytest
import torch
import torch.nn.functional as F

from glmae.models.patches import (
    adapt_in_channels,
    gather_tokens,
    mask_from_indices,
    patch_shape,
    patchify,
    random_masking,
    token_grid,
    unpatchify,
)


def test_unpatchify_inverts_patchify():
    x = torch.randn(2, 3, 16, 24, 8)
    p = patchify(x, 8)
    assert p.shape == (2, 2 * 3 * 1, 3 * 8**3)
    assert torch.equal(unpatchify(p, 8, (2, 3, 1)), x)


def test_patch_order_matches_conv3d():
    """Token order and in-patch layout are those of Conv3d(kernel=stride=p).flatten(2)."""
    x = torch.randn(2, 2, 8, 12, 4)
    conv = torch.nn.Conv3d(2, 5, kernel_size=4, stride=4)
    expected = conv(x).flatten(2).transpose(1, 2)
    got = F.linear(patchify(x, 4), conv.weight.flatten(1), conv.bias)
    torch.testing.assert_close(got, expected)


def test_patch_values_by_hand():
    x = torch.arange(2 * 4 * 2 * 2, dtype=torch.float32).reshape(1, 2, 4, 2, 2)
    p = patchify(x, 2)  # grid (2, 1, 1); the second token covers x[..., 2:4, :, :]
    assert torch.equal(p[0, 1], torch.cat([x[0, 0, 2:4].flatten(), x[0, 1, 2:4].flatten()]))


def test_token_grid_rejects_indivisible_sides():
    with pytest.raises(ValueError, match="multiples"):
        token_grid((16, 15, 16), 8)


@pytest.mark.parametrize("length,ratio", [(216, 0.75), (1000, 0.75), (64, 0.6), (7, 0.5), (512, 0.9)])
def test_random_masking_counts_and_partition(length, ratio):
    rng = np.random.default_rng(1)
    keep, masked = random_masking(length, ratio, rng)
    assert len(keep) == int(round((1 - ratio) * length))
    assert len(keep) + len(masked) == length
    assert np.array_equal(np.sort(np.concatenate([keep, masked])), np.arange(length))
    assert np.all(np.diff(keep) > 0) and np.all(np.diff(masked) > 0)


def test_random_masking_is_seeded():
    a = random_masking(216, 0.75, np.random.default_rng(5))
    b = random_masking(216, 0.75, np.random.default_rng(5))
    c = random_masking(216, 0.75, np.random.default_rng(6))
    assert np.array_equal(a[0], b[0]) and not np.array_equal(a[0], c[0])


def test_random_masking_refuses_empty_visible_set():
    with pytest.raises(ValueError):
        random_masking(8, 1.0, np.random.default_rng(0))


def test_gather_and_mask_helpers():
    x = torch.arange(2 * 5 * 3).reshape(2, 5, 3)
    idx = torch.tensor([[0, 4], [2, 3]])
    assert torch.equal(gather_tokens(x, idx)[1, 0], x[1, 2])
    m = mask_from_indices(idx, 5)
    assert m.tolist() == [[1, 0, 0, 0, 1], [0, 0, 1, 1, 0]]


@pytest.mark.parametrize("patch", [(4, 4, 2), (8, 8, 1), (2, 4, 8)])
def test_anisotropic_round_trip_and_conv3d_order(patch):
    """Per-axis patches: unpatchify inverts patchify, and tokens are Conv3d(kernel=stride=patch)'s."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 24, 8)
    p = patchify(x, patch)
    grid = token_grid(x.shape[2:], patch)
    assert grid == (16 // patch[0], 24 // patch[1], 8 // patch[2])
    assert p.shape == (2, grid[0] * grid[1] * grid[2], 3 * patch[0] * patch[1] * patch[2])
    assert torch.equal(unpatchify(p, patch, grid), x)
    conv = torch.nn.Conv3d(3, 5, kernel_size=patch, stride=patch)
    torch.testing.assert_close(F.linear(p, conv.weight.flatten(1), conv.bias), conv(x).flatten(2).transpose(1, 2))


def test_2d_image_as_depth_1_volume_by_hand():
    """A 4x4 image with 2x2x1 patches: token 1 is the top-right 2x2 block of rows 0-1, cols 2-3."""
    image = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4, 1)
    p = patchify(image, (2, 2, 1))
    assert p.shape == (1, 4, 4)
    assert p[0, 1].tolist() == [2.0, 3.0, 6.0, 7.0]
    assert torch.equal(unpatchify(p, (2, 2, 1), (2, 2, 1)), image)


def test_int_patch_is_a_cube_and_bad_patches_are_refused():
    x = torch.randn(1, 1, 8, 8, 8)
    assert torch.equal(patchify(x, 4), patchify(x, (4, 4, 4)))
    assert patch_shape(4) == (4, 4, 4) and patch_shape([16, 16, 1]) == (16, 16, 1)
    with pytest.raises(ValueError, match="multiples of the patch size 4x4x3"):
        token_grid((8, 8, 8), (4, 4, 3))
    with pytest.raises(ValueError):
        patch_shape((16, 16))


@pytest.mark.parametrize("how,c_in,c_out", [("average", 1, 4), ("repeat", 1, 4), ("average", 4, 1),
                                            ("average", 2, 3), ("repeat", 2, 4)])
def test_an_adapted_patch_embedding_gives_the_original_output_on_identical_channels(how, c_in, c_out):
    weight = torch.randn(6, c_in, 2, 2, 2, dtype=torch.float64)
    image = torch.randn(1, 1, 4, 4, 4, dtype=torch.float64)
    adapted = adapt_in_channels(weight, c_out, how)
    assert adapted.shape == (6, c_out, 2, 2, 2)
    original = F.conv3d(image.expand(-1, c_in, -1, -1, -1), weight, stride=2)
    torch.testing.assert_close(F.conv3d(image.expand(-1, c_out, -1, -1, -1), adapted, stride=2), original)


def test_repeat_keeps_each_channels_filter_and_average_mixes_them():
    weight = torch.stack([torch.ones(2, 2, 2), -torch.ones(2, 2, 2)])[None]  # (1, 2, 2, 2, 2)
    assert adapt_in_channels(weight, 4, "repeat")[0, :, 0, 0, 0].tolist() == [0.5, -0.5, 0.5, -0.5]
    assert adapt_in_channels(weight, 4, "average")[0, :, 0, 0, 0].tolist() == [0.0] * 4
    with pytest.raises(ValueError, match="channel adaptation"):
        adapt_in_channels(weight, 4, "tile")
