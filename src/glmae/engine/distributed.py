"""Process group and device set-up. Data parallelism is torchrun's job: when launched by torchrun
(RANK, WORLD_SIZE, LOCAL_RANK in the environment) we join its process group (NCCL on CUDA, gloo on
CPU); otherwise we run as a single process.

Two kinds of collectives, each on the device its group's backend serves:

- tensors of the computation (loss means, the non-finite flag, a method's running statistics,
  batch-norm statistics) are reduced on `env.device` over the default group (NCCL on GPUs);
- host values (the stop signal, random states, validation metrics, barriers) go over `host_group`,
  a gloo group on the CPU, so they never wait for the GPU. On CPU runs it is the default group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    host_group: object = field(default=None, compare=False)  # gloo group for host values; None: the default

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    elif name == "cuda":
        name = f"cuda:{local_rank}"
    return torch.device(name)


def init(device: str = "auto") -> DistEnv:
    """Join torchrun's process group if there is one. Safe to call more than once."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    host_group = None
    if world_size > 1:
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        if dist.get_backend() != "gloo":
            host_group = dist.new_group(backend="gloo")
    return DistEnv(rank, world_size, local_rank, dev, host_group)


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier(group=env.host_group)


def all_reduce_mean(values: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Mean over the ranks of `values` (on env.device)."""
    if env.distributed:
        values = values.clone()
        dist.all_reduce(values)
        values /= env.world_size
    return values


def all_reduce_min(values: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Element-wise minimum over the ranks of `values` (on env.device)."""
    if env.distributed:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.MIN)
    return values


def all_reduce_sum_(values: torch.Tensor) -> torch.Tensor:
    """Sum `values` over the ranks in place, if a process group is running (for modules such as a
    method's running statistics, which hold no DistEnv). `values` must be on the compute device."""
    if dist.is_initialized():
        dist.all_reduce(values)
    return values


def mean_denominator(count: torch.Tensor) -> torch.Tensor:
    """What a rank divides its sum of N_r terms by, so that the ranks' average (DDP averages the
    gradients) is the mean over all sum(N_r) terms, as one process with the whole batch computes
    it: sum over the ranks of `count`, divided by their number. `count`, a tensor of counts on the
    compute device (one all-reduce for all of them); no gradient flows through it."""
    if not dist.is_initialized():
        return count
    total = count.detach().clone()
    dist.all_reduce(total)
    return total / dist.get_world_size()


def any_rank(flag: bool, env: DistEnv) -> bool:
    """Whether `flag` is true on any rank (over the host group: no wait for the GPU)."""
    if not env.distributed:
        return flag
    value = torch.tensor([float(flag)])
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=env.host_group)
    return bool(value[0] > 0)


def all_gather_objects(obj, env: DistEnv) -> list:
    if not env.distributed:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj, group=env.host_group)
    return out


def broadcast_object(obj, env: DistEnv):
    """Rank 0's `obj` on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=env.host_group)
    return box[0]


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# Batch normalisation over the global batch


class _SumOverRanks(torch.autograd.Function):
    """Differentiable sum over the ranks: the gradient of each rank's input is the sum of the
    gradients of the sum on every rank."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch (every rank's samples), so
    K processes with batch B normalise as one process with batch K·B. Outside training, or without a
    process group, it is BatchNorm (same parameters, buffers and state-dict keys).

    Two reductions per call, the mean and then the variance about it (as one process computes
    them), through differentiable all-reduces whose backward sums the statistics' gradients over
    the ranks. `torch.nn.SyncBatchNorm` does the same on CUDA only (it refuses CPU tensors, so it
    could not run, nor be tested, under gloo); this one runs on any device.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected a (N, C, ...) input, got {x.dim()} dimensions")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        count = torch.full((1,), float(xf.numel() // xf.shape[1]), device=x.device)
        sums = _SumOverRanks.apply(torch.cat([xf.sum(dims), count]))
        n = sums[-1]
        mean = sums[:-1] / n
        centred = xf - mean.view(shape)
        var = _SumOverRanks.apply((centred * centred).sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), factor)
                unbiased = var.detach() * n / (n - 1).clamp_min(1)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """`module` with every BatchNorm*d replaced by a `SyncBatchNorm` holding the same parameters and
    buffers (so optimiser groups built before still hold them). Returns the module (a new one only
    when `module` itself is a BatchNorm)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncBatchNorm):
        sync = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                             module.track_running_stats)
        if module.affine:
            sync.weight, sync.bias = module.weight, module.bias
        if module.track_running_stats:
            sync.running_mean, sync.running_var = module.running_mean, module.running_var
            sync.num_batches_tracked = module.num_batches_tracked
        return sync.train(module.training)
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child))
    return module
