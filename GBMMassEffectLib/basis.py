"""Gaussian basis Φ for the tumor initial condition (MODEL.md §2 brain mask, §5).

c0 = Φp = Σ φ_i p_i with
    φ_i = [G_h * (exp(−|x−x_i|²/(2σ²)) · mask)] · 1{|x−x_i| ≤ 5σ},
the distance non-periodic (|i·h − x_i| per axis, no wrap), G_h the reference's one-voxel
Gaussian of §2, and all atoms divided by ONE global max (the largest atom peak is 1).

`gaussian_atom` builds one atom on the full grid (one FFT smoothing; the reference
regression of §8 uses it).  `GaussianBasis` builds all atoms on small local boxes so that
a 256³ basis of ~1000 atoms never needs one full-grid FFT per atom:

* the reference kernel is separable, g = g1⊗g1⊗g1 with g1 the 1-D periodised Gaussian,
  normalised so Σ g·h³ = 1; its circular convolution is therefore three 1-D
  convolutions with weights w_j = g1(j·h)/Σ g1;
* the atom is kept only within 5σ of its centre (radius R voxels), so only the smoothed
  values there are needed; they see the unsmoothed field within R + M voxels, M the
  kernel half-width.  Truncating the 1-D weights at |j| ≤ M drops a relative weight of
  at most Σ_{|j|>M} w_j ≈ 2·exp(−(M+1)²/2)/√(2π) (σ_s = h); with M = 8 that is 2e-18,
  below float64 round-off (checked against the FFT version in Testing/test_basis.py).
  Each box is built in float64 on the host; storage is m·(2R+1)³ values (R = 5σ/h + 1:
  1331 per atom at σ = h, ~11 MB for 1000 atoms in float64 indices + values).

Φ and Φᵀ are then a scatter-add (bincount) and a gather over the stored local atoms.
"""
from __future__ import annotations

import math

import numpy as np

from .backend import to_numpy
from .spectral import SpectralOps

KERNEL_HALF_WIDTH_SIGMAS = 8.0  # M = ceil(8·σ_s/h) voxels of the smoothing kernel are kept
CUTOFF_SIGMAS = 5.0  # atoms are zero beyond 5σ (§5)


def brain_mask(wm, gm, vt, xp=np):
    """[(wm > 0.1 or gm > 0.1) and vt < 0.8] (MODEL.md §2) as a bool array."""
    return ((wm > 0.1) | (gm > 0.1)) & (vt < 0.8)


def _centre_array(centre) -> np.ndarray:
    c = np.asarray(centre, dtype=np.float64).reshape(-1)
    if c.shape != (3,) or not np.all(np.isfinite(c)):
        raise ValueError(f"a Gaussian centre must be 3 finite coordinates, got {centre!r}")
    return c


def gaussian_atom(ops: SpectralOps, centre, sigma: float, mask):
    """One §5 atom on the full grid, NOT yet divided by the max.

    exp(−|x−x_i|²/(2σ²)) (non-periodic distance) × mask, smoothed one voxel with the
    reference kernel (ops.smooth), set to 0 where |x−x_i| > 5σ.
    """
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    xp = ops.xp
    c = _centre_array(centre)
    x = [xp.asarray(np.arange(ops.n) * ops.h, dtype=np.float64)]
    d0 = (x[0] - c[0]).reshape(-1, 1, 1) ** 2
    d1 = (x[0] - c[1]).reshape(1, -1, 1) ** 2
    d2 = (x[0] - c[2]).reshape(1, 1, -1) ** 2
    r2 = d0 + d1 + d2
    phi = xp.exp(-r2 / (2.0 * sigma**2)) * xp.asarray(mask, dtype=np.float64)
    phi = ops.smooth(phi.astype(ops.dtype))
    phi = xp.where(r2 > (CUTOFF_SIGMAS * sigma) ** 2, 0.0, phi).astype(ops.dtype)
    return phi


