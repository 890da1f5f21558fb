"""Label efficiency on phantoms: a miniature of GL-MAE's Table 1 and label-efficiency figure.

Methods {scratch (Sup. UNETR), MAE3D, GL-MAE, GMIM} x label fractions x seeds, fine-tuned end to
end, plus linear probing at 100% labels. Every pre-training method gets the same encoder (the tiny
ViT), the same pre-training budget (steps, pool of unlabelled phantoms) and every fine-tuning the
same budget. Dice is the mean over the 13 organs on held-out test phantoms (the best validation
checkpoint, as in the papers' protocol, where validation and test coincide).

The run is resumable: each pre-training and each fine-tuning cell lives in its own folder under
--work and is skipped when its result exists. Results go to --results as label_efficiency.{json,md,png}.

    python benchmarks/label_efficiency.py --jobs 2              # full: about 2 hours on 2 cores
    python benchmarks/label_efficiency.py --setting smoke       # seconds, for the test suite
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from protocol import run_cells, spread
from provenance import command, machine

from glmae.engine.run import run_stage
from glmae.synth.study import write_study

HERE = Path(__file__).parent


@dataclass(frozen=True)
class Setting:
    pool: int  # unlabelled pre-training phantoms
    train: int  # labelled training phantoms (100%)
    val: int  # validation phantoms: they pick each cell's best checkpoint
    test: int  # held-out test phantoms
    shape: tuple[int, int, int]
    pretrain_steps: int
    finetune_steps: int
    seeds: tuple[int, ...]
    fractions: tuple[float, ...]
    methods: tuple[str, ...] = ("scratch", "mae3d", "glmae", "gmim")
    linear: bool = True  # also linear probing at 100% labels
    pretrain_set: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)  # method -> overrides
    finetune_set: tuple[str, ...] = ()


# method -> pre-training config (the same ViT encoder for all); scratch has none. Every method
# pre-trains at the fine-tuning scale (the `_phantom` configs), so that a token covers the same
# anatomy in both: MAE3D and GMIM on crops of the fine-tuning ROI at its voxel size, GL-MAE on views
# that size. Fine-tuning at the demo's 4x4x6 mm is what lets 48 cells of a few hundred steps fit in
# under 2 hours.
CONFIGS = {"mae3d": "mae3d_phantom", "glmae": "glmae_phantom", "gmim": "gmim_vit_phantom"}
FINETUNE = "unetr_phantom"

# 4 labelled phantoms, so 25% is one: with 8 (25% = 2) scratch at 25% and at 100% differed by 6 ± 3
# points, less than the seed spread of either; with 4 the gap is 14-26 points (scratch, 400 steps).
# 400 fine-tuning steps: at 300 the slowest seed's 100% cell had only reached 0.18 (0.41 at 400).
# 3000 pre-training steps: GL-MAE's gain over scratch at 25%, paired by seed, was +2.9 ± 5.1 points
# after 1000 steps and +5.9 ± 4.2 after 3000 (MAE3D's +2.6 ± 2.9 and -0.0 ± 1.5).
SETTINGS = {
    "full": Setting(pool=48, train=4, val=4, test=8, shape=(64, 64, 48), pretrain_steps=3000, finetune_steps=400,
                    seeds=(0, 1, 2), fractions=(0.25, 0.5, 1.0), finetune_set=("train.val_every=100",)),
    "smoke": Setting(
        pool=2, train=2, val=1, test=1, shape=(32, 32, 24), pretrain_steps=2, finetune_steps=2, seeds=(0,),
        fractions=(0.5,), methods=("scratch", "glmae"), linear=False,
        pretrain_set={"glmae": ("data.spacing=[6.0,6.0,8.0]", "data.num_workers=0", "method.global_size=[32,32,32]",
                                "method.local_size=[16,16,16]", "method.n_local=2")},
        finetune_set=("data.spacing=[6.0,6.0,8.0]", "data.num_workers=1", "method.roi=[32,32,24]",
                      "train.val_every=0"),
    ),
}


def pretrain_cell(method: str, s: Setting, pool: Path, work: Path) -> Path:
    from glmae.config import load_config
    from glmae.pretrain import pretrain

    run = work / "pretrain" / method
    overrides = [*s.pretrain_set.get(method, ()), f"train.max_steps={s.pretrain_steps}", "train.epochs=0"]
    cfg = load_config(CONFIGS[method], overrides)
    run_stage("pretrain", run, pretrain, cfg, str(pool))
    return run / "encoder.safetensors"


def cell_dir(work: Path, method: str, mode: str, fraction: float, seed: int) -> Path:
    return work / "finetune" / f"{method}_{mode}_{fraction:g}_seed{seed}"


def finetune_cell(method: str, mode: str, fraction: float, seed: int, s: Setting, data: Path, work: Path,
                  encoders: dict) -> dict:
    from glmae.config import load_config
    from glmae.finetune import finetune

    run = cell_dir(work, method, mode, fraction, seed)
    metrics = run / "metrics.json"
    if not metrics.exists():
        overrides = [*s.finetune_set, f"train.max_steps={s.finetune_steps}", "train.epochs=0", f"train.seed={seed}"]
        if mode == "linear":
            overrides.append("optim.lr=1e-2")  # the papers' linear-probing rate
        cfg = load_config(FINETUNE, overrides)
        init = str(encoders[method]) if method != "scratch" else "none"
        run_stage("finetune", run, finetune, cfg, str(data), init=init, mode=mode, label_fraction=fraction,
                  split_seed=seed)
    return json.loads(metrics.read_text())


def summarise(cells: dict) -> list[dict]:
    """{(method, mode, fraction): {seed: mean Dice}} -> rows of the results table."""
    rows = []
    for (method, mode, fraction), by_seed in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        values = [by_seed[s] for s in sorted(by_seed)]
        rows.append({"method": method, "mode": mode, "fraction": fraction, **spread(values),
                     "seeds": [int(s) for s in sorted(by_seed)], "values": values})
    return rows


NAMES = {"scratch": "Sup. UNETR (scratch)", "mae3d": "MAE3D", "glmae": "GL-MAE", "gmim": "GMIM"}


def paired(cells: dict, a: tuple, b: tuple) -> dict | None:
    """Dice of cell a minus cell b, seed by seed: a seed fixes the labelled split and the decoder's
    initialisation, so pairing removes what the cells share (one seed's slow start, an easy split)."""
    seeds = sorted(set(cells.get(a, {})) & set(cells.get(b, {})))
    if not seeds:
        return None
    d = [cells[a][s] - cells[b][s] for s in seeds]
    return {"a": list(a), "b": list(b), "seeds": [int(s) for s in seeds], "values": d, **spread(d)}


def differences(cells: dict) -> list[dict]:
    """The label-fraction calibration (scratch, full labels minus each smaller fraction) and every
    pre-trained method's gain over scratch in the same mode and fraction, paired by seed."""
    out = []
    fractions = sorted({f for (m, mode, f) in cells if m == "scratch" and mode == "e2e"})
    for f in fractions[:-1]:
        out.append(paired(cells, ("scratch", "e2e", fractions[-1]), ("scratch", "e2e", f)))
    for method, mode, f in sorted(cells, key=lambda k: (k[1], k[2], list(NAMES).index(k[0]))):
        if method != "scratch":
            out.append(paired(cells, (method, mode, f), ("scratch", mode, f)))
    return [d for d in out if d is not None]


def difference_lines(diffs: list[dict]) -> list[str]:
    def name(cell):
        method, mode, f = cell
        return f"{NAMES[method]} {mode} {f:.0%}"

    lines = ["| difference | mean ± std (points) | per seed |", "|---|---:|---|"]
    for d in diffs:
        seeds = ", ".join(f"{100 * v:+.1f}" for v in d["values"])
        lines.append(f"| {name(d['a'])} − {name(d['b'])} | {100 * d['mean']:+.1f} ± {100 * d['std']:.1f} | {seeds} |")
    return lines


def table(rows: list[dict]) -> list[str]:
    fractions = sorted({r["fraction"] for r in rows if r["mode"] == "e2e"})
    methods = [m for m in NAMES if any(r["method"] == m for r in rows)]
    by = {(r["method"], r["mode"], r["fraction"]): r for r in rows}
    header = "| method | " + " | ".join(f"e2e {f:.0%}" for f in fractions)
    has_linear = any(r["mode"] == "linear" for r in rows)
    header += " | linear 100% |" if has_linear else " |"
    lines = [header, "|---|" + "---:|" * (len(fractions) + has_linear)]
    for m in methods:
        cells = []
        for key in [(m, "e2e", f) for f in fractions] + ([(m, "linear", 1.0)] if has_linear else []):
            r = by.get(key)
            cells.append(f"{100 * r['mean']:.1f} ± {100 * r['std']:.1f}" if r else "–")
        lines.append(f"| {NAMES[m]} | " + " | ".join(cells) + " |")
    return lines


def per_organ(organs: dict) -> list[dict]:
    """{(method, mode, fraction): [per-class Dice per seed]} -> rows of mean Dice per organ."""
    return [{"method": m, "mode": mode, "fraction": f,
             "dice": {k: float(np.mean([seed[k] for seed in seeds])) for k in seeds[0]}}
            for (m, mode, f), seeds in sorted(organs.items())]


def organ_table(rows: list[dict], fraction: float) -> list[str]:
    rows = {r["method"]: r["dice"] for r in rows if r["mode"] == "e2e" and r["fraction"] == fraction}
    methods = [m for m in NAMES if m in rows]
    if not methods:
        return []
    lines = ["| organ | " + " | ".join(NAMES[m] for m in methods) + " |", "|---|" + "---:|" * len(methods)]
    for organ in rows[methods[0]]:
        lines.append(f"| {organ} | " + " | ".join(f"{100 * rows[m][organ]:.1f}" for m in methods) + " |")
    return lines


def plot(rows: list[dict], path: Path) -> None:
    from glmae import figures

    plt = figures.pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for method in NAMES:
        pts = sorted((r["fraction"], r["mean"], r["std"]) for r in rows if r["method"] == method and r["mode"] == "e2e")
        if pts:
            f, m, sd = map(np.array, zip(*pts))
            ax.errorbar(100 * f, 100 * m, yerr=100 * sd, marker="o", capsize=3, label=NAMES[method])
    ax.set_xlabel("labelled training cases (%)")
    ax.set_ylabel("mean Dice (%)")
    ax.set_title("Label efficiency on phantoms (end-to-end fine-tuning)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    figures.save(fig, path)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setting", choices=list(SETTINGS), default="full")
    p.add_argument("--work", type=Path, default=HERE / "work" / "label_efficiency")
    p.add_argument("--results", type=Path, default=HERE / "results")
    p.add_argument("--jobs", type=int, default=1, help="cells run concurrently (each with cores/jobs threads)")
    p.add_argument("--report-only", action="store_true", help="summarise the cells done so far, train nothing")
    args = p.parse_args(argv)
    s = SETTINGS[args.setting]
    start = time.time()
    plan = [(m, "e2e", f) for f in s.fractions for m in s.methods]
    if s.linear:
        plan += [(m, "linear", 1.0) for m in s.methods]
    # seeds outermost: a partial run already has every cell once
    keys = [(m, mode, f, seed) for seed in s.seeds for m, mode, f in plan]
    if args.report_only:
        keys = [k for k in keys if (cell_dir(args.work, *k) / "metrics.json").exists()]
        data, encoders = None, {}
    else:
        pool, data = write_study(args.work / "data", s.pool, s.train, s.val, s.test, s.shape)
        pretrain = [(("pretrain", m), pretrain_cell, (m, s, pool, args.work)) for m in s.methods if m != "scratch"]
        encoders = {key[1]: path for key, path in run_cells(pretrain, args.jobs, args.work)}
    finetune = [(k, finetune_cell, (*k, s, data, args.work, encoders)) for k in keys]
    cells: dict = {}
    organs: dict = {}  # (method, mode, fraction) -> [per-organ Dice of each seed]
    for (method, mode, fraction, seed), metrics in run_cells(finetune, args.jobs, args.work):
        cells.setdefault((method, mode, fraction), {})[seed] = metrics["mean_dice"]
        organs.setdefault((method, mode, fraction), []).append(metrics["per_class"])
        print(f"{method} {mode} {fraction:.0%} seed {seed}: mean Dice {metrics['mean_dice']:.4f}", flush=True)
    rows = summarise(cells)
    minutes = (time.time() - start) / 60
    result = {
        "setting": args.setting,
        "config": dataclasses.asdict(s),
        "machine": machine(),
        "command": command(__file__, argv),
        "wall_minutes_this_invocation": minutes,
        "results": rows,
        "per_organ": per_organ(organs),
        "differences": differences(cells),
    }
    args.results.mkdir(parents=True, exist_ok=True)
    stem = args.results / ("label_efficiency" if args.setting == "full" else f"label_efficiency_{args.setting}")
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, stem.with_suffix(".png"))
    lines = [
        "# Label efficiency on phantoms",
        "",
        f"Mean Dice (%) over 13 organs on {s.test} held-out phantoms, mean ± std over seeds {list(s.seeds)}; "
        f"{s.train} labelled training phantoms = 100%, {s.pool} unlabelled phantoms for pre-training "
        f"({s.pretrain_steps} steps each), {s.finetune_steps} fine-tuning steps per cell; "
        f"encoder: the tiny ViT of `{FINETUNE}` for every method.",
        "",
        *table(rows),
        "",
        f"![Dice vs label fraction]({stem.with_suffix('.png').name})",
        "",
        "Differences in Dice paired by seed (a seed fixes the labelled split and the initialisation, so "
        "pairing removes what cells of one seed share; the first rows calibrate the phantoms: scratch "
        "with all labels minus fewer):",
        "",
        *difference_lines(result["differences"]),
        "",
        "Dice per organ (%, mean over seeds), end to end at the smallest label fraction:",
        "",
        *organ_table(result["per_organ"], min(s.fractions)),
        "",
        f"Machine: {result['machine']}. Wall time of this invocation: {minutes:.1f} min.",
        "",
        f"Command: `{result['command']}`",
        "",
    ]
    notes = stem.with_name(stem.name + "_notes.md")  # hand-written reading of the numbers, kept on reruns
    if notes.exists():
        lines += [f"What these numbers say, what was tried and measured: [{notes.name}]({notes.name}).", ""]
    stem.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
