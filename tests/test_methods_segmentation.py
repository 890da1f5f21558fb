import types

import numpy as np
import pytest
import torch

from glmae.config import OptimConfig, load_config
from glmae.data import sampling
from glmae.engine import distributed
from glmae.engine.data import SampleDataset
from glmae.engine.trainer import fit
from glmae.methods.segmentation import (
    SegmentationConfig,
    Segmenter,
    TrainItem,
    UNETRConfig,
    class_names,
    decode_logits,
    encode_target,
    foreground_points,
    label_map,
    sample_crop,
)
from glmae.models.vit import ViTConfig

BRATS = SegmentationConfig(
    labels={0: "background", 1: "necrosis", 2: "edema", 4: "enhancing"},
    regions={"WT": [1, 2, 4], "TC": [1, 4], "ET": [4]},
)
ORGANS = SegmentationConfig(labels={0: "background", 1: "a", 2: "b", 4: "c"})


def test_non_contiguous_labels_map_to_channels_and_back():
    label = np.array([[[0, 1, 2, 4]]])
    target = encode_target(label, ORGANS)
    assert target.tolist() == [[[[0, 1, 2, 3]]]]
    assert class_names(ORGANS) == ["a", "b", "c"]
    logits = torch.nn.functional.one_hot(torch.from_numpy(target[0]).long(), 4).permute(3, 0, 1, 2).float()
    assert label_map(decode_logits(logits, ORGANS).numpy(), ORGANS).tolist() == label.tolist()


def test_regions_overlap_and_paint_back_to_brats_labels():
    label = np.array([[[0, 1, 2, 4]]])
    target = encode_target(label, BRATS)
    assert target[:, 0, 0].tolist() == [[0, 1, 1, 1], [0, 1, 0, 1], [0, 0, 0, 1]]  # WT, TC, ET
    logits = torch.from_numpy(target).float() * 2 - 1
    assert label_map(decode_logits(logits, BRATS).numpy(), BRATS).tolist() == label.tolist()


def test_foreground_points_are_the_labelled_voxels_subsampled_evenly():
    label = np.zeros((4, 5, 6), np.uint8)
    label[1, 2, 3] = 1
    label[3, 4, 5] = 2
    assert foreground_points(label).tolist() == [[1, 2, 3], [3, 4, 5]]
    many = np.ones((10, 10, 10), np.uint8)
    points = foreground_points(many, max_points=100)
    assert len(points) == 100 and points.dtype == np.int32
    assert (points[:, 0] == np.arange(10).repeat(10)).all()  # every 10th voxel: spread over the volume


class _Volume:  # the fields of glmae.data.preprocess.Volume that sampling reads
    def __init__(self, image, label, box=None):
        self.image, self.label = image, label
        self.foreground_box = box or tuple((0, s) for s in label.shape)


def _item(shape=(20, 16, 12)):
    rng = np.random.default_rng(0)
    label = np.zeros(shape, np.uint8)
    label[2:5, 3:6, 1:3] = 1
    label[12:18, 9:14, 6:10] = 2
    image = (label * 10.0 + rng.random(shape)).astype(np.float32)[None]  # the label readable from the image
    return TrainItem(_Volume(image, label), foreground_points(label))


def test_positive_crops_contain_foreground_and_image_and_label_stay_aligned():
    cfg = SegmentationConfig(labels={0: "bg", 1: "a", 2: "b"}, roi=(8, 8, 8), pos_fraction=1.0, flip_prob=0.5,
                             jitter_prob=0.0)
    item = _item()
    for seed in range(20):
        sample = sample_crop(item, np.random.default_rng(seed), cfg=cfg)
        assert sample["image"].shape == (1, 8, 8, 8) and sample["target"].shape == (1, 8, 8, 8)
        assert (sample["target"] > 0).any()
        assert (np.floor(sample["image"] / 10) == sample["target"]).all()
    again = sample_crop(item, np.random.default_rng(3), cfg=cfg)
    np.testing.assert_array_equal(again["image"], sample_crop(item, np.random.default_rng(3), cfg=cfg)["image"])


def test_negative_crops_come_from_the_body_box_and_small_volumes_are_padded():
    cfg = SegmentationConfig(labels={0: "bg", 1: "a", 2: "b"}, roi=(32, 8, 16), pos_fraction=0.0, flip_prob=0.0,
                             jitter_prob=0.0)
    image, label = _item().volume.image, _item().volume.label
    item = TrainItem(_Volume(image, label, box=((10, 11), (0, 16), (0, 12))), np.zeros((0, 3), np.int32))
    sample = sample_crop(item, np.random.default_rng(0), cfg=cfg)
    assert sample["image"].shape == (1, 32, 8, 16)
    (x0, y0, z0), _ = sampling.crop_box((20, 16, 12), (32, 8, 16), np.random.default_rng(0), item.volume.foreground_box)
    assert (x0, z0) == (-6, -2)  # sides larger than the volume: centred, padded
    np.testing.assert_array_equal(sample["image"][0, 6:26, :, 2:14], image[0, :, y0 : y0 + 8])
    np.testing.assert_array_equal(sample["target"][0, 6:26, :, 2:14], label[:, y0 : y0 + 8])
    assert (sample["image"][0, :6] == 0).all() and (sample["image"][0, :, :, 14:] == 0).all()


