"""The benchmark scripts run on minimal settings and produce well-formed results."""

import dataclasses
import importlib.util
import json
import shutil
import sys

import pytest
from benchresults import BENCHMARKS, KEYS, PROVENANCE


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
    assert set(data) == KEYS["label_efficiency"]
    assert keys(data["results"] + data["results_last"]) == [ROW] * 4
    assert keys(data["comparisons"] + data["comparisons_last"]) == [COMPARISON] * 2
    rows = data["results"]
    assert {(r["method"], r["mode"], r["fraction"]) for r in rows} == {("scratch", "e2e", 0.5), ("glmae", "e2e", 0.5)}
    for r in rows + data["results_last"]:
        assert 0.0 <= r["mean"] <= 1.0 and r["seeds"] == [0] and r["std"] == 0.0 and r["split"] == "test"
    assert data["complete"] and data["commit"] and data["wall_minutes"] > 0
    assert [(r["method"], len(r["dice"])) for r in data["per_organ"]] == [("glmae", 13), ("scratch", 13)]
    md = (tmp_path / "results" / "label_efficiency_smoke.md").read_text()
    assert all(any(line.startswith(start) for line in md.splitlines()) for start in LABEL_EFFICIENCY_MD)
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
    # the wall time of the whole run: its three invocations
    (invocations,) = json.loads((tmp_path / "work" / "invocations.json").read_text()).values()
    data = json.loads((tmp_path / "results" / "label_efficiency_smoke.json").read_text())
    assert len(invocations) == 3 and data["wall_minutes"] == pytest.approx(sum(i["minutes"] for i in invocations))
    assert invocations[0]["minutes"] > invocations[1]["minutes"]  # the first trained every cell, the second none


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


def finished_cells(bench, work, dice: dict) -> None:
    """Cells of the smoke setting at 50% as a finished run leaves them, without training: the data
    set, stage.json with the digest of this setting's cell and its time, the test scores ({method: best Dice},
    seed 0; the last checkpoint's half of it)."""
    from glmae.engine.run import stage_digest
    from glmae.synth.study import write_study

    s = bench.SETTINGS["smoke"]
    _, data = write_study(work / "data", s.pool, s.train, s.val, s.test, s.shape)
    encoder = work / "pretrain" / "glmae" / "encoder.safetensors"
    encoder.parent.mkdir(parents=True, exist_ok=True)
    encoder.write_bytes(b"weights")
    for method, d in dice.items():
        run, cfg, options = bench.finetune_setup(method, "e2e", 0.5, 0, s, work, {"glmae": encoder})
        run.mkdir(parents=True)
        digest = stage_digest("finetune", cfg, str(data), options)
        (run / "stage.json").write_text(json.dumps({"digest": digest, "seconds": 1.0}))  # finished
        for which, value in (("best", d), ("last", d / 2)):
            (run / f"test_{which}.json").write_text(json.dumps({"mean_dice": value, "per_class": {"liver": value}}))


def test_label_efficiency_report_only_summarises_done_cells_without_training(tmp_path):
    bench = load("label_efficiency")
    work = tmp_path / "work"
    finished_cells(bench, work, {"scratch": 0.2, "glmae": 0.4})
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
    assert not list(work.glob("**/*.pt")) and not (work / "invocations.json").exists()  # nothing trained


@pytest.mark.parametrize("change", ["setting", "encoder"])
def test_label_efficiency_report_only_never_reports_a_cell_of_another_setting(tmp_path, change):
    bench = load("label_efficiency")
    work = tmp_path / "work"
    finished_cells(bench, work, {"scratch": 0.2, "glmae": 0.4})
    if change == "setting":  # e.g. the setting's steps changed since the cells were made
        stale = dataclasses.replace(bench.SETTINGS["smoke"], finetune_steps=3)
        bench.SETTINGS["smoke"] = stale
    else:  # the pre-training was redone, the fine-tuning from the old encoder was not
        (work / "pretrain" / "glmae" / "encoder.safetensors").write_bytes(b"other weights")
    bench.main(["--setting", "smoke", "--work", str(work), "--results", str(tmp_path / "results"), "--report-only"])
    data = json.loads((tmp_path / "results" / "label_efficiency_smoke.json").read_text())
    assert {r["method"] for r in data["results"]} == (set() if change == "setting" else {"scratch"})
    assert not data["complete"]


