"""Command line: ``python -m GBMMassEffectLib <subcommand>`` / ``gbm-calibrate``
(ARCHITECTURE.md, "The process boundary").

Every line on stdout is one JSON object: progress events, then a result event naming
report.json, or one error event. Exit codes (progress.py): 0 complete output, 1 run-time
failure, 2 bad input or usage, 143 cancelled by SIGTERM (130 by SIGINT); a failed or
cancelled run removes what it wrote. No tracebacks reach the user (set GBM_DEBUG=1 to get
them on stderr).

simulate: a forward run of the §3 model from a label map and parameters (synthetic
patients). Defaults: κ 0.025, ρ 12, γ 0.4 (TC(b)); --sigma-voxels 1 (the width of the
§5 basis atoms, in box voxels: L/n mm, 8 mm at --grid 32, 4 mm at 64, 1 mm at 256);
--grid 64; nt 25, dt 0.04 (26 steps, MODEL §3); --box-mm 256. --preset tc-a … tc-d sets
κ, ρ, γ of MODEL §7 (explicit --kappa/--rho/--gamma override them) and also writes the
synthetic patient (BraTS labels, T1-like image, ground_truth.json; presets.py).

calibrate: the multistage calibration (calibrate.py): --job DIR reads DIR/job.json
(outputs in DIR/out unless "out" says otherwise); the same settings as flags (--tumor-seg
| --tumor-core [--edema] | --tumor-concentration, --tissue-seg, --t1, --atlas-set,
--atlases K, --grid, --device, --seed, --options JSON, --out) override the job's.
Outputs: predicted_tumor, displacement_norm (mm), displacement_norm_std, displacement
(LPS mm), initial_condition (.nrrd, patient grid), atlas_<name>/, report.json last.

cohort: many calibrate job folders as (patient, atlas) tasks on Dask (cohort.py): --jobs
DIR... (folders with job.json, or their parents), --out (cohort_report.json and
cohort_summary.csv), --scheduler ADDRESS or a local cluster of --workers processes. Exit 0
when every patient completed; 1 (result line listing the failed) when some did not.

demo: a synthetic patient (preset tc-b) from the bundled atlas set, calibrated with the
true atlas and one other at grid 32 (demo.py); human-readable lines unless --json;
--full selects the paper setting; outputs in ./gbm-demo-output by default.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback

from . import __version__
from . import progress as pg


class UsageError(ValueError):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one JSON error line (exit 2)."""

    def error(self, message):
        raise UsageError(f"{self.prog}: {message}")


