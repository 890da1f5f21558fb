"""`glmae demo`: the whole story on built-in phantoms, in one command.

1. Synthesise phantoms in four disjoint sets (`glmae.synth.study`): an unlabelled pre-training
   pool, a few labelled training cases, validation cases and test cases (datalists `pretrain.json`
   and `finetune.json` beside the images). `kind` abdomen: CT with 13 organs; brain: 4-channel MRI
   with tumours, segmented into the BraTS regions WT, TC, ET (sigmoid outputs).
2. Pre-train GL-MAE on the pool (labels never read).
3. Fine-tune UNETR from the GL-MAE encoder and from scratch, with the same few labels and the same
   budget; each keeps its best checkpoint on the validation cases.
4. Evaluate both once on the test cases, with the best checkpoint and with the last one (which
   involves no selection at all); predict one test case with both.
5. Write `report.md`: Dice and HD95 per organ (or region) for both, pre-training curves,
   reconstructions, a bar chart of Dice and prediction overlays.

Training stages are keyed by a digest of their config and data (`glmae.engine.run.run_stage`):
finished ones are reused only for the same setting and an interrupted one resumes, so re-running
the same command after an interruption finishes the demo.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from glmae.engine.checkpoint import atomic_write
from glmae.engine.logger import read_log, shared_progress
from glmae.engine.run import run_stage
from glmae.errors import InputError
from glmae.synth.study import write_study


@dataclass(frozen=True)
class Plan:
    """Sizes and budgets of a demo run."""

    pool: int  # unlabelled pre-training cases
    train: int  # labelled fine-tuning cases
    val: int  # validation cases: they pick each fine-tuning's best checkpoint
    test: int  # held-out test cases: reported, never chosen on
    shape: tuple[int, int, int]  # phantom shape: 64 x 64 x 48 is the tiny configs' 3 x 3 x 4 mm
    pretrain_steps: int
    finetune_steps: int
    validations: int = 4  # validations during each fine-tuning (the best checkpoint is evaluated)
    seed: int = 0
    pretrain_config: str = "glmae_phantom"
    finetune_config: str = "unetr_phantom"
    pretrain_set: tuple[str, ...] = ()  # --set overrides of the pre-training config
    finetune_set: tuple[str, ...] = ()  # --set overrides of the fine-tuning config
    kind: str = "abdomen"  # phantoms of `glmae synth --kind`: abdomen | brain


# Pre-training and fine-tuning at the phantom scale (configs `glmae_phantom`, `unetr_phantom`).
# Measured (2 cores): --quick 1.9 min, full 11.2 min.
QUICK = Plan(pool=16, train=3, val=2, test=4, shape=(64, 64, 48), pretrain_steps=100, finetune_steps=110)
FULL = Plan(pool=48, train=4, val=4, test=8, shape=(64, 64, 48), pretrain_steps=1200, finetune_steps=600, validations=6)
# Brain MRI phantoms drawn at 2 mm, the grid of `glmae_brats_tiny` and `unetr_brats_tiny` (WT/TC/ET
# regions); a fine-tuning step costs about what one of the abdominal plans does.
BRAIN = dict(kind="brain", shape=(64, 64, 48), pretrain_config="glmae_brats_tiny", finetune_config="unetr_brats_tiny")
BRAIN_QUICK = Plan(pool=12, train=3, val=2, test=3, pretrain_steps=100, finetune_steps=110, **BRAIN)
BRAIN_FULL = Plan(pool=32, train=4, val=4, test=8, pretrain_steps=1200, finetune_steps=600, validations=6, **BRAIN)
PLANS = {("abdomen", False): FULL, ("abdomen", True): QUICK, ("brain", False): BRAIN_FULL, ("brain", True): BRAIN_QUICK}
# per kind: what the phantoms are, what a class is called
KINDS = {"abdomen": ("abdominal CT phantoms", "organ"),
         "brain": ("brain MRI phantoms (FLAIR, T1, T1ce, T2) with tumours, segmented into the BraTS regions WT "
                   "(whole tumour), TC (tumour core) and ET (enhancing tumour)", "region")}


def _dice_table(metrics: dict[str, dict], unit: str = "organ") -> list[str]:
    """Dice of each model per class, their difference, and each model's HD95 (mm; – where undefined)."""
    names = list(next(iter(metrics.values()))["per_class"])
    methods = list(metrics)
    lines = [f"| {unit} | " + " | ".join(methods) + " | difference | "
             + " | ".join(f"HD95 {m} (mm)" for m in methods) + " |", "|---|" + "---:|" * (2 * len(methods) + 1)]
    rows = [(name, [metrics[m]["per_class"][name] for m in methods],
             [metrics[m]["per_class_hd95"][name] for m in methods]) for name in names]
    rows.append(("**mean**", [metrics[m]["mean_dice"] for m in methods], [metrics[m]["mean_hd95"] for m in methods]))
    for name, values, hd95 in rows:
        cells = " | ".join(f"{v:.3f}" for v in values)
        mm = " | ".join("–" if v is None else f"{v:.1f}" for v in hd95)
        lines.append(f"| {name} | {cells} | {values[-1] - values[0]:+.3f} | {mm} |")
    return lines


