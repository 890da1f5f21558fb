"""Packaged configs: `glmae config NAME` resolves to the values recorded before the configs were
rewritten to inherit from shared parts (tests/snapshots/), except the fields changed on purpose;
every paper-scale config agrees with its paper (the audit table `PAPERS`)."""

from pathlib import Path

import pytest
import yaml

from glmae.config import available, dump_yaml, global_batch, load_config
from glmae.engine.optim import peak_lr

SNAPSHOTS = Path(__file__).parent / "snapshots"
# Swin-UNETR's method section carried UNETR's `feature_size`, accepted and ignored (its widths come
# from encoder.feature_size); it is no longer a field of swin_unetr.
REMOVED = {"swin_unetr": {"method.feature_size"}, "swin_unetr_tiny": {"method.feature_size"}}
# fields added since, whose defaults change nothing for the configs recorded: radiographs' size
# (data.image_size), MAE3D's random-resized views and flip axes (method.view_scale, flip_axes), the
# ViT's learned position table of imported weights (encoder.learned_pos_grid), a warm-up given in
# epochs, activation checkpointing, torch.compile, the surface metrics' NSD tolerance and whether
# fine-tuning validates with them, how --init adapts its input channels,
# GMIM's entropy range on MRI, GL-MAE's collapse alarm (it only logs and warns), WT/TC/ET regions
# from BraTS labels (only data sets labelled as BraTS sub-regions meet it), fine-tuning's frozen
# warm-up of the encoder (0: none)
ADDED = {"data.image_size": None, "method.view_scale": None, "method.flip_axes": [0, 1, 2],
         "encoder.learned_pos_grid": None,
         "optim.warmup_epochs": 0.0, "train.grad_checkpoint": False, "train.compile": False,
         "method.nsd_tolerance": 1.0, "method.validate_surface": False, "method.init_channels": "average",
         "method.entropy_percentiles": [0.5, 99.5], "method.collapse_patience": 10, "method.brats_regions": True,
         "train.probe_every": 500, "train.probe_data": "", "train.probe_steps": 100,
         "method.freeze_encoder_steps": 0, "method.tau_t_hold": 0.0}
# GL-MAE's consistency made to keep teaching (issue 21, on purpose): which pairs teach and what a
# target averages, nested local views, DINO's head (bottleneck, cosine last layer, running
# normalisation instead of BatchNorm), its freeze, lr and temperature schedule; local views of at
# least 27 visible tokens in glmae_tiny and glmae_phantom (and glmae_brats_tiny, built on the latter),
# and gradients clipped at norm 3 there as in the paper configs
GLMAE_FIX = {"method.nested_locals": True, "method.g2g_pairs": "same", "method.l2g_pairs": "containing",
             "method.target_pool": "matched", "method.head_bottleneck": 256, "method.head_norm_last": True,
             "method.head_norm": "none", "method.freeze_last_steps": 0, "method.head_lr_scale": 0.3,
             "method.tau_t_start": 0.04, "method.tau_t_warmup": 0.0}
GLMAE_REMOVED = {"method.head_batch_norm"}
GLMAE_LOCALS = {"glmae_tiny": [40, 40, 40], "glmae_phantom": [48, 48, 24], "glmae_brats_tiny": [48, 48, 24]}
# fields set to the papers' values since (see PAPERS): MAE3D's lr was 40x below SelfMedMAE's, and
# its steps, batch and warm-up were not SelfMedMAE's; UNETR fine-tunes 3000 epochs as GL-MAE's paper
CHANGED = {
    "mae3d_vit_base": {"optim.lr": 1.6e-3, "optim.warmup_steps": 0, "optim.warmup_epochs": 400.0,
                       "train.max_steps": 1000, "train.epochs": 40000.0, "train.batch_size": 24},
    "unetr_vit_tiny": {"train.max_steps": 1000, "train.epochs": 3000.0},
    # SelfMedMAE's 256-wide decoder, which the 3D sin-cos table refuses (glmae plan found it)
    "mae2d_vit_base": {"method.decoder_width": 264},
    "unetr_vit_base": {"train.max_steps": 1000, "train.epochs": 3000.0},
}
# the demo's and the label-efficiency benchmark's phantom scale, until then built from --set strings
# on top of the tiny configs, now packaged configs of their own
PHANTOM = ["glmae_phantom", "mae3d_phantom", "gmim_vit_phantom", "unetr_phantom"]


def flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key in ("encoder", "method", "data", "optim", "train"):
            out |= flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def resolved(name: str) -> dict:
    return flat(yaml.safe_load(dump_yaml(load_config(name))))


@pytest.mark.parametrize("name", sorted(p.stem for p in (SNAPSHOTS / "configs").glob("*.yaml")))
def test_packaged_config_resolves_as_before(run_cli, name):
    code, out, err = run_cli("config", name)
    assert code == 0, err
    now = flat(yaml.safe_load(out))
    before = flat(yaml.safe_load((SNAPSHOTS / "configs" / f"{name}.yaml").read_text())) | CHANGED.get(name, {})
    before, removed = glmae_fix(name, before), REMOVED.get(name, set())
    assert not removed & set(now), f"{name} still has {removed & set(now)}"
    added = {k: v for k, v in ADDED.items() if k in now and k not in before}
    assert {k: now[k] for k in added} == added
    assert {k: v for k, v in now.items() if k not in added} == {k: v for k, v in before.items() if k not in removed}


def glmae_fix(name: str, before: dict) -> dict:
    """A recorded GL-MAE config as the consistency fix changed it (GLMAE_FIX)."""
    if before.get("method.name") != "glmae":
        return before
    kept = {k: v for k, v in before.items() if k not in GLMAE_REMOVED}
    tiny = {"method.local_size": GLMAE_LOCALS[name], "optim.clip_grad": 3.0, "method.tau_t_start": 0.02,
            "method.tau_t_hold": 0.5, "method.tau_t_warmup": 0.5} if name in GLMAE_LOCALS else {}
    return kept | GLMAE_FIX | tiny


@pytest.mark.parametrize("name", PHANTOM)
def test_phantom_configs_are_what_the_demo_and_benchmark_ran(name):
    before = glmae_fix(name, flat(yaml.safe_load((SNAPSHOTS / "phantom" / f"{name}.yaml").read_text())))
    now = resolved(name)
    added = {k: v for k, v in ADDED.items() if k in now and k not in before}
    assert {k: now[k] for k in added} == added
    assert {k: v for k, v in now.items() if k not in added} == before


def test_every_config_is_snapshotted_and_parts_are_not_configs():
    names = set(available())
    assert {p.stem for p in (SNAPSHOTS / "configs").glob("*.yaml")} | set(PHANTOM) <= names
    assert not [n for n in names if n.startswith("_")]


def test_a_base_list_merges_in_order_then_the_file(tmp_path):
    (tmp_path / "a.yaml").write_text("optim: {lr: 1.0, warmup_steps: 3}\n")
    (tmp_path / "b.yaml").write_text("optim: {lr: 2.0}\n")
    (tmp_path / "c.yaml").write_text(
        f"base: [unetr_tiny, {tmp_path / 'a.yaml'}, {tmp_path / 'b.yaml'}]\ntrain: {{seed: 5}}\n")
    cfg = load_config(str(tmp_path / "c.yaml"))
    assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.train.seed) == (2.0, 3, 5)
    assert cfg.method.name == "unetr" and cfg.encoder.patch_size == 8  # the rest from unetr_tiny


def test_a_method_part_without_a_name_merges_into_any_method():
    assert load_config("glmae_phantom").method.decoder_width == 192  # from _mae_tiny, under glmae


def test_swin_unetr_refuses_unetr_feature_size(run_cli):
    code, _, err = run_cli("config", "swin_unetr_tiny", "--set", "method.feature_size=8")
    assert code == 2 and "unknown key method.feature_size" in err and "Traceback" not in err


def test_a_bad_lr_scaling_is_bad_input(run_cli):
    code, _, err = run_cli("config", "mae3d_tiny", "--set", "optim.lr_scaling=sqrt")
    assert code == 2 and "optim.lr_scaling" in err and "'sqrt'" in err and "Traceback" not in err


