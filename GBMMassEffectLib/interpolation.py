"""Periodic tensor-product 4-point cubic Lagrange interpolation (MODEL.md §3 step 3).

A point with grid coordinate s = x/h (per axis) has stencil start j − 1, j = ⌊s⌋, and the
four Lagrange weights of the nodes j−1, j, j+1, j+2 at the fraction t = s − j ∈ [0, 1):

    w₋₁ = −t(t−1)(t−2)/6,  w₀ = (t+1)(t−1)(t−2)/2,  w₁ = −(t+1)t(t−2)/2,  w₂ = (t+1)t(t−1)/6.

No B-spline prefilter (scipy's map_coordinates(order=3) is a B-spline: not this method).
At t = 0 the weights are exactly (0, 1, 0, 0), so integer offsets reproduce grid values
bit for bit. The stencil (one flat index per point into a periodically padded copy of the
field, and 4 weights per axis) is built once per set of points and applied to any number of
fields; the evaluation is separable (4-tap sums along axis 2, then 1, then 0).
"""
from __future__ import annotations

import math

import numpy as np

from .backend import Backend, get_backend

_PAD = 3  # a stencil starting at j ∈ [0, n) reaches j + 3 ≤ n + 2


def lagrange_weights(xp, t):
    """The 4 cubic Lagrange weights at fraction t ∈ [0, 1) (nodes −1, 0, 1, 2): shape (4, …)."""
    tp1, tm1, tm2 = t + 1, t - 1, t - 2
    return xp.stack(
        [
            -(t * tm1 * tm2) / 6,
            (tp1 * tm1 * tm2) / 2,
            -(tp1 * t * tm2) / 2,
            (tp1 * t * tm1) / 6,
        ]
    )


class CubicLagrangeInterpolator:
    """Values of periodic n³ fields at a fixed set of points, by cubic Lagrange interpolation.

    points: (3, …) coordinates in domain units on [0, 2π) (any real value; wrapped), axis 0
    slowest, grid x_i = i·h, h = 2π/n. Call with a field (n, n, n) or a stack (m, n, n, n);
    the result has the points' trailing shape (and the stack's leading axis).
    Use `from_displacement` when the points are x + d on the grid: that form keeps the
    offsets exact (zero displacement is the identity bit for bit).
    """

    def __init__(self, points, n: int, backend: Backend | None = None):
        backend = backend or get_backend("cpu")
        xp = backend.xp
        points = xp.asarray(points)
        if points.ndim < 1 or points.shape[0] != 3:
            raise ValueError(f"points must have shape (3, ...), got {tuple(points.shape)}")
        self._setup(n, backend, points.shape[1:])
        s = points.astype(np.float64) * (self.n / (2.0 * math.pi))  # grid units
        j = xp.floor(s)
        t = (s - j).astype(self.dtype)
        # round-off can put t at exactly 1.0 for tiny negative s; keep t in [0, 1)
        j = xp.where(t >= 1, j + 1, j)
        t = xp.where(t >= 1, xp.zeros_like(t), t)
        self._build(j.astype(np.int64), t, grid_offset=False)

    @classmethod
    def from_displacement(cls, displacement, n: int, backend: Backend | None = None):
        """Interpolator for the points x + d of the n³ grid; d: (3, n, n, n) in domain units."""
        backend = backend or get_backend("cpu")
        xp = backend.xp
        d = xp.asarray(displacement)
        if tuple(d.shape) != (3, n, n, n):
            raise ValueError(f"displacement must have shape (3, {n}, {n}, {n}), got {tuple(d.shape)}")
        self = cls.__new__(cls)
        self._setup(n, backend, d.shape[1:])
        q = d.astype(self.dtype) * self.dtype.type(self.n / (2.0 * math.pi))  # grid units
        j = xp.floor(q)
        t = q - j  # exact in floating point
        j = xp.where(t >= 1, j + 1, j)
        t = xp.where(t >= 1, xp.zeros_like(t), t)
        self._build(j.astype(np.int64), t, grid_offset=True)
        return self

    # ---- construction -----------------------------------------------------------
    def _setup(self, n, backend, shape):
        if int(n) != n or n < 4:
            raise ValueError(f"grid size n must be an integer ≥ 4, got {n}")
        self.n = int(n)
        self.backend = backend
        self.xp = backend.xp
        self.dtype = np.dtype(backend.dtype)
        self.shape = tuple(int(s) for s in shape)
        self.size = int(np.prod(self.shape)) if self.shape else 1

    def _build(self, j, t, grid_offset: bool):
        xp, n = self.xp, self.n
        P = n + _PAD
        strides = (P * P, P, 1)
        flat = None
        for a in range(3):
            start = j[a] - 1
            if grid_offset:  # add the grid index i along axis a
                shp = [1, 1, 1]
                shp[a] = n
                start = start + xp.arange(n, dtype=np.int64).reshape(shp)
            start = xp.mod(start, n)
            term = start * strides[a]
            flat = term if flat is None else flat + term
        self.index = xp.ascontiguousarray(flat.reshape(-1))
        # weights (3 axes, 4 taps, N points)
        self.weights = xp.stack([lagrange_weights(xp, t[a].reshape(-1)) for a in range(3)]).astype(
            self.dtype
        )
        self._pad_buf = None

    # ---- evaluation --------------------------------------------------------------
    def _padded(self, fields):
        """Periodic copy of fields (m, n, n, n) into (m, n+3, n+3, n+3)."""
        xp, n = self.xp, self.n
        m = fields.shape[0]
        P = n + _PAD
        buf = self._pad_buf
        if buf is None or buf.shape[0] != m:
            buf = self._pad_buf = xp.empty((m, P, P, P), dtype=self.dtype)
        buf[:, :n, :n, :n] = fields
        buf[:, n:, :n, :n] = buf[:, :_PAD, :n, :n]
        buf[:, :, n:, :n] = buf[:, :, :_PAD, :n]
        buf[:, :, :, n:] = buf[:, :, :, :_PAD]
        return buf.reshape(m, -1)

    def __call__(self, fields):
        xp, n = self.xp, self.n
        fields = xp.asarray(fields)
        single = fields.ndim == 3
        if fields.shape[-3:] != (n, n, n) or fields.ndim not in (3, 4):
            raise ValueError(
                f"fields must have shape ({n}, {n}, {n}) or (m, {n}, {n}, {n}), got {tuple(fields.shape)}"
            )
        stack = fields[None] if single else fields
        m = stack.shape[0]
        padded = self._padded(stack)
        out = xp.empty((m, self.size), dtype=self.dtype)
        for k in range(m):
            out[k] = self._apply_one(padded[k])
        out = out.reshape((m,) + self.shape)
        return out[0] if single else out

    def _apply_one(self, flat_field):
        """Σ_a w0_a Σ_b w1_b Σ_c w2_c f[base + a·P² + b·P + c] (separable 4-tap sums)."""
        xp = self.xp
        P = self.n + _PAD
        base, w = self.index, self.weights
        acc0 = None
        for a in range(4):
            acc1 = None
            for b in range(4):
                off = a * P * P + b * P
                acc2 = None
                for c in range(4):
                    g = xp.take(flat_field, base + (off + c))
                    g *= w[2, c]
                    acc2 = g if acc2 is None else acc2 + g
                acc2 *= w[1, b]
                acc1 = acc2 if acc1 is None else acc1 + acc2
            acc1 *= w[0, a]
            acc0 = acc1 if acc0 is None else acc0 + acc1
        return acc0
