"""Parameter recovery on synthetic patients: the paper's Table 1 and a Table S2-style run
(MODEL.md §6, §7).

    python benchmarks/recovery.py --grid 32 --experiments true-ic inverted-ic other-atlases
    python benchmarks/recovery.py --grid 64 --cases b c d --experiments true-ic

Synthetic patient (one per test case, MODEL §7 TC(a)–(d)):
  * anatomy: the bundled atlas --patient-atlas (default mni152, Resources/Atlases) placed
    in the n³ box of edge 256 mm exactly as `simulate` does (simulate.box_tissues: partial
    volumes, smoothed one voxel); without a bundled set, Testing/Data/glia-testdata/atlas.nc
    (64³, read as a 4 mm label map).
  * seed: the deepest white-matter voxel of the label map (presets.default_seed_ijk).
  * c0: one §5 Gaussian atom at the seed, brain mask, max 1 (simulate.initial_condition),
    σ = 8 mm = max(1, n/32) box voxels (one voxel at 32³, two at 64³): the same physical
    IC at every grid, never narrower than the S.1 basis atom (one voxel), so it is
    resolvable by the grid and representable by S.1's basis.
  * patient = the §3 forward solve from the atlas with the true (γ, ρ, κ):
    vt_patient = vt(1), tumour data d = c(1), the concentration itself, O = 1 everywhere
    (the paper's Table 1 uses the tumour concentration as data). --data labels instead
    uses the §5 data: d = core indicator (c(1) > 0.4, presets.BRATS_THRESHOLDS) smoothed one
    voxel, O = 0 on edema (0.02 < c(1) ≤ 0.4); --label-thresholds CORE EDEMA draws the labels
    at other levels than the ones S.3's label band assumes (a patient from another solver).
    S.3's tumour term on label data: --tumor-misfit indicator (§5's ‖O(c(1) − d)‖², calibrate's
    default) or band (the labels as iso-contours of c(1), observation.label_band).

Experiments (one markdown row each per case / atlas):
  true-ic        S.3 on the true atlas with the true c0 (paper: all errors < 2%).
  inverted-ic    S.1 (sparse_ic.solve_sparse_ic) on the patient, i.e. the deformed tissues at
                 t = 1 with the tumour region (c(1) > 0.02) counted as white matter (wm = 1 − bg −
                 vt − csf there), then S.3
                 on the true atlas with that c0 (max 1), used in the same box without
                 registration (true atlas: patient and atlas share the box; the mass effect
                 pushes tissue away from the tumour centre, not the centre itself).
                 Paper (TC b–d): eγ 0.3–5%, eρ 13–16%, eκ 19–26%, eu < 4%.
                 S.3 refits S.1's atom weights with γ, ρ, κ, as calibrate does (--c0
                 refit, the default; --c0 pullback pulls c0 back --c0-pullback rounds with
                 S.3's displacement; --c0 fixed is the paper's S.3; see mass_effect_inversion.py).
  other-atlases  S.1's c0 as above; S.2 (registration.register_patient_to_atlas on the
                 tissue channels vt; gm; wm+csf, tumour masked; affine only as in calibrate,
                 --registration demons|bspline adds a deformable stage) of the patient's
                 box images onto each other atlas's box; c0 (rescaled to max 1), d, O and
                 vt_patient warped to that atlas; S.3 there (paper Table S2: eu 12–27% on good
                 atlases; ρ, κ ~20–35%).

Reported per row: recovered γ, ρ, κ and their relative errors (absolute error when the
truth is 0, TC(a) γ); eu = |max|u| − max|u*|| / max|u*| (max of the displacement magnitude,
domain units: comparable across atlases; the paper's eu is on the displacement) and, on the
true atlas, eu_field = ‖|u| − |u*|‖ / ‖|u*|‖ over the box; ‖g‖: the final projected
gradient norm of S.3 in its scaled variables (10γ, ρ, 100κ) and its ratio to the initial
one; tumour misfit: the relative tumour error ‖O(c(1) − d)‖ / ‖Od‖ at the optimum; the
number of S.3 iterations and forward solves and the wall time.

Results go to <out>/recovery_<n>.json (one record per row, rewritten after every row) and
<out>/recovery_<n>.md (regenerated from the JSON). A row already in the JSON is skipped
(resumable; --force recomputes).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from GBMMassEffectLib import presets  # noqa: E402
from GBMMassEffectLib.calibrate import (S1_TUMOR_MISFIT, S2_DEFORMABLE, S3_C0_SHIFT_MM,  # noqa: E402
                                        S3_OPTIMIZER, S3_TUMOR_MISFIT,
                                        s3_c0_shift_voxels)
from GBMMassEffectLib.backend import get_backend, to_numpy  # noqa: E402
from GBMMassEffectLib.forward import ForwardParams, run_forward  # noqa: E402
from GBMMassEffectLib.geometry import box_for_image  # noqa: E402
from GBMMassEffectLib.mass_effect_inversion import (OPTIMIZERS, TUMOR_MISFITS, MassEffectOptions,  # noqa: E402
                                                    invert_mass_effect)
from GBMMassEffectLib.observation import labels_from_concentration, observation_operator, tumor_data  # noqa: E402
from GBMMassEffectLib.simulate import box_tissues, initial_condition, seed_point  # noqa: E402
from GBMMassEffectLib.spectral import SpectralOps  # noqa: E402
from GBMMassEffectLib.tissue import Tissues  # noqa: E402

EXPERIMENTS = ("true-ic", "inverted-ic", "other-atlases")
CASES = {k[-1]: v for k, v in presets.PRESETS.items()}  # "a" → Preset("tc-a", …)
SIGMA_MM = 8.0  # physical width of the true c0
EDEMA, CORE = presets.BRATS_THRESHOLDS["edema"], presets.BRATS_THRESHOLDS["enhancing"]

PAPER = {
    "true-ic": "eκ, eρ, eγ, eu < 2%",
    "inverted-ic": "eγ 0.3–5%, eρ 13–16%, eκ 19–26%, eu < 4% (TC b–d)",
    "other-atlases": "eu 12–27% on good atlases; eρ, eκ ~20–35%",
}
TITLES = {
    "true-ic": "Table 1: true IC, true atlas",
    "inverted-ic": "Table 1: inverted IC (S.1), true atlas",
    "other-atlases": "Table S2-style: inverted IC (S.1), other atlases (S.2 registration)",
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- anatomy ----------------------------------------------------------------------------------
def load_labels(name: str):
    """(label map as sitk image, description) of the named bundled atlas, or of
    glia-testdata/atlas.nc (4 mm voxels) when name is 'glia' or no bundled set exists."""
    import SimpleITK as sitk

    if name != "glia":
        try:
            from GBMMassEffectLib.atlases import load_atlas_set

            import hashlib

            atlas = load_atlas_set()[name]
            sha = hashlib.sha256(pathlib.Path(atlas.labels_path).read_bytes()).hexdigest()[:12]
            return atlas.read_labels(), f"bundled atlas {name} (labels sha256 {sha}…)"
        except FileNotFoundError:
            log("no bundled atlas set: falling back to glia-testdata/atlas.nc")
    import scipy.io

    path = REPO / "Testing" / "Data" / "glia-testdata" / "atlas.nc"
    a = scipy.io.netcdf_file(path, "r", mmap=False).variables["data"].data
    img = sitk.GetImageFromArray(np.rint(a).astype(np.uint8))
    img.SetSpacing((4.0, 4.0, 4.0))
    return img, "glia-testdata/atlas.nc (4 mm)"


class Anatomy:
    """An atlas in its own n³ box: label map, box geometry, smoothed tissue fractions."""

    def __init__(self, name: str, ops: SpectralOps):
        self.name = name
        self.labels, self.source = load_labels(name)
        self.geom = box_for_image(self.labels, ops.n, 256.0)
        self.tissues = box_tissues(self.geom, self.labels, ops)


# ---- synthetic patient ---------------------------------------------------------------------
class Patient:
    """Forward solve from the atlas with the true parameters (module docstring)."""

    def __init__(self, case: str, anatomy: Anatomy, ops: SpectralOps, data_kind: str,
                 sigma_mm: float = SIGMA_MM, label_thresholds: tuple[float, float] = (CORE, EDEMA)):
        p = CASES[case]
        self.case, self.truth, self.ops, self.anatomy = case, p, ops, anatomy
        self.sigma_mm = sigma_mm
        self.sigma_voxels = max(1.0, ops.n / 32.0) * sigma_mm / SIGMA_MM
        seed_lps, _ = seed_point(anatomy.labels, presets.default_seed_ijk(anatomy.labels))
        self.c0, self.centre = initial_condition(ops, anatomy.geom, anatomy.tissues, seed_lps,
                                                 self.sigma_voxels)
        t = time.perf_counter()
        res = run_forward(ops, anatomy.tissues, self.c0,
                          ForwardParams(kappa=p.kappa, rho=p.rho, gamma=p.gamma), on_cfl="raise")
        self.forward_seconds = time.perf_counter() - t
        self.c1 = res.c
        self.tissues = res.tissues
        self.vt = res.tissues.vt
        self.umag = res.displacement_norm()
        self.max_u = float(ops.xp.max(self.umag))
        c1 = to_numpy(res.c)
        self.labels = None  # (core, edema) indicators with label data
        if data_kind == "concentration":
            self.d, self.O = res.c, None
        else:
            core, edema = labels_from_concentration(c1, *label_thresholds)
            self.d = tumor_data(ops, core)
            self.O = observation_operator(ops, core, edema)
            self.labels = (core, edema)
        self.tumor = c1 > (EDEMA if data_kind == "concentration" else label_thresholds[1])
        self.c1_max = float(c1.max())
        self.tumor_voxels = int(self.tumor.sum())
        self.s1 = None  # (c0, summary) once S.1 has run
        self.s1_atoms = None  # (S.1's support atoms (s, n, n, n), their weights p)

    def info(self) -> dict:
        return {"max_u_true": self.max_u, "max_u_true_voxels_256": self.max_u * 256 / (2 * math.pi),
                "paper_max_u_voxels_256": self.truth.paper_max_u_voxels_256,
                "c1_max": self.c1_max, "tumor_voxels": self.tumor_voxels,
                "sigma_voxels": self.sigma_voxels, "forward_seconds": self.forward_seconds,
                "seed_domain": [float(v) for v in self.centre]}

    def s1_tissues(self):
        """Patient tissues at t = 1 with the tumour region (c(1) > 0.02) counted as white
        matter, as a tumour label would be: there wm = 1 − bg − vt − csf, gm = 0 (the
        forward model's wm(1−c0) filter left ~0 healthy tissue in the tumour core)."""
        xp = self.ops.xp
        T = self.tissues
        tum = xp.asarray(self.tumor)
        wm = xp.where(tum, xp.maximum(1 - T.bg - T.vt - T.csf, 0), T.wm).astype(self.ops.dtype)
        gm = xp.where(tum, 0, T.gm).astype(self.ops.dtype)
        return wm, gm, T.vt, T.csf

    def inverted_c0(self, max_iter: int, cache_dir: pathlib.Path | None = None,
                    coarse_factor: int | None = None, tumor_misfit: str = "indicator"):
        """S.1 on the patient as calibrate runs it (sparse_ic.solve_s1: coarse-to-fine from
        n/k, k = s1_coarse_factor), cached per patient and in cache_dir/s1_<n>_<case>.npz
        (s1_<n>_<case>_c<k>.npz when k > 1; _band with S.1's label band on label data)."""
        from GBMMassEffectLib.sparse_ic import SparseICOptions, s1_coarse_factor

        band = tumor_misfit == "band" and self.labels is not None
        s1_opt = SparseICOptions(final_maxiter=max_iter, coarse_factor=coarse_factor,
                                 tumor_misfit="band" if band else "indicator")
        k = s1_coarse_factor(self.ops.n, s1_opt)
        name = (f"s1_{self.ops.n}_{self.case}" + (f"_c{k}" if k > 1 else "")
                + (f"_s{self.sigma_mm:g}" if self.sigma_mm != SIGMA_MM else "") + ("_band" if band else "") + ".npz")
        cache = None if cache_dir is None else cache_dir / name
        if self.s1 is None and cache is not None and cache.exists():
            z = np.load(cache, allow_pickle=False)
            if "atoms" in z.files:  # older caches lack S.1's atoms (c0 refit): recompute
                info = json.loads(str(z["info"]))
                self.s1 = (self.ops.xp.asarray(z["c0"], dtype=self.ops.dtype), info)
                self.s1_atoms = (z["atoms"], z["weights"])
                log(f"S.1 case {self.case}: from {cache}")
        if self.s1 is None:
            from GBMMassEffectLib.sparse_ic import solve_s1, support_atoms

            ops = self.ops
            wm, gm, vt, csf = self.s1_tissues()
            t = time.perf_counter()
            r = solve_s1(ops, wm, gm, vt, csf, self.d, self.O, s1_opt, tumor_labels=self.labels if band else None)
            sec = time.perf_counter() - t
            c0 = ops.xp.asarray(r.c0, dtype=ops.dtype)
            err = float(ops.norm(c0 - self.c0) / ops.norm(self.c0))
            self.s1_atoms = (support_atoms(r), np.asarray(r.p, dtype=np.float64))
            self.s1 = (c0, {"kappa_s1": float(r.kappa), "rho_s1": float(r.rho),
                            "s1_relative_error": float(r.relative_error), "s1_support": int(len(r.support)),
                            "s1_c0_error": err, "s1_seconds": sec, "s1_coarse_factor": k,
                            "s1_nfev": int(r.nfev), "s1_tumor_misfit": s1_opt.tumor_misfit})
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                np.savez(cache, c0=to_numpy(c0), info=json.dumps(self.s1[1]), atoms=self.s1_atoms[0],
                         weights=self.s1_atoms[1])
            log(f"S.1 case {self.case}: κ={r.kappa:.4g} ρ={r.rho:.4g} support={len(r.support)} "
                f"‖c0−c0*‖/‖c0*‖={err:.3f} ({sec:.0f} s)")
        return self.s1


# ---- registration onto another atlas (S.2) -------------------------------------------------
def warp_patient_to(patient: Patient, target: Anatomy, ops: SpectralOps, c0,
                    deformable: str = "none", sigma_field: float = 1.5, tumor_mask=None, atoms=None):
    """Register the patient's box images to target's box (tumor_mask: the masked region,
    default the patient's tumour); returns the warped (c0, d, O, vt) as backend arrays on
    target's box and a summary (with "atoms": the warped atoms, when atoms are given, and
    "labels": the warped (core, edema) fractions with label data)."""
    import SimpleITK as sitk

    from GBMMassEffectLib.registration import register_patient_to_atlas, warp_to_atlas

    gp, ga = patient.anatomy.geom, target.geom

    def channels(geom, T):
        f = {k: to_numpy(getattr(T, k)).astype(np.float32) for k in ("wm", "gm", "vt", "csf")}
        return {"vt": geom.image(f["vt"]), "gm": geom.image(f["gm"]),
                "wm_csf": geom.image(f["wm"] + f["csf"])}

    wm, gm, vt, csf = patient.s1_tissues()
    T = Tissues(wm, gm, vt, csf, patient.tissues.bg)
    mask = gp.image((patient.tumor if tumor_mask is None else tumor_mask).astype(np.uint8))
    t = time.perf_counter()
    reg = register_patient_to_atlas(channels(gp, T), channels(ga, target.tissues), mask,
                                    deformable=deformable, sigma_field=sigma_field)
    sec = time.perf_counter() - t

    def warp(a, default=0.0, interpolator=sitk.sitkLinear):
        img = warp_to_atlas(gp.image(to_numpy(a).astype(np.float32)), reg, default=default,
                            interpolator=interpolator)
        return ops.xp.asarray(sitk.GetArrayFromImage(img), dtype=ops.dtype)

    def warp_peaked(a):  # c0, its atoms, a concentration: cubic, as calibrate does (_one_atlas)
        return ops.xp.clip(warp(a, interpolator=sitk.sitkBSpline), 0, None)

    c0w = warp_peaked(c0)
    c0w = c0w / ops.dtype.type(float(ops.xp.max(c0w)))
    d = warp_peaked(patient.d) if patient.O is None else warp(patient.d)
    O = None if patient.O is None else ops.xp.where(warp(patient.O, 1.0) > 0.5, 1.0, 0.0).astype(ops.dtype)
    vt_p = warp(patient.vt)
    info = {"registration_seconds": sec, "registration_score": reg.score,
            "registration_method": reg.method, "registration_sigma_field": sigma_field}
    if atoms is not None:
        info["atoms"] = np.stack([to_numpy(warp_peaked(a)) for a in atoms])
    if patient.labels is not None:
        info["labels"] = tuple(warp(a) for a in patient.labels)
    log(f"S.2 {patient.anatomy.name} → {target.name}: score {reg.score:.3f} ({sec:.0f} s)")
    return c0w, d, O, vt_p, info


# ---- one row ------------------------------------------------------------------------------
def rel(a: float, b: float) -> float | None:
    return abs(a - b) / abs(b) if b != 0 else None


def run_row(exp: str, patient: Patient, target: Anatomy, ops: SpectralOps, args) -> dict:
    p = patient.truth
    extra: dict = {}
    t0 = time.perf_counter()
    refit = args.c0_refit and exp != "true-ic"
    atoms = weights = None
    labels = patient.labels
    if exp == "true-ic":
        c0, d, O, vt_p = patient.c0, patient.d, patient.O, patient.vt
    else:
        c0, s1 = patient.inverted_c0(args.max_iter, args.out / "cache", args.s1_coarse_factor, args.s1_tumor_misfit)
        extra.update(s1)
        if refit:
            atoms, weights = patient.s1_atoms
        if exp == "inverted-ic":
            d, O, vt_p = patient.d, patient.O, patient.vt
        else:
            c0, d, O, vt_p, reg = warp_patient_to(patient, target, ops, c0, args.registration,
                                                  args.sigma_field, atoms=atoms)
            atoms = reg.pop("atoms", None)
            labels = reg.pop("labels", None)
            extra.update(reg)
    start = dict(zip(("gamma", "rho", "kappa"), args.start))
    opts = MassEffectOptions(workers=args.workers, maxiter=args.max_iter, hessian=args.hessian,
                             coarse_grids=tuple(args.coarse_grids),
                             c0_pullback=0 if exp == "true-ic" or refit else args.c0_pullback, c0_refit=refit,
                             optimizer=args.optimizer, c0_shift=0.0 if exp == "true-ic" else args.c0_shift,
                             tumor_misfit=args.tumor_misfit if labels is not None else "indicator")

    def progress(ev):
        if args.verbose:
            par = " ".join(f"{k[0]}={ev[k]:.4g}" for k in ("gamma", "rho", "kappa") if ev.get(k) is not None)
            log(f"  {exp} {p.name} {target.name}: {ev.get('message')} ({par})")

    r = invert_mass_effect(ops, target.tissues, c0, d, O, vt_p,
                           initial=start, options=opts, progress=progress, atlas=target.name,
                           c0_atoms=atoms, c0_weights=weights, tumor_labels=labels)
    truth = {"gamma": p.gamma, "rho": p.rho, "kappa": p.kappa}
    row = {"experiment": exp, "case": p.name, "atlas": target.name, "grid": ops.n,
           "truth": truth, "start": start,
           "gamma": r.gamma, "rho": r.rho, "kappa": r.kappa,
           "e_gamma": rel(r.gamma, p.gamma), "abs_e_gamma": abs(r.gamma - p.gamma),
           "e_rho": rel(r.rho, p.rho), "e_kappa": rel(r.kappa, p.kappa),
           "max_u": r.max_u, "e_u": rel(r.max_u, patient.max_u),
           "gradient_norm": r.gradient_norm, "gradient_norm_initial": r.gradient_norm_initial,
           "relative_tumor_error": r.relative_tumor_error, "fun": r.fun,
           "misfit_tumor": r.misfit_tumor, "misfit_vt": r.misfit_vt,
           "nit": r.nit, "n_forward": r.n_forward, "message": r.message, "success": r.success,
           "hessian_condition": r.hessian_condition, "cfl_flagged": r.cfl_flagged,
           "s3_seconds": r.seconds, "seconds": time.perf_counter() - t0,
           "coarse": r.coarse, "n_forward_coarse": r.n_forward_coarse,
           "c0_pullback": opts.c0_pullback, "c0_rounds": r.c0_rounds,
           "c0_refit": refit, "c0_weights": r.c0_weights, "optimizer": opts.optimizer,
           "c0_shift_max": opts.c0_shift, "c0_shift": r.c0_shift,
           "c0_error": float(ops.norm(ops.xp.asarray(r.c0, dtype=ops.dtype) - patient.c0) / ops.norm(patient.c0))
           if target is patient.anatomy else None,
           "history": r.history, "workers": args.workers, "max_iter": args.max_iter, "data": args.data,
           "tumor_misfit": opts.tumor_misfit, "label_thresholds": list(args.label_thresholds),
           **patient.info(), **extra}
    if target is patient.anatomy:
        um = r.forward.displacement_norm()
        den = float(ops.norm(patient.umag))
        row["e_u_field"] = float(ops.norm(um - patient.umag)) / den if den > 0 else None
    # the aggregate filter of MODEL §6 ("good atlas")
    row["good"] = bool(r.max_u <= 2.0 and r.relative_tumor_error <= 1.0
                       and (r.hessian_condition is None or r.hessian_condition <= 1e4))
    return row


# ---- output ---------------------------------------------------------------------------------
def key(row) -> tuple:
    return (row["experiment"], row["case"], row["atlas"])


def label(case: str) -> str:
    return f"TC({case[-1]})"


def pct(v) -> str:
    return "—" if v is None else f"{100 * v:.2f}%"


def write_markdown(path: pathlib.Path, doc: dict) -> None:
    rows = doc["rows"]
    n = doc["grid"]
    lines = [f"# Parameter recovery on synthetic patients, {n}³", "",
             "Generated by `benchmarks/recovery.py` (see its docstring for the set-up). "
             f"Patient anatomy: {doc['patient_source']}; box 256 mm ({256 / n:g} mm voxels); "
             f"true c0 one Gaussian of σ = {doc.get('c0_sigma_mm', SIGMA_MM):g} mm; data: {doc['data']}"
             + (f" drawn at c(1) > {'/'.join(f'{t:g}' for t in rows[0].get('label_thresholds', (CORE, EDEMA)))} "
                f"(core/edema), S.3 tumour term: {'/'.join(sorted({r.get('tumor_misfit', 'indicator') for r in rows}))}"
                if doc["data"] == "labels" and rows else "") + "; "
             f"S.3 start γ, ρ, κ = {', '.join(f'{v:g}' for v in doc['start'])}; "
             f"max {doc['max_iter']} iterations, relative gradient 1e-3; S.3 optimiser: "
             f"{'/'.join(sorted({r.get('optimizer', 'lbfgsb') for r in rows}))}; "
             f"S.3 c0 translation bound (voxels, 0 = none): "
             f"{'/'.join(sorted({format(r.get('c0_shift_max') or 0, 'g') for r in rows}))}; "
             f"concurrent forward solves (workers): {'/'.join(sorted({str(r['workers']) for r in rows}))}; "
             f"{doc['machine']}.", "",
             "eX: relative error of X (TC(a) γ* = 0: absolute error, marked abs). eu: relative "
             "error of max|u| (displacement magnitude); eu field: ‖|u| − |u*|‖/‖|u*|‖ (true atlas "
             "only). ‖g‖: final projected gradient of S.3 in (10γ, ρ, 100κ) (ratio to the first). "
             "misfit: ‖O(c(1) − d)‖/‖Od‖. max|u*|, max|u|: 256³ voxels (domain units × 256/2π).", ""]
    for exp in EXPERIMENTS:
        sel = [r for r in rows if r["experiment"] == exp]
        if not sel:
            continue
        lines += [f"## {TITLES[exp]}", "", f"Paper: {PAPER[exp]}.", ""]
        lines += ["| case | atlas | γ*, ρ*, κ* | γ, ρ, κ recovered | eγ | eρ | eκ | eu | eu field "
                  "| max\\|u*\\| → max\\|u\\| | ‖g‖ (ratio) | misfit | its / solves | time s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(sel, key=lambda r: (r["case"], r["atlas"])):
            t = r["truth"]
            eg = pct(r["e_gamma"]) if r["e_gamma"] is not None else f"{r['abs_e_gamma']:.4f} abs"
            note = "" if r.get("good", True) else " (filtered)"
            s = 256 / (2 * math.pi)
            lines.append(
                f"| {label(r['case'])} | {r['atlas']}{note} | {t['gamma']:g}, {t['rho']:g}, {t['kappa']:g} "
                f"| {r['gamma']:.4f}, {r['rho']:.3f}, {r['kappa']:.5f} | {eg} | {pct(r['e_rho'])} "
                f"| {pct(r['e_kappa'])} | {pct(r['e_u'])} | {pct(r.get('e_u_field'))} "
                f"| {r['max_u_true'] * s:.2f} → {r['max_u'] * s:.2f} "
                f"| {r['gradient_norm']:.2e} ({r['gradient_norm'] / max(r['gradient_norm_initial'], 1e-300):.1e}) "
                f"| {r['relative_tumor_error']:.4f} | {r['nit']} / {r['n_forward']} | {r['seconds']:.0f} |")
        s1 = [r for r in sel if "kappa_s1" in r]
        if s1:
            lines += ["", "S.1 (inverted IC): " + "; ".join(
                f"{label(r['case'])} κ {r['kappa_s1']:.4f}, ρ {r['rho_s1']:.2f}, support {r['s1_support']}, "
                f"‖c0 − c0*‖/‖c0*‖ {r['s1_c0_error']:.3f}, {r['s1_seconds']:.0f} s"
                + (" (label band)" if r.get("s1_tumor_misfit") == "band" else "")
                + (f" (coarse-to-fine from {doc['grid'] // r['s1_coarse_factor']}³)"
                   if r.get("s1_coarse_factor", 1) > 1 else "")
                for r in sorted({r['case']: r for r in s1}.values(), key=lambda r: r['case']))]
        pb = [r for r in sel if r.get("c0_rounds")]
        if pb:
            lines += ["", "S.3 c0 pull-back (γ, ρ, κ after each solve; relative c0 change): " + "; ".join(
                f"{label(r['case'])} {r['atlas']}: " + " → ".join(
                    f"({c['gamma']:.3f}, {c['rho']:.2f}, {c['kappa']:.4f}; {c['c0_change']:.3f})"
                    for c in r["c0_rounds"]) for r in sorted(pb, key=lambda r: (r['case'], r['atlas'])))]
        rf = [r for r in sel if r.get("c0_refit")]
        if rf:
            lines += ["", "S.3 c0 refit (S.1's atom weights after S.3, each in [0, 1]; ‖c0 − c0*‖/‖c0*‖ of the "
                      "refitted c0 on the true atlas): " + "; ".join(
                          f"{label(r['case'])} {r['atlas']}: (" + ", ".join(f"{w:.2f}" for w in r["c0_weights"])
                          + ")" + ("" if not r.get("c0_shift") else
                                   " shift (" + ", ".join(f"{v:+.2f}" for v in r["c0_shift"]) + ") voxels")
                          + ("" if r.get("c0_error") is None else f", {r['c0_error']:.3f}")
                          for r in sorted(rf, key=lambda r: (r['case'], r['atlas'])))]
        reg = [r for r in sel if "registration_score" in r]
        if reg:
            lines += ["", "S.2: " + "; ".join(
                f"{label(r['case'])} → {r['atlas']} {r.get('registration_method', '')} "
                f"score {r['registration_score']:.3f} "
                f"({r['registration_seconds']:.0f} s)" for r in sorted(reg, key=lambda r: (r['case'], r['atlas'])))]
        lines.append("")
    total = sum(r["seconds"] for r in rows)
    lines += [f"Total time of the rows above: {total:.0f} s ({total / 60:.1f} min); "
              f"true forward solves (per case): " + ", ".join(
                  f"{label(c)} {s:.0f} s" for c, s in sorted(
                      {r['case']: r['forward_seconds'] for r in rows}.items())) + ".", ""]
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)


def save(doc: dict, out: pathlib.Path) -> None:
    """Write the JSON and the markdown; rows another process has written to the same JSON
    meanwhile (other keys) are kept."""
    n = doc["grid"]
    js = out / f"recovery_{n}.json"
    if js.exists():
        mine = {key(r) for r in doc["rows"]}
        try:
            theirs = [r for r in json.loads(js.read_text())["rows"] if key(r) not in mine]
        except (ValueError, KeyError):
            theirs = []
        doc["rows"] = theirs + doc["rows"]
    tmp = js.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=float))
    os.replace(tmp, js)
    write_markdown(out / f"recovery_{n}.md", doc)


