"""A phantom study: synthetic cases split into an unlabelled pre-training pool, labelled training
cases and held-out cases, as two datalists beside the images (the demo's and the benchmarks' data)."""

from __future__ import annotations

import json
from pathlib import Path

from glmae.synth.common import write_atomic


def _write_json(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=1).encode())


def write_study(out: Path, pool: int, train: int, test: int, shape: tuple[int, int, int], seed: int = 0,
                kind: str = "abdomen"):
    """Phantoms of `kind` in MSD layout plus two datalists beside them: `pretrain.json` (the first
    `pool` cases, images only) and `finetune.json` (the next `train` cases for training, the last
    `test` as its validation list). Returns the two datalist paths."""
    from glmae.synth import KINDS

    root = KINDS[kind](out, cases=pool + train + test, seed=seed, shape=shape)
    entries = json.loads((root / "dataset.json").read_text())
    cases = entries["training"]
    pool, train, test = cases[:pool], cases[pool : pool + train], cases[pool + train :]
    pretrain, finetune = root / "pretrain.json", root / "finetune.json"
    common = {"modality": entries["modality"], "labels": entries["labels"]}
    _write_json(pretrain, {"training": [{"image": c["image"]} for c in pool], "modality": entries["modality"]})
    _write_json(finetune, {**common, "training": train, "validation": test})
    return pretrain, finetune
