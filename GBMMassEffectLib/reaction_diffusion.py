"""Reaction–diffusion model of stage S.1 and its exact discrete adjoint (MODEL.md §4).

Forward (no advection, nt = 40, dt = 1/40), per step, Strang splitting:
    c_a = S(c_n)        CN diffusion over dt/2:  (I − a D) c_a = (I + a D) c_n,  a = dt/4
    c_b = L(c_a)        exact logistic over dt:  c_b = c_a e / (c_a e + 1 − c_a),  e = e^{ρ(x) dt}
    c_{n+1} = S(c_b)    CN diffusion over dt/2
with D c = ∇·(k ∇c), k = κ·m_k, ρ(x) = ρ·m_ρ (§3 coefficients from the tissue fractions,
tumor and edema counted as white matter; `coefficient_fraction`).

Positivity safeguard: the spectral CN step is not positivity preserving (k = κ·m_k jumps to
0 at grey matter / CSF / skull, and Gibbs ringing leaves small negative c, ~1e-3 even for a
smooth Gaussian), and the exact logistic amplifies a negative value by e^{ρ(x)dt} per step
and diverges in finite time (c_b = c e/(1 + c(e − 1)) has a pole at c = −1/(e − 1)): on the
reference patient data at 32³ an undershoot of −5e-3 became |c| ~ 1e2 at ρ = 12, and every
S.1 evaluation at ρ ≥ 10 was garbage.  The growth factor is therefore e → ē = 1 + (e − 1)·s(c)
with s a C¹ smooth step, s = 1 for c ≥ −τ and 0 for c ≤ −2τ (τ = `negative_cutoff`,
default 5e-3; 0 turns the switch off).  Nothing changes where c ≥ −τ, so the physical
range is untouched; clearly negative values no longer grow and diffuse away.  The map
stays C¹ and its adjoint below is exact for it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .diffusion import CrankNicolson, apply_diffusion
from .spectral import SpectralOps

NT_DEFAULT = 40
NEGATIVE_CUTOFF = 5e-3  # τ: reaction fully on for c ≥ −τ, off for c ≤ −2τ


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
                 maxiter: int = 500, negative_cutoff: float = NEGATIVE_CUTOFF):
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
        self.negative_cutoff = float(negative_cutoff)

    # ---- pieces -----------------------------------------------------------------
    def _cn(self, kappa: float) -> CrankNicolson:
        if not kappa > 0:
            raise ValueError(f"kappa must be positive, got {kappa}")
        return CrankNicolson(self.ops, self.m_k * self.ops.dtype.type(kappa), 0.5 * self.dt,
                             rtol=self.rtol, maxiter=self.maxiter)

    def _growth(self, rho: float):
        return self.xp.exp((rho * self.dt) * self.m_rho)

    def _switch(self, c):
        """(s, s'): smooth step, s = 1 for c ≥ −τ, 0 for c ≤ −2τ (C¹ cubic between)."""
        xp, tau = self.xp, self.negative_cutoff
        if not tau:
            return None, None
        t = xp.clip((c + 2.0 * tau) / tau, 0.0, 1.0)
        return t * t * (3.0 - 2.0 * t), (6.0 / tau) * t * (1.0 - t)

    def _logistic(self, c, e):
        """Exact logistic over dt with growth factor e^{ρ(x)dt} → 1 + (e − 1)·s(c)."""
        s, _ = self._switch(c)
        ee = e if s is None else 1.0 + (e - 1.0) * s
        ce = c * ee
        return ce / (ce + 1.0 - c)

    # ---- forward ------------------------------------------------------------------
    def forward(self, c0, kappa: float, rho: float, store: bool | str = False):
        """c(1) from c0; with store=True/"all" or "steps" returns a Trajectory instead."""
        xp = self.xp
        cn = self._cn(kappa)
        e = self._growth(rho)
        c = xp.asarray(c0, dtype=self.ops.dtype)
        traj = Trajectory(float(kappa), float(rho), [c]) if store else None
        its = 0
        for _ in range(self.nt):
            ca = cn.step(c)
            its += cn.last_info.iterations
            cb = self._logistic(ca, e)
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
                cb = self._logistic(ca, e)
            else:
                ca, cb = traj.ca[n], traj.cb[n]
            # second CN half step: cb → c_next
            z = cn.solve(lam, x0=lam)
            y = apply_diffusion(self.ops, self.m_k, z)  # D₁ z
            if need_params:
                g_kappa += a * _vdot(xp, y, cb + c_next)
            lam = z + (a * kappa) * y
            # logistic: ca → cb
            # c_b = c·ē/(c·ē + 1 − c), ē = 1 + (e − 1)s(c):  ∂c_b/∂c = (ē + c(1 − c)ē′)/D²,
            # ∂c_b/∂ρ = c(1 − c)/D² · s·e·m_ρ·dt
            sw, dsw = self._switch(ca)
            if sw is None:
                ee, dee = e, 0.0
            else:
                ee, dee = 1.0 + (e - 1.0) * sw, (e - 1.0) * dsw
            denom = ca * ee + 1.0 - ca
            q = ca * (1.0 - ca) / denom**2
            if need_params:
                de = e * self.m_rho if sw is None else e * self.m_rho * sw
                g_rho += self.dt * _vdot(xp, lam, q * de)
            lam = lam * (ee / denom**2 + q * dee)
            # first CN half step: c_n → ca
            z = cn.solve(lam, x0=lam)
            y = apply_diffusion(self.ops, self.m_k, z)
            if need_params:
                g_kappa += a * _vdot(xp, y, c_n + ca)
            lam = z + (a * kappa) * y
        return lam, g_kappa, g_rho
