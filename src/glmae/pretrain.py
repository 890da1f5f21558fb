"""`glmae pretrain`: data set -> preprocessed volumes (images only) -> method -> engine -> encoder.

"Self pre-training" (SelfMedMAE): by default the images of the data set's training split are used;
labels are never opened. `data.intensity=auto` is resolved for the data set (ct when every channel
is declared CT, else mri, with a warning when no modality is declared) and recorded so in
config.yaml, the checkpoints and encoder.json.

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
from glmae.data.formats import load_dataset
from glmae.engine import checkpoint, distributed
from glmae.engine.data import SampleDataset
from glmae.engine.run import check_run_dir, create_run_dir, encoder_meta, load_volumes, resolve_intensity
from glmae.engine.trainer import fit
from glmae.errors import InputError


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
        cfg = resolve_intensity(cfg, load_dataset(data), data, say=env.is_main)  # recorded as resolved
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
