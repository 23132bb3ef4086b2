"""The reference solver's own synthetic patient, as images for `gbm-calibrate calibrate`.

    python benchmarks/glia_patient.py OUT [--check]
    gbm-calibrate calibrate --tumor-concentration OUT/patient/tumor_concentration.nii.gz \
        --tissue-seg OUT/patient/patient_labels.nii.gz --atlas-set OUT/atlas/glia_atlas.nii.gz \
        --atlases 1 --grid 64 --out OUT/out
    python benchmarks/glia_patient.py OUT --report OUT/out/report.json
    python benchmarks/glia_patient.py OUT --true-ic      # S.3 with GLIA's c0 and atlas (Table 1)
    python benchmarks/glia_patient.py OUT --data-path cubic   # the same in calibrate's box (or linear)

Testing/Data/glia-testdata holds a patient made by GLIA (the published solver), not by us:
patient.nc (the deformed anatomy, tumour label 1), patient_tumor.nc (its c(1)),
patient_vt.nc (its ventricles at t = 1), patient_tumor_IC.nc (its c0), all on atlas.nc's
64³ grid. The reference's example script for that data (scripts/forward.py) runs the
mass-effect model on atlas.nc with the seed at (137, 169, 96)/256, ρ 6, κ 0.02,
γ 8e4 (0.8 in the paper's units) and zero grey-matter ratios, 25 steps of 0.04. `--check`
runs our §3 forward solve with those values from patient_tumor_IC.nc on atlas.nc's
tissues (smoothed one voxel, §2) and prints how far its c(1) and vt(1) are from GLIA's:
that is what makes those values this patient's ground truth (0.5% and 0.4% relative,
2-norm). GLIA ships no displacement, so the truth's max|u| is our forward solve's.

The volumes are written as NIfTI with 4 mm voxels (the box's 256 mm over 64 voxels),
GLIA's array axes as the image's i, j, k, identity direction. The atlas set is atlas.nc
alone (the true atlas); the bundled atlases are other anatomies in another orientation.
`--report` prints a calibrate report's γ, ρ, κ, max|u| against the truth."""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GLIA = REPO / "Testing" / "Data" / "glia-testdata"
TRUTH = {"kappa": 0.02, "rho": 6.0, "gamma": 0.8}  # GLIA scripts/forward.py: k 0.02, rho 6, gamma 8e4
SPACING_MM = 4.0  # 256 mm over 64 voxels


def read_nc(name: str) -> np.ndarray:
    """One GLIA volume as float64 in its stored (x, y, z) axis order."""
    import scipy.io

    with scipy.io.netcdf_file(GLIA / name, "r", mmap=False) as f:
        return np.array(f.variables["data"].data, dtype=np.float64)


def _image(arr_xyz: np.ndarray):
    from GBMMassEffectLib import io

    n = arr_xyz.shape[0]
    origin = [-(n - 1) / 2 * SPACING_MM] * 3
    return io.make_image(np.ascontiguousarray(np.transpose(arr_xyz, (2, 1, 0))), [SPACING_MM] * 3, origin)


def _glia_grid(precision: str = "float64"):
    """(ops, tissues): GLIA's own 64³ grid (CPU) and atlas.nc's tissues there, smoothed one voxel (§2)."""
    from GBMMassEffectLib.backend import get_backend
    from GBMMassEffectLib.spectral import SpectralOps
    from GBMMassEffectLib.tissue import Tissues

    ops = SpectralOps(64, get_backend("cpu", precision))
    return ops, Tissues.from_labels(np, read_nc("atlas.nc"), dtype=ops.dtype).smoothed(ops)


def mm(domain_length: float) -> float:
    """A length in domain units in mm (the box's 2π is 256 mm)."""
    return float(domain_length) * 256.0 / (2 * np.pi)


def forward_truth(precision: str = "float64"):
    """Our §3 forward solve of GLIA's patient: (ForwardResult, GLIA's c(1), GLIA's vt(1))."""
    from GBMMassEffectLib.forward import ForwardParams, run_forward

    ops, tissues = _glia_grid(precision)
    res = run_forward(ops, tissues, read_nc("patient_tumor_IC.nc").astype(ops.dtype), ForwardParams(**TRUTH))
    return res, read_nc("patient_tumor.nc"), read_nc("patient_vt.nc")


