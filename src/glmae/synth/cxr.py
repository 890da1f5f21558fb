"""Synthetic chest radiographs with findings (`glmae synth --kind cxr`), labelled as ChestX-ray14.

A case is a frontal (PA) chest radiograph drawn as a projection: every structure adds its
attenuation along the beam (a thickness-weighted amount per pixel), and the detector shows
1 - exp(-A), so overlapping structures add up as on film (ribs cross the lungs, the heart
whitens the lung behind it, bone is brightest, air in the lungs darkest). Anatomy: body wall and
soft tissue, two lungs with branching vessel markings densest at the hila, the heart, mediastinum
and spine with vertebrae, ten pairs of posterior ribs, the clavicles, and two diaphragm domes
with the abdomen below them. Every patient draws their own sizes, positions and densities.

Findings, each drawn independently with its prevalence (`FINDINGS`), and rendered so that a
classifier can see them at 64 x 64 pixels:

- Effusion: fluid fills the base of one lung (both in a third of cases) up to a meniscus that
  rises laterally, blunting the costophrenic angle;
- Cardiomegaly: a cardiothoracic ratio of 0.56-0.66 instead of 0.40-0.48;
- Nodule: one or two round dense opacities 6-10% of the chest's half-width across, in a lung;
- Pneumothorax: one lung collapsed towards its hilum by 15-30%, leaving a black rim without
  vessel markings and a thin bright pleural line;
- Consolidation: a dense, fuzzy-edged cloud filling part of a lung.

Layout (`write_dataset`): OUT/images/case_NNNN.png (8-bit grey, rows x columns = `shape[:2]`;
`shape` is given as H W 1, a 2D image being a depth-1 volume), OUT/labels.csv with ChestX-ray14's
columns `Image Index`, `Finding Labels` (`|`-separated, or `No Finding`) and `Patient ID`, and
OUT/synth.json recording the recipe. A quarter of the images are follow-ups of the previous
image's patient (same anatomy, slightly other pose, findings drawn anew), so that patient-wise
splitting matters. Image i depends on (seed, i) and the draws of the images before it only, not
on the number of images: the same seed gives identical files.
"""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy import ndimage

from glmae.errors import InputError
from glmae.synth.common import case_seed, check_out_dir, remove_stale, smooth_noise, write_atomic

# ChestX-ray14 names and prevalences (all within 5-30%)
FINDINGS: dict[str, float] = {
    "Effusion": 0.20,
    "Cardiomegaly": 0.15,
    "Nodule": 0.12,
    "Pneumothorax": 0.08,
    "Consolidation": 0.25,
}
DEFAULT_SHAPE = (256, 256, 1)
FOLLOW_UP = 0.25  # fraction of images that are a follow-up of the previous image's patient
VERSION = 1  # bump when the generator changes: same seed, same images only within a version
LAYOUT = (("images", ".png"), ("preview", ".png"))


class Case(NamedTuple):
    image: np.ndarray  # (H, W) uint8, rows top (head) to bottom, patient's right on the viewer's left
    findings: tuple[str, ...]  # the positive findings, in FINDINGS order
    masks: dict[str, np.ndarray]  # finding -> (H, W) bool, where it was drawn (for previews)


# ---------------------------------------------------------------------------------------------
# Geometry: coordinates u (columns, -1 .. 1, the patient's right at -1) and v (rows, -1 the top)


def _ellipse(u, v, cu, cv, ru, rv, power=2.0) -> np.ndarray:
    """Superellipse |du/ru|^p + |dv/rv|^p as a field (< 1 inside)."""
    return np.abs((u - cu) / ru) ** power + np.abs((v - cv) / rv) ** power


def _soft(field: np.ndarray, edge: float) -> np.ndarray:
    """Inside-ness 0..1 of a field that is < 1 inside, with a smooth edge of relative width `edge`."""
    return np.clip((1.0 - field) / edge, 0.0, 1.0)


def _band(u, v, centre_v, thickness, mask) -> np.ndarray:
    """A curved band of `thickness` around the curve v = centre_v(u), where `mask`."""
    return np.clip(1.0 - np.abs(v - centre_v) / thickness, 0.0, 1.0) * mask


