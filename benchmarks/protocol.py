"""The evidence protocol every benchmark follows.

- Four disjoint sets of cases (`glmae.synth.study.write_study`): an unlabelled pre-training pool,
  labelled training cases, validation cases and test cases. A fine-tuning picks its best checkpoint
  on validation only; `test_scores` then evaluates that checkpoint, and the last one (which involves
  no selection at all), once on the test cases.
- Each cell is a `glmae.engine.run.run_stage`, keyed by a digest of its config, data and options,
  so a changed setting is recomputed, never served from a stale folder; `finished` tells
  --report-only which cells finished with this setting's inputs.
- `paired`: seed-paired differences with a 95% t-interval; nothing is said to help unless the
  interval excludes 0.
- `run_cells`: the cells of a benchmark, run in worker processes sharing the cores; `arguments`,
  the options every such benchmark takes.
- `whole_run`: a resumable run's invocations, so its result records the wall time and the commits
  of the whole run, not of the invocation that finished it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np


def test_scores(run: Path, data: str) -> dict:
    """{"best": metrics, "last": metrics} of a finished fine-tuning RUN on the data set's `test`
    list: `checkpoints/best.pt` (picked on validation) and `checkpoints/last.pt`, each evaluated
    once and kept as RUN/test_best.json and RUN/test_last.json (a recomputed stage removes them with
    its folder)."""
    from glmae.evaluate import evaluate

    scores = {}
    for which in ("best", "last"):
        path = run / f"test_{which}.json"
        if not path.is_file():
            with contextlib.redirect_stdout(None):
                evaluate(run / "checkpoints" / f"{which}.pt", data, path, split="test")
        scores[which] = json.loads(path.read_text())
    return scores


def finished(kind: str, run: Path, cfg, data: Path, options: dict) -> bool:
    """Whether RUN holds a `run_stage` of KIND that finished with exactly these inputs (its
    stage.json holds their digest and, once finished, its time): for --report-only, which must never
    report a cell of another setting, nor one still running."""
    from glmae.engine.run import stage_digest

    record = run / "stage.json"
    if not (Path(data).is_file() and record.is_file()):
        return False
    stage = json.loads(record.read_text())
    return "seconds" in stage and stage.get("digest") == stage_digest(kind, cfg, str(data), options)


def finished_test_scores(run: Path, cfg, data: Path, options: dict) -> dict | None:
    """For --report-only: a fine-tuning cell's test scores ({"best", "last"}, as `test_scores`) if
    it `finished` with exactly these inputs and was scored, else None."""
    paths = {which: run / f"test_{which}.json" for which in ("best", "last")}
    if not (all(p.is_file() for p in paths.values()) and finished("finetune", run, cfg, data, options)):
        return None
    return {which: json.loads(p.read_text()) for which, p in paths.items()}


def spread(values: list[float]) -> dict:
    """Mean and sample standard deviation over seeds (0 for a single seed)."""
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}


def paired(a: dict, b: dict) -> dict | None:
    """a − b over the seeds both have ({seed: score}), with its 95% t-interval (None below 2 seeds)
    and how many seeds favour a. A seed fixes the labelled subset and the initialisation, so
    pairing removes what two cells of one seed share (an easy subset, a slow start). None if no seed
    is shared."""
    from scipy import stats

    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    d = np.array([a[s] - b[s] for s in seeds], dtype=float)
    n = len(d)
    ci = None
    if n > 1:
        half = float(stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / np.sqrt(n))
        ci = [float(d.mean()) - half, float(d.mean()) + half]
    return {"diff_mean": float(d.mean()), "ci95": ci, "n_seeds": n, "n_favour": int((d > 0).sum()),
            "seeds": [int(s) for s in seeds], "values": [float(v) for v in d]}


def verdict(comparison: dict) -> str:
    """'helps' / 'hurts' when the 95% interval excludes 0, else 'no evidence either way'."""
    ci = comparison["ci95"]
    if ci is None:
        return "too few seeds for an interval"
    return "helps" if ci[0] > 0 else "hurts" if ci[1] < 0 else "no evidence either way"


def comparison_cells(c: dict, digits: int = 3, scale: float = 1) -> str:
    """A comparison's closing table cells: "mean difference | 95% CI | seeds favouring | verdict |",
    the numbers times SCALE (100: Dice points) with DIGITS decimals."""
    f = lambda x: f"{scale * x:+.{digits}f}"  # noqa: E731
    ci = f"[{f(c['ci95'][0])}, {f(c['ci95'][1])}]" if c["ci95"] else "–"
    return f"{f(c['diff_mean'])} | {ci} | {c['n_favour']}/{c['n_seeds']} | {c['verdict']} |"


def arguments(doc: str, name: str, settings: dict, report_only: bool = False) -> argparse.ArgumentParser:
    """--setting (a key of `settings`, default full), --work (the run's resumable cells, default
    benchmarks/work/NAME), --results and --jobs: the options of every benchmark that follows this
    protocol; with `report_only`, --report-only too."""
    here = Path(__file__).parent
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--setting", choices=list(settings), default="full")
    p.add_argument("--work", type=Path, default=here / "work" / name)
    p.add_argument("--results", type=Path, default=here / "results")
    p.add_argument("--jobs", type=int, default=1, help="cells run concurrently (each with cores/jobs threads)")
    if report_only:
        p.add_argument("--report-only", action="store_true",
                       help="summarise the cells of this setting done so far, train nothing")
    return p


def _cell(threads: int, log: Path, fn, *args):
    """Run one cell in a worker process with its own thread budget and log file."""
    import torch

    torch.set_num_threads(threads)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        return fn(*args)


def run_cells(cells: list[tuple], jobs: int, work: Path):
    """Yield (key, result) for cells [(key, fn, args)] in order; with jobs > 1 they run concurrently
    in worker processes sharing the cores (two 1-thread cells on 2 cores do ~1.3x the work of one
    2-thread cell: the tiny networks do not keep two threads busy), logging to WORK/logs/. A failing
    cell or Ctrl-C cancels the remaining cells but the few already queued to the workers; the running
    ones finish (on Ctrl-C: checkpoint and stop) and the next invocation resumes."""
    if jobs == 1:
        for key, fn, args in cells:
            yield key, fn(*args)
        return
    threads = max(1, (os.cpu_count() or 1) // jobs)
    omp = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)  # read when a worker loads torch
    try:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {key: pool.submit(_cell, threads, work / "logs" / f"{'_'.join(map(str, key))}.log", fn, *args)
                       for key, fn, args in cells}
            try:
                for key, future in futures.items():
                    yield key, future.result()
            except BaseException:
                pool.shutdown(cancel_futures=True)
                raise
    finally:
        if omp is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = omp


@contextlib.contextmanager
def whole_run(work: Path, setting: dict, made_from: str, command: str, record: bool = True, every: float = 60.0):
    """Yield a list that, once the block is left (however: an interrupted invocation counts too),
    holds every invocation of this run, this one included: {"started", "minutes", "commit",
    "command"} each, kept in WORK/invocations.json under a digest of the setting, so that invocations
    of another setting in the same folder are not counted. The invocation is written when it starts
    and its minutes every EVERY seconds, so one that is killed outright (a session's end, SIGKILL)
    still counts up to its last write. `record=False` (--report-only) adds none."""
    path = work / "invocations.json"
    key = hashlib.sha256(json.dumps(setting, sort_keys=True, default=str).encode()).hexdigest()[:16]
    log = json.loads(path.read_text()) if path.is_file() else {}
    started = time.time()
    this = {"started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)), "minutes": 0.0,
            "commit": made_from, "command": command}
    runs: list[dict] = []

    def save():  # from one thread at a time: the heart is started after the first and joined before the last
        this["minutes"] = (time.time() - started) / 60
        work.mkdir(parents=True, exist_ok=True)
        part = path.with_suffix(".part")
        part.write_text(json.dumps(log, indent=2) + "\n")
        part.replace(path)  # never a half-written file, whenever the process dies

    def beat():
        while not stop.wait(every):
            save()

    stop = threading.Event()
    heart = threading.Thread(target=beat, daemon=True)
    if record:
        log.setdefault(key, []).append(this)
        save()
        heart.start()
    try:
        yield runs
    finally:
        stop.set()
        if record:
            heart.join()
            save()
        runs.extend(log.get(key, []))


def run_stamp(runs: list[dict], made_from: str) -> dict:
    """{"commit", "wall_minutes"} of a whole run from its invocations (`whole_run`): the commits it
    ran from, in order (one unless it was resumed from another), and the sum of their wall times."""
    commits = list(dict.fromkeys(r["commit"] for r in runs)) or [made_from]
    return {"commit": ", ".join(commits), "wall_minutes": sum(r["minutes"] for r in runs)}
