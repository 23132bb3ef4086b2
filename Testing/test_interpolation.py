"""Periodic cubic Lagrange interpolation (MODEL.md §3 step 3): exactness, order, paths."""
from __future__ import annotations

import math

import numpy as np
import pytest

from GBMMassEffectLib.backend import get_backend
from GBMMassEffectLib.interpolation import CubicLagrangeInterpolator, lagrange_weights, numba_kernels

ACCELERATORS = ["numpy"] + (["numba"] if numba_kernels() is not None else [])


def _grid(n):
    x = np.arange(n) * (2 * math.pi / n)
    return np.meshgrid(x, x, x, indexing="ij")


def _trig(x, y, z):
    """A band-limited periodic test function (wavenumbers ≤ 3)."""
    return np.sin(x + 0.3) * np.cos(2 * y - 0.5) + 0.5 * np.sin(3 * z + y) + np.cos(x - 2 * z)


@pytest.mark.parametrize("accelerator", ACCELERATORS)
@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_zero_displacement_is_identity_bit_for_bit(accelerator, precision):
    be = get_backend("cpu", precision)
    n = 16
    rng = np.random.default_rng(1)
    f = rng.standard_normal((3, n, n, n)).astype(precision)
    interp = CubicLagrangeInterpolator.from_displacement(
        np.zeros((3, n, n, n), precision), n, be, accelerator=accelerator
    )
    assert np.array_equal(interp(f), f)
    assert np.array_equal(interp(f[1]), f[1])
    # weights are exactly (0, 1, 0, 0) per axis
    assert np.array_equal(interp.weights[:, 1], np.ones((3, n**3), precision))
    assert not np.any(interp.weights[:, [0, 2, 3]])


def test_lagrange_weights_values():
    t = np.array([0.0, 0.5, 0.25])
    w = lagrange_weights(np, t)
    np.testing.assert_allclose(w.sum(axis=0), 1.0, rtol=0, atol=1e-15)  # partition of unity
    np.testing.assert_allclose(w[:, 1], [-1 / 16, 9 / 16, 9 / 16, -1 / 16], rtol=0, atol=1e-15)
    np.testing.assert_allclose(w[:, 0], [0, 1, 0, 0], rtol=0, atol=0)
    # t = 1/4: nodes −1, 0, 1, 2 → (−7/128, 105/128, 35/128, −5/128)
    np.testing.assert_allclose(w[:, 2], np.array([-7, 105, 35, -5]) / 128, rtol=0, atol=1e-15)


@pytest.mark.parametrize("accelerator", ACCELERATORS)
def test_reproduces_cubic_polynomials_locally(accelerator):
    """Tensor-product cubic Lagrange reproduces every polynomial of degree ≤ 3 in each
    variable wherever the 4-point stencil does not cross the periodic seam."""
    be = get_backend("cpu", "float64")
    n = 16
    h = 2 * math.pi / n
    i = np.arange(n, dtype=float)
    I0, I1, I2 = np.meshgrid(i, i, i, indexing="ij")

    def p(a, b, c):  # grid units; x³y³z³ term included (the Q3 space)
        return 1 + a - 0.5 * b**2 + 0.1 * a * b * c + 0.02 * c**3 - 0.01 * a**3 * b**2 + 1e-4 * (a * b * c) ** 3

    f = p(I0, I1, I2)
    rng = np.random.default_rng(2)
    s = rng.uniform(1.0, n - 3.0, size=(3, 4000))  # stencils j−1 … j+2 stay inside [0, n−1]
    interp = CubicLagrangeInterpolator(s * h, n, be, accelerator=accelerator)
    got = interp(f)
    want = p(*s)
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < 1e-12
    # a degree-4 term is not reproduced (the test can fail)
    g = f + 1e-3 * I0**4
    assert np.max(np.abs(interp(g) - (want + 1e-3 * s[0] ** 4))) > 1e-4


def test_band_limited_fields_converge_at_fourth_order():
    be = get_backend("cpu", "float64")
    rng = np.random.default_rng(3)
    pts = rng.uniform(-2 * math.pi, 4 * math.pi, size=(3, 5000))  # also exercises wrapping
    exact = _trig(*pts)
    errors = []
    for n in (16, 32, 64):
        f = _trig(*_grid(n))
        interp = CubicLagrangeInterpolator(pts, n, be, accelerator="numpy")
        errors.append(np.max(np.abs(interp(f) - exact)))
    orders = [math.log2(errors[k] / errors[k + 1]) for k in range(2)]
    print("max errors", errors, "observed orders", orders)
    assert errors[-1] < 3e-4  # measured 1.5e-4 (orders 3.98, 3.92)
    assert all(3.7 < q < 4.5 for q in orders), orders


def test_smooth_displacement_fourth_order_float32():
    """from_displacement in float32: points x + d(x), the same 4th order until round-off."""
    be = get_backend("cpu", "float32")
    errors = []
    for n in (16, 32):
        X = _grid(n)
        d = np.stack([0.3 * np.sin(X[1]), 0.2 * np.cos(X[2] + X[0]), -0.25 * np.ones_like(X[0])])
        exact = _trig(*(X[k] + d[k] for k in range(3)))
        f = _trig(*X).astype(np.float32)
        interp = CubicLagrangeInterpolator.from_displacement(d.astype(np.float32), n, be)
        errors.append(np.max(np.abs(interp(f) - exact)))
    assert errors[1] < errors[0] / 12, errors


