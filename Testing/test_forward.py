"""The §3 forward model with mass effect: reference regression (MODEL.md §8), the γ = 0
limit, CFL handling, progress/cancel and snapshots."""
from __future__ import annotations

import math

import numpy as np
import pytest

from GBMMassEffectLib.backend import get_backend
from GBMMassEffectLib.basis import brain_mask, gaussian_atom
from GBMMassEffectLib.diffusion import CrankNicolson
from GBMMassEffectLib.forward import CFLError, ForwardParams, run_forward
from GBMMassEffectLib.progress import Cancelled
from GBMMassEffectLib.reaction import logistic_step
from GBMMassEffectLib.spectral import SpectralOps
from GBMMassEffectLib.tissue import Tissues
from glia_data import read_nc

REF_CENTRE = 2 * math.pi * np.array([137.0, 169.0, 96.0]) / 256  # 137 on array axis 0
REF_SIGMA = 4 * 2 * math.pi / 64
REF = {"c0": 22.0161, "c1": 83.9893, "u": 43.5494}  # reference CPU build, MODEL §8


def _sinusoid_case(glia_testdata, precision):
    wm = read_nc(glia_testdata / "sinusoid.nc")
    wm = np.maximum(wm.astype(np.float32), 0)  # as stored, clipped at 0; no smoothing
    zero = np.zeros_like(wm)
    ops = SpectralOps(64, get_backend("cpu", precision))
    atom = gaussian_atom(ops, REF_CENTRE, REF_SIGMA, brain_mask(wm, zero, zero))
    c0 = atom / atom.max()
    tissues = Tissues.from_fractions(np, wm, zero, zero, zero, dtype=ops.dtype)
    return ops, tissues, c0


@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_sinusoid_regression(glia_testdata, precision):
    """MODEL §8: ρ 8, κ 0.01, γ 1.2, 26 steps: ‖c0‖ 22.0161, ‖c(1)‖ 83.9893, ‖|u|‖ 43.5494.

    Achieved (both precisions): relative errors −1.3e-6, +1.5e-6, +1.8e-6, i.e. at the
    4-5 digits the reference prints; asserted at 2e-5 (the brief allows 2e-3).
    """
    ops, tissues, c0 = _sinusoid_case(glia_testdata, precision)
    res = run_forward(ops, tissues, c0, ForwardParams(kappa=0.01, rho=8.0, gamma=1.2))
    got = {"c0": ops.norm(c0), "c1": ops.norm(res.c), "u": ops.norm(res.displacement_norm())}
    for key, ref in REF.items():
        assert abs(got[key] - ref) <= 2e-5 * ref, (key, got[key], ref)
    st = res.stats
    assert st.steps_completed == 26 and not res.cfl_flagged and res.t_end == pytest.approx(1.04)
    assert all(s.elasticity_converged for s in st.steps)
    assert 0 < st.initial_elasticity_iterations <= 100
    assert 0 < st.total_elasticity_iterations <= 400  # 177 measured
    assert max(st.diffusion_iterations) <= 3  # 2 measured
    assert 0 < st.cfl_max < 1  # 0.148
    # FFT accounting of the elasticity: 18 per PCG iteration, 8 per force, 3 per solution,
    # 18 per warm-started solve (initial residual; the initial and first in-loop solves start at 0)
    assert st.elasticity_fft == 18 * st.total_elasticity_iterations + 27 * (8 + 3) + 25 * 18
    assert res.u.dtype == ops.dtype and res.c.dtype == ops.dtype
    # tissue transported (and compressed: conservative wm exceeds 1 near the tumour), bg untouched
    assert np.array_equal(res.tissues.bg, tissues.bg)
    assert -1e-2 < float(res.tissues.wm.min()) < 0.0 and 1.0 < float(res.tissues.wm.max()) < 1.2



