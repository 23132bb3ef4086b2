"""What S.3 makes of BraTS labels when everything else is true (ACCURACY.md, session 20).

    python benchmarks/label_data.py PATIENT ATLAS_LABELS [--grid N] [--maxiter 30]

PATIENT is a `gbm-calibrate simulate` folder made from ATLAS_LABELS. The script rebuilds
the patient's true c0 and atlas tissues in the box, then runs S.3 (c0 fixed at the true c0,
the true atlas, no registration, the patient's ventricles the model's own vt(1), started
10% off) on several readings of the patient's BraTS labels (tumor_labels.nrrd, read as
calibrate reads them: core = necrotic ∪ enhancing as box fractions, edema likewise) and
prints a markdown table of the recovered γ, ρ, κ. The concentration row is the reference:
what the same S.3 recovers from the tumour concentration itself. The label rows: §5's core
indicator smoothed one box voxel with O = 0 on edema (what calibrate does), half and a
quarter of a voxel, unsmoothed, the
core's box fraction unsmoothed, the label band, the labels as partial volumes (S.3's
tumor_misfit "fraction": the core's and the whole tumour's box fractions against the shares
of each voxel above the thresholds that c(1) predicts), and the indicator and the band with the edema read as the whole
tumour's fraction > 0.5 outside the core (a mixed voxel of core and edema is then edema).
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
    ap.add_argument("--only", nargs="*", default=None, help="run only the rows whose name starts with these")
    args = ap.parse_args(argv)

    import numpy as np
    import SimpleITK as sitk

    from GBMMassEffectLib import io
    from GBMMassEffectLib.backend import to_numpy
    from GBMMassEffectLib.calibrate import concentration_to_box
    from GBMMassEffectLib.mass_effect_inversion import MassEffectOptions, invert_mass_effect
    from GBMMassEffectLib.observation import observation_operator
    from GBMMassEffectLib.presets import BRATS_LABELS

    pt = rebuild(args.patient, args.atlas, args.grid)
    ops, geom, T, c0, truth, fwd, vt = pt.ops, pt.geom, pt.tissues, pt.c0, pt.truth, pt.forward, pt.vt
    n, xp = ops.n, ops.xp

    tl = sitk.ReadImage(str(args.patient / "tumor_labels.nrrd"))
    arr = sitk.GetArrayFromImage(tl)
    core_img = io.image_like(np.isin(arr, [BRATS_LABELS["necrotic"], BRATS_LABELS["enhancing"]]).astype(np.float32), tl)
    edema_img = io.image_like((arr == BRATS_LABELS["edema"]).astype(np.float32), tl)
    core = xp.asarray(geom.to_box(core_img, "fraction", dtype=np.float64))
    edema = xp.asarray(geom.to_box(edema_img, "fraction", dtype=np.float64))
    O = observation_operator(ops, core, edema)
    whole = xp.asarray(geom.to_box(io.image_like((arr > 0).astype(np.float32), tl), "fraction", dtype=np.float64))
    edema_w = ((whole > 0.5) & (core <= 0.5)).astype(np.float64)  # the whole tumour's fraction > 0.5
    O_w = observation_operator(ops, core, edema_w)
    ind = (core > 0.5).astype(np.float64)
    conc = xp.asarray(np.clip(concentration_to_box(sitk.ReadImage(str(args.patient / "tumor_concentration.nrrd")),
                                                   geom), 0, 1))

    c1 = np.clip(to_numpy(fwd.c), 0, 1)
    on_core = to_numpy(ind) > 0
    print(f"{args.patient}: truth γ {truth['gamma']}, ρ {truth['rho']}, κ {truth['kappa']}; {n}³, true c0 and "
          f"atlas, S.3 from 10% off; true c(1) on the core: mean {c1[on_core].mean():.3f}, "
          f"min {c1[on_core].min():.3f}\n")

    d_cal = ops.smooth(ind)  # calibrate's d
    own = (O, (core, edema))  # the observation and the band's labels, edema as its own fraction
    whole_ = (O_w, (core, edema_w))  # … edema as the whole tumour's fraction outside the core
    rows = [  # name, d, (O, labels), option overrides
        ("concentration (reference)", conc, (None, None), {}),
        ("indicator smoothed one voxel, O (calibrate now)", d_cal, own, {}),
        ("indicator smoothed one voxel, κ held at 0.02", d_cal, own, {"kappa_bounds": (0.01999, 0.02001)}),
        ("indicator smoothed half a box voxel, O", ops.smooth(ind, 0.5 * ops.h), own, {}),
        ("indicator smoothed a quarter box voxel, O", ops.smooth(ind, 0.25 * ops.h), own, {}),
        ("indicator unsmoothed, O", ind, own, {}),
        ("core fraction unsmoothed, O", core, own, {}),
        ("label band (edema: its own fraction > 0.5)", d_cal, own, {"tumor_misfit": "band"}),
        ("labels as partial volumes (tumor_misfit fraction)", d_cal, own, {"tumor_misfit": "fraction"}),
        ("indicator smoothed one voxel, O from the whole tumour", d_cal, whole_, {}),
        ("band from the whole tumour", d_cal, whole_, {"tumor_misfit": "band"}),
    ]
    start = {"gamma": 1.1 * truth["gamma"], "rho": 0.9 * truth["rho"], "kappa": 1.1 * truth["kappa"]}
    e = lambda v, t: f"{v:.4g} ({100 * (v / t - 1):+.1f}%)"  # noqa: E731
    print("| data | γ | ρ | κ | rel. tumour misfit | its | s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, d, (o, labels), extra in rows:
        if args.only and not any(name.startswith(p) for p in args.only):
            continue
        opt = MassEffectOptions(maxiter=args.maxiter, hessian=False, optimizer="gauss-newton", **extra)
        t = time.perf_counter()
        r = invert_mass_effect(ops, T, c0, d, o, vt, initial=start, options=opt, tumor_labels=labels)
        print(f"| {name} | {e(r.gamma, truth['gamma'])} | {e(r.rho, truth['rho'])} | "
              f"{e(r.kappa, truth['kappa'])} | {r.relative_tumor_error:.3f} | {r.nit} | "
              f"{time.perf_counter() - t:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
