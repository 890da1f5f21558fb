"""The online probe: a linear head on frozen features, scored by Dice on validation crops."""

import types

import numpy as np
import torch
from torch import nn

from glmae.methods.probe import ProbeCrops, centre_crops, probe_dice


class GridFeatures(nn.Module):
    """A stand-in encoder: its 'features' on a 4x4x4 grid are made by `make` from the image."""

    def __init__(self, make):
        super().__init__()
        self.make = make

    def forward(self, images):
        return [self.make(images)]


def crops(n, seed):
    """Crops 16³ of two labelled halves: class 1 where x < 8, class 2 elsewhere in a band of y."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((n, 16, 16, 16), np.int64)
    for i in range(n):
        y0 = int(rng.integers(0, 8))
        labels[i, :8, y0 : y0 + 8] = 1
        labels[i, 8:, y0 : y0 + 8] = 2
    images = torch.from_numpy(labels[:, None].astype(np.float32))
    return ProbeCrops(images, torch.from_numpy(labels))


def pooled_labels(images):  # features that carry the label: the class fractions on the 4x4x4 grid
    onehot = torch.nn.functional.one_hot(images[:, 0].long(), 3).permute(0, 4, 1, 2, 3).float()
    return torch.nn.functional.avg_pool3d(onehot, 4)


def test_features_that_carry_the_labels_probe_well_and_noise_does_not():
    train, val = crops(4, 0), crops(3, 1)
    good = probe_dice(GridFeatures(pooled_labels), train, val, 2, steps=200, device=torch.device("cpu"))
    def noise_of(x):
        return torch.randn(len(x), 3, 4, 4, 4, generator=torch.Generator().manual_seed(0))

    noise = probe_dice(GridFeatures(noise_of), train, val, 2, steps=200, device=torch.device("cpu"))
    assert good["probe_dice"] > 0.8 > 0.5 > noise["probe_dice"], (good, noise)


def test_the_probe_restores_the_encoders_mode_and_is_deterministic():
    train, val = crops(2, 0), crops(2, 1)
    encoder = GridFeatures(pooled_labels).train()
    a = probe_dice(encoder, train, val, 2, steps=20, device=torch.device("cpu"), seed=3)
    assert encoder.training
    state = torch.get_rng_state()
    b = probe_dice(encoder, train, val, 2, steps=20, device=torch.device("cpu"), seed=3)
    assert a == b and torch.equal(state, torch.get_rng_state())  # no draw from the global generator


def test_centre_crops_take_the_body_and_number_the_classes():
    image = np.zeros((1, 20, 20, 20), np.float32)
    label = np.zeros((20, 20, 20), np.uint8)
    label[4:8, 4:8, 4:8] = 5
    label[10:12, 10:12, 10:12] = 9
    label[0, 0, 0] = 7  # not a class of the probe: background
    volume = types.SimpleNamespace(image=image, label=label, foreground_box=((4, 12), (4, 12), (4, 12)))
    out = centre_crops([volume], (8, 8, 8), [5, 9])
    assert out.images.shape == (1, 1, 8, 8, 8) and out.labels.shape == (1, 8, 8, 8)
    assert torch.bincount(out.labels.flatten()).tolist() == [512 - 64 - 8, 64, 8]
