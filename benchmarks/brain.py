"""Brain tumour segmentation on synthetic MRI: pre-training against scratch, and CT -> MRI transfer.

The brain phantoms of `glmae synth --kind brain` (4 sequences, MSD Task01 labels) are segmented into
the BraTS regions WT, TC and ET (sigmoid outputs, `method.brats_regions`) by six arms, each
fine-tuned end to end on 25% of the labelled training cases:

- UNETR (`unetr_brats_tiny`, the tiny ViT) from scratch, from MAE3D (`mae3d_brats_tiny`) and from
  GL-MAE (`glmae_brats_tiny`), both pre-trained on the unlabelled brain pool;
- UNETR from GL-MAE pre-trained on abdominal CT phantoms (`glmae_phantom`, one channel), its patch
  embedding adapted to the four MRI channels by `--init-channels average`: GL-MAE's Table 3 transfer;
- Swin-UNETR (`swin_unetr_brats_tiny`) from scratch and from GMIM (`gmim_brats_tiny`): GMIM's own
  network, so it is compared with a scratch Swin-UNETR, not with UNETR.

Every pre-training gets the same number of steps on the same number of unlabelled volumes. The
protocol is `protocol.py`'s: four disjoint sets of brain phantoms (pre-training pool, labelled
training, validation, test); each cell picks its best checkpoint on validation mean Dice and is
scored once on test with that checkpoint and with its last one: Dice and HD95 (mm, MONAI's, null
when a prediction or reference is empty and left out of means) per region. A seed fixes the labelled
subset and the initialisation; pre-training runs once, so the intervals cover fine-tuning's
variation. Comparisons are seed-paired with 95% t-intervals; nothing is said to help unless its
interval excludes 0.

The setting was fixed before any result of it was seen; its numbers and reasons are in SETTINGS.
Resumable: every cell is a run_stage under --work (recomputed if its inputs change).

    python benchmarks/brain.py --jobs 2              # full: about 80 min on 2 cores
    python benchmarks/brain.py --setting smoke       # about a minute, for the test suite
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from protocol import (
    arguments,
    comparison_cells,
    finished_test_scores,
    paired,
    run_cells,
    run_stamp,
    spread,
    test_scores,
    verdict,
    whole_run,
)
from provenance import closing_lines, command, commit, machine

from glmae.engine.run import run_stage
from glmae.synth.brain import FOV_MM
from glmae.synth.study import write_study

REGIONS = ("WT", "TC", "ET")
# arm -> (pre-training config or None, fine-tuning config)
ARMS = {
    "scratch": (None, "unetr_brats_tiny"),
    "mae3d": ("mae3d_brats_tiny", "unetr_brats_tiny"),
    "glmae": ("glmae_brats_tiny", "unetr_brats_tiny"),
    "glmae_ct": ("glmae_phantom", "unetr_brats_tiny"),
    "scratch_swin": (None, "swin_unetr_brats_tiny"),
    "gmim": ("gmim_brats_tiny", "swin_unetr_brats_tiny"),
}
NAMES = {"scratch": "UNETR, scratch", "mae3d": "UNETR from MAE3D", "glmae": "UNETR from GL-MAE",
         "glmae_ct": "UNETR from GL-MAE on CT", "scratch_swin": "Swin-UNETR, scratch", "gmim": "Swin-UNETR from GMIM"}
PRETRAIN_ORDER = ("gmim", "glmae", "glmae_ct", "mae3d")  # the longest first, so that two workers end together
# (a, b): each pre-training against the scratch of its network, GL-MAE against MAE3D, and the
# transfer against pre-training on the target modality
VERSUS = [("mae3d", "scratch"), ("glmae", "scratch"), ("glmae_ct", "scratch"), ("gmim", "scratch_swin"),
          ("glmae", "mae3d"), ("glmae_ct", "glmae")]


@dataclass(frozen=True)
class Setting:
    pool: int  # unlabelled brain phantoms for pre-training (and as many abdominal ones for the CT arm)
    train: int  # labelled training phantoms (100%)
    val: int  # validation phantoms: they pick each cell's best checkpoint
    test: int  # test phantoms: scored once per cell
    shape: tuple[int, int, int]  # phantom grid; (64, 64, 48) is 2 mm, the *_brats_tiny spacing
    pretrain_steps: int
    finetune_steps: int
    val_every: int
    seeds: tuple[int, ...]
    fraction: float  # of the labelled training phantoms
    arms: tuple[str, ...] = tuple(ARMS)
    pretrain_set: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)  # arm -> overrides
    finetune_set: tuple[str, ...] = ()


# Full, fixed on 2026-12-07 before any run of it. 8 labelled phantoms, so 25% is 2 (one tumour is too
# few to learn three nested regions from); 4 validation phantoms pick checkpoints and 8 test phantoms
# score. The phantoms are drawn at 2 mm (64x64x48), the grid of the *_brats_tiny configs, so nothing
# is resampled. 1500 pre-training steps per method on 32 unlabelled brains (and 32 abdominal CT
# phantoms for the transfer arm, pre-trained at glmae_phantom's abdominal scale, its tokens 4x4x6 mm
# apart: the transfer crosses voxel sizes too, as the paper's does). Measured on one thread (CPU time,
# the machine shared): a pre-training step of MAE3D 0.1 s, GL-MAE 0.3-0.4 s, GMIM 0.5 s, so ~18 min
# for the four, two side by side, the longest first; a fine-tuning step of UNETR 0.7 s, Swin-UNETR
# 1.1 s, plus ~20 s a cell for start, validations and test scoring (a 20-step cell of the full
# setting: UNETR 45 s of CPU with the cache cold, Swin-UNETR 39 s warm). A scratch UNETR reached test
# mean Dice 0.72 in those 20 steps, so 250 steps (validated every 50) leave room to converge, and
# compute goes to seeds: 5, as the label-efficiency benchmark, not the 3 the issue asks at least. 6 arms
# x 5 seeds = 30 cells of ~3.5 (UNETR) and ~5 min (Swin-UNETR), ~60 min two by two: ~80 min in all.
SETTINGS = {
    "full": Setting(pool=32, train=8, val=4, test=8, shape=(64, 64, 48), pretrain_steps=1500, finetune_steps=250,
                    val_every=50, seeds=(0, 1, 2, 3, 4), fraction=0.25),
    # one arm of each kind of path: UNETR from scratch and from a CT encoder adapted to 4 channels,
    # Swin-UNETR from scratch and from GMIM
    "smoke": Setting(
        pool=2, train=2, val=1, test=1, shape=(32, 32, 24), pretrain_steps=2, finetune_steps=2, val_every=2,
        seeds=(0,), fraction=0.5, arms=("scratch", "glmae_ct", "scratch_swin", "gmim"),
        pretrain_set={
            "glmae_ct": ("data.num_workers=0", "data.spacing=[6,6,8]", "method.global_size=[32,32,24]",
                         "method.local_size=[16,16,8]", "method.n_local=2"),
            "gmim": ("data.num_workers=0", "data.spacing=[4,4,4]"),
        },
        finetune_set=("data.num_workers=0", "data.spacing=[4,4,4]", "train.log_every=1"),
    ),
}


def write_data(work: Path, s: Setting) -> tuple[Path, Path, Path]:
    """The brain study (`pretrain.json`, `finetune.json`) and, for the transfer arm, a folder of
    abdominal CT phantoms."""
    from glmae.synth import write_dataset

    pool, data = write_study(work / "data", s.pool, s.train, s.val, s.test, s.shape, kind="brain")
    ct = write_dataset(work / "ct", cases=max(s.pool, 1), shape=s.shape) if "glmae_ct" in s.arms else None
    return pool, data, ct


def pretrain_cell(arm: str, s: Setting, data: Path, work: Path) -> Path:
    from glmae.config import load_config
    from glmae.pretrain import pretrain

    run = work / "pretrain" / arm
    cfg = load_config(ARMS[arm][0], [*s.pretrain_set.get(arm, ()), f"train.max_steps={s.pretrain_steps}",
                                     "train.epochs=0"])
    run_stage("pretrain", run, pretrain, cfg, str(data))
    return run / "encoder.safetensors"


def cell_dir(work: Path, arm: str, seed: int) -> Path:
    return work / "finetune" / f"{arm}_seed{seed}"


def finetune_setup(arm: str, seed: int, s: Setting, work: Path, encoders: dict):
    """(folder, config, run_stage options) of one fine-tuning cell."""
    from glmae.config import load_config

    cfg = load_config(ARMS[arm][1], [*s.finetune_set, f"train.max_steps={s.finetune_steps}", "train.epochs=0",
                                     f"train.val_every={s.val_every}", f"train.seed={seed}"])
    options = {"init": str(encoders.get(arm, "none")), "mode": "e2e", "label_fraction": s.fraction, "split_seed": seed}
    return cell_dir(work, arm, seed), cfg, options


def finetune_cell(arm: str, seed: int, s: Setting, data: Path, work: Path, encoders: dict) -> dict:
    """Test scores ({"best", "last"}) of one fine-tuning."""
    from glmae.finetune import finetune

    run, cfg, options = finetune_setup(arm, seed, s, work, encoders)
    run_stage("finetune", run, finetune, cfg, str(data), **options)
    return test_scores(run, str(data))


def encoder_paths(s: Setting, work: Path) -> dict:
    return {arm: work / "pretrain" / arm / "encoder.safetensors" for arm in s.arms if ARMS[arm][0]}


def done_scores(key: tuple, s: Setting, work: Path) -> dict | None:
    """For --report-only: a cell's test scores if it finished with this setting (config, data set,
    pre-trained encoder, options), else None."""
    run, cfg, options = finetune_setup(*key, s, work, encoder_paths(s, work))
    return finished_test_scores(run, cfg, work / "data" / "finetune.json", options)


def _mean(values: list) -> dict | None:
    """spread() of the defined values (HD95 is None where a mask was empty), with their count."""
    defined = [v for v in values if v is not None]
    return {**spread(defined), "n": len(defined)} if defined else None


def summarise(scores: dict, which: str) -> list[dict]:
    """{arm: {seed: {"best", "last"}}} -> one row per arm: test Dice and HD95 per region and their
    means over the regions, mean ± std over seeds, of the `which` checkpoint."""
    rows = []
    for arm in (a for a in ARMS if a in scores):
        by_seed = [scores[arm][seed][which] for seed in sorted(scores[arm])]
        rows.append({
            "arm": arm, "checkpoint": which, "split": "test", "seeds": sorted(int(s) for s in scores[arm]),
            "dice": {r: _mean([m["per_class"][r] for m in by_seed]) for r in REGIONS},
            "hd95": {r: _mean([m["per_class_hd95"][r] for m in by_seed]) for r in REGIONS},
            "mean_dice": _mean([m["mean_dice"] for m in by_seed]),
            "mean_hd95": _mean([m["mean_hd95"] for m in by_seed]),
            "values": [m["mean_dice"] for m in by_seed],
        })
    return rows


def comparisons(scores: dict, which: str) -> list[dict]:
    """Seed-paired a − b of test mean Dice, and b − a of mean HD95 (its reduction), for `VERSUS`."""
    out = []
    for metric, sign in (("mean_dice", 1), ("mean_hd95", -1)):
        values = {arm: {seed: v[which][metric] for seed, v in by_seed.items() if v[which][metric] is not None}
                  for arm, by_seed in scores.items()}
        for a, b in VERSUS:
            if a in values and b in values:
                c = paired(values[a], values[b]) if sign > 0 else paired(values[b], values[a])
                if c is not None:
                    out.append({"a": a, "b": b, "metric": metric, "checkpoint": which,
                                **{k: c[k] for k in ("diff_mean", "ci95", "n_seeds", "n_favour", "seeds", "values")},
                                "verdict": verdict(c)})
    return out


def _cell(m: dict | None, scale: float = 1.0, digits: int = 3) -> str:
    return "–" if m is None else f"{scale * m['mean']:.{digits}f} ± {scale * m['std']:.{digits}f}"


def table(rows: list[dict]) -> list[str]:
    lines = ["| arm | " + " | ".join(f"Dice {r}" for r in REGIONS) + " | mean Dice | "
             + " | ".join(f"HD95 {r} (mm)" for r in REGIONS) + " | mean HD95 (mm) |",
             "|---|" + "---:|" * (2 * len(REGIONS) + 2)]
    for row in rows:
        lines.append(f"| {NAMES[row['arm']]} | " + " | ".join(_cell(row["dice"][r]) for r in REGIONS)
                     + f" | {_cell(row['mean_dice'])} | " + " | ".join(_cell(row["hd95"][r], digits=1) for r in REGIONS)
                     + f" | {_cell(row['mean_hd95'], digits=1)} |")
    return lines


def comparison_lines(comps: list[dict]) -> list[str]:
    lines = ["| comparison | metric | checkpoint | mean difference | 95% CI | seeds favouring | verdict |",
             "|---|---|---|---:|---|---:|---|"]
    for c in comps:
        digits = 3 if c["metric"] == "mean_dice" else 2
        what = "Dice, a − b" if c["metric"] == "mean_dice" else "HD95 reduction (mm), b − a"
        lines.append(f"| {NAMES[c['a']]} − {NAMES[c['b']]} | {what} | {c['checkpoint']} | "
                     + comparison_cells(c, digits))
    return lines


def plot(rows: list[dict], path: Path) -> None:
    """Dice and HD95 per region for every arm: the mean over seeds (bars) and each seed (dots)."""
    from glmae import figures

    plt = figures.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    width = 0.8 / max(len(rows), 1)
    for i, row in enumerate(rows):
        for ax, key in zip(axes, ("dice", "hd95")):
            x = np.arange(len(REGIONS)) + (i - (len(rows) - 1) / 2) * width
            means = [row[key][r]["mean"] if row[key][r] else np.nan for r in REGIONS]
            ax.bar(x, means, width, color=f"C{i}", label=NAMES[row["arm"]], alpha=0.8)
    for ax, label in zip(axes, ("test Dice", "test HD95 (mm)")):
        ax.set_xticks(np.arange(len(REGIONS)), REGIONS)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylim(0, 1)
    axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle("Brain phantoms, 25% labels: mean over seeds (best checkpoint on validation)", fontsize=9)
    fig.tight_layout()
    figures.save(fig, path)
    plt.close(fig)


def main(argv=None) -> dict:
    p = arguments(__doc__, "brain", SETTINGS, report_only=True)
    args = p.parse_args(argv)
    s = SETTINGS[args.setting]
    made_from, cmd = commit(), command(__file__, argv)  # the code as it was when the run started
    planned = [(arm, seed) for seed in s.seeds for arm in s.arms]  # seeds outermost
    scores: dict = {}  # arm -> {seed: {"best", "last"}}
    setting = {"setting": args.setting, **dataclasses.asdict(s)}
    with whole_run(args.work, setting, made_from, cmd, record=not args.report_only) as invocations:
        if args.report_only:
            finished = [(k, v) for k in planned if (v := done_scores(k, s, args.work)) is not None]
        else:
            pool, data, ct = write_data(args.work, s)
            pretrain = [(("pretrain", arm), pretrain_cell, (arm, s, ct if arm == "glmae_ct" else pool, args.work))
                        for arm in PRETRAIN_ORDER if arm in s.arms]
            encoders = {key[1]: path for key, path in run_cells(pretrain, args.jobs, args.work)}
            finished = run_cells([(k, finetune_cell, (*k, s, data, args.work, encoders)) for k in planned], args.jobs,
                                 args.work)
        for (arm, seed), result in finished:
            scores.setdefault(arm, {})[seed] = result
            best = result["best"]
            hd95 = "undefined" if best["mean_hd95"] is None else f"{best['mean_hd95']:.2f} mm"
            print(f"{arm} seed {seed}: test mean Dice {best['mean_dice']:.4f}, HD95 {hd95} (best), "
                  f"Dice {result['last']['mean_dice']:.4f} (last)", flush=True)
    n_done = sum(len(v) for v in scores.values())
    rows, rows_last = summarise(scores, "best"), summarise(scores, "last")
    result = {
        "setting": args.setting, "config": dataclasses.asdict(s), "complete": n_done == len(planned),
        "cells_done": n_done, "cells_planned": len(planned), "command": cmd, "machine": machine(),
        **run_stamp(invocations, made_from),  # commit, wall_minutes: of every invocation of this run
        "results": rows, "results_last": rows_last,
        "comparisons": comparisons(scores, "best"), "comparisons_last": comparisons(scores, "last"),
    }
    args.results.mkdir(parents=True, exist_ok=True)
    stem = args.results / ("brain" if args.setting == "full" else f"brain_{args.setting}")
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, stem.with_suffix(".png"))
    partial = [] if result["complete"] else [
        f"**PARTIAL: {n_done} of {len(planned)} cells done** (`--report-only` of an unfinished run).", ""]
    spacing = "x".join(f"{f / n:g}" for f, n in zip(FOV_MM, s.shape))
    lines = [
        "# Brain tumour segmentation on synthetic MRI: pre-training and CT → MRI transfer",
        "",
        *partial,
        f"Test Dice and HD95 per BraTS region (WT whole tumour, TC tumour core, ET enhancing tumour) on "
        f"{s.test} test brain phantoms that nothing was chosen on, mean ± std over seeds {list(s.seeds)} (a seed "
        f"fixes the labelled subset and the initialisation; HD95 over the seeds where it is defined). "
        f"{s.fraction:.0%} of {s.train} labelled phantoms train each cell for {s.finetune_steps} steps; {s.val} "
        f"validation phantoms pick its best checkpoint; every pre-training ran {s.pretrain_steps} steps on {s.pool} "
        f"unlabelled phantoms, brains or (the transfer arm, `glmae_phantom`) abdominal CT; "
        f"{'x'.join(map(str, s.shape))} voxels of {spacing} mm.",
        "",
        "Best checkpoint on validation:",
        "",
        *table(rows),
        "",
        "Last checkpoint (no selection at all):",
        "",
        *table(rows_last),
        "",
        f"![Dice and HD95 per region]({stem.with_suffix('.png').name})",
        "",
        "Differences paired by seed, with 95% t-intervals; \"helps\" only when the interval excludes 0 (for "
        "HD95 the reduction, so positive is better):",
        "",
        *comparison_lines(result["comparisons"] + result["comparisons_last"]),
        "",
        *closing_lines(result),
        f"Invocations of this run: {len(invocations)} (each listed in `invocations.json` of its --work folder).",
        "",
    ]
    stem.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
