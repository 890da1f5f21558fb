"""`glmae evaluate` refuses, before any work, a data set its model was not made for and outputs it
could not write; each refusal is exit 2 and one line naming both sides."""

from __future__ import annotations

import json

import numpy as np
import pytest
from badinputs import LABEL, clean_dataset, edit_json, save, untrained_checkpoint


@pytest.fixture(scope="module")
def model_checkpoint(tmp_path_factory):
    return untrained_checkpoint(tmp_path_factory.mktemp("model") / "best.pt")  # CT, 0 background, 1 spleen


def evaluate(run_cli, ckpt, data, out, split="all"):
    return run_cli("evaluate", "--checkpoint", ckpt, "--data", data, "--split", split, "--out", out)


def one_error(code, err, named):
    assert code == 2 and "Traceback" not in err, err
    assert len(err.splitlines()) == 1 and err.startswith(f"glmae: error: {named}: "), err
    return err


def test_a_data_set_of_other_labels_is_refused_naming_both(model_checkpoint, tmp_path, run_cli):
    root = clean_dataset(tmp_path / "data")
    edit_json(root, lambda d: d.update(labels={"0": "background", "1": "liver", "2": "tumour"}))
    err = one_error(*evaluate(run_cli, model_checkpoint, root, tmp_path / "m.json")[::2], named=root)
    assert (f"the data set's labels (0 background, 1 liver, 2 tumour) are not the checkpoint's (0 background, "
            f"1 spleen, {model_checkpoint})") in err
    assert not (tmp_path / "m.json").exists()


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_a_ct_model_refuses_an_mri_data_set_naming_both(command, model_checkpoint, tmp_path, run_cli):
    root = clean_dataset(tmp_path / "data")
    edit_json(root, lambda d: d.update(modality={"0": "MRI"}))
    if command == "evaluate":
        code, _, err = evaluate(run_cli, model_checkpoint, root, tmp_path / "out")
    else:
        code, _, err = run_cli("predict", "--checkpoint", model_checkpoint, "--input", root, "--out", tmp_path / "out")
    err = one_error(code, err, named=root)
    assert (f"the data set's images are MRI (intensity mri) but the checkpoint {model_checkpoint} was trained on "
            "data.intensity=ct images") in err
    assert not (tmp_path / "out").exists()


def test_labels_named_otherwise_are_a_warning_and_the_checkpoints_names_are_reported(model_checkpoint, tmp_path,
                                                                                    run_cli):
    root = clean_dataset(tmp_path / "data")
    edit_json(root, lambda d: d.update(labels={"0": "background", "1": "Spleen"}))
    code, _, err = evaluate(run_cli, model_checkpoint, root, tmp_path / "m.json")
    assert code == 0 and err.splitlines() == [
        f"glmae: warning: {root}: the data set names labels otherwise than the checkpoint {model_checkpoint} "
        "(1: 'Spleen' here, 'spleen' there): the checkpoint's names are reported"], err
    assert list(json.loads((tmp_path / "m.json").read_text())["per_class"]) == ["spleen"]


def test_undeclared_label_values_are_those_the_checkpoint_lacks(model_checkpoint, tmp_path, run_cli):
    root = clean_dataset(tmp_path / "data")
    label = np.zeros((16, 16, 16), np.uint8)
    label[2:5, 2:5, 2:5] = 255  # an "ignore" value, common in exported masks
    save(root, LABEL, label)
    datalist = {"training": json.loads((root / "dataset.json").read_text())["training"]}  # declares no labels
    (root / "datalist.json").write_text(json.dumps(datalist))
    err = one_error(*evaluate(run_cli, model_checkpoint, root / "datalist.json", tmp_path / "m.json")[::2],
                    named=root / LABEL)
    assert "label values 255 not declared in the checkpoint's labels (0 background, 1 spleen)" in err
    assert not (tmp_path / "m.json").exists()


def test_a_checkpoint_outside_its_run_folder_says_splits_json_is_missing(model_checkpoint, tmp_path, run_cli,
                                                                          monkeypatch):
    root = clean_dataset(tmp_path / "data")  # no validation list of its own
    looked = f"no run's splits.json beside the checkpoint (looked for {model_checkpoint.parent.parent}/splits.json"
    err = one_error(*evaluate(run_cli, model_checkpoint, root, tmp_path / "m.json", split="val")[::2], named=root)
    assert looked in err and "pass --split all" in err
    monkeypatch.chdir(model_checkpoint.parent)  # a relative path: the folder looked in is still named in full
    err = one_error(*evaluate(run_cli, model_checkpoint.name, root, tmp_path / "m.json", split="val")[::2], named=root)
    assert looked in err


@pytest.mark.parametrize("where", ["a folder", "under a file"])
def test_an_unwritable_out_is_refused_before_any_case_is_read(where, model_checkpoint, tmp_path, run_cli,
                                                              monkeypatch):
    import glmae.engine.run

    def no_work(*args, **kwargs):
        raise AssertionError("a case was read before --out was checked")

    monkeypatch.setattr(glmae.engine.run, "load_volumes", no_work)
    root = clean_dataset(tmp_path / "data")
    (tmp_path / "metrics").mkdir()
    (tmp_path / "file").write_text("")
    out = tmp_path / "metrics" if where == "a folder" else tmp_path / "file" / "m.json"
    err = one_error(*evaluate(run_cli, model_checkpoint, root, out)[::2], named=out)
    assert ("--out: is a folder; expected a file" if where == "a folder" else f"--out: {tmp_path / 'file'} is a file, "
            "not a folder") in err


def test_evaluate_writes_hd95_and_nsd_beside_dice_at_the_given_tolerance(model_checkpoint, tmp_path, run_cli):
    root = clean_dataset(tmp_path / "data")
    code, out, err = run_cli("evaluate", "--checkpoint", model_checkpoint, "--data", root, "--split", "all",
                             "--out", tmp_path / "m.json", "--nsd-tolerance", "2.5")
    assert code == 0, err
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["nsd_tolerance_mm"] == 2.5 and "NSD (2.5 mm)" in out and "HD95" in out
    assert set(metrics["per_class_hd95"]) == set(metrics["per_class_nsd"]) == {"spleen"}
    assert all(set(row) == {"case", "dice", "hd95", "nsd"} for row in metrics["per_case"])
    header, *rows = (tmp_path / "m.csv").read_text().splitlines()
    assert header == "case,class,dice,hd95_mm,nsd" and len(rows) == metrics["n_cases"]
    assert (tmp_path / "m.png").stat().st_size > 0
    code, _, err = run_cli("evaluate", "--checkpoint", model_checkpoint, "--data", root, "--out", tmp_path / "n.json",
                           "--nsd-tolerance", "-1")
    assert code == 2 and err.startswith("glmae: error: --nsd-tolerance: expected millimetres >= 0"), err
