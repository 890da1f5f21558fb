import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from segdata import phantom, write_msd

from glmae.config import load_config
from glmae.data.formats import Case, DataSet
from glmae.engine import checkpoint
from glmae.engine.run import read_encoder
from glmae.errors import InputError
from glmae.finetune import finetune, load_init, make_splits
from glmae.methods.segmentation import Segmenter
from glmae.models.vit import ViT, ViTConfig

# shrink the *_tiny configs to seconds: 32³ crops of 2 mm data, a 2-block ViT of width 48
TINY = ["encoder.width=48", "encoder.depth=2", "encoder.heads=2", "method.roi=[32,32,32]",
        "data.spacing=[2,2,2]", "data.num_workers=0", "train.batch_size=2", "train.log_every=1"]
FINETUNE = TINY + ["method.feature_size=8", "method.sw_batch_size=1", "encoder.drop_path=0"]
PRETRAIN = TINY + ["method.decoder_width=48", "method.decoder_depth=1", "method.decoder_heads=2"]


def _dataset(n_train: int, n_val: int = 0) -> DataSet:
    cases = [Case(f"c{i:02d}", (Path(f"c{i:02d}.nii.gz"),), Path(f"l{i:02d}.nii.gz")) for i in range(n_train)]
    cases += [Case(f"v{i}", (Path(f"v{i}.nii.gz"),), Path(f"lv{i}.nii.gz"), "validation") for i in range(n_val)]
    cases.append(Case("unlabelled", (Path("u.nii.gz"),), None))
    return DataSet(Path("/data"), "d", ("CT",), {0: "background", 1: "x"}, cases, "msd")


def test_label_fractions_are_seeded_nested_and_never_empty():
    dataset = _dataset(21)
    full = make_splits(dataset, 1.0, seed=3)
    assert len(full["val"]) == 4 and len(full["train"]) == 17  # 20% of 21 held out
    assert not set(full["val"]) & set(full["train"]) and "unlabelled" not in full["train"] + full["val"]
    half, quarter = make_splits(dataset, 0.5, seed=3), make_splits(dataset, 0.25, seed=3)
    assert half["val"] == quarter["val"] == full["val"]  # validation does not depend on the fraction
    assert len(half["train"]) == 9 and len(quarter["train"]) == 4
    assert set(quarter["train"]) < set(half["train"]) < set(full["train"])
    assert make_splits(dataset, 0.5, seed=3) == half  # same seed, same subset
    assert make_splits(dataset, 0.5, seed=4)["train"] != half["train"]
    assert len(make_splits(dataset, 0.0, seed=3)["train"]) == 1  # always at least one case
    assert len(make_splits(_dataset(2), 1.0, seed=0)["val"]) == 1


def test_splits_use_the_datasets_own_validation_list():
    splits = make_splits(_dataset(5, n_val=2), 0.4, seed=0)
    assert splits["val"] == ["v0", "v1"] and len(splits["train"]) == 2
    with pytest.raises(InputError, match="at least 2 labelled training cases"):
        make_splits(_dataset(1), 1.0, seed=0)


def _encoder_file(path: Path, **arch) -> tuple[Path, dict]:
    cfg = ViTConfig(**{"width": 48, "depth": 2, "heads": 2, "patch_size": 8, **arch})
    torch.manual_seed(123)
    weights = ViT(cfg).state_dict()
    meta = {"format": "glmae-encoder/1", "encoder": cfg.__dict__, "method": "mae3d", "steps": 7}
    checkpoint.save_encoder(weights, meta, path)
    return path, weights


