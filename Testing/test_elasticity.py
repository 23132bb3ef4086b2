"""Verification of the spectral elasticity solver (MODEL.md §3 step 6) and tissue fields."""
from __future__ import annotations

import numpy as np
import pytest

from GBMMassEffectLib.backend import get_backend
from GBMMassEffectLib.elasticity import Elasticity, ElasticityCoefficients, FFTMeter
from GBMMassEffectLib.pcg import pcg
from GBMMassEffectLib.spectral import SpectralOps
from GBMMassEffectLib.tissue import LAMBDA, MU, Tissues


def _ops(n=32, precision="float64"):
    return SpectralOps(n, get_backend("cpu", precision))


def _field(a, n):
    return np.ascontiguousarray(np.broadcast_to(a, (n, n, n)))


def _variable_coefficients(ops):
    """Smooth, strongly varying µ, λ, η (Pa-scale like the model's)."""
    n = ops.n
    x, y, z = ops.coordinates()
    mu = _field(1500 + 1200 * np.sin(x) * np.cos(2 * y) + 300 * np.cos(z), n)
    lam = _field(6000 + 5000 * np.cos(x + z) * np.sin(y), n)
    eta = _field(50 + 49 * np.sin(z) * np.cos(x), n)
    return ElasticityCoefficients(mu.astype(ops.dtype), lam.astype(ops.dtype), eta.astype(ops.dtype))


def _reference_apply(ops, coef, u):
    """A u written out term by term with the generic spectral grad/div (independent path)."""
    g = [ops.grad(u[i]) for i in range(3)]  # g[i][j] = ∂_j u_i
    div = g[0][0] + g[1][1] + g[2][2]
    glam = ops.grad(coef.lam * div)
    out = []
    for i in range(3):
        flux = np.stack([coef.mu * (g[i][j] + g[j][i]) for j in range(3)])
        out.append(ops.div(flux) + glam[i] - coef.eta * u[i])
    return np.stack(out)


def test_operator_matches_term_by_term_form():
    ops = _ops()
    coef = _variable_coefficients(ops)
    el = Elasticity(ops)
    rng = np.random.default_rng(1)
    u = ops.smooth(rng.standard_normal((3, ops.n, ops.n, ops.n)), 2 * ops.h)
    Au = el.apply(u, coef)
    ref = _reference_apply(ops, coef, u)
    assert np.abs(Au - ref).max() <= 1e-12 * np.abs(ref).max()
    # 9 inverse + 9 forward FFTs per matvec (+ 3 + 3 for the real-space wrapper)
    meter = FFTMeter(ops)
    el2 = Elasticity(ops, meter=meter)
    el2.apply_L_hat(ops.fft(u), coef)
    assert (meter.forward, meter.inverse) == (9, 9)


def test_operator_is_symmetric_negative_definite():
    ops = _ops()
    coef = _variable_coefficients(ops)
    el = Elasticity(ops)
    rng = np.random.default_rng(2)
    u, w = rng.standard_normal((2, 3, ops.n, ops.n, ops.n))
    Au, Aw = el.apply(u, coef), el.apply(w, coef)
    lhs, rhs = float(np.sum(Au * w)), float(np.sum(u * Aw))
    assert abs(lhs - rhs) <= 1e-12 * (abs(lhs) + np.sqrt(np.sum(Au**2) * np.sum(w**2)))
    assert float(np.sum(Au * u)) < 0 and float(np.sum(Aw * w)) < 0
    # Parseval inner product on half spectra equals the real-space one
    assert el.fdot(ops.fft(u), ops.fft(w)) == pytest.approx(float(np.sum(u * w)), rel=1e-12, abs=1e-9)