def _kernel_weights(n: int, h: float, sigma_s: float, M: int) -> np.ndarray:
    """1-D weights w_j, j = −M..M, of the reference kernel (periodised, normalised)."""
    x = np.arange(n) * h
    g1 = np.exp(-(x**2) / (2 * sigma_s**2)) + np.exp(-((x - 2 * math.pi) ** 2) / (2 * sigma_s**2))
    g1 /= g1.sum()
    j = np.arange(-M, M + 1)
    return g1[j % n]


def candidate_centres(ops: SpectralOps, data, sigma: float | None = None, threshold: float = 0.1,
                      fraction: float = 0.9) -> np.ndarray:
    """Data-driven candidate centres (MODEL.md §5), shape (m, 3), domain units.

    The lattice of voxel indices divisible by round(2σ/h); a lattice point is kept when
    more than `fraction` of the voxels of its discrete σ-ball (offsets |j|·h ≤ σ) have
    data > threshold.
    """
    h, n = ops.h, ops.n
    sigma = h if sigma is None else float(sigma)
    d = to_numpy(data)
    if d.shape != (n, n, n):
        raise ValueError(f"data must have shape {(n, n, n)}, got {d.shape}")
    step = max(1, int(round(2 * sigma / h)))
    r = int(math.floor(sigma / h + 1e-9))
    off = np.arange(-r, r + 1)
    oo = np.stack(np.meshgrid(off, off, off, indexing="ij"), -1).reshape(-1, 3)
    oo = oo[(oo**2).sum(1) * h**2 <= sigma**2 * (1 + 1e-9)]
    above = d > threshold
    lat = np.arange(0, n, step)
    L = np.stack(np.meshgrid(lat, lat, lat, indexing="ij"), -1).reshape(-1, 3)
    L = L[above[L[:, 0], L[:, 1], L[:, 2]]]  # the centre itself must be in
    if len(L) == 0:
        return np.zeros((0, 3))
    idx = (L[:, None, :] + oo[None, :, :]) % n
    frac = above[idx[..., 0], idx[..., 1], idx[..., 2]].mean(axis=1)
    keep = L[frac > fraction]
    return keep.astype(np.float64) * h


