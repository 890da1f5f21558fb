"""`glmae import` as a user runs it: published layouts in, an encoder.safetensors that `finetune --init`
loads out; bad files refused with one line and nothing written."""

from __future__ import annotations

import argparse
import json
import pickle
import warnings
import zipfile

import numpy as np
import pytest
import torch
from segdata import write_msd
from test_export import _checkpoint
from test_models_foreign import glmae_paper_state, monai_vit, randomised, release_layout

from glmae.engine.run import read_encoder
from glmae.models.swin import SwinConfig
from glmae.models.vit import ViTConfig


def swin_release(path, feature_size=12, window=4):
    """A `model_swinvit.pt` of MONAI's Swin-UNETR encoder (random weights), in the release's layout."""
    from monai.networks.nets import SwinUNETR

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = randomised(SwinUNETR(in_channels=1, out_channels=2, feature_size=feature_size, window_size=window))
    torch.save(release_layout(net.swinViT.state_dict()), path)
    return net.swinViT.state_dict()


def test_round_trip_export_monai_vit_then_import_gives_identical_weights(tmp_path, run_cli):
    _checkpoint(tmp_path / "last.pt", "mae3d_tiny",
                ["encoder.width=48", "encoder.depth=2", "encoder.heads=2", "method.roi=[32,32,16]",
                 "method.decoder_width=48", "method.decoder_depth=1", "method.decoder_heads=2"])
    assert run_cli("export", "--checkpoint", tmp_path / "last.pt", "--format", "safetensors",
                   "--out", tmp_path / "ours.safetensors")[0] == 0
    code, _, err = run_cli("export", "--checkpoint", tmp_path / "last.pt", "--format", "monai-vit",
                           "--out", tmp_path / "vit.pt")
    assert code == 0, err
    code, out, err = run_cli("import", "--format", "monai-vit", "--checkpoint", tmp_path / "vit.pt",
                             "--out", tmp_path / "back.safetensors", "--strict")
    assert code == 0, err
    assert "fixed sin-cos for 4x4x2 tokens: recomputed" in out  # the tokens of img_size 32x32x16, from vit.json
    ours, our_arch, _ = read_encoder(tmp_path / "ours.safetensors")
    back, back_arch, description = read_encoder(tmp_path / "back.safetensors")
    assert back_arch == our_arch and description == "monai-vit (imported) encoder"
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)


def test_a_learned_monai_vit_round_trips_and_loads_with_the_printed_options(tmp_path, run_cli):
    from glmae.config import load_config
    from glmae.finetune import load_init
    from glmae.methods import SEGMENTATION

    theirs = monai_vit(in_channels=1)
    torch.save({"state_dict": theirs.state_dict()}, tmp_path / "ssl.pt")
    code, out, err = run_cli("import", "--format", "monai-vit", "--checkpoint", tmp_path / "ssl.pt", "--heads", 4,
                             "--img-size", 32, 32, 16, "--out", tmp_path / "a.safetensors")
    assert code == 0, err
    hint = out.split("fine-tune: glmae finetune --config ")[1].split(" --init ")[0].split()
    name, overrides = hint[0], hint[2::2]
    assert hint[1::2] == ["--set"] * len(overrides) and "encoder.learned_pos_grid=[4,4,2]" in overrides
    cfg = load_config(name, overrides + ["method.labels={0: background, 1: a}"])
    model = SEGMENTATION[cfg.method.name](cfg.encoder, cfg.method)
    expected = f"loaded {len(model.net.encoder.state_dict())} tensors, missing 0, unexpected 0"
    assert expected in load_init(model.net.encoder, str(tmp_path / "a.safetensors"), cfg)
    assert run_cli("export", "--checkpoint", tmp_path / "a.safetensors", "--format", "monai-vit",
                   "--out", tmp_path / "exported.pt")[0] == 0
    assert json.loads((tmp_path / "exported.json").read_text())["pos_embed_type"] == "learnable"
    assert run_cli("import", "--format", "monai-vit", "--checkpoint", tmp_path / "exported.pt",
                   "--out", tmp_path / "b.safetensors")[0] == 0
    a, arch_a, _ = read_encoder(tmp_path / "a.safetensors")
    b, arch_b, _ = read_encoder(tmp_path / "b.safetensors")
    assert arch_a == arch_b and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    torch.testing.assert_close(a["patch_embedding.position_embeddings"],
                               theirs.state_dict()["patch_embedding.position_embeddings"])


