"""Packaged configs: `glmae config NAME` resolves to the values recorded before the configs were
rewritten to inherit from shared parts (tests/snapshots/), except the fields fixed on purpose."""

from pathlib import Path

import pytest
import yaml

from glmae.config import available, dump_yaml, load_config

SNAPSHOTS = Path(__file__).parent / "snapshots"
# Swin-UNETR's method section carried UNETR's `feature_size`, accepted and ignored (its widths come
# from encoder.feature_size); it is no longer a field of swin_unetr.
REMOVED = {"swin_unetr": {"method.feature_size"}, "swin_unetr_tiny": {"method.feature_size"}}
# fields added since, whose defaults change nothing for the configs recorded: radiographs' size
# (data.image_size), MAE3D's random-resized views and flip axes (method.view_scale, flip_axes), the
# ViT's learned position table of imported weights (encoder.learned_pos_grid)
ADDED = {"data.image_size": None, "method.view_scale": None, "method.flip_axes": [0, 1, 2],
         "encoder.learned_pos_grid": None}
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
    before = flat(yaml.safe_load((SNAPSHOTS / "configs" / f"{name}.yaml").read_text()))
    removed = REMOVED.get(name, set())
    assert not removed & set(now), f"{name} still has {removed & set(now)}"
    added = {k: v for k, v in ADDED.items() if k in now and k not in before}
    assert {k: now[k] for k in added} == added
    assert {k: v for k, v in now.items() if k not in added} == {k: v for k, v in before.items() if k not in removed}


@pytest.mark.parametrize("name", PHANTOM)
def test_phantom_configs_are_what_the_demo_and_benchmark_ran(name):
    before = flat(yaml.safe_load((SNAPSHOTS / "phantom" / f"{name}.yaml").read_text()))
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
