"""`glmae pretrain` end to end on phantoms, as a user runs it."""

import json
import math

import numpy as np
import pytest
import torch

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
    # targets that teach from the start (a uniform teacher, entropy log 512, or a one-hot one would
    # carry no signal); within a few dozen steps they turn near-uniform for a while, as measured in
    # benchmarks/glmae_consistency.py, which checks the long run
    entropies = [r["teacher_entropy"] for r in records]
    assert min(entropies[:10]) < math.log(512) - 1 and min(entropies) > 0.05, entropies


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


# --- the online probe -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    from segdata import write_msd

    return write_msd(tmp_path_factory.mktemp("probe") / "data", cases=2, validation=1, shape=(32, 32, 32))


# GL-MAE on 32³ volumes at 2 mm: 16³ global and local views, so that a step takes a blink
SMALL = ["--set", "data.spacing=[2,2,2]", "--set", "method.global_size=[16,16,16]",
         "--set", "method.local_size=[16,16,16]", "--set", "method.head_hidden=64", "--set", "method.head_out=32"]


def test_the_probe_logs_its_dice_at_each_interval_and_draws_its_curve(labelled, tmp_path, run_cli):
    run = tmp_path / "run"
    code, _, err = run_cli("pretrain", "--config", "glmae_tiny", "--data", labelled, "--out", run, "--max-steps", 4,
                           *FAST, *SMALL, "--set", "train.probe_every=2", "--set", f"train.probe_data={labelled}",
                           "--set", "train.probe_steps=5")
    assert code == 0, err
    probes = [(r["step"], r["probe_dice"]) for r in read_log(run / "log.jsonl") if "probe_dice" in r]
    assert [step for step, _ in probes] == [2, 4]
    assert all(0 <= dice <= 1 for _, dice in probes)
    assert (run / "figures" / "probe_dice.png").stat().st_size > 1000


def test_the_probe_leaves_the_training_untouched(labelled, tmp_path, run_cli):
    def train(run, *probe):
        code, _, err = run_cli("pretrain", "--config", "glmae_tiny", "--data", labelled, "--out", run,
                               "--max-steps", 4, *FAST, *SMALL, *probe)
        assert code == 0, err
        losses = [{k: v for k, v in r.items() if k != "time" and not k.startswith("probe_")}
                  for r in read_log(run / "log.jsonl")]
        return [r for r in losses if len(r) > 1], checkpoint.load(run / "checkpoints" / "last.pt")["model"]

    plain_log, plain = train(tmp_path / "plain")
    probed_log, probed = train(tmp_path / "probed", "--set", "train.probe_every=1", "--set",
                               f"train.probe_data={labelled}", "--set", "train.probe_steps=5")
    assert plain_log == probed_log
    assert plain.keys() == probed.keys()
    assert all(torch.equal(plain[k], probed[k]) for k in plain)


def test_a_probe_without_labelled_validation_cases_is_refused(phantoms, labelled, tmp_path, run_cli):
    base = ["pretrain", "--config", "mae3d_tiny", "--data", labelled, "--out", tmp_path / "r", *FAST]
    code, _, err = run_cli(*base, "--set", f"train.probe_data={tmp_path / 'nowhere'}")
    assert code == 2 and "nowhere" in err and "Traceback" not in err
    code, _, err = run_cli(*base, "--set", f"train.probe_data={phantoms}")
    assert code == 2 and "validation" in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()
