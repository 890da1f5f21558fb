"""The run layer every command shares: run folders, resume checks, volumes, encoders, checkpoints.

- `check_run_dir` / `create_run_dir`: a run folder is created only once every input passed its
  checks; a refused run leaves no folder behind (or, with --resume, the folder as it was).
- `load_volumes`: the data set's cases checked, preprocessed into the cache and memory-mapped.
- `encoder_meta` / `read_encoder`: the `encoder.json` written beside `encoder.safetensors`, and the
  encoder weights of any file a user may pass (an encoder.safetensors, a pre-training or a
  fine-tuning checkpoint). `resolve_intensity`: `data.intensity=auto` made explicit for a data set.
- `model_from_checkpoint` / `load_finetuned`: a checkpoint's config rebuilds its method (refusing,
  naming the file, a checkpoint without config or whose weights do not match it);
  `check_data_fits`: a fine-tuned model against a data set (labels, modality).
- `run_stage`: a training stage that is skipped once finished and resumed when interrupted (the
  demo and the benchmarks chain several), and run anew when its inputs changed (`stage_digest`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import NamedTuple

import torch

from glmae import config as cfglib
from glmae.config import Config
from glmae.engine import checkpoint, distributed
from glmae.engine.distributed import DistEnv
from glmae.engine.trainer import SCHEDULE_FIELDS
from glmae.errors import InputError, warn

# ----------------------------------------------------------------------------------------------
# Run folders


def check_run_dir(out: Path, resume: bool, cfg: Config) -> bool:
    """Refuse to overwrite an existing run, to resume none, or to resume one with another config
    (beyond its schedule, `trainer.SCHEDULE_FIELDS`); writes nothing. Returns whether to continue
    from checkpoints/last.pt: False for a new run, and for --resume of a run killed before its first
    checkpoint, which starts again from step 0."""
    last, recorded = out / "checkpoints" / "last.pt", out / "config.yaml"
    started = last.exists() or recorded.exists()
    if resume and not started:
        raise InputError("--resume: nothing to resume (no checkpoints/last.pt, no config.yaml)", out)
    if not resume and started:
        raise InputError("already holds a run; pass --resume to continue it or choose another --out", out)
    if resume and last.is_file() and recorded.is_file():
        before = cfglib.to_dict(cfglib.load_config(str(recorded)))
        if before["data"]["intensity"] == "auto":  # recorded before auto was resolved: it resolved alike
            before["data"]["intensity"] = cfg.data.intensity
        changed = cfglib.differences(cfglib.to_dict(cfg), before)
        changed = [k for k in changed if k not in SCHEDULE_FIELDS]
        if changed:
            raise InputError(f"--resume: the configuration differs from the run's in {', '.join(changed[:5])}",
                             recorded)
    if resume and not last.is_file():
        warn("--resume: the run has no checkpoint yet (stopped before the first): starting from step 0", out)
    return resume and last.is_file()


def create_run_dir(out: Path, cfg: Config, env: DistEnv) -> None:
    """Write OUT/config.yaml (main process). Leftovers of checkpoint writes cut short by a kill
    (checkpoints/.*.tmp) are removed."""
    distributed.barrier(env)  # every rank has checked the folder before the main one writes into it
    if env.is_main:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        for tmp in (out / "checkpoints").glob(".*.tmp"):
            tmp.unlink()
        text = cfglib.dump_yaml(cfg).encode()
        checkpoint.atomic_write(out / "config.yaml", lambda f: f.write(text))
    distributed.barrier(env)


def run_stage(kind: str, run: Path, fn, cfg: Config, data: str, **options) -> None:
    """Run a training stage, `fn(cfg, data, run, **options, resume=...)`, unless it finished; resume
    it if it was interrupted. A pre-training stage is finished when RUN/encoder.safetensors exists, a
    fine-tuning one when RUN/metrics.json does.

    RUN/stage.json records a digest of everything the stage's result depends on (`stage_digest`):
    a folder made with another config, other data or other options is removed and the stage run
    anew, with a line saying so, so a changed setting is never served from a stale folder. So is a
    folder without stage.json (it cannot show what made it). stage.json also records the stage's
    wall time once it finished (of the invocation that finished it: `resumed` says whether an
    earlier one did part of the work)."""
    digest = stage_digest(kind, cfg, data, options)
    record = run / "stage.json"
    if run.exists():
        before = json.loads(record.read_text()) if record.is_file() else {}
        if before.get("digest") != digest:
            print(f"{run}: made with another setting (config, data or options): starting it again", flush=True)
            shutil.rmtree(run)
    done = run / ("encoder.safetensors" if kind == "pretrain" else "metrics.json")
    if done.exists():
        return
    resume = (run / "checkpoints" / "last.pt").exists()
    if not resume and run.exists():
        shutil.rmtree(run)  # a stage that died before its first checkpoint starts over
    run.mkdir(parents=True, exist_ok=True)
    checkpoint.save_json({"kind": kind, "digest": digest}, record)
    start = time.time()
    fn(cfg, data, run, **options, resume=resume)
    checkpoint.save_json({"kind": kind, "digest": digest, "seconds": time.time() - start, "resumed": resume}, record)


def stage_digest(kind: str, cfg: Config, data: str, options: dict) -> str:
    """SHA-256 of a stage's inputs: its kind, resolved config, data set (`data_digest`) and options,
    an option naming a file (an --init encoder) by the file's content."""
    def value(v):
        return file_digest(Path(v)) if isinstance(v, (str, Path)) and Path(v).is_file() else v

    key = {"kind": kind, "config": cfglib.to_dict(cfg), "data": data_digest(data),
           "options": {k: value(v) for k, v in sorted(options.items())}}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def data_digest(data: str) -> str:
    """SHA-256 of a data set as glmae reads it: its declared modalities, labels, regions and
    findings, and each case's id, split, findings, patient and the contents of its files (a
    datalist's own text too, so a changed list is a changed data set)."""
    from glmae.data.formats import load_dataset

    dataset = load_dataset(data)
    h = hashlib.sha256()
    if Path(data).is_file():
        h.update(file_digest(Path(data)).encode())
    meta = [dataset.modalities, sorted(dataset.labels.items()), sorted(dataset.regions.items()), dataset.findings]
    h.update(json.dumps(meta, default=str).encode())
    for case in dataset.cases:
        files = [file_digest(p) for p in (*case.images, *([case.label] if case.label else []))]
        findings = sorted(case.findings) if case.findings is not None else None
        h.update(json.dumps([case.id, case.split, findings, case.patient, files]).encode())
    return h.hexdigest()


