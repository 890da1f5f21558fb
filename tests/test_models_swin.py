"""The Swin encoder is MONAI's Swin-UNETR backbone: same keys, same computation, lr decay by stage."""

import pytest
import torch
from monai.networks.nets import SwinUNETR as MonaiSwinUNETR

from glmae import config as cfglib
from glmae.engine.optim import param_groups
from glmae.errors import InputError
from glmae.models.swin import SwinConfig, SwinUNETR, last_width, stride, swin_encoder
from glmae.models.vit import ViTConfig

CFG = SwinConfig(feature_size=12, window=4)


def test_the_encoder_loads_strictly_into_monai_swin_unetr_and_computes_the_same():
    torch.manual_seed(0)
    encoder = swin_encoder(CFG).eval()
    monai = MonaiSwinUNETR(in_channels=1, out_channels=3, feature_size=12, window_size=4).eval()
    monai.swinViT.load_state_dict(encoder.state_dict(), strict=True)
    x = torch.rand(1, 1, 64, 64, 32)
    ours, theirs = encoder(x), monai.swinViT(x)
    assert [tuple(o.shape) for o in ours] == [(1, 12, 32, 32, 16), (1, 24, 16, 16, 8), (1, 48, 8, 8, 4),
                                             (1, 96, 4, 4, 2), (1, 192, 2, 2, 1)]
    assert last_width(CFG) == 192 and stride(CFG) == 32
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_our_swin_unetr_is_monais_with_layer_decay_over_the_stages():
    net = SwinUNETR(CFG, out_channels=3)
    assert net.state_dict().keys() == MonaiSwinUNETR(1, 3, feature_size=12, window_size=4).state_dict().keys()
    assert net.encoder is net.swinViT and net.num_layers == 5
    assert net.layer_of("swinViT.patch_embed.proj.weight") == 0
    assert net.layer_of("swinViT.layers3.0.blocks.1.attn.qkv.weight") == 3
    assert net.layer_of("swinViT.layers4.0.downsample.reduction.weight") == 4
    assert net.layer_of("decoder1.conv_block.conv1.conv.weight") == 5
    groups = param_groups(net, 0.05, 0.5, net.layer_of, net.num_layers)
    scales = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    assert scales[id(net.swinViT.patch_embed.proj.weight)] == 0.5**5
    assert scales[id(net.swinViT.layers1[0].blocks[0].mlp.linear1.weight)] == 0.5**4
    assert scales[id(net.out.conv.conv.weight)] == 1.0


def test_feature_size_must_suit_monai():
    with pytest.raises(InputError, match="multiple of 12"):
        swin_encoder(SwinConfig(feature_size=16))


def test_a_swin_config_loads_before_anything_imported_its_module(monkeypatch):
    """An arch missing from the registry (here only "vit" is registered) makes the config machinery
    import the plugin modules, where "swin" registers."""
    import glmae.methods  # noqa: F401  (registers the methods; swin is already imported)

    monkeypatch.setattr(cfglib, "_ENCODERS", {"vit": ViTConfig})
    monkeypatch.setattr(cfglib, "_load_plugins", lambda: cfglib._ENCODERS.update(swin=SwinConfig))
    assert isinstance(cfglib.load_config("swin_unetr_tiny").encoder, SwinConfig)
