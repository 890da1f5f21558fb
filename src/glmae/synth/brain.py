"""Synthetic brain MRI with glioma-like tumours, labelled as MSD Task01 (`glmae synth --kind brain`).

A case is a head scanned in four MRI sequences, stored as one 4D image in MSD Task01's channel
order (`MODALITIES`: FLAIR, T1, T1 with gadolinium, T2). Anatomy: scalp, skull with its fatty
marrow, the subarachnoid CSF, a folded cortex (sulci are the zero sheets of a random smooth field,
lined with grey matter and filled with CSF down to 8-13 mm), the interhemispheric fissure, white
matter, deep grey nuclei (thalami, basal ganglia) and the ventricles (lateral, with frontal and
occipital horns, and the third), whose size varies 0.75-1.4x between cases.

Each case has one tumour in a hemisphere's white matter: an enhancing rim (`LABELS` 3, 3-9 mm
thick) around a necrotic, non-enhancing core (2), inside finger-like oedema (1) that spreads through
white and deep grey matter and only partly into the cortex. Tumour size (core radius 8-17 mm,
oedema 6-16 mm beyond it), position, orientation and shape vary per case; the tumour pushes the
anatomy around it outward (mass effect), and a smooth random deformation bends the whole head.

Contrasts (the per-tissue signals in `SIGNAL`, each drawn within +-7% per case): white matter is
brighter than grey matter in T1 and darker in T2 and FLAIR; CSF is dark in T1 and FLAIR (whose
inversion suppresses fluid) and the brightest tissue in T2; oedema is bright in T2 and FLAIR and
dark in T1; the rim enhances, i.e. is bright in T1ce only (of the other tissues only the choroid
plexus changes between T1 and T1ce, as it does in patients); the necrotic core is dark in T1 and
T1ce, bright in T2 and intermediate in FLAIR. Two look-alikes make the labels more than thresholds:
white matter lesions of small-vessel disease (0-6 scattered, caps at the ventricles' horns in a
third of cases), FLAIR-bright like oedema, and the enhancing choroid plexus, both unlabelled. Then
partial volume (a Gaussian blur of 0.6 voxel), a smooth multiplicative bias field (RMS 10% shared by
the sequences, as the receive coil's sensitivity is, and 4% of each sequence's own), and Rician
noise (the magnitude of complex Gaussian noise, 1.5-3.5% of white matter's T1 signal per sequence),
so the air around the head is a noise floor, not zeros, as in unprocessed scans.

Geometry: arrays are (X, Y, Z) in RAS order; the affine is diagonal with the volume centre at the
world origin. The field of view is fixed (`FOV_MM`, 128 x 128 x 96 mm) and `shape` only sets the
resolution: the default 128 x 128 x 96 is 1 mm isotropic (as BraTS), 64 x 64 x 48 is 2 mm. The head
is smaller than an adult's (the brain about 90 x 106 x 68 mm) to fit it. Anatomy draws come from
one random stream, textures and noise from another, so a seed gives the same anatomy at every shape.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from glmae.synth.common import SmoothField, centred_affine, check_shape, smooth_noise, write_msd

MODALITIES = ("FLAIR", "T1w", "t1gd", "T2w")  # MSD Task01's names and channel order
LABELS: dict[int, str] = {1: "edema", 2: "non-enhancing tumor", 3: "enhancing tumour"}  # MSD Task01's
DEFAULT_SHAPE = (128, 128, 96)
FOV_MM = (128.0, 128.0, 96.0)
VERSION = 1  # bump when the generator changes: same seed, same arrays only within a version

TISSUES = ("air", "scalp", "skull", "marrow", "CSF", "choroid plexus", "grey matter", "white matter",
           "deep grey matter", "white matter lesion", "oedema", "necrosis", "enhancing tumour")
T = {name: i for i, name in enumerate(TISSUES)}
# Signal per tissue in FLAIR, T1, T1ce, T2 (arbitrary units, white matter's T1 = 700)
SIGNAL = np.array([
    [0, 0, 0, 0],  # air
    [650, 850, 850, 600],  # scalp: skin and fat
    [40, 40, 40, 40],  # cortical bone: no signal
    [500, 650, 650, 450],  # fatty marrow of the skull (diploe)
    [70, 180, 180, 1100],  # CSF: suppressed in FLAIR, dark in T1, bright in T2
    [500, 500, 900, 700],  # choroid plexus: enhances (no blood-brain barrier), not a tumour
    [560, 480, 480, 700],  # grey matter
    [430, 700, 700, 470],  # white matter
    [500, 560, 560, 600],  # deep grey nuclei
    [820, 600, 600, 850],  # white matter lesions (small-vessel disease): bright in FLAIR, not a tumour
    [900, 380, 380, 950],  # oedema: bright in T2 and FLAIR, dark in T1
    [620, 220, 220, 1000],  # necrosis: fluid-like, not enhancing
    [720, 430, 1150, 720],  # enhancing rim: gadolinium brightens T1ce only
], dtype=np.float32)
TEXTURE = np.array([0, 0.05, 0.1, 0.05, 0.02, 0.05, 0.03, 0.03, 0.03, 0.05, 0.08, 0.12, 0.12], dtype=np.float32)
ENHANCING = (T["choroid plexus"], T["enhancing tumour"])  # brighter in T1ce than in T1
PARENCHYMA = (T["white matter"], T["deep grey matter"], T["white matter lesion"])  # where oedema spreads
TUMOUR_LABEL = {T["oedema"]: 1, T["necrosis"]: 2, T["enhancing tumour"]: 3}


class Case(NamedTuple):
    image: np.ndarray  # (X, Y, Z, 4) int16, channels in MODALITIES order
    label: np.ndarray  # (X, Y, Z) uint8, keys of LABELS
    affine: np.ndarray  # (4, 4) voxel -> world mm (RAS)
    tissue: np.ndarray  # (X, Y, Z) uint8, indices of TISSUES (not written; for tests and previews)


def _ellipsoid(P, centre, semi, rot: np.ndarray | None = None) -> np.ndarray:
    """Normalised radius squared (< 1 inside) of an ellipsoid at points P = (X, Y, Z) arrays, its
    semi-axes along the columns of `rot` (local -> world)."""
    d = [p - c for p, c in zip(P, centre)]
    if rot is not None:
        d = [sum(rot[j, i] * d[j] for j in range(3)) for i in range(3)]
    return sum((di / s) ** 2 for di, s in zip(d, semi))


def _draw(rng) -> SimpleNamespace:
    """Every anatomical number of a case, drawn in a fixed order (independent of the shape)."""
    u = rng.uniform
    scale = u(0.92, 1.05)
    a = SimpleNamespace(
        centre=np.array([u(-1.5, 1.5), u(-3, 3), u(-3, 1)]),
        semi=np.array([45.0, 53.0, 34.0]) * scale * u(0.97, 1.03, 3),
        csf=u(1.0, 2.0), skull=u(3.5, 5.5), scalp=u(2.5, 4.5),  # layer thicknesses, mm
        cortex=u(2.5, 3.5), sulcus_depth=u(8.0, 13.0), vent=u(0.75, 1.4),
    )
    # the tumour: core radius, rim, oedema margin, a centre deep enough in one hemisphere
    a.core = u(8.0, 17.0)
    a.necrosis = u(0.5, min(0.8, 1 - 3.0 / a.core))  # the core's share of the radius: a rim of >= 3 mm
    a.oedema = a.core + u(6.0, 16.0)
    side = rng.choice([-1.0, 1.0])
    for _ in range(100):
        c = a.centre + a.semi * [side * u(0.2, 0.6), u(-0.6, 0.6), u(-0.4, 0.6)]
        if _depth_at(a, c) > a.core + 5:
            break
    a.tumour = c
    a.core_semi = a.core * u(0.85, 1.15, 3)
    a.oedema_semi = a.oedema * u(0.75, 1.25, 3)
    a.rot, a.oedema_rot = (Rotation.random(random_state=rng).as_matrix() for _ in range(2))
    a.push = u(0.15, 0.35)  # mass effect: anatomy at the centre comes from (1 - push) closer in
    # white matter lesions: 0-6 scattered (radius 1.5-4 mm), periventricular caps in a third of cases
    a.lesions = [(a.centre + a.semi * u(-0.6, 0.6, 3), u(1.5, 4.0, 3)) for _ in range(rng.integers(0, 7))]
    a.caps = rng.random() < 1 / 3
    return a


def _depth_at(a, point) -> float:
    """Depth (mm) of a point below the undeformed brain surface (first-order distance to the ellipsoid)."""
    d = (np.asarray(point) - a.centre) / a.semi
    r = float(np.linalg.norm(d))
    return (1 - r) * r / float(np.linalg.norm(d / a.semi))


def _plane_waves(rng, n: int, wavelength: tuple[float, float]):
    """A random smooth scalar field of unit RMS, a sum of `n` plane waves of random directions and
    wavelengths (mm): a function of points (N, 3) -> (N,). Its zero sets are sheets without a
    preferred direction (`SmoothField`'s separable terms make sheets along the axes)."""
    direction = rng.normal(size=(3, n))
    k = (direction / np.linalg.norm(direction, axis=0) * 2 * np.pi / rng.uniform(*wavelength, n)).astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, n).astype(np.float32)
    amp = np.full(n, np.sqrt(2 / n), np.float32)
    return lambda pts: np.cos(pts.astype(np.float32) @ k + phase) @ amp


