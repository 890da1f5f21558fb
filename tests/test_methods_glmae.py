"""GL-MAE: views, teacher, consistency loss, momentum schedule, ablation switches."""

import math
import types

import numpy as np
import pytest
import torch

from glmae.data.sampling import contains, view_box
from glmae.methods.glmae import (
    GLMAE,
    GLMAEConfig,
    collapse,
    consistency_loss,
    local_to_global_pairs,
    momentum_at,
    pair_cross_entropy,
    region_weights,
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


def coordinates(shape=(40, 32, 24)):
    """A volume whose three channels are each voxel's x, y and z index."""
    image = np.stack(np.indices(shape)).astype(np.float32)
    return types.SimpleNamespace(image=image, foreground_box=tuple((0, s) for s in shape))


def test_nested_local_views_lie_inside_their_global_view():
    cfg = tiny_cfg(n_local=4, flip_prob=0.0, global_scale=(0.5, 0.8), local_scale=(0.2, 0.5))
    vol = coordinates()
    for seed in range(100):
        out = sample_views(vol, np.random.default_rng(seed), cfg=cfg, patch=4)
        for j, local in enumerate(out["local"]):
            parent = out["global"][j % cfg.n_global]
            for axis in range(3):  # the coordinates a view shows (resizing interpolates between them)
                lo, hi = parent[axis].min(), parent[axis].max()
                assert lo - 0.5 <= local[axis].min() and local[axis].max() <= hi + 0.5, (seed, j, axis)
            assert out["l2g_pairs"][j % cfg.n_global, j] == 1


@pytest.mark.parametrize("seed", range(50))
def test_a_box_drawn_inside_another_lies_inside_it(seed):
    rng = np.random.default_rng(seed)
    shape = (60, 50, 40)
    parent = view_box(shape, (0.3, 1.0), rng)
    child = view_box(shape, (0.1, 0.9), rng, inside=parent)
    assert contains(parent, child)
    assert all(0 <= a and a + k <= n for a, k, n in zip(*child, shape))


def test_local_views_pair_only_with_the_global_views_that_contain_them():
    left, right = ((0, 0, 0), (20, 40, 40)), ((20, 0, 0), (20, 40, 40))
    locals_ = [((2, 2, 2), (10, 10, 10)), ((25, 5, 5), (10, 10, 10)), ((15, 5, 5), (10, 10, 10))]
    want = [[1, 0, 0], [0, 1, 0]]  # the third straddles both halves: no global teaches it
    np.testing.assert_array_equal(local_to_global_pairs([left, right], locals_), want)
    np.testing.assert_array_equal(local_to_global_pairs([left, right], locals_, "all"), np.ones((2, 3)))
    assert not contains(left, ((19, 0, 0), (2, 1, 1)))


def test_region_weights_average_the_view_tokens_inside_the_region():
    view = ((0, 0, 0), (40, 40, 40))  # token centres at 5, 15, 25, 35 on every axis (grid 4)
    w = region_weights(view, ((20, 0, 10), (20, 20, 20)), (4, 4, 4)).reshape(4, 4, 4)
    assert w.sum() == pytest.approx(1.0)
    assert set(zip(*np.nonzero(w))) == {(x, y, z) for x in (2, 3) for y in (0, 1) for z in (1, 2)}
    flipped = region_weights(view, ((20, 0, 10), (20, 20, 20)), (4, 4, 4), flips=(0,)).reshape(4, 4, 4)
    np.testing.assert_array_equal(flipped, w[::-1])  # the view's token 0 shows the volume's far end
    tiny = region_weights(view, ((21, 21, 21), (2, 2, 2)), (4, 4, 4)).reshape(4, 4, 4)
    assert tiny[2, 2, 2] == 1.0  # no centre inside: the nearest token


def test_matched_targets_average_what_the_student_sees():
    torch.manual_seed(0)
    model = GLMAE(ENCODER, tiny_cfg()).eval()
    batch = batch_of(model)
    with torch.no_grad():
        pooled, pairs = model._targets(batch, 2)
        tokens = model.teacher["encoder"](batch["global"].flatten(0, 1))[0].view(2, 2, 64, -1)
    keep = batch["global_keep"]
    torch.testing.assert_close(pooled["global"][1, 0, 0], tokens[1, 0, keep[1, 0]].mean(0))  # its masked copy
    weights = batch["l2g_pool"][0, 1, 2].float()
    torch.testing.assert_close(pooled["local"][0, 1, 2], weights @ tokens[0, 1])
    torch.testing.assert_close(pairs["global"][0], torch.eye(2))


def test_views_outside_every_global_are_not_taught_without_nesting():
    cfg = tiny_cfg(nested_locals=False, n_local=6, global_scale=(0.5, 0.6), local_scale=(0.3, 0.4))
    pairs = np.concatenate([sample_views(volume(), np.random.default_rng(s), cfg=cfg, patch=4)["l2g_pairs"]
                            for s in range(20)], axis=1)
    assert 0 < pairs.mean() < 1  # some locals fall outside a global, and only those pairs are off


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


def test_consistency_loss_averages_over_the_chosen_pairs_only():
    t_out, s_out = torch.randn(2, 2, 5, dtype=torch.float64), torch.randn(2, 3, 5, dtype=torch.float64)
    p_t = teacher_probs(t_out, None, 0.04)
    pairs = torch.tensor([[[1, 0, 0], [0, 1, 1]], [[0, 0, 0], [1, 0, 0]]], dtype=torch.float64)
    ce = pair_cross_entropy(p_t, s_out, 0.1)
    want = (ce[0, 0, 0] + ce[0, 1, 1] + ce[0, 1, 2] + ce[1, 1, 0]) / 4
    assert consistency_loss(p_t, s_out, 0.1, pairs).item() == pytest.approx(want.item(), rel=1e-12)
    assert consistency_loss(p_t, s_out, 0.1).item() == pytest.approx(ce.mean().item(), rel=1e-12)


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
TEACHER_STATS = {"loss_cons", "teacher_entropy", "teacher_mean_entropy", "teacher_spread"}
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
        # the consistency loss and the teacher's statistics are over the pairs that remain
        if key not in gone and not (switch.startswith("cons") and key in TEACHER_STATS):
            assert logs[key] == pytest.approx(value, rel=1e-6), key
    rec = logs.get("loss_rec_global", 0) + logs.get("loss_rec_local", 0)
    g2g, l2g = logs.get("loss_cons_g2g"), logs.get("loss_cons_l2g")
    # the consistency loss is the mean over all pairs: each global view with its masked copy, each
    # local view with the global views that contain it
    pairs = [(g2g, 2 * 2), (l2g, batch["l2g_pairs"].sum().item())]
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
                         "teacher_mean_entropy", "teacher_spread", "head_last_norm", "tau_t", "loss_cons",
                         *DIAGNOSTICS["cons_g2g"], *DIAGNOSTICS["cons_l2g"]}
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


