"""GL-MAE: views, teacher, consistency loss, momentum schedule, ablation switches."""

import math
import types

import numpy as np
import pytest
import torch

from glmae.data.sampling import view_box
from glmae.methods.glmae import (
    GLMAE,
    GLMAEConfig,
    collapse,
    consistency_loss,
    momentum_at,
    sample_views,
    teacher_probs,
)
from glmae.models.mae import MaskedAutoencoder
from glmae.models.vit import ViTConfig

ENCODER = ViTConfig(patch_size=4, width=24, depth=2, heads=2)


def tiny_cfg(**kw):
    base = dict(
        n_global=2, n_local=3, global_size=(16, 16, 16), local_size=(8, 8, 8), decoder_width=12,
        decoder_depth=1, decoder_heads=2, head_hidden=32, head_out=16,
    )
    return GLMAEConfig(**{**base, **kw})


def volume(shape=(40, 32, 24), seed=0):
    image = np.random.default_rng(seed).random((1, *shape), dtype=np.float32)
    return types.SimpleNamespace(image=image, foreground_box=tuple((0, s) for s in shape))


def batch_of(model, n=2):
    sample = model.sampler()
    items = [sample(volume(seed=i), np.random.default_rng(10 + i)) for i in range(n)]
    return {k: torch.as_tensor(np.stack([it[k] for it in items])) for k in items[0]}


# --- views ------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [(0.5, 1.0), (0.25, 0.5)])
def test_view_sides_lie_in_the_scale_range(scale):
    shape = (200, 160, 90)
    for seed in range(200):
        start, size = view_box(shape, scale, np.random.default_rng(seed))
        fractions = [k / n for k, n in zip(size, shape)]
        assert all(scale[0] - 1 / n <= f <= scale[1] + 1 / n for f, n in zip(fractions, shape))
        assert max(fractions) - min(fractions) < 2 / min(shape)  # one s for all axes
        assert all(0 <= a and a + k <= n for a, k, n in zip(start, size, shape))


def test_views_have_configured_shapes_and_replay_from_their_seed():
    cfg = tiny_cfg()
    a = sample_views(volume(), np.random.default_rng(7), cfg=cfg, patch=4)
    b = sample_views(volume(), np.random.default_rng(7), cfg=cfg, patch=4)
    c = sample_views(volume(), np.random.default_rng(8), cfg=cfg, patch=4)
    assert a["global"].shape == (2, 1, 16, 16, 16) and a["local"].shape == (3, 1, 8, 8, 8)
    assert a["global_keep"].shape == (2, 16) and a["global_masked"].shape == (2, 48)  # 64 tokens, r=0.75
    assert a["local_keep"].shape == (3, 2) and a["local_masked"].shape == (3, 6)
    for key in a:
        assert np.array_equal(a[key], b[key]), key
    assert not np.array_equal(a["global"], c["global"])
    assert not np.array_equal(a["global_keep"][0], a["global_keep"][1])  # independent masks


def test_a_full_view_resized_to_the_volume_shape_is_the_volume():
    cfg = tiny_cfg(n_local=0, global_scale=(1.0, 1.0), global_size=(40, 32, 24), flip_prob=0.0)
    vol = volume()
    out = sample_views(vol, np.random.default_rng(0), cfg=cfg, patch=8)
    np.testing.assert_allclose(out["global"][0], vol.image, rtol=1e-6)
    assert "local" not in out


# --- consistency loss and teacher -------------------------------------------------------------


def reference_cross_entropy(t_out, s_out, center, tau_t, tau_s):
    """Written out with math: mean over (b, i, j) of -sum_k p_t log p_s."""
    B, I, K = t_out.shape
    J = s_out.shape[1]
    total = 0.0
    for b in range(B):
        for i in range(I):
            z = [(t_out[b, i, k] - (center[k] if center is not None else 0.0)) / tau_t for k in range(K)]
            zt = sum(math.exp(v) for v in z)
            pt = [math.exp(v) / zt for v in z]
            for j in range(J):
                zs = [s_out[b, j, k] / tau_s for k in range(K)]
                log_norm = math.log(sum(math.exp(v) for v in zs))
                total += -sum(pt[k] * (zs[k] - log_norm) for k in range(K))
    return total / (B * I * J)


