"""What the benchmark scripts write: the smoke tests check a script's output against these keys, and
the committed results in benchmarks/results/ are checked against the same keys. `script` imports a
benchmark script for its smoke test."""

import importlib
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"

# what every result file records (provenance.stamp), and the keys each script writes
PROVENANCE = {"command", "commit", "machine", "wall_minutes"}
KEYS = {
    "glmae_cost": PROVENANCE | {"config", "batch", "amp", "steps", "parts", "loader_volumes_per_s"},
    "memory": PROVENANCE | {"date", "predict", "validation"},
    "pretrain_throughput": PROVENANCE | {"batch", "rounds", "matmul_peak_gflops", "steps", "comparisons", "loader"},
    "label_efficiency": PROVENANCE | {"setting", "config", "complete", "cells_done", "cells_planned", "results",
                                      "results_last", "comparisons", "comparisons_last", "per_organ"},
    "brain": PROVENANCE | {"setting", "config", "complete", "cells_done", "cells_planned", "results", "results_last",
                           "comparisons", "comparisons_last"},
    "cxr": PROVENANCE | {"setting", "config", "stage_minutes", "results", "results_last", "comparisons",
                         "comparisons_last", "per_finding"},
    "options_cost": PROVENANCE | {"rounds", "warmup", "threads", "backend", "overrides", "results"},
    "glmae_consistency": PROVENANCE | {"setting", "config", "runs"},
    "pretraining_payoff": PROVENANCE | {"setting", "config", "complete", "cells_done", "cells_planned", "results",
                                        "results_last", "comparisons", "comparisons_last"},
}


def script(monkeypatch, name: str):
    """The benchmark script NAME, imported by name from benchmarks/ as its worker processes import
    it; MONKEYPATCH takes it out of sys.modules and sys.path again after the test."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = importlib.import_module(name)
    monkeypatch.setitem(sys.modules, name, module)  # undone: removed, so the next test imports it afresh
    return module