def test_manufactured_solution_variable_coefficients():
    ops = _ops()
    n = ops.n
    coef = _variable_coefficients(ops)
    x, y, z = ops.coordinates()
    u_star = np.stack([
        _field(0.3 * np.sin(x) * np.cos(y), n),
        _field(0.2 * np.cos(2 * z) * np.sin(x + y), n),
        _field(0.1 * np.sin(y + z) + 0.05 * np.cos(3 * x), n),
    ])
    f = el_f = Elasticity(ops).apply(u_star, coef)
    el = Elasticity(ops)
    sol = el.solve(el_f, coef, rtol=1e-12, maxiter=400)
    assert sol.info.converged
    assert np.abs(sol.u - u_star).max() <= 1e-9 * np.abs(u_star).max()
    # the returned spectrum is the solution's spectrum
    assert np.allclose(ops.ifft(sol.u_hat), sol.u, atol=1e-14)
    # warm start from the solution: converged at iteration 0
    again = el.solve(f, coef, u0_hat=sol.u_hat, rtol=1e-6)
    assert again.info.iterations == 0 and again.info.converged


def test_fourier_pcg_equals_shared_pcg_iterates():
    """Our spectral-space CG takes exactly the iterates of pcg.py on the real-space system."""
    ops = _ops()
    coef = _variable_coefficients(ops)
    el = Elasticity(ops)
    rng = np.random.default_rng(3)
    f = ops.smooth(rng.standard_normal((3, ops.n, ops.n, ops.n)), 3 * ops.h) * 1e3
    u0 = 1e-3 * ops.smooth(rng.standard_normal((3, ops.n, ops.n, ops.n)), 3 * ops.h)
    B = el.preconditioner(coef)
    for rtol in (1e-3, 1e-6):
        x_ref, info_ref = pcg(lambda v: -el.apply(v, coef), -f, u0,
                              lambda r: ops.ifft(B(ops.fft(r))), rtol, 100, np)
        sol = el.solve(f, coef, u0=u0, rtol=rtol)
        assert sol.info.iterations == info_ref.iterations
        assert sol.info.converged and info_ref.converged
        assert sol.info.residual == pytest.approx(info_ref.residual, rel=1e-8)
        assert np.abs(sol.u - x_ref).max() <= 1e-10 * np.abs(x_ref).max()


def test_preconditioner_inverts_constant_coefficients():
    ops = _ops(16)
    n = ops.n
    one = np.ones((n, n, n))
    coef = ElasticityCoefficients(750 * one, 3000 * one, 1e2 * one)
    el = Elasticity(ops)
    rng = np.random.default_rng(4)
    f = rng.standard_normal((3, n, n, n))
    sol = el.solve(f, coef, rtol=1e-10)
    assert sol.info.iterations <= 1 and sol.info.converged
    assert np.abs(el.apply(sol.u, coef) - f).max() <= 1e-9 * np.abs(f).max()


def test_model_coefficients_converge_float32():
    """The model's µ, λ, η (with η jumping 1e-2 … 1e6) converge in float32 within 100 its."""
    ops = _ops(32, "float32")
    n = ops.n
    x, y, z = ops.coordinates()
    r2 = (x - np.pi) ** 2 + (y - np.pi) ** 2 + (z - np.pi) ** 2
    wm = _field(np.where(r2 < 2.5**2, 0.5 + 0.5 * np.sin(2 * x) * np.cos(y), 0.0), n)
    tissues = Tissues.from_fractions(np, wm, 0 * wm, 0 * wm, 0 * wm)
    c = _field(np.exp(-r2 / 0.5), n).astype(np.float32)
    tissues = tissues.filter_tumor(c)
    coef = ElasticityCoefficients.from_tissues(tissues, c)
    el = Elasticity(ops)
    f = el.force(c, 1.2)
    sol = el.solve(f, coef)
    assert sol.info.converged and 0 < sol.info.iterations <= 100
    assert sol.u.dtype == np.float32
    # the relative preconditioned residual really is below 1e-3
    r = -f - (-el.apply(sol.u, coef))
    B = el.preconditioner(coef)
    Br, Bb = ops.ifft(B(ops.fft(r))), ops.ifft(B(ops.fft(-f)))
    assert np.linalg.norm(Br) <= 1.01e-3 * np.linalg.norm(Bb)
    # tumor pushes tissue outward: u points away from the centre on average
    outward = float(np.sum(sol.u[0] * (x - np.pi) + sol.u[1] * (y - np.pi) + sol.u[2] * (z - np.pi)))
    assert outward > 0


