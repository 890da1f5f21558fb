"""A simulated accelerator on the CPU, to check the engine's GPU path where there is no GPU.

`simulated_gpu(monkeypatch)` makes `torch.device("meta")` behave like a GPU with memory: a tensor
moved or created there is a `OnDevice` wrapper around a CPU tensor that reports device `meta`, and
every operation on such tensors runs on the wrapped CPU tensors and wraps its results again. As
on a GPU:

- an operation mixing device tensors with CPU tensors (other than 0-dim ones) fails;
- reading a device tensor on the host (`.item()`, `bool()`, `.tolist()`, `.cpu()`) is counted as
  a device-to-host sync (`SimulatedGPU.syncs`);
- collectives are those of a 2-rank NCCL job: `torch.distributed` is replaced by a recording fake
  whose ranks hold identical data (a sum doubles, a mean or a min keeps the value). A tensor
  reduced over the default group must be on the device, one reduced over the host (gloo) group on
  the CPU; object collectives and barriers must use the host group. A wrong device raises
  `WrongDevice` at the call, as NCCL would fail there.

DistributedDataParallel is replaced by a pass-through (its gradient all-reduce is PyTorch's, on the
parameters' device); the fused AdamW kernel is allowed on the simulated device, whose autocast
state is the CPU's.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

DEVICE = torch.device("meta")
HOST = object()  # the host (gloo) group of the simulated job
WORLD = 2
_aten = torch.ops.aten
TRANSFERS = {_aten._to_copy.default, _aten.copy_.default}


class WrongDevice(AssertionError):
    """A tensor reached a collective on a device its process group does not serve."""


class OnDevice(torch.Tensor):
    """A CPU tensor (`elem`) that says it lives on the simulated device."""

    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(
            cls, elem.shape, strides=elem.stride(), storage_offset=elem.storage_offset(), dtype=elem.dtype,
            device=DEVICE, requires_grad=elem.requires_grad)

    def __init__(self, elem: torch.Tensor):
        self.elem = elem

    def __repr__(self):
        return f"OnDevice({self.elem!r})"

    def __reduce_ex__(self, protocol):  # torch.save writes the values, as of a GPU tensor
        return self.elem.__reduce_ex__(protocol)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return NotImplemented  # the mode below runs every operation


class _Factories(TorchFunctionMode):
    """torch.tensor(..., device=DEVICE) and its kin copy their data below the dispatcher: made on the
    CPU and moved, they become OnDevice tensors."""

    FACTORIES = (torch.tensor, torch.as_tensor, torch.asarray)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if func in self.FACTORIES and device is not None and torch.device(device).type == DEVICE.type:
            return func(*args, **{**kwargs, "device": "cpu"}).to(DEVICE)
        return func(*args, **kwargs)


class _Mode(TorchDispatchMode):
    def __init__(self, sim: SimulatedGPU):
        super().__init__()
        self.sim = sim

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        on_device, on_cpu, wrappers = False, [], {}

        def unwrap(x):
            nonlocal on_device
            if isinstance(x, OnDevice):
                on_device = True
                wrappers[id(x.elem)] = x
                return x.elem
            if isinstance(x, torch.Tensor):
                if x.device.type == DEVICE.type:
                    raise RuntimeError(f"{func}: a tensor without values on {x.device}, made outside the simulation")
                on_cpu.append(x)
            if isinstance(x, torch.device) and x.type == DEVICE.type:
                return torch.device("cpu")
            return x

        target = kwargs.get("device")
        to_device = isinstance(target, torch.device) and target.type == DEVICE.type
        to_host = isinstance(target, torch.device) and target.type == "cpu"
        args, kwargs = tree_map(unwrap, args), tree_map(unwrap, kwargs)
        if on_device and func not in TRANSFERS and any(t.dim() > 0 for t in on_cpu):
            raise RuntimeError(f"{func}: expected all tensors on the same device, got the device and the cpu")
        if on_device and (func is _aten._local_scalar_dense.default or to_host):
            self.sim.syncs += 1
        out = func(*args, **kwargs)
        if func is _aten.copy_.default and id(args[0]) not in wrappers:  # into a CPU tensor
            self.sim.syncs += on_device
            return out
        if not (to_device or (on_device and not to_host)):
            return out

        def wrap(x):  # in-place results are the wrappers they came in as
            if not isinstance(x, torch.Tensor):
                return x
            known = wrappers.get(id(x))
            return OnDevice(x) if known is None else known

        return tree_map(wrap, out)


@dataclass
class SimulatedGPU:
    syncs: int = 0  # device-to-host reads so far
    calls: list = field(default_factory=list)  # (collective, device or group) of every call

    def check(self, name: str, tensor: torch.Tensor, group) -> None:
        expected = torch.device("cpu") if group is HOST else DEVICE
        self.calls.append((name, tensor.device.type, "host" if group is HOST else "default"))
        if tensor.device.type != expected.type:
            group_name = "the host (gloo) group" if group is HOST else "the default (NCCL) group"
            raise WrongDevice(f"{name} of a tensor on {tensor.device} over {group_name}, which serves {expected}")

    def host_only(self, name: str, group) -> None:
        self.calls.append((name, None, "host" if group is HOST else "default"))
        if group is not HOST:
            raise WrongDevice(f"{name} over the default (NCCL) group: host values go over the host group")

    # the recording torch.distributed ---------------------------------------------------------

    def all_reduce(self, tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        self.check("all_reduce", tensor, group)
        if op == dist.ReduceOp.SUM:
            with torch.no_grad():
                tensor.mul_(WORLD)  # identical ranks

    def all_gather_object(self, out, obj, group=None):
        self.host_only("all_gather_object", group)
        out[:] = [obj] * WORLD

    def broadcast_object_list(self, objects, src=0, group=None, device=None):
        self.host_only("broadcast_object_list", group)

    def barrier(self, group=None, async_op=False, device_ids=None):
        self.host_only("barrier", group)


class _PassThrough(nn.Module):
    """Stands in for DistributedDataParallel on the simulated device."""

    def __init__(self, module, device_ids=None):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        yield


@contextlib.contextmanager
def simulated_gpu(monkeypatch):
    """Inside: `torch.device("meta")` is a GPU of a 2-rank NCCL job (see the module docstring).
    Yields the SimulatedGPU and a DistEnv of rank 0 on it."""
    import torch.optim.optimizer as optimizer

    from glmae.engine import trainer
    from glmae.engine.distributed import DistEnv
    from glmae.models.vit import sincos_embedding

    sim = SimulatedGPU()
    for name in ("all_reduce", "all_gather_object", "broadcast_object_list", "barrier"):
        monkeypatch.setattr(dist, name, getattr(sim, name))
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: WORLD)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(trainer, "DistributedDataParallel", _PassThrough)
    fused = optimizer._get_fused_kernels_supported_devices
    monkeypatch.setattr(optimizer, "_get_fused_kernels_supported_devices", lambda: [*fused(), DEVICE.type])
    autocast = torch.autocast  # `meta` has no autocast state: the simulated device uses the CPU's
    monkeypatch.setattr(torch, "autocast", lambda device_type, *args, **kwargs: autocast(
        "cpu" if device_type == DEVICE.type else device_type, *args, **kwargs))
    sincos_embedding.cache_clear()
    try:
        with _Mode(sim), _Factories():
            yield sim, DistEnv(rank=0, world_size=WORLD, local_rank=0, device=DEVICE, host_group=HOST)
    finally:
        sincos_embedding.cache_clear()  # no simulated tensor stays cached
