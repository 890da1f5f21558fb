"""MAE decoder and reconstruction loss, shared by MAE3D and GL-MAE (METHODS.md, "MAE3D")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glmae.models.patches import gather_tokens, patchify
from glmae.models.vit import Block, _init_weights, sincos_embedding


class MAEDecoder(nn.Module):
    """Visible tokens -> predicted patches of the masked tokens.

    Linear(encoder width -> width), mask tokens at the masked positions, sin-cos positions,
    `depth` blocks, norm, Linear(width -> C·p³) applied to the masked tokens only (the loss
    never looks at the others).
    """

    def __init__(self, encoder_width: int, width: int, depth: int, heads: int, patch: int, in_channels: int):
        super().__init__()
        self.embed = nn.Linear(encoder_width, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.pred = nn.Linear(width, in_channels * patch**3)
        self.apply(_init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(
        self, latent: torch.Tensor, keep: torch.Tensor, masked: torch.Tensor, grid: tuple[int, int, int]
    ) -> torch.Tensor:
        """latent (N, K, D_enc) of the visible tokens `keep` (N, K) -> predictions (N, M, C·p³)
        for the masked tokens `masked` (N, M), in a token grid of L = K + M tokens."""
        x = self.embed(latent)
        n, _, width = x.shape
        length = keep.shape[1] + masked.shape[1]
        full = self.mask_token.to(x.dtype).expand(n, length, width).clone()
        full.scatter_(1, keep.unsqueeze(-1).expand(-1, -1, width), x)
        x = full + sincos_embedding(grid, width, str(x.device), full.dtype)
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(gather_tokens(x, masked)))


def reconstruction_loss(
    pred: torch.Tensor, images: torch.Tensor, masked: torch.Tensor, patch: int, norm_pix: bool = True
) -> torch.Tensor:
    """MSE over masked patches only.

    pred (N, M, C·p³): predictions for the masked tokens `masked` (N, M) of images (N, C, X, Y, Z).
    With `norm_pix` each target patch is normalised to zero mean and unit variance (MAE).
    """
    target = gather_tokens(patchify(images, patch), masked).float()
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    return F.mse_loss(pred.float(), target)