def test_intensity_jitter_scales_and_shifts():
    cfg = SegmentationConfig(labels={0: "bg", 1: "a", 2: "b"}, roi=(8, 8, 8), pos_fraction=0.0, flip_prob=0.0,
                             jitter=0.1, jitter_prob=1.0)
    plain = sample_crop(_item(), np.random.default_rng(5), cfg=SegmentationConfig(**{**cfg.__dict__, "jitter_prob": 0}))
    jittered = sample_crop(_item(), np.random.default_rng(5), cfg=cfg)
    # same crop (the jitter draws come after it), intensities mapped by a * x + b, a in [0.9, 1.1], |b| <= 0.1
    a, b = np.polyfit(plain["image"].ravel(), jittered["image"].ravel(), 1)
    assert 0.9 <= a <= 1.1 and abs(b) <= 0.1 and (a, b) != pytest.approx((1, 0))


def test_linear_mode_freezes_the_encoder_in_eval_mode():
    enc = ViTConfig(width=24, depth=2, heads=2, patch_size=8, drop_path=0.5)
    model = Segmenter(enc, UNETRConfig(labels={0: "bg", 1: "a"}, mode="linear", feature_size=4))
    model.train()
    assert not model.net.encoder.training and model.net.encoder1.training
    assert not any(p.requires_grad for p in model.net.encoder.parameters())
    groups = model.param_groups(OptimConfig(weight_decay=0.05))
    trainable = {id(p) for g in groups for p in g["params"]}
    assert trainable == {id(p) for p in model.parameters() if p.requires_grad} and trainable


def test_layer_decay_scales_encoder_blocks():
    enc = ViTConfig(width=24, depth=2, heads=2, patch_size=8)
    model = Segmenter(enc, UNETRConfig(labels={0: "bg", 1: "a"}, feature_size=4))
    groups = model.param_groups(OptimConfig(weight_decay=0.05, layer_decay=0.5))
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    net = model.net
    assert scale[id(net.vit.patch_embedding.patch_embeddings.weight)] == 0.5**3
    assert scale[id(net.vit.blocks[0].attn.qkv.weight)] == 0.5**2
    assert scale[id(net.vit.blocks[1].attn.qkv.weight)] == 0.5
    assert scale[id(net.vit.norm.weight)] == 1.0 and scale[id(net.out.conv.conv.weight)] == 1.0


def test_region_loss_is_dice_plus_binary_cross_entropy():
    from monai.losses import DiceLoss

    enc = ViTConfig(width=24, depth=2, heads=2, patch_size=8)
    model = Segmenter(enc, UNETRConfig(labels=BRATS.labels, regions=BRATS.regions, feature_size=4))
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, 4)
    target = (torch.rand(2, 3, 4, 4, 4) > 0.5).to(torch.uint8)
    bce = -(target * torch.log(torch.sigmoid(logits)) + (1 - target) * torch.log(1 - torch.sigmoid(logits))).mean()
    expected = DiceLoss(sigmoid=True)(logits, target.float()) + bce
    torch.testing.assert_close(model.loss(logits, target), expected)


def test_swin_unetr_refuses_a_roi_that_leaves_instance_norm_a_single_voxel():
    from glmae.errors import InputError
    from glmae.methods.segmentation import SwinUNETRConfig, check_network
    from glmae.models.swin import SwinConfig

    swin = SwinConfig(feature_size=12, window=4)
    with pytest.raises(InputError, match="a side above 32 .* single voxel"):
        check_network(SwinUNETRConfig(roi=(32, 32, 32)), swin)
    check_network(SwinUNETRConfig(roi=(32, 32, 32), norm="batch"), swin)  # normalised over the batch
    check_network(SwinUNETRConfig(roi=(64, 32, 32)), swin)  # a 2x1x1 bottleneck


class Watched(Segmenter):
    """A Segmenter that keeps its encoder's and its output layer's weights after every step."""

    def after_step(self, step, total, applied):
        self.seen.append((torch.cat([p.detach().flatten() for p in self.net.encoder.parameters()]),
                          self.net.out.conv.conv.weight.detach().clone()))
        return {}


def test_frozen_warm_up_keeps_the_encoder_as_initialised_then_trains_it(tmp_path):
    cfg = load_config({
        "task": "finetune", "encoder": {"arch": "vit", "patch_size": 8, "width": 24, "depth": 2, "heads": 2},
        "method": {"name": "unetr", "roi": [16, 16, 16], "feature_size": 4, "labels": {0: "bg", 1: "a"},
                   "freeze_encoder_steps": 2},
        "data": {"num_workers": 0}, "optim": {"lr": 1e-2, "lr_scaling": "none", "warmup_steps": 0, "layer_decay": 0.6},
        "train": {"max_steps": 4, "batch_size": 2, "log_every": 4, "ckpt_every": 0, "amp": "off", "device": "cpu"},
    })
    rng = np.random.default_rng(0)
    items = []
    for _ in range(2):
        label = np.zeros((20, 20, 20), np.uint8)
        label[6:12, 6:12, 6:12] = 1
        image = rng.random((1, 20, 20, 20)).astype(np.float32) + label
        items.append(TrainItem(types.SimpleNamespace(image=image, label=label, foreground_box=((0, 20),) * 3),
                               foreground_points(label)))
    torch.manual_seed(0)
    model = Watched(cfg.encoder, cfg.method)
    model.seen = []
    initial = torch.cat([p.detach().flatten() for p in model.net.encoder.parameters()]).clone()
    out = model.net.out.conv.conv.weight.detach().clone()
    fit(model, cfg, SampleDataset(items, model.sampler()), tmp_path, distributed.init("cpu"),
        groups=model.param_groups(cfg.optim))
    encoder, head = zip(*model.seen)
    assert torch.equal(encoder[0], initial) and torch.equal(encoder[1], initial)  # steps 1, 2: weight decay too
    assert not torch.equal(encoder[2], initial) and not torch.equal(encoder[3], encoder[2])  # steps 3, 4
    assert not torch.equal(head[0], out) and not torch.equal(head[1], head[0])  # the rest trains from step 1
