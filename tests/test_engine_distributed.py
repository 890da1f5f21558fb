"""The engine under data parallelism: collectives on their process group's device (checked on a
simulated GPU, `tests/simdevice.py`: MAE3D, GL-MAE, UNETR, GMIM and Swin-UNETR; NCCL and a gloo
group for host values under torchrun on GPUs), no device-to-host sync inside a training step,
batch-norm statistics over the global batch, no teacher update on skipped fp16 steps, and K gloo processes
with batch B training exactly as one process with batch K·B (MAE3D, GL-MAE, fine-tuning)."""

import os
import socket
import types

import numpy as np
import pytest
import torch
from simdevice import WrongDevice, simulated_gpu
from torch import nn

from glmae.config import load_config
from glmae.engine import distributed
from glmae.engine.data import SampleDataset
from glmae.engine.distributed import SyncBatchNorm, convert_sync_batchnorm
from glmae.engine.logger import read_log
from glmae.engine.trainer import Trainer, fit
from glmae.errors import TrainingError
from glmae.methods import GLMAE, MAE3D
from glmae.methods.segmentation import Segmenter, TrainItem, foreground_points

ENCODER = {"arch": "vit", "patch_size": 4, "width": 24, "depth": 2, "heads": 2, "drop_path": 0.0}
DECODER = {"decoder_width": 12, "decoder_depth": 1, "decoder_heads": 2}
COMMON = {
    "encoder": ENCODER,
    "data": {"num_workers": 0},
    "optim": {"lr": 1e-3, "lr_scaling": "none", "warmup_steps": 2},
    "train": {"max_steps": 3, "batch_size": 2, "log_every": 1, "ckpt_every": 3, "amp": "off", "device": "cpu"},
}
GLMAE_METHOD = {"name": "glmae", "n_global": 2, "n_local": 2, "global_size": [16, 16, 8], "local_size": [8, 8, 8],
         "local_scale": [0.4, 0.5], "head_hidden": 32, "head_out": 16, **DECODER}
METHODS = {
    "mae3d": {"task": "pretrain", "method": {"name": "mae3d", "roi": [16, 16, 8], **DECODER}},
    "glmae": {"task": "pretrain", "method": GLMAE_METHOD},
    # the head's running normalisation sums its statistics over the ranks
    "glmae_running": {"task": "pretrain", "method": {**GLMAE_METHOD, "head_norm": "running"}},
    # BatchNorm in the head, so the equality needs the global batch's statistics (SyncBatchNorm)
    "glmae_batchnorm": {"task": "pretrain", "method": {**GLMAE_METHOD, "head_norm": "batch"}},
    "finetune": {"task": "finetune", "method": {
        "name": "unetr", "roi": [16, 16, 16], "feature_size": 4, "labels": {0: "background", 1: "cube"},
        "sw_batch_size": 1}},
}


def config(kind, *overrides):
    return load_config({**COMMON, **METHODS[kind]}, list(overrides))