def _s3_row(r) -> dict:
    """The readings of one S.3 result (mass_effect_inversion.MassEffectResult) this script prints."""
    return {"gamma": r.gamma, "rho": r.rho, "kappa": r.kappa, "max_u_mm": mm(r.max_u),
            "relative_tumor_error": r.relative_tumor_error, "nit": r.nit, "n_forward": r.n_forward,
            "seconds": r.seconds, "message": r.message}


def write_patient(out: pathlib.Path, truth_max_u_mm: float | None) -> None:
    from GBMMassEffectLib import io

    (out / "patient").mkdir(parents=True, exist_ok=True)
    (out / "atlas").mkdir(parents=True, exist_ok=True)
    labels = np.rint(read_nc("patient.nc")).astype(np.uint8)
    io.write_image(_image(labels), out / "patient" / "patient_labels.nii.gz")
    io.write_image(_image((labels == 1).astype(np.uint8)), out / "patient" / "tumor_mask.nii.gz")
    io.write_image(_image(np.clip(read_nc("patient_tumor.nc"), 0, 1).astype(np.float32)),
                   out / "patient" / "tumor_concentration.nii.gz")
    io.write_image(_image(np.rint(read_nc("atlas.nc")).astype(np.uint8)), out / "atlas" / "glia_atlas.nii.gz")
    truth = dict(TRUTH, max_u_mm=truth_max_u_mm, source="GLIA testdata; parameters of GLIA scripts/forward.py",
                 seed_voxel_256=[137, 169, 96])
    (out / "patient" / "ground_truth.json").write_text(json.dumps(truth, indent=2))


def true_ic(start=(0.6, 8.0, 0.02), maxiter: int = 50) -> dict:
    """S.3 (Gauss-Newton, c0 fixed) on atlas.nc with GLIA's own c0 and data: Table 1's
    true-IC experiment on another solver's patient, 64³, concentration, O = 1, calibrate's
    optimiser."""
    from GBMMassEffectLib.mass_effect_inversion import MassEffectOptions, invert_mass_effect

    ops, tissues = _glia_grid()
    c0, d, vt = (read_nc(f) for f in ("patient_tumor_IC.nc", "patient_tumor.nc", "patient_vt.nc"))

    def progress(ev):
        par = " ".join(f"{k}={ev[k]:.4g}" for k in ("gamma", "rho", "kappa") if ev.get(k) is not None)
        print(f"  {ev.get('message')} ({par})", flush=True)

    r = invert_mass_effect(ops, tissues, c0, d, None, vt, initial=dict(zip(("gamma", "rho", "kappa"), start)),
                           options=MassEffectOptions(maxiter=maxiter, optimizer="gauss-newton", hessian=False, workers=2),
                           progress=progress)
    return _s3_row(r)


