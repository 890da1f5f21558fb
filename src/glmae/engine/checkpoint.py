"""Checkpoints: atomic writes, loads that never execute code, encoder weights as safetensors.

A checkpoint is a dict of tensors and plain Python values (no pickled objects), so it loads with
`torch.load(..., weights_only=True)`; a file that needs more than that is refused, not executed.
Writes go to a temporary file in the same folder, are flushed and fsync'ed, then renamed over the
old file: a crash at any moment leaves either the old or the new checkpoint, never a torn one (at
worst a stray temporary `.NAME.*.tmp`, which resuming a run removes). A write that fails (disk
full, read-only file system, no permission) removes its temporary file, keeps the old file and
raises InputError naming the file.
"""

from __future__ import annotations

import json
import os
import pickle
import pickletools
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from glmae.errors import InputError

FORMAT = "glmae-checkpoint/1"
ENCODER_FORMAT = "glmae-encoder/1"  # safetensors metadata and encoder.json
_PICKLE_OPCODES = {op.code for op in pickletools.opcodes}


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write) -> None:
    """Call write(file_object) on a temporary file, then atomically move it to `path`. An OSError
    becomes an InputError naming `path` (whose previous version, if any, is unchanged)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise InputError(f"cannot write: {err.strerror or err}", path) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        cause = _os_error(err)
        if cause is not None:
            kept = "; its previous version is kept" if path.exists() else ""
            raise InputError(f"cannot write: {cause.strerror or cause}{kept}", path) from None
        raise
    _fsync_dir(path.parent)


def check_writable(path: Path, option: str, folder: bool = False) -> None:
    """InputError now, before any work, if `path` (a file, or with `folder` a folder) could not be
    written later: the other kind of entry in its place, a file where a folder on its way should be,
    or no permission to create files in the nearest folder that exists. Tried with a nameless
    temporary file, so nothing is left behind."""
    path = Path(path)
    kind, other = ("folder", "file") if folder else ("file", "folder")
    if path.exists() and path.is_dir() != folder:
        raise InputError(f"{option}: is a {other}; expected a {kind}", path)
    parent = path if folder and path.is_dir() else path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{option}: {parent} is a file, not a folder", path)
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as err:
        raise InputError(f"{option}: cannot write in {parent}: {err.strerror or err}", path) from None


def _os_error(err: BaseException | None) -> OSError | None:
    """`err` or the OSError it was raised while handling (torch.save turns a failed write into a
    RuntimeError about its zip file)."""
    while err is not None and not isinstance(err, OSError):
        err = err.__context__
    return err


def save_json(data: Any, path: Path) -> None:
    """`data` as indented JSON, written atomically."""
    text = json.dumps(data, indent=2) + "\n"
    atomic_write(Path(path), lambda f: f.write(text.encode()))


def save(state: dict[str, Any], path: Path) -> None:
    atomic_write(path, lambda f: torch.save({"format": FORMAT, **state}, f))


def is_safetensors(path: Path) -> bool:
    """Whether the file holds safetensors (an 8-byte header length, then a JSON header), whatever its name."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return False
    return len(head) == 9 and head[8:] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size


def _refusal(err: pickle.UnpicklingError) -> str:
    """The line for torch's (long) refusal to unpickle: the forbidden global or pickle operation it
    names; a byte that is no pickle operation at all means a damaged file, not a crafted one."""
    text = str(err)
    refused = "refusing to load: the file holds Python objects beyond tensors and plain values (possibly malicious; " \
              "not executed)"
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        return f"{refused}: it calls {found[1]}"
    found = re.search(r"Unsupported operand (\d+)", text)
    if found and chr(int(found[1])) not in _PICKLE_OPCODES:
        return f"not a readable checkpoint (damaged: byte {found[1]} is no pickle operation)"
    return refused + (f": unsupported pickle operation {found[1]}" if found else "")


def _first_sentence(err: Exception) -> str:
    """The exception's kind and the first sentence of its text, without torch's paragraphs of advice."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0].split('. ')[0]}" if text else type(err).__name__


def load(path: Path) -> dict[str, Any]:
    """Load a checkpoint written by `save`; InputError for anything else (no code is executed)."""
    if is_safetensors(path):
        raise InputError("is a safetensors file (encoder weights alone, with its .json), not a glmae checkpoint",
                         path)
    state = read(path)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise InputError(f"not a glmae checkpoint (expected format {FORMAT})", path)
    return state


def foreign_safe_globals() -> list:
    """The plain classes that published checkpoints hold besides tensors, and nothing else: an
    argparse Namespace (the training arguments) and numpy scalars with their dtypes, under numpy 2's
    and numpy 1's module names."""
    import argparse

    import numpy as np

    core = getattr(np, "_core", None) or np.core  # numpy 2 | numpy 1
    scalar = core.multiarray.scalar
    dtypes = [type(np.dtype(code)) for code in "?bhilqBHILQefd"]
    return [argparse.Namespace, scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype, *dtypes]


def read(path: Path, allowed: list | tuple = ()) -> Any:
    """The contents of a PyTorch file, unpickled with `weights_only=True` (tensors and plain values,
    plus the classes in `allowed`): InputError for a missing, unreadable or truncated file and for
    one that holds other objects (a crafted pickle is refused, never executed)."""
    path = Path(path)
    if not path.is_file():
        raise InputError("checkpoint not found", path)
    if path.stat().st_size == 0:
        raise InputError("empty file (0 bytes), not a checkpoint", path)
    if is_safetensors(path):
        raise InputError("is a safetensors file, not a PyTorch checkpoint (torch.save)", path)
    with open(path, "rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):  # torch.save: a zip, or a pickle
        kind = " (gzip-compressed: an image?)" if head.startswith(b"\x1f\x8b") else ""
        raise InputError(f"not a PyTorch checkpoint: neither a zip archive nor a pickle{kind}", path)
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(list(allowed)):
            warnings.simplefilter("ignore")  # torch's notes on odd pickle protocols: the line below says enough
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise InputError(_refusal(err), path) from None
    except Exception as err:  # a damaged file fails anywhere in torch's reader, with any exception type
        raise InputError(f"not a readable checkpoint ({_first_sentence(err)})", path) from None
    return state


def save_encoder(weights: dict[str, torch.Tensor], meta: dict[str, Any], path: Path) -> None:
    """`path` (.safetensors) with the weights and `path` minus suffix + .json with `meta`."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    atomic_write(path, lambda f: f.write(save(tensors, metadata={"format": ENCODER_FORMAT})))
    text = json.dumps(meta, indent=2) + "\n"
    atomic_write(Path(path).with_suffix(".json"), lambda f: f.write(text.encode()))


def load_encoder(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights and metadata written by `save_encoder`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    meta_path = path.with_suffix(".json")
    if not path.is_file():
        raise InputError("encoder weights not found", path)
    if path.stat().st_size == 0:
        raise InputError("empty file (0 bytes), not encoder weights", path)
    try:
        weights = load_file(path)
    except (SafetensorError, OSError) as err:
        raise InputError(f"not a readable safetensors file ({err})", path) from None
    if not meta_path.is_file():
        raise InputError(f"missing its architecture file {meta_path.name}", path)
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"unreadable architecture file ({err})", meta_path) from None
    if not isinstance(meta, dict):
        raise InputError("the architecture file is not a JSON object", meta_path)
    return weights, meta
