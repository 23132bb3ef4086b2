"""The calibrate pipeline: S.1 → S.2 → S.3 per atlas → aggregate (MODEL.md §5–§6;
ARCHITECTURE.md "The process boundary").

Inputs (CalibrateJob, read from DIR/job.json or the CLI flags; unknown keys are errors):
  * the tumor: a BraTS label map (1 necrotic, 2 edema, 4 enhancing, and 3 as core: BraTS
    2023's enhancing or older BraTS's non-enhancing core; values configurable in
    tumor_label_values), or a core mask with an optional edema mask, or (synthetic studies)
    a tumor concentration image c(1) in [0, 1];
  * the patient tissue: a label map (5 gm, 6 wm, 7 vt, 8 csf; configurable) or, when absent,
    derived from the best-registered atlas through a T1 (report "patient_tissue_source");
    neither is an input error;
  * a T1 (optional; needed only without a tissue map), an atlas set (bundled, a manifest
    folder or label-map files), grid n, device, number of atlases, seed.
All patient images must share one grid (the "patient grid", that of the tumor input);
every output lies on it.

Stages:
  S.1  on the patient in the patient's n³ box (geometry.anchored_box: axes along the
       patient's nearest LPS axes, centre on a multiple of two box voxels, so that one
       anatomy gets one box and one candidate lattice however it is stored: oblique,
       flipped or another field of view): tissue fractions with the tumor counted as
       white matter, d = tumor-core indicator smoothed one voxel (or the concentration,
       sampled at the box nodes: concentration_to_box),
       O = 0 on edema; sparse_ic.solve_s1 → c0 (max 1), κ, ρ: one grid below 64³,
       coarse-to-fine from n/2 from 64³ on (job option s1.coarse_factor; 1 = one grid).
       Tumour term §5's (S1_TUMOR_MISFIT; "s1": {"tumor_misfit": "band"} as in S.3).
  Atlas choice (§6, atlases.select_atlases) by ventricle volume. When the whole tumour
       touches the patient's ventricles (tumor_borders_ventricles), a tumour label may hide
       some of them and no volume comparison is fair: §6's visible-against-whole one prefers
       atlases with small ventricles (the tc-c demo patient shows 3.0 of its ventricles' mL),
       and visible against each atlas's ventricles outside the registered tumour prefers
       large ones (the mass effect pushes ventricle out from under the tumour). Each atlas
       of the set is then registered (S.2's affine stage, tumour masked) and
       atlases.select_atlases_by_match chooses by the registration's match score (mean Dice
       of the tissue channels outside the tumour), the best match's ventricle volume standing
       for the patient's (_match_atlases; a deviation from §6; ~1.5 s per atlas at n = 32).
       These registrations are S.2's own when S.2 is affine only.
  S.2  per atlas: register patient →
       atlas (registration.register_patient_to_atlas on the tissue channels, or
       register_t1), tumor masked, affine only by default (S2_DEFORMABLE: a deformable
       stage would fit away the ventricles' compression that S.3 measures; job option
       registration.deformable = demons | bspline restores one). A T1-only patient's atlases
       are chosen by the affine T1 match to every atlas with a T1 (_derive_tissue), its
       tissue derived through affine + demons on the T1 (registration.t1_deformable), and
       that derived tissue is then registered to each atlas like a given one. Registration
       runs on isotropic grids of spacing max(atlas voxel, box voxel / 2) (4 mm at n = 32,
       the atlas's 1.5 mm at n ≥ 128): finer than the box it serves, and cheap at small n.
       c0, the core and edema fractions and the patient's ventricle fraction are warped
       into the atlas's box (fractions by m³ sub-voxel averaging), c0 rescaled to max 1, vt
       smoothed one voxel. S.3's ventricle term leaves out the whole tumour dilated one
       voxel (ventricles_observed, VT_MASK_DILATION; a deviation from §6): a tumour label
       hides the ventricles under it, where the patient's vt reads 0 whatever the truth.
  S.3  per atlas: mass_effect_inversion.invert_mass_effect from the atlas's (smoothed)
       tissues, started at γ = gamma0 (default 0.6, the reference's clinical start: between
       "no" and "large" mass effect) and S.1's κ, ρ (clipped into the S.3 bounds), with
       S.1's atom weights refitted with (γ, ρ, κ) (S3_C0_REFIT, job option s3.c0_refit:
       S.1's model has no mass effect, so its c0 is sized and placed for the wrong model;
       each support atom goes through the registration like c0; report atlases[i].c0_weights),
       and translated by up to 32 mm (S3_C0_SHIFT_MM; report atlases[i].c0_shift_mm) when
       the tumour term reads the data below the voxel scale (a concentration; labels as
       partial volumes).
       "c0_pullback": K instead pulls S.1's c0 back K rounds with S.3's displacement; both
       off is the paper's fixed c0 (mass_effect_inversion's docstring). The optimiser is
       Gauss-Newton on the residual's FD Jacobian (S3_OPTIMIZER; "s3": {"optimizer":
       "lbfgsb"} is §6's L-BFGS-B): with the refit's coupled weights it converges in ~5×
       fewer forward solves.
       The tumour term on labels or masks (S3_TUMOR_MISFIT) reads them as partial volumes
       by default ("s3": {"tumor_misfit": "fraction"}) (the warped core and edema fractions
       against the shares of each voxel above the label thresholds that c(1) predicts; a
       deviation from §5, measured better, README "Accuracy"); "indicator" is §5's, "band" reads each label
       boundary as an iso-contour of c(1); a concentration is compared as is (§5 with O = 1, sampled at
       the atlas box nodes through the registration; c0 and its atoms are warped cubically).
       c(1) and u (LPS mm) go back to the patient grid through the inverse map (u's vectors
       pushed forward through the map, registration.warp_to_patient); the patient-space |u|
       is the norm of those vectors. report max_u_mm is S.3's max|u| in atlas space.
  Aggregate: aggregate.py (dropping rules, mean ± std, voxel-wise averages).
Atlases run one after the other here; S.3 already runs its four finite-difference solves
concurrently (options.s3.workers). The pipeline is cut at its joints (prepare_calibration:
inputs, tissue, atlas choice, S.1; calibrate_atlas: S.2 + S.3 on one atlas;
CalibrationAssembly: outputs and report), so cohort.py runs the same steps as
independent (patient, atlas) Dask tasks.

Atlases whose run fails (registration or S.3 error) are recorded and dropped, not fatal.
If every atlas meets a dropping rule, the summary and volumes use all atlases with a
result and report.json says so (summary.basis); if none has a result the run fails
(exit 1, one error line listing each atlas's reason). See aggregate.py.

Outputs (through an OutputSet: atomic, removed on failure or cancel; report.json last):
predicted_tumor.nrrd, displacement_norm.nrrd (mm), displacement_norm_std.nrrd,
displacement.nrrd (LPS mm vectors; the same convention as simulate: deformed(x) ≈
healthy(x − u(x))), initial_condition.nrrd, predicted_tumor_t<T>.nrrd for each requested
later time, patient_tissue_labels.nrrd when the tissue was derived, and atlas_<name>/
(predicted_tumor, displacement_norm, displacement on the patient grid, result.json).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from . import aggregate, io
from .backend import get_backend, to_numpy
from .geometry import BoxGeometry, anchored_box, box_for_image, snapped_to_image
from .progress import OutputSet, check_cancel

S3_C0_REFIT = True  # S.3 refits S.1's atom weights by default (job option s3.c0_refit)
#: S.3's optimiser (job option s3.optimizer): Gauss-Newton in a trust region on the FD
#: Jacobian of the residual, the same 1 + |x| solves per iteration as §6's FD gradient
#: (mass_effect_inversion's docstring); "lbfgsb" is §6's L-BFGS-B
S3_OPTIMIZER = "gauss-newton"
#: with the refit, S.3 also optimises a translation of c0 of up to this many mm per axis
#: (job option s3.c0_shift, in voxels of the grid; 0 = off) whenever its tumour term reads
#: the data below the voxel scale: a tumour concentration, or labels as partial volumes
#: (S3_TUMOR_MISFIT "fraction", the default). S.1's atoms sit on a lattice two box voxels
#: apart (16 mm at 32³), fitted by a model without mass effect, so its c0 is a blend of
#: neighbouring atoms, wider and heavier than the seed, and S.3 answers with a low ρ;
#: translated, one atom can sit on the seed (Table 1 concentration TC(b)-(d) at 32³: every
#: error < 1%, from eγ up to 3.6%, eu up to 8.5%; patient P1 of benchmarks/ACCURACY.md, γ 0.6
#: in sri24, on its own atlas: γ 0.727 → 0.563, the tumour misfit J 1.45e-2 → 8.0e-4).
#: With labels read as partial volumes the same (whole path, 32³, 2026-12-07: label TC(d)
#: γ −38% with the indicator, −17% with the partial volumes alone, +1.3% with both; P5,
#: γ 0.3 with a 4 mm mass effect, on its own atlas −4.5% where the indicator gave −81%).
#: With thresholded labels (tumor_misfit "indicator" or "band") it stays off: measured at
#: 32³ it helps on label TC(c) (eγ 13.8% → 7.6%) but hurts on label TC(b) (3.3% → 6.9%)
#: and the tc-b demo patient (0.5% → 35% over): a voxel's label says where the tumour is
#: but not where in the voxel its boundary runs, so the translation has nothing to go by.
#: Its price: 3 more forward solves per S.3 iteration. The bound is 32 mm, two lattice steps
#: at 32³: a large mass effect moves the tumour off its seed as well (tc-d: by up to 0.6
#: max|u| along one axis). With 16 mm the tc-d patient (γ 1.2, max|u| 34 mm) converged with
#: the translation on its bound along one axis at γ 5.4% under, max|u| 7.3% under, tumour
#: misfit 0.049; with 24 mm and with 32 mm the translation settled at (20.2, 14.3, −7.3) mm,
#: inside the bound, and γ 0.1% over, max|u| 1.8–1.9% under, ρ 0.0%, misfit 0.020. 32 mm
#: leaves that margin up to γ's 1.5 bound (benchmarks/ACCURACY.md, "The translation bound").
S3_C0_SHIFT_MM = 32.0
#: S.3's tumour term on a label map or masks (job option s3.tumor_misfit; concentration data
#: always uses §5's): "fraction" (the default, a deviation from §5) reads the labels as
#: partial volumes: the warped core and whole-tumour box fractions against each voxel's
#: share above the levels `simulate` labels at (s3.core_threshold 0.4, s3.edema_threshold
#: 0.02) that c(1) predicts below the voxel scale (observation.PartialVolumeMisfit), with c0
#: translated by up to S3_C0_SHIFT_MM. "indicator" is §5's ½h³‖O(c(1) − d)‖², which pulls
#: the core to c = 1; "band" reads each label boundary as an iso-contour of c(1), per
#: voxel. Both threshold each voxel, so 32³ labels do not determine κ and γ trades against
#: it: whole path, 32³ (README "Accuracy"), label TC(d) γ −38% with the indicator, −0.3% with
#: the band and the translation, +1.3% (max|u| −1.4%, ρ −1.3%, κ −7.7%) with the partial
#: volumes and the translation; synthetic patients P1, P4, P5 on two atlases each, mean γ
#: +11.5%, +3.2%, +10.8% against the indicator's +5.2%, +56%, −81% (README has every row).
S3_TUMOR_MISFIT = "fraction"
#: S.1's tumour term on a label map or masks (job option s1.tumor_misfit, as S.3's): §5's
#: indicator; "band" sizes S.1's c0 to the label band as well. Measured at 32³ (README
#: "Accuracy"): a c0 slightly nearer the truth on TC(c), TC(d), but no better γ or max|u|
#: after S.3 with either S.3 term, so the indicator stays.
S1_TUMOR_MISFIT = "indicator"
#: S.3's ventricle term leaves out the whole tumour dilated by this many box voxels
#: (ventricles_observed): a tumour label hides the ventricles under it. Found on the demo
#: patient, whose labels cover 3/4 of its ventricles: with the full term the warped patient
#: had 1/4 of the model's vt, and J_vt fell monotonically towards γ = 0.
VT_MASK_DILATION = 1


def s3_c0_shift_voxels(grid: int, box_mm: float, subvoxel: bool = True) -> float:
    """S.3's default translation bound of c0 in voxels of an n³ box of edge box_mm
    (MassEffectOptions.c0_shift): S3_C0_SHIFT_MM when the tumour term reads the data below
    the voxel scale (subvoxel: a concentration, or labels as partial volumes), else 0."""
    return S3_C0_SHIFT_MM * grid / box_mm if subvoxel else 0.0
#: default deformable stage of the S.2 registration that carries the patient's data into an
#: atlas for S.3 (job option registration.deformable): none, i.e. affine only. A deformable
#: stage matches the patient's compressed ventricles to the atlas's and so removes the mass
#: effect that S.3 is to measure. Measured at 32³ (TC(c), γ* 0.8; the γ that best fits the
#: warped ventricles at the true ρ, κ and c0): registered onto its own atlas, demons 0.45,
#: affine only 0.75; onto colin27 0.33 vs 0.63, sri24 0.24 vs 0.53.
S2_DEFORMABLE = "none"
STAGE_SPAN = {"setup": (0.0, 0.03), "S.1": (0.03, 0.25), "atlases": (0.25, 0.95), "output": (0.95, 1.0)}
#: report note for a tumour input with a core and no edema (a T1 mask, a label map without
#: label 2): read as not segmented (edema None, as for --tumor-core alone), so the whole
#: tumour's extent, which is what fixes κ, is not in the data.
NO_EDEMA_NOTE = ("no edema in the tumour input (a core mask alone, or a label map without the edema "
                 "label), read as not segmented: nothing fixes how far the tumour "
                 "infiltrates, so κ is left to the ventricles and often ends on a bound, and max|u| "
                 "may be underestimated (a core mask alone: a third under in README, Accuracy); give "
                 "the edema (--edema, or label 2 in --tumor-seg) when it is segmented")

DEFAULT_TUMOR_VALUES = {"necrotic": 1, "edema": 2, "enhancing": 4}
#: BraTS label 3 is tumour core in every BraTS convention: non-enhancing tumour core in
#: BraTS 2012–2016, enhancing tumour from BraTS 2023 (1 NCR, 2 ED, 3 ET). A tumour label
#: map may carry it whenever no configured tumour or tissue value is 3; it counts as core.
BRATS_OTHER_CORE = 3
DEFAULT_TISSUE_VALUES = {"gm": 5, "wm": 6, "vt": 7, "csf": 8}
CONCENTRATION_MASK = 0.1  # c above this is "tumor" for the registration mask (concentration input)


class InputError(ValueError):
    """A bad calibrate input (one-line message naming the problem)."""


# ---- the job ------------------------------------------------------------------------------
@dataclass
class CalibrateJob:
    """Everything a calibration needs (job.json keys; ARCHITECTURE.md "The process boundary").

    options: {"s1": SparseICOptions fields, "s3": MassEffectOptions fields,
              "registration": {deformable, t1_deformable, iterations, affine_iterations, sigma_field,
              spacing_mm}}."""

    command: str = "calibrate"
    t1: str | None = None
    tumor_labels: str | None = None
    tumor_label_values: dict = field(default_factory=lambda: dict(DEFAULT_TUMOR_VALUES))
    tumor_core: str | None = None
    edema: str | None = None
    tumor_concentration: str | None = None
    tissue_labels: str | None = None
    tissue_label_values: dict = field(default_factory=lambda: dict(DEFAULT_TISSUE_VALUES))
    atlas_set: object = "bundled"  # "bundled" | folder | manifest | label map | list of label maps
    atlases: list | None = None  # atlas names to use (in the set), bypassing the §6 choice
    grid: int = 64
    device: str = "auto"
    precision: str = "float32"
    n_atlases: int | None = None  # None: the §6 rule (4 … 8); K: exactly K (fewer if the set is smaller)
    seed: int = 0
    out: str | None = None
    box_mm: float = 256.0
    gamma0: float = 0.6
    predict_times: list = field(default_factory=list)
    options: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict, base_dir: str | None = None) -> "CalibrateJob":
        if not isinstance(d, dict):
            raise InputError("job.json must hold a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"job.json: unknown key(s) {', '.join(unknown)}; known keys are "
                             f"{', '.join(sorted(known))}")
        job = cls(**d)
        if base_dir:
            job.resolve_paths(base_dir)
        return job

    @classmethod
    def from_job_dir(cls, folder: str) -> "CalibrateJob":
        path = os.path.join(folder, "job.json")
        if not os.path.isdir(folder):
            raise InputError(f"job folder not found: {folder}")
        if not os.path.isfile(path):
            raise InputError(f"no job.json in the job folder {folder}")
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"{path} is not valid JSON: {exc}") from None
        job = cls.from_dict(d, folder)
        if job.out is None:
            job.out = os.path.join(folder, "out")
        return job

    def resolve_paths(self, base: str) -> None:
        def res(p):
            return p if p is None or os.path.isabs(p) else os.path.join(base, p)

        for name in ("t1", "tumor_labels", "tumor_core", "edema", "tumor_concentration",
                     "tissue_labels", "out"):
            setattr(self, name, res(getattr(self, name)))
        a = self.atlas_set
        if isinstance(a, str) and a not in ("bundled", "default"):
            self.atlas_set = res(a)
        elif isinstance(a, list):
            self.atlas_set = [res(p) for p in a]

    def validate(self) -> None:
        """Check types and combinations; raise InputError with one line."""
        if self.command != "calibrate":
            raise InputError(f"job.json: command must be 'calibrate', got {self.command!r}")
        tumor = [k for k in ("tumor_labels", "tumor_core", "tumor_concentration") if getattr(self, k)]
        if not tumor:
            raise InputError("no tumor given: give a tumor label map (--tumor-seg), a core mask "
                             "(--tumor-core [--edema]) or a tumor concentration")
        if len(tumor) > 1:
            raise InputError(f"give only one tumor input, got {', '.join(tumor)}")
        if self.edema and not self.tumor_core:
            raise InputError("--edema needs --tumor-core")
        if not self.tissue_labels and not self.t1:
            raise InputError("neither a tissue segmentation (--tissue-seg) nor a T1 (--t1) given: "
                             "one is needed to place the patient's brain")
        if not self.out:
            raise InputError("no output folder given (--out DIR)")
        if isinstance(self.grid, bool) or not isinstance(self.grid, int) or self.grid < 16 or self.grid % 2:
            raise InputError(f"grid must be an even integer >= 16, got {self.grid!r}")
        if self.device not in ("auto", "cpu", "gpu"):
            raise InputError(f"device must be auto, cpu or gpu, got {self.device!r}")
        if self.precision not in ("float32", "float64"):
            raise InputError(f"precision must be float32 or float64, got {self.precision!r}")
        if self.n_atlases is not None and (isinstance(self.n_atlases, bool) or not isinstance(self.n_atlases, int)
                                           or self.n_atlases < 1):
            raise InputError(f"n_atlases must be a positive integer, got {self.n_atlases!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise InputError(f"seed must be an integer, got {self.seed!r}")
        if not (isinstance(self.box_mm, (int, float)) and self.box_mm > 0 and math.isfinite(self.box_mm)):
            raise InputError(f"box_mm must be a positive length, got {self.box_mm!r}")
        if not (isinstance(self.gamma0, (int, float)) and 0 <= self.gamma0 <= 1.5):
            raise InputError(f"gamma0 must be in [0, 1.5], got {self.gamma0!r}")
        if not isinstance(self.predict_times, list) or not all(
                isinstance(t, (int, float)) and 1.0 < t <= 3.0 for t in self.predict_times):
            raise InputError(f"predict_times must be a list of times in (1, 3], got {self.predict_times!r}")
        for name, vals, keys in (("tumor_label_values", self.tumor_label_values, DEFAULT_TUMOR_VALUES),
                                 ("tissue_label_values", self.tissue_label_values, DEFAULT_TISSUE_VALUES)):
            if not isinstance(vals, dict) or set(vals) != set(keys) or not all(
                    isinstance(v, int) and 0 < v < 256 for v in vals.values()):
                raise InputError(f"{name} must map {', '.join(keys)} to label values 1..255, got {vals!r}")
        allv = list(self.tumor_label_values.values()) + list(self.tissue_label_values.values())
        if len(set(allv)) != len(allv):
            raise InputError(f"tumor and tissue label values must all differ, got {allv}")
        if not isinstance(self.options, dict) or set(self.options) - {"s1", "s3", "registration"}:
            raise InputError("options must be an object with keys among s1, s3, registration; got "
                             f"{sorted(self.options) if isinstance(self.options, dict) else self.options!r}")
        self.s1_options()
        self.s3_options()
        self.registration_options()

    def s1_options(self):
        from .sparse_ic import SparseICOptions

        d = dict(self.options.get("s1") or {})
        unknown = set(d) - {f.name for f in dataclasses.fields(SparseICOptions)}
        if unknown:
            raise InputError(f"unknown S.1 option(s): {', '.join(sorted(unknown))}")
        self._label_misfit_only(d, "S.1")
        d.setdefault("tumor_misfit", S1_TUMOR_MISFIT)
        try:
            o = SparseICOptions(**d)
            o.check()
        except (TypeError, ValueError) as exc:
            raise InputError(f"S.1 options: {exc}") from None
        return o

    def s3_options(self):
        from .mass_effect_inversion import MassEffectOptions

        d = dict(self.options.get("s3") or {})
        self._label_misfit_only(d, "S.3")
        d.setdefault("tumor_misfit", S3_TUMOR_MISFIT)
        # S.1's c0 comes from a model without mass effect: S.3 refits its atom weights
        # (mass_effect_inversion's module docstring); it also translates it ("c0_shift",
        # voxels) by default when its tumour term reads the data below the voxel scale: a
        # concentration, or labels as partial volumes (S3_C0_SHIFT_MM says why).
        # "c0_refit": false with "c0_pullback": K pulls it back K rounds instead;
        # "c0_refit": false alone keeps the paper's fixed c0.
        d.setdefault("c0_refit", S3_C0_REFIT and not d.get("c0_pullback"))
        d.setdefault("c0_pullback", 0)
        d.setdefault("optimizer", S3_OPTIMIZER)
        subvoxel = bool(self.tumor_concentration) or d["tumor_misfit"] == "fraction"
        d.setdefault("c0_shift", s3_c0_shift_voxels(self.grid, self.box_mm, subvoxel)
                     if d["c0_refit"] is True else 0.0)
        try:
            return MassEffectOptions.from_dict(d)
        except (TypeError, ValueError) as exc:
            raise InputError(f"S.3 options: {exc}") from None

    def _label_misfit_only(self, d: dict, stage: str) -> None:
        """A concentration is compared as is (§5 with O = 1): the band and the partial
        volumes need labels."""
        if self.tumor_concentration:
            kind = d.get("tumor_misfit", "indicator")
            if kind != "indicator":
                raise InputError(f"{stage} option tumor_misfit {kind!r} needs a tumor label map or masks, "
                                 "not a tumor concentration")
            d["tumor_misfit"] = "indicator"

    def registration_options(self) -> dict:
        """S.2 settings. deformable: the stage after the affine of the registration that
        carries the patient's data into each atlas for S.3 (default S2_DEFORMABLE, "none");
        t1_deformable: the one that derives the patient tissue from a T1 (default "demons")."""
        d = {"deformable": S2_DEFORMABLE, "t1_deformable": "demons", "iterations": 60,
             "affine_iterations": 100, "sigma_field": 1.5, "spacing_mm": None}
        given = dict(self.options.get("registration") or {})
        unknown = set(given) - set(d)
        if unknown:
            raise InputError(f"unknown registration option(s): {', '.join(sorted(unknown))}")
        d.update(given)
        for key in ("deformable", "t1_deformable"):
            if d[key] not in ("demons", "bspline", "none"):
                raise InputError(f"registration {key} must be demons, bspline or none, got {d[key]!r}")
        return d

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---- reading the patient --------------------------------------------------------------------
@dataclass
class Patient:
    reference: sitk.Image  # the patient grid (of the tumor input); outputs land here
    core: np.ndarray | None  # tumor core indicator on the patient grid (float32 0/1)
    edema: np.ndarray | None
    concentration: np.ndarray | None
    whole: np.ndarray  # bool: where the tumour hides the tissue (core ∪ edema, or c > 0.1;
    #                    ∪ the tissue map's tumour labels)
    tissue: sitk.Image | None  # canonical labels 0/5/6/7/8 (tumor voxels: as given)
    t1: sitk.Image | None
    tumor_source: str
    notes: tuple = ()  # what was read how (e.g. BraTS label 3 as tumour core)


def _core_values(job: CalibrateJob) -> list[int]:
    """Tumour-label values that count as core: necrotic, enhancing, and BraTS label 3 where
    no configured value is 3 (BRATS_OTHER_CORE)."""
    tv, sv = job.tumor_label_values, job.tissue_label_values
    core = [tv["necrotic"], tv["enhancing"]]
    if BRATS_OTHER_CORE not in (*tv.values(), *sv.values()):
        core.append(BRATS_OTHER_CORE)
    return core


def _read_any_labels(path, values: dict, extra_allowed, what: str) -> np.ndarray:
    img = io.read_image(path, what)
    allowed = {0, *values.values(), *extra_allowed}
    io.check_labels(img, allowed, f"{what} {path}")
    return img


def _same_grid_or_fail(img: sitk.Image, ref: sitk.Image, what: str, ref_what: str) -> None:
    if not io.same_geometry(img, ref, tol=1e-4):
        g, r = io.geometry_dict(img), io.geometry_dict(ref)
        diff = [k for k in ("size", "spacing", "origin", "direction")
                if not np.allclose(g[k], r[k], atol=1e-3 if k == "origin" else 1e-4)]
        raise InputError(f"mismatched geometry: the {what} and the {ref_what} are not on one grid "
                         f"(they differ in {', '.join(diff) or 'geometry'}); resample them onto one grid")


def _holes_around(labelled: np.ndarray, tumour: np.ndarray) -> np.ndarray:
    """The unlabelled voxels enclosed by the brain (labelled ∪ tumour) in the components
    that hold tumour voxels: the hole a tissue map leaves under a tumour (other small
    interior holes of a segmentation stay as they are)."""
    from scipy import ndimage

    holes = ndimage.binary_fill_holes(labelled | tumour) & ~labelled
    comp, _ = ndimage.label(holes)
    keep = np.unique(comp[tumour & holes])
    return np.isin(comp, keep[keep > 0])


def read_patient(job: CalibrateJob) -> Patient:
    tv, sv = job.tumor_label_values, job.tissue_label_values
    core_values = _core_values(job)
    tumor_values = sorted({*tv.values(), *core_values})
    core = edema = conc = None
    notes = []
    if job.tumor_labels:
        ref = _read_any_labels(job.tumor_labels, tv, [*sv.values(), *core_values], "tumor label map")
        a = sitk.GetArrayFromImage(ref)
        core = np.isin(a, core_values).astype(np.float32)
        edema = (a == tv["edema"]).astype(np.float32)
        source = "BraTS labels"
        if BRATS_OTHER_CORE in core_values and (a == BRATS_OTHER_CORE).any():
            notes.append(f"tumor label {BRATS_OTHER_CORE} read as tumour core (non-enhancing core in BraTS "
                         "2012-2016, enhancing tumour from BraTS 2023)")
    elif job.tumor_core:
        ref = io.read_image(job.tumor_core, "tumor core mask")
        core = (sitk.GetArrayFromImage(ref) > 0.5).astype(np.float32)
        if job.edema:
            e = io.read_image(job.edema, "edema mask")
            _same_grid_or_fail(e, ref, "edema mask", "tumor core mask")
            edema = ((sitk.GetArrayFromImage(e) > 0.5) & (core < 0.5)).astype(np.float32)
        source = "core/edema masks"
    else:
        ref = io.read_image(job.tumor_concentration, "tumor concentration")
        conc = sitk.GetArrayFromImage(ref).astype(np.float32)
        if conc.min() < -1e-3 or conc.max() > 1 + 1e-3:
            raise InputError(f"tumor concentration must lie in [0, 1], got [{conc.min():.3g}, {conc.max():.3g}]")
        conc = np.clip(conc, 0, 1)
        source = "tumor concentration"
    ref = sitk.Cast(ref, sitk.sitkFloat32) if ref.GetPixelID() != sitk.sitkFloat32 else ref
    if conc is not None:
        if conc.max() <= CONCENTRATION_MASK:
            raise InputError(f"the tumor concentration is empty (max {conc.max():.3g} <= {CONCENTRATION_MASK})")
        whole = conc > CONCENTRATION_MASK
    else:
        if not core.any():
            raise InputError("the tumor is empty: no tumor-core (necrotic or enhancing) voxel in "
                             f"{job.tumor_labels or job.tumor_core}")
        whole = (core > 0.5) | (edema is not None and edema > 0.5)
        if edema is None or not edema.any():  # not segmented: as a core mask alone (NO_EDEMA_NOTE)
            edema = None
            notes.append(NO_EDEMA_NOTE)
    tissue = t1 = None
    if job.tissue_labels:
        raw = _read_any_labels(job.tissue_labels, sv, tumor_values, "tissue label map")
        _same_grid_or_fail(raw, ref, "tissue label map", "tumor input")
        a = sitk.GetArrayFromImage(raw)
        canon = np.zeros(a.shape, np.uint8)
        for k, v in sv.items():
            canon[a == v] = DEFAULT_TISSUE_VALUES[k]
        if not np.isin(canon, [5, 6]).any():
            raise InputError(f"the tissue label map {job.tissue_labels} has no gray or white matter")
        if not (canon == 7).any():
            raise InputError(f"the tissue label map {job.tissue_labels} has no ventricles "
                             f"(label {sv['vt']}); the atlas choice and S.3 need them")
        tissue = io.image_like(canon, raw)
        # Tumour labels in the tissue map, and an unlabelled hole inside the brain that holds
        # the tumour, hide the tissue there too (canon 0): they join the whole tumour for
        # S.1's brain, S.2's mask and S.3's ventricle mask. Left out, a concentration input
        # (whole = c > 0.1) left the labelled ring 0.02 < c < 0.1 unmasked, and the affine
        # S.2 registered a patient onto its own atlas 60 mm off (Dice of the ventricles 0.05).
        whole = whole | np.isin(a, tumor_values)
        whole = whole | _holes_around(canon > 0, whole)
    if job.t1:
        t1 = io.read_image(job.t1, "T1")
        _same_grid_or_fail(t1, ref, "T1", "tumor input")
        arr = sitk.GetArrayViewFromImage(t1)
        if not arr.max() > arr.min():
            raise InputError(f"the T1 {job.t1} is constant (no contrast)")
        t1 = sitk.Cast(t1, sitk.sitkFloat32)
    return Patient(ref, core, edema, conc, whole, tissue, t1, source, tuple(notes))


# ---- grids and warping ----------------------------------------------------------------------
def iso_grid(ref: sitk.Image, spacing: float) -> sitk.Image:
    """An empty float image with ref's direction covering ref's extent at isotropic spacing."""
    sp = np.asarray(ref.GetSpacing(), float)
    size = np.maximum(2, np.ceil(np.asarray(ref.GetSize()) * sp / spacing).astype(int))
    D = np.asarray(ref.GetDirection(), float).reshape(3, 3)
    origin = np.asarray(ref.GetOrigin(), float) + D @ ((spacing - sp) / 2.0)
    img = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    img.SetSpacing([float(spacing)] * 3)
    img.SetOrigin([float(v) for v in origin])
    img.SetDirection(ref.GetDirection())
    return img


def resample_to(img: sitk.Image, ref: sitk.Image, kind: str = "linear") -> sitk.Image:
    """img onto ref's grid (identity map); linear resampling is anti-aliased (Gaussian of
    half the target voxel) when the target is more than 1.5× coarser."""
    if kind == "label":
        return sitk.Resample(img, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0.0, img.GetPixelID())
    src = sitk.Cast(img, sitk.sitkFloat32)
    ratio = max(ref.GetSpacing()) / min(img.GetSpacing())
    if ratio > 1.5:
        src = sitk.SmoothingRecursiveGaussian(src, [0.5 * s for s in ref.GetSpacing()])
    return sitk.Resample(src, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def channel_images(labels: sitk.Image, ref: sitk.Image) -> dict:
    """Registration channels {vt, gm, wm_csf} of a canonical label map, on ref's grid."""
    from .registration import channels_from_labels

    return {k: resample_to(v, ref) for k, v in channels_from_labels(labels).items()}


