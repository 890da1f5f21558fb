"""Every bad input of the corpus (tests/badinputs.py) against every command that reads data.

A refusal is exit 2 with one line naming the file and the problem, no traceback, and nothing
written anywhere in the test's folder: runs are refused before their folder is created, evaluation
before its metrics file, prediction before its first mask.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import pytest
from badinputs import (
    ACCEPTED,
    COMMANDS,
    CORPUS,
    FINETUNE,
    PRETRAIN,
    REFUSED,
    WARNED,
    clean_dataset,
    permissions_enforced,
    sets,
    untrained_checkpoint,
)


@pytest.fixture(scope="module")
def model_checkpoint(tmp_path_factory):
    return untrained_checkpoint(tmp_path_factory.mktemp("model") / "best.pt")  # outside any run folder


def command_line(command: str, root: Path, out: Path, ckpt: Path) -> list:
    return {
        "info": ["info", root],
        "pretrain": ["pretrain", "--config", "mae3d_tiny", "--data", root, "--out", out / "run", "--max-steps", 1,
                     *sets(PRETRAIN)],
        "finetune": ["finetune", "--config", "unetr_tiny", "--data", root, "--out", out / "run", "--max-steps", 1,
                     *sets(FINETUNE)],
        "evaluate": ["evaluate", "--checkpoint", ckpt, "--data", root, "--split", "all", "--out",
                     out / "metrics.json"],
        "predict": ["predict", "--checkpoint", ckpt, "--input", root, "--out", out / "masks"],
    }[command]


def tree(folder: Path) -> dict[str, tuple[int, int]]:
    """Every entry below `folder` with its size and modification time."""
    entries = {}
    for parent, dirs, files in os.walk(folder):
        for name in dirs + files:
            stat = os.lstat(os.path.join(parent, name))
            entries[os.path.relpath(os.path.join(parent, name), folder)] = (stat.st_size, stat.st_mtime_ns)
    return entries


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("bad", CORPUS, ids=[b.name for b in CORPUS])
def test_bad_input(bad, command, tmp_path, run_cli, model_checkpoint):
    root = clean_dataset(tmp_path / "data")
    bad.damage(root)
    before = tree(tmp_path)
    permissions = permissions_enforced() if bad.locked else contextlib.nullcontext(True)
    try:
        with permissions as enforced:
            if not enforced:
                pytest.skip("running as root without capget/capset: an unreadable folder cannot be simulated")
            code, out, err = run_cli(*command_line(command, root, tmp_path / "out", model_checkpoint))
    finally:
        os.chmod(root / "imagesTr", 0o755)
    expected = bad.outcome(command)
    named, message = f"{root}/{bad.where}", bad.message.replace("{root}", str(root))
    assert "Traceback" not in err

    if expected == REFUSED:
        assert code == 2, err
        errors = [line for line in err.splitlines() if line.startswith("glmae: error: ")]
        assert named in errors[0] and message in errors[0], errors[0]
        if command == "info" and len(errors) > 1:  # lists every problem, then counts them
            assert err.splitlines() == errors + [f"glmae: {len(errors)} problems found"], err
        elif command == "info":  # one problem in the cases, or a data set it cannot read at all
            assert err.splitlines() in (errors, errors + ["glmae: 1 problem found"]), err
        else:
            assert err.splitlines() == errors[:1], err
        assert tree(tmp_path) == before  # nothing written, not even a run folder or an empty mask folder
        return

    assert code == 0, err
    assert "glmae: error" not in err
    strays = [line for line in err.splitlines() if not re.match(r"glmae: |init: |(pretrain|finetune) step ", line)]
    assert strays == [], err  # no bare lines of nibabel, MONAI, Python warnings
    warnings = [line for line in err.splitlines() if line.startswith("glmae: warning: ")]
    if expected == WARNED:
        assert [line for line in warnings if named in line and message in line] == [
            line for line in err.splitlines() if message in line], err  # said once, as a warning
        assert len([line for line in warnings if named in line and message in line]) == 1, err
    else:
        assert expected == ACCEPTED and not [line for line in warnings if named in line], err
    written = {
        "pretrain": tmp_path / "out" / "run" / "encoder.safetensors",
        "finetune": tmp_path / "out" / "run" / "metrics.json",
        "evaluate": tmp_path / "out" / "metrics.json",
        "predict": tmp_path / "out" / "masks" / "case_0001.nii.gz",
    }
    if command in written:
        assert written[command].is_file()


# --- beyond the corpus ------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["pretrain", "predict"])
def test_an_unreadable_subfolder_of_an_image_folder_is_refused_not_skipped(command, tmp_path, run_cli,
                                                                             model_checkpoint):
    root = clean_dataset(tmp_path / "data")
    folder, hidden = root / "imagesTr", root / "imagesTr" / "more"
    hidden.mkdir()
    (folder / "case_0002.nii.gz").rename(hidden / "case_0002.nii.gz")
    os.chmod(hidden, 0)
    args = {"pretrain": ["pretrain", "--config", "mae3d_tiny", "--data", folder, "--out", tmp_path / "run",
                         "--max-steps", 1, *sets(PRETRAIN)],
            "predict": ["predict", "--checkpoint", model_checkpoint, "--input", folder, "--out", tmp_path / "masks"]}
    try:
        with permissions_enforced() as enforced:
            if not enforced:
                pytest.skip("running as root without capget/capset: an unreadable folder cannot be simulated")
            code, _, err = run_cli(*args[command])
    finally:
        os.chmod(hidden, 0o755)
    assert (code, err) == (2, f"glmae: error: {hidden}: cannot read: Permission denied\n")
    assert not (tmp_path / "run").exists() and not (tmp_path / "masks").exists()


def test_a_malformed_splits_file_beside_a_checkpoint_is_refused(tmp_path, run_cli, model_checkpoint):
    root = clean_dataset(tmp_path / "data")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "best.pt").write_bytes(model_checkpoint.read_bytes())
    (run / "splits.json").write_text('{"train": ["case_0000"]')
    code, _, err = run_cli("evaluate", "--checkpoint", run / "checkpoints" / "best.pt", "--data", root,
                           "--out", tmp_path / "metrics.json")
    assert (code, err) == (2, f"glmae: error: {run}/splits.json: malformed splits file, no 'val' list "
                              "(JSONDecodeError)\n")
    assert not (tmp_path / "metrics.json").exists()


def test_a_real_process_prints_only_glmae_lines(tmp_path, model_checkpoint):
    """nibabel (header fixes) and MONAI (reader registration: a missing GPU DICOM decoder) print bare
    lines through logging and warnings, which pytest would capture in-process: run the command."""
    import subprocess
    import sys

    root = clean_dataset(tmp_path / "data")
    by_name = {bad.name: bad for bad in CORPUS}
    by_name["negative pixdim"].damage(root)
    result = subprocess.run([sys.executable, "-m", "glmae", "predict", "--checkpoint", str(model_checkpoint),
                             "--input", str(root), "--out", str(tmp_path / "masks")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [f"glmae: warning: {root}/imagesTr/case_0001.nii.gz: pixdim[1,2,3] should "
                                          "be positive; setting to abs of pixdim values"]


def test_an_image_too_large_once_resampled_is_refused_before_any_case_is_read(tmp_path, run_cli, monkeypatch):
    """The corpus runs on the native grid; with a data.spacing, a voxel size off by 1000x (6 m for
    1.5 mm) would make resampling allocate gigabytes: refused from the headers. The available
    memory is set low, so that a regression costs about 0.5 GB, not the machine."""
    import numpy as np
    from badinputs import IMAGE, save

    import glmae.data.validate

    root = clean_dataset(tmp_path / "data")
    save(root, IMAGE, np.zeros((16, 16, 16), np.float32), np.diag([6000.0, 1.5, 2.0, 1.0]))
    monkeypatch.setattr(glmae.data.validate, "available_memory", lambda: 2**28)
    before = tree(tmp_path)
    code, _, err = run_cli("pretrain", "--config", "mae3d_tiny", "--data", root, "--out", tmp_path / "run",
                           "--max-steps", 1, *sets(PRETRAIN), "--set", "data.spacing=[2,2,2]")
    assert (code, err) == (2, f"glmae: error: {root / IMAGE}: resampled to data.spacing 2x2x2 mm, its voxels of "
                              "6000x1.5x2 mm become 48000x12x16 = 9,216,000 voxels, about 0.5 GiB to resample, more "
                              "than the available memory (0.2 GiB): is the header's voxel size right?\n")
    assert tree(tmp_path) == before