def test_init_loads_the_file_and_linear_mode_leaves_the_encoder_bitwise_unchanged(tmp_path, capsys):
    path, weights = _encoder_file(tmp_path / "encoder.safetensors")
    cfg = load_config("unetr_tiny", FINETUNE + ["train.max_steps=3", "optim.lr=1e-2", "optim.warmup_steps=0"])
    model = Segmenter(cfg.encoder, cfg.method.__class__(labels={0: "bg", 1: "cube", 2: "sphere"}))
    report = load_init(model.net.encoder, str(path), cfg)
    assert "loaded 28 tensors, missing 0, unexpected 0" in report
    torch.testing.assert_close(model.net.vit.blocks[0].attn.qkv.weight, weights["blocks.0.attn.qkv.weight"],
                               rtol=0, atol=0)  # before training: the file's weights

    data = write_msd(tmp_path / "data", 3)
    metrics = finetune(cfg, str(data), tmp_path / "run", init=str(path), mode="linear")
    assert "init: " in capsys.readouterr().err
    state = checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")
    for name, value in weights.items():
        assert torch.equal(state["model"][f"net.vit.{name}"], value), name
    assert not torch.equal(state["model"]["net.out.conv.conv.weight"], model.state_dict()["net.out.conv.conv.weight"])
    assert state["config"]["method"]["mode"] == "linear" and state["config"]["method"]["init"] == str(path)
    assert set(metrics["per_class"]) == {"cube", "sphere"}


def test_mismatched_encoder_is_refused_naming_the_fields(tmp_path, run_cli):
    path, _ = _encoder_file(tmp_path / "encoder.safetensors", depth=3, patch_size=16)
    data = write_msd(tmp_path / "data", 3)
    args = ["finetune", "--config", "unetr_tiny", "--data", data, "--out", tmp_path / "run", "--init", path]
    code, _, err = run_cli(*args, *[a for o in FINETUNE for a in ("--set", o)])
    assert code == 2
    assert "patch_size 16 != 8" in err and "depth 3 != 2" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


@pytest.mark.slow
def test_pretrain_finetune_evaluate_through_the_cli(tmp_path, run_cli):
    data = write_msd(tmp_path / "data", 4)
    sets = lambda overrides: [a for o in overrides for a in ("--set", o)]  # noqa: E731
    code, _, err = run_cli("pretrain", "--config", "mae3d_tiny", "--data", data, "--out", tmp_path / "pre",
                           "--max-steps", 3, *sets(PRETRAIN))
    assert code == 0, err
    encoder = tmp_path / "pre" / "encoder.safetensors"
    from_ckpt = read_encoder(tmp_path / "pre" / "checkpoints" / "last.pt")[0]
    from_file = read_encoder(encoder)[0]
    assert from_ckpt.keys() == from_file.keys() and all(torch.equal(from_ckpt[k], from_file[k]) for k in from_file)

    run = tmp_path / "ft"
    code, _, err = run_cli("finetune", "--config", "unetr_tiny", "--data", data, "--out", run, "--init", encoder,
                           "--max-steps", 4, *sets(FINETUNE + ["train.val_every=2"]))
    assert code == 0, err
    assert "loaded 28 tensors, missing 0, unexpected 0" in err
    splits = json.loads((run / "splits.json").read_text())
    assert len(splits["val"]) == 1 and len(splits["train"]) == 3 and splits["test"] == []
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics) >= {"mean_dice", "per_class", "n_cases", "per_case"} and metrics["n_cases"] == 1
    assert metrics["per_case"][0]["case"] == splits["val"][0]
    assert metrics["mean_dice"] == pytest.approx(np.mean(list(metrics["per_class"].values())))
    assert (run / "figures" / "validation_dice.png").is_file() and (run / "checkpoints" / "best.pt").is_file()
    logged = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "mean_dice" in r] == [2, 4]

    out = tmp_path / "eval" / "metrics.json"
    code, _, err = run_cli("evaluate", "--checkpoint", run / "checkpoints" / "best.pt", "--data", data,
                           "--split", "val", "--out", out)
    assert code == 0, err
    evaluated = json.loads(out.read_text())
    # the run's validation split, the same model; evaluate adds the surface metrics
    assert [{k: r[k] for k in ("case", "dice")} for r in evaluated["per_case"]] == metrics["per_case"]
    assert out.with_suffix(".csv").read_text().splitlines()[0] == "case,class,dice,hd95_mm,nsd"
    assert out.with_suffix(".png").is_file()


