"""`glmae plan`: what a run of a config needs on GPUs, worked out on a CPU in seconds.

For a config it prints the parameters; the FLOPs of one training sample (forward and backward of
the method's training step, counted by `torch.utils.flop_counter.FlopCounterMode`); the activation
memory per GPU at the config's batch (the tensors autograd saves for the backward pass, counted
with `torch.autograd.graph.saved_tensors_hooks`) beside the weights, gradients and AdamW states;
the data loader's rate per worker (the method's sampler timed on a synthetic volume at the config's
view sizes) against the rate N GPUs consume; and the time per step, per epoch and for the run at a
stated MFU (model FLOPs utilisation: the share of the GPUs' peak the counted FLOPs run at).

How the figures come about:

- The model and one step run on fake tensors (`FakeTensorMode`: shapes and dtypes, no data, no
  memory): the model is built on the meta device (`meta_model`), its parameters made fake, and the
  step runs at the config's full sizes and batch, so nothing is extrapolated. Model FLOPs are those of matrix
  products, convolutions and attention (the MFU convention); elementwise work, the optimiser and a
  momentum teacher's update are not counted.
- Activations are counted under the autocast a GPU run uses (`train.amp` auto: bf16), as CPU
  autocast casts: glmae keeps attention in fp32 on a CPU (`glmae.models.vit.Attention`), so the
  figure is an upper bound for a GPU (bf16 attention saves about 8 bytes less per token and block).
  Transient buffers of the backward pass, the CUDA context and fragmentation are not counted: a
  batch "fits" when the counted memory is at most 90% of the GPU's.
- The sampler runs in this process with one thread, as a DataLoader worker does, on a synthetic
  volume held in memory: it measures this machine's CPU.
- `measure` (`--measure`) runs real steps of the engine here (train.device, synthetic samples) and
  reports the step time and the MFU it implies against this device's measured matmul peak, and
  the saved tensors on real tensors: the check of the fake-tensor figures, and on a GPU the MFU
  to plan with.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from glmae import config as cfglib
from glmae.config import Config
from glmae.errors import InputError

A100_BF16_TFLOPS = 312.0
HEADROOM = 0.9  # of a GPU's memory the counted memory may fill
DEFAULT_CASES = 1000
BODY_MM = (384.0, 384.0, 320.0)  # the synthetic volume: an abdomen's extent, at the config's spacing
BTCV_CLASSES = 14  # 13 organs and background: a segmentation config without labels is planned with these
CXR14_FINDINGS = 14  # ChestX-ray14's findings: a classifier config without findings is planned with these


# ----------------------------------------------------------------------------------------------
# Counting one training step


@dataclass
class StepCount:
    flops: int  # model FLOPs of the forward and backward pass of the batch
    saved_bytes: int  # bytes of the tensors autograd saved for the backward pass (parameters excluded)


def cpu_attention_flops() -> dict:
    """FlopCounterMode's formulas (its `custom_mapping`) for the CPU's fused attention, which it does
    not count by itself (it knows the CUDA kernels): those of the flash attention it is, 2.5x the
    forward's FLOPs in the backward pass, which computes the scores again."""
    from torch.utils import flop_counter

    aten = torch.ops.aten

    def forward(query, key, value, *args, out_shape=None, **kwargs):
        return flop_counter.sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
        return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)

    return {aten._scaled_dot_product_flash_attention_for_cpu: forward,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: backward}