@pytest.mark.parametrize("centred", [False, True])
def test_consistency_loss_matches_hand_written_reference(centred):
    t_out = torch.tensor([[[0.2, -0.1, 0.05], [0.0, 0.3, -0.2]]], dtype=torch.float64)
    s_out = torch.tensor([[[0.5, 0.1, -0.3], [-0.2, 0.2, 0.4], [0.1, 0.0, 0.0]]], dtype=torch.float64)
    center = torch.tensor([0.1, 0.05, -0.1], dtype=torch.float64) if centred else None
    got = consistency_loss(teacher_probs(t_out, center, 0.04), s_out, 0.1)
    want = reference_cross_entropy(t_out.numpy(), s_out.numpy(),
                                   None if center is None else center.numpy(), 0.04, 0.1)
    assert got.item() == pytest.approx(want, rel=1e-9)


def test_centring_changes_the_loss():
    t_out, s_out = torch.randn(2, 2, 5), torch.randn(2, 3, 5)
    a = consistency_loss(teacher_probs(t_out, None, 0.04), s_out, 0.1)
    b = consistency_loss(teacher_probs(t_out, torch.randn(5), 0.04), s_out, 0.1)
    assert a != b


def test_momentum_schedule_endpoints():
    assert momentum_at(0, 100, 0.996) == pytest.approx(0.996)
    assert momentum_at(100, 100, 0.996) == pytest.approx(1.0)
    assert momentum_at(50, 100, 0.996) == pytest.approx(0.998)
    values = [momentum_at(t, 100, 0.996) for t in range(101)]
    assert all(a <= b for a, b in zip(values, values[1:]))


def test_teacher_is_the_ema_of_the_student_and_gets_no_gradient():
    torch.manual_seed(0)
    model = GLMAE(ENCODER, tiny_cfg())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    teacher_before = {k: v.detach().clone() for k, v in model.teacher.named_parameters()}
    loss, _ = model(batch_of(model))
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    opt.step()
    logs = model.after_step(1, 10, torch.ones(()))
    m = momentum_at(0, 10, 0.996)
    assert logs["momentum"] == pytest.approx(m)
    student = {**{f"encoder.{k}": v for k, v in model.encoder.named_parameters()},
               **{f"head.{k}": v for k, v in model.head.named_parameters()}}
    changed = 0
    for name, after in model.teacher.named_parameters():
        expected = m * teacher_before[name] + (1 - m) * student[name]
        torch.testing.assert_close(after, expected, rtol=1e-6, atol=1e-7, msg=name)
        changed += not torch.equal(after, teacher_before[name])
    assert changed > 0


def test_center_follows_teacher_outputs_in_training_only():
    torch.manual_seed(0)
    model = GLMAE(ENCODER, tiny_cfg())
    batch = batch_of(model)
    model.eval()
    model(batch)
    assert torch.count_nonzero(model.center) == 0
    model.train()
    model(batch)
    assert torch.count_nonzero(model.center) > 0


# --- ablation switches ------------------------------------------------------------------------


def losses_with(switches, full_state, batch):
    model = GLMAE(ENCODER, tiny_cfg(**switches))
    missing, _ = model.load_state_dict(full_state, strict=False)
    assert not missing
    model.eval()  # no centre update between variants
    with torch.no_grad():
        loss, logs = model(batch)
    return loss.item(), {k: v.item() for k, v in logs.items()}


TERMS = {"rec_global": "loss_rec_global", "rec_local": "loss_rec_local", "cons_g2g": "loss_cons_g2g",
         "cons_l2g": "loss_cons_l2g"}
# the diagnostics logged with each consistency term
DIAGNOSTICS = {"cons_g2g": {"kl_g2g", "student_entropy_global"}, "cons_l2g": {"kl_l2g", "student_entropy_local"}}


@pytest.mark.parametrize("switch", list(TERMS))
def test_each_switch_removes_exactly_its_term(switch):
    torch.manual_seed(0)
    full = GLMAE(ENCODER, tiny_cfg())
    batch = batch_of(full)
    _, all_on = losses_with({}, full.state_dict(), batch)
    loss, logs = losses_with({switch: False}, full.state_dict(), batch)
    gone = {TERMS[switch], *DIAGNOSTICS.get(switch, ())}
    assert set(all_on) - set(logs) == gone
    for key, value in all_on.items():
        if key not in gone:
            assert logs[key] == pytest.approx(value, rel=1e-6), key
    rec = logs.get("loss_rec_global", 0) + logs.get("loss_rec_local", 0)
    g2g, l2g = logs.get("loss_cons_g2g"), logs.get("loss_cons_l2g")
    pairs = [(g2g, 2), (l2g, 3)]
    cons = sum(v * n for v, n in pairs if v is not None) / sum(n for v, n in pairs if v is not None)
    assert loss == pytest.approx(rec + cons, rel=1e-6)


