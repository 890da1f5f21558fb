"""Chest X-ray classification on synthetic radiographs: MAE pre-training against scratch.

SelfMedMAE's third task in miniature: `mae2d_tiny` (MAE on 64x64 radiographs, 8x8 patches)
pre-trained on an unlabelled pool, then `cxr_classifier_tiny` (mean-pooled tokens, linear head, BCE
over the 5 findings of `glmae synth --kind cxr`) fine-tuned end to end from that encoder and from
random initialisation, with 10% and 100% of the labelled training images.

The protocol is `protocol.py`'s: four disjoint sets of images, kept patient-wise (a follow-up image
is in its patient's set): pre-training pool, labelled training, validation, test. Each fine-tuning
picks its best checkpoint on validation mean AUC; test is scored once, with that checkpoint and
with the last one. A seed fixes the labelled subset and the head's and decoder-free model's
initialisation; pre-training runs once (seed 0), so the intervals cover fine-tuning's variation,
not pre-training's. Comparisons are seed-paired, with 95% t-intervals.

The setting was fixed before any result of it was seen; its numbers and their reasons are in
SETTINGS. Resumable: every cell is a run_stage under --work (recomputed if its inputs change).

    python benchmarks/cxr.py --jobs 2              # full: about 45 min on 2 cores
    python benchmarks/cxr.py --setting smoke       # seconds, for the test suite
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from protocol import arguments, comparison_cells, paired, run_cells, run_stamp, spread, test_scores, verdict, whole_run
from provenance import closing_lines, command, commit, machine

from glmae.engine.run import run_stage

PRETRAIN, FINETUNE = "mae2d_tiny", "cxr_classifier_tiny"
NAMES = {"scratch": "scratch", "mae": "MAE (mae2d_tiny)"}


@dataclass(frozen=True)
class Setting:
    pool: int  # unlabelled pre-training images
    train: int  # labelled training images (100%)
    val: int  # validation images: they pick each cell's best checkpoint
    test: int  # test images: scored once per cell
    size: int  # images are size x size pixels
    pretrain_steps: int
    finetune_steps: int
    val_every: int
    seeds: tuple[int, ...]
    fractions: tuple[float, ...]
    pretrain_set: tuple[str, ...] = ()
    finetune_set: tuple[str, ...] = ()


# Full: 400 labelled images, so 10% is 40; 600 test images put ~48 positives of the rarest finding
# (pneumothorax, 8%) in test. 4000 pre-training steps of batch 16 (40 passes over the pool, 11 min
# at 6 steps/s on one thread) and 500 fine-tuning steps (20 passes at 100%; the calibration in
# cxr_classifier_tiny.yaml saw validation AUC still rising at 300), validated every 50 steps.
# 5 seeds at both fractions: 20 fine-tunings of ~3 min on one thread each.
SETTINGS = {
    "full": Setting(pool=1600, train=400, val=200, test=600, size=64, pretrain_steps=4000, finetune_steps=500,
                    val_every=50, seeds=(0, 1, 2, 3, 4), fractions=(0.1, 1.0)),
    "smoke": Setting(pool=16, train=20, val=16, test=16, size=32, pretrain_steps=2, finetune_steps=2, val_every=2,
                     seeds=(0, 1), fractions=(0.5,), pretrain_set=("data.image_size=[32,32]", "method.roi=[32,32,1]",
                                                                   "data.num_workers=0"),
                     finetune_set=("data.image_size=[32,32]", "method.roi=[32,32,1]", "data.num_workers=0")),
}


def write_sets(root: Path, s: Setting) -> tuple[Path, Path]:
    """Synthetic radiographs in ROOT and two CSVs beside them: pretrain.csv (the pool) and
    finetune.csv (training, validation and test images in a `split` column). Patients are taken in
    order and each goes whole to the set being filled, so a set may hold a follow-up or two more
    than asked and no patient is in two sets."""
    from glmae.synth.cxr import write_dataset

    total = s.pool + s.train + s.val + s.test
    write_dataset(root, cases=total, seed=0, shape=(s.size, s.size, 1))
    rows = list(csv.DictReader(open(root / "labels.csv", newline="")))
    sets = {name: [] for name in ("pool", "training", "validation", "test")}
    wanted = dict(zip(sets, (s.pool, s.train, s.val, s.test)))
    names = iter(sets)
    current = next(names)
    for i, row in enumerate(rows):
        new_patient = i == 0 or row["Patient ID"] != rows[i - 1]["Patient ID"]
        if new_patient and len(sets[current]) >= wanted[current] and current != "test":
            current = next(names)
        sets[current].append(row)

    def write(path: Path, rows: list[dict], split: bool) -> Path:
        buf = io.StringIO()
        fields = ["Image Index", "Finding Labels", "Patient ID"] + (["split"] if split else [])
        writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        if not path.is_file() or path.read_text() != buf.getvalue():  # unchanged files keep the cells' digests
            path.write_text(buf.getvalue())
        return path

    labelled = [{**r, "split": name} for name in ("training", "validation", "test") for r in sets[name]]
    return write(root / "pretrain.csv", sets["pool"], False), write(root / "finetune.csv", labelled, True)


def pretrain_cell(s: Setting, pool: Path, work: Path) -> Path:
    from glmae.config import load_config
    from glmae.pretrain import pretrain

    run = work / "pretrain"
    cfg = load_config(PRETRAIN, [*s.pretrain_set, f"train.max_steps={s.pretrain_steps}", "train.epochs=0"])
    run_stage("pretrain", run, pretrain, cfg, str(pool))
    return run / "encoder.safetensors"


def cell_dir(work: Path, method: str, fraction: float, seed: int) -> Path:
    return work / "finetune" / f"{method}_{fraction:g}_seed{seed}"


def finetune_cell(method: str, fraction: float, seed: int, s: Setting, data: Path, work: Path, encoder) -> dict:
    """Test scores ({"best", "last"}) of one fine-tuning."""
    from glmae.config import load_config
    from glmae.finetune import finetune

    run = cell_dir(work, method, fraction, seed)
    cfg = load_config(FINETUNE, [*s.finetune_set, f"train.max_steps={s.finetune_steps}", "train.epochs=0",
                                 f"train.val_every={s.val_every}", f"train.seed={seed}"])
    init = str(encoder) if method == "mae" else "none"
    run_stage("finetune", run, finetune, cfg, str(data), init=init, mode="e2e", label_fraction=fraction,
              split_seed=seed)
    return test_scores(run, str(data))


def summarise(scores: dict, which: str) -> tuple[list[dict], list[dict]]:
    """{(method, fraction): {seed: {"best", "last"}}} -> (result rows, comparisons) of test mean AUC
    of the `which` checkpoint."""
    auc = {k: {seed: v[which]["mean_auc"] for seed, v in by_seed.items()} for k, by_seed in scores.items()}
    rows = [{"method": m, "mode": "e2e", "fraction": f, "split": "test", "checkpoint": which,
             **spread([auc[m, f][s] for s in sorted(auc[m, f])]), "seeds": sorted(auc[m, f]),
             "values": [auc[m, f][s] for s in sorted(auc[m, f])]}
            for m, f in sorted(auc, key=lambda k: (k[1], list(NAMES).index(k[0])))]
    comparisons = []
    for f in sorted({f for _, f in auc}):
        if ("mae", f) in auc and ("scratch", f) in auc:
            c = paired(auc["mae", f], auc["scratch", f])
            comparisons.append({"a": "mae", "b": "scratch", "mode": "e2e", "fraction": f, "checkpoint": which,
                                **{k: c[k] for k in ("diff_mean", "ci95", "n_seeds", "n_favour", "values")},
                                "verdict": verdict(c)})
    return rows, comparisons


def per_finding(scores: dict) -> list[dict]:
    """Mean test AUC per finding (best checkpoint) of each (method, fraction), over seeds."""
    out = []
    for (m, f), by_seed in sorted(scores.items(), key=lambda kv: (kv[0][1], list(NAMES).index(kv[0][0]))):
        per = [v["best"]["per_class"] for v in by_seed.values()]
        names = per[0]
        out.append({"method": m, "fraction": f, "auc": {
            n: float(np.mean([p[n] for p in per if p[n] is not None])) if any(p[n] is not None for p in per)
            else None for n in names}})
    return out


def table(rows: list[dict]) -> list[str]:
    fractions = sorted({r["fraction"] for r in rows})
    by = {(r["method"], r["fraction"]): r for r in rows}
    lines = ["| method | " + " | ".join(f"{f:.0%} labels" for f in fractions) + " |",
             "|---|" + "---:|" * len(fractions)]
    for m in NAMES:
        cells = [f"{by[m, f]['mean']:.3f} ± {by[m, f]['std']:.3f}" if (m, f) in by else "–" for f in fractions]
        lines.append(f"| {NAMES[m]} | " + " | ".join(cells) + " |")
    return lines


def comparison_lines(comparisons: list[dict]) -> list[str]:
    lines = ["| comparison | labels | checkpoint | mean difference | 95% CI | seeds favouring | verdict |",
             "|---|---:|---|---:|---|---:|---|"]
    for c in comparisons:
        lines.append(f"| {NAMES[c['a']]} − {NAMES[c['b']]} | {c['fraction']:.0%} | {c['checkpoint']} | "
                     + comparison_cells(c))
    return lines


def plot(rows: list[dict], path: Path) -> None:
    from glmae import figures

    plt = figures.pyplot()
    fig, ax = plt.subplots(figsize=(5.0, 3.6))
    for i, m in enumerate(NAMES):
        for r in (r for r in rows if r["method"] == m):
            x = np.full(len(r["values"]), 100 * r["fraction"]) * (1 + 0.04 * (i - 0.5))
            ax.scatter(x, r["values"], s=12, alpha=0.6, color=f"C{i}")
        pts = sorted((r["fraction"], r["mean"]) for r in rows if r["method"] == m)
        if pts:
            f, mean = map(np.array, zip(*pts))
            ax.plot(100 * f * (1 + 0.04 * (i - 0.5)), mean, marker="o", color=f"C{i}", label=NAMES[m])
    ax.set_xscale("log")
    ax.set_xlabel("labelled training images (%)")
    ax.set_ylabel("test mean AUC")
    ax.set_title("Synthetic chest X-rays: each seed (dots) and the mean", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    figures.save(fig, path)
    plt.close(fig)


def main(argv=None) -> dict:
    p = arguments(__doc__, "cxr", SETTINGS)
    args = p.parse_args(argv)
    s = SETTINGS[args.setting]
    made_from, cmd = commit(), command(__file__, argv)  # the code as it was when the run started
    scores: dict = {}
    with whole_run(args.work, {"setting": args.setting, **dataclasses.asdict(s)}, made_from, cmd) as invocations:
        pool, data = write_sets(args.work / "data", s)
        encoder = next(run_cells([(("pretrain",), pretrain_cell, (s, pool, args.work))], 1, args.work))[1]
        keys = [(m, f, seed) for seed in s.seeds for f in s.fractions for m in NAMES]  # seeds outermost
        cells = [(k, finetune_cell, (*k, s, data, args.work, encoder)) for k in keys]
        for (m, f, seed), result in run_cells(cells, args.jobs, args.work):
            scores.setdefault((m, f), {})[seed] = result
            print(f"{m} {f:.0%} seed {seed}: test mean AUC {result['best']['mean_auc']:.4f} (best), "
                  f"{result['last']['mean_auc']:.4f} (last)", flush=True)
    rows, comparisons = summarise(scores, "best")
    last_rows, last_comparisons = summarise(scores, "last")
    stages = [json.loads(p.read_text()) for p in args.work.glob("**/stage.json")]
    result = {
        "setting": args.setting, "config": dataclasses.asdict(s), "command": cmd, "machine": machine(),
        **run_stamp(invocations, made_from),  # commit, wall_minutes: of every invocation of this run
        "stage_minutes": sum(st.get("seconds") or 0 for st in stages) / 60,
        "results": rows, "comparisons": comparisons, "results_last": last_rows, "comparisons_last": last_comparisons,
        "per_finding": per_finding(scores),
    }
    args.results.mkdir(parents=True, exist_ok=True)
    stem = args.results / ("cxr" if args.setting == "full" else f"cxr_{args.setting}")
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, stem.with_suffix(".png"))
    findings = result["per_finding"]
    lines = [
        "# Chest X-ray classification on synthetic radiographs: MAE pre-training against scratch",
        "",
        f"Test mean AUC over the 5 findings on {s.test} test images that nothing was chosen on, mean ± std "
        f"over seeds {list(s.seeds)} (a seed fixes the labelled subset and the initialisation); "
        f"{s.train} labelled training images = 100%, {s.val} validation images pick each cell's best "
        f"checkpoint, {s.pool} unlabelled images pre-train `{PRETRAIN}` for {s.pretrain_steps} steps (once), "
        f"{s.finetune_steps} fine-tuning steps of `{FINETUNE}` per cell; {s.size}x{s.size} pixels.",
        "",
        "Best checkpoint on validation:",
        "",
        *table(rows),
        "",
        "Last checkpoint (no selection at all):",
        "",
        *table(last_rows),
        "",
        f"![test AUC per seed]({stem.with_suffix('.png').name})",
        "",
        "MAE minus scratch, paired by seed, with the 95% t-interval; \"helps\" only when the interval "
        "excludes 0:",
        "",
        *comparison_lines(comparisons + last_comparisons),
        "",
        "Test AUC per finding (best checkpoint, mean over seeds):",
        "",
        "| method | labels | " + " | ".join(findings[0]["auc"]) + " |",
        "|---|---:|" + "---:|" * len(findings[0]["auc"]),
        *[f"| {NAMES[r['method']]} | {r['fraction']:.0%} | " + " | ".join(
            "–" if v is None else f"{v:.3f}" for v in r["auc"].values()) + " |" for r in findings],
        "",
        *closing_lines(result),
        f"Invocations of this run: {len(invocations)} (each listed in `invocations.json` of its --work folder); "
        f"the training stages' own time: {result['stage_minutes']:.1f} min.",
        "",
    ]
    stem.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
