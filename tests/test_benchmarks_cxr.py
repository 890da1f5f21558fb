"""benchmarks/cxr.py on its smoke setting: four patient-wise disjoint sets, test scores of the best
and last checkpoints, paired comparisons, resumable cells."""

import csv
import json

import pytest
from benchresults import KEYS, script

from glmae.synth.cxr import FINDINGS


@pytest.fixture
def bench(monkeypatch):
    return script(monkeypatch, "cxr")


def test_cxr_smoke_setting_writes_test_results_and_paired_comparisons(tmp_path, bench):
    work, results = tmp_path / "work", tmp_path / "results"
    args = ["--setting", "smoke", "--work", str(work), "--results", str(results)]
    bench.main([*args, "--jobs", "2"])
    data = json.loads((results / "cxr_smoke.json").read_text())
    assert set(data) == KEYS["cxr"] and data["wall_minutes"] > 0
    methods = ["scratch", "mae"]  # the order of the report
    row = ["checkpoint", "fraction", "mean", "method", "mode", "seeds", "split", "std", "values"]
    assert [sorted(r) for r in data["results"] + data["results_last"]] == [row] * 4
    comparison = ["a", "b", "checkpoint", "ci95", "diff_mean", "fraction", "mode", "n_favour", "n_seeds", "values",
                  "verdict"]
    assert [sorted(c) for c in data["comparisons"] + data["comparisons_last"]] == [comparison] * 2
    assert [(r["method"], sorted(r["auc"])) for r in data["per_finding"]] == [(m, sorted(FINDINGS)) for m in methods]
    assert {(r["method"], r["fraction"], r["split"]) for r in data["results"]} == {
        ("scratch", 0.5, "test"), ("mae", 0.5, "test")}
    assert all(r["seeds"] == [0, 1] and 0 <= r["mean"] <= 1 for r in data["results"] + data["results_last"])
    (c,) = data["comparisons"]
    assert (c["a"], c["b"], c["n_seeds"], c["checkpoint"]) == ("mae", "scratch", 2, "best")
    assert c["ci95"][0] < c["diff_mean"] < c["ci95"][1]
    for key in ("command", "commit", "machine", "wall_minutes"):
        assert data[key] != ""
    md = (results / "cxr_smoke.md").read_text()
    for header in ("| method | 50% labels |", "| method | labels | ", "Machine: ",
                   "| comparison | labels | checkpoint | mean difference | 95% CI | seeds favouring | verdict |",
                   "Command: `python benchmarks/cxr.py --setting smoke "):
        assert any(line.startswith(header) for line in md.splitlines()), header
    assert "| MAE (mae2d_tiny) − scratch | 50% | best |" in md and "| MAE (mae2d_tiny) − scratch | 50% | last |" in md
    # test scored once per cell, on the test images only
    cell = bench.cell_dir(work, "mae", 0.5, 1)
    splits = json.loads((cell / "splits.json").read_text())
    scored = {c["case"] for c in json.loads((cell / "test_best.json").read_text())["per_case"]}
    assert scored == set(splits["test"]) and not set(splits["val"]) & scored
    # a second invocation trains nothing
    stamps = {p: p.stat().st_mtime_ns for p in work.glob("**/checkpoints/last.pt")}
    assert len(stamps) == 5
    bench.main(args)
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    (invocations,) = json.loads((work / "invocations.json").read_text()).values()
    data = json.loads((results / "cxr_smoke.json").read_text())
    assert len(invocations) == 2 and data["wall_minutes"] == pytest.approx(sum(i["minutes"] for i in invocations))


def test_cxr_sets_are_disjoint_and_keep_patients_whole(tmp_path, bench):
    pool, finetune = bench.write_sets(tmp_path, bench.SETTINGS["smoke"])
    rows = {"pool": list(csv.DictReader(open(pool)))}
    for row in csv.DictReader(open(finetune)):
        rows.setdefault(row["split"], []).append(row)
    assert set(rows) == {"pool", "training", "validation", "test"}
    images = [r["Image Index"] for rs in rows.values() for r in rs]
    assert len(images) == len(set(images))
    patients = {name: {r["Patient ID"] for r in rs} for name, rs in rows.items()}
    names = list(patients)
    assert all(not patients[a] & patients[b] for i, a in enumerate(names) for b in names[i + 1:])
    s = bench.SETTINGS["smoke"]
    assert len(rows["training"]) >= s.train and len(rows["validation"]) >= s.val and len(rows["test"]) >= 1
