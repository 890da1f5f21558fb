"""AdamW parameter groups and the per-iteration learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from glmae.config import Config, OptimConfig, global_batch


def no_decay(name: str, param: torch.Tensor) -> bool:
    """Norms, biases, learned tokens and learned position embeddings are not weight-decayed."""
    return param.ndim <= 1 or name.endswith(("token", "position_embeddings"))


def param_groups(
    model: nn.Module,
    weight_decay: float,
    layer_decay: float = 1.0,
    layer_of: Callable[[str], int] | None = None,
    num_layers: int = 0,
    frozen_steps: Callable[[str], int] | None = None,
) -> list[dict]:
    """Groups of trainable parameters, each with `weight_decay` and an `lr_scale`.

    With layer-wise decay, a parameter in layer i of `num_layers + 1` (0 = embedding, the last =
    everything above the encoder) gets lr_scale = layer_decay ** (num_layers - i). A parameter for
    which `frozen_steps(name)` is N > 0 goes to a group with `frozen_steps` N: it stays as it is for
    the first N steps (see `set_lr`).
    """
    groups: dict[tuple[float, float, int], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        wd = 0.0 if no_decay(name, param) else weight_decay
        scale = 1.0
        if layer_decay != 1.0 and layer_of is not None:
            scale = layer_decay ** (num_layers - layer_of(name))
        frozen = frozen_steps(name) if frozen_steps is not None else 0
        group = groups.setdefault((wd, scale, frozen), {"params": [], "weight_decay": wd, "lr_scale": scale,
                                                        **({"frozen_steps": frozen} if frozen > 0 else {})})
        group["params"].append(param)
    return list(groups.values())


def build_optimizer(groups: list[dict], cfg: OptimConfig, fused: bool = True) -> torch.optim.AdamW:
    """AdamW with the fused kernel (one pass over each parameter; several times faster than the
    per-operation update on CPU, where the update of a ViT-B is memory-bound). `fused=False` is
    torch's per-operation update (benchmarks/pretrain_throughput.py compares both)."""
    return torch.optim.AdamW(groups, lr=0.0, betas=cfg.betas, fused=fused)


def peak_lr(cfg: OptimConfig, effective_batch: int) -> float:
    """lr = base lr x effective batch / 256 (linear scaling rule) or the lr as given."""
    return cfg.lr * effective_batch / 256 if cfg.lr_scaling == "linear" else cfg.lr  # "none" (OptimConfig checks)


def describe_peak_lr(cfg: Config) -> str:
    """One comment line for `glmae config`: the effective peak lr of one process and how it comes about."""
    batch, peak = global_batch(cfg), peak_lr(cfg.optim, global_batch(cfg))
    parts = f"batch_size {cfg.train.batch_size} x accum_steps {cfg.optim.accum_steps} x 1 process"
    if cfg.optim.lr_scaling == "linear":
        return (f"# effective peak lr {peak:.4g} = optim.lr {cfg.optim.lr:g} x global batch {batch} / 256 "
                f"({parts}; linear scaling: K processes give K times it)")
    return f"# effective peak lr {peak:.4g} = optim.lr (lr_scaling none: the same at any batch; global batch {batch})"


def lr_at(step: int, total: int, peak: float, warmup: int, min_lr: float = 0.0) -> float:
    """Learning rate for the update that follows `step` completed updates (0-based):
    linear warm-up over `warmup` updates, then half-cosine from `peak` down to `min_lr` at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float, step: int) -> None:
    """Each group's lr for the update that follows `step` completed updates: `lr` x its `lr_scale`,
    or 0 while `step` is below its `frozen_steps`. At lr 0 AdamW leaves a parameter exactly as it is
    (its update and its decoupled weight decay are both scaled by the lr) while its moments follow
    the gradients, so a frozen group costs no host sync and, under DDP, every parameter still gets
    its gradient reduced."""
    for group in optimizer.param_groups:
        frozen = step < group.get("frozen_steps", 0)
        group["lr"] = 0.0 if frozen else lr * group.get("lr_scale", 1.0)
