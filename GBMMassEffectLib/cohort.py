"""Cohort scale-out: many patients' calibrations as independent (patient, atlas) tasks on
Dask distributed (ARCHITECTURE.md, "Scale-out"; MODEL.md §6: atlases run independently).

Each patient is an ordinary calibrate job folder (DIR/job.json, outputs in its "out",
DIR/out by default) and ends with exactly the outputs of `gbm-calibrate calibrate --job DIR`:
the task graph is calibrate.py's own pipeline cut at its joints,

    prepare_calibration(job)          one task per patient: inputs, tissue, atlas choice, S.1
      → calibrate_atlas(setup, i)     one task per chosen atlas: S.2 + S.3 (run concurrently)
      → CalibrationAssembly           in this process, as the atlas tasks finish: the
                                      atlas_<name>/ files, then the averages and report.json

so the numbers equal a single run's. The scheduler is a LocalCluster of worker processes
(`workers`, one thread each: S.3 already runs its finite-difference solves on
options.s3.workers threads) or an existing scheduler (`scheduler` address).

A patient whose job is invalid or whose run fails is reported (its outputs removed) and the
others go on. The cohort's own folder gets cohort_report.json (per patient: status, report
path or error, mean ± std of κ, ρ, γ, max|u|) and cohort_summary.csv. Cancellation
(SIGTERM): the local workers are killed, the unfinished patients' outputs removed, finished
patients keep their complete outputs; with an external scheduler the pending tasks are
cancelled (a task already running there runs to its end, its result discarded).
"""
from __future__ import annotations

import contextlib
import csv
import io as _io
import os
import time
from dataclasses import dataclass, field

from .calibrate import (CalibrateJob, CalibrateOutputs, CalibrationAssembly, InputError, calibrate_atlas,
                        prepare_calibration)
from .progress import Cancelled, OutputSet, check_cancel, one_line_message

JOB_FILE = "job.json"
PREPARE_SHARE = 0.3  # of a patient's progress: the prepare task (S.1 dominates it)


class CohortError(ValueError):
    """The cohort itself is unusable (no job folders, Dask missing, scheduler unreachable)."""


def find_job_folders(paths) -> list[str]:
    """Job folders from the command line: a folder holding job.json is one patient; a
    folder without one contributes its sub-folders that hold one (sorted by name)."""
    found: list[str] = []
    for p in paths:
        p = os.path.abspath(str(p))
        if os.path.isfile(os.path.join(p, JOB_FILE)):
            found.append(p)
        elif os.path.isdir(p):
            subs = sorted(os.path.join(p, d) for d in os.listdir(p)
                          if os.path.isfile(os.path.join(p, d, JOB_FILE)))
            if not subs:
                raise CohortError(f"{p} holds no {JOB_FILE} and no sub-folder with one")
            found.extend(subs)
        else:
            raise CohortError(f"job folder {p} does not exist")
    if not found:
        raise CohortError("no job folders given")
    seen: set = set()
    unique = [f for f in found if not (f in seen or seen.add(f))]
    return unique


@dataclass
class CohortPatient:
    """One patient of the cohort and its state in the run."""

    name: str
    folder: str
    job: CalibrateJob | None = None
    error: str | None = None
    outputs: CalibrateOutputs | None = None
    assembly: CalibrationAssembly | None = None
    n_atlases: int = 0
    done_atlases: int = 0
    prepared: bool = False
    report: dict | None = None
    report_path: str | None = None
    t0: float = field(default_factory=time.perf_counter)
    seconds: float | None = None

    @property
    def finished(self) -> bool:
        return self.error is not None or self.report is not None

    def progress(self) -> float:
        if self.finished:
            return 1.0
        if not self.prepared:
            return 0.0
        return PREPARE_SHARE + (1 - PREPARE_SHARE) * self.done_atlases / max(self.n_atlases, 1)


class _Unfinished:
    """Rollback target for cancellation: the unfinished patients' outputs (finished ones are
    complete and stay), and the local Dask workers, killed first."""

    def __init__(self, patients, kill):
        self.patients, self.kill = patients, kill

    def rollback(self) -> None:
        self.kill()
        for p in self.patients:
            if p.report is None and p.outputs is not None:
                p.outputs.rollback()


