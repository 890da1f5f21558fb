"""Random crops, views and flips of preprocessed volumes: pure functions of (volume, rng).

Each random transform is a parameter draw (`*_box`, `flip_axes`) followed by a deterministic
function (`crop`, `resize`, `flip`), so any sample can be replayed from its seed and tested.
Volumes are (C, X, Y, Z) arrays, possibly memory-mapped from the preprocessing cache; only the
cropped region is read.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

Box = tuple[tuple[int, int, int], tuple[int, int, int]]  # (start, size) per spatial axis


def crop_box(
    shape: Sequence[int], size: Sequence[int], rng: np.random.Generator, region: Sequence[Sequence[int]] | None = None
) -> Box:
    """A box of `size` whose centre is uniform in `region` ([start, stop) per axis, e.g. the body's
    bounding box; default the whole volume), moved inside the volume where it fits. A side larger
    than the volume is centred on it (the crop pads)."""
    start = []
    for axis, (n, s) in enumerate(zip(shape, size)):
        lo, hi = (0, n) if region is None else region[axis]
        centre = int(rng.integers(lo, max(lo + 1, hi)))
        first = centre - s // 2
        first = (n - s) // 2 if s >= n else min(max(first, 0), n - s)
        start.append(first)
    return tuple(start), tuple(int(s) for s in size)


def view_box(shape: Sequence[int], scale: tuple[float, float], rng: np.random.Generator,
             inside: Box | None = None) -> Box:
    """GL-MAE view: side fraction s ~ U(scale) of the volume's extent on every axis (one s per
    view), at a uniformly random position inside the volume, or inside the box `inside` (a local
    view cut from its global view; a side longer than that box's is cut to it)."""
    s = rng.uniform(*scale)
    size = tuple(max(1, int(round(s * n))) for n in shape)
    first, room = ((0,) * len(shape), tuple(shape)) if inside is None else inside
    size = tuple(min(k, r) for k, r in zip(size, room))
    start = tuple(int(a + rng.integers(0, r - k + 1)) for a, r, k in zip(first, room, size))
    return start, size


def contains(outer: Box, inner: Box) -> bool:
    """Whether box `inner` lies wholly inside box `outer`."""
    return all(a <= b and b + k <= a + n for a, n, b, k in zip(*outer, *inner))


def crop(image: np.ndarray, box: Box, pad_value: float = 0.0) -> np.ndarray:
    """(C, X, Y, Z) -> (C, *size) float32; parts of the box outside the volume are `pad_value`
    (0 is air after CT windowing and background after MRI z-scoring of non-zero voxels)."""
    start, size = box
    out = np.full((image.shape[0], *size), pad_value, dtype=np.float32)
    src, dst = [slice(None)], [slice(None)]
    for first, s, n in zip(start, size, image.shape[1:]):
        a, b = max(first, 0), min(first + s, n)
        src.append(slice(a, b))
        dst.append(slice(a - first, b - first))
    out[tuple(dst)] = image[tuple(src)]
    return out


def resize(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Trilinear resize (C, X, Y, Z) -> (C, *size)."""
    if tuple(image.shape[1:]) == tuple(size):
        return image
    x = torch.from_numpy(np.ascontiguousarray(image))[None]
    return F.interpolate(x, size=tuple(size), mode="trilinear", align_corners=False)[0].numpy()


def flip_axes(rng: np.random.Generator, p: float = 0.5, allowed: Sequence[int] = (0, 1, 2)) -> tuple[int, ...]:
    """Spatial axes to flip, each of `allowed` with probability p (three numbers are drawn whichever
    axes are allowed, so the random stream does not depend on them)."""
    return tuple(int(a) for a in np.flatnonzero(rng.random(3) < p) if a in allowed)


def flip(x: np.ndarray, axes: Sequence[int]) -> np.ndarray:
    """Flip spatial `axes` of a (C, X, Y, Z) or (X, Y, Z) array (channels, if any, come first)."""
    offset = x.ndim - 3
    return np.ascontiguousarray(np.flip(x, axis=tuple(a + offset for a in axes))) if axes else x
