"""Semi-Lagrangian transport (MODEL.md §3 step 3) and the §8 round-trip regression."""
from __future__ import annotations

import math

import numpy as np
import pytest

from GBMMassEffectLib.backend import get_backend
from GBMMassEffectLib.advection import SemiLagrangian
from GBMMassEffectLib.interpolation import numba_kernels
from GBMMassEffectLib.spectral import SpectralOps

ACCELERATORS = ["numpy"] + (["numba"] if numba_kernels() is not None else [])


def _coords(ops):
    return [np.asarray(c, dtype=np.float64) for c in ops.coordinates()]


def _section8_velocity(ops):
    """MODEL §8 round-trip velocity (s4x = sin 4x, c4y = cos 4y, …)."""
    x, y, z = _coords(ops)
    s4x, s4y, s4z = np.sin(4 * x), np.sin(4 * y), np.sin(4 * z)
    c4x, c4y = np.cos(4 * x), np.cos(4 * y)
    v = np.broadcast_arrays(1 + 0.25 * s4x * s4y * s4z, 1.5 + 0.1 * s4x * c4y * s4z, 1 + c4x * c4y * s4z)
    return np.stack(v).astype(ops.dtype)


def _section8_ic(ops):
    """exp(−|x−π|²/R²), R = √2·2π/64 at every n (non-periodic distance)."""
    x, y, z = _coords(ops)
    R = math.sqrt(2) * 2 * math.pi / 64
    return np.exp(-((x - math.pi) ** 2 + (y - math.pi) ** 2 + (z - math.pi) ** 2) / R**2).astype(ops.dtype)


def round_trip_error(n, precision="float32", accelerator="auto"):
    """§8: dt 0.02, 4 steps forward, v negated, trajectories recomputed, 4 steps back;
    returns ‖c_back − c_0‖/‖c_0‖ (unweighted 2-norms over voxels)."""
    ops = SpectralOps(n, get_backend("cpu", precision))
    v, c0 = _section8_velocity(ops), _section8_ic(ops)
    sl = SemiLagrangian(ops, 0.02, accelerator=accelerator)
    sl.set_velocity(v)
    c = c0
    for _ in range(4):
        c = sl.transport(c)
    sl.set_velocity(-v)
    for _ in range(4):
        c = sl.transport(c)
    return ops.norm(c - c0) / ops.norm(c0)


@pytest.mark.parametrize("accelerator", ACCELERATORS)
def test_zero_velocity_is_identity_bit_for_bit(accelerator):
    n = 16
    ops = SpectralOps(n, get_backend("cpu"))
    rng = np.random.default_rng(0)
    f = rng.random((3, n, n, n)).astype(np.float32)
    sl = SemiLagrangian(ops, 0.04, accelerator=accelerator)
    zero = np.zeros((3, n, n, n), np.float32)
    sl.set_velocity(zero)
    assert sl.cfl == 0.0 and sl.max_displacement == 0.0
    assert np.array_equal(sl.transport(f), f)
    assert np.array_equal(sl.transport_conservative(f), f)
    # the general path (what any nonzero velocity runs) is the identity too
    sl._trajectories(zero)
    assert np.array_equal(sl.transport(f), f)
    assert np.array_equal(sl.transport(f[0]), f[0])
    assert np.array_equal(sl.transport_conservative(f), f)
    # the result is a new array, not the input
    out = sl.transport(f)
    out[0, 0, 0, 0] += 1
    assert f[0, 0, 0, 0] != out[0, 0, 0, 0]


def test_section8_round_trip_values_and_decay():
    """Quoted: 0.25 at 64³, 0.040 at 128³ (‖c_back − c_0‖/‖c_0‖); decay with n."""
    e = {n: round_trip_error(n) for n in (32, 64, 128)}
    print("round-trip relative errors", e)
    assert abs(e[64] - 0.25) < 0.01  # measured 0.2484
    assert abs(e[128] - 0.040) < 0.002  # measured 0.0403
    assert e[32] > 2 * e[64]  # measured 0.606 → 0.248 (IC ≈ 0.7 voxel wide at 32³)
    # resolving the IC, the decay approaches the 4th order of the interpolation
    assert e[64] / e[128] > 5.5  # measured 6.2 (and 128 → 256: 22, see the slow test)


@pytest.mark.slow
def test_section8_round_trip_256():
    e = round_trip_error(256)
    print("256³ round-trip relative error", e)
    assert e < 1e-2  # the reference asserts this; it measured 1.8e-3
    assert abs(e - 1.8e-3) < 3e-4


def test_constant_velocity_translates_exactly():
    """Constant v: RK2 characteristics are exact; an integer-voxel shift is a roll."""
    n = 16
    ops = SpectralOps(n, get_backend("cpu", "float64"))
    f = np.random.default_rng(1).standard_normal((n, n, n))
    dt = 0.1
    shift = np.array([2, -1, 3])  # voxels travelled in one step
    v = np.stack([np.full((n, n, n), s * ops.h / dt) for s in shift])
    sl = SemiLagrangian(ops, dt)
    sl.set_velocity(v)
    np.testing.assert_allclose(sl.transport(f), np.roll(f, shift, axis=(0, 1, 2)), rtol=0, atol=1e-11)
    # ∇·v = 0: the conservative form equals the plain one
    np.testing.assert_allclose(sl.transport_conservative(f), sl.transport(f), rtol=0, atol=1e-12)
    assert sl.cfl == pytest.approx(dt * np.linalg.norm(shift * ops.h / dt) / ops.h)
    assert sl.max_displacement == pytest.approx(np.linalg.norm(shift) * ops.h)