def test_label_efficiency_report_only_of_an_unfinished_run_says_partial(tmp_path):
    bench = load("label_efficiency")
    finished_cells(bench, tmp_path / "work", {"scratch": 0.3})
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
# a row of label_efficiency's `results` and a paired comparison (issue 22: in Dice fractions)
ROW = sorted(["method", "mode", "fraction", "split", "mean", "std", "seeds", "values"])
COMPARISON = sorted(["a", "b", "mode", "fraction", "diff_mean", "ci95", "n_seeds", "n_favour", "seeds", "values",
                     "verdict"])
# the report's title, table headers and closing lines (the smoke setting: one fraction, two methods)
LABEL_EFFICIENCY_MD = [
    "# Label efficiency on phantoms",
    "| method | e2e 50% |",
    "| comparison | mode | labels | mean difference (points) | 95% CI | seeds favouring | verdict |",
    "| organ | Sup. UNETR (scratch) | GL-MAE |",
    "Machine: ", "Command: `python benchmarks/label_efficiency.py --setting smoke ",
]
# Committed results older than their script's output: each fails the check below until its command
# (README, "Development") regenerates it, and must then leave this list (strict).
STALE: dict[str, str] = {}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(n in STALE, reason=STALE.get(n, ""),
                                                                         strict=True)) for n in KEYS])
def test_committed_results_hold_what_their_script_writes(name):
    committed = json.loads((RESULTS / f"{name}.json").read_text())
    assert set(committed) == KEYS[name]
    assert PROVENANCE <= set(committed) and committed["wall_minutes"] > 0
    assert "+dirty" not in committed["commit"]  # made by a committed version of the script


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
    assert set(ours) == KEYS["glmae_cost"] and ours["commit"] and ours["wall_minutes"] > 0
    assert [r["variant"] for r in ours["steps"]] == [r["variant"] for r in committed["steps"]]
    assert sorted(ours["parts"]) == sorted(committed["parts"])
    assert sorted(ours["loader_volumes_per_s"]) == sorted(committed["loader_volumes_per_s"])
    assert all(r["step_s"] > 0 for r in ours["steps"])
    ours_md, committed_md = ((d / "glmae_cost.md").read_text() for d in (tmp_path, RESULTS))
    assert headings(ours_md) == headings(committed_md)


def test_memory_minimal_run_writes_what_the_committed_results_hold(tmp_path):
    load("memory").main(["--cases", "1", "--sizes", "64", "--out", str(tmp_path / "memory.json")])
    ours, committed = (json.loads((d / "memory.json").read_text()) for d in (tmp_path, RESULTS))
    assert set(ours) == KEYS["memory"] and ours["commit"] and ours["wall_minutes"] > 0
    assert keys(ours["predict"]) == keys(committed["predict"][:1])
    assert keys(ours["validation"]) == keys(committed["validation"][:1])  # the first row has no marginal cost
    assert ours["predict"][0]["cases"] == 1 and ours["predict"][0]["peak_rss_mib"] > 0
    assert ours["validation"][0]["within_bound"] in (True, False)
    ours_md, committed_md = ((d / "memory.md").read_text() for d in (tmp_path, RESULTS))
    assert headings(ours_md) == headings(committed_md)


