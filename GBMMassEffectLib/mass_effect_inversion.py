"""Stage S.3 for one atlas: calibrate κ, ρ, γ with c0 fixed (MODEL.md §6, S.3).

Minimises  J(κ, ρ, γ) = ½h³‖O(c(1) − d)‖² + ½h³‖vt(1) − vt_patient‖²
over the scaled variables x = (10·γ, ρ, 100·κ) with bound-constrained L-BFGS-B (scipy),
every evaluation a full forward solve of §3 from the atlas (u = v = 0). The gradient is
one-sided finite differences with step 1e-5·|x_i| (1e-5 where x_i = 0), i.e. four forward
solves per gradient, run concurrently on a thread pool (the FFTs release the GIL). Stops at
‖P g(x_k)‖ ≤ gtol_rel·‖P g(x_0)‖ (P: projection onto the feasible directions) or after
maxiter iterations, 5 L-BFGS vectors. At the optimum it reports the condition number of
the forward-difference Hessian in the scaled variables (step ε_mach^{1/3}).
With vt_mask (a deviation: calibrate passes it) the ventricle term is ½h³‖M(vt(1) −
vt_patient)‖², M = 0 where the patient's ventricles are hidden under a tumour label.

Optimiser (option optimizer): "lbfgsb" is §6's L-BFGS-B above; "gauss-newton" (calibrate's
default, a deviation) uses that J = ½‖r‖² with r = h^{3/2}(O(c(1) − d), vt(1) − vt_patient):
the same 1 + |x| forward solves that give the FD gradient give the FD Jacobian ∂r/∂x, and
scipy's trust-region reflective least_squares steps with JᵀJ instead of L-BFGS's few-pair
curvature estimate. Same stopping rules (relative projected gradient Jᵀr, stagnation of J,
settled unknowns, maxiter). Measured: 16³ true IC 15% off, 17 s vs 59 s; 16³ refit (two atoms, wrong weights)
62 s vs 168 s; 32³ TC(b) inverted IC with the c0 refit 9 iterations / 90 solves, γ 0.406,
J 0.03022, converged (L-BFGS-B: 50 iterations / 496 solves, γ 0.421, J 0.03032, not
converged), where (γ, ρ, κ) and the atom weights are strongly coupled. Host memory: the
1 + |x| residuals of one Jacobian, the Jacobian and scipy's copies of it, each 16·n³ bytes
per vector: ~0.15 GB at 64³, ~1.1 GB at 128³, ~9 GB at 256³ for |x| = 8 (L-BFGS-B: none).

Precision: the forward solves of S.3 run in float64 by default (`precision` option),
whatever the caller's arrays are. A one-sided difference with step 1e-5·x divides the
round-off of J by 1e-5; in float32 (J accurate to ~1e-7 relative) the gradient near the
optimum is noise and the relative-gradient test stops early (measured at 16³, TC(c)-like,
start 15% off: κ 2.9% off in float32, 7e-4 in float64, with fewer solves in float64).

c0 pull-back (option c0_pullback, a deviation from the paper's fixed c0, off by default;
superseded by the c0 refit below, which calibrate runs by default):
S.1 inverts c0 on the *deformed* patient with a model without mass effect, so its c0 sits
where the tumour origin has been carried by the mass effect, not where it started in the
undeformed atlas. The forward model moves a material point X to x ≈ X + u(X) (u at t = 1),
so the atlas-frame initial condition is c0_atlas(X) = c0_S1(X + u(X)). With c0_pullback = K,
after the S.3 solve the given c0 is pulled back with the optimum's u (cubic Lagrange,
periodic, clipped ≥ 0, max 1) and S.3 is solved again from that optimum, up to K times or
until c0 changes by less than c0_pullback_tol (relative 2-norm). Measured at 32³ (TC(c),
true atlas, S.1's c0): the tumour misfit at the true parameters drops from 0.52 to 0.13
with c0 pulled back by the true u, and S.1's c0 centroid is 1.7 voxels from the seed.

c0 refit (option c0_refit, also a deviation from the paper's fixed c0): S.3 optimises S.1's
atom weights q with (γ, ρ, κ), c0 = Σ q_i φ_i / max (φ_i S.1's support atoms, warped into the
atlas frame like c0; MODEL §5's Φp/max), q_i ∈ [0, c0_weight_max = 1], started from S.1's
p/max p. c0 does not change when q is scaled, so J is flat along q; the upper bound 1 stops
the iterates drifting outward along it (a drift that shrinks the weights' steps; without
the bound, 32³ TC(c): weights up to 2.7). Measured (true atlas, S.1's c0, concentration
data, weights unbounded): 32³ TC(c) γ 0.797 for γ* 0.8 (fixed c0 0.583, two pull-back rounds
0.719); a 16³ patient made from three atoms, S.3 given wrong weights: γ 0.601 fixed,
0.79998 refitted, c0 error 0.29 → 8e-5. The gradient takes 1 + 3 + |S| forward solves (9
for |S| = 5, against 4 with c0 fixed); the
Hessian condition stays the one of (γ, ρ, κ) at the optimal q. The mass-effect model itself
then sizes and places c0 within S.1's support, instead of S.1's model without mass effect.

c0 shift (option c0_shift = b > 0; calibrate turns it on for a tumour concentration, off on
labels: calibrate.S3_C0_SHIFT_MM says why): x
also carries a translation δ ∈ [−b, b]³ (voxels of the grid) and c0 = T_δ(Σ q_i φ_i)/max
(or T_δ c0 with c0 fixed), T_δ f = f(· − δh) by the Fourier phase exp(−ik·δh)
(SpectralOps.translate: smooth in δ, so the FD Jacobian is too; the Nyquist mode is
dropped). The weights only re-weigh atoms on S.1's candidate lattice (every other voxel),
fitted to the deformed data by a model without mass effect; the origin can sit between
lattice points and off the data's centre: measured at 32³ (TC(b)–(d), S.1's c0 on the
true atlas), the data's centre of mass lies 1.5–2.5 voxels from the true seed and S.1's
support misses the seed's side (TC(d): every atom at z = 14 for the seed's 12.8). Three
more forward solves per gradient (12 for five atoms).

c0 amplitude (option c0_max, default 1 = §5's max(c0) = 1; MODEL §6 notes that the
reference's multilevel scripts rescale c0 to max n/256): every c0 above is multiplied by
c0_max. An atom is one voxel wide, so a patient whose seed was narrower than the grid's
voxel (made on a finer grid, or a real tumour) holds (h_fine/h)³ of the mass of a max-1
atom here; with max 1, S.3 fits a slower ρ and a smaller γ to the same tumour. Measured
(true atlas, labels, whole calibrate path): the tc-b patient made at 64³ and calibrated at
32³ gave γ 0 (truth 0.4) with max 1 and γ 0.409, ρ 9.18 with c0_max = 1/8 = (32/64)³
(benchmarks/ACCURACY.md). Not estimated from the data: fitted together with ρ and γ it
trades against both (the same patient: γ 0.18, ρ 7.1 at a lower misfit).

Tumour term on label data (option tumor_misfit; §5's "indicator" here by default,
calibrate.S3_TUMOR_MISFIT picks "fraction"; "band" is a deviation offered as an option): "indicator" is
§5's ½h³‖O(c(1) − d)‖² with d the smoothed core indicator. It asks for c = 1 over the whole core, where a tumour labelled
at c > 0.4 has c between 0.4 and 1, so with the true c0 and the true atlas it already
biases the fit: 32³, labels drawn at 0.4 / 0.02, TC(d) γ 1.046 (12.8% under), κ 0.0069 for
0.025, max|u| 7.3% under; at 16³ (test_recovery_label_band_true_ic_16) γ 30% over. "band"
reads each label boundary as an iso-contour of c(1) (observation.label_band: c ≥ θ_core
on the core, θ_edema ≤ c ≤ θ_core on edema, c ≤ θ_edema outside; θ = core_threshold,
edema_threshold, default 0.4 and 0.02, the levels `simulate` labels at), misfit
½h³‖(c − U)₊ − (L − c)₊‖², zero when the predicted labels are the observed ones; the
reported relative tumour error stays §5's. Same case: γ, max|u| within 0.2%. Its price is
the thresholds: labels drawn at other levels shift γ (32³ TC(c)/(d), true IC, drawn at
0.6 / 0.05: γ 27% / 25% over, max|u| 6.8% / 5.3%; at 0.25 / 0.01: 10% / 12% under, 1.1% /
2.7%; the indicator at 0.6 / 0.05: 8.8% over / 9.2% under, 1.8% / 14%). With S.1's c0
(32³, inverted IC, TC(b)/(c)/(d); benchmarks/results/label_band): γ 0.4% / 19.6% over /
17.9% over, max|u| 5.3 / 7.7 / 1.3% (indicator: 3.3% / 13.8% under / 21% under, max|u| 3.3
/ 10.7 / 17%): max|u| better, γ as far off with the sign flipped. On the demo patient
(simulate's 1 mm labels, affine S.2, 32³, hidden ventricles masked: vt_mask) the band gave
mean γ 0.385 (3.8% under), max|u| 8.2 mm for 10.0, the indicator 0.402 and 9.6 mm: hence
not calibrate's default (README "Accuracy"; before the mask the band gave γ 0.269).
"fraction" (observation.PartialVolumeMisfit) reads the labels as partial volumes: the core's
and the whole tumour's box fractions (calibrate warps them as fractions of the 1 mm label
map) against each voxel's share above θ_core and θ_edema that c(1) predicts, interpolated
spectrally onto m³ sub-voxels (m = 4 at 32³, 2 at 64³), edema counted on parenchyma only;
residual (F_core − f_core, F_whole − f_whole). It is continuous in c(1), so the finite
differences see a label boundary move inside a voxel; the thresholded readings do not, and
that is why 32³ labels left κ undetermined (on a bound) and γ trading against it. With the
true c0 and atlas (benchmarks/label_data.py, 32³, from 10% off): P1 γ +2.6%, ρ −1.0%, κ
+2.6% (indicator +14%, −8.3%, +157%); TC(d) +0.5%, −0.6%, +2.7% (indicator −21% in γ); P2
+0.6%, −1.2%, +10%, P3 +0.4%, −1.2%, +7.0%, P4 +1.6%, −1.2%, +11% (measured with the
term's first, slower version). Whole path with calibrate's 32 mm translation of c0: README
"Accuracy". No adjoint: S.3 only.
"""
from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import Bounds, least_squares, minimize