# --- the config audit: paper-scale configs against their papers ---------------------------------

# The papers' settings per packaged paper-scale config: `batch` is the samples (crops, views'
# volumes, images) of one optimiser step, `peak_lr` the learning rate after the warm-up at that
# batch, `epochs` or `steps` the length, `warmup` as (unit, amount) or None where the paper gives
# none, `views` and `mask_ratio` the method's fields. Sources: docs/METHODS.md, the seed papers,
# SelfMedMAE's configs (configs/*.yaml of cvlab-stonybrook/SelfMedMAE). Every schedule is linear
# warm-up then cosine to `min_lr` per iteration, the engine's only schedule.
GLMAE_VIEWS = {"n_global": 2, "n_local": 4, "global_size": [160, 160, 160], "local_size": [96, 96, 96],
               "global_scale": [0.5, 1.0], "local_scale": [0.25, 0.5]}
PAPERS = {
    # SelfMedMAE mae3d_btcv_1gpu: lr 6.4e-3 x batch 6 / 256, 4 crops (num_samples) per volume, 10000
    # epochs of them with 100 warm-up, 96³, mask 0.75; AdamW (0.9, 0.95), wd 0.05
    "mae3d_vit_base": dict(batch=24, peak_lr=6.4e-3 * 6 / 256, epochs=40000, warmup=("epochs", 400),
                           views={"roi": [96, 96, 96]}, mask_ratio=0.75, weight_decay=0.05, betas=[0.9, 0.95]),
    # GL-MAE (seed 001): ViT-T 400 epochs, initial lr 1e-2, AdamW, batch 64; views as METHODS.md
    "glmae_vit_tiny": dict(batch=64, peak_lr=1e-2, epochs=400, warmup=None, views=GLMAE_VIEWS, mask_ratio=0.75),
    # GL-MAE (seed 001): ViT-B 1000 epochs, otherwise as ViT-T
    "glmae_vit_base": dict(batch=64, peak_lr=1e-2, epochs=1000, warmup=None, views=GLMAE_VIEWS, mask_ratio=0.75),
    # GMIM (seed 002, METHODS.md) on Swin-UNETR's self-supervised recipe: 128³ crops, base mask
    # ratio 0.5; AdamW lr 4e-4, wd 0.1, 500 warm-up steps, 100k steps, batch 2 x 2 crops
    "gmim_swin": dict(batch=4, peak_lr=4e-4, steps=100000, warmup=("steps", 500), views={"roi": [128, 128, 128]},
                      mask_ratio=0.5, weight_decay=0.1),
    # GL-MAE's fine-tuning (seed 001, METHODS.md): UNETR end to end at lr 3e-4, batch 4, 3000 epochs,
    # 96³ crops, layer decay 0.75
    "unetr_vit_tiny": dict(batch=4, peak_lr=3e-4, epochs=3000, warmup=None, views={"roi": [96, 96, 96]},
                           layer_decay=0.75),
    "unetr_vit_base": dict(batch=4, peak_lr=3e-4, epochs=3000, warmup=None, views={"roi": [96, 96, 96]},
                           layer_decay=0.75),
    # MONAI's Swin-UNETR BTCV recipe: lr 1e-4, wd 1e-5, 1 x 4 crops of 96³, 30k steps
    "swin_unetr": dict(batch=4, peak_lr=1e-4, steps=30000, warmup=None, views={"roi": [96, 96, 96]},
                       weight_decay=1e-5),
    # SelfMedMAE unetr_msdbrats_1gpu: lr 3.44e-2 x batch 6 / 256, one 128³ crop per volume, 400 epochs
    # with 10 warm-up, AdamW (0.9, 0.95), wd 0.05, layer decay 0.75
    "unetr_brats": dict(batch=6, peak_lr=3.44e-2 * 6 / 256, epochs=400, warmup=("epochs", 10),
                        views={"roi": [128, 128, 128]}, weight_decay=0.05, betas=[0.9, 0.95], layer_decay=0.75),
    # MONAI's Swin-UNETR BraTS 2021 recipe (GMIM's BraTS fine-tuning builds on it): lr 1e-4, wd 1e-5,
    # 300 epochs with 50 warm-up, 128³ crops, batch 1 on each of 4 GPUs
    "swin_unetr_brats": dict(batch=4, peak_lr=1e-4, epochs=300, warmup=("epochs", 50),
                             views={"roi": [128, 128, 128]}, weight_decay=1e-5),
    # SelfMedMAE mae_cxr14: lr 1.5e-4 x 256 / 256, 800 epochs with 40 warm-up, 224², mask 0.75
    "mae2d_vit_base": dict(batch=256, peak_lr=1.5e-4, epochs=800, warmup=("epochs", 40),
                           views={"roi": [224, 224, 1]}, mask_ratio=0.75, weight_decay=0.05, betas=[0.9, 0.95]),
    # SelfMedMAE vit_finetune_cxr14: lr 1e-3 x 256 / 256, 100 epochs with 5 warm-up, layer decay 0.75
    "cxr_classifier_vit_base": dict(batch=256, peak_lr=1e-3, epochs=100, warmup=("epochs", 5),
                                    views={"roi": [224, 224, 1]}, layer_decay=0.75, betas=[0.9, 0.999]),
}


