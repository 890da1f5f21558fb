"""The classifier: mean-pooled ViT tokens, BCE over findings, linear and end-to-end modes, and the
whole 2D path as a user runs it: synth --kind cxr -> pretrain -> finetune -> evaluate -> predict."""

import csv
import json
import types

import numpy as np
import pytest
import torch

from glmae.methods.classification import Classifier, ClassifierConfig, TrainItem, sample_view
from glmae.models.vit import ViTConfig, sincos_embedding

ENCODER = ViTConfig(patch_size=(4, 4, 1), width=24, depth=2, heads=2)


def classifier(mode="e2e", findings=("a", "b", "c")):
    return Classifier(ENCODER, ClassifierConfig(roi=(16, 16, 1), findings=list(findings), mode=mode,
                                                view_scale=(0.5, 1.0)))


def test_logits_are_a_linear_head_on_mean_pooled_tokens():
    torch.manual_seed(0)
    model = classifier().eval()
    x = torch.randn(3, 1, 16, 16, 1)
    tokens, _ = model.net.vit(x)
    assert tokens.shape == (3, 16, 24)
    expected = model.net.head(model.net.fc_norm(tokens.mean(1)))
    torch.testing.assert_close(model.net(x), expected)
    assert model.net(x).shape == (3, 3) and model.net.head.weight.abs().max() < 1e-3  # MAE's near-zero head


def test_loss_is_bce_over_findings_and_every_parameter_learns():
    torch.manual_seed(0)
    model = classifier()
    batch = {"image": torch.randn(4, 1, 16, 16, 1), "target": torch.tensor([[1, 0, 0], [0, 1, 1], [0, 0, 0],
                                                                             [1, 1, 0]], dtype=torch.float32)}
    loss, _ = model(batch)
    expected = torch.nn.functional.binary_cross_entropy(torch.sigmoid(model.net(batch["image"])), batch["target"])
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_linear_mode_trains_the_head_only_and_layer_decay_covers_the_blocks():
    from glmae.config import OptimConfig

    model = classifier(mode="linear")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"net.fc_norm.weight", "net.fc_norm.bias", "net.head.weight", "net.head.bias"}
    model.train()
    assert not model.net.vit.training and model.net.head.training
    e2e = classifier()
    assert e2e.net.layer_of("vit.patch_embedding.patch_embeddings.weight") == 0
    assert e2e.net.layer_of("vit.blocks.1.attn.qkv.weight") == 2 and e2e.net.layer_of("head.weight") == 3
    scales = sorted({g["lr_scale"] for g in e2e.param_groups(OptimConfig(layer_decay=0.5))})
    assert scales == [0.125, 0.25, 0.5, 1.0]


def test_training_views_are_replayable_and_flip_horizontally_only():
    image = np.random.default_rng(0).random((1, 24, 20, 1), dtype=np.float32)
    item = TrainItem(types.SimpleNamespace(image=image), np.array([1, 0, 1], np.float32))
    cfg = ClassifierConfig(roi=(16, 16, 1), findings=["a", "b", "c"], view_scale=(1.0, 1.0), flip_prob=1.0)
    a, b = sample_view(item, np.random.default_rng(4), cfg=cfg), sample_view(item, np.random.default_rng(4), cfg=cfg)
    assert a["image"].shape == (1, 16, 16, 1) and np.array_equal(a["image"], b["image"])
    from glmae.data.sampling import resize

    np.testing.assert_allclose(a["image"], resize(image, (16, 16, 1))[:, :, ::-1], atol=1e-6)  # axis 1 flipped
    assert a["target"].tolist() == [1, 0, 1]


def test_a_2d_encoder_is_the_3d_encoder_on_depth_1_images():
    """The classifier's ViT is the one ViT: its patch embedding is a Conv3d with kernel (4, 4, 1)."""
    model = classifier()
    assert model.net.vit.patch_embedding.patch_embeddings.kernel_size == (4, 4, 1)
    assert sincos_embedding((4, 4, 1), 24).shape == (16, 24)


