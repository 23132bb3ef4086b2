"""Stage S.2 (MODEL.md §6): register the patient to one atlas with SimpleITK.

Patient → atlas on the tissue channels (vt; gm; wm+csf), tumour masked (weight
w = 1 − G_σ * tumour, σ = 2 voxels), affine then a deformable stage (diffeomorphic demons,
or a B-spline), with the inverse map to bring atlas-space results back to the patient.
The reference uses CLAIRE (diffeomorphic); this is the SimpleITK counterpart.

Conventions (SimpleITK's, all in physical millimetres, never index-matched arrays):
``Registration.forward`` maps *atlas* points to *patient* points, i.e. it is the transform
``sitk.Resample`` needs to bring a patient image onto the atlas grid;
``Registration.inverse`` maps patient points to atlas points (atlas results → patient grid).

Channels. SimpleITK's metrics and demons filters are scalar, so every stage works on one
composite image Σ_c w_c·channel_c (vt 1, gm 2, wm+csf 3): a weighted sum over channels in
which every tissue boundary of every channel is an intensity edge (MeanSquares / demons,
same "modality" on both sides). Cycling the scalar demons over the channels one at a time
(block-coordinate sum of per-channel forces) was tried: no more accurate (mean error
1.27 vs 1.08 mm on the test case) and three times slower.

Tumour masking (weight w = 1 − G_σ * tumour, σ = 2 voxels of the finest patient spacing).
Affine and B-spline stages (ImageRegistrationMethod) use the binary moving mask
{w ≥ METRIC_MASK_WEIGHT = 0.95} (SetMetricMovingMask): the tumour and ~1.6σ around it.
With {w ≥ 0.5} the mask's edge was the tumour's own edge, the tumour's outer voxels (holes
in the patient's tissue channels) entered the metric, and the affine of a synthetic patient
onto its own atlas came out 1–1.5 mm and 3% shear off the identity (the TC(b) demo patient,
grid 32); S.3 read that as γ 0.29 for 0.4 even from the true c0. With 0.95: 0.1–0.2 mm.
Demons filters take no mask; per block of demons iterations:
(1) the *fixed* image is replaced inside the currently warped tumour by the warped
patient, f' = (w∘φ)·f + (1 − w∘φ)·(m∘φ), so the force ∝ f' − m∘φ is scaled by w∘φ;
(2) the block's update δ is kept with weight w∘φ and, in the tumour, replaced by its
normalised-convolution extension from the surroundings, (1 − w∘φ)·G_s*(wδ)/G_s*(w), s the
radius of the tumour's equivalent sphere. Step (1) alone leaks: the demons update is
normalised by |∇m|², so even a small weight moves the field (measured: 1.7 mm of
content-dependence inside the tumour); (1)+(2) bring it to 0.4 mm, the field inside the
tumour follows the surrounding tissue, and far from the tumour nothing changes.
Because w is smooth (MODEL §6), tumour voxels within ~σ of the boundary keep a weight of
up to 0.5: pass a dilated mask to ignore them completely. Tested in
Testing/test_registration.py ("honoured").

Thick anisotropic slices (T1-only, register_t1): Mattes MI affine on the raw image, then the
patient is resampled onto the (isotropic) atlas grid, histogram-matched to the atlas T1
and registered by demons there; the deformable stage therefore always runs on the atlas
grid whatever the patient's slice thickness.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field as dc_field
from typing import Callable, Mapping

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .progress import Cancelled

STAGE = "S.2"
CHANNELS = ("vt", "gm", "wm_csf")
# Tissue label numbering of the project (ARCHITECTURE.md): gm 5, wm 6, vt 7, csf 8.
LABELS = {"gm": (5,), "wm_csf": (6, 8), "vt": (7,)}
# Composite scalar used by the ImageRegistrationMethod stages (one metric on all channels):
# distinct values per channel so that MeanSquares sees every tissue boundary.
COMPOSITE_WEIGHTS = {"vt": 1.0, "gm": 2.0, "wm_csf": 3.0}
# The affine and B-spline metrics see the patient where the tumour weight w = 1 − G_σ * tumour
# is at least this (module docstring).
METRIC_MASK_WEIGHT = 0.95
# A registration whose brain Dice (registration_quality's dice_brain) is below this is
# reported as poor (calibrate's report notes). Measured: the 32³ demo patients onto each of
# the 19 bundled atlases, affine, 0.93–0.96; the MNI152 brain against itself shifted 10 / 20
# / 40 mm, 0.89 / 0.81 / 0.65.
BRAIN_DICE_POOR = 0.8


class RegistrationCancelled(Cancelled):
    """Raised when the ``cancel()`` callback returns True during S.2 (a progress.Cancelled)."""


class RegistrationError(ValueError):
    """Invalid input to, or failure of, the S.2 registration."""


@dataclass
class Registration:
    """Result of S.2 for one (patient, atlas) pair.

    forward: atlas point → patient point (resample patient images onto the atlas grid).
    inverse: patient point → atlas point (resample atlas-space results onto the patient grid).
    affine:  the affine part of ``forward`` (atlas → patient).
    displacement: the deformable displacement field on the atlas grid (mm), or None.
    metric: final metric values per stage; quality: Dice / correlation after warping
    (outside the tumour); timings: seconds per stage; inverse_error_mm: mean and max of
    |inverse(forward(x)) − x| over the atlas brain; notes: human-readable remarks.
    """

    forward: sitk.Transform
    inverse: sitk.Transform
    affine: sitk.AffineTransform
    method: str
    atlas_reference: sitk.Image
    patient_reference: sitk.Image
    displacement: sitk.Image | None = None
    metric: dict = dc_field(default_factory=dict)
    quality: dict = dc_field(default_factory=dict)
    timings: dict = dc_field(default_factory=dict)
    inverse_error_mm: dict = dc_field(default_factory=dict)
    notes: list = dc_field(default_factory=list)

    @property
    def score(self) -> float:
        """Scalar used to rank atlases ("best-registered"): higher is better."""
        return float(self.quality.get("score", float("nan")))


# ----------------------------------------------------------------------------- helpers
class _Reporter:
    """Progress in [f0, f1] of the S.2 stage and cooperative cancellation."""

    def __init__(self, progress, cancel, f0=0.0, f1=1.0):
        self.progress, self.cancel, self.f0, self.f1 = progress, cancel, f0, f1

    def __call__(self, fraction: float, message: str) -> None:
        self.check()
        if self.progress is not None:
            f = self.f0 + (self.f1 - self.f0) * min(max(fraction, 0.0), 1.0)
            self.progress(dict(stage=STAGE, fraction=float(f), message=message))

    def cancelled(self) -> bool:
        return bool(self.cancel is not None and self.cancel())

    def check(self) -> None:
        if self.cancelled():
            raise RegistrationCancelled("S.2 registration cancelled")



def _execute(R, fixed, moving, rep, iterations: int, every: int, label: str) -> None:
    """Run an ImageRegistrationMethod, reporting every `every` iterations and stopping it
    (RegistrationCancelled) as soon as cancel() is true."""
    state = {"cancelled": False, "it": 0}

    def on_iter():
        state["it"] += 1
        if rep.cancelled():
            state["cancelled"] = True
            R.StopRegistration()
        elif state["it"] % every == 0:
            rep(min(state["it"] / (2.0 * iterations), 1.0), f"{label}: metric {R.GetMetricValue():.4g}")

    R.AddCommand(sitk.sitkIterationEvent, on_iter)
    R.Execute(fixed, moving)
    if state["cancelled"]:
        raise RegistrationCancelled("S.2 registration cancelled")

def _require_image(img, name: str) -> sitk.Image:
    if not isinstance(img, sitk.Image):
        raise RegistrationError(f"{name}: expected a SimpleITK image, got {type(img).__name__}")
    if img.GetDimension() != 3 or min(img.GetSize()) < 2:
        raise RegistrationError(f"{name}: expected a non-empty 3D image, got size {img.GetSize()}")
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise RegistrationError(f"{name}: expected a scalar image")
    return img


def _same_grid(a: sitk.Image, b: sitk.Image, tol: float = 1e-4) -> bool:
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=tol, atol=tol)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), rtol=tol, atol=1e-3)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol))


def physical_bounds(img: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned physical bounding box (mm) of the voxel centres of ``img``."""
    size = np.array(img.GetSize()) - 1
    corners = [img.TransformContinuousIndexToPhysicalPoint(
        [float(c) for c in size * np.array(b)]) for b in np.ndindex(2, 2, 2)]
    corners = np.asarray(corners)
    return corners.min(0), corners.max(0)