def test_all_consistency_off_is_multi_view_mae3d():
    torch.manual_seed(0)
    cfg = tiny_cfg(cons_g2g=False, cons_l2g=False)
    model = GLMAE(ENCODER, cfg)
    assert not hasattr(model, "teacher") and not hasattr(model, "head")
    batch = batch_of(model)
    mae = MaskedAutoencoder(ENCODER, cfg.decoder_width, cfg.decoder_depth, cfg.decoder_heads)
    mae.load_state_dict(model.state_dict())
    with torch.no_grad():
        loss, _ = model(batch)
        expected = sum(
            mae.reconstruct(*(batch[key].flatten(0, 1) for key in (k, f"{k}_keep", f"{k}_masked")))[0]
            for k in ("global", "local")
        )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_every_trainable_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = GLMAE(ENCODER, tiny_cfg())
    loss, logs = model(batch_of(model))
    loss.backward()
    missing = [
        n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)
    ]
    assert not missing, missing
    assert set(logs) == {"loss_rec_global", "loss_rec_local", "loss_cons_g2g", "loss_cons_l2g", "teacher_entropy",
                         "teacher_mean_entropy", "head_last_norm", *DIAGNOSTICS["cons_g2g"], *DIAGNOSTICS["cons_l2g"]}
    assert 0 < logs["teacher_entropy"] <= math.log(16) + 1e-6


def test_figure_shows_a_global_and_a_local_view(tmp_path):
    torch.manual_seed(0)
    model = GLMAE(ENCODER, tiny_cfg()).eval()
    with torch.no_grad():
        model.figure(batch_of(model), tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 1000


def test_collapse_alarm_fires_on_a_collapsed_log_and_not_on_a_healthy_one():
    log_k = math.log(512)
    healthy = [0.4, 1.4, 3.6, 4.2, 3.9, 4.5, 5.0, 4.8, 5.1, 5.2]  # climbing, never for long past 0.95 log K
    uniform = [0.4, 1.4, 3.6, 5.95, 6.0, 6.1, 6.2, 6.2, 6.2, 6.2]  # the collapse seen at ~1500 steps
    assert all(collapse(healthy[:n], log_k, 5) is None for n in range(len(healthy) + 1))
    assert collapse(uniform, log_k, 5) == "uniform"
    assert collapse(uniform[:7], log_k, 5) is None  # 4 values above 0.95 log K = 5.93 so far
    assert collapse([0.01] * 5, log_k, 5) == "one-hot"
    assert collapse(uniform, log_k, 0) is None  # switched off


def test_collapse_alarm_warns_once_and_flags_the_log(capsys):
    model = GLMAE(ENCODER, tiny_cfg(collapse_patience=3))
    flags = [model.watch(step, {"teacher_entropy": e}, say=True)["collapse"]
             for step, e in enumerate([1.0, 6.2, 6.2, 6.2, 6.2, 2.0, 6.2])]
    assert flags == [0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    err = capsys.readouterr().err
    assert err.count("glmae: warning:") == 1 and "step 3" in err and "uniform" in err
    assert GLMAE(ENCODER, tiny_cfg(collapse_patience=0)).watch(1, {"teacher_entropy": 6.2}, True) == {}


def test_diagnostics_relate_as_cross_entropy_entropy_and_kl():
    torch.manual_seed(0)
    model = GLMAE(ENCODER, tiny_cfg())
    _, logs = model(batch_of(model))
    logs = {k: v.item() for k, v in logs.items()}
    for pair in ("g2g", "l2g"):
        assert logs[f"kl_{pair}"] == pytest.approx(logs[f"loss_cons_{pair}"] - logs["teacher_entropy"], abs=1e-5)
        assert logs[f"kl_{pair}"] >= -1e-5
    log_k = math.log(16)
    for key in ("teacher_entropy", "teacher_mean_entropy", "student_entropy_global", "student_entropy_local"):
        assert 0 <= logs[key] <= log_k + 1e-5, key
    assert logs["teacher_mean_entropy"] >= logs["teacher_entropy"] - 1e-5  # entropy is concave
    assert logs["head_last_norm"] == pytest.approx(model.head[-1].weight.norm().item())