def _kill_local_workers() -> None:
    """End this process's children (LocalCluster nannies and workers) at once."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil comes with distributed
        return
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(Exception):
            child.kill()


def worker_environ() -> dict:
    """The environment Dask's nanny gives a local worker before it starts: its defaults
    (one BLAS/OpenMP thread) without MALLOC_TRIM_THRESHOLD_. That setting also fixes glibc's
    mmap threshold, so every array above 128 KiB is mapped and unmapped afresh; the solver's
    many 32³–64³ temporaries then cost page faults (measured: one patient's cohort run
    191 s, 2 min 42 s of it system time; 92 s without the setting; 107 s by calibrate)."""
    import dask

    env = dict(dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {})
    env.pop("MALLOC_TRIM_THRESHOLD_", None)
    return env


def _quiet_distributed_logs() -> None:
    """Run on each local worker before shutdown: only CRITICAL from Dask's own loggers."""
    import logging

    for name in ("distributed", "tornado"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


@contextlib.contextmanager
def dask_client(scheduler: str | None = None, workers: int | None = None, threads_per_worker: int = 1):
    """A distributed.Client: on `scheduler` if given, else on a LocalCluster of `workers`
    processes (default: half the CPUs, at least one)."""
    try:
        import logging

        import dask
        from distributed import Client, LocalCluster
    except ImportError:
        raise CohortError("the cohort command needs Dask distributed: pip install 'GBMMassEffect[cohort]' "
                          "(or pip install 'dask[distributed]')") from None
    if scheduler:
        try:
            client = Client(scheduler, timeout=30)
        except (OSError, TimeoutError) as exc:
            raise CohortError(f"cannot reach the Dask scheduler at {scheduler}: {exc}") from None
        try:
            yield client
        finally:
            client.close()
        return
    n = int(workers or max(1, (os.cpu_count() or 2) // 2))
    if n < 1:
        raise CohortError(f"workers must be at least 1, got {n}")
    with dask.config.set({"distributed.nanny.pre-spawn-environ": worker_environ()}):
        cluster = LocalCluster(n_workers=n, threads_per_worker=int(threads_per_worker), processes=True,
                               dashboard_address=None, silence_logs=logging.ERROR)
    client = Client(cluster)
    try:
        yield client
    finally:
        # a worker whose heartbeat races the scheduler's shutdown logs the closed stream
        # at ERROR with a traceback (seen once in CI): quiet the workers' distributed
        # loggers first; task errors come back as values (TaskFailure), not as worker logs
        with contextlib.suppress(Exception):
            client.run(_quiet_distributed_logs)
        with contextlib.suppress(Exception):
            client.close(timeout=10)
        with contextlib.suppress(Exception):
            cluster.close(timeout=10)


@dataclass
class TaskFailure:
    """A worker task's error as a value: Dask logs a raised task error with its traceback,
    and a patient's bad input is its own one-line message, not a crash."""

    message: str


def _task(fn, *args):
    """Run fn(*args) on a worker; an Exception comes back as a TaskFailure (its traceback on
    the worker's stderr only with GBM_DEBUG set)."""
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - the task boundary: one message per failure
        if os.environ.get("GBM_DEBUG"):
            import traceback

            traceback.print_exc()
        return TaskFailure(one_line_message(exc))


def load_patients(folders) -> list[CohortPatient]:
    """One CohortPatient per job folder; an invalid job is recorded, not raised."""
    patients = []
    names: dict = {}
    for f in folders:
        base = os.path.basename(os.path.normpath(f))
        names[base] = names.get(base, 0) + 1
        name = base if names[base] == 1 else f"{base}#{names[base]}"
        p = CohortPatient(name=name, folder=f)
        try:
            p.job = CalibrateJob.from_job_dir(f)
            p.job.validate()
        except (InputError, ValueError, OSError) as exc:
            p.error = " ".join(str(exc).split())
            p.seconds = 0.0
        patients.append(p)
    outs = {}
    for p in patients:
        if p.job is not None:
            out = os.path.abspath(p.job.out)
            if out in outs:
                p.error = f"its output folder {out} is also that of {outs[out]}"
                p.seconds = 0.0
            else:
                outs[out] = p.name
    return patients


def _open(p: CohortPatient) -> None:
    folder = p.job.out
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise InputError(f"output {folder} exists and is not a folder")
    p.outputs = CalibrateOutputs(folder)
    stale = os.path.join(p.outputs.folder, "report.json")
    if os.path.exists(stale):  # an earlier run's marker of completeness
        os.remove(stale)


def run_cohort(patients: list[CohortPatient], client, progress=None, cancel=None, holder=None,
               kill=_kill_local_workers) -> list[CohortPatient]:
    """Run every valid patient's pipeline as Dask tasks on `client`; fills each patient's
    report or error. progress(dict) gets the cohort fraction; cancel() is polled."""
    if holder is not None:
        holder.append(_Unfinished(patients, kill))
    pending: dict = {}  # future → (patient, "prepare" | atlas index)

    def fail(p: CohortPatient, exc: BaseException | str) -> None:
        text = exc if isinstance(exc, str) else " ".join(str(exc).split()) or type(exc).__name__
        p.error = text
        p.seconds = time.perf_counter() - p.t0
        if p.outputs is not None:
            p.outputs.rollback()
        for f in [f for f, (q, _) in pending.items() if q is p]:
            pending.pop(f)
            f.cancel()
        note(p, f"{p.name}: failed ({text})")

    def note(p: CohortPatient | None, message: str, **extra) -> None:
        if progress is not None:
            frac = sum(q.progress() for q in patients) / max(len(patients), 1)
            who = {} if p is None else {"patient": p.name}
            progress({"stage": "cohort", "fraction": round(frac, 4), **who, "message": message, **extra})

    for p in patients:
        if p.error is not None:
            note(p, f"{p.name}: invalid job ({p.error})")
            continue
        try:
            _open(p)
        except (InputError, OSError) as exc:
            fail(p, exc)
            continue
        f = client.submit(_task, prepare_calibration, p.job, pure=False, key=f"prepare-{p.name}-{id(p)}")
        pending[f] = (p, "prepare")
    note(None, f"{len(pending)} patient(s) submitted")

    try:
        _drive(pending, patients, client, fail, note, cancel)
    except (Cancelled, KeyboardInterrupt):
        kill()  # the local workers first: their solves do not poll our token
        raise
    for p in patients:  # a prepared patient with no atlas task would otherwise look done
        if not p.finished:
            fail(p, "the run ended without a result for this patient (no atlas task ran)")
    return patients


def _drive(pending, patients, client, fail, note, cancel) -> None:
    """Collect finished tasks, submit each prepared patient's atlas tasks, assemble."""
    while pending:
        check_cancel(cancel)
        done = [f for f in pending if f.done()]
        if not done:
            time.sleep(0.2)
            continue
        for f in done:
            if f not in pending:  # removed by fail() of the same patient in this round
                continue
            p, what = pending.pop(f)
            try:
                value = f.result()
            except Exception as exc:  # noqa: BLE001 - a patient's failure is its own (e.g. a lost worker)
                fail(p, one_line_message(exc))
                continue
            if isinstance(value, TaskFailure):
                fail(p, value.message)
                continue
            try:
                if what == "prepare":
                    p.prepared = True
                    p.assembly = CalibrationAssembly(value, p.outputs, None)
                    p.n_atlases = len(value.chosen)
                    for i in range(p.n_atlases):
                        g = client.submit(_task, calibrate_atlas, f, i, pure=False,
                                          key=f"atlas-{p.name}-{i}-{id(p)}")
                        pending[g] = (p, i)
                    note(p, f"{p.name}: S.1 done, {p.n_atlases} atlas task(s) submitted")
                else:
                    entry, vols = value
                    p.assembly.add(entry, vols)
                    p.done_atlases += 1
                    if p.done_atlases == p.n_atlases:
                        p.report = p.assembly.finish(cancel)
                        p.report_path = os.path.join(p.outputs.folder, "report.json")
                        p.seconds = time.perf_counter() - p.t0
                        p.assembly = None
                        note(p, f"{p.name}: done", report=p.report_path)
                    else:
                        note(p, f"{p.name}: atlas {entry['name']} done ({p.done_atlases}/{p.n_atlases})")
            except Exception as exc:  # noqa: BLE001 - e.g. AllAtlasesFailed, a disk error
                fail(p, one_line_message(exc))


SUMMARY_COLUMNS = ("kappa", "rho", "gamma", "max_u_mm", "relative_tumor_error")


def cohort_report(patients: list[CohortPatient], client_info: dict, seconds: float) -> dict:
    rows = []
    for p in patients:
        row = {"name": p.name, "job": p.folder, "status": "failed" if p.error else "ok",
               "seconds": p.seconds}
        if p.error:
            row["error"] = p.error
        else:
            rep = p.report
            row.update(report=p.report_path, mean=rep["mean"], std=rep["std"],
                       atlases_used=rep["summary"]["atlases_used"], dropped=rep["dropped"])
        rows.append(row)
    return {"command": "cohort", "patients": rows, "n_patients": len(rows),
            "n_ok": sum(r["status"] == "ok" for r in rows), "n_failed": sum(r["status"] != "ok" for r in rows),
            "dask": client_info, "seconds": seconds}


def summary_csv(report: dict) -> str:
    buf = _io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    head = ["patient", "status"]
    for k in SUMMARY_COLUMNS:
        head += [f"{k}_mean", f"{k}_std"]
    w.writerow(head + ["atlases_used", "report", "error"])
    for r in report["patients"]:
        vals = [r["name"], r["status"]]
        for k in SUMMARY_COLUMNS:
            vals += [r.get("mean", {}).get(k, ""), r.get("std", {}).get(k, "")]
        w.writerow(vals + [" ".join(r.get("atlases_used", [])), r.get("report", ""), r.get("error", "")])
    return buf.getvalue()


def write_cohort_outputs(outputs: OutputSet, report: dict) -> str:
    """cohort_summary.csv, then cohort_report.json (last) in the cohort's folder."""
    outputs.write_text(os.path.join(outputs.folder, "cohort_summary.csv"), summary_csv(report))
    return outputs.write_json(os.path.join(outputs.folder, "cohort_report.json"), report)