def _figures(out: Path, metrics: dict, runs: dict[str, Path], pretrain_run: Path, data: Path,
             unit: str = "organ") -> dict[str, str]:
    """The report's figures (paths relative to `out`)."""
    import torch

    from glmae.data.formats import load_dataset
    from glmae.data.preprocess import Preprocessor
    from glmae.engine.distributed import pick_device
    from glmae.engine.precision import amp_dtype
    from glmae.engine.run import load_finetuned
    from glmae.figures import curves_figure, grouped_bar_figure, overlays_figure
    from glmae.methods.segmentation import decode_logits, infer, label_map

    fig_dir = out / "figures"
    figs = {}
    log = read_log(pretrain_run / "log.jsonl")
    keys = ["loss_rec_global", "loss_rec_local", "loss_cons_g2g", "loss_cons_l2g"]
    series = {k: ([r["step"] for r in log if k in r], [r[k] for r in log if k in r]) for k in keys}
    curves_figure({k: v for k, v in series.items() if v[0]}, fig_dir / "pretrain_losses.png",
                  title="GL-MAE pre-training losses", ylabel="loss")
    figs["losses"] = "figures/pretrain_losses.png"
    entropy = [(r["step"], r["teacher_entropy"]) for r in log if "teacher_entropy" in r]
    if entropy:
        curves_figure({"teacher entropy": tuple(zip(*entropy))}, fig_dir / "teacher_entropy.png",
                      title="Teacher output entropy (0 or log K would mean collapse)", ylabel="nats")
        figs["entropy"] = "figures/teacher_entropy.png"
    recon = sorted((pretrain_run / "figures").glob("recon_*.png"))
    if recon:
        shutil.copy(recon[-1], fig_dir / "reconstruction.png")
        figs["recon"] = "figures/reconstruction.png"
    per_class = {name: m["per_class"] for name, m in metrics.items()}
    grouped_bar_figure(per_class, fig_dir / f"dice_per_{unit}.png", title=f"Dice per {unit} on the test cases",
                       ylabel="Dice")
    figs["bars"] = f"figures/dice_per_{unit}.png"

    # one test case predicted by both models, beside its ground truth (over the first channel: FLAIR for brains)
    dataset = load_dataset(data)
    case = dataset.split("test")[0]
    maps = {}
    image = None
    for name, run in runs.items():
        cfg, model = load_finetuned(run / "checkpoints" / "best.pt")
        device = pick_device(cfg.train.device)
        volume = Preprocessor(cfg.data, dataset.modalities)(case, with_label=True)
        with torch.inference_mode():
            logits = infer(model.net.to(device), volume.image, cfg.method, device, amp_dtype(cfg.train.amp, device))
        maps[name] = label_map(decode_logits(logits, cfg.method).numpy(), cfg.method)
        image, truth = np.asarray(volume.image[0]), np.asarray(volume.label)
    overlays_figure(image, {"ground truth": truth, **maps}, fig_dir / "prediction.png", title=case.id)
    figs["overlay"] = "figures/prediction.png"
    return figs