def onehot(labels_arr, values, ref: sitk.Image) -> sitk.Image:
    return io.image_like(np.isin(labels_arr, list(values)).astype(np.float32), ref)


def warp_fraction_to_box(img: sitk.Image, reg, geom: BoxGeometry, m: int) -> np.ndarray:
    """A patient-space fraction image → the atlas box (warp through reg.forward onto an
    m-times finer box, then the mean over each voxel's m³ sub-voxels)."""
    from .registration import warp_to_atlas

    fine = geom.refined(m) if m > 1 else geom
    w = warp_to_atlas(sitk.Cast(img, sitk.sitkFloat32), reg, fine.reference_image())
    a = sitk.GetArrayFromImage(w).astype(np.float64)
    n = geom.n
    if m > 1:
        a = a.reshape(n, m, n, m, n, m).mean(axis=(1, 3, 5))
    return a.astype(np.float32)


def concentration_to_box(img: sitk.Image, geom: BoxGeometry, reg=None) -> np.ndarray:
    """A patient-space tumour concentration → the box, *sampled* at the box voxel centres
    (through reg.forward when given) by interpolating cubic B-splines, clipped to [0, 1];
    not averaged over each voxel as the fractions are. The model's grid values are point
    values of c (§3), and a voxel mean of a peaked concentration is wider than its point
    values: the box filter adds h²/12 to its variance per axis, and on a patient that
    `simulate` drew linearly onto the image (before it drew cubically) the mean over the same
    box added h²/4, which S.3 read as diffusion (32³, P1 of ACCURACY.md on its own atlas,
    true c0: data averaged κ 103% over, ρ 9% under, γ 11% over; sampled from the cubic
    drawing κ 1.7%, ρ 0.3%, γ 0.6%; benchmarks/data_path.py). Linear interpolation adds
    δ(1−δ) image voxel² per axis at an offset δ from the image's voxels: nothing on a 1 mm
    image, 0.2 box voxel² on the reference solver's own 64³ patient given at 4 mm and
    sampled into a 64³ box half a voxel off (benchmarks/glia_patient.py)."""
    from .registration import warp_to_atlas

    img = sitk.Cast(img, sitk.sitkFloat32)
    if reg is None:
        a = geom.to_box(img, "cubic", dtype=np.float32)
    else:
        a = sitk.GetArrayFromImage(warp_to_atlas(img, reg, geom.reference_image(), interpolator=sitk.sitkBSpline))
    return np.clip(a, 0.0, 1.0).astype(np.float32, copy=False)


