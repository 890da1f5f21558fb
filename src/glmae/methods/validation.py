"""Validation of a segmentation network: sliding-window inference and Dice on preprocessed volumes,
for `glmae finetune` (during training) and `glmae evaluate`.

Dice is computed per case and class on the preprocessed grid (RAS, target spacing, foreground
crop), as in the papers' validation, with background excluded. Convention for a class absent from
the ground truth: Dice 1 when the prediction has none of it either, 0 when it does (MONAI's
`DiceMetric(ignore_empty=False)`); a class predicted but absent from the ground truth is 0. Then
`per_class` is the mean over cases and `mean_dice` the mean over classes (`glmae.metrics.dice`).

With `surface`, also HD95 (mm) and NSD at `method.nsd_tolerance` mm per case and class, on the same
grid and its spacing (`glmae.metrics.surface`, which documents the empty-mask conventions):
`mean_hd95`, `per_class_hd95`, `mean_nsd`, `per_class_nsd`, and per case `hd95`, `nsd`. `glmae
evaluate` computes them always; fine-tuning's periodic validation only with
`method.validate_surface` (off by default: distance transforms on whole volumes cost far more than
Dice, and best.pt is picked on Dice either way).
"""

from __future__ import annotations

import torch
from torch import nn

from glmae.config import Config
from glmae.engine.precision import amp_dtype
from glmae.methods.segmentation import SegmentationConfig, class_names, decode_logits, encode_target, infer
from glmae.metrics.dice import dice, summarise
from glmae.metrics.surface import defined, summarise_surface, surface_scores, voxel_spacing


def class_masks(labels: torch.Tensor, cfg: SegmentationConfig) -> torch.Tensor:
    """(K, X, Y, Z) bool, one mask per class of `class_names`, of `decode_logits` / `encode_target`
    output: (1, X, Y, Z) class indices or (R, X, Y, Z) region masks."""
    if cfg.regions:
        return labels.bool()
    return torch.stack([labels[0] == i for i in range(1, len(class_names(cfg)) + 1)])


def case_dice(pred: torch.Tensor, truth: torch.Tensor, cfg: SegmentationConfig) -> dict[str, float]:
    """Dice per class of one case; pred and truth as `decode_logits` / `encode_target` give them."""
    pairs = zip(class_names(cfg), class_masks(pred, cfg), class_masks(truth, cfg))
    return {name: dice(p, t) for name, p, t in pairs}


def case_surface(pred: torch.Tensor, truth: torch.Tensor, spacing, cfg: SegmentationConfig) -> dict:
    """{"hd95": {class: mm or None}, "nsd": {class: fraction or None}} of one case (None: undefined)."""
    hd95, nsd = surface_scores(class_masks(pred, cfg), class_masks(truth, cfg), spacing, cfg.nsd_tolerance)
    names = class_names(cfg)
    return {"hd95": {n: defined(v) for n, v in zip(names, hd95)}, "nsd": {n: defined(v) for n, v in zip(names, nsd)}}


def evaluate_volumes(net: nn.Module, volumes: list, cfg: Config, device: torch.device, surface: bool = False) -> dict:
    """Sliding-window inference and Dice (with `surface`, HD95 and NSD too) on preprocessed volumes
    with labels -> metrics dict."""
    dtype = amp_dtype(cfg.train.amp, device)
    names = class_names(cfg.method)
    per_case, surfaces = [], []
    for volume in volumes:
        pred = decode_logits(infer(net, volume.image, cfg.method, device, dtype), cfg.method)
        truth = torch.from_numpy(encode_target(volume.label, cfg.method))
        per_case.append((volume.case_id, case_dice(pred, truth, cfg.method)))
        if surface:
            surfaces.append(case_surface(pred, truth, voxel_spacing(volume.affine), cfg.method))
    metrics = summarise(per_case, names)
    if surface:
        metrics = {**metrics, **summarise_surface(surfaces, names), "nsd_tolerance_mm": cfg.method.nsd_tolerance}
        for row, extra in zip(metrics["per_case"], surfaces):
            row.update(extra)
    return metrics
