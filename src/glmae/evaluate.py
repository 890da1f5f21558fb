"""Dice of a fine-tuned model: the validation of `glmae finetune` and `glmae evaluate`.

Dice is computed per case and class on the preprocessed grid (RAS, target spacing, foreground
crop), as in the papers' validation, with background excluded. Convention for a class absent from
the ground truth: Dice 1 when the prediction has none of it either, 0 when it does (MONAI's
`DiceMetric(ignore_empty=False)`); a class predicted but absent from the ground truth is 0. Then
`per_class` is the mean over cases and `mean_dice` the mean over classes.

Metrics file (INTERFACE.md):
    {"mean_dice": 0.81, "per_class": {"spleen": 0.93, ...}, "n_cases": 6,
     "per_case": [{"case": "case_0003", "dice": {"spleen": 0.95, ...}}, ...]}
`glmae evaluate` writes it with a CSV (case, class, dice) and a per-class bar chart beside it.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from glmae.config import Config
from glmae.engine import checkpoint as ckpt
from glmae.engine.checkpoint import atomic_write
from glmae.errors import InputError
from glmae.methods.segmentation import (
    SegmentationConfig,
    class_names,
    declared_values,
    decode_logits,
    encode_target,
    infer,
)

SPLITS = ("val", "test", "all")


def dice(pred: torch.Tensor, truth: torch.Tensor) -> float:
    """2|P ∩ T| / (|P| + |T|) of two boolean masks; 1 if both are empty."""
    total = int(pred.sum()) + int(truth.sum())
    if total == 0:
        return 1.0
    return 2.0 * int((pred & truth).sum()) / total


def case_dice(pred: torch.Tensor, truth: torch.Tensor, cfg: SegmentationConfig) -> dict[str, float]:
    """Dice per class of one case; pred and truth as `decode_logits` / `encode_target` give them:
    (1, X, Y, Z) class indices or (R, X, Y, Z) region masks."""
    names = class_names(cfg)
    if cfg.regions:
        return {name: dice(p.bool(), t.bool()) for name, p, t in zip(names, pred, truth)}
    return {name: dice(pred[0] == i, truth[0] == i) for i, name in enumerate(names, 1)}


def summarise(per_case: list[tuple[str, dict[str, float]]], names: list[str]) -> dict:
    """Per-case Dice -> the metrics dict (per-class means over cases, their mean)."""
    per_class = {name: float(np.mean([d[name] for _, d in per_case])) for name in names}
    return {
        "mean_dice": float(np.mean(list(per_class.values()))),
        "per_class": per_class,
        "n_cases": len(per_case),
        "per_case": [{"case": case, "dice": d} for case, d in per_case],
    }


def evaluate_volumes(net: nn.Module, volumes: list, cfg: Config, device: torch.device) -> dict:
    """Sliding-window inference and Dice on preprocessed volumes with labels -> metrics dict."""
    from glmae.engine.trainer import amp_dtype

    dtype = amp_dtype(cfg.train.amp, device)
    per_case = []
    for volume in volumes:
        pred = decode_logits(infer(net, volume.image, cfg.method, device, dtype), cfg.method)
        truth = torch.from_numpy(encode_target(volume.label, cfg.method))
        per_case.append((volume.case_id, case_dice(pred, truth, cfg.method)))
    return summarise(per_case, class_names(cfg.method))


def save_json(data: dict, path: Path) -> None:
    text = json.dumps(data, indent=2) + "\n"
    atomic_write(Path(path), lambda f: f.write(text.encode()))


def write_metrics(metrics: dict, path: Path, title: str = "") -> None:
    """METRICS.json, METRICS.csv (case, class, dice) and METRICS.png (per-class bar chart)."""
    from glmae.figures import bar_figure

    path = Path(path)
    save_json(metrics, path)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["case", "class", "dice"])
    for row in metrics["per_case"]:
        for name, value in row["dice"].items():
            writer.writerow([row["case"], name, f"{value:.6f}"])
    atomic_write(path.with_suffix(".csv"), lambda f: f.write(buf.getvalue().encode()))
    title = f"{title}mean Dice {metrics['mean_dice']:.3f} over {metrics['n_cases']} case(s)"
    bar_figure(metrics["per_class"], path.with_suffix(".png"), title=title, ylabel="Dice")


def load_model(checkpoint: Path):
    """(config, Segmenter in eval mode) from a fine-tuning checkpoint (last.pt / best.pt)."""
    from glmae.finetune import model_from_checkpoint

    cfg, model, _ = model_from_checkpoint(ckpt.load(checkpoint), checkpoint)
    if cfg.task != "finetune":
        raise InputError(f"not a fine-tuning checkpoint (method {cfg.method.name!r})", checkpoint)
    return cfg, model.eval()


def split_cases(checkpoint: Path, dataset, split: str) -> list:
    """Labelled cases of `split`: from RUN/splits.json when the checkpoint sits in RUN/checkpoints/,
    else the data set's own validation / test lists; `all` is every labelled case."""
    if split not in SPLITS:
        raise InputError(f"--split: expected one of {', '.join(SPLITS)}, got {split!r}")
    labelled = {c.id: c for c in dataset.labelled}
    splits_path = Path(checkpoint).parent.parent / "splits.json"
    if split == "all":
        cases = list(labelled.values())
    elif Path(checkpoint).parent.name == "checkpoints" and splits_path.is_file():
        try:
            ids = json.loads(splits_path.read_text())[split]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
            raise InputError(f"malformed splits file, no {split!r} list ({type(err).__name__})", splits_path) from None
        missing = [i for i in ids if i not in labelled]
        if missing:
            raise InputError(
                f"the run's {split} cases {', '.join(missing[:3])} are not labelled cases of this data set "
                f"({splits_path})",
                dataset.root,
            )
        cases = [labelled[i] for i in ids]
    else:
        cases = [c for c in dataset.split({"val": "validation"}.get(split, split)) if c.label is not None]
    if not cases:
        raise InputError(f"no labelled cases in the {split} split", dataset.root)
    return cases


def evaluate(checkpoint: Path, data: str, out: Path, split: str = "val") -> dict:
    """`glmae evaluate`: metrics of a fine-tuned model on a split of `data`, written to `out`."""
    from glmae.data.formats import load_dataset
    from glmae.engine.distributed import DistEnv, pick_device
    from glmae.pretrain import load_volumes

    cfg, model = load_model(checkpoint)
    cases = split_cases(checkpoint, load_dataset(data), split)
    env = DistEnv(0, 1, 0, pick_device(cfg.train.device))
    _, volumes = load_volumes(data, cfg, env, with_label=True, cases=cases, label_values=declared_values(cfg.method))
    metrics = evaluate_volumes(model.net.to(env.device), volumes, cfg, env.device)
    write_metrics(metrics, out, title=f"{split}: ")
    print(f"mean Dice {metrics['mean_dice']:.4f} over {metrics['n_cases']} case(s) -> {out}")
    return metrics
