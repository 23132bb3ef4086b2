"""Crank–Nicolson diffusion with PCG (MODEL.md §3 step 4, §8 "Diffusion alone")."""
import math

import numpy as np
import pytest

from GBMMassEffectLib.backend import get_backend
from GBMMassEffectLib.diffusion import CrankNicolson, apply_diffusion
from GBMMassEffectLib.spectral import SpectralOps


def _reference_case(precision):
    ops = SpectralOps(64, get_backend("cpu", precision))
    x, y, z = ops.coordinates()
    k = (0.01 * (0.5 + 0.5 * np.sin(4 * x) * np.sin(4 * y) * np.sin(4 * z))).astype(ops.dtype)
    R = math.sqrt(2) * 2 * math.pi / 64
    c = np.exp(-((x - math.pi) ** 2 + (y - math.pi) ** 2 + (z - math.pi) ** 2) / R**2)
    return ops, k, c.astype(ops.dtype)


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_reference_diffusion_norm(precision):
    """§8: 10 CN steps of dt 0.02 → ‖c‖ = 2.0487 (the reference asserts ±2.4e-5)."""
    ops, k, c = _reference_case(precision)
    cn = CrankNicolson(ops, k, 0.02)
    iters = []
    for _ in range(10):
        c = cn.step(c)
        iters.append(cn.last_info.iterations)
        assert cn.last_info.converged
    print(f"\n{precision}: ‖c‖ = {ops.norm(c):.7f}, PCG iterations per step {iters}")
    assert abs(ops.norm(c) - 2.0487) <= 2.4e-5


def test_operator_symmetric_and_dissipative():
    ops, k, c = _reference_case("float64")
    rng = np.random.default_rng(0)
    a, b = ops.smooth(rng.standard_normal((2, 64, 64, 64)))
    Da, Db = apply_diffusion(ops, k, a), apply_diffusion(ops, k, b)
    assert abs(np.vdot(Da, b) - np.vdot(a, Db)) < 1e-10 * abs(np.vdot(Da, b))
    assert np.vdot(Da, a) < 0
    # mass conservation: ∫ D c = 0
    assert abs(ops.integral(apply_diffusion(ops, k, c))) < 1e-12


def test_step_solves_cn_system_and_converges_second_order():
    ops = SpectralOps(32, get_backend("cpu", "float64"))
    x, y, z = ops.coordinates()
    kappa = 0.05
    c0 = np.cos(2 * x) * np.cos(y) * np.sin(z) + 0 * x
    lam = kappa * (4 + 1 + 1)
    errs = []
    for nsteps in (4, 8, 16):
        cn = CrankNicolson(ops, np.full(c0.shape, kappa), 1.0 / nsteps, rtol=1e-12)
        c = c0.copy()
        for _ in range(nsteps):
            c_new = cn.step(c)
            # the step really solves (I − a D) c⁺ = (I + a D) c
            assert np.abs(cn.lhs(c_new) - cn.rhs(c)).max() < 1e-10
            c = c_new
        errs.append(np.abs(c - math.exp(-lam) * c0).max())
    rates = np.log2(np.array(errs[:-1]) / np.array(errs[1:]))
    assert np.all(rates > 1.9), rates
