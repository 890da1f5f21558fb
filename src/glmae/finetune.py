"""`glmae finetune`: a segmentation network (UNETR, Swin-UNETR) with a pretrained or random encoder,
trained by the shared engine on the labelled cases, validated by sliding-window Dice.

Splits (written to RUN/splits.json as {"train": [ids], "val": [ids], "test": [ids]}, read by
`glmae evaluate`): the data set's own `validation` and `test` lists when it has them; otherwise a
seeded 20% of the labelled training cases (at least 1) is held out for validation. The training
cases are one seeded permutation of the remaining ones, of which `--label-fraction F` takes the
first max(1, round(F·n)): for a given `--split-seed` the validation cases are the same for every F
and the subsets are nested (the 25% subset is a prefix of the 50% one).

`--init` loads the encoder weights of an `encoder.safetensors` (+ its `encoder.json`), of a
pretraining checkpoint (the encoder that pretraining exports, e.g. GL-MAE's teacher) or of another
fine-tuning checkpoint; its architecture (every encoder field but `drop_path`) must equal the
config's encoder. Position embeddings are fixed sin-cos for the ROI's token grid (ViT) or relative
within attention windows (Swin), so nothing is interpolated.

The resolved config records the options (`method.mode`, `init`, `label_fraction`, `split_seed`),
the label names and values (`method.labels`, `method.regions`, from the data set when the config
leaves them empty) and the intensity mode, so checkpoints describe themselves.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

from glmae import config as cfglib
from glmae.config import Config, EncoderConfig
from glmae.engine import checkpoint, distributed
from glmae.engine.checkpoint import save_json
from glmae.engine.data import SampleDataset
from glmae.engine.run import check_run_dir, create_run_dir, load_volumes, read_encoder
from glmae.engine.trainer import fit
from glmae.errors import InputError

VAL_FRACTION = 0.2
# encoder fields that do not change the architecture (every other field does)
TRAINING_FIELDS = ("drop_path",)


# ----------------------------------------------------------------------------------------------
# Splits


def seeded_order(ids: list[str], seed: int) -> list[str]:
    """The ids (sorted first, so listing order does not matter) in a permutation drawn from `seed`."""
    ids = sorted(ids)
    return [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]


def make_splits(dataset, label_fraction: float, seed: int) -> dict[str, list[str]]:
    """{"train", "val", "test"} case ids of the labelled cases (see the module docstring)."""
    labelled = dataset.labelled
    pool = seeded_order([c.id for c in labelled if c.split == "training"], seed)
    val = sorted(c.id for c in labelled if c.split == "validation")
    test = sorted(c.id for c in labelled if c.split == "test")
    if not val:
        if len(pool) < 2:
            raise InputError(
                f"fine-tuning needs a `validation` list or at least 2 labelled training cases "
                f"(found {len(pool)})",
                dataset.root,
            )
        n_val = max(1, round(VAL_FRACTION * len(pool)))
        val, pool = sorted(pool[:n_val]), pool[n_val:]
    if not pool:
        raise InputError("no labelled training cases", dataset.root)
    n_train = min(len(pool), max(1, int(label_fraction * len(pool) + 0.5)))
    return {"train": pool[:n_train], "val": val, "test": test}


# ----------------------------------------------------------------------------------------------
# Encoder initialisation


def architecture_mismatch(theirs: dict, ours: EncoderConfig) -> list[str]:
    """'field file-value != config-value' for each architecture field that differs."""
    ours = cfglib.to_dict(ours)
    fields = [k for k in ours if k not in TRAINING_FIELDS]
    return [f"{k} {theirs.get(k)!r} != {ours[k]!r}" for k in fields if theirs.get(k) != ours[k]]


def _names(keys, n: int = 3) -> str:
    keys = sorted(keys)
    return f" ({', '.join(keys[:n])}{', ...' if len(keys) > n else ''})" if keys else ""


def load_init(encoder: torch.nn.Module, init: str, cfg: Config) -> str:
    """Load `--init` into `encoder`; returns the report line (loaded, missing, unexpected)."""
    weights, arch, description = read_encoder(init)
    differences = architecture_mismatch(arch, cfg.encoder)
    if differences:
        raise InputError(
            f"--init: the encoder does not match the config's encoder: {'; '.join(differences)} (file != config)",
            init,
        )
    try:
        missing, unexpected = encoder.load_state_dict(weights, strict=False)
    except RuntimeError as err:  # same names, other shapes
        reason = str(err).splitlines()[-1].strip()
        raise InputError(f"--init: cannot load the encoder weights: {reason}", init) from None
    loaded = len(weights) - len(unexpected)
    if loaded == 0:
        raise InputError("--init: none of its tensors belongs to the encoder", init)
    return (
        f"init: {init} ({description}): loaded {loaded} tensors, missing {len(missing)}{_names(missing)}, "
        f"unexpected {len(unexpected)}{_names(unexpected)}"
    )


# ----------------------------------------------------------------------------------------------
# The run


def resolve(cfg: Config, dataset, init: str | None, mode: str | None, label_fraction: float | None,
            split_seed: int | None) -> Config:
    """The config with the command-line options (those given, i.e. not None: the others keep the
    config's values), label names/values and intensity mode filled in."""
    from glmae.data.preprocess import intensity_mode
    from glmae.methods.segmentation import MODES, check_network

    given = dict(init=init, mode=mode, label_fraction=label_fraction, split_seed=split_seed)
    method = dataclasses.replace(cfg.method, **{k: v for k, v in given.items() if v is not None})
    init = method.init
    if method.mode not in MODES:
        raise InputError(f"--mode (method.mode): expected {' or '.join(MODES)}, got {method.mode!r}")
    regions = {name: list(values) for name, values in (method.regions or dataset.regions).items()}
    labels = dict(method.labels or dataset.labels)
    if not labels and not regions:
        raise InputError("the data set declares no `labels`; set them with --set method.labels=...", dataset.root)
    labels.setdefault(0, "background")
    check_network(method, cfg.encoder)
    # an absolute path: a run resumes whichever way the same --init file is spelled
    init = init if init == "none" else str(Path(init).resolve())
    method = dataclasses.replace(
        method, labels=dict(sorted(labels.items())), regions=regions, init=init,
        label_fraction=float(method.label_fraction), split_seed=int(method.split_seed),
    )
    data = dataclasses.replace(cfg.data, intensity=intensity_mode(cfg.data, dataset.modalities))
    return dataclasses.replace(cfg, method=method, data=data)


class Validation:
    """The engine's `evaluate(model, step)`: Dice on the validation volumes, computed by rank 0 and
    broadcast. Keeps each step's full metrics for RUN/metrics.json."""

    def __init__(self, volumes: list, cfg: Config, env):
        self.volumes, self.cfg, self.env = volumes, cfg, env
        self.results: dict[int, dict] = {}

    def __call__(self, model, step: int) -> dict:
        from glmae.methods.validation import evaluate_volumes

        metrics = evaluate_volumes(model.net, self.volumes, self.cfg, self.env.device) if self.env.is_main else None
        metrics = distributed.broadcast_object(metrics, self.env)
        self.results[step] = metrics
        return {"mean_dice": metrics["mean_dice"], **{f"dice/{k}": v for k, v in metrics["per_class"].items()}}


def _check_splits(out: Path, splits: dict) -> None:
    path = out / "splits.json"
    if path.is_file() and json.loads(path.read_text()) != splits:
        raise InputError("--resume: the data set's cases changed since the run started (splits differ)", path)


def _validation_figure(out: Path) -> None:
    from glmae.engine.logger import read_log
    from glmae.figures import curves_figure

    records = [r for r in read_log(out / "log.jsonl") if "mean_dice" in r]
    series = {"mean": ([r["step"] for r in records], [r["mean_dice"] for r in records])}
    for key in sorted(k for k in records[-1] if k.startswith("dice/")):
        series[key[5:]] = ([r["step"] for r in records], [r[key] for r in records])
    curves_figure(series, out / "figures" / "validation_dice.png", title="validation Dice", ylabel="Dice")


def finetune(
    cfg: Config,
    data: str,
    out: str | Path,
    init: str | None = None,
    mode: str | None = None,
    label_fraction: float | None = None,
    split_seed: int | None = None,
    resume: bool = False,
) -> dict:
    """Run fine-tuning; returns the validation metrics of the best checkpoint (RUN/metrics.json).
    `init`, `mode`, `label_fraction` and `split_seed` override `cfg.method`'s fields when given."""
    from glmae.data.formats import load_dataset
    from glmae.methods import SEGMENTATION
    from glmae.methods.segmentation import TrainItem, declared_values, foreground_points
    from glmae.methods.validation import evaluate_volumes

    if cfg.task != "finetune" or cfg.method.name not in SEGMENTATION:
        raise InputError(
            f"config: {cfg.method.name!r} is not a fine-tuning method (use one of {', '.join(SEGMENTATION)})"
        )
    init = cfg.method.init if init is None else init
    if init != "none" and not Path(init).is_file():
        raise InputError("--init: no such file (expected encoder.safetensors, a last.pt or 'none')", init)
    out = Path(out)
    env = distributed.init(cfg.train.device)
    try:
        dataset = load_dataset(data)
        cfg = resolve(cfg, dataset, init, mode, label_fraction, split_seed)
        init = cfg.method.init
        splits = make_splits(dataset, cfg.method.label_fraction, cfg.method.split_seed)
        resume = check_run_dir(out, resume, cfg)
        if resume:
            _check_splits(out, splits)
        # every input is checked before the run folder is written: --init, then every case (the
        # preprocessing draws no random numbers, so the model may be built first)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        model = SEGMENTATION[cfg.method.name](cfg.encoder, cfg.method)
        report = load_init(model.net.encoder, init, cfg) if init != "none" and not resume else None
        by_id = {c.id: c for c in dataset.cases}
        cases = {name: [by_id[i] for i in splits[name]] for name in ("train", "val")}
        declared = declared_values(cfg.method)
        _, train = load_volumes(data, cfg, env, with_label=True, cases=cases["train"], label_values=declared)
        _, val = load_volumes(data, cfg, env, with_label=True, cases=cases["val"], label_values=declared)
        create_run_dir(out, cfg, env)
        if env.is_main:
            save_json(splits, out / "splits.json")
            if report:
                print(report, file=sys.stderr, flush=True)
        samples = SampleDataset([TrainItem(v, foreground_points(v.label)) for v in train], model.sampler())
        validation = Validation(val, cfg, env)
        model = fit(
            model, cfg, samples, out, env, name="finetune", resume=resume, groups=model.param_groups(cfg.optim),
            evaluate=validation, evaluate_every=cfg.train.val_every, best_metric="mean_dice",
        )

        metrics = None
        if env.is_main:
            best = checkpoint.load(out / "checkpoints" / "best.pt")
            metrics = validation.results.get(best["step"])
            if metrics is None:  # the best step was validated before a resume
                model.load_state_dict(best["model"])
                metrics = evaluate_volumes(model.eval().net, val, cfg, env.device)
            metrics = {**metrics, "split": "val", "step": best["step"]}
            save_json(metrics, out / "metrics.json")
            _validation_figure(out)
        distributed.barrier(env)
        return distributed.broadcast_object(metrics, env)
    finally:
        distributed.cleanup()