def test_reference_solvers_own_patient_is_reproduced(glia_testdata):
    """The patient in glia-testdata was made by the reference solver (GLIA), not by us: its
    example script for that data (scripts/forward.py) runs the mass-effect model on atlas.nc
    from patient_tumor_IC.nc with ρ 6, κ 0.02, γ 8e4 (0.8 here), zero GM ratios, 26 steps.
    Our §3 solve with those values on atlas.nc's labels (smoothed one voxel, §2) gives its
    c(1) (patient_tumor.nc) to 0.52% and its vt(1) (patient_vt.nc) to 0.39% (relative 2-norm;
    unsmoothed tissues: 28% and 91%); asserted at 1%. It is also benchmarks/glia_patient.py's
    ground truth."""
    nc = lambda name: read_nc(glia_testdata / name)  # noqa: E731
    ops = SpectralOps(64, get_backend("cpu", "float32"))
    tissues = Tissues.from_labels(np, nc("atlas.nc"), dtype=ops.dtype).smoothed(ops)
    c0 = nc("patient_tumor_IC.nc").astype(ops.dtype)
    res = run_forward(ops, tissues, c0, ForwardParams(kappa=0.02, rho=6.0, gamma=0.8))
    rel = lambda a, name: float(np.linalg.norm(a - nc(name)) / np.linalg.norm(nc(name).astype(np.float64)))  # noqa: E731
    assert rel(res.c, "patient_tumor.nc") < 1e-2
    assert rel(res.tissues.vt, "patient_vt.nc") < 1e-2
    assert res.stats.steps_completed == 26 and not res.cfl_flagged
    assert 7.5 < float(res.displacement_norm().max()) * 256 / (2 * math.pi) < 8.2  # 7.84 mm (float64)

def _small_tissues(n=32, dtype=np.float64):
    ops = SpectralOps(n, get_backend("cpu", np.dtype(dtype).name))
    x, y, z = ops.coordinates()
    r2 = (x - np.pi) ** 2 + (y - np.pi) ** 2 + (z - np.pi) ** 2
    inside = r2 < 2.6**2
    full = lambda a: np.ascontiguousarray(np.broadcast_to(a, (n, n, n)))  # noqa: E731
    wm = full(np.where(inside, 0.5 + 0.3 * np.sin(2 * x) * np.cos(y), 0))
    gm = full(np.where(inside, 0.3 - 0.2 * np.sin(2 * x) * np.cos(y), 0))
    vt = full(np.where(r2 < 0.5, 0.9, 0.0)) * (y < np.pi)
    csf = full(np.where(inside & (r2 > 2.2**2), 0.15, 0.0))
    tissues = Tissues.from_fractions(np, wm, gm, vt, csf, dtype=ops.dtype)
    c0 = full(np.exp(-((x - 3.6) ** 2 + (y - 3.0) ** 2 + (z - 2.8) ** 2) / 0.3)).astype(ops.dtype)
    return ops, tissues, c0


def test_gamma_zero_is_lie_split_reaction_diffusion():
    ops, tissues, c0 = _small_tissues()
    p = ForwardParams(kappa=0.02, rho=9.0, gamma=0.0, r_k=0.2, r_rho=0.5)
    res = run_forward(ops, tissues, c0, p)
    assert not np.any(res.u) and not np.any(res.v)
    # hand-written Lie split: filter, then 26 × (CN diffusion dt, exact logistic dt on c ≥ 0;
    # spectral undershoots c < 0 are not grown, see reaction.logistic_step_nonnegative)
    wm, gm = tissues.wm * (1 - c0), tissues.gm * (1 - c0)
    frac = lambda r: np.maximum(0, 1 - tissues.bg - (1 - r) * gm - tissues.vt - tissues.csf)  # noqa: E731
    k, rho = p.kappa * frac(p.r_k), p.rho * frac(p.r_rho)
    c = c0.copy()
    for _ in range(26):
        c = CrankNicolson(ops, k, p.dt, rtol=1e-6).step(c)
        neg = np.minimum(c, 0)
        c = logistic_step(np, c - neg, rho, p.dt) + neg
    assert np.abs(res.c - c).max() <= 1e-13
    assert np.array_equal(res.tissues.wm, wm) and np.array_equal(res.tissues.vt, tissues.vt)
    assert res.stats.total_elasticity_iterations == 0


