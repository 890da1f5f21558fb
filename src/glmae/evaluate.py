"""`glmae evaluate`: per-case and per-class Dice, HD95 and normalised surface Dice of a fine-tuned
model on a split of a data set, or for a classifier of radiographs the AUC per finding.

The metrics (see `glmae.methods.validation` and `glmae.metrics.surface` for the conventions: HD95 in
mm, NSD at `--nsd-tolerance` mm, default the config's `method.nsd_tolerance`, null where undefined)
go to METRICS.json:
    {"mean_dice": 0.81, "per_class": {"spleen": 0.93, ...}, "n_cases": 6,
     "mean_hd95": 3.2, "per_class_hd95": {"spleen": 2.1, ...}, "n_defined_hd95": {"spleen": 6, ...},
     "mean_nsd": 0.88, "per_class_nsd": {...}, "n_defined_nsd": {...}, "nsd_tolerance_mm": 1.0,
     "per_case": [{"case": "case_0003", "dice": {"spleen": 0.95, ...}, "hd95": {...}, "nsd": {...}}, ...]}
with a CSV (case, class, dice, hd95_mm, nsd; an undefined value empty) and a per-class bar chart
(Dice and NSD; HD95) beside it. A classifier's
(`glmae.metrics.classification`):
    {"mean_auc": 0.86, "per_class": {"Effusion": 0.91, ...}, "undefined": [], "n_cases": 40,
     "positives": {"Effusion": 8, ...},
     "per_case": [{"case": "case_0003", "probability": {"Effusion": 0.82, ...}, "truth": {...}}, ...]}
with a CSV (case, finding, probability, truth) and the AUC per finding as a bar chart.

Before any work: the output files must be writable, and a segmentation model's data set must be one
it was made for (`glmae.engine.run.check_data_fits`: the same declared label values and regions, a
modality matching the intensities it was trained on). Label files are checked against the
checkpoint's labels.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path

from glmae.engine.checkpoint import atomic_write, check_writable, save_json
from glmae.errors import InputError

SPLITS = ("val", "test", "all")


def write_metrics(metrics: dict, path: Path, title: str = "") -> None:
    """METRICS.json, METRICS.csv (case, class, dice[, hd95_mm, nsd]) and METRICS.png (per-class bar
    chart), the surface columns and panel when the metrics hold them."""
    from glmae.figures import bar_figure, surface_bar_figure

    path = Path(path)
    save_json(metrics, path)
    surface = "mean_hd95" in metrics
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["case", "class", "dice"] + (["hd95_mm", "nsd"] if surface else []))
    for row in metrics["per_case"]:
        for name, value in row["dice"].items():
            extra = [_cell(row["hd95"][name]), _cell(row["nsd"][name])] if surface else []
            writer.writerow([row["case"], name, f"{value:.6f}"] + extra)
    atomic_write(path.with_suffix(".csv"), lambda f: f.write(buf.getvalue().encode()))
    title = f"{title}mean Dice {metrics['mean_dice']:.3f} over {metrics['n_cases']} case(s)"
    if not surface:
        bar_figure(metrics["per_class"], path.with_suffix(".png"), title=title, ylabel="Dice")
        return
    nsd = {n: (v if v is not None else 0.0) for n, v in metrics["per_class_nsd"].items()}
    title += f", mean HD95 {_cell(metrics['mean_hd95'], '.2f') or 'undefined'} mm"
    surface_bar_figure({"Dice": metrics["per_class"], f"NSD ({metrics['nsd_tolerance_mm']:g} mm)": nsd},
                       metrics["per_class_hd95"], path.with_suffix(".png"), title=title)


def _cell(value: float | None, fmt: str = ".6f") -> str:
    """A score for the CSV: empty when undefined."""
    return "" if value is None else format(value, fmt)


def write_classification_metrics(metrics: dict, path: Path, title: str = "") -> None:
    """METRICS.json, METRICS.csv (case, finding, probability, truth) and METRICS.png (AUC per finding)."""
    from glmae.figures import bar_figure

    path = Path(path)
    save_json(metrics, path)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["case", "finding", "probability", "truth"])
    for row in metrics["per_case"]:
        for name, value in row["probability"].items():
            writer.writerow([row["case"], name, f"{value:.6f}", row["truth"][name]])
    atomic_write(path.with_suffix(".csv"), lambda f: f.write(buf.getvalue().encode()))
    mean = "undefined" if metrics["mean_auc"] is None else f"{metrics['mean_auc']:.3f}"
    defined = {k: v for k, v in metrics["per_class"].items() if v is not None}
    bar_figure(defined, path.with_suffix(".png"), title=f"{title}mean AUC {mean} over {metrics['n_cases']} image(s)",
               ylabel="AUC")


def split_cases(checkpoint: Path, dataset, split: str) -> list:
    """Labelled cases of `split`: from RUN/splits.json when the checkpoint sits in RUN/checkpoints/,
    else the data set's own validation / test lists; `all` is every labelled case."""
    if split not in SPLITS:
        raise InputError(f"--split: expected one of {', '.join(SPLITS)}, got {split!r}")
    labelled = {c.id: c for c in dataset.labelled}
    splits_path = Path(checkpoint).absolute().parent.parent / "splits.json"  # named in full in messages
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
        labelled_ids = {c.id for c in dataset.labelled}
        cases = [c for c in dataset.split({"val": "validation"}.get(split, split)) if c.id in labelled_ids]
        if not cases:
            raise InputError(
                f"no labelled cases in the data set's {split} list, and no run's splits.json beside the checkpoint "
                f"(looked for {splits_path}: the run's {split} cases are read from there when the checkpoint is in "
                f"RUN/checkpoints/); pass --split all to evaluate every labelled case", dataset.root)
    if not cases:
        raise InputError(f"no labelled cases in the {split} split", dataset.root)
    return cases