def file_digest(path: Path) -> str:
    """SHA-256 of a file's content, remembered per (path, size, mtime) within a process."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


_DIGESTS: dict[tuple, str] = {}


# ----------------------------------------------------------------------------------------------
# Volumes


def load_volumes(data: str, cfg: Config, env: DistEnv, with_label: bool, cases=None, label_values=None,
                 labels_from: str = "`labels`"):
    """Check, preprocess (once, into the cache) and memory-map the volumes of `cases` (default: the
    data set's training split; radiographs as (1, H, W, 1) volumes); label values outside
    `label_values` (if given; `labels_from` says whose) are an error. The
    main process fills the cache first; the others then read it. A warning line for each volume
    smaller than the method's ROI (it gets padded)."""
    from glmae.data.formats import load_dataset
    from glmae.data.preprocess import Preprocessor, RadiographPreprocessor, warn_smaller_than_roi

    dataset = load_dataset(data)
    if cases is None:
        cases = dataset.split("training") or dataset.cases
    if len(dataset.modalities) != cfg.encoder.in_channels:
        raise InputError(
            f"the data set has {len(dataset.modalities)} channel(s) ({', '.join(dataset.modalities)}) but the "
            f"encoder expects encoder.in_channels={cfg.encoder.in_channels}",
            data,
        )
    if dataset.dims == 2:  # radiographs: (1, H, W, 1) depth-1 volumes; their findings stay on the cases
        pre = RadiographPreprocessor(cfg.data)
    else:
        pre = Preprocessor(cfg.data, dataset.modalities, label_values, labels_from)
    if env.is_main:
        volumes = pre.prepare(cases, with_label=with_label)
    distributed.barrier(env)
    if not env.is_main:
        volumes = pre.prepare(cases, with_label=with_label, progress=False)
    elif hasattr(cfg.method, "roi"):
        warn_smaller_than_roi(volumes, cfg.method.roi)
    return dataset, volumes


# ----------------------------------------------------------------------------------------------
# Encoders and checkpoints


# encoder fields that do not change the architecture (every other field does)
TRAINING_FIELDS = ("drop_path",)


def architecture_differences(theirs: dict, ours: dict) -> list[str]:
    """The architecture fields (every field of `ours` but TRAINING_FIELDS) in which two encoder
    configs, as plain dicts, differ."""
    return [k for k in ours if k not in TRAINING_FIELDS and theirs.get(k) != ours[k]]


def encoder_meta(cfg: Config, step: int) -> dict:
    """The contents of `encoder.json`: the encoder's config, the method, its steps and the intensity
    mode of the images it learnt from (`data.intensity`, resolved)."""
    return {"format": checkpoint.ENCODER_FORMAT, "encoder": cfglib.to_dict(cfg.encoder), "method": cfg.method.name,
            "steps": step, "intensity": cfg.data.intensity}


class EncoderFile(NamedTuple):
    weights: dict[str, torch.Tensor]
    arch: dict  # the encoder config as a dict
    description: str  # "glmae encoder, 300 steps", ...
    intensity: str | None  # data.intensity of the images it was trained on; None if not recorded


CHECKPOINT_KEYS = ("config", "model", "step")  # what every glmae checkpoint holds


def model_from_checkpoint(state: dict, path: Path):
    """(config, model with the checkpoint's weights, the encoder it exports) of a pretraining
    checkpoint (its `export_encoder`, e.g. GL-MAE's teacher) or a fine-tuning one (`net.encoder`).
    InputError naming `path` when its config is missing or invalid, or does not match its weights."""
    from glmae.methods import FINETUNING, PRETRAINING

    missing = [key for key in CHECKPOINT_KEYS if key not in state]
    if missing:
        raise InputError(f"the checkpoint has no `{'`, `'.join(missing)}`: not written by glmae pretrain or "
                         f"finetune", path)
    try:
        cfg = cfglib.build(Config, state["config"])
    except InputError as err:
        raise InputError(f"the checkpoint's config is invalid: {err}", path) from None
    methods = {**PRETRAINING, **FINETUNING}
    if cfg.method.name not in methods:
        raise InputError(f"checkpoint of unknown method {cfg.method.name!r}", path)
    try:
        model = methods[cfg.method.name](cfg.encoder, cfg.method)
    except (ValueError, AssertionError, RuntimeError) as err:  # sizes no model can be built with
        raise InputError(f"the checkpoint's config describes no buildable {cfg.method.name} model: {err}",
                         path) from None
    problem = weights_mismatch(model.state_dict(), state["model"])
    if problem:
        raise InputError(f"the checkpoint's weights do not match its config ({problem})", path)
    model.load_state_dict(state["model"])
    encoder = model.export_encoder if cfg.method.name in PRETRAINING else model.net.encoder
    return cfg, model, encoder


def weights_mismatch(expected: dict[str, torch.Tensor], weights) -> str:
    """'' when `weights` has exactly the names and shapes of `expected`, else what differs, briefly."""
    if not isinstance(weights, dict):
        return f"`model` is a {type(weights).__name__}, not a dict of tensors"
    problems = []
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    for what, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            problems.append(f"{len(keys)} {what} tensors: {', '.join(keys[:2])}{', ...' if len(keys) > 2 else ''}")
    shapes = [k for k in sorted(set(expected) & set(weights))
              if not isinstance(weights[k], torch.Tensor) or weights[k].shape != expected[k].shape]
    if shapes:
        k = shapes[0]
        found = tuple(weights[k].shape) if isinstance(weights[k], torch.Tensor) else type(weights[k]).__name__
        problems.append(f"{len(shapes)} tensors of other shapes: {k} {found}, the config's {tuple(expected[k].shape)}")
    return "; ".join(problems)


def load_finetuned(path: Path):
    """(config, fine-tuned model in eval mode: a Segmenter or a Classifier) from a fine-tuning
    checkpoint (last.pt / best.pt)."""
    needed = "evaluate and predict need a fine-tuning checkpoint (RUN/checkpoints/best.pt of glmae finetune)"
    if checkpoint.is_safetensors(path):
        raise InputError(f"holds encoder weights alone (safetensors), not a whole model: {needed}", path)
    cfg, model, _ = model_from_checkpoint(checkpoint.load(path), path)
    if cfg.task != "finetune":
        raise InputError(f"is a {cfg.task} checkpoint ({cfg.method.name}): {needed}", path)
    return cfg, model.eval()


def check_data_fits(cfg: Config, dataset, checkpoint_path: Path, labels: bool = True) -> None:
    """Refuse a data set a fine-tuned model was not made for, naming both sides: another modality
    than the intensities it was trained on (a CT model's window on MRI), or (with `labels`) other
    declared label values or regions (Dice under the wrong organs' names). Label names that differ
    for the same values are a warning: the checkpoint's names are reported."""
    from glmae.data.preprocess import intensity_mode

    if set(dataset.modalities) != {"unknown"} and cfg.data.intensity in ("ct", "mri"):
        theirs = intensity_mode(cfglib.DataConfig(intensity="auto"), dataset.modalities)
        if theirs != cfg.data.intensity:
            raise InputError(
                f"the data set's images are {', '.join(dataset.modalities)} (intensity {theirs}) but the checkpoint "
                f"{checkpoint_path} was trained on data.intensity={cfg.data.intensity} images", dataset.root)
    if not labels:
        return
    ours, theirs = dict(cfg.method.labels), dict(dataset.labels)
    if theirs and set(theirs) | {0} != set(ours) | {0}:
        raise InputError(f"the data set's labels ({_label_list(theirs)}) are not the checkpoint's "
                         f"({_label_list(ours)}, {checkpoint_path})", dataset.root)
    regions = {name: list(values) for name, values in dataset.regions.items()}
    if regions and regions != cfg.method.regions:
        raise InputError(f"the data set's regions {regions} are not the checkpoint's {cfg.method.regions} "
                         f"({checkpoint_path})", dataset.root)
    renamed = {v: (theirs[v], ours[v]) for v in theirs if v in ours and theirs[v] != ours[v]}
    if renamed:
        warn(f"the data set names labels otherwise than the checkpoint {checkpoint_path} "
             f"({', '.join(f'{v}: {a!r} here, {b!r} there' for v, (a, b) in sorted(renamed.items()))}): the "
             f"checkpoint's names are reported", dataset.root)


def _label_list(labels: dict[int, str], n: int = 6) -> str:
    items = [f"{v} {name}" for v, name in sorted(labels.items())]
    return ", ".join(items[:n]) + (f", ... {len(items)} in all" if len(items) > n else "")


def read_encoder(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, str]:
    """(weights, encoder config as a dict, description) from an encoder.safetensors (+ .json; under
    any name), a pretraining checkpoint or a fine-tuning checkpoint."""
    return tuple(read_encoder_file(path)[:3])


def read_encoder_file(path: str | Path) -> EncoderFile:
    """`read_encoder`, with the intensity mode the encoder learnt from."""
    path = Path(path)
    if path.suffix == ".safetensors" or checkpoint.is_safetensors(path):  # `export --out x.pt` may name it so
        weights, meta = checkpoint.load_encoder(path)
        if not isinstance(meta.get("encoder"), dict):
            raise InputError("the architecture file has no `encoder` section", path.with_suffix(".json"))
        steps = meta.get("steps", "?")
        description = f"{meta.get('method', '?')} encoder" + (f", {steps} steps" if steps else "")
        return EncoderFile(weights, meta["encoder"], description, meta.get("intensity"))
    state = checkpoint.load(path)
    cfg, _, encoder = model_from_checkpoint(state, path)
    description = f"{cfg.method.name} {state.get('kind', '')} checkpoint, {state['step']} steps"
    return EncoderFile(encoder.state_dict(), cfglib.to_dict(cfg.encoder), description, cfg.data.intensity)


def resolve_intensity(cfg: Config, dataset, source, say: bool = True) -> Config:
    """`cfg` with `data.intensity` resolved for the data set (auto -> ct or mri, see
    `glmae.data.preprocess.intensity_mode`), so that config.yaml, checkpoints and encoder.json say
    what was done (volumes only). A warning (if `say`) when auto meets a data set that declares no
    modality (MRI z-scoring)."""
    from glmae.data.preprocess import intensity_mode

    if dataset.dims != 3:  # radiographs are scaled by their own preprocessing, whatever data.intensity says
        return cfg
    mode = intensity_mode(cfg.data, dataset.modalities)
    if say and cfg.data.intensity == "auto" and set(dataset.modalities) == {"unknown"}:
        warn("declares no modality, so data.intensity=auto z-scores the images as MRI; for CT pass "
             "--set data.intensity=ct", source)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, intensity=mode))