def test_force_formula():
    ops = _ops(32)
    n = ops.n
    x, y, z = ops.coordinates()
    c = _field(np.exp(-((x - 3) ** 2 + (y - 3.2) ** 2 + (z - 2.9) ** 2) / 0.4), n)
    el = Elasticity(ops)
    f = el.force(c, 0.8)
    cs = ops.smooth(c)
    ref = 0.8e5 * np.tanh(cs) * ops.grad(cs)
    assert np.abs(f - ref).max() <= 1e-12 * np.abs(ref).max()


def test_tissue_coefficients():
    n = 8
    rng = np.random.default_rng(5)
    wm, gm, vt, csf = rng.uniform(-0.05, 0.3, (4, n, n, n))
    t = Tissues.from_fractions(np, wm, gm, vt, csf, dtype=np.float64)
    assert t.wm.min() >= 0 and np.allclose(t.bg, 1 - (np.maximum(wm, 0) + np.maximum(gm, 0)
                                                         + np.maximum(vt, 0) + np.maximum(csf, 0)))
    c = rng.uniform(-0.01, 0.02, (n, n, n))
    t0 = t.filter_tumor(c)
    assert np.allclose(t0.wm, t.wm * (1 - c)) and t0.bg is t.bg and np.array_equal(t0.vt, t.vt)
    k = t.diffusivity(0.01, r_k=0.2)
    assert np.allclose(k, 0.01 * np.maximum(0, 1 - t.bg - 0.8 * t.gm - t.vt - t.csf))
    rho = t.proliferation(8.0)
    assert np.allclose(rho, 8 * np.maximum(0, 1 - t.bg - t.gm - t.vt - t.csf))
    mu, lam = t.lame(c)
    mix = MU["bg"] * t.bg + MU["healthy"] * (t.wm + t.gm) + MU["csf"] * (t.vt + t.csf)
    assert np.allclose(mu, np.maximum(mix, 0) + MU["tumor"] * np.maximum(c, 0))
    assert MU["healthy"] == pytest.approx(750.0) and LAMBDA["healthy"] == pytest.approx(3000.0)
    assert MU["bg"] == pytest.approx(15000 / 2.9) and LAMBDA["csf"] == pytest.approx(10 / 0.88)
    assert lam.shape == (n, n, n)
    t.bg[0, 0, 0] = 0.99
    eta = t.screening(c)
    assert eta[0, 0, 0] == 1e6
    inner = t.bg <= 0.95
    assert np.all(eta[inner & (c >= 0.005)] == 1e-2) and np.all(eta[inner & (c < 0.005)] == 1e2)


def test_tissues_from_labels():
    lab = np.zeros((8, 8, 8))
    lab[1, :, :] = 5
    lab[2, :, :] = 6
    lab[3, :, :] = 7
    lab[4, :, :] = 8
    lab[5, :, :] = 1
    t = Tissues.from_labels(np, lab)
    assert t.gm[1].all() and t.wm[2].all() and t.vt[3].all() and t.csf[4].all()
    assert t.wm[5].all()  # tumor counted as white matter by default
    assert np.all(t.bg[0] == 1) and np.all(t.bg[1:6] == 0)
    t2 = Tissues.from_labels(np, lab, tumor_as=None)
    assert np.all(t2.bg[5] == 1)
    with pytest.raises(ValueError, match="tumor_as"):
        Tissues.from_labels(np, lab, tumor_as="bone")
    with pytest.raises(ValueError, match="shape"):
        Tissues.from_fractions(np, np.zeros((8, 8, 8)), np.zeros((4, 4, 4)))
