"""Checkpoints from strangers: nothing in glmae unpickles more than tensors and plain values, and a
crafted pickle is refused by every command that reads a checkpoint, without running its code."""

from __future__ import annotations

import ast
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from badinputs import FINETUNE, clean_dataset, sets

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