@pytest.mark.parametrize("accelerator", ACCELERATORS)
def test_integer_shift_is_a_roll(accelerator):
    be = get_backend("cpu", "float64")
    n = 16
    h = 2 * math.pi / n
    f = np.random.default_rng(4).standard_normal((n, n, n))
    d = np.stack([np.full((n, n, n), k * h) for k in (2, -1, 17)])
    got = CubicLagrangeInterpolator.from_displacement(d, n, be, accelerator=accelerator)(f)
    want = np.roll(f, shift=(-2, 1, -17), axis=(0, 1, 2))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


@pytest.mark.skipif(len(ACCELERATORS) < 2, reason="numba not available (not installed, or GBM_NUMBA=0)")
@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_numba_path_equals_numpy_path(precision):
    be = get_backend("cpu", precision)
    n = 24
    rng = np.random.default_rng(5)
    d = (rng.standard_normal((3, n, n, n)) * 0.7).astype(precision)  # up to several voxels
    f = rng.standard_normal((4, n, n, n)).astype(precision)
    a = CubicLagrangeInterpolator.from_displacement(d, n, be, accelerator="numpy")
    b = CubicLagrangeInterpolator.from_displacement(d, n, be, accelerator="numba")
    assert np.array_equal(a.index, b.index)
    assert np.array_equal(a.weights, b.weights)
    assert np.array_equal(a(f), b(f))
    assert np.array_equal(a(f[2]), b(f[2]))


def test_points_and_displacement_forms_agree():
    be = get_backend("cpu", "float64")
    n = 16
    X = np.stack(_grid(n))
    d = np.random.default_rng(6).uniform(-3, 3, size=(3, n, n, n))
    f = np.random.default_rng(7).standard_normal((2, n, n, n))
    a = CubicLagrangeInterpolator(X + d, n, be)(f)
    b = CubicLagrangeInterpolator.from_displacement(d, n, be)(f)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-11)
    assert a.shape == (2, n, n, n)


def test_stack_equals_single_fields_and_shapes():
    be = get_backend("cpu")
    n = 16
    pts = np.random.default_rng(8).uniform(0, 2 * math.pi, size=(3, 7, 5)).astype(np.float32)
    f = np.random.default_rng(9).standard_normal((3, n, n, n)).astype(np.float32)
    interp = CubicLagrangeInterpolator(pts, n, be)
    stacked = interp(f)
    assert stacked.shape == (3, 7, 5) and stacked.dtype == np.float32
    for k in range(3):
        assert np.array_equal(stacked[k], interp(f[k]))


def test_bad_input_raises_value_error():
    be = get_backend("cpu")
    with pytest.raises(ValueError, match="points"):
        CubicLagrangeInterpolator(np.zeros((2, 4)), 16, be)
    with pytest.raises(ValueError, match="displacement"):
        CubicLagrangeInterpolator.from_displacement(np.zeros((3, 8, 8, 8)), 16, be)
    interp = CubicLagrangeInterpolator(np.zeros((3, 4)), 16, be)
    with pytest.raises(ValueError, match="fields"):
        interp(np.zeros((8, 8, 8), np.float32))
    with pytest.raises(ValueError, match="finite"):
        CubicLagrangeInterpolator.from_displacement(np.full((3, 16, 16, 16), np.nan), 16, be)
    with pytest.raises(ValueError, match="finite"):
        CubicLagrangeInterpolator(np.full((3, 4), 1e30), 16, be)
    with pytest.raises(ValueError, match="accelerator"):
        CubicLagrangeInterpolator(np.zeros((3, 4)), 16, be, accelerator="fortran")
    with pytest.raises(ValueError, match="cupy"):
        CubicLagrangeInterpolator(np.zeros((3, 4)), 16, be, accelerator="cupy")


def test_flat_layout_used_by_the_cuda_kernel():
    """The GPU kernel (untestable here) reads f[base + a·P² + b·P + c] of the padded field and
    w[(4·axis + tap)·N + i] of the flattened weights; check that layout on the CPU."""
    be = get_backend("cpu", "float64")
    n = 12
    P = n + 3
    rng = np.random.default_rng(10)
    d = rng.uniform(-2, 2, size=(3, n, n, n))
    f = rng.standard_normal((n, n, n))
    interp = CubicLagrangeInterpolator.from_displacement(d, n, be, accelerator="numpy")
    padded = interp._padded(f[None])[0]
    w = interp.weights.reshape(-1)
    N = n**3
    want = interp(f).reshape(-1)
    for i in rng.integers(0, N, size=50):
        acc0 = 0.0
        for a in range(4):
            acc1 = 0.0
            for b in range(4):
                o = interp.index[i] + a * P * P + b * P
                acc2 = sum(padded[o + c] * w[(8 + c) * N + i] for c in range(4))
                acc1 += acc2 * w[(4 + b) * N + i]
            acc0 += acc1 * w[a * N + i]
        assert abs(acc0 - want[i]) < 1e-12
