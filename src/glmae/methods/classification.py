"""Multi-label image classification (fine-tuning): chest X-ray findings from a pretrained ViT, as
SelfMedMAE fine-tunes on ChestX-ray14.

Network (`ViTClassifier`): the ViT encoder on the whole image (a depth-1 volume, patch (p, p, 1)),
its output tokens mean-pooled (no cls token, as our encoder has none; MAE's `global_pool`), a
LayerNorm and a linear head with one logit per finding, initialised near zero (std 2e-5) as MAE
does. Linear mode freezes the encoder (the head and its norm train: a linear probe on the pooled
features); end to end trains everything, with layer-wise lr decay over the ViT's blocks. Loss:
binary cross-entropy over the findings, averaged over images and findings.

Training samples (a pure `(item, rng) -> sample` function): a random-resized view, a box whose
side is a fraction s ~ U(view_scale) of the image's, at a random position, resized to `roi`
(SelfMedMAE's RandomResizedCrop with area (0.08, 1), side (0.28, 1), at a fixed aspect ratio),
then flips along `flip_axes` (axis 1, horizontal, by default) with `flip_prob`. RandAugment is
not reproduced. Evaluation and prediction see the whole image resized to `roi`.

Findings: `findings` names the outputs in order; left empty, fine-tuning takes the training data
set's (`glmae.data.radiographs`). An image's target is 1 for each of its findings: in a
ChestX-ray14 CSV a finding never listed is negative; a generic CSV must have a column for each.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from glmae.config import register_method
from glmae.data import sampling
from glmae.engine.precision import autocast
from glmae.errors import InputError
from glmae.methods.finetuning import FinetuneConfig, FineTuner
from glmae.metrics.classification import summarise_auc
from glmae.models.patches import token_grid
from glmae.models.vit import ViT, ViTBackbone, ViTConfig


@register_method("classifier")
@dataclass
class ClassifierConfig(FinetuneConfig):
    name: str = "classifier"
    roi: tuple[int, int, int] = (224, 224, 1)  # network input (H, W, 1): views and whole images resized to it
    findings: list[str] = field(default_factory=list)  # output order; [] -> the training data set's
    view_scale: tuple[float, float] = (0.28, 1.0)  # training views: side fraction of the image
    flip_prob: float = 0.5
    flip_axes: tuple[int, ...] = (1,)  # spatial axes that may be flipped: 1 = horizontal
    eval_batch_size: int = 16  # images per forward pass in evaluation and prediction


class ViTClassifier(ViTBackbone, nn.Module):
    """(N, C, H, W, 1) -> logits (N, K): mean-pooled ViT tokens, LayerNorm, linear head."""

    def __init__(self, encoder: ViTConfig, n_classes: int):
        super().__init__()
        self.vit = ViT(encoder)
        self.fc_norm = nn.LayerNorm(encoder.width)
        self.head = nn.Linear(encoder.width, n_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, _ = self.vit(x)
        return self.head(self.fc_norm(tokens.mean(dim=1)))


# ----------------------------------------------------------------------------------------------
# Targets


def resolve_findings(cfg: ClassifierConfig, encoder, dataset) -> ClassifierConfig:
    """The config with its findings (from the data set when empty); InputError unless the data set
    holds radiographs with findings, and the ROI suits the encoder."""
    import dataclasses

    if encoder.arch != "vit":
        raise InputError(f"config: encoder.arch: the classifier needs a vit encoder, not {encoder.arch!r}")
    if dataset.dims != 2:
        raise InputError("the classifier reads radiographs with findings (a ChestX-ray14-style or generic CSV); "
                         "this data set holds volumes", dataset.root)
    findings = list(cfg.findings or dataset.findings)
    if not findings:
        raise InputError("the data set names no findings (and method.findings is empty)", dataset.root)
    if dataset.format == "csv":
        missing = [f for f in findings if f not in dataset.findings]
        if missing:
            raise InputError(f"the CSV has no column for finding(s) {', '.join(missing)}", dataset.root)
    try:
        token_grid(cfg.roi, encoder.patch_size)
    except ValueError as err:
        raise InputError(f"config: method.roi: {err}") from None
    return dataclasses.replace(cfg, findings=findings)


def case_targets(case, findings: list[str]) -> np.ndarray:
    """(K,) float32: 1 for each of `findings` the case has."""
    return np.array([f in case.findings for f in findings], dtype=np.float32)


# ----------------------------------------------------------------------------------------------
# Sampling


class TrainItem(NamedTuple):
    volume: object  # glmae.data.preprocess.Volume of a radiograph, (1, H, W, 1)
    target: np.ndarray  # (K,) float32


def sample_view(item: TrainItem, rng: np.random.Generator, *, cfg: ClassifierConfig) -> dict:
    """One training sample: {"image": (C, *roi) float32, "target": (K,) float32}."""
    image = item.volume.image
    box = sampling.view_box(image.shape[1:], cfg.view_scale, rng)
    view = sampling.resize(sampling.crop(image, box), cfg.roi)
    view = sampling.flip(view, sampling.flip_axes(rng, cfg.flip_prob, cfg.flip_axes))
    return {"image": view, "target": item.target}


def whole_image(volume, roi) -> np.ndarray:
    """(C, H, W, 1) -> (C, *roi): the image evaluation and prediction see."""
    return sampling.resize(np.asarray(volume.image, dtype=np.float32), roi)


# ----------------------------------------------------------------------------------------------
# The training module and inference


class Classifier(FineTuner):
    """ViTClassifier + BCE. forward(batch) -> (loss, logs) for the engine."""

    metric = "mean_auc"

    def __init__(self, encoder: ViTConfig, cfg: ClassifierConfig):
        super().__init__(ViTClassifier(encoder, len(cfg.findings)), cfg)

    def sampler(self):
        return functools.partial(sample_view, cfg=self.cfg)

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        logits = self.net(batch["image"])
        with torch.autocast(logits.device.type, enabled=False):
            return F.binary_cross_entropy_with_logits(logits.float(), batch["target"].float()), {}


@torch.inference_mode()
def probabilities(net: nn.Module, volumes: list, cfg: ClassifierConfig, device: torch.device,
                  dtype: torch.dtype | None = None) -> np.ndarray:
    """(N, K) float64 sigmoid probabilities of whole images, `eval_batch_size` at a time."""
    out = []
    for start in range(0, len(volumes), cfg.eval_batch_size):
        chunk = volumes[start:start + cfg.eval_batch_size]
        x = torch.from_numpy(np.stack([whole_image(v, cfg.roi) for v in chunk])).to(device)
        with autocast(device, dtype):
            out.append(torch.sigmoid(net(x).float()).cpu().numpy())
    return np.concatenate(out).astype(np.float64) if out else np.zeros((0, len(cfg.findings)))


def evaluate_images(net: nn.Module, volumes: list, targets: np.ndarray, cfg: ClassifierConfig,
                    device: torch.device, dtype: torch.dtype | None = None) -> dict:
    """AUC per finding and mean (`glmae.metrics.classification`) of whole-image probabilities,
    with each image's probabilities and truth in `per_case`."""
    probs = probabilities(net, volumes, cfg, device, dtype)
    metrics = summarise_auc(targets, probs, cfg.findings)
    metrics["per_case"] = [
        {"case": v.case_id, "probability": dict(zip(cfg.findings, map(float, p))),
         "truth": dict(zip(cfg.findings, map(int, t)))}
        for v, p, t in zip(volumes, probs, targets)
    ]
    return metrics