def test_pretrain_throughput_minimal_run_compares_at_equal_work(tmp_path):
    out = tmp_path / "pretrain_throughput.json"
    load("pretrain_throughput").main(["--sizes", "tiny", "--precisions", "fp32", "--steps", "1", "--warmup", "0",
                                      "--rounds", "1", "--threads", "1", "--peak-size", "128",
                                      "--loader-batches", "1", "--out", str(out)])
    ours = json.loads(out.read_text())
    assert set(ours) == KEYS["pretrain_throughput"] and ours["commit"] and ours["wall_minutes"] > 0
    # the same AdamW on both sides, once fused and once plain; model-only and full-step times
    assert [(r["impl"], r["adamw"]) for r in ours["steps"]] == [
        ("glmae", "fused"), ("monai", "fused"), ("glmae", "plain"), ("monai", "plain")]
    for r in ours["steps"]:
        assert r["model_s"] > 0 and r["step_s"] > 0 and r["gflop_per_step"] > 0
    glmae, monai = ours["steps"][:2]
    assert any("attention" in op for op in glmae["gflop_by_op"])  # glmae's fused attention is counted
    assert 0.9 < glmae["gflop_per_step"] / monai["gflop_per_step"] < 1.0  # less: see the report's explanation
    assert [(c["adamw"], sorted(c)) for c in ours["comparisons"]] == [
        (a, ["adamw", "flop_ratio", "model_speedup", "precision", "size", "step_speedup"]) for a in ("fused", "plain")]
    assert ours["comparisons"][0]["step_speedup"] == pytest.approx(monai["step_s"] / glmae["step_s"])
    assert [(r["size"], r["workers"]) for r in ours["loader"]] == [("tiny", 1), ("tiny", 2)]
    md = out.with_suffix(".md").read_text()
    assert headings(md) == [
        "# MAE3D pre-training throughput: glmae against MONAI's MaskedAutoEncoderViT, at equal work",
        "| size | precision | AdamW | implementation | model s | step s | samples/s | GFLOP/step | GFLOP/s "
        "| % of matmul peak | peak RSS (MB) |",
        "| size | precision | AdamW | model | step | glmae FLOPs / MONAI's |",
        "| size | loader workers | crops/s |"]
    assert "- tiny: glmae " in md and "MONAI's patch embedding" in md  # why the FLOPs differ


def test_options_cost_minimal_run_writes_what_the_committed_results_hold(tmp_path):
    out = tmp_path / "options_cost.json"
    # aot_eager: AOTAutograd's graphs without inductor's kernels, which take minutes to build on 2 cores
    load("options_cost").main(["--configs", "mae3d_tiny", "--rounds", "1", "--warmup", "1", "--backend", "aot_eager",
                               "--set", "train.batch_size=1", "--out", str(out)])
    ours, committed = (json.loads((d / "options_cost.json").read_text()) for d in (tmp_path, RESULTS))
    assert set(ours) == KEYS["options_cost"] and ours["commit"] and ours["wall_minutes"] > 0
    assert [r["variant"] for r in ours["results"]] == ["plain", "grad_checkpoint", "compile"]
    assert keys(ours["results"]) == keys(committed["results"][:3])
    plain, checkpointed, compiled = ours["results"]
    assert plain["vs_plain"] == 1 and plain["max_loss_rel_diff"] == 0 and compiled["saved_mib"] is None
    assert checkpointed["max_loss_rel_diff"] == 0  # the same losses, as tests/test_engine.py checks
    assert checkpointed["saved_mib"] < plain["saved_mib"] / 2
    assert all(r["step_s"] > 0 and r["peak_rss_mib"] > r["rss_before_mib"] > 0 for r in ours["results"])
    ours_md, committed_md = ((d / "options_cost.md").read_text() for d in (tmp_path, RESULTS))
    assert headings(ours_md) == headings(committed_md)


def readme_section(title: str) -> str:
    """The text of the README section whose title starts with TITLE, up to the next section."""
    return (BENCHMARKS.parent / "README.md").read_text().split(f"\n## {title}")[1].split("\n## ")[0]


def readme_quotes(section: str) -> list[tuple]:
    """(difference, "at N%" or "", low, high, seeds favouring, seeds) of each interval quoted in the
    README section titled SECTION, as written."""
    import re

    prose = " ".join(readme_section(section).split()).replace("−", "-")
    number = r"[+-]\d\.\d{3}"
    at = r"(?: at (\d+%)(?: labels)?)?"
    return re.findall(rf"({number}){at} \(95% CI \[({number}), ({number})\], (\d+) of (\d+) seeds\)", prose)


