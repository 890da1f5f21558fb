"""3D Vision Transformer encoder shared by MAE3D, GL-MAE, UNETR and the image classifier.

- Patch embedding: Conv3d with kernel = stride = patch, computed as a matrix product on the
  patches that are actually visible (masked tokens are never embedded). The patch is one side
  (`patch_size: 16`, a cube, as every 3D config and checkpoint has it) or one per axis
  (`patch_size: [16, 16, 1]`). 2D images are depth-1 volumes (N, C, H, W, 1) with patch
  (p, p, 1): the same encoder, the same checkpoints format, no 2D copy of any module. A patch with
  equal sides is stored as the int (`[8, 8, 8]` becomes `8`), so one architecture has one spelling
  and encoder files compare equal whichever way a config wrote it.
- Position embedding: fixed 3D sin-cos (MONAI's `build_sincos_position_embedding`) for the token
  grid of each input, so one encoder serves 160³ and 96³ views and any fine-tuning ROI. On a
  depth-1 grid (2D images) the z third of the channels is the same for every token: a constant
  that the first linear layers absorb, in exchange for one embedding for 2D and 3D. Positions are
  token indices, so with anisotropic patches a step along each axis is one patch.
  Imported weights may bring a learned table instead (`learned_pos_grid`, e.g. MONAI's default
  ViT): it is resampled trilinearly for inputs of another token grid.
- No cls token. Attention through `scaled_dot_product_attention`.
- Parameter names follow `monai.networks.nets.ViT` (`patch_embedding.patch_embeddings`,
  `blocks.i.attn.qkv`, `blocks.i.mlp.linear1`, ...), so export to MONAI is a copy plus the
  position embedding.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding
from monai.networks.layers import DropPath
from torch import nn
from torch.utils.checkpoint import checkpoint

from glmae.config import EncoderConfig, register_encoder
from glmae.errors import InputError
from glmae.models.patches import Patch, gather_tokens, patch_shape, patchify, token_grid


@register_encoder("vit")
@dataclass
class ViTConfig(EncoderConfig):
    """3D ViT (METHODS.md, "Shared backbone")."""

    arch: str = "vit"
    patch_size: int | tuple[int, int, int] = 16  # one side (a cube) or (x, y, z), e.g. [16, 16, 1] for 2D
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path: float = 0.0
    # None: fixed sin-cos position embeddings. A token grid (gx, gy, gz): a learned table for that grid
    # (`glmae import` of weights trained with one), resampled trilinearly for inputs of other grids
    learned_pos_grid: tuple[int, int, int] | None = None

    def __post_init__(self):
        try:
            shape = patch_shape(self.patch_size)
        except ValueError as err:
            raise InputError(f"config: encoder.patch_size: {err}") from None
        self.patch_size = shape[0] if len(set(shape)) == 1 else shape

    @property
    def patch(self) -> tuple[int, int, int]:
        """The patch per axis (px, py, pz)."""
        return patch_shape(self.patch_size)


@functools.lru_cache(maxsize=64)
def sincos_embedding(
    grid: tuple[int, int, int], width: int, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Fixed 3D sin-cos position embedding (L, width) for a token grid (gx, gy, gz); cached, read-only."""
    if width % 6:
        raise ValueError(f"width {width} must be divisible by 6 for 3D sin-cos position embeddings")
    with warnings.catch_warnings():  # MONAI calls torch.meshgrid without `indexing` ('ij' is meant)
        warnings.simplefilter("ignore", UserWarning)
        emb = build_sincos_position_embedding(list(grid), width, spatial_dims=3).data[0]
    return emb.to(device=device, dtype=dtype)


