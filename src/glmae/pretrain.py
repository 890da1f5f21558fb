"""`glmae pretrain`: data set -> preprocessed volumes (images only) -> method -> engine -> encoder.

"Self pre-training" (SelfMedMAE): by default the images of the data set's training split are used;
labels are never opened.

Run folders are created only once the inputs passed their checks: the config, the data set, the
headers of every case, then every case preprocessed (voxels read, NaN/Inf and label values
checked). A refused run leaves no folder behind (or, with --resume, the folder as it was).
`--resume` on a run that was killed before its first checkpoint starts it again from step 0.
"""

from __future__ import annotations

from pathlib import Path

import torch

from glmae import config as cfglib
from glmae.config import Config
from glmae.engine import checkpoint, distributed
from glmae.engine.data import SampleDataset
from glmae.engine.distributed import DistEnv
from glmae.engine.trainer import RESUMABLE_CHANGES, config_differences, fit
from glmae.errors import InputError, warn


def check_run_dir(out: Path, resume: bool, cfg: Config) -> bool:
    """Refuse to overwrite an existing run, to resume none, or to resume one with another config
    (beyond its length); writes nothing. Returns whether to continue from checkpoints/last.pt:
    False for a new run, and for --resume of a run killed before its first checkpoint, which starts
    again from step 0."""
    last, recorded = out / "checkpoints" / "last.pt", out / "config.yaml"
    started = last.exists() or recorded.exists()
    if resume and not started:
        raise InputError("--resume: nothing to resume (no checkpoints/last.pt, no config.yaml)", out)
    if not resume and started:
        raise InputError("already holds a run; pass --resume to continue it or choose another --out", out)
    if resume and last.is_file() and recorded.is_file():
        changed = config_differences(cfglib.to_dict(cfg), cfglib.to_dict(cfglib.load_config(str(recorded))))
        changed = [k for k in changed if k not in RESUMABLE_CHANGES]
        if changed:
            raise InputError(f"--resume: the configuration differs from the run's in {', '.join(changed[:5])}",
                             recorded)
    if resume and not last.is_file():
        warn("--resume: the run has no checkpoint yet (stopped before the first): starting from step 0", out)
    return resume and last.is_file()


def create_run_dir(out: Path, cfg: Config, env: DistEnv) -> None:
    """Write OUT/config.yaml (main process). Leftovers of checkpoint writes cut short by a kill
    (checkpoints/.*.tmp) are removed."""
    distributed.barrier(env)  # every rank has checked the folder before the main one writes into it
    if env.is_main:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        for tmp in (out / "checkpoints").glob(".*.tmp"):
            tmp.unlink()
        text = cfglib.dump_yaml(cfg).encode()
        checkpoint.atomic_write(out / "config.yaml", lambda f: f.write(text))
    distributed.barrier(env)


def load_volumes(data: str, cfg: Config, env: DistEnv, with_label: bool, cases=None, label_values=None):
    """Check, preprocess (once, into the cache) and memory-map the volumes of `cases` (default: the
    data set's training split); label values outside `label_values` (if given) are an error. The
    main process fills the cache first; the others then read it. A warning line for each volume
    smaller than the method's ROI (it gets padded)."""
    from glmae.data.formats import load_dataset
    from glmae.data.preprocess import Preprocessor, warn_smaller_than_roi

    dataset = load_dataset(data)
    if cases is None:
        cases = dataset.split("training") or dataset.cases
    if len(dataset.modalities) != cfg.encoder.in_channels:
        raise InputError(
            f"the data set has {len(dataset.modalities)} channel(s) ({', '.join(dataset.modalities)}) but the "
            f"encoder expects encoder.in_channels={cfg.encoder.in_channels}",
            data,
        )
    pre = Preprocessor(cfg.data, dataset.modalities, label_values)
    if env.is_main:
        volumes = pre.prepare(cases, with_label=with_label)
    distributed.barrier(env)
    if not env.is_main:
        volumes = pre.prepare(cases, with_label=with_label, progress=False)
    elif hasattr(cfg.method, "roi"):
        warn_smaller_than_roi(volumes, cfg.method.roi)
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
        resume = check_run_dir(out, resume, cfg)
        _, volumes = load_volumes(data, cfg, env, with_label=False)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        model = PRETRAINING[cfg.method.name](cfg.encoder, cfg.method)
        create_run_dir(out, cfg, env)
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
