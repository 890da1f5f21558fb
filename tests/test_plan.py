"""`glmae plan`: its FLOPs against a count by hand, its fake-tensor counts against the same step on
real tensors, its predicted step time against a measured one, its arithmetic, the command, and a
plan for every paper-scale config (each one's training step runs)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from glmae import plan as planning
from glmae.config import available, load_config

ENCODER = {"arch": "vit", "patch_size": 4, "width": 48, "depth": 2, "heads": 4, "drop_path": 0.0}
DECODER = {"decoder_width": 24, "decoder_depth": 1, "decoder_heads": 2}
COMMON = {"encoder": ENCODER, "data": {"num_workers": 1},
          "train": {"batch_size": 2, "amp": "off", "device": "cpu", "max_steps": 10}}
METHODS = {
    "mae3d": {"task": "pretrain", "method": {"name": "mae3d", "roi": [16, 16, 8], **DECODER}},
    "glmae": {"task": "pretrain", "method": {
        "name": "glmae", "n_global": 2, "n_local": 2, "global_size": [16, 16, 16], "local_size": [8, 8, 8],
        "head_hidden": 32, "head_out": 16, **DECODER}},
    "gmim": {"task": "pretrain", "encoder": {"arch": "swin", "feature_size": 12, "depths": [1, 1, 1, 1],
                                             "heads": [1, 2, 2, 4], "window": 4, "patch_size": 2},
             "method": {"name": "gmim", "roi": [64, 32, 32], "proj_dim": 16}},
    "unetr": {"task": "finetune", "method": {"name": "unetr", "roi": [16, 16, 16], "feature_size": 4,
                                             "labels": {0: "background", 1: "cube"}}},
    "classifier": {"task": "finetune", "encoder": {**ENCODER, "patch_size": [4, 4, 1]},
                   "method": {"name": "classifier", "roi": [16, 16, 1], "findings": ["a", "b"]},
                   "data": {"image_size": [24, 24], "num_workers": 1}},
}


def config(kind, *overrides):
    spec = METHODS[kind]
    return load_config({**COMMON, **spec, "encoder": spec.get("encoder", ENCODER)}, list(overrides))


@pytest.fixture
def no_loader_timing(monkeypatch):
    """The sampler's rate, fixed at 10 samples/s instead of timed for a second."""
    monkeypatch.setattr(planning, "sampler_rate", lambda sampler, item, seconds=1.0: 10.0)


# --- FLOPs: by hand -----------------------------------------------------------------------------


def mae_flops_by_hand(cfg, keep: int, masked: int) -> float:
    """Model FLOPs of one MAE3D sample, forward and backward. A product of an (n, a) and an (a, b)
    matrix is 2nab FLOPs; its backward pass is two such products (the gradients of both factors),
    one where the first factor is data (the patch embedding); attention over L tokens of width d is
    2 products of 2L²d FLOPs forward and 5 backward (flash attention computes the scores again)."""
    e, m = cfg.encoder, cfg.method
    patch = e.in_channels * math.prod(e.patch)

    def blocks(n, width, depth, mlp_ratio):
        linear = 2 * n * width * (3 * width + width + 2 * int(width * mlp_ratio))  # qkv, out, MLP in and out
        return depth * linear, depth * 2 * 2 * n * n * width

    encoder, encoder_attention = blocks(keep, e.width, e.depth, e.mlp_ratio)
    decoder, decoder_attention = blocks(keep + masked, m.decoder_width, m.decoder_depth, 4.0)
    embed = 2 * keep * patch * e.width
    linear = encoder + 2 * keep * e.width * m.decoder_width + decoder + 2 * masked * m.decoder_width * patch
    return 2 * embed + 3 * linear + 3.5 * (encoder_attention + decoder_attention)