def interval(c: dict, fraction: str = "") -> tuple:
    return (f"{c['diff_mean']:+.3f}", fraction, *(f"{x:+.3f}" for x in c["ci95"]), str(c["n_favour"]),
            str(c["n_seeds"]))


def test_the_readme_quotes_the_committed_cxr_comparisons():
    data = json.loads((RESULTS / "cxr.json").read_text())
    known = {interval(c, f"{c['fraction']:.0%}") for c in data["comparisons"]}
    quoted = readme_quotes("2D: chest X-rays")
    assert len(quoted) == 2 and set(quoted) <= known, quoted


def test_the_readme_quotes_the_committed_brain_comparisons():
    data = json.loads((RESULTS / "brain.json").read_text())
    known = {interval(c) for c in data["comparisons"] if c["metric"] == "mean_dice" and c["checkpoint"] == "best"}
    quoted = readme_quotes("Brain tumour MRI (BraTS)")
    assert len(quoted) == 4 and set(quoted) <= known, quoted


def test_the_readme_quotes_the_committed_payoff_comparisons():
    data = json.loads((RESULTS / "pretraining_payoff.json").read_text())
    assert data["complete"]
    known = {interval(c) for c in data["comparisons"] + data["comparisons_last"]}
    quoted = readme_quotes("Why pre-training pays off or not")
    assert len(quoted) >= 4 and set(quoted) <= known, quoted


def test_the_readme_quotes_the_committed_consistency_runs():
    import re

    runs = json.loads((RESULTS / "glmae_consistency.json").read_text())["runs"]
    prose = " ".join(readme_section("Methods and configs").split())
    entropy = re.findall(r"(\d\.\d\d)–(\d\.\d\d) nats at (\d+) steps", prose)
    assert entropy == [(f"{r['entropy_after_warmup'][0]:.2f}", f"{r['entropy_after_warmup'][1]:.2f}", str(r["steps"]))
                       for r in runs]
    assert all(r["entropy_in_band"] and r["cons_loss_below_limit"] for r in runs)  # the README says it passes
    losses = " and ".join(f"{r['final_cons_loss']:.2f}" for r in runs)
    assert f"the consistency loss ends at {losses} nats" in prose
    probes = [f"{r['probe_dice'][0][1]:.3f} → {r['probe_dice'][-1][1]:.3f} at {r['steps']} steps" for r in runs]
    assert all(p in prose for p in probes), probes


def readme_results() -> list[str]:
    """The lines of README's results section ("Does pre-training help?")."""
    return readme_section("Does pre-training help?").splitlines()


def test_the_readme_results_table_is_the_committed_jsons():
    data = json.loads((RESULTS / "label_efficiency.json").read_text())
    assert data["complete"]  # the README publishes no partial run
    table = [line for line in readme_results() if line.startswith("|")]
    assert table == load("label_efficiency").table(data["results"])


def test_the_readme_quotes_paired_intervals_of_the_committed_json_and_no_std():
    import re

    protocol = load("protocol")
    data = json.loads((RESULTS / "label_efficiency.json").read_text())
    cells = {(r["method"], r["mode"], r["fraction"]): dict(zip(r["seeds"], r["values"])) for r in data["results"]}
    known = set()
    for a in cells:
        for b in cells:
            c = protocol.paired(cells[a], cells[b]) if a != b else None
            if c and c["ci95"]:
                known.add((*(f"{100 * x:+.1f}" for x in (c["diff_mean"], *c["ci95"])), c["n_favour"], c["n_seeds"]))
    prose = " ".join(line for line in readme_results() if not line.startswith("|")).replace("−", "-")
    quoted = re.findall(r"([+-]\d+\.\d) points(?: at \d+%)? \(95% CI \[([+-]\d+\.\d), ([+-]\d+\.\d)\], "
                        r"(\d+) of (\d+) seeds\)", prose)
    assert len(quoted) >= 4
    for diff, lo, hi, favour, n in quoted:
        assert (diff, lo, hi, int(favour), int(n)) in known, (diff, lo, hi)
    assert not re.search(r"±\s*\d", prose)  # spreads belong in the table; the text quotes intervals
