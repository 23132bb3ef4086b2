"""A demo-style synthetic patient and a calibrate job for it, at any preset and grid.

    python benchmarks/demo_patient.py --preset tc-c --grid 64 --out /tmp/tc-c-64 \
        --atlases mni152 --s3-maxiter 12
    gbm-calibrate calibrate --job /tmp/tc-c-64

What `gbm-calibrate demo` does before it calibrates (demo.py), without the calibration:
`simulate --preset P --grid N` on the bundled true atlas (the patient, written to
OUT/patient: BraTS labels drawn from c(1), c(1) itself, the T1, ground_truth.json), the
patient's tissue labels (the atlas's labels moved by the simulated displacement, tumour
labels on top: demo.simulate_patient), and OUT/job.json for `calibrate --job OUT`: those
labels (or, with `--data concentration`, c(1) as the tumour input), grid N (or
`--calibrate-grid`), the named atlases (default: §6's choice of `--n-atlases`) and the S.3 options given. Compare
OUT/out/report.json with OUT/patient/ground_truth.json (γ, ρ, κ, max_u_mm)."""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from GBMMassEffectLib.atlases import load_atlas_set  # noqa: E402
from GBMMassEffectLib.calibrate import CalibrateOutputs  # noqa: E402
from GBMMassEffectLib.demo import TRUE_ATLAS, simulate_patient  # noqa: E402
from GBMMassEffectLib.presets import PRESETS  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tc-b", choices=sorted(PRESETS))
    ap.add_argument("--grid", type=int, default=64, help="simulation grid n (and calibration grid by default)")
    ap.add_argument("--calibrate-grid", type=int, default=None,
                    help="the job's calibration grid when it differs from the simulation's (a patient made at "
                         "64³ and calibrated at 32³ is not the inverse crime of one grid)")
    ap.add_argument("--out", type=pathlib.Path, required=True)
    ap.add_argument("--atlases", nargs="*", default=None, help="atlases to name in the job (default: §6's choice)")
    ap.add_argument("--n-atlases", type=int, default=2, help="atlases §6 chooses when none are named")
    ap.add_argument("--s3-maxiter", type=int, default=None, help="S.3 iteration cap (default calibrate's)")
    ap.add_argument("--c0-max", type=float, default=None, help="S.3's max(c0) (job option s3.c0_max; default 1)")
    ap.add_argument("--seed-max", type=float, default=1.0,
                    help="peak of the patient's seed (simulate --c0-max; default 1, §5; (n/256)³ gives it "
                         "the mass of the paper's 1 mm seed)")
    ap.add_argument("--data", choices=("labels", "concentration"), default="labels",
                    help="the job's tumour input: simulate's BraTS labels (the demo's) or its c(1)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    true = load_atlas_set("bundled")[TRUE_ATLAS]
    pdir = os.path.abspath(args.out / "patient")
    truth, tissue = simulate_patient(true, pdir, CalibrateOutputs(pdir), args.preset, args.grid, "cpu", args.seed,
                                     c0_max=args.seed_max)
    s3 = {"hessian": False}
    if args.s3_maxiter:
        s3["maxiter"] = args.s3_maxiter
    if args.c0_max is not None:
        s3["c0_max"] = args.c0_max
    tumor = {"labels": ("tumor_labels", "tumor_labels.nrrd"),
             "concentration": ("tumor_concentration", "tumor_concentration.nrrd")}[args.data]
    job = {tumor[0]: os.path.join(pdir, tumor[1]), "tissue_labels": tissue,
           "t1": os.path.join(pdir, "t1.nrrd"), "grid": args.calibrate_grid or args.grid, "device": "cpu", "seed": args.seed,
           "out": os.path.abspath(args.out / "out"), "options": {"s3": s3}}
    if args.atlases:
        job["atlases"] = args.atlases
    else:
        job["n_atlases"] = args.n_atlases
    (args.out / "job.json").write_text(json.dumps(job, indent=2))
    print(f"patient {pdir}: γ {truth['gamma']}, ρ {truth['rho']}, κ {truth['kappa']}, "
          f"max|u| {truth['max_u_mm']:.2f} mm; job {args.out / 'job.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