def _fields(rng):
    """The smooth fields of a case (anatomy stream): head deformation, brain outline, cortical
    folding, the outlines of the tumour's compartments (wavelengths in mm)."""
    return SimpleNamespace(
        warp=SmoothField(rng, amplitude=2.0, wavelength=(80, 200)),
        outline=SmoothField(rng, amplitude=1.5, wavelength=(50, 120)),
        folds=_plane_waves(rng, 32, wavelength=(14, 30)),
        core=_plane_waves(rng, 16, wavelength=(10, 30)),
        necrosis=_plane_waves(rng, 16, wavelength=(6, 20)),
        oedema=_plane_waves(rng, 16, wavelength=(10, 30)),
    )


def _anatomy(a, f, P, axes) -> np.ndarray:
    """Tissue map (X, Y, Z) uint8 of the normal head at (deformed) positions P."""
    X, Y, Z = P
    d = f.outline.grid(*axes)
    rel = [(p + di - c) / s for p, di, c, s in zip(P, d, a.centre, a.semi)]
    r = np.sqrt(sum(q * q for q in rel)) + 1e-6
    grad = np.sqrt(sum((q / s) ** 2 for q, s in zip(rel, a.semi))) / r  # |grad r| per mm
    depth = (1 - r) / grad  # mm below the brain surface, negative outside
    tissue = np.zeros(r.shape, np.uint8)
    outer = a.csf + a.skull + a.scalp
    tissue[depth >= -outer] = T["scalp"]
    tissue[depth >= -(a.csf + a.skull)] = T["skull"]
    tissue[(depth >= -(a.csf + 0.7 * a.skull)) & (depth < -(a.csf + 0.3 * a.skull))] = T["marrow"]
    tissue[depth >= -a.csf] = T["CSF"]
    brain = depth >= 0
    tissue[brain] = T["white matter"]
    # cortex: a surface layer, and the walls of sulci (zero sheets of the folding field)
    tissue[brain & (depth < a.cortex)] = T["grey matter"]
    folded = np.nonzero(brain & (depth < a.sulcus_depth + a.cortex))
    pts = np.stack([p[folded] for p in np.broadcast_arrays(*P)], 1)  # (N, 3) mm
    fold = np.abs(f.folds(pts))
    tissue[tuple(i[fold < 0.7] for i in folded)] = T["grey matter"]
    sulcus = (fold < 0.12) & (depth[folded] < a.sulcus_depth)
    tissue[tuple(i[sulcus] for i in folded)] = T["CSF"]
    # interhemispheric fissure from the top, front and back, down to the corpus callosum
    mid = np.abs(X - a.centre[0])
    fissure = brain & (depth < 0.55 * a.semi[2]) & (Z > a.centre[2] - 4)
    tissue[fissure & (mid < 1.2 + a.cortex)] = T["grey matter"]
    tissue[fissure & (mid < 1.2)] = T["CSF"]
    # deep grey nuclei, then the ventricles over them
    cx, cy, cz = a.centre
    v = a.vent
    for s in (-1, 1):
        for c, semi in (((cx + s * 11, cy - 6, cz), (7, 11, 8)), ((cx + s * 17, cy + 8, cz + 2), (5, 12, 9))):
            tissue[_ellipsoid(P, c, semi) < 1] = T["deep grey matter"]
    vent = _ellipsoid(P, (cx, cy - 3, cz - 3), (1.5 * v, 10, 7)) < 1  # third ventricle
    for s in (-1, 1):
        x = cx + s * (4 + 2.5 * v)
        vent |= _ellipsoid(P, (x, cy, cz + 10), (3.5 * v, 20, 4 * v)) < 1  # body
        vent |= _ellipsoid(P, (x, cy + 18, cz + 7), (4 * v, 9, 5 * v)) < 1  # frontal horn
        occipital = Rotation.from_euler("x", -40, degrees=True).as_matrix()
        vent |= _ellipsoid(P, (x + s * 4, cy - 22, cz + 3), (3 * v, 12, 3.5 * v), occipital) < 1
    tissue[vent & brain] = T["CSF"]
    for s in (-1, 1):  # choroid plexus in each ventricle's atrium
        plexus = _ellipsoid(P, (cx + s * (5 + 2.5 * v), cy - 14, cz + 7), (2.5 * v, 6, 2.5 * v)) < 1
        tissue[plexus & (tissue == T["CSF"])] = T["choroid plexus"]
    lesions = list(a.lesions)
    if a.caps:  # at the tips of the frontal and occipital horns
        tips = ((28, 7), (-32, 2))
        lesions += [((cx + s * (4 + 2.5 * v), cy + y, cz + z), (4, 4, 4)) for s in (-1, 1) for y, z in tips]
    for c, semi in lesions:
        tissue[(_ellipsoid(P, c, semi) < 1) & (tissue == T["white matter"])] = T["white matter lesion"]
    return tissue


