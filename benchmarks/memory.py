"""Peak memory of `glmae predict` over many scans, and of fine-tuning validation on large volumes.

1. `glmae predict` (the real command, a fresh process per row, a fresh preprocessing cache) over
   folders of 1, 5 and 20 synthetic phantoms (`glmae synth`, 128x128x96 at 1.5x1.5x2 mm) with an
   `unetr_tiny` checkpoint of the 14 phantom classes. Memory must not grow with the number of cases.
2. The validation of `glmae finetune` (`glmae.methods.validation.evaluate_volumes`, also what `glmae
   evaluate` runs) on one preprocessed volume of 64³ .. 256³ voxels, far larger than the 64x64x48
   ROI, memory-mapped from .npy files as the cache serves it. Its growth over the process before
   the call is compared with the bound stated in the report (`bound_bytes`).

Peak RSS is the child's `ru_maxrss` (os.wait4). Linux starts a child's high-water mark at its
parent's RSS, so this script's own process stays small (standard library only) and every heavy step,
the set-up included, runs in a child: each row is its own process's high-water mark.

    python benchmarks/memory.py                                  # 1, 5, 20 cases; 64³ .. 256³
    python benchmarks/memory.py --cases 1 5 --sizes 64 128       # quicker

Writes benchmarks/results/memory.md and memory.json (the command, the machine, the tables).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from provenance import closing_lines, commit, machine, stamp, write

HERE = Path(__file__).resolve()
RESULTS = HERE.parent / "results"
MIB = 2**20


def bound_bytes(voxels: int, classes: int) -> int:
    """What validation may add on top of the model, per the algorithm: the stitched logits and the
    blending weights (4 bytes x (K + 1) per voxel), a float32 copy of the image (4), the class map
    and target (argmax in int64: 8, uint8 maps and masks: ~4), plus 256 MiB for the windows'
    activations and allocator slack."""
    return voxels * (4 * (classes + 1) + 4 + 8 + 4) + 256 * MIB


def run_measured(cmd: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """(peak RSS in MiB, seconds, stdout) of a child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    out, err = proc.stdout.read(), proc.stderr.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err}")
    return usage.ru_maxrss / 1024, time.perf_counter() - start, out


def checkpoint_for_phantoms(path: Path) -> Path:
    """An `unetr_tiny` fine-tuning checkpoint (fresh weights) for the phantoms' 14 classes."""
    import torch

    from glmae import config as cfglib
    from glmae.config import load_config
    from glmae.engine import checkpoint
    from glmae.methods import SEGMENTATION
    from glmae.synth import LABELS

    labels = "{" + ", ".join(f"{k}: {v}" for k, v in LABELS.items()) + "}"
    cfg = load_config("unetr_tiny", [f"method.labels={labels}", "data.intensity=ct"])
    torch.manual_seed(0)
    model = SEGMENTATION[cfg.method.name](cfg.encoder, cfg.method)
    checkpoint.save({"kind": "finetune", "config": cfglib.to_dict(cfg), "step": 0, "model": model.state_dict()}, path)
    return path


def setup_child(work: str, cases: int, sizes: list[int]) -> None:
    """Child mode: the phantoms, the checkpoint and the validation volumes (WORK/volume_N/image.npy,
    label.npy: what the preprocessing cache holds); prints JSON with the machine's description."""
    import numpy as np

    from glmae.synth import write_dataset

    write_dataset(Path(work) / "phantoms", cases=cases, seed=0)
    checkpoint_for_phantoms(Path(work) / "best.pt")
    rng = np.random.default_rng(0)
    for size in sizes:
        folder = Path(work) / f"volume_{size}"
        folder.mkdir()
        np.save(folder / "image.npy", rng.random((1, size, size, size), dtype=np.float32))
        np.save(folder / "label.npy", rng.integers(0, 14, (size, size, size), dtype=np.uint8))
    print(json.dumps({"machine": machine()}))


def predict_rows(counts: list[int], work: Path, ckpt: Path) -> list[dict]:
    phantoms = work / "phantoms"
    rows = []
    for n in counts:
        folder = work / f"scans_{n}"
        folder.mkdir()
        for i in range(n):
            (folder / f"case_{i:04d}.nii.gz").symlink_to(phantoms / "imagesTr" / f"case_{i:04d}.nii.gz")
        env = {**os.environ, "GLMAE_CACHE_DIR": str(work / f"cache_{n}")}
        cmd = [sys.executable, "-m", "glmae", "predict", "--checkpoint", str(ckpt), "--input", str(folder),
               "--out", str(work / f"masks_{n}")]
        peak, seconds, _ = run_measured(cmd, env)
        rows.append({"cases": n, "peak_rss_mib": round(peak, 1), "seconds": round(seconds, 1),
                     "seconds_per_case": round(seconds / n, 2)})
        print(f"predict over {n:3d} case(s): peak RSS {peak:7.1f} MiB, {seconds:.1f} s", flush=True)
    return rows


def current_rss_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB


def validation_child(size: int, ckpt: str, folder: str) -> None:
    """Child mode: validation of one size³ volume; prints JSON with the RSS before the call."""
    import numpy as np
    import torch

    from glmae.data.preprocess import Volume
    from glmae.engine.run import load_finetuned
    from glmae.methods.segmentation import out_channels
    from glmae.methods.validation import evaluate_volumes

    cfg, model = load_finetuned(Path(ckpt))
    volume = Volume("v", np.load(f"{folder}/image.npy", mmap_mode="r"), np.load(f"{folder}/label.npy", mmap_mode="r"),
                    np.eye(4), ((0, size),) * 3, {})
    before = current_rss_mib()  # imports and model; the volume is on disk, mapped, not yet read
    start = time.perf_counter()
    metrics = evaluate_volumes(model.net, [volume], cfg, torch.device("cpu"))
    print(json.dumps({"before_mib": before, "seconds": time.perf_counter() - start,
                      "classes": out_channels(cfg.method), "n_cases": metrics["n_cases"]}))


