"""GL-MAE's global-guided consistency over long runs: does it keep teaching?

`glmae_phantom` (GL-MAE's tiny ViT at the label-efficiency benchmark's view scale: 4x4x6 mm
phantoms, 48x48x32 global views) pre-trained on that benchmark's unlabelled pool for 3000 and for
6000 steps. Per logged step: the teacher's entropy and the consistency loss, against log K (K the
head's outputs). The consistency term teaches only while its targets are neither uniform (entropy
at log K: no gradient) nor one-hot; the criteria, fixed before the runs:

- after warm-up (the first 10% of the run), the teacher entropy stays strictly between 0.05·log K
  and 0.9·log K at every logged step;
- the consistency loss ends (mean of the last 5% of logged steps) below 0.9·log K.

The online probe (`train.probe_every`, `methods/probe.py`) runs on the benchmark's labelled
training phantoms (fitted) and validation phantoms (scored) every 500 steps: whether the features
still improve. Resumable: each run is a run_stage under --work.

    python benchmarks/glmae_consistency.py --jobs 2          # full: about 35 minutes on 2 cores
    python benchmarks/glmae_consistency.py --setting smoke   # seconds, for the test suite
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from protocol import arguments, run_cells, run_stamp, whole_run
from provenance import closing_lines, command, commit, machine, write

from glmae.engine.run import run_stage
from glmae.synth.study import write_study

CONFIG = "glmae_phantom"
WARMUP, TAIL, BAND, LOSS_LIMIT = 0.1, 0.05, (0.05, 0.9), 0.9  # the criteria above, as fractions


@dataclass(frozen=True)
class Setting:
    pool: int  # unlabelled pre-training phantoms
    train: int  # labelled phantoms the probe fits on
    val: int  # labelled phantoms the probe scores on
    shape: tuple[int, int, int]
    steps: tuple[int, ...]
    probe_every: int
    overrides: tuple[str, ...] = ()


# the label-efficiency benchmark's phantoms (same generator, seed and sizes; test phantoms unused)
SETTINGS = {
    "full": Setting(pool=48, train=4, val=4, shape=(64, 64, 48), steps=(3000, 6000), probe_every=500),
    "smoke": Setting(pool=2, train=1, val=1, shape=(32, 32, 24), steps=(4,), probe_every=2,
                     overrides=("data.spacing=[6.0,6.0,8.0]", "data.num_workers=0", "method.global_size=[32,32,32]",
                                "method.local_size=[16,16,16]", "method.n_local=2", "train.probe_steps=2",
                                "train.log_every=1")),
}


def pretrain_cell(steps: int, s: Setting, pool: Path, probe: Path, work: Path) -> list[dict]:
    """The log.jsonl records of one pre-training run of `steps` steps."""
    from glmae.config import load_config
    from glmae.engine.logger import read_log
    from glmae.pretrain import pretrain

    run = work / f"steps{steps}"
    cfg = load_config(CONFIG, [*s.overrides, f"train.max_steps={steps}", "train.epochs=0",
                               f"train.probe_every={s.probe_every}", f"train.probe_data={probe}"])
    run_stage("pretrain", run, pretrain, cfg, str(pool))
    return read_log(run / "log.jsonl")


def series(records: list[dict], key: str) -> list[list[float]]:
    return [[r["step"], r[key]] for r in records if key in r]


def judge(records: list[dict], steps: int, log_k: float) -> dict:
    """The run's curves and whether it meets the criteria of the module docstring."""
    entropy, cons = series(records, "teacher_entropy"), series(records, "loss_cons")
    after = [v for step, v in entropy if step > WARMUP * steps]
    tail = [v for step, v in cons if step > (1 - TAIL) * steps] or [cons[-1][1]]
    low, high = (f * log_k for f in BAND)
    in_band = all(low < v < high for v in after)
    final = float(np.mean(tail))
    times = [r["time"] for r in records]
    probe_s = sum(r.get("probe_seconds", 0.0) for r in records)
    return {"steps": steps, "log_k": log_k, "entropy": entropy, "cons_loss": cons,
            "probe_dice": series(records, "probe_dice"), "probe_share": probe_s / max(times[-1] - times[0], 1e-9),
            "entropy_after_warmup": [min(after), max(after)],
            "entropy_in_band": in_band, "final_cons_loss": final, "cons_loss_below_limit": final < LOSS_LIMIT * log_k,
            "collapse_flagged": any(r.get("collapse", 0) > 0 for r in records)}