def ventricles_observed(whole_fraction: np.ndarray) -> np.ndarray:
    """Where S.3's ventricle term compares (1) or not (0): outside the whole tumour (box
    fraction > 0.5) dilated by one voxel, since a tumour label hides the tissue under it
    (the patient's vt is 0 there, whatever the model's) and the patient's vt is smoothed one
    voxel (VT_MASK_DILATION)."""
    import scipy.ndimage

    hidden = scipy.ndimage.binary_dilation(np.asarray(whole_fraction) > 0.5, iterations=VT_MASK_DILATION)
    return (~hidden).astype(np.float32)


def supersample_factor(geom: BoxGeometry, spacing: float) -> int:
    return int(min(4, max(1, math.ceil(geom.spacing / spacing - 1e-9))))


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


class CalibrateOutputs(OutputSet):
    """OutputSet that also removes the sub-folders (and the output folder) it created when
    a run is rolled back, so a cancelled run leaves nothing behind."""

    def __init__(self, folder):
        existed = os.path.isdir(folder)
        super().__init__(folder)
        self.created_dirs = [] if existed else [self.folder]

    def subfolder(self, name: str) -> str:
        path = os.path.join(self.folder, name)
        if not os.path.isdir(path):
            os.makedirs(path)
            self.created_dirs.append(path)
        return path

    def rollback(self) -> None:
        super().rollback()
        for d in sorted(self.created_dirs, key=len, reverse=True):
            try:
                os.rmdir(d)
            except OSError:
                pass


