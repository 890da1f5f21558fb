"""What `train.grad_checkpoint` and `train.compile` cost and save on CPU, against the plain path.

For each config, three copies of its model with the same initial weights take engine steps
(`Trainer.step`: forward, backward, AdamW) on the same synthetic batches: plain, with activation
checkpointing of the ViT blocks, and compiled (`torch.compile`, inductor by default). The steps are
interleaved, one step of each variant per round in an order that alternates, so load from other
work on the machine falls on all three alike. Steps run on `--threads` threads (1 by default) and
are timed in this process's CPU time: on a shared CPU, other work then takes nothing from them
(with more threads than free cores, threads waiting for each other spin and count); wall times are
recorded too. A variant's time is the median over the rounds after the warm-up steps (which
compile), and its ratio to the plain path the median of the per-round ratios. Losses are compared
step by step with the plain path's.

Memory, two ways: the tensors saved for the backward pass of one step (`glmae.plan.count_step`;
not for the compiled model, whose graphs hold their tensors out of the hooks' reach), and each
variant's peak RSS (VmHWM) in a process of its own that takes the warm-up and 3 more steps, beside
its RSS before the first step.

    python benchmarks/options_cost.py                                     # glmae_tiny, mae3d_tiny
    python benchmarks/options_cost.py --configs mae3d_tiny --rounds 4 --warmup 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from provenance import closing_lines, commit, stamp, write

HERE = Path(__file__).resolve()
VARIANTS = ("plain", "grad_checkpoint", "compile")
MIB = 2**20


def setup(name: str, variant: str, backend: str, batches: int, overrides: list[str]):
    """(trainer, net, batches, cfg) of one variant: the config's model (seed 0), its engine Trainer,
    the net a step runs (compiled for `compile`), `batches` synthetic batches (the same for every
    variant)."""
    import numpy as np
    import torch

    from glmae.config import load_config
    from glmae.engine import distributed
    from glmae.engine.trainer import Trainer
    from glmae.plan import build, collate, planned, synthetic_item

    cfg, _ = planned(load_config(name, [*overrides, "train.device=cpu",
                                        f"train.grad_checkpoint={variant == 'grad_checkpoint'}"]))
    torch.manual_seed(0)
    model = build(cfg)
    sampler, item = model.sampler(), synthetic_item(cfg, np.random.default_rng(0))
    data = [collate([sampler(item, np.random.default_rng(b * cfg.train.batch_size + i))
                     for i in range(cfg.train.batch_size)]) for b in range(batches)]
    trainer = Trainer(model, cfg, Path(), distributed.DistEnv(0, 1, 0, torch.device("cpu")), "bench", None, len(data))
    net = torch.compile(model, backend=backend) if variant == "compile" else model
    return trainer, net, data, cfg


def step(trainer, net, batch, step_index: int) -> tuple[float, float, float]:
    """(CPU seconds, wall seconds, loss) of one engine step on `batch`."""
    import types

    stop = types.SimpleNamespace(received=None)
    cpu, wall = time.process_time(), time.perf_counter()
    trainer.step(step_index, net, iter([batch]), 1e-4, stop)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    loss = float(trainer.sums["loss"] / trainer.n_summed)  # the engine's record for its next log
    trainer.sums, trainer.n_summed = {}, 0
    return cpu, wall, loss


def saved_mib(trainer, batch) -> float:
    from glmae.plan import count_step

    return count_step(trainer.model, batch, trainer.dtype).saved_bytes / MIB


def run_config(name: str, args) -> list[dict]:
    """The interleaved rounds of the three variants of one config; a row per variant."""
    variants = {v: setup(name, v, args.backend, args.warmup + args.rounds, args.set) for v in VARIANTS}
    times, walls, losses = ({v: [] for v in VARIANTS} for _ in range(3))
    for r in range(args.warmup + args.rounds):
        for v in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
            trainer, net, data, _ = variants[v]
            cpu, wall, loss = step(trainer, net, data[r], r)
            times[v].append(cpu)
            walls[v].append(wall)
            losses[v].append(loss)
        print(f"{name} round {r}: " + ", ".join(f"{v} {times[v][-1]:.3f} s" for v in VARIANTS), flush=True)
    rows = []
    for v in VARIANTS:
        trainer, _, data, cfg = variants[v]
        timed = times[v][args.warmup:]
        ratios = [t / p for t, p in zip(timed, times["plain"][args.warmup:])]
        diff = max(abs(a - b) / abs(b) for a, b in zip(losses[v], losses["plain"]))
        rss = peak_rss(name, v, args)
        rows.append({
            "config": name, "variant": v, "batch": cfg.train.batch_size,
            "step_s": statistics.median(timed), "vs_plain": statistics.median(ratios),
            "step_wall_s": statistics.median(walls[v][args.warmup:]), "warmup_wall_s": sum(walls[v][:args.warmup]),
            "max_loss_rel_diff": diff,
            "saved_mib": None if v == "compile" else saved_mib(trainer, data[0]),
            "peak_rss_mib": rss["peak_mib"], "rss_before_mib": rss["before_mib"],
        })
        print(f"{name} {v}: {rows[-1]}", flush=True)
    return rows


def peak_rss(name: str, variant: str, args) -> dict:
    """The peak RSS of a process of its own that sets the variant up and takes its steps."""
    cmd = [sys.executable, str(HERE), "--child", name, variant, "--backend", args.backend, "--threads",
           str(args.threads), "--warmup", str(args.warmup), *(x for s in args.set for x in ("--set", s))]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr}")
    return json.loads(out.stdout.splitlines()[-1])


def vm(field: str) -> float:
    """A /proc/self/status memory field in MiB (VmRSS, VmHWM: this process's peak, from its exec)."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def child(name: str, variant: str, args) -> None:
    trainer, net, data, _ = setup(name, variant, args.backend, args.warmup + 3, args.set)
    before = vm("VmRSS")
    for r in range(args.warmup + 3):
        step(trainer, net, data[r], r)
    print(json.dumps({"peak_mib": vm("VmHWM"), "before_mib": before}))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=["glmae_tiny", "mae3d_tiny"])
    p.add_argument("--rounds", type=int, default=20, help="timed steps of each variant")
    p.add_argument("--threads", type=int, default=1, help="torch's threads (timed in CPU time)")
    p.add_argument("--warmup", type=int, default=2, help="steps before the timed ones (the compiled model compiles)")
    p.add_argument("--backend", default="inductor", help="torch.compile's backend")
    p.add_argument("--set", action="append", default=[], help="a config override for every config (key=value)")
    p.add_argument("--out", type=Path, default=HERE.parent / "results" / "options_cost.json")
    p.add_argument("--child", nargs=2, metavar=("CONFIG", "VARIANT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.child:
        return child(*args.child, args)
    started, made_from = time.time(), commit()
    rows = [row for name in args.configs for row in run_config(name, args)]
    result = {**stamp(__file__, argv, started, made_from), "rounds": args.rounds, "warmup": args.warmup,
              "threads": args.threads, "backend": args.backend, "overrides": args.set, "results": rows}
    write(args.out, result, markdown(result))


def markdown(result: dict) -> str:
    lines = [
        "# What train.grad_checkpoint and train.compile cost on CPU",
        "",
        f"Engine steps (forward, backward, AdamW) of each config's model on synthetic batches, the three "
        f"variants interleaved: {result['rounds']} timed rounds after {result['warmup']} warm-up step(s) "
        f"(compile: torch.compile, {result['backend']}; its warm-up compiles), on {result['threads']} "
        "thread(s). Step time: the median in CPU time (other work on the machine does not count), and in "
        "wall time; vs plain: the median of the per-round ratios of CPU times; warm-up: wall time of the "
        "warm-up steps. Loss: the largest relative difference from the "
        "plain path's loss over all steps. Saved: the tensors held for the backward pass of one step "
        "(not counted for compiled graphs). Peak RSS: a process of its own taking the warm-up and 3 steps "
        "(before: its RSS after setting up, before the first step).",
        "",
        "| config | batch | variant | CPU s/step | vs plain | wall s/step | warm-up s | loss rel. diff | saved MiB "
        "| peak RSS MiB | RSS before MiB |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["results"]:
        saved = "–" if r["saved_mib"] is None else f"{r['saved_mib']:.1f}"
        lines.append(f"| {r['config']} | {r['batch']} | {r['variant']} | {r['step_s']:.3f} | {r['vs_plain']:.2f} "
                     f"| {r['step_wall_s']:.3f} | {r['warmup_wall_s']:.1f} | {r['max_loss_rel_diff']:.1e} | {saved} "
                     f"| {r['peak_rss_mib']:.0f} | {r['rss_before_mib']:.0f} |")
    lines += ["", *closing_lines(result)]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
