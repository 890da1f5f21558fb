"""The command line's help says what the commands do (issue #17's list of unclear help texts)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = (Path(__file__).parents[1] / "README.md").read_text()


def help_text(run_cli, *command) -> str:
    code, out, err = run_cli(*command, "--help")
    assert code == 0, err
    return " ".join(out.split()).replace("- ", "-")  # unwrapped, words broken at hyphens rejoined


def test_predict_input_names_every_kind_of_input(run_cli):
    text = help_text(run_cli, "predict")
    assert "folder or glob of images" in text and "data set (dataset.json, nnU-Net folder, datalist)" in text


def test_init_names_fine_tuning_checkpoints(run_cli):
    assert "encoder.safetensors, a pre-training or fine-tuning checkpoint" in help_text(run_cli, "finetune")


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_max_steps_says_it_sets_epochs_to_zero(command, run_cli):
    assert "(sets train.max_steps=N and train.epochs=0)" in help_text(run_cli, command)


def test_synth_names_the_13_organs(run_cli):
    text = help_text(run_cli, "synth")
    assert "13 BTCV organs" in text and "9+" not in text


def test_the_quick_demo_takes_as_long_in_help_as_in_the_readme(run_cli):
    minutes = re.search(r"A ~(\d+) minute version", help_text(run_cli, "demo"))[1]
    assert f"`.venv/bin/glmae demo --out runs/quick --quick` takes about {minutes}." in " ".join(README.split())


def test_the_readme_documents_the_channel_suffix_of_mask_names():
    text = " ".join(README.split())
    assert "the channel suffix is dropped" in text and "a single file keeps its name" in text