def validation_rows(sizes: list[int], work: Path, ckpt: Path) -> list[dict]:
    rows = []
    for size in sizes:
        folder = work / f"volume_{size}"
        peak, _, out = run_measured([sys.executable, str(HERE), "--validation-child", str(size), str(ckpt),
                                     str(folder)])
        child = json.loads(out.strip().splitlines()[-1])
        voxels = size**3
        growth = peak - child["before_mib"]
        bound = bound_bytes(voxels, child["classes"]) / MIB
        rows.append({"size": f"{size}³", "voxels": voxels, "before_mib": round(child["before_mib"], 1),
                     "peak_rss_mib": round(peak, 1), "growth_mib": round(growth, 1),
                     "growth_bytes_per_voxel": round(growth * MIB / voxels, 1), "bound_mib": round(bound, 1),
                     "within_bound": growth <= bound, "seconds": round(child["seconds"], 1)})
        print(f"validation on {size:3d}³: peak RSS {peak:7.1f} MiB (+{growth:.1f} over {child['before_mib']:.1f}; "
              f"bound {bound:.1f}), {child['seconds']:.1f} s", flush=True)
        for name in ("image.npy", "label.npy"):
            (folder / name).unlink()
    for previous, row in zip(rows, rows[1:]):  # the cost of one more voxel, without the fixed part
        row["marginal_bytes_per_voxel"] = round(
            (row["growth_mib"] - previous["growth_mib"]) * MIB / (row["voxels"] - previous["voxels"]), 1
        )
    return rows


def markdown(result: dict) -> str:
    lines = [
        "# Memory: prediction over many scans, validation on large volumes",
        "",
        f"Date: {result['date']}",
        "",
        "Seconds are wall-clock time on a machine shared with other jobs: indicative only.",
        "",
        "## `glmae predict` over a folder of phantoms (128x128x96, unetr_tiny, 14 classes)",
        "",
        "Peak RSS of the whole command (fresh process, cold preprocessing cache).",
        "",
        "| cases | peak RSS (MiB) | seconds | seconds per case |",
        "|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['cases']} | {r['peak_rss_mib']} | {r['seconds']} | {r['seconds_per_case']} |"
              for r in result["predict"]]
    lines += [
        "",
        "## Fine-tuning validation (`evaluate_volumes`) on one volume, ROI 64x64x48",
        "",
        "Growth = peak RSS minus the RSS just before the call (model loaded, volume memory-mapped from .npy "
        "files as the cache serves it, not yet read). Bound: "
        "4·(K+1) + 16 bytes per voxel + 256 MiB, K = 14 classes (stitched logits and blending weights, "
        "image copy, class maps).",
        "",
        "Marginal: growth added per voxel since the previous row (the fixed part, window activations and "
        "allocator pools, cancels out). The checkpoint's `train.amp: auto` runs the windows in bfloat16 "
        "on this CPU (AMX); the stitched logits are float32.",
        "",
        "| volume | voxels | before (MiB) | peak RSS (MiB) | growth (MiB) | marginal bytes/voxel | bound (MiB) "
        "| within | s |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    lines += [f"| {r['size']} | {r['voxels']:,} | {r['before_mib']} | {r['peak_rss_mib']} | {r['growth_mib']} | "
              f"{r.get('marginal_bytes_per_voxel', '')} | {r['bound_mib']} | {'yes' if r['within_bound'] else 'NO'} "
              f"| {r['seconds']} |" for r in result["validation"]]
    lines += ["", *closing_lines(result)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, nargs="+", default=[1, 5, 20])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 192, 256])
    parser.add_argument("--out", type=Path, default=RESULTS / "memory.json")
    parser.add_argument("--validation-child", nargs=3, metavar=("SIZE", "CKPT", "FOLDER"), help=argparse.SUPPRESS)
    parser.add_argument("--setup-child", nargs="+", metavar="WORK CASES SIZE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.validation_child:
        size, ckpt, folder = args.validation_child
        validation_child(int(size), ckpt, folder)
        return
    if args.setup_child:
        setup_child(args.setup_child[0], int(args.setup_child[1]), [int(n) for n in args.setup_child[2:]])
        return
    os.environ.setdefault("MPLBACKEND", "Agg")
    started, made_from = time.time(), commit()
    with tempfile.TemporaryDirectory(prefix="glmae-memory-") as tmp:
        work, ckpt = Path(tmp), Path(tmp) / "best.pt"
        setup = [sys.executable, str(HERE), "--setup-child", tmp, str(max(args.cases)), *map(str, args.sizes)]
        _, _, out = run_measured(setup)
        described = json.loads(out.strip().splitlines()[-1])["machine"]
        result = {
            "date": time.strftime("%Y-%m-%d"),
            "predict": predict_rows(sorted(args.cases), work, ckpt),
            "validation": validation_rows(sorted(args.sizes), work, ckpt),
        }
    result = {**stamp(__file__, argv, started, made_from, described), **result}
    write(args.out, result, markdown(result))


if __name__ == "__main__":
    main()
