"""The evidence protocol's statistics and provenance."""

import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
import protocol  # noqa: E402
import provenance  # noqa: E402


def test_paired_differences_and_their_t_interval_by_hand():
    a = {0: 0.50, 1: 0.40, 2: 0.62, 3: 0.30}
    b = {0: 0.45, 1: 0.41, 2: 0.52, 3: 0.20, 9: 0.99}  # seed 9 has no partner: left out
    c = protocol.paired(a, b)
    d = np.array([0.05, -0.01, 0.10, 0.10])
    half = stats.t.ppf(0.975, 3) * d.std(ddof=1) / 2
    assert c["seeds"] == [0, 1, 2, 3] and c["n_seeds"] == 4 and c["n_favour"] == 3
    assert c["diff_mean"] == pytest.approx(d.mean())
    assert c["ci95"] == pytest.approx([d.mean() - half, d.mean() + half])
    assert protocol.verdict(c) == "no evidence either way"  # the interval (-0.02, 0.14) holds 0


def test_verdict_needs_the_interval_to_exclude_zero():
    helps = protocol.paired({s: 0.5 + 0.01 * s for s in range(5)}, {s: 0.4 for s in range(5)})
    assert helps["ci95"][0] > 0 and protocol.verdict(helps) == "helps"
    hurts = protocol.paired({s: 0.4 for s in range(5)}, {s: 0.5 + 0.01 * s for s in range(5)})
    assert protocol.verdict(hurts) == "hurts"
    one = protocol.paired({0: 0.9}, {0: 0.1})
    assert one["ci95"] is None and protocol.verdict(one) == "too few seeds for an interval"
    assert protocol.paired({0: 0.9}, {1: 0.1}) is None


def test_spread():
    assert protocol.spread([0.2, 0.4]) == pytest.approx({"mean": 0.3, "std": np.std([0.2, 0.4], ddof=1)})
    assert protocol.spread([0.2]) == {"mean": 0.2, "std": 0.0}


def test_commit_names_this_checkout():
    commit = provenance.commit()
    assert commit == "unknown" or len(commit.split("+")[0]) == 40


def test_a_whole_run_counts_every_invocation_of_its_setting(tmp_path):
    setting, other = {"seeds": [0, 1]}, {"seeds": [0, 1, 2]}
    with pytest.raises(KeyboardInterrupt):
        with protocol.whole_run(tmp_path, setting, "abc", "python benchmarks/x.py"):
            raise KeyboardInterrupt  # an interrupted invocation's time counts too
    with protocol.whole_run(tmp_path, other, "abc", "python benchmarks/x.py --setting other"):
        pass
    with protocol.whole_run(tmp_path, setting, "def", "python benchmarks/x.py") as runs:
        assert runs == []  # filled when the block is left
    assert [r["commit"] for r in runs] == ["abc", "def"]  # the other setting's invocation is not this run's
    with protocol.whole_run(tmp_path, setting, "ghi", "report only", record=False) as read:
        pass
    assert read == runs  # --report-only adds no invocation
    stamp = protocol.run_stamp(runs, "ghi")
    assert stamp == {"commit": "abc, def", "wall_minutes": pytest.approx(sum(r["minutes"] for r in runs))}
    assert protocol.run_stamp([], "ghi") == {"commit": "ghi", "wall_minutes": 0}


def test_a_killed_invocation_still_counts_up_to_its_last_write(tmp_path):
    import json
    import subprocess

    code = ("import os, sys, time; from pathlib import Path; sys.path.insert(0, sys.argv[1]); import protocol\n"
            "with protocol.whole_run(Path(sys.argv[2]), {'seeds': [0]}, 'abc', 'python x.py', every=0.05):\n"
            "    time.sleep(1.0)\n"
            "    os._exit(9)  # no finally, no atexit: what a SIGKILL leaves\n")
    done = subprocess.run([sys.executable, "-c", code, str(Path(protocol.__file__).parent), str(tmp_path)])
    assert done.returncode == 9
    (killed,) = json.loads((tmp_path / "invocations.json").read_text()).values()
    assert len(killed) == 1 and 0.5 / 60 < killed[0]["minutes"] < 1.5 / 60
    with protocol.whole_run(tmp_path, {"seeds": [0]}, "def", "python x.py") as runs:
        pass
    assert [r["commit"] for r in runs] == ["abc", "def"]
    assert not list(tmp_path.glob("*.part"))


def test_every_result_records_and_reports_its_provenance():
    import time

    result = provenance.stamp("/x/benchmarks/memory.py", ["--cases", "1"], time.time() - 90, "abc", "a machine")
    assert result == {"command": "python benchmarks/memory.py --cases 1", "commit": "abc", "machine": "a machine",
                      "wall_minutes": pytest.approx(1.5, abs=0.01)}
    assert provenance.closing_lines(result) == [
        "Machine: a machine. Commit: abc. Wall time of the whole run: 1.5 min.", "",
        "Command: `python benchmarks/memory.py --cases 1`", ""]