from .backend import to_numpy
from .forward import ForwardParams, run_forward
from .observation import (CORE_THRESHOLD, EDEMA_THRESHOLD, TUMOR_MISFITS, check_label_thresholds,
                          tumor_misfits)
from .progress import Cancelled, check_cancel
from .spectral import SpectralOps

#: scaling of (γ, ρ, κ) into the optimiser's variables x = (10γ, ρ, 100κ)
SCALE = np.array([10.0, 1.0, 100.0])
NAMES = ("gamma", "rho", "kappa")
#: S.3's optimisers: bound-constrained L-BFGS (§6) or Gauss-Newton in a trust region
OPTIMIZERS = ("lbfgsb", "gauss-newton")


@dataclass(frozen=True)
class MassEffectOptions:
    """Settings of S.3 (defaults: MODEL.md §6)."""

    gamma_bounds: tuple[float, float] = (0.0, 1.5)
    rho_bounds: tuple[float, float] = (2.0, 15.0)
    kappa_bounds: tuple[float, float] = (0.005, 0.05)
    fd_rel_step: float = 1e-5
    gtol_rel: float = 1e-3
    maxiter: int = 50
    maxcor: int = 5
    workers: int = 4
    hessian: bool = True
    nt: int = 25
    dt: float = 0.04
    r_k: float = 0.0
    r_rho: float = 0.0
    elasticity_rtol: float = 1e-3
    precision: str = "float64"  # of the forward solves ("float32" reproduces the reference's noise)
    coarse_grids: tuple[int, ...] = ()  # coarse-to-fine: S.3 first on these grids (each divides n)
    c0_pullback: int = 0  # rounds of c0 ← c0 ∘ (X + u(X)) then S.3 again (module docstring)
    c0_pullback_tol: float = 0.02  # stop the rounds when c0 changes by less (relative 2-norm)
    c0_refit: bool = False  # optimise S.1's atom weights with (γ, ρ, κ) (module docstring)
    c0_weight_max: float = 1.0  # upper bound of the refitted atom weights (module docstring)
    c0_max: float = 1.0  # max(c0) (§5: 1; the reference's multilevel scripts: n/256; module docstring)
    optimizer: str = "lbfgsb"  # "lbfgsb" (§6) or "gauss-newton" (module docstring)
    c0_shift: float = 0.0  # > 0: also optimise a translation δ of c0, |δ_i| ≤ this (voxels of n)
    tumor_misfit: str = "indicator"  # "indicator" (§5's ‖O(c − d)‖²), "band" (iso-contours), "fraction" (partial volumes)
    core_threshold: float = CORE_THRESHOLD  # the label band's c(1) at the core's boundary
    edema_threshold: float = EDEMA_THRESHOLD  # … and at the whole tumour's (core + edema)

    def __post_init__(self):
        k = self.c0_pullback
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise ValueError(f"c0_pullback must be a non-negative integer (rounds), got {k!r}")
        if not (isinstance(self.c0_pullback_tol, (int, float)) and self.c0_pullback_tol >= 0):
            raise ValueError(f"c0_pullback_tol must be a non-negative number, got {self.c0_pullback_tol!r}")
        if not isinstance(self.c0_refit, (bool, np.bool_)):
            raise ValueError(f"c0_refit must be true or false, got {self.c0_refit!r}")
        if self.c0_refit and self.c0_pullback:
            raise ValueError("c0_refit and c0_pullback both change S.1's c0: choose one (set c0_pullback to 0)")
        if not (isinstance(self.c0_weight_max, (int, float)) and self.c0_weight_max > 0):
            raise ValueError(f"c0_weight_max must be a positive number, got {self.c0_weight_max!r}")
        if isinstance(self.c0_max, bool) or not (isinstance(self.c0_max, (int, float)) and 0 < self.c0_max <= 1):
            raise ValueError(f"c0_max must be a number in (0, 1], got {self.c0_max!r}")
        if isinstance(self.c0_shift, bool) or not (isinstance(self.c0_shift, (int, float))
                                                   and 0 <= self.c0_shift < math.inf):
            raise ValueError(f"c0_shift must be a non-negative number of voxels, got {self.c0_shift!r}")
        if self.c0_shift and self.c0_pullback:
            raise ValueError("c0_shift and c0_pullback both move S.1's c0: choose one (set c0_pullback to 0)")
        if self.tumor_misfit not in TUMOR_MISFITS:
            raise ValueError(f"S.3 tumor_misfit must be one of {', '.join(TUMOR_MISFITS)}, got {self.tumor_misfit!r}")
        check_label_thresholds(self.core_threshold, self.edema_threshold)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"S.3 optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")

    @classmethod
    def from_dict(cls, d: dict | None) -> "MassEffectOptions":
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown S.3 option(s): {', '.join(sorted(unknown))}")
        for key in ("gamma_bounds", "rho_bounds", "kappa_bounds"):
            if key in d:
                d[key] = tuple(float(v) for v in d[key])
        if "coarse_grids" in d:
            v = d["coarse_grids"]
            d["coarse_grids"] = tuple(int(g) for g in ([v] if isinstance(v, (int, float)) else v or ()))
        return cls(**d)

    def levels(self, n: int) -> list[int]:
        """The grids of a coarse-to-fine S.3 ending at n (ascending, each dividing n)."""
        coarse = sorted({int(g) for g in self.coarse_grids if int(g) != n})
        for g in coarse:
            if g < 8 or g > n or n % g:
                raise ValueError(f"S.3 coarse grid {g} must be at least 8 and divide the grid {n}")
        return coarse + [n]

    def bounds_scaled(self, n_weights: int = 0) -> Bounds:
        """Bounds of x = (10γ, ρ, 100κ, q_1 … q_n_weights[, δ_1, δ_2, δ_3]) (q: c0_refit's atom
        weights; δ: c0_shift's translation in voxels, present when c0_shift > 0)."""
        lo = np.array([self.gamma_bounds[0], self.rho_bounds[0], self.kappa_bounds[0]]) * SCALE
        hi = np.array([self.gamma_bounds[1], self.rho_bounds[1], self.kappa_bounds[1]]) * SCALE
        lo, hi = np.r_[lo, np.zeros(n_weights)], np.r_[hi, np.full(n_weights, float(self.c0_weight_max))]
        if self.c0_shift > 0:
            lo, hi = np.r_[lo, np.full(3, -float(self.c0_shift))], np.r_[hi, np.full(3, float(self.c0_shift))]
        return Bounds(lo, hi)


