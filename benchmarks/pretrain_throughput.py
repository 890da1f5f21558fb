"""MAE3D pre-training throughput: glmae against MONAI's MaskedAutoEncoderViT, at equal work.

For each model size (`mae3d_tiny`; ViT-B/16 at 96³ as in `mae3d_vit_base`), precision (fp32, bf16
autocast) and AdamW kernel (torch's fused one, and its per-operation one), glmae's MAE3D and MONAI's
MaskedAutoEncoderViT built with the same sizes (width, depth, heads, MLP ratio, decoder width, depth
and heads, patch, mask ratio, image size, batch) are timed in a fresh process each, with the same
optimizer on both sides: the engine's AdamW over the engine's parameter groups, fused or not on
both. Two times are measured, alternately within the process: the model alone (forward + backward)
and the full training step (forward, backward, AdamW). The rounds are interleaved (every
measurement of a round before the next round, in reversed order every other round), so drifts of a
shared machine hit both sides alike; each figure is the median over rounds of per-process medians.

FLOPs per step (forward + backward; AdamW's element-wise update is not counted) come from
`torch.utils.flop_counter`. It has no formula for the fused CPU attention kernel that glmae's
attention calls (`F.scaled_dot_product_attention`), so glmae's attention would count as zero; this
script counts it as `glmae plan` does (`glmae.plan.cpu_attention_flops`, torch's flash-attention
formula), which counts the backward's recomputation of the attention scores (2.5x the forward;
MONAI's explicit matmuls count 2x). The report says where
the two sides' FLOPs differ. The achieved GFLOP/s are set against a large matmul measured in the same
run, and the data loader's crops/s are measured beside.

    python benchmarks/pretrain_throughput.py                     # both sizes, batch 2, 3 rounds
    python benchmarks/pretrain_throughput.py --sizes base --precisions fp32 --rounds 5
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch
from provenance import closing_lines, commit, stamp, write

SIZES = {"tiny": "mae3d_tiny", "base": "mae3d_vit_base"}
IMPLS = ("glmae", "monai")
ADAMW = {"fused": True, "plain": False}
# the ops of the patch embedding (MONAI's convolution) and of attention on each side
EMBEDDING = ("aten.convolution", "aten.convolution_backward")
ATTENTION = ("aten._scaled_dot_product_flash_attention_for_cpu",
             "aten._scaled_dot_product_flash_attention_for_cpu_backward", "aten.bmm")


def _cfg(size: str):
    from glmae.config import load_config

    return load_config(SIZES[size])


def _glmae_model(cfg, batch_size):
    """glmae's MAE3D and a loss function of one batch of random crops with their masks."""
    from glmae.methods.mae3d import MAE3D

    model = MAE3D(cfg.encoder, cfg.method)
    sample = model.sampler()
    vol = types.SimpleNamespace(
        image=np.random.default_rng(0).random((1, *(s + 16 for s in cfg.method.roi)), dtype=np.float32),
        foreground_box=None,
    )
    items = [sample(vol, np.random.default_rng(i)) for i in range(batch_size)]
    batch = {k: torch.as_tensor(np.stack([it[k] for it in items])) for k in items[0]}
    return model, lambda: model(batch)[0]


def _monai_model(cfg, batch_size):
    """MONAI's MaskedAutoEncoderViT of the same sizes and the same loss (norm-pix MSE on masked patches)."""
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

    def loss():
        pred, mask = model(images)
        target = patchify(images, enc.patch_size)
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        per_patch = ((pred.float() - target) ** 2).mean(-1)
        return (per_patch * mask).sum() / mask.sum()

    return model, loss


MODELS = {"glmae": _glmae_model, "monai": _monai_model}