def test_divergence_free_conservative_equals_plain():
    n = 32
    ops = SpectralOps(n, get_backend("cpu"))
    x, y, z = _coords(ops)
    # each component independent of its own coordinate: ∇·v = 0 exactly
    v = np.stack(np.broadcast_arrays(np.sin(y + z), 0.7 * np.cos(x - z), 0.5 * np.sin(2 * x + y))).astype(np.float32)
    f = np.stack([_section8_ic(ops), (1 + np.sin(x + 2 * y) * np.cos(z)).astype(np.float32)])
    sl = SemiLagrangian(ops, 0.04)
    sl.set_velocity(v)
    assert float(np.max(np.abs(sl.div_v))) < 1e-5
    plain, cons = sl.transport(f), sl.transport_conservative(f)
    assert np.max(np.abs(cons - plain)) < 1e-6 * np.max(np.abs(f))
    assert np.max(np.abs(plain - f)) > 1e-2  # it did move


def _mass_change(n):
    """Relative change of ∫ν after 10 steps (t = 0.4) in a compressible velocity."""
    ops = SpectralOps(n, get_backend("cpu", "float64"))
    x, y, z = _coords(ops)
    v = np.stack(
        np.broadcast_arrays(0.5 * np.sin(x) * np.cos(z), 0.3 * np.cos(y), 0.4 * np.sin(2 * z) * np.cos(x))
    )
    nu = np.exp(-((x - math.pi) ** 2 + (y - math.pi) ** 2 + (z - math.pi) ** 2) / 0.36) + 0.2 * (1 + np.sin(x + y))
    sl = SemiLagrangian(ops, 0.04)
    sl.set_velocity(v)
    assert float(np.max(np.abs(sl.div_v))) > 0.5  # compressible
    m0 = ops.integral(nu)
    cons, plain = nu, nu
    for _ in range(10):
        cons = sl.transport_conservative(cons)
        plain = sl.transport(plain)
    return abs(ops.integral(cons) - m0) / m0, abs(ops.integral(plain) - m0) / m0


def test_conservative_transport_conserves_mass_under_refinement():
    cons, plain = zip(*(_mass_change(n) for n in (16, 32, 64)))
    print("relative mass change: conservative", cons, "plain", plain)
    # measured: conservative 1.1e-3, 1.5e-4, 1.5e-5; plain ≈ 1e-3 at every n
    assert cons[2] < 5e-5
    assert cons[1] < cons[0] / 4 and cons[2] < cons[1] / 4
    assert plain[2] > 20 * cons[2]  # plain transport does not conserve ∫ν


def test_conservative_update_is_the_heun_formula():
    """ν⁺ = ν_i·F equals MODEL §3 step 3 written out: ν_i = ν(X), s_i = −ν_i·(∇·v)(X),
    ν* = ν_i + dt·s_i, s* = −ν*·(∇·v)(x), ν⁺ = ν_i + dt/2·(s_i + s*)."""
    n, dt = 16, 0.04
    ops = SpectralOps(n, get_backend("cpu", "float64"))
    x, y, z = _coords(ops)
    v = 2 * np.stack(np.broadcast_arrays(np.sin(x) * np.cos(y), np.cos(2 * y) + 0 * z, np.sin(z + x)))
    nu = np.stack([_section8_ic(ops), 1 + 0.5 * np.sin(x + y + z) + 0 * x])
    sl = SemiLagrangian(ops, dt)
    sl.set_velocity(v)
    nu_i = sl.transport(nu)
    s_i = -nu_i * sl.div_v_at_X
    nu_star = nu_i + dt * s_i
    s_star = -nu_star * ops.div(v)
    want = nu_i + dt / 2 * (s_i + s_star)
    got = sl.transport_conservative(nu)
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-14)
    assert np.max(np.abs(got - nu_i)) > 1e-3  # the source term matters here
    # (∇·v)(X) is the interpolated spectral divergence
    np.testing.assert_array_equal(sl.div_v_at_X, sl.transport(ops.div(v)))


@pytest.mark.skipif(len(ACCELERATORS) < 2, reason="numba not available (not installed, or GBM_NUMBA=0)")
def test_numba_and_numpy_paths_agree():
    n = 16
    ops = SpectralOps(n, get_backend("cpu"))
    v = _section8_velocity(ops) * np.float32(3)
    f = np.stack([_section8_ic(ops)] * 2)
    out = {}
    for acc in ACCELERATORS:
        sl = SemiLagrangian(ops, 0.04, accelerator=acc)
        sl.set_velocity(v)
        out[acc] = (sl.transport(f), sl.transport_conservative(f), sl.max_displacement)
    for a, b in zip(out["numpy"], out["numba"]):
        assert np.array_equal(a, b)


def test_stacked_equals_single_and_bad_input():
    n = 16
    ops = SpectralOps(n, get_backend("cpu"))
    sl = SemiLagrangian(ops, 0.02)
    sl.set_velocity(_section8_velocity(ops))
    f = np.random.default_rng(2).random((2, n, n, n)).astype(np.float32)
    cons = sl.transport_conservative(f)
    assert cons.shape == f.shape and cons.dtype == np.float32
    for k in range(2):
        assert np.array_equal(cons[k], sl.transport_conservative(f[k]))
        assert np.array_equal(sl.transport(f)[k], sl.transport(f[k]))
    with pytest.raises(ValueError, match="velocity"):
        sl.set_velocity(np.zeros((2, n, n, n)))
    with pytest.raises(ValueError, match="NaN"):
        sl.set_velocity(np.full((3, n, n, n), np.nan))
    with pytest.raises(ValueError, match="field"):
        sl.transport(np.zeros((n, n)))
    with pytest.raises(ValueError, match="dt"):
        SemiLagrangian(ops, 0.0)
