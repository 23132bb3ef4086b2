"""Gaussian basis Φ (MODEL.md §5) and the brain mask (§2)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from GBMMassEffectLib.backend import get_backend
from GBMMassEffectLib.basis import GaussianBasis, brain_mask, candidate_centres, gaussian_atom
from GBMMassEffectLib.spectral import SpectralOps
from glia_data import read_nc


REF_CENTRE = 2 * math.pi * np.array([137.0, 169.0, 96.0]) / 256
REF_SIGMA = 4 * 2 * math.pi / 64


@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_reference_c0_norm(glia_testdata, precision):
    """MODEL §8: one atom, σ = 4 voxels, on sinusoid.nc: ‖c0‖₂ = 22.0161."""
    wm = read_nc(glia_testdata / "sinusoid.nc", np.float32)
    zero = np.zeros_like(wm)
    ops = SpectralOps(64, get_backend("cpu", precision))
    mask = brain_mask(wm, zero, zero)
    a = gaussian_atom(ops, REF_CENTRE, REF_SIGMA, mask)
    c0 = a / a.max()
    assert abs(ops.norm(c0) - 22.0161) < 1e-4
    basis = GaussianBasis(ops, [REF_CENTRE], REF_SIGMA, mask)
    c0b = basis.apply([1.0])
    assert abs(ops.norm(c0b) - 22.0161) < 1e-4
    assert float(np.abs(c0b - c0).max()) < (1e-6 if precision == "float32" else 1e-13)


def test_local_boxes_match_full_grid_fft():
    """Local-box atoms (separable truncated kernel) equal the FFT atoms, incl. near the edge."""
    n = 32
    ops = SpectralOps(n, get_backend("cpu", "float64"))
    rng = np.random.default_rng(0)
    mask = rng.random((n, n, n)) > 0.2
    h = ops.h
    centres = np.array([[10, 11, 12], [0, 5, 31], [31, 31, 0], [16.4, 3.3, 20.7]]) * h
    basis = GaussianBasis(ops, centres, h, mask)
    atoms = [gaussian_atom(ops, c, h, mask) for c in centres]
    peak = max(float(a.max()) for a in atoms)
    for i, a in enumerate(atoms):
        assert np.abs(basis.atom(i) - a / peak).max() < 1e-14
    # the global normalisation: largest atom peak is 1
    assert abs(max(float(basis.atom(i).max()) for i in range(len(centres))) - 1.0) < 1e-14
    # support: zero beyond 5σ (non-periodic distance)
    x = np.arange(n) * h
    r2 = ((x[:, None, None] - centres[0, 0]) ** 2 + (x[None, :, None] - centres[0, 1]) ** 2
          + (x[None, None, :] - centres[0, 2]) ** 2)
    assert np.all(basis.atom(0)[r2 > (5 * h) ** 2] == 0)
    assert np.count_nonzero(basis.atom(0)) > 400


def test_apply_adjoint_consistency():
    n = 32
    ops = SpectralOps(n, get_backend("cpu", "float64"))
    h = ops.h
    rng = np.random.default_rng(1)
    centres = rng.integers(4, 28, size=(20, 3)) * h
    basis = GaussianBasis(ops, centres, h, np.ones((n, n, n), bool))
    p = rng.random(20)
    c = rng.standard_normal((n, n, n))
    lhs = float(np.sum(basis.apply(p) * c))
    rhs = float(np.dot(p, basis.adjoint(c)))
    assert abs(lhs - rhs) < 1e-12 * abs(lhs) + 1e-12
    sub = basis.subset([3, 7])
    assert np.allclose(sub.apply([1.0, 2.0]), basis.apply(np.eye(20)[3] + 2 * np.eye(20)[7]))


def test_candidate_centres_from_data():
    """Lattice step 2σ/h = 2; keep centres whose 7-voxel σ-ball is fully above 0.1."""
    n = 32
    ops = SpectralOps(n, get_backend("cpu", "float64"))
    h = ops.h
    i = np.arange(n)
    r2 = (i[:, None, None] - 15.0) ** 2 + (i[None, :, None] - 16.0) ** 2 + (i[None, None, :] - 17.0) ** 2
    data = (r2 <= 9).astype(float)  # ball of radius 3 voxels
    C = candidate_centres(ops, data)
    idx = np.rint(C / h).astype(int)
    assert np.all(idx % 2 == 0)
    # brute force: lattice points whose centre and 6 neighbours are inside the ball
    expect = set()
    for a in range(0, n, 2):
        for b in range(0, n, 2):
            for c in range(0, n, 2):
                pts = [(a, b, c)] + [(a + d[0], b + d[1], c + d[2]) for d in
                                     [(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)]]
                if all(data[p[0] % n, p[1] % n, p[2] % n] > 0.1 for p in pts):
                    expect.add((a, b, c))
    assert set(map(tuple, idx)) == expect and len(expect) > 3
    basis = GaussianBasis.from_data(ops, data, np.ones((n, n, n), bool))
    assert basis.m == len(expect)
    with pytest.raises(ValueError, match="no candidate"):
        GaussianBasis.from_data(ops, 0 * data, np.ones((n, n, n), bool))


def test_brain_mask_and_bad_input():
    wm = np.array([0.05, 0.5, 0.0, 0.5])
    gm = np.array([0.0, 0.0, 0.2, 0.0])
    vt = np.array([0.0, 0.0, 0.0, 0.9])
    assert brain_mask(wm, gm, vt).tolist() == [False, True, True, False]
    ops = SpectralOps(16, get_backend("cpu", "float64"))
    with pytest.raises(ValueError):
        gaussian_atom(ops, [1.0, 2.0], ops.h, np.ones((16, 16, 16)))
    with pytest.raises(ValueError):
        GaussianBasis(ops, [[1.0, 1.0, 1.0]], -1.0, None)
    with pytest.raises(ValueError, match="length"):
        GaussianBasis(ops, [[3.0, 3.0, 3.0]], ops.h, None).apply([1.0, 2.0])
