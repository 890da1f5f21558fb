"""UNETR (Hatamizadeh et al. 2022) on our ViT, built from MONAI's UNETR blocks.

The layout and parameter names are those of `monai.networks.nets.UNETR` (`vit.*`, `encoder1`,
`encoder2`, ..., `decoder5`, ..., `out`), so a model with patch 16 and 12 blocks exports to MONAI
by copying the weights (`glmae.export`).

MONAI fixes patch 16, i.e. S = 4 up-sampling stages between the token grid and the voxels. We
generalise to any power-of-two patch p = 2^S (S >= 1):

- `encoder1`: a residual conv block on the input at full resolution (`feature_size` channels);
- `encoder{k+1}` for k = 1 .. S-1: the hidden state after block k·depth // S, projected to the
  token grid and brought to resolution 1/2^k by a transposed conv plus S-1-k up-sampling conv
  blocks (`UnetrPrUpBlock(num_layer=S-1-k)`), `feature_size·2^k` channels;
- `decoder{k+2}` for k = S-1 .. 0: up-sample by 2 and merge with `encoder{k+1}`; the deepest one
  starts from the final (normed) encoder output;
- `out`: a 1x1x1 conv to the classes.

For p = 16 this is MONAI's UNETR exactly, for any depth: skips after blocks d//4, d//2, 3d//4
(0-based; MONAI's hidden_states_out[3], [6], [9] for d = 12), encoder2/3/4 with 2/1/0 up-sampling
blocks, decoder5 .. decoder2. For p = 8 (the *_tiny configs) there is one stage fewer: skips after
blocks d//3 and 2d//3, encoder2/3 with 1/0 up-sampling blocks, decoder4 .. decoder2.

Anisotropic patches (16x16x2, or 16x16x1 for 2D images) are refused: every stage of this decoder
doubles every axis, so an axis with a smaller patch would need stages that up-sample only some
axes, which neither MONAI's UNETR nor its published weights have. One clear line says so
(`num_stages`); fine-tuning checks it before anything is written.
"""

from __future__ import annotations

import torch
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
from torch import nn

from glmae.models.patches import Patch, patch_shape, token_grid
from glmae.models.vit import ViT, ViTBackbone, ViTConfig


def num_stages(patch: Patch) -> int:
    """Up-sampling stages S for a cubic patch of side p = 2^S."""
    shape = patch_shape(patch)
    if len(set(shape)) > 1:
        raise ValueError(f"UNETR needs the same patch size on every axis (its decoder doubles every axis at "
                         f"each stage), got {'x'.join(map(str, shape))}")
    patch = shape[0]
    if patch < 2 or patch & (patch - 1):
        raise ValueError(f"UNETR needs a power-of-two patch size, got {patch}")
    return patch.bit_length() - 1


def skip_blocks(depth: int, patch: Patch) -> tuple[int, ...]:
    """0-based blocks whose outputs feed the skip connections: k·depth // S for k = 1 .. S-1."""
    stages = num_stages(patch)
    blocks = tuple(k * depth // stages for k in range(1, stages))
    if len(set(blocks)) < len(blocks):
        raise ValueError(f"UNETR with patch {patch} needs at least {stages - 1} blocks, got depth {depth}")
    return blocks


class UNETR(ViTBackbone, nn.Module):
    """(N, C, X, Y, Z) -> logits (N, out_channels, X, Y, Z); sides must be multiples of the patch."""

    def __init__(self, encoder: ViTConfig, out_channels: int, feature_size: int = 16, norm_name: str = "instance"):
        super().__init__()
        self.patch = encoder.patch_size
        stages = num_stages(self.patch)
        self.skips = skip_blocks(encoder.depth, self.patch)
        width, f = encoder.width, feature_size
        block = dict(spatial_dims=3, kernel_size=3, norm_name=norm_name, res_block=True)
        self.vit = ViT(encoder)
        self.encoder1 = UnetrBasicBlock(in_channels=encoder.in_channels, out_channels=f, stride=1, **block)
        for k in range(1, stages):
            up = UnetrPrUpBlock(
                in_channels=width, out_channels=f * 2**k, num_layer=stages - 1 - k, stride=1,
                upsample_kernel_size=2, conv_block=True, **block,
            )
            self.add_module(f"encoder{k + 1}", up)
        for k in reversed(range(stages)):
            source = width if k == stages - 1 else f * 2 ** (k + 1)
            up = UnetrUpBlock(in_channels=source, out_channels=f * 2**k, upsample_kernel_size=2, **block)
            self.add_module(f"decoder{k + 2}", up)
        self.out = UnetOutBlock(spatial_dims=3, in_channels=f, out_channels=out_channels)
        self.stages = stages

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = token_grid(x.shape[2:], self.patch)
        tokens, hidden = self.vit(x, out_blocks=self.skips)

        def volume(t: torch.Tensor) -> torch.Tensor:  # (N, L, D) -> (N, D, gx, gy, gz)
            return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], *grid)

        skips = [self.encoder1(x)] + [getattr(self, f"encoder{k + 1}")(volume(h)) for k, h in enumerate(hidden, 1)]
        y = volume(tokens)
        for k in reversed(range(self.stages)):
            y = getattr(self, f"decoder{k + 2}")(y, skips[k])
        return self.out(y)