# ---- the pipeline ---------------------------------------------------------------------------
class _Progress:
    """Maps stage-local progress onto one monotone overall fraction."""

    def __init__(self, progress):
        self.progress = progress
        self.last = 0.0

    def __call__(self, stage, lo, hi, local, message, **extra):
        f = lo + (hi - lo) * min(max(float(local or 0.0), 0.0), 1.0)
        self.last = f = max(self.last, f)
        if self.progress is not None:
            self.progress({"stage": stage, "fraction": round(f, 4),
                           "stage_fraction": round(min(max(float(local or 0.0), 0.0), 1.0), 4),
                           "message": message, **extra})

    def sub(self, stage, lo, hi, **fixed):
        """A callback for a solver that reports dicts with its own 'fraction'."""
        def cb(d):
            d = dict(d)
            local = d.pop("fraction", 0.0)
            msg = d.pop("message", "")
            d.pop("stage", None)
            d.update(fixed)
            self(stage, lo, hi, local, msg, **{k: v for k, v in d.items() if _small(v)})
        return cb


def _small(v) -> bool:
    return isinstance(v, (int, float, str, bool)) or v is None


def _versions(backend) -> dict:
    from .simulate import _versions as v

    return v(backend)


@dataclass
class CalibrationSetup:
    """A patient after the per-patient work (tissue, atlas choice by ventricle volume, S.1):
    what every per-atlas task (S.2 + S.3) needs. Plain data (numpy arrays, SimpleITK images
    and transforms, atlas records), so a cohort can ship it to Dask workers."""

    job: CalibrateJob
    patient: Patient
    tissue_img: sitk.Image
    tissue_source: str
    notes: list
    vt_ml: float
    chosen: list  # [(Atlas, why)]
    registrations: dict  # atlas name → S.2's Registration when made before S.1 (T1 path, atlas choice)
    geom_p: BoxGeometry
    c0_box: np.ndarray  # S.1's c0 on the patient box (max 1)
    c0_atoms_box: np.ndarray | None  # S.1's support atoms on the patient box, (s, n, n, n) (c0_refit)
    c0_weights: list | None  # their S.1 weights p (c0_box = Σ p_i φ_i / max)
    s1_kappa: float
    s1_rho: float
    s1_report: dict
    reg_opt: dict
    s1_opt: object
    s3_opt: object
    timings: dict
    t_start: float

    @property
    def box_spacing(self) -> float:
        return self.job.box_mm / self.job.grid

    @property
    def pred_times(self) -> list:
        return sorted(float(t) for t in self.job.predict_times)


