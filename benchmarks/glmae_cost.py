"""What a GL-MAE step costs, next to MAE3D on the same data.

Times one training step (forward, backward, AdamW, teacher update) of GL-MAE and of variants with
parts switched off, so the difference is the cost of that part:

- full GL-MAE (reconstruction of global and local views, g2g and l2g consistency, teacher);
- no consistency (no teacher forward, no heads): multi-view MAE3D;
- no local views;
- MAE3D on crops of the global-view size, the same number of volumes per batch;

plus the data side: views produced per second by one DataLoader worker. Volumes are phantoms
from `glmae synth` preprocessed with the config's settings.

    python benchmarks/glmae_cost.py                       # glmae_tiny, batch 2
    python benchmarks/glmae_cost.py --config glmae_vit_tiny --batch 1 --steps 3
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from provenance import closing_lines, commit, stamp, write


def step_time(model, batches, steps: int, dtype) -> float:
    from glmae.config import OptimConfig
    from glmae.engine.optim import build_optimizer, param_groups

    opt = build_optimizer(param_groups(model, 0.05), OptimConfig())
    times = []
    for i in range(steps + 2):
        batch = batches[i % len(batches)]
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss, _ = model(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if hasattr(model, "after_step"):
            model.after_step(i + 1, steps + 2, torch.ones(()))
        if i >= 2:  # the first steps build kernels
            times.append(time.perf_counter() - t)
    return float(np.median(times))


def collate(items):
    return {k: torch.as_tensor(np.stack([it[k] for it in items])) for k in items[0]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="glmae_tiny")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--amp", default="auto")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "glmae_cost.json")
    args = p.parse_args(argv)
    started, made_from = time.time(), commit()

    from glmae.config import load_config
    from glmae.data.formats import load_dataset
    from glmae.data.preprocess import Preprocessor
    from glmae.engine.data import SampleDataset, SampleStream, make_loader
    from glmae.engine.precision import amp_dtype
    from glmae.methods import GLMAE, MAE3D, MAE3DConfig
    from glmae.synth import write_dataset

    cfg = load_config(args.config)
    dtype = amp_dtype(args.amp, torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        shape = tuple(int(round(192 / s)) for s in cfg.data.spacing)  # phantoms at the config's spacing
        data = write_dataset(Path(tmp) / "ph", cases=4, seed=0, shape=shape)
        dataset = load_dataset(data)
        cfg.data.cache_dir = str(Path(tmp) / "cache")
        volumes = Preprocessor(cfg.data, dataset.modalities).prepare(dataset.cases, with_label=False, progress=False)

        m = cfg.method
        variants = {
            "GL-MAE (full)": {},
            "no consistency (multi-view MAE3D)": {"cons_g2g": False, "cons_l2g": False},
            "no local views": {"n_local": 0},
            "no reconstruction (consistency only)": {"rec_global": False, "rec_local": False},
        }
        rows = []
        for name, changes in variants.items():
            torch.manual_seed(0)
            model = GLMAE(cfg.encoder, dataclasses.replace(m, **changes))
            sample = model.sampler()
            batches = [collate([sample(volumes[(i + j) % 4], np.random.default_rng(i * 10 + j))
                                for j in range(args.batch)]) for i in range(3)]
            rows.append({"variant": name, "step_s": step_time(model, batches, args.steps, dtype)})
            print(f"{name:40s} {rows[-1]['step_s']:.3f} s/step", flush=True)
        torch.manual_seed(0)
        mae_cfg = MAE3DConfig(roi=m.global_size, mask_ratio=m.mask_ratio, norm_pix=m.norm_pix,
                              decoder_width=m.decoder_width, decoder_depth=m.decoder_depth,
                              decoder_heads=m.decoder_heads)
        mae = MAE3D(cfg.encoder, mae_cfg)
        sample = mae.sampler()
        batches = [collate([sample(volumes[(i + j) % 4], np.random.default_rng(i * 10 + j))
                            for j in range(args.batch)]) for i in range(3)]
        rows.append({"variant": f"MAE3D, one {m.global_size[0]}³ crop per volume", "step_s": step_time(mae, batches,
                                                                                                    args.steps, dtype)})
        print(f"{rows[-1]['variant']:40s} {rows[-1]['step_s']:.3f} s/step", flush=True)

        by = {r["variant"]: r["step_s"] for r in rows}
        full = by["GL-MAE (full)"]
        parts = {
            "teacher forward + heads + consistency": full - by["no consistency (multi-view MAE3D)"],
            "local views (encoder, decoder, l2g)": full - by["no local views"],
            "decoder + reconstruction": full - by["no reconstruction (consistency only)"],
        }
        for name, seconds in parts.items():
            print(f"  cost of {name:38s} {seconds:.3f} s ({100 * seconds / full:.0f}% of the step)")

        loaders = {}
        for name, model_cls, mc in (("GL-MAE views", GLMAE, m), ("MAE3D crops", MAE3D, mae_cfg)):
            model = model_cls(cfg.encoder, mc)
            loader = make_loader(SampleDataset(volumes, model.sampler()), SampleStream(4, 0, args.batch), 1)
            it = iter(loader)
            next(it)
            t = time.perf_counter()
            n = 10
            for _ in range(n):
                next(it)
            per_s = n * args.batch / (time.perf_counter() - t)
            loaders[name] = per_s
            print(f"data: {name}: {per_s:.1f} volumes/s with one worker "
                  f"({args.batch / per_s:.3f} s per batch)", flush=True)
            del it, loader

    result = {
        "config": args.config,
        "batch": args.batch,
        "amp": str(dtype),
        **stamp(__file__, argv, started, made_from),
        "steps": rows,
        "parts": parts,
        "loader_volumes_per_s": loaders,
    }
    write(args.out, result, markdown(result))


def markdown(result: dict) -> str:
    full = result["steps"][0]["step_s"]
    lines = [
        f"# What a GL-MAE step costs (`{result['config']}`, batch {result['batch']}, {result['amp']})",
        "",
        "Median time of a training step (forward, backward, AdamW, teacher update).",
        "",
        "| variant | s/step | vs full GL-MAE |",
        "|---|---:|---:|",
    ]
    lines += [f"| {r['variant']} | {r['step_s']:.3f} | {r['step_s'] / full:.2f} |" for r in result["steps"]]
    lines += ["", "| part (full minus the variant without it) | s | share of the step |", "|---|---:|---:|"]
    lines += [f"| {k} | {v:.3f} | {100 * v / full:.0f}% |" for k, v in result["parts"].items()]
    lines += ["", "| data (one DataLoader worker) | volumes/s | s per batch |", "|---|---:|---:|"]
    lines += [f"| {k} | {v:.1f} | {result['batch'] / v:.3f} |" for k, v in result["loader_volumes_per_s"].items()]
    lines += ["", *closing_lines(result)]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