def volumes(n=4, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        image = np.zeros((1, 24, 24, 20), np.float32)
        image[:, 4:20, 4:20, 2:18] = rng.random((1, 16, 16, 16))
        label = np.zeros((24, 24, 20), np.uint8)
        label[8:14, 6:12, 5:11] = 1
        image[0][label > 0] += 1.0
        out.append(types.SimpleNamespace(case_id=f"case_{i}", image=image, label=label,
                                         foreground_box=((4, 20), (4, 20), (2, 18))))
    return out


def build(kind, cfg):
    torch.manual_seed(cfg.train.seed)
    if kind == "finetune":
        model = Segmenter(cfg.encoder, cfg.method)
        items = [TrainItem(v, foreground_points(v.label)) for v in volumes()]
        return model, SampleDataset(items, model.sampler()), model.param_groups(cfg.optim)
    model = (MAE3D if kind == "mae3d" else GLMAE)(cfg.encoder, cfg.method)
    for layer, norm in zip(model.modules(), list(model.modules())[1:]):
        if isinstance(layer, nn.Linear) and isinstance(norm, nn.BatchNorm1d):
            # BatchNorm cancels the bias before it: its gradient is round-off, which Adam would
            # turn into steps of random sign; frozen, it stays 0 in every run
            layer.bias.requires_grad_(False)
    groups = model.param_groups(cfg.optim) if hasattr(model, "param_groups") else None  # as `glmae pretrain`
    return model, SampleDataset(volumes(), model.sampler()), groups


def train(kind, cfg, run_dir, env, **kwargs):
    model, samples, groups = build(kind, cfg)
    return fit(model, cfg, samples, run_dir, env, groups=groups, **kwargs)


# --- the GPU path, on a simulated GPU ---------------------------------------------------------


@pytest.mark.parametrize("kind", ["mae3d", "glmae", "glmae_running", "glmae_batchnorm", "finetune"])
def test_collectives_run_on_their_groups_device_and_steps_never_wait_for_it(kind, tmp_path, monkeypatch):
    """A 2-rank NCCL job on a simulated GPU: every tensor reaching a collective is on the device
    (default group) or on the CPU (host group), which raises WrongDevice otherwise; a step, and the
    periodic work when none is due, read nothing back from the device."""
    from glmae.finetune import Validation
    from glmae.methods.validation import evaluate_volumes

    # fine-tuning with the encoder frozen for the first half (method.freeze_encoder_steps): both kinds of step
    frozen = ["method.freeze_encoder_steps=3"] if kind == "finetune" else []
    cfg = config(kind, "train.max_steps=6", "train.log_every=3", "train.ckpt_every=3", "train.val_every=3", *frozen)
    syncs = {"step": [], "periodic": []}

    def counted(part):
        original = getattr(Trainer, part)

        def run(self, *args, **kwargs):
            before = sim.syncs
            try:
                return original(self, *args, **kwargs)
            finally:
                syncs[part].append(sim.syncs - before)
        return run

    monkeypatch.setattr(Trainer, "step", counted("step"))
    monkeypatch.setattr(Trainer, "periodic", counted("periodic"))
    with simulated_gpu(monkeypatch) as (sim, env):
        score = lambda net: evaluate_volumes(net, volumes(1, seed=9), cfg, env.device)  # noqa: E731
        extra = {"evaluate": Validation(score, "mean_dice", "dice", env), "evaluate_every": 3,
                 "best_metric": "mean_dice"} if kind == "finetune" else {}
        model = train(kind, cfg, tmp_path, env, **extra)
    assert syncs["step"] == [0] * 6
    assert [n > 0 for n in syncs["periodic"]] == [False, False, True, False, False, True]
    calls = set(sim.calls)
    assert ("all_reduce", "meta", "default") in calls  # loss means and the non-finite record
    assert ("all_reduce", "cpu", "host") in calls  # the stop signal
    assert ("all_gather_object", None, "host") in calls  # random states for the checkpoint
    if kind == "glmae_batchnorm":
        assert all(isinstance(m, SyncBatchNorm) for m in model.modules() if isinstance(m, nn.BatchNorm1d))
        assert any(isinstance(m, SyncBatchNorm) for m in model.modules())
    if kind == "finetune":
        assert ("broadcast_object_list", None, "host") in calls  # the validation metrics
    records = read_log(tmp_path / "log.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [3, 6]
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)


def test_the_harness_catches_a_cpu_tensor_in_a_collective(monkeypatch):
    with simulated_gpu(monkeypatch) as (_, env):
        distributed.all_reduce_mean(torch.ones(2, device=env.device), env)
        # the host values' collectives the commands use (barriers around the run folder and the cache)
        distributed.barrier(env)
        assert distributed.any_rank(True, env) and distributed.broadcast_object(1, env) == 1
        assert distributed.all_gather_objects(1, env) == [1, 1]
        with pytest.raises(WrongDevice, match="all_reduce of a tensor on cpu over the default"):
            distributed.all_reduce_mean(torch.ones(2), env)
        with pytest.raises(WrongDevice, match="over the default"):
            torch.distributed.barrier()
        with pytest.raises(RuntimeError, match="same device"):
            torch.ones(2, device=env.device) + torch.ones(2)


# the methods built on MONAI's Swin (GMIM's encoder, Swin-UNETR): their steps on the simulated GPU
SWIN = {"arch": "swin", "feature_size": 12, "depths": [1, 1, 1, 1], "heads": [1, 2, 2, 4], "window": 4, "patch_size": 2}
MONAI_SWIN = {
    "gmim": {"task": "pretrain", "encoder": SWIN, "method": {"name": "gmim", "roi": [64, 64, 64], "proj_dim": 16}},
    "swin_unetr": {"task": "finetune", "encoder": SWIN, "method": {
        "name": "swin_unetr", "roi": [64, 64, 64], "labels": {0: "background", 1: "cube"}, "sw_batch_size": 1}},
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", MONAI_SWIN)
def test_swin_methods_run_on_the_device_and_their_steps_never_wait_for_it(kind, tmp_path, monkeypatch):
    from glmae.methods import FINETUNING, PRETRAINING

    cfg = load_config({**COMMON, **MONAI_SWIN[kind]}, ["train.max_steps=2", "train.batch_size=1"])
    syncs = []
    step = Trainer.step

    def counted(self, *args, **kwargs):
        before = sim.syncs
        out = step(self, *args, **kwargs)
        syncs.append(sim.syncs - before)
        return out

    monkeypatch.setattr(Trainer, "step", counted)
    cases = volumes()
    for case in cases:  # 64³: the Swin's crops are multiples of 32
        case.image = np.pad(case.image, ((0, 0), (0, 40), (0, 40), (0, 44)))
        case.label = np.pad(case.label, ((0, 40), (0, 40), (0, 44)))
        case.intensity = "ct"
    with simulated_gpu(monkeypatch) as (sim, env):
        torch.manual_seed(0)
        if kind == "gmim":
            model, groups = PRETRAINING["gmim"](cfg.encoder, cfg.method), None
            samples = SampleDataset(cases, model.sampler())
        else:
            model = FINETUNING["swin_unetr"](cfg.encoder, cfg.method)
            groups = model.param_groups(cfg.optim)
            samples = SampleDataset([TrainItem(v, foreground_points(v.label)) for v in cases], model.sampler())
        fit(model, cfg, samples, tmp_path, env, groups=groups)
    assert syncs == [0, 0]
    assert ("all_reduce", "meta", "default") in set(sim.calls)
    assert np.isfinite(read_log(tmp_path / "log.jsonl")[-1]["loss"])


def test_processes_on_gpus_join_nccl_and_a_gloo_group_for_host_values(monkeypatch):
    """distributed.init under torchrun on GPUs (the NCCL-only branch), with torch.distributed recorded."""
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", str(device))))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend: calls.append(("init", backend)))
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.distributed, "new_group", lambda backend: calls.append(("new_group", backend)) or "gloo")
    env = distributed.init("cuda")
    assert calls == [("set_device", "cuda:1"), ("init", "nccl"), ("new_group", "gloo")]
    assert (env.rank, env.world_size, env.device, env.host_group) == (1, 2, torch.device("cuda:1"), "gloo")


def test_glmae_centre_is_reduced_on_the_device(monkeypatch):
    cfg = config("glmae")
    with simulated_gpu(monkeypatch) as (sim, env):
        model, samples, _ = build("glmae", cfg)
        model.to(env.device).train()
        batch = {k: torch.as_tensor(np.stack([samples[(i, i)][k] for i in range(2)])).to(env.device)
                 for k in samples[(0, 0)]}
        model(batch)
    # the centre's sum and count, the head's running statistics (all_reduce_sum_) and the number of
    # teaching pairs (mean_denominator), on the device
    reduces = [c for c in sim.calls if c[0] == "all_reduce"]
    assert reduces == [("all_reduce", "meta", "default")] * len(reduces) and len(reduces) >= 3


# --- non-finite losses, checked at the periodic work ------------------------------------------


class GoesNaN(MAE3D):
    def forward(self, batch):
        loss, logs = super().forward(batch)
        self.calls = getattr(self, "calls", 0) + 1
        return (loss * float("nan") if self.calls == 6 else loss), logs


def test_a_non_finite_loss_between_logs_names_its_step_and_keeps_the_checkpoint_before_it(tmp_path):
    from glmae.engine import checkpoint

    cfg = config("mae3d", "train.max_steps=8", "train.log_every=0", "train.ckpt_every=4")
    torch.manual_seed(0)
    model = GoesNaN(cfg.encoder, cfg.method)
    with pytest.raises(TrainingError, match="non-finite at step 6"):
        fit(model, cfg, SampleDataset(volumes(), model.sampler()), tmp_path, distributed.init("cpu"))
    state = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (tmp_path / "log.jsonl").read_text()  # nothing was logged after the bad step


# --- no teacher update on a step the loss scaler skipped --------------------------------------


class InfGradientAt(GLMAE):
    """An infinite gradient on the second step, as an fp16 overflow gives."""

    def __init__(self, *args):
        super().__init__(*args)
        self.calls = 0
        self.decoder.pred.weight.register_hook(lambda g: g * float("inf") if self.calls == 2 else g)

    def forward(self, batch):
        self.calls += 1
        return super().forward(batch)


def test_a_step_skipped_by_the_loss_scaler_leaves_weights_and_teacher_unchanged(tmp_path):
    cfg = config("glmae")
    torch.manual_seed(0)
    model = InfGradientAt(cfg.encoder, cfg.method)
    samples = SampleDataset(volumes(), model.sampler())
    trainer = Trainer(model, cfg, tmp_path, distributed.init("cpu"), "train", None, len(samples))
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=4.0)  # what fp16 runs use
    batches = iter(torch.utils.data.DataLoader(samples, batch_size=2, sampler=[(i % 4, i) for i in range(8)]))
    stop = types.SimpleNamespace(received=None)
    snapshot = lambda: {k: v.clone() for k, v in model.state_dict().items() if "center" not in k}  # noqa: E731
    momenta = []
    for step in range(3):
        before = snapshot()
        trainer.step(step, model, batches, 1e-3, stop)
        momenta.append(model.after_step(step + 1, 3, trainer.applied)["momentum"])
        after = snapshot()
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        teacher = {k for k in before if k.startswith("teacher.") and "running" not in k and "batches" not in k}
        if step == 1:  # skipped: no parameter and no teacher weight moved
            assert trainer.applied.item() == 0.0
            assert not changed & ({k for k, _ in model.named_parameters()} | teacher)
        else:
            assert trainer.applied.item() == 1.0 and teacher <= changed
    assert trainer.scaler.get_scale() == 2.0  # backed off once (4 -> 2)
    assert momenta[1] > momenta[0]  # the schedule still follows the step


