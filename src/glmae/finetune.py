"""`glmae finetune`: a segmentation network (UNETR, Swin-UNETR) or an image classifier with a
pretrained or random encoder, trained by the shared engine on the labelled cases, validated by
sliding-window Dice (segmentation) or by the mean AUC over findings (classification of radiographs,
`glmae.methods.classification`).

Splits (written to RUN/splits.json as {"train": [ids], "val": [ids], "test": [ids]}, read by
`glmae evaluate`): the data set's own `validation` and `test` lists when it has them; otherwise a
seeded 20% of the labelled training cases (at least 1) is held out for validation. The training
cases are one seeded permutation of the remaining ones, of which `--label-fraction F` takes the
first max(1, round(F·n)): for a given `--split-seed` the validation cases are the same for every F
and the subsets are nested (the 25% subset is a prefix of the 50% one). Where cases name their
patient (radiograph CSVs), all of this is done on patients instead of cases, so a patient's images
are on one side of every split.

`--init` loads the encoder weights of an `encoder.safetensors` (+ its `encoder.json`), of a
pretraining checkpoint (the encoder that pretraining exports, e.g. GL-MAE's teacher) or of another
fine-tuning checkpoint; its architecture (every encoder field but `drop_path`) must equal the
config's encoder, except `in_channels`: an encoder of C_in input channels initialises one of C_out
(CT -> 4-channel MRI) with its patch embedding remade by `--init-channels` (`method.init_channels`,
`glmae.models.patches.adapt_in_channels`): `average` (the default: every channel the mean of the
C_in channels' weights) or `repeat` (channel j the file's channel j mod C_in), both x C_in / C_out so
that C_out identical channels embed as the original did; a line names the tensors adapted.
Position embeddings are fixed sin-cos for the ROI's token grid (ViT) or relative
within attention windows (Swin), so nothing is interpolated; only a learned table of imported
weights (`glmae import`, `encoder.learned_pos_grid`) is resampled for another token grid.

The resolved config records the options (`method.mode`, `init`, `label_fraction`, `split_seed`),
the label names and values (`method.labels`, `method.regions`, from the data set when the config
leaves them empty; WT/TC/ET regions when the labels are BraTS sub-regions, see
`glmae.data.formats.brats_regions` and `method.brats_regions`) and the intensity mode, so
checkpoints describe themselves.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from glmae import config as cfglib
from glmae.config import Config, EncoderConfig
from glmae.engine import checkpoint, distributed
from glmae.engine.checkpoint import save_json
from glmae.engine.data import SampleDataset
from glmae.engine.run import (
    architecture_differences,
    check_run_dir,
    create_run_dir,
    load_volumes,
    read_encoder_file,
    resolve_intensity,
)
from glmae.engine.trainer import fit
from glmae.errors import InputError, warn

VAL_FRACTION = 0.2


# ----------------------------------------------------------------------------------------------
# Splits


def seeded_order(ids: list[str], seed: int) -> list[str]:
    """The ids (sorted first, so listing order does not matter) in a permutation drawn from `seed`."""
    ids = sorted(ids)
    return [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]


def make_splits(dataset, label_fraction: float, seed: int) -> dict[str, list[str]]:
    """{"train", "val", "test"} case ids of the labelled cases (see the module docstring)."""
    labelled = dataset.labelled
    groups: dict[str, list[str]] = {}  # patient (or the case itself) -> its training cases
    for c in labelled:
        if c.split == "training":
            groups.setdefault(c.patient or c.id, []).append(c.id)
    pool = seeded_order(list(groups), seed)
    val = sorted(c.id for c in labelled if c.split == "validation")
    test = sorted(c.id for c in labelled if c.split == "test")
    if not val:
        if len(pool) < 2:
            raise InputError(
                f"fine-tuning needs a `validation` list or at least 2 labelled training "
                f"{'patients' if len(groups) < sum(map(len, groups.values())) else 'cases'} (found {len(pool)})",
                dataset.root,
            )
        n_val = max(1, round(VAL_FRACTION * len(pool)))
        val, pool = sorted(i for g in pool[:n_val] for i in groups[g]), pool[n_val:]
    if not pool:
        raise InputError("no labelled training cases", dataset.root)
    n_train = min(len(pool), max(1, int(label_fraction * len(pool) + 0.5)))
    return {"train": [i for g in pool[:n_train] for i in sorted(groups[g])], "val": val, "test": test}


# ----------------------------------------------------------------------------------------------
# Encoder initialisation


def architecture_mismatch(theirs: dict, ours: EncoderConfig) -> list[str]:
    """'field file-value != config-value' for each architecture field that differs."""
    ours = cfglib.to_dict(ours)
    return [f"{k} {theirs.get(k)!r} != {ours[k]!r}" for k in architecture_differences(theirs, ours)]


def _names(keys, n: int = 3) -> str:
    keys = sorted(keys)
    return f" ({', '.join(keys[:n])}{', ...' if len(keys) > n else ''})" if keys else ""


def load_init(encoder: torch.nn.Module, init: str, cfg: Config, say: bool = True) -> str:
    """Load `--init` into `encoder`; returns the report line (loaded, missing, unexpected). A warning
    (if `say`) when the encoder learnt from images of another intensity mode than the config's."""
    weights, arch, description, intensity = read_encoder_file(init)
    c_in, c_out = arch.get("in_channels"), cfg.encoder.in_channels
    adapt = isinstance(c_in, int) and c_in != c_out
    differences = architecture_mismatch({**arch, "in_channels": c_out} if adapt else arch, cfg.encoder)
    if differences:
        raise InputError(
            f"--init: the encoder does not match the config's encoder: {'; '.join(differences)} (file != config)",
            init,
        )
    adapted = ""
    if adapt:
        weights, adapted = _adapt_channels(weights, encoder, c_in, c_out, cfg.method.init_channels, init)
    try:
        missing, unexpected = encoder.load_state_dict(weights, strict=False)
    except RuntimeError as err:  # same names, other shapes
        reason = str(err).splitlines()[-1].strip()
        raise InputError(f"--init: cannot load the encoder weights: {reason}", init) from None
    loaded = len(weights) - len(unexpected)
    if loaded == 0:
        raise InputError("--init: none of its tensors belongs to the encoder", init)
    report = adapted + (
        f"init: {init} ({description}): loaded {loaded} tensors, missing {len(missing)}{_names(missing)}, "
        f"unexpected {len(unexpected)}{_names(unexpected)}"
    )
    if say and intensity not in (None, "auto", cfg.data.intensity):
        warn(f"--init: the encoder was pre-trained on data.intensity={intensity} images, this fine-tuning uses "
             f"data.intensity={cfg.data.intensity}: pass --set data.intensity={intensity} if the images are of the "
             f"same kind", init)
    return report


