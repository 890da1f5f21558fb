"""The shared training engine: schedule, parameter groups, sample stream, checkpoints, resume,
non-finite losses and signals (data parallelism: test_engine_distributed.py)."""

import os
import re
import signal
import types

import numpy as np
import pytest
import torch

from glmae.config import load_config
from glmae.engine import checkpoint, distributed
from glmae.engine.data import SampleDataset, SampleStream
from glmae.engine.logger import read_log
from glmae.engine.optim import lr_at, param_groups, peak_lr
from glmae.engine.precision import amp_dtype
from glmae.engine.trainer import fit
from glmae.errors import InputError, Interrupted, TrainingError
from glmae.methods.mae3d import MAE3D

TINY = {
    "task": "pretrain",
    "encoder": {"arch": "vit", "patch_size": 4, "width": 24, "depth": 2, "heads": 2},
    "method": {"name": "mae3d", "roi": [16, 16, 8], "decoder_width": 12, "decoder_depth": 1, "decoder_heads": 2},
    "data": {"num_workers": 0},
    "optim": {"lr": 1e-3, "lr_scaling": "none", "warmup_steps": 2},
    "train": {"max_steps": 8, "batch_size": 2, "log_every": 1, "ckpt_every": 4, "amp": "off", "device": "cpu"},
}


def tiny_cfg(*overrides):
    return load_config(TINY, list(overrides))


def fake_volumes(n=3):
    rng = np.random.default_rng(0)
    vols = []
    for _ in range(n):
        image = np.zeros((1, 24, 24, 16), np.float32)
        image[:, 4:20, 4:20, 2:14] = rng.random((1, 16, 16, 12))
        vols.append(types.SimpleNamespace(image=image, foreground_box=((4, 20), (4, 20), (2, 14))))
    return vols


def train(cfg, run_dir, model_cls=MAE3D, resume=False, env=None):
    torch.manual_seed(cfg.train.seed)
    model = model_cls(cfg.encoder, cfg.method)
    env = env or distributed.init("cpu")
    return fit(model, cfg, SampleDataset(fake_volumes(), model.sampler()), run_dir, env, resume=resume)


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_log(run_dir / "log.jsonl") if "loss" in r}


# --- schedule and parameter groups ------------------------------------------------------------


