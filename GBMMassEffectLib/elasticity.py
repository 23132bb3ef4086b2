"""Variable-coefficient linear elasticity with screening (MODEL.md §3, step 6).

The model equation is  A u = f  with
    A u = ∇·(µ(∇u + ∇uᵀ)) + ∇(λ ∇·u) − η u,      f = γ·1e5·tanh(c_s)∇c_s,  c_s = G_σ * c.
A is symmetric negative definite (µ, λ ≥ 0, η > 0), so we solve the equivalent SPD system
    L u = b,   L = −A,   b = −f,
with the constant-coefficient preconditioner B = L̄⁻¹, L̄ the operator with the grid means
µ̄, λ̄, η̄:  L̄(ω) = (µ̄|ω|² + η̄) I + (µ̄+λ̄) ω ωᵀ, inverted in closed form (Sherman–Morrison):
    B(ω) r̂ = r̂/a − b·ω(ω·r̂) / (a(a + b|ω|²)),   a = µ̄|ω|² + η̄,  b = µ̄ + λ̄,
with the Nyquist wavenumber set to 0 (as in every spectral derivative here). Negating A, f
and B together leaves every CG iterate of the reference (which iterates on A, f and −B)
unchanged, including the stopping test ‖B r‖₂ ≤ rtol·‖B b‖₂.

Matrix-free operator, all derivatives pseudo-spectral. L is applied to the *spectrum* of u:
    9 inverse FFTs: the symmetric strain (3 diagonal ∂_i u_i, 3 sums ∂_j u_i + ∂_i u_j)
                    and u itself (for η u);
    pointwise:      σ = µ(∇u+∇uᵀ) + λ(∇·u) I (6 components), η u (3);
    9 forward FFTs: σ and η u;  (L u)^ = −(iω·σ̂) + (η u)^ in Fourier space.
The CG runs entirely on spectra (inner products by Parseval over the real-FFT half
spectrum), so the preconditioner needs no transforms and each iteration costs exactly
18 single-field FFTs (the textbook real-space version costs 24: 3 + 6 + 6 + 3 for the
matvec and 3 + 3 for the preconditioner). The solution's spectrum is returned, so a warm
start from the previous solve costs no transform either.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .pcg import PCGInfo
from .spectral import SpectralOps

FORCE_SCALE = 1e5  # γ_paper → force factor (the Lamé fields are in Pa), MODEL.md §3


class FFTMeter:
    """Counts single-field FFTs (forward / inverse) and the seconds spent in them."""

    def __init__(self, ops: SpectralOps):
        self.ops = ops
        self.forward = 0
        self.inverse = 0
        self.seconds = 0.0

    @staticmethod
    def _fields(a) -> int:
        return int(np.prod(a.shape[:-3], dtype=np.int64)) if a.ndim > 3 else 1

    def fft(self, f):
        t = time.perf_counter()
        F = self.ops.fft(f)
        self.ops.backend.synchronize()
        self.seconds += time.perf_counter() - t
        self.forward += self._fields(f)
        return F

    def ifft(self, F):
        t = time.perf_counter()
        f = self.ops.ifft(F)
        self.ops.backend.synchronize()
        self.seconds += time.perf_counter() - t
        self.inverse += self._fields(F)
        return f

    @property
    def total(self) -> int:
        return self.forward + self.inverse


@dataclass
class ElasticityCoefficients:
    """Lamé fields µ, λ (Pa) and screening η on the grid, with their grid means."""

    mu: object
    lam: object
    eta: object

    def __post_init__(self):
        xp = _xp_of(self.mu)
        self.mu_bar = float(xp.mean(self.mu, dtype=np.float64))
        self.lam_bar = float(xp.mean(self.lam, dtype=np.float64))
        self.eta_bar = float(xp.mean(self.eta, dtype=np.float64))
        self.two_mu = 2 * self.mu

    @classmethod
    def from_tissues(cls, tissues, c) -> "ElasticityCoefficients":
        """µ, λ, η of MODEL.md §3 from the current tissues and tumor c."""
        mu, lam = tissues.lame(c)
        return cls(mu, lam, tissues.screening(c))


def _xp_of(a):
    if type(a).__module__.startswith("cupy"):
        import cupy

        return cupy
    return np


@dataclass
class ElasticitySolution:
    u: object  # (3, n, n, n) displacement, domain units
    u_hat: object  # its real-FFT spectrum (for warm starts)
    info: PCGInfo


class Elasticity:
    """Matrix-free spectral elasticity operator and its preconditioned CG solver."""

    def __init__(self, ops: SpectralOps, rtol: float = 1e-3, maxiter: int = 100,
                 meter: FFTMeter | None = None):
        self.ops = ops
        self.xp = ops.xp
        self.rtol, self.maxiter = float(rtol), int(maxiter)
        self.meter = meter or FFTMeter(ops)
        n = ops.n
        # real-FFT half-spectrum weights for Parseval: Σ_x a·b = (1/N) Σ_ω w |…|
        self._N = float(n) ** 3
        cdt = ops.backend.complex_dtype
        self._ik = tuple((1j * kd).astype(cdt) for kd in ops.k)  # broadcast i·ω_j
        self.matvecs = 0
        self.iterations_total = 0
        self.seconds_cg = 0.0  # wall time inside solve (includes its FFTs)

    # ---- inner products on half spectra ---------------------------------------------
    def fdot(self, A, B) -> float:
        """Real inner product Σ_x a(x)·b(x) of the fields whose real-FFT spectra are A, B.

        Parseval on the half spectrum: every mode counts twice except the planes ω_z = 0
        and ω_z = n/2. Sums by einsum, not BLAS (whose threads stall on a loaded machine).
        """
        xp = self.xp
        rd = self.ops.dtype
        A = xp.ascontiguousarray(A)
        B = xp.ascontiguousarray(B)
        full = xp.einsum("i,i->", A.view(rd).reshape(-1), B.view(rd).reshape(-1))
        planes = 0.0
        for j in (0, -1):
            a = xp.ascontiguousarray(A[..., j]).view(rd).reshape(-1)
            b = xp.ascontiguousarray(B[..., j]).view(rd).reshape(-1)
            planes += float(xp.einsum("i,i->", a, b))
        return (2.0 * float(full) - planes) / self._N

    # ---- the force ---------------------------------------------------------------
    def force(self, c, gamma: float):
        """f = γ·1e5·tanh(c_s)∇c_s with c_s = G_σ * c (σ one voxel); γ in paper units."""
        ops, xp = self.ops, self.xp
        Cs = ops.gaussian_multiplier(ops.h) * self.meter.fft(c)
        k = ops.k
        fields = self.meter.ifft(xp.stack([Cs, 1j * k[0] * Cs, 1j * k[1] * Cs, 1j * k[2] * Cs]))
        scale = xp.tanh(fields[0])
        scale *= ops.dtype.type(gamma * FORCE_SCALE)
        f = fields[1:]
        f *= scale
        return f

    # ---- the operator --------------------------------------------------------------
    def apply_L_hat(self, U, coef: ElasticityCoefficients):
        """(L u)^ for the spectrum U (3, n, n, n//2+1) of u; L = −A (SPD). 18 FFTs."""
        xp = self.xp
        ik0, ik1, ik2 = self._ik
        S = xp.empty((6,) + U.shape[1:], dtype=U.dtype)
        # spectra of ∂_i u_i (3) and of ∂_j u_i + ∂_i u_j (01, 02, 12)
        xp.multiply(ik0, U[0], out=S[0])
        xp.multiply(ik1, U[1], out=S[1])
        xp.multiply(ik2, U[2], out=S[2])
        xp.multiply(ik1, U[0], out=S[3])
        S[3] += ik0 * U[1]
        xp.multiply(ik2, U[0], out=S[4])
        S[4] += ik0 * U[2]
        xp.multiply(ik2, U[1], out=S[5])
        S[5] += ik1 * U[2]
        s = self.meter.ifft(S)  # 6 inverse
        del S
        u = self.meter.ifft(U)  # 3 inverse
        # stress σ = µ(∇u+∇uᵀ) + λ(∇·u)I and screening η u, pointwise
        lam_div = s[0] + s[1] + s[2]
        lam_div *= coef.lam
        s[:3] *= coef.two_mu
        s[:3] += lam_div
        s[3:] *= coef.mu
        u *= coef.eta
        T = self.meter.fft(s)  # 6 forward: σ00, σ11, σ22, σ01, σ02, σ12
        out = self.meter.fft(u)  # 3 forward: (η u)^
        del s, u, lam_div
        # L u = −∇·σ + η u
        out[0] -= ik0 * T[0]
        out[0] -= ik1 * T[3]
        out[0] -= ik2 * T[4]
        out[1] -= ik0 * T[3]
        out[1] -= ik1 * T[1]
        out[1] -= ik2 * T[5]
        out[2] -= ik0 * T[4]
        out[2] -= ik1 * T[5]
        out[2] -= ik2 * T[2]
        self.matvecs += 1
        return out

    def apply(self, u, coef: ElasticityCoefficients):
        """A u = ∇·(µ(∇u+∇uᵀ)) + ∇(λ∇·u) − η u in real space (the model's sign)."""
        return -self.meter.ifft(self.apply_L_hat(self.meter.fft(u), coef))

    # ---- the preconditioner -----------------------------------------------------
    def preconditioner(self, coef: ElasticityCoefficients):
        """B = L̄⁻¹ on spectra (grid means µ̄, λ̄, η̄; Nyquist wavenumber 0)."""
        ops = self.ops
        k0, k1, k2 = ops.k
        ksq = ops.ksq.astype(np.float64)
        a = coef.mu_bar * ksq + coef.eta_bar
        b = coef.mu_bar + coef.lam_bar
        inv_a = (1.0 / a).astype(ops.dtype)
        cc = (b / (a * (a + b * ksq))).astype(ops.dtype)

        def apply_B(R):
            kr = k0 * R[0] + k1 * R[1] + k2 * R[2]
            kr *= cc
            Z = R * inv_a
            Z[0] -= k0 * kr
            Z[1] -= k1 * kr
            Z[2] -= k2 * kr
            return Z

        return apply_B

    # ---- the solve -----------------------------------------------------------------
    def solve(self, f, coef: ElasticityCoefficients, u0=None, u0_hat=None, f_hat=None,
              rtol: float | None = None, maxiter: int | None = None) -> ElasticitySolution:
        """Solve A u = f (as L u = −f) by PCG; warm start from u0 (or its spectrum u0_hat).

        Stops on ‖B r‖₂ ≤ rtol·‖B b‖₂ (PETSc's default test, as the reference) or after
        maxiter iterations (the result is then the last iterate, info.converged False).
        """
        t_start = time.perf_counter()
        xp = self.xp
        rtol = self.rtol if rtol is None else float(rtol)
        maxiter = self.maxiter if maxiter is None else int(maxiter)
        Fh = self.meter.fft(f) if f_hat is None else f_hat
        Bh = -Fh  # b = −f
        apply_B = self.preconditioner(coef)
        if u0_hat is None and u0 is not None:
            u0_hat = self.meter.fft(u0)
        if u0_hat is not None:
            X = u0_hat.copy()
            R = Bh - self.apply_L_hat(X, coef)
        else:
            X = xp.zeros_like(Bh)
            R = Bh.copy()
        Z = apply_B(R)
        BB = apply_B(Bh)
        bnorm = np.sqrt(max(self.fdot(BB, BB), 0.0))
        del BB
        if bnorm == 0.0:
            X[...] = 0
            return self._finish(X, PCGInfo(0, True, 0.0), t_start)
        res = np.sqrt(max(self.fdot(Z, Z), 0.0)) / bnorm
        if res <= rtol:
            return self._finish(X, PCGInfo(0, True, res), t_start)
        rz = self.fdot(R, Z)
        P = Z
        it = 0
        converged = False
        while it < maxiter:
            it += 1
            LP = self.apply_L_hat(P, coef)
            pLp = self.fdot(P, LP)
            if pLp <= 0.0:  # breakdown (not SPD in this precision): keep the iterate
                it -= 1
                break
            alpha = rz / pLp
            X += alpha * P
            R -= alpha * LP
            Z = apply_B(R)
            res = np.sqrt(max(self.fdot(Z, Z), 0.0)) / bnorm
            if res <= rtol:
                converged = True
                break
            rz_new = self.fdot(R, Z)
            beta = rz_new / rz
            rz = rz_new
            P *= beta
            P += Z
        return self._finish(X, PCGInfo(it, converged, float(res)), t_start)

    def _finish(self, X, info: PCGInfo, t_start: float) -> ElasticitySolution:
        u = self.meter.ifft(X)
        self.iterations_total += info.iterations
        self.seconds_cg += time.perf_counter() - t_start
        return ElasticitySolution(u, X, info)
