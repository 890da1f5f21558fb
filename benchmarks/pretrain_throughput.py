"""MAE3D pre-training throughput: glmae vs MONAI's MaskedAutoEncoderViT, model vs data loader.

For each model size (the `mae3d_tiny` config, and ViT-B/16 at 96³ as in `mae3d_vit_base`) and
precision (fp32, bf16 autocast), one training step (forward, backward, AdamW) is timed for
glmae's MAE3D and for MONAI's MaskedAutoEncoderViT built with the same sizes (width, depth,
heads, MLP ratio, decoder width/depth/heads, patch, mask ratio, image size). Each measurement runs
in a fresh process so its peak RSS is its own. FLOPs per step are counted with
`torch.utils.flop_counter`; the achieved GFLOP/s are set against a large matmul measured in the
same run (the machine's practical peak). The data loader's crops/s are measured beside.

    python benchmarks/pretrain_throughput.py                     # both sizes, batch 2
    python benchmarks/pretrain_throughput.py --sizes base --batch 2 --steps 10 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch
from provenance import command, machine

SIZES = {
    # name: (config, overrides)
    "tiny": ("mae3d_tiny", []),
    "base": ("mae3d_vit_base", []),
}


def _cfg(size: str):
    from glmae.config import load_config

    name, overrides = SIZES[size]
    return load_config(name, overrides)


def _glmae_step_fn(cfg, batch_size):
    from glmae.methods.mae3d import MAE3D

    model = MAE3D(cfg.encoder, cfg.method)
    sample = model.sampler()
    roi = cfg.method.roi
    vol = types.SimpleNamespace(
        image=np.random.default_rng(0).random((1, *(s + 16 for s in roi)), dtype=np.float32),
        foreground_box=None,
    )
    items = [sample(vol, np.random.default_rng(i)) for i in range(batch_size)]
    batch = {k: torch.as_tensor(np.stack([it[k] for it in items])) for k in items[0]}
    return model, lambda: model(batch)[0]


def _monai_step_fn(cfg, batch_size):
    from monai.networks.nets import MaskedAutoEncoderViT

    from glmae.models.patches import patchify

    enc, m = cfg.encoder, cfg.method
    model = MaskedAutoEncoderViT(
        in_channels=enc.in_channels,
        img_size=m.roi,
        patch_size=enc.patch_size,
        hidden_size=enc.width,
        mlp_dim=int(enc.width * enc.mlp_ratio),
        num_layers=enc.depth,
        num_heads=enc.heads,
        masking_ratio=m.mask_ratio,
        decoder_hidden_size=m.decoder_width,
        decoder_mlp_dim=4 * m.decoder_width,
        decoder_num_layers=m.decoder_depth,
        decoder_num_heads=m.decoder_heads,
        qkv_bias=enc.qkv_bias,
    )
    images = torch.rand(batch_size, enc.in_channels, *m.roi)

    def step():
        pred, mask = model(images)
        target = patchify(images, enc.patch_size)
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        loss = ((pred.float() - target) ** 2).mean(-1)
        return (loss * mask).sum() / mask.sum()

    return model, step


def _measure(queue, impl, size, precision, batch_size, steps, warmup, threads):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = _cfg(size)
    model, step = (_glmae_step_fn if impl == "glmae" else _monai_step_fn)(cfg, batch_size)
    if impl == "glmae":  # the engine's optimiser
        from glmae.engine.optim import build_optimizer, param_groups

        opt = build_optimizer(param_groups(model, cfg.optim.weight_decay), cfg.optim)
    else:  # what a MONAI user writes: torch's AdamW, by default or with its fused kernel
        fused = impl == "monai+fused-adamw"
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=fused)
    dtype = torch.bfloat16 if precision == "bf16" else None

    def train_step():
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss = step()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    try:
        with counter:
            train_step()
    except RuntimeError as err:  # e.g. MONAI's MAE under bf16 autocast
        queue.put({"impl": impl, "size": size, "precision": precision, "error": str(err).splitlines()[0]})
        return
    for _ in range(warmup):
        train_step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        train_step()
        times.append(time.perf_counter() - t)
    queue.put(
        {
            "impl": impl,
            "size": size,
            "precision": precision,
            "batch": batch_size,
            "step_s": float(np.median(times)),
            "step_s_min": float(np.min(times)),
            "samples_per_s": batch_size / float(np.median(times)),
            "gflop_per_step": counter.get_total_flops() / 1e9,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
    )


def _run(target, *args):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(queue, *args))
    proc.start()
    while True:
        try:
            result = queue.get(timeout=5)
            break
        except Exception:
            if not proc.is_alive():
                raise RuntimeError(f"measurement {args} died with exit code {proc.exitcode}") from None
    proc.join()
    return result


def matmul_peak(dtype: torch.dtype, n: int = 4096, reps: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def _loader(queue, size, batch_size, workers, n_batches):
    """crops/s of the real pipeline: cached (memory-mapped .npy) volume -> crops -> DataLoader."""
    from glmae.engine.data import SampleDataset, SampleStream, make_loader
    from glmae.methods.mae3d import MAE3D

    cfg = _cfg(size)
    model = MAE3D(cfg.encoder, cfg.method)
    with tempfile.TemporaryDirectory() as tmp:
        vols = []
        for i in range(4):  # BTCV-like volumes after resampling to 1.5 x 1.5 x 2 mm
            path = Path(tmp) / f"v{i}.npy"
            np.save(path, np.random.default_rng(i).random((1, 256, 256, 128), dtype=np.float32))
            vols.append(types.SimpleNamespace(image=np.load(path, mmap_mode="r"), foreground_box=None))
        loader = make_loader(SampleDataset(vols, model.sampler()), SampleStream(4, 0, batch_size), workers)
        it = iter(loader)
        for _ in range(3):
            next(it)
        t = time.perf_counter()
        for _ in range(n_batches):
            next(it)
        queue.put({"size": size, "workers": workers, "crops_per_s": n_batches * batch_size / (time.perf_counter() - t)})
        del it, loader


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="tiny,base")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "pretrain_throughput.json")
    args = p.parse_args(argv)

    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"matmul peak: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s", flush=True)
    # rounds of every (size, precision, implementation), so drifts of a shared machine hit all alike;
    # each figure is the median over rounds of a per-process median step time
    runs: dict[tuple, list[dict]] = {}
    for _ in range(args.rounds):
        for size in args.sizes.split(","):
            for precision in args.precisions.split(","):
                for impl in ("glmae", "monai", "monai+fused-adamw"):
                    r = _run(_measure, impl, size, precision, args.batch, args.steps, args.warmup, args.threads)
                    runs.setdefault((size, precision, impl), []).append(r)
    rows = []
    for (size, precision, impl), results in runs.items():
        r = dict(results[0])
        if "error" in r:
            print(f"{size:5s} {precision} {impl:17s} fails: {r['error']}", flush=True)
            rows.append(r)
            continue
        r["step_s"] = float(np.median([x["step_s"] for x in results]))
        r["step_s_rounds"] = [x["step_s"] for x in results]
        r["samples_per_s"] = r["batch"] / r["step_s"]
        r["peak_rss_mb"] = max(x["peak_rss_mb"] for x in results)
        r["gflops"] = r["gflop_per_step"] / r["step_s"]
        r["peak_fraction"] = r["gflops"] / peaks[precision]
        rows.append(r)
        print(
            f"{size:5s} {precision} {impl:17s} step {r['step_s']:.3f}s  {r['samples_per_s']:.2f} samples/s  "
            f"{r['gflop_per_step']:.1f} GFLOP/step  {r['gflops']:.0f} GFLOP/s "
            f"({100 * r['peak_fraction']:.0f}% of {precision} matmul)  peak RSS {r['peak_rss_mb']:.0f} MB",
            flush=True,
        )
    by_key = {(r["size"], r["precision"], r["impl"]): r for r in rows}
    ratios = []
    # MONAI's MAE runs in fp32 only (it fails under bf16 autocast), so every ratio is against fp32
    for size in args.sizes.split(","):
        for precision in args.precisions.split(","):
            for ref in ("monai", "monai+fused-adamw"):
                ours, theirs = by_key[(size, precision, "glmae")], by_key[(size, "fp32", ref)]
                if "error" in ours or "error" in theirs:
                    continue
                ratio = theirs["step_s"] / ours["step_s"]
                ratios.append({"size": size, "glmae": precision, "reference": f"{ref} fp32", "speedup": ratio})
                print(f"{size}: glmae {precision} is {ratio:.2f}x the step throughput of {ref} fp32", flush=True)
    loaders = []
    for size in args.sizes.split(","):
        for workers in (1, 2):
            r = _run(_loader, size, args.batch, workers, 30)
            loaders.append(r)
            print(f"loader {size} workers={workers}: {r['crops_per_s']:.1f} crops/s", flush=True)
    result = {
        "machine": machine(),
        "command": command(__file__, argv),
        "matmul_peak_gflops": peaks,
        "steps": rows,
        "ratios": ratios,
        "loader": loaders,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


def markdown(result: dict) -> str:
    """The results as a report: step table, speed-ups, loader."""
    peaks = result["matmul_peak_gflops"]
    lines = [
        "# MAE3D pre-training throughput: glmae vs MONAI's MaskedAutoEncoderViT",
        "",
        f"Machine: {result['machine']}; matmul peak {peaks['fp32']:.0f} GFLOP/s fp32, {peaks['bf16']:.0f} bf16. "
        "One training step = forward, backward, AdamW; median over rounds of per-process medians.",
        "",
        "| size | precision | implementation | s/step | samples/s | GFLOP/s | % of matmul peak | peak RSS (MB) |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["steps"]:
        if "error" in r:
            lines.append(f"| {r['size']} | {r['precision']} | {r['impl']} | fails: {r['error'][:60]}… | | | | |")
        else:
            lines.append(f"| {r['size']} | {r['precision']} | {r['impl']} | {r['step_s']:.3f} "
                         f"| {r['samples_per_s']:.2f} | {r['gflops']:.0f} | {100 * r['peak_fraction']:.0f} "
                         f"| {r['peak_rss_mb']:.0f} |")
    lines += ["", "| size | glmae | reference | speed-up |", "|---|---|---|---:|"]
    lines += [f"| {r['size']} | {r['glmae']} | {r['reference']} | {r['speedup']:.2f}x |" for r in result["ratios"]]
    lines += ["", "| size | loader workers | crops/s |", "|---|---:|---:|"]
    lines += [f"| {r['size']} | {r['workers']} | {r['crops_per_s']:.0f} |" for r in result["loader"]]
    lines += ["", f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
