"""Periodic tensor-product 4-point cubic Lagrange interpolation (MODEL.md §3 step 3).

A point with grid coordinate s = x/h (per axis) has stencil start j − 1, j = ⌊s⌋, and the
four Lagrange weights of the nodes j−1, j, j+1, j+2 at the fraction t = s − j ∈ [0, 1):

    w₋₁ = −t(t−1)(t−2)/6,  w₀ = (t+1)(t−1)(t−2)/2,  w₁ = −(t+1)t(t−2)/2,  w₂ = (t+1)t(t−1)/6.

No B-spline prefilter (scipy's map_coordinates(order=3) is a B-spline: not this method).
At t = 0 the weights are exactly (0, 1, 0, 0), so integer offsets reproduce grid values
bit for bit. The stencil (one flat index per point into a periodically padded copy of the
field, and 4 weights per axis) is built once per set of points and applied to any number of
fields; the evaluation is separable (4-tap sums along axis 2, then 1, then 0, always in
that order, so every path below gives the same sums).

Evaluation paths, one interface:
- "numpy": vectorised gathers over chunks of points (cache-sized), any backend's xp;
- "numba": a parallel CPU kernel, used on the CPU backend when numba imports (optional
  accelerator; GBM_NUMBA=0 disables it); bit-identical to "numpy" on the same inputs;
- on CuPy, an ElementwiseKernel (one thread per point), falling back to the xp path if it
  cannot be compiled.
"""
from __future__ import annotations

import functools
import math
import os
import threading
import warnings

import numpy as np

from .backend import Backend, get_backend

_PAD = 3  # a stencil starting at j ∈ [0, n) reaches j + 3 ≤ n + 2
_CHUNK = 16384  # points per vectorised block on the numpy path (fits L2 with temporaries)
# numba's default (workqueue) threading layer aborts on concurrent parallel launches from
# several Python threads; each kernel uses every core anyway, so launches are serialised
_NUMBA_LOCK = threading.Lock()


def lagrange_weights(xp, t, out=None):
    """The 4 cubic Lagrange weights at fraction t ∈ [0, 1) (nodes −1, 0, 1, 2): shape (4, …).

    Evaluated as A = t(t−1), C = (t+1)(t−2): w₋₁ = A(t−2)·(−1/6), w₀ = C(t−1)·½,
    w₁ = Ct·(−½), w₂ = A(t+1)·(1/6), all in t's dtype (the numba kernel uses the same
    sequence). At t = 0 this is exactly (0, 1, 0, 0).
    """
    t = xp.asarray(t)
    if out is None:
        out = xp.empty((4,) + t.shape, dtype=t.dtype)
    sixth, half = t.dtype.type(1.0 / 6.0), t.dtype.type(0.5)
    tp1, tm1, tm2 = t + 1, t - 1, t - 2
    A = t * tm1
    C = tp1 * tm2
    xp.multiply(xp.multiply(A, tm2, out=out[0]), -sixth, out=out[0])
    xp.multiply(xp.multiply(C, tm1, out=out[1]), half, out=out[1])
    xp.multiply(xp.multiply(C, t, out=out[2]), -half, out=out[2])
    xp.multiply(xp.multiply(A, tp1, out=out[3]), sixth, out=out[3])
    return out


# ---- optional accelerators -----------------------------------------------------------
def _constants(dtype):
    return np.array([1.0, 2.0, 1.0 / 6.0, 0.5], dtype=dtype)