def _tumour(a, f, P, tissue: np.ndarray) -> None:
    """Paint the tumour over `tissue` (in place): oedema in white and deep grey matter (and the
    cortex near the core), the enhancing rim and the necrotic core anywhere inside the brain. Each
    compartment is an ellipsoid whose normalised radius threshold 1 + w F varies with a smooth field
    F of unit RMS clipped to +-2 (w 0.3 for the lobulated oedema, 0.12 for the core and 0.15 for
    the necrosis)."""
    P = np.broadcast_arrays(*P)
    reach = 1.25 * 1.6 * a.oedema  # the largest semi-axis at the largest threshold
    near = np.nonzero(sum((p - c) ** 2 for p, c in zip(P, a.tumour)) < reach**2)
    rel = np.stack([p[near] - c for p, c in zip(P, a.tumour)], 1)  # (N, 3) mm from the centre

    def inside(semi, rot, field, w):
        q = rel @ rot / semi
        r = np.sqrt((q * q).sum(1))
        out = r < 1 - 2 * w
        edge = np.nonzero(~out & (r < 1 + 2 * w))  # the field only where it decides
        out[edge] = r[edge] < 1 + w * np.clip(field(rel[edge]), -2, 2)
        return out

    t = tissue[near]
    fluid = np.isin(t, [T["CSF"], T["choroid plexus"]]) & ((((rel + a.tumour - a.centre) / a.semi) ** 2).sum(1) < 1)
    brain = np.isin(t, PARENCHYMA) | (t == T["grey matter"]) | fluid
    oedema = inside(a.oedema_semi, a.oedema_rot, f.oedema, 0.3)
    cortex = inside(0.75 * a.oedema_semi, a.oedema_rot, f.oedema, 0.3) & (t == T["grey matter"])
    t[oedema & (np.isin(t, PARENCHYMA) | cortex)] = T["oedema"]
    core = inside(a.core_semi, a.rot, f.core, 0.12) & brain
    t[core] = T["enhancing tumour"]
    t[core & inside(a.core_semi * a.necrosis, a.rot, f.necrosis, 0.15)] = T["necrosis"]
    tissue[near] = t