def _overlap(a: sitk.Image, b: sitk.Image) -> bool:
    (alo, ahi), (blo, bhi) = physical_bounds(a), physical_bounds(b)
    sa, sb = np.array(a.GetSpacing()).max(), np.array(b.GetSpacing()).max()
    return bool(np.all(alo - sa <= bhi + sb) and np.all(blo - sb <= ahi + sa))


def _as_float(img: sitk.Image) -> sitk.Image:
    return sitk.Cast(img, sitk.sitkFloat32)


def _check_channels(patient: Mapping, atlas: Mapping) -> None:
    if set(patient) != set(atlas):
        raise RegistrationError(
            f"patient and atlas channel keys differ: patient {sorted(patient)}, atlas {sorted(atlas)}")
    if not patient:
        raise RegistrationError("no channels given")
    for who, chans in (("patient", patient), ("atlas", atlas)):
        ref = None
        for k, img in chans.items():
            _require_image(img, f"{who} channel '{k}'")
            if ref is None:
                ref = img
            elif not _same_grid(ref, img):
                raise RegistrationError(f"{who} channels are not on one grid ('{k}' differs)")
            arr = sitk.GetArrayViewFromImage(img)
            if not np.isfinite(arr).all():
                raise RegistrationError(f"{who} channel '{k}' has non-finite values (NaN/inf)")
            if arr.max() <= 0:
                raise RegistrationError(f"{who} channel '{k}' is empty (all zero)")