def _write_brats(root: Path, cases: int) -> Path:
    """nnU-Net v2 layout, 4 MRI channels per case, region-based labels."""
    rng = np.random.default_rng(0)
    for i in range(cases):
        _, label = phantom((24, 24, 16), rng)
        label[label == 2] = 3  # labels 1 (cube) and 3 (sphere)
        for c in range(4):
            image = rng.normal(0, 0.1, label.shape) + (label > 0) * (1 + c) + (label == 3) * c
            path = root / "imagesTr" / f"case{i}_{c:04d}.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(image.astype(np.float32), np.diag([2.0, 2, 2, 1])), path)
        (root / "labelsTr").mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(label, np.diag([2.0, 2, 2, 1])), root / "labelsTr" / f"case{i}.nii.gz")
    meta = {"channel_names": {"0": "FLAIR", "1": "T1", "2": "T1c", "3": "T2"},
            "labels": {"background": 0, "whole": [1, 3], "core": [3]}, "regions_class_order": [1, 3],
            "file_ending": ".nii.gz", "numTraining": cases}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_region_based_multichannel_training_and_prediction(tmp_path, run_cli):
    data = _write_brats(tmp_path / "brats", 3)
    sets = [a for o in FINETUNE + ["encoder.in_channels=4", "train.max_steps=2"] for a in ("--set", o)]
    code, _, err = run_cli("finetune", "--config", "unetr_tiny", "--data", data, "--out", tmp_path / "run", *sets)
    assert code == 0, err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert list(metrics["per_class"]) == ["whole", "core"]
    state = checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["config"]["method"]["regions"] == {"whole": [1, 3], "core": [3]}
    assert state["config"]["data"]["intensity"] == "mri"
    assert state["model"]["net.out.conv.conv.weight"].shape[0] == 2  # one sigmoid channel per region

    code, out, err = run_cli("predict", "--checkpoint", tmp_path / "run" / "checkpoints" / "best.pt",
                             "--input", data / "imagesTr", "--out", tmp_path / "pred")
    assert code == 0, err
    masks = sorted(p.name for p in (tmp_path / "pred").iterdir())
    assert masks == ["case0.nii.gz", "case1.nii.gz", "case2.nii.gz"]
    mask = nib.load(tmp_path / "pred" / "case0.nii.gz")
    assert mask.shape == (24, 24, 16) and set(np.unique(mask.get_fdata())) <= {0, 1, 3}


def test_resolve_records_options_labels_regions_and_intensity():
    from glmae.finetune import resolve

    dataset = _dataset(3)
    cfg = resolve(load_config("unetr_tiny", ["method.regions={TC: [1, 4], ET: [4]}"]), dataset, "enc.safetensors",
                  "linear", 0.5, 7)
    m = cfg.method
    assert m.regions == {"TC": [1, 4], "ET": [4]} and m.labels == {0: "background", 1: "x"}
    assert (m.mode, m.init, m.label_fraction, m.split_seed) == ("linear", str(Path.cwd() / "enc.safetensors"), 0.5, 7)
    # recorded absolute, so a run resumes with the same file given by another path
    assert resolve(load_config("unetr_tiny"), dataset, str(Path.cwd() / "x" / ".." / "enc.safetensors"),
                   "linear", 0.5, 7).method.init == m.init
    assert cfg.data.intensity == "ct"
    with pytest.raises(InputError, match="multiples of the patch size"):
        resolve(load_config("unetr_tiny", ["method.roi=[60,64,48]"]), dataset, "none", "e2e", 1.0, 0)


