"""Spectral operators (MODEL.md §2): derivatives exact to round-off on band-limited fields,
and the reference Gaussian kernel (sampled, periodised, normalised — not exp(−σ²|k|²/2))."""
import math

import numpy as np
import pytest

from GBMMassEffectLib.backend import DeviceError, get_backend
from GBMMassEffectLib.spectral import SpectralOps


@pytest.fixture(scope="module")
def ops():
    return SpectralOps(32, get_backend("cpu", "float64"))


def _field(ops):
    x, y, z = ops.coordinates()
    f = np.sin(3 * x) * np.cos(5 * y) * np.sin(2 * z) + np.cos(x + 2 * y - 7 * z)
    fx = 3 * np.cos(3 * x) * np.cos(5 * y) * np.sin(2 * z) - np.sin(x + 2 * y - 7 * z)
    fy = -5 * np.sin(3 * x) * np.sin(5 * y) * np.sin(2 * z) - 2 * np.sin(x + 2 * y - 7 * z)
    fz = 2 * np.sin(3 * x) * np.cos(5 * y) * np.cos(2 * z) + 7 * np.sin(x + 2 * y - 7 * z)
    lap = -(9 + 25 + 4) * np.sin(3 * x) * np.cos(5 * y) * np.sin(2 * z) - 54 * np.cos(
        x + 2 * y - 7 * z)
    return f, np.stack([fx, fy, fz]), lap


def test_gradient_divergence_laplacian_to_round_off(ops):
    f, g, lap = _field(ops)
    assert np.abs(ops.grad(f) - g).max() < 1e-11
    assert np.abs(ops.div(g) - lap).max() < 1e-10
    assert np.abs(ops.laplacian(f) - lap).max() < 1e-10


def test_nyquist_mode_has_zero_derivative(ops):
    x, _, _ = ops.coordinates()
    nyq = np.cos(16 * x) * np.ones((1, 32, 32))  # the Nyquist mode on axis 0
    assert np.abs(ops.grad(nyq)).max() < 1e-12


def test_reference_gaussian_kernel(ops):
    h = ops.h
    f = np.zeros((32, 32, 32))
    f[0, 0, 0] = 1.0 / h**3  # discrete delta: smoothing returns the kernel itself
    g = ops.smooth(f)
    # mass is preserved (Σ g·h³ = 1) and the kernel is the sampled periodised Gaussian
    assert abs(g.sum() * h**3 - 1.0) < 1e-12
    x = np.arange(32) * h
    g1 = np.exp(-x**2 / (2 * h**2)) + np.exp(-(x - 2 * math.pi) ** 2 / (2 * h**2))
    expect = g1[:, None, None] * g1[None, :, None] * g1[None, None, :]
    expect /= expect.sum() * h**3
    assert np.abs(g - expect).max() < 1e-10 * expect.max()
    # it differs from the continuous multiplier exp(−σ²|k|²/2) (≈2× at Nyquist for σ = h)
    mult = ops.gaussian_multiplier(h)
    cont = np.exp(-0.5 * h**2 * 16**2)
    assert mult[16, 0, 0] / cont > 1.5


def test_smoothing_is_batched(ops):
    f, g, _ = _field(ops)
    s = ops.smooth(g)
    for i in range(3):
        assert np.allclose(s[i], ops.smooth(g[i]), atol=1e-13)


def test_float32_backend_keeps_precision():
    o = SpectralOps(16, get_backend("cpu", "float32"))
    x, y, z = o.coordinates()
    f = (np.sin(x) * np.cos(y) * np.sin(z)).astype(np.float32)
    assert o.grad(f).dtype == np.float32 and o.smooth(f).dtype == np.float32


def test_bad_grid_and_device_messages():
    with pytest.raises(ValueError, match="even"):
        SpectralOps(15)
    with pytest.raises(ValueError, match="device"):
        get_backend("tpu")
    with pytest.raises(ValueError, match="precision"):
        get_backend("cpu", "float16")


def test_gpu_request_without_gpu_is_a_clear_error():
    from GBMMassEffectLib.backend import gpu_available

    if gpu_available():
        pytest.skip("a GPU is present")
    with pytest.raises(DeviceError, match="no usable CUDA GPU"):
        get_backend("gpu")