def evaluate(checkpoint: Path, data: str, out: Path, split: str = "val", nsd_tolerance: float | None = None) -> dict:
    """`glmae evaluate`: metrics of a fine-tuned model on a split of `data`, written to `out`;
    NSD at `nsd_tolerance` mm (None: the checkpoint config's `method.nsd_tolerance`)."""
    from glmae.data.formats import load_dataset
    from glmae.engine.distributed import DistEnv, pick_device
    from glmae.engine.run import check_data_fits, load_finetuned, load_volumes
    from glmae.methods.segmentation import declared_values
    from glmae.methods.validation import evaluate_volumes

    out = Path(out)
    for path in (out, out.with_suffix(".csv"), out.with_suffix(".png")):  # before any work, not after it
        check_writable(path, "--out")
    if out.suffix in (".csv", ".png"):
        raise InputError("--out: name the metrics file .json (the CSV and PNG are written beside it)", out)
    if nsd_tolerance is not None and not nsd_tolerance >= 0:
        raise InputError(f"--nsd-tolerance: expected millimetres >= 0, got {nsd_tolerance}")
    cfg, model = load_finetuned(checkpoint)
    if nsd_tolerance is not None and cfg.method.name != "classifier":
        cfg = dataclasses.replace(cfg, method=dataclasses.replace(cfg.method, nsd_tolerance=nsd_tolerance))
    dataset = load_dataset(data)
    if cfg.method.name != "classifier":
        check_data_fits(cfg, dataset, checkpoint)
    cases = split_cases(checkpoint, dataset, split)
    env = DistEnv(0, 1, 0, pick_device(cfg.train.device))
    if cfg.method.name == "classifier":
        return _evaluate_classifier(model, cfg, data, cases, env, out, split)
    declared = declared_values(cfg.method)
    labels = ", ".join(f"{v} {cfg.method.labels.get(v, 'background')}" for v in sorted(declared))
    _, volumes = load_volumes(data, cfg, env, with_label=True, cases=cases, label_values=declared,
                              labels_from=f"the checkpoint's labels ({labels})")
    metrics = evaluate_volumes(model.net.to(env.device), volumes, cfg, env.device, surface=True)
    write_metrics(metrics, out, title=f"{split}: ")
    hd95 = "undefined" if metrics["mean_hd95"] is None else f"{metrics['mean_hd95']:.2f} mm"
    nsd = "undefined" if metrics["mean_nsd"] is None else f"{metrics['mean_nsd']:.4f}"
    print(f"mean Dice {metrics['mean_dice']:.4f}, HD95 {hd95}, NSD ({cfg.method.nsd_tolerance:g} mm) {nsd} "
          f"over {metrics['n_cases']} case(s) -> {out}")
    return metrics


def _evaluate_classifier(model, cfg, data: str, cases: list, env, out: Path, split: str) -> dict:
    import numpy as np

    from glmae.data.formats import load_dataset
    from glmae.engine.precision import amp_dtype
    from glmae.engine.run import load_volumes
    from glmae.methods.classification import case_targets, evaluate_images

    dataset = load_dataset(data)
    missing = [f for f in cfg.method.findings if f not in dataset.findings]
    if dataset.format == "csv" and missing:
        raise InputError(f"the CSV has no column for the model's finding(s) {', '.join(missing)}", data)
    _, volumes = load_volumes(data, cfg, env, with_label=False, cases=cases)
    truth = np.stack([case_targets(c, cfg.method.findings) for c in cases])
    metrics = evaluate_images(model.net.to(env.device), volumes, truth, cfg.method, env.device,
                              amp_dtype(cfg.train.amp, env.device))
    write_classification_metrics(metrics, out, title=f"{split}: ")
    mean = "undefined" if metrics["mean_auc"] is None else f"{metrics['mean_auc']:.4f}"
    undefined = f" (no AUC for {', '.join(metrics['undefined'])}: one class only)" if metrics["undefined"] else ""
    print(f"mean AUC {mean} over {metrics['n_cases']} image(s){undefined} -> {out}")
    return metrics
