"""Why don't pre-trained encoders beat random initialisation? Probes of the frozen features and
fine-tuning recipes that keep them.

Three encoders, all the tiny ViT of `unetr_phantom`: random (what fine-tuning from scratch starts
from), MAE3D (`mae3d_phantom`) and GL-MAE (`glmae_phantom`), each pre-trained once on the unlabelled
pool for the same number of steps, as in label_efficiency.py (at the fine-tuning scale). Each is
measured at 25% of the labelled training phantoms in five columns:

- probe: the frozen encoder's features, read by a linear head (`glmae.methods.probe.probe_dice`,
  the online probe's: a 1x1x1 convolution, its logits upsampled to the voxels) fitted for a fixed
  number of full-batch steps on centre crops of the labelled training phantoms, and scored by Dice
  pooled over centre crops of the test phantoms (a crop of the ROI, 48x48x32 at 4x4x6 mm, is the
  whole phantom). Nothing is chosen in a probe, so it is scored on test once. Whether pre-training
  put anything into the features that a random ViT lacks;
- linear: UNETR with the ViT frozen and its convolutional decoder trained (`--mode linear`, lr
  1e-2, as label_efficiency.py);
- as_is: end to end with `unetr_phantom` as it is: lr 1e-2 with layer decay 0.6 (the ViT's blocks
  at 0.6-0.05x the decoder's rate), calibrated for scratch training in 400 steps and suspected of
  washing pre-trained features out;
- low_encoder_lr: end to end with layer decay 0.3, which keeps the pre-trained features: the ViT's
  last block at 0.3x the decoder's rate, its first at 7e-4x;
- frozen_warmup: end to end with the encoder frozen for the first steps while the randomly
  initialised decoder learns to read it (`method.freeze_encoder_steps`, LP-FT), then trained with
  the rest at `unetr_phantom`'s rates.

The protocol is `protocol.py`'s: four disjoint sets of phantoms (pre-training pool, labelled
training, validation, test); each fine-tuning picks its best checkpoint on validation only and is
scored once on test with that checkpoint and with its last one (mean Dice over the 13 organs). A
seed fixes the labelled subset and the initialisation (the decoder's, the random ViT's, the probe's
head); pre-training runs once, so the intervals cover what varies with the seed. Comparisons are
each pre-trained encoder minus random in each column, paired by seed, with 95% t-intervals; nothing
is said to help unless its interval excludes 0.

The setting was fixed before any run of it; its numbers and reasons are in SETTINGS. Resumable:
every cell is a run_stage under --work (recomputed if its inputs change); --report-only summarises
the cells of this setting done so far (marked PARTIAL).

    python benchmarks/pretraining_payoff.py --jobs 2              # full: about 3 hours on 2 cores (measured)
    python benchmarks/pretraining_payoff.py --setting smoke       # about a minute, for the test suite
"""

from __future__ import annotations

import dataclasses
import json
import textwrap
from dataclasses import dataclass
from pathlib import Path

from protocol import (
    arguments,
    comparison_cells,
    finished,
    paired,
    run_cells,
    run_stamp,
    spread,
    test_scores,
    verdict,
    whole_run,
)
from provenance import closing_lines, command, commit, machine, write

from glmae.engine.run import run_stage
from glmae.synth.study import write_study

# encoder -> its pre-training config (the tiny ViT of FINETUNE, at the fine-tuning scale); random: none
CONFIGS = {"random": None, "mae3d": "mae3d_phantom", "glmae": "glmae_phantom"}
FINETUNE = "unetr_phantom"
NAMES = {"random": "random (scratch)", "mae3d": "MAE3D", "glmae": "GL-MAE"}
COLUMNS = ("probe", "linear", "as_is", "low_encoder_lr", "frozen_warmup")
LOW_DECAY = 0.3  # low_encoder_lr's optim.layer_decay