def test_a_release_with_training_arguments_and_numpy_scalars_loads(tmp_path, run_cli):
    """GL-MAE's checkpoint as MAE-style training writes it: the model beside an argparse Namespace and
    numpy scalars, which weights_only allows only because `glmae import` names exactly those classes."""
    args = argparse.Namespace(model="vit_base_patch16", input_size=96, mask_ratio=0.75, norm_pix_loss=True)
    sd = glmae_paper_state(width=768, depth=1, patch=16, grid=(2, 2, 2), decoder=False)
    torch.save({"model": sd, "epoch": 1599, "args": args, "best_loss": np.float64(0.25), "seen": np.int64(7)},
               tmp_path / "checkpoint-1599.pth")
    with pytest.raises(pickle.UnpicklingError):  # plain weights_only refuses the Namespace
        torch.load(tmp_path / "checkpoint-1599.pth", weights_only=True)
    code, out, err = run_cli("import", "--format", "glmae-paper", "--checkpoint", tmp_path / "checkpoint-1599.pth",
                             "--out", tmp_path / "glmae.safetensors")
    assert code == 0, err
    assert "heads 12: the published ViT of width 768" in out and "its 'model' entry" in out
    _, arch, _ = read_encoder(tmp_path / "glmae.safetensors")
    assert (arch["width"], arch["heads"], arch["patch_size"], arch["learned_pos_grid"]) == (768, 12, 16, [2, 2, 2])


def test_numpy_scalars_pickled_by_numpy_1_load_too(tmp_path, run_cli):
    """Releases of 2022-2023 were written under numpy 1, whose scalars pickle as
    numpy.core.multiarray.scalar (numpy 2: numpy._core)."""
    torch.save({"state_dict": monai_vit(in_channels=1, img_size=32, patch_size=16).state_dict(),
                "best_metric": np.float64(0.8)}, tmp_path / "new.pt")
    with zipfile.ZipFile(tmp_path / "new.pt") as zin, zipfile.ZipFile(tmp_path / "old.pt", "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray" in data
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            zout.writestr(item, data)
    assert "numpy.core.multiarray.scalar" in torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "old.pt")
    code, _, err = run_cli("import", "--format", "monai-vit", "--checkpoint", tmp_path / "old.pt", "--heads", 4,
                           "--out", tmp_path / "enc.safetensors")
    assert code == 0, err


class _Payload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def _truncated(path):
    torch.save({"state_dict": monai_vit().state_dict()}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _crafted(path):
    """A release's layout with an allowed Namespace and a payload that would create a file."""
    args = argparse.Namespace(epochs=1)
    torch.save({"state_dict": {"norm.weight": torch.ones(2)}, "args": args, "hook": _Payload(str(path) + ".pwned")},
               path)


def _not_torch(path):
    """A NIfTI image given where the weights go."""
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), path.with_suffix(".nii.gz"))
    path.with_suffix(".nii.gz").rename(path)


def _wrong_format(path):
    swin_release(path)


@pytest.mark.parametrize("make, fmt, message", [
    (_wrong_format, "monai-vit", "--format monai-vit: none of its 126 tensors is a monai-vit encoder key (it looks "
                                 "like --format monai-swinvit)\n"),
    (_wrong_format, "glmae-paper", "--format glmae-paper: only 2 of its 126 tensors are glmae-paper encoder keys, 126 "
                                   "are monai-swinvit ones: it looks like --format monai-swinvit\n"),
    (_truncated, "monai-vit", "not a readable checkpoint (RuntimeError: PytorchStreamReader failed reading zip "
                              "archive: failed finding central directory)\n"),
    (_not_torch, "monai-vit", "not a PyTorch checkpoint: neither a zip archive nor a pickle (gzip-compressed: an "
                              "image?)\n"),
    (_crafted, "monai-vit", "refusing to load: the file holds Python objects beyond tensors and plain values "
                            "(possibly malicious; not executed)"),
], ids=["wrong format", "wrong format sharing a few names", "truncated", "not torch", "crafted"])
def test_bad_files_exit_2_with_one_line_and_nothing_written(tmp_path, run_cli, make, fmt, message):
    source = tmp_path / "weights.pt"
    make(source)
    code, out, err = run_cli("import", "--format", fmt, "--checkpoint", source, "--heads", 3,
                             "--out", tmp_path / "out" / "enc.safetensors")
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"glmae: error: {source}: {message}"), err
    assert not (tmp_path / "out").exists() and not (tmp_path / "weights.pt.pwned").exists()


def test_strict_refuses_missing_or_unexpected_keys_and_writes_nothing(tmp_path, run_cli):
    state = monai_vit(in_channels=1, img_size=32, patch_size=16).state_dict()
    del state["blocks.1.mlp.linear2.bias"]
    state["blocks.0.adapter.weight"] = torch.zeros(2)
    torch.save(state, tmp_path / "vit.pt")
    args = ["import", "--format", "monai-vit", "--checkpoint", tmp_path / "vit.pt", "--heads", 4]
    code, out, err = run_cli(*args, "--out", tmp_path / "strict.safetensors", "--strict")
    assert code == 2 and "--strict: 1 missing and 1 unexpected keys" in err and "nothing written" in err
    assert not (tmp_path / "strict.safetensors").exists()
    code, out, err = run_cli(*args, "--out", tmp_path / "lenient.safetensors")
    assert code == 0, err
    assert "missing       1  blocks.1.mlp.linear2.bias" in out and "unexpected    1  blocks.0.adapter.weight" in out
    assert "blocks.1.mlp.linear2.bias" not in read_encoder(tmp_path / "lenient.safetensors")[0]


