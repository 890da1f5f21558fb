import pytest
import torch

from glmae.models.unetr import UNETR, num_stages, skip_blocks
from glmae.models.vit import ViTConfig


def test_skip_blocks_follow_monai_for_patch_16():
    assert num_stages(16) == 4
    assert skip_blocks(12, 16) == (3, 6, 9)  # MONAI's hidden_states_out[3], [6], [9]
    assert skip_blocks(8, 16) == (2, 4, 6)  # d//4, d//2, 3d//4
    assert skip_blocks(6, 8) == (2, 4)  # one stage fewer: d//3, 2d//3
    with pytest.raises(ValueError, match="power-of-two"):
        num_stages(12)
    with pytest.raises(ValueError, match="at least 3 blocks"):
        skip_blocks(2, 16)


def test_patch_16_has_monai_parameter_names():
    from monai.networks.nets import UNETR as MonaiUNETR

    ours = UNETR(ViTConfig(width=48, depth=12, heads=4, patch_size=16), out_channels=3)
    theirs = MonaiUNETR(1, 3, (32, 32, 32), hidden_size=48, mlp_dim=192, num_heads=4, qkv_bias=True)
    extra = {"vit.patch_embedding.position_embeddings"} | {f"vit.blocks.{i}.norm_cross_attn.{p}"
                                                           for i in range(12) for p in ("weight", "bias")}
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert shapes == {k: v.shape for k, v in theirs.state_dict().items() if k not in extra}


def test_patch_8_has_one_stage_fewer_and_trains_every_parameter():
    torch.manual_seed(0)
    net = UNETR(ViTConfig(width=24, depth=3, heads=2, patch_size=8, in_channels=2), out_channels=4, feature_size=4)
    names = [name for name, _ in net.named_children()]
    assert names == ["vit", "encoder1", "encoder2", "encoder3", "decoder4", "decoder3", "decoder2", "out"]
    assert len(net.encoder2.blocks) == 1 and len(net.encoder3.blocks) == 0  # PrUp layers S-1-k
    x = torch.randn(2, 2, 16, 24, 8)
    y = net(x)
    assert y.shape == (2, 4, 16, 24, 8)
    y.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_layer_of_for_layer_wise_decay():
    net = UNETR(ViTConfig(width=24, depth=3, heads=2, patch_size=8), out_channels=2, feature_size=4)
    assert net.num_layers == 4
    assert net.layer_of("vit.patch_embedding.patch_embeddings.weight") == 0
    assert net.layer_of("vit.blocks.0.attn.qkv.weight") == 1
    assert net.layer_of("vit.blocks.2.mlp.linear2.bias") == 3
    assert net.layer_of("vit.norm.weight") == 4
    assert net.layer_of("decoder2.conv_block.conv1.conv.weight") == 4


def test_anisotropic_patches_are_refused_with_one_line():
    with pytest.raises(ValueError, match="same patch size on every axis .* got 16x16x2"):
        UNETR(ViTConfig(width=24, depth=4, heads=2, patch_size=(16, 16, 2)), out_channels=2)


def test_finetune_refuses_unetr_with_anisotropic_patches(tmp_path, run_cli):
    from segdata import write_msd

    data = write_msd(tmp_path / "data", cases=3)
    code, _, err = run_cli("finetune", "--config", "unetr_tiny", "--data", data, "--out", tmp_path / "run",
                           "--set", "encoder.patch_size=[8,8,4]")
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines() == ["glmae: error: config: encoder.patch_size: UNETR needs the same patch size "
                                        "on every axis (its decoder doubles every axis at each stage), got 8x8x4"]
    assert not (tmp_path / "run").exists()
