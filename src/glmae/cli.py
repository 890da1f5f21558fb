"""The `glmae` command. Thin wrappers: each command imports its (heavy) module when it runs.

Exit codes: 0 success, 2 bad input or usage (one line on stderr, no traceback), 1 internal error.
A full disk, a read-only file system or a denied permission is reported like bad input (exit 2, one
line naming the file); Ctrl-C outside training (which stops cleanly on its own) exits 130.
"""

from __future__ import annotations

import errno
import sys
from pathlib import Path
from typing import Annotated

import typer

from glmae.errors import InputError, Interrupted, TrainingError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Self-supervised pre-training (GL-MAE, MAE3D, GMIM) and fine-tuning for 3D medical segmentation.",
)

SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Override a config field: key=value (repeatable).")
]
ConfigOpt = Annotated[str, typer.Option("--config", help="Packaged config name or YAML file.")]
DataOpt = Annotated[
    str, typer.Option("--data", help="MSD folder or dataset.json, nnU-Net folder, datalist JSON, folder or glob.")
]
OutOpt = Annotated[Path, typer.Option("--out", help="Run folder.")]
MaxStepsOpt = Annotated[
    int | None, typer.Option("--max-steps", help="Train N optimiser steps (sets train.max_steps=N and train.epochs=0).")
]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue from OUT/checkpoints/last.pt.")]


def _config(name: str, overrides: list[str] | None, max_steps: int | None = None):
    from glmae.config import load_config

    overrides = list(overrides or [])
    if max_steps is not None:
        overrides += [f"train.max_steps={max_steps}", "train.epochs=0"]
    return load_config(name, overrides)


