"""run_stage: finished stages reused only for the same inputs, interrupted ones resumed."""

import json

import numpy as np
import pytest
import segdata

from glmae.config import load_config
from glmae.engine.run import data_digest, run_stage


class Stage:
    """A stand-in training stage that records its calls and writes what a finished one leaves."""

    def __init__(self):
        self.calls = []

    def __call__(self, cfg, data, out, resume, **options):
        self.calls.append({"resume": resume, **options})
        (out / "checkpoints").mkdir(exist_ok=True)
        (out / "checkpoints" / "last.pt").write_text("x")
        (out / "metrics.json").write_text(json.dumps({"lr": cfg.optim.lr}))


@pytest.fixture
def data(tmp_path):
    return str(segdata.write_msd(tmp_path / "data", cases=2, shape=(8, 8, 8), validation=1) / "dataset.json")


def test_a_finished_stage_with_the_same_inputs_is_reused(tmp_path, data):
    stage, run, cfg = Stage(), tmp_path / "run", load_config("unetr_tiny")
    run_stage("finetune", run, stage, cfg, data, mode="e2e")
    run_stage("finetune", run, stage, cfg, data, mode="e2e")
    assert len(stage.calls) == 1
    record = json.loads((run / "stage.json").read_text())
    assert record["kind"] == "finetune" and record["seconds"] >= 0 and record["resumed"] is False


@pytest.mark.parametrize("change", ["config", "option", "init file", "image", "datalist"])
def test_a_changed_input_is_never_served_from_the_stale_folder(tmp_path, data, change):
    stage, run = Stage(), tmp_path / "run"
    init = tmp_path / "encoder.safetensors"
    init.write_bytes(b"weights")
    run_stage("finetune", run, stage, load_config("unetr_tiny"), data, init=str(init), mode="e2e")
    (run / "leftover").write_text("from the first setting")
    cfg, mode = load_config("unetr_tiny"), "e2e"
    if change == "config":
        cfg = load_config("unetr_tiny", ["optim.lr=0.5"])
    elif change == "option":
        mode = "linear"
    elif change == "init file":
        init.write_bytes(b"other weights")  # same path, other content
    elif change == "image":
        image = tmp_path / "data" / "imagesTr" / "case_001.nii.gz"
        segdata.write_case(tmp_path / "data", "case_001", np.zeros((8, 8, 8), np.int16), np.zeros((8, 8, 8), np.uint8),
                           np.eye(4))
        assert image.exists()
    else:
        listing = json.loads(open(data).read())
        listing["validation"], listing["training"] = listing["training"][:1], listing["training"][1:] + listing[
            "validation"]
        open(data, "w").write(json.dumps(listing))
    run_stage("finetune", run, stage, cfg, data, init=str(init), mode=mode)
    assert len(stage.calls) == 2 and stage.calls[1]["resume"] is False
    assert not (run / "leftover").exists()
    assert json.loads((run / "metrics.json").read_text())["lr"] == cfg.optim.lr


def test_a_folder_that_cannot_show_its_inputs_is_recomputed(tmp_path, data):
    stage, run, cfg = Stage(), tmp_path / "run", load_config("unetr_tiny")
    run_stage("finetune", run, stage, cfg, data)
    (run / "stage.json").unlink()  # e.g. a folder from before stages recorded their digest
    run_stage("finetune", run, stage, cfg, data)
    assert len(stage.calls) == 2


def test_an_interrupted_stage_with_the_same_inputs_resumes(tmp_path, data):
    stage, run, cfg = Stage(), tmp_path / "run", load_config("unetr_tiny")
    run_stage("finetune", run, stage, cfg, data)
    (run / "metrics.json").unlink()  # killed after a checkpoint, before the end
    run_stage("finetune", run, stage, cfg, data)
    assert [c["resume"] for c in stage.calls] == [False, True]
    assert json.loads((run / "stage.json").read_text())["resumed"] is True


def test_data_digest_follows_content_splits_and_declarations(tmp_path, data):
    before = data_digest(data)
    assert data_digest(data) == before
    listing = json.loads(open(data).read())
    listing["labels"]["2"] = "ball"
    open(data, "w").write(json.dumps(listing))
    assert data_digest(data) != before
