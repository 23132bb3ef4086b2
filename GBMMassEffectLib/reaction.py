"""Exact logistic reaction step (MODEL.md §3 step 5): c⁺ = c·e^{ρdt} / (c·e^{ρdt} + 1 − c)."""
from __future__ import annotations


def logistic_step(xp, c, rho, dt: float):
    """Exact solution of ∂t c = ρ(x) c(1−c) over dt (ρ scalar or field)."""
    e = xp.exp(rho * dt)
    ce = c * e
    return ce / (ce + 1.0 - c)


def logistic_step_nonnegative(xp, c, rho, dt: float):
    """The exact logistic for c ≥ 0; negative values (spectral undershoots) are left as they are.

    The exact logistic has a pole at c = −1/(e^{ρdt} − 1) and multiplies negative values by
    ≈ e^{ρdt} every step, so undershoots of the spectral diffusion near tissue boundaries
    grow into the pole at large ρ (seen in S.1 at ρ ≥ 12). Unchanged for c ≥ 0; continuous at 0.
    """
    neg = xp.minimum(c, 0)
    return logistic_step(xp, c - neg, rho, dt) + neg


def logistic_step_derivative(xp, c, rho, dt: float):
    """∂c⁺/∂c = e^{ρdt} / (c·e^{ρdt} + 1 − c)² (for linearisations and adjoints)."""
    e = xp.exp(rho * dt)
    return e / (c * e + 1.0 - c) ** 2
