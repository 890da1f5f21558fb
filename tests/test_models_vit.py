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


def test_patch_size_keeps_its_int_form_and_takes_one_per_axis():
    from glmae.config import EncoderConfig, build, to_dict
    from glmae.errors import InputError

    assert build(EncoderConfig, {"arch": "vit", "patch_size": 8}).patch_size == 8
    assert build(EncoderConfig, {"arch": "vit", "patch_size": [8, 8, 8]}).patch_size == 8  # one spelling
    cfg = build(EncoderConfig, {"arch": "vit", "patch_size": [16, 16, 1]})
    assert cfg.patch_size == (16, 16, 1) and cfg.patch == (16, 16, 1)
    assert to_dict(cfg)["patch_size"] == [16, 16, 1]
    with pytest.raises(InputError, match="encoder.patch_size"):
        build(EncoderConfig, {"arch": "vit", "patch_size": [16, 0, 1]})


def test_2d_images_as_depth_1_volumes():
    """A 2D image (N, C, H, W, 1) with patch (p, p, 1): tokens are Conv3d's, positions a 2D grid."""
    torch.manual_seed(0)
    vit = tiny_vit(patch_size=(4, 4, 1), depth=0)
    x = torch.randn(2, 1, 16, 12, 1)
    tokens, _ = vit(x)
    assert tokens.shape == (2, 4 * 3, 24)
    conv = vit.patch_embedding.patch_embeddings
    assert conv.weight.shape == (24, 1, 4, 4, 1)
    expected = conv(x).flatten(2).transpose(1, 2) + sincos_embedding((4, 3, 1), 24)
    torch.testing.assert_close(tokens, vit.norm(expected))


def test_old_style_encoder_file_loads_unchanged(tmp_path):
    """An encoder written before per-axis patches (encoder.json with `patch_size: 8`, a Conv3d
    weight of (width, C, 8, 8, 8)) loads into today's ViT, whichever way the config spells the
    patch, with every tensor used and the same output as the convolution it holds."""
    import json

    from safetensors.torch import save_file

    from glmae.config import load_config
    from glmae.finetune import load_init
    from glmae.methods.segmentation import Segmenter

    torch.manual_seed(0)
    arch = {"arch": "vit", "in_channels": 1, "patch_size": 8, "width": 24, "depth": 2, "heads": 2,
            "mlp_ratio": 4.0, "qkv_bias": True, "drop_path": 0.0}
    weights = {"patch_embedding.patch_embeddings.weight": torch.randn(24, 1, 8, 8, 8),
               "patch_embedding.patch_embeddings.bias": torch.randn(24), "norm.weight": torch.ones(24),
               "norm.bias": torch.zeros(24)}
    for i in range(2):
        weights |= {f"blocks.{i}.{name}": torch.randn(*shape) * 0.1 for name, shape in [
            ("norm1.weight", (24,)), ("norm1.bias", (24,)), ("attn.qkv.weight", (72, 24)), ("attn.qkv.bias", (72,)),
            ("attn.out_proj.weight", (24, 24)), ("attn.out_proj.bias", (24,)), ("norm2.weight", (24,)),
            ("norm2.bias", (24,)), ("mlp.linear1.weight", (96, 24)), ("mlp.linear1.bias", (96,)),
            ("mlp.linear2.weight", (24, 96)), ("mlp.linear2.bias", (24,))]}
    save_file(weights, tmp_path / "encoder.safetensors", metadata={"format": "glmae-encoder/1"})
    meta = {"format": "glmae-encoder/1", "encoder": arch, "method": "mae3d", "steps": 10}
    (tmp_path / "encoder.json").write_text(json.dumps(meta))
    for spelling in (8, [8, 8, 8]):
        cfg = load_config("unetr_tiny", ["encoder.width=24", "encoder.depth=2", "encoder.heads=2",
                                         f"encoder.patch_size={spelling}", "method.labels={0: bg, 1: a}"])
        model = Segmenter(cfg.encoder, cfg.method)
        report = load_init(model.net.encoder, str(tmp_path / "encoder.safetensors"), cfg)
        assert f"loaded {len(weights)} tensors, missing 0" in report and "unexpected 0" in report
        vit = model.net.encoder.eval()
        x = torch.randn(1, 1, 16, 16, 8)
        conv = torch.nn.functional.conv3d(x, weights["patch_embedding.patch_embeddings.weight"],
                                          weights["patch_embedding.patch_embeddings.bias"], stride=8)
        torch.testing.assert_close(vit.patch_embedding(x), conv.flatten(2).transpose(1, 2)
                                   + sincos_embedding((2, 2, 1), 24))


def test_a_learned_table_is_used_at_its_grid_and_resampled_trilinearly_for_others():
    import torch.nn.functional as F

    torch.manual_seed(0)
    vit = tiny_vit(depth=0, learned_pos_grid=(2, 3, 2))  # embedding + final norm: tokens do not interact
    table = vit.patch_embedding.position_embeddings  # (1, 12, 24), MONAI's name and layout
    assert table.shape == (1, 12, 24) and table.requires_grad
    x = torch.randn(1, 1, 8, 12, 8)
    without = tiny_vit(depth=0)
    without.load_state_dict({k: v for k, v in vit.state_dict().items() if "position" not in k})
    patches = without.patch_embedding(x) - sincos_embedding((2, 3, 2), 24)
    torch.testing.assert_close(vit.patch_embedding(x), patches + table)

    big = torch.randn(1, 1, 16, 12, 4)  # grid (4, 3, 1)
    volume = table[0].T.reshape(1, 24, 2, 3, 2)
    expected = F.interpolate(volume, size=(4, 3, 1), mode="trilinear", align_corners=False).reshape(24, 12).T
    patches = without.patch_embedding(big) - sincos_embedding((4, 3, 1), 24)
    torch.testing.assert_close(vit.patch_embedding(big), patches + expected)


def test_learned_position_embeddings_are_not_weight_decayed():
    from glmae.engine.optim import no_decay

    vit = tiny_vit(learned_pos_grid=(2, 2, 2))
    params = dict(vit.named_parameters())
    assert no_decay("patch_embedding.position_embeddings", params["patch_embedding.position_embeddings"])
    assert not no_decay("patch_embedding.patch_embeddings.weight", params["patch_embedding.patch_embeddings.weight"])