def count_step(model: nn.Module, batch: dict, dtype: torch.dtype | None) -> StepCount:
    """FLOPs and saved-tensor bytes of `loss, _ = model(batch); loss.backward()` under autocast to
    `dtype` (None: full precision). Real or fake tensors alike; a storage saved twice (a tensor and
    its views, a tensor saved by two operations) counts once."""
    from torch.utils.flop_counter import FlopCounterMode

    from glmae.engine.precision import autocast

    state = {id_of(t) for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(tensor):
        key = id_of(tensor)
        if key not in state:
            saved[key] = tensor.untyped_storage().nbytes()
        return tensor

    device = next(model.parameters()).device
    counter = FlopCounterMode(display=False, custom_mapping=cpu_attention_flops())
    with counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with autocast(device, dtype):
            loss, _ = model(batch)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return StepCount(counter.get_total_flops(), sum(saved.values()))


def id_of(tensor: torch.Tensor) -> int:
    """The identity of a tensor's storage (shared by its views)."""
    return tensor.untyped_storage()._cdata


class _RealRanges(TorchFunctionMode):
    """Ranges (`torch.arange`, `torch.linspace`) are real CPU tensors, and what is computed from real
    tensors alone stays real, on the meta device and under a fake mode alike: constructors and
    losses read such values back (the drop-path rates of the ViT and of MONAI's Swin,
    `linspace(...).tolist()`; MONAI's DiceLoss, `arange(2, ndim).tolist()`), which a meta or fake
    tensor cannot give. Parameters, inputs and all they compute stay without data."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.arange, torch.linspace):
            kwargs = {"device": "cpu", **kwargs}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if func in (torch.arange, torch.linspace) or (
                tensors and not any(isinstance(t, FakeTensor) or t.is_meta for t in tensors)):
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        return func(*args, **kwargs)


def meta_model(cfg: Config) -> nn.Module:
    """The config's training module with its parameters and buffers on the meta device (shapes only;
    PyTorch's initialisers skip them)."""
    with torch.device("meta"), _RealRanges():
        return build(cfg)


@contextlib.contextmanager
def fake_tensors():
    """Inside, tensors are fake (shapes and dtypes, no data and no memory) and operations cost no
    computation; `model.to_empty(device="cpu")` inside makes a meta model's parameters fake."""
    from glmae.models.vit import sincos_embedding

    try:
        with FakeTensorMode(allow_non_fake_inputs=True), _RealRanges():
            yield
    finally:
        sincos_embedding.cache_clear()  # position tables made inside are fake: forget them


# ----------------------------------------------------------------------------------------------
# The config's method, its data and its samples


def planned(cfg: Config) -> tuple[Config, list[str]]:
    """The config with what a data set would fill in (segmentation labels, classifier findings),
    and a line for each such assumption. InputError for a config whose method glmae cannot train."""
    from glmae.methods import CLASSIFICATION, FINETUNING, PRETRAINING, SEGMENTATION
    from glmae.methods.segmentation import check_network

    name, notes = cfg.method.name, []
    if name not in (PRETRAINING if cfg.task == "pretrain" else FINETUNING):
        raise InputError(f"config: {name!r} is not a {cfg.task} method glmae plans")
    method = cfg.method
    if name in SEGMENTATION:
        check_network(method, cfg.encoder)
        if not (method.labels or method.regions):
            method = dataclasses.replace(method, labels={i: f"class {i}" for i in range(BTCV_CLASSES)})
            notes.append(f"{BTCV_CLASSES} output classes, BTCV's 13 organs and background "
                         "(the data set's labels when training; --set method.labels=... to plan others)")
    if name in CLASSIFICATION and not method.findings:
        method = dataclasses.replace(method, findings=[f"finding {i}" for i in range(CXR14_FINDINGS)])
        notes.append(f"{CXR14_FINDINGS} findings, ChestX-ray14's (the data set's when training)")
    return dataclasses.replace(cfg, method=method), notes


def build(cfg: Config) -> nn.Module:
    """The training module of the config's method, as pretrain and finetune build it."""
    from glmae.engine.trainer import set_grad_checkpoint
    from glmae.methods import FINETUNING, PRETRAINING

    model = (PRETRAINING if cfg.task == "pretrain" else FINETUNING)[cfg.method.name](cfg.encoder, cfg.method)
    if cfg.train.grad_checkpoint:
        set_grad_checkpoint(model)
    return model.train()


def volume_shape(cfg: Config) -> tuple[int, ...]:
    """(C, X, Y, Z) of the synthetic volume: a radiograph at data.image_size (depth 1), or an
    abdomen of BODY_MM at the config's spacing (1 mm if native), never smaller than a view."""
    views = [getattr(cfg.method, key) for key in ("roi", "global_size", "local_size") if hasattr(cfg.method, key)]
    if any(v[2] == 1 for v in views):  # radiographs
        size = (*(cfg.data.image_size or views[0][:2]), 1)
    else:
        size = tuple(round(mm / s) for mm, s in zip(BODY_MM, cfg.data.spacing or (1.0, 1.0, 1.0)))
    return (cfg.encoder.in_channels, *(max(n, *(v[a] for v in views)) for a, n in enumerate(size)))


def synthetic_item(cfg: Config, rng: np.random.Generator):
    """An item for the method's sampler: a volume (pre-training), with a label map (segmentation)
    or findings (classification), of `volume_shape` with uniform random intensities."""
    import types

    from glmae.methods import CLASSIFICATION, SEGMENTATION

    shape = volume_shape(cfg)
    volume = types.SimpleNamespace(
        case_id="synthetic", image=rng.random(shape, dtype=np.float32), label=None,
        intensity="ct" if cfg.data.intensity == "auto" else cfg.data.intensity,
        foreground_box=tuple((0, n) for n in shape[1:]))
    if cfg.method.name in SEGMENTATION:
        from glmae.methods.segmentation import TrainItem, foreground_points

        values = np.array(sorted({0, *cfg.method.labels, *(v for vs in cfg.method.regions.values() for v in vs)}))
        volume.label = values[rng.integers(len(values), size=shape[1:])].astype(np.uint8)
        return TrainItem(volume, foreground_points(volume.label))
    if cfg.method.name in CLASSIFICATION:
        from glmae.methods.classification import TrainItem

        return TrainItem(volume, np.zeros(len(cfg.method.findings), np.float32))
    return volume


def views(sample: dict) -> list[tuple[str, int, tuple[int, ...]]]:
    """The images of a sample as (key, count, (C, X, Y, Z)): float arrays of 4 dimensions are one
    view, of 5 a stack of views (GL-MAE's global and local views)."""
    out = []
    for key, value in sample.items():
        value = np.asarray(value)
        if value.dtype.kind == "f" and value.ndim in (4, 5):
            out.append((key, 1, value.shape) if value.ndim == 4 else (key, value.shape[0], value.shape[1:]))
    return out


def sampler_rate(sampler, item, seconds: float = 1.0) -> float:
    """Samples per second of `sampler(item, rng)` on one thread (a DataLoader worker's), the median
    of calls timed for about `seconds` after one warm-up call."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sampler(item, np.random.default_rng(0))
        times, start = [], time.perf_counter()
        while len(times) < 3 or (time.perf_counter() - start < seconds and len(times) < 50):
            t0 = time.perf_counter()
            sampler(item, np.random.default_rng(len(times) + 1))
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return 1.0 / statistics.median(times)


def collate(samples: list[dict]) -> dict:
    return {k: torch.as_tensor(np.stack([np.asarray(s[k]) for s in samples])) for k in samples[0]}


def batch_of(sample: dict, size: int) -> dict:
    """A batch of `size` copies of `sample` (under a fake mode: of its shapes)."""
    return {k: v.expand(size, *v.shape[1:]).clone() for k, v in collate([sample]).items()}


def gpu_dtype(amp: str) -> torch.dtype | None:
    """The autocast dtype of `train.amp` on a GPU with bf16 (A100, H100): auto means bf16."""
    return {"auto": torch.bfloat16, "bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


# ----------------------------------------------------------------------------------------------
# The plan


@dataclass
class Plan:
    name: str
    cfg: Config
    notes: list[str]  # assumptions made for the config
    trainable: int  # parameters the optimiser updates
    parameters: int  # every parameter (a momentum teacher's too)
    state_bytes: int  # weights, gradients, AdamW states, buffers (and DDP's gradient buckets), per GPU
    views: list  # of one sample, see `views`
    volume: tuple[int, ...]  # the synthetic volume the sampler ran on
    flops: float  # per sample
    activation_bytes: int  # per GPU at the config's batch
    dtype: torch.dtype | None
    samples_per_s: float  # one loader worker's
    gpus: int
    gpu_memory: float  # GiB
    gpu_tflops: float
    mfu: float
    cases: int

    @property
    def batch(self) -> int:
        """Samples per GPU per optimiser step."""
        return self.cfg.train.batch_size * self.cfg.optim.accum_steps

    @property
    def global_batch(self) -> int:
        return cfglib.global_batch(self.cfg, self.gpus)

    @property
    def step_s(self) -> float:
        return self.batch * self.flops / (self.gpu_tflops * 1e12 * self.mfu)

    @property
    def total_steps(self) -> int:
        return cfglib.steps_for_epochs(self.cfg, self.cases, self.gpus)

    @property
    def loader_factor(self) -> float:
        """How much slower than the GPUs the loader is (1: it keeps up)."""
        workers = max(1, self.cfg.data.num_workers)
        return max(1.0, self.batch / self.step_s / (workers * self.samples_per_s))

    @property
    def memory_bytes(self) -> int:
        return self.activation_bytes + self.state_bytes

    @property
    def fits(self) -> bool:
        return self.memory_bytes <= HEADROOM * self.gpu_memory * 2**30

    @property
    def max_batch(self) -> int:
        """The largest batch per GPU (micro-batch) whose counted memory fits."""
        per_sample = self.activation_bytes / self.cfg.train.batch_size
        return max(0, int((HEADROOM * self.gpu_memory * 2**30 - self.state_bytes) // per_sample))


def state_bytes(model: nn.Module, gpus: int) -> int:
    """Per GPU: every parameter and buffer, and for the trained parameters their gradients, AdamW's
    two moments and, under DDP, its gradient buckets (a copy of the gradients)."""
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    trained = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return held + trained * (3 + (gpus > 1))


def plan(cfg: Config, name: str, *, gpus: int = 1, gpu_memory: float = 80.0, mfu: float = 0.3,
         gpu_tflops: float = A100_BF16_TFLOPS, cases: int = DEFAULT_CASES) -> Plan:
    """Work out the figures of `report` for the config (see the module docstring)."""
    for option, value in (("--gpus", gpus), ("--gpu-memory", gpu_memory), ("--gpu-tflops", gpu_tflops),
                          ("--cases", cases)):
        if value <= 0:
            raise InputError(f"{option}: expected a positive number, got {value}")
    if not 0 < mfu <= 1:
        raise InputError(f"--mfu: expected a fraction in (0, 1], got {mfu}")
    cfg, notes = planned(cfg)
    dtype = gpu_dtype(cfg.train.amp)
    model = meta_model(cfg)
    sampler, item = model.sampler(), synthetic_item(cfg, np.random.default_rng(0))
    sample = sampler(item, np.random.default_rng(0))
    with fake_tensors():
        model.to_empty(device="cpu")
        try:
            counted = count_step(model, batch_of(sample, cfg.train.batch_size), dtype)
        except ValueError as err:  # what the networks raise on shapes and sizes they cannot take
            raise InputError(f"config: a training step of {name} fails: {err}") from None
    return Plan(name, cfg, notes,
                trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
                parameters=sum(p.numel() for p in model.parameters()), state_bytes=state_bytes(model, gpus),
                views=views(sample), volume=volume_shape(cfg), flops=counted.flops / cfg.train.batch_size,
                activation_bytes=counted.saved_bytes, dtype=dtype, samples_per_s=sampler_rate(sampler, item),
                gpus=gpus, gpu_memory=gpu_memory, gpu_tflops=gpu_tflops, mfu=mfu, cases=cases)


# ----------------------------------------------------------------------------------------------
# Measuring here


@dataclass
class Measured:
    device: str
    cpu_time: bool  # on a CPU: one thread, timed in CPU time
    dtype: torch.dtype | None
    step_s: float  # median time of an engine step at the config's batch
    peak_tflops: float  # the device's matmul rate in that dtype
    flops: float  # per step, counted on real tensors
    saved_bytes: int  # counted on real tensors
    fake_saved_bytes: int  # counted on fake tensors in the same dtype, as the plan counts

    @property
    def mfu(self) -> float:
        return self.flops / self.step_s / (self.peak_tflops * 1e12)


def matmul_tflops(device: torch.device, dtype: torch.dtype | None, repeats: int = 3,
                  clock=time.perf_counter) -> float:
    """The device's rate on a square matrix product (the best of `repeats`), in TFLOP/s: 1024 wide
    on a CPU, 8192 on a GPU."""
    n = 1024 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype or torch.float32)
    b = torch.randn(n, n, device=device, dtype=dtype or torch.float32)
    best = math.inf
    for _ in range(repeats + 1):  # the first warms up
        sync(device)
        t0 = clock()
        a @ b
        sync(device)
        best = min(best, clock() - t0)
    return 2 * n**3 / best / 1e12


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(cfg: Config, steps: int = 3) -> Measured:
    """`steps` engine steps (`Trainer.step`: autocast, accumulation, clipping, AdamW) of the config on
    this machine's train.device at its batch, on synthetic samples; the median step time, and one
    more step's FLOPs and saved tensors counted on real tensors (and on fake ones, as `plan` does).
    On a CPU, steps and the matmul peak run on one thread and are timed in CPU time: other work on
    the machine then takes nothing from them (with several threads, those waiting for a busy core
    spin and count)."""
    import types
    from pathlib import Path

    from glmae.engine import distributed
    from glmae.engine.precision import amp_dtype
    from glmae.engine.trainer import Trainer

    cfg, _ = planned(cfg)
    env = distributed.DistEnv(0, 1, 0, distributed.pick_device(cfg.train.device))
    dtype = amp_dtype(cfg.train.amp, env.device)
    cpu = env.device.type == "cpu"
    clock = time.process_time if cpu else time.perf_counter
    threads = torch.get_num_threads()
    torch.manual_seed(cfg.train.seed)
    model = build(cfg)
    sampler, item = model.sampler(), synthetic_item(cfg, np.random.default_rng(0))
    samples = [sampler(item, np.random.default_rng(i)) for i in range(cfg.train.batch_size)]
    batch = collate(samples)
    trainer = Trainer(model, cfg, Path(), env, "plan", None, cfg.train.batch_size)  # its step writes nothing
    micro = iter(lambda: batch, None)  # the same batch for every micro-step
    stop = types.SimpleNamespace(received=None)
    times = []
    try:
        torch.set_num_threads(1 if cpu else threads)
        for step in range(steps + 1):  # the first warms up
            sync(env.device)
            t0 = clock()
            trainer.step(step, model, micro, 1e-6, stop)
            sync(env.device)
            times.append(clock() - t0)
        peak = matmul_tflops(env.device, dtype, clock=clock)
    finally:
        torch.set_num_threads(threads)
    counted = count_step(model, {k: v.to(env.device) for k, v in batch.items()}, dtype)
    fake = meta_model(cfg)
    with fake_tensors():
        fake.to_empty(device="cpu")
        fake_saved = count_step(fake, collate(samples), dtype).saved_bytes
    return Measured(str(env.device), cpu, dtype, statistics.median(times[1:]), peak,
                    counted.flops * cfg.optim.accum_steps, counted.saved_bytes, fake_saved)


# ----------------------------------------------------------------------------------------------
# The report


def _flops(x: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g} FLOP"


def _gib(x: float) -> str:
    return f"{x / 2**30:.3g} GiB" if x >= 2**27 else f"{x / 2**20:.3g} MiB"


def _duration(seconds: float) -> str:
    for unit, scale in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds:.3g} s"


def _dtype(dtype: torch.dtype | None) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[dtype]


def report(p: Plan) -> str:
    cfg, train = p.cfg, p.cfg.train
    sample = ", ".join(f"{key} {n} x {'x'.join(map(str, shape))}" for key, n, shape in p.views)
    n_views = sum(n for _, n, _ in p.views)
    lines = [
        f"glmae plan: {p.name} ({cfg.method.name}, {cfg.task}) on {p.gpus} GPU(s) of {p.gpu_memory:g} GiB and "
        f"{p.gpu_tflops:g} TFLOP/s peak, at MFU {p.mfu:g}",
        *(f"assumed       {note}" for note in p.notes),
        f"parameters    {p.trainable / 1e6:.1f} M trained"
        + (f", {p.parameters / 1e6:.1f} M in all (the rest get no gradient)" if p.parameters != p.trainable else ""),
        f"sample        {n_views} view(s): {sample}",
        f"FLOPs         {_flops(p.flops)} per sample: forward and backward of one training step (torch.utils."
        f"flop_counter: matrix products, convolutions, attention), counted on fake tensors at the config's sizes",
    ]
    batch = (f"batch         {train.batch_size} per GPU x {cfg.optim.accum_steps} accumulated x {p.gpus} GPU(s) = "
             f"{p.global_batch} per step (train.batch_size is per process)")
    own = cfglib.global_batch(cfg)  # the config's batch on one process, as its paper's
    per_gpu, rest = divmod(own, p.gpus * cfg.optim.accum_steps)
    if p.gpus > 1 and rest == 0:
        batch += f"; the config's own batch, {own} on one process, is --set train.batch_size={per_gpu}"
    lines.append(batch)
    fits = (f"fits in {p.gpu_memory:g} GiB" if p.fits else f"does NOT fit in {p.gpu_memory:g} GiB")
    precision = ("fp32" if p.dtype is None else
                 f"{_dtype(p.dtype)} autocast as on a CPU, which keeps attention in fp32: an upper bound")
    lines.append(
        f"memory/GPU    {_gib(p.activation_bytes)} activations (the tensors saved for the backward pass at batch "
        f"{train.batch_size}, {precision}; counted on fake tensors) + {_gib(p.state_bytes)} weights, gradients, AdamW"
        f"{' and DDP buckets' if p.gpus > 1 else ''} = {_gib(p.memory_bytes)}: {fits} "
        f"(at most {p.max_batch} per GPU with {1 - HEADROOM:.0%} kept free)")
    need = p.batch / p.step_s
    workers = max(1, cfg.data.num_workers)
    volume = "x".join(map(str, p.volume))
    loader = (f"loader        {p.samples_per_s:.3g} samples/s ({p.samples_per_s * n_views:.3g} views/s) per worker "
              f"(the sampler on one thread of this machine's CPU, on a synthetic {volume} volume); "
              f"each GPU consumes {need:.3g} samples/s, which takes {math.ceil(need / p.samples_per_s)} workers; "
              f"data.num_workers is {cfg.data.num_workers}")
    lines.append(loader + (f": the loader is {p.loader_factor:.2g}x slower than the GPUs" if p.loader_factor > 1
                           else ""))
    per_epoch = p.cases / p.global_batch
    length = (f"{train.epochs:g} epochs = {p.total_steps} steps" if train.epochs > 0 else f"{p.total_steps} steps")
    run = p.total_steps * p.step_s
    time_line = (f"time          {_duration(p.step_s)} per step at MFU {p.mfu:g}; an epoch of {p.cases} cases (--cases)"
                 f" = {per_epoch:.3g} steps = {_duration(per_epoch * p.step_s)}; the run, {length}, "
                 f"{_duration(run)}")
    if p.loader_factor > 1:
        time_line += f" ({_duration(run * p.loader_factor)} at the rate of {workers} loader workers per GPU)"
    if cfg.task == "finetune":
        time_line += "; validation not counted"
    lines.append(time_line)
    return "\n".join(lines)


def report_measured(p: Plan, m: Measured) -> str:
    predicted = p.batch * p.flops / (m.peak_tflops * 1e12 * p.mfu)
    return "\n".join([
        f"measured      on {m.device}{' (one thread, CPU time)' if m.cpu_time else ''}, {_dtype(m.dtype)}, "
        f"{p.cfg.train.batch_size} x {p.cfg.optim.accum_steps} samples per step: {_duration(m.step_s)} per step "
        f"(median); the device's matmul peak {m.peak_tflops:.3g} TFLOP/s, so MFU {m.mfu:.2f}; at --mfu "
        f"{p.mfu:g} the plan's FLOPs predict {_duration(predicted)}",
        f"              counted on real tensors ({_dtype(m.dtype)}): {_flops(m.flops / p.batch)} per sample, "
        f"{_gib(m.saved_bytes)} saved for the backward pass at batch {p.cfg.train.batch_size} (on fake tensors: "
        f"{_gib(m.fake_saved_bytes)})",
    ])