def _point_in(mask, u, v, rng, lung_u, lung_ru, top, lung_rv) -> tuple[float, float]:
    """A random (u, v) in a lung where `mask` holds, clear of the heart (the last of 20 draws if
    none is)."""
    for _ in range(20):
        s = 1 if rng.random() < 0.5 else -1
        cu = s * rng.uniform(lung_u - 0.6 * lung_ru, lung_u + 0.5 * lung_ru)
        cv = rng.uniform(top + 0.4 * lung_rv, top + 1.5 * lung_rv)
        i, j = np.unravel_index(np.argmin((u - cu) ** 2 + (v - cv) ** 2), u.shape)
        if mask[i, j]:
            break
    return cu, cv


class Anatomy(NamedTuple):
    """A patient's draws; pose jitter and findings are per image."""

    width: float  # thorax half-width
    lung_top: float
    dome: tuple[float, float]  # diaphragm height right, left
    ctr: float  # cardiothoracic ratio without cardiomegaly
    rib_step: float
    density: float  # soft-tissue attenuation scale
    vessel_seed: int


def draw_anatomy(rng: np.random.Generator) -> Anatomy:
    return Anatomy(
        width=rng.uniform(0.78, 0.9), lung_top=rng.uniform(-0.82, -0.74),
        dome=(rng.uniform(0.38, 0.5), rng.uniform(0.44, 0.56)), ctr=rng.uniform(0.40, 0.48),
        rib_step=rng.uniform(0.135, 0.155), density=rng.uniform(0.85, 1.15), vessel_seed=int(rng.integers(2**31)),
    )


