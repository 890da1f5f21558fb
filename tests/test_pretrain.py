"""`glmae pretrain` end to end on phantoms, as a user runs it."""

import json
import math

import numpy as np
import pytest

from glmae.engine import checkpoint
from glmae.engine.logger import read_log


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    from glmae.synth import write_dataset

    # the synth field of view is a 192 mm cube: 64 x 64 x 48 voxels are the tiny configs' 3 x 3 x 4 mm
    return write_dataset(tmp_path_factory.mktemp("ph") / "data", cases=3, seed=1, shape=(64, 64, 48))


def first_last(records, key, n=5):
    values = [r[key] for r in records if key in r]
    return np.mean(values[:n]), np.mean(values[-n:])


FAST = ["--set", "data.num_workers=0", "--set", "train.log_every=1", "--set", "optim.warmup_steps=5"]


def test_mae3d_tiny_lowers_the_loss_and_writes_the_run_folder(phantoms, tmp_path, run_cli):
    run = tmp_path / "run"
    code, _, err = run_cli("pretrain", "--config", "mae3d_tiny", "--data", phantoms, "--out", run, "--max-steps", 30,
                           *FAST, "--set", "train.fig_every=15")
    assert code == 0, err
    records = read_log(run / "log.jsonl")
    first, last = first_last(records, "loss")
    assert last < 0.9 * first, (first, last)
    assert (run / "config.yaml").exists() and list((run / "tb").iterdir())
    assert sorted(p.name for p in (run / "figures").iterdir()) == ["recon_000015.png", "recon_000030.png"]
    assert checkpoint.load(run / "checkpoints" / "last.pt")["step"] == 30
    weights, meta = checkpoint.load_encoder(run / "encoder.safetensors")
    assert meta["encoder"]["patch_size"] == 8 and meta["method"] == "mae3d" and meta["steps"] == 30
    assert "blocks.0.attn.qkv.weight" in weights and not any(k.startswith("decoder") for k in weights)
    assert json.loads((run / "encoder.json").read_text())["format"] == "glmae-encoder/1"


def test_glmae_tiny_lowers_reconstruction_with_every_term_finite(phantoms, tmp_path, run_cli):
    run = tmp_path / "run"
    code, _, err = run_cli("pretrain", "--config", "glmae_tiny", "--data", phantoms, "--out", run, "--max-steps", 30,
                           *FAST)
    assert code == 0, err
    records = read_log(run / "log.jsonl")
    terms = ["loss", "loss_rec_global", "loss_rec_local", "loss_cons_g2g", "loss_cons_l2g", "teacher_entropy",
             "momentum", "lr"]
    assert all(np.isfinite(r[k]) for r in records for k in terms)
    for key in ("loss_rec_global", "loss_rec_local"):
        first, last = first_last(records, key)
        assert last < 0.9 * first, (key, first, last)
    assert 0.996 <= records[0]["momentum"] < records[-1]["momentum"] <= 1.0
    # no collapse: a uniform teacher (entropy log 512) or a one-hot one (0) would carry no signal
    assert 0.05 < records[-1]["teacher_entropy"] < math.log(512) - 1


def test_an_existing_run_is_not_overwritten_and_resumes(phantoms, tmp_path, run_cli):
    run = tmp_path / "run"
    args = ["pretrain", "--config", "mae3d_tiny", "--data", phantoms, "--out", run, *FAST]
    assert run_cli(*args, "--max-steps", 3)[0] == 0
    before = (run / "log.jsonl").read_text()
    code, _, err = run_cli(*args, "--max-steps", 3)
    assert code == 2 and "already holds a run" in err and "Traceback" not in err
    assert (run / "log.jsonl").read_text() == before
    code, _, err = run_cli(*args, "--max-steps", 5, "--resume")
    assert code == 0, err
    assert [r["step"] for r in read_log(run / "log.jsonl")] == [1, 2, 3, 4, 5]


def test_resume_without_a_run_is_refused(phantoms, tmp_path, run_cli):
    code, _, err = run_cli("pretrain", "--config", "mae3d_tiny", "--data", phantoms, "--out", tmp_path / "new",
                           "--resume")
    assert code == 2 and "no checkpoint" in err


def test_a_fine_tuning_config_is_refused_by_pretrain(phantoms, tmp_path, run_cli):
    code, _, err = run_cli("pretrain", "--config", "unetr_tiny", "--data", phantoms, "--out", tmp_path / "r")
    assert code == 2 and "not a pre-training method" in err
