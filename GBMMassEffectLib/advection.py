"""Semi-Lagrangian transport along RK2 characteristics (MODEL.md §3 step 3).

Per time step the departure points are computed once from the (smoothed) velocity v:
    X* = x − dt·v(x),   X = x − dt/2·(v(x) + v(X*)),
with v(X*) by periodic cubic Lagrange interpolation (interpolation.py). Then
- plain transport (vt, csf):  f⁺ = f(X);
- conservative transport (wm, gm, c), Heun along the characteristic:
    ν_i = ν(X), s_i = −ν_i·(∇·v)(X), ν* = ν_i + dt·s_i, s* = −ν*·(∇·v)(x),
    ν⁺ = ν_i + dt/2·(s_i + s*),   with ∇·v spectral and (∇·v)(X) interpolated.
  This is linear in ν_i, so it is applied as ν⁺ = ν_i·F with the per-voxel factor
  F = 1 − dt/2·(a + b·(1 − dt·a)), a = (∇·v)(X), b = (∇·v)(x), built in set_velocity
  (the same formula up to float round-off; one multiply per transported field).
Zero velocity is the identity bit for bit (integer offsets, exact Lagrange weights).
cfl = dt·max|v|/h with |v| the per-voxel Euclidean magnitude.
"""
from __future__ import annotations

import numpy as np

from .interpolation import CubicLagrangeInterpolator
from .spectral import SpectralOps


class SemiLagrangian:
    """Transport operator of one time step dt; call `set_velocity(v)` before transporting.

    Before the first set_velocity the transport is the identity (v = 0).
    """

    def __init__(self, ops: SpectralOps, dt: float, accelerator: str = "auto"):
        dt = float(dt)
        if not np.isfinite(dt) or dt <= 0:
            raise ValueError(f"time step dt must be a positive number, got {dt}")
        self.ops, self.dt = ops, dt
        self.accelerator = accelerator  # interpolation path, see interpolation.py
        self.n, self.h, self.xp, self.dtype = ops.n, ops.h, ops.xp, ops.dtype
        self.interpolator: CubicLagrangeInterpolator | None = None
        self.div_v = None  # (∇·v)(x)
        self.div_v_at_X = None  # (∇·v)(X)
        self.conservative_factor = None  # F of the conservative update (module docstring)
        self.max_speed = 0.0  # max over voxels of |v(x)| (Euclidean magnitude)
        self.max_displacement = 0.0  # max over voxels of |X − x| (domain units)
        self._identity = True

    # ---- trajectories ------------------------------------------------------------
    def set_velocity(self, v):
        """Compute the RK2 departure points X for velocity v (3, n, n, n), ∇·v and (∇·v)(X)."""
        xp, n = self.xp, self.n
        v = xp.asarray(v, dtype=self.dtype)
        if tuple(v.shape) != (3, n, n, n):
            raise ValueError(f"velocity must have shape (3, {n}, {n}, {n}), got {tuple(v.shape)}")
        speed = xp.sqrt(v[0] * v[0] + v[1] * v[1] + v[2] * v[2])
        self.max_speed = float(xp.max(speed))
        if not np.isfinite(self.max_speed):
            raise ValueError("velocity contains NaN or Inf")
        if self.max_speed == 0.0:
            # the general path gives the same result bit for bit; skip its cost
            self._identity = True
            self.interpolator = None
            self.div_v = xp.zeros((n, n, n), dtype=self.dtype)
            self.div_v_at_X = self.div_v
            self.max_displacement = 0.0
            return
        self._trajectories(v)

    def _trajectories(self, v):
        """The general path of set_velocity (also valid for v = 0)."""
        xp, n, dt = self.xp, self.n, self.dt
        backend = self.ops.backend
        acc = self.accelerator
        self._identity = False
        # predictor X* = x − dt·v(x)
        interp_star = CubicLagrangeInterpolator.from_displacement((-dt) * v, n, backend, acc)
        v_star = interp_star(v)
        # corrector X = x − dt/2·(v(x) + v(X*))
        disp = v_star
        disp += v
        disp *= self.dtype.type(-0.5 * dt)
        self.max_displacement = float(xp.max(xp.sqrt(disp[0] ** 2 + disp[1] ** 2 + disp[2] ** 2)))
        self.interpolator = CubicLagrangeInterpolator.from_displacement(disp, n, backend, acc)
        self.div_v = self.ops.div(v)
        self.div_v_at_X = self.interpolator(self.div_v)
        # Heun along the characteristic is linear in ν_i: ν⁺ = ν_i·(1 − dt/2·(a + b·(1 − dt·a)))
        # with a = (∇·v)(X), b = (∇·v)(x); the factor is computed once per velocity
        a, b = self.div_v_at_X, self.div_v
        one, dt_, half = self.dtype.type(1), self.dtype.type(dt), self.dtype.type(0.5 * dt)
        self.conservative_factor = one - half * (a + b * (one - dt_ * a))

    @property
    def cfl(self) -> float:
        """dt·max|v|/h (MODEL.md §3 step 1), for the velocity last set."""
        return self.dt * self.max_speed / self.h

    # ---- transport ---------------------------------------------------------------
    def _check(self, f):
        f = self.xp.asarray(f)
        n = self.n
        if f.ndim not in (3, 4) or tuple(f.shape[-3:]) != (n, n, n):
            raise ValueError(f"field must have shape ({n}, {n}, {n}) or (m, {n}, {n}, {n}), got {tuple(f.shape)}")
        return f

    def transport(self, f):
        """Plain transport f⁺ = f(X); f (n, n, n) or stacked (m, n, n, n)."""
        f = self._check(f)
        if self._identity:
            return f.astype(self.dtype, copy=True)
        return self.interpolator(f)

    def transport_conservative(self, f):
        """Conservative transport ∂t ν + ∇·(ν v) = 0 by Heun along the characteristic (§3 step 3)."""
        f = self._check(f)
        if self._identity:
            return f.astype(self.dtype, copy=True)
        out = self.interpolator(f)
        out *= self.conservative_factor
        return out
