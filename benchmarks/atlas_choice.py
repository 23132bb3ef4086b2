"""Which atlases each choice rule picks for synthetic patients whose true atlas is known.

    gbm-calibrate simulate --labels Resources/Atlases/sri24_labels.nrrd --preset tc-c \
        --kappa 0.015 --rho 8 --gamma 0.6 --grid 32 --out /tmp/P1
    python benchmarks/atlas_choice.py /tmp/P1:sri24 [/tmp/P2:colin27 ...] [--atlases 2]

For each patient folder (simulate's output: tumor_labels.nrrd and patient_labels.nrrd, or
patient_tissue_labels.nrrd from demo_patient.py) every atlas of the bundled set is registered
as calibrate registers it for the choice (S.2's affine stage on the tissue channels, tumour
masked), and one markdown row is printed: whether the tumour borders the ventricles
(calibrate's condition for this choice; otherwise §6's applies), the patient's visible ventricles, the true
atlas's ventricles outside the registered tumour over the visible ones, the true atlas's
rank by the registration match score (mean Dice of the tissue channels outside the
tumour), the atlases §6's window [1, 1.3] picks on visible against outside-tumour volumes
(calibrate's rule until 2026-12-02) and those select_atlases_by_match picks (today's rule).
About 1.5 s per atlas at --grid 32. See benchmarks/ACCURACY.md, "Atlas choice when the
tumour hides ventricles"."""
from __future__ import annotations

import argparse
import math
import os
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from GBMMassEffectLib import calibrate as C  # noqa: E402
from GBMMassEffectLib.atlases import WINDOW, load_atlas_set, ventricle_volume_ml  # noqa: E402


def patient_row(folder: str, truth: str, aset, n_atlases: int, grid: int) -> str:
    tissue = os.path.join(folder, "patient_tissue_labels.nrrd")
    if not os.path.exists(tissue):
        tissue = os.path.join(folder, "patient_labels.nrrd")
    job = C.CalibrateJob.from_dict({"tumor_labels": os.path.join(folder, "tumor_labels.nrrd"),
                                    "tissue_labels": tissue, "grid": grid, "n_atlases": n_atlases})
    patient = C.read_patient(job)
    visible = ventricle_volume_ml(patient.tissue)
    regs, outside = C._register_affine_all(job, patient, aset, patient.tissue, job.registration_options(),
                                           job.box_mm / grid, C._as_progress(None), None)
    score = {n: r.score for n, r in regs.items()}
    ratio = {n: v / visible for n, v in outside.items()}
    near = sorted(ratio, key=lambda n: (abs(math.log(max(ratio[n], 1e-9))), n))
    old = [n for n in near if WINDOW[0] <= ratio[n] <= WINDOW[1]][:n_atlases]
    old += [n for n in near if n not in old][: n_atlases - len(old)]
    new = [a.name for a in C._select_by_match(job, list(aset), regs).atlases]
    rank = sorted(score, key=lambda n: -score[n]).index(truth) + 1

    def names(ns):
        return ", ".join(f"{n} ({aset[n].ventricle_ml:.0f})" for n in ns)

    borders = "yes" if C.tumor_borders_ventricles(patient.tissue, patient) else "no (§6 applies)"
    return (f"| {pathlib.Path(folder).name} | {borders} | {truth} ({aset[truth].ventricle_ml:.1f}) | {visible:.1f} | "
            f"{ratio[truth]:.2f} | {rank} of {len(aset)} | {names(old)} | {names(new)} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("patients", nargs="+", metavar="FOLDER:TRUE_ATLAS")
    ap.add_argument("--atlases", type=int, default=2, help="atlases each rule picks (default 2)")
    ap.add_argument("--grid", type=int, default=32)
    args = ap.parse_args(argv)
    aset = load_atlas_set()
    print("| patient | tumour borders the ventricles | true atlas (ventricles mL) | visible ventricles mL | true atlas: outside / visible "
          "| true atlas's match rank | visible vs outside, [1, 1.3] | match (calibrate) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for p in args.patients:
        folder, _, truth = p.rpartition(":")
        print(patient_row(folder, truth, aset, args.atlases, args.grid), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
