"""The benchmark scripts run on minimal settings and produce well-formed results."""

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


@pytest.fixture(autouse=True)
def benchmarks_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # scripts import provenance; worker processes import them by name


def load(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_label_efficiency_smoke_setting_writes_a_results_table(tmp_path):
    bench = load("label_efficiency")
    work = ["--setting", "smoke", "--work", str(tmp_path / "work"), "--results", str(tmp_path / "results")]
    bench.main([*work, "--jobs", "2"])
    data = json.loads((tmp_path / "results" / "label_efficiency_smoke.json").read_text())
    rows = data["results"]
    assert {(r["method"], r["mode"], r["fraction"]) for r in rows} == {("scratch", "e2e", 0.5), ("glmae", "e2e", 0.5)}
    for r in rows + data["results_last"]:
        assert 0.0 <= r["mean"] <= 1.0 and r["seeds"] == [0] and r["std"] == 0.0 and r["split"] == "test"
    assert data["complete"] and data["commit"] and data["wall_minutes"] > 0
    assert [(r["method"], len(r["dice"])) for r in data["per_organ"]] == [("glmae", 13), ("scratch", 13)]
    md = (tmp_path / "results" / "label_efficiency_smoke.md").read_text()
    assert "| liver |" in md  # the per-organ table
    assert "| Sup. UNETR (scratch) |" in md and "| GL-MAE |" in md and "e2e 50%" in md
    assert "| GL-MAE − Sup. UNETR (scratch) | e2e | 50% |" in md  # the paired differences
    (c,) = data["comparisons"]
    assert (c["a"], c["b"], c["fraction"], c["ci95"]) == ("glmae", "scratch", 0.5, None)  # one seed: no interval
    # scored once on the test phantoms, with checkpoints picked on the validation ones
    cell = tmp_path / "work" / "finetune" / "glmae_e2e_0.5_seed0"
    splits = json.loads((cell / "splits.json").read_text())
    scored = [c["case"] for c in json.loads((cell / "test_best.json").read_text())["per_case"]]
    assert scored == splits["test"] and not set(splits["val"]) & set(scored)
    assert (tmp_path / "results" / "label_efficiency_smoke.png").stat().st_size > 1000
    logs = {p.name for p in (tmp_path / "work" / "logs").glob("*.log")}  # each cell ran in a worker
    assert logs == {"pretrain_glmae.log", "scratch_e2e_0.5_0.log", "glmae_e2e_0.5_0.log"}
    assert "finetune step 2/2" in (tmp_path / "work" / "logs" / "glmae_e2e_0.5_0.log").read_text()
    # resumable: a second invocation finds every cell done
    stamp = (cell / "metrics.json").stat().st_mtime_ns
    bench.main(work)
    assert (cell / "metrics.json").stat().st_mtime_ns == stamp
    # a cell killed before its first checkpoint starts over
    scratch = tmp_path / "work" / "finetune" / "scratch_e2e_0.5_seed0"
    shutil.rmtree(scratch / "checkpoints")
    (scratch / "metrics.json").unlink()
    bench.main(work)
    assert (scratch / "metrics.json").exists()


def test_label_efficiency_failing_cell_cancels_the_cells_not_started(tmp_path):
    import multiprocessing
    import operator
    import os
    import time

    bench = load("label_efficiency")
    never = tmp_path / "never"
    # 2 workers + 3 calls queued to them may still start after the failure; the 10th cell never does
    cells = [(("bad",), operator.truediv, (1, 0)), *[((i,), time.sleep, (0.5,)) for i in range(8)],
             (("last",), os.mkdir, (str(never),))]
    with pytest.raises(ZeroDivisionError):
        list(bench.run_cells(cells, jobs=2, work=tmp_path))
    assert not never.exists()  # the queued cells were cancelled, not run on
    assert multiprocessing.active_children() == []


def test_label_efficiency_report_only_summarises_done_cells_without_training(tmp_path):
    bench = load("label_efficiency")
    work = tmp_path / "work"
    for method, dice in (("scratch", 0.2), ("glmae", 0.4)):
        cell = bench.cell_dir(work, method, "e2e", 0.5, 0)
        cell.mkdir(parents=True)
        for which, d in (("best", dice), ("last", dice / 2)):
            (cell / f"test_{which}.json").write_text(json.dumps({"mean_dice": d, "per_class": {"liver": d}}))
    bench.main(["--setting", "smoke", "--work", str(work), "--results", str(tmp_path / "results"), "--report-only"])
    data = json.loads((tmp_path / "results" / "label_efficiency_smoke.json").read_text())
    assert {r["method"]: r["mean"] for r in data["results"]} == {"scratch": 0.2, "glmae": 0.4}
    assert {r["method"]: r["mean"] for r in data["results_last"]} == {"scratch": 0.1, "glmae": 0.2}
    assert data["complete"] and data["cells_done"] == 2
    assert "_notes.md" not in (tmp_path / "results" / "label_efficiency_smoke.md").read_text()
    # hand-written notes beside the report survive a rerun and are linked from it
    notes = tmp_path / "results" / "label_efficiency_smoke_notes.md"
    notes.write_text("# why\n")
    bench.main(["--setting", "smoke", "--work", str(work), "--results", str(tmp_path / "results"), "--report-only"])
    assert "[label_efficiency_smoke_notes.md](label_efficiency_smoke_notes.md)" in notes.with_name(
        "label_efficiency_smoke.md").read_text()
    assert notes.read_text() == "# why\n"
    assert not (work / "pretrain").exists() and not (work / "data").exists()


def test_label_efficiency_report_only_of_an_unfinished_run_says_partial(tmp_path):
    bench = load("label_efficiency")
    cell = bench.cell_dir(tmp_path / "work", "scratch", "e2e", 0.5, 0)
    cell.mkdir(parents=True)
    for which in ("best", "last"):
        (cell / f"test_{which}.json").write_text(json.dumps({"mean_dice": 0.3, "per_class": {"liver": 0.3}}))
    results = tmp_path / "results"
    bench.main(["--setting", "smoke", "--work", str(tmp_path / "work"), "--results", str(results), "--report-only"])
    data = json.loads((results / "label_efficiency_smoke.json").read_text())
    assert not data["complete"] and (data["cells_done"], data["cells_planned"]) == (1, 2)
    assert "**PARTIAL: 1 of 2 cells done**" in (results / "label_efficiency_smoke.md").read_text()


def test_label_efficiency_comparisons_pair_cells_by_seed():
    bench = load("label_efficiency")
    cells = {("scratch", "e2e", 0.25): {0: 0.30, 1: 0.20, 2: 0.40},
             ("mae3d", "e2e", 0.25): {0: 0.31, 1: 0.22, 2: 0.35},
             ("glmae", "e2e", 0.25): {0: 0.35, 1: 0.30},  # seed 2 not done yet
             ("glmae", "linear", 1.0): {0: 0.1}}  # no scratch linear cell to pair with
    comps = bench.comparisons(cells)
    assert [(c["a"], c["b"], c["seeds"]) for c in comps] == [
        ("mae3d", "scratch", [0, 1, 2]), ("glmae", "scratch", [0, 1]), ("glmae", "mae3d", [0, 1])]
    assert comps[1]["values"] == pytest.approx([0.05, 0.10]) and comps[1]["n_favour"] == 2
    assert comps[0]["n_favour"] == 2 and comps[0]["verdict"] == "no evidence either way"
    assert bench.comparison_lines(comps)[3].startswith("| GL-MAE − Sup. UNETR (scratch) | e2e | 25% | +7.5 | [")


def test_label_efficiency_ablation_turns_consistency_off_and_keeps_the_rest():
    from glmae.config import differences, load_config, to_dict

    bench = load("label_efficiency")
    full = load_config(bench.CONFIGS["glmae"])
    ablated = load_config(bench.CONFIGS["glmae_nocons"], bench.ABLATIONS["glmae_nocons"])
    assert sorted(differences(to_dict(full), to_dict(ablated))) == ["method.cons_g2g", "method.cons_l2g"]
    assert not ablated.method.cons_g2g and not ablated.method.cons_l2g


def test_label_efficiency_pretrains_at_the_fine_tuning_scale():
    import dataclasses

    from glmae.config import load_config

    bench = load("label_efficiency")
    s = bench.SETTINGS["full"]
    tune = load_config(bench.FINETUNE, s.finetune_set)
    for method in ("mae3d", "glmae", "glmae_nocons", "gmim"):
        pre = load_config(bench.CONFIGS[method], s.pretrain_set.get(method, ()))
        assert pre.data.spacing == tune.data.spacing, method
        # one ViT for every method and for UNETR (which adds stochastic depth)
        assert dataclasses.replace(pre.encoder, drop_path=tune.encoder.drop_path) == tune.encoder, method
        views = pre.method.global_size if method.startswith("glmae") else pre.method.roi
        assert tuple(views) == tuple(tune.method.roi), method  # a token covers the same anatomy


def test_provenance_names_the_machine_and_the_command():
    import os

    import torch

    provenance = load("provenance")
    assert provenance.command("/any/where/memory.py", ["--cases", "1"]) == "python benchmarks/memory.py --cases 1"
    described = provenance.machine()
    assert f"{os.cpu_count()} cores" in described and f"torch {torch.__version__}" in described


RESULTS = BENCHMARKS / "results"


def keys(rows):
    return [sorted(r) for r in rows]


def headings(md: str) -> list[str]:
    """A report's sections and table header rows: what a rerun must write again, whatever its numbers."""
    return [line.split(" (")[0] if line.startswith("# ") else line
            for line in md.splitlines()
            if line.startswith("#") or (line.startswith("| ") and not any(c.isdigit() for c in line))]


def test_glmae_cost_minimal_run_writes_what_the_committed_results_hold(tmp_path):
    load("glmae_cost").main(["--batch", "1", "--steps", "1", "--out", str(tmp_path / "glmae_cost.json")])
    ours, committed = (json.loads((d / "glmae_cost.json").read_text()) for d in (tmp_path, RESULTS))
    assert sorted(ours) == sorted(committed)
    assert [r["variant"] for r in ours["steps"]] == [r["variant"] for r in committed["steps"]]
    assert sorted(ours["parts"]) == sorted(committed["parts"])
    assert sorted(ours["loader_volumes_per_s"]) == sorted(committed["loader_volumes_per_s"])
    assert all(r["step_s"] > 0 for r in ours["steps"])
    ours_md, committed_md = ((d / "glmae_cost.md").read_text() for d in (tmp_path, RESULTS))
    assert headings(ours_md) == headings(committed_md)


def test_memory_minimal_run_writes_what_the_committed_results_hold(tmp_path):
    load("memory").main(["--cases", "1", "--sizes", "64", "--out", str(tmp_path / "memory.json")])
    ours, committed = (json.loads((d / "memory.json").read_text()) for d in (tmp_path, RESULTS))
    assert sorted(ours) == sorted(committed)
    assert keys(ours["predict"]) == keys(committed["predict"][:1])
    assert keys(ours["validation"]) == keys(committed["validation"][:1])  # the first row has no marginal cost
    assert ours["predict"][0]["cases"] == 1 and ours["predict"][0]["peak_rss_mib"] > 0
    assert ours["validation"][0]["within_bound"] in (True, False)
    ours_md, committed_md = ((d / "memory.md").read_text() for d in (tmp_path, RESULTS))
    assert headings(ours_md) == headings(committed_md)