def test_small_mass_effect_run_progress_snapshots_and_cancel():
    ops, tissues, c0 = _small_tissues(32, np.float32)
    p = ForwardParams(kappa=0.01, rho=8.0, gamma=1.0, nt=5)
    seen = []
    res = run_forward(ops, tissues, c0, p, progress=seen.append, snapshot_times=(0.0, 0.12, 0.24))
    assert [s.step for s in seen] == list(range(6)) and seen[-1].fraction == 1.0
    assert set(res.snapshots) == {0.0, 0.12, 0.24}
    np.testing.assert_array_equal(res.snapshots[0.24].c, res.c)
    np.testing.assert_array_equal(res.snapshots[0.24].u, res.u)
    assert np.array_equal(res.snapshots[0.0].c, c0)
    disp = res.displacement_norm()
    assert 0 < float(disp.max()) < 0.5
    # the tumour grew and pushed: total tissue mass wm + gm nearly conserved by transport
    assert ops.norm(res.c) > ops.norm(c0)
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(Cancelled):
        run_forward(ops, tissues, c0, p, cancel=cancel)
    assert len(calls) == 4


def test_cfl_raise_and_flag():
    ops, tissues, c0 = _small_tissues(32, np.float32)
    p = ForwardParams(kappa=0.01, rho=8.0, gamma=1.0, nt=5, cfl_limit=1e-4)
    with pytest.raises(CFLError, match="CFL"):
        run_forward(ops, tissues, c0, p)
    res = run_forward(ops, tissues, c0, p, on_cfl="flag")
    assert res.cfl_flagged and res.stats.cfl_exceeded
    assert res.stats.steps_completed == 1 and res.t_end == pytest.approx(0.04)


def test_bad_input_messages():
    ops, tissues, c0 = _small_tissues(16)
    p = ForwardParams(kappa=0.01, rho=8.0, gamma=1.0)
    with pytest.raises(ValueError, match="c0 must have shape"):
        run_forward(ops, tissues, c0[:8], p)
    with pytest.raises(ValueError, match="on_cfl"):
        run_forward(ops, tissues, c0, p, on_cfl="ignore")
    with pytest.raises(ValueError, match="snapshot time"):
        run_forward(ops, tissues, c0, p, snapshot_times=(2.0,))
    with pytest.raises(ValueError, match="gamma"):
        ForwardParams(kappa=0.01, rho=8.0, gamma=-1.0)
    with pytest.raises(ValueError, match="dt"):
        ForwardParams(kappa=0.01, rho=8.0, gamma=1.0, dt=0.0)
    with pytest.raises(ValueError, match="finite"):
        ForwardParams(kappa=float("nan"), rho=8.0, gamma=1.0)


def test_negative_undershoots_are_not_grown_into_the_logistic_pole():
    """The exact logistic on c < 0 multiplies by ≈ e^{ρdt} per step towards its pole at
    c = −1/(e^{ρdt} − 1); the forward model leaves negative values ungrown (exact for c ≥ 0)."""
    from GBMMassEffectLib.reaction import logistic_step_nonnegative

    c = np.array([-0.3, -1e-3, 0.0, 1e-3, 0.5, 1.0])
    out = logistic_step_nonnegative(np, c, 15.0, 0.04)
    np.testing.assert_array_equal(out[:2], c[:2])
    np.testing.assert_allclose(out[2:], logistic_step(np, c[2:], 15.0, 0.04), rtol=1e-15)
    # iterating the plain logistic from an undershoot of −0.3 at ρ = 15 reaches the pole
    x = np.array(-0.3)
    with np.errstate(all="ignore"):
        for _ in range(26):
            x = logistic_step(np, x, 15.0, 0.04)
    assert not (np.isfinite(x) and abs(x) < 1)
    ops, tissues, c0 = _small_tissues()
    res = run_forward(ops, tissues, c0, ForwardParams(kappa=0.05, rho=15.0, gamma=0.0))
    # spectral over- and undershoots stay small (c slightly above 1 decays under the logistic)
    assert np.all(np.isfinite(res.c)) and res.c.min() > -0.2 and res.c.max() < 1.01
