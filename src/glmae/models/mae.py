"""The masked autoencoder of MAE3D and GL-MAE: ViT encoder, MAE decoder, reconstruction loss
(METHODS.md, "MAE3D")."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from glmae.models.patches import Patch, gather_tokens, patch_volume, patchify, token_grid, unpatchify
from glmae.models.vit import Block, ViT, ViTConfig, init_weights, sincos_embedding


class MAEDecoder(nn.Module):
    """Visible tokens -> predicted patches of the masked tokens.

    Linear(encoder width -> width), mask tokens at the masked positions, sin-cos positions,
    `depth` blocks, norm, Linear(width -> C·px·py·pz) applied to the masked tokens only (the loss
    never looks at the others). Any patch shape, 2D (p, p, 1) included.
    """

    def __init__(self, encoder_width: int, width: int, depth: int, heads: int, patch: Patch, in_channels: int):
        super().__init__()
        self.embed = nn.Linear(encoder_width, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.pred = nn.Linear(width, in_channels * patch_volume(patch))
        self.apply(init_weights)
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
    pred: torch.Tensor, images: torch.Tensor, masked: torch.Tensor, patch: Patch, norm_pix: bool = True
) -> torch.Tensor:
    """MSE over masked patches only.

    pred (N, M, C·px·py·pz): predictions for the masked tokens `masked` (N, M) of images (N, C, X, Y, Z).
    With `norm_pix` each target patch is normalised to zero mean and unit variance (MAE).
    """
    target = gather_tokens(patchify(images, patch), masked).float()
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    return F.mse_loss(pred.float(), target)


class MaskedAutoencoder(nn.Module):
    """ViT encoder + MAE decoder; the reconstruction core of MAE3D and GL-MAE."""

    def __init__(self, encoder: ViTConfig, decoder_width: int, decoder_depth: int, decoder_heads: int,
                 norm_pix: bool = True):
        super().__init__()
        self.patch = encoder.patch
        self.norm_pix = norm_pix
        self.encoder = ViT(encoder)
        self.decoder = MAEDecoder(
            encoder.width, decoder_width, decoder_depth, decoder_heads, encoder.patch_size, encoder.in_channels
        )

    @property
    def export_encoder(self) -> nn.Module:
        """The encoder written to encoder.safetensors."""
        return self.encoder

    def reconstruct(self, images: torch.Tensor, keep: torch.Tensor, masked: torch.Tensor):
        """images (N, C, X, Y, Z), keep (N, K), masked (N, M) -> (loss, predictions (N, M, C·p³),
        visible-token features (N, K, D))."""
        latent, _ = self.encoder(images, keep)
        pred = self.decoder(latent, keep, masked, token_grid(images.shape[2:], self.patch))
        return reconstruction_loss(pred, images, masked, self.patch, self.norm_pix), pred, latent

    def reconstruction_volumes(self, images, keep, masked, pred) -> tuple[np.ndarray, np.ndarray]:
        """First sample's masked input (masked patches NaN) and reconstruction as (X, Y, Z) arrays
        of channel 0, the predicted patches mapped back with the true patches' mean and std."""
        grid = token_grid(images.shape[2:], self.patch)
        patches = patchify(images[:1].float(), self.patch)
        pred = pred[:1].float()
        if self.norm_pix:
            target = gather_tokens(patches, masked[:1])
            pred = pred * (target.var(-1, keepdim=True) + 1e-6).sqrt() + target.mean(-1, keepdim=True)
        index = masked[:1].unsqueeze(-1).expand(-1, -1, patches.shape[-1])
        shown = patches.scatter(1, index, torch.full_like(pred, float("nan")))
        recon = patches.scatter(1, index, pred)
        to_np = lambda p: unpatchify(p, self.patch, grid)[0, 0].detach().cpu().numpy()  # noqa: E731
        return to_np(shown), to_np(recon)
