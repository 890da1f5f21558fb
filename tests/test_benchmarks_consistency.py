"""benchmarks/glmae_consistency.py: the long-run criteria on hand-made logs, and its smoke setting."""

import json
import math

import pytest
from benchresults import KEYS, script

LOG_K = math.log(512)


@pytest.fixture
def bench(monkeypatch):
    return script(monkeypatch, "glmae_consistency")


def log(entropies, losses, every=100):
    return [{"step": every * (i + 1), "teacher_entropy": e, "loss_cons": c, "time": float(i)} for i, (e, c) in
            enumerate(zip(entropies, losses))]


def test_a_run_that_keeps_teaching_meets_the_criteria(bench):
    run = bench.judge(log([0.5, 3.0, 3.5, 4.0, 3.8, 3.6, 3.9, 4.1, 3.7, 3.5], [6.0] * 8 + [4.6, 4.5]), 1000, LOG_K)
    assert run["entropy_in_band"] and run["cons_loss_below_limit"]
    assert run["entropy_after_warmup"] == [3.0, 4.1]  # step 100 is warm-up (the first 10%)
    assert run["final_cons_loss"] == pytest.approx(4.5)  # the last 5% of the steps


@pytest.mark.parametrize("entropies, losses", [
    ([0.5, 3.0, 5.7, 6.0, 6.2, 6.2, 6.2, 6.2, 6.2, 6.2], [6.2] * 10),  # uniform from step 300 on
    ([0.5, 3.0, 3.0, 0.2, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0], [4.0] * 10),  # one logged step near one-hot
    ([0.5, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0], [6.0] * 10),  # in band, but not learnt
])
def test_a_run_that_stops_teaching_fails_them(bench, entropies, losses):
    run = bench.judge(log(entropies, losses), 1000, LOG_K)
    assert not (run["entropy_in_band"] and run["cons_loss_below_limit"])


def test_smoke_setting_writes_the_curves_of_each_run(bench, tmp_path):
    work, results = tmp_path / "work", tmp_path / "results"
    bench.main(["--setting", "smoke", "--work", str(work), "--results", str(results)])
    data = json.loads((results / "glmae_consistency_smoke.json").read_text())
    assert set(data) == KEYS["glmae_consistency"] and data["wall_minutes"] > 0
    (run,) = data["runs"]
    assert run["steps"] == 4 and run["log_k"] == pytest.approx(LOG_K)
    assert [s for s, _ in run["entropy"]] == [s for s, _ in run["cons_loss"]] == [1, 2, 3, 4]
    assert [s for s, _ in run["probe_dice"]] == [2, 4]
    assert {"entropy_in_band", "cons_loss_below_limit", "final_cons_loss", "collapse_flagged"} <= set(run)
    assert 0 < run["probe_share"] < 1
    md = (results / "glmae_consistency_smoke.md").read_text()
    assert "| steps | teacher entropy after warm-up" in md and "Command: `python benchmarks/glmae_consistency.py" in md
    assert (results / "glmae_consistency_smoke.png").stat().st_size > 1000