def _adapt_channels(weights: dict, encoder: torch.nn.Module, c_in: int, c_out: int, how: str,
                    init: str) -> tuple[dict, str]:
    """The --init weights with the patch embedding (the tensors whose dim 1, and only it, is C_in
    in the file and C_out in the encoder) remade for C_out channels, and the line saying so."""
    from glmae.models.patches import adapt_in_channels

    ours = encoder.state_dict()

    def embeds(name: str, w: torch.Tensor) -> bool:
        theirs = ours.get(name)
        return (theirs is not None and w.ndim >= 3 and w.shape[1] == c_in and theirs.shape[1] == c_out
                and w.shape[:1] + w.shape[2:] == theirs.shape[:1] + theirs.shape[2:])

    names = sorted(k for k, w in weights.items() if embeds(k, w))
    if not names:
        raise InputError(f"--init: the encoder takes {c_in} input channel(s), the config {c_out}, and it has no "
                         "patch-embedding weight to adapt", init)
    weights = {**weights, **{k: adapt_in_channels(weights[k], c_out, how) for k in names}}
    scale = "the channels' mean" if how == "average" else f"channel j <- channel j mod {c_in}"
    return weights, (f"init: adapted {', '.join(names)} from {c_in} to {c_out} input channels "
                     f"({how}: {scale}, x {c_in}/{c_out})\n")


# ----------------------------------------------------------------------------------------------
# The run


def resolve(cfg: Config, dataset, init: str | None, mode: str | None, label_fraction: float | None,
            split_seed: int | None, say: bool = True, init_channels: str | None = None) -> Config:
    """The config with the command-line options (those given, i.e. not None: the others keep the
    config's values), label names/values (or findings) and intensity mode filled in."""
    from glmae.methods.finetuning import MODES
    from glmae.models.patches import CHANNEL_ADAPTATIONS

    given = dict(init=init, mode=mode, label_fraction=label_fraction, split_seed=split_seed,
                 init_channels=init_channels)
    method = dataclasses.replace(cfg.method, **{k: v for k, v in given.items() if v is not None})
    init = method.init
    if method.mode not in MODES:
        raise InputError(f"--mode (method.mode): expected {' or '.join(MODES)}, got {method.mode!r}")
    if method.init_channels not in CHANNEL_ADAPTATIONS:
        raise InputError(f"--init-channels (method.init_channels): expected {' or '.join(CHANNEL_ADAPTATIONS)}, "
                         f"got {method.init_channels!r}")
    # an absolute path: a run resumes whichever way the same --init file is spelled
    init = init if init == "none" else str(Path(init).resolve())
    method = dataclasses.replace(method, init=init, label_fraction=float(method.label_fraction),
                                 split_seed=int(method.split_seed))
    if method.name == "classifier":
        from glmae.methods.classification import resolve_findings

        return dataclasses.replace(cfg, method=resolve_findings(method, cfg.encoder, dataset))
    return _resolve_labels(dataclasses.replace(cfg, method=method), dataset, say)


