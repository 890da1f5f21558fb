"""benchmarks/pretraining_payoff.py on its smoke setting: random, MAE3D and GL-MAE encoders probed
frozen and fine-tuned under each recipe, scored once on the test phantoms, paired against random,
resumable cells, --report-only of this setting's cells only."""

import dataclasses
import json

import pytest
from benchresults import KEYS, script

ENCODERS, COLUMNS = ["random", "mae3d", "glmae"], ["probe", "linear", "as_is", "low_encoder_lr", "frozen_warmup"]


@pytest.fixture
def bench(monkeypatch):
    return script(monkeypatch, "pretraining_payoff")


def test_smoke_setting_probes_and_fine_tunes_every_encoder_under_every_recipe(tmp_path, bench):
    work, results = tmp_path / "work", tmp_path / "results"
    args = ["--setting", "smoke", "--work", str(work), "--results", str(results)]
    bench.main([*args, "--jobs", "2"])
    data = json.loads((results / "pretraining_payoff_smoke.json").read_text())
    assert set(data) == KEYS["pretraining_payoff"] and data["wall_minutes"] > 0 and data["complete"]
    cells = [(e, c) for c in COLUMNS for e in ENCODERS]
    assert [(r["encoder"], r["column"]) for r in data["results"]] == cells
    assert [(r["encoder"], r["column"]) for r in data["results_last"]] == cells[3:]  # the probe has no checkpoint
    for row in data["results"] + data["results_last"]:
        assert row["seeds"] == [0] and row["split"] == "test" and 0 <= row["mean"] <= 1
    assert [(c["a"], c["b"], c["column"]) for c in data["comparisons"]] == [
        (e, "random", c) for c in COLUMNS for e in ENCODERS[1:]]
    assert len(data["comparisons_last"]) == 8 and all(c["ci95"] is None for c in data["comparisons"])
    for key in ("command", "commit", "machine"):
        assert data[key] != ""
    md = (results / "pretraining_payoff_smoke.md").read_text()
    assert ("| encoder | probe (frozen ViT, linear head) | UNETR linear (frozen ViT) | e2e as is (layer decay 0.6) "
            "| e2e, layer decay 0.3 | e2e, encoder frozen 1 steps |") in md
    assert "| GL-MAE − random (scratch) | e2e, encoder frozen 1 steps |" in md
    assert "Command: `python benchmarks/pretraining_payoff.py --setting smoke " in md and "Machine: " in md
    assert (results / "pretraining_payoff_smoke.png").stat().st_size > 1000

    # each column's recipe, from the pre-trained encoder; the probe on fine-tuning's labelled subset,
    # scored on the test phantoms that fine-tuning's checkpoints are scored on
    def config(encoder, column):
        return (bench.cell_dir(work, encoder, column, 0) / "config.yaml").read_text()

    assert "mode: linear" in config("glmae", "linear") and "layer_decay: 0.6" in config("glmae", "as_is")
    assert "layer_decay: 0.3" in config("glmae", "low_encoder_lr")
    assert "freeze_encoder_steps: 1" in config("glmae", "frozen_warmup")
    assert "init: " in (work / "logs" / "mae3d_probe_0.log").read_text()
    assert "init: none" in config("random", "as_is") and str(work / "pretrain" / "glmae") in config("glmae", "as_is")
    probe = json.loads((bench.cell_dir(work, "glmae", "probe", 0) / "metrics.json").read_text())
    splits = json.loads((bench.cell_dir(work, "glmae", "as_is", 0) / "splits.json").read_text())
    tested = json.loads((bench.cell_dir(work, "glmae", "as_is", 0) / "test_best.json").read_text())
    assert probe["train"] == splits["train"] and probe["test"] == splits["test"] != splits["val"]
    assert {c["case"] for c in tested["per_case"]} == set(splits["test"])

    # a second invocation trains and probes nothing
    done = [*work.glob("cells/*/checkpoints/last.pt"), *work.glob("cells/*_probe_*/metrics.json")]
    stamps = {p: p.stat().st_mtime_ns for p in done}
    assert len(stamps) == 15
    bench.main([*args, "--jobs", "1"])
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())

    # --report-only summarises the cells of this setting, never one made with other inputs
    assert bench.main([*args, "--report-only"])["cells_done"] == 15
    smoke = bench.SETTINGS["smoke"]
    longer = dataclasses.replace(smoke, finetune_steps=3)  # the fine-tunings changed, the probes did not
    assert bench.done_scores(("mae3d", "as_is", 0), longer, work) is None
    assert bench.done_scores(("mae3d", "probe", 0), longer, work) is not None
    assert bench.done_scores(("mae3d", "probe", 0), dataclasses.replace(smoke, probe_steps=3), work) is None
