"""The Swin transformer of Swin-UNETR (MONAI's `SwinTransformer`), its config, and Swin-UNETR.

The encoder is MONAI's own `SwinTransformer`, built with the arguments `SwinUNETR` gives its
`swinViT`, so its state dict has exactly the keys of `SwinUNETR(...).swinViT` (`patch_embed.proj.*`,
`layers1.0.blocks.0.attn.qkv.weight`, ...) and a pretrained encoder loads into MONAI's Swin-UNETR
with `strict=True`.

Layout for a crop of side X and patch p: the patch embedding gives a grid of X/p tokens with
`feature_size` channels; stage k = 1..4 (`layers{k}`) runs its blocks and then merges 2x2x2 tokens,
so it outputs X/(p·2^k) tokens with feature_size·2^k channels: the last stage has X/(16p) tokens of
16·feature_size channels (768 for feature size 48). MONAI's Swin-UNETR requires every side of its
input to be a multiple of p^5 (32 for p = 2).

`use_flash_attention` is on: MONAI then computes the windowed attention with PyTorch's fused kernel
whenever autograd is off (GMIM's target branch, sliding-window inference); it has no parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import monai.networks.nets
from monai.networks.nets.swin_unetr import SwinTransformer

from glmae.config import EncoderConfig, register_encoder
from glmae.errors import InputError

STAGES = 4  # MONAI's SwinTransformer has exactly four stages (layers1 .. layers4)


@register_encoder("swin")
@dataclass
class SwinConfig(EncoderConfig):
    """Swin transformer as in Swin-UNETR (METHODS.md, GMIM): feature 48, depths 2-2-2-2, heads
    3-6-12-24, window 7, patch 2."""

    arch: str = "swin"
    feature_size: int = 48  # channels of the patch embedding; a multiple of 12 (MONAI's Swin-UNETR)
    depths: tuple[int, int, int, int] = (2, 2, 2, 2)  # blocks per stage
    heads: tuple[int, int, int, int] = (3, 6, 12, 24)  # attention heads per stage
    window: int = 7  # attention window side, in tokens
    patch_size: int = 2
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path: float = 0.0  # stochastic depth, rising linearly over the blocks to this rate


def _check(cfg: SwinConfig) -> None:
    if cfg.feature_size % 12:
        raise InputError(f"config: encoder.feature_size must be a multiple of 12 (MONAI's Swin-UNETR), "
                         f"got {cfg.feature_size}")


def last_width(cfg: SwinConfig) -> int:
    """Channels of the last stage's output: 16 x feature size."""
    return cfg.feature_size * 2**STAGES


def stride(cfg: SwinConfig) -> int:
    """Voxels per last-stage token along an axis: patch x 2^4."""
    return cfg.patch_size * 2**STAGES


def swin_encoder(cfg: SwinConfig) -> SwinTransformer:
    """MONAI's SwinTransformer as Swin-UNETR builds it: x (N, C, X, Y, Z) -> five (N, C_k, ...)
    feature maps (patch embedding, stages 1-4), layer-normed per token by default."""
    _check(cfg)
    return SwinTransformer(
        in_chans=cfg.in_channels, embed_dim=cfg.feature_size, window_size=(cfg.window,) * 3,
        patch_size=(cfg.patch_size,) * 3, depths=cfg.depths, num_heads=cfg.heads, mlp_ratio=cfg.mlp_ratio,
        qkv_bias=cfg.qkv_bias, drop_path_rate=cfg.drop_path, downsample="merging", use_flash_attention=True,
    )


class SwinUNETR(monai.networks.nets.SwinUNETR):
    """MONAI's Swin-UNETR, unchanged (same parameters, names and computation), plus what fine-tuning
    asks of a network: `encoder` (the pretrained part), `num_layers` and `layer_of(name)` for
    layer-wise lr decay over the Swin stages."""

    def __init__(self, encoder: SwinConfig, out_channels: int, norm_name: str = "instance"):
        _check(encoder)
        super().__init__(
            in_channels=encoder.in_channels, out_channels=out_channels, patch_size=encoder.patch_size,
            depths=encoder.depths, num_heads=encoder.heads, window_size=encoder.window,
            qkv_bias=encoder.qkv_bias, mlp_ratio=encoder.mlp_ratio, feature_size=encoder.feature_size,
            norm_name=norm_name, dropout_path_rate=encoder.drop_path, use_flash_attention=True,
        )

    @property
    def encoder(self) -> SwinTransformer:
        return self.swinViT

    @property
    def num_layers(self) -> int:
        return STAGES + 1

    def layer_of(self, name: str) -> int:
        """0 the patch embedding, k stage k (its blocks and its patch merging), `num_layers` the
        rest (the convolutional encoder and decoder)."""
        if name.startswith("swinViT.patch_embed."):
            return 0
        if name.startswith("swinViT.layers"):
            return int(name[len("swinViT.layers")])
        return self.num_layers
