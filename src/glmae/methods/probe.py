"""The online probe: during pre-training, how well do the encoder's features segment?

At each probe (`train.probe_every` steps, on the labelled data set `train.probe_data`): the
encoder, frozen (eval mode, no gradient), embeds one crop per case, centred on the body, of the
size the method trains on; a linear head (a 1x1x1 convolution from the features to the classes,
its logits upsampled trilinearly to the voxels) is fitted for `train.probe_steps` full-batch Adam
steps on the training cases' crops with cross-entropy; its mean Dice over the foreground classes on
the validation cases' crops is `probe_dice` in log.jsonl and TensorBoard. The features are
computed once per probe and the head is small, so a probe costs a few encoder passes.

The probe draws no random number from the training run's generators (its head starts from its
own seeded generator) and changes no weight or buffer of the model: a run with probes trains
exactly as the same run without them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from glmae.data import sampling
from glmae.metrics.dice import dice
from glmae.models.features import dense_features


@dataclass
class ProbeCrops:
    images: torch.Tensor  # (N, C, *size) float32
    labels: torch.Tensor  # (N, *size) int64 class indices, 0 background


def centre_crops(volumes: list, size: tuple[int, int, int], values: list[int]) -> ProbeCrops:
    """One crop of `size` per volume, centred on its foreground box (padded where the volume is
    smaller); label values `values` become class indices 1..len(values), anything else 0."""
    lookup = np.zeros(int(max(values, default=0)) + 1, dtype=np.int64)
    lookup[list(values)] = np.arange(1, len(values) + 1)
    images, labels = [], []
    for v in volumes:
        centre = [(a + b) // 2 for a, b in v.foreground_box]
        box = sampling.crop_box(v.image.shape[1:], size, np.random.default_rng(0), [(c, c + 1) for c in centre])
        images.append(sampling.crop(v.image, box))
        label = sampling.crop(v.label[None].astype(np.float32), box)[0].astype(np.int64)
        labels.append(lookup[np.clip(label, 0, len(lookup) - 1)])
    return ProbeCrops(torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(labels)))


@torch.no_grad()
def embed(encoder: nn.Module, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(N, C, *size) -> (N, D, *grid) features, one crop at a time, in fp32."""
    return torch.cat([dense_features(encoder, x[None].to(device)).float() for x in images])


def probe_dice(encoder: nn.Module, train: ProbeCrops, val: ProbeCrops, n_classes: int, steps: int,
               device: torch.device, seed: int = 0, lr: float = 0.1) -> dict:
    """Fit the linear head on `train`'s features, score it on `val`'s: {"probe_dice": the mean over
    the foreground classes of the Dice over all validation crops}.

    The features are standardised per channel with the training crops' statistics (as MAE's linear
    probe does with a BatchNorm without affine parameters); the head's logits are upsampled
    trilinearly to the voxels (DINOv2's linear segmentation probe) for the cross-entropy and the Dice."""
    was_training = encoder.training
    encoder.eval()
    f_train, f_val = embed(encoder, train.images, device), embed(encoder, val.images, device)
    encoder.train(was_training)
    mean = f_train.mean((0, 2, 3, 4), keepdim=True)
    std = f_train.std((0, 2, 3, 4), keepdim=True).clamp_min(1e-6)
    f_train, f_val = (f_train - mean) / std, (f_val - mean) / std
    size = train.labels.shape[1:]
    target = train.labels.to(device)
    generator = torch.Generator().manual_seed(seed)
    weight = (torch.rand(n_classes + 1, f_train.shape[1], generator=generator) * 2 - 1) * f_train.shape[1] ** -0.5
    weight, bias = weight.to(device).requires_grad_(), torch.zeros(n_classes + 1, device=device, requires_grad=True)

    def logits(features: torch.Tensor) -> torch.Tensor:  # (N, D, *grid) -> (N, K+1, *size)
        out = torch.einsum("kd,nd...->nk...", weight, features) + bias.view(1, -1, 1, 1, 1)
        return F.interpolate(out, size=size, mode="trilinear", align_corners=False)

    optimizer = torch.optim.Adam([weight, bias], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            loss = F.cross_entropy(logits(f_train), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        pred = logits(f_val).argmax(1).cpu()
    scores = [dice(pred == k, val.labels == k) for k in range(1, n_classes + 1)]
    return {"probe_dice": float(np.mean(scores))}
