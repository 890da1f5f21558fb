"""`glmae export`: our weights for MONAI's networks, or the encoder alone.

Sources: a fine-tuning checkpoint, a pretraining checkpoint or an `encoder.safetensors` (+ .json).

- `monai-unetr`: a state dict for `monai.networks.nets.UNETR(**args)`. From a fine-tuning
  checkpoint it loads with `strict=True` and computes what our model computes; from an encoder
  alone it holds the `vit.*` part (load with `strict=False`; pass `out_channels` yourself). MONAI's
  UNETR fixes patch 16 and 12 blocks: other encoders are refused (use monai-vit).
- `monai-vit`: a state dict for `monai.networks.nets.ViT(**args)` (any patch size and depth).
- `safetensors`: the encoder alone with its `.json`, as pretraining writes it (`--init` loads it).
  The only format for Swin encoders (GMIM, Swin-UNETR): their weights are already a state dict for
  MONAI's `SwinUNETR(...).swinViT`.

MONAI's position embeddings are per image size: we write our fixed sin-cos embedding for the token
grid of `img_size` (the checkpoint's ROI; for an encoder.safetensors, which records none, 96³ or the
grid of its learned table). In MONAI's ViT it is a fixed `pos_embed_type="sincos"` buffer; in MONAI's
UNETR, which does not expose that option, a learnable parameter initialised with it. An encoder with
a learned table (imported, `encoder.learned_pos_grid`) gets that table, resampled to the grid of
`img_size`, as a `pos_embed_type="learnable"` parameter. MONAI's transformer blocks also carry a
`norm_cross_attn` LayerNorm that is unused without cross-attention; it is written with its initial
values (ones, zeros). The constructor arguments go to FILE minus suffix + `.json`; every file is
written atomically.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import NamedTuple

import torch

from glmae.config import Config, EncoderConfig
from glmae.engine import checkpoint
from glmae.errors import InputError
from glmae.models.vit import ViTConfig

FORMATS = ("monai-unetr", "monai-vit", "safetensors")
DEFAULT_IMG_SIZE = (96, 96, 96)


def monai_vit_weights(encoder: dict[str, torch.Tensor], cfg: ViTConfig, img_size) -> dict[str, torch.Tensor]:
    """Our ViT's state dict -> MONAI ViT's: the same names plus position embeddings and the unused
    cross-attention norms."""
    from glmae.models.patches import token_grid
    from glmae.models.vit import resample_positions, sincos_embedding

    out = dict(encoder)
    grid = token_grid(img_size, cfg.patch_size)
    key = "patch_embedding.position_embeddings"
    if cfg.learned_pos_grid is None:
        out[key] = sincos_embedding(grid, cfg.width).clone()[None]
    else:
        out[key] = resample_positions(encoder[key], cfg.learned_pos_grid, grid)
    for i in range(cfg.depth):
        out[f"blocks.{i}.norm_cross_attn.weight"] = torch.ones(cfg.width)
        out[f"blocks.{i}.norm_cross_attn.bias"] = torch.zeros(cfg.width)
    return out


def monai_vit_args(cfg: ViTConfig, img_size) -> dict:
    return {
        "in_channels": cfg.in_channels, "img_size": list(img_size), "patch_size": cfg.patch_size
        if isinstance(cfg.patch_size, int) else list(cfg.patch_size),
        "hidden_size": cfg.width, "mlp_dim": int(cfg.width * cfg.mlp_ratio), "num_layers": cfg.depth,
        "num_heads": cfg.heads, "proj_type": "conv",
        "pos_embed_type": "sincos" if cfg.learned_pos_grid is None else "learnable", "classification": False,
        "dropout_rate": 0.0, "spatial_dims": 3, "qkv_bias": cfg.qkv_bias,
    }


def monai_unetr_args(cfg: ViTConfig, img_size, feature_size: int, norm: str, out_channels: int | None) -> dict:
    args = {
        "in_channels": cfg.in_channels, "out_channels": out_channels, "img_size": list(img_size),
        "feature_size": feature_size, "hidden_size": cfg.width, "mlp_dim": int(cfg.width * cfg.mlp_ratio),
        "num_heads": cfg.heads, "proj_type": "conv", "norm_name": norm, "conv_block": True,
        "res_block": True, "dropout_rate": 0.0, "spatial_dims": 3, "qkv_bias": cfg.qkv_bias,
    }
    return {k: v for k, v in args.items() if v is not None}


class Source(NamedTuple):
    encoder_cfg: ViTConfig
    encoder: dict[str, torch.Tensor]  # our ViT's state dict
    cfg: Config | None  # the fine-tuning config, if the source is a fine-tuning checkpoint
    network: dict[str, torch.Tensor] | None  # then also the whole network's state dict
    img_size: tuple[int, int, int]
    meta: dict  # encoder.json contents


def read_source(path: Path) -> Source:
    from glmae import config as cfglib
    from glmae.engine.run import encoder_meta, model_from_checkpoint, read_encoder

    if path.suffix == ".safetensors" or checkpoint.is_safetensors(path):
        weights, arch, _ = read_encoder(path)
        meta = json.loads(path.with_suffix(".json").read_text())
        enc_cfg = cfglib.build(EncoderConfig, arch)
        learned = getattr(enc_cfg, "learned_pos_grid", None)
        img_size = DEFAULT_IMG_SIZE if learned is None else tuple(g * p for g, p in zip(learned, enc_cfg.patch))
        return Source(enc_cfg, weights, None, None, img_size, meta)
    state = checkpoint.load(path)
    cfg, model, encoder = model_from_checkpoint(state, path)
    img_size = tuple(getattr(cfg.method, "roi", DEFAULT_IMG_SIZE))
    finetuned = cfg.task == "finetune"
    return Source(
        cfg.encoder, encoder.state_dict(), cfg if finetuned else None, model.net.state_dict() if finetuned else None,
        img_size, encoder_meta(cfg, state["step"]),
    )


def _save_torch(weights: dict, args: dict, out: Path) -> None:
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in weights.items()}, buf)
    checkpoint.atomic_write(out, lambda f: f.write(buf.getvalue()))
    text = json.dumps(args, indent=2) + "\n"
    checkpoint.atomic_write(out.with_suffix(".json"), lambda f: f.write(text.encode()))


def export(source: Path, format: str, out: Path) -> Path:
    """Write `source`'s weights in `format` to `out` (+ `out` minus suffix + .json)."""
    if format not in FORMATS:
        raise InputError(f"--format: expected one of {', '.join(FORMATS)}, got {format!r}")
    source, out = Path(source), Path(out)
    if out.with_suffix(".json") == out:
        raise InputError("--out: give the file a suffix other than .json (the arguments go to FILE.json)", out)
    enc_cfg, encoder, cfg, network, img_size, meta = read_source(source)
    if format == "safetensors":
        checkpoint.save_encoder(encoder, meta, out)
        print(f"wrote the encoder ({len(encoder)} tensors) to {out} and {out.with_suffix('.json')}")
        return out
    if enc_cfg.arch != "vit":
        raise InputError(f"--format {format}: the encoder is a {enc_cfg.arch}, not a ViT (a Swin encoder's weights "
                         f"load as they are into monai.networks.nets.SwinUNETR(...).swinViT: use --format safetensors)",
                         source)
    if format == "monai-vit":
        _save_torch(monai_vit_weights(encoder, enc_cfg, img_size), monai_vit_args(enc_cfg, img_size), out)
        print(f"wrote a monai.networks.nets.ViT state dict to {out}, its arguments to {out.with_suffix('.json')}")
        return out
    if (enc_cfg.arch, enc_cfg.patch_size, enc_cfg.depth) != ("vit", 16, 12):
        raise InputError(
            f"--format monai-unetr: MONAI's UNETR fixes a ViT with patch 16 and 12 blocks, this encoder has "
            f"patch {enc_cfg.patch_size} and {enc_cfg.depth} blocks (use --format monai-vit)",
            source,
        )
    vit = {f"vit.{k}": v for k, v in monai_vit_weights(encoder, enc_cfg, img_size).items()}
    if cfg is None:  # an encoder alone: the vit part of UNETR
        args = monai_unetr_args(enc_cfg, img_size, 16, "instance", None)
        _save_torch(vit, args, out)
        print(f"wrote the vit.* part of a monai.networks.nets.UNETR state dict to {out} (load with strict=False; "
              f"arguments without out_channels in {out.with_suffix('.json')})")
        return out
    if cfg.method.name != "unetr":
        raise InputError(f"--format monai-unetr: the checkpoint holds a {cfg.method.name}, not a UNETR", source)
    from glmae.methods.segmentation import out_channels

    weights = {**{k: v for k, v in network.items() if not k.startswith("vit.")}, **vit}
    args = monai_unetr_args(enc_cfg, img_size, cfg.method.feature_size, cfg.method.norm, out_channels(cfg.method))
    _save_torch(weights, args, out)
    print(f"wrote a monai.networks.nets.UNETR state dict to {out}, its arguments to {out.with_suffix('.json')}")
    return out