#: a parameter within this fraction of its S.3 range from an end is reported on that bound
AT_BOUND_RTOL = 0.01


def at_bounds(params: dict, options: "MassEffectOptions", rtol: float = AT_BOUND_RTOL) -> dict:
    """{name: "lower" | "upper"} for the γ, ρ, κ of params that S.3 left on (within rtol of
    the range of) one of its §6 bounds: there the bound, not the data, set the value."""
    out = {}
    for k in ("gamma", "rho", "kappa"):
        lo, hi = getattr(options, f"{k}_bounds")
        tol = rtol * (hi - lo)
        if params[k] <= lo + tol:
            out[k] = "lower"
        elif params[k] >= hi - tol:
            out[k] = "upper"
    return out


def to_scaled(gamma: float, rho: float, kappa: float) -> np.ndarray:
    return np.array([gamma, rho, kappa], dtype=float) * SCALE


def from_scaled(x) -> dict:
    """(γ, ρ, κ) of x = (10γ, ρ, 100κ[, atom weights])."""
    g, r, k = np.asarray(x, dtype=float)[:3] / SCALE
    return {"gamma": float(g), "rho": float(r), "kappa": float(k)}


@dataclass
class MassEffectResult:
    """Outcome of S.3 for one atlas, shaped like scipy's OptimizeResult."""

    x: np.ndarray
    kappa: float
    rho: float
    gamma: float
    fun: float
    misfit_tumor: float
    misfit_vt: float
    relative_tumor_error: float
    max_u: float  # domain units
    nit: int
    nfev: int  # J evaluations of the optimiser: L-BFGS-B's (each 1 + |x| solves), GN's trial points
    n_forward: int
    status: int  # 0 gradient rule, 1 maxiter, 2 optimiser's own stop, 3 J stagnated, 4 unknowns settled
    message: str
    success: bool
    gradient_norm: float
    gradient_norm_initial: float
    hessian_condition: float | None
    cfl_flagged: int
    seconds: float
    history: list = field(default_factory=list)
    forward: object = None  # ForwardResult at the optimum (c, tissues, u, v)
    coarse: list = field(default_factory=list)  # coarse-to-fine: one summary per coarse level
    n_forward_coarse: int = 0  # forward solves on the coarse grids (each ~(n/m)³ cheaper)
    c0_rounds: list = field(default_factory=list)  # c0 pull-back: one summary per S.3 solve
    c0: object = None  # the c0 of the final solve (pulled back when c0_pullback > 0, refitted with c0_refit)
    c0_weights: list | None = None  # c0_refit: the optimal atom weights q (c0 = Σ q_i φ_i / max)
    c0_shift: list | None = None  # c0_shift: the optimal translation δ of c0 (voxels of its grid)
    c0_shift_domain: list | None = None  # the same in domain units (2π = the box edge)

    def summary(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name not in ("forward", "x", "history", "c0")}
        d["x_scaled"] = [float(v) for v in self.x]
        d["history"] = self.history
        return d


