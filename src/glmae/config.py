"""Typed run configuration: defaults -> YAML -> `--set key=value` overrides.

A config is a tree of dataclasses. Two fields are open families chosen by a key in the YAML:
`encoder` (by `arch`: "vit", "swin") and `method` (by `name`: "mae3d", "glmae", "gmim", "unetr",
...). Modules register their own config class with `register_encoder` / `register_method`, so a
method's options live beside its code. Packaged configs are YAML files in `glmae/configs/`; a YAML
may start from others with `base: NAME` or `base: [NAME, ...]` (merged in that order, then the
file's own keys), so that each number has one home; files named `_*.yaml` are such parts, not
configs of their own.

The resolved config is saved as `RUN/config.yaml` and as plain types inside every checkpoint, so a
run describes itself.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from glmae.errors import InputError

CONFIG_DIR = Path(__file__).parent / "configs"


class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false, so `amp: off` stays the string "off"."""


_Loader.yaml_implicit_resolvers = {
    key: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)

_ENCODERS: dict[str, type] = {}
_METHODS: dict[str, type] = {}
# Modules that register encoder / method configs; imported on first use so that `glmae config`
# works without the caller knowing where an encoder or a method lives.
_PLUGIN_MODULES = ("glmae.models.vit", "glmae.models.swin", "glmae.methods")


def register_encoder(arch: str):
    def wrap(cls):
        _ENCODERS[arch] = cls
        return cls

    return wrap


def register_method(name: str):
    def wrap(cls):
        _METHODS[name] = cls
        return cls

    return wrap


def _load_plugins() -> None:
    for module in _PLUGIN_MODULES:
        importlib.import_module(module)


# ----------------------------------------------------------------------------------------------
# Shared sections


@dataclass
class EncoderConfig:
    """Base of the encoder family; `arch` selects the subclass."""

    arch: str = ""
    in_channels: int = 1


@dataclass
class MethodConfig:
    """Base of the method family; `name` selects the subclass."""

    name: str = ""


@dataclass
class DataConfig:
    """How volumes are read and normalised (see `glmae.data.preprocess`)."""

    spacing: tuple[float, float, float] | None = (1.5, 1.5, 2.0)  # mm per axis (RAS); None: native
    intensity: str = "auto"  # auto (from the data set's modality) | ct | mri | none
    ct_window: tuple[float, float] = (-175.0, 250.0)  # HU clipped to this window, scaled to [0, 1]
    crop_foreground: bool = False  # crop to the body (intensity above the window's lower end)
    image_size: tuple[int, int] | None = None  # radiographs: resized to [rows, columns]; None keeps them
    cache_dir: str = ""  # preprocessed-volume cache; "" -> $GLMAE_CACHE_DIR or ~/.cache/glmae
    num_workers: int = 2  # DataLoader worker processes per training process


LR_SCALINGS = ("linear", "none")


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and cosine decay, stepped per iteration."""

    lr: float = 1.5e-4  # base learning rate; see lr_scaling
    lr_scaling: str = "linear"  # linear: lr x effective batch / 256 | none: lr as given
    min_lr: float = 0.0
    warmup_steps: int = 0
    warmup_epochs: float = 0.0  # if > 0: the warm-up is this many epochs (overrides warmup_steps)
    weight_decay: float = 0.05  # not applied to norms, biases and embeddings-free parameters
    betas: tuple[float, float] = (0.9, 0.95)
    clip_grad: float = 0.0  # max gradient norm; 0 disables
    accum_steps: int = 1  # micro-batches per optimiser step
    layer_decay: float = 1.0  # layer-wise lr decay for encoder blocks (fine-tuning); 1 disables

    def __post_init__(self):
        if self.lr_scaling not in LR_SCALINGS:
            raise InputError(f"config: optim.lr_scaling: expected {' or '.join(LR_SCALINGS)}, got {self.lr_scaling!r}")


@dataclass
class TrainConfig:
    max_steps: int = 1000  # optimiser steps; overridden by `epochs` when that is set
    epochs: float = 0.0  # if > 0: max_steps = ceil(epochs x samples per epoch / global batch)
    batch_size: int = 2  # per process and micro-step
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "auto"  # auto | bf16 | fp16 | off; auto = bf16 where the device runs it fast
    log_every: int = 10
    ckpt_every: int = 100
    fig_every: int = 0  # 0: only at the end
    val_every: int = 0  # fine-tuning: validate every N steps; 0: only at the end
    grad_checkpoint: bool = False  # recompute each ViT block's activations in the backward pass
    compile: bool = False  # torch.compile the model (the first steps compile it)
    probe_data: str = ""  # pre-training: the online probe (methods/probe.py) on this labelled data set, fitted
    # on its training cases and scored on its validation cases; "": no probe
    probe_every: int = 500  # ... every N steps (0: at the end only)
    probe_steps: int = 100  # ... fitting its linear head for this many steps


@dataclass
class Config:
    task: str = "pretrain"  # pretrain | finetune
    encoder: EncoderConfig = field(default_factory=lambda: build(EncoderConfig, {"arch": "vit"}))
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ----------------------------------------------------------------------------------------------
# Building typed configs from plain data


def _family(cls: type) -> tuple[dict[str, type], str] | None:
    if cls is EncoderConfig:
        return _ENCODERS, "arch"
    if cls is MethodConfig:
        return _METHODS, "name"
    return None


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`, converting lists to tuples where declared."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, where)
            except InputError:
                pass
        raise InputError(f"config: {where}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise InputError(f"config: {where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise InputError(f"config: {where}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise InputError(f"config: {where}: expected a list, got {value!r}")
        (arg,) = typing.get_args(tp)
        return [_coerce(arg, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise InputError(f"config: {where}: expected a mapping, got {value!r}")
        k_tp, v_tp = typing.get_args(tp)
        return {_coerce(k_tp, k, where): _coerce(v_tp, v, f"{where}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"config: {where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not (
            isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        ):
            raise InputError(f"config: {where}: expected an integer, got {value!r}")
        return int(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise InputError(f"config: {where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise InputError(f"config: {where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} at {where}")


def build(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass `cls` from a mapping, checking keys and types. Raises InputError."""
    if dataclasses.is_dataclass(data):
        data = to_dict(data)
    if not isinstance(data, dict):
        raise InputError(f"config: {where or 'top level'}: expected a mapping, got {data!r}")
    family = _family(cls)
    if family is not None:
        registry, key = family
        choice = data.get(key, "")
        if choice not in registry:  # registered by a plugin module not imported yet
            _load_plugins()
        if choice not in registry:
            known = ", ".join(sorted(registry))
            raise InputError(f"config: {where}.{key}: unknown {key} {choice!r} (known: {known})")
        cls = registry[choice]
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise InputError(
            f"config: unknown key {prefix}{unknown[0]} (known in {where or 'top level'}: "
            f"{', '.join(sorted(names))})"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}.{name}" if where else name)
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """Plain Python types (dict, list, str, int, float, bool, None) for YAML and checkpoints."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


# ----------------------------------------------------------------------------------------------
# Sources: packaged names, YAML files, overrides


def available() -> list[str]:
    """Names of the packaged configs (files named `_*.yaml` are parts for `base:`, not configs)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if not p.stem.startswith("_"))


