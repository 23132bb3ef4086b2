"""A `gbm-calibrate simulate` patient rebuilt from its ground_truth.json in the box (shared by
data_path.py and label_data.py)."""
from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass


def add_patient_arguments(ap) -> None:
    """PATIENT ATLAS [--grid N] [--maxiter K] on an argparse parser."""
    ap.add_argument("patient", type=pathlib.Path, help="a gbm-calibrate simulate output folder")
    ap.add_argument("atlas", type=pathlib.Path, help="the label map it was made from")
    ap.add_argument("--grid", type=int, default=None, help="box grid (default: the patient's)")
    ap.add_argument("--maxiter", type=int, default=30, help="S.3 iterations at most")


@dataclass
class PatientTruth:
    ops: object  # SpectralOps, CPU float64
    geom: object  # BoxGeometry of the atlas image
    labels: object  # the atlas label map (sitk.Image)
    tissues: object  # the atlas's box tissues at t = 0
    c0: object  # the true initial condition in the box
    truth: dict  # kappa, rho, gamma
    forward: object  # ForwardResult of the truth
    vt: object  # the model's vt(1), smoothed one voxel (S.3's patient ventricles)


def rebuild(patient: pathlib.Path, atlas: pathlib.Path, grid: int | None = None) -> PatientTruth:
    """The patient's true c0, atlas tissues and forward solution on its box (or on `grid`)."""
    import numpy as np

    from GBMMassEffectLib import io
    from GBMMassEffectLib.backend import get_backend
    from GBMMassEffectLib.forward import ForwardParams, run_forward
    from GBMMassEffectLib.geometry import box_for_image
    from GBMMassEffectLib.simulate import box_tissues, initial_condition
    from GBMMassEffectLib.spectral import SpectralOps

    gt = json.loads((patient / "ground_truth.json").read_text())
    labels = io.read_label_map(str(atlas), what="atlas label map")
    n = grid or int(gt["grid"])
    geom = box_for_image(labels, n, float(gt["box_mm"]))
    ops = SpectralOps(n, get_backend("cpu", "float64"))
    T = box_tissues(geom, labels, ops)
    c0, _ = initial_condition(ops, geom, T, np.asarray(gt["seed"]["lps_mm"]), float(gt["sigma_voxels"]),
                              float(gt["c0_max"]))
    truth = {k: float(gt[k]) for k in ("kappa", "rho", "gamma")}
    fwd = run_forward(ops, T, c0, ForwardParams(**truth, nt=int(gt["nt"]), dt=float(gt["dt"])))
    return PatientTruth(ops, geom, labels, T, c0, truth, fwd, ops.smooth(fwd.tissues.vt))
