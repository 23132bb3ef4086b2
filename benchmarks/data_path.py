"""How the way a tumour concentration reaches the box biases S.3 (ACCURACY.md, session 19).

    python benchmarks/data_path.py PATIENT ATLAS_LABELS [--grid 32] [--spread-only]

PATIENT is a `gbm-calibrate simulate` folder made from ATLAS_LABELS (its ground_truth.json
gives the seed and κ, ρ, γ). The script rebuilds the patient's box solution from the truth,
then runs S.3 (c0 fixed at the true c0, the true atlas, no registration, started 10% off)
on four versions of the same data and prints a markdown table of the recovered γ, ρ, κ:

- the box solution itself (the inverse crime: every error should be ~0);
- drawn onto the input image linearly, then the voxel mean over each box voxel (how
  calibrate read a concentration before session 19);
- drawn linearly, sampled at the box nodes (calibrate.concentration_to_box);
- drawn with cubic B-splines (what simulate writes now), sampled at the box nodes.

calibrate.concentration_to_box interpolates linearly until 2026-12-07 and with cubic
B-splines since (ACCURACY.md, section of that date): on P1 the last two rows' spreads went
from +0.04 and +0.006 voxel² per axis to +0.02–0.03 and +0.000.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    from patient_truth import add_patient_arguments, rebuild

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_patient_arguments(ap)
    ap.add_argument("--spread-only", action="store_true", help="print the spreads, skip S.3")
    args = ap.parse_args(argv)

    import numpy as np
    import SimpleITK as sitk

    from GBMMassEffectLib.backend import to_numpy
    from GBMMassEffectLib.calibrate import concentration_to_box
    from GBMMassEffectLib.mass_effect_inversion import MassEffectOptions, invert_mass_effect

    pt = rebuild(args.patient, args.atlas, args.grid)
    ops, geom, labels, T, c0, truth, fwd, vt = (pt.ops, pt.geom, pt.labels, pt.tissues, pt.c0, pt.truth,
                                                 pt.forward, pt.vt)
    n = ops.n
    c1 = np.clip(to_numpy(fwd.c).astype(np.float64), 0, 1)  # as every path below clips

    def drawn(kind):  # as simulate draws c(1) onto its input image
        return sitk.Clamp(geom.from_box(c1.astype(np.float32), labels, kind), sitk.sitkFloat32, 0.0, 1.0)

    lin, cub = drawn("linear"), drawn("cubic")
    variants = [
        ("the box solution itself", c1),
        ("linear drawing, voxel mean", geom.to_box(lin, "fraction", dtype=np.float64)),
        ("linear drawing, sampled", concentration_to_box(lin, geom)),
        ("cubic drawing, sampled", concentration_to_box(cub, geom)),
    ]

    tumour = c1 > 0.02  # the spread where the tumour is (the tails' sign changes would dominate)

    def variance(a):
        idx = np.indices(a.shape).reshape(3, -1).astype(float)
        w = np.where(tumour, a, 0.0).ravel()
        w = w / w.sum()
        mu = idx @ w
        return ((idx - mu[:, None]) ** 2) @ w

    opt = MassEffectOptions(maxiter=args.maxiter, hessian=False)
    start = {"gamma": 1.1 * truth["gamma"], "rho": 0.9 * truth["rho"], "kappa": 1.1 * truth["kappa"]}
    e = lambda v, t: f"{v:.4g} ({100 * (v / t - 1):+.1f}%)"  # noqa: E731
    print(f"{args.patient}: truth γ {truth['gamma']}, ρ {truth['rho']}, κ {truth['kappa']}; {n}³, true c0 and "
          f"atlas, S.3 from 10% off\n")
    print("| data | spread − the box's (voxel², per axis, where c > 0.02) | γ | ρ | κ | its | s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    v0 = variance(c1)
    for name, d in variants:
        d = np.clip(np.asarray(d, np.float64), 0, 1)
        dv = ", ".join(f"{v:+.3f}" for v in variance(d) - v0)
        if args.spread_only:
            print(f"| {name} | {dv} | | | | | |")
            continue
        t = time.perf_counter()
        r = invert_mass_effect(ops, T, c0, ops.xp.asarray(d), None, vt, initial=start, options=opt)
        print(f"| {name} | {dv} | {e(r.gamma, truth['gamma'])} | {e(r.rho, truth['rho'])} | "
              f"{e(r.kappa, truth['kappa'])} | {r.nit} | {time.perf_counter() - t:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