class MassEffectObjective:
    """J(x) of S.3 with a cache of evaluated points and solve counters (hippylib-style).
    With atoms ((s, n, n, n), c0_refit), x carries the atom weights after (10γ, ρ, 100κ);
    with options.c0_shift > 0, the translation δ of c0 (voxels) after those."""

    def __init__(self, ops: SpectralOps, atlas_tissues, c0, d, O, vt_patient,
                 options: MassEffectOptions, cancel=None, atoms=None, labels=None, vt_mask=None):
        self.ops, self.tissues, self.c0, self.atoms = ops, atlas_tissues, c0, atoms
        self.n_weights = 0 if atoms is None else int(atoms.shape[0])
        self.shift = options.c0_shift > 0
        # §5's misfit: the reported relative tumour error (and J's tumour term unless "band")
        self.indicator, self.misfit = tumor_misfits(ops, options.tumor_misfit, d, O, labels,
                                                    options.core_threshold, options.edema_threshold)
        self.vt_patient = ops.xp.asarray(vt_patient, dtype=ops.dtype)
        # where the patient's ventricles are observed (1) or hidden under the tumour (0)
        self.vt_mask = None if vt_mask is None else (ops.xp.asarray(vt_mask) > 0.5).astype(ops.dtype)
        if self.vt_mask is not None and self.vt_mask.shape != self.vt_patient.shape:
            raise ValueError(f"vt_mask must have the shape of vt_patient {self.vt_patient.shape}, "
                             f"got {self.vt_mask.shape}")
        self.options, self.cancel = options, cancel
        self.n_forward = 0
        self.cfl_flagged = 0
        self._cache: dict[tuple, tuple[float, dict]] = {}
        self._residuals: OrderedDict[tuple, np.ndarray] = OrderedDict()  # the last few r(x)
        # one FD Jacobian's residuals (1 + |x|) and the next trial point's: 16·n³ bytes each
        self._residual_capacity = 3 + self.n_weights + 3 * self.shift + 2
        self._lock = threading.Lock()

    def params(self, x) -> ForwardParams:
        p = from_scaled(x)
        o = self.options
        return ForwardParams(kappa=p["kappa"], rho=p["rho"], gamma=p["gamma"], nt=o.nt, dt=o.dt,
                             r_k=o.r_k, r_rho=o.r_rho, elasticity_rtol=o.elasticity_rtol)

    def weights_of(self, x) -> np.ndarray:
        """The atom weights q = x[3:3+s] of x (empty without c0_refit)."""
        return np.asarray(x, dtype=float)[3:3 + self.n_weights]

    def shift_of(self, x) -> np.ndarray:
        """The translation δ of c0 in voxels, x[3+s:3+s+3] (empty without c0_shift)."""
        return np.asarray(x, dtype=float)[3 + self.n_weights:3 + self.n_weights + 3 * self.shift]

    def c0_at(self, x):
        """c0 at x: the fixed c0, or Σ q_i φ_i / max with the weights q (c0_refit); with
        c0_shift, translated by δ voxels (spectral phase) and rescaled to max 1; then
        multiplied by c0_max (1 by default, §5)."""
        amp = float(self.options.c0_max)
        if self.atoms is None and not self.shift and amp == 1.0:
            return self.c0
        xp = self.ops.xp
        c = self.c0
        if self.atoms is not None:
            # Σ q_i φ_i in a fixed order, not by BLAS: its rounding depends on the thread count
            # (a Dask worker has one), and one-sided differences with step 1e-5 magnify it
            c = xp.zeros_like(self.atoms[0])
            for q, atom in zip(self.weights_of(x), self.atoms):
                c += atom.dtype.type(q) * atom
        if self.shift:
            c = self.ops.translate(c, self.shift_of(x) * self.ops.h)
        top = float(xp.max(c))
        if not top > 0:
            return c
        c = c / c.dtype.type(top)
        return c if amp == 1.0 else c * c.dtype.type(amp)

    def solve(self, x):
        """Full forward solve at x; returns (J, parts, ForwardResult)."""
        return self._evaluate(x)[:3]

    def _evaluate(self, x):
        """Full forward solve at x: (J, parts, ForwardResult, tumour residual, vt residual)."""
        check_cancel(self.cancel)
        res = run_forward(self.ops, self.tissues, self.c0_at(x), self.params(x), cancel=self.cancel,
                          on_cfl="flag")
        self.n_forward += 1
        if res.cfl_flagged:
            self.cfl_flagged += 1
        xp = self.ops.xp
        rt = self.misfit.residual(res.c, res.tissues)  # J_d = ½h³‖rt‖² (observation's misfits)
        rv = self.vt_residual(res)
        jt = 0.5 * self.ops.h**3 * float(xp.sum(rt * rt, dtype=np.float64))
        jv = 0.5 * self.ops.h**3 * float(xp.sum(rv * rv, dtype=np.float64))
        parts = {"tumor": jt, "vt": jv}
        return jt + jv, parts, res, rt, rv

    def vt_residual(self, res):
        """vt(1) − vt_patient where the patient's ventricles are observed (vt_mask)."""
        r = res.tissues.vt - self.vt_patient
        return r if self.vt_mask is None else r * self.vt_mask

    def value(self, x) -> float:
        key = _key(x)
        if key not in self._cache:
            J, parts, _ = self.solve(x)
            self._cache[key] = (J, parts)
        return self._cache[key][0]

    def values(self, points, workers: int) -> list[float]:
        """J at several points, concurrently."""
        todo = [p for p in points if _key(p) not in self._cache]
        _map(self.value, todo, workers)
        return [self.value(p) for p in points]

    def residual(self, x) -> np.ndarray:
        """r(x) = h^{3/2}·(O(c(1) − d), vt(1) − vt_patient) flattened (host float64), so that
        J = ½‖r‖² (Gauss-Newton); the last 1 + |x| + 1 residuals are kept."""
        key = _key(x)
        with self._lock:
            if key in self._residuals:
                self._residuals.move_to_end(key)
                return self._residuals[key]
        J, parts, _, rt, rv = self._evaluate(x)
        s = math.sqrt(self.ops.h ** 3)
        r = np.concatenate([to_numpy(rt).ravel(), to_numpy(rv).ravel()]).astype(np.float64) * s
        with self._lock:
            self._cache[key] = (J, parts)
            self._residuals[key] = r
            while len(self._residuals) > self._residual_capacity:
                self._residuals.popitem(last=False)
        return r

    def residuals(self, points, workers: int) -> list[np.ndarray]:
        """r at several points, concurrently."""
        return _map(self.residual, points, workers)


def _key(x) -> tuple:
    return tuple(np.round(np.asarray(x, dtype=float), 14))


def _map(f, items, workers: int) -> list:
    """[f(i) for i in items], on a thread pool when workers > 1 (the FFTs release the GIL)."""
    items = list(items)
    if workers > 1 and len(items) > 1:
        with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
            return list(pool.map(f, items))
    return [f(i) for i in items]


def fd_steps(x, rel_step: float, bounds: Bounds) -> np.ndarray:
    """One-sided steps 1e-5·|x_i| (1e-5 where x_i = 0), backwards at an upper bound."""
    h = rel_step * np.where(np.abs(x) > 0, np.abs(x), 1.0)
    return np.where(x + h > bounds.ub, -h, h)