def test_the_alarm_says_when_every_view_gets_the_same_target():
    log_k = math.log(512)
    entropies = [3.0] * 6  # in the band all along
    assert collapse(entropies, log_k, 5, spreads=[0.5, 0.01, 0.02, 0.01, 0.0, 0.03]) == "shared"
    assert collapse(entropies, log_k, 5, spreads=[0.01, 0.02, 0.5, 0.01, 0.0, 0.03]) is None
    assert collapse(entropies, log_k, 5) is None  # batches of one volume log no spread


def test_collapse_alarm_warns_once_and_flags_the_log(capsys):
    model = GLMAE(ENCODER, tiny_cfg(collapse_patience=3))
    flags = [model.watch(step, {"teacher_entropy": e}, say=True)["collapse"]
             for step, e in enumerate([1.0, 6.2, 6.2, 6.2, 6.2, 2.0, 6.2])]
    assert flags == [0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    err = capsys.readouterr().err
    assert err.count("glmae: warning:") == 1 and "step 3" in err and "uniform" in err
    assert GLMAE(ENCODER, tiny_cfg(collapse_patience=0)).watch(1, {"teacher_entropy": 6.2}, True) == {}


@pytest.mark.parametrize("pairs", ["all", "chosen"])
def test_diagnostics_relate_as_cross_entropy_entropy_and_kl(pairs):
    torch.manual_seed(0)
    cfg = tiny_cfg(g2g_pairs="all", l2g_pairs="all", target_pool="view") if pairs == "all" else tiny_cfg()
    model = GLMAE(ENCODER, cfg)
    batch = batch_of(model)
    _, logs = model(batch)
    logs = {k: v.item() for k, v in logs.items()}
    # over all teaching pairs: cross-entropy = H(p_t) + KL(p_t || p_s), each a mean over the pairs
    n_g2g = 2 * 2 * (2 if pairs == "all" else 1)
    n_l2g = batch["l2g_pairs"].sum().item() if pairs == "chosen" else 2 * 2 * 3
    kl = (n_g2g * logs["kl_g2g"] + n_l2g * logs["kl_l2g"]) / (n_g2g + n_l2g)
    assert logs["loss_cons"] - logs["teacher_entropy"] == pytest.approx(kl, abs=1e-5)
    assert logs["kl_g2g"] >= -1e-5 and logs["kl_l2g"] >= -1e-5
    log_k = math.log(16)
    for key in ("teacher_entropy", "teacher_mean_entropy", "student_entropy_global", "student_entropy_local"):
        assert 0 <= logs[key] <= log_k + 1e-5, key
    assert logs["teacher_mean_entropy"] >= logs["teacher_entropy"] - 1e-5  # entropy is concave
    assert logs["head_last_norm"] == pytest.approx(model.head.last_weight().norm().item())


def test_teacher_temperature_rises_over_its_warm_up_and_resumes_with_the_weights():
    model = GLMAE(ENCODER, tiny_cfg(tau_t_start=0.02, tau_t=0.06, tau_t_warmup=0.5))
    temps = []
    for step in range(0, 11):
        if step:
            model.after_step(step, 10, torch.ones(()))
        temps.append(model.teacher_temperature().item())
    assert temps[0] == pytest.approx(0.02) and temps[5] == pytest.approx(0.06) and temps[10] == pytest.approx(0.06)
    assert temps[2] == pytest.approx(0.036)
    resumed = GLMAE(ENCODER, tiny_cfg(tau_t_start=0.02, tau_t=0.06, tau_t_warmup=0.5))
    resumed.load_state_dict(model.state_dict())
    assert resumed.teacher_temperature().item() == pytest.approx(0.06)


def test_teacher_temperature_holds_its_start_then_rises():
    model = GLMAE(ENCODER, tiny_cfg(tau_t_start=0.02, tau_t=0.04, tau_t_hold=0.5, tau_t_warmup=0.5))
    temps = []
    for step in range(0, 11):
        if step:
            model.after_step(step, 10, torch.ones(()))
        temps.append(model.teacher_temperature().item())
    assert temps[:6] == pytest.approx([0.02] * 6)
    assert temps[6:] == pytest.approx([0.024, 0.028, 0.032, 0.036, 0.04])


def test_the_last_layer_is_frozen_for_its_first_steps_only():
    torch.manual_seed(0)
    model = GLMAE(ENCODER, tiny_cfg(freeze_last_steps=2))
    batch = batch_of(model)
    grads = []
    for step in range(1, 4):
        model.zero_grad()
        model(batch)[0].backward()
        grads.append(model.head.last.weight.grad.abs().sum().item())
        assert model.head.mlp[0].weight.grad.abs().sum() > 0
        model.after_step(step, 10, torch.ones(()))
    assert grads[0] == grads[1] == 0 and grads[2] > 0


def test_local_views_of_every_packaged_config_show_at_least_27_tokens():
    from glmae.config import available, load_config
    from glmae.models.patches import token_grid

    checked = 0
    for name in available():
        cfg = load_config(name)
        if cfg.method.name != "glmae" or not cfg.method.n_local:
            continue
        visible = round((1 - cfg.method.mask_ratio) * math.prod(token_grid(cfg.method.local_size,
                                                                         cfg.encoder.patch_size)))
        assert visible >= 27, (name, visible)
        checked += 1
    assert checked >= 4