def generate_case(seed: int, shape: tuple[int, int, int] | None = DEFAULT_SHAPE) -> Case:
    """One phantom: image (X, Y, Z, 4) int16 (FLAIR, T1, T1ce, T2), label (X, Y, Z) uint8, RAS
    affine (4, 4) and the tissue map. The same seed and shape give identical arrays."""
    shape = check_shape(shape, DEFAULT_SHAPE)
    rng, noise_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    a, f = _draw(rng), _fields(rng)
    affine = centred_affine(shape, FOV_MM)
    spacing = np.diag(affine)[:3]
    axes = [affine[i, 3] + spacing[i] * np.arange(n) for i, n in enumerate(shape)]
    d = f.warp.grid(*axes)
    P = [ax.reshape([-1 if j == i else 1 for j in range(3)]) + d[i] for i, ax in enumerate(axes)]
    # mass effect: the normal anatomy at distance r from the tumour is drawn from g(r) r, g < 1 near it
    rel = [p - c for p, c in zip(P, a.tumour)]
    g = 1 - a.push * np.exp(-sum(q * q for q in rel) / a.oedema**2)
    pushed = [c + q * g for q, c in zip(rel, a.tumour)]
    tissue = _anatomy(a, f, pushed, axes)
    _tumour(a, f, P, tissue)

    jitter = rng.uniform(0.93, 1.07, SIGNAL.shape).astype(np.float32)
    plain = ~np.isin(np.arange(len(TISSUES)), ENHANCING)
    jitter[plain, 2] = jitter[plain, 1]  # T1ce is T1 wherever nothing enhances
    signal = SIGNAL * jitter
    tex = smooth_noise(noise_rng, shape, 1.5 / spacing)
    image = np.empty((*shape, 4), np.float32)
    coil = SmoothField(rng, 0.1, (150, 400), terms=2).grid(*axes)[0]
    for c in range(4):
        x = signal[tissue, c] * (1 + TEXTURE[tissue] * tex)
        x = ndimage.gaussian_filter(x, 0.6)  # partial volume
        bias = np.exp(coil + SmoothField(rng, 0.04, (150, 400), terms=2).grid(*axes)[0])
        sigma = rng.uniform(0.015, 0.035) * signal[T["white matter"], 1]
        noise = noise_rng.normal(0, sigma, (2, *shape)).astype(np.float32)
        image[..., c] = np.hypot(x * bias + noise[0], noise[1])
    label = np.zeros(shape, np.uint8)
    for t, value in TUMOUR_LABEL.items():
        label[tissue == t] = value
    return Case(np.clip(np.rint(image), 0, 32767).astype(np.int16), label, affine, tissue)