def _as_progress(progress) -> "_Progress":
    return progress if isinstance(progress, _Progress) else _Progress(progress)


def prepare_calibration(job: CalibrateJob, progress=None, cancel=None) -> CalibrationSetup:
    """The per-patient part of the pipeline: read and check the inputs, the patient tissue
    (given, or derived through the T1), the atlas choice (§6) and S.1 on the patient box."""
    from .atlases import AtlasError, load_atlas_set, select_atlases, ventricle_volume_ml
    from .spectral import SpectralOps

    job.validate()
    P = _as_progress(progress)
    timings: dict = {}
    t_all = time.perf_counter()
    P("setup", 0.0, 0.03, 0.0, "reading the inputs")
    patient = read_patient(job)
    try:
        aset = load_atlas_set(job.atlas_set)
    except FileNotFoundError as exc:
        raise InputError(str(exc)) from None
    except AtlasError as exc:
        raise InputError(str(exc)) from None
    backend = get_backend(job.device, job.precision)
    ops = SpectralOps(job.grid, backend)
    reg_opt = job.registration_options()
    s1_opt, s3_opt = job.s1_options(), job.s3_options()
    check_cancel(cancel)

    # ---- patient tissue ------------------------------------------------------------------
    registrations: dict = {}
    t0 = time.perf_counter()
    tissue_source = "tissue label map"
    notes: list[str] = list(patient.notes)
    box_spacing = job.box_mm / job.grid
    if patient.tissue is None:
        tissue_img, chosen, registrations, derived_from = _derive_tissue(
            job, patient, aset, reg_opt, box_spacing, P, cancel)
        tissue_source = f"derived from the best-registered atlas '{derived_from}' (no tissue segmentation given)"
        notes.append(f"patient tissue {tissue_source}")
        if reg_opt["t1_deformable"] != reg_opt["deformable"]:
            registrations = {}  # they carry the patient's data only when both stages agree
    else:
        tissue_img = patient.tissue
        chosen = None
    tissue_arr = sitk.GetArrayFromImage(tissue_img)
    vt_ml = ventricle_volume_ml(tissue_img)
    if not vt_ml > 0:
        raise InputError("the patient has no ventricles (label 7) in its tissue map")
    if chosen is None and not job.atlases and tumor_borders_ventricles(tissue_img, patient):
        chosen, regs = _match_atlases(job, patient, aset, tissue_img, vt_ml, reg_opt, box_spacing, P, cancel)
        notes.append("the tumour borders the patient's ventricles, which it may partly hide: the atlases were "
                     "chosen by how well they match the patient's anatomy outside the tumour (affine S.2), "
                     "not by ventricle volume alone")
        if reg_opt["deformable"] == "none":  # the same registrations S.2 would compute
            registrations.update(regs)
    if chosen is None:
        chosen = _choose_atlases(job, aset, vt_ml, select_atlases)
    timings["tissue_s"] = time.perf_counter() - t0

    # ---- S.1 on the patient's box --------------------------------------------------------
    t0 = time.perf_counter()
    ref = patient.reference
    tissue_on_ref = tissue_img if io.same_geometry(tissue_img, ref) else \
        sitk.Resample(tissue_img, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    brain = np.isin(sitk.GetArrayViewFromImage(tissue_on_ref), [5, 6, 7, 8]) | patient.whole
    try:
        geom_p = anchored_box(ref, job.grid, job.box_mm, mask=brain)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    s1_labels = tissue_arr.copy()
    whole_t = _on_grid(patient.whole.astype(np.float32), ref, tissue_img) > 0.5
    s1_labels[whole_t] = 6  # tumor counted as white matter (S.1)
    s1_img = io.image_like(s1_labels, tissue_img)
    from .simulate import box_tissues

    T_p = box_tissues(geom_p, s1_img, ops)
    d_p, O_p, core_p, edema_p = _box_data(ops, geom_p, patient)
    P("S.1", *STAGE_SPAN["S.1"], 0.0, f"S.1: sparse initial condition on the {job.grid}^3 patient box")
    from .sparse_ic import solve_s1, support_atoms

    try:
        s1 = solve_s1(ops, T_p.wm, T_p.gm, T_p.vt, T_p.csf, d_p, O_p, options=s1_opt,
                      progress=P.sub("S.1", *STAGE_SPAN["S.1"]), cancel=cancel,
                      tumor_labels=None if core_p is None else (core_p, edema_p))
    except ValueError as exc:  # data the S.1 basis cannot represent: an input problem
        raise InputError(f"S.1: {exc} (the tumor is too small for the {job.grid}^3 box of "
                         f"{geom_p.spacing:.3g} mm voxels; use a finer --grid)") from None
    timings["S.1_s"] = time.perf_counter() - t0
    if s1.coarse_fallback:
        notes.append(f"S.1 ran on the {job.grid}^3 grid only (no coarse-to-fine: {s1.coarse_fallback})")
    check_cancel(cancel)
    centres = np.asarray(s1.centres, float)
    s1_report = {
        "kappa": float(s1.kappa), "rho": float(s1.rho), "objective": float(s1.fun),
        "misfit": float(s1.misfit), "relative_error": float(s1.relative_error),
        "status": int(s1.status), "success": bool(s1.success), "message": str(s1.message),
        "nit": int(s1.nit), "nfev": int(s1.nfev), "support": int(len(s1.support)),
        "components": int(s1.components), "coarse_factor": int(s1.coarse_factor),
        "coarse_grid": job.grid // int(s1.coarse_factor) if s1.coarse_factor > 1 else None,
        "coarse_fallback": s1.coarse_fallback,
        "centres_domain": centres.tolist(), "weights": [float(v) for v in np.asarray(s1.p)],
        "centres_lps_mm": [geom_p.domain_to_physical(c).tolist() for c in centres],
        "seconds": timings["S.1_s"],
    }
    atoms = weights = None
    if s3_opt.c0_refit:
        atoms = support_atoms(s1)
        weights = [float(v) for v in np.asarray(s1.p)]
    return CalibrationSetup(
        job=job, patient=patient, tissue_img=tissue_img, tissue_source=tissue_source, notes=notes,
        vt_ml=vt_ml, chosen=list(chosen), registrations=registrations, geom_p=geom_p,
        c0_box=to_numpy(s1.c0).astype(np.float32), c0_atoms_box=atoms, c0_weights=weights,
        s1_kappa=float(s1.kappa), s1_rho=float(s1.rho),
        s1_report=s1_report, reg_opt=reg_opt, s1_opt=s1_opt, s3_opt=s3_opt, timings=timings, t_start=t_all)


def _atlas_span(setup: CalibrationSetup, i: int) -> tuple[float, float]:
    lo, hi = STAGE_SPAN["atlases"]
    n_at = len(setup.chosen)
    return lo + (hi - lo) * i / n_at, lo + (hi - lo) * (i + 1) / n_at


def calibrate_atlas(setup: CalibrationSetup, i: int, progress=None, cancel=None) -> tuple[dict, dict | None]:
    """S.2 + S.3 on the setup's i-th chosen atlas (an independent task): the atlas's report
    entry and its patient-space volumes, or (entry marked failed, None) when its
    registration or S.3 failed (dropped, not fatal: §6)."""
    from .spectral import SpectralOps

    P = _as_progress(progress)
    job, reg_opt = setup.job, setup.reg_opt
    atlas, why = setup.chosen[i]
    a_lo, a_hi = _atlas_span(setup, i)
    entry = {"name": atlas.name, "index": i + 1, "chosen_because": why,
             "ventricle_ml": atlas.ventricle_ml, "failed": False}
    t_a = time.perf_counter()
    ops = SpectralOps(job.grid, get_backend(job.device, job.precision))
    c0_img_p = setup.geom_p.image(setup.c0_box)
    try:
        # S.2's own registration when prepare_calibration already made it (T1 path with both
        # stages alike, or the affine ones of the atlas choice); otherwise registered here
        reuse = setup.registrations.get(atlas.name)
        atoms_p = None if setup.c0_atoms_box is None else \
            ([setup.geom_p.image(a) for a in setup.c0_atoms_box], setup.c0_weights)
        vols = _one_atlas(job, setup.patient, atlas, setup.tissue_img, setup.geom_p, c0_img_p,
                          (setup.s1_kappa, setup.s1_rho), ops, reg_opt, setup.s3_opt, reuse,
                          setup.box_spacing, setup.pred_times, entry, P, a_lo, a_hi, cancel, atoms_p)
    except aggregate.AllAtlasesFailed:
        raise
    except ValueError as exc:  # a failed atlas is dropped, not the run
        vols = None
        entry.update(failed=True, error=" ".join(str(exc).split()))
    except RuntimeError as exc:
        vols = None
        entry.update(failed=True, error=f"{type(exc).__name__}: {' '.join(str(exc).split())}")
    entry["seconds"] = time.perf_counter() - t_a
    entry["dropped"] = aggregate.drop_reason(entry)
    return entry, vols


class CalibrationAssembly:
    """Writes one patient's outputs as its atlases finish (atlas_<name>/ files, running
    voxel-wise sums), then the averaged volumes and report.json last (§6 "Aggregate")."""

    def __init__(self, setup: CalibrationSetup, outputs: CalibrateOutputs, progress=None):
        self.setup, self.outputs = setup, outputs
        self.P = _as_progress(progress)
        self.entries: list[dict] = []
        self.acc_kept, self.acc_all = aggregate.VolumeAverage(), aggregate.VolumeAverage()

    def add(self, entry: dict, vols: dict | None) -> None:
        """One atlas's result (in any order; the report lists them by index)."""
        outputs, ref = self.outputs, self.setup.patient.reference
        if vols is not None:
            sub = outputs.subfolder(f"atlas_{_slug(entry['name'])}")
            written = {}
            for name, arr in (("predicted_tumor.nrrd", vols["predicted_tumor"]),
                              ("displacement_norm.nrrd", vols["displacement_norm"])):
                img = io.image_like(arr.astype(np.float32), ref)
                written[name] = outputs.write(os.path.join(sub, name), lambda tmp, im=img: io.write_image(im, tmp))
            vimg = io.image_like(np.moveaxis(vols["displacement"], 0, -1).astype(np.float32), ref, is_vector=True)
            written["displacement.nrrd"] = outputs.write(os.path.join(sub, "displacement.nrrd"),
                                                         lambda tmp: io.write_image(vimg, tmp))
            entry["outputs"] = written
            outputs.write_json(os.path.join(sub, "result.json"), entry)
            self.acc_all.add(vols)
            if not entry["dropped"]:
                self.acc_kept.add(vols)
        self.entries.append(entry)
        a_lo, a_hi = _atlas_span(self.setup, entry["index"] - 1)
        self.P("S.3", a_lo, a_hi, 1.0, f"atlas {entry['name']}: " + (
            f"dropped ({entry['dropped']})" if entry["dropped"] else "kept"), atlas=entry["index"])

    def finish(self, cancel=None) -> dict:
        """Averages, report.json (last); returns the report."""
        setup, outputs, P = self.setup, self.outputs, self.P
        job, ref, geom_p = setup.job, setup.patient.reference, setup.geom_p
        entries = sorted(self.entries, key=lambda e: e["index"])
        timings = dict(setup.timings)
        timings["atlases_s"] = sum(e["seconds"] for e in entries)
        t0 = time.perf_counter()
        summary = aggregate.summarise(entries)
        at_bounds, bound_notes = aggregate.bound_notes(entries, summary.kept, setup.s3_opt)
        acc = self.acc_kept if self.acc_kept.n else self.acc_all
        P("output", *STAGE_SPAN["output"], 0.0, f"averaging {acc.n} atlas(es) in patient space")
        out = outputs.folder
        files: dict = {}

        def put(name, arr, vector=False):
            check_cancel(cancel)
            a = np.moveaxis(arr, 0, -1) if vector else arr
            img = io.image_like(a.astype(np.float32), ref, is_vector=vector)
            files[name] = outputs.write(os.path.join(out, name), lambda tmp: io.write_image(img, tmp))

        put("predicted_tumor.nrrd", np.clip(acc.mean("predicted_tumor"), 0, 1))
        put("displacement_norm.nrrd", acc.mean("displacement_norm"))
        put("displacement_norm_std.nrrd", acc.std("displacement_norm"))
        put("displacement.nrrd", acc.mean("displacement"), vector=True)
        c0_ref = sitk.GetArrayFromImage(sitk.Clamp(geom_p.from_box(setup.c0_box, ref, "cubic"),
                                                   sitk.sitkFloat32, 0.0, 1.0))
        put("initial_condition.nrrd", c0_ref)
        for t in setup.pred_times:
            put(f"predicted_tumor_t{t:g}.nrrd", np.clip(acc.mean(f"c_t{t:g}"), 0, 1))
        if setup.tissue_source != "tissue label map":
            files["patient_tissue_labels.nrrd"] = outputs.write(
                os.path.join(out, "patient_tissue_labels.nrrd"), lambda tmp: io.write_image(setup.tissue_img, tmp))
        timings["output_s"] = time.perf_counter() - t0
        timings["total_s"] = time.perf_counter() - setup.t_start
        backend = get_backend(job.device, job.precision)
        report = {
            "command": "calibrate",
            "inputs": {"tumor": job.tumor_labels or job.tumor_core or job.tumor_concentration,
                       "tumor_source": setup.patient.tumor_source, "edema": job.edema, "t1": job.t1,
                       "tissue_labels": job.tissue_labels, "atlas_set": job.atlas_set,
                       "patient_geometry": io.geometry_dict(ref)},
            "options": job.to_dict(),
            "effective_options": {"s1": dataclasses.asdict(setup.s1_opt), "s3": dataclasses.asdict(setup.s3_opt),
                                  "registration": setup.reg_opt},
            "patient_tissue_source": setup.tissue_source,
            "patient_ventricle_ml": setup.vt_ml,
            "box": geom_p.to_dict(),
            "s1": setup.s1_report,
            "atlases": entries,
            "mean": summary.mean,
            "std": summary.std,
            "summary": {"mean": summary.mean, "std": summary.std, "atlases_used": summary.kept,
                        "basis": summary.basis, "n_atlases": len(entries),
                        "n_dropped": sum(1 for e in entries if e["dropped"]), "at_bounds": at_bounds},
            "dropped": {e["name"]: e["dropped"] for e in entries if e["dropped"]},
            "units": {"kappa, rho, gamma": "paper (non-dimensional; box edge 2π = box_mm)",
                      "max_u_mm": "mm",
                      "displacement": "LPS mm on the patient grid; deformed(x) ≈ healthy(x − u(x))"},
            "notes": setup.notes + [f"atlas {e['name']}: {w}" for e in entries for w in e.get("warnings", ())]
            + bound_notes,
            "timings": timings,
            "device": {"name": backend.name, "device": backend.device_name, "requested": job.device},
            "versions": _versions(backend),
            "outputs": {k: str(v) for k, v in files.items()},
        }
        check_cancel(cancel)
        outputs.write_json(os.path.join(out, "report.json"), report)
        P("done", 0.0, 1.0, 1.0, "finished")
        return report


def run_calibrate(job: CalibrateJob, outputs: CalibrateOutputs, progress=None, cancel=None) -> dict:
    """Run the pipeline, write every output through `outputs` (report.json last) and
    return the report. progress(dict) receives {stage, fraction (overall, monotone),
    stage_fraction, message, ...}; cancel() is polled (progress.Cancelled). The atlases
    run one after the other here; cohort.py runs them as independent Dask tasks."""
    P = _Progress(progress)
    setup = prepare_calibration(job, P, cancel)
    assembly = CalibrationAssembly(setup, outputs, P)
    for i in range(len(setup.chosen)):
        entry, vols = calibrate_atlas(setup, i, P, cancel)
        check_cancel(cancel)
        assembly.add(entry, vols)
    return assembly.finish(cancel)


def _on_grid(arr: np.ndarray, src: sitk.Image, dst: sitk.Image) -> np.ndarray:
    if io.same_geometry(src, dst):
        return arr
    img = io.image_like(arr, src)
    return sitk.GetArrayFromImage(sitk.Resample(img, dst, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32))


def _box_data(ops, geom: BoxGeometry, patient: Patient):
    """d, O and the core / edema fractions in the patient box (MODEL §5)."""
    from .observation import observation_operator, tumor_data

    ref = patient.reference
    xp = ops.xp
    if patient.concentration is not None:
        d = xp.asarray(concentration_to_box(io.image_like(patient.concentration, ref), geom), dtype=ops.dtype)
        return d, None, None, None
    core = geom.to_box(io.image_like(patient.core, ref), "fraction", dtype=np.dtype(ops.dtype))
    if not (core > 0.5).any():
        raise InputError("the tumor core is smaller than half a box voxel at this grid: nothing to "
                         "calibrate; use a finer --grid")
    edema = None
    if patient.edema is not None:
        edema = geom.to_box(io.image_like(patient.edema, ref), "fraction", dtype=np.dtype(ops.dtype))
    d = tumor_data(ops, xp.asarray(core))
    O = observation_operator(ops, xp.asarray(core), None if edema is None else xp.asarray(edema))
    return d, O, core, edema


def _named_atlases(job, atlases) -> list:
    """The atlases job.atlases names, [(Atlas, "named in the job")]; a name not in atlases is
    a one-line InputError."""
    names = {a.name: a for a in atlases}
    missing = [n for n in job.atlases if n not in names]
    if missing:
        raise InputError(f"atlas(es) {', '.join(missing)} not in the atlas set (have {', '.join(names)})")
    return [(names[n], "named in the job") for n in job.atlases]


def _choose_atlases(job, aset, vt_ml, select_atlases):
    atlases = list(aset)
    if job.atlases:
        return _named_atlases(job, atlases)
    k = job.n_atlases
    sel = select_atlases(atlases, vt_ml, max_atlases=k or 8, min_atlases=k or 4)
    return [(c.atlas, c.reason) for c in sel.choices]


def tumor_borders_ventricles(tissue_img: sitk.Image, patient: Patient) -> bool:
    """Whether the whole tumour touches the patient's ventricles (label 7) within one voxel:
    then a tumour label may hide ventricle under it, and the §6 ventricle volume is short."""
    from scipy import ndimage

    whole = _on_grid(patient.whole.astype(np.float32), patient.reference, tissue_img) > 0.5
    vt = sitk.GetArrayViewFromImage(tissue_img) == 7
    return bool((ndimage.binary_dilation(whole, np.ones((3, 3, 3), bool)) & vt).any())


def _register_affine_all(job, patient, aset, tissue_img, reg_opt, box_spacing, P, cancel):
    """Every atlas of the set registered affinely (S.2's tissue channels, tumour masked), for
    the choice by match. Returns (name → Registration, name → mL of the atlas's ventricles
    outside the registered tumour); an atlas whose registration fails or has no match score
    is left out of both."""
    from .atlases import ventricle_volume_ml
    from .registration import warp_to_atlas

    aff = dict(reg_opt, deformable="none")
    lo, hi = STAGE_SPAN["setup"]
    tumor = io.image_like(patient.whole.astype(np.float32), patient.reference)
    regs, outside_ml = {}, {}
    atlases = list(aset)
    for j, atlas in enumerate(atlases):
        check_cancel(cancel)
        f0, f1 = lo + (hi - lo) * j / len(atlases), lo + (hi - lo) * (j + 1) / len(atlases)
        labels = atlas.read_labels()
        try:
            reg = _register(job, patient, atlas, tissue_img, aff, box_spacing,
                            P.sub("S.2", f0, f1, atlas_name=atlas.name), cancel, use_t1=False,
                            atlas_labels=labels)
        except (ValueError, RuntimeError):  # a failed registration leaves the atlas out of the choice
            continue
        if not np.isfinite(reg.score):
            continue
        hidden = sitk.GetArrayFromImage(warp_to_atlas(tumor, reg, labels)) > 0.5
        outside_ml[atlas.name] = ventricle_volume_ml(np.where(hidden, 0, sitk.GetArrayViewFromImage(labels)),
                                                     labels.GetSpacing())
        regs[atlas.name] = reg
    return regs, outside_ml


def _select_by_match(job, atlases, regs: dict):
    """atlases.select_atlases_by_match on the registrations' scores (job.n_atlases or 4, at
    most as many as were registered); a failure is a one-line InputError."""
    from .atlases import AtlasError, MIN_ATLASES, select_atlases_by_match

    try:
        return select_atlases_by_match(atlases, {n: r.score for n, r in regs.items()},
                                       n_atlases=min(job.n_atlases or MIN_ATLASES, len(regs)))
    except (AtlasError, ValueError) as exc:
        raise InputError(f"atlas choice: {exc}") from None


def _match_atlases(job, patient, aset, tissue_img, vt_ml, reg_opt, box_spacing, P, cancel):
    """The atlas choice when the tumour borders the patient's ventricles: every atlas
    registered affinely (_register_affine_all), then atlases.select_atlases_by_match on the
    match scores. Returns ([(Atlas, why)], name → Registration of every atlas registered);
    when every registration fails, §6's choice on the visible volume vt_ml is the fallback
    (the chosen atlases' S.2 then reports the failure)."""
    from .atlases import select_atlases

    regs, outside_ml = _register_affine_all(job, patient, aset, tissue_img, reg_opt, box_spacing, P, cancel)
    if not regs:
        return _choose_atlases(job, aset, vt_ml, select_atlases), regs
    sel = _select_by_match(job, list(aset), regs)
    return [(c.atlas, f"{c.reason}; {outside_ml[c.atlas.name]:.1f} mL of its ventricles outside the tumour")
            for c in sel.choices], regs


def _registration_spacing(reg_opt, atlas_img, box_spacing) -> float:
    if reg_opt.get("spacing_mm"):
        return float(reg_opt["spacing_mm"])
    return max(min(atlas_img.GetSpacing()), box_spacing / 2.0)


def _register(job, patient, atlas, tissue_img, reg_opt, box_spacing, progress, cancel, use_t1: bool,
              atlas_labels: sitk.Image | None = None):
    """S.2 for one atlas on isotropic registration grids (see the module docstring);
    atlas_labels: the atlas's label map when the caller has read it already."""
    from .registration import register_patient_to_atlas, register_t1

    atlas_labels = atlas.read_labels() if atlas_labels is None else atlas_labels
    s = _registration_spacing(reg_opt, atlas_labels, box_spacing)
    a_grid = iso_grid(atlas_labels, s)
    tumor_mask = io.image_like(patient.whole.astype(np.float32), patient.reference)
    kw = dict(deformable=reg_opt["t1_deformable" if use_t1 else "deformable"],
              iterations=int(reg_opt["iterations"]),
              affine_iterations=int(reg_opt["affine_iterations"]), sigma_field=float(reg_opt["sigma_field"]),
              progress=progress, cancel=cancel)
    if use_t1:
        at1 = atlas.read_t1()
        p_grid = iso_grid(patient.t1, max(s, min(patient.t1.GetSpacing())))
        return register_t1(resample_to(patient.t1, p_grid), resample_to(at1, a_grid), tumor_mask, **kw)
    p_grid = iso_grid(tissue_img, max(s, min(tissue_img.GetSpacing())))
    return register_patient_to_atlas(channel_images(tissue_img, p_grid), channel_images(atlas_labels, a_grid),
                                     tumor_mask, **kw)


def _derive_tissue(job, patient, aset, reg_opt, box_spacing, P, cancel):
    """T1-only patient: the patient's T1 registered affinely to every atlas with a T1 (tumour
    masked), the atlases chosen by that match (atlases.select_atlases_by_match on the
    correlation outside the tumour; a deviation from §6, whose ventricle volume a T1 alone
    does not give: one atlas's labels through affine + demons onto a 5 mm-slice T1 read
    28 mL of ventricles for a 16 mL anatomy), then the chosen ones registered with the
    deformable stage; the best-registered atlas's labels, warped to the patient (nearest
    neighbour), are the patient tissue. Named atlases (job.atlases) skip the affine pass."""
    from .registration import best_registered, warp_to_patient

    with_t1 = [a for a in aset if a.t1_path is not None]
    if not with_t1:
        raise InputError("no tissue segmentation given and no atlas of the set has a T1 to register the "
                         "patient's T1 to")
    lo, hi = STAGE_SPAN["setup"][1], STAGE_SPAN["S.1"][0] + 0.05
    mid = lo + 0.3 * (hi - lo)
    t_grid = iso_grid(patient.t1, max(min(patient.t1.GetSpacing()), min(with_t1[0].voxel_mm)))

    def derive(atlas, reg):
        lab = warp_to_patient(atlas.read_labels(), reg, t_grid, interpolator=sitk.sitkNearestNeighbor)
        return sitk.Cast(lab, sitk.sitkUInt8)

    if job.atlases:
        chosen = _named_atlases(job, with_t1)
    else:
        aff = dict(reg_opt, t1_deformable="none")
        affine = {}
        for j, a in enumerate(with_t1):
            check_cancel(cancel)
            f0, f1 = lo + (mid - lo) * j / len(with_t1), lo + (mid - lo) * (j + 1) / len(with_t1)
            try:
                reg = _register(job, patient, a, None, aff, box_spacing, P.sub("S.2", f0, f1, atlas_name=a.name),
                                cancel, True)
            except (ValueError, RuntimeError):  # left out of the choice
                continue
            if np.isfinite(reg.score):
                affine[a.name] = reg
        if not affine:
            raise InputError("the T1 could not be registered to any atlas of the set")
        chosen = [(c.atlas, f"{c.reason} (T1, affine)") for c in _select_by_match(job, with_t1, affine).choices]
    regs = {}
    for j, (a, _) in enumerate(chosen):
        f0, f1 = mid + (hi - mid) * j / len(chosen), mid + (hi - mid) * (j + 1) / len(chosen)
        regs[a.name] = _register(job, patient, a, None, reg_opt, box_spacing, P.sub("S.2", f0, f1, atlas=a.name),
                                 cancel, True)
    names = [a.name for a, _ in chosen]
    best = names[best_registered([regs[n] for n in names])]
    tissue = derive(aset[best], regs[best])
    if not (sitk.GetArrayViewFromImage(tissue) == 7).any():
        raise InputError("the T1 could not be registered to an atlas (no ventricles after warping)")
    return tissue, chosen, regs, best


def _one_atlas(job, patient, atlas, tissue_img, geom_p, c0_img_p, s1_kappa_rho, ops, reg_opt, s3_opt, reg,
               box_spacing, pred_times, entry, P, a_lo, a_hi, cancel, atoms_p=None) -> dict:
    """S.2 (unless done) and S.3 on one atlas; fills entry; returns patient-space volumes.
    atoms_p: (S.1's support atoms as patient-box images, their weights) for c0_refit."""
    from .forward import ForwardParams, run_forward
    from .mass_effect_inversion import at_bounds, invert_mass_effect
    from .observation import observation_operator, tumor_data
    from .registration import poor_registration, warp_to_atlas, warp_to_patient
    from .simulate import box_tissues

    span = a_hi - a_lo
    r_hi = a_lo + 0.15 * span
    if reg is None:
        reg = _register(job, patient, atlas, tissue_img, reg_opt, box_spacing,
                        P.sub("S.2", a_lo, r_hi, atlas=entry["index"], atlas_name=atlas.name), cancel,
                        use_t1=False)
    check_cancel(cancel)
    entry["registration"] = {"method": reg.method, "quality": reg.quality, "metric": reg.metric,
                             "inverse_error_mm": reg.inverse_error_mm, "timings": reg.timings, "notes": reg.notes}
    warning = poor_registration(reg.quality)
    if warning:
        entry.setdefault("warnings", []).append(warning)
        P("S.2", a_lo, r_hi, 1.0, f"atlas {atlas.name}: {warning}", atlas=entry["index"])
    atlas_labels = atlas.read_labels()
    try:
        # tiling the atlas's voxels where it can (an atlas at the box's resolution is then used as is)
        geom_a = snapped_to_image(box_for_image(atlas_labels, job.grid, job.box_mm), atlas_labels)
    except ValueError as exc:
        raise ValueError(f"atlas {atlas.name}: {exc}") from None
    xp, dt = ops.xp, ops.dtype
    T_a = box_tissues(geom_a, atlas_labels, ops)
    ref = patient.reference
    m = supersample_factor(geom_a, min(ref.GetSpacing()))

    def warp_peaked(img):  # c0 and its atoms: cubic, as an atom one voxel wide drawn linearly
        # between the boxes' nodes widens by up to a quarter voxel²; ≥ 0
        a = sitk.GetArrayFromImage(warp_to_atlas(img, reg, geom_a.reference_image(), sitk.sitkBSpline))
        return np.clip(a, 0, None).astype(np.float64)

    c0_a = warp_peaked(c0_img_p)  # the patient-box c0 through the registration, max 1 (§6 S.3)
    if not c0_a.max() > 1e-3:
        raise ValueError(f"atlas {atlas.name}: the initial condition falls outside the atlas after registration")
    c0_a = xp.asarray(c0_a / c0_a.max(), dtype=dt)
    atoms_a = None
    if atoms_p is not None:  # each S.1 atom through the same registration (c0_refit)
        atoms_a = np.stack([warp_peaked(a) for a in atoms_p[0]])
    labels_a = None
    if patient.concentration is not None:
        d_a = xp.asarray(concentration_to_box(io.image_like(patient.concentration, ref), geom_a, reg), dtype=dt)
        O_a = None
    else:
        core = xp.asarray(warp_fraction_to_box(io.image_like(patient.core, ref), reg, geom_a, m))
        if not bool((core > 0.5).any()):
            raise ValueError(f"atlas {atlas.name}: the tumor core vanishes after registration")
        edema = None if patient.edema is None else \
            xp.asarray(warp_fraction_to_box(io.image_like(patient.edema, ref), reg, geom_a, m))
        d_a = tumor_data(ops, core)
        O_a = observation_operator(ops, core, edema)
        labels_a = (core, edema)
    tarr = sitk.GetArrayFromImage(tissue_img)
    m_t = supersample_factor(geom_a, min(tissue_img.GetSpacing()))
    vt_a = warp_fraction_to_box(onehot(tarr, [7], tissue_img), reg, geom_a, m_t)
    vt_a = ops.smooth(xp.asarray(vt_a, dtype=dt))
    vt_mask = ventricles_observed(warp_fraction_to_box(
        io.image_like(patient.whole.astype(np.float32), ref), reg, geom_a, m))
    vt_atlas = to_numpy(T_a.vt).astype(np.float64)
    vt_total = float(vt_atlas.sum())
    entry["ventricles_unobserved_fraction"] = (1.0 - float((vt_atlas * vt_mask).sum()) / vt_total
                                               if vt_total > 0 else 0.0)
    check_cancel(cancel)
    s1_kappa, s1_rho = s1_kappa_rho
    initial = {"gamma": job.gamma0, "rho": float(s1_rho), "kappa": float(s1_kappa)}
    entry["initial"] = initial

    def s3_progress(d):
        d = dict(d)
        d["atlas_name"] = atlas.name
        d["atlas"] = entry["index"]
        P.sub("S.3", r_hi, a_lo + 0.9 * span)(d)

    res = invert_mass_effect(ops, T_a, c0_a, d_a, O_a, vt_a, initial=initial, options=s3_opt,
                             progress=s3_progress, cancel=cancel, atlas=entry["index"],
                             c0_atoms=atoms_a, c0_weights=None if atoms_p is None else atoms_p[1],
                             tumor_labels=labels_a, vt_mask=vt_mask)
    mm = geom_a.domain_unit_mm
    summ = res.summary()
    entry.update({
        "kappa": res.kappa, "rho": res.rho, "gamma": res.gamma,
        "parameters": {"kappa": res.kappa, "rho": res.rho, "gamma": res.gamma},
        "max_u_mm": res.max_u * mm, "max_u_domain": res.max_u, "max_u_voxels_256": res.max_u * 256 / (2 * math.pi),
        "misfit": res.fun, "misfit_tumor": res.misfit_tumor, "misfit_vt": res.misfit_vt,
        "relative_tumor_error": res.relative_tumor_error, "hessian_condition": res.hessian_condition,
        "nit": res.nit, "nfev": res.nfev, "n_forward": res.n_forward, "status": res.status,
        "message": res.message, "success": res.success, "cfl_flagged": res.cfl_flagged,
        "gradient_norm": summ["gradient_norm"], "gradient_norm_initial": summ["gradient_norm_initial"],
        "s3_seconds": res.seconds, "history": summ["history"], "box": geom_a.to_dict(),
        "c0_rounds": summ["c0_rounds"], "c0_weights": summ["c0_weights"],
        # c0_shift: S.3's translation of c0 along the atlas box's axes (mm)
        "c0_shift_mm": None if res.c0_shift_domain is None else [v * mm for v in res.c0_shift_domain],
        # γ, ρ, κ that S.3 left on a §6 bound: set by the bound, not the data (aggregate.bound_notes)
        "at_bounds": at_bounds({"gamma": res.gamma, "rho": res.rho, "kappa": res.kappa}, s3_opt),
    })
    P("S.3", a_lo, a_hi, 0.9, f"atlas {atlas.name}: mapping results to the patient", atlas=entry["index"])
    fwd = res.forward
    c1 = to_numpy(fwd.c).astype(np.float32)
    u = to_numpy(fwd.u).astype(np.float64)
    vols = _to_patient(geom_a, reg, ref, c1, u)
    if pred_times:
        o = s3_opt
        nt = int(math.ceil(max(pred_times) / o.dt - 1e-9)) - 1
        params = ForwardParams(kappa=res.kappa, rho=res.rho, gamma=res.gamma, nt=nt, dt=o.dt, r_k=o.r_k,
                               r_rho=o.r_rho, elasticity_rtol=o.elasticity_rtol)
        later = run_forward(ops, T_a, res.c0, params, cancel=cancel, snapshot_times=pred_times, on_cfl="flag")
        for t in pred_times:
            snap = later.snapshots.get(t) or min(later.snapshots.values(), key=lambda s: abs(s.t - t))
            img = geom_a.image(to_numpy(snap.c).astype(np.float32))
            vols[f"c_t{t:g}"] = sitk.GetArrayFromImage(warp_to_patient(img, reg, ref))
    return vols


def _to_patient(geom_a: BoxGeometry, reg, ref: sitk.Image, c1, u) -> dict:
    """Atlas-box c(1), |u| (mm) and u (LPS mm) → the patient grid through reg.inverse."""
    from .registration import warp_to_patient

    u_mm = geom_a.displacement_to_mm(u)
    c1_p = warp_to_patient(geom_a.image(c1), reg, ref)
    vec = sitk.Compose([geom_a.image(u_mm[p].astype(np.float32)) for p in range(3)])
    vec_p = np.moveaxis(sitk.GetArrayFromImage(warp_to_patient(sitk.Cast(vec, sitk.sitkVectorFloat32), reg, ref)),
                        -1, 0)
    # |u| in patient space: the norm of the pushed-forward vectors (registration.warp_to_patient
    # maps the vectors, not only their positions), so displacement_norm and displacement agree
    return {"predicted_tumor": sitk.GetArrayFromImage(c1_p),
            "displacement_norm": np.sqrt((vec_p.astype(np.float64) ** 2).sum(0)),
            "displacement": vec_p}
