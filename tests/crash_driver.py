"""Run glmae command lines in child processes and kill or signal them (for test_crash_safety).

    python crash_driver.py RUNS.json RESULTS.json

RUNS.json lists {"name", "args" (glmae arguments), "point", "n", "signal", "delay"}. This process
imports glmae once, then forks one child per run (all at once), which applies its `point`:

    in-write       the child SIGKILLs itself when half of the n-th write of checkpoints/last.pt is
                   on disk, under its temporary name
    before-rename  ... when the n-th temporary file is complete and fsync'ed, not yet renamed
    after-rename   ... when the n-th file is renamed into place, its folder not yet fsync'ed
    after-step     ... when step n is done, before its logs and checkpoint
    slow           every step sleeps 50 ms (so that a signal from outside lands mid-run)

A run with a `signal` (SIGKILL, SIGTERM, SIGINT) gets it from this process `delay` seconds after its
first line in log.jsonl, sent to its whole process group (DataLoader workers included) as Ctrl-C
and job schedulers do. RESULTS.json maps each name to the child's exit code (-9: killed) and its
stderr (also in `<name>.stderr` beside RESULTS.json).
"""

import io
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import matplotlib.pyplot  # noqa: F401  (imported once here rather than in every child)
import torch
import torch._dynamo  # noqa: F401  (the fused AdamW imports it)
import torch.utils.tensorboard  # noqa: F401

import glmae.pretrain  # noqa: F401
from glmae.cli import main
from glmae.engine import checkpoint
from glmae.methods.mae3d import MAE3D


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def apply(point: str, n: int) -> None:
    """Patch this (child) process to die at `point`."""
    write_last, replace, fsync_dir = checkpoint.atomic_write, os.replace, checkpoint._fsync_dir
    writes = 0

    def atomic_write(path, write):
        nonlocal writes
        if path.name != "last.pt":
            return write_last(path, write)
        writes += 1
        if point != "in-write" or writes != n:
            return write_last(path, write)

        def half_then_die(f):
            buf = io.BytesIO()
            write(buf)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            os.fsync(f.fileno())
            die()

        return write_last(path, half_then_die)

    def os_replace(src, dst):
        if point == "before-rename" and writes == n and os.path.basename(dst) == "last.pt":
            die()
        return replace(src, dst)

    def fsync_folder(folder):
        if point == "after-rename" and writes == n and (folder / "last.pt").exists():
            die()
        return fsync_dir(folder)

    def after_step(self, step, total, applied):
        if point == "after-step" and step == n:
            die()
        if point == "slow":
            time.sleep(0.05)
        return {}

    checkpoint.atomic_write, os.replace, checkpoint._fsync_dir = atomic_write, os_replace, fsync_folder
    MAE3D.after_step = after_step


def child(run: dict, stderr: Path) -> None:
    """Run the command line in a forked child; never returns."""
    code = 1
    try:
        fd = os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 2)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        os.setpgid(0, 0)  # a process group of its own, shared with its DataLoader workers
        torch.set_num_threads(1)  # the children share the cores: spinning thread pools would stall them
        apply(run["point"], run["n"])
        main(run["args"])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stderr.flush()
        os._exit(code)


def log_started(run: dict) -> bool:
    log = Path(run["args"][run["args"].index("--out") + 1]) / "log.jsonl"
    return log.exists() and log.stat().st_size > 0


def drive(runs: list[dict], results_path: Path) -> None:
    pids = {}
    for run in runs:
        pid = os.fork()
        if pid == 0:
            child(run, results_path.with_name(f"{run['name']}.stderr"))
        pids[run["name"]] = pid
    codes, signal_at = {}, {}
    deadline = time.monotonic() + 180
    while len(codes) < len(runs) and time.monotonic() < deadline:
        for run in runs:
            name, pid = run["name"], pids[run["name"]]
            if name in codes:
                continue
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                codes[name] = os.waitstatus_to_exitcode(status)
            elif run.get("signal") and name not in signal_at and log_started(run):
                signal_at[name] = time.monotonic() + run.get("delay", 0.0)
            elif name in signal_at and time.monotonic() >= signal_at[name]:
                os.killpg(pid, getattr(signal, run["signal"]))
                signal_at[name] = float("inf")
        time.sleep(0.005)
    for run in runs:  # past the deadline: stop what still runs
        if run["name"] not in codes:
            os.kill(pids[run["name"]], signal.SIGKILL)
            codes[run["name"]] = os.waitstatus_to_exitcode(os.waitpid(pids[run["name"]], 0)[1])
    results = {
        name: {"returncode": code, "stderr": results_path.with_name(f"{name}.stderr").read_text()}
        for name, code in codes.items()
    }
    results_path.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    drive(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]))