def channels_from_labels(labels: sitk.Image) -> dict[str, sitk.Image]:
    """Tissue label map (gm 5, wm 6, vt 7, csf 8) → channel fractions {vt, gm, wm_csf}."""
    _require_image(labels, "labels")
    arr = sitk.GetArrayViewFromImage(labels)
    out = {}
    for k in CHANNELS:
        ch = sitk.GetImageFromArray(np.isin(arr, LABELS[k]).astype(np.float32))
        ch.CopyInformation(labels)
        out[k] = ch
    return out


def composite(channels: Mapping[str, sitk.Image]) -> sitk.Image:
    """One scalar image Σ_c w_c·channel_c (w: vt 1, gm 2, wm+csf 3) for single-metric stages."""
    keys = list(channels)
    out = None
    for i, k in enumerate(keys):
        w = COMPOSITE_WEIGHTS.get(k, float(i + 1))
        term = _as_float(channels[k]) * w
        out = term if out is None else out + term
    return out


def tumor_weight(tumor_mask: sitk.Image, reference: sitk.Image, sigma_voxels: float = 2.0) -> sitk.Image:
    """w = 1 − G_σ * (tumour > 0) on the grid of ``reference`` (MODEL §6 S.2, σ = 2 voxels).

    The mask is brought onto ``reference`` through its physical geometry (identity map);
    σ is ``sigma_voxels`` times the finest spacing of ``reference`` (isotropic in mm).
    """
    _require_image(tumor_mask, "tumor_mask")
    if not _overlap(tumor_mask, reference):
        raise RegistrationError("tumor_mask does not overlap the patient image (physical geometry)")
    binary = sitk.Cast(sitk.Cast(tumor_mask, sitk.sitkFloat32) > 0, sitk.sitkFloat32)
    n_in = float(sitk.GetArrayViewFromImage(binary).sum())
    on_ref = sitk.Resample(binary, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    arr = sitk.GetArrayViewFromImage(on_ref)
    if n_in > 0 and arr.max() < 0.5:
        raise RegistrationError("tumor_mask has no voxel inside the patient image (geometries do not overlap)")
    if arr.mean() > 0.9:
        raise RegistrationError("tumor_mask covers more than 90% of the patient image")
    sigma = sigma_voxels * min(reference.GetSpacing())
    smooth = sitk.SmoothingRecursiveGaussian(on_ref, sigma) if sigma > 0 else on_ref
    w = sitk.Clamp(1.0 - smooth, sitk.sitkFloat32, 0.0, 1.0)
    return w


def _affine_registration(fixed, moving, moving_mask, *, metric, iterations, rep, seed=7):
    """Affine (moments-initialised), two resolution levels, masked metric, fixed-seed sampling."""
    tx = sitk.CenteredTransformInitializer(fixed, moving, sitk.AffineTransform(3),
                                           sitk.CenteredTransformInitializerFilter.MOMENTS)
    R = sitk.ImageRegistrationMethod()
    if metric == "mattes":
        R.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    else:
        R.SetMetricAsMeanSquares()
    R.SetMetricSamplingStrategy(R.RANDOM)
    R.SetMetricSamplingPercentage(0.3, seed)
    if moving_mask is not None:
        R.SetMetricMovingMask(moving_mask)
    R.SetInterpolator(sitk.sitkLinear)
    R.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0, minStep=1e-3, numberOfIterations=iterations,
        relaxationFactor=0.6, gradientMagnitudeTolerance=1e-6)
    R.SetOptimizerScalesFromPhysicalShift()
    R.SetShrinkFactorsPerLevel([2, 1])
    R.SetSmoothingSigmasPerLevel([1.0, 0.0])
    R.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    R.SetInitialTransform(tx, inPlace=True)
    _execute(R, fixed, moving, rep, iterations, every=10, label="affine")
    return tx, {"affine": float(R.GetMetricValue())}


