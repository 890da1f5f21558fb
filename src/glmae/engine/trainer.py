"""The training loop shared by every method. It does not know which method it trains.

A method is an `nn.Module` whose `forward(batch)` returns `(loss, logs)` (logs: scalar tensors)
and which may define `after_step(step, total) -> dict` (e.g. a momentum-teacher update) and
`figure(batch, path)` (main process only, every `fig_every` steps and at the end). The caller
may pass `evaluate(model, step) -> dict` (fine-tuning validation; called on every rank, must
return the same dict everywhere).

Per step: learning rate from the schedule, `accum_steps` micro-batches under autocast
(gradients synchronised across ranks on the last one), a non-finite check on every rank, gradient
clipping, the optimiser step, `after_step`, logs, validation, figures and the checkpoint
`RUN/checkpoints/last.pt` (every `ckpt_every` steps, at the end and on SIGINT/SIGTERM).
The learning-rate schedule is a pure function of the step, so the step is its whole state.
"""

from __future__ import annotations

import contextlib
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
from glmae.engine.distributed import DistEnv
from glmae.engine.logger import RunLogger
from glmae.engine.optim import build_optimizer, lr_at, param_groups, peak_lr, set_lr
from glmae.errors import InputError, Interrupted, TrainingError

# fields a resumed run may change: how long it runs
RESUMABLE_CHANGES = {"train.max_steps", "train.epochs"}


def amp_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for `train.amp`. auto: bf16 on CUDA devices that support it (else fp16), and
    on CPUs with AMX tiles, where bf16 matrix products run several times faster than fp32."""
    if setting == "off":
        return None
    if setting == "bf16":
        return torch.bfloat16
    if setting == "fp16":
        if device.type != "cuda":
            raise InputError("train.amp=fp16 needs a CUDA device (use bf16 or off on CPU)")
        return torch.float16
    if setting != "auto":
        raise InputError(f"train.amp: expected auto, bf16, fp16 or off, got {setting!r}")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return torch.bfloat16 if device.type == "cpu" and amx else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


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


def config_differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(a) | set(b))
    out = []
    for key in keys:
        name = f"{prefix}{key}"
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_differences(va, vb, name + ".")
        elif va != vb:
            out.append(name)
    return out


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
    best_metric: str | None = None,
    figure_prefix: str = "recon",
) -> nn.Module:
    """Train `model` on samples of `dataset`; returns the trained model (unwrapped)."""
    run_dir = Path(run_dir)
    ckpt_path = run_dir / "checkpoints" / "last.pt"
    device = env.device
    accum = cfg.optim.accum_steps
    total = cfglib.steps_for_epochs(cfg, len(dataset), env.world_size)
    dtype = amp_dtype(cfg.train.amp, device)

    model.to(device)
    optimizer = build_optimizer(groups or param_groups(model, cfg.optim.weight_decay), cfg.optim)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
    start, best = 0, None
    if resume:
        state = checkpoint.load(ckpt_path)
        changed = [k for k in config_differences(cfglib.to_dict(cfg), state["config"]) if k not in RESUMABLE_CHANGES]
        if changed:
            raise InputError(
                f"--resume: the configuration differs from the checkpoint's in {', '.join(changed[:5])}",
                ckpt_path,
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start, best = state["step"], state.get("best")
        rngs = state["rng"]
        if len(rngs) != env.world_size:
            raise InputError(f"--resume: the run used {len(rngs)} processes, now {env.world_size}", ckpt_path)
        set_rng_state(rngs[env.rank])
        if start >= total:
            raise InputError(f"--resume: the run already finished ({start} of {total} steps)", ckpt_path)

    net = model
    if env.distributed:
        net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    stream = SampleStream(len(dataset), cfg.train.seed, cfg.train.batch_size, env.rank, env.world_size, start * accum)
    batches = iter(make_loader(dataset, stream, cfg.data.num_workers, pin_memory=device.type == "cuda"))
    peak = peak_lr(cfg.optim, cfg.train.batch_size * accum * env.world_size)
    logger = RunLogger(run_dir, total, start, name, enabled=env.is_main)
    if start:
        logger.message(f"resumed from {ckpt_path} at step {start}")

    def save(step: int, path: Path = ckpt_path) -> None:
        rngs = distributed.all_gather_objects(rng_state(), env)
        if env.is_main:
            checkpoint.save(
                {
                    "kind": name,
                    "config": cfglib.to_dict(cfg),
                    "step": step,
                    "data_position": step * accum,  # micro-steps consumed by the sample stream
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(),
                    "rng": rngs,
                    "best": best,
                },
                path,
            )

    sums: dict[str, torch.Tensor] = {}
    n_summed = 0
    model.train()
    with _StopSignal() as stop:
        try:
            for step in range(start, total):
                lr = lr_at(step, total, peak, cfg.optim.warmup_steps, cfg.optim.min_lr)
                set_lr(optimizer, lr)
                for micro in range(accum):
                    batch = to_device(next(batches), device)
                    last_micro = micro == accum - 1
                    sync = contextlib.nullcontext() if last_micro or not env.distributed else net.no_sync()
                    with sync:
                        with autocast(device, dtype):
                            loss, logs = net(batch)
                        flags = torch.tensor(
                            [0.0 if torch.isfinite(loss).item() else 1.0, float(stop.received is not None)]
                        )
                        flags = distributed.all_reduce_mean(flags, env)
                        if flags[0] > 0:
                            raise TrainingError(
                                f"the loss became non-finite at step {step + 1}; last good checkpoint: "
                                f"{ckpt_path if ckpt_path.exists() else 'none yet'}"
                            )
                        scaler.scale(loss / accum).backward()
                    for key, value in {"loss": loss, **logs}.items():
                        sums[key] = sums.get(key, 0.0) + value.detach().float()
                    n_summed += 1
                if cfg.optim.clip_grad > 0:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                done = step + 1
                extra = model.after_step(done, total) if hasattr(model, "after_step") else {}
                logger.advance(done)

                if done % cfg.train.log_every == 0 or done == total:
                    keys = sorted(sums)
                    means = distributed.all_reduce_mean(torch.stack([sums[k] for k in keys]) / n_summed, env)
                    logger.log(done, {**dict(zip(keys, means.tolist())), **extra, "lr": lr})
                    sums, n_summed = {}, 0
                if evaluate is not None and (
                    done == total or (cfg.train.val_every and done % cfg.train.val_every == 0)
                ):
                    model.eval()
                    metrics = evaluate(model, done)
                    model.train()
                    logger.log(done, metrics)
                    if best_metric is not None and (best is None or metrics[best_metric] > best):
                        best = float(metrics[best_metric])
                        save(done, run_dir / "checkpoints" / "best.pt")
                if hasattr(model, "figure") and env.is_main and (
                    done == total or (cfg.train.fig_every and done % cfg.train.fig_every == 0)
                ):
                    model.eval()
                    with torch.no_grad(), autocast(device, dtype):
                        model.figure(batch, run_dir / "figures" / f"{figure_prefix}_{done:06d}.png")
                    model.train()
                stopping = flags[1] > 0
                if done % cfg.train.ckpt_every == 0 or done == total or stopping:
                    save(done)
                if stopping:
                    raise Interrupted(f"stopped by signal at step {done}; resume with --resume ({ckpt_path})")
        finally:
            logger.close()
    return model
