"""Synthetic abdominal CT phantoms with BTCV labels (`glmae synth`, `--kind abdomen`).

A case is a portal-venous-phase-like abdominal CT: body wall (skin, subcutaneous fat, muscle),
lumbar spine and lower ribs, lung bases and heart, bowel, and the 13 BTCV organs of `LABELS`.
Organs are ellipsoids and tubes along smooth curves, in millimetres; every case draws its own body
size, organ sizes, positions and HU values and bends everything with smooth random displacement
fields, so no two cases share a shape. Liver, spleen and pancreas have overlapping intensities:
shape and context, not HU, tell them apart.

Geometry: arrays are (X, Y, Z) in RAS order (index grows toward the patient's Right, Anterior,
Superior); the affine is diagonal with the volume centre at the world origin. The field of view is
a fixed 192 mm cube and `shape` only sets the resolution: the default 128 x 128 x 96 gives
1.5 x 1.5 x 2.0 mm (the usual BTCV spacing), 48 x 48 x 32 gives 4 x 4 x 6 mm of the same anatomy.
To fit a whole cross-section in 192 mm the body is child-sized (about 170 x 125 mm): organ sizes in
the docstrings below are adult sizes scaled by about 0.55.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
from scipy import ndimage
from scipy.interpolate import CubicSpline

from glmae.synth.common import SmoothField, centred_affine, check_shape, smooth_noise, write_msd

LABELS: dict[int, str] = {
    1: "spleen",
    2: "right kidney",
    3: "left kidney",
    4: "gallbladder",
    5: "esophagus",
    6: "liver",
    7: "stomach",
    8: "aorta",
    9: "inferior vena cava",
    10: "portal vein and splenic vein",
    11: "pancreas",
    12: "right adrenal gland",
    13: "left adrenal gland",
}
ID = {name: i for i, name in LABELS.items()}
DEFAULT_SHAPE = (128, 128, 96)
FOV_MM = 192.0  # edge of the cubic field of view
GALLBLADDER_ABSENT = 0.15  # fraction of cases after cholecystectomy
VERSION = 1  # bump when the generator changes: same seed, same arrays only within a version


class Case(NamedTuple):
    image: np.ndarray  # (X, Y, Z) int16 HU
    label: np.ndarray  # (X, Y, Z) uint8, keys of LABELS
    affine: np.ndarray  # (4, 4) voxel -> world mm (RAS)


def affine_for(shape: tuple[int, int, int]) -> np.ndarray:
    """Diagonal RAS affine of the 192 mm field of view sampled on `shape`, centred on the origin."""
    return centred_affine(shape, (FOV_MM,) * 3)


# ---------------------------------------------------------------------------------------------
# Canvas: warped coordinates, painting, shape primitives


class _Phantom:
    """One case being drawn: warped world coordinates, the HU image and the label map.

    Every voxel has a warped position (X, Y, Z) = grid + a smooth random displacement; organs are
    defined on warped positions (tubes: their centre line is displaced the opposite way), so the
    whole anatomy bends. Structures are painted in order, later ones over earlier ones, each only
    in the bounding box (index slices) of its world extent plus the displacement bound.
    """

    def __init__(self, rng, noise_rng, shape):
        self.rng = rng  # anatomy: the same draws whatever the shape
        self.shape = shape
        self.affine = affine_for(shape)
        self.spacing = np.diag(self.affine)[:3]
        self.axes = [self.affine[i, 3] + self.spacing[i] * np.arange(n) for i, n in enumerate(shape)]
        self.warp = SmoothField(rng, amplitude=2.0, wavelength=(120, 300))
        d = self.warp.grid(*self.axes)
        self.margin = float(np.abs(d).max())
        self.X, self.Y, self.Z = (ax.reshape([-1 if j == i else 1 for j in range(3)]) + d[i]
                                  for i, ax in enumerate(self.axes))
        self.hu = np.full(shape, -1000.0, np.float32)
        self.lab = np.zeros(shape, np.uint8)
        self.tex = smooth_noise(noise_rng, shape, 2.0)  # organ texture, pancreatic lobules
        self.fine = smooth_noise(noise_rng, shape, 0.8)  # stool, lung
        self.region = np.ones(shape, bool)  # where organs may lie (set by the body)

    def u(self, lo, hi) -> float:
        return float(self.rng.uniform(lo, hi))

    def box(self, lo, hi, margin: float = 0.0) -> tuple[slice, ...]:
        """Index slices of the world box [lo - margin, hi + margin] (mm), one voxel more."""
        i0 = np.floor((np.asarray(lo) - margin - self.affine[:3, 3]) / self.spacing).astype(int)
        i1 = np.ceil((np.asarray(hi) + margin - self.affine[:3, 3]) / self.spacing).astype(int) + 1
        return tuple(slice(max(0, min(int(a), n)), max(0, min(int(b), n))) for a, b, n in zip(i0, i1, self.shape))

    def coords(self, lo, hi, wobble: float = 0.0, wavelength=(25.0, 60.0)):
        """Box of the world extent [lo, hi] and the warped (X, Y, Z) in it, plus the structure's
        own smooth wobble of `wobble` mm RMS."""
        field = SmoothField(self.rng, wobble, wavelength) if wobble else None
        sl = self.box(lo, hi, self.margin + (field.bound if field else 0.0))
        X, Y, Z = self.X[sl], self.Y[sl], self.Z[sl]
        if field:
            d = field.grid(*(ax[s] for ax, s in zip(self.axes, sl)))
            X, Y, Z = X + d[0], Y + d[1], Z + d[2]
        return sl, np.broadcast_arrays(X, Y, Z)

    def ellipsoid(self, c, semi, rot=None, wobble=0.0, taper=(0.0, 0.0)):
        """Box and normalised radius squared (< 1 inside) of an ellipsoid; see `_ell`."""
        r = max(semi) * (1 + max(abs(t) for t in taper))
        sl, P = self.coords(np.subtract(c, r), np.add(c, r), wobble)
        return sl, _ell(P, c, semi, rot, taper)

    def tube(self, ctrl, radii, wobble: float = 0.0):
        """Box, normalised distance q (< 1 inside) and position t in [0, 1] along a tube.

        The tube follows a smooth curve through control points `ctrl` (K, 3) mm, its radius
        interpolated from `radii` (K,) mm; it is a chain of cone segments of at most 4 mm.
        """
        ctrl, radii = np.asarray(ctrl, float), np.asarray(radii, float)
        keep = np.r_[True, np.linalg.norm(np.diff(ctrl, axis=0), axis=1) > 1e-3]  # no repeated points
        ctrl, radii = ctrl[keep], radii[keep]
        s = np.r_[0.0, np.cumsum(np.linalg.norm(np.diff(ctrl, axis=0), axis=1))]
        u = np.linspace(0, s[-1], int(s[-1] // 4.0) + 2)
        pts = CubicSpline(s, ctrl, bc_type="natural")(u) if len(ctrl) > 2 else np.array(
            [np.interp(u, s, ctrl[:, i]) for i in range(3)]).T
        pts = pts - self.warp.at(pts)  # voxels p whose warped position p + d(p) is on the curve
        if wobble:
            pts = pts - SmoothField(self.rng, wobble, (25.0, 60.0)).at(pts)
        rad = np.interp(u, s, radii)
        lo, hi = (pts - rad[:, None]).min(0), (pts + rad[:, None]).max(0)
        sl = self.box(lo, hi)
        X, Y, Z = (ax[s_].reshape([-1 if j == i else 1 for j in range(3)])
                   for i, (ax, s_) in enumerate(zip(self.axes, sl)))
        size = tuple(s_.stop - s_.start for s_ in sl)
        q = np.full(size, np.inf, np.float32)
        t = np.zeros(size, np.float32)
        for j in range(len(u) - 1):
            a, b, ra, rb = pts[j], pts[j + 1], rad[j], rad[j + 1]
            sub = self.box(np.minimum(a - ra, b - rb), np.maximum(a + ra, b + rb))
            sub = tuple(slice(s1.start - s0.start, s1.stop - s0.start) for s1, s0 in zip(sub, sl))
            x, y, z = X[sub[0]] - a[0], Y[:, sub[1]] - a[1], Z[..., sub[2]] - a[2]
            ab = b - a
            h = np.clip((x * ab[0] + y * ab[1] + z * ab[2]) / max(ab @ ab, 1e-9), 0, 1)
            dist = np.sqrt((x - h * ab[0]) ** 2 + (y - h * ab[1]) ** 2 + (z - h * ab[2]) ** 2)
            qq = dist / (ra + h * (rb - ra))
            better = qq < q[sub]
            q[sub] = np.where(better, qq, q[sub])
            t[sub] = np.where(better, (u[j] + h * (u[j + 1] - u[j])) / s[-1], t[sub])
        return sl, q, t

    def vessel(self, zs, xs, ys, rx, ry, wobble: float = 0.0):
        """Box and normalised radius squared of a vertical tube of elliptic section (rx, ry) mm.

        Its centre (xs, ys) is interpolated over the heights zs (increasing).
        """
        xs, ys = np.asarray(xs, float), np.asarray(ys, float)
        r = max(rx, ry)
        sl, (X, Y, Z) = self.coords((xs.min() - r, ys.min() - r, zs[0]), (xs.max() + r, ys.max() + r, zs[-1]),
                                    wobble)
        return sl, ((X - np.interp(Z, zs, xs)) / rx) ** 2 + ((Y - np.interp(Z, zs, ys)) / ry) ** 2

    def paint(self, sl, mask, hu, label: int | None = None, region: np.ndarray | None = None):
        """Set HU (scalar or box-shaped array) and, if given, the label where `mask` is true.

        Organs (label > 0) are clipped to `region` (default: the abdominal cavity); label 0 clears.
        """
        if label:
            mask = mask & (self.region[sl] if region is None else region[sl])
        img = self.hu[sl]
        img[mask] = hu[mask] if np.ndim(hu) else hu
        if label is not None:
            self.lab[sl][mask] = label


def _rot(ax: float = 0.0, ay: float = 0.0, az: float = 0.0) -> np.ndarray:
    """Rotation matrix Rz @ Ry @ Rx for angles in degrees (local -> world)."""
    a, b, c = np.radians([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _local(P, c, rot=None):
    """Coordinates of points P = (X, Y, Z) in the frame centred at c with axes the columns of rot."""
    d = [P[i] - c[i] for i in range(3)]
    if rot is None:
        return d
    return [rot[0, i] * d[0] + rot[1, i] * d[1] + rot[2, i] * d[2] for i in range(3)]


def _ell(P, c, semi, rot=None, taper=(0.0, 0.0)):
    """Normalised radius squared (< 1 inside) of an ellipsoid at c with semi-axes `semi` (mm)
    along the columns of `rot`; `taper` (ty, tz) thickens the y and z semi-axes toward local +x
    by that fraction of the semi-axis per x semi-axis (a wedge, like the liver's left lobe)."""
    u, v, w = _local(P, c, rot)
    gy, gz = (np.clip(1 + t * u / semi[0], 0.3, None) if t else 1.0 for t in taper)
    return (u / semi[0]) ** 2 + (v / (semi[1] * gy)) ** 2 + (w / (semi[2] * gz)) ** 2


# ---------------------------------------------------------------------------------------------
# Anatomy. Coordinates in mm: x toward the patient's right, y anterior, z superior.


def _body(ph: _Phantom) -> SimpleNamespace:
    """Body wall and the landmarks every organ is placed from.

    Cross-section: superellipse 156-180 mm wide, 56-72 mm anterior and 52-60 mm posterior
    half-depth, 6 % wider or narrower at the top; skin 1.5 mm; subcutaneous fat 4-16 mm (half
    at the back); muscle 4-7 mm (recti 70 % thicker, linea alba 1.5 mm). Inside: visceral fat.
    """
    a, b, back, p = ph.u(78, 90), ph.u(60, 72), ph.u(52, 60), ph.u(2.1, 2.6)
    taper, fat, muscle = ph.u(-0.06, 0.06), ph.u(4, 16), ph.u(4, 7)
    X, Y, Z = ph.X, ph.Y, ph.Z
    s = 1 + taper * Z / 96
    rho = ((np.abs(X) / (a * s)) ** p + (np.abs(Y) / (np.where(Y > 0, b, back) * s)) ** p) ** (1 / p)
    depth = np.hypot(X, Y) * (1 / np.maximum(rho, 1e-3) - 1)  # mm below the skin, along the ray
    fat_l = fat * (0.45 + 0.55 * np.clip(Y / b + 0.3, 0, 1))
    rectus = (Y > 0) * np.exp(-(((np.abs(X) - 0.22 * a) / (0.13 * a)) ** 2))
    mus_l = np.where((np.abs(X) < 2.5) & (Y > 0), 1.5, muscle * (1 + 0.7 * rectus))
    wall = 1.5 + fat_l + mus_l
    lm = SimpleNamespace(
        depth=depth, wall=wall, rib_depth=wall - 0.5 * mus_l, muscle_hu=ph.u(45, 60),
        ca=a - 0.8 * fat - muscle - 1.5, cb=b - fat - 1.7 * muscle - 1.5,
    )
    tex = ph.tex
    ph.hu[:] = np.select(
        [rho >= 1, depth < 1.5, depth < 1.5 + fat_l, depth < wall],
        [-1000.0, ph.u(20, 50) + 5 * tex, ph.u(-115, -90) + 6 * tex, lm.muscle_hu + 5 * tex],
        default=ph.u(-105, -80) + 8 * tex,
    )
    ph.region = depth > wall
    lm.cavity = ph.region.copy()
    # spine and great vessels
    lm.yv, lm.rxv, lm.ryv = -back + ph.u(40, 45), ph.u(11, 13), ph.u(9, 10.5)
    lm.ra = ph.u(5.5, 7)
    lm.xa, lm.ya = -ph.u(3, 7), lm.yv + lm.ryv + lm.ra + ph.u(0.5, 2.5)
    lm.rxi, lm.ryi = ph.u(6, 8.5), ph.u(4, 6)
    lm.xi, lm.yi = lm.xa + lm.ra + lm.rxi + ph.u(3, 7), lm.yv + lm.ryv + ph.u(-1, 3)
    # heights: diaphragm domes, pancreas
    lm.zr = ph.u(66, 80)
    lm.zl = lm.zr - ph.u(3, 10)
    lm.zp = ph.u(-2, 8)
    return lm


def _chest(ph: _Phantom, lm) -> None:
    """Lung bases above the diaphragm (right dome top z 66-80 mm, left 3-10 mm lower, the
    lateral and posterior recesses 20-30 mm lower) and the heart on the central tendon; organs stay below."""
    X, Y, Z = ph.X, ph.Y, ph.Z
    ay = 28 * ((Y - 0.1 * lm.cb) / lm.cb) ** 2
    zd = np.maximum(lm.zr - 45 * ((X - 0.35 * lm.ca) / lm.ca) ** 2, lm.zl - 45 * ((X + 0.4 * lm.ca) / lm.ca) ** 2) - ay
    chest = lm.cavity & (Z > zd)
    ph.hu[chest] = ph.u(-870, -820) + 30 * ph.fine[chest]
    sl, r2 = ph.ellipsoid((-0.15 * lm.ca, 0.35 * lm.cb, lm.zl + 40), (0.6 * lm.ca, 0.62 * lm.cb, 50))
    heart = (r2 < 1) & chest[sl]
    ph.paint(sl, heart, np.where(r2 < 0.7, ph.u(130, 170), lm.muscle_hu) + 6 * ph.tex[sl])
    ph.region &= Z <= zd


def _bowel(ph: _Phantom, lm) -> None:
    """Unlabelled bowel. Colon (radius 9-12 mm; stool mottled with gas, gas anterior) framing the
    abdomen; duodenal C-loop (radius ~5 mm) around the pancreatic head; 14-19 small-bowel loops
    (radius 7-10 mm, enhancing wall, fluid, gas or collapsed) in the mid and lower abdomen and
    3-5 jejunal loops in the left upper quadrant."""
    ca, cb, xa, ya, zp = lm.ca, lm.cb, lm.xa, lm.ya, lm.zp
    j = lambda: ph.rng.uniform(-5, 5, 3)  # noqa: E731
    colon = [(0.7 * ca, -0.1 * cb, -110), (0.72 * ca, 0.0, -45), (0.6 * ca, 0.4 * cb, ph.u(-30, -15)),
             (0.2 * ca, 0.75 * cb, ph.u(-40, -20)), (-0.3 * ca, 0.72 * cb, ph.u(-35, -15)),
             (-0.68 * ca, 0.3 * cb, ph.u(-10, 10)), (-0.72 * ca, 0.05 * cb, -40), (-0.7 * ca, 0.0, -110)]
    sl, q, _ = ph.tube([np.add(c, j()) for c in colon], [ph.u(9, 12)] * len(colon), wobble=2)
    gas = (ph.fine[sl] > 0.9) | (ph.Y[sl] > ph.u(0.2, 0.6) * cb)
    stool = np.where(gas, -950.0, ph.u(-60, 20) + 40 * ph.fine[sl])
    ph.paint(sl, q < 1, np.where(q > 0.8, ph.u(40, 70), stool))
    duodenum = [(xa + 28, ya + 26, zp + 12), (xa + 38, ya + 16, zp + 10), (xa + 36, ya + 6, zp - 4),
                (xa + 30, ya + 4, zp - 18), (xa + 10, ya + 9, zp - 24), (xa - 10, ya + 10, zp - 22),
                (xa - 18, ya + 14, zp - 10), (xa - 22, ya + 20, zp - 2)]
    _gut(ph, ph.tube([np.add(c, j()) for c in duodenum], [5.0] * len(duodenum), wobble=1))
    lower = (-0.65 * ca, -0.2 * cb, -100), (0.65 * ca, 0.8 * cb, zp - 10)
    jejunum = (-0.7 * ca, -0.1 * cb, zp - 20), (-0.1 * ca, 0.7 * cb, zp + 15)  # left upper quadrant
    for lo, hi in [lower] * ph.rng.integers(14, 20) + [jejunum] * ph.rng.integers(3, 6):
        pts = [ph.rng.uniform(lo, hi)]
        for _ in range(6):
            pts.append(np.clip(pts[-1] + ph.rng.normal(0, 15, 3), lo, hi))
        _gut(ph, ph.tube(pts, [ph.u(7, 10)] * len(pts), wobble=1))


def _gut(ph: _Phantom, tube) -> None:
    """Paint a bowel segment: wall ~2 mm (60-110 HU) around fluid, gas, or collapsed (wall only)."""
    sl, q, _ = tube
    lumen = ph.rng.choice([ph.u(0, 30), -950.0, ph.u(50, 90)], p=[0.5, 0.2, 0.3])
    ph.paint(sl, q < 1, np.where(q > 0.65, ph.u(60, 110), lumen) + 5 * ph.tex[sl])


def _liver(ph: _Phantom, lm) -> None:
    """Liver (95-120 HU): right lobe filling the right upper quadrant under the dome (~100 mm
    across, to z ~ -25 mm laterally), left lobe tapering across the midline anteriorly, caudate
    lobe beside the IVC; hepatic veins (+30-45 HU) converge on the IVC."""
    ca, cb, zr, zl = lm.ca, lm.cb, lm.zr, lm.zl
    hu = ph.u(95, 120)
    blobs = [  # centre, semi-axes, rotation, taper; the last one, the caudate, may lie behind the IVC
        ((0.48 * ca, 0.05 * cb, zr - 30), (0.58 * ca, 1.2 * cb, 62), None, (0.0, 0.0)),
        ((0.62 * ca, 0.0, ph.u(-10, 5)), (0.32 * ca, 0.8 * cb, ph.u(20, 35)), None, (0.0, 0.0)),
        ((ph.u(-0.25, -0.1) * ca, 0.5 * cb, zl - 22), (ph.u(0.45, 0.6) * ca, 0.42 * cb, 22),
         _rot(az=ph.u(-10, 10)), (0.5, 0.5)),
        ((lm.xi - 6, lm.yi + 9, zr - 40), (10, 10, 18), None, (0.0, 0.0)),
    ]
    for n, (c, semi, rot, taper) in enumerate(blobs):
        sl, r2 = ph.ellipsoid(c, semi, rot, wobble=3.0, taper=taper)
        behind_ivc = (ph.Y[sl] < lm.yi) & (ph.X[sl] < lm.xi + lm.rxi + 3)
        ph.paint(sl, (r2 < 1) & ~(behind_ivc & (n < 3)), hu + 6 * ph.tex[sl], ID["liver"])
    top = (lm.xi - 2, lm.yi + 12, zr - 8)
    for end in [(0.7 * ca, -0.1 * cb, zr - 45), (0.3 * ca, 0.5 * cb, zr - 40), (-0.25 * ca, 0.55 * cb, zl - 25)]:
        sl, q, _ = ph.tube([top, np.add(end, ph.rng.uniform(-6, 6, 3))], [4.0, 1.5], wobble=2)
        ph.paint(sl, (q < 1) & (ph.lab[sl] == ID["liver"]), hu + ph.u(30, 45) + 6 * ph.tex[sl])


def _gallbladder(ph: _Phantom, lm) -> None:
    """Gallbladder (bile 0-15 HU, thin wall): pear ~45 mm long, radius up to 8-10 mm, under the
    liver with the fundus anterior-inferior."""
    xi, ya, zp = lm.xi, lm.ya, lm.zp
    ctrl = [(xi + 8, ya + 18, zp + 18), (xi + 16, ya + 24, zp + 4), (xi + 22, ya + 28, zp - 10)]
    sl, q, _ = ph.tube(np.add(ctrl, ph.rng.uniform(-4, 4, (3, 3))), [3.0, ph.u(7, 9), ph.u(8, 10)], wobble=2)
    ph.paint(sl, q < 1, np.where(q > 0.92, ph.u(40, 70), ph.u(0, 15)) + 3 * ph.tex[sl], ID["gallbladder"])


def _spleen(ph: _Phantom, lm) -> None:
    """Spleen (100-125 HU): crescent ~60 x 36 x 20 mm against the posterolateral left wall,
    lower pole anterior, concave hilum facing the stomach and kidney."""
    c = np.array([-(lm.ca - ph.u(12, 16)), lm.yv - ph.u(0, 8), lm.zl - ph.u(28, 38)])
    theta = np.degrees(np.arctan2(c[1], c[0]))
    semi = np.array([ph.u(10, 13), ph.u(20, 26), ph.u(28, 36)])
    rot = _rot(ax=ph.u(15, 35), az=theta)
    sl, P = ph.coords(c - semi.max(), c + semi.max(), wobble=2.5)
    hilum = _ell(P, c - rot[:, 0] * 1.6 * semi[0], semi * (1.0, 0.6, 0.6), rot)
    ph.paint(sl, (_ell(P, c, semi, rot) < 1) & (hilum > 1), ph.u(100, 125) + 5 * ph.tex[sl], ID["spleen"])
    lm.spleen_hilum = c - rot[:, 0] * semi[0]


def _stomach(ph: _Phantom, lm) -> None:
    """Stomach: J-shaped tube from the fundus (radius 14-18 mm, posterior under the left dome)
    down the body to the antrum (radius ~9 mm) and pylorus (~5 mm) right of the midline; wall
    ~3 mm (60-100 HU), fluid (5-30 HU) below a gas level, gas (-1000 HU) anterior (supine)."""
    ca, xa, ya, yv, zl, zp = lm.ca, lm.xa, lm.ya, lm.yv, lm.zl, lm.zp
    ctrl = [(-0.45 * ca, yv + 16, zl - 16), (-0.48 * ca, ya + 22, zl - 38), (-0.3 * ca, ya + 30, zp + 14),
            (xa + 8, ya + 32, zp + 6), (xa + 28, ya + 26, zp + 12)]
    radii = [ph.u(14, 18), ph.u(13, 16), ph.u(10, 13), ph.u(8, 10), 5.0]
    ctrl = np.add(ctrl, ph.rng.uniform(-4, 4, (5, 3)))
    lm.fundus = ctrl[0]
    sl, q, t = ph.tube(ctrl, radii, wobble=2.5)
    lumen = np.where(ph.Y[sl] > ph.u(ya + 10, ya + 35), -1000.0, ph.u(5, 30))
    wall = 1 - 3.0 / np.interp(t, np.linspace(0, 1, len(radii)), radii)
    ph.paint(sl, q < 1, np.where(q > wall, ph.u(60, 100), lumen) + 4 * ph.tex[sl], ID["stomach"])


def _esophagus(ph: _Phantom, lm) -> None:
    """Oesophagus (wall 40-60 HU, radius ~5 mm, a little gas in 40 % of cases): down the
    posterior mediastinum right-anterior of the aorta, through the hiatus to the cardia."""
    xa, ya = lm.xa, lm.ya
    ctrl = [(xa + 5, ya - 1, 120), (xa + 3, ya + 4, lm.zl - 2), (xa - 5, ya + 10, lm.zl - 14), lm.fundus]
    sl, q, _ = ph.tube(ctrl, [5.0, 5.0, 5.5, 6.0], wobble=1)
    r = 0.25 if ph.rng.random() < 0.4 else 0.0
    inside = (q < 1) & (ph.lab[sl] != ID["stomach"])
    ph.paint(sl, inside, np.where(q < r, -900.0, ph.u(40, 60)) + 4 * ph.tex[sl], ID["esophagus"], lm.cavity)


def _kidneys(ph: _Phantom, lm) -> None:
    """Kidneys: ellipsoids ~60 x 30 x 22 mm beside the spine, right 6-14 mm lower than left, upper
    poles medial and posterior, hilum anteromedial with sinus fat; cortex 150-190 HU, medullary
    pyramids 20-45 HU darker; renal veins (unlabelled) to the IVC, the left one under the SMA."""
    zr = lm.zp - ph.u(8, 16)
    lm.kidneys = {}  # side (+1 right, -1 left) -> centre, semi-axes, rotation
    for side, z in ((1, zr), (-1, zr + ph.u(6, 14))):
        c = np.array([side * ph.u(33, 39), lm.yv - ph.u(0, 7), z])
        semi = np.array([ph.u(15, 18), ph.u(11, 13), ph.u(28, 33)])
        rot = _rot(ax=ph.u(8, 20), ay=-ph.u(8, 16), az=-ph.u(20, 40))
        rot[0] *= side  # mirror x for the left kidney
        sl, P = ph.coords(c - semi.max(), c + semi.max(), wobble=1.5)
        u, v, w = _local(P, c, rot)
        r2 = (u / semi[0]) ** 2 + (v / semi[1]) ** 2 + (w / semi[2]) ** 2
        sinus = ((u + 0.55 * semi[0]) / (0.7 * semi[0])) ** 2 + (v / (0.5 * semi[1])) ** 2 + (
            w / (0.55 * semi[2])) ** 2 < 1
        pyramid = (r2 < 0.6) & (np.cos(8 * np.arctan2(w / semi[2], v / semi[1])) > -0.2)
        cortex = ph.u(150, 190)
        hu = np.where(pyramid, cortex - ph.u(20, 45), cortex) + 6 * ph.tex[sl]
        label = ID["right kidney"] if side > 0 else ID["left kidney"]
        ph.paint(sl, (r2 < 1) & ~sinus, hu, label)
        ph.paint(sl, (r2 < 1) & sinus, ph.u(-90, -60) + 10 * ph.tex[sl], 0)
        lm.kidneys[side] = (c, semi, rot)
        hilum = c - rot[:, 0] * semi[0] * 0.6
        if side > 0:
            ctrl = [hilum, (lm.xi, lm.yi, z + 4)]
        else:
            ctrl = [hilum, (lm.xa - lm.ra - 4, lm.ya + 2, z + 4), (lm.xa, lm.ya + lm.ra + 2.5, z + 4),
                    (lm.xi, lm.yi, z + 4)]
        sl, q, _ = ph.tube(ctrl, [3.0] * len(ctrl))
        ph.paint(sl, q < 1, ph.u(130, 170) + 5 * ph.tex[sl], 0)


def _adrenals(ph: _Phantom, lm) -> None:
    """Adrenal glands (45-75 HU): thin inverted-Y sheets, limbs ~2 mm thick and 12-15 mm long,
    above and medial to the upper poles; the right one behind the IVC, the left beside the aorta."""
    for side in (1, -1):
        c, semi, rot = lm.kidneys[side]
        top = c + rot[:, 2] * semi[2]
        if side > 0:
            apex = np.array([lm.xi + ph.u(-2, 2), lm.yi - lm.ryi - ph.u(3, 5), top[2] + ph.u(6, 10)])
        else:
            apex = np.array([lm.xa - lm.ra - ph.u(5, 8), lm.ya - ph.u(0, 3), top[2] + ph.u(4, 8)])
        hu = ph.u(45, 75)
        for end in ((side * -4, -14, -10), (side * 9, -12, -6), (0, -2, 10)):
            sl, q, _ = ph.tube([apex, apex + end + ph.rng.uniform(-2, 2, 3)], [ph.u(2.3, 2.8), 2.0])
            ph.paint(sl, q < 1, hu + 4 * ph.tex[sl], ID["right adrenal gland" if side > 0 else "left adrenal gland"])


def _pancreas(ph: _Phantom, lm) -> None:
    """Pancreas (85-115 HU, coarse texture, lobulated outline): uncinate and head (radius 7-9 mm)
    right of the SMV inside the duodenal loop, neck anterior to the portal confluence, body over
    the aorta and SMA, tail (radius ~4.5 mm) rising toward the splenic hilum; ~90 mm long."""
    xa, ya, zp = lm.xa, lm.ya, lm.zp
    tail = lm.spleen_hilum * (1, 1, 0) + (6, 4, zp + ph.u(16, 24))
    ctrl = [(xa + 12, ya + 7, zp - 10), (xa + 22, ya + 14, zp), (xa + 8, ya + 22, zp + 8),
            (xa - 12, ya + 20, zp + 14), (xa - 30, ya + 10, zp + 18), tail]
    ctrl = np.add(ctrl, ph.rng.uniform(-3, 3, (6, 3)))
    lm.pancreas = ctrl
    sl, q, _ = ph.tube(ctrl, [5.0, ph.u(7, 9), 5.0, ph.u(4.5, 6), 4.5, ph.u(3.5, 5)], wobble=1.5)
    ph.paint(sl, q < 1 + 0.3 * ph.tex[sl], ph.u(85, 115) + 8 * ph.tex[sl], ID["pancreas"])


def _veins(ph: _Phantom, lm) -> None:
    """Portal venous system (150-190 HU): splenic vein (radius ~2.5 mm) behind the pancreas from
    the splenic hilum to the confluence, portal vein (~3.5 mm) up and right to the porta hepatis
    with its right and left branches (labelled); SMV down the mesentery (unlabelled)."""
    xa, ya, zp, xi = lm.xa, lm.ya, lm.zp, lm.xi
    hu = ph.u(150, 190)
    pan = lm.pancreas
    conf = (xa + 10, ya + 15, zp + 6)
    splenic = [lm.spleen_hilum, pan[4] - (0, 6, 0), pan[3] - (0, 7, 0), conf]
    portal = [conf, (xa + 18, ya + 18, zp + 16), (xi + 4, ya + 20, zp + 26)]
    right = [portal[-1], (xi + 20, ya + 14, zp + 30)]
    left = [portal[-1], (xa + 6, ya + 30, zp + 34)]
    for ctrl, r in ((splenic, 2.5), (portal, 3.5), (right, 2.8), (left, 2.5)):
        sl, q, _ = ph.tube(np.add(ctrl, ph.rng.uniform(-2, 2, (len(ctrl), 3))), [r] * len(ctrl), wobble=1)
        ph.paint(sl, q < 1, hu + 5 * ph.tex[sl], ID["portal vein and splenic vein"])
    sl, q, _ = ph.tube([conf, (xa + 12, ya + 17, zp - 20), (xa + 12, ya + 20, -110)], [3.0] * 3, wobble=2)
    ph.paint(sl, q < 1, hu + 5 * ph.tex[sl], 0)


def _great_vessels(ph: _Phantom, lm) -> None:
    """Aorta (140-190 HU, radius 5.5-7 mm) left-anterior of the spine, posterior-left above the
    hiatus, with coeliac trunk, splenic artery and SMA (unlabelled); IVC (110-160 HU, brighter
    above the renal veins, oval 12-17 x 8-12 mm) right of it, curving forward through the liver
    to the heart."""
    xa, ya, ra, xi, yi, zp = lm.xa, lm.ya, lm.ra, lm.xi, lm.yi, lm.zp
    art = ph.u(140, 190)
    sl, q = ph.vessel([-120, lm.zl - 20, 120], [xa, xa, xa - 6], [ya, ya, ya - 8], ra, ra, wobble=1)
    ph.paint(sl, q < 1, art + 4 * ph.tex[sl], ID["aorta"], lm.cavity)
    for ctrl in ([(xa, ya, zp + 22), (xa, ya + 12, zp + 24), (xa - 15, ya + 12, zp + 22),
                  (xa - 30, ya + 8, zp + 24), lm.spleen_hilum],
                 [(xa, ya, zp + 14), (xa, ya + 11, zp + 6), (xa - 1, ya + 14, -110)]):
        sl, q, _ = ph.tube(np.add(ctrl, ph.rng.uniform(-2, 2, (len(ctrl), 3))), [2.2] * len(ctrl), wobble=1)
        ph.paint(sl, q < 1, art + 4 * ph.tex[sl], 0)
    sl, q = ph.vessel([-120, 35, 75, 120], [xi, xi, xi - 2, xi - 8], [yi, yi, yi + 10, yi + 26],
                      lm.rxi, lm.ryi, wobble=1)
    hu = ph.u(110, 140) + ph.u(0, 25) * np.tanh((ph.Z[sl] - lm.zp + 5) / 8)
    ph.paint(sl, q < 1, hu + 5 * ph.tex[sl], ID["inferior vena cava"], lm.cavity)


def _spine(ph: _Phantom, lm) -> None:
    """Vertebrae every 18-22 mm: body 22-26 x 18-21 mm, 1.5 mm cortex (650-950 HU) around
    cancellous bone (180-280 HU); discs 4-5.5 mm (70-100 HU); canal radius 6 mm (5-25 HU); neural
    arch with a spinous process (~14 mm, sloping down) and transverse processes (to +-22 mm).
    Muscles (unlabelled): paraspinal block behind, psoas beside the bodies growing caudally to a
    radius of 10 mm, quadratus lumborum behind the kidneys."""
    period, disc = ph.u(18, 22), ph.u(4, 5.5)
    z0, yv, rx, ry = ph.u(0, period), lm.yv, lm.rxv, lm.ryv
    sl, (X, Y, Z) = ph.coords((-45, yv - 50, -200), (45, yv + ry + 3, 200))
    x, y, tex = X, Y - yv, ph.tex[sl]
    dz = Z - z0 - np.round((Z - z0) / period) * period  # height within the vertebra
    h = (period - disc) / 2
    yc, rc = -ry - 6.5, 6.0  # canal centre and radius
    dc = np.hypot(x, y - yc)
    paraspinal = ((x / 27) ** 2 + ((y - yc + 12) / 14) ** 2 < 1) & (y < yc + 4)
    rp = 10 * np.sqrt(np.clip((lm.zp + 20 - Z) / 60, 0, 1))
    psoas = (np.abs(x) - rx - 6) ** 2 + (y + 1) ** 2 < rp**2
    quadratus = (((np.abs(x) - rx - 22) / 9) ** 2 + ((y - yc - 2) / 6) ** 2 < 1) & (Z < lm.zp + 20)
    ph.paint(sl, (paraspinal | psoas | quadratus) & lm.cavity[sl], lm.muscle_hu + 5 * tex, 0)
    rr = (x / rx) ** 2 + (y / ry) ** 2
    cortex = (rr > (1 - 1.6 / rx) ** 2) | (np.abs(dz) > h - 1.2)
    arch = (dz > -0.3 * period) & (dz < 0.2 * period) & (dc >= rc) & (dc < rc + 3) & (y < -0.4 * ry)
    behind = yc - rc - y  # mm behind the canal
    spinous = (np.abs(x) < 2.2) & (behind > 0) & (behind < 14) & (np.abs(dz + 0.45 * behind) < 0.2 * period)
    transverse = (np.abs(y - yc - 2) < 2.5) & (np.abs(x) > rc) & (np.abs(x) < 22) & (np.abs(dz) < 0.13 * period)
    cort, canc = ph.u(650, 950), ph.u(180, 280)
    ph.paint(sl, dc < rc, ph.u(5, 25) + 3 * tex, 0)
    ph.paint(sl, (rr < 1) & (np.abs(dz) >= h), ph.u(70, 100) + 5 * tex, 0)
    ph.paint(sl, (rr < 1) & (np.abs(dz) < h), np.where(cortex, cort, canc) + 30 * tex, 0)
    ph.paint(sl, arch | spinous | transverse, 0.85 * cort + 30 * tex, 0)


def _ribs(ph: _Phantom, lm) -> None:
    """Ribs 7-12 (sections ~7 x 4.5 mm: cortex 600-900 HU, marrow 200-300 HU) in the body wall
    from beside the spine round the flank, 14-18 mm apart, descending 28-38 mm per radian toward
    the front; ribs 7-10 end in costal cartilage (90-150 HU) rising to the xiphoid, 11-12 float."""
    phi = np.arctan2(np.abs(ph.X), -ph.Y)  # 0 at the spine, pi at the anterior midline
    mid = lm.rib_depth + 14 * np.clip((1.2 - phi) / 0.7, 0, 1)  # deeper beside the spine
    idx = np.nonzero((np.abs(lm.depth - mid) < 3) & (phi > 0.3) & (ph.Z > -80))
    dd, phi, z, right = (lm.depth - mid)[idx], phi[idx], ph.Z[idx], ph.X[idx] > 0
    top, gap = ph.u(85, 100), ph.u(14, 18)
    cort, marrow, cart = ph.u(600, 900), ph.u(200, 300), ph.u(90, 150)
    hu, inside = np.zeros(len(dd), np.float32), np.zeros(len(dd), bool)
    for i, end in enumerate((2.1, 2.0, 1.9, 1.8, 1.45, 1.0)):
        z0 = top - i * gap + np.where(right, ph.u(-3, 3), ph.u(-3, 3))
        slope = ph.u(28, 38)
        zc = z0 - slope * (np.minimum(phi, end) - 0.4) + 25 * np.maximum(phi - end, 0)
        e = (dd / 2.3) ** 2 + ((z - zc) / 3.5) ** 2
        rib = (e < 1) & (phi < (2.7 if i < 4 else end))
        hu[rib] = np.where(phi > end, cart, np.where(e < 0.3, marrow, cort))[rib]
        inside |= rib
    sel = tuple(ix[inside] for ix in idx)
    ph.hu[sel] = hu[inside]
    ph.lab[sel] = 0


# ---------------------------------------------------------------------------------------------
# Cases, files, previews


def generate_case(seed: int, shape: tuple[int, int, int] | None = DEFAULT_SHAPE) -> Case:
    """One phantom: image (X, Y, Z) int16 HU, label (X, Y, Z) uint8, RAS affine (4, 4).

    The same seed and shape give identical arrays; `shape` only sets the resolution of the fixed
    192 mm field of view (the anatomy of a seed is the same at every shape, the noise is not).
    """
    shape = check_shape(shape, DEFAULT_SHAPE)
    rng, noise_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    ph = _Phantom(rng, noise_rng, shape)
    lm = _body(ph)
    _chest(ph, lm)
    _bowel(ph, lm)
    _liver(ph, lm)
    if rng.random() >= GALLBLADDER_ABSENT:
        _gallbladder(ph, lm)
    for build in (_stomach, _esophagus, _spleen, _kidneys, _adrenals, _pancreas, _veins, _great_vessels,
                  _spine, _ribs):
        build(ph, lm)
    img = ndimage.gaussian_filter(ph.hu, 0.7)  # partial volume, then noise
    img += noise_rng.normal(0, ph.u(8, 14), shape).astype(np.float32) + ph.u(3, 7) * smooth_noise(noise_rng, shape, 0.8)
    return Case(np.clip(np.rint(img), -1024, 3071).astype(np.int16), ph.lab, ph.affine)


COLORS = ["#9b59b6", "#f1c40f", "#e67e22", "#2ecc71", "#1abc9c", "#a0522d", "#5dade2",
          "#ff2020", "#1f4fff", "#00e5ff", "#ff66cc", "#a3e635", "#d4e157"]  # one per label


def save_preview(case: Case, path: str | Path) -> None:
    """Write a PNG of axial, coronal and sagittal slices through the organs: soft-tissue window
    (W400/L40), labels overlaid, radiological convention (patient right on the viewer's left;
    anterior left on the sagittal view), true aspect ratio for the voxel spacing."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    img, lab, aff = case
    sx, sy, sz = np.diag(aff)[:3]
    nx, ny, nz = lab.shape
    present = np.stack([(lab == i).any((0, 1)) for i in LABELS])  # (13, Z)
    k = int(np.argmax(present.sum(0) + 1e-6 * (lab > 0).sum((0, 1))))
    fg = np.argwhere(lab > 0)
    i, j = (fg.mean(0)[:2].round().astype(int) if len(fg) else (nx // 2, ny // 2))
    views = [  # (title, image, labels, extent (width, height) in mm, left/right markers)
        ("axial", img[::-1, ::-1, k].T, lab[::-1, ::-1, k].T, (nx * sx, ny * sy), "RL"),
        ("coronal", img[::-1, j, ::-1].T, lab[::-1, j, ::-1].T, (nx * sx, nz * sz), "RL"),
        ("sagittal", img[i, ::-1, ::-1].T, lab[i, ::-1, ::-1].T, (ny * sy, nz * sz), "AP"),
    ]
    rgba = np.zeros((len(LABELS) + 1, 4))
    rgba[1:] = [(*(int(c[n:n + 2], 16) / 255 for n in (1, 3, 5)), 0.45) for c in COLORS]
    fig = Figure(figsize=(13, 5.6), dpi=100, facecolor="black")
    FigureCanvasAgg(fig)
    for n, (title, im, lb, (w, h), marks) in enumerate(views):
        ax = fig.add_axes((0.01 + n * 0.33, 0.17, 0.31, 0.76))
        ax.imshow(im, cmap="gray", vmin=-160, vmax=240, extent=(0, w, 0, h), interpolation="nearest")
        ax.imshow(rgba[lb], extent=(0, w, 0, h), interpolation="nearest")
        ax.set_title(f"{title} {['z', 'y', 'x'][n]}={[k, j, i][n]}", color="white", fontsize=10)
        ax.text(2, h / 2, marks[0], color="yellow", va="center", fontsize=11)
        ax.text(w - 2, h / 2, marks[1], color="yellow", va="center", ha="right", fontsize=11)
        ax.set_axis_off()
    handles = [Patch(color=COLORS[i - 1], label=f"{i} {name}") for i, name in LABELS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=7, fontsize=9, frameon=False, labelcolor="white")
    tmp = Path(str(path) + ".partial")
    fig.savefig(tmp, format="png", facecolor="black")
    os.replace(tmp, path)


def write_dataset(out_dir: str | Path, cases: int = 10, seed: int = 0,
                  shape: tuple[int, int, int] | None = None, preview: bool = False) -> Path:
    """Write `cases` phantoms in the MSD layout and return `out_dir` (`glmae.synth.common.write_msd`):
    OUT/dataset.json, OUT/imagesTr/case_NNNN.nii.gz (int16 HU), OUT/labelsTr/case_NNNN.nii.gz
    (uint8, `LABELS`), and with `preview` OUT/preview/case_NNNN.png (see `save_preview`). Case i
    is `generate_case(case_seed(seed, i), shape)`."""
    shape = check_shape(shape, DEFAULT_SHAPE)
    meta = {
        "name": "glmae-synth-abdomen",
        "description": "Synthetic portal-venous abdominal CT phantoms with BTCV organ labels (glmae synth)",
        "reference": "glmae.synth",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {"0": "background", **{str(i): n for i, n in LABELS.items()}},
    }
    recipe = {"seed": seed, "shape": list(shape), "version": VERSION}
    return write_msd(out_dir, cases, seed, shape, preview, meta, recipe, generate_case, save_preview)