def _triple(text: str) -> tuple:
    parts = [p for p in text.replace(" ", ",").split(",") if p]
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers, got {text!r}")
    try:
        return tuple(float(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three numbers, got {text!r}") from None


_VECTOR_OPTIONS = ("--seed-ijk", "--seed-ras")


def _join_negative_vectors(argv: list[str]) -> list[str]:
    """'--seed-ras -20,5,3' → '--seed-ras=-20,5,3' (argparse would take -20,5,3 for an option)."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        nxt = argv[i + 1] if i + 1 < len(argv) else ""
        if a in _VECTOR_OPTIONS and nxt[:1] == "-" and (nxt[1:2].isdigit() or nxt[1:2] == "."):
            out.append(f"{a}={argv[i + 1]}")
            i += 2
            continue
        out.append(a)
        i += 1
    return out


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="gbm-calibrate",
                description="Glioblastoma growth model with mass effect: solver command line.")
    p.add_argument("--version", action="version", version=f"GBMMassEffectLib {__version__}")
    sub = p.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")
    sub.required = True

    s = sub.add_parser("simulate", help="forward run from a label map (synthetic patient)")
    s.add_argument("--labels", required=True, help="label map (NIfTI/NRRD): 0 bg, 5 gm, 6 wm, 7 vt, 8 csf")
    seed = s.add_mutually_exclusive_group()
    seed.add_argument("--seed-ijk", type=_triple, metavar="I,J,K",
                      help="tumor seed as a (fractional) voxel index of the label map")
    seed.add_argument("--seed-ras", type=_triple, metavar="X,Y,Z", help="tumor seed in RAS mm")
    s.add_argument("--preset", choices=["tc-a", "tc-b", "tc-c", "tc-d"],
                   help="paper test case (MODEL §7); also writes the synthetic patient")
    s.add_argument("--seed", type=int, default=None, dest="random_seed",
                   help="random seed (preset seed point without --seed-ijk/--seed-ras, T1 noise)")
    s.add_argument("--kappa", type=float, default=None, help="migration κ (paper units; default 0.025)")
    s.add_argument("--rho", type=float, default=None, help="proliferation ρ (default 12)")
    s.add_argument("--gamma", type=float, default=None, help="mass effect γ (default 0.4)")
    s.add_argument("--sigma-voxels", type=float, default=1.0,
                   help="width of the c0 Gaussian in box voxels (default 1, the §5 atom)")
    s.add_argument("--c0-max", type=float, default=1.0,
                   help="peak of c0 (default 1, §5; (n/256)^3 gives the seed the mass of the paper's "
                        "1 mm seed at grid n)")
    s.add_argument("--grid", type=int, default=64, help="box voxels per axis n (even; default 64)")
    s.add_argument("--nt", type=int, default=25, help="time steps nt (nt+1 steps are taken; default 25)")
    s.add_argument("--dt", type=float, default=0.04, help="time step (default 0.04)")
    s.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    s.add_argument("--precision", choices=["float32", "float64"], default="float32")
    s.add_argument("--box-mm", type=float, default=256.0, help="physical box edge L in mm (default 256)")
    s.add_argument("--out", required=True, help="output folder")

    _add_calibrate(sub)
    _add_demo(sub)
    _add_cohort(sub)
    return p


def _add_calibrate(sub) -> None:
    c = sub.add_parser("calibrate", help="calibrate κ, ρ, γ for a patient (S.1 → S.2 → S.3 per atlas)",
                       description="Calibrate a patient: --job DIR (DIR/job.json; outputs in DIR/out) "
                                   "and/or the same settings as flags (flags override job.json).")
    c.add_argument("--job", metavar="DIR", help="job folder holding job.json")
    c.add_argument("--tumor-seg", dest="tumor_labels", help="tumor label map: BraTS 1 necrotic, 2 edema, 4 enhancing "
                   "(3, BraTS 2023's enhancing or older BraTS's non-enhancing core, counts as core)")
    c.add_argument("--tumor-core", dest="tumor_core", help="binary tumor-core mask (instead of --tumor-seg)")
    c.add_argument("--edema", help="binary edema mask (with --tumor-core)")
    c.add_argument("--tumor-concentration", dest="tumor_concentration",
                   help="tumor concentration c(1) in [0, 1] (synthetic studies)")
    c.add_argument("--tissue-seg", dest="tissue_labels",
                   help="tissue label map 5 gm, 6 wm, 7 vt, 8 csf (optional with --t1: then derived "
                        "from the best-registered atlas)")
    c.add_argument("--t1", help="patient T1 image (optional with --tissue-seg)")
    c.add_argument("--atlas-set", dest="atlas_set", nargs="+", metavar="PATH",
                   help="atlas set: 'bundled' (default), a folder with atlases.json, or label-map files")
    c.add_argument("--atlas-names", dest="atlases", metavar="A,B,..",
                   help="use these atlases of the set (skips the ventricle-volume choice)")
    c.add_argument("--atlases", dest="n_atlases", type=int, metavar="K",
                   help="number of atlases (default: the MODEL §6 rule, 4 to 8)")
    c.add_argument("--grid", type=int, help="box voxels per axis n (even, >= 16; default 64)")
    c.add_argument("--device", choices=["auto", "cpu", "gpu"])
    c.add_argument("--precision", choices=["float32", "float64"])
    c.add_argument("--seed", type=int, help="random seed (recorded; default 0)")
    c.add_argument("--box-mm", dest="box_mm", type=float, help="physical box edge L in mm (default 256)")
    c.add_argument("--gamma0", type=float, help="S.3 starting γ (default 0.6)")
    c.add_argument("--predict-times", dest="predict_times", metavar="T1,T2",
                   help="also predict the tumor at these later times (e.g. 1.2,1.5)")
    c.add_argument("--options", metavar="JSON",
                   help='solver options as JSON text or a .json file: {"s1": {...}, "s3": {...}, '
                        '"registration": {...}}')
    c.add_argument("--out", help="output folder (default DIR/out with --job)")


def _add_demo(sub) -> None:
    d = sub.add_parser("demo", help="synthetic patient from the bundled atlas set, then calibrate",
                       description="Build a synthetic patient (preset tc-b) from one bundled atlas and "
                                   "calibrate it with the true atlas and one other; prints a summary. "
                                   "Default: grid 32, 10-20 minutes on 2 CPU cores (measured, README).")
    d.add_argument("--out", default="gbm-demo-output", help="output folder (default ./gbm-demo-output)")
    d.add_argument("--full", action="store_true", help="the paper setting: grid 128 (256 on a GPU), up to 8 atlases")
    d.add_argument("--preset", choices=["tc-a", "tc-b", "tc-c", "tc-d"], default="tc-b")
    d.add_argument("--grid", type=int, default=None, help="box grid n (default 32; --full: 128/256)")
    d.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--atlas-set", dest="atlas_set", default="bundled",
                   help="atlas set folder (default: the bundled set; the first atlas 'mni152' or the set's first is the true one)")
    d.add_argument("--json", action="store_true", help="JSON progress lines instead of text (the process contract)")


def _add_cohort(sub) -> None:
    k = sub.add_parser("cohort", help="many patients: their (patient, atlas) tasks on Dask",
                       description="Calibrate many patients, each a calibrate job folder (DIR/job.json, "
                                   "outputs in DIR/out as with calibrate --job), as independent "
                                   "(patient, atlas) tasks on Dask distributed (cohort.py).")
    k.add_argument("--jobs", nargs="+", required=True, metavar="DIR",
                   help="job folders (each holding job.json), or folders whose sub-folders are")
    k.add_argument("--out", default="gbm-cohort-output",
                   help="folder for cohort_report.json and cohort_summary.csv (default ./gbm-cohort-output)")
    k.add_argument("--scheduler", metavar="ADDRESS", help="a running Dask scheduler (default: a local cluster)")
    k.add_argument("--workers", type=int, help="local worker processes (default: half the CPUs)")
    k.add_argument("--threads-per-worker", dest="threads_per_worker", type=int, default=1,
                   help="threads per local worker (default 1)")


def _open_outputs(folder: str, outputs_holder: list, outputs_cls):
    """The command's atomic output set in `folder` (registered for rollback on failure or
    SIGTERM) and the path of its report.json, a stale copy of which is removed first."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UsageError(f"--out {folder} exists and is not a folder")
    try:
        outputs = outputs_cls(folder)
    except OSError as exc:
        raise UsageError(f"cannot create output folder {folder}: {exc.strerror}") from None
    outputs_holder.append(outputs)
    report_path = os.path.join(outputs.folder, "report.json")
    if os.path.exists(report_path):  # a stale marker of completeness from an earlier run
        os.remove(report_path)
    return outputs, report_path


def _calibrate(args, outputs_holder: list, token: pg.CancelToken) -> int:
    import json as _json

    from .calibrate import CalibrateJob, CalibrateOutputs, run_calibrate

    base: dict = {}
    if args.job:
        job = CalibrateJob.from_job_dir(args.job)
        base = job.to_dict()
    flags = {k: getattr(args, k) for k in ("tumor_labels", "tumor_core", "edema", "tumor_concentration",
                                           "tissue_labels", "t1", "atlas_set", "atlases", "n_atlases", "grid",
                                           "device", "precision", "seed", "box_mm", "gamma0", "predict_times",
                                           "out")}
    flags = {k: v for k, v in flags.items() if v is not None}
    if "atlas_set" in flags and len(flags["atlas_set"]) == 1:
        flags["atlas_set"] = flags["atlas_set"][0]
    if "atlases" in flags:
        flags["atlases"] = [a for a in flags["atlases"].split(",") if a]
    if "predict_times" in flags:
        try:
            flags["predict_times"] = [float(t) for t in flags["predict_times"].split(",") if t]
        except ValueError:
            raise UsageError(f"--predict-times expects numbers like 1.2,1.5, got {args.predict_times!r}") from None
    if args.options:
        text = args.options
        if os.path.isfile(text):
            with open(text, encoding="utf-8") as f:
                text = f.read()
        try:
            flags["options"] = _json.loads(text)
        except _json.JSONDecodeError as exc:
            raise UsageError(f"--options is not valid JSON: {exc}") from None
    if not args.job and not flags:
        raise UsageError("calibrate needs --job DIR or the input flags (--tumor-seg, --tissue-seg/--t1, --out)")
    for k in ("tumor_labels", "tumor_core", "tumor_concentration"):  # a flag tumor replaces the job's
        if k in flags:
            for other in ("tumor_labels", "tumor_core", "tumor_concentration"):
                if other != k and other not in flags:
                    base[other] = None
    job = CalibrateJob.from_dict({**base, **flags})
    job.validate()
    outputs, report_path = _open_outputs(job.out, outputs_holder, CalibrateOutputs)
    run_calibrate(job, outputs, progress=lambda d: pg.emit({"event": "progress", **d}), cancel=token)
    token.finish()
    pg.result(report_path)
    return pg.EXIT_OK


def _demo(args, outputs_holder: list, token: pg.CancelToken) -> int:
    from .demo import DemoOptions, run_demo

    opt = DemoOptions(out=args.out, full=args.full, preset=args.preset, grid=args.grid, device=args.device,
                      seed=args.seed, text=not args.json, atlas_set=args.atlas_set)
    report_path = run_demo(opt, outputs_holder, progress=lambda d: pg.emit({"event": "progress", **d}),
                           cancel=token)
    token.finish()
    if args.json:
        pg.result(report_path)
    return pg.EXIT_OK


def _simulate(args, outputs_holder: list, token: pg.CancelToken) -> int:
    from .presets import get_preset
    from .simulate import SimulateOptions, run_simulate

    defaults = {"kappa": 0.025, "rho": 12.0, "gamma": 0.4}
    if args.preset:
        pr = get_preset(args.preset)
        defaults = {"kappa": pr.kappa, "rho": pr.rho, "gamma": pr.gamma}
    if not args.preset and args.seed_ijk is None and args.seed_ras is None:
        raise UsageError("simulate needs --seed-ijk I,J,K or --seed-ras X,Y,Z (or a --preset)")
    opt = SimulateOptions(
        labels=args.labels, out=args.out,
        kappa=defaults["kappa"] if args.kappa is None else args.kappa,
        rho=defaults["rho"] if args.rho is None else args.rho,
        gamma=defaults["gamma"] if args.gamma is None else args.gamma,
        seed_ijk=args.seed_ijk, seed_ras=args.seed_ras, sigma_voxels=args.sigma_voxels,
        c0_max=args.c0_max, grid=args.grid, nt=args.nt, dt=args.dt, device=args.device, precision=args.precision,
        box_mm=args.box_mm, preset=args.preset, random_seed=args.random_seed)
    outputs, report_path = _open_outputs(opt.out, outputs_holder, pg.OutputSet)
    run_simulate(opt, outputs, progress=pg.progress, cancel=token)
    token.finish()
    pg.result(report_path)
    return pg.EXIT_OK


def _cohort(args, outputs_holder: list, token: pg.CancelToken) -> int:
    import time as _time

    from .cohort import cohort_report, dask_client, find_job_folders, load_patients, run_cohort, \
        write_cohort_outputs

    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers must be at least 1, got {args.workers}")
    if args.threads_per_worker < 1:
        raise UsageError(f"--threads-per-worker must be at least 1, got {args.threads_per_worker}")
    t0 = _time.perf_counter()
    patients = load_patients(find_job_folders(args.jobs))
    if all(p.error for p in patients):
        raise UsageError("no valid job: " + "; ".join(f"{p.name}: {p.error}" for p in patients))
    outputs, report_path = _open_outputs(args.out, outputs_holder, pg.OutputSet)
    for name in ("cohort_summary.csv",):
        stale = os.path.join(outputs.folder, name)
        if os.path.exists(stale):
            os.remove(stale)
    report_path = os.path.join(outputs.folder, "cohort_report.json")
    if os.path.exists(report_path):
        os.remove(report_path)
    with dask_client(args.scheduler, args.workers, args.threads_per_worker) as client:
        info = {"scheduler": args.scheduler or "local",
                "workers": len(client.scheduler_info().get("workers", {})),
                "threads_per_worker": args.threads_per_worker}
        pg.emit({"event": "progress", "stage": "cohort", "fraction": 0.0,
                 "message": f"{len(patients)} patient(s) on {info['workers']} Dask worker(s)"})
        run_cohort(patients, client, progress=lambda d: pg.emit({"event": "progress", **d}), cancel=token,
                   holder=outputs_holder)
    report = cohort_report(patients, info, _time.perf_counter() - t0)
    write_cohort_outputs(outputs, report)
    token.finish()
    failed = [r["name"] for r in report["patients"] if r["status"] != "ok"]
    if failed:  # the others' outputs are complete; the exit code says not all are
        pg.emit({"event": "result", "path": report_path, "failed": failed})
        return pg.EXIT_FAILURE
    pg.result(report_path)
    return pg.EXIT_OK


def _exit_code_for(exc: BaseException) -> int:
    from .aggregate import AllAtlasesFailed
    from .backend import DeviceError
    from .geometry import GeometryError
    from .io import ImageIOError

    if isinstance(exc, AllAtlasesFailed):
        return pg.EXIT_FAILURE
    if isinstance(exc, (UsageError, ImageIOError, GeometryError, DeviceError)):
        return pg.EXIT_BAD_INPUT
    mod = type(exc).__module__
    if isinstance(exc, ValueError) and mod.startswith("GBMMassEffectLib"):
        return pg.EXIT_BAD_INPUT
    return pg.EXIT_FAILURE


def main(argv=None) -> int:
    """Entry point; returns the exit code (the console script exits with it)."""
    outputs_holder: list = []
    token = pg.install_signal_handlers(
        outputs=lambda: outputs_holder[-1] if outputs_holder else None, grace_s=3.0)
    try:
        parser = build_parser()
        argv = _join_negative_vectors(list(sys.argv[1:] if argv is None else argv))
        args = parser.parse_args(argv)
        if args.command == "simulate":
            return _simulate(args, outputs_holder, token)
        if args.command == "calibrate":
            return _calibrate(args, outputs_holder, token)
        if args.command == "demo":
            return _demo(args, outputs_holder, token)
        if args.command == "cohort":
            return _cohort(args, outputs_holder, token)
        raise UsageError(f"unknown command {args.command!r}")
    except SystemExit as exc:  # --help / --version
        return int(exc.code or 0) if isinstance(exc.code, int) else 0
    except pg.Cancelled:
        for o in outputs_holder:
            o.rollback()
        pg.error(f"cancelled by {pg._signame(token.signum)}; outputs removed", cancelled=True)
        return token.exit_code
    except KeyboardInterrupt:
        for o in outputs_holder:
            o.rollback()
        pg.error("cancelled by SIGINT; outputs removed", cancelled=True)
        return pg.EXIT_SIGINT
    except Exception as exc:  # noqa: BLE001 - the process boundary: one JSON line, no traceback
        for o in outputs_holder:
            o.rollback()
        if os.environ.get("GBM_DEBUG"):
            traceback.print_exc(file=sys.stderr)
        pg.error(pg.one_line_message(exc))
        return _exit_code_for(exc)


def console_main() -> None:
    sys.exit(main())