def resample_positions(table: torch.Tensor, grid: tuple[int, int, int], new_grid: tuple[int, int, int]) -> torch.Tensor:
    """Position embeddings (N, L, D) of token grid `grid` -> (N, L', D) for `new_grid`, trilinearly
    (the table itself when the grids are equal)."""
    if tuple(grid) == tuple(new_grid):
        return table
    n, _, width = table.shape
    volume = table.transpose(1, 2).reshape(n, width, *grid)
    volume = F.interpolate(volume, size=tuple(new_grid), mode="trilinear", align_corners=False)
    return volume.flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, qkv_bias: bool):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=qkv_bias)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, width = x.shape
        qkv = self.qkv(x).reshape(n, length, 3, self.heads, width // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (N, heads, L, head_dim)
        if x.device.type == "cpu" and q.dtype != torch.float32:
            # on CPU the reduced-precision attention kernels are slower than fp32 ones for the
            # short token sequences of 3D MAE (benchmarks/pretrain_throughput.py); q, k, v are small
            with torch.autocast("cpu", enabled=False):
                x = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
        else:
            x = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(x.transpose(1, 2).reshape(n, length, width))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.linear1 = nn.Linear(width, hidden)
        self.linear2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(F.gelu(self.linear1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)).

    With `grad_checkpoint` set (the engine sets it from `train.grad_checkpoint`), a block that
    computes gradients keeps only its input and recomputes its activations in the backward pass
    (with the same drop-path draws): less memory for about one more forward pass.
    """

    grad_checkpoint = False

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, qkv_bias)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = Mlp(width, int(width * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbedding(nn.Module):
    def __init__(self, in_channels: int, width: int, patch: Patch, learned_grid: tuple[int, int, int] | None = None):
        super().__init__()
        self.patch = patch_shape(patch)
        self.patch_embeddings = nn.Conv3d(in_channels, width, kernel_size=self.patch, stride=self.patch)
        self.learned_grid = None if learned_grid is None else tuple(learned_grid)
        if learned_grid is not None:  # (1, L, width), MONAI's name and layout
            self.position_embeddings = nn.Parameter(torch.zeros(1, math.prod(learned_grid), width))
            nn.init.trunc_normal_(self.position_embeddings, std=0.02)

    def positions(self, grid: tuple[int, int, int], device, dtype) -> torch.Tensor:
        """(L, width) position embeddings for a token grid."""
        if self.learned_grid is None:
            return sincos_embedding(grid, self.patch_embeddings.out_channels, str(device), dtype)
        return resample_positions(self.position_embeddings, self.learned_grid, grid)[0].to(dtype)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """x (N, C, X, Y, Z), keep (N, K) token indices or None -> tokens (N, K or L, width)."""
        grid = token_grid(x.shape[2:], self.patch)
        patches = patchify(x, self.patch)  # (N, L, C·px·py·pz)
        weight = self.patch_embeddings.weight
        pos = self.positions(grid, x.device, weight.dtype)
        if keep is not None:
            patches = gather_tokens(patches, keep)
            pos = pos[keep]  # (N, K, width)
        return F.linear(patches, weight.flatten(1), self.patch_embeddings.bias) + pos


class ViT(nn.Module):
    """Encoder: (N, C, X, Y, Z) -> tokens (N, L, width) after the final norm.

    `keep` (N, K) restricts the encoder to the visible tokens (their grid positions are the
    indices); `out_blocks` asks for the hidden states after those blocks (0-based, before the
    final norm), e.g. (3, 6, 9) for UNETR as in MONAI.
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embedding = PatchEmbedding(cfg.in_channels, cfg.width, cfg.patch_size, cfg.learned_pos_grid)
        rates = torch.linspace(0, cfg.drop_path, cfg.depth).tolist()
        self.blocks = nn.ModuleList(
            Block(cfg.width, cfg.heads, cfg.mlp_ratio, cfg.qkv_bias, rate) for rate in rates
        )
        self.norm = nn.LayerNorm(cfg.width)
        self.apply(init_weights)
        # patch embedding initialised like a linear layer (MAE)
        nn.init.xavier_uniform_(self.patch_embedding.patch_embeddings.weight.view(cfg.width, -1))

    @property
    def width(self) -> int:
        return self.cfg.width

    def forward(
        self, x: torch.Tensor, keep: torch.Tensor | None = None, out_blocks: Sequence[int] = ()
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        tokens = self.patch_embedding(x, keep)
        hidden = []
        for i, block in enumerate(self.blocks):
            tokens = block(tokens)
            if i in out_blocks:
                hidden.append(tokens)
        return self.norm(tokens), hidden


class ViTBackbone:
    """What fine-tuning needs of a network built on a ViT held as `self.vit` (UNETR, the image
    classifier): the `encoder` that --init loads (frozen in linear mode, exported alone) and its
    layers for layer-wise lr decay (`layer_of`)."""

    vit: ViT

    @property
    def encoder(self) -> ViT:
        return self.vit

    @property
    def num_layers(self) -> int:
        return self.vit.cfg.depth + 1

    def layer_of(self, name: str) -> int:
        """Layer of parameter `name`: 0 the patch embedding, i + 1 block i, `num_layers` everything
        above the blocks (final norm, decoder or head)."""
        return layer_of(name, self.vit.cfg.depth)


def layer_of(name: str, depth: int, prefix: str = "vit.") -> int:
    """Layer of parameter `name` of a network holding a ViT at `prefix`, for layer-wise lr decay:
    0 the patch embedding, i + 1 block i, depth + 1 everything above the blocks (final norm, the
    network's head or decoder)."""
    if name.startswith(f"{prefix}patch_embedding."):
        return 0
    if name.startswith(f"{prefix}blocks."):
        return int(name[len(prefix):].split(".")[1]) + 1
    return depth + 1


def init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
