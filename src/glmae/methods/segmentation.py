"""Supervised segmentation (fine-tuning): a network around a pretrained encoder, trained on
label-balanced crops, validated by sliding-window inference.

Targets, chosen by the config:

- labels (softmax): one output channel per declared label value (`labels`, background 0 first, in
  increasing value order). Label maps become class indices through a look-up table, so values need
  not be contiguous (0, 1, 2, 4). Loss: MONAI `DiceCELoss(softmax, to_onehot_y)`.
- regions (sigmoid, BraTS-style): one output channel per region, a region being a union of label
  values that may overlap others (`regions: {TC: [1, 4], WT: [1, 2, 4], ET: [4]}`). Loss: MONAI
  `DiceLoss(sigmoid)` + binary cross-entropy, nnU-Net's loss for regions (cross-entropy over
  softmax would make overlapping regions compete). Regions come from the config, else from the
  data set (nnU-Net's region labels), else, with `brats_regions` (the default), from labels that
  are BraTS sub-regions: WT, TC, ET of MSD Task01's or BraTS 2021's numbering.

Sampling (a pure `(item, rng) -> sample` function run in DataLoader workers on the memory-mapped
cache): a crop of `roi` centred, with probability `pos_fraction`, on a random foreground voxel
(label > 0; listed once per volume by `foreground_points`), otherwise uniformly in the body's
bounding box. This is MONAI's RandCropByPosNegLabel with pos:neg = pos_fraction : 1 - pos_fraction,
except that negative centres come from the whole body rather than from background voxels only.
Volumes smaller than the ROI are padded (image 0, label background). Then flips of image and label
together (each axis with `flip_prob`, 0.2 as in the UNETR/SelfMedMAE recipes; a left-right flip
swaps left and right organs) and intensity jitter: scale by 1 + U(-j, j), shift by U(-j, j), each
with probability `jitter_prob` (MONAI's RandScaleIntensity / RandShiftIntensity).

Inference: MONAI `sliding_window_inference` over the ROI with Gaussian blending; the windows run
on the compute device, the stitched logits stay on the CPU.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss, DiceLoss
from torch import nn

from glmae.config import register_method
from glmae.data import sampling
from glmae.engine.precision import autocast
from glmae.errors import InputError
from glmae.methods.finetuning import FinetuneConfig, FineTuner
from glmae.models.patches import token_grid
from glmae.models.swin import SwinConfig, SwinUNETR
from glmae.models.unetr import UNETR, num_stages
from glmae.models.vit import ViTConfig


@dataclass
class SegmentationConfig(FinetuneConfig):
    """What every segmentation network's fine-tuning shares (UNETR, Swin-UNETR)."""

    roi: tuple[int, int, int] = (96, 96, 96)  # training crop and sliding-window size, voxels
    norm: str = "instance"
    labels: dict[int, str] = field(default_factory=dict)  # value -> name; {} -> the data set's
    regions: dict[str, list[int]] = field(default_factory=dict)  # name -> values; sigmoid outputs
    # with no regions set or declared: WT/TC/ET from BraTS labels (MSD Task01 or BraTS 2021,
    # `glmae.data.formats.brats_regions`); false: softmax over the labels
    brats_regions: bool = True
    pos_fraction: float = 0.5  # crops centred on foreground (pos:neg 1:1)
    flip_prob: float = 0.2  # per spatial axis
    jitter: float = 0.1  # intensity scale 1 ± j and shift ± j
    jitter_prob: float = 0.1  # for the scale and for the shift, independently
    sw_batch_size: int = 4  # windows per forward pass in sliding-window inference
    sw_overlap: float = 0.5
    # NSD's tolerance: boundary voxels within it of the other surface count as agreeing; 1 mm, about a voxel
    # of brain MRI and under one of the 1.5 x 1.5 x 2 mm CT grid (`glmae evaluate --nsd-tolerance`)
    nsd_tolerance: float = 1.0  # mm
    validate_surface: bool = False  # HD95 and NSD in fine-tuning's periodic validation too (slow on big volumes)


@register_method("unetr")
@dataclass
class UNETRConfig(SegmentationConfig):
    name: str = "unetr"
    feature_size: int = 16  # channels of UNETR's first convolutional stage, doubled at each deeper one


@register_method("swin_unetr")
@dataclass
class SwinUNETRConfig(SegmentationConfig):
    """Swin-UNETR: MONAI's network on a Swin encoder (`encoder.arch: swin`), whose feature size
    (`encoder.feature_size`) sets the decoder's widths too."""

    name: str = "swin_unetr"