@app.command()
def synth(
    out_dir: Annotated[Path, typer.Argument(help="Output folder (MSD layout).")],
    cases: Annotated[int, typer.Option("--cases", min=1, help="Number of cases.")] = 10,
    seed: Annotated[int, typer.Option("--seed", help="Random seed; same seed, same arrays.")] = 0,
    shape: Annotated[
        tuple[int, int, int] | None, typer.Option("--shape", help="Volume shape X Y Z.")
    ] = None,
    preview: Annotated[bool, typer.Option("--preview", help="Also write a PNG preview per case.")] = False,
    kind: Annotated[str, typer.Option("--kind", help="abdomen: CT with the 13 BTCV organs (MSD layout); brain: "
                                                     "4-channel MRI with tumours (MSD Task01 layout and labels); "
                                                     "cxr: chest radiographs with 5 findings (PNG + ChestX-ray14 "
                                                     "CSV, --shape H W 1).")] = "abdomen",
):
    """Write synthetic data with labels; abdominal CT with 13 organs by default, brain MRI with tumours with
    --kind brain, chest X-rays with --kind cxr."""
    from glmae.synth import KINDS

    if kind not in KINDS:
        raise InputError(f"--kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    KINDS[kind](out_dir, cases=cases, seed=seed, shape=shape, preview=preview)


@app.command()
def info(data: Annotated[str, typer.Argument(help="Data set: folder, dataset.json, datalist or glob.")]):
    """Describe and validate a data set; exit 2 if any problem is found."""
    from glmae.data.validate import info as run_info

    if run_info(data) > 0:
        raise typer.Exit(2)


@app.command("config")
def config_cmd(
    name: Annotated[str, typer.Argument(help="Packaged config name or YAML file.")],
    set_: SetOpt = None,
):
    """Print the resolved configuration as YAML, after a comment line with the effective peak lr."""
    from glmae.config import dump_yaml
    from glmae.engine.optim import describe_peak_lr

    cfg = _config(name, set_)
    typer.echo(describe_peak_lr(cfg))
    typer.echo(dump_yaml(cfg), nl=False)


@app.command()
def pretrain(
    config: ConfigOpt,
    data: DataOpt,
    out: OutOpt,
    max_steps: MaxStepsOpt = None,
    resume: ResumeOpt = False,
    set_: SetOpt = None,
):
    """Self-supervised pre-training (MAE3D, GL-MAE, GMIM); writes OUT/encoder.safetensors."""
    from glmae.pretrain import pretrain as run

    run(_config(config, set_, max_steps), data, out, resume=resume)


@app.command()
def finetune(
    config: ConfigOpt,
    data: DataOpt,
    out: OutOpt,
    init: Annotated[
        str | None,
        typer.Option("--init", help="encoder.safetensors, a pre-training or fine-tuning checkpoint, or 'none' "
                                    "[default: the config's method.init, none]."),
    ] = None,
    mode: Annotated[
        str | None, typer.Option("--mode", help="linear (frozen encoder) or e2e [default: the config's, e2e].")
    ] = None,
    label_fraction: Annotated[
        float | None,
        typer.Option("--label-fraction", min=0.0, max=1.0,
                     help="Fraction of labelled training cases [default: the config's, 1.0]."),
    ] = None,
    split_seed: Annotated[
        int | None, typer.Option("--split-seed", help="Seed of the split and subset [default: the config's, 0].")
    ] = None,
    init_channels: Annotated[
        str | None, typer.Option("--init-channels", help="An --init encoder of other in_channels: its patch embedding "
                                                         "averaged or repeated, x C_in/C_out [default: the config's, "
                                                         "average].")
    ] = None,
    max_steps: MaxStepsOpt = None,
    resume: ResumeOpt = False,
    set_: SetOpt = None,
):
    """Fine-tune a segmentation network (UNETR, Swin-UNETR) from a pretrained encoder."""
    from glmae.finetune import finetune as run

    if mode not in (None, "linear", "e2e"):
        raise InputError(f"--mode: expected linear or e2e, got {mode!r}")
    run(
        _config(config, set_, max_steps),
        data,
        out,
        init=init,
        mode=mode,
        label_fraction=label_fraction,
        split_seed=split_seed,
        resume=resume,
        init_channels=init_channels,
    )


@app.command()
def evaluate(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="Fine-tuning checkpoint (best.pt).")],
    data: Annotated[str, typer.Option("--data", help="Data set with labels.")],
    out: Annotated[Path, typer.Option("--out", help="Metrics JSON to write (CSV and PNG beside it).")],
    split: Annotated[str, typer.Option("--split", help="val, test or all.")] = "val",
    nsd_tolerance: Annotated[float | None, typer.Option(
        "--nsd-tolerance", help="Surface Dice tolerance in mm (default: method.nsd_tolerance, 1).")] = None,
):
    """Per-case and per-class Dice, HD95 (mm) and normalised surface Dice of a fine-tuned model on a data set split."""
    from glmae.evaluate import evaluate as run

    run(checkpoint, data, out, split=split, nsd_tolerance=nsd_tolerance)


@app.command()
def predict(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="Fine-tuning checkpoint (best.pt).")],
    input: Annotated[str, typer.Option("--input", help="Image file, folder or glob of images ('scans/*.nii.gz'), or a "
                                                       "data set (dataset.json, nnU-Net folder, datalist).")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the masks.")],
    overlay: Annotated[bool, typer.Option("--overlay", help="Also write overlay PNGs.")] = False,
):
    """Segment images; masks are written in each input's own geometry."""
    from glmae.predict import predict as run

    run(checkpoint, input, out, overlay=overlay)


@app.command()
def export(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="Checkpoint or encoder.safetensors.")],
    format: Annotated[str, typer.Option("--format", help="monai-unetr, monai-vit or safetensors.")],
    out: Annotated[Path, typer.Option("--out", help="File to write (constructor arguments beside it).")],
):
    """Convert weights for MONAI's UNETR / ViT, or the encoder alone as safetensors."""
    from glmae.export import export as run

    run(checkpoint, format, out)


