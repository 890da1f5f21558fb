"""Where and how a benchmark result was made: every result file records the command, the git commit,
the machine and the wall time of the whole run (`stamp`), and its report says them (`closing_lines`).

Standard library only at import time: `memory.py` keeps its measuring parent process small.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path


def machine() -> str:
    """CPU model, cores, RAM, Python, torch and its thread count, e.g. for a report's header."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB RAM, Python {platform.python_version()}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads")


def command(script: str, argv: list[str] | None) -> str:
    """The command line that reproduces this invocation: `python benchmarks/<script> <args>`."""
    return " ".join(["python", f"benchmarks/{Path(script).name}", *(sys.argv[1:] if argv is None else argv)])


def commit() -> str:
    """The git commit of the checkout the benchmark ran from, `+dirty` when it had changes or files
    not yet committed (the result then belongs to no commit exactly); 'unknown' outside a git checkout."""
    import subprocess

    root = Path(__file__).parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def stamp(script: str, argv: list[str] | None, started: float, made_from: str, described: str | None = None) -> dict:
    """{"command", "commit", "machine", "wall_minutes"} of a run of `script` that started at `started`
    (time.time()) from the commit `made_from` (`commit()` read then); `described` the machine if a
    child process described it."""
    return {"command": command(script, argv), "commit": made_from, "machine": described or machine(),
            "wall_minutes": (time.time() - started) / 60}


def closing_lines(result: dict) -> list[str]:
    """A report's closing lines: the machine, the commit, the wall time and the command."""
    return [f"Machine: {result['machine']}. Commit: {result['commit']}. Wall time of the whole run: "
            f"{result['wall_minutes']:.1f} min.", "", f"Command: `{result['command']}`", ""]


def write(path: Path, result: dict, report: str) -> None:
    """RESULT as PATH (JSON) and the report beside it as PATH.md."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    path.with_suffix(".md").write_text(report)
    print(f"wrote {path} and {path.with_suffix('.md')}")
