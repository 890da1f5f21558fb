"""`glmae demo` end to end on a reduced plan (the real plans take minutes)."""

import dataclasses
import json
import math
import re

import pytest

from glmae.config import load_config
from glmae.demo import BRAIN_FULL, BRAIN_QUICK, FULL, QUICK, Plan, demo
from glmae.engine import checkpoint
from glmae.models.patches import token_grid
from glmae.synth import LABELS

SMALL = ("data.spacing=[6.0,6.0,8.0]", "data.num_workers=0", "train.log_every=1")
TINY_PLAN = Plan(
    pool=2, train=1, val=1, test=1, shape=(32, 32, 24), pretrain_steps=2, finetune_steps=2, validations=1,
    pretrain_set=(*SMALL, "method.global_size=[32,32,32]", "method.local_size=[16,16,16]", "method.n_local=2"),
    finetune_set=(*SMALL, "method.roi=[32,32,24]"),
)


def test_demo_writes_a_report_with_every_organ_both_models_and_its_figures(tmp_path):
    out = tmp_path / "demo"
    report = demo(out, plan=TINY_PLAN)
    text = report.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| organ")]
    organs = [row.split("|")[1].strip() for row in rows]
    assert organs == [*LABELS.values(), "**mean**"]
    header = next(line for line in text.splitlines() if line.startswith("| organ"))
    assert "scratch" in header and "GL-MAE" in header
    assert all(len(re.findall(r"\d\.\d{3}", row)) == 3 for row in rows)  # two Dice values and the difference
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert {"figures/dice_per_organ.png", "figures/prediction.png", "figures/pretrain_losses.png",
            "figures/reconstruction.png"} <= set(figures)
    for figure in figures:
        assert (report.parent / figure).stat().st_size > 1000, figure
    # checkpoints picked on validation, Dice reported on test cases nothing was chosen on
    splits = json.loads((out / "finetune_glmae" / "splits.json").read_text())
    assert splits["val"] and splits["test"] and not set(splits["val"]) & set(splits["test"])
    for name in ("glmae", "scratch"):
        for suffix in ("", "_last"):  # the best checkpoint on validation, and the last one
            scored = [c["case"] for c in json.loads((out / f"metrics_{name}{suffix}.json").read_text())["per_case"]]
            assert scored == splits["test"]
    last = {name: json.loads((out / f"metrics_{name}_last.json").read_text())["mean_dice"]
            for name in ("scratch", "glmae")}
    assert f"mean Dice: scratch {last['scratch']:.3f}, GL-MAE {last['glmae']:.3f}." in text
    # a second run finds every training stage done and only rewrites the report
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/checkpoints/last.pt")}
    assert len(stamps) == 3
    demo(out, plan=TINY_PLAN)
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())


def test_brain_demo_reports_dice_and_hd95_per_tumour_region(tmp_path):
    out = tmp_path / "brain"
    plan = dataclasses.replace(TINY_PLAN, kind="brain", pretrain_config="glmae_brats_tiny",
                               finetune_config="unetr_brats_tiny")
    text = demo(out, plan=plan).read_text()
    header = next(line for line in text.splitlines() if line.startswith("| region"))
    assert header == ("| region | scratch | GL-MAE | difference | HD95 scratch (mm) | HD95 GL-MAE (mm) |")
    rows = [line for line in text.splitlines() if line.startswith("| ") and line != header]
    assert [row.split("|")[1].strip() for row in rows] == ["WT", "TC", "ET", "**mean**"]
    for row in rows:  # two Dice values and their difference, then two HD95 in mm or – where undefined
        cells = [c.strip() for c in row.split("|")[2:-1]]
        assert all(re.fullmatch(r"[+-]?\d\.\d{3}", c) for c in cells[:3])
        assert all(re.fullmatch(r"\d+\.\d|–", c) for c in cells[3:])
    assert "brain MRI phantoms (FLAIR, T1, T1ce, T2)" in text and "glmae demo --out RUN --kind brain" in text
    assert (out / "figures" / "dice_per_region.png").stat().st_size > 1000
    assert (out / "figures" / "prediction.png").stat().st_size > 1000
    state = checkpoint.load(out / "finetune_glmae" / "checkpoints" / "best.pt")
    assert state["config"]["encoder"]["in_channels"] == 4
    assert state["config"]["method"]["regions"] == {"WT": [1, 2, 3], "TC": [2, 3], "ET": [3]}
    splits = json.loads((out / "finetune_glmae" / "splits.json").read_text())
    metrics = json.loads((out / "metrics_glmae.json").read_text())
    assert [c["case"] for c in metrics["per_case"]] == splits["test"] and not set(splits["val"]) & set(splits["test"])
    assert list(metrics["per_class"]) == list(metrics["per_class_hd95"]) == ["WT", "TC", "ET"]


def test_demo_refuses_an_unknown_kind(tmp_path, run_cli):
    code, _, err = run_cli("demo", "--out", tmp_path / "x", "--kind", "knee")
    assert code == 2 and "--kind: expected one of abdomen, brain, got 'knee'" in err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("plan", [QUICK, FULL, BRAIN_QUICK, BRAIN_FULL], ids=["quick", "full", "brain-quick", "brain"])
def test_demo_pretrains_at_the_fine_tuning_scale(plan):
    pre = load_config(plan.pretrain_config, plan.pretrain_set)
    tune = load_config(plan.finetune_config, plan.finetune_set)
    assert pre.data.spacing == tune.data.spacing
    assert tuple(pre.method.global_size) == tuple(tune.method.roi)  # a token covers the same anatomy
    # local views cut from a smaller part of the volume, resized to show at least 27 visible tokens
    assert pre.method.local_scale[1] < pre.method.global_scale[0]
    assert all(a <= b for a, b in zip(pre.method.local_size, pre.method.global_size))
    tokens = math.prod(token_grid(pre.method.local_size, pre.encoder.patch_size))
    assert round((1 - pre.method.mask_ratio) * tokens) >= 27
