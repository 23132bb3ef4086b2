"""Aggregation over atlases (MODEL.md §6, "Aggregate").

Dropping rules, in this order (the first that applies is the reason given):
  1. the atlas's run failed (registration or S.3 raised, or returned no result);
  2. max|u| > 2 domain units (MAX_U_DOMAIN);
  3. relative tumor error ‖Oc(1) − Od‖/‖Od‖ > 1 (MAX_RELATIVE_TUMOR_ERROR);
  4. Hessian condition number > 1e4 (MAX_HESSIAN_CONDITION; not applied when the Hessian
     was not computed, i.e. S.3 option hessian = false).
Summary: mean ± std (population std, ddof 0; 0 for a single atlas) of κ, ρ, γ, max|u| in
mm and the relative tumor misfit over the kept atlases. If every atlas that produced a
result was dropped, the summary and the averaged volumes use all of them instead and
say so (`basis` = "all (every atlas met a dropping rule)"): a clinical run of an hour
still gives its numbers, flagged; if no atlas produced a result at all there is nothing
to average and `AllAtlasesFailed` is raised (the CLI exits 1 with one error line).
Parameters that S.3 left on a §6 bound in the averaged atlases are listed (bound_notes).
Patient-space volumes: the voxel-wise mean of the kept atlases' c(1), |u| (mm) and u
(LPS mm), and the per-voxel std of |u| across them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MAX_U_DOMAIN = 2.0
MAX_RELATIVE_TUMOR_ERROR = 1.0
MAX_HESSIAN_CONDITION = 1e4
SUMMARY_KEYS = ("kappa", "rho", "gamma", "max_u_mm", "relative_tumor_error")


class AllAtlasesFailed(RuntimeError):
    """No atlas produced a result: nothing to aggregate."""


def drop_reason(entry: dict) -> str | None:
    """The §6 reason to drop one atlas (entry: the per-atlas report record), or None."""
    if entry.get("failed"):
        return f"run failed: {entry.get('error') or 'no result'}"
    mu = entry.get("max_u_domain")
    if mu is None or not math.isfinite(mu):
        return "run failed: no displacement"
    if mu > MAX_U_DOMAIN:
        return f"max|u| = {mu:.3g} domain units > {MAX_U_DOMAIN:g}"
    rel = entry.get("relative_tumor_error")
    if rel is None or not math.isfinite(rel) or rel > MAX_RELATIVE_TUMOR_ERROR:
        return f"relative tumor error {rel if rel is None else f'{rel:.3g}'} > {MAX_RELATIVE_TUMOR_ERROR:g}"
    cond = entry.get("hessian_condition")
    if cond is not None and not (math.isfinite(cond) and cond <= MAX_HESSIAN_CONDITION):
        return f"Hessian condition {cond:.3g} > {MAX_HESSIAN_CONDITION:g}"
    return None


def apply_dropping(entries: list[dict]) -> list[dict]:
    """Set entry["dropped"] (reason or None) on every per-atlas record; returns entries."""
    for e in entries:
        e["dropped"] = drop_reason(e)
    return entries


@dataclass
class Summary:
    mean: dict
    std: dict
    kept: list  # names of the atlases averaged
    basis: str  # "kept" or "all (every atlas met a dropping rule)"


def summarise(entries: list[dict]) -> Summary:
    """mean ± std over the kept atlases (see the module docstring for the fallback)."""
    kept = [e for e in entries if not e.get("dropped")]
    basis = "kept atlases"
    if not kept:
        kept = [e for e in entries if not e.get("failed")]
        basis = "all atlases with a result (every atlas met a dropping rule)"
    if not kept:
        reasons = "; ".join(f"{e['name']}: {e.get('dropped')}" for e in entries)
        raise AllAtlasesFailed(f"no atlas produced a result ({reasons})")
    mean, std = {}, {}
    for k in SUMMARY_KEYS:
        vals = np.array([float(e[k]) for e in kept if e.get(k) is not None], dtype=float)
        mean[k] = float(vals.mean()) if vals.size else None
        std[k] = float(vals.std()) if vals.size else None
    return Summary(mean, std, [e["name"] for e in kept], basis)


#: report keys of S.3's parameters → the paper's symbols (report notes; the Slicer module's table)
PARAMETER_SYMBOLS = {"gamma": "γ", "rho": "ρ", "kappa": "κ"}


def bound_notes(entries: list[dict], kept: list, options) -> tuple[dict, list[str]]:
    """Which of γ, ρ, κ S.3 left on a §6 bound in the averaged atlases (entry["at_bounds"]),
    as {name: {"lower" | "upper": {"value", "atlases"}}} and one report note each: such a value is the
    bound's, not the data's (κ from BraTS labels at 32³: benchmarks/ACCURACY.md), and γ on 0
    means no mass effect was found."""
    summary, notes = {}, []
    for k, sym in PARAMETER_SYMBOLS.items():
        for side in ("lower", "upper"):
            names = [e["name"] for e in entries if e["name"] in kept and (e.get("at_bounds") or {}).get(k) == side]
            if not names:
                continue
            value = getattr(options, f"{k}_bounds")[0 if side == "lower" else 1]
            summary.setdefault(k, {})[side] = {"value": value, "atlases": names}
            what = ("no mass effect was found there" if (k, side) == ("gamma", "lower") else
                    "the data did not determine it there: read the value as a bound, not an estimate")
            if (k, side) == ("rho", "lower"):
                what += (f"; ρ on its lower bound is also what a tumour seeded finer than one box voxel "
                         f"gives (S.3's c0 peaks at {options.c0_max:g} over a box voxel, so it starts with "
                         f"more cells than such a seed): calibrate on a finer grid, or set the S.3 option "
                         f"c0_max (README, Limitations)")
            notes.append(f"{sym} on its {side} bound {value:g} in {len(names)} of {len(kept)} atlas(es) "
                         f"({', '.join(names)}): {what}")
    return summary, notes


class VolumeAverage:
    """Running voxel-wise mean (and std for scalars) of patient-space arrays, one atlas at
    a time (so only one atlas's volumes are held besides the sums)."""

    def __init__(self):
        self.n = 0
        self.sum: dict = {}
        self.sumsq: dict = {}

    def add(self, arrays: dict, squares=("displacement_norm",)) -> None:
        self.n += 1
        for k, a in arrays.items():
            a = np.asarray(a, dtype=np.float64)
            self.sum[k] = a.copy() if k not in self.sum else self.sum[k] + a
            if k in squares:
                self.sumsq[k] = a * a if k not in self.sumsq else self.sumsq[k] + a * a

    def mean(self, key) -> np.ndarray:
        return self.sum[key] / self.n

    def std(self, key) -> np.ndarray:
        m = self.mean(key)
        return np.sqrt(np.maximum(self.sumsq[key] / self.n - m * m, 0.0))