def _shrink(img: sitk.Image, factor: int) -> sitk.Image:
    if factor == 1:
        return img
    sm = sitk.SmoothingRecursiveGaussian(img, [0.5 * factor * s for s in img.GetSpacing()])
    return sitk.Shrink(sm, [factor] * 3)


def _warp(img: sitk.Image, disp: sitk.Image, default: float) -> sitk.Image:
    """img ∘ (id + disp) on the grid of ``disp``."""
    tx = sitk.DisplacementFieldTransform(sitk.Image(disp))
    return sitk.Resample(img, disp, tx, sitk.sitkLinear, default, sitk.sitkFloat32)


def _weighted_update(old: sitk.Image, new: sitk.Image, w: sitk.Image, fill_mm: float) -> sitk.Image:
    """old + w·δ + (1 − w)·NC(δ), δ = new − old: the demons update of one block, kept where
    the data are trusted (w) and, in the tumour, replaced by its normalised-convolution
    extension from the surroundings, NC(δ) = G_s*(w δ) / G_s*(w), s = ``fill_mm`` (so the
    tumour content cannot drive the field, which follows the surrounding tissue)."""
    a_old = sitk.GetArrayFromImage(old)
    delta = sitk.GetArrayFromImage(new) - a_old
    wa = sitk.GetArrayFromImage(w).astype(np.float64)
    sp = np.array(w.GetSpacing())[::-1]
    sig = fill_mm / sp
    den = ndimage.gaussian_filter(wa, sig, mode="nearest") + 1e-6
    nc = np.stack([ndimage.gaussian_filter(wa * delta[..., c], sig, mode="nearest") / den
                   for c in range(3)], -1)
    out = sitk.GetImageFromArray(a_old + wa[..., None] * delta + (1.0 - wa[..., None]) * nc, isVector=True)
    out.CopyInformation(old)
    return out


