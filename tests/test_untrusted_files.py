"""Checkpoints from strangers: nothing in glmae unpickles more than tensors and plain values, and a
crafted pickle is refused by every command that reads a checkpoint, without running its code."""

from __future__ import annotations

import ast
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from badinputs import FINETUNE, PRETRAIN, clean_dataset, save, sets, untrained_checkpoint

import glmae

SOURCES = sorted(Path(glmae.__file__).parent.rglob("*.py"))


def _calls(tree: ast.AST, module: str, name: str) -> list[ast.Call]:
    """Calls written `module.name(...)`."""
    return [
        node for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == name
        and isinstance(node.func.value, ast.Name) and node.func.value.id == module
    ]


def _keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def test_no_loader_in_the_package_unpickles_arbitrary_objects():
    torch_loads, problems = 0, []
    for path in SOURCES:
        tree = ast.parse(path.read_text(), filename=str(path))
        for call in _calls(tree, "torch", "load"):
            torch_loads += 1
            flag = _keyword(call, "weights_only")
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                problems.append(f"{path}:{call.lineno}: torch.load without weights_only=True")
        for name in ("load", "loads", "Unpickler"):
            problems += [f"{path}:{c.lineno}: pickle.{name}" for c in _calls(tree, "pickle", name)]
        for call in _calls(tree, "np", "load"):
            flag = _keyword(call, "allow_pickle")
            if flag is not None and not (isinstance(flag, ast.Constant) and flag.value is False):
                problems.append(f"{path}:{call.lineno}: np.load with allow_pickle")
        for call in _calls(tree, "yaml", "load"):
            loader = _keyword(call, "Loader")
            if not (isinstance(loader, ast.Name) and loader.id == "_Loader"):  # config._Loader: a SafeLoader
                problems.append(f"{path}:{call.lineno}: yaml.load with an unsafe loader")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in ("torch", "pickle", "numpy"):
                problems += [f"{path}:{node.lineno}: from {node.module} import {a.name}" for a in node.names
                             if a.name in ("load", "loads", "Unpickler")]
    assert torch_loads >= 1  # the scan sees glmae.engine.checkpoint.load
    assert problems == []


def test_the_yaml_loader_is_safe(tmp_path):
    import yaml

    from glmae.config import _Loader, _yaml_load

    assert issubclass(_Loader, yaml.SafeLoader)
    with pytest.raises(yaml.constructor.ConstructorError, match="could not determine a constructor"):
        _yaml_load(f"!!python/object/apply:builtins.open ['{tmp_path / 'pwned'}', 'w']")
    assert not (tmp_path / "pwned").exists()


class _Payload:
    """Unpickling it creates the file `target`: the side effect a malicious checkpoint would have."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def _write_evil(path: Path, kind: str, marker: Path) -> Path:
    state = {"format": "glmae-checkpoint/1", "kind": "finetune", "step": 1, "model": _Payload(str(marker))}
    if kind == "torch zip":
        torch.save(state, path)
    elif kind == "torch legacy":
        torch.save(state, path, _use_new_zipfile_serialization=False)
    else:  # a bare pickle named like a checkpoint
        path.write_bytes(pickle.dumps(state))
    return path


COMMANDS = {
    "finetune --init": lambda ckpt, data, out: ["finetune", "--config", "unetr_tiny", "--data", data, "--out",
                                                out / "run", "--init", ckpt, "--max-steps", 1, *sets(FINETUNE)],
    "evaluate": lambda ckpt, data, out: ["evaluate", "--checkpoint", ckpt, "--data", data, "--split", "all",
                                         "--out", out / "metrics.json"],
    "predict": lambda ckpt, data, out: ["predict", "--checkpoint", ckpt, "--input", data, "--out", out / "masks"],
    "export": lambda ckpt, data, out: ["export", "--checkpoint", ckpt, "--format", "safetensors", "--out",
                                       out / "encoder.safetensors"],
    "import": lambda ckpt, data, out: ["import", "--format", "glmae-paper", "--checkpoint", ckpt, "--out",
                                       out / "encoder.safetensors"],
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return clean_dataset(tmp_path_factory.mktemp("untrusted") / "data")


@pytest.mark.parametrize("kind", ["torch zip", "torch legacy", "bare pickle"])
@pytest.mark.parametrize("command", COMMANDS)
def test_a_crafted_pickle_is_refused_and_not_executed(command, kind, data, tmp_path, run_cli):
    marker = tmp_path / "pwned"
    evil = _write_evil(tmp_path / "best.pt", kind, marker)
    control = _write_evil(tmp_path / "control.pt", kind, tmp_path / "control")
    if kind == "bare pickle":  # the payload works where code may run
        pickle.loads(control.read_bytes())
    else:
        torch.load(control, weights_only=False)
    assert (tmp_path / "control").exists()

    with warnings.catch_warnings(record=True) as caught:  # a warning would be more lines on stderr
        warnings.simplefilter("always")
        code, _, err = run_cli(*COMMANDS[command](evil, data, tmp_path / "out"))
    assert code == 2 and "Traceback" not in err
    assert len(err.splitlines()) == 1 and not caught
    assert err.startswith(f"glmae: error: {evil}: refusing to load: the file holds Python objects beyond tensors "
                          "and plain values (possibly malicious; not executed)"), err
    assert not marker.exists()
    assert not (tmp_path / "out").exists()  # no run folder, metrics, masks or export


def test_a_pickle_named_safetensors_is_refused(data, tmp_path, run_cli):
    marker = tmp_path / "pwned"
    evil = _write_evil(tmp_path / "encoder.safetensors", "torch zip", marker)
    (tmp_path / "encoder.json").write_text('{"encoder": {"arch": "vit"}}')
    code, _, err = run_cli(*COMMANDS["finetune --init"](evil, data, tmp_path / "out"))
    assert code == 2 and err.startswith(f"glmae: error: {evil}: not a readable safetensors file")
    assert not marker.exists() and not (tmp_path / "out").exists()


# --- checkpoints that are broken, mislabelled or of the wrong kind ------------------------------


def _state(good: Path) -> dict:
    return torch.load(good, weights_only=True)


def _edited(change):
    """A copy of the corpus's fine-tuning checkpoint with `change(state)` applied."""
    def make(path: Path, good: Path) -> Path:
        state = _state(good)
        change(state)
        torch.save(state, path)
        return path
    return make