@pytest.mark.slow
def test_the_2d_path_end_to_end(tmp_path, run_cli):
    """synth --kind cxr -> pretrain (MAE) -> finetune (classifier) -> evaluate -> predict, tiny."""
    small = ["--set", "data.image_size=[32,32]", "--set", "method.roi=[32,32,1]", "--set", "train.batch_size=4",
             "--set", "data.num_workers=0"]
    code, _, err = run_cli("synth", tmp_path / "cxr", "--kind", "cxr", "--cases", "30", "--shape", "48", "48", "1")
    assert code == 0, err
    code, _, err = run_cli("pretrain", "--config", "mae2d_tiny", "--data", tmp_path / "cxr" / "images",
                           "--out", tmp_path / "pre", "--max-steps", "3", *small)
    assert code == 0, err
    meta = json.loads((tmp_path / "pre" / "encoder.json").read_text())
    assert meta["encoder"]["patch_size"] == [8, 8, 1]
    code, _, err = run_cli("finetune", "--config", "cxr_classifier_tiny", "--data", tmp_path / "cxr" / "labels.csv",
                           "--out", tmp_path / "ft", "--init", tmp_path / "pre" / "encoder.safetensors",
                           "--max-steps", "4", "--set", "train.val_every=2", *small)
    assert code == 0, err
    assert "loaded 76 tensors, missing 0" in err
    val = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert val["split"] == "val" and 0 <= val["mean_auc"] <= 1 and val["step"] in (2, 4)
    splits = json.loads((tmp_path / "ft" / "splits.json").read_text())
    patient = {r["Image Index"][:-4]: r["Patient ID"] for r in csv.DictReader(open(tmp_path / "cxr" / "labels.csv"))}
    assert not {patient[i] for i in splits["train"]} & {patient[i] for i in splits["val"]}
    code, out, err = run_cli("evaluate", "--checkpoint", tmp_path / "ft" / "checkpoints" / "best.pt",
                             "--data", tmp_path / "cxr" / "labels.csv", "--split", "val", "--out", tmp_path / "m.json")
    assert code == 0, err
    assert "mean AUC" in out
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["n_cases"] == len(splits["val"]) and set(metrics["per_class"]) == set(val["per_class"])
    assert metrics["per_class"] == val["per_class"]  # the same checkpoint on the same images
    with open(tmp_path / "m.csv") as f:
        assert next(csv.reader(f)) == ["case", "finding", "probability", "truth"]
    assert (tmp_path / "m.png").is_file()
    code, _, err = run_cli("predict", "--checkpoint", tmp_path / "ft" / "checkpoints" / "best.pt",
                           "--input", tmp_path / "cxr" / "images", "--out", tmp_path / "pred")
    assert code == 0, err
    with open(tmp_path / "pred" / "predictions.csv") as f:
        table = list(csv.reader(f))
    findings = list(val["per_class"])
    assert table[0] == ["image", *findings] and len(table) == 31
    assert all(0 < float(p) < 1 for row in table[1:] for p in row[1:])
    data_csv = (tmp_path / "cxr" / "labels.csv").read_bytes()
    code, _, err = run_cli("predict", "--checkpoint", tmp_path / "ft" / "checkpoints" / "best.pt",
                           "--input", tmp_path / "cxr" / "images", "--out", tmp_path / "cxr" / "labels.csv")
    assert code == 2 and err == (f"glmae: error: {tmp_path / 'cxr' / 'labels.csv'}: exists and is not glmae "
                                 "predictions: refusing to overwrite it (choose another --out)\n"), err
    assert (tmp_path / "cxr" / "labels.csv").read_bytes() == data_csv  # the data set's table is kept
    code, _, err = run_cli("predict", "--checkpoint", tmp_path / "ft" / "checkpoints" / "best.pt",
                           "--input", tmp_path / "cxr" / "images", "--out", tmp_path / "pred")
    assert code == 0, err  # its own predictions are replaced
