"""benchmarks/brain.py on its smoke setting: four disjoint sets of brain phantoms, the CT -> MRI
transfer arm, Dice and HD95 per BraTS region of the best and last checkpoints on test, paired
comparisons, resumable cells."""

import json

import pytest
from benchresults import KEYS, script


@pytest.fixture
def bench(monkeypatch):
    return script(monkeypatch, "brain")


def test_brain_smoke_setting_writes_dice_and_hd95_per_region_and_the_transfer_row(tmp_path, bench):
    work, results = tmp_path / "work", tmp_path / "results"
    args = ["--setting", "smoke", "--work", str(work), "--results", str(results)]
    bench.main([*args, "--jobs", "2"])
    data = json.loads((results / "brain_smoke.json").read_text())
    assert set(data) == KEYS["brain"] and data["wall_minutes"] > 0
    assert data["complete"] and [r["arm"] for r in data["results"]] == ["scratch", "glmae_ct", "scratch_swin", "gmim"]
    for row in data["results"] + data["results_last"]:
        assert row["seeds"] == [0] and row["split"] == "test"
        assert set(row["dice"]) == set(row["hd95"]) == {"WT", "TC", "ET"}
        assert all(0 <= row["dice"][r]["mean"] <= 1 for r in row["dice"])
        assert all(m is None or m["mean"] >= 0 for m in row["hd95"].values())
    assert {(c["a"], c["b"], c["metric"]) for c in data["comparisons"]} >= {
        ("glmae_ct", "scratch", "mean_dice"), ("gmim", "scratch_swin", "mean_dice")}
    for key in ("command", "commit", "machine", "wall_minutes"):
        assert data[key] != ""
    md = (results / "brain_smoke.md").read_text()
    assert "| arm | Dice WT | Dice TC | Dice ET | mean Dice | HD95 WT (mm) |" in md
    assert "| UNETR from GL-MAE on CT − UNETR, scratch | Dice, a − b | best |" in md
    assert "Command: `python benchmarks/brain.py --setting smoke " in md and "Machine: " in md
    assert (results / "brain_smoke.png").stat().st_size > 1000
    # the transfer arm: a 1-channel CT encoder initialised the 4-channel UNETR
    log = (work / "logs" / "glmae_ct_0.log").read_text()
    assert "init: adapted patch_embedding.patch_embeddings.weight from 1 to 4 input channels" in log
    ct = json.loads((work / "pretrain" / "glmae_ct" / "encoder.json").read_text())
    assert ct["encoder"]["in_channels"] == 1 and ct["intensity"] == "ct"
    # test scored once per cell, on the test phantoms only, per region
    cell = bench.cell_dir(work, "gmim", 0)
    splits = json.loads((cell / "splits.json").read_text())
    best = json.loads((cell / "test_best.json").read_text())
    assert {c["case"] for c in best["per_case"]} == set(splits["test"]) and not set(splits["val"]) & set(splits["test"])
    assert list(best["per_class"]) == ["WT", "TC", "ET"] and set(best["per_class_hd95"]) == {"WT", "TC", "ET"}
    # a second invocation trains nothing
    stamps = {p: p.stat().st_mtime_ns for p in work.glob("**/checkpoints/last.pt")}
    assert len(stamps) == 6
    bench.main(args)
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    # --report-only summarises the cells of this setting, and never a cell of another
    smoke = bench.SETTINGS["smoke"]
    assert bench.main([*args, "--report-only"])["cells_done"] == 4
    assert bench.done_scores(("scratch", 0), smoke, work) is not None
    assert bench.done_scores(("scratch", 0), bench.dataclasses.replace(smoke, finetune_steps=3), work) is None
