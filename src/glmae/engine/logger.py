"""What a run tells the user: RUN/log.jsonl, TensorBoard in RUN/tb/, and a progress display.

Only the main process writes. On a terminal the progress is a live bar (loss, lr, it/s, ETA);
elsewhere (CI, files) a plain line is printed at each logged step. A caller that runs several
trainings in a row (the demo) can share one display through `shared_progress()`.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from glmae.engine.checkpoint import atomic_write

_shared: Progress | None = None


def new_progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TextColumn("{task.fields[speed]}"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )


@contextlib.contextmanager
def shared_progress():
    """One live display for every training started inside the block."""
    global _shared
    if _shared is not None or not sys.stderr.isatty():
        yield _shared
        return
    _shared = new_progress()
    try:
        with _shared:
            yield _shared
    finally:
        _shared = None


def _fmt(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1e-2 or abs(value) >= 1e3 else f"{value:.4f}"


class RunLogger:
    def __init__(self, run_dir: Path, total_steps: int, start_step: int, name: str, enabled: bool = True):
        self.enabled = enabled
        self.total = total_steps
        self.name = name
        self._t0, self._s0 = time.perf_counter(), start_step
        if not enabled:
            return
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        self.jsonl_path = Path(run_dir) / "log.jsonl"
        _truncate_log(self.jsonl_path, start_step)
        self._jsonl = self.jsonl_path.open("a")
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=start_step + 1 if start_step else None)
        self._own_progress = None
        self._progress = _shared
        if self._progress is None and sys.stderr.isatty():
            self._own_progress = self._progress = new_progress()
            self._progress.start()
        self._task = None
        if self._progress is not None:
            self._task = self._progress.add_task(
                name, total=total_steps, completed=start_step, status="", speed=""
            )

    def speed(self, step: int) -> float:
        return (step - self._s0) / max(1e-9, time.perf_counter() - self._t0)

    def advance(self, step: int) -> None:
        if self.enabled and self._task is not None:
            self._progress.update(self._task, completed=step, speed=f"{self.speed(step):.2f} it/s")

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: float(v) for k, v in values.items()}, "time": time.time()}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for key, value in values.items():
            self._tb.add_scalar(key, value, step)
        status = "  ".join(f"{k} {_fmt(v)}" for k, v in values.items() if k in ("loss", "lr", "mean_dice"))
        if self._task is not None:
            self._progress.update(self._task, status=status)
        else:
            speed = self.speed(step)
            eta = (self.total - step) / speed if speed > 0 else 0.0
            print(
                f"{self.name} step {step}/{self.total}  {status}  {speed:.2f} it/s  eta {eta:.0f}s",
                file=sys.stderr,
                flush=True,
            )

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.console.print(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        self._jsonl.close()
        self._tb.close()
        if self._task is not None and self._own_progress is None:
            self._progress.remove_task(self._task)
        if self._own_progress is not None:
            self._own_progress.stop()


def _truncate_log(path: Path, last_step: int) -> None:
    """Drop records after `last_step` (written before a crash, to be redone on resume)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line).get("step", 0) <= last_step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line torn by a crash
    if len(kept) != len(lines):
        text = "".join(line + "\n" for line in kept).encode()
        atomic_write(path, lambda f: f.write(text))


def read_log(path: Path) -> list[dict]:
    """The records of a log.jsonl file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