def fd_points(x, options: MassEffectOptions, bounds: Bounds):
    """(h, [x, x + h_1 e_1, …]): the one-sided difference steps and the 1 + len(x) points of
    fd_gradient and fd_jacobian (the same points, so each reuses the other's cached solves)."""
    x = np.asarray(x, dtype=float)
    h = fd_steps(x, options.fd_rel_step, bounds)
    return h, [x] + [x + h[i] * np.eye(len(x))[i] for i in range(len(x))]


def fd_gradient(obj: MassEffectObjective, x, options: MassEffectOptions, bounds: Bounds):
    """(J(x), ∇J(x)) by one-sided differences: 1 + len(x) forward solves (4 for (γ, ρ, κ)),
    run concurrently."""
    h, pts = fd_points(x, options, bounds)
    vals = obj.values(pts, options.workers)
    g = np.array([(vals[i + 1] - vals[0]) / h[i] for i in range(len(h))])
    return vals[0], g


def fd_jacobian(obj: MassEffectObjective, x, options: MassEffectOptions, bounds: Bounds):
    """(r(x), ∂r/∂x) by one-sided differences at fd_gradient's points: 1 + len(x) forward
    solves, run concurrently; the gradient of J = ½‖r‖² is then ∂r/∂xᵀ r."""
    h, pts = fd_points(x, options, bounds)
    R = obj.residuals(pts, options.workers)
    return R[0], np.stack([(R[i + 1] - R[0]) / h[i] for i in range(len(h))], axis=1)


#: a variable this close to a bound (relative to its range) counts as on it in ‖P g‖
ACTIVE_BOUND_RTOL = 1e-6


def projected_gradient_norm(x, g, bounds: Bounds) -> float:
    """‖P g‖: drop components that push against an active bound, i.e. one within
    ACTIVE_BOUND_RTOL of its range (Gauss-Newton's trust-region reflective iterates stay
    strictly inside and close in on a bound by a factor ~200 per iteration, so an exact test
    kept a weight at 1e-10 "free" and spent ~4 more iterations with J flat to 1e-9)."""
    pg = np.array(g, dtype=float)
    tol = ACTIVE_BOUND_RTOL * (bounds.ub - bounds.lb)
    at_lo = (x <= bounds.lb + tol) & (pg > 0)
    at_hi = (x >= bounds.ub - tol) & (pg < 0)
    pg[at_lo | at_hi] = 0.0
    return float(np.linalg.norm(pg))


def fd_hessian(obj: MassEffectObjective, x, workers: int, eps: float) -> np.ndarray:
    """Forward-difference Hessian in the scaled (γ, ρ, κ), step eps^{1/3}·max(|x_i|, 1)
    (x's atom weights, if any, held fixed)."""
    x = np.asarray(x, dtype=float)
    h = eps ** (1.0 / 3.0) * np.maximum(np.abs(x[:3]), 1.0)
    E = np.eye(len(x))[:3] * h[:, None]
    pts = {(): x}
    for i in range(3):
        pts[(i,)] = x + E[i]
        pts[(i, i)] = x + 2 * E[i]
        for j in range(i + 1, 3):
            pts[(i, j)] = x + E[i] + E[j]
    keys = list(pts)
    f = dict(zip(keys, obj.values([pts[k] for k in keys], workers)))
    H = np.empty((3, 3))
    for i in range(3):
        H[i, i] = (f[(i, i)] - 2 * f[(i,)] + f[()]) / h[i] ** 2
        for j in range(i + 1, 3):
            H[i, j] = H[j, i] = (f[(i, j)] - f[(i,)] - f[(j,)] + f[()]) / (h[i] * h[j])
    return H


def hessian_condition(obj: MassEffectObjective, x, workers: int) -> float:
    """Condition number of the forward-difference Hessian at x (step ε_mach^{1/3}, §6)."""
    eps = float(np.finfo(obj.ops.dtype).eps)
    return condition_number(fd_hessian(obj, x, workers, eps))


def condition_number(H: np.ndarray) -> float:
    """|λ|max / |λ|min of the symmetric Hessian (inf when singular)."""
    ev = np.abs(np.linalg.eigvalsh(0.5 * (H + H.T)))
    return float(ev.max() / ev.min()) if ev.min() > 0 else math.inf


def _in_precision(ops: SpectralOps, precision: str, tissues, *arrays):
    """ops and arrays in the requested floating-point precision (no copy when it matches)."""
    dtype = np.dtype(precision)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"S.3 precision must be 'float32' or 'float64', not {precision!r}")
    if dtype != ops.dtype:
        ops = SpectralOps(ops.n, dataclasses.replace(ops.backend, dtype=dtype))
    xp = ops.xp
    cast = lambda a: None if a is None else xp.asarray(a, dtype=dtype)  # noqa: E731
    tissues = type(tissues)(*(cast(getattr(tissues, k)) for k in ("wm", "gm", "vt", "csf", "bg")))
    return (ops, tissues, *(cast(a) for a in arrays))


def restrict(a, n_coarse: int, normalise_max: bool = False):
    """Block mean of an n³ field (or a 3×n³ stack) onto n_coarse³ (host numpy, float64):
    partial volumes stay partial volumes. normalise_max rescales to max 1 (c0, §6 S.3)."""

    a = np.asarray(to_numpy(a), dtype=np.float64)
    n = a.shape[-1]
    f = n // n_coarse
    m = n_coarse
    out = a.reshape(*a.shape[:-3], m, f, m, f, m, f).mean(axis=(-5, -3, -1))
    if normalise_max:
        top = float(out.max())
        out = out / top if top > 0 else out
    return out


def pull_back(ops: SpectralOps, c0, u):
    """c0(X + u(X)) on the grid of ops (u: (3, n, n, n) domain units, the displacement at
    t = 1), cubic Lagrange and periodic, clipped at 0 and rescaled to max 1 (module
    docstring: the patient-frame c0 of S.1 brought to the undeformed atlas frame)."""
    from .interpolation import CubicLagrangeInterpolator

    xp = ops.xp
    interp = CubicLagrangeInterpolator.from_displacement(xp.asarray(u, dtype=ops.dtype), ops.n, ops.backend)
    c = xp.maximum(interp(xp.asarray(c0, dtype=ops.dtype)), 0)
    top = float(xp.max(c))
    return c / ops.dtype.type(top) if top > 0 else c


def _relative_change(xp, a, b) -> float:
    den = float(xp.sqrt(xp.sum(b * b, dtype=np.float64)))
    return float(xp.sqrt(xp.sum((a - b) ** 2, dtype=np.float64))) / den if den > 0 else math.inf


