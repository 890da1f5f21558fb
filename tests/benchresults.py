"""What the benchmark scripts write: the smoke tests check a script's output against these keys, and
the committed results in benchmarks/results/ are checked against the same keys."""

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