def write_report(out: Path, plan: Plan, metrics: dict, last: dict, figs: dict, seconds: float) -> Path:
    from glmae.synth import abdomen, brain

    fov = brain.FOV_MM if plan.kind == "brain" else (abdomen.FOV_MM,) * 3
    spacing = "x".join(f"{f / n:g}" for f, n in zip(fov, plan.shape))
    what, unit = KINDS[plan.kind]
    lines = [
        "# glmae demo: does GL-MAE pre-training help with few labels?",
        "",
        f"Synthetic {what} ({plan.shape[0]}x{plan.shape[1]}x{plan.shape[2]} voxels, {spacing} mm): "
        f"{plan.pool} unlabelled cases for pre-training, {plan.train} labelled cases for fine-tuning, "
        f"{plan.val} validation cases that pick each fine-tuning's best checkpoint, {plan.test} held-out test "
        f"cases that nothing was chosen on. GL-MAE (`{plan.pretrain_config}`) pre-trained for "
        f"{plan.pretrain_steps} steps; UNETR (`{plan.finetune_config}`) fine-tuned for {plan.finetune_steps} "
        f"steps from the GL-MAE encoder and from scratch, with the same labels and budget. "
        f"Wall time {seconds / 60:.1f} min.",
        "",
        "## Dice and HD95 on the test cases",
        "",
        "Best checkpoint on the validation cases:",
        "",
        *_dice_table(metrics, unit),
        "",
        "Last checkpoint (no selection at all), mean Dice: "
        + ", ".join(f"{name} {m['mean_dice']:.3f}" for name, m in last.items()) + ".",
        "",
        f"![Dice per {unit}]({figs['bars']})",
        "",
        "## Predictions on a test case",
        "",
        f"![prediction overlays]({figs['overlay']})",
        "",
        "## Pre-training",
        "",
        f"![pre-training losses]({figs['losses']})",
        "",
    ]
    if "entropy" in figs:
        lines += [f"![teacher entropy]({figs['entropy']})", ""]
    if "recon" in figs:
        lines += ["Masked reconstruction of a global and a local view at the end of pre-training:", "",
                  f"![reconstruction]({figs['recon']})", ""]
    lines += [
        "## Reproduce",
        "",
        "    glmae demo --out RUN" + (" --kind brain" if plan.kind == "brain" else "")
        + (" --quick" if plan in (QUICK, BRAIN_QUICK) else ""),
        "",
        "Run folders: `pretrain/`, `finetune_glmae/`, `finetune_scratch/` (configs, logs, TensorBoard, "
        "checkpoints); test metrics: `metrics_*.json` (best checkpoint), `metrics_*_last.json`.",
        "",
    ]
    path = out / "report.md"
    text = "\n".join(lines).encode()
    atomic_write(path, lambda f: f.write(text))
    return path


def demo(out: str | Path, quick: bool = False, plan: Plan | None = None, kind: str = "abdomen") -> Path:
    """Run the demo into `out` on phantoms of `kind` (or on `plan`); returns the path of `report.md`."""
    from glmae.config import load_config
    from glmae.evaluate import evaluate
    from glmae.finetune import finetune
    from glmae.pretrain import pretrain

    if plan is None and kind not in KINDS:
        raise InputError(f"--kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    plan = plan or PLANS[kind, quick]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    stages = ["synthesise phantoms", "pre-train GL-MAE", "fine-tune from GL-MAE", "fine-tune from scratch",
              "evaluate", "report"]
    runs = {"scratch": out / "finetune_scratch", "GL-MAE": out / "finetune_glmae"}
    with shared_progress() as progress:
        task = progress.add_task(stages[0], total=len(stages), status="", speed="") if progress else None

        def stage(i: int) -> None:
            if progress is not None:
                progress.update(task, completed=i, description=f"demo: {stages[i]}")
            else:
                print(f"demo [{i + 1}/{len(stages)}] {stages[i]}", flush=True)

        stage(0)
        pool, labelled = write_study(out / "data", plan.pool, plan.train, plan.val, plan.test, plan.shape, plan.seed,
                                     kind=plan.kind)
        stage(1)
        pre_cfg = load_config(plan.pretrain_config, [*plan.pretrain_set, f"train.max_steps={plan.pretrain_steps}"])
        run_stage("pretrain", out / "pretrain", pretrain, pre_cfg, str(pool))
        ft_cfg = load_config(
            plan.finetune_config,
            [*plan.finetune_set, f"train.max_steps={plan.finetune_steps}",
             f"train.val_every={max(1, plan.finetune_steps // plan.validations)}"],
        )
        for i, (name, init) in enumerate(
            [("GL-MAE", str(out / "pretrain" / "encoder.safetensors")), ("scratch", "none")], start=2
        ):
            stage(i)
            run_stage("finetune", runs[name], finetune, ft_cfg, str(labelled), init=init, mode="e2e",
                      label_fraction=1.0, split_seed=plan.seed)
        stage(4)

        def test_scores(which: str, suffix: str) -> dict:
            """Each fine-tuning's `which` checkpoint evaluated once on the test cases."""
            return {name: evaluate(run / "checkpoints" / f"{which}.pt", str(labelled),
                                   out / f"metrics_{run.name[9:]}{suffix}.json", split="test")
                    for name, run in runs.items()}

        metrics, last = test_scores("best", ""), test_scores("last", "_last")
        stage(5)
        figs = _figures(out, metrics, runs, out / "pretrain", labelled, KINDS[plan.kind][1])
        report = write_report(out, plan, metrics, last, figs, time.time() - start)
        if progress is not None:
            progress.update(task, completed=len(stages), description="demo: done")
    print(f"report: {report}")
    return report