def _resolve_labels(cfg: Config, dataset, say: bool) -> Config:
    """Segmentation: label names and values (or regions) from the data set, the network checked,
    the intensity mode resolved."""
    from glmae.data.formats import brats_regions
    from glmae.methods.segmentation import check_network

    method = cfg.method
    if dataset.dims != 3:
        raise InputError(f"{method.name} segments volumes; this data set holds 2D radiographs (fine-tune the "
                         "classifier on them)", dataset.root)
    regions = {name: list(values) for name, values in (method.regions or dataset.regions).items()}
    labels = dict(method.labels or dataset.labels)
    brats = brats_regions(labels) if not regions and method.brats_regions else None
    if brats:
        regions = brats[1]
    if not labels and not regions:
        raise InputError("the data set declares no `labels`; set them with --set method.labels=...", dataset.root)
    labels.setdefault(0, "background")
    check_network(method, cfg.encoder)
    if brats and say:
        print(f"regions: {', '.join(f'{k} {v}' for k, v in regions.items())} from the data set's {brats[0]} "
              "labels (--set method.brats_regions=false: softmax over the labels)", file=sys.stderr, flush=True)
    method = dataclasses.replace(method, labels=dict(sorted(labels.items())), regions=regions)
    return resolve_intensity(dataclasses.replace(cfg, method=method), dataset, dataset.root, say=say)


class Validation:
    """The engine's `evaluate(model, step)`: `score(net)` (Dice on the validation volumes, or AUC on
    the validation radiographs) computed by rank 0 and broadcast. Keeps each step's full metrics
    for RUN/metrics.json; logs `metric` and `prefix/<class>` for each class that has a value."""

    def __init__(self, score, metric: str, prefix: str, env):
        self.score, self.metric, self.prefix, self.env = score, metric, prefix, env
        self.results: dict[int, dict] = {}

    def __call__(self, model, step: int) -> dict:
        metrics = self.score(model.net) if self.env.is_main else None
        metrics = distributed.broadcast_object(metrics, self.env)
        self.results[step] = metrics
        per_class = {f"{self.prefix}/{k}": v for k, v in metrics["per_class"].items() if v is not None}
        return {self.metric: metrics[self.metric], **per_class}


def _check_splits(out: Path, splits: dict) -> None:
    path = out / "splits.json"
    if path.is_file() and json.loads(path.read_text()) != splits:
        raise InputError("--resume: the data set's cases changed since the run started (splits differ)", path)


def _validation_figure(out: Path, metric: str, prefix: str, name: str) -> None:
    from glmae.engine.logger import read_log
    from glmae.figures import curves_figure

    records = [r for r in read_log(out / "log.jsonl") if metric in r]
    series = {"mean": ([r["step"] for r in records], [r[metric] for r in records])}
    for key in sorted(k for k in records[-1] if k.startswith(f"{prefix}/")):
        rows = [r for r in records if key in r]
        series[key[len(prefix) + 1:]] = ([r["step"] for r in rows], [r[key] for r in rows])
    curves_figure(series, out / "figures" / f"validation_{prefix}.png", title=f"validation {name}", ylabel=name)


