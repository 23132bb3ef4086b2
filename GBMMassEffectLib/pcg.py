"""Preconditioned conjugate gradients on backend arrays (MODEL.md §3 steps 4 and 6).

Stops PETSc-style on the preconditioned residual: ‖B r‖₂ ≤ rtol·‖B b‖₂, the rule the
reference solver uses for both the diffusion and the elasticity solves.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class PCGInfo:
    iterations: int
    converged: bool
    residual: float  # final ‖B r‖ / ‖B b‖


def _dot(xp, a, b) -> float:
    return float(xp.vdot(a.ravel(), b.ravel()).real) if a.dtype.kind == "c" else float(
        xp.sum(a * b, dtype=np.float64)
    )


def pcg(apply_A, b, x0, apply_B, rtol: float = 1e-6, maxiter: int = 100, xp=np, r0=None):
    """Solve A x = b for SPD A, preconditioner B ≈ A⁻¹; returns (x, PCGInfo).

    r0: the initial residual b − A·x0 when the caller already has it (saves one A).
    """
    x = x0.copy() if x0 is not None else xp.zeros_like(b)
    if r0 is not None:
        r = r0.copy()
    else:
        r = b - apply_A(x) if x0 is not None else b.copy()
    z = apply_B(r)
    Bb = apply_B(b)
    bnorm = np.sqrt(max(_dot(xp, Bb, Bb), 0.0))
    if bnorm == 0.0:
        return xp.zeros_like(b), PCGInfo(0, True, 0.0)
    rz = _dot(xp, r, z)
    res = np.sqrt(max(_dot(xp, z, z), 0.0)) / bnorm
    if res <= rtol:
        return x, PCGInfo(0, True, res)
    p = z.copy()
    for it in range(1, maxiter + 1):
        Ap = apply_A(p)
        pAp = _dot(xp, p, Ap)
        if pAp <= 0.0:
            return x, PCGInfo(it - 1, False, res)
        alpha = rz / pAp
        x += alpha * p
        r -= alpha * Ap
        z = apply_B(r)
        res = np.sqrt(max(_dot(xp, z, z), 0.0)) / bnorm
        if res <= rtol:
            return x, PCGInfo(it, True, res)
        rz_new = _dot(xp, r, z)
        beta = rz_new / rz
        rz = rz_new
        p *= beta
        p += z
    return x, PCGInfo(maxiter, False, res)