@dataclass(frozen=True)
class Setting:
    pool: int  # unlabelled pre-training phantoms
    train: int  # labelled training phantoms (100%)
    val: int  # validation phantoms: they pick each fine-tuning's best checkpoint
    test: int  # test phantoms: scored once per cell
    shape: tuple[int, int, int]
    pretrain_steps: int
    finetune_steps: int
    val_every: int
    probe_steps: int  # full-batch steps of the probe's linear head
    freeze_steps: int  # frozen_warmup: fine-tuning steps with the encoder frozen
    seeds: tuple[int, ...]
    fraction: float  # of the labelled training phantoms
    encoders: tuple[str, ...] = tuple(CONFIGS)
    columns: tuple[str, ...] = COLUMNS
    pretrain_set: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)  # encoder -> overrides
    finetune_set: tuple[str, ...] = ()  # for fine-tunings and probes


# Full, fixed on 2026-12-07 before any run of it. label_efficiency.py's phantoms, pre-training and
# fine-tuning (same generator, sizes and seeds; 3000 pre-training steps on 48 unlabelled phantoms;
# 400 fine-tuning steps validated every 100; 4 labelled phantoms, so 25% is one; 4 validation and 8
# test phantoms), so that as_is repeats its 25% cells with these encoders; 5 seeds, as there. Probe:
# 300 full-batch Adam steps (lr 0.1), 3x the online probe's budget: on the random ViT at 25%, seeds
# 0 and 1, test Dice 0.057 / 0.063 at 100 steps, 0.062 / 0.055 at 300, 0.056 / 0.052 at 1000, so
# level by 100 and a margin for features that take longer; 5 s a probe. Frozen warm-up: a quarter of
# the run, the decoder 100 steps on its own (the lr warm-up's 20 among them), then 300 steps end to
# end from a cosine lr still at 89% of its peak. Measured in CPU time on one thread, the 2 cores
# shared with other runs (load 5): a fine-tuning step 0.73 s end to end, 0.65 s linear (the
# convolutional decoder dominates), 11 s a cell for start, 4 validations and 2 test scorings
# (label_efficiency.py measured 0.55-0.6 s a step, two cells side by side on an idle machine); a
# pre-training step of GL-MAE 0.30 s, MAE3D 0.10 s. So 3 encoders x 5 seeds x 4 fine-tunings = 60
# cells of 4-5 min (235-295 min of one core), the two pre-trainings (20 min, beside the random
# encoder's cells) and 15 probes (2 min): about 2-2.5 hours with --jobs 2 (the run took about 3).
SETTINGS = {
    "full": Setting(pool=48, train=4, val=4, test=8, shape=(64, 64, 48), pretrain_steps=3000, finetune_steps=400,
                    val_every=100, probe_steps=300, freeze_steps=100, seeds=(0, 1, 2, 3, 4), fraction=0.25),
    "smoke": Setting(
        pool=2, train=2, val=1, test=1, shape=(32, 32, 24), pretrain_steps=2, finetune_steps=2, val_every=1,
        probe_steps=2, freeze_steps=1, seeds=(0,), fraction=0.5,
        pretrain_set={
            "mae3d": ("data.spacing=[6.0,6.0,8.0]", "data.num_workers=0", "method.roi=[32,32,24]"),
            "glmae": ("data.spacing=[6.0,6.0,8.0]", "data.num_workers=0", "method.global_size=[32,32,32]",
                      "method.local_size=[16,16,16]", "method.n_local=2"),
        },
        finetune_set=("data.spacing=[6.0,6.0,8.0]", "data.num_workers=0", "method.roi=[32,32,24]"),
    ),
}


def pretrain_cell(encoder: str, s: Setting, pool: Path, work: Path) -> Path:
    from glmae.config import load_config
    from glmae.pretrain import pretrain

    run = work / "pretrain" / encoder
    cfg = load_config(CONFIGS[encoder], [*s.pretrain_set.get(encoder, ()), f"train.max_steps={s.pretrain_steps}",
                                         "train.epochs=0"])
    run_stage("pretrain", run, pretrain, cfg, str(pool))
    return run / "encoder.safetensors"


