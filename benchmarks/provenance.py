"""Where and how a benchmark result was made: every script records both beside its figures.

Standard library only at import time: `memory.py` keeps its measuring parent process small.
"""

from __future__ import annotations

import os
import platform
import sys
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
