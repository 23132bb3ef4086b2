"""Crank–Nicolson diffusion with PCG (MODEL.md §3 step 4, §4, §8 "Diffusion alone").

D c = ∇·(k ∇c) with spectral derivatives. One CN step of length dt solves
(I − dt/2·D) c⁺ = (I + dt/2·D) c by PCG, warm-started from c, preconditioned by the
constant-coefficient Fourier inverse (I + dt/2·k̄|ω|²)⁻¹ with k̄ the grid mean of k.
D is symmetric in the plain voxel inner product, so the CN operator is its own adjoint.
"""
from __future__ import annotations

from .pcg import PCGInfo, pcg
from .spectral import SpectralOps


def apply_diffusion(ops: SpectralOps, k, c):
    """D c = ∇·(k ∇c)."""
    g = ops.grad(c)
    g *= k
    return ops.div(g)


class CrankNicolson:
    """The CN step operator for a fixed diffusivity field k(x) and step dt."""

    def __init__(self, ops: SpectralOps, k, dt: float, rtol: float = 1e-6, maxiter: int = 200):
        self.ops, self.k, self.dt = ops, k, float(dt)
        self.rtol, self.maxiter = rtol, maxiter
        xp = ops.xp
        self.kbar = float(xp.mean(k)) if hasattr(k, "shape") else float(k)
        self._precond = (1.0 / (1.0 + 0.5 * self.dt * self.kbar * ops.ksq)).astype(ops.dtype)
        self.last_info: PCGInfo | None = None

    def apply_D(self, c):
        return apply_diffusion(self.ops, self.k, c)

    def lhs(self, c):
        """(I − dt/2·D) c."""
        return c - (0.5 * self.dt) * self.apply_D(c)

    def rhs(self, c):
        """(I + dt/2·D) c."""
        return c + (0.5 * self.dt) * self.apply_D(c)

    def precondition(self, r):
        return self.ops.ifft(self._precond * self.ops.fft(r))

    def solve(self, b, x0=None, r0=None):
        """Solve (I − dt/2·D) x = b (warm start x0, default b; r0 = b − lhs(x0) if known)."""
        x0 = b if x0 is None else x0
        x, info = pcg(self.lhs, b, x0, self.precondition, self.rtol, self.maxiter, self.ops.xp,
                      r0=r0)
        self.last_info = info
        return x

    def step(self, c):
        """One CN step c → c⁺, warm-started from c.

        With Dc computed once, the right-hand side is c + a·Dc and the initial residual
        (c + a·Dc) − (c − a·Dc) = 2a·Dc (a = dt/2): one D application saved per step.
        """
        aDc = (0.5 * self.dt) * self.apply_D(c)
        return self.solve(c + aDc, x0=c, r0=2 * aDc)