def probe(cfg, data: str, out: Path, init: str, label_fraction: float, split_seed: int, resume: bool = False) -> None:
    """A probe as a run_stage: the encoder (INIT, or with "none" the random ViT that fine-tuning
    from scratch starts from: same seed, same draws), frozen, read by a linear head fitted on centre
    crops of fine-tuning's labelled training phantoms (the same subset) and scored on crops of the
    test phantoms: OUT/metrics.json. Nothing to resume: a probe takes seconds."""
    import torch

    from glmae.data.formats import load_dataset
    from glmae.engine import distributed
    from glmae.engine.checkpoint import save_json
    from glmae.engine.run import load_volumes
    from glmae.finetune import load_init, make_splits, resolve
    from glmae.methods import FINETUNING
    from glmae.methods.probe import centre_crops, probe_dice
    from glmae.methods.segmentation import declared_values

    dataset = load_dataset(data)
    cfg = resolve(cfg, dataset, init, "e2e", label_fraction, split_seed, say=False)
    splits = make_splits(dataset, label_fraction, split_seed)
    env = distributed.init(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    net = FINETUNING[cfg.method.name](cfg.encoder, cfg.method).net
    if init != "none":
        print(load_init(net.encoder, cfg.method.init, cfg, say=False), flush=True)
    values = sorted(v for v in cfg.method.labels if v != 0)
    by_id = {c.id: c for c in dataset.cases}
    crops = {}
    for split in ("train", "test"):
        _, volumes = load_volumes(data, cfg, env, with_label=True, cases=[by_id[i] for i in splits[split]],
                                  label_values=declared_values(cfg.method))
        crops[split] = centre_crops(volumes, cfg.method.roi, values)
    metrics = probe_dice(net.encoder, crops["train"], crops["test"], len(values), cfg.train.probe_steps, env.device,
                         seed=cfg.train.seed)
    save_json({**metrics, "split": "test", "train": splits["train"], "test": splits["test"]}, out / "metrics.json")


def cell_dir(work: Path, encoder: str, column: str, seed: int) -> Path:
    return work / "cells" / f"{encoder}_{column}_seed{seed}"


def recipe(column: str, s: Setting) -> tuple[str, list[str]]:
    """(mode, config overrides) of a fine-tuning column."""
    return {"linear": ("linear", ["optim.lr=1e-2"]),  # the papers' linear-probing rate (unetr_phantom's lr)
            "as_is": ("e2e", []),
            "low_encoder_lr": ("e2e", [f"optim.layer_decay={LOW_DECAY}"]),
            "frozen_warmup": ("e2e", [f"method.freeze_encoder_steps={s.freeze_steps}"])}[column]


def cell_setup(encoder: str, column: str, seed: int, s: Setting, work: Path, encoders: dict):
    """(run_stage kind, function, folder, config, options) of one cell."""
    from glmae.config import load_config
    from glmae.finetune import finetune

    init = str(encoders[encoder]) if CONFIGS[encoder] else "none"
    options = {"init": init, "label_fraction": s.fraction, "split_seed": seed}
    if column == "probe":
        cfg = load_config(FINETUNE, [*s.finetune_set, f"train.seed={seed}", f"train.probe_steps={s.probe_steps}"])
        return "probe", probe, cell_dir(work, encoder, column, seed), cfg, options
    mode, overrides = recipe(column, s)
    cfg = load_config(FINETUNE, [*s.finetune_set, *overrides, f"train.max_steps={s.finetune_steps}", "train.epochs=0",
                                 f"train.val_every={s.val_every}", f"train.seed={seed}"])
    return "finetune", finetune, cell_dir(work, encoder, column, seed), cfg, {**options, "mode": mode}


def scores(kind: str, run: Path, data: Path) -> dict:
    """{checkpoint: test mean Dice} of a finished cell: a probe's one score ("none"), a fine-tuning's
    best and last checkpoints."""
    if kind == "probe":
        return {"none": json.loads((run / "metrics.json").read_text())["probe_dice"]}
    return {which: m["mean_dice"] for which, m in test_scores(run, str(data)).items()}


def cell(encoder: str, column: str, seed: int, s: Setting, data: Path, work: Path, encoders: dict) -> dict:
    kind, fn, run, cfg, options = cell_setup(encoder, column, seed, s, work, encoders)
    run_stage(kind, run, fn, cfg, str(data), **options)
    return scores(kind, run, data)


def encoder_paths(s: Setting, work: Path) -> dict:
    return {e: work / "pretrain" / e / "encoder.safetensors" for e in s.encoders if CONFIGS[e]}


def done_scores(key: tuple, s: Setting, work: Path) -> dict | None:
    """For --report-only: a cell's scores if it finished with this setting's inputs, else None."""
    data = work / "data" / "finetune.json"
    kind, _, run, cfg, options = cell_setup(*key, s, work, encoder_paths(s, work))
    tested = kind == "probe" or all((run / f"test_{w}.json").is_file() for w in ("best", "last"))
    return scores(kind, run, data) if tested and finished(kind, run, cfg, data, options) else None


def summarise(cells: dict) -> list[dict]:
    """{(encoder, column): {seed: test Dice}} -> rows of the table, in COLUMNS and encoder order."""
    order = {k: i for i, k in enumerate([*COLUMNS, *CONFIGS])}
    rows = []
    for (encoder, column), by_seed in sorted(cells.items(), key=lambda kv: (order[kv[0][1]], order[kv[0][0]])):
        seeds = sorted(by_seed)
        rows.append({"encoder": encoder, "column": column, "split": "test", **spread([by_seed[x] for x in seeds]),
                     "seeds": [int(x) for x in seeds], "values": [by_seed[x] for x in seeds]})
    return rows


def comparisons(cells: dict) -> list[dict]:
    """Each pre-trained encoder minus random in each column, paired by seed, with 95% t-intervals."""
    out = []
    for column in COLUMNS:
        for encoder in CONFIGS:
            if encoder != "random" and (encoder, column) in cells and ("random", column) in cells:
                c = paired(cells[encoder, column], cells["random", column])
                if c is not None:
                    out.append({"a": encoder, "b": "random", "column": column,
                                **{k: c[k] for k in ("diff_mean", "ci95", "n_seeds", "n_favour", "seeds", "values")},
                                "verdict": verdict(c)})
    return out


def headers(s: Setting) -> dict:
    return {"probe": "probe (frozen ViT, linear head)", "linear": "UNETR linear (frozen ViT)",
            "as_is": "e2e as is (layer decay 0.6)", "low_encoder_lr": f"e2e, layer decay {LOW_DECAY}",
            "frozen_warmup": f"e2e, encoder frozen {s.freeze_steps} steps"}


def table(rows: list[dict], s: Setting) -> list[str]:
    """Test Dice (%) per encoder (rows) and column, mean ± std over seeds."""
    columns = [c for c in COLUMNS if any(r["column"] == c for r in rows)]
    by = {(r["encoder"], r["column"]): r for r in rows}
    lines = ["| encoder | " + " | ".join(headers(s)[c] for c in columns) + " |", "|---|" + "---:|" * len(columns)]
    for encoder in (e for e in CONFIGS if any(r["encoder"] == e for r in rows)):
        cells = [by.get((encoder, c)) for c in columns]
        lines.append(f"| {NAMES[encoder]} | " + " | ".join(
            f"{100 * r['mean']:.1f} ± {100 * r['std']:.1f}" if r else "–" for r in cells) + " |")
    return lines


def comparison_lines(comps: list[dict], s: Setting) -> list[str]:
    lines = ["| comparison | column | mean difference (points) | 95% CI | seeds favouring | verdict |",
             "|---|---|---:|---|---:|---|"]
    for c in comps:
        lines.append(f"| {NAMES[c['a']]} − {NAMES[c['b']]} | {headers(s)[c['column']]} | "
                     + comparison_cells(c, 1, 100))
    return lines


def plot(rows: list[dict], comps: list[dict], s: Setting, path: Path) -> None:
    """Left: test Dice per column and encoder (bars the mean, dots the seeds). Right: each
    pre-trained encoder minus random per column, the mean and its 95% interval."""
    from glmae import figures

    plt = figures.pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    columns = [c for c in COLUMNS if any(r["column"] == c for r in rows)]
    labels = [textwrap.fill(headers(s)[c], 18) for c in columns]
    encoders = [e for e in CONFIGS if any(r["encoder"] == e for r in rows)]
    width = 0.8 / max(len(encoders), 1)
    for i, encoder in enumerate(encoders):
        for j, column in enumerate(columns):
            row = next((r for r in rows if r["encoder"] == encoder and r["column"] == column), None)
            if row:
                x = j + (i - (len(encoders) - 1) / 2) * width
                left.bar(x, 100 * row["mean"], width, color=f"C{i}", alpha=0.75,
                         label=NAMES[encoder] if j == 0 else None)
                left.plot([x] * len(row["values"]), [100 * v for v in row["values"]], "k.", ms=3)
    pretrained = [e for e in encoders if e != "random"]
    for i, encoder in enumerate(pretrained):
        for j, column in enumerate(columns):
            c = next((c for c in comps if c["a"] == encoder and c["column"] == column), None)
            if c:
                x = j + (i - (len(pretrained) - 1) / 2) * 0.3
                mean = c["diff_mean"]
                low, high = c["ci95"] or [mean, mean]
                right.errorbar(x, 100 * mean, yerr=[[100 * (mean - low)], [100 * (high - mean)]], fmt="o",
                               color=f"C{encoders.index(encoder)}", capsize=3,
                               label=f"{NAMES[encoder]} − random" if j == 0 else None)
    right.axhline(0, color="k", lw=0.8)
    for ax, ylabel in ((left, "test mean Dice (%)"), (right, "paired difference, points (95% CI)")):
        ax.set_xticks(range(len(columns)), labels, fontsize=7)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Phantoms, {s.fraction:.0%} labels: frozen-encoder probes and fine-tuning recipes "
                 "(best checkpoint on validation)", fontsize=9)
    fig.tight_layout()
    figures.save(fig, path)
    plt.close(fig)