def _measure(queue, impl, size, precision, adamw, batch_size, steps, warmup, threads):
    from torch.utils.flop_counter import FlopCounterMode

    from glmae.engine.optim import build_optimizer, param_groups, set_lr
    from glmae.plan import cpu_attention_flops

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = _cfg(size)
    model, loss_fn = MODELS[impl](cfg, batch_size)
    opt = build_optimizer(param_groups(model, cfg.optim.weight_decay), cfg.optim, fused=ADAMW[adamw])
    set_lr(opt, 1e-4, 0)
    dtype = torch.bfloat16 if precision == "bf16" else None

    def model_only():
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss = loss_fn()
        loss.backward()
        model.zero_grad(set_to_none=True)

    def full_step():
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    counter = FlopCounterMode(display=False, custom_mapping=cpu_attention_flops())
    key = {"impl": impl, "size": size, "precision": precision, "adamw": adamw}
    try:
        with counter:
            model_only()
    except RuntimeError as err:  # MONAI's MAE under bf16 autocast
        queue.put({**key, "error": str(err).splitlines()[0]})
        return
    for _ in range(warmup):
        full_step()
    times = {"model_s": [], "step_s": []}
    for _ in range(steps):  # alternately, so both see the same state of the machine
        for name, fn in (("model_s", model_only), ("step_s", full_step)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    by_op = {str(op): n / 1e9 for op, n in counter.get_flop_counts()["Global"].items()}
    queue.put({**key, "batch": batch_size, **{k: float(np.median(v)) for k, v in times.items()},
               "gflop_per_step": counter.get_total_flops() / 1e9, "gflop_by_op": by_op,
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


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


def summarise(runs: dict[tuple, list[dict]], peaks: dict) -> list[dict]:
    """One row per (size, precision, AdamW, implementation): medians over the rounds."""
    rows = []
    for results in runs.values():
        r = dict(results[0])
        if "error" not in r:
            for key in ("model_s", "step_s"):
                r[f"{key}_rounds"] = [x[key] for x in results]
                r[key] = float(np.median(r[f"{key}_rounds"]))
            r["samples_per_s"] = r["batch"] / r["step_s"]
            r["peak_rss_mb"] = max(x["peak_rss_mb"] for x in results)
            r["gflops"] = r["gflop_per_step"] / r["step_s"]
            r["peak_fraction"] = r["gflops"] / peaks[r["precision"]]
        rows.append(r)
    return rows


def comparisons(rows: list[dict]) -> list[dict]:
    """MONAI's time over glmae's (above 1: glmae is faster), model only and full step, and glmae's
    FLOPs over MONAI's, wherever both ran with the same precision and the same AdamW."""
    by = {(r["size"], r["precision"], r["adamw"], r["impl"]): r for r in rows}
    out = []
    for (size, precision, adamw, impl), ours in by.items():
        theirs = by.get((size, precision, adamw, "monai"))
        if impl != "glmae" or theirs is None or "error" in ours or "error" in theirs:
            continue
        out.append({"size": size, "precision": precision, "adamw": adamw,
                    "model_speedup": theirs["model_s"] / ours["model_s"],
                    "step_speedup": theirs["step_s"] / ours["step_s"],
                    "flop_ratio": ours["gflop_per_step"] / theirs["gflop_per_step"]})
    return out


def flop_lines(rows: list[dict]) -> list[str]:
    """Why the two sides count different FLOPs, per size, from the counted operations."""
    out = []
    for size in dict.fromkeys(r["size"] for r in rows):
        ok = {r["impl"]: r for r in rows if r["size"] == size and "error" not in r}
        if set(ok) != set(IMPLS):
            continue
        ours, theirs = ok["glmae"], ok["monai"]
        part = lambda r, ops: sum(v for k, v in r["gflop_by_op"].items() if k in ops)  # noqa: E731
        fewer = 1 - ours["gflop_per_step"] / theirs["gflop_per_step"]
        out.append(
            f"- {size}: glmae {ours['gflop_per_step']:.1f} GFLOP per step, MONAI {theirs['gflop_per_step']:.1f} "
            f"({100 * abs(fewer):.0f}% {'fewer' if fewer >= 0 else 'more'} in glmae). MONAI's patch embedding, a "
            f"convolution over every patch before masking, counts {part(theirs, EMBEDDING):.1f} GFLOP (forward "
            f"and backward); glmae embeds only the visible patches, with a linear layer. glmae's decoder predicts "
            f"pixels for the masked tokens only, and glmae has no cls token. Attention counts "
            f"{part(ours, ATTENTION):.1f} GFLOP in glmae (the fused kernel, its backward recomputing the scores) "
            f"and {part(theirs, ATTENTION):.1f} in MONAI (explicit matmuls).")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="tiny,base")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=8, help="timed steps of each kind per process")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--peak-size", type=int, default=4096, help="side of the matmul that measures the peak")
    p.add_argument("--loader-batches", type=int, default=30)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "pretrain_throughput.json")
    args = p.parse_args(argv)
    started, made_from = time.time(), commit()

    peaks = {name: matmul_peak(dtype, args.peak_size) for name, dtype in (("fp32", torch.float32),
                                                                        ("bf16", torch.bfloat16))}
    print(f"matmul peak: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s", flush=True)
    plan = [(size, precision, adamw, impl) for size in args.sizes.split(",") for precision in args.precisions.split(",")
            for adamw in ADAMW for impl in IMPLS]
    runs: dict[tuple, list[dict]] = {}
    for i in range(args.rounds):
        for size, precision, adamw, impl in plan if i % 2 == 0 else plan[::-1]:
            r = _run(_measure, impl, size, precision, adamw, args.batch, args.steps, args.warmup, args.threads)
            runs.setdefault((size, precision, adamw, impl), []).append(r)
            took = f"fails: {r['error']}" if "error" in r else f"model {r['model_s']:.3f} s, step {r['step_s']:.3f} s"
            print(f"round {i + 1}: {size} {precision} {adamw} AdamW {impl}: {took}", flush=True)
    rows = summarise(runs, peaks)
    loaders = []
    for size in args.sizes.split(","):
        for workers in (1, 2):
            r = _run(_loader, size, args.batch, workers, args.loader_batches)
            loaders.append(r)
            print(f"loader {size} workers={workers}: {r['crops_per_s']:.1f} crops/s", flush=True)
    result = {
        **stamp(__file__, argv, started, made_from),
        "batch": args.batch,
        "rounds": args.rounds,
        "matmul_peak_gflops": peaks,
        "steps": rows,
        "comparisons": comparisons(rows),
        "loader": loaders,
    }
    write(args.out, result, markdown(result))


