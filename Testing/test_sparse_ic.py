"""Stage S.1 sparse initial-condition inversion (MODEL.md §5, §6)."""
from __future__ import annotations

import time

import numpy as np
import pytest

from GBMMassEffectLib.backend import get_backend
from GBMMassEffectLib.basis import GaussianBasis, brain_mask, candidate_centres
from GBMMassEffectLib.observation import (BandMisfit, Misfit, label_band, labels_from_concentration,
                                          observation_operator, tumor_data)
from GBMMassEffectLib.progress import Cancelled
from GBMMassEffectLib.reaction_diffusion import ReactionDiffusion
from GBMMassEffectLib.sparse_ic import (S1Objective, SparseICOptions, coarsen, normalised_ic,
                                        normalised_ic_adjoint, solve_kappa_rho, solve_sparse_ic,
                                        solve_sparse_ic_coarse_to_fine, COARSE_TO_FINE_FROM,
                                        s1_coarse_factor, solve_s1)
from GBMMassEffectLib.spectral import SpectralOps
from GBMMassEffectLib.taylor import assert_taylor, taylor_test
from GBMMassEffectLib.tissue import Tissues
from glia_data import read_nc


def _synthetic(n, kappa=0.01, rho=6.0, precision="float32"):
    """Smooth white matter, one §5 atom on a candidate-lattice voxel, data from the §4 model."""
    ops = SpectralOps(n, get_backend("cpu", precision))
    h = ops.h
    x, y, z = ops.coordinates()
    wm = np.broadcast_to(0.6 + 0.3 * np.sin(x) * np.sin(2 * y) * np.cos(z), (n, n, n)).astype(ops.dtype)
    mask = brain_mask(wm, 0 * wm, 0 * wm)
    centre = np.array([n // 2 - 2, n // 2 + 2, n // 2]) * h
    c0 = GaussianBasis(ops, [centre], h, mask).apply([1.0])
    c0 = c0 / c0.max()
    d = ReactionDiffusion(ops, wm, nt=40).forward(c0, kappa, rho)
    return ops, wm, c0, d, centre


def _com(ops, c):
    X = np.arange(ops.n) * ops.h
    c = np.asarray(c, dtype=np.float64)
    s = c.sum()
    return np.array([(c.sum((1, 2)) * X).sum(), (c.sum((0, 2)) * X).sum(), (c.sum((0, 1)) * X).sum()]) / s


def _dice(a, b, t=0.1):
    A, B = a > t, b > t
    return 2.0 * np.sum(A & B) / max(1, A.sum() + B.sum())


def _taylor_case(beta):
    """16³, float64, tight PCG: four atoms, data from known p, and the S.1 objective."""
    n = 16
    ops = SpectralOps(n, get_backend("cpu", "float64"))
    h = ops.h
    x, y, z = ops.coordinates()
    wm = np.broadcast_to(0.6 + 0.3 * np.sin(x) * np.cos(y), (n, n, n)).copy()
    centres = np.array([[6, 8, 8], [8, 8, 8], [8, 10, 6], [10, 8, 10]]) * h
    basis = GaussianBasis(ops, centres, h, np.ones((n, n, n), bool))
    model = ReactionDiffusion(ops, wm, nt=6, rtol=1e-13)
    d = model.forward(basis.apply([0.2, 0.7, 0.1, 0.3]), 0.03, 7.0)
    obj = S1Objective(ops, basis, model, Misfit(ops, d), beta=beta)
    return basis, obj, np.array([0.5, 0.3, 0.4, 0.1])


def _taylor_p(obj, p, eps0, title, min_window, label):
    """Taylor test of ∂J/∂p = Φᵀλ0 (+ βh³Φp) at p along a fixed direction; returns J(p)."""
    J0, lam0, _, _, _, _ = obj.evaluate(p, 0.03, 7.0)
    g = obj.gradient_p(lam0)
    dp = np.array([0.3, -0.2, 0.5, 0.4])
    res = taylor_test(lambda q: obj.evaluate(q, 0.03, 7.0, gradient=False)[0], float(g @ dp), p, dp,
                      eps0=eps0, levels=9, J0=J0)
    print(f"\nTaylor test, {title}\n" + res.table())
    assert_taylor(res, min_window=min_window, label=label)
    return J0


def test_taylor_p_gradient_through_basis():
    """∂J/∂p = Φᵀ(λ0 + βh³Φp) incl. β, in float64 with tight PCG: ε² decay."""
    basis, obj, p = _taylor_case(beta=1e-2)
    _taylor_p(obj, p, 0.5, "p (through Φ, β = 1e-2)", 5, "p")


def test_taylor_p_gradient_max_normalised():
    """Final joint solve: c0 = Φp/max(Φp); its p-gradient (argmax term included) is exact."""
    basis, obj, p = _taylor_case(beta=0.0)
    c0, state = normalised_ic(basis, p)
    assert abs(c0.max() - 1.0) < 1e-14
    J0, lam0, _, _, _, _ = obj.evaluate(None, 0.03, 7.0, c0=c0)
    g = normalised_ic_adjoint(basis, lam0, state)
    assert abs(g @ p) < 1e-8 * np.linalg.norm(g) * np.linalg.norm(p)  # scale invariance
    dp = np.array([0.3, -0.2, 0.5, 0.4])
    res = taylor_test(lambda q: obj.evaluate(None, 0.03, 7.0, c0=normalised_ic(basis, q)[0], gradient=False)[0],
                      float(g @ dp), p, dp, eps0=0.05, levels=9, J0=J0)
    print("\nTaylor test, p through c0 = Φp/max(Φp)\n" + res.table())
    assert_taylor(res, min_window=5, label="p normalised")


def test_kappa_rho_recovered_with_true_ic():
    """Data from the same model and the true IC: κ and ρ within 5% (24³, nt = 40)."""
    ops, wm, c0, d, _ = _synthetic(24, kappa=0.01, rho=6.0)
    t = time.time()
    res = solve_kappa_rho(ops, wm, None, None, None, d, c0,
                          options=SparseICOptions(kappa0=0.05, final_maxiter=30))
    print(f"\n(κ, ρ) = ({res.kappa:.5f}, {res.rho:.4f}) vs (0.01, 6): {res.nfev} evaluations, "
          f"{time.time() - t:.1f} s, relative misfit {res.relative_error:.2e}")
    assert abs(res.kappa - 0.01) < 0.05 * 0.01
    assert abs(res.rho - 6.0) < 0.05 * 6.0


FAST = SparseICOptions(cosamp_iterations=2, subspace_maxiter=10, final_maxiter=20)


def test_single_source_recovered_within_one_voxel():
    """CoSaMP + final joint solve on 24³ synthetic data: centre of mass within one voxel."""
    ops, wm, c0, d, centre = _synthetic(24)
    lines = []
    t = time.time()
    res = solve_sparse_ic(ops, wm, None, None, None, d, options=FAST, progress=lines.append)
    err = np.linalg.norm(_com(ops, res.c0) - _com(ops, c0)) / ops.h
    print(f"\n24³ single source: centre-of-mass error {err:.3f} voxels, κ {res.kappa:.4f} (0.01), "
          f"ρ {res.rho:.3f} (6), support {res.support.size}, relative misfit "
          f"{res.relative_error:.3e}, {res.nfev} evaluations, {time.time() - t:.1f} s")
    assert err < 1.0
    # the largest coefficient sits on the true atom
    assert np.linalg.norm(res.centres[np.argmax(res.p)] - centre) < 1e-9
    assert abs(float(res.c0.max()) - 1.0) < 1e-5
    assert res.relative_error < 0.1 and res.success
    # progress lines: one per iteration, the fields the CLI turns into JSON lines
    assert len(lines) == len(res.history) > 5
    for rec in lines:
        assert rec["stage"] == "S.1" and set(rec) >= {"iteration", "objective", "gradient_norm",
                                                     "support", "fraction", "message"}
    assert [r["iteration"] for r in lines] == list(range(1, len(lines) + 1))
    assert lines[-1]["fraction"] == 1.0 and lines[-1]["objective"] < lines[0]["objective"]


def test_coarse_to_fine_single_source():
    """24³ data, S.1 at 12³ then at 24³ on the candidates near the coarse support."""
    ops, wm, c0, d, centre = _synthetic(24)
    lines = []
    res = solve_sparse_ic_coarse_to_fine(
        ops, wm, None, None, None, d, progress=lines.append,
        options=SparseICOptions(cosamp_iterations=1, subspace_maxiter=6, final_maxiter=6),
        fine_options=SparseICOptions(cosamp_iterations=1, subspace_maxiter=4, final_maxiter=4, rho_grid=()))
    err = np.linalg.norm(_com(ops, res.c0) - _com(ops, c0)) / ops.h
    print(f"\n12³ → 24³: COM error {err:.3f} voxels, κ {res.kappa:.4f}, ρ {res.rho:.3f}, "
          f"{res.basis.m} fine candidates, {res.nfev_fine} + {res.coarse.nfev} evaluations")
    assert res.basis.m < len(candidate_centres(ops, d))
    # location only (measured 0.07 voxels): κ, ρ need more fine iterations than these caps
    assert err < 0.5 and res.relative_error < 0.5
    assert [r["iteration"] for r in lines] == list(range(1, len(lines) + 1))
    assert lines[-1]["fraction"] == 1.0 and any(r["message"].startswith("12³") for r in lines)


def test_solve_s1_picks_the_grids():
    """solve_s1 (calibrate's S.1): one grid below COARSE_TO_FINE_FROM, coarse-to-fine from n/2
    from there on (coarse_factor None), as told otherwise; bad factors are errors."""
    assert COARSE_TO_FINE_FROM == 64
    assert s1_coarse_factor(32) == 1 and s1_coarse_factor(48) == 1
    assert s1_coarse_factor(64) == 2 and s1_coarse_factor(128) == 2
    assert s1_coarse_factor(64, SparseICOptions(coarse_factor=1)) == 1
    assert s1_coarse_factor(32, SparseICOptions(coarse_factor=2)) == 2
    with pytest.raises(ValueError, match="does not divide"):
        s1_coarse_factor(24, SparseICOptions(coarse_factor=5))
    with pytest.raises(ValueError, match="does not divide"):
        s1_coarse_factor(16, SparseICOptions(coarse_factor=4))  # 4³ coarse grid
    for bad in (0, True, 1.5, "2"):
        with pytest.raises(ValueError, match="coarse_factor"):
            SparseICOptions(coarse_factor=bad).check()

    ops, wm, c0, d, centre = _synthetic(24)
    opt = SparseICOptions(cosamp_iterations=1, subspace_maxiter=4, final_maxiter=4, coarse_factor=2)
    res = solve_s1(ops, wm, None, None, None, d, options=opt)
    assert res.coarse_factor == 2 and res.coarse_fallback is None and res.coarse.c0.shape == (12,) * 3
    assert np.linalg.norm(_com(ops, res.c0) - _com(ops, c0)) / ops.h < 0.5


def test_solve_s1_falls_back_to_one_grid_for_a_tumor_the_coarse_grid_cannot_hold():
    """A 3³-voxel tumor: one candidate atom at 24³, none once block-averaged to 12³ (no σ-ball
    there is > 90% above 0.1), so S.1 runs on the given grid and says why."""
    ops = SpectralOps(24, get_backend("cpu", "float32"))
    wm = np.full((24,) * 3, 0.8, ops.dtype)
    d = np.zeros_like(wm)
    d[11:14, 11:14, 11:14] = 0.6
    opt = SparseICOptions(cosamp_iterations=1, subspace_maxiter=3, final_maxiter=3, rho_grid=(), coarse_factor=2)
    res = solve_s1(ops, wm, None, None, None, d, options=opt)
    assert res.coarse_factor == 1 and res.coarse_fallback.startswith("12³ level: no candidate")
    assert len(res.support) == 1 and float(np.max(res.c0)) == pytest.approx(1.0, abs=1e-5)
    assert np.linalg.norm(_com(ops, res.c0) / ops.h - 12) < 0.5


def test_solve_s1_bad_input_fails_before_any_grid(monkeypatch):
    """Input errors are raised by solve_s1 itself, once, with the input's message: neither the
    coarse-to-fine path nor its single-grid fall-back runs on them."""
    import GBMMassEffectLib.sparse_ic as sic

    ops, wm, c0, d, _ = _synthetic(24)
    ran = []
    monkeypatch.setattr(sic, "solve_sparse_ic", lambda *a, **k: ran.append("one grid"))
    monkeypatch.setattr(sic, "solve_sparse_ic_coarse_to_fine", lambda *a, **k: ran.append("coarse"))
    opt = SparseICOptions(coarse_factor=2)
    bad_d = d.copy()
    bad_d[0, 0, 0] = np.nan
    cases = [((wm, 0 * d, None), "no voxel above"), ((wm[:8], d, None), "wm must have shape"),
             ((wm, bad_d, None), "NaN"), ((wm, d, np.zeros_like(d)), "O·d is zero"),
             ((wm, d, np.ones((8, 8, 8))), "O must have shape")]
    for (w, data, O), msg in cases:
        with pytest.raises(ValueError, match=msg):
            sic.solve_s1(ops, w, None, None, None, data, O=O, options=opt)
    with pytest.raises(ValueError, match="final"):
        sic.solve_s1(ops, wm, None, None, None, d, options=SparseICOptions(final="other"))
    assert ran == []


def _compare_finals(n, options):
    ops, wm, c0, d, _ = _synthetic(n)
    out = {}
    for final in ("joint", "reference"):
        opt = SparseICOptions(**{**options.__dict__, "final": final})
        res = solve_sparse_ic(ops, wm, None, None, None, d, options=opt)
        err = np.linalg.norm(_com(ops, res.c0) - _com(ops, c0)) / ops.h
        out[final] = (res, err)
        print(f"\n{n}³ final={final}: COM error {err:.3f} voxels, κ {res.kappa:.4f} (0.01), "
              f"ρ {res.rho:.3f} (6), relative misfit {res.relative_error:.3e}, {res.nfev} evaluations")
    return out


def test_joint_final_solve_at_least_as_good_as_reference():
    """MODEL §6 allows a final joint (p_S, κ, ρ) solve if it recovers at least as well: shown here."""
    out = _compare_finals(16, FAST)
    (rj, _), (rr, _) = out["joint"], out["reference"]  # COM errors printed by _compare_finals
    assert rj.relative_error <= rr.relative_error * 1.001
    assert abs(rj.rho - 6) <= abs(rr.rho - 6) + 0.05 and abs(rj.kappa - 0.01) <= abs(rr.kappa - 0.01) + 5e-4


@pytest.mark.slow
def test_single_source_48():
    """48³ single-source recovery, both final variants (slow)."""
    out = _compare_finals(48, SparseICOptions(cosamp_iterations=2))
    assert out["joint"][1] < 1.0
    assert out["joint"][0].relative_error <= out["reference"][0].relative_error * 1.001


def test_cancel_and_bad_input():
    ops, wm, c0, d, _ = _synthetic(16)
    seen = []
    with pytest.raises(Cancelled):
        solve_sparse_ic(ops, wm, None, None, None, d, options=FAST, progress=seen.append,
                        cancel=lambda: len(seen) >= 2)
    with pytest.raises(ValueError, match="no voxel above"):
        solve_sparse_ic(ops, wm, None, None, None, 0 * d)
    with pytest.raises(ValueError, match="shape"):
        solve_sparse_ic(ops, wm[:8], None, None, None, d)
    with pytest.raises(ValueError, match="final"):
        solve_sparse_ic(ops, wm, None, None, None, d, options=SparseICOptions(final="other"))


# ---- the label band in S.1 (SparseICOptions.tumor_misfit "band") ---------------------------
def test_taylor_p_gradient_with_the_label_band():
    """The band's terminal condition goes through the same discrete adjoint: ε² decay."""
    basis, obj, p = _taylor_case(beta=0.0)
    core, edema = labels_from_concentration(obj.misfit.d)
    assert core.sum() > 0 and edema.sum() > 0
    obj.misfit = BandMisfit(obj.ops, *label_band(obj.ops, core, edema))
    assert _taylor_p(obj, p, 0.05, "p with the label band", 4, "p band") > 0


def test_single_source_from_labels_with_the_band():
    """24³ data drawn as labels (core, edema) from the §4 model: S.1 with the band puts c0's
    centre within one voxel and leaves half the band misfit of §5's indicator S.1 or less
    (measured 0.036 against 0.078 of the band at c = 0); J's tumour term is the band's, the
    reported relative error §5's. Asking for the band without labels, or for an unknown
    term, is a clear error."""
    ops, wm, c0, c1, centre = _synthetic(24)
    core, edema = labels_from_concentration(c1)
    d, O = tumor_data(ops, core), observation_operator(ops, core, edema)
    band = BandMisfit(ops, *label_band(ops, core, edema))
    J0 = band.value(0 * c1)
    assert band.value(c1) < 1e-3 * J0  # the labels are the truth's
    kw = dict(cosamp_iterations=2, subspace_maxiter=6, final_maxiter=10)
    res = solve_sparse_ic(ops, wm, None, None, None, d, O, options=SparseICOptions(tumor_misfit="band", **kw),
                          tumor_labels=(core, edema))
    ind = solve_sparse_ic(ops, wm, None, None, None, d, O, options=SparseICOptions(**kw))
    err = np.linalg.norm(_com(ops, res.c0) - _com(ops, c0)) / ops.h
    print(f"\n24³ labels: band S.1 COM error {err:.3f} voxels, κ {res.kappa:.4f} (0.01), ρ {res.rho:.3f} (6), "
          f"band misfit / J(c = 0) {res.misfit / J0:.3f}; indicator S.1 {band.value(ind.c1) / J0:.3f}")
    assert err < 1.0
    assert res.misfit == pytest.approx(band.value(res.c1), rel=1e-5)  # J's tumour term is the band's
    assert res.misfit < 0.5 * band.value(ind.c1) and res.misfit < 0.06 * J0
    assert res.relative_error == pytest.approx(Misfit(ops, d, O).relative_error(res.c1), rel=1e-6)  # §5's
    with pytest.raises(ValueError, match="S.1 tumor_misfit 'band' needs the tumour labels"):
        solve_sparse_ic(ops, wm, None, None, None, d, O, options=SparseICOptions(tumor_misfit="band"))
    with pytest.raises(ValueError, match="S.1 tumor_misfit must be one of"):
        SparseICOptions(tumor_misfit="dice").check()


def _reference_case(glia_testdata, factor):
    """patient.nc (tumor counted as wm) and d = patient_tumor.nc (the concentration, as the
    reference's own example for these files does: scripts/inverse.py, d1 = patient_tumor.nc,
    no data smoothing), block-averaged by `factor`; the true c0 stays at 64³."""
    labels = read_nc(glia_testdata / "patient.nc", np.float32)
    tis = Tissues.from_labels(np, labels, tumor_as="wm", dtype=np.float64)
    wm, gm, vt, csf = (coarsen(a, factor) for a in (tis.wm, tis.gm, tis.vt, tis.csf))
    d = coarsen(read_nc(glia_testdata / "patient_tumor.nc", np.float32), factor)
    ic = read_nc(glia_testdata / "patient_tumor_IC.nc", np.float32).astype(np.float64)
    n = 64 // factor
    ops = SpectralOps(n, get_backend("cpu", "float32"))
    return ops, wm, gm, vt, csf, d, ic


H64 = 2 * np.pi / 64


def _run_reference(glia_testdata, factor, options):
    """S.1 on the reference case; figures against the true c0 (patient_tumor_IC.nc, 64³).

    A coarse voxel i is the mean of fine voxels factor·i … factor·i + factor − 1, so its
    centre lies (factor − 1)/2 fine voxels past factor·i: the coarse centre of mass is shifted
    by that before comparing, and c0 is brought to 64³ by repetition for the Dice.
    """
    ops, wm, gm, vt, csf, d, ic = _reference_case(glia_testdata, factor)
    t, cpu = time.time(), time.process_time()
    res = solve_sparse_ic(ops, wm, gm, vt, csf, d, options=options)
    wall, cpu = time.time() - t, time.process_time() - cpu
    c0 = np.asarray(res.c0, dtype=np.float64)
    com = _com(ops, c0) + (factor - 1) / 2 * H64
    ops64 = SpectralOps(64, get_backend("cpu", "float64"))
    dist = np.linalg.norm(com - _com(ops64, ic)) / H64
    c0_64 = c0.repeat(factor, 0).repeat(factor, 1).repeat(factor, 2)
    dice = _dice(c0_64, ic)
    print(f"\nreference data at {ops.n}³ (64³ block-averaged by {factor}): centre-of-mass distance "
          f"{dist:.2f} voxels of 64³; Dice(c0 > 0.1) {dice:.3f} (at 64³); κ {res.kappa:.4g}, "
          f"ρ {res.rho:.4g}; support {res.support.size} of {res.basis.m} candidates; relative misfit "
          f"{res.relative_error:.3f}; {res.nfev} evaluations, {wall:.0f} s wall, {cpu:.0f} s CPU")
    return dist, dice, res


# S.1 defaults (s = 5 per component, final joint solve), capped: one CoSaMP pass.  (The
# reference's own example for these files, scripts/inverse.py, asks for sparsity 1: the true
# c0 is one Gaussian, σ = one voxel of 64³; at 32³ a single atom sits on a lattice 4 voxels of
# 64³ apart, ≥ 2.5 voxels from the true centre, while 5 atoms can interpolate it.)
REF_32 = SparseICOptions(cosamp_iterations=1, subspace_maxiter=8, final_maxiter=12)


def test_reference_data_32(glia_testdata):
    """patient.nc / patient_tumor.nc block-averaged to 32³: c0 against patient_tumor_IC.nc.

    Measured (2026-11): centre 1.07 voxels of 64³, Dice 0.17, relative misfit 0.133, κ 0.0047,
    ρ 1.12, 43 evaluations, 41 s CPU (ρ is biased low at 32³: an atom twice as wide with max(c0) = 1 holds ~8× the true
    tumor mass).  Bounds: centre < 1.5 voxels of 64³ (the 32³ candidate lattice is 4 voxels
    of 64³ apart); relative misfit < 0.25 (the true c0 with its best (κ, ρ) under the §4
    model only reaches ≈ 0.35 at 64³: the data come from the mass-effect model; before the
    positivity fix of reaction_diffusion.py the solver gave 580); Dice > 0.12 (a 32³ atom's {c0 > 0.1} is ~8× the true one's volume, so
    Dice ≲ 0.25 at 32³; the 64³ test below checks Dice properly).
    """
    dist, dice, res = _run_reference(glia_testdata, 2, REF_32)
    assert res.success and abs(float(np.max(res.c0)) - 1) < 1e-5
    assert dist < 1.5
    assert res.relative_error < 0.25
    assert dice > 0.12
    assert res.kappa < 0.1 and res.rho < 10  # both moved from their starting values 0.05, 10


@pytest.mark.slow
def test_reference_data_64(glia_testdata):
    """The full-resolution reference case, coarse-to-fine 32³ → 64³ (slow): prints the figures.

    Measured (2026-11, loaded machine: 866 s wall, 279 s CPU; 43 evaluations at 32³ + 28 at
    64³): centre 1.48 voxels, Dice 0.52, relative misfit 0.18, κ 0.021, ρ 3.57, support 5 of 92.
    The data's own centre of mass is 1.41 voxels (in y) from the true c0's: it was made with
    mass effect (the tumor pushed tissue), which the §4 model cannot undo, so ≈ 1.5 voxels is
    the expected bias, not a solver defect; the true c0 with its best (κ, ρ) gives ≈ 0.35
    misfit (L-BFGS-B over (κ, ρ), still decreasing after 7 evaluations: κ 0.016–0.022, ρ 4–5.5).
    """
    ops, wm, gm, vt, csf, d, ic = _reference_case(glia_testdata, 1)
    t, cpu = time.time(), time.process_time()
    res = solve_sparse_ic_coarse_to_fine(ops, wm, gm, vt, csf, d, options=REF_32)
    wall, cpu = time.time() - t, time.process_time() - cpu
    c0 = np.asarray(res.c0, dtype=np.float64)
    dist = np.linalg.norm(_com(ops, c0) - _com(ops, ic)) / H64
    dice = _dice(c0, ic)
    print(f"\nreference data at 64³ (coarse-to-fine from 32³): centre-of-mass distance {dist:.2f} "
          f"voxels; Dice(c0 > 0.1) {dice:.3f}; κ {res.kappa:.4g}, ρ {res.rho:.4g} (32³: "
          f"{res.coarse.kappa:.4g}, {res.coarse.rho:.4g}); support {res.support.size} of {res.basis.m} "
          f"candidates; relative misfit {res.relative_error:.3f}; {res.nfev_fine} evaluations at 64³ + "
          f"{res.coarse.nfev} at 32³, {wall:.0f} s wall, {cpu:.0f} s CPU")
    assert abs(float(np.max(res.c0)) - 1) < 1e-5
    assert dist < 2.0
    assert res.relative_error < 0.25
    assert dice > 0.4
    assert 0.005 < res.kappa < 0.05 and 2 < res.rho < 8
