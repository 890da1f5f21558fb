"""A phantom study: synthetic cases split into four disjoint sets (an unlabelled pre-training pool,
labelled training cases, validation cases, test cases) as two datalists beside the images (the
demo's and the benchmarks' data). Checkpoints are picked on validation; test is for reporting."""

from __future__ import annotations

import json
from pathlib import Path

from glmae.synth.common import write_atomic


def _write_json(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=1).encode())


def write_study(out: Path, pool: int, train: int, val: int, test: int, shape: tuple[int, int, int], seed: int = 0,
                kind: str = "abdomen"):
    """Phantoms of `kind` in MSD layout plus two datalists beside them: `pretrain.json` (the first
    `pool` cases, images only) and `finetune.json` (the next `train` cases as `training`, `val` as
    `validation`, the last `test` as `test`). Returns the two datalist paths."""
    from glmae.synth import KINDS

    if min(train, val, test) < 1 or pool < 0:
        raise ValueError(f"a study needs at least one training, validation and test case, got {train}, {val}, {test}")
    root = KINDS[kind](out, cases=pool + train + val + test, seed=seed, shape=shape)
    entries = json.loads((root / "dataset.json").read_text())
    cases = entries["training"]
    sets = {"training": cases[pool : pool + train], "validation": cases[pool + train : pool + train + val],
            "test": cases[pool + train + val :]}
    pretrain, finetune = root / "pretrain.json", root / "finetune.json"
    common = {"modality": entries["modality"], "labels": entries["labels"]}
    _write_json(pretrain, {"training": [{"image": c["image"]} for c in cases[:pool]], "modality": entries["modality"]})
    _write_json(finetune, {**common, **sets})
    return pretrain, finetune
