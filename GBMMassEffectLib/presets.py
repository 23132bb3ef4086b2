"""The paper's synthetic test cases and what a synthetic patient is made of
(MODEL.md §7; `simulate --preset`).

* PRESETS: TC(a) γ 0, ρ 12, κ 0.025; TC(b) γ 0.4, ρ 12, κ 0.025; TC(c) γ 0.8, ρ 10,
  κ 0.05; TC(d) γ 1.2, ρ 10, κ 0.025 (paper units; paper's max|u*| 0, 6.1, 10, 14.9
  voxels at 256³).
* BraTS labels from the tumor concentration c(1) (our choice, documented here and in
  ground_truth.json): necrotic (1) where c > 0.8; enhancing (4) where 0.4 < c ≤ 0.8;
  edema (2) where 0.02 < c ≤ 0.4 and the deformed tissue is gray or white matter (edema
  is a parenchymal finding; CSF and ventricles keep their label).
* A T1-like image: tissue-class intensities mixed by the deformed fractions (bg 0, CSF and
  ventricles 350, gm 650, wm 900, tumor 450 blended by c), times a smooth multiplicative
  bias field (±8 %, random low-order cosines) plus Gaussian noise (σ 18), both drawn from
  a seeded numpy Generator, so the same seed gives the same image.
* default_seed_ijk: the deepest white-matter voxel (largest distance in mm to non-white
  matter, first in array order on ties); with a random seed, a random white-matter voxel
  among those at least half that deep.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.ndimage
import SimpleITK as sitk

from .io import BRATS_LABELS, TISSUE_LABELS


@dataclass(frozen=True)
class Preset:
    name: str
    gamma: float
    rho: float
    kappa: float
    paper_max_u_voxels_256: float


PRESETS = {
    "tc-a": Preset("tc-a", 0.0, 12.0, 0.025, 0.0),
    "tc-b": Preset("tc-b", 0.4, 12.0, 0.025, 6.1),
    "tc-c": Preset("tc-c", 0.8, 10.0, 0.05, 10.0),
    "tc-d": Preset("tc-d", 1.2, 10.0, 0.025, 14.9),
}

#: lower bounds on c(1) for the BraTS labels (a voxel takes the highest one it exceeds)
BRATS_THRESHOLDS = {"necrotic": 0.8, "enhancing": 0.4, "edema": 0.02}

T1_INTENSITY = {"bg": 0.0, "csf": 350.0, "vt": 350.0, "gm": 650.0, "wm": 900.0, "tumor": 450.0}
T1_BIAS_AMPLITUDE = 0.08
T1_NOISE_SIGMA = 18.0


def get_preset(name: str) -> Preset:
    key = name.lower().replace("_", "-")
    if key not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[key]


def brats_labels(c, tissue_labels) -> np.ndarray:
    """Patient label map: tissue labels (0/5/6/7/8) with BraTS tumor labels 1/4/2 on top
    (thresholds in BRATS_THRESHOLDS). c and tissue_labels are arrays of the same grid."""
    c = np.asarray(c)
    out = np.asarray(tissue_labels).astype(np.uint8).copy()
    parenchyma = (out == TISSUE_LABELS["gm"]) | (out == TISSUE_LABELS["wm"]) | (out == 1)
    t = BRATS_THRESHOLDS
    out[(c > t["edema"]) & (c <= t["enhancing"]) & parenchyma] = BRATS_LABELS["edema"]
    out[(c > t["enhancing"]) & (c <= t["necrotic"])] = BRATS_LABELS["enhancing"]
    out[c > t["necrotic"]] = BRATS_LABELS["necrotic"]
    return out


def tumor_only(patient_labels) -> np.ndarray:
    """The BraTS segmentation alone (0, 1, 2, 4), e.g. as calibrate's tumor label map."""
    a = np.asarray(patient_labels)
    return np.where(np.isin(a, list(BRATS_LABELS.values())), a, 0).astype(np.uint8)


def t1_like(fractions: dict, c, reference: sitk.Image, rng: np.random.Generator) -> np.ndarray:
    """T1-like intensities on reference's grid from tissue fractions {bg, gm, wm, vt, csf}
    and tumor c (arrays in reference's (k, j, i) order): mixture, bias, noise."""
    base = sum(T1_INTENSITY[k] * np.asarray(fractions[k], np.float64) for k in ("gm", "wm", "vt", "csf"))
    brain = 1.0 - np.asarray(fractions["bg"], np.float64)
    cc = np.clip(np.asarray(c, np.float64), 0, 1)
    img = (1 - cc) * base + cc * T1_INTENSITY["tumor"] * np.clip(brain, 0, 1)
    # smooth multiplicative bias: a few random low-order cosines of the physical position
    size = reference.GetSize()
    ijk = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in size], indexing="ij"), 0)
    ijk = ijk.transpose(0, 3, 2, 1)  # to (3, k, j, i)
    spacing = np.asarray(reference.GetSpacing())
    D = np.asarray(reference.GetDirection()).reshape(3, 3)
    p = np.einsum("pq,q...->p...", D, spacing[:, None, None, None] * ijk)
    extent = float(np.max(spacing * np.asarray(size)))
    bias = np.zeros(img.shape)
    for _ in range(4):
        wave = rng.normal(size=3) * (np.pi / extent)
        phase = rng.uniform(0, 2 * np.pi)
        bias += np.cos(np.einsum("p,p...->...", wave, p) + phase)
    bias = 1.0 + T1_BIAS_AMPLITUDE * bias / 4.0
    noise = rng.normal(0.0, T1_NOISE_SIGMA, size=img.shape)
    return np.maximum(img * bias + noise, 0.0).astype(np.float32)


def default_seed_ijk(labels: sitk.Image, rng: np.random.Generator | None = None) -> np.ndarray:
    """Seed voxel (ITK index i, j, k) inside white matter: the deepest one, or a random one
    among those at least half as deep when rng is given."""
    a = sitk.GetArrayViewFromImage(labels)
    wm = a == TISSUE_LABELS["wm"]
    if not wm.any():
        raise ValueError("the label map has no white matter (label 6) to place a tumor seed in")
    depth = scipy.ndimage.distance_transform_edt(wm, sampling=labels.GetSpacing()[::-1])
    if rng is None:
        kji = np.unravel_index(int(np.argmax(depth)), depth.shape)
    else:
        cand = np.argwhere(depth >= 0.5 * depth.max())
        kji = cand[rng.integers(len(cand))]
    return np.asarray(kji, dtype=float)[::-1]
