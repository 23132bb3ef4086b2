"""`gbm-calibrate demo`: a synthetic patient from the bundled atlas set, then a calibration
(ISSUE 3 item 5; ARCHITECTURE.md "Other subcommands").

1. Patient: `simulate --preset tc-b` (MODEL §7: γ 0.4, ρ 12, κ 0.025) on the bundled atlas
   "mni152" (the first of the set when it is absent), seed point from the seed, grid n.
   Written to OUT/patient (BraTS tumor labels, T1-like image, ground_truth.json) with
   patient_labels.nrrd: the atlas labels moved by the simulated displacement at the
   atlas's own resolution, tumor labels on top (the calibration's tissue input).
2. Calibration (calibrate.run_calibrate) from the tumor labels and the deformed tissue
   labels with three atlases: the true one and the two others that the §6 ventricle
   rule ranks nearest. Written to OUT/calibration.
3. A short summary (recovered vs true κ, ρ, γ, max|u|; where the outputs are) printed to
   stdout and saved as OUT/demo_summary.json.

Default: grid 32 (8 mm box voxels), S.3 as calibrate runs it (c0 refit, Gauss-Newton) but
at most 8 iterations and no Hessian, affine registration on 4 mm grids, sized for 10–20
minutes on 2 CPU cores (timing in the README). --full: the paper setting, grid 128
on a CPU (256 with a GPU), the §6 atlas choice (up to 8 atlases, the true one included), S.3 and
registration at their defaults (hours on a CPU).
Output folder default: ./gbm-demo-output (relative to the current directory).
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass

from . import progress as pg

TRUE_ATLAS = "mni152"
#: S.3 iteration cap of the default demo (true atlas plus ONE other). With the partial-volume
#: tumour term and c0's translation (13–14 forward solves per iteration; 2026-12-07): 19.2 min
#: wall on 2 cores beside a 64³ calibration, S.1 4.2 min of it, each atlas's S.3 7.3 min, mean
#: γ 0.416 for 0.4, max|u| 9.84 mm for 10.02 (README); both atlases stop on the cap (the true
#: atlas at γ 0.456; converged, 15–20 iterations, +0.9%).
DEFAULT_S3_MAXITER = 8


@dataclass
class DemoOptions:
    out: str = "gbm-demo-output"
    full: bool = False
    preset: str = "tc-b"
    grid: int | None = None
    device: str = "auto"
    seed: int = 0
    text: bool = True  # human-readable lines on stdout (JSON lines when False)
    atlas_set: str = "bundled"  # or a manifest folder (its atlases need no T1)
    n_others: int = 1  # atlases besides the true one (default setting; --full: up to 7)
    options: dict | None = None  # solver options replacing the defaults' (tests: cheap settings)


class _Outputs:
    """Rollback over the output sets of both steps (the CLI holds one object)."""

    def __init__(self):
        self.sets: list = []

    def rollback(self):
        for s in reversed(self.sets):
            s.rollback()


def run_demo(opt: DemoOptions, outputs_holder: list | None = None, progress=None, cancel=None,
             stream=None) -> str:
    """Run the demo; returns the path of the calibration's report.json."""
    from .atlases import load_atlas_set, select_atlases, ventricle_volume_ml
    from .backend import get_backend
    from .calibrate import CalibrateJob, CalibrateOutputs, run_calibrate
    from .io import read_image

    stream = stream or sys.stdout
    t_start = time.perf_counter()
    gpu = get_backend(opt.device).name == "gpu"
    grid = opt.grid or ((256 if gpu else 128) if opt.full else 32)
    outs = _Outputs()
    if outputs_holder is not None:
        outputs_holder.append(outs)
    last_stage = [None]

    def say(text):
        if opt.text:
            print(text, file=stream, flush=True)

    def on_progress(d):
        if not opt.text:
            if progress is not None:
                progress(d)
            return
        key = (d.get("stage"), d.get("atlas_name") or d.get("atlas"))
        if key != last_stage[0] and d.get("stage") not in ("done",):
            last_stage[0] = key
            who = f" atlas {key[1]}" if key[1] is not None else ""
            say(f"  [{time.perf_counter() - t_start:6.0f} s] {d.get('stage')}{who}: {d.get('message', '')}")

    aset = load_atlas_set(opt.atlas_set)
    true = aset[TRUE_ATLAS] if TRUE_ATLAS in aset.names else aset[0]
    out = os.path.abspath(opt.out)
    say(f"GBMMassEffect demo: synthetic patient (preset {opt.preset}) from atlas '{true.name}', grid {grid}")

    outs.sets.append(CalibrateOutputs(out))  # removes OUT itself on rollback when this run made it
    # 1. synthetic patient
    pdir = os.path.join(out, "patient")
    pset = CalibrateOutputs(pdir)
    outs.sets.append(pset)
    def sim_progress(stage, fraction, message, **extra):
        on_progress({"stage": f"simulate:{stage}", "fraction": 0.1 * fraction, "message": message})

    truth, tissue = simulate_patient(true, pdir, pset, opt.preset, grid, opt.device, opt.seed,
                                     progress=sim_progress, cancel=cancel)

    # 2. calibration
    vt_ml = ventricle_volume_ml(read_image(tissue, "patient labels"))
    if opt.full:
        others = [c.atlas.name for c in select_atlases([a for a in aset if a.name != true.name], vt_ml,
                                                       max_atlases=7, min_atlases=3).choices]
        options = {}
    else:
        others = [c.atlas.name for c in select_atlases([a for a in aset if a.name != true.name], vt_ml,
                                                       max_atlases=opt.n_others, min_atlases=opt.n_others).choices]
        options = {"s3": {"maxiter": DEFAULT_S3_MAXITER, "hessian": False}}  # else calibrate's S.3
    if opt.options is not None:
        options = opt.options
    names = [true.name] + others
    say(f"calibrating with atlases {', '.join(names)} (true atlas: {true.name})")
    cdir = os.path.join(out, "calibration")
    job = CalibrateJob(tumor_labels=os.path.join(pdir, "tumor_labels.nrrd"), tissue_labels=tissue,
                       t1=os.path.join(pdir, "t1.nrrd"), atlas_set=opt.atlas_set, atlases=names, grid=grid,
                       device=opt.device, seed=opt.seed, out=cdir, options=options)
    cset = CalibrateOutputs(cdir)
    outs.sets.append(cset)
    report = run_calibrate(job, cset, progress=on_progress, cancel=cancel)

    # 3. summary
    rows = []
    for e in report["atlases"]:
        rows.append({"atlas": e["name"], "true_atlas": e["name"] == true.name,
                     **{k: e.get(k) for k in ("kappa", "rho", "gamma", "max_u_mm")}, "dropped": e["dropped"]})
    summary = {
        "preset": opt.preset, "grid": grid, "true_atlas": true.name,
        "truth": {k: truth[k] for k in ("kappa", "rho", "gamma", "max_u_mm")},
        "recovered_mean": report["mean"], "recovered_std": report["std"], "atlases": rows,
        "patient_folder": pdir, "calibration_folder": cdir,
        "report": os.path.join(cdir, "report.json"),
        "seconds": time.perf_counter() - t_start,
    }
    cset.write_json(os.path.join(out, "demo_summary.json"), summary)
    say(format_summary(summary))
    return os.path.join(cdir, "report.json")