def generate_case(anatomy: Anatomy, rng: np.random.Generator, shape=DEFAULT_SHAPE,
                  findings: tuple[str, ...] | None = None) -> Case:
    """One radiograph of a patient: pose jitter and findings from `rng` (`findings`, if given,
    replaces the drawn ones, the random stream unchanged otherwise: a finding rendered or not on
    the same image)."""
    h, w = shape[:2]
    drawn = tuple(name for name, p in FINDINGS.items() if rng.random() < p)
    findings = drawn if findings is None else tuple(f for f in FINDINGS if f in findings)
    shift_u, shift_v = rng.uniform(-0.04, 0.04, size=2)
    v, u = np.meshgrid(np.linspace(-1, 1, h) - shift_v, np.linspace(-1, 1, w) - shift_u, indexing="ij")
    a = anatomy
    body = _soft(_ellipse(u, v, 0, 0.05, a.width + 0.1, 1.25, 2.2), 0.08)
    side = np.sign(u)  # -1: patient's right (viewer's left)
    dome = np.where(u < 0, a.dome[0], a.dome[1]) - 0.5 * (np.abs(u) - 0.45) ** 2 * 1.2
    below = _soft(np.exp(-(v - dome) * 40), 1.0)  # 1 under the diaphragm
    # lungs: superellipses beside the mediastinum, cut by the domes
    lung_u, lung_ru, lung_rv = 0.47 * a.width / 0.84, 0.33 * a.width / 0.84, (a.dome[0] - a.lung_top) / 1.7
    lungs_field = np.minimum(_ellipse(u, v, -lung_u, a.lung_top + lung_rv, lung_ru, lung_rv, 2.4),
                             _ellipse(u, v, lung_u, a.lung_top + lung_rv, lung_ru, lung_rv * 1.05, 2.4))
    lungs = _soft(lungs_field, 0.15) * (1 - below)
    masks: dict[str, np.ndarray] = {}
    # heart: its width sets the cardiothoracic ratio against the thorax width (2 * width)
    ctr = rng.uniform(0.56, 0.66) if "Cardiomegaly" in findings else a.ctr + rng.uniform(-0.01, 0.01)
    heart_ru = ctr * a.width
    heart = _soft(_ellipse(u, v, 0.3 * heart_ru, a.dome[1] - 0.2, heart_ru, 0.32, 2.0), 0.1)
    if "Cardiomegaly" in findings:
        masks["Cardiomegaly"] = heart > 0.5
    mediastinum = _soft(_ellipse(u, v, 0.02, -0.3, 0.13, 0.7, 4.0), 0.2)
    lungs = lungs * (1 - np.maximum(heart, mediastinum))
    # vessel markings: ridges of smooth noise, denser towards the hila
    vrng = np.random.default_rng([a.vessel_seed, h, w])
    ridges = np.abs(smooth_noise(vrng, (h, w, 1), max(1.0, h / 90))[..., 0])
    hila = np.exp(-((np.abs(u) - 0.2) ** 2 + (v + 0.05) ** 2) / 0.15)
    vessels = np.clip(0.45 - ridges, 0, None) * (0.5 + 1.5 * hila)
    lung_air = lungs.copy()
    # pneumothorax: one lung shrunk towards its hilum; the rim is air without markings
    if "Pneumothorax" in findings:
        s = 1 if rng.random() < 0.5 else -1
        k = rng.uniform(0.7, 0.85)
        cu, cv = s * lung_u, a.lung_top + lung_rv
        inner = _soft(_ellipse(u, v, cu + s * (1 - k) * 0.15, cv + (1 - k) * 0.3, lung_ru * k, lung_rv * k, 2.4), 0.1)
        this_side = (side == s) & (lungs > 0.05)
        rim = this_side & (inner < 0.5)
        vessels = np.where(this_side, vessels * inner, vessels)
        pleura = this_side & (np.abs(inner - 0.5) < 0.25)
        masks["Pneumothorax"] = rim
        lung_air = np.where(rim, lungs * 1.25, lung_air)
    else:
        pleura = np.zeros((h, w), bool)
    # attenuation along the beam
    att = 1.1 * a.density * body + 0.45 * below * body + 0.4 * heart + 0.3 * mediastinum
    att = att - 0.85 * lung_air + 0.5 * vessels * lungs + 0.25 * pleura
    spine = _soft(_ellipse(u, v, 0, 0.1, 0.075, 1.3, 6.0), 0.3)
    vertebrae = 0.5 + 0.5 * np.cos(2 * np.pi * v / a.rib_step) ** 2
    att = att + 0.55 * spine * vertebrae
    in_thorax = (np.abs(u) > 0.08) & (np.abs(u) < a.width + 0.02)
    for k in range(10):
        top = a.lung_top + 0.02 + k * a.rib_step
        centre = top + 0.9 * (np.abs(u) - 0.08) ** 2 - 0.1 * (np.abs(u) - 0.08)
        rib = _band(u, v, centre, 0.028 + 0.004 * k, in_thorax)
        att = att + 0.32 * rib ** 0.5 * (1 - below)
    clavicle = _band(u, v, -0.7 + 0.12 * (np.abs(u) - 0.1) ** 2 - 0.12 * np.abs(u), 0.04,
                     (np.abs(u) > 0.1) & (np.abs(u) < 0.7))
    att = att + 0.6 * clavicle
    # findings that add density inside the lungs
    if "Effusion" in findings:
        sides = [-1, 1] if rng.random() < 0.33 else [1 if rng.random() < 0.5 else -1]
        fluid = np.zeros((h, w))
        for s in sides:
            level = a.dome[0 if s < 0 else 1] - rng.uniform(0.18, 0.35) - 0.35 * (np.abs(u) - lung_u) * s * np.sign(u)
            meniscus = level - 0.3 * np.clip(np.abs(u) - lung_u, 0, None)
            fluid = np.maximum(fluid, (side == s) * _soft(np.exp(-(v - meniscus) * 30), 1.0) * (lungs > 0.05))
        masks["Effusion"] = fluid > 0.5
        att = att + 0.95 * fluid
    if "Nodule" in findings:
        nodules = np.zeros((h, w))
        inside = lungs > 0.5
        for _ in range(1 + int(rng.random() < 0.3)):
            r = rng.uniform(0.06, 0.10) * a.width
            cu, cv = _point_in(inside, u, v, rng, lung_u, lung_ru, a.lung_top, lung_rv)
            nodules = np.maximum(nodules, _soft(_ellipse(u, v, cu, cv, r, r), 0.5))
        masks["Nodule"] = nodules > 0.5
        att = att + 0.8 * nodules
    if "Consolidation" in findings:
        cu, cv = _point_in(lungs > 0.5, u, v, rng, lung_u, lung_ru, a.lung_top, lung_rv)
        cloud = _soft(_ellipse(u, v, cu, cv, rng.uniform(0.18, 0.28), rng.uniform(0.18, 0.3)), 0.6)
        patchy = np.clip(0.8 + 0.5 * smooth_noise(rng, (h, w, 1), max(1.0, h / 60))[..., 0], 0, 1)
        cloud = cloud * patchy * (lungs > 0.05)
        masks["Consolidation"] = cloud > 0.3
        att = att + 0.75 * cloud
    image = 1.0 - np.exp(-np.clip(att, 0, None))
    image = ndimage.gaussian_filter(image, max(0.5, h / 400)) + rng.normal(0, 0.015, image.shape)
    image = np.clip((image - 0.05) / 0.85, 0, 1)
    return Case((image * 255 + 0.5).astype(np.uint8), findings, masks)


