"""Clinical-like inputs from a synthetic patient: one thick-slice oblique T1 and binary masks.

    python benchmarks/clinical_like.py PATIENT OUT [--spacing 1 1 5] [--rotate-z 23] [--rotate-x 10]
    gbm-calibrate calibrate --t1 OUT/t1.nrrd --tumor-core OUT/tumor_core.nrrd \
        --atlases 2 --grid 32 --out OUT/calibration
    python benchmarks/against_truth.py OUT/calibration/report.json PATIENT/ground_truth.json

PATIENT is a `gbm-calibrate simulate --preset …` folder (its t1.nrrd and tumor_labels.nrrd).
The T1 (linear) and the masks (nearest neighbour) are resampled onto one grid that covers
the same brain but is rotated about z then x, left-handed (its third axis reversed) and
anisotropic (`--spacing`, default 1 × 1 × 5 mm): what a clinical scan looks like, with none
of the synthetic patient's tissue labels. Written: t1.nrrd, tumor_core.nrrd (BraTS labels 1,
3, 4: necrotic and enhancing), whole_tumor.nrrd (core + edema) and edema.nrrd (whole
tumour minus core), so that both `--tumor-core` alone and `--tumor-core --edema` can be run,
and tissue_labels.nrrd (the patient's label map, nearest neighbour) for `--tissue-seg` runs
that leave out the T1-only tissue derivation (README *Accuracy*, patient B′;
benchmarks/ACCURACY.md).
"""
from __future__ import annotations

import argparse
import math
import pathlib

import numpy as np
import SimpleITK as sitk

from GBMMassEffectLib.calibrate import BRATS_OTHER_CORE, DEFAULT_TUMOR_VALUES, resample_to

#: what calibrate reads as tumour core in a BraTS map: necrotic, enhancing, label 3
CORE_LABELS = (DEFAULT_TUMOR_VALUES["necrotic"], DEFAULT_TUMOR_VALUES["enhancing"], BRATS_OTHER_CORE)


def rotation(axis: int, degrees: float) -> np.ndarray:
    """3×3 rotation about image axis 0, 1 or 2 (x, y, z) by `degrees`."""
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    i, j = [k for k in range(3) if k != axis]
    R = np.eye(3)
    R[i, i], R[i, j], R[j, i], R[j, j] = c, -s, s, c
    return R


def clinical_grid(reference: sitk.Image, spacing, rotate_z: float, rotate_x: float) -> sitk.Image:
    """An empty image rotated about z then x, left-handed, with `spacing` (mm), centred on the
    reference's centre and large enough to hold all of the reference's extent."""
    D = rotation(0, rotate_x) @ rotation(2, rotate_z) @ np.diag([1.0, 1.0, -1.0])
    size = np.array(reference.GetSize())
    ref_spacing = np.array(reference.GetSpacing())
    centre = np.array(reference.TransformContinuousIndexToPhysicalPoint(((size - 1) / 2.0).tolist()))
    # the reference's corners in the new axes give the extent to cover
    corners = []
    for idx in np.ndindex(2, 2, 2):
        p = reference.TransformContinuousIndexToPhysicalPoint((np.array(idx) * (size - 1)).tolist())
        corners.append(D.T @ (np.array(p) - centre))
    half = np.max(np.abs(corners), axis=0) + ref_spacing.max()
    spacing = np.asarray(spacing, dtype=float)
    new_size = np.ceil(2 * half / spacing).astype(int) + 1
    origin = centre - D @ ((new_size - 1) / 2.0 * spacing)
    out = sitk.Image([int(v) for v in new_size], sitk.sitkFloat32)
    out.SetSpacing(spacing.tolist())
    out.SetDirection(D.flatten().tolist())
    out.SetOrigin(origin.tolist())
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("patient", type=pathlib.Path, help="a simulate --preset folder")
    ap.add_argument("out", type=pathlib.Path)
    ap.add_argument("--spacing", type=float, nargs=3, default=(1.0, 1.0, 5.0), help="mm (default 1 1 5)")
    ap.add_argument("--rotate-z", type=float, default=23.0, help="degrees about z (default 23)")
    ap.add_argument("--rotate-x", type=float, default=10.0, help="degrees about x, after z (default 10)")
    a = ap.parse_args(argv)

    t1 = sitk.ReadImage(str(a.patient / "t1.nrrd"), sitk.sitkFloat32)
    labels = sitk.ReadImage(str(a.patient / "tumor_labels.nrrd"))
    lab = sitk.GetArrayFromImage(labels)
    core = sitk.GetImageFromArray(np.isin(lab, CORE_LABELS).astype(np.uint8))
    whole = sitk.GetImageFromArray((lab > 0).astype(np.uint8))
    for m in (core, whole):
        m.CopyInformation(labels)

    grid = clinical_grid(t1, a.spacing, a.rotate_z, a.rotate_x)
    a.out.mkdir(parents=True, exist_ok=True)
    # the T1 plainly linear (no anti-aliasing: a scanner's thick slice is not a smoothed one)
    t1_c = sitk.Resample(t1, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    core_c, whole_c = (resample_to(m, grid, "label") for m in (core, whole))
    edema_c = sitk.Cast((whole_c > 0) & (core_c == 0), sitk.sitkUInt8)
    out = [("t1", t1_c), ("tumor_core", core_c), ("whole_tumor", whole_c), ("edema", edema_c)]
    if (a.patient / "patient_labels.nrrd").exists():  # for runs that separate the T1-only tissue path
        tissue = sitk.ReadImage(str(a.patient / "patient_labels.nrrd"))
        out.append(("tissue_labels", resample_to(tissue, grid, "label")))
    for name, img in out:
        sitk.WriteImage(img, str(a.out / f"{name}.nrrd"), True)
    n_core = int(sitk.GetArrayViewFromImage(core_c).sum())
    print(f"wrote {a.out}: grid {grid.GetSize()} at {tuple(a.spacing)} mm, rotated {a.rotate_z}° about z and "
          f"{a.rotate_x}° about x, left-handed; core {n_core} voxels")


if __name__ == "__main__":
    main()