def test_options_are_checked(tmp_path, run_cli):
    swin_release(tmp_path / "model_swinvit.pt")
    code, _, err = run_cli("import", "--format", "nnunet", "--checkpoint", tmp_path / "model_swinvit.pt",
                           "--out", tmp_path / "e.safetensors")
    assert code == 2 and "--format: expected one of glmae-paper, selfmedmae, monai-swinvit, monai-vit" in err
    code, _, err = run_cli("import", "--format", "monai-swinvit", "--checkpoint", tmp_path / "model_swinvit.pt",
                           "--out", tmp_path / "e.pt")
    assert code == 2 and "--out: expected a .safetensors file" in err
    code, _, err = run_cli("import", "--format", "monai-swinvit", "--checkpoint", tmp_path / "missing.pt",
                           "--out", tmp_path / "e.safetensors")
    assert code == 2 and "checkpoint not found" in err


@pytest.mark.slow
def test_a_monai_swin_release_fine_tunes_in_swin_unetr(tmp_path, run_cli):
    weights = swin_release(tmp_path / "model_swinvit.pt")
    code, out, err = run_cli("import", "--format", "monai-swinvit", "--checkpoint", tmp_path / "model_swinvit.pt",
                             "--out", tmp_path / "swin.safetensors", "--strict")
    assert code == 0, err
    assert "--config swin_unetr_tiny --set encoder.feature_size=12 --init" in out
    data = write_msd(tmp_path / "data", cases=3, shape=(64, 64, 32), spacing=(3.0, 3.0, 4.0))
    overrides = ["encoder.feature_size=12", "data.spacing=null", "data.crop_foreground=false",
                 "data.num_workers=0", "method.sw_batch_size=1", "train.val_every=3", "train.log_every=1"]
    code, _, err = run_cli("finetune", "--config", "swin_unetr_tiny", "--data", data, "--out", tmp_path / "ft",
                           "--init", tmp_path / "swin.safetensors", "--max-steps", 3,
                           *[a for o in overrides for a in ("--set", o)])
    assert code == 0, err
    assert f"(monai-swinvit (imported) encoder): loaded {len(weights)} tensors, missing 0, unexpected 0" in err
    metrics = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert metrics["step"] == 3 and 0 <= metrics["mean_dice"] <= 1
    tuned = torch.load(tmp_path / "ft" / "checkpoints" / "last.pt", weights_only=True)["model"]
    moved = max((tuned[f"net.swinViT.{k}"].float() - v.float()).abs().max().item() for k, v in weights.items())
    assert moved < 1e-3  # MONAI's weights, three small steps on (a fresh encoder differs by ~0.1)


# The published encoders, as their sources define them
PUBLISHED = {
    # GL-MAE (JiaxinZhuang/GL-MAE, Finetune/models_3dvit.py): vit_base_patch16_3d at img_size 96, its
    # position table fixed (requires_grad=False)
    "glmae-paper": ViTConfig(patch_size=16, width=768, depth=12, heads=12),
    # SelfMedMAE (configs/mae3d_btcv_1gpu.yaml): patch 16, encoder 768 wide, 12 blocks, 12 heads, sincos
    "selfmedmae": ViTConfig(patch_size=16, width=768, depth=12, heads=12),
    # model_swinvit.pt (research-contributions SwinUNETR/Pretrain/models/ssl_head.py, feature_size 48)
    "monai-swinvit": SwinConfig(feature_size=48, depths=(2, 2, 2, 2), heads=(3, 6, 12, 24), window=7, patch_size=2),
    # MONAI's ViT pre-training tutorial: ViTAutoEnc(img_size 96, patch 16, hidden 768, 12 layers, 12 heads),
    # a learned table of 6x6x6 tokens
    "monai-vit": ViTConfig(patch_size=16, width=768, depth=12, heads=12, learned_pos_grid=(6, 6, 6)),
}


def test_the_readmes_fine_tuning_command_per_format_is_what_import_prints_for_the_published_encoder():
    from pathlib import Path

    from glmae.import_weights import finetune_hint

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Fine-tune from published weights")[1].split("\n## ")[0].replace("\\\n", " ")
    commands = [line.split() for line in section.splitlines() if line.strip().startswith("glmae ")]
    found = {}
    for imported, tuned in zip(commands[::2], commands[1::2]):
        assert imported[:3] == ["glmae", "import", "--format"] and tuned[:2] == ["glmae", "finetune"], (imported, tuned)
        out = imported[imported.index("--out") + 1]
        assert tuned[tuned.index("--init") + 1] == out
        found[imported[3]] = " ".join(tuned[2:tuned.index("--init")])
    assert found == {fmt: finetune_hint(cfg) for fmt, cfg in PUBLISHED.items()}


@pytest.mark.parametrize("channels", [1, 4])
def test_the_fine_tuning_hint_prefers_a_config_for_as_many_input_channels(channels):
    """A 1-channel CT encoder is not pointed to a 4-channel MRI config because its other fields are closer."""
    from glmae.config import load_config
    from glmae.import_weights import finetune_hint

    hint = finetune_hint(SwinConfig(in_channels=channels, feature_size=12, window=4)).split()
    assert "encoder.in_channels" not in " ".join(hint)
    assert load_config(hint[1]).encoder.in_channels == channels