def finetune(
    cfg: Config,
    data: str,
    out: str | Path,
    init: str | None = None,
    mode: str | None = None,
    label_fraction: float | None = None,
    split_seed: int | None = None,
    resume: bool = False,
    init_channels: str | None = None,
) -> dict:
    """Run fine-tuning; returns the validation metrics of the best checkpoint (RUN/metrics.json).
    `init`, `mode`, `label_fraction`, `split_seed` and `init_channels` override `cfg.method`'s
    fields when given."""
    from glmae.data.formats import load_dataset
    from glmae.methods import FINETUNING

    if cfg.task != "finetune" or cfg.method.name not in FINETUNING:
        raise InputError(
            f"config: {cfg.method.name!r} is not a fine-tuning method (use one of {', '.join(FINETUNING)})"
        )
    init = cfg.method.init if init is None else init
    if init != "none" and not Path(init).is_file():
        raise InputError("--init: no such file (expected encoder.safetensors, a last.pt or 'none')", init)
    out = Path(out)
    env = distributed.init(cfg.train.device)
    try:
        dataset = load_dataset(data)
        cfg = resolve(cfg, dataset, init, mode, label_fraction, split_seed, say=env.is_main,
                      init_channels=init_channels)
        init = cfg.method.init
        splits = make_splits(dataset, cfg.method.label_fraction, cfg.method.split_seed)
        resume = check_run_dir(out, resume, cfg)
        if resume:
            _check_splits(out, splits)
        # every input is checked before the run folder is written: --init, then every case (the
        # preprocessing draws no random numbers, so the model may be built first)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        model = FINETUNING[cfg.method.name](cfg.encoder, cfg.method)
        report = load_init(model.net.encoder, init, cfg, say=env.is_main) if init != "none" and not resume else None
        by_id = {c.id: c for c in dataset.cases}
        cases = {name: [by_id[i] for i in splits[name]] for name in ("train", "val")}
        task = (_classification if cfg.method.name == "classifier" else _segmentation)(data, cfg, env, cases)
        create_run_dir(out, cfg, env)
        if env.is_main:
            save_json(splits, out / "splits.json")
            if report:
                print(report, file=sys.stderr, flush=True)
        samples = SampleDataset(task.items, model.sampler())
        validation = Validation(task.score, task.metric, task.prefix, env)
        model = fit(
            model, cfg, samples, out, env, name="finetune", resume=resume, groups=model.param_groups(cfg.optim),
            evaluate=validation, evaluate_every=cfg.train.val_every, best_metric=task.metric,
        )

        metrics = None
        if env.is_main:
            best = checkpoint.load(out / "checkpoints" / "best.pt")
            metrics = validation.results.get(best["step"])
            if metrics is None:  # the best step was validated before a resume
                model.load_state_dict(best["model"])
                metrics = task.score(model.eval().net)
            metrics = {**metrics, "split": "val", "step": best["step"]}
            save_json(metrics, out / "metrics.json")
            _validation_figure(out, task.metric, task.prefix, task.name)
        distributed.barrier(env)
        return distributed.broadcast_object(metrics, env)
    finally:
        distributed.cleanup()


class Task(NamedTuple):
    """What fine-tuning trains on and how it validates, per kind of method."""

    items: list  # training items for the method's sampler
    score: Callable  # net -> validation metrics
    metric: str  # the metric that picks best.pt
    prefix: str  # per-class log keys: prefix/<class>
    name: str


def _segmentation(data: str, cfg: Config, env, cases: dict) -> Task:
    """Label maps read with the volumes; foreground voxels listed for label-balanced crops."""
    from glmae.methods.segmentation import TrainItem, declared_values, foreground_points
    from glmae.methods.validation import evaluate_volumes

    declared = declared_values(cfg.method)
    _, train = load_volumes(data, cfg, env, with_label=True, cases=cases["train"], label_values=declared)
    _, val = load_volumes(data, cfg, env, with_label=True, cases=cases["val"], label_values=declared)
    items = [TrainItem(v, foreground_points(v.label)) for v in train]
    surface = cfg.method.validate_surface
    return Task(items, lambda net: evaluate_volumes(net, val, cfg, env.device, surface), "mean_dice", "dice", "Dice")


def _classification(data: str, cfg: Config, env, cases: dict) -> Task:
    """Radiographs with their findings' targets; the validation images must make some AUC defined."""
    from glmae.engine.precision import amp_dtype
    from glmae.methods.classification import TrainItem, case_targets, evaluate_images

    findings = cfg.method.findings
    _, train = load_volumes(data, cfg, env, with_label=False, cases=cases["train"])
    _, val = load_volumes(data, cfg, env, with_label=False, cases=cases["val"])
    truth = np.stack([case_targets(c, findings) for c in cases["val"]])
    if not any(0 < truth[:, k].sum() < len(truth) for k in range(len(findings))):
        raise InputError(f"the {len(truth)} validation images have no finding that is both present and absent "
                         "among them, so no AUC can pick a checkpoint; use more validation images", data)
    items = [TrainItem(v, case_targets(c, findings)) for v, c in zip(train, cases["train"])]
    dtype = amp_dtype(cfg.train.amp, env.device)
    return Task(items, lambda net: evaluate_images(net, val, truth, cfg.method, env.device, dtype), "mean_auc",
                "auc", "AUC")