def plot(runs: list[dict], path: Path) -> None:
    from glmae import figures

    plt = figures.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    log_k = runs[0]["log_k"]
    for run in runs:
        for ax, key in zip(axes, ("entropy", "cons_loss", "probe_dice")):
            if run[key]:
                x, y = zip(*run[key])
                ax.plot(x, y, label=f"{run['steps']} steps", marker="o" if key == "probe_dice" else None)
    for ax, title in zip(axes[:2], ("teacher entropy (nats)", "consistency loss (nats)")):
        ax.axhline(log_k, color="k", lw=0.8, ls=":", label="log K (uniform)")
        ax.axhline(BAND[1] * log_k, color="r", lw=0.8, ls="--", label="0.9 log K")
        ax.set_title(title, fontsize=9)
    axes[0].axhline(BAND[0] * log_k, color="r", lw=0.8, ls="--", label="0.05 log K")
    axes[2].set_title("online probe: validation Dice of a linear head", fontsize=9)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    figures.save(fig, path)
    plt.close(fig)


def report(result: dict, s: Setting, png: str) -> str:
    log_k = result["runs"][0]["log_k"]
    lines = ["# GL-MAE's consistency over long runs", "",
             f"`{CONFIG}` pre-trained on {s.pool} unlabelled phantoms; K = {round(math.exp(log_k))} "
             f"head outputs (log K = {log_k:.2f} nats). Criteria, fixed before the runs: after "
             f"warm-up (the first {WARMUP:.0%}) the teacher entropy stays strictly between {BAND[0]}·log K and "
             f"{BAND[1]}·log K; the consistency loss ends (last {TAIL:.0%} of logged steps) below "
             f"{LOSS_LIMIT}·log K.", "",
             "| steps | teacher entropy after warm-up (min–max) | in band | final consistency loss | below limit | "
             "collapse alarm | probe Dice (first → last) | probe's share of the run |",
             "|---:|---|---|---:|---|---|---|---:|"]
    for r in result["runs"]:
        probe = r["probe_dice"]
        probe_text = f"{probe[0][1]:.3f} → {probe[-1][1]:.3f}" if probe else "–"
        lines.append(f"| {r['steps']} | {r['entropy_after_warmup'][0]:.2f}–{r['entropy_after_warmup'][1]:.2f} | "
                     f"{'yes' if r['entropy_in_band'] else 'no'} | {r['final_cons_loss']:.2f} | "
                     f"{'yes' if r['cons_loss_below_limit'] else 'no'} | "
                     f"{'fired' if r['collapse_flagged'] else 'silent'} | {probe_text} | {r['probe_share']:.1%} |")
    lines += ["", f"![entropy, loss and probe]({png})", "", *closing_lines(result)]
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = arguments(__doc__, "glmae_consistency", SETTINGS).parse_args(argv)
    s = SETTINGS[args.setting]
    made_from, cmd = commit(), command(__file__, argv)
    with whole_run(args.work, {"setting": args.setting, **dataclasses.asdict(s)}, made_from, cmd) as invocations:
        pool, data = write_study(args.work / "data", s.pool, s.train, s.val, 1, s.shape)
        cells = [((f"steps{n}",), pretrain_cell, (n, s, pool, data, args.work)) for n in s.steps]
        logs = {key[0]: records for key, records in run_cells(cells, args.jobs, args.work)}
    from glmae.config import load_config

    log_k = math.log(load_config(CONFIG).method.head_out)
    runs = [judge(logs[f"steps{n}"], n, log_k) for n in s.steps]
    result = {"setting": args.setting, "config": CONFIG, "machine": machine(), "command": cmd,
              **run_stamp(invocations, made_from), "runs": runs}
    stem = args.results / ("glmae_consistency" if args.setting == "full" else f"glmae_consistency_{args.setting}")
    stem.parent.mkdir(parents=True, exist_ok=True)
    plot(runs, stem.with_suffix(".png"))
    text = report(result, s, stem.with_suffix(".png").name)
    write(stem.with_suffix(".json"), result, text)
    print(text)
    return result


if __name__ == "__main__":
    main()
