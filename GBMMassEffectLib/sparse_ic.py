"""Stage S.1: sparse initial-condition inversion ("where did the tumor start?"), MODEL.md §6.

Unknowns (p, κ, ρ) of the §4 reaction–diffusion model on the patient brain (tumor labels
counted as white matter), c0 = Φp (§5), objective
    J(p, κ, ρ) = ½h³‖O c(1) − O d‖² + β/2·h³‖Φp‖²
with the exact discrete adjoint gradients of reaction_diffusion.py.

Algorithm (CoSaMP over the adjoint gradient, per connected tumor component):
  1. g = ∂J/∂p at the current iterate with β = 0 (the ranking gradient, §5);
  2. in every connected component of {d > threshold}, add the 2s largest |g_i| of its
     candidate atoms to the support S (s = 5 per component);
  3. bound-constrained L-BFGS-B (scipy) over (p_S, κ) with ρ fixed (the reference's choice;
     `rho_in_subspace=True` adds ρ), p ≥ 0, κ ∈ [1e-4, 0.5], ρ ∈ [1, 18];
  4. hard threshold: keep the s largest p_i per component; repeat (4 iterations);
  5. final solve: c0 = Φp_S rescaled to max 1 (§5), ρ restarted from the best misfit over
     {3, 6, 9, 10, 12, 15} (`rho_grid`), then
     `final="joint"` (default): one L-BFGS-B over (p_S, κ, ρ) with c0 = Φp_S/max(Φp_S), so
     max(c0) = 1 holds throughout and the shape of c0 is refitted together with ρ;
     `final="reference"`: a (κ, ρ) solve with that c0 fixed (what the reference does).
     The joint variant recovers at least as well (Testing/test_sparse_ic.py shows it).
L-BFGS-B works on scaled variables (p, κ/0.01, ρ) and the objective divided by
J_ref = ½h³‖Od‖², so that its default tolerances are meaningful at every grid size.

Tumour term: §5's indicator misfit by default; `tumor_misfit="band"` (a deviation, label
data only, solve_sparse_ic's tumor_labels) uses S.3's label band (observation.label_band:
each label boundary an iso-contour of c(1)) instead, J_ref then the band's value at c = 0;
candidates, components and the reported relative error still come from d and O.

Progress: `progress(dict(stage="S.1", iteration, objective, gradient_norm, support,
fraction, message))` once per L-BFGS-B iteration; `cancel()` returning True raises
progress.Cancelled at the next objective evaluation.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.ndimage
import scipy.optimize

from .backend import to_numpy
from .basis import GaussianBasis, brain_mask, candidate_centres
from .observation import (BETA_DEFAULT, CORE_THRESHOLD, EDEMA_THRESHOLD, TUMOR_MISFITS, Misfit,
                          check_label_thresholds, tumor_misfits)
from .progress import Cancelled, check_cancel
from .reaction_diffusion import ReactionDiffusion, coefficient_fraction
from .spectral import SpectralOps

__all__ = ["SparseICOptions", "SparseICResult", "support_atoms", "S1Objective", "solve_sparse_ic", "solve_kappa_rho", "Cancelled",
           "tumor_components", "coarsen",
           "normalised_ic", "normalised_ic_adjoint", "solve_sparse_ic_coarse_to_fine",
           "COARSE_TO_FINE_FROM", "s1_coarse_factor", "solve_s1"]

KAPPA_SCALE = 0.01  # L-BFGS-B sees κ/0.01 (cf. the reference's 100·κ)
#: from this grid on, solve_s1 runs S.1 coarse-to-fine (n/2 first) unless told otherwise:
#: 64³ single-grid S.1 took 52 min on 2 cores, coarse-to-fine a fraction of that
#: (benchmarks/recovery.py --s1-coarse-factor; README "Accuracy")
COARSE_TO_FINE_FROM = 64


@dataclass
class SparseICOptions:
    """Settings of stage S.1 (defaults: MODEL.md §5, §6)."""

    sparsity: int = 5  # s per connected tumor component
    cosamp_iterations: int = 4
    beta: float = BETA_DEFAULT
    kappa0: float = 0.05
    rho0: float = 10.0
    kappa_bounds: tuple = (1e-4, 0.5)
    rho_bounds: tuple = (1.0, 18.0)
    rho_in_subspace: bool = False
    final: str = "joint"  # "joint" | "reference"
    rho_grid: tuple = (3.0, 6.0, 9.0, 10.0, 12.0, 15.0)
    subspace_maxiter: int = 30
    final_maxiter: int = 50
    ftol: float = 1e-6  # L-BFGS-B relative-decrease stop on J/J_ref
    nt: int = 40
    rtol: float = 1e-6
    sigma: float | None = None  # atom width, default one voxel
    component_threshold: float = 0.1
    gm_ratio_k: float = 0.0
    gm_ratio_rho: float = 0.0
    # solve_s1: None = coarse-to-fine from n/2 at n >= COARSE_TO_FINE_FROM, else one grid;
    # 1 = always one grid; k >= 2 = coarse-to-fine from n/k
    coarse_factor: int | None = None
    # the tumour term: "indicator" is §5's ½h³‖O(c(1) − d)‖²; "band" (a deviation, on label
    # data only) the label band of observation.label_band at these thresholds, as S.3's
    # option of the same name (solve_sparse_ic's tumor_labels carry the core and edema)
    tumor_misfit: str = "indicator"
    core_threshold: float = CORE_THRESHOLD
    edema_threshold: float = EDEMA_THRESHOLD

    def check(self):
        if self.tumor_misfit not in TUMOR_MISFITS:
            raise ValueError(f"S.1 tumor_misfit must be one of {', '.join(TUMOR_MISFITS)}, got {self.tumor_misfit!r}")
        if self.tumor_misfit == "fraction":
            raise ValueError("S.1 tumor_misfit 'fraction' is S.3's only (it has no adjoint): "
                             "use 'indicator' or 'band' for S.1")
        check_label_thresholds(self.core_threshold, self.edema_threshold)
        cf = self.coarse_factor
        if cf is not None and (isinstance(cf, bool) or not isinstance(cf, int) or cf < 1):
            raise ValueError(f"coarse_factor must be null (automatic) or an integer >= 1, got {cf!r}")
        if self.sparsity < 1:
            raise ValueError(f"sparsity must be ≥ 1, got {self.sparsity}")
        if self.final not in ("joint", "reference"):
            raise ValueError(f"final must be 'joint' or 'reference', not {self.final!r}")
        lo, hi = self.kappa_bounds
        if not 0 < lo < hi:
            raise ValueError(f"bad kappa bounds {self.kappa_bounds}")
        lo, hi = self.rho_bounds
        if not 0 <= lo < hi:
            raise ValueError(f"bad rho bounds {self.rho_bounds}")


class SparseICResult(scipy.optimize.OptimizeResult):
    """OptimizeResult with: x (p over all candidates), p, c0, support (indices), centres,
    kappa, rho, fun (objective), misfit, relative_error, nit, nfev, status, success,
    message, history (one dict per iteration), components, basis."""


def tumor_components(d, threshold: float = 0.1):
    """Connected components (6-connectivity) of {d > threshold}: (labels, count)."""
    lab, k = scipy.ndimage.label(to_numpy(d) > threshold)
    return lab, int(k)


def coarsen(f, factor: int = 2):
    """Block mean over factor³ voxels (host numpy): a coarse-level copy of a fraction map."""
    a = np.asarray(to_numpy(f), dtype=np.float64)
    n = a.shape[0]
    if n % factor:
        raise ValueError(f"grid size {n} is not divisible by {factor}")
    m = n // factor
    return a.reshape(m, factor, m, factor, m, factor).mean(axis=(1, 3, 5))


class S1Objective:
    """J(p, κ, ρ) and its exact gradient (MODEL.md §4, §5)."""

    def __init__(self, ops: SpectralOps, basis: GaussianBasis, model: ReactionDiffusion,
                 misfit: Misfit, beta: float = BETA_DEFAULT, cancel=None):
        self.ops, self.basis, self.model, self.misfit = ops, basis, model, misfit
        self.beta, self.cancel = beta, cancel
        self.nfev = 0

    def evaluate(self, p, kappa: float, rho: float, beta: float | None = None, c0=None,
                 gradient: bool = True):
        """(J, g_p over all atoms of `self.basis`, g_κ, g_ρ, misfit, c1).

        c0 given: evaluate with that initial condition (g_p then refers to ∂J/∂c0 = λ0).
        """
        check_cancel(self.cancel)
        self.nfev += 1
        beta = self.beta if beta is None else beta
        ops = self.ops
        c0 = self.basis.apply(p) if c0 is None else c0
        if not gradient:
            c1 = self.model.forward(c0, kappa, rho)
            mis = self.misfit.value(c1)
            return mis + _reg(ops, c0, beta), None, None, None, mis, c1
        traj = self.model.forward(c0, kappa, rho, store=True)
        c1 = traj.c1
        mis = self.misfit.value(c1)
        lam0, gk, gr = self.model.adjoint(traj, self.misfit.gradient(c1))
        if beta:
            lam0 = lam0 + ops.dtype.type(beta * ops.h**3) * c0
        return mis + _reg(ops, c0, beta), lam0, gk, gr, mis, c1

    def gradient_p(self, lam0):
        return to_numpy(self.basis.adjoint(lam0))


def support_atoms(result: "SparseICResult") -> np.ndarray:
    """S.1's support atoms φ_i on the grid, (|S|, n, n, n) host float32: result.c0 is
    Σ p_i φ_i / max with p = result.p (§5; what S.3's c0 refit starts from)."""
    support = result.basis.subset(result.support)
    return np.stack([to_numpy(support.atom(i)).astype(np.float32) for i in range(support.m)])


def normalised_ic(basis: GaussianBasis, p):
    """c0 = Φp / max(Φp) (max(c0) = 1, §5) and the state its adjoint needs; (None, None) if Φp ≤ 0."""
    xp = basis.ops.xp
    craw = basis.apply(p)
    istar = int(xp.argmax(craw))
    M = float(craw.reshape(-1)[istar])
    if not M > 0:
        return None, None
    return craw / basis.ops.dtype.type(M), (craw, M, istar)


def normalised_ic_adjoint(basis: GaussianBasis, lam, state):
    """∂J/∂p for c0 = Φp/M, M = (Φp)(i*): Φᵀλ/M − ⟨λ, Φp⟩/M²·φ(i*) (host float64).

    Exact wherever the argmax voxel i* is unique (J is then smooth in p).
    """
    xp = basis.ops.xp
    craw, M, istar = state
    at_star = xp.sum(xp.where(basis.idx == istar, basis.val, 0), axis=1, dtype=np.float64)
    lc = float(xp.sum(lam * craw, dtype=np.float64))
    return to_numpy(basis.adjoint(lam)) / M - (lc / M**2) * to_numpy(at_star)


def _reg(ops, c0, beta):
    if not beta:
        return 0.0
    return 0.5 * beta * ops.h**3 * float(ops.xp.sum(c0 * c0, dtype=np.float64))


class _Run:
    """Book-keeping of one S.1 run: counters, progress lines, history."""

    def __init__(self, progress, total_phases: int):
        self.progress, self.total = progress, max(1, total_phases)
        self.phase = 0
        self.iteration = 0
        self.history: list[dict] = []

    def report(self, objective, gnorm, support, message, sub_fraction=0.0):
        self.iteration += 1
        frac = min(1.0, (self.phase + min(sub_fraction, 1.0)) / self.total)
        rec = dict(stage="S.1", iteration=self.iteration, objective=float(objective),
                   gradient_norm=float(gnorm), support=int(support), fraction=float(frac),
                   message=message)
        self.history.append(rec)
        if self.progress is not None:
            self.progress(dict(rec))


def _best_rho(obj: "S1Objective", kappa: float, c0, grid, rho_bounds) -> float:
    """ρ of the best misfit over the grid (§6: the reference starts ρ from {3, 6, 9, 10, 12, 15})."""
    best = None
    for r in grid:
        r = float(np.clip(r, *rho_bounds))
        J = obj.evaluate(None, kappa, r, c0=c0, gradient=False)[0]
        if best is None or J < best[0]:
            best = (J, r)
    return best[1]


def _lbfgsb(fun, x0, bounds, maxiter, run: _Run, support: int, label: str, ftol: float = 1e-6):
    """scipy L-BFGS-B with jac=True, one progress line per iteration."""
    cache = {}

    def f(x):
        val, g = fun(x)
        if not (np.isfinite(val) and np.all(np.isfinite(g))):
            # overflow far outside the useful range (huge p): a large value makes the line
            # search backtrack instead of propagating NaN into the iterate
            val, g = 1e6, np.zeros_like(np.asarray(x, dtype=np.float64))
        cache["last"] = (val, g)
        return val, g

    count = [0]

    def callback(intermediate_result):
        count[0] += 1
        val, g = cache.get("last", (float("nan"), np.zeros(1)))
        xk = intermediate_result.x
        lo = np.array([b[0] if b[0] is not None else -np.inf for b in bounds])
        hi = np.array([b[1] if b[1] is not None else np.inf for b in bounds])
        pg = np.clip(xk - g, lo, hi) - xk  # projected gradient
        run.report(intermediate_result.fun, float(np.linalg.norm(pg)), support,
                   f"{label}: iteration {count[0]}", count[0] / max(1, maxiter))

    res = scipy.optimize.minimize(f, x0, jac=True, method="L-BFGS-B", bounds=bounds,
                                  callback=callback, options=dict(maxiter=maxiter, maxcor=10, ftol=ftol))
    return res


def solve_sparse_ic(ops: SpectralOps, wm, gm, vt, csf, data, O=None, options: SparseICOptions | None = None,
                    progress=None, cancel=None, basis: GaussianBasis | None = None,
                    mask=None, tumor_labels=None) -> SparseICResult:
    """Run stage S.1 (MODEL.md §6) on tissue fractions (tumor counted as wm) and data d.

    tumor_labels (core, edema or None fractions) feed the label band when
    options.tumor_misfit is "band"; d and O still pick the candidates and give the reported
    relative error (§5's). Returns a SparseICResult; raises progress.Cancelled when `cancel()` turns True.
    """
    opt = options or SparseICOptions()
    xp, n, h = ops.xp, ops.n, ops.h
    shape = (n, n, n)
    fields = check_s1_inputs(ops, wm, gm, vt, csf, data, O, opt)
    d = fields["data"]
    m_k = coefficient_fraction(fields["wm"], fields["gm"], fields["vt"], fields["csf"], opt.gm_ratio_k, xp)
    m_r = coefficient_fraction(fields["wm"], fields["gm"], fields["vt"], fields["csf"], opt.gm_ratio_rho, xp)
    model = ReactionDiffusion(ops, m_k, m_r, nt=opt.nt, rtol=opt.rtol)
    indicator, misfit = tumor_misfits(ops, opt.tumor_misfit, d, O, tumor_labels, opt.core_threshold,
                                      opt.edema_threshold, stage="S.1")
    if mask is None:
        mask = brain_mask(fields["wm"], fields["gm"], fields["vt"], xp)
    if basis is None:
        C = candidate_centres(ops, d, opt.sigma, threshold=0.1)
        if len(C) == 0:
            raise ValueError("no candidate Gaussian centres: no tumor region where the σ-ball "
                             "is > 90% above 0.1")
        basis = GaussianBasis(ops, C, opt.sigma, mask)
    obj = S1Objective(ops, basis, model, misfit, opt.beta, cancel)
    J_ref = misfit.value(xp.zeros(shape, dtype=ops.dtype))
    if not J_ref > 0:
        raise ValueError("the observed data O·d is zero: nothing to invert")

    # components of every candidate atom
    lab, ncomp = tumor_components(d, opt.component_threshold)
    idx = np.rint(basis.centres / h).astype(np.int64) % n
    comp = lab[idx[:, 0], idx[:, 1], idx[:, 2]]
    if np.any(comp == 0):  # an atom outside the thresholded data: attach to nearest component
        dist = scipy.ndimage.distance_transform_edt(lab == 0, return_indices=True)[1]
        z = comp == 0
        comp[z] = lab[dist[0][idx[z, 0], idx[z, 1], idx[z, 2]], dist[1][idx[z, 0], idx[z, 1], idx[z, 2]],
                      dist[2][idx[z, 0], idx[z, 1], idx[z, 2]]]
    comps = [c for c in range(1, ncomp + 1) if np.any(comp == c)]
    s = opt.sparsity

    kb, rb = opt.kappa_bounds, opt.rho_bounds
    kappa = float(np.clip(opt.kappa0, *kb))
    rho = float(np.clip(opt.rho0, *rb))
    p = np.zeros(basis.m)
    S = np.zeros(0, dtype=np.int64)
    run = _Run(progress, opt.cosamp_iterations + 1)
    status, message = 0, "converged"
    nit_total = 0

    def make_fun(T, with_kappa=True, with_rho=False, c0_fixed=None, normalise=False):
        """Objective over x = (p_T, κ/KAPPA_SCALE?, ρ?) scaled by 1/J_ref.

        normalise: c0 = Φ_T p / max(Φ_T p) (max(c0) = 1 throughout, §5); with i* the
        argmax voxel and M the max, ∂c0/∂p_i = φ_i/M − Φp·φ_i(i*)/M², so
        g_p = Φᵀλ/M − ⟨λ, Φp⟩/M²·φ(i*) (exact wherever the argmax is unique).
        """
        sub = basis.subset(T) if c0_fixed is None else None
        nT = len(T) if c0_fixed is None else 0

        def unpack(x):
            pT = x[:nT]
            k = x[nT] * KAPPA_SCALE if with_kappa else kappa_cur[0]
            r = x[nT + int(with_kappa)] if with_rho else rho_cur[0]
            return pT, float(k), float(r)

        def fun(x):
            pT, k, r = unpack(x)
            if c0_fixed is not None:
                c0 = c0_fixed
            elif normalise:
                c0, state = normalised_ic(sub, pT)
                if c0 is None:
                    return np.inf, np.zeros_like(x)
            else:
                c0 = sub.apply(pT)
            J, lam0, gk, gr, _, _ = obj.evaluate(None, k, r, c0=c0)
            g = []
            if nT:
                g.append(normalised_ic_adjoint(sub, lam0, state) if normalise else to_numpy(sub.adjoint(lam0)))
            if with_kappa:
                g.append([gk * KAPPA_SCALE])
            if with_rho:
                g.append([gr])
            return J / J_ref, np.concatenate(g).astype(np.float64) / J_ref

        return fun, unpack

    kappa_cur, rho_cur = [kappa], [rho]

    # ---- CoSaMP iterations ---------------------------------------------------------
    for it in range(opt.cosamp_iterations):
        run.phase = it
        c0 = basis.apply(p)
        J, lam0, gk, gr, mis, _ = obj.evaluate(None, kappa, rho, beta=0.0, c0=c0)
        g = obj.gradient_p(lam0)
        new = []
        for c in comps:
            ids = np.nonzero(comp == c)[0]
            order = ids[np.argsort(-np.abs(g[ids]), kind="stable")]
            new.extend(order[: 2 * s].tolist())
        T = np.unique(np.concatenate([S, np.asarray(new, dtype=np.int64)]))
        run.report(J / J_ref, float(np.linalg.norm(g)) / J_ref, len(T),
                   f"CoSaMP {it + 1}/{opt.cosamp_iterations}: support {len(S)} → {len(T)} candidates")
        kappa_cur[0], rho_cur[0] = kappa, rho
        fun, unpack = make_fun(T, True, opt.rho_in_subspace)
        x0 = [p[T], [kappa / KAPPA_SCALE]]
        bounds = [(0.0, None)] * len(T) + [(kb[0] / KAPPA_SCALE, kb[1] / KAPPA_SCALE)]
        if opt.rho_in_subspace:
            x0.append([rho])
            bounds.append(tuple(rb))
        res = _lbfgsb(fun, np.concatenate(x0), bounds, opt.subspace_maxiter, run, len(T),
                      f"CoSaMP {it + 1} subspace solve", ftol=opt.ftol)
        nit_total += res.nit
        pT, kappa, rho = unpack(res.x)
        # hard threshold: s largest per component
        keep = []
        for c in comps:
            sel = np.nonzero(comp[T] == c)[0]
            sel = sel[np.argsort(-pT[sel], kind="stable")][:s]
            keep.extend(sel[pT[sel] > 0].tolist())
        keep = np.asarray(sorted(keep), dtype=np.int64)
        S_new = T[keep]
        p = np.zeros(basis.m)
        p[S_new] = pT[keep]
        if len(S_new) == 0:
            status, message = 2, "CoSaMP support became empty (the data cannot be explained by any atom)"
            break
        S = S_new

    # ---- final solve -------------------------------------------------------------------
    # c0 = Φp_S rescaled to max 1 (§5); ρ restarted from the best misfit over the grid
    run.phase = opt.cosamp_iterations
    c0 = basis.apply(p)
    cmax = float(xp.max(c0))
    if cmax > 0:
        p = p / cmax
        c0 = c0 / ops.dtype.type(cmax)
        if opt.rho_grid:
            rho = _best_rho(obj, kappa, c0, opt.rho_grid, rb)
        kappa_cur[0], rho_cur[0] = kappa, rho
        kbs = (kb[0] / KAPPA_SCALE, kb[1] / KAPPA_SCALE)
        if opt.final == "joint":
            # one L-BFGS-B over (p_S, κ, ρ) with c0 = Φp_S / max(Φp_S): the shape of c0 is
            # refitted together with ρ, and max(c0) = 1 holds throughout
            fun, unpack = make_fun(S, True, True, normalise=True)
            x0 = np.concatenate([p[S], [kappa / KAPPA_SCALE, rho]])
            bounds = [(0.0, None)] * len(S) + [kbs, tuple(rb)]
            res = _lbfgsb(fun, x0, bounds, opt.final_maxiter, run, len(S),
                          "final joint (p_S, κ, ρ) solve, max(c0) = 1", ftol=opt.ftol)
            nit_total += res.nit
            pS, kappa, rho = unpack(res.x)
            p = np.zeros(basis.m)
            p[S] = pS
            c0 = basis.apply(p)
            cmax = float(xp.max(c0))
            p = p / cmax
            c0 = c0 / ops.dtype.type(cmax)
        else:
            fun, unpack = make_fun(S, True, True, c0_fixed=c0)
            res = _lbfgsb(fun, np.array([kappa / KAPPA_SCALE, rho]), [kbs, tuple(rb)],
                          opt.final_maxiter, run, len(S), "final (κ, ρ) solve with max(c0) = 1",
                          ftol=opt.ftol)
            nit_total += res.nit
            _, kappa, rho = unpack(res.x)
    J, _, _, _, mis, c1 = obj.evaluate(None, kappa, rho, c0=c0, gradient=False)
    run.phase = run.total
    run.report(J / J_ref, 0.0, len(S), f"S.1 done: κ = {kappa:.4g}, ρ = {rho:.4g}, support {len(S)}")
    return SparseICResult(
        x=p, p=p[S], c0=c0, c1=c1, support=S, centres=basis.centres[S], kappa=kappa, rho=rho,
        fun=J, misfit=mis, relative_error=indicator.relative_error(c1), nit=nit_total, nfev=obj.nfev,
        status=status, success=status == 0, message=message, history=run.history,
        components=len(comps), basis=basis, J_ref=J_ref,
    )


def solve_kappa_rho(ops: SpectralOps, wm, gm, vt, csf, data, c0, O=None,
                    options: SparseICOptions | None = None, progress=None, cancel=None,
                    tumor_labels=None):
    """(κ, ρ) by L-BFGS-B with c0 fixed (the last phase of S.1; also a check on its own),
    on options.tumor_misfit's tumour term (tumor_labels as in solve_sparse_ic).

    Starts from options.kappa0 and the best ρ over options.rho_grid.  Returns a
    SparseICResult with kappa, rho, fun, misfit, relative_error, nit, nfev, history.
    """
    opt = options or SparseICOptions()
    xp, n = ops.xp, ops.n
    shape = (n, n, n)
    f = check_s1_inputs(ops, wm, gm, vt, csf, data, O, opt)
    c0 = xp.asarray(c0, dtype=ops.dtype)
    if c0.shape != shape:
        raise ValueError(f"c0 must have shape {shape}, got {c0.shape}")
    m_k = coefficient_fraction(f["wm"], f["gm"], f["vt"], f["csf"], opt.gm_ratio_k, xp)
    m_r = coefficient_fraction(f["wm"], f["gm"], f["vt"], f["csf"], opt.gm_ratio_rho, xp)
    model = ReactionDiffusion(ops, m_k, m_r, nt=opt.nt, rtol=opt.rtol)
    indicator, misfit = tumor_misfits(ops, opt.tumor_misfit, f["data"], O, tumor_labels, opt.core_threshold,
                                      opt.edema_threshold, stage="S.1")
    J_ref = misfit.value(xp.zeros(shape, dtype=ops.dtype))
    if not J_ref > 0:  # O·d ≠ 0 was checked; a square that underflows
        raise ValueError("the observed data O·d is zero: nothing to invert")
    obj = S1Objective(ops, None, model, misfit, 0.0, cancel)
    kb, rb = opt.kappa_bounds, opt.rho_bounds
    kappa = float(np.clip(opt.kappa0, *kb))
    run = _Run(progress, 1)
    rho0 = _best_rho(obj, kappa, c0, opt.rho_grid, rb) if opt.rho_grid else float(np.clip(opt.rho0, *rb))

    def fun(x):
        J, _, gk, gr, _, _ = obj.evaluate(None, x[0] * KAPPA_SCALE, x[1], c0=c0)
        return J / J_ref, np.array([gk * KAPPA_SCALE, gr]) / J_ref

    res = _lbfgsb(fun, np.array([kappa / KAPPA_SCALE, rho0]),
                  [(kb[0] / KAPPA_SCALE, kb[1] / KAPPA_SCALE), tuple(rb)], opt.final_maxiter, run, 0,
                  "(κ, ρ) solve, c0 fixed", ftol=1e-9)
    kappa, rho = float(res.x[0] * KAPPA_SCALE), float(res.x[1])
    J, _, _, _, mis, c1 = obj.evaluate(None, kappa, rho, c0=c0, gradient=False)
    return SparseICResult(kappa=kappa, rho=rho, fun=J, misfit=mis, c0=c0, c1=c1,
                          relative_error=indicator.relative_error(c1), nit=res.nit, nfev=obj.nfev,
                          status=0 if res.success else 1, success=bool(res.success),
                          message=str(res.message), history=run.history)


def solve_sparse_ic_coarse_to_fine(ops: SpectralOps, wm, gm, vt, csf, data, O=None,
                                   options: SparseICOptions | None = None,
                                   fine_options: SparseICOptions | None = None, factor: int = 2,
                                   radius: float = 2.0, progress=None, cancel=None,
                                   mask=None, tumor_labels=None) -> SparseICResult:
    """S.1 coarse-to-fine (MODEL.md §6 allows it): the whole S.1 on the grid block-averaged by
    `factor`, then S.1 on the given grid restricted to the candidates within `radius` coarse
    voxels of the coarse support, started from the coarse κ, ρ.

    A coarse voxel i is the mean of fine voxels factor·i … factor·i + factor − 1, so a coarse
    centre x maps to x + (factor − 1)/2 fine voxels.  `options` drive the coarse level,
    `fine_options` (default: one CoSaMP pass, 6 subspace and 10 final iterations) the fine one.
    Returns the fine SparseICResult with `coarse` (the coarse result) attached and nfev the
    total count (coarse evaluations cost ~factor³ less).
    """
    opt = options or SparseICOptions()
    fopt = fine_options or SparseICOptions(**{**opt.__dict__, "cosamp_iterations": 1, "subspace_maxiter": 6,
                                              "final_maxiter": 10})
    n, h = ops.n, ops.h
    if n % factor or (n // factor) < 8:
        raise ValueError(f"grid {n} cannot be coarsened by {factor}")
    xp = ops.xp
    coarse_ops = SpectralOps(n // factor, ops.backend)
    coarse_fields = [None if f is None else xp.asarray(coarsen(f, factor), dtype=ops.dtype)
                     for f in (wm, gm, vt, csf, data)]
    cO = None if O is None else xp.asarray(coarsen(O, factor) > 0.5, dtype=ops.dtype)
    c_labels = None if tumor_labels is None else tuple(
        None if a is None else xp.asarray(coarsen(a, factor), dtype=ops.dtype) for a in tumor_labels)
    def sub_progress(rec):
        rec = dict(rec)
        rec["fraction"] = 0.5 * rec["fraction"]
        rec["message"] = f"{n // factor}³: " + rec["message"]
        progress(rec)
    coarse = solve_sparse_ic(coarse_ops, *coarse_fields, O=cO, options=opt,
                             progress=None if progress is None else sub_progress, cancel=cancel,
                             tumor_labels=c_labels)
    # fine candidates near the coarse support
    fields = [xp.asarray(f if f is not None else np.zeros((n, n, n)), dtype=ops.dtype) for f in (wm, gm, vt)]
    if mask is None:
        mask = brain_mask(*fields, xp)
    C = candidate_centres(ops, xp.asarray(data, dtype=ops.dtype), opt.sigma, threshold=0.1)
    anchors = np.asarray(coarse.centres, dtype=np.float64).reshape(-1, 3) + (factor - 1) / 2 * h
    if len(C) and len(anchors):
        dist = np.linalg.norm(C[:, None, :] - anchors[None, :, :], axis=2).min(axis=1)
        C = C[dist <= radius * factor * h + 1e-9]
    if len(C) == 0:
        raise ValueError("no fine-level candidate centre near the coarse support")
    basis = GaussianBasis(ops, C, opt.sigma, mask)
    # the fine level starts from the coarse κ and ρ; the final stage re-picks ρ from rho_grid
    # (coarse κ, ρ are biased: an atom twice as wide with max(c0) = 1 holds ~8× the mass)
    fopt = SparseICOptions(**{**fopt.__dict__, "kappa0": coarse.kappa, "rho0": coarse.rho})
    def fine_progress(rec):
        rec = dict(rec)
        rec["fraction"] = 0.5 + 0.5 * rec["fraction"]
        rec["iteration"] += len(coarse.history)
        progress(rec)
    res = solve_sparse_ic(ops, wm, gm, vt, csf, data, O=O, options=fopt,
                          progress=None if progress is None else fine_progress,
                          cancel=cancel, basis=basis, mask=mask, tumor_labels=tumor_labels)
    res.coarse = coarse
    res.nfev_fine = res.nfev
    res.nfev = res.nfev + coarse.nfev
    for rec in res.history:
        rec["iteration"] += len(coarse.history)
    res.history = coarse.history + res.history
    return res


def s1_coarse_factor(n: int, options: SparseICOptions | None = None) -> int:
    """The coarsening factor solve_s1 uses on an n³ grid (1: a single grid)."""
    cf = None if options is None else options.coarse_factor
    if cf is None:
        cf = 2 if n >= COARSE_TO_FINE_FROM else 1
    if cf > 1 and (n % cf or n // cf < 8):
        raise ValueError(f"S.1 coarse_factor {cf} does not divide the grid {n} into at least 8 voxels")
    return int(cf)


def check_s1_inputs(ops: SpectralOps, wm, gm, vt, csf, data, O, options: SparseICOptions) -> dict:
    """The grid-independent checks of S.1's input (options, shapes, finite data above the
    component threshold, O's shape and O·d ≠ 0 when O is given): one clear ValueError.
    Returns the tissue and data fields as arrays of the grid's dtype."""
    options.check()
    xp, n = ops.xp, ops.n
    shape = (n, n, n)
    fields = {}
    for name, f in (("wm", wm), ("gm", gm), ("vt", vt), ("csf", csf), ("data", data)):
        f = xp.asarray(f if f is not None else np.zeros(shape), dtype=ops.dtype)
        if f.shape != shape:
            raise ValueError(f"{name} must have shape {shape}, got {f.shape}")
        fields[name] = f
    d = fields["data"]
    if not bool(xp.all(xp.isfinite(d))):
        raise ValueError("tumor data has NaN or infinite values")
    if float(xp.max(d)) <= options.component_threshold:
        raise ValueError(f"tumor data has no voxel above {options.component_threshold}: nothing to invert")
    if O is not None and tuple(O.shape) != shape:
        raise ValueError(f"O must have shape {shape}, got {tuple(O.shape)}")
    if O is not None and not float(xp.max(xp.abs(xp.asarray(O, dtype=ops.dtype) * d))) > 0:
        raise ValueError("the observed data O·d is zero: nothing to invert")
    return fields


def solve_s1(ops: SpectralOps, wm, gm, vt, csf, data, O=None, options: SparseICOptions | None = None,
             progress=None, cancel=None, tumor_labels=None) -> SparseICResult:
    """Stage S.1 as calibrate runs it (§6): solve_sparse_ic on the given grid, or
    solve_sparse_ic_coarse_to_fine from n/k when s1_coarse_factor gives k > 1 (its fine
    level: one CoSaMP pass near the coarse support). A tumor the coarse grid cannot represent
    (too small once block-averaged) falls back to the single grid. result.coarse_factor
    records the k used (1 after a fall-back), result.coarse_fallback why it fell back. Input
    errors (check_s1_inputs) raise before either grid runs, so only a coarse level that cannot
    represent a valid tumor falls back."""
    options = options or SparseICOptions()
    check_s1_inputs(ops, wm, gm, vt, csf, data, O, options)  # bad input fails once, here
    k = s1_coarse_factor(ops.n, options)
    fallback = None
    if k > 1:
        try:
            res = solve_sparse_ic_coarse_to_fine(ops, wm, gm, vt, csf, data, O=O, options=options,
                                                 factor=k, progress=progress, cancel=cancel,
                                                 tumor_labels=tumor_labels)
        except ValueError as exc:
            fallback, k = f"{ops.n // k}³ level: {exc}", 1
    if k == 1:
        res = solve_sparse_ic(ops, wm, gm, vt, csf, data, O=O, options=options, progress=progress,
                              cancel=cancel, tumor_labels=tumor_labels)
    res.coarse_factor = k
    res.coarse_fallback = fallback
    return res