def _read_yaml(source: str, seen: tuple[str, ...] = ()) -> dict:
    path = Path(source)
    if not path.suffix and (CONFIG_DIR / f"{source}.yaml").is_file():
        path = CONFIG_DIR / f"{source}.yaml"
    elif not path.is_file():
        raise InputError(
            f"config: no packaged config or YAML file named {source!r} (packaged: {', '.join(available())})"
        )
    if str(path) in seen:
        raise InputError("config: circular `base`", path)
    try:
        data = _yaml_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise InputError(f"cannot read config: {str(err).splitlines()[0]}", path) from None
    if not isinstance(data, dict):
        raise InputError("config: expected a mapping at the top level", path)
    bases = data.pop("base", [])
    merged: dict = {}
    for base in bases if isinstance(bases, list) else [bases]:
        merged = _merge(merged, _read_yaml(str(base), seen + (str(path),)))
    return _merge(merged, data)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            # switching a family (another method name / encoder arch) drops the old options; a
            # section that names none (a part such as the shared MAE decoder) merges into any
            family_key = {"encoder": "arch", "method": "name"}.get(key)
            old, new = out[key].get(family_key), value.get(family_key)
            if family_key and old is not None and new is not None and new != old:
                out[key] = dict(value)
            else:
                out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """'optim.lr=1e-3' -> (['optim', 'lr'], 0.001). The value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise InputError(f"--set {text!r}: expected key=value, e.g. optim.lr=1e-3")
    try:
        value = _yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):  # YAML reads '1e-3' as a string; accept it as a number
        try:
            value = float(value) if any(c in value for c in ".eE") else value
        except ValueError:
            pass
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for key in keys[:-1]:
            if not isinstance(node.get(key, {}), dict):
                raise InputError(f"--set {text!r}: {key} is not a section")
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return data


def load_config(source: str | dict, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Resolve a packaged name, a YAML path or a mapping, plus `--set` overrides, to a Config."""
    data = _read_yaml(source) if isinstance(source, str) else source
    return build(Config, apply_overrides(data, list(overrides)))


class _Dumper(yaml.SafeDumper):
    """Sections as blocks, lists of numbers inline: `roi: [96, 96, 96]`."""


_Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def dump_yaml(cfg: Config) -> str:
    return yaml.dump(to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)


def differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted names of the fields in which two plain config dicts differ ("optim.lr", ...)."""
    out = []
    for key in sorted(set(a) | set(b)):
        name = f"{prefix}{key}"
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += differences(va, vb, name + ".")
        elif va != vb:
            out.append(name)
    return out


def global_batch(cfg: Config, world_size: int = 1) -> int:
    """Samples per optimiser step over all processes: batch_size x accum_steps x processes."""
    return cfg.train.batch_size * cfg.optim.accum_steps * world_size


def steps_for_epochs(cfg: Config, samples_per_epoch: int, world_size: int) -> int:
    """Optimiser steps of the run: `train.max_steps`, or `train.epochs` worth of samples."""
    if cfg.train.epochs > 0:
        return max(1, math.ceil(cfg.train.epochs * samples_per_epoch / global_batch(cfg, world_size)))
    return cfg.train.max_steps


def warmup_steps(cfg: Config, samples_per_epoch: int, world_size: int) -> int:
    """Warm-up steps: `optim.warmup_steps`, or `optim.warmup_epochs` worth of samples."""
    if cfg.optim.warmup_epochs > 0:
        return max(1, math.ceil(cfg.optim.warmup_epochs * samples_per_epoch / global_batch(cfg, world_size)))
    return cfg.optim.warmup_steps
