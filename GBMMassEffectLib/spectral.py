"""Pseudo-spectral operators on the periodic box [0, 2π)³ (MODEL.md §2).

Integer wavenumbers; derivatives zero the Nyquist mode. `smooth` is the reference's
Gaussian G_σ: the kernel sampled on the grid with its 8 nearest periodic images,
normalised so that Σ g·h³ = 1, applied as a circular convolution by FFT (not the
continuous multiplier exp(−σ²|k|²/2)).
"""
from __future__ import annotations

import math

import numpy as np

from .backend import Backend, get_backend


class SpectralOps:
    """FFT-based derivatives and smoothing for an n³ periodic grid of spacing h = 2π/n."""

    def __init__(self, n: int, backend: Backend | None = None):
        if n < 8 or n % 2:
            raise ValueError(f"grid size n must be even and ≥ 8, got {n}")
        self.n = int(n)
        self.backend = backend or get_backend("cpu")
        self.xp = self.backend.xp
        self.h = 2.0 * math.pi / self.n
        self.dtype = self.backend.dtype
        xp = self.xp
        k = np.fft.fftfreq(n, d=1.0 / n)
        k_d = k.copy()
        k_d[n // 2] = 0.0  # Nyquist zeroed for derivatives
        kr = np.arange(n // 2 + 1, dtype=float)
        kr_d = kr.copy()
        kr_d[-1] = 0.0
        self._k_full = (k, k, kr)
        # derivative wavenumbers, broadcast over the rfftn output shape (n, n, n//2+1)
        self.k = (
            xp.asarray(k_d.reshape(n, 1, 1), dtype=self.dtype),
            xp.asarray(k_d.reshape(1, n, 1), dtype=self.dtype),
            xp.asarray(kr_d.reshape(1, 1, n // 2 + 1), dtype=self.dtype),
        )
        self.ksq = self.k[0] ** 2 + self.k[1] ** 2 + self.k[2] ** 2  # |k|² with Nyquist zeroed
        self._smooth_cache: dict[float, object] = {}

    # ---- transforms -------------------------------------------------------------
    def fft(self, f):
        return self.backend.rfftn(f)

    def ifft(self, F):
        return self.backend.irfftn(F, self.n).astype(self.dtype, copy=False)

    # ---- coordinates ------------------------------------------------------------
    def coordinates(self):
        """Grid coordinates x_i = i·h as three broadcastable arrays (axis 0 slowest)."""
        x = self.xp.arange(self.n, dtype=self.dtype) * self.dtype.type(self.h)
        return x.reshape(-1, 1, 1), x.reshape(1, -1, 1), x.reshape(1, 1, -1)

    # ---- derivatives -----------------------------------------------------------
    def grad(self, f, F=None):
        """∇f as an array of shape (3, n, n, n). F: the precomputed spectrum of f."""
        F = self.fft(f) if F is None else F
        ik = [1j * kd for kd in self.k]
        return self.ifft(self.xp.stack([ik[0] * F, ik[1] * F, ik[2] * F]))

    def div(self, v):
        """∇·v for v of shape (3, n, n, n)."""
        V = self.fft(v)
        return self.ifft(1j * (self.k[0] * V[0] + self.k[1] * V[1] + self.k[2] * V[2]))

    def laplacian(self, f):
        return self.ifft(-self.ksq * self.fft(f))

    def translate(self, f, shift):
        """f(x − s) for a shift s (3 domain units) by the Fourier phase exp(−i k·s), smooth in
        s; the Nyquist mode (which no real phase can shift) is dropped."""
        xp = self.xp
        s = [float(v) for v in shift]
        phase = xp.exp(-1j * (self.k[0] * s[0] + self.k[1] * s[1] + self.k[2] * s[2]))
        return self.ifft(phase * self._nyquist_free * self.fft(f))

    @property
    def _nyquist_free(self):
        """1 off, 0 on the Nyquist planes of the rfftn spectrum."""
        if not hasattr(self, "_nyq"):
            n, xp = self.n, self.xp
            m = np.ones((n, n, n // 2 + 1))
            m[n // 2, :, :] = m[:, n // 2, :] = m[:, :, -1] = 0.0
            self._nyq = xp.asarray(m, dtype=self.dtype)
        return self._nyq

    # ---- Gaussian smoothing (reference kernel) ---------------------------------
    def gaussian_multiplier(self, sigma: float):
        """Fourier multiplier of the reference's sampled, periodised, normalised Gaussian."""
        key = float(sigma)
        if key not in self._smooth_cache:
            n, h = self.n, self.h
            x = np.arange(n) * h
            # 1-D factors with the nearest periodic image (x and x − 2π)
            g1 = np.exp(-(x**2) / (2 * sigma**2)) + np.exp(-((x - 2 * math.pi) ** 2) / (2 * sigma**2))
            g = g1[:, None, None] * g1[None, :, None] * g1[None, None, :]
            g /= g.sum() * h**3
            mult = np.fft.rfftn(g).real * h**3
            self._smooth_cache[key] = self.xp.asarray(mult, dtype=self.dtype)
        return self._smooth_cache[key]

    def smooth(self, f, sigma: float | None = None):
        """G_σ * f (σ defaults to one voxel, 2π/n). Works on batched (…, n, n, n) arrays."""
        sigma = self.h if sigma is None else sigma
        return self.ifft(self.gaussian_multiplier(sigma) * self.fft(f))

    # ---- reductions --------------------------------------------------------------
    def integral(self, f) -> float:
        """∫ f dx with the volume element h³."""
        return float(self.xp.sum(f, dtype=np.float64)) * self.h**3

    def norm(self, f) -> float:
        """Unweighted 2-norm over voxels (the convention of MODEL.md §8)."""
        return float(self.xp.sqrt(self.xp.sum(self.xp.asarray(f, dtype=np.float64) ** 2)))