def _unetr(encoder: ViTConfig, cfg: UNETRConfig, out_channels: int) -> nn.Module:
    return UNETR(encoder, out_channels, cfg.feature_size, cfg.norm)


def _swin_unetr(encoder: SwinConfig, cfg: SegmentationConfig, out_channels: int) -> nn.Module:
    return SwinUNETR(encoder, out_channels, cfg.norm)


# Method name -> network builder (encoder config, method config, output channels). A network
# exposes `encoder` (the pretrained part), `num_layers` and `layer_of(name)` (layer-wise lr decay).
NETWORKS = {"unetr": _unetr, "swin_unetr": _swin_unetr}
ENCODERS = {"unetr": "vit", "swin_unetr": "swin"}  # the encoder architecture each network takes


def check_network(cfg: SegmentationConfig, encoder) -> None:
    """InputError unless the network takes the encoder and the ROI: UNETR a ViT and sides that are
    multiples of the patch; Swin-UNETR a Swin and multiples of patch^5 (MONAI's check, 32 for patch 2),
    with instance norm not all equal to it (that leaves a 1³ bottleneck)."""
    if encoder.arch != ENCODERS[cfg.name]:
        raise InputError(f"config: encoder.arch: {cfg.name} needs a {ENCODERS[cfg.name]} encoder, not {encoder.arch!r}")
    if cfg.name == "unetr":
        try:
            num_stages(encoder.patch_size)
        except ValueError as err:
            raise InputError(f"config: encoder.patch_size: {err}") from None
        try:
            token_grid(cfg.roi, encoder.patch_size)
        except ValueError as err:
            raise InputError(f"config: method.roi: {err}") from None
    elif any(n % encoder.patch_size**5 for n in cfg.roi):
        raise InputError(f"config: method.roi: Swin-UNETR needs sides that are multiples of "
                         f"{encoder.patch_size**5} (patch_size^5), got {list(cfg.roi)}")
    elif cfg.norm == "instance" and all(n == encoder.patch_size**5 for n in cfg.roi):
        raise InputError(f"config: method.roi: Swin-UNETR with instance norm needs a side above "
                         f"{encoder.patch_size**5} (patch_size^5): at {list(cfg.roi)} its bottleneck is a single "
                         f"voxel, which instance norm cannot normalise in training")


# ----------------------------------------------------------------------------------------------
# Targets


def out_channels(cfg: SegmentationConfig) -> int:
    return len(cfg.regions) or len(cfg.labels)


def class_names(cfg: SegmentationConfig) -> list[str]:
    """The evaluated classes: the regions, else every label but background."""
    if cfg.regions:
        return list(cfg.regions)
    return [cfg.labels[v] for v in sorted(cfg.labels) if v != 0]


def lookup_table(cfg: SegmentationConfig) -> np.ndarray:
    """Label value -> class index (output channel) for softmax targets."""
    values = sorted(cfg.labels)
    table = np.zeros(values[-1] + 1, dtype=np.uint8)
    table[values] = np.arange(len(values))
    return table


def encode_target(label: np.ndarray, cfg: SegmentationConfig) -> np.ndarray:
    """Label map (X, Y, Z) of values -> (1, X, Y, Z) class indices or (R, X, Y, Z) region masks, uint8."""
    label = np.asarray(label)
    if cfg.regions:
        return np.stack([np.isin(label, values) for values in cfg.regions.values()]).astype(np.uint8)
    return lookup_table(cfg)[label.astype(np.intp)][None]


def decode_logits(logits: torch.Tensor, cfg: SegmentationConfig) -> torch.Tensor:
    """Logits (K, X, Y, Z) -> the format of `encode_target`: (1, ...) argmax or (R, ...) logit > 0."""
    if cfg.regions:
        return (logits > 0).to(torch.uint8)
    return logits.argmax(0, keepdim=True).to(torch.uint8)


def label_map(decoded: np.ndarray, cfg: SegmentationConfig) -> np.ndarray:
    """`decode_logits` output -> (X, Y, Z) map of the data set's label values.

    Regions are painted from the largest to the smallest (WT, then TC, then ET), each with the
    smallest of its values that no region inside it claims (WT [1, 2, 4] with TC [1, 4] inside
    paints 2, TC paints 1, ET paints 4), which recovers BraTS labels as nnU-Net does."""
    if not cfg.regions:
        values = np.array(sorted(cfg.labels))
        return values[decoded[0]].astype(_label_dtype(values.max()))
    regions = sorted(cfg.regions.items(), key=lambda item: -len(item[1]))
    out = np.zeros(decoded.shape[1:], dtype=_label_dtype(max(max(v) for _, v in regions)))
    for name, values in regions:
        inner = {v for other, vs in cfg.regions.items() if other != name and set(vs) < set(values) for v in vs}
        value = min(set(values) - inner or set(values))
        out[decoded[list(cfg.regions).index(name)] > 0] = value
    return out


