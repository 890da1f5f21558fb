import numpy as np
import pytest
import torch
import torch.nn.functional as F

from glmae.models.patches import gather_tokens, mask_from_indices, patchify, random_masking, token_grid, unpatchify


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
