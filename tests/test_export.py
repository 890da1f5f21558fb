import json

import pytest
import torch

from glmae import config as cfglib
from glmae.config import load_config
from glmae.engine import checkpoint
from glmae.engine.run import read_encoder

LABELS = "method.labels={0: background, 1: a, 2: b}"


def _checkpoint(path, name: str, overrides: list[str]):
    """A checkpoint as the engine writes it, of a freshly initialised model."""
    from glmae.methods import PRETRAINING, SEGMENTATION

    cfg = load_config(name, overrides)
    torch.manual_seed(0)
    methods = {**PRETRAINING, **SEGMENTATION}
    model = methods[cfg.method.name](cfg.encoder, cfg.method).eval()
    state = {"kind": cfg.task, "config": cfglib.to_dict(cfg), "step": 5, "model": model.state_dict()}
    checkpoint.save(state, path)
    return model


def test_monai_unetr_loads_strictly_and_computes_the_same(tmp_path, run_cli):
    from monai.networks.nets import UNETR

    ours = _checkpoint(tmp_path / "best.pt", "unetr_vit_base",
                       ["encoder.width=48", "encoder.heads=4", "method.roi=[32,32,32]", LABELS])
    code, out, err = run_cli("export", "--checkpoint", tmp_path / "best.pt", "--format", "monai-unetr",
                             "--out", tmp_path / "unetr.pt")
    assert code == 0, err
    args = json.loads((tmp_path / "unetr.json").read_text())
    assert args["img_size"] == [32, 32, 32] and args["out_channels"] == 3 and args["hidden_size"] == 48
    theirs = UNETR(**args).eval()
    theirs.load_state_dict(torch.load(tmp_path / "unetr.pt", weights_only=True), strict=True)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours.net(x), rtol=1e-4, atol=1e-4)

    # from the encoder alone: the vit.* part, for UNETR(out_channels=..., **args) with strict=False
    assert run_cli("export", "--checkpoint", tmp_path / "best.pt", "--format", "safetensors",
                   "--out", tmp_path / "enc.safetensors")[0] == 0
    code, out, err = run_cli("export", "--checkpoint", tmp_path / "enc.safetensors", "--format", "monai-unetr",
                             "--out", tmp_path / "vit_part.pt")
    assert code == 0 and "strict=False" in out, err
    fresh = UNETR(out_channels=3, **json.loads((tmp_path / "vit_part.json").read_text()))
    missing, unexpected = fresh.load_state_dict(torch.load(tmp_path / "vit_part.pt", weights_only=True), strict=False)
    assert not unexpected and missing and not any(k.startswith("vit.") for k in missing)
    torch.testing.assert_close(fresh.vit.blocks[3].mlp.linear1.weight, ours.net.vit.blocks[3].mlp.linear1.weight)


def test_monai_vit_from_a_pretraining_checkpoint_any_patch_and_depth(tmp_path, run_cli):
    from monai.networks.nets import ViT

    model = _checkpoint(tmp_path / "last.pt", "mae3d_tiny",
                        ["encoder.width=48", "encoder.depth=2", "encoder.heads=2", "method.roi=[32,32,16]",
                         "method.decoder_width=48", "method.decoder_depth=1", "method.decoder_heads=2"])
    code, _, err = run_cli("export", "--checkpoint", tmp_path / "last.pt", "--format", "monai-vit",
                           "--out", tmp_path / "vit.pt")
    assert code == 0, err
    args = json.loads((tmp_path / "vit.json").read_text())
    assert (args["patch_size"], args["num_layers"], args["img_size"]) == (8, 2, [32, 32, 16])
    theirs = ViT(**args).eval()
    theirs.load_state_dict(torch.load(tmp_path / "vit.pt", weights_only=True), strict=True)
    x = torch.randn(2, 1, 32, 32, 16)
    with torch.no_grad():
        tokens, hidden = theirs(x)
        ours, our_hidden = model.encoder(x, out_blocks=(0,))
    torch.testing.assert_close(tokens, ours, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(hidden[0], our_hidden[0], rtol=1e-4, atol=1e-4)


def test_safetensors_is_the_encoder_alone_and_loads_as_init(tmp_path, run_cli):
    model = _checkpoint(tmp_path / "best.pt", "unetr_tiny",
                        ["encoder.width=48", "encoder.depth=2", "encoder.heads=2", "method.roi=[32,32,32]", LABELS])
    code, _, err = run_cli("export", "--checkpoint", tmp_path / "best.pt", "--format", "safetensors",
                           "--out", tmp_path / "enc.safetensors")
    assert code == 0, err
    weights, arch, _ = read_encoder(tmp_path / "enc.safetensors")
    assert arch["patch_size"] == 8 and json.loads((tmp_path / "enc.json").read_text())["method"] == "unetr"
    expected = model.net.vit.state_dict()
    assert weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in weights)


@pytest.mark.parametrize("fmt, message", [("monai-unetr", "patch 8 and 2 blocks"), ("onnx", "expected one of")])
def test_refusals_exit_2_with_the_reason(tmp_path, run_cli, fmt, message):
    _checkpoint(tmp_path / "best.pt", "unetr_tiny",
                ["encoder.width=48", "encoder.depth=2", "encoder.heads=2", "method.roi=[32,32,32]", LABELS])
    code, _, err = run_cli("export", "--checkpoint", tmp_path / "best.pt", "--format", fmt, "--out", tmp_path / "x.pt")
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "x.pt").exists()