# --- SyncBatchNorm ------------------------------------------------------------------------------


def test_sync_batchnorm_without_a_process_group_is_batchnorm():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    synced = convert_sync_batchnorm(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)))
    synced.load_state_dict(plain.state_dict())
    assert isinstance(synced[1], SyncBatchNorm) and synced.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(6, 3)
    torch.testing.assert_close(synced(x), plain(x))
    torch.testing.assert_close(synced[1].running_var, plain[1].running_var)


def test_conversion_keeps_the_parameters_optimiser_groups_hold():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    weight = model[1].weight
    assert convert_sync_batchnorm(model)[1].weight is weight


# --- K processes with batch B = one process with batch K·B --------------------------------------


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(rank, port, out):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    env = distributed.init("cpu")
    for kind in METHODS:
        model = train(kind, config(kind, "train.batch_size=1"), out / kind, env)
        torch.save(model.state_dict(), out / f"{kind}_rank{rank}.pt")
    distributed.cleanup()


def _comparable(name, a, b):
    if name.endswith("attn.qkv.bias"):
        # the key bias cancels in softmax: its gradient is pure round-off, which Adam's
        # normalisation turns into full-size steps of random sign; compare queries and values
        third = a.shape[0] // 3
        a, b = torch.cat([a[:third], a[2 * third:]]), torch.cat([b[:third], b[2 * third:]])
    return a, b


