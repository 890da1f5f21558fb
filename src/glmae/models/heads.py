"""Projection heads for self-distillation (GL-MAE's consistency branch).

`ProjectionHead`: an MLP width -> hidden -> hidden -> bottleneck with GELU between layers, the
L2-normalised bottleneck, then a last layer bottleneck -> out without bias (DINO's head). Its
normalisation before each GELU is one of:

- "running" (`RunningNorm`): standardised by running means and variances of past batches. Pooled
  features of similar volumes share a large common component, which a plain MLP passes on, so
  every volume gets nearly the same output; removing it, as BatchNorm does, lets the head see what
  differs. Unlike BatchNorm, a sample's output does not depend on the other samples of its batch:
  with 4 teacher views per step, BatchNorm's targets change with whatever else is in the batch.
  Measured in GL-MAE, though, its statistics of a few views per step made the targets jump, and
  the student lost them (methods/glmae.py); GL-MAE's default is "none".
- "batch": BatchNorm (synchronised over the ranks under DDP by the engine).
- "none".

With `norm_last` the last layer is weight-normalised with its norm frozen at 1: each output is the
cosine of the bottleneck and a learned direction, so logits lie in [-1, 1] whatever weight decay or
a moving average of the weights does to their scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glmae.engine import distributed

HEAD_NORMS = ("running", "batch", "none")


class RunningNorm(nn.Module):
    """(N, D) -> (N, D) standardised per feature by a running mean and variance (momentum
    `momentum`) of the batches seen in training, summed over the ranks. The statistics are those
    from before the current batch and carry no gradient, so each output depends only on its own
    input. Starts as the identity (mean 0, variance 1)."""

    def __init__(self, dim: int, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (x - self.running_mean) * torch.rsqrt(self.running_var + self.eps)
        if self.training:
            with torch.no_grad():
                xf = x.detach().float()
                count = torch.full((1,), float(len(xf)), device=x.device)
                sums = distributed.all_reduce_sum_(torch.cat([xf.sum(0), (xf * xf).sum(0), count]))
                n = sums[-1]
                mean = sums[: x.shape[1]] / n
                var = (sums[x.shape[1] : -1] / n - mean * mean).clamp_min(0)
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var, self.momentum)
        return y


def _norm(kind: str, dim: int) -> nn.Module:
    if kind not in HEAD_NORMS:
        raise ValueError(f"head norm must be one of {', '.join(HEAD_NORMS)}, not {kind!r}")
    return {"running": RunningNorm, "batch": nn.BatchNorm1d}.get(kind, lambda d: nn.Identity())(dim)


class ProjectionHead(nn.Module):
    """(N, width) -> (N, out). `bottleneck` 0: the MLP's last Linear gives the outputs directly,
    unbounded (GL-MAE's first head)."""

    def __init__(self, width: int, hidden: int, out: int, bottleneck: int = 256, norm: str = "none",
                 norm_last: bool = True):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden), _norm(norm, hidden), nn.GELU(),
            nn.Linear(hidden, hidden), _norm(norm, hidden), nn.GELU(),
            nn.Linear(hidden, bottleneck or out),
        )
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last = nn.Linear(bottleneck, out, bias=False) if bottleneck else None
        self.norm_last = norm_last and bool(bottleneck)
        # the bottleneck standardised too, so that what the samples share cannot dominate its direction
        self.bottleneck_norm = RunningNorm(bottleneck) if bottleneck and norm == "running" else nn.Identity()

    def last_weight(self) -> torch.Tensor:
        """The weight that makes the outputs: (out, bottleneck), unit rows with `norm_last`; the
        MLP's last Linear (out, hidden) without a bottleneck."""
        if self.last is None:
            return self.mlp[-1].weight
        return F.normalize(self.last.weight, dim=1) if self.norm_last else self.last.weight

    def forward(self, x: torch.Tensor, train_last: torch.Tensor | float = 1.0) -> torch.Tensor:
        """In fp32 under any autocast (a bf16 softmax over 512 outputs at temperature 0.04 rounds
        the targets). `train_last` scales the last layer's gradient: 0 freezes it, as a 0-dim tensor
        so that freezing needs no host sync."""
        with torch.autocast(x.device.type, enabled=False):
            x = self.mlp(x.float())
            if self.last is None:
                return x
            w = self.last_weight()
            w = w.detach() + train_last * (w - w.detach())
            return F.normalize(self.bottleneck_norm(x), dim=-1) @ w.t()