@app.command()
def plan(
    config: ConfigOpt,
    gpus: Annotated[int, typer.Option("--gpus", min=1, help="GPUs (processes) of the run.")] = 1,
    gpu_memory: Annotated[float, typer.Option("--gpu-memory", help="Memory of one GPU, GiB.")] = 80.0,
    mfu: Annotated[float, typer.Option("--mfu", help="Model FLOPs utilisation: the share of the peak the "
                                                     "counted FLOPs run at.")] = 0.3,
    gpu_tflops: Annotated[float, typer.Option("--gpu-tflops", help="Peak TFLOP/s of one GPU in the run's "
                                                                   "precision [default: an A100's bf16].")] = 312.0,
    cases: Annotated[int, typer.Option("--cases", help="Training cases (volumes or images) in an epoch.")] = 1000,
    measure: Annotated[bool, typer.Option(
        "--measure", help="Also run 3 training steps here (train.device, synthetic samples; on a CPU one thread "
                          "in CPU time): step time, MFU, saved tensors.")] = False,
    set_: SetOpt = None,
):
    """Size a run: parameters, FLOPs per sample, memory per GPU, loader rate, time per epoch and run."""
    from glmae.plan import measure as run_measure
    from glmae.plan import plan as run_plan
    from glmae.plan import report, report_measured

    cfg = _config(config, set_)
    planned = run_plan(cfg, config, gpus=gpus, gpu_memory=gpu_memory, mfu=mfu, gpu_tflops=gpu_tflops, cases=cases)
    typer.echo(report(planned))
    if measure:
        typer.echo(report_measured(planned, run_measure(cfg)))


@app.command("import")
def import_cmd(
    format: Annotated[str, typer.Option("--format", help="glmae-paper, selfmedmae, monai-swinvit or monai-vit.")],
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="The published weights (.pth, .pt, ...).")],
    out: Annotated[Path, typer.Option("--out", help="ENCODER.safetensors to write (encoder.json beside it).")],
    heads: Annotated[
        int | None, typer.Option("--heads", min=1, help="A ViT's attention heads [default: the published ViT's].")
    ] = None,
    img_size: Annotated[
        tuple[int, int, int] | None,
        typer.Option("--img-size", help="Input size X Y Z the weights were trained at [default: a cube of tokens]."),
    ] = None,
    roi: Annotated[
        tuple[int, int, int] | None,
        typer.Option("--roi", help="Resample a learned position embedding to this ROI's tokens [default: keep it]."),
    ] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Any missing or unexpected key is an error.")] = False,
):
    """Convert published weights (GL-MAE, SelfMedMAE, MONAI) into an encoder for finetune --init."""
    from glmae.import_weights import import_weights as run

    run(format, checkpoint, out, heads=heads, img_size=img_size, roi=roi, strict=strict)


@app.command()
def demo(
    out: OutOpt = Path("runs/demo"),
    quick: Annotated[bool, typer.Option("--quick", help="A ~2 minute version.")] = False,
    kind: Annotated[str, typer.Option("--kind", help="abdomen: CT phantoms, 13 organs; brain: 4-channel MRI "
                                                     "phantoms, tumour regions WT, TC, ET.")] = "abdomen",
):
    """Synthesise phantoms, pretrain GL-MAE, fine-tune with few labels vs scratch, and report."""
    from glmae.demo import demo as run

    run(out, quick=quick, kind=kind)


# OSErrors that come from the machine, not from glmae: the user can act on them
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, prog_name="glmae")
    except InputError as err:
        print(f"glmae: error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:
        if err.errno not in ENVIRONMENT_ERRNOS:
            raise
        where = f"{err.filename}: " if err.filename else ""
        print(f"glmae: error: {where}{err.strerror}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("glmae: interrupted", file=sys.stderr)
        sys.exit(130)
    except TrainingError as err:
        print(f"glmae: stopped: {err}", file=sys.stderr)
        sys.exit(1)
    except Interrupted as err:
        print(f"glmae: {err}", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