def simulate_patient(true, pdir: str, outputs, preset: str, grid: int, device: str = "cpu", seed: int = 0,
                     progress=None, cancel=None, c0_max: float = 1.0) -> tuple[dict, str]:
    """The demo's synthetic patient: `simulate --preset` on the atlas `true` into pdir, and
    its tissue labels (simulate's patient_labels.nrrd: simulate.moved_labels with the tumour
    labels on top). Returns (ground_truth.json's dict, the tissue path)."""
    from .presets import get_preset
    from .simulate import SimulateOptions, run_simulate

    sim = SimulateOptions(labels=str(true.labels_path), out=pdir, preset=preset, grid=grid,
                          device=device, random_seed=seed, c0_max=c0_max)
    pr = get_preset(preset)
    sim.kappa, sim.rho, sim.gamma = pr.kappa, pr.rho, pr.gamma
    run_simulate(sim, outputs, progress=progress, cancel=cancel)
    with open(os.path.join(pdir, "ground_truth.json"), encoding="utf-8") as f:
        truth = json.load(f)
    return truth, os.path.join(pdir, "patient_labels.nrrd")


def format_summary(s: dict) -> str:
    t = s["truth"]

    def fmt(d):
        def f(k, spec):
            v = d.get(k)
            return "   n/a" if v is None else format(v, spec)
        return f"κ {f('kappa', '7.4f')}  ρ {f('rho', '6.2f')}  γ {f('gamma', '5.3f')}  max|u| {f('max_u_mm', '5.2f')} mm"

    lines = ["", f"Demo finished in {s['seconds'] / 60:.1f} min (grid {s['grid']}, preset {s['preset']}).",
             f"  truth          {fmt(t)}"]
    for r in s["atlases"]:
        tag = " (true atlas)" if r["true_atlas"] else ""
        drop = f"  dropped: {r['dropped']}" if r["dropped"] else ""
        lines.append(f"  {r['atlas']:<14s} {fmt(r)}{tag}{drop}")
    lines.append(f"  mean           {fmt(s['recovered_mean'])}")
    lines.append(f"Outputs: {s['calibration_folder']} (predicted_tumor.nrrd, displacement_norm.nrrd, report.json); "
                 f"synthetic patient: {s['patient_folder']}")
    return "\n".join(lines)


__all__ = ["DemoOptions", "run_demo", "format_summary", "pg"]
