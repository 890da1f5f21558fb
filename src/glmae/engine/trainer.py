"""The training loop shared by every method. It does not know which method it trains.

A method is an `nn.Module` whose `forward(batch)` returns `(loss, logs)` (logs: scalar tensors)
and which may define `after_step(step, total, applied) -> dict` (e.g. a momentum-teacher update;
`applied` is a 0-dim tensor on the device, 1.0 when the optimiser step was taken and 0.0 when the
fp16 loss scaler skipped it, so an update can be scaled by it without a host sync) and
`figure(batch, path)` (main process only, every `fig_every` steps and at the end) and
`watch(step, logged, say) -> dict` (its own alarms on each logged step's values, which are the same
on every rank; the values it returns are logged with them; `say` on the main process). The caller
may pass `evaluate(model, step) -> dict` (fine-tuning validation; called on every rank every
`evaluate_every` steps and at the end, must return the same dict everywhere); with `best_metric`
the step where it peaks is kept as `RUN/checkpoints/best.pt`.

Per step (`Trainer.step`): learning rate from the schedule, `accum_steps` micro-batches under
autocast (gradients synchronised across ranks on the last one), gradient clipping, the optimiser
step, `after_step`. The step never waits for the device: a non-finite loss is recorded on the
device (the first step it happened), and the stop signal is shared over the host group. Then the
periodic work (`Trainer.periodic`): whenever logs, validation, a figure or a checkpoint are due,
the non-finite record is checked first (one host sync), so a non-finite loss stops the run before
anything is logged or saved and the last checkpoint stays a good one. Then logs, validation,
figures and the checkpoint `RUN/checkpoints/last.pt` (every `ckpt_every` steps, at the end and on
SIGINT/SIGTERM). Under DDP, BatchNorm layers are synchronised (`distributed.SyncBatchNorm`), so K
processes with batch B train as one process with batch K·B. The learning-rate schedule is a pure
function of the step, so the step is its whole state.
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from glmae import config as cfglib
from glmae.config import Config
from glmae.engine import checkpoint, distributed
from glmae.engine.data import SampleDataset, SampleStream, make_loader
from glmae.engine.data import close as close_loader
from glmae.engine.distributed import DistEnv
from glmae.engine.logger import RunLogger
from glmae.engine.optim import build_optimizer, lr_at, param_groups, peak_lr, set_lr
from glmae.engine.precision import amp_dtype, autocast
from glmae.errors import InputError, Interrupted, TrainingError, warn

# the fields a resumed run may change: those of the schedule, which is then re-planned from the
# step it resumes at (a warning says so); any other change is refused
SCHEDULE_FIELDS = {"train.max_steps", "train.epochs", "train.batch_size", "optim.accum_steps", "optim.lr",
                   "optim.lr_scaling", "optim.min_lr", "optim.warmup_steps", "optim.warmup_epochs"}


def to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def rng_state() -> dict:
    """This process's random states as tensors and plain values (loadable with weights_only)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2])},
        "python": {"version": py_state[0], "state": list(py_state[1])},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    keys = state["numpy"]["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, state["numpy"]["pos"]))
    random.setstate((state["python"]["version"], tuple(state["python"]["state"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _StopSignal:
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the end of the step and stops."""

    def __init__(self):
        self.received: int | None = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _flat(tree: dict, prefix: str = "") -> dict:
    """{"optim": {"lr": 1}} -> {"optim.lr": 1}"""
    out = {}
    for key, value in tree.items():
        out |= _flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
    return out


def _every(done: int, interval: int, total: int) -> bool:
    """Periodic work after step `done`: every `interval` steps (0: never) and at the end."""
    return done == total or (interval > 0 and done % interval == 0)


class Trainer:
    """The state of one training run and its three parts: `restore`, `step`, `periodic`."""

    def __init__(self, model: nn.Module, cfg: Config, run_dir: Path, env: DistEnv, name: str,
                 groups: list[dict] | None, n_items: int):
        self.model, self.cfg, self.env, self.name, self.n_items = model, cfg, env, name, n_items
        self.total = cfglib.steps_for_epochs(cfg, n_items, env.world_size)
        self.global_batch = cfglib.global_batch(cfg, env.world_size)
        self.run_dir = Path(run_dir)
        self.last_path = self.run_dir / "checkpoints" / "last.pt"
        self.dtype = amp_dtype(cfg.train.amp, env.device)
        model.to(env.device)
        self.optimizer = build_optimizer(groups or param_groups(model, cfg.optim.weight_decay), cfg.optim)
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=self.dtype is torch.float16)
        self.start, self.samples, self.best = 0, 0, None  # steps and samples (all ranks) done before this run
        self.sums: dict[str, torch.Tensor] = {}
        self.n_summed = 0
        # the first step whose loss was not finite since the last check (inf: none), on the device
        self.first_bad = torch.full((), math.inf, device=env.device)
        self.applied = torch.ones((), device=env.device)  # the optimiser step was taken (no fp16 skip)

    # -- restore ------------------------------------------------------------------------------

    def restore(self) -> None:
        """Weights, optimiser, loss scaler, best metric and this rank's random state of last.pt."""
        state = checkpoint.load(self.last_path)
        before = state["config"]
        changed = cfglib.differences(cfglib.to_dict(self.cfg), before)
        refused = [k for k in changed if k not in SCHEDULE_FIELDS]
        if refused:
            raise InputError(f"--resume: the configuration differs from the checkpoint's in {', '.join(refused[:5])}",
                             self.last_path)
        rngs = state["rng"]
        if len(rngs) != self.env.world_size:
            raise InputError(f"--resume: the run used {len(rngs)} processes, now {self.env.world_size}",
                             self.last_path)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.start, self.best = state["step"], state.get("best")
        # checkpoints before `samples` recorded micro-steps of a batch that could not change
        self.samples = state["samples"] if "samples" in state else (
            state["data_position"] * before["train"]["batch_size"] * len(rngs))
        set_rng_state(rngs[self.env.rank])
        if self.cfg.train.epochs > 0:  # the samples left of the run, at the batch it now has
            left = self.cfg.train.epochs * self.n_items - self.samples
            self.total = self.start + max(0, math.ceil(left / self.global_batch))
        if changed and self.env.is_main:
            old = {k: v for k, v in _flat(before).items() if k in changed}
            new = {k: v for k, v in _flat(cfglib.to_dict(self.cfg)).items() if k in changed}
            what = ", ".join(f"{k} {old.get(k)} -> {new.get(k)}" for k in changed)
            warn(f"--resume changes the schedule ({what}): the learning-rate and momentum schedules are "
                 f"re-planned from step {self.start} (now {self.total} steps), so the run does not continue "
                 f"as it started", self.last_path)
        if self.start >= self.total:
            raise InputError(f"--resume: the run already finished ({self.start} of {self.total} steps)",
                             self.last_path)

    def save(self, step: int, path: Path | None = None) -> None:
        rngs = distributed.all_gather_objects(rng_state(), self.env)
        if self.env.is_main:
            checkpoint.save(
                {
                    "kind": self.name,
                    "config": cfglib.to_dict(self.cfg),
                    "step": step,
                    "samples": self.samples + (step - self.start) * self.global_batch,  # the stream consumed
                    "model": self.model.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "scaler": self.scaler.state_dict(),
                    "rng": rngs,
                    "best": self.best,
                },
                path or self.last_path,
            )

    # -- step ---------------------------------------------------------------------------------

    def step(self, step: int, net: nn.Module, batches, lr: float, stop: _StopSignal) -> tuple[dict, bool]:
        """One optimiser step over `accum_steps` micro-batches; returns (the last batch, whether a
        stop signal reached any rank). Nothing here waits for the device."""
        env, accum = self.env, self.cfg.optim.accum_steps
        set_lr(self.optimizer, lr, step)
        for micro in range(accum):
            batch = to_device(next(batches), env.device)
            sync = contextlib.nullcontext() if micro == accum - 1 or not env.distributed else net.no_sync()
            with sync:
                with autocast(env.device, self.dtype):
                    loss, logs = net(batch)
                self.scaler.scale(loss / accum).backward()
            loss = loss.detach()
            self.first_bad = torch.where(torch.isfinite(loss), self.first_bad, self.first_bad.clamp(max=step + 1))
            for key, value in {"loss": loss, **logs}.items():
                self.sums[key] = self.sums.get(key, 0.0) + value.detach().float()
            self.n_summed += 1
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
            # the scaler skips the step when it found inf/NaN gradients; its record stays on the device
            found_inf = sum(self.scaler._found_inf_per_device(self.optimizer).values())
            self.applied = (found_inf == 0).float()
        if self.cfg.optim.clip_grad > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return batch, distributed.any_rank(stop.received is not None, env)

    def check_finite(self) -> None:
        """TrainingError if a loss since the last check was not finite on any rank (a host sync)."""
        first = distributed.all_reduce_min(self.first_bad, self.env).item()
        if math.isfinite(first):
            raise TrainingError(
                f"the loss became non-finite at step {int(first)}; last good checkpoint: "
                f"{self.last_path if self.last_path.exists() else 'none yet'}"
            )

    # -- periodic work ------------------------------------------------------------------------

    def log(self, done: int, logger: RunLogger, extra: dict, lr: float) -> None:
        """Means over the micro-steps since the last log and over the ranks."""
        keys = sorted(self.sums)
        means = distributed.all_reduce_mean(torch.stack([self.sums[k] for k in keys]) / self.n_summed, self.env)
        values = {**dict(zip(keys, means.cpu().tolist())), **extra, "lr": lr}
        watch = getattr(self.model, "watch", None)  # a method's own alarms on its logged values
        if watch is not None:
            values.update(watch(done, values, self.env.is_main))
        logger.log(done, values)
        self.sums, self.n_summed = {}, 0

    def validate(self, done: int, logger: RunLogger, evaluate: Callable, best_metric: str | None) -> None:
        self.model.eval()
        metrics = evaluate(self.model, done)
        self.model.train()
        logger.log(done, metrics)
        if best_metric is not None and (self.best is None or metrics[best_metric] > self.best):
            self.best = float(metrics[best_metric])
            self.save(done, self.run_dir / "checkpoints" / "best.pt")

    def figure(self, done: int, batch: dict) -> None:
        self.model.eval()
        with torch.no_grad(), autocast(self.env.device, self.dtype):
            self.model.figure(batch, self.run_dir / "figures" / f"recon_{done:06d}.png")
        self.model.train()

    def periodic(self, done: int, batch: dict, logger: RunLogger, extra: dict, lr: float, stopping: bool,
                 evaluate: Callable | None, evaluate_every: int, best_metric: str | None) -> None:
        """After step `done`: check the losses, then log, validate, draw and checkpoint when each is due."""
        train = self.cfg.train
        due_log = _every(done, train.log_every, self.total)
        due_val = evaluate is not None and _every(done, evaluate_every, self.total)
        due_fig = hasattr(self.model, "figure") and _every(done, train.fig_every, self.total)
        due_ckpt = _every(done, train.ckpt_every, self.total) or stopping
        if not (due_log or due_val or due_fig or due_ckpt):
            return
        self.check_finite()
        if due_log:
            self.log(done, logger, extra, lr)
        if due_val:
            self.validate(done, logger, evaluate, best_metric)
        if due_fig and self.env.is_main:
            self.figure(done, batch)
        if due_ckpt:
            self.save(done)


def set_grad_checkpoint(model: nn.Module) -> int:
    """Activation checkpointing in every block of `model` that offers it (a `grad_checkpoint`
    attribute, as the ViT's blocks); returns how many do."""
    blocks = [m for m in model.modules() if hasattr(m, "grad_checkpoint")]
    for block in blocks:
        block.grad_checkpoint = True
    return len(blocks)


def fit(
    model: nn.Module,
    cfg: Config,
    dataset: SampleDataset,
    run_dir: Path,
    env: DistEnv,
    *,
    name: str = "train",
    resume: bool = False,
    groups: list[dict] | None = None,
    evaluate: Callable[[nn.Module, int], dict] | None = None,
    evaluate_every: int = 0,
    best_metric: str | None = None,
) -> nn.Module:
    """Train `model` on samples of `dataset`; returns the trained model (unwrapped)."""
    if env.distributed:
        model = distributed.convert_sync_batchnorm(model)
    if cfg.train.grad_checkpoint and not set_grad_checkpoint(model) and env.is_main:
        warn(f"train.grad_checkpoint: {type(model).__name__} has no blocks that checkpoint their activations")
    trainer = Trainer(model, cfg, run_dir, env, name, groups, len(dataset))
    if resume:
        trainer.restore()
    start, total = trainer.start, trainer.total
    net = model
    if env.distributed:
        net = DistributedDataParallel(model, device_ids=[env.device] if env.device.type == "cuda" else None)
    if cfg.train.compile:
        net = torch.compile(net)  # the first steps compile; DDP inside, so graphs split at its buckets
    stream = SampleStream(len(dataset), cfg.train.seed, cfg.train.batch_size, env.rank, env.world_size, trainer.samples)
    batches = iter(make_loader(dataset, stream, cfg.data.num_workers, pin_memory=env.device.type == "cuda"))
    peak = peak_lr(cfg.optim, cfglib.global_batch(cfg, env.world_size))
    warmup = cfglib.warmup_steps(cfg, len(dataset), env.world_size)
    logger = RunLogger(run_dir, total, start, name, enabled=env.is_main)
    if start:
        logger.message(f"resumed from {trainer.last_path} at step {start}")
    model.train()
    with _StopSignal() as stop:
        try:
            for step in range(start, total):
                lr = lr_at(step, total, peak, warmup, cfg.optim.min_lr)
                batch, stopping = trainer.step(step, net, batches, lr, stop)
                done = step + 1
                extra = model.after_step(done, total, trainer.applied) if hasattr(model, "after_step") else {}
                logger.advance(done)
                trainer.periodic(done, batch, logger, extra, lr, stopping, evaluate, evaluate_every, best_metric)
                if stopping:
                    raise Interrupted(f"stopped by signal at step {done}; resume with --resume ({trainer.last_path})")
        finally:
            logger.close()
            close_loader(batches)
    return model