def invert_mass_effect(ops: SpectralOps, atlas_tissues, c0, d, O, vt_patient, *,
                       initial: dict | None = None, options: MassEffectOptions | None = None,
                       progress=None, cancel=None, atlas: str | int | None = None,
                       c0_atoms=None, c0_weights=None, tumor_labels=None, vt_mask=None) -> MassEffectResult:
    """Run S.3 on one atlas. initial: starting {gamma, rho, kappa} (paper units).
    c0_atoms ((s, n, n, n)) and c0_weights (s): S.1's support atoms in this frame and their
    weights, needed by options.c0_refit (c0 is then Σ q_i φ_i / max, q from c0_weights).
    tumor_labels (core, edema or None): the label fractions in this frame, needed by
    options.tumor_misfit "band" (d and O still give the reported relative tumour error).
    vt_mask (> 0.5 = observed): where vt_patient is known; the ventricle term leaves out the
    rest (a tumour label hides the ventricles under it; a deviation from §6, calibrate.py).

    With options.coarse_grids, S.3 runs coarse-to-fine: on each coarse grid (the atlas
    tissues, c0, d, O and vt_patient block-averaged; c0 rescaled to max 1; no Hessian), each
    level started from the previous optimum, the last on the given grid. The last level stops
    at ‖P g‖ ≤ gtol_rel·‖P g(x_0)‖ with g(x_0) the gradient at the coarsest start, so the
    result satisfies the same rule as a single-level run, for a fraction of the fine solves;
    a coarse level only warm-starts the next, so it stops at max(gtol_rel, COARSE_GTOL_REL)
    (its optimum is biased anyway: 64³ TC(c), S.1's c0 refitted and translated, the 32³
    level's γ went 1.166 → 1.168 over iterations 8–10, J down 3%, γ* being 0.8).

    With options.c0_pullback = K > 0, the finest level pulls c0 back with its optimum's
    displacement and re-solves from that optimum up to K times (module docstring);
    result.c0 is the c0 of the final solve. Coarse levels only warm-start (γ, ρ, κ): the
    block-averaged problem has its own optimum (γ 1.09 for γ* 0.8 at 32³ from 64³ data,
    true c0), and pulling c0 back with its displacement compounds that bias (measured at
    64³ TC(c), S.1's c0: the coarse γ went 1.19 → 1.5, the bound, over two rounds).
    """
    options = options or MassEffectOptions()
    t0 = time.perf_counter()
    levels = options.levels(ops.n)
    init = {"gamma": 0.6, "rho": 8.0, "kappa": 0.02}
    init.update(initial or {})
    atoms = None
    if options.c0_refit:
        if c0_atoms is None or c0_weights is None:
            raise ValueError("c0_refit needs S.1's atoms and weights (c0_atoms, c0_weights)")
        atoms = np.asarray(to_numpy(c0_atoms), dtype=np.float64)
        w = np.asarray(c0_weights, dtype=float).reshape(-1)
        if atoms.shape != (len(w), ops.n, ops.n, ops.n) or not len(w):
            raise ValueError(f"c0_atoms must have shape (s, n, n, n) = ({len(w)}, {ops.n}, {ops.n}, {ops.n}), "
                             f"got {atoms.shape}")
        if not (np.all(np.isfinite(w)) and np.all(w >= 0) and w.max() > 0):
            raise ValueError("c0_weights must be finite, non-negative and not all zero")
        init["c0_weights"] = np.minimum(w / w.max(), options.c0_weight_max)
    # without labels the band's objective raises on the first level (MassEffectObjective)
    labels = tuple(tumor_labels) if options.tumor_misfit in ("band", "fraction") and tumor_labels is not None else None
    g0_ref = None
    coarse_runs: list[dict] = []
    rounds: list[dict] = []
    n_forward_coarse = 0
    n_forward_fine = 0
    history: list[dict] = []
    for k, m in enumerate(levels):
        check_cancel(cancel)
        fine = m == ops.n
        if fine:
            lops, T, c0_l, d_l, O_l, vt_l = ops, atlas_tissues, c0, d, O, vt_patient
            atoms_l, labels_l, vt_mask_l = atoms, labels, vt_mask
            lopt = dataclasses.replace(options, hessian=False) if options.c0_pullback > 0 else options
        else:
            lops = SpectralOps(m, ops.backend)
            xp = lops.xp  # as_dev below closes over it
            as_dev = lambda a, **kw: None if a is None else xp.asarray(restrict(a, m, **kw), dtype=lops.dtype)  # noqa: E731
            T = type(atlas_tissues)(*(as_dev(getattr(atlas_tissues, key))
                                      for key in ("wm", "gm", "vt", "csf", "bg")))
            c0_l, d_l, vt_l = as_dev(c0, normalise_max=True), as_dev(d), as_dev(vt_patient)
            O_l = None if O is None else xp.asarray(restrict(O, m) > 0.5, dtype=lops.dtype)
            atoms_l = None if atoms is None else restrict(atoms, m)
            labels_l = None if labels is None else tuple(None if a is None else restrict(a, m) for a in labels)
            vt_mask_l = None if vt_mask is None else restrict(vt_mask, m)
            # the translation bound is physical: options.c0_shift voxels of n
            lopt = dataclasses.replace(options, hessian=False, c0_shift=options.c0_shift * m / ops.n,
                                       gtol_rel=max(options.gtol_rel, COARSE_GTOL_REL))
        xp = lops.xp
        c0_given = xp.asarray(c0_l, dtype=lops.dtype)
        c0_cur = c0_given
        n_rounds = options.c0_pullback if fine else 0  # coarse levels: a warm start only
        sub = _level_progress(progress, m, k, len(levels))
        for rnd in range(n_rounds + 1):
            r = _invert_one_level(lops, T, c0_cur, d_l, O_l, vt_l, init, lopt,
                                  _round_progress(sub, rnd, n_rounds + 1), cancel, atlas, g0_ref, atoms_l,
                                  labels_l, vt_mask_l)
            g0_ref = r.gradient_norm_initial if g0_ref is None else g0_ref
            init = {"gamma": r.gamma, "rho": r.rho, "kappa": r.kappa}
            if r.c0_weights is not None:
                init["c0_weights"] = np.asarray(r.c0_weights)
            if r.c0_shift is not None:
                init["c0_shift_domain"] = np.asarray(r.c0_shift_domain)
            if fine:
                n_forward_fine += r.n_forward
            else:
                n_forward_coarse += r.n_forward
            history += [{**h, "grid": m, "round": rnd} for h in r.history]
            rec = {"grid": m, "round": rnd, "gamma": r.gamma, "rho": r.rho, "kappa": r.kappa, "nit": r.nit,
                   "n_forward": r.n_forward, "seconds": r.seconds, "message": r.message,
                   "relative_tumor_error": r.relative_tumor_error, "max_u": r.max_u}
            if n_rounds <= 0:
                break
            c0_new = pull_back(lops, c0_given, r.forward.u)
            rec["c0_change"] = _relative_change(xp, c0_new, c0_cur)
            rounds.append(rec)
            if not float(xp.max(c0_new)) > 0 or not math.isfinite(rec["c0_change"]):
                rec["message"] += "; pull-back left no tumour: kept this c0"
                break
            if rnd == n_rounds or rec["c0_change"] < options.c0_pullback_tol:
                break
            c0_cur = c0_new
        if not fine:
            coarse_runs.append(rec)
    out = r
    if options.hessian and options.c0_pullback > 0:  # once, at the final solve's optimum (c0 fixed)
        hops, hT, hc0, hd, hO, hvt = _in_precision(ops, options.precision, atlas_tissues, out.c0, d, O,
                                                    vt_patient)
        out.hessian_condition = hessian_condition(
            MassEffectObjective(hops, hT, hc0, hd, hO, hvt, options, cancel, labels=labels, vt_mask=vt_mask), out.x,
            options.workers)
    out.history = history
    out.coarse = coarse_runs
    out.c0_rounds = rounds
    out.n_forward = n_forward_fine
    out.n_forward_coarse = n_forward_coarse
    out.seconds = time.perf_counter() - t0
    return out