@pytest.mark.slow
def test_two_gloo_ranks_train_as_one_process_with_twice_the_batch(tmp_path):
    torch.multiprocessing.spawn(_two_ranks, args=(_free_port(), tmp_path), nprocs=2)
    env = distributed.init("cpu")
    for kind in METHODS:
        r0 = torch.load(tmp_path / f"{kind}_rank0.pt", weights_only=True)
        r1 = torch.load(tmp_path / f"{kind}_rank1.pt", weights_only=True)
        single = train(kind, config(kind, "train.batch_size=2"), tmp_path / f"{kind}_single", env).state_dict()
        for name in r0:
            assert torch.equal(r0[name], r1[name]), (kind, name)
            a, b = _comparable(name, r0[name], single[name])
            # a tenth of one Adam step (lr 1e-3): a sample missing, repeated or normalised apart moves
            # weights by whole steps; a few small gradients (of the keys, say) keep round-off
            where = f"{kind} {name}"
            torch.testing.assert_close(a.float(), b.float(), rtol=1e-4, atol=1e-4, msg=lambda m, w=where: f"{w}: {m}")
        # rank 0 alone wrote the run folder, with every logged value the mean over the ranks
        logged, alone = read_log(tmp_path / kind / "log.jsonl"), read_log(tmp_path / f"{kind}_single" / "log.jsonl")
        assert [r["step"] for r in logged] == [r["step"] for r in alone] == [1, 2, 3]
        for mine, theirs in zip(logged, alone):
            # the entropy of a batch mean is not a mean over ranks: each rank logs its own batch's
            # (the spread is logged for batches of two volumes or more only)
            for key in theirs.keys() - {"time", "teacher_mean_entropy", "teacher_spread"}:
                assert mine[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), (kind, key)