@pytest.mark.parametrize("labels,regions", [
    ({0: "background", 1: "edema", 2: "non-enhancing tumor", 3: "enhancing tumour"},
     {"WT": [1, 2, 3], "TC": [2, 3], "ET": [3]}),
    ({0: "background", 1: "NCR", 2: "ED", 4: "ET"}, {"WT": [1, 2, 4], "TC": [1, 4], "ET": [4]}),
])
def test_brats_labels_train_wt_tc_et_regions_unless_turned_off_or_set(labels, regions, capsys):
    from glmae.finetune import resolve

    dataset = DataSet(Path("/data"), "brats", ("FLAIR", "T1w", "t1gd", "T2w"), labels, _dataset(3).cases, "msd")
    m = resolve(load_config("unetr_brats_tiny"), dataset, "none", "e2e", 1.0, 0).method
    assert m.regions == regions and m.labels == labels
    assert f"regions: WT {regions['WT']}, TC {regions['TC']}, ET {regions['ET']} from the data set's" in \
        capsys.readouterr().err
    assert resolve(load_config("unetr_tiny"), dataset, "none", "e2e", 1.0, 0).method.regions == regions  # any config
    off = resolve(load_config("unetr_brats_tiny", ["method.brats_regions=false"]), dataset, "none", "e2e", 1.0, 0)
    assert off.method.regions == {} and off.method.labels == labels  # softmax over the labels
    own = resolve(load_config("unetr_brats_tiny", ["method.regions={tumour: [1, 2]}"]), dataset, "none", "e2e", 1.0, 0)
    assert own.method.regions == {"tumour": [1, 2]}


def test_options_set_in_the_config_are_kept_unless_given_on_the_command_line():
    from glmae.finetune import resolve

    dataset = _dataset(3)
    sets = ["method.mode=linear", "method.label_fraction=0.5", "method.split_seed=3", "method.init=enc.safetensors"]
    m = resolve(load_config("unetr_tiny", sets), dataset, None, None, None, None).method
    assert (m.mode, m.label_fraction, m.split_seed, m.init) == ("linear", 0.5, 3, str(Path.cwd() / "enc.safetensors"))
    m = resolve(load_config("unetr_tiny", sets), dataset, "none", "e2e", 1.0, 0).method
    assert (m.mode, m.label_fraction, m.split_seed, m.init) == ("e2e", 1.0, 0, "none")
    with pytest.raises(InputError, match="method.mode"):
        resolve(load_config("unetr_tiny", ["method.mode=frozen"]), dataset, None, None, None, None)


def test_auto_intensity_is_recorded_resolved_and_a_mismatched_init_is_named(tmp_path, run_cli):
    """A plain folder of CT scans declares no modality: auto z-scores it as MRI, says so, and records
    `mri`; fine-tuning the encoder on the same scans declared CT names both modes."""
    import yaml
    from badinputs import FINETUNE as CORPUS_FINETUNE
    from badinputs import PRETRAIN as CORPUS_PRETRAIN
    from badinputs import clean_dataset, sets

    root = clean_dataset(tmp_path / "data")  # dataset.json: CT
    run = tmp_path / "pre"
    code, _, err = run_cli("pretrain", "--config", "mae3d_tiny", "--data", root / "imagesTr", "--out", run,
                           "--max-steps", 1, *sets(CORPUS_PRETRAIN))
    assert code == 0, err
    assert [line for line in err.splitlines() if line.startswith("glmae: ")] == [
        f"glmae: warning: {root / 'imagesTr'}: declares no modality, so data.intensity=auto z-scores the images as "
        "MRI; for CT pass --set data.intensity=ct"], err
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["intensity"] == "mri"
    assert json.loads((run / "encoder.json").read_text())["intensity"] == "mri"

    encoder = run / "encoder.safetensors"
    code, _, err = run_cli("finetune", "--config", "unetr_tiny", "--data", root, "--out", tmp_path / "ft",
                           "--init", encoder, "--max-steps", 1, *sets(CORPUS_FINETUNE))
    assert code == 0, err
    assert [line for line in err.splitlines() if line.startswith("glmae: ")] == [
        f"glmae: warning: {encoder}: --init: the encoder was pre-trained on data.intensity=mri images, this "
        "fine-tuning uses data.intensity=ct: pass --set data.intensity=mri if the images are of the same kind"], err
    recorded = run / "config.yaml"  # as runs started before auto was resolved recorded it
    recorded.write_text(recorded.read_text().replace("intensity: mri", "intensity: auto"))
    code, _, err = run_cli("pretrain", "--config", "mae3d_tiny", "--data", root / "imagesTr", "--out", run,
                           "--resume", "--max-steps", 2, *sets(CORPUS_PRETRAIN))
    assert code == 0, err  # such a run still resumes: auto resolves as it did


