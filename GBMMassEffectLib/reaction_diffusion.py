"""Reaction–diffusion model of stage S.1 and its exact discrete adjoint (MODEL.md §4).

Forward (no advection, nt = 40, dt = 1/40), per step, Strang splitting:
    c_a = S(c_n)        CN diffusion over dt/2:  (I − a D) c_a = (I + a D) c_n,  a = dt/4
    c_b = L(c_a)        exact logistic over dt:  c_b = c_a e / (c_a e + 1 − c_a),  e = e^{ρ(x) dt}
    c_{n+1} = S(c_b)    CN diffusion over dt/2
with D c = ∇·(k ∇c), k = κ·m_k, ρ(x) = ρ·m_ρ (§3 coefficients from the tissue fractions,
tumor and edema counted as white matter; `coefficient_fraction`).

Adjoint (exact for this discretisation, the solves taken as exact): D is symmetric in the
plain voxel inner product (spectral ∇ and ∇· are negative adjoints, Nyquist zeroed), so
Sᵀ = (I + a D)(I − a D)⁻¹ and, for λ⁺ the adjoint after a half step,
    z = (I − a D)⁻¹ λ⁺,   λ = z + a D z,
    ∂/∂κ:  c⁺ = A⁻¹B c with A = I − aκD₁, B = I + aκD₁, D₁ = ∇·(m_k∇·)
           ⇒ ⟨λ⁺, ∂c⁺/∂κ⟩ = a ⟨z, D₁(c + c⁺)⟩ = a ⟨D₁z, c + c⁺⟩.
Logistic: λ_a = λ_b · e/(c_a e + 1 − c_a)²,
          ⟨λ_b, ∂c_b/∂ρ⟩ = Σ λ_b · c_a(1 − c_a) e m_ρ dt / (c_a e + 1 − c_a)².
These are the derivatives of the discrete Strang steps themselves, not the reference's
trapezoid-in-time approximation, so every component passes a Taylor test (Testing/).

Exactness needs tight PCG solves (`rtol`; the map is only as linear as its solves are
converged: use 1e-10..1e-12 in float64 when Taylor-testing, 1e-6 is the §3 default).

Memory: `forward(store=True)` keeps c_n, c_a, c_b for every step, 3·nt + 1 fields
(nt = 40: 121 fields, 254 MB at 64³ float64, 7.8 GB at 256³ float32).  `store="steps"` keeps only the nt + 1 full-step
states (2.6 GB at 256³ float32) and recomputes c_a, c_b from c_n in the backward sweep
(one extra CN solve per step; same inputs and warm start, so the same numbers).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .diffusion import CrankNicolson, apply_diffusion
from .reaction import logistic_step, logistic_step_derivative
from .spectral import SpectralOps

NT_DEFAULT = 40


def coefficient_fraction(wm, gm, vt, csf, gm_ratio: float = 0.0, xp=np):
    """max(0, 1 − bg − (1 − r)·gm − vt − csf), bg = 1 − (wm+gm+vt+csf) (tissues clipped ≥ 0).

    MODEL.md §3 coefficients; k = κ·this with r = r_k, ρ(x) = ρ·this with r = r_ρ.
    """
    wm, gm, vt, csf = (xp.maximum(t, 0) for t in (wm, gm, vt, csf))
    bg = 1.0 - (wm + gm + vt + csf)
    return xp.maximum(0.0, 1.0 - bg - (1.0 - gm_ratio) * gm - vt - csf)


def _vdot(xp, a, b) -> float:
    return float(xp.sum(a * b, dtype=np.float64))


@dataclass
class Trajectory:
    """Forward states kept for the adjoint: full steps c_n (nt + 1) and, if stored, c_a, c_b."""

    kappa: float
    rho: float
    c: list = field(default_factory=list)
    ca: list = field(default_factory=list)
    cb: list = field(default_factory=list)
    pcg_iterations: int = 0

    @property
    def c1(self):
        return self.c[-1]


class ReactionDiffusion:
    """§4 Strang-split reaction–diffusion on fixed tissue, with exact adjoint and gradients.

    ops: SpectralOps; m_k, m_rho: coefficient fractions (k = κ m_k, ρ(x) = ρ m_rho;
    m_rho defaults to m_k); nt: steps over t ∈ [0, 1]; rtol: PCG tolerance.
    """

    def __init__(self, ops: SpectralOps, m_k, m_rho=None, nt: int = NT_DEFAULT, rtol: float = 1e-6,
                 maxiter: int = 500):
        if nt < 1:
            raise ValueError(f"nt must be ≥ 1, got {nt}")
        n = ops.n
        xp = ops.xp
        self.ops, self.xp = ops, xp
        self.m_k = xp.asarray(m_k, dtype=ops.dtype)
        self.m_rho = self.m_k if m_rho is None else xp.asarray(m_rho, dtype=ops.dtype)
        for name, f in (("m_k", self.m_k), ("m_rho", self.m_rho)):
            if f.shape != (n, n, n):
                raise ValueError(f"{name} must have shape {(n, n, n)}, got {f.shape}")
        self.nt = int(nt)
        self.dt = 1.0 / self.nt
        self.rtol, self.maxiter = rtol, maxiter

    # ---- pieces -----------------------------------------------------------------
    def _cn(self, kappa: float) -> CrankNicolson:
        if not kappa > 0:
            raise ValueError(f"kappa must be positive, got {kappa}")
        return CrankNicolson(self.ops, self.m_k * self.ops.dtype.type(kappa), 0.5 * self.dt,
                             rtol=self.rtol, maxiter=self.maxiter)

    def _growth(self, rho: float):
        return self.xp.exp((rho * self.dt) * self.m_rho)

    def _logistic(self, c, rho_field):
        return logistic_step(self.xp, c, rho_field, self.dt)

    # ---- forward ------------------------------------------------------------------
    def forward(self, c0, kappa: float, rho: float, store: bool | str = False):
        """c(1) from c0; with store=True/"all" or "steps" returns a Trajectory instead."""
        xp = self.xp
        cn = self._cn(kappa)
        rho_field = (self.ops.dtype.type(rho) * self.m_rho)
        c = xp.asarray(c0, dtype=self.ops.dtype)
        traj = Trajectory(float(kappa), float(rho), [c]) if store else None
        its = 0
        for _ in range(self.nt):
            ca = cn.step(c)
            its += cn.last_info.iterations
            cb = self._logistic(ca, rho_field)
            c = cn.step(cb)
            its += cn.last_info.iterations
            if traj is not None:
                traj.c.append(c)
                if store != "steps":
                    traj.ca.append(ca)
                    traj.cb.append(cb)
        if traj is None:
            return c
        traj.pcg_iterations = its
        return traj

    # ---- adjoint -------------------------------------------------------------------
    def adjoint(self, traj: Trajectory, lam1, need_params: bool = True):
        """Backward sweep from λ(1) = ∂J/∂c(1).  Returns (λ(0) = ∂J/∂c0, ∂J/∂κ, ∂J/∂ρ).

        The gradients are the exact derivatives of the discrete map (§4), in the inner
        product in which λ(1) is given (pass λ(1) = h³·Oᵀ(Oc(1) − Od) for J with h³).
        """
        xp = self.xp
        kappa, rho = traj.kappa, traj.rho
        cn = self._cn(kappa)
        rho_field = self.ops.dtype.type(rho) * self.m_rho
        e = self._growth(rho)
        a = 0.25 * self.dt  # CN over dt/2: (I ∓ (dt/2)/2 · D)
        lam = xp.asarray(lam1, dtype=self.ops.dtype)
        g_kappa = 0.0
        g_rho = 0.0
        recompute = len(traj.ca) == 0
        for n in range(self.nt - 1, -1, -1):
            c_n, c_next = traj.c[n], traj.c[n + 1]
            if recompute:
                ca = cn.step(c_n)
                cb = self._logistic(ca, rho_field)
            else:
                ca, cb = traj.ca[n], traj.cb[n]
            # second CN half step: cb → c_next
            z = cn.solve(lam, x0=lam)
            y = apply_diffusion(self.ops, self.m_k, z)  # D₁ z
            if need_params:
                g_kappa += a * _vdot(xp, y, cb + c_next)
            lam = z + (a * kappa) * y
            # logistic: ca → cb
            denom = ca * e + 1.0 - ca
            if need_params:
                g_rho += self.dt * _vdot(xp, lam, ca * (1.0 - ca) * e * self.m_rho / denom**2)
            lam = lam * logistic_step_derivative(xp, ca, rho_field, self.dt)
            # first CN half step: c_n → ca
            z = cn.solve(lam, x0=lam)
            y = apply_diffusion(self.ops, self.m_k, z)
            if need_params:
                g_kappa += a * _vdot(xp, y, c_n + ca)
            lam = z + (a * kappa) * y
        return lam, g_kappa, g_rho