def data_path(sampling: str, snap: bool = False) -> dict:
    """S.3 with GLIA's c0 and atlas as calibrate sees them on the true atlas with an identity
    S.2: everything in calibrate's 64³ atlas box (box_for_image; its nodes half a voxel off
    atlas.nc's on two axes), atlas tissues as box fractions, c0 warped cubically, the patient's
    ventricles from its labels (fraction, smoothed), the ventricle mask of the tumour, and
    GLIA's c(1) sampled into the box `sampling` ("cubic": calibrate.concentration_to_box;
    "linear": the linear interpolation it used before 2026-12-07). snap: the atlas box moved
    to tile atlas.nc's voxels (geometry.snapped_to_image)."""
    import types

    import SimpleITK as sitk

    from GBMMassEffectLib.backend import get_backend
    from GBMMassEffectLib.calibrate import (concentration_to_box, onehot, supersample_factor,
                                            ventricles_observed, warp_fraction_to_box)
    from GBMMassEffectLib.geometry import box_for_image, snapped_to_image
    from GBMMassEffectLib.mass_effect_inversion import MassEffectOptions, invert_mass_effect
    from GBMMassEffectLib.simulate import box_tissues
    from GBMMassEffectLib.spectral import SpectralOps

    ops = SpectralOps(64, get_backend("cpu", "float64"))
    atlas = _image(np.rint(read_nc("atlas.nc")).astype(np.uint8))
    geom = box_for_image(atlas, 64, 256.0)
    if snap:
        geom = snapped_to_image(geom, atlas)
    tissues = box_tissues(geom, atlas, ops)
    c0 = np.clip(geom.to_box(_image(read_nc("patient_tumor_IC.nc").astype(np.float32)), "cubic", dtype=np.float64), 0, None)
    conc = _image(np.clip(read_nc("patient_tumor.nc"), 0, 1).astype(np.float32))
    identity = types.SimpleNamespace(forward=sitk.Transform(), inverse=sitk.Transform())
    d = (concentration_to_box(conc, geom, identity) if sampling == "cubic" else
         np.clip(geom.to_box(conc, "linear", dtype=np.float32), 0, 1)).astype(np.float64)
    labels = np.rint(read_nc("patient.nc")).astype(np.uint8)
    lab_img = _image(labels)
    arr = sitk.GetArrayFromImage(lab_img)
    m = supersample_factor(geom, SPACING_MM)
    vt = ops.smooth(warp_fraction_to_box(onehot(arr, [7], lab_img), identity, geom, m).astype(np.float64))
    vt_mask = ventricles_observed(warp_fraction_to_box(onehot(arr, [1], lab_img), identity, geom, m))
    r = invert_mass_effect(ops, tissues, c0 / c0.max(), d, None, vt, initial={"gamma": 0.6, "rho": 8.0, "kappa": 0.02},
                           options=MassEffectOptions(optimizer="gauss-newton", hessian=False, workers=2),
                           vt_mask=vt_mask)
    return {"sampling": sampling, **_s3_row(r),
            "box_offset_voxels": list((np.asarray(geom.origin) - np.asarray(atlas.GetOrigin())) / SPACING_MM)}


def report(path: pathlib.Path, truth: dict) -> None:
    rep = json.loads(path.read_text())
    print("| atlas | γ (eγ) | ρ (eρ) | κ (eκ) | max|u| mm (eu) |")
    print("| --- | --- | --- | --- | --- |")
    rows = [(a["name"], a) for a in rep["atlases"]] + [("mean", rep["summary"]["mean"])]
    for name, r in rows:
        cells = []
        for key in ("gamma", "rho", "kappa", "max_u_mm"):
            v, t = r.get(key), truth.get(key)
            cells.append("—" if v is None else f"{v:.4g} ({(v - t) / t:+.1%})" if t else f"{v:.4g}")
        print(f"| {name} | " + " | ".join(cells) + " |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=pathlib.Path)
    ap.add_argument("--check", action="store_true",
                    help="run our forward solve with the truth and compare with GLIA's c(1), vt(1) (64³, ~10–80 s)")
    ap.add_argument("--report", type=pathlib.Path, default=None, help="a calibrate report.json to compare")
    ap.add_argument("--true-ic", action="store_true",
                    help="S.3 with GLIA's own c0 on atlas.nc (Table 1's true-IC experiment; 64³, 20–40 min on 2 cores)")
    ap.add_argument("--data-path", choices=("cubic", "linear"), default=None,
                    help="S.3 with GLIA's c0 and atlas in calibrate's atlas box, c(1) sampled so (64³)")
    ap.add_argument("--snap", action="store_true", help="with --data-path: the atlas box tiles atlas.nc's voxels")
    args = ap.parse_args(argv)
    if args.true_ic or args.data_path:
        r = true_ic() if args.true_ic else data_path(args.data_path, args.snap)
        t = dict(TRUTH, max_u_mm=mm(forward_truth()[0].displacement_norm().max()))
        print(json.dumps(r, indent=2))
        print(" ".join(f"e{k} {(r[k] - t[k]) / t[k]:+.2%}" for k in ("gamma", "rho", "kappa", "max_u_mm")))
        return 0
    if args.report is not None:
        report(args.report, json.loads((args.out / "patient" / "ground_truth.json").read_text()))
        return 0
    max_u = None
    if args.check:
        res, c1, vt1 = forward_truth()
        rel = lambda a, b: float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))  # noqa: E731
        max_u = mm(res.displacement_norm().max())
        print(f"our c(1) vs GLIA's: {rel(res.c, c1):.2%}; vt(1): {rel(res.tissues.vt, vt1):.2%}; "
              f"max|u| {max_u:.2f} mm")
    write_patient(args.out, max_u)
    print(f"wrote {args.out / 'patient'} and {args.out / 'atlas'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