@pytest.mark.parametrize("overrides", [[], ["method.roi=[32,32,16]", "encoder.depth=3", "method.mask_ratio=0.5"]])
def test_flops_per_sample_are_those_counted_by_hand(no_loader_timing, overrides):
    cfg = config("mae3d", *overrides)
    tokens = math.prod(n // 4 for n in cfg.method.roi)
    keep = round(tokens * (1 - cfg.method.mask_ratio))
    plan = planning.plan(cfg, "mae3d")
    assert plan.flops == mae_flops_by_hand(cfg, keep, tokens - keep)


# --- fake tensors: the same counts as real ones -------------------------------------------------


@pytest.mark.parametrize("kind, amp", [*((k, "off") for k in METHODS), ("glmae", "bf16"), ("unetr", "bf16")])
def test_the_fake_step_counts_what_a_real_step_saves_and_computes(no_loader_timing, kind, amp):
    """The plan's figures, counted on fake tensors, against one training step of the same model on
    real tensors and samples (saved tensors with saved_tensors_hooks, FLOPs with FlopCounterMode)."""
    cfg = config(kind, f"train.amp={amp}")
    plan = planning.plan(cfg, kind)
    cfg, _ = planning.planned(cfg)
    torch.manual_seed(0)
    model = planning.build(cfg)
    sampler, item = model.sampler(), planning.synthetic_item(cfg, np.random.default_rng(0))
    batch = planning.collate([sampler(item, np.random.default_rng(i)) for i in range(cfg.train.batch_size)])
    real = planning.count_step(model, batch, planning.gpu_dtype(amp))
    assert real.flops > 0 and real.saved_bytes > 0
    assert plan.flops * cfg.train.batch_size == real.flops
    # under bf16, fake LayerNorms save their statistics (two numbers per token) in bf16 where the
    # CPU's kernel keeps them in fp32: a few bytes per token and norm, under 1%
    assert plan.activation_bytes == pytest.approx(real.saved_bytes, rel=0 if amp == "off" else 0.01)
    assert plan.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_saved_tensors_are_linear_in_the_batch_and_halved_by_grad_checkpointing(no_loader_timing):
    one, four = (planning.plan(config("mae3d", f"train.batch_size={b}"), "mae3d") for b in (1, 4))
    assert four.activation_bytes == 4 * one.activation_bytes
    checkpointed = planning.plan(config("mae3d", "train.batch_size=4", "train.grad_checkpoint=true"), "mae3d")
    assert checkpointed.activation_bytes < 0.5 * four.activation_bytes


# --- time: predicted at a measured MFU, against a measured step ---------------------------------


@pytest.mark.slow
def test_step_time_predicted_at_an_mfu_measured_on_one_method_matches_another_methods_step(no_loader_timing):
    """MFU measured on MAE3D's steps; GL-MAE's and UNETR's steps predicted from their FLOPs at it:
    within a factor of 2 of their measured steps (one thread, in CPU time; 0.65-1.5x seen on 2 busy
    cores). A count without the backward pass would be 3x off."""
    sizes = ["encoder.width=96", "encoder.depth=4", "encoder.heads=4", "train.batch_size=4"]
    decoder = ["method.decoder_width=96", "method.decoder_heads=4", "method.decoder_depth=2"]
    reference = planning.measure(config("mae3d", *sizes, *decoder, "method.roi=[32,32,32]"), steps=5)
    assert reference.cpu_time and 0.05 < reference.mfu < 1
    for kind, more in (("glmae", [*decoder, "method.global_size=[32,32,32]"]),
                       ("unetr", ["method.roi=[32,32,32]", "method.feature_size=16"])):
        cfg = config(kind, *sizes, *more)
        measured = planning.measure(cfg, steps=5)
        plan = planning.plan(cfg, kind, mfu=reference.mfu, gpu_tflops=reference.peak_tflops)
        assert plan.flops * plan.batch == measured.flops
        assert 1 / 2 < plan.step_s / measured.step_s < 2, (kind, plan.step_s, measured.step_s)


# --- the arithmetic of the report -----------------------------------------------------------------


def test_memory_time_and_loader_figures(no_loader_timing):
    cfg = config("mae3d", "train.batch_size=4", "train.epochs=3", "data.num_workers=2")
    plan = planning.plan(cfg, "mae3d", gpus=2, gpu_memory=80, mfu=0.5, gpu_tflops=1e-3, cases=10)
    assert plan.global_batch == 8 and plan.total_steps == math.ceil(3 * 10 / 8)
    assert plan.step_s == pytest.approx(4 * plan.flops / (1e9 * 0.5))
    # the GPUs take 4 / step_s samples/s, 2 workers give 20
    assert plan.loader_factor == pytest.approx(max(1, 4 / plan.step_s / 20))
    trained = plan.trainable * 4
    assert plan.state_bytes >= plan.parameters * 4 + 4 * trained  # weights, gradients, 2 moments, DDP buckets
    assert plan.fits and plan.max_batch >= 4
    tight = planning.plan(cfg, "mae3d", gpus=2, gpu_memory=(plan.state_bytes + 2.5 * plan.activation_bytes / 4)
                          / 2**30 / planning.HEADROOM, cases=10)
    assert not tight.fits and tight.max_batch == 2
    assert planning.plan(config("mae3d", "train.batch_size=2"), "mae3d", gpus=2, gpu_memory=tight.gpu_memory).fits


def test_the_command_prints_each_figure(run_cli, no_loader_timing):
    code, out, err = run_cli("plan", "--config", "mae3d_tiny", "--gpus", "2", "--gpu-memory", "0.05",
                             "--mfu", "0.4", "--gpu-tflops", "100", "--cases", "1000")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("glmae plan: mae3d_tiny (mae3d, pretrain) on 2 GPU(s) of 0.05 GiB and 100 TFLOP/s")
    heads = [line.split()[0] for line in lines[1:]]
    assert heads == ["parameters", "sample", "FLOPs", "batch", "memory/GPU", "loader", "time"]
    assert "3.8 M trained" in out and "image 1 x 1x64x64x48" in out
    assert "4 per GPU x 1 accumulated x 2 GPU(s) = 8 per step" in out
    assert "the config's own batch, 4 on one process, is --set train.batch_size=2" in out
    assert "does NOT fit in 0.05 GiB" in out
    assert "an epoch of 1000 cases (--cases) = 125 steps" in out and "the run, 300 steps" in out


@pytest.mark.parametrize("option, value", [("--mfu", "1.5"), ("--mfu", "0"), ("--gpu-memory", "-1"), ("--cases", "0")])
def test_bad_options_are_one_line(run_cli, option, value):
    code, _, err = run_cli("plan", "--config", "mae3d_tiny", option, value)
    assert code == 2 and err.startswith("glmae: error: ") and option in err and "Traceback" not in err


def test_a_config_whose_step_cannot_run_is_one_line(run_cli, no_loader_timing):
    # mae2d_vit_base's decoder was 256 wide, which the 3D sin-cos table refuses
    code, _, err = run_cli("plan", "--config", "mae3d_tiny", "--set", "method.decoder_width=256",
                           "--set", "method.decoder_heads=8")
    assert code == 2 and err.startswith("glmae: error: config: a training step of mae3d_tiny fails: ")
    assert "width 256 must be divisible by 6" in err and len(err.splitlines()) == 1


def test_a_segmentation_config_without_labels_is_planned_with_btcv_s_and_says_so(run_cli, no_loader_timing):
    code, out, _ = run_cli("plan", "--config", "unetr_tiny")
    assert code == 0 and "assumed       14 output classes, BTCV's" in out


# --- every paper-scale config: its training step runs ----------------------------------------


def paper_scale():
    from test_configs import paper_scale as is_paper_scale

    return [name for name in available() if is_paper_scale(name)]


@pytest.mark.slow
@pytest.mark.parametrize("name", paper_scale())
def test_every_paper_scale_config_plans(no_loader_timing, name):
    plan = planning.plan(load_config(name), name, gpus=8)
    assert plan.flops > 1e9 and plan.activation_bytes > 0 and plan.trainable > 1e6
    assert "time " in planning.report(plan)


def test_the_cpu_attention_kernel_counts_as_its_matmuls():
    q, k, v = (torch.randn(2, 3, 10, 8) for _ in range(3))

    def flops(fn):
        counter = FlopCounterMode(display=False, custom_mapping=planning.cpu_attention_flops())
        with counter:
            fn()
        return counter.get_total_flops()

    explicit = flops(lambda: (q @ k.transpose(-1, -2)).softmax(-1) @ v)
    assert explicit == 2 * (2 * 2 * 3 * 10 * 10 * 8)  # two batched matmuls
    assert flops(lambda: F.scaled_dot_product_attention(q, k, v)) == explicit