#: relative-gradient tolerance of a coarse level of a coarse-to-fine S.3 (a warm start only)
COARSE_GTOL_REL = 3e-2

#: stop S.3 when J has changed by less than STAGNATION_RTOL (relative) over the last
#: STAGNATION_ITERATIONS iterations: the FD gradient is then at its noise floor above the
#: relative-gradient tolerance (seen in a pull-back round, whose reference gradient is the
#: first round's start), and further iterations only spend forward solves
STAGNATION_RTOL = 1e-7
STAGNATION_ITERATIONS = 3

#: stop S.3 when the unknowns have settled: over the last SETTLED_ITERATIONS iterations no
#: scaled parameter (10γ, ρ, 100κ) moved by more than SETTLED_RTOL·max(|x_i|, 1), no c0 atom
#: weight (in [0, 1]) by more than SETTLED_WEIGHT_ATOL and no c0 translation by more than
#: SETTLED_WEIGHT_ATOL voxels. Catches the creep the J rule misses when J still drifts by
#: ~1e-6 per step: 64³ TC(c), inverted IC (benchmarks/results/gauss_newton/recovery_64.json)
#: moved γ by < 1e-4 relative over its last 6 of 22 iterations (this rule stops it at 19,
#: γ 2e-5 from the final value); replayed on the recorded histories, the 32³ rows of that
#: folder and of its labels/ stop where they did (by the gradient or the J rule).
SETTLED_RTOL = 1e-4
SETTLED_WEIGHT_ATOL = 1e-3
SETTLED_ITERATIONS = 3


class _StopGaussNewton(Exception):
    """Raised by the Gauss-Newton Jacobian when S.3's stopping rules are met."""


def _stagnated(history: list[dict]) -> bool:
    if len(history) <= STAGNATION_ITERATIONS:
        return False
    old, new = history[-1 - STAGNATION_ITERATIONS]["objective"], history[-1]["objective"]
    return abs(old - new) <= STAGNATION_RTOL * abs(old)


def _settled(history: list[dict]) -> bool:
    """True when γ, ρ, κ (scaled) and the c0 weights / translation have settled (SETTLED_*)."""
    if len(history) <= SETTLED_ITERATIONS:
        return False
    old, new = history[-1 - SETTLED_ITERATIONS], history[-1]
    xo = to_scaled(old["gamma"], old["rho"], old["kappa"])
    xn = to_scaled(new["gamma"], new["rho"], new["kappa"])
    if np.any(np.abs(xn - xo) > SETTLED_RTOL * np.maximum(np.abs(xn), 1.0)):
        return False
    for key in ("c0_weights", "c0_shift_voxels"):
        if key in new and np.any(np.abs(np.subtract(new[key], old[key])) > SETTLED_WEIGHT_ATOL):
            return False
    return True


def _round_progress(progress, k: int, count: int):
    """Progress of pull-back round k of at most count: round k spans [k, k+1]/count."""
    if progress is None or count == 1:
        return progress

    def cb(ev):
        f = (k + min(max(float(ev.get("fraction") or 0.0), 0.0), 1.0)) / count
        progress({**ev, "round": k, "fraction": f})
    return cb


def _level_progress(progress, grid: int, k: int, count: int):
    """Progress of level k of count: coarse levels share the first 30% of the fraction."""
    if progress is None or count == 1:
        return progress
    lo, hi = ((0.3 * k / (count - 1), 0.3 * (k + 1) / (count - 1)) if k < count - 1 else (0.3, 1.0))

    def cb(ev):
        f = lo + (hi - lo) * float(ev.get("fraction") or 0.0)
        progress({**ev, "grid": grid, "fraction": f, "message": f"{grid}^3: {ev.get('message', '')}"})
    return cb