def declared_values(cfg: SegmentationConfig) -> set[int]:
    """The values a label file may hold: the labels, the regions' members and background 0 (the
    preprocessing refuses label files with others, see `glmae.data.preprocess.Preprocessor`)."""
    return set(cfg.labels) | {v for values in cfg.regions.values() for v in values} | {0}


def _label_dtype(max_value: int) -> type:
    return np.uint8 if max_value < 256 else np.int16


# ----------------------------------------------------------------------------------------------
# Sampling


class TrainItem(NamedTuple):
    volume: object  # glmae.data.preprocess.Volume with its label
    points: np.ndarray  # (P, 3) int32 foreground voxels, see `foreground_points`


def foreground_points(label: np.ndarray, max_points: int = 100_000) -> np.ndarray:
    """(P, 3) int32 coordinates of voxels with label > 0, every k-th of them when there are more
    than `max_points` (a uniform subset, small enough to send to every DataLoader worker)."""
    index = np.flatnonzero(np.asarray(label) > 0)
    if index.size > max_points:
        index = index[:: -(-index.size // max_points)]
    return np.stack(np.unravel_index(index, label.shape), axis=1).astype(np.int32)


def sample_crop(item: TrainItem, rng: np.random.Generator, *, cfg: SegmentationConfig) -> dict:
    """One training sample: {"image": (C, *roi) float32, "target": (1 or R, *roi) uint8}."""
    volume, points = item
    if len(points) and rng.random() < cfg.pos_fraction:
        centre = points[rng.integers(len(points))]
        region = [(int(c), int(c) + 1) for c in centre]
    else:
        region = volume.foreground_box
    box = sampling.crop_box(volume.image.shape[1:], cfg.roi, rng, region)
    image = sampling.crop(volume.image, box)
    label = sampling.crop(volume.label[None], box)[0]  # padding is background
    axes = sampling.flip_axes(rng, cfg.flip_prob)
    image, label = sampling.flip(image, axes), sampling.flip(label, axes)
    if rng.random() < cfg.jitter_prob:
        image = image * np.float32(1 + rng.uniform(-cfg.jitter, cfg.jitter))
    if rng.random() < cfg.jitter_prob:
        image = image + np.float32(rng.uniform(-cfg.jitter, cfg.jitter))
    return {"image": image, "target": encode_target(label, cfg)}


# ----------------------------------------------------------------------------------------------
# The training module


class Segmenter(FineTuner):
    """`net` (e.g. UNETR) + loss. forward(batch) -> (loss, logs) for the engine; a frozen encoder
    in linear mode (`glmae.methods.finetuning`)."""

    def __init__(self, encoder: ViTConfig, cfg: SegmentationConfig):
        super().__init__(NETWORKS[cfg.name](encoder, cfg, out_channels(cfg)), cfg)
        if cfg.regions:
            self.dice = DiceLoss(sigmoid=True)
        else:
            self.dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)

    def sampler(self):
        return functools.partial(sample_crop, cfg=self.cfg)

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """logits (N, K, X, Y, Z) float32, target (N, 1 or R, X, Y, Z) from `encode_target`."""
        if self.cfg.regions:
            target = target.float()
            return self.dice(logits, target) + F.binary_cross_entropy_with_logits(logits, target)
        return self.dice_ce(logits, target.long())

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        logits = self.net(batch["image"])
        with torch.autocast(logits.device.type, enabled=False):
            return self.loss(logits.float(), batch["target"]), {}


@torch.inference_mode()
def infer(net: nn.Module, image: np.ndarray, cfg: SegmentationConfig, device: torch.device,
          dtype: torch.dtype | None = None) -> torch.Tensor:
    """Sliding-window logits (K, X, Y, Z), float32 on the CPU, of a (C, X, Y, Z) image; windows of
    `roi` overlapping by `sw_overlap`, Gaussian blending. The image may be smaller than the ROI."""
    from monai.inferers import sliding_window_inference

    x = torch.from_numpy(np.array(image, dtype=np.float32))[None]

    def predictor(windows: torch.Tensor) -> torch.Tensor:
        with autocast(device, dtype):
            return net(windows).float()

    logits = sliding_window_inference(
        x, cfg.roi, cfg.sw_batch_size, predictor, overlap=cfg.sw_overlap, mode="gaussian",
        sw_device=device, device="cpu",
    )
    return logits[0]