@pytest.mark.parametrize("arch", ["vit", "swin"])
def test_a_1_channel_init_adapted_to_4_channels_embeds_identical_channels_as_the_original(arch, tmp_path, capsys):
    from glmae.models.swin import SwinConfig, swin_encoder

    build = ViT if arch == "vit" else swin_encoder
    vit = ViTConfig(width=48, depth=2, heads=2, patch_size=8)
    one = vit if arch == "vit" else SwinConfig(feature_size=12, window=4)
    torch.manual_seed(0)
    original = build(one).eval()
    path = tmp_path / "encoder.safetensors"
    checkpoint.save_encoder(original.state_dict(), {"format": "glmae-encoder/1", "encoder": one.__dict__,
                                                    "method": "mae3d", "steps": 7, "intensity": "ct"}, path)
    config = "unetr_tiny" if arch == "vit" else "swin_unetr_tiny"
    sets = ["encoder.in_channels=4", "encoder.drop_path=0", "data.intensity=ct"]
    sets += ["encoder.width=48", "encoder.depth=2", "encoder.heads=2"] if arch == "vit" else ["encoder.feature_size=12"]
    cfg = load_config(config, sets)
    four = build(cfg.encoder).eval()
    report = load_init(four, str(path), cfg)
    name = "patch_embedding.patch_embeddings.weight" if arch == "vit" else "patch_embed.proj.weight"
    assert report.splitlines()[0] == (f"init: adapted {name} from 1 to 4 input channels (average: the channels' "
                                      "mean, x 1/4)")
    image = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        ours, theirs = four(image.expand(-1, 4, -1, -1, -1)), original(image)
    ours, theirs = (ours[0], theirs[0]) if arch == "vit" else (ours[-1], theirs[-1])
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_pretrain_on_1_channel_ct_and_finetune_on_4_channel_mri(tmp_path, run_cli):
    sets = lambda overrides: [a for o in overrides for a in ("--set", o)]  # noqa: E731
    ct = write_msd(tmp_path / "ct", 2)
    code, _, err = run_cli("pretrain", "--config", "mae3d_tiny", "--data", ct, "--out", tmp_path / "pre",
                           "--max-steps", 1, *sets(PRETRAIN))
    assert code == 0, err
    mri = _write_brats(tmp_path / "brats", 3)
    code, _, err = run_cli("finetune", "--config", "unetr_tiny", "--data", mri, "--out", tmp_path / "ft",
                           "--init", tmp_path / "pre" / "encoder.safetensors", "--init-channels", "repeat",
                           *sets(FINETUNE + ["encoder.in_channels=4", "train.max_steps=1"]))
    assert code == 0, err
    assert ("init: adapted patch_embedding.patch_embeddings.weight from 1 to 4 input channels (repeat: channel j <- "
            "channel j mod 1, x 1/4)") in err
    assert "loaded 28 tensors, missing 0, unexpected 0" in err
    state = checkpoint.load(tmp_path / "ft" / "checkpoints" / "last.pt")
    assert state["config"]["method"]["init_channels"] == "repeat"
    code, _, err = run_cli("finetune", "--config", "unetr_tiny", "--data", mri, "--out", tmp_path / "ft2",
                           "--init-channels", "tile", *sets(FINETUNE + ["encoder.in_channels=4"]))
    assert code == 2 and "--init-channels (method.init_channels): expected average or repeat, got 'tile'" in err
