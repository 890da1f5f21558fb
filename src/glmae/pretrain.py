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

import functools
import time
from pathlib import Path

import torch

from glmae import config as cfglib
from glmae.config import Config
from glmae.data.formats import load_dataset
from glmae.engine import checkpoint, distributed
from glmae.engine.data import SampleDataset
from glmae.engine.logger import read_log
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
        probe = Probe(cfg, out, env) if cfg.train.probe_data else None
        _, volumes = load_volumes(data, cfg, env, with_label=False)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        model = PRETRAINING[cfg.method.name](cfg.encoder, cfg.method)
        create_run_dir(out, cfg, env)
        samples = SampleDataset(volumes, model.sampler())
        groups = model.param_groups(cfg.optim) if hasattr(model, "param_groups") else None
        model = fit(model, cfg, samples, out, env, name="pretrain", resume=resume, groups=groups, evaluate=probe,
                    evaluate_every=cfg.train.probe_every)
        path = out / "encoder.safetensors"
        if env.is_main:
            step = cfglib.steps_for_epochs(cfg, len(samples), env.world_size)
            checkpoint.save_encoder(model.export_encoder.state_dict(), encoder_meta(cfg, step), path)
        distributed.barrier(env)
        return path
    finally:
        distributed.cleanup()


class Probe:
    """The online probe as the engine's periodic evaluation: `probe_dice` of the method's exported
    encoder on `train.probe_data`, and its curve in OUT/figures/probe_dice.png."""

    def __init__(self, cfg: Config, out: Path, env):
        from glmae.methods.probe import centre_crops

        data = cfg.train.probe_data
        dataset = load_dataset(data)
        train, val = dataset.split("training"), dataset.split("validation")
        if not train or not val:
            raise InputError("train.probe_data: the probe needs training and validation cases", data)
        values = sorted(v for v in dataset.labels if v != 0)
        if not values:
            raise InputError("train.probe_data: the data set declares no foreground labels", data)
        load = functools.partial(load_volumes, data, cfg, env, with_label=True, label_values=[0, *values],
                                 labels_from="the probe data set's `labels`")
        size = cfg.method.input_size
        self.train, self.val = (centre_crops(load(cases=c)[1], size, values) for c in (train, val))
        self.n_classes, self.cfg, self.env = len(values), cfg, env
        self.figure = out / "figures" / "probe_dice.png"
        self.log = out / "log.jsonl"

    def __call__(self, model, step: int) -> dict:
        from glmae.figures import curves_figure
        from glmae.methods.probe import probe_dice

        started = time.perf_counter()
        metrics = probe_dice(model.export_encoder, self.train, self.val, self.n_classes, self.cfg.train.probe_steps,
                             self.env.device, seed=self.cfg.train.seed)
        metrics["probe_seconds"] = time.perf_counter() - started  # what the probe costs the run
        if self.env.is_main:
            logged = [r for r in read_log(self.log) if "probe_dice" in r and r["step"] < step]
            points = [(r["step"], r["probe_dice"]) for r in logged] + [(step, metrics["probe_dice"])]
            curves_figure({"probe Dice": tuple(zip(*points))}, self.figure, title="online probe: linear head on "
                          "the frozen encoder", ylabel="mean Dice (validation)")
        return metrics