# ---- main -----------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--grid", type=int, default=32, help="n (n³ voxels, box 256 mm)")
    ap.add_argument("--cases", nargs="+", default=list("abcd"), choices=list("abcd"))
    ap.add_argument("--experiments", nargs="+", default=list(EXPERIMENTS), choices=EXPERIMENTS)
    ap.add_argument("--patient-atlas", default="mni152",
                    help="bundled atlas the patients are made from ('glia': glia-testdata/atlas.nc)")
    ap.add_argument("--atlases", nargs="+", default=["sri24", "colin27"],
                    help="atlases of the other-atlases experiment (naming --patient-atlas too runs "
                         "the true atlas through S.2, as calibrate does when it is in the set)")
    ap.add_argument("--start", nargs=3, type=float, default=[0.6, 8.0, 0.02],
                    metavar=("GAMMA", "RHO", "KAPPA"), help="S.3 starting point (paper units)")
    ap.add_argument("--max-iter", type=int, default=50, help="S.3 (and S.1 final) iteration limit")
    ap.add_argument("--workers", type=int, default=2, help="concurrent forward solves in S.3")
    ap.add_argument("--hessian", action="store_true", help="also the FD Hessian condition (10 solves)")
    ap.add_argument("--coarse-grids", nargs="*", type=int, default=[],
                    help="S.3 coarse-to-fine: solve on these grids first (each divides --grid)")
    ap.add_argument("--c0", choices=("refit", "pullback", "fixed"), default="refit",
                    help="what S.3 does with S.1's c0: refit its atom weights (calibrate's default), "
                         "pull it back (--c0-pullback rounds), or keep it fixed (the paper)")
    ap.add_argument("--optimizer", choices=OPTIMIZERS, default=S3_OPTIMIZER,
                    help="S.3's optimiser (default: calibrate's)")
    ap.add_argument("--c0-pullback", type=int, default=2,
                    help="S.3 c0 pull-back rounds with --c0 pullback")
    ap.add_argument("--registration", choices=("demons", "bspline", "none"), default=S2_DEFORMABLE,
                    help="S.2 deformable stage after the affine one (other-atlases; default as calibrate)")
    ap.add_argument("--sigma-field", type=float, default=1.5,
                    help="S.2 demons field smoothing in voxels (other-atlases)")
    ap.add_argument("--data", choices=("concentration", "labels"), default="concentration")
    # not "fraction" (partial volumes): the labels here are drawn in the box, whole voxels
    # only, so they carry no partial volumes to read (calibrate's come from 1 mm images)
    box_misfits = [k for k in TUMOR_MISFITS if k != "fraction"]
    ap.add_argument("--tumor-misfit", choices=box_misfits, default=S3_TUMOR_MISFIT if S3_TUMOR_MISFIT in box_misfits
                    else "indicator",
                    help="S.3's tumour term on label data (default §5's indicator; band: the label band)")
    ap.add_argument("--s1-tumor-misfit", choices=box_misfits, default=S1_TUMOR_MISFIT,
                    help="S.1's tumour term on label data (default calibrate's: §5's indicator; band: the label band)")
    ap.add_argument("--label-thresholds", nargs=2, type=float, default=[CORE, EDEMA], metavar=("CORE", "EDEMA"),
                    help="c(1) levels the patient's labels are drawn at (default the label band's, "
                         "presets.BRATS_THRESHOLDS)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "gpu", "auto"))
    ap.add_argument("--out", type=pathlib.Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--force", action="store_true", help="recompute rows already in the JSON")
    ap.add_argument("--c0-sigma-mm", type=float, default=SIGMA_MM,
                    help="width σ of the true c0 (default 8 mm = one S.1 atom at 32³; wider: no atom reproduces it)")
    ap.add_argument("--c0-shift", type=float, default=None,
                    help="with the refit, S.3 also fits a translation of c0 within this many voxels "
                         f"(0: off; default calibrate's: {S3_C0_SHIFT_MM:g} mm on concentration "
                         "data, off on these box-drawn labels, as with calibrate's thresholded readings)")
    ap.add_argument("--s1-coarse-factor", type=int, default=None,
                    help="S.1 coarse-to-fine from n/k (1: one grid; default calibrate's: 2 from 64³ on)")
    ap.add_argument("--verbose", action="store_true", help="log every S.3 iteration")
    args = ap.parse_args(argv)
    args.c0_refit = args.c0 == "refit"
    if args.c0_shift is None:
        args.c0_shift = s3_c0_shift_voxels(args.grid, 256.0, args.data == "concentration") if args.c0_refit else 0.0
    if args.c0 != "pullback":
        args.c0_pullback = 0

    backend = get_backend(args.device, "float32")
    ops = SpectralOps(args.grid, backend)
    args.out.mkdir(parents=True, exist_ok=True)
    js = args.out / f"recovery_{args.grid}.json"
    doc = json.loads(js.read_text()) if js.exists() else {"rows": []}
    anatomy = Anatomy(args.patient_atlas, ops)
    doc.update(grid=args.grid, patient_source=anatomy.source, data=args.data, start=args.start,
               c0_sigma_mm=args.c0_sigma_mm,
               max_iter=args.max_iter, workers=args.workers,
               machine=f"{backend.device_name}, {os.cpu_count()} CPUs visible, {platform.python_version()}")
    done = {key(r) for r in doc["rows"]}
    others: dict = {}
    patients: dict = {}
    t_all = time.perf_counter()
    for exp in args.experiments:  # experiment-major: all Table 1 true-IC rows come first
        for case in args.cases:
            if exp == "other-atlases":
                if not others:
                    others = {a: Anatomy(a, ops) for a in args.atlases}  # the patient's own: through S.2 too
                targets = list(others.values())
            else:
                targets = [anatomy]
            for target in targets:
                k = (exp, CASES[case].name, target.name)
                if k in done and not args.force:
                    log(f"skip {k} (in {js.name})")
                    continue
                if case not in patients:
                    patients[case] = pt = Patient(case, anatomy, ops, args.data, args.c0_sigma_mm,
                                                  tuple(args.label_thresholds))
                    log(f"patient TC({case}) {ops.n}³: max|u*| {pt.max_u:.4f} "
                        f"({pt.max_u * 256 / (2 * math.pi):.2f} voxels at 256³), "
                        f"max c(1) {pt.c1_max:.3f}, forward {pt.forward_seconds:.1f} s")
                log(f"row {k} …")
                try:
                    row = run_row(exp, patients[case], target, ops, args)
                except Exception as exc:  # keep going: a failed row is reported, not fatal
                    log(f"row {k} failed: {type(exc).__name__}: {exc}")
                    continue
                doc["rows"] = [r for r in doc["rows"] if key(r) != k] + [row]
                save(doc, args.out)
                log(f"row {k}: γ {row['gamma']:.4f} ρ {row['rho']:.3f} κ {row['kappa']:.5f} "
                    f"eu {pct(row['e_u'])} its {row['nit']} solves {row['n_forward']} {row['seconds']:.0f} s")
    if doc["rows"]:
        save(doc, args.out)
    log(f"done in {time.perf_counter() - t_all:.0f} s; {args.out / f'recovery_{args.grid}.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