def report(result: dict, s: Setting, png: str, n_invocations: int) -> str:
    partial = [] if result["complete"] else [
        f"**PARTIAL: {result['cells_done']} of {result['cells_planned']} cells done** (`--report-only` of an "
        "unfinished run).", ""]
    lines = [
        "# Does pre-training pay off? Frozen-encoder probes and fine-tuning recipes on phantoms",
        "",
        *partial,
        f"Test mean Dice (%) over 13 organs on {s.test} test phantoms that nothing was chosen on, mean ± std over "
        f"seeds {list(s.seeds)} (a seed fixes the labelled subset and every initialisation: the decoder's, the "
        f"random ViT's, the probe's head). {s.fraction:.0%} of {s.train} labelled training phantoms; {s.val} "
        f"validation phantoms pick each fine-tuning's best checkpoint; MAE3D and GL-MAE pre-trained "
        f"{s.pretrain_steps} steps on {s.pool} unlabelled phantoms; the encoder is the tiny ViT of `{FINETUNE}` for "
        f"all three; fine-tuning {s.finetune_steps} steps. The probe is a linear head on the frozen ViT's tokens "
        f"({s.probe_steps} full-batch steps), its Dice pooled over the test phantoms' centre crops (the whole "
        f"phantom at this scale); the other columns are UNETR's Dice per phantom, averaged.",
        "",
        "Best checkpoint on validation (the probe: its one score):",
        "",
        *table(result["results"], s),
        "",
        "Last checkpoint (no selection at all):",
        "",
        *table(result["results_last"], s),
        "",
        f"![probes and recipes]({png})",
        "",
        "Each pre-trained encoder minus random, paired by seed, with 95% t-intervals; \"helps\" only when the "
        "interval excludes 0 (best checkpoint; the probe's one score):",
        "",
        *comparison_lines(result["comparisons"], s),
        "",
        "The same for the last checkpoint:",
        "",
        *comparison_lines(result["comparisons_last"], s),
        "",
        *closing_lines(result),
        f"Invocations of this run: {n_invocations} (each listed in `invocations.json` of its --work folder).",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = arguments(__doc__, "pretraining_payoff", SETTINGS, report_only=True)
    args = p.parse_args(argv)
    s = SETTINGS[args.setting]
    made_from, cmd = commit(), command(__file__, argv)  # the code as it was when the run started
    # seeds outermost: a partial run has every cell of its first seeds
    planned = [(e, c, seed) for seed in s.seeds for e in s.encoders for c in s.columns]
    cells: dict = {"none": {}, "best": {}, "last": {}}  # checkpoint -> (encoder, column) -> {seed: test Dice}
    setting = {"setting": args.setting, **dataclasses.asdict(s)}
    with whole_run(args.work, setting, made_from, cmd, record=not args.report_only) as invocations:
        if args.report_only:
            done = [(k, v) for k in planned if (v := done_scores(k, s, args.work)) is not None]
        else:
            pool, data = write_study(args.work / "data", s.pool, s.train, s.val, s.test, s.shape)
            # the pre-trainings (GL-MAE's, the longest, first) beside the random encoder's cells, which
            # need none; then the pre-trained encoders' cells
            first = [(("pretrain", e), pretrain_cell, (e, s, pool, args.work)) for e in reversed(s.encoders)
                     if CONFIGS[e]]
            first += [(k, cell, (*k, s, data, args.work, {})) for k in planned if k[0] == "random"]
            done, encoders = [], {}
            for key, value in run_cells(first, args.jobs, args.work):
                if key[0] == "pretrain":
                    encoders[key[1]] = value
                else:
                    done.append((key, value))
            rest = [(k, cell, (*k, s, data, args.work, encoders)) for k in planned if k[0] != "random"]
            done += list(run_cells(rest, args.jobs, args.work))
        for (encoder, column, seed), by_checkpoint in done:
            for which, dice in by_checkpoint.items():
                cells[which].setdefault((encoder, column), {})[seed] = dice
            print(f"{encoder} {column} seed {seed}: test Dice "
                  + ", ".join(f"{v:.4f} ({w})" for w, v in by_checkpoint.items()), flush=True)
    selected = {**cells["none"], **cells["best"]}  # the probe's one score beside the best checkpoints
    result = {
        "setting": args.setting, "config": dataclasses.asdict(s), "complete": len(done) == len(planned),
        "cells_done": len(done), "cells_planned": len(planned), "command": cmd, "machine": machine(),
        **run_stamp(invocations, made_from),  # commit, wall_minutes: of every invocation of this run
        "results": summarise(selected), "results_last": summarise(cells["last"]),
        "comparisons": comparisons(selected), "comparisons_last": comparisons(cells["last"]),
    }
    stem = args.results / ("pretraining_payoff" if args.setting == "full" else f"pretraining_payoff_{args.setting}")
    stem.parent.mkdir(parents=True, exist_ok=True)
    plot(result["results"], result["comparisons"], s, stem.with_suffix(".png"))
    text = report(result, s, stem.with_suffix(".png").name, len(invocations))
    write(stem.with_suffix(".json"), result, text)
    print(text)
    return result


if __name__ == "__main__":
    main()
