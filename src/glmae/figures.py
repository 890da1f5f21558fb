"""PNG figures a person wants to look at: reconstructions on three orthogonal slices, curves.

matplotlib is imported inside the functions (Agg backend), so importing glmae stays light.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from glmae.engine.checkpoint import atomic_write

SOFTWARE = "glmae"  # every PNG's Software text, so that `glmae predict` knows its own overlays


def pyplot():
    """matplotlib.pyplot on the Agg backend (imported on first use, so importing glmae stays light)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path) -> None:
    """The figure as a PNG, written atomically."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": SOFTWARE})
    atomic_write(Path(path), lambda f: f.write(buf.getvalue()))


def orthogonal_slices(volume: np.ndarray, at: Sequence[int] | None = None) -> list[np.ndarray]:
    """(X, Y, Z) RAS -> axial, coronal, sagittal slices through voxel `at` (default the centre),
    oriented for display (anterior / superior up, patient right on the viewer's left, sagittal
    facing left, as radiologists read)."""
    x, y, z = (s // 2 for s in volume.shape) if at is None else at
    axial = volume[:, :, z].T[::-1, ::-1]  # rows: anterior up; cols: right on the left
    coronal = volume[:, y, :].T[::-1, ::-1]
    sagittal = volume[x, :, :].T[::-1, ::-1]
    return [axial, coronal, sagittal]


def planes(volume: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """(name, image) to show of an (X, Y, Z) volume: its three orthogonal slices, or for a depth-1
    volume (a 2D image, rows x columns) the image itself."""
    if volume.shape[2] == 1:
        return [("image", volume[:, :, 0])]
    return list(zip(("axial", "coronal", "sagittal"), orthogonal_slices(volume)))


def recon_figure(rows: Sequence[tuple[str, Sequence[tuple[str, np.ndarray]]]], path: Path, vmin=0.0, vmax=1.0):
    """One row per view (`(row title, [(column title, (X, Y, Z) volume), ...])`), each volume as
    three orthogonal slices side by side (a 2D image as itself)."""
    plt = pyplot()
    cmap = plt.get_cmap("gray").with_extremes(bad="#2b4d7a")  # masked patches (NaN) in blue
    per = len(planes(rows[0][1][0][1]))
    n_rows = len(rows)
    n_cols = max(len(cols) for _, cols in rows) * per
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.6 * n_cols, 1.8 * n_rows), squeeze=False)
    for r, (row_title, cols) in enumerate(rows):
        for c, (col_title, volume) in enumerate(cols):
            for k, (plane, image) in enumerate(planes(volume)):
                ax = axes[r, per * c + k]
                ax.imshow(image, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
                ax.set_title(f"{col_title}\n{plane}" if k == per // 2 else plane, fontsize=7)
        axes[r, 0].set_ylabel(row_title, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    save(fig, path)
    plt.close(fig)


def curves_figure(series: dict[str, tuple[Sequence[float], Sequence[float]]], path: Path, title: str = "",
                  xlabel: str = "step", ylabel: str = "", logy: bool = False) -> None:
    """Line plot of named (x, y) series."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, label=name)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    save(fig, path)
    plt.close(fig)


def bar_figure(values: dict[str, float], path: Path, title: str = "", ylabel: str = "") -> None:
    """One bar per named value (e.g. Dice per class), the value written above it."""
    grouped_bar_figure({"": values}, path, title, ylabel)


def grouped_bar_figure(series: dict[str, dict[str, float]], path: Path, title: str = "", ylabel: str = "") -> None:
    """Bars per category for each named series (e.g. Dice per organ for two models), side by side."""
    plt = pyplot()
    names = list(next(iter(series.values())))
    fig, ax = plt.subplots(figsize=(max(4.0, 0.55 * len(names) * max(1, len(series) * 0.7) + 1.5), 3.5))
    _bars(ax, series, ylabel, top=1.08)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save(fig, path)
    plt.close(fig)


def surface_bar_figure(overlap: dict[str, dict[str, float]], hd95: dict[str, float | None], path: Path,
                       title: str = "") -> None:
    """Two panels per class: overlap scores in [0, 1] side by side (Dice, NSD), and HD95 in mm
    (a class without a defined HD95 has no bar)."""
    plt = pyplot()
    names = list(next(iter(overlap.values())))
    width = max(3.0, 0.5 * len(names) * len(overlap) + 1.2)
    fig, (left, right) = plt.subplots(1, 2, figsize=(width + max(3.0, 0.45 * len(names) + 1.2), 3.5),
                                      width_ratios=[width, max(3.0, 0.45 * len(names) + 1.2)])
    _bars(left, overlap, "", top=1.08)
    shown = {n: (v if v is not None else np.nan) for n, v in hd95.items()}
    finite = [v for v in shown.values() if np.isfinite(v)]
    _bars(right, {"": shown}, "HD95 (mm)", top=1.15 * max(finite) if finite else 1.0, fmt="%.1f")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save(fig, path)
    plt.close(fig)


def _bars(ax, series: dict[str, dict[str, float]], ylabel: str, top: float, fmt: str = "%.2f") -> None:
    """Grouped bars of named series over the first series' categories on `ax`, y from 0 to `top`."""
    names = list(next(iter(series.values())))
    width = 0.8 / len(series)
    colors = ["#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2"]
    for k, (label, values) in enumerate(series.items()):
        xs = np.arange(len(names)) + (k - (len(series) - 1) / 2) * width
        bars = ax.bar(xs, [values[n] for n in names], width, label=label or None, color=colors[k % len(colors)])
        ax.bar_label(bars, fmt=fmt, fontsize=6 if len(series) > 1 else 7)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, top)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)


def overlay_figure(image: np.ndarray, labels: np.ndarray, path: Path, title: str = "") -> None:
    """Axial, coronal and sagittal slices of an (X, Y, Z) RAS image with a label map (X, Y, Z) drawn
    over it in colour, through the centre of the labelled voxels (of the volume if there are none)."""
    overlays_figure(image, {"": labels}, path, title)


def overlays_figure(image: np.ndarray, maps: dict[str, np.ndarray], path: Path, title: str = "") -> None:
    """One row per named label map (e.g. ground truth and predictions) over the same image slices,
    through the centre of the first map's labelled voxels."""
    plt = pyplot()
    first = next(iter(maps.values()))
    centre = np.argwhere(first > 0).mean(0).round().astype(int) if first.any() else None
    low, high = np.percentile(image, [1, 99])
    gray = orthogonal_slices(image, centre)
    fig, axes = plt.subplots(len(maps), 3, figsize=(9, 3.2 * len(maps)), squeeze=False)
    for row, (name, labels) in zip(axes, maps.items()):
        masks = orthogonal_slices(np.ma.masked_equal(labels, 0), centre)
        for ax, plane, g, mask in zip(row, ("axial", "coronal", "sagittal"), gray, masks):
            ax.imshow(g, cmap="gray", vmin=low, vmax=high if high > low else low + 1, interpolation="nearest")
            ax.imshow(mask, cmap="tab20", vmin=1, vmax=20, alpha=0.5, interpolation="nearest")
            ax.set_title(f"{name}: {plane}" if name else plane, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save(fig, path)
    plt.close(fig)