def test_lr_schedule_warmup_then_cosine():
    assert lr_at(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(10, 100, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(55, 100, 1.0, 10, min_lr=0.2) == pytest.approx(0.6)  # half way down the cosine
    assert lr_at(100, 100, 1.0, 10, min_lr=0.2) == pytest.approx(0.2)


def test_linear_scaling_rule():
    cfg = tiny_cfg("optim.lr_scaling=linear", "optim.lr=1.5e-4")
    assert peak_lr(cfg.optim, 512) == pytest.approx(3e-4)


def test_norms_and_biases_are_not_decayed():
    model = MAE3D(tiny_cfg().encoder, tiny_cfg().method)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in param_groups(model, 0.05):
        for p in group["params"]:
            decayed = group["weight_decay"] > 0
            assert decayed == (p.ndim > 1 and not names[id(p)].endswith("token")), names[id(p)]


def test_layer_decay_scales():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    groups = param_groups(model, 0.0, layer_decay=0.5, layer_of=lambda n: int(n[0]), num_layers=1)
    scales = sorted(g["lr_scale"] for g in groups)
    assert scales == [0.5, 1.0]


# --- the sample stream ----------------------------------------------------------------------


def take(stream, n):
    it = iter(stream)
    return [next(it) for _ in range(n)]


def test_stream_visits_every_item_once_per_epoch():
    items = [i for i, _ in take(SampleStream(5, seed=1, batch_size=1), 10)]
    assert sorted(items[:5]) == list(range(5)) and sorted(items[5:]) == list(range(5))


def test_ranks_split_what_one_process_sees():
    single = take(SampleStream(7, 3, batch_size=4), 12)
    r0 = take(SampleStream(7, 3, batch_size=2, rank=0, world_size=2), 6)
    r1 = take(SampleStream(7, 3, batch_size=2, rank=1, world_size=2), 6)
    merged = []
    for m in range(3):
        merged += r0[2 * m: 2 * m + 2] + r1[2 * m: 2 * m + 2]
    assert merged == single


def test_stream_resumes_mid_run():
    full = take(SampleStream(5, 0, batch_size=2), 10)
    assert take(SampleStream(5, 0, batch_size=2, start=6), 4) == full[6:10]


# --- checkpoints ------------------------------------------------------------------------------


def test_checkpoint_roundtrip_and_atomic_replace(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save({"step": 1, "w": torch.ones(3)}, path)
    checkpoint.save({"step": 2, "w": torch.zeros(3)}, path)
    state = checkpoint.load(path)
    assert state["step"] == 2 and torch.equal(state["w"], torch.zeros(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary files left


def test_failed_write_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save({"step": 1}, path)

    def explode(f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(InputError, match="last.pt: cannot write: No space left on device; its previous version"):
        checkpoint.atomic_write(path, explode)
    assert checkpoint.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_malicious_pickle_is_refused_not_executed(tmp_path):
    evil, marker = tmp_path / "evil.pt", tmp_path / "pwned"
    torch.save({"format": checkpoint.FORMAT, "model": _Evil(str(marker))}, evil)
    with pytest.raises(InputError, match="refusing to load"):
        checkpoint.load(evil)
    assert not marker.exists()


def test_garbage_checkpoint_is_refused(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="bad.pt"):
        checkpoint.load(bad)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_damaged_checkpoint_is_an_input_error_wherever_it_is_cut_or_changed(legacy, tmp_path):
    """torch's reader fails on damaged bytes with a dozen exception types (EOFError, KeyError,
    UnicodeDecodeError, IndexError, struct.error, AssertionError, ...): each must be one InputError."""
    import io
    import random

    buf = io.BytesIO()
    torch.save({"format": checkpoint.FORMAT, "model": {"w": torch.arange(12.0).reshape(3, 4)}, "step": 3,
                "config": {"name": "x", "lr": [1e-3, 2.0]}}, buf, _use_new_zipfile_serialization=not legacy)
    data, rng, path = buf.getvalue(), random.Random(0), tmp_path / "bad.pt"
    damaged = [data[:n] for n in range(1, len(data), 3)]
    for _ in range(300):
        flipped = bytearray(data)
        flipped[rng.randrange(len(data))] = rng.randrange(256)
        damaged.append(bytes(flipped))
    refused = 0
    for content in damaged:
        path.write_bytes(content)
        try:
            checkpoint.read(path)
        except InputError as err:
            refused += 1
            assert str(path) in str(err) and "\n" not in str(err) and len(str(err)) < 300, err
    assert refused >= len(damaged) // 2  # most damage is seen (a flipped byte in a tensor's data is not)


@pytest.mark.parametrize("content, message", [
    (b"hello\n", "not a PyTorch checkpoint: neither a zip archive nor a pickle"),
    (b"\x1f\x8b\x08\x00 a NIfTI image", "neither a zip archive nor a pickle (gzip-compressed: an image?)"),
    (b"\x80\x02\xff", "not a readable checkpoint (damaged: byte 255 is no pickle operation)"),  # a pickle's start
], ids=["text", "gzip", "not a pickle operation"])
def test_a_file_that_is_no_checkpoint_is_not_called_malicious(content, message, tmp_path):
    path = tmp_path / "best.pt"
    path.write_bytes(content)
    with pytest.raises(InputError, match=re.escape(message)) as err:
        checkpoint.read(path)
    assert "malicious" not in str(err.value)


# --- training runs ----------------------------------------------------------------------------


def test_run_writes_logs_checkpoint_and_figure(tmp_path):
    train(tiny_cfg("train.max_steps=3", "train.log_every=1"), tmp_path)
    assert sorted(losses(tmp_path)) == [1, 2, 3]
    state = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    assert state["step"] == 3 and state["config"]["train"]["max_steps"] == 3
    assert list((tmp_path / "tb").iterdir())
    assert (tmp_path / "figures" / "recon_000003.png").exists()


class Watches(MAE3D):
    """Sees each logged step's values and adds its own."""

    seen: list = []

    def watch(self, step, logged, say):
        self.seen.append((step, "loss" in logged, say))
        return {"alarm": float(step >= 2)}


def test_a_method_watches_each_logged_step_and_its_values_are_logged(tmp_path):
    Watches.seen = []
    train(tiny_cfg("train.max_steps=3", "train.log_every=1"), tmp_path, model_cls=Watches)
    assert Watches.seen == [(1, True, True), (2, True, True), (3, True, True)]
    assert [r["alarm"] for r in read_log(tmp_path / "log.jsonl") if "loss" in r] == [0.0, 1.0, 1.0]


class StopsItself(MAE3D):
    """Sends itself SIGTERM after step 3, like a cluster pre-empting the job."""

    def after_step(self, step, total, applied):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return {}


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    cfg = tiny_cfg()
    train(cfg, tmp_path / "full")
    with pytest.raises(Interrupted):
        train(cfg, tmp_path / "cut", model_cls=StopsItself)
    k = checkpoint.load(tmp_path / "cut" / "checkpoints" / "last.pt")["step"]
    assert 3 <= k < cfg.train.max_steps
    train(cfg, tmp_path / "cut", resume=True)
    full, cut = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert sorted(cut) == list(range(1, 9))  # records after the checkpoint were not duplicated
    for step in range(k + 1, 9):
        assert cut[step] == pytest.approx(full[step], abs=1e-6), step


def test_resume_refuses_a_changed_config(tmp_path):
    train(tiny_cfg("train.max_steps=2"), tmp_path)
    with pytest.raises(InputError, match="optim.weight_decay"):
        train(tiny_cfg("train.max_steps=4", "optim.weight_decay=0.5"), tmp_path, resume=True)


def test_resume_with_another_schedule_warns_and_replans_from_the_step(tmp_path, capsys):
    train(tiny_cfg("train.max_steps=2"), tmp_path)
    capsys.readouterr()
    train(tiny_cfg("train.max_steps=4", "optim.lr=0.002"), tmp_path, resume=True)
    warning = [line for line in capsys.readouterr().err.splitlines() if line.startswith("glmae: warning:")]
    assert len(warning) == 1 and "last.pt: --resume changes the schedule" in warning[0]
    assert "optim.lr 0.001 -> 0.002" in warning[0] and "train.max_steps 2 -> 4" in warning[0]
    assert "re-planned from step 2 (now 4 steps)" in warning[0]
    assert sorted(losses(tmp_path)) == [1, 2, 3, 4]
    assert read_log(tmp_path / "log.jsonl")[2]["lr"] == pytest.approx(lr_at(2, 4, 0.002, 2))


def test_resume_with_another_batch_continues_the_samples_and_the_epochs(tmp_path, capsys):
    # 4 epochs of 3 volumes = 12 samples: 6 steps of 2; stopped after 4 steps (8 samples), the
    # 4 samples left take 2 steps of 3 (their stream goes on from sample 8)
    cfg = tiny_cfg("train.epochs=4", "train.ckpt_every=100")
    with pytest.raises(Interrupted):
        train(cfg, tmp_path, model_cls=StopsItself)
    assert checkpoint.load(tmp_path / "checkpoints" / "last.pt")["samples"] == 8
    capsys.readouterr()
    train(tiny_cfg("train.epochs=4", "train.ckpt_every=100", "train.batch_size=3"), tmp_path, resume=True)
    assert "train.batch_size 2 -> 3" in capsys.readouterr().err
    state = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    assert (state["step"], state["samples"]) == (6, 14)


class GoesNaN(MAE3D):
    def forward(self, batch):
        loss, logs = super().forward(batch)
        self.calls = getattr(self, "calls", 0) + 1
        return (loss * float("nan") if self.calls > 5 else loss), logs


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(TrainingError, match="non-finite at step 6"):
        train(tiny_cfg(), tmp_path, model_cls=GoesNaN)
    state = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_amp_choice():
    cpu = torch.device("cpu")
    assert amp_dtype("off", cpu) is None and amp_dtype("bf16", cpu) is torch.bfloat16
    with pytest.raises(InputError):
        amp_dtype("fp16", cpu)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    assert amp_dtype("auto", cpu) is (torch.bfloat16 if amx else None)


# --- activation checkpointing and torch.compile: the plain path's losses ----------------------


def test_grad_checkpoint_recomputes_the_blocks_and_gives_the_same_losses(tmp_path, monkeypatch):
    from glmae.models.vit import Block

    cfg = ["train.max_steps=3", "train.fig_every=0", "encoder.drop_path=0.2"]  # drop-path draws replayed too
    train(tiny_cfg(*cfg), tmp_path / "plain")
    calls = []
    forward = Block._forward
    monkeypatch.setattr(Block, "_forward", lambda self, x: calls.append(torch.is_grad_enabled()) or forward(self, x))
    model = train(tiny_cfg(*cfg, "train.grad_checkpoint=true"), tmp_path / "checkpointed")
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    assert blocks and all(b.grad_checkpoint for b in blocks)
    assert sum(calls) == 3 * 2 * len(blocks)  # each block's forward again in the backward pass
    assert losses(tmp_path / "checkpointed") == losses(tmp_path / "plain")


def test_compiled_model_gives_the_same_losses(tmp_path, monkeypatch):
    # the compiled graphs of dynamo and AOTAutograd; inductor's kernels take minutes to build on 2
    # cores, so their losses are compared by benchmarks/options_cost.py
    compiled = []

    def compile(model, **kwargs):
        compiled.append(model)
        return real(model, backend="aot_eager")

    real = torch.compile
    monkeypatch.setattr(torch, "compile", compile)
    train(tiny_cfg("train.max_steps=3", "train.fig_every=0"), tmp_path / "plain")
    train(tiny_cfg("train.max_steps=3", "train.fig_every=0", "train.compile=true"), tmp_path / "compiled")
    assert len(compiled) == 1
    plain, fast = losses(tmp_path / "plain"), losses(tmp_path / "compiled")
    assert sorted(fast) == [1, 2, 3]
    for step in plain:
        assert fast[step] == pytest.approx(plain[step], rel=1e-5), step


FAILS_IN_A_STEP = """
import sys, types
import numpy as np
sys.path.insert(0, {tests!r})
from test_engine import fake_volumes, tiny_cfg
from glmae.engine import distributed
from glmae.engine.data import SampleDataset
from glmae.engine.trainer import fit
from glmae.methods.mae3d import MAE3D

class Fails(MAE3D):
    def after_step(self, step, total, applied):
        if step == 2:
            raise RuntimeError("a bug in a method")
        return {{}}

cfg = tiny_cfg("data.num_workers=1")
model = Fails(cfg.encoder, cfg.method)
fit(model, cfg, SampleDataset(fake_volumes(), model.sampler()), {run!r}, distributed.init("cpu"))
"""


def test_a_run_that_fails_with_an_exception_exits_instead_of_waiting_for_its_loader_workers(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = FAILS_IN_A_STEP.format(tests=str(Path(__file__).parent), run=str(tmp_path / "run"))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "a bug in a method" in done.stderr