class GaussianBasis:
    """Φ: R^m → grid, c0 = Φp, built from local atom boxes (MODEL.md §5).

    centres: (m, 3) in domain units; sigma: atom width (default one voxel h);
    mask: the §2 brain mask (bool or 0/1 array of shape (n, n, n)).
    """

    def __init__(self, ops: SpectralOps, centres, sigma: float | None = None, mask=None,
                 chunk: int = 64):
        self.ops = ops
        xp = ops.xp
        n, h = ops.n, ops.h
        self.sigma = h if sigma is None else float(sigma)
        if not self.sigma > 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        C = np.asarray(centres, dtype=np.float64).reshape(-1, 3) if np.size(centres) else np.zeros((0, 3))
        if not np.all(np.isfinite(C)):
            raise ValueError("basis centres must be finite")
        self.centres = C
        m = len(C)
        self.m = m
        mask_np = np.ones((n, n, n)) if mask is None else to_numpy(mask).astype(np.float64)
        if mask_np.shape != (n, n, n):
            raise ValueError(f"mask must have shape {(n, n, n)}, got {mask_np.shape}")
        R = int(math.ceil(CUTOFF_SIGMAS * self.sigma / h)) + 1
        M = int(math.ceil(KERNEL_HALF_WIDTH_SIGMAS))  # σ_s = h: M voxels
        local = 2 * (R + M) + 1 <= n
        B = 2 * R + 1 if local else n
        self.box_radius = R
        idx_all = np.empty((m, B**3), dtype=np.int64)
        val_all = np.empty((m, B**3), dtype=np.float64)
        if local:
            w = _kernel_weights(n, h, h, M)
            off_big = np.arange(-(R + M), R + M + 1)
            for s in range(0, m, chunk):
                Cc = C[s:s + chunk]
                ic = np.rint(Cc / h).astype(np.int64)  # (k, 3)
                gi = (ic[:, :, None] + off_big[None, None, :]) % n  # (k, 3, L) wrapped indices
                dx = gi * h - Cc[:, :, None]  # non-periodic distance per axis
                e = np.exp(-dx**2 / (2 * self.sigma**2))
                f = (e[:, 0, :, None, None] * e[:, 1, None, :, None] * e[:, 2, None, None, :])
                f *= mask_np[gi[:, 0, :, None, None], gi[:, 1, None, :, None], gi[:, 2, None, None, :]]
                for ax in (1, 2, 3):  # valid 1-D convolutions, shrink by 2M per axis
                    Lc = f.shape[ax] - 2 * M
                    g = np.zeros(f.shape[:ax] + (Lc,) + f.shape[ax + 1:])
                    for j in range(2 * M + 1):
                        sl = [slice(None)] * 4
                        sl[ax] = slice(j, j + Lc)
                        g += w[j] * f[tuple(sl)]
                    f = g
                di = dx[:, :, M:M + B]
                r2 = (di[:, 0, :, None, None] ** 2 + di[:, 1, None, :, None] ** 2
                      + di[:, 2, None, None, :] ** 2)
                f[r2 > (CUTOFF_SIGMAS * self.sigma) ** 2] = 0.0
                gs = gi[:, :, M:M + B]
                flat = (gs[:, 0, :, None, None] * n + gs[:, 1, None, :, None]) * n + gs[:, 2, None, None, :]
                idx_all[s:s + chunk] = flat.reshape(len(Cc), -1)
                val_all[s:s + chunk] = f.reshape(len(Cc), -1)
        else:  # tiny grid: the box would wrap onto itself, use the full-grid FFT atom
            from .backend import get_backend
            ops64 = SpectralOps(n, get_backend("cpu", "float64"))
            for i in range(m):
                val_all[i] = to_numpy(gaussian_atom(ops64, C[i], self.sigma, mask_np)).ravel()
                idx_all[i] = np.arange(n**3)
        peak = float(val_all.max()) if m else 1.0
        if m and not peak > 0:
            raise ValueError("every Gaussian atom is zero: are the centres inside the brain mask?")
        self.scale = peak
        val_all /= peak
        self.idx = xp.asarray(idx_all)
        self.val = xp.asarray(val_all, dtype=ops.dtype)

    @classmethod
    def from_data(cls, ops: SpectralOps, data, mask, sigma: float | None = None,
                  threshold: float = 0.1, fraction: float = 0.9) -> "GaussianBasis":
        """Basis with the §5 data-driven candidate centres."""
        C = candidate_centres(ops, data, sigma, threshold, fraction)
        if len(C) == 0:
            raise ValueError("no candidate Gaussian centres: the tumor data has no region "
                             f"where the σ-ball is > 90% above {threshold}")
        return cls(ops, C, sigma, mask)

    def apply(self, p):
        """Φp on the grid (shape (n, n, n))."""
        xp, n = self.ops.xp, self.ops.n
        p = xp.asarray(p, dtype=self.val.dtype).reshape(-1)
        if p.shape[0] != self.m:
            raise ValueError(f"p must have length {self.m}, got {p.shape[0]}")
        w = (self.val * p[:, None]).ravel()
        out = xp.bincount(self.idx.ravel(), weights=w, minlength=n**3)
        return out.astype(self.ops.dtype).reshape(n, n, n)

    def adjoint(self, c):
        """Φᵀc (unweighted voxel sum), length m."""
        xp = self.ops.xp
        cf = xp.asarray(c).reshape(-1)
        return xp.sum(self.val * cf[self.idx], axis=1, dtype=np.float64)

    def atom(self, i: int):
        """The i-th (normalised) atom on the full grid."""
        e = np.zeros(self.m)
        e[i] = 1.0
        return self.apply(e)

    def subset(self, support) -> "GaussianBasis":
        """A view holding only the atoms in `support` (same global normalisation)."""
        sub = object.__new__(GaussianBasis)
        sub.__dict__.update(self.__dict__)
        s = np.asarray(support, dtype=np.int64)
        sub.centres = self.centres[s]
        sub.m = len(s)
        sub.idx = self.idx[s]
        sub.val = self.val[s]
        return sub
