"""The run layer every command shares: run folders, resume checks, volumes, encoders, checkpoints.

- `check_run_dir` / `create_run_dir`: a run folder is created only once every input passed its
  checks; a refused run leaves no folder behind (or, with --resume, the folder as it was).
- `load_volumes`: the data set's cases checked, preprocessed into the cache and memory-mapped.
- `encoder_meta` / `read_encoder`: the `encoder.json` written beside `encoder.safetensors`, and the
  encoder weights of any file a user may pass (an encoder.safetensors, a pre-training or a
  fine-tuning checkpoint).
- `model_from_checkpoint` / `load_finetuned`: a checkpoint's config rebuilds its method.
- `run_stage`: a training stage that is skipped once finished and resumed when interrupted (the
  demo and the benchmarks chain several).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from glmae import config as cfglib
from glmae.config import Config
from glmae.engine import checkpoint, distributed
from glmae.engine.distributed import DistEnv
from glmae.engine.trainer import RESUMABLE_CHANGES
from glmae.errors import InputError, warn

# ----------------------------------------------------------------------------------------------
# Run folders


def check_run_dir(out: Path, resume: bool, cfg: Config) -> bool:
    """Refuse to overwrite an existing run, to resume none, or to resume one with another config
    (beyond its length); writes nothing. Returns whether to continue from checkpoints/last.pt:
    False for a new run, and for --resume of a run killed before its first checkpoint, which starts
    again from step 0."""
    last, recorded = out / "checkpoints" / "last.pt", out / "config.yaml"
    started = last.exists() or recorded.exists()
    if resume and not started:
        raise InputError("--resume: nothing to resume (no checkpoints/last.pt, no config.yaml)", out)
    if not resume and started:
        raise InputError("already holds a run; pass --resume to continue it or choose another --out", out)
    if resume and last.is_file() and recorded.is_file():
        changed = cfglib.differences(cfglib.to_dict(cfg), cfglib.to_dict(cfglib.load_config(str(recorded))))
        changed = [k for k in changed if k not in RESUMABLE_CHANGES]
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


def run_stage(kind: str, run: Path, fn, *args, **kwargs) -> None:
    """Run a training stage (`fn(*args, **kwargs, resume=...)`) unless it finished; resume it if it
    was interrupted. A pre-training stage is finished when RUN/encoder.safetensors exists, a
    fine-tuning one when RUN/metrics.json does."""
    done = run / ("encoder.safetensors" if kind == "pretrain" else "metrics.json")
    if done.exists():
        return
    resume = (run / "checkpoints" / "last.pt").exists()
    if not resume and run.exists():
        shutil.rmtree(run)  # a stage that died before its first checkpoint starts over
    fn(*args, **kwargs, resume=resume)


# ----------------------------------------------------------------------------------------------
# Volumes


def load_volumes(data: str, cfg: Config, env: DistEnv, with_label: bool, cases=None, label_values=None):
    """Check, preprocess (once, into the cache) and memory-map the volumes of `cases` (default: the
    data set's training split; radiographs as (1, H, W, 1) volumes); label values outside
    `label_values` (if given) are an error. The
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
        pre = Preprocessor(cfg.data, dataset.modalities, label_values)
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
    """The contents of `encoder.json`: the encoder's config, the method and its steps."""
    return {"format": checkpoint.ENCODER_FORMAT, "encoder": cfglib.to_dict(cfg.encoder), "method": cfg.method.name,
            "steps": step}


def model_from_checkpoint(state: dict, path: Path):
    """(config, model with the checkpoint's weights, the encoder it exports) of a pretraining
    checkpoint (its `export_encoder`, e.g. GL-MAE's teacher) or a fine-tuning one (`net.encoder`)."""
    from glmae.methods import FINETUNING, PRETRAINING

    cfg = cfglib.build(Config, state["config"])
    if cfg.method.name in PRETRAINING:
        model = PRETRAINING[cfg.method.name](cfg.encoder, cfg.method)
    elif cfg.method.name in FINETUNING:
        model = FINETUNING[cfg.method.name](cfg.encoder, cfg.method)
    else:
        raise InputError(f"checkpoint of unknown method {cfg.method.name!r}", path)
    model.load_state_dict(state["model"])
    encoder = model.export_encoder if cfg.method.name in PRETRAINING else model.net.encoder
    return cfg, model, encoder


def load_finetuned(path: Path):
    """(config, fine-tuned model in eval mode: a Segmenter or a Classifier) from a fine-tuning
    checkpoint (last.pt / best.pt)."""
    cfg, model, _ = model_from_checkpoint(checkpoint.load(path), path)
    if cfg.task != "finetune":
        raise InputError(f"not a fine-tuning checkpoint (method {cfg.method.name!r})", path)
    return cfg, model.eval()


def read_encoder(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, str]:
    """(weights, encoder config as a dict, description) from an encoder.safetensors (+ .json), a
    pretraining checkpoint or a fine-tuning checkpoint."""
    path = Path(path)
    if path.suffix == ".safetensors":
        weights, meta = checkpoint.load_encoder(path)
        if not isinstance(meta.get("encoder"), dict):
            raise InputError("the architecture file has no `encoder` section", path.with_suffix(".json"))
        steps = meta.get("steps", "?")
        return weights, meta["encoder"], f"{meta.get('method', '?')} encoder" + (f", {steps} steps" if steps else "")
    state = checkpoint.load(path)
    cfg, _, encoder = model_from_checkpoint(state, path)
    description = f"{cfg.method.name} {state.get('kind', '')} checkpoint, {state['step']} steps"
    return encoder.state_dict(), cfglib.to_dict(cfg.encoder), description
