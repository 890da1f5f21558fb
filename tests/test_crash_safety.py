"""Runs killed at any moment, stopped by signals, or out of disk space.

A SIGKILL can land anywhere, including inside a checkpoint write: what is left on disk must always
be a loadable checkpoint (the last completed one) or none yet, and `--resume` must reach the same
end as a run that was never interrupted. The runs are child processes of tests/crash_driver.py,
which imports glmae once and forks them all at once: some SIGKILL themselves at chosen points of a
checkpoint write, others get SIGKILL, SIGTERM or SIGINT from outside at a random moment.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import pytest
import torch
from badinputs import PRETRAIN, clean_dataset, sets, untrained_checkpoint

from glmae.engine import checkpoint
from glmae.engine.logger import read_log

STEPS = 6  # checkpoints every 2 steps: last.pt is written at steps 2, 4 and 6
# (point, n) of tests/crash_driver.py -> the step of the checkpoint left behind (None: none yet)
KILLS = {
    ("in-write", 1): None,
    ("in-write", 2): 2,
    ("before-rename", 2): 2,
    ("after-rename", 2): 4,
    ("after-step", 5): 4,
}
RANDOM_KILLS = 3
SIGNALS = ("SIGTERM", "SIGINT")
WORKERS = ["data.num_workers=2"]  # signals reach the workers too: they must not abort the run
CUT_WRITES = ("in-write-1", "in-write-2", "before-rename-2")  # leave a temporary file behind


def pretrain_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["pretrain", "--config", "mae3d_tiny", "--data", str(data), "--out", str(out), "--max-steps", str(STEPS),
            *sets(PRETRAIN + ["train.ckpt_every=2", *extra])]


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_log(run / "log.jsonl") if "loss" in r}


def tmp_files(run: Path) -> list[Path]:
    return sorted((run / "checkpoints").glob(".*.tmp"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return clean_dataset(tmp_path_factory.mktemp("crash") / "data")


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """Losses of the run never interrupted."""
    from glmae.cli import main

    run = tmp_path_factory.mktemp("reference") / "run"
    with pytest.raises(SystemExit) as done:
        main(pretrain_args(data, run))
    assert done.value.code in (0, None)
    return losses(run)


@pytest.fixture(scope="module")
def driven(data, tmp_path_factory) -> tuple[Path, dict]:
    """(folder of the runs, crash_driver results by run name) of every interrupted run."""
    root = tmp_path_factory.mktemp("driven")
    rng = random.Random(8)
    runs = [{"name": f"{point}-{n}", "point": point, "n": n, "args": pretrain_args(data, root / f"{point}-{n}")}
            for point, n in KILLS]
    runs += [{"name": f"random-{i}", "point": "slow", "n": 0, "signal": "SIGKILL", "delay": rng.uniform(0, 0.4),
              "args": pretrain_args(data, root / f"random-{i}", "train.ckpt_every=1")} for i in range(RANDOM_KILLS)]
    runs += [{"name": sig, "point": "none", "n": 0, "signal": sig, "delay": 0.0,
              "args": pretrain_args(data, root / sig, *WORKERS) + ["--max-steps", "500"]} for sig in SIGNALS]
    (root / "runs.json").write_text(json.dumps(runs))
    driver = Path(__file__).with_name("crash_driver.py")
    subprocess.run([sys.executable, str(driver), str(root / "runs.json"), str(root / "results.json")], check=True,
                   timeout=300)
    return root, json.loads((root / "results.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("scenario", [f"{p}-{n}" for p, n in KILLS] + [f"random-{i}" for i in range(RANDOM_KILLS)])
def test_a_killed_run_keeps_its_last_checkpoint_and_resumes_to_the_same_end(
    scenario, driven, reference, data, run_cli
):
    root, results = driven
    run, result = root / scenario, results[scenario]
    assert result["returncode"] == -signal.SIGKILL, result["stderr"]
    last = run / "checkpoints" / "last.pt"
    if scenario.startswith("random"):  # any moment: a loadable checkpoint, or none yet
        expected = checkpoint.load(last)["step"] if last.exists() else None
    else:
        point, n = scenario.rsplit("-", 1)
        expected = KILLS[point, int(n)]
        assert (checkpoint.load(last)["step"] if last.exists() else None) == expected
    if scenario in CUT_WRITES:
        assert tmp_files(run)  # the write cut short, never renamed into place
    extra = ["train.ckpt_every=1"] if scenario.startswith("random") else []

    code, _, err = run_cli(*pretrain_args(data, run, *extra), "--resume")
    assert code == 0, err
    if expected is None:
        assert "has no checkpoint yet (stopped before the first): starting from step 0" in err
    else:
        assert f"resumed from {last} at step {expected}" in err
    assert checkpoint.load(last)["step"] == STEPS and not tmp_files(run)
    resumed = losses(run)
    assert sorted(resumed) == list(range(1, STEPS + 1))  # records after the checkpoint were redone once
    for step in range(1, STEPS + 1):
        assert resumed[step] == pytest.approx(reference[step], abs=1e-5), step


@pytest.mark.slow
@pytest.mark.parametrize("sig", SIGNALS)
def test_sigterm_and_sigint_to_the_process_group_stop_after_a_checkpoint_and_resume(sig, driven, data, run_cli):
    root, results = driven
    run, result = root / sig, results[sig]
    last = run / "checkpoints" / "last.pt"
    step = checkpoint.load(last)["step"]
    assert result["returncode"] == 130, result["stderr"]
    assert result["stderr"].splitlines()[-1] == (
        f"glmae: stopped by signal at step {step}; resume with --resume ({last})"
    )
    assert "Traceback" not in result["stderr"] and 1 <= step < 500
    code, _, err = run_cli(*pretrain_args(data, run, *WORKERS), "--max-steps", step + 2, "--resume")
    assert code == 0, err
    assert checkpoint.load(last)["step"] == step + 2
    assert sorted(losses(run)) == list(range(1, step + 3))


def _failing_after(calls: int):
    """A torch.save that, from call number `calls` on, writes a little and fails with ENOSPC."""
    real, count = torch.save, [0]

    def save(obj, f, *args, **kwargs):
        count[0] += 1
        if count[0] < calls:
            return real(obj, f, *args, **kwargs)
        f.write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return save


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(data, tmp_path, run_cli, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setattr(torch, "save", _failing_after(2))  # the write at step 4 fails
    code, _, err = run_cli(*pretrain_args(data, run))
    last = run / "checkpoints" / "last.pt"
    assert code == 2
    assert err.splitlines()[-1] == (
        f"glmae: error: {last}: cannot write: No space left on device; its previous version is kept"
    )
    assert checkpoint.load(last)["step"] == 2 and not tmp_files(run)
    monkeypatch.undo()  # space freed: the run continues
    code, _, err = run_cli(*pretrain_args(data, run), "--resume")
    assert code == 0 and checkpoint.load(last)["step"] == STEPS, err


@pytest.fixture
def small_disk(tmp_path):
    """A mounted 8 MiB tmpfs (root only; skipped where mounting is not allowed)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root: the simulated disk-full test covers this")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_real_full_disk_fails_in_one_line_and_keeps_the_checkpoint(data, small_disk, run_cli):
    run = small_disk / "run"
    args = pretrain_args(data, run, "train.ckpt_every=1")
    assert run_cli(*args, "--max-steps", 1)[0] == 0
    last = run / "checkpoints" / "last.pt"
    size = last.stat().st_size
    free = shutil.disk_usage(small_disk).free
    (small_disk / "filler").write_bytes(b"\0" * (free - size // 2))  # room for logs, not for a checkpoint
    code, _, err = run_cli(*args, "--max-steps", 3, "--resume")
    assert code == 2 and "Traceback" not in err
    assert err.splitlines()[-1] == (
        f"glmae: error: {last}: cannot write: No space left on device; its previous version is kept"
    )
    assert checkpoint.load(last)["step"] == 1 and not tmp_files(run)


def test_predict_writes_whole_masks_or_none(data, tmp_path, run_cli, monkeypatch):
    import glmae.predict

    model = untrained_checkpoint(tmp_path / "best.pt")

    real, calls = glmae.predict.atomic_write, []

    def second_write_fails(path, write):
        calls.append(path)
        if len(calls) < 2:
            return real(path, write)

        def half(f):
            f.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        return real(path, half)

    monkeypatch.setattr(glmae.predict, "atomic_write", second_write_fails)
    code, _, err = run_cli("predict", "--checkpoint", model, "--input", data, "--out", tmp_path / "masks")
    assert code == 2
    assert err.splitlines() == [f"glmae: error: {calls[1]}: cannot write: No space left on device"]
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == [calls[0].name]  # no partial file
    assert nib.load(calls[0]).shape == (16, 16, 16)
