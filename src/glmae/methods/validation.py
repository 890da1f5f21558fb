"""Validation of a segmentation network: sliding-window inference and Dice on preprocessed volumes,
for `glmae finetune` (during training) and `glmae evaluate`.

Dice is computed per case and class on the preprocessed grid (RAS, target spacing, foreground
crop), as in the papers' validation, with background excluded. Convention for a class absent from
the ground truth: Dice 1 when the prediction has none of it either, 0 when it does (MONAI's
`DiceMetric(ignore_empty=False)`); a class predicted but absent from the ground truth is 0. Then
`per_class` is the mean over cases and `mean_dice` the mean over classes (`glmae.metrics.dice`).
"""

from __future__ import annotations

import torch
from torch import nn

from glmae.config import Config
from glmae.engine.precision import amp_dtype
from glmae.methods.segmentation import SegmentationConfig, class_names, decode_logits, encode_target, infer
from glmae.metrics.dice import dice, summarise


def case_dice(pred: torch.Tensor, truth: torch.Tensor, cfg: SegmentationConfig) -> dict[str, float]:
    """Dice per class of one case; pred and truth as `decode_logits` / `encode_target` give them:
    (1, X, Y, Z) class indices or (R, X, Y, Z) region masks."""
    names = class_names(cfg)
    if cfg.regions:
        return {name: dice(p.bool(), t.bool()) for name, p, t in zip(names, pred, truth)}
    return {name: dice(pred[0] == i, truth[0] == i) for i, name in enumerate(names, 1)}


def evaluate_volumes(net: nn.Module, volumes: list, cfg: Config, device: torch.device) -> dict:
    """Sliding-window inference and Dice on preprocessed volumes with labels -> metrics dict."""
    dtype = amp_dtype(cfg.train.amp, device)
    per_case = []
    for volume in volumes:
        pred = decode_logits(infer(net, volume.image, cfg.method, device, dtype), cfg.method)
        truth = torch.from_numpy(encode_target(volume.label, cfg.method))
        per_case.append((volume.case_id, case_dice(pred, truth, cfg.method)))
    return summarise(per_case, class_names(cfg.method))