def _other_width(state):
    state["config"]["encoder"]["width"] = 64  # the weights are of width 48


def _pretraining(path: Path, good: Path) -> Path:
    from glmae import config as cfglib
    from glmae.config import load_config
    from glmae.engine import checkpoint
    from glmae.methods import PRETRAINING

    cfg = load_config("mae3d_tiny", PRETRAIN)
    model = PRETRAINING[cfg.method.name](cfg.encoder, cfg.method)
    checkpoint.save({"kind": "pretrain", "config": cfglib.to_dict(cfg), "step": 1, "model": model.state_dict()}, path)
    return path


def _exported(path: Path, good: Path) -> Path:
    """`glmae export --format safetensors` of the good checkpoint to `path` (+ its .json)."""
    from glmae.export import export

    export(good, "safetensors", path)
    return path


ALL = ("finetune --init", "evaluate", "predict", "export")  # the commands that read glmae's checkpoints
BAD_CHECKPOINTS = [  # (name, file name, make(path, good checkpoint), message, commands refusing it)
    ("empty file", "best.pt", lambda p, g: p.write_bytes(b"") or p, "empty file (0 bytes), not a checkpoint", ALL),
    ("a text file", "best.pt", lambda p, g: p.write_bytes(b"epoch 300, dice 0.81\n") and p,
     "not a PyTorch checkpoint: neither a zip archive nor a pickle", ALL),
    ("an image given as the checkpoint", "scan.nii.gz", lambda p, g: save(p.parent, p.name, np.zeros((4, 4, 4))),
     "not a PyTorch checkpoint: neither a zip archive nor a pickle (gzip-compressed: an image?)", ALL),
    ("no config", "best.pt", _edited(lambda s: s.pop("config")),
     "the checkpoint has no `config`: not written by glmae pretrain or finetune", ALL),
    ("invalid config", "best.pt", _edited(lambda s: s["config"]["encoder"].update(colour="blue")),
     "the checkpoint's config is invalid: config: unknown key encoder.colour", ALL),
    ("config not matching the weights", "best.pt", _edited(_other_width),
     "the checkpoint's weights do not match its config (", ALL),
    ("a pre-training checkpoint", "last.pt", _pretraining,
     "is a pretrain checkpoint (mae3d): evaluate and predict need a fine-tuning checkpoint", ("evaluate", "predict")),
    ("encoder weights", "encoder.safetensors", _exported,
     "holds encoder weights alone (safetensors), not a whole model: evaluate and predict need a fine-tuning "
     "checkpoint", ("evaluate", "predict")),
    ("encoder weights named .pt", "encoder.pt", _exported,
     "holds encoder weights alone (safetensors), not a whole model", ("evaluate", "predict")),
]


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    return untrained_checkpoint(tmp_path_factory.mktemp("good") / "best.pt")


@pytest.mark.parametrize("command", ALL)
@pytest.mark.parametrize("name, filename, make, message, refusing", BAD_CHECKPOINTS,
                         ids=[b[0] for b in BAD_CHECKPOINTS])
def test_a_bad_checkpoint_is_one_line_naming_it(name, filename, make, message, refusing, command, data,
                                                 good_checkpoint, tmp_path, run_cli):
    (tmp_path / "given").mkdir()
    bad = make(tmp_path / "given" / filename, good_checkpoint)
    code, _, err = run_cli(*COMMANDS[command](bad, data, tmp_path / "out"))
    assert "Traceback" not in err
    if command not in refusing:  # encoder weights, under any name, are what --init and export take
        assert code == 0, err
        return
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"glmae: error: {bad}: {message}"), err
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_not_matching_its_config_says_what_differs(good_checkpoint, tmp_path):
    from glmae.engine.run import model_from_checkpoint
    from glmae.errors import InputError

    state = _state(good_checkpoint)
    _other_width(state)
    with pytest.raises(InputError, match=r"\d+ tensors of other shapes: \S+ \(48, [\d, ]+\), the config's \(64, "):
        model_from_checkpoint(state, tmp_path / "x.pt")


def test_a_crafted_pickle_is_refused_on_a_short_line(data, tmp_path, run_cli):
    evil = _write_evil(tmp_path / "best.pt", "torch zip", tmp_path / "pwned")
    code, _, err = run_cli(*COMMANDS["evaluate"](evil, data, tmp_path / "out"))
    assert code == 2 and err.rstrip().endswith("(possibly malicious; not executed): it calls io.open"), err
    assert len(err) < 250, err  # torch's own text runs to 900 characters


def test_an_empty_file_to_import_is_one_line_naming_it(data, tmp_path, run_cli):
    (tmp_path / "weights.pth").write_bytes(b"")
    code, _, err = run_cli(*COMMANDS["import"](tmp_path / "weights.pth", data, tmp_path / "out"))
    assert (code, err) == (2, f"glmae: error: {tmp_path / 'weights.pth'}: empty file (0 bytes), not a checkpoint\n")
    assert not (tmp_path / "out").exists()