def _invert_one_level(ops: SpectralOps, atlas_tissues, c0, d, O, vt_patient, init: dict,
                      options: MassEffectOptions, progress, cancel, atlas, g0_ref,
                      atoms=None, labels=None, vt_mask=None) -> MassEffectResult:
    """S.3 on one grid from init; g0_ref: the reference gradient norm of the stopping rule
    (None: the gradient at the start); atoms: c0_refit's atoms (init["c0_weights"] their
    starting weights)."""
    t0 = time.perf_counter()
    caller_dtype = ops.dtype
    ops, atlas_tissues, c0, d, O, vt_patient, atoms = _in_precision(
        ops, options.precision, atlas_tissues, c0, d, O, vt_patient, atoms)
    n_weights = 0 if atoms is None else int(atoms.shape[0])
    shift = options.c0_shift > 0
    bounds = options.bounds_scaled(n_weights)
    x0 = to_scaled(init["gamma"], init["rho"], init["kappa"])
    if n_weights:
        x0 = np.r_[x0, np.asarray(init["c0_weights"], dtype=float)]
    if shift:  # δ in voxels of this grid (init carries it in domain units)
        x0 = np.r_[x0, np.asarray(init.get("c0_shift_domain", np.zeros(3)), dtype=float) / ops.h]
    x0 = np.clip(x0, bounds.lb, bounds.ub)
    obj = MassEffectObjective(ops, atlas_tissues, c0, d, O, vt_patient, options, cancel, atoms, labels, vt_mask)
    state = {"g0": None, "g": None, "x": x0, "nit": 0, "J": None}
    history: list[dict] = []

    def report(msg):
        if progress is not None:
            progress({"stage": "S.3", "atlas": atlas, "iteration": state["nit"],
                      "objective": state["J"], "fraction": min(state["nit"] / options.maxiter, 1.0),
                      "message": msg, **from_scaled(state["x"])})

    def fun(x):
        J, g = fd_gradient(obj, x, options, bounds)
        state.update(x=np.array(x), J=J, g=g)
        if state["g0"] is None:
            state["g0"] = projected_gradient_norm(x, g, bounds)
        return J, g

    def tolerance() -> float:
        return options.gtol_rel * (g0_ref if g0_ref is not None else state["g0"])

    def record(x, J, g) -> bool:
        """Iteration at x into the history and the progress; True when a stopping rule holds."""
        state["nit"] += 1
        gn = projected_gradient_norm(x, g, bounds)
        entry = {"iteration": state["nit"], "objective": J, "gradient_norm": gn, **from_scaled(x)}
        if n_weights:
            entry["c0_weights"] = obj.weights_of(x).tolist()
        if shift:
            entry["c0_shift_voxels"] = obj.shift_of(x).tolist()
        history.append(entry)
        state.update(x=np.array(x), J=J)
        report(f"S.3 iteration {state['nit']}: J={J:.4e} |g|={gn:.2e}")
        if state["g0"] and gn <= tolerance():
            return True
        if _stagnated(history):
            state["stagnated"] = True
            return True
        if _settled(history):
            state["settled"] = True
            return True
        return False

    def callback(intermediate_result):
        x = intermediate_result.x
        J, g = fd_gradient(obj, x, options, bounds)  # cached: no extra solves
        if record(x, J, g):
            raise StopIteration

    def jac(x):
        """Gauss-Newton: the FD Jacobian of r (the same solves as fd_gradient). least_squares
        evaluates it once per accepted step, so a new point is an iteration: the stopping
        rules are checked here (scipy's own callback needs scipy ≥ 1.16; Slicer's may be older)."""
        r, Jm = fd_jacobian(obj, x, options, bounds)
        g = np.einsum("ij,i->j", Jm, r)  # einsum, not BLAS: the same sums on any thread count
        new_point = state["g0"] is not None and _key(x) != _key(state["x"])
        state.update(x=np.array(x), J=0.5 * float(np.einsum("i,i->", r, r)), g=g)
        if state["g0"] is None:
            state["g0"] = projected_gradient_norm(x, g, bounds)
        if new_point and (record(x, state["J"], g) or state["nit"] >= options.maxiter):
            raise _StopGaussNewton
        return Jm

    report("S.3 started")
    gauss_newton = options.optimizer == "gauss-newton"
    if gauss_newton:  # trust-region reflective keeps its iterates strictly inside the bounds
        x0 = np.clip(x0, bounds.lb + 1e-10 * np.maximum(1, np.abs(bounds.lb)),
                     bounds.ub - 1e-10 * np.maximum(1, np.abs(bounds.ub)))
        jac(x0)
    else:
        fun(x0)
    if state["g0"] <= tolerance():  # a coarse level already left nothing to do here
        x, res_nit, res_nfev, res_message = x0, 0, 1, "start satisfies the stopping rule"
    elif gauss_newton:
        trials = [0]

        def residual(x):
            trials[0] += 1
            return obj.residual(x)
        try:
            res = least_squares(residual, x0, jac=jac, bounds=(bounds.lb, bounds.ub), method="trf",
                                ftol=1e-15, xtol=1e-10, gtol=1e-15, max_nfev=3 * options.maxiter + 1)
            res_message = str(res.message)
        except _StopGaussNewton:
            res_message = "stopped by S.3's rules"
        x, res_nit, res_nfev = state["x"], state["nit"], trials[0]
    else:
        res = minimize(fun, x0, jac=True, method="L-BFGS-B", bounds=bounds, callback=callback,
                       options={"maxiter": options.maxiter, "maxcor": options.maxcor,
                                "ftol": 1e-12, "gtol": 1e-12})
        x, res_nit, res_nfev, res_message = res.x, res.nit, res.nfev, str(res.message)
    x = np.clip(x, bounds.lb, bounds.ub)
    if gauss_newton and _key(x) == _key(state["x"]):  # jac(x0) above set state["g"]
        g = state["g"]  # Jᵀr at the last iterate: the gradient the stopping rule judged
    else:
        _, g = fd_gradient(obj, x, options, bounds)  # cached solves: no new ones at an iterate
    gn = projected_gradient_norm(x, g, bounds)
    converged = bool(state["g0"] is not None and gn <= tolerance())
    J_opt, parts, fwd = obj.solve(x)
    cond = None
    if options.hessian:
        report("S.3 Hessian at the optimum")
        cond = hessian_condition(obj, x, options.workers)
    xp = ops.xp
    umag = xp.sqrt(xp.sum(fwd.u * fwd.u, axis=0))
    p = from_scaled(x)
    status = (0 if converged else 3 if state.get("stagnated") else 4 if state.get("settled")
              else 1 if res_nit >= options.maxiter else 2)
    message = ("relative gradient below %.0e" % options.gtol_rel if converged
               else {1: "iteration limit reached",
                     3: f"objective stagnated (relative change < {STAGNATION_RTOL:.0e} over "
                        f"{STAGNATION_ITERATIONS} iterations) above the gradient tolerance",
                     4: f"parameters settled (scaled change < {SETTLED_RTOL:.0e} over "
                        f"{SETTLED_ITERATIONS} iterations) above the gradient tolerance"}.get(status, res_message))
    out = MassEffectResult(
        x=x, kappa=p["kappa"], rho=p["rho"], gamma=p["gamma"], fun=J_opt,
        misfit_tumor=parts["tumor"], misfit_vt=parts["vt"],
        relative_tumor_error=obj.indicator.relative_error(fwd.c), max_u=float(umag.max()),
        nit=int(state["nit"]), nfev=int(res_nfev), n_forward=obj.n_forward, status=status,
        message=message, success=converged, gradient_norm=gn,
        gradient_norm_initial=float(g0_ref if g0_ref is not None else (state["g0"] or 0.0)),
        hessian_condition=cond, cfl_flagged=obj.cfl_flagged, seconds=time.perf_counter() - t0,
        history=history, forward=fwd)
    out.c0 = ops.xp.asarray(obj.c0_at(x), dtype=caller_dtype)  # the c0 this level solved with
    if n_weights:
        out.c0_weights = obj.weights_of(x).tolist()
    if shift:
        out.c0_shift = obj.shift_of(x).tolist()
        out.c0_shift_domain = (obj.shift_of(x) * ops.h).tolist()
    report(f"S.3 done: γ={out.gamma:.3f} ρ={out.rho:.2f} κ={out.kappa:.4f}")
    return out


__all__ = ["MassEffectOptions", "MassEffectResult", "MassEffectObjective", "invert_mass_effect",
           "to_scaled", "from_scaled", "restrict", "pull_back", "fd_hessian",
           "hessian_condition", "condition_number", "Cancelled"]