# ---------------------------------------------------------------------------------------------
# Files


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def save_preview(case: Case, path: Path) -> None:
    """The radiograph beside itself with the drawn findings outlined in colour, titled with them."""
    from matplotlib.figure import Figure

    colors = dict(zip(FINDINGS, ["#4c78a8", "#f58518", "#e45756", "#54a24b", "#b279a2"]))
    fig = Figure(figsize=(8, 4.3), dpi=100)
    for k in range(2):
        ax = fig.add_axes((0.01 + 0.5 * k, 0.02, 0.48, 0.86))
        ax.imshow(case.image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        if k == 1:
            for name, mask in case.masks.items():
                ax.contour(mask, levels=[0.5], colors=[colors[name]], linewidths=1.2)
        ax.set_axis_off()
    title = " | ".join(case.findings) or "No Finding"
    fig.suptitle(title, fontsize=11)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    write_atomic(path, buf.getvalue())


def plan(seed: int, cases: int) -> list[tuple[str, int]]:
    """(patient id, anatomy seed) of each image: a follow-up (probability FOLLOW_UP, decided by the
    image's own seed) shares the previous image's patient."""
    out = []
    for i in range(cases):
        if i > 0 and np.random.default_rng([case_seed(seed, i), 1]).random() < FOLLOW_UP:
            out.append(out[-1])
        else:
            out.append((f"{len({p for p, _ in out}) + 1:05d}", case_seed(seed, i)))
    return out


def write_dataset(out_dir: str | Path, cases: int = 10, seed: int = 0,
                  shape: tuple[int, int, int] | None = None, preview: bool = False) -> Path:
    """Write `cases` radiographs and OUT/labels.csv (see the module docstring); returns `out_dir`.
    The output folder rules of `glmae synth` hold: a folder of another recipe is refused, an
    interrupted run is finished by the same command, every file is written atomically."""
    from rich.console import Console

    shape = DEFAULT_SHAPE if shape is None else tuple(int(n) for n in shape)
    if len(shape) != 3 or shape[2] != 1 or min(shape[:2]) < 16:
        raise InputError(f"--shape: chest radiographs are depth-1 images: give H W 1 with H, W >= 16, got "
                         f"{list(shape)}")
    if cases < 1:
        raise InputError(f"--cases: need at least 1, got {cases}")
    if seed < 0:
        raise InputError(f"--seed: need a non-negative integer, got {seed}")
    out = Path(out_dir)
    recipe = {"kind": "cxr", "seed": seed, "shape": list(shape), "version": VERSION}
    check_out_dir(out, recipe, "synth.json")
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "synth.json", (json.dumps({"glmae_synth": recipe}, indent=2) + "\n").encode())
    for folder in ["images"] + (["preview"] if preview else []):
        (out / folder).mkdir(exist_ok=True)
    remove_stale(out, cases, LAYOUT)
    start = time.perf_counter()
    anatomies: dict[int, Anatomy] = {}
    rows = []
    for i, (patient, anatomy_seed) in enumerate(plan(seed, cases)):
        if anatomy_seed not in anatomies:
            anatomies[anatomy_seed] = draw_anatomy(np.random.default_rng(anatomy_seed))
        name = f"case_{i:04d}"
        case = generate_case(anatomies[anatomy_seed], np.random.default_rng([case_seed(seed, i), 2]), shape)
        png = out / "images" / f"{name}.png"
        if not png.exists():
            write_atomic(png, _png(case.image))
        if preview and not (out / "preview" / f"{name}.png").exists():
            save_preview(case, out / "preview" / f"{name}.png")
        rows.append([f"{name}.png", "|".join(case.findings) or "No Finding", patient])
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["Image Index", "Finding Labels", "Patient ID"])
    writer.writerows(rows)
    write_atomic(out / "labels.csv", buf.getvalue().encode())
    seconds = time.perf_counter() - start
    Console(stderr=True).print(f"glmae synth: {cases} chest radiographs in {out} ({seconds:.1f} s); labels in "
                               f"{out / 'labels.csv'}", highlight=False)
    return out