def bases(name: str) -> set[str]:
    """Every config and part `name` inherits from, through `base:` lists."""
    from glmae.config import CONFIG_DIR

    base = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text()).get("base", [])
    direct = base if isinstance(base, list) else [base]
    return set(direct).union(*(bases(b) for b in direct))


def paper_scale(name: str) -> bool:
    """Configs sized for 2 CPU cores inherit the `_cpu` part; the others are the papers' settings."""
    return "_cpu" not in bases(name)


def test_every_paper_scale_config_is_in_the_audit_table():
    assert sorted(n for n in available() if paper_scale(n)) == sorted(PAPERS)


@pytest.mark.parametrize("name", sorted(PAPERS))
def test_paper_scale_config_matches_its_paper(name):
    paper, cfg = PAPERS[name], load_config(name)
    assert global_batch(cfg) == paper["batch"]
    assert peak_lr(cfg.optim, global_batch(cfg)) == pytest.approx(paper["peak_lr"], rel=1e-9)
    if "epochs" in paper:
        assert cfg.train.epochs == paper["epochs"]
    else:
        assert (cfg.train.epochs, cfg.train.max_steps) == (0, paper["steps"])
    if paper["warmup"] is not None:
        unit, amount = paper["warmup"]
        assert (cfg.optim.warmup_epochs if unit == "epochs" else cfg.optim.warmup_steps) == amount
        assert unit == "epochs" or cfg.optim.warmup_epochs == 0
    assert cfg.optim.min_lr == 0.0
    for key, value in paper["views"].items():
        assert list(getattr(cfg.method, key)) == value if isinstance(value, list) else getattr(cfg.method, key) == value
    if "mask_ratio" in paper:
        assert cfg.method.mask_ratio == paper["mask_ratio"]
    for key in ("weight_decay", "betas", "layer_decay"):
        if key in paper:
            assert pytest.approx(getattr(cfg.optim, key)) == paper[key], key


@pytest.mark.parametrize("name", ["mae3d_vit_base", "glmae_vit_base"])
def test_config_prints_the_effective_peak_lr_and_stays_yaml(run_cli, name, tmp_path):
    code, out, _ = run_cli("config", name)
    assert code == 0 and out.startswith(f"# effective peak lr {PAPERS[name]['peak_lr']:.4g} ")
    copy = tmp_path / "copy.yaml"
    copy.write_text(out)  # the printed config is a config: it round-trips
    assert dump_yaml(load_config(str(copy))) == dump_yaml(load_config(name))
    code, out, _ = run_cli("config", name, "--set", "train.batch_size=48")
    scaled = PAPERS[name]["peak_lr"] * (2 if name == "mae3d_vit_base" else 1)  # linear scaling, or none
    assert out.startswith(f"# effective peak lr {scaled:.4g} ")
