"""`glmae pretrain`: data set -> preprocessed volumes (images only) -> method -> engine -> encoder.

"Self pre-training" (SelfMedMAE): by default the images of the data set's training split are used;
labels are never opened.
"""

from __future__ import annotations

from pathlib import Path

import torch

from glmae import config as cfglib
from glmae.config import Config
from glmae.engine import checkpoint, distributed
from glmae.engine.data import SampleDataset
from glmae.engine.distributed import DistEnv
from glmae.engine.trainer import fit
from glmae.errors import InputError


def prepare_run_dir(out: Path, resume: bool, cfg: Config, env: DistEnv) -> None:
    """Refuse to overwrite an existing run; on resume require its checkpoint. Writes config.yaml."""
    last = out / "checkpoints" / "last.pt"
    if resume and not last.is_file():
        raise InputError("--resume: no checkpoint to resume from (checkpoints/last.pt is missing)", out)
    if not resume and (last.exists() or (out / "config.yaml").exists()):
        raise InputError("already holds a run; pass --resume to continue it or choose another --out", out)
    distributed.barrier(env)  # every rank has looked before the main one writes config.yaml
    if env.is_main:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        text = cfglib.dump_yaml(cfg).encode()
        checkpoint.atomic_write(out / "config.yaml", lambda f: f.write(text))
    distributed.barrier(env)


def load_volumes(data: str, cfg: Config, env: DistEnv, with_label: bool, cases=None):
    """Preprocess (once, into the cache) and memory-map the volumes of `cases` (default: the
    data set's training split). The main process fills the cache first; the others then read it."""
    from glmae.data.formats import load_dataset
    from glmae.data.preprocess import Preprocessor

    dataset = load_dataset(data)
    if cases is None:
        cases = dataset.split("training") or dataset.cases
    if len(dataset.modalities) != cfg.encoder.in_channels:
        raise InputError(
            f"the data set has {len(dataset.modalities)} channel(s) ({', '.join(dataset.modalities)}) but the "
            f"encoder expects encoder.in_channels={cfg.encoder.in_channels}",
            data,
        )
    pre = Preprocessor(cfg.data, dataset.modalities)
    if env.is_main:
        volumes = pre.prepare(cases, with_label=with_label)
    distributed.barrier(env)
    if not env.is_main:
        volumes = pre.prepare(cases, with_label=with_label, progress=False)
    return dataset, volumes


def encoder_meta(cfg: Config, step: int) -> dict:
    return {
        "format": "glmae-encoder/1",
        "encoder": cfglib.to_dict(cfg.encoder),
        "method": cfg.method.name,
        "steps": step,
    }


def pretrain(cfg: Config, data: str, out: str | Path, resume: bool = False) -> Path:
    """Run pre-training; returns the path of `OUT/encoder.safetensors`."""
    from glmae.methods import PRETRAINING

    if cfg.task != "pretrain" or cfg.method.name not in PRETRAINING:
        raise InputError(
            f"config: {cfg.method.name!r} is not a pre-training method (use one of {', '.join(PRETRAINING)})"
        )
    out = Path(out)
    env = distributed.init(cfg.train.device)
    try:
        prepare_run_dir(out, resume, cfg, env)
        _, volumes = load_volumes(data, cfg, env, with_label=False)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        model = PRETRAINING[cfg.method.name](cfg.encoder, cfg.method)
        samples = SampleDataset(volumes, model.sampler())
        model = fit(model, cfg, samples, out, env, name="pretrain", resume=resume)
        path = out / "encoder.safetensors"
        if env.is_main:
            step = cfglib.steps_for_epochs(cfg, len(samples), env.world_size)
            checkpoint.save_encoder(model.export_encoder.state_dict(), encoder_meta(cfg, step), path)
        distributed.barrier(env)
        return path
    finally:
        distributed.cleanup()