def markdown(result: dict) -> str:
    """The report: the measurements, glmae against MONAI at equal work, where the FLOPs differ, the loader."""
    peaks = result["matmul_peak_gflops"]
    lines = [
        "# MAE3D pre-training throughput: glmae against MONAI's MaskedAutoEncoderViT, at equal work",
        "",
        f"Batch {result['batch']}; the same optimizer on both sides (the engine's AdamW and parameter groups), "
        "once with torch's fused kernel and once with its per-operation one. Model = forward + backward; "
        "step = forward, backward, AdamW. Each figure is the median over "
        f"{result['rounds']} interleaved round(s) of per-process medians (a fresh process per measurement). "
        f"Matmul peak of this machine: {peaks['fp32']:.0f} GFLOP/s fp32, {peaks['bf16']:.0f} bf16.",
        "",
        "| size | precision | AdamW | implementation | model s | step s | samples/s | GFLOP/step | GFLOP/s "
        "| % of matmul peak | peak RSS (MB) |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["steps"]:
        key = f"| {r['size']} | {r['precision']} | {r['adamw']} | {r['impl']} |"
        if "error" in r:
            lines.append(f"{key} fails: {r['error'][:60]}… | | | | | | |")
        else:
            lines.append(f"{key} {r['model_s']:.3f} | {r['step_s']:.3f} | {r['samples_per_s']:.2f} "
                         f"| {r['gflop_per_step']:.1f} | {r['gflops']:.0f} | {100 * r['peak_fraction']:.0f} "
                         f"| {r['peak_rss_mb']:.0f} |")
    lines += ["", "glmae against MONAI with the same precision and AdamW (MONAI's time / glmae's: above 1, glmae is "
              "faster):", "",
              "| size | precision | AdamW | model | step | glmae FLOPs / MONAI's |", "|---|---|---|---:|---:|---:|"]
    lines += [f"| {c['size']} | {c['precision']} | {c['adamw']} | {c['model_speedup']:.2f}x | {c['step_speedup']:.2f}x "
              f"| {c['flop_ratio']:.2f} |" for c in result["comparisons"]]
    lines += ["", "Where the FLOPs differ (fp32, fused AdamW):", "",
              *flop_lines([r for r in result["steps"] if r["precision"] == "fp32" and r["adamw"] == "fused"])]
    lines += ["", "| size | loader workers | crops/s |", "|---|---:|---:|"]
    lines += [f"| {r['size']} | {r['workers']} | {r['crops_per_s']:.0f} |" for r in result["loader"]]
    lines += ["", *closing_lines(result)]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
