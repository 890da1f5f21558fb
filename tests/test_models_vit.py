import math

import pytest
import torch

from glmae.models.vit import ViT, ViTConfig, sincos_embedding


def reference_sincos(grid, width):
    """The 3D sin-cos embedding written out: per axis a block [sin(pos w_k), cos(pos w_k)],
    w_k = 10000^(-k / (width / 6)); blocks in the order (axis 1, axis 0, axis 2) as in MONAI."""
    d = width // 6
    rows = []
    for i in range(grid[0]):
        for j in range(grid[1]):
            for k in range(grid[2]):
                row = []
                for pos in (j, i, k):
                    freqs = [10000 ** (-n / d) for n in range(d)]
                    row += [math.sin(pos * f) for f in freqs] + [math.cos(pos * f) for f in freqs]
                rows.append(row)
    return torch.tensor(rows)


def test_sincos_matches_reference_formula():
    emb = sincos_embedding((2, 3, 4), 12)
    assert emb.shape == (24, 12)
    torch.testing.assert_close(emb, reference_sincos((2, 3, 4), 12), rtol=1e-5, atol=1e-6)


def test_sincos_needs_width_divisible_by_6():
    with pytest.raises(ValueError):
        sincos_embedding((2, 2, 2), 16)


def tiny_vit(**kw):
    return ViT(ViTConfig(**{"patch_size": 4, "width": 24, "depth": 3, "heads": 2, **kw}))


def test_output_shapes_and_hidden_blocks():
    vit = tiny_vit(in_channels=2)
    x = torch.randn(2, 2, 16, 8, 12)
    tokens, hidden = vit(x, out_blocks=(0, 2))
    assert tokens.shape == (2, 4 * 2 * 3, 24)
    assert len(hidden) == 2 and all(h.shape == tokens.shape for h in hidden)
    # the last hidden state is the output before the final norm
    torch.testing.assert_close(vit.norm(hidden[1]), tokens)


def test_subset_of_all_tokens_equals_full_forward():
    torch.manual_seed(0)
    vit = tiny_vit()
    x = torch.randn(2, 1, 16, 16, 8)
    full, _ = vit(x)
    keep = torch.arange(full.shape[1]).expand(2, -1)
    subset, _ = vit(x, keep)
    torch.testing.assert_close(subset, full, rtol=1e-5, atol=1e-5)


def test_subset_tokens_see_their_own_positions():
    """A visible subset is embedded at its own grid positions (not renumbered)."""
    torch.manual_seed(0)
    vit = tiny_vit(depth=0)  # embedding + final norm only: tokens do not interact
    x = torch.randn(1, 1, 8, 8, 8)
    full, _ = vit(x)
    keep = torch.tensor([[1, 5, 6]])
    subset, _ = vit(x, keep)
    torch.testing.assert_close(subset[0], full[0, [1, 5, 6]])


def test_one_encoder_serves_any_grid():
    vit = tiny_vit()
    for shape in [(16, 16, 16), (8, 12, 20)]:
        tokens, _ = vit(torch.randn(1, 1, *shape))
        assert tokens.shape[1] == math.prod(s // 4 for s in shape)


def test_paper_encoders_follow_methods_table():
    """The packaged paper configs are the named ViT presets (METHODS.md, "Shared backbone")."""
    from glmae.config import load_config

    def arch(name):
        e = load_config(name).encoder
        return dict(width=e.width, depth=e.depth, heads=e.heads, patch_size=e.patch_size)

    assert arch("glmae_vit_base") == dict(width=768, depth=12, heads=12, patch_size=16)
    assert arch("glmae_vit_tiny") == dict(width=192, depth=12, heads=3, patch_size=16)
    assert arch("mae3d_vit_base") == arch("unetr_vit_base") == arch("glmae_vit_base")


def test_parameter_names_are_a_subset_of_monai_vit():
    from monai.networks.nets import ViT as MonaiViT

    ours = ViT(ViTConfig(patch_size=16, width=48, depth=2, heads=2))
    monai = MonaiViT(1, (32, 32, 32), 16, hidden_size=48, mlp_dim=192, num_layers=2, num_heads=2, qkv_bias=True)
    missing = set(ours.state_dict()) - set(monai.state_dict())
    assert not missing, missing


def test_matches_monai_vit_with_copied_weights():
    from monai.networks.nets import ViT as MonaiViT

    torch.manual_seed(0)
    ours = ViT(ViTConfig(patch_size=8, width=48, depth=2, heads=4)).eval()
    monai = MonaiViT(
        1, (16, 24, 16), 8, hidden_size=48, mlp_dim=192, num_layers=2, num_heads=4, qkv_bias=True,
        pos_embed_type="sincos",
    ).eval()
    monai.load_state_dict(ours.state_dict(), strict=False)
    x = torch.randn(2, 1, 16, 24, 16)
    expected, expected_hidden = monai(x)
    got, hidden = ours(x, out_blocks=(0, 1))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(hidden[0], expected_hidden[0], rtol=1e-4, atol=1e-5)