def _demons(fixed: sitk.Image, moving: sitk.Image, weight: sitk.Image | None, *, iterations,
            sigma_field, rep, block=5):
    """Diffeomorphic demons (SimpleITK), two levels (shrink 2: 2/3 of the iterations, then
    full resolution), field smoothed by ``sigma_field`` voxels, in blocks of ``block``
    iterations continuing one displacement field φ = id + d (progress / cancel points).

    Tumour masking (``weight`` w on the moving grid, 0 in the tumour): before each block the
    fixed image is replaced inside the warped tumour by the warped moving image,
    f' = (w∘φ)·f + (1 − w∘φ)·(m∘φ), so the demons force ∝ (f' − m∘φ) vanishes there and the
    field inside the tumour is filled in by the smoothing from the surrounding tissue."""
    filt = sitk.DiffeomorphicDemonsRegistrationFilter()
    filt.SetSmoothDisplacementField(True)
    filt.SetStandardDeviations(sigma_field)
    filt.SetMaximumUpdateStepLength(0.5)
    filt.SetUseImageSpacing(True)
    levels = [(2, max(1, (2 * iterations) // 3)), (1, max(1, iterations - (2 * iterations) // 3))]
    disp, metric, done = None, float("nan"), 0
    if weight is not None:   # fill scale: radius of the sphere of the tumour's volume
        vol = float((1.0 - sitk.GetArrayViewFromImage(weight)).sum()) * float(np.prod(weight.GetSpacing()))
        fill_mm = max((3.0 * vol / (4.0 * math.pi)) ** (1.0 / 3.0), 2.0 * max(weight.GetSpacing()))
    for factor, its in levels:
        f, m = _shrink(fixed, factor), _shrink(moving, factor)
        w = None if weight is None else _shrink(weight, factor)
        if disp is None:
            disp = sitk.Image(f.GetSize(), sitk.sitkVectorFloat64, 3)
            disp.CopyInformation(f)
        else:
            disp = sitk.Resample(disp, f, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
        left = its
        while left > 0:
            rep(done / iterations, f"demons iteration {done}/{iterations} (level 1/{factor})")
            n = min(block, left)
            filt.SetNumberOfIterations(n)
            if w is None:
                disp = filt.Execute(f, m, disp)
            else:
                w_phi = _warp(w, disp, 1.0)
                f_masked = f * w_phi + _warp(m, disp, 0.0) * (1.0 - w_phi)
                new = filt.Execute(f_masked, m, disp)
                # the block's update, weighted by w∘φ: the tumour content cannot drive it
                disp = _weighted_update(disp, new, w_phi, fill_mm)
            metric = float(filt.GetMetric())
            left -= n
            done += n
    return disp, metric


def _bspline(fixed, moving, moving_mask, *, iterations, mesh_mm, rep, seed=7):
    """B-spline (free-form) stage with a masked MeanSquares metric on the composite."""
    size_mm = np.array(fixed.GetSize()) * np.array(fixed.GetSpacing())
    mesh = [max(1, int(round(s / mesh_mm))) for s in size_mm]
    tx = sitk.BSplineTransformInitializer(fixed, mesh, order=3)
    R = sitk.ImageRegistrationMethod()
    R.SetMetricAsMeanSquares()
    R.SetMetricSamplingStrategy(R.RANDOM)
    R.SetMetricSamplingPercentage(0.1, seed)
    if moving_mask is not None:
        R.SetMetricMovingMask(moving_mask)
    R.SetInterpolator(sitk.sitkLinear)
    R.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-6, numberOfIterations=iterations,
                           maximumNumberOfCorrections=5, maximumNumberOfFunctionEvaluations=4 * iterations)
    R.SetShrinkFactorsPerLevel([2, 1])
    R.SetSmoothingSigmasPerLevel([1.0, 0.0])
    R.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    R.SetInitialTransform(tx, inPlace=True)
    _execute(R, fixed, moving, rep, iterations, every=5, label="B-spline")
    field = sitk.TransformToDisplacementField(tx, sitk.sitkVectorFloat64, fixed.GetSize(),
                                              fixed.GetOrigin(), fixed.GetSpacing(), fixed.GetDirection())
    return field, float(R.GetMetricValue())


def _compose(affine: sitk.AffineTransform, disp: sitk.Image | None, inv_disp: sitk.Image | None):
    """forward(x) = A(x + d(x)); inverse(y) = z + d⁻¹(z), z = A⁻¹(y)."""
    if disp is None:
        return sitk.AffineTransform(affine), sitk.AffineTransform(affine.GetInverse())
    fwd = sitk.CompositeTransform(3)
    fwd.AddTransform(sitk.AffineTransform(affine))          # applied last
    fwd.AddTransform(sitk.DisplacementFieldTransform(sitk.Image(disp)))   # applied first
    inv = sitk.CompositeTransform(3)
    inv.AddTransform(sitk.DisplacementFieldTransform(sitk.Image(inv_disp)))  # applied last
    inv.AddTransform(sitk.AffineTransform(affine.GetInverse()))             # applied first
    return fwd, inv


def _invert(disp: sitk.Image) -> sitk.Image:
    return sitk.InvertDisplacementField(disp, maximumNumberOfIterations=50,
                                        maxErrorToleranceThreshold=0.01,
                                        meanErrorToleranceThreshold=1e-4,
                                        enforceBoundaryCondition=True)


def _inverse_error(fwd: sitk.Transform, inv: sitk.Transform, atlas_ref: sitk.Image,
                   brain: np.ndarray, max_points: int = 3000) -> dict:
    """mean / max of |inverse(forward(x)) − x| (mm) over (a subsample of) atlas brain voxels."""
    idx = np.argwhere(brain)
    if len(idx) == 0:
        return {}
    step = max(1, len(idx) // max_points)
    errs = []
    for k, j, i in idx[::step]:
        x = atlas_ref.TransformIndexToPhysicalPoint((int(i), int(j), int(k)))
        y = inv.TransformPoint(fwd.TransformPoint(x))
        errs.append(math.dist(x, y))
    errs = np.asarray(errs)
    return {"mean": float(errs.mean()), "max": float(errs.max())}


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return float(2.0 * np.logical_and(a, b).sum() / s) if s > 0 else float("nan")


def _dice_of_fractions(fa, fb, keep: np.ndarray | None) -> float:
    """Dice of {fa > 0.5} and {fb > 0.5}, both restricted to keep (None: everywhere)."""
    a, b = np.asarray(fa) > 0.5, np.asarray(fb) > 0.5
    return _dice(a, b) if keep is None else _dice(a & keep, b & keep)


def registration_quality(atlas_channels: Mapping[str, sitk.Image],
                         warped_channels: Mapping[str, sitk.Image],
                         weight: sitk.Image | None = None) -> dict:
    """Dice of each channel ({fraction > 0.5}) between atlas and warped patient, outside the
    tumour (``weight`` ≥ 0.5, on the atlas grid); ``score`` = mean Dice (ranks atlases);
    ``dice_brain``: Dice of the brains ({sum of the channels > 0.5}), which a registration
    that lands the patient tens of mm off drops well below a good one's (BRAIN_DICE_POOR)."""
    keep = None if weight is None else sitk.GetArrayViewFromImage(weight) >= 0.5
    out = {}
    brain_a = brain_b = 0.0
    for k in atlas_channels:
        fa = sitk.GetArrayViewFromImage(atlas_channels[k])
        fb = sitk.GetArrayViewFromImage(warped_channels[k])
        brain_a, brain_b = brain_a + fa, brain_b + fb
        out[f"dice_{k}"] = _dice_of_fractions(fa, fb, keep)
    out["score"] = float(np.nanmean([v for v in out.values()]))
    out["dice_brain"] = _dice_of_fractions(brain_a, brain_b, keep)
    return out


def poor_registration(quality: Mapping) -> str | None:
    """A one-line warning when the registration's brain Dice is below BRAIN_DICE_POOR (the
    patient probably sits tens of mm off the atlas: its S.3 results are unreliable), else
    None; None too where no brain Dice was measured (the T1 registration)."""
    dice = quality.get("dice_brain")
    if dice is None or not np.isfinite(dice) or dice >= BRAIN_DICE_POOR:
        return None
    return (f"the S.2 registration looks poor (brain Dice {dice:.2f} < {BRAIN_DICE_POOR}): check the "
            "inputs' geometry and tissue labels; this atlas's parameters are unreliable")


def correlation_quality(fixed: sitk.Image, warped: sitk.Image, weight: sitk.Image | None = None) -> dict:
    """Pearson correlation of intensities (T1 case) over the fixed image's foreground outside
    the tumour; ``score`` = correlation (ranks atlases when only a T1 is given)."""
    f = sitk.GetArrayViewFromImage(fixed).astype(np.float64)
    m = sitk.GetArrayViewFromImage(warped).astype(np.float64)
    keep = f > 0
    if weight is not None:
        keep &= sitk.GetArrayViewFromImage(weight) >= 0.5
    if keep.sum() < 10:
        return {"ncc": float("nan"), "score": float("nan")}
    c = float(np.corrcoef(f[keep], m[keep])[0, 1])
    return {"ncc": c, "score": c}


def best_registered(registrations: list[Registration]) -> int:
    """Index of the registration with the highest quality score (NaN scores rank last)."""
    if not registrations:
        raise RegistrationError("no registrations to choose from")
    scores = [r.score if np.isfinite(r.score) else -np.inf for r in registrations]
    return int(np.argmax(scores))


# ------------------------------------------------------------------------- resampling
def _is_vector(image: sitk.Image) -> bool:
    return image.GetNumberOfComponentsPerPixel() == image.GetDimension()


def _push_vectors(image: sitk.Image, ref: sitk.Image, there: sitk.Transform,
                  back: sitk.Transform) -> sitk.Image:
    """Push a displacement field u (mm, on the grid of ``image``) through the registration:
    on ``ref``, u'(y) = back(x + u(x)) − back(x), x = there(y) (``there``: output → input
    points, ``back``: input → output points). Exact for any map (no linearisation);
    subtracting back(x) rather than y cancels the error of the numerical inverse, so
    u = 0 gives exactly 0. Zero where x falls outside ``image``."""
    u = sitk.DisplacementFieldTransform(sitk.Cast(image, sitk.sitkVectorFloat64))
    geometry = (sitk.sitkVectorFloat64, ref.GetSize(), ref.GetOrigin(), ref.GetSpacing(), ref.GetDirection())
    moved = sitk.TransformToDisplacementField(sitk.CompositeTransform([back, u, there]), *geometry)
    base = sitk.TransformToDisplacementField(sitk.CompositeTransform([back, there]), *geometry)
    return sitk.Cast(moved - base, image.GetPixelID())


def warp_to_atlas(image: sitk.Image, reg: Registration, reference_atlas_image: sitk.Image | None = None,
                  interpolator=sitk.sitkLinear, default: float = 0.0) -> sitk.Image:
    """Patient-space image → atlas grid through ``reg.forward`` (labels:
    sitk.sitkNearestNeighbor, fractions: linear). A vector image (3 components: a
    displacement in mm) is resampled *and* its vectors mapped: u_a(x) = G(y + u(y)) − G(y),
    y = F(x) (F = forward, G = inverse; see :func:`_push_vectors`)."""
    ref = reg.atlas_reference if reference_atlas_image is None else reference_atlas_image
    if _is_vector(image):
        return _push_vectors(image, ref, reg.forward, reg.inverse)
    return sitk.Resample(image, ref, reg.forward, interpolator, default)


def warp_to_patient(image: sitk.Image, reg: Registration, reference_patient_image: sitk.Image | None = None,
                    interpolator=sitk.sitkLinear, default: float = 0.0) -> sitk.Image:
    """Atlas-space image → patient grid through ``reg.inverse`` (labels nearest, fractions
    linear: c(1), |u|). A vector image (the displacement u in mm) is resampled *and* its
    vectors mapped: u_p(y) = F(x + u(x)) − F(x), x = G(y): the atlas-space motion of the
    tissue point x seen in patient space (exact, not linearised; it reduces to A·u for an
    affine F(x) = A x + t)."""
    ref = reg.patient_reference if reference_patient_image is None else reference_patient_image
    if _is_vector(image):
        return _push_vectors(image, ref, reg.inverse, reg.forward)
    return sitk.Resample(image, ref, reg.inverse, interpolator, default)


def derive_patient_tissue(atlas_channels: Mapping[str, sitk.Image], reg: Registration,
                          reference_patient_image: sitk.Image | None = None) -> dict[str, sitk.Image]:
    """Patient tissue fractions when only a T1 is given: the (best-registered) atlas's
    channels warped to patient space (linear). Records a note on ``reg``."""
    out = {k: warp_to_patient(_as_float(v), reg, reference_patient_image) for k, v in atlas_channels.items()}
    reg.notes.append("patient tissue derived from the registered atlas (no tissue segmentation given)")
    return out


# ----------------------------------------------------------------------- registration
def _combine(keys, images):
    return images[0] if len(images) == 1 else composite(dict(zip(keys, images)))


def _deformable(method, fixed, moving, weight_atlas, mask_atlas, *, iterations, sigma_field, rep):
    if method == "demons":
        return _demons(fixed, moving, weight_atlas, iterations=iterations, sigma_field=sigma_field, rep=rep)
    return _bspline(fixed, moving, mask_atlas, iterations=iterations, mesh_mm=40.0, rep=rep)


def _register(fixed_list, moving_list, keys, weight_patient, atlas_ref, patient_ref, *,
              affine_fixed, affine_moving, affine_metric, deformable, iterations, affine_iterations,
              sigma_field, progress, cancel, quality_fn):
    if deformable not in ("demons", "bspline", "none"):
        raise RegistrationError(f"unknown deformable method '{deformable}' (use 'demons', 'bspline' or 'none')")
    t = {}
    t0 = time.perf_counter()
    rep = _Reporter(progress, cancel, 0.0, 0.4)
    rep(0.0, "affine registration")
    mask_patient = sitk.Cast(weight_patient >= METRIC_MASK_WEIGHT, sitk.sitkUInt8)
    affine, metric = _affine_registration(affine_fixed, affine_moving, mask_patient, metric=affine_metric,
                                          iterations=affine_iterations, rep=rep)
    t["affine"] = time.perf_counter() - t0
    # patient data on the atlas grid after the affine
    moved = [sitk.Resample(m, atlas_ref, affine, sitk.sitkLinear, 0.0, sitk.sitkFloat32) for m in moving_list]
    weight_atlas = sitk.Resample(weight_patient, atlas_ref, affine, sitk.sitkLinear, 1.0, sitk.sitkFloat32)
    overlap = sum(float(sitk.GetArrayViewFromImage(m).sum()) for m in moved)
    if overlap <= 0:
        raise RegistrationError("registration failed: the patient does not overlap the atlas after the affine stage")
    disp = inv_disp = None
    if deformable != "none":
        t1 = time.perf_counter()
        rep = _Reporter(progress, cancel, 0.4, 0.9)
        rep(0.0, f"deformable registration ({deformable})")
        # tumour made uninformative: weight (demons) or binary metric mask (B-spline)
        mask_atlas = sitk.Cast(weight_atlas >= METRIC_MASK_WEIGHT, sitk.sitkUInt8)
        has_tumor = float(sitk.GetArrayViewFromImage(weight_atlas).min()) < 0.999
        disp, metric[deformable] = _deformable(
            deformable, _combine(keys, fixed_list), _combine(keys, moved),
            weight_atlas if has_tumor else None, mask_atlas if has_tumor else None,
            iterations=iterations, sigma_field=sigma_field, rep=rep)
        t[deformable] = time.perf_counter() - t1
        t2 = time.perf_counter()
        _Reporter(progress, cancel, 0.9, 1.0)(0.0, "inverting the displacement field")
        inv_disp = _invert(disp)
        t["inverse"] = time.perf_counter() - t2
    fwd, inv = _compose(affine, disp, inv_disp)
    reg = Registration(forward=fwd, inverse=inv, affine=affine, method=f"affine+{deformable}",
                       atlas_reference=atlas_ref, patient_reference=patient_ref, displacement=disp,
                       metric=metric, timings=t)
    warped = [sitk.Resample(m, atlas_ref, fwd, sitk.sitkLinear, 0.0, sitk.sitkFloat32) for m in moving_list]
    weight_warped = sitk.Resample(weight_patient, atlas_ref, fwd, sitk.sitkLinear, 1.0, sitk.sitkFloat32)
    reg.quality = quality_fn(warped, weight_warped)
    brain = sum(sitk.GetArrayViewFromImage(f) for f in fixed_list) > 0.5 if len(fixed_list) > 1 \
        else sitk.GetArrayViewFromImage(fixed_list[0]) > 0
    reg.inverse_error_mm = _inverse_error(fwd, inv, atlas_ref, brain)
    reg.timings["total"] = time.perf_counter() - t0
    _Reporter(progress, cancel)(1.0, f"registration done ({reg.method}, score {reg.score:.3f})")
    return reg


def register_patient_to_atlas(patient_channels: Mapping[str, sitk.Image],
                              atlas_channels: Mapping[str, sitk.Image],
                              tumor_mask: sitk.Image, *, deformable: str = "demons",
                              iterations: int = 60, affine_iterations: int = 100,
                              sigma_field: float = 1.5, mask_sigma_voxels: float = 2.0,
                              progress: Callable | None = None,
                              cancel: Callable[[], bool] | None = None) -> Registration:
    """S.2 on tissue channels (MODEL §6): affine (MeanSquares on the channel composite, tumour
    masked) then ``deformable`` ('demons' multi-channel diffeomorphic demons, 'bspline', or
    'none'); ``sigma_field`` is the demons field smoothing in voxels. Fixed = atlas."""
    _check_channels(patient_channels, atlas_channels)
    keys = [k for k in CHANNELS if k in atlas_channels] + sorted(set(atlas_channels) - set(CHANNELS))
    atlas_list = [_as_float(atlas_channels[k]) for k in keys]
    patient_list = [_as_float(patient_channels[k]) for k in keys]
    weight = tumor_weight(tumor_mask, patient_list[0], mask_sigma_voxels)

    def quality(warped, w):
        return registration_quality(dict(zip(keys, atlas_list)), dict(zip(keys, warped)), w)

    return _register(atlas_list, patient_list, keys, weight, atlas_list[0], patient_list[0],
                     affine_fixed=composite(dict(zip(keys, atlas_list))),
                     affine_moving=composite(dict(zip(keys, patient_list))), affine_metric="meansquares",
                     deformable=deformable, iterations=iterations, affine_iterations=affine_iterations,
                     sigma_field=sigma_field, progress=progress, cancel=cancel, quality_fn=quality)


def register_t1(patient_t1: sitk.Image, atlas_t1: sitk.Image, tumor_mask: sitk.Image, *,
                deformable: str = "demons", iterations: int = 60, affine_iterations: int = 100,
                sigma_field: float = 1.5, mask_sigma_voxels: float = 2.0,
                progress: Callable | None = None,
                cancel: Callable[[], bool] | None = None) -> Registration:
    """S.2 for the clinical case: a single-contrast T1 (any, e.g. thick anisotropic, slices)
    and a binary tumour mask. Affine on Mattes mutual information (tumour masked); the
    patient T1 is then resampled onto the atlas grid, histogram-matched to the atlas T1 and
    registered by diffeomorphic demons (or B-spline). Quality = correlation outside the tumour.
    Derive the patient tissue afterwards with :func:`derive_patient_tissue` on the
    best-registered atlas (:func:`best_registered`)."""
    _require_image(patient_t1, "patient_t1")
    _require_image(atlas_t1, "atlas_t1")
    for name, img in (("patient_t1", patient_t1), ("atlas_t1", atlas_t1)):
        if not np.isfinite(sitk.GetArrayViewFromImage(img)).all():
            raise RegistrationError(f"{name} has non-finite values (NaN/inf)")
        if sitk.GetArrayViewFromImage(img).max() <= sitk.GetArrayViewFromImage(img).min():
            raise RegistrationError(f"{name} is empty (constant intensity)")
    fixed = sitk.RescaleIntensity(_as_float(atlas_t1), 0.0, 1.0)
    moving = sitk.RescaleIntensity(_as_float(patient_t1), 0.0, 1.0)
    weight = tumor_weight(tumor_mask, moving, mask_sigma_voxels)
    # Demons needs one intensity scale: the patient T1 is histogram-matched to the atlas T1
    # (foreground only: thresholdAtMeanIntensity); the tumour is a small part of the
    # histogram and is masked / blended out of the metric anyway. The affine stage uses
    # Mattes mutual information on the unmatched image.
    matched = sitk.HistogramMatching(moving, fixed, numberOfHistogramLevels=128, numberOfMatchPoints=15,
                                     thresholdAtMeanIntensity=True)

    def quality(warped, w):
        return correlation_quality(fixed, warped[0], w)

    return _register([fixed], [matched], ["t1"], weight, fixed, moving,
                     affine_fixed=fixed, affine_moving=moving, affine_metric="mattes",
                     deformable=deformable, iterations=iterations, affine_iterations=affine_iterations,
                     sigma_field=sigma_field, progress=progress, cancel=cancel, quality_fn=quality)