@functools.lru_cache(maxsize=None)
def numba_kernels():
    """(build_from_displacement, apply) compiled with numba, or None when numba is missing."""
    if os.environ.get("GBM_NUMBA", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    try:
        import numba
    except Exception:
        return None

    def jit(fn):
        try:
            return numba.njit(parallel=True, cache=True)(fn)
        except Exception:  # e.g. no writable cache location
            return numba.njit(parallel=True)(fn)

    def axis(q, g, n, one, two, sixth, half):
        """Stencil start (wrapped) and the 4 weights along one axis (as lagrange_weights)."""
        jf = np.floor(q)
        t = q - jf
        start = int(jf) - 1 + g
        if start < 0 or start >= n:
            start %= n
        tp1, tm1, tm2 = t + one, t - one, t - two
        A = t * tm1
        C = tp1 * tm2
        return start, (A * tm2) * (-sixth), (C * tm1) * half, (C * t) * (-half), (A * tp1) * sixth

    axis = numba.njit(inline="always")(axis)

    def build(d, scale, P, index, weights, const):
        # const = (1, 2, 1/6, 1/2) in the field dtype: keeps every operation in that
        # dtype, so the result equals the vectorised path bit for bit
        one, two, sixth, half = const[0], const[1], const[2], const[3]
        n = d.shape[1]
        P2 = P * P
        for i0 in numba.prange(n):
            for i1 in range(n):
                p = (i0 * n + i1) * n
                for i2 in range(n):
                    s0, a0, a1, a2, a3 = axis(d[0, i0, i1, i2] * scale, i0, n, one, two, sixth, half)
                    s1, b0, b1, b2, b3 = axis(d[1, i0, i1, i2] * scale, i1, n, one, two, sixth, half)
                    s2, c0, c1, c2, c3 = axis(d[2, i0, i1, i2] * scale, i2, n, one, two, sixth, half)
                    index[p] = s0 * P2 + s1 * P + s2
                    weights[0, 0, p], weights[0, 1, p], weights[0, 2, p], weights[0, 3, p] = a0, a1, a2, a3
                    weights[1, 0, p], weights[1, 1, p], weights[1, 2, p], weights[1, 3, p] = b0, b1, b2, b3
                    weights[2, 0, p], weights[2, 1, p], weights[2, 2, p], weights[2, 3, p] = c0, c1, c2, c3
                    p += 1

    def apply(padded, base, w, P, out):
        m = padded.shape[0]
        N = base.shape[0]
        P2 = P * P
        for p in numba.prange(N):
            b0 = base[p]
            w20, w21, w22, w23 = w[2, 0, p], w[2, 1, p], w[2, 2, p], w[2, 3, p]
            for k in range(m):
                f = padded[k]
                acc0 = w20 - w20  # zero in the field dtype
                for a in range(4):
                    acc1 = w20 - w20
                    for b in range(4):
                        o = b0 + a * P2 + b * P
                        acc2 = f[o] * w20 + f[o + 1] * w21 + f[o + 2] * w22 + f[o + 3] * w23
                        acc1 = acc1 + acc2 * w[1, b, p]
                    acc0 = acc0 + acc1 * w[0, a, p]
                out[k, p] = acc0

    build, apply = jit(build), jit(apply)
    try:  # compile (or load from cache) now: a numba that cannot compile means "no numba"
        n, dt = 4, np.float32
        index, weights = np.empty(n**3, np.int64), np.empty((3, 4, n**3), dt)
        build(np.zeros((3, n, n, n), dt), dt(1), n + _PAD, index, weights, _constants(dt))
        apply(np.zeros((1, (n + _PAD) ** 3), dt), index, weights, n + _PAD, np.empty((1, n**3), dt))
    except Exception as exc:  # pragma: no cover - depends on the installed numba
        warnings.warn(f"numba is installed but its kernels failed to compile ({exc}); using numpy")
        return None
    return build, apply


@functools.lru_cache(maxsize=None)
def _cupy_kernel():
    """One CUDA thread per point; same separable sums as the other paths."""
    import cupy

    return cupy.ElementwiseKernel(
        "raw T f, int64 base, raw T w, int64 npts, int64 pstride",
        "T out",
        """
        const long long P2 = pstride * pstride;
        T acc0 = 0;
        for (int a = 0; a < 4; ++a) {
            T acc1 = 0;
            for (int b = 0; b < 4; ++b) {
                const long long o = base + a * P2 + b * pstride;
                T acc2 = f[o] * w[8 * npts + i] + f[o + 1] * w[9 * npts + i]
                       + f[o + 2] * w[10 * npts + i] + f[o + 3] * w[11 * npts + i];
                acc1 += acc2 * w[(4 + b) * npts + i];
            }
            acc0 += acc1 * w[a * npts + i];
        }
        out = acc0;
        """,
        "gbm_cubic_lagrange",
    )


def _check_finite(xp, a, name):
    """Finite and not absurdly large (the integer stencil index must not overflow)."""
    big = float(xp.max(xp.abs(a))) if a.size else 0.0
    if not big <= 1e9:
        raise ValueError(f"{name} must be finite with |value| ≤ 1e9 domain units, got max |{name}| = {big}")


def _resolve_accelerator(backend: Backend, accelerator: str) -> str:
    accelerator = (accelerator or "auto").lower()
    if accelerator not in ("auto", "numba", "numpy", "cupy"):
        raise ValueError(f"accelerator must be 'auto', 'numba', 'numpy' or 'cupy', not {accelerator!r}")
    if backend.name == "gpu":
        if accelerator == "numba":
            raise ValueError("the numba accelerator runs on the CPU backend only")
        return "numpy" if accelerator == "numpy" else "cupy"
    if accelerator == "cupy":
        raise ValueError("the cupy kernel needs the GPU backend")
    if accelerator in ("auto", "numba"):
        if numba_kernels() is not None:
            return "numba"
        if accelerator == "numba":
            raise ValueError("accelerator 'numba' was requested but numba is not importable")
    return "numpy"


class CubicLagrangeInterpolator:
    """Values of periodic n³ fields at a fixed set of points, by cubic Lagrange interpolation.

    points: (3, …) coordinates in domain units on [0, 2π) (any real value; wrapped), axis 0
    slowest, grid x_i = i·h, h = 2π/n. Call with a field (n, n, n) or a stack (m, n, n, n);
    the result has the points' trailing shape (and the stack's leading axis).
    Use `from_displacement` when the points are x + d on the grid: that form keeps the
    offsets exact (zero displacement is the identity bit for bit).
    accelerator: "auto" (numba on CPU when available, the CUDA kernel on GPU), "numba",
    "numpy" (the vectorised xp path) or "cupy".
    """

    def __init__(self, points, n: int, backend: Backend | None = None, accelerator: str = "auto"):
        backend = backend or get_backend("cpu")
        xp = backend.xp
        points = xp.asarray(points)
        if points.ndim < 1 or points.shape[0] != 3:
            raise ValueError(f"points must have shape (3, ...), got {tuple(points.shape)}")
        _check_finite(xp, points, "points")
        self._setup(n, backend, points.shape[1:], accelerator)
        s = points.astype(np.float64) * (self.n / (2.0 * math.pi))  # grid units, float64
        j = xp.floor(s)
        t = (s - j).astype(self.dtype)
        j = xp.where(t >= 1, j + 1, j)  # float64 → dtype rounding may give t = 1
        t = xp.where(t >= 1, xp.zeros_like(t), t)
        self._build_generic(j.astype(np.int64), t, grid_offset=False)

    @classmethod
    def from_displacement(cls, displacement, n: int, backend: Backend | None = None, accelerator: str = "auto"):
        """Interpolator for the points x + d of the n³ grid; d: (3, n, n, n) in domain units."""
        backend = backend or get_backend("cpu")
        xp = backend.xp
        d = xp.asarray(displacement)
        if tuple(d.shape) != (3, n, n, n):
            raise ValueError(f"displacement must have shape (3, {n}, {n}, {n}), got {tuple(d.shape)}")
        _check_finite(xp, d, "displacement")
        self = cls.__new__(cls)
        self._setup(n, backend, d.shape[1:], accelerator)
        d = xp.ascontiguousarray(d, dtype=self.dtype)
        scale = self.dtype.type(self.n / (2.0 * math.pi))
        if self.accelerator == "numba":
            build, _ = numba_kernels()
            self.index = np.empty(self.size, dtype=np.int64)
            self.weights = np.empty((3, 4, self.size), dtype=self.dtype)
            with _NUMBA_LOCK:
                build(d, scale, self.n + _PAD, self.index, self.weights, _constants(self.dtype))
            return self
        q = d * scale  # grid units
        j = xp.floor(q)
        # t ∈ [0, 1]; t = 1 only by rounding for tiny negative q, where the weights
        # (0, 0, 1, 0) pick node j + 1 = 0, the right one
        t = q - j
        self._build_generic(j.astype(np.int64), t, grid_offset=True)
        return self

    # ---- construction -----------------------------------------------------------
    def _setup(self, n, backend, shape, accelerator):
        if int(n) != n or n < 4:
            raise ValueError(f"grid size n must be an integer ≥ 4, got {n}")
        self.n = int(n)
        self.backend = backend
        self.xp = backend.xp
        self.dtype = np.dtype(backend.dtype)
        self.shape = tuple(int(s) for s in shape)
        self.size = int(np.prod(self.shape)) if self.shape else 1
        self.accelerator = _resolve_accelerator(backend, accelerator)
        self._pad_buf = None

    def _build_generic(self, j, t, grid_offset: bool):
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
        t = t.astype(self.dtype, copy=False)
        self.weights = xp.empty((3, 4, self.size), dtype=self.dtype)
        for a in range(3):
            lagrange_weights(xp, t[a].reshape(-1), out=self.weights[a])

    # ---- evaluation --------------------------------------------------------------
    def _padded(self, fields):
        """Periodic copy of fields (m, n, n, n) into (m, n+3, n+3, n+3), flattened per field."""
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
        """Interpolate a field (n, n, n) or a stack (m, n, n, n) at the points."""
        xp, n = self.xp, self.n
        fields = xp.asarray(fields)
        if fields.ndim not in (3, 4) or tuple(fields.shape[-3:]) != (n, n, n):
            raise ValueError(
                f"fields must have shape ({n}, {n}, {n}) or (m, {n}, {n}, {n}), got {tuple(fields.shape)}"
            )
        single = fields.ndim == 3
        stack = fields[None] if single else fields
        m = stack.shape[0]
        padded = self._padded(stack)
        out = xp.empty((m, self.size), dtype=self.dtype)
        if self.accelerator == "numba":
            with _NUMBA_LOCK:
                numba_kernels()[1](padded, self.index, self.weights, n + _PAD, out)
        elif self.accelerator == "cupy" and self._apply_cupy(padded, out):
            pass
        else:
            for k in range(m):
                self._apply_xp(padded[k], out[k])
        out = out.reshape((m,) + self.shape)
        return out[0] if single else out

    def _apply_cupy(self, padded, out) -> bool:
        try:
            kernel = _cupy_kernel()
            npts, pstride = np.int64(self.size), np.int64(self.n + _PAD)
            w = self.weights.reshape(-1)  # (3, 4, N) contiguous, flat: w[(4·axis + tap)·N + i]
            for k in range(padded.shape[0]):
                kernel(padded[k], self.index, w, npts, pstride, out[k])
            return True
        except Exception:  # compilation problem: use the generic xp path from now on
            self.accelerator = "numpy"
            return False

    def _apply_xp(self, flat_field, out):
        """out = Σ_a w0_a Σ_b w1_b Σ_c w2_c f[base + a·P² + b·P + c], over chunks of points."""
        xp = self.xp
        P = self.n + _PAD
        N = self.size
        chunk = N if self.backend.name == "gpu" else min(N, _CHUNK)
        g = xp.empty(chunk, dtype=self.dtype)
        s2 = xp.empty(chunk, dtype=self.dtype)
        s1 = xp.empty(chunk, dtype=self.dtype)
        mul, add, take = xp.multiply, xp.add, xp.take
        for s in range(0, N, chunk):
            e = min(N, s + chunk)
            k = e - s
            base, w = self.index[s:e], self.weights[:, :, s:e]
            G, acc2, acc1, acc0 = g[:k], s2[:k], s1[:k], out[s:e]
            for a in range(4):
                for b in range(4):
                    off = a * P * P + b * P
                    take(flat_field[off:], base, out=acc2)
                    mul(acc2, w[2, 0], out=acc2)
                    for c in range(1, 4):
                        take(flat_field[off + c :], base, out=G)
                        mul(G, w[2, c], out=G)
                        add(acc2, G, out=acc2)
                    if b == 0:
                        mul(acc2, w[1, 0], out=acc1)
                    else:
                        mul(acc2, w[1, b], out=acc2)
                        add(acc1, acc2, out=acc1)
                if a == 0:
                    mul(acc1, w[0, 0], out=acc0)
                else:
                    mul(acc1, w[0, a], out=acc1)
                    add(acc0, acc1, out=acc0)
        return out
