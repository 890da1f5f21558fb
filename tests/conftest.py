"""Shared test helpers: run the CLI in-process, keep caches inside pytest's temp folders."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Preprocessed-volume cache under pytest's temp root, never in the user's home."""
    mp = pytest.MonkeyPatch()
    mp.setenv("GLMAE_CACHE_DIR", str(tmp_path_factory.mktemp("glmae_cache")))
    mp.setenv("MPLBACKEND", "Agg")
    yield
    mp.undo()


@pytest.fixture
def run_cli(capsys):
    """run_cli("info", path) -> (exit_code, stdout, stderr), as a user would see them."""
    from glmae.cli import main

    def run(*args):
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def write_nifti():
    """write_nifti(path, array, affine=identity) -> path: a NIfTI file (.nii or .nii.gz) with parents."""
    import nibabel as nib
    import numpy as np

    def write(path, array, affine=None):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        affine = np.eye(4) if affine is None else np.asarray(affine, dtype=float)
        nib.save(nib.Nifti1Image(np.asarray(array), affine), path)
        return path

    return write