COLORS = {1: (0.2, 0.85, 0.2), 2: (0.95, 0.2, 0.2), 3: (1.0, 0.9, 0.1)}  # oedema green, core red, rim yellow
TITLES = ("FLAIR", "T1", "T1ce", "T2")


def save_preview(case: Case, path: str | Path) -> None:
    """Write a PNG of the axial slice through the tumour's centre in the four sequences, above the
    same slices with the labels overlaid; radiological convention (patient right on the viewer's
    left, anterior up), each sequence windowed between its 1st and 99.5th percentile in the head."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    img, lab, aff = case.image, case.label, case.affine
    sx, sy = np.diag(aff)[:2]
    nx, ny, nz = lab.shape
    k = int(np.argwhere(lab > 0)[:, 2].mean().round()) if (lab > 0).any() else nz // 2
    head = case.tissue > 0
    rgba = np.zeros((4, 4))
    rgba[1:, :3] = [COLORS[i] for i in (1, 2, 3)]
    rgba[1:, 3] = 0.45
    fig = Figure(figsize=(12, 6.6), dpi=100, facecolor="black")
    FigureCanvasAgg(fig)
    extent = (0, nx * sx, 0, ny * sy)
    for c, title in enumerate(TITLES):
        lo, hi = np.percentile(img[..., c][head], [1, 99.5])
        for row in range(2):
            ax = fig.add_axes((0.005 + c * 0.2475, 0.52 - row * 0.46, 0.24, 0.42))
            ax.imshow(img[::-1, ::-1, k, c].T, cmap="gray", vmin=lo, vmax=hi, extent=extent, interpolation="nearest")
            if row:
                ax.imshow(rgba[lab[::-1, ::-1, k].T], extent=extent, interpolation="nearest")
            else:
                ax.set_title(f"{title} (z={k})", color="white", fontsize=10)
            ax.text(2, ny * sy / 2, "R", color="yellow", va="center", fontsize=10)
            ax.set_axis_off()
    handles = [Patch(color=COLORS[i], label=f"{i} {name}") for i, name in LABELS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=9, frameon=False, labelcolor="white")
    tmp = Path(str(path) + ".partial")
    fig.savefig(tmp, format="png", facecolor="black")
    os.replace(tmp, path)


def write_dataset(out_dir: str | Path, cases: int = 10, seed: int = 0,
                  shape: tuple[int, int, int] | None = None, preview: bool = False) -> Path:
    """Write `cases` phantoms in MSD Task01's layout and return `out_dir` (`glmae.synth.common.write_msd`):
    OUT/dataset.json with Task01's `modality` and `labels`, OUT/imagesTr/case_NNNN.nii.gz (4D
    int16, channels last in `MODALITIES` order), OUT/labelsTr/case_NNNN.nii.gz (uint8, `LABELS`),
    and with `preview` OUT/preview/case_NNNN.png (see `save_preview`)."""
    shape = check_shape(shape, DEFAULT_SHAPE)
    meta = {
        "name": "glmae-synth-brain",
        "description": "Synthetic multi-sequence brain MRI with glioma-like tumours, MSD Task01 labels (glmae synth)",
        "reference": "glmae.synth",
        "tensorImageSize": "4D",
        "modality": {str(i): m for i, m in enumerate(MODALITIES)},
        "labels": {"0": "background", **{str(i): n for i, n in LABELS.items()}},
    }
    recipe = {"kind": "brain", "seed": seed, "shape": list(shape), "version": VERSION}
    return write_msd(out_dir, cases, seed, shape, preview, meta, recipe, generate_case, save_preview)
